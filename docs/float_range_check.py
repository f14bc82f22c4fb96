"""How far in gradient scale do kronopt's float32 steps keep their digits?  (docs/dykaf.md and docs/pro.md, "Float range")

First, DyKAF's KSL step alone. For a tall (1024 × 256), a wide (256 × 1024, whose larger side takes the split sandwich on a
CPU) and a small (128 × 64) block, builds the state one gradient leaves (the ``kron`` start from
a gaussian ``G₀``) and a second gaussian gradient, scales all three by ``g``, runs one KSL step
(``linalg.projector_split_ksl``, beta 0.95) in float32 and in float64, and prints the relative
error of the float32 ``L' ⊗ R'`` (in the Frobenius norm, taken through ``‖A‖‖B‖`` identities
without forming the Kronecker product) against the float64 one, or "not finite".

Then whole presets: three blocks (96 × 40, 40 × 96, 64 × 64), 12 steps of gaussian gradients of
size ``g`` with a refresh every 4, once in float32 and once in float64 from the same start. Printed
per preset and ``g``: the largest relative difference between the two runs' displacements of a
parameter. Where the float32 run stays in range this is the float32 rounding, amplified where the
factors' eigenvalues are close (SOAP-type presets on gaussian gradients read 0.2–0.4 at every
scale); a jump from one scale to the next is a range failure.

Between the two, the KSL step over a grid of sizes of the state and the gradient apart: on four
shapes, the worst error over ``‖G‖ = 2^-110 … 2^60`` for each ``‖R‖ = ‖L‖ = 2^eR`` ("inf": not
finite).

    python docs/float_range_check.py            # all three parts (a few minutes on two cores)
    python docs/float_range_check.py ksl        # the first part
    python docs/float_range_check.py grid       # the second
    python docs/float_range_check.py presets soap,pro_soap
"""

import sys

import torch

import kronopt
from kronopt import linalg

SHAPES = [(1024, 256), (256, 1024), (128, 64)]
SCALES = [1e-25, 1e-20, 1e-15, 1e-10, 1e-5, 1.0, 1e4, 1e8, 4e8, 1e10, 1e12, 1e15]


def _kron_error(L: torch.Tensor, R: torch.Tensor, L64: torch.Tensor, R64: torch.Tensor) -> float:
    """``‖L ⊗ R − L64 ⊗ R64‖ / ‖L64 ⊗ R64‖`` from ``‖A ⊗ B‖² = ‖A‖²‖B‖²`` and ``⟨A ⊗ B, C ⊗ D⟩ = ⟨A, C⟩⟨B, D⟩``."""
    # each factor over its float64 twin's norm first, so the products stay in float64's range at every scale
    a, b, c, d = L.double() / L64.norm(), R.double() / R64.norm(), L64 / L64.norm(), R64 / R64.norm()
    sq = (a * a).sum() * (b * b).sum() - 2 * (a * c).sum() * (b * d).sum() + (c * c).sum() * (d * d).sum()
    return sq.clamp(min=0).sqrt().item()


def ksl_range() -> None:
    torch.manual_seed(0)
    beta = 0.95
    print("entries of G    " + "  ".join(f"{m} × {n}".rjust(12) for m, n in SHAPES))
    rows = {g: [] for g in SCALES}
    for m, n in SHAPES:
        G0, G1 = torch.randn(1, m, n, dtype=torch.float64), torch.randn(1, m, n, dtype=torch.float64)
        top = linalg.top_singular_triplet(G0)
        s = ((1 - beta) ** 0.5 * top.sigma).view(1, 1, 1)
        L0 = linalg.sym(s * top.u.unsqueeze(-1) * top.u.unsqueeze(-2))
        R0 = linalg.sym(s * top.v.unsqueeze(-1) * top.v.unsqueeze(-2))
        for g in SCALES:
            L64, R64 = linalg.projector_split_ksl(L0 * g, R0 * g, G1 * g, beta)
            L32, R32 = linalg.projector_split_ksl((L0 * g).float(), (R0 * g).float(), (G1 * g).float(), beta)
            finite = bool(torch.isfinite(L32).all() and torch.isfinite(R32).all())
            rows[g].append(f"{_kron_error(L32, R32, L64, R64):.1e}" if finite else "not finite")
    for g, cells in rows.items():
        print(f"{g:<14.0e}  " + "  ".join(c.rjust(12) for c in cells))


GRID_SHAPES = [(1024, 256), (256, 1024), (128, 64), (64, 128)]
GRID = range(-110, 61, 10)


def ksl_grid() -> None:
    """The KSL step on a unit-norm rank-one state and a unit-norm gradient, times ``2^eR`` and ``2^eG`` apart."""
    torch.manual_seed(1)
    beta = 0.95
    print("shape        worst error of L' ⊗ R' over ‖G‖ = 2^-110 … 2^60, by ‖R‖ = ‖L‖ = 2^eR")
    print("             " + " ".join(f"{e:>7}" for e in GRID))
    for m, n in GRID_SHAPES:
        G0, G1 = torch.randn(1, m, n, dtype=torch.float64), torch.randn(1, m, n, dtype=torch.float64)
        top = linalg.top_singular_triplet(G0)
        L0, R0 = top.u.unsqueeze(-1) * top.u.unsqueeze(-2), top.v.unsqueeze(-1) * top.v.unsqueeze(-2)
        G1 = G1 / G1.norm()
        cells = []
        for eR in GRID:
            worst = 0.0
            for eG in GRID:
                L, R, G = L0 * 2.0**eR, R0 * 2.0**eR, G1 * 2.0**eG
                L64, R64 = linalg.projector_split_ksl(L, R, G, beta)
                L32, R32 = linalg.projector_split_ksl(L.float(), R.float(), G.float(), beta)
                finite = bool(torch.isfinite(L32).all() and torch.isfinite(R32).all())
                worst = max(worst, _kron_error(L32, R32, L64, R64) if finite else float("inf"))
            cells.append(f"{worst:7.0e}")
        print(f"{m:>5} × {n:<5} " + " ".join(cells), flush=True)


PRESETS = "soap,dykaf,dykaf_rank1,shampoo,kl_shampoo,kl_soap,pro_soap,pro_dykaf,pro_kl_shampoo"
PRESET_SHAPES = [(96, 40), (40, 96), (64, 64)]
PRESET_SCALES = [1.0, 1e4, 1e8, 1e10, 1e12, 1e15]


def _displacements(preset: str, g: float, dtype: torch.dtype, steps: int = 12) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in PRESET_SHAPES]
    params = [torch.nn.Parameter(x.to(dtype).clone()) for x in start]
    opt = kronopt.build([(f"l{i}.weight", p) for i, p in enumerate(params)], preset, **{"refresh.every": 4})
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * g).to(dtype)
        opt.step()
    return [p.detach().double() - x for p, x in zip(params, start)]


def preset_range(presets: str) -> None:
    print("preset          " + "  ".join(f"g = {g:.0e}".rjust(10) for g in PRESET_SCALES))
    for preset in presets.split(","):
        cells = []
        for g in PRESET_SCALES:
            low, high = _displacements(preset, g, torch.float32), _displacements(preset, g, torch.float64)
            rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(low, high))
            cells.append(f"{rel:.1e}")
        print(f"{preset:<16}" + "  ".join(c.rjust(10) for c in cells), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part in ("all", "ksl"):
        ksl_range()
    if part in ("all", "grid"):
        ksl_grid()
    if part in ("all", "presets"):
        preset_range(sys.argv[2] if len(sys.argv) > 2 else PRESETS)
