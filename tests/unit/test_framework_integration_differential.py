"""kronopt driven the way training frameworks drive an optimizer, against torch.optim.AdamW in the same harness.

Few practitioners call ``optimizer.step()`` themselves: HF Accelerate / Trainer, PyTorch Lightning (Trainer
and Fabric), torchtune and torch's own utilities wrap the optimizer. None of them is a dependency, so each
harness below repeats, in plain torch, the calls the framework makes on the optimizer it holds (the source
each follows is named in its docstring). The ``adamw`` preset must then behave as ``torch.optim.AdamW`` does
in the same harness, bit for bit (on a CPU kronopt's AdamW runs torch's fused kernel, so the reference is
``torch.optim.AdamW(fused=True)``, docs/architecture.md); the other presets must end where an unwrapped run
of the same preset ends.
"""

import collections
import copy
import functools
import inspect
import warnings

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.optim.swa_utils import SWALR

import kronopt

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = ["soap", "muon", "dykaf", "pro_kl_shampoo"]
LR = 1e-2


# -- a small model and its data --------------------------------------------------------------------------


def _model(dtype=torch.float64, bias=True, seed=0):
    """Linear(4, 6) → tanh → Linear(6, 3): matrices of two shapes and (with ``bias``) two vectors."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=bias), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.to(dtype)


def _batches(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=g, dtype=dtype) for _ in range(n)]


def _loss(model, x):
    return model(x).pow(2).mean()


def _torch_adamw(params):
    return torch.optim.AdamW(params, lr=LR, fused=True)


def _kron(preset):
    def make(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # name-routed presets on unnamed parameters
            return kronopt.build(params, preset, lr=LR, **{"refresh.every": 2})

    return make


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _plain_run(make, steps=8, dtype=torch.float64, bias=True):
    """The unwrapped reference: build, then ``zero_grad`` / backward / ``step`` on each batch."""
    model = _model(dtype, bias)
    opt = make(model.parameters())
    for x in _batches(steps, dtype):
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    return model, opt


def _saved_tensors(sd):
    """Every tensor of a state dict's ``state``, by (parameter index, key)."""
    return {(i, k): v for i, entry in sd["state"].items() for k, v in entry.items() if torch.is_tensor(v)}


# -- what the frameworks do, repeated in plain torch ---------------------------------------------------------


def _move_to_device(state, device):
    """accelerate.optimizer.move_to_device: every tensor of a nested structure ``.to(device)``."""
    if isinstance(state, (list, tuple)):
        return type(state)(_move_to_device(t, device) for t in state)
    if isinstance(state, dict):
        return type(state)({k: _move_to_device(v, device) for k, v in state.items()})
    if isinstance(state, torch.Tensor):
        return state.to(device)
    return state


class _AcceleratedOptimizer(torch.optim.Optimizer):
    """accelerate.optimizer.AcceleratedOptimizer, device placement on, no XLA: at construction the wrapped
    optimizer's state dict is moved to the device and loaded back; ``state``, ``param_groups`` and
    ``defaults`` are the wrapped optimizer's; ``zero_grad`` looks ``set_to_none`` up in the signature; with
    a scaler, ``step`` swaps a patched ``optimizer.step`` in for ``scaler.step`` and puts the old one back."""

    def __init__(self, optimizer, device, scaler=None):
        self.optimizer = optimizer
        self.scaler = scaler
        self._is_overflow = False
        if scaler is not None:
            self._accelerate_step_called = False
            self._optimizer_original_step_method = self.optimizer.step
            self._optimizer_patched_step_method = self._patch_step(self.optimizer.step)
        state_dict = _move_to_device(self.optimizer.state_dict(), device)
        self.optimizer.load_state_dict(state_dict)

    def _patch_step(self, method):
        def patched_step(*args, **kwargs):
            self._accelerate_step_called = True
            return method(*args, **kwargs)

        return patched_step

    state = property(lambda self: self.optimizer.state)
    param_groups = property(lambda self: self.optimizer.param_groups)
    defaults = property(lambda self: self.optimizer.defaults)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=None):
        if "set_to_none" in inspect.signature(self.optimizer.zero_grad).parameters:
            self.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)
        else:
            self.optimizer.zero_grad()

    def step(self, closure=None):
        if self.scaler is None:
            self.optimizer.step(closure)
            return
        self.optimizer.step = self._optimizer_patched_step_method
        self.scaler.step(self.optimizer, closure)
        self.scaler.update()
        self._is_overflow = not self._accelerate_step_called
        self.optimizer.step = self._optimizer_original_step_method
        self._accelerate_step_called = False

    @property
    def step_was_skipped(self):
        return self._is_overflow

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)


def _apply_to_collection(data, function):
    """lightning_utilities' apply_to_collection for tensors: a new container of the same type, ``function``
    applied to every tensor."""
    if isinstance(data, torch.Tensor):
        return function(data)
    if isinstance(data, dict):
        return type(data)((k, _apply_to_collection(v, function)) for k, v in data.items())
    if isinstance(data, (list, tuple)):
        return type(data)(_apply_to_collection(v, function) for v in data)
    return data


