"""Inner rule ``sgd``: heavy-ball (Nesterov) momentum, as torch.optim.SGD."""

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from ..validators import ge, lt, to_bool, to_float
from ..registry import INNER_RULES
from ..types import BasisChange, InnerCapabilities, Layout, NoState, StepContext
from ._common import MomentumState, _zeros

@INNER_RULES.register("sgd", description="SGD with optional (Nesterov) momentum, torch.optim.SGD's (decay decoupled)")
@attrs.frozen(kw_only=True)
class SgdInner:
    r"""Heavy-ball momentum: :math:`B \leftarrow \mu B + G`, :math:`D = G + \mu B` (Nesterov) or :math:`B`.

    The direction does not depend on the basis (a rotation and its inverse cancel). It is
    torch.optim.SGD's without ``dampening``; weight decay is the pipeline's, decoupled
    (``[post]``), where torch.optim.SGD adds ``λ W`` to the gradient before the momentum:
    with both momentum and weight decay the two differ.

    Attributes:
        momentum: :math:`\mu \in [0, 1)`.
        nesterov: Nesterov look-ahead (needs ``momentum > 0``).
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(elementwise=True)
    momentum: float = attrs.field(default=0.0, converter=to_float, validator=[ge(0.0), lt(1.0)])
    nesterov: bool = attrs.field(default=False, converter=to_bool)

    def __attrs_post_init__(self) -> None:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0")

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> MomentumState | NoState:
        return MomentumState(_zeros(layout, dtype, device)) if self.momentum > 0 else NoState()

    def direction(
        self, state: MomentumState | NoState, G: Tensor, ctx: StepContext
    ) -> tuple[Tensor, MomentumState | NoState]:
        if isinstance(state, NoState):
            return G, state
        B = state.momentum_buffer * self.momentum + G
        return (G + self.momentum * B if self.nesterov else B), MomentumState(B)

    def is_elementwise(self) -> bool:
        """Always: the momentum and the direction are entrywise."""
        return True

    def on_basis_change(self, state: MomentumState | NoState, change: BasisChange) -> MomentumState | NoState:
        return state
