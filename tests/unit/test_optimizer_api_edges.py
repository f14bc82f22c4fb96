"""KronOptimizer as a ``torch.optim.Optimizer`` under less-trodden use, against torch.optim.AdamW's behaviour.

The ``adamw`` preset equals ``torch.optim.AdamW`` (DESIGN.md, invariant 1), so wherever torch's
Optimizer API has a convention (lazy state, hooks, ``state`` as the state, copies), the preset is
held to AdamW's result. Each test of the section "bugs found by the review" pins a bug a review found
and that is fixed (it fails on the code before the fix).
"""

import collections
import copy
import pickle
import warnings

import pytest
import torch

import kronopt

SHAPES = [(6, 4), (6, 4), (5, 5), (3,), (), (0, 3)]


def _init(gen, shapes=SHAPES):
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _grads(gen, shapes, steps):
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def _torch_adamw(ps):
    return torch.optim.AdamW(ps, lr=1e-2, foreach=False)


def _kron(preset):
    return lambda ps: kronopt.build(ps, preset, lr=1e-2)


def _max_diff(a, b):
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


@pytest.mark.parametrize("zero", [False, True], ids=["grad_none", "zero_grad_set_to_none_false"])
@pytest.mark.parametrize("resume_at", [None, 4, 9])
def test_adamw_equals_torch_with_missing_gradients_scalars_empty_params_and_a_resume(gen, zero, resume_at):
    """Catches: buckets split by a missing gradient (or zero gradients) whose counters, moments or
    saved ``bucket`` marks go wrong, 0-d / zero-size parameters mishandled, a resume that is not bit
    for bit. torch.optim.AdamW skips a parameter without a gradient and steps one with a zero gradient."""
    init, T = _init(gen), 12
    grads = _grads(gen, SHAPES, T)
    mask = torch.rand(T, len(SHAPES), generator=gen) < 0.7

    def run(make, resume):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps)
        for t in range(T):
            if t == resume:
                sd = copy.deepcopy(opt.state_dict())
                ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
                opt = make(ps)
                opt.load_state_dict(sd)
            for i, p in enumerate(ps):
                p.grad = grads[t][i].clone() if mask[t, i] else (torch.zeros_like(p) if zero else None)
            opt.step()
        return ps

    assert _max_diff(run(_torch_adamw, None), run(_kron("adamw"), resume_at)) == 0.0


@pytest.mark.parametrize("preset", ["soap", "muon", "adamw"])
def test_add_param_group_mid_training_then_a_resume_is_bit_for_bit(gen, preset):
    """Catches: a group added after some steps whose buckets get the wrong group index, config or
    saved bucket marks, so that a state_dict round trip after it does not continue bit for bit."""
    shapes = [(6, 4), (3,), (6, 4), (5, 5)]
    init, T = _init(gen, shapes), 10
    grads = _grads(gen, shapes, T)

    def build(ps, added):
        opt = kronopt.build([("a", ps[0]), ("b", ps[1])], preset, lr=1e-2)
        if added:
            opt.add_param_group({"params": [("c", ps[2]), ("d", ps[3])], "lr": 5e-3})
        return opt

    def run(resume):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = build(ps, False)
        for t in range(T):
            if t == 3:
                opt.add_param_group({"params": [("c", ps[2]), ("d", ps[3])], "lr": 5e-3})
            if t == resume:
                sd = copy.deepcopy(opt.state_dict())
                ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
                opt = build(ps, True)
                opt.load_state_dict(sd)
            for i, p in enumerate(ps):
                p.grad = grads[t][i].clone() if (t >= 3 or i < 2) else None
            opt.step()
        return ps

    ref = run(None)
    for at in (5, 8):
        assert _max_diff(ref, run(at)) == 0.0


def test_unfreezing_and_freezing_mid_training_equals_torch_adamw_and_resumes(gen):
    """Catches: lazily created buckets of parameters frozen at construction that start with wrong
    counters when unfrozen, or a freeze (grad None from then on) that disturbs the other blocks."""
    shapes = [(6, 4), (6, 4), (5, 5), (3,)]
    init, T = _init(gen, shapes), 12
    grads = _grads(gen, shapes, T)

    def run(make, resume):
        ps = [torch.nn.Parameter(x.clone(), requires_grad=i not in (1, 2)) for i, x in enumerate(init)]
        opt = make(ps)
        for t in range(T):
            if t == 5:
                for p in ps:
                    p.requires_grad_(True)
            if t == 9:
                ps[0].requires_grad_(False)
            if t == resume:
                sd = copy.deepcopy(opt.state_dict())
                ps = [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ps]
                opt = make(ps)
                opt.load_state_dict(sd)
            for i, p in enumerate(ps):
                p.grad = grads[t][i].clone() if p.requires_grad else None
            opt.step()
        return ps

    ref = run(_torch_adamw, None)
    for at in (None, 3, 7, 10):
        assert _max_diff(ref, run(_kron("adamw"), at)) == 0.0


