r"""Inner rules: the ``inner`` slot.

An inner rule turns the gradient ``G (b m n)`` into a direction ``D (b m n)`` in
the original coordinates; the step is ``W ← W − lr·D`` (see :mod:`kronopt.post`
for weight decay). It sees the current basis in ``ctx.basis`` and decides what
it keeps in that basis; a rule that keeps rotated state follows each refresh in
:meth:`on_basis_change`.
"""

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from . import linalg
from ._validators import each, ge, gt, in_, le, lt, float_tuple, to_bool, to_float, to_int, to_str, triples
from .registry import INNER_RULES
from .types import BasisChange, Layout, NoState, StepContext

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _zeros(layout: Layout, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device)


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

    def on_basis_change(self, state: AdamState, change: BasisChange) -> AdamState:
        old, new = change.old, change.new
        m = linalg.change_basis(state.exp_avg, (old.Q_L, old.Q_R), (new.Q_L, new.Q_R))
        v = state.exp_avg_sq
        if change.perm_L is not None:
            v = linalg.permute_along(v, change.perm_L, 1)
        if change.perm_R is not None:
            v = linalg.permute_along(v, change.perm_R, 2)
        return AdamState(m, v)


@attrs.frozen(eq=False)
class MomentumState:
    """One momentum buffer ``b m n`` in the original coordinates."""

    momentum_buffer: Tensor


@INNER_RULES.register("eigenvalue", description="Shampoo scaling by eigenvalue powers of each factor")
@attrs.frozen(kw_only=True)
class EigenvalueInner:
    r"""Shampoo-style preconditioning with the basis's eigenvalue estimates.

    .. math::
        m \leftarrow \beta m + (1-\beta) G,\qquad
        D = Q_L\, \big(s_L s_R^\top \odot Q_L^\top \hat m Q_R\big)\, Q_R^\top,\qquad
        s = (\lambda_+ + \epsilon)^{p}\ \text{(inside)}\ \text{or}\ (\lambda_+^{-p'} + \epsilon)^{-1}\ \text{(outside)}

    with :math:`\lambda_+ = \max(\lambda, 0)`, :math:`p` = ``exponent`` (−1/4 for
    Shampoo, −1/2 for Shampoo^{1/2}) and :math:`\hat m = m/(1-\beta^t)`. ``"inside"``
    is Distributed Shampoo's ε placement; ``"outside"`` adds ε to
    :math:`\lambda^{-p}` (the root) instead. A side that is not rotated scales by 1.
    The momentum lives in the original coordinates, so a refresh needs no
    rotation. Before the first refresh the scaling is 1 (the direction is the
    momentum; Shampoo's grafting replaces it, see :mod:`kronopt.post`).

    Attributes:
        momentum: :math:`\beta \in [0, 1)` (EMA form).
        exponent: :math:`p < 0`.
        eps: :math:`\epsilon \ge 0`.
        eps_placement: ``"inside"`` or ``"outside"`` the root.
        bias_correction: divide the momentum by :math:`1-\beta^t`.
    """

    needs_eigvals: ClassVar[bool] = True
    momentum: float = attrs.field(default=0.9, converter=to_float, validator=[ge(0.0), lt(1.0)])
    exponent: float = attrs.field(default=-0.25, converter=to_float, validator=[lt(0.0), ge(-1.0)])
    eps: float = attrs.field(default=1e-12, converter=to_float, validator=ge(0.0))
    eps_placement: Literal["inside", "outside"] = attrs.field(
        default="inside", converter=to_str, validator=in_(("inside", "outside"))
    )
    bias_correction: bool = attrs.field(default=True, converter=to_bool)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> MomentumState:
        return MomentumState(_zeros(layout, dtype, device))

    def _scale(self, lam: Tensor) -> Tensor:
        lam = lam.clamp(min=0.0)
        if self.eps_placement == "inside":
            return (lam + self.eps) ** self.exponent
        return 1.0 / (lam ** (-self.exponent) + self.eps)

    def direction(self, state: MomentumState, G: Tensor, ctx: StepContext) -> tuple[Tensor, MomentumState]:
        beta = self.momentum
        m = state.momentum_buffer.lerp(G, 1 - beta)
        m_hat = m / (1 - beta**ctx.step) if self.bias_correction else m
        basis = ctx.basis
        if not basis.ready:
            return m_hat, MomentumState(m)
        P = linalg.rotate(m_hat, basis.Q_L, basis.Q_R)
        if basis.lam_L is not None:
            P = P * self._scale(basis.lam_L).unsqueeze(-1)
        if basis.lam_R is not None:
            P = P * self._scale(basis.lam_R).unsqueeze(-2)
        return linalg.unrotate(P, basis.Q_L, basis.Q_R), MomentumState(m)

    def on_basis_change(self, state: MomentumState, change: BasisChange) -> MomentumState:
        return state


