"""What a training loop does to a parameter and its state behind the optimizer's back, as torch.optim takes it: a
parameter given another shape (``param.data = ...``) before the first step gets a new state, after it a clear error
with nothing changed; a ``state[p]`` emptied starts that parameter afresh, the others stepping on as before."""

import pytest
import torch

import kronopt

pytestmark = pytest.mark.filterwarnings("ignore:the route sends embeddings")


def _params(gen, shapes, dtype=torch.float64):
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _step(opt, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt.step()


def test_a_parameter_reshaped_before_the_first_step_gets_the_state_of_its_new_shape(gen):
    """As torch.optim makes its state at the first step: the same as an optimizer built on the new shape."""
    a, w = _params(gen, [(12, 8), (6, 6)])
    opt = kronopt.build([a, w], "soap")
    a.data = torch.randn(8, 12, generator=gen, dtype=a.dtype)
    b, v = (torch.nn.Parameter(t.detach().clone()) for t in (a, w))
    fresh = kronopt.build([b, v], "soap")
    for _ in range(4):
        g = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in (a, w)]
        for p, q, x in zip((a, w), (b, v), g):
            p.grad, q.grad = x.clone(), x.clone()
        opt.step()
        fresh.step()
    assert torch.equal(a, b) and torch.equal(w, v)
    assert opt.state[a]["factors.L"].shape == (8, 8)


@pytest.mark.parametrize("preset", ["soap", "muon", "adamw", "kl_shampoo"])
@pytest.mark.parametrize("new_shape", [(8, 12), (12, 9)])
def test_a_parameter_reshaped_after_steps_is_refused_naming_it_with_nothing_changed(gen, preset, new_shape):
    """Same number of entries (the gradient would be read into the old block's entries, scrambled) or another (a
    reshape error deep in the step, after other buckets were written)."""
    a, w = _params(gen, [(16, 13), (12, 8)], torch.float32)
    opt = kronopt.build([("a", a), ("w", w)], preset)
    for _ in range(2):
        _step(opt, [a, w], gen)
    w.data = torch.randn(new_shape, generator=gen)
    for p in (a, w):
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.detach().clone() for p in (a, w)]
    state = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    counters = {k: v for k, v in opt.state[a].items() if not torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match=r"^w was given another shape after the optimizer stacked it as \(12, 8\).*nothing was changed"):
        opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, (a, w)))
    assert all(torch.equal(v, opt.state[a][k]) for k, v in state.items())
    assert counters == {k: v for k, v in opt.state[a].items() if not torch.is_tensor(v)}


def _reset(state, p, how):
    """``how`` torch.optim's ways to restart one parameter: a new dict, the dict cleared, the entry deleted."""
    if how == "replace":
        state[p] = {}
    elif how == "clear":
        state[p].clear()
    elif how == "del":
        del state[p]
    else:
        state.pop(p)


@pytest.mark.parametrize("how", ["replace", "clear", "del", "pop"])
def test_an_emptied_state_restarts_adamw_as_torch_restarts_it(gen, how):
    """torch.optim.AdamW given the same treatment is the independent value: the emptied parameter's bias correction
    and moments start again, the other parameters step on."""
    shapes = [(6, 5), (6, 5), (7,)]
    ours = _params(gen, shapes, torch.float32)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = kronopt.build(ours, "adamw", lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    for k in range(7):
        if k == 3:
            _reset(opt.state, ours[0], how)
            _reset(ref.state, theirs[0], how)
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state[ours[0]]["step"] == 4 and opt.state[ours[1]]["step"] == 7


@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_shampoo", "pro_kl_shampoo"])
def test_an_emptied_state_restarts_one_block_of_a_bucket_as_a_new_optimizer_would(gen, preset):
    """Two blocks of one bucket: the emptied one steps on as a new optimizer built on it alone (its first call
    again), the other as if nothing had happened."""
    a, b = _params(gen, [(8, 6), (8, 6)])
    opt = kronopt.build([a, b], preset)
    alone_b = torch.nn.Parameter(b.detach().clone())
    other = kronopt.build([alone_b], preset)
    grads = [[torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(9)]
    for k, (ga, gb) in enumerate(grads):
        if k == 4:
            opt.state[a] = {}
            restarted = torch.nn.Parameter(a.detach().clone())
            new = kronopt.build([restarted], preset)
        a.grad, b.grad, alone_b.grad = ga.clone(), gb.clone(), gb.clone()
        opt.step()
        other.step()
        if k >= 4:
            restarted.grad = ga.clone()
            new.step()
            torch.testing.assert_close(a, restarted, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b, alone_b, rtol=1e-12, atol=1e-14)
    assert opt.state[a]["calls"] == 5 and opt.state[b]["calls"] == 9


def test_an_emptied_state_before_the_first_step_changes_nothing(gen):
    a, b = _params(gen, [(8, 6), (8, 6)])
    opt = kronopt.build([a, b], "soap")
    opt.state[a] = {}
    _step(opt, [a, b], gen)
    assert len(opt._buckets) == 1 and opt.state[a]["calls"] == 1


def test_a_state_that_lost_some_tensors_is_refused_with_nothing_changed(gen):
    a, b = _params(gen, [(8, 6), (8, 6)])
    opt = kronopt.build([a, b], "soap")
    _step(opt, [a, b], gen)
    del opt.state[a]["factors.L"]
    weights = [p.detach().clone() for p in (a, b)]
    with pytest.raises(RuntimeError, match="lost 'factors.L'.*nothing was changed"):
        _step(opt, [a, b], gen)
    assert all(torch.equal(x, p) for x, p in zip(weights, (a, b)))


def test_a_parameter_without_a_gradient_reshaped_after_steps_does_not_stop_the_step(gen):
    """torch.optim skips a parameter with no gradient: a frozen one given another shape is no reason to refuse the
    others' step (it is refused once it has a gradient)."""
    w, e = _params(gen, [(6, 4), (5, 3)])
    e.requires_grad_(False)
    opt = kronopt.build([w, e], "soap")
    _step(opt, [w], gen)
    e.data = torch.randn(3, 5, generator=gen, dtype=e.dtype)
    _step(opt, [w], gen)
    e.requires_grad_(True)
    e.grad = torch.randn(3, 5, generator=gen, dtype=e.dtype)
    with pytest.raises(RuntimeError, match="another shape"):
        opt.step()


def test_a_reshape_before_the_first_step_that_changes_the_route_is_refused(gen):
    """muon sends vectors to its AdamW group: a matrix made a vector before the first step would stay in the
    Muon group, orthogonalised as a column, where a new optimizer routes it away."""
    w, b = _params(gen, [(8, 6), (6,)], torch.float32)
    opt = kronopt.build([w, b], "muon")
    w.data = torch.randn(48, generator=gen)
    with pytest.raises(RuntimeError, match="route sends to the fallback.*nothing was changed"):
        _step(opt, [w, b], gen)
