r"""The ``kl`` factor estimator: KL-Shampoo's two-sided factors with tracked eigenvalues.

Specs: ``shared/specs/kl_shampoo.md`` §5–§6 (full sides) and
``shared/specs/pro_kl_shampoo.md`` §6–§7 (a restricted side; reconstructed, see
``docs/kl.md``).
"""

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import ge, gt, in_, lt, to_bool, to_float, to_str
from ..registry import FACTORS
from ._products import narrow_dtype, product_dtype_field
from ._restricted import factors_or_power, flat_eigvals
from ..types import BasisChange, FactorCapabilities, Layout, StepContext


@attrs.frozen(eq=False)
class KlFactorsState:
    """State of the ``kl`` estimator; every field is ``None`` on a side that does not use it.

    Full side (left shown): ``L (b m m)`` the factor EMA, ``s_L (b m)`` the tracked
    inverse roots :math:`\\lambda^{-1/2}` attached to the basis columns.
    Restricted side (rank ``r``): ``sub_L (b r r)`` the factor in the subspace
    coordinates :math:`U^\\top \\hat L U`, ``s_L (b r)`` the tracked inverse roots of
    its eigenvalue estimates, ``mu_L (b)`` the flat eigenvalue of the complement and
    ``power_L (b m r)`` the action :math:`\\hat L_{new} U` that the basis stage turns
    into the next subspace (the ``"power"`` tracker computes it on the updates a refresh
    follows, ``StepContext.refresh_follows``, and keeps it as it was on the others).
    """

    L: Tensor | None
    R: Tensor | None
    s_L: Tensor | None
    s_R: Tensor | None
    sub_L: Tensor | None = None
    sub_R: Tensor | None = None
    mu_L: Tensor | None = None
    mu_R: Tensor | None = None
    power_L: Tensor | None = None
    power_R: Tensor | None = None


@attrs.frozen(eq=False)
class _Side:
    """One side of a block, as seen by the update (internal)."""

    kind: str
    d: int
    rank: int
    Q: Tensor | None  # basis (b d d) or subspace U (b d r); None: identity
    F: Tensor | None  # full factor (b d d)
    s: Tensor | None  # inverse roots (b d) / (b r); None: ones
    sub: Tensor | None = None
    mu: Tensor | None = None
    power: Tensor | None = None


def _sides(state: KlFactorsState, layout: Layout, ctx: StepContext) -> tuple[_Side, _Side]:
    basis = ctx.basis
    left = _Side(layout.left, layout.m, layout.rank_left, basis.Q_L, state.L, state.s_L, state.sub_L, state.mu_L, state.power_L)
    right = _Side(layout.right, layout.n, layout.rank_right, basis.Q_R, state.R, state.s_R, state.sub_R, state.mu_R, state.power_R)
    return left, right


def _pack(left: _Side, right: _Side) -> KlFactorsState:
    return KlFactorsState(
        L=left.F, R=right.F, s_L=left.s, s_R=right.s,
        sub_L=left.sub, sub_R=right.sub, mu_L=left.mu, mu_R=right.mu, power_L=left.power, power_R=right.power,
    )


def _mean_inverse(side: _Side, like: Tensor) -> Tensor:
    """Mean eigenvalue of the side's inverse factor, ``(b 1)``: ``mean(s²)`` (1 on a ``none`` side)."""
    if side.s is None:
        return torch.ones(like.shape[0], 1, dtype=like.dtype, device=like.device)
    total = side.s.square().sum(-1, keepdim=True)
    if side.kind == "restricted":
        total = total + (side.d - side.rank) / side.mu.unsqueeze(-1)  # type: ignore[union-attr]
    return total / side.d


def _gram_operand(
    G: Tensor, H: Tensor, *, Q: Tensor | None, Q_other: Tensor | None, s_other: Tensor | None, half: Tensor | None,
    exact: bool,
) -> tuple[Tensor, Tensor | None] | None:
    r"""The Gram operand :math:`G Q_R\,\mathrm{diag}(s_R)` of :meth:`KlKronFactors._factor_update` from its
    cheapest source, as ``(X, s)``: the operand is ``X * s`` (``X`` itself where ``s`` is ``None``; the scaling left
    to the caller, which may make many in one call, :meth:`KlKronFactors.update_each`); ``None`` where the update goes
    through the sandwich instead."""
    m, n = G.shape[-2], G.shape[-1]
    if Q_other is None:
        return G, s_other
    if half is not None:
        return half, s_other
    if Q is not None and exact and n > 2 * m:
        return None
    if Q is not None and exact and m < n:
        return linalg.mm(Q, H if s_other is None else H * s_other), None
    return linalg.mm(G, Q_other if s_other is None else Q_other * s_other), None


def _left_statistic(H2: Tensor, sq_R: Tensor | None) -> Tensor:
    """A full left side's eigenvalue statistic before its division by ``n``, ``(b m)``: the rotated gradient's squares
    ``H2`` weighted by the right side's squared inverse roots ``sq_R (b n)`` (``None``: ones), summed along each row."""
    return H2.sum(-1) if sq_R is None else linalg.matvec(H2, sq_R)


def _right_statistic(H2: Tensor, sq_L: Tensor | None) -> Tensor:
    """:func:`_left_statistic` of the right side, before its division by ``m``, ``(b n)``."""
    # @, not linalg.mm: sL²ᵀ is a transposed row-vector stack, which @ rounds otherwise
    return H2.sum(-2) if sq_L is None else (sq_L.unsqueeze(-1).mT @ H2).squeeze(-2)


