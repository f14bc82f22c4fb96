"""Edges of an uncounted first call and of parameters kronopt does not step, each pinned by a test that
failed on the code before its fix.

* Whether a first call is counted is decided from the gradients' flags on every path: the plain AdamW fast
  path once decided it from its written verdicts, which also hold an overflow, so a finite first gradient
  whose square overflowed was counted by the general path and not by the fast one.
* The work-sharded path's warning names the update one process names (it once said "at update -1" for a
  first call it did not count).
* A frozen non-float parameter (``requires_grad = False``) is accepted and never stepped, as torch.optim
  accepts it (quantized weights in ``model.parameters()``).
* ``add_param_group``'s refusal of a complex parameter names the group being added.
* An expanded parameter (a stride-0 view) is refused by name when it is given, where its step wrote the other
  blocks of its bucket and then failed on it with torch's bare overlap message.
* A gradient carrying torch's lazy negation bit steps as its value, where the fused AdamW kernel refused it
  mid-step (adamw, and the vector fallback of muon and the KL presets).
"""

import multiprocessing
import os
import warnings

import pytest
import torch

import kronopt
from kronopt import compose


def _overflow_first_then_normal(fast: bool, monkeypatch):
    """AdamW on one (6, 5) float32 block; its first gradient is finite but its square overflows float32."""
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(compose, "is_plain_adam", lambda *a: False)
        gen = torch.Generator().manual_seed(0)
        W = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        opt = kronopt.build([("w", W)], "adamw", nonfinite="skip")
        W.grad = torch.full_like(W, 1e30)
        opt.step()
        after_first = opt.state[W]["step"]
        for _ in range(2):
            W.grad = torch.randn(W.shape, generator=gen)
            opt.step()
        return after_first, opt.state[W]["step"], W.detach().clone()


def test_plain_adam_fast_path_equals_general_path_when_the_first_gradient_overflows(monkeypatch):
    fast = _overflow_first_then_normal(True, monkeypatch)
    slow = _overflow_first_then_normal(False, monkeypatch)
    assert fast[:2] == slow[:2], f"step counters: fast path {fast[:2]}, general path {slow[:2]}"
    assert torch.equal(fast[2], slow[2])


def test_a_frozen_integer_parameter_is_accepted_as_torch_optim_does():
    lin = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.arange(3), requires_grad=False)  # e.g. an index or a quantized weight
    torch.optim.AdamW([lin.weight, lin.bias, frozen])  # torch accepts it
    opt = kronopt.build([("w", lin.weight), ("b", lin.bias), ("idx", frozen)], "adamw")
    lin.weight.grad, lin.bias.grad = torch.ones(3, 4), torch.ones(3)
    opt.step()
    assert torch.equal(frozen, torch.arange(3))


def test_add_param_group_names_the_added_group_of_a_complex_parameter():
    opt = kronopt.build([torch.nn.Parameter(torch.randn(3, 3))], "adamw")
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))]})
    first_new = len(opt.param_groups)
    with pytest.raises(TypeError) as info:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))]})
    assert "param_groups[0]" not in str(info.value), f"group {first_new} is being added: {info.value}"


@pytest.mark.parametrize("preset", ["adamw", "muon", "soap"])
def test_an_expanded_parameter_is_refused_by_name_before_anything_is_built(preset):
    other = torch.nn.Parameter(torch.randn(6, 4))
    expanded = torch.nn.Parameter(torch.zeros(1, 4).expand(6, 4))
    with pytest.raises(ValueError, match=r"'?wide'? is an expanded view \(stride \(0, 1\)\)"):
        kronopt.build([("other", other), ("wide", expanded)], preset)
    opt = kronopt.build([("other", other)], preset)
    with pytest.raises(ValueError, match=r"is an expanded view"):
        opt.add_param_group({"params": [expanded]})
    frozen = torch.nn.Parameter(torch.zeros(1, 4).expand(6, 4), requires_grad=False)
    kronopt.build([("other", other), ("frozen", frozen)], preset)  # never stepped: accepted, as torch.optim accepts it
    # a sparse tensor reports strides (0, 0): not an expanded view (its own refusal names the layout at the step)
    kronopt.build([("sparse", torch.nn.Parameter(torch.eye(3).to_sparse()))], preset)


@pytest.mark.parametrize("preset", ["adamw", "muon", "kl_shampoo"])
def test_a_gradient_with_the_negation_bit_steps_as_its_value(preset):
    steps = []
    for lazy in (True, False):
        w = torch.nn.Parameter(torch.ones(()))  # 0-d: the fused AdamW group of every preset
        m = torch.nn.Parameter(torch.ones(5, 4))
        opt = kronopt.build([("w", w), ("m", m)], preset, lr=1e-2)
        for k in range(3):
            g = torch._neg_view(torch.full((), 0.25 * (k + 1)))  # torch's lazy negation: is_neg(), values -0.25 (k + 1)
            assert g.is_neg()
            w.grad = g if lazy else g.resolve_neg()
            m.grad = torch.full((5, 4), 0.1 * (k + 1))
            opt.step()
        steps.append((w.detach().clone(), m.detach().clone()))
    assert torch.equal(steps[0][0], steps[1][0]) and torch.equal(steps[0][1], steps[1][1])
    assert steps[0][0] > 1  # a negative gradient: the weight went up


