"""Hypothesis strategies and seeded builders shared by the unit and contract suites.

Hypothesis draws seeds, shapes and scalars only; every tensor is built from a
``torch.Generator().manual_seed(seed)`` so that a failing example shrinks to a
seed and replays exactly (STYLE.md §2.7). Nothing here touches the global torch RNG.
"""

from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

#: a seed for ``torch.Generator().manual_seed``
SEEDS = st.integers(0, 2**32 - 1)

#: matrix sides used by the unit tests (kept small so the suite stays fast)
MAX_DIM = 12

#: the gradient families of the contract suite (STYLE.md §2.7, "finite on gradients()")
GRADIENT_FAMILIES: tuple[str, ...] = ("random", "rank1", "zero", "huge", "row", "column", "tall")

#: block shape of each family (``row``: m == 1, ``column``: n == 1, ``tall``: m ≫ n)
FAMILY_SHAPES: dict[str, tuple[int, int]] = {
    "random": (6, 4),
    "rank1": (5, 7),
    "zero": (5, 5),
    "huge": (6, 4),
    "row": (1, 7),
    "column": (7, 1),
    "tall": (12, 2),
}


def seeds() -> st.SearchStrategy[int]:
    return SEEDS


def dims(lo: int = 1, hi: int = MAX_DIM) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


def exponents(lo: float = -3.0, hi: float = 3.0) -> st.SearchStrategy[float]:
    """Base-10 exponents with no NaN, infinities or subnormals."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


# -- seeded builders -------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def orthonormal(gen: torch.Generator, batch: int, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A batch of random orthogonal ``n × n`` matrices (QR of a Gaussian, in float64)."""
    Q, R = torch.linalg.qr(randn(gen, batch, n, n))
    # Fix the QR sign ambiguity so the distribution does not depend on LAPACK conventions.
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    return Q.to(dtype)


def spd_from(Q: Tensor, lam: Tensor) -> Tensor:
    """``Q diag(λ) Qᵀ``, symmetrised exactly."""
    A = (Q * lam.unsqueeze(-2)) @ Q.mT
    return (A + A.mT) * 0.5


