"""Two versions of kronopt stepped in turn in one process: the figures of a change measured beside the code before it.

Separate processes read the same code 0.7–1.7 × apart on a shared machine, minute to minute; in one process
the two versions see the same load. Both trees are imported as ``kronopt`` (each with its own modules, put
back into ``sys.modules`` before each of its steps, so that the imports a function makes when it runs find
its own version), build the same preset on the same parameters, and step the same gradients in alternating
rounds (the order flips every round). Printed: each version's median and mean time a step, the ratios of the
medians and of the means (new over base), the median of the rounds' paired ratios, and the largest difference
between the two versions' parameters at the end (0 where the change keeps the bits).

    git worktree add /tmp/kronopt-base <old commit>
    python docs/inprocess_ab.py soap 60 small --base /tmp/kronopt-base          # 30 shapes, 8x8 .. 37x66
    python docs/inprocess_ab.py dykaf 40 256 --base /tmp/kronopt-base           # 4 layers of d = 256
    python docs/inprocess_ab.py soap 40 1024x1 --base /tmp/kronopt-base         # one layer of d = 1024
    python docs/inprocess_ab.py adamw 60 many256x32 --base /tmp/kronopt-base    # 256 blocks of 32 x 32
    python docs/inprocess_ab.py adamw 30 vectors2000x64 --base /tmp/kronopt-base  # 2000 vectors of 64
    python docs/inprocess_ab.py soap 40 64 --groups 4 --base /tmp/kronopt-base  # a param group per layer
    python docs/inprocess_ab.py soap 40 64 --groups 4 --base-groups 0 --base .  # per layer against one group
    python docs/inprocess_ab.py muon 40 256 --dtype bfloat16 --base /tmp/kronopt-base  # bfloat16 parameters

Run the same tree as both (``--base`` the repository itself) to see the harness's own bias (about 1.00).
"""

import argparse
import gc
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch


def _load(path: Path) -> dict:
    """The ``kronopt`` package of the tree at ``path`` and its submodules, imported afresh."""
    for name in [k for k in sys.modules if k == "kronopt" or k.startswith("kronopt.")]:
        del sys.modules[name]
    # an editable install's finder would hand back the installed tree whatever the path says
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("kronopt")
        for sub in ("compose", "optimizer", "linalg", "inner_rules.adam", "inner_rules.orthogonalize", "bases", "factors.ema"):
            importlib.import_module(f"kronopt.{sub}")
    finally:
        sys.path.remove(str(path))
    if not Path(module.__file__).resolve().is_relative_to(path.resolve()):
        raise SystemExit(f"imported {module.__file__}, not the tree at {path}")
    return {k: v for k, v in sys.modules.items() if k == "kronopt" or k.startswith("kronopt.")}


def _shapes(kind: str) -> tuple[list[tuple[int, ...]], int]:
    """The parameters' shapes and the steps a round times."""
    if kind == "small":
        return [(8 + k, 8 + 2 * k) for k in range(30)], 10  # a round: one refresh period of the presets
    if kind.startswith("many"):
        count, side = map(int, kind[4:].split("x"))
        return [(side, side)] * count, 10
    if kind.startswith("vectors"):
        count, side = map(int, kind[7:].split("x"))
        return [(side,)] * count, 10
    width, _, layers = kind.partition("x")
    d, count = int(width), int(layers or 4)
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * count + [(d,)] * (2 * count), 1


def _groups(kind: str, params: list, count: int) -> list:
    """``params`` in ``count`` param groups whose learning rates fall by 0.8 from one to the next (a learning rate
    decayed by layer): with ``<d>`` each transformer layer's matrices and vectors one group (``count`` 4), else
    parameter ``j`` in group ``j % count``; ``count`` 0: the parameters as they are (one group)."""
    if not count:
        return params
    if kind.isdigit():
        of = [j // 4 for j in range(16)] + [j // 2 for j in range(8)]
    else:
        of = [j % count for j in range(len(params))]
    return [{"params": [p for p, g in zip(params, of) if g == k], "lr": 1e-3 * 0.8**k} for k in range(max(of) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("rounds", type=int)
    parser.add_argument(
        "kind",
        help="small | many<count>x<side> | vectors<count>x<size> | <d> (4 transformer layers of width d) | <d>x<layers>",
    )
    parser.add_argument("--base", type=Path, required=True, help="the tree of the code before (a git worktree)")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent, help="default: this tree")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--groups", type=int, default=0, help="param groups of their own learning rates (<d>: one per layer)")
    parser.add_argument("--base-groups", type=int, default=None, help="the base's param groups (default: --groups)")
    parser.add_argument("--dtype", default="float32", help="the parameters' and gradients' dtype (bfloat16, ...)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    tables = {"base": _load(args.base), "new": _load(args.new)}
    shapes, per = _shapes(args.kind)
    dtype = getattr(torch, args.dtype)
    runs = {}
    for name, table in tables.items():
        sys.modules.update(table)
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(*s) * 0.1).to(dtype)) for s in shapes]
        count = args.groups if name == "new" or args.base_groups is None else args.base_groups
        runs[name] = (table, params, table["kronopt"].build(_groups(args.kind, params, count), args.preset))
    grads = [[torch.randn(*s).to(dtype) for s in shapes] for _ in range(8)]

    def step(name: str, i: int) -> None:
        table, params, opt = runs[name]
        sys.modules.update(table)
        for p, g in zip(params, grads[i % 8]):
            p.grad = g
        opt.step()

    for i in range(12):
        for name in runs:
            step(name, i)
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in ("base", "new") if r % 2 else ("new", "base"):
            start = time.perf_counter()
            for i in range(per):
                step(name, 12 + r * per + i)
            times[name].append((time.perf_counter() - start) / per * 1e3)
    b, n = times["base"], times["new"]
    print(
        f"{args.preset} {args.kind}: base median {statistics.median(b):.3f} mean {statistics.mean(b):.3f} ms, "
        f"new median {statistics.median(n):.3f} mean {statistics.mean(n):.3f} ms; ratio of medians "
        f"{statistics.median(n) / statistics.median(b):.3f}, of means {statistics.mean(n) / statistics.mean(b):.3f}, "
        f"median of paired ratios {statistics.median([y / x for x, y in zip(b, n)]):.3f}"
    )
    diff = max((x.double() - y.double()).abs().max().item() for x, y in zip(runs["base"][1], runs["new"][1]))
    print(f"largest difference between the two versions' parameters: {diff:.3g}")


if __name__ == "__main__":
    main()
