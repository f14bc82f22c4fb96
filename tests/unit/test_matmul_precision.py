"""``matmul_precision``: the step's float32 products at full precision whatever the process set for its model.

A training script that turns on TF32 (GPU) or bfloat16 products (CPU, oneDNN) for its model would
otherwise run the factors, refreshes and rotations at 8–10 bits of mantissa. These tests use the CPU's
bfloat16 setting, the one a CPU can show, and the CUDA backend's TF32 flag as it is read during a step.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronopt
from kronopt import linalg
from kronopt.config import ConfigError

BACKENDS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


@pytest.fixture(autouse=True)
def _restore_precision():
    saved = [b.fp32_precision for b in BACKENDS]
    yield
    for b, s in zip(BACKENDS, saved):
        b.fp32_precision = s


def _bf16_products_change_float32() -> bool:
    """Whether this CPU's oneDNN runs float32 products differently under the ``"bf16"`` setting (it does
    where it has bfloat16 kernels; elsewhere the setting may be ignored, and the comparison proves nothing)."""
    g = torch.Generator().manual_seed(0)
    c, a = torch.randn(1, 24, 24, generator=g), torch.randn(1, 24, 40, generator=g)
    full = torch.baddbmm(c, a, a.mT, beta=0.95, alpha=0.05)  # a factor update's product (oneDNN's at any size)
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        low = torch.baddbmm(c, a, a.mT, beta=0.95, alpha=0.05)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    return not torch.equal(full, low)


needs_low_products = pytest.mark.skipif(
    not _bf16_products_change_float32(), reason="this CPU's float32 products ignore the bfloat16 setting"
)


def _trajectory(preset: str, setting: str, **overrides) -> list[torch.Tensor]:
    """Weights of a 24 × 40 and a 40 × 24 block (two buckets) after 12 steps, with the CPU's float32
    product setting ``setting`` in force around every step (as a training script leaves it)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(24, 40, generator=g) * 0.1), torch.nn.Parameter(torch.randn(40, 24, generator=g) * 0.1)]
    opt = kronopt.build([(f"layer{i}.weight", p) for i, p in enumerate(params)], preset, **overrides)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(12)]
    torch.backends.mkldnn.matmul.fp32_precision = setting
    try:
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr
            opt.step()
            assert torch.backends.mkldnn.matmul.fp32_precision == setting  # the process's setting is back
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    return [p.detach().clone() for p in params]


@needs_low_products
@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf", "kl_shampoo", "pro_kl_shampoo"])
def test_the_trajectory_ignores_the_processs_float32_product_setting(preset):
    full = _trajectory(preset, "ieee")
    under_bf16 = _trajectory(preset, "bf16")
    for a, b in zip(full, under_bf16):
        assert torch.equal(a, b)


@needs_low_products
@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_inherit_runs_the_products_at_the_processs_setting(preset):
    full = _trajectory(preset, "ieee", matmul_precision="inherit")
    under_bf16 = _trajectory(preset, "bf16", matmul_precision="inherit")
    assert any(not torch.equal(a, b) for a, b in zip(full, under_bf16))


class _RecordSettings(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm):
            self.seen.add((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


def test_every_product_of_a_step_runs_with_both_backends_at_ieee():
    p = torch.nn.Parameter(torch.randn(16, 12))
    opt = kronopt.build([("w", p)], "soap")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    record = _RecordSettings()
    for _ in range(3):
        p.grad = torch.randn(16, 12)
        with record:
            opt.step()
    assert record.seen == {("ieee", "ieee")}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")


def test_the_closure_runs_at_the_processs_setting():
    p = torch.nn.Parameter(torch.randn(16, 12))
    opt = kronopt.build([("w", p)], "soap")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    seen = []

    def closure():
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        p.grad = torch.randn(16, 12)
        return torch.tensor(1.0)

    assert opt.step(closure).item() == 1.0
    assert seen == ["bf16"]


def test_the_setting_is_restored_when_the_step_raises():
    p = torch.nn.Parameter(torch.randn(16, 12))
    opt = kronopt.build([("w", p)], "soap", nonfinite="raise")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    p.grad = torch.full((16, 12), float("nan"))
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_a_process_on_the_legacy_api_can_still_read_its_precision_after_a_step():
    # torch refuses get_float32_matmul_precision() once the per-backend settings disagree; a step that
    # restored them only in part would break a training script that reads it later (Lightning does)
    saved = torch.get_float32_matmul_precision()
    p = torch.nn.Parameter(torch.randn(16, 12))
    opt = kronopt.build([("w", p)], "soap")
    try:
        for setting in ("high", "medium"):
            torch.set_float32_matmul_precision(setting)
            p.grad = torch.randn(16, 12)
            opt.step()
            assert torch.get_float32_matmul_precision() == setting
    finally:
        torch.set_float32_matmul_precision(saved)


def test_full_float32_products_leaves_an_ieee_process_untouched_and_restores_on_error():
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    with pytest.raises(RuntimeError, match="inside"):
        with linalg.full_float32_products():
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
            raise RuntimeError("inside")
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_overlapping_blocks_of_two_threads_keep_full_precision_until_the_last_closes():
    """Two optimizers stepped in two threads: the block that opened first and closes first must not put the
    process's bfloat16 setting back under the other's step (it did: 1e-4 .. 3e-3 of soap's and kl_shampoo's
    weights on a CPU with bfloat16 kernels, beside an adamw thread)."""
    import threading

    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    a_open, b_closed, seen = threading.Event(), threading.Event(), []

    def first():  # opens first, waits for the other to open, closes first
        with linalg.full_float32_products():
            a_open.set()
            assert b_open.wait(10)
        b_closed.set()

    def second():
        assert a_open.wait(10)
        with linalg.full_float32_products():
            b_open.set()
            assert b_closed.wait(10)
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)  # the first has closed: still ieee
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)

    b_open = threading.Event()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == ["ieee", "bf16"]


