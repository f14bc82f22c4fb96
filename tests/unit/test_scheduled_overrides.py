"""A live group's refresh period f and factor retention ρ can be scheduled (shared/specs/soap.md §3: "kronopt reads
them from the param group at every step"): an edit of ``group["overrides"]`` is taken up by the next step; an edit of
anything the buckets or the state are shaped by is refused, naming it, with nothing changed."""

import pytest
import torch

import kronopt
from kronopt.config import ConfigError
from tests.equivalence._helpers import reference_grads
from tests.reference.soap import SoapState, make_soap_hyper, soap_update

SHAPES = [(6, 4), (4, 6), (5, 5)]

pytestmark = pytest.mark.filterwarnings("ignore:the route sends embeddings")


def _grads(gen, steps, shapes=SHAPES):
    return reference_grads(gen, shapes, steps)


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_soap_steps_the_spec_with_f_and_rho_changed_between_calls(gen):
    """The float64 reference run with the period and retention of each call (its hyperparameters are per call) is
    what kronopt steps when the group's overrides change after call 4 and again after call 9."""
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = _grads(gen, 16)
    schedule = {0: (5, 0.95), 4: (2, 0.5), 9: (3, 0.2)}  # call index → (f, ρ) from that call on
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours, "soap", lr=3e-3, **{"refresh.every": 5, "factors.beta": 0.95})
    weights, states = [p.clone() for p in params], [SoapState() for _ in params]
    for k, call in enumerate(grads):
        L = opt.state[ours[0]].get("factors.L", torch.zeros(())).clone()
        if k in schedule:
            f, rho = schedule[k]
            opt.param_groups[0]["overrides"].update({"refresh.every": f, "factors.beta": rho})
            hp = make_soap_hyper(lr=3e-3, shampoo_beta=rho, precondition_frequency=f)
        weights = [soap_update(w, g, s, hp) for w, g, s in zip(weights, call, states)]
        _step(opt, ours, call)
        for p, w in zip(ours, weights):
            torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    # the last factor update took ρ = 0.2 (not 0.95, as the group was built with)
    g = grads[-1][0]
    torch.testing.assert_close(opt.state[ours[0]]["factors.L"], 0.2 * L + 0.8 * g @ g.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf", "kl_shampoo", "kl_soap", "pro_kl_shampoo", "pro_dykaf"])
def test_a_schedule_steps_as_an_optimizer_built_with_the_new_values_and_resumed(gen, preset):
    """Every preset with factors and a refresh reads f and ρ afresh: a change after call 5 steps bit for bit as an
    optimizer built with the new values that loads the state saved at the change."""
    shapes = [(8, 6), (6, 8), (7,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = _grads(gen, 14, shapes)
    before = {"refresh.every": 4, "factors.beta": 0.9}
    after = {"refresh.every": 3, "refresh.offset": 1, "factors.beta": 0.6}
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build([{"params": ours, **before}], preset)
    for call in grads[:5]:
        _step(opt, ours, call)
    saved = opt.state_dict()
    other = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fresh = kronopt.build([{"params": other, **before}], preset)
    # the saved groups with the new values (a load takes the groups' overrides from the dict, as torch.optim does)
    saved["param_groups"] = [{**g, "overrides": {**g["overrides"], **after}} for g in saved["param_groups"]]
    fresh.load_state_dict(saved)
    for g in opt.param_groups:
        g["overrides"].update(after)
    refreshes = opt.state[ours[0]]["basis.refreshes"]
    for call in grads[5:]:
        _step(opt, ours, call)
        _step(fresh, other, call)
        for p, q in zip(ours, other):
            assert torch.equal(p, q)
    # f = 3, offset 1 over the updates 5 … 13: refreshes at 7, 10, 13 (f = 4 would give 8 and 12)
    assert opt.state[ours[0]]["basis.refreshes"] - refreshes == 3


class _Blocks(torch.nn.Module):
    """A model of the given blocks, named ``blocks.i`` (for torch.distributed.checkpoint's name-keyed dicts)."""

    def __init__(self, values):
        super().__init__()
        self.blocks = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in values])


def _built(gen, preset="soap", **overrides):
    """An optimizer of one group holding ``overrides``, stepped 3 times."""
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    opt = kronopt.build([{"params": params, **overrides}], preset)
    grads = _grads(gen, 3)
    for call in grads:
        _step(opt, params, call)
    return opt, params, grads


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("split.rank", 2, "fixed when the group is made"),
        ("inner.betas", [0.9, 0.5], "fixed when the group is made"),
        ("shapes.max_dim", 4, "fixed when the group is made"),
        ("lr", 0.5, "param_groups[0]['lr']"),
        ("refresh.every", 0, "refresh.every"),
        ("refresh.offset", 12, "offset must be < every"),  # a cross-field check names its table
        ("factors.beta", 1.5, "factors.beta"),
    ],
)
def test_an_edit_the_step_cannot_take_is_refused_naming_it_and_changes_nothing(gen, key, value, says):
    opt, params, grads = _built(gen, "pro_kl_shampoo" if key == "split.rank" else "soap")
    weights, state = _snapshot(opt, params)
    was = opt.param_groups[0]["overrides"].get(key, "absent")
    opt.param_groups[0]["overrides"][key] = value
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    with pytest.raises(ConfigError) as info:
        opt.step()
    where = key if key != "refresh.offset" else "refresh"
    assert f"param_groups[0]['overrides'].{where}" in str(info.value) and says in str(info.value)
    after_weights, after_state = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(weights, after_weights))
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    with pytest.raises(ConfigError):  # refused again while the edit stands
        opt.step()
    if was == "absent":
        del opt.param_groups[0]["overrides"][key]
    else:
        opt.param_groups[0]["overrides"][key] = was
    opt.step()  # undone: steps again
    assert not all(torch.equal(a, p) for a, p in zip(weights, params))


