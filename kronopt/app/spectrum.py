r"""``kronopt spectrum``: the eigenvalue spectra of the Kronecker factors, per layer and over time.

Records the eigenvalue estimates each factor keeps (KL-Shampoo's tracked
:math:`\lambda = 1/s^2`, otherwise the basis's estimates; a restricted side
contributes its ``r`` subspace eigenvalues plus its flat eigenvalue :math:`\mu`
``d − r`` times), plots them on a log scale (one panel per factor: the sorted
spectrum at several times, and its top / tail-mean over time) and reports each
factor's tail arithmetic-to-geometric mean ratio

.. math::
    \mathrm{AM/GM}(\lambda_{k+1..d}) = \frac{\frac{1}{d-k}\sum_i \lambda_i}{(\prod_i \lambda_i)^{1/(d-k)}} \ge 1,

which is 1 exactly when the tail is flat (the spike-and-flat shape of
pro_kl_shampoo.md §2) and governs Pro-KLShampoo's approximation gap.

A rank-deficient factor (a block's :math:`G G^\top` with fewer gradients than rows)
has eigenvalues that are zero but come out of the eigensolver as rounding of either
sign. Those at or below :func:`kronopt.linalg.eigenvalue_floor` of the largest are
taken as zero (:meth:`kronopt.inspection.ParamView.spectrum`): the report gives the
factor's size ``d`` and its ``rank`` ``r``, the count above that floor, and ``max``,
``min`` and the tail AM/GM are over those ``r`` values only, the tail being
:math:`\lambda_{k+1..r}`. With the ``d − r`` zeros the geometric mean would be 0 and
the ratio infinite, whatever the shape of the rest; a rank below ``d`` is the thing
to read then. Where the head covers every eigenvalue above the floor there is no tail
to measure, and the report says so.

Input: a training run (the default task of :mod:`kronopt.app.train`, made small;
``--builtin``: a small MLP on synthetic data instead), or a saved optimizer
state (``torch.save(optimizer.state_dict(), path)``; ``--state path``), loaded with
``weights_only=True``: a file that holds anything but tensors and plain data is
refused before any of it is built, so a crafted checkpoint cannot run code.
"""

import argparse
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

import kronopt
from kronopt.inspection import ParamView, saved_views
from kronopt.splits import floor_fraction

from . import _args
from . import train as train_mod
from ._extras import MissingExtraError, pyplot

__all__ = [
    "FactorSpectrum",
    "SpectrumRecorder",
    "add_subcommand",
    "builtin_run",
    "format_report",
    "spectra_from_optimizer",
    "spectra_from_state_dict",
    "tail_am_gm",
]


@attrs.frozen(kw_only=True, eq=False)
class FactorSpectrum:
    """The eigenvalue estimates of one factor of one parameter at one step.

    ``eigvals`` holds those above rounding of zero (:meth:`kronopt.inspection.ParamView.spectrum`:
    descending, finite, > 0), ``r ≤ d`` of them; ``d`` is the side's size, so ``d − r`` eigenvalues are zero
    to rounding.
    """

    name: str
    side: str  # "left" or "right"
    step: int
    eigvals: Tensor  # (r) float64
    d: int


def tail_am_gm(eigvals: Tensor, head: int) -> float:
    """Arithmetic / geometric mean of the eigenvalues after the ``head`` largest (1.0: a flat tail).

    Non-finite and non-positive values are left out; NaN where nothing is left (no tail to measure).
    """
    lam = torch.sort(eigvals.to(torch.float64), descending=True).values[head:]
    lam = lam[torch.isfinite(lam) & (lam > 0)]
    if lam.numel() == 0:
        return float("nan")
    return float(lam.mean() / torch.exp(torch.log(lam).mean()))


def _check_head(head: float, shown: object) -> None:
    """``ValueError`` (naming ``shown``) unless ``head`` is a whole count ≥ 1 or a fraction of ``d`` in ``(0, 1)``:
    ``1.5`` was read as 1, and ``0`` as 1."""
    if not head > 0 or (head >= 1 and head != int(head)):
        raise ValueError(
            f"must be a whole count ≥ 1 or a fraction of d below 1, got {shown!r} (a count is a whole number)"
        )


def _head(d: int, head: float) -> int:
    """``head`` as a count: a whole number ≥ 1, or a fraction of ``d`` (in ``(0, 1)``, at least 1)."""
    _check_head(head, head)
    return int(head) if head >= 1 else max(1, floor_fraction(head, d))