@pytest.mark.parametrize("preset", ["soap", "muon"])
def test_tensor_lr_and_weight_decay_changed_between_steps_match_plain_floats(gen, preset):
    """Catches: a tensor ``lr`` / ``weight_decay`` in a group (as torch.optim allows, and as schedulers
    then keep) read wrongly, or a change of ``group['weight_decay']`` between steps not taken."""
    shapes = [(6, 4), (5, 5), (3,)]
    init, T = _init(gen, shapes), 8
    grads = _grads(gen, shapes, T)

    def run(as_tensor):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = kronopt.build(ps, preset, lr=1e-2)
        wrap = (lambda v: torch.tensor(v, dtype=torch.float64)) if as_tensor else (lambda v: v)
        for g in opt.param_groups:
            g["lr"] = wrap(g["lr"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for t in range(T):
            if t == 3:
                for g in opt.param_groups:
                    g["weight_decay"] = wrap(0.3)
            for i, p in enumerate(ps):
                p.grad = grads[t][i].clone()
            opt.step()
            sched.step()
        return ps

    assert _max_diff(run(False), run(True)) == 0.0


def _inference_run(gen_seed, preset, at, overrides):
    g = torch.Generator().manual_seed(gen_seed)
    shapes = [(6, 4), (5, 5)]
    init, T = _init(g, shapes), 9
    grads = _grads(g, shapes, T)
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = kronopt.build(ps, preset, **overrides)
    for t in range(T):
        for i, p in enumerate(ps):
            p.grad = grads[t][i].clone()
        if t in at:
            with torch.inference_mode():
                opt.step()
        else:
            opt.step()
    return ps


@pytest.mark.parametrize("preset", ["adamw", "muon", "soap"])
def test_steps_under_inference_mode_after_the_first_equal_plain_steps(preset):
    """Catches: state written under ``torch.inference_mode()`` (after a first ordinary step, as
    torch.optim.AdamW requires) becoming inference tensors that a later ordinary step may not update
    in place (``RuntimeError``), or other numbers."""
    overrides = {"refresh.every": 3} if preset == "soap" else {}
    ref = _inference_run(0, preset, (), overrides)
    assert _max_diff(ref, _inference_run(0, preset, (1, 3, 4, 6), overrides)) == 0.0


@pytest.mark.parametrize("preset", ["adamw", "muon", "soap", "kl_shampoo"])
@pytest.mark.parametrize("scope", ["step", "block"])
def test_gradients_made_under_inference_mode_step_as_plain_ones(preset, scope):
    """Catches: the step's check of the gradients keying each one by its version counter, which an inference
    tensor (a gradient computed under ``torch.inference_mode()`` and set by hand) does not keep: a
    ``RuntimeError`` at every step under ``nonfinite_scope = "step"``. The same numbers as plain gradients."""

    def run(inference: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(300, 80), (300, 80), (12, 7), (7,)]]
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], preset, nonfinite_scope=scope)
        for _ in range(3):
            with torch.inference_mode(inference):
                grads = [torch.randn(p.shape, generator=gen) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


# -- bugs found by the review, each fixed (these fail on the code before the fix) -------------------


def _trained_adamw(make, gen, steps=3):
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    opt = make([w])
    for _ in range(steps):
        w.grad = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        opt.step()
    return w, opt


@pytest.mark.parametrize("preset", ["adamw", "soap", "dykaf", "muon"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_like_the_original_and_apart_from_it(how, preset):
    """A copy (``copy.deepcopy``, ``pickle``) steps on as the original does, refreshes included, and neither
    touches the other's parameters or state. Catches: a copy without its buckets (torch's ``Optimizer``
    pickles only its groups and state, and the copy failed at ``step()``), or one whose state views lost
    their stacks (a copy that steps, but from other state, or into the original's)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(6, 4), (6, 4), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronopt.build(params, preset, **({"refresh.every": 2} if preset in ("soap", "dykaf") else {}))
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    copies = [p for g in clone.param_groups for p in g["params"]]
    assert len(copies) == len(params) and not any(c is p for c, p in zip(copies, params))
    frozen = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])
    for step_grads in grads[1:]:  # the copy first, alone: the original must not move
        for c, g in zip(_in_build_order(copies, params, opt), step_grads):
            c.grad = g.clone()
        clone.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen[0], params))
    for k, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(v, frozen[1][k][n]) for n, v in entry.items() if torch.is_tensor(v))
    for step_grads in grads[1:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for c, p in zip(_in_build_order(copies, params, opt), params):
        assert torch.equal(c, p)
    ours, theirs = opt.state_dict()["state"], clone.state_dict()["state"]  # the copy's views follow its stacks
    assert ours.keys() == theirs.keys()
    for k, entry in ours.items():
        assert all(torch.equal(v, theirs[k][n]) if torch.is_tensor(v) else v == theirs[k][n] for n, v in entry.items())


def _in_build_order(copies, params, opt):
    """The copy's parameters in the order of ``params`` (the copy lists them by its routed groups, as the original does)."""
    where = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return [copies[where[id(p)]] for p in params]


@pytest.mark.parametrize("how", ["clear", "new dict"])
def test_clearing_state_restarts_like_torch_adamw_and_still_checkpoints(how):
    """Catches: ``opt.state.clear()`` or ``opt.state = defaultdict(dict)`` (torch's ways to reset an optimizer)
    silently ignored (the buckets' stacks went on), and the checkpoints saved after it holding counters only."""
    results = []
    for make in (_torch_adamw, _kron("adamw")):
        g = torch.Generator().manual_seed(7)
        w, opt = _trained_adamw(make, g)
        if how == "clear":
            opt.state.clear()
        else:
            opt.state = collections.defaultdict(dict)
        for _ in range(2):
            w.grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
            opt.step()
        results.append((w, opt))
    (wt, _), (wk, ok) = results
    assert torch.equal(wt, wk)
    assert ok.state[wk]["step"] == 2
    again = kronopt.build([torch.nn.Parameter(wk.detach().clone())], "adamw", lr=1e-2)
    again.load_state_dict(ok.state_dict())
    assert torch.equal(again.state_dict()["state"][0]["inner.exp_avg"], ok.state[wk]["inner.exp_avg"])


def test_a_deleted_entry_restarts_its_parameter_and_is_saved_whole(gen):
    """Catches: one parameter's entry deleted (``del opt.state[p]``) while its bucket's stacks go on, and a
    checkpoint then saved without that parameter's tensors. As torch.optim, the parameter starts afresh
    (its first call again), and ``state_dict()`` holds its new state."""
    ps = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)) for _ in range(2)]
    opt = kronopt.build(ps, "soap")
    for p in ps:
        p.grad = torch.randn(6, 4, generator=gen)
    opt.step()
    del opt.state[ps[0]]
    saved = opt.state_dict()["state"]
    assert set(saved) == {0, 1} and saved[0]["calls"] == 0 and torch.is_tensor(saved[0]["factors.L"])
    opt.step()
    assert opt.state[ps[0]]["calls"] == 1 and opt.state[ps[1]]["calls"] == 2


