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


@attrs.frozen(eq=False)
class AdamSubspaceState:
    """Adam on a block with a restricted side (rank ``r``, right shown): the first moment ``exp_avg (b m n)``
    in the **original** coordinates, the second moment ``exp_avg_sq (b m r)`` in the rotated subspace
    (``b r n`` when the left side is restricted).

    ``exp_avg`` is stored in float32 at least, whatever ``[storage] moments`` says: the rule rotates it into the
    subspace and divides it by ``√v + ε`` there, so the 2⁻⁹ of its size that bfloat16 rounding leaves in directions
    the gradient never had (``v`` ≈ 0) became steps of up to 2⁻⁹ ‖M‖ / ε (pro_soap: 300 × lr on a 40 × 3 block of
    persistent low-rank gradients). ``exp_avg_sq`` follows ``moments``."""

    STORAGE_FLOOR: ClassVar[dict[str, torch.dtype]] = {"exp_avg": torch.float32}

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

    **Restricted side** (rank ``r``, right shown; ``docs/pro.md``): ``ctx.basis.Q_R`` is
    the subspace :math:`U` ``(b n r)``, and Adam runs in the rotated ``m × r`` block:
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) (Q_L^\top G U)^{\odot 2}` ``(b m r)``,
    :math:`D = c_t\, Q_L \frac{Q_L^\top M U}{\sqrt v + \epsilon} U^\top`. The first moment
    :math:`M \leftarrow \beta_1 M + (1-\beta_1) G` is kept in the **original** coordinates
    ``(b m n)`` (as SOAP's first release kept it): the split's complement
    :math:`M - M U U^\top` needs the momentum of the *whole* gradient, including the
    directions the subspace never sees, and one buffer serves both (the subspace
    moment :math:`Q_L^\top M U` is its exact restriction, so a refresh loses nothing,
    where a rotated ``m × r`` moment would drop what leaves the subspace). State
    :math:`mn + mr` numbers, less than a rotated moment plus a separate momentum
    (:math:`mn + 2mr`). On a refresh :math:`M` stays; :math:`v` is permuted with the
    full side's columns and kept as it is on the restricted side (it carries no
    permutation; SOAP's "keep the second moment" approximation, applied to the
    Ritz-ordered columns). :meth:`moment` returns :math:`M`.

    Attributes:
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon \ge 0`.
        eps_placement: ``"after_correction"`` or ``"before_correction"``.
        bias_correction: divide by :math:`1-\beta^t` (SOAP's ``correct_bias``).
        normalize: divide the (uncorrected) direction by its RMS per block
            (SOAP's ``normalize_grads``).
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(
        exposes_moment=True, has_second_moment=True, supports_restricted=True, elementwise=True
    )

    def is_elementwise(self) -> bool:
        """Entry by entry on an unrotated block, unless ``normalize`` divides by the block's RMS."""
        return not self.normalize

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> AdamState | AdamSubspaceState:
        if "restricted" in (layout.left, layout.right):
            m = layout.rank_left if layout.left == "restricted" else layout.m
            n = layout.rank_right if layout.right == "restricted" else layout.n
            v = torch.zeros(layout.batch, m, n, dtype=dtype, device=device)
            return AdamSubspaceState(_zeros(layout, dtype, device), v)
        return AdamState(_zeros(layout, dtype, device), _zeros(layout, dtype, device))

    def direction(self, state: AdamState | AdamSubspaceState, G: Tensor, ctx: StepContext) -> tuple[Tensor, AdamState | AdamSubspaceState]:
        if isinstance(state, AdamSubspaceState):
            M = torch.lerp(state.exp_avg, G, 1 - self.betas[0])
            G_rot = ctx.rotate(G)
            v = state.exp_avg_sq.mul(self.betas[1]).addcmul_(G_rot, G_rot, value=1 - self.betas[1])
            D = self.adam_direction(ctx.rotate(M), v, ctx)
            return D, AdamSubspaceState(M, v)
        G_rot = ctx.rotated(G).H  # Q_Lᵀ G Q_R, shared with a factor estimator that rotates G too (KL)
        m, v = linalg.adam_moments(state.exp_avg, state.exp_avg_sq, G_rot, self.betas)
        D = self.adam_direction(m, v, ctx)
        return D, AdamState(m, v)

    def second_moment(self, state: AdamState | AdamSubspaceState) -> Tensor:
        """The (uncorrected) second moment in the basis, ``b m n`` (``b m r``/``b r n`` with a restricted side)."""
        return state.exp_avg_sq

    def moment(self, state: AdamState | AdamSubspaceState, ctx: StepContext) -> Tensor:
        """The first moment in the original coordinates (kept there with a restricted side)."""
        if isinstance(state, AdamSubspaceState):
            return state.exp_avg
        return super().moment(state, ctx)

    def on_basis_change(self, state: AdamState | AdamSubspaceState, change: BasisChange) -> AdamState | AdamSubspaceState:
        if isinstance(state, AdamSubspaceState):
            v = state.exp_avg_sq
            if change.perm_L is not None and v.shape[-2] == change.perm_L.shape[-1]:
                v = linalg.permute_along(v, change.perm_L, 1)
            if change.perm_R is not None and v.shape[-1] == change.perm_R.shape[-1]:
                v = linalg.permute_along(v, change.perm_R, 2)
            return AdamSubspaceState(state.exp_avg, v)
        old, new = change.old, change.new
        m = linalg.change_basis(state.exp_avg, (old.Q_L, old.Q_R), (new.Q_L, new.Q_R))
        v = state.exp_avg_sq
        if change.perm_L is not None:
            v = linalg.permute_along(v, change.perm_L, 1)
        if change.perm_R is not None:
            v = linalg.permute_along(v, change.perm_R, 2)
        return AdamState(m, v)
