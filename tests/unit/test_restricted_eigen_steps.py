"""Pro-KLShampoo's small-bucket calls made together (``compose.eigen_steps`` with a restricted side, the momentum split
against its subspace and the ``lowrank_flat`` split) against the pipeline (``compose.step``), bit for bit.

The path makes the subspace momenta of many buckets in one ``foreach`` call per operation, their scales in one pass
over the eigenvalues of them all, and the complements' Newton–Schulz iterations interleaved
(``linalg.newton_schulz_each``: each product in its turn, each bfloat16 rounding of them all in one pair of
``foreach`` copies). Every bit of the direction and the new state must be the pipeline's, for every setting the
path takes, refreshes (the subspace's re-projection) included.
"""

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, linalg
from kronopt.types import Layout
from tests.unit._together import (
    assert_records_equal, assert_same_training, drawn_calls_as_the_pipeline, made_together_as_the_pipeline,
    pipeline_state, train_two_groups,
)

CONFIGS = {
    "pro_kl_shampoo": ("pro_kl_shampoo", {}),
    "bias-corrected": ("pro_kl_shampoo", {"inner.bias_correction": True}),
    "ε inside, exponent -1/4": ("pro_kl_shampoo", {"inner.eps_placement": "inside", "inner.exponent": -0.25}),
    "ε outside": ("pro_kl_shampoo", {"inner.eps_placement": "outside", "inner.eps": 1e-3}),
    "exponent -0.3 (scales block by block)": ("pro_kl_shampoo", {"inner.exponent": -0.3}),
    "the identity's complement scale": ("pro_kl_shampoo", {"split.complement_scale": "identity"}),
    "a numeric complement scale": ("pro_kl_shampoo", {"split.complement_scale": 0.7, "split.complement_mult": 2.0}),
    "the subspace block's RMS": ("pro_kl_shampoo", {"split.complement_scale": "match_subspace_rms"}),
    "whitened, doubled": ("pro_kl_shampoo", {"split.complement_mult": 2.0}),
    "the sketch tracker": ("pro_kl_shampoo", {"factors.tracker": "sketch"}),
    "damped": ("pro_kl_shampoo", {"factors.damping": 1e-3}),
    "factors before the direction": ("pro_kl_shampoo", {"factor_update": "before"}),
    "grafted": ("pro_kl_shampoo", {"post.grafting": "adam"}),
    "Newton–Schulz on the Gram matrix": ("pro_kl_shampoo", {"split.ns_form": "gram"}),
    "Newton–Schulz in float32": ("pro_kl_shampoo", {"split.ns_dtype": "float32"}),
    "the ema estimator (eigenvalues from the basis)": ("pro_kl_shampoo", {"factors.type": "ema"}),
    "Shampoo with the split": ("shampoo", {
        "split.type": "lowrank_flat", "inner.momentum_basis": "subspace", "basis.type": "qr", "skip_first_call": True,
        "refresh.at_first_call": True,
    }),
    "Newton–Schulz, other schedule and norm floor": (
        "pro_kl_shampoo", {"split.ns_coefficients": "polar_express", "split.ns_steps": 4, "split.ns_eps": 1e-3}
    ),
}

LAYOUTS = [
    Layout(batch=1, m=17, n=26, left="full", right="restricted", rank_right=6),  # bfloat16 in float32 kernels
    Layout(batch=2, m=24, n=12, left="restricted", right="full", rank_left=6),  # tall, the left side restricted
    Layout(batch=3, m=16, n=40, left="full", right="restricted", rank_right=10),  # a stack, the Gram form pays
    Layout(batch=1, m=9, n=12, left="full", right="restricted", rank_right=3),  # bfloat16 kernels (16³ or fewer)
    Layout(batch=1, m=6, n=30, left="none", right="restricted", rank_right=7),  # the other side not rotated
    Layout(batch=2, m=7, n=7, left="full", right="full"),  # the rank reaches the side: no complement
    Layout(batch=1, m=5, n=9, left="full", right="restricted", rank_right=8),  # a complement of one direction
]


