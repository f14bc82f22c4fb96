"""The ``lowrank_flat`` split and the restricted-side presets away from their defaults, against float64 references.

``tests/equivalence/test_pro_*.py`` check pro_kl_shampoo, pro_soap and pro_dykaf mostly at their defaults. Here the
reconstructed choices of ``shared/specs/pro_kl_shampoo.md`` §5–§9 (and of docs/kl.md, docs/pro.md) are swept to values
the presets never use: rank 1, d − 1 and ranks at or above the short side, the restricted side on the short side,
fractional ranks under a ``max_rank`` cap, every complement scale with ``complement_mult``, Newton–Schulz schedules
typed from muon.md §4, ``ns_steps``/``ns_eps``/``ns_dtype``, both trackers with ``refresh_every = 1`` and refresh
offsets, blocks stacked in one bucket, a restricted side beside a side that is not rotated, 1-D parameters, the
AdamW fallback, the state after refreshes, a checkpoint taken around a refresh, and the reductions (rank 0 is Muon
up to the scale, a rank at or above the side is the full preset).

Where a reference lacks an option, the missing piece is written here from the spec or the user docs (never from
kronopt's code) and swapped into the reference module with ``monkeypatch`` for the one test. Every comparison is
step for step, float64 state and Newton–Schulz, ``rtol = 1e-10`` unless the test says why not. A first gradient
is made well posed as in ``_helpers.reference_grads``; a full side whose factor is still rank deficient at a refresh
(a very thin block refreshed at t = 1) has a basis fixed by round-off, so such cases are left out.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
import tests.reference.pro_kl_shampoo as pro_kl_ref
import tests.reference.pro_soap as pro_soap_ref
from tests.equivalence._helpers import PRO_KL_KEYMAP, assert_histories_close, pro_adam_overrides, pro_kl_overrides, reference_grads, run_history
from tests.reference import newton_schulz as ns_ref
from tests.reference.dykaf import dykaf_reference
from tests.reference.kl_shampoo import kl_reference
from tests.reference.pro_dykaf import pro_dykaf_reference
from tests.reference.soap import soap_reference

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64

#: pro_kl_shampoo reference keyword -> kronopt dotted override
KL_KEYMAP = {**PRO_KL_KEYMAP, "ns_eps": "split.ns_eps"}

#: pro_soap / pro_dykaf reference keyword -> kronopt dotted override (beyond _helpers.PRO_ADAM_KEYMAP)
ADAM_EXTRA_KEYMAP = {"max_rank": "split.max_rank", "eps": "inner.eps", "ns_eps": "split.ns_eps"}


def _kl_overrides(options):
    return pro_kl_overrides(options, KL_KEYMAP)


def _adam_overrides(options):
    out = pro_adam_overrides(options)
    out.update({ADAM_EXTRA_KEYMAP[k]: v for k, v in options.items() if k in ADAM_EXTRA_KEYMAP})
    return out


def _named(params):
    return [(f"blocks.{i}.weight", p) for i, p in enumerate(params)]


def _diagonal_first(grads):
    """pro_dykaf's kron start is rank one: keep only G₁'s diagonal so its first basis is well posed
    (as tests/equivalence/test_pro_dykaf.py does)."""
    for g in grads[0]:
        diag = torch.diagonal(g).clone()
        g.zero_()
        torch.diagonal(g).copy_(diag)


def _stream(shapes, steps, seed, *, first="surplus"):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, steps, first=first)
    if first == "diagonal":
        _diagonal_first(grads)
    return params, grads


def _run(preset, params, grads, overrides):
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(_named(ours_params), preset, **overrides)
    return opt, run_history(opt, ours_params, grads)


def _assert_moved(history, params):
    for p, q in zip(history[-1], params):
        assert (p - q).abs().max() > 1e-3  # the comparison is not between two parameters that stood still


def _check_kl(shapes, options, *, extra=None, steps=16, seed=20261201, restricted=True):
    params, grads = _stream(shapes, steps, seed)
    ref = pro_kl_ref.pro_kl_reference(params, grads, **options)
    opt, ours = _run("pro_kl_shampoo", params, grads, {**_kl_overrides(options), **(extra or {})})
    if restricted:
        assert all("restricted" in b["sides"] for b in opt.bucket_summary()), opt.bucket_summary()
    _assert_moved(ours, params)
    assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12)
    return opt


# -- pro_kl_shampoo: the split's and the tracker's options against the reference -------------------------------


def _ns(name, steps):
    """``steps`` tuples of a muon.md §4 schedule, typed in tests/reference/newton_schulz.py."""
    return ns_ref.coefficients(name, steps)


KL_CASES = [
    # rank 1, on a wide, a tall and a square block, both sides
    pytest.param([(6, 8), (8, 6), (7, 7)], {"rank": 1, "side": "larger", "refresh_every": 3}, {}, id="rank1-larger"),
    pytest.param([(6, 8), (8, 6)], {"rank": 1, "side": "left", "refresh_every": 3, "tracker": "sketch"}, {}, id="rank1-left-sketch"),
    # the largest rank a restricted side takes: d − 1
    pytest.param([(6, 8)], {"rank": 7, "side": "right", "refresh_every": 3}, {}, id="rank-d-minus-1-right"),
    pytest.param([(8, 6)], {"rank": 7, "side": "left", "refresh_every": 3, "tracker": "sketch"}, {}, id="rank-d-minus-1-left"),
    # rank above the short side: the first subspace is completed by the fixed cosine columns, and the
    # complement has rank below the short side (pro_kl_shampoo.md §4, m > n − r)
    pytest.param([(4, 9)], {"rank": 6, "side": "right", "refresh_every": 3}, {}, id="rank-above-short-side-power"),
    pytest.param([(4, 9)], {"rank": 6, "side": "right", "refresh_every": 2, "tracker": "sketch"}, {}, id="rank-above-short-side-sketch"),
    pytest.param([(9, 4)], {"rank": 6, "side": "left", "refresh_every": 3}, {}, id="rank-above-short-side-left"),
    # the short side restricted: right on a tall block, left on a wide one
    pytest.param([(8, 5), (9, 4)], {"rank": 2, "side": "right", "refresh_every": 3}, {}, id="short-side-right-on-tall"),
    pytest.param([(4, 9), (5, 8)], {"rank": 2, "side": "left", "refresh_every": 3}, {}, id="short-side-left-on-wide"),
    # a fraction of the side, capped by max_rank (floor(0.5·8) = 4 → 3)
    pytest.param([(6, 8), (8, 6)], {"rank": 0.5, "max_rank": 3, "refresh_every": 3}, {}, id="fraction-capped"),
    # floor, not round: 0.45 · 8 = 3.6 → 3 (and 0.45 · 7 = 3.15 → 3)
    pytest.param([(6, 8), (8, 6), (7, 7)], {"rank": 0.45, "max_rank": 0, "refresh_every": 3}, {}, id="fraction-uncapped-floor"),
    # a refresh on every update, both trackers (the sketch restarts from U S each time)
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "refresh_every": 1}, {}, id="refresh-every-update-power"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "refresh_every": 1, "tracker": "sketch"}, {}, id="refresh-every-update-sketch"),
    # several blocks of one shape in one bucket (the presets' equivalence tests have one block per bucket)
    pytest.param([(6, 8)] * 3, {"rank": 2, "side": "right", "refresh_every": 3}, {}, id="bucket-of-three-right"),
    pytest.param([(8, 6)] * 2 + [(6, 8)], {"rank": 3, "side": "left", "refresh_every": 2, "tracker": "sketch"}, {},
                 id="bucket-of-two-left-sketch"),
    # every complement scale, with complement_mult, on both sides and both orientations
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "complement_mult": 2.5, "refresh_every": 3}, {}, id="whitened-mult"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "complement_scale": "identity", "complement_mult": 0.3, "refresh_every": 3}, {},
                 id="identity-mult"),
    pytest.param([(9, 4), (4, 9)], {"rank": 2, "side": "right", "complement_scale": "muon", "refresh_every": 3}, {},
                 id="muon-right-tall-and-wide"),
    pytest.param([(9, 4), (4, 9)], {"rank": 2, "side": "left", "complement_scale": "muon", "complement_mult": 0.5,
                                    "refresh_every": 3}, {}, id="muon-left-tall-and-wide"),
    pytest.param([(9, 4), (4, 9)], {"rank": 2, "side": "left", "complement_scale": "match_rms_adamw", "refresh_every": 3}, {},
                 id="match-rms-adamw-left"),
    pytest.param([(9, 4), (4, 9)], {"rank": 2, "side": "left", "complement_scale": 2.0, "complement_mult": 0.5,
                                    "refresh_every": 3}, {}, id="number-left"),
    # Newton–Schulz: step counts, the other published schedules (muon.md §4, `cycle` and `repeat last`), the floor
    pytest.param([(6, 8)], {"rank": 2, "ns_steps": 1, "refresh_every": 3}, {}, id="ns-one-step"),
    pytest.param([(6, 8)], {"rank": 2, "ns_steps": 12, "refresh_every": 3}, {}, id="ns-twelve-steps"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "ns_steps": 7, "ns_coefficients": _ns("quintic", 7), "refresh_every": 3},
                 {"split.ns_coefficients": "quintic"}, id="ns-quintic-cycles"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "ns_steps": 6, "ns_coefficients": _ns("cans", 6), "refresh_every": 3},
                 {"split.ns_coefficients": "cans"}, id="ns-cans"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "ns_steps": 11, "ns_coefficients": _ns("deepseekv4", 11), "refresh_every": 3},
                 {"split.ns_coefficients": "deepseekv4"}, id="ns-deepseekv4"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "ns_steps": 3, "ns_coefficients": _ns("polar_express", 3), "refresh_every": 3},
                 {"split.ns_coefficients": "polar_express"}, id="ns-polar-express-short"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "ns_eps": 3.0, "complement_scale": "identity", "refresh_every": 3}, {},
                 id="ns-eps-above-the-complement-norm"),
    # retention and momentum at their ends, a left side damped under the sketch
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "shampoo_beta": 0.0, "refresh_every": 2}, {}, id="rho-zero"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "shampoo_beta": 0.0, "refresh_every": 2, "tracker": "sketch"}, {},
                 id="rho-zero-sketch"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "betas": (0.0, 0.98), "refresh_every": 3}, {}, id="no-momentum"),
    pytest.param([(8, 6), (6, 8)], {"rank": 2, "side": "left", "using_damping": True, "eps": 1e-1, "tracker": "sketch",
                                    "refresh_every": 3}, {}, id="damped-left-sketch"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "shampoo_beta": 0.5, "init_factor": 1.0, "refresh_every": 3}, {},
                 id="short-memory-unit-start"),
    # the momentum kept whole instead of split against the subspace
    pytest.param([(6, 8), (8, 6), (7, 7)], {"rank": 2, "refresh_every": 3, "tracker": "sketch"},
                 {"inner.momentum_basis": "original"}, id="momentum-original"),
]


@pytest.mark.parametrize(("shapes", "options", "extra"), KL_CASES)
def test_pro_kl_shampoo_options_match_the_reference(shapes, options, extra):
    _check_kl(shapes, {"lr": 1e-2, **options}, extra=extra)


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(2, 9),
    n=st.integers(2, 9),
    side=st.sampled_from(["left", "right", "larger"]),
    rank_fraction=st.floats(0.0, 0.999),
    refresh_every=st.integers(2, 4),
    tracker=st.sampled_from(["power", "sketch"]),
    scale=st.sampled_from(["whitened", "identity", "muon", "match_rms_adamw", 0.5]),
    mult=st.sampled_from([1.0, 0.3]),
    seed=st.integers(0, 2**20),
)
def test_pro_kl_shampoo_matches_the_reference_on_drawn_options(m, n, side, rank_fraction, refresh_every, tracker, scale, mult, seed):
    # a full side more than three times the short one is still rank deficient at a refresh on update 2
    if max(m, n) > 3 * min(m, n):
        m = n = max(m, n)
    d = {"left": m, "right": n, "larger": m if m > n else n}[side]
    options = {"lr": 1e-2, "rank": int(rank_fraction * d), "side": side, "refresh_every": refresh_every,
               "tracker": tracker, "complement_scale": scale, "complement_mult": mult}
    params, grads = _stream([(m, n)], 10, seed)
    ref = pro_kl_ref.pro_kl_reference(params, grads, **options)
    _, ours = _run("pro_kl_shampoo", params, grads, _kl_overrides(options))
    assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("dtype", "atol"), [("bfloat16", 2e-4), ("float32", 1e-6)])
def test_ns_dtype_is_the_iteration_rounded_to_that_dtype(monkeypatch, dtype, atol):
    """``split.ns_dtype`` changes the iteration's arithmetic only: the reference with its Newton–Schulz rounded to
    that dtype after every operation (muon.md §3; ``tests/reference/newton_schulz.py``). Two bfloat16 iterations
    may round an entry one unit apart now and then (lr · 2⁻⁷ on an entry of size 2), float32 kernels accumulate
    in float32. The rounding itself is large here: a complement with a tiny singular value leaks ~13 % of
    NS(C) into span(U) in bfloat16 on these blocks (docs/kl.md reports a few per cent on 256 × 256)."""
    round_to = kronopt.linalg.DTYPES[dtype]
    monkeypatch.setattr(pro_kl_ref, "newton_schulz",
                        lambda X, coeffs, eps=1e-7: ns_ref.newton_schulz(X, coeffs, eps=eps, round_to=round_to))
    options = {"lr": 1e-2, "rank": 2, "refresh_every": 3}
    params, grads = _stream([(6, 8), (8, 6), (7, 7)], 12, 5)
    ref = pro_kl_ref.pro_kl_reference(params, grads, **options)
    _, ours = _run("pro_kl_shampoo", params, grads, {**_kl_overrides(options), "split.ns_dtype": dtype})
    assert_histories_close(ours, ref, rtol=0.0, atol=atol)
    _, exact = _run("pro_kl_shampoo", params, grads, _kl_overrides(options))  # and the dtype does change the run
    assert max((a - b).abs().max().item() for a, b in zip(ours[-1], exact[-1])) > 1e-9


# -- pro_kl_shampoo: options the reference does not have, written here from the spec and the docs ----------------


def test_factor_update_before_the_direction(monkeypatch):
    """``factor_update = "before"`` (Shampoo's order, docs/configs.md): factors, eigenvalues and a due refresh
    first, then the direction from the new state. The reference's call with that order."""
    R = pro_kl_ref

    def update_before(W, G, state, hp):
        rows, cols = W.shape
        W, G = W.detach().to(F64).clone(), G.detach().to(F64)
        side = R.restricted_side(hp.side, rows, cols)
        r = R.resolve_rank(hp.rank, hp.max_rank, rows if side == "left" else cols)
        Gw = G.T if side == "left" else G
        if not state.initialised:
            state.initialised, state.transposed = True, side == "left"
            R._first_call(Gw, state, hp, r)
            return W
        state.t += 1
        state.m = hp.beta1 * state.m + (1.0 - hp.beta1) * Gw
        R._factor_update(Gw, state, hp, r)
        if state.t % hp.refresh_every == 0:
            R._refresh(state, hp)
        D = R._direction(state, hp, rows, cols, r)
        W = W - hp.lr * (D.T if side == "left" else D)
        return W - hp.lr * hp.weight_decay * W

    monkeypatch.setattr(R, "pro_kl_update", update_before)
    for tracker in ("power", "sketch"):
        _check_kl([(6, 8), (8, 6), (7, 7)], {"lr": 1e-2, "rank": 2, "refresh_every": 3, "tracker": tracker},
                  extra={"factor_update": "before"})


def _reference_refreshes_shifted(monkeypatch):
    """The float64 reference's refreshes moved by ``offset["o"]`` (it refreshes at t ≡ 0: the count it tests is
    shifted for each update after the first call); returns the dict to set the offset in."""
    plain = pro_kl_ref.pro_kl_update
    offset = {"o": 0}

    def shifted(W, G, state, hp):
        if not state.initialised:
            return plain(W, G, state, hp)
        state.t -= offset["o"]
        try:
            return plain(W, G, state, hp)
        finally:
            state.t += offset["o"]

    monkeypatch.setattr(pro_kl_ref, "pro_kl_update", shifted)
    return offset


def test_refresh_offset_moves_the_subspace_refresh(monkeypatch):
    """``refresh.offset = o``: the refresh comes on the updates t ≡ o (mod k) (docs/stages.md), for the full side
    and the subspace alike; the power tracker must then form its product on those updates."""
    offset = _reference_refreshes_shifted(monkeypatch)
    for tracker in ("power", "sketch"):
        for o in (1, 2):
            offset["o"] = o
            _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": 2, "refresh_every": 3, "tracker": tracker},
                      extra={"refresh.offset": o})