def _lightning_optimizer_to_device(optimizer, device):
    """lightning.fabric.utilities.optimizer._optimizer_to_device: every ``state[p]`` replaced by a new dict
    of its tensors moved (Strategy.setup, Strategy.load_optimizer_state_dict, Strategy.teardown)."""
    for p, v in optimizer.state.items():
        optimizer.state[p] = _apply_to_collection(v, lambda t: t.to(device))


def _moved(value, device):
    """``value.to(device)`` as a move to another device leaves it: a new tensor holding the same values (on
    one device ``.to`` hands back the tensor itself, so the copy is asked for)."""
    return value.to(device, copy=True)


def _offload_optimizer(optimizer):
    """verl / OpenRLHF's ``offload_fsdp_optimizer``: every state tensor replaced by its copy on the CPU."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = _moved(value, "cpu")


def _load_optimizer(optimizer, device):
    """verl / OpenRLHF's ``load_fsdp_optimizer``: every state tensor replaced by its copy on ``device``."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = _moved(value, device)


class _ForwardingOptimizer:
    """lightning.fabric.wrappers._FabricOptimizer (and lightning.pytorch.core.optimizer.LightningOptimizer):
    an instance of a class made on the fly from the wrapper and the optimizer's class (so ``isinstance``
    checks pass), which forwards every attribute it lacks to the optimizer; ``step`` (and for Fabric
    ``state_dict``/``load_state_dict``) go to the optimizer, every other method runs with the wrapper as
    ``self``."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Fabric" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})

    @property
    def optimizer(self):
        return self._optimizer

    def state_dict(self):
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self._optimizer.load_state_dict(state_dict)

    def step(self, closure=None):
        return self._optimizer.step(**({"closure": closure} if closure is not None else {}))

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


class _CopiedDictOptimizer:
    """The _FabricOptimizer of Lightning 2.0–2.1: a shallow copy of the optimizer's ``__dict__`` instead of
    forwarding, ``state_dict`` and ``step`` going to the optimizer."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("state_dict", "step", "__del__")}
        self.__class__ = type("Fabric" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})
        self._optimizer = optimizer

    def state_dict(self):
        return self._optimizer.state_dict()

    def step(self, closure=None):
        return self._optimizer.step(**({"closure": closure} if closure is not None else {}))


# -- HF Accelerate: the state dict round trip at construction -------------------------------------------------


def _accelerate_run(make, steps=8, dtype=torch.float64, cast_to=None, cast_when=None, scheduler=True):
    """Build, attach a scheduler, wrap as Accelerate does (state dict moved and loaded back), train. ``cast_to``:
    the model cast ``"before"`` or ``"after"`` the wrapper was made (Fabric's precision plugins cast it after the
    optimizer was built; Accelerate's separate ``prepare`` calls may move it after the optimizer's)."""
    model = _model(dtype)
    opt = make(model.parameters())
    sched = lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k)) if scheduler else None
    if cast_when == "before":
        model.to(cast_to)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the round trip must be silent
        wrapped = _AcceleratedOptimizer(opt, torch.device("cpu"))
    if cast_when == "after":
        model.to(cast_to)
    lrs = []
    for x in _batches(steps, cast_to or dtype):
        wrapped.zero_grad()
        _loss(model, x).backward()
        wrapped.step()
        if sched is not None:
            sched.step()
        lrs.append([g["lr"] for g in wrapped.param_groups])
    return model, wrapped, lrs


@pytest.mark.parametrize("preset", ["adamw", *PRESETS])
def test_a_model_cast_by_swapping_its_tensors_after_a_step_trains_as_one_cast_by_assignment(preset):
    """Under torch's swap on conversion (``torch.__future__``; DTensor parameters always take it) a cast swaps each
    parameter's and gradient's contents in place, which torch refuses for a tensor something holds a weak
    reference to. The step's gradient verdicts held one to each gradient until the next step: ``model.to`` failed
    half-way ("Couldn't swap Linear.weight.grad"), where torch's AdamW casts the same model. Cast either way, the
    training goes on alike."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    runs = []
    try:
        for swap in (False, True):
            torch.__future__.set_swap_module_params_on_conversion(swap)
            model = _model(torch.float64)
            opt = _kron(preset)(model.parameters())
            xs = _batches(6, torch.float32)
            for x in xs[:3]:
                opt.zero_grad()
                _loss(model, x.double()).backward()
                opt.step()
            model.to(torch.float32)  # the gradients of the last step still there, as a training loop leaves them
            assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
            for x in xs[3:]:
                opt.zero_grad()
                _loss(model, x).backward()
                opt.step()
            runs.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_adamw_casts_a_model_by_swapping_after_a_step():
    """The peer the test above holds kronopt to: torch's AdamW keeps no reference to the gradients."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = _model(torch.float64)
        opt = _torch_adamw(model.parameters())
        _loss(model, _batches(1)[0]).backward()
        opt.step()
        model.to(torch.float32)
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


