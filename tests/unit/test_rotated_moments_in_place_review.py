"""Review of the rotated Adam moments updated in place (``KronOptimizer._in_place_proof``,
``compose.rotated_adams(in_place=...)``): cases where the proof holds but the step is not finite, where an
in-place write escapes the "nothing written" rule, and the subtle cases checked that hold.

The invariant: a block the guard skips keeps its old state and parameter; finite gradients never put NaN/Inf
into a parameter or the state; the bits are those of ``_ROTATED_MOMENTS_IN_PLACE = False``.
"""

import copy
import math
import warnings

import pytest
import torch

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module
from tests.unit.test_rotated_moments_in_place import _spy_in_place as _spy

#: a block stepped alone (_step_bucket, in place from the 2nd update past a refresh) and a small-path block of
#: 2**14 entries (in place through _step_small_buckets)
SHAPES = [(160, 130), (128, 128)]


def _build(preset, flag, monkeypatch, shapes=SHAPES, dtype=torch.float32, groups=None, **overrides):
    monkeypatch.setattr(optimizer_module, "_ROTATED_MOMENTS_IN_PLACE", flag)
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]
    arg = params if groups is None else [{"params": [p], **g} for p, g in zip(params, groups)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronopt.build(arg, preset, **{"refresh.every": 4, "nonfinite": "skip", **overrides})
    return params, opt


def _step(params, opt, grads, flag, monkeypatch, ctx=None):
    monkeypatch.setattr(optimizer_module, "_ROTATED_MOMENTS_IN_PLACE", flag)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ctx is None:
            opt.step()
        else:
            with ctx():
                opt.step()


def _grads(gen, shapes=SHAPES, scale=0.01, dtype=torch.float32):
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def _tensors(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]


def _same_state(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# ---------------------------------------------------------------------------------------------------------------
# defects of the change's first form, each mended
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["edit_negative", "load_minus_inf"])
def test_a_second_moment_below_zero_is_never_stepped_in_place(how, monkeypatch):
    """A defect of the first form, mended: the proof read only max v, so a negative (or -inf) second moment from an
    edit or a checkpoint passed it, sqrt(v') was NaN and the untested direction wrote NaN into the parameter (the
    old path tests D and skips the block). Now v's smallest entry is read too."""
    params, opt = _build("soap", True, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):  # past the refresh at update 4: updates 5 and 6 in place, bounds carried
        _step(params, opt, _grads(gen), True, monkeypatch)
    if how == "edit_negative":
        opt.state[params[0]]["inner.exp_avg_sq"].fill_(-1e3)
    else:  # a checkpoint holding one -inf: max v stays finite
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0]["inner.exp_avg_sq"][0, 0] = -math.inf
        opt.load_state_dict(sd)
    before, weights = _tensors(opt, params[:1]), params[0].detach().clone()
    _step(params, opt, _grads(gen), True, monkeypatch)
    assert torch.isfinite(params[0]).all()
    assert torch.equal(params[0], weights)  # skipped, as with _ROTATED_MOMENTS_IN_PLACE = False
    assert torch.equal(opt.state[params[0]]["inner.exp_avg"], before[0]["inner.exp_avg"])