def test_staggered_blocks_refresh_their_subspaces_on_their_own_phases(monkeypatch):
    """``refresh.stagger``: each block refreshes at t ≡ its phase (mod k); every block of a bucket of one shape
    follows the reference run with that offset, and the phases cover the period."""
    offset = _reference_refreshes_shifted(monkeypatch)
    shapes = [(6, 8), (6, 8), (6, 8)]
    options = {"lr": 1e-2, "rank": 2, "refresh_every": 3, "tracker": "power"}
    params, grads = _stream(shapes, 12, 4)
    opt, ours = _run("pro_kl_shampoo", params, grads, {**_kl_overrides(options), "refresh.stagger": True})
    assert sorted(b["phase"] for b in opt.bucket_summary()) == [0, 1, 2]
    phases = []
    for i in range(len(shapes)):
        errors = []
        for o in range(3):
            offset["o"] = o
            ref = pro_kl_ref.pro_kl_reference([params[i]], [[g[i]] for g in grads], **options)
            errors.append(max((a[0] - b[i]).abs().max().item() for a, b in zip(ref, ours)))
        matching = [o for o, e in enumerate(errors) if e < 1e-12]
        assert len(matching) == 1, errors
        phases.append(matching[0])
    assert sorted(phases) == [0, 1, 2]