def test_accelerate_round_trip_at_construction_then_training_equals_torch_adamw():
    """Catches: a state dict taken before any step and loaded back (what AcceleratedOptimizer does when
    wrapping) that changes a counter, a first-step flag or the groups a scheduler wrote (``initial_lr``), or that
    warns; the adamw preset must then train as torch.optim.AdamW does behind the same wrapper."""
    ours, opt, lrs_ours = _accelerate_run(_kron("adamw"))
    theirs, _, lrs_theirs = _accelerate_run(_torch_adamw)
    assert lrs_ours == lrs_theirs
    assert _same(_weights(ours), _weights(theirs))
    assert all(entry["step"] == 8 for entry in opt.state_dict()["state"].values())


@pytest.mark.parametrize("preset", PRESETS)
def test_accelerate_round_trip_leaves_each_preset_on_its_unwrapped_trajectory(preset):
    """Catches: a preset whose pre-step state (identity bases, empty factors, skip-first-call flags) does not
    survive a save/load before the first step, so that the wrapped run leaves the unwrapped one."""
    wrapped, wopt, _ = _accelerate_run(_kron(preset), scheduler=False)
    plain, popt = _plain_run(_kron(preset))
    assert _same(_weights(wrapped), _weights(plain))
    a, b = _saved_tensors(wopt.state_dict()), _saved_tensors(popt.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "when",
    [
        "before",
        "after",
    ],
)
def test_a_model_cast_around_the_accelerate_round_trip_steps_as_torch_adamw(when):
    """A float32 model cast to float64 before or after the wrapper's state dict round trip, both before the
    first step: torch.optim.AdamW has no state yet either way and makes float64 state at the first step.
    Catches: kronopt's eagerly made float32 state kept for float64 parameters (its updates then rounded
    through float32) because a load happened in between (``_unstepped_placement`` is cleared by every load).
    The device form of the sequence, ``model.cuda()`` after the wrapper, is not run here."""
    ours, opt, _ = _accelerate_run(_kron("adamw"), dtype=torch.float32, cast_to=torch.float64, cast_when=when)
    theirs, _, _ = _accelerate_run(_torch_adamw, dtype=torch.float32, cast_to=torch.float64, cast_when=when)
    states = [v for entry in opt.state.values() for v in entry.values() if torch.is_tensor(v) and v.ndim]
    assert all(v.dtype == torch.float64 for v in states)
    assert _same(_weights(ours), _weights(theirs))


