"""LR schedulers, param-group edits and the inspection readers, held to torch.optim or hand counts.

A differential hunt: every expected value comes from ``torch.optim`` (``AdamW``, ``Muon`` and the
schedulers of ``torch.optim.lr_scheduler``), a closed form, or a count made by hand from what the test
fed in, never from kronopt's own output. The tests named ``test_bug_...`` fail on the code they were
written against; their docstrings say what is wrong and what the right behaviour is.
"""

import contextlib
import copy
import random
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import kronopt
from kronopt import post
from kronopt.inspection import saved_views

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed, shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return g, a, b


def _feed_both(g, a, b, dtype=torch.float64):
    for pa, pb in zip(a, b):
        grad = torch.randn(pa.shape, generator=g, dtype=dtype)
        pa.grad, pb.grad = grad.clone(), grad.clone()


def _max_diff(a, b):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b))


@contextlib.contextmanager
def _quiet():
    """Builds of name-routed presets on unnamed parameters warn; these tests expect it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- 1. torch's LR schedulers ------------------------------------------------------------------

_SCHEDULERS = {
    "lambda": lambda o: L.LambdaLR(o, lambda k: 1 / (1 + k)),
    "cosine": lambda o: L.CosineAnnealingLR(o, T_max=7, eta_min=1e-5),
    "warm_restarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=4),
    "one_cycle": lambda o: L.OneCycleLR(o, max_lr=[1e-2, 2e-2], total_steps=30, cycle_momentum=False),
    "cyclic": lambda o: L.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=4, cycle_momentum=False),
    "linear_warmup": lambda o: L.LinearLR(o, start_factor=0.1, total_iters=5),
    "sequential": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.1, total_iters=3), L.CosineAnnealingLR(o, T_max=10)], milestones=[3]
    ),
    "chained": lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=4), L.ExponentialLR(o, gamma=0.9)]),
    "plateau": lambda o: L.ReduceLROnPlateau(o, patience=1, factor=0.5),
}


def _step_both(g, a, b, ours, ref, s_ours, s_ref, steps):
    """Both optimizers and their schedulers stepped on the same gradients: the same learning rates at every step,
    the same weights (float64) at the end."""
    for t in steps:
        _feed_both(g, a, b)
        ours.step()
        ref.step()
        _sched_step(s_ours, t)
        _sched_step(s_ref, t)
        assert [x["lr"] for x in ours.param_groups] == [x["lr"] for x in ref.param_groups], t
    assert _max_diff(a, b) < 1e-14


def _sched_step(s, t):
    if isinstance(s, L.ReduceLROnPlateau):
        s.step(float(t % 3 == 0) + (1.0 if t > 5 else 0.0))  # a loss that stops improving
    else:
        s.step()


@pytest.mark.parametrize("name", list(_SCHEDULERS))
def test_adamw_preset_with_each_scheduler_equals_torch_adamw_step_for_step(name):
    """The adamw preset (documented to equal ``torch.optim.AdamW``: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight decay 0.01) under each scheduler, two groups with their own lr / weight decay, against torch's
    AdamW under the same scheduler, float64. Catches: a scheduler's lr read at the wrong step, a group's lr
    cached at build, the fused/blockwise AdamW path keyed on a stale lr, a wrong ``initial_lr``."""
    g, a, b = _pair(1, [(7, 5), (6,), (3, 2, 2)])
    ours = kronopt.build([{"params": [a[0]], "lr": 3e-3}, {"params": a[1:], "weight_decay": 0.1}], "adamw")
    ref = torch.optim.AdamW([{"params": [b[0]], "lr": 3e-3}, {"params": b[1:], "weight_decay": 0.1}])
    s1, s2 = _SCHEDULERS[name](ours), _SCHEDULERS[name](ref)
    _step_both(g, a, b, ours, ref, s1, s2, range(20))


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
@pytest.mark.parametrize("make", [
    lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=10),
    lambda o: L.CyclicLR(o, base_lr=1e-4, max_lr=1e-2),
], ids=["one_cycle", "cyclic"])
def test_cycling_momentum_is_refused_as_torch_refuses_it_not_silently_ignored(preset, make):
    """OneCycleLR / CyclicLR cycle ``momentum`` or ``betas[0]`` by default. A kronopt group holds neither (the
    betas are config, ``inner.betas``), so torch's own check must refuse the scheduler, as it refuses an
    optimizer without momentum. Catches: a ``betas`` / ``momentum`` key added to the groups or defaults that
    the step never reads (the scheduler would cycle a value that changes nothing)."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    with _quiet():
        opt = kronopt.build([w], preset)
    with pytest.raises(ValueError, match="momentum or beta1"):
        make(opt)


