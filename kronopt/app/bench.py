"""``kronopt bench``: median optimizer step time and state bytes on a parameter set.

The optimizers (presets, TOML files, ``torch.AdamW``, ``torch.Muon``) are stepped
interleaved in one process on the same gradients, so machine noise hits each alike.
"""

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import kronopt

from . import _args
from ._args import Problems

def transformer_shapes(d: int, layers: int) -> list[tuple[int, ...]]:
    """Per layer: qkv (3d, d), out (d, d), mlp up (4d, d), mlp down (d, 4d) and two gains (d,)."""
    per_layer = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    return per_layer * layers


def _torch_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


class _Pair:
    """Two torch optimizers stepped as one (torch.optim.Muon needs AdamW for non-matrices)."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()


def _make(name: str, params: list[torch.nn.Parameter]) -> tuple[Any, Any]:
    if name == "torch.AdamW":
        opt = torch.optim.AdamW(params)
        return opt, lambda: _torch_state_bytes(opt)
    if name == "torch.Muon":
        mats = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        muon = torch.optim.Muon(mats)
        if not rest:
            return muon, lambda: _torch_state_bytes(muon)
        adam = torch.optim.AdamW(rest, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
        return _Pair(muon, adam), lambda: _torch_state_bytes(muon) + _torch_state_bytes(adam)
    opt = kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], name)
    return opt, opt.state_bytes


def bench(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    *,
    steps: int,
    warmup: int,
    device: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Median optimizer step time and state bytes per optimizer, measured interleaved in one run.

    Raises:
        ValueError: ``steps < 1``, ``warmup < 0``, no shapes, or a dimension < 1.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps ≥ 1 and warmup ≥ 0, got steps={steps}, warmup={warmup}")
    if not shapes or any(d < 1 for s in shapes for d in s):
        raise ValueError(f"need at least one shape, every dimension ≥ 1, got {list(shapes)}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes] for _ in range(4)]
    runs = []
    for name in names:
        params = [torch.nn.Parameter(b.clone().to(device)) for b in base]
        opt, state_bytes = _make(name, params)
        runs.append({"name": name, "params": params, "opt": opt, "state_bytes": state_bytes, "times": []})
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for k in range(warmup + steps):
        for run in runs:  # interleaved, so machine noise hits every optimizer alike
            for p, g in zip(run["params"], grads[k % len(grads)]):
                p.grad = g
            sync()
            t0 = time.perf_counter()
            run["opt"].step()
            sync()
            if k >= warmup:
                run["times"].append(time.perf_counter() - t0)
    base_ms = None
    rows = []
    for run in runs:
        med = statistics.median(run["times"]) * 1e3
        if run["name"] == "torch.AdamW":
            base_ms = med
        rows.append(
            {
                "optimizer": run["name"],
                "median_ms": med,
                "mean_ms": statistics.fmean(run["times"]) * 1e3,
                "state_bytes": run["state_bytes"](),
            }
        )
    for row in rows:
        row["vs_torch_adamw"] = row["median_ms"] / base_ms if base_ms else float("nan")
    return rows


#: what ``kronopt bench`` measures when given no optimizer
BENCH_DEFAULT: tuple[str, ...] = ("torch.AdamW", "torch.Muon", "adamw", "muon", "shampoo", "soap")
_TORCH_OPTIMIZERS: tuple[str, ...] = ("torch.AdamW", "torch.Muon")


def check_bench(args: argparse.Namespace) -> tuple[list[str], list[tuple[int, ...]], dict[str, int]]:
    """``kronopt bench``'s optimizers, shapes and counts, every bad argument in one :class:`UsageError`."""
    p = Problems()
    if args.shapes is not None:
        shapes = p.value("--shapes", args.shapes, _args.shapes, [])
    else:
        d = p.integer("--d", args.d, minimum=1)
        layers = p.integer("--layers", args.layers, minimum=1)
        shapes = transformer_shapes(d, layers)
    counts = {
        "steps": p.integer("--steps", args.steps, minimum=1),
        "warmup": p.integer("--warmup", args.warmup, minimum=0),
        "threads": p.integer("--threads", args.threads, minimum=0),
        "seed": p.integer("--seed", args.seed, minimum=0, maximum=2**63 - 1),
    }
    p.value("--device", args.device, _args.device, "cpu")
    names = list(args.optimizers) or list(BENCH_DEFAULT)
    for name in names:
        if name == "torch.Muon" and shapes and not any(len(s) == 2 for s in shapes):
            p.add("torch.Muon", "needs at least one 2-D shape (it only takes matrices)")
        elif name not in _TORCH_OPTIMIZERS:
            p.config(name, {}, prefix=name)
    p.check()
    return names, shapes, counts


def cmd_bench(args: argparse.Namespace) -> int:
    names, shapes, counts = check_bench(args)
    threads = torch.get_num_threads()
    if counts["threads"]:
        torch.set_num_threads(counts["threads"])
    try:
        rows = bench(names, shapes, steps=counts["steps"], warmup=counts["warmup"], device=args.device, seed=counts["seed"])
    finally:
        torch.set_num_threads(threads)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    print(
        f"{len(shapes)} parameters, {n_params / 1e6:.2f} M numbers, device {args.device}, "
        f"{counts['steps']} timed steps after {counts['warmup']} warm-up (interleaved), torch {torch.__version__}"
    )
    header = f"{'optimizer':<14} {'median ms':>10} {'mean ms':>9} {'× torch.AdamW':>14} {'state MiB':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['optimizer']:<14} {r['median_ms']:>10.2f} {r['mean_ms']:>9.2f} "
            f"{r['vs_torch_adamw']:>14.2f} {r['state_bytes'] / 2**20:>10.2f}"
        )
    return 0


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("bench", help="median optimizer step time and state size on a parameter set")
    p.add_argument("optimizers", nargs="*", help="presets, TOML files, torch.AdamW or torch.Muon (default: all)")
    p.add_argument("--d", default="256", help="model width of the transformer-shaped set (≥ 1)")
    p.add_argument("--layers", default="4", help="layers of the transformer-shaped set (≥ 1)")
    p.add_argument("--shapes", help="your own shapes instead, e.g. '768x768,3072x768,768'")
    p.add_argument("--steps", default="30", help="timed steps (≥ 1)")
    p.add_argument("--warmup", default="12", help="untimed steps first (≥ 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", default="0", help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", default="0")
    p.set_defaults(func=cmd_bench)
