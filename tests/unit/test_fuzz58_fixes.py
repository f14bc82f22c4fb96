"""Fixes from fuzz round 58: a due ``max_skipped_steps`` error kept across a resume, a config check for
projector_splitting's restricted side, and a group torch's DCP load left empty named as another routing."""

import copy
import warnings

import pytest
import torch

import kronopt

torch.set_num_threads(1)


def _grad(t: int, nan_at: tuple[int, ...]) -> torch.Tensor:
    G = torch.randn(4, 3, generator=torch.Generator().manual_seed(t))
    if t in nan_at:
        G[0, 0] = float("nan")
    return G


def _step(opt: torch.optim.Optimizer, p: torch.nn.Parameter, t: int, nan_at: tuple[int, ...]) -> str:
    p.grad = _grad(t, nan_at)
    try:
        opt.step()
    except FloatingPointError as exc:
        return str(exc)
    return "stepped"


def _resumed_pair(limit: int, nan_at: tuple[int, ...], saved_after: int):
    """An optimizer run to ``saved_after`` (inclusive) and a fresh one loaded from its state dict then."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = kronopt.build([p], "adamw", max_skipped_steps=limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(saved_after + 1):
            _step(opt, p, t, nan_at)
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    other = kronopt.build([q], "adamw", max_skipped_steps=limit)
    other.load_state_dict(copy.deepcopy(saved))
    return (opt, p), (other, q), saved


def _run_on(pair, steps: range, nan_at: tuple[int, ...]) -> list[str]:
    opt, p = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [_step(opt, p, t, nan_at) for t in steps]


def test_a_due_max_skipped_steps_error_survives_a_resume():
    """The limit check was queued on the optimizer (read at the next step) but not saved: a fresh optimizer loaded
    between the skipped step and the next one stepped where the uninterrupted one raised FloatingPointError."""
    first, second, saved = _resumed_pair(1, (1,), saved_after=1)
    before = second[1].detach().clone()
    a, b = _run_on(first, range(2, 3), (1,)), _run_on(second, range(2, 3), (1,))
    assert a == b and a[0].startswith("1 consecutive steps were skipped")
    assert int(saved["kronopt"]["skipped_steps"]) == 1 and saved["kronopt"]["skipped_steps_due"] is True
    assert torch.equal(second[1], before) and torch.equal(first[1], second[1])
    # and both go on alike after the error (the counter is read once; a finite step resets it)
    assert _run_on(first, range(3, 5), (1,)) == _run_on(second, range(3, 5), (1,)) == ["stepped", "stepped"]
    assert torch.equal(first[1], second[1])


def test_a_counter_below_the_limit_resumes_as_before():
    """Re-arming the check must not raise for a counter under the limit (a load that raised on any saved count)."""
    first, second, saved = _resumed_pair(2, (1,), saved_after=1)
    assert int(saved["kronopt"]["skipped_steps"]) == 1
    assert _run_on(first, range(2, 5), (1,)) == _run_on(second, range(2, 5), (1,)) == ["stepped"] * 3
    assert torch.equal(first[1], second[1])


def test_a_check_already_raised_is_not_raised_again_after_a_resume():
    """A dict saved after the error was raised (the check consumed) must not make the loaded optimizer raise a
    second time where the uninterrupted one steps (re-arming on the counter alone would)."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = kronopt.build([p], "adamw", max_skipped_steps=1)
    assert _run_on((opt, p), range(3), (1,))[2].startswith("1 consecutive")
    saved = copy.deepcopy(opt.state_dict())
    assert saved["kronopt"]["skipped_steps_due"] is False
    q = torch.nn.Parameter(p.detach().clone())
    other = kronopt.build([q], "adamw", max_skipped_steps=1)
    other.load_state_dict(saved)
    assert _run_on((opt, p), range(3, 5), (1,)) == _run_on((other, q), range(3, 5), (1,)) == ["stepped"] * 2
    assert torch.equal(p, q)


