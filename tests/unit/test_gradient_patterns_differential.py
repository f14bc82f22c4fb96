"""Gradient and parameter patterns of real training, for every preset and the fallback AdamW group.

Mixture-of-experts (same-shape experts, a random subset without a gradient each step, zero gradients, an
expert first reached late, one frozen and unfrozen mid-run, a state dict saved and loaded mid-run), parameters
and gradients whose memory layout is not the contiguous one (transposed storage, ``channels_last``), parameters
that are slices of one storage and gradients that are views of one flat buffer, gradients of another dtype than
their parameter, ``step(closure)``, accumulation with clipping and hooks that change the gradients in place.

Every expected value comes from outside the pattern: ``torch.optim.AdamW`` / ``torch.optim.Muon`` where a preset
reduces to them, else the same kronopt preset run where the pattern is absent (each expert in an optimizer of its
own, contiguous tensors, the gradient cast by hand), fed the same gradients.
"""

import copy
import warnings

import pytest
import torch

import kronopt
from tests.torch_compat import needs_grad_dtype

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
PRESETS = list(kronopt.PRESETS)
#: presets with plain AdamW blocks (adamw, and the routed presets' fallback group), which may go through torch's fused
#: kernel, rounding otherwise than the general path that a non-contiguous or differently typed gradient takes
#: (docs/architecture.md: "it agrees with the general path up to rounding")
FUSED = {name for name, cfg in kronopt.PRESETS.items() if name == "adamw" or cfg.fallback is not None}


def _kw(preset):
    """A short refresh period, so that 50 steps hold many refreshes (no effect on adamw/muon's identity basis)."""
    return {} if preset in ("adamw", "muon") else {"refresh.every": 3}


def _skip_first(preset):
    return kronopt.PRESETS[preset].skip_first_call


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- mixture of experts ------------------------------------------------------------------------------------------

E, STEPS, SAVE_AT = 8, 50, 24
W_SHAPE, B_SHAPE = (6, 4), (6,)
WITH_BIAS = (0, 1, 2)  # a few experts carry a bias: the fallback AdamW group of the routed presets
LATE, TOGGLED, OFF = 4, 7, range(20, 30)  # expert 4 has no gradient on its first 5 steps; expert 7 frozen 20..29


def _moe_schedule(seed, dtype=F64):
    """Per step and expert: ``None`` (no token reached it, ``zero_grad(set_to_none=True)``), a zero gradient
    (``set_to_none=False``) or a random one, as ``(weight grad, bias grad or None)``."""
    gen = torch.Generator().manual_seed(seed)
    init = [(torch.randn(W_SHAPE, generator=gen, dtype=dtype), torch.randn(B_SHAPE, generator=gen, dtype=dtype)) for _ in range(E)]
    kind = torch.randint(0, 4, (STEPS, E), generator=gen)  # 0: None, 1: zero, 2-3: a gradient
    kind[:5, LATE] = 0
    kind[0, 0] = 1  # a zero gradient on a first call
    kind[list(OFF), TOGGLED] = 0
    rows = []
    for t in range(STEPS):
        row = []
        for i in range(E):
            k = int(kind[t, i])
            gw, gb = torch.randn(W_SHAPE, generator=gen, dtype=dtype), torch.randn(B_SHAPE, generator=gen, dtype=dtype)
            row.append(None if k == 0 else (gw * 0, gb * 0) if k == 1 else (gw, gb))
        rows.append(row)
    return init, rows


class _Experts:
    """Some of the experts, their parameters named as a MoE layer names them, in one kronopt optimizer."""

    def __init__(self, preset, init, which, params=None):
        self.which = list(which)
        if params is None:
            params = {i: (torch.nn.Parameter(init[i][0].clone()), torch.nn.Parameter(init[i][1].clone())) for i in which}
        self.p = params
        named = []
        for i in self.which:
            named.append((f"moe.experts.{i}.weight", self.p[i][0]))
            if i in WITH_BIAS:
                named.append((f"moe.experts.{i}.bias", self.p[i][1]))
        self.opt = kronopt.build(named, preset, **_kw(preset))

    def feed(self, row, t):
        for i in self.which:
            w, b = self.p[i]
            w.requires_grad_(not (i == TOGGLED and t in OFF))  # frozen, then trainable again
            w.grad = None if row[i] is None else row[i][0].clone()
            b.grad = None if row[i] is None or i not in WITH_BIAS else row[i][1].clone()

    def snapshot(self):
        return {i: tuple(x.detach().clone() for x in self.p[i]) for i in self.which}

    def counters(self, i):
        s = self.opt.state[self.p[i][0]]
        return s.get("calls"), s.get("step"), s.get("basis.refreshes")


