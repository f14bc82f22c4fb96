"""Compare optimizers on the default task by swapping one thing: ``kronopt ablate ABLATION.toml``.

An ablation file names a base config, the task settings, the variants and how to
tune them (see ``docs/ablations.md`` for the format). Every variant trains the
same model on the same batches (:func:`kronopt.app.train.train`). With a ``[tune]``
table each variant runs on a learning-rate grid and several seeds, and is
reported at its best learning rate (lowest mean validation loss over the seeds).
A variant whose config is invalid or names a stage or preset that does not
exist, that raises while training, or whose loss diverges, is reported with its
reason; the others still run.

One *unit* is one training run: a variant at one learning rate and one seed.
Every finished unit is cached in ``units/<key>.json`` in the output directory,
keyed by its resolved optimizer config, its task (seed included) and the SHA-256
of the data it trains on (:func:`data_sha256`; the bytes, not the path), so
running the same command again skips it: an interrupted ablation resumes where
it stopped, and a data file edited in place runs again.

Writes to the output directory: ``results.csv`` (one row per variant, at its
best learning rate), ``grid.csv`` (one row per unit), ``results.json`` (both,
with the task, the tuning and the target), ``loss.png`` (every variant's loss
curves at its best learning rate), ``lr.png`` (final validation loss against the
learning rate), ``cost.png`` (step time and optimizer state memory),
``ablation.toml`` (the file as given), ``units/`` (the cache) and one run
directory per unit.
"""

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

import kronopt
from kronopt.config import ConfigError, KronConfig, read_toml, to_dict

from . import _args
from ._extras import MissingExtraError, pyplot
from .task import load_corpus, stdlib_digest, stdlib_files
from .task.data import unreadable_data
from .train import (
    MAX_SEED,
    TaskConfig,
    add_task_arguments,
    plot_losses,
    remove_run_files,
    resolve_device,
    task_from_args,
    task_from_dict,
    task_to_dict,
    train,
)

#: version of the ``units/<key>.json`` layout; part of every unit's key. 2: the data's bytes replace its path
#: in the key (a unit file of format 1 is never read, so it runs again); 3: the last window of a split can be drawn
#: and the validation sample no longer follows the seed (the batches changed, so format-2 units run again)
UNIT_FORMAT = 3
#: bytes read at a time while hashing a data file
HASH_CHUNK_BYTES = 1 << 20
#: what an ablation writes into its output directory beside the variants' run directories: no variant's run
#: directory may take one of these names
OUTPUT_NAMES: tuple[str, ...] = ("results.csv", "grid.csv", "results.json", "loss.png", "lr.png", "cost.png",
                                 "ablation.toml", "units")


@attrs.frozen(kw_only=True)
class Variant:
    """One optimizer of an ablation: a spec (preset, TOML path or dict) and dotted overrides."""

    name: str
    spec: Any
    overrides: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Tune:
    r"""The ``[tune]`` table: the learning-rate grid, the seeds and the target loss.

    The grid is either absolute (``lr``) or relative to each variant's own default
    learning rate :math:`\eta_0` (``lr_mult``); without either it is the single
    point :math:`\eta_0`. A grid point :math:`\eta` also scales the routed
    fallback's learning rate by the same factor:

    .. math::
        \eta_{\text{fallback}} = \eta_{0,\text{fallback}} \cdot \eta / \eta_0 .

    Attributes:
        lr: absolute learning rates, each > 0, distinct.
        lr_mult: multipliers of the variant's default lr, each > 0, distinct.
        seeds: task seeds, each ≥ 0, distinct (``None``: the task's seed only).
        target: validation loss for time to target, > 0 (``None``: the largest
            final validation loss among the chosen runs).
    """

    lr: tuple[float, ...] | None = None
    lr_mult: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    target: float | None = None

    def grid(self, default_lr: float) -> tuple[tuple[float, float | None], ...]:
        """``(lr, factor)`` for every grid point, by increasing lr.

        ``factor`` multiplies the fallback's lr; it is ``None`` (fallback left as
        it is) for an absolute grid around a default lr of 0.
        """
        if self.lr is not None:
            factor = (lambda x: x / default_lr) if default_lr > 0 else (lambda x: None)
            return tuple(sorted(((x, factor(x)) for x in self.lr), key=lambda p: p[0]))
        if self.lr_mult is not None and default_lr <= 0:  # every multiple would be lr 0: one lr, not a grid
            raise ConfigError([("tune.lr_mult", f"multiplies the variant's lr, which is {default_lr!r}: every grid "
                                "point would have that lr; give absolute learning rates (tune.lr) instead")])
        return tuple(sorted(((default_lr * m, m) for m in self.lr_mult or (1.0,)), key=lambda p: p[0]))

    def seeds_for(self, task: TaskConfig) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (task.seed,)


@attrs.frozen(kw_only=True)
class Ablation:
    """A parsed ablation file."""

    name: str
    description: str
    task: dict[str, Any]
    variants: tuple[Variant, ...]
    tune: Tune = attrs.field(factory=Tune)


_ABLATION_KEYS = ("name", "description", "base", "set")
_VARIANT_KEYS = ("name", "preset", "config", "set")
_SWEEP_KEYS = ("key", "keys", "values")
_TUNE_KEYS = ("lr", "lr_mult", "seeds", "target")


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"factors": {"type": "kl"}}`` and ``{"factors.type": "kl"}`` both give ``{"factors.type": "kl"}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _spec_of(value: str, *, relative_to: Path | None) -> str:
    """A name stays a name (a preset, known or not); a path (``.toml`` or with a ``/``) is relative to the file."""
    looks_like_path = value.endswith(".toml") or "/" in value or "\\" in value
    if value in kronopt.PRESETS or relative_to is None or not looks_like_path:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else relative_to / path)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_or_none(row: dict[str, Any], key: str) -> bool:
    """``row`` holds ``key``, a number or ``None`` (a non-finite value as saved)."""
    return key in row and (row[key] is None or _is_number(row[key]))


