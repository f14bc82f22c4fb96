"""Inner rule ``adam``: Adam in the rotated basis (SOAP; AdamW with the identity basis)."""

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..registry import INNER_RULES
from ..types import BasisChange, InnerCapabilities, Layout, StepContext
from ._common import AdamConventions, _zeros

@attrs.frozen(eq=False)
class AdamState:
    """First moment ``exp_avg`` and second moment ``exp_avg_sq``, both ``b m n``, in the basis."""

    exp_avg: Tensor
    exp_avg_sq: Tensor


@INNER_RULES.register("adam", description="Adam in the rotated basis (SOAP; AdamW with the identity basis)")
@attrs.frozen(kw_only=True)
class AdamInner(AdamConventions):
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

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(exposes_moment=True, has_second_moment=True)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> AdamState:
        return AdamState(_zeros(layout, dtype, device), _zeros(layout, dtype, device))

    def direction(self, state: AdamState, G: Tensor, ctx: StepContext) -> tuple[Tensor, AdamState]:
        G_rot = linalg.rotate(G, ctx.basis.Q_L, ctx.basis.Q_R)
        m, v = linalg.adam_moments(state.exp_avg, state.exp_avg_sq, G_rot, self.betas)
        D = self.adam_direction(m, v, ctx)
        return D, AdamState(m, v)

    def second_moment(self, state: AdamState) -> Tensor:
        """The (uncorrected) second moment in the basis, ``b m n``."""
        return state.exp_avg_sq

    def on_basis_change(self, state: AdamState, change: BasisChange) -> AdamState:
        old, new = change.old, change.new
        m = linalg.change_basis(state.exp_avg, (old.Q_L, old.Q_R), (new.Q_L, new.Q_R))
        v = state.exp_avg_sq
        if change.perm_L is not None:
            v = linalg.permute_along(v, change.perm_L, 1)
        if change.perm_R is not None:
            v = linalg.permute_along(v, change.perm_R, 2)
        return AdamState(m, v)
