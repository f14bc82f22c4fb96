"""Per-parameter optimizer state (torch.optim's convention): views, state_dict v2, v1 files, DCP."""

import copy
import pickle
import warnings

import pytest
import torch

import kronopt
from kronopt import compose

SHAPES = [(6, 4), (6, 4), (6, 4), (5,), (3, 2, 2), (4, 6)]
PRESETS = ["soap", "kl_shampoo", "pro_kl_shampoo", "muon", "adamw", "dykaf"]
OVERRIDES = {"soap": {"refresh.every": 2}, "muon": {"inner.ns_dtype": "float32"}}


def _params(seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(opt, params, gen, steps, *, absent=()):
    """``steps`` steps; the parameters at ``absent`` get no gradient on the first two (a split bucket)."""
    for k in range(steps):
        for j, p in enumerate(params):
            p.grad = None if (k < 2 and j in absent) else torch.randn(p.shape, generator=gen)
        opt.step()


def _v1_state_dict(opt):
    """The version-1 layout of the release before per-parameter state (kronopt 384dda7's writer):
    ``state`` empty, every bucket stacked under ``kronopt.buckets``."""
    sd = torch.optim.Optimizer.state_dict(opt)
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    buckets = []
    for b in opt._buckets:
        entry = {"params": [index[id(p)] for p in b.params], "group": b.group}
        if b.state is not None and b.state.calls > 0:  # version 1 created state at the first step
            entry["state"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in compose.flatten(b.state).items()}
            entry["nonfinite"] = b.nonfinite.clone()
        buckets.append(entry)
    sd["state"] = {}
    sd["kronopt"] = {"version": 1, "config": kronopt.to_dict(opt.config), "buckets": buckets}
    if opt._skipped_steps is not None:
        sd["kronopt"]["skipped_steps"] = opt._skipped_steps.clone()
    return sd


def _resume_equals_uninterrupted(preset, save, load, *, absent=(1,)):
    params = _params(0)
    gen = torch.Generator().manual_seed(1)
    opt = kronopt.build(params, preset, **OVERRIDES.get(preset, {}))
    _run(opt, params, gen, 5, absent=absent)
    saved = pickle.loads(pickle.dumps(save(opt)))
    snapshot, tail = [p.detach().clone() for p in params], gen.get_state()
    _run(opt, params, gen, 6)
    restored = [torch.nn.Parameter(s.clone()) for s in snapshot]
    opt2 = kronopt.build(restored, preset, **OVERRIDES.get(preset, {}))
    load(opt2, saved)
    gen.set_state(tail)
    _run(opt2, restored, gen, 6)
    for a, b in zip(params, restored):
        assert torch.equal(a, b)
    return opt, opt2


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the route sends embeddings")
        yield


@pytest.mark.parametrize("preset", PRESETS)
def test_per_parameter_state_dict_resumes_bit_for_bit(preset):
    """Saved after a split bucket (parameter 1 had no gradient at first), loaded into a fresh optimizer."""
    opt, opt2 = _resume_equals_uninterrupted(preset, lambda o: o.state_dict(), lambda o, sd: o.load_state_dict(sd))
    sd = opt.state_dict()
    assert sd["kronopt"]["version"] == 2 and "buckets" not in sd["kronopt"]
    assert sorted(sd["state"]) == list(range(len(SHAPES)))
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, entry in sd["state"].items():
        bucket = next(b for b in opt._buckets if any(q is params[i] for q in b.params))
        assert entry["step"] == bucket.state.step and entry["calls"] == bucket.state.calls
        block = (bucket.layout.m, bucket.layout.n)
        for key, stack in compose.flatten(bucket.state).items():
            if isinstance(stack, torch.Tensor):
                # the block's own tensor, no batch axis; an elementwise bucket's block-sized one shaped like its parameter
                shaped = opt._param_shaped(bucket) and stack.shape[1:] == block
                assert entry[key].shape == (params[i].shape if shaped else stack.shape[1:]), key
    assert sd["state"][1]["calls"] != sd["state"][0]["calls"], "the split bucket's counters diverged"
    assert len(opt2._buckets) == len(opt._buckets), "the split buckets stay apart after a load"


def test_elementwise_state_is_shaped_like_its_parameter_and_block_shaped_saves_still_load():
    """An elementwise bucket's moments are shown and saved shaped like their parameters (a bias ``(5,)``, a conv
    weight ``(4, 3, 2, 2)``), as torch.optim.AdamW and FSDP2 keep them, so one checkpoint serves every placement;
    a save that holds them block-shaped (``(5, 1)``, ``(4, 12)``: kronopt before) still loads and resumes bit for
    bit. Catches: the two placements' layouts parting again (a DCP checkpoint then loads in neither direction),
    or old checkpoints refused."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (5,), (4, 3, 2, 2)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    for preset, elementwise in (("adamw", [1, 2]), ("soap", [1])):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        opt = kronopt.build(params, preset)
        for step in grads[:2]:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        sd = opt.state_dict()
        for i in elementwise:
            for key in ("inner.exp_avg", "inner.exp_avg_sq"):
                assert opt.state[params[i]][key].shape == params[i].shape == sd["state"][i][key].shape
        old = copy.deepcopy(sd)  # as kronopt saved them before: block-shaped
        for i in elementwise:
            for key in ("inner.exp_avg", "inner.exp_avg_sq"):
                old["state"][i][key] = old["state"][i][key].reshape(shapes[i][0], -1)
        resumed = []
        for saved in (sd, old):
            copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
            again = kronopt.build(copies, preset)
            again.load_state_dict(saved)
            resumed.append((copies, again))
        for step in grads[2:]:
            for ps, o in [(params, opt), *resumed]:
                for p, g in zip(ps, step):
                    p.grad = g.clone()
                o.step()
        for copies, _ in resumed:
            assert all(torch.equal(a, b) for a, b in zip(params, copies)), preset


def test_state_entries_hold_the_blocks_of_the_stacks():
    params = _params(0)
    opt = kronopt.build(params, "soap", **{"refresh.every": 2})
    _run(opt, params, torch.Generator().manual_seed(1), 4)
    bucket = next(b for b in opt._buckets if b.layout.batch == 3)
    for i, p in enumerate(bucket.params):
        entry = opt.state_dict()["state"][i]
        assert set(entry) >= {"factors.L", "factors.R", "basis.Q_L", "inner.exp_avg", "inner.exp_avg_sq", "calls", "step",
                              "basis.refreshes", "nonfinite", "bucket"}
        assert torch.equal(entry["factors.L"], bucket.state.factors.L[i]) and entry["factors.L"].shape == (6, 6)
        assert entry["step"] == bucket.state.step and isinstance(entry["step"], int)
        assert entry["basis.refreshes"] == bucket.state.basis.refreshes == 2


def test_state_of_a_parameter_is_views_of_the_bucket_stacks_that_stay_valid():
    params = _params(0)
    opt = kronopt.build(params, "soap", **{"refresh.every": 1})
    held = opt.state[params[1]]  # a caller holding the dict across steps
    gen = torch.Generator().manual_seed(1)
    _run(opt, params, gen, 2)  # the first refreshes may hand a stack a new memory layout: repointed then
    tensors = {k: v for k, v in held.items() if isinstance(v, torch.Tensor)}
    _run(opt, params, gen, 3)
    bucket = next(b for b in opt._buckets if b.layout.batch == 3)
    assert opt.state[params[1]] is held
    for key, stack in compose.flatten(bucket.state).items():
        if isinstance(stack, torch.Tensor):
            view = held[key]
            assert view.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr(), key  # same storage
            assert torch.equal(view, stack[1]), key
            assert view is tensors[key], f"{key}: written in place, the old view is the current one"
    assert held["calls"] == bucket.state.calls == 5 and held["step"] == bucket.state.step == 4
    # a split moves the blocks into new stacks: the same dict now points at them
    for j, p in enumerate(params):
        p.grad = None if j == 1 else torch.randn_like(p)
    opt.step()
    absent = next(b for b in opt._buckets if any(q is params[1] for q in b.params))
    assert absent.layout.batch == 1 and opt.state[params[1]] is held
    assert held["factors.L"].untyped_storage().data_ptr() == absent.state.factors.L.untyped_storage().data_ptr()
    assert opt.state[params[0]]["calls"] == 6 and held["calls"] == 5


def test_state_bytes_counts_the_stacks_once():
    params = _params(0)
    opt = kronopt.build(params, "soap")
    _run(opt, params, torch.Generator().manual_seed(1), 2)
    stacks = sum(
        v.numel() * v.element_size()
        for b in opt._buckets
        for v in compose.flatten(b.state).values()
        if isinstance(v, torch.Tensor)
    )
    views = sum(
        v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if isinstance(v, torch.Tensor) and k != "nonfinite"
    )
    assert opt.state_bytes() == stacks == views  # the views are not counted on top of the stacks


def test_state_exists_before_the_first_step_but_only_for_trainable_parameters():
    params = _params(0)
    params[4].requires_grad_(False)
    opt = kronopt.build(params, "soap")
    assert set(opt.state) == set(params) - {params[4]}
    assert opt.inspect() == {} and opt.eigh_failures() == {}, "nothing stepped yet"
    sd = opt.state_dict()
    assert 4 not in sd["state"] and sd["state"][0]["calls"] == 0
    other = kronopt.build(_params(0), "soap")
    other.load_state_dict(sd)
    assert other.state_dict()["state"].keys() == set(range(len(SHAPES))), "a trainable parameter without an entry starts fresh"


def test_version_1_state_dict_still_loads_bit_for_bit():
    _resume_equals_uninterrupted("soap", _v1_state_dict, lambda o, sd: o.load_state_dict(sd))
    _resume_equals_uninterrupted("pro_kl_shampoo", _v1_state_dict, lambda o, sd: o.load_state_dict(sd))


def test_version_1_helper_matches_the_real_writer_layout():
    """The keys the version-1 writer produced (kronopt 384dda7), checked against the helper above."""
    params = _params(0)
    opt = kronopt.build(params, "soap")
    _run(opt, params, torch.Generator().manual_seed(1), 3, absent=(1,))
    sd = _v1_state_dict(opt)
    assert [b["params"] for b in sd["kronopt"]["buckets"]] == [[0, 2], [1], [3], [4], [5]]
    assert set(sd["kronopt"]["buckets"][0]) == {"params", "group", "state", "nonfinite"}
    assert sd["kronopt"]["buckets"][0]["state"]["factors.L"].shape == (2, 6, 6)


def test_unknown_version_fails_clearly_and_changes_nothing():
    params = _params(0)
    opt = kronopt.build(params, "soap")
    _run(opt, params, torch.Generator().manual_seed(1), 3)
    before = opt.state_dict()
    sd = opt.state_dict()
    sd["kronopt"]["version"] = 3
    with pytest.raises(ValueError, match="unknown kronopt state dict version 3"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items() if isinstance(v, torch.Tensor))


def test_a_state_dict_of_another_shape_fails_cleanly():
    params = _params(0)
    opt = kronopt.build(params, "soap")
    _run(opt, params, torch.Generator().manual_seed(1), 3)
    other_params = _params(0, [(6, 5), (6, 4), (6, 4), (5,), (3, 2, 2), (4, 6)])
    other = kronopt.build(other_params, "soap", lr=0.5)
    before = other.state_dict()
    with pytest.warns(UserWarning, match="different config"), pytest.raises(
        ValueError, match=r"of param_groups\[0\].params\[0\] \(6, 5\) has shape \(4, 4\), expected \(5, 5\)"
    ):
        other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.5
    assert other.state[other_params[0]]["factors.R"].shape == (5, 5) and other.state_dict()["state"].keys() == before["state"].keys()


def _same_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k, entry in a["state"].items():
        for name, v in entry.items():
            assert (torch.equal(b["state"][k][name], v) if isinstance(v, torch.Tensor) else b["state"][k][name] == v), (k, name)


@pytest.mark.parametrize("value", ["0", 1.0, torch.tensor(1.5), torch.tensor([1, 2]), [0], True, -1])
def test_a_malformed_skipped_steps_count_is_refused_before_anything_changes(value):
    """``kronopt["skipped_steps"]`` not a count raised ``AttributeError`` after the buckets were replaced, and
    every later step raised: the load now refuses it first, naming it, and the optimizer steps on as before."""
    params = _params(0)
    opt = kronopt.build(params, "soap", **OVERRIDES["soap"])
    _run(opt, params, torch.Generator().manual_seed(1), 3)
    sd = opt.state_dict()
    sd["kronopt"]["skipped_steps"] = value
    other_params = _params(2)
    other = kronopt.build(other_params, "soap", **OVERRIDES["soap"])
    _run(other, other_params, torch.Generator().manual_seed(3), 2)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"kronopt\['skipped_steps'\] is .*: it must be the count of consecutive skipped steps"):
        other.load_state_dict(sd)
    _same_state(before, other.state_dict())
    _run(other, other_params, torch.Generator().manual_seed(4), 1)  # and it steps on


def test_a_skipped_steps_count_saved_as_an_int_loads_as_the_tensor_does():
    """A dict that went through JSON or a hand's edit holds the count as an ``int``: it loads as the tensor."""
    params = _params(0)
    opt = kronopt.build(params, "soap", max_skipped_steps=5)
    _run(opt, params, torch.Generator().manual_seed(1), 2)
    params[0].grad = torch.full_like(params[0], float("nan"))
    for p in params[1:]:
        p.grad = torch.ones_like(p)
    with pytest.warns(RuntimeWarning, match="the whole step was skipped"):
        opt.step()  # skipped: the count is 1
        opt.flush_warnings()
    sd = opt.state_dict()
    assert int(sd["kronopt"]["skipped_steps"]) == 1
    sd["kronopt"]["skipped_steps"] = 1
    other = kronopt.build(_params(0), "soap", max_skipped_steps=5)
    other.load_state_dict(sd)
    assert other.skipped_steps() == 1 and other._skipped_steps.dtype == torch.int64


def test_parameters_named_as_saved_but_listed_in_another_order_are_refused():
    """The entries are matched by position (as torch.optim's): the same names in another order within a group
    handed one parameter's state to another of its shape (a's second moment, 1e4, to b). Refused, naming the
    places, with the optimizer unchanged; the saved order loads."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(8, 12, generator=gen)) for _ in range(2))
    opt = kronopt.build([("a", a), ("b", b)], "soap")
    for _ in range(3):
        a.grad, b.grad = torch.full_like(a, 100.0), 1e-3 * torch.randn(b.shape, generator=gen)
        opt.step()
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    other = kronopt.build([("b", b2), ("a", a2)], "soap")
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"group 0 lists its parameters in another order \(place 0: saved a, here b, place 1: saved b, here a\)"):
        other.load_state_dict(opt.state_dict())
    _same_state(before, other.state_dict())
    again = kronopt.build([("a", a2), ("b", b2)], "soap")
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[a2]["inner.exp_avg_sq"], opt.state[a]["inner.exp_avg_sq"])


def test_a_dcp_load_into_a_model_that_registers_its_parameters_in_another_order_follows_the_names():
    """torch.distributed.checkpoint keys the entries by name: ``set_optimizer_state_dict`` lists each saved group's
    ``param_names`` as saved and its ``params`` (names) in this optimizer's order, so the order check above must not
    refuse it (it did, on the first form of that check); each parameter gets its own state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    class Net(torch.nn.Module):
        def __init__(self, order):
            super().__init__()
            for name in order:
                setattr(self, name, torch.nn.Linear(6, 6, bias=False))

    torch.manual_seed(0)
    first = Net(["a", "b"])
    opt = kronopt.build(first.named_parameters(), "soap")
    for p in first.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    saved = get_optimizer_state_dict(first, opt)
    second = Net(["b", "a"])
    second.load_state_dict(first.state_dict())
    other = kronopt.build(second.named_parameters(), "soap")
    set_optimizer_state_dict(second, other, saved)
    for name in ("a", "b"):
        mine, theirs = other.state[getattr(second, name).weight], opt.state[getattr(first, name).weight]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], v) for k, v in theirs.items() if isinstance(v, torch.Tensor))
    assert not torch.equal(opt.state[first.a.weight]["factors.L"], opt.state[first.b.weight]["factors.L"])


