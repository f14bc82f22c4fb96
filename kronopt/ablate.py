"""Compare optimizers on the default task by swapping one thing: ``kronopt ablate ABLATION.toml``.

An ablation file names a base config, the task settings, and the variants (see
``docs/ablations.md`` for the format). Every variant trains the same model from
the same seed on the same batches (:func:`kronopt.train.train`). A variant whose
config is invalid or names a stage or preset that does not exist, that raises
while training, or whose loss diverges, is reported with its reason; the others
still run.

Writes to the output directory: ``results.csv`` and ``results.json`` (one row per
variant), ``loss.png`` (every loss curve), ``cost.png`` (step time and optimizer
state memory), ``ablation.toml`` (the file as given) and one run directory per
variant.
"""

import argparse
import csv
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs

import kronopt

from ._extras import MissingExtraError, pyplot
from .config import ConfigError
from .task import load_corpus
from .train import (
    RunResult,
    TaskConfig,
    add_task_arguments,
    plot_losses,
    task_from_args,
    task_from_dict,
    train,
)


@attrs.frozen(kw_only=True)
class Variant:
    """One optimizer of an ablation: a spec (preset, TOML path or dict) and dotted overrides."""

    name: str
    spec: Any
    overrides: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Ablation:
    """A parsed ablation file."""

    name: str
    description: str
    task: dict[str, Any]
    variants: tuple[Variant, ...]


_ABLATION_KEYS = ("name", "description", "base", "set")
_VARIANT_KEYS = ("name", "preset", "config", "set")
_SWEEP_KEYS = ("key", "values")


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


def parse_ablation(raw: Mapping[str, Any], *, name: str = "ablation", relative_to: Path | None = None) -> Ablation:
    """An :class:`Ablation` from the data of an ablation file; every format problem in one :class:`ConfigError`.

    Problems *inside* a variant's optimizer config are not checked here: they make
    that variant fail when it runs, and the others still run.
    """
    errors: list[tuple[str, str]] = []
    for key in raw:
        if key not in ("ablation", "task", "sweep", "variant"):
            errors.append((key, "unknown table; an ablation file has [ablation], [task], [sweep] and [[variant]]"))
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

    variants: list[Variant] = []

    def base_spec(path: str) -> str | None:
        if base is None:
            errors.append((path, "names no preset or config, and [ablation] has no base"))
            return None
        return _spec_of(base, relative_to=relative_to)

    sweep = raw.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, Mapping):
            errors.append(("sweep", "must be a table with key and values"))
        else:
            for key in sweep:
                if key not in _SWEEP_KEYS:
                    errors.append((f"sweep.{key}", f"unknown key; [sweep] accepts: {', '.join(_SWEEP_KEYS)}"))
            key, values = sweep.get("key"), sweep.get("values")
            if not isinstance(key, str) or not key:
                errors.append(("sweep.key", "must be a dotted config key (e.g. 'factors.type') or 'preset'"))
            elif not isinstance(values, list) or not values:
                errors.append(("sweep.values", "must be a non-empty list"))
            else:
                for value in values:
                    label = str(value)
                    if key == "preset":
                        if not isinstance(value, str):
                            errors.append(("sweep.values", f"presets must be strings, got {value!r}"))
                            continue
                        variants.append(Variant(name=label, spec=_spec_of(value, relative_to=relative_to),
                                                overrides=flatten(common)))
                    else:
                        spec = base_spec("sweep")
                        variants.append(Variant(name=label, spec=spec, overrides={**flatten(common), key: value}))

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
    if not variants and not errors:
        errors.append(("", "no variants: give [[variant]] tables or a [sweep]"))
    if errors:
        raise ConfigError(errors)
    return Ablation(name=str(head.get("name", name)), description=str(head.get("description", "")),
                    task=dict(task), variants=tuple(variants))