def test_a_state_dict_saved_before_any_step_resumes_into_a_fresh_optimizer_as_torch_adamw():
    """A checkpoint written before the first step (a job that saves at step 0), loaded into a fresh optimizer of
    a fresh model: torch's holds no state, kronopt's holds the eager pre-step state. Both must train the same."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        first = _model()
        sd = copy.deepcopy(make(first.parameters()).state_dict())
        model = _model()
        opt = make(model.parameters())
        opt.load_state_dict(sd)
        for x in _batches(6):
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
        results.append(_weights(model))
    assert _same(*results)


# -- Lightning: state moved with _optimizer_to_device ----------------------------------------------------------


def _lightning_run(make, moves, resume_at=None, steps=8):
    """Train with a step at which one parameter has no gradient (its bucket splits); with ``moves``, Lightning's
    ``_optimizer_to_device`` as its Strategy calls it: at setup, after the first step and every third, and
    around a checkpoint's resume (teardown, then the new optimizer's setup and ``load_optimizer_state_dict``)."""
    cpu = torch.device("cpu")
    model = _model()
    opt = make(model.parameters())
    if moves:
        _lightning_optimizer_to_device(opt, cpu)
    for t, x in enumerate(_batches(steps)):
        if t == resume_at:
            sd = copy.deepcopy(opt.state_dict())
            if moves:
                _lightning_optimizer_to_device(opt, cpu)
            model = copy.deepcopy(model)
            opt = make(model.parameters())
            if moves:
                _lightning_optimizer_to_device(opt, cpu)
            opt.load_state_dict(sd)
            if moves:
                _lightning_optimizer_to_device(opt, cpu)
        opt.zero_grad()
        _loss(model, x).backward()
        if t == 3:
            model[2].bias.grad = None
        opt.step()
        if moves and t % 3 == 0:
            _lightning_optimizer_to_device(opt, cpu)
    return model, opt


@pytest.mark.parametrize("preset", ["adamw", *PRESETS])
def test_lightning_optimizer_to_device_at_setup_after_steps_and_after_a_load_changes_nothing(preset):
    """Lightning's Strategy calls ``_optimizer_to_device`` at setup, after ``load_optimizer_state_dict`` and at
    teardown: every ``state[p]`` is replaced by a new dict (its tensors moved; on one device, the same tensors).
    Catches: state kept by dict identity (a split bucket or a refresh writing into a dict no longer in
    ``state``), so that training, a checkpoint or its resume go wrong after the dicts were swapped. The
    reference is the same run without the moves (for adamw also torch.optim.AdamW with the moves)."""
    make = _kron(preset)
    plain, popt = _lightning_run(make, moves=False)
    for resume_at in (None, 5):
        ours, opt = _lightning_run(make, moves=True, resume_at=resume_at)
        assert _same(_weights(ours), _weights(plain))
        a, b = _saved_tensors(opt.state_dict()), _saved_tensors(popt.state_dict())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if preset == "adamw":
        assert _same(_weights(plain), _weights(_lightning_run(_torch_adamw, moves=True, resume_at=5)[0]))


# -- state tensors replaced by moved copies (offload / reload) -------------------------------------------------


def _offload_run(make, offload_at=None, steps=8, resume_from=None):
    """Train; before step ``offload_at`` the optimizer state is offloaded to the CPU and loaded back (verl's
    offload_fsdp_optimizer / load_fsdp_optimizer around a rollout). ``resume_from``: a state dict to start from
    (a fresh model at the saved weights)."""
    model = _model()
    batches = _batches(steps)
    start = 0
    if resume_from is not None:
        weights, sd, start = resume_from
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
    opt = make(model.parameters())
    if resume_from is not None:
        opt.load_state_dict(sd)
    for t in range(start, steps):
        if t == offload_at:
            _offload_optimizer(opt)
            _load_optimizer(opt, torch.device("cpu"))
        opt.zero_grad()
        _loss(model, batches[t]).backward()
        opt.step()
    return model, opt


def test_offloaded_and_reloaded_state_steps_the_parameters_as_torch_adamw():
    """The steps after an offload/reload of the state (every state tensor replaced by a copy of equal value)
    move the parameters as torch.optim.AdamW's, which steps the copies. Catches: a step that reads a replaced
    tensor half-way (some stages from the stacks, some from ``state[p]``)."""
    ours = _offload_run(_kron("adamw"), offload_at=3)[0]
    theirs = _offload_run(_torch_adamw, offload_at=3)[0]
    assert _same(_weights(ours), _weights(theirs))


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_bug_a_checkpoint_after_an_offload_and_reload_holds_the_current_state(preset):
    """After an offload/reload at step 3 and five more steps, ``state_dict()`` must hold the state of step 8 (an
    unwrapped run's, bit for bit), and a resume from it must continue as the uninterrupted run. torch.optim
    steps and saves the replaced tensors, so its checkpoint is current. kronopt steps its stacks and leaves
    ``state[p]`` pointing at the copies of step 3: the checkpoint mixes step-8 counters with step-3 tensors.
    On a GPU the offload also frees nothing (the stacks stay on the device)."""
    make = _kron(preset)
    model, opt = _offload_run(make, offload_at=3, steps=8)
    plain, popt = _offload_run(make, offload_at=None, steps=8)
    a, b = _saved_tensors(opt.state_dict()), _saved_tensors(popt.state_dict())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = _offload_run(make, steps=12, resume_from=(_weights(model), copy.deepcopy(opt.state_dict()), 8))[0]
    straight = _offload_run(make, steps=12)[0]
    assert _same(_weights(resumed), _weights(straight))


# -- optimizer.step wrapped: schedulers, Accelerate's scaler patch, step hooks ---------------------------------


def test_step_wrapped_by_a_scheduler_and_accelerates_scaler_patch_equals_torch_adamw():
    """The LR scheduler wraps ``optimizer.step`` (``_wrapped_by_lr_sched``, ``_opt_called``), then Accelerate's
    mixed-precision step swaps a patched ``step`` in around ``GradScaler.step`` and puts the scheduler's back;
    one batch gives an infinite loss, whose step the scaler skips. Catches: a kronopt ``step`` that cannot be
    wrapped or swapped as an attribute, a skipped step that still moves state, and the scheduler's warnings
    ("optimizer.step() has been overridden", "lr_scheduler.step() before optimizer.step()"). The reference is
    torch's single-tensor AdamW: the fused one steps under the scaler itself (``_step_supports_amp_scaling``).
    kronopt's CPU AdamW runs the fused kernel, whose bits equal the single-tensor form's on some processors (an
    Intel Xeon) and differ in the last bit on others (an AMD EPYC): the weights agree to float32 rounding; a
    skipped step that moved anything would move them by about ``lr``."""
    results = []
    for make in (_kron("adamw"), lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=False)):
        model = _model(torch.float32)
        opt = make(model.parameters())
        sched = lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        wrapped = _AcceleratedOptimizer(opt, torch.device("cpu"), scaler=scaler)
        skipped, lrs = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t, x in enumerate(_batches(6, torch.float32)):
                wrapped.zero_grad()
                loss = _loss(model, x) * (float("inf") if t == 2 else 1.0)
                scaler.scale(loss).backward()
                wrapped.step()
                skipped.append(wrapped.step_was_skipped)
                if not wrapped.step_was_skipped:
                    sched.step()
                lrs.append(opt.param_groups[0]["lr"])
        assert hasattr(opt.step, "_wrapped_by_lr_sched")
        assert not [w for w in caught if "lr_scheduler" in str(w.message) or "overridden" in str(w.message)]
        results.append((_weights(model), skipped, lrs))
    (ours, s1, l1), (theirs, s2, l2) = results
    assert s1 == s2 == [False, False, True, False, False, False]
    assert l1 == l2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_hooks_that_clip_gradients_and_average_weights_equal_torch_adamw():
    """Frameworks hang work on the step through torch's hooks: a pre hook that clips the gradients' norm, a post
    hook keeping an EMA of the weights, a global pre hook counting steps, a state-dict pre hook. Catches: hooks
    not run, or run after kronopt has read the gradients (the clipped ones must be the stepped ones)."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        model = _model()
        opt = make(model.parameters())
        ema = [p.detach().clone() for p in model.parameters()]
        seen = collections.Counter()

        def clip(optimizer, args, kwargs, model=model):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)

        def average(optimizer, args, kwargs, model=model, ema=ema):
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.9).add_(p.detach(), alpha=0.1)

        def count(optimizer, args, kwargs, opt=opt, seen=seen):
            if optimizer is opt:
                seen["global"] += 1

        opt.register_step_pre_hook(clip)
        opt.register_step_post_hook(average)
        opt.register_state_dict_pre_hook(lambda o, seen=seen: seen.update(["sd"]))
        global_handle = register_optimizer_step_pre_hook(count)
        try:
            for x in _batches(6):
                opt.zero_grad()
                _loss(model, x).backward()
                opt.step()
            opt.state_dict()
        finally:
            global_handle.remove()
        assert seen == {"global": 6, "sd": 1}
        results.append((_weights(model), ema))
    (ours, ema_ours), (theirs, ema_theirs) = results
    assert _same(ours, theirs)
    assert _same(ema_ours, ema_theirs)


