"""Pieces shared by several inner rules: the momentum record and buffer allocation."""

import attrs
import torch
from torch import Tensor

from ..types import Layout

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _zeros(layout: Layout, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device)


@attrs.frozen(eq=False)
class MomentumState:
    """One momentum buffer ``b m n`` in the original coordinates."""

    momentum_buffer: Tensor
