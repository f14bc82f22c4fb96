"""``torch.distributed.checkpoint`` of a work-sharded optimizer, resharded (docs/distributed.md, "Checkpoints").

Two ranks train 7 steps, ``dcp.save`` the model and the optimizer (through
``get_model_state_dict`` / ``get_optimizer_state_dict``, sharded and full variants)
and train on; a fresh model and optimizer at three ranks, and one process (no
process group), ``dcp.load`` into their own state dicts, set them and train the
remaining steps. Blocks are float64 with full-rank first factors, as in
``test_sharding.py``, so the uninterrupted single-process run is the reference
to rounding. Parameter 1 gets no gradient on the first two steps: its bucket is
split, and the two parts' call counters differ (5 against 7).
"""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist

from kronopt import distributed
from kronopt.inspection import counters_only, saved_views

from . import _dcp_workers as d

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def saved(where):
    return d.spawn(2, ["save"], where)


@pytest.fixture(scope="module")
def three(saved, where):
    return d.spawn(3, ["resume"], where)


@pytest.fixture(scope="module")
def one(saved, where):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: no process group, loading as one process
        return d.resume(0, 1, where)




_REFERENCE: dict[str, list[torch.Tensor]] = {}


def _uninterrupted(preset):
    if preset not in _REFERENCE:
        _REFERENCE[preset] = d.uninterrupted(preset)
    return _REFERENCE[preset]


def _close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


CASES = [(p, v) for p in d.PRESETS for v in d.VARIANTS]


@pytest.mark.parametrize(("preset", "variant"), CASES)
def test_saved_at_two_ranks_resumed_at_three_and_at_one_like_an_uninterrupted_run(saved, three, one, preset, variant):
    expected = _uninterrupted(preset)
    for rank in saved:
        _close(rank["save"][(preset, variant)]["params"], expected)
    finals = [rank["resume"][(preset, variant)]["params"] for rank in three]
    for final in finals:
        _close(final, expected)
    for a, b in zip(finals[0], finals[2]):
        assert torch.equal(a, b), "the three ranks' parameters differ"
    _close(one[(preset, variant)]["params"], expected)


@pytest.mark.parametrize(("preset", "variant"), CASES)
def test_every_rank_of_any_world_size_rebuilds_every_buckets_call_counter(saved, three, one, preset, variant):
    """Also a rank owning none of a bucket's blocks: it needs the counter to know whether a call gathers."""
    at_save = sorted(saved[0]["save"][(preset, variant)]["calls"])
    assert at_save == sorted(saved[1]["save"][(preset, variant)]["calls"])
    split = [(8, 8, 2, d.SAVE_AT), (8, 8, 1, d.SAVE_AT - 2)]
    assert all(part in at_save for part in split), "the split (8, 8) bucket: parameter 1 missed two calls"
    views = [rank["resume"][(preset, variant)]["buckets"] for rank in three]
    assert [row[:4] for row in views[0]] == [row[:4] for row in views[1]] == [row[:4] for row in views[2]]
    assert sorted(row[:4] for row in views[0]) == at_save
    assert sorted(row[:4] for row in one[(preset, variant)]["buckets"]) == at_save
    for rank in three:  # where a rank holds a bucket's state, its counter agrees with the plan's
        assert all(state is None or state == calls for *_, calls, state in rank["resume"][(preset, variant)]["buckets"])
    assert any(
        state is None for rank in three for *_, state in rank["resume"][(preset, variant)]["buckets"]
    ), "no rank at three owned none of a bucket: the case this test is for did not occur"


def test_each_ranks_optimizer_dict_holds_its_blocks_tensors_and_every_blocks_counters(saved):
    """What DCP saves per rank: the owner's entry with tensors, on the other rank ``{calls, bucket}`` alike."""
    osds = [rank["save"][("soap", "sharded")]["optim"] for rank in saved]
    assert all(set(osd["state"]) == set(d.NAMES) for osd in osds)
    owned = [{k for k, e in osd["state"].items() if not counters_only(e)} for osd in osds]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(d.NAMES)
    for r, osd in enumerate(osds):
        for name, entry in osd["state"].items():
            if name in owned[r]:
                continue
            owner = osds[1 - r]["state"][name]
            assert entry == {"calls": owner["calls"], "bucket": owner["bucket"]}
            # one call per step (SOAP's first observes only); parameter 1 missed two
            assert entry["calls"] == (d.SAVE_AT - 2 if name == d.NAMES[d.ABSENT] else d.SAVE_AT)


def test_saved_views_of_a_ranks_plain_dict_list_its_own_blocks(saved):
    plains = [rank["save"][("soap", "sharded")]["plain"] for rank in saved]
    views = [set(saved_views(plain)) for plain in plains]
    owned = [{d.NAMES[k] for k, e in plain["state"].items() if not counters_only(e)} for plain in plains]
    assert views == owned and not views[0] & views[1]


def test_one_ranks_dcp_dict_alone_is_refused_and_changes_nothing(saved):
    model = d.Net(seed=0)
    opt = d.build(model, "soap")
    before = opt.state_dict()
    with pytest.raises(ValueError, match="holds only counters: another rank owned"):
        opt.load_state_dict(copy.deepcopy(saved[0]["save"][("soap", "sharded")]["optim"]))
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys() and all(e["calls"] == 0 for e in after["state"].values())


def test_the_ranks_plain_dicts_merge_and_resume_in_one_process(saved):
    plains = [rank["save"][("kl_shampoo", "sharded")]["plain"] for rank in saved]
    merged = distributed.merge_state_dicts(plains)
    assert not any(counters_only(e) for e in merged["state"].values())
    assert sorted(merged["state"]) == list(range(len(d.SHAPES)))
    grads = d.gradients()
    model = d.Net(seed=0)  # at the save: SAVE_AT steps of one process (the same parameters as the ranks')
    d.train(model, d.build(model, "kl_shampoo"), grads[: d.SAVE_AT])
    opt = d.build(model, "kl_shampoo")
    opt.load_state_dict(merged)
    d.train(model, opt, grads[d.SAVE_AT :], first=d.SAVE_AT)
    _close([p.detach() for p in model.parameters()], _uninterrupted("kl_shampoo"))


def test_merging_dicts_of_different_steps_is_refused(saved):
    plains = [copy.deepcopy(rank["save"][("soap", "sharded")]["plain"]) for rank in saved]
    name, entry = next((k, e) for k, e in plains[1]["state"].items() if counters_only(e))
    entry["calls"] += 1
    with pytest.raises(ValueError, match=f"counters of parameter {name!r} disagree"):
        distributed.merge_state_dicts(plains)
    del plains[0]["state"][name]  # the owner's entry gone: nobody holds the tensors
    plains[1]["state"][name]["calls"] -= 1
    with pytest.raises(ValueError, match="no rank's dict holds the state"):
        distributed.merge_state_dicts(plains)