@pytest.mark.parametrize(("placement", "exponent"), [("inside", -0.5), ("inside", -0.25), ("outside", -0.5), ("outside", -0.25)])
def test_subspace_block_with_other_eps_placements_and_exponents(monkeypatch, placement, exponent):
    """The ``eigenvalue`` rule's other ε placements and exponents on the subspace block (docs/stages.md):
    P_ij = (λ_L,i + ε)^p (σ_j + ε)^p ("inside") or 1/(λ_L,i^{−p} + ε) · 1/(σ_j^{−p} + ε) ("outside"), with the tracked
    λ_L = s_L^{−2} and σ = τ^{−2}; the complement is the split's and does not change."""
    R = pro_kl_ref
    eps = 1e-3

    def direction(state, hp, rows, cols, r):
        lam_L, sigma = state.s_L ** -2, state.tau ** -2
        if placement == "inside":
            P = torch.outer((lam_L + eps) ** exponent, (sigma + eps) ** exponent)
        else:
            P = torch.outer(1 / (lam_L ** -exponent + eps), 1 / (sigma ** -exponent + eps))
        M, Q_L, U = state.m, state.Q_L, state.U
        D_sub = Q_L @ ((Q_L.T @ M @ U) * P) @ U.T
        C = M - M @ U @ U.T
        O = R.newton_schulz(C, R.ns_schedule(hp.ns_coefficients, hp.ns_steps), eps=hp.ns_eps)
        return D_sub + R.complement_scale_factor(hp, rows, cols, M.shape[1], r) * O

    monkeypatch.setattr(R, "_direction", direction)
    _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": 2, "refresh_every": 3, "complement_scale": "identity"},
              extra={"inner.eps_placement": placement, "inner.exponent": exponent, "inner.eps": eps})


@pytest.mark.parametrize("rank", [0, 2])
def test_match_subspace_rms_with_the_eigenvalue_rule(monkeypatch, rank):
    """``complement_scale = "match_subspace_rms"`` beside the ``eigenvalue`` rule: the complement block gets norm
    ‖D_sub‖_F √((d − r)/r), or √(rows · d) at r = 0 (docs/pro.md), times complement_mult."""
    R = pro_kl_ref
    plain = R._direction

    def direction(state, hp, rows, cols, r):
        D_sub = plain(state, dataclasses.replace(hp, complement_scale=1.0, complement_mult=1e-300), rows, cols, r)
        M, U = state.m, state.U
        d = M.shape[1]
        C = M - M @ U @ U.T
        O = R.newton_schulz(C, R.ns_schedule(hp.ns_coefficients, hp.ns_steps), eps=hp.ns_eps)
        nu = math.sqrt(M.shape[0] * d) if r == 0 else float(torch.linalg.norm(D_sub)) * math.sqrt((d - r) / r)
        return D_sub + hp.complement_mult * nu * O / torch.linalg.norm(O)

    monkeypatch.setattr(R, "_direction", direction)
    _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": rank, "refresh_every": 3, "complement_mult": 0.7},
              extra={"split.complement_scale": "match_subspace_rms"})


