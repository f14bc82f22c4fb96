"""Property tests of the invariants of DESIGN.md for every registered stage (plugins included), with options drawn
from the registries: hypothesis draws the combination, every stage option, the block's shape and layout (full, one
side not rotated, restricted) and the gradient sequence (zero, rank-one, badly scaled, 1e-30, 1e30); every tensor
comes from a seeded generator. Each property is checked by an independent computation: ``eigvalsh`` of the factors,
``QᵀQ``, the moment read back in the original coordinates, a second run (a block alone, a permuted basis, a resumed
optimizer), ``tomllib``, ``torch.optim``.

Coverage before this file (hypothesis unless marked "fixed"), and what this file adds (→):

================  ==========================================================  ===============================================
invariant         already covered                                             → here
================  ==========================================================  ===============================================
factors sym. PSD  ema: test_factors (full sides, Gaussian G); kl:            every estimator × every option × full, one-sided
                  test_kl_factors (defaults, full + restricted);             and restricted layouts × zero/rank-one/badly
                  projector_splitting: test_projector_splitting (the         scaled/1e±30 gradients, after every call;
                  integrator alone); contract (exact symmetry, fixed G);     restricted S and μ ≥ 0 for ema and
                  fuzz (full sides, approximate, end of run)                 projector_splitting (untested as properties)
bases orthonormal eigh, qr: test_bases (unit); fuzz (end of run); contract    eigh/qr (power_steps, sort) after every refresh,
                  (restricted U, fixed)                                       float32 and float64, with every estimator,
                                                                              restricted U, degenerate factors
basis change      adam: test_inner_rules (permuted/sign-flipped basis);      every rule exposing a moment across real
                  adam_rank1: test_adam_rank1 (permutation); eigenvalue      eigh/qr/restricted refreshes; a permuted,
                  eigen/subspace: test_eigen_momentum, test_subspace_         sign-flipped refresh for every combination
                  momentum (fixed runs); kl roots: test_kl_factors (fixed)   (orthogonalize, sgd, sign_momentum, kl, split)
batching          contract (each stage in the soap preset, 4 × 4, fixed)     random compositions, options, shapes, restricted
                                                                              layouts; a bug on degenerate factors (xfail)
round trips       fuzz (state_dict; betas/eps/momentum options only);        every option of every stage and table, floats
                  test_state_dict (presets); test_config_round_trip_         anywhere in range: dicts, TOML text, types;
                  differential (presets, files, chosen overrides); contract  from_state_dict resume bit for bit; invalid
                  (each stage's defaults through TOML)                        options listed with their paths
reductions        test_torch_reductions (fixed hyperparameters)              AdamW and Muon over their hyperparameters
================  ==========================================================  ===============================================
"""

import contextlib
import io
import os
import platform
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, config, linalg
from kronopt.registry import SLOTS
from kronopt.types import BasisChange, Layout, capabilities
from tests.composition._support import COMBO_SLOTS, combinations, config_dict, snapshot, snapshot_diff
from tests.composition._support import leaves as _leaves
from tests.strategies import SEEDS, generator

F64 = torch.float64
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
#: each property's budget: about a second on a loaded core (the profile's other settings, derandomisation in CI, are kept)
PROPS = settings(max_examples=100, deadline=None)

# -- stage options drawn from the registries ----------------------------------------------------------

#: options whose valid values a generic draw would rarely hit
SPECIAL: dict[str, st.SearchStrategy] = {
    "custom_coefficients": st.sampled_from([(), ((3.4445, -4.775, 2.0315),), ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5))]),
    "rank": st.one_of(st.integers(0, 4), st.floats(0.0, 1.0), st.floats(0.3, 0.8)),  # small blocks: r ≥ 1 often
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999)),
    "graft_betas": st.tuples(st.one_of(st.just("momentum"), st.floats(0.0, 0.99)), st.floats(0.0, 0.999)),
    "beta": st.one_of(st.just("beta2"), st.just(0.0), st.floats(1e-4, 0.999)),
    "exponent": st.sampled_from([-0.25, -0.5, -1.0, -0.125]),
    "fallback_names": st.lists(st.sampled_from(["^embed", "head$", "wte", r"\.bias$", "a{2}", "é"]), max_size=3, unique=True),
}

#: any finite float, int or text: the values a config file may hold (each kept only where its option accepts it)
WIDE_FLOAT = st.floats(allow_nan=False, allow_infinity=False)


def _field_ok(cls: type, alias: str, value) -> bool:
    """Whether the option alone accepts ``value`` (its converter and validators; cross-option checks come later)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config._check_field(cls, alias, value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _choices(cls: type, alias: str) -> list[str] | None:
    """The string values an option accepts, read off its validator's message (``must be one of 'a', 'b'``)."""
    try:
        config._check_field(cls, alias, "\x00 not an option")
    except (ValueError, TypeError) as err:
        text = str(err)
        if "one of" in text:
            return re.findall(r"'([^'\x00]*)'", text.split("one of", 1)[1].split(", got")[0])
    return None


def _value_strategy(cls: type, field: attrs.Attribute, wide: bool) -> st.SearchStrategy:
    default = field.default
    if field.alias in SPECIAL:
        return SPECIAL[field.alias]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-1, 10**6) if wide else st.integers(0, max(6, 2 * default))
    if isinstance(default, float):
        unit = st.one_of(st.just(0.0), st.floats(1e-4, 0.999))  # no subnormal settings (1e-320 → λ^{-1/2} = inf)
        if wide:
            return st.one_of(unit, WIDE_FLOAT)
        if default == 0.0:
            return unit
        return st.one_of(unit, st.floats(-1.0, 1.0).map(lambda u, d=default: d * 10.0**u))
    if isinstance(default, str):
        options = _choices(cls, field.alias)
        return st.sampled_from(options) if options else st.just(default)
    return st.just(default)


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


@st.composite
def options(draw, cls: type, wide: bool = False, skip: tuple[str, ...] = ()) -> dict:
    """Each option of a stage or record class: a drawn value where the option alone accepts it, else left out."""
    out = {}
    for f in attrs.fields(cls):
        if not f.init or f.alias in skip or f.default in (None, attrs.NOTHING) or isinstance(f.default, attrs.Factory):
            continue
        value = draw(_value_strategy(cls, f, wide))
        if _field_ok(cls, f.alias, value):
            out[f.alias] = _plain(value)
    return out


# -- pipelines: a combination of registered stages with drawn options, on one bucket --------------------


def _restricts(combo) -> bool:
    return capabilities(SLOTS["split"].get(combo[3])).restricts


def _builds(combo) -> bool:
    raw = config_dict(combo, state_dtype="float64")
    raw["refresh"]["at_first_call"] = raw["skip_first_call"] = _restricts(combo)
    try:
        kronopt.from_dict(raw)
    except kronopt.ConfigError:
        return False
    return True


#: every registered (factors, basis, inner, split) that builds with its stages' defaults, plugins included
VALID_COMBOS = [c for c in combinations() if _builds(c)]


