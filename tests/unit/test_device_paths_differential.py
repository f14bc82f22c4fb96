"""The paths a GPU takes, run on the CPU, against the CPU's own paths; and CUDA-only checks of what the CPU cannot show.

No CUDA device has run kronopt. Much of a CPU step takes shortcuts a GPU never takes: verdicts read on the host
(``linalg._CPU_HOST_VERDICTS``: plain copies, skipped masks, the plain KSL step first, deferred factor writes,
rotated Adam moments updated in place),
the block-by-block AdamW loop (``optimizer._BLOCKWISE_MIN``), the small buckets stepped together, tiled and split
symmetric products, the padded QR, the blocked transpose and bfloat16 arithmetic in float32 kernels. The fixture
``gpu_paths`` turns every one of them off, so a CPU run takes the device-agnostic branches, the GPU's; a trip wire
makes any CPU-only function it reaches raise. The first test keeps the list honest: every branch of the library
on a tensor's device is one the fixture knows.

On small blocks the tiled and split forms are not taken either way, so the two runs must agree bit for bit
(parameters, every state tensor, counters), as docs/architecture.md says of each shortcut ("the same bits");
torch's fused AdamW kernel rounds its own way and is compared elsewhere (``test_plain_adam_fast_path.py``), so the
CPU run here keeps it off. The CPU's tiled, split and padded forms are compared with the GPU's dense form to
rounding, on blocks whose bases are well posed. Newton–Schulz's bfloat16 arithmetic parts too where a CPU runs it
in float32 kernels, on batches of 16³ to 2²⁰ multiply-adds (``linalg._bfloat16_in_float32``): the same roundings
in another summation order, so from about the fourth iteration an entry now and then rounds the other way (muon
and the pro presets on 64 × 64 blocks: 2–3e-3 of the step); the batches compared here bit for bit are below it.
"""

import ast
import contextlib
import pathlib
import traceback
import warnings

import pytest
import torch

import kronopt
from kronopt import compose, distributed, linalg
from kronopt import optimizer as kopt

pytestmark = pytest.mark.usefixtures("one_thread")

#: what a GPU run sets (module, name, value): each CPU-only branch takes its device-agnostic side
GPU_SWITCHES = [
    (linalg, "_CPU_HOST_VERDICTS", False),  # host_verdicts / cpu_all: masked writes, scaled KSL, no shortcuts
    (kopt, "_BLOCKWISE_MIN", 10**12),  # _plain_adam_cpu: AdamW on the stacks (_step_plain_adam)
    (kopt, "_CPU_KEEPS_SCRATCH", False),  # _scratch: fresh tensors each step
    (kopt, "_PLAIN_MUON_CPU", False),  # _plain_muon_cpu (also off through host_verdicts): Muon on the stacks
    (kopt, "_DEFER_FACTOR_UPDATES", False),  # _run: no factor update left to the write
    (kopt, "_ROTATED_MOMENTS_IN_PLACE", False),  # _in_place_due / _in_place_proof: new moments, tested and copied
    (kopt, "_MOMENTUM_IN_PLACE", False),  # _momentum_due / _momentum_proof: a new eigenvalue-rule momentum, tested, copied
    (kopt, "_SMALL_TOGETHER_MAX", 0),  # _small_cpu (also off through host_verdicts)
    (linalg, "_GRAM_TILED_MIN", 10**9),  # _tiled: one dense product
    (linalg, "_SPLIT_SANDWICH_MIN", 10**9),  # split_pays: the plain sandwich
    (linalg, "_SYM_BLOCKED_MIN", 10**9),  # sym_sum: torch.add(A, A.mT)
    (linalg, "_QR_PAD_MAX", 0),  # _pads_qr: geqrf and householder_product on P as it is
    (linalg, "_bfloat16_in_float32", lambda U, dtype: False),  # Newton–Schulz in bfloat16 kernels
    # bfloat16 rotations (rotation_dtype) in bfloat16 kernels; a float64 block's still rounded in its own
    (linalg, "_narrow_emulated", lambda X, dtype, work: X.dtype == torch.float64),
    (linalg, "_ONEDNN_FLOAT32", False),  # _by_onednn: float32 products in MKL, as torch.bmm
    (linalg, "_BLOCKWISE_TRANSPOSE_MIN", 2**62),  # contiguous: Tensor.contiguous of the whole stack
]

#: functions only a CPU run may reach; a GPU-path run that reaches one fails
CPU_ONLY = [
    (kopt.KronOptimizer, "_step_plain_adams"),
    (kopt.KronOptimizer, "_step_small_buckets"),
    (kopt.KronOptimizer, "_muon_scratch"),
    (linalg, "_tiled_sym_product"),
    (linalg, "split_sandwich"),
    (linalg, "_newton_schulz_in_buffers"),
    (linalg, "_onednn_mm"),
    (linalg, "DeferredWrite"),
    (linalg, "adam_moments_each_"),  # rotated Adam moments updated in their stacks
    (compose, "momentum_in_place_step"),  # the eigenvalue rule's momentum updated in its stack
    (torch, "_foreach_copy_"),  # the plain copies of a write with every block ok
]