def test_every_refused_edit_of_every_group_is_listed_together(gen):
    a = [torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))]
    b = [torch.nn.Parameter(torch.randn(5, 5, generator=gen, dtype=torch.float64))]
    opt = kronopt.build([{"params": a}, {"params": b}], "soap")
    opt.param_groups[0]["overrides"]["inner.eps"] = 1e-3
    opt.param_groups[1]["overrides"]["refresh.every"] = -1
    for p in a + b:
        p.grad = torch.randn_like(p)
    with pytest.raises(ConfigError) as info:
        opt.step()
    text = str(info.value)
    assert "param_groups[0]['overrides'].inner.eps" in text and "param_groups[1]['overrides'].refresh.every" in text


def test_a_refused_value_or_a_torch_key_hides_no_other_problem(gen):
    """A torch.optim key on one group raised alone, hiding the other groups' problems; in one group a value the
    config refuses hid an edit of a fixed key (the user mended one to meet the other at the next step)."""
    ps = [torch.nn.Parameter(torch.randn(5, 5, generator=gen, dtype=torch.float64)) for _ in range(3)]
    opt = kronopt.build([{"params": [p]} for p in ps], "soap")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps]
    opt.param_groups[0]["overrides"].update({"factors.beta": 2.0, "inner.eps": 1e-3})
    opt.param_groups[1]["overrides"]["refresh.every"] = 0
    opt.param_groups[2]["betas"] = (0.9, 0.9)
    with pytest.raises(ConfigError) as info:
        opt.step()
    assert [path for path, _ in info.value.errors] == [
        "param_groups[2].betas",
        "param_groups[0]['overrides'].factors.beta",
        "param_groups[0]['overrides'].inner.eps",
        "param_groups[1]['overrides'].refresh.every",
    ]
    assert "is fixed when the group is made" in dict(info.value.errors)["param_groups[0]['overrides'].inner.eps"]
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


@pytest.mark.parametrize(
    ("built", "edit"),
    [
        ({"refresh.every": 4, "refresh.stagger": True}, {"refresh.every": 2}),
        # an offset moves the group's schedule, by which groups staggered together balance their phases: a resume
        # would balance them otherwise than the live run
        ({"refresh.every": 4, "refresh.stagger": True}, {"refresh.offset": 3}),
        # one phase (every = 1) does not stagger yet; a period of 4 would, from the next step on
        ({"refresh.every": 1, "refresh.stagger": True}, {"refresh.every": 4}),
    ],
)
def test_a_staggered_schedule_is_fixed(gen, built, edit):
    opt, params, grads = _built(gen, "soap", **built)
    weights = [p.detach().clone() for p in params]
    opt.param_groups[0]["overrides"].update(edit)
    with pytest.raises(ConfigError, match="staggered"):
        _step(opt, params, grads[0])
    assert all(torch.equal(a, b) for a, b in zip(weights, params))


def test_a_dotted_key_set_on_the_live_group_is_one_of_its_overrides(gen):
    opt, params, grads = _built(gen, "soap", **{"refresh.every": 100})
    refreshes = opt.state[params[0]]["basis.refreshes"]
    opt.param_groups[0]["refresh.every"] = 1
    for call in grads:
        _step(opt, params, call)
    assert "refresh.every" not in opt.param_groups[0] and opt.param_groups[0]["overrides"]["refresh.every"] == 1
    assert opt.state[params[0]]["basis.refreshes"] == refreshes + 3


