"""Inner rule ``adam_rank1``: Adam in the rotated basis with a rank-one second moment (DyKAF §7)."""

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..registry import INNER_RULES
from ..types import BasisChange, InnerCapabilities, Layout, StepContext
from ._common import AdamConventions, _zeros

#: the start of both rank-one factors (spec §7): V₀ = 1e-16 · 𝟙𝟙ᵀ
RANK1_START = 1e-8


@attrs.frozen(eq=False)
class AdamRank1State:
    """First moment ``exp_avg (b m n)`` in the basis; second moment ``l (b m) rᵀ (b n)``, nonnegative."""

    exp_avg: Tensor
    l: Tensor
    r: Tensor


@INNER_RULES.register(
    "adam_rank1", description="Adam in the rotated basis with a nonnegative rank-1 second moment l rᵀ (DyKAF)"
)
@attrs.frozen(kw_only=True)
class AdamRank1Inner(AdamConventions):
    r"""Adam on :math:`G' = Q_L^\top G Q_R` whose second moment is kept as :math:`V \approx l r^\top`.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) G',\quad
        (l, r) \leftarrow \mathrm{rank1}(l, r;\ \beta_2 V + (1-\beta_2) G'^{\odot 2}),\quad
        D = c_t\, Q_L \frac{m}{\sqrt{l r^\top} + \epsilon} Q_R^\top,

    with the parallel rank-one integrator :func:`kronopt.linalg.rank1_ema_parallel`
    (start :math:`l = 10^{-8}\mathbb 1_m`, :math:`r = 10^{-8}\mathbb 1_n`). Conventions
    as :class:`~kronopt.inner_rules.AdamInner` (``eps_placement``, ``bias_correction``,
    ``normalize``). On a refresh ``m`` is rotated to the new basis and ``l`` / ``r`` are
    permuted with the basis columns (``BasisChange.perm_L`` / ``perm_R``). Memory
    :math:`mn + m + n` instead of :math:`2mn`.

    Attributes:
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon \ge 0`, always in the denominator.
        eps_placement: ``"after_correction"`` or ``"before_correction"`` (SOAP).
        bias_correction: divide by :math:`1-\beta^t`.
        normalize: divide the direction by its RMS per block.

    Invariants:
        ``l, r ≥ 0``; permuting the basis columns permutes ``l``, ``r`` alike
        (``tests/unit/test_adam_rank1.py``).
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(exposes_moment=True, has_second_moment=True)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> AdamRank1State:
        b, m, n = layout.batch, layout.m, layout.n
        return AdamRank1State(
            exp_avg=_zeros(layout, dtype, device),
            l=torch.full((b, m), RANK1_START, dtype=dtype, device=device),
            r=torch.full((b, n), RANK1_START, dtype=dtype, device=device),
        )

    def direction(self, state: AdamRank1State, G: Tensor, ctx: StepContext) -> tuple[Tensor, AdamRank1State]:
        beta1, beta2 = self.betas
        G_rot = ctx.rotated(G).H  # Q_Lᵀ G Q_R, shared with a factor estimator that rotates G too
        m = torch.lerp(state.exp_avg, G_rot, 1 - beta1)
        l, r = linalg.rank1_ema_parallel(state.l, state.r, G_rot * G_rot, beta2)
        v = l.unsqueeze(-1) * r.unsqueeze(-2)
        D = self.adam_direction(m, v, ctx)
        return D, AdamRank1State(m, l, r)

    def second_moment(self, state: AdamRank1State) -> Tensor:
        """The (uncorrected) second moment :math:`l r^\\top` in the basis, ``b m n``."""
        return state.l.unsqueeze(-1) * state.r.unsqueeze(-2)

    def on_basis_change(self, state: AdamRank1State, change: BasisChange) -> AdamRank1State:
        old, new = change.old, change.new
        m = linalg.change_basis(state.exp_avg, (old.Q_L, old.Q_R), (new.Q_L, new.Q_R))
        l, r = state.l, state.r
        if change.perm_L is not None:
            l = torch.gather(l, -1, change.perm_L)
        if change.perm_R is not None:
            r = torch.gather(r, -1, change.perm_R)
        return AdamRank1State(m, l, r)
