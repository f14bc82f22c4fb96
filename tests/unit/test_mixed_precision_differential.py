"""Low-precision parameters, mixed dtypes and torch.amp.GradScaler, against float32 runs and torch.optim.AdamW.

Differential: every expectation comes from torch.optim.AdamW, from a float32 run of the same preset on
upcast copies (state does not depend on the parameters' values, so the copies are reset from the
low-precision parameters before each step), or from a run that leaves the skipped step out by hand.
"""

import warnings

import pytest
import torch

import kronopt
from tests.torch_compat import needs_grad_dtype

PRESETS = ["adamw", "soap", "shampoo", "muon", "dykaf", "kl_shampoo", "pro_kl_shampoo", "pro_soap"]
SHAPES = [(12, 8), (8,)]


def _build(params, preset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unnamed parameters: the routing warning
        return kronopt.build(params, preset)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each entry of a low-precision tensor, as float32."""
    up = torch.nextafter(x, torch.full_like(x, float("inf")))
    return (up.float() - x.float()).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", PRESETS)
def test_low_precision_params_step_as_float32_rounded_at_the_write(preset, dtype):
    """State is float32 (the documented minimum), nothing non-finite, and each step lands within one
    rounding of the float32 step on the same values: the write rounds once, except that the decay is written
    into the parameter before the step is added (as torch.optim.AdamW does), which adds one rounding at the
    scale of the old value (so up to one ulp of the old value, plus one of the result)."""
    gen = torch.Generator().manual_seed(0)
    low = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    ol, orf = _build(low, preset), _build(ref, preset)
    for _ in range(4):
        for p, r, s in zip(low, ref, SHAPES):
            g = torch.randn(s, generator=gen).to(dtype)
            p.grad, r.grad = g.clone(), g.float()
            r.data.copy_(p.data.float())
        before = [p.detach().clone() for p in low]
        ol.step()
        orf.step()
        for p, r, b in zip(low, ref, before):
            assert p.dtype == dtype and torch.isfinite(p).all()
            expected = r.detach().to(dtype)
            assert ((p.detach().float() - r.detach()).abs() <= _ulp(expected) + _ulp(b)).all()
    for p in low:
        for key, v in ol.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32, key


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon", "kl_shampoo", "pro_soap"])
def test_mixed_float32_and_bfloat16_params_equal_separate_optimizers(preset):
    """One optimizer over float32 and bfloat16 parameters steps each exactly as an optimizer of its dtype alone."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(12, 8), (12, 8), (8,), (8,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    mixed = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in zip(shapes, dtypes)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in mixed]
    om = _build(mixed, preset)
    o32, o16 = _build([alone[0], alone[2]], preset), _build([alone[1], alone[3]], preset)
    for _ in range(4):
        for p, q, s, d in zip(mixed, alone, shapes, dtypes):
            g = torch.randn(s, generator=gen).to(d)
            p.grad, q.grad = g.clone(), g.clone()
        om.step()
        o32.step()
        o16.step()
    for p, q in zip(mixed, alone):
        assert torch.equal(p, q)


@pytest.mark.parametrize("scale", [6e4, 1e-6])
@pytest.mark.parametrize("preset", ["adamw", "soap", "dykaf", "kl_shampoo"])
def test_float16_params_survive_the_edges_of_float16s_range(preset, scale):
    """Gradients near float16's largest value, or far below 1, must not overflow or underflow into NaN:
    the factors and moments live in float32; nothing is skipped."""
    gen = torch.Generator().manual_seed(2)
    low = [torch.nn.Parameter(torch.randn(s, generator=gen).half()) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    ol, orf = _build(low, preset), _build(ref, preset)
    for _ in range(3):
        for p, r, s in zip(low, ref, SHAPES):
            g = (torch.randn(s, generator=gen).clamp(-1, 1) * scale).half()
            p.grad, r.grad = g, g.float()
            r.data.copy_(p.data.float())
        ol.step()
        orf.step()
        for p, r in zip(low, ref):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p.float(), r.detach(), rtol=2e-3, atol=2e-3)
    assert all(v == 0 for v in ol.nonfinite_counts().values())


def _scaler_run(make_opt, *, use_scaler: bool, bad=(2,), steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    ps = list(model.parameters())
    opt = make_opt(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    scales = []
    for t in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if use_scaler:
            scaler.scale(loss).backward()
            if t in bad:
                ps[0].grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            loss.backward()
            if t in bad:
                continue
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
    return [p.detach().clone() for p in ps], opt, scales


def _kron(preset):
    def make(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return kronopt.build(model.named_parameters(), preset)
    return make


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="no torch.amp.GradScaler")
def test_adamw_preset_under_grad_scaler_equals_torch_adamw_under_grad_scaler():
    """Same trajectory and loss scales as torch.optim.AdamW with the same scaler, an inf step skipped by both."""
    ours, opt, s1 = _scaler_run(_kron("adamw"), use_scaler=True)
    theirs, _, s2 = _scaler_run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, fused=True), use_scaler=True)
    assert s1 == s2 and s1[2] == s1[1] / 2  # the inf step (call 2) halved the scale in both
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert all(v == 0 for v in opt.nonfinite_counts().values())  # the scaler skipped; kronopt never saw the inf


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="no torch.amp.GradScaler")
@pytest.mark.parametrize("preset", ["soap", "muon", "kl_shampoo", "dykaf", "pro_kl_shampoo"])
def test_grad_scaler_skip_equals_leaving_the_step_out(preset):
    """Scaled (by powers of two) and unscaled gradients are exact, so a scaler run whose inf step is skipped
    equals an unscaled run that never calls step() there: no state, counter or parameter moved."""
    a, _, _ = _scaler_run(_kron(preset), use_scaler=True)
    b, _, _ = _scaler_run(_kron(preset), use_scaler=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_grad_dtype
def test_bfloat16_gradients_on_float32_params_match_their_float32_upcast():
    """A bfloat16 gradient on a float32 parameter (``grad_dtype = None``) steps as its exact float32 upcast,
    up to the rounding of the general path (the fast AdamW path is bypassed for such a gradient)."""
    gen = torch.Generator().manual_seed(3)
    for preset in ["adamw", "soap", "muon"]:
        a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        for p in a:
            p.grad_dtype = None
        oa, ob = _build(a, preset), _build(b, preset)
        for _ in range(3):
            for p, q, s in zip(a, b, SHAPES):
                g = torch.randn(s, generator=gen).to(torch.bfloat16)
                p.grad, q.grad = g.clone(), g.float()
            oa.step()
            ob.step()
        for p, q in zip(a, b):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
