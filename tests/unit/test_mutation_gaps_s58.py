"""Bookkeeping that survived mutation testing (session 58): non-finite counts across a reload and a join,
a skipped first call, the load's routing checks and messages, the saved refresh phases, the route's name
search, TOML infinities and merge_state_dicts' counter check. Each test names the mutant it kills."""

import math
import pickle
import tomllib
import warnings

import pytest
import torch

import kronopt
from kronopt import config, distributed
from kronopt.config import Route

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings("ignore:non-finite gradient:RuntimeWarning")


def _nan(*shape):
    return torch.full(shape, float("nan"))


def _counters(opt, p):
    """A block's host counters (calls, step, refreshes, ready): every non-tensor entry of its state."""
    return {k: v for k, v in opt.state[p].items() if not isinstance(v, torch.Tensor)}


# -- non-finite counts ----------------------------------------------------------------


def test_nonfinite_counts_survive_a_save_and_load():
    """The load rebuilt each bucket's ``nonfinite`` stack from zeros instead of the saved entries' counts
    (mutant o21, in ``_restack``): two non-finite gradients fed, two counted, so two after the reload."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 6, generator=gen))
    opt = kronopt.build([("w", p)], "soap")
    for bad in (True, False, True):
        p.grad = _nan(6, 6) if bad else torch.randn(6, 6, generator=gen)
        opt.step()
    assert opt.nonfinite_counts() == {"w": 2}
    sd = opt.state_dict()
    assert kronopt.from_state_dict([("w", p)], sd).nonfinite_counts() == {"w": 2}
    again = kronopt.build([("w", p)], "soap")
    again.load_state_dict(sd)
    assert again.nonfinite_counts() == {"w": 2}


def test_a_split_bucket_joined_again_keeps_each_blocks_nonfinite_count():
    """Joining the parts of a split bucket concatenated their ``nonfinite`` stacks in another order than their
    blocks (mutant o35, in ``_joined``: ``reversed(parts)``), moving one block's count to the other. Only ``a``
    was ever fed a non-finite gradient, once."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 6, generator=gen))
    b = torch.nn.Parameter(torch.randn(6, 6, generator=gen))
    opt = kronopt.build([("a", a), ("b", b)], "soap")

    def step(ga, gb):
        a.grad, b.grad = ga, gb
        opt.step()

    step(torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen))
    step(_nan(6, 6), None)  # a skipped (non-finite), b absent: the bucket splits
    assert len(opt._buckets) == 2
    step(None, torch.randn(6, 6, generator=gen))  # b catches up
    step(torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen))  # counters agree: the parts join
    assert len(opt._buckets) == 1  # the join this test is about happened
    assert opt.nonfinite_counts() == {"a": 1, "b": 0}


def test_an_all_nonfinite_first_call_counts_nothing_and_changes_no_trajectory():
    """A first call whose every gradient is non-finite is skipped and not counted; ``with_scalars_of`` with
    ``!=`` for ``==`` (mutant c07) kept the skipped call's counters (calls 1, a ready basis, one refresh).
    Independent check: three finite steps after the skipped one move the parameter bit for bit as three
    finite steps of a fresh optimizer do."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(6, 6, generator=gen)
    grads = [torch.randn(6, 6, generator=gen) for _ in range(3)]
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    skipped, fresh = kronopt.build([("w", p)], "soap"), kronopt.build([("w", q)], "soap")
    p.grad = _nan(6, 6)
    skipped.step()
    assert torch.equal(p.detach(), start)
    assert _counters(skipped, p) == {"basis.refreshes": 0, "basis.ready": False, "calls": 0, "step": 0}
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        skipped.step()
        fresh.step()
    assert _counters(skipped, p) == _counters(fresh, q)
    assert torch.equal(p.detach(), q.detach())


def test_a_part_before_its_counted_first_call_is_not_joined():
    """Parts whose first call is not counted yet (every gradient so far non-finite) must stay apart: joined, a
    part shares the counted-or-not verdict of the other part's gradients. With the ``not b.state.calls`` guard
    dropped (mutant o31) ``b``, never fed a finite gradient, counted a call and readied its basis from ``a``'s."""
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(6, 6, generator=gen))
    b = torch.nn.Parameter(torch.randn(6, 6, generator=gen))
    opt = kronopt.build([("a", a), ("b", b)], "soap", nonfinite_scope="block")

    def step(ga, gb):
        a.grad, b.grad = ga, gb
        opt.step()

    step(_nan(6, 6), None)  # the bucket splits, neither part counted
    step(_nan(6, 6), _nan(6, 6))  # both parts still at calls 0
    assert len(opt._buckets) == 2
    step(torch.randn(6, 6, generator=gen), _nan(6, 6))
    assert _counters(opt, b) == {"basis.refreshes": 0, "basis.ready": False, "calls": 0, "step": 0}
    assert _counters(opt, a)["calls"] == 1
    assert opt.nonfinite_counts() == {"a": 2, "b": 2}