# -- work sharding: the update number of an uncounted first call's warning ------------------------------------


def _sharded_rank(rank: int, world: int, store_path: str, queue) -> None:
    torch.set_num_threads(1)
    store = torch.distributed.FileStore(store_path, world)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        queue.put((rank, _first_call_warnings()))
    finally:
        torch.distributed.destroy_process_group()


def _first_call_warnings() -> list[str]:
    """SOAP (skip_first_call), nonfinite = "warn": a NaN in one block skips the first step whole."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5, generator=gen)) for _ in range(3)]
    opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], "soap", nonfinite="warn")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[0].grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.flush_warnings()
    return [str(w.message).split(" in: ")[0] for w in caught if "non-finite" in str(w.message)]


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo")
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="forked gloo ranks")
def test_work_sharded_first_call_warning_names_the_update_one_process_names(tmp_path):
    single = _first_call_warnings()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    ranks = [ctx.Process(target=_sharded_rank, args=(r, 2, str(tmp_path / "store"), queue)) for r in range(2)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join(60)
    assert all(r.exitcode == 0 for r in ranks)
    got = dict(queue.get() for _ in ranks)
    assert got[0] == single, f"sharded {got[0]} vs one process {single}"


# -- a learning rate or weight decay set to NaN or Inf between steps -------------------------------------------


@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")), ("lr", torch.tensor(float("nan")))])
@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_non_finite_rate_set_between_steps_is_refused_before_anything_changes(preset, key, value):
    """torch.optim takes ``group["lr"] = nan`` and writes NaN into every parameter; kronopt promises that no
    NaN reaches a parameter, so the step refuses it, naming the group and key, and changes nothing."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
    opt = kronopt.build(params, preset, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    saved = opt.state_dict()
    opt.param_groups[-1][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[{len(opt.param_groups) - 1}\]\['{key}'\] is (nan|inf): a non-finite"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    after = opt.state_dict()
    for k, v in saved["state"].items():
        for name, t in v.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(after["state"][k][name], t), (k, name)
    opt.param_groups[-1][key] = 1e-3  # set right again, the step goes on
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("value", ["numpy-0d", "1e-3", True, [1e-3]], ids=["numpy-0d", "str", "bool", "list"])
@pytest.mark.parametrize("preset, compiled", [("adamw", False), ("soap", False), ("soap", True)])
def test_a_rate_that_is_not_a_number_set_between_steps_is_refused_before_anything_changes(preset, compiled, value):
    """A NumPy 0-d array as ``lr`` failed deep in the step (eager adamw: "unhashable type"; compiled soap: torch's
    ``full``), and a string or a list likewise: the step now refuses it by name, changes nothing, and a NumPy
    scalar (a real number) still steps as its float does."""
    np = pytest.importorskip("numpy")
    value = np.array(1e-3) if value == "numpy-0d" else value
    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
    opt = kronopt.build(params, preset, compile=compiled)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = value
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] is .*: it must be a real number or a one-entry tensor; nothing was changed"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.param_groups[0]["lr"] = np.float32(1e-3)  # a NumPy scalar is a real number
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("kind", ["np.float32", "Fraction"])
@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_real_number_of_any_type_steps_as_its_float(preset, kind):
    """The build and the step take one rule, a real number of any type: ``Fraction`` failed deep in the step
    ("unsupported operand Tensor * Fraction", adamw's fused kernel) and ``np.float32`` was refused at the build."""
    import fractions

    np = pytest.importorskip("numpy")
    make = {"np.float32": np.float32, "Fraction": lambda x: fractions.Fraction(x).limit_denominator(10**6)}[kind]
    runs = []
    for typed in (False, True):
        gen = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
        lr = make(0.002) if typed else float(make(0.002))
        opt = kronopt.build(params, preset, lr=lr, weight_decay=make(0.1) if typed else float(make(0.1)))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.param_groups[0]["lr"] = lr
            opt.step()
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- a layout a stage cannot keep is refused at build, frozen parameters included ------------------------------


def test_a_frozen_parameter_whose_layout_a_stage_refuses_is_refused_when_built():
    """pro_dykaf cannot keep a restricted side beside an unrotated one (a 1-D parameter under precondition_1d):
    a trainable one is refused when the optimizer is built; a frozen one was refused only at the step that first
    gave it a gradient, mid-training. Now both at build, with the stage's own message."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    for requires_grad in (True, False):
        b = torch.nn.Parameter(torch.randn(8), requires_grad=requires_grad)
        with pytest.raises(ValueError, match=r"keeps a restricted side only with .* sides 'restricted'/'none'"):
            kronopt.build([w, b], "pro_dykaf", **{"shapes.precondition_1d": True})


@pytest.mark.parametrize("preset", sorted(kronopt.PRESETS))
def test_frozen_parameters_of_every_preset_build_lazily_and_step_once_unfrozen(preset):
    """The build-time trial of a frozen bucket's layout refuses nothing a preset can step, and allocates nothing."""
    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen), requires_grad=False) for s in ((8, 6), (8,), (3, 4, 2, 2))]
    opt = kronopt.build(params, preset)
    assert len(opt.state) == 0 and opt.state_bytes() == 0
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