def _positive_list(raw: Any, path: str, what: str, errors: list[tuple[str, str]]) -> tuple[float, ...] | None:
    """A non-empty list of distinct finite numbers > 0, or ``None`` with the problems in ``errors``."""
    if not isinstance(raw, list) or not raw:
        errors.append((path, f"must be a non-empty list of {what}, got {raw!r}"))
        return None
    found = len(errors)
    for i, x in enumerate(raw):
        if not _is_number(x) or not math.isfinite(x) or x <= 0:
            errors.append((f"{path}[{i}]", f"must be a finite number > 0, got {x!r}"))
    if len(errors) > found:
        return None
    dups = sorted({float(x) for x in raw if sum(float(y) == float(x) for y in raw) > 1})
    if dups:
        errors.append((path, f"lists {', '.join(map(repr, dups))} more than once"))
        return None
    return tuple(float(x) for x in raw)


def parse_tune(raw: Any, errors: list[tuple[str, str]]) -> Tune:
    """A :class:`Tune` from a ``[tune]`` table; every problem appended to ``errors`` (then the default Tune)."""
    if not isinstance(raw, Mapping):
        errors.append(("tune", f"must be a table with lr or lr_mult, seeds, target; got {type(raw).__name__}"))
        return Tune()
    found = len(errors)
    for key in raw:
        if key not in _TUNE_KEYS:
            errors.append((f"tune.{key}", f"unknown key; [tune] accepts: {', '.join(_TUNE_KEYS)}"))
    if "lr" in raw and "lr_mult" in raw:
        errors.append(("tune", "give lr (absolute learning rates) or lr_mult (multiples of each variant's lr), not both"))
    lr = _positive_list(raw["lr"], "tune.lr", "learning rates", errors) if "lr" in raw else None
    mult = _positive_list(raw["lr_mult"], "tune.lr_mult", "multipliers", errors) if "lr_mult" in raw else None
    seeds: tuple[int, ...] | None = None
    if "seeds" in raw:
        value = raw["seeds"]
        if not isinstance(value, list) or not value:
            errors.append(("tune.seeds", f"must be a non-empty list of integers ≥ 0, got {value!r}"))
        else:
            bad = [
                (i, s) for i, s in enumerate(value) if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED
            ]
            for i, s in bad:
                errors.append((f"tune.seeds[{i}]", f"must be an integer in [0, {MAX_SEED}], got {s!r}"))
            dups = sorted({s for s in value if value.count(s) > 1}) if not bad else []
            if dups:
                errors.append(("tune.seeds", f"lists {', '.join(map(str, dups))} more than once"))
            if not bad and not dups:
                seeds = tuple(value)
    target: float | None = None
    if "target" in raw:
        value = raw["target"]
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            errors.append(("tune.target", f"must be a validation loss > 0, got {value!r}"))
        else:
            target = float(value)
    if len(errors) > found:
        return Tune()
    return Tune(lr=lr, lr_mult=mult, seeds=seeds, target=target)


