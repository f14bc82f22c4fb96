"""Stand-ins for third-party stage classes, loaded through hand-built entry points in test_registry.

Nothing here registers itself: the registry under test adds these when it loads
an entry point that names them.
"""

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from kronopt.validators import gt, to_float
from kronopt.types import BasisChange, InnerCapabilities, Layout, NoState, StepContext


@attrs.frozen(kw_only=True)
class ScaledGradientInner:
    """Scaled gradient: D = scale · G (a stage that keeps no state).

    Used by the registry tests as a plugin class and as an override.
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
    scale: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> NoState:
        return NoState()

    def direction(self, state: NoState, G: Tensor, ctx: StepContext) -> tuple[Tensor, NoState]:
        return G * self.scale, state

    def on_basis_change(self, state: NoState, change: BasisChange) -> NoState:
        return state


class Undocumented:
    pass