@attrs.frozen
class Case:
    cfg: kronopt.KronConfig
    layout: Layout
    raw: dict


@st.composite
def pipelines(
    draw, *, factors=None, basis=None, inner=None, split=None, rotated=None, batch=(1, 3), dims=(1, 6), square=False,
    eps_floor: float = 0.0,
):
    """A bound config of one drawn combination (each ``slot`` argument: a predicate on the stage class, or None
    for any), every stage option drawn, a short refresh period; and a layout for a drawn ``m × n`` block.
    ``eps_floor``: the least ``eps`` of a stage (``eps = 0`` makes Adam the sign of an entry that is 0 but for
    rounding, and an eigenvalue power of a vanished eigenvalue infinite: no comparison of two roundings holds)."""
    wants = {"factors": factors, "basis": basis, "inner": inner, "split": split}
    combos = [c for c in VALID_COMBOS if all(w is None or w(SLOTS[s].get(k)) for s, k, w in zip(COMBO_SLOTS, c, wants.values()))]
    # every inner rule as often as the others (the one slot with many stages), then a third of the draws on the
    # few combinations with a restricted side, where there are some
    rule = draw(st.sampled_from(sorted({c[2] for c in combos})))
    combos = [c for c in combos if c[2] == rule]
    restricting = [c for c in combos if _restricts(c)]
    plain = [c for c in combos if not _restricts(c)]
    combo = draw(st.sampled_from(restricting if restricting and (not plain or draw(st.integers(0, 2)) == 0) else plain))
    raw = config_dict(combo, every=draw(st.integers(1, 3)), state_dtype="float64")
    if _restricts(combo):  # a restricted side's first subspace is built on the first call (validated)
        raw["refresh"]["at_first_call"] = raw["skip_first_call"] = True
    else:
        raw["refresh"]["at_first_call"] = draw(st.booleans())
        raw["skip_first_call"] = draw(st.booleans())
    raw["factor_update"] = draw(st.sampled_from(["after", "before"]))
    for slot, key in zip(COMBO_SLOTS, combo):
        raw[slot].update(draw(options(SLOTS[slot].get(key))))
        if raw[slot].get("eps", eps_floor) < eps_floor:
            raw[slot]["eps"] = eps_floor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = kronopt.from_dict(raw).bound()
    except kronopt.ConfigError:
        assume(False)
    m = draw(st.integers(*dims))
    n = m if square and draw(st.booleans()) else draw(st.integers(*dims))  # square: full-rank factors from one G
    sides = draw(st.sampled_from([(True, True)] * 3 + [(True, False), (False, True)])) if rotated is None else rotated
    (kl, rl), (kr, rr) = cfg.split.sides(m, n, sides)
    layout = Layout(batch=draw(st.integers(*batch)), m=m, n=n, left=kl, right=kr, rank_left=rl, rank_right=rr)
    event(f"{combo[0]}+{combo[2]}, sides {layout.left}/{layout.right}")
    return Case(cfg, layout, raw)


def init(case: Case, dtype=F64):
    try:
        return compose.init_state(case.cfg, case.layout, dtype=dtype, device=CPU)
    except ValueError:  # a layout a stage refuses when built (e.g. two restricted sides)
        assume(False)


#: per call: how the gradient is made
KINDS = ("gauss", "zero", "low_rank", "badly_scaled", "tiny", "huge")


def gradient(kind: str, gen: torch.Generator, b: int, m: int, n: int, dtype=F64) -> torch.Tensor:
    G = torch.randn(b, m, n, generator=gen, dtype=F64)
    if kind == "zero":
        G = torch.zeros_like(G)
    elif kind == "low_rank":  # rank 1 (or 0 on a 1-wide block, where rank-deficient means zero)
        G = torch.randn(b, m, 1, generator=gen, dtype=F64) @ torch.randn(b, 1, n, generator=gen, dtype=F64)
        if min(m, n) == 1:
            G = torch.zeros_like(G)
    elif kind == "badly_scaled":  # rows and columns on scales 1e-6 .. 1e6
        rows = 10.0 ** (12 * torch.rand(b, m, 1, generator=gen, dtype=F64) - 6)
        cols = 10.0 ** (12 * torch.rand(b, 1, n, generator=gen, dtype=F64) - 6)
        G = rows * G * cols
    elif kind == "tiny":
        G = G * 1e-30
    elif kind == "huge":
        G = G * 1e30
    return G.to(dtype)


PLANS = st.lists(st.sampled_from(KINDS), min_size=3, max_size=6)


# -- 5. factors stay symmetric PSD --------------------------------------------------------------------

PSD_REL = 1e-10


#: a factor whose Gram products round their results to bfloat16 (``product_dtype``): each increment ``P`` moves by
#: ``E`` with ``‖E‖₂ ≤ ‖E‖_F ≤ 2⁻⁸ ‖P‖_F ≤ 2⁻⁸ tr P`` (P PSD), so the factor's smallest eigenvalue is at least −2⁻⁸ of
#: its increments' weighted traces, about its own: checked at twice that, against the sum of its |λ|
PSD_NARROW_REL = 2.0**-7


def _check_psd(name: str, A: torch.Tensor, where: str, floor: torch.Tensor | None = None, narrow: bool = False) -> None:
    """``A`` exactly symmetric with smallest eigenvalue ≥ −1e-10 × the largest magnitude (or ``floor``, the
    flat eigenvalue that completes a restricted side's factor ``U S Uᵀ + μ P⊥``, where that is larger); with
    ``narrow`` (bfloat16 Gram products) ≥ −2⁻⁷ × the sum of the eigenvalues' magnitudes."""
    assert torch.isfinite(A).all(), f"{where}: {name} not finite"
    assert torch.equal(A, A.mT), f"{where}: {name} not exactly symmetric (max |A - Aᵀ| = {(A - A.mT).abs().max():.3e})"
    lam = torch.linalg.eigvalsh(A)
    top = lam.abs().sum(-1) if narrow else lam.abs().amax(-1)
    if floor is not None:
        top = torch.maximum(top, floor)
    worst = (lam.amin(-1) / top.clamp(min=torch.finfo(F64).tiny)).min().item()
    bound = PSD_NARROW_REL if narrow else PSD_REL
    assert worst >= -bound, f"{where}: {name} not PSD: min λ / {'Σ' if narrow else 'max'} |λ| = {worst:.3e}"