def test_adam_grafting_rescales_the_whole_step(monkeypatch):
    """``post.grafting = "adam"`` (docs/stages.md): the whole direction, complement included, rescaled to the norm
    of an Adam direction (β = (0.9, 0.999), ε = 1e-8, bias-corrected) on the raw gradient of the updates."""
    R = pro_kl_ref
    plain = R.pro_kl_update
    moments = {}

    def grafted(W, G, state, hp):
        if not state.initialised:
            return plain(W, G, state, hp)
        a = moments.setdefault(id(state), {"m": torch.zeros_like(G), "v": torch.zeros_like(G), "t": 0})
        a["t"] += 1
        a["m"] = 0.9 * a["m"] + 0.1 * G
        a["v"] = 0.999 * a["v"] + 0.001 * G * G
        A = (a["m"] / (1 - 0.9 ** a["t"])) / (torch.sqrt(a["v"] / (1 - 0.999 ** a["t"])) + 1e-8)
        W0 = W.detach().to(F64).clone()
        D = W0 - plain(W0, G, state, dataclasses.replace(hp, lr=1.0, weight_decay=0.0))
        W1 = W0 - hp.lr * D * (torch.linalg.norm(A) / torch.linalg.norm(D))
        return W1 - hp.lr * hp.weight_decay * W1

    monkeypatch.setattr(R, "pro_kl_update", grafted)
    _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": 2, "refresh_every": 3}, extra={"post.grafting": "adam"})


def test_basis_power_steps_reach_the_full_side_only(monkeypatch):
    """``basis.power_steps = 2``: the full side takes two power steps per refresh; a restricted side keeps its one
    Rayleigh–Ritz + power step (docs/stages.md, `qr`: "followed by one power step"). Pinned as it is, since the
    option table says only "power steps per refresh"."""
    R = pro_kl_ref
    plain = R._refresh

    def refresh(state, hp):
        plain(state, hp)
        state.Q_L, _ = torch.linalg.qr(state.S_L @ state.Q_L)

    monkeypatch.setattr(R, "_refresh", refresh)
    _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": 2, "refresh_every": 3}, extra={"basis.power_steps": 2})


def _unrotated_other_side(monkeypatch):
    """A side the shape policy does not rotate acts as the identity with s ≡ 1 (kl_shampoo.md §8, docs/kl.md): the
    reference's full side held at Q = I, s = 1 (its own update of that side is discarded after every call)."""
    R = pro_kl_ref
    plain = R.pro_kl_update

    def update(W, G, state, hp):
        out = plain(W, G, state, hp)
        k = state.Q_L.shape[0]
        state.Q_L, state.s_L = torch.eye(k, dtype=F64), torch.ones(k, dtype=F64)
        return out

    monkeypatch.setattr(R, "pro_kl_update", update)


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((12, 5), {"rank": 2, "side": "right", "refresh_every": 3}),
        ((12, 5), {"rank": 1, "side": "right", "refresh_every": 2, "tracker": "sketch", "complement_scale": "identity"}),
        ((5, 12), {"rank": 2, "side": "left", "refresh_every": 3, "using_damping": True, "eps": 1e-2}),
    ],
)
def test_restricted_side_beside_a_side_that_is_not_rotated(monkeypatch, shape, options):
    _unrotated_other_side(monkeypatch)
    opt = _check_kl([shape], {"lr": 1e-2, **options}, extra={"shapes.max_dim": 10})
    assert opt.bucket_summary()[0]["sides"] in (("none", "restricted"), ("restricted", "none"))


def test_larger_side_not_rotated_leaves_the_block_plain_kl_shampoo():
    """"A side the shape policy does not rotate is never restricted": with ``side = "larger"`` and the larger
    side over max_dim nothing is restricted (the short side is not picked instead) and the block is
    KL-Shampoo's one-sided step."""
    params, grads = _stream([(12, 5), (5, 12)], 12, 3)
    opt, ours = _run("pro_kl_shampoo", params, grads, {**_kl_overrides({"lr": 1e-2, "rank": 2, "refresh_every": 3}),
                                                       "shapes.max_dim": 10})
    assert sorted(b["sides"] for b in opt.bucket_summary()) == [("full", "none"), ("none", "full")]
    ref = kl_reference(params, grads, lr=1e-2, precondition_frequency=3, max_precond_dim=10)
    assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{"rank": 3, "refresh_every": 3}, {"rank": 0, "refresh_every": 3},
                                     {"rank": 3, "refresh_every": 2, "tracker": "sketch", "complement_scale": "identity"}])
def test_a_preconditioned_vector_has_a_restricted_side(monkeypatch, options):
    """A 1-D parameter kept in the pipeline with ``shapes.precondition_1d``: its (d, 1) block has its only rotated
    side restricted, the other not rotated; the step is the reference's on that column."""
    _unrotated_other_side(monkeypatch)
    options = {"lr": 1e-2, **options}
    gen = torch.Generator().manual_seed(0)
    b0 = torch.randn(12, generator=gen, dtype=F64)
    grads = [torch.randn(12, generator=gen, dtype=F64) for _ in range(12)]
    b = torch.nn.Parameter(b0.clone())
    opt = kronopt.build([("blocks.0.bias", b)], "pro_kl_shampoo",
                        **{**_kl_overrides(options), "route.vectors": "pipeline", "shapes.precondition_1d": True})
    assert opt.bucket_summary()[0]["sides"] == ("restricted", "none")
    ours = run_history(opt, [b], [[g] for g in grads])
    ref = pro_kl_ref.pro_kl_reference([b0[:, None]], [[g[:, None]] for g in grads], **{**options, "side": "left"})
    assert_histories_close([[x[0][:, None]] for x in ours], ref, rtol=1e-10, atol=1e-12)
    assert (ours[-1][0] - b0).abs().max() > 1e-2


