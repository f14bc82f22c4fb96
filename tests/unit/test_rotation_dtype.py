"""``rotation_dtype = "bfloat16"``: the rotations' products with bfloat16 operands and results (linalg.NarrowProducts).

The expected values round by hand, in float64 (``_rounded``): each product's operands and result rounded to
bfloat16, the sums exact. The emulated form (float32 kernels on rounded operands, the form of a CPU without fast
bfloat16 products and of float64 blocks) must give those values but for a sum's last bits; the bfloat16 kernels
(a GPU's, a CPU's with AMX or ``avx512_bf16``) sum in float32 and round their result once, so where a sum lies
within its rounding of a bfloat16 boundary an entry rounds the other way: they are compared by how far they
lie from the hand-rounded value against how far the float32 rotation lies from it.
"""

import warnings

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _rounded(X):
    return X.to(torch.bfloat16).to(torch.float64)


def _basis(gen, b, d, r=None):
    Q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=torch.float64))
    return Q if r is None else Q[..., :r].contiguous()


def _by_hand(X, Q_L, Q_R, back):
    """rotate (``back`` False: Q_Lᵀ X Q_R) or unrotate (Q_L X Q_Rᵀ), the left side first, rounded by hand."""
    X = _rounded(X.double())
    if Q_L is not None:
        L = _rounded(Q_L.double())
        X = _rounded((L if back else L.mT) @ X)
    if Q_R is not None:
        R = _rounded(Q_R.double())
        X = _rounded(X @ (R.mT if back else R))
    return X


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [  # (b, m, n, left basis, right basis): full, restricted (d × r) or none
    (3, 24, 24, "full", "full"),
    (2, 16, 40, "full", "full"),
    (2, 16, 40, "full", None),
    (2, 40, 16, None, "full"),
    (2, 48, 20, "full", "restricted"),
]


def _operands(gen, b, m, n, left, right, back):
    Q_L = None if left is None else _basis(gen, b, m, 6 if left == "restricted" else None)
    Q_R = None if right is None else _basis(gen, b, n, 5 if right == "restricted" else None)
    rows = m if not back or Q_L is None else Q_L.shape[-1]
    cols = n if not back or Q_R is None else Q_R.shape[-1]
    X = torch.randn(b, rows, cols, generator=gen, dtype=torch.float64)
    return X, Q_L, Q_R


@pytest.mark.parametrize("back", [False, True], ids=["rotate", "unrotate"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[4]}")
def test_the_emulated_form_rounds_every_operand_and_result(gen, case, back):
    X, Q_L, Q_R = _operands(gen, *case, back)
    ours = (linalg.unrotate if back else linalg.rotate)(X, Q_L, Q_R, dtype=torch.bfloat16)  # float64: emulated
    exact = (linalg.unrotate if back else linalg.rotate)(X, Q_L, Q_R)
    assert ours.dtype == torch.float64
    # every entry a bfloat16 value, and the hand-rounded one (both sides' orders agree where the cost does)
    assert torch.equal(_rounded(ours), ours)
    if (Q_L is None) != (Q_R is None) or Q_L.shape[-1] == Q_L.shape[-2] and Q_R.shape[-1] == Q_R.shape[-2]:
        torch.testing.assert_close(ours, _by_hand(X, Q_L, Q_R, back), rtol=0, atol=0)
    # and it is not the exact rotation: about bfloat16's precision off it
    assert 1e-4 < _rel(ours, exact) < 2e-2


@pytest.mark.parametrize("back", [False, True], ids=["rotate", "unrotate"])
@pytest.mark.parametrize("emulated", [True, False], ids=["emulated", "kernels"])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[4]}")
def test_float32_blocks_round_as_by_hand_in_either_form(gen, case, back, emulated, monkeypatch):
    monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work: emulated)
    X, Q_L, Q_R = (None if t is None else t.float() for t in _operands(gen, *case, back))
    ours = (linalg.unrotate if back else linalg.rotate)(X, Q_L, Q_R, dtype=torch.bfloat16)
    exact = (linalg.unrotate if back else linalg.rotate)(X, Q_L, Q_R)
    assert ours.dtype == torch.float32 and torch.equal(_rounded(ours).float(), ours)
    by_hand = _by_hand(X, Q_L, Q_R, back)
    # a float32 sum tips a bfloat16 rounding now and then: far closer to the hand-rounded value than the
    # float32 rotation is, which differs from it in nearly every entry
    assert _rel(ours, by_hand) < 0.1 * _rel(exact, by_hand)
    flipped = (ours.double() != by_hand).float().mean().item()
    assert flipped < 0.05


