"""Inner rule ``adam``: Adam in the rotated basis (SOAP; AdamW with the identity basis)."""

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from .._validators import each, ge, in_, lt, float_tuple, to_bool, to_float, to_str
from ..registry import INNER_RULES
from ..types import BasisChange, Layout, StepContext
from ._common import _zeros

@attrs.frozen(eq=False)
class AdamState:
    """First moment ``exp_avg`` and second moment ``exp_avg_sq``, both ``b m n``, in the basis."""

    exp_avg: Tensor
    exp_avg_sq: Tensor


@INNER_RULES.register("adam", description="Adam in the rotated basis (SOAP; AdamW with the identity basis)")
@attrs.frozen(kw_only=True)
class AdamInner:
    r"""Adam on :math:`G' = Q_L^\top G Q_R`, mapped back with :math:`Q_L \cdot Q_R^\top`.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) G',\quad
        v \leftarrow \beta_2 v + (1-\beta_2) G'^{\odot 2},\quad
        D = c_t\, Q_L \frac{m}{\sqrt{v} + \epsilon} Q_R^\top .

    With ``eps_placement = "before_correction"`` (SOAP) :math:`\epsilon` is added to
    the raw :math:`\sqrt v` and :math:`c_t = \sqrt{1-\beta_2^t}/(1-\beta_1^t)`; with
    ``"after_correction"`` (torch.optim.Adam) :math:`D = \hat m / (\sqrt{\hat v} + \epsilon)`.
    Both moments live in the basis: on a refresh ``m`` is rotated to the new basis
    and ``v`` is only permuted with the columns (SOAP's approximation).

    Attributes:
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon \ge 0`.
        eps_placement: ``"after_correction"`` or ``"before_correction"``.
        bias_correction: divide by :math:`1-\beta^t` (SOAP's ``correct_bias``).
        normalize: divide the (uncorrected) direction by its RMS per block
            (SOAP's ``normalize_grads``).
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

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> AdamState:
        return AdamState(_zeros(layout, dtype, device), _zeros(layout, dtype, device))

    def direction(self, state: AdamState, G: Tensor, ctx: StepContext) -> tuple[Tensor, AdamState]:
        beta1, beta2 = self.betas
        basis = ctx.basis
        G_rot = linalg.rotate(G, basis.Q_L, basis.Q_R)
        m = torch.lerp(state.exp_avg, G_rot, 1 - beta1)
        v = state.exp_avg_sq.mul(beta2).addcmul_(G_rot, G_rot, value=1 - beta2)
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
        return D, AdamState(m, v)

    def moment(self, state: AdamState, ctx: StepContext) -> Tensor:
        """The first moment in the original coordinates."""
        return linalg.unrotate(state.exp_avg, ctx.basis.Q_L, ctx.basis.Q_R)

    def on_basis_change(self, state: AdamState, change: BasisChange) -> AdamState:
        old, new = change.old, change.new
        m = linalg.change_basis(state.exp_avg, (old.Q_L, old.Q_R), (new.Q_L, new.Q_R))
        v = state.exp_avg_sq
        if change.perm_L is not None:
            v = linalg.permute_along(v, change.perm_L, 1)
        if change.perm_R is not None:
            v = linalg.permute_along(v, change.perm_R, 2)
        return AdamState(m, v)