@pytest.mark.parametrize("preset", PRESETS)
def test_moe_experts_step_as_each_expert_alone_and_resume_bit_for_bit(preset):
    """Eight same-shape experts, each step a random subset without a gradient (and some with a zero one), over
    50 steps: every expert's trajectory, call and step counters and refresh count after every step equal those
    of the same expert in an optimizer of its own fed the same gradients; a state dict saved at step 25 and
    loaded into a fresh optimizer continues bit for bit.

    Catches: a split bucket whose blocks share one counter or refresh schedule, a ``None`` gradient taken as zero
    (or a zero one as none), an expert first reached late starting from its bucket's counters, an expert frozen
    mid-run that moves or whose state advances, a load that merges split buckets or loses their counters."""
    init, rows = _moe_schedule(0)
    moe = _Experts(preset, init, range(E))
    alone = [_Experts(preset, init, [i]) for i in range(E)]
    saved = None
    for t, row in enumerate(rows):
        moe.feed(row, t)
        moe.opt.step()
        for a in alone:
            a.feed(row, t)
            a.opt.step()
        for i, a in enumerate(alone):
            for x, y in zip(moe.p[i], a.p[i]):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14, msg=f"{preset} step {t} expert {i}")
            assert moe.counters(i) == a.counters(i), (preset, t, i)
        if t == SAVE_AT:
            saved = copy.deepcopy(moe.opt.state_dict()), moe.snapshot()
    # dykaf.md §5: under DyKAF's start from the gradient, an exactly zero gradient before the first call is no call
    late = preset in ("dykaf", "dykaf_rank1", "pro_dykaf")
    calls = [0] * E
    for i in range(E):
        for row in rows:
            if row[i] is not None and (calls[i] or not late or bool(row[i][0].any())):
                calls[i] += 1
    for i in range(E):
        got_calls, got_step, _ = moe.counters(i)
        assert got_calls == calls[i]
        assert got_step == calls[i] - (1 if _skip_first(preset) else 0)
    assert moe.p[TOGGLED][0].requires_grad

    # the resume: a fresh model and optimizer, the saved parameters and state
    sd, params = saved
    fresh = _Experts(preset, init, range(E), {i: tuple(torch.nn.Parameter(x.clone()) for x in params[i]) for i in range(E)})
    fresh.opt.load_state_dict(sd)
    end = moe.snapshot()
    for t in range(SAVE_AT + 1, STEPS):
        fresh.feed(rows[t], t)
        fresh.opt.step()
    for i in range(E):
        assert all(torch.equal(x.detach(), y) for x, y in zip(fresh.p[i], end[i])), (preset, i)
        assert fresh.counters(i) == moe.counters(i)


