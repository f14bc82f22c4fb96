"""The ``ema`` and ``none`` factor estimators."""

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import ge, lt, to_beta, unless_tie
from ..registry import FACTORS
from ..types import FactorCapabilities, Layout, NoState, StepContext


@attrs.frozen(eq=False)
class KronFactorsState:
    """``L (b m m)`` and ``R (b n n)``; ``None`` on a side that is not rotated."""

    L: Tensor | None
    R: Tensor | None


@FACTORS.register("ema", description="exponential moving average of G Gᵀ and Gᵀ G (Shampoo, SOAP)")
@attrs.frozen(kw_only=True)
class EmaKronFactors:
    r"""EMA factors, started from zero.

    .. math::
        L \leftarrow \beta L + (1-\beta)\, G G^\top, \qquad
        R \leftarrow \beta R + (1-\beta)\, G^\top G .

    Attributes:
        beta: retention :math:`\beta \in [0, 1)` (SOAP's ``shampoo_beta``), or ``"beta2"``:
            the inner rule's :math:`\beta_2` (``shampoo_beta = -1``, resolved by
            :meth:`kronopt.config.KronConfig.bound` when the optimizer is built).

    Invariants:
        Exactly symmetric and PSD; ``beta = 0`` gives ``G Gᵀ``, ``Gᵀ G``
        (``tests/unit/test_factors.py``).
    """

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities(provides_factors=True)
    beta: float | str = attrs.field(default=0.95, converter=to_beta, validator=unless_tie(ge(0.0), lt(1.0)))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> KronFactorsState:
        b, m, n = layout.batch, layout.m, layout.n
        L = torch.zeros(b, m, m, dtype=dtype, device=device) if layout.left == "full" else None
        R = torch.zeros(b, n, n, dtype=dtype, device=device) if layout.right == "full" else None
        return KronFactorsState(L, R)

    def update(self, state: KronFactorsState, G: Tensor, ctx: StepContext) -> KronFactorsState:
        beta = self.beta
        L = None if state.L is None else linalg.ema_gram_left(state.L, G, beta)
        R = None if state.R is None else linalg.ema_gram_right(state.R, G, beta)
        return KronFactorsState(L, R)

    def factors(self, state: KronFactorsState) -> tuple[Tensor | None, Tensor | None]:
        return state.L, state.R


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