def test_a_per_step_schedule_keeps_one_resolved_config_per_group(gen):
    """A retention changed at every step resolves a config each time; the old ones are let go."""
    opt, params, grads = _built(gen, "dykaf")
    for k in range(30):
        opt.param_groups[0]["overrides"]["factors.beta"] = 0.9 + k / 1000
        _step(opt, params, grads[k % 3])
    assert len(opt._resolved) <= len(opt.param_groups)
    assert opt._group_cfgs[0].factors.beta == pytest.approx(0.929)


def test_an_edit_of_a_list_in_place_is_seen(gen):
    """``inner.betas`` edited in place (not replaced) is an edit: refused as one."""
    opt, params, grads = _built(gen, "soap", **{"inner.betas": [0.9, 0.95]})
    opt.param_groups[0]["overrides"]["inner.betas"][1] = 0.5
    with pytest.raises(ConfigError, match="inner.betas"):
        _step(opt, params, grads[0])


def test_a_schedule_survives_save_and_load(gen):
    """The saved groups hold the edited overrides: an optimizer built with the old values steps on with the new."""
    opt, params, grads = _built(gen, "kl_shampoo", **{"refresh.every": 10})
    opt.param_groups[0]["overrides"]["refresh.every"] = 2
    _step(opt, params, grads[0])
    other = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = kronopt.build([{"params": other, "refresh.every": 10}], "kl_shampoo")
    fresh.load_state_dict(opt.state_dict())
    for call in grads:
        _step(opt, params, call)
        _step(fresh, other, call)
    assert all(torch.equal(p, q) for p, q in zip(params, other))
    assert fresh.state[other[0]]["basis.refreshes"] == opt.state[params[0]]["basis.refreshes"]


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "dykaf"])
def test_an_edited_schedule_survives_a_dcp_checkpoint(gen, preset, tmp_path):
    """``dcp.load`` fills the keys of the fresh optimizer's own state dict: its groups' overrides, empty where nothing
    was edited, took none of the saved schedule, and the resumed run stepped with the construction's f and ρ (4e-3 to
    2e-2 off). Every group's saved overrides record the three schedulable keys, so the template asks for them."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = _grads(gen, 10)
    runs = []
    for resume in (False, True):
        model = _Blocks(start)
        opt = kronopt.build(model.named_parameters(), preset, **{"refresh.every": 10})
        for k, call in enumerate(grads):
            if k == 2:
                opt.param_groups[0]["overrides"].update({"refresh.every": 3, "factors.beta": 0.8})
            if resume and k == 5:
                dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
                model = _Blocks([p.detach() for p in model.parameters()])
                opt = kronopt.build(model.named_parameters(), preset, **{"refresh.every": 10})
                state = {"optim": get_optimizer_state_dict(model, opt)}
                dcp.load(state, checkpoint_id=str(tmp_path))
                set_optimizer_state_dict(model, opt, state["optim"])
                assert opt.param_groups[0]["overrides"] == {"refresh.every": 3, "refresh.offset": 0, "factors.beta": 0.8}
            _step(opt, list(model.parameters()), call)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("preset", ["kl_shampoo", "muon"])
def test_a_schedule_edited_in_every_group_survives_torchs_full_state_dict_round_trip(gen, preset):
    """A loop over every group (configs.md's recipe) puts the main schedule into the fallback group's overrides too;
    the fresh optimizer's template lacked that key there, and torch's full-state load failed in its unflattening
    (``KeyError: 'param_groups.1.overrides.refresh.every'``)."""
    dsd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    options = dsd.StateDictOptions(full_state_dict=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))

    model, twin = Net(), Net()
    twin.load_state_dict(model.state_dict())
    opt = kronopt.build(model.named_parameters(), preset, **{"refresh.every": 5})
    for g in opt.param_groups:
        g["overrides"]["refresh.every"] = 3
    grads = [(torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)) for _ in range(6)]
    for gw, gb in grads[:3]:
        model.w.grad, model.b.grad = gw.clone(), gb.clone()
        opt.step()
    saved = dsd.get_optimizer_state_dict(model, opt, options=options)
    twin.load_state_dict(model.state_dict())
    resumed = kronopt.build(twin.named_parameters(), preset, **{"refresh.every": 5})
    dsd.set_optimizer_state_dict(twin, resumed, saved, options=options)
    assert [g["overrides"]["refresh.every"] for g in resumed.param_groups] == [3, 3]
    for gw, gb in grads[3:]:
        for m, o in ((model, opt), (twin, resumed)):
            m.w.grad, m.b.grad = gw.clone(), gb.clone()
            o.step()
    assert torch.equal(model.w, twin.w) and torch.equal(model.b, twin.b)


def test_a_dcp_checkpoint_from_before_the_schedule_record_loads_with_a_partial_load(gen, tmp_path):
    """docs/distributed.md: a checkpoint whose groups' overrides lack the schedule keys (kronopt before the record:
    made here by removing them before ``dcp.save``) stops ``dcp.load`` on the missing key; with
    ``allow_partial_load=True`` the keys keep the fresh optimizer's values and the run resumes exactly."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = _grads(gen, 8)
    model = _Blocks(start)
    opt = kronopt.build(model.named_parameters(), "soap", **{"refresh.every": 3})
    for call in grads[:4]:
        _step(opt, list(model.parameters()), call)
    old = get_optimizer_state_dict(model, opt)
    for g in old["param_groups"]:
        g["overrides"] = {}
    dcp.save({"optim": old}, checkpoint_id=str(tmp_path))
    resumed_model = _Blocks([p.detach() for p in model.parameters()])
    resumed = kronopt.build(resumed_model.named_parameters(), "soap", **{"refresh.every": 3})
    state = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException holding each rank's failure

    with pytest.raises((RuntimeError, CheckpointException)) as info:
        dcp.load(state, checkpoint_id=str(tmp_path))
    failures = getattr(info.value, "failures", {0: info.value})
    assert "Missing key in checkpoint state_dict: optim.param_groups.0.overrides.refresh.every" in repr(failures) + str(info.value)
    dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(resumed_model, resumed, state["optim"])
    for call in grads[4:]:
        _step(opt, list(model.parameters()), call)
        _step(resumed, list(resumed_model.parameters()), call)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_a_saved_group_records_its_schedule_by_its_own_names(gen):
    """The record names each group's keys as its overrides do: a fallback group's ``fallback.…``; a factor estimator
    without a retention records no ``factors.beta``; a tie (``factors.beta = "beta2"``) is kept as written."""
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(6, generator=gen))
    groups = kronopt.build([w, b], "muon").state_dict()["param_groups"]
    assert groups[0]["overrides"] == {"refresh.every": 1, "refresh.offset": 0}  # muon: no factors, no retention
    # a fallback group records the main's schedule too: a loop over every group edits it there
    assert groups[1]["overrides"] == {"refresh.every": 1, "refresh.offset": 0, "fallback.refresh.every": 1, "fallback.refresh.offset": 0}
    tied = kronopt.build([w], "soap", **{"factors.beta": "beta2", "refresh.every": 7}).state_dict()["param_groups"]
    assert tied[0]["overrides"] == {"refresh.every": 7, "refresh.offset": 0, "factors.beta": "beta2"}


