r"""Splits: the ``split`` slot.

A split says how each rotated side of a block is represented and what happens to
the part of the direction a restricted side does not cover. ``full`` keeps every
rotated side as a full factor and adds nothing.
"""

from collections.abc import Callable

import attrs
import torch
from torch import Tensor

from .registry import SPLITS
from .types import Layout, NoState, SideKind, StepContext


@SPLITS.register("full", description="every rotated side is a full factor; no complement")
@attrs.frozen(kw_only=True)
class FullSplit:
    """Full factors on every side that the shape policy rotates."""

    def sides(self, m: int, n: int, rotated: tuple[bool, bool]) -> tuple[tuple[SideKind, int], tuple[SideKind, int]]:
        return (("full" if rotated[0] else "none", 0), ("full" if rotated[1] else "none", 0))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> NoState:
        return NoState()

    def complement(
        self, state: NoState, G: Tensor, D: Tensor, ctx: StepContext, moment: Callable[[], Tensor]
    ) -> tuple[Tensor, NoState]:
        return D, state
