"""Plain AdamW's small blocks carry their moments' bounds (``optimizer._MomentBounds``) while fewer than
``_ADAM_VERDICTS_TOGETHER_MIN`` step; from that many their verdicts are made on tensors and their moments read every
step. (The bounds' other tests, on large and small blocks alike, are in test_adam_moment_bounds.py.)"""

import pytest
import torch

import kronopt
from kronopt import optimizer as kopt
from tests.unit.test_adam_moment_bounds import _moment_reads, _step, never_carried  # noqa: F401  (a fixture)


@pytest.mark.parametrize("count", [kopt._ADAM_VERDICTS_TOGETHER_MIN - 1, kopt._ADAM_VERDICTS_TOGETHER_MIN])
def test_small_blocks_carry_their_bounds_below_the_count_judged_on_tensors(count, never_carried):
    """Below ``_ADAM_VERDICTS_TOGETHER_MIN`` small blocks a step their bounds are carried (the moments read once), from
    that many their verdicts are made on tensors and their moments read every step; a run whose count crosses it
    from step to step (parameters without gradients on some steps) is the same bits as one reading every step."""
    shapes = [(7, 5)] * (count // 2) + [(5, 7)] * (count - count // 2)
    gen = torch.Generator().manual_seed(count)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], "adamw")
    mode, reads = _moment_reads(opt)
    with mode:
        _step(opt, params, [torch.randn(*s, generator=gen) for s in shapes])
        first = len(reads)
        for k in range(3):
            _step(opt, params, [torch.randn(*s, generator=gen) for s in shapes])
    carried = count < kopt._ADAM_VERDICTS_TOGETHER_MIN
    assert first > 0 and (len(reads) == first) == carried == bool(opt._carried_bounds())

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(ps)], "adamw", nonfinite="skip")
        for k in range(12):
            for i, (p, s) in enumerate(zip(ps, shapes)):
                scale = 1e30 if k == 7 and i == 1 else 1.0  # past the safety test: the checked path, skipped
                p.grad = None if (k % 3 == 1 and i % 4 == 0) else torch.randn(*s, generator=gen) * scale
            opt.step()
        states = [t.clone() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return [p.detach().clone() for p in ps] + states

    carried = run(count)
    never_carried()
    for x, y in zip(carried, run(count)):
        assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())
