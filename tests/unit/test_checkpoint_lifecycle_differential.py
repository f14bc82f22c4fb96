"""Checkpoints over time and across setups: a state dict saved at any point of the first refresh cycle, through
``torch.save``/``torch.load(weights_only=True)``, resumes bit for bit; a saved dict stays apart from the live state;
checkpoints of an older kronopt (its routing patterns, kl_shampoo's momentum before ``momentum_basis = "eigen"``)
resume exactly or are refused by name; a float32 checkpoint loaded into a model cast to float64 steps in float64, as
torch.optim.AdamW's would.

The old-format dicts are built with today's code under the old settings (the state dict layout is version 2 since
659be60; what differs is the config the state was made under), checked by hand against copies of kronopt at
20c11b5, 58acf3f, 05a7fac, 098329e, 6304533 and 384dda7 (docs: none of them is needed here).
"""

import copy
import io
import warnings

import pytest
import torch

import kronopt

PRESETS = list(kronopt.PRESETS)

#: the routed presets' fallback name pattern before 3eed1dc (kronopt.presets.AUX_NAMES then)
OLD_AUX_NAMES = [r"(^|\.)(embed\w*|wte|wpe|tok_embeddings|lm_head|head|output)(\.|$)"]

SPEC = [
    ("embed.weight", (10, 4)),
    ("l0.weight", (6, 4)),
    ("l0.bias", (6,)),
    ("l1.weight", (6, 4)),
    ("l2.weight", (4, 6)),
    ("conv.weight", (3, 2, 2, 2)),
    ("head.weight", (3, 4)),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the route sends embeddings")
        yield


def _named(spec=SPEC, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))) for n, s in spec]


def _feed(opt, named, steps, *, absent=()):
    """One generator per step (``t`` in ``steps``), so a resumed run gets the same gradients; the parameters named
    in ``absent`` get none on steps 0 and 1 (a split bucket)."""
    for t in steps:
        gen = torch.Generator().manual_seed(1000 + t)
        for n, p in named:
            g = torch.randn(p.shape, generator=gen)
            p.grad = None if (n in absent and t < 2) else g.to(p.dtype)
        opt.step()


def _copy(named, values=None):
    values = values or [p.detach() for _, p in named]
    return [(n, torch.nn.Parameter(v.clone())) for (n, _), v in zip(named, values)]


def _through_file(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _tensors(sd):
    return {(i, k): v for i, e in sd["state"].items() for k, v in e.items() if isinstance(v, torch.Tensor)}


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key, v in ta.items():
        assert v.dtype == tb[key].dtype and torch.equal(v, tb[key]), key


# -- resume exactness at every point of the first refresh cycle ---------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_a_resume_at_each_call_of_the_first_refresh_cycle_is_bit_for_bit(preset):
    """Saved after 0 calls (state as built), 1 (SOAP's observe-only first call), 2 (the call before a refresh with
    ``every = 2``: a split bucket, ``l0.bias`` and ``l1.weight`` without gradients so far) and 3 (just after it),
    written to a file and read with ``weights_only=True``, then loaded into a fresh optimizer (even k) or rebuilt
    by ``from_state_dict`` (odd k): the next five steps equal the uninterrupted run's bit for bit. The suite's
    other resume test saves at one point (after 5 steps) of six presets."""
    over = {"refresh.every": 2}
    absent = ("l0.bias", "l1.weight")
    for k in range(4):
        named = _named()
        opt = kronopt.build(named, preset, **over)
        _feed(opt, named, range(k), absent=absent)
        saved = _through_file(opt.state_dict())
        again = _copy(named)
        _feed(opt, named, range(k, k + 5))
        if k % 2 == 0:
            resumed = kronopt.build(again, preset, **over)
            resumed.load_state_dict(saved)
        else:
            resumed = kronopt.from_state_dict(again, saved)
        _feed(resumed, again, range(k, k + 5))
        for (n, p), (_, q) in zip(named, again):
            assert torch.equal(p, q), f"saved after {k} calls: {n}"


# -- a saved dict and the live state stay apart ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "over"),
    [
        ("soap", {}),
        ("kl_shampoo", {}),
        ("pro_kl_shampoo", {}),
        ("muon", {}),
        ("dykaf_rank1", {}),
        ("shampoo", {"storage.moments": "bfloat16", "storage.factors": "bfloat16"}),
    ],
)
def test_a_saved_state_dict_and_the_live_state_never_share_memory(preset, over):
    """``state[p]`` holds views of the bucket stacks, written in place each step: the dict ``state_dict()`` returned
    must not move with them (steps after the save), a dict loaded into another optimizer must not be written by
    that optimizer's steps, and writing into the loaded dict afterwards must not change the optimizer. Each checked
    against a deep copy taken at the time."""
    over = {"refresh.every": 2, **over}
    named = _named()
    opt = kronopt.build(named, preset, **over)
    _feed(opt, named, range(3), absent=("l1.weight",))
    sd = opt.state_dict()
    kept = copy.deepcopy(sd)
    _feed(opt, named, range(3, 6))
    _assert_same_tensors(sd, kept)

    other = _copy(named)
    loaded = kronopt.build(other, preset, **over)
    loaded.load_state_dict(sd)
    _feed(loaded, other, range(6, 9))
    _assert_same_tensors(sd, kept)

    live = loaded.state_dict()
    kept_live = copy.deepcopy(live)
    for value in _tensors(sd).values():
        if value.is_floating_point():
            value.add_(1.0)
    _assert_same_tensors(loaded.state_dict(), kept_live)

    for state in loaded.state.values():  # the live views written by hand: the dict saved before keeps its values
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.mul_(0.5)
    _assert_same_tensors(live, kept_live)
    assert any(not torch.equal(v, kept_live["state"][i][k]) for (i, k), v in _tensors(loaded.state_dict()).items()
               if v.is_floating_point()), "the views written by hand are what the next state_dict() saves"