def test_a_dict_without_the_due_flag_is_taken_as_due():
    """A dict saved before the flag existed (or edited by hand) keeps the counter's check: at the limit it raises."""
    first, second, saved = _resumed_pair(1, (1,), saved_after=1)
    del saved["kronopt"]["skipped_steps_due"]
    q = torch.nn.Parameter(first[1].detach().clone())
    other = kronopt.build([q], "adamw", max_skipped_steps=1)
    other.load_state_dict(saved)
    assert _run_on((other, q), range(2, 3), (1,))[0].startswith("1 consecutive")


def _pro_dykaf(factors: dict, split: dict | None = None, **top) -> dict:
    raw = kronopt.to_dict(kronopt.PRESETS["pro_dykaf"])
    raw["factors"].update(factors)
    raw["split"].update(split or {})
    raw.update(top)
    return raw


@pytest.mark.parametrize(
    ("factors", "paths"),
    [
        ({"variant": "parallel"}, ["factors.variant"]),
        ({"init": "eps"}, ["factors.init"]),
        ({"init": "sum"}, ["factors.init"]),
        ({"init": "kron_reference"}, ["factors.init"]),
        ({"variant": "parallel", "init": "eps"}, ["factors.variant", "factors.init"]),
    ],
)
def test_projector_splitting_options_a_restricted_side_refuses_fail_in_the_config(factors, paths):
    """from_dict accepted pro_dykaf with variant 'parallel' or an init other than 'kron', which projector_splitting
    refuses at construction on every matrix parameter (its restricted side): now a ConfigError naming each path and
    what works, with every problem listed (both options at once, beside an unrelated error)."""
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_dict(_pro_dykaf(factors))
    found = [path for path, _ in info.value.errors]
    assert found == paths
    assert all("keeps a restricted side" in m and "split.rank = 1.0" in m for _, m in info.value.errors)
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_dict(_pro_dykaf(factors, lr=-1.0))
    assert sorted(path for path, _ in info.value.errors) == sorted(["lr", *paths])


@pytest.mark.parametrize(
    "split",
    [
        {"rank": 1.0, "max_rank": 0},  # the whole side, uncapped: never restricted
        {"rank": 64, "max_rank": 0},  # no side rotated beyond max_dim = 64 is longer than the rank
        {"type": "full"},
    ],
)
def test_a_split_that_never_restricts_keeps_projector_splitting_options_accepted(split):
    """The check must not refuse where no side is ever restricted (a check on the split's capability alone would):
    such configs build and step on a matrix."""
    raw = _pro_dykaf({"variant": "parallel", "init": "eps"}, split, shapes={"max_dim": 64, "merge_dims": False, "precondition_1d": False})
    if split.get("type") == "full":
        raw["split"] = {"type": "full"}
    cfg = kronopt.from_dict(raw)
    p = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    opt = kronopt.KronOptimizer([p], cfg)
    before = p.detach().clone()
    for t in range(3):
        p.grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(t + 1))
        opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p, before)


def test_the_default_pro_dykaf_is_still_accepted_and_steps():
    """variant 'ksl' and init 'kron' keep a restricted side: the preset must stay accepted."""
    cfg = kronopt.from_dict(_pro_dykaf({}))
    p = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    opt = kronopt.KronOptimizer([p], cfg)
    for t in range(2):
        p.grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(t + 1))
        opt.step()
    assert torch.isfinite(p).all()


def _routed_muon():
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(5, 4), "proj": torch.nn.Linear(4, 4)})
    opt = kronopt.build(model.named_parameters(), "muon")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return model, opt