def test_vectors_heads_one_sided_and_restricted_blocks_in_one_model(monkeypatch):
    """One optimizer over a model whose parameters take every route: restricted blocks (two in one bucket, both
    sides), a one-sided block with a restricted side, a bias and a head sent to the AdamW fallback. Each follows
    its own reference; nothing leaks between them."""
    shapes = {"blocks.0.weight": (6, 8), "blocks.0.bias": (6,), "blocks.1.weight": (5, 12), "blocks.2.weight": (8, 6),
              "blocks.3.weight": (6, 8), "head.weight": (3, 6)}
    gen = torch.Generator().manual_seed(5)
    init = {k: torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}
    steps = 12
    grads = [{k: torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()} for _ in range(steps)]
    for k, s in shapes.items():  # a well-posed first basis, as reference_grads makes it
        if len(s) == 2:
            grads[0][k][min(s):, :] = 0.0
            grads[0][k][:, min(s):] = 0.0
    options = {"lr": 1e-2, "rank": 2, "side": "left", "refresh_every": 3, "tracker": "sketch"}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = kronopt.build(list(params.items()), "pro_kl_shampoo", **{**_kl_overrides(options), "shapes.max_dim": 10})
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
    for k in ("blocks.0.weight", "blocks.2.weight", "blocks.3.weight"):
        ref = pro_kl_ref.pro_kl_reference([init[k]], [[g[k]] for g in grads], **options)
        torch.testing.assert_close(params[k].detach(), ref[-1][0], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    for k in ("blocks.0.bias", "head.weight"):  # the preset's fallback: lr 0.1, betas (0.9, 0.98), eps 1e-8, no decay
        p = torch.nn.Parameter(init[k].clone())
        adamw = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
        for g in grads:
            p.grad = g[k].clone()
            adamw.step()
        torch.testing.assert_close(params[k].detach(), p.detach(), rtol=1e-12, atol=1e-14, msg=lambda m: f"{k}: {m}")
    _unrotated_other_side(monkeypatch)
    ref = pro_kl_ref.pro_kl_reference([init["blocks.1.weight"]], [[g["blocks.1.weight"]] for g in grads], **options)
    torch.testing.assert_close(params["blocks.1.weight"].detach(), ref[-1][0], rtol=1e-10, atol=1e-12)


# -- the state carried across subspace refreshes (spec §7) ---------------------------------------------------------


@pytest.mark.parametrize("tracker", ["power", "sketch"])
@pytest.mark.parametrize(("shape", "side"), [((6, 8), "right"), ((8, 6), "left")])
@pytest.mark.parametrize("calls", [9, 11])  # right after the refresh of update 8 (call 9) and between two
def test_restricted_state_after_refreshes_is_the_references(tracker, shape, side, calls):
    """U, S (not diagonal: not re-diagonalised after a refresh), the tracked roots τ, μ and the full side's factor,
    basis and roots equal the reference's state; with ``sketch`` also its accumulated product B."""
    options = {"lr": 1e-2, "rank": 3, "side": side, "refresh_every": 4, "tracker": tracker}
    params, grads = _stream([shape], calls, 8)
    states = [pro_kl_ref.ProKlState()]
    pro_kl_ref.pro_kl_reference(params, grads, states=states, **options)
    ref = states[0]
    opt, ours = _run("pro_kl_shampoo", params, grads, _kl_overrides(options))
    s = opt.state[next(iter(opt.state))]
    r_, f_ = ("R", "L") if side == "right" else ("L", "R")  # restricted and full side's suffixes
    # a column's sign is an eigh/QR convention no step depends on: align both bases' columns with the reference's
    Q = s[f"basis.Q_{f_}"]
    Q = Q * torch.sign(torch.diagonal(ref.Q_L.T @ Q))
    U = s[f"basis.Q_{r_}"]
    signs = torch.sign(torch.diagonal(ref.U.T @ U))
    pairs = {
        f"basis.Q_{r_}": (U * signs, ref.U), f"factors.sub_{r_}": (signs[:, None] * s[f"factors.sub_{r_}"] * signs, ref.S),
        f"factors.s_{r_}": (s[f"factors.s_{r_}"], ref.tau), f"factors.mu_{r_}": (s[f"factors.mu_{r_}"], torch.tensor(ref.mu, dtype=F64)),
        f"factors.{f_}": (s[f"factors.{f_}"], ref.S_L), f"basis.Q_{f_}": (Q, ref.Q_L), f"factors.s_{f_}": (s[f"factors.s_{f_}"], ref.s_L),
    }
    if tracker == "sketch":
        pairs[f"factors.power_{r_}"] = (s[f"factors.power_{r_}"] * signs, ref.B)
    for key, (ours_, expected) in pairs.items():
        torch.testing.assert_close(ours_, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{key}: {m}")
    assert not torch.allclose(ref.S, torch.diag(torch.diagonal(ref.S)))  # the off-diagonal part is compared too


@pytest.mark.parametrize(("preset", "tracker"), [("pro_kl_shampoo", "power"), ("pro_kl_shampoo", "sketch"),
                                                 ("pro_soap", None), ("pro_dykaf", None)])
@pytest.mark.parametrize("cut", [5, 6, 7])  # saved 2 updates before, 1 before and right after the refresh of update 6
def test_a_checkpoint_around_a_subspace_refresh_resumes_bit_for_bit(preset, tracker, cut):
    shapes = [(6, 8), (8, 6), (7, 7), (6, 8)]
    params, grads = _stream(shapes, 12, 2, first="diagonal" if preset == "pro_dykaf" else "surplus")
    over = {"state_dtype": "float64", "split.rank": 2, "refresh.every": 3, "lr": 1e-2}
    if preset == "pro_kl_shampoo":
        over["factors.tracker"] = tracker
    _, whole = _run(preset, params, grads, over)
    opt1, first = _run(preset, params, grads[:cut], over)
    saved = opt1.state_dict()
    resumed = [torch.nn.Parameter(p.clone()) for p in first[-1]]
    opt2 = kronopt.build(_named(resumed), preset, **over)
    opt2.load_state_dict(saved)
    rest = run_history(opt2, resumed, grads[cut:])
    for a, b in zip(rest[-1], whole[-1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("saved", "loaded"), [("original", "subspace"), ("subspace", "original")])
def test_a_checkpoint_loads_across_momentum_forms_and_stays_on_the_reference(saved, loaded):
    """``load_state_dict`` turns a momentum saved whole into its parts against the saved subspace and back
    (docs/kl.md); the run then continues on the reference to rounding, through later refreshes."""
    options = {"lr": 1e-2, "rank": 2, "refresh_every": 3, "tracker": "sketch"}
    params, grads = _stream([(6, 8), (8, 6), (7, 7)], 12, 2)
    ref = pro_kl_ref.pro_kl_reference(params, grads, **options)
    opt1, first = _run("pro_kl_shampoo", params, grads[:5], {**_kl_overrides(options), "inner.momentum_basis": saved})
    resumed = [torch.nn.Parameter(p.clone()) for p in first[-1]]
    opt2 = kronopt.build(_named(resumed), "pro_kl_shampoo", **{**_kl_overrides(options), "inner.momentum_basis": loaded})
    with pytest.warns(UserWarning, match="different config"):
        opt2.load_state_dict(opt1.state_dict())
    rest = run_history(opt2, resumed, grads[5:])
    assert_histories_close(first + rest, ref, rtol=1e-10, atol=1e-12)


# -- reductions ----------------------------------------------------------------------------------------------------


def test_rank_at_or_above_a_side_keeps_that_block_kl_shampoo_beside_restricted_ones():
    """An integer rank is one number for every block: 6 restricts the right side of a 6 × 8 block (r < 8) and
    keeps the 8 × 6 and 8 × 5 blocks full (r ≥ n), which are then KL-Shampoo's step for step."""
    params, grads = _stream([(6, 8), (8, 6), (8, 5)], 16, 11)
    options = {"lr": 1e-2, "rank": 6, "side": "right", "refresh_every": 3}
    opt, ours = _run("pro_kl_shampoo", params, grads, _kl_overrides(options))
    assert [b["sides"] for b in opt.bucket_summary()] == [("full", "restricted"), ("full", "full"), ("full", "full")]
    restricted = pro_kl_ref.pro_kl_reference(params[:1], [g[:1] for g in grads], **options)
    full = kl_reference(params[1:], [g[1:] for g in grads], lr=1e-2, precondition_frequency=3)
    assert_histories_close(ours, [a + b for a, b in zip(restricted, full)], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("preset", "reference"), [("pro_soap", soap_reference), ("pro_dykaf", dykaf_reference)])
@pytest.mark.parametrize("rank", [1.0, 8, 100])
def test_full_rank_pro_adam_presets_are_soap_and_dykaf(preset, reference, rank):
    """docs/pro.md: a rank ≥ d keeps the side full, "plain SOAP" / "plain DyKAF" (their float64 references)."""
    params, grads = _stream([(6, 8), (8, 6), (7, 7)], 16, 11)
    opt, ours = _run(preset, params, grads, {"state_dtype": "float64", "split.rank": rank, "split.max_rank": 0,
                                             "refresh.every": 3})
    assert all(b["sides"] == ("full", "full") for b in opt.bucket_summary())
    assert_histories_close(ours, reference(params, grads, lr=1e-2, precondition_frequency=3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (7, 7)])
def test_rank_zero_is_the_orthogonalized_momentum_with_muons_scale(shape):
    """pro_kl_shampoo.md §5, §10 test 3: at r = 0 the step is c·NS(M) alone; with ``complement_scale = "muon"``
    c = √max(1, m/n) of the block (the left-restricted tall block too), hand-computed here in float64 with the
    muon.md §4 coefficients and the EMA momentum (no subspace block, whatever the factors hold)."""
    m, n = shape
    lr, beta1 = 0.1, 0.9
    gen = torch.Generator().manual_seed(9)
    W = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    opt = kronopt.build([("blocks.0.weight", W)], "pro_kl_shampoo",
                        **{**_kl_overrides({"lr": lr, "rank": 0, "complement_scale": "muon"}), "weight_decay": 0.0})
    assert "restricted" in opt.bucket_summary()[0]["sides"]
    M = torch.zeros(shape, dtype=F64)
    for call in range(6):
        G = torch.randn(shape, generator=gen, dtype=F64)
        before = W.detach().clone()
        W.grad = G
        opt.step()
        if call == 0:
            assert torch.equal(W.detach(), before)
            continue
        M = beta1 * M + (1 - beta1) * G
        expected = math.sqrt(max(1.0, m / n)) * ns_ref.newton_schulz(M, ns_ref.coefficients("kj", 5))
        torch.testing.assert_close((before - W.detach()) / lr, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "pro_soap", "pro_dykaf"])
@pytest.mark.parametrize(("scale", "adjust"), [("muon", "original"), ("match_rms_adamw", "match_rms_adamw")])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)])
def test_rank_zero_presets_are_torch_muon_without_nesterov(preset, scale, adjust, shape):
    """r = 0 with the muon-type scales is torch.optim.Muon (EMA momentum, ``nesterov = False``, its lr adjustment,
    bfloat16 Newton–Schulz) fed the gradients after the skipped first call. float32; the two bfloat16 iterations
    may round an entry one unit apart (lr·2⁻⁸ on an O(1) entry), far below a wrong scale (≥ lr·0.1)."""
    lr, momentum = 0.05, 0.9
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(8)]
    p = torch.nn.Parameter(W0.clone())
    inner = {"inner.momentum": momentum} if preset == "pro_kl_shampoo" else {"inner.betas": (momentum, 0.95)}
    opt = kronopt.build([("blocks.0.weight", p)], preset,
                        **{"split.rank": 0, "split.complement_scale": scale, "lr": lr, "weight_decay": 0.0, **inner})
    q = torch.nn.Parameter(W0.clone())
    muon = torch.optim.Muon([q], lr=lr, weight_decay=0.0, momentum=momentum, nesterov=False, adjust_lr_fn=adjust)
    for k, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        if k > 0:
            q.grad = g.clone()
            muon.step()
    assert (q - W0).abs().max() > 0.1
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0.0, atol=2 * lr * 2**-7)


