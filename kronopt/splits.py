r"""Splits: the ``split`` slot.

A split says how each rotated side of a block is represented and what happens to
the part of the direction a restricted side does not cover. ``full`` keeps every
rotated side as a full factor and adds nothing; ``lowrank_flat`` keeps one side as a
rank-r subspace plus a flat eigenvalue and orthogonalizes the complement.
"""

import math
from fractions import Fraction
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from . import linalg
from .validators import auto_or_int_tuple, ge, gt, in_, le, to_float, to_int, to_str
from .registry import SPLITS
from .types import Layout, NoState, SideKind, SplitCapabilities, StepContext



@SPLITS.register("full", description="every rotated side is a full factor; no complement")
@attrs.frozen(kw_only=True)
class FullSplit:
    """Full factors on every side that the shape policy rotates."""

    capabilities: ClassVar[SplitCapabilities] = SplitCapabilities()

    def sides(self, m: int, n: int, rotated: tuple[bool, bool]) -> tuple[tuple[SideKind, int], tuple[SideKind, int]]:
        return (("full" if rotated[0] else "none", 0), ("full" if rotated[1] else "none", 0))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> NoState:
        return NoState()

    def complement(
        self, state: NoState, G: Tensor, D: Tensor, ctx: StepContext, moment: Callable[[], Tensor]
    ) -> tuple[Tensor, NoState]:
        return D, state