def test_lightning_automatic_optimization_closure_and_swalr_equal_torch_adamw():
    """Lightning's automatic optimization passes a closure that runs the training step, calls ``zero_grad`` and
    then backward, all inside ``optimizer.step(closure=...)``; SWALR writes ``swa_lr`` into the groups and
    anneals ``lr`` towards it. Catches: gradients read before the closure ran, or a group key written by a
    scheduler that disturbs the step or a checkpoint's resume."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        model = _model()
        opt = make(model.parameters())
        swa = SWALR(opt, swa_lr=5e-3, anneal_epochs=3)
        losses = []
        for t, x in enumerate(_batches(8)):
            if t == 4:  # a checkpoint and its resume, the groups holding swa_lr
                sd, ssd = copy.deepcopy(opt.state_dict()), copy.deepcopy(swa.state_dict())
                model = copy.deepcopy(model)
                opt = make(model.parameters())
                swa = SWALR(opt, swa_lr=5e-3, anneal_epochs=3)
                opt.load_state_dict(sd)
                swa.load_state_dict(ssd)

            def closure(model=model, opt=opt, x=x):
                loss = _loss(model, x)
                opt.zero_grad()
                loss.backward()
                return loss.detach()

            losses.append(opt.step(closure=closure).item())
            swa.step()
        results.append((_weights(model), losses, [g["lr"] for g in opt.param_groups]))
    (ours, l1, r1), (theirs, l2, r2) = results
    assert l1 == l2 and r1 == r2
    assert _same(ours, theirs)


# -- one optimizer per parameter, stepped inside backward ------------------------------------------------------


def _in_backward_run(make, how, steps=5):
    model = _model()
    if how == "torch":  # torch.distributed.optim._apply_optimizer_in_backward (as torchrec / FSDP examples use it)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.distributed.optim imports torch.jit
            from torch.distributed.optim import _apply_optimizer_in_backward
        cls, kwargs = make
        _apply_optimizer_in_backward(cls, model.parameters(), kwargs)
    elif how == "hook":  # torchtune's optimizer-in-backward: a dict of optimizers, stepped in the grad hooks
        optimizers = {p: make([p]) for p in model.parameters()}

        def hook(p):
            optimizers[p].step()
            optimizers[p].zero_grad()

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(hook)
    else:  # the same per-parameter optimizers, stepped after backward
        optimizers = {p: make([p]) for p in model.parameters()}
    for x in _batches(steps):
        _loss(model, x).backward()
        if how == "after":
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad()
    return _weights(model), [p.grad for p in model.parameters()]


def test_optimizer_in_backward_equals_torch_adamw():
    """torch's ``_apply_optimizer_in_backward`` builds ``optimizer_class([param], **kwargs)`` per parameter and
    steps it from the AccumulateGrad hook; torchtune steps a dict of per-parameter optimizers from
    ``register_post_accumulate_grad_hook``. Catches: a step that cannot run inside the autograd engine's hook
    (grad mode, the no-grad decorator, reentrancy) or a one-parameter optimizer that routes differently."""
    cfg = kronopt.resolve("adamw", lr=LR)
    ours, grads = _in_backward_run((kronopt.KronOptimizer, {"config": cfg}), "torch")
    theirs, _ = _in_backward_run((torch.optim.AdamW, {"lr": LR, "fused": True}), "torch")
    assert _same(ours, theirs)
    assert all(g is None for g in grads)
    assert _same(_in_backward_run(_kron("adamw"), "hook")[0], theirs)


@pytest.mark.parametrize("preset", PRESETS)
def test_optimizer_in_backward_equals_the_same_optimizers_stepped_after_backward(preset):
    """Per-parameter optimizers stepped in the gradient hooks end where the same optimizers stepped after
    backward end (each parameter's gradient is final when its hook fires)."""
    assert _same(_in_backward_run(_kron(preset), "hook")[0], _in_backward_run(_kron(preset), "after")[0])


# -- what frameworks look up on an optimizer ----------------------------------------------------------------


def test_what_frameworks_look_up_on_the_optimizer_answers_as_torch_adamw():
    """HF Trainer and Accelerate call ``optimizer.train()``/``eval()`` when ``hasattr`` finds them; Accelerate reads
    ``set_to_none`` from ``zero_grad``'s signature; GradScaler takes another path where
    ``_step_supports_amp_scaling`` is set; Lightning consolidates where ``consolidate_state_dict`` exists and its
    LearningRateMonitor reads ``"betas" in defaults``; loggers print ``repr``. Catches: an attribute that sends a
    framework down a path torch.optim.AdamW does not take, or a ``repr``/``defaults`` that hides a group's rate."""
    model = _model()
    ours = _kron("muon")(model.parameters())
    theirs = torch.optim.AdamW(_model().parameters(), lr=LR)  # torch's defaults: neither fused nor foreach on a CPU
    for name in ("train", "eval", "_step_supports_amp_scaling", "consolidate_state_dict", "step_was_skipped"):
        assert hasattr(ours, name) == hasattr(theirs, name), name
    assert isinstance(ours, torch.optim.Optimizer)
    assert "set_to_none" in inspect.signature(ours.zero_grad).parameters
    assert "closure" in inspect.signature(ours.step).parameters
    assert {"lr", "weight_decay"} <= set(ours.defaults)
    assert ("betas" in ours.defaults) is False  # Lightning then logs group.get("momentum", 0): no crash
    text = repr(ours)
    assert text.startswith("KronOptimizer (") and text.count("Parameter Group") == len(ours.param_groups)
    for g in ours.param_groups:
        assert f"lr: {g['lr']}" in text


def test_pickling_a_wrapped_optimizer_with_a_scheduler_attached_steps_as_the_original():
    """Accelerate pickles its wrapper by ``__dict__`` (the kronopt optimizer inside, its ``step`` wrapped by a
    scheduler); torch's own Optimizer pickles no wrapped ``step``. Catches: the scheduler's wrapper (a closure
    over a weak reference) pickled along, or a copy that steps from other state than the original."""
    model = _model()
    opt = _kron("soap")(model.parameters())
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    wrapped = _AcceleratedOptimizer(opt, torch.device("cpu"))
    batches = _batches(6)
    for x in batches[:3]:
        wrapped.zero_grad()
        _loss(model, x).backward()
        wrapped.step()
        sched.step()
    model2, wrapped2 = copy.deepcopy((model, wrapped))
    assert "step" not in wrapped2.optimizer.__dict__
    for m, w in ((model, wrapped), (model2, wrapped2)):
        for x in batches[3:]:
            w.zero_grad()
            _loss(m, x).backward()
            w.step()
    assert _same(_weights(model), _weights(model2))


# -- Fabric / LightningOptimizer: the forwarding wrapper -------------------------------------------------------


def test_a_forwarding_wrapper_trains_edits_rates_and_saves_as_torch_adamw():
    """Through Fabric's optimizer wrapper: ``zero_grad`` (torch's method, with the wrapper as ``self``), ``lr``
    edited through the wrapper's ``param_groups``, ``step`` and ``state_dict`` forwarded. Catches: a kronopt method
    that fails or reads stale bookkeeping when ``self`` is the wrapper."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        model = _model()
        wrapper = _ForwardingOptimizer(make(model.parameters()))
        assert isinstance(wrapper, torch.optim.Optimizer)
        for t, x in enumerate(_batches(6)):
            wrapper.zero_grad()
            _loss(model, x).backward()
            if t == 3:
                for g in wrapper.param_groups:
                    g["lr"] = LR / 4
            wrapper.step()
        assert all(p.grad is not None for p in model.parameters())
        wrapper.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        results.append((_weights(model), wrapper.state_dict()))
    (ours, sd), (theirs, _) = results
    assert _same(ours, theirs)
    assert all(entry["step"] == 6 for entry in sd["state"].values())


@pytest.mark.parametrize("wrapper", [_ForwardingOptimizer, _CopiedDictOptimizer], ids=["forwarding", "copied_dict"])
def test_bug_add_param_group_through_a_fabric_optimizer_wrapper_equals_torch_adamw(wrapper):
    """Progressive unfreezing through the wrapped optimizer (``fabric_optimizer.add_param_group``): torch's
    ``add_param_group`` only appends to the shared ``param_groups`` list, so AdamW trains on. kronopt's sets
    ``_state_seen``/``_listed`` (and ``_non_float``, ``_unstepped_placement``) on ``self``, the wrapper; the
    optimizer's own record still lists the old groups and its next ``step()`` raises ``RuntimeError``."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        model = _model()
        head = list(model[2].parameters())
        fabric_opt = wrapper(make(head))
        for t, x in enumerate(_batches(6)):
            if t == 3:
                fabric_opt.add_param_group({"params": list(model[0].parameters())})
            fabric_opt.zero_grad()
            _loss(model, x).backward()
            fabric_opt.step()
        results.append(_weights(model))
    assert _same(*results)


# -- Lightning's BaseFinetuning: groups restored by assignment, then the state loaded ----------------------------


def _by_name(group, convert):
    """BaseFinetuning's ``__apply_mapping_to_param_groups``: a group's keys, its parameters mapped by ``convert``."""
    return {**{k: v for k, v in group.items() if k != "params"}, "params": [convert(p) for p in group["params"]]}


def _finetuning_run(make, bias, resume_at=None, steps=8, unfreeze_at=3):
    """Lightning's BaseFinetuning: the first layer frozen, unfrozen at ``unfreeze_at`` with
    ``optimizer.add_param_group({"params": ..., "lr": lr / 10})``; the groups are stored by parameter name
    (``_store``). On a resume, ``configure_optimizers`` builds the optimizer again over the trainable head,
    ``on_fit_start`` assigns ``optimizer.param_groups`` from the stored groups, then the checkpoint's optimizer
    state is loaded."""
    model = _model(bias=bias)
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = make([p for p in model.parameters() if p.requires_grad])
    stored = None
    for t, x in enumerate(_batches(steps)):
        if t == unfreeze_at:
            for p in model[0].parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(model[0].parameters()), "lr": opt.param_groups[0]["lr"] / 10})
            names = {p: n for n, p in model.named_parameters()}
            stored = [_by_name(g, names.__getitem__) for g in opt.param_groups]
        if t == resume_at:
            checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
            model = _model(bias=bias, seed=5)
            model.load_state_dict(checkpoint["model"])
            opt = make([p for p in model.parameters() if p.requires_grad])
            named = dict(model.named_parameters())
            opt.param_groups = [_by_name(g, named.__getitem__) for g in stored]
            opt.load_state_dict(checkpoint["optimizer"])
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    return _weights(model)


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_finetuning_resume_of_weight_matrices_continues_bit_for_bit(preset):
    """Without vectors the BaseFinetuning resume works: the load rebuilds every bucket from the assigned groups.
    The unwrapped, uninterrupted run is the reference (for adamw also torch.optim.AdamW)."""
    make = _kron(preset)
    straight = _finetuning_run(make, bias=False)
    assert _same(_finetuning_run(make, bias=False, resume_at=6), straight)
    if preset == "adamw":
        assert _same(straight, _finetuning_run(_torch_adamw, bias=False))


