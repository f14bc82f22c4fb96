"""The plain Muon CPU path (``KronOptimizer._step_plain_muon``: block by block around one batched iteration,
the momentum advanced in place) against the general path (``compose.step`` on sanitized stacks, every changed
tensor tested, then copied), bit for bit, and against ``torch.optim.Muon``.

The general path is forced by turning ``optimizer._PLAIN_MUON_CPU`` off. The blocks are made too large for the
small buckets' path (``_SMALL_TOGETHER_MAX`` set to 0), so every matrix bucket reaches ``_step_bucket``. The
gradients hold a NaN block, an infinite one and a finite one too large to prove the momentum finite (those
buckets go to the general path for that step); a direction made non-finite on purpose (the iteration patched
for both optimizers alike) checks that the path skips such a block as the general path does.
"""

import warnings

import pytest
import torch

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module
from kronopt.inner_rules.orthogonalize import OrthogonalizeInner

pytestmark = pytest.mark.usefixtures("one_thread")

#: a bucket of three blocks, a conv kernel (a block reshaped from its 4-D tensor), a matrix stored column-major
#: (its gradient too: its block is a copy), a tall one-block bucket, a gain for the AdamW fallback
SHAPES = [(24, 16), (24, 16), (24, 16), (6, 4, 3, 3), (20, 30), (40, 12), (9,)]
COLUMN_MAJOR = 4


def _grads(step: int, gen: torch.Generator) -> list[torch.Tensor]:
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    grads[COLUMN_MAJOR] = grads[COLUMN_MAJOR].mT.contiguous().mT
    if step == 2:
        grads[1][2, 3] = float("nan")  # one block of the three-block bucket
    if step == 3:
        grads[5][0, 0] = float("inf")  # the one-block bucket
    if step == 4:
        grads[0][1, 1] = 1e38  # finite, but past the bound that proves the momentum finite
    return grads


def _nan_direction_at(step: int, block: int):
    """``OrthogonalizeInner.orthogonalize`` with a NaN in one block of the three-block bucket at the ``step``-th
    call on that bucket, for both paths alike (the general path's ``direction`` calls it too)."""
    real = OrthogonalizeInner.orthogonalize
    calls = {}

    def patched(self, U, **kw):
        O = real(self, U, **kw)
        if U.shape[0] == 3:
            calls[id(self)] = calls.get(id(self), 0) + 1
            if calls[id(self)] == step:
                O = O.clone()
                O[block, 0, 0] = float("nan")
        return O

    return patched


def count_plain_steps(patch, took: list) -> None:
    """Under ``patch`` (a ``monkeypatch.context()``), append to ``took`` what each call of the plain Muon path returns
    (whether it stepped its bucket)."""
    real = optimizer_module.KronOptimizer._step_plain_muon

    def counted(self, bucket, step_ok, cfg):
        out = real(self, bucket, step_ok, cfg)
        took.append(out)
        return out

    patch.setattr(optimizer_module.KronOptimizer, "_step_plain_muon", counted)


def _run(monkeypatch, *, fast: bool, steps: int = 7, **overrides):
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    start[COLUMN_MAJOR] = start[COLUMN_MAJOR].mT.contiguous().mT
    params = [torch.nn.Parameter(w) for w in start]
    stepped = []
    with monkeypatch.context() as patch:
        patch.setattr(optimizer_module, "_PLAIN_MUON_CPU", fast)
        patch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
        patch.setattr(OrthogonalizeInner, "orthogonalize", _nan_direction_at(step=6, block=2))
        count_plain_steps(patch, stepped)
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "muon", **overrides)
        gen = torch.Generator().manual_seed(2)
        for step in range(steps):
            for p, g in zip(params, _grads(step, gen)):
                p.grad = g
            with warnings.catch_warnings():  # the skipped blocks' reports: compared through the counts
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), stepped


def _same(fast, slow):
    for a, b in zip(fast[0], slow[0]):
        assert torch.equal(a, b)
    assert fast[1].keys() == slow[1].keys()
    for i in fast[1]:
        assert fast[1][i].keys() == slow[1][i].keys()
        for key, value in fast[1][i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, slow[1][i][key]), (i, key)
                if value.is_floating_point():
                    assert torch.isfinite(value).all()
            else:
                assert value == slow[1][i][key], (i, key)
    assert fast[2] == slow[2]


@pytest.mark.parametrize(
    "nesterov, scope, ns_dtype, order",
    [
        (True, "step", "bfloat16", "before"),
        (True, "block", "bfloat16", "after"),
        (False, "step", "float32", "after"),
        (False, "block", "bfloat16", "before"),
        (True, "block", "float16", "before"),
    ],
)
def test_the_plain_path_steps_every_block_as_the_general_path_bit_for_bit(monkeypatch, nesterov, scope, ns_dtype, order):
    """Weights, momentum, counters and skip counts, over steps with a NaN block, an infinite block, a gradient too
    large to prove, and a non-finite direction (step 6, the three-block bucket's third block). Fails on a look-ahead
    weighted otherwise than the general path's, the momentum advanced before the direction's test or for a skipped
    block, the shape factor of another block, a block's direction read from the wrong slice of the iteration, a
    decay or step factor of another group, or a bucket the path stepped though a gradient could not be proven."""
    overrides = {"inner.nesterov": nesterov, "nonfinite_scope": scope, "inner.ns_dtype": ns_dtype,
                 "post.weight_decay_order": order, "weight_decay": 0.05}
    fast = _run(monkeypatch, fast=True, **overrides)
    slow = _run(monkeypatch, fast=False, **overrides)
    _same(fast, slow)
    assert not any(slow[3])  # the general path stepped every bucket
    assert sum(fast[3]) >= 3 * 5  # the plain path stepped the three matrix buckets, but where a gradient was unproven
    assert not all(fast[3])  # and gave those to the general path
    if scope == "block":
        assert fast[2]["p1"] == 1 and fast[2]["p5"] == 1 and fast[2]["p2"] == 1  # NaN, inf, and the NaN direction


