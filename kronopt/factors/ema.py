"""The ``ema`` and ``none`` factor estimators."""

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import ge, lt, to_beta, unless_tie
from ..registry import FACTORS
from ._products import narrow_dtype, product_dtype_field
from ._restricted import factors_or_power, flat_eigvals, follow_subspace
from ..types import BasisChange, FactorCapabilities, Layout, NoState, StepContext


@attrs.frozen(eq=False)
class KronFactorsState:
    r"""``L (b m m)`` and ``R (b n n)``; ``None`` on a side that is not rotated or is restricted.

    A restricted side of rank ``r`` (left shown) keeps instead ``sub_L (b r r)`` the factor in the
    subspace coordinates :math:`U^\top \hat L U`, ``mu_L (b)`` the flat eigenvalue of the
    complement and ``power_L (b m r)`` the power product :math:`\hat L_{new} U` for the basis stage
    (computed on the updates a refresh follows, ``StepContext.refresh_follows``; kept as it was on the others).
    """

    L: Tensor | None
    R: Tensor | None
    sub_L: Tensor | None = None
    sub_R: Tensor | None = None
    mu_L: Tensor | None = None
    mu_R: Tensor | None = None
    power_L: Tensor | None = None
    power_R: Tensor | None = None


@FACTORS.register(
    "ema",
    description="exponential moving average of G Gᵀ and Gᵀ G (Shampoo, SOAP); a restricted side keeps the EMA's "
    "projection onto rank r + one flat eigenvalue (reads ctx.step, ctx.basis)",
)
@attrs.frozen(kw_only=True)
class EmaKronFactors:
    r"""EMA factors, started from zero.

    .. math::
        L \leftarrow \beta L + (1-\beta)\, G G^\top, \qquad
        R \leftarrow \beta R + (1-\beta)\, G^\top G .

    **Restricted side** (rank ``r``, right shown; ``docs/pro.md``): the side is the
    family :math:`\hat R = U S U^\top + \mu P_\perp` with :math:`U` = ``ctx.basis.Q_R``
    ``(b n r)``, and :math:`(S, \mu)` is the M-projection of the EMA onto it for fixed
    :math:`U` (the subspace block and the mean complement eigenvalue). With :math:`Y = G U`:

    .. math::
        S \leftarrow \beta S + (1-\beta)\, Y^\top Y,\qquad
        \mu \leftarrow \beta \mu + (1-\beta)\, \frac{\|G\|_F^2 - \|Y\|_F^2}{n - r},\qquad
        P = \hat R_{new} U = \beta\, U S_{old} + (1-\beta)\, G^\top Y

    (the statistic :math:`\|G\|_F^2 - \|Y\|_F^2` floored at 0 against rounding).
    :meth:`factors` returns the power product :math:`P` ``(b n r)`` there, which the
    ``qr`` basis turns into the next subspace (Rayleigh–Ritz + one power step), and
    :meth:`flat_eigvals` gives :math:`\mu`. The first call (``ctx.step == 0``) takes
    :math:`U` = the top-``r`` right singular vectors of :math:`G` and applies the rule
    above from zero, so :math:`P = (1-\beta) G^\top G U` spans them and the first
    refresh's Ritz values are the EMA's eigenvalues there. When the basis moves
    :math:`U \to U'`, :math:`(S, \mu)` are re-projected onto the new family, trace
    preserved (:func:`kronopt.linalg.reproject_flat`). The side holds
    :math:`O(n r + r^2)` numbers; no ``n × n`` tensor is formed.

    Attributes:
        beta: retention :math:`\beta \in [0, 1)` (SOAP's ``shampoo_beta``), or ``"beta2"``:
            the inner rule's :math:`\beta_2` (``shampoo_beta = -1``, resolved by
            :meth:`kronopt.config.KronConfig.bound` when the optimizer is built).
        product_dtype: the Gram products' precision on a full side: ``"compute"`` (the default) the
            compute dtype; ``"bfloat16"`` rounds :math:`G` and each product's result to bfloat16, each
            product summed in at least float32, and adds it to :math:`\beta L` in the compute dtype
            (:func:`kronopt.linalg.accumulate_gram_left`, ``dtype=``; docs/configs.md): about twice the
            products' speed where a GPU's tensor cores or a CPU with AMX or ``avx512_bf16`` run them. A
            restricted side's products keep the compute dtype.

    Invariants:
        Exactly symmetric and PSD (under ``product_dtype = "bfloat16"`` PSD up to the increments' rounding:
        the smallest eigenvalue at least −2⁻⁸ of the trace, ``tests/unit/test_invariants_property.py``);
        ``beta = 0`` gives ``G Gᵀ``, ``Gᵀ G`` (``tests/unit/test_factors.py``); :math:`\mu \ge 0`.
    """

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities(
        provides_factors=True, follows_basis=True, supports_restricted=True
    )
    beta: float | str = attrs.field(default=0.95, converter=to_beta, validator=unless_tie(ge(0.0), lt(1.0)))
    product_dtype: str = product_dtype_field()

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> KronFactorsState:
        if layout.left == "restricted" and layout.right == "restricted":
            raise ValueError("factors 'ema' supports at most one restricted side per block")
        b = layout.batch
        kw = {"dtype": dtype, "device": device}
        out: dict[str, Tensor | None] = {}
        for side, kind, d, r in (("L", layout.left, layout.m, layout.rank_left), ("R", layout.right, layout.n, layout.rank_right)):
            restricted = kind == "restricted"
            out[side] = torch.zeros(b, d, d, **kw) if kind == "full" else None
            out["sub_" + side] = torch.zeros(b, r, r, **kw) if restricted else None
            out["mu_" + side] = torch.zeros(b, **kw) if restricted else None
            out["power_" + side] = torch.zeros(b, d, r, **kw) if restricted else None
        return KronFactorsState(**out)

    def update(self, state: KronFactorsState, G: Tensor, ctx: StepContext) -> KronFactorsState:
        beta = self.beta
        assert isinstance(beta, float), "factors.beta is bound to a number (KronConfig.bound)"
        narrow = narrow_dtype(self.product_dtype)
        L = None if state.L is None else linalg.ema_gram_left(state.L, G, beta, defer=ctx.defer, dtype=narrow)
        R = None if state.R is None else linalg.ema_gram_right(state.R, G, beta, defer=ctx.defer, dtype=narrow)
        out = attrs.evolve(state, L=L, R=R)
        first = ctx.step == 0
        follows = first or ctx.refresh_follows
        if state.sub_R is not None:
            sub, mu, P = self._restricted(G, ctx.basis.Q_R, state.sub_R, state.mu_R, first=first, power_follows=follows)  # type: ignore[arg-type]
            out = attrs.evolve(out, sub_R=sub, mu_R=mu, power_R=state.power_R if P is None else P)
        if state.sub_L is not None:
            sub, mu, P = self._restricted(G.mT, ctx.basis.Q_L, state.sub_L, state.mu_L, first=first, power_follows=follows)  # type: ignore[arg-type]
            out = attrs.evolve(out, sub_L=sub, mu_L=mu, power_L=state.power_L if P is None else P)
        return out

    def update_each(
        self, states: Sequence[KronFactorsState], G: Sequence[Tensor], ctxs: Sequence[StepContext]
    ) -> list[KronFactorsState]:
        """:meth:`update` of several buckets' factors, the same bits: their Gram products' small sums made
        together (:func:`kronopt.linalg.accumulate_grams_each`; a call of many small buckets pays for its calls,
        not its arithmetic). A bucket with a restricted side is updated by :meth:`update`."""
        beta = self.beta
        assert isinstance(beta, float), "factors.beta is bound to a number (KronConfig.bound)"
        out: list[Any] = [None] * len(states)
        sides: dict[str, list[tuple[int, Tensor, Tensor, Any]]] = {"L": [], "R": []}
        for i, (state, g, ctx) in enumerate(zip(states, G, ctxs)):
            if state.sub_L is not None or state.sub_R is not None:
                out[i] = self.update(state, g, ctx)
                continue
            if state.L is not None:
                sides["L"].append((i, state.L, g, ctx.defer))
            if state.R is not None:
                sides["R"].append((i, state.R, g.mT, ctx.defer))
        new: dict[tuple[int, str], Tensor] = {}
        narrow = narrow_dtype(self.product_dtype)
        for side, work in sides.items():
            if work:
                made = linalg.accumulate_grams_each(
                    [w[1] for w in work], [w[2] for w in work], beta, 1 - beta, [w[3] for w in work], dtype=narrow
                )
                new.update(((w[0], side), X) for w, X in zip(work, made))
        for i, state in enumerate(states):
            if out[i] is None:
                out[i] = attrs.evolve(state, L=new.get((i, "L"), state.L), R=new.get((i, "R"), state.R))
        return out

    def _restricted(
        self, G: Tensor, U: Tensor, sub: Tensor, mu: Tensor, *, first: bool, power_follows: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The restricted right side of ``G (b m n)``: new ``(S, μ, power product)``; the power product
        only with ``power_follows`` (a refresh follows: nothing else reads it), else ``None``."""
        beta = float(self.beta)
        n, r = G.shape[-1], sub.shape[-1]
        if first:
            U = linalg.top_right_singular(G, r)
        Y = G @ U  # (b m r)
        total = G.square().sum((-2, -1))
        energy = total - Y.square().sum((-2, -1))
        # ‖G‖² − ‖G U‖² cancels: at the size of its rounding it is no complement energy at all, so μ stays exactly 0
        # until the complement has seen some (LowRankFlatSplit leaves the "whitened" complement out at μ = 0; the
        # rounding left in μ would be whitened by μ^{-1/2}, 1e4 .. 1e8 times the step)
        energy = torch.where(energy > linalg.rounding_floor(n, G.dtype) * total, energy, 0.0)
        mu_new = torch.lerp(mu, energy / (n - r), 1 - beta)
        sub_new = linalg.accumulate_gram_right(sub, Y, beta, 1 - beta)
        if not power_follows:
            return sub_new, mu_new, None
        P = torch.baddbmm(G.mT @ Y, U, sub, beta=1 - beta, alpha=beta)  # β U S_old + (1-β) Gᵀ Y
        return sub_new, mu_new, P

    def factors(self, state: KronFactorsState) -> tuple[Tensor | None, Tensor | None]:
        """``(L, R)``; on a restricted side the power product ``(b d r)`` instead of a factor."""
        return factors_or_power(state)

    def flat_eigvals(self, state: KronFactorsState) -> tuple[Tensor | None, Tensor | None]:
        r"""The flat eigenvalue :math:`\mu` ``(b)`` of each restricted side (``None`` elsewhere)."""
        return flat_eigvals(state)

    def on_basis_change(self, state: KronFactorsState, change: BasisChange) -> KronFactorsState:
        """Full sides: nothing (the EMA is basis-free). Restricted sides: re-project ``(S, μ)`` onto the new
        subspace; before the first refresh the state is already in the initial subspace (the first call's) and kept."""
        return follow_subspace(state, change)


@FACTORS.register("none", description="no factors (identity basis rules: Adam, Muon, SGD)")
@attrs.frozen(kw_only=True)
class NoFactors:
    """Keeps nothing; for pipelines whose basis needs no factors."""

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities()

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> NoState:
        return NoState()

    def update(self, state: NoState, G: Tensor, ctx: StepContext) -> NoState:
        return state

    def factors(self, state: NoState) -> tuple[Tensor | None, Tensor | None]:
        return None, None
