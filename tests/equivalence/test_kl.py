"""The kl_shampoo, kl_soap and pro_kl_shampoo presets against float64 references written from the specs."""

import pytest
import torch

import kronopt
import tests.reference.kl_shampoo as kl_ref
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.kl_shampoo import kl_reference

SHAPES = [(6, 4), (4, 6), (5, 5), (6, 4), (3, 7)]


pytestmark = pytest.mark.usefixtures("one_thread")






def _named(params):
    return [(f"blocks.{i}.weight", p) for i, p in enumerate(params)]




KEYMAP = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "precondition_frequency": "refresh.every",
    "normalize_grads": "post.normalize",
    "shampoo_beta": "factors.beta",
    "init_factor": "factors.init_factor",
    "using_clamping": "factors.clamping",
    "max_clamp_value": "factors.max_clamp",
    "max_precond_dim": "shapes.max_dim",
}

OPTIONS = [
    {},
    {"precondition_frequency": 3, "weight_decay": 0.1, "lr": 1e-2},
    {"normalize_grads": True, "precondition_frequency": 4, "lr": 1e-3},
    {"betas": (0.8, 0.9), "shampoo_beta": 0.7, "precondition_frequency": 5, "init_factor": 1.0, "eps": 1e-3},
    {"using_damping": True, "eps": 1e-2, "precondition_frequency": 2},
    {"max_precond_dim": 5, "precondition_frequency": 2},
]


def _overrides(options, klsoap):
    out = {}
    for k, v in options.items():
        if k in KEYMAP:
            out[KEYMAP[k]] = v
    betas = options.get("betas", (0.9, 0.98))
    eps = options.get("eps", 1e-8)
    if "shampoo_beta" not in options:
        out["factors.beta"] = betas[1]
    out["factors.damping"] = eps if options.get("using_damping") else 0.0
    if klsoap:
        out["inner.betas"] = list(betas)
        out["inner.eps"] = eps
    else:
        out["inner.momentum"] = betas[0]
        out["inner.eps"] = eps
    return out


@pytest.mark.parametrize("klsoap", [False, True], ids=["kl_shampoo", "kl_soap"])
@pytest.mark.parametrize("options", OPTIONS)
def test_kl_presets_match_reference(gen, options, klsoap):
    options = {"lr": 1e-4, **options}  # the reference's lr; the presets' defaults are tuned
    steps = 60
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps)
    ref = kl_reference(params, grads, using_klsoap=klsoap, **options)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(_named(ours_params), "kl_soap" if klsoap else "kl_shampoo", **_overrides(options, klsoap))
    ours = run_history(opt, ours_params, grads)
    assert not torch.equal(ours[-1][0], params[0])
    assert_histories_close(ours, ref)


#: the clamp cases (test_kl_clamp_options_bind_and_match_reference): a side of 12 above the clamp's floor of 10, so
#: max_clamp_value = 11 gives c = max(10, min(12, 11)) = 11 there (12 by default) and 10 on the sides of 4–6;
#: gradients of size 5e-3 drive λ below 1/c² on many directions, so the clamp binds
CLAMP_SHAPES = [(12, 4), (4, 12), (6, 5)]
CLAMP_OPTIONS = [
    pytest.param({"max_clamp_value": 11.0, "init_factor": 0.01, "precondition_frequency": 3}, id="max-clamp-11"),
    pytest.param({"max_clamp_value": 2.0, "init_factor": 0.01, "precondition_frequency": 3}, id="max-clamp-2-floors-at-10"),
    pytest.param({"using_clamping": False, "init_factor": 0.01, "precondition_frequency": 6}, id="unclamped"),
]


