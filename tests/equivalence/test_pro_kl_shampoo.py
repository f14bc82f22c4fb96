"""The pro_kl_shampoo preset against the float64 clean-room reference ``tests/reference/pro_kl_shampoo.py``.

Step for step (every parameter after every call), float64 state and Newton–Schulz, ≥ 50 calls with a refresh every
3–5 updates, over a wide (6×8), a tall (8×6) and a square (7×7) block, both trackers, both restricted sides (and
"larger"), damping on/off and several complement scales.  ``rtol = 1e-10, atol = 1e-12`` (observed agreement: ~1e-15
relative). Clamping on, tight (max_clamp below a side of 12) and off runs where the clamp binds (small gradients; with
unit ones every root stays far below it), each case asserting that it does, on both sides.

Mutations of the restricted path that these tests must catch (issue 9): the complement not projected, the
Rayleigh–Ritz rotation dropped, the restricted tracker's ρ decay dropped, μ multiplied instead of divided.
"""

import pytest
import torch

import kronopt
from tests.equivalence._helpers import assert_histories_close, pro_kl_overrides, reference_grads, run_history
from tests.reference.pro_kl_shampoo import ProKlState, pro_kl_reference

SHAPES = [(6, 8), (8, 6), (7, 7)]
STEPS = 50

#: muon.md §4's `polar_express` table, typed from the spec (kronopt's NS_SCHEDULES must agree with it).
MUON_MD_POLAR_EXPRESS = [
    (8.2051, -22.9019, 16.4607),
    (4.0664, -2.8612, 0.5184),
    (3.9096, -2.8234, 0.5250),
    (3.2856, -2.4153, 0.4853),
    (2.2779, -1.6198, 0.3985),
    (1.8726, -1.2307, 0.3585),
    (1.8564, -1.2132, 0.3568),
    (1.8750, -1.2500, 0.3750),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _named(params):
    return [(f"blocks.{i}.weight", p) for i, p in enumerate(params)]




def _overrides(options):
    out = pro_kl_overrides(options)
    if options.get("ns_coefficients") is MUON_MD_POLAR_EXPRESS:
        out["split.ns_coefficients"] = "polar_express"
    return out


def _case(id_, **options):
    return pytest.param({"lr": 1e-2, **options}, id=id_)


CASES = [
    _case("power-right-whitened", tracker="power", side="right", rank=2, refresh_every=3),
    _case("sketch-right-whitened", tracker="sketch", side="right", rank=2, refresh_every=4),
    _case("power-left-identity", tracker="power", side="left", rank=2, complement_scale="identity", refresh_every=5),
    _case(
        "sketch-left-identity-damped", tracker="sketch", side="left", rank=3, complement_scale="identity",
        using_damping=True, eps=1e-2, refresh_every=3,
    ),
    _case("power-larger-default-rank-damped", tracker="power", side="larger", using_damping=True, eps=1e-2, refresh_every=4),
    _case("rank0-whitened", tracker="power", side="right", rank=0, refresh_every=3),
    _case(
        "power-larger-number-betas", tracker="power", side="larger", rank=2, complement_scale=0.7, ns_steps=7,
        betas=(0.8, 0.9), shampoo_beta=0.7, weight_decay=0.1, refresh_every=4,
    ),
    _case(
        "sketch-right-polar-express", tracker="sketch", side="right", rank=2, ns_coefficients=MUON_MD_POLAR_EXPRESS,
        ns_steps=8, refresh_every=3,
    ),
]


@pytest.mark.parametrize("options", CASES)
def test_pro_kl_shampoo_matches_reference(options):
    gen = torch.Generator().manual_seed(20260512)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, STEPS)
    ref = pro_kl_reference(params, grads, **options)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(_named(ours_params), "pro_kl_shampoo", **_overrides(options))
    sides = [b["sides"] for b in opt.bucket_summary()]
    assert all("restricted" in s for s in sides), sides  # the restricted path is what runs
    ours = run_history(opt, ours_params, grads)
    for p, q in zip(ours[-1], params):
        assert (p - q).abs().max() > 1e-2  # the parameters really moved
    assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12)