def test_a_load_keeps_this_optimizers_schedule_where_the_saved_run_did_not_edit_its_own(gen):
    """Every state dict records the schedule (for DCP's templates); a load of a dict with its config drops the values
    that are the saved config's own, so an optimizer built with another period keeps it (as before the record), and
    takes an edited one."""
    opt, params, grads = _built(gen, "soap", **{"refresh.every": 10})
    other = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = kronopt.build([{"params": other}], "soap", **{"refresh.every": 50})
    with pytest.warns(UserWarning, match="different config"):
        fresh.load_state_dict(opt.state_dict())
    assert fresh._group_cfgs[0].refresh.every == 50 and "refresh.every" not in fresh.param_groups[0]["overrides"]
    opt.param_groups[0]["overrides"]["refresh.every"] = 3
    _step(opt, params, grads[0])
    with pytest.warns(UserWarning, match="different config"):
        fresh.load_state_dict(opt.state_dict())
    assert fresh._group_cfgs[0].refresh.every == 3


def test_a_state_dict_is_taken_while_an_override_is_refused(gen):
    """A checkpoint after a refused edit (a save-on-exception callback): the record of the schedule is left out for
    that group, its overrides saved as they are, and the next step still refuses them."""
    opt, params, grads = _built(gen, "soap")
    opt.param_groups[0]["overrides"]["refresh.every"] = 0
    assert opt.state_dict()["param_groups"][0]["overrides"] == {"refresh.every": 0}
    with pytest.raises(ConfigError, match="refresh.every: must be ≥ 1"):
        _step(opt, params, grads[0])