def test_nothing_is_narrowed_without_a_basis_or_a_narrower_dtype(gen):
    X = torch.randn(2, 8, 6, generator=gen)
    Q = _basis(gen, 2, 8).float()
    assert linalg.NarrowProducts.of(X, None, Q, None) is None
    assert linalg.NarrowProducts.of(X, torch.bfloat16, None, None) is None
    assert linalg.NarrowProducts.of(X.bfloat16(), torch.bfloat16, Q, None) is None
    assert torch.equal(linalg.rotate(X, None, None, dtype=torch.bfloat16), X)
    assert torch.equal(linalg.rotate(X, Q, None, dtype=None), linalg.rotate(X, Q, None))


def test_the_half_product_a_factor_estimator_reads_is_the_rounded_one(gen, monkeypatch):
    """``rotate_in``'s half product (KL's Gram operand) is the one ``H`` was made from, right side first on a tall
    block, in the narrow dtype for a reader to cast."""
    from kronopt.types import rotate_in

    monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work: False)
    G = torch.randn(2, 20, 12, generator=gen)
    Q_L, Q_R = _basis(gen, 2, 20).float(), _basis(gen, 2, 12).float()
    tall = rotate_in(G, Q_L, Q_R, exact_basis=True, dtype=torch.bfloat16)
    assert tall.left is None and tall.right.dtype == torch.bfloat16
    torch.testing.assert_close(tall.right.double(), _rounded(_rounded(G.double()) @ _rounded(Q_R.double())), rtol=1e-2, atol=1e-2)
    assert torch.equal(tall.H, (Q_L.bfloat16().mT @ tall.right).float())
    wide = rotate_in(G.mT.contiguous(), Q_R, Q_L, exact_basis=True, dtype=torch.bfloat16)
    assert wide.right is None and torch.equal(wide.H, (wide.left @ Q_L.bfloat16()).float())


PRESETS = ["soap", "dykaf", "shampoo", "kl_shampoo", "kl_soap", "pro_soap", "pro_kl_shampoo", "pro_dykaf"]


def _run(preset, ws, grads, **overrides):
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unnamed parameters: no routing by name
        opt = kronopt.build(ps, preset, **overrides)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("preset", PRESETS)