#: Cases where the clamp binds (unit gradients keep every root far below it: c = max(10, min(d, max_clamp)) is 10 on
#: every side of SHAPES, whatever max_clamp). Gradients of size 1e-2 and init_factor = 1e-3 put λ under 1/c² on some
#: directions of both sides (the restricted side's tracked σ included), not all. Each: the blocks, the clamp c of
#: each block's (left, right) side by hand (None: unclamped, then the largest c a side could have, which its roots
#: must exceed), the options.
CLAMP_CASES = [
    pytest.param(
        SHAPES, [(10.0, 10.0)] * 3,
        {"tracker": "power", "side": "right", "rank": 2, "refresh_every": 3},
        id="power-right-clamped",
    ),
    pytest.param(
        [(6, 12), (12, 6)], [(10.0, 11.0), (11.0, 10.0)],  # max_clamp 11 < 12: c = 11 on a side of 12 (12 by default)
        {"tracker": "power", "side": "right", "rank": 2, "complement_scale": "match_rms_adamw", "complement_mult": 0.5,
         "max_clamp_value": 11.0, "refresh_every": 3},
        id="power-right-adamw-scale-tight-clamp",
    ),
    pytest.param(
        [(6, 12), (12, 6)], [None, None],
        {"tracker": "sketch", "side": "larger", "rank": 3, "complement_scale": "muon", "using_clamping": False,
         "refresh_every": 5},
        id="sketch-larger-muon-unclamped",
    ),
]


def _reference_and_roots(params, grads, options):
    """The reference's history, and its tracked roots (s_L, τ) of every block after every call but the first (whose
    roots are init_factor^{-1/2}, never clamped), stepping the reference one call at a time on its own state."""
    states = [ProKlState() for _ in params]
    history, roots = [], [([], []) for _ in params]
    weights = params
    for k, call in enumerate(grads):
        weights = pro_kl_reference(weights, [call], states=states, **options)[0]
        history.append(weights)
        for state, (s_L, tau) in zip(states, roots):
            if k:
                s_L.append(state.s_L)
                tau.append(state.tau)
    return history, [(torch.cat(s_L), torch.cat(tau)) for s_L, tau in roots]


@pytest.mark.parametrize(("shapes", "clamps", "options"), CLAMP_CASES)
def test_pro_kl_shampoo_matches_reference_where_the_clamp_binds(shapes, clamps, options):
    """The clamp of both sides' tracked roots, the restricted side's σ (its EMA and its re-projection) included:
    the reference's roots sit at c on some updates and below it on others (or, unclamped, go past any c), and the
    preset follows it step for step. An unclamped σ, a clamp from max_clamp or the side alone, or clamping that
    cannot be turned off, each fails."""
    options = {"lr": 1e-2, "init_factor": 1e-3, "shampoo_beta": 0.9, **options}
    gen = torch.Generator().manual_seed(20260512)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[1e-2 * g for g in call] for call in reference_grads(gen, shapes, 30)]
    ref, roots = _reference_and_roots(params, grads, options)
    for shape, clamp, (s_L, tau) in zip(shapes, clamps, roots):
        if clamp is None:
            assert s_L.max() > 12.0 and tau.max() > 12.0, (shape, s_L.max(), tau.max())
            continue
        for c, s in zip(clamp, (s_L, tau)):  # the EMA's root min(λ^{-1/2}, c) is c exactly where the clamp binds
            assert (s == c).any() and (s < c).any() and (s <= c).all(), (shape, c, s.max())
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(_named(ours_params), "pro_kl_shampoo", **_overrides(options))
    sides = [b["sides"] for b in opt.bucket_summary()]
    assert all("restricted" in s for s in sides), sides
    ours = run_history(opt, ours_params, grads)
    for p, q in zip(ours[-1], params):
        assert (p - q).abs().max() > 1e-2  # the parameters really moved
    assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_sides_follow_the_option():
    """The cases above run the side they name (a tall block is left-restricted under "larger")."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    for side, expected in (
        ("right", [("full", "restricted")] * 3),
        ("left", [("restricted", "full")] * 3),
        ("larger", [("full", "restricted"), ("restricted", "full"), ("full", "restricted")]),
    ):
        opt = kronopt.build(_named(params), "pro_kl_shampoo", **{"split.side": side, "split.rank": 2})
        by_shape = {(b["m"], b["n"]): b["sides"] for b in opt.bucket_summary()}
        assert [by_shape[s] for s in SHAPES] == expected


def test_normalize_grads_normalises_the_whole_step():
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, 12)
    options = {"lr": 1e-2, "rank": 2, "refresh_every": 3}
    ref = pro_kl_reference(params, grads, normalize_grads=True, **options)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(_named(ours_params), "pro_kl_shampoo", **{**_overrides(options), "post.normalize": True})
    assert_histories_close(run_history(opt, ours_params, grads), ref, rtol=1e-10, atol=1e-12)
    # the deprecated inner.normalize normalises the subspace block alone: not the spec's step
    old_params = [torch.nn.Parameter(p.clone()) for p in params]
    with pytest.warns(DeprecationWarning, match="use post.normalize"):
        old = kronopt.build(_named(old_params), "pro_kl_shampoo", **{**_overrides(options), "inner.normalize": True})
    with pytest.raises(AssertionError):
        assert_histories_close(run_history(old, old_params, grads), ref, rtol=1e-10, atol=1e-12)