def test_editing_the_saved_dicts_skipped_steps_leaves_the_optimizer_alone():
    """``state_dict()`` put the live ``skipped_steps`` tensor in the dict instead of a copy (mutant o05):
    an in-place edit of the returned dict changed ``opt.skipped_steps()``. One step was skipped."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = kronopt.build([p], "adamw", nonfinite_scope="step")
    p.grad = _nan(4, 4)
    opt.step()
    sd = opt.state_dict()
    sd["kronopt"]["skipped_steps"].add_(10)
    assert opt.skipped_steps() == 1


# -- the load's routing checks ----------------------------------------------------------


def test_a_renamed_models_dict_loads_by_position_as_torch_optim_does():
    """Names that all differ (a model wrapped as ``model.``) are matched by position, as torch.optim does;
    with ``and`` for ``or`` in ``_check_routing``'s guard (mutant o23) the load looked the new names up in the
    saved ones and raised KeyError. Each parameter then holds the state saved for the one at its place."""
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    opt = kronopt.build([("enc.w", a), ("dec.w", b)], "adamw")
    a.grad, b.grad = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen)
    opt.step()
    sd = opt.state_dict()
    new = kronopt.build([("model.enc.w", a), ("model.dec.w", b)], "adamw")
    new.load_state_dict(sd)
    for p in (a, b):
        saved = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert saved
        for k, v in saved.items():
            assert torch.equal(new.state[p][k], v), k


def test_a_dict_with_more_param_groups_is_refused_as_another_model():
    """A dict of two param groups loaded into an optimizer of one: refused as a different model or routing;
    with ``and`` for ``or`` in the group count check (mutant o20) the count went unchecked and the error blamed
    the pipelines instead."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    sd = kronopt.build([{"params": [a]}, {"params": [b]}], "adamw").state_dict()
    with pytest.raises(ValueError, match=r"saved param groups do not match this optimizer's \(different model or routing\)"):
        kronopt.build([{"params": [a]}], "adamw").load_state_dict(sd)


