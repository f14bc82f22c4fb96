"""Review of af687a7 (bench ``faults MiB``), 940ea3d (``_kept``, ``_inner_rule_alone``) and 0a2152b (``_version``,
``_plain_muon_cpu``'s new conditions, ``look_ahead_dtype`` returning ``None``).

Each test states what it would catch; the ones that fail on the reviewed code say so in their docstring.
"""

import contextlib
import re
import warnings

import pytest
import torch

import kronopt
from kronopt import optimizer as optimizer_module
from kronopt.app import bench, cli
from kronopt.inner_rules.orthogonalize import OrthogonalizeInner

from .test_plain_muon_review import _assert_same_as_general

pytestmark = pytest.mark.usefixtures("one_thread")

MIB = 2**20
TINY = ["--shapes", "8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]


# -- helpers -------------------------------------------------------------------------------------------------


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _state_equal(opt_a, pa, opt_b, pb):
    for p, q in zip(pa, pb):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            x, y = sa[k], sb[k]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)), k
            else:
                assert x == y, k


# -- 0a2152b: look_ahead_dtype against the look-ahead of 0c7c5c3 (the general path) ----------------------------


def _old_look_ahead(self, buf, G, basis):  # git show 0c7c5c3:kronopt/inner_rules/orthogonalize.py
    from kronopt import linalg

    w = 1 - self.momentum**2
    dtype = linalg.DTYPES[self.ns_dtype]
    if basis.Q_L is None and basis.Q_R is None and dtype != torch.float16 and torch.promote_types(dtype, G.dtype) == G.dtype:
        return torch.lerp(buf, G, w, out=torch.empty(G.shape, dtype=dtype, device=G.device))
    return buf.lerp(G, w)


def _general_run(param_dtype, state_dtype, ns_dtype, nesterov, *, basis=None, steps=4):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(param_dtype)) for s in [(24, 16), (24, 16), (20, 30)]]
    overrides = {"state_dtype": state_dtype, "inner.ns_dtype": ns_dtype, "inner.nesterov": nesterov}
    if basis is not None:
        overrides.update(basis)
    opt = kronopt.build(params, "muon", **overrides)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(param_dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("ns_dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(
    "param_dtype, state_dtype",
    [(torch.float32, "float32"), (torch.float64, "float64"), (torch.bfloat16, "float32"), (torch.bfloat16, "float64"),
     (torch.float32, "float64"), (torch.float16, "float32")],
)
@pytest.mark.parametrize("nesterov", [True, False])
def test_general_path_look_ahead_bit_identical_to_0c7c5c3(monkeypatch, ns_dtype, param_dtype, state_dtype, nesterov):
    """The general path (plain Muon path off) with the current ``look_ahead_dtype``/``_look_ahead`` against
    0c7c5c3's ``_look_ahead``, for every iteration dtype and state dtype: bit for bit (parameters and state)."""
    monkeypatch.setattr(optimizer_module, "_PLAIN_MUON_CPU", False)
    new_opt, new_p = _general_run(param_dtype, state_dtype, ns_dtype, nesterov)
    with monkeypatch.context() as m:
        m.setattr(OrthogonalizeInner, "_look_ahead", _old_look_ahead)
        old_opt, old_p = _general_run(param_dtype, state_dtype, ns_dtype, nesterov)
    assert _params_equal(new_p, old_p)
    _state_equal(new_opt, new_p, old_opt, old_p)


@pytest.mark.parametrize("ns_dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(
    "param_dtype, state_dtype",
    [(torch.float32, "float32"), (torch.float64, "float64"), (torch.bfloat16, "float32"), (torch.float32, "float64")],
)
def test_plain_path_matches_general_for_every_iteration_and_state_dtype(monkeypatch, ns_dtype, param_dtype, state_dtype):
    """``_step_plain_muon``'s ``(nesterov and look_ahead_dtype(...)) or buf.dtype`` against the general path."""
    overrides = {"state_dtype": state_dtype, "inner.ns_dtype": ns_dtype}

    def scenario():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(24, 16, generator=gen).to(param_dtype)) for _ in range(3)]
        opt = kronopt.build(params, "muon", **overrides)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(24, 16, generator=gen).to(param_dtype)
            opt.step()
        return opt, params, []

    _assert_same_as_general(monkeypatch, scenario, must_take=str(param_dtype).endswith(state_dtype))


