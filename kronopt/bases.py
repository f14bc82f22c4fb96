r"""Bases: the ``basis`` slot.

A basis turns the factors into orthonormal eigenbases :math:`Q_L, Q_R` (and
eigenvalue estimates) when a refresh is due, and reports the change as a
:class:`~kronopt.types.BasisChange` event so that stages holding state in the
basis can follow it.

Failure policy (every basis): a decomposition that raises is retried in float64
by :func:`kronopt.linalg.eigh_descending`; if that fails too, or a block's
output is not finite, the block keeps its last good basis and its ``failures``
counter is incremented. Nothing here reads a tensor on the host; on a CUDA device torch's
``eigh`` itself synchronises (:func:`kronopt.linalg._eigh`), on the refreshes that call it.
"""

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from . import linalg
from .validators import ge, in_, to_bool, to_int, to_str
from .registry import BASES
from .types import BasisCapabilities, BasisChange, BasisState, Layout, StepContext


def _fresh_columns(b: int, d: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The first ``r`` coordinate vectors of ``R^d`` per block, ``b d r``, column-major: the layout every
    refresh's solver (``eigh``, QR) gives a basis, so a stack keeps one layout for good. A checkpoint
    loaded by filling a fresh optimizer's tensors (``torch.distributed.checkpoint``) then holds its bases
    as the uninterrupted run does, and the products that read them round alike (on some processors
    MKL rounds a product by its operands' layout)."""
    Q = torch.zeros(b, r, d, dtype=dtype, device=device)
    Q.diagonal(dim1=-2, dim2=-1).fill_(1)
    return Q.mT


def _fresh_side(kind: str, b: int, d: int, r: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Identity basis (full side), the first ``r`` coordinate vectors (restricted side) or ``None``."""
    if kind == "full":
        return _fresh_columns(b, d, d, dtype, device), torch.ones(b, d, dtype=dtype, device=device)
    if kind == "restricted":
        return _fresh_columns(b, d, r, dtype, device), torch.ones(b, r, dtype=dtype, device=device)
    return None, None


def fresh_state(layout: Layout, dtype: torch.dtype, device: torch.device) -> BasisState:
    """Identity bases on the rotated sides (coordinate subspaces on restricted ones), not yet refreshed: the state a
    basis stage's ``init`` returns (public: a plugin basis starts from it, docs/extending.md §3.2)."""
    b = layout.batch
    Q_L, lam_L = _fresh_side(layout.left, b, layout.m, layout.rank_left, dtype, device)
    Q_R, lam_R = _fresh_side(layout.right, b, layout.n, layout.rank_right, dtype, device)
    return BasisState(
        Q_L=Q_L,
        Q_R=Q_R,
        lam_L=lam_L,
        lam_R=lam_R,
        failures=torch.zeros(b, dtype=torch.int64, device=device),
        ready=False,
    )


def _eigh_side(
    X: Tensor, Q_old: Tensor, lam_old: Tensor, *, canonical_null: bool = False
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Fresh eigenbasis of one side, keeping the old one on failed blocks (``canonical_null``: a null space's
    eigenvectors in the basis :func:`kronopt.linalg.canonical_null_basis` makes).

    Non-finite factor blocks are replaced by the identity before the solver runs, so
    one bad block cannot make the batched solver fail for the others.
    """
    finite = linalg.finite_blocks(X)
    X = linalg.select_blocks(finite, X, torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(X))
    try:
        eig = linalg.eigh_descending(X, canonical_null=canonical_null)
    except ArithmeticError:
        return Q_old, lam_old, torch.zeros_like(finite), False
    ok = eig.ok & finite
    return linalg.select_blocks(ok, eig.Q, Q_old), linalg.select_blocks(ok, eig.lam, lam_old), ok, True


def _check_factors(name: str, factors: tuple[Tensor | None, Tensor | None], state: BasisState) -> None:
    for side, X, Q in (("left", factors[0], state.Q_L), ("right", factors[1], state.Q_R)):
        if Q is not None and X is None:
            raise ValueError(f"basis {name!r} needs a {side} factor, but the factor estimator keeps none")


@BASES.register("identity", description="no rotation (Adam, Muon, SGD in the original coordinates)")
@attrs.frozen(kw_only=True)
class IdentityBasis:
    """The identity on both sides; a refresh changes nothing."""

    capabilities: ClassVar[BasisCapabilities] = BasisCapabilities(static=True)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BasisState:
        return BasisState(
            Q_L=None,
            Q_R=None,
            lam_L=None,
            lam_R=None,
            failures=torch.zeros(layout.batch, dtype=torch.int64, device=device),
            ready=True,
        )

    def refresh(
        self, state: BasisState, factors: tuple[Tensor | None, Tensor | None], ctx: StepContext
    ) -> tuple[BasisState, BasisChange]:
        return state, BasisChange(old=state, new=state)


@BASES.register("eigh", description="full eigendecomposition of each factor at every refresh")
@attrs.frozen(kw_only=True)
class EighBasis:
    r"""Eigenvectors and eigenvalues of each factor, recomputed from scratch.

    .. math::
        L = Q_L \,\mathrm{diag}(\lambda_L)\, Q_L^\top,\qquad \lambda \text{ descending}.

    A fresh decomposition keeps no column correspondence, so the event carries no
    permutation. Cost per refresh: one batched ``eigh`` per side, :math:`O(m^3 + n^3)`.
    """

    capabilities: ClassVar[BasisCapabilities] = BasisCapabilities(needs_factors=True, provides_eigvals=True)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BasisState:
        return fresh_state(layout, dtype, device)

    def refresh(
        self, state: BasisState, factors: tuple[Tensor | None, Tensor | None], ctx: StepContext
    ) -> tuple[BasisState, BasisChange]:
        _check_factors("eigh", factors, state)
        return _eigh_refresh(state, factors)


def _eigh_refresh(
    state: BasisState, factors: tuple[Tensor | None, Tensor | None], *, canonical_null: bool = False
) -> tuple[BasisState, BasisChange]:
    Q_L, lam_L, Q_R, lam_R = state.Q_L, state.lam_L, state.Q_R, state.lam_R
    failures = state.failures
    solved = Q_L is None and Q_R is None  # a basis with no rotated side is ready at once
    if Q_L is not None:
        Q_L, lam_L, ok, ran = _eigh_side(factors[0], Q_L, lam_L, canonical_null=canonical_null)  # type: ignore[arg-type]
        failures, solved = _counted(failures, _fell_back(ok)), solved or ran
    if Q_R is not None:
        Q_R, lam_R, ok, ran = _eigh_side(factors[1], Q_R, lam_R, canonical_null=canonical_null)  # type: ignore[arg-type]
        failures, solved = _counted(failures, _fell_back(ok)), solved or ran
    # `ready` stays False only when every solver call raised (known on the host); a block
    # whose output was not finite keeps its identity basis and unit eigenvalues.
    new = BasisState(
        Q_L=Q_L, Q_R=Q_R, lam_L=lam_L, lam_R=lam_R, failures=failures, refreshes=state.refreshes + 1,
        ready=state.ready or solved,
    )
    return new, BasisChange(old=state, new=new)


@attrs.frozen(eq=False)
class _SideRefresh:
    """What one side's refresh gives: basis, eigenvalue estimates, column permutation,
    per-block failure count (``0`` or ``(b)``) and whether a solver ran (host bool)."""

    Q: Tensor | None
    lam: Tensor | None
    perm: Tensor | None = None
    failed: Tensor | int = 0
    solved: bool = False


def _fell_back(ok: Tensor) -> Tensor | int:
    """Per block, 1 where a side's refresh kept its old basis (``ok`` False), else 0: ``(b)`` counts, or
    ``0`` where every block is ok on a CPU (read there for free, :func:`kronopt.linalg.cpu_all`)."""
    return 0 if linalg.cpu_all(ok) else (~ok).long()


def _counted(failures: Tensor, *failed: Tensor | int) -> Tensor:
    """``failures`` plus each side's ``failed`` (``(b)`` counts, or ``0`` where no block fell back: then
    nothing is added and ``failures`` comes back itself)."""
    for f in failed:
        if not isinstance(f, int) or f:
            failures = failures + f
    return failures


@BASES.register("qr", description="SOAP refresh: eigh first, then Rayleigh-sorted warm-started power step + QR")
@attrs.frozen(kw_only=True)
class QrBasis:
    r"""SOAP's cheap refresh.

    The first refresh is a full :class:`EighBasis` decomposition. Each later one,
    per rotated side with factor :math:`X` and current basis :math:`Q`:

    .. math::
        e = \mathrm{diag}(Q^\top X Q),\quad \pi = \mathrm{argsort}(e)\!\downarrow,\quad
        \tilde Q = Q_{:,\pi},\quad Q \leftarrow \mathrm{qr}(X^{p} \tilde Q)

    with ``power_steps`` = p warm-started power steps (each followed by QR). The
    permutation :math:`\pi` is reported, so per-coordinate statistics (Adam's
    second moment) are permuted with the columns. The eigenvalue estimates are the
    sorted Rayleigh quotients :math:`e_\pi` of the old basis. Without ``sort``, where
    the factor estimator tracks its own eigenvalues (KL-Shampoo's; nothing reads the
    basis's, :attr:`StepContext.eigvals_from_basis`), the quotients are not computed and
    the estimates stay as they were.

    A **restricted** side (``Layout`` kind ``"restricted"``, rank ``r``) keeps an
    orthonormal ``(b d r)`` subspace :math:`U` instead of a basis; its "factor" is the
    factor estimator's power product :math:`P = \hat F U` and the refresh is
    Rayleigh–Ritz on :math:`U` followed by one power step (:func:`kronopt.linalg.restricted_refresh`);
    no ``d × d`` matrix is formed. Its event carries no permutation. A Ritz value within
    the solver's rounding of zero whose power product is rounding too (a factor of lower
    rank than :math:`r` on the subspace) keeps its direction of :math:`U`, in a basis of
    those directions that does not depend on the solver's choice (docs/kl.md).

    A rank-deficient factor (a non-square block's longer side over its first steps, DyKAF's
    rank-one start, a token embedding's unused rows) or a float32 factor whose tail lies below
    its rounding has directions no eigenvalue defines, whose basis the solver's rounding picks:
    another in a stack than alone, on another processor. Adam's per-coordinate moments in the
    rotated coordinates are not invariant to that choice. ``null_space = "solver"`` (the
    default, as the specs and the peers) keeps it; ``"canonical"`` makes the first ``eigh`` take
    the basis of such a span that :func:`kronopt.linalg.canonical_null_basis` makes, and each
    power step keep the old column of a direction its product leaves to rounding
    (:func:`kronopt.linalg.sorted_power_step`), so a block steps alike in a stack and alone, on
    every processor, to rounding, where the factor's real eigenvalues stand clear of its
    rounding (a rank-deficient factor); where a float32 spectrum falls smoothly through the
    floor, the directions near it are steered by rounding under either choice, and the canonical
    one cuts that (20–400 × measured), not to rounding. Its price is a copy of each power
    product and a second QR of each side whose product leaves a column to rounding (on a
    device, of every side at every refresh): 1.14–1.18 × the mean step of soap, dykaf and
    kl_shampoo in a float32 training of the embedded task's model, where most refreshes meet
    such a column; and it trained no better there (docs/architecture.md, "Degenerate
    eigenspaces").

    Attributes:
        power_steps: power steps per refresh, ≥ 1.
        sort: sort columns by Rayleigh quotient before the power step (SOAP); when
            false no permutation is applied.
        null_space: ``"solver"`` or ``"canonical"``: the basis of the directions a factor leaves to
            rounding (above).
    """

    capabilities: ClassVar[BasisCapabilities] = BasisCapabilities(
        needs_factors=True, provides_eigvals=True, supports_restricted=True
    )
    power_steps: int = attrs.field(default=1, converter=to_int, validator=ge(1))
    sort: bool = attrs.field(default=True, converter=to_bool)
    null_space: Literal["solver", "canonical"] = attrs.field(
        default="solver", converter=to_str, validator=in_(("solver", "canonical"))
    )

    @property
    def _canonical(self) -> bool:
        """Whether a null space takes the canonical basis (``null_space = "canonical"``)."""
        return self.null_space == "canonical"

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BasisState:
        return fresh_state(layout, dtype, device)

    def refresh(
        self, state: BasisState, factors: tuple[Tensor | None, Tensor | None], ctx: StepContext
    ) -> tuple[BasisState, BasisChange]:
        _check_factors("qr", factors, state)
        layout = ctx.layout
        if not state.ready and "restricted" not in (layout.left, layout.right):
            return _eigh_refresh(state, factors, canonical_null=self._canonical)
        quotients, tested = ctx.eigvals_from_basis, ctx.finite_fallback
        left = self._side(layout.left, factors[0], state.Q_L, state.lam_L, ready=state.ready, quotients=quotients, tested=tested)
        right = self._side(layout.right, factors[1], state.Q_R, state.lam_R, ready=state.ready, quotients=quotients, tested=tested)
        new = BasisState(
            Q_L=left.Q,
            Q_R=right.Q,
            lam_L=left.lam,
            lam_R=right.lam,
            failures=_counted(state.failures, left.failed, right.failed),
            refreshes=state.refreshes + 1,
            ready=state.ready or left.solved or right.solved,
        )
        return new, BasisChange(old=state, new=new, perm_L=left.perm, perm_R=right.perm)

    def _side(
        self, kind: str, X: Tensor | None, Q: Tensor | None, lam: Tensor | None, *, ready: bool, quotients: bool,
        tested: bool = True,
    ) -> _SideRefresh:
        """One side's refresh: restricted (Rayleigh–Ritz + power), first (eigh) or SOAP's sorted power step
        (``quotients``: whether anything reads the eigenvalue estimates; without them and without
        ``sort`` the side keeps its old ones, and the power step skips the quotients). ``tested``
        (:attr:`StepContext.finite_fallback`): whether the power step's blocks are tested for a non-finite
        result, which keeps their old basis; without it the caller tests them."""
        if Q is None or X is None or lam is None:
            return _SideRefresh(Q=Q, lam=lam)
        if kind == "restricted":
            Q_new, lam_new, ok = linalg.restricted_refresh(X, Q, lam, first=not ready)
            return _SideRefresh(Q=Q_new, lam=lam_new, failed=_fell_back(ok), solved=True)
        canonical = self._canonical
        if not ready:
            Q_new, lam_new, ok, ran = _eigh_side(X, Q, lam, canonical_null=canonical)
            return _SideRefresh(Q=Q_new, lam=lam_new, failed=_fell_back(ok), solved=ran)
        Q_new, e, perm = linalg.sorted_power_step(X, Q, sort=self.sort, quotients=quotients, canonical_null=canonical)
        for _ in range(self.power_steps - 1):
            Q_new = linalg.power_qr(X, Q_new, canonical_null=canonical)
        # untested, the caller tests the new state and makes a call whose new basis is not finite again, tested
        ok = linalg.finite_blocks(Q_new, e) if tested else None
        if ok is None or linalg.cpu_all(ok):  # nearly every refresh, read on a CPU for free: no block falls back
            return _SideRefresh(Q=Q_new, lam=lam if e is None else e, perm=perm, solved=True)
        if perm is not None:
            identity = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
            perm = linalg.select_blocks(ok, perm, identity)
        return _SideRefresh(
            Q=linalg.select_blocks(ok, Q_new, Q), lam=lam if e is None else linalg.select_blocks(ok, e, lam), perm=perm,
            failed=_fell_back(ok), solved=True,
        )