def head_size(text: str) -> float:
    """``--head``'s text: a whole count ≥ 1 (``"3"``, ``"3.0"``) or a fraction of ``d`` in ``(0, 1)`` (``"0.1"``)."""
    value = _args.number(text, above=0.0)
    _check_head(value, text.strip())
    return value


def _matcher(layers: str | None) -> Callable[[str], bool]:
    pattern = re.compile(layers) if layers else None
    return lambda name: pattern is None or pattern.search(name) is not None


def spectra_from_optimizer(opt: "kronopt.KronOptimizer", step: int, *, layers: str | None = None) -> list[FactorSpectrum]:
    """The factor spectra of every rotated block of ``opt`` now (``layers``: a regex on parameter names).

    Read through :meth:`kronopt.KronOptimizer.inspect`, so any factor estimator or basis
    (a plugin's too) that gives eigenvalue estimates shows up.
    """
    return _spectra(opt.inspect().items(), step, layers)


def _spectra(views: Iterable[tuple[str, ParamView]], step: int | None, layers: str | None) -> list[FactorSpectrum]:
    """Each rotated side's spectrum (``step``: the views' own ``calls`` when ``None``)."""
    keep = _matcher(layers)
    out = []
    for name, view in views:
        if not keep(name):
            continue
        for side in ("left", "right"):
            if view.side(side).basis is None:
                continue
            values = view.spectrum(side)
            if values is not None and values.numel():
                at = view.calls if step is None else step
                out.append(FactorSpectrum(name=name, side=side, step=at, eigvals=values, d=view.size(side)))
    return out


def spectra_from_state_dict(sd: Mapping[str, Any], *, layers: str | None = None) -> list[FactorSpectrum]:
    """The factor spectra in a saved ``KronOptimizer.state_dict()`` (version 2, or a version-1 file).

    Read through :func:`kronopt.inspection.saved_views`, the saved counterpart of
    :meth:`kronopt.KronOptimizer.inspect`, so a saved state gives the spectra the live
    optimizer gave; ``step`` is the optimizer steps taken (``on_step``'s count).
    """
    kron = sd.get("kronopt") if isinstance(sd, Mapping) else None
    if kron is None or "config" not in kron:
        raise ValueError("not a kronopt optimizer state dict (no 'kronopt' section with its config)")
    return _spectra(saved_views(sd).items(), None, layers)


class SpectrumRecorder:
    """An ``on_step(step, optimizer, model)`` callback that records the spectra every ``every`` steps, and at
    step ``last`` where given (a run of fewer steps than ``every`` still ends with a record)."""

    def __init__(self, *, every: int = 10, layers: str | None = None, last: int | None = None) -> None:
        self.every, self.layers, self.last = max(1, every), layers, last
        self.records: list[FactorSpectrum] = []

    def __call__(self, step: int, optimizer: Any, model: Any = None) -> None:
        due = step % self.every == 0 or step == self.last
        if due and isinstance(optimizer, kronopt.KronOptimizer):
            self.records.extend(spectra_from_optimizer(optimizer, step, layers=self.layers))


def builtin_run(
    spec: Any, *, steps: int = 200, on_step: Callable[[int, Any, Any], None] | None = None, seed: int = 0, **overrides: Any
) -> "kronopt.KronOptimizer":
    """A small fallback training run: a 3-layer MLP regressing a fixed random teacher on synthetic data.

    The inputs have a few strong directions (a spiked covariance), so the factors
    develop a visible spike-and-flat spectrum within tens of steps.
    """
    gen = torch.Generator().manual_seed(seed)
    d_in, hidden, d_out, batch = 32, 64, 16, 64
    mix = torch.randn(d_in, d_in, generator=gen) / math.sqrt(d_in)
    mix[:, :4] *= 6.0  # spiked input covariance
    teacher = torch.randn(d_in, d_out, generator=gen) / math.sqrt(d_in)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, d_out),
        )
    opt = kronopt.build(model.named_parameters(), spec, **overrides)
    for step in range(1, steps + 1):
        x = torch.randn(batch, d_in, generator=gen) @ mix
        loss = (model(x) - torch.tanh(x @ teacher)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, opt, model)
    return opt


def training_run(
    spec: Any, *, steps: int, on_step: Callable[[int, Any, Any], None], builtin: bool = False, **overrides: Any
) -> None:
    """Run the default training task (:mod:`kronopt.app.train`, made small), or :func:`builtin_run` if ``builtin``."""
    if not builtin:
        task = train_mod.TaskConfig(
            layers=2, width=64, heads=4, context=64, batch=8, steps=steps, warmup=5, eval_every=0, threads=1
        )
        train_mod.train(task, spec, overrides=overrides, on_step=on_step, progress=False, plot=False)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: LAPACK calls are far slower on a contended thread pool
    try:
        builtin_run(spec, steps=steps, on_step=on_step, **overrides)
    finally:
        torch.set_num_threads(before)


