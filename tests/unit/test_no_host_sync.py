"""Nothing in step() reads tensor values on the host (no .item(), bool(tensor), .tolist()) but a bucket's
first call, which reads whether it used any gradient (``linalg._any_written``) and, for DyKAF's start from the
gradient, which of its gradients are nonzero (``linalg._nonzero_each``), and torch's solvers that
synchronise a CUDA device themselves (eigh, svd) run only on first calls and refreshes.

The CPU's fast paths (the plain-AdamW block loop, the plain-Muon one, the state write's plain copies
when every block is ok) read verdicts on the host, which on a CPU waits for nothing; this test turns them off, so the
step takes the device-agnostic paths, the ones a GPU takes (checked on CUDA by the last test).
"""

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt import optimizer as optimizer_module
from kronopt.bases import QrBasis


def _forbid_host_reads(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)


#: the presets whose basis is ``qr``, which also run with ``basis.null_space = "canonical"`` below
QR_PRESETS = [name for name, cfg in kronopt.PRESETS.items() if isinstance(cfg.basis, QrBasis)]


@pytest.mark.parametrize(
    "preset, null_space", [(p, "solver") for p in kronopt.PRESETS] + [(p, "canonical") for p in QR_PRESETS]
)
def test_step_reads_no_tensor_values_on_the_host(preset, null_space, monkeypatch):
    monkeypatch.setattr(optimizer_module, "_BLOCKWISE_MIN", 10**12)  # AdamW on the stacks, as on a GPU
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", False)  # masked writes, as on a GPU
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6, 4), (4, 6), (5,), (2, 3, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    overrides = {"refresh.every": 2} if preset in ("soap", "shampoo") else {}
    if null_space == "canonical":  # a first basis of rank-deficient factors and power steps meeting null spaces
        overrides["basis.null_space"] = "canonical"
    opt = kronopt.build(params, preset, nonfinite="skip", **overrides)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    grads[3][0][0, 0] = float("nan")
    # the one read allowed: a bucket's first call asks whether it used any gradient (linalg._any_written)
    read_bool, first_reads = torch.Tensor.__bool__, []
    monkeypatch.setattr(linalg, "_any_written", lambda mask: (first_reads.append(len(first_reads)), read_bool(mask.any()))[1])
    monkeypatch.setattr(linalg, "_nonzero_each", lambda ts, dtype: (first_reads.append(len(first_reads)), [read_bool(t.to(dtype).ne(0).any()) for t in ts])[1])
    _forbid_host_reads(monkeypatch)
    for k, step_grads in enumerate(grads):  # covers first calls, refreshes and a non-finite block
        for p, g in zip(params, step_grads):
            p.grad = g
        before = len(first_reads)
        opt.step()
        assert k == 0 or len(first_reads) == before, "a first call's read on a later step"
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_the_synchronising_solvers_run_only_on_first_calls_and_refreshes(preset, monkeypatch):
    """torch's ``eigh`` and ``svd`` synchronise a CUDA device with the host (``linalg._eigh``, ``linalg._svd``),
    and so does the first call's read of its write mask (``linalg._any_written``): a plain step, one that
    refreshes no basis and is no first call, must call none of them. A block whose first
    gradient is zero has a first call of its own later under DyKAF (its start and first basis, on a step
    counted here as a refresh), and under the other presets starts on a later plain step without them."""
    calls = []
    for name in ("_eigh", "_svd", "_any_written"):
        real = getattr(linalg, name)
        monkeypatch.setattr(linalg, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    gen = torch.Generator().manual_seed(1)
    shapes = [(12, 8), (12, 8), (8, 12), (9,), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = kronopt.build(params, preset, **{"refresh.every": 3})
    per_step = []
    for step in range(8):
        for i, (p, s) in enumerate(zip(params, shapes)):
            p.grad = torch.zeros(s) if step == 0 and i == 1 else torch.randn(s, generator=gen)
        before = [b.state.basis.refreshes for b in opt._buckets]
        del calls[:]
        opt.step()
        refreshed = [b.state.basis.refreshes for b in opt._buckets] != before
        per_step.append((step, refreshed, len(calls)))
    assert all(n == 0 for step, refreshed, n in per_step if step and not refreshed), per_step
    if preset in ("shampoo", "soap", "dykaf"):  # the hooks see the solvers where they do run
        assert any(n for _, _, n in per_step), per_step


@pytest.mark.gpu
@pytest.mark.parametrize("preset", [p for p in kronopt.PRESETS if p != "pro_dykaf"])  # its rank-one start: below
def test_cuda_step_does_not_synchronise(preset, monkeypatch):
    """No synchronisation in a step but inside torch's ``eigh`` and ``svd`` (which torch documents as
    synchronising; kronopt calls them on first calls and refreshes only, as the test above checks) and
    the first call's read of whether it used any gradient (``linalg._any_written``)."""
    for name in ("_eigh", "_svd", "_any_written"):
        real = getattr(linalg, name)

        def allowed(*args, _real=real, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return _real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        monkeypatch.setattr(linalg, name, allowed)
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 48), (48, 48), (32, 32), (32,)]  # square: full-rank first factors, a well-posed eigenbasis
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    cpu = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    # DyKAF's default start makes its first factors rank one, and the rest of the first basis any completion the
    # solver picks (cuSOLVER's and LAPACK's differ): the sum start is full rank (pro_dykaf needs the kron start)
    overrides = ({"refresh.every": 3} if preset in ("soap", "shampoo") else {}) | (
        {"factors.init": "sum"} if preset in ("dykaf", "dykaf_rank1") else {}
    )
    opt = kronopt.build(params, preset, **overrides)
    ref = kronopt.build(cpu, preset, **overrides)
    for _ in range(8):
        for p, q in zip(params, cpu):
            g = torch.randn(q.shape, generator=gen)
            p.grad, q.grad = g.cuda(), g
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.step()
    for p, q in zip(params, cpu):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-3, atol=1e-4)
