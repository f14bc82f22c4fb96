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
    view.spectrum("right")      # the side's spectrum above rounding of zero (a restricted side: r values + (d - r) × mu)
    view.records["inner"]       # the inner rule's state for this block, {field: tensor}

A saved state dict gives the same views without the model: :func:`saved_views`
(``state_dict()["state"]`` holds each parameter's own state, see
``docs/architecture.md``; :func:`per_parameter_state` also reads version-1 files).
"""

import itertools
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from . import compose
from ._shapes import block_spec
from .config import KronConfig, from_dict, with_overrides, without_fallback_settings
from .linalg import eigenvalue_floor
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
            product ``(d r)`` as of the last update a refresh followed (only the refresh reads
            it, so it is computed then); ``None`` when the estimator keeps none.
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
        calls: ``step()`` calls that reached the parameter (``step`` plus a first call that only observes).
        left, right: the two sides.
        second_moment: the inner rule's second moment in the basis when the rule declares
            one (``second_moment``), else ``None``: ``(m n)``, or ``(m r)`` / ``(r n)`` where the
            right / left side is restricted to ``r`` directions (pro_soap, pro_dykaf).
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
    calls: int = 0

    def side(self, which: str) -> SideView:
        """``"left"`` or ``"right"``."""
        if which not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {which!r}")
        return self.left if which == "left" else self.right

    def size(self, which: str) -> int:
        """``d``, the length of side ``"left"`` (``m``) or ``"right"`` (``n``): what :meth:`spectrum` is a part of."""
        self.side(which)  # the same refusal of another name
        return self.shape[0] if which == "left" else self.shape[1]

    def spectrum(self, which: str) -> Tensor | None:
        """The side's eigenvalue estimates above rounding of zero, descending, float64; a restricted side adds
        ``d - r`` copies of μ.

        Vanishing directions are left out, so the length is the side's numerical rank, at most
        ``d`` (:meth:`size`): a non-finite estimate (KL's ``1/s²`` where ``s = 0``) and every value at or below
        :func:`kronopt.linalg.eigenvalue_floor` ``(d, dtype)`` times the largest finite one. An eigensolver
        returns a rank-deficient factor's null space (a block's ``G Gᵀ`` with fewer gradients than rows) as
        rounding of either sign, about ``1e-16`` of the largest in float64; kept, those values would stand
        for eigenvalues where there are none. ``dtype`` is the estimates' own, float32 at the least (the
        precision the solvers run in, whatever the storage). ``None`` when the side has no estimates.
        """
        side = self.side(which)
        if side.eigvals is None:
            return None
        values = side.eigvals.to(torch.float64)
        if side.flat is not None:
            values = torch.cat([values, side.flat.to(torch.float64).expand(self.size(which) - side.rank)])
        values = values[torch.isfinite(values)]
        if values.numel():
            solved_in = torch.promote_types(side.eigvals.dtype, torch.float32)
            floor = float(values.max()) * eigenvalue_floor(self.size(which), solved_in)
            values = values[(values > floor) & (values > 0)]
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

    out = []
    for i, name in enumerate(names):
        # one copy of block i of each stack: a tensor that is both a stage record's field and a side's basis,
        # eigenvalues or factor (or the second moment) is copied once and shared by the two places
        copies: dict[int, Tensor] = {}

        def pick(t: Tensor | None, i: int = i, copies: dict[int, Tensor] = copies) -> Tensor | None:
            if t is None:
                return None
            if id(t) not in copies:
                copies[id(t)] = t[i].detach().clone()
            return copies[id(t)]

        def side(kind: SideKind, rank: int, Q: Tensor | None, lam: Tensor | None, mu: Tensor | None, F: Tensor | None) -> SideView:
            return SideView(kind=kind, basis=pick(Q), eigvals=pick(lam), flat=pick(mu), factor=pick(F), rank=rank)

        block_records = {slot: {k: pick(v) for k, v in fields.items()} for slot, fields in records.items()}
        out.append(
            ParamView(
                name=name,
                pipeline=pipeline,
                shape=(layout.m, layout.n),
                step=state.step,
                left=side(layout.left, layout.rank_left, basis.Q_L, ctx.eigvals[0], ctx.flat[0], factors[0]),
                right=side(layout.right, layout.rank_right, basis.Q_R, ctx.eigvals[1], ctx.flat[1], factors[1]),
                second_moment=pick(second),
                records=block_records,  # type: ignore[arg-type]
                calls=state.calls,
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


# -- saved state ------------------------------------------------------------------------

#: keys of a saved per-parameter entry that are not stage state (see ``KronOptimizer.state_dict``)
NONFINITE_KEY, BUCKET_KEY = "nonfinite", "bucket"


def counters_only(entry: Mapping[str, Any]) -> bool:
    """Whether a saved entry holds counters and no tensor: under work sharding, a rank's
    entry for a block another rank owns (``calls`` and ``bucket``; docs/distributed.md)."""
    return bool(entry) and not any(isinstance(v, Tensor) for v in entry.values())


def counters_disagree(entry: Mapping[str, Any]) -> bool:
    """Whether a saved entry's ``calls`` and ``step`` cannot be one block's: every bucket counts ``calls = step`` or
    ``step + 1`` (a first call that only observes). Where a marker of a block another rank owned (its ``calls``)
    was filled with a fresh optimizer's tensors and ``step`` (torch's ``set_optimizer_state_dict`` with
    ``full_state_dict=True`` fills the keys a dict lacks from the optimizer's own) they disagree from the second
    update on."""
    calls, step = entry.get("calls"), entry.get("step")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in (calls, step)):
        return False
    return not 0 <= calls - step <= 1  # type: ignore[operator]


def per_parameter_state(state_dict: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
    """The per-parameter entries of a saved ``KronOptimizer.state_dict()``, keyed as saved.

    Version 2 (and a dict without the ``kronopt`` section, as
    ``torch.distributed.checkpoint`` returns it) is ``state_dict["state"]``; under work
    sharding it also lists the blocks other ranks own, with their counters only
    (:func:`counters_only`). Version 1
    kept stacked buckets under ``kronopt.buckets``; each is split per block (``t[j]``,
    views of the saved stack; values without the block axis repeated) with its
    ``nonfinite`` count and its bucket position.

    Raises:
        ValueError: an unknown version, or a version-1 dict without buckets.
    """
    kron = state_dict.get("kronopt")
    version = 2 if kron is None else kron.get("version")
    if version == 2:
        return dict(state_dict.get("state", {}))
    if version != 1:
        raise ValueError(
            f"unknown kronopt state dict version {version!r}: this kronopt reads versions 1 and 2 (a newer kronopt wrote it?)"
        )
    if "buckets" not in kron:
        raise ValueError("not a kronopt version-1 state dict: 'kronopt.buckets' is missing")
    out: dict[Any, dict[str, Any]] = {}
    for bi, entry in enumerate(kron["buckets"]):
        if "state" not in entry:
            continue
        params = list(entry["params"])
        flat = {k: v for k, v in entry["state"].items() if v is not None}
        for j, index in enumerate(params):
            block = {k: (v[j] if compose.is_batched(v, len(params)) else v) for k, v in flat.items()}
            block[NONFINITE_KEY] = entry["nonfinite"][j]
            block[BUCKET_KEY] = bi
            out[index] = block
    return out


def saved_views(state_dict: Mapping[str, Any], *, config: KronConfig | None = None) -> dict[str, ParamView]:
    """Per parameter name, the :class:`ParamView` of a saved state dict, as :meth:`KronOptimizer.inspect` gives it live.

    No model is needed: each entry's block layout (``m``, ``n``, the sides) is the one
    whose fresh state (the stages' ``init``, on the meta device) has exactly the
    entry's keys and shapes. Names come from the saved groups' ``param_names``
    (else ``param_groups[g].params[j]``; ``torch.distributed.checkpoint`` keys are names already).

    Args:
        state_dict: a ``KronOptimizer.state_dict()`` (version 1 or 2).
        config: the optimizer's config, when the dict has no ``kronopt`` section.

    Raises:
        ValueError: no config, or an entry that fits no layout of its group's pipeline.
    """
    kron = state_dict.get("kronopt")
    if config is None:
        if kron is None or "config" not in kron:
            raise ValueError("the state dict has no kronopt config: pass config=")
        config = from_dict(without_fallback_settings(kron["config"]))
    entries = per_parameter_state(state_dict)
    groups = state_dict.get("param_groups", [])
    named = [set(g.get("param_names") or ()) for g in groups]
    out: dict[str, ParamView] = {}
    index = 0
    for gi, group in enumerate(groups):
        cfg = with_overrides(config, group.get("overrides") or {})
        pipeline = group.get("pipeline", "main")
        cfg = (cfg if pipeline == "main" else cfg.fallback).bound()  # type: ignore[union-attr]
        names = group.get("param_names")
        for j, key in enumerate(group["params"]):
            entry = entries.get(key, entries.get(index))
            index += 1
            if not entry or counters_only(entry):  # no state, or a block another rank held (work sharding)
                continue
            if entry.get("calls") == 0:  # no counted call reached it: inspect() leaves it out too
                continue
            if isinstance(key, str):
                name = key
            elif names:  # qualified by its group where another group has the same name, as inspect() names it
                name = names[j] if sum(names[j] in n for n in named) == 1 else f"param_groups[{gi}].{names[j]}"
            else:
                name = f"param_groups[{gi}].params[{j}]"
            out[name] = _saved_view(cfg, {k: v for k, v in entry.items() if k not in (NONFINITE_KEY, BUCKET_KEY)}, name, pipeline)
    return out


def _block_of(shape: torch.Size, cfg: KronConfig) -> tuple[int, int]:
    """The block ``(m, n)`` of a parameter of ``shape`` under the config's shape policy (``kronopt._shapes``)."""
    sh = cfg.shapes
    spec = block_spec(tuple(shape), max_dim=sh.max_dim, merge=sh.merge_dims, precondition_1d=sh.precondition_1d)
    return spec.m, spec.n


def _saved_view(cfg: KronConfig, entry: dict[str, Any], name: str, pipeline: str) -> ParamView:
    tensors = [v for v in entry.values() if isinstance(v, Tensor)]
    dims = sorted({1, *(d for t in tensors for d in t.shape)})
    # the compute dtype: the widest stored (a [storage] dtype is never wider than it; a narrowed record
    # first in the entry would otherwise round the others' views down to its dtype)
    dtype = max((t.dtype for t in tensors if t.is_floating_point()), key=lambda d: torch.finfo(d).bits, default=torch.float32)
    # an elementwise bucket's tensors are saved shaped like the parameter (a vector, an N-D weight, a matrix
    # whose dims merge_dims joins): their block, by the config's shape policy, comes first
    policy = {tuple(t.shape): _block_of(t.shape, cfg) for t in tensors}
    shaped = [shape for shape, block in policy.items() if block != shape]
    blocks = list(dict.fromkeys([*(policy[shape] for shape in shaped), *itertools.product(dims, dims)]))
    # where several layouts keep the same state (a basis that keeps nothing, as adamw's identity, has the
    # same keys whatever its sides), the one the shape policy gives is tried first: that of a tensor shaped
    # like the parameter, then that of a matrix of the block's shape, then every other rotation
    layouts = [attrs.evolve(cfg.block(shape)[1], batch=1) for shape in shaped]
    for (m, n) in blocks:
        layouts.append(attrs.evolve(cfg.block((m, n))[1], batch=1))
        for rotated in itertools.product((True, False), repeat=2):
            (kind_L, rank_L), (kind_R, rank_R) = cfg.split.sides(m, n, rotated)
            layouts.append(Layout(batch=1, m=m, n=n, left=kind_L, right=kind_R, rank_left=rank_L, rank_right=rank_R))
    for layout in dict.fromkeys(layouts):
        m, n = layout.m, layout.n
        try:
            meta = compose.init_state(cfg, layout, dtype=dtype, device=torch.device("meta"))
        except (ValueError, RuntimeError):
            continue
        expected = {k: v for k, v in compose.flatten(meta).items() if v is not None}
        if expected.keys() != entry.keys():
            continue
        fitted = {  # a tensor shaped like the parameter where the state holds a block-sized one
            k: v.reshape(m, n)
            if isinstance(v, Tensor) and policy[tuple(v.shape)] == (m, n) != tuple(v.shape) and expected[k].shape[1:] == (m, n)
            else v
            for k, v in entry.items()
        }
        if any(
            isinstance(v, Tensor) != isinstance(fitted[k], Tensor)
            or (isinstance(v, Tensor) and tuple(v.shape[1:]) != tuple(fitted[k].shape))
            for k, v in expected.items()
        ):
            continue
        entry = fitted
        device = tensors[0].device if tensors else torch.device("cpu")
        template = compose.init_state(cfg, layout, dtype=dtype, device=device)
        state = compose.stack_entries(template, [entry], [name])
        return bucket_views(cfg, layout, state, [name], pipeline)[0]
    raise ValueError(f"the saved state of {name} fits no block layout of its pipeline (another config?)")