@pytest.mark.parametrize("klsoap", [False, True], ids=["kl_shampoo", "kl_soap"])
@pytest.mark.parametrize("options", CLAMP_OPTIONS)
def test_kl_clamp_options_bind_and_match_reference(monkeypatch, gen, options, klsoap):
    """The clamping options where the clamp binds: the reference's root λ^{-1/2} exceeds its clamp c on some
    updates (c by hand: 11 on a side of 12 with max_clamp_value = 11, 10 everywhere else, including under
    max_clamp_value = 2, whose c is floored at 10), or, unclamped, exceeds even the largest clamp a side here could
    have (12); and the presets follow the reference step for step. A clamp left out, its ceiling taken from
    max_clamp alone or from the side alone, or clamping that cannot be turned off, each fails."""
    roots = []  # (root before the clamp, the clamp) of every tracked-root update of the reference
    new_root = kl_ref._new_root

    def recording(s_old, d, rho, clamp):
        roots.append((new_root(s_old, d, rho, None), clamp))
        return new_root(s_old, d, rho, clamp)

    monkeypatch.setattr(kl_ref, "_new_root", recording)
    options = {"lr": 1e-4, **options}
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in CLAMP_SHAPES]
    grads = [[5e-3 * g for g in call] for call in reference_grads(gen, CLAMP_SHAPES, 60)]
    ref = kl_reference(params, grads, using_klsoap=klsoap, **options)
    if options.get("using_clamping", True):
        ceilings = {10.0, 11.0} if options["max_clamp_value"] == 11.0 else {10.0}
        assert {c for _, c in roots} == ceilings
        for c in ceilings:  # the clamp binds on the sides of each ceiling, not on every update
            bound = [raw > c for raw, cc in roots if cc == c]
            assert any(bound) and not all(bound), (c, sum(bound), len(bound))
    else:
        assert {c for _, c in roots} == {None}
        assert any(raw > 12.0 for raw, _ in roots)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(_named(ours_params), "kl_soap" if klsoap else "kl_shampoo", **_overrides(options, klsoap))
    ours = run_history(opt, ours_params, grads)
    assert not torch.equal(ours[-1][0], params[0])
    assert_histories_close(ours, ref)


def test_kl_first_call_leaves_parameters_untouched_and_sets_init_roots(gen):
    """kl_shampoo.md §12 test 6: W unchanged, s = init_factor^{-1/2}."""
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    before = [p.detach().clone() for p in params]
    opt = kronopt.build(_named(params), "kl_shampoo", weight_decay=0.5, **{"factors.init_factor": 0.25})
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for bucket in opt._buckets:
        f = bucket.state.factors
        assert torch.equal(f.s_L, torch.full_like(f.s_L, 2.0)) and torch.equal(f.s_R, torch.full_like(f.s_R, 2.0))
        assert bucket.state.basis.ready


def test_kl_presets_route_vectors_embeddings_and_head_to_adamw(gen):
    """kl_shampoo.md §8: 1-D parameters, embeddings and the head take torch.optim.AdamW's step."""
    for preset in ("kl_shampoo", "kl_soap", "pro_kl_shampoo"):
        shapes = {"embed.weight": (7, 5), "blocks.0.weight": (5, 5), "blocks.0.bias": (5,), "lm_head.weight": (7, 5)}
        ours = {k: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for k, s in shapes.items()}
        theirs = {k: torch.nn.Parameter(v.detach().clone()) for k, v in ours.items()}
        opt = kronopt.build(list(ours.items()), preset)
        fb = opt.config.fallback
        ref = torch.optim.AdamW(
            [theirs[k] for k in ("embed.weight", "blocks.0.bias", "lm_head.weight")],
            lr=fb.lr, betas=fb.inner.betas, eps=fb.inner.eps, weight_decay=fb.weight_decay,
        )
        for _ in range(5):
            for k in shapes:
                g = torch.randn(shapes[k], generator=gen, dtype=torch.float64)
                ours[k].grad, theirs[k].grad = g, g.clone()
            opt.step()
            ref.step()
        for k in ("embed.weight", "blocks.0.bias", "lm_head.weight"):
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-12, atol=1e-14)
        assert not torch.equal(ours["blocks.0.weight"], theirs["blocks.0.weight"])


@pytest.mark.parametrize("klsoap", [False, True], ids=["kl_shampoo", "kl_soap"])
@pytest.mark.parametrize("options", [{}, {"precondition_frequency": 3, "lr": 1e-2}])
def test_kl_presets_with_bfloat16_gram_products_match_the_reference_rounding_them(gen, options, klsoap):
    """``factors.product_dtype = "bfloat16"``: the reference rounds the Gram operand ``G Q_R diag(s_R)`` and the
    product by hand. On shapes whose sides take that operand (no side more than twice as long as the other: the
    sandwich form rounds another Gram product, tested in tests/unit/test_product_dtype.py)."""
    shapes = [(6, 4), (4, 6), (5, 5), (7, 4)]
    options = {"lr": 1e-4, **options}
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = reference_grads(gen, shapes, 40)
    ref = kl_reference(params, grads, using_klsoap=klsoap, grams="bfloat16", **options)
    exact = kl_reference(params, grads, using_klsoap=klsoap, **options)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    overrides = _overrides(options, klsoap) | {"factors.product_dtype": "bfloat16"}
    opt = kronopt.build(_named(ours_params), "kl_soap" if klsoap else "kl_shampoo", **overrides)
    ours = run_history(opt, ours_params, grads)
    assert_histories_close(ours, ref)
    apart = max((a - b).abs().max().item() for a_k, b_k in zip(ours, exact) for a, b in zip(a_k, b_k))
    assert apart > 1e-8
