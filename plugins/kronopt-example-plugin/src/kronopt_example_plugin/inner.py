r"""``sign_momentum``: the sign of an EMA momentum, taken in the rotated basis.

This is signSGD with momentum (Signum; Lion with its two betas set equal). The
momentum buffer :math:`B` lives in the original coordinates; the sign is taken
in the basis the pipeline currently provides (``ctx.basis``)::

    B ← β·B + (1 − β)·G
    D = Q_L · sign(Q_Lᵀ B Q_R) · Q_Rᵀ

With the identity basis every entry of ``D`` is −1, 0 or +1, so the step
``W ← W − lr·D`` moves each weight by exactly ``lr`` (or not at all).

The module only defines the class. kronopt registers it under the entry-point
name when it loads the entry point; decorating it with
``INNER_RULES.register`` here as well would register it twice.
"""

from typing import ClassVar

import attrs
import torch
from torch import Tensor

from kronopt.validators import ge, lt, to_float
from kronopt.types import BasisChange, InnerCapabilities, Layout, StepContext


@attrs.frozen(eq=False)
class SignMomentumState:
    """The momentum buffer ``B`` (``b m n``), in the original coordinates."""

    momentum_buffer: Tensor


@attrs.frozen(kw_only=True)
class SignMomentumInner:
    r"""Sign of the EMA momentum in the rotated basis (signSGD with momentum, Lion-like)

    .. math::
        B \leftarrow \beta B + (1-\beta) G,\qquad
        D = Q_L\,\operatorname{sign}\!\big(Q_L^\top B\, Q_R\big)\,Q_R^\top .

    Rotates through ``ctx.rotate`` and ``ctx.unrotate`` (the basis ``Q_L``, ``Q_R``,
    ``None`` the identity, in the config's ``rotation_dtype``) and reads nothing
    else from the context. The buffer is kept in the original coordinates, so a
    basis refresh leaves the state as it is. The sign commutes with permuting
    and flipping basis columns, so a refresh that only re-sorts the columns does
    not change the next direction.

    Attributes:
        momentum: :math:`\beta \in [0, 1)`; 0 is plain signSGD.
    """

    # what the rule needs and offers beyond the InnerRule protocol: nothing (it reads no
    # eigenvalues, keeps no second moment and does not expose its momentum to a split)
    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
    momentum: float = attrs.field(default=0.9, converter=to_float, validator=[ge(0.0), lt(1.0)])

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> SignMomentumState:
        return SignMomentumState(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

    def direction(self, state: SignMomentumState, G: Tensor, ctx: StepContext) -> tuple[Tensor, SignMomentumState]:
        B = state.momentum_buffer.lerp(G, 1 - self.momentum)
        S = torch.sign(ctx.rotate(B))  # Q_Lᵀ B Q_R
        return ctx.unrotate(S), SignMomentumState(B)

    def on_basis_change(self, state: SignMomentumState, change: BasisChange) -> SignMomentumState:
        return state