def test_state_dict_hooks_behave_as_in_torch(gen):
    """Catches: ``register_state_dict_post_hook`` results discarded, ``register_load_state_dict_pre_hook``
    unable to adapt the incoming state, ``register_load_state_dict_post_hook`` seeing no state."""
    w, opt = _trained_adamw(_kron("adamw"), gen)

    def to_half(_, sd):
        return {**sd, "state": {k: {n: v.half() if torch.is_tensor(v) and v.ndim else v for n, v in e.items()}
                                for k, e in sd["state"].items()}}

    handle = opt.register_state_dict_post_hook(to_half)
    assert all(v.dtype == torch.float16 for v in opt.state_dict()["state"][0].values() if torch.is_tensor(v) and v.ndim)
    handle.remove()

    def shift(_, sd):
        sd = copy.deepcopy(sd)
        for e in sd["state"].values():
            for n, v in e.items():
                if torch.is_tensor(v) and v.ndim == 2:
                    e[n] = v + 100.0
        return sd

    seen = []
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = kronopt.build([w2], "adamw")
    opt2.register_load_state_dict_pre_hook(shift)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append(len(o.state)))
    opt2.load_state_dict(opt.state_dict())
    assert seen == [1]
    assert all(float(v.min()) > 50 for v in opt2.state[w2].values() if torch.is_tensor(v) and v.ndim == 2)


def test_a_refused_add_param_group_adds_nothing(gen):
    """Catches: a failing ``add_param_group`` (a 1-D param already optimized, routed to the fallback)
    leaving its matrix listed in ``param_groups`` but never stepped; torch adds nothing."""
    w1, b1 = torch.nn.Parameter(torch.randn(4, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronopt.build([w1, b1], "muon")
    groups, buckets, before = len(opt.param_groups), opt.bucket_summary(), opt.state_dict()
    new = torch.nn.Parameter(torch.randn(5, 5, generator=gen))
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [new, b1]})
    assert len(opt.param_groups) == groups and opt.bucket_summary() == buckets and new not in opt.state
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"].keys() == before["state"].keys()
    opt.add_param_group({"params": [new]})  # the same parameter alone is then taken
    assert len(opt.param_groups) == groups + 1