def _moe_torch_run(make, seed=1):
    """Eight experts (weights and biases, float32) with random absent subsets, through ``make(weights, biases)``."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(W_SHAPE, generator=gen)) for _ in range(E)]
    bs = [torch.nn.Parameter(torch.randn(B_SHAPE, generator=gen)) for _ in range(E)]
    opt = make(ws, bs)
    for _ in range(STEPS):
        kind = torch.randint(0, 3, (E,), generator=gen)
        for w, b, k in zip(ws, bs, kind.tolist()):
            gw, gb = torch.randn(W_SHAPE, generator=gen), torch.randn(B_SHAPE, generator=gen)
            w.grad, b.grad = (None, None) if k == 0 else (gw * 0, gb * 0) if k == 1 else (gw, gb)
        opt.step()
    return [p.detach() for p in ws + bs], opt


def _named(ws, bs):
    return [x for i, (w, b) in enumerate(zip(ws, bs)) for x in ((f"moe.experts.{i}.weight", w), (f"moe.experts.{i}.bias", b))]


def test_moe_adamw_equals_torch_adamw_bit_for_bit():
    """Catches: an absent expert decayed or counted, a split bucket's bias correction off by its neighbours' calls."""
    ours, _ = _moe_torch_run(lambda ws, bs: kronopt.build(_named(ws, bs), "adamw"))
    theirs, _ = _moe_torch_run(lambda ws, bs: torch.optim.AdamW(ws + bs, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_moe_muon_and_its_adamw_fallback_equal_torch():
    """The experts' matrices through ``torch.optim.Muon``, their biases through the fallback's
    ``torch.optim.AdamW`` (lr 9e-3, betas (0.9, 0.95), eps 1e-10, no decay), absent experts skipped by both.
    Newton–Schulz runs in bfloat16 in both, rounded otherwise: over 50 steps at lr 3e-2 the two drift apart by up
    to about 6e-4 with every expert present every step, so the bound is 2e-3; an absent expert taken for a zero
    one (a step of lr · NS(momentum), entries of order 1e-2) or an expert's momentum lost is far past it."""

    class Both:
        def __init__(self, ws, bs):
            self.muon = torch.optim.Muon(ws, lr=3e-2, weight_decay=0.1)
            self.adamw = torch.optim.AdamW(bs, lr=9e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

        def step(self):
            self.muon.step()
            self.adamw.step()

    ours, _ = _moe_torch_run(lambda ws, bs: kronopt.build(_named(ws, bs), "muon"))
    theirs, _ = _moe_torch_run(Both)
    for a, b in zip(ours[:E], theirs[:E]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    for a, b in zip(ours[E:], theirs[E:]):  # the biases: AdamW, no Newton–Schulz
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- memory layouts: non-contiguous parameters and gradients, slices of one storage, flat gradient buffers ---------

LAYOUT_SHAPES = [(6, 4), (6, 4), (4, 3, 2, 2), (5,)]


def _other_layout(x):
    """The same values in another memory layout: a matrix stored transposed, a 4-D tensor channels_last."""
    if x.ndim == 2:
        return x.t().contiguous().t()
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.clone()


@pytest.mark.parametrize("preset", PRESETS)
def test_non_contiguous_parameters_and_gradients_step_as_contiguous_ones(preset):
    """A parameter stored transposed (a ``weight.t()`` registered as its own parameter) or ``channels_last`` (a conv
    after ``model.to(memory_format=torch.channels_last)``), and gradients in a layout other than the parameter's:
    the same steps as the contiguous run, and every parameter keeps its own layout and storage.

    Catches: a step written into a reshaped copy of a non-contiguous parameter (lost), a block read through the
    wrong strides (a transposed matrix taken for the original), state views shaped with the parameter's strides."""
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen) for s in LAYOUT_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in LAYOUT_SHAPES] for _ in range(8)]

    def run(param_layout, grad_layout):
        ps = [torch.nn.Parameter(param_layout(x)) for x in init]
        where = [p.data_ptr() for p in ps]
        opt = kronopt.build([(f"layers.{i}.weight", p) for i, p in enumerate(ps)], preset, lr=1e-2, **_kw(preset))
        for row in grads:
            for p, g in zip(ps, row):
                p.grad = grad_layout(g)
            opt.step()
        assert [p.data_ptr() for p in ps] == where  # written in place
        return ps

    def same(x):
        return x.clone()

    ref = run(same, same)
    for param_layout, grad_layout in ((_other_layout, same), (same, _other_layout), (_other_layout, _other_layout)):
        got = run(param_layout, grad_layout)
        for p, q, x in zip(got, ref, init):
            assert p.stride() == param_layout(x).stride()
            if preset in FUSED:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p.detach(), q.detach()), (preset, tuple(p.shape))


