"""The eigenvalue rule's momentum kept split against a restricted side's subspace (``inner.momentum_basis =
"subspace"``, pro_kl_shampoo's preset): the same optimizer as the momentum in the original coordinates, without
splitting the momentum on every step."""

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt.inner_rules.eigenvalue import SubspaceMomentumState
from kronopt.types import StepContext
from tests.unit._momentum_runs import run_momentum_basis

# (12, 8) and (30, 7): the restricted (larger) side on the left; (8, 20) on the right; (6, 6): a square block
SHAPES = [(12, 8), (8, 20), (6, 6), (30, 7)]


def _run(basis, steps=23, shapes=SHAPES, preset="pro_kl_shampoo", **overrides):
    if preset == "pro_kl_shampoo":
        overrides = {"split.rank": 3, **overrides}
    return run_momentum_basis(preset, basis, shapes, steps, **overrides)


def _moments(opt):
    out = []
    for bucket in opt._buckets:
        cfg = opt._bucket_config(bucket)
        ctx = kronopt.compose.context(cfg, bucket.layout, bucket.state, bucket.state.step)
        out.append(cfg.inner.moment(bucket.state.inner, ctx))
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        # (a restricted side without a skipped first call, or without the first call's refresh, is refused)
        {}, {"inner.bias_correction": True}, {"factor_update": "before"}, {"split.side": "right"},
        {"refresh.stagger": True},
    ],
    ids=["preset", "bias_correction", "update_before", "right_side", "stagger"],
)
def test_the_split_momentum_is_the_same_optimizer(overrides):
    """Over 23 steps with a refresh every 3 (each re-splits the momentum against the new subspace), on blocks
    restricted on the left and on the right: the weights and the momentum in the original coordinates agree
    with the momentum kept whole to float64 rounding. A part fed the wrong part of G, a refresh that kept the
    old split, or a bias correction of one part only would move them by far more."""
    a, pa = _run("original", **overrides)
    b, pb = _run("subspace", **overrides)
    assert all(isinstance(bk.state.inner, SubspaceMomentumState) for bk in b._buckets)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-11, atol=1e-11)
    for x, y in zip(_moments(a), _moments(b)):
        torch.testing.assert_close(y, x, rtol=1e-11, atol=1e-11)


def test_the_parts_are_the_momentums_split_against_the_current_subspace():
    """After steps and refreshes, each block's parts are M U and M − M U Uᵀ of its momentum M for the subspace U
    it holds now (Uᵀ M and M − U Uᵀ M on the left), computed here from M directly."""
    opt, _ = _run("subspace", steps=11)
    seen = set()
    for bucket in opt._buckets:
        layout, state = bucket.layout, bucket.state
        M = _moments(opt)[opt._buckets.index(bucket)]
        if layout.left == "restricted":
            U = state.basis.Q_L
            coords, complement = U.mT @ M, M - U @ (U.mT @ M)
        else:
            U = state.basis.Q_R
            coords, complement = M @ U, M - (M @ U) @ U.mT
        seen.add(layout.left)
        torch.testing.assert_close(state.inner.momentum_coords, coords, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.inner.momentum_complement, complement, rtol=1e-12, atol=1e-12)
        # the complement is orthogonal to the subspace
        across = U.mT @ complement if layout.left == "restricted" else complement @ U
        assert across.abs().max() < 1e-12 * max(1.0, complement.abs().max().item())
    assert seen == {"restricted", "full"}


@pytest.mark.parametrize("shape", [(6, 16), (16, 6)])
def test_a_plain_step_splits_the_gradient_once_and_the_momentum_not_at_all(shape, monkeypatch):
    """On a plain step the gradient's split (StepContext.subspace_split) is made once and serves the factor
    update and the momentum; nothing splits the momentum (one subspace product, one complement per step: with the
    momentum kept whole they are two of each)."""
    projections, splits = [], []
    out_right, out_left, split = linalg.project_out_right, linalg.project_out_left, StepContext.subspace_split
    monkeypatch.setattr(linalg, "project_out_right", lambda *a, **k: projections.append(1) or out_right(*a, **k))
    monkeypatch.setattr(linalg, "project_out_left", lambda *a, **k: projections.append(1) or out_left(*a, **k))

    def spy(self, X):
        splits.append(X)
        return split(self, X)

    monkeypatch.setattr(StepContext, "subspace_split", spy)
    counts = {}
    for basis in ("original", "subspace"):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(*shape, generator=gen))
        opt = kronopt.build([("w", w)], "pro_kl_shampoo", **{"refresh.every": 100, "split.rank": 2, "inner.momentum_basis": basis})
        for _ in range(3):  # a first call, the first refresh, a plain step
            w.grad = torch.randn(*shape, generator=gen)
            opt.step()
        projections.clear(), splits.clear()
        w.grad = torch.randn(*shape, generator=gen)
        opt.step()
        counts[basis] = len(projections)
        if basis == "subspace":
            assert len(splits) == 2 and splits[0] is splits[1]  # the rule's and the factor update's: one gradient
    # project_out_left goes through project_out_right: a left-restricted complement counts twice
    per = 2 if shape[0] > shape[1] else 1
    assert counts == {"original": 2 * per, "subspace": per}