#: every function of the library that branches on a tensor's device or the processor, and what covers it
DEVICE_BRANCHES = {
    "compose.py": {"_write_all_"},  # _CPU_HOST_VERDICTS (cpu_all; masked_write_ asks host_verdicts itself)
    "linalg.py": {
        "_sym_blocked",  # _SYM_BLOCKED_MIN
        "_tiled",  # _GRAM_TILED_MIN
        "_tiles_in_place",  # reached from the tiled product only
        "_gram_tile",  # reached from the tiled product and the split only (their tiles' side)
        "split_pays",  # _SPLIT_SANDWICH_MIN
        "_pads_qr",  # _QR_PAD_MAX
        "host_verdicts",  # _CPU_HOST_VERDICTS
        "_bfloat16_in_float32",  # patched
        "_bfloat16_products_fast",  # reached from _bfloat16_in_float32 and _narrow_emulated only
        "_narrow_emulated",  # patched
        "_by_onednn",  # _ONEDNN_FLOAT32
        "_onednn_products_fast",  # reached from _by_onednn only
        "contiguous",  # _BLOCKWISE_TRANSPOSE_MIN
    },
    "optimizer.py": {
        "_Pending._to_host",  # a CUDA report's pinned copy (the CUDA tests below, tests/unit/test_cuda.py)
        "KronOptimizer._all_finite",  # where the step's flag lives with parameters on several devices
        "KronOptimizer._inputs",  # _DEFER_FACTOR_UPDATES
        "KronOptimizer._plain_adam_cpu",  # _BLOCKWISE_MIN
        "KronOptimizer._join",  # _BLOCKWISE_MIN (_blockwise: which buckets never join)
        "KronOptimizer._scratch",  # _CPU_KEEPS_SCRATCH
        "KronOptimizer._in_place_due",  # _ROTATED_MOMENTS_IN_PLACE
        "KronOptimizer._in_place_proof",  # _ROTATED_MOMENTS_IN_PLACE
        "KronOptimizer._momentum_due",  # _MOMENTUM_IN_PLACE
        "KronOptimizer._momentum_proof",  # _MOMENTUM_IN_PLACE
        "_gradients_in_parameters",  # only a CPU's buckets step together (_SMALL_TOGETHER_MAX, _BLOCKWISE_MIN)
    },
    "validators.py": {"one_cpu_number"},  # an lr tensor read as its number (the tests of tensor rates below)
}


@contextlib.contextmanager
def gpu_paths(tripwire: bool = True):
    """Every CPU-only switch off, and (``tripwire``) every CPU-only function made to raise."""
    with pytest.MonkeyPatch.context() as patch:
        for module, name, value in GPU_SWITCHES:
            patch.setattr(module, name, value)
        if tripwire:
            for owner, name in CPU_ONLY:

                def boom(*args, _name=name, **kwargs):
                    raise AssertionError(f"the GPU's path reached the CPU-only {_name}")

                patch.setattr(owner, name, boom)
        yield


@contextlib.contextmanager
def cpu_paths(hits: dict[str, int] | None = None):
    """The CPU run as shipped but for torch's fused AdamW kernel (it rounds otherwise); ``hits`` counts the
    CPU-only functions it reaches, so a comparison is known to compare something."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kopt, "_FUSED_ADAMW", False)
        if hits is not None:
            for owner, name in CPU_ONLY:
                real = getattr(owner, name)

                def counted(*args, _real=real, _name=name, **kwargs):
                    hits[_name] = hits.get(_name, 0) + 1
                    return _real(*args, **kwargs)

                patch.setattr(owner, name, counted)
        yield


def _forbid_host_reads(patch):
    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        patch.setattr(torch.Tensor, name, boom)


# -- the static audit: every device branch is one the fixture covers -------------------------------------------


def _device_branches(path: pathlib.Path) -> set[str]:
    """The qualified names of the functions in ``path`` that compare a ``.type`` with ``"cpu"``/``"cuda"``, read
    ``is_cuda``/``is_cpu`` or ``torch.backends.mkl``, or ask ``_processor()``."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope + [child.name] if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else scope
            hit = False
            if isinstance(child, ast.Compare):
                sides = [child.left, *child.comparators]
                hit = any(isinstance(s, ast.Attribute) and s.attr == "type" for s in sides) and any(
                    isinstance(s, ast.Constant) and s.value in ("cpu", "cuda") for s in sides
                )
            elif isinstance(child, ast.Attribute):
                hit = child.attr in ("is_cuda", "is_cpu") or (
                    child.attr == "mkl" and isinstance(child.value, ast.Attribute) and child.value.attr == "backends"
                )
            elif isinstance(child, ast.Call):
                hit = isinstance(child.func, ast.Name) and child.func.id == "_processor"
            if hit:
                found.add(".".join(s for s in scope if s))
            visit(child, inner)

    visit(tree, [])
    return found


def test_every_device_branch_of_the_library_is_one_the_gpu_path_fixture_covers():
    """A new ``device.type == "cpu"`` shortcut (or a processor switch) that ``gpu_paths`` does not turn off would
    leave the GPU's side of it untested here: this lists them all. Would catch: a CPU fast path added without a
    switch a test can turn off, or one moved to a function the fixture does not know."""
    root = pathlib.Path(kronopt.__file__).parent
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if "app" in path.relative_to(root).parts:
            continue
        names = _device_branches(path)
        if names:
            found[str(path.relative_to(root))] = names
    assert found == DEVICE_BRANCHES
    for module, name, _ in GPU_SWITCHES:  # and every switch the fixture sets still exists
        assert hasattr(module, name), name


# -- whole runs: the GPU's branches against the CPU's -----------------------------------------------------------