@pytest.mark.parametrize("preset", PRESETS)
def test_slices_of_one_storage_and_gradients_in_one_flat_buffer_step_as_separate_tensors(preset):
    """Three ``(4, 4)`` parameters that are slices of one ``(12, 4)`` tensor (views of one storage, as flat-parameter
    wrappers and hand-split fused projections register them), and gradients that are views of one flat buffer
    refilled in place each step (DDP's ``gradient_as_bucket_view``): the same steps as separate tensors, the
    storage still shared and holding the stepped values.

    Catches: a write that goes to a copy of a slice, a gradient view read before its buffer was refilled (a copy
    kept from an earlier step), one slice's step leaking into its neighbour."""
    gen = torch.Generator().manual_seed(3)
    base0 = torch.randn(12, 4, generator=gen)
    grads = [torch.randn(12, 4, generator=gen) for _ in range(8)]

    def build(ps):
        return kronopt.build([(f"attn.{n}.weight", p) for n, p in zip("qkv", ps)], preset, lr=1e-2, **_kw(preset))

    base = base0.clone()
    sliced = [torch.nn.Parameter(base[4 * i : 4 * i + 4]) for i in range(3)]
    separate = [torch.nn.Parameter(base0[4 * i : 4 * i + 4].clone()) for i in range(3)]
    flat_fed = [torch.nn.Parameter(base0[4 * i : 4 * i + 4].clone()) for i in range(3)]
    opts = [build(sliced), build(separate), build(flat_fed)]
    flat = torch.zeros(48)
    for i, p in enumerate(flat_fed):
        p.grad = flat[16 * i : 16 * i + 16].view(4, 4)
    for g in grads:
        for i in range(3):
            sliced[i].grad = g[4 * i : 4 * i + 4].clone()
            separate[i].grad = g[4 * i : 4 * i + 4].clone()
        flat.copy_(g.reshape(-1))
        for opt in opts:
            opt.step()
    for i in range(3):
        assert torch.equal(sliced[i].detach(), separate[i].detach()), (preset, i)
        assert torch.equal(flat_fed[i].detach(), separate[i].detach()), (preset, i)
        assert sliced[i].data_ptr() == base[4 * i].data_ptr()
    assert torch.equal(base, torch.cat([p.detach() for p in separate]))


# -- gradients of another dtype than their parameter -------------------------------------------------------------

DTYPE_SHAPES = [(6, 4), (6, 4), (4, 3, 2, 2), (6,)]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [(torch.float32, torch.float16), (torch.float32, torch.float64), (torch.float64, torch.float32)],
    ids=["fp16-grad-on-fp32", "fp64-grad-on-fp32", "fp32-grad-on-fp64"],
)
@needs_grad_dtype
def test_gradients_of_another_dtype_step_as_the_gradient_cast_to_the_parameters(preset, param_dtype, grad_dtype):
    """A gradient kept in another dtype than its parameter (``p.grad_dtype = None``, as some mixed-precision setups
    keep float16 gradients or accumulate in float64), alone or beside ones of the parameter's dtype in one bucket:
    the step of the same gradient cast to the parameter's dtype by hand (exactly, where the cast is what the step
    computes in; up to the fused kernel's rounding for plain AdamW, whose fused path such a gradient leaves).

    Catches: a gradient of another dtype reinterpreted (its bits read as the parameter's dtype), a bucket whose
    stack takes the first gradient's dtype, the fast AdamW path fed a gradient its kernel refuses."""
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen, dtype=param_dtype) for s in DTYPE_SHAPES]
    grads = [[torch.randn(s, generator=gen).to(grad_dtype) for s in DTYPE_SHAPES] for _ in range(6)]

    def run(cast):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        for p in ps:
            p.grad_dtype = None
        opt = kronopt.build([(f"layers.{i}.weight", p) for i, p in enumerate(ps)], preset, lr=1e-2, **_kw(preset))
        for t, row in enumerate(grads):
            for i, (p, g) in enumerate(zip(ps, row)):
                mixed = i == 1 and t % 2  # the second matrix's gradient in the parameter's dtype every other step
                p.grad = g.to(param_dtype) if cast or mixed else g.clone()
            opt.step()
        return ps

    got, ref = run(cast=False), run(cast=True)
    for p, q in zip(got, ref):
        assert p.dtype == param_dtype
        if preset in FUSED:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p.detach(), q.detach()), (preset, tuple(p.shape))


