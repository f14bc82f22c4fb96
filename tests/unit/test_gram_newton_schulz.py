"""Newton–Schulz on the Gram matrix (``ns_form = "gram"``): the polynomial of the standard form, fewer
multiply-adds where a block's long side exceeds 1.5 times its short one, and wired through the orthogonalize
inner rule, Muon's CPU path and Pro-KLShampoo's complement."""

import collections

import attrs
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronopt
from kronopt import compiled, linalg
from tests.strategies import generator

pytestmark = pytest.mark.usefixtures("one_thread")

KJ = linalg.ns_schedule("kj", 5)


def _polynomial_of_singular_values(U: torch.Tensor, coefficients, eps: float = 1e-7) -> torch.Tensor:
    """The iteration's definition, independently: the composed scalar quintic applied to the singular values of
    ``U / max(‖U‖_F, eps)`` (float64, through an SVD)."""
    P, S, Vh = torch.linalg.svd(U, full_matrices=False)
    x = S / torch.linalg.matrix_norm(U).clamp(min=eps).unsqueeze(-1)
    for a, b, c in coefficients:
        x = a * x + b * x**3 + c * x**5
    return P @ torch.diag_embed(x) @ Vh


@pytest.mark.parametrize("shape", [(3, 12, 40), (3, 40, 12), (2, 16, 25), (1, 7, 64)])
@pytest.mark.parametrize("restarts", [(), (2,), (1, 3), (1, 2, 3, 4)])
@pytest.mark.parametrize("schedule", ["kj", "polar_express"])
def test_the_gram_form_is_the_composed_polynomial_in_float64(shape, restarts, schedule):
    coefficients = linalg.ns_schedule(schedule, 5)
    U = torch.randn(*shape, generator=generator(sum(shape)), dtype=torch.float64)
    assert linalg.gram_pays(*shape[-2:], 5, restarts) or len(restarts) > 1
    # the Gram iteration itself, whether or not it pays on this shape
    X = U / torch.linalg.matrix_norm(U, keepdim=True)
    got = linalg._gram_iteration(X, coefficients, restarts, lambda t: t)
    want = _polynomial_of_singular_values(U, coefficients)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.shape == U.shape and got.is_contiguous()


def test_the_gram_form_falls_back_to_the_standard_form_where_it_does_not_pay():
    for shape in [(2, 30, 30), (2, 30, 44), (2, 45, 30)]:  # long side at most 1.5 times the short one
        U = torch.randn(*shape, generator=generator(1))
        assert not linalg.gram_pays(*shape[-2:], 5, (2,))
        a = linalg.newton_schulz(U, KJ, dtype=torch.float32)
        b = linalg.newton_schulz(U, KJ, dtype=torch.float32, form="gram")
        assert torch.equal(a, b)