# -- torch.distributed.checkpoint -------------------------------------------------------------


def _model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Linear(3, 3, bias=False))


def _train_model(model, opt, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("full", [False, True], ids=["sharded", "full"])
@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_dcp_get_and_set_optimizer_state_dict_round_trip(preset, full):
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    options = dcp.StateDictOptions(full_state_dict=full)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    model = _model()
    opt = kronopt.build(model.named_parameters(), preset, **OVERRIDES.get(preset, {}))
    _train_model(model, opt, x, 3)
    osd = dcp.get_optimizer_state_dict(model, opt, options=options)
    assert set(osd["state"]) == {name for name, _ in model.named_parameters()}
    assert "kronopt" not in osd, "DCP keeps only state and param_groups: they must be enough"
    snapshot = [p.detach().clone() for p in model.parameters()]
    _train_model(model, opt, x, 4)

    resumed = _model()
    with torch.no_grad():
        for p, s in zip(resumed.parameters(), snapshot):
            p.copy_(s)
    opt2 = kronopt.build(resumed.named_parameters(), preset, **OVERRIDES.get(preset, {}))
    dcp.set_optimizer_state_dict(resumed, opt2, optim_state_dict=osd, options=options)
    assert all(p.grad is None for p in resumed.parameters())
    _train_model(resumed, opt2, x, 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("updates,refused", [(1, False), (2, True), (5, True)])
def test_a_full_dict_whose_block_another_rank_owned_is_refused_where_its_counters_disagree(updates, refused):
    """torch's ``get_optimizer_state_dict(full_state_dict=True)`` gathers DTensors only: on one rank of a work-sharded
    or FSDP2 run it holds the other ranks' blocks as markers (their ``calls`` and ``bucket``), and
    ``set_optimizer_state_dict`` fills each marker's missing keys from the fresh optimizer's own state: the block
    resumed silently from fresh tensors (5.9e-2 off after 6 steps). The marker made here by hand is what rank 0's
    dict holds (tests/distributed covers the two-rank save); a load now refuses it by its counters, naming the block,
    and changes nothing. After one update the counters agree (documented)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    options = dcp.StateDictOptions(full_state_dict=True)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    model = _model()
    opt = kronopt.build(model.named_parameters(), "soap")
    _train_model(model, opt, x, updates + 1)  # soap's first call only observes
    osd = dcp.get_optimizer_state_dict(model, opt, options=options)
    name = next(n for n, p in model.named_parameters() if p.ndim == 2)
    entry = osd["state"][name]
    osd["state"][name] = {"calls": entry["calls"], "bucket": entry["bucket"]}  # another rank's block
    resumed = _model()
    opt2 = kronopt.build(resumed.named_parameters(), "soap")
    _train_model(resumed, opt2, x, 2)
    before = copy.deepcopy(opt2.state_dict())
    if not refused:
        dcp.set_optimizer_state_dict(resumed, opt2, optim_state_dict=osd, options=options)
        return
    with pytest.raises(ValueError, match=rf"the saved state of {name} counts calls and updates that no block counts together"):
        dcp.set_optimizer_state_dict(resumed, opt2, optim_state_dict=osd, options=options)
    torch.testing.assert_close(opt2.state_dict()["state"], before["state"], rtol=0, atol=0)


def test_a_state_dict_whose_step_counter_the_user_reset_still_loads():
    """``state[p]["step"] = 0`` (a torch habit) is written into the state dict as it stands; the counters' refusal
    is for a dict torch's API filled (no kronopt section), not for kronopt's own, which loaded before."""
    w = torch.nn.Parameter(torch.randn(5, 4))
    opt = kronopt.build([w], "adamw")
    for _ in range(3):
        w.grad = torch.randn(5, 4)
        opt.step()
    opt.state[w]["step"] = 0
    again = kronopt.build([torch.nn.Parameter(w.detach().clone())], "adamw")
    again.load_state_dict(opt.state_dict())


def test_dcp_on_a_fresh_optimizer_takes_no_step():
    """DCP's _init_optim_state steps with zero gradients when optimizer.state is empty; it never is here."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = kronopt.build(model.named_parameters(), "adamw")
    osd = dcp.get_optimizer_state_dict(model, opt)
    assert all(entry["calls"] == 0 and entry["step"] == 0 for entry in osd["state"].values())
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))
    twin = _model()
    opt_twin = kronopt.build(twin.named_parameters(), "adamw")
    dcp.set_optimizer_state_dict(twin, opt_twin, optim_state_dict=osd, options=dcp.StateDictOptions(full_state_dict=True))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    _train_model(model, opt, x, 3)
    _train_model(twin, opt_twin, x, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "pro_kl_shampoo", "dykaf"])