def test_muon_scheduler_scales_main_and_fallback_like_torch_muon_and_adamw():
    """muon routes the vector to its ``[fallback]`` AdamW group (lr 0.009, betas (0.9, 0.95), eps 1e-10, no
    decay): a scheduler must scale both groups, each from its own ``initial_lr``. Reference: torch.optim.Muon
    on the matrices (lr 0.03, decay 0.1, momentum 0.95, Nesterov) and torch.optim.AdamW on the vector, each
    under the same scheduler. Catches: a fallback group left at its build lr, an ``initial_lr`` taken from
    the main group."""
    g, a, b = _pair(0, [(16, 8), (8, 16), (8,)], torch.float32)
    ours = kronopt.build([("l0.w", a[0]), ("l1.w", a[1]), ("l1.b", a[2])], "muon")
    muon = torch.optim.Muon(b[:2], lr=0.03, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="original")
    adamw = torch.optim.AdamW([b[2]], lr=0.009, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

    def make(o):
        return L.SequentialLR(o, [L.LinearLR(o, 0.1, total_iters=4), L.CosineAnnealingLR(o, T_max=12)], milestones=[4])

    s, s1, s2 = make(ours), make(muon), make(adamw)
    assert [x["initial_lr"] for x in ours.param_groups] == [0.03, 0.009]
    for _ in range(12):
        _feed_both(g, a, b, torch.float32)
        for o in (ours, muon, adamw):
            o.step()
        for sch in (s, s1, s2):
            sch.step()
        assert [x["lr"] for x in ours.param_groups] == [muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"]]
    torch.testing.assert_close(a[0], b[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a[1], b[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["one_cycle", "sequential", "plateau", "cyclic"])
def test_optimizer_and_scheduler_state_dicts_resume_equal_an_uninterrupted_torch_adamw(name):
    """Save the optimizer's and the scheduler's state dicts after 5 steps, build a fresh optimizer and
    scheduler, load both (the scheduler before the optimizer's dict, as OneCycleLR needs), step on: the
    result equals torch.optim.AdamW run without a break. Catches: ``initial_lr`` / ``max_lr`` lost or
    duplicated by the kronopt load, the loaded group's lr replaced by the build-time config lr."""
    g, a, b = _pair(3, [(6, 4), (4,)])
    make = _SCHEDULERS[name]
    ours = kronopt.build([{"params": [a[0]], "lr": 3e-3}, {"params": [a[1]]}], "adamw")
    ref = torch.optim.AdamW([{"params": [b[0]], "lr": 3e-3}, {"params": [b[1]]}])
    s_ours, s_ref = make(ours), make(ref)
    for t in range(5):
        _feed_both(g, a, b)
        ours.step()
        ref.step()
        _sched_step(s_ours, t)
        _sched_step(s_ref, t)
    sd, ssd = copy.deepcopy(ours.state_dict()), copy.deepcopy(s_ours.state_dict())
    resumed = kronopt.build([{"params": [a[0]], "lr": 3e-3}, {"params": [a[1]]}], "adamw")
    s_res = make(resumed)
    resumed.load_state_dict(sd)
    s_res.load_state_dict(ssd)
    _step_both(g, a, b, resumed, ref, s_res, s_ref, range(5, 12))


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_scheduler_and_optimizer_resume_of_routed_groups_is_bit_for_bit(preset):
    """With a ``[fallback]`` group (muon, kl_shampoo: two groups per user group), resume both state dicts into a fresh
    optimizer and scheduler: every later step equals the uninterrupted run bit for bit, and each group's lr
    and ``initial_lr`` survive the load. Catches: ``initial_lr`` of the fallback taken from the main group,
    or the fallback's lr reset to its config value by the load."""
    def run(resume_at):
        g = torch.Generator().manual_seed(5)
        init = torch.Generator().manual_seed(0)
        ps = [("w", torch.nn.Parameter(torch.randn(6, 4, generator=init))), ("b", torch.nn.Parameter(torch.randn(4, generator=init)))]
        grads = [[torch.randn(p.shape, generator=g) for _, p in ps] for _ in range(10)]
        with _quiet():
            opt = kronopt.build(ps, preset)

        def make(o):
            return L.OneCycleLR(o, max_lr=[1e-2] * len(o.param_groups), total_steps=20, cycle_momentum=False)

        sched = make(opt)
        for t in range(10):
            if t == resume_at:
                sd, ssd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
                lrs = [(x["lr"], x["initial_lr"]) for x in opt.param_groups]
                ps = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in ps]
                with _quiet():
                    opt = kronopt.build(ps, preset)
                sched = make(opt)
                opt.load_state_dict(sd)
                sched.load_state_dict(ssd)
                assert [(x["lr"], x["initial_lr"]) for x in opt.param_groups] == lrs
            for (_, p), grad in zip(ps, grads[t]):
                p.grad = grad.clone()
            opt.step()
            sched.step()
        return [p for _, p in ps]

    assert _max_diff(run(None), run(4)) == 0.0


def test_add_param_group_after_the_scheduler_behaves_as_in_torch():
    """A group added after a StepLR / ExponentialLR exists: torch keeps stepping it with the scheduler's
    gamma. kronopt's routed ``add_param_group`` must leave the scheduler seeing the same groups."""
    for make in (lambda o: L.StepLR(o, 2, 0.5), lambda o: L.ExponentialLR(o, 0.9)):
        g, a, b = _pair(0, [(5, 4), (4,), (3, 3)])
        ours, ref = kronopt.build([a[0]], "adamw"), torch.optim.AdamW([b[0]])
        s1, s2 = make(ours), make(ref)
        for t in range(10):
            if t == 4:
                ours.add_param_group({"params": a[1:], "lr": 5e-3})
                ref.add_param_group({"params": b[1:], "lr": 5e-3})
            _feed_both(g, a, b)
            ours.step()
            ref.step()
            s1.step()
            s2.step()
        assert [x["lr"] for x in ours.param_groups] == [x["lr"] for x in ref.param_groups]
        assert _max_diff(a, b) < 1e-14


# -- 2. param_groups edits between steps -------------------------------------------------------


def test_lr_and_weight_decay_edits_missing_and_zeroed_gradients_equal_torch_adamw():
    """Random per-step pattern over six parameters (three of one shape, so buckets split): ``grad = None``
    (torch skips the parameter: no moment decay, no weight decay, no step count), ``zero_grad(set_to_none=
    False)``-style zero gradients (torch steps them), random gradients; every seventh step each group's lr
    and weight decay are edited by hand. Reference torch.optim.AdamW, float64; also each parameter's
    ``state['step']`` against torch's."""
    g, a, b = _pair(0, [(5, 4), (5, 4), (5, 4), (4,), (4,), (3, 3, 2)])
    ours = kronopt.build([{"params": a[:3]}, {"params": a[3:]}], "adamw")
    ref = torch.optim.AdamW([{"params": b[:3]}, {"params": b[3:]}])
    rnd = random.Random(0)
    for t in range(30):
        for pa, pb in zip(a, b):
            r = rnd.random()
            if r < 0.25:
                pa.grad = pb.grad = None
            elif r < 0.35:
                pa.grad, pb.grad = torch.zeros_like(pa), torch.zeros_like(pb)
            else:
                grad = torch.randn(pa.shape, generator=g, dtype=torch.float64)
                pa.grad, pb.grad = grad.clone(), grad.clone()
        if t % 7 == 3:
            for go, gr in zip(ours.param_groups, ref.param_groups):
                go["lr"] = gr["lr"] = rnd.choice([1e-3, 3e-3, 1e-2])
                go["weight_decay"] = gr["weight_decay"] = rnd.choice([0.0, 0.01, 0.2])
        ours.step()
        ref.step()
    assert _max_diff(a, b) < 1e-14
    assert [ours.state[p]["step"] for p in a] == [int(ref.state[p]["step"]) for p in b]


@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_zero_gradients_only_decay_by_the_edited_rates_in_closed_form(preset):
    """With all-zero gradients every built-in direction is zero (Adam: 0/(0+ε); momentum of zeros; the
    eigenvalue rule on a zero momentum), so each step is the decoupled decay alone, ``W ← W·(1 − η λ)``,
    with the η and λ the group holds at that step (edited by hand before each step), and nothing on a
    first call that only observes (``skip_first_call``). Closed form in float64. Catches: ``lr`` or
    ``weight_decay`` frozen at build, the fallback group's rates taken from the main group, a decay
    applied on an observe-only first call, a DyKAF block decayed before its first nonzero gradient."""
    g = torch.Generator().manual_seed(0)
    ps = [(n, torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))) for n, s in [("w", (6, 4)), ("b", (4,)), ("c", (3, 2, 2))]]
    init = {n: p.detach().clone() for n, p in ps}
    with _quiet():
        opt = kronopt.build(ps, preset)
    group_of = {id(p): gi for gi, grp in enumerate(opt.param_groups) for p in grp["params"]}
    skips = [kronopt.resolve(preset).skip_first_call if grp["pipeline"] == "main" else kronopt.resolve(preset).fallback.skip_first_call for grp in opt.param_groups]
    factor = {n: 1.0 for n, _ in ps}
    for t, (lr, wd) in enumerate([(1e-2, 0.1), (3e-2, 0.5), (0.0, 0.3), (1e-1, 0.0), (2e-2, 1.0)]):
        for grp in opt.param_groups:
            grp["lr"], grp["weight_decay"] = lr, wd
        for _, p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in ps:
            # dykaf.md §5: under DyKAF's start from the gradient a matrix block of zero gradients has not started
            waits = preset in ("dykaf", "dykaf_rank1", "pro_dykaf") and p.ndim > 1
            if not (t == 0 and skips[group_of[id(p)]]) and not waits:
                factor[n] *= 1 - lr * wd
    for n, p in ps:
        torch.testing.assert_close(p.detach(), factor[n] * init[n], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kw", [
    {"maximize": True}, {"differentiable": True}, {"foreach": True}, {"fused": True}, {"capturable": False},
    {"amsgrad": True}, {"betas": (0.9, 0.99)}, {"eps": 1e-6}, {"momentum": 0.9},
])
def test_torch_optim_style_keywords_are_refused_by_name(kw):
    """torch.optim keywords kronopt has no field for (``maximize``, ``differentiable``, ...; betas and ε
    are ``inner.betas``/``inner.eps``) must be refused with a ``ConfigError`` naming the key, at build and in
    a param group, never accepted and ignored."""
    (key,) = kw
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(kronopt.ConfigError, match=f"{key}: unknown key"):
        kronopt.build([w], "adamw", **kw)
    with pytest.raises(kronopt.ConfigError, match=f"param_groups\\[0\\].{key}: unknown key"):
        kronopt.build([{"params": [w], **kw}], "adamw")