SHAPES = [(6, 4), (6, 4), (4, 6), (5,), (2, 3, 2), (12, 8)]


def _grads(steps: int = 7, shapes=SHAPES, seed: int = 0) -> list[list[torch.Tensor | None]]:
    """Gradients with a block that starts late (zero), a NaN at a vector's first call (an uncounted call), a NaN,
    finite gradients whose squares overflow float32, an infinity, and parameters without a gradient (a split
    bucket, a bucket that sits out). ``shapes``: two matrices of one shape, a matrix, a vector, then anything."""
    gen = torch.Generator().manual_seed(seed)
    grads: list[list[torch.Tensor | None]] = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    grads[0][1].zero_()  # block 1 of the first bucket starts late (dykaf's fresh start)
    grads[0][3][2] = float("nan")  # the vector's first call uses no gradient
    grads[2][0][0, 0] = float("nan")
    grads[3][2] *= 1e22  # finite, but its square overflows float32: the new state is refused, not the gradient
    grads[3][3] *= 1e22
    grads[4][2][1, 1] = -float("inf")
    grads[5][1] = None  # the bucket of blocks 0 and 1 splits
    grads[5][-1] = None  # the last parameter's bucket sits out a step
    return grads


def _overrides(preset: str, **more):
    out = {"nonfinite": "skip", **more}
    if preset not in ("adamw", "muon"):
        out.setdefault("refresh.every", 2)
    return out


def _trajectory(preset, grads, *, shapes=SHAPES, dtype=torch.float32, groups=None, **overrides):
    """Every step's parameters, ``state[p]`` tensors and counters, the non-finite counts and skipped steps."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    named = [(f"blocks.{i}.weight", p) for i, p in enumerate(params)]
    opt = kronopt.build(named if groups is None else groups(named), preset, **overrides)
    history = []
    for step in grads:
        for p, g in zip(params, step):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
        tensors = [(i, k, v.clone()) for i, p in enumerate(params) for k, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
        counters = [(i, k, v) for i, p in enumerate(params) for k, v in sorted(opt.state[p].items()) if not isinstance(v, torch.Tensor)]
        history.append(([p.detach().clone() for p in params], tensors, counters, opt.nonfinite_counts(), opt.skipped_steps()))
    return history


def _assert_same_bits(cpu, gpu):
    for k, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
        (pa, ta, ca, na, sa), (pb, tb, cb, nb, sb) = a, b
        assert (ca, na, sa) == (cb, nb, sb), k
        for i, (x, y) in enumerate(zip(pa, pb)):
            assert torch.equal(x, y), (k, f"param {i}")
            assert torch.isfinite(x).all(), (k, i)
        assert [key[:2] for key in ta] == [key[:2] for key in tb], k
        for (i, key, x), (_, _, y) in zip(ta, tb):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (k, i, key)


def _both(preset, grads, **kw):
    hits: dict[str, int] = {}
    with cpu_paths(hits):
        cpu = _trajectory(preset, grads, **kw)
    with gpu_paths():
        gpu = _trajectory(preset, grads, **kw)
    return cpu, gpu, hits


@pytest.mark.parametrize("scope", ["block", "step"])
@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_the_gpus_paths_give_the_cpus_bits(preset, scope):
    """Every preset, both non-finite scopes: the GPU's branches (masked writes, AdamW on the stacks, every bucket
    in its own turn, the scaled KSL step, bfloat16 kernels) against the CPU's, with a late start, a first call
    that uses no gradient, NaN and -inf gradients, a split bucket and one that sits out, over refreshes:
    parameters, every state tensor, the counters, the non-finite counts and skipped steps, bit for bit.

    Would catch: a shortcut that is not the same arithmetic as its masked form (a skipped block written by a
    plain copy, a refresh's fallback count lost when ``_fell_back`` returns a mask, a first call counted on one
    path only, a KSL block scaled where the plain step was exact), or a GPU branch that no CPU test runs and
    that raises (a CPU-only function reached: the trip wire)."""
    cpu, gpu, hits = _both(preset, _grads(), **_overrides(preset, nonfinite_scope=scope))
    assert hits.get("_step_plain_adams") or hits.get("_step_small_buckets")  # the CPU run took its shortcuts
    _assert_same_bits(cpu, gpu)


def _groups(named):
    return [
        {"params": named[:3], "lr": 0.003, "weight_decay": 0.05, "refresh.every": 3},
        {"params": named[3:], "lr": 0.02},
    ]


#: variant → (``_trajectory``'s keywords, config overrides)
VARIANTS = {
    "groups and bfloat16 storage": (
        {"groups": _groups}, {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}
    ),
    "float64": ({"dtype": torch.float64}, {}),
    "bfloat16 parameters": ({"dtype": torch.bfloat16}, {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_the_gpus_paths_give_the_cpus_bits_with_groups_storage_and_dtypes(preset, variant):
    """The same comparison with two param groups (their own lr, decay and refresh period), every record stored in
    bfloat16 (upcast and rounded around the step), and float64 and bfloat16 parameters. Would catch: a masked
    write or the stacks' AdamW that rounds a bfloat16 stack otherwise than the CPU's copy, a per-group rate
    applied by one path only, or a float64 state touched by a float32 constant on one path."""
    kw, options = VARIANTS[variant]
    cpu, gpu, _ = _both(preset, _grads(6), **kw, **_overrides(preset, **options))
    _assert_same_bits(cpu, gpu)


OPTION_CASES = [
    ("soap", {"refresh.stagger": True, "refresh.every": 3}),
    ("pro_dykaf", {"refresh.stagger": True, "refresh.every": 3}),
    ("shampoo", {"post.grafting": "adam"}),
    ("soap", {"post.normalize": True, "skip_first_call": False}),
    ("soap", {"basis.type": "eigh"}),
    ("soap", {"shapes.max_dim": 5}),  # sides not rotated
    ("kl_shampoo", {"inner.momentum_basis": "original"}),
    ("pro_kl_shampoo", {"split.complement_scale": "match_subspace_rms"}),
    ("dykaf", {"factors.variant": "parallel"}),
    ("dykaf", {"factors.init": "eps", "shapes.max_dim": 5}),
    ("muon", {"inner.nesterov": False}),
]


@pytest.mark.parametrize(("preset", "options"), OPTION_CASES, ids=[f"{p}-{'-'.join(o)}" for p, o in OPTION_CASES])
def test_the_gpus_paths_give_the_cpus_bits_with_stage_options(preset, options):
    """Stage options with branches of their own: staggered refresh phases, grafting, normalisation, an eigh basis,
    unrotated sides, the eigenvalue rule's momentum kept whole, the split's other scale, DyKAF's parallel step and
    one-sided factors, Muon without Nesterov. Would catch: a GPU branch of an option that the presets never take
    and that breaks or rounds otherwise (e.g. a one-sided DyKAF factor written by a plain copy only)."""
    cpu, gpu, _ = _both(preset, _grads(6), **_overrides(preset, **options))
    _assert_same_bits(cpu, gpu)


def _flaky_eigh():
    """``linalg._eigh`` that fails to converge at its second call (in both dtypes) and returns a NaN eigenvector for
    the first block at its fourth: a refresh that keeps every old basis, and one that keeps block 0's alone."""
    real, calls = linalg._eigh, []

    def solver(A):
        calls.append(1)
        if len(calls) in (2, 3):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        lam, Q = real(A)
        if len(calls) == 4:
            Q = Q.clone()
            Q[0, 0, 0] = float("nan")
        return lam, Q

    return solver