def _made(configs, layouts, update, seed, scale=1.0):
    """Each config on each layout, some in float64, its call at update ``update(j, k)`` made with the others in one
    ``eigen_steps`` call against each bucket's ``compose.step``, bit for bit. Returns ``[(call, new state)]``."""
    return made_together_as_the_pipeline(
        compose.eigen_steps, compose.eigen_steps_due, configs, layouts,
        lambda cfg, j, k: update(j, k) - 1 + cfg.skip_first_call, lambda j, k: (j + 2 * k) % 5 == 0, seed, scale,
    )


def test_plain_calls_of_many_settings_equal_the_pipeline_bit_for_bit():
    """Nineteen settings (the ``ema`` estimator's and Shampoo's eigenvalues from the basis among them) on restricted
    layouts of either side, stacked, tall and wide, with the other side rotated or
    not, and one whose rank reaches its side, float32 and float64 in one call, at updates with no refresh due."""
    made = _made(CONFIGS, LAYOUTS, lambda j, k: 12 + (j + k) % 7, seed=0)
    assert not any(call[0].refresh.due(call[2].step + 1, first_call=False) for call, _ in made)
    assert len(made) == len(CONFIGS) * len(LAYOUTS)


def test_calls_with_no_restricted_side_alone_are_kl_shampoo_s():
    """A call of buckets whose rank reaches their side only (no complement to add), as the pipeline makes them."""
    _made(CONFIGS, [LAYOUTS[5], Layout(batch=1, m=3, n=3, left="full", right="full")], lambda j, k: 12 + j, seed=6)


def test_refresh_calls_made_together_equal_the_pipeline_bit_for_bit():
    """Calls at the tenth and twentieth updates (a refresh due: a new subspace, the factors and the momentum's parts
    re-projected onto it) among plain ones."""
    made = _made(CONFIGS, LAYOUTS, lambda j, k: (10, 20, 15)[(j + k) % 3], seed=1)
    refreshed = [call for call, new in made if new.basis.refreshes != call[2].basis.refreshes]
    assert len(refreshed) >= len(made) // 2


def test_the_first_calls_after_the_one_that_builds_the_factors_are_taken_as_the_pipeline_makes_them():
    """The second and third calls: the subspace built at the first refresh, eigenvalue estimates at their start."""
    _made({"pro_kl_shampoo": CONFIGS["pro_kl_shampoo"]}, LAYOUTS, lambda j, k: 1 + j % 2, seed=2)


def test_small_gradients_put_the_estimates_at_their_floors_and_ceilings_as_alone():
    """Gradients of 1e-3 against estimates that start at 1e-4: inverse roots at their ceilings and flat eigenvalues
    at their floors, each side's own, made together as alone."""
    configs = {
        name: (preset, {**overrides, "factors.init_factor": 1e-4}) for name, (preset, overrides) in CONFIGS.items()
        if preset == "pro_kl_shampoo" and "factors.type" not in overrides  # KL's estimates
    }
    made = _made(configs, LAYOUTS[:3], lambda j, k: 5 + 6 * ((j + k) % 2), seed=3, scale=1e-3)
    ceilings, floors = set(), set()
    for (cfg, layout, *_), new in made:
        f = new.factors
        for s, mu, d in ((f.s_L, f.mu_L, layout.m), (f.s_R, f.mu_R, layout.n)):
            c = cfg.factors._clamp(d)
            if s is not None and (s == c).any():
                ceilings.add(d)
            if mu is not None and (mu == 1.0 / (c * c)).any():
                floors.add(d)
    assert len(ceilings) >= 3 and len(floors) >= 2