@FACTORS.register(
    "kl",
    description="KL-Shampoo: each factor from G and the other factor's tracked inverse; eigenvalues tracked per step "
    "(reads ctx.step, ctx.basis)",
)
@attrs.frozen(kw_only=True)
class KlKronFactors:
    r"""KL-Shampoo's factors: the two-sided KL (matrix-normal) estimate with tracked eigenvalues.

    Per call, from the **old** basis :math:`Q` and inverse roots :math:`s = \lambda^{-1/2}`
    (both sides simultaneously, :math:`\hat R^{-1} = Q_R\,\mathrm{diag}(s_R^2)\,Q_R^\top`):

    .. math::
        L \leftarrow \rho L + \tfrac{1-\rho}{n}\, G \hat R^{-1} G^\top,\qquad
        R \leftarrow \rho R + \tfrac{1-\rho}{m}\, G^\top \hat L^{-1} G,

        H = Q_L^\top G Q_R,\quad d_{L,i} = \tfrac1n \textstyle\sum_j H_{ij}^2 s_{R,j}^2 + \kappa\,\overline{s_R^2},\quad
        \lambda_L \leftarrow \rho \lambda_L + (1-\rho)\, d_L

    and likewise on the right; :math:`s = \min(\lambda^{-1/2}, c)` with
    :math:`c = \max(10, \min(d, c_{\max}))` (:func:`kronopt.linalg.tracked_inverse_root_ema`).
    The first call (``ctx.step == 0``) only sets :math:`L = (1-\rho) G G^\top / n`,
    :math:`R = (1-\rho) G^\top G / m` and keeps :math:`\lambda` = ``init_factor``.
    A side that is not rotated acts as the identity (:math:`s \equiv 1`).

    The eigenvalue estimates go to the inner rule through ``eigvals`` (as
    :math:`\lambda = 1/s^2`); they stay attached to the basis columns, so a refresh
    that permutes columns permutes them (:meth:`on_basis_change`).

    **Restricted side** (rank ``r``, right shown; pro_kl_shampoo.md §6): the factor
    is :math:`\hat R = U S U^\top + \mu P_\perp` with :math:`U` = ``ctx.basis.Q_R``
    ``(b n r)``. With :math:`Y = G U`, :math:`G_\perp = G - Y U^\top`,
    :math:`\hat G = \mathrm{diag}(s_L) Q_L^\top G`, :math:`\hat Y = \hat G U`:

    .. math::
        L \leftarrow \rho L + \tfrac{1-\rho}{n}\big[Y \mathrm{diag}(s_R^2) Y^\top + \mu^{-1} G_\perp G_\perp^\top\big],\quad
        S \leftarrow \rho S + \tfrac{1-\rho}{m} \hat Y^\top \hat Y,\quad
        \mu \leftarrow \rho\mu + \tfrac{1-\rho}{m(n-r)} \|\mathrm{diag}(s_L) Q_L^\top G_\perp\|_F^2,

    :math:`s_R` tracks :math:`\mathrm{diag}(\hat Y^\top \hat Y)/m` like a full side,
    and the power product :math:`P = \hat R_{new} U = \rho U S_{old} + \tfrac{1-\rho}{m}\hat G^\top \hat Y`
    (``tracker = "power"``) or its EMA over the refresh period (``"sketch"``) is
    what :meth:`factors` returns for the basis stage. On the first call :math:`U` is
    initialised to the top-``r`` right singular vectors of :math:`G` (returned as
    :math:`P`), :math:`S = (1-\rho) U^\top G^\top G U / m`, :math:`\mu` =
    ``init_factor``. When the basis moves :math:`U \to U'`, :math:`(S, \mu, s)` are
    re-projected onto the new family (trace preserved; :meth:`on_basis_change`).

    Attributes:
        beta: factor retention :math:`\rho \in [0, 1)` (the reference's ``shampoo_beta``, = β₂).
        init_factor: start value of every eigenvalue estimate (and of :math:`\mu`), > 0.
        damping: :math:`\kappa \ge 0` added as :math:`\kappa \cdot \mathrm{mean}(s_{other}^2)` to the
            eigenvalue statistics (the reference uses κ = eps with ``using_damping``; 0 = off).
        clamping: cap :math:`s` at :math:`c` (and floor :math:`\mu` at :math:`1/c^2`).
        max_clamp: :math:`c_{\max} \ge 1`.
        tracker: how a restricted side's power product is formed: ``"power"`` (this
            step's gradient only) or ``"sketch"`` (EMA over the refresh period).
        product_dtype: a full side's Gram product :math:`A A^\top`, :math:`A = G Q_R\,\mathrm{diag}(s_R)`
            (or the sandwich's :math:`\tilde H \tilde H^\top`): ``"compute"`` (the default) in the compute
            dtype; ``"bfloat16"`` rounds its operand and results to bfloat16, summed in at least float32,
            added to :math:`\rho L` in the compute dtype (as ``ema``'s; docs/configs.md). The operand's own
            product, a restricted side's products and a full side's beside a restricted one (its two-Gram
            update) keep the compute dtype.

    Invariants:
        Factors exactly symmetric and PSD (under ``product_dtype = "bfloat16"`` up to the increments'
        rounding, as ``ema``'s); inverse roots finite and in ``[0, c]`` (``tests/unit/test_kl_factors.py``).
    """

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities(
        provides_factors=True, provides_eigvals=True, follows_basis=True, supports_restricted=True, reads_rotated=True
    )

    beta: float = attrs.field(default=0.98, converter=to_float, validator=[ge(0.0), lt(1.0)])
    init_factor: float = attrs.field(default=0.1, converter=to_float, validator=gt(0.0))
    damping: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))
    clamping: bool = attrs.field(default=True, converter=to_bool)
    max_clamp: float = attrs.field(default=4000.0, converter=to_float, validator=ge(1.0))
    tracker: Literal["power", "sketch"] = attrs.field(
        default="power", converter=to_str, validator=in_(("power", "sketch"))
    )
    product_dtype: str = product_dtype_field()

    # -- helpers ---------------------------------------------------------------------------
    def _clamp(self, d: int) -> float | None:
        return linalg.kl_clamp_value(d, self.max_clamp) if self.clamping else None

    def _mu_floor(self, d: int, like: Tensor) -> float:
        c = self._clamp(d)
        return 1.0 / (c * c) if c is not None else torch.finfo(like.dtype).tiny

    # -- protocol --------------------------------------------------------------------------
    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> KlFactorsState:
        if layout.left == "restricted" and layout.right == "restricted":
            raise ValueError("factors 'kl' supports at most one restricted side per block")
        b = layout.batch
        s0 = self.init_factor**-0.5
        kw = {"dtype": dtype, "device": device}
        out: dict[str, Tensor | None] = {}
        for side, kind, d, r in (("L", layout.left, layout.m, layout.rank_left), ("R", layout.right, layout.n, layout.rank_right)):
            out[side] = torch.zeros(b, d, d, **kw) if kind == "full" else None
            k = d if kind == "full" else r
            out["s_" + side] = torch.full((b, k), s0, **kw) if kind in ("full", "restricted") else None
            restricted = kind == "restricted"
            out["sub_" + side] = torch.zeros(b, r, r, **kw) if restricted else None
            out["mu_" + side] = torch.full((b,), self.init_factor, **kw) if restricted else None
            out["power_" + side] = torch.zeros(b, d, r, **kw) if restricted else None
        return KlFactorsState(**out)

    def factors(self, state: KlFactorsState) -> tuple[Tensor | None, Tensor | None]:
        """``(L, R)``; on a restricted side the power product ``(b d r)`` instead of a factor."""
        return factors_or_power(state)

    def eigvals(self, state: KlFactorsState) -> tuple[Tensor | None, Tensor | None]:
        """The tracked eigenvalue estimates :math:`\\lambda = 1/s^2` per basis column (``+inf`` where ``s = 0``)."""
        return (
            None if state.s_L is None else linalg.inverse_square(state.s_L),
            None if state.s_R is None else linalg.inverse_square(state.s_R),
        )

    def flat_eigvals(self, state: KlFactorsState) -> tuple[Tensor | None, Tensor | None]:
        r"""The flat eigenvalue :math:`\mu` ``(b)`` of each restricted side (``None`` on a full or ``none`` side)."""
        return flat_eigvals(state)

    def update(self, state: KlFactorsState, G: Tensor, ctx: StepContext) -> KlFactorsState:
        left, right = _sides(state, ctx.layout, ctx)
        follows = ctx.refresh_follows
        first = ctx.step == 0
        parts = None  # the gradient's split against the subspace, shared through ctx (StepContext.subspace_split)
        if not first and "restricted" in (left.kind, right.kind):
            parts = ctx.subspace_split(G)
        if left.kind == "restricted":
            parts = None if parts is None else (parts[0].mT, parts[1].mT)  # the update runs on Gᵀ
            new_right, new_left = self._update(G.mT, right, left, first=first, power_follows=follows, parts=parts)
        else:
            new_left, new_right = self._update(G, left, right, first=first, ctx=ctx, power_follows=follows, parts=parts)
        return _pack(new_left, new_right)

    def eigvals_each(self, states: Sequence[KlFactorsState]) -> list[tuple[Tensor | None, Tensor | None]]:
        """:meth:`eigvals` of several buckets' states, the same bits, in one pass over them all
        (:func:`kronopt.linalg.inverse_squares_each`)."""
        s = [t for state in states for t in (state.s_L, state.s_R) if t is not None]
        lam = iter(linalg.inverse_squares_each(s))
        return [(None if st.s_L is None else next(lam), None if st.s_R is None else next(lam)) for st in states]

    def update_each(
        self, states: Sequence[KlFactorsState], G: Sequence[Tensor], ctxs: Sequence[StepContext]
    ) -> list[KlFactorsState]:
        """:meth:`update` of several buckets' factors, the same bits: each bucket's products in its turn (the
        rotation shared through its context, :meth:`StepContext.rotated`; the statistics' matrix-vector products),
        the elementwise work of them all in one ``foreach`` call or one pass over one flat vector per operation (the
        squared rotations, the scaled Gram operands, the squared inverse roots, the eigenvalue estimates:
        :func:`kronopt.linalg.tracked_inverse_root_ema_each`), their Gram updates' small sums together
        (:func:`kronopt.linalg.accumulate_grams_each`): on many small buckets a step costs its calls, not its
        arithmetic. A restricted side's plain updates likewise (:meth:`_restricted_each`); a first call, ``damping``
        and a restricted side's other updates go through :meth:`update`."""
        rho = self.beta
        out: list[Any] = [None] * len(states)
        work: list[tuple[int, _Side, _Side, Tensor, Any]] = []  # (bucket, left, right, G, rotation)
        restricted: list[tuple[int, Tensor, _Side, _Side, tuple[Tensor, Tensor], bool]] = []
        for i, (state, g, ctx) in enumerate(zip(states, G, ctxs)):
            left, right = _sides(state, ctx.layout, ctx)
            if ctx.step == 0 or self.damping:
                out[i] = self.update(state, g, ctx)
            elif "restricted" in (left.kind, right.kind):
                taken = self._restricted_call(g, left, right, ctx)
                if taken is None:
                    out[i] = self.update(state, g, ctx)
                else:
                    restricted.append((i, *taken))
            else:
                work.append((i, left, right, g, ctx.rotated(g)))
        if restricted:
            for i, (new_left, new_right) in self._restricted_each(restricted).items():
                out[i] = _pack(new_left, new_right)
        if not work:
            return out
        H2 = torch._foreach_mul([w[4].H for w in work], [w[4].H for w in work])
        # the squared roots each in memory of its own: a product reads them, and MKL rounds a product by its
        # operands' alignment (a view into one flat vector of them all moved bits on a 17 × 26 block)
        s = [t for w in work for t in (w[1].s, w[2].s) if t is not None]
        squares = iter(torch._foreach_mul(s, s) if s else [])
        # per bucket: each side's Gram operand A = X Q_other diag(s_other) (a product, a scaling of the half rotation
        # or of G, scaled below in one call; None: the sandwich), then the statistics' products
        grams: list[tuple[int, str, _Side, Tensor, float, Any]] = []  # (bucket, side, side, A, alpha, defer)
        scale: list[tuple[int, Tensor, Tensor]] = []  # (position in grams, X, s_other): A = X * s_other
        made: dict[tuple[int, str], Tensor] = {}  # factors made otherwise (the sandwich)
        # (bucket, side, s, d, divisor, ceiling)
        tracked: list[tuple[int, str, Tensor, Tensor, float, float | None]] = []
        for (i, left, right, g, rotation), H2_i in zip(work, H2):
            ctx, (m, n) = ctxs[i], g.shape[-2:]
            sq_L = None if left.s is None else next(squares)
            sq_R = None if right.s is None else next(squares)
            sL = None if left.s is None else left.s.unsqueeze(-1)
            sR = None if right.s is None else right.s.unsqueeze(-2)
            H = rotation.H
            Gl, Gr = (None if h is None else h.to(g.dtype) for h in (rotation.left, rotation.right))
            for name, side, X, Xh, Q_other, s_other, half, alpha in (
                ("L", left, g, H, right.Q, sR, Gr, (1 - rho) / n),
                ("R", right, g.mT, H.mT, left.Q, None if sL is None else sL.mT, None if Gl is None else Gl.mT,
                 (1 - rho) / m),
            ):
                if side.F is None:
                    continue
                operand = _gram_operand(
                    X, Xh, Q=side.Q, Q_other=Q_other, s_other=s_other, half=half, exact=ctx.exact_basis
                )
                if operand is None:
                    made[i, name] = self._sandwich(side.F, side.Q, Xh, s_other, alpha)  # type: ignore[arg-type]
                    continue
                A, s_A = operand
                if s_A is not None:  # scaled below, in one call for them all
                    scale.append((len(grams), A, s_A))
                grams.append((i, name, side, A, alpha, ctx.defer))
            if left.F is not None:
                d_L = _left_statistic(H2_i, sq_R)
                tracked.append((i, "L", left.s, d_L, n, self._clamp(left.d)))  # type: ignore[arg-type]
            if right.F is not None:
                d_R = _right_statistic(H2_i, sq_L)
                tracked.append((i, "R", right.s, d_R, m, self._clamp(right.d)))  # type: ignore[arg-type]
        if scale:
            for (k, _, _), A in zip(scale, torch._foreach_mul([x for _, x, _ in scale], [y for _, _, y in scale])):
                grams[k] = (*grams[k][:3], A, *grams[k][4:])
        if grams:
            new = linalg.accumulate_grams_each(
                [w[2].F for w in grams], [w[3] for w in grams], rho,  # type: ignore[misc]
                [w[4] for w in grams], [w[5] for w in grams],
                dtype=narrow_dtype(self.product_dtype),
            )
            made.update(((w[0], w[1]), F) for w, F in zip(grams, new))
        roots = linalg.tracked_inverse_root_ema_each(
            [w[2] for w in tracked], [w[3] for w in tracked], rho, [w[5] for w in tracked],
            divisors=[w[4] for w in tracked],
        )
        s_new = {(w[0], w[1]): r for w, r in zip(tracked, roots)}
        for i, left, right, _, _ in work:
            out[i] = attrs.evolve(
                states[i], L=made.get((i, "L"), left.F), R=made.get((i, "R"), right.F),
                s_L=s_new.get((i, "L"), left.s), s_R=s_new.get((i, "R"), right.s),
            )
        return out

    def _restricted_call(
        self, G: Tensor, left: _Side, right: _Side, ctx: StepContext
    ) -> tuple[Tensor, _Side, _Side, tuple[Tensor, Tensor], bool] | None:
        """A call of a bucket with a restricted side that :meth:`_restricted_each` makes with others, as
        ``(G, left, right, (G U, G P⊥), swapped)`` with the restricted side on the right (``swapped``: the layout's
        left one, ``G`` and its parts transposed, as :meth:`update` runs it), or ``None`` where :meth:`update` makes
        it: its ``"power"`` tracker's product not due (no refresh follows), the other side full and rotated and
        shorter (:func:`kronopt.linalg.accumulate_two_grams_left_with_energy`'s Gram form), neither summed by blocks
        nor tiled, in float32 or wider."""
        if self.tracker != "power" or ctx.refresh_follows:
            return None
        parts = ctx.subspace_split(G)
        swapped = left.kind == "restricted"
        if swapped:
            G, left, right, parts = G.mT, right, left, (parts[0].mT, parts[1].mT)
        m, n = G.shape[-2], G.shape[-1]
        if (
            right.kind != "restricted" or left.F is None or left.Q is None or n <= m
            or m >= linalg._SYM_BLOCKED_MIN or linalg._tiled(left.F, parts[1])
            or torch.finfo(G.dtype).eps > torch.finfo(torch.float32).eps
        ):
            return None
        return G, left, right, parts, swapped

    def _restricted_each(
        self, calls: Sequence[tuple[int, Tensor, _Side, _Side, tuple[Tensor, Tensor], bool]]
    ) -> dict[int, tuple[_Side, _Side]]:
        r""":meth:`_update_restricted` of several buckets' calls (:meth:`_restricted_call`'s, by position), the same
        bits: each bucket's products and sums in its turn, the elementwise work of them all in one ``foreach`` call
        or one pass over one flat vector per operation, the Gram sums of the subspace factors together
        (:func:`kronopt.linalg.accumulate_grams_each`), the eigenvalue estimates of both sides of them all in one
        pass (:func:`kronopt.linalg.tracked_inverse_root_ema_each`). Returns each call's new ``(left, right)`` in
        the layout's order."""
        rho = self.beta
        G = [c[1] for c in calls]
        left, right = [c[2] for c in calls], [c[3] for c in calls]
        Y, Gc = [c[4][0] for c in calls], [c[4][1] for c in calls]
        m = [g.shape[-2] for g in G]
        n = [g.shape[-1] for g in G]
        Hy = [linalg.mm(L.Q.mT, y) for L, y in zip(left, Y)]  # type: ignore[union-attr]  # Q_Lᵀ G U
        inv_mu = [t.view(-1, 1, 1) for t in torch._foreach_reciprocal([R.mu for R in right])]  # type: ignore[misc]
        tau = [R.s for R in right]
        A = torch._foreach_mul(Y, [t.unsqueeze(-2) for t in tau])  # type: ignore[union-attr]
        # the left factors and the complement's rows' energies in the left basis, as
        # accumulate_two_grams_left_with_energy's Gram form makes them; d_L's weighted energies
        C = [linalg.mm(c, c.mT) for c in Gc]
        F = [
            linalg._two_grams(L.F, a, c, w, rho, (1 - rho) / k)  # type: ignore[arg-type]
            for L, a, c, w, k in zip(left, A, C, inv_mu, n)
        ]
        e_c = [linalg.rotated_diagonal(c, L.Q) for L, c in zip(left, C)]  # type: ignore[arg-type]
        # the statistics: d_L = (Σ_j (Q_Lᵀ G U)²_ij τ_j² + e_c / μ) / n, d_R = Σ_i Ŷ²_ij / m with
        # Ŷ = diag(s_L) Q_Lᵀ G U, d_μ = Σ_i e_c,i s_L,i² / (m (n - r))
        squares = torch._foreach_mul(tau, tau)  # type: ignore[arg-type]
        energy = [linalg.weighted_row_energy(h, t) for h, t in zip(Hy, squares)]
        d_L = torch._foreach_add(energy, torch._foreach_mul([t.squeeze(-1) for t in inv_mu], e_c))
        sL = [L.s for L in left]
        Yh = torch._foreach_mul(Hy, [s.unsqueeze(-1) for s in sL])  # type: ignore[union-attr]
        sub = linalg.accumulate_grams_each(
            [R.sub for R in right], [y.mT for y in Yh], rho, [(1 - rho) / k for k in m]  # type: ignore[misc]
        )
        d_R = [x.sum(-2) for x in torch._foreach_mul(Yh, Yh)]
        roots = linalg.tracked_inverse_root_ema_each(
            [*sL, *tau], [*d_L, *d_R], rho,  # type: ignore[list-item]
            [*(self._clamp(k) for k in m), *(self._clamp(k) for k in n)],
            divisors=[*n, *m],
        )
        d_mu = [x.sum(-1) for x in torch._foreach_mul(e_c, torch._foreach_mul(sL, sL))]  # type: ignore[arg-type]
        d_mu = torch._foreach_div(d_mu, [k * max(j - R.rank, 1) for k, j, R in zip(m, n, right)])
        mu = self._flat_mu_each([R.mu for R in right], d_mu, n)  # type: ignore[misc]
        out = {}
        for k, (i, _, L, R, _, swapped) in enumerate(calls):
            new_left = attrs.evolve(L, F=F[k], s=roots[k])
            new_right = attrs.evolve(R, sub=sub[k], s=roots[len(calls) + k], mu=mu[k])
            out[i] = (new_right, new_left) if swapped else (new_left, new_right)
        return out

    def _mu_step(self, mu: Tensor, d_mu: Tensor, d: int) -> Tensor:
        """A restricted side's flat eigenvalue after one EMA step toward the statistic ``d_mu`` (NaN: the start
        value), floored (``d``: the side's size)."""
        return torch.lerp(mu, d_mu, 1 - self.beta).nan_to_num(nan=self.init_factor).clamp(min=self._mu_floor(d, mu))

    def _flat_mu_each(self, mu: list[Tensor], d_mu: list[Tensor], d: list[int]) -> list[Tensor]:
        """The flat eigenvalues' EMA step of :meth:`_update_restricted` for several buckets (``d``: each restricted
        side's size, its floor's), the same bits, in one pass over one flat vector per dtype and device."""
        out: list[Tensor] = [None] * len(mu)  # type: ignore[list-item]
        for group in linalg.alike(mu):
            if len(group) == 1:  # alone, as the pipeline makes it (a stack of another layout keeps it)
                i = group[0]
                out[i] = self._mu_step(mu[i], d_mu[i], d[i])
                continue
            part = [mu[i] for i in group]
            new = torch.lerp(linalg.joined(part), linalg.joined([d_mu[i] for i in group]), 1 - self.beta)
            new = new.nan_to_num(nan=self.init_factor)
            floors = linalg.spread([self._mu_floor(d[i], mu[i]) for i in group], part, new)
            # max(x, floor) rounds nothing: the same bits as each part's clamp (no NaN is left)
            for i, t in zip(group, linalg.parted(torch.maximum(new, floors), part)):
                out[i] = t
        return out

    def on_basis_change(self, state: KlFactorsState, change: BasisChange) -> KlFactorsState:
        """Keep the estimates attached to their columns; re-project a restricted side onto its new subspace."""
        old, new = change.old, change.new
        s_L, sub_L, mu_L, power_L = self._follow(
            state.s_L, state.sub_L, state.mu_L, state.power_L, change.perm_L, old.Q_L, new.Q_L, ready=old.ready
        )
        s_R, sub_R, mu_R, power_R = self._follow(
            state.s_R, state.sub_R, state.mu_R, state.power_R, change.perm_R, old.Q_R, new.Q_R, ready=old.ready
        )
        return attrs.evolve(
            state, s_L=s_L, sub_L=sub_L, mu_L=mu_L, power_L=power_L, s_R=s_R, sub_R=sub_R, mu_R=mu_R, power_R=power_R
        )

    def _follow(
        self, s: Tensor | None, sub: Tensor | None, mu: Tensor | None, power: Tensor | None, perm: Tensor | None,
        U_old: Tensor | None, U_new: Tensor | None, *, ready: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """One side's ``(s, sub, mu, power)`` after a basis change: permuted roots on a full side,
        the re-projection of :meth:`_reproject` on a restricted one."""
        if sub is not None:
            return self._reproject(s, sub, mu, power, U_old, U_new, ready=ready)  # type: ignore[arg-type]
        if s is not None and perm is not None:
            s = torch.gather(s, -1, perm)
        return s, sub, mu, power

    # -- the update, with the restricted side (if any) on the right --------------------------
    def _update(
        self, G: Tensor, left: _Side, right: _Side, *, first: bool, ctx: StepContext | None = None, power_follows: bool = True,
        parts: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[_Side, _Side]:
        """One call with the sides as they come (``ctx``: the sides are ``ctx``'s basis, unswapped, so the
        rotation of ``G`` an inner rule already made is reused, :meth:`StepContext.rotated`; ``power_follows``:
        a refresh follows, so a restricted side's power product is needed; ``parts``: ``(G U, G P⊥)`` for a
        restricted right side, where the caller has them)."""
        rho = self.beta
        m, n = G.shape[-2], G.shape[-1]
        if first:
            return self._first(G, left, right)
        sL = None if left.s is None else left.s.unsqueeze(-1)  # (b m 1)
        if right.kind == "restricted":
            return self._update_restricted(G, sL, left, right, power_follows=power_follows, parts=parts)
        exact = ctx is not None and ctx.exact_basis  # Q Qᵀ = I may stand in for a product
        if ctx is not None:
            rotation = ctx.rotated(G)
            Gl, Gr, H = rotation.left, rotation.right, rotation.H  # Q_Lᵀ G or G Q_R (the other None), Q_Lᵀ G Q_R
            # (a narrow rotation_dtype's half product is in that dtype: Rotation)
            Gl, Gr = (None if h is None else h.to(G.dtype) for h in (Gl, Gr))
        else:
            Gl = G if left.Q is None else left.Q.mT @ G
            Gr, H = None, (Gl if right.Q is None else Gl @ right.Q)
        H2 = H.square()
        sR = None if right.s is None else right.s.unsqueeze(-2)  # (b 1 n)
        defer = None if ctx is None else ctx.defer  # the factor Gram updates may go to the state write
        new_left, new_right = left, right
        if left.F is not None:
            F = self._factor_update(
                left.F, G, H, Q=left.Q, Q_other=right.Q, s_other=sR, half=Gr, exact=exact, alpha=(1 - rho) / n, defer=defer
            )
            d_L = _left_statistic(H2, None if right.s is None else right.s.square()) / n
            new_left = self._tracked(left, F, d_L, right, G)
        if right.F is not None:
            sL_row = None if sL is None else sL.mT  # (b 1 m)
            F = self._factor_update(
                right.F, G.mT, H.mT, Q=right.Q, Q_other=left.Q, s_other=sL_row, half=None if Gl is None else Gl.mT,
                exact=exact, alpha=(1 - rho) / m, defer=defer,
            )
            d_R = _right_statistic(H2, None if left.s is None else left.s.square()) / m
            new_right = self._tracked(right, F, d_R, left, G)
        return new_left, new_right

    def _factor_update(
        self, F: Tensor, G: Tensor, H: Tensor, *, Q: Tensor | None, Q_other: Tensor | None, s_other: Tensor | None,
        half: Tensor | None, exact: bool, alpha: float, defer: "list[linalg.DeferredWrite] | None",
    ) -> Tensor:
        r"""The left factor's new value :math:`\rho F + \alpha\, G \hat R^{-1} G^\top`, with
        :math:`\hat R^{-1} = Q_R \mathrm{diag}(s_R^2) Q_R^\top` (the right side: the same on :math:`G^\top`,
        everything transposed). ``H`` is :math:`Q_L^\top G Q_R`, ``half`` :math:`G Q_R` where the rotation made
        it. The Gram operand :math:`G Q_R \mathrm{diag}(s_R)` (``m × n``) comes from the cheapest source:

        * :math:`G\,\mathrm{diag}(s_R)` where the right side is not rotated (``Q_other`` ``None``: the identity);
        * ``half`` where it exists (free);
        * :math:`Q_L (H\,\mathrm{diag}(s_R))` through the sandwich :math:`Q_L (\tilde H \tilde H^\top) Q_L^\top`
          (:func:`kronopt.linalg.accumulate_sandwich`; :math:`2m^3` instead of an ``m × n`` product) where the
          block is more than twice as long on the other side, :math:`Q_L (H\,\mathrm{diag}(s_R))` itself
          (:math:`m^2 n`) where it is longer; both use :math:`Q_L Q_L^\top = I`, so only with ``exact``;
        * otherwise :math:`G (Q_R \mathrm{diag}(s_R))` (:math:`m n^2`, the scaling on the ``n × n`` basis).

        Every form is the same update in exact arithmetic; they differ in rounding (under ``product_dtype =
        "bfloat16"`` by bfloat16's: the sandwich rounds the Gram product of :math:`H\,\mathrm{diag}(s_R)`, the
        others that of :math:`A`)."""
        operand = _gram_operand(G, H, Q=Q, Q_other=Q_other, s_other=s_other, half=half, exact=exact)
        if operand is None:
            return self._sandwich(F, Q, H, s_other, alpha)  # type: ignore[arg-type]
        A, s = operand
        A = A if s is None else A * s
        return linalg.accumulate_gram_left(F, A, self.beta, alpha, defer=defer, dtype=narrow_dtype(self.product_dtype))

    def _sandwich(self, F: Tensor, Q: Tensor, H: Tensor, s_other: Tensor | None, alpha: float) -> Tensor:
        r""":meth:`_factor_update`'s sandwich form, :math:`\rho F + \alpha\, Q (\tilde H \tilde H^\top) Q^\top`
        with :math:`\tilde H = H\,\mathrm{diag}(s)`."""
        H = H if s_other is None else H * s_other
        return linalg.accumulate_sandwich(F, Q, H, self.beta, alpha, dtype=narrow_dtype(self.product_dtype))

    def _tracked(self, side: _Side, F: Tensor, d: Tensor, other: _Side, G: Tensor) -> _Side:
        """The side with its new factor ``F`` and its eigenvalue EMA fed the statistic ``d`` (+ damping)."""
        if self.damping:
            d = d + self.damping * _mean_inverse(other, G)
        s = linalg.tracked_inverse_root_ema(side.s, d, self.beta, self._clamp(side.d))  # type: ignore[arg-type]
        return attrs.evolve(side, F=F, s=s)

    def _update_restricted(
        self, G: Tensor, sL: Tensor | None, left: _Side, right: _Side, *, power_follows: bool = True,
        parts: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[_Side, _Side]:
        r"""The update with a restricted right side. ``G`` is split against ``U`` first and each part
        rotated on its own (``Q_Lᵀ Y``: :math:`m^2 r`, ``Q_Lᵀ G_⊥``: :math:`m^2 n`), instead of
        rotating ``G`` and splitting the result (:math:`m^2 n + 2mnr`): cheaper whenever
        :math:`m < 2n`, which holds for every block with the restricted side the larger one
        (``split.side = "larger"``, the preset's). The ``"power"`` tracker's product
        :math:`\hat R_{new} U` depends on this update alone and only a refresh reads it: without
        ``power_follows`` (no refresh follows) it is not computed and the old one is kept (:math:`2mnr`
        multiply-adds and more saved); ``"sketch"`` accumulates it on every update. The complement's
        rotation :math:`Q_L^\top G_\perp` is read only by the eigenvalue statistics, through its rows'
        energies, and by ``"sketch"``'s power increment :math:`\hat G^\top \hat Y`, assembled from the two
        parts; a full left side takes those energies from the Gram :math:`G_\perp G_\perp^\top` its factor
        update makes anyway (:func:`kronopt.linalg.accumulate_two_grams_left_with_energy`, :math:`m^3`
        instead of :math:`m^2 n` where :math:`n > m`), so ``"power"`` never makes the product: its increment
        is :math:`G^\top (Q_L W)` with :math:`W = \mathrm{diag}(s_L^2)\, Q_L^\top G U` (:math:`m^2 r + mnr`
        instead of :math:`m^2 n + mnr`)."""
        rho = self.beta
        m, n, r = G.shape[-2], G.shape[-1], right.rank
        U, tau, mu = right.Q, right.s, right.mu
        assert U is not None and tau is not None and mu is not None and right.sub is not None
        Y, Gc = linalg.subspace_split(G, U) if parts is None else parts  # G U, G P⊥
        Hy = Y if left.Q is None else linalg.mm(left.Q.mT, Y)  # Q_Lᵀ G U
        inv_mu = torch.reciprocal(mu).view(-1, 1, 1)
        new_left = left
        if left.F is not None:
            # the rows' energies ‖(Q_Lᵀ G P⊥)_i‖² from the Gram of G P⊥ the factor update makes anyway, where
            # that is cheaper than the product Q_Lᵀ G P⊥ (then made only for the power product below). "sketch"
            # reads the product on every update, so it takes the product's route throughout; "power" takes the
            # Gram's on every update, also those a refresh follows, so the statistics never depend on whether
            # one does (m³ more on those updates)
            F, e_c, Hc = linalg.accumulate_two_grams_left_with_energy(
                left.F, Y * tau.unsqueeze(-2), Gc, inv_mu, rho, (1 - rho) / n, left.Q, product=self.tracker == "sketch"
            )
            d_L = (linalg.weighted_row_energy(Hy, tau.square()) + inv_mu.squeeze(-1) * e_c) / n
            new_left = self._tracked(left, F, d_L, right, G)
        else:  # a side that is not rotated
            Hc = Gc
            e_c = linalg.weighted_row_energy(Hc, None)  # (b m): ‖(G P⊥)_i‖²
        Yh = Hy if sL is None else Hy * sL  # Ŷ = diag(s_L) Q_Lᵀ G U
        sub = linalg.accumulate_gram_right(right.sub, Yh, rho, (1 - rho) / m)
        extra = self.damping * _mean_inverse(left, G) if self.damping else 0.0
        d_R = Yh.square().sum(-2) / m + extra
        tau = linalg.tracked_inverse_root_ema(tau, d_R, rho, self._clamp(n))
        d_mu = (e_c if sL is None else e_c * sL.squeeze(-1).square()).sum(-1) / (m * max(n - r, 1))
        if self.damping:
            d_mu = d_mu + extra.squeeze(-1)  # type: ignore[union-attr]
        mu_new = self._mu_step(mu, d_mu, n)
        if not power_follows and self.tracker == "power":
            return new_left, attrs.evolve(right, sub=sub, s=tau, mu=mu_new)
        # Ĝᵀ Ŷ = (Q_Lᵀ G)ᵀ W with W = diag(s_L²) Q_Lᵀ G U: where the complement's rotation Hc = Q_Lᵀ G P⊥ was made
        # (a side not rotated, the "sketch" tracker), from Q_Lᵀ G = Hy Uᵀ + Hc; else as Gᵀ (Q_L W), m² r + m n r
        # multiply-adds instead of the m² n of Hc and its products
        W = Yh if sL is None else Yh * sL
        if Hc is None:
            increment = linalg.mm(G.mT, linalg.mm(left.Q, W))  # type: ignore[arg-type]
        else:
            increment = linalg.addmm_(linalg.mm(Hc.mT, W), U, linalg.mm(Hy.mT, W))
        increment = increment.mul_((1 - rho) / m)  # (1-ρ) Gᵀ L̂⁻¹ G U / m
        if self.tracker == "power":
            power = linalg.restricted_power_product(U, right.sub, increment, rho)
        else:
            power = torch.add(increment, right.power, alpha=rho)  # type: ignore[arg-type]
        return new_left, attrs.evolve(right, sub=sub, s=tau, mu=mu_new, power=power)

    def _first(self, G: Tensor, left: _Side, right: _Side) -> tuple[_Side, _Side]:
        """kl_shampoo.md §5: factors from G alone, eigenvalue estimates stay at ``init_factor``."""
        rho, m, n = self.beta, G.shape[-2], G.shape[-1]
        # a full side beside a restricted one keeps the compute dtype: its later updates (the two-Gram form) do
        narrow = None if right.kind == "restricted" else narrow_dtype(self.product_dtype)
        new_left, new_right = left, right
        if left.F is not None:
            F = linalg.accumulate_gram_left(torch.zeros_like(left.F), G, 0.0, (1 - rho) / n, dtype=narrow)
            new_left = attrs.evolve(left, F=F)
        if right.F is not None:
            F = linalg.accumulate_gram_right(torch.zeros_like(right.F), G, 0.0, (1 - rho) / m, dtype=narrow)
            new_right = attrs.evolve(right, F=F)
        elif right.kind == "restricted":
            U0 = linalg.top_right_singular(G, right.rank)
            Y = G @ U0
            sub = linalg.accumulate_gram_right(torch.zeros_like(right.sub), Y, 0.0, (1 - rho) / m)  # type: ignore[arg-type]
            new_right = attrs.evolve(right, sub=sub, power=U0)
        return new_left, new_right

    def _reproject(
        self, s: Tensor, sub: Tensor, mu: Tensor, power: Tensor | None, U_old: Tensor, U_new: Tensor, *, ready: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        r"""Project :math:`(S, \mu, s)` of a restricted side onto the new subspace (pro_kl_shampoo.md §7).

        :func:`kronopt.linalg.reproject_flat` with :math:`T = U'^\top U`; :math:`\mu'` is
        floored and the tracked inverse roots recomputed (and clamped) from the
        re-projected eigenvalue estimates. Before the first refresh the state is
        already expressed in the initial subspace (the first call's power product), so
        it is kept. ``sketch`` restarts its power product at :math:`U' S'`.
        """
        if not ready:
            return s, sub, mu, (U_new @ sub if self.tracker == "sketch" else power)
        d = U_new.shape[-2]
        sub_new, mu_new, lam_new = linalg.reproject_flat(U_new, U_old, sub, mu, linalg.finite_or_zero(s.square().reciprocal_()))
        mu_new = mu_new.nan_to_num(nan=self.init_factor).clamp(min=self._mu_floor(d, mu))
        s_new = linalg.finite_or_zero(lam_new.clamp(min=0.0).rsqrt())
        c = self._clamp(d)
        if c is not None:
            s_new = s_new.clamp(max=c)
        return s_new, sub_new, mu_new, (U_new @ sub_new if self.tracker == "sketch" else power)