# -- torch.load(weights_only=True) across setups ------------------------------------------------------------------


def _built(preset, setup, named):
    over = {"refresh.every": 2}
    if setup == "bf16_stagger":
        over |= {"storage.moments": "bfloat16", "storage.factors": "bfloat16", "storage.basis": "bfloat16",
                 "refresh.stagger": True}
    if setup == "tensor_lr_named_group":
        return kronopt.build([{"params": named, "lr": torch.tensor(3e-3), "name": "all"}], preset, **over)
    if setup == "add_param_group":
        opt = kronopt.build(named[:4], preset, **over)
        opt.add_param_group({"params": [p for _, p in named[4:]], "param_names": [n for n, _ in named[4:]], "lr": 1e-3})
        return opt
    return kronopt.build(named, preset, **over)


@pytest.mark.parametrize("setup", ["bf16_stagger", "tensor_lr_named_group", "add_param_group", "skipped_step", "after_a_load"])
@pytest.mark.parametrize("preset", ["soap", "muon", "pro_kl_shampoo", "dykaf"])
def test_every_setups_checkpoint_loads_with_torch_defaults_weights_only(preset, setup):
    """``torch.load``'s default ``weights_only=True`` reads the optimizer's and its scheduler's state dicts back
    without allow-listing anything (bfloat16 storage, a tensor lr and a group name, groups added later, a skipped
    step's counter, a dict saved after a load), equal to what was saved; an optimizer built the same way (and
    ``from_state_dict``, where one user group made it) resumes from it bit for bit."""
    named = _named()
    opt = _built(preset, setup, named)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20, cycle_momentum=False)
    _feed(opt, named, range(3))
    sched.step()
    if setup == "skipped_step":
        for _, p in named:
            p.grad = torch.full_like(p, float("nan"))
        with pytest.warns(RuntimeWarning, match="the whole step was skipped"):
            opt.step()
            opt.flush_warnings()
    if setup == "after_a_load":
        opt.load_state_dict(opt.state_dict())
        _feed(opt, named, range(3, 4))
    sd = opt.state_dict()
    back = _through_file({"optimizer": sd, "scheduler": sched.state_dict()})
    _assert_same_tensors(back["optimizer"], sd)
    assert back["optimizer"]["kronopt"]["config"] == sd["kronopt"]["config"]
    assert back["scheduler"] == sched.state_dict()
    if setup == "skipped_step":
        assert int(back["optimizer"]["kronopt"]["skipped_steps"]) == 1

    again, twin = _copy(named), _copy(named)
    resumed = _built(preset, setup, again)
    resumed.load_state_dict(back["optimizer"])
    rebuilt = None if setup in ("add_param_group", "tensor_lr_named_group") else kronopt.from_state_dict(twin, back["optimizer"])
    _feed(opt, named, range(10, 12))
    _feed(resumed, again, range(10, 12))
    if rebuilt is not None:
        _feed(rebuilt, twin, range(10, 12))
    for i, (n, p) in enumerate(named):
        assert torch.equal(p, again[i][1]), n
        assert rebuilt is None or torch.equal(p, twin[i][1]), n