@pytest.mark.parametrize("preset", ["soap", "shampoo", "kl_soap", "pro_kl_shampoo", "dykaf_rank1"])
def test_the_gpus_paths_give_the_cpus_bits_when_a_refresh_fails(preset):
    """A refresh whose solver does not converge and one whose output is not finite on one block: the CPU counts a
    fallback only where a block fell back (read on the host: ``0`` where none did), the GPU adds a ``(b)`` mask
    every refresh (``bases._fell_back``). The same bases, failure counts and parameters. Would catch: a mask added
    where it should not be (a failure counted twice, or for every block), or a kept basis selected per block on one
    path and whole on the other."""
    shapes = [(6, 6), (6, 6), (5, 5), (5,), (4, 4)]
    grads = _grads(6, shapes=shapes, seed=8)
    grads[0][1] = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    runs = []
    for paths in (cpu_paths, gpu_paths):
        with paths(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(linalg, "_eigh", _flaky_eigh())
            runs.append(_trajectory(preset, grads, shapes=shapes, **_overrides(preset, nonfinite_scope="block", **{"refresh.every": 1})))
    _assert_same_bits(*runs)
    failures = [v for _, key, v in runs[1][-1][1] if key == "basis.failures"]
    assert sum(int(f) for f in failures) > 0  # the failures were met and counted


def test_the_gpus_paths_give_the_cpus_bits_on_strided_parameters():
    """A channels-last conv weight and a transposed linear weight: AdamW's stacks write through the parameter's
    own strides on the GPU's path, where the CPU's fused and in-place forms check contiguity first. Would catch:
    a step written into a reshaped copy of a non-contiguous parameter (lost), or a block read in another order."""

    def run(preset):
        gen = torch.Generator().manual_seed(3)
        conv = torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=gen).contiguous(memory_format=torch.channels_last))
        lin = torch.nn.Parameter(torch.randn(5, 6, generator=gen).mT)
        bias = torch.nn.Parameter(torch.randn(6, generator=gen))
        params = [conv, lin, bias]
        opt = kronopt.build([("conv.weight", conv), ("lin.weight", lin), ("lin.bias", bias)], preset, **_overrides(preset))
        for k in range(4):
            for p in params:
                g = torch.randn(p.shape, generator=gen)
                p.grad = g.contiguous(memory_format=torch.channels_last) if p.ndim == 4 else g
            if k == 2:
                conv.grad[0, 0, 0, 0] = float("nan")
            opt.step()
        return [p.detach().clone() for p in params]

    for preset in ("adamw", "soap", "muon"):
        with cpu_paths():
            cpu = run(preset)
        with gpu_paths():
            gpu = run(preset)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b), preset


