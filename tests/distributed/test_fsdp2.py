"""FSDP2 (DTensor parameters, docs/distributed.md): exact steps with block owners, elementwise buckets locally.

The ranks run ``fully_shard`` models in spawned processes on gloo (``_fsdp2_workers.py``),
one module-wide run per world size (2 and 3 ranks) whose results every test reads. Each
rank feeds its slice of the batch; the single-process reference feeds the whole batch
with the same mean loss. The model's 9-row layers split unevenly (5 + 4 rows on two
ranks, 3 + 3 + 3 on three) and ``c`` ``(3, 3, 9)`` is a merged block with three block
rows per row of dim 0 (2 + 1 rows on two ranks, so one rank holds 6 block rows and the
other 3). Gradients are full rank in float64, so the comparison is well posed: the two
runs' gradients differ in the last bits (another summation order), which a
rank-deficient factor would amplify through its arbitrary null-space basis.
"""


import pytest
import torch
import torch.distributed as dist

import kronopt
from kronopt import distributed

from . import _fsdp2_workers as w

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """One spawn of three processes: the 2-rank jobs on a mesh of ranks 0 and 1, then the 3-rank ones."""
    plan = {2: ["presets", "peak", "nonfinite", "misc", "dcp", "eigh", "per_layer"], 3: ["presets", "nonfinite", "dcp_reshard"]}
    return w.spawn(plan, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def two(worlds):
    return worlds[2]


@pytest.fixture(scope="module")
def three(worlds):
    return worlds[3]



_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}



def _single(preset):
    if preset not in _REFERENCE:
        _REFERENCE[preset] = w.single(preset)
    return _REFERENCE[preset]


def _close(actual, expected, rtol=1e-10, atol=1e-12):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("preset", w.PRESETS)
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_run_equals_the_single_process_run(preset, world, request):
    """21 float64 steps, refreshes every 5, uneven shards: every rank's full parameters match one process's."""
    ranks = request.getfixturevalue("two" if world == 2 else "three")
    for result in ranks:
        _close(result["presets"][preset]["params"], _single(preset))
    moved = [n for n, p in ranks[0]["presets"][preset]["params"].items() if not torch.equal(p, w.full(w.Net())[n])]
    assert sorted(moved) == ["a.bias", "a.weight", "b.bias", "b.weight", "c"], "every parameter with a gradient moves"


@pytest.mark.parametrize("preset", ["soap", "muon", "adamw"])
@pytest.mark.parametrize("world", [2, 3])
def test_state_lives_on_the_owner_and_adds_up_to_one_process(preset, world, request):
    """Matrices: each block's state on exactly one rank; elementwise buckets (biases, AdamW): each rank its rows.
    The ranks' state bytes add up to one process's, plus the zero rows padding the shorter shards."""
    ranks = request.getfixturevalue("two" if world == 2 else "three")
    rows = [r["presets"][preset] for r in ranks]
    model = w.Net()
    opt = kronopt.build(w.groups(model, preset), preset, **w.overrides(preset))
    single = opt.state_bytes()
    matrices = ["a.weight", "b.weight", "c", "unused"]
    if preset != "adamw":
        owners = [[n for n in r["owned"] if n in matrices] for r in rows]
        assert sorted(n for o in owners for n in o) == matrices, owners
    else:
        assert all(r["owned"] == sorted(n for n, _ in model.named_parameters()) for r in rows)
    total = sum(r["state_bytes"] for r in rows)
    # more: the zero rows padding shorter shards in elementwise stacks, and their per-block counters on every rank
    assert single <= total <= single * 1.5, (single, total)


def test_the_summary_reports_the_bytes_each_rank_receives(two):
    """Owned bucket: the other ranks' rows of the owned blocks (gradients) plus this rank's rows of the others'
    blocks (directions), float64; elementwise buckets communicate nothing."""
    for result in two:
        assert all(r["gather_bytes"] == 0 for r in result["presets"]["adamw"]["summary"])
        assert all(r["gather_bytes"] == 0 for r in result["presets"]["muon"]["summary"] if r["pipeline"] == "fallback")
    # rank 0 of 2 holds rows 0-4 of each 9×9 block, rank 1 rows 5-8; muon's 9×9 bucket: a.weight, b.weight
    s0 = next(r for r in two[0]["presets"]["muon"]["summary"] if r["blocks"] == 2 and r["n"] == 9)
    s1 = next(r for r in two[1]["presets"]["muon"]["summary"] if r["blocks"] == 2 and r["n"] == 9)
    k0, k1 = s0["owned"], s1["owned"]
    assert k0 + k1 == 2
    assert s0["gather_bytes"] == (k0 * 4 * 9 + (2 - k0) * 5 * 9) * 8
    assert s1["gather_bytes"] == (k1 * 5 * 9 + (2 - k1) * 4 * 9) * 8