def _check_factor_invariants(case: Case, state, where: str) -> None:
    """Full-side factors exactly symmetric and PSD; a restricted side's subspace block ``S`` exactly symmetric
    and PSD and its flat eigenvalue ``μ ≥ 0`` (so ``U S Uᵀ + μ P⊥`` is PSD); tracked eigenvalues ``≥ 0``."""
    cfg, layout, f = case.cfg, case.layout, state.factors
    full = cfg.factors.factors(f)
    narrow = getattr(cfg.factors, "product_dtype", "compute") != "compute"  # a full side's Gram products rounded
    for i, (side, kind) in enumerate((("left", layout.left), ("right", layout.right))):
        if kind == "full":
            X = full[i]
            assert X is not None and X.shape[-1] == X.shape[-2], f"{where}: {side} factor missing"
            _check_psd(f"{side} factor", X, where, narrow=narrow)
        elif kind == "restricted":
            mu = cfg.factors.flat_eigvals(f)[i]
            assert torch.isfinite(mu).all() and (mu >= 0).all(), f"{where}: {side} flat eigenvalue {mu.tolist()}"
            S = getattr(f, "sub_L" if side == "left" else "sub_R")  # the built-in estimators' name for it
            if S.shape[-1]:
                _check_psd(f"{side} subspace factor S", S, where, floor=mu)
    if capabilities(cfg.factors).provides_eigvals:
        for lam in cfg.factors.eigvals(f):
            if lam is not None:
                assert not torch.isnan(lam).any() and (lam >= 0).all(), f"{where}: tracked eigenvalues {lam.tolist()}"


@PROPS
@given(case=pipelines(factors=lambda c: capabilities(c).provides_factors), plan=PLANS, seed=SEEDS)
def test_every_estimators_factors_stay_exactly_symmetric_psd(case, plan, seed):
    """Every factor estimator (every option drawn), every layout (full, one side not rotated, restricted), on
    gradient sequences with zero, rank-one, badly scaled (rows and columns on 1e-6 .. 1e6), 1e-30 and 1e30
    gradients, in float64: after every call each full factor is exactly symmetric with smallest eigenvalue
    ≥ −1e-10 × the largest (``torch.linalg.eigvalsh``; under ``product_dtype = "bfloat16"``, whose rounded
    increments are PSD only up to their rounding, ≥ −2⁻⁷ × the eigenvalues' magnitudes summed), each restricted
    side's ``S`` likewise and ``μ ≥ 0``."""
    assume(not _kl_unclamped_flat(case))
    # a bfloat16 Gram product has float32's range: the 1e30 gradients' (1e60) overflow it, as a float32 run's do,
    # and so does KL's operand G Q_R diag(s_R) where unclamped roots s grow past 1e19; the optimizer's guard skips
    # such a block (tests/unit/test_product_dtype.py)
    if getattr(case.cfg.factors, "product_dtype", "compute") != "compute":
        assume("huge" not in plan and getattr(case.cfg.factors, "clamping", True))
    state = init(case)
    gen = generator(seed)
    b, m, n = case.layout.batch, case.layout.m, case.layout.n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call, kind in enumerate(plan):
            _, state = compose.step(case.cfg, case.layout, state, gradient(kind, gen, b, m, n))
            _check_factor_invariants(case, state, f"call {call} ({kind}, {_describe(case)})")


def _kl_unclamped_flat(case: Case) -> bool:
    """``kl`` with ``beta = 0`` and no clamping on a restricted side: a zero gradient takes every estimate to 0 and
    floors μ at the dtype's smallest normal number (pro_kl_shampoo.md §7: "floored at a small positive value"), so
    the next factor update overflows; the optimizer's guard skips the block (and KL with ``beta = 0`` is stuck at
    s = 0 after a zero gradient on full sides too, kl_shampoo.md §12: by the spec, not checked here)."""
    f = case.cfg.factors
    return getattr(f, "clamping", True) is False and f.beta == 0.0 and "restricted" in case.layout.sides


def _describe(case: Case) -> str:
    r = case.raw
    opts = {s: {k: v for k, v in r[s].items() if k != "type"} for s in COMBO_SLOTS}
    return f"{[r[s]['type'] for s in COMBO_SLOTS]} {opts} layout={case.layout}"


# -- 5. bases stay orthonormal ------------------------------------------------------------------------

ORTHO_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _check_orthonormal(basis, layout: Layout, dtype, where: str) -> None:
    for side, Q, kind, d, r in (
        ("left", basis.Q_L, layout.left, layout.m, layout.rank_left),
        ("right", basis.Q_R, layout.right, layout.n, layout.rank_right),
    ):
        if Q is None:
            continue
        cols = r if kind == "restricted" else d
        assert Q.shape == (layout.batch, d, cols), f"{where}: {side} basis of shape {tuple(Q.shape)}"
        assert torch.isfinite(Q).all(), f"{where}: {side} basis not finite"
        Q = Q.to(F64)
        err = (Q.mT @ Q - torch.eye(cols, dtype=F64)).abs().max().item() if cols else 0.0
        assert err <= ORTHO_ATOL[dtype], f"{where}: {side} ({kind}) basis not orthonormal: max |QᵀQ − I| = {err:.3e}"