@INNER_RULES.register("orthogonalize", description="Newton–Schulz polar factor of the momentum (Muon)")
@attrs.frozen(kw_only=True)
class OrthogonalizeInner:
    r"""Muon: orthogonalized momentum.

    .. math::
        B \leftarrow \beta B + (1-\beta) G,\quad
        U = (1-\beta) G + \beta B\ \text{(Nesterov)}\ \text{or}\ B,\quad
        D = s \cdot \mathrm{NS}(Q_L^\top U Q_R)\ \text{mapped back}.

    ``momentum_form = "classic"`` uses :math:`B \leftarrow \beta B + G`,
    :math:`U = G + \beta B`. NS is :func:`kronopt.linalg.newton_schulz` with the
    named coefficient schedule (``"custom"`` reads ``custom_coefficients``); the
    shape factor :math:`s` follows ``scale`` (:func:`kronopt.linalg.muon_scale`)
    times ``extra_scale``. NS is rotation-equivariant, so with a non-identity basis
    the rotation changes the result only through round-off.

    Attributes:
        momentum: :math:`\beta \in [0, 1)`.
        nesterov: use the Nesterov look-ahead.
        momentum_form: ``"ema"`` or ``"classic"``.
        coefficients: ``kj``, ``polar_express``, ``quintic``, ``cans``, ``deepseekv4`` or ``custom``.
        custom_coefficients: ``(a, b, c)`` triples for ``custom``.
        custom_beyond: ``cycle`` or ``repeat_last`` past the custom list.
        steps: Newton–Schulz iterations (1–99).
        eps: norm floor.
        norm: ``clamp`` (torch.optim.Muon) or ``add`` (KellerJordan/Muon).
        ns_dtype: arithmetic dtype of the iteration.
        scale: shape rule, one of :data:`kronopt.linalg.MUON_SCALES`.
        extra_scale: constant factor :math:`> 0`.
    """

    needs_eigvals: ClassVar[bool] = False
    momentum: float = attrs.field(default=0.95, converter=to_float, validator=[ge(0.0), lt(1.0)])
    nesterov: bool = attrs.field(default=True, converter=to_bool)
    momentum_form: Literal["ema", "classic"] = attrs.field(
        default="ema", converter=to_str, validator=in_(("ema", "classic"))
    )
    coefficients: str = attrs.field(
        default="kj", converter=to_str, validator=in_((*linalg.NS_SCHEDULES, "custom"))
    )
    custom_coefficients: tuple[tuple[float, float, float], ...] = attrs.field(default=(), converter=triples)
    custom_beyond: str = attrs.field(
        default="repeat_last", converter=to_str, validator=in_(("cycle", "repeat_last"))
    )
    steps: int = attrs.field(default=5, converter=to_int, validator=[ge(1), le(99)])
    eps: float = attrs.field(default=1e-7, converter=to_float, validator=gt(0.0))
    norm: Literal["clamp", "add"] = attrs.field(default="clamp", converter=to_str, validator=in_(("clamp", "add")))
    ns_dtype: str = attrs.field(default="bfloat16", converter=to_str, validator=in_(tuple(_DTYPES)))
    scale: str = attrs.field(default="original", converter=to_str, validator=in_(linalg.MUON_SCALES))
    extra_scale: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))

    def __attrs_post_init__(self) -> None:
        if self.coefficients == "custom" and not self.custom_coefficients:
            raise ValueError("coefficients = 'custom' needs a non-empty custom_coefficients list")

    def schedule(self) -> list[tuple[float, float, float]]:
        if self.coefficients == "custom":
            return linalg.ns_coefficients(self.custom_coefficients, self.steps, self.custom_beyond)
        tuples, beyond = linalg.NS_SCHEDULES[self.coefficients]
        return linalg.ns_coefficients(tuples, self.steps, beyond)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> MomentumState:
        return MomentumState(_zeros(layout, dtype, device))

    def direction(self, state: MomentumState, G: Tensor, ctx: StepContext) -> tuple[Tensor, MomentumState]:
        beta = self.momentum
        if self.momentum_form == "ema":
            B = state.momentum_buffer.lerp(G, 1 - beta)
            U = G.lerp(B, beta) if self.nesterov else B
        else:
            B = state.momentum_buffer * beta + G
            U = G + beta * B if self.nesterov else B
        basis = ctx.basis
        O = linalg.newton_schulz(
            linalg.rotate(U, basis.Q_L, basis.Q_R),
            self.schedule(),
            eps=self.eps,
            dtype=_DTYPES[self.ns_dtype],
            norm=self.norm,
        ).to(G.dtype)
        s = linalg.muon_scale(ctx.layout.m, ctx.layout.n, self.scale) * self.extra_scale
        return linalg.unrotate(O, basis.Q_L, basis.Q_R) * s, MomentumState(B)

    def on_basis_change(self, state: MomentumState, change: BasisChange) -> MomentumState:
        return state


@INNER_RULES.register("sgd", description="SGD with optional (Nesterov) momentum, as torch.optim.SGD")
@attrs.frozen(kw_only=True)
class SgdInner:
    r"""Heavy-ball momentum: :math:`B \leftarrow \mu B + G`, :math:`D = G + \mu B` (Nesterov) or :math:`B`.

    The direction does not depend on the basis (a rotation and its inverse cancel).

    Attributes:
        momentum: :math:`\mu \in [0, 1)`.
        nesterov: Nesterov look-ahead (needs ``momentum > 0``).
    """

    needs_eigvals: ClassVar[bool] = False
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

    def on_basis_change(self, state: MomentumState | NoState, change: BasisChange) -> MomentumState | NoState:
        return state