def test_a_basis_side_with_small_columns_cannot_hide_an_overflow_of_the_first_product(monkeypatch):
    """A defect of the first form, mended: the direction's bound multiplied both sides' spectral bounds, but unrotate
    makes Q_L N first, so a right basis of column norms far below 1 let the bound hold while Q_L N overflowed (an
    untested inf/NaN direction reached the parameter). Now each side's factor is at least 1."""
    params, opt = _build("soap", True, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        _step(params, opt, _grads(gen), True, monkeypatch)
    state = opt.state[params[0]]
    Q_L, Q_R = state["basis.Q_L"], state["basis.Q_R"]
    u = Q_L[0] / Q_L[0].norm()
    Q_L.mul_(1.5e19)  # column norms 1.5e19: their squares stay finite, so the norms read finite
    Q_R.mul_(1e-25)
    # finite, non-negative moments whose ratio N (v = 0, G = 0: N = β₁ m / ε) lines up with Q_L's row 0:
    # (Q_L N)[0, j] = 0.95 * 3e11 / 1e-8 * 1.5e19 ≈ 4.3e38 > float32's max; D itself would be about 4e12
    state["inner.exp_avg"].copy_(u[:, None].expand(160, 130) * 3e11)
    state["inner.exp_avg_sq"].zero_()
    grads = _grads(gen)
    grads[0] = torch.zeros(SHAPES[0])
    weights = params[0].detach().clone()
    _step(params, opt, grads, True, monkeypatch)
    assert torch.isfinite(params[0]).all()
    assert torch.equal(params[0], weights)  # the old path skips the block


def test_a_refresh_that_raises_in_the_same_run_leaves_the_moments_made_in_place_unwritten(monkeypatch):
    """A defect of the first form, mended: compose.rotated_adams updated the proven calls' moments before the due
    refreshes of the run's other calls, so one that raised (MemoryError, KeyboardInterrupt) left those moments
    advanced with their parameters and counters not ("nothing of the run is written"). Now the calls that may go
    in place are made last, after every other call is made, tested and made again where it must be."""
    # two 128×128 blocks in two staggered phases: one bucket's refresh is due while the other steps in place
    params, opt = _build("soap", True, monkeypatch, shapes=[(128, 128), (128, 128)], **{"refresh.every": 2,
                                                                                          "refresh.stagger": True})
    gen = torch.Generator().manual_seed(5)
    shapes = [(128, 128), (128, 128)]
    for _ in range(5):
        _step(params, opt, _grads(gen, shapes), True, monkeypatch)
    made = _spy(monkeypatch)
    before = _tensors(opt, params)

    def boom(*args, **kwargs):
        raise MemoryError("a refresh ran out of memory")

    monkeypatch.setattr(compose, "_refreshed", boom)
    with pytest.raises(MemoryError):
        _step(params, opt, _grads(gen, shapes), True, monkeypatch)
    assert made["new"] == [] and made["in_place"] == []  # the call raised inside rotated_adams
    assert _same_state(before, _tensors(opt, params))


# ---------------------------------------------------------------------------------------------------------------
# cases checked that hold
# ---------------------------------------------------------------------------------------------------------------


_CASES = {
    # (preset, shapes, overrides, build kwargs, step context, in place expected)
    "groups_with_other_rates_in_one_bucket": ("soap", [(160, 130), (160, 130)], {},
                                              {"groups": [{"lr": 1e-2}, {"lr": 3e-3, "weight_decay": 0.1}]}, None, True),
    "scope_block_warn": ("soap", SHAPES, {"nonfinite_scope": "block", "nonfinite": "warn"}, {}, None, False),
    "raise": ("soap", SHAPES, {"nonfinite": "raise"}, {}, None, True),
    "raise_scope_block": ("soap", SHAPES, {"nonfinite": "raise", "nonfinite_scope": "block"}, {}, None, True),
    "stagger": ("soap", [(160, 130), (160, 130), (128, 128), (128, 128)], {"refresh.stagger": True}, {}, None, True),
    "every_1": ("soap", SHAPES, {"refresh.every": 1}, {}, None, False),
    "float64": ("soap", SHAPES, {"state_dtype": "float64"}, {"dtype": torch.float64}, None, True),
    "bfloat16_params": ("soap", SHAPES, {}, {"dtype": torch.bfloat16}, None, False),
    "inference_mode_step": ("soap", SHAPES, {}, {}, torch.inference_mode, True),
    "zero_size_and_vector": ("soap", [(160, 130), (0, 130), (20000,)], {}, {}, None, True),
    "narrow_sides_not_deferred": ("soap", [(600, 30), (1024, 20)], {}, {}, None, False),
    "dykaf": ("dykaf", SHAPES, {}, {}, None, True),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_the_same_bits_in_place_or_not(case, monkeypatch):
    """Nine steps (a refresh every 4) in place and not: equal parameters and state, bit for bit, and the path taken
    where it should be (bfloat16 gradients are not of the state's dtype; under scope "block" without "raise" no
    gradient is read on the host; every = 1 refreshes every step; sides under 128 are not deferred)."""
    preset, shapes, overrides, kwargs, ctx, expect = _CASES[case]
    runs = {flag: _build(preset, flag, monkeypatch, shapes=shapes, **kwargs, **overrides) for flag in (True, False)}
    made = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    dtype = kwargs.get("dtype", torch.float32)
    for _ in range(9):
        grads = _grads(gen, shapes, dtype=dtype)
        for flag, (params, opt) in runs.items():
            _step(params, opt, grads, flag, monkeypatch, ctx)
    (p_on, o_on), (p_off, o_off) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(p_on, p_off))
    assert _same_state(_tensors(o_on, p_on), _tensors(o_off, p_off))
    assert bool(made["in_place"]) == expect


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", ["soap", "dykaf"])
def test_the_same_bits_over_nan_and_overflowing_gradients(scope, preset, monkeypatch):
    """Gradients of sizes 1e-6 to 1e3 drawn at random, a NaN, a gradient of 1e19 (the moments' square overflows)
    and one of 1e25 among them: the same bits in place or not, and every parameter finite."""
    shapes = [(160, 130), (128, 128), (130, 160)]
    runs = {flag: _build(preset, flag, monkeypatch, shapes=shapes, nonfinite_scope=scope, **{"refresh.every": 5})
            for flag in (True, False)}
    made = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(9)
    for k in range(16):
        grads = [torch.randn(s, generator=gen) * 10.0 ** float(torch.randint(-6, 4, (1,), generator=gen)) for s in shapes]
        if k % 7 == 3:
            grads[1][0, 0] = math.nan
        if k % 7 == 5:
            grads[0] = grads[0] * 1e19
        if k % 7 == 6:
            grads[2] = grads[2] * 1e25
        for flag, (params, opt) in runs.items():
            _step(params, opt, grads, flag, monkeypatch)
    (p_on, o_on), (p_off, o_off) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(p_on, p_off))
    assert _same_state(_tensors(o_on, p_on), _tensors(o_off, p_off))
    assert all(torch.isfinite(p).all() for p in p_on)
    assert made["in_place"] or scope == "block"