@PROPS
@given(
    case=pipelines(basis=lambda c: True), plan=PLANS, seed=SEEDS, dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_every_basis_stays_orthonormal_after_every_refresh(case, plan, seed, dtype):
    """Every basis stage (every option drawn) with every estimator it builds with, on full, one-sided and
    restricted layouts (a restricted side: ``U`` with ``r`` orthonormal columns), on the gradient sequences of
    the test above: after every call that refreshed, ``QᵀQ = I`` to 1e-10 in float64, 2e-5 in float32.
    (float32 leaves out the 1e30 gradients, whose Gram products overflow: the optimizer skips those.)"""
    if dtype == torch.float32:
        plan = [k if k != "huge" else "gauss" for k in plan]
    state = init(case, dtype)
    gen = generator(seed)
    b, m, n = case.layout.batch, case.layout.m, case.layout.n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call, kind in enumerate(plan):
            before = state.basis.refreshes
            _, state = compose.step(case.cfg, case.layout, state, gradient(kind, gen, b, m, n, dtype))
            if state.basis.refreshes != before:
                _check_orthonormal(state.basis, case.layout, dtype, f"call {call} ({kind}, {_describe(case)})")


# -- 3. a basis change is an event --------------------------------------------------------------------


def _run_plain(case: Case, state, gen, calls: int):
    b, m, n = case.layout.batch, case.layout.m, case.layout.n
    for _ in range(calls):
        _, state = compose.step(case.cfg, case.layout, state, gradient("gauss", gen, b, m, n))
    return state


def _follow(cfg, state, change):
    """Every stage that keeps state in the basis told of ``change`` (as ``compose._observe`` does)."""
    inner = cfg.inner.on_basis_change(state.inner, change)
    split = cfg.split.on_basis_change(state.split, change) if capabilities(cfg.split).follows_basis else state.split
    factors = cfg.factors.on_basis_change(state.factors, change) if capabilities(cfg.factors).follows_basis else state.factors
    return attrs.evolve(state, basis=change.new, inner=inner, split=split, factors=factors)


@settings(PROPS, max_examples=2 * PROPS.max_examples)  # cheap, and each rule's forms of its moment are many
@given(
    case=pipelines(basis=lambda c: capabilities(c).needs_factors, inner=lambda c: capabilities(c).exposes_moment),
    calls=st.integers(1, 5), seed=SEEDS,
)
def test_a_refresh_carries_every_first_moment_to_the_new_basis(case, calls, seed):
    """Every inner rule that exposes its first moment (``moment()``: in the original coordinates), every
    refresh of every basis stage (eigh; qr with its column permutation; a restricted side's new subspace),
    after the factors took one more gradient: the moment read in the new basis after ``on_basis_change`` is
    the moment read in the old basis before it, to float64 rounding (1e-10 of its size). A moment left in the
    old basis, rotated one way too many, permuted against its columns, or split against the old subspace
    moves it by 1e-2 .. O(1)."""
    _check_moment_carried(case, calls, seed)


@settings(PROPS, max_examples=2 * PROPS.max_examples)
@given(
    case=pipelines(
        basis=lambda c: capabilities(c).needs_factors, inner=lambda c: capabilities(c).exposes_moment,
        split=lambda c: capabilities(c).restricts, dims=(2, 6),
    ),
    calls=st.integers(1, 5), seed=SEEDS,
)
def test_a_refresh_carries_every_first_moment_to_a_new_subspace(case, calls, seed):
    """The property above on layouts with a restricted side only (adam's whole moment; the eigenvalue rule's
    momentum whole or split against the subspace, ``momentum_basis = "subspace"``, re-split at the refresh)."""
    _check_moment_carried(case, calls, seed)


def _check_moment_carried(case, calls, seed):
    state = init(case)
    gen = generator(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _run_plain(case, state, gen, calls)
        cfg, layout, t = case.cfg, case.layout, state.step
        assume(t >= 1)  # moment() is read within an update (t ≥ 1): its bias correction divides by 1 − β^t
        ctx = compose.context(cfg, layout, state, t)
        before = cfg.inner.moment(state.inner, ctx)
        # the factors take one more gradient first (as compose._observe does), so the refresh moves the basis
        G = gradient("gauss", gen, layout.batch, layout.m, layout.n)
        state = attrs.evolve(state, factors=cfg.factors.update(state.factors, G, ctx))
        _, change = cfg.basis.refresh(state.basis, cfg.factors.factors(state.factors), ctx)
        moved = _follow(cfg, state, change)
        after = cfg.inner.moment(moved.inner, compose.context(cfg, layout, moved, t))
    scale = before.abs().max().clamp(min=1e-300)
    err = ((after - before).abs().max() / scale).item()
    assert err <= 1e-10, f"the moment moved by {err:.3e} of its size across the refresh ({_describe(case)})"


def _permuted_side(Q, lam, gen):
    """``Q`` with its columns permuted and sign-flipped per block (``lam`` permuted alike) and the permutation."""
    if Q is None:
        return None, lam, None
    b, cols = Q.shape[0], Q.shape[-1]
    perm = torch.stack([torch.randperm(cols, generator=gen) for _ in range(b)])
    signs = torch.where(torch.rand(b, 1, cols, generator=gen) < 0.5, -1.0, 1.0).to(Q.dtype)
    Q_new = torch.gather(Q, -1, perm.unsqueeze(-2).expand_as(Q)) * signs
    return Q_new, None if lam is None else torch.gather(lam, -1, perm), perm


def _wide_ns(stage):
    """The stage with its Newton–Schulz arithmetic in float64 (bfloat16 rounding would not be equivariant)."""
    return attrs.evolve(stage, ns_dtype="float64") if hasattr(stage, "ns_dtype") else stage


@PROPS
@given(case=pipelines(basis=lambda c: capabilities(c).needs_factors, eps_floor=1e-8), calls=st.integers(1, 4), seed=SEEDS)
def test_refreshing_to_the_same_basis_with_permuted_columns_leaves_the_next_updates_unchanged(case, calls, seed):
    """DESIGN.md invariant 3, for every combination (every inner rule, plugin included; every estimator that
    follows the basis): after some steps, a refresh to the same basis with its columns permuted and their signs
    flipped (eigenvalue estimates permuted alike, the event carrying the permutation) leaves the next two
    directions unchanged (float64; Newton–Schulz run in float64; ``eps ≥ 1e-8``, see :func:`pipelines`)."""
    assume(not _flat_from_rounding(case))  # the bug of test_a_complement_energy_of_rounding_...
    cfg = attrs.evolve(case.cfg, inner=_wide_ns(case.cfg.inner), split=_wide_ns(case.cfg.split))
    case = attrs.evolve(case, cfg=cfg)
    state = init(case)
    gen = generator(seed)
    b, m, n = case.layout.batch, case.layout.m, case.layout.n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _run_plain(case, state, gen, calls)
        assume(state.basis.ready and (state.basis.Q_L is not None or state.basis.Q_R is not None))
        old = state.basis
        Q_L, lam_L, perm_L = _permuted_side(old.Q_L, old.lam_L, gen)
        Q_R, lam_R, perm_R = _permuted_side(old.Q_R, old.lam_R, gen)
        new = attrs.evolve(old, Q_L=Q_L, Q_R=Q_R, lam_L=lam_L, lam_R=lam_R, refreshes=old.refreshes + 1)
        moved = _follow(cfg, state, BasisChange(old=old, new=new, perm_L=perm_L, perm_R=perm_R))
        quiet = attrs.evolve(cfg, refresh=attrs.evolve(cfg.refresh, every=10**6, offset=0))  # no refresh next
        for call in range(2):
            G = gradient("gauss", gen, b, m, n)
            D, state = compose.step(quiet, case.layout, state, G)
            E, moved = compose.step(quiet, case.layout, moved, G.clone())
            assume(torch.isfinite(D).all())  # eps = 0 on a vanishing eigenvalue: a non-finite step, skipped by the optimizer
            scale = D.abs().max().clamp(min=1e-300)
            err = ((E - D).abs().max() / scale).item()
            assert err <= 1e-9, f"call {call} after the permuted refresh: the direction moved by {err:.3e} ({_describe(case)})"


def _flat_from_rounding(case: Case) -> bool:
    """An ``ema`` or ``projector_splitting`` restricted side under the ``"whitened"`` complement: its flat eigenvalue
    starts at 0 and is a difference of energies (and a re-projection a difference of traces), counted as 0 below its
    rounding (``test_a_restricted_flat_eigenvalue_is_exactly_zero_until_the_complement_sees_energy``, the test
    below); just above it a small but real μ (projector splitting's start from a power solver of a few iterations,
    whose top vector lies a little outside the subspace the first call takes) weighs the complement by
    ``μ^{-1/2}``, and the permuted refresh's rounding moved the direction by 4.9e-6 of its size in a drawn example
    (``init_solver = "power"``, 6 iterations), beyond this test's 1e-9."""
    split = case.cfg.split
    return (
        type(case.cfg.factors).__name__ in ("EmaKronFactors", "ProjectorSplittingFactors")
        and getattr(split, "complement_scale", None) == "whitened"
        and "restricted" in case.layout.sides
    )


def _whitened_updates(preset, shape, dtype, seed, mult, calls=12):
    gen = generator(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64).to(dtype))
    updates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overrides = {"split.complement_scale": "whitened", "split.complement_mult": mult}
        opt = kronopt.build([p], preset, lr=1.0, weight_decay=0.0, **overrides)
        for _ in range(calls):
            p.grad = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
            before = p.detach().clone()
            opt.step()
            updates.append((p.detach() - before).double())
    return updates


@pytest.mark.parametrize("dtype,shape,seed", [(torch.float32, (64, 4), 1), (torch.float64, (40, 3), 0)], ids=["f32", "f64"])
def test_a_complement_energy_of_rounding_does_not_blow_up_the_whitened_complement(dtype, shape, seed, preset="pro_soap"):
    """pro_soap with lowrank_flat's default complement scale (``"whitened"``), so ``ema`` factors on a restricted
    side of rank r = 16 (10) ≥ the block's other side: the first gradient lies in the subspace the first call
    takes (its top r singular vectors), so the complement has seen no energy. Every update, complement included,
    keeps the size of an Adam step, RMS ≤ 2 × lr (it is 0.5 here with μ = 0: splits.py leaves the block out)."""
    for call, update in enumerate(_whitened_updates(preset, shape, dtype, seed, 1.0, calls=4), start=1):
        rms = update.square().mean().sqrt().item()
        assert rms <= 2.0, f"call {call}: the update has RMS {rms:.3e} × lr"


@pytest.mark.parametrize(
    "dtype,shape,seed",
    [(F64, (40, 3), 0), (F64, (40, 3), 6), (F64, (40, 3), 7), (F64, (3, 40), 37), (torch.float32, (40, 3), 38)],
    ids=["f64-0", "f64-6", "f64-7", "f64-wide-37", "f32-38"],
)
def test_the_whitened_complement_of_a_rank_one_other_side_stays_an_adam_step(dtype, shape, seed):
    """pro_dykaf with the "whitened" complement on a 40 × 3 block (and its transpose): DyKAF's rank-one start leaves
    the other (full) side's factor rank one at the first refresh, so until the next the basis's other eigenvalue
    estimates are of the size of rounding (2e-16 and 3e-18 of 1.54 at seed 6, of either sign). The norm takes the
    pseudo-inverse root there (linalg.whitened_complement_norm, ``solved``): every update keeps the size of an Adam
    step, RMS ≤ 2 × lr (it was 1e8 × lr at seeds 6 and 7 in float64, 1e4 at seed 38 in float32), and from the third
    call the complement block is there, RMS 0.05–0.5 × lr (an estimate of -2e-18 at seed 0 made the norm NaN and the
    block was left out). The gradients do not depend on the weights, so the runs at ``complement_mult`` 1 and 2 share
    their states and differ by the complement block at 1."""
    once = _whitened_updates("pro_dykaf", shape, dtype, seed, 1.0)
    twice = _whitened_updates("pro_dykaf", shape, dtype, seed, 2.0)
    for call, (a, b) in enumerate(zip(once, twice), start=1):
        rms = a.square().mean().sqrt().item()
        assert rms <= 2.0, f"call {call}: the update has RMS {rms:.3e} × lr"
        if call >= 3:
            block = (b - a).square().mean().sqrt().item()
            assert 0.05 <= block <= 0.5, f"call {call}: the complement block has RMS {block:.3e} × lr"


# -- 4. batching changes nothing ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 40), (40, 3)])
@pytest.mark.parametrize("seed", [0, 2, 4])
def test_a_pro_dykaf_bucket_equals_its_blocks_alone_when_a_restricted_refresh_sees_a_rank_deficient_factor(shape, seed):
    """pro_dykaf refreshing every 2 calls, float64: at its second refresh the 40-wide side's factor has rank about 6
    on its subspace of rank 10, so four Ritz values are rounding. A bucket of two blocks gives the second block the
    directions it gets alone, within 1e-10 of their size, every call (the solver's choice of the vanishing Ritz
    vectors, which MKL rounds by the stack's size, parted them by 4–29 % on this Intel processor before
    ``linalg.restricted_refresh`` took a basis of their span that does not depend on it)."""
    steps = 8
    gens = [generator(seed * 7 + i) for i in range(2)]
    streams = [[torch.randn(*shape, generator=g, dtype=F64) for _ in range(steps)] for g in gens]

    def updates(blocks):
        params = [torch.nn.Parameter(torch.zeros(*shape, dtype=F64)) for _ in range(blocks)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kronopt.build(params, "pro_dykaf", lr=1e-2, weight_decay=0.0, **{"refresh.every": 2})
            out = []
            for t in range(steps):
                for k, p in enumerate(params):
                    p.grad = streams[2 - blocks + k][t].clone()  # the last block always takes the second stream
                before = params[-1].detach().clone()
                opt.step()
                out.append(params[-1].detach() - before)
        return out

    for call, (a, b) in enumerate(zip(updates(2), updates(1)), start=1):
        err = ((a - b).norm() / b.norm().clamp(min=1e-300)).item()
        assert err <= 1e-10, f"call {call}: the block's direction in a bucket of two parted from alone by {err:.3e}"


@contextlib.contextmanager
def block_by_block_solvers():
    """``linalg._eigh`` and ``linalg._svd`` run on each block's own fresh copy. MKL's solvers round a matrix by
    its memory alignment inside the batch, so on a degenerate eigenspace (a rank-deficient factor) a bucket and a
    block alone get different, equally valid eigenvectors (test_a_bucket_equals_its_blocks_alone_when_a_refresh_...); with
    this the batching of kronopt's own code is tested, every block's solver call the same in both runs."""
    eigh, svd = linalg._eigh, linalg._svd

    def each(solver):
        def run(A):
            parts = [solver(A[i].clone()) for i in range(A.shape[0])]
            return tuple(torch.stack(out) for out in zip(*parts))

        return run

    linalg._eigh, linalg._svd = each(eigh), each(svd)
    try:
        yield
    finally:
        linalg._eigh, linalg._svd = eigh, svd


GAP = 1e-6


def _well_posed(cfg, layout: Layout, state, *, signs: bool = False) -> bool:
    """Whether every rotated side's factor has distinct eigenvalues (gaps above 1e-6 of the largest) and every
    restricted side's power product full column rank with a distinct subspace spectrum: else the next basis is
    only defined up to a rotation inside a degenerate eigenspace, which rounding picks. ``signs``: the inner rule
    takes the sign of the rotated momentum with no ``eps`` (``sign_momentum``), so a factor's eigenvalue within
    1e-6 of the largest of zero (the longer side of a non-square block after one gradient) makes it ill posed too:
    the momentum's part along that null direction is rounding, and its sign, ±1 either way, is the rounding's."""
    if not capabilities(cfg.factors).provides_factors:
        return True
    full = cfg.factors.factors(state.factors)
    for i, kind in enumerate(layout.sides):
        X = full[i]
        if kind == "none" or X is None or X.shape[-1] == 0:
            continue
        if kind == "restricted":
            sv = torch.linalg.svdvals(X)
            if (sv[..., -1] <= GAP * sv[..., 0]).any():
                return False
            S = getattr(state.factors, "sub_L" if i == 0 else "sub_R")
            X = S
        lam = torch.linalg.eigvalsh(X)
        top = lam.abs().amax(-1, keepdim=True)
        if X.shape[-1] > 1 and ((lam[..., 1:] - lam[..., :-1]) <= GAP * top).any():
            return False
        if (top <= 0).any():
            return False
        if signs and (lam.abs().amin(-1, keepdim=True) <= GAP * top).any():
            return False
    return True


@PROPS
@given(
    case=pipelines(batch=(2, 3), dims=(2, 6), square=True, eps_floor=1e-8),
    plan=st.lists(st.sampled_from([k for k in KINDS if k != "huge"]), min_size=3, max_size=6).map(lambda p: ["gauss", *p]),
    seed=SEEDS,
)
def test_a_bucket_of_random_composition_equals_its_blocks_run_alone(case, plan, seed):
    """Every combination (every option drawn; full, one-sided and restricted layouts of any ``m × n``): a bucket
    of ``b`` blocks gives, block by block, the direction each block gets in a bucket of its own, on every call
    of a gradient sequence with zero, rank-one, badly scaled and tiny gradients (float64, 1e-9 of the
    direction's size; Newton–Schulz in float64, the solvers block by block: see :func:`block_by_block_solvers`).
    Compared while the problem is well posed: from the first call whose factors have a degenerate spectrum (a
    rank-deficient factor, which any refresh turns into a basis that rounding picks) the runs may part; and with
    no call whose basis is fitted to that call's gradient alone (a factor retention below 0.5 with the update
    before the direction, or a 1e30 gradient after O(1) ones), which makes the rotated gradient diagonal up to
    rounding, whose sign an Adam-like rule (``eps ≥ 1e-8`` here) or ``sign_momentum`` would then take."""
    factors = case.cfg.factors
    if isinstance(getattr(factors, "beta", None), float) and factors.beta < 0.5:
        factors = attrs.evolve(factors, beta=0.5)
    cfg = attrs.evolve(case.cfg, factors=factors, inner=_wide_ns(case.cfg.inner), split=_wide_ns(case.cfg.split))
    case = attrs.evolve(case, cfg=cfg)
    layout = case.layout
    one = attrs.evolve(layout, batch=1)
    state = init(case)
    singles = [compose.init_state(cfg, one, dtype=F64, device=CPU) for _ in range(layout.batch)]
    gen = generator(seed)
    compared = 0
    with warnings.catch_warnings(), block_by_block_solvers():
        warnings.simplefilter("ignore")
        for call, kind in enumerate(plan):
            G = gradient(kind, gen, layout.batch, layout.m, layout.n)
            D, state = compose.step(cfg, layout, state, G)
            if not _well_posed(cfg, layout, state, signs=case.raw["inner"]["type"] == "sign_momentum"):
                break
            compared += 1
            for i in range(layout.batch):
                D_i, singles[i] = compose.step(cfg, one, singles[i], G[i : i + 1].clone())
                assert (D is None) == (D_i is None)
                if D is None:
                    continue
                # eps = 0 on a zero moment: 0/0 in both (the optimizer skips such a block), at the same entries
                ok = torch.isfinite(D[i])
                assert torch.equal(ok, torch.isfinite(D_i[0])), f"call {call}: block {i} non-finite elsewhere alone"
                a, c = D[i][ok], D_i[0][ok]
                if not a.numel():
                    continue
                err = ((a - c).abs().max() / a.abs().max().clamp(min=1e-300)).item()
                assert err <= 1e-9, f"call {call} ({kind}): block {i} differs from its run alone by {err:.3e} ({_describe(case)})"
    event(f"calls compared: {compared}")


def _trajectory_in_a_bucket_and_alone(preset: str, shape: tuple[int, int], steps: int = 6, **overrides):
    """The second of two same-shape parameters stepped together, and the same parameter stepped alone, float64."""
    gen = generator(0)
    W = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(2)]
    grads = [[torch.randn(shape, generator=gen, dtype=F64) for _ in range(2)] for _ in range(steps)]
    both = [torch.nn.Parameter(w.clone()) for w in W]
    alone = [torch.nn.Parameter(W[1].clone())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = {"refresh.every": 2, **overrides}
        pair, single = kronopt.build(both, preset, **settings), kronopt.build(alone, preset, **settings)
        for g in grads:
            both[0].grad, both[1].grad, alone[0].grad = g[0].clone(), g[1].clone(), g[1].clone()
            pair.step()
            single.step()
    return both[1].detach() - W[1], alone[0].detach() - W[1]


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the rounding that exposes it is MKL's")
@pytest.mark.xfail(
    strict=False,  # open; whether it shows depends on the processor's rounding (its sign, MKL's alignment)
    reason="BUG (open): a block's first refreshes see a rank-deficient factor (DyKAF's rank-1 start, the longer side of a "
    "2 × 5 block), whose eigenbasis is defined only up to a rotation of the null space; MKL's solvers and products "
    "round a block whose size in bytes is not a multiple of 64 by its memory alignment in the stack, so the block "
    "picks another basis in a bucket than alone and its steps "
    "differ by 1e-2 .. 0.4 of their size (invariant 4, and DDP work sharding vs one process). The fix, a canonical basis "
    "of a numerically degenerate eigenspace, is basis.null_space = 'canonical' (the test after the next), off by default for "
    "its cost in real training; a named MKL branch (MKL_CBWR=AVX2 on an AMD processor, at about the default's speed "
    "there; COMPATIBLE at 2.1–2.6 × its step) makes it hold too (the next test). "
    "Seen on AMD processors, whose MKL default code branch rounds such a block by its place; on an Intel Xeon with "
    "AMX (the fiftieth session) it passes, every preset stepping misaligned blocks in a bucket exactly as alone",
)
@pytest.mark.parametrize("preset", ["dykaf", "kl_shampoo"])
def test_a_bucket_equals_its_blocks_alone_when_a_refresh_sees_a_rank_deficient_factor(preset):
    """DESIGN.md invariant 4 ("a bucket of b blocks gives the same result as b separate runs, up to float
    rounding") on the presets' defaults, 2 × 5 parameters, 6 steps, a refresh every 2: the second parameter's
    displacement in a bucket of two against alone (with MKL_CBWR=AVX2 or COMPATIBLE: 0)."""
    moved, alone = _trajectory_in_a_bucket_and_alone(preset, (2, 5))
    err = ((moved - alone).norm() / alone.norm()).item()
    assert err <= 1e-10, f"{preset}: the bucket of two moved the parameter {err:.2e} (relative) away from its run alone"


#: the presets and shapes that part in a bucket of two from alone under MKL's default branch on an AMD processor (the
#: Zen 4 of the seventy-fourth session: each by 0.06 to 0.4 of its displacement after 12 steps)
_PARTED_ON_AMD = [("dykaf", (2, 5)), ("kl_shampoo", (2, 5)), ("soap", (13, 9)), ("dykaf", (9, 13)), ("kl_shampoo", (11, 5))]


@pytest.mark.skipif(
    not torch.backends.mkl.is_available() or platform.machine() not in ("x86_64", "AMD64"),
    reason="MKL_CBWR names MKL's x86 code branches",
)
def test_a_named_mkl_branch_makes_a_bucket_step_each_block_as_alone():
    """The workaround docs/architecture.md names for the bug above: with ``MKL_CBWR=AVX2`` in the environment MKL
    rounds a block alike wherever it lies, so every preset and shape of ``_PARTED_ON_AMD`` steps its second block in
    a bucket of two bit for bit as alone (12 steps, a refresh every 2), on any x86 processor with AVX2. Run in a
    process of its own: MKL reads the setting once. Would catch: the documented setting no longer holding (a
    kronopt path whose result depends on the stack in another way than MKL's rounding)."""
    code = (
        "from tests.unit.test_invariants_property import _PARTED_ON_AMD, _trajectory_in_a_bucket_and_alone\n"
        "for preset, shape in _PARTED_ON_AMD:\n"
        "    moved, alone = _trajectory_in_a_bucket_and_alone(preset, shape, steps=12)\n"
        "    print(preset, *shape, (moved - alone).abs().max().item())\n"
    )
    env = {**os.environ, "MKL_CBWR": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == len(_PARTED_ON_AMD)
    assert all(float(row[-1]) == 0.0 for row in rows), rows


@pytest.mark.parametrize("preset", ["dykaf", "kl_shampoo", "soap"])
def test_a_bucket_equals_its_blocks_alone_past_a_rank_deficient_refresh_under_the_canonical_null_space(preset):
    """The test above with ``basis.null_space = "canonical"``, which gives a null space one basis whatever the
    solver's rounding: it holds on every processor. A guard where the processor's rounding shows the bug (the AMD
    ones); on the Intel ones the default passes too, and tests/unit/test_null_space_bases.py simulates that
    rounding on any processor."""
    moved, alone = _trajectory_in_a_bucket_and_alone(preset, (2, 5), **{"basis.null_space": "canonical"})
    err = ((moved - alone).norm() / alone.norm()).item()
    assert err <= 1e-10, f"{preset}: the bucket of two moved the parameter {err:.2e} (relative) away from its run alone"


# -- 6. / 7. exact round trips --------------------------------------------------------------------------

#: the top-level scalars of a config (stages and records aside)
SCALARS = config._SCALARS


@st.composite
def config_dicts(draw, *, wide: bool, fallback: bool = True, top: bool = True) -> dict:
    """A config dict: a combination that builds, every option of its stages, of ``[refresh]``, ``[post]``,
    ``[shapes]``, ``[route]``, ``[storage]``, ``[distributed]`` and the top-level scalars drawn (``wide``: any
    finite float, any int), maybe a ``[fallback]`` drawn alike. Only values each option accepts alone are
    kept; the combination may still be refused (callers ``assume`` it builds)."""
    combo = draw(st.sampled_from(VALID_COMBOS))
    raw = config_dict(combo)
    for slot, key in zip((*COMBO_SLOTS, "refresh"), (*combo, "every")):
        raw[slot] = {"type": key, **draw(options(SLOTS[slot].get(key), wide))}
    for name, cls in config._records(top).items():
        raw[name] = draw(options(cls, wide))
    raw.update(draw(options(kronopt.KronConfig, wide, skip=("compile",))))
    if not top:
        raw.pop("distributed", None)
    # the cross-option rules (each tested elsewhere): offset < every, a skip limit only for a skipped step,
    # the beta2 tie only to a rule with betas, a restricted side's first call
    refresh = raw["refresh"]
    refresh["offset"] = refresh.get("offset", 0) % refresh.get("every", 10)
    if raw.get("nonfinite_scope") == "block":
        raw.pop("max_skipped_steps", None)
    if raw["factors"].get("beta") == "beta2" and not hasattr(SLOTS["inner"].get(combo[2]), "betas"):
        raw["factors"]["beta"] = 0.5
    if _restricts(combo):
        raw["skip_first_call"], raw["refresh"]["at_first_call"] = True, True
    if top and fallback and draw(st.booleans()):
        raw["fallback"] = draw(config_dicts(wide=wide, fallback=False, top=False))
    elif raw["route"].get("vectors") == "fallback" or raw["route"].get("fallback_names"):
        raw["route"] = {"vectors": "pipeline"}
    return raw


def _typed(value):
    """``value`` with every number tagged by its type (``1`` and ``1.0`` compare equal in Python, not in TOML)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def _built(raw):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kronopt.from_dict(raw)
    except kronopt.ConfigError:
        assume(False)


@PROPS
@given(raw=config_dicts(wide=True))
def test_random_valid_configs_round_trip_through_dicts_and_toml_text(raw):
    """Configs are data (invariant 7), for configs drawn over every registered stage's options (plugins included)
    and every table, floats anywhere in the finite range: ``from_dict(to_dict(c)) == c``; ``loads(dumps(c)) ==
    c`` with the same text written back; ``tomllib`` reads the text as ``to_dict(c)`` (types included); and
    every value given is the value the config holds (nothing dropped or converted on the way)."""
    cfg = _built(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = kronopt.to_dict(cfg)
        assert kronopt.from_dict(d) == cfg
        assert _typed(kronopt.to_dict(kronopt.from_dict(d))) == _typed(d)
        text = kronopt.dumps(cfg)
        back = kronopt.loads(text)
    assert back == cfg
    assert kronopt.dumps(back) == text
    assert _typed(tomllib.loads(text)) == _typed(_omit_none(d))
    held = _typed(d)
    for path, value in _leaves(_typed(raw)).items():
        assert _leaves(held).get(path) == value, f"{path}: given {value}, the config holds {_leaves(held).get(path)}"


def _omit_none(d):
    return {k: _omit_none(v) for k, v in d.items() if v is not None} if isinstance(d, dict) else d




#: parameters of every kind the shape policy and the route see: two blocks of one bucket, a conv kernel, a name
#: the routed configs send to their fallback, a vector
NAMED_SHAPES = {"w0": (4, 3), "w1": (4, 3), "conv": (3, 2, 2, 2), "embed.weight": (5, 3), "bias": (3,)}


def _named(seed: int, dtype=torch.float32):
    gen = generator(seed)
    return [(k, torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(dtype))) for k, s in NAMED_SHAPES.items()]


def _step(opt, named, gen):
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
    opt.step()


@settings(PROPS, max_examples=max(5, PROPS.max_examples // 3))
@given(raw=config_dicts(wide=False), calls=st.integers(1, 4), seed=SEEDS)
def test_random_configs_resume_bit_for_bit_from_a_saved_state_dict(raw, calls, seed):
    """Invariant 6 for configs drawn over every stage option and every table ([storage] dtypes, staggered
    refreshes, grafting, a [fallback] with its route, float32 or float64 state, ...): ``state_dict()`` through
    ``torch.save``/``torch.load(weights_only=True)`` into ``kronopt.from_state_dict`` on copies of the
    parameters, then two more steps on both: every parameter and every ``opt.state`` entry bit for bit."""
    cfg = _built(raw)
    try:
        _resume(cfg, raw, calls, seed)
    except FloatingPointError:  # nonfinite = "raise" on an overflow (eps = 0 on a vanishing eigenvalue): as documented
        assume(False)


def _resume(cfg, raw, calls, seed):
    named = _named(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = kronopt.build(named, cfg)
        except (ValueError, kronopt.ConfigError):  # a layout a stage refuses when built (named by the error)
            assume(False)
        gen = generator(seed + 1)
        for _ in range(calls):
            _step(opt, named, gen)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        twins = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in named]
        twin = kronopt.from_state_dict(twins, torch.load(buf, weights_only=True))
        for _ in range(2):
            state = gen.get_state()
            _step(opt, named, gen)
            gen.set_state(state)
            _step(twin, twins, gen)
    params = [p for _, p in named]
    diff = snapshot_diff(snapshot(opt, params), snapshot(twin, [p for _, p in twins]))
    assert not diff, f"after from_state_dict, two more steps differ: {diff} ({_describe_raw(raw)})"


def _describe_raw(raw) -> str:
    return " ".join(f"{k}={v}" for k, v in raw.items())


# -- 1. the reductions to torch.optim, over their hyperparameters -------------------------------------------

SHAPE = st.one_of(
    st.just(()), st.tuples(st.integers(1, 5)), st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 2), st.just(2), st.just(2)),
)


def _scaled_gradients(params, gen, scale: int):
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 10.0**scale for p in params]


@PROPS
@given(
    shapes=st.lists(SHAPE, min_size=1, max_size=3), betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
    eps=st.floats(-12, -3).map(lambda u: 10.0**u), lr=st.floats(-5, 0).map(lambda u: 10.0**u),
    wd=st.sampled_from([0.0, 1e-3, 0.1, 0.5]), scales=st.lists(st.sampled_from([-10, -3, 0, 0, 3, 10, None]), min_size=1, max_size=8),
    seed=SEEDS,
)
def test_identity_adam_is_torch_adamw_for_any_hyperparameters(shapes, betas, eps, lr, wd, scales, seed):
    """Invariant 1's reduction, over AdamW's hyperparameters, parameter kinds (0-D, 1-D, 2-D, conv) and
    gradient scales (1e-10 .. 1e10, zero): the ``adamw`` preset equals ``torch.optim.AdamW`` in float64 to 1e-12."""
    gen = generator(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = kronopt.build(a, "adamw", lr=lr, weight_decay=wd, **{"inner.betas": list(betas), "inner.eps": eps})
    ref = torch.optim.AdamW(b, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    for scale in scales:
        grads = _scaled_gradients(a, gen, 0) if scale is None else _scaled_gradients(a, gen, scale)
        if scale is None:
            grads = [torch.zeros_like(g) for g in grads]
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


@settings(PROPS, max_examples=max(5, PROPS.max_examples // 3))
@given(
    shapes=st.lists(st.tuples(st.integers(2, 12), st.integers(2, 12)), min_size=1, max_size=3),
    momentum=st.floats(0.0, 0.99), nesterov=st.booleans(), lr=st.floats(-4, -1).map(lambda u: 10.0**u),
    wd=st.sampled_from([0.0, 0.1]), adjust=st.sampled_from(["original", "match_rms_adamw"]), ns_steps=st.integers(1, 6),
    seed=SEEDS,
)
def test_muon_is_torch_muon_for_any_hyperparameters(shapes, momentum, nesterov, lr, wd, adjust, ns_steps, seed):
    """Invariant 1's Muon reduction over momentum, Nesterov, step size, decay, the scale rule, the number of
    Newton–Schulz steps and matrix shapes: the ``muon`` preset equals ``torch.optim.Muon`` (float32, bfloat16
    iteration), over 10 steps: the displacement of each parameter to 1e-2 of its size (both iterate in bfloat16,
    rounded where each implementation rounds: 2⁻⁸ per entry; a wrong coefficient, scale or momentum is O(1))."""
    gen = generator(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in a]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = kronopt.build(
        a, "muon", lr=lr, weight_decay=wd,
        **{"inner.scale": adjust, "inner.nesterov": nesterov, "inner.momentum": momentum, "inner.steps": ns_steps},
    )
    ref = torch.optim.Muon(b, lr=lr, weight_decay=wd, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust, ns_steps=ns_steps)
    for _ in range(10):
        for pa, pb, g in zip(a, b, _scaled_gradients(a, gen, 0)):
            pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for pa, pb, p0 in zip(a, b, start):
        moved, want = (pa - p0).detach(), (pb - p0).detach()
        err = ((moved - want).norm() / want.norm()).item()
        assert err <= 1e-2, f"the displacement differs from torch.optim.Muon's by {err:.2e} of its size"


#: values to put where an option does not accept them (each used only where the option alone refuses it)
BAD_VALUES = ("not an option", -1, -0.5, 1.5, 10**400, float("nan"), float("inf"), True, [], [0.5], {"x": 1}, 3)


def _option_paths(raw, prefix=""):
    """``(dotted path, class, option)`` of every option set in a config dict (stage ``type`` keys aside)."""
    out = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key in COMBO_SLOTS + ("refresh",):
            cls = SLOTS[key].get(value["type"])
            out += [(f"{path}.{k}", cls, k) for k in value if k != "type"]
        elif key in config._RECORDS:
            out += [(f"{path}.{k}", config._RECORDS[key], k) for k in value]
        elif key == "fallback":
            out += _option_paths(value, "fallback.")
        else:
            out.append((path, kronopt.KronConfig, key))
    return out


def _set(raw, path, value):
    *tables, key = path.split(".")
    for t in tables:
        raw = raw[t]
    raw[key] = value


@PROPS
@given(raw=config_dicts(wide=False), data=st.data())
def test_every_invalid_option_of_a_random_config_is_listed_with_its_path(raw, data):
    """Invariant 7: one to three options of a valid random config set to values they refuse (a wrong type, out of
    range, not finite, too large for a float, not a choice): ``from_dict`` raises one ``ConfigError`` that lists
    every one of them under its dotted path (``inner.eps``, ``fallback.post.graft_eps``, ``lr``)."""
    _built(raw)
    paths = _option_paths(raw)
    chosen = data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique_by=lambda p: p[0]))
    for path, cls, key in chosen:
        bad = [v for v in BAD_VALUES if not _field_ok(cls, key, v)]
        assume(bad)
        _set(raw, path, data.draw(st.sampled_from(bad)))
    with pytest.raises(kronopt.ConfigError) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kronopt.from_dict(raw)
    listed = {p for p, _ in err.value.errors}
    for path, _, _ in chosen:
        assert path in listed, f"{path} is not listed; the errors: {err.value.errors}"