@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_bug_finetuning_resume_with_biases_continues_bit_for_bit(preset):
    """The same resume with biases: the unfrozen group holds vectors, whose saved state may be shaped like the
    parameter. ``_restack`` asks ``_param_shaped`` → ``_bucket_config`` → ``self._group_cfgs[bucket.group]``:
    the optimizer was built with one group, the loaded groups are two, and the load raises ``IndexError``.
    torch.optim.AdamW resumes."""
    make = _kron(preset)
    assert _same(_finetuning_run(make, bias=True, resume_at=6), _finetuning_run(make, bias=True))
    if preset == "adamw":
        assert _same(_finetuning_run(_torch_adamw, bias=True, resume_at=6), _finetuning_run(make, bias=True))


def test_bug_a_saved_group_override_decides_how_its_vector_state_is_read():
    """docs/architecture.md: 'Per-group config overrides come from the saved groups.' A dict saved by a plain
    adamw group (its vector's moments saved shaped like the vector, ``(4,)``) loaded into an optimizer whose
    group was built with ``post.normalize = true`` (block-shaped ``(4, 1)`` moments): the load takes the saved
    override-free config, so it must read the saved ``(4,)`` moments, and the resumed run must equal the
    saved one's continuation."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.nn.Parameter(torch.randn(6, 4, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))
    grads = [(torch.randn(6, 4, generator=g), torch.randn(4, generator=g)) for _ in range(5)]
    src = kronopt.build([w, b], "adamw", lr=LR)
    for gw, gb in grads[:2]:
        w.grad, b.grad = gw.clone(), gb.clone()
        src.step()
    sd = copy.deepcopy(src.state_dict())
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    dst = kronopt.build([{"params": [w2, b2], "post.normalize": True}], "adamw", lr=LR)
    dst.load_state_dict(sd)
    for gw, gb in grads[2:]:
        w.grad, b.grad = gw.clone(), gb.clone()
        w2.grad, b2.grad = gw.clone(), gb.clone()
        src.step()
        dst.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


# -- param-group keys frameworks add ---------------------------------------------------------------------------


def test_bug_a_named_param_group_for_lightnings_lr_monitor_trains_as_torch_adamw():
    """Lightning documents ``{"params": ..., "name": "backbone"}`` for its LearningRateMonitor, which reads
    ``param_group.get("name")``; torch.optim keeps the key and trains. kronopt raises ``ConfigError``
    ("param_groups[0].name: unknown key") at build."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        model = _model()
        opt = make([
            {"params": list(model[0].parameters()), "name": "backbone"},
            {"params": list(model[2].parameters()), "name": "head"},
        ])
        for x in _batches(4):
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
        assert [g.get("name") for g in opt.param_groups] == ["backbone", "head"]
        results.append(_weights(model))
    assert _same(*results)


