"""Inner rule ``adam_rank1``: Adam in the rotated basis with a rank-one second moment (DyKAF §7)."""

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from .._validators import each, float_tuple, ge, in_, lt, to_bool, to_float, to_str
from ..registry import INNER_RULES
from ..types import BasisChange, Layout, StepContext
from ._common import _zeros

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
class AdamRank1Inner:
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

    needs_eigvals: ClassVar[bool] = False
    betas: tuple[float, float] = attrs.field(
        default=(0.9, 0.999), converter=float_tuple(2), validator=each(ge(0.0), lt(1.0))
    )
    eps: float = attrs.field(default=1e-8, converter=to_float, validator=ge(0.0))
    eps_placement: Literal["after_correction", "before_correction"] = attrs.field(
        default="after_correction", converter=to_str, validator=in_(("after_correction", "before_correction"))
    )
    bias_correction: bool = attrs.field(default=True, converter=to_bool)
    normalize: bool = attrs.field(default=False, converter=to_bool)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> AdamRank1State:
        b, m, n = layout.batch, layout.m, layout.n
        return AdamRank1State(
            exp_avg=_zeros(layout, dtype, device),
            l=torch.full((b, m), RANK1_START, dtype=dtype, device=device),
            r=torch.full((b, n), RANK1_START, dtype=dtype, device=device),
        )

    def direction(self, state: AdamRank1State, G: Tensor, ctx: StepContext) -> tuple[Tensor, AdamRank1State]:
        beta1, beta2 = self.betas
        basis = ctx.basis
        G_rot = linalg.rotate(G, basis.Q_L, basis.Q_R)
        m = torch.lerp(state.exp_avg, G_rot, 1 - beta1)
        l, r = linalg.rank1_ema_parallel(state.l, state.r, G_rot * G_rot, beta2)
        v = l.unsqueeze(-1) * r.unsqueeze(-2)
        t = ctx.step
        c1 = 1 - beta1**t if self.bias_correction else 1.0
        c2 = 1 - beta2**t if self.bias_correction else 1.0
        if self.eps_placement == "before_correction":
            N = m / v.sqrt().add_(self.eps)
            scale = c2**0.5 / c1
        else:
            N = m / v.sqrt().div_(c2**0.5).add_(self.eps)
            scale = 1 / c1
        if self.normalize:
            N = N / (1e-30 + N.square().mean(dim=(-2, -1), keepdim=True).sqrt())
        D = linalg.unrotate(N, basis.Q_L, basis.Q_R).mul_(scale)
        return D, AdamRank1State(m, l, r)

    def moment(self, state: AdamRank1State, ctx: StepContext) -> Tensor:
        """The first moment in the original coordinates."""
        return linalg.unrotate(state.exp_avg, ctx.basis.Q_L, ctx.basis.Q_R)

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