# -- across dtypes --------------------------------------------------------------------------------------------------


def test_a_float32_checkpoint_loaded_after_model_double_steps_adamw_in_float64():
    """torch.optim casts a loaded state to its parameter's dtype. A float32 AdamW checkpoint, loaded into an
    optimizer whose model was cast with ``.double()`` after it was built, keeps float64 state, and its next step
    equals AdamW's update computed by hand in float64 from the saved moments (a float32 state would be off by
    about 1e-7 of the update)."""
    named = _named(spec=[("w", (6, 4)), ("b", (6,))])
    opt = kronopt.build(named, "adamw")
    _feed(opt, named, range(3))
    sd = _through_file(opt.state_dict())

    model = torch.nn.Module()
    model.w, model.b = (torch.nn.Parameter(p.detach().clone()) for _, p in named)
    resumed = kronopt.build(model.named_parameters(), "adamw")
    model.double()
    resumed.load_state_dict(sd)
    assert all(v.dtype == torch.float64 for s in resumed.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())

    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    resumed.step()

    b1, b2, lr, wd, eps, t = 0.9, 0.999, 1e-3, 1e-2, 1e-8, 4
    for i, (p, w0, g) in enumerate(zip(model.parameters(), before, grads)):
        m = b1 * sd["state"][i]["inner.exp_avg"].double().reshape(g.shape) + (1 - b1) * g
        v = b2 * sd["state"][i]["inner.exp_avg_sq"].double().reshape(g.shape) + (1 - b2) * g * g
        update = lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
        expected = w0 * (1 - lr * wd) - update
        torch.testing.assert_close(p.detach() - w0, expected - w0, rtol=1e-10, atol=1e-15)


