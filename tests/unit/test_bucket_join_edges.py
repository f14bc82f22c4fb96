"""Edges of split buckets joined again (``KronOptimizer._join``), found by a review: each test pins one bug, and
fails on the code it was found in (tests/unit/test_bucket_join.py has the join's main tests)."""

import warnings

import pytest
import torch

import kronopt

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _step(opt, params, grads, *, inference=False):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    if inference:
        with torch.inference_mode():
            opt.step()
    else:
        opt.step()


@pytest.mark.parametrize("preset", ["soap", "muon"])
@pytest.mark.parametrize("where", ["join", "split"])
def test_a_join_or_split_under_inference_mode_leaves_stacks_a_later_plain_step_can_update(preset, where):
    """A step under ``torch.inference_mode()`` that joins parts (or splits a bucket) made the new stacks with
    ``torch.cat`` / ``torch.empty_strided`` inside that mode: every state tensor of the bucket became an
    inference tensor, and the next ordinary step failed ("Inplace update to inference tensor outside
    InferenceMode"). Steps under inference mode are supported otherwise
    (test_optimizer_api_edges.test_steps_under_inference_mode_after_the_first_equal_plain_steps). Also checks
    the steps' values against the same run without inference mode."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(2)]
    g = [[torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(2)] for _ in range(5)]
    rows = [g[0], [None, g[1][1]], [g[2][0], None], g[3], g[4]]  # split, split, join (step 3), plain step
    at = 3 if where == "join" else 1
    kw = {"refresh.every": 3} if preset == "soap" else {}
    out = []
    for inference in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = kronopt.build(params, preset, **kw)
        for t, row in enumerate(rows):
            _step(opt, params, row, inference=inference and t == at)
        assert not any(v.is_inference() for v in opt.state[params[0]].values() if isinstance(v, torch.Tensor))
        out.append(params)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_parts_joined_at_their_first_call_keep_a_non_finite_parts_call_uncounted():
    """Under ``nonfinite_scope = "block"`` a bucket's first call that used no gradient is not counted
    (``_uncounted``): apart, an expert whose first gradients are all NaN stays before its first call. Two parts
    still before their first call agree in every counter, so ``_join`` joined them; the joined call used the
    other part's gradient, so it was counted for both, and the NaN expert's next step was its second call (SOAP:
    a parameter update from a basis never refreshed, where apart that call only builds the basis): 0.09 away
    from the same optimizer with joining turned off. Joining must not change any block's trajectory."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(4)]

    def r():
        return torch.randn(6, 4, generator=gen, dtype=F64)

    nan = torch.full((6, 4), float("nan"), dtype=F64)
    # experts 2 and 3 go apart before their first call (step 0); 2 alone takes a NaN gradient (split from 3,
    # uncounted); then 2 (NaN again) and 3 step together, both before their first call: the join step
    rows = [[r(), r(), None, None], [None, None, nan, None], [None, None, nan, r()]] + [[r() for _ in range(4)] for _ in range(3)]
    out = []
    for join in (True, False):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = kronopt.build(params, "soap", **{"refresh.every": 3, "nonfinite_scope": "block"})
        if not join:
            opt._join = lambda stepped: stepped
        for row in rows:
            _step(opt, params, row)
        out.append((params, [opt.state[p]["calls"] for p in params]))
    (joined, calls_joined), (apart, calls_apart) = out
    assert calls_joined == calls_apart
    for a, b in zip(joined, apart):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_load_without_bucket_keys_keeps_parts_before_their_first_call_apart():
    """``torch.distributed.checkpoint`` loads a state dict without the blocks' bucket keys; the load then puts
    blocks whose counters agree into one bucket. Two parts before their first counted call (an expert whose
    first gradients were all NaN under ``nonfinite_scope = "block"``, and one that never stepped with state)
    agree, but joined, the first call counts on the other's gradient (as the join's test above): such blocks
    must load apart, so the resumed run is the uninterrupted one."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(4)]

    def r():
        return torch.randn(6, 4, generator=gen, dtype=F64)

    nan = torch.full((6, 4), float("nan"), dtype=F64)
    head = [[r(), r(), None, None], [None, None, nan, None], [None, nan, None, nan]]
    tail = [[None, None, nan, r()]] + [[r() for _ in range(4)] for _ in range(3)]
    kw = {"refresh.every": 3, "nonfinite_scope": "block"}
    runs = []
    for resume in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = kronopt.build(params, "soap", **kw)
        for row in head:
            _step(opt, params, row)
        if resume:
            saved = opt.state_dict()
            for entry in saved["state"].values():
                entry.pop("bucket", None)  # as torch.distributed.checkpoint loads it
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = kronopt.build(params, "soap", **kw)
            opt.load_state_dict(saved)
        for row in tail:
            _step(opt, params, row)
        runs.append((params, [opt.state[p].get("calls") for p in params]))
    (plain, calls_plain), (resumed, calls_resumed) = runs
    assert calls_resumed == calls_plain
    for a, b in zip(resumed, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
