"""CUDA behaviour that the CPU suite cannot see (skipped without a CUDA device).

* float64 on the GPU follows the CPU run to rounding, for every preset, with
  refreshes, a routed fallback and buckets of several blocks;
* the non-finite report of ``nonfinite = "warn"`` travels through pinned memory
  and an event (``_Pending``): it arrives without a synchronisation in ``step()``
  and names the right parameter;
* a CUDA optimizer's ``state_dict`` loads into a CPU optimizer (``map_location``
  style) and the two continue identically.
"""

import warnings

import pytest
import torch

import kronopt

pytestmark = pytest.mark.gpu

SHAPES = [(16, 16), (16, 16), (24, 24), (20, 20), (16,)]


def _params(device, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in SHAPES]


def _grads(steps, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    # square random gradients: full-rank first factors, so the eigenbasis is well posed (a rank-deficient
    # factor leaves its null-space basis arbitrary, and CPU and GPU would pick different ones)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(steps)]


def _run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(p.device)
        opt.step()


#: DyKAF's default start makes the first factors rank one, so all but one eigenvector of the first basis is any
#: completion the solver picks (cuSOLVER's and LAPACK's differ): the sum start makes them full rank. pro_dykaf
#: needs the kron start; its GPU arithmetic path is compared on the CPU (test_device_paths_differential.py)
WELL_POSED = {"dykaf": {"factors.init": "sum"}, "dykaf_rank1": {"factors.init": "sum"}}
COMPARED = [p for p in kronopt.PRESETS if p != "pro_dykaf"]


@pytest.mark.parametrize("preset", COMPARED)
def test_float64_cuda_run_equals_the_cpu_run(preset):
    overrides = {"refresh.every": 4} if preset in ("soap", "shampoo", "dykaf", "dykaf_rank1") else {}
    overrides |= WELL_POSED.get(preset, {})
    grads = _grads(12)
    gpu, cpu = _params("cuda"), _params("cpu")
    _run(kronopt.build(gpu, preset, **overrides), gpu, grads)
    _run(kronopt.build(cpu, preset, **overrides), cpu, grads)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-11)


def test_warn_mode_reports_through_pinned_memory_without_blocking_the_step():
    params = _params("cuda", torch.float32)
    before = [p.detach().clone() for p in params]
    opt = kronopt.build(params, "soap", nonfinite="warn", nonfinite_scope="block")
    grads = _grads(1, torch.float32)[0]
    grads[2][3, 3] = float("nan")
    for p, g in zip(params, grads):
        p.grad = g.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.flush_warnings()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "params[2]" in messages[0], messages
    torch.testing.assert_close(params[2].detach(), before[2], rtol=0, atol=0)
    assert opt.nonfinite_counts()["param_groups[0].params[2] (24, 24)"] == 1


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "muon"])
def test_cuda_state_dict_loads_on_the_cpu_and_continues_alike(preset):
    grads = _grads(10)
    gpu = _params("cuda")
    opt = kronopt.build(gpu, preset, **({"refresh.every": 3} if preset == "soap" else {}))
    _run(opt, gpu, grads[:5])
    saved = opt.state_dict()
    moved = {
        "state": {k: {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in e.items()} for k, e in saved["state"].items()},
        "param_groups": saved["param_groups"],
        "kronopt": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in saved["kronopt"].items()},
    }
    cpu = [torch.nn.Parameter(p.detach().cpu().clone()) for p in gpu]
    resumed = kronopt.build(cpu, preset, **({"refresh.every": 3} if preset == "soap" else {}))
    resumed.load_state_dict(moved)
    _run(opt, gpu, grads[5:])
    _run(resumed, cpu, grads[5:])
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("first", ["cuda", "cpu"])
@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_parameters_on_a_cpu_and_a_gpu_step_as_on_one_device(preset, first, scope):
    """Parameters split over a CPU and a GPU (in either order) step as the same parameters on the CPU alone,
    with a NaN gradient once on each device. Guards the step's flag, made on one device and used by the
    other's buckets (a CUDA flag in a CPU bucket's mask raised; a flag copied to the host without waiting
    could be read before it landed) and the skipped-steps counter kept on the flag's device."""
    other = "cpu" if first == "cuda" else "cuda"
    devices = [first, other, first, other, other]
    grads = _grads(8)
    grads[3][1][0, 0] = float("nan")  # on `other`
    grads[5][0][2, 1] = float("inf")  # on `first`
    overrides = {"nonfinite": "skip", "nonfinite_scope": scope}
    if preset == "soap":
        overrides["refresh.every"] = 3
    mixed = [torch.nn.Parameter(p.detach().to(d)) for p, d in zip(_params("cpu"), devices)]
    cpu = _params("cpu")
    opt = kronopt.build(mixed, preset, **overrides)
    _run(opt, mixed, grads)
    _run(kronopt.build(cpu, preset, **overrides), cpu, grads)
    for a, b in zip(mixed, cpu):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-11)
    if scope == "step":
        assert opt.skipped_steps() == 0


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_model_moved_to_the_gpu_after_the_optimizer_was_built_steps_there(preset):
    """``opt = build(model.parameters()); model.cuda()`` (as torch.optim allows, its state made at the first
    step): the state is made again on the GPU at the first step, and the run equals one built after the move."""
    grads = _grads(6)
    moved = _params("cpu")
    opt = kronopt.build(moved, preset)
    for p in moved:
        p.data = p.data.cuda()
    _run(opt, moved, grads)
    assert all(t.device.type == "cuda" for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    built_there = [torch.nn.Parameter(p.detach().cuda()) for p in _params("cpu")]
    _run(kronopt.build(built_there, preset), built_there, grads)
    for a, b in zip(moved, built_there):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
