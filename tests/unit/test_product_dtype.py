"""A factor estimator's ``product_dtype = "bfloat16"``: the EMA's Gram products with bfloat16 operands and results.

The expected values round by hand, in float64 (``_rounded``): the gradient rounded to bfloat16, its Gram product
summed exactly and rounded to bfloat16, then weighted and added to ``β X`` in the factor's dtype. The emulated form
(the block's own kernels on rounded values: float64 blocks, a CPU without fast bfloat16 products, small products)
gives those values but for a sum's last bits; the bfloat16 kernels sum in float32 and round once, so an entry whose
sum lies within its rounding of a bfloat16 boundary may round the other way: they are compared by how far they lie
from the hand-rounded value against how far the float32 update lies from it.
"""

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt.config import ConfigError
from tests.unit.test_rotation_dtype import _run  # a preset's run on given weights and gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def _rounded(X):
    return X.to(torch.bfloat16).to(torch.float64)


def _sym_psd(gen, b, d, dtype=torch.float64):
    B = torch.randn(b, d, d + 3, generator=gen, dtype=torch.float64)
    return linalg.sym(B @ B.mT).to(dtype)


def _by_hand(X, A, beta, alpha):
    """β X + α round(round(A) round(A)ᵀ), in float64, symmetrised as kronopt does (exact halving)."""
    A_ = _rounded(A.double())
    new = beta * X.double() + alpha * _rounded(A_ @ A_.mT)
    return (new + new.mT) / 2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SIDES = [(3, 40, 24), (2, 24, 56), (2, 520, 24)]  # dense, wide, and tiled on a CPU (a short last row of tiles)


