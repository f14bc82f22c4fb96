"""DDP work sharding (docs/distributed.md): owners by cost, one all-gather per bucket, state on the owner.

The ranks run in spawned processes on gloo (``_workers.py``), two modules-wide runs
(2 and 3 ranks) whose results every test reads. Gradients are the same on every
rank, as DDP's all-reduce leaves them, except in the DDP test, which wraps a real
model. Blocks are float64 with full-rank first factors, so a single-process run
is a well-posed reference (a rank-deficient first factor would leave the basis of
its null space arbitrary).
"""


import pytest
import torch
import torch.distributed as dist

import kronopt
from kronopt import distributed
from kronopt.inspection import counters_only
from kronopt.types import Layout

from . import _workers as w

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return w.spawn(
        2, ["presets", "nonfinite", "state_dict", "ddp", "adamw_large", "dykaf_late", "reset_reshape", "per_layer"],
        tmp_path_factory.mktemp("two"),
    )


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return w.spawn(3, ["presets_sharded", "balance"], tmp_path_factory.mktemp("three"))



_REFERENCE: dict[str, list[torch.Tensor]] = {}


def _single_process(preset):
    """The same preset, parameters and gradients in this (non-distributed) process."""
    if preset not in _REFERENCE:
        params = w.make_params()
        opt = kronopt.build(params, preset, **w.overrides(preset))
        assert opt._sharding is None
        w.run(opt, params, w.gradients())
        _REFERENCE[preset] = [p.detach() for p in params]
    return _REFERENCE[preset]