def test_a_parameter_listed_twice_is_refused_before_anything_is_built(gen):
    """Catches: a tensor listed twice in a group taken as two blocks with two states (stepped twice per step,
    and a state dict that did not load back: its entry was keyed by the first listing, torch's groups by
    the last). torch.optim warns that duplicates will be an error; kronopt refuses them, also when added."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    with pytest.raises(ValueError, match="more than once"):
        kronopt.build([w, w], "adamw")
    with pytest.raises(ValueError, match="more than once"):
        kronopt.build([("a", w), ("b", w)], "soap")
    opt = kronopt.build([torch.nn.Parameter(torch.randn(4, 3, generator=gen))], "adamw")
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == groups


def test_a_state_dict_of_another_optimizer_class_is_refused_and_changes_nothing(gen):
    """Catches: a foreign state dict (a torch.optim.AdamW's) accepted, its groups replacing kronopt's by ones
    without a pipeline, after which ``inspect()`` and ``bucket_summary()`` raised ``KeyError``."""
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    opt = kronopt.build([w], "soap")
    w.grad = torch.randn(6, 4, generator=gen)
    opt.step()
    before = opt.state_dict()
    with pytest.raises(ValueError, match="not a kronopt optimizer's state dict"):
        opt.load_state_dict(torch.optim.AdamW([w]).state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(a, after["state"][0][k]) for k, a in before["state"][0].items() if torch.is_tensor(a))
    opt.bucket_summary()
    opt.inspect()


def test_a_refresh_under_inference_mode_leaves_no_inference_tensor_in_the_state():
    """Catches: ``_write_state`` replacing a stack under ``inference_mode`` (shampoo's first refresh),
    after which every later ordinary step raises; torch.optim.AdamW keeps working in this pattern."""
    overrides = {"refresh.every": 3}
    ref = _inference_run(0, "shampoo", (), overrides)
    assert _max_diff(ref, _inference_run(0, "shampoo", (2,), overrides)) == 0.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_with_a_scheduler_and_hooks_attached_steps_its_own_parameters(how):
    """Catches: ``__getstate__`` copying what torch leaves out: an LR scheduler's ``step`` wrapper on the
    instance (the copy's ``step()`` then stepped the original) and torch's hook dicts (a lambda hook made
    ``pickle`` fail), where ``torch.optim.AdamW`` copies fine."""
    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    opt = kronopt.build([w], "soap")
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.register_step_post_hook(lambda *_: None)
    w.grad = torch.randn(6, 4, generator=gen)
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    (w2,) = clone.param_groups[0]["params"]
    before = w.detach().clone()
    w2.grad = torch.randn(6, 4, generator=gen)
    clone.step()
    assert torch.equal(w, before) and not torch.equal(w2, before)


def test_a_cleared_state_starts_afresh_also_across_add_param_group_and_a_copy():
    """Catches: ``add_param_group`` after ``opt.state.clear()`` taking the emptied dict for the current one
    (the old parameters then stepped on from their old stacks with counters only in ``state[p]``), and a copy
    made after the clear re-binding the old stacks where the original starts afresh."""
    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    opt = kronopt.build([w], "adamw")
    for _ in range(3):
        w.grad = torch.randn(6, 4, generator=gen)
        opt.step()
    opt.state.clear()
    clone = copy.deepcopy(opt)
    (w2,) = clone.param_groups[0]["params"]
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, 5, generator=gen))]})
    g = torch.randn(6, 4, generator=gen)
    w.grad, w2.grad = g.clone(), g.clone()
    opt.step()
    clone.step()
    assert opt.state[w]["step"] == 1 and clone.state[w2]["step"] == 1
    assert opt.state[w]["inner.exp_avg"].shape == w.shape
    assert torch.equal(w, w2)


def test_a_groups_set_of_parameters_is_refused_as_torch_refuses_it(gen):
    """Catches: a set taken as a group's parameters (its order, which names them in the state dict, may differ
    from one run to the next); torch.optim refuses it with a ``TypeError``, in a group and when added."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    with pytest.raises(TypeError):
        torch.optim.AdamW([{"params": {w}}])
    with pytest.raises(TypeError, match="not a set"):
        kronopt.build([{"params": {w}}], "soap")
    opt = kronopt.build([torch.nn.Parameter(torch.randn(4, 3, generator=gen))], "soap")
    with pytest.raises(TypeError, match="not a set"):
        opt.add_param_group({"params": {w}})


def test_a_parameter_appended_to_a_group_directly_is_reported_not_silently_skipped(gen):
    """Catches: ``optimizer.param_groups[0]['params'].append(p)`` (which torch.optim steps, its state made
    lazily) leaving ``p`` in no bucket, never stepped and never said; kronopt stacks a group when it is added,
    so it names ``add_param_group`` instead."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = kronopt.build([w], "adamw")
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.randn(5, generator=gen)))
    w.grad = torch.randn(4, 3, generator=gen)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.step()