@pytest.mark.parametrize("kw", [{"betas": (0.0, 0.0)}, {"eps": 10.0}, {"maximize": True}, {"amsgrad": True}, {"momentum": 0.5}])
@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_torch_optim_style_keys_set_on_a_live_group_are_refused_until_removed(kw, preset):
    """The torch habit of editing ``group["betas"]`` (or ``eps``, ``maximize``) mid-run: refused at build, it was
    taken silently on a live group and stepped as if it were not there. A step refuses it, naming it, and changes
    nothing; with it removed the run goes on as its twin that never had it, bit for bit."""
    (key,) = kw
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    twin = torch.nn.Parameter(w.detach().clone())
    ours, ref = kronopt.build([w], preset, lr=1e-2), kronopt.build([twin], preset, lr=1e-2)
    grads = [torch.randn(5, 4) for _ in range(4)]
    for p, opt in ((w, ours), (twin, ref)):
        p.grad = grads[0].clone()
        opt.step()
    ours.param_groups[0].update(kw)
    before = (w.detach().clone(), copy.deepcopy(ours.state_dict()))
    w.grad = grads[1].clone()
    with pytest.raises(kronopt.ConfigError, match=rf"param_groups\[0\]\.{key}: torch.optim's '{key}' is no kronopt group key"):
        ours.step()
    assert torch.equal(w, before[0])
    torch.testing.assert_close(ours.state_dict()["state"], before[1]["state"], rtol=0, atol=0)
    del ours.param_groups[0][key]
    for g in grads[1:]:
        for p, opt in ((w, ours), (twin, ref)):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(w, twin)