def test_every_rotating_preset_steps_near_its_float32_rotations(gen, preset):
    """The same run with the rotations' products in bfloat16 ends near the float32 one (each step's direction
    about 0.5 % off, Adam's sign-like first steps excepted) and not on it: the option acts, and a wrong side or
    transpose would move the run by its whole size."""
    ws = [torch.randn(24, 40, generator=gen), torch.randn(40, 24, generator=gen), torch.randn(8, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(14)]
    exact, _ = _run(preset, ws, grads)
    narrow, opt = _run(preset, ws, grads, rotation_dtype="bfloat16")
    assert opt.config.rotation_dtype == "bfloat16"
    for w, a, b in zip(ws[:2], exact, narrow):
        assert torch.isfinite(b).all()
        moved = (a - w).norm().item()
        assert 0 < (a - b).norm().item() < 0.2 * moved
    assert torch.equal(exact[2], narrow[2])  # a vector has no basis: nothing narrowed


def test_a_gradient_whose_rotation_overflows_in_bfloat16_is_skipped(gen):
    """bfloat16's largest value lies under float32's: a finite float32 gradient may round to infinity as a
    product's operand. The step's guard sees the non-finite direction and skips that block whole, its weights and
    state kept; the other block steps."""
    ws = [torch.randn(12, 8, generator=gen), torch.randn(6, 10, generator=gen)]
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = kronopt.build(ps, "soap", rotation_dtype="bfloat16", nonfinite="skip", nonfinite_scope="block")
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    before = [p.detach().clone() for p in ps]
    state = {k: v.clone() for k, v in opt.state[ps[0]].items() if isinstance(v, torch.Tensor)}
    big = torch.zeros(12, 8)
    big[3, 2] = torch.finfo(torch.float32).max * 0.999  # finite in float32, infinite as a bfloat16
    assert torch.isfinite(big).all() and not torch.isfinite(big.bfloat16()).all()
    ps[0].grad, ps[1].grad = big, torch.randn(6, 10, generator=gen)
    opt.step()
    assert torch.equal(ps[0].detach(), before[0])
    changed = [k for k, v in state.items() if not torch.equal(opt.state[ps[0]][k], v)]
    assert changed == ["nonfinite"]  # its count, and nothing else
    assert not torch.equal(ps[1].detach(), before[1]) and torch.isfinite(ps[1]).all()
    assert sum(opt.nonfinite_counts().values()) >= 1


def test_a_bad_rotation_dtype_is_listed_with_the_other_errors():
    with pytest.raises(ConfigError) as err:
        kronopt.resolve("soap", rotation_dtype="float16", lr=-1.0)
    text = str(err.value)
    assert "rotation_dtype: must be one of 'compute', 'bfloat16', got 'float16'" in text and "lr" in text


def test_the_setting_survives_a_dump_and_a_load():
    cfg = kronopt.resolve("kl_shampoo", rotation_dtype="bfloat16")
    again = kronopt.resolve(kronopt.config.to_dict(cfg))
    assert again.rotation_dtype == "bfloat16" and again == cfg
    assert kronopt.resolve("kl_shampoo").rotation_dtype == "compute"


def test_a_param_group_narrows_its_own_rotations_only(gen):
    ws = [torch.randn(16, 24, generator=gen), torch.randn(16, 24, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(6)]

    def run(first_group):
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = kronopt.build([{"params": [ps[0]], **first_group}, {"params": [ps[1]]}], "soap")
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps]

    plain, narrowed = run({}), run({"rotation_dtype": "bfloat16"})
    assert not torch.equal(plain[0], narrowed[0])  # the group that asked
    assert torch.equal(plain[1], narrowed[1])  # the other group, bit for bit


@pytest.mark.parametrize("side", [64, 128])  # a block's rotation below and above the emulated form's bound
def test_a_block_rounds_alike_in_a_bucket_and_alone(gen, side, monkeypatch):
    """Which form a block's narrow products take is decided by the block's own size, not its stack's, so a block
    steps the same bits in one bucket of eight as in a bucket of its own (``bucket_cap_mib``), the rule every
    bucket keeps (docs/configs.md). On a processor with fast bfloat16 products a stack-sized decision took the
    kernels for the bucket and the emulated form for the block alone, and the two tip roundings otherwise."""
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: True)
    ws = [torch.randn(side, side, generator=gen) for _ in range(8)]
    grads = [[torch.randn(side, side, generator=gen) for _ in ws] for _ in range(8)]
    together, _ = _run("soap", ws, grads, rotation_dtype="bfloat16")
    apart, opt = _run("soap", ws, grads, rotation_dtype="bfloat16", bucket_cap_mib=side * side * 4 * 6 / 2**20)
    assert len(opt._buckets) == 8
    assert all(torch.equal(a, b) for a, b in zip(together, apart))


def test_a_restricted_layouts_full_side_follows_the_setting(gen, monkeypatch):
    """pro_kl_shampoo rotates its subspace momentum into the full side's basis with one product (the subspace
    coordinates, shared with the split's complement, stay in the compute dtype): that product is narrowed."""
    seen = []
    real = linalg.rotate

    def spy(X, Q_L, Q_R, *, dtype=None):
        seen.append((Q_L is None) != (Q_R is None) and dtype == torch.bfloat16)
        return real(X, Q_L, Q_R, dtype=dtype)

    monkeypatch.setattr(linalg, "rotate", spy)
    ws = [torch.randn(32, 96, generator=gen)]
    grads = [[torch.randn(32, 96, generator=gen)] for _ in range(5)]
    _run("pro_kl_shampoo", ws, grads, rotation_dtype="bfloat16")
    assert sum(seen) >= 3  # one a step after the first call
