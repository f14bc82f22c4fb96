"""``inner.scale_shape = "last_two_dims"`` (muon.md §5, §9 test 2): the shape factor from a parameter's last two
dims, as KellerJordan/Muon's ``SingleDeviceMuon`` takes it, against a float64 reference of that code written here
from the spec, and the buckets it makes."""

import math

import pytest
import torch

import kronopt
from tests.reference.newton_schulz import coefficients, newton_schulz

#: conv kernels whose flattened blocks agree (8 × 30) but whose kernels do not, a matrix of that block,
#: a kernel whose (kh, kw) factor (1) is not its block's (√8), and a tall matrix
SHAPES = [(8, 3, 5, 2), (8, 3, 2, 5), (8, 30), (16, 2, 1, 1), (12, 4)]


def _kj_muon_step(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, *, lr: float, beta: float) -> None:
    """One step of KellerJordan/Muon's ``SingleDeviceMuon`` (weight decay 0) in float64, from muon.md: the EMA
    momentum, the Nesterov look-ahead ``g.lerp(buf, β)``, a 4-D kernel viewed as ``(o, i·kh·kw)``, five quintic
    Newton–Schulz steps on ``X / (‖X‖ + ε)``, the factor √max(1, g.size(-2) / g.size(-1)) of the 4-D gradient."""
    buf.lerp_(g, 1 - beta)
    u = g.lerp(buf, beta)
    flat = u.reshape(len(u), -1) if u.ndim == 4 else u
    o = newton_schulz(flat, coefficients("kj", 5), eps=1e-7, norm="add")
    p.add_(o.reshape(p.shape), alpha=-lr * math.sqrt(max(1.0, g.size(-2) / g.size(-1))))


def _run_ours(starts, grads, **overrides):
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    opt = kronopt.build(
        [(f"blocks.{i}.weight", p) for i, p in enumerate(params)],
        "muon",
        lr=0.02,
        weight_decay=0.0,
        **{"inner.norm": "add", "inner.ns_dtype": "float64", **overrides},
    )
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _inputs(steps: int):
    gen = torch.Generator().manual_seed(3)
    starts = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    return starts, grads


def test_last_two_dims_steps_as_kellerjordan_single_device_muon():
    starts, grads = _inputs(6)
    ours, _ = _run_ours(starts, grads, **{"inner.scale_shape": "last_two_dims"})
    theirs = [s.clone() for s in starts]
    bufs = [torch.zeros_like(s) for s in starts]
    for step in grads:
        for p, g, b in zip(theirs, step, bufs):
            _kj_muon_step(p, g.clone(), b, lr=0.02, beta=0.95)
    for shape, a, b, s in zip(SHAPES, ours, theirs, starts):
        assert (b - s).norm() > 1e-2, shape  # the reference moved it: the comparison below means something
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12, msg=str(shape))


def test_block_default_differs_from_last_two_dims_exactly_where_the_kernel_factor_does():
    """The default takes the flattened block's factor: the same steps where the two factors agree, and steps scaled
    by their ratio where they do not (√2.5 / 1 for (8, 3, 5, 2), 1 / √8 for (16, 2, 1, 1))."""
    starts, grads = _inputs(1)
    block, _ = _run_ours(starts, grads)
    dims, _ = _run_ours(starts, grads, **{"inner.scale_shape": "last_two_dims"})
    ratio = {(8, 3, 5, 2): math.sqrt(2.5), (8, 3, 2, 5): 1.0, (8, 30): 1.0, (16, 2, 1, 1): 1 / math.sqrt(8), (12, 4): 1.0}
    for shape, a, b, s in zip(SHAPES, block, dims, starts):
        torch.testing.assert_close((b - s).detach(), (a - s).detach() * ratio[shape], rtol=1e-10, atol=1e-13, msg=str(shape))


def test_buckets_stack_only_blocks_whose_parameters_agree_on_the_dims_read():
    starts, grads = _inputs(1)
    _, block = _run_ours(starts, grads)
    _, dims = _run_ours(starts, grads, **{"inner.scale_shape": "last_two_dims"})
    rows = lambda opt: sorted((r["m"], r["n"], r["param_dims"], r["blocks"]) for r in opt.bucket_summary())
    assert rows(block) == [(8, 30, (), 3), (12, 4, (), 1), (16, 2, (), 1)]
    assert rows(dims) == [(8, 30, (), 1), (8, 30, (2, 5), 1), (8, 30, (5, 2), 1), (12, 4, (), 1), (16, 2, (1, 1), 1)]


def test_last_two_dims_resumes_bit_for_bit():
    starts, grads = _inputs(5)
    straight, _ = _run_ours(starts, grads, **{"inner.scale_shape": "last_two_dims"})
    first, opt = _run_ours(starts, grads[:3], **{"inner.scale_shape": "last_two_dims"})
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    again = kronopt.build(
        [(f"blocks.{i}.weight", p) for i, p in enumerate(params)],
        "muon",
        lr=0.02,
        weight_decay=0.0,
        **{"inner.norm": "add", "inner.ns_dtype": "float64", "inner.scale_shape": "last_two_dims"},
    )
    again.load_state_dict(opt.state_dict())
    for step in grads[3:]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        again.step()
    for a, b in zip(straight, params):
        assert torch.equal(a.detach(), b.detach())


def test_an_unknown_scale_shape_is_refused_with_the_choices():
    with pytest.raises(kronopt.ConfigError, match=r"scale_shape[\s\S]*last_two_dims"):
        kronopt.build([torch.nn.Parameter(torch.zeros(4, 4))], "muon", **{"inner.scale_shape": "kernel"})