def test_a_scheduler_resumed_before_the_optimizer_is_wrapped_keeps_its_rates():
    """HF Trainer order on resume: optimizer and scheduler built, the wrapper's round trip, then both state dicts
    loaded (``initial_lr`` in the saved groups, the scheduler's ``last_epoch``); training goes on with the rates
    and weights of torch.optim.AdamW resumed the same way. Catches: the saved groups' scheduler keys dropped by
    the routed groups, or a round trip that resets them."""
    results = []
    for make in (_kron("adamw"), _torch_adamw):
        model = _model()
        opt = make(model.parameters())
        sched = lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=6)
        batches = _batches(8)
        for x in batches[:4]:
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
            sched.step()
        saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
        model = _model(seed=3)
        model.load_state_dict(saved[0])
        opt = make(model.parameters())
        sched = lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=6)
        wrapped = _AcceleratedOptimizer(opt, torch.device("cpu"))
        wrapped.load_state_dict(saved[1])
        sched.load_state_dict(saved[2])
        lrs = []
        for x in batches[4:]:
            wrapped.zero_grad()
            _loss(model, x).backward()
            wrapped.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        results.append((_weights(model), lrs, [g.get("initial_lr") for g in opt.param_groups]))
    (ours, l1, i1), (theirs, l2, i2) = results
    assert l1 == l2 and i1 == i2 == [LR]
    assert _same(ours, theirs)