def test_a_skipped_direction_leaves_its_block_and_momentum_as_they_were(monkeypatch):
    """Under ``nonfinite_scope = "block"`` a block whose direction is not finite keeps its weights and its momentum
    exactly, while the others of its bucket move."""
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(3)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "muon", nonfinite_scope="block")
    for p in params:
        p.grad = torch.randn(24, 16)
    opt.step()
    before = [(p.detach().clone(), opt.state[p]["inner.momentum_buffer"].clone()) for p in params]
    monkeypatch.setattr(OrthogonalizeInner, "orthogonalize", _nan_direction_at(step=1, block=1))
    for p in params:
        p.grad = torch.randn(24, 16)
    with pytest.warns(RuntimeWarning, match="p1"):
        opt.step()
        opt.flush_warnings()  # a report is read a step late, where it waits for nothing
    assert torch.equal(params[1], before[1][0]) and torch.equal(opt.state[params[1]]["inner.momentum_buffer"], before[1][1])
    for i in (0, 2):
        assert not torch.equal(params[i], before[i][0])
        assert not torch.equal(opt.state[params[i]]["inner.momentum_buffer"], before[i][1])
    assert opt.nonfinite_counts() == {"p0": 0, "p1": 1, "p2": 0}


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_the_plain_path_is_torch_muon(monkeypatch, adjust, nesterov):
    """Blocks past the small buckets' bound, so the plain path steps them (counted): ``torch.optim.Muon`` with its
    own defaults and the same learning rate, to the rounding of a bfloat16 iteration."""
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    took = []
    real = optimizer_module.KronOptimizer._step_plain_muon
    monkeypatch.setattr(optimizer_module.KronOptimizer, "_step_plain_muon", lambda *a: took.append(real(*a)) or took[-1])
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(s, generator=gen) for s in [(48, 32), (48, 32), (32, 80)]]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    opt = kronopt.build(ours, "muon", lr=1e-3, **{"inner.scale": adjust, "inner.nesterov": nesterov})
    ref = torch.optim.Muon(theirs, adjust_lr_fn=adjust, nesterov=nesterov)
    for _ in range(20):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert took and all(took)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize(
    "overrides",
    [{"inner.coefficients": "custom", "inner.custom_coefficients": [[3.4445, -4.775, 2.0315]]},
     {"inner.momentum_form": "classic"}, {"post.grafting": "adam"}, {"post.normalize": True},
     {"storage.moments": "bfloat16"}, {}],
    ids=["custom schedule", "classic momentum", "grafting", "normalize", "bfloat16 storage", "muon"],
)
def test_what_the_plain_path_leaves_to_the_general_one(monkeypatch, overrides):
    """A schedule the library cannot vouch for (a custom one may blow a finite input up), the classic momentum (not
    a convex combination), grafting and normalisation (they read the whole direction) and a storage dtype of its
    own go to the general path; the preset itself to the plain one. Fails on a path that takes a config whose
    proof it does not hold, or that never takes the preset."""
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    took = []
    real = optimizer_module.KronOptimizer._step_plain_muon
    monkeypatch.setattr(optimizer_module.KronOptimizer, "_step_plain_muon", lambda *a: took.append(real(*a)) or took[-1])
    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(2)]
    opt = kronopt.build(params, "muon", **overrides)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(24, 16)
        opt.step()
    assert took == ([True, True] if not overrides else [False, False])
    bucket = opt._buckets[0]
    assert compose.is_plain_muon(opt._group_cfgs[bucket.group], bucket.layout, torch.float32) == (not overrides)


def test_a_momentum_made_under_inference_mode_is_left_to_the_general_path(monkeypatch):
    """A first step under ``torch.inference_mode()`` makes inference stacks, which a step outside it may not update
    in place: the general path replaces them. Fails on an in-place update of such a stack (a RuntimeError)."""
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(2)]
    opt = kronopt.build(params, "muon")
    for p in params:
        p.grad = torch.randn(24, 16)
    with torch.inference_mode():
        opt.step()
    for p in params:
        p.grad = torch.randn(24, 16)
    opt.step()
    opt.step()  # and the stacks it made then are plain ones the path updates in place
    assert not opt.state[params[0]]["inner.momentum_buffer"].is_inference()


def test_the_look_ahead_stack_is_kept_across_steps(monkeypatch):
    """The look-ahead stack and the block-sized direction are made once per shape and kept (on a CPU): a
    second step takes the same tensors."""
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(2)]
    opt = kronopt.build(params, "muon")
    seen = []
    real = optimizer_module.KronOptimizer._muon_scratch
    monkeypatch.setattr(optimizer_module.KronOptimizer, "_muon_scratch", lambda *a: seen.append(real(*a)) or seen[-1])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(24, 16)
        opt.step()
    assert len(seen) == 2 and all(a is b for a, b in zip(*seen))
    assert seen[0][0].shape == (2, 24, 16) and seen[0][0].dtype == torch.bfloat16 and seen[0][1].shape == (24, 16)
