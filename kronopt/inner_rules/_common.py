"""Pieces shared by several inner rules: the momentum record and buffer allocation."""

from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import each, float_tuple, ge, in_, lt, to_bool, to_float, to_str
from ..types import Layout, StepContext

def _zeros(layout: Layout, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device)


@attrs.frozen(eq=False)
class MomentumState:
    """One momentum buffer ``b m n`` in the original coordinates."""

    momentum_buffer: Tensor


@attrs.frozen(kw_only=True)
class AdamConventions:
    r"""The options and the final arithmetic every Adam-like rule shares.

    Given the first moment ``m`` and the second moment ``v`` in the basis,

    .. math::
        D = c_t\, Q_L \frac{m}{\sqrt{v} + \epsilon} Q_R^\top\ (\text{before\_correction}),\qquad
        D = Q_L \frac{\hat m}{\sqrt{\hat v} + \epsilon} Q_R^\top\ (\text{after\_correction}),

    with :math:`c_t = \sqrt{1-\beta_2^t}/(1-\beta_1^t)` and, with ``normalize``, the
    ratio divided by its RMS per block before the bias-correction scale (SOAP's
    ``normalize_grads``: on full sides the RMS of the direction itself; on a restricted side
    that of its ``m × r`` subspace coordinates, so that with the split's
    ``match_subspace_rms`` complement the whole step has RMS :math:`c_t`).
    """

    betas: tuple[float, float] = attrs.field(
        default=(0.9, 0.999), converter=float_tuple(2), validator=each(ge(0.0), lt(1.0))
    )
    eps: float = attrs.field(default=1e-8, converter=to_float, validator=ge(0.0))
    eps_placement: Literal["after_correction", "before_correction"] = attrs.field(
        default="after_correction", converter=to_str, validator=in_(("after_correction", "before_correction"))
    )
    bias_correction: bool = attrs.field(default=True, converter=to_bool)
    normalize: bool = attrs.field(default=False, converter=to_bool)

    def adam_direction(self, m: Tensor, v: Tensor, ctx: StepContext) -> Tensor:
        """The direction in the original coordinates from the moments in the basis."""
        N, scale = linalg.adam_ratio(
            m, v, step=ctx.step, betas=self.betas, eps=self.eps, eps_placement=self.eps_placement,
            bias_correction=self.bias_correction,
        )
        if self.normalize:  # per coordinate of the basis: on a restricted side the m × r subspace coordinates, so
            N = linalg.normalize_rms(N)  # that with the split's complement (match_subspace_rms) the step has RMS c_t
        return ctx.unrotate(N).mul_(scale)

    def moment(self, state: Any, ctx: StepContext) -> Tensor:
        """The first moment (``state.exp_avg``, kept in the basis) in the original coordinates."""
        return ctx.unrotate(state.exp_avg)