def _trainer_groups(model):
    """transformers' Trainer.create_optimizer: weights decayed, biases (and norms) not."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.1},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def _rollback_run(make, batches, rollback=None):
    """Train on ``batches`` with the Trainer's two groups; ``rollback = (saved_at, restored_at)``: model and optimizer
    state saved before step ``saved_at`` and loaded back, into the same objects, before step ``restored_at`` (a
    loss-spike rollback)."""
    model = _model()
    opt = make(_trainer_groups(model))
    snapshot = None
    for t, x in enumerate(batches):
        if rollback and t == rollback[0]:
            snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()))
        if rollback and t == rollback[1]:
            model.load_state_dict(snapshot[0])
            opt.load_state_dict(snapshot[1])
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    return _weights(model)


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_rollback_into_the_same_optimizer_equals_never_taking_the_rolled_back_steps(preset):
    """A state dict loaded back into the optimizer that wrote it, three steps later (a trainer's rollback after a
    loss spike), built by a factory as trainers build it (``optimizer_cls(groups, **kwargs)``): the run must equal
    one that went from the snapshot straight to the batches after the rollback. Catches: a load into live
    buckets that keeps some of their later state (counters, a refreshed basis, split buckets)."""
    make = functools.partial(kronopt.KronOptimizer, config=kronopt.resolve(preset, lr=LR, **{"refresh.every": 2}))
    batches = _batches(10)
    rolled = _rollback_run(make, batches, rollback=(3, 6))
    assert _same(rolled, _rollback_run(make, batches[:3] + batches[6:]))
    if preset == "adamw":
        torch_adamw = functools.partial(torch.optim.AdamW, lr=LR, fused=True)
        assert _same(rolled, _rollback_run(torch_adamw, batches, rollback=(3, 6)))


def test_copies_through_functools_partial_factories_build_the_same_optimizer():
    """Trainers take an optimizer factory (``functools.partial(cls, **kwargs)``, HF's ``optimizer_cls_and_kwargs``,
    Lightning CLI's class path + init args) and call it with the model's parameter groups; kronopt's class takes
    ``config`` as a keyword. Catches: a factory-built optimizer that steps otherwise than ``kronopt.build``."""
    factory = functools.partial(kronopt.KronOptimizer, config=kronopt.resolve("soap", lr=LR, **{"refresh.every": 2}))
    a, _ = _plain_run(factory)
    b, _ = _plain_run(_kron("soap"))
    assert _same(_weights(a), _weights(b))
