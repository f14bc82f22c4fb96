r"""The numerics of kronopt, in one place.

Every function here is pure, batched over a leading ``b`` axis, and guards its
input shapes. Stages never call :mod:`torch.linalg` directly.

Precision policy: matrix functions (``eigh``, QR) run in the dtype of their
input, which is the state dtype (float32 by default, float64 when parameters are
float64); an ``eigh`` that fails is retried once in float64 and cast back, then
block by block, so that a block that fails in both dtypes is flagged alone (:func:`eigh_descending`
raises :class:`ArithmeticError` only where every block failed); a first call's SVD is retried alike and
then falls back, for the failing blocks alone (:func:`_svd_retried`). Outputs that are not finite are
reported through a per-block mask rather than a host synchronisation, so the
caller can keep its last good value with ``torch.where``.
"""

import contextlib
import functools
import itertools
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from . import compiled
from .validators import Problems

# -- the process's float32 product precision ----------------------------------------------


#: the backends whose float32 products torch may run at reduced precision: TF32 on a CUDA GPU, bfloat16
#: (or TF32) through oneDNN on a CPU
def _float32_product_backends() -> tuple[Any, ...]:
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    return tuple(b for b in backends if hasattr(b, "fp32_precision"))


#: the device types whose autocast :func:`no_autocast` turns off (torch's ``is_autocast_enabled`` answers for each)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off inside the block for every device type where the caller turned it on, as it was after.

    A training script may call ``optimizer.step()`` (or ``scaler.step``) inside its ``torch.autocast`` region;
    autocast would then run the step's products in bfloat16 or float16 and hand the stages operands of mixed
    dtypes (a crash in the factor updates, or other maths: Shampoo's factors 1e-3 off). The step's arithmetic is
    its state's dtype, as torch.optim's is."""
    on = [t for t in _AUTOCAST_DEVICES if torch.is_autocast_enabled(t)]
    if not on:
        yield
        return
    with contextlib.ExitStack() as stack:
        for t in on:
            stack.enter_context(torch.autocast(t, enabled=False))
        yield

#: :func:`full_float32_products`' blocks open in any thread, and the settings to put back when the last closes
#: (the last value other than "ieee" a block found on entry): the settings are the process's, so a block that
#: closes while another thread's is open must not put them back under it
_FULL_PRODUCTS_LOCK = threading.Lock()
_full_products_open = 0
_full_products_saved: list[tuple[Any, str]] = []


@contextlib.contextmanager
def full_float32_products() -> Iterator[None]:
    """Float32 products at full float32 precision inside the block, whatever the process set, restored after.

    A training script commonly turns TF32 on for the model (``torch.set_float32_matmul_precision("high")``,
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``) or bfloat16 products on a CPU
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): about 10 or 8 bits of the operands'
    mantissas. The factors, their bases and the rotations of a float32 state would then lose digits the
    specs assume (an eigenbasis refreshed from a TF32 product is orthonormal to about 1e-3). Each backend's
    own setting (torch's per-backend API) is read and, where it is not ``"ieee"``, set to it for the block and
    put back as it was: a process that used the legacy ``set_float32_matmul_precision`` keeps a consistent
    state, so its later ``get_float32_matmul_precision()`` still answers. The settings are the process's:
    another thread's products during the block run at full precision too, and where blocks of several
    threads overlap (two optimizers stepped in two threads) the settings are put back when the last of them
    closes, not by the first under the others: to the last value other than ``"ieee"`` a block found on entry
    (a setting changed to ``"ieee"`` while a block is open is not seen). No host synchronisation (a lock held for
    the read and the set).
    """
    global _full_products_open, _full_products_saved
    with _FULL_PRODUCTS_LOCK:
        if _full_products_open == 0:
            _full_products_saved = [(b, "ieee") for b in _float32_product_backends()]
        for k, (b, _) in enumerate(_full_products_saved):
            setting = b.fp32_precision
            if setting != "ieee":  # the process's (set before, or while another thread's block was open): put back last
                _full_products_saved[k] = (b, setting)
                b.fp32_precision = "ieee"
        _full_products_open += 1
    try:
        yield
    finally:
        with _FULL_PRODUCTS_LOCK:
            _full_products_open -= 1
            if _full_products_open == 0:
                for b, setting in _full_products_saved:
                    if setting != "ieee":
                        b.fp32_precision = setting
                _full_products_saved = []


# -- guards --------------------------------------------------------------------------


def _check_batched_square(name: str, A: Tensor) -> None:
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be a batch of square matrices (b n n), got shape {tuple(A.shape)}")


def _check_batched(name: str, X: Tensor) -> None:
    if X.ndim != 3:
        raise ValueError(f"{name} must be a batch of matrices (b m n), got shape {tuple(X.shape)}")


# -- elementary products -------------------------------------------------------------


def sym(A: Tensor, *, out: Tensor | None = None) -> Tensor:
    r"""Symmetric part :math:`(A + A^\top)/2`; exactly symmetric in floating point.

    ``out`` (of ``A``'s shape and dtype, not overlapping it) takes the result, e.g. a tile's place
    in a larger matrix."""
    return sym_sum(A, out=out).mul_(0.5)  # the same two roundings as (A + Aᵀ)·0.5, one temporary fewer


def sym_sum(A: Tensor, *, out: Tensor | None = None) -> Tensor:
    r""":math:`A + A^\top`, exactly symmetric (``out`` as for :func:`sym`).

    A product that will be symmetrised can be made at half its weights (``alpha/2``, ``beta/2``) and
    summed with its transpose here: the same bits as :func:`sym` of the full-weight product, one pass
    fewer. Halving is exact in binary floating point, so every product, sum and weighting of the
    half-weight product is exactly half the full one's, with two exceptions at the ends of the range:
    results below the smallest normal number, where halving rounds (in float16, from 6.1e-5 down), and
    entries between half the largest finite number and it, which the full-weight form overflowed to
    ±inf (the full product, or its sum with its transpose) and this one keeps finite: a factor update
    there is kept where it was skipped as non-finite."""
    if _sym_blocked(A) and (out is None or out.is_contiguous()):
        # on CPU a 2-D transposed copy runs a cache-blocked kernel (into a contiguous matrix); a batched
        # ``A + Aᵀ`` reads Aᵀ column by column, several times slower on large matrices. Same sums (a + b = b + a).
        T = torch.empty(A.shape, dtype=A.dtype, device=A.device) if out is None else out
        return _copy_by_block(T, A.mT).add_(A)
    return torch.add(A, A.mT, out=out)


#: the side from which :func:`sym` transposes on CPU block by block
_SYM_BLOCKED_MIN = 384


def _sym_blocked(A: Tensor) -> bool:
    """Whether :func:`sym_sum` adds the transpose of the square stack ``A`` block by block (on a CPU, from side
    ``_SYM_BLOCKED_MIN``), not by one ``add``."""
    return A.device.type == "cpu" and A.ndim == 3 and A.shape[-1] >= _SYM_BLOCKED_MIN and A.shape[-1] == A.shape[-2]


def gram_left(G: Tensor) -> Tensor:
    r""":math:`G G^\top`, ``b m n, b m2 n -> b m m2``; exactly symmetric."""
    _check_batched("G", G)
    return sym(G @ G.mT)


def gram_right(G: Tensor) -> Tensor:
    r""":math:`G^\top G`, ``b m n, b m n2 -> b n n2``; exactly symmetric."""
    _check_batched("G", G)
    return sym(G.mT @ G)


#: on CPU, a Gram update of at least this side is computed by tiles of :func:`_gram_tile`, lower triangle only
_GRAM_TILED_MIN = 512
#: the side of those tiles (and of :func:`split_sandwich`'s and the held factors', :class:`LowerTiles`); ``None``: the
#: processor's choice (:func:`_gram_tile`)
_GRAM_TILE: int | None = None


_CPUINFO = "/proc/cpuinfo"


@attrs.frozen
class _Processor:
    """What ``/proc/cpuinfo`` says of the first processor: its ``vendor_id``, its x86 ``flags``, its
    ``cpu family`` and its ``model name`` (empty, or 0, where the file cannot be read or has no such line, as
    on other systems and architectures). Kernel choices that depend on the processor read it here, once per
    process; ``kronopt bench --json`` records the name."""

    vendor: str = ""
    flags: frozenset[str] = frozenset()
    family: int = 0
    name: str = ""


@functools.cache
def _processor() -> _Processor:
    try:
        with open(_CPUINFO, encoding="ascii", errors="replace") as info:
            fields: dict[str, str] = {}
            for line in info:
                if not line.strip():
                    if fields:
                        break  # the end of the first processor's block
                    continue
                key, colon, value = line.partition(":")
                if colon:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        return _Processor()
    family = fields.get("cpu family", "")
    return _Processor(
        fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split()), int(family) if family.isdigit() else 0,
        fields.get("model name", ""),
    )


#: the longest side tiled by 192 where the processor takes that tile (:func:`_gram_tile`); longer sides take 256
_SMALL_TILES_MAX = 2048


def _gram_tile(side: int) -> int:
    """The side of the tiles of :func:`sym_product`, :func:`split_sandwich` and :class:`LowerTiles` along a side of
    ``side``: ``_GRAM_TILE`` where set, else 192 up to ``_SMALL_TILES_MAX`` on a processor whose products run in MKL
    and that is not AMD's, 256 on longer sides and on the other processors. A smaller tile spends fewer
    multiply-adds on the diagonal's tiles (made whole: ``t(t+1)/2`` of ``t²`` tile products, 10 of 16 on a side of
    768 by 192 against 6 of 9 by 256) in more, smaller products, which run a little slower. Measured on an Intel Xeon
    with AMX (2 threads; docs/performance_log.md, sixty-eighth session), DyKAF's KSL step by 192 over its time by 256,
    on stacks of four ``768 × 256`` blocks 0.96, ``256 × 768`` 0.96, ``1024 × 256`` and ``256 × 1024`` 0.99–1.01, one
    layer of d = 512's shapes (sides of 1536 and 2048) 0.97–1.00; on one block of ``3072 × 1024`` 1.05, of
    ``4096 × 1024`` and ``1024 × 4096`` 1.01–1.04 (there 384 read 0.96–1.02): past 2048 the products' calls outweigh
    the multiply-adds spared. Tiles of 128 were no faster than 192. Where oneDNN takes the products
    (:func:`_onednn_products_fast`) its cut-off (``_ONEDNN_MIN_WORK``) and the measurements behind the split's rule
    (:func:`split_pays`) were made at 256. On an AMD EPYC (Zen 4, 2 threads, MKL; the seventy-fourth session),
    dykaf stepped in turn in one process with tiles of 192 and of 256 read by 192 1.00 of its median step on 4 layers
    of d = 256 (0.99 of the mean) and 1.00 of its mean on one layer of d = 512 (1.03 of the median): AMD processors
    keep 256."""
    if _GRAM_TILE is not None:
        return _GRAM_TILE
    onednn = _onednn_products_fast() if _ONEDNN_FLOAT32 is None else _ONEDNN_FLOAT32  # as _by_onednn asks it
    return 256 if side > _SMALL_TILES_MAX or onednn or _processor().vendor == "AuthenticAMD" else 192


def _tiles_in_place() -> bool:
    """Whether the tiled :func:`sym_product` accumulates the tiles below the diagonal in their place in the
    result (``baddbmm_`` on a strided view of it, a row's tiles as one panel) rather than in contiguous
    memory of their own, tile by tile, each copied into its place and its mirror after; only where it may
    go in place at all (see :func:`_tiled_sym_product`). Both are equally accurate, and agree bit for bit
    on most shapes; on a short last row of tiles (a side of 520 or 777 = 3 · 256 + 9) a few of its
    entries may round the other way. Which is faster depends on the processor: on an Intel Xeon with AMX
    (2 cores) in place took 12.0 ms against 13.7 for the tiles of a ``2048²`` update from ``k = 512``; on
    an AMD EPYC (Zen 4, 2 cores) it took 1.10 × the time of the tiles made apart on the same update and
    1.02–1.22 × on ``1024²`` from ``k = 256``, and a row's tiles made as one panel took 1.04 × the time of
    those tiles one by one in place, 1.03–1.08 × apart; on an Intel Xeon without AMX the panels in place
    took 0.90–0.96 × the tiles' time in place. Likely causes on the AMD machine: torch multiplies into a
    strided 3-D view block by block (one call per block, not one batched call), and MKL scaled the
    accumulator by β in a pass of its own in ``perf``'s samples. So: in place, by panels, except on AMD
    processors (``/proc/cpuinfo``'s ``vendor_id``), and in place where that cannot be read (other
    systems) or names another vendor: three machines measured, two of them Intel. The Zen 4 again (the
    seventy-fourth session), in place against apart stepped in turn in one process on 4 layers of d = 256:
    kl_shampoo 1.03 of its mean step, dykaf 1.00; on one layer of d = 512 dykaf 0.98 (within the noise)."""
    return _processor().vendor != "AuthenticAMD"


def _held_panels() -> bool:
    """Whether the tiled :func:`sym_product` makes a held row (:class:`LowerTiles`) of tiles below the diagonal as
    one panel apart, its tiles views of it (:meth:`LowerTiles.hold_panel`: one product, one reduction, one
    placement and one mirror a row, and one product a row in :func:`split_sandwich`), rather than tile by tile:
    where the processor takes the panels in place too (:func:`_tiles_in_place`). Equally accurate; the
    reductions and some entries round otherwise than the tiles'. Measured on an Intel Xeon with AMX (2
    threads, MKL): the products below the diagonal of a ``2048²`` update from ``k = 512`` in 7.3 against 9.6
    ms, of ``1536²`` 4.0 against 4.2, of ``4 × 1024²`` from ``k = 256`` 3.1 against 3.3; DyKAF's mean step
    0.97–0.99 of the tiles' on one layer of d = 512 and of d = 1024, within the noise on 4 layers of d = 256
    (docs/performance_log.md, fifty-first session). On a Zen 5 such panels through oneDNN measured as noise
    (forty-first session): AMD processors keep the tiles."""
    return _tiles_in_place()


def sym_product(X: Tensor, A: Tensor, B: Tensor, *, beta: float | Tensor, alpha: float) -> Tensor:
    r""":math:`\beta X + \alpha A B^\top`, exactly symmetric, for a symmetric ``X (b m m)`` and a product
    ``A Bᵀ`` (``b m k, b m k``) that is symmetric in exact arithmetic: a Gram matrix :math:`A A^\top`, a
    sandwich :math:`(G S) G^\top`. ``beta`` is a number or a per-block ``(b 1 1)`` tensor.

    The product is symmetric, so half of it is redundant. On CPU, from side
    ``_GRAM_TILED_MIN`` on, only the tiles on and below the diagonal are multiplied
    (``t(t+1)/2`` of ``t²`` tile products, a row's tiles below the diagonal as one panel where
    they go in place), the diagonal tiles are symmetrised and each tile below is mirrored above
    it. That saves up to half the flops and replaces the transposed copy of a whole matrix (a
    strided pass many times slower than a plain one) by transposes of its parts. The entries
    differ from the dense form only in rounding: a tile below the diagonal is the product's own
    value where :func:`sym` averages it with its mirror. Elsewhere (and for smaller sides) one
    fused product, then :func:`sym`.
    """
    if not _tiled(X, A):
        return _dense_sym_product(X, A, B, beta, alpha)
    return _tiled_sym_product(X, A, B, beta, alpha)


def sym_product_stats(
    X: Tensor, A: Tensor, B: Tensor, *, beta: float | Tensor, alpha: float, other: Tensor | None = None,
    tiles: bool = False, narrow: "NarrowProducts | None" = None,
) -> tuple["Tensor | LowerTiles", Tensor | None, Tensor]:
    r""":func:`sym_product` :math:`P` with reductions of it per block, ``(b 1 1)`` each:
    :math:`\langle P, Y\rangle_F` for a symmetric ``other`` :math:`Y` ``(b m m)`` (``None`` without one),
    and :math:`\|P\|_F`.

    In the tiled form both are taken part by part (a tile, or a row's panel) as each is made (a
    part below the diagonal counts twice, for its mirror), instead of two more passes over the whole
    matrix and an ``m × m`` temporary for :math:`P \odot Y`. Both are sums over the same
    entries, in another order: equal up to rounding. With ``tiles``, the tiled form returns
    :math:`P` as its :class:`LowerTiles` (for a caller that scales it once more before it
    stores it); the dense form returns a tensor either way. ``narrow`` (``A`` and ``B`` its rounded operands): the
    product in its products, as :func:`_weighted_product`'s (each tile made apart in the tiled form).
    """
    if not _tiled(X, A):
        P = _dense_sym_product(X, A, B, beta, alpha, narrow=narrow)
        return P, *_dense_stats(P, other)
    # each part's reductions, kept apart by weight (a part below the diagonal counts twice) and summed once
    # at the end: three kernels a part instead of six to eight (on a side of 2048, 15 to 36 parts a product)
    dots: tuple[list[Tensor], list[Tensor]] = ([], [])  # ⟨part, other's part⟩ (b)
    norms: tuple[list[Tensor], list[Tensor]] = ([], [])  # ‖part‖ (b) of a part made apart
    rows: tuple[list[Tensor], list[Tensor]] = ([], [])  # its rows' norms (b r) of a part in its place

    def reduce(tile: Tensor, I: slice, J: slice) -> None:
        below = int(I != J)
        if other is not None:
            dots[below].append((tile * other[:, I, J]).sum(dim=(-2, -1)))
        if tile.is_contiguous():
            norms[below].append(torch.linalg.vector_norm(tile, dim=(-2, -1)))
        else:  # a part in its place in the result: row by row (one strided norm is 8 times slower)
            rows[below].append(torch.linalg.vector_norm(tile, dim=-1))

    held = LowerTiles(X.shape, torch.result_type(X, A), X.device) if tiles else None
    P = _tiled_sym_product(X, A, B, beta, alpha, reduce, out=held, narrow=narrow)
    b = X.shape[0]
    parts = [(torch.stack(d, dim=-1), 1.0 + k) for k, d in enumerate(dots) if d]
    dot = None if other is None else _weighted_sum(parts).view(b, 1, 1)
    parts = [(torch.stack(n, dim=-1).square(), 1.0 + k) for k, n in enumerate(norms) if n]
    parts += [(torch.cat(r, dim=-1).square(), 1.0 + k) for k, r in enumerate(rows) if r]
    return P, dot, _weighted_sum(parts).sqrt().view(b, 1, 1)


def _weighted_sum(parts: list[tuple[Tensor, float]]) -> Tensor:
    """``(b)``: the sum over the ``(t (b k), w)`` in ``parts`` (at least one) of ``w`` times ``t``'s row sums."""
    total = None
    for t, weight in parts:
        s = t.sum(-1) if weight == 1.0 else t.sum(-1).mul_(weight)
        total = s if total is None else total.add_(s)
    return total  # type: ignore[return-value]


def _dense_stats(P: Tensor, other: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """:func:`sym_product_stats`' reductions of a dense ``P``: ``⟨P, other⟩_F`` (``None`` without ``other``) and ``‖P‖_F``."""
    return None if other is None else (P * other).sum(dim=(-2, -1), keepdim=True), block_norm(P)


def _tiled(X: Tensor, A: Tensor) -> bool:
    """Whether :func:`sym_product` takes the tiled form (CPU, side ≥ ``_GRAM_TILED_MIN``, square ``X``)."""
    m = A.shape[-2]
    return A.device.type == "cpu" and m >= _GRAM_TILED_MIN and X.shape[-1] == m


def _dense_sym_product(
    X: Tensor, A: Tensor, B: Tensor, beta: float | Tensor, alpha: float, *, out: Tensor | None = None,
    narrow: "NarrowProducts | None" = None,
) -> Tensor:
    """:func:`sym_product`'s dense form, into ``out`` where given (``X`` read whole before it is written); ``narrow``
    as :func:`_weighted_product`'s."""
    # made at half weight and summed with its transpose: sym of the full-weight product, one pass fewer (sym_sum)
    return sym_sum(_weighted_product(X, A, B, beta * 0.5, alpha * 0.5, narrow=narrow), out=out)


def _weighted_product(
    X: Tensor, A: Tensor, B: Tensor, beta: float | Tensor, alpha: float, *, narrow: "NarrowProducts | None" = None
) -> Tensor:
    """``β X + α A Bᵀ`` in a new tensor, ``β`` a number (then, as BLAS does, 0 never reads ``X``) or a
    per-block ``(b 1 1)`` tensor (``X`` scaled first: a product takes only a number). Where oneDNN takes the
    product (:func:`_by_onednn`) it is made apart, then scaled and ``β X`` added to it. An inner side of 1 (the
    Gram product of a ``1 × n`` block's long side) is an outer product, made entry by entry (one rounding each):
    MKL's ``baddbmm`` rounds it by the stack's size (a block in a stack against alone, from ``n = 24``, measured),
    and a rank-one factor's null space then takes another basis in a bucket than alone. Each step is rounded apart
    (a fused ``add`` or ``addcmul`` rounds otherwise than the specs' float64 references, which a factor of rank
    below its side turns into another basis): four passes over the block, about 2.4 × ``baddbmm``'s time on a
    ``2048²`` side, paid by ``1 × n`` blocks, vectors under ``precondition_1d`` and rank-one splits only.

    ``narrow`` (a factor estimator's ``product_dtype``; ``A`` and ``B`` its rounded operands,
    :meth:`NarrowProducts.operand`): the product is made in its products, its result rounded, then widened to
    ``X``'s dtype, scaled and ``β X`` added to it (an ``add`` of mixed dtypes would convert the narrow operand in
    a pass of its own)."""
    Bt = B.mT
    if narrow is not None:
        P = narrow.mm(A, Bt).to(X.dtype)
        if alpha != 1.0:
            P.mul_(alpha)
        if isinstance(beta, Tensor):
            return P.addcmul_(X, beta)
        return P if beta == 0 else P.add_(X, alpha=beta)
    if A.shape[-1] == 1:  # each step rounded apart, as the spec writes it: β X + (α (A Bᵀ))
        P = A * Bt
        if alpha != 1.0:
            P.mul_(alpha)
        if not isinstance(beta, Tensor) and beta == 0:
            return P
        return P.add_(X * beta)
    if _by_onednn(A, Bt) and _plain(X) and (not isinstance(beta, Tensor) or _plain(beta)):
        P = _onednn_mm(A, Bt)
        if alpha != 1.0:
            P.mul_(alpha)
        if isinstance(beta, Tensor):
            return P.addcmul_(X, beta)
        return P if beta == 0 else P.add_(X, alpha=beta)
    if isinstance(beta, Tensor):
        return (X * beta).baddbmm_(A, Bt, alpha=alpha)
    return torch.baddbmm(X, A, Bt, beta=beta, alpha=alpha)


def _tiled_sym_product(
    X: Tensor, A: Tensor, B: Tensor, beta: float | Tensor, alpha: float,
    each: Callable[[Tensor, slice, slice], None] | None = None, out: "Tensor | LowerTiles | None" = None,
    narrow: "NarrowProducts | None" = None,
) -> "Tensor | LowerTiles":
    """The tiled form of :func:`sym_product`; ``each(part, I, J)`` sees every part of the lower triangle.

    Row of tiles by row of tiles: left of the diagonal, then the diagonal tile ``(I, I)``. Below the
    diagonal, a row's tiles are accumulated in their place in ``out`` (``X``'s copied there first
    unless ``out`` is ``X``), as BLAS writes a strided matrix, and then make one **panel**
    ``(I, 0:I.start)``, one longer product and one mirror for the row (each entry the same sum over
    the inner dimension, so the same bits as tile by tile on MKL but on a short last row of tiles,
    where a few entries may round the other way: a panel may cross torch's small-product limit where
    its tiles did not); or each tile is made apart in contiguous memory and copied into its place,
    whichever the processor runs faster (:func:`_tiles_in_place`; row panels measured slower on an
    AMD EPYC). With a number ``beta`` of 0, ``X`` is never read (it may be uninitialised). Either way
    ``out = X`` gives the same bits as a fresh ``out``: each row reads only ``X``'s parts of that row
    on and below the diagonal, each before it is written, and a mirror lands above the diagonal in
    the rows above, which no later row reads.

    A diagonal tile is made apart and symmetrised straight into its place (:func:`sym` with
    ``out``), which spares its copy; not where ``each`` reduces it, which is faster, and rounds as
    before, on a contiguous tile. Nothing goes in place where autograd tracks an operand (it
    refuses ``out=``), nor into an ``out`` of another dtype than ``A`` and ``B``. A
    :class:`LowerTiles` ``out`` keeps the tiles (made apart) as they are, unmirrored, a row's below the diagonal
    made as one panel where the processor runs that faster (:func:`_held_panels`). ``narrow`` (``A`` and ``B`` its
    rounded operands): every tile made apart in those products (:func:`_weighted_product`), none in place."""
    m = A.shape[-2]
    per_block = isinstance(beta, Tensor)
    if out is None:
        out = torch.empty(X.shape, dtype=torch.result_type(X, A), device=X.device)
    held = isinstance(out, LowerTiles)
    operands = (X, A, B, beta) if per_block else (X, A, B)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in operands)  # type: ignore[union-attr]
    # in place: not where autograd tracks an operand (it refuses out=), nor into a result of another
    # dtype than the operands' (a product writes only its own dtype; a tile made apart is cast on copy)
    in_place = not (held or tracked or narrow) and out.dtype == A.dtype == B.dtype  # type: ignore[union-attr]
    placed = in_place and each is None  # a diagonal tile symmetrised straight into its place
    below_in_place = in_place and _tiles_in_place()  # a row's tiles below the diagonal in their place in out, as one panel
    held_panels = held and _held_panels()  # a held row's tiles below the diagonal made apart as one panel
    tiles = out.slices if held else _tile_slices(m)
    if tiles and _onednn_tile(A, B, tiles[0]):
        # oneDNN reads a tile's rows of A and B row-major: a transposed operand (a right Gram's Gᵀ) is laid so
        # once here, where each tile would copy its rows again (a row of t tiles reads A's rows t times)
        A, B = _rows_laid(A, B)
    for i, I in enumerate(tiles):
        # below the diagonal: in place, the row's tiles as one panel (one longer product, one mirror); held,
        # as one panel made apart (_held_panels); else apart, tile by tile (where that is the processor's
        # faster form, row panels measured slower)
        below = [(None, slice(0, I.start))] if (below_in_place or held_panels) and i else list(enumerate(tiles[:i]))
        for j, J in below:
            if below_in_place:
                part = out[:, I, J]  # type: ignore[index]
                if per_block:
                    torch.mul(X[:, I, J], beta, out=part).baddbmm_(A[:, I], B[:, J].mT, alpha=alpha)
                else:
                    if out is not X:
                        part.copy_(X[:, I, J])
                    part.baddbmm_(A[:, I], B[:, J].mT, beta=beta, alpha=alpha)  # type: ignore[arg-type]
                out[:, J, I] = part.mT  # type: ignore[index]
            else:
                part = _weighted_product(X[:, I, J], A[:, I], B[:, J], beta, alpha, narrow=narrow)
                if held and j is None:
                    out.hold_panel(i, part)  # type: ignore[union-attr]
                elif held:
                    out.tiles[i, j] = part  # type: ignore[union-attr]
                else:
                    out[:, I, J] = part  # type: ignore[index]
                    out[:, J, I] = part.mT  # type: ignore[index]
            if each is not None:
                each(part, I, J)
        # a diagonal tile is made at half weight and summed with its transpose (sym_sum): its sym
        tile = _weighted_product(X[:, I, I], A[:, I], B[:, I], beta * 0.5, alpha * 0.5, narrow=narrow)
        tile = sym_sum(tile, out=out[:, I, I] if placed else None)  # type: ignore[index]
        if held:
            out.tiles[i, i] = tile  # type: ignore[union-attr]
        elif not placed:
            out[:, I, I] = tile  # type: ignore[index]
        if each is not None:
            each(tile, I, I)
    return out


def _tile_slices(m: int) -> list[slice]:
    """The tiles of :func:`_gram_tile` along a side of ``m`` (the last one shorter)."""
    edges = [*range(0, m, _gram_tile(m)), m]
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


class LowerTiles:
    """A symmetric ``(b d d)`` stack held as its tiles on and below the diagonal, each a tensor of its own or a
    view of its row's panel.

    ``tiles[i, j]`` (``j ≤ i``) is the tile of rows ``_tile_slices(d)[i]`` and columns
    ``_tile_slices(d)[j]``: what the tiled :func:`sym_product` makes before it copies each tile and
    its mirror into a dense matrix. DyKAF's ``K`` and ``R̂`` are scaled once more before they are
    stored (:func:`projector_split_ksl`); held so, each is written scaled, mirrors included, in one
    pass (:meth:`write`) instead of being written dense, read and written again. A row's tiles below the
    diagonal may come as one panel (:attr:`panels`, :meth:`hold_panel`), its tiles then views of it.
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self.slices = _tile_slices(shape[-1])  # fixed at creation, whatever _gram_tile says later
        self.tiles: dict[tuple[int, int], Tensor] = {}
        self.panels: dict[int, Tensor] = {}

    def hold_panel(self, i: int, panel: Tensor) -> None:
        """Row ``i``'s tiles below the diagonal as one contiguous panel ``(b |I| I.start)`` made at once; its tiles
        (:attr:`tiles`) are views of it, and :meth:`write` and :func:`split_sandwich` take it whole, one call a row."""
        self.panels[i] = panel
        for j, J in enumerate(self.slices[:i]):
            self.tiles[i, j] = panel[..., J]

    def write(self, out: Tensor | None = None, *, scale: Tensor) -> Tensor:
        """The matrix times ``scale``, ``(b 1 1)``, into ``out`` (a new tensor if ``None``):
        each tile scaled into its place, and its transpose scaled into its mirror, the same bits as scaling the
        dense matrix.

        The mirror is made from the tile itself, not copied from its place: read across a row stride of a
        power of two bytes (a side of 1024 or 2048), the place's columns fall on a few cache sets. Measured on
        a Zen 5 (2 threads): the tiles below the diagonal of a ``4 × 1024²`` stack written in 0.82 against 1.58
        ms, of ``1 × 2048²`` 1.19 against 2.34, of ``4 × 768²`` the same time."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device) if out is None else out
        for i, panel in self.panels.items():  # a row's panel in one placement and one mirror
            I, J = self.slices[i], slice(0, self.slices[i].start)
            torch.mul(panel, scale, out=out[:, I, J])
            if panel.is_complex():
                out[:, J, I] = out[:, I, J].mT
            else:
                torch.mul(panel.mT, scale, out=out[:, J, I])
        for (i, j), tile in self.tiles.items():
            if i != j and i in self.panels:
                continue
            I, J = self.slices[i], self.slices[j]
            place = out[:, I, J]
            torch.mul(tile, scale, out=place)
            if i != j and tile.is_complex():
                # a complex product rounds otherwise in torch's strided loop than in its vectorised one: copied
                out[:, J, I] = place.mT
            elif i != j:
                torch.mul(tile.mT, scale, out=out[:, J, I])  # one real multiply an entry: the same bits either way
        return out


#: on CPU, a sandwich :math:`A S A^\top` whose symmetric middle ``S`` has at least this side, and a
#: larger one than the outer factor, is taken from ``S``'s lower tiles (:func:`split_sandwich`)
_SPLIT_SANDWICH_MIN = 768


#: a dense symmetric middle (not :class:`LowerTiles`) whose products go to oneDNN is split only from an outer side
#: of this many rows (:func:`split_pays`)
_SPLIT_DENSE_MIN_OUTER = 384


def split_pays(A: Tensor, S: Tensor, *, held: bool = False) -> bool:
    """Whether :func:`split_sandwich` beats the two plain products for ``A S Aᵀ`` (``A (b k d)``, ``S (b d d)``;
    ``held``: ``S`` will come as its tiles, :class:`LowerTiles`, each contiguous or a row of a contiguous panel).

    It multiplies about ``(t+1)/2t · k d² + k² d`` (``t`` tiles of ``S``) where the plain order
    ``(A S) Aᵀ`` multiplies ``k d² + k² d`` (half of the second where :func:`sym_product` tiles it,
    from ``k`` = ``_GRAM_TILED_MIN``): a gain only where ``d`` is the larger side. Timed on two CPU
    threads (docs/performance_log.md, eighth session): 0.80 of the time at ``d = 1024, k = 256``,
    0.92 at ``768 × 256``, 1.04 at ``512 × 256``; on a GPU the tile loop is not worth it. Where oneDNN
    takes the products, which read their operands without gaps between rows, each panel of a dense ``S``
    (a slice of its columns) is copied for its product, a pass over the lower triangle that the multiply-adds
    saved pay for only from ``k = _SPLIT_DENSE_MIN_OUTER``; held tiles are read as they lie. Measured on a
    Zen 5 (2 threads, DyKAF's step; docs/performance_log.md, forty-fifth session), the plain products'
    time over the split's with a dense ``S``: ``4 × 128 × 1024`` 0.94, ``4 × 256 × 1024`` 0.96–0.98,
    ``4 × 256 × 768`` 1.00, ``2 × 256 × 2048`` 1.02, ``4 × 384 × 1536`` 1.07, ``1 × 512 × 2048`` 1.08;
    with held tiles (``Gᵀ K G`` of a tall block) ``4 × 256 × 1024`` 1.03, ``4 × 256 × 768`` 1.02. Not where
    autograd tracks ``A`` or ``S``: the split reads only ``S``'s lower tiles, so the gradient of ``S`` would fall on
    them alone (the plain products give it whole and symmetric), through products accumulated in place in one
    buffer."""
    d, k = S.shape[-1], A.shape[-2]
    tracked = torch.is_grad_enabled() and (A.requires_grad or S.requires_grad)  # S's gradient on its lower tiles only
    if not (A.device.type == "cpu" and d >= _SPLIT_SANDWICH_MIN and d > k and not tracked):
        return False
    if held or k >= _SPLIT_DENSE_MIN_OUTER:
        return True
    t = min(_gram_tile(d), d)
    return not _by_onednn(A[..., :t], S[:, :t, :t])


def split_sandwich(
    A: Tensor, S: "Tensor | LowerTiles", *, alpha: float | Tensor = 1.0, plus: "tuple[Tensor, float | Tensor] | None" = None,
) -> Tensor:
    r""":math:`\alpha A S A^\top` for a symmetric ``S``: ``b k d, b d d -> b k k``, exactly symmetric.

    ``S = T + T^\top`` with ``T`` its tiles (of :func:`_gram_tile`, or a :class:`LowerTiles`' own)
    below the diagonal and half of each diagonal tile, so :math:`A S A^\top = H + H^\top` with
    :math:`H = (A T) A^\top`. The product :math:`A T` needs only the tiles on and below the
    diagonal (``t(t+1)/2`` of ``t²`` tile products), made tile column by tile column (a held row's panel,
    :attr:`LowerTiles.panels`, in one product for its columns), and :math:`H`
    is then one product (``b k d`` by ``b d k``: one call a block, not one a tile column, and no
    accumulation), so where ``S`` is the larger side (:func:`split_pays`) this is cheaper than
    :math:`(A S) A^\top`. Only ``S``'s tiles on and below the diagonal are read; ``S`` may come
    as those tiles (:class:`LowerTiles`). ``alpha`` is a number or a per-block ``(b 1 1)`` tensor.

    ``plus = (X, w)`` (``X (b k k)``, ``w`` a number or a per-block ``(b 1 1)`` tensor) adds :math:`w X` before the
    symmetrisation: the result is the symmetric part of :math:`\alpha(H + H^\top) + w X`, i.e. of
    :math:`\alpha H + \tfrac w2 X` summed with its transpose, exactly symmetric whatever ``X``'s rounding, and
    :math:`\alpha A S A^\top + w X` for a symmetric ``X``. One transposed pass over the result instead of two
    (DyKAF's :math:`K = G\bar R G^\top + wL` and :math:`\hat R`, which symmetrised the sum once more); the entries
    round otherwise than ``α (H + Hᵀ) + w X``'s.
    """
    _check_batched("A", A)
    held = isinstance(S, LowerTiles)
    if not held:
        _check_batched_square("S", S)
    d = S.shape[-1]
    if A.shape[-1] != d:
        raise ValueError(f"split_sandwich needs S of shape (b {A.shape[-1]} {A.shape[-1]}), got {tuple(S.shape)}")
    b, k = A.shape[0], A.shape[-2]
    dtype = torch.promote_types(A.dtype, S.dtype) if held else torch.result_type(A, S)
    slices = S.slices if held else _tile_slices(d)
    if not slices:  # d = 0
        zero = torch.zeros(A.shape[:-1] + A.shape[-2:-1], dtype=dtype, device=A.device)
        return zero if plus is None else _symmetrised(zero, alpha, plus)
    # A T whole (b k d), its tile columns made one by one; then H = (A T) Aᵀ in one product
    AT = torch.empty((b, k, d), dtype=dtype, device=A.device)
    whole = A
    if _by_onednn(A[..., slices[0]], S.tiles[0, 0] if held else S[:, slices[0], slices[0]]):
        # oneDNN reads its operands row-major: A's tile columns, each read by several products below, are
        # made contiguous once each here, instead of once a product
        A = _ColumnBlocks(A)  # type: ignore[assignment]
    if held and S.panels and len(S.panels) == len(slices) - 1:
        # held by row panels (every row below the first): each tile column's diagonal part first, then each row's
        # panel added to the columns left of its diagonal in one product; each column's terms in the tiles' order
        for j, J in enumerate(slices):
            addmm_(AT[..., J], A[..., J], S.tiles[j, j], beta=0.0, alpha=0.5)
        for i, I in enumerate(slices[1:], 1):
            addmm_(AT[..., : I.start], A[..., I], S.panels[i])
        return _symmetrised(mm(AT, whole.mT), alpha, plus)
    for j, J in enumerate(slices):
        hi = J.stop
        # the tile column J of A T: A_J (S_JJ / 2) + Σ_{I below J} A_I S_IJ
        P = AT[..., J]
        # the diagonal tile's half weight as the product's alpha (BLAS scales the sums: exact, the same bits as
        # halving the product after it); beta = 0 never reads P (AT is uninitialised)
        if held:
            addmm_(P, A[..., J], S.tiles[j, j], beta=0.0, alpha=0.5)
            for i in range(j + 1, len(slices)):
                addmm_(P, A[..., slices[i]], S.tiles[i, j])
        else:
            addmm_(P, A[..., J], S[:, J, J], beta=0.0, alpha=0.5)
            if hi < d:
                addmm_(P, A[..., hi:], S[:, hi:, J])
    return _symmetrised(mm(AT, whole.mT), alpha, plus)


def _symmetrised(H: Tensor, alpha: float | Tensor, plus: "tuple[Tensor, float | Tensor] | None") -> Tensor:
    """:func:`split_sandwich`'s result from ``H = (A T) Aᵀ``: ``α (H + Hᵀ)`` (the same bits as ``(H + Hᵀ)/2 · 2α``:
    halving and doubling are exact), or with ``plus = (X, w)`` the sum of ``α H + (w/2) X`` and its transpose."""
    if plus is None:
        return sym_sum(H).mul_(alpha)
    X, w = plus
    H.mul_(alpha)
    return sym_sum(H.addcmul_(X, w * 0.5) if isinstance(w, Tensor) else H.add_(X, alpha=w * 0.5))


def ema_gram_left(
    L: Tensor, G: Tensor, beta: float, *, defer: list["DeferredWrite"] | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    r""":math:`\beta L + (1-\beta) G G^\top`, exactly symmetric (:func:`accumulate_gram_left`, ``defer`` and
    ``dtype`` too)."""
    return accumulate_gram_left(L, G, beta, 1 - beta, defer=defer, dtype=dtype)


def ema_gram_right(
    R: Tensor, G: Tensor, beta: float, *, defer: list["DeferredWrite"] | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    r""":math:`\beta R + (1-\beta) G^\top G`, exactly symmetric (:func:`accumulate_gram_right`, ``defer`` and
    ``dtype`` too)."""
    return accumulate_gram_right(R, G, beta, 1 - beta, defer=defer, dtype=dtype)


def mm(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B``; for two stacks ``(b m k) × (b k n)`` of one batch size, ``torch.bmm`` itself: the same kernel, without
    the five view and expand operators ``matmul`` dispatches around it (11 → 6.5 µs a call on a small
    block, where a bucket's step is a few dozen calls). The same bits as ``@`` on stacks of matrices,
    contiguous or transposed views. A large float32 product on a processor where oneDNN's kernels are the
    faster ones goes to them (:func:`_by_onednn`).

    Stacks of vectors (a rank-one subspace's ``G U`` and ``Uᵀ G``) go as :func:`matvec` makes them: a stack of
    column vectors on the right as the stack of rows ``Bᵀ Aᵀ``, rows on the left with a row's strides against a
    column-major matrix (:func:`_rows_times`). MKL rounds the other layouts of such a stack by the stack's size
    (a column stack on the right; rows with a column's strides, the ``.mT`` of a column stack; rows against a
    row-major matrix, now and then), this one alike whatever the size, so a block gets the same bits in a stack
    as alone; these bits are not ``@``'s. A stack of dot products (a row times a column)
    still rounds by the stack's size now and then: one call for the stack is kept."""
    if _by_onednn(A, B):
        return _onednn_mm(A, B)
    if not (A.ndim == 3 and B.ndim == 3 and A.shape[0] == B.shape[0]):
        return A @ B
    if B.shape[-1] == 1 and A.shape[-2] > 1:
        return _rows_times(B.mT, A.mT).mT
    return _rows_times(A, B) if A.shape[-2] == 1 else torch.bmm(A, B)


def _rows_times(R: Tensor, M: Tensor) -> Tensor:
    """``R M`` for a stack of rows ``R (b 1 k)`` and matrices ``M (b k n)``: ``R`` viewed with a row's strides (the
    one-row dimension's ``k`` times the entries'), ``M`` column-major (copied so where it is not), the layout in
    which MKL's ``bmm`` gives each block the bits it gives it alone (:func:`mm`)."""
    M = M if M.stride(-2) == 1 else M.mT.contiguous().mT
    return torch.bmm(R.squeeze(-2).unsqueeze(-2), M)


def mm_into(A: Tensor, B: Tensor, out: Tensor) -> Tensor:
    """``torch.bmm(A, B, out=out)`` for two stacks of one batch size, through :func:`_onednn_mm` where it takes them
    and ``out`` has the product's shape and dtype (else ``torch.bmm``, which resizes ``out`` or refuses it)."""
    if _by_onednn(A, B) and out.shape == (A.shape[0], A.shape[-2], B.shape[-1]) and out.dtype == A.dtype:
        return _onednn_mm(A, B, out=out)
    return torch.bmm(A, B, out=out)


def addmm_(X: Tensor, A: Tensor, B: Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    r"""``X.baddbmm_(A, B, beta=beta, alpha=alpha)``: :math:`X \leftarrow \beta X + \alpha A B` in place, for
    stacks of one batch size; through :func:`_onednn_mm` where it takes the product (then the product is made
    apart and added, two passes over ``X``'s size more, or with ``beta = 0`` made into ``X`` and scaled there).
    ``beta = 0`` never reads ``X``, as BLAS."""
    if not (_by_onednn(A, B) and _plain(X)):
        return X.baddbmm_(A, B, beta=beta, alpha=alpha)
    if beta == 0.0:
        mm_into(A, B, X)
        return X if alpha == 1.0 else X.mul_(alpha)
    P = _onednn_mm(A, B)
    if alpha != 1.0:
        P.mul_(alpha)
    if beta != 1.0:
        X.mul_(beta)
    return X.add_(P)


#: float32 products through oneDNN instead of MKL on a CPU (:func:`_by_onednn`): ``None`` decides by the
#: processor (:func:`_onednn_products_fast`); ``True`` or ``False`` forces it (tests, and the GPU-path runs)
_ONEDNN_FLOAT32: bool | None = None
#: the least multiply-adds a block (``m k n``) and the shortest side a product needs to go to oneDNN: each call
#: costs about 13 µs (one per block) and its result a copy. On a Zen 5 (2 threads), by the operands' layouts,
#: stacks of 4 blocks: ``128³`` (2.1 M a block) 1.35–1.78 × MKL's time, ``128 × 128 × 256`` and ``64 × 256 × 256``
#: (4.2 M) 0.88–1.20 ×, ``96 × 256 × 256`` (6.3 M) 0.76–1.01 ×, ``192³`` (7.1 M) 0.73–0.99 ×, ``256 × 256 × 128``
#: (8.4 M) 0.72–1.02 ×, ``1024 × 64 × 256`` 0.63–0.77 ×, ``256³`` 0.59–0.73 ×, ``1024 × 128 × 256`` 0.54–0.67 ×
_ONEDNN_MIN_WORK = 192**3
_ONEDNN_MIN_SIDE = 64


def _onednn_products_fast() -> bool:
    """Whether this processor multiplies float32 matrices faster in oneDNN's kernels than in MKL's, read from
    ``/proc/cpuinfo``: an AMD processor of family 26 or later (Zen 5 on) with AVX-512, where torch's
    float32 products run in MKL, which takes its AVX2 kernels on a processor not Intel's, and oneDNN's
    take AVX-512 at full width. Measured on 2 cores of a Zen 5 (family 26, model 2), torch 2.13, MKL
    2024.2: MKL 101–112 G multiply-adds a second on the presets' products (``4 × 1024 × 1024 × 256`` to
    ``4 × 256³``), oneDNN's block by block 197–238, 0.44–0.55 of the time (docs/performance_log.md,
    fortieth session). On a Zen 4 (family 25, AVX-512 in two halves) an earlier session measured
    oneDNN's float32 products at 0.86–1.29 of MKL's, and the seventy-fourth session, stepping the presets in
    turn in one process with the switch on and off (4 layers of d = 256), read kl_shampoo's mean step 1.15 ×
    and soap's 1.02 × with oneDNN's, so it stays with MKL; an Intel processor's MKL takes AVX-512 itself.
    Where oneDNN is not built in, never."""
    processor = _processor()
    return (
        processor.vendor == "AuthenticAMD"
        and processor.family >= 26
        and "avx512f" in processor.flags
        and torch.backends.mkldnn.is_available()
    )


def _by_onednn(A: Tensor, B: Tensor) -> bool:
    """Whether :func:`mm`, :func:`mm_into` and :func:`addmm_` take ``A B`` through :func:`_onednn_mm`: float32
    matrices or stacks of one batch size on a CPU, of ``_ONEDNN_MIN_WORK`` multiply-adds a block or more and
    every side at least ``_ONEDNN_MIN_SIDE``, plain tensors
    (:func:`_plain`: oneDNN's call has no autograd formula and writes no ``out=``), outside ``torch.compile``,
    on a processor whose oneDNN kernels are the faster ones (``_ONEDNN_FLOAT32``)."""
    # the cheapest tests first: every product of a step asks, and on a small block this question cost as much as
    # the product (2.3 µs against 2.1 for a 20 × 32 block's bmm, before the processor and the sides came first)
    if not (_onednn_products_fast() if _ONEDNN_FLOAT32 is None else _ONEDNN_FLOAT32):
        return False
    if A.ndim != B.ndim or A.ndim not in (2, 3) or (A.ndim == 3 and A.shape[0] != B.shape[0]):
        return False
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    if min(m, k, n) < _ONEDNN_MIN_SIDE or m * k * n < _ONEDNN_MIN_WORK or k != B.shape[-2]:
        return False
    if A.dtype != torch.float32 or B.dtype != torch.float32 or A.device.type != "cpu" or B.device.type != "cpu":
        return False
    return not torch.compiler.is_compiling() and _plain(A) and _plain(B)


def _dense(t: Tensor) -> bool:
    """Whether a matrix lies row- or column-major without gaps (oneDNN reads such a weight as it lies; one with
    a gap between rows, a slice of a wider matrix, takes its reference kernel, a thousand times slower)."""
    return t.is_contiguous() or _transposed_contiguous(t)


def _transposed_contiguous(t: Tensor) -> bool:
    """``t.mT.is_contiguous()`` for a matrix ``t``, read from its strides without making the view (which costs four
    times the test; a step's tiled products test their operands some thousands of times)."""
    rows, cols = t.shape
    row_stride, col_stride = t.stride()
    return rows * cols == 0 or ((rows == 1 or row_stride == 1) and (cols == 1 or col_stride == rows))


def _onednn_block(A: Tensor, B: Tensor) -> Tensor:
    r"""``A B`` of two matrices by oneDNN's linear layer (:math:`x w^\top`), row-major, or the ``.mT`` of a
    row-major :math:`B^\top A^\top`. Its input ``x`` must be row-major and its weight ``w`` dense
    (:func:`_dense`); each form copies what does not lie so, and the second copies its result into rows
    after. The form with the fewer entries to copy is taken: the bases of a step lie column-major, as
    LAPACK makes them, so :math:`Q^\top X` and :math:`X Q` copy nothing, and :math:`Q X` copies ``X`` and
    the result (two ``m n`` copies) rather than ``Q`` (one ``m²``)."""
    m, k = A.shape
    n = B.shape[1]
    dense_A, dense_B = _dense(A), _dense(B)
    straight = (0 if A.is_contiguous() else m * k) + (0 if dense_B else k * n)
    turned = (0 if _transposed_contiguous(B) else k * n) + (0 if dense_A else m * k) + m * n
    if straight <= turned:
        return _onednn_linear(A.contiguous(), (B if dense_B else B.contiguous()).mT)
    return _onednn_linear(B.mT.contiguous(), A if dense_A else A.contiguous()).mT


def _tiles_by_onednn(X: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether :func:`sym_product` of ``X`` and ``A Bᵀ`` takes its tiled form with the tiles' products through oneDNN,
    which reads the rows of ``A`` and ``B`` laid contiguous (:func:`_rows_laid`)."""
    return _tiled(X, A) and A.shape[-2] > 0 and _onednn_tile(A, B, _tile_slices(A.shape[-2])[0])


def _onednn_tile(A: Tensor, B: Tensor, first: slice) -> bool:
    """Whether oneDNN takes the tiled product's first tile ``A[:, first] B[:, first]ᵀ`` (and so every tile of its size)."""
    return _by_onednn(A[:, first], B[:, first].mT)


#: :func:`contiguous` copies a stack of transposed blocks block by block from this many entries a block
_BLOCKWISE_TRANSPOSE_MIN = 1 << 16


def contiguous(T: Tensor) -> Tensor:
    """``T.contiguous()``, the same values; on a CPU a stack ``(b m n)`` of transposed row-major blocks (``T.mT``
    contiguous, as ``G.mT`` of a gradient stack) is copied block by block from ``_BLOCKWISE_TRANSPOSE_MIN``
    entries a block.

    torch's CPU copy runs its cache-blocked transpose only for a 2-D matrix; a stack of them it reads
    element by element across rows. Measured on a Zen 5 (2 threads; docs/performance_log.md, forty-fourth
    session): the transposed copy of ``4 × 256 × 1024`` 0.40 against 1.00 ms, of ``4 × 1024²`` 3.0 against
    8.3, of ``1 × 2048²`` 3.0 against 13.0, of ``4 × 2048 × 512`` 3.1 against 5.9; equal at ``4 × 256²``,
    slower on smaller blocks (a call a block). Not where autograd tracks ``T`` (the copies go with
    ``out``-style writes into a new tensor), nor inside ``torch.compile``."""
    if (
        T.ndim != 3 or T.device.type != "cpu" or T.shape[-2] * T.shape[-1] < _BLOCKWISE_TRANSPOSE_MIN
        or T.is_contiguous() or not T.mT.is_contiguous() or torch.compiler.is_compiling() or not _plain(T)
    ):
        return T.contiguous()
    return _copy_by_block(torch.empty(T.shape, dtype=T.dtype, device=T.device), T)


def _copy_by_block(out: Tensor, src: Tensor) -> Tensor:
    """``out.copy_(src)`` for stacks, matrix by matrix: where each block of ``src`` is a transposed row-major matrix
    and ``out`` contiguous, each copy takes torch's cache-blocked 2-D transpose (:func:`contiguous`, :func:`sym_sum`)."""
    for o, t in zip(out.unbind(0), src.unbind(0)):
        o.copy_(t)
    return out


def _rows_laid(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` and ``B`` (``b m k``) with their rows contiguous, each copied once where it is not (one copy for
    both where they are the same view, as a Gram's operands)."""
    def laid(T: Tensor) -> Tensor:
        return T if T.stride(-1) == 1 else contiguous(T)

    if B.data_ptr() == A.data_ptr() and B.shape == A.shape and B.stride() == A.stride():  # one view twice (a Gram)
        A = laid(A)
        return A, A
    return laid(A), laid(B)


class _ColumnBlocks:
    """A stack ``(b k d)`` read by column blocks: ``self[..., J]`` for a slice ``J`` is a contiguous copy of those
    columns, each made once (:func:`split_sandwich` under oneDNN)."""

    def __init__(self, A: Tensor) -> None:
        self.A, self._made = A, {}

    def __getitem__(self, key: tuple) -> Tensor:
        J = key[-1]
        if (J.start, J.stop) not in self._made:
            self._made[(J.start, J.stop)] = self.A[..., J].contiguous()
        return self._made[(J.start, J.stop)]


def _onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    """oneDNN's ``x wᵀ`` (torch's ``mkldnn::_linear_pointwise``, no bias, no post-op)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _onednn_mm(A: Tensor, B: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``A @ B`` for matrices or stacks of one batch size (:func:`_by_onednn`), block by block in oneDNN's float32
    kernels (:func:`_onednn_block`), the blocks stacked row-major into ``out`` (a new tensor if ``None``), as
    ``torch.bmm`` lays its result. Each block's result is its own whatever the stack around it."""
    if A.ndim == 2 or (A.shape[0] == 1 and out is None):
        # one block: its product is the result where it lies row-major (the straight form), with no stack to
        # copy it into (at d = 1024 a fresh 16 MiB each, which glibc's defaults fault in anew every step)
        C = _onednn_block(A if A.ndim == 2 else A[0], B if B.ndim == 2 else B[0])
        if out is not None:
            return out.copy_(C)
        C = C.contiguous()  # a turned product's transpose: as a matrix, torch's blocked transposed copy (not as a stack)
        return C.unsqueeze(0) if A.ndim == 3 else C
    if out is None:
        out = torch.empty((A.shape[0], A.shape[-2], B.shape[-1]), dtype=A.dtype, device=A.device)
    for o, P in zip(out.unbind(0), _onednn_blocks(A, B)):
        o.copy_(P)  # not torch.stack: it copies a transposed block at a third of copy_'s speed
    return out


def _onednn_blocks(A: Tensor, B: Tensor) -> Iterator[Tensor]:
    """Each block's product ``A[i] B[i]`` of two stacks (:func:`_by_onednn`) as oneDNN writes it (:func:`_onednn_block`),
    one at a time: for a caller that stacks them (:func:`_onednn_mm`) or reads only a reduction of each
    (:func:`whitened_complement_norm`)."""
    return (_onednn_block(a, b) for a, b in zip(A.unbind(0), B.unbind(0)))


def matvec(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` for stacks ``A (b m n)``, ``x (b n)``: ``(b m)``, made as the row ``xᵀ Aᵀ``. MKL rounds a stack of
    matrix-vector products with the vector on the right by the stack's size (``bmm`` of ``b`` blocks against
    one block alone: other bits on sides of 24 and up, measured), and the row form alike whatever the size, so
    a block steps with the same bits in a bucket as alone."""
    return mm(x.unsqueeze(-2), A.mT).squeeze(-2)


def rotate(X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None, *, dtype: torch.dtype | None = None) -> Tensor:
    r"""Into the basis: :math:`Q_L^\top X Q_R` (``None`` is the identity), ``b m n``.

    With both sides the two products go in the cheaper order (:func:`_left_first`): a
    restricted side's ``d × r`` basis is applied first, so :math:`X U` costs
    :math:`mnr` and never the :math:`m^2 n` of rotating the full block first. Either
    order is the same product up to rounding; with full bases on both sides the cost is the same
    and the left goes first. ``dtype``: the products' precision where it is narrower than ``X``'s
    (:class:`NarrowProducts`; the config's ``rotation_dtype``), ``None`` for ``X``'s own.
    """
    narrow = NarrowProducts.of(X, dtype, Q_L, Q_R)
    if narrow is not None:
        return narrow.rotate(X, Q_L, Q_R)
    if Q_L is not None and Q_R is not None and not _left_first(Q_L.shape[-1], X.shape[-2], X.shape[-1], Q_R.shape[-1]):
        return mm(Q_L.mT, mm(X, Q_R))
    if Q_L is not None:
        X = mm(Q_L.mT, X)
    if Q_R is not None:
        X = mm(X, Q_R)
    return X


def unrotate(X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None, *, dtype: torch.dtype | None = None) -> Tensor:
    r"""Back from the basis: :math:`Q_L X Q_R^\top` (``None`` is the identity), ``b m n``, the two
    products in the cheaper order (:func:`_left_first`; left first when the cost is the same). ``dtype`` as
    :func:`rotate`'s."""
    narrow = NarrowProducts.of(X, dtype, Q_L, Q_R)
    if narrow is not None:
        return narrow.unrotate(X, Q_L, Q_R)
    if Q_L is not None and Q_R is not None and not _left_first(Q_L.shape[-2], X.shape[-2], X.shape[-1], Q_R.shape[-2]):
        return mm(Q_L, mm(X, Q_R.mT))
    if Q_L is not None:
        X = mm(Q_L, X)
    if Q_R is not None:
        X = mm(X, Q_R.mT)
    return X


@attrs.frozen
class NarrowProducts:
    r"""Products of a rotation in a narrower dtype than the block's (``rotation_dtype = "bfloat16"``): each operand
    is rounded to ``dtype``, each product is summed in at least float32 and its result rounded to ``dtype``; the
    rotated block comes back in the block's dtype. Where the narrow dtype's kernels are the fast ones (a GPU's
    tensor cores, a CPU with AMX or ``avx512_bf16``) the products run in them; elsewhere (a CPU without them, a
    product below :data:`_BF16_EMULATED`'s upper bound, a float64 block) they run in the block's own kernels on
    operands and results rounded in place of them (``emulated``): the same roundings, the sums in the wider
    dtype, so the two forms differ only where a sum's last bits tip a rounding. A rotation on a CPU without
    fast narrow kernels then costs a little more than in the wide dtype: the option buys speed only where the
    kernels are there (docs/configs.md)."""

    dtype: torch.dtype
    wide: torch.dtype
    emulated: bool

    @staticmethod
    def of(X: Tensor, dtype: torch.dtype | None, Q_L: Tensor | None, Q_R: Tensor | None) -> "NarrowProducts | None":
        """The narrow form for rotating ``X`` with these bases, ``None`` where there is nothing to narrow: no
        ``dtype``, one no narrower than ``X``'s, no basis (the identity on both sides)."""
        if Q_L is None and Q_R is None:
            return None
        m, n = X.shape[-2:]
        side = max(Q_L.shape[-1] if Q_L is not None else 1, Q_R.shape[-1] if Q_R is not None else 1)
        return NarrowProducts.of_work(X, dtype, m * n * side)

    @staticmethod
    def of_gram(A: Tensor, dtype: torch.dtype | None) -> "NarrowProducts | None":
        """The narrow form of the Gram product ``A Aᵀ`` (``A (b m k)``; a factor estimator's ``product_dtype``),
        ``None`` where there is nothing to narrow: no ``dtype``, or one no narrower than ``A``'s."""
        m, k = A.shape[-2:]
        return NarrowProducts.of_work(A, dtype, m * m * k)

    @staticmethod
    def of_sandwiches(G: Tensor, dtype: torch.dtype | None) -> "NarrowProducts | None":
        """The narrow form of the sandwich products of ``G (b m n)`` (``G R̄ Gᵀ`` and ``Gᵀ U G``: DyKAF's KSL step),
        one for its four products, decided by the largest's work; ``None`` as :meth:`of_gram`."""
        m, n = G.shape[-2:]
        return NarrowProducts.of_work(G, dtype, m * n * max(m, n))

    @staticmethod
    def of_work(X: Tensor, dtype: torch.dtype | None, work: int) -> "NarrowProducts | None":
        """The narrow form of products of ``X``'s dtype whose largest makes ``work`` multiply-adds a block
        (:func:`_narrow_emulated`), ``None`` where there is nothing to narrow: no ``dtype``, or one no narrower."""
        if dtype is None or dtype.itemsize >= X.dtype.itemsize:
            return None
        return NarrowProducts(dtype, X.dtype, _narrow_emulated(X, dtype, work))

    def operand(self, t: Tensor) -> Tensor:
        """``t`` rounded to the narrow dtype, as the products read it."""
        return t.to(self.dtype).to(self.wide) if self.emulated else t.to(self.dtype)

    def scaled_operand(self, t: "Tensor | LowerTiles", scale: Tensor) -> Tensor:
        """:meth:`operand` of ``t * scale`` (the product in ``t``'s dtype, then rounded: the same bits), in one pass
        into the narrow dtype where the products read it so (a multiply writes its result converted); ``t`` may come
        as its tiles (:class:`LowerTiles`: written scaled, mirrors included)."""
        if isinstance(t, Tensor) and torch.is_grad_enabled() and (t.requires_grad or scale.requires_grad):
            return self.operand(t * scale)  # tracked: no out=
        out = torch.empty(t.shape, dtype=self.wide if self.emulated else self.dtype, device=t.device)
        scaled = _scaled(t, scale, out=out)
        return self.operand(scaled) if self.emulated else scaled

    def mm(self, A: Tensor, B: Tensor) -> Tensor:
        """``A B`` of two operands (:meth:`operand`), its result rounded to the narrow dtype."""
        P = mm(A, B)
        return P.to(self.dtype).to(self.wide) if self.emulated else P

    def back(self, t: Tensor) -> Tensor:
        """A result of :meth:`mm` in the block's dtype."""
        return t if self.emulated else t.to(self.wide)

    def rotate(self, X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None) -> Tensor:
        """:func:`rotate` in these products, the same order."""
        return self.back(self.rotate_halves(X, Q_L, Q_R)[0])

    def rotate_halves(
        self, X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None, *, right_first: bool | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(H, left, right)`` as :func:`rotate`'s products make them, narrow, with the half product as
        :class:`kronopt.types.Rotation` holds it: ``left`` :math:`Q_L^\top X` where the left side went first (``H``
        itself with the left side alone, ``X`` with the right side alone), ``right`` :math:`X Q_R` where the right side
        did (the other ``None``). ``right_first``: that order, ``None`` :func:`rotate`'s."""
        X_ = self.operand(X)
        if Q_R is None:
            H = self.mm(self.operand(Q_L).mT, X_)  # type: ignore[union-attr]
            return H, H, None
        if Q_L is None:
            return self.mm(X_, self.operand(Q_R)), X, None
        if right_first is None:
            right_first = not _left_first(Q_L.shape[-1], X.shape[-2], X.shape[-1], Q_R.shape[-1])
        if right_first:
            right = self.mm(X_, self.operand(Q_R))
            return self.mm(self.operand(Q_L).mT, right), None, right
        left = self.mm(self.operand(Q_L).mT, X_)
        return self.mm(left, self.operand(Q_R)), left, None

    def unrotate(self, X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None) -> Tensor:
        """:func:`unrotate` in these products, the same order."""
        X = self.operand(X)
        if Q_L is not None and Q_R is not None and not _left_first(Q_L.shape[-2], X.shape[-2], X.shape[-1], Q_R.shape[-2]):
            return self.back(self.mm(self.operand(Q_L), self.mm(X, self.operand(Q_R).mT)))
        if Q_L is not None:
            X = self.mm(self.operand(Q_L), X)
        if Q_R is not None:
            X = self.mm(X, self.operand(Q_R).mT)
        return self.back(X)


def _narrow_emulated(X: Tensor, dtype: torch.dtype, work: int) -> bool:
    """Whether :class:`NarrowProducts` rounds in ``X``'s own kernels (``emulated``) rather than running the narrow
    ones: for a float64 block (the narrow kernels sum in float32), and on a CPU where the narrow kernels are not
    the faster ones: without fast bfloat16 products (:func:`_bfloat16_products_fast`), and for a block's product of
    at most :data:`_BF16_EMULATED`'s upper bound of multiply-adds (measured for Newton–Schulz's products, taken as
    it is; ``work`` is one block's, not the stack's, so that a block rounds alike in a bucket, alone, and on its
    owner under work sharding: the two forms' sums tip a rounding differently now and then); not inside
    ``torch.compile``, which would fuse the round trips away (:func:`_bfloat16_in_float32`)."""
    if X.dtype == torch.float64:
        return True
    if X.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return work <= _BF16_EMULATED[1] or dtype != torch.bfloat16 or not _bfloat16_products_fast()


def _left_first(p: int, m: int, n: int, q: int) -> bool:
    r"""Whether ``(p×m)(m×n)`` then ``(p×n)(n×q)`` costs no more than ``(m×n)(n×q)`` then ``(p×m)(m×q)``:
    :math:`pn(m + q) \le mq(n + p)`."""
    return p * n * (m + q) <= m * q * (n + p)


def change_basis(
    X: Tensor,
    old: tuple[Tensor | None, Tensor | None],
    new: tuple[Tensor | None, Tensor | None],
) -> Tensor:
    r"""Re-express rotated coordinates in a new basis.

    .. math::
        X' = (Q_L'^\top Q_L)\, X\, (Q_R^\top Q_R') = \mathrm{rotate}_{new}(\mathrm{unrotate}_{old}(X)).

    Per side, whichever order costs fewer multiply-adds: forming the relative rotation
    :math:`T = Q'^\top Q` (:math:`d^3`) and applying it (:math:`d^2 o`), or applying
    :math:`Q` and then :math:`Q'^\top` to ``X`` (:math:`2 d^2 o`), where ``o`` is the other
    side of the block: the second is cheaper whenever the block is shorter on the other
    side (``o < d``, e.g. the long side of a ``4d × d`` block). Both are the same product
    up to rounding.
    """
    (L_old, R_old), (L_new, R_new) = old, new
    if L_old is not None or L_new is not None:
        if _apply_in_turn(L_old, L_new, X.shape[-1]):
            X = mm(L_new.mT, mm(L_old, X))  # type: ignore[union-attr]
        else:
            X = mm(_relative(L_old, L_new), X)
    if R_old is not None or R_new is not None:
        if _apply_in_turn(R_old, R_new, X.shape[-2]):
            X = mm(mm(X, R_old.mT), R_new)  # type: ignore[union-attr]
        else:
            X = mm(X, _relative(R_old, R_new).mT)
    return X


def _apply_in_turn(Q_old: Tensor | None, Q_new: Tensor | None, other: int) -> bool:
    """Whether ``Q_newᵀ (Q_old X)`` costs fewer multiply-adds than ``(Q_newᵀ Q_old) X`` for ``other`` columns of ``X``."""
    if Q_old is None or Q_new is None:
        return False  # one product either way
    d, k_old, k_new = Q_old.shape[-2], Q_old.shape[-1], Q_new.shape[-1]
    relative = k_new * d * k_old + k_new * k_old * other
    in_turn = d * k_old * other + k_new * d * other
    return in_turn < relative


def _relative(Q_old: Tensor | None, Q_new: Tensor | None) -> Tensor:
    """``Q_newᵀ Q_old``, with ``None`` as the identity."""
    if Q_old is None:
        return Q_new.mT  # type: ignore[union-attr]
    if Q_new is None:
        return Q_old
    return mm(Q_new.mT, Q_old)


def permute_columns(Q: Tensor, perm: Tensor) -> Tensor:
    """Columns of each ``Q[i]`` reordered by ``perm[i]``: ``b n k, b k -> b n k``, in ``Q``'s layout.

    A column-major ``Q`` (what LAPACK returns, and a refresh's power product) has its
    columns stored as whole rows of ``Qᵀ``: they are moved row by row (on blocks of ``_ROWS_BY_SELECT_MIN``
    entries on, :func:`_rows_in_order`), which on ``4 × 1024²`` takes 0.75 ms where an entrywise gather across
    that layout takes 7.8.
    """
    if Q.stride(-2) == 1 and Q.shape[-1] > 1:
        if Q.shape[-2] * Q.shape[-1] >= _ROWS_BY_SELECT_MIN:
            return _rows_in_order(Q.mT, perm).mT
        batch = torch.arange(Q.shape[0], device=Q.device).unsqueeze(-1)
        return Q.mT[batch, perm].mT
    index = perm.unsqueeze(-2).expand(Q.shape[0], Q.shape[1], perm.shape[-1])
    return torch.gather(Q, -1, index)


#: a block of at least this many entries has its rows reordered by :func:`_rows_in_order`; a smaller one by an
#: advanced index (a column-major basis) or a gather (rows in place), which take fewer or cheaper calls there
#: (measured: 6.4 and 4.0 against 8.9 µs on a ``20²`` block, 11.2 and 9.3 against 9.5 on ``66²``). The choice
#: reads the block's shape alone, so a step makes the same calls for one block of a shape as for many.
_ROWS_BY_SELECT_MIN = 4096


def _rows_in_order(X: Tensor, perm: Tensor) -> Tensor:
    """The rows of each block of a row-major ``X (b k n)`` (``k ≥ 1``) reordered by ``perm (b k)``, row-major:
    whole rows copied by one ``index_select`` over the stack's rows, the same entries as an advanced index
    ``X[arange(b)[:, None], perm]`` or a gather, in cheaper calls on large blocks (measured: 33 against 70 µs on
    ``4 × 256²``, 0.75 against 1.03 ms on ``4 × 1024²``; a gather 157 µs and 2.6 ms there)."""
    b, k, n = X.shape
    rows = perm + torch.arange(0, b * k, k, device=X.device).unsqueeze(-1)  # each block's rows in the stack's
    return X.reshape(b * k, n).index_select(0, rows.reshape(-1)).view(b, k, n)  # perm may lie in any layout


def permute_along(X: Tensor, perm: Tensor, dim: int) -> Tensor:
    """Reorder ``X (b m n)`` along ``dim`` (1 rows, 2 columns) by the batched ``perm``."""
    _check_batched("X", X)
    if dim == 1:
        if X.is_contiguous() and X.shape[1] * X.shape[2] >= _ROWS_BY_SELECT_MIN:
            return _rows_in_order(X, perm)
        index = perm.unsqueeze(-1).expand_as(X)
    elif dim == 2:
        index = perm.unsqueeze(-2).expand_as(X)
    else:
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    return torch.gather(X, dim, index)


def block_norm(X: Tensor) -> Tensor:
    """Frobenius norm of each block, ``b m n -> b 1 1``."""
    _check_batched("X", X)
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)


def block_norm_wide(X: Tensor) -> Tensor:
    """:func:`block_norm` with its digits kept where the squares it sums underflow.

    The plain norm sums its entries' squares in their own dtype: in float32 a block whose entries lie below about
    ``2^-63`` squares them into subnormals (``‖X‖`` of ``2^-70`` read 17 % low on a ``64 × 64`` block) or zeros
    (below ``2^-75`` a nonzero block reads 0). Where the plain norm lies below :func:`norm_digits_floor` on a block,
    that block's norm is taken of its entries brought near 1 first (times the power of two :func:`near_one_scale`
    makes of its largest magnitude, exact) and scaled back; elsewhere the plain norm itself, the same bits (an
    overflow too, which the callers refuse as before). In ``X``'s own dtype (a device without float64 takes it
    too). On a CPU the verdict is read on the host, so a stack in range costs nothing more; other devices take both
    norms and choose per block. Blocks of no entries have norm 0."""
    if X.shape[-2] * X.shape[-1] == 0:
        return block_norm(X)
    return wide_norm_where(block_norm(X), X.shape[-2] * X.shape[-1], lambda: _scaled_block_norm(X))


def _scaled_block_norm(X: Tensor) -> Tensor:
    """Each block's norm taken of ``X`` brought near 1 (:func:`near_one_scale` of its largest magnitude), then
    scaled back; a block with a non-finite entry keeps the plain norm's infinity or NaN."""
    lo, hi = block_min_max(X)
    sigma = near_one_scale(torch.maximum(lo.abs(), hi.abs()).view(-1, 1, 1))
    return block_norm(X * sigma) / sigma


def near_one_scale(top: Tensor) -> Tensor:
    """The power of two that brings each ``top`` (a largest magnitude) into ``[1/2, 1)``, within the dtype's normal
    range (``2^±126`` in float32, so that a subnormal's square is normal once scaled), and 1 where ``top`` is 0 or
    not finite. Multiplying by it, and dividing by it after, is exact."""
    return torch.where(top.isfinite(), _power_of_two_toward_one(top, math.frexp(torch.finfo(top.dtype).max)[1] - 2), 1.0)


def _power_of_two_toward_one(top: Tensor, limit: int) -> Tensor:
    """``2^-e`` with ``e`` the binary exponent of each ``top`` (so ``top · 2^-e`` lies in ``[1/2, 1)``), ``e`` clamped
    to ``±limit``; 1 where ``top`` is 0."""
    return torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent.neg_().clamp_(-limit, limit))


def norm_digits_floor(numel: int, dtype: torch.dtype) -> float:
    r"""The Frobenius norm of ``numel`` entries of ``dtype`` below which their plain sum of squares may lose digits:
    :math:`\sqrt{\text{numel} \cdot \text{tiny}}`, where the squares that round as subnormals (each off by at most
    half their spacing) or to zero can move the sum by more than half an ulp."""
    return math.sqrt(max(numel, 1) * torch.finfo(dtype).tiny)


def wide_norm_where(norm: Tensor, numel: int, wide: Callable[[], Tensor]) -> Tensor:
    """``norm`` (per block, of ``numel`` entries each) where it is at least :func:`norm_digits_floor`, else ``wide()``
    (the same norm taken so that it keeps its digits there); ``norm`` itself where every block is at least that on a
    CPU (read on the host), without calling ``wide``."""
    inside = norm >= norm_digits_floor(numel, norm.dtype)  # False where NaN: the wide norm is NaN there too
    if cpu_all(inside):
        return norm
    return torch.where(inside, norm, wide())


def nonzero_blocks(X: Tensor) -> Tensor:
    """``(b)`` mask: True where a block holds a nonzero entry (NaN counts). By the largest magnitude, not the
    norm, whose squares underflow: a float32 block of entries below about 1e-23 has norm 0 (as
    :func:`_nonzero_each` reads a gradient before a first call). From the smallest and largest entries
    (:func:`block_min_max`: the infinity norm along two dimensions ran 6–10 times slower on a CPU)."""
    _check_batched("X", X)
    if X.shape[-2] * X.shape[-1] == 0:
        return torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    lo, hi = block_min_max(X)
    return lo.ne(0) | hi.ne(0)  # NaN, in both, is not 0


def match_norm(D: Tensor, A: Tensor) -> Tensor:
    r"""``D`` rescaled per block to the Frobenius norm of ``A``: :math:`D\,\|A\|_F/\|D\|_F` (0 stays 0)."""
    return rescale_to_norm(D, block_norm(A))


def adam_moments(m: Tensor, v: Tensor, G: Tensor, betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
    r"""Adam's moment EMAs: :math:`m \leftarrow \beta_1 m + (1-\beta_1) G`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) G^2` (new tensors)."""
    if (twin := compiled.variant("adam_moments")) is not None: return twin(m, v, G, betas)  # noqa: E701 (compile = true)
    beta1, beta2 = betas
    return torch.lerp(m, G, 1 - beta1), v.mul(beta2).addcmul_(G, G, value=1 - beta2)


def adam_moments_each(
    m: Sequence[Tensor], v: Sequence[Tensor], G: Sequence[Tensor], betas: tuple[float, float]
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`adam_moments` of each triple ``(m[i], v[i], G[i])``, the same bits, one ``foreach`` call per operation
    for them all."""
    beta1, beta2 = betas
    v_new = torch._foreach_mul(v, beta2)
    torch._foreach_addcmul_(v_new, G, G, value=1 - beta2)
    return list(torch._foreach_lerp(m, G, 1 - beta1)), list(v_new)


def adam_moments_each_(m: Sequence[Tensor], v: Sequence[Tensor], G: Sequence[Tensor], betas: tuple[float, float]) -> None:
    """:func:`adam_moments_each` written into ``m`` and ``v`` themselves, the same bits (the same kernels, each
    writing over its first operand): for moments proven to stay finite beforehand, whose old values nothing needs."""
    beta1, beta2 = betas
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, G, G, value=1 - beta2)
    torch._foreach_lerp_(m, G, 1 - beta1)


def adam_ratio(
    m: Tensor,
    v: Tensor,
    *,
    step: int,
    betas: tuple[float, float],
    eps: float,
    eps_placement: str,
    bias_correction: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, float]:
    r"""Adam's elementwise ratio ``N`` and the scalar ``scale`` of the step :math:`D = \mathrm{scale}\cdot N`.

    With :math:`c_1 = 1-\beta_1^t`, :math:`c_2 = 1-\beta_2^t` (1 without bias correction):
    ``"before_correction"`` (SOAP) :math:`N = m/(\sqrt v + \epsilon)`, scale :math:`\sqrt{c_2}/c_1`;
    ``"after_correction"`` (torch.optim.Adam) :math:`N = m/(\sqrt{v}/\sqrt{c_2} + \epsilon)`, scale :math:`1/c_1`.
    The scale is kept apart so a caller can normalise ``N`` before it (SOAP's ``normalize_grads``).
    ``out`` (shaped like ``m``) receives ``N`` instead of a fresh tensor.
    """
    if out is None and (twin := compiled.variant("adam_ratio")) is not None: return twin(m, v, step=step, betas=betas, eps=eps, eps_placement=eps_placement, bias_correction=bias_correction)  # noqa: E501,E701
    root = v.sqrt() if out is None else torch.sqrt(v, out=out)
    divisor, scale = _adam_corrections(step, betas, eps_placement, bias_correction)
    if divisor is not None:
        root.div_(divisor)
    return _quotient(m, root.add_(eps)), scale


def adam_ratio_each(
    m: Sequence[Tensor], v: Sequence[Tensor], *, step: int, betas: tuple[float, float], eps: float, eps_placement: str,
    bias_correction: bool,
) -> tuple[list[Tensor], float]:
    """:func:`adam_ratio` of each pair ``(m[i], v[i])`` of one setting, the same bits, one ``foreach`` call per
    operation for them all (on a CPU each runs the same kernel on every tensor, without the calls around it)."""
    root = torch._foreach_sqrt(v)
    divisor, scale = _adam_corrections(step, betas, eps_placement, bias_correction)
    if divisor is not None:
        torch._foreach_div_(root, divisor)
    torch._foreach_add_(root, eps)
    return list(torch._foreach_div(m, root)), scale


def _adam_corrections(step: int, betas: tuple[float, float], eps_placement: str, bias_correction: bool) -> tuple[float | None, float]:
    """``(divisor, scale)`` of :func:`adam_ratio`: what ``√v`` is divided by before ``ε`` is added (``None``: nothing,
    ``"before_correction"``) and the scale of the step."""
    beta1, beta2 = betas
    c1 = 1 - beta1**step if bias_correction else 1.0
    c2 = 1 - beta2**step if bias_correction else 1.0
    if eps_placement == "before_correction":
        return None, c2**0.5 / c1
    if eps_placement == "after_correction":
        return c2**0.5, 1 / c1
    raise ValueError(f"eps_placement must be 'before_correction' or 'after_correction', got {eps_placement!r}")


def _quotient(m: Tensor, denom: Tensor) -> Tensor:
    """``m / denom``, written over ``denom`` (a temporary) when the shapes allow: one allocation fewer."""
    if denom.shape == m.shape and denom.dtype == m.dtype:
        return torch.div(m, denom, out=denom)
    return m / denom


def normalize_rms(D: Tensor) -> Tensor:
    r"""``D`` divided per block by :math:`10^{-30} + \mathrm{RMS}(D)` (SOAP's and KL-Shampoo's ``normalize_grads``)."""
    return D / (1e-30 + D.square().mean(dim=(-2, -1), keepdim=True).sqrt())


def rescale_to_norm(D: Tensor, norm: Tensor) -> Tensor:
    r"""``D`` rescaled per block to Frobenius norm ``norm (b 1 1)``: :math:`D\,\nu/\|D\|_F` (0 stays 0)."""
    return D * rescale_factor(D, norm)


def rescale_factor(D: Tensor, norm: Tensor) -> Tensor:
    r"""The factor ``(b 1 1)`` that gives ``D`` the Frobenius norm ``norm`` per block,
    :math:`\nu/\|D\|_F`, and 0 where ``D`` is 0; in ``norm``'s dtype (``D`` may be narrower)."""
    norm_D = torch.linalg.vector_norm(D, dim=(-2, -1), keepdim=True, dtype=norm.dtype)
    ratio = norm / norm_D.clamp(min=torch.finfo(norm.dtype).tiny)
    return torch.where(norm_D > 0, ratio, torch.zeros_like(ratio))


# -- symmetric eigendecomposition ------------------------------------------------------


@attrs.frozen(eq=False)
class Eigh:
    """Result of :func:`eigh_descending`.

    ``lam (b n)`` descending, ``Q (b n n)`` matching columns, ``ok (b)`` True where
    the block's output is finite (a False block must not be used).
    """

    lam: Tensor
    Q: Tensor
    ok: Tensor


def _eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """The raw solver, isolated so tests can make it fail. On a CUDA device torch's ``eigh`` synchronises
    with the host (it reads the solver's error codes; torch has no form that leaves them on the device):
    kronopt calls it only on a bucket's first call and on the refreshes of an ``eigh`` basis and of a
    restricted side's subspace, never on a plain step (``tests/unit/test_no_host_sync.py``)."""
    return torch.linalg.eigh(A)


def _svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``(U, S, Vh)``, the raw solver isolated as :func:`_eigh` is, and like it synchronising a
    CUDA device with the host: called only on a bucket's first call (DyKAF's start, a restricted side's
    first subspace) and by the Fisher analysis, never on a plain step."""
    return torch.linalg.svd(A, full_matrices=False)


def _any_written(mask: Tensor) -> bool:
    """Whether any entry of a ``(b)`` write mask holds, read on the host: only at a bucket's first call
    (``KronOptimizer._uncounted``), where on a CUDA device it is, with :func:`_eigh` and :func:`_svd`, the
    step's one synchronisation (``tests/unit/test_no_host_sync.py`` allows these three)."""
    return bool(mask.any())


def _nonzero_each(tensors: list[Tensor], dtype: torch.dtype) -> list[bool]:
    """Whether each tensor holds an entry that is nonzero in ``dtype`` (NaN counts), read on the host in one
    transfer: only before a bucket's first call, for a factor stage that starts a block on its first nonzero
    gradient (``KronOptimizer._nonzero``), where on a CUDA device it waits as :func:`_any_written` does
    (``tests/unit/test_no_host_sync.py`` allows it with those). ``dtype`` is the one the stage reads the
    gradient in (a float64 gradient of 1e-50 is zero to a float32 stage): its largest magnitude rounds to 0
    exactly where every entry does, so both read the same blocks as zero (:func:`nonzero_blocks`)."""
    return torch.stack(torch._foreach_norm(tensors, math.inf)).to(dtype).ne(0).tolist()  # max |entry|: no underflow


#: errors of the device, not of the numerics, that a solver's fallback must not take for a failure to converge:
#: an out-of-memory (a GPU's solver workspace, the float64 retry's copy) and an accelerator's error surfacing at the
#: solver's synchronisation (``torch.AcceleratorError``, where torch has it)
_DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if isinstance(e, type)
)


def _svd_retried(G: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None] | None:
    """:func:`_svd` in ``G``'s dtype, retried once in float64 (and cast back) as :func:`eigh_descending` is,
    then block by block (each in ``G``'s dtype, then float64): ``(U, S, Vh, ok)`` with ``ok`` ``None`` where
    every block was solved, else a ``(b)`` mask of the blocks solved (the others hold zeros: their caller's
    fallback takes over for them alone); ``None``, with a warning naming ``what`` falls back, when every block
    fails. An error of the device (``_DEVICE_ERRORS``) is raised as it came."""
    try:
        return (*_svd(G), None)
    except _DEVICE_ERRORS:
        raise
    except RuntimeError as first:
        try:
            U, S, Vh = _svd(G.to(torch.float64))
        except _DEVICE_ERRORS:
            raise
        except RuntimeError as second:
            solved = _solve_each(_svd, G)
            k = min(G.shape[-2:])
            ok = [t is not None for t in solved]
            parts = [
                t if t is not None else (X.new_zeros(1, X.shape[-2], k), X.new_zeros(1, k), X.new_zeros(1, k, X.shape[-1]))
                for t, X in zip(solved, G.split(1))
            ]
            warnings.warn(
                f"kronopt: the SVD of {what} failed in {G.dtype} ({first}) and in float64 ({second}) for "
                f"{ok.count(False)} of {len(ok)} blocks; their fallback is used instead",
                RuntimeWarning,
                stacklevel=3,
            )
            if not any(ok):
                return None
            U, S, Vh = (torch.cat(t) for t in zip(*parts))
            return U, S, Vh, torch.tensor(ok, device=G.device)
        return U.to(G.dtype), S.to(G.dtype), Vh.to(G.dtype), None


def eigh_descending(A: Tensor, *, canonical_null: bool = False) -> Eigh:
    r"""Eigendecomposition of a batch of symmetric matrices, eigenvalues descending.

    .. math::
        A = Q \,\mathrm{diag}(\lambda)\, Q^\top,\qquad \lambda_1 \ge \dots \ge \lambda_n .

    Runs in ``A``'s dtype; if the solver raises, retries once in float64 and casts
    back. Each eigenvector's sign is fixed so that its largest-magnitude entry is
    positive (a deterministic convention; every consumer in kronopt is invariant to
    column signs).

    ``canonical_null``: the eigenvectors of eigenvalues within the solver's rounding of zero
    (:func:`null_columns`: a rank-deficient factor's null space) come back in the basis of their span
    that :func:`canonical_null_basis` makes, not the one the solver's rounding picked (another in a
    stack than alone, on another processor). For a rule that treats the basis's coordinates one by one
    (Adam in SOAP's eigenbasis); a rule that reads the eigenvalues with their vectors (Shampoo's root)
    is invariant inside an exactly degenerate space and keeps the solver's vectors.

    A batched solver fails for the whole batch when one block fails; where the float64 retry fails
    too, the blocks are solved one at a time (each in ``A``'s dtype, then in float64), so a block
    that fails in both dtypes comes back not ``ok`` (NaN) and the others as a batch of their own
    would have them (one bad block does not cost its bucket the refresh).

    Raises:
        ArithmeticError: every block failed in both dtypes.
    """
    _check_batched_square("A", A)
    try:
        lam, Q = _eigh(A)
    except _DEVICE_ERRORS:  # not a numerics failure: an out-of-memory or an accelerator's error
        raise
    except RuntimeError as first:
        try:
            lam, Q = _eigh(A.to(torch.float64))
        except _DEVICE_ERRORS:
            raise
        except RuntimeError as second:
            lam, Q = _eigh_block_by_block(A)
            if lam is None:
                raise ArithmeticError(f"eigh failed in {A.dtype} ({first}) and in float64 ({second})") from second
        lam, Q = lam.to(A.dtype), Q.to(A.dtype)
    lam, Q = lam.flip(-1), Q.flip(-1)
    pivot = Q.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(Q, -2, pivot))
    Q = Q * torch.where(signs == 0, torch.ones_like(signs), signs)
    if canonical_null:
        null = null_columns(lam)
        if not cpu_all(~null):  # on a CPU, read there for free: only where a block has a null space
            Q = canonical_null_basis(Q, null)
    ok = torch.isfinite(lam).all(dim=-1) & torch.isfinite(Q).all(dim=(-2, -1))
    return Eigh(lam=lam, Q=Q, ok=ok)


def null_columns(lam: Tensor) -> Tensor:
    """Per eigenvalue of ``lam (b k)`` (a symmetric PSD factor's, or Ritz values of one, descending), whether it is the
    solver's rounding of zero: at most :func:`eigenvalue_floor` of the largest in size (every one of a zero matrix; a
    NaN one is not). On a PSD factor a suffix of each row: the columns of its null space, which no eigenvalue
    defines (:func:`canonical_null_basis`; :func:`restricted_refresh`'s Ritz values of rounding)."""
    if lam.shape[-1] == 0:
        return torch.zeros(lam.shape, dtype=torch.bool, device=lam.device)
    size = lam.abs()
    return size <= size.amax(-1, keepdim=True) * eigenvalue_floor(lam.shape[-1], lam.dtype)


def null_space_seeds(k: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The fixed ``k × k`` matrix :func:`canonical_null_basis` projects: column ``j`` holds ``k`` standard normal
    draws (float64, then cast) of torch's CPU generator seeded with ``k · 2²⁰ + j``. Dense and in general position
    to every subspace (a coordinate one included), so its projection onto a ``c``-dimensional span is a ``c × c``
    Gaussian there, well conditioned. Made column by column into its ``dtype`` (4096 columns: about 0.7 s)."""
    seeds = torch.empty(k, k, dtype=dtype)
    for j in range(k):
        seeds[:, j] = torch.randn(k, generator=torch.Generator().manual_seed(k * 2**20 + j), dtype=torch.float64)
    return seeds.to(device)


def canonical_null_basis(Q: Tensor, null: Tensor) -> Tensor:
    r"""``Q (b k k)`` orthonormal, whose columns flagged in ``null (b k)`` span a null space (any basis of it is as
    good), with those columns replaced by one basis of their span that does not depend on the one they came in:
    the projections :math:`Q_c Q_c^\top \Omega_{:,j}` of :func:`null_space_seeds`'s columns in the flagged places,
    orthonormalised in column order after the others (Householder QR, a positive diagonal of ``R``). The projector
    :math:`Q_c Q_c^\top` is the same for every basis of the span, so the result is too, to rounding. The other
    columns come back bit for bit; a block whose every column is flagged (a zero factor) takes the identity, the
    basis a fresh block starts from. Each block's work has the same shapes whatever the others in its stack hold
    (two ``k × k`` products and a QR), so a block rounds alike in a stack and alone; nothing is read on the host."""
    k = Q.shape[-1]
    if k == 0:
        return Q
    cols = null.unsqueeze(-2)
    flagged = Q * cols
    spread = mm(flagged, mm(flagged.mT, null_space_seeds(k, dtype=Q.dtype, device=Q.device)))
    X = torch.where(cols, spread, Q)
    X = torch.where(null.all(-1).view(-1, 1, 1), torch.eye(k, dtype=Q.dtype, device=Q.device), X)
    return torch.where(cols, orthonormalize(X), Q)


def _solve_each(solver: Callable[[Tensor], tuple[Tensor, ...]], A: Tensor) -> list[tuple[Tensor, ...] | None]:
    """``solver`` on each block of ``A`` alone, in ``A``'s dtype and, where that fails, in float64 (cast back):
    one result per block, ``None`` for a block that fails in both. For after a batched call failed in both dtypes
    (a batched solver fails for the whole batch when one block does). An error of the device is raised as it came."""
    out: list[tuple[Tensor, ...] | None] = []
    for X in A.split(1):
        for dtype in (A.dtype, torch.float64):
            try:
                out.append(tuple(t.to(A.dtype) for t in solver(X.to(dtype))))
            except _DEVICE_ERRORS:
                raise
            except RuntimeError:
                continue
            break
        else:
            out.append(None)
    return out


def _eigh_block_by_block(A: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """:func:`_eigh` of each block of ``A`` alone (:func:`_solve_each`): NaN for a block that fails in both
    dtypes; ``(None, None)`` where every block does. Only after the batch failed in both dtypes (the host is
    waited for there anyway)."""
    solved = _solve_each(_eigh, A)
    if all(t is None for t in solved):
        return None, None
    nan = [(torch.full(X.shape[:-1], math.nan, dtype=A.dtype, device=A.device), torch.full_like(X, math.nan)) for X in A.split(1)]
    lams, Qs = zip(*(t if t is not None else n for t, n in zip(solved, nan)))
    # column-major, as the solver returns a stack (products that read a basis may round by its layout)
    return torch.cat(lams), torch.cat([Q.mT for Q in Qs]).mT


def rayleigh_quotients(A: Tensor, Q: Tensor) -> Tensor:
    r"""Diagonal of :math:`Q^\top A Q` without forming it: ``b n, n k -> b k``."""
    _check_batched_square("A", A)
    return (Q * (A @ Q)).sum(dim=-2)


def sorted_power_step(
    A: Tensor, Q: Tensor, *, sort: bool, quotients: bool = True, canonical_null: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""SOAP's refresh of one side: Rayleigh quotients, optional sort, one warm-started power step + QR.

    .. math::
        P = A Q,\quad e = \mathrm{diag}(Q^\top P),\quad \pi = \mathrm{argsort}(e)\!\downarrow,\quad
        Q' = \mathrm{qr}(P_{:,\pi})

    using :math:`A\,Q_{:,\pi} = (A Q)_{:,\pi}`, so the product serves both the quotients
    and the power step (one ``n × n × n`` product instead of two). Without ``sort`` and
    without ``quotients`` (nothing reads them) :math:`e` is not computed: an entrywise
    product and a reduction of ``P``'s size fewer. ``canonical_null``: the columns the
    product leaves to rounding keep their old direction (:func:`_power_basis`).

    Returns:
        ``(Q' (b n n), e_π (b n) or None, π (b n) or None)`` (``π`` is ``None`` without ``sort``,
        ``e`` without ``sort`` and ``quotients``).
    """
    _check_batched_square("A", A)
    P = _column_major_product(A, Q)
    e = (Q * P).sum(dim=-2) if sort or quotients else None
    perm = None
    if sort:
        perm = torch.argsort(e, dim=-1, descending=True)
        P, e = permute_columns(P, perm), torch.gather(e, -1, perm)
    if canonical_null:
        return _power_basis(Q, perm, P), e, perm
    return q_factor(P, overwrite=True), e, perm


def power_qr(A: Tensor, Q: Tensor, *, canonical_null: bool = False) -> Tensor:
    r"""One warm-started subspace (power) iteration: the Q factor of :math:`\mathrm{QR}(A Q)`.

    Column signs follow the QR routine; consumers are sign invariant. ``canonical_null``: the
    columns the product leaves to rounding keep their old direction (:func:`_power_basis`).
    """
    _check_batched_square("A", A)
    P = _column_major_product(A, Q)
    return _power_basis(Q, None, P) if canonical_null else q_factor(P, overwrite=True)


def _power_basis(Q: Tensor, perm: Tensor | None, P: Tensor) -> Tensor:
    r"""The Q of the QR of the power product ``P`` :math:`= A Q_{:,\pi}` (owned, column-major), where a column whose
    part orthogonal to the earlier ones is rounding keeps its old direction.

    A column :math:`j` whose :math:`|R_{jj}|` is at most :func:`power_rounding_floor` of the largest :math:`|R_{ii}|`
    (:math:`A` leaves it to rounding: a rank-deficient factor's null space, or a product dependent on the earlier
    columns') got its direction from the rounding, another in a stack than alone or on another processor. Such
    columns are replaced by their old columns :math:`Q_{:,\pi_j}` and the QR is taken again: each then comes back
    as its old direction made orthogonal to the columns before it, which the product does define, so a null
    space keeps its basis from refresh to refresh (from the first one, :func:`canonical_null_basis`). Where a
    real direction's eigenvalue is that small, the product gave it rounding too, and its old column is as good.
    ``P`` is copied before the first QR at every call. On a CPU where no column is flagged (read there for free)
    the first QR is the result; elsewhere the second QR runs from that copy, on a device at every refresh, so both
    take the same bits.

    Where a factor's spectrum falls smoothly through the floor (a float32 factor's tail) a column just above it
    still has little more signal than rounding, so its direction is steered by rounding under either choice: the
    canonical one cuts that steering (20–400 × on such float32 streams), it does not bring it to rounding."""
    k = P.shape[-1]
    if k == 0:
        return q_factor(P, overwrite=True)
    kept = P.clone(memory_format=torch.preserve_format)
    diagonal = P.new_empty(P.shape[:-2] + (k,))
    Q_new = q_factor(P, overwrite=True, r_diagonal=diagonal)
    null = diagonal <= diagonal.amax(-1, keepdim=True) * power_rounding_floor(k, diagonal.dtype)
    if cpu_all(~null):
        return Q_new
    old = Q if perm is None else permute_columns(Q, perm)
    return q_factor(torch.where(null.unsqueeze(-2), old, kept, out=kept), overwrite=True)


def _column_major_product(A: Tensor, Q: Tensor) -> Tensor:
    r""":math:`A Q` for a symmetric ``A``, laid out column-major (the ``.mT`` view of :math:`Q^\top A^\top`).

    The layout LAPACK's QR works in, and the one the bases it returns (and ``eigh``'s)
    have: ``geqrf`` then takes ``P`` with a plain copy instead of a transposed one, and
    the Rayleigh quotients :math:`\mathrm{diag}(Q^\top P)` multiply two tensors of the same
    layout instead of reading one across its rows (on ``4 × 1024²``, 8.4 → 0.7 ms, and
    ``geqrf`` 73 → 67 ms). The same product, bit for bit here: a transposed operand is a
    flag to the matrix multiply, not a copy.
    """
    return mm(Q.mT, A.mT).mT


#: on a CPU with MKL, the QR of a square side that is a multiple of ``_QR_PAD_SIDE`` up to ``_QR_PAD_MAX`` is taken
#: of the matrix with ``_QR_PAD_ROWS`` zero rows below it (:func:`_padded`)
_QR_PAD_SIDE = 512
_QR_PAD_MAX = 4096
_QR_PAD_ROWS = 16


def q_factor(P: Tensor, *, overwrite: bool = False, r_diagonal: Tensor | None = None) -> Tensor:
    r"""The Q factor of the reduced QR of each ``P (b n k)``, without forming ``R``.

    The same Householder routines as :func:`torch.linalg.qr` (``geqrf``, then
    ``householder_product``), so the same ``Q`` bit for bit on CPU except where
    :func:`_padded` puts zero rows below ``P``; ``torch.linalg.qr`` also copies out the
    triangle ``R``, which the callers here discard.

    With ``overwrite`` both routines work in ``P``'s own memory and the result is ``P``
    (its entries replaced): a caller that owns ``P`` saves two copies and two allocations
    of its size (on ``4 × 1024²``, about 7 % of the QR). That needs a column-major ``P``,
    as :func:`_column_major_product` makes; another layout (for which torch would copy
    into a temporary and back, four copies instead of two), or a ``P`` that is not plain
    (:func:`_plain`: autograd tracks it, a forward-mode tangent or a ``torch.func`` transform wraps it;
    ``out=`` refuses each), takes the path without ``overwrite``. Where the QR is padded, the Q is
    copied into a column-major ``P`` the same way.

    ``r_diagonal``: a ``(b k)`` tensor that receives :math:`|R_{jj}|` (read off the reflectors, where
    ``geqrf`` leaves ``R``, before the Q is formed over them).
    """
    if P.shape[-1] > P.shape[-2]:
        raise ValueError(f"q_factor needs k ≤ n columns, got shape {tuple(P.shape)}")
    n = P.shape[-2]
    # the memory both routines work in: a padded copy (_padded), P itself where the caller gives it up, or none
    # (geqrf makes its own)
    work = _padded(P) if _pads_qr(P) else P if _lapack_in_place(P, overwrite) else None
    if work is None:
        reflectors, tau = torch.geqrf(P)
    else:
        reflectors, tau = work, P.new_empty(P.shape[:-2] + (P.shape[-1],))
        torch.geqrf(work, out=(work, tau))
    if r_diagonal is not None:
        torch.abs(torch.diagonal(reflectors, dim1=-2, dim2=-1), out=r_diagonal)
    Q = _householder_product(reflectors, tau, work)
    if work is None or work is P:
        return Q
    Q = Q[..., :n, :]  # the padded copy's top rows
    return P.copy_(Q) if _lapack_in_place(P, overwrite) else Q.mT.contiguous().mT  # column-major, as torch's


def _lapack_in_place(X: Tensor, overwrite: bool) -> bool:
    """Whether :func:`q_factor` and :func:`orthonormalize` factor ``X`` in its own memory: the caller gives it up
    (``overwrite``), it lies column-major (LAPACK's layout; another would be copied to a temporary and back), and it
    is plain (:func:`_plain`: ``out=`` refuses a tensor autograd tracks, a forward-mode tangent or a ``torch.func``
    wrapper)."""
    return overwrite and X.mT.is_contiguous() and _plain(X)


def _householder_product(reflectors: Tensor, tau: Tensor, out: Tensor | None) -> Tensor:
    """torch's ``householder_product``, into ``out`` where one is given."""
    if out is None:
        return torch.linalg.householder_product(reflectors, tau)
    return torch.linalg.householder_product(reflectors, tau, out=out)


def _pads_qr(P: Tensor) -> bool:
    """Whether :func:`q_factor` takes ``P``'s QR padded (:func:`_padded`): a square, non-empty stack on a CPU whose
    LAPACK is MKL, its side a multiple of ``_QR_PAD_SIDE`` up to ``_QR_PAD_MAX``, and plain (:func:`_plain`: the
    routines write the padded copy with ``out=``, which autograd and the ``torch.func`` transforms refuse)."""
    n, k = P.shape[-2], P.shape[-1]
    return (
        n == k and n > 0 and not n % _QR_PAD_SIDE and n <= _QR_PAD_MAX
        and P.device.type == "cpu" and torch.backends.mkl.is_available() and _plain(P)
    )


def _padded(P: Tensor) -> Tensor:
    r"""``P (b n k)`` copied on top of ``_QR_PAD_ROWS`` zero rows, column-major: where :func:`q_factor` takes the QR of a
    square ``P`` (:func:`_pads_qr`), both ``geqrf`` and ``householder_product`` working in it, and the Q its top
    ``n`` rows.

    The same QR in exact arithmetic: each reflector is zero on the zero rows (they add nothing to the norms), so
    ``R`` is ``P``'s and the reflections leave those rows zero; rounded otherwise (entries of ``Q`` differ by a few
    of float32's machine epsilon). MKL's two routines run below their speed on these sides, whose leading dimension is
    a multiple of 512 entries (the padded copy's is not). Timed on an Intel Xeon with AMX (2 threads, MKL of torch
    2.13; docs/performance_log.md, sixty-ninth session), the whole QR, copies included, against ``geqrf`` on the
    square ``P`` and the Q formed padded: 0.95 of the time at 1536, 0.96 at 2048, 0.92 at 3072, 1.00 at 512 and 1024;
    against both square, 0.90 at 4096. Earlier only the Q was formed so (the reflectors copied into the padded buffer), measured on two cores of
    an AMD EPYC with AVX-512 (MKL 2024.2): alone 0.60 of the square form's time at 1024, 0.71 at 512, 0.79 at 2048;
    at 256, 768 and 1280 the copies ate the gain (0.98–1.03), so sides that are no multiple of 512 are not padded.
    The whole padded QR on the Zen 4 (2 threads; the seventy-fourth session), against the square one, in turn:
    0.93 of the time at 512, 0.74 on ``4 × 1024²``, 0.91 at 1536, 0.79 at 2048; at 256 1.11 and 768 1.01.
    """
    *batch, n, k = P.shape
    padded = P.new_empty((*batch, k, n + _QR_PAD_ROWS)).mT  # column-major, as LAPACK works
    padded[..., :n, :].copy_(P)
    padded[..., n:, :].zero_()
    return padded


def finite_blocks(*tensors: Tensor | None) -> Tensor:
    """``(b)`` mask: True where every given tensor is finite on that block.

    On a CPU (where the verdict is read on the host for free, :func:`host_verdicts`) each floating
    block is summed (:func:`_finite_by_sums`): a finite sum proves the block finite, and a sum that
    overflowed (finite entries near the dtype's largest) proves nothing, so the reading below decides
    then. Elsewhere a stack of float32, float64 or bfloat16 blocks is read once, by a product with a
    small weight (:func:`_weighted_row_sums`). Otherwise a block's largest and smallest
    entries are both finite exactly when it holds no NaN and no infinity
    (``amax``/``amin`` propagate NaN; unlike a sum they never overflow): two plain
    reductions, where the max-norm (``vector_norm(ord=inf)``) is about 20 times slower. Small
    tensors of one dtype (at most ``_FINITE_AT_ONCE_MAX`` entries in all) are laid side
    by side first and reduced together, to their largest magnitudes (finite exactly where the
    block is; a floating dtype's): there the number of calls is the cost.
    """
    given = [t for t in tensors if t is not None]
    if not given:
        raise ValueError("finite_blocks needs at least one tensor")
    if len(given) > 1 and _small_alike(given):
        # small blocks, where the number of calls is the cost: the tensors side by side, one block
        # per row, and one reduction of that instead of two per tensor
        rows = torch.cat([_block_rows(t) for t in given], dim=1)
        if rows.is_floating_point():  # the largest magnitude: NaN where a NaN is (|NaN| is NaN; amax keeps it)
            return rows.abs().amax(dim=1) < math.inf
        return torch.stack([rows.amax(dim=1), rows.amin(dim=1)]).isfinite().all(0)
    proven = _finite_by_sums(given)
    if proven is not None:
        return proven
    verdicts, sums, extremes = [], [], []
    for t in given:
        row_sums = _weighted_row_sums(t)
        if row_sums is not None:
            sums.append(row_sums)
        else:
            extremes.extend(_block_extremes(t))
    if sums:  # one finiteness test for all the row sums, side by side (a wider dtype holds a narrower's inf and NaN)
        verdicts.append((torch.cat(sums, dim=1) if len(sums) > 1 else sums[0]).isfinite().all(1))
    if extremes:
        verdicts.append(_finite_across(extremes))
    return verdicts[0] if len(verdicts) == 1 else torch.stack(verdicts).all(0)


def _finite_across(vectors: list[Tensor]) -> Tensor:
    """``(b)``: True where every one of the ``(b)`` tensors ``vectors`` (at least one) is finite; one finiteness
    test for all where they share dtype and device."""
    if len({(v.dtype, v.device) for v in vectors}) == 1:
        return torch.stack(vectors).isfinite().all(0)
    return torch.stack([v.isfinite() for v in vectors]).all(0)


def _finite_by_sums(tensors: list[Tensor]) -> Tensor | None:
    r""":func:`finite_blocks`' verdict on a CPU from each block's sum, ``None`` where that proves nothing.

    A sum holds a NaN or an infinity of its block (:math:`\infty - \infty` is NaN), so a finite sum
    proves its block finite; a sum can also overflow on finite entries, which proves nothing. So
    every sum finite (read on the host, free on a CPU) gives the verdict, all True; otherwise
    (nearly never: a block that is not finite, or entries near the dtype's largest) ``None``, and
    the exact reading decides. Plain floating tensors on the CPU only (:func:`_plain`), outside a
    compiled function. One pass over each tensor at the speed of memory, whatever its layout:
    measured on a Zen 5 (2 threads, ``4 × 1024 × 256`` stacks out of cache), 0.09–0.11 ms a float32
    stack against 0.34 for the weighted product, which runs at a matrix-vector product's speed.
    """
    if not all(t.is_floating_point() and host_verdicts(t) and _plain(t) for t in tensors):
        return None  # (a torch.func transform's tensor, or one autograd tracks: the reading below, no host read)
    # float16's sums in float32: a block of ordinary entries sums past its 65504
    sums = [
        t if t.ndim == 1 else t.sum(dim=tuple(range(1, t.ndim)), dtype=torch.float32 if t.dtype == torch.float16 else None)
        for t in tensors
    ]
    ok = _finite_across(sums)
    return ok if bool(ok.all()) else None


#: the weight of :func:`_weighted_row_sums`: a sum of fewer than ``2⁶⁴`` entries times it stays below
#: the largest finite number of float32, float64 and bfloat16, and it is a normal number in each
_FINITE_WEIGHT = 2.0**-64
_FINITE_WEIGHTS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _weighted_row_sums(t: Tensor) -> Tensor | None:
    r"""``(b k)``: sums that are all finite exactly where each block of ``t (b ...)`` is, from one
    matrix-vector product over it.

    Each row's sum of :math:`2^{-64} x` is finite exactly when the row is: a NaN or an infinity
    reaches the sum (:math:`\infty - \infty` is NaN), and finite entries cannot overflow it. One
    read of the tensor at the speed of a product, where ``amax`` and ``amin`` read it twice
    (half the time on a 4 × 1024² stack). ``None`` where it does not apply (fewer than two
    dimensions, another dtype, a layout that is neither row- nor column-major, no blocks or empty ones).
    """
    if t.ndim < 2 or t.dtype not in (torch.float32, torch.float64, torch.bfloat16) or t.numel() == 0:
        return None
    flat = t if t.is_contiguous() else t.mT if t.ndim >= 3 and t.mT.is_contiguous() else None
    if flat is None:
        return None
    n = flat.shape[-1]
    key = (n, t.dtype, t.device)
    w = _FINITE_WEIGHTS.get(key)
    if w is None:
        if len(_FINITE_WEIGHTS) >= 64:  # one entry per width and device: a sweep over many widths must not grow it
            _FINITE_WEIGHTS.clear()
        with torch.inference_mode(False):  # a cached inference tensor could not meet autograd later
            w = _FINITE_WEIGHTS[key] = torch.full((n, 1), _FINITE_WEIGHT, dtype=t.dtype, device=t.device)
    return torch.mm(flat.reshape(-1, n), w).view(t.shape[0], -1)


#: :func:`finite_blocks` tests its tensors at once when they hold at most this many entries in all: the
#: copy into one tensor costs less than the calls it saves only while it is small (measured: a win
#: for one block of 11 K entries, a loss for 64 blocks of them)
_FINITE_AT_ONCE_MAX = 1 << 14


def _small_alike(tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` (each ``b ...``, ``b ≥ 1``) share dtype, device and ``b`` and hold between 1
    and ``_FINITE_AT_ONCE_MAX`` entries in all."""
    first = tensors[0]
    if first.ndim == 0 or first.shape[0] == 0:
        return False
    b, total = first.shape[0], 0
    for t in tensors:
        if t.ndim == 0 or t.shape[0] != b or t.dtype != first.dtype or t.device != first.device:
            return False
        total += t.numel()
    return 0 < total <= _FINITE_AT_ONCE_MAX


def _block_rows(t: Tensor) -> Tensor:
    """``t (b ...)`` as ``(b, entries)``, a view where one exists: a column-major stack of matrices (what
    LAPACK returns) through its transpose, which holds each block's entries in another order."""
    if t.ndim == 3 and not t.is_contiguous() and t.mT.is_contiguous():
        t = t.mT
    return t.reshape(t.shape[0], -1)


def _block_extremes(t: Tensor) -> list[Tensor]:
    """Per block of ``t (b ...)``, ``(b)`` tensors that are all finite exactly when the block is:
    its largest and smallest entries (``t`` itself when 1-D; none for empty blocks)."""
    if t.ndim == 1:
        return [t]
    if t.numel() == 0:  # no blocks, or blocks with no entries (e.g. a rank-0 subspace): trivially finite
        return [torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)]
    return list(block_min_max(t))


def block_min_max(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per block of ``t (b ...)`` (at least one entry a block), its smallest and largest entries, ``(b)`` each, NaN
    where the block holds one. Two reductions: on a CPU ``aminmax`` along a dimension runs 3 to 10 times slower than
    ``amin`` and ``amax`` together (torch 2.13, 2 threads: a ``1 × 2048 × 512`` stack 1.94 against 0.24 ms, ``4 ×
    262144`` 1.19 against 0.12, ``64 × 256`` 24 against 7 µs), where its whole-tensor form is as fast as they."""
    rows = t.flatten(1)  # (an empty stack too: reshape(0, -1) is ambiguous)
    return rows.amin(dim=1), rows.amax(dim=1)


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """One 0-d bool: every tensor of a non-empty list (one device) holds no NaN or infinity (no host synchronisation)."""
    return finite_each(tensors).all()


def finite_each(tensors: Sequence[Tensor]) -> Tensor:
    """``(len(tensors))`` bools, one per tensor of a non-empty list (one device): it holds no NaN or infinity.

    Finite exactly when its extremes (:func:`extremes_each`) are; an empty tensor is finite.
    """
    return extremes_each(tensors).isfinite().all(1)


def extremes_each(tensors: Sequence[Tensor]) -> Tensor:
    """``(len(tensors), 2)``: the smallest and largest entry of each tensor of a non-empty list (one
    device), NaN where it holds one; ``(0, 0)`` for an empty tensor. One pass per tensor (``aminmax``)."""
    if not tensors:
        raise ValueError("extremes_each needs at least one tensor")
    device = tensors[0].device
    extremes = [x for t in tensors for x in (torch.aminmax(t) if t.numel() else (torch.zeros((), device=device),) * 2)]
    return torch.stack(extremes).view(-1, 2)


#: whether a CPU verdict may be read on the host (it waits for nothing there); the test of the
#: device-agnostic path, the one a GPU takes, turns it off
_CPU_HOST_VERDICTS = True


def cpu_all(ok: Tensor) -> bool:
    """``ok`` is on the CPU and every entry is True, read on the host (``False`` on other devices,
    whose verdicts stay there, and inside a compiled function): the CPU's fast paths for a step
    with every block ok."""
    return host_verdicts(ok) and bool(ok.all())


def host_verdicts(ok: Tensor) -> bool:
    """Whether ``ok`` may be read on the host: on the CPU (it waits for nothing there), outside a
    compiled function, and unless the device-agnostic path is under test (``_CPU_HOST_VERDICTS``)."""
    return _CPU_HOST_VERDICTS and ok.device.type == "cpu" and not torch.compiler.is_compiling()


def select_blocks(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``ok[i]`` else ``old``, per block (no host synchronisation off the CPU).

    On a CPU the verdict is read on the host for free: where every block is ok (nearly always)
    the result is ``new`` itself, where none is ``old`` itself (for two tensors of one shape,
    dtype and device), without a pass over both. Callers treat the result as read-only.

    The result is laid out as ``new`` on every path (``torch.where`` lays its result out as its first tensor):
    where ``old`` lies otherwise (a stack loaded from a checkpoint in another layout), no block ok takes the
    general form too, not ``old`` itself. Products that read the result may round by its layout (MKL's on AMD
    processors do), so a device's path and the CPU's then keep the same bits.
    """
    if ok.ndim == 1 and new.shape == old.shape and new.dtype == old.dtype and new.device == old.device and host_verdicts(ok):
        flags = ok.tolist()
        if all(flags):
            return new
        if not any(flags) and old.stride() == new.stride():
            return old
    return torch.where(ok.view(-1, *([1] * (new.ndim - 1))), new, old)


# -- Newton–Schulz orthogonalization ---------------------------------------------------

#: name -> (coefficient tuples, what happens past the list: "cycle" or "repeat_last")
NS_SCHEDULES: dict[str, tuple[tuple[tuple[float, float, float], ...], str]] = {
    "kj": (((3.4445, -4.7750, 2.0315),), "repeat_last"),
    "polar_express": (
        (
            (8.2051, -22.9019, 16.4607),
            (4.0664, -2.8612, 0.5184),
            (3.9096, -2.8234, 0.5250),
            (3.2856, -2.4153, 0.4853),
            (2.2779, -1.6198, 0.3985),
            (1.8726, -1.2307, 0.3585),
            (1.8564, -1.2132, 0.3568),
            (1.8750, -1.2500, 0.3750),
        ),
        "repeat_last",
    ),
    "quintic": (
        (
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ),
        "cycle",
    ),
    "cans": (
        (
            (8.4703, -25.1081, 18.6293),
            (4.1828, -3.1087, 0.5806),
            (3.9619, -2.9541, 0.5630),
            (3.2866, -2.4647, 0.5074),
            (2.2737, -1.6447, 0.4162),
        ),
        "repeat_last",
    ),
    "deepseekv4": ((*([(3.4445, -4.7750, 2.0315)] * 8), (2.0, -1.5, 0.5), (2.0, -1.5, 0.5)), "repeat_last"),
}


#: arithmetic dtypes a config may name (e.g. ``ns_dtype``), by name
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
}


def ns_schedule(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``steps`` coefficient tuples of the named schedule of :data:`NS_SCHEDULES`."""
    if name not in NS_SCHEDULES:
        raise ValueError(f"unknown Newton–Schulz schedule {name!r}; known: {', '.join(NS_SCHEDULES)}")
    schedule, beyond = NS_SCHEDULES[name]
    return ns_coefficients(schedule, steps, beyond)


def ns_coefficients(
    schedule: Sequence[tuple[float, float, float]], steps: int, beyond: str
) -> list[tuple[float, float, float]]:
    """The ``steps`` coefficient tuples of a schedule, extended by ``beyond`` (cycle / repeat_last)."""
    if not schedule:
        raise ValueError("a Newton–Schulz schedule needs at least one (a, b, c) tuple")
    if beyond not in ("cycle", "repeat_last"):
        raise ValueError(f"beyond must be 'cycle' or 'repeat_last', got {beyond!r}")
    out = []
    for k in range(steps):
        if k < len(schedule):
            out.append(tuple(schedule[k]))
        elif beyond == "cycle":
            out.append(tuple(schedule[k % len(schedule)]))
        else:
            out.append(tuple(schedule[-1]))
    return out  # type: ignore[return-value]


def newton_schulz(
    U: Tensor,
    coefficients: Sequence[tuple[float, float, float]],
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    norm: str = "clamp",
    buffers: dict[str, Tensor] | None = None,
    form: str = "standard",
    restarts: Sequence[int] | str = "auto",
) -> Tensor:
    r"""Approximate polar factor of each ``U[i]`` by a quintic Newton–Schulz iteration.

    .. math::
        X_0 = U/\max(\|U\|_F, \epsilon), \qquad
        A = X X^\top,\; X \leftarrow a_k X + (b_k A + c_k A^2) X .

    The iteration runs on the shorter side, in ``dtype``: a tall block takes
    :math:`A = X^\top X` and :math:`X \leftarrow a_k X + X (b_k A + c_k A^2)^\top`, the
    transposes of the wide form's products, so the Gram matrix is ``min(m, n)²`` and the
    output comes back in the block's own layout, with no transposed copy (the same
    values as iterating on ``Xᵀ``). If :math:`U = P\Sigma V^\top` the output
    is :math:`P\,p(\Sigma/\|U\|_F)\,V^\top` with :math:`p` the composed scalar
    quintic, so zero singular values stay zero and ``NS(0) = 0``. The fused
    ``baddbmm`` form matches :func:`torch.optim.Muon`'s ``addmm`` per matrix.
    Frobenius normalisation guarantees :math:`\sigma_{\max}(X_0) \le 1`.

    In bfloat16 every operation rounds its result to bfloat16, products accumulating in float32.
    On a CPU a small batch (``_BF16_EMULATED``) takes that arithmetic in float32 kernels,
    rounding each result: the same roundings, without the fixed cost of a bfloat16 kernel call
    that dominates such blocks (a Muon step on 30 matrices from 8 × 8 to 37 × 66, most of them
    within those bounds: about 0.7 of the time). So does every batch above 16³ multiply-adds on a processor whose bfloat16 products are
    no faster than float32 ones (:func:`_bfloat16_products_fast`). The accumulation order differs,
    so now and then a result rounds the other way, as between any two bfloat16 kernels.

    Args:
        U: ``b m n`` batch.
        coefficients: one ``(a, b, c)`` per iteration.
        eps: floor of the norm (``norm="clamp"``) or added to it (``"add"``).
        dtype: arithmetic dtype of the iteration.
        norm: ``"clamp"`` (torch.optim.Muon) or ``"add"`` (KellerJordan/Muon).
        buffers: where the caller keeps the iteration's buffers from one call to the next (filled on the first
            call, taken again where shape, dtype and device match): its iterates, Gram matrix and polynomial, so
            that a call allocates nothing. The result is one of them, valid until the next call with the same
            dict. Only for a ``U`` the iteration may run in place for (not tracked by autograd or ``torch.func``,
            not a subclass), outside ``torch.compile``, and not for a float16 iteration; ignored otherwise.
        form: ``"standard"`` iterates on the blocks themselves; ``"gram"`` on their Gram matrices
            (:func:`_gram_iteration`) wherever that takes fewer multiply-adds (:func:`gram_pays`; elsewhere the
            standard form runs), in ``buffers`` where they are given. The same polynomial, other roundings.
        restarts: the Gram form's restarts: before each of these iterations (``1 ≤ i < len(coefficients)``)
            the iterate is formed and its Gram matrix taken anew; no stretch between them may run more than
            ``GRAM_SEGMENT_MAX`` iterations. ``"auto"``: the fewest that allow, the shorter stretches first
            (:func:`ns_restarts`; 5 iterations: before the third).

    Returns:
        ``b m n`` in ``dtype``.

    References:
        Jordan et al., Muon (2024); Amsel et al., Polar Express, arXiv 2505.16932.
    """
    if (twin := compiled.variant("newton_schulz")) is not None: return twin(U, coefficients, eps=eps, dtype=dtype, norm=norm, form=form, restarts=restarts if isinstance(restarts, str) else tuple(restarts))  # noqa: E701
    _check_batched("U", U)
    _check_ns_call(norm, form)
    if form == "gram":
        restarts = ns_restarts(restarts, len(coefficients))
    gram = form == "gram" and gram_pays(*U.shape[-2:], len(coefficients), restarts)  # type: ignore[arg-type]
    emulated = _bfloat16_in_float32(U, dtype)
    # float16's range ends at 65504: a momentum cast first, or its norm, would overflow (a zero or NaN step) and
    # tiny entries would lose their digits, so it is normalised in a wider dtype and cast after (the iteration is
    # scale-invariant; only the input's rounding moves)
    narrow = dtype == torch.float16 and not emulated
    if (emulated or buffers is not None) and not narrow and _plain(U) and not torch.compiler.is_compiling():
        return _newton_schulz_in_buffers(
            U, coefficients, eps=eps, norm=norm, dtype=dtype, rounded=emulated, kept=buffers, restarts=restarts if gram else None  # type: ignore[arg-type]
        )
    # the functional form, each result a new tensor. bfloat16 arithmetic: each operation rounds its result to
    # bfloat16 (products accumulate in float32 in between), whether the kernels run in bfloat16 or in float32
    # (``emulated``, here only for a ``U`` that is not _plain)
    rnd = _round_to_bfloat16 if emulated else (lambda t: t)
    X = rnd(U.to(torch.float32)) if emulated else U.to(torch.promote_types(U.dtype, torch.float32) if narrow else dtype)
    tall = U.shape[-2] > U.shape[-1]
    nrm = rnd(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True))
    X = rnd(X / rnd(nrm.clamp(min=eps) if norm == "clamp" else nrm + eps))
    if narrow:
        X = X.to(dtype)
    if gram:
        X = _gram_iteration(X, coefficients, restarts, rnd)  # type: ignore[arg-type]
    for a, b, c in () if gram else coefficients:
        A = rnd(torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT))  # matmul's kernel without its views (mm)
        B = rnd(torch.baddbmm(A, A, A, beta=b, alpha=c))
        X = rnd(torch.baddbmm(X, X, B.mT, beta=a) if tall else torch.baddbmm(X, B, X, beta=a))
    return X.to(dtype) if emulated else X


def newton_schulz_each(
    Us: Sequence[Tensor],
    coefficients: Sequence[tuple[float, float, float]],
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    norm: str = "clamp",
    form: str = "standard",
    restarts: Sequence[int] | str = "auto",
) -> list[Tensor]:
    """:func:`newton_schulz` of each of ``Us`` (batches of any shapes), the same bits: those whose bfloat16
    arithmetic runs in float32 kernels (:func:`_bfloat16_in_float32`) in the standard iteration go together, their
    iterations interleaved, each product in its turn and each rounding of them all two copies of one arena of their
    buffers (:func:`_newton_schulz_in_arenas`); every other one alone. On many small blocks the calls, not the
    products, are the iteration's cost."""
    _check_ns_call(norm, form)
    out: list[Tensor | None] = [None] * len(Us)
    together: list[int] = []
    if compiled.variant("newton_schulz") is None and not torch.compiler.is_compiling():
        steps = len(coefficients)
        plan = ns_restarts(restarts, steps) if form == "gram" else ()
        for i, U in enumerate(Us):
            _check_batched("U", U)
            gram = form == "gram" and gram_pays(*U.shape[-2:], steps, plan)
            if not gram and _bfloat16_in_float32(U, dtype) and _plain(U):
                together.append(i)
    if len(together) > 1:
        made = _newton_schulz_in_buffers_each(
            [Us[i] for i in together], coefficients, eps=eps, norm=norm, dtype=dtype, rounded=True,
            kept=[None] * len(together),
        )
        for i, O in zip(together, made):
            out[i] = O
    return [
        newton_schulz(U, coefficients, eps=eps, dtype=dtype, norm=norm, form=form, restarts=restarts) if O is None else O
        for U, O in zip(Us, out)
    ]


def _check_ns_call(norm: str, form: str) -> None:
    """:func:`newton_schulz`'s checks of its ``norm`` and ``form``."""
    if norm not in ("clamp", "add"):
        raise ValueError(f"norm must be 'clamp' or 'add', got {norm!r}")
    if form not in NS_FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, NS_FORMS))}, got {form!r}")


#: the forms of :func:`newton_schulz` (a config's ``ns_form``)
NS_FORMS = ("standard", "gram")


#: the most iterations the Gram form of :func:`newton_schulz` runs without a restart. Its Gram matrix drifts in
#: low precision (a rank-deficient block's rounded zero eigenvalues turn negative and grow under the polynomial):
#: measured in bfloat16 on a rank-one 8 × 40 block with the kj schedule, the result's spectral norm was about 1.2
#: (the standard form's) where no stretch ran more than 3, 80 after a stretch of 4 and 6e11 after one of 5; and a
#: zero row's entry of the accumulated polynomial grows as the product of the stretch's ``a`` (in float16, past
#: its range after 9 of kj's), where ``inf · 0`` would make it NaN
GRAM_SEGMENT_MAX = 3


def ns_restarts(restarts: Sequence[int] | str, steps: int) -> tuple[int, ...]:
    """The Gram form's restarts for ``steps`` iterations: ``"auto"`` gives the fewest that leave no stretch longer
    than :data:`GRAM_SEGMENT_MAX` iterations, the shorter stretches first (5: ``(2,)``, 7: ``(2, 4)``); a list
    comes back sorted, its repeats dropped, after the checks (each an integer in ``[1, steps)``, no stretch too
    long; a ``ValueError`` that names the problem otherwise)."""
    if isinstance(restarts, str):
        if restarts != "auto":
            raise ValueError(f"Newton–Schulz restarts must be 'auto' or a list of iterations, got {restarts!r}")
        count = -(-steps // GRAM_SEGMENT_MAX)  # stretches
        sizes = [steps // count + (k >= count - steps % count) for k in range(count)]
        return tuple(itertools.accumulate(sizes[:-1]))
    if any(isinstance(i, bool) or not isinstance(i, int) for i in restarts):
        raise ValueError(f"Newton–Schulz restarts must be integers, got {list(restarts)}")
    out = tuple(sorted(set(restarts)))
    if any(not 1 <= i < steps for i in out):
        raise ValueError(f"Newton–Schulz restarts must lie in [1, {steps}) for {steps} iterations, got {list(restarts)}")
    edges = (0, *out, steps)
    if (longest := max(b - a for a, b in zip(edges[:-1], edges[1:]))) > GRAM_SEGMENT_MAX:
        raise ValueError(
            f"Newton–Schulz restarts {list(out)} leave {longest} iterations without a restart, more than "
            f"{GRAM_SEGMENT_MAX} (the Gram matrix drifts in low precision; 'auto' chooses them)"
        )
    return out


#: schedules whose composed polynomial has no margin above a singular value of 1 (spec muon.md §4's ``cans``: from
#: 1 + 1e-5 it gives 2.6 at 5 steps and 7.7e6 at 7, where ``polar_express`` folds in a safety factor of 1.01), refused
#: with an iteration dtype other than float64: the rounding of a rank-one block's normalised input (its one singular
#: value, 1 exactly before the rounding) and of the first products reaches that in bfloat16 (a muon step of 1e11 × lr
#: on a 7 × 1 block) and in float32 on wide blocks (25–91 × lr on 1024², 1e8 × lr on 2048²)
NS_NO_MARGIN = ("cans",)


def check_ns_options(
    form: str, restarts: Sequence[int] | str, steps: int, coefficients: str | None = None, dtype: str | None = None,
    *, names: tuple[str, str] = ("coefficients", "ns_dtype"), also: Sequence[str] = (),
) -> None:
    """A stage's Newton–Schulz options checked as :func:`newton_schulz` will read them: under the Gram form, its
    restart plan for ``steps`` iterations (:func:`ns_restarts`); a schedule of :data:`NS_NO_MARGIN` with an iteration
    dtype other than float64 (``names``: the two options as the stage calls them). One ``ValueError`` that names
    each problem, after the stage's own other problems ``also`` (a :class:`~kronopt.validators.Problems`, which
    holds each apart)."""
    problems = list(also)
    if coefficients in NS_NO_MARGIN and dtype is not None and dtype != "float64":
        problems.append(
            f"{names[0]} = {coefficients!r} needs {names[1]} = 'float64', got {dtype!r}: the schedule has no margin above "
            f"a singular value of 1, where the rounding of a rank-one block's normalised input puts it, and its "
            f"polynomial diverges there (use 'polar_express', which folds in a margin of 1.01, in {dtype})"
        )
    if form == "gram":
        try:
            ns_restarts(restarts, steps)
        except ValueError as exc:
            problems.append(f"ns_restarts (ns_form = 'gram'): {exc}")
    if problems:
        raise Problems(problems)  # a ValueError whose problems a config lists apart


def gram_pays(m: int, n: int, steps: int, restarts: Sequence[int]) -> bool:
    r"""Whether the Gram form of :func:`newton_schulz` takes fewer multiply-adds than the standard form on an
    ``m × n`` block (short side :math:`s`, long side :math:`l`, :math:`k` iterations, :math:`g` segments between
    restarts): the standard form takes :math:`k (2 s^2 l + s^3)`, the Gram form :math:`2 g s^2 l + (4k - 3g) s^3`
    (per segment a Gram product and a product with the block, per iteration the square of the Gram matrix, the
    accumulated polynomial's product (none in a segment's first iteration) and the two that carry the Gram
    matrix on (none in its last)). With 5 iterations and one restart: where :math:`l > 1.5 s`."""
    s, l = sorted((m, n))
    segments = len(restarts) + 1
    return steps > 0 and 2 * segments * s * s * l + (4 * steps - 3 * segments) * s**3 < steps * (2 * s * s * l + s**3)


def _gram_iteration(
    X: Tensor, coefficients: Sequence[tuple[float, float, float]], restarts: Sequence[int], rnd: Callable[[Tensor], Tensor],
    buffer: Callable[[str, tuple[int, ...]], Tensor] | None = None,
) -> Tensor:
    r"""Newton–Schulz on the Gram matrix: for a wide ``X`` (short side :math:`s`) each iteration multiplies the
    iterate by :math:`P = aI + bR + cR^2`, a polynomial of its Gram matrix :math:`R = X X^\top`, so the
    iterates are :math:`Q X_0` with :math:`Q` the product of the :math:`P`, and the Gram matrix follows as
    :math:`R \leftarrow P R P` (the :math:`P` commute with :math:`R`). Only ``s × s`` matrices are
    multiplied until the end, :math:`X = Q X_0`. A restart forms the iterate and takes its Gram matrix anew:
    in low precision :math:`R` drifts from a Gram matrix (a rounded zero eigenvalue turns negative and then
    grows under the polynomial), which a restart resets. A tall ``X`` takes :math:`X^\top X` and :math:`X Q^\top`,
    the transposes of the wide form's products. ``X`` is normalised already; ``rnd`` rounds each result
    (the emulated bfloat16 arithmetic of :func:`newton_schulz`, or nothing; it may round in place). ``buffer(name,
    shape)`` (:func:`_newton_schulz_in_buffers`'s): where each result goes, so that nothing is allocated, ``X`` then
    being its buffer ``"X"``; without it each result is a new tensor. The same operations either way."""
    tall = X.shape[-2] > X.shape[-1]
    side = min(X.shape[-2:])
    square = (X.shape[0], side, side)
    names = {"iterate": "X", "Q": "Q1"}  # the buffers last written: the next result goes to the other of each pair

    def out(name: str, shape: tuple[int, ...] = square) -> Tensor | None:
        return None if buffer is None else buffer(name, shape)

    def other(kind: str, pair: tuple[str, str]) -> Tensor | None:
        names[kind] = pair[names[kind] == pair[0]]
        return out(names[kind], square if kind == "Q" else tuple(X.shape))

    def gram_of(X: Tensor) -> Tensor:
        return rnd(torch.bmm(X.mT, X, out=out("A")) if tall else torch.bmm(X, X.mT, out=out("A")))

    def times(Q: Tensor, X: Tensor) -> Tensor:
        Y = other("iterate", ("X", "Y"))
        return rnd(torch.bmm(X, Q.mT, out=Y) if tall else torch.bmm(Q, X, out=Y))

    R, Q = gram_of(X), None
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:
            X = times(Q, X)  # type: ignore[arg-type]  # a restart comes after an iteration: Q is made
            R, Q = gram_of(X), None
        Z = rnd(torch.baddbmm(R, R, R, beta=b, alpha=c, out=out("B")))  # P - aI; a stays out of the products' roundings
        if Q is None:
            first = other("Q", ("Q0", "Q1"))
            Q = Z.clone() if first is None else first.copy_(Z)
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
            Q = rnd(Q)
        else:
            Q = rnd(torch.baddbmm(Q, Q, Z, beta=a, out=other("Q", ("Q0", "Q1"))))  # Q P
        if i < last and i + 1 not in restarts:
            RP = rnd(torch.baddbmm(R, R, Z, beta=a, out=out("RP")))  # R P
            R = rnd(torch.baddbmm(RP, Z, RP, beta=a, out=out("A")))  # P R P, over R (read no more)
    return times(Q, X)  # type: ignore[arg-type]


#: on a CPU, Newton–Schulz in bfloat16 runs its products in float32 kernels (each result rounded to
#: bfloat16) when its Gram product makes more than ``_BF16_EMULATED[0]`` and at most
#: ``_BF16_EMULATED[1]`` multiply-adds (the batch's): above 16³ torch hands a bfloat16 product to
#: oneDNN, whose fixed cost (about 25 µs a call) dwarfs a small product, and from about 2²⁰ on the
#: float32 kernels' flops cost more. Measured on a 2-core Intel Xeon with AMX, the whole iteration: 0.45–0.75
#: of the bfloat16 kernels' time from 2¹³ to 2¹⁹ multiply-adds, about even at 2²⁰ to 2²¹. That holds
#: where the bfloat16 kernels outrun the float32 ones; where they do not
#: (:func:`_bfloat16_products_fast`), every size above the lower bound (16³) takes the float32 kernels.
#: On an AMD EPYC (Zen 4, ``avx512_bf16``; the seventy-fourth session) the bfloat16 kernels below the upper bound
#: took pro_kl_shampoo's step on the 30 small matrices (Gram products of 2⁹ to 2¹⁷) to 1.16 × its time in the float32
#: kernels, stepped in turn in one process: the bounds hold there.
_BF16_EMULATED = (16**3, 2**20)


def _bfloat16_products_fast() -> bool:
    """Whether this processor multiplies bfloat16 matrices faster than float32 ones, read from its x86
    ``flags``: with AMX (``amx_bf16``), or on an AMD processor with AVX-512 bfloat16 dot products
    (``avx512_bf16``, Zen 4 on). Measured on 2 cores, torch 2.13 (oneDNN for bfloat16, MKL for float32):
    an Intel Xeon with AMX ran bfloat16 products several times faster than float32 ones; an AMD EPYC
    (Zen 4) 356–389 GFLOP/s against 80–157, and one of Zen 5 ran Newton–Schulz on the presets' stacks
    (``4 × 256 × 256`` to ``4 × 1024 × 256``) 3.5–4.2 times faster in them; an Intel Xeon whose virtual
    machine exposes ``avx512_bf16`` and not AMX about 150 against 236–263 on most shapes (oneDNN's
    ``avx512_core_bf16`` kernels), so there Newton–Schulz in float32 kernels took 0.69–0.96 of its
    time in bfloat16 ones on the presets' shapes (``4 × 256 × 256`` to ``1024 × 1024``). Two
    assumptions, not measured: that a processor without bfloat16 dot products (no ``avx512_bf16``)
    is slower still in bfloat16, its kernels converting to float32 themselves; and that where the
    file names no x86 flags (it cannot be read, or another architecture) the bound measured on the
    AMX Xeon (``_BF16_EMULATED``) holds."""
    processor = _processor()
    if not processor.flags:
        return True
    return "amx_bf16" in processor.flags or (processor.vendor == "AuthenticAMD" and "avx512_bf16" in processor.flags)


def _bfloat16_in_float32(U: Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`newton_schulz` runs its bfloat16 arithmetic in float32 kernels (see ``_BF16_EMULATED``).

    Not inside ``torch.compile``: Inductor fuses a ``float32 → bfloat16 → float32`` round trip away (its
    ``emulate_precision_casts`` is off by default), so the compiled twin keeps the bfloat16 kernels.
    """
    if dtype != torch.bfloat16 or U.device.type != "cpu" or U.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.compiler.is_compiling():
        return False
    short, long = sorted(U.shape[-2:])
    work = math.prod(U.shape[:-2]) * short * short * long  # the Gram product's multiply-adds
    return _BF16_EMULATED[0] < work and (work <= _BF16_EMULATED[1] or not _bfloat16_products_fast())


def _plain(U: Tensor) -> bool:
    """Whether ``U`` is a plain tensor that no autograd mode tracks: not a subclass (``DTensor``), not
    wrapped by a ``torch.func`` transform (``vmap``, ``grad``), no forward-mode tangent, not requiring
    a gradient where grad mode is on. Such a tensor's iteration may run with ``out=`` and in place."""
    return (
        type(U) is torch.Tensor
        and not (torch.is_grad_enabled() and U.requires_grad)
        and not torch._C._functorch.is_functorch_wrapped_tensor(U)
        and torch.autograd.forward_ad.unpack_dual(U).tangent is None
    )


def _newton_schulz_in_buffers(
    U: Tensor, coefficients: Sequence[tuple[float, float, float]], *, eps: float, norm: str, dtype: torch.dtype,
    rounded: bool, kept: dict[str, Tensor] | None = None, restarts: Sequence[int] | None = None,
) -> Tensor:
    """:func:`newton_schulz` in buffers of its own, for a :func:`_plain` ``U`` (``out=`` and in place): the
    iterates alternate between two buffers and the Gram matrix and its polynomial take one each, so an iteration
    allocates nothing; with ``kept`` (the caller's dict) no call does. The same kernels on the same operands as
    the functional form, so the same values.

    ``rounded`` (:func:`_bfloat16_in_float32`): bfloat16 arithmetic in float32 kernels, every result rounded to
    bfloat16 in place through one bfloat16 scratch the size of ``U``: for a contiguous ``U`` the same values as
    rounding each result into a new tensor (:func:`_round_to_bfloat16`), with fewer passes over memory (on an
    Intel Xeon without AMX, where every batch of a Muon step takes this path, its step took 0.92–0.93 of the
    time of the functional form: 4 layers of d = 256, stepped in turn, the same weights bit for bit). A ``U``
    of other strides (a transposed view) is read into contiguous memory first, where the functional form's
    first products read it as it lies; the products' sums may then run in another order and round a few
    entries the other way, in any dtype (float32: about 1e-6 relative), equally the dtype's arithmetic."""
    return _newton_schulz_in_buffers_each(
        [U], coefficients, eps=eps, norm=norm, dtype=dtype, rounded=rounded, kept=[kept], restarts=restarts
    )[0]


def _newton_schulz_in_buffers_each(
    Us: Sequence[Tensor], coefficients: Sequence[tuple[float, float, float]], *, eps: float, norm: str,
    dtype: torch.dtype, rounded: bool, kept: Sequence[dict[str, Tensor] | None], restarts: Sequence[int] | None = None,
) -> list[Tensor]:
    """:func:`_newton_schulz_in_buffers` of each of ``Us`` (``kept``: each one's dict, or ``None``), the iterations of
    them all interleaved, each product in its turn, each rounding of their results (``rounded``) made for them all
    at once. Each result is the one it has alone: a product reads the same values, and a copy rounds each entry alone.

    Several blocks rounded in the standard form with no kept buffers (:func:`newton_schulz_each`'s) keep each kind of
    buffer (iterates, Gram matrices, polynomials, norms) as 64-byte-aligned views into one zeroed arena of its own
    (:func:`_aligned_views`), so that a rounding of them all is two copies of an arena (position-free: the float32
    to bfloat16 conversion rounds each entry alone, tested entry by entry) and a product reads an aligned view as it
    reads a tensor of its own (MKL rounds a product by its operands' alignment, not by their place: the same bits
    as each block's own buffers, measured on every shape of the small set at shuffled offsets); else each block's
    buffers are its own, rounded in one pair of ``foreach`` copies through their bfloat16 scratches."""
    work = torch.float32 if rounded else dtype
    tall = [U.shape[-2] > U.shape[-1] for U in Us]
    square = [(U.shape[0], min(U.shape[-2:]), min(U.shape[-2:])) for U in Us]
    if rounded and len(Us) > 1 and restarts is None and all(k is None for k in kept):
        return _newton_schulz_in_arenas(Us, coefficients, eps=eps, norm=norm, tall=tall, square=square)

    def buffer(
        U: Tensor, keep: dict[str, Tensor] | None, name: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> Tensor:
        t = None if keep is None else keep.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != U.device:
            with torch.inference_mode(False):  # a kept buffer serves later calls outside that mode too
                t = torch.empty(shape, dtype=dtype, device=U.device)
            if keep is not None:
                keep[name] = t
        return t

    X = [buffer(U, k, "X", U.shape, work) for U, k in zip(Us, kept)]
    Y = [buffer(U, k, "Y", U.shape, work) for U, k in zip(Us, kept)]
    A = [buffer(U, k, "A", shape, work) for U, k, shape in zip(Us, kept, square)]
    B = [buffer(U, k, "B", shape, work) for U, k, shape in zip(Us, kept, square)]
    if rounded:
        scratch = [buffer(U, k, "half", U.shape, torch.bfloat16) for U, k in zip(Us, kept)]
        halves: dict[tuple[int, torch.Size], Tensor] = {}  # each scratch's view of each shape rounded, made once

        def half(j: int, t: Tensor) -> Tensor:
            view = halves.get((j, t.shape))
            if view is None:
                view = halves[j, t.shape] = scratch[j].view(-1)[: t.numel()].view(t.shape)
            return view

        def rnd_each(ts: Sequence[Tensor]) -> Sequence[Tensor]:  # each t rounded to the nearest bfloat16, in place
            hs = [half(j, t) for j, t in enumerate(ts)]
            torch._foreach_copy_(hs, ts)
            torch._foreach_copy_(ts, hs)  # type: ignore[arg-type]
            return ts

        source = [
            x.copy_(U) if U.dtype == torch.bfloat16 else x.copy_(h.copy_(U)) for x, U, h in zip(X, Us, scratch)
        ]
    else:
        def rnd_each(ts: Sequence[Tensor]) -> Sequence[Tensor]:
            return ts

        # normalised straight into X where no cast comes first
        source = [U if U.dtype == work else x.copy_(U) for x, U in zip(X, Us)]
    nrm = rnd_each([torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) for x in source])
    nrm = rnd_each([t.clamp_(min=eps) if norm == "clamp" else t.add_(eps) for t in nrm])
    rnd_each([torch.div(x, t, out=out) for x, t, out in zip(source, nrm, X)])
    if restarts is not None:  # the Gram form, its results in buffers of the same dicts, each in its turn
        out = []
        for j, (U, k) in enumerate(zip(Us, kept)):
            x = _gram_iteration(
                X[j], coefficients, restarts,
                (lambda t, j=j: t.copy_(half(j, t).copy_(t))) if rounded else (lambda t: t),
                lambda name, shape, U=U, k=k: buffer(U, k, name, shape, work),
            )
            out.append(scratch[j].copy_(x) if rounded else x)
        return out
    X = _standard_iterations(X, Y, A, B, tall, coefficients, rnd_each if rounded else None)
    return [h.copy_(x) for h, x in zip(scratch, X)] if rounded else X


def _standard_iterations(
    X: list[Tensor], Y: list[Tensor], A: list[Tensor], B: list[Tensor], tall: list[bool],
    coefficients: Sequence[tuple[float, float, float]], rnd_each: Callable[[list[Tensor]], Any] | None,
) -> list[Tensor]:
    """The standard Newton–Schulz iterations of each block from its normalised iterate ``X`` (``Y``: the other
    iterate's buffer, ``A`` and ``B`` the Gram matrix's and the polynomial's), the blocks interleaved; ``rnd_each``
    rounds each result of them all to bfloat16 in place (the last iterate is left to the caller's conversion).
    Returns the buffers holding the last iterates."""
    for i, (a, b, c) in enumerate(coefficients):
        made = [torch.bmm(x.mT, x, out=g) if t else torch.bmm(x, x.mT, out=g) for x, g, t in zip(X, A, tall)]
        if rnd_each is not None:
            rnd_each(made)
        made = [torch.baddbmm(g, g, g, beta=b, alpha=c, out=p) for g, p in zip(A, B)]
        if rnd_each is not None:
            rnd_each(made)
        for x, p, y, t in zip(X, B, Y, tall):
            torch.baddbmm(x, x, p.mT, beta=a, out=y) if t else torch.baddbmm(x, p, x, beta=a, out=y)
        X, Y = Y, X
        if rnd_each is not None and i < len(coefficients) - 1:
            rnd_each(X)  # the last one rounds in the conversion that follows
    return X


def _newton_schulz_in_arenas(
    Us: Sequence[Tensor], coefficients: Sequence[tuple[float, float, float]], *, eps: float, norm: str,
    tall: list[bool], square: list[tuple[int, int, int]],
) -> list[Tensor]:
    """:func:`_newton_schulz_in_buffers_each` of several blocks rounded in the standard form, each kind of buffer a
    set of aligned views into one arena (:func:`_aligned_views`), each rounding of them all two copies of an arena."""
    device = Us[0].device
    shapes = [tuple(U.shape) for U in Us]
    (x_arena, X), (y_arena, Y) = _aligned_views(shapes, device), _aligned_views(shapes, device)
    (a_arena, A), (b_arena, B) = _aligned_views(square, device), _aligned_views(square, device)
    n_arena, nrm = _aligned_views([(U.shape[0], 1, 1) for U in Us], device)
    halves = {x_arena.numel(): torch.empty_like(x_arena, dtype=torch.bfloat16)}
    halves.setdefault(a_arena.numel(), torch.empty_like(a_arena, dtype=torch.bfloat16))
    halves.setdefault(n_arena.numel(), torch.empty_like(n_arena, dtype=torch.bfloat16))
    arenas = {t.data_ptr(): t for t in (x_arena, y_arena, a_arena, b_arena, n_arena)}

    def rnd_each(ts: list[Tensor]) -> None:  # the arena the views lie in (its first one at its start), rounded
        arena = arenas[ts[0].data_ptr()]
        arena.copy_(halves[arena.numel()].copy_(arena))

    for x, U in zip(X, Us):
        x.copy_(U)
    rnd_each(X)  # a bfloat16 input is kept as it is: its rounding changes nothing
    for x, t in zip(X, nrm):
        torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, out=t)
    rnd_each(nrm)
    n_arena.clamp_(min=eps) if norm == "clamp" else n_arena.add_(eps)
    rnd_each(nrm)
    for x, t in zip(X, nrm):
        torch.div(x, t, out=x)
    rnd_each(X)
    X = _standard_iterations(X, Y, A, B, tall, coefficients, rnd_each)
    last = x_arena if X[0].data_ptr() == x_arena.data_ptr() else y_arena
    whole = halves[x_arena.numel()].copy_(last)
    return _aligned_views(shapes, device, whole)[1]


def _aligned_views(
    shapes: Sequence[tuple[int, ...]], device: torch.device, arena: Tensor | None = None
) -> tuple[Tensor, list[Tensor]]:
    """A zeroed float32 arena (or ``arena``, of the size this makes) and a view of it of each shape, each starting
    at a multiple of 16 entries (64 bytes of float32) past the arena's start, which the allocator aligns to 64
    bytes: a product reads such a view as it reads a tensor of its own."""
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += -(-math.prod(shape) // 16) * 16
    if arena is None:
        with torch.inference_mode(False):
            arena = torch.zeros(total, dtype=torch.float32, device=device)
    return arena, [arena[o : o + math.prod(shape)].view(shape) for o, shape in zip(offsets, shapes)]


def _round_to_bfloat16(t: Tensor) -> Tensor:
    """``t`` (float32) rounded to the nearest bfloat16, kept in float32."""
    return t.to(torch.bfloat16).to(torch.float32)


def muon_scale(m: int, n: int, rule: str) -> float:
    """Shape factor ``s`` of an orthogonalized ``m × n`` update (muon spec §5)."""
    if rule == "original":
        return math.sqrt(max(1.0, m / n))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "spectral":
        return math.sqrt(max(m, n))
    if rule == "unit_rms_norm":
        return math.sqrt(m / n)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown scale rule {rule!r}")


MUON_SCALES: tuple[str, ...] = ("original", "match_rms_adamw", "spectral", "unit_rms_norm", "none")


# -- Kronecker approximation of a second moment (DyKAF, the Fisher lab) -----------------------
#
# Convention (dykaf spec §1): vec is row-major, vec(G)[i·n + j] = G[i, j], so a
# Kronecker product L ⊗ R acts with L (m m) on the rows and R (n n) on the columns,
# and vec(A X B) = (A ⊗ Bᵀ) vec(X).


def _tiny(X: Tensor) -> float:
    return torch.finfo(X.dtype).tiny


def sandwich(G: Tensor, X: Tensor, *, narrow: "NarrowProducts | None" = None) -> Tensor:
    r""":math:`G X G^\top`: ``b m n, b n n2, b m2 n2 -> b m m2``, symmetrised.

    By the identity :math:`(G \otimes G)\,\mathrm{vec}\,X = \mathrm{vec}(G X G^\top)`
    this is the rearranged rank-one second moment :math:`\mathcal R(\mathrm{vec}\,G\,
    \mathrm{vec}\,G^\top) = G \otimes G` applied to ``vec X`` without forming the
    ``m² × n²`` matrix. Cost :math:`mn(m+n)` multiply-adds per block, less where
    :func:`split_sandwich` pays (:func:`split_pays`: ``X`` the larger side, on CPU).

    Args:
        G: ``b m n`` batch.
        X: ``b n n`` symmetric batch.
        narrow: the products' narrow form (DyKAF's ``product_dtype``; ``G`` already its rounded operand,
            :meth:`NarrowProducts.operand`): ``X`` and each product's result rounded to it, the split not taken.

    Returns:
        ``b m m``, exactly symmetric.

    Invariants:
        equals ``rearrange_kron(vec G vec Gᵀ) @ vec X`` (``tests/unit/test_projector_splitting.py``).
    """
    _check_batched("G", G)
    _check_batched_square("X", X)
    if X.shape[-1] != G.shape[-1]:
        raise ValueError(f"sandwich needs X of shape (b {G.shape[-1]} {G.shape[-1]}), got {tuple(X.shape)}")
    if narrow is not None:  # G rounded (its operand), X and each product rounded; no split (its middle is halved)
        return sym(narrow.back(narrow.mm(narrow.mm(G, narrow.operand(X)), G.mT)))
    return split_sandwich(G, X) if split_pays(G, X) else sym(mm(mm(G, X), G.mT))


def sandwich_t(G: Tensor, Y: Tensor, *, narrow: "NarrowProducts | None" = None) -> Tensor:
    r""":math:`G^\top Y G`: ``b m n, b m m2, b m2 n2 -> b n n2``, symmetrised.

    The adjoint of :func:`sandwich`: :math:`(G \otimes G)^\top \mathrm{vec}\,Y = \mathrm{vec}(G^\top Y G)`,
    taken from ``Y``'s lower tiles where that pays (:func:`split_sandwich`); ``narrow`` as :func:`sandwich`'s.
    """
    _check_batched("G", G)
    _check_batched_square("Y", Y)
    if Y.shape[-1] != G.shape[-2]:
        raise ValueError(f"sandwich_t needs Y of shape (b {G.shape[-2]} {G.shape[-2]}), got {tuple(Y.shape)}")
    return sandwich(G.mT, Y, narrow=narrow) if narrow is not None else (
        split_sandwich(G.mT, Y) if split_pays(G.mT, Y) else sym(mm(mm(G.mT, Y), G))
    )


def rearrange_kron(A: Tensor, m: int, n: int) -> Tensor:
    r"""Van Loan–Pitsianis rearrangement :math:`\mathcal R: \mathbb R^{mn\times mn} \to \mathbb R^{m^2 \times n^2}`.

    .. math::
        \mathcal R(A)[(i,k),(j,l)] = A[(i,j),(k,l)],

    i.e. view ``A`` as ``(m n m2 n2)``, permute to ``(m m2 n n2)`` and reshape
    (einops ``"... (m n) (m2 n2) -> ... (m m2) (n n2)"``). It permutes entries, so
    :math:`\|A - L\otimes R\|_F = \|\mathcal R(A) - \mathrm{vec}\,L\,\mathrm{vec}\,R^\top\|_F`,
    :math:`\mathcal R(L \otimes R) = \mathrm{vec}\,L\,\mathrm{vec}\,R^\top` and
    :math:`\mathcal R(\mathrm{vec}\,G\,\mathrm{vec}\,G^\top) = G \otimes G`.

    Args:
        A: ``(... mn mn)``.
        m, n: the block shape.

    Returns:
        ``(... m² n²)``.

    References:
        Van Loan & Pitsianis, *Approximation with Kronecker products* (1993).
    """
    if A.ndim < 2 or A.shape[-1] != m * n or A.shape[-2] != m * n:
        raise ValueError(f"rearrange_kron needs (... {m * n} {m * n}) for m={m}, n={n}, got {tuple(A.shape)}")
    lead = A.shape[:-2]
    X = A.reshape(*lead, m, n, m, n).movedim(-3, -2)  # (... m m2 n n2)
    return X.reshape(*lead, m * m, n * n)


def kron_rows(L: Tensor, R: Tensor) -> Tensor:
    r""":math:`L \otimes R` for the row-major vec convention, ``b m m, b n n -> b (m n) (m n)`` (dense; for small blocks)."""
    _check_batched_square("L", L)
    _check_batched_square("R", R)
    b, m, n = L.shape[0], L.shape[-1], R.shape[-1]
    return (L[:, :, None, :, None] * R[:, None, :, None, :]).reshape(b, m * n, m * n)


def power_of_two_scale(*norms: Tensor) -> Tensor:
    r"""Per block, the power of two :math:`2^{-e}` that brings the largest of ``norms`` (one shape
    each, e.g. ``b 1 1``) into :math:`[1/2, 1)`; 1 where they are all 0, NaN where one is infinite
    or NaN (a norm past the dtype's range: what is scaled by it is then not finite, which the
    optimizer's guard refuses, as it refuses the plain computation's overflow).

    Multiplying by a power of two is exact. A computation homogeneous in its inputs (the
    rank-one trackers: every input times :math:`\lambda`, every output times :math:`\lambda`)
    can therefore run on inputs brought near norm 1 and be scaled back, with the same bits
    wherever the plain computation stays in range, and where it would not: there the squares
    behind its Frobenius norms overflow (float32: a norm past about ``1.8e19``, which DyKAF's
    ``‖K‖`` reaches from gradient entries between ``1e8`` and ``4e8`` on a ``1024 × 256`` block)
    or underflow. ``e`` is clamped to a quarter of the dtype's exponent range (±60 in float32),
    so the scale, its square and their inverses are normal numbers."""
    top = norms[0]
    for norm in norms[1:]:
        top = torch.maximum(top, norm)  # NaN where either is
    return torch.where(top.isfinite(), _power_of_two_toward_one(top, _scale_limit(top.dtype)), torch.nan)


def _scale_limit(dtype: torch.dtype) -> int:
    """The largest exponent :func:`power_of_two_scale` scales by (60 in float32)."""
    return math.frexp(torch.finfo(dtype).max)[1] // 2 - 4


def empty_state_norm(dtype: torch.dtype) -> float:
    r"""The norm below which a rank-one tracker's state (DyKAF's ``‖R‖``, ``‖L‖``) holds nothing and starts again
    (about ``2^-73.3`` in float32). A state this small meeting a gradient as small steps on ``L`` and ``R`` lifted by
    the largest scale :func:`power_of_two_scale` takes (``σ``, ``2^60`` in float32), where ``⟨K, L⟩`` sums products
    of entries of size :math:`\sigma^2\|R\|^3/d^2` (sides ``d`` up to ``2^13``): the threshold keeps them normal
    numbers, :math:`(\text{tiny} \cdot 2^{26} / \sigma^2)^{1/3}` (at most :math:`\sqrt{\text{tiny}}`, for the half
    dtypes). Its norm is read with its digits (:func:`block_norm_wide`): above the threshold the direction of a
    state however small counts where a gradient of ordinary size meets it."""
    tiny = torch.finfo(dtype).tiny
    return min(2.0 ** ((math.log2(tiny) + 26 - 2 * _scale_limit(dtype)) / 3), math.sqrt(tiny))


def _fresh_directions(fresh: Tensor, X: Tensor) -> Tensor:
    """``X`` with the blocks flagged in ``fresh (b)`` replaced by the unit-norm identity ``I/√d``."""
    d = X.shape[-1]
    eye = (torch.eye(d, dtype=X.dtype, device=X.device) / math.sqrt(d)).expand_as(X)
    return select_blocks(fresh, eye, X)


def projector_split_ksl(
    L: Tensor, R: Tensor, G: Tensor, beta: float, *, fresh: Tensor | None = None,
    defer: list["DeferredWrite"] | None = None, dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One KSL (Lie–Trotter projector-splitting) step of the rank-1 Kronecker tracker.

    The state :math:`Y_0 = \mathrm{vec}\,L\,\mathrm{vec}\,R^\top = U_0 S_0 V_0^\top` of
    :math:`\mathcal R(F)` takes the increment of :math:`F \leftarrow \beta F + (1-\beta)\,
    \mathrm{vec}\,G\,\mathrm{vec}\,G^\top`: the state is scaled by :math:`\sqrt\beta`
    per factor and :math:`\Delta A = G\otimes G` with :math:`G \leftarrow \sqrt{1-\beta}\,G`.
    With :math:`r = \|R\|_F`, :math:`\bar R = R/r`:

    .. math::
        K = rL + G\bar R G^\top,\quad U = K/\|K\|_F,\quad
        \tilde S = r\langle U, L\rangle,\quad
        \hat R = \tilde S \bar R + G^\top U G,\quad S = \|\hat R\|_F,

    and the result is :math:`(\sqrt S\,U,\ \hat R/\sqrt S)`: both factors leave with
    Frobenius norm :math:`\sqrt S`. This is the K-step, backward S-step and L-step of
    Lubich & Oseledets written with the sandwich products (:func:`sandwich`); no
    ``mn × mn`` or ``m² × n²`` matrix is formed. :math:`\tilde S = \hat S - \langle U, G\bar R G^\top\rangle`
    is computed in the cancellation-free form.

    Cost: :math:`2mn(m+n) + O(m^2+n^2)` multiply-adds per block, less where
    :func:`sym_product` multiplies only the lower half of the two symmetric sandwiches, and
    where the larger side's sandwich is taken from its middle's lower tiles
    (:func:`split_sandwich`: :math:`G\bar R G^\top` on a wide block, :math:`G^\top K G` on a tall one).

    Args:
        L: ``b m m`` symmetric PSD.
        R: ``b n n`` symmetric PSD.
        G: ``b m n`` (not modified).
        beta: EMA retention in ``(0, 1)``.
        fresh: optional ``(b)`` mask of blocks that hold nothing yet: their state is
            taken as :math:`L = 0` with the direction :math:`\bar R = I_n/\sqrt n`, so
            the step is two half power steps from the identity toward the top pair of
            :math:`G \otimes G` (:math:`U \propto GG^\top`, :math:`R \propto G^\top U G`),
            the best approximation of :math:`(1-\beta)G\otimes G` with that :math:`U`.
        defer: a list (:attr:`StepContext.defer`; ``L`` and ``R`` the state's stacks): the two
            results' last scalings go to the state write as :class:`DeferredWrite` records
            into ``L`` and ``R`` themselves, which are returned unchanged, when both results are
            proven finite on every block: ``‖K‖``, ``‖R̂‖`` and ``L``'s scale :math:`\sqrt S/\|K\|`
            finite bound every entry (``|K_ij| ≤ ‖K‖``, ``|R̂_ij| ≤ ‖R̂‖``). Not where autograd tracks
            ``L``, ``R`` or ``G``: the results are then returned, in the graph, and nothing is deferred.
        dtype: the sandwiches' precision where it is narrower than ``G``'s (the estimator's ``product_dtype``):
            each of the four products (:math:`G \bar R`, its product with :math:`G^\top`, :math:`G^\top U` and
            :math:`G^\top (U G)`) reads its operands rounded to it (:math:`G`, :math:`\bar R`, :math:`U = K/\|K\|`
            and the products before) and rounds its result, its sums in at least float32
            (:meth:`NarrowProducts.of_sandwiches`); the weights (:math:`1-\beta`, :math:`\beta\|R\|`,
            :math:`\tilde S`), the sums with :math:`L` and :math:`R` and the norms stay in ``G``'s dtype. ``R̄`` is
            then formed on every block and the split sandwiches are not taken. ``None``: ``G``'s own.

    Returns:
        ``(L', R')``, exactly symmetric and PSD (with ``dtype``, PSD up to the narrow products'
        rounding). A block with ``L = 0`` or ``R = 0`` and
        ``G = 0`` returns zeros (never NaN).

    Invariants:
        equals the KSL step on the dense :math:`\mathcal R(F)`; exact when
        :math:`\mathcal R(F_t)` stays rank one; ``G = 0`` gives :math:`\beta L\otimes R`;
        symmetric PSD with :math:`\|L'\|_F = \|R'\|_F`
        (``tests/unit/test_projector_splitting.py``).

    References:
        Lubich & Oseledets, BIT 54 (2014); Yudin et al., DyKAF, arXiv 2511.06477.
    """
    _check_batched_square("L", L)
    _check_batched_square("R", R)
    _check_batched("G", G)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    # The step is homogeneous (L, R, G times λ: L', R' times λ). Where the squares behind ‖K‖
    # and ‖R̂‖ (of size ‖G‖⁴ or ‖R‖²‖L‖²) would leave float's range (float32: ‖G‖ past about
    # 1e11, gradient entries of 1e8 to 4e8 on 1024 × 256, or far below 1), it runs as on L, R and
    # G times the power of two σ that brings the larger of ‖R‖ and ‖G‖ near 1 (‖L‖ = ‖R‖: the
    # factors leave every step, and the starts, with equal norms), and scales back: the same
    # bits as the plain step wherever that stays in range. On a CPU the plain step runs first
    # and its norms are read on the host (free there; a pass over G for ‖G‖ is not): only a
    # stack with a block out of range runs again, scaled. Other devices always run it scaled.
    # A state whose ‖R‖ lies below empty_state_norm (never started, or decayed there by a long run
    # of zero gradients) holds nothing: it takes a fresh block's direction I/√n, so the next
    # nonzero gradient starts it again (from R̄ = 0 the step would return zeros for good). Above it
    # its direction counts, however small: ‖R‖ is read with its digits (block_norm_wide; the plain
    # norm of a float32 state of 2^-70 reads 17 % low, of 2^-80 reads 0).
    norm_R = block_norm_wide(R)
    empty = norm_R.view(-1) < empty_state_norm(R.dtype)
    host = host_verdicts(norm_R)
    if not host or bool(empty.any()):
        fresh = empty if fresh is None else fresh | empty
    if fresh is not None:  # a fresh block's (finite) state is taken as zero: its ‖R‖ enters neither σ nor the weights
        norm_R = norm_R.masked_fill(fresh.view(-1, 1, 1), 0.0)
    narrow = NarrowProducts.of_sandwiches(G, dtype)
    if host:
        plain = _ksl(L, R, G, beta, norm_R, None, fresh, defer, narrow)
        if plain is not None:
            return plain
    return _ksl(L, R, G, beta, norm_R, power_of_two_scale(norm_R, block_norm(G)), fresh, defer, narrow)


def projector_split_ksl_each(
    L: Sequence[Tensor], R: Sequence[Tensor], G: Sequence[Tensor], beta: float,
    defer: Sequence[list["DeferredWrite"] | None] | None = None, dtype: torch.dtype | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`projector_split_ksl` of each call ``(L[i], R[i], G[i])`` (``defer[i]`` its ``defer``; ``dtype`` theirs),
    the same bits.

    On a CPU, the calls whose plain step runs in dense products (sides below ``_GRAM_TILED_MIN``, so no tiles and no
    split; untracked; of one dtype whose plain range is not empty, not float16's) are made together: each call's
    products and reductions in its turn, their per-block scalars (``1/‖R‖``, the weights, ``1/‖K‖``, ``⟨U, L⟩``, the
    range test and the last scalings) in one tensor for them all, with one read on the host for them all where a call
    alone makes three of its own. A call with a norm out of the plain range on a block (``‖R‖``, ``‖K‖`` or ``‖R̂‖``:
    a state empty, tiny or not finite among them, whose norm :func:`block_norm_wide` takes otherwise) is made again
    alone, scaled where it needs; so is every other call. The results, and the deferred writes, come in the calls'
    order. Many small buckets' steps pay for their calls, not their arithmetic (DyKAF's rotated-Adam buckets,
    :meth:`kronopt.factors.projector_splitting.ProjectorSplittingFactors.update_each`)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    calls = list(zip(L, R, G, defer if defer is not None else [None] * len(L), strict=True))
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(calls)
    together: dict[torch.dtype, list[int]] = {}
    for i, (L_i, R_i, G_i, _) in enumerate(calls):
        if _ksl_plain_dense(L_i, R_i, G_i):
            together.setdefault(L_i.dtype, []).append(i)
    made: list[tuple[Any, ...] | None] = [None] * len(calls)
    for at in together.values():
        if len(at) > 1:
            _ksl_together([calls[i] for i in at], beta, made, at, dtype)
    # in the calls' order, the deferred writes too (a list shared by calls gets them as the calls in turn would)
    for i, ((L_i, R_i, G_i, defer_i), of) in enumerate(zip(calls, made)):
        if of is None:
            out[i] = projector_split_ksl(L_i, R_i, G_i, beta, defer=defer_i, dtype=dtype)
        else:
            out[i] = _ksl_written(L_i, R_i, *of, finite=True, defer=defer_i)
    return out  # type: ignore[return-value]


def _ksl_plain_dense(L: Tensor, R: Tensor, G: Tensor) -> bool:
    """Whether :func:`projector_split_ksl_each` may make this call with others: on a CPU whose verdicts are read on
    the host, untracked, of one floating dtype with a plain range (:func:`_plain_range`) and well formed, with blocks
    of entries whose products and reductions are the dense ones (no tiles, no split sandwich)."""
    if not (L.ndim == R.ndim == G.ndim == 3 and host_verdicts(L)):
        return False
    if not (L.dtype == R.dtype == G.dtype and L.is_floating_point()):
        return False
    b, m, n = G.shape
    if not (b and m and n and L.shape == (b, m, m) and R.shape == (b, n, n) and L.device == R.device == G.device):
        return False
    lo, hi = _plain_range(L.dtype)
    if not lo < hi:  # float16's is empty: every call would be made twice
        return False
    if torch.is_grad_enabled() and (L.requires_grad or R.requires_grad or G.requires_grad):
        return False
    return max(m, n) < min(_GRAM_TILED_MIN, _SPLIT_SANDWICH_MIN)  # neither side tiled (_tiled) nor split (split_pays)


def _ksl_together(
    calls: list[tuple[Tensor, Tensor, Tensor, list["DeferredWrite"] | None]], beta: float,
    made: list[tuple[Any, ...] | None], at: list[int], dtype: torch.dtype | None = None,
) -> None:
    """:func:`projector_split_ksl_each`'s calls made together: ``made[at[k]]`` set to ``(K, R̂, scale_L, scale_R)``
    (:func:`_ksl_written`'s) for each call ``k`` that kept the plain range on every block (the others are left
    ``None``, to be made alone)."""
    tiny = _tiny(calls[0][0])
    # ‖R‖ as block_norm_wide and projector_split_ksl take it wherever the plain step runs: a state whose plain norm
    # needs the wide form or is empty (below norm_digits_floor or empty_state_norm, both under _plain_range's lower
    # end on sides below 2^13) leaves the plain range, and is made alone below
    norm_R = torch.cat([block_norm(R_i) for _, R_i, _, _ in calls])
    slices, start = [], 0
    for _, R_i, _, _ in calls:
        slices.append(slice(start, start + R_i.shape[0]))
        start += R_i.shape[0]
    # the per-block scalars of every call at once, each operation as _ksl makes it on one call's (elementwise)
    inv = norm_R.clamp(min=tiny).reciprocal_()
    weight = beta * norm_R
    narrow = [_narrowed(G_i, NarrowProducts.of_sandwiches(G_i, dtype)) for _, _, G_i, _ in calls]
    left = [
        _ksl_K(
            L_i, R_i, G_i, beta, inv[s], weight[s], None, None, None, None, tracked=False, tall_split=False, narrow=n
        )
        for (L_i, R_i, G_i, _), s, n in zip(calls, slices, narrow)
    ]
    norm_K = torch.cat([k[2] for k in left])
    inv_K = norm_K.clamp(min=tiny).reciprocal_()
    inner = torch.cat([k[1] for k in left]) * inv_K
    weight_R = weight * inner * inv
    right = [
        _ksl_R_hat(R_i, G_i, K[0], beta, inv_K[s], weight_R[s], None, None, tracked=False, tall_split=False, narrow=n)
        for (_, R_i, G_i, _), K, s, n in zip(calls, left, slices, narrow)
    ]
    norm_R_hat = torch.cat([r[1] for r in right])
    root = norm_R_hat.sqrt()
    bad = _out_of_plain_range(norm_K, norm_R_hat, norm_R, None, _range_dtype(calls[0][0], narrow[0])).tolist()
    scale_L, scale_R = inv_K * root, root.clamp(min=tiny).reciprocal()
    for K, (R_hat, _), s, i in zip(left, right, slices, at):
        if not any(bad[s]):
            made[i] = (K[0], R_hat, scale_L[s], scale_R[s])


def _range_dtype(L: Tensor, narrow: "tuple[NarrowProducts, Tensor] | None") -> torch.dtype:
    """The dtype whose :func:`_plain_range` a KSL step's norms must keep: the narrow products' where they round (a
    float64 block's bfloat16 products have float32's range: a tiny gradient's sandwich would underflow in them, so
    the step runs scaled), else the state's."""
    return L.dtype if narrow is None else narrow[0].dtype


def _narrowed(G: Tensor, narrow: "NarrowProducts | None") -> "tuple[NarrowProducts, Tensor] | None":
    """``(narrow, G rounded as its products read it)``, ``None`` without ``narrow``: the KSL step's two sandwiches
    read ``G`` so, rounded once."""
    return None if narrow is None else (narrow, narrow.operand(G))


def _plain_range(dtype: torch.dtype) -> tuple[float, float]:
    """The range of ``‖K‖``, ``‖R̂‖`` and ``‖R‖`` in which :func:`projector_split_ksl`'s plain step keeps its
    digits: their squares (summed tile by tile) stay below the dtype's largest number with room to spare, and
    the squares of entries that count in them, on sides up to ``2^13``, above its smallest normal number
    (float32: ``2^-50`` to ``2^60``)."""
    info = torch.finfo(dtype)
    return 2.0 ** (math.log2(info.tiny) / 2 + 13), 2.0 ** (math.frexp(info.max)[1] // 2 - 4)


def _ksl(
    L: Tensor, R: Tensor, G: Tensor, beta: float, norm_R: Tensor, sigma: Tensor | None,
    fresh: Tensor | None, defer: list["DeferredWrite"] | None, narrow: "NarrowProducts | None" = None,
) -> tuple[Tensor, Tensor] | None:
    """:func:`projector_split_ksl`'s step, run as on ``L``, ``R`` and ``G`` times ``sigma`` (a power of
    two per block, ``b 1 1``), or plainly (``sigma = None``): then ``None`` where ``‖K‖``, ``‖R̂‖`` or
    (on a block not fresh) ``‖R‖`` leaves :func:`_plain_range` on a block (read on the host). ``narrow``: the
    sandwiches' products in it (:func:`projector_split_ksl`'s ``dtype``)."""
    tiny = _tiny(L)
    b, n = R.shape[0], R.shape[-1]
    # The scalings are folded into per-block factors and the products' alpha, so no scaled
    # copy of L or G is made, and of R only the smaller of R̄ and G R̄: with r = √β‖R‖ the
    # direction R̄ = R/‖R‖ loses the √β, the weight of L in K and of ⟨U, L⟩ in S̃ is
    # r·√β = β‖R‖, and (√(1−β) G)(·)(√(1−β) G)ᵀ is (1−β) G(·)Gᵀ. A fresh block takes
    # weight 0 and the direction I/√n.
    # Scaled, K and R̂ come out times σ² (in K's weight of L, its G R̄ Gᵀ and R̂'s Gᵀ U G), L'
    # and R' times σ (out of their last scalings). The scalings by σ²/‖R‖ (of G R̄, of R̂'s R̄)
    # and by σ²/‖K‖ (of U G) are two, by 1/‖·‖ then σ²: a product of the two scalars leaves
    # float32's range where ‖R‖ or ‖G‖ is far from 1. The split sandwiches take σ G instead
    # (the CPU's; there only a step out of the plain range pays that pass over G): their
    # products, of size ‖G‖²‖R‖, then stay in range too.
    sigma2 = None if sigma is None else sigma.square()
    inv = norm_R.clamp(min=tiny).reciprocal_()
    weight = beta * norm_R if sigma2 is None else beta * norm_R * sigma2
    unit = None  # a fresh block's weight of the direction I/√n (σ² scaled), 0 on the others
    if fresh is not None:
        keep = (~fresh).to(L.dtype).view(b, 1, 1)
        inv, weight = inv * keep, weight * keep
        unit = _times((fresh.to(L.dtype) / math.sqrt(n)).view(b, 1, 1), sigma2)
    # a tracked step takes neither the split (its middle's gradient would fall on the lower tiles alone) nor the
    # kept tiles (written into place with out=, which autograd refuses)
    tracked = torch.is_grad_enabled() and (L.requires_grad or R.requires_grad or G.requires_grad)
    tall_split = not tracked and narrow is None and split_pays(G.mT, L, held=True)
    rounded = None if narrow is None else _narrowed(_times(G, sigma), narrow)  # σ G: a power of two, exact rounded
    K, K_dot_L, norm_K = _ksl_K(
        L, R, G, beta, inv, weight, sigma, sigma2, fresh, unit, tracked=tracked, tall_split=tall_split, narrow=rounded
    )
    # U = K/‖K‖ is never formed: its norm enters ⟨U, L⟩ and Gᵀ U G as a factor, and the
    # returned L' = √S U as one scaling of K.
    inv_K = norm_K.clamp(min=tiny).reciprocal_()
    inner = K_dot_L * inv_K  # type: ignore[operator]  # ⟨U, L⟩, summed pairwise (a dot product loses digits)
    # R̂ takes R with 1/‖R‖ (R̄ = R/‖R‖); a fresh block's weight is 0, so its R̂ takes nothing of R
    weight_R = weight * inner * inv
    R_hat, norm_R_hat = _ksl_R_hat(
        R, G, K, beta, inv_K, weight_R, sigma, sigma2, tracked=tracked, tall_split=tall_split, narrow=rounded
    )
    root = norm_R_hat.sqrt()  # σ √S
    if sigma is None:
        bad = _out_of_plain_range(norm_K, norm_R_hat, norm_R, fresh, _range_dtype(L, rounded))
        scale_L, scale_R = inv_K * root, root.clamp(min=tiny).reciprocal()
        finite = True  # ‖K‖, ‖R̂‖ in range: they and √S/‖K‖ are finite
        if bool(bad.any()):
            # a block out of range whose σ is 1 (nothing to scale: a fresh block with no gradient) is what
            # the scaled step would give; any other block runs the stack again, scaled
            if not bool((power_of_two_scale(norm_R, block_norm(G)).view(b)[bad] == 1).all()):
                return None
            finite = cpu_all(torch.isfinite(torch.cat([norm_K, norm_R_hat, scale_L])).all())
    else:
        scale_L, scale_R = inv_K * root / sigma, (root * sigma).clamp(min=tiny).reciprocal()
        finite = cpu_all(torch.isfinite(torch.cat([norm_K, norm_R_hat, scale_L])).all())
    # a tracked step's results stay in the graph: the state write's out= would refuse them (nothing deferred)
    return _ksl_written(L, R, K, R_hat, scale_L, scale_R, finite=finite, defer=None if tracked else defer)


def _ksl_K(
    L: Tensor, R: Tensor, G: Tensor, beta: float, inv: Tensor, weight: Tensor, sigma: Tensor | None,
    sigma2: Tensor | None, fresh: Tensor | None, unit: Tensor | None, *, tracked: bool, tall_split: bool,
    narrow: "tuple[NarrowProducts, Tensor] | None" = None,
) -> tuple["Tensor | LowerTiles", Tensor, Tensor]:
    """:func:`_ksl`'s K-step: ``K = weight · L + (1−β) G R̄ Gᵀ`` (``R̄ = inv · R``, a fresh block's ``I/√n`` at
    ``unit``), with ``⟨K, L⟩`` and ``‖K‖``; ``K`` held as its tiles (:class:`LowerTiles`) for a tall block's split.
    ``narrow``: ``(products, σ G rounded)`` (:func:`_narrowed`), the two products in them, ``R̄`` formed and rounded."""
    b = R.shape[0]
    if narrow is not None:
        # the spec's products as they stand, every operand rounded: R̄ formed on every block (a fresh block's I/√n),
        # G R̄ rounded, then (G R̄) Gᵀ rounded in sym_product's forms. Scaled, G comes as σ G (the products' operands
        # then near 1, in the narrow dtype's range, where σ² R̄'s would leave it in a float64 block's scaled step)
        products, G_ = narrow
        if fresh is None:
            Rbar = products.scaled_operand(R, inv)
        else:
            Rbar = products.operand(_fresh_directions(fresh, R * inv))
        GR = products.mm(G_, Rbar)
        # K held as its tiles where the tiled form makes it (no dense K: U and the last scaling are written from them)
        K = sym_product_stats(L, GR, G_, beta=weight, alpha=1.0 - beta, other=L, tiles=not tracked, narrow=products)
        return K  # type: ignore[return-value]
    if not tracked and split_pays(G, R):
        # a wide block with a large R: G R Gᵀ from R's lower tiles, scaled by 1/‖R‖ as a factor;
        # R̄ is not formed: a fresh block's middle is I/√n with weight 1, the others' R with 1/‖R‖,
        # as without a mask. The sum with L is symmetrised once, inside the split (plus), so K stays
        # exactly symmetric whatever L's rounding.
        S, s = R, inv
        if fresh is not None:
            S, s = _fresh_directions(fresh, R), inv + fresh.to(L.dtype).view(b, 1, 1)  # inv is 0 on a fresh block
        K = split_sandwich(_times(G, sigma), S, alpha=(1.0 - beta) * s, plus=(L, weight))
        K_dot_L, norm_K = _dense_stats(K, L)
        return K, K_dot_L, norm_K  # type: ignore[return-value]
    if G.shape[-2] < R.shape[-1]:
        # a wide block: R̄ is not formed; the m × n product G R takes the scaling (and a fresh
        # block's G/√n), a smaller pass than the n × n one, and R̂'s weight of R̄ takes 1/‖R‖. Scaled, it
        # is made of σ G (entries of size ‖G‖‖R‖ underflow where both are tiny) and takes σ once more
        GR = _times_(mm(_times(G, sigma), R).mul_(inv), sigma)
        if unit is not None:
            GR.addcmul_(G, unit)
    else:
        # R̄ (σ² R̄ scaled) is G R̄'s operand only: R̂ takes R with 1/‖R‖ as on a wide block, where
        # its weight is of the size of ‖L‖ (S̃ R̄'s weight, of ‖R‖‖L‖, leaves float's range first)
        Rbar = _times_(R * inv, sigma2)
        if unit is not None:
            Rbar.diagonal(dim1=-2, dim2=-1).add_(unit.view(b, 1))
        GR = mm(G, Rbar)
    # both products are symmetric in exact arithmetic (G R̄ Gᵀ, Gᵀ U G): sym_product computes half.
    # On a tall block K is then read only by the split below and its last scaling, so its tiles
    # are kept apart, unmirrored (LowerTiles).
    return sym_product_stats(L, GR, G, beta=weight, alpha=1.0 - beta, other=L, tiles=tall_split)  # type: ignore[return-value]


def _ksl_R_hat(
    R: Tensor, G: Tensor, K: "Tensor | LowerTiles", beta: float, inv_K: Tensor, weight_R: Tensor,
    sigma: Tensor | None, sigma2: Tensor | None, *, tracked: bool, tall_split: bool,
    narrow: "tuple[NarrowProducts, Tensor] | None" = None,
) -> tuple["Tensor | LowerTiles", Tensor]:
    """:func:`_ksl`'s S- and L-steps: ``R̂ = weight_R · R + (1−β) Gᵀ U G`` (``U = inv_K · K``) and ``‖R̂‖``.
    ``narrow`` as :func:`_ksl_K`'s: ``U`` formed and rounded, ``Gᵀ U`` rounded, then ``Gᵀ (U G)`` rounded."""
    if narrow is not None:
        products, G_ = narrow  # σ G where scaled: the products come out times σ², as the others'
        Gt = G_.mT
        UGt = products.mm(Gt, products.scaled_operand(K, inv_K))
        R_hat, _, norm_R_hat = sym_product_stats(
            R, Gt, UGt, beta=weight_R, alpha=1.0 - beta, tiles=not tracked, narrow=products
        )
        return R_hat, norm_R_hat
    if tall_split:
        # a tall block: Gᵀ K G from K's lower tiles, instead of the m × m × n product K G
        R_hat = split_sandwich(_times(G, sigma).mT, K, alpha=(1.0 - beta) * inv_K, plus=(R, weight_R))
        return R_hat, block_norm(R_hat)
    # R̂'s product is Gᵀ (U G): where oneDNN takes its tiles, which read both operands' rows laid, Gᵀ is laid
    # once here and (U G)ᵀ made as Gᵀ U in rows (U symmetric), instead of U G laid again transposed
    Gt = G.mT
    if _tiles_by_onednn(R, Gt, Gt):
        Gt = contiguous(Gt)
        UGt = _times_(mm(Gt, K).mul_(inv_K), sigma2)  # type: ignore[arg-type]  # K is a tensor: tiles are kept only for the split
    else:
        UGt = _times_(mm(K, G).mul_(inv_K), sigma2).mT  # type: ignore[arg-type]
    R_hat, _, norm_R_hat = sym_product_stats(R, Gt, UGt, beta=weight_R, alpha=1.0 - beta, tiles=not tracked)
    return R_hat, norm_R_hat


def _out_of_plain_range(
    norm_K: Tensor, norm_R_hat: Tensor, norm_R: Tensor, fresh: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """``(b)``: where ``‖K‖``, ``‖R̂‖`` or (on a block not fresh) ``‖R‖`` leaves :func:`_plain_range` of ``dtype`` (the
    state's: the norms may come out wider, of a wider gradient), or is NaN."""
    b = norm_K.shape[0]
    lo, hi = _plain_range(dtype)
    norms = torch.cat([norm_K, norm_R_hat, norm_R if fresh is None else norm_R.masked_fill(fresh.view(b, 1, 1), 1.0)])
    return ~((norms >= lo) & (norms <= hi)).view(3, b).all(0)  # also where one is NaN


def _ksl_written(
    L: Tensor, R: Tensor, K: "Tensor | LowerTiles", R_hat: "Tensor | LowerTiles", scale_L: Tensor, scale_R: Tensor, *,
    finite: bool, defer: list["DeferredWrite"] | None,
) -> tuple[Tensor, Tensor]:
    """``(scale_L · K, scale_R · R̂)``, or, with ``defer`` (results ``finite`` and the state's stacks ``L``, ``R``
    contiguous), the two scalings left to the state write into ``L`` and ``R``, which are returned unchanged."""
    if defer is None or not finite or not (L.is_contiguous() and R.is_contiguous()):
        return _scaled(K, scale_L), _scaled(R_hat, scale_R)
    defer.append(DeferredWrite(target=L, into=lambda out: _scaled(K, scale_L, out=out)))
    defer.append(DeferredWrite(target=R, into=lambda out: _scaled(R_hat, scale_R, out=out)))
    return L, R


def _times(x: Tensor, scale: Tensor | None) -> Tensor:
    """``x`` times ``scale`` (``x`` itself without one)."""
    return x if scale is None else x * scale


def _times_(x: Tensor, scale: Tensor | None) -> Tensor:
    """``x`` times ``scale`` in place (``x`` untouched without one)."""
    return x if scale is None else x.mul_(scale)


def _scaled(P: "Tensor | LowerTiles", scale: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``P`` times ``scale`` into ``out``, or in place of a dense ``P`` without one (into a new tensor
    where autograd tracks ``P``: it is saved for the gradients of the reductions made of it)."""
    if isinstance(P, LowerTiles):
        return P.write(out, scale=scale)
    if out is None:
        if torch.is_grad_enabled() and P.requires_grad:  # tracked: P is saved for backward (⟨K, L⟩, ‖K‖), so a new tensor
            return P * scale
        return P.mul_(scale)
    return torch.mul(P, scale, out=out)


def projector_split_parallel(
    L: Tensor, R: Tensor, G: Tensor, beta: float, *, fresh: Tensor | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    r"""One parallel (basis-update & Galerkin) step of the rank-1 Kronecker tracker.

    Both bases come from the old state, then a Galerkin coefficient. With the
    scaling of :func:`projector_split_ksl`, :math:`\ell = \|L\|`, :math:`r = \|R\|`,
    :math:`S_0 = \ell r`:

    .. math::
        U \propto S_0 \bar L + G \bar R G^\top,\quad V \propto S_0 \bar R + G^\top \bar L G,\quad
        S_1 = S_0 \langle\bar L, U\rangle\langle\bar R, V\rangle + \langle U, G V G^\top\rangle,

    returning :math:`(\sqrt{S_1}\,U, \sqrt{S_1}\,V)` (unit-norm :math:`U, V`). Cost
    :math:`3mn(m+n)`. ``fresh`` flags blocks that hold nothing yet: :math:`S_0 = 0`
    and :math:`\bar L = I_m/\sqrt m`, :math:`\bar R = I_n/\sqrt n` (as in
    :func:`projector_split_ksl`). ``dtype``: the three sandwiches' precision where it is narrower than ``G``'s, as
    :func:`projector_split_ksl`'s: each of their six products reads its operands rounded to it (:math:`G`, the
    middle :math:`\bar R`, :math:`\bar L` or :math:`V`, and the product before) and rounds its result; the weight
    :math:`1-\beta` of a product of two gradients, the sums and the norms stay in ``G``'s dtype.

    References:
        Ceruti & Lubich, BIT 62 (2022); Vepricov/LIB ``dykaf.py`` @0c470ea.
    """
    _check_batched_square("L", L)
    _check_batched_square("R", R)
    _check_batched("G", G)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    tiny = _tiny(L)
    # homogeneous as the KSL step: run on L, R, G times the power of two σ that brings their
    # largest norm near 1, and scale back (power_of_two_scale); a state whose norm lies below
    # empty_state_norm takes the fresh directions, as in projector_split_ksl (norms read with their digits)
    ell, r = block_norm_wide(L), block_norm_wide(R)
    floor = empty_state_norm(L.dtype)
    empty = (ell.view(-1) < floor) | (r.view(-1) < floor)
    fresh = empty if fresh is None else fresh | empty
    sigma = power_of_two_scale(ell, r, block_norm(G))
    scale = math.sqrt(beta) * sigma
    L, R, ell, r = L * scale, R * scale, ell * scale, r * scale
    narrow = NarrowProducts.of_sandwiches(G, dtype)
    if narrow is None:
        Gs = G * (math.sqrt(1.0 - beta) * sigma)
        sandwich_of, sandwich_t_of = functools.partial(sandwich, Gs), functools.partial(sandwich_t, Gs)
    else:  # σ G rounded (a power of two: exact in the rounding), the weight 1 − β on each sandwich after it
        G_ = narrow.operand(G * sigma)

        def sandwich_of(X: Tensor) -> Tensor:
            return sandwich(G_, X, narrow=narrow).mul_(1.0 - beta)

        def sandwich_t_of(Y: Tensor) -> Tensor:
            return sandwich_t(G_, Y, narrow=narrow).mul_(1.0 - beta)
    S0 = ell * r
    L_bar, R_bar = L / ell.clamp(min=tiny), R / r.clamp(min=tiny)
    if fresh is not None:
        S0 = select_blocks(fresh, torch.zeros_like(S0), S0)
        L_bar, R_bar = _fresh_directions(fresh, L_bar), _fresh_directions(fresh, R_bar)
    U = sym(S0 * L_bar + sandwich_of(R_bar))
    U = U / block_norm(U).clamp(min=tiny)
    V = sym(S0 * R_bar + sandwich_t_of(L_bar))
    V = V / block_norm(V).clamp(min=tiny)
    galerkin = (U * sandwich_of(V)).sum(dim=(-2, -1), keepdim=True)
    S1 = S0 * (L_bar * U).sum(dim=(-2, -1), keepdim=True) * (R_bar * V).sum(dim=(-2, -1), keepdim=True) + galerkin
    root = S1.clamp(min=0.0).sqrt() / sigma
    return U * root, V * root


@attrs.frozen(eq=False)
class SingularTriplet:
    """Top singular triplet of each block: ``sigma (b)``, ``u (b m)``, ``v (b n)``."""

    sigma: Tensor
    u: Tensor
    v: Tensor


def top_singular_triplet(G: Tensor) -> SingularTriplet:
    r"""Dominant singular triplet :math:`(\sigma_1, u_1, v_1)` of each block by a batched SVD.

    Runs in ``G``'s dtype; a zero block gives :math:`\sigma_1 = 0` (its vectors are
    arbitrary unit vectors). Signs follow the solver; :math:`u_1 u_1^\top` and
    :math:`v_1 v_1^\top` do not depend on them. Cost :math:`O(mn\min(m,n))`. Where the
    solver fails it is retried in float64; where that fails too, the triplet comes from
    :data:`FALLBACK_POWER_ITERS` power iterations (:func:`top_singular_triplet_power`).
    """
    _check_batched("G", G)
    svd = _svd_retried(G, "the first gradient (the dominant singular triplet)")
    if svd is None:
        return top_singular_triplet_power(G, FALLBACK_POWER_ITERS)
    U, S, Vh, ok = svd
    top = SingularTriplet(sigma=S[:, 0], u=U[:, :, 0], v=Vh[:, 0, :])
    if ok is None:
        return top
    power = top_singular_triplet_power(G, FALLBACK_POWER_ITERS)  # for the blocks the SVD failed on, alone
    return SingularTriplet(
        sigma=select_blocks(ok, top.sigma, power.sigma), u=select_blocks(ok, top.u, power.u),
        v=select_blocks(ok, top.v, power.v),
    )


#: power iterations of :func:`top_singular_triplet`'s fallback, where the SVD fails in both dtypes
FALLBACK_POWER_ITERS = 100


def vector_norm_scaled(x: Tensor) -> Tensor:
    r"""Euclidean norm over the last dimension, ``b d -> b 1``, taken of ``x`` divided by its
    largest magnitude first: the squares of entries below :math:`\sqrt{\text{tiny}}` (``1e-154``
    in float64, ``1e-19`` in float32) underflow to zero in a plain norm, which then makes a
    normalised vector thousands of orders of magnitude too long. A zero vector has norm 0; a
    subnormal one its own (the divisor is at least the smallest normal number)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=_tiny(x))
    norm = scale * torch.linalg.vector_norm(x / scale, dim=-1, keepdim=True)
    return torch.where(scale.isinf(), scale, norm)  # an infinite entry: an infinite norm, not ∞/∞


def top_singular_triplet_power(G: Tensor, iters: int) -> SingularTriplet:
    r"""Dominant singular triplet by ``iters`` alternating power iterations (matrix-free).

    .. math::
        v_0 \propto (\|G_{:,j}\|^2)_j + 1,\qquad u \leftarrow G v/\|G v\|,\quad v \leftarrow G^\top u/\|G^\top u\|,
        \quad \sigma = \|G^\top u\| .

    Converges at the rate :math:`(\sigma_2/\sigma_1)^{2k}`; exact after one iteration on a
    rank-one block. The start is deterministic (no random generator). A zero block
    gives :math:`\sigma = 0`. Cost :math:`2mn` per iteration.
    """
    _check_batched("G", G)
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    tiny = _tiny(G)
    v = G.square().sum(dim=-2) + 1.0
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    u = v.new_zeros(G.shape[0], G.shape[1])
    sigma = v.new_zeros(G.shape[0])
    for _ in range(iters):
        u = matvec(G, v)
        u = u / vector_norm_scaled(u).clamp(min=tiny)
        w = matvec(G.mT, u)
        sigma = vector_norm_scaled(w).squeeze(-1)
        v = w / sigma.unsqueeze(-1).clamp(min=tiny)
    return SingularTriplet(sigma=sigma, u=u, v=v)


def rank1_ema_parallel(l: Tensor, r: Tensor, D: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    r"""Rank-one tracker of a nonnegative EMA :math:`V \leftarrow \beta V + (1-\beta) D`, :math:`V \approx l r^\top`.

    The parallel rank-one integrator (DyKAF spec §7): with :math:`a = \|l\|`,
    :math:`b = \|r\|`, :math:`S_0 = ab`,

    .. math::
        l_1 \propto \beta S_0 \bar l + (1-\beta) D \bar r,\quad
        r_1 \propto \beta S_0 \bar r + (1-\beta) D^\top \bar l,\quad
        c = \beta S_0 (l_1\cdot\bar l)(r_1\cdot\bar r) + (1-\beta)\, l_1^\top D r_1,

    returning :math:`(\sqrt c\, l_1, \sqrt c\, r_1)`. For :math:`l, r, D \ge 0` the
    output is nonnegative. A block whose ``‖l‖`` or ``‖r‖`` reads 0 starts from
    :math:`\bar l = \mathbb 1/\sqrt m`, :math:`\bar r = \mathbb 1/\sqrt n`, :math:`S_0 = 0`. Cost :math:`3mn`.

    Args:
        l: ``b m``; r: ``b n``; D: ``b m n`` (nonnegative, e.g. :math:`G'^{\odot 2}`).
        beta: retention in ``[0, 1)``.
    """
    _check_batched("D", D)
    if l.shape != D.shape[:2] or r.shape != (D.shape[0], D.shape[2]):
        raise ValueError(f"rank1_ema_parallel needs l (b m), r (b n) for D {tuple(D.shape)}, got {tuple(l.shape)}, {tuple(r.shape)}")
    tiny = _tiny(D)
    a, b_ = vector_norm_scaled(l), vector_norm_scaled(r)
    # a state whose norm reads 0 (a long run of zero gradients decays l and r by √β a call until they
    # underflow) holds nothing: it takes a fresh block's directions 𝟙/√m, 𝟙/√n and weight 0, so the next
    # nonzero D starts it again, as the factors of projector_split_ksl do; else V stayed 0 and m / ε stepped
    empty = (a == 0) | (b_ == 0)
    S0 = torch.where(empty, 0.0, a * b_)
    l_bar = torch.where(empty, D.shape[1] ** -0.5, l / a.clamp(min=tiny))
    r_bar = torch.where(empty, D.shape[2] ** -0.5, r / b_.clamp(min=tiny))
    l1 = beta * S0 * l_bar + (1.0 - beta) * matvec(D, r_bar)
    r1 = beta * S0 * r_bar + (1.0 - beta) * matvec(D.mT, l_bar)
    l1 = l1 / vector_norm_scaled(l1).clamp(min=tiny)
    r1 = r1 / vector_norm_scaled(r1).clamp(min=tiny)
    c = beta * S0 * (l1 * l_bar).sum(-1, keepdim=True) * (r1 * r_bar).sum(-1, keepdim=True)
    c = c + (1.0 - beta) * (l1 * matvec(D, r1)).sum(-1, keepdim=True)
    root = c.clamp(min=0.0).sqrt()
    return l1 * root, r1 * root


@attrs.frozen(eq=False)
class NearestKron:
    r"""Nearest Kronecker product :math:`\sigma\, U \otimes V` (unit Frobenius norm ``U (b m m)``, ``V (b n n)``).

    ``iterations`` is the number of power iterations (0 for the dense SVD) and
    ``residual`` the last change of the unit-norm right factor (0 for the SVD).
    """

    sigma: Tensor
    U: Tensor
    V: Tensor
    iterations: int
    residual: float


def _orient(sigma: Tensor, U: Tensor, V: Tensor) -> NearestKron:
    """Signs so that tr U ≥ 0 (σ stays ≥ 0, so tr V follows)."""
    s = torch.sign(torch.diagonal(U, dim1=-2, dim2=-1).sum(-1))
    s = torch.where(s == 0, torch.ones_like(s), s).view(-1, 1, 1)
    return NearestKron(sigma=sigma, U=U * s, V=V * s, iterations=0, residual=0.0)


def nearest_kron_dense(F: Tensor, m: int, n: int) -> NearestKron:
    r"""Exact nearest Kronecker product of ``F (b mn mn)`` by the SVD of :math:`\mathcal R(F)`.

    .. math::
        \min_{L,R}\|F - L\otimes R\|_F = \Big(\sum_{k\ge 2}\sigma_k^2\Big)^{1/2},\qquad
        L^*\otimes R^* = \sigma_1\,\mathrm{mat}(u_1)\otimes\mathrm{mat}(v_1)

    (Eckart–Young on the rearrangement). For symmetric PSD ``F`` the factors are
    symmetric and, with the sign fixed by :math:`\mathrm{tr}\,U \ge 0`, PSD. Cost
    :math:`O(m^2 n^2 \min(m,n)^2)`: for blocks up to about 32 × 32.

    References:
        Van Loan & Pitsianis (1993).
    """
    A = rearrange_kron(F, m, n)
    if A.ndim != 3:
        raise ValueError(f"nearest_kron_dense needs a batch (b mn mn), got {tuple(F.shape)}")
    Uf, S, Vh = _svd(A)
    U = Uf[:, :, 0].reshape(-1, m, m)
    V = Vh[:, 0, :].reshape(-1, n, n)
    return _orient(S[:, 0], sym(U), sym(V))


def nearest_kron_power(
    grads: Tensor, weights: Tensor, *, iters: int = 200, tol: float = 1e-12, start: Tensor | None = None
) -> NearestKron:
    r"""Nearest Kronecker product of :math:`F = \sum_i w_i\,\mathrm{vec}\,G_i\,\mathrm{vec}\,G_i^\top` without forming it.

    Power iteration on :math:`\mathcal R(F)^\top\mathcal R(F)` with the matrix-free
    operators (F4 of the DyKAF spec)

    .. math::
        \mathcal R(F)\,\mathrm{vec}\,X = \mathrm{vec}\sum_i w_i G_i X G_i^\top,\qquad
        \mathcal R(F)^\top\mathrm{vec}\,Y = \mathrm{vec}\sum_i w_i G_i^\top Y G_i,

    started from :math:`X = I_n/\sqrt n` (one step from there is the Shampoo/SOAP
    factor pair). Stops when the unit-norm right factor moves by less than ``tol``
    (Frobenius), or after ``iters`` iterations; the error then shrinks by about
    :math:`(\sigma_2/\sigma_1)^2` per iteration. Cost per iteration :math:`2Tmn(m+n)` for ``T``
    gradients.

    Args:
        grads: ``T m n`` gradients (one Fisher).
        weights: ``T`` nonnegative weights.
        iters: the most iterations.
        tol: change of the unit-norm right factor that stops.
        start: optional ``n n`` warm start.

    Returns:
        A batch of one :class:`NearestKron`.
    """
    _check_batched("grads", grads)
    if weights.shape != grads.shape[:1]:
        raise ValueError(f"weights must have shape ({grads.shape[0]},), got {tuple(weights.shape)}")
    n = grads.shape[-1]
    w = weights.view(-1, 1, 1)
    X = torch.eye(n, dtype=grads.dtype, device=grads.device) / math.sqrt(n) if start is None else start
    sigma = grads.new_zeros(())
    residual, k = float("inf"), 0
    X = X / torch.linalg.vector_norm(X)
    Y = None
    for k in range(1, iters + 1):
        Y = sym((w * (grads @ X @ grads.mT)).sum(0))
        Y = Y / torch.linalg.vector_norm(Y).clamp(min=_tiny(Y))
        Z = sym((w * (grads.mT @ Y @ grads)).sum(0))
        sigma = torch.linalg.vector_norm(Z)
        X_new = Z / sigma.clamp(min=_tiny(Z))
        residual = float(torch.linalg.vector_norm(X_new - X))
        X = X_new
        if residual < tol:
            break
    out = _orient(sigma.view(1), Y.unsqueeze(0), X.unsqueeze(0))  # type: ignore[union-attr]
    return attrs.evolve(out, iterations=k, residual=residual)


# -- KL-Shampoo and low-rank + flat sides ------------------------------------------------


def accumulate_gram_left(
    X: Tensor, A: Tensor, beta: float, alpha: float, *, defer: list["DeferredWrite"] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r""":math:`\beta X + \alpha A A^\top` (``b m k -> b m m``), exactly symmetric (:func:`sym_product`).

    With :math:`A = G Q_R\,\mathrm{diag}(s_R)` this is KL-Shampoo's left factor update
    :math:`\rho L + (1-\rho)/n \cdot G \hat R^{-1} G^\top`; as a Gram product the
    increment is PSD by construction (narrowed by ``dtype``, up to its result's rounding).

    ``dtype``: the Gram product's precision where it is narrower than ``A``'s (a factor estimator's
    ``product_dtype``): ``A`` and each product's result rounded to it, the sums in at least float32, the weighted
    sum with ``X`` in ``X``'s dtype (:func:`_narrow_gram_update`); ``None`` for ``A``'s own.

    ``defer`` (a list, :attr:`StepContext.defer`; ``X`` a stack of the state): an
    update :func:`sym_product` computes by tiles, or densely on a side of at least ``_DEFER_DENSE_MIN``, and
    that :func:`gram_update_finite` proves finite on every block (from the bound on its entries the last such write
    left, or from ``X``'s entries read), is not computed now but appended there as a
    :class:`DeferredWrite` into ``X`` itself, and ``X`` is returned unchanged: the tiled form is made in ``X``'s
    memory, the dense one's sum with its transpose written there (the same bits either way). Any other update is
    computed as without it. (A factor update left whole to the write also lets the rotated Adam moments of its
    step be updated in place, :func:`kronopt.compose.rotated_adams`.)
    """
    _check_batched("A", A)
    _check_batched_square("X", X)
    tiled = _tiled(X, A)
    narrow = NarrowProducts.of_gram(A, dtype)

    def update(out: Tensor | None = None) -> Tensor:
        if narrow is not None:
            return _narrow_gram_update(X, A, beta, alpha, narrow, out=out)
        if tiled:
            return _tiled_sym_product(X, A, A, beta, alpha, out=out)  # type: ignore[return-value]
        return _dense_sym_product(X, A, A, beta, alpha, out=out)

    if (
        defer is not None and (tiled or X.shape[-1] >= _DEFER_DENSE_MIN) and X.dtype == A.dtype and isinstance(beta, float)
        and X.is_contiguous()  # products into a stack of another layout round by it: the step's update goes row-major
    ):
        bound = gram_update_bound(X, A, beta, alpha, narrow=None if narrow is None else narrow.dtype)
        if cpu_all(gram_update_finite(X, A, beta, alpha, bound=bound)):

            def into(out: Tensor) -> None:
                update(out)
                if out is X:  # the next step's proof takes this bound on X's entries instead of reading them
                    _ENTRY_BOUNDS.put(X, bound)

            defer.append(DeferredWrite(target=X, into=into))
            return X
    return update()


def _narrow_gram_update(
    X: Tensor, A: Tensor, beta: float | Tensor, alpha: float, narrow: NarrowProducts, *, out: Tensor | None = None
) -> Tensor:
    r""":math:`\beta X + \alpha A A^\top` with the Gram product in ``narrow``'s products, exactly symmetric, into
    ``out`` (a new tensor where ``None``; ``X`` itself is allowed, the same bits).

    ``A`` is rounded once (:meth:`NarrowProducts.operand`); each product's result comes rounded and is weighted and
    added to ``β X`` in ``X``'s dtype (:func:`_weighted_product`'s ``narrow``): by tiles where :func:`sym_product`
    takes them (every tile made apart), else one product; where autograd tracks an operand, the dense form (it
    refuses ``out=``). A number ``beta`` of 0 never reads ``X``."""
    A_ = narrow.operand(A)
    tracked = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (X, A, beta))
    if not _tiled(X, A) or tracked:
        return _dense_sym_product(X, A_, A_, beta, alpha, out=out, narrow=narrow)
    return _tiled_sym_product(X, A_, A_, beta, alpha, out=out, narrow=narrow)  # type: ignore[return-value]


#: the side from which :func:`accumulate_gram_left` leaves a dense update to the state write (``defer``): below it
#: the proof's calls cost more than the test and the copy they spare (many small blocks, :func:`accumulate_grams_each`)
_DEFER_DENSE_MIN = 128


def accumulate_grams_each(
    X: Sequence[Tensor], A: Sequence[Tensor], beta: float, alpha: float | Sequence[float],
    defer: Sequence[list["DeferredWrite"] | None] | None = None, dtype: torch.dtype | None = None,
) -> list[Tensor]:
    r""":func:`accumulate_gram_left` of each pair ``(X[i], A[i])`` (``alpha[i]`` its weight where ``alpha`` is a
    sequence, ``defer[i]`` its ``defer``, ``dtype`` all's), the same bits: the dense sums with their transposes
    (:func:`sym_sum`'s plain form, sides under ``_SYM_BLOCKED_MIN``) in one ``foreach`` call for them all, each other
    pair (and each narrowed by ``dtype``) as :func:`accumulate_gram_left` makes it."""
    out: list[Tensor | None] = [None] * len(X)
    alphas = [alpha] * len(X) if isinstance(alpha, (int, float)) else list(alpha)
    dense = []
    for i, (X_i, A_i) in enumerate(zip(X, A)):
        _check_batched("A", A_i)
        _check_batched_square("X", X_i)
        deferred = defer is not None and defer[i] is not None and X_i.shape[-1] >= _DEFER_DENSE_MIN
        narrow = NarrowProducts.of_gram(A_i, dtype) is not None
        if _tiled(X_i, A_i) or not isinstance(beta, float) or _sym_blocked(X_i) or deferred or narrow:
            held = None if defer is None else defer[i]
            out[i] = accumulate_gram_left(X_i, A_i, beta, alphas[i], defer=held, dtype=dtype)
        else:
            dense.append(i)
    if dense:
        halves = [_weighted_product(X[i], A[i], A[i], beta * 0.5, alphas[i] * 0.5) for i in dense]
        for i, S in zip(dense, torch._foreach_add(halves, [T.mT for T in halves])):
            out[i] = S
    return out  # type: ignore[return-value]


def accumulate_two_grams_left(X: Tensor, A: Tensor, B: Tensor, w: Tensor, beta: float, alpha: float) -> Tensor:
    r""":math:`\beta X + \alpha (A A^\top + w\, B B^\top)` (``b m k, b m l -> b m m``) with a weight ``w (b 1 1)``
    per block, exactly symmetric.

    One symmetrisation for both Gram products, and the weight applied to the ``m × m`` product of
    ``B`` instead of a scaled copy of ``B`` (``m × l``, the larger operand where ``l > m``). On a CPU
    from side ``_GRAM_TILED_MIN`` on, two tiled :func:`accumulate_gram_left` calls instead (half
    the flops each), ``B`` scaled by :math:`\sqrt w`. The range differs from scaling ``B`` first:
    :math:`B B^\top` itself must stay above the dtype's smallest normal number (``B`` of about
    ``1e-20`` in float32 loses digits to subnormals before ``w`` lifts it), where
    :math:`(B\sqrt w)(B\sqrt w)^\top` needed :math:`w B B^\top` to.
    """
    _check_batched("A", A)
    _check_batched("B", B)
    _check_batched_square("X", X)
    if _tiled(X, B):
        return accumulate_gram_left(accumulate_gram_left(X, A, beta, alpha), B * w.sqrt(), 1.0, alpha)
    return _two_grams(X, A, mm(B, B.mT), w, beta, alpha)


def _two_grams(X: Tensor, A: Tensor, C: Tensor, w: Tensor, beta: float, alpha: float) -> Tensor:
    """The dense form of :func:`accumulate_two_grams_left` with the Gram ``C = B Bᵀ`` made."""
    T = _weighted_product(X, A, A, beta * 0.5, alpha * 0.5)  # at half weight: sym_sum is then its sym
    return sym_sum(T.addcmul_(C, w, value=alpha * 0.5))


def accumulate_two_grams_left_with_energy(
    X: Tensor, A: Tensor, B: Tensor, w: Tensor, beta: float, alpha: float, Q: Tensor | None, *, product: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    r""":func:`accumulate_two_grams_left`, the squared row norms of :math:`Q^\top B` ``(b m)`` (``Q`` ``None``:
    the identity) and :math:`Q^\top B` itself where it was made (else ``None``), from one Gram product of ``B``.

    The rows' energies are the diagonal of :math:`Q^\top (B B^\top) Q`, which the dense form reads off the
    Gram it makes anyway (:func:`rotated_diagonal`): :math:`m^3 + m^2` multiply-adds instead of the
    :math:`m^2 l` of the product :math:`Q^\top B`, fewer where ``B`` is wider than tall (``l > m``), in float32
    or wider. Elsewhere (``l ≤ m``, the tiled form on a CPU, a narrower dtype, or ``product``: the caller
    reads the product itself) the product. The diagonal is exact in exact arithmetic for any ``Q``. In
    floating point a row of energy :math:`\delta` times the largest carries a relative error of about
    :math:`\epsilon/\delta` through the Gram against :math:`\epsilon/\sqrt\delta` through the product, so in
    float32 a row under about ``1e-7`` of the largest keeps no digits (as little as the factor ``X`` itself
    keeps of that direction). A negative rounding is taken as 0.
    """
    _check_batched("B", B)
    if Q is None:
        return accumulate_two_grams_left(X, A, B, w, beta, alpha), weighted_row_energy(B, None), B
    _check_batched_square("Q", Q)
    narrow = torch.finfo(B.dtype).eps > torch.finfo(torch.float32).eps
    if product or narrow or _tiled(X, B) or B.shape[-1] <= B.shape[-2]:
        QtB = mm(Q.mT, B)
        return accumulate_two_grams_left(X, A, B, w, beta, alpha), weighted_row_energy(QtB, None), QtB
    _check_batched("A", A)
    _check_batched_square("X", X)
    C = mm(B, B.mT)
    return _two_grams(X, A, C, w, beta, alpha), rotated_diagonal(C, Q), None


def rotated_diagonal(C: Tensor, Q: Tensor) -> Tensor:
    r""":math:`\mathrm{diag}(Q^\top C Q)` ``(b k)`` of a symmetric PSD ``C (b m m)`` and ``Q (b m k)``, floored at 0:
    :math:`m^2 k + m k` multiply-adds, without the ``k × k`` product :math:`Q^\top C Q`."""
    _check_batched_square("C", C)
    _check_batched("Q", Q)
    return (mm(Q.mT, C) * Q.mT).sum(-1).clamp_(min=0.0)


def accumulate_gram_right(
    X: Tensor, A: Tensor, beta: float, alpha: float, *, defer: list["DeferredWrite"] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r""":math:`\beta X + \alpha A^\top A` (``b k n -> b n n``), exactly symmetric (:func:`sym_product`;
    ``defer`` and ``dtype``: :func:`accumulate_gram_left`)."""
    _check_batched("A", A)
    return accumulate_gram_left(X, A.mT, beta, alpha, defer=defer, dtype=dtype)


def accumulate_sandwich(
    X: Tensor, Q: Tensor, Y: Tensor, beta: float, alpha: float, *, dtype: torch.dtype | None = None
) -> Tensor:
    r""":math:`\beta X + \alpha\, Q (Y Y^\top) Q^\top` (``b d d, b d d, b d k -> b d d``), exactly symmetric
    (:func:`sym_product`).

    For an orthonormal ``Q`` this is :func:`accumulate_gram_left` of :math:`Q Y`, made without that
    :math:`d \times k` product: :math:`d^2 k` multiply-adds become :math:`2 d^3` for the sandwich, fewer
    where :math:`k > 2d`. KL-Shampoo's factor update of a block's short side takes it, with ``Y`` the
    scaled rotated gradient (:class:`kronopt.factors.kl.KlKronFactors`). The increment is PSD up to
    rounding, as a congruence of the Gram matrix :math:`Y Y^\top`. ``dtype``: the Gram product :math:`Y Y^\top`'s
    precision where narrower than ``Y``'s (:func:`_narrow_gram_update`; the congruence keeps ``X``'s dtype).
    """
    _check_batched("Y", Y)
    _check_batched_square("X", X)
    _check_batched_square("Q", Q)
    narrow = NarrowProducts.of_gram(Y, dtype)
    if narrow is not None:
        gram = _narrow_gram_update(torch.empty_like(X), Y, 0.0, 1.0, narrow)  # beta = 0 never reads the empty start
        return sym_product(X, mm(Q, gram), Q, beta=beta, alpha=alpha)
    # Y Yᵀ by tiles on a CPU from side _GRAM_TILED_MIN (half the flops; beta = 0 never reads the empty start),
    # else one product: its asymmetry in rounding is removed with the result's
    gram = sym_product(torch.empty_like(X), Y, Y, beta=0.0, alpha=1.0) if _tiled(X, Y) else mm(Y, Y.mT)
    return sym_product(X, mm(Q, gram), Q, beta=beta, alpha=alpha)


@attrs.frozen(eq=False)
class DeferredWrite:
    """A state stack's new value, computed at the state write instead of in the step.

    Made only for a value proven finite on every block beforehand (from quantities the step
    computes anyway), so the guard has nothing to read in it. When the optimizer writes the
    step's state it knows which blocks are written: with every block written (on a CPU, nearly
    every step) ``into(target)`` computes the new value into the stack itself, with no new tensor,
    no pass of the guard over it and no copy; otherwise ``into`` fills a tensor of its own, which
    goes into the written blocks only (:func:`kronopt.compose.run_deferred_`).

    Attributes:
        target: the stack ``(b ...)`` the new value replaces.
        into: writes the new value into a tensor shaped like ``target`` (which may be ``target``),
            reading ``target`` as it is when called.
    """

    target: Tensor
    into: Callable[[Tensor], Any]


#: a Gram update is proven finite while the bound on its new entries (:func:`gram_update_bound`) stays below this
#: share of the dtype's largest number: a symmetrised entry's sum of two halves stays finite too
_GRAM_ENTRY_SHARE = 1 / 8


def gram_update_bound(
    X: Tensor, A: Tensor, beta: float, alpha: float, *, narrow: torch.dtype | None = None
) -> Tensor:
    r"""``(b)``: a bound on every entry of :math:`\beta X + \alpha A A^\top` as :func:`sym_product` makes it.

    Every entry of :math:`A A^\top` is at most :math:`\|A\|_F^2` in magnitude (:math:`|a_i \cdot a_j| \le
    \|a_i\|\|a_j\|`), so the new value's entries are at most :math:`|\beta| \max|X| + |\alpha| \|A\|_F^2`, raised
    here by ``k + 8`` units of the dtype's rounding (``k`` the inner side: the product's sums and the
    symmetrisation's steps), and by two units of ``narrow``'s where the product rounds its operand and results to
    that dtype (:func:`_narrow_gram_update`); there the bound is also at least the unweighted product's, ``‖A‖²_F``
    with that slack: the product is rounded to the narrow dtype before it is weighted, and a product past its
    largest value would be infinite however small the weight (a row's energy between bfloat16's and float32's
    largest values). ``max |X|`` is the bound this function gave for the update that wrote ``X``, where that write
    went into ``X`` itself and nothing has written it since (:data:`_ENTRY_BOUNDS`: the same tensor at the version
    counter the write left); otherwise it is read, one pass over ``X``. A stack's diagonal alone does not bound it:
    a factor loaded from a checkpoint or edited need not be PSD, and a NaN or an infinity off its diagonal would
    pass unseen into the deferred write (the optimizer's guard would have refused it in the step). NaN in ``X`` or
    ``A`` gives NaN, which no test below a limit passes. One read of ``A``, in its memory order whatever its strides
    (the rows' own norms read a transposed operand 3 times slower, through a temporary)."""
    b = X.shape[0]
    entries = _ENTRY_BOUNDS.get(X)
    if entries is None:
        if X.numel() == 0:
            entries = X.new_zeros(b)
        else:
            lo, hi = block_min_max(X)  # NaN propagates into both
            entries = torch.maximum(hi, -lo)
    energy = torch.linalg.vector_norm(A, dim=(-2, -1)).square()
    slack = 1.0 + (A.shape[-1] + 8) * torch.finfo(energy.dtype).eps
    if narrow is not None:
        # A's entries and the products' results rounded to it: (1 + u)³ ≤ 1 + 4u, u = eps / 2; and the product is
        # rounded before it is weighted, so it must stay in range itself: ‖A‖²_F bounds its entries (a larger
        # bound on the new entries is still one)
        slack *= 1.0 + 2 * torch.finfo(narrow).eps
        return torch.maximum(entries * abs(beta) + energy * abs(alpha), energy) * slack
    return (entries * abs(beta) + energy * abs(alpha)) * slack


def gram_update_finite(X: Tensor, A: Tensor, beta: float, alpha: float, *, bound: Tensor | None = None) -> Tensor:
    r"""``(b)``: whether :math:`\beta X + \alpha A A^\top` is proven finite: its entries' bound
    (:func:`gram_update_bound`, or ``bound`` where the caller made it) below ``_GRAM_ENTRY_SHARE`` of the
    dtype's largest number. True proves the value finite; False proves nothing (a block between that share and
    overflow, or with NaN or inf in ``A`` or ``X``)."""
    bound = gram_update_bound(X, A, beta, alpha) if bound is None else bound
    return bound <= torch.finfo(bound.dtype).max * _GRAM_ENTRY_SHARE


class _EntryBounds:
    """Bounds ``(b)`` on the largest entry of state stacks, each kept from the deferred Gram update that wrote the
    stack in place (:func:`accumulate_gram_left`), with the stack (held weakly) and the version counter the write
    left it at. :meth:`get` gives a bound only for that very tensor at that version: after a load, an edit, the
    optimizer's copy of an update made in the step (a refresh step's), for a copy of the stack, another tensor at
    its address, or an inference tensor (no version counter), the caller reads the entries again. A write that torch
    does not count (through ``.data``) is not seen, as with the optimizer's other carried bounds."""

    def __init__(self) -> None:
        self._held: dict[int, tuple["_Seen", Tensor]] = {}

    def get(self, X: Tensor) -> Tensor | None:
        held = self._held.get(id(X))
        return held[1] if held is not None and held[0].holds(X) else None

    def put(self, X: Tensor, bound: Tensor) -> None:
        version = _version(X)
        if version is None:
            return
        key, held = id(X), self._held

        def gone(ref: "weakref.ref[Tensor]") -> None:  # the stack freed: its entry goes (not a newer one at its id)
            if key in held and held[key][0].ref is ref:
                held.pop(key, None)

        held[key] = (_Seen(X, version, weakref.ref(X, gone)), bound)


def _version(t: Tensor) -> int | None:
    """``t``'s version counter (how many in-place changes it has seen); ``None`` for an inference tensor, which
    keeps none (a gradient made under ``torch.inference_mode()``): such a tensor may only change in place inside
    that mode, not between a step's check of its gradients and their use."""
    return None if t.is_inference() else t._version


class _Seen:
    """A tensor (held weakly) at the version counter it had when recorded: :meth:`holds` while it is that very tensor at
    that version (nothing torch counts has written it since). A copy or a pickle of its holder gets ``None`` in its
    place (a weak reference is neither copied nor pickled), so a copied optimizer reads again what it was for."""

    __slots__ = ("ref", "version")

    def __init__(self, t: Tensor, version: int, ref: "weakref.ref[Tensor] | None" = None) -> None:
        self.ref, self.version = (weakref.ref(t) if ref is None else ref), version

    @staticmethod
    def of(t: Tensor, before: "_Seen | None") -> "_Seen | None":
        """``t`` at its version now (``None`` for an inference tensor, which keeps no version counter); ``before``'s
        weak reference kept where it is ``t``'s."""
        version = _version(t)
        if version is None:
            return None
        return _Seen(t, version, before.ref if before is not None and before.ref() is t else None)

    def holds(self, t: Tensor) -> bool:
        return self.version == _version(t) and self.ref() is t

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (type(None), ())


#: the entries' bounds of the stacks the deferred Gram updates wrote (:func:`gram_update_bound`)
_ENTRY_BOUNDS = _EntryBounds()


def kl_clamp_value(d: int, max_clamp: float) -> float:
    r"""KL-Shampoo's ceiling on an inverse root of a side of size ``d``: :math:`\max(10, \min(d, c_{\max}))`."""
    return float(max(10.0, min(float(d), float(max_clamp))))


def rounding_floor(d: int, dtype: torch.dtype) -> float:
    """``max(d, 16)`` ulps of ``dtype``: the relative size below which a difference of traces or energies over a side of
    ``d`` (a restricted side's flat eigenvalue: the ``ema`` and ``projector_splitting`` estimators' complement energy,
    a re-projection's μ') is taken as its rounding, 0. On small sides the rounding of such a
    difference reached 9.4 ulps of its total (``d = 2, r = 1``: a re-projection within the same subspace left μ' at
    8.9e-16 of a total of order 1 in float64, above ``d`` ulps), hence the 16."""
    return max(d, 16) * torch.finfo(dtype).eps


def eigenvalue_floor(k: int, dtype: torch.dtype) -> float:
    """``4 √max(k, 16)`` ulps of ``dtype`` (16 up to ``k = 16``, 128 at ``k = 1024``): the relative size, to the largest,
    below which an eigensolver's eigenvalue of a ``k × k`` symmetric PSD factor is taken as its rounding. A
    rank-deficient factor's null eigenvalues (an EMA of ``G Gᵀ`` over gradients of a lower rank, float32 and float64)
    came out within 1.5 ulps of the largest at ``k ≤ 64``, 4.9 at 256 and 8.2 at 1024; a real eigenvalue at the floor
    keeps most of its digits (float32 ``eigh`` erred by 3.5e-7 of the largest at ``k = 1024``)."""
    return _solver_ulps(k) * torch.finfo(dtype).eps


def power_rounding_floor(k: int, dtype: torch.dtype) -> float:
    """``4 max(k, 16)`` ulps of ``dtype``: the relative size, to the largest ``|R_ii|``, below which a column of a power
    product's QR is taken as rounding (:func:`_power_basis`). A column of ``A Q`` carries the rounding of a
    ``k``-term product (up to ``k`` ulps of ``‖A‖``) before the QR's own, and without pivoting the QR reveals a rank
    only roughly: a dependent column of a rank-deficient float64 factor's product read 27 ulps of the largest at
    ``k = 24``, above :func:`eigenvalue_floor`'s 20, against 1e-3 and more for a real one."""
    return 4.0 * max(k, 16) * torch.finfo(dtype).eps


def _solver_ulps(k: int) -> float:
    """``4 √max(k, 16)``: how many ulps of a ``k``-sided computation's scale its rounding is taken to reach
    (:func:`eigenvalue_floor`; :func:`restricted_refresh`'s power product columns, in units of its regulariser)."""
    return 4.0 * math.sqrt(max(k, 16))


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with NaN and ±inf replaced by 0."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def tracked_inverse_root_ema(s: Tensor, d: Tensor, rho: float, clamp: float | None) -> Tensor:
    r"""One EMA step of eigenvalue estimates kept as inverse square roots :math:`s = \lambda^{-1/2}`.

    .. math::
        \lambda_{prev} = 1/s^2,\quad \lambda = \rho\,\lambda_{prev} + (1-\rho)\,d,\quad
        s' = \min(\lambda^{-1/2},\ c)

    A non-finite :math:`\lambda_{prev}` (from :math:`s = 0`) counts as 0 and a
    non-finite :math:`\lambda^{-1/2}` (from :math:`\lambda = 0` or a NaN statistic)
    becomes 0, so a vanishing eigenvalue gives a zero step along its direction and
    never a NaN (kl_shampoo.md §6 step 4). The clamp :math:`c` (``None``: off) also
    floors the next :math:`\lambda_{prev}` at :math:`1/c^2`.

    Args:
        s: stored inverse roots, ``b k``.
        d: the new statistic (the diagonal of the factor increment in the basis), ``b k``.
        rho: retention :math:`\rho \in [0, 1)`.
        clamp: ceiling :math:`c` of :math:`s`, or ``None``.

    Returns:
        The new inverse roots, ``b k``, finite and in :math:`[0, c]`.
    """
    if s.shape != d.shape:
        raise ValueError(f"s and d must have the same shape, got {tuple(s.shape)} and {tuple(d.shape)}")
    lam_prev = finite_or_zero(s.square().reciprocal_())
    lam = torch.lerp(lam_prev, d, 1.0 - rho)
    s_new = finite_or_zero(lam.rsqrt())
    if clamp is not None:
        s_new = s_new.clamp(max=clamp)
    return s_new


def inverse_square(s: Tensor) -> Tensor:
    r"""Eigenvalues from stored inverse roots: :math:`\lambda = 1/s^2` (:math:`s = 0` gives :math:`+\infty`)."""
    return s.square().reciprocal_()


def joined(vectors: Sequence[Tensor]) -> Tensor:
    """The entries of every tensor of ``vectors`` (one dtype and device: :func:`alike` groups them) in one flat
    vector, in order: the elementwise work of many small buckets' vectors made in one call each (:func:`parted`
    gives the parts back). Every elementwise kernel used on it rounds an entry alone, wherever it lies (tested
    so: ``tests/unit/test_eigen_steps.py``), so each part comes out as it would alone. The parts are views into
    one vector, at any offset: not for products, which MKL rounds by their operands' alignment."""
    return torch.cat([v.reshape(-1) for v in vectors])


def parted(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` (:func:`joined`) cut back into views shaped as ``like``'s tensors."""
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def alike(tensors: Sequence[Tensor]) -> list[list[int]]:
    """The positions of ``tensors``, grouped by dtype and device (each group one :func:`joined` vector); a tensor
    that is not row-major (contiguous) in a group of its own, so that a result made from it alone keeps its layout."""
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device) if t.is_contiguous() else i, []).append(i)
    return list(groups.values())


def spread(values: Sequence[float], parts: Sequence[Tensor], flat: Tensor) -> Tensor:
    """A vector like ``flat`` (:func:`joined` of ``parts``) holding ``values[i]`` at every entry of part ``i``: each
    part's own number, for an operation on the flat vector."""
    counts = torch.tensor([t.numel() for t in parts], device=flat.device)
    numbers = torch.tensor(values, dtype=flat.dtype, device=flat.device)
    return numbers.repeat_interleave(counts, output_size=flat.numel())


def flat_each(fn: Callable[[Tensor], Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """``fn`` (elementwise, made of kernels that round an entry alone: :func:`joined`) of each tensor, the same bits,
    in one call for each dtype and device among them; a tensor laid out otherwise than row-major alone, so that its
    result keeps its layout as ``fn`` of it alone does."""
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for group in alike(tensors):
        if len(group) == 1:
            out[group[0]] = fn(tensors[group[0]])
            continue
        part = [tensors[i] for i in group]
        for i, t in zip(group, parted(fn(joined(part)), part)):
            out[i] = t
    return out


def inverse_squares_each(s: Sequence[Tensor]) -> list[Tensor]:
    """:func:`inverse_square` of each tensor of ``s``, the same bits, in one pass over them all."""
    return flat_each(inverse_square, s)


def tracked_inverse_root_ema_each(
    s: Sequence[Tensor], d: Sequence[Tensor], rho: float, clamp: Sequence[float | None],
    divisors: Sequence[float] | None = None,
) -> list[Tensor]:
    """:func:`tracked_inverse_root_ema` of each ``(s[i], d[i] / divisors[i], rho, clamp[i])`` (no division where
    ``divisors`` is ``None``), the same bits: the elementwise work of them all on one flat vector for each dtype and
    device (:func:`joined`), each entry divided by and clamped at its own part's numbers (a ``None`` ceiling: none;
    a division by a tensor of the number rounds as by the number)."""
    for s_i, d_i in zip(s, d):
        if s_i.shape != d_i.shape:
            raise ValueError(f"s and d must have the same shape, got {tuple(s_i.shape)} and {tuple(d_i.shape)}")
    out: list[Tensor] = [None] * len(s)  # type: ignore[list-item]
    for group in alike(s):
        if len(group) == 1:  # alone, as the part's own call (a stack of another layout keeps it)
            i = group[0]
            out[i] = tracked_inverse_root_ema(s[i], d[i] if divisors is None else d[i] / divisors[i], rho, clamp[i])
            continue
        part = [s[i] for i in group]
        S, D = joined(part), joined([d[i] for i in group])
        if divisors is not None:
            D = D / spread([divisors[i] for i in group], part, S)
        flat = tracked_inverse_root_ema(S, D, rho, None)
        ceilings = [clamp[i] for i in group]
        if any(c is not None for c in ceilings):
            # min(x, c) rounds nothing: the same bits as each part's clamp (x is finite here)
            flat = torch.minimum(flat, spread([math.inf if c is None else c for c in ceilings], part, S))
        for i, t in zip(group, parted(flat, part)):
            out[i] = t
    return out


def product_inverse_root_denominators_each(
    lam_L: Sequence[Tensor], lam_R: Sequence[Tensor], exponent: float, eps: float
) -> list[Tensor]:
    """:func:`product_inverse_root_denominator` of each pair ``(lam_L[i], lam_R[i])`` (both sides given), the same
    bits: the sides' roots of them all on one flat vector (for the exponents whose :func:`power` rounds an entry
    alone, :data:`POSITION_FREE_EXPONENTS`), their outer products and ``ε`` in a ``foreach`` call each, and one read
    on the host for the NaN mend (made on every denominator where any root is zero: a denominator without NaN
    comes out of it unchanged, its entries being at least ``ε ≥ 0``)."""
    if not lam_L:
        return []
    if -exponent not in POSITION_FREE_EXPONENTS:
        return [product_inverse_root_denominator(a, b, exponent, eps) for a, b in zip(lam_L, lam_R)]
    sides = [*lam_L, *lam_R]
    roots: list[Tensor] = [None] * len(sides)  # type: ignore[list-item]
    positive = all(t.numel() for t in sides)  # no root zero (an empty side counts as one: as alone)
    for group in alike(sides):
        part = [sides[i] for i in group]
        flat = power((part[0] if len(group) == 1 else joined(part)).clamp(min=0.0), -exponent)
        flat = flat.nan_to_num(nan=math.inf, posinf=math.inf)
        positive = positive and host_verdicts(flat) and cpu_all(flat.amin() > 0)
        for i, r in zip(group, [flat] if len(group) == 1 else parted(flat, part)):
            roots[i] = r
    k = len(lam_L)
    out = torch._foreach_mul([r.unsqueeze(-1) for r in roots[:k]], [r.unsqueeze(-2) for r in roots[k:]])
    torch._foreach_add_(out, eps)
    if not positive:
        for t in out:
            t.nan_to_num_(nan=math.inf, posinf=math.inf)
    return out


def orthonormalize(X: Tensor, *, overwrite: bool = False) -> Tensor:
    r"""Orthonormal basis of the columns of ``X (b n k)``, ``k ≤ n``: the Q of a thin QR, with :math:`\mathrm{diag}(R) \ge 0`.

    The sign convention makes the result unique for full-rank input, so an
    already orthonormal ``X`` comes back unchanged (up to round-off) and the column
    order is kept: column ``j`` spans the part of ``X[:, j]`` orthogonal to the
    previous columns. ``k = 0`` returns ``X``.

    With ``overwrite``, a column-major ``X`` the caller owns is factored in its own memory (``geqrf``, the
    signs read off its diagonal, then ``householder_product``, the routines of ``torch.linalg.qr``: the same
    bits) and the result is ``X``: no copy of ``X`` into LAPACK's layout and no ``R`` copied out. On stacks
    of ``4 × 1024 × 128``, ``4 × 768 × 128`` and ``4 × 256 × 64`` on two Zen 5 cores that took 0.84, 0.91 and
    0.96 of the plain path's time on the same values laid row-major, timed side by side (docs/performance_log.md,
    forty-third session). Another layout, or an ``X`` that is not plain (:func:`_plain`: autograd tracks it, a
    forward-mode tangent or a ``torch.func`` transform wraps it, all of which refuse ``out=``), takes the plain
    path, whose ``Q`` autograd may keep (the signs are applied out of place there).
    """
    _check_batched("X", X)
    if X.shape[-1] > X.shape[-2]:
        raise ValueError(f"orthonormalize needs k ≤ n columns, got shape {tuple(X.shape)}")
    if X.shape[-1] == 0:
        return X
    if _lapack_in_place(X, overwrite):
        tau = X.new_empty(X.shape[:-2] + (X.shape[-1],))
        torch.geqrf(X, out=(X, tau))
        signs = torch.sign(torch.diagonal(X, dim1=-2, dim2=-1))  # R's diagonal, before Q overwrites it
        # torch's own routines on X, not on a padded copy: the bits of torch.linalg.qr on every shape
        return _householder_product(X, tau, X).mul_(_unit_signs(signs).unsqueeze(-2))
    Q, R = torch.linalg.qr(X)
    return Q * _unit_signs(torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))).unsqueeze(-2)


def _unit_signs(signs: Tensor) -> Tensor:
    """``signs`` (each -1, 0 or 1, or NaN) with its zeros taken as 1: a zero column of ``R`` keeps its ``Q`` column."""
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def spread_columns(n: int, k: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""A fixed, dense ``n × k`` matrix (cosines) used to complete a subspace; no column is a coordinate vector.

    :math:`\Omega_{ij} = \cos(\pi (i + 1/2)(j + 1/3) / n)`: deterministic and in
    general position with respect to coordinate subspaces.
    """
    i = torch.arange(n, dtype=torch.float64).unsqueeze(-1) + 0.5
    j = torch.arange(k, dtype=torch.float64).unsqueeze(0) + 1.0 / 3.0
    return torch.cos(math.pi * i * j / max(n, 1)).to(dtype=dtype, device=device)


def top_right_singular(G: Tensor, r: int) -> Tensor:
    r"""Orthonormal ``b n r``: the top ``r`` right singular vectors of each ``G (m n)``, completed when needed.

    With :math:`G = P \Sigma V^\top` (thin SVD, singular values descending) the
    first :math:`k = \min(r, m, n)` columns are :math:`V_{:, :k}`; the remaining
    :math:`r - k` columns complete them with the part of the fixed
    :func:`spread_columns` orthogonal to them (Gram–Schmidt order). Runs in
    float64 when the solver fails in the input dtype; where that fails too, every
    column comes from :func:`spread_columns` (an orthonormal start that the restricted
    side's refreshes then turn towards the gradients' subspace).
    """
    _check_batched("G", G)
    b, m, n = G.shape
    if r > n:
        raise ValueError(f"rank {r} exceeds the side {n}")
    if r == 0:
        return G.new_zeros(b, n, 0)
    svd = _svd_retried(G, "the first gradient (a restricted side's first subspace)")
    Vh = G.new_zeros(b, 0, n) if svd is None else svd[2]
    V = _completed(Vh, r)
    if svd is not None and svd[3] is not None:  # the blocks the SVD failed on alone: every column spread
        V = select_blocks(svd[3], V, _completed(Vh[:, :0, :], r))
    return V


def _completed(Vh: Tensor, r: int) -> Tensor:
    """:func:`top_right_singular`'s ``b n r`` from the rows of ``Vh (b k n)``: its first ``min(r, k)`` rows as
    columns, completed by the part of :func:`spread_columns` orthogonal to them."""
    b, _, n = Vh.shape
    k = min(r, Vh.shape[-2])
    V = Vh[:, :k, :].mT
    if k < r:
        extra = spread_columns(n, r - k, dtype=Vh.dtype, device=Vh.device).expand(b, n, r - k)
        V = orthonormalize(torch.cat([V, extra], dim=-1))
    return V


def project_out_right(M: Tensor, U: Tensor, MU: Tensor | None = None) -> Tensor:
    r"""The complement part :math:`M - (M U) U^\top` of ``M (b m n)`` for orthonormal ``U (b n r)``
    (``MU``: :math:`M U`, where the caller has it).

    The complement comes in ``M``'s layout: for a transposed view (a left-restricted side's
    update runs on :math:`G^\top`) it is :math:`(M^\top - U (MU)^\top)^\top`, since a row-major
    result would start as a copy of ``M`` across its rows (about 1.7× the time of the whole
    call on ``4 × 256 × 1024``)."""
    _check_batched("M", M)
    MU = mm(M, U) if MU is None else MU
    if not M.is_contiguous() and M.mT.is_contiguous():
        return _weighted_product(M.mT, U, MU, 1.0, -1.0).mT
    return _weighted_product(M, MU, U, 1.0, -1.0)


def whitened_complement_norm(
    C: Tensor, Q_other: Tensor | None, lam_other: Tensor | None, mu: Tensor, *, restricted: str, solved: bool = False
) -> Tensor:
    r"""Frobenius norm of the complement block as full KL-Shampoo would step it, ``(b 1 1)``.

    For a restricted right side :math:`\hat R = U S U^\top + \mu P_\perp` and the
    complement :math:`C = M P_\perp` ``(b m n)``, the whitened complement is
    :math:`\mu^{-1/2} \hat L^{-1/2} C` with
    :math:`\hat L^{-1/2} = Q_L \mathrm{diag}(\lambda_L^{-1/2}) Q_L^\top`, so

    .. math::
        \nu = \mu^{-1/2}\, \big\|\mathrm{diag}(\lambda_L^{-1/2})\, Q_L^\top C\big\|_F

    (the left-restricted case mirrors it: :math:`\mu^{-1/2}\|C Q_R \mathrm{diag}(\lambda_R^{-1/2})\|_F`).
    ``Q_other``/``lam_other`` ``None`` means the other side is not rotated
    (identity, unit eigenvalues). :math:`\lambda = +\infty` gives a zero weight; without ``solved`` a zero
    or negative :math:`\lambda` gives a non-finite :math:`\nu`.

    ``solved``: ``lam_other`` are a solver's eigenvalues of the other side's factor (the basis's, from eigh or
    Rayleigh quotients at its last refresh), not estimates an estimator keeps positive (KL's tracked ones, read as
    ``1/s²``). Those within the solver's rounding of zero (at most :func:`eigenvalue_floor` of the block's largest
    finite one) are not known to be positive: the norm takes the pseudo-inverse root there, a zero weight, as the identity of
    pro_kl_shampoo.md §4 does on a rank-deficient block. (The factor of a side that was rank-deficient at the last
    refresh, DyKAF's rank-one start or a first gradient with fewer columns than rows, has such estimates; their
    inverse roots, 1e7–1e8 in float64, made the complement block 1e8 times an Adam step.)
    The weights scale the columns of :math:`Q_L` (``m × m``) before the product, so the
    norm is one contiguous pass over the product, not a strided reduction per column and
    a weighted copy (the left-restricted case reduces its columns). Cost: one ``m × m × n`` product.
    Where oneDNN makes it (:func:`_by_onednn`), only each block's norm is read, where oneDNN writes the
    block's product: no stack of them is made and copied into (a block's bits are its own, as in
    :func:`_onednn_mm`). Measured on a Zen 5 (2 threads, pro_kl_shampoo on 4 layers of d = 256): 5.6 against
    5.8 ms a step with the freed memory retained, 5.8 against 8.6 under glibc's defaults, whose fresh stack
    faulted its pages in every step.
    """
    _check_batched("C", C)
    if restricted not in ("left", "right"):
        raise ValueError(f"restricted must be 'left' or 'right', got {restricted!r}")
    weight = None
    if lam_other is not None:
        weight = lam_other.rsqrt()
        k = lam_other.shape[-1]
        if solved and k > 0:  # the pseudo-inverse root on the solver's rounding; a NaN or infinite estimate weighs 0 too
            top = torch.where(lam_other < math.inf, lam_other, 0.0).amax(-1, keepdim=True)
            weight = torch.where(lam_other > top * eigenvalue_floor(k, lam_other.dtype), weight, 0.0)
        weight = weight.unsqueeze(-2)  # (b 1 k), on the columns of Q
    if Q_other is None:
        X = C if weight is None else C * (weight.mT if restricted == "right" else weight)
    else:
        Q = Q_other if weight is None else Q_other * weight
        A, B = (Q.mT, C) if restricted == "right" else (C, Q)
        if _by_onednn(A, B) and A.ndim == 3 and A.shape[0] > 0:  # (an empty stack: mm's empty product below)
            # only each block's norm is read: taken where oneDNN writes the product, not copied into a stack first
            norm = torch.stack([torch.linalg.vector_norm(P) for P in _onednn_blocks(A, B)]).view(-1, 1, 1)
            return norm * mu.rsqrt().view(-1, 1, 1)
        X = mm(A, B)
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * mu.rsqrt().view(-1, 1, 1)


def whitened_complement_norms_each(
    C: Sequence[Tensor], Q_other: Sequence[Tensor | None], lam_other: Sequence[Tensor | None], mu: Sequence[Tensor],
    restricted: Sequence[str],
) -> list[Tensor]:
    """:func:`whitened_complement_norm` of each block stack (without ``solved``: tracked eigenvalues), the same bits:
    the weights and the flat eigenvalues' roots of them all in one pass over one flat vector each
    (:func:`flat_each`), the weighted bases in one ``foreach`` call, each product and norm in its turn. A product
    oneDNN makes, or a side not rotated, is made alone."""
    out: list[Tensor | None] = [None] * len(C)
    at = []
    for i, (c, Q, lam, side) in enumerate(zip(C, Q_other, lam_other, restricted)):
        if Q is None or lam is None or side not in ("left", "right"):
            out[i] = whitened_complement_norm(c, Q, lam, mu[i], restricted=side)
        else:
            _check_batched("C", c)
            A, B = (Q.mT, c) if side == "right" else (c, Q)
            if _by_onednn(A, B):
                out[i] = whitened_complement_norm(c, Q, lam, mu[i], restricted=side)
            else:
                at.append(i)
    if not at:
        return out  # type: ignore[return-value]
    weights = flat_each(torch.rsqrt, [lam_other[i] for i in at])  # type: ignore[misc]
    Q = torch._foreach_mul([Q_other[i] for i in at], [w.unsqueeze(-2) for w in weights])  # type: ignore[misc]
    products = [mm(q.mT, C[i]) if restricted[i] == "right" else mm(C[i], q) for i, q in zip(at, Q)]
    norms = [torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) for X in products]
    roots = flat_each(torch.rsqrt, [mu[i] for i in at])
    for i, nu in zip(at, torch._foreach_mul(norms, [r.view(-1, 1, 1) for r in roots])):
        out[i] = nu
    return out  # type: ignore[return-value]


def rescale_factors_each(D: Sequence[Tensor], norms: Sequence[Tensor]) -> list[Tensor]:
    """:func:`rescale_factor` of each ``(D[i], norms[i])``, the same bits: each block's norm in its turn, the ratios
    of them all in one pass over one flat vector per dtype and device."""
    norm_D = [torch.linalg.vector_norm(d, dim=(-2, -1), keepdim=True, dtype=n.dtype) for d, n in zip(D, norms)]
    out: list[Tensor] = [None] * len(D)  # type: ignore[list-item]
    for group in alike(list(norms)):
        if len(group) == 1:
            out[group[0]] = rescale_factor(D[group[0]], norms[group[0]])
            continue
        N, ND = joined([norms[i] for i in group]), joined([norm_D[i] for i in group])
        ratio = N / ND.clamp(min=torch.finfo(N.dtype).tiny)
        for i, t in zip(group, parted(torch.where(ND > 0, ratio, torch.zeros_like(ratio)), [norms[i] for i in group])):
            out[i] = t
    return out


def restricted_refresh(P: Tensor, U: Tensor, lam: Tensor, *, first: bool) -> tuple[Tensor, Tensor, Tensor]:
    r"""New subspace of a restricted side from the power product :math:`P = \hat F U` ``(b d r)``.

    First refresh: :math:`U' = \mathrm{orth}(P)` (the factor estimator's first call
    puts its initial subspace there). Later: Rayleigh–Ritz on the current subspace,
    :math:`U^\top P = V E V^\top` (``r × r``, descending), then one warm-started power
    step :math:`U' = \mathrm{orth}(P V)`, so the columns come out ordered by their Ritz
    values :math:`E` (the new eigenvalue estimates). A vanishing direction of
    :math:`P` keeps the matching current direction (a ``10⁻¹⁶``-relative multiple of
    :math:`U V` is added before the QR); a direction whose Ritz value is within the
    solver's rounding of zero (:func:`eigenvalue_floor` of the largest) and whose column of
    :math:`P V` is rounding (at most ``4 √max(d, 16)`` times that multiple) takes the
    current one, :math:`(U V)_j`, whole: that column, as large as the multiple, would pick
    a direction (and a subspace) by the rounding, another in a stack than alone; the Ritz
    vectors of such values are taken in a basis of their span that does not depend on
    the solver's choice. Blocks whose output is not finite keep
    :math:`U`. Cost :math:`O(d r^2 + r^3)`.

    Returns:
        ``(U', eigenvalue estimates (b r), ok (b))``.
    """
    r = U.shape[-1]
    if r == 0:
        return U, lam, torch.ones(U.shape[0], dtype=torch.bool, device=U.device)
    finite = finite_blocks(P)
    P = select_blocks(finite, P, U)
    # ‖P‖ taken of P times the power of two that brings its largest entry near 1 (the same bits where a
    # plain norm is in range): P has the factor's size, a squared gradient's in SOAP, whose squares a
    # plain float32 norm overflows from gradient entries near 1e10 on small blocks (δ infinite: no refresh)
    scale = power_of_two_scale(P.abs().amax(dim=(-2, -1), keepdim=True))
    delta = torch.finfo(P.dtype).eps * (block_norm(P * scale) / scale) + torch.finfo(P.dtype).tiny
    ok = finite
    if first:
        W, lam_new = P + delta * U, None
    else:
        try:
            eig = eigh_descending(sym(mm(U.mT, P)))
        except ArithmeticError:
            return U, lam, torch.zeros_like(finite)
        V, lam_new, ok = eig.Q, eig.lam, ok & eig.ok
        # Ritz values within the solver's rounding of zero (the last c): their vectors V_c are any basis of their span,
        # which rounding picks (another in a stack than alone). Take the one whose last c rows are lower triangular
        # with a positive diagonal, V_c Q with Q R the QR of those rows' transpose Mᵀ: the same whatever basis the
        # solver returned (V_c S, S orthogonal, has rows M S, whose transpose's Q is Sᵀ Q). Where none vanish, V I = V
        vanish = null_columns(lam_new)
        both = vanish.unsqueeze(-1) & vanish.unsqueeze(-2)
        V = mm(V, orthonormalize(torch.where(both, V.mT, torch.eye(r, dtype=V.dtype, device=V.device))))
        if _by_onednn(V.mT, P.mT):
            # W = P V + δ U V laid column-major, as the .mT of Vᵀ Pᵀ + δ Vᵀ Uᵀ: the layout LAPACK's QR works in, so
            # it is factored where it lies (orthonormalize's overwrite), not copied across first. oneDNN makes each
            # block apart, whatever the stack; MKL rounds the r × r by r × d product by the stack's size (ranks 5,
            # 6, 10 measured), so there the d × r by r × r order stays (a block's bits in a stack as alone)
            UVt = mm(V.mT, U.mT)
            W, UV = mm(V.mT, P.mT).add_(UVt * delta).mT, UVt.mT
        else:
            UV = U @ V
            W = P @ V + delta * UV
        # a Ritz value of rounding whose power product is rounding too (a small Ritz value can be a real direction
        # that U barely reaches: ‖P v‖ ~ √(λ_true · λ_Ritz)): that direction of U V, not P V's rounding (W written
        # where it lies, where it may)
        noise = delta.squeeze(-1) * _solver_ulps(P.shape[-2])
        vanish = vanish & (torch.linalg.vector_norm(W, dim=-2) <= noise)
        if _plain(W):
            torch.where(vanish.unsqueeze(-2), UV, W, out=W)
        else:
            W = torch.where(vanish.unsqueeze(-2), UV, W)
    U_new = orthonormalize(W, overwrite=True)
    if lam_new is None:
        lam_new = (U_new * P).sum(-2)
    ok = ok & finite_blocks(U_new, lam_new)
    return select_blocks(ok, U_new, U), select_blocks(ok, lam_new, lam), ok


def subspace_split(X: Tensor, U: Tensor, *, left: bool = False, coords: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""``X (b m n)`` against an orthonormal ``U (b n r)``: :math:`(X U,\ X - (X U) U^\top)`, the
    subspace coordinates ``(b m r)`` and the complement ``(b m n)`` in ``X``'s layout
    (:func:`project_out_right`). With ``left``, ``U (b m r)`` on the other side:
    :math:`(U^\top X,\ X - U (U^\top X))` (:func:`project_out_left`). ``coords``: the coordinates,
    where the caller has them. Cost :math:`2mnr` (:math:`mnr` with ``coords``)."""
    if left:
        Y = mm(U.mT, X) if coords is None else coords
        return Y, project_out_left(X, U, Y)
    Y = mm(X, U) if coords is None else coords
    return Y, project_out_right(X, U, Y)


def subspace_join(coords: Tensor, complement: Tensor, U: Tensor, *, left: bool = False) -> Tensor:
    r"""The inverse of :func:`subspace_split`: :math:`Y U^\top + C` for coordinates ``Y (b m r)`` against
    an orthonormal ``U (b n r)``, or :math:`U Y + C` with ``left`` (``Y (b r n)``, ``U (b m r)``). ``U`` is
    read in the complement's dtype (a basis may be stored narrower)."""
    U = U.to(complement.dtype)
    if left:
        return _weighted_product(complement, U, coords.mT, 1.0, 1.0)
    return _weighted_product(complement, coords, U, 1.0, 1.0)


def weighted_row_energy(X: Tensor, w: Tensor | None) -> Tensor:
    r"""``b m n, b n -> b m``: :math:`\sum_j X_{ij}^2 w_j` (``w`` ``None``: unit weights, the squared
    row norms, read in one pass without an ``m × n`` temporary where the rows are contiguous; across
    a transposed view's strided rows ``vector_norm`` is 5–20 times slower than squaring into a
    temporary and summing that, 1.4–2.5 ms against 0.3 on ``2048 × 512``, so that takes the sum)."""
    if w is None:
        return torch.linalg.vector_norm(X, dim=-1).square() if X.stride(-1) == 1 else X.square().sum(-1)
    return (X.square() * w.unsqueeze(-2)).sum(-1)


def restricted_power_product(U: Tensor, S: Tensor, increment: Tensor, rho: float) -> Tensor:
    r"""The action of the updated restricted factor on its own subspace, ``(b d r)``.

    For :math:`\hat R = U S U^\top + \mu P_\perp` and an EMA step
    :math:`\hat R \leftarrow \rho \hat R + (1-\rho) A` with :math:`A U =` ``increment``
    (already scaled by :math:`1-\rho`): :math:`\hat R_{new} U = \rho\, U S + A U`,
    since :math:`P_\perp U = 0` (pro_kl_shampoo.md §7).
    """
    return _weighted_product(increment, U, S.mT, 1.0, rho)


def reproject_flat(
    U_new: Tensor, U_old: Tensor, S: Tensor, mu: Tensor, lam: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Project a low-rank + flat factor onto a new subspace (the M-projection, pro_kl_shampoo.md §7).

    With :math:`T = U'^\top U` ``(b r r)``, the old factor
    :math:`\hat R = U S U^\top + \mu P_\perp` seen from the new subspace is

    .. math::
        S' = T S T^\top + \mu (I - T T^\top),\qquad
        \mu' = \frac{\mathrm{tr} S + (d - r)\mu - \mathrm{tr} S'}{d - r},\qquad
        \lambda'_j = \sum_k T_{jk}^2 \lambda_k + \mu \big(1 - \sum_k T_{jk}^2\big)

    (``lam`` ``(b r)``, optional, are eigenvalue estimates attached to the old columns;
    the trace of :math:`\hat R` is preserved). ``mu`` is ``(b)``; :math:`\mu'` is not
    floored here (``d = r`` divides by 1). Returns ``(S', μ', λ')`` (``λ'`` ``None``
    without ``lam``).
    """
    _check_batched("S", S)
    d, r = U_new.shape[-2], U_new.shape[-1]
    T = mm(U_new.mT, U_old)
    T2 = T.square()
    mu_ = mu.view(-1, 1, 1)
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    S_new = sym(T @ S @ T.mT + mu_ * (eye - T @ T.mT))
    trace = lambda X: torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    mu_new = (trace(S) + (d - r) * mu - trace(S_new)) / max(d - r, 1)
    if lam is None:
        return S_new, mu_new, None
    lam_new = matvec(T2, lam) + mu.unsqueeze(-1) * (1 - T2.sum(-1))
    return S_new, mu_new, lam_new


def project_out_left(M: Tensor, U: Tensor, UM: Tensor | None = None) -> Tensor:
    r"""The complement part :math:`M - U (U^\top M)` of ``M (b m n)`` for orthonormal ``U (b m r)``
    (``UM``: :math:`U^\top M`, where the caller has it): :func:`project_out_right` of :math:`M^\top`."""
    _check_batched("M", M)
    return project_out_right(M.mT, U, None if UM is None else UM.mT).mT


def product_inverse_root_scale(lam_L: Tensor | None, lam_R: Tensor | None, exponent: float, eps: float) -> Tensor:
    r"""KL-Shampoo's scaling with ε outside the root of the eigenvalue product, ``b m 1 × b 1 n -> b m n``.

    .. math::
        s = \lambda_+^{p},\qquad P_{ij} = \frac{s_{L,i}\, s_{R,j}}{1 + \epsilon\, s_{L,i}\, s_{R,j}}
        = \frac{1}{(\lambda_{L,i}\lambda_{R,j})^{-p} + \epsilon}

    (kl_shampoo.md §6 step 2, :math:`p = -1/2`): the reciprocal of
    :func:`product_inverse_root_denominator`, which a step divides by instead.
    """
    return product_inverse_root_denominator(lam_L, lam_R, exponent, eps).reciprocal()


#: the exponents :math:`e` whose :func:`power` rounds each entry alone, wherever it lies in its tensor (square roots, a
#: reciprocal; ``±1/2`` torch's ``pow`` takes as ``sqrt`` and ``rsqrt``, ``±1`` as itself and a division): a flat
#: vector of many blocks' entries (:func:`joined`) then gives each the bits it has alone
POSITION_FREE_EXPONENTS = frozenset((0.25, -0.25, 0.5, -0.5, 1.0, -1.0))


def power(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent``, for ``exponent = ±1/4`` by square roots (and a reciprocal): on a CPU torch's ``pow``
    rounds a few entries of a large tensor (its vectorised body) otherwise than of a small one (its scalar
    tail), so a block's root would depend on how many blocks share its stack (work sharding stacks fewer:
    shampoo's ``-1/4`` broke sharding on = off bit for bit). A square root and a division are rounded
    exactly either way. ``±1/2`` need nothing: torch's ``pow`` takes ``sqrt`` and ``rsqrt`` there."""
    if exponent == 0.25:
        return x.sqrt().sqrt()
    if exponent == -0.25:
        return x.sqrt().sqrt().reciprocal()
    return x**exponent


def product_inverse_root_denominator(
    lam_L: Tensor | None, lam_R: Tensor | None, exponent: float, eps: float
) -> Tensor:
    r"""The denominator :math:`(\lambda_{L,i}\lambda_{R,j})^{-p} + \epsilon` of
    :func:`product_inverse_root_scale`, ``b m 1 × b 1 n -> b m n`` (a ``None`` side has
    :math:`\lambda \equiv 1`): two passes over the block (three where a root is zero and the
    NaN mend below runs), where the scale itself took seven.

    Each side's root :math:`r = \lambda_+^{-p}` is taken on its own vector: an infinite
    or NaN eigenvalue gives :math:`r = \infty` (a zero step along it), a zero or negative
    one :math:`r = 0` (the step :math:`1/\epsilon`). The one undefined product,
    :math:`0 \cdot \infty`, becomes :math:`\infty`: a zero step, as the scale's rule has it.
    """
    if lam_L is None and lam_R is None:
        raise ValueError("product_inverse_root_denominator needs at least one side's eigenvalues")

    def root(lam: Tensor) -> Tensor:
        return power(lam.clamp(min=0.0), -exponent).nan_to_num(nan=math.inf, posinf=math.inf)

    if lam_L is None or lam_R is None:
        return root(lam_R if lam_L is None else lam_L).add_(eps).unsqueeze(-2 if lam_L is None else -1)  # type: ignore[arg-type]
    rL, rR = root(lam_L).unsqueeze(-1), root(lam_R).unsqueeze(-2)
    # the outer product, then ε in place: on a CPU an addcmul of the two broadcast vectors and a
    # 0-d ε took 2 to 4 times as long (it also rounds once where this rounds twice: an ulp apart)
    denominator = torch.mul(rL, rR).add_(eps)
    # a NaN here is 0 · ∞ (an infinite eigenvalue against a zero one): no step. Roots are ≥ 0, so with
    # no zero root on either side (on a CPU, read on the host for free; elsewhere not computed) there
    # is no NaN to mend.
    if not (host_verdicts(rL) and rL.numel() and rR.numel() and cpu_all(torch.stack([rL.amin(), rR.amin()]) > 0)):
        denominator.nan_to_num_(nan=math.inf, posinf=math.inf)
    return denominator


def divide_by_product_inverse_root(P: Tensor, lam_L: Tensor | None, lam_R: Tensor | None, exponent: float, eps: float) -> Tensor:
    r""":math:`P` divided by :func:`product_inverse_root_denominator`, ``b m n``: KL-Shampoo's scaled step
    in the eigenbasis. Where the denominator is a whole ``b m n`` tensor of the quotient's dtype the
    quotient is written over it, which spares a second tensor of the block's size."""
    return divided_over(P, product_inverse_root_denominator(lam_L, lam_R, exponent, eps))


def divided_over(P: Tensor, denominator: Tensor) -> Tensor:
    """``P / denominator``, written over ``denominator`` (in its layout) where it is a whole tensor of the quotient's
    shape and dtype that no autograd tracks: :func:`divide_by_product_inverse_root`'s quotient."""
    tracked = torch.is_grad_enabled() and (P.requires_grad or denominator.requires_grad)
    if tracked or denominator.shape != P.shape or denominator.dtype != torch.result_type(P, denominator):
        return P / denominator
    return torch.div(P, denominator, out=denominator)


def subspace_rms_complement_norm(D: Tensor, d: int, r: int, other: int) -> Tensor:
    r"""Frobenius norm ``(b 1 1)`` that gives a complement block the per-entry RMS of the subspace block ``D``.

    ``D (b m n)`` is the subspace block of a restricted side of size ``d`` and rank ``r``
    (its ``other × r`` coordinates hold all of :math:`\|D\|_F`); the complement has
    ``other × (d − r)`` coordinates, so :math:`\nu = \|D\|_F \sqrt{(d-r)/r}`. At ``r = 0``
    there is no subspace block and the complement gets RMS 1: :math:`\nu = \sqrt{other\,(d-r)}`.
    """
    _check_batched("D", D)
    if r == 0:
        return D.new_full((D.shape[0], 1, 1), math.sqrt(other * d))
    return block_norm(D) * math.sqrt((d - r) / r)