@pytest.mark.filterwarnings("ignore:non-finite gradient")
@pytest.mark.parametrize("mode", ["warn", "raise"])
@pytest.mark.parametrize("preset", ["adamw", "soap", "dykaf", "pro_kl_shampoo"])
def test_reports_and_errors_of_non_finite_steps_are_the_same_on_the_gpus_paths(preset, mode):
    """``nonfinite = "warn"`` and ``"raise"`` with a NaN gradient and a finite one whose update overflows float32
    (1e20): the same warnings (queued as reports on the GPU's path, where no run is clean), the same errors at the
    same steps, the same parameters and counts. Would catch: a report lost or doubled where the GPU path queues one
    per bucket, or an overflow that only the CPU's host-read verdicts see."""

    def run():
        gen = torch.Generator().manual_seed(0)
        shapes = [(6, 4), (6, 4), (5,), (12, 8)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], preset, nonfinite=mode, nonfinite_scope="block")
        log = []
        for k in range(5):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen)
                if k == 2 and i == 1:
                    g *= 1e20
                if k == 3 and i == 0:
                    g[0] = float("nan")
                p.grad = g
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    opt.step()
                    opt.flush_warnings()
                    log.append(sorted(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)))
                except FloatingPointError as exc:
                    log.append(str(exc))
        return log, [p.detach().clone() for p in params], opt.nonfinite_counts()

    with cpu_paths():
        log_a, params_a, counts_a = run()
    with gpu_paths():
        log_b, params_b, counts_b = run()
    assert log_a == log_b and counts_a == counts_b
    assert any(log_a)  # something was reported
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.parametrize("preset", ["soap", "pro_kl_shampoo", "dykaf_rank1"])
def test_a_checkpoint_of_the_cpus_paths_resumes_on_the_gpus_paths_bit_for_bit(preset):
    """A state dict written by a CPU run, loaded and continued on the GPU's paths (as a checkpoint moves from a CPU to
    a GPU), equals the CPU run continued, bit for bit. Would catch: a stack whose layout the GPU path's masked
    writes change (a column-major basis), or a counter the two paths keep differently."""
    grads = _grads(7)
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen) for s in SHAPES]

    def fresh():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        return params, kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], preset, **_overrides(preset))

    def steps(params, opt, part):
        for step in part:
            for p, g in zip(params, step):
                p.grad = None if g is None else g.clone()
            opt.step()

    with cpu_paths():
        params, opt = fresh()
        steps(params, opt, grads[:4])
        saved, at = opt.state_dict(), [p.detach().clone() for p in params]
        steps(params, opt, grads[4:])
    with gpu_paths():
        resumed, other = fresh()
        with torch.no_grad():
            for p, a in zip(resumed, at):
                p.copy_(a)
        other.load_state_dict(saved)
        steps(resumed, other, grads[4:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


# -- the CPU's tiled, split and padded arithmetic against the GPU's dense form, to rounding ------------------------


@contextlib.contextmanager
def _cpu_forms_on_small_blocks():
    """The CPU's tiled products (tiles of 8 from side 16), split sandwiches (from 20), padded QR (sides of 8 up to
    64) and blocked transposes (from 16), on blocks small enough for a test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kopt, "_FUSED_ADAMW", False)
        for name, value in [("_GRAM_TILE", 8), ("_GRAM_TILED_MIN", 16), ("_SPLIT_SANDWICH_MIN", 20),
                            ("_QR_PAD_SIDE", 8), ("_QR_PAD_MAX", 64), ("_SYM_BLOCKED_MIN", 16)]:
            patch.setattr(linalg, name, value)
        yield


# (pro_dykaf's restricted-side update makes plain products: no tiles to compare)
@pytest.mark.parametrize("preset", [p for p in kronopt.PRESETS if p not in ("adamw", "muon", "pro_dykaf")])
def test_the_cpus_tiled_and_padded_forms_follow_the_gpus_dense_form_in_float64(preset):
    """float64, square blocks of random gradients (full-rank factors: a well-posed eigenbasis; DyKAF from the
    ``sum`` start, whose first factors are full rank too, where ``kron``'s rank-one start leaves all but one
    eigenvector to the solver): the tiled Gram updates (deferred to the write), padded QR and blocked transposes
    against the GPU's single products, over refreshes and a NaN gradient: every parameter to 1e-9 of its change.
    Would catch: a tile, a mirror or a deferred update that is not the dense product (an error of the size of the
    step, not of rounding), or a padded Q that is not the QR's."""
    shapes = [(24, 24), (24, 24), (16, 16), (7,), (32, 32)]
    grads = _grads(6, shapes=shapes, seed=5)
    grads[0][1] = torch.randn(24, 24, generator=torch.Generator().manual_seed(9))  # no late start: full-rank firsts
    ov = _overrides(preset, **({"factors.init": "sum"} if preset in ("dykaf", "dykaf_rank1") else {}))
    with _cpu_forms_on_small_blocks():
        hits = {}
        real = linalg._tiled_sym_product

        def counted(*a, **k):
            hits["tiles"] = hits.get("tiles", 0) + 1
            return real(*a, **k)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(linalg, "_tiled_sym_product", counted)
            cpu = _trajectory(preset, grads, shapes=shapes, dtype=torch.float64, **ov)
    with gpu_paths():
        gpu = _trajectory(preset, grads, shapes=shapes, dtype=torch.float64, **ov)
    assert hits.get("tiles")
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen).double() for s in shapes]
    for k, ((pa, *_), (pb, *_)) in enumerate(zip(cpu, gpu)):
        for i, (a, b, s) in enumerate(zip(pa, pb, start)):
            change = (b - s).norm()
            assert (a - b).norm() <= 1e-9 * change + 1e-300, (k, i)