def test_a_group_added_to_an_unpickled_optimizer_steps_with_torchs_differentiable_default():
    """torch's ``Optimizer.__setstate__`` puts ``differentiable = False`` into the defaults, which ``add_param_group``
    copies into a group added after a copy: that is how kronopt steps (not differentiable), no user's edit."""
    w, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(3, 4))
    opt = copy.deepcopy(kronopt.build([w], "soap"))
    (w,) = opt.param_groups[0]["params"]
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["differentiable"] is False
    for p in (w, b):
        p.grad = torch.randn(p.shape)
    opt.step()
    opt.param_groups[1]["differentiable"] = True
    with pytest.raises(kronopt.ConfigError, match=r"param_groups\[1\]\.differentiable: torch.optim's"):
        opt.step()


def test_bug_a_one_entry_weight_decay_tensor_steps_as_torch_adamw_does():
    """BUG (``kronopt/compose.py::fused_adamw_``, reached from ``KronOptimizer._step_plain_adams``).

    ``KronOptimizer._check_rates`` accepts a group ``lr`` / ``weight_decay`` held in "a one-entry CPU
    tensor", and torch.optim.AdamW (its default, non-fused form) steps with ``weight_decay =
    torch.tensor([0.1])``. kronopt's adamw preset hands that tensor as is to ``torch._fused_adamw_``,
    whose ``weight_decay`` is a float: ``step()`` raises ``TypeError: _fused_adamw_() received an invalid
    combination of arguments``. (``compile = true`` fails the same way for any shape-``(1,)`` ``lr`` in
    ``kronopt/compiled.py::post_apply``: ``torch.full((), tensor([lr]))``.)

    Right behaviour: step as with the float ``0.1`` (convert a one-entry tensor to a number before the
    fused kernel, or leave such blocks to the unfused form), equal to torch.optim.AdamW."""
    g, a, b = _pair(0, [(5, 4), (4,)], torch.float32)
    ours, ref = kronopt.build(a, "adamw"), torch.optim.AdamW(b)
    for t in range(3):
        _feed_both(g, a, b, torch.float32)
        if t == 1:
            for grp in (*ours.param_groups, *ref.param_groups):
                grp["weight_decay"] = torch.tensor([0.1])
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bug_a_parameter_replaced_in_a_group_is_not_silently_skipped():
    """BUG (``KronOptimizer._check_state``, ``kronopt/optimizer.py``).

    kronopt stacks a group's parameters into buckets when the group is added, and documents that a
    parameter put into ``param_groups[i]['params']`` directly (which torch.optim would step) is "in no
    bucket here: the next step() says so (RuntimeError) and names add_param_group". The check compares
    only the *number* of parameters per group, so replacing one (``params[0] = new``, e.g. a re-created
    layer; torch.optim.AdamW steps the new tensor with fresh state) goes unnoticed: ``step()`` silently
    leaves the new parameter unchanged, and ``state_dict()`` then fails with a bare ``KeyError`` (the
    bucket's old tensor is in no group).

    Right behaviour: as for an appended parameter, the next ``step()`` raises ``RuntimeError`` naming
    ``add_param_group`` before anything changes (or the new tensor is stepped as torch does)."""
    old, new = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(4, 3))
    opt = kronopt.build([old], "adamw", lr=0.1)
    old.grad = torch.ones(4, 3)
    opt.step()
    opt.param_groups[0]["params"][0] = new
    new.grad, old.grad = torch.ones(4, 3), None
    try:
        opt.step()
    except RuntimeError as exc:  # refused, as an appended parameter is: the documented behaviour
        assert "add_param_group" in str(exc)
        assert torch.equal(new.detach(), torch.ones(4, 3)), "refused, so nothing may have changed"
        return
    # not refused: then it must have been stepped, as torch.optim.AdamW steps it, and still checkpoint
    assert not torch.equal(new.detach(), torch.ones(4, 3)), "the replaced-in parameter was silently not stepped"
    opt.state_dict()


