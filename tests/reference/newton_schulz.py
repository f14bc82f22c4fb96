"""Naive float64 Newton–Schulz orthogonalization, written from ``shared/specs/muon.md`` §3–§5.

It never imports kronopt: the coefficient tuples below are typed from the spec's §4 table (which cites
KellerJordan/Muon, Polar Express arXiv 2505.16932, modded-nanogpt, CANS arXiv 2506.10935 and NVIDIA's
``muon_utils.py``), so a wrong number in ``kronopt.linalg.NS_SCHEDULES`` shows up as a disagreement. One
matrix at a time, plain matmuls (no ``baddbmm``), the shorter side as the Gram side.
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64

__all__ = ["PUBLISHED", "SHAPE_SCALES", "coefficients", "newton_schulz", "scalar_iteration"]

#: muon.md §4: name -> (tuples, what happens past the list)
PUBLISHED: dict[str, tuple[list[tuple[float, float, float]], str]] = {
    # KellerJordan/Muon, torch.optim.Muon
    "kj": ([(3.4445, -4.7750, 2.0315)], "repeat_last"),
    # Polar Express, 1.01 safety factor folded in (8.2872 / 1.01 = 8.2051), last tuple undivided
    "polar_express": (
        [
            (8.2051, -22.9019, 16.4607),
            (4.0664, -2.8612, 0.5184),
            (3.9096, -2.8234, 0.5250),
            (3.2856, -2.4153, 0.4853),
            (2.2779, -1.6198, 0.3985),
            (1.8726, -1.2307, 0.3585),
            (1.8564, -1.2132, 0.3568),
            (1.8750, -1.2500, 0.3750),
        ],
        "repeat_last",
    ),
    # modded-nanogpt train_gpt_medium.py
    "quintic": (
        [
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ],
        "cycle",
    ),
    # CANS
    "cans": (
        [
            (8.4703, -25.1081, 18.6293),
            (4.1828, -3.1087, 0.5806),
            (3.9619, -2.9541, 0.5630),
            (3.2866, -2.4647, 0.5074),
            (2.2737, -1.6447, 0.4162),
        ],
        "repeat_last",
    ),
    # 8 × KellerJordan's tuple, then 2 × (2, −1.5, 0.5)
    "deepseekv4": ([(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2, "repeat_last"),
}

#: muon.md §5: the shape factor s of an m × n block
SHAPE_SCALES = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "spectral": lambda m, n: math.sqrt(max(m, n)),
    "unit_rms_norm": lambda m, n: math.sqrt(m / n),
    "none": lambda m, n: 1.0,
}


def coefficients(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``steps`` tuples of a published schedule."""
    tuples, beyond = PUBLISHED[name]
    out = []
    for k in range(steps):
        if k < len(tuples):
            out.append(tuples[k])
        elif beyond == "cycle":
            out.append(tuples[k % len(tuples)])
        else:
            out.append(tuples[-1])
    return out


def scalar_iteration(coeffs, x):
    """The composed scalar polynomial x ← a x + b x³ + c x⁵ (what NS does to each normalized singular value)."""
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def _one(U: torch.Tensor, coeffs, eps: float, norm: str, round_to: torch.dtype | None) -> torch.Tensor:
    # r: the arithmetic of a narrower dtype, each operation's exact (float64) result rounded to it
    r = (lambda t: t) if round_to is None else (lambda t: _round(t, round_to))
    X = r(U.to(DTYPE))
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    nrm = r(torch.linalg.norm(X))
    X = r(X / r(nrm.clamp(min=eps) if norm == "clamp" else nrm + eps))
    for a, b, c in coeffs:
        A = r(X @ X.T)
        B = r(b * A + c * (A @ A))
        X = r(a * X + B @ X)
    return X.T if tall else X


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (float64) rounded once to the nearest number with ``dtype``'s significand, ties to even (its
    normal range only). ``t.to(torch.bfloat16)`` would round twice, through float32."""
    bits = 1 - round(math.log2(torch.finfo(dtype).eps))  # significant bits: 8 for bfloat16 (eps = 2⁻⁷)
    mantissa, exponent = torch.frexp(t)  # t = mantissa · 2^exponent, |mantissa| in [0.5, 1)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(bits))), exponent - bits)


def newton_schulz(
    U: torch.Tensor, coeffs, *, eps: float = 1e-7, norm: str = "clamp", round_to: torch.dtype | None = None
) -> torch.Tensor:
    """NS of a matrix ``(m n)`` or of each matrix of a batch ``(b m n)``, in float64; with ``round_to``
    (``torch.bfloat16``) every operation's result is rounded to that dtype (and held in float64): the
    arithmetic of a bfloat16 iteration whose products accumulate exactly, then round once."""
    if U.ndim == 2:
        return _one(U, coeffs, eps, norm, round_to)
    return torch.stack([_one(u, coeffs, eps, norm, round_to) for u in U])