def _edited_as_the_pipeline(cfg, layouts, seed, edit, steps=12):
    """A bucket on each layout after ``steps`` calls of the pipeline, its state and next gradient edited by
    ``edit(state, G, layout, gen)`` (which returns both), that call of them all made in one ``eigen_steps`` call
    against each bucket's ``compose.step``, bit for bit. Returns the pipeline's ``[(D, new state)]``."""
    calls, expected = [], []
    for k, layout in enumerate(layouts):
        gen = torch.Generator().manual_seed(seed + k)
        state, G = pipeline_state(cfg, layout, steps, gen)
        state, G = edit(state, G, layout, gen)
        expected.append(compose.step(cfg, layout, state, G.clone()))
        calls.append((cfg, layout, state, G, None))
    for (D, new), (D_ref, new_ref) in zip(compose.eigen_steps(calls), expected):
        assert_records_equal(D, D_ref, "D")
        assert_records_equal(new, new_ref)
    return expected


def test_a_complement_of_rank_one_rounds_its_energies_below_zero_and_both_paths_floor_them():
    """A gradient that is one outer product outside the restricted subspace, along the other side's first basis
    column, on a state whose other side's eigenvalue estimates are infinite (inverse roots 0, as after a vanishing
    direction): the complement's rows' energies in that basis are zero but for the first, and their rounding goes
    below zero in part, which would make a new estimate negative (its inverse root 0) where the floor at 0 leaves
    it positive; both paths floor them, as alone."""
    negative = []

    def edit(state, G, layout, gen):
        left = layout.left == "restricted"
        U, Q = (state.basis.Q_L, state.basis.Q_R) if left else (state.basis.Q_R, state.basis.Q_L)
        f = state.factors
        f = attrs.evolve(f, s_R=torch.zeros_like(f.s_R)) if left else attrs.evolve(f, s_L=torch.zeros_like(f.s_L))
        v = torch.randn(U.shape[0], U.shape[1], 1, generator=gen)
        G = Q[:, :, :1] * (v - U @ (U.mT @ v)).mT  # outside the subspace
        Gc = G - (G @ U) @ U.mT
        negative.append(int(((linalg.mm(Q.mT, linalg.mm(Gc, Gc.mT)) * Q.mT).sum(-1) < 0).sum()))
        return attrs.evolve(state, factors=f), G.mT if left else G

    cfg = kronopt.resolve("pro_kl_shampoo", **{"factors.clamping": False}).bound()
    _edited_as_the_pipeline(cfg, [LAYOUTS[0], LAYOUTS[2], LAYOUTS[1]], 20, edit)
    assert sum(negative) > 0  # the floor is reached


def test_non_finite_gradients_give_the_pipeline_s_new_state():
    """A NaN and an infinite gradient entry (the optimizer skips such blocks, but the call's new state is made first):
    the same state, NaN where the pipeline's has NaN, the flat eigenvalue's NaN statistic taken as its start value."""
    bad = iter((float("nan"), float("inf"), float("nan")))

    def edit(state, G, layout, gen):
        G[0, 1, 2] = next(bad)
        return state, G

    cfg = kronopt.resolve("pro_kl_shampoo").bound()
    expected = _edited_as_the_pipeline(cfg, LAYOUTS[:3], 30, edit)
    mus = [new.factors.mu_R for _, new in expected if new.factors.mu_R is not None]
    assert any(bool((mu == cfg.factors.init_factor).any()) for mu in mus)