def spd_matrix(
    gen: torch.Generator,
    batch: int,
    n: int,
    *,
    log10_range: tuple[float, float] = (-3.0, 3.0),
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A batch of SPD matrices ``Q diag(10**u) Qᵀ`` with ``u`` uniform in ``log10_range``."""
    lo, hi = log10_range
    u = lo + (hi - lo) * torch.rand(batch, n, generator=gen, dtype=torch.float64)
    return spd_from(orthonormal(gen, batch, n), 10.0**u).to(dtype)


def held_matrix(P: Any) -> Tensor:
    """The symmetric matrix a :class:`kronopt.linalg.LowerTiles` holds, assembled tile by tile (each tile and its
    transpose, panels' tiles included as their views), every entry set (NaN nowhere)."""
    D = torch.full(tuple(P.shape), float("nan"), dtype=P.dtype)
    for (i, j), t in P.tiles.items():
        I, J = P.slices[i], P.slices[j]
        D[:, I, J] = t
        D[:, J, I] = t.mT
    assert not D.isnan().any()
    return D


def psd_rank_deficient_matrix(
    gen: torch.Generator, batch: int, n: int, rank: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """A batch of PSD matrices of the given rank (``B Bᵀ`` with ``B`` of ``rank`` columns)."""
    B = randn(gen, batch, n, rank)
    A = B @ B.mT
    return ((A + A.mT) * 0.5).to(dtype)


def gradient(family: str, gen: torch.Generator, batch: int = 2, dtype: torch.dtype = torch.float64) -> Tensor:
    """A ``b m n`` gradient of one of :data:`GRADIENT_FAMILIES`."""
    m, n = FAMILY_SHAPES[family]
    if family == "zero":
        G = torch.zeros(batch, m, n, dtype=torch.float64)
    elif family == "rank1":
        G = randn(gen, batch, m, 1) @ randn(gen, batch, 1, n)
    elif family == "huge":
        G = randn(gen, batch, m, n)
        i = int(torch.randint(m, (1,), generator=gen))
        j = int(torch.randint(n, (1,), generator=gen))
        G[:, i, j] = 1e6
    else:  # random, row, column, tall
        G = randn(gen, batch, m, n)
    return G.to(dtype)


# -- strategies --------------------------------------------------------------------------


@st.composite
def matrices(draw, m: int | None = None, n: int | None = None, batch: int | None = None, dtype=torch.float64):
    """A Gaussian ``b m n`` batch built from a drawn seed."""
    m = draw(dims()) if m is None else m
    n = draw(dims()) if n is None else n
    b = draw(st.integers(1, 3)) if batch is None else batch
    return randn(generator(draw(SEEDS)), b, m, n, dtype=dtype)


@st.composite
def spd(draw, n: int | None = None, cond: float = 1e6, batch: int = 1, dtype=torch.float64):
    """``Q diag(λ) Qᵀ`` with ``λ = 10**u``, ``u`` drawn in ``[-3, 3]`` and spread ≤ ``log10(cond)``."""
    n = draw(dims()) if n is None else n
    span = min(6.0, float(torch.log10(torch.tensor(cond))))
    lo = draw(exponents(-3.0, 3.0 - span))
    u = draw(st.lists(exponents(lo, lo + span), min_size=batch * n, max_size=batch * n))
    lam = 10.0 ** torch.tensor(u, dtype=torch.float64).reshape(batch, n)
    return spd_from(orthonormal(generator(draw(SEEDS)), batch, n), lam).to(dtype)


@st.composite
def psd_rank_deficient(draw, n: int | None = None, batch: int = 1, dtype=torch.float64):
    """A PSD ``n × n`` batch of rank ``< n`` (``n ≥ 2``)."""
    n = draw(dims(2)) if n is None else n
    rank = draw(st.integers(0, n - 1))
    return psd_rank_deficient_matrix(generator(draw(SEEDS)), batch, n, rank, dtype)


@st.composite
def gradients(draw, families: tuple[str, ...] = GRADIENT_FAMILIES, batch: int = 2, dtype=torch.float64):
    """``(family, G)`` with ``G`` of one of the gradient families."""
    family = draw(st.sampled_from(families))
    return family, gradient(family, generator(draw(SEEDS)), batch, dtype)


# -- composition configs (tests/composition) ---------------------------------------------

#: strategies for the options of any stage that has them, by (slot, option); other options keep their defaults
_UNIT = st.floats(0.0, 0.999, allow_nan=False, allow_subnormal=False)
STAGE_OPTIONS: dict[tuple[str, str], st.SearchStrategy] = {
    ("factors", "beta"): _UNIT,
    ("inner", "betas"): st.tuples(_UNIT, _UNIT).map(list),
    ("inner", "momentum"): _UNIT,
    ("inner", "eps"): exponents(-12.0, -3.0).map(lambda u: 10.0**u),
}


@st.composite
def composition_configs(draw, combos: list[tuple[str, ...]], base) -> dict:
    """A config dict: one of ``combos`` (factors, basis, inner, split keys) with drawn options.

    ``base(combo, **top)`` makes the dict with every stage at its defaults; the
    options of :data:`STAGE_OPTIONS` a stage has are drawn in their valid ranges,
    as are ``lr`` ∈ [1e-5, 1], ``weight_decay`` ∈ [0, 0.1] and ``refresh.every`` ∈ [1, 5].
    The combination may be refused by ``from_dict``: callers ``assume()`` it builds.
    """
    import attrs

    from kronopt.registry import SLOTS

    combo = draw(st.sampled_from(combos))
    raw = base(
        combo,
        every=draw(st.integers(1, 5)),
        lr=10.0 ** draw(exponents(-5.0, 0.0)),
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])),
    )
    for slot, key in zip(("factors", "basis", "inner", "split"), combo):
        for f in attrs.fields(SLOTS[slot].get(key)):
            strategy = STAGE_OPTIONS.get((slot, f.alias))
            if strategy is not None:
                raw[slot][f.alias] = draw(strategy)
    return raw
