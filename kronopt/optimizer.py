"""``KronOptimizer``: the thin ``torch.optim.Optimizer`` shell around :mod:`kronopt.compose`.

It routes parameters to the main pipeline or the fallback, stacks same-shape
blocks into buckets, runs :func:`kronopt.compose.step` once per bucket, writes
the parameters back, guards against non-finite gradients and saves / restores
everything bit for bit.
"""

import bisect
import collections
import contextlib
import itertools
import math
import operator
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from . import compiled, compose, distributed, linalg, post
from ._shapes import BlockSpec, to_block
from .config import (
    FALLBACK_AT_DEFAULT, ConfigError, KronConfig, changed_keys, from_dict, to_dict, with_overrides, without_fallback_settings,
)
from .inspection import BUCKET_KEY as _BUCKET
from .inspection import NONFINITE_KEY as _NONFINITE
from .inspection import ParamView, bucket_views, counters_disagree, counters_only, per_parameter_state
from .refresh import Staggered
from .types import Layout, capabilities
from .validators import one_cpu_number, real_number

_version, _Seen = linalg._version, linalg._Seen  # a tensor's version counter, and a record of it (linalg)

#: param-group keys that are not config overrides
_RESERVED = ("params", "param_names", "pipeline", "overrides", "initial_lr", "name")

#: torch.optim's keys that change its arithmetic, which a group refuses when it is made ("unknown key") and a step
#: refuses when one is set on a live group but at False or None, as kronopt steps (its own are config keys,
#: ``inner.betas``, ``inner.eps``, …): taking a torch habit (``group["betas"] = …`` mid-run) silently would step as if
#: it were not there. torch itself sets ``differentiable = False`` on a group added after the optimizer was copied
#: or unpickled (``Optimizer.__setstate__``'s default); its kernel choices (``foreach``, ``fused``, ``capturable``)
#: change no result. Other keys a user or a scheduler sets (``max_lr``, ``swa_lr``, a label) are the group's own.
_TORCH_OPTIM_KEYS = frozenset({
    "betas", "eps", "momentum", "dampening", "nesterov", "maximize", "amsgrad", "differentiable", "decoupled_weight_decay",
})

#: the keys of a group's ``overrides`` that a step takes up when they are edited after the group was made: the
#: refresh period f, its offset and the factors' retention ρ, which may be scheduled (shared/specs/soap.md §3). The
#: others are fixed when the group is made (its stages are resolved once; many shape the buckets or the state), and
#: an edit of one is refused, naming it; the rate and the decay are the group's own ``lr`` and ``weight_decay``
SCHEDULABLE: tuple[str, ...] = ("refresh.every", "refresh.offset", "factors.beta")
#: what an edit of a key outside :data:`SCHEDULABLE` is told
_FIXED_KEY = (
    f"is fixed when the group is made (a group's stages are resolved once); only {', '.join(SCHEDULABLE)} are read "
    "afresh: save the state dict and load it into an optimizer built with the new value"
)


def _edit_problem(key: str, fallback: bool) -> str | None:
    """What an edit of the override ``key`` (as a group's overrides name it) in a main or a ``fallback`` group is
    told, ``None`` where a step takes it up: the schedule's keys of the pipeline the group steps (and the main's in
    a fallback group, set in every group by a loop over them); the rate and the decay are judged by their values."""
    own = key.startswith("fallback.") == fallback
    bare = key.removeprefix("fallback.") if fallback else key
    if own:
        return None if bare in (*SCHEDULABLE, "lr", "weight_decay") else _FIXED_KEY
    if fallback:  # a main-pipeline key, which this group does not step
        if key in (*SCHEDULABLE, "lr", "weight_decay"):
            return None
        return (
            "sets the main pipeline, which this group (its 'pipeline' is 'fallback') does not step: edit the main "
            f"group's overrides, or the fallback's own key fallback.{key}"
        )
    return "the fallback's parameters step in their own group (its 'pipeline' is 'fallback'): edit that group's overrides"


#: param-group keys that label a group for the frameworks around the optimizer (Lightning's LearningRateMonitor
#: names a group's curve by ``name``): kept on the routed groups, read by no stage
_LABELS = ("name",)
_STATE_VERSION = 2  # 1: stacked buckets under "kronopt"; 2: torch.optim's per-parameter "state"
#: not copied with the optimizer: a step's gradient verdicts (weak references) and the plain-AdamW verdicts by config
#: ``id`` (a copy makes them again); torch's hooks and what an LR scheduler puts on the instance (its ``step``
#: wrapper holds the original), which torch's own ``Optimizer.__getstate__`` leaves out too
_NOT_COPIED = frozenset({
    "_grad_flags", "_plain_adam", "_plain_muon", "_views_flat", "_kept_scratch", "_moment_bounds", "_kept_basis_bounds",
    "step", "_opt_called",
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
})


def _block_state_bytes(cfg: KronConfig, layout: Layout, state_dtype: torch.dtype) -> int:
    """The bytes of one block's state in its compute dtype ``state_dtype``, as a step makes it anew (a
    ``[storage]`` dtype narrower than that is upcast for the step): a fresh state of one block made on
    the meta device, where nothing is allocated, or on the CPU where a stage cannot make it there (one
    that reads a number of its state, say; the CPU's random numbers put back after it, so a cap changes
    no number); 0 (unknown: no cap) where that fails too, as the step will."""
    one = attrs.evolve(layout, batch=1)
    try:
        state = compose.init_state(cfg, one, dtype=state_dtype, device=torch.device("meta"))
    except Exception:  # noqa: BLE001 - a plugin stage's init may do what the meta device refuses
        try:
            with torch.random.fork_rng(devices=[]):  # an init that draws leaves the process's numbers as they were
                state = compose.init_state(cfg, one, dtype=state_dtype, device=torch.device("cpu"))
        except Exception:  # noqa: BLE001 - the first step will raise it
            return 0
    return sum(
        t.numel() * (state_dtype.itemsize if t.is_floating_point() else t.element_size())
        for t in compose.flatten(state).values()
        if isinstance(t, Tensor)
    )