def report(records: Iterable[FactorSpectrum], *, head: float = 0.1) -> list[dict[str, Any]]:
    """One row per factor at its last recorded step: sizes, extremes and the tail AM/GM ratio.

    ``d`` is the side's size and ``rank`` the count of eigenvalues above rounding of zero; ``head`` (a count,
    or a fraction of ``d``) is taken off the top, and ``max``, ``min`` and ``tail_am_gm`` are over the
    eigenvalues above the floor (``tail`` of them after the head; ``tail_am_gm`` NaN where that is none).
    """
    last: dict[tuple[str, str], FactorSpectrum] = {}
    for rec in records:
        key = (rec.name, rec.side)
        if key not in last or rec.step >= last[key].step:
            last[key] = rec
    rows = []
    for (name, side), rec in last.items():
        lam = rec.eigvals
        k = _head(rec.d, head)
        rows.append({
            "name": name, "side": side, "step": rec.step, "d": rec.d, "rank": lam.numel(), "head": k,
            "tail": max(0, lam.numel() - k), "max": float(lam.max()), "min": float(lam.min()),
            "tail_am_gm": tail_am_gm(lam, k),
        })
    return rows


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`report`'s rows as ``kronopt spectrum`` prints them: a table, then a line for each factor without a
    tail to measure (its cell reads ``none``), saying why, where a bare NaN would say nothing."""
    width = max(len(r["name"]) for r in rows) + 8
    lines = [f"{'factor':<{width}} {'step':>6} {'d':>6} {'rank':>6} {'max':>10} {'min':>10} {'tail AM/GM':>11}"]
    notes = []
    for r in rows:
        label = f"{r['name']} ({r['side']})"
        ratio = f"{r['tail_am_gm']:>11.4f}" if r["tail"] else f"{'none':>11}"
        lines.append(f"{label:<{width}} {r['step']:>6} {r['d']:>6} {r['rank']:>6} {r['max']:>10.3e} {r['min']:>10.3e} "
                     f"{ratio}")
        if r["tail"]:
            continue
        if r["head"] >= r["d"]:
            notes.append(f"{label}: the head of {r['head']} covers the whole side (d = {r['d']}): no tail to measure")
        else:
            notes.append(f"{label}: the head of {r['head']} takes all {r['rank']} eigenvalues above rounding of zero "
                         f"(the other {r['d'] - r['rank']} of d = {r['d']} are zero to rounding): no tail to measure")
    return "\n".join(lines + notes)


def plot(records: Sequence[FactorSpectrum], path: str | Path, *, head: float = 0.1, title: str = "") -> Path:
    """One row per factor: the sorted spectrum at several steps (log scale) and top / tail mean over time."""
    plt = pyplot("spectrum plots")
    keys = sorted({(r.name, r.side) for r in records})
    if not keys:
        raise ValueError("no factor spectra to plot (is any side rotated?)")
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 2.6 * len(keys)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (name, side) in enumerate(keys):
        recs = sorted((r for r in records if (r.name, r.side) == (name, side)), key=lambda r: r.step)
        ax, ax_t = axes[row]
        shown = recs if len(recs) <= 6 else [recs[round(i * (len(recs) - 1) / 5)] for i in range(6)]
        for j, rec in enumerate(shown):
            ax.semilogy(range(1, rec.eigvals.numel() + 1), rec.eigvals.numpy(), color=cmap(j / max(1, len(shown) - 1)),
                        label=f"step {rec.step}")
        ax.set_title(f"{name} ({side}): tail AM/GM {tail_am_gm(recs[-1].eigvals, _head(recs[-1].d, head)):.3g}",
                     fontsize=9)
        ax.set_xlabel("index (descending)")
        ax.set_ylabel("eigenvalue")
        ax.legend(fontsize=7)
        steps = [r.step for r in recs]
        k = _head(recs[-1].d, head)
        ax_t.semilogy(steps, [float(r.eigvals[0]) for r in recs], label="top")
        ax_t.semilogy(steps, [float(r.eigvals[k:].mean()) if r.eigvals.numel() > k else float("nan") for r in recs],
                      label=f"tail mean (after top {k})")
        ax_t.set_xlabel("step")
        ax_t.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _state_records(path: Path, layers: str | None) -> list[FactorSpectrum]:
    """The spectra in a saved state file, loaded without running code; ``ValueError`` naming the file otherwise."""
    sd = _args.load_torch_file(path)
    try:
        return spectra_from_state_dict(sd, layers=layers)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a dict of another shape
        raise ValueError(f"{str(path)!r} is not a kronopt optimizer state dict ({type(exc).__name__}: {exc})") from None


#: ``kronopt spectrum``'s run flags and their defaults (``None`` in the parser: given or not is known)
_RUN_DEFAULTS = {"config": "kl_shampoo", "steps": "200", "every": "25"}


def cmd_spectrum(args: argparse.Namespace) -> int:
    p = _args.Problems()
    if args.state is not None:  # a saved state is read, not run: the run's flags would be ignored
        given = [f for f, on in (("CONFIG", args.config is not None), ("--set", bool(args.set)),
                                 ("--steps", args.steps is not None), ("--every", args.every is not None),
                                 ("--builtin", args.builtin)) if on]
        if given:
            p.add("--state", f"reads a saved state instead of a run: drop {', '.join(given)}, which set up the run")
    config = args.config if args.config is not None else _RUN_DEFAULTS["config"]
    steps = p.integer("--steps", args.steps if args.steps is not None else _RUN_DEFAULTS["steps"], minimum=1)
    every = p.integer("--every", args.every if args.every is not None else _RUN_DEFAULTS["every"], minimum=1)
    head = p.value("--head", args.head, head_size, 0.1)
    layers = None if args.layers is None else p.value("--layers", args.layers, _args.pattern, None)
    overrides = p.sets(args.set)
    records: list[FactorSpectrum] = []
    if args.state is not None:
        path = p.value("--state", args.state, _args.input_file, None)
        if path is not None:
            records = p.value("--state", path, lambda q: _state_records(q, layers), [])
    else:
        p.config(config, overrides)  # every config error before the run
    if not args.no_plot:
        p.value("--out", args.out, _args.output_dir, None)
        try:
            pyplot("spectrum plots")  # fail before the run, not after
        except MissingExtraError as exc:
            p.add("", str(exc))
    p.check()
    if args.state is not None:
        label = f"saved state {args.state}"
    else:
        recorder = SpectrumRecorder(every=every, layers=layers, last=steps)
        training_run(config, steps=steps, on_step=recorder, builtin=args.builtin, **overrides)
        records = recorder.records
        label = f"{config}, {steps} steps"
    rows = report(records, head=head)
    if not rows:
        print("kronopt spectrum: no factor spectra found (no rotated side, or --layers matched nothing)")
        return 1
    print(format_report(rows))
    if not args.no_plot:
        out = plot(records, Path(args.out) / "spectrum.png", head=head, title=label)
        print(f"plot: {out}")
    return 0


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "spectrum", help="eigenvalue spectra of the Kronecker factors (log-scale plots, tail AM/GM)",
        description="Eigenvalue spectra of the Kronecker factors. Per factor: its size d; its rank, the count of "
        "eigenvalues above rounding of zero (kronopt.linalg.eigenvalue_floor of the largest: a rank-deficient "
        "factor's null eigenvalues come out of the solver as rounding of either sign, and count as zero); the largest "
        "and smallest above that floor; and the tail AM/GM, the arithmetic over the geometric mean of the eigenvalues "
        "above the floor after the --head largest (1: a flat tail; with the d - rank zeros it would be infinite). "
        "Where the head takes every eigenvalue above the floor, the report says there is no tail.",
    )
    p.add_argument("config", nargs="?", help=f"preset or TOML file to train with (default {_RUN_DEFAULTS['config']})")
    p.add_argument("--state", help="a saved optimizer state (torch.save(opt.state_dict())) instead of a run; "
                   "loaded with weights_only=True, so a file holding anything but tensors and plain data is refused; "
                   "CONFIG, --set, --steps, --every and --builtin are refused with it")
    p.add_argument("--steps", help=f"training steps of the run (≥ 1; default {_RUN_DEFAULTS['steps']})")
    p.add_argument("--every", help=f"record every this many steps (≥ 1; default {_RUN_DEFAULTS['every']}) "
                   "and at the last step")
    p.add_argument("--layers", help="regular expression on parameter names (default: every rotated block)")
    p.add_argument("--head", default="0.1", help="spike size excluded from the tail: a whole count ≥ 1, or a fraction "
                   "of d in (0, 1) (default 0.1, at least 1); a head of d or more leaves no tail, and the report says so")
    p.add_argument("--builtin", action="store_true", help="use the built-in MLP run instead of the default task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default="runs/spectrum", help="output folder for spectrum.png")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_spectrum)