def test_bug_a_tensor_learning_rate_elsewhere_does_not_change_another_optimizers_bits(monkeypatch):
    """BUG (``kronopt/post.py::_block_factors``).

    The write's factors ``(−η, 1 − η λ)`` are cached process-wide, keyed by ``(dtype, device, float(η),
    float(λ))``, but are computed as ``one * -lr`` from whatever ``lr`` / ``weight_decay`` the caller holds.
    ``KronOptimizer._step_plain_adams`` calls it with a group's tensor ``lr`` (allowed: a scheduler keeps a
    tensor lr a tensor): with a float64 tensor on float32 parameters the cached factors are float64 tensors
    stored under the float32 key. Any later step, of any optimizer in the process, with plain Python rates
    of the same values then decays by ``float32(1 − ηλ computed in float64)`` instead of the float32
    factor ``Post.apply_`` computes: its parameters change in the last bits (3.6e-7 here), so a run's
    result depends on what another, unrelated optimizer did before it.

    Right behaviour: the cache key covers what the cached tensors depend on (or tensor rates are not
    cached), so a SOAP run gives the same bits whatever ran before it."""
    lr, wd = 0.1, 0.422  # values where the two roundings of 1 − η λ differ in float32

    def soap_run():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(6, 4), (5, 5)]]
        opt = kronopt.build(ps, "soap", lr=lr, weight_decay=wd)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return ps

    monkeypatch.setattr(post, "_FACTORS", {})  # the process's cache as a fresh process has it
    clean = soap_run()

    monkeypatch.setattr(post, "_FACTORS", {})
    w = torch.nn.Parameter(torch.randn(8, 8))
    other = kronopt.build([w], "adamw")  # another optimizer, stepped once with float64 tensor rates
    other.param_groups[0]["lr"] = torch.tensor(lr, dtype=torch.float64)
    other.param_groups[0]["weight_decay"] = torch.tensor(wd, dtype=torch.float64)
    w.grad = torch.randn(8, 8)
    other.step()
    after = soap_run()
    assert _max_diff(clean, after) == 0.0


