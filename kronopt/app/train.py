"""Train the embedded default task with any optimizer config: ``kronopt train``.

The task is a small byte-level GPT (:class:`kronopt.app.task.TinyGPT`) on the source
of Python's standard library (:func:`kronopt.app.task.load_corpus`), or on any text
file. :func:`train` runs it with an optimizer built by :func:`kronopt.build` and
returns a :class:`RunResult`; with ``out_dir`` it also writes a run directory:

``config.toml``
    the resolved optimizer config (``kronopt train run/config.toml`` reruns it);
``task.toml``
    the task settings;
``metrics.jsonl``
    one JSON object per line: ``{"step", "loss", "lr", "step_ms", "opt_ms"}`` per
    training step and ``{"step", "val_loss"}`` per evaluation, written as they come;
``summary.json``
    :meth:`RunResult.summary`: final losses, median times, optimizer state bytes,
    peak memory, status;
``loss.png``
    the loss curves (needs matplotlib, the ``cli`` extra);
``unit.key``
    written by ``kronopt ablate`` only: the cache key of the unit whose run this is.

These six names are :data:`RUN_FILES`. A directory holds one run: :func:`train`
refuses one that holds any of them (an earlier run's) unless told to overwrite,
and then removes exactly those files first, never anything else there.
"""

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

import kronopt
from kronopt.validators import ge, in_, le, to_int, to_str
from kronopt.config import ConfigError, KronConfig

from . import _args
from ._extras import progress as _progress
from ._extras import pyplot
from .task import Corpus, TinyGPT, load_corpus

Spec = str | Path | Mapping[str, Any] | KronConfig
OnStep = Callable[[int, torch.optim.Optimizer, torch.nn.Module], None]

#: the preset ``kronopt train`` uses when given none
DEFAULT_PRESET = "soap"


def _device(value: Any) -> str:
    value = to_str(value)
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {value!r}") from exc
    if device.type not in _args.DEVICE_TYPES:  # the rule of every command (meta, mps: refused before any work)
        raise ValueError(f"must be 'auto', 'cpu' or a CUDA device ('cuda', 'cuda:0'), got {value!r}: "
                         "the task runs on those only")
    return value


def _optional_path(value: Any) -> str | None:
    return None if value is None else to_str(value)



#: the largest seed a task takes (torch's generators take 64-bit seeds)
MAX_SEED = 2**63 - 1
#: the seed of the evaluation batches' generator: one validation sample for every seed, so that the spread of
#: the final validation loss over seeds is the training's, not that of which validation windows were drawn
EVAL_SEED = 1_000_003


#: the files :func:`train` writes into a run directory, and the only ones ``overwrite`` removes
RUN_FILES: tuple[str, ...] = ("config.toml", "task.toml", "metrics.jsonl", "summary.json", "loss.png", "unit.key")


def earlier_run_files(out: Path) -> list[str]:
    """The names of :data:`RUN_FILES` that ``out`` holds already (none when ``out`` is missing or not a directory).

    A broken symbolic link counts: writing the run would follow it.
    """
    if not out.is_dir():
        return []
    return [name for name in RUN_FILES if (out / name).is_file() or (out / name).is_symlink()]


def earlier_run_message(out: Path, found: list[str], *, overwrite: str) -> str:
    """Why ``out`` is refused: it names the directory, the files found and the way to replace them."""
    return (f"{str(out)!r} holds the files of an earlier run ({', '.join(found)}); give another directory, "
            f"or {overwrite} to remove those files first (nothing else in it is touched)")


def remove_run_files(out: Path) -> list[str]:
    """Remove the :data:`RUN_FILES` in ``out`` and return their names; every other file there stays."""
    found = earlier_run_files(out)
    for name in found:
        (out / name).unlink(missing_ok=True)
    return found