# -- 0a2152b: _plain_muon_cpu's storage test with parameters carved from one flat buffer --------------------------


def _flat_scenario(*, grads_from):
    """Three 24 x 16 parameters carved from one flat tensor (as a flat-param wrapper leaves them); their gradients
    fresh tensors (``"own"``), views of one flat gradient buffer (``"flat"``) or views of the parameters' own flat
    buffer past the parameters (``"same_buffer"``: a buffer holding both)."""

    def scenario():
        gen = torch.Generator().manual_seed(0)
        n = 24 * 16
        flat = torch.randn(6 * n, generator=gen)
        params = [torch.nn.Parameter(flat[i * n : (i + 1) * n].view(24, 16)) for i in range(3)]
        gflat = torch.empty(3 * n)
        opt = kronopt.build(params, "muon")
        for _ in range(3):
            for i, p in enumerate(params):
                g = torch.randn(24, 16, generator=gen)
                if grads_from == "own":
                    p.grad = g
                elif grads_from == "flat":
                    p.grad = gflat[i * n : (i + 1) * n].view(24, 16).copy_(g)
                else:
                    p.grad = flat[(3 + i) * n : (4 + i) * n].view(24, 16).copy_(g)
            opt.step()
        return opt, params, []

    return scenario


@pytest.mark.parametrize("grads_from", ["own", "flat"])
def test_parameters_carved_from_one_flat_buffer_take_the_plain_path(monkeypatch, grads_from):
    """Parameters that are views of one flat tensor share one storage, gradients of their own (or views of a
    separate flat gradient buffer): nothing aliases, so the plain path takes them and steps them as the general
    path does."""
    _, took = _assert_same_as_general(monkeypatch, _flat_scenario(grads_from=grads_from))
    assert all(took)


def test_gradients_in_the_parameters_flat_buffer_but_apart_from_them(monkeypatch):
    """Gradients carved from the parameters' own flat buffer, in a region no parameter holds: nothing overlaps, so
    the plain path takes them (the storage test of 0a2152b sent them to the general path; the spans' test since
    does not), with the general path's bits."""
    _, took = _assert_same_as_general(monkeypatch, _flat_scenario(grads_from="same_buffer"))
    assert all(took)


def test_a_gradient_overlapping_a_parameter_through_another_storage(monkeypatch):
    """Failed on 0a2152b (mended: the spans of addresses are compared, ``optimizer._overlapping``). ``_plain_muon_cpu`` told a gradient "in a parameter's memory" by its storage's base
    pointer being a parameter storage's base pointer. A gradient that overlaps a parameter's memory from another
    storage object (two ``torch.from_numpy``/``torch.frombuffer`` views of one array, at different offsets) passes
    that test, and the plain path then writes the parameter before ``buf[k].lerp_(g, ...)`` reads the gradient
    again: another momentum than the general path's (which stacks every gradient first)."""

    def scenario():
        gen = torch.Generator().manual_seed(0)
        n = 24 * 16
        memory = bytearray(4 * (2 * n + 16))  # one buffer, views of it with storages of their own
        view = lambda first: torch.frombuffer(memory, dtype=torch.float32, count=n, offset=4 * first).view(24, 16)  # noqa: E731
        view(0).copy_(torch.randn(24, 16, generator=gen))
        view(n).copy_(torch.randn(24, 16, generator=gen))
        p0 = torch.nn.Parameter(view(0))
        p1 = torch.nn.Parameter(view(n))
        opt = kronopt.build([p0, p1], "muon")
        for _ in range(3):
            p0.grad = torch.randn(24, 16, generator=gen)
            # p1's gradient: a storage of its own over p0's memory, one float in (not p0's storage's pointer)
            p1.grad = view(1)
            opt.step()
        return opt, [p0, p1], []

    _assert_same_as_general(monkeypatch, scenario, must_take=False)