@pytest.mark.parametrize("how", ["load_state_dict", "assign", "inference_mode_edit", "deepcopy", "basis_load"])
def test_carried_bounds_are_not_trusted_after_a_load_copy_or_edit(how, monkeypatch):
    """After steps in place (bounds carried), the big block's moments (or basis) set to 1e37 by a load, by
    replacing ``state[p][k]``, by an edit inside ``torch.inference_mode`` (which still moves the version), or in a
    deep copy: the next step reads them again, refuses, and the guard skips the block."""
    params, opt = _build("soap", True, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        _step(params, opt, _grads(gen), True, monkeypatch)
    if how == "load_state_dict":
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0]["inner.exp_avg"].fill_(1e37)
        opt.load_state_dict(sd)
    elif how == "basis_load":
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0]["basis.Q_L"].mul_(1e30)
        opt.load_state_dict(sd)
    elif how == "assign":
        opt.state[params[0]]["inner.exp_avg"] = torch.full((160, 130), 1e37)
    elif how == "inference_mode_edit":
        with torch.inference_mode():
            opt.state[params[0]]["inner.exp_avg"].fill_(1e37)
    else:
        opt = copy.deepcopy(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        with torch.no_grad():
            opt.state[params[0]]["inner.exp_avg"].fill_(1e37)
    weights = params[0].detach().clone()
    _step(params, opt, _grads(gen), True, monkeypatch)
    assert torch.isfinite(params[0]).all() and torch.equal(params[0], weights)


def test_raise_with_an_overflow_in_another_bucket_steps_the_block_in_place_as_without(monkeypatch):
    """``nonfinite = "raise"``: a finite gradient of 1e32 in the small bucket overflows its update, raised at the end
    of the step; the big block stepped in place meanwhile, with the bits of the old path."""
    runs = {flag: _build("soap", flag, monkeypatch, nonfinite="raise") for flag in (True, False)}
    made = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        grads = _grads(gen)
        for flag, (params, opt) in runs.items():
            _step(params, opt, grads, flag, monkeypatch)
    grads = _grads(gen)
    grads[1] = grads[1] * 1e32
    before = made["in_place"].count((160, 130))
    for flag, (params, opt) in runs.items():
        with pytest.raises(FloatingPointError):
            _step(params, opt, grads, flag, monkeypatch)
    assert made["in_place"].count((160, 130)) == before + 1  # the raising step's call, made in place
    (p_on, o_on), (p_off, o_off) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(p_on, p_off))
    assert _same_state(_tensors(o_on, p_on), _tensors(o_off, p_off))


def test_a_gradient_aliasing_a_parameter_stepped_before_it_is_read_again(monkeypatch):
    """``p.grad = q.detach().T`` (a view sharing q's version counter): q's write bumps it, so the gradient's check
    no longer holds when its bucket steps and its proof is refused; the same bits as without."""
    shapes = [(160, 130), (130, 160)]
    runs = {flag: _build("soap", flag, monkeypatch, shapes=shapes) for flag in (True, False)}
    gen = torch.Generator().manual_seed(5)
    for k in range(8):
        grads = _grads(gen, shapes)
        for flag, (params, opt) in runs.items():
            monkeypatch.setattr(optimizer_module, "_ROTATED_MOMENTS_IN_PLACE", flag)
            params[0].grad = grads[0].clone()
            params[1].grad = params[0].detach().T if k % 2 else grads[1].clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
    (p_on, o_on), (p_off, o_off) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(p_on, p_off))
    assert _same_state(_tensors(o_on, p_on), _tensors(o_off, p_off))