def test_no_rank_allocates_a_matrix_it_does_not_own(two):
    """SOAP with a 48×48 matrix: the rank that owns it makes 48² tensors, the other never more than its 24×48 rows."""
    peaks = [r["peak"] for r in two]
    big = [i for i, r in enumerate(peaks) if "big.weight" in r["owned"]]
    assert len(big) == 1
    owner, other = peaks[big[0]], peaks[1 - big[0]]
    assert other["local_big"] == w.BIG * w.BIG // 2
    assert max(other["peaks"]) <= other["local_big"], other["peaks"]
    assert max(owner["peaks"]) >= w.BIG * w.BIG


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_nan_on_one_rank_skips_on_every_rank(scope, world, request):
    """A NaN in the last rank's rows of a.weight's gradient at step 4: scope step leaves every parameter as it was
    on every rank; scope block leaves a.weight; the run then equals one process with the NaN at that row."""
    ranks = request.getfixturevalue("two" if world == 2 else "three")
    traces = [r["nonfinite"][scope]["trace"] for r in ranks]
    for trace in traces[1:]:
        for k in range(len(trace)):
            for name in trace[k]:
                assert torch.equal(trace[k][name], traces[0][k][name]), f"ranks differ at step {k} in {name}"
    before, at = traces[0][3], traces[0][4]
    unchanged = sorted(n for n in at if torch.equal(at[n], before[n]))
    expected = sorted(at) if scope == "step" else ["a.weight", "unused"]  # unused: no gradient
    assert unchanged == expected
    row = distributed.chunk_rows(9, world, world - 1)[0]

    def hook(k, model):
        if k == 4:
            model.a.weight.grad[row, 0] = float("nan")

    model = w.Net()
    opt = kronopt.build(w.groups(model, "soap"), "soap", nonfinite="skip", nonfinite_scope=scope, **w.overrides("soap"))
    w.train(model, opt, w.data(8), hook=hook)
    _close(traces[0][-1], w.full(model))
    counts = {n: c for r in ranks for n, c in r["nonfinite"][scope]["nonfinite"].items() if c}
    assert counts == {"a.weight": 1}


@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_raise_raises_on_every_rank_naming_the_parameter(world, request):
    """nonfinite = "raise", the NaN on the last rank only: every rank raises (none waits in a collective), names
    a.weight, and no parameter changed."""
    for result in request.getfixturevalue("two" if world == 2 else "three"):
        raised = result["nonfinite"]["raise"]
        assert raised is not None and "a.weight" in raised["message"] and raised["unchanged"]


def test_fallback_routing_group_lrs_a_scheduler_and_a_parameter_without_gradient(two):
    """Muon: biases routed to the AdamW fallback (elementwise), c in its own group with its own lr, LambdaLR over 12
    steps, ``unused`` without gradient: equal to one process, and no rank moved ``unused``."""
    model = w.Net()
    opt, scheduler = w.misc_setup(model)
    w.train(model, opt, w.data(12), scheduler=scheduler)
    for result in two:
        _close(result["misc"]["params"], w.full(model))
        assert result["misc"]["pipelines"] == [(g["pipeline"], g.get("param_names"), g["lr"]) for g in opt.param_groups]
        assert torch.equal(result["misc"]["params"]["unused"], w.full(w.Net())["unused"])
    lrs = [g["lr"] for g in opt.param_groups]
    assert len(set(lrs)) == 3


def test_merge_state_dicts_refuses_an_fsdp2_optimizers_dicts_naming_the_way_that_works(two):
    """An FSDP2 optimizer's elementwise entries are DTensor row shards on every rank: merge_state_dicts refused them
    with "parameter 1 has state in two ranks' dicts" (as if the dicts came from different saves); it now says what
    they are and that torch.distributed.checkpoint (or a full state dict) moves them."""
    for result in two:
        message = result["misc"]["merge_error"]
        assert message is not None and message.startswith("these are an FSDP2 optimizer's dicts"), message
        assert "torch.distributed.checkpoint" in message and "full_state_dict=True" in message


def test_distributed_checkpoint_round_trip_continues_the_run(two):
    """dcp.save of get_optimizer_state_dict after 6 steps; a fresh model and optimizer load it and train the same 6
    steps as the original: the same parameters (to the last bits: DCP loads into the fresh tensors' memory layout)."""
    for result in two:
        _close(result["dcp"]["resumed"], result["dcp"]["final"], rtol=1e-13, atol=1e-15)
        assert result["dcp"]["state_bytes"][0] == result["dcp"]["state_bytes"][1]