def test_an_edit_is_told_the_same_whatever_else_the_group_holds(gen):
    """A main-pipeline key edited in a fallback group was told "fixed when the group is made" beside a refused value,
    and "sets the main pipeline" alone: one judgement serves both."""
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    messages = []
    for refused in (False, True):
        opt = kronopt.build([w, b], "kl_shampoo")
        opt.param_groups[1]["overrides"]["inner.eps"] = 1e-3
        if refused:
            opt.param_groups[1]["overrides"]["fallback.refresh.every"] = 0
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        with pytest.raises(ConfigError) as info:
            opt.step()
        messages.append(dict(info.value.errors)["param_groups[1]['overrides'].inner.eps"])
    assert messages[0] == messages[1] and messages[0].startswith("sets the main pipeline")


def test_a_fallback_key_belongs_to_the_fallback_group(gen):
    """muon routes the vector to an AdamW group: a ``fallback.…`` edit in the main group's overrides would change a
    config nothing steps with (it was taken and ignored), so it is refused pointing to the fallback group, whose own
    edit is named as the user writes it."""
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    opt = kronopt.build([w, b], "muon")
    main, fallback = (opt.param_groups[k] for k in (0, 1))
    assert (main["pipeline"], fallback["pipeline"]) == ("main", "fallback")
    main["overrides"]["fallback.inner.betas"] = [0.5, 0.5]
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\['overrides'\]\.fallback\.inner\.betas.*fallback"):
        _step(opt, [w, b], [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)])
    del main["overrides"]["fallback.inner.betas"]
    fallback["overrides"]["fallback.inner.betas"] = [0.5, 0.5]
    with pytest.raises(ConfigError, match=r"param_groups\[1\]\['overrides'\]\.fallback\.inner\.betas: is fixed"):
        _step(opt, [w, b], [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)])


def test_a_saved_state_dict_keeps_the_overrides_it_was_saved_with(gen):
    """The documented schedule edits the live dict in place: a state dict taken before keeps its own values."""
    opt, params, grads = _built(gen, "soap", **{"refresh.every": 10})
    saved = opt.state_dict()
    opt.param_groups[0]["overrides"]["refresh.every"] = 2
    assert saved["param_groups"][0]["overrides"]["refresh.every"] == 10


def test_a_tensor_rate_filled_in_place_is_no_edit_of_the_overrides(gen):
    """A group built with a tensor ``lr`` that a scheduler fills in place: a later schedule edit is taken, not
    refused as an edit of ``lr``."""
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    lr = torch.tensor(1e-2, dtype=torch.float64)
    opt = kronopt.build([{"params": params, "lr": lr, "refresh.every": 10}], "soap")
    grads = _grads(gen, 4)
    _step(opt, params, grads[0])
    lr.fill_(1e-3)
    opt.param_groups[0]["overrides"]["refresh.every"] = 1
    refreshes = opt.state[params[0]]["basis.refreshes"]
    for call in grads[1:]:
        _step(opt, params, call)
    assert opt.state[params[0]]["basis.refreshes"] == refreshes + 3


def test_a_config_name_set_on_the_live_group_is_an_edit_of_its_overrides(gen):
    """``group["compile"] = True`` is a config key as when the group was made: refused, not ignored."""
    opt, params, grads = _built(gen, "soap")
    opt.param_groups[0]["compile"] = True
    with pytest.raises(ConfigError, match=r"overrides'\]\.compile: is fixed"):
        _step(opt, params, grads[0])
    assert opt.param_groups[0]["overrides"]["compile"] is True and "compile" not in opt.param_groups[0]


def test_a_fallback_group_refuses_the_main_pipelines_keys_but_a_schedule_set_in_every_group(gen):
    """A fallback group holds a copy of its user group's overrides: an edit of a main-pipeline key there changed
    nothing (taken silently); it is refused now, while a schedule set in every group, as docs/configs.md's loop
    does, is the main group's and passes."""
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    opt = kronopt.build([w, b], "kl_shampoo")
    grads = [[torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)] for _ in range(3)]
    _step(opt, [w, b], grads[0])
    for g in opt.param_groups:
        g["overrides"]["refresh.every"] = 1
    _step(opt, [w, b], grads[1])
    assert opt._group_cfgs[0].refresh.every == 1
    fallback = opt.param_groups[1]
    assert fallback["pipeline"] == "fallback"
    fallback["overrides"]["state_dtype"] = "float64"
    with pytest.raises(ConfigError, match=r"param_groups\[1\]\['overrides'\]\.state_dtype: sets the main pipeline"):
        _step(opt, [w, b], grads[2])