def test_writing_into_the_stacks_changes_no_bit(preset, monkeypatch):
    """Against the out-of-place select of the release before (a new tensor per field and step)."""
    from kronopt import linalg

    def run(out_of_place):
        if out_of_place:
            monkeypatch.setattr(compose, "stage_write", lambda old, new: None)  # every write through write_
            monkeypatch.setattr(compose, "write_", lambda old, new, ok, copies=None, all_ok=None, counters=None: (
                compose.zip_tensors(new, old, lambda n, o: o if n is o else linalg.select_blocks(ok, n, o)), True))
        params = _params(0)
        opt = kronopt.build(params, preset, **OVERRIDES.get(preset, {}))
        _run(opt, params, torch.Generator().manual_seed(1), 8, absent=(1,))
        monkeypatch.undo()
        return params, opt.state_dict()["state"]

    (p_new, s_new), (p_old, s_old) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(p_new, p_old))
    for i, entry in s_old.items():
        for key, value in entry.items():
            assert torch.equal(s_new[i][key], value) if isinstance(value, torch.Tensor) else s_new[i][key] == value, key


def test_saved_views_of_param_shaped_state_match_the_live_views_with_merged_dims():
    """``saved_views`` finds each entry's block by the config's shape policy: with ``merge_dims`` a matrix
    ``(7, 2)`` and a conv weight ``(4, 3, 3, 3)`` of an elementwise bucket are blocks ``(14, 1)`` and
    ``(108, 1)``, saved shaped like their parameters. Catches the block guessed from the saved shapes alone
    (``(7, 2)``, ``(4, 27)``), which ``inspect()`` of the live optimizer does not show."""
    from kronopt.inspection import saved_views

    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3, 3, 3), (5,), (7, 2)]]
    for over in ({}, {"shapes.merge_dims": True}):
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw", **over)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        live, saved = opt.inspect(), saved_views(opt.state_dict())
        assert live.keys() == saved.keys()
        for name in live:
            assert saved[name].shape == live[name].shape, (over, name)
            assert torch.equal(saved[name].second_moment, live[name].second_moment)


