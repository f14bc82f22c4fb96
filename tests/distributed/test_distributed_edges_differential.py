"""Differential checks of the distributed paths in setups the other distributed tests leave out
(docs/distributed.md): an odd world size (3), buckets with fewer blocks than ranks or exactly one, blocks of
two dtypes, frozen parameters, a gradient missing on every rank, ``add_param_group`` after some steps,
``torch.distributed.checkpoint`` across world sizes with and without ``shard_work``, non-finite gradients
on some ranks only under a real DDP model, and FSDP2 with a mixed precision policy, with
``reshard_after_forward = False`` and with empty shards. The jobs are in ``_edges_workers.py``.

Each multi-process run is compared with the single-process run of the same optimizer on the same global
gradients: to float rounding (``rtol 1e-10`` in float64, ``1e-5`` for float32 parameters, whose fallback
AdamW takes torch's fused kernel in one process and the general path on several ranks), and the ranks with
each other bit for bit. Two spawns: two ranks (the checkpoints), then three (everything else).
"""

import multiprocessing
import warnings

import pytest
import torch
import torch.distributed as dist

from . import _edges_workers as e

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="forked ranks (_dcp_workers.spawn)"),
]


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    import torch.distributed.checkpoint  # noqa: F401 - imported once here, before the forks
    import torch.distributed.fsdp  # noqa: F401

    path = tmp_path_factory.mktemp("edges")
    e.save_frozen_one_process(path)
    return path


@pytest.fixture(scope="module")
def two(where):
    return e.spawn(2, ["dcp_save", "frozen_save"], where)


@pytest.fixture(scope="module")
def three(two, where):
    return e.spawn(3, ["ddp", "nan", "fsdp", "dcp_resume", "frozen_from_one"], where)


def _ok(result):
    assert not isinstance(result, str), result
    return result