def test_the_same_names_in_swapped_groups_are_refused_naming_each_moved_parameter():
    """The same parameter names put in other groups: the error names each moved one with its saved and its new
    group. Mutant o24 found no moved name and reported the order within a group instead."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    sd = kronopt.build([{"params": [("x", a)]}, {"params": [("y", b)]}], "adamw").state_dict()
    other = kronopt.build([{"params": [("y", b)]}, {"params": [("x", a)]}], "adamw")
    with pytest.raises(ValueError, match=r"grouped these parameters otherwise: y \(saved in group 1 'main', here in group 0 'main'\), "
                                         r"x \(saved in group 0 'main', here in group 1 'main'\)"):
        other.load_state_dict(sd)


def test_a_prefixed_embedding_goes_to_the_fallback_by_name_search():
    """``fallback_names`` are searched in a name (the docstring of ``Route``); ``re.match`` (mutant g04) anchors
    them at the start, so ``model.embed_tokens.weight`` stayed with Muon in the muon preset."""
    assert Route(fallback_names=("embed",)).named_to_fallback("model.embed_tokens.weight")
    ps = [("model.layers.0.weight", torch.nn.Parameter(torch.randn(8, 8))),
          ("model.embed_tokens.weight", torch.nn.Parameter(torch.randn(16, 8)))]
    opt = kronopt.build(ps, "muon")
    where = {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]}
    assert where == {"model.layers.0.weight": "main", "model.embed_tokens.weight": "fallback"}


# -- refresh phases across a reload --------------------------------------------------------


def _staggered(ps):
    return kronopt.build([{"params": ps[:1]}, {"params": ps[1:]}], "soap", **{"refresh.every": 4, "refresh.stagger": True})


def _phases(opt):
    """(group, phase) of each bucket, sorted."""
    return sorted((b.group, b.layout.phase) for b in opt._buckets)


def _per_group_run():
    """An optimizer whose staggered refresh phases are balanced per group (an older run's): group 0's one
    block at phase 0, group 1's two at phases 0 and 1 (balanced across groups they would be 0, 1, 2)."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 8, generator=gen)) for _ in range(3)]
    opt = _staggered(ps)
    sd = opt.state_dict()
    sd["kronopt"]["phases"] = "per_group"
    opt.load_state_dict(sd)
    assert _phases(opt) == [(0, 0), (1, 0), (1, 1)]
    return ps, opt


def test_a_dict_without_the_phases_record_rebuilds_per_group_phases():
    """A dict written before ``kronopt["phases"]`` existed comes from a run that balanced phases per group; the
    load defaulting the missing record to ``"across_groups"`` (mutant o42) rebuilt phases 1 and 2 for group 1."""
    ps, opt = _per_group_run()
    sd = opt.state_dict()
    del sd["kronopt"]["phases"]
    new = _staggered(ps)
    new.load_state_dict(sd)
    assert _phases(new) == [(0, 0), (1, 0), (1, 1)]


def test_an_optimizer_unpickled_without_phases_across_records_per_group():
    """An optimizer pickled before ``_phases_across`` existed balanced its phases per group; ``state_dict()``
    defaulting the missing attribute to True (mutant o12) recorded ``"across_groups"``, and a reload rebuilt
    other phases than the live ones."""
    ps, opt = _per_group_run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = pickle.loads(pickle.dumps(opt))
    del old.__dict__["_phases_across"]
    sd = old.state_dict()
    assert sd["kronopt"]["phases"] == "per_group"
    new = _staggered(old.param_groups[0]["params"] + old.param_groups[1]["params"])
    new.load_state_dict(sd)
    assert _phases(new) == _phases(old) == [(0, 0), (1, 0), (1, 1)]


# -- TOML infinities ---------------------------------------------------------------------


def test_dumps_writes_both_infinities_of_a_plain_dict_as_toml_reads_them():
    """``dumps`` also takes a plain config dict; it wrote -inf as ``inf`` (mutant g02). No KronConfig field
    accepts an infinity (``loads`` refuses them), so the standard library's TOML reader is the reference."""
    data = {"x": float("-inf"), "y": float("inf"), "t": {"z": [float("-inf"), 1.5]}}
    back = tomllib.loads(config.dumps(data))
    assert back["x"] == -math.inf and back["y"] == math.inf
    assert back["t"]["z"] == [-math.inf, 1.5]


# -- merge_state_dicts ---------------------------------------------------------------------


def _rank_dict(rank, calls_of_others):
    """Rank ``rank`` of a two-rank work-sharded save of params 0 and 1 (rank r owns param r): its own entry
    holds a tensor, the other's only counters, here ``calls_of_others``."""
    state = {}
    for i in (0, 1):
        if i == rank:
            state[i] = {"calls": 3, "step": 3, "bucket": 0, "x": torch.zeros(1)}
        else:
            state[i] = {"calls": calls_of_others, "step": calls_of_others, "bucket": 0}
    info = {"rank": rank, "world_size": 2, "buckets": [[0, 1]], "calls": [3]}
    return {"state": state, "param_groups": [{"params": [0, 1]}], "kronopt": {distributed.SHARDING_KEY: info}}


def test_merge_state_dicts_refuses_ranks_whose_counters_disagree():
    """Rank dicts saved at different steps (a rank's counters of a block it does not own differ from the
    owner's): refused, as the docstring promises; mutant d04 merged them silently. Agreeing counters merge."""
    merged = distributed.merge_state_dicts([_rank_dict(0, 3), _rank_dict(1, 3)])
    assert sorted(merged["state"]) == [0, 1] and all("x" in e for e in merged["state"].values())
    with pytest.raises(ValueError, match=r"counters of parameter 1 disagree: the dicts were saved at different steps"):
        distributed.merge_state_dicts([_rank_dict(0, 2), _rank_dict(1, 3)])