@pytest.mark.parametrize("shape", [(12, 24), (24, 12)], ids=["wide", "tall"])
def test_dykafs_split_sandwiches_follow_the_dense_form_over_a_run(shape):
    """DyKAF's factors on blocks where the CPU takes the split sandwich (the larger side from 20, tiles of 8), over
    a run with a late start and a NaN gradient, against the GPU's dense products, float64. The factors do not read
    the basis (whose null space is arbitrary on these blocks), so they are compared directly, to 1e-11 of their
    norm. Would catch: a fresh block's direction lost in the split, a tile row or column dropped, or the deferred
    scaling written into a skipped block."""
    shapes = [shape, shape]
    grads = _grads(6, shapes=[shape, shape, shape, (5,), (2, 3, 2), (12, 8)], seed=6)
    grads = [[step[0], step[1]] for step in grads]
    grads[5][1] = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with _cpu_forms_on_small_blocks():
        hits = {}
        real = linalg.split_sandwich

        def counted(*a, **k):
            hits["split"] = hits.get("split", 0) + 1
            return real(*a, **k)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(linalg, "split_sandwich", counted)
            cpu = _trajectory("dykaf", grads, shapes=shapes, dtype=torch.float64, **_overrides("dykaf"))
    with gpu_paths():
        gpu = _trajectory("dykaf", grads, shapes=shapes, dtype=torch.float64, **_overrides("dykaf"))
    assert hits.get("split")
    for k, ((_, ta, *_), (_, tb, *_)) in enumerate(zip(cpu, gpu)):
        for (i, key, a), (_, _, b) in zip(ta, tb):
            if key.startswith("factors.") and a.is_floating_point():
                assert (a - b).norm() <= 1e-11 * b.norm() + 1e-300, (k, i, key)


# -- rates held in tensors on an accelerator ---------------------------------------------------------------------


def _step_with_a_device_rate(preset, key, value, *, forbid):
    """Two steps of ``preset`` on the GPU's paths with ``param_groups[0][key]`` a one-entry tensor that kronopt
    takes for a tensor on an accelerator (``one_cpu_number`` says it is not a CPU number, so nothing may read it);
    the second step with host reads forbidden (``forbid``). Returns the parameters."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)) for _ in range(2)]
    with gpu_paths(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kopt, "one_cpu_number", lambda v: False)
        opt = kronopt.build(params, preset, nonfinite="skip", lr=0.01, weight_decay=0.0)
        for step in range(2):
            for p in params:
                p.grad = torch.randn(6, 4, generator=gen)
            if step == 1:
                opt.param_groups[0][key] = value
                if forbid:
                    _forbid_host_reads(patch)
            opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.filterwarnings("ignore:the route sends")
@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_learning_rate_tensor_on_an_accelerator_is_used_without_a_host_read(preset):
    """torch.optim lets ``lr`` be a tensor (a scheduler's, on the device): the step uses it as a tensor, reads
    nothing on the host, and steps as the same number would (to float32 rounding). Would catch: ``float(lr)`` or
    ``if lr`` in the step (a synchronisation per step on a GPU), or a tensor rate applied with the wrong sign."""
    got = _step_with_a_device_rate(preset, "lr", torch.tensor(0.03), forbid=True)
    want = _step_with_a_device_rate(preset, "lr", 0.03, forbid=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:the route sends")
@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_a_weight_decay_tensor_on_an_accelerator_is_used_without_a_host_read(preset):
    """The same for ``weight_decay`` (docs/architecture.md: "a tensor on an accelerator is not read, which would
    synchronise"). ``Post.apply_`` decides whether to decay with ``if weight_decay`` (post.py), and the compiled
    twin with ``bool(weight_decay)`` (compiled.py): on a GPU each is a synchronisation every step."""
    got = _step_with_a_device_rate(preset, "weight_decay", torch.tensor(0.1), forbid=True)
    want = _step_with_a_device_rate(preset, "weight_decay", 0.1, forbid=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- work sharding: no host data copied to the device on a plain step -------------------------------------------


def _fake_two_ranks(patch):
    """This process as rank 0 of 2 (work sharding on), with an all-gather that hands back this rank's buffer
    for both ranks: enough to step, not to be right about rank 1's blocks."""
    patch.setattr(distributed, "current", lambda *, enabled: distributed.Sharding(rank=0, world_size=2) if enabled else None)

    def gather(out, send, group=None):
        out.copy_(torch.cat([send, send]))

    patch.setattr(torch.distributed, "all_gather_into_tensor", gather)
    patch.setattr(torch.distributed, "all_gather_single", gather, raising=False)


def _tensors_made_from_python_data(device: str) -> list[str]:
    """Where ``torch.tensor`` runs during a plain (not first) work-sharded soap step on ``device``."""
    made: list[str] = []
    real = torch.tensor
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(device)) for _ in range(4)]
    with pytest.MonkeyPatch.context() as patch:
        _fake_two_ranks(patch)
        opt = kronopt.build(params, "soap", nonfinite="skip", **{"refresh.every": 100})
        assert opt._buckets[0].plan is not None and opt._buckets[0].plan.owned()  # sharded, this rank owns blocks
        for step in range(3):
            for p in params:
                p.grad = torch.randn(6, 4, generator=gen).to(device)
            if step == 2:
                patch.setattr(torch, "tensor", lambda *a, **k: (made.append(str(traceback.extract_stack()[-2][:2])), real(*a, **k))[1])
            opt.step()
    return made