def test_a_group_torch_left_empty_is_refused_as_another_routing_not_as_a_foreign_optimizer():
    """torch's ``set_optimizer_state_dict`` hands a fresh group whose parameters the saved groups hold apart (a DCP
    checkpoint saved under other name patterns) as ``{"params": [...]}`` alone. The load named that "not a kronopt
    optimizer's state dict", sending the user after the wrong cause; it now says different routing and the remedy
    (``route.fallback_names``). A dict whose groups all lack a pipeline (torch.optim's) keeps its own message."""
    _, opt = _routed_muon()
    sd = opt.state_dict()
    sd["param_groups"][0] = {"params": sd["param_groups"][0]["params"]}
    with pytest.raises(ValueError, match=r"different routing.*route\.fallback_names"):
        opt.load_state_dict(sd)
    foreign = opt.state_dict()
    foreign["param_groups"] = [{k: v for k, v in g.items() if k != "pipeline"} for g in foreign["param_groups"]]
    with pytest.raises(ValueError, match="not a kronopt optimizer's state dict"):
        opt.load_state_dict(foreign)


def test_the_non_finite_warning_names_the_callers_line_and_keeps_no_registry_entry_per_step():
    """Under ``nonfinite = "warn"`` each skipped step warns, naming its update, so every message differs: warned
    with ``warnings.warn``, Python's default action kept each in ``kronopt.optimizer``'s registry for the life of
    the process (a kilobyte a skipped step: 1,000 entries after 2,000 steps), and the fixed ``stacklevel`` named a
    line of kronopt's, which a user's ``-W ignore::RuntimeWarning:mytrain`` could not pick. Now each step's warning
    is still shown under the default action, at the line that called ``step()``, and no registry grows."""
    import kronopt.optimizer as kopt

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = kronopt.build([p], "soap", nonfinite="warn")
    registry = kopt.__dict__.setdefault("__warningregistry__", {})
    ours = globals().setdefault("__warningregistry__", {})
    before = (len(registry), len(ours))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for t in range(12):
            p.grad = _grad(t, nan_at=tuple(range(1, 12, 2)))
            opt.step()  # the line every report names
        opt.flush_warnings()
    caught = [r for r in record if "non-finite gradient" in str(r.message)]
    assert len(caught) == 6
    assert {r.filename for r in caught} == {__file__}
    assert (len(registry), len(ours)) == before


# -- the fifty-ninth session: every restricted-side check asks whether the split restricts a side ---------------


@pytest.mark.parametrize("preset", ["dykaf_rank1", "muon"])
def test_a_split_that_never_restricts_asks_nothing_of_the_other_stages(preset):
    """``lowrank_flat`` with ``rank = 1.0`` and ``max_rank = 0`` keeps every side full, on every shape: a stage that
    keeps no restricted side (adam_rank1's second moment, muon's orthogonalize) is accepted with it, and steps as
    with the ``full`` split, bit for bit. A rank that does restrict is still refused, naming the stage. Would catch:
    the checks judging the split's static capability (they refused the first config before)."""
    never = {"split.type": "lowrank_flat", "split.rank": 1.0, "split.max_rank": 0}
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=gen)
    grads = [torch.randn(6, 8, generator=gen) for _ in range(5)]
    moved = []
    for overrides in ({}, never):
        p = torch.nn.Parameter(W.clone())
        opt = kronopt.build([p], preset, **overrides)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        moved.append(p.detach().clone())
    assert torch.equal(moved[0], moved[1]) and not torch.equal(moved[0], W)
    with pytest.raises(kronopt.ConfigError, match="keeps a restricted side"):
        kronopt.resolve(preset, **{**never, "split.rank": 0.5})


def test_a_checkpoint_naming_a_stage_no_installed_plugin_registers_says_how_to_get_it():
    """A checkpoint saved with a plugin's stage, loaded where the plugin is missing: the error names the stage,
    the available ones and the entry-point group the plugin's package registers it under (before: only that the
    stage was unknown). Would catch: the hint lost, or naming another slot's group."""
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = kronopt.build([p], "soap")
    for _ in range(2):
        p.grad = torch.randn(4, 6)
        opt.step()
    saved = opt.state_dict()
    saved["kronopt"]["config"]["inner"] = {"type": "someones_rule", "alpha": 2}
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_state_dict([torch.nn.Parameter(torch.randn(4, 6))], saved)
    message = dict(info.value.errors)["inner.type"]
    assert "unknown inner stage 'someones_rule'" in message and "group 'kronopt.inner_rules'" in message