def _blocks_under(cap: int, block_bytes: int) -> int | None:
    """How many blocks of ``block_bytes`` of state (:func:`_block_state_bytes`) one bucket holds under
    ``cap`` bytes (``bucket_cap_mib``): one at least, whatever a block holds; ``None`` (no bound) where
    there is no cap or a block's bytes are unknown (0)."""
    return max(1, cap // block_bytes) if cap and block_bytes else None


def _phases(layouts: list[Layout], count: int, load: list[int] | None = None) -> list[int]:
    """A refresh phase in ``0 … count - 1`` per block, balancing the blocks' cost over the phases.

    Blocks are taken by cost (:func:`distributed.block_cost`), largest first (ties in
    order), each to the phase with the least cost so far (ties to the lower phase):
    round robin for blocks of one shape. Blocks with no rotated side never refresh
    anything and stay in phase 0 (so do all of a group whose basis is ``static``: the
    caller passes 1). ``load`` (updated in place): the cost already in each phase used, from
    the groups before with the same schedule (phases past its length hold none: a period of
    any length costs only the blocks' count). Depends on the layouts and ``load`` only, so a
    load rebuilds the same phases.
    """
    phases = [0] * len(layouts)
    if count <= 1:
        return phases
    costs = [0 if l.sides == ("none", "none") else distributed.block_cost(l) for l in layouts]
    load = [] if load is None else load  # the phases used so far, 0 … len - 1; the others hold no cost yet
    for i in sorted((i for i in range(len(layouts)) if costs[i]), key=lambda i: (-costs[i], i)):
        if len(load) < count:  # an unused phase holds the least cost (none), the lowest of them first
            phase = len(load)
            load.append(0)
        else:
            phase = min(range(count), key=lambda r: (load[r], r))
        phases[i] = phase
        load[phase] += costs[i]
    return phases


#: the state dict's record of how the staggered phases were balanced (``kronopt["phases"]``)
_PHASES_KEY = "phases"


def _phases_across(kron: Mapping[str, Any] | None) -> bool:
    """Whether a saved optimizer balanced its staggered phases over the groups of a schedule (its dict says so), else
    per group: a kronopt dict saved before that balance has no record of it, and its run had each group's phases
    apart. A dict without a kronopt part (``torch.distributed.checkpoint``'s own) takes the balance over groups."""
    return kron is None or kron.get(_PHASES_KEY, "per_group") == "across_groups"


def _exact(value: Any) -> Any:
    """A group override's value as a cache key that tells every two values apart: a tensor by its dtype and entries
    (read on the host: groups are resolved when made or loaded, never in a step), anything else by its repr."""
    if isinstance(value, Tensor):
        return ("tensor", str(value.dtype), tuple(value.detach().cpu().reshape(-1).tolist()))
    return repr(value)


def _config_key(key: Any) -> bool:
    """Whether a key set on a live group is a config key (dotted, or one of the config's top-level names but the
    group's own ``lr`` and ``weight_decay``): one of its overrides, as when the group was made. Other keys
    (a scheduler's ``initial_lr``, ``max_lr``, SWALR's ``swa_lr``) are the group's own."""
    return isinstance(key, str) and key not in _RESERVED and ("." in key or key in _TOP_LEVEL_KEYS)


#: :class:`KronConfig`'s top-level names that a group key may set (not the rate and decay, which the group holds)
_TOP_LEVEL_KEYS = frozenset(f.name for f in attrs.fields(KronConfig)) - {"lr", "weight_decay"}


def _overrides_record(group: Mapping[str, Any]) -> dict[str, Any]:
    """What a group's ``overrides`` held when its config was resolved: its values, a list's or a dict's copied (an
    edit in place must show), anything else the object itself."""
    return {k: _copied(v) for k, v in (group.get("overrides") or {}).items()}


def _schedule(cfg: KronConfig, fallback: bool) -> dict[str, Any]:
    """A group's :data:`SCHEDULABLE` keys in ``cfg``, as its overrides name them: the main pipeline's, and in a
    fallback group its fallback's too (``fallback.…``; a loop that edits the schedule of every group sets the
    main's keys there as well, which a template must hold for torch's full-state load). A key whose stage has
    no such field (``factors.beta`` of a pipeline without factors) is left out."""
    out: dict[str, Any] = {}
    for prefix, stages in (("", cfg), ("fallback.", cfg.fallback))[: 2 if fallback else 1]:
        for key in SCHEDULABLE:
            slot, _, field = key.partition(".")
            stage = getattr(stages, slot, None)
            if stage is not None and attrs.has(type(stage)) and field in attrs.fields_dict(type(stage)):
                out[prefix + key] = getattr(stage, field)
    return out


def _unedited_schedule_dropped(groups: list[dict[str, Any]], kron: Any) -> list[dict[str, Any]]:
    """The saved groups without the schedule keys that hold the saved config's own values (what every state dict
    records, edited or not: :meth:`KronOptimizer._schedule_of`), so that a load keeps this optimizer's schedule
    where the saved run did not edit its own, as it keeps every other key of its config. Only where the dict
    carries its config (``kronopt``): a dict of ``torch.distributed.checkpoint`` does not, and its schedule is
    taken as saved."""
    try:
        saved = from_dict(kron["config"])
    except Exception:  # no config section, or one this process cannot build (a plugin missing): keep them
        return groups
    out = []
    for g in groups:
        overrides = g.get("overrides")
        if isinstance(overrides, dict) and overrides:
            own = _schedule(saved, g.get("pipeline", "main") != "main")
            kept = {k: v for k, v in overrides.items() if not (k in own and _same_as_recorded(v, own[k]))}
            g = {**g, "overrides": kept}
        out.append(g)
    return out


def _copied(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return type(value)(map(_copied, value))
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def _same_as_recorded(value: Any, recorded: Any) -> bool:
    """Whether an override's value is the one recorded (by identity, or equal contents of a list or dict: a step's
    test, no tensor read)."""
    if value is recorded:
        return True
    if isinstance(value, list | tuple | dict) and type(value) is type(recorded) and len(value) == len(recorded):
        if isinstance(value, dict):
            return value.keys() == recorded.keys() and all(_same_as_recorded(value[k], recorded[k]) for k in value)
        return all(map(_same_as_recorded, value, recorded))
    return not isinstance(value, Tensor) and type(value) is type(recorded) and isinstance(value, int | float | str | bool) and value == recorded


def _overrides_key(overrides: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A group's overrides as the key of the config resolved from them (:func:`_exact` of each value)."""
    return tuple((k, _exact(v)) for k, v in sorted(overrides.items()))


def _staggers(cfg: KronConfig) -> bool:
    """Whether a group of ``cfg`` spreads its blocks' refreshes over phases (a staggered schedule, a basis that
    refreshes)."""
    return isinstance(cfg.refresh, Staggered) and cfg.refresh.phases() > 1 and not capabilities(cfg.basis).static


def _schedule_key(refresh: Any) -> Any:
    """What groups whose blocks are staggered together share: an equal refresh schedule (its own object where the
    stage cannot be hashed, a plugin's that is not frozen)."""
    try:
        hash(refresh)
    except TypeError:
        return ("unhashable", id(refresh))
    return refresh


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


#: blocks of at least this many entries take the CPU's block-by-block AdamW (smaller ones: the stacks).
#: Every size does: the block loop ran faster than the stacks' path for buckets of 1 to 256 blocks of
#: 64 to 12288 entries (20–35 % for a few blocks; even at 256 blocks of 64 entries). Other devices
#: keep the stacks; tests force them on the CPU by raising this bound.
_BLOCKWISE_MIN = 1
#: whether proven-finite AdamW blocks on the CPU go through torch's fused AdamW kernel (else block by block)
_FUSED_ADAMW = True
#: whether plain AdamW keeps its scratch tensors between steps on a CPU (:meth:`KronOptimizer._scratch`), where a
#: fresh tensor of a few MiB costs a pass over it; other devices' caching allocators hand blocks back for nothing
_CPU_KEEPS_SCRATCH = True
#: whether a CPU steps plain Muon buckets block by block around one batched iteration
#: (:meth:`KronOptimizer._step_plain_muon`); the test of the general path turns it off
_PLAIN_MUON_CPU = True
#: plain AdamW blocks of at most this many entries have their extremes read together, across buckets
#: (:meth:`KronOptimizer._adam_bounds_small`); a larger block's are read right before its work, in cache
_ADAM_BOUNDS_TOGETHER_MAX = 1 << 14
#: from this many such blocks in a step their verdicts are made together on tensors (compose.adam_blocks_are_safe),
#: which costs a dozen calls whatever their number; fewer are judged one by one in Python
_ADAM_VERDICTS_TOGETHER_MIN = 64
#: there, a bucket of at least this many blocks, all small, has its moments' extremes read off its stacks
#: (three reductions) instead of block by block
_ADAM_STACK_EXTREMES_MIN = 8
#: on a CPU, preconditioned buckets whose blocks hold at most this many entries, none of whose sides is longer
#: than ``_SMALL_TOGETHER_MAX_SIDE``, step together (:meth:`KronOptimizer._step_small_buckets`); 0 turns it off
_SMALL_TOGETHER_MAX = 1 << 14
_SMALL_TOGETHER_MAX_SIDE = 512
#: the buckets stepped together hold their new states at once: they go in runs of at most this many
#: entries, counted over their blocks as a gradient and its two factors (``m n + m² + n²``)
_SMALL_TOGETHER_BUDGET = 1 << 22


@attrs.define(eq=False)
class _Bucket:
    """Blocks stacked for one batched pipeline run: same pipeline config, block shape, sides, dtype, device.

    ``group`` is the param group whose config the bucket steps with; its blocks may come from several groups
    whose configs agree but for ``lr`` and ``weight_decay`` (``groups``), each written with its own group's."""

    group: int
    params: list[Tensor]
    specs: list[BlockSpec]
    layout: Layout
    state_dtype: torch.dtype
    state: compose.BucketState | None = None
    nonfinite: Tensor | None = None  # (b) count of skipped non-finite gradient blocks
    #: with work sharding: every rank's blocks (``params`` are this rank's, the ones stacked); with
    #: FSDP2 (DTensor parameters) a :class:`~kronopt.distributed.ShardPlan`
    plan: distributed.GatherPlan | distributed.ShardPlan | None = None
    #: what :meth:`KronOptimizer._bind` put into each parameter's ``state[p]``: its tensors, by key
    views: list[tuple[Tensor, tuple[str, ...], tuple[Tensor, ...]]] | None = None
    #: what a bucket joined with this one must share beside its dtypes, device and counters (group, layout but
    #: the batch) and whether it is a block-by-block AdamW bucket on a CPU (:meth:`KronOptimizer._join`)
    join_base: tuple[Any, ...] | None = None
    #: the bytes of one block's state (:func:`_block_state_bytes`), once something asked (the bucket cap);
    #: carried to the parts a split or a join makes of the same blocks, so none is measured again
    block_bytes: int | None = None
    #: each block's param group (by position in :attr:`blocks`) where they are not all :attr:`group`'s
    #: (:meth:`KronOptimizer._make_buckets`), else ``None``
    groups: list[int] | None = None
    #: a plain AdamW bucket's second-moment stack (weakly) and its version counter as its last step left them, every
    #: block written (:meth:`KronOptimizer._step_plain_adams`): while they hold its entries are at least 0, which the
    #: proofs take, and its small blocks are not read for one below 0 (an edit of ``state[p]``, a load or another path's
    #: step moves the version: the next step reads them)
    nonnegative_v: "_Seen | None" = attrs.field(default=None, init=False)
    #: :attr:`runs`, made once
    _runs: list[tuple[int, int, int]] | None = attrs.field(default=None, init=False)

    def subset(self, keep: list[int], plan: "distributed.GatherPlan | distributed.ShardPlan | None" = None, **layout: int) -> "_Bucket":
        """The stateless bucket of the blocks at ``keep`` (positions in :attr:`params`), with ``plan``;
        ``layout`` overrides layout fields beyond the batch (FSDP2's padded row count ``m``)."""
        groups = self.groups
        if groups is not None:  # by position in the new bucket's blocks: its plan's, or the kept params
            if plan is None:
                groups = [groups[i] for i in keep]
            else:
                at = {id(p): i for i, p in enumerate(self.blocks)}
                groups = [groups[at[id(p)]] for p in plan.params]
        return _Bucket(
            group=groups[0] if groups else self.group,
            params=[self.params[i] for i in keep],
            specs=[self.specs[i] for i in keep],
            layout=attrs.evolve(self.layout, batch=len(keep), **layout),
            state_dtype=self.state_dtype,
            plan=plan,
            block_bytes=None if layout else self.block_bytes,  # a block of another shape holds another state
            groups=_mixed(groups),
        )

    def group_of(self, i: int) -> int:
        """The param group of the ``i``-th block of :attr:`blocks`."""
        return self.group if self.groups is None else self.groups[i]

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """``(group, lo, hi)``: :attr:`blocks` ``[lo:hi]`` are that group's, in order; one run unless :attr:`groups`."""
        if self._runs is None:
            groups = self.groups or [self.group] * len(self.blocks)
            edges = [0, *(i for i in range(1, len(groups)) if groups[i] != groups[i - 1]), len(groups)]
            self._runs = [(groups[lo], lo, hi) for lo, hi in zip(edges[:-1], edges[1:])] if groups else []
        return self._runs

    @property
    def fsdp(self) -> distributed.ShardPlan | None:
        """The FSDP2 plan of a bucket of DTensor parameters (``None`` otherwise)."""
        return self.plan if isinstance(self.plan, distributed.ShardPlan) else None

    @property
    def blocks(self) -> list[Tensor]:
        """Every parameter of the bucket, this rank's and (with work sharding) the other ranks'."""
        return self.plan.params if self.plan is not None else self.params

    @property
    def block_specs(self) -> list[BlockSpec]:
        """The :class:`BlockSpec` of each of :attr:`blocks`."""
        return self.plan.specs if self.plan is not None else self.specs


@attrs.define(eq=False)
class _GradChecks:
    """One device's check of a step's gradients (:meth:`KronOptimizer._all_finite`), a row per gradient: its
    smallest and largest entries ``extremes (k, 2)``, its finiteness flag ``each (k)`` and, where a verdict is read on
    the host for free (a CPU), the flags as read (``read``; else ``None``)."""

    extremes: Tensor
    each: Tensor
    read: list[bool] | None
    #: :attr:`extremes` read on the host, once something asked (:meth:`abs_bound`)
    _host: list[list[float]] | None = attrs.field(default=None, init=False)

    def abs_bound(self, k: int) -> float:
        """``max |g|`` of row ``k``'s gradient, read on the host (the table once, at the first call; NaN where it
        holds one)."""
        if self._host is None:
            self._host = self.extremes.tolist()
        return _abs_bound(*self._host[k])

    @staticmethod
    def rows(hits: "Sequence[tuple[_GradChecks, int]]", field: str) -> Tensor:
        """The rows ``hits`` (tables and rows, :meth:`KronOptimizer._checked`) of ``field`` stacked in order: a slice
        of one table where they are its rows in turn (nearly always: a bucket's gradients were checked in its
        order), else a stack of the rows (an index made from a list would wait for an accelerator); the same
        values either way."""
        table, first = hits[0]
        if all(t is table and k == first + j for j, (t, k) in enumerate(hits)):
            return getattr(table, field)[first : first + len(hits)]
        return torch.stack([getattr(t, field)[k] for t, k in hits])


def _groups_of(parts: "Sequence[tuple[_Bucket, Sequence[int]]]") -> list[int]:
    """The param group of each block of one bucket holding each ``(bucket, positions)``'s blocks at those positions, in
    turn (the first is the group it steps with, :attr:`_Bucket.group`; :func:`_mixed` gives its :attr:`_Bucket.groups`)."""
    return [b.group_of(i) for b, at in parts for i in at]


def _mixed(groups: list[int] | None) -> list[int] | None:
    """Blocks' param groups as :attr:`_Bucket.groups` keeps them: ``None`` where they are all one group's."""
    return groups if groups and any(g != groups[0] for g in groups) else None


@attrs.define(eq=False)
class _Run:
    """One bucket's pipeline run, before its verdicts and writes (:meth:`KronOptimizer._run`): the blocks'
    gradient flags ``ok``, the state it started from and the new one, the direction ``D`` (``None`` on a
    call that writes no parameter) and the factor updates left to the state write."""

    bucket: "_Bucket"
    cfg: KronConfig
    ok: Tensor
    old: compose.BucketState
    new: compose.BucketState
    D: Tensor | None
    defer: list[linalg.DeferredWrite] | None
    #: the new state walked against the old before the verdicts (:func:`compose.stage_write`; ``None``: not
    #: walked, or a field is replaced), which the finiteness test and the write share
    staged: compose.StagedWrite | None = None
    #: where the run updated its rotated Adam moments in their stacks (:meth:`KronOptimizer._in_place_proof`), each
    #: block's ``(max |H|, max |m|, max v)`` its proof used, or its ``eigenvalue`` rule's momentum
    #: (:meth:`KronOptimizer._momentum_proof`), each block's ``(max |x|, max |m|)``; else ``None``
    in_place: list[tuple[float, ...]] | None = None

    def changed(self) -> list[Tensor]:
        """The floating tensors the run made (its new state's and its direction): what its verdict tests. Walks
        the state once for this and the write (:attr:`staged`) where the step replaces no field. A run made in
        place (:attr:`in_place`) was proven finite beforehand, its direction included: nothing of it is tested but
        what its state holds new beside the moments (nothing, :func:`compose.rotated_adams`)."""
        D = None if self.in_place is not None else self.D
        self.staged = compose.stage_write(self.old, self.new)
        if self.staged is None:
            return compose.changed_tensors(self.new, self.old, D)
        return self.staged.changed(D)


def _untested_basis_not_finite(run: _Run) -> bool:
    """Whether a run made together (:func:`compose.rotated_adams`) replaced its basis, whose refresh left its new one
    untested there (:attr:`StepContext.finite_fallback`), with one holding a non-finite entry: only such a call comes
    out otherwise through the pipeline, whose refresh keeps those blocks' old basis (any other non-finite tensor of a
    run is the pipeline's too)."""
    basis = run.new.basis
    if basis is run.old.basis:
        return False
    tensors = [t for t in (basis.Q_L, basis.Q_R, basis.lam_L, basis.lam_R) if t is not None]
    return bool(tensors) and not bool(linalg.all_finite(tensors))


class _Pending:
    """A device value on its way to the host, read without a synchronisation.

    On a GPU the value is copied into pinned memory with ``non_blocking=True`` and an
    event is recorded; it is read once the event has completed (checked at the
    next step with ``Event.query()``, which does not block). ``params`` are the
    parameters of a finiteness mask, in its order, and ``group`` their param group
    (``params`` is ``None`` for the skipped-steps counter); ``step_ok``, under
    ``nonfinite_scope = "step"``, the step's own flag, carried to the host the same way.
    """

    def __init__(
        self, params: list[Tensor] | None, value: Tensor, step: int, *, group: int = 0, step_ok: Tensor | None = None
    ) -> None:
        self.params, self.group, self.step, self.whole_step = params, group, step, step_ok is not None
        self.events: list[Any] = []
        self.value = self._to_host(value)
        # under nonfinite_scope = "step" the step's own flag travels too, on its own device: the report
        # tells a step skipped whole (a non-finite gradient somewhere) from blocks skipped alone (an overflow)
        self.step_ok = None if step_ok is None else self._to_host(step_ok.reshape(1))

    def _to_host(self, value: Tensor) -> Tensor:
        """``value`` itself off CUDA; else a pinned copy on its way, with an event recorded after it."""
        if not value.is_cuda:
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(value.device))
        self.events.append(event)
        return host

    def result(self, *, wait: bool) -> Tensor | None:
        for event in self.events:
            if wait:
                event.synchronize()
            elif not event.query():
                return None
        return self.value


def _numbers_config(raw: Any) -> Any:
    """A saved config without the keys that do not change the numbers (:data:`_SAME_NUMBERS`: ``[distributed]``,
    ``bucket_cap_mib``; options left unread, :func:`_without_unread`), to compare a saved config with the running
    one. Keys a saved config
    lacks (written before they existed, e.g. ``[storage]``) take their defaults."""
    if isinstance(raw, dict):
        try:
            cfg = from_dict(without_fallback_settings(raw))
            # the ties bound (factors.beta = "beta2", post.graft_betas[0] = "momentum"): a tie and the number it
            # stands for step alike (the shampoo preset's graft β₁ was written as 0.95 before it was tied)
            bound = attrs.evolve(cfg.bound(), fallback=None if cfg.fallback is None else cfg.fallback.bound())
            raw = to_dict(bound)
        except ConfigError:  # e.g. a plugin stage not installed here: compare as saved
            pass
    if not isinstance(raw, dict):
        return raw
    kept = _without_unread({k: v for k, v in raw.items() if k not in _SAME_NUMBERS})
    if isinstance(kept.get("fallback"), dict):  # a [fallback] table's cap is ignored
        kept["fallback"] = _without_unread({k: v for k, v in kept["fallback"].items() if k not in _SAME_NUMBERS})
    return _typed(kept)


def _without_unread(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the stage options its other options leave unread: projector splitting's
    ``power_iters`` where its ``init_solver`` is not ``"power"`` (its default changed from 20 to 100; the SVD
    reads none of it)."""
    factors = raw.get("factors")
    if isinstance(factors, dict) and factors.get("type") == "projector_splitting" and factors.get("init_solver", "svd") != "power":
        return {**raw, "factors": {k: v for k, v in factors.items() if k != "power_iters"}}
    return raw


#: top-level keys that change no number of the trajectory: sharding gives the same parameters, and a
#: bucket cap steps each block as it would in one bucket
_SAME_NUMBERS = ("distributed", "bucket_cap_mib")


def _typed(value: Any) -> Any:
    """``value`` with each number paired with its type, so that comparing two configs tells ``1`` from ``1.0``
    (``split.rank``: one direction, or the whole side)."""
    if isinstance(value, Mapping):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_typed(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (type(value).__name__, value)
    return value


#: as torch.optim refuses a group's set: the order of a group's parameters names them in the state dict
_UNORDERED = "a group's parameters must come in an order (a list or tuple), not a set: the state dict names them by position"


def _normalize_groups(params: Any, *, first: int = 0) -> list[dict[str, Any]]:
    """The user's parameters as groups (``first``: the index the first of them will have)."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a single tensor")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    for gi, g in enumerate(groups):
        ps = g["params"]
        if isinstance(ps, (set, frozenset)):
            raise TypeError(_UNORDERED)
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        if ps and isinstance(ps[0], tuple):
            g["param_names"] = [name for name, _ in ps]
            ps = [p for _, p in ps]
        if len({id(p) for p in ps}) != len(ps):
            # torch.optim warns that this will be an error; here each listing would be a block of its own, with
            # its own state, stepping the tensor twice per step
            raise ValueError("a parameter group lists a parameter more than once: list each tensor once")
        for j, p in enumerate(ps):
            # a complex parameter has no real factors; a frozen one of any dtype is kept and never stepped (as
            # torch.optim keeps it: an integer tensor cannot require a gradient), _make_buckets leaves it out
            name = g["param_names"][j] if "param_names" in g else f"param_groups[{first + gi}].params[{j}] {tuple(p.shape)}"
            if not p.is_floating_point() and p.requires_grad:
                raise TypeError(
                    f"{name} is a {p.dtype} tensor that requires a gradient: kronopt steps real floating-point "
                    "parameters (float16, bfloat16, float32, float64)"
                )
            if p.layout is torch.strided and p.requires_grad and any(st == 0 and n > 1 for st, n in zip(p.stride(), p.shape)):
                # an expanded view: one entry stands for several, and every in-place write of a step fails on it
                raise ValueError(
                    f"{name} is an expanded view (stride {tuple(p.stride())}): several of its entries are one memory "
                    "location, which no step can write apart; make it a Parameter of its own memory (.clone())"
                )
        g["params"] = ps
    return groups


def _rates(group: dict[str, Any]) -> tuple[Any, Any]:
    """A group's ``lr`` and ``weight_decay`` as the step uses them: a one-entry tensor on the CPU read as a
    float (free; torch's fused AdamW kernel and the shared factor cache take floats), any other value as
    it is (a tensor on an accelerator is not read, which would synchronise)."""

    lr, weight_decay = group["lr"], group["weight_decay"]
    if type(lr) in _PLAIN_NUMBERS and type(weight_decay) in _PLAIN_NUMBERS:  # nearly always: no more than this test
        return lr, weight_decay
    return _as_rate(lr), _as_rate(weight_decay)


#: the types of rates the step takes as they are
_PLAIN_NUMBERS = (float, int)


def _as_rate(x: Any) -> Any:
    """A one-entry CPU tensor or a real number of another type (NumPy's, ``Fraction``) as its float; a tensor
    elsewhere as it is (reading it would synchronise). :meth:`KronOptimizer._check_rates` refused anything else."""
    if isinstance(x, Tensor):
        return float(x) if one_cpu_number(x) else x
    return float(x)


def _agreed(like: Tensor, owned_ok: Tensor | None, owned: Sequence[int], group: Any) -> Tensor:
    """Each block's owner's verdict ``(b)`` on every rank: ``owned_ok`` for the blocks at positions ``owned`` (this
    rank's), True elsewhere, and one ``all_reduce`` (MIN) over the ranks. ``nonfinite = "raise"`` only, where every
    rank must raise alike for an overflow only its owner saw."""
    flags = torch.ones(like.shape, dtype=torch.uint8, device=like.device)
    if owned_ok is not None and len(owned):
        flags[torch.tensor(list(owned), device=like.device)] = owned_ok.to(torch.uint8)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=group)
    return flags.bool()


def _without_top_level_only(group: Any) -> Any:
    """A saved param group without the :data:`_TOP_LEVEL_ONLY` keys in its ``overrides``: kronopt before they were
    refused took them there and saved them, though the step never read them (it reads the optimizer's own config),
    so dropping them loads such a checkpoint as it ran."""
    overrides = group.get("overrides") if isinstance(group, Mapping) else None
    if not isinstance(overrides, Mapping) or not any(k.partition(".")[0] in _TOP_LEVEL_ONLY for k in overrides):
        return group
    kept = {k: v for k, v in overrides.items() if k.partition(".")[0] not in _TOP_LEVEL_ONLY}
    return {**group, "overrides": kept}


_CHECK_DUE = "skipped_steps_due"  # the state dict's flag: the counter's check was queued for the next step


def _saved_skipped(kron: Mapping[str, Any] | None) -> Tensor | None:
    """A state dict's count of consecutive skipped steps (``kronopt["skipped_steps"]``) as a 0-d int64 tensor, or
    ``None`` where it has none: a tensor of one integer entry, or a non-negative ``int`` (a dict that went through
    JSON or a hand's edit); anything else raises ``ValueError`` naming it."""
    value = None if kron is None else kron.get("skipped_steps")
    if value is None:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool:
        if int(value) >= 0:  # read once, at a load
            return value.reshape(()).to(torch.int64)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return torch.tensor(value, dtype=torch.int64)
    raise ValueError(
        f"the state dict's kronopt['skipped_steps'] is {value!r}: it must be the count of consecutive skipped steps, "
        "a one-entry integer tensor or a non-negative int"
    )


#: groups whose configs differ in their rates alone share buckets (:meth:`KronOptimizer._sharing`); off: a bucket per group
_BUCKETS_ACROSS_GROUPS = True

#: the config keys a bucket's blocks may hold apart: the step reads them from each block's param group
_RATE_KEYS = frozenset({"lr", "weight_decay"})


def _differ_in_rates_alone(a: KronConfig, b: KronConfig) -> bool:
    """Whether the pipelines of two group configs step alike, ``lr`` and ``weight_decay`` apart (a main group's
    ``fallback`` table is not its pipeline's: :func:`changed_keys` leaves it out)."""
    return a is b or set(changed_keys(a, b)) <= _RATE_KEYS


def _rate_args(group: dict[str, Any]) -> dict[str, Any]:
    """:func:`_rates` as ``Post.apply_``'s keywords."""
    lr, weight_decay = _rates(group)
    return {"lr": lr, "weight_decay": weight_decay}


#: config keys a param group may not set: the step reads them from the optimizer's own config alone
_TOP_LEVEL_ONLY = ("distributed", *FALLBACK_AT_DEFAULT)


class KronOptimizer(torch.optim.Optimizer):
    """A composed matrix-aware optimizer; build one with :func:`kronopt.build`.

    Args:
        params: tensors, ``(name, tensor)`` pairs (enables routing by name), or
            param-group dicts. A group may set ``lr``, ``weight_decay`` and any
            dotted config key (``"refresh.every": 5``); it is validated like the
            config.
        config: the resolved :class:`~kronopt.config.KronConfig`.

    Each user group becomes a ``"main"`` group and, when the route sends some of
    its parameters away, a ``"fallback"`` group (its own ``lr``/``weight_decay``
    from ``[fallback]``), so LR schedulers scale both.
    """

    #: see _start; the class default stands in for an optimizer pickled before the attribute existed
    _unstepped_placement: tuple[tuple[torch.device, torch.dtype, torch.Size], ...] | None = None
    #: whether a bucket was ever split (or loaded, perhaps split): only then does a step look for parts to join
    _fragmented: bool = False
    #: ``_step`` marked for dynamo to run eagerly, with the reason it gives (:func:`_mark_eager_step`)
    _eager_step: Callable[..., Any] | None = None

    def __init__(self, params: Iterable[Any], config: KronConfig) -> None:
        self.config = config
        self._resolved: dict[str, KronConfig] = {}  # per-group overrides → config, resolved once
        split_groups: list[dict[str, Any]] = []
        errors: list[tuple[str, str]] = []
        for gi, g in enumerate(_normalize_groups(params)):
            try:
                split_groups.extend(self._split_user_group(g))
            except ConfigError as exc:
                errors.extend((f"param_groups[{gi}].{p}" if p else f"param_groups[{gi}]", m) for p, m in exc.errors)
        if errors:
            raise ConfigError(errors)
        self._group_cfgs: list[KronConfig] = []
        self._phased: dict[tuple[int, int], KronConfig] = {}  # (group, phase) → config at that refresh phase
        super().__init__(split_groups, {"lr": config.lr, "weight_decay": config.weight_decay})
        self._sharding = distributed.current(enabled=config.distributed.shard_work)
        # torch's fused AdamW kernel rounds otherwise than the general path, which work sharding's
        # owners run: with several ranks, both settings of shard_work keep to the general path's bits
        self._fuse_adamw = _FUSED_ADAMW and distributed.current(enabled=True) is None
        _mark_eager_step()
        self._start()
        self._note_overrides()

    def _start(self) -> None:
        """Every bucket with fresh state, as built: at construction, and where ``self.state`` was cleared (:meth:`_check_state`)."""
        self._owner: dict[int, int] = {}  # id(param) → owner rank (work sharding)
        self._loads: list[int] | None = None  # the ranks' assigned cost (work sharding)
        self._fsdp_loads: list[int] | None = None  # FSDP2 on a mesh of another size than the plain blocks' world
        self._phases_across = True  # staggered phases balanced over the groups of a schedule (a dict saved before: per group)
        self.__dict__.pop("_group_classes", None)
        self._buckets = self._shard(
            self._make_buckets(self.param_groups, self._group_cfgs, self._cap, classes=self._classes), assign=True
        )
        self._note_non_float()
        self._pending: list[_Pending] = []
        self._skipped_steps: Tensor | None = None  # consecutive skipped steps (scope "step"), on the device
        self._materialize()
        self._seen_state()
        # where each parameter lived when its state was made; until the first step or load, a model moved or cast
        # since (``model.cuda()``, ``model.double()`` after the optimizer was built, as torch.optim allows, whose
        # state is made at the first step) has its state made again, where the parameters are now (_check_state)
        self._unstepped_placement: tuple[tuple[torch.device, torch.dtype, torch.Size], ...] | None = self._placement()

    def _placement(self) -> tuple[tuple[torch.device, torch.dtype, torch.Size], ...]:
        """Where each parameter lies, its dtype and its shape: one changed before the first step (a model moved,
        cast, or given another ``param.data``) makes the state anew (:meth:`_check_state`)."""
        return tuple((p.device, p.dtype, p.shape) for g in self.param_groups for p in g["params"])

    def _seen_state(self) -> None:
        """Note ``self.state`` as kronopt left it (the dict and its number of entries) and which parameters the
        groups list, for :meth:`_check_state`."""
        self._state_seen = (self.state, len(self.state))
        self._listed = [list(g["params"]) for g in self.param_groups]

    def _check_state(self) -> None:
        """Start afresh where ``self.state`` was emptied or replaced by an empty dict since kronopt last left it
        (``opt.state.clear()``, torch.optim's way to reset an optimizer, which restarts AdamW); refuse a state
        that lost only some entries: each is a view of its bucket's stacks, which would go on without it."""
        listed = self.__dict__.get("_listed")
        if listed is not None and (
            len(listed) != len(self.param_groups)
            or any(len(a) != len(g["params"]) or not all(map(operator.is_, a, g["params"])) for a, g in zip(listed, self.param_groups))
        ):
            if self._groups_in_buckets():  # add_param_group run with a wrapper as ``self`` (Lightning, Fabric)
                self.__dict__.pop("_group_classes", None)  # the wrapper's groups are the optimizer's now
                self._note_non_float()
                self._listed = [list(g["params"]) for g in self.param_groups]
                listed = None
        if listed is not None and (
            len(listed) != len(self.param_groups)
            or any(len(a) != len(g["params"]) or not all(map(operator.is_, a, g["params"])) for a, g in zip(listed, self.param_groups))
        ):
            raise RuntimeError(
                "a parameter was added to, taken from or replaced in optimizer.param_groups[...]['params'] directly; kronopt stacks "
                "a group's parameters when the group is added: use optimizer.add_param_group for new parameters"
            )
        seen, size = self.__dict__.get("_state_seen", (self.state, 0))
        placed = self.__dict__.get("_unstepped_placement")
        if placed is not None and self.state is seen and len(self.state) == size and placed != self._placement():
            self._check_routes()  # a shape changed: its route must not
            self.state = collections.defaultdict(dict)  # moved, cast or reshaped before the first step: the state made anew
            self._start()
            return
        if self.state is seen and len(self.state) < size:
            self._restore_deleted()  # del state[p] (or pop): as torch.optim, that parameter starts afresh
        if self.state is seen and len(self.state) >= size:
            self._adopt_replaced()
            return
        if len(self.state) == 0:
            self.state = collections.defaultdict(dict)
            self._start()
            return
        raise RuntimeError(
            f"optimizer.state lost entries ({size} → {len(self.state)}) or was replaced: kronopt keeps each parameter's "
            "state as views of its bucket's stacks; set state[p] = {} to start one parameter afresh, clear all of "
            "optimizer.state to start every one afresh, or load a state dict"
        )

    def _note_overrides(self) -> None:
        """Record each group's ``overrides`` as its config was resolved from them (:meth:`_check_overrides`)."""
        self._overrides_seen = [_overrides_record(g) for g in self.param_groups]

    def _check_overrides(self) -> None:
        """Take up the edits of the groups' ``overrides`` made since their configs were resolved (a config key set
        on the group itself, dotted or one of the config's top-level names, is moved into them, as when the group
        was made): a :data:`SCHEDULABLE` key (f, its offset, ρ) steps with its new value from this step on, but
        where the refresh is staggered (its phases are laid out when the group is made); an edit of any other
        key, or one the config refuses, raises ``ConfigError`` naming each and changes nothing (the next step
        refuses again until it is undone). A fallback group's keys are named as the user writes them
        (``fallback.…``); a main group's ``fallback.…`` keys belong to its fallback group, which steps those
        parameters. A step's cost is a look at each override's value (no tensor read)."""
        # every problem of every group in one error: torch.optim's keys, then each edited group's
        errors: list[tuple[str, str]] = [
            (f"param_groups[{i}].{k}", f"torch.optim's {k!r} is no kronopt group key (set on the group after it was "
             "made, it would step as if it were not there): remove it; the stages' own (inner.betas, inner.eps, …) "
             "are fixed when the group is made")
            for i, g in enumerate(self.param_groups)
            for k, v in g.items() if k in _TORCH_OPTIM_KEYS and v is not False and v is not None
        ]
        for g in self.param_groups:
            if any(map(_config_key, g)):
                moved = {k: g.pop(k) for k in [k for k in g if _config_key(k)]}
                g["overrides"] = {**(g.get("overrides") or {}), **moved}
        seen = self.__dict__.get("_overrides_seen")
        if seen is None or len(seen) != len(self.param_groups):  # pickled before this record; groups added by a wrapper
            if errors:
                raise ConfigError(errors)
            self._note_overrides()
            return
        edited = [
            i for i, (g, was) in enumerate(zip(self.param_groups, seen))
            if not _same_as_recorded(g.get("overrides") or {}, was)
        ]
        if not edited:
            if errors:
                raise ConfigError(errors)
            return
        new: dict[int, KronConfig] = {}
        for i in edited:
            g, was = self.param_groups[i], seen[i]
            now = g.get("overrides") or {}
            where = f"param_groups[{i}]['overrides']"
            fallback = g.get("pipeline", "main") != "main"
            for key in ("lr", "weight_decay"):  # by the values given: a tensor rate a scheduler fills in place is the same
                if not _same_as_recorded(now.get(key), was.get(key)):
                    errors.append((f"{where}.{key}", f"a step reads the group's own {key!r} (param_groups[{i}][{key!r}]): set that"))
            try:
                cfg = self._group_config(g)
            except ConfigError as exc:  # no config to compare: the other edits judged by their keys
                errors += [(f"{where}.{p}" if p else where, m) for p, m in exc.errors]
                named = {p for p, _ in exc.errors}
                for key in sorted({*now, *was}, key=str):
                    if key not in named and not _same_as_recorded(now.get(key), was.get(key)):
                        if (problem := _edit_problem(key, fallback)) is not None:
                            errors.append((f"{where}.{key}", problem))
                continue
            old = self._group_cfgs[i]
            # each changed key as the group's overrides name it: a fallback group's own are fallback.…, its other keys
            # the main pipeline's (which its copy of the overrides also holds); a main group's fallback.… its fallback's
            edits = [f"fallback.{k}" if fallback else k for k in changed_keys(old, cfg)]
            if fallback:
                edits += changed_keys(self._with_overrides(was), self._with_overrides(now))
            elif old.fallback is not None or cfg.fallback is not None:
                edits += [f"fallback.{k}" for k in (changed_keys(old.fallback, cfg.fallback) if old.fallback and cfg.fallback else [""])]
            staggered = _staggers(old) or _staggers(cfg)
            for key in dict.fromkeys(edits):
                if (problem := _edit_problem(key, fallback)) is not None:
                    errors.append((f"{where}.{key.rstrip('.')}", problem))
                elif staggered and key.removeprefix("fallback.").startswith("refresh.") and key.startswith("fallback.") == fallback:
                    errors.append((f"{where}.{key}", "a staggered refresh lays its blocks' phases out over the period when the group is made"))
            new[i] = cfg
        if errors:
            raise ConfigError(errors)
        for i, cfg in new.items():
            self._group_cfgs[i] = cfg
        self._regroup()
        self._phased = {k: v for k, v in self._phased.items() if k[0] not in new}
        self.__dict__.pop("_plain_adam", None)  # keyed by the configs' ids
        self.__dict__.pop("_plain_muon", None)
        keys = {_overrides_key(g.get("overrides") or {}) for g in self.param_groups}  # a schedule's old values let go
        self._resolved = {k: c for k, c in self._resolved.items() if k in keys}
        self._note_overrides()

    def _groups_in_buckets(self) -> bool:
        """Whether the groups list exactly the parameters the buckets stack, each in a bucket of its own group (those
        with no elements or not floating point in none): the groups as :meth:`add_param_group` left them, also where a
        wrapper ran it with itself as ``self`` (Lightning's ``LightningOptimizer`` and Fabric's optimizer forward
        attributes to the optimizer or copy its ``__dict__``), which noted the new groups on the wrapper."""
        where: dict[int, int] = {}
        for b in self._buckets:
            for i, p in enumerate(b.blocks):
                if id(p) in where:
                    return False
                where[id(p)] = b.group_of(i)
        listed = 0
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.numel() == 0 or not p.is_floating_point():
                    continue
                if where.get(id(p)) != gi:
                    return False
                listed += 1
        return listed == len(where)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy (``copy.deepcopy``, ``pickle``) needs to step on exactly as this optimizer would: all of it,
        where torch's ``Optimizer`` keeps only its groups and per-parameter state (here views of the buckets'
        stacks, which the copy shares as the original does). Caches keyed by an object's ``id`` are left out
        (the copy's objects have other ids) and made again; the owners of work sharding go by parameter."""
        state = {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}
        state["_owner"] = [(p, self._owner[id(p)]) for g in self.param_groups for p in g["params"] if id(p) in self._owner]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        _mark_eager_step()
        owner = state.pop("_owner", None)
        super().__setstate__(state)
        if owner is None:  # torch's load_state_dict sets its groups and state this way: nothing more to do
            return
        self._owner = {id(p): r for p, r in owner}
        for bucket in self._buckets:  # pickled before buckets held several groups' blocks: each one group's
            if not hasattr(bucket, "groups"):  # (and its join key held a group where it now holds a class)
                bucket.groups, bucket._runs, bucket.join_base = None, None, None
        seen, size = self.__dict__.get("_state_seen", (self.state, 0))
        if self.state is not seen or len(self.state) < size:
            return  # the original's state was cleared: the copy starts afresh as it would (_check_state)
        for bucket in self._buckets:  # pickle copies each tensor apart: point state[p] at the stacks again
            if bucket.state is not None:
                self._bind(bucket)
        self._seen_state()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after construction (e.g. progressive unfreezing); routed and validated like the others."""
        if getattr(self, "_buckets", None) is None:  # inside __init__: the groups are already routed
            super().add_param_group(param_group)
            self._group_cfgs.append(self._group_config(param_group))
            return
        self._check_state()
        first, buckets = len(self.param_groups), len(self._buckets)
        try:
            for g in self._split_user_group(_normalize_groups([param_group], first=len(self.param_groups))[0]):
                super().add_param_group(g)  # raises for a parameter some group holds already
                self._group_cfgs.append(self._group_config(g))
            across = self.__dict__.get("_phases_across", False)  # an optimizer pickled before the balance over groups: per group
            self.__dict__.pop("_group_classes", None)
            new = self._make_buckets(self.param_groups, self._group_cfgs, self._cap, first=first, across=across, classes=self._classes)
            self._buckets.extend(self._shard(new, assign=True))
            self._note_non_float()
            self._materialize()
            if self._unstepped_placement is not None:
                self._unstepped_placement = self._placement()
            self._seen_state()
            seen = self.__dict__.get("_overrides_seen")
            if seen is not None and len(seen) == first:  # the older groups' records kept: an edit of theirs stays seen
                seen += [_overrides_record(g) for g in self.param_groups[first:]]
        except BaseException:  # a refused group adds nothing (its routed main group may be in already)
            kept = {id(p) for g in self.param_groups[:first] for p in g["params"]}
            for g in self.param_groups[first:]:
                for p in g["params"]:
                    if id(p) not in kept:
                        self.state.pop(p, None)
            del self.param_groups[first:], self._group_cfgs[first:], self._buckets[buckets:]
            self.__dict__.pop("_group_classes", None)
            # configs of the refused groups' refresh phases: a group added later at the same index must not find them
            self._phased = {k: v for k, v in self._phased.items() if k[0] < first}
            raise

    def _split_user_group(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        """One user group → its routed ``main`` / ``fallback`` groups (raises ConfigError)."""
        overrides = {k: v for k, v in group.items() if k not in _RESERVED}
        overrides.update(group.get("overrides", {}))
        cfg = self._with_overrides(overrides)
        for p in group["params"]:
            if _is_dtensor(p):  # FSDP2: docs/distributed.md; other placements are refused here
                distributed.check_fsdp_param(p)
        out = self._route(group, cfg, overrides)
        if "initial_lr" in group:  # a scheduler resumed with last_epoch != -1
            for g in out:
                g["initial_lr"] = group["initial_lr"] if g["pipeline"] == "main" else g["lr"]
        return out

    def _group_config(self, group: dict[str, Any]) -> KronConfig:
        """The pipeline config of a routed group, from its ``overrides`` and ``pipeline``."""
        cfg = self._with_overrides(group.get("overrides") or {})
        cfg = cfg if group.get("pipeline", "main") == "main" else cfg.fallback  # type: ignore[assignment]
        return cfg.bound()

    def _with_overrides(self, overrides: dict[str, Any]) -> KronConfig:
        """The optimizer's config with a group's overrides, resolved once per distinct set (raises ConfigError)."""
        if not overrides:
            return self.config
        top_only = [k for k in overrides if k.partition(".")[0] in _TOP_LEVEL_ONLY]
        if top_only:
            errors = [
                (k, "is read from the optimizer's own config for every parameter, not per group: set it there")
                for k in top_only
            ]
            try:  # the group's other problems too, listed together
                with_overrides(self.config, {k: v for k, v in overrides.items() if k not in top_only})
            except ConfigError as exc:
                errors += exc.errors
            raise ConfigError(errors)
        # by each value exactly: a tensor's repr rounds (tensor(0.1000) for lr 0.10004 too), which gave a group the
        # config resolved for another group's rate
        key = _overrides_key(overrides)
        if key not in self._resolved:
            self._resolved[key] = with_overrides(self.config, overrides)
        return self._resolved[key]

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def _route(group: dict[str, Any], cfg: KronConfig, overrides: dict[str, Any]) -> list[dict[str, Any]]:
        names = group.get("param_names")
        main: list[int] = []
        fallback: list[int] = []
        for i, p in enumerate(group["params"]):
            (fallback if cfg.to_fallback(p.ndim, None if names is None else names[i]) else main).append(i)
        if cfg.route.fallback_names and names is None and cfg.fallback is not None and any(group["params"][i].ndim >= 2 for i in main):
            warnings.warn(
                "the route sends embeddings/heads to the fallback by name, but the parameters have no names: "
                "every matrix goes to the main pipeline. Pass model.named_parameters() to route by name.",
                stacklevel=4,
            )
        out = []
        for pipeline, idx, c in (("main", main, cfg), ("fallback", fallback, cfg.fallback)):
            if not idx or c is None:
                continue
            g = {k: v for k, v in group.items() if k in ("params", "param_names")}
            for label in _LABELS:  # the fallback group of a named group is named apart (the frameworks want them unique)
                if label in group:
                    g[label] = group[label] if pipeline == "main" else f"{group[label]}/fallback"
            g["params"] = [group["params"][i] for i in idx]
            if names is not None:
                g["param_names"] = [names[i] for i in idx]
            g.update(lr=c.lr, weight_decay=c.weight_decay, pipeline=pipeline, overrides=dict(overrides))
            out.append(g)
        return out

    @property
    def _cap(self) -> int:
        """The most state bytes a bucket holds (config key ``bucket_cap_mib``; 0: no cap)."""
        return int(self.config.bucket_cap_mib * 2**20)

    @staticmethod
    def _make_buckets(
        groups: list[dict[str, Any]], cfgs: list[KronConfig], cap: int = 0, *, first: int = 0, across: bool = True,
        classes: Sequence[int],
    ) -> list[_Bucket]:
        """Buckets of ``groups[first:]`` (indexed from 0 in ``groups``); parameters with no elements are left out.

        A bucket's blocks share the group's :meth:`_sharing` class (``classes``, one per group: groups whose
        configs differ in ``lr`` and ``weight_decay`` alone share buckets), the layout (block shape, sides, ranks and, under
        a staggered refresh, the refresh phase: :func:`_phases`, balanced over the groups in
        order, those of one refresh schedule together, so ``groups[:first]`` count but get no
        buckets: a group added later continues their balance), the state dtype, the
        parameter dtype and the device. With a ``cap`` (bytes of state, ``bucket_cap_mib``),
        such blocks are cut, in order, into the fewest buckets of nearly equal size that each
        hold at most ``cap`` bytes of state in the compute dtype (:func:`_blocks_under`), one block at least.
        ``across = False``: each group's phases balanced apart, as before the balance over groups (a state dict
        saved then rebuilds the phases its run had).
        """
        buckets: dict[tuple[Any, ...], _Bucket] = {}
        loads: dict[Any, list[int]] = {}  # per refresh schedule, the cost in each of its phases so far
        for gi, (g, cfg) in enumerate(zip(groups, cfgs)):
            min_dtype = getattr(torch, cfg.state_dtype)
            blocks: list[tuple[Tensor, BlockSpec, Layout, torch.dtype]] = []
            for p in g["params"]:
                if p.numel() == 0 or not p.is_floating_point():  # nothing to step; a frozen non-float one (_normalize_groups)
                    continue
                spec, layout = cfg.block(tuple(p.shape))
                blocks.append((p, spec, layout, torch.promote_types(p.dtype, min_dtype)))
            count = cfg.refresh.phases() if _staggers(cfg) else 1
            schedule = _schedule_key(cfg.refresh) if across else (gi, _schedule_key(cfg.refresh))
            phases = _phases([b[2] for b in blocks], count, loads.setdefault(schedule, []) if count > 1 else None)
            if gi < first:
                continue
            for (p, spec, layout, state_dtype), phase in zip(blocks, phases):
                layout = attrs.evolve(layout, phase=phase)
                dtensor = _is_dtensor(p)
                key = (classes[gi], layout, state_dtype, p.dtype, p.device, dtensor)
                if key not in buckets:
                    buckets[key] = _Bucket(group=gi, params=[], specs=[], layout=layout, state_dtype=state_dtype, groups=[])
                buckets[key].params.append(p)
                buckets[key].specs.append(spec)
                buckets[key].groups.append(gi)  # type: ignore[union-attr]
        out = []
        for b in buckets.values():
            block = _block_state_bytes(cfgs[b.group], b.layout, b.state_dtype) if cap else None
            per = None if block is None else _blocks_under(cap, block)
            count = 1 if per is None else -(-len(b.params) // per)  # the fewest buckets under the cap
            edges = [len(b.params) * k // count for k in range(count + 1)]  # of nearly equal size
            for lo, hi in zip(edges[:-1], edges[1:]):
                out.append(
                    _Bucket(group=b.groups[lo], params=b.params[lo:hi], specs=b.specs[lo:hi], layout=b.layout,  # type: ignore[index]
                            state_dtype=b.state_dtype, block_bytes=block, groups=_mixed(b.groups[lo:hi]))  # type: ignore[index]
                )
        for b in out:
            b.layout = attrs.evolve(b.layout, batch=len(b.params))
        return out

    @staticmethod
    def _sharing(groups: list[dict[str, Any]], cfgs: list[KronConfig]) -> list[int]:
        """Each group's class for :meth:`_make_buckets`: groups of one pipeline whose configs differ in ``lr`` and
        ``weight_decay`` alone (:func:`changed_keys`; a schedule, a learning-rate decay per layer) get one class, so
        their blocks of one layout stack in one bucket, each written with its own group's rates (with
        ``_BUCKETS_ACROSS_GROUPS`` off, each group a class of its own)."""
        if not _BUCKETS_ACROSS_GROUPS:
            return list(range(len(groups)))
        firsts: list[int] = []  # each class's first group
        out = []
        for g, cfg in zip(groups, cfgs):
            pipeline = g.get("pipeline", "main")
            for c, r in enumerate(firsts):
                if groups[r].get("pipeline", "main") == pipeline and _differ_in_rates_alone(cfgs[r], cfg):
                    out.append(c)
                    break
            else:
                out.append(len(firsts))
                firsts.append(len(out) - 1)
        return out

    @property
    def _classes(self) -> list[int]:
        """:meth:`_sharing` of this optimizer's groups, made once their configs are (dropped where one changes)."""
        classes = self.__dict__.get("_group_classes", ())
        if len(classes) != len(self.param_groups):  # not made, or groups added since
            classes = self._group_classes = self._sharing(self.param_groups, self._group_cfgs)
        return classes

    def _regroup(self) -> None:
        """Cut each bucket whose groups' configs no longer agree (an edit of one group's schedule, :meth:`_check_overrides`)
        into parts of one :meth:`_sharing` class each, with their state; joins are judged anew (:meth:`_join`)."""
        self.__dict__.pop("_group_classes", None)
        classes = self._classes
        for bucket in list(self._buckets):
            bucket.join_base = None
            if bucket.groups is None:
                continue
            cuts: dict[int, list[int]] = {}
            for i, gi in enumerate(bucket.groups):
                cuts.setdefault(classes[gi], []).append(i)
            if len(cuts) > 1:
                self._cut(bucket, list(cuts.values()))

    def _fits(self, like: _Bucket, blocks: int) -> bool:
        """Whether ``blocks`` blocks of ``like``'s kind fit in one bucket under this optimizer's cap."""
        per = None if like.block_bytes is None else _blocks_under(self._cap, like.block_bytes)
        return per is None or blocks <= per

    def _bucket_config(self, bucket: _Bucket) -> KronConfig:
        """The config a bucket steps with: its group's, with the refresh schedule at the bucket's phase."""
        cfg = self._group_cfgs[bucket.group]
        phase = bucket.layout.phase
        if phase == 0:
            return cfg
        key = (bucket.group, phase)
        if key not in self._phased:
            self._phased[key] = attrs.evolve(cfg, refresh=cfg.refresh.at_phase(phase))
        return self._phased[key]

    def _shard(self, buckets: list[_Bucket], *, assign: bool = False) -> list[_Bucket]:
        """With work sharding, each bucket (of every rank's blocks, stateless) cut to this rank's blocks plus
        its gather plan; unchanged otherwise. ``assign``: pick owners for these blocks first
        (:func:`distributed.assign`, balanced with the blocks assigned before)."""
        if any(b.params and _is_dtensor(b.params[0]) for b in buckets):
            return self._shard_fsdp(buckets, assign=assign)
        sh = self._sharding
        if sh is None:
            return buckets
        if assign:
            sizes = [(b.layout.batch, distributed.block_cost(b.layout)) for b in buckets]
            owners, self._loads = distributed.assign(sizes, sh.world_size, self._loads)
            for b, own in zip(buckets, owners):
                self._owner.update((id(p), r) for p, r in zip(b.params, own))
        out = []
        for b in buckets:
            plan = distributed.GatherPlan(
                params=b.params, specs=b.specs, owners=[self._owner[id(p)] for p in b.params], sharding=sh
            )
            out.append(b.subset(plan.owned(), plan))
        return out

    def _shard_fsdp(self, buckets: list[_Bucket], *, assign: bool = False) -> list[_Bucket]:
        """:meth:`_shard` for a list holding buckets of DTensor (FSDP2) parameters: each gets a
        :class:`~kronopt.distributed.ShardPlan`; the others are sharded as usual, in order.

        Every block gets an owner (:func:`distributed.assign`, balanced by cost with every
        other block) except in elementwise buckets (:func:`distributed.is_elementwise`),
        where every rank steps its own rows: there the bucket stacks every block, in the
        rank's local layout (``m`` = its padded row count).
        """
        dtensor = [b for b in buckets if b.params and _is_dtensor(b.params[0])]
        sharding = distributed.fsdp_sharding(dtensor[0].params[0])
        for b in dtensor:
            for p in b.params:
                other = distributed.fsdp_sharding(p)
                if (other.world_size, other.rank) != (sharding.world_size, sharding.rank) or other.group != sharding.group:
                    raise ValueError("kronopt steps DTensor parameters of one device mesh only; these use several")
        matrix = [b for b in dtensor if not distributed.is_elementwise(self._bucket_config(b), b.layout)]
        if assign and matrix:
            sizes = [(b.layout.batch, distributed.block_cost(b.layout)) for b in matrix]
            # one balance with the plain (DDP-sharded) blocks when they share the ranks, else its own
            shared = self._sharding is None or self._sharding.world_size == sharding.world_size
            loads = self._loads if shared else self._fsdp_loads
            owners, loads = distributed.assign(sizes, sharding.world_size, loads)
            if shared:
                self._loads = loads
            else:
                self._fsdp_loads = loads
            for b, own in zip(matrix, owners):
                self._owner.update((id(p), r) for p, r in zip(b.params, own))
        plain = iter(self._shard([b for b in buckets if not any(b is x for x in dtensor)], assign=assign))
        out = []
        for b in buckets:
            if not any(b is x for x in dtensor):
                out.append(next(plain))
                continue
            elementwise = not any(b is x for x in matrix)
            plan = distributed.ShardPlan(
                params=b.params,
                specs=b.specs,
                owners=[sharding.rank if elementwise else self._owner[id(p)] for p in b.params],
                sharding=sharding,
                elementwise=elementwise,
            )
            out.append(b.subset(plan.owned(), plan, m=plan.pad_rows if elementwise else b.layout.m))
        return out

    # -- stepping --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step over every bucket (parameters without gradients are skipped).

        Under ``torch.compile(optimizer.step)`` (torch.optim's recipe for compiling an optimizer) the step
        runs eagerly, outside the graph: dynamo cannot trace it (the config key ``compile`` compiles what
        pays, Newton–Schulz and the elementwise tail, from inside the step). Under ``fullgraph=True``, which allows
        no such break, dynamo raises, giving that reason."""
        if torch.compiler.is_compiling():
            # dynamo is tracing this frame: it runs the step it was told to leave alone eagerly, giving the reason
            return KronOptimizer._eager_step(self, closure)  # type: ignore[misc]
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the closure ran at the process's precision (the model's); the step's own products at float32's, and never
        # under the caller's autocast
        with linalg.no_autocast(), contextlib.nullcontext() if self.config.matmul_precision == "inherit" else linalg.full_float32_products():
            try:
                self._step_taken()
            finally:
                # the gradients' verdicts hold weak references to them: kept past the step, they stop torch from
                # swapping a gradient (model.to(...) under torch.__future__'s swap on conversion, a DTensor's move)
                self._grad_flags = {}
        return loss

    def _step_taken(self) -> None:
        """:meth:`_step` after the closure."""
        self._check_state()
        self._check_overrides()
        self._check_grads()
        self._check_rates()
        self._report_pending()
        raising = self.config.nonfinite == "raise"
        fsdp_ok = self._fsdp_finite()
        step_ok = self._all_finite() if raising or self.config.nonfinite_scope == "step" else None
        if fsdp_ok is not None and (raising or self.config.nonfinite_scope == "step"):
            whole = torch.stack([ok.all() for ok in fsdp_ok.values()]).all()
            step_ok = whole if step_ok is None else step_ok & whole.to(step_ok.device)
        if raising and step_ok is not None and not bool(step_ok):  # "raise": this read, and its reports at the end
            self._raise_on_nonfinite(fsdp_ok)
        if self.config.nonfinite_scope == "block":
            step_ok = None
        stepped, split = [], False
        for bucket in list(self._buckets):
            present = [i for i, p in enumerate(bucket.blocks) if p.grad is not None]
            if present and self._starts_on_nonzero(bucket):
                present = self._nonzero(bucket, present)
            if not present:
                continue
            if len(present) < len(bucket.blocks):
                bucket, split = self._split(bucket, present), True
            stepped.append(bucket)
        if self._fragmented and not split and len(stepped) > 1:  # parts joined on a step that split none (_join)
            stepped = self._join(stepped)
        # the plain AdamW buckets of a CPU, whatever their shapes, all at once (_step_plain_adams); their
        # reports are queued in the buckets' order, as if each had been stepped in its turn
        ok_on = _StepFlag(step_ok)
        plain = [(b, *work) for b in stepped if (work := self._plain_adam_cpu(b)) is not None]
        taken = {id(b) for b, _, _ in plain}
        # then the other small buckets of a CPU, with one test of their new state and one write of each kind
        small = [(b, cfg) for b in stepped if id(b) not in taken and (cfg := self._small_cpu(b)) is not None]
        # neither where a gradient lies in a stepped parameter's storage: those ways read every gradient of their
        # buckets before any write, where each bucket in its turn writes its parameters before the next reads
        if (plain or small) and _gradients_in_parameters(stepped):
            plain, small, taken = [], [], set()
        reports = self._step_plain_adams(plain, ok_on(_CPU)) if plain else {}
        for run in _within_budget(small, self._cap):
            reports |= self._step_small_buckets(run, ok_on(_CPU))
        taken |= {id(b) for b, _ in small}
        for bucket in stepped:
            if id(bucket) in taken:
                if id(bucket) in reports:
                    self._pending.append(reports[id(bucket)])
                continue
            with compiled.scope(self._group_cfgs[bucket.group].compile):  # config key compile (kronopt/compiled.py)
                if bucket.fsdp is not None:
                    self._step_fsdp(bucket, ok_on(bucket.blocks[0].device), fsdp_ok[id(bucket.fsdp.params[0])])  # type: ignore[index]
                else:
                    self._step_bucket(bucket, ok_on(bucket.blocks[0].device))
        if step_ok is not None:
            self._count_skipped(step_ok)
        self._seen_state()  # with the entries this step may have made (a bucket's first state)
        if stepped:  # a step with no gradient at all makes no state in torch.optim either: the window stays open
            self._unstepped_placement = None
        if raising and self._pending:  # a finite gradient whose update overflowed: raised now, not a step late
            self._report_pending(wait=True)

    @property
    def _reports(self) -> bool:
        """Whether the step queues its skipped blocks for a report (:meth:`_report_pending`): a warning, or under
        ``nonfinite = "raise"`` an error at the end of the step (the gradients were checked before it, so what is
        left to report there is an update or new state that overflowed)."""
        return self.config.nonfinite != "skip"

    def _note_non_float(self) -> None:
        """Whether a group holds a frozen non-float parameter (left out of the buckets): :meth:`_check_grads`
        then also looks at those, where a gradient set by hand must not pass unseen."""
        self._non_float = any(not p.is_floating_point() for g in self.param_groups for p in g["params"])

    def _check_grads(self) -> None:
        """A gradient the step cannot take, refused before anything changes, naming its parameter (or a parameter
        with a gradient whose shape is no longer the one the optimizer stacked): a sparse one
        (``nn.Embedding(sparse=True)``), or one whose shape is not its parameter's (which torch's own check
        lets through ``p.grad.data = ...``; reshaped into the block, it would step the wrong entries), or a complex
        one on a real parameter (possible with ``p.grad_dtype = None``: its imaginary part would be dropped by the cast
        to the state dtype, or the finiteness check fail with an error naming no parameter)."""
        dense = torch.strided
        # every rank's blocks (work sharding, FSDP2), so that every rank refuses alike, before any collective
        bad = [
            (b, p, spec) for b in self._buckets for p, spec in zip(b.blocks, b.block_specs)
            if (g := p.grad) is not None and (g.layout is not dense or g.shape != p.shape or g.is_complex() or p.shape != spec.shape)
        ]
        if getattr(self, "_non_float", False):
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    if not p.is_floating_point() and p.grad is not None:
                        raise RuntimeError(
                            f"{self._name(gi, p)} is a {p.dtype} parameter with a gradient: kronopt steps real "
                            "floating-point parameters and leaves others as they are; nothing was changed"
                        )
        if bad:
            bucket, p, spec = bad[0]
            if p.shape != spec.shape:  # given another shape since the optimizer stacked it (param.data = ...)
                raise RuntimeError(
                    f"{self._name(bucket.group, p)} was given another shape after the optimizer stacked it as "
                    f"{spec.shape} (param.data replaced after the first step?): kronopt keeps a parameter's state "
                    "in the block its shape gave; build a new optimizer for the new shape; nothing was changed"
                )
            g = p.grad
            what = (
                f"a {g.layout} gradient" if g.layout is not dense  # type: ignore[union-attr]
                else f"a complex ({g.dtype}) gradient" if g.is_complex()  # type: ignore[union-attr]
                else f"a gradient of shape {tuple(g.shape)}"  # type: ignore[union-attr]
            )
            raise RuntimeError(
                f"{self._name(bucket.group, p)} has {what}: kronopt steps dense real gradients of the parameter's "
                f"shape {tuple(p.shape)} (for an embedding, build it with sparse=False); nothing was changed"
            )

    def _check_rates(self) -> None:
        """A group's ``lr`` or ``weight_decay`` set to NaN or ±Inf since it was built (by hand, or a scheduler's
        arithmetic), refused before anything changes: it would write NaN into every parameter of the group. A
        value held in a tensor off the CPU is not read (that would be a host synchronisation). A value that is
        neither a real number nor a tensor (a NumPy array, a string) is refused too, before it fails deep in a
        stage or a compiled kernel."""
        for gi, group in enumerate(self.param_groups):
            for key in ("lr", "weight_decay"):
                value = group.get(key)
                if isinstance(value, Tensor):
                    if not one_cpu_number(value):
                        continue
                elif value is not None and not real_number(value):
                    raise TypeError(
                        f"param_groups[{gi}]['{key}'] is {value!r} ({type(value).__name__}): it must be a real number "
                        "or a one-entry tensor; nothing was changed"
                    )
                if value is not None and not math.isfinite(float(value)):
                    raise ValueError(
                        f"param_groups[{gi}]['{key}'] is {float(value)}: a non-finite {key} would write NaN into the "
                        "group's parameters; nothing was changed"
                    )

    def _grads(self) -> list[Tensor]:
        """The gradients of the plain (not FSDP2) parameters: :meth:`_fsdp_finite` checks the others."""
        return [p.grad for bucket in self._buckets if bucket.fsdp is None for p in bucket.blocks if p.grad is not None]

    def _fsdp_finite(self) -> dict[int, Tensor] | None:
        """FSDP2: per bucket of DTensor parameters (keyed by ``id`` of its first parameter with a gradient,
        which :meth:`step`'s split keeps first), ``(b)`` flags: block ``i``'s gradient is finite on every rank.

        A non-finite entry sits only on the rank holding its row, so every rank reduces
        its rows' extremes (``linalg.finite_each``: one pass per gradient) and one ``all_reduce`` (MIN) of every
        block's flag makes the ranks agree, for the step flag and the per-block masks
        alike. ``None`` without such buckets (or gradients).
        """
        owners: list[tuple[int, int]] = []
        grads: list[Tensor] = []
        for bucket in self._buckets:
            plan = bucket.fsdp
            if plan is None:
                continue
            present = [p for p in plan.params if p.grad is not None]
            if present:
                owners.append((id(present[0]), len(present)))
                grads.extend(p.grad.to_local() for p in present)  # type: ignore[union-attr]
        if not grads:
            return None
        flags = linalg.finite_each(grads).to(torch.int32)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=self._fsdp_group())
        out, start = {}, 0
        for key, count in owners:
            out[key] = flags[start : start + count].bool()
            start += count
        return out

    def _fsdp_group(self) -> Any:
        return next(b.fsdp.sharding.group for b in self._buckets if b.fsdp is not None)  # type: ignore[union-attr]

    def _all_finite(self) -> Tensor | None:
        """One device flag: every gradient of this step is finite (``None`` without gradients; no host sync
        off the CPU: there, where it waits for nothing, each gradient's flag is also read on the host).

        A tensor's largest and smallest entries are both finite exactly when it holds no
        NaN and no infinity (:func:`linalg.extremes_each`: one ``aminmax`` pass per gradient,
        at memory speed; a max-norm never overflows either, but runs far slower on CPU),
        one flag per device.
        """
        grouped: dict[torch.device, list[Tensor]] = {}
        for g in self._grads():
            grouped.setdefault(g.device, []).append(g)
        if not grouped:
            return None
        # each gradient's own flag is kept for _step_bucket (its block mask), keyed by the tensor and
        # its version counter, so a gradient changed in place since is never taken for checked
        # (with its smallest and largest entries, for _adam_bounds and _adam_bounds_small, and on a CPU
        # the flag read on the host, where that waits for nothing, for _sanitized_gradients)
        # (a device's table, :class:`_GradChecks`, and the gradient's row in it: no view of a row is made until asked)
        self._grad_flags: dict[int, tuple[Any, int, _GradChecks, int]] = {}
        flags = []
        for gs in grouped.values():
            extremes = linalg.extremes_each(gs)
            each = extremes.isfinite().all(1)
            table = _GradChecks(extremes, each, each.tolist() if linalg.host_verdicts(each) else None)
            for k, g in enumerate(gs):
                self._grad_flags[id(g)] = (weakref.ref(g), _version(g), table, k)
            flags.append(each.all())
        # parameters on several devices: the flag lives on an accelerator's, where the other flags go without
        # waiting (a copy to the host with non_blocking could be read before it lands); _StepFlag hands it on
        device = next((d for d in grouped if d.type != "cpu"), flags[0].device)
        return torch.stack([f.to(device, non_blocking=True) for f in flags]).all()

    def _count_skipped(self, step_ok: Tensor) -> None:
        """Consecutive skipped steps, on the device; with ``max_skipped_steps`` queued for a non-blocking check."""
        prev = self._skipped_steps if self._skipped_steps is not None else torch.zeros((), dtype=torch.int64, device=step_ok.device)
        prev = prev.to(step_ok.device)  # a counter loaded on the first parameter's device (mixed devices)
        self._skipped_steps = torch.where(step_ok, torch.zeros_like(prev), prev + 1)
        if self.config.max_skipped_steps:
            self._pending.append(_Pending(None, self._skipped_steps, 0))

    def _grads_device(self, like: Tensor) -> torch.device:
        """The device of the first parameter (where the step's flags live)."""
        for bucket in self._buckets:
            return bucket.blocks[0].device
        return like.device

    def skipped_steps(self) -> int:
        """Consecutive whole steps skipped for a non-finite gradient so far (``nonfinite_scope = "step"``; synchronises)."""
        return 0 if self._skipped_steps is None else int(self._skipped_steps)

    def _raise_on_nonfinite(self, fsdp_ok: dict[int, Tensor] | None = None) -> None:
        """``nonfinite = "raise"`` after a failed check: name every parameter with a non-finite gradient, change nothing."""
        bad = [
            self._name(bucket.group, p)
            for bucket in self._buckets
            if bucket.fsdp is None
            for p in bucket.blocks
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        for bucket in self._buckets:  # FSDP2: the flags every rank agreed on
            present = [] if bucket.fsdp is None else [p for p in bucket.fsdp.params if p.grad is not None]
            if present and fsdp_ok is not None:
                bad += [self._name(bucket.group, p) for p, ok in zip(present, fsdp_ok[id(present[0])].tolist()) if not ok]
        raise FloatingPointError(
            "non-finite gradient (NaN or Inf) in: " + ", ".join(bad) + "; no parameter or optimizer state was changed"
        )

    def _split(self, bucket: _Bucket, present: list[int]) -> _Bucket:
        """Move the blocks with gradients into a bucket of their own (their counters diverge from now on).

        ``present`` indexes :attr:`_Bucket.blocks`; with work sharding the gather plan is
        split the same way on every rank (DDP gives every rank the same gradients).
        """
        absent = [i for i in range(len(bucket.blocks)) if i not in present]
        return self._cut(bucket, [present, absent])[0]

    def _cut(self, bucket: _Bucket, cuts: list[list[int]]) -> list[_Bucket]:
        """Put the bucket's blocks at each of ``cuts`` (positions in :attr:`_Bucket.blocks`, together every block)
        into a bucket of their own, with their rows of its state, in its place in order; returns the parts."""
        parts = []
        for idx in cuts:
            plan = None if bucket.plan is None else bucket.plan.subset(idx)
            if plan is None:
                own = idx
            else:
                keep = {id(p) for p in plan.params}
                own = [i for i, p in enumerate(bucket.params) if id(p) in keep]
            part = bucket.subset(own, plan)
            if bucket.state is not None and own:
                # the blocks' rows joined by one cat, with no index tensor made from a Python list: on an accelerator
                # that is a blocking copy from host memory, which waits for the device (docs/architecture.md: a GPU
                # step's one synchronisation is a first call's read). Into a tensor of the stack's own strides
                # (compose.cat_stacks): an index_select makes a column-major basis row-major, and the part's stacks
                # would change layout again at their next refresh (docs/architecture.md: no stack changes its layout)
                def pick(t: Tensor, own: list[int] = own) -> Tensor:
                    return compose.cat_stacks([t[i : i + 1] for i in own])

                part.state = compose.map_tensors(bucket.state, pick)
                part.nonfinite = pick(bucket.nonfinite)  # type: ignore[arg-type]
                self._bind(part)
            parts.append(part)
        pos = self._buckets.index(bucket)
        self._buckets[pos : pos + 1] = parts
        self.__dict__.pop("_kept_scratch", None)  # sets shaped like the whole bucket's stacks: made again as needed
        self._fragmented = True
        return parts

    def _starts_on_nonzero(self, bucket: _Bucket) -> bool:
        """Whether the bucket is before its first call and its factor stage starts a block only on a nonzero
        gradient (the capability ``waits_for_nonzero`` and its member ``starts_on_nonzero(layout)``: DyKAF's start
        from the gradient, dykaf.md §5).
        Not for FSDP2 buckets: a rank holds some rows of each block, so a zero shard says nothing of the block
        (their factor stage starts such a block inside the bucket instead)."""
        if bucket.fsdp is not None:
            return False
        calls = bucket.plan.calls if bucket.plan is not None else 0 if bucket.state is None else bucket.state.calls
        if calls:
            return False
        factors = self._group_cfgs[bucket.group].factors
        return capabilities(factors).waits_for_nonzero and bool(factors.starts_on_nonzero(bucket.layout))

    @staticmethod
    def _nonzero(bucket: _Bucket, present: list[int]) -> list[int]:
        """The blocks of ``present`` whose gradient holds a nonzero entry (NaN counts: the non-finite guard takes
        it). Read on the host, once per step while the bucket has not had its first call (on an accelerator
        such a step waits for the device, as a first call's read does anyway). With work sharding every rank
        reads every block's gradient, the same on every rank after DDP's all-reduce, so the ranks split alike."""
        flags = linalg._nonzero_each([bucket.blocks[i].grad for i in present], bucket.state_dtype)  # type: ignore[misc]
        return [i for i, nonzero in zip(present, flags) if nonzero]

    def _join(self, stepped: list[_Bucket]) -> list[_Bucket]:
        """Join the buckets about to step whose blocks may share one stack again: :meth:`_split` parted them
        when some blocks went without a gradient (a mixture's experts, a branch not taken), and their counters
        diverged; parts whose counters agree again (every int and bool of their states: calls, step, refreshes,
        so also their refresh schedules) step as one bucket of the same group, layout, dtypes and device would,
        each block as it would alone (up to the rounding of the processor's batched kernels), in one batched call instead of one per part. Experts that each missed one step, say,
        come back together. :meth:`step` joins only on a step that split no bucket: where blocks go without
        gradients at random on most steps, joined parts would split again at once, and each join and split
        copies their state. Not across work sharding's or FSDP2's plans (each rank's part of a plan is its
        own), nor plain AdamW buckets of a CPU (:meth:`_blockwise`), nor where a state tensor's memory layout
        differs between the parts (it decides how the blocks' reductions round), nor beyond the bucket cap
        (``bucket_cap_mib``: :meth:`_packed`). Returns ``stepped`` with each joined bucket in place of its parts."""
        sets: dict[tuple[Any, ...], list[_Bucket]] = {}
        for b in stepped:
            # not before a counted first call: whether this call counts depends on its own gradients (a first call
            # that used no finite gradient is not counted, _uncounted), which a part joined to another would share
            if b.plan is not None or b.state is None or b.nonfinite is None or not b.params or not b.state.calls:
                continue
            if b.join_base is None:
                # by class: groups whose configs differ in their rates alone join (their buckets are shared)
                b.join_base = (self._classes[b.group], attrs.evolve(b.layout, batch=0), self._blockwise(b))
            p = b.params[0]
            if b.join_base[2] and p.device.type == "cpu":
                continue
            # dtypes and device read now: a model moved or cast after the build moves its buckets too
            key = (b.join_base, b.state_dtype, p.dtype, p.device, tuple(compose.scalar_entries(b.state).items()))
            sets.setdefault(key, []).append(b)
        joined: dict[int, _Bucket | None] = {}
        for parts in (pack for same in sets.values() for pack in self._packed(same)):
            if len(parts) > 1 and (whole := self._joined(parts)) is not None:
                joined |= {id(b): None for b in parts}
                joined[id(parts[0])] = whole
        if not joined:
            return stepped
        self._buckets = [joined.get(id(b), b) for b in self._buckets if joined.get(id(b), b) is not None]
        self.__dict__.pop("_kept_scratch", None)
        return [joined.get(id(b), b) for b in stepped if joined.get(id(b), b) is not None]

    def _packed(self, parts: list[_Bucket]) -> list[list[_Bucket]]:
        """``parts`` (buckets :meth:`_join` may join) in runs, in order, that each stay under the bucket cap
        (``bucket_cap_mib``; all of them in one run without a cap)."""
        cap = self._cap
        if not cap:
            return [parts]
        first = parts[0]
        if first.block_bytes is None:
            first.block_bytes = _block_state_bytes(self._group_cfgs[first.group], first.layout, first.state_dtype)
        per = _blocks_under(cap, first.block_bytes)
        if per is None:
            return [parts]
        runs: list[list[_Bucket]] = [[]]
        held = 0
        for b in parts:
            if runs[-1] and held + b.layout.batch > per:
                runs.append([])
                held = 0
            runs[-1].append(b)
            held += b.layout.batch
        return runs

    def _blockwise(self, bucket: _Bucket) -> bool:
        """A plain AdamW bucket whose blocks a CPU steps one by one (:meth:`_step_plain_adams`, with every other
        such bucket's): on a CPU joining it would only copy its moments (adamw 1.5 × its step where experts went
        without gradients at random, measured)."""
        return bucket.layout.m * bucket.layout.n >= _BLOCKWISE_MIN and compose.is_plain_adam(
            self._bucket_config(bucket), bucket.layout, bucket.state_dtype
        )

    def _joined(self, parts: list[_Bucket]) -> _Bucket | None:
        """One bucket holding ``parts``' blocks and states in turn (:func:`compose.cat_states`); ``None`` where a
        state tensor is not batched (a stage's bucket-wide tensor, which the parts may hold differently) or its
        memory layout differs between the parts."""
        for b in parts:
            if any(isinstance(v, Tensor) and not compose.is_batched(v, b.layout.batch) for v in compose.flatten(b.state).values()):
                return None
        state = compose.cat_states([b.state for b in parts])
        if state is None:
            return None
        first = parts[0]
        whole = _Bucket(
            group=first.group,
            params=[p for b in parts for p in b.params],
            specs=[s for b in parts for s in b.specs],
            layout=attrs.evolve(first.layout, batch=sum(b.layout.batch for b in parts)),
            state_dtype=first.state_dtype,
            state=state,
            nonfinite=compose.cat_stacks([b.nonfinite for b in parts]),  # type: ignore[misc]
            block_bytes=first.block_bytes,
            groups=_mixed(_groups_of([(b, range(len(b.params))) for b in parts])),
        )
        self._bind(whole)
        return whole

    def _init_bucket(self, bucket: _Bucket) -> None:
        if not bucket.params:  # work sharding: another rank owns every block
            return
        device = bucket.params[0].device
        cfg = self._group_cfgs[bucket.group]
        bucket.state = compose.init_state(cfg, bucket.layout, dtype=bucket.state_dtype, device=device)
        bucket.nonfinite = torch.zeros(bucket.layout.batch, dtype=torch.int64, device=device)
        self._bind(bucket)

    def _materialize(self, *, try_lazy: bool = True) -> None:
        """Create the state of every bucket that has a parameter requiring a gradient, now.

        Eager rather than at the first step, so that ``self.state`` is never empty for a
        trainable model: ``torch.distributed.checkpoint``'s ``_init_optim_state`` would
        otherwise take a zero-gradient ``step()`` (with ``lr = 0``) that advances the
        counters (Adam's bias correction, SOAP's first call). The values are those the
        first step would have created. Buckets of frozen parameters stay lazy, but their layouts
        are tried now all the same (:meth:`_try_layout`), so a stage that cannot keep one is refused
        when the optimizer is built, not at the step that first gives such a parameter a gradient
        (``try_lazy``; a load has tried them already).
        """
        for bucket in self._buckets:
            plan = bucket.plan
            if isinstance(plan, distributed.GatherPlan):
                # work sharding: decided from every rank's blocks, so all ranks agree on which buckets hold state
                plan.stateful = plan.stateful or plan.calls > 0 or any(p.requires_grad for p in plan.params)
                if not plan.stateful:
                    if try_lazy:
                        self._try_layout(bucket)
                    continue
                if bucket.state is None:
                    self._init_bucket(bucket)  # nothing when another rank owns every block
                for p, r in zip(plan.params, plan.owners):
                    if r != plan.sharding.rank:
                        self.state[p]  # an empty entry: self.state is never empty (DCP's _init_optim_state would step)
                continue
            # every block of the bucket, this rank's or not (FSDP2: an owner of frozen blocks alone keeps their
            # state as one process does, else its dicts hold a marker where the others expect tensors)
            if bucket.state is None and any(p.requires_grad for p in bucket.blocks):
                self._init_bucket(bucket)
            elif bucket.state is None and try_lazy:
                self._try_layout(bucket)
            if bucket.fsdp is not None:  # FSDP2: an entry for every parameter on every rank (empty where another
                for p in bucket.fsdp.params:  # rank owns it), so that torch.distributed.checkpoint never sees an
                    self.state[p]  # empty state and takes a zero-gradient step to create one on this rank alone

    def _try_layout(self, bucket: _Bucket, cfg: KronConfig | None = None) -> None:
        """Build a bucket's state for one block on the ``meta`` device (no memory) with its group's config (or
        ``cfg``): the stages' own checks of the layout (``ValueError``: a restricted side a factor estimator
        cannot keep, ...) run as they would at its first step. Anything else the meta device cannot do is left
        for that step."""
        cfg = self._group_cfgs[bucket.group] if cfg is None else cfg
        try:
            compose.init_state(cfg, attrs.evolve(bucket.layout, batch=1), dtype=bucket.state_dtype, device=torch.device("meta"))
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - an operation the meta device lacks: the first step decides
            pass

    def _bind(self, bucket: _Bucket) -> None:
        """Point ``self.state[p]`` of each block at its slices of the bucket's stacks (views, no copies).

        The dicts are updated in place, so one a caller holds stays valid.
        """
        entries = compose.block_entries(bucket.state, bucket.layout.batch)
        plan = bucket.fsdp
        rows = (bucket.layout.m, bucket.layout.n)
        if plan is not None and plan.elementwise:  # FSDP2: the rows of a block as a DTensor like its parameter
            entries = [
                {k: plan.to_dtensor(i, v) if isinstance(v, Tensor) and tuple(v.shape) == rows else v for k, v in e.items()}
                for i, e in enumerate(entries)
            ]
        elif plan is None and self._param_shaped(bucket):
            # an elementwise bucket's block-sized tensors shaped like the parameter (a view), as FSDP2 keeps them
            # and torch.optim does: one state layout whatever the placement, so a checkpoint moves between them
            entries = [
                {k: v.view(p.shape) if isinstance(v, Tensor) and tuple(v.shape) == rows and v.is_contiguous() else v for k, v in e.items()}
                for p, e in zip(bucket.params, entries)
            ]
        views = []
        for i, (p, entry) in enumerate(zip(bucket.params, entries)):
            own = self.state[p]
            own.clear()
            own.update(entry)
            own[_NONFINITE] = bucket.nonfinite[i]  # type: ignore[index]
            keys = tuple(k for k, v in own.items() if isinstance(v, Tensor))
            views.append((p, keys, tuple(own[k] for k in keys)))
        bucket.views = views
        self._views_flat = None  # made again from the buckets' views at the next check

    def _adopt_replaced(self) -> None:
        """Tensors put into ``state[p]`` in place of the views of the stacks since kronopt bound them (an offload
        of the state and its reload, Lightning's ``_optimizer_to_device`` to another device, ``state[p][k] =
        v.to(device)`` after a load, a moment reset by hand): their values are copied into the stacks, which the
        step reads, and the views put back in ``state[p]``, so that the next step and ``state_dict()`` use the
        state as torch.optim would, the replacing tensors'. A ``state[p]`` emptied (``state[p] = {}``,
        ``state[p].clear()``) starts that parameter afresh, as torch.optim would (:meth:`_start_afresh`); one that
        lost only some of its tensors is refused, changing nothing. The counters (``step``, ``calls``…) are the
        bucket's, shared by its blocks: an edit of one in ``state[p]`` is not read. Where nothing was replaced
        (every step but such one), two identity tests over flat lists of every parameter's dict and every entry,
        in C."""
        flat = self.__dict__.get("_views_flat")
        if flat is None:
            flat = self._views_flat = self._flat_views()
        params, dicts, owners, keys, views = flat
        state, same = self.state, operator.is_
        try:
            if all(map(same, map(state.get, params), dicts)) and all(map(same, map(operator.getitem, owners, keys), views)):
                return
        except KeyError:  # an entry taken out: put back below
            pass
        resets: list[tuple[_Bucket, list[int]]] = []  # blocks whose state[p] was emptied: started afresh
        for bucket in self._buckets:
            emptied = []
            for j, (p, bound_keys, _) in enumerate(bucket.views or ()):
                own = state.get(p)
                missing = [] if own is None else [k for k in bound_keys if k not in own]
                if not missing:
                    continue
                if any(isinstance(v, Tensor) for v in own.values()):  # type: ignore[union-attr]
                    raise RuntimeError(
                        f"optimizer.state of {self._name(bucket.group, p)} lost {', '.join(map(repr, missing[:4]))}"
                        f"{' …' if len(missing) > 4 else ''}: kronopt keeps each entry as a view of its bucket's stacks; "
                        "replace state[p] with {} (or clear it) to start that parameter afresh, or clear all of "
                        "optimizer.state; nothing was changed"
                    )
                if bucket.plan is not None:
                    # only this rank sees its own blocks' dicts: an error here would leave the other ranks waiting
                    # in the step's collectives, so the state is kept, as the others keep theirs
                    warnings.warn(
                        f"optimizer.state of {self._name(bucket.group, p)} was emptied: under work sharding or FSDP2 a "
                        "parameter's state cannot start afresh alone (every rank's plan holds it), so it was kept; "
                        "clear all of optimizer.state on every rank to start afresh",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    continue
                emptied.append(j)
            if emptied:
                resets.append((bucket, emptied))
        reset = {id(bucket.params[j]) for bucket, emptied in resets for j in emptied}
        for bucket in self._buckets:
            for p, bound_keys, bound in bucket.views or ():
                own = state.get(p)
                if own is None or id(p) in reset:
                    continue
                for k, view in zip(bound_keys, bound):
                    now = own.get(k)
                    if now is view:
                        continue
                    if isinstance(now, Tensor):
                        with torch.no_grad():
                            view.copy_(now)
                    own[k] = view
        for bucket, emptied in resets:
            self._start_afresh(bucket, emptied)
        self._views_flat = None  # a dict of state may have been replaced: made again at the next check

    def _check_routes(self) -> None:
        """Before the state is made anew for parameters reshaped before the first step: refuse one whose new number
        of dims (or name) the route would send to the other pipeline than its group's, which was fixed when the
        group was made (a matrix made a vector under a config that sends vectors to the fallback)."""
        for gi, g in enumerate(self.param_groups):
            cfg = self._with_overrides(g.get("overrides") or {})
            names = g.get("param_names")
            away = g.get("pipeline", "main") != "main"
            for i, p in enumerate(g["params"]):
                if cfg.to_fallback(p.ndim, None if names is None else names[i]) != away:
                    raise RuntimeError(
                        f"{self._name(gi, p)} was given {p.ndim} dims before the first step, which the route sends to "
                        f"the {'main pipeline' if away else 'fallback'}, not to its group's: the groups were routed "
                        "when the optimizer was built; build it after reshaping the model; nothing was changed"
                    )

    def _restore_deleted(self) -> None:
        """Entries taken out of ``self.state`` (``del state[p]``, ``state.pop(p)``), put back empty: an emptied
        ``state[p]``, which :meth:`_adopt_replaced` starts afresh (or keeps, under work sharding and FSDP2); a
        parameter another rank owns gets back its empty entry (:meth:`_materialize`)."""
        state = self.state
        for bucket in self._buckets:
            for p, _, _ in bucket.views or ():
                if p not in state:
                    state[p] = {}
            plan = bucket.plan
            if bucket.fsdp is not None or (isinstance(plan, distributed.GatherPlan) and plan.stateful):
                for p in plan.params:  # type: ignore[union-attr]
                    if p not in state:
                        state[p] = {}

    def _start_afresh(self, bucket: _Bucket, emptied: list[int]) -> None:
        """The blocks at ``emptied`` (positions in the bucket) with the state a new optimizer gives them, as
        torch.optim restarts a parameter whose ``state[p]`` was emptied: moved into a bucket of their own
        (:meth:`_split`; their counters start again) whose state is made anew. Before a bucket's first call its
        state is the new one already: only the views are put back."""
        if bucket.state is None or not bucket.state.calls:
            self._bind(bucket)
            return
        keep = [i for i in range(len(bucket.params)) if i not in emptied]
        if keep:
            pos = self._buckets.index(self._split(bucket, keep)) + 1
            bucket = self._buckets[pos]  # the part of the emptied blocks
        bucket.state = None
        self._init_bucket(bucket)

    def _flat_views(self) -> tuple[list[Tensor], list[dict], list[dict], list[str], list[Tensor]]:
        """For :meth:`_adopt_replaced`: the parameters with bound views and their ``state[p]`` dicts as they are
        now, then per view entry its dict, key and view."""
        params: list[Tensor] = []
        dicts: list[dict] = []
        owners: list[dict] = []
        keys: list[str] = []
        views: list[Tensor] = []
        for bucket in self._buckets:
            for p, bound_keys, bound in bucket.views or ():
                own = self.state.get(p)
                if own is None:
                    continue
                params.append(p)
                dicts.append(own)
                owners.extend([own] * len(bound_keys))
                keys.extend(bound_keys)
                views.extend(bound)
        return params, dicts, owners, keys, views

    def _param_shaped(self, bucket: _Bucket, cfg: KronConfig | None = None) -> bool:
        """Whether the bucket's block-sized state tensors are shown (and saved) shaped like their parameters: an
        elementwise bucket (:func:`kronopt.distributed.is_elementwise`) of blocks that are not the parameter's
        own shape (a vector ``(d,)`` as ``(d, 1)``, an N-D weight as ``(o, i·kh·kw)``). ``cfg``: the bucket's group
        config where it is not yet this optimizer's (a load, which takes the saved groups' configs)."""
        return any(tuple(s.shape) != (s.m, s.n) for s in bucket.specs) and distributed.is_elementwise(
            self._bucket_config(bucket) if cfg is None else cfg, bucket.layout
        )

    def _step_bucket(self, bucket: _Bucket, step_ok: Tensor | None) -> None:
        if bucket.plan is not None:
            self._step_sharded(bucket, step_ok)
            return
        if bucket.state is None:
            self._init_bucket(bucket)
        cfg = self._bucket_config(bucket)
        raw = self._raw_gradients(cfg, bucket)
        if raw is not None:
            self._step_plain_adam(bucket, step_ok, cfg, raw)
            return
        if self._step_plain_muon(bucket, step_ok, cfg):
            return
        if self._in_place_due(bucket, cfg):
            (run,) = self._rotated_adams([(0, bucket, cfg)], step_ok)  # the same bits as _run's
        elif self._momentum_due(bucket, cfg):
            run = self._momentum_run(bucket, cfg, step_ok)  # the same bits as _run's
        else:
            run = self._run(bucket, cfg)
        # a finite gradient whose update or state overflows (e.g. 1e20 in float32) is skipped too
        ok_new = compose.finite_blocks_of(run.changed())  # (a deferred update is proven finite beforehand)
        (report,) = self._finish([(run, run.ok if ok_new is None else run.ok & ok_new)], step_ok)
        self._carry_bounds((run,))
        if report is not None:
            self._pending.append(report)

    def _in_place_due(self, bucket: _Bucket, cfg: KronConfig) -> bool:
        """Whether a bucket's call may update its moments in place (:meth:`_rotated_adams`; :meth:`_step_bucket` takes
        that call for it, :meth:`_step_small_buckets` makes it after the others): a rotated Adam call
        (:func:`compose.rotated_adam_due`) on a CPU, of a group not compiled, with no refresh due (a refresh step makes
        new moments: it rotates them), of at least ``_IN_PLACE_MIN`` moment entries."""
        state, layout = bucket.state, bucket.layout
        return (  # the cheapest tests first: on many small buckets this runs for each, each step
            _ROTATED_MOMENTS_IN_PLACE and layout.batch * layout.m * layout.n >= _IN_PLACE_MIN
            and bucket.blocks[0].device.type == "cpu" and not self._group_cfgs[bucket.group].compile
            and compose.rotated_adam_due(cfg, layout, state, bucket.state_dtype)  # type: ignore[arg-type]
            and not cfg.refresh.due(state.step + 1, first_call=False)  # type: ignore[union-attr]
        )

    def _momentum_due(self, bucket: _Bucket, cfg: KronConfig) -> bool:
        """Whether a bucket's call may update its ``eigenvalue`` rule's momentum in place (:meth:`_momentum_run`): a call
        :func:`compose.eigen_momentum_due` takes (no refresh due) on a CPU, of a group not compiled, of at least
        ``_IN_PLACE_MIN`` momentum entries."""
        layout = bucket.layout
        return (
            _MOMENTUM_IN_PLACE and layout.batch * layout.m * layout.n >= _IN_PLACE_MIN
            and bucket.blocks[0].device.type == "cpu" and not self._group_cfgs[bucket.group].compile
            and compose.eigen_momentum_due(cfg, layout, bucket.state, bucket.state_dtype)  # type: ignore[arg-type]
        )

    def _momentum_run(self, bucket: _Bucket, cfg: KronConfig, step_ok: Tensor | None) -> "_Run":
        """:meth:`_run` of a call :func:`compose.momentum_in_place_step` takes (:meth:`_momentum_due`), the same bits: its
        momentum updated in its stack where :meth:`_momentum_proof` proves the call finite (the run's
        :attr:`_Run.in_place`). ``step_ok``: the step's flag under ``nonfinite_scope = "step"``."""
        G, ok, defer = self._inputs(bucket)
        old = bucket.state
        used: list[tuple[float, float]] = []
        prove = self._momentum_proof(bucket, cfg, step_ok, used)
        if defer is None or prove is None:
            D, new = compose.step(cfg, bucket.layout, old, G, defer=defer)  # type: ignore[arg-type]
        else:
            D, new = compose.momentum_in_place_step(cfg, bucket.layout, old, G, defer, prove)  # type: ignore[arg-type]
        run = _Run(bucket, cfg, ok, old, new, D, defer)  # type: ignore[arg-type]
        if _momentum_of(new.inner) is _momentum_of(old.inner):  # made in place
            run.in_place = used  # type: ignore[assignment]
        return run

    def _momentum_proof(
        self, bucket: _Bucket, cfg: KronConfig, step_ok: Tensor | None, used: list[tuple[float, float]]
    ) -> Callable[[Any], bool] | None:
        """The proof :func:`compose.momentum_in_place_step` asks for before it updates a bucket's momentum in its stack
        (a function of the call's context), or ``None`` where the call may not be made so, as :meth:`_in_place_proof`
        says for rotated Adam's moments (off a CPU, where the step's flag is not read True, on inference tensors, below
        ``_IN_PLACE_MIN`` entries).

        It holds only where every gradient of the bucket was read finite on the host by this step's check and is of the
        state's dtype. It bounds each block's momentum input, the gradient or (``momentum_basis = "eigen"`` once the
        basis is made) the rotated gradient (:func:`compose.rotated_gradient_bound`), from the gradient's largest entry,
        and its momentum by the bounds the last step left (:class:`_MomentumBounds`, where they still hold) or read
        from the momentum, and holds where :func:`compose.eigen_momentum_is_safe` does on every block; it fills ``used``
        with each block's ``(max |x|, max |m|)``, which :meth:`_carry_bounds` moves past the step."""
        momentum = _momentum_of(bucket.state.inner)  # type: ignore[union-attr]
        if momentum is None or momentum.numel() < _IN_PLACE_MIN or momentum.device.type != "cpu" or momentum.is_inference():
            return None
        if step_ok is not None and not (linalg.host_verdicts(step_ok) and bool(step_ok)):
            return None

        def prove(ctx: Any) -> bool:
            hits = self._read_finite(bucket)
            bases = None if hits is None else self._basis_bounds(bucket)
            if bases is None:
                return False
            entries = bucket.layout.m * bucket.layout.n
            rotated = cfg.inner.momentum_basis == "eigen" and ctx.basis.ready  # type: ignore[attr-defined]
            X = [
                compose.rotated_gradient_bound(entries, table.abs_bound(k), c) if rotated else table.abs_bound(k)
                for (table, k), (c, _) in zip(hits, bases)  # type: ignore[arg-type]
            ]
            known = _MomentumBounds.valid(self._carried_bounds().pop(bucket, None), bucket)
            for attempt in ("carried", "read"):
                if attempt == "carried" and known is None:
                    continue
                if attempt == "carried":
                    ms = known.m  # type: ignore[union-attr]
                else:  # the test is monotone in its bounds: where the carried ones say no, the momentum is read
                    lo, hi = linalg.block_min_max(momentum)
                    ms = [_abs_bound(a, b) for a, b in zip(lo.tolist(), hi.tolist())]
                if all(compose.eigen_momentum_is_safe(cfg, ctx, momentum.dtype, x, a, c, spread)
                       for x, a, (c, spread) in zip(X, ms, bases)):
                    used.extend(zip(X, ms))
                    return True
            return False

        return prove

    def _read_finite(self, bucket: _Bucket) -> list[tuple[Any, int]] | None:
        """Each of the bucket's gradients' row in this step's check table (:meth:`_checked`), where every one was read
        finite on the host there and is of the state's dtype; else ``None`` (the in-place proofs then fail)."""
        hits = []
        for p in bucket.params:
            hit = self._checked(p.grad)  # type: ignore[arg-type]
            if hit is None or p.grad.dtype != bucket.state_dtype or hit[0].read is None or not hit[0].read[hit[1]]:  # type: ignore[union-attr]
                return None
            hits.append(hit)
        return hits

    def _run(self, bucket: _Bucket, cfg: KronConfig) -> "_Run":
        """The bucket's pipeline on its sanitized gradients: the direction and new state, nothing written yet."""
        G, ok, defer = self._inputs(bucket)
        old = bucket.state
        D, new = compose.step(cfg, bucket.layout, old, G, defer=defer)  # type: ignore[arg-type]
        return _Run(bucket, cfg, ok, old, new, D, defer)  # type: ignore[arg-type]

    def _rotated_adams(self, work: list[tuple[int, _Bucket, KronConfig]], step_ok: Tensor | None) -> list["_Run"]:
        """:meth:`_run` of buckets whose call :func:`compose.rotated_adams` makes together (``(_, bucket, config)``,
        :func:`compose.rotated_adam_due`), the same bits; a call proven finite beforehand updates its moments in
        their stacks (:meth:`_in_place_proof`; the run's :attr:`_Run.in_place`). ``step_ok``: the step's flag under
        ``nonfinite_scope = "step"``."""
        calls, flags, proofs, used = [], [], [], []
        for _, bucket, cfg in work:
            G, ok, defer = self._inputs(bucket)
            calls.append((cfg, bucket.layout, bucket.state, G, defer))
            flags.append(ok)
            used.append([])
            proofs.append(self._in_place_proof(bucket, cfg, step_ok, used[-1]))
        steps = compose.rotated_adams(calls, in_place=proofs)  # type: ignore[arg-type]
        runs = []
        for (_, bucket, cfg), ok, (_, _, old, _, defer), (D, new), bounds in zip(work, flags, calls, steps, used):
            run = _Run(bucket, cfg, ok, old, new, D, defer)  # type: ignore[arg-type]
            if new.inner.exp_avg is old.inner.exp_avg:  # made in place (compose.rotated_adams)
                run.in_place = bounds
            runs.append(run)
        return runs

    def _eigen_steps(self, work: list[tuple[int, _Bucket, KronConfig]]) -> list["_Run"]:
        """:meth:`_run` of buckets whose call :func:`compose.eigen_steps` makes together (``(_, bucket, config)``,
        :func:`compose.eigen_steps_due`), the same bits."""
        calls, flags = [], []
        for _, bucket, cfg in work:
            G, ok, defer = self._inputs(bucket)
            calls.append((cfg, bucket.layout, bucket.state, G, defer))
            flags.append(ok)
        steps = compose.eigen_steps(calls)  # type: ignore[arg-type]
        return [
            _Run(bucket, cfg, ok, old, new, D, defer)  # type: ignore[arg-type]
            for (_, bucket, cfg), ok, (_, _, old, _, defer), (D, new) in zip(work, flags, calls, steps)
        ]

    def _in_place_proof(
        self, bucket: _Bucket, cfg: KronConfig, step_ok: Tensor | None, used: list[tuple[float, float, float]]
    ) -> Callable[[], bool] | None:
        """The proof :func:`compose.rotated_adams` asks for before it updates a bucket's moments in their stacks
        (its ``in_place``), or ``None`` where the call may not be made so: off a CPU, where the step's flag is not
        read True, where the moments keep no version counter (inference tensors), or on a bucket of fewer than
        ``_IN_PLACE_MIN`` moment entries (there the proof's Python costs what the test and the copy it spares do).

        The proof, asked after the factor update, holds only where every gradient of the bucket was read finite on the
        host by this step's check (:meth:`_all_finite`, made under ``nonfinite_scope = "step"`` or ``nonfinite =
        "raise"``) and is of the state's dtype. It bounds each block's rotated gradient from its gradient's largest
        entry (:func:`compose.rotated_gradient_bound`) and its moments by the bounds the last step left
        (:class:`_MomentBounds`, where they still hold: no refresh, load or edit since) or read from the moments,
        and holds where :func:`compose.rotated_adam_is_safe` does on every block; it fills ``used`` with each
        block's ``(max |H|, max |m|, max v)``, which :meth:`_carry_bounds` moves past the step."""
        state = bucket.state
        m, v = state.inner.exp_avg, state.inner.exp_avg_sq  # type: ignore[union-attr]
        if not _ROTATED_MOMENTS_IN_PLACE or m.numel() < _IN_PLACE_MIN or m.device.type != "cpu" or m.is_inference() or v.is_inference():
            return None
        if step_ok is not None and not (linalg.host_verdicts(step_ok) and bool(step_ok)):
            return None

        def prove() -> bool:
            hits = self._read_finite(bucket)
            if hits is None:
                return False
            t, entries = state.step + 1, bucket.layout.m * bucket.layout.n  # type: ignore[union-attr]
            bases = self._basis_bounds(bucket)
            if bases is None:
                return False
            H = [compose.rotated_gradient_bound(entries, table.abs_bound(k), c) for (table, k), (c, _) in zip(hits, bases)]
            known = _MomentBounds.valid(self._carried_bounds().pop(bucket, None), bucket)
            for attempt in ("carried", "read"):
                if attempt == "carried" and known is None:
                    continue
                if attempt == "carried":
                    ms, vs = known.m, known.v  # type: ignore[union-attr]
                else:  # the test is monotone in its bounds: where the carried ones say no, the moments are read
                    # (v's smallest entry too: the proof takes v ≥ 0, which an edit or a checkpoint may break, and
                    # NaN where an entry is: a square root of a negative entry is NaN, of -inf too)
                    m_lo, m_hi = linalg.block_min_max(m)
                    v_lo, v_hi = linalg.block_min_max(v)
                    rows = torch.stack([m_lo, m_hi, v_lo, v_hi], dim=1).tolist()
                    ms = [max(-a, b) for a, b, _, _ in rows]
                    vs = [_second_moment_max(c, d) for _, _, c, d in rows]
                if all(compose.rotated_adam_is_safe(cfg, t, m.dtype, entries, h, a, b, spread)
                       for h, a, b, (_, spread) in zip(H, ms, vs, bases)):
                    used.extend(zip(H, ms, vs))
                    return True
            return False

        return prove

    def _basis_bounds(self, bucket: _Bucket) -> list[tuple[float, float]] | None:
        r"""Each block's ``(columns, spread)`` for :meth:`_in_place_proof`: the product of its two bases' largest column
        norms, and of their spectral norms' bounds :math:`\sqrt{k}` times that (1 on a side without a basis; each
        side's factor taken as at least 1, which bounds the first product of each pair, of one side alone, as well
        as the whole), about ``(1, √(mn))`` for the orthonormal bases the refreshes make, but read, not assumed: a
        basis loaded from a checkpoint or edited may hold anything, and NaN there makes the proof fail. Read once per
        basis (two norms a side and one host read) and kept, by bucket, with the stacks (weakly) and their version
        counters, so a refresh, load or edit reads them again (``None`` where a side keeps no version counter: an
        inference tensor)."""
        basis = bucket.state.basis  # type: ignore[union-attr]
        sides = [Q for Q in (basis.Q_L, basis.Q_R) if Q is not None]
        versions = [_version(Q) for Q in sides]
        if None in versions:
            return None
        kept = self.__dict__.setdefault("_kept_basis_bounds", weakref.WeakKeyDictionary())
        held = kept.get(bucket)
        if held is not None and held[1] == versions and all(r() is Q for r, Q in zip(held[0], sides)):
            return held[2]
        b = bucket.layout.batch
        columns, spread = [1.0] * b, [1.0] * b
        if sides:
            norms = torch.stack([torch.linalg.vector_norm(Q, dim=-2).amax(-1) for Q in sides]).tolist()
            for Q, row in zip(sides, norms):
                for i, c in enumerate(row):
                    # each side's factor at least 1, so that a product of one side alone (Q_Lᵀ G, Q_L N: the first of
                    # each pair) is bounded too, not only both together (a side of small columns would hide the
                    # other's overflow there); NaN stays NaN (max keeps its first argument against a NaN second)
                    columns[i] *= max(c, 1.0) if c == c else c
                    spread[i] *= max(c * math.sqrt(Q.shape[-1]), 1.0) if c == c else c
        values = list(zip(columns, spread))
        kept[bucket] = ([weakref.ref(Q) for Q in sides], versions, values)
        return values

    def _carry_bounds(self, runs: Iterable["_Run"]) -> None:
        """The moment bounds each run made in place leaves for the next step (:class:`_MomentBounds`), once its writes
        are made (the version counters are taken after them)."""
        for run in runs:
            if run.in_place is None:
                continue
            if _momentum_of(run.bucket.state.inner) is not None:  # the eigenvalue rule's momentum (_momentum_run)
                after: Any = _MomentumBounds.after(run.bucket, run.cfg.inner.momentum, run.in_place)  # type: ignore[attr-defined, arg-type]
            else:
                after = _MomentBounds.after(run.bucket, run.cfg.inner.betas, run.in_place, [True] * len(run.in_place))  # type: ignore[attr-defined]
            if after is not None:
                self._carried_bounds()[run.bucket] = after

    def _inputs(self, bucket: _Bucket) -> tuple[Tensor, Tensor, list[linalg.DeferredWrite] | None]:
        """A bucket call's inputs (:meth:`_run`, :meth:`_rotated_adams`): its sanitized gradients ``G``, their blocks'
        flags, and the list its factor updates may be left in for the state write (:func:`compose.step`'s ``defer``;
        on a CPU, factor updates nothing else reads this call are made there, in place)."""
        G, ok = self._sanitized_gradients(bucket, [p.grad for p in bucket.params], bucket.state_dtype)  # type: ignore[misc]
        return G, ok, [] if _DEFER_FACTOR_UPDATES and G.device.type == "cpu" else None

    def _finish(
        self, judged: list[tuple["_Run", Tensor]], step_ok: Tensor | None, *, clean: bool = False
    ) -> list["_Pending | None"]:
        """The writes of runs judged ``(run, ok)``, ``ok`` the blocks whose gradient, direction and new state
        are finite: every parameter first (a direction may still read the old stacks), in as few calls as
        the settings allow (:func:`post.apply_together_`), then every state (plain copies in one call,
        :func:`compose.write_`'s ``copies``), then each run's deferred factor updates. Returns each run's
        report to queue (``None`` under ``nonfinite = "skip"``). ``clean``: every ``ok`` and ``step_ok``
        is known, on the host, to be all True (a CPU's verdicts, :meth:`_step_small_buckets`): then no mask
        is combined, read again or counted, and nothing is reported, which is what they would come to."""
        # scope "step": one bad block masks every write
        writes = [ok if step_ok is None or clean else ok & step_ok for _, ok in judged]
        applies = []
        for (run, _), write in zip(judged, writes):
            if run.D is not None:
                applies += self._by_rates(run.cfg.post, run.bucket, run.bucket.params, run.D, write)
        post.apply_together_(applies, all_ok=clean)
        copies: list[tuple[Tensor, Tensor]] = []
        for (run, ok), write in zip(judged, writes):
            uncounted = not clean and _uncounted(run.old.calls, _used(run.ok, step_ok))
            self._write_state(
                run.bucket, run.old, run.new, write, ok, copies=copies, clean=clean, uncounted=uncounted, staged=run.staged
            )
        if copies:
            torch._foreach_copy_([o for o, _ in copies], [n for _, n in copies])
        reports: list[_Pending | None] = []
        for (run, ok), write in zip(judged, writes):
            if run.defer:
                compose.run_deferred_(run.defer, write, all_ok=clean or None)
            report = self._reports and not clean  # a clean run has nothing to report
            reports.append(_Pending(run.bucket.params, ok, run.new.step, group=run.bucket.group, step_ok=step_ok) if report else None)
        return reports

    def _by_rates(
        self, post_: post.Post, bucket: _Bucket, params: list[Tensor], D: Tensor, ok: Tensor
    ) -> list[tuple[post.Post, list[Tensor], Tensor, Any, Any, Tensor]]:
        """:func:`post.apply_together_`'s work for the bucket's direction ``D`` of ``params`` (its blocks, in order):
        one entry, or one per run of blocks of one param group (:attr:`_Bucket.runs`), each with its group's rates.
        ``params``: the bucket's :attr:`_Bucket.blocks` (those it stacks, or under work sharding every rank's)."""
        runs = bucket.runs
        if len(runs) <= 1:
            return [(post_, params, D, *_rates(self.param_groups[bucket.group]), ok)]
        return [(post_, params[lo:hi], D[lo:hi], *_rates(self.param_groups[gi]), ok[lo:hi]) for gi, lo, hi in runs]

    def _small_cpu(self, bucket: _Bucket) -> KronConfig | None:
        """The config of a bucket that :meth:`_step_small_buckets` steps with the others: on a CPU whose
        verdicts are read on the host (:func:`linalg.host_verdicts`), neither work-sharded nor FSDP2, its
        group not compiled, not plain AdamW, blocks of at most ``_SMALL_TOGETHER_MAX`` entries and sides of at
        most ``_SMALL_TOGETHER_MAX_SIDE``; ``None`` for any other bucket."""
        layout = bucket.layout
        if (
            bucket.plan is not None or bucket.fsdp is not None or not bucket.params
            or not linalg.host_verdicts(bucket.blocks[0]) or self._group_cfgs[bucket.group].compile
            or layout.m * layout.n > _SMALL_TOGETHER_MAX or max(layout.m, layout.n) > _SMALL_TOGETHER_MAX_SIDE
        ):
            return None
        cfg = self._bucket_config(bucket)
        if self._raw_gradients(cfg, bucket) is not None:
            return None  # a plain AdamW bucket keeps its own path (_step_plain_adam)
        return cfg

    def _step_small_buckets(self, work: list[tuple[_Bucket, KronConfig]], step_ok: Tensor | None) -> dict[int, "_Pending"]:
        """:meth:`_step_bucket` for small buckets of a CPU (:meth:`_small_cpu`) together, the same bits: on small
        blocks the calls around the pipeline, not its arithmetic, are the cost.

        Each bucket's pipeline runs in turn (:meth:`_run`), but for the rotated-Adam calls, a refresh due or not, made
        together (:meth:`_rotated_adams`, :func:`compose.rotated_adam_due`); then every tensor their steps changed is
        tested at once (:func:`linalg.finite_each`: their extremes, and one read on the host), and only a bucket with a
        non-finite one is tested block by block (:func:`compose.finite_new_state`), made again by its pipeline first
        where its refresh made together left a non-finite new basis (:func:`_untested_basis_not_finite`: the
        pipeline's refresh keeps such a block's old basis);
        then their writes go together (:meth:`_finish`). The buckets' new states are all held until then:
        :meth:`step` hands them over in runs of at most ``_SMALL_TOGETHER_BUDGET`` entries. No compiled twin
        runs here (the buckets of compiled groups are not taken), and when one bucket's pipeline raises,
        nothing of the run is written. Returns the reports to queue, by ``id`` of the bucket."""
        with compiled.scope(False):  # each bucket's own turn runs in its group's scope: none is compiled here
            runs: list[_Run | None] = []
            together: list[tuple[int, _Bucket, KronConfig]] = []  # rotated Adam's calls (compose.rotated_adams)
            last: list[tuple[int, _Bucket, KronConfig]] = []  # those that may update their moments in place
            eigen: list[tuple[int, _Bucket, KronConfig]] = []  # the eigenvalue rule's calls (compose.eigen_steps)
            for bucket, cfg in work:
                if bucket.state is None:
                    self._init_bucket(bucket)
                if _ROTATED_ADAMS_TOGETHER and compose.rotated_adam_due(cfg, bucket.layout, bucket.state, bucket.state_dtype):  # type: ignore[arg-type]
                    (last if self._in_place_due(bucket, cfg) else together).append((len(runs), bucket, cfg))
                    runs.append(None)
                elif _EIGEN_STEPS_TOGETHER and compose.eigen_steps_due(
                    cfg, bucket.layout, bucket.state, bucket.state_dtype  # type: ignore[arg-type]
                ):
                    eigen.append((len(runs), bucket, cfg))
                    runs.append(None)
                else:
                    runs.append(self._run(bucket, cfg))
            if eigen:
                for (at, _, _), run in zip(eigen, self._eigen_steps(eigen)):
                    runs[at] = run
            # the calls that may update their moments in place (no refresh due) come last, once every other call is
            # made, tested and made again where it must be: a call that raises before then leaves no moment written
            verdicts: dict[int, tuple[_Run, Tensor]] = {}
            flags: list[bool] = []
            for calls in (together, last):
                if calls:
                    for (at, _, _), run in zip(calls, self._rotated_adams(calls, step_ok)):
                        runs[at] = run
                made = [(i, run) for i, run in enumerate(runs) if run is not None and i not in verdicts]
                flags += self._judge(made, {at for at, _, _ in (*together, *eigen)}, verdicts)
            judged = [verdicts[i] for i in range(len(runs))]
            # every new state finite, and every gradient (the step's flag, or the runs' own): read here, where
            # it costs nothing, instead of each bucket's masks combined, read and counted at its writes (a step
            # flag on another device, whose first gradients lie there, is not waited for: no clean run then)
            if step_ok is None:
                clean = all(flags) and bool(torch.cat([run.ok for run in runs]).all())
            else:
                clean = all(flags) and linalg.host_verdicts(step_ok) and bool(step_ok)
            reports = self._finish(judged, step_ok, clean=clean)
            self._carry_bounds(run for run, _ in judged)
        return {id(run.bucket): report for (run, _), report in zip(judged, reports) if report is not None}

    def _judge(self, made: list[tuple[int, "_Run"]], made_together: set[int], verdicts: dict[int, tuple["_Run", Tensor]]) -> list[bool]:
        """:meth:`_step_small_buckets`' test of runs ``(position, run)``: every tensor their steps changed at once
        (:func:`linalg.finite_each`: their extremes, and one read on the host), a run with a non-finite one block by
        block (:func:`compose.finite_new_state`), made again by its pipeline first where its refresh made together
        (at a position in ``made_together``) left a non-finite new basis. Puts each run's ``(run, ok)`` into
        ``verdicts`` by position; returns the flags read."""
        changed = [run.changed() for _, run in made]
        every = [t for tensors in changed for t in tensors]
        flags = linalg.finite_each(every).tolist() if every else []  # one read on the host for all
        start = 0
        for (i, run), tensors in zip(made, changed):
            finite = all(flags[start : start + len(tensors)])
            start += len(tensors)
            if not finite and i in made_together and _untested_basis_not_finite(run):
                # a refresh made together left its new basis untested (compose.rotated_adams): the pipeline
                # makes the call again, keeping the old basis of a block whose new one is not finite
                run = self._run(run.bucket, run.cfg)
                tensors = run.changed()
            ok = run.ok
            if not finite and tensors:
                ok = ok & linalg.finite_blocks(*tensors)  # block by block: compose.finite_new_state's test
            verdicts[i] = (run, ok)
        return flags

    def _plain_adam_cpu(self, bucket: _Bucket) -> tuple[KronConfig, list[Tensor]] | None:
        """``(config, raw gradients)`` of a bucket that :meth:`_step_plain_adams` steps together with the
        others: a plain AdamW bucket (:meth:`_raw_gradients`, its gradients of the state's dtype or of a narrower
        one: bfloat16 parameters under a float32 state) of a CPU, neither work-sharded nor FSDP2, whose
        blocks take the block-by-block form (``_BLOCKWISE_MIN``); ``None`` for any other bucket."""
        if bucket.plan is not None or not bucket.params or bucket.blocks[0].device.type != "cpu":
            return None
        if bucket.layout.m * bucket.layout.n < _BLOCKWISE_MIN:
            return None
        cfg = self._bucket_config(bucket)
        grads = self._raw_gradients(cfg, bucket)
        if grads is None:
            return None
        if bucket.state is None:  # as _step_bucket would at its turn
            self._init_bucket(bucket)
        return cfg, grads

    def _step_plain_adam(self, bucket: _Bucket, step_ok: Tensor | None, cfg: KronConfig, grads: list[Tensor]) -> None:
        """:meth:`_step_bucket` for a plain AdamW bucket on its raw gradients (:meth:`_raw_gradients`):
        only the two moments and the counters change, so they are checked (:func:`_plain_adam_ok`) and
        written directly, on the whole stacks with device-side masks, with the same bits as
        :meth:`_step_bucket`. This is the form of other devices; :meth:`step` hands a CPU's plain AdamW
        buckets to :meth:`_step_plain_adams` before any other bucket (:meth:`_plain_adam_cpu`)."""
        old = bucket.state
        D, new = compose.adam_step(cfg, old, grads, self._scratch(bucket, batched=True))  # type: ignore[arg-type]
        ok = _plain_adam_ok(new.inner.exp_avg_sq, D)
        write = ok if step_ok is None else ok & step_ok
        for post_, params, D_, lr, weight_decay, write_ in self._by_rates(cfg.post, bucket, bucket.params, D, write):
            post_.apply_(params, D_, lr=lr, weight_decay=weight_decay, ok=write_)
        compose.masked_write_(old.inner.exp_avg, new.inner.exp_avg, write)  # type: ignore[union-attr]
        compose.masked_write_(old.inner.exp_avg_sq, new.inner.exp_avg_sq, write)  # type: ignore[union-attr]
        report = self._count_plain(bucket, ok, step_ok)
        if report is not None:
            self._pending.append(report)

    def _plain_muon_cpu(self, bucket: _Bucket, cfg: KronConfig) -> bool:
        """Whether :meth:`_step_plain_muon` may step this bucket: a plain Muon bucket (:func:`compose.is_plain_muon`,
        the verdict kept per config, layout and dtype) of a CPU whose verdicts are read on the host
        (:func:`linalg.host_verdicts`), neither work-sharded nor FSDP2, its gradients in its state's dtype (or a
        narrower one it holds exactly, :func:`compose.widens_exactly`: each block cast before its arithmetic) and
        in memory of their own, and its momentum a contiguous stack that may be updated in place here (not an
        inference tensor outside ``inference_mode``: the general path replaces such a stack)."""
        if not _PLAIN_MUON_CPU or bucket.plan is not None or bucket.fsdp is not None or not linalg.host_verdicts(bucket.blocks[0]):
            return False
        key = (id(cfg), bucket.layout, bucket.state_dtype)
        plain = self.__dict__.setdefault("_plain_muon", {}).get(key)
        if plain is None:
            plain = self._plain_muon[key] = compose.is_plain_muon(cfg, bucket.layout, bucket.state_dtype)
        if not plain:
            return False
        buf = bucket.state.inner.momentum_buffer  # type: ignore[union-attr]
        grads, dtype = [p.grad for p in bucket.params], bucket.state_dtype
        return (
            buf.numel() > 0
            # a stack of the momentum's own layout (one loaded as saved, compose._stack_like) makes the general
            # path's iteration read it in that layout, which may round otherwise
            and buf.is_contiguous()
            and (torch.is_inference_mode_enabled() or not buf.is_inference())
            # gradients of the state's dtype, or of a narrower one it holds exactly (cast block by block)
            and all(compose.state_holds(g.dtype, dtype) for g in grads)  # type: ignore[union-attr]
            # a gradient in a parameter's memory (p.grad = p.detach(), or a view into a buffer it shares) would be
            # read again after that parameter's write; the general path reads every gradient into its stack first
            and not _overlapping(grads, bucket.params)  # type: ignore[arg-type]
        )

    def _step_plain_muon(self, bucket: _Bucket, step_ok: Tensor | None, cfg: KronConfig) -> bool:
        """:meth:`_step_bucket` for a plain Muon bucket of a CPU (:meth:`_plain_muon_cpu`), the same bits, its
        elementwise work block by block so that it stays in cache: each block's look-ahead is written into one
        stack kept across steps, the iteration runs on that stack in one batched call, then each block's
        direction is made in a block-sized scratch, tested, and applied, and its momentum advanced in place.
        The general path stacks the gradients, makes the new momentum and the direction as whole stacks and
        tests and copies them at memory speed: on 4 layers of d = 256 (stepped in turn, the same weights) this
        form took 0.90–0.91 of its step where neither faulted pages in, 0.72–0.82 where the general path's
        freed temporaries came back from the system each step (this form keeps its few).

        Nothing is tested twice and nothing is left untested: the gradients' extremes (from :meth:`_all_finite`
        where it read them, else one pass) and the momentum's prove the new momentum and the look-ahead finite
        (:func:`compose.momentum_block_is_safe`), and the iteration keeps a finite input finite (a named
        schedule: its norm scales the input to at most one, and each of its polynomials keeps such a
        spectrum bounded), so each block's direction alone is tested, where it lies in cache. A bucket with a
        block that cannot be proven goes to the general path whole, before anything is written (``False``);
        a block whose direction is not finite is skipped, its weights and momentum left as they were, and
        counted, as the general path would. Returns whether it stepped the bucket."""
        if not self._plain_muon_cpu(bucket, cfg):
            return False
        inner = cfg.inner
        state = bucket.state
        buf = state.inner.momentum_buffer  # type: ignore[union-attr]
        grads = [to_block(p.grad, spec) for p, spec in zip(bucket.params, bucket.specs)]  # type: ignore[arg-type]
        U, D, iteration = self._muon_scratch(buf, (inner.nesterov and inner.look_ahead_dtype(buf.dtype)) or buf.dtype)  # type: ignore[union-attr]
        w = 1 - inner.momentum**2 if inner.nesterov else 1 - inner.momentum  # type: ignore[union-attr]
        extremes = []
        for k, (p, g) in enumerate(zip(bucket.params, grads)):
            extremes.extend([*self._grad_extremes(p.grad), *torch.aminmax(buf[k])])  # type: ignore[arg-type]
            # the look-ahead (without Nesterov: the new momentum), in cache; a narrower gradient cast into D first
            compose.muon_look_ahead(buf[k], compose.widened_block(g, D), w, out=U[k])
        bounds = torch.stack(extremes).view(-1, 4).abs_().tolist()
        if not all(compose.momentum_block_is_safe(buf.dtype, max(g0, g1), max(b0, b1)) for g0, g1, b0, b1 in bounds):
            return False  # a non-finite or huge gradient, or a huge momentum: the general path's guards decide
        O = inner.orthogonalize(U, buffers=iteration)  # type: ignore[union-attr]
        s = inner.shape_factor(bucket.layout)  # type: ignore[union-attr]
        whole = True if step_ok is None else bool(step_ok)
        verdicts = []
        for lo, hi, _, _, factors in self._run_factors(bucket, cfg.post, buf):  # each run of one group's blocks
            for k in range(lo, hi):
                p, g = bucket.params[k], grads[k]
                direction = compose.muon_block_direction(O[k], s, out=D)
                good = all(map(math.isfinite, torch.stack(torch.aminmax(direction)).tolist()))
                verdicts.append(good)
                if good and whole:
                    cfg.post.apply_block_(p, direction, factors)
                    # (D, the direction, written: a narrower gradient cast into it again)
                    g = compose.widened_block(g, D)
                    compose.muon_momentum_(buf[k], g, inner.momentum)  # type: ignore[union-attr]
        report = self._count_plain(bucket, verdicts, step_ok)
        if report is not None:
            self._pending.append(report)
        return True

    def _muon_scratch(self, buf: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The look-ahead stack (``buf``'s shape, ``dtype``), a block-sized direction (``buf``'s dtype) and the
        iteration's buffers (:func:`linalg.newton_schulz`'s ``buffers``) of :meth:`_step_plain_muon`, kept across
        steps (:data:`_CPU_KEEPS_SCRATCH`) as :meth:`_scratch` keeps its."""
        make = lambda: (torch.empty(buf.shape, dtype=dtype, device=buf.device), torch.empty(buf.shape[1:], dtype=buf.dtype, device=buf.device), {})  # noqa: E731
        return self._kept(("muon", tuple(buf.shape), dtype, buf.dtype, buf.device), make) if _CPU_KEEPS_SCRATCH else make()  # type: ignore[return-value]

    def _count_plain(self, bucket: _Bucket, ok: Tensor | list[bool], step_ok: Tensor | None) -> "_Pending | None":
        """After a plain AdamW or Muon bucket's step: its counters and its skipped blocks (``ok``: the ``(b)`` mask, or
        the blocks' verdicts as read on the host). Returns the report of its mask for the caller to queue
        (:class:`_Pending`), or ``None``: under ``nonfinite = "skip"``, and where every verdict read on
        the host is good (nothing to count or report)."""
        old = bucket.state
        # from the gradients' flags, as every other path decides (a finite gradient whose update overflowed
        # counts its call); a pass over the gradients at a first call only
        uncounted = old.calls == 0 and _uncounted(0, _used(linalg.finite_each([p.grad for p in bucket.params]), step_ok))  # type: ignore[union-attr, misc]
        calls, step = (old.calls, old.step) if uncounted else (old.calls + 1, old.step + 1)  # type: ignore[union-attr]
        bucket.state = compose.evolve(old, calls=calls, step=step)  # type: ignore[misc]
        if isinstance(ok, list):
            # verdicts read on the host: with every block finite (nearly every step) there is nothing to
            # count and nothing to report
            ok = None if all(ok) else torch.tensor(ok, device=bucket.blocks[0].device)
        for p in bucket.params:
            self.state[p].update(calls=calls, step=step)
        if ok is None:
            return None
        bucket.nonfinite.add_((~ok).long())  # type: ignore[union-attr]
        if not self._reports:
            return None
        return _Pending(bucket.params, ok, step, group=bucket.group, step_ok=step_ok)

    def _step_plain_adams(
        self, work: list[tuple[_Bucket, KronConfig, list[Tensor]]], step_ok: Tensor | None
    ) -> dict[int, "_Pending"]:
        """The CPU form of :meth:`_step_plain_adam` for plain AdamW buckets (:meth:`_plain_adam_cpu`), all of
        one step's together whatever their shapes, block by block so that a block's work stays in cache, as
        a per-tensor AdamW's does (passes over whole stacks run at memory speed). A gradient narrower than the state
        (a bfloat16 parameter's, under the float32 state) is cast block by block into the block's scratch tensor of
        the state's dtype first (:func:`compose.widened_block`): the values the general path's stack would hold, the
        same bits, without that stack (the general path cost 2.4 × torch's AdamW on bfloat16 parameters, this 1.2 ×).

        A block proven finite from its extremes (:func:`compose.adam_block_is_safe`) is updated in place,
        through torch's fused AdamW kernel with every other proven block of the same settings, across the
        buckets, where :func:`compose.fuses_adamw` allows; any other block's new moments and direction go
        into one block-sized scratch set (:func:`compose.adam_block`), are checked there and, when finite,
        copied into its stacks and applied. On a CPU a verdict read on the host costs nothing (there is no
        device to wait for). The extremes of the small blocks are read together (:meth:`_adam_bounds_small`:
        a few calls and one read for all of them, where a bucket of one small block used to cost about as
        many calls as a large one); a large block's are read right before its work, which then finds
        them in cache. Where the last step's bounds still hold (:class:`_MomentBounds`), a large block's, and a
        small block's while fewer than ``_ADAM_VERDICTS_TOGETHER_MIN`` step, are taken instead where they prove the
        block. Returns the reports to queue (:meth:`_count_plain`), by ``id`` of the bucket."""
        whole = True if step_ok is None else bool(step_ok)
        # each bucket's moments as block views, made in one call each
        moments = [(b.state.inner.exp_avg.unbind(0), b.state.inner.exp_avg_sq.unbind(0)) for b, _, _ in work]  # type: ignore[union-attr]
        # each bucket's moments' bounds from the last step's, where they still hold (_MomentBounds.valid: no load, edit
        # or other path's write since), popped now and made again below once this step's writes are done
        held = [self._carried_bounds().pop(b, None) for b, _, _ in work]
        knowns = [_MomentBounds.valid(h, b) if whole else None for h, (b, _, _) in zip(held, work)]
        # the small blocks' verdicts, per bucket by block (None: a large block's, made at its turn); without a whole
        # step nothing is proven (nor read)
        places = [
            [i for i, p in enumerate(bucket.params) if p.numel() <= _ADAM_BOUNDS_TOGETHER_MAX] if whole else []
            for bucket, _, _ in work
        ]
        # below _ADAM_VERDICTS_TOGETHER_MIN small blocks in the step (judged one by one in Python, their moments read by
        # a few foreach reductions whose calls cost a block's work each), their bounds are carried past the step as a
        # large block's are: a bucket of them whose bounds were carried reads no moment where those bounds and its
        # gradients' extremes (the step's check's, read together) prove every block. The test is monotone in its
        # bounds, so where a looser carried one says no, the moments are read and judged as without it. From that
        # many, their verdicts are made on tensors and nothing is carried (a bound a block kept in Python costs more)
        carry = sum(map(len, places)) < _ADAM_VERDICTS_TOGETHER_MIN
        by_known = [k for k, (these, known) in enumerate(zip(places, knowns)) if carry and these and known is not None]
        carried_grads = [work[k][0].params[i].grad for k in by_known for i in places[k]]
        extremes = iter(self._grad_extremes_small(carried_grads).tolist() if carried_grads else [])  # type: ignore[arg-type]
        from_known: dict[int, list[tuple[float, float, float]]] = {}
        for k in by_known:
            (bucket, cfg, _), known, dtype = work[k], knowns[k], moments[k][0][0].dtype
            t = bucket.state.step + 1  # type: ignore[union-attr]
            bounds = [(_abs_bound(*next(extremes)), known.m[i], known.v[i]) for i in places[k]]  # type: ignore[union-attr]
            if all(compose.adam_block_is_safe(cfg, t, dtype, *bound) for bound in bounds):
                from_known[k] = bounds
        small: list[tuple[Tensor, Tensor, Tensor]] = []
        terms: list[tuple[float, float, float]] = []
        runs: list[tuple[int, Tensor | None, Tensor | None]] = []  # per bucket: its small blocks, its moments' stacks
        check: list[bool] = []  # per small block: its second moment read for an entry below 0 (_Bucket.nonnegative_v)
        for k, ((bucket, cfg, _), (ms, vs), these) in enumerate(zip(work, moments, places)):
            if k in from_known:
                runs.append((0, None, None))
                continue
            small += [(bucket.params[i].grad, ms[i], vs[i]) for i in these]  # type: ignore[misc]
            if these:
                nonnegative, v_stack = bucket.nonnegative_v, bucket.state.inner.exp_avg_sq  # type: ignore[union-attr]
                check += [nonnegative is None or not nonnegative.holds(v_stack)] * len(these)
            terms += [compose.adam_safety_terms(cfg, bucket.state.step + 1, ms[0].dtype)] * len(these)  # type: ignore[union-attr]
            whole_stack = len(these) == len(ms) >= _ADAM_STACK_EXTREMES_MIN
            inner = bucket.state.inner  # type: ignore[union-attr]
            runs.append((len(these), inner.exp_avg if whole_stack else None, inner.exp_avg_sq if whole_stack else None))
        verdicts_read, bounds_read = self._adam_small_verdicts(small, terms, runs, check)
        judged, read_bounds = iter(verdicts_read), None if bounds_read is None else iter(bounds_read)
        fused: dict[tuple, tuple[KronConfig, list[tuple[Tensor, Tensor, Tensor, Tensor]]]] = {}
        verdicts: list[list[bool]] = []
        carried: list[tuple[_Bucket, KronConfig, list[tuple[float, float, float]], list[bool]]] = []
        for k, ((bucket, cfg, grads), (ms, vs), these, known) in enumerate(zip(work, moments, places, knowns)):
            state = bucket.state
            t = state.step + 1  # type: ignore[union-attr]
            safe: list[bool | None] = [None] * len(bucket.params)
            # each block's (max |g|, max |m|, max v) and whether it was written: a small block's from the bounds carried
            # (with its gradient's) or from its moments read above, a large block's from the carried bounds where they
            # hold, else read at its turn
            bounds_of: list[tuple[float, float, float] | None] = [None] * len(bucket.params)
            for j, i in enumerate(these):
                if k in from_known:
                    safe[i], bounds_of[i] = True, from_known[k][j]
                else:
                    safe[i] = next(judged)
                    bounds_of[i] = None if read_bounds is None else next(read_bounds)
            used: list[tuple[float, float, float]] = []
            written: list[bool] = []
            # the block-sized scratch set is taken only where a block is computed outside the fused kernel: a run
            # whose blocks all go through it (torch's AdamW arithmetic, proven finite) keeps no scratch at all
            out: tuple[Tensor, Tensor, Tensor] | None = None
            # every proven block of these settings, whichever its bucket, in one call below (the parameter's dtype is
            # the bucket's, its gradients' the state's: _raw_gradients)
            fuse = compose.fuses_adamw(cfg) and self._fuse_adamw and bucket.params[0].dtype == ms[0].dtype
            mine = []
            for i, p, g, factors, into in self._rated_blocks(bucket, grads, cfg, t, fused if fuse else None):
                m, v = ms[i], vs[i]
                verdict = safe[i]
                if bounds_of[i] is not None:  # a small block's, judged above
                    used.append(bounds_of[i])  # type: ignore[arg-type]
                elif verdict is None and whole:  # a large block's bounds are read right before its work, in cache
                    bounds = None
                    if known is not None:  # its moments' from the last step's, its gradient's from the step's check
                        bounds = (_abs_bound(*torch.stack(self._grad_extremes(p.grad)).tolist()), known.m[i], known.v[i])  # type: ignore[arg-type]
                        if not compose.adam_block_is_safe(cfg, t, m.dtype, *bounds):
                            bounds = None  # the test is monotone in its bounds: a looser one says no first, so read them
                    if bounds is None:
                        bounds = self._adam_bounds(p.grad, m, v)  # type: ignore[arg-type]
                    used.append(bounds)
                    verdict = compose.adam_block_is_safe(cfg, t, m.dtype, *bounds)
                written.append(bool(verdict))  # a block the scratch path takes: decided below
                if verdict:
                    # finite whatever the entries: computed in place, nothing to check or copy
                    mine.append(True)
                    # the fused kernel writes the block in place: only where it is the parameter's own memory (a
                    # non-contiguous parameter, e.g. a channels_last weight, reshapes into a copy)
                    # (and not on a gradient with torch's lazy negation bit, which the kernel's inputs refuse)
                    # (nor on a gradient of another dtype than the moments', which the kernel takes all alike)
                    fits = p.is_contiguous() and g.is_contiguous() and not g.is_neg() and g.dtype == m.dtype
                    if into is not None and fits:
                        into.append((to_block(p, bucket.specs[i]), g, m, v))
                        continue
                    out = out or self._scratch(bucket, batched=False)
                    D = compose.adam_block(cfg, t, m, v, compose.widened_block(g, out[2]), (m, v, out[2]))
                    cfg.post.apply_block_(p, D, factors)
                    continue
                out = out or self._scratch(bucket, batched=False)
                D = compose.adam_block(cfg, t, m, v, compose.widened_block(g, out[2]), out)
                good = bool(_plain_adam_ok(out[1][None], D[None]))
                mine.append(good)
                written[-1] = good and whole
                if good and whole:
                    cfg.post.apply_block_(p, D, factors)
                    m.copy_(out[0])
                    v.copy_(out[1])
            verdicts.append(mine)
            if len(used) == len(bucket.params):
                carried.append((bucket, cfg, used, written))
        for (_, _, lr, weight_decay, t, _), (cfg, blocks) in fused.items():
            if not blocks:
                continue
            w_, g_, m_, v_ = (list(x) for x in zip(*blocks))
            compose.fused_adamw_(cfg, t, w_, g_, m_, v_, lr=lr, weight_decay=weight_decay)
        reports = {}
        for (bucket, _, _), mine in zip(work, verdicts):
            report = self._count_plain(bucket, mine, step_ok)
            if report is not None:
                reports[id(bucket)] = report
        for bucket, cfg, used, written in carried:  # every write and count of the step made: what its moments now keep
            after = _MomentBounds.after(bucket, cfg.inner.betas, used, written)
            if after is not None:
                self._carried_bounds()[bucket] = after
        for (bucket, _, _), mine, these in zip(work, verdicts, places):
            # every block written: each new second moment is β₂ v + (1 − β₂) g² of a v ≥ 0 (a block whose v held an entry
            # below 0 is written only where its new v holds none, its direction being finite)
            if not these:
                continue
            v_stack = bucket.state.inner.exp_avg_sq  # type: ignore[union-attr]
            written = len(mine) == len(bucket.params) and all(mine)
            bucket.nonnegative_v = _Seen.of(v_stack, bucket.nonnegative_v) if written else None
        return reports

    def _run_factors(self, bucket: _Bucket, post_: post.Post, like: Tensor) -> Iterator[tuple[int, int, Any, Any, tuple[Tensor, Tensor | None]]]:
        """``(lo, hi, lr, weight_decay, factors)`` per run of one param group's blocks (:attr:`_Bucket.runs`): the
        group's rates and their write factors for a block written on its own (:meth:`Post.block_factors`, of
        ``like``'s dtype and device), for the CPU's block-by-block forms."""
        for gi, lo, hi in bucket.runs:
            lr, weight_decay = _rates(self.param_groups[gi])
            yield lo, hi, lr, weight_decay, post_.block_factors(like, lr=lr, weight_decay=weight_decay)

    def _rated_blocks(
        self, bucket: _Bucket, grads: list[Tensor], cfg: KronConfig, t: int, fused: dict[tuple, Any] | None
    ) -> Iterator[tuple[int, Tensor, Tensor, tuple[Tensor, Tensor | None], list | None]]:
        """For :meth:`_step_plain_adams`: each block's position, parameter and gradient with the write factors of its
        param group's rates (:meth:`Post.block_factors`) and, where ``fused`` is given, the list of blocks torch's
        fused AdamW kernel steps with those settings (its entry in ``fused``), both made once per run of one group's
        blocks (:attr:`_Bucket.runs`)."""
        for lo, hi, lr, weight_decay, factors in self._run_factors(bucket, cfg.post, bucket.state.inner.exp_avg):  # type: ignore[union-attr]
            into = None
            if fused is not None:
                key = (cfg.inner.betas, cfg.inner.eps, lr, weight_decay, t, bucket.params[0].dtype)
                into = fused.setdefault(key, (cfg, []))[1]
            for i in range(lo, hi):
                yield i, bucket.params[i], grads[i], factors, into

    def _sanitized_gradients(self, bucket: _Bucket, grads: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The bucket's gradients stacked ``(b m n)`` with non-finite entries zeroed (which keeps bad
        blocks out of batched solvers), and the ``(b)`` flags of the blocks that were finite."""
        hits = [self._checked(g) for g in grads]
        # every gradient checked this step (of this very tensor at this version, _checked), in the state's dtype or a
        # narrower one it holds exactly (a bfloat16 parameter's under a float32 state: cast as it is stacked)
        if all(h is not None and compose.state_holds(g.dtype, dtype) for h, g in zip(hits, grads)):
            ok = _GradChecks.rows(hits, "each")  # type: ignore[arg-type]
            blocks = [to_block(g, s) for g, s in zip(grads, bucket.specs)]  # type: ignore[arg-type]
            same = all(block.dtype == dtype for block in blocks)
            # each read finite on the host by the check: nothing to zero, one copy
            if all(t.read is not None and t.read[k] for t, k in hits):  # type: ignore[misc]
                if same and len(blocks) == 1 and blocks[0].is_contiguous():
                    # one block: a view of it, not a copy (the stages read G and never write it; the pipeline's
                    # checks name a stage that does)
                    return blocks[0].unsqueeze(0), ok
                if same:
                    return torch.stack(blocks), ok
                G = torch.empty((len(blocks), *blocks[0].shape), dtype=dtype, device=blocks[0].device)
                for i, block in enumerate(blocks):
                    G[i].copy_(block)  # cast as it is placed: one pass
                return G, ok
            # stacked and sanitized in one pass per block
            G = torch.empty((len(blocks), *blocks[0].shape), dtype=dtype, device=blocks[0].device)
            for i, block in enumerate(blocks):
                torch.nan_to_num(block.to(dtype), nan=0.0, posinf=0.0, neginf=0.0, out=G[i])
            return G, ok
        G = torch.stack([to_block(g, s).to(dtype) for g, s in zip(grads, bucket.specs)])  # type: ignore[arg-type]
        ok = linalg.finite_blocks(G)
        return G.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), ok

    def _checked(self, g: Tensor) -> tuple["_GradChecks", int] | None:
        """Where :meth:`_all_finite` recorded what it found on the gradient ``g`` this step: its device's table
        and ``g``'s row there (its finiteness flag, its smallest and largest entries, and on a CPU the flag read on
        the host); ``None`` when it did not check this very tensor (or it has been changed in place since)."""
        hit = getattr(self, "_grad_flags", {}).get(id(g))
        if hit is None or hit[0]() is not g or hit[1] != _version(g):
            return None
        return hit[2], hit[3]

    def _adam_bounds(self, grad: Tensor, m: Tensor, v: Tensor) -> tuple[float, float, float]:
        """``max |g|``, ``max |m|`` and ``max v`` of one block (``grad`` its parameter's gradient, ``m``, ``v``
        its moments), read on the host (NaN where ``g`` holds one, and for ``max v`` where an entry of ``v`` is below
        0: :func:`_second_moment_bound`). The gradient's extremes come from :meth:`_all_finite` when it checked it this
        step, else from one pass over it."""
        g_lo, g_hi = self._grad_extremes(grad)
        m_lo, m_hi = torch.aminmax(m)
        v_lo, v_hi = torch.aminmax(v)
        lo, hi, m0, m1, v0, v1 = torch.stack([g_lo, g_hi, m_lo, m_hi, v_lo, v_hi]).tolist()
        return _bounds(lo, hi, m0, m1, _second_moment_max(v0, v1))

    def _grad_extremes(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """The smallest and largest entries of a parameter's gradient: from :meth:`_all_finite` where it read them
        this step (:meth:`_checked`), else from one pass."""
        hit = self._checked(grad)
        return tuple(hit[0].extremes[hit[1]].unbind(0)) if hit is not None else tuple(torch.aminmax(grad))  # type: ignore[return-value]

    def _adam_small_verdicts(
        self, blocks: list[tuple[Tensor, Tensor, Tensor]], terms: list[tuple[float, float, float]],
        runs: list[tuple[int, Tensor | None, Tensor | None]] | None = None, check: list[bool] | None = None,
    ) -> tuple[list[bool], list[tuple[float, float, float]] | None]:
        """:func:`compose.adam_block_is_safe` of small blocks ``(grad, m, v)``, each with its
        :func:`compose.adam_safety_terms`, and each block's bounds ``(max |g|, max |m|, max v)`` (:func:`_bounds`, for
        the bounds carried past the step): from :meth:`_adam_bounds_small` one by one, or, from
        ``_ADAM_VERDICTS_TOGETHER_MIN`` blocks, their extremes judged together on the host's device in float64
        (:func:`compose.adam_blocks_are_safe`, the same verdicts in a dozen calls; no bounds then: ``None``).
        ``runs``: the blocks in order by bucket, each ``(count, m stack, v stack)``, the stacks given where the run is
        its bucket's every block (:meth:`_adam_extremes_small`). ``check``: the blocks whose second moment is read for
        an entry below 0 (:meth:`_moment_extremes`)."""
        if len(blocks) < _ADAM_VERDICTS_TOGETHER_MIN:
            bounds = self._adam_bounds_small(blocks, check)
            return [compose.adam_block_is_safe_of_terms(term, *bound) for term, bound in zip(terms, bounds)], bounds
        extremes = self._adam_extremes_small(blocks, runs, check).double()
        return compose.adam_blocks_are_safe(extremes, torch.tensor(terms, dtype=torch.float64)).tolist(), None

    def _adam_bounds_small(self, blocks: list[tuple[Tensor, Tensor, Tensor]], check: list[bool] | None = None) -> list[tuple[float, float, float]]:
        """:meth:`_adam_bounds` of many small blocks ``(grad, m, v)`` at once, the same values: each
        extreme by a ``foreach`` reduction over all the blocks (a smallest entry as the largest of the
        negated block) and one read on the host, instead of five calls and a read per block."""
        if not blocks:
            return []
        return [_bounds(*row) for row in self._adam_extremes_small(blocks, check=check).tolist()]

    def _adam_extremes_small(
        self, blocks: list[tuple[Tensor, Tensor, Tensor]], runs: list[tuple[int, Tensor | None, Tensor | None]] | None = None,
        check: list[bool] | None = None,
    ) -> Tensor:
        """``(k, 5)``: each small block's ``(min g, max g, min m, max m, max v)`` (:meth:`_adam_bounds_small`). With
        ``runs`` (:meth:`_adam_small_verdicts`), a run given its bucket's stacks takes its moments' extremes from
        them, three reductions over the stacks (the same values: a smallest or largest entry is exact), where the
        ``foreach`` reductions cost a call's work per block."""
        grads, ms, vs = (list(x) for x in zip(*blocks))
        check = [True] * len(vs) if check is None else check
        if runs is not None and any(m is not None for _, m, _ in runs):
            return torch.cat([self._grad_extremes_small(grads), *self._moment_extremes_by_run(ms, vs, runs, check)], dim=1)
        return torch.cat([self._grad_extremes_small(grads), *self._moment_extremes(ms, vs, check)], dim=1)

    @staticmethod
    def _moment_extremes(ms: list[Tensor], vs: list[Tensor], check: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, 1)`` each: the blocks' smallest and largest first moment and largest second moment, by ``foreach``;
        the second moment NaN where a block flagged in ``check`` holds an entry below 0 (:func:`_second_moment_bound`;
        the others' stacks are known to be as the last step left them, whose updates keep ``v ≥ 0``)."""
        m, v_hi = _foreach_extremes(ms), torch.stack(torch._foreach_max(vs))
        at = [i for i, c in enumerate(check) if c]
        if at:
            lo = _foreach_extremes([vs[i] for i in at])[:, 0]
            index = torch.tensor(at, device=v_hi.device)
            v_hi = v_hi.index_copy(0, index, _second_moment_bound(lo, v_hi[index]))
        return m[:, 0:1], m[:, 1:2], v_hi[:, None]

    def _moment_extremes_by_run(
        self, ms: list[Tensor], vs: list[Tensor], runs: list[tuple[int, Tensor | None, Tensor | None]], check: list[bool]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_moment_extremes`, a run with its stacks from them and the others' blocks in one ``foreach`` set."""
        rest, start = [], 0
        for count, m_stack, _ in runs:
            if m_stack is None:
                rest += range(start, start + count)
            start += count
        apart = torch.cat(self._moment_extremes([ms[i] for i in rest], [vs[i] for i in rest], [check[i] for i in rest]), dim=1) if rest else None
        pieces, taken = [], 0
        for count, m_stack, v_stack in runs:
            if not count:  # a bucket without small blocks
                continue
            if m_stack is None:
                pieces.append(apart[taken : taken + count])  # type: ignore[index]
                taken += count
            else:
                lo, hi = linalg.block_min_max(m_stack)
                v_lo, v_hi = linalg.block_min_max(v_stack)  # type: ignore[arg-type]
                pieces.append(torch.stack([lo, hi, _second_moment_bound(v_lo, v_hi)], dim=1))
        table = torch.cat(pieces)
        return table[:, 0:1], table[:, 1:2], table[:, 2:3]

    def _grad_extremes_small(self, grads: list[Tensor]) -> Tensor:
        """``(k, 2)``: each gradient's smallest and largest entry, from the step's check where it made one."""
        # a gradient's (lo, hi) from the step's check of the gradients where it made one, else read here
        hits = [self._checked(g) for g in grads]
        if all(h is not None for h in hits):
            return _GradChecks.rows(hits, "extremes")  # type: ignore[arg-type]
        rows = [None if h is None else h[0].extremes[h[1]] for h in hits]
        unread = [g for g, row in zip(grads, rows) if row is None]
        read = iter(_foreach_extremes(unread).unbind(0))
        return torch.stack([next(read) if row is None else row for row in rows])  # type: ignore[misc]

    def _carried_bounds(self) -> "weakref.WeakKeyDictionary[_Bucket, _MomentBounds]":
        """Plain AdamW's moment bounds by bucket (:class:`_MomentBounds`), a bucket's gone with it; not copied
        with the optimizer (a copy's stacks are other tensors, whose version counters start again), so a copy
        or an unpickled optimizer reads its moments at its first step."""
        found = self.__dict__.get("_moment_bounds")
        if found is None:
            found = self.__dict__["_moment_bounds"] = weakref.WeakKeyDictionary()
        return found

    def _scratch(self, bucket: _Bucket, *, batched: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Three tensors shaped like the bucket's moments (``batched``) or like one block of them, for
        :func:`compose.adam_step` / :func:`compose.adam_block`, kept across steps (one set per shape, dtype
        and device: the buckets step one after the other, each done with them before the next)."""
        like = bucket.state.inner.exp_avg  # type: ignore[union-attr]
        if not batched:
            like = like[0]
        make = lambda: tuple(torch.empty_like(like, memory_format=torch.contiguous_format) for _ in range(3))  # noqa: E731
        if like.device.type != "cpu" or not _CPU_KEEPS_SCRATCH:
            # a device's caching allocator hands a freed block back at no cost: a kept set would only hold 1.5 times
            # the moments' memory between steps (and one more set for each bucket size a split ever made)
            return make()  # type: ignore[return-value]
        return self._kept((tuple(like.shape), like.dtype, like.device), make)

    def _kept(self, key: tuple, make: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        """The scratch tensors kept across steps under ``key`` (made by ``make`` the first time): one set per
        shape, dtype and device, the buckets stepping one after the other, each done with them before the next.
        Made outside ``inference_mode`` even within it, so that a later step outside it may write into them."""
        scratch = self.__dict__.setdefault("_kept_scratch", {})
        if key not in scratch:
            with torch.inference_mode(False):
                scratch[key] = make()
        return scratch[key]

    def _raw_gradients(self, cfg: KronConfig, bucket: _Bucket) -> list[Tensor] | None:
        """For a plain AdamW bucket (:func:`compose.is_plain_adam`), its blocks' gradients ``(m n)`` as
        they are (views). Nothing is sanitized (no batched solver mixes the entries) and nothing is
        checked here: a non-finite gradient makes the new second moment non-finite, which the guard
        then sees. ``None`` for any other bucket, and where a gradient is neither of the state's dtype nor of a
        narrower one the state's holds exactly (:func:`compose.widens_exactly`: bfloat16 or float16 gradients of a
        float32 state, the usual state of bfloat16 parameters), which each form casts block by block before its
        arithmetic (:func:`compose.widened_block`)."""
        key = (id(cfg), bucket.layout, bucket.state_dtype)
        fast = self.__dict__.setdefault("_plain_adam", {}).get(key)
        if fast is None:
            fast = compose.is_plain_adam(cfg, bucket.layout, bucket.state_dtype)
            self._plain_adam[key] = fast  # the configs live until load_state_dict replaces them, which clears this
        if not fast:
            return None
        dtype = bucket.state_dtype
        grads = [p.grad for p in bucket.params]
        if not all(compose.state_holds(g.dtype, dtype) for g in grads):  # type: ignore[union-attr]
            return None
        return [to_block(g, s) for g, s in zip(grads, bucket.specs)]  # type: ignore[arg-type]

    def _write_state(
        self, bucket: _Bucket, old: compose.BucketState, new: compose.BucketState, write: Tensor, ok: Tensor,
        *, copies: list[tuple[Tensor, Tensor]] | None = None, clean: bool = False, uncounted: bool = False,
        staged: compose.StagedWrite | None = None,
    ) -> None:
        """The new state into the stacks in place (blocks where ``write`` is False keep the old), so the
        per-parameter views in ``self.state`` stay valid; ``ok`` counts the non-finite blocks. ``copies``:
        plain copies left to the caller (:func:`compose.write_`). ``clean``: ``write`` and ``ok`` are known to
        be all True (:meth:`_finish`), so nothing is counted. ``uncounted``: a first call that used no
        gradient (:func:`_uncounted`) keeps the counters it started from as well. ``staged``: ``new`` already
        walked against ``old`` (:func:`compose.stage_write`), whose writes are made here. Each ``state[p]``
        takes the counters that changed (its tensors are views of the stacks)."""
        counters: dict[str, Any] = {}
        if uncounted:
            new, staged = compose.with_scalars_of(new, old), None
        if staged is not None:
            bucket.state, replaced = compose.write_staged_(staged, write, copies=copies, all_ok=clean or None), False
            counters = staged.counters
        else:
            bucket.state, replaced = compose.write_(old, new, write, copies=copies, all_ok=clean or None, counters=counters)
        if not clean:
            bucket.nonfinite.add_((~ok).long())  # type: ignore[union-attr]
        if replaced:
            self._bind(bucket)
        elif counters:
            for p in bucket.params:
                self.state[p].update(counters)

    def _step_sharded(self, bucket: _Bucket, step_ok: Tensor | None) -> None:
        """One bucket with work sharding: this rank computes its blocks, one all-gather, every rank writes every block.

        The finiteness mask of every block comes from the gradients themselves (the
        same on every rank under DDP), so every rank skips the same blocks: a
        direction gathered for a skipped block is never applied anywhere. Whether the
        call writes at all (not a ``skip_first_call`` first call) is read from the
        plan's counter, which every rank keeps, owner or not.
        """
        plan = bucket.plan
        assert plan is not None
        cfg = self._bucket_config(bucket)
        dtype = bucket.state_dtype
        grads = [p.grad for p in plan.params]
        ok_all = linalg.finite_each(grads)  # type: ignore[arg-type]
        writes = plan.calls > 0 or not cfg.skip_first_call
        plan.calls += 1
        update = plan.calls - int(cfg.skip_first_call)  # the update number compose.step counts, on every rank
        D: Tensor | None = None
        D_all: Tensor | None = None
        if bucket.params:
            if bucket.state is None:
                self._init_bucket(bucket)
            mine = plan.index("owned", plan.owned(), ok_all.device)
            ok = ok_all.index_select(0, mine)
            G = torch.stack([to_block(p.grad, s).to(dtype) for p, s in zip(bucket.params, bucket.specs)])  # type: ignore[arg-type]
            G = G.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            old = bucket.state
            D, new = compose.step(cfg, bucket.layout, old, G)  # type: ignore[arg-type]
            if (D is not None) != writes:  # pragma: no cover - the plan's counter and the state's disagree
                raise RuntimeError(f"work sharding out of step: the plan counts {plan.calls - 1} calls, the state {old.calls}")  # type: ignore[union-attr]
            ok_new = compose.finite_new_state(new, old)  # an owned block whose update or state overflowed
            if D is not None:  # keeps its state (and its direction is not applied: below)
                ok_new = linalg.finite_blocks(D) if ok_new is None else ok_new & linalg.finite_blocks(D)
            if ok_new is not None:
                ok = ok & ok_new
                if D is not None:  # NaN marks the block in the gathered directions: every rank then skips it
                    D = D.masked_fill(~ok_new.view(-1, 1, 1), float("nan"))
        if writes:  # gathered (copied) before the state write: D may still read the old stacks
            D_all = plan.gather(D, (bucket.layout.m, bucket.layout.n), dtype=dtype, device=ok_all.device)
        uncounted = _uncount_plan(plan, _used(ok_all, step_ok))  # alike on every rank
        if bucket.params:
            self._write_state(bucket, old, new, ok if step_ok is None else ok & step_ok, ok, uncounted=uncounted)
        if D_all is not None:
            ok_all = ok_all & linalg.finite_blocks(D_all)  # the same gathered D on every rank (NaN: an owner's overflow)
            write_all = ok_all if step_ok is None else ok_all & step_ok
            for post_, params, D_, lr, weight_decay, write in self._by_rates(cfg.post, bucket, plan.params, D_all, write_all):
                post_.apply_(params, D_, lr=lr, weight_decay=weight_decay, ok=write)
        elif self.config.nonfinite == "raise":  # nothing gathered: the owners' verdicts on their new state, shared
            owned = None if not bucket.params else ok
            ok_all = ok_all & _agreed(ok_all, owned, plan.owned(), plan.sharding.group)
        if self._reports:  # on every rank, the blocks the unsharded run would name
            self._pending.append(_Pending(plan.params, ok_all, update, group=bucket.group, step_ok=step_ok))

    def _step_fsdp(self, bucket: _Bucket, step_ok: Tensor | None, grad_ok: Tensor) -> None:
        """One bucket of DTensor (FSDP2) parameters; ``grad_ok (b)``: the block's gradient is finite on every rank.

        Owned buckets: one ``all_to_all`` brings each owner the full gradients of its
        blocks, the owner runs :func:`compose.step` on them exactly as one process would,
        a second ``all_to_all`` hands every rank its rows of each direction, and every
        rank writes its rows with ``post.apply_`` (same masks everywhere: the agreed
        gradient flags, the step flag, and a NaN direction where the owner found the
        update or the new state non-finite). Elementwise buckets step each rank's rows
        where they are, with no communication.
        """
        plan = bucket.fsdp
        assert plan is not None
        cfg = self._bucket_config(bucket)
        dtype = bucket.state_dtype
        grads = [p.grad for p in plan.params]
        writes = plan.calls > 0 or not cfg.skip_first_call
        plan.calls += 1
        update = plan.calls - int(cfg.skip_first_call)  # the update number compose.step counts, on every rank
        if plan.elementwise:
            self._step_fsdp_elementwise(bucket, step_ok, grad_ok)
            return
        G = plan.assemble(grads)  # type: ignore[arg-type]
        D: Tensor | None = None
        if G is not None:
            if bucket.state is None:
                self._init_bucket(bucket)
            ok = grad_ok.index_select(0, plan.index("owned", plan.owned(), grad_ok.device))
            G = G.to(dtype).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            old = bucket.state
            D, new = compose.step(cfg, bucket.layout, old, G)  # type: ignore[arg-type]
            if (D is not None) != writes:  # pragma: no cover - the plan's counter and the state's disagree
                raise RuntimeError(f"FSDP2 step out of step: the plan counts {plan.calls - 1} calls, the state {old.calls}")  # type: ignore[union-attr]
            ok_new = compose.finite_new_state(new, old)
            if D is not None:
                ok_new = linalg.finite_blocks(D) if ok_new is None else ok_new & linalg.finite_blocks(D)
            if ok_new is not None:
                ok = ok & ok_new
                if D is not None:  # a NaN direction: every rank holding rows of the block skips it
                    D = D.masked_fill(~ok_new.view(-1, 1, 1), float("nan"))
        device = grad_ok.device
        D_rows = plan.scatter(D, dtype=dtype, device=device) if writes else None  # before the state write
        uncounted = _uncount_plan(plan, _used(grad_ok, step_ok))  # alike on every rank
        if G is not None:
            self._write_state(bucket, old, new, ok if step_ok is None else ok & step_ok, ok, uncounted=uncounted)
        if D_rows is not None:
            for count, idx, rows in plan.groups():
                D_g = D_rows.index_select(0, plan.row_index(count, rows, device)).view(len(idx), count, -1)
                write = grad_ok.index_select(0, plan.index(f"group{count}", idx, device)) & linalg.finite_blocks(D_g)
                write = write if step_ok is None else write & step_ok
                local = [plan.params[i].to_local() for i in idx]  # type: ignore[attr-defined]
                self._fsdp_apply(cfg.post, bucket, f"group{count}", idx, local, D_g, write)
        seen = grad_ok
        if self.config.nonfinite == "raise":  # the owners' verdicts (an overflow), alike on every rank: each raises
            owned = None if G is None else ok
            seen = grad_ok & _agreed(grad_ok, owned, plan.owned(), plan.sharding.group)
        if self._reports:
            self._pending.append(_Pending(plan.params, seen, update, group=bucket.group, step_ok=step_ok))

    def _step_fsdp_elementwise(self, bucket: _Bucket, step_ok: Tensor | None, grad_ok: Tensor) -> None:
        """An elementwise FSDP2 bucket: each rank steps its own rows of every block, padded to one stack.

        Padding rows are zero gradients on zero state: they stay zero and are never
        written anywhere. A non-finite gradient anywhere in a block masks the block on
        every rank (``grad_ok``). An update or state that overflows from finite gradients
        is detected on the rows where it happens only (no communication here).
        """
        plan = bucket.fsdp
        assert plan is not None
        cfg = self._bucket_config(bucket)
        if bucket.state is None:
            self._init_bucket(bucket)
        G = plan.local_stack([p.grad for p in plan.params], dtype=bucket.state_dtype)  # type: ignore[misc]
        G = G.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        ok = grad_ok
        old = bucket.state
        D, new = compose.step(cfg, bucket.layout, old, G)  # type: ignore[arg-type]
        ok_new = compose.finite_new_state(new, old)
        if D is not None:
            ok_new = linalg.finite_blocks(D) if ok_new is None else ok_new & linalg.finite_blocks(D)
        if ok_new is not None:
            ok = ok & ok_new
        write = ok if step_ok is None else ok & step_ok
        if D is not None:
            for count, idx in plan.stack_groups():
                index = plan.index(f"group{count}", idx, D.device)
                local = [plan.params[i].to_local() for i in idx]  # type: ignore[attr-defined]
                D_g = D.index_select(0, index)[:, :count]
                self._fsdp_apply(cfg.post, bucket, f"group{count}", idx, local, D_g, write.index_select(0, index))
        uncounted = _uncount_plan(plan, _used(grad_ok, step_ok))
        self._write_state(bucket, old, new, write, ok, uncounted=uncounted)
        if self._reports:
            self._pending.append(_Pending(plan.params, grad_ok, new.step, group=bucket.group, step_ok=step_ok))

    def _fsdp_apply(
        self, post_: post.Post, bucket: _Bucket, name: str, idx: list[int], local: list[Tensor], D: Tensor, ok: Tensor
    ) -> None:
        """FSDP2's write of this rank's rows ``local`` of the blocks at ``idx`` (positions in the plan, one row count,
        named ``name`` in its index cache), their directions ``D`` and verdicts ``ok``: at once where one param group
        holds them all, else each group's blocks with its rates (their positions as an index tensor kept by the plan)."""
        by: dict[int, list[int]] = {}
        for j, i in enumerate(idx):
            by.setdefault(bucket.group_of(i), []).append(j)
        if len(by) == 1:
            post_.apply_(local, D, **_rate_args(self.param_groups[next(iter(by))]), ok=ok)
            return
        for gi, js in by.items():
            sel = bucket.fsdp.index(f"{name}/group{gi}", js, D.device)  # type: ignore[union-attr]
            post_.apply_([local[j] for j in js], D.index_select(0, sel), **_rate_args(self.param_groups[gi]), ok=ok.index_select(0, sel))

    def _param_name(self, bucket: _Bucket, i: int) -> str:
        """The name of the bucket's ``i``-th stacked block (:meth:`_name`)."""
        return self._name(bucket.group_of(i) if bucket.plan is None else bucket.group, bucket.params[i])

    def _name(self, gi: int, p: Tensor) -> str:
        """A readable, unique name: the parameter's name (qualified by its group if another
        group has the same name), else its position and shape. ``gi``: the group to look in
        first (a bucket's or a report's; a bucket of several groups holds others' blocks too)."""
        for gj in (gi, *range(len(self.param_groups))):
            group = self.param_groups[gj]
            names = group.get("param_names")
            for j, q in enumerate(group["params"]):
                if q is p:
                    if not names:
                        return f"param_groups[{gj}].params[{j}] {tuple(p.shape)}"
                    clashes = sum(names[j] in (g.get("param_names") or ()) for g in self.param_groups)
                    return names[j] if clashes == 1 else f"param_groups[{gj}].{names[j]}"
        return f"parameter of shape {tuple(p.shape)}"  # pragma: no cover

    def _report_pending(self, *, wait: bool = False) -> None:
        """Warn of the blocks past steps skipped (as their masks reach the host); under ``nonfinite = "raise"``
        raise ``FloatingPointError`` naming them instead, once every report is read."""
        keep, overflowed = [], []
        for item in self._pending:
            value = item.result(wait=wait)
            if value is None:  # still running on the device: look again at the next step
                keep.append(item)
                continue
            if item.params is None:  # the skipped-steps counter
                limit = self.config.max_skipped_steps
                if int(value) >= limit:
                    self._pending = []
                    raise FloatingPointError(
                        f"{int(value)} consecutive steps were skipped for non-finite gradients "
                        f"(max_skipped_steps = {limit}); the parameters and optimizer state are those before them"
                    )
                continue
            skipped_whole = item.step_ok is not None and not bool(item.step_ok)  # (on the host by now)
            bad = [i for i, good in enumerate(value.tolist()) if not good]
            if bad:
                names = ", ".join(self._name(item.group, item.params[i]) for i in bad)
                if self.config.nonfinite == "raise":  # every gradient was finite (checked before the step)
                    overflowed.append(names)
                    continue
                if skipped_whole:
                    what = (
                        "the whole step was skipped: no parameter, moment or factor changed, though the step counters "
                        "advanced (Adam's bias correction counts the step; nonfinite_scope = 'step')"
                    )
                elif item.whole_step:  # every gradient finite: these blocks' update or new state overflowed
                    what = (
                        "their gradients were finite but their update or new state overflowed, so these parameters "
                        "and their optimizer state alone were left untouched, but for the step counters (nonfinite_scope = 'step')"
                    )
                else:
                    what = (
                        "these parameters and their optimizer state were left untouched but for their step counters "
                        "(nonfinite_scope = 'block')"
                    )
                _warn_at_caller(f"non-finite gradient or update (NaN or Inf) at update {item.step} in: {names}; {what}")
        self._pending = keep
        if overflowed:
            raise FloatingPointError(
                "the update or new optimizer state overflowed (non-finite) in: " + ", ".join(overflowed)
                + "; their gradients were finite. These parameters and their optimizer state were left as they were; "
                "the other parameters took the step"
            )

    def flush_warnings(self) -> None:
        """Report non-finite gradients of past steps now (waits for the device if needed)."""
        self._report_pending(wait=True)

    # -- introspection ---------------------------------------------------------------------
    def _stepped(self) -> list[_Bucket]:
        """Buckets a ``step()`` has reached (state is created eagerly; before its first call it is the fresh state)."""
        return [b for b in self._buckets if b.state is not None and b.state.calls > 0]

    def inspect(self) -> dict[str, ParamView]:
        """Per parameter name, a :class:`~kronopt.inspection.ParamView`: factors, bases, eigenvalue
        estimates and stage records as plain tensors (parameters not stepped yet are left out)."""
        self._check_state()  # a cleared optimizer.state: the fresh state
        out: dict[str, ParamView] = {}
        for bucket in self._stepped():
            names = [self._param_name(bucket, i) for i in range(bucket.layout.batch)]
            cfg = self._group_cfgs[bucket.group]
            pipeline = self.param_groups[bucket.group]["pipeline"]
            for view in bucket_views(cfg, bucket.layout, bucket.state, names, pipeline):
                out[view.name] = view
        return out

    def nonfinite_counts(self) -> dict[str, int]:
        """Per parameter, how many gradients were skipped as non-finite (synchronises)."""
        self._check_state()  # a cleared optimizer.state: the fresh state
        out: dict[str, int] = {}
        for bucket in self._buckets:
            if bucket.state is None or bucket.nonfinite is None:
                continue
            counts = bucket.nonfinite.tolist()
            # a bucket whose only calls were skipped first calls (not counted: _uncounted) has counts too
            if bucket.state.calls > 0 or any(counts):
                for i, count in enumerate(counts):
                    out[self._param_name(bucket, i)] = count
        return out

    def eigh_failures(self) -> dict[str, int]:
        """Per parameter, how many sides kept their old basis at a refresh because ``eigh`` failed (synchronises).

        The count is per side, not per refresh (``BasisState.failures``): each refresh adds one for every rotated
        side of the block whose decomposition failed, so a block with both sides rotated (shampoo's) reads 4 after
        two failed refreshes, and a block with one side rotated reads 2.
        """
        self._check_state()  # a cleared optimizer.state: the fresh state
        out: dict[str, int] = {}
        for bucket in self._stepped():
            for i, count in enumerate(bucket.state.basis.failures.tolist()):  # type: ignore[union-attr]
                out[self._param_name(bucket, i)] = count
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors held: the stages' bucket stacks, counted once (``self.state`` holds views of
        them). The optimizer's own per-block non-finite counters (8 bytes a block, saved as each parameter's
        ``"nonfinite"``) are not stage state and not counted."""
        self._check_state()  # a cleared optimizer.state: the fresh state
        total = 0
        for bucket in self._buckets:
            if bucket.state is None:
                continue
            for value in compose.flatten(bucket.state).values():
                if isinstance(value, Tensor):
                    total += value.numel() * value.element_size()
        return total

    def scratch_bytes(self) -> int:
        """Bytes of the scratch tensors kept across steps (on a CPU: plain Muon's look-ahead stack and its
        iteration's buffers, plain AdamW's and the Adam rule's scratch sets; made by the first step that needs
        each, one set per shape; a split, a join or a load drops them). Not state (never saved, made again as
        needed), but memory held between steps all the same: ``kronopt bench --memory`` counts it in the step's."""
        kept = self.__dict__.get("_kept_scratch", {})
        leaves = tree_leaves(list(kept.values()))  # tuples of tensors and an iteration's dict of them
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))

    def _storage_names(self, bucket: _Bucket) -> dict[str, str]:
        """The dtype each kind of state of ``bucket`` is stored in (``[storage]`` with ``"compute"`` resolved)."""
        storage = self._group_cfgs[bucket.group].storage
        compute = str(bucket.state_dtype).removeprefix("torch.")
        return {k: compute if v == "compute" else v for k, v in attrs.asdict(storage).items()}

    def bucket_summary(self) -> list[dict[str, Any]]:
        """One row per bucket: group, pipeline, block shape, sides and size (for display and tests).

        ``group`` is the param group whose config the bucket steps with, ``groups`` every group with blocks
        in it, in order (groups whose configs differ in ``lr`` and ``weight_decay`` alone share buckets).

        ``phase`` is the bucket's refresh phase (0 unless ``[refresh] stagger = true``),
        ``param_dims`` what of its parameters' shape the inner rule reads beyond the block
        (``()`` unless it declares ``reads_param_shape``: :class:`kronopt.types.ReadsParamShape`).
        ``state_dtype`` is the dtype its maths run in, ``storage`` the dtype its factors,
        basis and moments are kept in (``[storage]``).
        ``blocks`` counts every block of the bucket, ``owned`` those this rank stacks and
        keeps state for (all of them without work sharding), ``gather_bytes`` the bytes
        this rank receives at the bucket's all-gather (0 without work sharding; under
        FSDP2 at its two ``all_to_all``s, 0 for an elementwise bucket, whose ``m`` is
        this rank's padded row count).
        """
        return [
            {
                "group": b.group,
                "groups": tuple(dict.fromkeys(b.groups)) if b.groups is not None else (b.group,),
                "pipeline": self.param_groups[b.group]["pipeline"],
                "blocks": len(b.blocks),
                "owned": b.layout.batch,
                "gather_bytes": 0 if b.plan is None else b.plan.gather_bytes(b.layout.m, b.layout.n, b.state_dtype),
                "m": b.layout.m,
                "n": b.layout.n,
                "sides": b.layout.sides,
                "phase": b.layout.phase,
                "param_dims": b.layout.param_dims,
                "state_dtype": str(b.state_dtype).removeprefix("torch."),
                "storage": self._storage_names(b),
            }
            for b in self._buckets
        ]

    # -- persistence -----------------------------------------------------------------------
    def _index_of(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for g in self.param_groups:
            for p in g["params"]:
                index.setdefault(id(p), len(index))
        return index

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch.optim's layout plus a ``kronopt`` section (version 2).

        ``state[i]`` is parameter ``i``'s own state: every stage tensor by dotted path
        (``"factors.L"``, ``"inner.exp_avg"``: a copy of its block, no batch axis), the
        bucket's counters (``"calls"``, ``"step"``, ``"basis.refreshes"``…) as ints and
        bools, ``"nonfinite"`` (skipped non-finite gradients, a 0-d tensor) and
        ``"bucket"`` (which bucket it was stacked in, so a load keeps split buckets
        apart). Parameters with no state yet have no entry. ``kronopt`` holds the
        ``version``, the ``config``, the ``skipped_steps`` counter and ``skipped_steps_due`` (its
        ``max_skipped_steps`` check is still queued for the next step, which a load re-arms: the loaded
        optimizer raises where the saved one would have; a dict without the flag is taken as due).

        With work sharding (docs/distributed.md) each rank's dict holds the entries of
        the blocks **it owns**, and for every other block with state an entry of its
        counters only, ``{"calls": …, "bucket": …}`` (the same on every rank, no
        tensors), so that a rank of any world size can rebuild every bucket's call
        counter from the ranks' dicts, as ``torch.distributed.checkpoint`` reshards them
        (docs/distributed.md, "Checkpoints"). ``kronopt["sharding"]`` records ``rank``,
        ``world_size`` and, per bucket, its parameters' indices (``buckets``) and call
        count (``calls``). The rank's optimizer loads it back; for anything else join
        the ranks' dicts with :func:`kronopt.distributed.merge_state_dicts` (a
        single-process dict, also loadable on every rank of a sharded optimizer).
        """
        self._check_state()
        with _torch_hooks_held(self, "_optimizer_state_dict_post_hooks"):  # run below, on the whole dict
            sd = super().state_dict()  # param_groups (and torch's pre hooks); its "state" holds our live dicts
        for g, live in zip(sd["param_groups"], self.param_groups):  # a schedule edits the live overrides in place: a copy
            if isinstance(g.get("overrides"), dict):
                g["overrides"] = {**self._schedule_of(live), **_copied(g["overrides"])}
        index = self._index_of()
        state: dict[int, dict[str, Any]] = {}
        for bi, b in enumerate(self._buckets):
            if b.state is None:
                continue
            for p in b.params:
                entry = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.state[p].items()}
                entry[_BUCKET] = bi
                state[index[id(p)]] = entry
        for bi, b in enumerate(self._buckets):  # work sharding: the counters of the blocks other ranks own
            plan = b.plan
            if not isinstance(plan, distributed.GatherPlan) or not (plan.stateful or plan.calls > 0):
                continue
            for p, r in zip(plan.params, plan.owners):
                if r != plan.sharding.rank:
                    state[index[id(p)]] = {"calls": plan.calls, _BUCKET: bi}
        for bi, b in enumerate(self._buckets):  # FSDP2: a marker for the blocks another rank owns (_fsdp_marker)
            plan = b.fsdp
            # not for a bucket without state on any rank (frozen, never stepped): one process lists no entry there
            if plan is None or not (plan.calls > 0 or any(p.requires_grad for p in plan.params)):
                continue
            for p in plan.params:
                state.setdefault(index[id(p)], self._fsdp_marker(bi, plan))
        sd["state"] = state
        sd["kronopt"] = {"version": _STATE_VERSION, "config": to_dict(self.config)}
        sd["kronopt"][_PHASES_KEY] = "across_groups" if self.__dict__.get("_phases_across", False) else "per_group"
        if self._sharding is not None:
            sd["kronopt"][distributed.SHARDING_KEY] = {
                "rank": self._sharding.rank,
                "world_size": self._sharding.world_size,
                "buckets": [[index[id(p)] for p in b.blocks] for b in self._buckets],
                "calls": [0 if b.plan is None else b.plan.calls for b in self._buckets],
            }
        world = self._owner_world()
        if world is not None:  # who owns each block: a load on as many ranks keeps it (_saved_owners)
            params = [p for g in self.param_groups for p in g["params"]]
            sd["kronopt"][distributed.OWNERS_KEY] = {"world_size": world, "ranks": [self._owner.get(id(p), -1) for p in params]}
        if self._skipped_steps is not None:
            sd["kronopt"]["skipped_steps"] = self._skipped_steps.clone()
            # whether the counter's max_skipped_steps check is still queued (read at the next step): a load re-arms it
            sd["kronopt"][_CHECK_DUE] = any(item.params is None for item in self._pending)
        for hook in self._optimizer_state_dict_post_hooks.values():  # register_state_dict_post_hook, as torch runs them
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _schedule_of(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's schedule now (:func:`_schedule`), for its saved overrides: a state dict records f, its offset
        and ρ as torch.optim's records a group's ``lr``. A template's keys are what ``torch.distributed.checkpoint``
        loads, so an edited schedule left out of a fresh optimizer's dict was dropped by ``dcp.load``. Nothing for a
        group whose overrides the config refuses (the next step refuses them; a checkpoint is still taken)."""
        try:
            cfg = self._with_overrides(group.get("overrides") or {})
        except ConfigError:
            return {}
        return _schedule(cfg, group.get("pipeline", "main") != "main")

    def _owner_world(self) -> int | None:
        """The number of ranks the blocks' owners are picked among (work sharding or FSDP2), ``None`` without
        owners, or where the two run on meshes of different sizes (their owners are not one list's)."""
        worlds = {self._sharding.world_size} if self._sharding is not None else set()
        worlds |= {b.fsdp.sharding.world_size for b in self._buckets if b.fsdp is not None}
        return worlds.pop() if len(worlds) == 1 and self._owner else None

    def _saved_owners(self, kron: dict[str, Any] | None) -> dict[int, int]:
        """The saved owner of every block, where the state dict was saved on as many ranks (else none).

        Which rank owns a block depends on how the optimizer was built (a group added by ``add_param_group``
        is balanced after the others; the same groups given at construction, together), so a rank's own
        dict could hold as its own blocks this optimizer gives to another rank: then every rank refused it,
        or only some, which then waited for the others at the next step's collectives."""
        saved = None if kron is None else kron.get(distributed.OWNERS_KEY)
        if saved is None:
            return {}
        world = saved.get("world_size") if isinstance(saved, Mapping) else None
        ranks = saved.get("ranks") if isinstance(saved, Mapping) else None
        if not isinstance(world, int) or not isinstance(ranks, list | tuple) or not all(
            isinstance(r, int) and not isinstance(r, bool) and -1 <= r < world for r in ranks
        ):
            raise ValueError(f"the saved owners are not a world size and a rank in [-1, world size) per parameter: {saved!r:.200}")
        params = [p for g in self.param_groups for p in g["params"]]
        if world != self._owner_world() or len(ranks) != len(params):
            return {}
        return {id(p): r for p, r in zip(params, ranks) if r >= 0}

    def _recount_loads(self) -> None:
        """The ranks' assigned cost (``_loads``, ``_fsdp_loads``) recounted from the buckets' owners, after a load
        took the saved ones: a group added later is balanced against the work each rank now carries."""
        loads: dict[bool, list[int]] = {}
        for b in self._buckets:
            plan = b.plan if b.plan is not None else b.fsdp
            if plan is None or getattr(plan, "elementwise", False):
                continue
            fsdp = b.fsdp is not None and not (self._sharding is None or self._sharding.world_size == plan.sharding.world_size)
            tally = loads.setdefault(fsdp, [0] * plan.sharding.world_size)
            for r in plan.owners:
                tally[r] += distributed.block_cost(b.layout)
        self._loads = loads.get(False, self._loads)
        self._fsdp_loads = loads.get(True, self._fsdp_loads)

    @staticmethod
    def _fsdp_marker(bi: int, plan: distributed.ShardPlan) -> dict[str, Any]:
        """The entry of a block another rank owns (FSDP2): its bucket and the bucket's call count.

        The same on every rank, so ``torch.distributed.checkpoint`` may keep any rank's
        copy; it gives every parameter an entry on every rank (``set_optimizer_state_dict``
        refuses a trainable parameter without one), and a load learns the call count
        even on a rank that owns none of the bucket's blocks.
        """
        return {_BUCKET: bi, "calls": plan.calls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`; the next step continues bit for bit.

        Reads version 2 (per-parameter ``state``; also without the ``kronopt`` section,
        as ``torch.distributed.checkpoint`` hands it back, keyed by parameter name) and
        version 1 (stacked buckets under ``kronopt.buckets``, converted block by block).
        The blocks are stacked into buckets as construction does (and kept apart where
        the saved optimizer had split a bucket). Everything is validated before anything
        changes: a state dict that does not fit (another model, another pipeline, an
        unknown version) raises ``ValueError`` and leaves the optimizer as it was.
        Per-group config overrides come from the saved groups, as torch.optim restores
        per-group hyperparameters.

        With work sharding, a rank loads its own :meth:`state_dict` (same rank and
        world size), a whole dict (single-process, or
        :func:`kronopt.distributed.merge_state_dicts` of every rank's) or what
        ``torch.distributed.checkpoint`` loads into this rank's own state dict at any
        world size (its blocks' tensors and every block's counters), and keeps the
        entries of the blocks it owns. A sharded dict of one rank does not load
        anywhere else (``ValueError``): merge the ranks' dicts first.
        """
        state_dict = state_dict.copy()  # register_load_state_dict_pre_hook's hooks first, as torch runs them
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        try:
            kron, saved_groups, cfgs, buckets, adopted, owners, skipped = self._loaded(state_dict)
        except Exception as exc:
            self._agree_to_load(exc)
            raise
        try:
            self._agree_to_load(None)
            with _torch_hooks_held(self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
                super().load_state_dict({"state": {}, "param_groups": saved_groups})  # also resets self.state
        except BaseException:
            self._owner = owners  # a refused dict changes nothing
            raise
        self._group_cfgs = cfgs
        self.__dict__.pop("_group_classes", None)
        self._note_overrides()
        self._phases_across = _phases_across(kron)
        self._phased = {}
        self.__dict__.pop("_plain_adam", None)  # keyed by the old configs' ids, which new objects may take
        self.__dict__.pop("_plain_muon", None)
        self.__dict__.pop("_kept_scratch", None)  # shaped like the old buckets, which may be gone
        self._buckets = buckets
        self._fragmented = True  # the saved buckets may be split ones (_join)
        if adopted:
            self._recount_loads()
        self._pending = []
        for bucket in buckets:
            if bucket.state is not None:
                self._bind(bucket)
        self._materialize(try_lazy=False)  # _loaded tried the lazy buckets' layouts before anything changed
        self._skipped_steps = None if skipped is None else skipped.to(self._grads_device(skipped))
        if skipped is not None and self.config.max_skipped_steps and (kron or {}).get(_CHECK_DUE) is not False:
            # the saved optimizer's check of its counter was still queued (a dict without the flag: as if it were), so
            # the next step raises where it would have; the saved value itself, on the host (read once, at a load)
            self._pending.append(_Pending(None, skipped.detach().to("cpu", copy=True), 0))
        self._seen_state()
        # a loaded state is the one to go on from, where the load put it; but a dict saved before any step holds
        # the state as built (torch.optim's holds none): a model moved or cast after this load has it made again
        # where the parameters are at the first step, as after construction (_check_state)
        stepped = any(
            (b.state is not None and b.state.calls > 0) or (b.plan is not None and b.plan.calls > 0) for b in buckets
        )
        self._unstepped_placement = None if stepped else self._placement()
        for hook in self._optimizer_load_state_dict_post_hooks.values():  # the state bound: as torch runs them
            hook(self)

    def _loaded(
        self, state_dict: dict[str, Any]
    ) -> tuple[Any, list[dict[str, Any]], list[KronConfig], list[_Bucket], dict[int, int], dict[int, int], Tensor | None]:
        """:meth:`load_state_dict`'s checks and the buckets it would hold, built from ``state_dict`` with nothing of
        this optimizer changed but its owners (``self._owner``: the saved ones adopted, as the buckets are cut by
        them), which the caller puts back (the sixth item) where the load does not go on; the last item is the saved
        count of skipped steps (:func:`_saved_skipped`). Raises ``ValueError`` (or what a malformed dict makes fail)
        where the dict does not fit."""
        kron = state_dict.get("kronopt")
        saved = per_parameter_state(state_dict)  # raises on an unknown version; converts version 1
        if "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: 'param_groups' is missing")
        shard = None if kron is None else kron.get(distributed.SHARDING_KEY)
        here = self._sharding
        if shard is not None and (here is None or (here.rank, here.world_size) != (shard["rank"], shard["world_size"])):
            where = "a single process" if here is None else f"rank {here.rank} of {here.world_size}"
            raise ValueError(
                f"this state dict holds only the blocks rank {shard['rank']} of {shard['world_size']} owned (work sharding), "
                f"and this optimizer runs as {where}: join every rank's dict with "
                "kronopt.distributed.merge_state_dicts and load that"
            )
        skipped = _saved_skipped(kron)  # refused here, before anything changes
        saved_groups = _unedited_schedule_dropped([_without_top_level_only(g) for g in state_dict["param_groups"]], kron)
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("the saved param groups do not match this optimizer's (different model or routing)")
        pipelines = [g.get("pipeline") for g in saved_groups]
        if pipelines != [g["pipeline"] for g in self.param_groups]:
            if any(p is not None for p in pipelines) and all(set(g) == {"params"} for g in saved_groups if "pipeline" not in g):
                # torch's set_optimizer_state_dict makes a fresh group whose parameters the saved groups hold apart
                # (another routing) an empty one: say what it is, not "not kronopt's"
                raise ValueError(
                    "the saved param groups do not hold this optimizer's groups' parameters together (different "
                    "routing: a group torch's set_optimizer_state_dict left empty); a checkpoint saved before the "
                    "routed presets' name patterns changed (docs/architecture.md) loads into an optimizer built with "
                    "route.fallback_names set to the patterns it was saved with"
                )
            if None in pipelines:  # e.g. a torch.optim optimizer's groups: nothing of kronopt's config to restore
                raise ValueError("not a kronopt optimizer's state dict: its param groups name no 'pipeline'")
            raise ValueError(
                f"the saved param groups run the pipelines {pipelines}, this optimizer's "
                f"{[g['pipeline'] for g in self.param_groups]} (different routing)"
            )
        self._check_routing(saved_groups)
        if kron is not None and _numbers_config(kron.get("config", to_dict(self.config))) != _numbers_config(to_dict(self.config)):
            warnings.warn(
                "loading optimizer state saved under a different config; use kronopt.from_state_dict to "
                "rebuild the saved optimizer exactly",
                stacklevel=3,  # the caller of load_state_dict
            )
        keys = [k for g in saved_groups for k in g["params"]]  # by position, as torch.optim (indices or DCP's names)
        key_of = {id(p): k for k, p in zip(keys, (p for g in self.param_groups for p in g["params"]))}
        unknown = [k for k in saved if k not in set(keys)]
        if unknown:
            raise ValueError(f"saved state for parameters the saved param groups do not list: {unknown[:5]}")
        cfgs = [self._group_config(g) for g in saved_groups]
        saved_bucket: dict[Any, int] = {}  # sharded dict of this rank: every block's bucket, owned or not
        if shard is not None:
            saved_bucket = {keys[i]: bi for bi, idx in enumerate(shard["buckets"]) for i in idx}
        # in one process, where each saved block sat: (its bucket's index, its place in the dict, which lists a
        # bucket's blocks in their stack's order): the buckets are rebuilt in the saved order, each stacking its
        # blocks as the saved one did, so later joins of split parts pack and stack as the uninterrupted run's
        # (parameter order joined other parts under a cap). Not across ranks: each rank's dict may list its entries
        # in an order of its own, and the ranks' buckets must agree (their parts never join: _join)
        place: dict[Any, tuple[int, int]] = {}
        if shard is None and self._sharding is None and not any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):
            place = {k: (e[_BUCKET], n) for n, (k, e) in enumerate(saved.items()) if isinstance(e, dict) and _BUCKET in e}
        adopted = self._saved_owners(kron)
        owners, self._owner = self._owner, {**self._owner, **adopted}
        try:
            buckets = []
            # (part, the bucket it is cut from, its positions there), in order; in one process the parts of one saved
            # bucket are gathered across the cap's cuts (a join under a cap packs parts of several cuts together)
            pieces: dict[Any, tuple[Any, _Bucket, list[int]]] = {}
            classes = self._sharing(saved_groups, cfgs)
            for n, like in enumerate(self._make_buckets(self.param_groups, cfgs, self._cap, across=_phases_across(kron), classes=classes)):
                parts: dict[Any, list[int]] = {}
                for i, p in enumerate(like.params):
                    entry = saved.get(key_of[id(p)])
                    if shard is not None:
                        part: Any = (_BUCKET, saved_bucket[key_of[id(p)]])
                    elif not entry:
                        part = None
                    elif _BUCKET in entry:
                        part = (_BUCKET, entry[_BUCKET])
                    elif not entry.get("calls"):  # no bucket recorded, before a counted first call: apart (_join)
                        part = ("first", i)
                    else:  # no bucket recorded: blocks whose counters agree share one
                        part = tuple(sorted((k, v) for k, v in entry.items() if not isinstance(v, Tensor)))
                    parts.setdefault(part, []).append(i)
                for part, idx in parts.items():
                    saved_one = bool(place) and part is not None and part[0] == _BUCKET
                    first_p = like.params[idx[0]]
                    key = (part, classes[like.group], attrs.evolve(like.layout, batch=0), like.state_dtype, first_p.dtype, first_p.device) if saved_one else (n, part)
                    if key in pieces and not self._fits(pieces[key][1], len(pieces[key][2]) + len(idx)):
                        key = (n, part)  # not under this optimizer's cap (a smaller one than the saved run's)
                    if key in pieces:
                        _, was, was_idx = pieces[key]
                        joined = [was.params[i] for i in was_idx] + [like.params[i] for i in idx]
                        both = _groups_of([(was, was_idx), (like, idx)])
                        like_both = _Bucket(
                            group=both[0], params=joined, specs=[was.specs[i] for i in was_idx] + [like.specs[i] for i in idx],
                            layout=attrs.evolve(was.layout, batch=len(joined)), state_dtype=was.state_dtype, block_bytes=was.block_bytes,
                            groups=_mixed(both),
                        )
                        pieces[key] = (part, like_both, list(range(len(joined))))
                    else:
                        pieces[key] = (part, like, idx)
            for part, like, idx in pieces.values():
                if part is not None and part[0] == _BUCKET:
                    idx.sort(key=lambda i: place.get(key_of[id(like.params[i])], (0, i))[1])
                whole = like.subset(idx)
                (bucket,) = self._shard([whole])
                listed = [saved[key_of[id(p)]] for p in whole.params if saved.get(key_of[id(p)])]
                if bucket.plan is not None:  # every rank: the counter (from any block's entry, owned or not)
                    if shard is not None:
                        bucket.plan.calls = shard["calls"][part[1]]
                    else:
                        bucket.plan.calls = next((e["calls"] for e in listed if "calls" in e), 0)
                    if isinstance(bucket.plan, distributed.GatherPlan):
                        bucket.plan.stateful = bool(listed) or bucket.plan.calls > 0
                entries = [saved.get(key_of[id(p)]) for p in bucket.params]
                if part is not None and any(entries):
                    lacking = [self._name(like.group, p) for p, e in zip(bucket.params, entries) if not e]
                    if lacking:
                        raise ValueError(f"saved state lacks the entries of {', '.join(lacking[:5])}, which share a bucket with saved ones")
                    elsewhere = [self._name(like.group, p) for p, e in zip(bucket.params, entries) if counters_only(e)]
                    if elsewhere:
                        raise ValueError(
                            f"the saved state of {', '.join(elsewhere[:5])} holds only counters: another rank owned "
                            "these blocks (work sharding) and saved their tensors. Load every rank's entries: "
                            "torch.distributed.checkpoint's dcp.load into this optimizer's own state dict "
                            "(get_optimizer_state_dict), or kronopt.distributed.merge_state_dicts of every rank's state_dict()"
                        )
                    # only a dict torch's API handed over (no kronopt section) has entries filled from this optimizer
                    filled = [] if kron is not None else [
                        self._name(like.group, p) for p, e in zip(bucket.params, entries) if counters_disagree(e)
                    ]
                    if filled:
                        raise ValueError(
                            f"the saved state of {', '.join(filled[:5])} counts calls and updates that no block "
                            "counts together (calls is step or step + 1): a block another rank owned, whose counters "
                            "were filled with this optimizer's own fresh state. torch's get_optimizer_state_dict gathers "
                            "no block kronopt's work sharding or FSDP2 owners keep (plain tensors on their owner), even "
                            "with full_state_dict=True: checkpoint with torch.distributed.checkpoint (dcp.save / dcp.load), "
                            "or, under work sharding, kronopt.distributed.merge_state_dicts of every rank's state_dict()"
                        )
                    self._restack(bucket, cfgs[like.group], entries)  # type: ignore[arg-type]
                buckets.append(bucket)
            unplaced = (max((bi for bi, _ in place.values()), default=-1) + 1, 0)  # buckets with no saved place (no state yet) after the saved ones
            buckets.sort(key=lambda b: place.get(key_of[id(b.params[0])], unplaced)[0] if b.params else unplaced[0])
            for bucket in buckets:  # what the load's materialisation will build: the stages' refusals now
                if bucket.state is None:
                    self._try_layout(bucket, cfgs[bucket.group])
        except BaseException:
            self._owner = owners  # a refused dict changes nothing
            raise
        return kron, saved_groups, cfgs, buckets, adopted, owners, skipped

    def _check_routing(self, saved_groups: list[dict[str, Any]]) -> None:
        """Refuse a state dict of the same parameters (by name) that the saved optimizer put in other groups.

        The entries are matched by position, as torch.optim matches them; where the saved groups and these both
        name their parameters and the names are the same ones, a name in another group (the routed presets' name
        patterns changed in 3eed1dc, or ``route`` overridden) would hand one parameter's state to another of its
        shape; so would the same names listed in another order within a group. Names that differ (a renamed model)
        are matched by position, as torch.optim does."""
        saved_names = [g.get("param_names") for g in saved_groups]
        names = [g.get("param_names") for g in self.param_groups]
        if any(n is None for n in saved_names + names):
            return
        was = {n: gi for gi, ns in enumerate(saved_names) for n in ns}
        now = {n: gi for gi, ns in enumerate(names) for n in ns}
        if was.keys() != now.keys() or len(was) != sum(map(len, names)):
            return
        moved = [n for n in now if was[n] != now[n]]
        if not moved:
            # the same names in each group, listed in another order: by position one parameter's state would go
            # to another of its shape. Not where the saved entries are keyed by name (torch.distributed.checkpoint's
            # set_optimizer_state_dict lists each group's names as saved and its params in this optimizer's order)
            for gi, (saved_ns, ns) in enumerate(zip(saved_names, names)):
                if not all(isinstance(k, int) for k in saved_groups[gi]["params"]):
                    continue
                swapped = [(i, n, m) for i, (n, m) in enumerate(zip(saved_ns, ns)) if n != m]
                if swapped:
                    where = ", ".join(f"place {i}: saved {n}, here {m}" for i, n, m in swapped[:5])
                    raise ValueError(
                        f"the saved param group {gi} lists its parameters in another order ({where}): the entries are "
                        "matched by position, so each would take another parameter's state; pass the parameters in "
                        "the saved order (the saved param_groups' param_names)"
                    )
            return
        if moved:
            where = ", ".join(
                f"{n} (saved in group {was[n]} '{saved_groups[was[n]].get('pipeline')}', here in group {now[n]} "
                f"'{self.param_groups[now[n]]['pipeline']}')" for n in moved[:5]
            )
            # a name that changed pipeline was routed otherwise (from_state_dict routes by the saved config); one
            # that kept its pipeline sits in another user group (groups passed in another order or cut otherwise),
            # which no config rebuilds
            rerouted = any(saved_groups[was[n]].get("pipeline") != self.param_groups[now[n]]["pipeline"] for n in moved)
            raise ValueError(
                f"different routing: the saved optimizer grouped these parameters otherwise: {where}; "
                + (
                    "kronopt.from_state_dict rebuilds the saved optimizer with its own routing" if rerouted else
                    "pass the param groups as the saved optimizer had them (its param_groups' param_names, in order)"
                )
            )

    def _agree_to_load(self, error: BaseException | None) -> None:
        """Under work sharding (where it shares blocks out) or FSDP2 (the ranks of its mesh), let every rank know
        whether each took the dict (``error``: why this one did not), and raise ``ValueError`` here where another
        refused it: a dict one rank cannot load is loaded by none, so that no rank steps on with a state the others
        do not share (their collectives would then pair different buckets). One ``all_gather_object`` over the
        ranks; nothing in one process. Every rank of the group must call :meth:`load_state_dict`, as
        ``torch.distributed.checkpoint`` does."""
        if self._sharding is not None and any(isinstance(b.plan, distributed.GatherPlan) for b in self._buckets):
            group, world = self._sharding.group, self._sharding.world_size
        elif any(b.fsdp is not None for b in self._buckets):  # the ranks of its mesh (a sub-mesh: those alone)
            group = self._fsdp_group()
            world = torch.distributed.get_world_size(group)
        else:
            return
        reasons: list[str | None] = [None] * world
        mine = None if error is None else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        torch.distributed.all_gather_object(reasons, mine, group=group)
        refused = [f"rank {r}: {why}" for r, why in enumerate(reasons) if why is not None]
        if refused and error is None:
            raise ValueError(
                "the state dict was refused on another rank, so no rank loads it (this one changed nothing): "
                + "; ".join(refused)
            )

    def _restack(self, bucket: _Bucket, cfg: KronConfig, entries: list[dict[str, Any]]) -> None:
        """Fill ``bucket`` from its blocks' saved entries (validated; raises ValueError naming the parameter)."""
        device = bucket.params[0].device
        names = [self._param_name(bucket, i) for i in range(bucket.layout.batch)]
        template = compose.init_state(cfg, bucket.layout, dtype=bucket.state_dtype, device=device)
        plan = bucket.fsdp
        if plan is not None and plan.elementwise:  # FSDP2: saved rows (DTensors) or whole tensors → this rank's rows
            entries = [
                {k: plan.from_saved(i, v) if plan.is_rows(i, v) else v for k, v in e.items()} for i, e in enumerate(entries)
            ]
        elif plan is None and self._param_shaped(bucket, cfg):  # saved shaped like the parameter (_bind), or as the block
            rows = {k for k, v in compose.flatten(template).items() if isinstance(v, Tensor) and v.shape[1:] == (bucket.layout.m, bucket.layout.n)}
            entries = [
                {k: v.reshape(s.m, s.n) if k in rows and isinstance(v, Tensor) and tuple(v.shape) == tuple(s.shape) else v for k, v in e.items()}
                for s, e in zip(bucket.specs, entries)
            ]
        stage = [compose.adopt_saved(cfg, {k: v for k, v in e.items() if k not in (_NONFINITE, _BUCKET)}) for e in entries]
        state = compose.stack_entries(template, stage, names)
        counts = [e.get(_NONFINITE, 0) for e in entries]
        bucket.state = state
        bucket.nonfinite = torch.stack([torch.as_tensor(c, dtype=torch.int64).to(device) for c in counts])


#: the folders whose frames :func:`_warn_at_caller` passes over: kronopt's own, and torch's (its optimizer's step
#: wrapper and the ``no_grad`` decorator stand between the caller and the step)
_INNER_FRAMES = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _warn_at_caller(message: str) -> None:
    """A ``RuntimeWarning`` of ``message``, named at the caller's line: the first frame outside kronopt and torch (the
    user's ``opt.step()``, ``state_dict()`` or ``flush_warnings()``, whatever depth kronopt reached the report from;
    a fixed ``stacklevel`` named a line of kronopt's, which no ``-W ...:module`` filter of the user's could pick).
    Kept in no module's registry (``warnings.warn_explicit``, ``registry=None``): each report names its update, so
    a registry kept every one, a kilobyte a skipped step for the life of the process, where Python's default action
    shows them all anyway. The filters apply as to ``warnings.warn``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INNER_FRAMES):
        frame = frame.f_back
    if frame is None:  # every frame kronopt's or torch's (a step torch's own code called): kronopt's line, as warn would
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    warnings.warn_explicit(
        message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
        module=frame.f_globals.get("__name__", "<unknown>"), registry=None, module_globals=frame.f_globals,
    )


#: what dynamo says where it meets kronopt's step (under ``torch.compile(..., fullgraph=True)``, in its error)
_UNTRACEABLE = (
    "kronopt's optimizer step is not traceable by dynamo and runs eagerly, outside the graph; the config key "
    "compile = true compiles what pays (Newton-Schulz, the elementwise tail) from inside the step"
)


def _mark_eager_step() -> None:
    """Make :attr:`KronOptimizer._eager_step` once, when an optimizer is built or unpickled (torch.optim's
    construction has loaded ``torch._dynamo`` by then; ``import kronopt`` does not load it). Not made inside the
    traced frame: dynamo cannot trace the call that marks a function either, and under ``fullgraph=True`` it then
    named ``importlib`` instead of this reason."""
    if KronOptimizer._eager_step is None:
        KronOptimizer._eager_step = torch.compiler.disable(KronOptimizer._step, reason=_UNTRACEABLE)


@contextlib.contextmanager
def _torch_hooks_held(opt: torch.optim.Optimizer, *names: str) -> Iterator[None]:
    """torch's hooks of ``names`` (``Optimizer`` attributes) held back while torch's own ``state_dict`` or
    ``load_state_dict`` runs: kronopt runs them itself, on the whole dict and after the state is bound, where
    torch's method sees only the groups."""
    held = {name: getattr(opt, name) for name in names}
    for name in names:
        setattr(opt, name, collections.OrderedDict())
    try:
        yield
    finally:
        for name, hooks in held.items():
            setattr(opt, name, hooks)


#: factor updates that nothing else in a CPU bucket's call reads are computed at its state write, into the
#: stacks themselves (:class:`kronopt.linalg.DeferredWrite`); ``False`` computes them in the step (the same bits)
_DEFER_FACTOR_UPDATES = True

#: whether the small buckets' rotated-Adam calls (SOAP's, DyKAF's, a refresh due or not: compose.rotated_adam_due) step
#: together (:func:`compose.rotated_adams`; the tests compare the bits with it off)
_ROTATED_ADAMS_TOGETHER = True
#: whether the small buckets' ``eigenvalue``-rule calls (KL-Shampoo's, Shampoo's, a refresh due or not:
#: compose.eigen_steps_due) step together (:func:`compose.eigen_steps`; the tests compare the bits with it off)
_EIGEN_STEPS_TOGETHER = True
#: whether a CPU bucket's rotated Adam moments are updated in their stacks where its call is proven finite beforehand
#: (:meth:`KronOptimizer._in_place_proof`); off, every call makes new moments, tests and copies them: the same bits
_ROTATED_MOMENTS_IN_PLACE = True
#: the fewest entries of a bucket's first moment for which its call offers that proof (many small buckets: its Python
#: costs as much as the allocations, tests and copies it spares)
_IN_PLACE_MIN = 1 << 14

#: whether a CPU step may update an ``eigenvalue`` rule's momentum in its stack where it is proven finite beforehand
#: (:meth:`KronOptimizer._momentum_run`); off, every call makes a new momentum, tests and copies it: the same bits
_MOMENTUM_IN_PLACE = True


_CPU = torch.device("cpu")


def _gradients_in_parameters(buckets: Sequence[_Bucket]) -> bool:
    """Whether a gradient of a CPU bucket among ``buckets`` (neither work-sharded nor FSDP2: the ways that step
    several at once, :meth:`KronOptimizer._step_plain_adams` and :meth:`KronOptimizer._step_small_buckets`) lies in the
    storage of one of their parameters (``p.grad = q.detach()``, views of one buffer): a test of the storages'
    addresses, two reads a parameter (a gradient in memory that another storage object also maps is not seen)."""
    params = [p for b in buckets if b.plan is None and b.params and b.params[0].is_cpu for p in b.params]
    if len(params) < 2:  # one block: its own gradient is read first anyway
        return False
    stores = {p.untyped_storage().data_ptr() for p in params}
    return any(g is not None and g.untyped_storage().data_ptr() in stores for g in (p.grad for p in params))


def _span(t: Tensor) -> tuple[int, int]:
    """The addresses ``[first, past the last)`` that ``t``'s entries may occupy (with gaps, for a strided view)."""
    first = t.data_ptr()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return first, first + extent * t.element_size()


def _overlapping(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> bool:
    """Whether the memory of one of ``tensors`` may overlap that of one of ``others`` (their spans of addresses
    meet; a strided view's gaps count as its own, so the answer errs on the side of overlap). One sort of the
    ``others``' spans and a bisection per tensor."""
    spans = sorted(_span(t) for t in others)
    firsts = [first for first, _ in spans]
    reach = list(itertools.accumulate((end for _, end in spans), max))  # the furthest end of the spans so far
    for t in tensors:
        first, end = _span(t)
        before = bisect.bisect_left(firsts, end)  # the spans that start before this one ends
        if first < end and before and reach[before - 1] > first:
            return True
    return False


def _used(flags: Tensor, step_ok: Tensor | None) -> Tensor:
    """The blocks whose gradient a call used: finite (``flags``) in a step not skipped whole."""
    return flags if step_ok is None else flags & step_ok.to(flags.device)


def _uncount_plan(plan: Any, used: Tensor) -> bool:
    """:func:`_uncounted` for a call of a work-sharded or FSDP2 bucket, whose plan counted it already (every
    rank keeps the plan's counter, owner or not): an uncounted call is taken back there."""
    uncounted = _uncounted(plan.calls - 1, used)
    if uncounted:
        plan.calls -= 1
    return uncounted


def _uncounted(calls: int, used: Tensor) -> bool:
    """Whether a bucket's call is its first (``calls``: the calls before it) and used no block's gradient
    (``used``: the blocks whose gradient was finite, in a step not skipped whole). Such a call is not
    counted: its counters stay as they were, so the next call is the first again, as if this step had
    not been taken (a ``skip_first_call`` observation, a first refresh and Adam's first bias correction are
    not spent on a step that changed nothing). Read on the host at a first call only
    (:func:`linalg._any_written`)."""
    return calls == 0 and not linalg._any_written(used)


class _StepFlag:
    """The step's flag (every gradient finite; ``None`` where there is none) on the device that asks for it.

    One device holds the flag (:meth:`KronOptimizer._all_finite`); with parameters on several devices each
    other device gets one copy a step, made at its first request. A host's copy of an accelerator's flag
    waits for the accelerator: the one synchronisation of a step over a CPU and an accelerator together.
    """

    def __init__(self, flag: Tensor | None) -> None:
        self.flag = flag
        self.copies: dict[torch.device, Tensor] = {}

    def __call__(self, device: torch.device) -> Tensor | None:
        if self.flag is None or self.flag.device == device:
            return self.flag
        if device not in self.copies:
            self.copies[device] = self.flag.to(device)
        return self.copies[device]


def _within_budget(work: list[tuple[_Bucket, KronConfig]], cap: int = 0) -> list[list[tuple[_Bucket, KronConfig]]]:
    """``work`` cut, in order, into runs of at most ``_SMALL_TOGETHER_BUDGET`` entries each, counting
    ``m n + m² + n²`` per block, and with a bucket cap (``cap`` bytes, ``bucket_cap_mib``) holding at most
    that much state together (:func:`_block_state_bytes`): a run's new states are all held until its
    writes. A bucket larger than either is alone in its run."""
    runs: list[list[tuple[_Bucket, KronConfig]]] = []
    size = held = 0
    for bucket, cfg in work:
        lay = bucket.layout
        entries = lay.batch * (lay.m * lay.n + lay.m**2 + lay.n**2)
        if cap and bucket.block_bytes is None:
            bucket.block_bytes = _block_state_bytes(cfg, lay, bucket.state_dtype)
        state = lay.batch * bucket.block_bytes if cap else 0  # type: ignore[operator]
        if not runs or size + entries > _SMALL_TOGETHER_BUDGET or held + state > cap:
            runs.append([])
            size = held = 0
        runs[-1].append((bucket, cfg))
        size += entries
        held += state
    return runs


def _foreach_extremes(tensors: list[Tensor]) -> Tensor:
    """``(k, 2)``: each tensor's smallest and largest entry (NaN where it holds one), by ``foreach`` reductions (a
    smallest entry as the negated largest of the negated tensor): a few calls for many small tensors."""
    lo = torch.stack(torch._foreach_max(torch._foreach_neg(tensors))).neg_()
    return torch.stack([lo, torch.stack(torch._foreach_max(tensors))], dim=1)


def _second_moment_bound(v_lo: Tensor, v_hi: Tensor) -> Tensor:
    """Each block's largest second moment from its smallest ``v_lo`` and largest ``v_hi`` entries, NaN where the
    smallest is below 0 (or NaN): the proofs take ``v ≥ 0``, which the optimizer's own updates keep but an edit of
    ``state[p]`` or a checkpoint may break (a square root of a negative entry, or of ``-inf``, is NaN), and NaN makes
    them fail, so the block goes through the path that tests its result."""
    return torch.where(v_lo >= 0, v_hi, torch.full_like(v_hi, math.nan))


def _second_moment_max(v_lo: float, v_hi: float) -> float:
    """:func:`_second_moment_bound` of one block read on the host: ``v_hi``, or NaN where ``v_lo`` is below 0 (or NaN)."""
    return v_hi if v_lo >= 0 else math.nan


def _bounds(g_lo: float, g_hi: float, m_lo: float, m_hi: float, v_hi: float) -> tuple[float, float, float]:
    """``(max |g|, max |m|, max v)`` of a block from its extremes (NaN where ``g`` holds one)."""
    return _abs_bound(g_lo, g_hi), max(-m_lo, m_hi), v_hi


def _momentum_of(inner: Any) -> Tensor | None:
    """The whole momentum stack of an ``eigenvalue`` rule's state (``"original"``'s buffer, ``"eigen"``'s), else ``None``."""
    from .inner_rules._common import MomentumState
    from .inner_rules.eigenvalue import EigenMomentumState

    if isinstance(inner, EigenMomentumState):
        return inner.momentum_eigen
    if isinstance(inner, MomentumState):
        return inner.momentum_buffer
    return None


@attrs.frozen
class _MomentumBounds:
    r"""Upper bounds on an ``eigenvalue`` rule bucket's momentum, block by block (``m`` of :math:`|m|`), carried
    from one step to the next on a CPU as :class:`_MomentBounds` carries Adam's, for
    :meth:`KronOptimizer._momentum_proof`: a step moves the momentum to :math:`\mu m + (1-\mu) x` (:math:`x` the
    rotated gradient, or the gradient in the original coordinates), so from the bound :math:`X` on :math:`|x|` the new
    bound is :math:`\mu M + (1-\mu) X`, plus four units of rounding of the larger and the dtype's smallest normal
    number. They hold only for the stack they were made on (held weakly), at the version counter and step count it
    was left with; writes torch does not count (through ``.data``, NumPy, DLPack or the storage) are not seen, as for
    :class:`_MomentBounds`: a momentum made huge so between steps is then moved in place, and its direction, untested,
    can step the parameter to a non-finite value (unsupported, as such writes are for every carried bound)."""

    momentum: "weakref.ref[Tensor]"
    version: int
    step: int
    m: list[float]

    @staticmethod
    def valid(known: Any, bucket: "_Bucket") -> "_MomentumBounds | None":
        """``known`` where it still holds for the bucket's momentum as it is now, else ``None``."""
        momentum = _momentum_of(bucket.state.inner)  # type: ignore[union-attr]
        if not isinstance(known, _MomentumBounds) or momentum is None or known.momentum() is not momentum:
            return None
        if known.step != bucket.state.step or known.version != momentum._version:  # type: ignore[union-attr]
            return None
        return known

    @staticmethod
    def after(bucket: "_Bucket", beta: float, used: list[tuple[float, float]]) -> "_MomentumBounds | None":
        """The bounds the bucket's momentum keeps after a step made in place with ``used`` (each block's ``(max |x|,
        max |m|)``), every block written; ``None`` where one is not finite, or the stack keeps no version counter."""
        momentum = _momentum_of(bucket.state.inner)  # type: ignore[union-attr]
        if momentum is None or momentum.is_inference():
            return None
        ms = [_ema_bound(beta, m, x, momentum.dtype) for x, m in used]
        if not all(math.isfinite(m) for m in ms):
            return None
        return _MomentumBounds(weakref.ref(momentum), momentum._version, bucket.state.step, ms)  # type: ignore[union-attr]

def _abs_bound(lo: float, hi: float) -> float:
    """``max |x|`` of a tensor from its smallest and largest entries (NaN where one is)."""
    return math.nan if math.isnan(lo + hi) else max(-lo, hi)


def _ema_bound(beta: float, old: float, new: float, dtype: torch.dtype) -> float:
    """A bound on ``β a + (1 − β) b`` computed in ``dtype`` for ``a ≤ old``, ``b ≤ new`` (non-negative bounds): the exact
    value plus four units of rounding of the larger and the dtype's smallest normal number (rounding among subnormal
    numbers is absolute, and an EMA there can stop decaying)."""
    info = torch.finfo(dtype)
    return beta * old + (1 - beta) * new + 4 * info.eps * max(old, new) + info.tiny


@attrs.frozen
class _MomentBounds:
    r"""Upper bounds on a plain AdamW bucket's moments, block by block (``m`` of :math:`|m|`, ``v`` of :math:`v`),
    carried from one step to the next on a CPU, so that :meth:`KronOptimizer._step_plain_adams` proves a large
    block's in-place update finite (:func:`compose.adam_block_is_safe`) without reading its moments again (a small
    block's too, while fewer than ``_ADAM_VERDICTS_TOGETHER_MIN`` step); and a rotated Adam bucket's moments in its
    basis, for :meth:`KronOptimizer._in_place_proof` (there :math:`g` is the
    bound on the rotated gradient, :func:`compose.rotated_gradient_bound`). A step
    moves a block's moments to :math:`\beta_1 m + (1-\beta_1) g` and :math:`\beta_2 v + (1-\beta_2) g^2`, so from
    the gradient's bound :math:`G` (read by the step's check anyway) the new bounds are
    :math:`\beta_1 M + (1-\beta_1) G` and :math:`\beta_2 V + (1-\beta_2) G^2`, each plus four units of rounding of
    its larger term and the dtype's smallest normal number (rounding among subnormal numbers is absolute, and a
    moment there can stop decaying). They hold only for the stacks they were made on (held weakly), at the version
    counters and the step count those were left with: every write torch counts (an edit of ``state[p]``, a load, a
    join or a cut, another path's step) moves one of them, and the next step reads the moments again. Writes torch
    does not count, through ``.data``, NumPy, DLPack or the storage, are not seen (nor are torch's fused AdamW
    kernel's, this path's own writes: the versions are taken after them); the optimizer's copies start without
    bounds (:meth:`KronOptimizer._carried_bounds`)."""

    exp_avg: "weakref.ref[Tensor]"
    exp_avg_sq: "weakref.ref[Tensor]"
    versions: tuple[int, int]
    step: int
    m: list[float]
    v: list[float]

    @staticmethod
    def valid(known: "_MomentBounds | None", bucket: "_Bucket") -> "_MomentBounds | None":
        """``known`` where it still holds for the bucket's moments as they are now, else ``None``."""
        inner = bucket.state.inner  # type: ignore[union-attr]
        if not isinstance(known, _MomentBounds) or known.exp_avg() is not inner.exp_avg or known.exp_avg_sq() is not inner.exp_avg_sq:
            return None
        if known.step != bucket.state.step or known.versions != (inner.exp_avg._version, inner.exp_avg_sq._version):  # type: ignore[union-attr]
            return None
        return known

    @staticmethod
    def after(
        bucket: "_Bucket", betas: tuple[float, float], used: list[tuple[float, float, float]], written: list[bool]
    ) -> "_MomentBounds | None":
        """The bounds the bucket's moments keep after a step judged with ``used`` (each block's ``(max |g|, max |m|,
        max v)``) that wrote the blocks flagged in ``written``; ``None`` where one is not finite, or the stacks
        keep no version counter (inference tensors): the next step reads the moments."""
        inner = bucket.state.inner  # type: ignore[union-attr]
        exp_avg, exp_avg_sq = inner.exp_avg, inner.exp_avg_sq  # type: ignore[union-attr]
        if exp_avg.is_inference() or exp_avg_sq.is_inference():
            return None
        beta1, beta2 = betas
        ms, vs = [], []
        for (g, m, v), wrote in zip(used, written):
            if wrote:
                m, v = _ema_bound(beta1, m, g, exp_avg.dtype), _ema_bound(beta2, v, g * g, exp_avg.dtype)
            if not (math.isfinite(m) and math.isfinite(v)):
                return None
            ms.append(m)
            vs.append(v)
        versions = (exp_avg._version, exp_avg_sq._version)
        return _MomentBounds(weakref.ref(exp_avg), weakref.ref(exp_avg_sq), versions, bucket.state.step, ms, vs)  # type: ignore[union-attr]


def _plain_adam_ok(v: Tensor, D: Tensor) -> Tensor:
    r"""``(b)`` mask of a plain AdamW bucket stepped on raw gradients: True where the gradient, the new
    moments and the direction ``D`` are finite on that block, read from the new second moment ``v`` and ``D``.

    The gradient needs no test of its own: the new second moment is
    :math:`\beta_2 v + (1-\beta_2) G^{\odot 2}` with :math:`1-\beta_2 > 0`, non-finite wherever
    ``G`` is. Being non-negative, it is finite exactly when its largest entry is (one reduction). Nor
    does the new first moment ``m``: with ``v`` finite, ``D``'s denominator is finite and
    non-negative, so a NaN or infinity in ``m`` reaches ``D``.
    """
    ok = linalg.finite_blocks(D)
    if v[0].numel():
        ok = ok & v.amax(dim=(1, 2)).isfinite()
    return ok