# -- 0a2152b: gradients that are inference tensors (_version) -----------------------------------------------------


PRESETS = list(kronopt.PRESETS)
SHAPES_INF = [(24, 16), (24, 16), (12, 7), (7,)]


def _inference_grad_run(preset, *, inference, scope, policy, step_inside=False, reuse=False, bad_at=None, steps=4):
    """``steps`` steps of ``preset``; gradients made under ``inference_mode(inference)``; with ``reuse`` each
    parameter keeps one gradient tensor, overwritten in place (under the same mode) between steps; a NaN in
    parameter 0's gradient at step ``bad_at``. Returns the parameters, the counts and what was raised."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES_INF]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], preset, nonfinite_scope=scope, nonfinite=policy)
    kept = None
    errors = []
    for t in range(steps):
        with torch.inference_mode(inference):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            if t == bad_at:
                grads[0].view(-1)[3] = float("nan")
            if reuse:
                if kept is None:
                    kept = [g.clone() for g in grads]
                else:
                    for k, g in zip(kept, grads):
                        k.copy_(g)
                grads = kept
        for p, g in zip(params, grads):
            p.grad = g
        with torch.inference_mode() if step_inside else contextlib.nullcontext():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.step()
            except Exception as exc:  # noqa: BLE001
                errors.append((t, type(exc).__name__))
    return [p.detach().clone() for p in params], opt.nonfinite_counts(), opt.skipped_steps(), errors


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_inference_gradients_with_every_preset(preset, scope, policy):
    """Every preset, both scopes, ``warn`` and ``raise``, with a NaN gradient at step 2: gradients made under
    ``inference_mode`` step as plain ones (same bits, counts, skips and errors)."""
    ref = _inference_grad_run(preset, inference=False, scope=scope, policy=policy, bad_at=2)
    got = _inference_grad_run(preset, inference=True, scope=scope, policy=policy, bad_at=2)
    assert _params_equal(ref[0], got[0]) and ref[1:] == got[1:]


@pytest.mark.parametrize("preset", ["adamw", "muon", "soap", "shampoo"])
@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("policy", ["warn", "raise", "skip"])
def test_inference_gradients_reused_and_changed_in_place_between_steps(preset, scope, policy):
    """One gradient tensor per parameter, an inference tensor overwritten in place under ``inference_mode``
    between steps (a NaN at step 2, finite again at step 3): nothing the step's check kept of an earlier step
    is taken for this step's (an inference tensor keeps no version counter)."""
    ref = _inference_grad_run(preset, inference=False, scope=scope, policy=policy, reuse=True, bad_at=2)
    got = _inference_grad_run(preset, inference=True, scope=scope, policy=policy, reuse=True, bad_at=2)
    assert _params_equal(ref[0], got[0]) and ref[1:] == got[1:]


@pytest.mark.parametrize("preset", ["adamw", "muon", "soap"])
@pytest.mark.parametrize("scope", ["step", "block"])
def test_inference_gradients_stepped_inside_inference_mode(preset, scope):
    """Steps taken inside ``inference_mode`` (after a first ordinary step, as torch.optim requires) with
    inference-tensor gradients, a NaN at step 2: the same as ordinary steps on ordinary gradients."""

    def run(inside):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES_INF]
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], preset, nonfinite_scope=scope)
        for t in range(5):
            with torch.inference_mode(inside and t > 0):
                grads = [torch.randn(p.shape, generator=gen) for p in params]
                if t == 2:
                    grads[1].view(-1)[0] = float("inf")
                for p, g in zip(params, grads):
                    p.grad = g
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.step()
        return [p.detach().clone() for p in params], opt.nonfinite_counts()

    ref, got = run(False), run(True)
    assert _params_equal(ref[0], got[0]) and ref[1] == got[1]


