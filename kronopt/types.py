"""Shared vocabulary: block layouts, basis records, the step context and the stage protocols.

Axis names follow the einops vocabulary used across the package: ``b`` blocks in a
bucket, ``m`` rows, ``n`` columns.
"""

from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

SideKind = Literal["full", "restricted", "none"]
SIDE_KINDS: tuple[str, ...] = ("full", "restricted", "none")


@attrs.frozen(kw_only=True)
class Layout:
    """The shape of one bucket: ``batch`` blocks of ``m × n``, and how each side is kept.

    A side is ``"full"`` (an ``m × m`` / ``n × n`` factor and basis),
    ``"restricted"`` (a rank-``r`` orthonormal subspace with its ``r × r`` spectrum
    plus one flat eigenvalue on the complement; ``rank_left`` / ``rank_right`` give
    ``r``) or ``"none"`` (not rotated: the identity).
    """

    batch: int
    m: int
    n: int
    left: SideKind
    right: SideKind
    rank_left: int = 0
    rank_right: int = 0

    @property
    def sides(self) -> tuple[SideKind, SideKind]:
        return (self.left, self.right)


@attrs.frozen(kw_only=True, eq=False)
class BasisState:
    """Orthonormal bases and eigenvalue estimates of one bucket.

    ``Q_L`` ``(b m m)`` and ``Q_R`` ``(b n n)`` have orthonormal columns in
    descending eigenvalue order; ``None`` means the identity (a ``none`` side).
    ``lam_L`` ``(b m)`` and ``lam_R`` ``(b n)`` are the eigenvalue estimates that
    go with the columns (``None`` when the basis keeps none). ``refreshes`` counts
    completed refreshes (a Python int: it is known on the host without a sync);
    ``failures`` ``(b)`` counts, per block, the sides whose refresh kept the old
    basis because the decomposition failed. ``ready`` is False until a first
    refresh has run (before it the bases are the identity and the eigenvalue
    estimates 1).
    """

    Q_L: Tensor | None
    Q_R: Tensor | None
    lam_L: Tensor | None
    lam_R: Tensor | None
    failures: Tensor
    refreshes: int = 0
    ready: bool = True


@attrs.frozen(kw_only=True, eq=False)
class BasisChange:
    """The event of a refresh: old and new bases and the column permutations.

    ``perm_L`` ``(b m)`` / ``perm_R`` ``(b n)`` say which old column each new
    column continues (``new[:, j]`` continues ``old[:, perm[j]]``); ``None`` when
    the refresh keeps no correspondence (a fresh eigendecomposition) or the side
    is not rotated. Per-coordinate statistics follow the permutation; first
    moments are rotated from the old basis to the new one.
    """

    old: BasisState
    new: BasisState
    perm_L: Tensor | None = None
    perm_R: Tensor | None = None


@attrs.frozen(kw_only=True, eq=False)
class StepContext:
    r"""Every cross-stage input of one bucket step, typed.

    Attributes:
        step: number of parameter updates including the current one (1-based;
            0 on a first call that only initialises).
        layout: the bucket's layout.
        basis: the current basis (the pre-refresh one while the direction is
            computed).
        eigvals: the eigenvalue estimates ``(lam_L (b m), lam_R (b n))`` that go
            with the basis columns: the factor estimator's own when it tracks them
            (``provides_eigvals``), else the basis's. ``None`` on a side without.
            On a restricted side of rank ``r`` they are the ``r`` subspace values.
        flat: the flat eigenvalue ``mu (b)`` of each restricted side (the value of
            :math:`\hat R = U S U^\top + \mu P_\perp` on the complement), from the
            factor estimator's ``flat_eigvals``; ``None`` on a side that is not restricted.
    """

    step: int
    layout: Layout
    basis: BasisState
    eigvals: tuple[Tensor | None, Tensor | None] = (None, None)
    flat: tuple[Tensor | None, Tensor | None] = (None, None)


@runtime_checkable
class FactorEstimator(Protocol):
    """Estimates the Kronecker factors ``L (b m m)``, ``R (b n n)`` from each new ``G``.

    Optional members: ``provides_eigvals`` with ``eigvals(state)`` for an estimator
    that tracks its own eigenvalue estimates in the current basis (KL-Shampoo), and
    ``supports_restricted`` for one that can keep a ``"restricted"`` side; such an
    estimator also gives ``flat_eigvals(state)``, the flat eigenvalue ``mu (b)`` of
    each restricted side (``None`` elsewhere), which reaches the other stages as
    ``StepContext.flat``.
    """

    provides_factors: ClassVar[bool]

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> Any: ...

    def update(self, state: Any, G: Tensor, ctx: StepContext) -> Any: ...

    def factors(self, state: Any) -> tuple[Tensor | None, Tensor | None]: ...


@runtime_checkable
class Basis(Protocol):
    """Turns factors into orthonormal bases on the refresh schedule."""

    needs_factors: ClassVar[bool]
    provides_eigvals: ClassVar[bool]

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BasisState: ...

    def refresh(
        self, state: BasisState, factors: tuple[Tensor | None, Tensor | None], ctx: StepContext
    ) -> tuple[BasisState, BasisChange]: ...


@runtime_checkable
class InnerRule(Protocol):
    """The update rule; sees ``G`` in the original coordinates and ``ctx.basis``.

    Optional members: ``moment(state, ctx)``, the first moment in the original
    coordinates (a split's complement reads it), and ``supports_restricted``.
    """

    needs_eigvals: ClassVar[bool]

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> Any: ...

    def direction(self, state: Any, G: Tensor, ctx: StepContext) -> tuple[Tensor, Any]: ...

    def on_basis_change(self, state: Any, change: BasisChange) -> Any: ...


@runtime_checkable
class Split(Protocol):
    """How each side is represented and what is done with a restricted side's complement.

    ``sides(m, n, rotated)`` maps a block and which of its sides the shape policy
    rotates to ``((kind_L, rank_L), (kind_R, rank_R))``. ``complement`` may add a
    term for the part of the direction a restricted side does not cover;
    ``moment()`` returns the inner rule's first moment in the original coordinates.
    """

    def sides(self, m: int, n: int, rotated: tuple[bool, bool]) -> tuple[tuple[SideKind, int], tuple[SideKind, int]]: ...

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> Any: ...

    def complement(
        self, state: Any, G: Tensor, D: Tensor, ctx: StepContext, moment: Callable[[], Tensor]
    ) -> tuple[Tensor, Any]: ...


@runtime_checkable
class Refresh(Protocol):
    """When the basis is recomputed."""

    def due(self, step: int, *, first_call: bool) -> bool: ...


@attrs.frozen(eq=False)
class NoState:
    """The state of a stage that keeps none."""