def test_a_block_opened_while_another_is_open_runs_at_full_precision_whatever_was_set_between():
    """A thread's block is open; the process then turns bfloat16 products on and another thread opens a block:
    that block's products run at full precision too, and the setting comes back when the last block closes."""
    import threading

    a_open, c_done, seen = threading.Event(), threading.Event(), []

    def a():
        with linalg.full_float32_products():
            a_open.set()
            assert c_done.wait(10)

    def c():
        assert a_open.wait(10)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # set by the process while a's block is open
        with linalg.full_float32_products():
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        c_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == ["ieee"] and torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_two_optimizers_stepped_in_two_threads_step_as_alone_under_bfloat16_products():
    if not _bf16_products_change_float32():
        pytest.skip("this CPU's oneDNN runs float32 products alike under the bf16 setting: nothing to show")
    import threading

    def run(name, g0):
        params = [torch.nn.Parameter(torch.randn(64, 64, generator=g0) * 0.1) for _ in range(2)]
        opt = kronopt.build(params, name)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(64, 64, generator=g)
            opt.step()
        return torch.cat([p.detach().flatten() for p in params])

    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    alone = run("soap", torch.Generator().manual_seed(0))
    stop, out = threading.Event(), {}

    def other():
        g1 = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(8, 8, generator=g1))]
        opt = kronopt.build(params, "adamw")
        while not stop.is_set():
            params[0].grad = torch.randn(8, 8, generator=g1)
            opt.step()

    for _ in range(3):
        t = threading.Thread(target=other)
        t.start()
        try:
            out["soap"] = run("soap", torch.Generator().manual_seed(0))
        finally:
            stop.set()
            t.join()
        stop.clear()
        assert torch.equal(out["soap"], alone)
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_matmul_precision_is_validated_and_top_level_only():
    with pytest.raises(ConfigError, match="matmul_precision"):
        kronopt.build([("w", torch.nn.Parameter(torch.randn(4, 4)))], "soap", matmul_precision="tf32")
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises((ConfigError, ValueError), match="matmul_precision"):
        kronopt.build([{"params": [("w", p)]}, {"params": [("v", q)], "matmul_precision": "inherit"}], "soap")
    cfg = kronopt.config.from_dict({**kronopt.config.to_dict(kronopt.presets.SOAP), "matmul_precision": "inherit"})
    assert kronopt.config.from_dict(kronopt.config.to_dict(cfg)).matmul_precision == "inherit"
    assert kronopt.presets.SOAP.matmul_precision == "highest"


# -- a step inside the caller's torch.autocast region ------------------------------------------------------------


def _autocast_trajectory(preset: str, dtype: torch.dtype | None, **overrides) -> list[torch.Tensor]:
    """Weights and state after 8 steps of a 24 × 40 and a 40 × 24 block, each ``step()`` called inside
    ``torch.autocast("cpu", dtype)`` (``None``: outside any), as a script that wraps its whole iteration in it does."""
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(24, 40, generator=g) * 0.1), torch.nn.Parameter(torch.randn(40, 24, generator=g) * 0.1)]
    opt = kronopt.build([(f"layer{i}.weight", p) for i, p in enumerate(params)], preset, **{"refresh.every": 3, **overrides})
    for _ in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False):
            opt.step()
            assert torch.is_autocast_enabled("cpu") == (dtype is not None)  # the caller's region is back
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in params] + state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf", "kl_shampoo", "pro_soap", "muon", "adamw"])
def test_a_step_inside_the_callers_autocast_region_steps_as_outside(preset, dtype):
    """Autocast reached the step's products: soap, kl_shampoo and pro_kl_shampoo raised on mixed dtypes in the Adam
    moments, dykaf in its symmetric products, and shampoo's factors came out 1e-3 off, pro_soap's weights by 0.01.
    The step now runs with autocast off (``linalg.no_autocast``): the same bits as outside, every state tensor too."""
    outside = _autocast_trajectory(preset, None)
    inside = _autocast_trajectory(preset, dtype)
    assert len(inside) == len(outside)
    for a, b in zip(outside, inside):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_no_autocast_restores_the_callers_region_on_error():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="inside"):
            with linalg.no_autocast():
                assert not torch.is_autocast_enabled("cpu")
                raise RuntimeError("inside")
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