# -- 3. inspection ------------------------------------------------------------------------------


def _fresh(preset, shapes, seed=0, **over):
    g = torch.Generator().manual_seed(seed)
    ps = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in shapes.items()}
    with _quiet():
        opt = kronopt.build(list(ps.items()), preset, **over)
    return g, ps, opt


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon", "kl_shampoo"])
@pytest.mark.parametrize("scope", ["step", "block"])
def test_nonfinite_counts_match_a_hand_count_and_a_skipped_step_changes_nothing(preset, scope):
    """NaN/Inf gradients fed at known steps (two blocks of one bucket, a vector, a large block; one block
    without a gradient at one step, which splits its bucket): ``nonfinite_counts()`` equals the hand count
    of non-finite gradients per parameter; under ``"step"`` scope no parameter changes on such a step, under
    ``"block"`` scope only the bad blocks keep their values."""
    g, ps, opt = _fresh(preset, {"a": (6, 4), "b": (6, 4), "c": (4,), "d": (5, 5), "e": (300, 80)},
                        nonfinite="skip", nonfinite_scope=scope)
    expect = dict.fromkeys(ps, 0)
    for t in range(7):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g)
        bad = {"a"} if t == 2 else {"a", "c"} if t == 5 else {"e"} if t == 6 else set()
        for n in bad:
            ps[n].grad.view(-1)[1] = float("nan") if n != "c" else float("inf")
        if t == 3:
            ps["b"].grad = None
        before = {n: p.detach().clone() for n, p in ps.items()}
        opt.step()
        changed = {n for n, p in ps.items() if not torch.equal(before[n], p.detach())}
        if bad:
            assert not (changed & bad), t
            if scope == "step":
                assert not changed, t
        for n in bad:
            expect[n] += 1
    assert opt.nonfinite_counts() == expect


