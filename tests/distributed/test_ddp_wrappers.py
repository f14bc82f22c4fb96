"""Everything else under a real ``DistributedDataParallel`` model with work sharding (docs/distributed.md).

Two ranks on gloo (``_ddp_workers.py``), one module-wide spawn. The model: an
embedding and a head (sent to kl_shampoo's AdamW fallback by name), biases (to
the fallback as vectors), three layers in two param groups (another lr and
``refresh.every`` in the first), a frozen layer handed to the optimizer, a layer
used on even steps only (no gradient on odd ones: DDP with
``find_unused_parameters`` leaves it ``None``), a LambdaLR schedule. Each rank
trains on its slice of the batch; the single process trains on the whole batch
with the mean of the slices' mean losses, as DDP averages them.
"""


import pytest
import torch
import torch.distributed as dist

from . import _ddp_workers as d
from . import _workers as w

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return d.spawn(2, ["lm", "lm_nan", "lm_eigh", "add_group", "overflow"], tmp_path_factory.mktemp("ddp"))




def _close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def _equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def _names():
    return [n for n, _ in d.Lm().named_parameters()]


def test_routing_groups_scheduler_and_gradientless_params_under_ddp_equal_one_process(two):
    reference = d.lm_train(0, 2, ddp=False)
    for rank in two:
        sharded, unsharded = rank["lm"][True], rank["lm"][False]
        for k in range(d.STEPS):
            _equal(sharded["params"][k], unsharded["params"][k])
        _close(sharded["params"][-1], reference["params"][-1])
        # the schedule scaled every group: 1 / (1 + 0.5 · 10) of lr 0.004 (group 0's main), the fallback's own lr, 0.1
        assert sharded["lrs"] == pytest.approx([0.004 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6])
        assert sharded["lrs"] == unsharded["lrs"] == reference["lrs"]
    pipelines = two[0]["lm"][True]["pipelines"]
    assert pipelines == [
        ("main", ["layers.0.weight", "layers.1.weight"]),
        ("fallback", ["layers.0.bias", "layers.1.bias"]),
        ("main", ["layers.2.weight", "frozen.weight", "sometimes.weight"]),
        ("fallback", ["embed.weight", "layers.2.bias", "head.weight", "head.bias"]),
    ]
    names = _names()
    frozen, sometimes = names.index("frozen.weight"), names.index("sometimes.weight")
    final, start = two[0]["lm"][True]["params"][-1], d.Lm()
    assert torch.equal(final[frozen], start.frozen.weight), "the frozen layer moved"
    odd = two[0]["lm"][True]["params"]
    assert torch.equal(odd[1][sometimes], odd[0][sometimes]), "an unused layer (no gradient) moved"
    assert not torch.equal(odd[2][sometimes], odd[1][sometimes])
    # every trained parameter's state on exactly one rank; the frozen layer's bucket holds state, with the others of its shape
    owned = [set(rank["lm"][True]["owned"]) for rank in two]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(names)
    assert sum(r["owned"] for r in two[0]["lm"][True]["summary"]) + sum(r["owned"] for r in two[1]["lm"][True]["summary"]) == len(names)


@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_nan_in_one_ranks_batch_is_skipped_on_every_rank(two, scope):
    """DDP's all-reduce spreads rank 1's NaN to every gradient on both ranks: the step is skipped everywhere,
    parameters and state unchanged, counted and warned about (nonfinite = "warn", the default) on every rank."""
    at = d.NAN_AT[0]
    runs = [rank["lm_nan"][(True, scope)] for rank in two]
    unsharded = two[0]["lm_nan"][(False, scope)]
    for run in runs:
        _equal(run["params"][at], run["params"][at - 1])
        assert not all(torch.equal(a, b) for a, b in zip(run["params"][at + 1], run["params"][at]))
        for key, before in run["states"][at - 1].items():
            after = run["states"][at][key]
            changed = [k for k, v in before.items() if k != "nonfinite" and not torch.equal(after[k], v)]
            assert not changed, f"state of parameter {key} changed at the skipped step: {changed}"
        expected_skips = [int(k == at and scope == "step") for k in range(d.STEPS)]
        assert run["skipped"] == expected_skips
        assert run["warnings"] == unsharded["warnings"] and f"at update {at} in: layers.0.weight" in run["warnings"][0]
        _equal(run["params"][-1], unsharded["params"][-1])
    counts = {**runs[0]["nonfinite"], **runs[1]["nonfinite"]}
    assert counts == unsharded["nonfinite"] and set(counts) == set(_names()) - {"frozen.weight"}
    assert set(runs[0]["nonfinite"]).isdisjoint(runs[1]["nonfinite"]), "counted on the owner only"
    assert all(v == 1 for v in counts.values())


