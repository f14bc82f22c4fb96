"""Split buckets joined again against never joined, on a mixture of same-shape experts (docs/architecture.md,
"Parameters without gradients").

Two optimizers of one preset on copies of the same experts, fed the same gradients and stepped in turn: one as
built, one with ``_join`` turned off (the code before joins). A random phase (each expert without a gradient with
probability ``p`` each step), then a phase with every expert present. Prints the mean and median step of each
phase (the first 10 steps of each left out), the buckets at the end of each, and whether the weights agree.

    python docs/moe_join_check.py soap 32 32x32 0.03
"""

import statistics
import sys
import time

import torch

import kronopt


def main(preset: str, experts: int, shape: tuple[int, int], p_absent: float, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    joined = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(experts)]
    apart = [torch.nn.Parameter(p.detach().clone()) for p in joined]
    opt_j = kronopt.build([(f"moe.experts.{i}.weight", p) for i, p in enumerate(joined)], preset)
    opt_a = kronopt.build([(f"moe.experts.{i}.weight", p) for i, p in enumerate(apart)], preset)
    opt_a._join = lambda stepped: stepped  # never joined
    for phase, steps, p in (("random", 60, p_absent), ("all present", 40, 0.0)):
        times: dict[str, list[float]] = {"joined": [], "apart": []}
        for _ in range(steps):
            absent = torch.rand(experts, generator=gen) < p
            grads = [None if absent[i] else torch.randn(shape, generator=gen) for i in range(experts)]
            for name, params, opt in (("joined", joined, opt_j), ("apart", apart, opt_a)):
                for w, g in zip(params, grads):
                    w.grad = None if g is None else g.clone()
                start = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - start)
        row = " | ".join(
            f"{name} mean {1e3 * statistics.mean(t[10:]):.2f} median {1e3 * statistics.median(t[10:]):.2f} ms" for name, t in times.items()
        )
        print(f"{preset} {experts} x {shape} p={p_absent} {phase}: {row} | buckets {len(opt_j._buckets)} vs {len(opt_a._buckets)}")
    diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(joined, apart))
    print(f"weights: {'the same bits' if diff == 0 else f'up to {diff:.1e} of their size apart'}")


if __name__ == "__main__":
    preset, experts, shape, p = sys.argv[1:5]
    with torch.no_grad():
        main(preset, int(experts), tuple(int(x) for x in shape.split("x")), float(p))  # type: ignore[arg-type]