class _MultiplyAdds(TorchDispatchMode):
    """Counts the multiply-adds of the batched products that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name == "bmm":
            self.count += out.numel() * args[0].shape[-1]
        elif name == "baddbmm":
            self.count += out.numel() * args[1].shape[-1]
        return out


@pytest.mark.parametrize("m, n", [(8, 8), (8, 12), (8, 13), (12, 8), (13, 8), (8, 40), (30, 10), (1, 9)])
@pytest.mark.parametrize("restarts", [(), (2,), (1, 2, 3, 4)])
def test_gram_pays_is_the_comparison_of_the_products_each_form_runs(m, n, restarts):
    U = torch.randn(1, m, n, generator=generator(m * n), dtype=torch.float64)
    counts = {}
    for form in ("standard", "gram"):
        X = U / torch.linalg.matrix_norm(U, keepdim=True)
        with _MultiplyAdds() as mode:
            if form == "gram":
                linalg._gram_iteration(X, KJ, restarts, lambda t: t)
            else:
                linalg.newton_schulz(X, KJ, dtype=torch.float64)
        counts[form] = mode.count
    s, long = sorted((m, n))
    assert counts["standard"] == 5 * (2 * s * s * long + s**3)
    assert linalg.gram_pays(m, n, 5, restarts) == (counts["gram"] < counts["standard"])


def _block(shape, floor: float, rank: int | None = None) -> torch.Tensor:
    """A stack of blocks with singular values spaced evenly in log from 1 down to ``10**floor`` (a momentum's
    decaying spectrum), ``rank`` of them (all by default)."""
    g = generator(7)
    k = rank or min(shape[-2:])
    P = torch.linalg.qr(torch.randn(shape[0], shape[-2], k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(shape[0], shape[-1], k, generator=g, dtype=torch.float64)).Q
    return (P * torch.logspace(0, floor, k, dtype=torch.float64)) @ V.mT


@pytest.mark.parametrize("shape", [(4, 64, 256), (4, 256, 64), (2, 96, 160)])
@pytest.mark.parametrize("floor", [-1, -3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [None, 10])
def test_low_precision_gram_form_stays_within_a_few_times_the_standard_forms_rounding(shape, floor, dtype, rank):
    """Squaring the block squares its condition: the Gram form's result is further from the polynomial than
    the standard form's in the same dtype (measured here: 1.4–3 times, 0.02–0.17 of the norm in bfloat16 and
    0.003–0.02 in float16 on full-rank blocks), and its restart keeps a rank-deficient block's drifting Gram
    matrix from blowing up (without one: 2.7 times the norm on a 768 × 256 block of rank 10)."""
    U = _block(shape, floor, rank)
    want = _polynomial_of_singular_values(U, KJ)
    errors = {}
    for form in ("standard", "gram"):
        got = linalg.newton_schulz(U.float(), KJ, dtype=dtype, form=form)
        assert got.dtype == dtype and torch.isfinite(got).all()
        errors[form] = (torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want)).max().item()
    assert errors["gram"] < 3.5 * errors["standard"]


@pytest.mark.parametrize(
    "restarts, message",
    [((0,), "lie in [1, 5)"), ((5,), "lie in [1, 5)"), ((2, 7), "lie in [1, 5)"), ((2.0,), "integers"),
     ((True,), "integers"), ("sometimes", "'auto' or a list"), ((), "leave 5 iterations without a restart"),
     ((1,), "leave 4 iterations")],
)
def test_restart_plans_that_do_not_fit_are_refused(restarts, message):
    U = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        linalg.newton_schulz(U, KJ, form="gram", restarts=restarts)
    with pytest.raises(ValueError, match="form must be one of"):
        linalg.newton_schulz(U, KJ, form="gramm")


@pytest.mark.parametrize(
    "steps, plan",
    [(1, ()), (3, ()), (4, (2,)), (5, (2,)), (6, (3,)), (7, (2, 4)), (8, (2, 5)), (9, (3, 6)), (10, (2, 4, 7)), (99, None)],
)
def test_the_automatic_plan_restarts_least_often_with_no_stretch_over_three(steps, plan):
    got = linalg.ns_restarts("auto", steps)
    if plan is not None:
        assert got == plan
    edges = (0, *got, steps)
    stretches = [b - a for a, b in zip(edges[:-1], edges[1:])]
    assert max(stretches) <= linalg.GRAM_SEGMENT_MAX == 3
    assert len(stretches) == -(-steps // 3) and stretches == sorted(stretches)
    assert linalg.ns_restarts([3, 1, 3], 5) == (1, 3)


@pytest.mark.parametrize(
    "preset, overrides, key",
    [
        ("muon", {"inner.ns_form": "gram", "inner.ns_restarts": [5]}, "inner: ns_restarts (ns_form = 'gram')"),
        ("muon", {"inner.ns_form": "gram", "inner.steps": 7, "inner.ns_restarts": [2]}, "inner: ns_restarts (ns_form = 'gram')"),
        ("muon", {"inner.ns_form": "fast"}, "inner.ns_form"),
        ("muon", {"inner.ns_restarts": ["2"]}, "inner.ns_restarts"),
        ("pro_kl_shampoo", {"split.ns_form": "gram", "split.ns_restarts": [0]}, "split: ns_restarts (ns_form = 'gram')"),
        ("pro_kl_shampoo", {"split.ns_form": "faster"}, "split.ns_form"),
    ],
)
def test_invalid_gram_options_fail_when_the_config_is_resolved(preset, overrides, key):
    with pytest.raises(kronopt.ConfigError) as exc:
        kronopt.resolve(preset, **overrides)
    assert key in str(exc.value)


def test_restarts_are_checked_only_for_the_gram_form():
    cfg = kronopt.resolve("muon", **{"inner.steps": 7, "inner.ns_restarts": [2]})  # would leave 5 iterations in a row
    assert cfg.inner.ns_form == "standard" and cfg.inner.ns_restarts == (2,)
    assert kronopt.resolve("muon", **{"inner.ns_form": "gram", "inner.steps": 7}).inner.ns_restarts == "auto"


@pytest.mark.parametrize("shape", [(4, 64, 256), (4, 256, 64), (2, 8, 40), (3, 40, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gram_form_in_kept_buffers_is_the_functional_form_and_allocates_once(shape, dtype):
    """With ``buffers`` (Muon's CPU path keeps them) the Gram form writes every result into the dict's tensors:
    the same bits as the functional form (its results new tensors, taken where autograd tracks the input), and
    a second call reuses the first call's memory. The small stacks take the emulated bfloat16 arithmetic, each
    result rounded in place there and into a new tensor in the functional form."""
    U = torch.randn(*shape, generator=generator(5))
    functional = linalg.newton_schulz(U.clone().requires_grad_(), KJ, dtype=dtype, form="gram").detach()
    kept: dict[str, torch.Tensor] = {}
    first = linalg.newton_schulz(U, KJ, dtype=dtype, form="gram", buffers=kept)
    assert torch.equal(first, functional) and first.dtype == dtype
    assert {"Q0", "Q1", "RP"} <= set(kept)  # the Gram form's own, beside the iterates and the Gram matrix
    memory = {name: t.data_ptr() for name, t in kept.items()}
    again = linalg.newton_schulz(U, KJ, dtype=dtype, form="gram", buffers=kept)
    assert torch.equal(again, functional)
    assert {name: t.data_ptr() for name, t in kept.items()} == memory
    assert any(again.data_ptr() == t.data_ptr() for t in kept.values())  # the result is one of them


def _step_weights(preset: str, overrides: dict, shapes, steps: int = 3) -> list[torch.Tensor]:
    g = generator(11)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]
    cfg = attrs.evolve(kronopt.resolve(preset, **overrides), lr=0.05)
    opt = kronopt.KronOptimizer([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], cfg)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "preset, prefix, shapes",
    [
        ("muon", "inner", [(16, 48), (48, 16), (16, 48)]),
        ("pro_kl_shampoo", "split", [(12, 40), (40, 12)]),
    ],
)
def test_the_stages_hand_the_form_to_the_iteration(preset, prefix, shapes):
    """In float64 arithmetic the two forms step the same weights (to rounding); in bfloat16 they round
    otherwise, so the option reaches the iteration (the Muon preset's blocks take its CPU path)."""
    exact = {f"{prefix}.ns_dtype": "float64"}
    a = _step_weights(preset, exact, shapes)
    b = _step_weights(preset, {**exact, f"{prefix}.ns_form": "gram"}, shapes)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-9)
    c = _step_weights(preset, {}, shapes)
    d = _step_weights(preset, {f"{prefix}.ns_form": "gram"}, shapes)
    assert any(not torch.equal(x, y) for x, y in zip(c, d))
    for x, y in zip(c, d):  # other roundings of one step, not another step
        torch.testing.assert_close(x, y, rtol=0, atol=0.05 * 0.05 * 3)


def test_the_compiled_twin_receives_the_form(monkeypatch):
    seen = collections.defaultdict(list)

    def twin(U, coefficients, **kwargs):
        seen["kwargs"].append(kwargs)
        return U

    monkeypatch.setattr(compiled, "variant", lambda name: twin if name == "newton_schulz" else None)
    linalg.newton_schulz(torch.randn(1, 4, 16), KJ, form="gram", restarts=[3])
    assert seen["kwargs"] == [{"eps": 1e-7, "dtype": torch.bfloat16, "norm": "clamp", "form": "gram", "restarts": (3,)}]
