r"""The ``projector_splitting`` factor estimator (DyKAF).

DyKAF tracks the nearest Kronecker product of the empirical Fisher
:math:`F_t = \beta F_{t-1} + (1-\beta)\,\mathrm{vec}\,G_t\,\mathrm{vec}\,G_t^\top`
with a rank-one dynamical low-rank integrator on the rearranged matrix
:math:`\mathcal R(F_t)`; see ``shared/specs/dykaf.md`` and
:func:`kronopt.linalg.projector_split_ksl`.
"""

from collections.abc import Sequence
from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import ge, gt, in_, lt, to_beta, to_int, to_str, unless_tie
from ..registry import FACTORS
from ._products import narrow_dtype, product_dtype_field
from ._restricted import factors_or_power, flat_eigvals, follow_subspace
from ..types import BasisChange, FactorCapabilities, Layout, StepContext

VARIANTS: tuple[str, ...] = ("ksl", "parallel")
INITS: tuple[str, ...] = ("kron", "kron_reference", "eps", "sum")
ONE_SIDED: tuple[str, ...] = ("ema", "sum")
INIT_SOLVERS: tuple[str, ...] = ("svd", "power")


def _init_choice(_inst: object, _attr: object, value: str) -> None:
    if value == "zeros":
        raise ValueError(
            "'zeros' is not supported by projector splitting: the integrator normalises R by its norm, "
            f"which is undefined at R = 0; use one of {', '.join(repr(i) for i in INITS)}"
        )
    in_(INITS)(_inst, _attr, value)


@attrs.frozen(eq=False)
class ProjectorSplittingState:
    """``L (b m m)``, ``R (b n n)`` (``None`` on a side that is not rotated or is restricted), the per-block
    flag ``initialised (b)`` and the number of calls seen (a Python int). A restricted side (left shown)
    keeps ``sub_L (b r r)``, ``mu_L (b)`` and the power product ``power_L (b m r)`` instead (computed on the
    updates a refresh follows, ``StepContext.refresh_follows``; kept as it was on the others)."""

    L: Tensor | None
    R: Tensor | None
    initialised: Tensor
    calls: int = 0
    sub_L: Tensor | None = None
    sub_R: Tensor | None = None
    mu_L: Tensor | None = None
    mu_R: Tensor | None = None
    power_L: Tensor | None = None
    power_R: Tensor | None = None