# -- pro_soap and pro_dykaf away from their defaults -------------------------------------------------------------------


ADAM_CASES = [
    pytest.param([(6, 8), (8, 6)], {"rank": 1, "side": "larger", "precondition_frequency": 3}, id="rank1"),
    pytest.param([(4, 9)], {"rank": 6, "side": "right", "precondition_frequency": 3}, id="rank-above-short-side-right"),
    pytest.param([(9, 4)], {"rank": 6, "side": "left", "precondition_frequency": 3}, id="rank-above-short-side-left"),
    pytest.param([(9, 4), (8, 5)], {"rank": 2, "side": "right", "precondition_frequency": 3}, id="short-side-right-on-tall"),
    pytest.param([(6, 8)], {"rank": 7, "side": "right", "precondition_frequency": 3}, id="rank-d-minus-1"),
    pytest.param([(6, 8), (6, 8), (8, 6), (8, 6)], {"rank": 2, "precondition_frequency": 3}, id="buckets-of-two"),
    pytest.param([(6, 8), (8, 6)], {"rank": 0.5, "max_rank": 3, "precondition_frequency": 3}, id="fraction-capped"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "precondition_frequency": 3, "ns_steps": 6,
                                    "ns_coefficients": _ns("polar_express", 6)}, id="ns-polar-express"),
    pytest.param([(6, 8), (8, 6)], {"rank": 2, "precondition_frequency": 4, "ns_eps": 2.0, "eps": 1e-3}, id="ns-eps-adam-eps"),
]


def _adam_extra(options):
    return {"split.ns_coefficients": "polar_express"} if "ns_coefficients" in options else {}


@pytest.mark.parametrize(("shapes", "options"), ADAM_CASES)
def test_pro_soap_options_match_the_reference(shapes, options):
    options = {"lr": 1e-2, **options}
    params, grads = _stream(shapes, 16, 20261202)
    opt, ours = _run("pro_soap", params, grads, {**_adam_overrides(options), **_adam_extra(options)})
    assert all("restricted" in b["sides"] for b in opt.bucket_summary())
    _assert_moved(ours, params)
    assert_histories_close(ours, pro_soap_ref.pro_soap_reference(params, grads, **options), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("shapes", "options"), ADAM_CASES)
