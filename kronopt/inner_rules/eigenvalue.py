"""Inner rule ``eigenvalue``: Shampoo-style scaling by powers of the eigenvalue estimates."""

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import ge, in_, lt, to_bool, to_float, to_str
from ..registry import INNER_RULES
from ..types import BasisChange, BasisState, InnerCapabilities, Layout, StepContext
from ._common import MomentumState, _zeros

@attrs.frozen(eq=False)
class EigenMomentumState:
    """The momentum ``b m n`` in the basis (``momentum_basis = "eigen"``; in the original coordinates
    until the first refresh, whose bases are the identity)."""

    momentum_eigen: Tensor


@attrs.frozen(eq=False)
class SubspaceMomentumState:
    """The momentum ``M`` split against the restricted side's subspace ``U`` (``momentum_basis = "subspace"``):
    its coordinates ``M U`` ``(b m r)`` (``Uᵀ M`` ``(b r n)`` on a restricted left side) and its complement
    ``M − M U Uᵀ`` ``(b m n)``, in the original coordinates; ``M = (M U) Uᵀ + complement``."""

    momentum_coords: Tensor
    momentum_complement: Tensor


@INNER_RULES.register("eigenvalue", description="Shampoo scaling by eigenvalue powers of each factor")
@attrs.frozen(kw_only=True)
class EigenvalueInner:
    r"""Shampoo-style preconditioning with the eigenvalue estimates of ``ctx.eigvals``.

    .. math::
        m \leftarrow \beta m + (1-\beta) G,\qquad
        D = Q_L\, \big(s_L s_R^\top \odot Q_L^\top \hat m Q_R\big)\, Q_R^\top,\qquad
        s = (\lambda_+ + \epsilon)^{p}\ \text{(inside)}\ \text{or}\ (\lambda_+^{-p} + \epsilon)^{-1}\ \text{(outside)}

    or, with ``eps_placement = "product"`` (KL-Shampoo, kl_shampoo.md §6 step 2), ε
    outside the root of the eigenvalue *product*:
    :math:`P_{ij} = s_{L,i} s_{R,j} / (1 + \epsilon\, s_{L,i} s_{R,j})` with
    :math:`s = \lambda_+^{p}`, i.e. :math:`1/((\lambda_{L,i}\lambda_{R,j})^{-p} + \epsilon)`;
    :math:`\lambda = +\infty` gives a zero step along that direction. With :math:`\lambda_+ = \max(\lambda, 0)`, :math:`p` = ``exponent`` (−1/4 for
    Shampoo, −1/2 for Shampoo^{1/2}) and :math:`\hat m = m/(1-\beta^t)`. ``"inside"``
    is Distributed Shampoo's ε placement; ``"outside"`` adds ε to
    :math:`\lambda^{-p}` (the root) instead. A side that is not rotated scales by 1.
    On a restricted side ``ctx.basis`` holds the subspace :math:`U` ``(b d r)`` and the
    rule yields the subspace block :math:`Q_L (Q_L^\top M U \odot P) U^\top`; the split
    adds the complement. ``normalize`` (deprecated: use ``post.normalize``, which also
    covers the complement) divides this rule's direction by
    :math:`10^{-30} + \mathrm{RMS}(D)` per block.
    With ``momentum_basis = "original"`` the momentum lives in the original coordinates,
    so a refresh needs no rotation, and each step rotates it into the basis. With
    ``"eigen"`` it lives in the basis, :math:`P \leftarrow \beta P + (1-\beta) Q_L^\top G Q_R`,
    and a refresh carries it to the new basis (:func:`kronopt.linalg.change_basis`): the
    same direction in exact arithmetic (the bases are square and orthonormal), two
    products fewer per step where the factor estimator rotates the gradient anyway
    (KL-Shampoo's does, and :meth:`StepContext.rotated` shares it), one refresh-time
    change of basis more. Full sides only. With ``"subspace"`` (a layout with one restricted
    side; Pro-KLShampoo's preset) the momentum is kept as its two parts against the subspace
    :math:`U`, :math:`M U` and :math:`M - M U U^\top`, each an EMA of the same part of ``G``
    (:meth:`StepContext.subspace_split`, which KL's restricted update makes anyway). For a
    fixed :math:`U` both parts are linear in :math:`M`, so this is the same momentum, without
    the two :math:`mnr` products that split it every step; the split stage takes the
    complement as it is (:meth:`StepContext.moment_complement`). A refresh rebuilds :math:`M`
    from the parts and splits it against the new :math:`U`. On a layout without exactly one
    restricted side ``"subspace"`` keeps the momentum as ``"original"`` does. Before the first refresh the scaling is 1 (the
    direction is the momentum; Shampoo's grafting replaces it, see :mod:`kronopt.post`).

    Attributes:
        momentum: :math:`\beta \in [0, 1)` (EMA form).
        exponent: :math:`p < 0`.
        eps: :math:`\epsilon \ge 0`.
        eps_placement: ``"inside"`` or ``"outside"`` the root per side, or ``"product"``.
        bias_correction: divide the momentum by :math:`1-\beta^t`.
        momentum_basis: ``"original"`` (the momentum in the parameter's coordinates),
            ``"eigen"`` (in the preconditioner's basis, carried across refreshes) or
            ``"subspace"`` (split against a restricted side's subspace, re-split at refreshes).
        normalize: deprecated; divide this rule's direction by its RMS per block
            (``post.normalize`` normalises the whole step, complement included).
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(
        needs_eigvals=True, supports_restricted=True, exposes_moment=True
    )
    momentum: float = attrs.field(default=0.9, converter=to_float, validator=[ge(0.0), lt(1.0)])
    exponent: float = attrs.field(default=-0.25, converter=to_float, validator=[lt(0.0), ge(-1.0)])
    eps: float = attrs.field(default=1e-12, converter=to_float, validator=ge(0.0))
    eps_placement: Literal["inside", "outside", "product"] = attrs.field(
        default="inside", converter=to_str, validator=in_(("inside", "outside", "product"))
    )
    bias_correction: bool = attrs.field(default=True, converter=to_bool)
    normalize: bool = attrs.field(default=False, converter=to_bool)
    momentum_basis: Literal["original", "eigen", "subspace"] = attrs.field(
        default="original", converter=to_str, validator=in_(("original", "eigen", "subspace"))
    )

    def __attrs_post_init__(self) -> None:
        if self.normalize:
            warnings.warn(
                "inner.normalize of the 'eigenvalue' rule is deprecated: it normalises this rule's direction only, "
                "before a split adds its complement; use post.normalize, which normalises the whole step",
                DeprecationWarning,
                stacklevel=3,
            )

    def restricted_conflict(self) -> tuple[str, str] | None:
        """Why these options cannot keep a restricted side (the option and the reason), or ``None``."""
        if self.momentum_basis == "eigen":
            return "momentum_basis", (
                "momentum_basis = 'eigen' keeps the momentum in the basis, and a restricted side's basis spans a "
                "subspace, outside which the momentum would be lost; use momentum_basis = 'original'"
            )
        return None

    def init(
        self, layout: Layout, *, dtype: torch.dtype, device: torch.device
    ) -> MomentumState | EigenMomentumState | SubspaceMomentumState:
        if self.momentum_basis == "subspace" and (layout.left == "restricted") != (layout.right == "restricted"):
            if layout.left == "restricted":
                coords = torch.zeros(layout.batch, layout.rank_left, layout.n, dtype=dtype, device=device)
            else:
                coords = torch.zeros(layout.batch, layout.m, layout.rank_right, dtype=dtype, device=device)
            return SubspaceMomentumState(coords, _zeros(layout, dtype, device))
        if self.momentum_basis != "eigen":
            return MomentumState(_zeros(layout, dtype, device))
        if "restricted" in (layout.left, layout.right):
            raise ValueError(f"inner 'eigenvalue': {self.restricted_conflict()[1]}")  # type: ignore[index]
        return EigenMomentumState(_zeros(layout, dtype, device))

    def _scale(self, lam: Tensor) -> Tensor:
        lam = lam.clamp(min=0.0)
        if self.eps_placement == "inside":
            return linalg.power(lam + self.eps, self.exponent)
        return 1.0 / (linalg.power(lam, -self.exponent) + self.eps)

    def direction(
        self, state: MomentumState | EigenMomentumState | SubspaceMomentumState, G: Tensor, ctx: StepContext,
        *, in_place: bool = False,
    ) -> tuple[Tensor, MomentumState | EigenMomentumState | SubspaceMomentumState]:
        """The step's direction and new momentum. ``in_place``: a whole momentum (``"original"``, ``"eigen"``) is
        updated in its own stack (``lerp_``, the same bits) instead of a new tensor, which only a caller that proved
        the new momentum and the direction finite on every block beforehand asks for
        (:func:`kronopt.compose.momentum_in_place_step`): a block refused afterwards would have lost its momentum."""
        beta = self.momentum
        basis = ctx.basis
        if isinstance(state, SubspaceMomentumState):
            Y, C = ctx.subspace_split(G)
            new = SubspaceMomentumState(state.momentum_coords.lerp(Y, 1 - beta), state.momentum_complement.lerp(C, 1 - beta))
            # the complement of the momentum the step uses (bias-corrected where the subspace block is)
            complement = new.momentum_complement
            ctx.offer_moment_complement(complement / (1 - beta**ctx.step) if self.bias_correction else complement)
            if not basis.ready:
                return self.moment(new, ctx), new  # moment() is bias-corrected already
            coords = new.momentum_coords / (1 - beta**ctx.step) if self.bias_correction else new.momentum_coords
            return self._scaled_back(_full_side(coords, ctx, left_restricted=ctx.layout.left == "restricted"), ctx), new
        if isinstance(state, EigenMomentumState):
            # before the first refresh the bases are the identity: the momentum is in the original coordinates
            X = ctx.rotated(G).H if basis.ready else G
            P = state.momentum_eigen.lerp_(X, 1 - beta) if in_place else state.momentum_eigen.lerp(X, 1 - beta)
            P_hat = P / (1 - beta**ctx.step) if self.bias_correction else P
            if not basis.ready:
                return P_hat, EigenMomentumState(P)
            return self._scaled_back(P_hat, ctx), EigenMomentumState(P)
        m = state.momentum_buffer.lerp_(G, 1 - beta) if in_place else state.momentum_buffer.lerp(G, 1 - beta)
        m_hat = m / (1 - beta**ctx.step) if self.bias_correction else m
        if not basis.ready:
            return m_hat, MomentumState(m)
        return self._scaled_back(_rotated(m_hat, ctx), ctx), MomentumState(m)

    def direction_each(
        self, states: Sequence[MomentumState | EigenMomentumState | SubspaceMomentumState], G: Sequence[Tensor],
        ctxs: Sequence[StepContext],
    ) -> list[tuple[Tensor, MomentumState | EigenMomentumState | SubspaceMomentumState]]:
        """:meth:`direction` of several buckets, the same bits: each bucket's rotations (and a restricted side's split
        of its gradient) in its turn, the momenta of them all (whole, or a ``"subspace"`` momentum's two parts) in one
        ``foreach`` call per operation, and their scales in one pass over the eigenvalues of them all where each
        entry's power rounds alone (``-exponent`` in :data:`kronopt.linalg.POSITION_FREE_EXPONENTS`): the roots of
        ``eps_placement = "product"`` (:func:`kronopt.linalg.product_inverse_root_denominators_each`), a side's
        scale under ``"inside"`` and ``"outside"``; else each call's scales by :meth:`_scaled_back`. ``normalize`` is
        not taken."""
        assert not self.normalize, "direction_each does not normalise"
        beta = self.momentum
        X: list[Tensor] = []  # the momenta's inputs, and the momenta they update (a subspace momentum: two each)
        old: list[Tensor] = []
        for state, g, ctx in zip(states, G, ctxs):
            if isinstance(state, SubspaceMomentumState):
                X.extend(ctx.subspace_split(g))
                old += [state.momentum_coords, state.momentum_complement]
            elif isinstance(state, EigenMomentumState):
                X.append(ctx.rotated(g).H if ctx.basis.ready else g)
                old.append(state.momentum_eigen)
            else:
                X.append(g)
                old.append(state.momentum_buffer)
        new = torch._foreach_lerp(old, X, 1 - beta)
        hat = list(new)
        if self.bias_correction:
            by_step: dict[int, list[int]] = {}
            k = 0
            for state, ctx in zip(states, ctxs):
                parts = 2 if isinstance(state, SubspaceMomentumState) else 1
                by_step.setdefault(ctx.step, []).extend(range(k, k + parts))
                k += parts
            for t, at in by_step.items():
                for k, q in zip(at, torch._foreach_div([new[k] for k in at], 1 - beta**t)):
                    hat[k] = q
        out: list[Any] = [None] * len(states)
        together: list[int] = []  # the calls whose scales go together
        P: list[Tensor] = []  # their momenta in the basis
        flat = -self.exponent in linalg.POSITION_FREE_EXPONENTS
        k = 0
        for i, (state, ctx) in enumerate(zip(states, ctxs)):
            record: Any
            if isinstance(state, SubspaceMomentumState):
                record = SubspaceMomentumState(new[k], new[k + 1])
                ctx.offer_moment_complement(hat[k + 1])
                if not ctx.basis.ready:
                    out[i] = (self.moment(record, ctx), record)  # moment() is bias-corrected already
                    k += 2
                    continue
                rotated = _full_side(hat[k], ctx, left_restricted=ctx.layout.left == "restricted")
                k += 2
            else:
                eigen = isinstance(state, EigenMomentumState)
                record = EigenMomentumState(new[k]) if eigen else MomentumState(new[k])
                out[i] = (hat[k], record)
                k += 1
                if not ctx.basis.ready:
                    continue
                rotated = hat[k - 1] if eigen else _rotated(hat[k - 1], ctx)
            sides = [lam is not None for lam in ctx.eigvals]
            if flat and (all(sides) if self.eps_placement == "product" else any(sides)):
                together.append(i)
                P.append(rotated)
                out[i] = (None, record)
            else:
                out[i] = (self._scaled_back(rotated, ctx), record)
        if not together:
            return out
        lam = [ctxs[i].eigvals for i in together]
        if self.eps_placement == "product":
            denominators = linalg.product_inverse_root_denominators_each(
                [pair[0] for pair in lam], [pair[1] for pair in lam], self.exponent, self.eps  # type: ignore[misc]
            )
            # the quotient laid out as the pipeline's, which writes it over its denominator (divided_over): a
            # momentum stack loaded column-major would lay it out otherwise, and the products rotating it back
            # round by layout. A row-major denominator (both sides' roots row-major) takes the quotients of them
            # all in one call; one of another layout (a side's roots loaded column-major) is written over alone
            row = [k for k, d in enumerate(denominators) if d.is_contiguous() and d.shape == P[k].shape]
            if row:
                quotients = torch._foreach_div([P[k].contiguous() for k in row], [denominators[k] for k in row])
                for k, q in zip(row, quotients):
                    P[k] = q
            for k in sorted(set(range(len(P))) - set(row)):
                P[k] = linalg.divided_over(P[k], denominators[k])
        else:
            present = [v for pair in lam for v in pair if v is not None]
            scales = iter(linalg.flat_each(self._scale, present))
            per_call = [tuple(None if v is None else next(scales) for v in pair) for pair in lam]
            for side, dim in ((0, -1), (1, -2)):  # as _scaled_back: the left side's scale first
                at = [k for k, pair in enumerate(per_call) if pair[side] is not None]
                if at:
                    scaled = torch._foreach_mul(
                        [P[k] for k in at], [per_call[k][side].unsqueeze(dim) for k in at]  # type: ignore[union-attr]
                    )
                    for k, Q in zip(at, scaled):
                        P[k] = Q
        for i, Q in zip(together, P):
            out[i] = (ctxs[i].unrotate(Q), out[i][1])
        return out

    def _scaled_back(self, P: Tensor, ctx: StepContext) -> Tensor:
        """The momentum ``P`` in the basis, scaled by the eigenvalue powers and rotated back."""
        lam_L, lam_R = ctx.eigvals
        if self.eps_placement == "product":
            if lam_L is None and lam_R is None:  # no rotated side: s ≡ 1 on both
                P = P / (1.0 + self.eps)
            else:
                P = linalg.divide_by_product_inverse_root(P, lam_L, lam_R, self.exponent, self.eps)
        else:
            if lam_L is not None:
                P = P * self._scale(lam_L).unsqueeze(-1)
            if lam_R is not None:
                P = P * self._scale(lam_R).unsqueeze(-2)
        D = ctx.unrotate(P)
        if self.normalize:
            D = linalg.normalize_rms(D)
        return D

    def adopt_saved(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A block's saved entry with its momentum in the form this rule keeps (:func:`kronopt.compose.adopt_saved`):
        a momentum saved whole (``"original"``, pro_kl_shampoo's preset before ``"subspace"``) is split against
        the block's saved subspace where this rule keeps it split, and a split one joined where it keeps it
        whole. The same momentum, to rounding."""
        whole, parts = "inner.momentum_buffer", ("inner.momentum_coords", "inner.momentum_complement")
        side = _saved_subspace(entry)
        if side is None:
            return entry
        left, U = side
        if self.momentum_basis == "subspace" and whole in entry and parts[0] not in entry:
            M = entry[whole]
            if not isinstance(M, Tensor) or M.dim() != 2 or M.shape[0 if left else 1] != U.shape[0]:
                return entry  # not this block's momentum: stack_entries names what does not fit
            dtype = torch.promote_types(torch.promote_types(M.dtype, U.dtype), torch.float32)
            Y, C = linalg.subspace_split(M.to(dtype)[None], U.to(dtype)[None], left=left)
            out = {k: v for k, v in entry.items() if k != whole}
            out[parts[0]], out[parts[1]] = Y[0].to(M.dtype), C[0].to(M.dtype)
            return out
        if self.momentum_basis == "original" and all(k in entry for k in parts) and whole not in entry:
            Y, C = entry[parts[0]], entry[parts[1]]
            d, r = U.shape
            fits = isinstance(Y, Tensor) and isinstance(C, Tensor) and C.dim() == 2 and Y.dim() == 2 and (
                Y.shape == (r, C.shape[1]) and C.shape[0] == d if left else Y.shape == (C.shape[0], r) and C.shape[1] == d
            )
            if not fits:
                return entry  # stack_entries names what does not fit
            dtype = torch.promote_types(torch.promote_types(C.dtype, U.dtype), torch.float32)
            M = linalg.subspace_join(Y.to(dtype)[None], C.to(dtype)[None], U[None], left=left)[0]
            out = {k: v for k, v in entry.items() if k not in parts}
            out[whole] = M.to(C.dtype)
            return out
        return entry

    def moment(self, state: MomentumState | EigenMomentumState | SubspaceMomentumState, ctx: StepContext) -> Tensor:
        """The momentum the step uses, in the original coordinates: divided by :math:`1-\\beta^t` with
        ``bias_correction`` (a split's complement then matches the subspace block)."""
        if isinstance(state, SubspaceMomentumState):
            M = _joined(state, ctx.basis)
        elif isinstance(state, EigenMomentumState):
            M = state.momentum_eigen if not ctx.basis.ready else ctx.unrotate(state.momentum_eigen)
        else:
            M = state.momentum_buffer
        return M / (1 - self.momentum**ctx.step) if self.bias_correction else M

    def on_basis_change(
        self, state: MomentumState | EigenMomentumState | SubspaceMomentumState, change: BasisChange
    ) -> MomentumState | EigenMomentumState | SubspaceMomentumState:
        """``"eigen"``: the momentum carried from the old basis to the new one (from the original
        coordinates at the first refresh, whose old bases are the identity); ``"subspace"``: rebuilt from
        its parts against the old subspace and split against the new one; ``"original"``: unchanged."""
        if isinstance(state, MomentumState):
            return state
        old, new = change.old, change.new
        if isinstance(state, SubspaceMomentumState):
            return _resplit(state, old, new)
        return EigenMomentumState(linalg.change_basis(state.momentum_eigen, (old.Q_L, old.Q_R), (new.Q_L, new.Q_R)))


def _saved_subspace(entry: dict[str, Any]) -> tuple[bool, Tensor] | None:
    """``(left, U)`` of a block's saved entry with exactly one restricted side (its basis ``d × r``, ``r < d``;
    a full side's is square), else ``None``."""
    sides = []
    for left, key in ((True, "basis.Q_L"), (False, "basis.Q_R")):
        Q = entry.get(key)
        if isinstance(Q, Tensor) and type(Q) is Tensor and Q.dim() == 2 and Q.shape[-1] < Q.shape[-2]:
            sides.append((left, Q))
    return sides[0] if len(sides) == 1 else None


def _left(state: SubspaceMomentumState) -> bool:
    """Whether the state's subspace is on the left (its coordinates ``(b r n)``; ``(b m r)`` on the right)."""
    return state.momentum_coords.shape[-2] != state.momentum_complement.shape[-2]


def _joined(state: SubspaceMomentumState, basis: BasisState) -> Tensor:
    """The momentum ``(M U) Uᵀ + complement`` (``U (Uᵀ M) + complement`` on the left) in ``basis``'s subspace
    (a basis stored narrower than the momentum, as the optimizer's own state may be, is read in its dtype)."""
    left = _left(state)
    U = basis.Q_L if left else basis.Q_R
    return linalg.subspace_join(state.momentum_coords, state.momentum_complement, U, left=left)  # type: ignore[arg-type]


def _resplit(state: SubspaceMomentumState, old: BasisState, new: BasisState) -> SubspaceMomentumState:
    """The momentum rebuilt from its parts against the old subspace and split against the new one. A block whose
    subspace the refresh left exactly as it was (where it failed and kept the old basis) keeps its parts as they
    are, on every path: a split against the same subspace would move them by rounding, and the old basis comes
    back as the very tensor only where the verdicts are read on the host and every block kept it."""
    left = _left(state)
    U_old, U_new = (old.Q_L, new.Q_L) if left else (old.Q_R, new.Q_R)
    if U_new is U_old:
        return state
    coords, complement = linalg.subspace_split(_joined(state, old), U_new, left=left)  # type: ignore[arg-type]
    kept = (U_new == U_old).flatten(1).all(1)  # type: ignore[operator]
    return SubspaceMomentumState(
        linalg.select_blocks(kept, state.momentum_coords, coords), linalg.select_blocks(kept, state.momentum_complement, complement)
    )


def _rotated(X: Tensor, ctx: StepContext) -> Tensor:
    """``X`` in the basis, :math:`Q_L^\top X Q_R`. With one restricted side its subspace goes first (the
    cheaper order), through :meth:`StepContext.subspace_coordinates`, which the split's complement reuses, then the
    full side (:func:`_full_side`); with two (a plugin layout), :meth:`StepContext.rotate`. The subspace
    coordinates, which the split's complement subtracts from, keep the compute dtype whatever ``rotation_dtype``
    says; the full side's product follows it."""
    layout = ctx.layout
    if layout.left == "restricted" and layout.right == "restricted":
        return ctx.rotate(X)
    if "restricted" in (layout.left, layout.right):
        return _full_side(ctx.subspace_coordinates(X), ctx, left_restricted=layout.left == "restricted")
    return ctx.rotate(X)


def _full_side(Y: Tensor, ctx: StepContext, *, left_restricted: bool) -> Tensor:
    """Subspace coordinates ``Y`` taken into the full side's basis: :math:`Y Q_R` where the left side is the
    restricted one, :math:`Q_L^\top Y` where the right is (``None`` is the identity), in the context's
    ``rotation_dtype``."""
    basis = ctx.basis
    if left_restricted:
        return linalg.rotate(Y, None, basis.Q_R, dtype=ctx.rotation_dtype)
    return linalg.rotate(Y, basis.Q_L, None, dtype=ctx.rotation_dtype)