@pytest.mark.parametrize("shape", SIDES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_block", [False, True], ids=["number-beta", "per-block-beta"])
def test_the_emulated_form_rounds_the_operand_and_every_result(gen, shape, per_block):
    b, m, k = shape
    X, A = _sym_psd(gen, b, m), torch.randn(b, m, k, generator=gen, dtype=torch.float64)
    beta = torch.tensor([0.9, 0.5, 0.7][:b], dtype=torch.float64).view(b, 1, 1) if per_block else 0.9
    narrow = linalg.NarrowProducts.of_gram(A, torch.bfloat16)
    assert narrow is not None and narrow.emulated  # float64: the block's own kernels
    ours = linalg._narrow_gram_update(X, A, beta, 0.1, narrow)
    exact = linalg.sym_product(X, A, A, beta=beta, alpha=0.1)
    assert ours.dtype == torch.float64 and torch.equal(ours, ours.mT)
    torch.testing.assert_close(ours, _by_hand(X, A, beta, 0.1), rtol=1e-10, atol=1e-10)
    increment = (exact - X * beta).norm()
    assert 1e-4 < ((ours - exact).norm() / increment).item() < 2e-2  # bfloat16's precision off the exact update


@pytest.mark.parametrize("shape", SIDES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("emulated", [True, False], ids=["emulated", "kernels"])
def test_float32_factors_round_as_by_hand_in_either_form(gen, shape, emulated, monkeypatch):
    monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work: emulated)
    b, m, k = shape
    X, A = _sym_psd(gen, b, m, torch.float32), torch.randn(b, m, k, generator=gen)
    ours = linalg.accumulate_gram_left(X, A, 0.9, 0.1, dtype=torch.bfloat16)
    exact = linalg.accumulate_gram_left(X, A, 0.9, 0.1)
    assert ours.dtype == torch.float32 and torch.equal(ours, ours.mT)
    by_hand = _by_hand(X, A, 0.9, 0.1)
    # the increment's rounding is what separates the two; a float32 sum tips a bfloat16 rounding now and then
    assert _rel(ours - 0.9 * X, by_hand - 0.9 * X.double()) < 0.1 * _rel(exact - 0.9 * X, by_hand - 0.9 * X.double())


def test_the_right_side_rounds_the_transposed_product(gen):
    A = torch.randn(2, 30, 12, generator=gen, dtype=torch.float64)
    X = _sym_psd(gen, 2, 12)
    ours = linalg.accumulate_gram_right(X, A, 0.8, 0.2, dtype=torch.bfloat16)
    torch.testing.assert_close(ours, _by_hand(X, A.mT, 0.8, 0.2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [40, 600], ids=["dense", "tiled"])
def test_the_sandwich_rounds_its_gram_product(gen, k):
    """KL's update of a block's short side, ``β X + α Q (Y Yᵀ) Qᵀ``: the Gram product of ``Y`` narrowed (its operand
    and result rounded), the congruence by ``Q`` in the factor's dtype."""
    Q, _ = torch.linalg.qr(torch.randn(2, 12, 12, generator=gen, dtype=torch.float64))
    X, Y = _sym_psd(gen, 2, 12), torch.randn(2, 12, k, generator=gen, dtype=torch.float64)
    ours = linalg.accumulate_sandwich(X, Q, Y, 0.9, 0.1, dtype=torch.bfloat16)
    Y_ = _rounded(Y)
    new = 0.9 * X + 0.1 * Q @ _rounded(Y_ @ Y_.mT) @ Q.mT
    assert torch.equal(ours, ours.mT)
    torch.testing.assert_close(ours, (new + new.mT) / 2, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, linalg.accumulate_sandwich(X, Q, Y, 0.9, 0.1), rtol=1e-5, atol=0)


def test_a_zero_beta_never_reads_the_factor(gen):
    A = torch.randn(2, 20, 9, generator=gen, dtype=torch.float64)
    X = torch.full((2, 20, 20), float("nan"), dtype=torch.float64)
    ours = linalg._narrow_gram_update(X, A, 0.0, 1.0, linalg.NarrowProducts.of_gram(A, torch.bfloat16))
    torch.testing.assert_close(ours, _by_hand(torch.zeros_like(X), A, 0.0, 1.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", [200, 520], ids=["dense", "tiled"])
def test_the_deferred_write_gives_the_bits_of_the_update_made_in_the_step(gen, side, monkeypatch):
    monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work: False)
    X, A = _sym_psd(gen, 2, side, torch.float32), torch.randn(2, side, 16, generator=gen)
    made = linalg.accumulate_gram_left(X, A, 0.95, 0.05, dtype=torch.bfloat16)
    defer: list = []
    assert linalg.accumulate_gram_left(X, A, 0.95, 0.05, defer=defer, dtype=torch.bfloat16) is X
    assert len(defer) == 1
    defer[0].into(X)
    assert torch.equal(X, made)


def test_the_finiteness_bound_covers_the_roundings(gen):
    """The proof's bound on the new entries widens by two units of bfloat16's rounding (the operand and the result each
    round up by at most half a unit, so a bound without it could sit under an entry the narrow update makes) and
    covers the unweighted product, rounded before its weight."""
    X, A = _sym_psd(gen, 2, 16, torch.float32), torch.randn(2, 16, 8, generator=gen)
    narrow = linalg.gram_update_bound(X, A, 0.9, 0.1, narrow=torch.bfloat16)
    # written out: the unweighted product's bound ‖A‖² too (it is rounded before its weight), both times the
    # float32 sums' slack (k + 8 units) and two units of bfloat16's
    entries, energy = X.abs().amax((-2, -1)).double(), A.double().square().sum((-2, -1))
    slack = (1 + 16 * torch.finfo(torch.float32).eps) * (1 + 2**-6)
    expected = torch.maximum(0.9 * entries + 0.1 * energy, energy) * slack
    torch.testing.assert_close(narrow.double(), expected, rtol=1e-6, atol=0)
    assert (narrow > linalg.gram_update_bound(X, A, 0.9, 0.1)).all()
    made = linalg.accumulate_gram_left(X, A, 0.9, 0.1, dtype=torch.bfloat16)
    assert (made.abs().amax((-2, -1)) <= narrow).all()


def test_many_buckets_together_give_each_buckets_own_bits(gen, monkeypatch):
    monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work: False)
    Xs = [_sym_psd(gen, 2, d, torch.float32) for d in (8, 12, 30)]
    As = [torch.randn(2, d, 5, generator=gen) for d in (8, 12, 30)]
    together = linalg.accumulate_grams_each(Xs, As, 0.9, 0.1, dtype=torch.bfloat16)
    for X, A, got in zip(Xs, As, together):
        assert torch.equal(got, linalg.accumulate_gram_left(X, A, 0.9, 0.1, dtype=torch.bfloat16))
        assert not torch.equal(got, linalg.accumulate_gram_left(X, A, 0.9, 0.1))


@pytest.mark.parametrize("preset", ["soap", "shampoo", "pro_soap", "kl_shampoo", "kl_soap"])
@pytest.mark.parametrize("small_together", [True, False], ids=["small-buckets-together", "bucket-by-bucket"])
def test_every_preset_keeps_its_factors_near_the_float32_ones(gen, preset, small_together, monkeypatch):
    """The same gradients with the Gram products in bfloat16 leave each full side's factor near the float32 run's
    (an EMA's increments each a few parts in a thousand off; KL's carry it on through the bases and the tracked
    roots they feed, to a percent or two) and not within float32's rounding of it: the option acts, and a wrong
    side or a lost weight would put it far off. (The factors are made from the gradients given, whatever path the
    weights took; the weights themselves part by as much as a float32 run parts from a float64 one where a SOAP
    basis follows crowded eigenvalues. The references' tests pin the values: tests/equivalence.)"""
    if not small_together:
        monkeypatch.setattr(kronopt.optimizer, "_SMALL_TOGETHER_MAX", 0)
    ws = [torch.randn(24, 40, generator=gen), torch.randn(40, 24, generator=gen), torch.randn(8, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(14)]
    exact, plain = _run(preset, ws, grads)
    narrow, opt = _run(preset, ws, grads, **{"factors.product_dtype": "bfloat16"})
    assert opt.config.factors.product_dtype == "bfloat16"
    compared = 0
    for p, q in zip(plain.param_groups[0]["params"][:2], opt.param_groups[0]["params"][:2]):
        for key in ("factors.L", "factors.R"):
            if key in plain.state[p]:
                assert 1e-5 < _rel(opt.state[q][key], plain.state[p][key]) < 5e-2
                compared += 1
    assert compared == (2 if preset == "pro_soap" else 4)
    assert all(torch.isfinite(w).all() for w in narrow)
    assert torch.equal(exact[2], narrow[2])  # a vector keeps no factors: nothing narrowed


def test_pro_kl_shampoos_full_side_beside_its_restricted_one_keeps_the_compute_dtype(gen):
    """Its full side's update sums two Gram products at once (the subspace's and the complement's), which has no
    narrow form: the option leaves the run as it was, first call included (docs/configs.md)."""
    ws = [torch.randn(24, 64, generator=gen)]
    grads = [[torch.randn(24, 64, generator=gen)] for _ in range(6)]
    plain, _ = _run("pro_kl_shampoo", ws, grads)
    narrow, _ = _run("pro_kl_shampoo", ws, grads, **{"factors.product_dtype": "bfloat16"})
    assert torch.equal(plain[0], narrow[0])


def test_kls_short_side_narrows_its_sandwich(gen, monkeypatch):
    """A block more than twice as long on its other side updates its short side's factor by the sandwich
    ``Q (Ỹ Ỹᵀ) Qᵀ``: under the option that form is asked for bfloat16 Gram products (its values: the unit test of
    ``accumulate_sandwich`` above), on every step after the first."""
    seen = []
    real = linalg.accumulate_sandwich

    def spy(X, Q, Y, beta, alpha, *, dtype=None):
        seen.append(dtype)
        return real(X, Q, Y, beta, alpha, dtype=dtype)

    monkeypatch.setattr(linalg, "accumulate_sandwich", spy)
    ws = [torch.randn(8, 40, generator=gen)]
    grads = [[torch.randn(8, 40, generator=gen)] for _ in range(4)]
    _run("kl_shampoo", ws, grads, **{"factors.product_dtype": "bfloat16"})
    assert seen and all(d == torch.bfloat16 for d in seen)
    seen.clear()
    _run("kl_shampoo", ws, grads)
    assert seen and all(d is None for d in seen)


def test_the_emulated_form_goes_by_a_blocks_work_not_its_stacks(monkeypatch):
    """Eight blocks of 64 × 64 × 64 make 2²¹ multiply-adds together, 2¹⁸ each: the block's count (under the bound)
    decides, so the stack takes the form each block takes alone."""
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: True)
    one, eight = torch.zeros(1, 64, 64), torch.zeros(8, 64, 64)
    assert linalg.NarrowProducts.of_gram(one, torch.bfloat16).emulated
    assert linalg.NarrowProducts.of_gram(eight, torch.bfloat16).emulated
    assert not linalg.NarrowProducts.of_gram(torch.zeros(8, 128, 128), torch.bfloat16).emulated


def _past_bfloat16(m=128, k=4):
    """A gradient one of whose rows has an energy finite in float32 but past bfloat16's largest value."""
    A = torch.zeros(1, m, k)
    A[0, 0, :2] = torch.tensor([1.5 * 2.0**63, 1.3203125 * 2.0**63])
    energy = A.double().square().sum()
    assert torch.finfo(torch.bfloat16).max < energy < torch.finfo(torch.float32).max
    return A


def test_a_product_past_bfloat16s_range_is_not_proven_finite():
    """The narrow product is rounded before it is weighted: its own size must be in bfloat16's range, whatever the
    weight. Such an update is not left to the state write (where no guard would read it) but made in the step."""
    X, A = torch.zeros(1, 128, 128), _past_bfloat16()
    assert bool(linalg.gram_update_finite(X, A, 0.95, 0.05).all())  # in float32 the weighted update is fine
    bound = linalg.gram_update_bound(X, A, 0.95, 0.05, narrow=torch.bfloat16)
    assert not bool(linalg.gram_update_finite(X, A, 0.95, 0.05, bound=bound).all())
    defer: list = []
    made = linalg.accumulate_gram_left(X, A, 0.95, 0.05, defer=defer, dtype=torch.bfloat16)
    assert not defer and not torch.isfinite(made).all()  # made in the step, for the guard to see


def test_a_gradient_whose_gram_product_overflows_in_bfloat16_is_skipped(gen):
    ps = [torch.nn.Parameter(torch.randn(128, 4, generator=gen))]
    opt = kronopt.build(ps, "soap", nonfinite="skip", **{"factors.product_dtype": "bfloat16"})
    for _ in range(3):
        ps[0].grad = torch.randn(128, 4, generator=gen)
        opt.step()
    before = ps[0].detach().clone()
    factors = {k: v.clone() for k, v in opt.state[ps[0]].items() if k.startswith("factors.")}
    ps[0].grad = _past_bfloat16()[0]
    opt.step()
    assert torch.equal(ps[0].detach(), before)
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in factors.items())
    assert sum(opt.nonfinite_counts().values()) >= 1


@pytest.mark.parametrize("side", [64, 128])  # a block's Gram product below and above the emulated form's bound
def test_a_block_rounds_alike_in_a_bucket_and_alone(gen, side, monkeypatch):
    """The form a block's narrow Gram products take goes by the block's own size, not its stack's: a block steps
    the same bits in one bucket of eight as in a bucket of its own."""
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: True)
    ws = [torch.randn(side, side, generator=gen) for _ in range(8)]
    grads = [[torch.randn(side, side, generator=gen) for _ in ws] for _ in range(8)]
    narrow = {"factors.product_dtype": "bfloat16"}
    together, _ = _run("soap", ws, grads, **narrow)
    apart, opt = _run("soap", ws, grads, **narrow, bucket_cap_mib=side * side * 4 * 6 / 2**20)
    assert len(opt._buckets) == 8
    assert all(torch.equal(a, b) for a, b in zip(together, apart))


def test_a_bad_product_dtype_is_listed_with_the_other_errors():
    with pytest.raises(ConfigError) as err:
        kronopt.resolve("soap", **{"factors.product_dtype": "float16", "lr": -1.0})
    text = str(err.value)
    assert "product_dtype" in text and "'float16'" in text and "lr" in text


def test_the_setting_survives_a_dump_and_a_load():
    cfg = kronopt.resolve("soap", **{"factors.product_dtype": "bfloat16"})
    again = kronopt.resolve(kronopt.config.to_dict(cfg))
    assert again.factors.product_dtype == "bfloat16" and again == cfg
    assert kronopt.resolve("soap").factors.product_dtype == "compute"