def test_pro_dykaf_options_match_the_reference(shapes, options):
    options = {"lr": 1e-2, **options}
    params, grads = _stream(shapes, 16, 20261202, first="diagonal")
    opt, ours = _run("pro_dykaf", params, grads, {**_adam_overrides(options), **_adam_extra(options)})
    assert all("restricted" in b["sides"] for b in opt.bucket_summary())
    _assert_moved(ours, params)
    assert_histories_close(ours, pro_dykaf_reference(params, grads, **options), rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(2, 9),
    n=st.integers(2, 9),
    side=st.sampled_from(["left", "right", "larger"]),
    rank_fraction=st.floats(0.0, 0.999),
    every=st.integers(2, 4),
    mult=st.sampled_from([1.0, 0.4]),
    seed=st.integers(0, 2**20),
)
def test_pro_soap_matches_the_reference_on_drawn_options(m, n, side, rank_fraction, every, mult, seed):
    if max(m, n) > 3 * min(m, n):  # see the pro_kl_shampoo sweep
        m = n = max(m, n)
    d = {"left": m, "right": n, "larger": m if m > n else n}[side]
    options = {"lr": 1e-2, "rank": int(rank_fraction * d), "side": side, "precondition_frequency": every, "complement_mult": mult}
    params, grads = _stream([(m, n)], 10, seed)
    _, ours = _run("pro_soap", params, grads, _adam_overrides(options))
    assert_histories_close(ours, pro_soap_ref.pro_soap_reference(params, grads, **options), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset", ["pro_soap", "pro_dykaf"])
@pytest.mark.parametrize("shape", [(3, 40), (40, 3)])
def test_pro_adam_presets_match_the_reference_when_a_refresh_meets_ritz_values_of_rounding(preset, shape):
    """A 40-wide restricted side of rank 10 refreshed every 2 calls: at the second refresh its factor has rank about 6
    on the subspace, so four Ritz values are rounding (docs/kl.md's rule: those directions keep U V's, in the basis of
    their span that does not depend on the solver; the reference writes it with its own Gram–Schmidt). Without the
    rule each run's solver picks the directions and the two part by a whole step."""
    options = {"lr": 1e-2, "rank": 10, "side": "larger", "precondition_frequency": 2}
    params, grads = _stream([shape], 10, 3, first="diagonal" if preset == "pro_dykaf" else "surplus")
    reference = pro_soap_ref.pro_soap_reference if preset == "pro_soap" else pro_dykaf_reference
    _, ours = _run(preset, params, grads, _adam_overrides(options))
    _assert_moved(ours, params)
    assert_histories_close(ours, reference(params, grads, **options), rtol=1e-10, atol=1e-12)


def test_pro_kl_shampoo_matches_the_reference_when_a_refresh_meets_ritz_values_of_rounding():
    """pro_kl_shampoo's Ritz-then-power refresh under the same rule (the test above)."""
    _check_kl([(3, 40), (40, 3)], {"lr": 1e-2, "rank": 10, "side": "larger", "refresh_every": 2}, steps=10)


def _fixed_complement_scale(rule, original_shape):
    """The complement block c·NS(C) of the fixed rules (docs/pro.md, pro_kl_shampoo.md §5): c = √(d − r),
    √max(1, m/n), 0.2·√max(m, n) of the block as the user sees it, or a number; × complement_mult."""

    def block(C, D, r, hp):
        d = C.shape[1]
        m, n = original_shape[tuple(C.shape)]
        c = {"identity": lambda: math.sqrt(d - r), "muon": lambda: math.sqrt(max(1.0, m / n)),
             "match_rms_adamw": lambda: 0.2 * math.sqrt(max(m, n))}.get(rule, lambda: float(rule))()
        O = pro_soap_ref.newton_schulz(C, pro_soap_ref.ns_schedule(hp.ns_coefficients, hp.ns_steps), eps=hp.ns_eps)
        return hp.complement_mult * c * O

    return block


@pytest.mark.parametrize("preset", ["pro_soap", "pro_dykaf"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("rule", ["identity", "muon", "match_rms_adamw", 0.7])
def test_pro_adam_presets_with_the_fixed_complement_scales(monkeypatch, preset, side, rule):
    shapes = [(6, 8), (8, 6), (7, 7)]
    # the reference works with the restricted side on the right: map its block shape back to the parameter's
    original = {((m, n) if side == "right" else (n, m)): (m, n) for m, n in shapes}
    monkeypatch.setattr(pro_soap_ref, "complement_block", _fixed_complement_scale(rule, original))
    options = {"lr": 1e-2, "rank": 2, "side": side, "precondition_frequency": 3, "complement_mult": 1.5}
    params, grads = _stream(shapes, 14, 6, first="diagonal" if preset == "pro_dykaf" else "surplus")
    reference = pro_soap_ref.pro_soap_reference if preset == "pro_soap" else pro_dykaf_reference
    _, ours = _run(preset, params, grads, {**_adam_overrides(options), "split.complement_scale": rule})
    _assert_moved(ours, params)
    assert_histories_close(ours, reference(params, grads, **options), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pro_soap_with_the_whitened_complement_scale(monkeypatch, side):
    """``complement_scale = "whitened"`` beside EMA factors (offered by the preset's comment): NS(C) rescaled to
    μ^{−1/2}‖diag(λ_L^{−1/2}) Q_Lᵀ C‖_F with the basis's eigenvalue estimates (docs/stages.md `qr`: eigh's at the
    first refresh, then the sorted Rayleigh quotients of the old basis) and the EMA's flat μ; an estimate within
    the solver's rounding of zero (``4 √max(k, 16)`` ulps of the largest: the 8 × 6 block's left factor after its first
    gradient has two) weighs its direction 0, the pseudo-inverse root; a non-finite norm (μ = 0) gives no complement
    block."""
    current = {}
    plain_initial, plain_refresh, plain_update = pro_soap_ref.initial_basis, pro_soap_ref.refresh_side, pro_soap_ref.pro_soap_update

    def initial_basis(X):
        Q = plain_initial(X)
        current["state"].lam = torch.diagonal(Q.T @ X @ Q)
        return Q

    def refresh_side(X, Q):
        quotients = torch.diagonal(Q.T @ X @ Q)
        Q_new, pi = plain_refresh(X, Q)
        current["state"].lam = quotients[pi]
        return Q_new, pi

    def complement_block(C, D, r, hp):
        s = current["state"]
        O = pro_soap_ref.newton_schulz(C, pro_soap_ref.ns_schedule(hp.ns_coefficients, hp.ns_steps), eps=hp.ns_eps)
        # the pseudo-inverse root below the eigensolver's rounding: 4 √max(k, 16) ulps of the largest estimate
        k = s.lam.numel()
        known = s.lam > 4 * math.sqrt(max(k, 16)) * torch.finfo(s.lam.dtype).eps * s.lam.max()
        weights = torch.where(known, s.lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(s.lam))
        nu = float(torch.linalg.norm(torch.diag(weights) @ s.Q_L.T @ C)) / math.sqrt(s.mu)
        norm_O = float(torch.linalg.norm(O))
        return hp.complement_mult * nu * O / norm_O if norm_O > 0 and math.isfinite(nu) else torch.zeros_like(C)

    def update(W, G, state, hp):
        current["state"] = state
        return plain_update(W, G, state, hp)

    for name, fn in (("initial_basis", initial_basis), ("refresh_side", refresh_side),
                     ("complement_block", complement_block), ("pro_soap_update", update)):
        monkeypatch.setattr(pro_soap_ref, name, fn)
    options = {"lr": 1e-2, "rank": 2, "side": side, "precondition_frequency": 3, "complement_mult": 0.8}
    params, grads = _stream([(6, 8), (8, 6), (7, 7)], 14, 6)
    _, ours = _run("pro_soap", params, grads, {**_adam_overrides(options), "split.complement_scale": "whitened"})
    assert_histories_close(ours, pro_soap_ref.pro_soap_reference(params, grads, **options), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("placement", "bias"), [("after_correction", True), ("after_correction", False),
                                                 ("before_correction", False)])
def test_pro_soap_subspace_adam_conventions(monkeypatch, placement, bias):
    """The ``adam`` rule's other conventions in the rotated m × r block (docs/stages.md): ε after the bias
    correction (D = Q_L[(M̂U)/(√v̂ + ε)]Uᵀ), and no bias correction; the complement keeps its RMS rule."""

    def step(W, G, state, hp, r, side):
        b1, b2 = hp.beta1, hp.beta2
        state.t += 1
        Q_L, U = state.Q_L, state.U
        state.M = b1 * state.M + (1 - b1) * G
        G_rot = Q_L.T @ G @ U
        state.v = b2 * state.v + (1 - b2) * G_rot * G_rot
        c1, c2 = (1 - b1**state.t, 1 - b2**state.t) if bias else (1.0, 1.0)
        MU = Q_L.T @ state.M @ U
        if placement == "after_correction":
            D = Q_L @ ((MU / c1) / (torch.sqrt(state.v / c2) + hp.eps)) @ U.T
        else:
            D = (math.sqrt(c2) / c1) * (Q_L @ (MU / (torch.sqrt(state.v) + hp.eps)) @ U.T)
        D = D + pro_soap_ref.complement_block(state.M - state.M @ U @ U.T, D, r, hp)
        W = W - hp.lr * (D.T if side == "left" else D)
        return W - hp.lr * hp.weight_decay * W

    monkeypatch.setattr(pro_soap_ref, "adam_subspace_step", step)
    options = {"lr": 1e-2, "rank": 2, "precondition_frequency": 3, "eps": 1e-3}
    params, grads = _stream([(6, 8), (8, 6)], 12, 7)
    _, ours = _run("pro_soap", params, grads, {**_adam_overrides(options), "inner.eps_placement": placement,
                                               "inner.bias_correction": bias})
    assert_histories_close(ours, pro_soap_ref.pro_soap_reference(params, grads, **options), rtol=1e-10, atol=1e-12)


# -- configuration --------------------------------------------------------------------------------------------------


def test_integer_and_fractional_rank_survive_the_toml_round_trip():
    """rank 1 is one direction, rank 1.0 the whole side (docs/stages.md); the TOML text keeps them apart."""
    for value, expected in ((1, ("restricted", 1)), (1.0, ("full", 0)), (0, ("restricted", 0)), (0.0, ("restricted", 0))):
        cfg = kronopt.resolve("pro_kl_shampoo", **{"split.rank": value})
        back = kronopt.loads(kronopt.dumps(cfg))
        assert type(back.split.rank) is type(value) and back == cfg
        assert back.split.sides(6, 8, (True, True))[1] == expected


def test_the_dense_tracker_is_refused_with_its_path():
    """pro_kl_shampoo.md §7 lists a ``dense`` tracker for diagnostics; docs/kl.md says it is not implemented, and the
    config says so before anything is built."""
    with pytest.raises(kronopt.ConfigError) as exc:
        kronopt.resolve("pro_kl_shampoo", **{"factors.tracker": "dense"})
    assert "factors.tracker" in str(exc.value) and "'power', 'sketch'" in str(exc.value)


# -- found by this hunt -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "pro_soap", "pro_dykaf"])
@pytest.mark.parametrize("trigger", [{"skip_first_call": False}, {"refresh.at_first_call": False}])
def test_a_restricted_side_without_its_first_call_subspace_is_refused_naming_the_option(preset, trigger):
    """A restricted side's subspace starts at the first gradient's top singular vectors, made by the factor
    estimator's first call and handed to the basis by that call's refresh. Without a skipped first call or
    without that refresh, the updates before the first refresh would run on the basis's starting subspace (its
    first r coordinate vectors): the estimator's ``(S, μ)`` built there are not re-projected when the first
    refresh moves ``U``, and the eigenvalue rule's unscaled step ``M`` plus the split's ``c·NS(C)`` counts the
    complement twice. Both options are refused at build, naming the option, before anything is made."""
    option = next(iter(trigger))
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve(preset, **{"split.rank": 2, **trigger})
    assert [p for p, _ in info.value.errors] == [option], info.value.errors
    assert "restricted side" in str(info.value)
    kronopt.resolve(preset, **{"split.rank": 2})  # the preset itself builds
    kronopt.resolve(preset, **{"split.type": "full", **trigger})  # and the option without a restricted side


def _reference_steps_the_corrected_momentum(monkeypatch):
    """The float64 reference's direction taken from M̂ = M/(1 − β₁ᵗ) (KL-Shampoo with bias correction)."""
    plain = pro_kl_ref._direction

    def corrected(state, hp, rows, cols, r):
        M = state.m
        state.m = M / (1 - hp.beta1**state.t)
        try:
            return plain(state, hp, rows, cols, r)
        finally:
            state.m = M

    monkeypatch.setattr(pro_kl_ref, "_direction", corrected)


def test_whitened_complement_follows_the_bias_corrected_momentum(monkeypatch):
    """``complement_scale = "whitened"`` gives the complement the norm full KL-Shampoo's step gives it,
    ‖μ^{−1/2} L̂^{−1/2} C‖ (docs/kl.md). With ``inner.bias_correction = true`` KL-Shampoo steps M̂ = M/(1 − β₁ᵗ), so
    both blocks come from M̂. Fails on: the complement's norm taken from the uncorrected M (at t = 1, 1 − β₁ = 0.1
    of what it should be)."""
    _reference_steps_the_corrected_momentum(monkeypatch)
    _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": 2, "refresh_every": 3}, extra={"inner.bias_correction": True}, steps=8)


def test_bias_correction_leaves_the_scale_free_complements_alone(monkeypatch):
    """The counterpart that holds: with a fixed scale the complement c·NS(C) does not depend on M's size, so
    ``inner.bias_correction`` only rescales the subspace block (M̂ there)."""
    _reference_steps_the_corrected_momentum(monkeypatch)
    _check_kl([(6, 8), (8, 6)], {"lr": 1e-2, "rank": 2, "refresh_every": 3, "complement_scale": "identity"},
              extra={"inner.bias_correction": True}, steps=8)
