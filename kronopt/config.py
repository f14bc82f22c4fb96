"""Configs as data: TOML ⇄ dict ⇄ frozen objects, with every error listed.

A config is one table per slot (``[factors]``, ``[basis]``, ``[inner]``,
``[split]``, ``[refresh]``) holding ``type = "<registry key>"`` and that stage's
fields, plus ``[post]``, ``[shapes]``, ``[route]``, top-level hyperparameters and
an optional ``[fallback]`` table (a whole pipeline config of its own for the
parameters the route sends there). :func:`from_dict` validates everything before
anything is built and raises one :class:`ConfigError` listing every problem with
its path; :func:`dumps` writes a config back so that ``loads(dumps(c)) == c``.
"""

import functools
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from .validators import BETA_TIE, MOMENTUM_TIE, _entries, ge, in_, le, problems_of, to_bool, to_float, to_int, to_str
from .post import Post
from .registry import SLOTS, PluginError, PluginLoadError
from .types import capabilities

STAGE_SLOTS: tuple[str, ...] = tuple(SLOTS)


class ConfigError(ValueError):
    """An invalid config; ``errors`` holds ``(path, message)`` for every problem found."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        lines = [f"{path}: {msg}" if path else msg for path, msg in errors]
        super().__init__(f"invalid config ({len(errors)} error{'s' * (len(errors) != 1)}):\n  " + "\n  ".join(lines))


@attrs.frozen(kw_only=True)
class Shapes:
    """How a parameter becomes an ``m × n`` block, and which sides are rotated.

    Attributes:
        max_dim: a side longer than this is not rotated (SOAP's ``max_precond_dim``).
        merge_dims: merge adjacent dims of N-D tensors greedily while the product
            stays ≤ ``max_dim`` (SOAP's ``merge_dims``).
        precondition_1d: rotate the (only) side of a 1-D parameter.
    """

    max_dim: int = attrs.field(default=10000, converter=to_int, validator=ge(0))
    merge_dims: bool = attrs.field(default=False, converter=to_bool)
    precondition_1d: bool = attrs.field(default=False, converter=to_bool)


def _regex(pattern: Any) -> str:
    """One ``fallback_names`` entry: a string that compiles (``re`` refuses a repeat count past its limit with an
    ``OverflowError``, a problem of the pattern like any other)."""
    pattern = to_str(pattern)
    try:
        re.compile(pattern)
    except (re.error, OverflowError) as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from exc
    return pattern


def _regexes(value: Any) -> tuple[str, ...]:
    """A list of regular expressions; every entry that is no string or does not compile named by its index."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"must be a list of strings, got {value!r}")
    return _entries(value, _regex)


@attrs.frozen(kw_only=True)
class Route:
    """Which parameters the pipeline handles and which go to the ``[fallback]`` config.

    Attributes:
        vectors: where 0-D and 1-D parameters go: ``"pipeline"`` or ``"fallback"``.
        fallback_names: regular expressions searched in parameter names (when the
            optimizer is given named parameters); a match goes to the fallback
            (embeddings, output heads).
    """

    vectors: Literal["pipeline", "fallback"] = attrs.field(
        default="pipeline", converter=to_str, validator=in_(("pipeline", "fallback"))
    )
    fallback_names: tuple[str, ...] = attrs.field(default=(), converter=_regexes)

    def named_to_fallback(self, name: str) -> bool:
        """Whether a parameter of this name goes to the fallback by name: one of ``fallback_names`` is found
        in it (searched, not matched from the start); what its dimension says is :attr:`vectors`' part."""
        return any(r.search(name) for r in _compiled(self.fallback_names))


@functools.lru_cache(maxsize=64)  # bounded: a sweep over many routes keeps no more (as the other module caches)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


@attrs.frozen(kw_only=True)
class Distributed:
    """How the optimizer runs under ``torch.distributed`` (top-level table only; docs/distributed.md).

    Read only when a process group is initialized with more than one rank and the
    parameters are plain tensors (DDP); in one process it changes nothing.

    Attributes:
        shard_work: each block's factors, basis, moments and direction are computed
            by one owner rank only (owners balanced by estimated cost), and the
            directions are all-gathered, one collective per bucket; every rank then
            writes every parameter identically. ``false``: every rank computes
            everything (no collective). Both give bit-identical parameters.
    """

    shard_work: bool = attrs.field(default=True, converter=to_bool)


_DTYPE_NAMES = ("float32", "float64")

#: what a ``[storage]`` entry may name: ``"compute"`` (the state dtype the maths run in) or a narrower dtype
STORAGE_DTYPES = ("compute", "float32", "bfloat16")


@attrs.frozen(kw_only=True)
class Storage:
    """The dtype each kind of optimizer state is kept in between steps (``[storage]``; docs/configs.md).

    The maths always run in the compute dtype (``state_dtype`` promoted with the
    parameter's dtype: float32, or float64 for float64 parameters): a bucket's stored
    state is upcast when its step starts and the new state is rounded to the storage
    dtype when it is written back. ``"compute"`` keeps today's behaviour (no cast, no
    copy). Integer and boolean tensors (counters, masks) keep their own dtype. A
    storage dtype is never wider than the compute dtype (both choices are at most
    float32, the narrowest compute dtype).

    Attributes:
        factors: the factor estimator's state (``factors.*``: Kronecker / KL factors,
            their tracked eigenvalues and subspaces).
        basis: the basis state (``basis.*``: ``Q_L``, ``Q_R`` and the basis's eigenvalue estimates).
        moments: the inner rule's, the split's and the post stage's state (``inner.*``,
            ``split.*``, ``post.*``: momentum, Adam moments, grafting moments).
    """

    factors: Literal["compute", "float32", "bfloat16"] = attrs.field(
        default="compute", converter=to_str, validator=in_(STORAGE_DTYPES)
    )
    basis: Literal["compute", "float32", "bfloat16"] = attrs.field(
        default="compute", converter=to_str, validator=in_(STORAGE_DTYPES)
    )
    moments: Literal["compute", "float32", "bfloat16"] = attrs.field(
        default="compute", converter=to_str, validator=in_(STORAGE_DTYPES)
    )

    def by_field(self) -> dict[str, str]:
        """The storage choice of each :class:`~kronopt.compose.BucketState` record (``factors``,
        ``basis``, ``inner``, ``split``, ``post``)."""
        return {"factors": self.factors, "basis": self.basis, "inner": self.moments, "split": self.moments, "post": self.moments}


#: why a fallback's route may be given only at its defaults (as dumps writes it)
_FALLBACK_ROUTE = (
    "a fallback routes nothing: its parameters were sent to it by the top-level config's route, and it has no "
    "fallback of its own; set route at the top level"
)


def _fallback_settings(_inst: Any, _attr: Any, fallback: "KronConfig | None") -> None:
    """A fallback config built in Python holds the :data:`FALLBACK_AT_DEFAULT` values and its route at their
    defaults, as a ``[fallback]`` table must (a config its dump would not load again)."""
    if fallback is None:
        return
    given = [f"{f.name} = {getattr(fallback, f.name)!r}" for f in _off_default({n: getattr(fallback, n) for n in FALLBACK_AT_DEFAULT})]
    if fallback.route != Route():
        raise ValueError(f"the fallback sets route = {fallback.route!r}: {_FALLBACK_ROUTE}")
    if given:
        raise ValueError(
            f"the fallback sets {', '.join(given)}: these are read from the top-level config for every parameter, "
            "the fallback's included; set them there"
        )


@attrs.frozen(kw_only=True)
class KronConfig:
    """One pipeline: a stage per slot, the post stage, shapes, routing and hyperparameters.

    Attributes:
        lr: step size η ≥ 0 (per param group; schedulers change it).
        weight_decay: decoupled weight decay λ ≥ 0 (per param group).
        skip_first_call: a parameter's first call only updates factors and
            builds the basis (SOAP); the parameter is not touched.
        factor_update: update the factors (and refresh) ``"after"`` the direction
            is computed (SOAP) or ``"before"`` it (Shampoo).
        state_dtype: the least precise dtype of the optimizer state; float64
            parameters always get float64 state.
        nonfinite: what a non-finite gradient block does: ``"warn"`` (skip it,
            warn on the next step), ``"raise"`` (raise ``FloatingPointError`` before
            anything changes, one host synchronisation per step; where a finite
            gradient's update or new state overflowed, that block is skipped and the
            error raised at the end of the step, whose blocks' verdicts are then read,
            on an accelerator a second synchronisation every step) or ``"skip"`` (skip
            it silently; see ``KronOptimizer.nonfinite_counts``). Read from the top-level config
            for every parameter; a ``[fallback]`` table may give only the default.
        nonfinite_scope: what a non-finite gradient skips: ``"step"`` (every
            parameter's update and state change of that step, as optax's
            ``apply_if_finite`` and ``torch.amp.GradScaler`` do; one device-side
            flag masks every write, no host synchronisation) or ``"block"`` (only
            the blocks whose gradient is non-finite). Top-level only.
        compile: run the Newton–Schulz iteration and the elementwise tail (Adam
            moments and ratio, the parameter write with weight decay) through
            ``torch.compile`` (:mod:`kronopt.compiled`; one graph per shape and dtype,
            with the step count and ``lr`` passed as tensors so they never recompile).
            Falls back to eager with a warning where compilation fails. Per group
            and per ``[fallback]``.
        rotation_dtype: the products that take a block into its basis and back each step (the
            gradient's and the momentum's rotations, the direction's return; KL's factor update reads the
            rotated gradient too): ``"compute"`` (the default) runs them in the compute dtype;
            ``"bfloat16"`` rounds their operands and results to bfloat16, each product summed in at least
            float32 (:class:`kronopt.linalg.NarrowProducts`; each rounding at most 2⁻⁸, 0.4 %, of what it rounds;
            about 0.4 % of a rotated entry in all), where a GPU's tensor cores or a CPU with AMX or
            ``avx512_bf16`` multiply about twice as fast or more. The factors, the bases, their refreshes and the
            moments' change of basis keep the compute dtype. Per group and per ``[fallback]``; no effect on a
            block without a basis (AdamW, Muon).
        matmul_precision: the float32 products of the step (factors, bases, rotations):
            ``"highest"`` runs them at full float32 precision whatever the process set for its
            model (TF32 on a GPU, bfloat16 products on a CPU), restoring the process's setting
            after the step; ``"inherit"`` leaves them to that setting (faster on a GPU with TF32,
            less precise: the specs' arithmetic is float32's). Top-level only.
        bucket_cap_mib: the most optimizer state (MiB, in the compute dtype) one bucket holds; 0 (the
            default): no cap; at most 2⁴³ (8 EiB).
            A step makes a bucket's new state before it writes it into the old (stages are pure),
            so its transient memory is about the state of the largest bucket; with a cap, blocks of
            one shape are stacked into as few buckets of nearly equal size under the cap as
            possible (one block at least), each stepped in its turn. The same algorithm block by
            block (a block stepped in a bucket steps as it would alone: bit for bit where the
            kernels allow, otherwise to float rounding); more buckets are more batched calls. Top-level only;
            a ``[fallback]`` table may give only the default (the cap holds for every bucket).
        max_skipped_steps: with ``"step"`` scope, ``step()`` raises
            ``FloatingPointError`` once this many consecutive steps were skipped
            (0: never). The count is read without a host synchronisation, so the
            error comes at the ``step()`` after the limit is reached (or at
            :meth:`KronOptimizer.flush_warnings`). Top-level only.
        storage: the ``[storage]`` table (:class:`Storage`): the dtype factors, bases and
            moments are kept in between steps.
        distributed: the ``[distributed]`` table (:class:`Distributed`); top-level
            only, a ``[fallback]`` table may not set it.
        fallback: the config of the parameters the route sends away; the top-level-only values
            (:data:`FALLBACK_AT_DEFAULT`) it may give only at their defaults, ``[distributed]`` not at all.
    """

    lr: float = attrs.field(default=1e-3, converter=to_float, validator=ge(0.0))
    weight_decay: float = attrs.field(default=0.0, converter=to_float, validator=ge(0.0))
    skip_first_call: bool = attrs.field(default=False, converter=to_bool)
    factor_update: Literal["after", "before"] = attrs.field(
        default="after", converter=to_str, validator=in_(("after", "before"))
    )
    state_dtype: str = attrs.field(default="float32", converter=to_str, validator=in_(_DTYPE_NAMES))
    nonfinite: Literal["warn", "raise", "skip"] = attrs.field(
        default="warn", converter=to_str, validator=in_(("warn", "raise", "skip"))
    )
    nonfinite_scope: Literal["step", "block"] = attrs.field(
        default="step", converter=to_str, validator=in_(("step", "block"))
    )
    max_skipped_steps: int = attrs.field(default=0, converter=to_int, validator=ge(0))
    matmul_precision: Literal["highest", "inherit"] = attrs.field(
        default="highest", converter=to_str, validator=in_(("highest", "inherit"))
    )
    compile: bool = attrs.field(default=False, converter=to_bool)
    rotation_dtype: Literal["compute", "bfloat16"] = attrs.field(
        default="compute", converter=to_str, validator=in_(("compute", "bfloat16"))
    )
    bucket_cap_mib: float = attrs.field(default=0.0, converter=to_float, validator=[ge(0.0), le(2.0**43)])  # 8 EiB
    factors: Any
    basis: Any
    inner: Any
    split: Any
    refresh: Any
    post: Post = attrs.field(factory=Post)
    shapes: Shapes = attrs.field(factory=Shapes)
    route: Route = attrs.field(factory=Route)
    storage: Storage = attrs.field(factory=Storage)
    distributed: Distributed = attrs.field(factory=Distributed)
    fallback: "KronConfig | None" = attrs.field(default=None, validator=_fallback_settings)

    def stages(self) -> dict[str, Any]:
        return {slot: getattr(self, slot) for slot in STAGE_SLOTS}

    def block(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """A parameter of ``shape`` as this config steps it: its block (``kronopt._shapes.BlockSpec``, by the
        ``[shapes]`` policy) and the block's :class:`~kronopt.types.Layout` (its sides and ranks, by the split;
        what of ``shape`` the inner rule reads, where it declares ``reads_param_shape``; ``batch`` 0)."""
        from ._shapes import block_spec
        from .types import Layout

        sh = self.shapes
        spec = block_spec(tuple(shape), max_dim=sh.max_dim, merge=sh.merge_dims, precondition_1d=sh.precondition_1d)
        (kind_L, rank_L), (kind_R, rank_R) = self.split.sides(spec.m, spec.n, (spec.rotate_left, spec.rotate_right))
        layout = Layout(batch=0, m=spec.m, n=spec.n, left=kind_L, right=kind_R, rank_left=rank_L, rank_right=rank_R)
        if capabilities(self.inner).reads_param_shape:
            layout = attrs.evolve(layout, param_dims=tuple(self.inner.param_dims(tuple(shape), layout)))
        return spec, layout

    def to_fallback(self, ndim: int, name: str | None = None) -> bool:
        """Whether the route sends a parameter of ``ndim`` dimensions, named ``name`` (``None``: unnamed), to the
        ``[fallback]`` config: a vector where ``route.vectors = "fallback"``, a name one of
        ``route.fallback_names`` is found in; never without a fallback."""
        return self.fallback is not None and (
            (ndim <= 1 and self.route.vectors == "fallback") or (name is not None and self.route.named_to_fallback(name))
        )

    def bound(self) -> "KronConfig":
        """The config the pipeline runs: ``factors.beta = "beta2"`` replaced by the inner rule's β₂, and
        ``post.graft_betas[0] = "momentum"`` by its first-moment retention (:func:`first_moment_beta`).

        The ties stay in the config itself (so ``to_dict``, overrides of
        ``inner.betas`` and saved state keep them); the optimizer binds each group's
        config when it resolves it (when the group is made, and where a step finds its
        ``overrides`` edited).
        """
        cfg = self
        if getattr(cfg.factors, "beta", None) == BETA_TIE:
            cfg = attrs.evolve(cfg, factors=attrs.evolve(cfg.factors, beta=cfg.inner.betas[1]))
        if cfg.post.graft_betas[0] == MOMENTUM_TIE:
            betas = (first_moment_beta(cfg.inner), cfg.post.graft_betas[1])
            cfg = attrs.evolve(cfg, post=attrs.evolve(cfg.post, graft_betas=betas))
        return cfg


def changed_keys(a: KronConfig, b: KronConfig) -> list[str]:
    """The dotted keys whose values differ between two configs: a stage's or a record's fields by name (a stage of
    another type, or one not made by ``attrs``, by its slot's name), the top-level values by theirs. ``fallback``
    is left out: the fallback's groups compare their own config."""
    out: list[str] = []
    for f in attrs.fields(KronConfig):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "fallback" or _equal(x, y):
            continue
        if type(x) is type(y) and attrs.has(type(x)):
            out += [f"{f.name}.{g.name}" for g in attrs.fields(type(x)) if not _equal(getattr(x, g.name), getattr(y, g.name))]
        else:
            out.append(f.name)
    return out


def _equal(x: Any, y: Any) -> bool:
    """Whether two config values are the same value (a tensor rate by its dtype and entries)."""
    if x is y:
        return True
    if hasattr(x, "detach") or hasattr(y, "detach"):  # a tensor lr: read on the host, never in a plain step
        return (
            hasattr(x, "detach") and hasattr(y, "detach") and x.dtype == y.dtype and x.shape == y.shape
            and bool((x.detach().cpu() == y.detach().cpu()).all())
        )
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:  # a plugin's value without a plain comparison
        return False


def first_moment_beta(inner: Any) -> float:
    """An inner rule's first-moment retention: its ``momentum``, or else the first of its ``betas``
    (``AttributeError`` where it has neither)."""
    momentum = getattr(inner, "momentum", None)
    if isinstance(momentum, int | float) and not isinstance(momentum, bool):
        return float(momentum)
    betas = getattr(inner, "betas", None)
    if isinstance(betas, tuple) and len(betas) == 2:
        return float(betas[0])
    raise AttributeError(f"inner rule {type(inner).__name__} has no momentum and no betas")


_SCALARS = tuple(
    f.name for f in attrs.fields(KronConfig) if f.name not in (*STAGE_SLOTS, "post", "shapes", "route", "storage", "distributed", "fallback")
)
_RECORDS: dict[str, type] = {"post": Post, "shapes": Shapes, "route": Route, "storage": Storage, "distributed": Distributed}
_TOP_ONLY: tuple[str, ...] = ("distributed",)  # records a [fallback] table may not set


def _records(top: bool) -> dict[str, type]:
    """The record tables of a config: all of them at the top level, those a fallback may set inside it."""
    return _RECORDS if top else {k: v for k, v in _RECORDS.items() if k not in _TOP_ONLY}


#: top-level values the step reads from the top-level config for every parameter, the fallback's included: a
#: ``[fallback]`` table may give them only at their defaults (as :func:`dumps` writes them), where another value
#: was accepted and ignored
FALLBACK_AT_DEFAULT: tuple[str, ...] = ("nonfinite", "nonfinite_scope", "max_skipped_steps", "matmul_precision", "bucket_cap_mib")


def _off_default(values: Mapping[str, Any]) -> list[Any]:
    """The :data:`FALLBACK_AT_DEFAULT` fields of :class:`KronConfig` that ``values`` gives other than their defaults
    (a fallback's: :func:`_fallback_settings` for a config built in Python, :func:`_fallback_at_default` for a table)."""
    return [f for f in attrs.fields(KronConfig) if f.name in FALLBACK_AT_DEFAULT and f.name in values and values[f.name] != f.default]


def _fallback_at_default(kwargs: Mapping[str, Any], prefix: str, errors: list[tuple[str, str]]) -> None:
    """A ``[fallback]`` table's :data:`FALLBACK_AT_DEFAULT` values (checked already) other than their defaults."""
    for f in _off_default(kwargs):
        errors.append((
            _join(prefix, f.name),
            f"is read from the top-level config for every parameter, the fallback's included: set it there "
            f"(a [fallback] table may give only its default, {f.default!r})",
        ))


def without_fallback_settings(raw: Any) -> Any:
    """A saved config (a :func:`to_dict`) without its ``[fallback]`` table's :data:`FALLBACK_AT_DEFAULT` keys and
    ``route``: kronopt before they were refused there accepted any value and ignored it (the step read the
    top-level one; a fallback routes nothing), so dropping them loads such a config as its run stepped."""
    fallback = raw.get("fallback") if isinstance(raw, Mapping) else None
    ignored = (*FALLBACK_AT_DEFAULT, "route")
    if not isinstance(fallback, Mapping) or not any(k in fallback for k in ignored):
        return raw
    return {**raw, "fallback": {k: v for k, v in fallback.items() if k not in ignored}}


# -- building --------------------------------------------------------------------------


def _build_record(cls: type, table: Any, path: str, errors: list[tuple[str, str]], *, skip: tuple[str, ...] = ()) -> Any:
    """Build an attrs record from a table, collecting every field error."""
    if not isinstance(table, Mapping):
        errors.append((path, f"must be a table, got {type(table).__name__}"))
        return None
    names = {f.alias for f in attrs.fields(cls) if f.init and f.alias not in skip}
    kwargs: dict[str, Any] = {}
    found = len(errors)
    for key, value in table.items():
        if key not in names:
            errors.append((f"{path}.{key}", f"unknown key; {cls.__name__} accepts: {', '.join(sorted(names)) or '(none)'}"))
            continue
        try:
            _check_field(cls, key, value)
        except (TypeError, ValueError, OverflowError) as exc:
            errors.append((f"{path}.{key}", _bad_value(exc)))
            continue
        kwargs[key] = value
    if len(errors) > found:
        _cross_checks(cls, kwargs, path, errors, refused=[p.rpartition(".")[2] for p, _ in errors[found:]], names=names)
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        errors.append((path, _bad_value(exc)))
        return None


def _cross_checks(
    cls: type, kwargs: dict[str, Any], path: str, errors: list[tuple[str, str]], *, refused: list[str], names: set[str]
) -> None:
    """A record some of whose keys were refused: its checks across keys (``offset < every``) run on the accepted ones,
    the refused keys at their defaults, so a problem among the accepted keys is listed with the others; not one that
    names a refused key (found with its default, not the value given), nor where a refused key has no default. Where
    the record reports several problems at once (:class:`~kronopt.validators.Problems`), each is judged apart."""
    refused = [k for k in refused if k in names]
    required = {f.alias for f in attrs.fields(cls) if f.init and f.default is attrs.NOTHING}
    if required - kwargs.keys():
        return
    try:
        cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        problems = problems_of(exc)  # a stage's several problems (validators.Problems) judged one by one
        kept = [p for p in problems if not any(re.search(rf"\b{re.escape(k)}\b", p) for k in refused)]
        if kept:
            errors.append((path, _bad_value(exc) if len(kept) == len(problems) else "; ".join(kept)))


def _stand_in(cls: type, table: Any) -> Any:
    """A record in error as the combination and route checks judge it: its accepted keys, the refused ones at their
    defaults (``None`` where that makes no record)."""
    if not isinstance(table, Mapping):
        return None
    names = {f.alias for f in attrs.fields(cls) if f.init}
    accepted = {}
    for key, value in table.items():
        if key not in names:
            continue
        try:
            _check_field(cls, key, value)
        except (TypeError, ValueError, OverflowError):
            continue
        accepted[key] = value
    try:
        return cls(**accepted)
    except (TypeError, ValueError, OverflowError):
        return None


def _build_stage(slot: str, table: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    registry = SLOTS[slot]
    if not isinstance(table, Mapping):
        errors.append((path, f"must be a table with a 'type' key, got {type(table).__name__}"))
        return None
    key = table.get("type")
    if not isinstance(key, str):
        errors.append((f"{path}.type", f"missing or not a string; available {slot} stages: {', '.join(registry.keys())}"))
        return None
    try:
        cls = registry.get(key)
    except KeyError as exc:
        errors.append((f"{path}.type", str(exc.args[0])))
        return None
    except (PluginLoadError, PluginError) as exc:
        errors.append((f"{path}.type", str(exc)))
        return None
    return _build_record(cls, {k: v for k, v in table.items() if k != "type"}, path, errors)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build_config(raw: Any, prefix: str, errors: list[tuple[str, str]], *, allow_fallback: bool) -> KronConfig | None:
    if not isinstance(raw, Mapping):
        errors.append((prefix, f"must be a table, got {type(raw).__name__}"))
        return None
    known = {*_SCALARS, *STAGE_SLOTS, *_records(allow_fallback), *(("fallback",) if allow_fallback else ())}
    kwargs: dict[str, Any] = {}
    found = len(errors)
    for key in raw:
        if key not in known:
            errors.append((_join(prefix, key), f"unknown key; a config accepts: {', '.join(sorted(known))}"))
    kwargs.update(_checked_scalars({k: raw[k] for k in _SCALARS if k in raw}, prefix, errors))
    if not allow_fallback:
        _fallback_at_default(kwargs, prefix, errors)
    for slot in STAGE_SLOTS:
        if slot not in raw:
            errors.append((_join(prefix, slot), f"missing table; give [{slot}] with a 'type' (one of: {', '.join(SLOTS[slot].keys())})"))
            continue
        kwargs[slot] = _build_stage(slot, raw[slot], _join(prefix, slot), errors)
    stand_ins: dict[str, Any] = {}  # the records in error, their refused keys at their defaults
    for name, cls in _records(allow_fallback).items():
        if name in raw:
            kwargs[name] = _build_record(cls, raw[name], _join(prefix, name), errors)
            if kwargs[name] is None:
                stand_ins[name] = _stand_in(cls, raw[name])
    route = kwargs.get("route") or stand_ins.get("route")
    if not allow_fallback and isinstance(route, Route) and route != Route():
        errors.append((_join(prefix, "route"), _FALLBACK_ROUTE))
    if allow_fallback and "fallback" in raw:
        kwargs["fallback"] = _build_config(raw["fallback"], _join(prefix, "fallback"), errors, allow_fallback=False)
    if len(errors) > found:
        given = allow_fallback and "fallback" in raw
        _check_compatible_anyway(
            lambda ok: KronConfig(**ok), kwargs, prefix, errors, allow_fallback=allow_fallback, fallback_given=given,
            stand_ins=stand_ins, refused=_refused(errors[found:], prefix),
        )
        return None
    cfg = KronConfig(**kwargs)
    _check_compatible(cfg, prefix, errors)
    _check_route(cfg, prefix, errors, allow_fallback=allow_fallback)
    return None if len(errors) > found else cfg


def _checked_scalars(scalars: Mapping[str, Any], prefix: str, errors: list[tuple[str, str]]) -> dict[str, Any]:
    """The top-level values that pass their field's converter and validators; the others become errors."""
    out: dict[str, Any] = {}
    for key, value in scalars.items():
        try:
            _check_field(KronConfig, key, value)
        except (TypeError, ValueError, OverflowError) as exc:
            errors.append((_join(prefix, key), _bad_value(exc)))
        else:
            out[key] = value
    return out


def _bad_value(exc: BaseException) -> str:
    """A field's error as the config lists it: an ``OverflowError`` (a number Python cannot hold as a float, a
    regular expression's repeat count past its limit) says so; the others say what they say."""
    if isinstance(exc, OverflowError):
        return f"a number too large to use ({exc})"
    return str(exc)


def _check_field(cls: type, key: str, value: Any) -> None:
    """Run one field's converter and validators alone (cross-field checks run later).

    ``key`` is the field's constructor name (its attrs alias), which is also its config key.
    """
    field = next(f for f in attrs.fields(cls) if f.alias == key)
    converted = field.converter(value) if field.converter is not None else value  # type: ignore[operator]
    if field.validator is not None:
        field.validator(None, field, converted)


def _check_compatible_anyway(
    make: Callable[[dict[str, Any]], KronConfig], parts: Mapping[str, Any], prefix: str, errors: list[tuple[str, str]],
    *, allow_fallback: bool, fallback_given: bool, stand_ins: Mapping[str, Any], refused: frozenset[str],
) -> None:
    """:func:`_check_compatible` and :func:`_check_route` on a config that has errors already, so that an
    incompatible combination of stages, or a route to a missing fallback, is listed beside them: on the config
    ``make`` builds from the ``parts`` that passed, a record in error as its ``stand_ins`` one (its accepted keys,
    the refused ones at their defaults), a top-level value in error at its default (or as it was).
    A stage in error is not judged (the combination would name a stage the user is replacing, or judge options
    the user did not give): every check that involves it is skipped, the others run. A problem found that names a
    ``refused`` key (a dotted path below ``prefix``) is dropped: it was found with a value the user did not give.
    The route is judged where a given ``[fallback]`` did not fail, with its refused keys at their defaults."""
    failed = {k for k, v in parts.items() if v is None}
    kept = {k: v for k, v in parts.items() if v is not None}
    kept.update({k: v for k, v in stand_ins.items() if v is not None})
    kept.update({slot: None for slot in STAGE_SLOTS if slot in failed})  # the checks that involve it are skipped
    try:
        cfg = make(kept)
    except (TypeError, ValueError):  # cross-field checks of the constructor: the parts make no config
        return
    found: list[tuple[str, str]] = []
    _check_compatible(cfg, prefix, found, failed=frozenset(failed & set(STAGE_SLOTS)))
    if "fallback" not in failed and ("route" not in failed or stand_ins.get("route") is not None):
        _check_route(cfg, prefix, found, allow_fallback=allow_fallback, fallback_given=fallback_given)
    for path, message in found:
        key = path[len(prefix) + 1:] if prefix else path
        if key not in refused and not any(re.search(rf"(?<![\w.]){re.escape(k)}\b", message) for k in refused):
            errors.append((path, message))


def _refused(errors: list[tuple[str, str]], prefix: str) -> frozenset[str]:
    """The keys in error (dotted, below ``prefix``: ``lr``, ``route.fallback_names``) of one config table; not a
    table's own path (a stage in error is not judged at all, a record in error judged by its stand-in)."""
    keys = (path[len(prefix) + 1:] if prefix else path for path, _ in errors if not prefix or path.startswith(prefix + "."))
    return frozenset(k for k in keys if k not in (*STAGE_SLOTS, *_RECORDS, "fallback"))


def _check_route(cfg: KronConfig, prefix: str, errors: list[tuple[str, str]], *, allow_fallback: bool, fallback_given: bool = False) -> None:
    """A route that sends parameters to a fallback the config does not have."""
    if allow_fallback and cfg.fallback is None and not fallback_given and (cfg.route.vectors == "fallback" or cfg.route.fallback_names):
        errors.append((_join(prefix, "route"), "sends parameters to the fallback, but there is no [fallback] table"))


def _check_compatible(cfg: KronConfig, prefix: str, errors: list[tuple[str, str]], *, failed: frozenset[str] = frozenset()) -> None:
    """Cross-stage checks: a combination that cannot work fails here, naming the stages. ``failed``: the stage
    slots in error (stand-ins in ``cfg``); a check that involves one of them is skipped."""

    def judged(*slots: str) -> bool:
        return failed.isdisjoint(slots)

    stages = {slot: stage for slot, stage in cfg.stages().items() if slot not in failed}

    def key(slot: str, stage: Any) -> str:
        try:
            return SLOTS[slot].key_of(type(stage))
        except KeyError:  # a stage object built outside the registries
            return type(stage).__name__

    keys = {slot: key(slot, stage) for slot, stage in stages.items()}
    caps = {slot: capabilities(stage) for slot, stage in stages.items() if slot != "refresh"}

    def able(slot: str, wanted: Callable[[Any], bool]) -> str:
        """The registered keys of ``slot`` whose capabilities satisfy ``wanted``."""
        keys = [e.key for e in SLOTS[slot].entries(load_plugins=False) if wanted(capabilities(e.cls))]
        return ", ".join(keys) or "(none)"

    if cfg.max_skipped_steps and cfg.nonfinite_scope != "step":
        errors.append((
            _join(prefix, "max_skipped_steps"),
            f"counts steps skipped whole, which nonfinite_scope = {cfg.nonfinite_scope!r} never skips; "
            "use nonfinite_scope = 'step', or max_skipped_steps = 0",
        ))
    if judged("basis", "factors") and caps["basis"].needs_factors and not caps["factors"].provides_factors:
        errors.append((
            _join(prefix, "basis.type"),
            f"basis {keys['basis']!r} needs Kronecker factors, but factors {keys['factors']!r} keeps none; "
            f"use factors of type: {able('factors', lambda c: c.provides_factors)}",
        ))
    if judged("inner", "basis", "factors") and caps["inner"].needs_eigvals and not (
        caps["basis"].provides_eigvals or caps["factors"].provides_eigvals
    ):
        errors.append((
            _join(prefix, "inner.type"),
            f"inner {keys['inner']!r} needs eigenvalue estimates, but neither basis {keys['basis']!r} nor "
            f"factors {keys['factors']!r} provides them; use a basis of type: {able('basis', lambda c: c.provides_eigvals)}",
        ))
    if judged("factors", "inner") and getattr(cfg.factors, "beta", None) == BETA_TIE:
        betas = getattr(cfg.inner, "betas", None)
        if not (isinstance(betas, tuple) and len(betas) == 2):
            errors.append((
                _join(prefix, "factors.beta"),
                f"{BETA_TIE!r} ties the factor retention to the inner rule's β₂, but inner {keys['inner']!r} has no "
                "betas; give a number",
            ))
        else:
            try:
                cfg.bound()
            except (TypeError, ValueError) as exc:
                errors.append((_join(prefix, "factors.beta"), f"{BETA_TIE!r} = inner.betas[1] = {betas[1]!r}: {exc}"))
    if judged("inner") and cfg.post.graft_betas[0] == MOMENTUM_TIE:
        try:
            first_moment_beta(cfg.inner)
        except AttributeError:
            errors.append((
                _join(prefix, "post.graft_betas"),
                f"{MOMENTUM_TIE!r} ties the graft's β₁ to the inner rule's momentum, but inner {keys['inner']!r} has "
                "neither a momentum nor betas; give a number",
            ))
    # a split able to restrict a side, set so that it restricts none on any shape the policy rotates on both sides
    # (lowrank_flat with rank = 1.0 and max_rank = 0), asks nothing of the other stages
    if judged("split") and caps["split"].restricts and _restricts_somewhere(cfg):
        for slot in ("factors", "basis", "inner"):
            if not judged(slot):
                continue
            if not caps[slot].supports_restricted:
                errors.append((
                    _join(prefix, f"{slot}.type"),
                    f"split {keys['split']!r} keeps a restricted side, which {slot} {keys[slot]!r} does not support; "
                    f"{slot} stages that do: {able(slot, lambda c: c.supports_restricted)}",
                ))
                continue
            # a stage that supports restricted sides may still refuse them with some options
            conflict = getattr(stages[slot], "restricted_conflict", None)
            found = conflict() if callable(conflict) else None
            if found is not None:
                option, why = found
                errors.append((_join(prefix, f"{slot}.{option}"), f"split {keys['split']!r} keeps a restricted side: {why}"))
        if judged("factors"):
            errors.extend(_projector_splitting_restricted(cfg.factors, keys["split"], prefix))
        if judged("inner") and not caps["inner"].exposes_moment:
            errors.append((
                _join(prefix, "inner.type"),
                f"split {keys['split']!r} orthogonalizes the complement of the inner rule's first moment, "
                f"but inner {keys['inner']!r} exposes none (no moment())",
            ))
        # a restricted side's subspace starts at the first gradient's top singular vectors, built by the factor
        # estimator's first call (ctx.step == 0) and handed to the basis by the refresh of that call: the state
        # is then expressed in the subspace the basis holds. Without either, the estimator updates (S, mu) in
        # the basis's starting coordinates and the first refresh moves U away from them
        # asked of the schedule itself (Refresh.due), so a refresh stage of any type is judged
        at_first_call = cfg.refresh.due(0, first_call=True) if judged("refresh") else True
        if not cfg.skip_first_call or not at_first_call:
            option = (
                "skip_first_call" if not cfg.skip_first_call
                else "refresh.at_first_call" if hasattr(cfg.refresh, "at_first_call") else "refresh.type"
            )
            errors.append((
                _join(prefix, option),
                f"split {keys['split']!r} keeps a restricted side, whose first subspace is built on a parameter's "
                "first call: it needs skip_first_call = true and refresh.at_first_call = true",
            ))


def _restricts_somewhere(cfg: KronConfig) -> bool:
    """Whether the split keeps a restricted side on some matrix the ``[shapes]`` policy rotates on both sides (every
    side up to ``shapes.max_dim``): ``lowrank_flat`` with ``rank = 1.0`` and ``max_rank = 0`` (or a rank of at least
    ``max_dim``) never does. Its rank grows no faster than the side, so the largest rotated side decides; smaller
    powers of two are asked too, for a split of another kind. A split whose ``sides`` fails is taken to restrict."""
    top = cfg.shapes.max_dim
    sizes = sorted({top, *(1 << k for k in range(max(top.bit_length() - 1, 0)))} - {0})
    try:
        return any(
            "restricted" in (left, right)
            for m in sizes for n in sizes
            for (left, _), (right, _) in [cfg.split.sides(m, n, (True, True))]
        )
    except Exception:  # noqa: BLE001 - a stage outside the registries: as its capability says
        return True


def _projector_splitting_restricted(factors: Any, split: str, prefix: str) -> list[tuple[str, str]]:
    """``projector_splitting`` keeps a restricted side only with ``variant = 'ksl'`` and ``init = 'kron'`` (its
    ``_init_restricted`` refuses any other at construction, on every parameter whose side is restricted): one
    problem per option in error."""
    from .factors.projector_splitting import ProjectorSplittingFactors

    if not isinstance(factors, ProjectorSplittingFactors):
        return []
    return [
        (
            _join(prefix, f"factors.{key}"),
            f"split {split!r} keeps a restricted side, which factors 'projector_splitting' {verb} only with "
            f"{key} = {need!r} (got {got!r}); use {key} = {need!r}, or a split that restricts no side "
            "(split.rank = 1.0 with split.max_rank = 0, or split.type = 'full')",
        )
        for key, verb, need, got in (
            ("variant", "keeps", "ksl", factors.variant), ("init", "starts", "kron", factors.initialization)
        )
        if got != need
    ]


def from_dict(raw: Mapping[str, Any]) -> KronConfig:
    """Validate and build a config; raises :class:`ConfigError` listing every problem."""
    errors: list[tuple[str, str]] = []
    cfg = _build_config(raw, "", errors, allow_fallback=True)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def loads(text: str) -> KronConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"not valid TOML: {exc}")]) from exc
    return from_dict(raw)


def read_toml(path: str | Path, what: str = "config file") -> tuple[dict[str, Any], str]:
    """A TOML file's table and its text, or a :class:`ConfigError` naming the file: it cannot be read, is not
    UTF-8 (TOML is UTF-8 only) or is not TOML. ``what`` names the kind of file in the first message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read {what} {str(path)!r}: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"{str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                            f"{exc.start}); a TOML file must be UTF-8")]) from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"{str(path)!r} is not valid TOML: {exc}")]) from exc


def load(path: str | Path) -> KronConfig:
    path = Path(path)
    raw, _ = read_toml(path)
    return from_dict(raw)


# -- writing back ----------------------------------------------------------------------


def _record_dict(record: Any) -> dict[str, Any]:
    return {f.alias: _plain(getattr(record, f.name)) for f in attrs.fields(type(record)) if f.init}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: KronConfig) -> dict[str, Any]:
    """The fully resolved config as plain data (the inverse of :func:`from_dict`)."""
    return _to_dict(cfg, top=True)


def _to_dict(cfg: KronConfig, *, top: bool) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(cfg, k) for k in _SCALARS}
    for slot, stage in cfg.stages().items():
        out[slot] = {"type": SLOTS[slot].key_of(type(stage)), **_record_dict(stage)}
    for name in _records(top):
        out[name] = _record_dict(getattr(cfg, name))
    if cfg.fallback is not None:
        out["fallback"] = _to_dict(cfg.fallback, top=False)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):  # JSON escapes are TOML escapes; TOML also forbids a raw DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):  # a plain config dict may hold tuples where TOML has arrays
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _dump_table(data: Mapping[str, Any], name: str, lines: list[str]) -> None:
    # an option left at None is omitted (TOML has no null): read back, it takes its default, None
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if name:
        lines.append(f"[{name}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    if scalars or name:
        lines.append("")
    for key, value in tables.items():
        _dump_table(value, f"{name}.{key}" if name else key, lines)


def dumps(cfg: KronConfig | Mapping[str, Any]) -> str:
    """TOML text of a config (or of a plain config dict)."""
    data = to_dict(cfg) if isinstance(cfg, KronConfig) else cfg
    lines: list[str] = []
    _dump_table(data, "", lines)
    return "\n".join(lines).rstrip() + "\n"


# -- overrides -------------------------------------------------------------------------


def _whole_table(example: str) -> str:
    """The problem of an override that gives a whole table as one value (both override paths refuse it)."""
    return f"is a table: set one of its keys (e.g. '{example}')"


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted keys set (``"refresh.every"``, ``"fallback.lr"``).

    Setting a stage's ``type`` to a different stage starts that table afresh (the
    old stage's options would not apply), keeping the other overrides given for it.
    An override with no place in the config (a whole table as one value, a key below a value, ``fallback.*``
    where there is no ``[fallback]``) raises a :class:`ConfigError` that lists it with every problem of the
    config the other overrides make, as :func:`with_overrides` does.
    """
    out = _deepcopy(raw)
    items = sorted(overrides.items(), key=lambda kv: not kv[0].endswith(".type"))
    errors: list[tuple[str, str]] = []
    for dotted, value in items:
        parts = dotted.split(".")
        misplaced = _misplaced(parts, raw, "", top=True)
        if misplaced is not None:
            if misplaced not in errors:  # every fallback.* key of a config without one: one error
                errors.append(misplaced)
            continue
        table = out
        for part in parts[:-1]:
            nxt = table.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                table[part] = nxt
            table = nxt
        last = parts[-1]
        if isinstance(value, Mapping) and (len(parts) == 1 or isinstance(table.get(last), Mapping)):
            # a whole table given as one value would replace it (its other keys reset to their defaults, a dotted
            # override of the same table dropped): refused, as with_overrides refuses it on a resolved config
            errors.append((dotted, _whole_table(f"{dotted}.{next(iter(value), 'type')}")))
            continue
        if last == "type" and table.get("type") != value:
            table.clear()
        table[last] = _deepcopy(value)
    if errors:  # the config without the refused overrides: its own problems are listed with theirs
        _build_config(out, "", errors, allow_fallback=True)
        raise ConfigError(errors)
    return out


def _misplaced(parts: list[str], raw: Any, prefix: str, *, top: bool) -> tuple[str, str] | None:
    """The problem of a dotted override with no place in a config, as :func:`with_overrides` words it: a key below
    a value (``lr.x``, ``inner.betas.x``: it would replace the value), or below a ``[fallback]`` the config does not
    have (one would be made, missing every table); ``None`` where it has a place (or is left to the config's
    checks: an unknown table)."""
    head, rest = parts[0], parts[1:]
    if not rest:
        return None
    path = _join(prefix, ".".join(parts))
    if head in _SCALARS:
        return path, f"{head!r} is a value, not a table"
    if (head in STAGE_SLOTS or head in _records(top)) and len(rest) > 1:
        return path, f"unknown key; {head} options are not tables"
    if head == "fallback" and top:
        if not isinstance(raw, Mapping) or "fallback" not in raw:
            return _join(prefix, "fallback"), "this config has no [fallback] to override"
        return _misplaced(rest, raw["fallback"], _join(prefix, "fallback"), top=False)
    return None


def with_overrides(cfg: KronConfig, overrides: Mapping[str, Any]) -> KronConfig:
    """``cfg`` with dotted overrides applied to the resolved objects, every problem in one :class:`ConfigError`.

    The result equals ``from_dict(apply_overrides(to_dict(cfg), overrides))`` (tested),
    but only the records an override names are rebuilt (``attrs.evolve`` semantics:
    converters, validators and the cross-stage checks run again); the rest of
    ``cfg`` is shared. Setting ``X.type`` to another stage starts ``X`` afresh, as
    :func:`apply_overrides` does.
    """
    if not overrides:
        return cfg
    errors: list[tuple[str, str]] = []
    out = _evolve_config(cfg, overrides, "", errors, allow_fallback=True)
    if errors or out is None:
        raise ConfigError(errors)
    return out


def _evolve_config(
    cfg: KronConfig, overrides: Mapping[str, Any], prefix: str, errors: list[tuple[str, str]], *, allow_fallback: bool
) -> KronConfig | None:
    found = len(errors)
    tables: dict[str, dict[str, Any]] = {}
    scalars: dict[str, Any] = {}
    known = {*_SCALARS, *STAGE_SLOTS, *_records(allow_fallback), *(("fallback",) if allow_fallback else ())}
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if head not in known:
            errors.append((_join(prefix, dotted), f"unknown key; a config accepts: {', '.join(sorted(known))}"))
        elif head in _SCALARS:
            if rest:
                errors.append((_join(prefix, dotted), f"{head!r} is a value, not a table"))
            else:
                scalars[head] = value
        elif not rest:
            errors.append((_join(prefix, dotted), _whole_table("inner.type")))
        else:
            tables.setdefault(head, {})[rest] = value
    kwargs: dict[str, Any] = _checked_scalars(scalars, prefix, errors)
    if not allow_fallback:
        _fallback_at_default(kwargs, prefix, errors)
    stand_ins: dict[str, Any] = {}  # the records in error, their refused keys at their defaults
    for name, sub in tables.items():
        path = _join(prefix, name)
        if name == "fallback":
            if cfg.fallback is None:
                errors.append((path, "this config has no [fallback] to override"))
            else:
                kwargs[name] = _evolve_config(cfg.fallback, sub, path, errors, allow_fallback=False)
            continue
        nested = [k for k in sub if "." in k]
        for k in nested:
            errors.append((f"{path}.{k}", f"unknown key; {name} options are not tables"))
        record = getattr(cfg, name)
        if name in STAGE_SLOTS:
            current = {"type": SLOTS[name].key_of(type(record)), **_record_dict(record)}
            if "type" in sub and sub["type"] != current["type"]:
                current = {}
            table = {**current, **{k: v for k, v in sub.items() if k not in nested}}
            kwargs[name] = _build_stage(name, table, path, errors)
        else:
            table = {**_record_dict(record), **{k: v for k, v in sub.items() if k not in nested}}
            kwargs[name] = _build_record(_RECORDS[name], table, path, errors)
            if kwargs[name] is None:
                stand_ins[name] = _stand_in(_RECORDS[name], table)
            if name == "route" and not allow_fallback:
                route = kwargs[name] or stand_ins[name]
                if isinstance(route, Route) and route != Route():
                    errors.append((path, _FALLBACK_ROUTE))
    if len(errors) > found:
        _check_compatible_anyway(
            lambda ok: attrs.evolve(cfg, **ok), kwargs, prefix, errors, allow_fallback=allow_fallback,
            fallback_given=allow_fallback and cfg.fallback is not None, stand_ins=stand_ins,
            refused=_refused(errors[found:], prefix),
        )
        return None
    out = attrs.evolve(cfg, **kwargs)
    _check_compatible(out, prefix, errors)
    _check_route(out, prefix, errors, allow_fallback=allow_fallback)
    return None if len(errors) > found else out


def _deepcopy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deepcopy(v) for v in value]
    return value