def _close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_sharding_on_equals_off_bit_for_bit_on_large_adamw_blocks(two):
    """Plain AdamW blocks: with sharding off, every rank steps them itself (on the CPU block by block,
    where a single process takes torch's fused kernel); with it on, an owner computes each block's
    direction and gathers it. The same bits."""
    for result in two:
        on, off = result["adamw_large"][True], result["adamw_large"][False]
        for a, b in zip(on, off, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("preset", w.PRESETS)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_run_equals_the_single_process_run(preset, world, request):
    """24 float64 steps with refreshes every 5: every rank's parameters match one process's."""
    ranks = request.getfixturevalue("two" if world == 2 else "three")
    job = "presets" if world == 2 else "presets_sharded"
    for result in ranks:
        _close(result[job][preset][True]["params"], _single_process(preset))


@pytest.mark.parametrize("preset", w.PRESETS)
def test_sharding_on_equals_off_bit_for_bit(two, preset):
    """``[distributed] shard_work = false`` (every rank computes everything) gives the same bits, on every rank."""
    for result in two:
        on, off = result["presets"][preset][True], result["presets"][preset][False]
        for a, b in zip(on["params"], off["params"], strict=True):
            assert torch.equal(a, b)
    for a, b in zip(two[0]["presets"][preset][True]["params"], two[1]["presets"][preset][True]["params"]):
        assert torch.equal(a, b), "the ranks' parameters differ"


def test_a_dykaf_block_with_a_zero_first_gradient_waits_alike_on_every_rank(two):
    """dykaf.md §5 under work sharding: every rank reads the block's zero gradient and leaves it out of the
    bucket's first call alike (a rank that did not would gather another bucket's plan and hang or step it wrong):
    the ranks' parameters equal, sharded or not, and one process's to rounding, with the late block two calls
    short."""
    params = w.make_params()
    grads = w.gradients()
    for k in (0, 1):
        grads[k][0] = grads[k][0] * 0
    opt = kronopt.build(params, "dykaf", **w.overrides("dykaf"))
    w.run(opt, params, grads)
    for result in two:
        for shard in (True, False):
            got = result["dykaf_late"][shard]
            _close(got["params"], [p.detach() for p in params])
            assert got["calls"] == opt.state_dict()["state"][0]["calls"] == w.STEPS - 2
    for a, b in zip(two[0]["dykaf_late"][True]["params"], two[1]["dykaf_late"][True]["params"]):
        assert torch.equal(a, b), "the ranks' parameters differ"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("preset", w.PRESETS)
def test_each_rank_holds_only_the_state_of_the_blocks_it_owns(preset, world, request):
    """Union of the ranks' blocks with state = every block, once; the state bytes add up to one process's."""
    ranks = request.getfixturevalue("two" if world == 2 else "three")
    job = "presets" if world == 2 else "presets_sharded"
    owned = [r[job][preset][True]["owned"] for r in ranks]
    flat = sorted(i for o in owned for i in o)
    assert flat == list(range(len(w.SHAPES))), owned
    assert all(owned), f"a rank owns nothing: {owned}"
    whole = sum(b["blocks"] for b in ranks[0][job][preset][True]["summary"])
    assert sum(sum(b["owned"] for b in r[job][preset][True]["summary"]) for r in ranks) == whole
    if world == 2:
        unsharded = ranks[0][job][preset][False]["state_bytes"]
        assert sum(r[job][preset][True]["state_bytes"] for r in ranks) == unsharded
        assert ranks[0][job][preset][False]["owned"] == list(range(len(w.SHAPES)))


def test_gather_bytes_are_world_times_the_widest_share(two):
    """The one all-gather per bucket moves ``world · max(blocks per rank) · m · n · 8`` bytes (float64 state)."""
    rows = two[0]["presets"]["soap"][True]["summary"]
    by_shape = {(r["m"], r["n"]): r for r in rows}
    assert by_shape[(8, 8)]["blocks"] == 3 and by_shape[(8, 8)]["gather_bytes"] == 2 * 2 * 8 * 8 * 8
    assert by_shape[(6, 6)]["gather_bytes"] == 2 * 1 * 6 * 6 * 8
    assert all(r["gather_bytes"] == 0 for r in two[0]["presets"]["soap"][False]["summary"])


def _cost(shape):
    """m³ + n³ + m·n·(m + n) (+ m·n): an independent spelling of the estimate for square full-rotated blocks."""
    m, n = shape
    return m**3 + n**3 + m * n * (m + n) + m * n


def test_ownership_balances_cost_one_big_block_and_several_small(three):
    """Three ranks, one 32×32 block and ten small ones: the big block's owner owns nothing else, the rest is split evenly."""
    owned = [r["balance"]["owned"] for r in three]
    assert sorted(i for o in owned for i in o) == list(range(len(w.BALANCE_SHAPES)))
    big = next(r for r, o in enumerate(owned) if 0 in o)
    fours = range(7, 11)  # the bucket of four 3×3 blocks: each rank owns one or two (the gather pads to two)
    assert [i for i in owned[big] if i not in fours] == [0], "the big block's owner got small blocks it need not take"
    assert all(1 <= sum(i in fours for i in o) <= 2 for o in owned)
    loads = [sum(_cost(w.BALANCE_SHAPES[i]) for i in o) for r, o in enumerate(owned) if r != big]
    assert max(loads) < _cost(w.BALANCE_SHAPES[0])
    largest_small = max(_cost(s) for s in w.BALANCE_SHAPES[1:])
    assert abs(loads[0] - loads[1]) <= largest_small, loads
    assert three[big]["balance"]["state_bytes"] > max(r["balance"]["state_bytes"] for i, r in enumerate(three) if i != big)


def test_assign_counts_differ_by_at_most_one_and_follow_the_load():
    """By hand: the 1000-cost block goes first, to rank 0; the 7 blocks of 10 give 2 each and the extra one to
    rank 1 (ranks 1 and 2 tie at 20, the lower wins); the 2 blocks of 5 go to the least loaded, ranks 2 and 1."""
    owners, loads = distributed.assign([(7, 10), (1, 1000), (2, 5)], 3)
    assert owners == [[0, 0, 1, 1, 1, 2, 2], [0], [1, 2]]
    assert loads == [1020, 35, 25]
    assert distributed.assign([(7, 10), (1, 1000), (2, 5)], 3) == (owners, loads)
    assert distributed.assign([(2, 5)], 3, loads=[0, 1, 0]) == ([[0, 2]], [5, 1, 5])


def test_block_cost_counts_only_rotated_sides():
    full = Layout(batch=1, m=8, n=4, left="full", right="full", rank_left=0, rank_right=0)
    none = Layout(batch=1, m=8, n=4, left="none", right="none", rank_left=0, rank_right=0)
    assert distributed.block_cost(full) == 8**3 + 4**3 + 8 * 4 * (8 + 4) + 8 * 4
    assert distributed.block_cost(none) == 8 * 4


@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_nan_gradient_skips_on_every_rank_and_the_ranks_stay_identical(two, scope):
    """NaN in block 0 at step 7 on every rank: skipped everywhere (scope step: every parameter; block: that one)."""
    traces = [r["nonfinite"][scope]["trace"] for r in two]
    for k in range(len(traces[0])):
        for a, b in zip(traces[0][k], traces[1][k]):
            assert torch.equal(a, b), f"ranks differ after step {k}"
    before, at = traces[0][6], traces[0][7]
    assert torch.equal(before[0], at[0])
    others_unchanged = [torch.equal(a, b) for a, b in zip(before[1:], at[1:])]
    assert all(others_unchanged) if scope == "step" else not any(others_unchanged)
    assert two[0]["nonfinite"][scope]["skipped"] == two[1]["nonfinite"][scope]["skipped"]
    params = w.make_params()
    opt = kronopt.build(params, "soap", nonfinite="skip", nonfinite_scope=scope, **w.overrides("soap"))
    w.run(opt, params, w.gradients(steps=12, nan_at=7))
    _close(traces[0][-1], [p.detach() for p in params])


def test_a_rank_resumes_from_its_own_state_dict_bit_for_bit(two):
    for r, result in enumerate(two):
        job = result["state_dict"]
        for a, b in zip(job["final"], job["resumed"]):
            assert torch.equal(a, b)
        info = job["sd"]["kronopt"]["sharding"]
        assert (info["rank"], info["world_size"]) == (r, 2)


def test_each_rank_saves_its_own_blocks_and_the_merged_dict_resumes_in_one_process(two):
    sds = [r["state_dict"]["sd"] for r in two]
    keys = [{k for k, e in sd["state"].items() if not counters_only(e)} for sd in sds]  # the blocks with tensors
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(range(len(w.SHAPES)))
    assert all(set(sd["state"]) == set(range(len(w.SHAPES))) for sd in sds), "the others' blocks: counters only"
    merged = distributed.merge_state_dicts(sds)
    assert "sharding" not in merged["kronopt"]
    params = [torch.nn.Parameter(s.clone()) for s in two[0]["state_dict"]["snapshot"]]
    opt = kronopt.build(params, "soap", **w.overrides("soap"))
    opt.load_state_dict(merged)
    w.run(opt, params, w.gradients(steps=20)[12:])
    _close([p.detach() for p in params], two[0]["state_dict"]["final"])


def test_one_ranks_state_dict_is_refused_in_one_process(two):
    params = [torch.nn.Parameter(s.clone()) for s in two[0]["state_dict"]["snapshot"]]
    opt = kronopt.build(params, "soap", **w.overrides("soap"))
    with pytest.raises(ValueError, match="merge_state_dicts"):
        opt.load_state_dict(two[0]["state_dict"]["sd"])
    with pytest.raises(ValueError, match="ranks 0..1 once each"):
        distributed.merge_state_dicts([two[0]["state_dict"]["sd"]] * 2)


def test_a_real_ddp_wrapper_trains_like_one_process_on_the_whole_batch(two):
    for a, b in zip(two[0]["ddp"]["params"], two[1]["ddp"]["params"]):
        assert torch.equal(a, b)
    assert sorted(two[0]["ddp"]["owned"] + two[1]["ddp"]["owned"]) == [0, 1, 2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 8)).double()
    opt = kronopt.build(model.parameters(), "soap", **w.overrides("soap"))
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
        y = torch.randn(32, 8, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        # DDP averages the ranks' mean losses: the mean of the two halves' means
        loss = (torch.nn.functional.mse_loss(model(x[:16]), y[:16]) + torch.nn.functional.mse_loss(model(x[16:]), y[16:])) / 2
        loss.backward()
        opt.step()
    _close(two[0]["ddp"]["params"], [p.detach() for p in model.parameters()])


def test_the_distributed_table_is_validated_and_top_level_only():
    raw = kronopt.to_dict(kronopt.PRESETS["muon"])
    assert raw["distributed"] == {"shard_work": True} and "distributed" not in raw["fallback"]
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_dict({**raw, "distributed": {"shard_work": 3}, "fallback": {**raw["fallback"], "distributed": {}}})
    paths = [p for p, _ in info.value.errors]
    assert paths == ["distributed.shard_work", "fallback.distributed"]
    off = kronopt.resolve("soap", **{"distributed.shard_work": False})
    assert not off.distributed.shard_work and kronopt.loads(kronopt.dumps(off)) == off


def test_a_state_emptied_or_a_parameter_reshaped_on_every_rank_is_taken_alike_by_every_rank(two):
    """An emptied ``state[p]`` cannot start afresh alone under work sharding: its owner warns and keeps it (a
    refusal there alone left the other ranks waiting in the gather); a reshaped parameter is refused by every rank,
    not by its owner only."""
    results = [r["reset_reshape"] for r in two]
    owners = [r for r, res in enumerate(results) if 0 in res["owned"]]
    assert len(owners) == 1
    assert [bool(res["kept"]) for res in results] == [r in owners for r in range(2)]
    assert all("another shape" in res["refused"] for res in results)
    _close(results[0]["after"], results[1]["after"])


@pytest.mark.parametrize("preset", w.PER_LAYER_PRESETS)
def test_groups_of_other_rates_share_sharded_buckets_and_step_as_each_group_alone(two, preset):
    """Two param groups that differ in lr and weight decay alone, work-sharded on two ranks: the (8, 8) blocks of
    both groups share one bucket (one plan, one all-gather), and every parameter ends as its group stepped alone in
    an optimizer of its own in this process. Catches: the gathered directions written with the bucket's first
    group's rates (the groups' lrs differ fourfold), or the groups' runs taken over the rank's own blocks instead of
    every rank's."""
    grads = w.gradients(steps=12)
    expected = [None] * len(w.SHAPES)
    for idx, rates in w.PER_LAYER:
        params = [p for i, p in enumerate(w.make_params()) if i in idx]
        opt = kronopt.build([{"params": params, **rates}], preset, **w.overrides(preset))
        w.run(opt, params, [[step[i] for i in idx] for step in grads])
        for i, p in zip(idx, params):
            expected[i] = p.detach()
    for rank in two:
        result = rank["per_layer"][preset]
        _close(result["params"], expected)
        assert any(len(g) == 2 for g in result["groups"])  # the (8, 8) blocks of both groups in one bucket