def test_a_layout_without_one_restricted_side_keeps_the_momentum_whole():
    """kl_shampoo's full sides with ``"subspace"``: the momentum in the original coordinates, bit for bit."""
    a, pa = _run("original", preset="kl_shampoo", steps=8)
    b, pb = _run("subspace", preset="kl_shampoo", steps=8)
    assert not any(isinstance(bk.state.inner, SubspaceMomentumState) for bk in b._buckets)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize(("saved", "loaded"), [("original", "subspace"), ("subspace", "original")])
def test_a_checkpoint_loads_across_the_two_forms_of_the_momentum(saved, loaded):
    """A pro_kl_shampoo state saved with the momentum whole (the preset before ``"subspace"``) loads into the split
    form, split against each block's saved subspace, and the other way round: both then go on as the optimizer
    that saved it, to float64 rounding, on blocks restricted on the left and on the right."""
    a, pa = _run(saved, steps=7)
    b, pb = _run(loaded, steps=2)
    with pytest.warns(UserWarning, match="different config"):
        b.load_state_dict(a.state_dict())
    for p, q in zip(pb, pa):
        with torch.no_grad():
            p.copy_(q)
    gen = torch.Generator().manual_seed(2)
    for _ in range(8):  # two refreshes
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in pa]
        for opt, params in ((a, pa), (b, pb)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-11, atol=1e-11)
    kept = SubspaceMomentumState if loaded == "subspace" else kronopt.inner_rules.MomentumState
    assert all(isinstance(bk.state.inner, kept) for bk in b._buckets)


def test_a_checkpoint_of_another_pipeline_is_still_refused():
    """The conversion reads only the eigenvalue rule's momentum: kl_shampoo's momentum in the eigenbasis does not
    load into pro_kl_shampoo (a clear error naming the parts), as before."""
    a, _ = _run("eigen", preset="kl_shampoo", steps=3)
    b, _ = _run("subspace", steps=3)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="does not fit this pipeline"):
        b.load_state_dict(a.state_dict())


def test_a_malformed_saved_momentum_is_refused_with_the_pipelines_error():
    """A saved momentum whose shape does not fit the block's saved subspace is left to stack_entries, whose
    ValueError names the block and the keys (not a product's shape error from the conversion), and the
    optimizer is left as it was."""
    a, _ = _run("original", steps=5)
    b, _ = _run("subspace", steps=5)
    sd = a.state_dict()
    sd["state"][0]["inner.momentum_buffer"] = sd["state"][0]["inner.momentum_buffer"][:-1]
    before = {k: v.clone() for k, v in kronopt.compose.flatten(b._buckets[0].state).items() if isinstance(v, torch.Tensor)}
    with pytest.warns(UserWarning, match="different config"), pytest.raises(ValueError, match="does not fit this pipeline"):
        b.load_state_dict(sd)
    after = kronopt.compose.flatten(b._buckets[0].state)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_moment_reads_a_basis_stored_narrower_than_the_momentum():
    """``moment()`` on the optimizer's stored state, whose basis is kept in bfloat16 and momentum in float32 (as
    ``inspect`` or a plugin may call it): the momentum, read with that basis, not a dtype error."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 20, generator=gen))
    opt = kronopt.build([("w", w)], "pro_kl_shampoo", **{"refresh.every": 3, "split.rank": 3, "storage.basis": "bfloat16"})
    for _ in range(5):
        w.grad = torch.randn(8, 20, generator=gen)
        opt.step()
    bucket = opt._buckets[0]
    cfg = opt._bucket_config(bucket)
    state = bucket.state
    assert state.basis.Q_R.dtype == torch.bfloat16 and state.inner.momentum_complement.dtype == torch.float32
    ctx = kronopt.compose.context(cfg, bucket.layout, state, state.step)
    M = cfg.inner.moment(state.inner, ctx)
    U = state.basis.Q_R.float()
    expected = state.inner.momentum_coords @ U.mT + state.inner.momentum_complement
    torch.testing.assert_close(M, expected, rtol=1e-6, atol=1e-6)