# -- 940ea3d: _kept, with splits and joins changing the bucket sizes, in and out of inference_mode -----------------


def _split_run(preset, *, keep, inside, small=None, overrides=None):
    """Four 24 x 16 and two 20 x 30 parameters under ``preset``; some steps leave some gradients out (the bucket
    splits, later joins again); steps in ``inside`` are taken under ``inference_mode``."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 16)] * 4 + [(20, 30)] * 2
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], preset, **(overrides or {}))
    missing = {1: {0}, 2: {0, 1, 4}, 3: {2}, 5: {3, 5}, 6: set(), 7: {1}}
    for t in range(9):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            p.grad = None if i in missing.get(t, ()) else g
        if t == 4:
            params[2].grad.view(-1)[5] = float("nan")
        with torch.inference_mode() if t in inside else contextlib.nullcontext():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
    return [p.detach().clone() for p in params], opt.nonfinite_counts()


@pytest.mark.parametrize("preset", ["adamw", "muon"])
@pytest.mark.parametrize("inside", [(), (1, 2, 5), (2, 3, 4, 6, 7, 8), (1, 3, 5, 7)])
@pytest.mark.parametrize("small", [0, None])
def test_kept_scratch_across_splits_and_inference_mode(monkeypatch, preset, inside, small):
    """The kept scratch (``_kept``) against none kept (``_CPU_KEEPS_SCRATCH`` off), bucket sizes changing by
    splits and joins, steps in and out of ``inference_mode``: the same bits, no ``RuntimeError``."""
    if small is not None:
        monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", small)
    got = _split_run(preset, keep=True, inside=inside)
    monkeypatch.setattr(optimizer_module, "_CPU_KEEPS_SCRATCH", False)
    ref = _split_run(preset, keep=False, inside=())
    assert _params_equal(ref[0], got[0]) and ref[1] == got[1]


@pytest.mark.parametrize("preset", ["adamw", "muon"])
def test_kept_scratch_is_one_set_per_shape_and_not_an_inference_tensor(monkeypatch, preset):
    """After steps under ``inference_mode`` that split buckets, every kept scratch tensor is an ordinary tensor."""
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 16, generator=gen)) for _ in range(4)]
    opt = kronopt.build(params, preset, nonfinite_scope="block", **({"inner.betas": (0.9, 0.999)} if preset == "adamw" else {}))
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = None if (t == 1 and i == 0) else torch.randn(24, 16, generator=gen) * (1e30 if t == 2 else 1)
        with torch.inference_mode():
            opt.step()
    kept = opt.__dict__.get("_kept_scratch", {})
    # each entry a set of tensors, or (Newton–Schulz's buffers of plain Muon) one dict of them
    tensors = [x for v in kept.values() for t in v for x in (t.values() if isinstance(t, dict) else [t])]
    assert tensors and all(not t.is_inference() for t in tensors)


# -- af687a7: the bench's faults MiB ------------------------------------------------------------------------------

counts_faults = pytest.mark.skipif(bench.resource is None, reason="no getrusage")

PEERS_SRC = '''
import mmap
import torch

BUILT = {}
MIB = 2**20


class _Touch(torch.optim.Optimizer):
    mib = 0
    fail_run = None  # the run (instance number) that raises
    fail_call = None  # at this call of step()

    def __init__(self, params):
        super().__init__(params, {})
        name = type(self).__name__
        self.run = BUILT.get(name, 0)
        BUILT[name] = self.run + 1
        self.k = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.k += 1
        size = self.mib * MIB
        if size:
            with mmap.mmap(-1, size) as region:
                if hasattr(mmap, "MADV_NOHUGEPAGE"):
                    region.madvise(mmap.MADV_NOHUGEPAGE)
                for offset in range(0, size, mmap.PAGESIZE):
                    region[offset] = 1
        if self.run == self.fail_run and self.k == self.fail_call:
            raise RuntimeError("boom")


class Idle(_Touch):
    pass


class Two(_Touch):
    mib = 2


class Four(_Touch):
    mib = 4


class BreaksFirstRun(_Touch):
    mib = 4
    fail_run = 0
    fail_call = 3


class BreaksWhenBuilt(_Touch):
    def __init__(self, params):
        raise ValueError("no")
'''


@pytest.fixture
def touch_peers(tmp_path, monkeypatch):
    (tmp_path / "s39_touch.py").write_text(PEERS_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("s39_touch", None)
    mod = importlib.import_module("s39_touch")
    yield mod
    sys.modules.pop("s39_touch", None)


def _name(cls):
    return f"s39_touch:{cls}"


@counts_faults
def test_peers_fault_figures_beside_a_peer_that_fails_mid_run_in_one_of_the_runs(touch_peers):
    """``--repeat 3`` where a peer raises at a timed step of the first run only: it is reported failed (no
    figures), the others keep their medians, each charged its own pages only."""
    names = [_name("Two"), _name("BreaksFirstRun"), _name("Idle"), _name("Four"), _name("BreaksWhenBuilt")]
    rows = bench.bench(names, [(4, 4)], steps=3, warmup=1, device="cpu", repeat=3)
    by = {r["optimizer"]: r for r in rows}
    assert by[_name("BreaksFirstRun")]["failed"]["runs"] == 1 and by[_name("BreaksFirstRun")]["fault_bytes"] is None
    assert by[_name("BreaksWhenBuilt")]["failed"]["step"] == 0 and by[_name("BreaksWhenBuilt")]["fault_bytes"] is None
    assert 2 * MIB <= by[_name("Two")]["fault_bytes"] <= 2.5 * MIB
    assert 4 * MIB <= by[_name("Four")]["fault_bytes"] <= 4.5 * MIB
    assert by[_name("Idle")]["fault_bytes"] < 0.25 * MIB


@counts_faults
def test_memory_rounds_do_not_count_in_the_faults(touch_peers):
    """``memory_steps`` rounds after the timed ones (untimed): their pages are not in ``fault_bytes``, which stays
    the mean over the timed steps."""
    rows = bench.bench([_name("Idle"), _name("Two")], [(4, 4)], steps=2, warmup=1, device="cpu", memory_steps=3)
    by = {r["optimizer"]: r for r in rows}
    assert 2 * MIB <= by[_name("Two")]["fault_bytes"] <= 2.5 * MIB
    assert by[_name("Idle")]["fault_bytes"] < 0.25 * MIB


def test_aggregate_runs_of_rows_without_fault_bytes():
    """An older caller's rows (no ``fault_bytes`` key), alone or mixed with newer ones: no error, ``None``."""
    old = {"optimizer": "a", "mean_ms": 1.0, "median_ms": 1.0, "state_bytes": 0, "step_bytes": None, "vs_first": 1.0,
           "failed": None}
    new = {**old, "fault_bytes": 4096.0}
    assert bench.aggregate_runs([[old], [old]])[0]["fault_bytes"] is None
    assert bench.aggregate_runs([[new], [old]])[0]["fault_bytes"] is None
    assert bench.aggregate_runs([[new], [{**new, "fault_bytes": 8192.0}]])[0]["fault_bytes"] == 6144.0