def _rank(value: Any) -> int | float:
    """An integer rank (≥ 0) or a fraction of the side (a float in ``[0, 1]``); TOML keeps the type."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be an integer rank or a fraction in [0, 1], got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be ≥ 0, got {value!r}")
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a fractional rank must be in [0, 1], got {value!r}")
    return float(value)


_SCALE_RULES = ("whitened", "match_subspace_rms", "identity", "muon", "match_rms_adamw")


def floor_fraction(fraction: float, d: int) -> int:
    """``⌊fraction · d⌋`` with the fraction as written: 0.29 is 29/100 (its float product with 100 reads 28.999…96)."""
    return math.floor(Fraction(repr(float(fraction))) * d)


def _scale_rule(value: Any) -> str | float:
    """A named complement scale rule or a positive number."""
    if isinstance(value, str):
        if value not in _SCALE_RULES:
            raise ValueError(f"must be one of {', '.join(map(repr, _SCALE_RULES))} or a number > 0, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be one of {', '.join(map(repr, _SCALE_RULES))} or a number > 0, got {value!r}")
    out = to_float(value)  # a finite float (inf would make every complement step non-finite: each skipped)
    if not out > 0:
        raise ValueError(f"a numeric complement scale must be > 0, got {value!r}")
    return out


@SPLITS.register(
    "lowrank_flat",
    description="Pro-KLShampoo: one side kept as a rank-r subspace + one flat eigenvalue; the complement of the "
    "momentum is orthogonalized (reads ctx.basis, ctx.layout, the inner rule's moment())",
)
@attrs.frozen(kw_only=True)
class LowRankFlatSplit:
    r"""Low-rank + flat side with an orthogonalized complement (Pro-KLShampoo, reconstructed).

    On the chosen side (``side``; right shown) the factor is
    :math:`\hat R = U S U^\top + \mu P_\perp`, :math:`U` ``(b n r)`` orthonormal and
    :math:`P_\perp = I - U U^\top`: the factor estimator and the basis keep only
    :math:`U, S, \mu` (``Layout`` kind ``"restricted"``), the inner rule gives the
    subspace block, and this stage adds the complement block

    .. math::
        D \leftarrow D + c \cdot \mathrm{NS}\big(M - (M U) U^\top\big)

    with :math:`M` the inner rule's first moment (``moment()``) and NS the Newton–Schulz
    iteration of :func:`kronopt.linalg.newton_schulz`. The identity of
    pro_kl_shampoo.md §4 makes this the whitened complement of full KL-Shampoo when
    :math:`c = \sqrt{n - r}` (``complement_scale = "identity"``). The default
    ``"whitened"`` rescales the block to the norm full KL-Shampoo gives the
    complement, :math:`\mu^{-1/2}\|\hat L^{-1/2} C\|_F` (KL factors: eigenvalues and
    :math:`\mu` on the gradient's scale squared). Where the other side's eigenvalues are
    the basis's (an eigensolver's, not tracked by the factor estimator), those
    within the solver's rounding of zero (``4 √max(k, 16)`` ulps of the largest) take
    the pseudo-inverse root, weight 0: a factor that was rank-deficient at its last
    refresh is not whitened by the inverse roots of its rounding. ``μ = 0`` leaves
    the block out. ``"match_subspace_rms"`` (Adam-type
    inner rules, pro_soap and pro_dykaf) gives the complement block the per-entry RMS
    of the inner rule's subspace block :math:`D`: norm :math:`\|D\|_F\sqrt{(n-r)/r}`
    (RMS 1, Adam's first step, at :math:`r = 0`); it is scale-free, needs no
    eigenvalue, and follows the inner rule's bias correction and warm-up.
    Alternatives: ``"muon"`` :math:`\sqrt{\max(1, m/n)}`, ``"match_rms_adamw"``
    :math:`0.2\sqrt{\max(m, n)}`, or a number; times ``complement_mult``.

    The rank is ``rank`` (an integer) or ``floor(rank · d)`` (a float fraction, taken as written: 0.29 of 100 is 29),
    capped at ``max_rank`` when that is > 0. A rank ``≥ d`` keeps the side ``"full"``:
    the block is then exactly KL-Shampoo's (no complement). A side the shape policy
    does not rotate is never restricted.

    Attributes:
        rank: integer rank ≥ 0 or fraction of the side in ``[0, 1]``.
        max_rank: cap on the rank (0: none).
        side: ``"larger"`` (right when square), ``"left"`` or ``"right"``.
        complement_scale: ``"whitened"``, ``"match_subspace_rms"``, ``"identity"``, ``"muon"``,
            ``"match_rms_adamw"`` or a number > 0.
        complement_mult: extra factor > 0.
        ns_coefficients: Newton–Schulz schedule (:data:`kronopt.linalg.NS_SCHEDULES`); ``cans`` needs
            ``ns_dtype`` ``float64`` (as the ``orthogonalize`` rule's).
        ns_steps: iterations (1–99).
        ns_dtype: arithmetic dtype of the iteration.
        ns_eps: norm floor.
        ns_form: ``"standard"`` or ``"gram"`` (the iteration on the Gram matrix where that takes fewer
            multiply-adds; :func:`kronopt.linalg.newton_schulz`).
        ns_restarts: ``"auto"`` (no more than 3 iterations without a restart, the fewest restarts; 5
            iterations: before the third) or the iterations before which the Gram form restarts (each in
            ``[1, ns_steps)``, none leaving more than 3 without one).
    """

    capabilities: ClassVar[SplitCapabilities] = SplitCapabilities(restricts=True)
    # compared with its type: rank 1 (one direction) and 1.0 (the whole side) are different configs
    rank: int | float = attrs.field(default=0.25, converter=_rank, eq=lambda v: (type(v), v))
    max_rank: int = attrs.field(default=128, converter=to_int, validator=ge(0))
    side: Literal["larger", "left", "right"] = attrs.field(
        default="larger", converter=to_str, validator=in_(("larger", "left", "right"))
    )
    complement_scale: str | float = attrs.field(default="whitened", converter=_scale_rule)
    complement_mult: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))
    ns_coefficients: str = attrs.field(default="kj", converter=to_str, validator=in_(tuple(linalg.NS_SCHEDULES)))
    ns_steps: int = attrs.field(default=5, converter=to_int, validator=[ge(1), le(99)])
    ns_dtype: str = attrs.field(default="bfloat16", converter=to_str, validator=in_(tuple(linalg.DTYPES)))
    ns_eps: float = attrs.field(default=1e-7, converter=to_float, validator=gt(0.0))
    ns_form: Literal["standard", "gram"] = attrs.field(default="standard", converter=to_str, validator=in_(linalg.NS_FORMS))
    ns_restarts: str | tuple[int, ...] = attrs.field(default="auto", converter=auto_or_int_tuple)

    def __attrs_post_init__(self) -> None:
        # every problem across the options, each its own (a config lists them apart)
        overflow = not isinstance(self.complement_scale, str) and not math.isfinite(self.complement_scale * self.complement_mult)
        linalg.check_ns_options(
            self.ns_form, self.ns_restarts, self.ns_steps, self.ns_coefficients, self.ns_dtype,
            names=("ns_coefficients", "ns_dtype"),
            also=[
                f"complement_scale × complement_mult must be finite, got {self.complement_scale!r} × {self.complement_mult!r}"
            ] if overflow else [],
        )

    def resolve_rank(self, d: int) -> int:
        """The rank on a side of size ``d`` (may be ``≥ d``: then the side stays full)."""
        r = self.rank if isinstance(self.rank, int) else floor_fraction(self.rank, d)
        return min(r, self.max_rank) if self.max_rank > 0 else r

    def sides(self, m: int, n: int, rotated: tuple[bool, bool]) -> tuple[tuple[SideKind, int], tuple[SideKind, int]]:
        kinds: list[tuple[SideKind, int]] = [("full" if rotated[0] else "none", 0), ("full" if rotated[1] else "none", 0)]
        which = {"left": 0, "right": 1, "larger": 0 if m > n else 1}[self.side]
        d = (m, n)[which]
        r = self.resolve_rank(d)
        if rotated[which] and r < d:
            kinds[which] = ("restricted", r)
        return kinds[0], kinds[1]

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> NoState:
        return NoState()

    def scale(self, layout: Layout) -> float:
        """The fixed complement factor :math:`c` times ``complement_mult`` (``"whitened"``,
        ``"match_subspace_rms"``: ``complement_mult`` alone)."""
        m, n = layout.m, layout.n
        if self.complement_scale in ("whitened", "match_subspace_rms"):
            c = 1.0
        elif self.complement_scale == "identity":
            d, r = (m, layout.rank_left) if layout.left == "restricted" else (n, layout.rank_right)
            c = math.sqrt(d - r)
        elif self.complement_scale == "muon":
            c = linalg.muon_scale(m, n, "original")
        elif self.complement_scale == "match_rms_adamw":
            c = linalg.muon_scale(m, n, "match_rms_adamw")
        else:
            c = float(self.complement_scale)
        return c * self.complement_mult

    def complement_each(
        self, states: Sequence[NoState], G: Sequence[Tensor], D: Sequence[Tensor], ctxs: Sequence[StepContext],
        moments: Sequence[Callable[[], Tensor]],
    ) -> list[tuple[Tensor, NoState]]:
        """:meth:`complement` of several buckets, the same bits: the Newton–Schulz iterations of them all together
        (:func:`kronopt.linalg.newton_schulz_each`), the rest each in its turn."""
        operands = [self._operands(ctx, moment) for ctx, moment in zip(ctxs, moments)]
        at = [i for i, op in enumerate(operands) if op is not None]
        made = self._orthogonalized([operands[i][1] for i in at])  # type: ignore[index]
        out = [(d, state) for d, state in zip(D, states)]
        if at and self.complement_scale == "whitened" and not any(ctxs[i].eigvals_from_basis for i in at):
            # the tracked eigenvalues' norms and rescalings of them all together (an eigensolver's take the
            # pseudo-inverse root: alone, as _added makes them)
            O = [o.to(D[i].dtype) for i, o in zip(at, made)]
            side, C, Q_other, lam_other, mu = (list(x) for x in zip(*(operands[i] for i in at)))  # type: ignore[misc]
            nu = linalg.whitened_complement_norms_each(C, Q_other, lam_other, mu, side)
            w = linalg.rescale_factors_each(O, linalg.flat_each(linalg.finite_or_zero, nu))
            scales = [self.scale(ctxs[i].layout) for i in at]  # the whitened rule's: complement_mult
            w = w if all(c == 1.0 for c in scales) else [t.mul_(c) for t, c in zip(w, scales)]
            for i, d in zip(at, torch._foreach_addcmul([D[i] for i in at], O, w)):
                out[i] = (d, states[i])
            return out
        for i, o in zip(at, made):
            out[i] = (self._added(D[i], o.to(D[i].dtype), operands[i], ctxs[i]), states[i])  # type: ignore[arg-type]
        return out

    def complement(
        self, state: NoState, G: Tensor, D: Tensor, ctx: StepContext, moment: Callable[[], Tensor]
    ) -> tuple[Tensor, NoState]:
        operands = self._operands(ctx, moment)
        if operands is None:
            return D, state
        # O in D's dtype before its norm and the scaled sum: on a CPU, one conversion and two passes of
        # one dtype take less time than a norm and a sum that each convert a bfloat16 O as they read it
        (O,) = self._orthogonalized([operands[1]])
        return self._added(D, O.to(D.dtype), operands, ctx), state

    def _operands(
        self, ctx: StepContext, moment: Callable[[], Tensor]
    ) -> tuple[str, Tensor, Tensor | None, Tensor | None, Tensor | None] | None:
        """``(side, C, Q_other, lam_other, mu)``: the restricted side, the moment's complement, the other side's
        basis and eigenvalues, and the restricted side's flat eigenvalue; ``None`` on a layout with no restricted
        side."""
        layout = ctx.layout
        if layout.left == "restricted":
            return "left", ctx.moment_complement(moment), ctx.basis.Q_R, ctx.eigvals[1], ctx.flat[0]
        if layout.right == "restricted":
            return "right", ctx.moment_complement(moment), ctx.basis.Q_L, ctx.eigvals[0], ctx.flat[1]
        return None

    def _orthogonalized(self, C: list[Tensor]) -> list[Tensor]:
        """The complements' Newton–Schulz iterations (one alone, several together), in ``ns_dtype``."""
        schedule = linalg.ns_schedule(self.ns_coefficients, self.ns_steps)
        return linalg.newton_schulz_each(
            C, schedule, eps=self.ns_eps, dtype=linalg.DTYPES[self.ns_dtype], form=self.ns_form, restarts=self.ns_restarts
        )

    def _added(
        self, D: Tensor, O: Tensor, operands: tuple[str, Tensor, Tensor | None, Tensor | None, Tensor | None],
        ctx: StepContext,
    ) -> Tensor:
        """The direction ``D`` with the orthogonalized complement ``O`` (in ``D``'s dtype) scaled and added."""
        layout = ctx.layout
        side, C, Q_other, lam_other, mu = operands
        if self.complement_scale == "whitened":
            assert mu is not None, "a restricted side's factor estimator gives its flat eigenvalue (validated)"
            nu = linalg.whitened_complement_norm(
                C, Q_other, lam_other, mu, restricted=side, solved=ctx.eigvals_from_basis
            )
            # μ = 0 (an estimator whose complement has seen no energy yet) or a tracked λ ≤ 0: no complement block
            w = linalg.rescale_factor(O, linalg.finite_or_zero(nu))
        elif self.complement_scale == "match_subspace_rms":
            d, r = (layout.m, layout.rank_left) if side == "left" else (layout.n, layout.rank_right)
            other = layout.n if side == "left" else layout.m
            w = linalg.rescale_factor(O, linalg.subspace_rms_complement_norm(D, d, r, other))
        else:
            return torch.add(D, O, alpha=self.scale(layout))
        return torch.addcmul(D, O, w.mul_(self.scale(layout)))