def _sweep_axes(sweep: Any, errors: list[tuple[str, str]]) -> list[tuple[str, list[Any]]]:
    """The axes ``[(key, values), ...]`` of a ``[sweep]`` table (one for ``key``, several for ``keys``)."""
    if not isinstance(sweep, Mapping):
        errors.append(("sweep", "must be a table with key and values (or keys and a list of value lists)"))
        return []
    found = len(errors)
    for key in sweep:
        if key not in _SWEEP_KEYS:
            errors.append((f"sweep.{key}", f"unknown key; [sweep] accepts: {', '.join(_SWEEP_KEYS)}"))
    values = sweep.get("values")
    if "key" in sweep and "keys" in sweep:
        errors.append(("sweep", "give key (one axis) or keys (several axes), not both"))
        return []
    if "keys" in sweep:
        keys = sweep["keys"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            errors.append(("sweep.keys", f"must be a non-empty list of dotted config keys or 'preset', got {keys!r}"))
            return []
        dups = sorted({k for k in keys if keys.count(k) > 1})
        if dups:
            errors.append(("sweep.keys", f"lists {', '.join(map(repr, dups))} more than once"))
        if not isinstance(values, list) or len(values) != len(keys) or not all(isinstance(v, list) for v in values):
            errors.append(("sweep.values", f"must be a list of {len(keys)} lists, one per key of sweep.keys, "
                           f"e.g. [[\"ema\", \"kl\"], [8, 16]]; got {values!r}"))
            return []
        axes = list(zip(keys, values))
        paths = [f"sweep.values[{i}]" for i in range(len(keys))]
    else:
        key = sweep.get("key")
        if not isinstance(key, str) or not key:
            errors.append(("sweep.key", "must be a dotted config key (e.g. 'factors.type') or 'preset'"))
            return []
        if not isinstance(values, list):
            errors.append(("sweep.values", "must be a non-empty list"))
            return []
        axes, paths = [(key, values)], ["sweep.values"]
    for (key, vals), path in zip(axes, paths):
        if not vals:
            errors.append((path, f"must be a non-empty list (the values of {key!r})"))
        elif key == "preset":
            for value in vals:
                if not isinstance(value, str):
                    errors.append((path, f"presets must be strings, got {value!r}"))
        dups = sorted({str(v) for v in vals if [str(w) for w in vals].count(str(v)) > 1})
        if dups:
            errors.append((path, f"lists {', '.join(dups)} more than once"))
    return [] if len(errors) > found else axes


def parse_ablation(raw: Mapping[str, Any], *, name: str = "ablation", relative_to: Path | None = None) -> Ablation:
    """An :class:`Ablation` from the data of an ablation file; every format problem in one :class:`ConfigError`.

    Problems *inside* a variant's optimizer config are not checked here: they make
    that variant fail when it runs, and the others still run.

    Raises:
        ConfigError: every problem of the file's own format (tables, keys, types,
            ranges, duplicate names, sweep shapes, the ``[tune]`` table), each with
            its path.

    With ``relative_to`` (the file's folder), a relative path in ``base``, a variant's ``config`` or
    ``[task] data`` is taken relative to it.
    """
    errors: list[tuple[str, str]] = []
    for key in raw:
        if key not in ("ablation", "task", "sweep", "variant", "tune"):
            errors.append((key, "unknown table; an ablation file has [ablation], [task], [tune], [sweep] and [[variant]]"))
    head = raw.get("ablation", {})
    if not isinstance(head, Mapping):
        errors.append(("ablation", "must be a table"))
        head = {}
    for key in head:
        if key not in _ABLATION_KEYS:
            errors.append((f"ablation.{key}", f"unknown key; [ablation] accepts: {', '.join(_ABLATION_KEYS)}"))
    base = head.get("base")
    if base is not None and not isinstance(base, str):
        errors.append(("ablation.base", f"must be a preset name or a TOML path, got {base!r}"))
        base = None
    common = head.get("set", {})
    if not isinstance(common, Mapping):
        errors.append(("ablation.set", "must be a table of dotted keys"))
        common = {}
    task = raw.get("task", {})
    if not isinstance(task, Mapping):
        errors.append(("task", "must be a table"))
        task = {}
    else:
        try:
            task_from_dict(task)
        except ConfigError as exc:
            errors.extend(exc.errors)
        data = task.get("data")
        if isinstance(data, str) and data and relative_to is not None and not Path(data).is_absolute():
            task = {**task, "data": str(relative_to / data)}  # relative to the file, as base and config are
    tune = parse_tune(raw["tune"], errors) if "tune" in raw else Tune()

    variants: list[Variant] = []

    def base_spec(path: str) -> str | None:
        if base is None:
            errors.append((path, "names no preset or config, and [ablation] has no base"))
            return None
        return _spec_of(base, relative_to=relative_to)

    if "sweep" in raw:
        axes = _sweep_axes(raw["sweep"], errors)
        tuned = tune.lr is not None or tune.lr_mult is not None
        for key, _ in axes:
            if tuned and key in ("lr", "fallback.lr"):
                errors.append(("sweep", f"{key!r} is tuned by [tune]; sweep it or tune it, not both"))
        keys = [key for key, _ in axes]
        spec = None if not axes or "preset" in keys else base_spec("sweep")
        for combo in itertools.product(*(values for _, values in axes)):
            label = str(combo[0]) if len(combo) == 1 else ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
            chosen = dict(zip(keys, combo))
            own = chosen.pop("preset", None)
            variants.append(Variant(name=label,
                                    spec=_spec_of(own, relative_to=relative_to) if own is not None else spec,
                                    overrides={**flatten(common), **chosen}))

    listed = raw.get("variant", [])
    if not isinstance(listed, list):
        errors.append(("variant", "must be an array of tables: [[variant]]"))
        listed = []
    for i, v in enumerate(listed):
        path = f"variant[{i}]"
        if not isinstance(v, Mapping):
            errors.append((path, "must be a table"))
            continue
        for key in v:
            if key not in _VARIANT_KEYS:
                errors.append((f"{path}.{key}", f"unknown key; a [[variant]] accepts: {', '.join(_VARIANT_KEYS)}"))
        vname = v.get("name")
        if not isinstance(vname, str) or not vname:
            errors.append((f"{path}.name", "missing or not a string"))
            continue
        if "preset" in v and "config" in v:
            errors.append((path, "give preset or config, not both"))
            continue
        own = v.get("preset", v.get("config"))
        if own is not None and not isinstance(own, str):
            errors.append((path, f"preset/config must be a string, got {own!r}"))
            continue
        sets = v.get("set", {})
        if not isinstance(sets, Mapping):
            errors.append((f"{path}.set", "must be a table of dotted keys"))
            continue
        spec = _spec_of(own, relative_to=relative_to) if own is not None else base_spec(path)
        variants.append(Variant(name=vname, spec=spec, overrides={**flatten(common), **flatten(sets)}))

    names = [v.name for v in variants]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(("variant", f"the name {dup!r} is used twice"))
    dirs: dict[str, str] = {}
    taken = {name.casefold() for name in OUTPUT_NAMES}
    for n in dict.fromkeys(names):  # a name of an output file: the results would be written onto its runs
        if _safe(n).casefold() in taken:
            errors.append(("variant", f"the name {n!r} gives the run directory {_safe(n)!r}, a name the ablation "
                           f"writes its outputs to ({', '.join(OUTPUT_NAMES)}); rename it"))
    for n in names:  # two names, one run directory: the second's runs would replace the first's
        d = _safe(n).casefold()  # casefold: a case-insensitive file system
        if d in dirs and dirs[d] != n:
            errors.append(("variant", f"the names {dirs[d]!r} and {n!r} share the run directory {_safe(n)!r}; "
                           "rename one"))
        dirs.setdefault(d, n)
    if not variants and not errors:
        errors.append(("", "no variants: give [[variant]] tables or a [sweep]"))
    if errors:
        raise ConfigError(errors)
    return Ablation(name=str(head.get("name", name)), description=str(head.get("description", "")),
                    task=dict(task), variants=tuple(variants), tune=tune)


def read_ablation(path: str | Path) -> tuple[Ablation, str]:
    """Read and parse an ablation file (paths in it are relative to the file); also return its text as read, which
    ``kronopt ablate`` copies to ``ablation.toml`` (the file may change on disk while the ablation runs).

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 or not TOML, or its format is wrong
            (:func:`parse_ablation`).
    """
    path = Path(path)
    raw, text = read_toml(path, "ablation file")
    return parse_ablation(raw, name=path.stem, relative_to=path.parent), text


def load_ablation(path: str | Path) -> Ablation:
    """Read and parse an ablation file (paths in it are relative to the file)."""
    return read_ablation(path)[0]


# -- units: one training run each, cached ----------------------------------------------------


@attrs.frozen(kw_only=True)
class Unit:
    """One training run to do: a variant at one learning rate and one seed.

    Attributes:
        variant: the variant's name.
        lr: the main pipeline's learning rate.
        seed: the task's seed.
        overrides: the variant's overrides plus ``lr`` (and ``fallback.lr``).
        config: the resolved optimizer config.
        task: the task, with ``seed``.
        key: :func:`unit_key` of ``config``, ``task`` and ``data_sha256``.
        data_sha256: :func:`data_sha256` of ``task.data``.
    """

    variant: Variant
    lr: float
    seed: int
    overrides: dict[str, Any]
    config: KronConfig
    task: TaskConfig
    key: str
    data_sha256: str = ""


def _file_sha256(path: Path) -> bytes:
    """The SHA-256 of the file's bytes, read :data:`HASH_CHUNK_BYTES` at a time (a large file is never held whole)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.digest()


def data_sha256(data: str | None) -> str:
    """The SHA-256 (hex) of the bytes a task trains on: the file ``data``, or the standard library's corpus.

    For a file it is the plain SHA-256 of its bytes. For the standard library's
    corpus (``data=None``) it is the SHA-256 of a header, then per split (as
    :func:`~kronopt.app.task.stdlib_files` gives them) the number of files and each
    file's own SHA-256 in order: another Python's standard library, an edited file
    or a file moved to the other split gives another digest.

    Raises:
        ConfigError: at ``task.data``, the file (or a standard library file) cannot be read.
    """
    path = Path(data) if data is not None else None
    try:
        if path is not None:
            return _file_sha256(path).hex()
        train, val = stdlib_files()
        return stdlib_digest([_file_sha256(path) for path in train], [_file_sha256(path) for path in val])
    except OSError as exc:
        raise unreadable_data(exc, path) from exc


def unit_key(config: KronConfig, task: TaskConfig, data_digest: str) -> str:
    """The cache key of a run: a SHA-256 prefix of the resolved config, the task (seed included), the data's
    digest (:func:`data_sha256`) and :data:`UNIT_FORMAT`.

    The task's ``data`` path is left out and the data's bytes stand for it: the same
    bytes at another path train the same model on the same batches (a file is split
    by position, not by name), so moving or renaming the file reuses the run, while
    new bytes at the same path run again. Whether the data is a file or the standard
    library stays in the key (they are split differently). The variant's name is not
    part of it either: renaming a variant, or the same config in two variants,
    reuses the run.
    """
    task_doc = {k: v for k, v in task_to_dict(task).items() if k != "data"}
    data = {"source": "stdlib" if task.data is None else "file", "sha256": data_digest}
    doc = {"format": UNIT_FORMAT, "config": to_dict(config), "task": task_doc, "data": data}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


@attrs.frozen(kw_only=True)
class UnitResult:
    """What one unit measured (the numbers of :class:`~kronopt.app.train.RunResult` a summary needs).

    Attributes:
        variant: the variant's name.
        lr: the main pipeline's learning rate.
        seed: the task's seed.
        key: the unit's cache key.
        status: ``"ok"``, ``"diverged"`` (a non-finite loss, or a step the optimizer skipped) or
            ``"failed"`` (raised while training; not cached).
        reason: why it is not ``"ok"``.
        steps: optimizer steps taken.
        skipped_steps: steps whose update the optimizer skipped as non-finite
            (:attr:`~kronopt.app.train.RunResult.skipped_steps`); any makes the unit ``"diverged"``.
        train_loss: mean training loss over the last steps (``None`` when not finite).
        val_loss: final validation loss (``None`` when not finite or not reached).
        median_step_ms: median wall time of a whole training step.
        median_opt_ms: median wall time of ``optimizer.step()``.
        state_bytes: optimizer state bytes at the end.
        peak_memory_bytes: peak memory (see :class:`~kronopt.app.train.RunResult`).
        device: where it ran.
        history: ``{"step", "loss", "step_ms", "opt_ms"}`` per training step.
        evals: ``{"step", "val_loss"}`` per evaluation.
        cached: read from the cache rather than trained in this call.
    """

    variant: str
    lr: float
    seed: int
    key: str
    status: Literal["ok", "diverged", "failed"]
    reason: str | None = None
    steps: int = 0
    skipped_steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    median_step_ms: float | None = None
    median_opt_ms: float | None = None
    state_bytes: int | None = None
    peak_memory_bytes: int | None = None
    device: str = ""
    history: tuple[dict[str, Any], ...] = ()
    evals: tuple[dict[str, Any], ...] = ()
    cached: bool = attrs.field(default=False, eq=False)

    @property
    def score(self) -> float:
        """The validation loss that ranks learning rates: ``+inf`` unless the run is ``ok`` and finite."""
        ok = self.status == "ok" and self.val_loss is not None and math.isfinite(self.val_loss)
        return self.val_loss if ok else math.inf  # type: ignore[return-value]

    def measured(self) -> dict[str, Any]:
        """The cached part: everything but the unit's identity (variant, lr, seed, key)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(UnitResult)
                if f.name not in ("variant", "lr", "seed", "key", "cached")}

    def row(self) -> dict[str, Any]:
        """One row of ``grid.csv``."""
        return {"variant": self.variant, "lr": self.lr, "seed": self.seed, "status": self.status,
                "reason": self.reason or "", "steps": self.steps, "skipped_steps": self.skipped_steps,
                "train_loss": self.train_loss,
                "val_loss": self.val_loss, "median_step_ms": self.median_step_ms,
                "median_opt_ms": self.median_opt_ms, "optimizer_state_bytes": self.state_bytes,
                "peak_memory_bytes": self.peak_memory_bytes, "unit": self.key}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _result_of_run(unit: Unit, run: Any) -> UnitResult:
    status, reason = run.status, run.reason
    if status == "ok" and run.skipped_steps:  # its loss is finite, but some steps never moved the weights
        status, reason = "diverged", (f"{run.skipped_steps} of {run.steps_done} steps skipped for a non-finite "
                                      f"gradient or update (first at step {run.first_skipped_step})")
    return UnitResult(
        variant=unit.variant.name, lr=unit.lr, seed=unit.seed, key=unit.key, status=status, reason=reason,
        steps=run.steps_done, skipped_steps=run.skipped_steps, train_loss=_finite(run.train_loss),
        val_loss=_finite(run.val_loss),
        median_step_ms=_finite(run.median_step_ms), median_opt_ms=_finite(run.median_opt_ms),
        state_bytes=run.state_bytes, peak_memory_bytes=run.peak_memory_bytes, device=run.device,
        history=tuple({k: r[k] for k in ("step", "loss", "step_ms", "opt_ms")} for r in run.history),
        evals=tuple({"step": e["step"], "val_loss": e["val_loss"]} for e in run.evals),
    )