@FACTORS.register(
    "projector_splitting",
    description="rank-1 projector-splitting tracker of the nearest Kronecker product of the Fisher EMA (DyKAF)",
)
@attrs.frozen(kw_only=True)
class ProjectorSplittingFactors:
    r"""DyKAF's Kronecker factors: a rank-one projector-splitting integrator on :math:`\mathcal R(F)`.

    Per call, on a block with both sides rotated (``variant = "ksl"``, :math:`r = \|R\|_F`,
    :math:`\bar R = R/r`, after :math:`L, R \leftarrow \sqrt\beta\,L, \sqrt\beta\,R` and
    :math:`G \leftarrow \sqrt{1-\beta}\,G`):

    .. math::
        U \propto rL + G\bar R G^\top,\quad \hat R = r\langle U, L\rangle \bar R + G^\top U G,\quad
        (L, R) \leftarrow (\sqrt{S}\,U,\ \hat R/\sqrt{S}),\ S = \|\hat R\|_F .

    ``variant = "parallel"`` is the basis-update & Galerkin form
    (:func:`kronopt.linalg.projector_split_parallel`).

    First call of a block (config key and constructor argument ``init``; the
    attribute is ``initialization`` because ``init`` is the slot method):

    * ``"kron"``: :math:`L_0 = \sqrt{1-\beta}\,\sigma_1 u_1u_1^\top`,
      :math:`R_0 = \sqrt{1-\beta}\,\sigma_1 v_1 v_1^\top` from the dominant singular
      triplet of :math:`G_1`, so :math:`L_0\otimes R_0` is exactly the nearest Kronecker
      product of the EMA's first term :math:`(1-\beta)\,\mathrm{vec}\,G_1\mathrm{vec}\,G_1^\top`;
      :math:`G_1` is not fed through the integrator again.
    * ``"kron_reference"``: the authors' code, :math:`\sqrt{\sigma_1}\,u_1u_1^\top`,
      :math:`\sqrt{\sigma_1}\,v_1v_1^\top`, then :math:`G_1` fed through the integrator.
    * ``"eps"``: :math:`10^{-3} I_m/\sqrt m`, :math:`10^{-3} I_n/\sqrt n`, then :math:`G_1` fed.
    * ``"sum"``: :math:`G_1G_1^\top`, :math:`G_1^\top G_1`, then :math:`G_1` fed.

    With ``kron``, ``kron_reference`` and ``sum`` a block whose first gradient is exactly
    zero waits for its first nonzero one (:meth:`starts_on_nonzero`): the optimizer leaves
    it out of its bucket's first call, as if it had no gradient, and gives it a first call
    of its own (the start above, no parameter update, no step count) with that gradient.
    Where a block of a bucket that has started still holds nothing (``initialised`` is a
    per-block device flag: a first call whose gradient the non-finite guard discarded, or
    an FSDP2 bucket, whose rows the optimizer does not read for zeros), a nonzero gradient
    starts it inside the bucket. Such a late start costs nothing extra: it is the
    integrator run from :math:`L = 0` with the direction :math:`\bar R = I/\sqrt n`
    (``fresh`` in :func:`kronopt.linalg.projector_split_ksl`), i.e. :math:`U \propto GG^\top`,
    :math:`R \propto G^\top U G`, the best fit of :math:`(1-\beta)\,G\otimes G` with
    that :math:`U` — exact for a rank-one gradient, an approximation of the SVD start
    otherwise. The first call's SVD (or power iteration) runs only on the first call.

    A block with one side not rotated (longer than ``shapes.max_dim``, or the trivial
    side of a 1-D parameter) keeps the other side as ``one_sided``: ``"ema"`` is SOAP's
    :math:`L \leftarrow \beta L + (1-\beta)GG^\top` from zero; ``"sum"`` the authors'
    :math:`L \leftarrow L + GG^\top` from :math:`10^{-3} I/\|I\|_F`.

    Attributes:
        beta: EMA retention of the Fisher, in ``(0, 1)`` (SOAP's ``shampoo_beta``), or
            ``"beta2"``: the inner rule's :math:`\beta_2`, as the authors' ``shampoo_beta = -1``
            (resolved by :meth:`kronopt.config.KronConfig.bound`).
        variant: ``"ksl"`` (K-, S-, L-steps) or ``"parallel"`` (basis update & Galerkin).
        initialization: ``"kron"``, ``"kron_reference"``, ``"eps"`` or ``"sum"`` (``"zeros"`` is rejected).
        init_solver: ``"svd"`` (batched SVD) or ``"power"`` for the first call's triplet.
        power_iters: iterations of the ``"power"`` solver, ≥ 1 (100, the authors' count: its error falls as
            :math:`(\sigma_2/\sigma_1)^{2k}`, and a 64 × 64 Gaussian gradient's ratio is 0.94–0.98, where 20
            left the ``kron`` start 0.2–1.3 off in relative error; nearer 1 on larger blocks, see docs/dykaf.md).
        one_sided: the factor of a block with one side not rotated: ``"ema"`` (SOAP) or ``"sum"`` (authors').
        product_dtype: the precision of the integrator's sandwich products (and a one-sided block's Gram product):
            ``"compute"`` (the default) the compute dtype; ``"bfloat16"`` rounds each product's operands
            (:math:`G`, the sandwich's middle :math:`\bar R`, :math:`U`, ..., and the product before) and its result
            to bfloat16, each product summed in at least float32; the weights, the sums with :math:`L` and :math:`R`
            and the norms stay in the compute dtype (:func:`kronopt.linalg.projector_split_ksl` and
            :func:`~kronopt.linalg.projector_split_parallel`, ``dtype=``; docs/configs.md). The first call's start
            and a restricted side's products keep the compute dtype.

    **Restricted side** (rank ``r``, right shown; ``docs/pro.md``; ``variant = "ksl"``,
    ``initialization = "kron"`` and the other side full, else :meth:`init` refuses):
    :math:`R = U S U^\top + \mu P_\perp` with :math:`U` = ``ctx.basis.Q_R``. The KSL step
    runs on this :math:`R` without forming it (:math:`Y = G U`,
    :math:`G\bar R G^\top = (Y S Y^\top + \mu(GG^\top - YY^\top))/\|R\|_F`), and its new
    :math:`\hat R = c R + G^\top U_L G` is M-projected onto the family for the same
    :math:`U`: :math:`S' = cS + Y^\top U_L Y`,
    :math:`\mu' = c\mu + (\langle U_L, GG^\top\rangle - \mathrm{tr}\,Y^\top U_L Y)/(n-r)`,
    with the power product :math:`\hat R U = c\,U S + G^\top U_L Y` for the basis stage;
    the balance :math:`\|L\|_F = \|R\|_F` uses the projected :math:`R`. First call:
    :math:`L_0` as ``kron``, :math:`U_0` = top-``r`` right singular vectors of :math:`G`
    (returned as the power product), :math:`(S_0, \mu_0)` the projection of
    :math:`R_0 = \sqrt{1-\beta}\sigma_1 v_1 v_1^\top`. A block still empty takes the
    fresh direction :math:`S = I/\sqrt n`, :math:`\mu = 1/\sqrt n`. On a basis change
    :math:`(S, \mu)` are re-projected, trace kept. O(nr + r²) numbers on that side.

    Invariants:
        Factors exactly symmetric and PSD with equal Frobenius norms (under ``product_dtype = "bfloat16"`` PSD up
        to the products' rounding); ``initialization = "kron"``
        equals the EMA after one gradient; ``G = 0`` gives :math:`\beta\,L\otimes R`
        (``tests/unit/test_projector_splitting.py``).
    """

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities(
        provides_factors=True, follows_basis=True, supports_restricted=True, waits_for_nonzero=True
    )
    beta: float | str = attrs.field(default=0.95, converter=to_beta, validator=unless_tie(gt(0.0), lt(1.0)))
    variant: Literal["ksl", "parallel"] = attrs.field(default="ksl", converter=to_str, validator=in_(VARIANTS))
    initialization: Literal["kron", "kron_reference", "eps", "sum"] = attrs.field(
        default="kron", converter=to_str, validator=_init_choice, alias="init"
    )
    init_solver: Literal["svd", "power"] = attrs.field(default="svd", converter=to_str, validator=in_(INIT_SOLVERS))
    power_iters: int = attrs.field(default=100, converter=to_int, validator=ge(1))
    one_sided: Literal["ema", "sum"] = attrs.field(default="ema", converter=to_str, validator=in_(ONE_SIDED))
    product_dtype: str = product_dtype_field()

    # -- slot API ----------------------------------------------------------------------------
    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> ProjectorSplittingState:
        b, m, n = layout.batch, layout.m, layout.n
        if "restricted" in (layout.left, layout.right):
            return self._init_restricted(layout, dtype, device)
        full_L, full_R = layout.left == "full", layout.right == "full"
        L = R = None
        if full_L:
            L = self._one_sided_start(b, m, dtype, device) if not full_R else torch.zeros(b, m, m, dtype=dtype, device=device)
        if full_R:
            R = self._one_sided_start(b, n, dtype, device) if not full_L else torch.zeros(b, n, n, dtype=dtype, device=device)
        initialised = torch.full((b,), not (full_L and full_R), dtype=torch.bool, device=device)
        return ProjectorSplittingState(L=L, R=R, initialised=initialised, calls=0)

    def update(self, state: ProjectorSplittingState, G: Tensor, ctx: StepContext) -> ProjectorSplittingState:
        if state.sub_R is not None:
            L, sub, mu, power, ini = self._restricted(
                state.L, state.sub_R, state.mu_R, state.power_R, ctx.basis.Q_R, state.initialised, G,  # type: ignore[arg-type]
                first=state.calls == 0, power_follows=ctx.refresh_follows,
            )
            return attrs.evolve(state, L=L, sub_R=sub, mu_R=mu, power_R=power, initialised=ini, calls=state.calls + 1)
        if state.sub_L is not None:
            R, sub, mu, power, ini = self._restricted(
                state.R, state.sub_L, state.mu_L, state.power_L, ctx.basis.Q_L, state.initialised, G.mT,  # type: ignore[arg-type]
                first=state.calls == 0, power_follows=ctx.refresh_follows,
            )
            return attrs.evolve(state, R=R, sub_L=sub, mu_L=mu, power_L=power, initialised=ini, calls=state.calls + 1)
        L, R = state.L, state.R
        if L is not None and R is not None:
            L, R, initialised = self._two_sided(L, R, state.initialised, G, first=state.calls == 0, defer=ctx.defer)
            return ProjectorSplittingState(L=L, R=R, initialised=initialised, calls=state.calls + 1)
        if L is not None:
            L = self._one_sided(L, G)
        if R is not None:
            R = self._one_sided(R, G.mT)
        return ProjectorSplittingState(L=L, R=R, initialised=state.initialised, calls=state.calls + 1)

    def update_each(
        self, states: Sequence[ProjectorSplittingState], G: Sequence[Tensor], ctxs: Sequence[StepContext]
    ) -> list[ProjectorSplittingState]:
        """:meth:`update` of several buckets' factors, the same bits: the KSL steps of the buckets past their first
        call with both sides full and every block started (read on the host for them all at once, on a CPU) made
        together (:func:`kronopt.linalg.projector_split_ksl_each`: a call of many small buckets pays for its calls,
        not its arithmetic); every other bucket by :meth:`update`."""
        out: list[ProjectorSplittingState | None] = [None] * len(states)
        work = [
            i for i, state in enumerate(states)
            if self.variant == "ksl" and state.calls > 0 and state.L is not None and state.R is not None
            and state.sub_L is None and state.sub_R is None and linalg.host_verdicts(state.initialised)
        ]
        if len(work) > 1:
            flags = torch.cat([states[i].initialised for i in work]).tolist()  # one read on the host for them all
            started, start = [], 0
            for i in work:
                count = states[i].initialised.shape[0]
                if all(flags[start : start + count]):
                    started.append(i)
                start += count
            made = linalg.projector_split_ksl_each(
                [states[i].L for i in started], [states[i].R for i in started], [G[i] for i in started],  # type: ignore[misc]
                float(self.beta), [ctxs[i].defer for i in started], dtype=narrow_dtype(self.product_dtype),
            )
            for i, (L, R) in zip(started, made):
                state = states[i]
                out[i] = ProjectorSplittingState(L=L, R=R, initialised=state.initialised, calls=state.calls + 1)
        return [self.update(state, g, ctx) if new is None else new for state, g, ctx, new in zip(states, G, ctxs, out)]

    def factors(self, state: ProjectorSplittingState) -> tuple[Tensor | None, Tensor | None]:
        """``(L, R)``; on a restricted side the power product ``(b d r)`` instead of a factor."""
        return factors_or_power(state)

    def flat_eigvals(self, state: ProjectorSplittingState) -> tuple[Tensor | None, Tensor | None]:
        r"""The flat eigenvalue :math:`\mu` ``(b)`` of each restricted side (``None`` elsewhere)."""
        return flat_eigvals(state)

    def on_basis_change(self, state: ProjectorSplittingState, change: BasisChange) -> ProjectorSplittingState:
        """Full sides: nothing. Restricted sides: re-project ``(S, μ)`` onto the new subspace (trace kept);
        before the first refresh the state is already in the first call's subspace and kept."""
        return follow_subspace(state, change)

    def starts_on_nonzero(self, layout: Layout) -> bool:
        """Whether a block of ``layout`` waits for its first nonzero gradient (dykaf.md §5): with a start made
        from the gradient (``kron``, ``kron_reference``, ``sum``) on a block whose two sides both hold a factor
        (full, or full and restricted), a first call on an exactly zero gradient would start nothing. The
        optimizer then leaves such a block out of its bucket's first call, as if it had no gradient (no
        state, no update, no step count), and gives it its first call with its first nonzero gradient."""
        if self.initialization == "eps":
            return False
        return "restricted" in (layout.left, layout.right) or layout.left == layout.right == "full"

    # -- restricted side (kept on the right; a left one runs on Gᵀ) ------------------------------
    def _init_restricted(self, layout: Layout, dtype: torch.dtype, device: torch.device) -> ProjectorSplittingState:
        full, restricted = (layout.left, layout.right) if layout.right == "restricted" else (layout.right, layout.left)
        if full != "full" or self.variant != "ksl" or self.initialization != "kron":
            raise ValueError(
                "factors 'projector_splitting' keeps a restricted side only with variant = 'ksl', init = 'kron' and "
                f"the other side full (got variant {self.variant!r}, init {self.initialization!r}, sides "
                f"{layout.left!r}/{layout.right!r})"
            )
        b = layout.batch
        kw = {"dtype": dtype, "device": device}
        out: dict[str, Tensor | None] = {}
        for side, kind, d, r in (("L", layout.left, layout.m, layout.rank_left), ("R", layout.right, layout.n, layout.rank_right)):
            is_r = kind == "restricted"
            out[side] = None if is_r else torch.zeros(b, d, d, **kw)
            out["sub_" + side] = torch.zeros(b, r, r, **kw) if is_r else None
            out["mu_" + side] = torch.zeros(b, **kw) if is_r else None
            out["power_" + side] = torch.zeros(b, d, r, **kw) if is_r else None
        return ProjectorSplittingState(initialised=torch.zeros(b, dtype=torch.bool, device=device), calls=0, **out)  # type: ignore[arg-type]

    def _restricted(
        self, L: Tensor, sub: Tensor, mu: Tensor, power: Tensor, U: Tensor, initialised: Tensor, G: Tensor, *,
        first: bool, power_follows: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One call with the full side ``L (b m m)`` and the restricted right side ``(S, μ, P)`` of ``G (b m n)``;
        ``P`` only where ``power_follows`` (a refresh reads it next), else the old one is kept."""
        beta = float(self.beta)
        b, m, n = G.shape
        r = sub.shape[-1]
        k = max(n - r, 1)
        norm_G = linalg.block_norm(G)
        nonzero = linalg.nonzero_blocks(G)
        if first:
            top = linalg.top_singular_triplet(G) if self.init_solver == "svd" else linalg.top_singular_triplet_power(G, self.power_iters)
            scale = ((1.0 - beta) ** 0.5 * top.sigma).view(b, 1, 1)
            L0 = linalg.sym(scale * (top.u.unsqueeze(-1) * top.u.unsqueeze(-2)))
            U0 = linalg.top_right_singular(G, r)
            w = linalg.matvec(U0.mT, top.v).unsqueeze(-1)  # (b r 1), the same bits in a stack as alone
            S0 = linalg.sym(scale * (w @ w.mT))
            # 1 − ‖w‖² (w the unit v's coordinates in U₀) is the start's energy outside the subspace: 0 but for
            # rounding where v lies in U₀, as the SVD start's top vector does. Counted as 0 below its rounding, as
            # EmaKronFactors counts its complement energy: μ of rounding would be whitened by μ^{-1/2} (1e7 × a step)
            outside = 1.0 - w.square().sum((-2, -1))
            outside = torch.where(outside > linalg.rounding_floor(n, G.dtype), outside, 0.0)
            mu0 = scale.view(b) * outside / k
            starting = ~initialised & nonzero
            return (
                linalg.select_blocks(starting, L0, L), linalg.select_blocks(starting, S0, sub),
                torch.where(starting, mu0, mu), linalg.select_blocks(starting, U0, power), initialised | starting,
            )
        tiny = linalg._tiny(L)
        # homogeneous (L, S, μ, G times λ: every result times λ): run on them times the power of two
        # σ that brings the larger of ‖R‖ and ‖G‖ near 1, and scale back (linalg.power_of_two_scale);
        # a state whose ‖R‖ lies below linalg.empty_state_norm takes the fresh direction, as in
        # linalg.projector_split_ksl
        def restricted_norm(S: Tensor, m: Tensor) -> Tensor:
            return (S.square().sum((-2, -1)) + (n - r) * m.square()).sqrt().view(b, 1, 1)

        def wide() -> Tensor:  # of (S, μ) brought near 1 first, then scaled back (as linalg.block_norm_wide's)
            # (a side of rank 0, a side of 1 to 3 under the preset's fraction 1/4, has no S: μ alone)
            top = mu.abs() if r == 0 else torch.maximum(sub.abs().amax((-2, -1)), mu.abs())
            scale = linalg.near_one_scale(top.view(b, 1, 1))
            return restricted_norm(sub * scale, mu * scale.view(b)) / scale

        # a tiny state's direction counts: its norm keeps its digits
        norm_R = linalg.wide_norm_where(restricted_norm(sub, mu), r * r + n - r, wide)
        fresh = ~initialised | (norm_R.view(-1) < linalg.empty_state_norm(sub.dtype))
        sigma = linalg.power_of_two_scale(norm_R, norm_G)
        s = sigma.view(b)
        L = linalg.select_blocks(fresh, torch.zeros_like(L), L * (beta**0.5 * sigma))
        eye = torch.eye(r, dtype=sub.dtype, device=sub.device).expand_as(sub)
        sub = linalg.select_blocks(fresh, eye / n**0.5, sub * (beta**0.5 * sigma))
        mu = torch.where(fresh, torch.full_like(mu, n**-0.5), mu * (beta**0.5 * s))
        Gs = G * ((1.0 - beta) ** 0.5 * sigma)
        norm_R = restricted_norm(sub, mu)
        Y = Gs @ U  # (b m r)
        GGt = Gs @ Gs.mT
        mu_ = mu.view(b, 1, 1)
        GRG = (Y @ sub @ Y.mT + mu_ * (GGt - Y @ Y.mT)) / norm_R.clamp(min=tiny)  # G R̄ Gᵀ
        K = linalg.sym(norm_R * L + GRG)
        UL = K / linalg.block_norm(K).clamp(min=tiny)
        c = (UL * L).sum((-2, -1), keepdim=True)  # S̃ / ‖R‖: R̂ = c R + Gᵀ U_L G
        Z = UL @ Y  # (b m r)
        YZ = linalg.sym(Y.mT @ Z)
        sub_hat = linalg.sym(c * sub + YZ)
        trace_full = (UL * GGt).sum((-2, -1))
        trace_sub = torch.diagonal(YZ, dim1=-2, dim2=-1).sum(-1)
        # the complement's share of ⟨U_L, G Gᵀ⟩, a difference: 0 below its rounding (as the start's, above)
        energy = trace_full - trace_sub
        energy = torch.where(energy > linalg.rounding_floor(n, G.dtype) * trace_full.abs(), energy, 0.0)
        mu_hat = (c.view(b) * mu + energy / k).clamp(min=0.0)
        root = (sub_hat.square().sum((-2, -1)) + (n - r) * mu_hat.square()).sqrt().sqrt().view(b, 1, 1)
        inv = 1.0 / root.clamp(min=tiny) / sigma
        power_hat = (c * (U @ sub) + Gs.mT @ Z) * inv if power_follows else power
        return UL * (root / sigma), sub_hat * inv, mu_hat * inv.view(b), power_hat, initialised | nonzero

    # -- pieces --------------------------------------------------------------------------------
    def _one_sided_start(self, b: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.one_sided == "ema":
            return torch.zeros(b, d, d, dtype=dtype, device=device)
        eye = torch.eye(d, dtype=dtype, device=device)
        return (1e-3 * eye / d**0.5).expand(b, d, d).clone()

    def _one_sided(self, X: Tensor, G: Tensor) -> Tensor:
        """``X ← βX + (1−β) G Gᵀ`` (``ema``) or ``X ← X + G Gᵀ`` (``sum``); ``G`` is ``b d k``."""
        narrow = narrow_dtype(self.product_dtype)
        if self.one_sided == "ema":
            return linalg.ema_gram_left(X, G, self.beta, dtype=narrow)
        if narrow is not None:
            return linalg.accumulate_gram_left(X, G, 1.0, 1.0, dtype=narrow)
        return linalg.sym(X + linalg.gram_left(G))

    def _integrate(
        self, L: Tensor, R: Tensor, G: Tensor, fresh: Tensor | None = None, defer: list[linalg.DeferredWrite] | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.variant == "ksl":
            return linalg.projector_split_ksl(
                L, R, G, self.beta, fresh=fresh, defer=defer, dtype=narrow_dtype(self.product_dtype)
            )
        return linalg.projector_split_parallel(L, R, G, self.beta, fresh=fresh, dtype=narrow_dtype(self.product_dtype))

    def _start(self, G: Tensor) -> tuple[Tensor, Tensor]:
        """The initial factors of every block from its first gradient ``G``."""
        b, m, n = G.shape
        if self.initialization == "eps":
            L0 = (1e-3 / m**0.5) * torch.eye(m, dtype=G.dtype, device=G.device).expand(b, m, m)
            R0 = (1e-3 / n**0.5) * torch.eye(n, dtype=G.dtype, device=G.device).expand(b, n, n)
            return L0, R0
        if self.initialization == "sum":
            return linalg.gram_left(G), linalg.gram_right(G)
        if self.init_solver == "svd":
            top = linalg.top_singular_triplet(G)
        else:
            top = linalg.top_singular_triplet_power(G, self.power_iters)
        scale = (1.0 - self.beta) ** 0.5 * top.sigma if self.initialization == "kron" else top.sigma.sqrt()
        scale = scale.view(b, 1, 1)
        L0 = linalg.sym(scale * (top.u.unsqueeze(-1) * top.u.unsqueeze(-2)))
        R0 = linalg.sym(scale * (top.v.unsqueeze(-1) * top.v.unsqueeze(-2)))
        return L0, R0

    def _two_sided(
        self, L: Tensor, R: Tensor, initialised: Tensor, G: Tensor, *, first: bool,
        defer: list[linalg.DeferredWrite] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``defer``: the step with every block started may leave its results to the state write
        (:func:`kronopt.linalg.projector_split_ksl`)."""
        if not first:
            # Blocks still empty (every earlier gradient zero, or a first call the optimizer's
            # non-finite guard discarded) start here at no extra cost: the integrator from L = 0
            # with the identity direction. Zero gradients keep them empty. On a CPU with every
            # block started (read on the host for free) there is nothing to start or to test.
            if linalg.cpu_all(initialised):
                L, R = self._integrate(L, R, G, defer=defer)
                return L, R, initialised
            nonzero = linalg.nonzero_blocks(G)
            L, R = self._integrate(L, R, G, fresh=~initialised)
            return L, R, initialised | nonzero
        nonzero = linalg.nonzero_blocks(G)
        starting = ~initialised if self.initialization == "eps" else ~initialised & nonzero
        L0, R0 = self._start(G)
        L = linalg.select_blocks(starting, L0, L)
        R = linalg.select_blocks(starting, R0, R)
        L_new, R_new = self._integrate(L, R, G)
        # kron represents G₁'s EMA term already: feed only blocks that were initialised before
        feed = initialised if self.initialization == "kron" else initialised | starting
        L = linalg.select_blocks(feed, L_new, L)
        R = linalg.select_blocks(feed, R_new, R)
        return L, R, initialised | starting