def _fresh_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... where it exists already: a default run directory is named after
    the second it started, and two runs started in one second (a parallel sweep) must not share one."""
    base.parent.mkdir(parents=True, exist_ok=True)  # once: a parent that cannot be made raises here, not below
    out, n = base, 1
    while True:
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1
            out = base.with_name(f"{base.name}-{n}")


@attrs.frozen(kw_only=True)
class TaskConfig:
    """The default task: model size, batches, schedule, evaluation, device, seed and data.

    The defaults train in about a minute on two CPU cores.

    Attributes:
        layers: transformer blocks.
        width: model width; a multiple of ``heads``.
        heads: attention heads.
        context: bytes per sequence.
        batch: sequences per step.
        steps: optimizer steps.
        schedule: ``"cosine"`` (decay to 0 after warm-up) or ``"constant"``; it
            scales every param group's ``lr`` (fallback groups included).
        warmup: linear warm-up steps.
        eval_every: evaluate on the validation split every this many steps
            (0: only after the last step, which always evaluates).
        eval_batches: validation batches per evaluation (the same batches every time, and for
            every seed; they depend on ``batch``, ``context`` and ``eval_batches`` only).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or a CUDA device.
        seed: seeds the model's initial weights and the order of the training batches;
            two runs with the same seed and data see the same batches. The
            validation batches do not depend on it.
        threads: torch CPU threads during the run (0: leave torch's setting), at most
            :data:`kronopt.app._args.MAX_THREADS` (4 × the machine's CPUs, as for ``kronopt bench``).
        data: a text file to train on instead of the standard library sources.
    """

    layers: int = attrs.field(default=4, converter=to_int, validator=ge(1))
    width: int = attrs.field(default=128, converter=to_int, validator=ge(1))
    heads: int = attrs.field(default=4, converter=to_int, validator=ge(1))
    context: int = attrs.field(default=128, converter=to_int, validator=ge(1))
    batch: int = attrs.field(default=16, converter=to_int, validator=ge(1))
    steps: int = attrs.field(default=300, converter=to_int, validator=ge(1))
    schedule: Literal["cosine", "constant"] = attrs.field(
        default="cosine", converter=to_str, validator=in_(("cosine", "constant"))
    )
    warmup: int = attrs.field(default=20, converter=to_int, validator=ge(0))
    eval_every: int = attrs.field(default=50, converter=to_int, validator=ge(0))
    eval_batches: int = attrs.field(default=8, converter=to_int, validator=ge(1))
    device: str = attrs.field(default="auto", converter=_device)
    seed: int = attrs.field(default=0, converter=to_int, validator=[ge(0), le(MAX_SEED)])
    threads: int = attrs.field(default=0, converter=to_int, validator=[ge(0), le(_args.MAX_THREADS)])
    data: str | None = attrs.field(default=None, converter=_optional_path)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the base ``lr`` for 0-based ``step``."""
        warm = min(self.warmup, self.steps - 1)
        if step < warm:
            return (step + 1) / (warm + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, self.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def task_from_dict(raw: Mapping[str, Any], *, path: str = "task") -> TaskConfig:
    """A :class:`TaskConfig` from a table, every problem listed in one :class:`ConfigError`."""
    if not isinstance(raw, Mapping):
        raise ConfigError([(path, f"must be a table, got {type(raw).__name__}")])
    fields = attrs.fields_dict(TaskConfig)
    errors: list[tuple[str, str]] = []
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            errors.append((f"{path}.{key}", f"unknown key; the task accepts: {', '.join(fields)}"))
            continue
        try:
            converted = field.converter(value) if field.converter is not None else value  # type: ignore[operator]
            if field.validator is not None:
                field.validator(None, field, converted)
        except (TypeError, ValueError) as exc:
            errors.append((f"{path}.{key}", str(exc)))
            continue
        kwargs[key] = value
    if not errors:
        task = TaskConfig(**kwargs)
        if task.width % task.heads:
            errors.append((f"{path}.width", f"must be a multiple of heads = {task.heads}, got {task.width}"))
    if errors:
        raise ConfigError(errors)
    return task


def task_to_dict(task: TaskConfig) -> dict[str, Any]:
    return {k: v for k, v in attrs.asdict(task).items() if v is not None}


@attrs.frozen(kw_only=True)
class RunResult:
    """What one training run measured.

    Attributes:
        status: ``"ok"`` or ``"diverged"`` (a non-finite training or validation loss
            stopped the run, or the optimizer's ``FloatingPointError``: config ``nonfinite = "raise"``
            or ``max_skipped_steps``; ``reason`` says where).
        steps_done: optimizer steps taken.
        skipped_steps: steps in which the optimizer skipped an update for a non-finite gradient or update
            (config ``nonfinite = "warn"`` or ``"skip"``: the whole step under ``nonfinite_scope = "step"``,
            some blocks under ``"block"``). The loss of such a run can stay finite while it does not train,
            so ``status`` does not tell it; ``kronopt ablate`` counts it as diverged.
        first_skipped_step: the first of them (``None`` when none).
        train_loss: mean training loss (nats per byte) over the last
            ``min(10, steps_done)`` steps.
        val_loss: validation loss after the last step.
        median_opt_ms: median wall time of ``optimizer.step()``.
        median_step_ms: median wall time of a whole training step (batch,
            forward, backward, optimizer step, ``zero_grad``); evaluation excluded.
        state_bytes: bytes of optimizer state at the end (:meth:`KronOptimizer.state_bytes`).
        peak_memory_bytes: on CUDA ``torch.cuda.max_memory_allocated`` during the
            run; on CPU the process's peak resident set size (``getrusage``), which
            covers the whole process, not only this run; ``None`` where unknown.
        history: one dict per training step (``step``, ``loss``, ``lr``, ``step_ms``, ``opt_ms``).
        evals: one dict per evaluation (``step``, ``val_loss``).
    """

    task: TaskConfig
    config: KronConfig
    spec: str
    device: str
    status: Literal["ok", "diverged"]
    reason: str | None
    steps_done: int
    train_loss: float
    val_loss: float
    median_opt_ms: float
    median_step_ms: float
    state_bytes: int
    peak_memory_bytes: int | None
    peak_memory_kind: str
    history: tuple[dict[str, Any], ...]
    evals: tuple[dict[str, Any], ...]
    out_dir: Path | None = None
    skipped_steps: int = 0
    first_skipped_step: int | None = None

    def summary(self) -> dict[str, Any]:
        """The numbers of ``summary.json`` (plain JSON data; NaN as ``null``)."""

        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "spec": self.spec,
            "status": self.status,
            "reason": self.reason,
            "device": self.device,
            "steps": self.steps_done,
            "skipped_steps": self.skipped_steps,
            "first_skipped_step": self.first_skipped_step,
            "train_loss": num(self.train_loss),
            "val_loss": num(self.val_loss),
            "median_opt_ms": num(self.median_opt_ms),
            "median_step_ms": num(self.median_step_ms),
            "optimizer_state_bytes": self.state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "task": task_to_dict(self.task),
        }


def spec_label(spec: Spec) -> str:
    """A short name for a spec: the preset name, the file stem, or ``config``."""
    if isinstance(spec, str) and spec in kronopt.PRESETS:
        return spec
    if isinstance(spec, str | Path):
        return Path(spec).stem
    return "config"


def resolve_device(name: str) -> torch.device:
    """The device of ``task.device`` on this machine; :class:`ConfigError` at ``task.device`` when it lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        _args.device(name)
    except ValueError as exc:
        raise ConfigError([("task.device", str(exc))]) from None
    return torch.device(name)


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


def _skipped_blocks(opt: kronopt.KronOptimizer) -> int:
    """Gradient blocks the optimizer has skipped so far as non-finite, over every parameter (synchronises)."""
    return sum(opt.nonfinite_counts().values())


@torch.no_grad()
def _evaluate(model: TinyGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    total = sum(model.loss(x, y).item() for x, y in batches)
    model.train()
    return total / len(batches)


def train(
    task: TaskConfig,
    spec: Spec,
    *,
    overrides: Mapping[str, Any] | None = None,
    on_step: OnStep | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    plot: bool = True,
    desc: str = "",
    corpus: Corpus | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train the default task with the optimizer ``kronopt.build(params, spec, **overrides)``.

    Args:
        task: the task settings.
        spec: a preset name, TOML path, dict or :class:`KronConfig`.
        overrides: dotted config overrides (``{"refresh.every": 20}``).
        on_step: ``on_step(step, optimizer, model)``, called after every optimizer
            step with the 1-based step number.
        out_dir: write the run directory here (created if needed). It must not hold
            any of :data:`RUN_FILES` already, unless ``overwrite``.
        progress: show a progress bar (tqdm, when installed).
        plot: with ``out_dir``, also write ``loss.png`` (needs matplotlib).
        desc: the progress bar's label (default: the spec's name).
        corpus: the data, already loaded (ablations share one); default: loaded from ``task.data``.
        overwrite: let ``out_dir`` hold an earlier run: its :data:`RUN_FILES` are
            removed once the model and optimizer are built, just before this run
            writes its own; other files in ``out_dir`` are kept.

    Returns:
        A :class:`RunResult`. A non-finite loss stops the run with ``status = "diverged"``; steps
        the optimizer skipped for a non-finite gradient or update are counted in ``skipped_steps``.

    Raises:
        ConfigError: an invalid config or override, an unusable data file or device,
            or (without ``overwrite``) an ``out_dir`` holding an earlier run's files
            (at ``out_dir``), before the data is read and before any training step.
        MissingExtraError: ``plot`` with ``out_dir`` and matplotlib missing, before any step.
    """
    cfg = kronopt.resolve(spec, **dict(overrides or {}))
    if task.width % task.heads:
        raise ConfigError([("task.width", f"must be a multiple of heads = {task.heads}, got {task.width}")])
    device = resolve_device(task.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and not overwrite and (found := earlier_run_files(out)):
        raise ConfigError([("out_dir", earlier_run_message(out, found, overwrite="overwrite=True"))])
    corpus = corpus if corpus is not None else load_corpus(task.data, context=task.context)
    plt = pyplot("loss plots") if (out is not None and plot) else None
    label = spec_label(spec)

    old_threads = torch.get_num_threads()
    if task.threads:
        torch.set_num_threads(task.threads)
    metrics_file = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(task.seed)
            model = TinyGPT(layers=task.layers, width=task.width, heads=task.heads, context=task.context).to(device)
        opt = kronopt.build(model.named_parameters(), cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, task.lr_factor)
        batch_gen = torch.Generator().manual_seed(task.seed)
        eval_gen = torch.Generator().manual_seed(EVAL_SEED)
        eval_set = [
            tuple(t.to(device) for t in corpus.batch("val", task.batch, task.context, eval_gen))
            for _ in range(task.eval_batches)
        ]
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite:  # the earlier run's files go only now, once nothing above has failed
                remove_run_files(out)
            (out / "config.toml").write_text(kronopt.dumps(cfg), encoding="utf-8")
            (out / "task.toml").write_text(kronopt.dumps({"task": task_to_dict(task)}), encoding="utf-8")
            metrics_file = (out / "metrics.jsonl").open("w", encoding="utf-8")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        history: list[dict[str, Any]] = []
        evals: list[dict[str, Any]] = []
        status: Literal["ok", "diverged"] = "ok"
        reason: str | None = None

        def log(row: dict[str, Any]) -> None:
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()

        def evaluate(step: int) -> float:
            val = _evaluate(model, eval_set)  # type: ignore[arg-type]
            row = {"step": step, "val_loss": val if math.isfinite(val) else None}
            evals.append(row)
            log(row)
            return val

        bar = _progress(total=task.steps, desc=desc or label, disable=not progress)
        smooth = float("nan")
        skipped: list[int] = []  # the steps in which an update was skipped
        blocks_skipped = 0
        try:
            for step in range(1, task.steps + 1):
                lr = opt.param_groups[0]["lr"]
                sync()
                t0 = time.perf_counter()
                x, y = (t.to(device) for t in corpus.batch("train", task.batch, task.context, batch_gen))
                loss = model.loss(x, y)
                loss.backward()
                sync()
                t1 = time.perf_counter()
                try:
                    opt.step()
                except FloatingPointError as exc:  # nonfinite = "raise", or max_skipped_steps reached: the run diverged
                    status, reason = "diverged", f"the optimizer stopped at step {step}: {exc}"
                    break
                sync()
                t2 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                sched.step()
                t3 = time.perf_counter()
                # read after the timed part: a skipped update leaves the loss finite, so it is counted here
                now = _skipped_blocks(opt)
                if now > blocks_skipped or opt.skipped_steps():
                    skipped.append(step)
                blocks_skipped = now
                if on_step is not None:
                    on_step(step, opt, model)
                value = loss.item()
                row = {"step": step, "loss": value if math.isfinite(value) else None, "lr": lr,
                       "step_ms": (t3 - t0) * 1e3, "opt_ms": (t2 - t1) * 1e3}
                history.append(row)
                log(row)
                if not math.isfinite(value):
                    status, reason = "diverged", f"non-finite training loss ({value}) at step {step}"
                    break
                smooth = value if not math.isfinite(smooth) else 0.9 * smooth + 0.1 * value
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.3f}", ms=f"{row['step_ms']:.0f}", refresh=False)
                due = task.eval_every and step % task.eval_every == 0 and step != task.steps
                if due and not math.isfinite(evaluate(step)):
                    status, reason = "diverged", f"non-finite validation loss at step {step}"
                    break
        finally:
            bar.close()
        steps_done = len(history)
        if status == "ok":
            val_loss = evaluate(steps_done)
            if not math.isfinite(val_loss):
                status, reason = "diverged", f"non-finite validation loss at step {steps_done}"
        else:
            val_loss = float("nan")
        tail = [r["loss"] for r in history[-10:]]
        train_loss = statistics.fmean(tail) if tail and None not in tail else float("nan")
        peak, peak_kind = _peak_memory(device)
        result = RunResult(
            task=task,
            config=cfg,
            spec=str(spec) if isinstance(spec, str | Path) else label,
            device=str(device),
            status=status,
            reason=reason,
            steps_done=steps_done,
            train_loss=train_loss,
            val_loss=val_loss,
            median_opt_ms=statistics.median(r["opt_ms"] for r in history),
            median_step_ms=statistics.median(r["step_ms"] for r in history),
            state_bytes=opt.state_bytes(),
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            history=tuple(history),
            evals=tuple(evals),
            out_dir=out,
            skipped_steps=len(skipped),
            first_skipped_step=skipped[0] if skipped else None,
        )
    finally:
        if metrics_file is not None:
            metrics_file.close()
        torch.set_num_threads(old_threads)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
        if plt is not None:
            plot_losses(plt, {label: result}, out / "loss.png", title=f"{label}: {corpus.source}")
    return result


def plot_losses(plt: Any, runs: Mapping[str, RunResult], path: Path, *, title: str = "") -> None:
    """One figure: each run's smoothed training loss (line) and validation loss (markers)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in run.history if r["loss"] is not None]
        losses = [r["loss"] for r in run.history if r["loss"] is not None]
        if losses:
            ax.plot(steps, losses, color=color, alpha=0.18, linewidth=0.8)
            ax.plot(steps, _ema(losses, 0.9), color=color, linewidth=1.6, label=f"{name} (train)")
        ev = [(r["step"], r["val_loss"]) for r in run.evals if r["val_loss"] is not None]
        if ev:
            ax.plot(*zip(*ev), color=color, marker="o", markersize=4, linestyle="--", linewidth=1.0,
                    label=f"{name} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ema(values: list[float], beta: float) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


# -- command line ---------------------------------------------------------------------------

#: ``kronopt train`` flag → TaskConfig field
_TASK_FLAGS = ("layers", "width", "heads", "context", "batch", "steps", "schedule", "warmup", "eval_every",
               "eval_batches", "device", "seed", "threads", "data")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The task flags (``--layers`` …), each defaulting to the task's own default.

    They are read as text and parsed by :func:`task_from_args`, so that one run
    reports every bad flag.
    """
    defaults = TaskConfig()
    g = p.add_argument_group("task (defaults: the embedded default task)")
    for name in _TASK_FLAGS:
        g.add_argument(_flag(name), dest=f"task_{name}", default=None, metavar=name.upper(),
                       help=f"default: {getattr(defaults, name)}")


def task_from_args(args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> TaskConfig:
    """The task of ``base`` (an ablation file's ``[task]``) with the task flags given on top.

    Raises:
        ConfigError: every problem at once, before any data is read: a value
            set by a flag is reported at ``--flag → task.key``, one of ``base`` at
            ``task.key``; the ``data`` file must be readable and the device present.
    """
    raw = dict(base or {})
    fields = attrs.fields_dict(TaskConfig)
    flags: dict[str, str] = {}  # task key → where a problem with the flag's value is reported
    errors: list[tuple[str, str]] = []
    for name in _TASK_FLAGS:
        text = getattr(args, f"task_{name}")
        if text is None:
            continue
        flags[name] = f"{_flag(name)} → task.{name}"
        raw.pop(name, None)
        if fields[name].type is int:
            try:
                raw[name] = _args.integer(str(text))
            except ValueError as exc:
                errors.append((flags[name], str(exc)))
        else:
            raw[name] = text

    def where(path: str) -> str:
        return flags.get(path.removeprefix("task."), path)

    unparsed = {key for key, at in flags.items() if any(at == e[0] for e in errors)}
    task: TaskConfig | None = None
    try:
        task = task_from_dict(raw)
    except ConfigError as exc:
        for path, message in exc.errors:
            if unparsed & {"width", "heads"} and message.startswith("must be a multiple of heads"):
                continue  # judged on a default that stands in for the unparsed flag
            if path == "task.width" and "width" not in flags and "heads" in flags:
                # the width is a default: the flag given is the one to change
                path, message = "task.heads", f"must divide the default width (the width {message}; set --width too)"
            errors.append((where(path), message))
    reported = {at for at, _ in errors}
    data, device = raw.get("data"), raw.get("device", "auto")
    if isinstance(data, str) and where("task.data") not in reported:
        try:
            _args.input_file(data)
        except ValueError as exc:
            errors.append((where("task.data"), str(exc)))
    if isinstance(device, str) and where("task.device") not in reported:
        try:
            resolve_device(device)
        except ConfigError as exc:
            errors.extend((where(path), message) for path, message in exc.errors)
    if errors or task is None:
        raise ConfigError(errors)
    return task


def cmd_train(args: argparse.Namespace) -> int:
    problems = _args.Problems()
    if args.config is not None and args.preset is not None:
        problems.add("", "give a CONFIG file or --preset NAME, not both")
    spec = args.preset or args.config or DEFAULT_PRESET
    overrides = problems.sets(args.set)
    task = TaskConfig()
    try:
        task = task_from_args(args)
    except ConfigError as exc:
        problems.extend(exc)
    label = spec_label(spec)
    default_out = Path("runs") / f"train-{label}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.out) if args.out is not None else default_out
    given = args.out if args.out is not None else str(default_out)
    problems.value("--out", given, _args.output_dir, out)  # --out '' is refused, as ablate and fisher do
    if args.out and not args.overwrite and (found := earlier_run_files(out)):
        problems.add("--out", earlier_run_message(out, found, overwrite="--overwrite"))
    problems.config(spec, overrides)  # every config error before the data is read
    problems.check()
    corpus = load_corpus(task.data, context=task.context)  # a data file too small is refused before any directory
    if args.out is None:  # made now, once the arguments are good: another run of this second has its own
        out = _fresh_dir(default_out)
    args.partial_outputs = f"the partial run is in {out} (metrics.jsonl to the last step done, no summary.json)"
    result = train(task, spec, overrides=overrides, out_dir=out, progress=not args.no_progress, plot=not args.no_plot,
                   overwrite=args.overwrite, corpus=corpus)
    skipped = f", {result.skipped_steps} skipped" if result.skipped_steps else ""
    print(f"{label} on {result.device}: {result.steps_done} steps ({result.status}{skipped})")
    if result.reason:
        print(f"  stopped: {result.reason}")
    if result.skipped_steps:
        print(f"  skipped: {result.skipped_steps} of {result.steps_done} steps had a non-finite gradient or update "
              f"(first at step {result.first_skipped_step}) and were not applied; lower the lr, or set "
              "nonfinite = \"raise\" to stop at the first")
    print(f"  train loss {result.train_loss:.4f}   val loss {result.val_loss:.4f}   (nats per byte)")
    print(f"  median ms: {result.median_step_ms:.1f} per step, {result.median_opt_ms:.1f} per optimizer step")
    print(f"  optimizer state {format_bytes(result.state_bytes)}   peak memory {format_bytes(result.peak_memory_bytes)}"
          f" ({result.peak_memory_kind})")
    print(f"  run directory: {out}")
    return 0 if result.status == "ok" else 1


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train the embedded default task (a byte-level GPT on Python's stdlib) with a preset or config",
        description="Train a small byte-level GPT on the source of Python's standard library (or --data FILE) "
        "with the optimizer of a preset or TOML config. Writes config.toml, task.toml, metrics.jsonl, "
        "summary.json and loss.png to the run directory; an --out directory that holds an earlier run's files "
        "is refused unless --overwrite is given. Exit code 1 if the loss diverged, 2 on a bad config.",
    )
    p.add_argument("config", nargs="?", help=f"a TOML config or preset name (default: --preset {DEFAULT_PRESET})")
    p.add_argument("--preset", help=f"a preset: {', '.join(kronopt.PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a (dotted) config key")
    p.add_argument("--out", help="run directory (default: runs/train-<name>-<time>); refused if it holds a run")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the earlier run in --out: remove its {', '.join(RUN_FILES)} first (no other file)")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_task_arguments(p)
    p.set_defaults(func=cmd_train)