def test_an_eigh_failure_on_the_owner_keeps_every_rank_identical(two):
    """Every 8 × 8 eigh of SOAP's first refresh fails (the float64 retry too): the owner keeps the old basis, counts
    the failure, and the ranks stay equal to each other and to the unsharded run, bit for bit."""
    sharded = [rank["lm_eigh"][True] for rank in two]
    unsharded = two[0]["lm_eigh"][False]
    assert unsharded["eigh_raised"] > 0
    for run in sharded:
        for k in range(d.STEPS):
            _equal(run["params"][k], unsharded["params"][k])
    failures = {**sharded[0]["eigh_failures"], **sharded[1]["eigh_failures"]}
    assert failures == unsharded["eigh_failures"]
    assert failures["layers.0.weight"] == failures["layers.2.weight"] == 2, "both 8-sides failed"
    assert failures["embed.weight"] == 1, "(12, 8): the 12 × 12 side was solved"
    owner = next(r for r, run in enumerate(sharded) if "layers.0.weight" in run["eigh_failures"])
    assert sharded[owner]["eigh_raised"] > 0
    assert sharded[0]["eigh_raised"] + sharded[1]["eigh_raised"] == unsharded["eigh_raised"], "solved once, by the owners"


def test_add_param_group_under_sharding(two):
    """Blocks 4 and 5 join after six steps as a group with another lr and refresh period: owners are assigned
    balanced with the blocks already placed; the run equals the unsharded one and one process's."""
    for rank in two:
        _equal(rank["add_group"][True]["params"], rank["add_group"][False]["params"])
    single = d.add_group_run(shard=False)
    _close(two[0]["add_group"][True]["params"], single["params"])
    owned = [rank["add_group"][True]["owned"] for rank in two]
    assert sorted(owned[0] + owned[1]) == list(range(len(w.SHAPES)))
    assert {4, 5} & set(owned[0]) and {4, 5} & set(owned[1]), "the added blocks were not spread over the ranks"
    bytes_ = [rank["add_group"][True]["state_bytes"] for rank in two]
    assert sum(bytes_) == single["state_bytes"]


def test_an_update_that_overflows_on_its_owner_is_skipped_and_warned_about_on_every_rank(two):
    """A finite float32 gradient (× 1e30) whose factors overflow: only the owner sees it (its new state is not
    finite); it marks the gathered direction, every rank skips that block and warns as the unsharded run does."""
    unsharded = two[0]["overflow"][False]
    assert len(unsharded["warnings"]) == 1 and f"at update {d.OVERFLOW_AT} in: param_groups[0].params[1]" in unsharded["warnings"][0]
    for rank in two:
        run = rank["overflow"][True]
        for a, b in zip(run["trace"], unsharded["trace"], strict=True):
            _equal(a, b)
        assert torch.equal(run["trace"][d.OVERFLOW_AT][1], run["trace"][d.OVERFLOW_AT - 1][1])
        assert not torch.equal(run["trace"][d.OVERFLOW_AT][0], run["trace"][d.OVERFLOW_AT - 1][0]), "only that block is skipped"
        assert run["warnings"] == unsharded["warnings"]
        assert run["skipped"] == unsharded["skipped"] == 0
    counts = {**two[0]["overflow"][True]["nonfinite"], **two[1]["overflow"][True]["nonfinite"]}
    assert counts == unsharded["nonfinite"] and counts["param_groups[0].params[1] (8, 8)"] == 1
