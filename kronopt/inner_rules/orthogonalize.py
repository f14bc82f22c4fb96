"""Inner rule ``orthogonalize``: Newton–Schulz polar factor of the momentum (Muon)."""

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import auto_or_int_tuple, ge, gt, in_, le, lt, to_bool, to_float, to_int, to_str, triples
from ..registry import INNER_RULES
from ..types import BasisChange, BasisState, InnerCapabilities, Layout, StepContext
from ._common import MomentumState, _zeros

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

    ``scale_shape`` says whose ``(m, n)`` :math:`s` comes from: ``"block"`` (the default), the
    block the rule orthogonalizes, so a conv kernel ``(o, i, kh, kw)`` flattened to ``(o, i·kh·kw)``
    takes that matrix's; ``"last_two_dims"``, the parameter's last two dims, as KellerJordan/Muon
    computes it: ``(kh, kw)`` for a conv kernel (a matrix's are its block's unless ``[shapes]
    merge_dims`` merged them). Under ``"last_two_dims"`` only blocks
    whose parameters agree on those dims are stacked together (:class:`~kronopt.types.ReadsParamShape`).
    The block itself follows ``[shapes]`` either way: a 3-D parameter, whose slices KellerJordan/Muon
    orthogonalizes one by one, is one flattened block here, with only the factor taken from its last dims.

    Attributes:
        momentum: :math:`\beta \in [0, 1)`.
        nesterov: use the Nesterov look-ahead.
        momentum_form: ``"ema"`` or ``"classic"``.
        coefficients: ``kj``, ``polar_express``, ``quintic``, ``cans``, ``deepseekv4`` or ``custom``. ``cans``
            needs ``ns_dtype`` ``float64``: its polynomial has no margin above a singular value of 1 and
            diverges there, where the rounding of a rank-one block's normalised input puts it (in bfloat16
            1e11 × lr on a 7 × 1 block; in float32 25–91 × lr on 1024², 1e8 × lr on 2048²); refused otherwise.
        custom_coefficients: ``(a, b, c)`` triples for ``custom``.
        custom_beyond: ``cycle`` or ``repeat_last`` past the custom list.
        steps: Newton–Schulz iterations (1–99).
        eps: norm floor.
        norm: ``clamp`` (torch.optim.Muon) or ``add`` (KellerJordan/Muon).
        ns_dtype: arithmetic dtype of the iteration.
        ns_form: ``standard``, or ``gram``: the iteration on the Gram matrix where that takes fewer
            multiply-adds (blocks whose long side exceeds 1.5 times the short one, at 5 iterations and their one
            restart); the same polynomial, other roundings (:func:`kronopt.linalg.newton_schulz`).
        ns_restarts: ``"auto"`` (no more than 3 iterations without a restart, the fewest restarts; 5
            iterations: before the third) or the iterations before which the Gram form restarts (each in
            ``[1, steps)``, none leaving more than 3 without one).
        scale: shape rule, one of :data:`kronopt.linalg.MUON_SCALES`.
        scale_shape: whose ``(m, n)`` gives :math:`s`: the block's, or the parameter's last two dims.
        extra_scale: constant factor :math:`> 0`.
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(exposes_moment=True, reads_param_shape=True)
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
    ns_dtype: str = attrs.field(default="bfloat16", converter=to_str, validator=in_(tuple(linalg.DTYPES)))
    ns_form: Literal["standard", "gram"] = attrs.field(default="standard", converter=to_str, validator=in_(linalg.NS_FORMS))
    ns_restarts: str | tuple[int, ...] = attrs.field(default="auto", converter=auto_or_int_tuple)
    scale: str = attrs.field(default="original", converter=to_str, validator=in_(linalg.MUON_SCALES))
    extra_scale: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))
    scale_shape: Literal["block", "last_two_dims"] = attrs.field(
        default="block", converter=to_str, validator=in_(("block", "last_two_dims"))
    )

    def __attrs_post_init__(self) -> None:
        # every problem across the options, each its own (a config lists them apart)
        custom = self.coefficients == "custom" and not self.custom_coefficients
        linalg.check_ns_options(
            self.ns_form, self.ns_restarts, self.steps, self.coefficients, self.ns_dtype,
            also=["coefficients = 'custom' needs a non-empty custom_coefficients list"] if custom else [],
        )

    def schedule(self) -> list[tuple[float, float, float]]:
        if self.coefficients == "custom":
            return linalg.ns_coefficients(self.custom_coefficients, self.steps, self.custom_beyond)
        return linalg.ns_schedule(self.coefficients, self.steps)

    def param_dims(self, shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
        """A parameter's last two dims under ``scale_shape = "last_two_dims"`` where they are not its block's."""
        dims = tuple(shape[-2:])
        if self.scale_shape == "block" or len(dims) < 2 or dims == (layout.m, layout.n):
            return ()
        return dims

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> MomentumState:
        return MomentumState(_zeros(layout, dtype, device))

    def direction(self, state: MomentumState, G: Tensor, ctx: StepContext) -> tuple[Tensor, MomentumState]:
        beta = self.momentum
        basis = ctx.basis
        if self.momentum_form == "ema":
            B = state.momentum_buffer.lerp(G, 1 - beta)
            # the look-ahead (1-β)G + βB is β²·buf + (1-β²)·G: one pass over the same two inputs, which
            # without a rotation is written straight in the iteration's dtype
            U = self._look_ahead(state.momentum_buffer, G, basis) if self.nesterov else B
        else:
            B = state.momentum_buffer * beta + G
            U = G + beta * B if self.nesterov else B
        O = self.orthogonalize(ctx.rotate(U)).to(G.dtype)
        return ctx.unrotate(O).mul_(self.shape_factor(ctx.layout)), MomentumState(B)  # a fresh tensor: scaled in place

    def orthogonalize(self, U: Tensor, *, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """The Newton–Schulz iteration of ``U (b m n)`` with this rule's schedule, ε, norm and dtype (``buffers``:
        the caller's, kept from one call to the next; :func:`~kronopt.linalg.newton_schulz`)."""
        ns = linalg.DTYPES[self.ns_dtype]
        return linalg.newton_schulz(
            U, self.schedule(), eps=self.eps, dtype=ns, norm=self.norm, buffers=buffers, form=self.ns_form, restarts=self.ns_restarts
        )

    def shape_factor(self, layout: Layout) -> float:
        """The factor :math:`s` of a bucket's orthogonalized update: ``scale``'s rule on ``scale_shape``'s
        ``(m, n)``, times ``extra_scale``."""
        m, n = layout.param_dims or (layout.m, layout.n)
        return linalg.muon_scale(m, n, self.scale) * self.extra_scale

    def look_ahead_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype the unrotated look-ahead of a state in ``dtype`` is written in, into a new contiguous
        tensor: the iteration's where that holds the values, not float16, whose range ends at 65504
        (:func:`~kronopt.linalg.newton_schulz` normalises a float16 iteration's input in a wider dtype
        first); ``None`` where it is made as the momentum's ``lerp`` (in ``dtype``, the momentum's layout)."""
        ns = linalg.DTYPES[self.ns_dtype]
        return ns if ns != torch.float16 and torch.promote_types(ns, dtype) == dtype else None

    def _look_ahead(self, buf: Tensor, G: Tensor, basis: BasisState) -> Tensor:
        w = 1 - self.momentum**2
        if basis.Q_L is None and basis.Q_R is None and (dtype := self.look_ahead_dtype(G.dtype)) is not None:
            return torch.lerp(buf, G, w, out=torch.empty(G.shape, dtype=dtype, device=G.device))
        return buf.lerp(G, w)

    def moment(self, state: MomentumState, ctx: StepContext) -> Tensor:
        """The momentum buffer (original coordinates)."""
        return state.momentum_buffer

    def on_basis_change(self, state: MomentumState, change: BasisChange) -> MomentumState:
        return state