def _columns_line_up(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    header, rule = lines[start], lines[start + 1]
    assert set(rule) == {"-"} and len(rule) == len(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line)
    for line in rows:
        if "failed" not in line:
            assert len(line) == len(header), (header, line)
    return header, rows


@counts_faults
@pytest.mark.parametrize("extra", [[], ["--memory", "2"], ["--repeat", "2"], ["--memory", "2", "--repeat", "2"]])
def test_the_table_lines_up_with_faults_memory_and_repeat(capsys, extra):
    """The ``faults MiB`` column with ``--memory`` and ``--repeat``: every line as long as the header, the
    column where the header puts it, in the order state, step, faults, range."""
    assert cli.main(["bench", "adamw", "muon", *TINY, *extra]) == 0
    header, rows = _columns_line_up(capsys.readouterr().out)
    names = [n for n in ("state MiB", "step MiB", "faults MiB", "× range") if n in header]
    assert [header.index(n) for n in names] == sorted(header.index(n) for n in names)
    assert "faults MiB" in header and ("step MiB" in header) == ("--memory" in extra)
    end = header.index("faults MiB") + len("faults MiB")
    for line in rows:
        assert re.fullmatch(r"\s*\d+\.\d\d", line[end - 10 : end]), line


@counts_faults
def test_world_one_runs_and_its_faults_column_lines_up(capsys):
    """``--world 1`` (in this process): the world table, its ``faults MiB`` column (the forty-ninth session's) last,
    every line as long as the header and each figure under it."""
    assert cli.main(["bench", "adamw", "--world", "1", "--shapes", "8x4", "--steps", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("world"))
    header, rule, row = lines[start : start + 3]
    assert header.endswith("faults MiB") and set(rule) == {"-"} and len(rule) == len(header) == len(row)
    assert re.fullmatch(r"\s*\d+\.\d\d", row[-10:]), row


def test_scaling_and_alone_rows_carry_fault_bytes(monkeypatch):
    """``--scaling`` and ``--alone``'s rows (bench's, replays included): a ``fault_bytes`` each, per platform."""
    table = bench.scaling(["adamw"], [8], steps=1, warmup=0, device="cpu")
    rows = table[0]["rows"]
    assert all(("fault_bytes" in r) for r in rows)
    monkeypatch.setattr(bench, "resource", None)
    table = bench.scaling(["adamw"], [8], steps=1, warmup=0, device="cpu")
    assert all(r["fault_bytes"] is None for r in table[0]["rows"])


# -- 0a2152b: a gradient in another bucket's parameter's memory ------------------------------------------------------


def test_a_gradient_in_another_buckets_parameter(monkeypatch):
    """Parameters carved from one flat tensor in two buckets (24 x 16 and 16 x 24); the second bucket's gradients
    are views of the first bucket's parameters (written before, in both paths). The plain path may take the
    buckets (their own parameters are not in their gradients' storage... but the flat buffer is): same bits."""

    def scenario():
        gen = torch.Generator().manual_seed(0)
        n = 24 * 16
        flat = torch.randn(4 * n, generator=gen)
        a = [torch.nn.Parameter(flat[i * n : (i + 1) * n].view(24, 16)) for i in range(2)]
        b = [torch.nn.Parameter(torch.randn(16, 24, generator=gen)) for i in range(2)]
        opt = kronopt.build([*a, *b], "muon")
        for _ in range(3):
            for p in a:
                p.grad = torch.randn(24, 16, generator=gen)
            for i, p in enumerate(b):
                p.grad = a[i].detach().view(16, 24)
            opt.step()
        return opt, [*a, *b], []

    _assert_same_as_general(monkeypatch, scenario, must_take=False)


def test_the_spans_test_of_overlapping_memory():
    """``optimizer._overlapping``: neighbouring slices do not overlap, a slice across their border does, a strided
    view's gaps count as its own (the test errs toward overlap, which only costs the plain path), an empty tensor
    overlaps nothing, and a transposed view reaches its last entry."""
    base = torch.zeros(100)
    first, second = base[:50], base[50:]
    overlapping = optimizer_module._overlapping
    assert not overlapping([first], [second]) and not overlapping([second], [first])
    assert overlapping([base[49:51]], [first]) and overlapping([base[49:51]], [second])
    assert overlapping([base[::2]], [base[1:2]])
    assert not overlapping([base[:0]], [base])
    assert overlapping([base.view(10, 10).mT], [base[99:]])
    assert not overlapping([base[:10]], [base[20:30], base[40:50], base[10:20]])