# -- learning rates at a resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["soap", "muon", "kl_shampoo", "shampoo"])
def test_a_resume_into_an_optimizer_built_with_other_rates_goes_on_with_the_saved_ones(preset):
    """As torch.optim restores a group's hyperparameters, the saved ``lr`` and ``weight_decay`` (the fallback
    group's too) win over the build's, with the "different config" warning: the run equals the uninterrupted one."""
    saved_over = {"lr": 0.02, "weight_decay": 0.05, "refresh.every": 2}
    named = _named()
    opt = kronopt.build(named, preset, **saved_over)
    _feed(opt, named, range(3))
    sd = copy.deepcopy(opt.state_dict())
    again = _copy(named)
    _feed(opt, named, range(3, 8))
    resumed = kronopt.build(again, preset, **{**saved_over, "lr": 0.5, "weight_decay": 0.0})
    with pytest.warns(UserWarning, match="different config"):
        resumed.load_state_dict(sd)
    assert [(g["lr"], g["weight_decay"]) for g in resumed.param_groups] == [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    _feed(resumed, again, range(3, 8))
    for (n, p), (_, q) in zip(named, again):
        assert torch.equal(p, q), n


# -- checkpoints of an older kronopt --------------------------------------------------------------------------------


def test_a_kl_shampoo_checkpoint_from_before_the_eigenbasis_momentum_is_refused_by_name_and_rebuilt_exactly():
    """kl_shampoo kept its momentum whole (``inner.momentum_buffer``) until 2db104e; today it keeps it in the
    eigenbasis (``inner.momentum_eigen``). Such a checkpoint (made here with ``momentum_basis = "original"``, the
    keys kronopt at 6304533 and 384dda7 saves) warns that the config differs, naming ``from_state_dict``, and is
    refused with the parameter and both keys named, changing nothing; ``from_state_dict`` resumes it bit for bit."""
    old = {"inner.momentum_basis": "original", "refresh.every": 2}
    named = _named()
    opt = kronopt.build(named, "kl_shampoo", **old)
    _feed(opt, named, range(3))
    sd = _through_file(opt.state_dict())
    again = _copy(named)
    _feed(opt, named, range(3, 8))

    now = kronopt.build(_copy(again), "kl_shampoo", **{"refresh.every": 2})
    before = copy.deepcopy(now.state_dict())
    with pytest.warns(UserWarning, match="from_state_dict"), pytest.raises(
        ValueError, match=r"does not fit this pipeline.*inner\.momentum_eigen.*inner\.momentum_buffer"
    ):
        now.load_state_dict(sd)
    _assert_same_tensors(now.state_dict(), before)

    resumed = kronopt.from_state_dict(again, sd)
    assert resumed.config.inner.momentum_basis == "original"
    _feed(resumed, again, range(3, 8))
    for (n, p), (_, q) in zip(named, again):
        assert torch.equal(p, q), n


BERT_LIKE = [("transformer.word_embeddings.weight", (4, 4)), ("layer.attention.output.dense.weight", (4, 4)),
             ("layer.mlp.weight", (6, 4))]


def _old_routing_checkpoint(preset):
    """A checkpoint of ``preset`` as kronopt before 3eed1dc routed it: its name patterns sent BLOOM's
    ``word_embeddings`` to the matrix pipeline and BERT's ``attention.output.dense`` to the fallback (kronopt at
    20c11b5 and 58acf3f saves exactly these groups for these names)."""
    named = _named(spec=BERT_LIKE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronopt.build(named, preset, **{"route.fallback_names": OLD_AUX_NAMES})
    _feed(opt, named, range(3))
    return named, opt


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_from_state_dict_resumes_a_checkpoint_routed_by_the_old_name_patterns_bit_for_bit(preset):
    """docs/architecture.md: "``from_state_dict`` rebuilds it with the saved patterns"."""
    named, opt = _old_routing_checkpoint(preset)
    assert [g["param_names"] for g in opt.param_groups] == [
        ["transformer.word_embeddings.weight", "layer.mlp.weight"], ["layer.attention.output.dense.weight"]
    ]
    sd = _through_file(opt.state_dict())
    again = _copy(named)
    _feed(opt, named, range(3, 8))
    resumed = kronopt.from_state_dict(again, sd)
    assert [g["param_names"] for g in resumed.param_groups] == [g["param_names"] for g in opt.param_groups]
    _feed(resumed, again, range(3, 8))
    for (n, p), (_, q) in zip(named, again):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_a_checkpoint_routed_by_the_old_name_patterns_is_refused_as_different_routing(preset):
    """docs/architecture.md, Persistence: a checkpoint "of a model whose names the old patterns routed otherwise
    (BERT's ``attention.output.dense``, BLOOM's ``word_embeddings``) is refused as "different routing" by a preset
    built now". The groups have the same sizes and the swapped matrices the same shape, so only the groups'
    ``param_names`` (saved in the dict) tell the routing apart. The load must refuse and change nothing."""
    named, opt = _old_routing_checkpoint(preset)
    sd = _through_file(opt.state_dict())
    now = kronopt.build(_copy(named), preset)
    assert [g["param_names"] for g in now.param_groups] == [
        ["layer.attention.output.dense.weight", "layer.mlp.weight"], ["transformer.word_embeddings.weight"]
    ]
    before = copy.deepcopy(now.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="different routing"):
            now.load_state_dict(sd)
    _assert_same_tensors(now.state_dict(), before)


@pytest.mark.parametrize("source", ["dcp", "torch_adamw"])
def test_from_state_dict_of_a_dict_without_a_kronopt_config_raises_a_clear_value_error(source):
    """``load_state_dict`` refuses another optimizer's dict with a ``ValueError`` that says so
    (test_optimizer_api_edges); ``from_state_dict``, which needs the config that travels in the ``kronopt`` section,
    must refuse a dict without one as clearly (a ``ValueError`` naming the missing kronopt config), not with a
    ``KeyError`` from inside the function."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Linear(4, 6)
    if source == "dcp":
        opt = kronopt.build(model.named_parameters(), "soap")
        _feed(opt, list(model.named_parameters()), range(2))
        sd = get_optimizer_state_dict(model, opt)
        assert "kronopt" not in sd
    else:
        sd = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="kronopt"):
        kronopt.from_state_dict(model.named_parameters(), sd)
