"""The shape policy: any parameter tensor as one ``m × n`` block, and back.

* 0-D ``()`` → ``(1, 1)``, no side rotated.
* 1-D ``(d,)`` → ``(d, 1)``; the left side is rotated only with
  ``precondition_1d`` and ``d ≤ max_dim``.
* 2-D ``(m, n)`` → ``(m, n)``.
* N-D ``(o, i, kh, kw)`` → ``(o, i·kh·kw)`` (einops ``o ... -> o (...)``).
* ``merge_dims`` first merges adjacent dims greedily (SOAP's rule) while the
  product stays ≤ ``max_dim``; one merged dim becomes ``(d, 1)``, more than two
  become ``(first, rest)``.

A side longer than ``max_dim`` is not rotated. The round trip
``from_block(to_block(x)) == x`` is exact (a reshape).
"""

import math

import attrs
from torch import Tensor


@attrs.frozen(kw_only=True)
class BlockSpec:
    """How one parameter maps to a block: its shape, the block ``(m, n)`` and the rotated sides."""

    shape: tuple[int, ...]
    m: int
    n: int
    rotate_left: bool
    rotate_right: bool


def merge_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """SOAP's greedy merge of adjacent dims (``(128, 64, 3, 3)`` → ``(8192, 9)`` at 10000)."""
    out: list[int] = []
    p = 1
    for d in shape:
        if p * d <= max_dim:
            p *= d
        elif p > 1:
            out.append(p)
            p = d
        else:
            out.append(d)
    if p > 1 or not out:
        out.append(p)
    return tuple(out)


def block_spec(shape: tuple[int, ...], *, max_dim: int, merge: bool, precondition_1d: bool) -> BlockSpec:
    """The block of a parameter of ``shape`` under the shape policy."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return BlockSpec(shape=shape, m=1, n=1, rotate_left=False, rotate_right=False)
    if len(shape) == 1:
        d = shape[0]
        return BlockSpec(shape=shape, m=d, n=1, rotate_left=precondition_1d and d <= max_dim, rotate_right=False)
    dims = merge_dims(shape, max_dim) if merge else shape
    if len(dims) == 1:
        return BlockSpec(shape=shape, m=dims[0], n=1, rotate_left=dims[0] <= max_dim, rotate_right=False)
    m, n = dims[0], math.prod(dims[1:])
    return BlockSpec(shape=shape, m=m, n=n, rotate_left=m <= max_dim, rotate_right=n <= max_dim)


def to_block(x: Tensor, spec: BlockSpec) -> Tensor:
    """``x`` viewed (or copied, if not contiguous) as the ``(m, n)`` block."""
    return x.reshape(spec.m, spec.n)


def from_block(X: Tensor, spec: BlockSpec) -> Tensor:
    """The ``(m, n)`` block back in the parameter's shape."""
    return X.reshape(spec.shape)