def load_ablation(path: str | Path) -> Ablation:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([("", f"cannot read ablation file {str(path)!r}: {exc.strerror or exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"{str(path)!r} is not valid TOML: {exc}")]) from exc
    return parse_ablation(raw, name=path.stem, relative_to=path.parent)


@attrs.frozen(kw_only=True)
class VariantResult:
    """One row of the results: the variant, its status (``ok``/``diverged``/``failed``) and its run."""

    variant: Variant
    status: str
    reason: str | None
    run: RunResult | None

    def row(self) -> dict[str, Any]:
        run = self.run

        def num(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        spec = self.variant.spec
        return {
            "variant": self.variant.name,
            "spec": spec if isinstance(spec, str) else "config",
            "overrides": json.dumps(self.variant.overrides, sort_keys=True),
            "status": self.status,
            "reason": self.reason or "",
            "steps": run.steps_done if run else 0,
            "train_loss": num(run.train_loss) if run else None,
            "val_loss": num(run.val_loss) if run else None,
            "median_step_ms": num(run.median_step_ms) if run else None,
            "median_opt_ms": num(run.median_opt_ms) if run else None,
            "optimizer_state_bytes": run.state_bytes if run else None,
            "peak_memory_bytes": run.peak_memory_bytes if run else None,
        }


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return "invalid config: " + "; ".join(f"{p}: {m}" if p else m for p, m in exc.errors)
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def run_ablation(
    ablation: Ablation,
    *,
    task: TaskConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    only: Sequence[str] = (),
) -> list[VariantResult]:
    """Train every variant (or those named in ``only``) on the same task; failures become rows, not exceptions.

    Raises:
        ConfigError: an unusable task (bad data file or device) — shared by every variant.
    """
    task = task if task is not None else task_from_dict(ablation.task)
    corpus = load_corpus(task.data, context=task.context)  # once, for every variant
    out = Path(out_dir) if out_dir is not None else None
    chosen = [v for v in ablation.variants if not only or v.name in only]
    unknown = sorted(set(only) - {v.name for v in ablation.variants})
    if unknown:
        names = ", ".join(v.name for v in ablation.variants)
        raise ConfigError([("--only", f"no variant named {', '.join(map(repr, unknown))}; variants: {names}")])
    results: list[VariantResult] = []
    for i, variant in enumerate(chosen):
        desc = f"[{i + 1}/{len(chosen)}] {variant.name}"
        try:
            run = train(task, variant.spec, overrides=variant.overrides,
                        out_dir=None if out is None else out / _safe(variant.name),
                        progress=progress, plot=False, desc=desc, corpus=corpus)
        except MissingExtraError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the others
            results.append(VariantResult(variant=variant, status="failed", reason=_one_line(exc), run=None))
            continue
        results.append(VariantResult(variant=variant, status=run.status, reason=run.reason, run=run))
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "variant"


def format_table(results: Sequence[VariantResult]) -> str:
    """The results as a fixed-width text table."""
    header = ["variant", "status", "train loss", "val loss", "ms/step", "ms/opt step", "opt state MiB", "note"]
    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    rows = []
    for r in results:
        row = r.row()
        state = row["optimizer_state_bytes"]
        rows.append([row["variant"], row["status"], cell(row["train_loss"], ".4f"), cell(row["val_loss"], ".4f"),
                     cell(row["median_step_ms"], ".1f"), cell(row["median_opt_ms"], ".1f"),
                     cell(None if state is None else state / 2**20, ".2f"), row["reason"]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    right = {2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def write_results(results: Sequence[VariantResult], out: Path, *, ablation: Ablation, task: TaskConfig,
                  plot: bool = True) -> None:
    """``results.csv``, ``results.json`` and (with ``plot``) ``loss.png`` and ``cost.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["variant"])
        writer.writeheader()
        writer.writerows(rows)
    doc = {"ablation": ablation.name, "description": ablation.description,
           "task": {k: v for k, v in attrs.asdict(task).items() if v is not None}, "results": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if not plot:
        return
    plt = pyplot("ablation plots")
    ran = {r.variant.name: r.run for r in results if r.run is not None}
    plot_losses(plt, ran, out / "loss.png", title=f"{ablation.name}: {task.layers} layers × {task.width}, "
                f"context {task.context}, batch {task.batch}, {task.steps} steps, seed {task.seed}")
    plot_cost(plt, results, out / "cost.png", title=ablation.name)


def plot_cost(plt: Any, results: Sequence[VariantResult], path: Path, *, title: str = "") -> None:
    """Two bar charts: median ms per optimizer step (and per whole step), and optimizer state MiB."""
    ran = [r for r in results if r.run is not None]
    names = [r.variant.name for r in ran]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.5 * max(3, len(names)) + 1.2), dpi=100)
    ys = list(range(len(names)))
    step = [r.run.median_step_ms for r in ran]  # type: ignore[union-attr]
    opt = [r.run.median_opt_ms for r in ran]  # type: ignore[union-attr]
    ax1.barh(ys, step, color="0.8", label="whole step")
    ax1.barh(ys, opt, color="C0", label="optimizer step")
    ax1.set_xlabel("median ms")
    ax1.legend(fontsize=7)
    ax2.barh(ys, [r.run.state_bytes / 2**20 for r in ran], color="C1")  # type: ignore[union-attr]
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


def cmd_ablate(args: argparse.Namespace) -> int:
    ablation = load_ablation(args.ablation)
    task = task_from_args(args, ablation.task)
    if not args.no_plot:
        pyplot("ablation plots")  # fail before training, not after
    out = Path(args.out) if args.out else Path("runs") / f"ablate-{_safe(ablation.name)}-{datetime.now():%Y%m%d-%H%M%S}"
    results = run_ablation(ablation, task=task, out_dir=out, progress=not args.no_progress, only=args.only)
    write_results(results, out, ablation=ablation, task=task, plot=not args.no_plot)
    (out / "ablation.toml").write_text(Path(args.ablation).read_text(encoding="utf-8"), encoding="utf-8")
    print(f"{ablation.name}: {task.layers} layers × {task.width}, context {task.context}, batch {task.batch}, "
          f"{task.steps} steps, seed {task.seed}, device {results[0].run.device if results and results[0].run else task.device}")
    print(format_table(results))
    print(f"results: {out / 'results.csv'}, {out / 'results.json'}")
    if not args.no_plot:
        print(f"plots:   {out / 'loss.png'}, {out / 'cost.png'}")
    return 0


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "ablate",
        help="train several optimizers on the default task and compare loss, step time and memory",
        description="Run every variant of an ablation file (see docs/ablations.md) on the same task, seed and "
        "data; print a results table and write results.csv, results.json, loss.png and cost.png. A variant "
        "that fails (invalid config, unknown stage or preset, diverged loss) is reported with its reason.",
    )
    p.add_argument("ablation", help="an ablation TOML file, e.g. configs/ablations/paper.toml")
    p.add_argument("--out", help="output directory (default: runs/ablate-<name>-<time>)")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only this variant (repeatable)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_task_arguments(p)
    p.set_defaults(func=cmd_ablate)