def test_a_zero_flat_eigenvalue_leaves_the_complement_out_as_alone():
    """A flat eigenvalue of 0 (an estimator whose complement has seen no energy) makes the whitened norm infinite:
    both paths leave that block's complement out (a zero rescaling), the other blocks' in."""

    def edit(state, G, layout, gen):
        side = "mu_R" if layout.right == "restricted" else "mu_L"
        mu = getattr(state.factors, side).clone().index_fill_(0, torch.tensor([0]), 0.0)
        return attrs.evolve(state, factors=attrs.evolve(state.factors, **{side: mu})), G

    cfg = kronopt.resolve("pro_kl_shampoo").bound()
    expected = _edited_as_the_pipeline(cfg, [LAYOUTS[0], LAYOUTS[2], LAYOUTS[1]], 40, edit)
    assert all(torch.isfinite(D).all() for D, _ in expected)


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "kl_shampoo"])
def test_inverse_roots_laid_out_column_major_step_as_the_pipeline_steps_them(preset):
    """A side's inverse roots loaded column-major (a checkpoint's stacks keep their layout) beside the other's
    row-major: the denominator of KL's product scale then has neither's layout, the pipeline writes the quotient
    over it, and the products rotating it back round by layout; the calls made together lay it out the same
    (rank-one restricted sides and sides of one, where a size-1 axis lets the roots' layout decide, among them)."""
    layouts = (
        [Layout(batch=2, m=31, n=17, left="full", right="restricted", rank_right=1),
         Layout(batch=2, m=27, n=30, left="restricted", right="full", rank_left=1), LAYOUTS[2]]
        if preset == "pro_kl_shampoo" else
        [Layout(batch=2, m=31, n=1, left="full", right="full"), Layout(batch=3, m=7, n=12, left="full", right="full")]
    )
    for side in ("s_L", "s_R"):

        def edit(state, G, layout, gen):
            s_ = getattr(state.factors, side)
            return attrs.evolve(state, factors=attrs.evolve(state.factors, **{side: s_.mT.contiguous().mT})), G

        _edited_as_the_pipeline(kronopt.resolve(preset).bound(), layouts, 50, edit, steps=8)


def test_a_solver_s_eigenvalues_of_zero_take_the_pseudo_inverse_root_as_alone():
    """The ``ema`` estimator's eigenvalues are its basis's (a solver's): those within its rounding of zero (a factor
    rank-deficient at its last refresh) weigh 0 in the whitened norm, where tracked ones would weigh their inverse
    root; the calls made together take them so too."""

    def edit(state, G, layout, gen):
        side = "lam_L" if layout.right == "restricted" else "lam_R"  # the full side's
        lam = getattr(state.basis, side).clone()
        lam[..., -2:] = 0.0
        return attrs.evolve(state, basis=attrs.evolve(state.basis, **{side: lam})), G

    cfg = kronopt.resolve("pro_kl_shampoo", **{"factors.type": "ema"}).bound()
    expected = _edited_as_the_pipeline(cfg, [LAYOUTS[0], LAYOUTS[2], LAYOUTS[1]], 60, edit)
    assert all(torch.isfinite(D).all() for D, _ in expected)


def test_calls_whose_momentum_is_kept_whole_or_normalised_are_refused():
    layout = LAYOUTS[0]

    def due(**overrides):
        cfg = kronopt.resolve("pro_kl_shampoo", **overrides).bound()
        state, _ = pipeline_state(cfg, layout, 4, torch.Generator().manual_seed(4))
        return compose.eigen_steps_due(cfg, layout, state, torch.float32)

    assert due()
    assert not due(**{"inner.momentum_basis": "original"})  # a whole momentum beside a restricted side
    assert not due(**{"post.normalize": True})
    assert not due(**{"storage.moments": "bfloat16"})
    assert not due(compile=True)


# -- Newton–Schulz of many blocks -------------------------------------------------------------------------------

_NS_SHAPES = [(1, 17, 26), (2, 24, 12), (1, 9, 12), (3, 16, 40), (1, 40, 16), (1, 35, 62), (2, 5, 5), (1, 1, 30)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"norm": "add", "eps": 1e-3},
        {"form": "gram"},
        {"dtype": torch.float32},
        {"dtype": torch.float16},
    ],
    ids=["bfloat16", "norm added", "Gram form", "float32", "float16"],
)
def test_newton_schulz_of_many_blocks_equals_each_alone(options):
    """Blocks whose bfloat16 iteration runs in float32 kernels (together) beside blocks of bfloat16 kernels, float64
    and bfloat16 inputs, a transposed view, a zero block and a block of one row (each alone where it must be)."""
    gen = torch.Generator().manual_seed(5)
    U = [torch.randn(s, generator=gen) for s in _NS_SHAPES]
    U[1] = U[1].to(torch.float64)
    U[2] = torch.randn(1, 12, 9, generator=gen).mT  # a view of other strides
    U[4] = U[4].to(torch.bfloat16)
    U[6] = torch.zeros(2, 5, 5)
    U += [torch.zeros(1, 20, 32), 1e-30 * torch.randn(1, 17, 26, generator=gen)]  # zero, tiny blocks rounded together
    schedule = linalg.ns_schedule("kj", 5)
    made = linalg.newton_schulz_each(U, schedule, **options)
    for O, u in zip(made, U):
        alone = linalg.newton_schulz(u, schedule, **options)
        assert O.dtype == alone.dtype and O.shape == alone.shape and torch.equal(O, alone)
    if not options:  # the bfloat16 iteration of the larger blocks ran together: each result its own tensor
        together = [O for O, u in zip(made, U) if linalg._bfloat16_in_float32(u, torch.bfloat16)]
        assert len(together) >= 3 and len({O.data_ptr() for O in together}) == len(together)