@needs_grad_dtype
@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_complex_gradient_on_a_real_parameter_is_refused_naming_it(preset, scope):
    """torch.optim.AdamW refuses such a gradient (a dtype error); kronopt refuses a sparse gradient and one of
    another shape by name before anything changes (``_check_grads``), and must do the same here rather than fail
    anonymously or step on the real part alone."""
    gen = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    other = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    opt = kronopt.build([("moe.experts.0.weight", w), ("moe.experts.1.weight", other)], preset, nonfinite_scope=scope)
    w.grad_dtype = None
    w.grad = torch.complex(torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen))
    other.grad = torch.randn(6, 4, generator=gen)
    before = [w.detach().clone(), other.detach().clone()]
    with pytest.raises((RuntimeError, TypeError, ValueError), match=r"moe\.experts\.0\.weight"):
        for _ in range(2):  # a first call may only observe
            opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(other.detach(), before[1])


# -- step(closure), accumulation, clipping and in-place changes of the gradients --------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.block = torch.nn.Linear(4, 6)
        self.lm_head = torch.nn.Linear(6, 10)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.block(self.embed(x))))


def _net_and_batches(seed, n):
    torch.manual_seed(seed)
    net = _Net()
    gen = torch.Generator().manual_seed(seed)
    return net, [torch.randint(0, 10, (4, 5), generator=gen) for _ in range(n)]


def _loss(net, x):
    return torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


@pytest.mark.parametrize("preset", PRESETS)
def test_step_with_a_closure_uses_the_gradients_the_closure_computed(preset):
    """``step(closure)`` runs the closure once, before the update, and steps on the gradients it computed (after
    its own ``zero_grad``): the same parameters as computing the gradients first and calling ``step()``, and the
    loss it returned.

    Catches: gradients read before the closure ran (the previous step's), a closure run twice (its gradients
    accumulated twice), the returned loss lost."""
    net, batches = _net_and_batches(6, 6)
    twin = copy.deepcopy(net)
    opt = kronopt.build(list(net.named_parameters()), preset, lr=1e-2, **_kw(preset))
    ref = kronopt.build(list(twin.named_parameters()), preset, lr=1e-2, **_kw(preset))
    for x in batches:
        calls = []

        def closure(x=x):
            calls.append(1)
            opt.zero_grad()
            loss = _loss(net, x)
            loss.backward()
            return loss

        out = opt.step(closure)
        ref.zero_grad()
        expected = _loss(twin, x)
        expected.backward()
        ref.step()
        assert len(calls) == 1 and torch.equal(out.detach(), expected.detach())
    for (n, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p.detach(), q.detach()), (preset, n)


@pytest.mark.parametrize("preset", PRESETS)
def test_accumulation_clipping_and_in_place_hooks_step_on_the_gradients_as_they_are_at_step_time(preset):
    """Micro-batch accumulation into gradients kept across steps (``zero_grad(set_to_none=False)``),
    ``clip_grad_norm_``, then a step pre-hook that halves every gradient through ``.data`` (an in-place change
    that leaves the version counter alone) and a post-accumulate-grad hook that adds a constant: the parameters
    equal those of the same preset fed, as fresh tensors, the gradients as they were when ``step`` ran.

    Catches: a gradient's check or copy kept from an earlier step or taken before the hooks and the clipping (keyed
    by the tensor and its version counter), state aliasing ``p.grad`` so that zeroing it moves the moments."""
    net, batches = _net_and_batches(7, 12)
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = kronopt.build(list(net.named_parameters()), preset, lr=1e-2, **_kw(preset))
    seen = []

    def halve(_opt, _args, _kwargs):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.data.mul_(0.5)
        seen.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})

    opt.register_step_pre_hook(halve)
    def nudge(p):
        p.grad.add_(1e-3)

    net.block.weight.register_post_accumulate_grad_hook(nudge)
    for s in range(len(batches) // 3):
        for x in batches[3 * s : 3 * s + 3]:
            (_loss(net, x) / 3).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=False)
    params = {n: torch.nn.Parameter(x.clone()) for n, x in init.items()}
    ref = kronopt.build(list(params.items()), preset, lr=1e-2, **_kw(preset))
    for grads in seen:
        for n, p in params.items():
            p.grad = grads[n].clone()
        ref.step()
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), params[n].detach()), (preset, n)