def test_chunk_rows_follows_torch_chunk():
    for rows in (1, 2, 8, 9, 10):
        for world in (2, 3, 4):
            pieces = torch.arange(rows).chunk(world)
            expected = [(int(p[0]), int(p[-1]) + 1) for p in pieces] + [(rows, rows)] * (world - len(pieces))
            got = [distributed.chunk_rows(rows, world, r) for r in range(world)]
            assert [b - a for a, b in got] == [b - a for a, b in expected]
            assert [a for (a, b) in got if b > a] == [a for a, _ in expected if _ > a]


def test_is_elementwise_reads_the_capabilities_not_the_preset_name():
    from kronopt.types import Layout

    vector = Layout(batch=1, m=8, n=1, left="none", right="none")
    matrix = Layout(batch=1, m=8, n=8, left="full", right="full")
    adamw = kronopt.resolve("adamw").bound()
    assert distributed.is_elementwise(adamw, vector)
    assert not distributed.is_elementwise(kronopt.resolve("adamw", **{"inner.normalize": True}).bound(), vector)
    assert not distributed.is_elementwise(kronopt.resolve("adamw", **{"post.normalize": True}).bound(), vector)
    assert not distributed.is_elementwise(kronopt.resolve("muon").bound(), vector), "Newton–Schulz reads the whole block"
    assert distributed.is_elementwise(kronopt.resolve("soap").bound(), vector), "soap on an unrotated vector is Adam"
    assert not distributed.is_elementwise(kronopt.resolve("soap").bound(), matrix)
    assert distributed.is_elementwise(adamw, matrix), "the identity basis rotates nothing"
    assert not distributed.is_elementwise(kronopt.resolve("dykaf_rank1").bound(), vector), "l rᵀ couples the entries"


def test_a_checkpoint_of_two_ranks_resumes_on_three(two, three):
    """The 2-rank checkpoint (full blocks keyed by name, elementwise rows as DTensors) loads on 3 ranks, whose owners
    differ, and the 6 steps after it equal the 2-rank run's (another world size: the same up to rounding)."""
    for result in three:
        _close(result["dcp_reshard"]["resumed"], two[0]["dcp"]["final"])


def test_a_failing_eigh_keeps_the_basis_under_fsdp2_as_in_one_process(two):
    """Shampoo with eigh failing from update 5 on: the owners keep their last bases and count the failures;
    parameters equal one process's, and the failure counts, joined over the ranks, too."""
    expected = w.eigh_run(w.Net(), 9)
    for result in two:
        _close(result["eigh"]["params"], expected["params"])
    joined = {name: count for r in two for name, count in r["eigh"]["failures"].items()}
    assert joined == expected["failures"]
    assert all(joined[name] > 0 for name in ("a.weight", "b.weight", "c"))


def test_entries_deleted_on_one_rank_keep_their_state_and_every_rank_steps_on(two):
    """``del opt.state[p]`` on rank 1 only, for every parameter: under FSDP2 the state is kept (with a warning where
    the rank owns the block), the entries are back, and both ranks take the next steps together."""
    a, b = (r["misc"] for r in two)
    assert a["entries_after_delete"] == b["entries_after_delete"] > 0
    for name in a["after_delete"]:
        torch.testing.assert_close(a["after_delete"][name], b["after_delete"][name], rtol=0, atol=0)


@pytest.mark.parametrize("preset", w.PER_LAYER_PRESETS)
def test_groups_of_other_rates_share_fsdp2_buckets_and_step_as_each_group_alone(two, preset):
    """Two param groups that differ in lr and weight decay alone over FSDP2 on two ranks: ``a.weight``, ``b.weight``
    and ``unused`` (of both groups) share one bucket, the biases another, and every parameter ends as in one
    process where each group steps in an optimizer of its own. Catches: a rank's rows written with the bucket's
    first group's rates (the groups' lrs differ fourfold), a group's rows picked at another's positions."""
    model = w.Net()
    opts = [kronopt.build([g], preset, **w.overrides(preset)) for g in w.per_layer_groups(model)]
    for x, y in w.data(12):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        w.loss_fn(model, x, y).backward()
        for opt in opts:
            opt.step()
    expected = w.full(model)
    for rank in two:
        result = rank["per_layer"][preset]
        _close(result["params"], expected)
        assert sum(len(g) == 2 for g in result["groups"]) >= 2  # the (9, 9) weights' bucket and the biases'


def test_a_dcp_checkpoint_of_shared_fsdp2_buckets_resumes_as_the_uninterrupted_run(two):
    """soap over per-layer groups under FSDP2, saved with torch.distributed.checkpoint after 4 steps: a fresh model
    and optimizer load it and take the last 4 steps as the uninterrupted run did, with the same shared buckets.
    Catches: a load that rebuilds the shared buckets per group or stacks their blocks' state in another order."""
    for rank in two:
        run = rank["per_layer"]["dcp"]
        _close(run["resumed"], run["final"], rtol=0, atol=0)
        assert sum(len(g) == 2 for g in run["groups"]) >= 2
