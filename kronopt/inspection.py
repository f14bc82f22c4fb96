r"""A public look inside a :class:`~kronopt.optimizer.KronOptimizer`: per parameter, its factors, bases and records.

:meth:`KronOptimizer.inspect` returns one :class:`ParamView` per parameter that
has optimizer state, keyed by the parameter's name. Everything is read through
the stage contracts (the factor estimator's ``factors``/``eigvals``/``flat_eigvals``,
the basis state, an inner rule's ``second_moment``), never through field names
private to one stage, so a plugin stage shows up like a built-in one. The
tensors are detached copies of one block (no batch dimension); reading them
synchronises nothing until you look at their values.

Example::

    view = opt.inspect()["blocks.0.mlp.up.weight"]
    view.right.eigvals          # eigenvalue estimates per basis column
    view.spectrum("right")      # the side's whole spectrum (a restricted side: r values + (d - r) × mu)
    view.records["inner"]       # the inner rule's state for this block, {field: tensor}
"""

from typing import Any

import attrs
import torch
from torch import Tensor

from . import compose
from .config import KronConfig
from .types import Layout, SideKind, capabilities


@attrs.frozen(eq=False)
class SideView:
    r"""One side of one block.

    Attributes:
        kind: ``"full"``, ``"restricted"`` or ``"none"`` (not rotated).
        basis: ``Q (d d)`` on a full side, the subspace ``U (d r)`` on a restricted
            side, ``None`` on a ``none`` side or for a basis that keeps none (identity).
        eigvals: the eigenvalue estimates that go with the basis columns (``d`` or
            ``r`` values; the factor estimator's own when it tracks them, else the basis's).
        flat: the flat eigenvalue :math:`\mu` of a restricted side (a 0-d tensor), else ``None``.
        factor: the factor estimator's factor ``(d d)``; on a restricted side its power
            product ``(d r)``; ``None`` when the estimator keeps none.
        rank: ``r`` on a restricted side, else 0.
    """

    kind: SideKind
    basis: Tensor | None
    eigvals: Tensor | None
    flat: Tensor | None
    factor: Tensor | None
    rank: int = 0


@attrs.frozen(eq=False)
class ParamView:
    """Everything the optimizer keeps for one parameter (one block), as plain tensors.

    Attributes:
        name: the parameter's name (as in warnings and :meth:`KronOptimizer.nonfinite_counts`).
        pipeline: ``"main"`` or ``"fallback"``.
        shape: the block ``(m, n)`` the parameter is viewed as.
        step: parameter updates taken (the bucket's counter).
        left, right: the two sides.
        second_moment: the inner rule's second moment in the basis ``(m n)`` when the
            rule declares one (``second_moment``), else ``None``.
        records: per slot (``factors``, ``basis``, ``inner``, ``split``, ``post``), the
            stage's state for this block: ``{field: tensor}`` (tensors with the block
            dimension only; counters and flags shared by the bucket are left out).
    """

    name: str
    pipeline: str
    shape: tuple[int, int]
    step: int
    left: SideView
    right: SideView
    second_moment: Tensor | None
    records: dict[str, dict[str, Tensor]]

    def side(self, which: str) -> SideView:
        """``"left"`` or ``"right"``."""
        if which not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {which!r}")
        return self.left if which == "left" else self.right

    def spectrum(self, which: str) -> Tensor | None:
        """The side's eigenvalue estimates, descending, float64; a restricted side adds ``d - r`` copies of μ.

        Non-finite and non-positive values (a vanishing direction) are left out;
        ``None`` when the side has no estimates.
        """
        side = self.side(which)
        if side.eigvals is None:
            return None
        values = side.eigvals.to(torch.float64)
        if side.flat is not None:
            d = self.shape[0] if which == "left" else self.shape[1]
            values = torch.cat([values, side.flat.to(torch.float64).expand(d - side.rank)])
        values = values[torch.isfinite(values) & (values > 0)]
        return torch.sort(values, descending=True).values


def bucket_views(
    cfg: KronConfig, layout: Layout, state: compose.BucketState, names: list[str], pipeline: str
) -> list[ParamView]:
    """One :class:`ParamView` per block of a bucket (``cfg`` bound, ``state`` initialised)."""
    ctx = compose.context(cfg, layout, state, state.step)
    factors = cfg.factors.factors(state.factors)
    second = cfg.inner.second_moment(state.inner) if capabilities(cfg.inner).has_second_moment else None
    basis = state.basis
    records = {slot: _batched_fields(getattr(state, slot), layout.batch) for slot in ("factors", "basis", "inner", "split", "post")}

    def side(i: int, kind: SideKind, rank: int, Q: Tensor | None, lam: Tensor | None, mu: Tensor | None, F: Tensor | None) -> SideView:
        pick = lambda t: None if t is None else t[i].detach().clone()  # noqa: E731
        return SideView(kind=kind, basis=pick(Q), eigvals=pick(lam), flat=pick(mu), factor=pick(F), rank=rank)

    out = []
    for i, name in enumerate(names):
        out.append(
            ParamView(
                name=name,
                pipeline=pipeline,
                shape=(layout.m, layout.n),
                step=state.step,
                left=side(i, layout.left, layout.rank_left, basis.Q_L, ctx.eigvals[0], ctx.flat[0], factors[0]),
                right=side(i, layout.right, layout.rank_right, basis.Q_R, ctx.eigvals[1], ctx.flat[1], factors[1]),
                second_moment=None if second is None else second[i].detach().clone(),
                records={slot: {k: v[i].detach().clone() for k, v in fields.items()} for slot, fields in records.items()},
            )
        )
    return out


def _batched_fields(record: Any, batch: int) -> dict[str, Tensor]:
    """The tensor fields of a state record (nested records by dotted name) that carry the block dimension."""
    if not attrs.has(type(record)):
        return {}
    return {
        key: value
        for key, value in compose.flatten(record).items()
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch
    }
