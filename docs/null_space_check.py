"""What ``basis.null_space = "canonical"`` costs in a short training, against the default ``"solver"``.

Two copies of the embedded task's model (TinyGPT, 4 layers of width 256) train side by side on the same random
token batches, one optimizer each, the steps interleaved; the script prints each one's mean and median
``opt.step()`` time after the warm-up, their ratio, the loss each reached, and how many refreshed sides (and
columns) the canonical run found left to rounding by the power product (the columns it gives a second QR).

    python docs/null_space_check.py soap --steps 110 --threads 2

Not part of the test suite: a measurement (docs/performance_log.md, the fifty-ninth session).
"""

import argparse
import statistics
import time

import torch

import kronopt
from kronopt import linalg
from kronopt.app.task.model import TinyGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="soap")
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flags = {"sides": 0, "flagged": 0, "columns": 0, "of": 0}
    real = linalg.q_factor

    def counting(P, **kw):  # the first QR of each canonical power step receives R's diagonal
        Q = real(P, **kw)
        diagonal = kw.get("r_diagonal")
        if diagonal is not None:
            null = diagonal <= diagonal.amax(-1, keepdim=True) * linalg.power_rounding_floor(diagonal.shape[-1], diagonal.dtype)
            flags["sides"] += diagonal.shape[0]
            flags["flagged"] += int(null.any(-1).sum())
            flags["columns"] += int(null.sum())
            flags["of"] += null.numel()
        return Q

    linalg.q_factor = counting
    runs = {}
    for choice in ("solver", "canonical"):
        torch.manual_seed(0)
        model = TinyGPT(layers=4, width=256, heads=4, context=128)
        runs[choice] = (model, kronopt.build(model.named_parameters(), args.preset, **{"basis.null_space": choice}))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 200, (8, 128), generator=gen) for _ in range(20)]
    times: dict[str, list[float]] = {choice: [] for choice in runs}
    losses: dict[str, float] = {}
    for step in range(args.steps):
        for choice, (model, opt) in runs.items():
            x = batches[step % len(batches)]
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            start = time.perf_counter()
            opt.step()
            if step >= args.warmup:
                times[choice].append((time.perf_counter() - start) * 1e3)
            opt.zero_grad()
            losses[choice] = loss.item()
    for choice in runs:
        print(f"{args.preset} null_space={choice}: mean {statistics.mean(times[choice]):.1f} ms, median "
              f"{statistics.median(times[choice]):.1f} ms, last loss {losses[choice]:.4f}")
    print(f"canonical / solver, mean step: {statistics.mean(times['canonical']) / statistics.mean(times['solver']):.3f}")
    if flags["sides"]:
        print(f"refreshed sides with a column left to rounding: {flags['flagged']} of {flags['sides']}; "
              f"columns {flags['columns']} of {flags['of']}")


if __name__ == "__main__":
    main()
