"""Configurations that reduce to torch.optim: AdamW exactly (float64), Muon (float32, bf16 NS)."""

import pytest
import torch

import kronopt


def _params(gen, shapes, dtype):
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _run_pair(ours, ref, params_a, params_b, gen, steps, dtype):
    for _ in range(steps):
        for pa, pb in zip(params_a, params_b):
            g = torch.randn(pa.shape, generator=gen, dtype=dtype)
            pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        ref.step()


@pytest.mark.parametrize("wd", [0.0, 0.01, 0.3])
def test_adamw_preset_equals_torch_adamw_float64(gen, wd):
    shapes = [(7, 5), (5, 7), (6,), (3, 2, 2, 2), ()]
    a = _params(gen, shapes, torch.float64)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = kronopt.build(a, "adamw", weight_decay=wd, lr=3e-3)
    ref = torch.optim.AdamW(b, lr=3e-3, weight_decay=wd)
    _run_pair(ours, ref, a, b, gen, 40, torch.float64)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


def test_identity_adam_equals_torch_adamw_with_scheduler_and_groups(gen):
    a = _params(gen, [(4, 3), (3,)], torch.float64)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = kronopt.build(
        [{"params": [a[0]], "lr": 1e-2}, {"params": [a[1]], "weight_decay": 0.5, "inner.betas": [0.8, 0.9]}], "adamw"
    )
    ref = torch.optim.AdamW(
        [{"params": [b[0]], "lr": 1e-2}, {"params": [b[1]], "weight_decay": 0.5, "betas": (0.8, 0.9)}], lr=1e-3
    )
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    for _ in range(12):
        _run_pair(ours, ref, a, b, gen, 1, torch.float64)
        s1.step()
        s2.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_preset_equals_torch_muon(gen, adjust, nesterov):
    shapes = [(16, 8), (8, 16), (12, 12), (16, 8)]
    a = _params(gen, shapes, torch.float32)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = kronopt.build(a, "muon", lr=1e-3, **{"inner.scale": adjust, "inner.nesterov": nesterov})  # torch's lr
    ref = torch.optim.Muon(b, adjust_lr_fn=adjust, nesterov=nesterov)
    _run_pair(ours, ref, a, b, gen, 50, torch.float32)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-5)


def test_muon_routes_vectors_and_named_embeddings_to_adamw(gen):
    emb = torch.nn.Parameter(torch.randn(10, 4, generator=gen))
    w = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    bias = torch.nn.Parameter(torch.randn(4, generator=gen))
    head = torch.nn.Parameter(torch.randn(10, 4, generator=gen))
    named = [("tok.embed.weight", emb), ("layers.0.w", w), ("layers.0.b", bias), ("lm_head.weight", head)]
    opt = kronopt.build(named, "muon")
    routed = {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]}
    assert routed == {
        "tok.embed.weight": "fallback",
        "layers.0.w": "main",
        "layers.0.b": "fallback",
        "lm_head.weight": "fallback",
    }
    fallback = next(g for g in opt.param_groups if g["pipeline"] == "fallback")
    assert fallback["lr"] == 9e-3 and fallback["weight_decay"] == 0.0

    # the fallback is torch.optim.AdamW with the fallback's hyperparameters
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in (emb, bias, head)]
    ref = torch.optim.AdamW(ref_params, lr=9e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    for _ in range(5):
        for p, q in zip((emb, bias, head), ref_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
        ref.step()
    for p, q in zip((emb, bias, head), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_muon_on_a_conv_kernel_equals_torch_muon_on_its_flattened_matrix(gen):
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=gen))
    flat = torch.nn.Parameter(conv.detach().reshape(8, 27).clone())
    ours = kronopt.build([("conv.weight", conv)], "muon", lr=1e-3)
    ref = torch.optim.Muon([flat])
    for _ in range(20):
        g = torch.randn(8, 3, 3, 3, generator=gen)
        conv.grad, flat.grad = g.clone(), g.reshape(8, 27).clone()
        ours.step()
        ref.step()
    assert conv.shape == (8, 3, 3, 3)
    torch.testing.assert_close(conv.detach().reshape(8, 27), flat.detach(), rtol=2e-5, atol=2e-5)