@pytest.mark.parametrize("preset", ["soap", "shampoo", "kl_shampoo", "dykaf", "pro_kl_shampoo", "pro_soap"])
def test_every_stack_keeps_the_layout_it_was_made_in(preset):
    """A checkpoint loaded by filling a fresh optimizer's tensors (``torch.distributed.checkpoint``) has the
    fresh stacks' layout; the products that read them round by it on some processors (MKL on an AMD EPYC), so
    the resumed run matches the uninterrupted one only if no stack changes its layout while training. Catches
    a basis made row-major at construction that a refresh's solver (``eigh``, QR: column-major) replaces, as
    the bases were before: strides recorded at construction against those after refreshes, with a bucket of
    a restricted side where the preset has one."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(12, 8), (12, 8), (40, 24), (24,)]]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], preset, **{"refresh.every": 3})

    def strides():
        return {
            (b, k): v.stride()
            for b, bucket in enumerate(opt._buckets)
            if bucket.state is not None
            for k, v in compose.flatten(bucket.state).items()
            if isinstance(v, torch.Tensor)
        }

    made = strides()
    assert any(k.startswith("basis.Q") for _, k in made), "no basis to check"
    for _ in range(8):  # refreshes at calls 3 and 6 (and the first call's)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert strides() == made


@pytest.mark.parametrize("preset, shape, key", [("soap", (9, 1), "inner.exp_avg"), ("kl_soap", (9, 1), "inner.exp_avg"),
                                              ("soap", (12,), "inner.exp_avg"), ("pro_soap", (6, 5), "basis.Q_L")])
def test_a_held_state_view_stays_live_across_refreshes_where_a_stack_has_a_side_of_one(preset, shape, key):
    """A ``(b, d, 1)`` stack written ``(d, 1, d)`` by its init and ``(d, 1, 1)`` by a refresh lies alike in memory
    (no entry's place reads a stride along a dim of size 1), but the state walk compared raw strides: every refresh
    replaced the stack and every ``state[p]`` view of it, so a tensor a caller held stopped changing."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = kronopt.build([p], preset, **{"refresh.every": 2, "shapes.precondition_1d": True})
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    held = opt.state[p][key]
    for _ in range(6):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        assert held.data_ptr() == opt.state[p][key].data_ptr() and torch.equal(held, opt.state[p][key])


def test_merged_rank_dicts_list_the_blocks_in_their_buckets_order():
    """``merge_state_dicts`` sorted the entries by their keys as text (0, 1, 10, 11, 2, ...); a load in one process
    stacks a bucket's blocks in the order its dict lists them, so the merged dict lists them as the ranks' bucket
    lists do (bucket by bucket, each in its stack's order)."""
    from kronopt import distributed

    buckets = [[11, 2], [0, 10, 1]]
    keys = list(range(12))
    owner = {11: 0, 2: 1, 0: 1, 10: 0, 1: 0}

    def rank_dict(rank):
        state = {}
        for bi, idx in enumerate(buckets):
            for i in idx:
                entry = {"calls": 3, "bucket": bi}
                state[i] = {**entry, "x": torch.zeros(1)} if owner[i] == rank else entry
        info = {"rank": rank, "world_size": 2, "buckets": buckets, "calls": [3, 3]}
        return {"state": state, "param_groups": [{"params": keys}], "kronopt": {distributed.SHARDING_KEY: info}}

    merged = distributed.merge_state_dicts([rank_dict(1), rank_dict(0)])
    assert list(merged["state"]) == [11, 2, 0, 10, 1]


def test_a_checkpoint_whose_fallback_routed_resumes_as_its_run_stepped():
    """kronopt before the refusal took a ``[fallback.route]`` and ignored it (a fallback routes nothing): such a
    checkpoint rebuilds with ``from_state_dict`` and loads into the preset without a warning, bit for bit."""
    import warnings

    def make():
        g = torch.Generator().manual_seed(3)
        return [("w", torch.nn.Parameter(torch.randn(6, 4, generator=g))), ("b", torch.nn.Parameter(torch.randn(4, generator=g)))]

    named = make()
    opt = kronopt.build(named, "muon")
    for _ in range(3):
        for _, p in named:
            p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    sd["kronopt"]["config"]["fallback"]["route"] = {"vectors": "fallback", "fallback_names": ["embed"]}
    rebuilt = kronopt.from_state_dict([(n, torch.nn.Parameter(p.detach().clone())) for n, p in named], sd)
    assert rebuilt.config.fallback.route == kronopt.config.Route()
    other = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    fresh = kronopt.build(other, "muon")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(sd)


def test_a_dykaf_checkpoint_of_another_power_iters_default_loads_without_a_warning_where_the_svd_starts():
    """``power_iters`` (20 before, 100 now) is read by the power solver only: a checkpoint saved with the old default
    and the SVD solver steps alike, so loading it says nothing; with ``init_solver = "power"`` it warns."""
    import warnings

    for solver, warns in (("svd", False), ("power", True)):
        params = [torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(4)))]
        opt = kronopt.build(params, "dykaf", **{"factors.init_solver": solver})
        params[0].grad = torch.randn(6, 4)
        opt.step()
        sd = opt.state_dict()
        sd["kronopt"]["config"]["factors"]["power_iters"] = 20
        fresh = kronopt.build([torch.nn.Parameter(params[0].detach().clone())], "dykaf", **{"factors.init_solver": solver})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh.load_state_dict(sd)
        assert any("different config" in str(w.message) for w in caught) == warns, solver