@pytest.mark.parametrize("preset", ["soap", "adamw", "muon"])
@pytest.mark.parametrize("scope", ["step", "block"])
def test_inspected_calls_and_steps_match_a_hand_count(preset, scope):
    """``inspect()[name].calls`` / ``.step`` and ``state[p]['calls']`` / ``['step']`` against a count by hand:
    a call is counted when the parameter has a gradient, except a first call that used no gradient (its
    gradient non-finite, or the whole step skipped under ``"step"`` scope); ``step`` is ``calls`` less an
    observe-only first call (``skip_first_call``). Gradients missing and non-finite at known steps."""
    g, ps, opt = _fresh(preset, {"a": (6, 4), "b": (6, 4), "c": (5, 5)}, nonfinite="skip", nonfinite_scope=scope)
    skip_first = opt.config.skip_first_call
    plan = [
        {"a": "g", "b": "g", "c": None},
        {"a": "g", "b": None, "c": "nan"},
        {"a": "nan", "b": "g", "c": "g"},
        {"a": "g", "b": "g", "c": "g"},
        {"a": None, "b": "g", "c": "g"},
    ]
    calls, steps = dict.fromkeys(ps, 0), dict.fromkeys(ps, 0)
    for row in plan:
        any_bad = "nan" in row.values()
        for n, p in ps.items():
            p.grad = None if row[n] is None else torch.randn(p.shape, generator=g)
            if row[n] == "nan":
                p.grad[0, 0] = float("nan")
        opt.step()
        for n, v in row.items():
            if v is None:
                continue
            used = v == "g" and not (scope == "step" and any_bad)
            if calls[n] == 0 and not used:
                continue
            calls[n] += 1
            steps[n] += 0 if skip_first and calls[n] == 1 else 1
    expect = {n: (calls[n], steps[n]) for n in ps if calls[n]}
    assert {n: (v.calls, v.step) for n, v in opt.inspect().items()} == expect
    assert {n: (opt.state[p]["calls"], opt.state[p]["step"]) for n, p in ps.items() if calls[n]} == expect


def _tensor_bytes(entries):
    return sum(v.numel() * v.element_size() for e in entries for k, v in e.items() if isinstance(v, torch.Tensor) and k != "nonfinite")


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon", "kl_shampoo", "pro_soap"])
def test_state_bytes_equal_the_saved_tensors_through_splits_unfreezing_add_and_load(preset):
    """``state_bytes()`` against the bytes of every tensor in ``state_dict()['state']`` (each parameter's
    copy of its blocks; the ``nonfinite`` counters are not stage state), with a frozen parameter (no state
    until it gets a gradient), a bucket split by a missing gradient, a group added later and a load into a
    fresh optimizer. Catches: a split bucket's stacks counted twice or dropped, a lazy bucket counted
    before it exists, a loaded optimizer that counts the template stacks too."""
    g = torch.Generator().manual_seed(0)
    P = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g))  # noqa: E731
    a, b, c, d, e, f = P(6, 4), P(6, 4), P(6, 4), P(4), P(5, 5), P(3, 3)
    e.requires_grad_(False)
    named = [("a", a), ("b", b), ("c", c), ("d", d), ("e", e)]
    with _quiet():
        opt = kronopt.build(named, preset)
    assert opt.state_bytes() == _tensor_bytes(opt.state_dict()["state"].values())
    index = {id(p): i for i, p in enumerate(p for grp in opt.param_groups for p in grp["params"])}
    assert index[id(e)] not in opt.state_dict()["state"], "the frozen parameter has no state yet"
    for t in range(3):
        for p in (a, b, c, d):
            p.grad = torch.randn(p.shape, generator=g)
        if t == 1:
            b.grad = None
        opt.step()
        assert opt.state_bytes() == _tensor_bytes(opt.state_dict()["state"].values())
    opt.add_param_group({"params": [("f", f)]})
    e.requires_grad_(True)
    e.grad, f.grad = torch.randn(5, 5, generator=g), torch.randn(3, 3, generator=g)
    opt.step()
    sd = opt.state_dict()
    assert opt.state_bytes() == _tensor_bytes(sd["state"].values())
    with _quiet():
        other = kronopt.build(named, preset)
    other.add_param_group({"params": [("f", f)]})
    other.load_state_dict(sd)
    assert other.state_bytes() == _tensor_bytes(sd["state"].values())