def _close(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for i, (a, b) in enumerate(zip(actual, expected)):
        rtol, atol = (1e-5, 1e-6) if b.dtype == torch.float32 else (1e-10, 1e-12)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _close_named(actual, expected, what="", rtol=1e-10, atol=1e-12):
    assert actual.keys() == expected.keys(), what
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{what} {n}: {m}")


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


_DDP_REF: dict = {}


def _ddp_reference(preset):
    if preset not in _DDP_REF:
        _DDP_REF[preset] = e.ddp_train(preset)
    return _DDP_REF[preset]


# -- work sharding at world 3 -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", e.DDP_PRESETS)
def test_odd_world_with_small_buckets_mixed_dtypes_frozen_missing_grads_and_an_added_group_equals_one_process(three, preset):
    """Catches, at three ranks: a gather whose padding or slot order is wrong where a bucket has fewer blocks
    than ranks (a rank owns none) or exactly one; float32 and float64 blocks of one shape mixed up (one bucket
    each, directions gathered in the state dtype); a frozen block moved, or its bucket stepped; a split after a
    gradient missing on every rank misassigned; a group added after five steps owned by nobody or twice.
    Every step equals one process to rounding, with sharding on and off, on every rank; the ranks agree bit
    for bit; the state divides over the ranks (the blocks once, the bytes adding up to one process's).
    On against off is compared to rounding, not bit for bit: MKL's batched eigh and QR round a 5 × 5 or
    7 × 7 float64 matrix by its offset in the stack, and the two settings stack the (5, 5) blocks differently."""
    ref = _ddp_reference(preset)
    runs = {shard: [_ok(r["ddp"][(preset, shard)]) for r in three] for shard in (True, False)}
    for shard, ranks in runs.items():
        for r, got in enumerate(ranks):
            for k, (a, b) in enumerate(zip(got["trace"], ref["trace"], strict=True)):
                _close(a, b, f"shard={shard} rank {r} step {k}")
            assert _equal(got["trace"][-1], ranks[0]["trace"][-1]), f"shard={shard}: rank {r} differs from rank 0"
    on = runs[True]
    assert sum(r["owned"] for r in on) == ref["owned"] == runs[False][0]["owned"]
    assert sum(r["state_bytes"] for r in on) == ref["state_bytes"]
    start, final = [p.detach() for p in e.Blocks().parameters()], ref["trace"][-1]
    frozen = [5, 8]
    assert all(torch.equal(final[i], start[i]) for i in frozen), "a frozen parameter moved"
    assert all(not torch.equal(final[i], start[i]) for i in range(len(start)) if i not in frozen)
    k, j = e.NONE_AT
    assert torch.equal(ref["trace"][k][j], ref["trace"][k - 1][j]), "the block without gradient moved"


# -- checkpoints across world sizes, with and without shard_work --------------------------------------------


@pytest.mark.parametrize("preset", e.DCP_PRESETS)
def test_a_checkpoint_of_two_ranks_with_or_without_sharding_resumes_at_three_and_at_one(two, three, where, preset):
    """Saved with DCP at two ranks (after a split bucket and an added group) with ``shard_work`` on and off,
    loaded at three ranks and in one process with it on and off: the continued run equals the uninterrupted
    single-process one. Catches a sharded dict missing a block's tensors where the loader is unsharded (or the
    other way round), a one-block or frozen bucket loaded by the wrong owner, and mixed-dtype buckets swapped."""
    model = e.Blocks()
    expected = e.run(model, e.build(model, preset), 0, e.STEPS)[-1]
    for r in two:
        for saved in (True, False):
            _close(_ok(r["dcp_save"][(preset, saved)]), expected, f"saved={saved} uninterrupted on 2 ranks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        one = e.dcp_resume(where)
    for saved in (True, False):
        for shard in (True, False):
            case = (preset, saved, shard)
            finals = [_ok(r["dcp_resume"][case]) for r in three]
            for r, final in enumerate(finals):
                _close(final, expected, f"{case} at 3, rank {r}")
                assert _equal(final, finals[0])
            _close(_ok(one[case]), expected, f"{case} in one process")


# -- non-finite gradients on some ranks, a real DDP model ---------------------------------------------------


@pytest.mark.parametrize("case", e.NAN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_a_non_finite_gradient_on_some_ranks_is_handled_alike_everywhere_and_as_in_one_process(three, case):
    """A NaN in rank 1's slice at step 2, +inf on rank 0 and -inf on rank 2 at step 5 (NaN after DDP's
    all-reduce), a branch used by rank 0 alone at step 3 and by none at step 4 (its gradient ``None`` on every
    rank): every rank raises at the same steps (``nonfinite = "raise"``) or skips the same blocks, the ranks'
    parameters agree bit for bit after every step, and equal one process on the whole batch."""
    ranks = [_ok(r["nan"][case]) for r in three]
    ref = e.lm_train(*case, ddp=False)
    raising = case[2] == "raise"
    expected_raised = [raising and k in (2, 5) for k in range(e.NAN_STEPS)]
    assert [x is not None for x in ref["raised"]] == expected_raised
    assert ref["without_grad"][e.NOBODY] == ["branch.weight"] and ref["without_grad"][e.ONLY_RANK0] == []
    for r, got in enumerate(ranks):
        assert [x is not None for x in got["raised"]] == expected_raised, f"rank {r}"
        assert got["without_grad"] == ref["without_grad"], f"rank {r}"
        for k in range(e.NAN_STEPS):
            assert _equal(got["trace"][k], ranks[0]["trace"][k]), f"rank {r} differs from rank 0 after step {k}"
            _close_named(got["trace"][k], ref["trace"][k], f"rank {r} step {k}")
    for k in (2, 5):  # the bad steps left every parameter as it was (the step's gradients are all non-finite)
        assert _equal(ref["trace"][k], ref["trace"][k - 1]), f"a parameter moved at step {k}"


# -- FSDP2 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", e.FSDP_CASES, ids=lambda c: "-".join(c))
def test_fsdp2_at_three_ranks_with_mixed_precision_or_kept_unsharded_and_empty_shards_equals_one_process(three, case):
    """``fully_shard`` on three ranks, real forward and backward: bfloat16 parameters in the forward with a
    float32 reduction (the optimizer's parameters and gradients float32), or ``reshard_after_forward = False``;
    rows 2 + 2 + 1, 1 + 1 + 0 (rank 2 holds no row of ``l2.weight`` nor of its ``(2,)`` bias) and a ``(1,)``
    parameter. The same optimizer in one process on the gradients the ranks were given takes the same steps
    (shampoo grafts on the vectors: an owned bucket of vectors, some ranks without rows)."""
    mode, preset = case
    ranks = [_ok(r["fsdp"][case]) for r in three]
    for got in ranks[1:]:
        assert all(_equal(a, b) for a, b in zip(got["grads"], ranks[0]["grads"]))
        assert all(_equal(a, b) for a, b in zip(got["trace"], ranks[0]["trace"])), "the ranks' parameters differ"
    ref = e.fsdp_replay(mode, preset, ranks[0]["grads"])
    rtol, atol = (1e-6, 1e-7) if mode == "mp" else (1e-10, 1e-12)
    for k, (a, b) in enumerate(zip(ranks[0]["trace"], ref, strict=True)):
        _close_named(a, b, f"step {k}", rtol=rtol, atol=atol)
    start = {n: p.detach() for n, p in e.Net(e._dtype(mode)).named_parameters()}
    assert all(not torch.equal(ref[-1][n], start[n]) for n in start), "a parameter never moved"
    assert ranks[0]["grads"][0]["l1.weight"].dtype == e._dtype(mode)


# -- FSDP2 checkpoints with frozen parameters (bugs) -------------------------------------------------------------


def test_fsdp2_checkpoint_where_a_rank_owns_only_a_frozen_block_resumes_in_one_process(two, where):
    """docs/distributed.md: a DCP checkpoint moves between FSDP2 and one process. One process (and work
    sharding) keeps state for a frozen block in a bucket with trained ones; under FSDP2 the rank that owns
    only the frozen block makes none, its checkpoint lacks ``f.factors.L``, and one process cannot load it."""
    expected = e.frozen_uninterrupted("shared")
    for r in two:
        _close_named(_ok(r["frozen_save"]["shared"])["final"], expected, f"rank {r} uninterrupted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        got = e._caught(e.frozen_resume, "shared", 1, where / "frozen-shared-fsdp")
    _close_named(_ok(got), expected, "resumed in one process")


def test_fsdp2_own_state_dict_where_a_rank_owns_only_a_frozen_block_resumes_bit_for_bit(two):
    """docs/distributed.md: "The per-rank dict of opt.state_dict() loads back on its own rank as under DDP"."""
    for r in two:
        got = _ok(r["frozen_save"]["shared"])
        assert _equal(_ok(got["own"]), got["final"]), f"rank {r}"


def test_fsdp2_own_state_dict_with_a_frozen_parameter_without_state_resumes_bit_for_bit(two):
    for r in two:
        got = _ok(r["frozen_save"]["alone"])
        assert _equal(_ok(got["own"]), got["final"]), f"rank {r}"


def test_a_one_process_checkpoint_with_a_frozen_parameter_resumes_under_fsdp2(three):
    """docs/distributed.md: a DCP checkpoint moves between one process and FSDP2, in both directions."""
    expected = e.frozen_uninterrupted("alone")
    for r, result in enumerate(three):
        _close_named(_ok(result["frozen_from_one"]), expected, f"rank {r}")


def test_an_fsdp2_checkpoint_with_a_frozen_parameter_without_state_resumes_in_one_process(two, where):
    """The direction that works: the ranks' markers of the frozen parameter are not asked for by one process."""
    expected = e.frozen_uninterrupted("alone")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = e._caught(e.frozen_resume, "alone", 1, where / "frozen-alone-fsdp")
    _close_named(_ok(got), expected, "resumed in one process")