def test_newton_schulz_of_many_blocks_makes_its_roundings_together():
    """The blocks whose bfloat16 iteration runs in float32 kernels are rounded all at once: twice as many blocks add
    only their input copies to the copies the iteration makes, not a rounding each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.count += func.overloadpacket.__name__ == "copy_"
            return func(*args, **(kwargs or {}))

    def copies(shapes):
        Copies.count = 0
        U = [torch.randn(s) for s in shapes]
        with Copies():
            made = linalg.newton_schulz_each(U, linalg.ns_schedule("kj", 5))
        assert all(torch.equal(O, linalg.newton_schulz(u, linalg.ns_schedule("kj", 5))) for O, u in zip(made, U))
        return Copies.count

    three = [(1, 17, 26), (1, 20, 32), (1, 26, 44)]
    assert copies(three * 2) - copies(three) == 3


def test_newton_schulz_of_many_blocks_checks_its_options():
    with pytest.raises(ValueError, match="norm must be"):
        linalg.newton_schulz_each([torch.randn(1, 4, 5)], [(3.0, -4.0, 2.0)], norm="max")
    with pytest.raises(ValueError, match="form must be"):
        linalg.newton_schulz_each([torch.randn(1, 4, 5)], [(3.0, -4.0, 2.0)], form="cubic")
    assert linalg.newton_schulz_each([], [(3.0, -4.0, 2.0)]) == []


def test_the_whitened_norms_and_rescalings_of_many_equal_each_alone():
    """Complements of either restricted side, a side not rotated, float32 beside float64, a zero flat eigenvalue
    (an infinite norm), an infinite eigenvalue (a zero weight), a zero block (a zero rescaling)."""
    gen = torch.Generator().manual_seed(7)
    cases = [((2, 6, 9), "right", 6), ((1, 12, 5), "left", 5), ((3, 4, 11), "right", 4), ((1, 7, 3), "right", None),
             ((1, 5, 8), "right", 5)]
    C, Q, lam, mu, side = [], [], [], [], []
    for k, ((b, m, n), where, d) in enumerate(cases):
        dtype = torch.float64 if k == 2 else torch.float32
        C.append(torch.randn(b, m, n, generator=gen, dtype=dtype))
        Q.append(None if d is None else torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=dtype))[0])
        lam.append(None if d is None else torch.rand(b, d, generator=gen, dtype=dtype) + 0.1)
        mu.append(torch.rand(b, generator=gen, dtype=dtype) + 0.1)
        side.append(where)
    mu[0][1] = 0.0  # an infinite norm
    lam[1][0, 2] = float("inf")  # a zero weight
    made = linalg.whitened_complement_norms_each(C, Q, lam, mu, side)
    for nu, c, q, l_, m_, s_ in zip(made, C, Q, lam, mu, side):
        assert torch.equal(nu, linalg.whitened_complement_norm(c, q, l_, m_, restricted=s_))
    assert torch.isinf(made[0][1]).all()
    O = [torch.randn(c.shape, generator=gen, dtype=c.dtype) for c in C]
    O[3].zero_()
    O[4] = O[4] * 1e-42  # subnormal entries, whose squares underflow: a zero norm, a zero rescaling
    norms = [linalg.finite_or_zero(nu) for nu in made]
    for w, o, nu in zip(linalg.rescale_factors_each(O, norms), O, norms):
        assert torch.equal(w, linalg.rescale_factor(o, nu))
    with pytest.raises(ValueError, match="restricted must be"):
        linalg.whitened_complement_norms_each(C[:1], Q[:1], lam[:1], mu[:1], ["top"])


# -- through the optimizer ----------------------------------------------------------------------------------

SHAPES = [(17, 26), (17, 26), (24, 12), (9, 12), (30, 18), (40, 16), (7, 7), (12,)]


def _train(monkeypatch, *, together, overrides=None, poison=True):
    return train_two_groups(
        monkeypatch, "pro_kl_shampoo", SHAPES, switch="_EIGEN_STEPS_TOGETHER", function="eigen_steps",
        together=together, overrides=overrides, poison=poison,
    )


@pytest.mark.parametrize(
    "overrides", [None, {"refresh.stagger": True}, {"inner.bias_correction": True, "factor_update": "before"}],
    ids=["pro_kl_shampoo", "staggered", "bias-corrected, factors first"],
)
def test_the_optimizer_takes_the_same_steps_with_the_calls_together(monkeypatch, overrides):
    """Two param groups of other rates, a NaN gradient and an overflowing one (skipped blocks), refreshes: the same
    parameters, state and skip counts as each bucket through its pipeline."""
    fast = _train(monkeypatch, together=True, overrides=overrides)
    slow = _train(monkeypatch, together=False, overrides=overrides)
    assert fast[3] and max(fast[3]) >= 5 and not slow[3]  # the path was taken, for several buckets at once
    assert_same_training(fast, slow)
    assert fast[2]["p2"] >= 1 and fast[2]["p0"] == 0


# -- drawn settings ---------------------------------------------------------------------------------------

@st.composite
def _drawn_calls(draw):
    """A few buckets of drawn restricted layouts (either side, sides up to 40, ranks below them, stacks of up to 3, the
    other side rotated or not) under drawn settings, each at a drawn update, some in float64."""
    k = draw(st.integers(1, 4))
    calls = []
    for _ in range(k):
        left_restricted = draw(st.booleans())
        d, other = draw(st.integers(2, 40)), draw(st.integers(1, 30))
        r = draw(st.integers(1, d - 1))
        kind = draw(st.sampled_from(["full", "full", "none"]))
        layout = (
            Layout(batch=draw(st.integers(1, 3)), m=d, n=other, left="restricted", right=kind, rank_left=r)
            if left_restricted else
            Layout(batch=draw(st.integers(1, 3)), m=other, n=d, left=kind, right="restricted", rank_right=r)
        )
        overrides = {
            "inner.eps_placement": draw(st.sampled_from(["inside", "outside", "product"])),
            "inner.exponent": draw(st.sampled_from([-0.5, -0.25, -0.3])),
            "inner.bias_correction": draw(st.booleans()),
            "factor_update": draw(st.sampled_from(["after", "before"])),
            "factors.tracker": draw(st.sampled_from(["power", "sketch"])),
            "factors.damping": draw(st.sampled_from([0.0, 0.0, 1e-4])),
            "split.complement_scale": draw(st.sampled_from(["whitened", "whitened", "identity", "match_subspace_rms"])),
            "split.ns_form": draw(st.sampled_from(["standard", "standard", "gram"])),
            "refresh.every": draw(st.integers(2, 6)),
        }
        calls.append((overrides, layout, draw(st.integers(2, 13)), draw(st.booleans())))
    return calls


@settings(max_examples=25, deadline=None)
@given(_drawn_calls(), st.integers(0, 2**16))
def test_drawn_settings_made_together_equal_the_pipeline_bit_for_bit(drawn, seed):
    """The drawn calls in one ``eigen_steps`` call, against each bucket's ``compose.step``."""
    drawn_calls_as_the_pipeline(
        compose.eigen_steps, compose.eigen_steps_due,
        [("pro_kl_shampoo", overrides, layout, update, wide) for overrides, layout, update, wide in drawn], seed,
    )