def test_inspected_muon_momentum_and_shampoo_factors_equal_hand_emas():
    """``inspect()`` records against the closed forms of what was fed: muon's momentum buffer is the EMA
    ``m ← 0.95 m + 0.05 G`` (torch.optim.Muon's ``lerp``), shampoo's factors are EMAs of ``G Gᵀ`` and
    ``Gᵀ G`` with β = 0.95, float64."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    m, Lf, Rf = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    for G in grads:
        m = 0.95 * m + 0.05 * G
        Lf = 0.95 * Lf + 0.05 * G @ G.T
        Rf = 0.95 * Rf + 0.05 * G.T @ G
    for preset in ("muon", "shampoo"):
        p = torch.nn.Parameter(w.detach().clone())
        opt = kronopt.build([("w", p)], preset)
        for G in grads:
            p.grad = G.clone()
            opt.step()
        view = opt.inspect()["w"]
        if preset == "muon":
            torch.testing.assert_close(view.records["inner"]["momentum_buffer"], m, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(view.left.factor, Lf, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(view.right.factor, Rf, rtol=1e-12, atol=1e-14)


def test_bug_saved_views_give_a_vector_of_an_adamw_pipeline_the_sides_inspect_gives():
    """BUG (``kronopt/inspection.py::_saved_view``).

    ``saved_views(state_dict)`` promises "the ParamView of a saved state dict, as
    KronOptimizer.inspect gives it live". For a vector in an AdamW pipeline (the adamw preset, or the
    ``[fallback]`` of muon and kl_shampoo) the live view's sides are ``"none"`` / ``"none"`` (the block
    ``(d, 1)`` is not rotated: ``_shapes.block_spec``; ``bucket_summary()`` says so too), but the saved view
    says ``"full"`` / ``"full"``: ``_saved_view`` takes the block ``(m, n)`` from the shape policy and then
    tries side kinds in the order (rotated, rotated) first, and with the identity basis and no factors the
    state's keys and shapes are the same for every kind, so the first guess is kept. (Matrices are
    ``"full"`` both ways; only the unrotated blocks come out wrong.)

    Right behaviour: take the rotated sides from the shape policy (``block_spec``'s ``rotate_left`` /
    ``rotate_right``) as ``inspect()`` does, so the saved view of ``b`` has ``kind == "none"`` on both sides."""
    g = torch.Generator().manual_seed(0)
    for preset in ("adamw", "muon"):
        ps = [("w", torch.nn.Parameter(torch.randn(6, 4, generator=g))), ("b", torch.nn.Parameter(torch.randn(8, generator=g)))]
        opt = kronopt.build(ps, preset)
        for _, p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        summary = {(r["m"], r["n"]): r["sides"] for r in opt.bucket_summary()}
        assert summary[(8, 1)] == ("none", "none")  # the block the vector is stepped as
        saved = saved_views(opt.state_dict())
        for name in ("w", "b"):
            want = summary[saved[name].shape]
            assert (saved[name].left.kind, saved[name].right.kind) == want, (preset, name)