@pytest.mark.filterwarnings("ignore:the route sends")
def test_a_work_sharded_plain_step_copies_no_host_data_to_the_device():
    """Under DDP work sharding a plain step builds ``torch.tensor(plan.owned(), device=…)`` (the owned blocks'
    positions, ``KronOptimizer._step_sharded``) and ``torch.tensor(index, device=…)`` (the gathered blocks' order,
    ``GatherPlan.gather``) from Python lists: on a GPU each is a copy from pageable host memory that waits for
    the stream (``torch.cuda.set_sync_debug_mode("error")`` refuses it). FSDP2's ``ShardPlan.index`` caches its
    index tensors per device; the gather plan does not. Would pass once both are made once per plan and device."""
    assert _tensors_made_from_python_data("cpu") == []


# -- numerics failures: what the fallback takes for one ------------------------------------------------------------


def _raise(exc):
    def solver(*args, **kwargs):
        raise exc

    return solver


ERRORS = {"out of memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")}
if hasattr(torch, "AcceleratorError"):  # a CUDA error surfacing at a synchronisation (torch ≥ 2.8)
    ERRORS["accelerator error"] = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
SOLVERS = [("_eigh", "soap"), ("_eigh", "kl_shampoo"), ("_svd", "dykaf"), ("_svd", "pro_kl_shampoo")]