def write_unit(path: Path, unit: Unit, result: UnitResult) -> None:
    """Write ``result`` to ``path`` atomically (a temporary file, then :func:`os.replace`)."""
    doc = {"format": UNIT_FORMAT, "key": unit.key, "config": to_dict(unit.config), "task": task_to_dict(unit.task),
           "data_sha256": unit.data_sha256, "result": result.measured()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(doc, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_unit(path: Path, unit: Unit) -> UnitResult | None:
    """The cached result of ``unit`` at ``path``, or ``None`` when missing, unreadable, corrupt or of another unit."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc["format"] != UNIT_FORMAT or doc["key"] != unit.key:
            return None
        fields = {f.name for f in attrs.fields(UnitResult)} - {"variant", "lr", "seed", "key", "cached"}
        measured = doc["result"]
        # a unit cached before skipped steps were counted lacks skipped_steps: it runs again (it may have skipped)
        if set(measured) != fields or measured["status"] not in ("ok", "diverged"):
            return None
        numbers = ("train_loss", "val_loss", "median_step_ms", "median_opt_ms", "state_bytes", "peak_memory_bytes")
        if not all(isinstance(measured[k], int) for k in ("steps", "skipped_steps")) or not all(
                measured[k] is None or _is_number(measured[k]) for k in numbers):
            return None
        if not (measured["reason"] is None or isinstance(measured["reason"], str)) or not isinstance(measured["device"], str):
            return None
        # every row as the summaries and plots read it: the types themselves, not what float() would take
        rows_ok = all(
            isinstance(r, dict) and isinstance(r.get("step"), int) and _is_number(r.get("step_ms")) and _number_or_none(r, "loss")
            for r in measured["history"]
        ) and all(
            isinstance(e, dict) and isinstance(e.get("step"), int) and _number_or_none(e, "val_loss")
            for e in measured["evals"]
        )
        if not rows_ok:
            return None
        return UnitResult(variant=unit.variant.name, lr=unit.lr, seed=unit.seed, key=unit.key, cached=True,
                          **{**measured, "history": tuple(measured["history"]), "evals": tuple(measured["evals"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: the file of a unit's run directory that names the unit (its cache key), written by :func:`run_ablation`
UNIT_FILE = "unit.key"


def _holds_another_run(run_dir: Path, unit: Unit) -> bool:
    """Whether ``run_dir`` holds the files of a run other than ``unit``'s.

    A run directory is named after the variant, lr and seed only, so another run of them (another task, another
    config of the variant, into the same output directory) may have replaced it since ``unit`` was cached. A run
    written by :func:`run_ablation` names its unit in :data:`UNIT_FILE` (one of ``train.RUN_FILES``, so any later
    run there removes it); a directory without a run (the cache moved elsewhere, the files removed) contradicts
    nothing.
    """
    if not (run_dir / "config.toml").is_file():
        return False
    try:
        return (run_dir / UNIT_FILE).read_text(encoding="utf-8").strip() != unit.key
    except (OSError, UnicodeDecodeError):
        return True


def plan_units(variant: Variant, tune: Tune, task: TaskConfig, *, data_digest: str | None = None) -> tuple[Unit, ...]:
    """Every unit of ``variant``: its lr grid (around its own resolved lr) × the seeds, by lr then seed.

    A grid point sets ``lr`` and, when the config routes parameters to a fallback,
    ``fallback.lr`` scaled by the same factor (:meth:`Tune.grid`). ``data_digest``
    is :func:`data_sha256` of ``task.data``, hashed here when not given.

    Raises:
        ConfigError: the variant's config is invalid (and anything else resolving it
            raises), or the data cannot be read.
    """
    default = kronopt.resolve(variant.spec, **variant.overrides)
    digest = data_digest if data_digest is not None else data_sha256(task.data)
    units = []
    for lr, factor in tune.grid(default.lr):
        overrides = {**variant.overrides, "lr": lr}
        if default.fallback is not None and factor is not None:
            overrides["fallback.lr"] = default.fallback.lr * factor
        config = kronopt.resolve(variant.spec, **overrides)
        for seed in tune.seeds_for(task):
            seeded = attrs.evolve(task, seed=seed)
            units.append(Unit(variant=variant, lr=lr, seed=seed, overrides=overrides, config=config, task=seeded,
                              key=unit_key(config, seeded, digest), data_sha256=digest))
    return tuple(units)


# -- summaries: each variant at its best learning rate ----------------------------------------


def time_to_target(history: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]],
                   target: float) -> tuple[int, float] | None:
    """The first evaluation step whose validation loss is ≤ ``target``, and the training seconds up to it.

    The seconds are the sum of ``step_ms`` over the training steps ``1 … step``
    (evaluation time excluded); ``None`` when no evaluation reaches the target.
    """
    for e in evals:
        if e["val_loss"] is not None and e["val_loss"] <= target:
            ms = math.fsum(r["step_ms"] for r in history if r["step"] <= e["step"])
            return int(e["step"]), ms / 1e3
    return None


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


@attrs.frozen(kw_only=True)
class VariantResult:
    """One variant of an ablation: all its units and its summary at the best learning rate.

    The best lr has the lowest mean validation loss over the seeds; a unit that
    diverged or failed counts as ``+inf``, so the best lr is one where every
    seed finished. Ties go to the smaller lr.

    Attributes:
        variant: the variant.
        status: ``"ok"`` when some lr finished on every seed; else ``"diverged"``
            (some unit diverged) or ``"failed"``.
        reason: why it is not ``"ok"`` (the first unit's reason, or the config error).
        units: every unit, by lr then seed (empty when the config is invalid).
        best_lr: the chosen lr (``None`` unless ``ok``).
        target: the validation loss of the time-to-target columns.
    """

    variant: Variant
    status: Literal["ok", "diverged", "failed"]
    reason: str | None
    units: tuple[UnitResult, ...]
    best_lr: float | None
    target: float | None = None

    @property
    def lrs(self) -> tuple[float, ...]:
        """The grid, ascending."""
        return tuple(sorted({u.lr for u in self.units}))

    @property
    def best(self) -> tuple[UnitResult, ...]:
        """The units at the best lr, one per seed."""
        return tuple(u for u in self.units if u.lr == self.best_lr)

    @property
    def edge(self) -> Literal["min", "max"] | None:
        """``"min"``/``"max"`` when the best lr is the smallest/largest of a grid of ≥ 2 points."""
        lrs = self.lrs
        if self.best_lr is None or len(lrs) < 2:
            return None
        return "min" if self.best_lr == lrs[0] else "max" if self.best_lr == lrs[-1] else None

    def val_losses(self) -> tuple[float, ...]:
        return tuple(u.score for u in self.best)

    def spread(self) -> tuple[float | None, float | None, float | None, float | None]:
        """Mean, sample standard deviation (``None`` for one seed), min and max of the final validation loss over seeds."""
        xs = self.val_losses()
        if not xs:
            return None, None, None, None
        std = statistics.stdev(xs) if len(xs) > 1 else None
        return statistics.fmean(xs), std, min(xs), max(xs)

    def reach(self) -> tuple[int, int, float | None, float | None]:
        """Seeds that reach the target, seeds, and the mean steps and seconds to it (``None`` unless all reach it)."""
        best = self.best
        if self.target is None or not best:
            return 0, len(best), None, None
        hits = [time_to_target(u.history, u.evals, self.target) for u in best]
        reached = [h for h in hits if h is not None]
        if len(reached) < len(hits):
            return len(reached), len(hits), None, None
        return len(hits), len(hits), statistics.fmean(h[0] for h in reached), statistics.fmean(h[1] for h in reached)

    def note(self) -> str:
        parts = [self.reason] if self.reason else []
        if self.edge is not None:
            parts.append(f"best lr at grid edge ({self.edge})")
        bad = [u for u in self.units if u.status != "ok"]
        if bad and self.status == "ok":
            parts.append(f"{len(bad)} of {len(self.units)} runs {'/'.join(sorted({u.status for u in bad}))}")
        hit, n, _, _ = self.reach()
        if self.status == "ok" and self.target is not None and hit < n:
            parts.append(f"target reached by {hit}/{n} seeds")
        return "; ".join(parts)

    def row(self) -> dict[str, Any]:
        """One row of ``results.csv``: the variant at its best lr."""
        best = self.best
        mean, std, lo, hi = self.spread() if self.status == "ok" else (None, None, None, None)
        hit, n, steps, seconds = self.reach()
        spec = self.variant.spec
        train_losses = [u.train_loss for u in best if u.train_loss is not None]
        return {
            "variant": self.variant.name,
            "spec": spec if isinstance(spec, str) else "config",
            "overrides": json.dumps(self.variant.overrides, sort_keys=True),
            "status": self.status,
            "reason": self.reason or "",
            "best_lr": self.best_lr,
            "lr_edge": self.edge or "",
            "grid_points": len(self.lrs),
            "seeds": len(best),
            "steps": max((u.steps for u in best), default=0),
            "train_loss": _mean(train_losses) if self.status == "ok" else None,
            "val_loss": mean,
            "val_loss_std": std,
            "val_loss_min": lo,
            "val_loss_max": hi,
            "target": self.target,
            "target_reached": f"{hit}/{n}",
            "steps_to_target": steps,
            "seconds_to_target": seconds,
            "median_step_ms": _mean([u.median_step_ms for u in best if u.median_step_ms is not None]),
            "median_opt_ms": _mean([u.median_opt_ms for u in best if u.median_opt_ms is not None]),
            "optimizer_state_bytes": max((u.state_bytes for u in best if u.state_bytes is not None), default=None),
            "peak_memory_bytes": max((u.peak_memory_bytes for u in best if u.peak_memory_bytes is not None),
                                     default=None),
            "note": self.note(),
        }


def summarize(variant: Variant, units: Sequence[UnitResult]) -> VariantResult:
    """The variant at its best lr: the lowest mean validation loss over seeds (``+inf`` if any seed did not finish)."""
    by_lr: dict[float, list[float]] = {}
    for u in units:
        by_lr.setdefault(u.lr, []).append(u.score)
    scores = {lr: statistics.fmean(xs) if all(math.isfinite(x) for x in xs) else math.inf for lr, xs in by_lr.items()}
    best = min(sorted(scores), key=lambda lr: scores[lr], default=None)
    if best is not None and math.isfinite(scores[best]):
        return VariantResult(variant=variant, status="ok", reason=None, units=tuple(units), best_lr=best)
    status: Literal["diverged", "failed"] = "diverged" if any(u.status == "diverged" for u in units) else "failed"
    reason = next((u.reason for u in units if u.status == status), None)
    return VariantResult(variant=variant, status=status, reason=reason, units=tuple(units), best_lr=None)


@attrs.frozen(kw_only=True)
class AblationResult:
    """Every variant's result, and the target of the time-to-target columns.

    Attributes:
        variants: one per variant run, in the file's order.
        target: the validation loss to reach: ``[tune] target``, or else the
            largest final validation loss among the best-lr runs of the ``ok``
            variants (so every seed of every variant reaches it); ``None`` when
            no variant is ``ok``.
        target_given: whether ``target`` comes from the file.
        ran: units trained in this call.
        reused: units read from the cache.
    """

    variants: tuple[VariantResult, ...]
    target: float | None
    target_given: bool
    ran: int = 0
    reused: int = 0

    def units(self) -> tuple[UnitResult, ...]:
        return tuple(u for v in self.variants for u in v.units)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return "invalid config: " + "; ".join(f"{p}: {m}" if p else m for p, m in exc.errors)
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def lr_labels(lrs: Sequence[float]) -> dict[float, str]:
    """The text of each lr in its run directory's name: 6 significant digits, more where two lrs of the grid
    would read alike (``0.001`` and ``0.0010000001``), so no two units of a variant share a directory.

    An ordinary grid keeps the 6-digit names of earlier kronopt versions, whose run directories stay in use.
    """
    lrs = sorted(set(lrs))
    for digits in range(6, 18):  # 17 significant digits tell any two doubles apart
        labels = {lr: format(lr, f".{digits}g") for lr in lrs}
        if len(set(labels.values())) == len(lrs):
            return labels
    return {lr: repr(lr) for lr in lrs}


def _safe(name: str) -> str:
    """The directory name of a variant's runs: never ``.`` or ``..`` (the output directory or its parent)."""
    out = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
    if not out.strip("."):
        out = out.replace(".", "_")
    return out or "variant"


def run_ablation(
    ablation: Ablation,
    *,
    task: TaskConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    only: Sequence[str] = (),
    fresh: bool = False,
) -> AblationResult:
    """Train every unit of every variant (or of those named in ``only``); failures become rows, not exceptions.

    With ``out_dir``, a unit whose ``units/<key>.json`` is there and readable is
    not trained again (unless ``fresh``); every unit that finishes (``ok`` or
    ``diverged``) is written there at once, so an interrupted call loses at most
    the unit it was running. A unit that raised is not cached: it runs again.

    The data is read once, before any unit, and the cache is keyed by the digest of
    the bytes read (:attr:`Corpus.sha256`, :func:`unit_key`): a data file changed
    since a unit was cached runs that unit again, and one changed while the
    ablation runs changes nothing of it.

    Raises:
        ConfigError: an unusable task (bad data file or device) — shared by every
            variant — or an unknown name in ``only``; before any training.
    """
    task = task if task is not None else task_from_dict(ablation.task)
    if task.device == "auto":  # key (and run) every unit on the device "auto" resolves to here: a unit trained on
        task = attrs.evolve(task, device=resolve_device("auto").type)  # the CPU is not reused where CUDA is seen
    out = Path(out_dir) if out_dir is not None else None
    unknown = sorted(set(only) - {v.name for v in ablation.variants})
    if unknown:
        names = ", ".join(v.name for v in ablation.variants)
        raise ConfigError([("--only", f"no variant named {', '.join(map(repr, unknown))}; variants: {names}")])
    chosen = [v for v in ablation.variants if not only or v.name in only]
    # read once, before any unit, and keyed by the digest of exactly these bytes: a file edited while the
    # ablation runs can neither be trained on nor give a unit another data's key
    corpus = load_corpus(task.data, context=task.context)
    digest = corpus.sha256

    plans: list[tuple[Variant, tuple[Unit, ...] | str]] = []
    for variant in chosen:
        try:
            plans.append((variant, plan_units(variant, ablation.tune, task, data_digest=digest)))
        except MissingExtraError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the others
            plans.append((variant, _one_line(exc)))
    total = sum(len(p) for _, p in plans if not isinstance(p, str))
    done, ran, reused = 0, 0, 0
    variants: list[VariantResult] = []
    for variant, plan in plans:
        if isinstance(plan, str):
            variants.append(VariantResult(variant=variant, status="failed", reason=plan, units=(), best_lr=None))
            continue
        results: list[UnitResult] = []
        labels = lr_labels([unit.lr for unit in plan])
        for unit in plan:
            done += 1
            path = None if out is None else out / "units" / f"{unit.key}.json"
            run_dir = None if out is None else out / _safe(variant.name) / f"lr{labels[unit.lr]}-seed{unit.seed}"
            cached = None if path is None or fresh else read_unit(path, unit)
            if cached is not None and run_dir is not None and _holds_another_run(run_dir, unit):
                cached = None  # its run directory holds another run now: trained again, so table and files agree
            if cached is not None:
                results.append(cached)
                reused += 1
                continue
            desc = f"[{done}/{total}] {variant.name} lr={unit.lr:.3g} seed={unit.seed}"
            if run_dir is not None:  # a stale run of this unit (other data, task or --fresh): replaced, not mixed in
                remove_run_files(run_dir)
            try:
                run = train(unit.task, variant.spec, overrides=unit.overrides, out_dir=run_dir, progress=progress,
                            plot=False, desc=desc, corpus=corpus)
            except MissingExtraError:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken unit must not stop the others
                results.append(UnitResult(variant=variant.name, lr=unit.lr, seed=unit.seed, key=unit.key,
                                          status="failed", reason=_one_line(exc)))
                ran += 1
                continue
            result = _result_of_run(unit, run)
            if run_dir is not None and run_dir.is_dir():
                (run_dir / UNIT_FILE).write_text(unit.key + "\n", encoding="utf-8")
            if path is not None:
                write_unit(path, unit, result)
            results.append(result)
            ran += 1
        variants.append(summarize(variant, results))

    ok = [v for v in variants if v.status == "ok"]
    given = ablation.tune.target is not None
    target = ablation.tune.target if given else max((x for v in ok for x in v.val_losses()), default=None)
    return AblationResult(variants=tuple(attrs.evolve(v, target=target) for v in variants), target=target,
                          target_given=given, ran=ran, reused=reused)


# -- output: table, files, plots, command line ------------------------------------------------


def format_table(result: AblationResult) -> str:
    """The summary as a fixed-width text table: one row per variant, at its best lr."""
    # one lr per variant (no [tune] grid): the lr column names the variant's own lr, not the best of a search
    tuned = any(len(v.lrs) > 1 for v in result.variants)
    header = ["variant", "status", "best lr" if tuned else "lr (fixed)", "val loss (mean ± std, n)", "train loss",
              "steps→target", "s→target", "ms/opt step", "opt state MiB", "note"]

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    rows = []
    for v in result.variants:
        row = v.row()
        state = row["optimizer_state_bytes"]
        if row["val_loss"] is None:
            val = "—"
        elif row["val_loss_std"] is None:
            val = f"{row['val_loss']:.4f} (n={row['seeds']})"
        else:
            val = f"{row['val_loss']:.4f} ± {row['val_loss_std']:.4f} (n={row['seeds']})"
        lr = cell(row["best_lr"], ".3g") + ({"min": " ◂min", "max": " ▸max"}.get(row["lr_edge"], ""))
        unreached = v.status == "ok" and row["steps_to_target"] is None and row["target"] is not None
        rows.append([row["variant"], row["status"], lr, val, cell(row["train_loss"], ".4f"),
                     "not reached" if unreached else cell(row["steps_to_target"], ".0f"),
                     "not reached" if unreached else cell(row["seconds_to_target"], ".2f"),
                     cell(row["median_opt_ms"], ".1f"), cell(None if state is None else state / 2**20, ".2f"),
                     row["note"]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], first: str) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [first])
        writer.writeheader()
        writer.writerows(rows)


def write_results(result: AblationResult, out: Path, *, ablation: Ablation, task: TaskConfig,
                  plot: bool = True) -> None:
    """``results.csv``, ``grid.csv``, ``results.json`` and (with ``plot``) ``loss.png``, ``lr.png``, ``cost.png``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [v.row() for v in result.variants]
    grid = [u.row() for u in result.units()]
    _write_csv(out / "results.csv", rows, "variant")
    _write_csv(out / "grid.csv", grid, "variant")
    tune = ablation.tune
    doc = {"ablation": ablation.name, "description": ablation.description, "task": task_to_dict(task),
           "tune": {"lr": tune.lr, "lr_mult": None if tune.lr is not None else list(tune.lr_mult or (1.0,)),
                    "seeds": list(tune.seeds_for(task)), "target": result.target,
                    "target_source": "file" if result.target_given else "default"},
           "results": rows, "grid": grid}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not plot:
        return
    plt = pyplot("ablation plots")
    ran = {v.variant.name: v.best[0] for v in result.variants if v.best}
    seeds = tune.seeds_for(task)
    plot_losses(plt, ran, out / "loss.png",  # type: ignore[arg-type]  # UnitResult has history and evals
                title=f"{ablation.name}: {task.layers} layers × {task.width}, context {task.context}, batch "
                f"{task.batch}, {task.steps} steps, best lr, seed {seeds[0]}")
    plot_lr(plt, result.variants, out / "lr.png", title=f"{ablation.name}: final validation loss, "
            f"mean over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} (bars: min–max)")
    plot_cost(plt, result.variants, out / "cost.png", title=ablation.name)


def plot_lr(plt: Any, variants: Sequence[VariantResult], path: Path, *, title: str = "") -> None:
    """Final validation loss (mean over seeds, min–max bars) against lr, log x axis; the best lr circled.

    An lr where some seed diverged or failed has no point.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for i, v in enumerate(variants):
        xs, means, lo, hi = [], [], [], []
        for lr in v.lrs:
            scores = [u.score for u in v.units if u.lr == lr]
            if scores and all(math.isfinite(s) for s in scores):
                m = statistics.fmean(scores)
                xs.append(lr)
                means.append(m)
                lo.append(m - min(scores))
                hi.append(max(scores) - m)
        if not xs:
            continue
        color = f"C{i % 10}"
        ax.errorbar(xs, means, yerr=[lo, hi], color=color, marker="o", markersize=4, capsize=3, linewidth=1.2,
                    label=v.variant.name)
        if v.best_lr is not None:
            ax.plot([v.best_lr], [means[xs.index(v.best_lr)]], marker="o", markersize=11, markerfacecolor="none",
                    color=color)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (nats per byte)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cost(plt: Any, variants: Sequence[VariantResult], path: Path, *, title: str = "") -> None:
    """Two bar charts at each variant's best lr: median ms per optimizer step (and per whole step), and state MiB."""
    rows = [v.row() for v in variants if v.best]
    names = [r["variant"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.5 * max(3, len(names)) + 1.2), dpi=100)
    ys = list(range(len(names)))
    ax1.barh(ys, [r["median_step_ms"] or 0.0 for r in rows], color="0.8", label="whole step")
    ax1.barh(ys, [r["median_opt_ms"] or 0.0 for r in rows], color="C0", label="optimizer step")
    ax1.set_xlabel("median ms")
    ax1.legend(fontsize=7)
    ax2.barh(ys, [(r["optimizer_state_bytes"] or 0) / 2**20 for r in rows], color="C1")
    ax2.set_xlabel("optimizer state (MiB)")
    for ax in (ax1, ax2):
        ax.set_yticks(ys, names if ax is ax1 else [""] * len(names))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def default_out_dir(ablation: Ablation) -> Path:
    """``runs/ablate-<name>``: the same for every call, so running the same command again resumes."""
    return Path("runs") / f"ablate-{_safe(ablation.name)}"


def check_ablate(args: argparse.Namespace) -> None:
    """Every bad ``kronopt ablate`` argument in one :class:`~kronopt.app._args.UsageError`, before any data is read.

    The ablation file (readable, valid TOML, a valid format), ``--out`` (a
    directory or creatable), the task flags (over the file's ``[task]``) and each
    ``--only`` name (a variant of the file).
    """
    p = _args.Problems()
    ablation = None
    try:
        ablation = load_ablation(args.ablation)  # a missing, unreadable or directory path: its message names it
    except ConfigError as exc:
        for where, message in exc.errors:
            p.add(f"{args.ablation}: {where}" if where else "", message)
    if args.out is not None:
        p.value("--out", args.out, _args.output_dir, None)
    try:
        task_from_args(args, ablation.task if ablation is not None else None)
    except ConfigError as exc:
        p.extend(exc)
    if ablation is not None:
        known = [v.name for v in ablation.variants]
        unknown = [name for name in args.only if name not in known]
        if unknown:
            p.add("--only", f"no variant named {', '.join(map(repr, unknown))}; variants: {', '.join(known)}")
    p.check()


def cmd_ablate(args: argparse.Namespace) -> int:
    check_ablate(args)
    ablation, text = read_ablation(args.ablation)  # the text as it ran, copied at the end
    task = task_from_args(args, ablation.task)
    if not args.no_plot:
        pyplot("ablation plots")  # fail before training, not after
    out = Path(args.out) if args.out else default_out_dir(ablation)
    args.partial_outputs = f"the finished units are cached in {out / 'units'}: the same command resumes"
    result = run_ablation(ablation, task=task, out_dir=out, progress=not args.no_progress, only=args.only,
                          fresh=args.fresh)
    write_results(result, out, ablation=ablation, task=task, plot=not args.no_plot)
    (out / "ablation.toml").write_text(text, encoding="utf-8")
    units = result.units()
    seeds = ablation.tune.seeds_for(task)
    print(f"{ablation.name}: {task.layers} layers × {task.width}, context {task.context}, batch {task.batch}, "
          f"{task.steps} steps, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, "
          f"device {next((u.device for u in units if u.device), task.device)}")
    if result.target is not None:
        source = "[tune] target" if result.target_given else "default: the worst final loss of the best-lr runs"
        print(f"target validation loss {result.target:.4f} ({source})")
    print(format_table(result))
    print(f"units:   {result.ran} trained, {result.reused} reused from {out / 'units'}")
    print(f"results: {out / 'results.csv'}, {out / 'grid.csv'}, {out / 'results.json'}")
    if not args.no_plot:
        print(f"plots:   {out / 'loss.png'}, {out / 'lr.png'}, {out / 'cost.png'}")
    return 0


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "ablate",
        help="train several optimizers on the default task (each at its own lr, or the best of an lr grid), compare loss, time to target and memory",
        description="Run every variant of an ablation file (see docs/ablations.md) on the same task and data, "
        "on the lr grid and seeds of its [tune] table; report each variant at its best lr; write results.csv, "
        "grid.csv, results.json, loss.png, lr.png and cost.png. Finished runs are cached in the output "
        "directory: the same command again resumes. A variant that fails (invalid config, unknown stage or "
        "preset, diverged loss) is reported with its reason.",
    )
    p.add_argument("ablation", help="an ablation TOML file, e.g. configs/ablations/paper.toml")
    p.add_argument("--out", help="output directory (default: runs/ablate-<name>; the same command resumes there)")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only this variant (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore the cached runs in the output directory")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_task_arguments(p)
    p.set_defaults(func=cmd_ablate)