@pytest.mark.filterwarnings("ignore:kronopt. the SVD", "ignore:the route sends")
@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize(("solver", "preset"), SOLVERS)
def test_a_device_error_inside_a_solver_is_raised_not_taken_for_a_numerics_failure(solver, preset, error):
    """``torch.OutOfMemoryError`` and ``torch.AcceleratorError`` are ``RuntimeError``s. ``linalg.eigh_descending``
    and ``linalg._svd_retried`` retry any ``RuntimeError`` in float64 (twice the memory) and then fall back: the
    basis keeps its old one and counts an "eigh failure" (no warning at all for soap and kl_shampoo), the SVD start
    a power iteration. On a GPU, an out-of-memory in the solver's workspace, or an earlier kernel's error surfacing
    at its synchronisation, is then hidden, every refresh. DESIGN.md's policy is for numerics failures (no
    convergence); compiled.py re-raises an out-of-memory for the same reason. Would pass once these propagate."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 6, generator=gen)) for _ in range(2)]
    opt = kronopt.build(params, preset, **{"refresh.every": 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linalg, solver, _raise(ERRORS[error]))
        with pytest.raises(type(ERRORS[error])):
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(8, 6, generator=gen)
                opt.step()


@pytest.mark.filterwarnings("ignore:kronopt. the SVD", "ignore:the route sends")
@pytest.mark.parametrize(("solver", "preset"), SOLVERS)
def test_a_solver_that_does_not_converge_still_falls_back(solver, preset):
    """The policy the fix above must keep: a ``torch.linalg.LinAlgError`` (no convergence, in both dtypes) keeps
    the last basis and counts the failure, or starts from the power iteration, and the step goes on with finite
    parameters. Would catch: a fix that re-raises every error of the solver."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 6, generator=gen)) for _ in range(2)]
    opt = kronopt.build(params, preset, **{"refresh.every": 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linalg, solver, _raise(torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(8, 6, generator=gen)
            opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    if solver == "_eigh":
        assert all(n > 0 for n in opt.eigh_failures().values())


# -- CUDA only: what the CPU cannot show --------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _allow_first_call_syncs(patch):
    """torch's ``eigh`` and ``svd`` and the first call's read of its mask synchronise by design (test_no_host_sync.py)."""
    for name in ("_eigh", "_svd", "_any_written"):
        real = getattr(linalg, name)

        def allowed(*args, _real=real, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return _real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        patch.setattr(linalg, name, allowed)


@contextlib.contextmanager
def _no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.filterwarnings("ignore:non-finite gradient")
@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_cuda_run_follows_the_cpu_run_with_non_finite_gradients_groups_and_skipped_blocks(preset):
    """The scenario of the CPU comparisons above on a real GPU (float32): NaN and -inf gradients, a split bucket,
    two param groups, refreshes. Square blocks of random gradients keep every eigenbasis well posed; DyKAF starts
    from ``sum`` (its ``kron`` start is rank one: the solver then picks all but one eigenvector freely, and a GPU's
    picks another trajectory, not a rounding of this one). Newton–Schulz in bfloat16 rounds otherwise in cuBLAS
    than in the CPU's kernels, so the tolerance is that of a few bfloat16 roundings of a step."""
    shapes = [(16, 16), (16, 16), (24, 24), (9,), (2, 4, 4)]
    grads = _grads(6, shapes=shapes, seed=3)
    grads[0][1] = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))
    ov = _overrides(preset, nonfinite_scope="block", **({"factors.init": "sum"} if "dykaf" in preset else {}))
    cpu = _trajectory(preset, grads, shapes=shapes, groups=_groups, **ov)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    opt = kronopt.build(_groups([(f"blocks.{i}.weight", p) for i, p in enumerate(params)]), preset, **ov)
    for k, step in enumerate(grads):
        for p, g in zip(params, step):
            p.grad = None if g is None else g.cuda()
        opt.step()
        for a, b in zip(params, cpu[k][0]):
            torch.testing.assert_close(a.detach().cpu(), b, rtol=2e-3, atol=2e-4)
    assert opt.nonfinite_counts() == cpu[-1][3]


@gpu
@pytest.mark.parametrize(("preset", "key", "value"), [
    ("adamw", "lr", 0.01), ("soap", "lr", 0.01), ("muon", "lr", 0.01), ("soap", "weight_decay", 0.1),
])
def test_cuda_step_with_a_rate_tensor_on_the_device_does_not_synchronise(preset, key, value):
    """A scheduler's learning rate or weight decay held in a tensor on the device is never read on the host."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 32, generator=gen).cuda()) for _ in range(2)]
    opt = kronopt.build(params, preset, nonfinite="skip", **({"refresh.every": 100} if preset == "soap" else {}))
    with pytest.MonkeyPatch.context() as patch:
        _allow_first_call_syncs(patch)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(32, 32, device="cuda")
            if step == 2:
                opt.param_groups[0][key] = torch.tensor(value, device="cuda")
                with _no_sync():
                    opt.step()
            else:
                opt.step()


@gpu
def test_cuda_work_sharded_plain_step_does_not_synchronise():
    """Two ranks faked in one process (the all-gather hands this rank's buffer back twice): the plain step of a
    sharded bucket must not wait for the device."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 24, generator=gen).cuda()) for _ in range(4)]
    with pytest.MonkeyPatch.context() as patch:
        _fake_two_ranks(patch)
        _allow_first_call_syncs(patch)
        opt = kronopt.build(params, "soap", nonfinite="skip", **{"refresh.every": 100})
        for step in range(3):
            for p in params:
                p.grad = torch.randn(24, 24, device="cuda")
            if step == 2:
                with _no_sync():
                    opt.step()
            else:
                opt.step()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_q_factor_in_the_products_own_memory_is_the_q_of_torch_qr(dtype):
    """``q_factor(overwrite=True)`` runs ``geqrf`` and ``householder_product`` with ``out=`` the input itself, which
    only a CPU has run: on CUDA it must still be the Q of ``torch.linalg.qr`` (same Householder routines, so the
    same columns up to rounding), in the input's memory."""
    P = torch.randn(3, 40, 40, dtype=dtype, device="cuda").mT.contiguous().mT  # column-major, as the refresh makes it
    want = torch.linalg.qr(P.clone()).Q
    ptr = P.data_ptr()
    got = linalg.q_factor(P, overwrite=True)
    assert got.data_ptr() == ptr
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@gpu
def test_cuda_eigh_descending_with_a_nan_block_refuses_it_or_flags_it_and_keeps_the_others():
    """cuSOLVER may return NaN for a NaN block without an error, or torch may raise after reading its info codes:
    either must leave the other blocks' decompositions right (the bases replace non-finite factors by the identity
    first, ``bases._eigh_side``; this is the solver's own contract)."""
    A = torch.randn(3, 12, 12, dtype=torch.float64, device="cuda")
    A = A @ A.mT
    A[1, 2, 3] = A[1, 3, 2] = float("nan")
    try:
        eig = linalg.eigh_descending(A)
    except ArithmeticError:
        return
    assert eig.ok.tolist()[0] and eig.ok.tolist()[2] and not eig.ok.tolist()[1]
    for i in (0, 2):
        torch.testing.assert_close(eig.Q[i] @ torch.diag(eig.lam[i]) @ eig.Q[i].mT, A[i], rtol=1e-10, atol=1e-10)


@gpu
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_finite_blocks_flags_every_kind_of_non_finite_entry(dtype, tf32):
    """The per-block test reads a stack through a product with ``2⁻⁶⁴`` (cuBLAS on a GPU): a NaN, +inf or -inf at a
    corner, in the middle or beside a large finite entry must reach the row sums there, TF32 on or off, and a
    finite stack must pass."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for bad in (float("nan"), float("inf"), -float("inf")):
            for where in ((0, 0), (17, 33), (63, 63)):
                X = torch.randn(4, 64, 64, device="cuda").to(dtype)
                X[3, 5, 5] = 1e30  # large, finite
                X[2][where] = bad
                assert linalg.finite_blocks(X).tolist() == [True, True, False, True], (bad, where)
                assert linalg.finite_blocks(X.mT.contiguous().mT).tolist() == [True, True, False, True]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@gpu
def test_cuda_newton_schulz_in_bfloat16_is_the_cpus_to_bfloat16_rounding():
    """cuBLAS's bfloat16 products accumulate in their own order (and, by default, may reduce in reduced precision):
    the iteration on a GPU is the CPU's (bfloat16 arithmetic in float32 kernels) to a few bfloat16 roundings."""
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(4, 48, 32, generator=gen)
    coefficients = linalg.ns_schedule("kj", 5)
    cpu = linalg.newton_schulz(U, coefficients).float()
    got = linalg.newton_schulz(U.cuda(), coefficients).float().cpu()
    assert float((got - cpu).norm() / cpu.norm()) < 3e-2


@gpu
@pytest.mark.filterwarnings("ignore:the route sends")
@pytest.mark.parametrize("preset", ["muon", "soap"])
def test_cuda_compiled_step_follows_the_eager_one(preset):
    """``compile = true`` on a GPU (Inductor's Triton kernels for Newton–Schulz and the elementwise tail) against the
    eager GPU run: the same steps to rounding, and no warning that compilation failed."""

    def run(compile_):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(32, 32, generator=gen).cuda()) for _ in range(2)]
        opt = kronopt.build(params, preset, compile=compile_)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(32, 32, generator=gen).cuda()
            opt.step()
        return [p.detach().cpu() for p in params]

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = run(True)
    for a, b in zip(compiled, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
