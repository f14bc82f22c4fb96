"""A differential hunt of the shape policy (``kronopt/_shapes.py``, config ``[shapes]`` and ``[route]``).

Every parameter that is not a plain matrix becomes one ``m × n`` block (docs/architecture.md "Words",
``_shapes`` docstring, specs soap.md §7, dykaf.md §8, kl_shampoo.md §8, muon.md §5-§7):

* 0-D → ``(1, 1)``, no side rotated; 1-D ``(d,)`` → ``(d, 1)``, its left side rotated only with
  ``precondition_1d`` and ``d ≤ max_dim``;
* N-D ``(o, i, kh, kw)`` → ``(o, i·kh·kw)``; with ``merge_dims`` SOAP's greedy merge first, one merged mode →
  ``(d, 1)`` with a trivial right side, more than two → ``(first, rest)``;
* a side longer than ``max_dim`` is not rotated (identity; KL: ``s ≡ 1``).

Expected values come from the clean-room float64 references of ``tests/reference`` (which never import
kronopt) applied to the documented reshaping, from ``torch.optim.Muon`` / ``torch.optim.AdamW``, or (for
bit-for-bit properties) from the same preset stepping a plain contiguous copy or each parameter alone.
A side the references factor but the policy leaves out (the trivial right side of a 1-D block) is compared
where the algorithm does not depend on it (SOAP, Shampoo, DyKAF: a 1 × 1 basis is ±1 and Shampoo's scalar root is
grafted away) or with the reference's threshold made to leave it out (KL, whose tracked root would scale the step).
"""

import copy
import dataclasses
import math
import zlib

import pytest
import torch

import kronopt
from tests.equivalence._helpers import run_history
from tests.reference import kl_shampoo as kl_ref
from tests.reference.dykaf import dykaf_reference
from tests.reference.kl_shampoo import kl_reference
from tests.reference.shampoo import shampoo_reference
from tests.reference.soap import soap_reference

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _seed(*key):
    """A seed that does not change between runs (``hash`` of a string does)."""
    return zlib.crc32(repr(key).encode())


# -- helpers --------------------------------------------------------------------------------------------------


def _block_grads(gen, block, steps):
    """float64 gradients in block form; the first has one nonzero entry, so a first basis built from it has
    coordinate null-space eigenvectors in both implementations (a rank-deficient first basis is otherwise fixed
    by round-off and two correct implementations part there)."""
    grads = [torch.randn(block, generator=gen, dtype=F64) for _ in range(steps)]
    if len(block) == 2:
        first = grads[0]
        value = first[0, 0].item()
        first.zero_()
        first[0, 0] = value
    return grads


def _ours(preset, shape, start, grads, overrides, *, name="blocks.0.weight"):
    """The preset stepping one parameter of ``shape`` (``start`` and the gradients reshaped to it): the
    history of the parameter, and the optimizer."""
    p = torch.nn.Parameter(start.reshape(shape).clone())
    opt = kronopt.build([(name, p)], preset, **overrides)
    history = run_history(opt, [p], [[g.reshape(shape)] for g in grads])
    return [h[0] for h in history], opt


def _assert_history(ours, ref, block, rtol=1e-10, atol=1e-12):
    assert len(ours) == len(ref)
    for k, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a.reshape(block), b.reshape(block), rtol=rtol, atol=atol, msg=lambda m, k=k: f"call {k}: {m}")


def _reference(kind, start, grads, **kw):
    """One parameter's history under a float64 reference (``start`` and the gradients in the reference's shape)."""
    fn = {"soap": soap_reference, "shampoo": shampoo_reference, "dykaf": dykaf_reference, "kl": kl_reference}[kind]
    return [h[0] for h in fn([start], [[g] for g in grads], **kw)]


#: each preset's overrides and its reference's matching options (float64 parameters, so float64 state). The first
#: refresh comes after enough gradients (one nonzero entry, then rank ≤ min(m, n) each) to make every factor of
#: the blocks below full rank: a power step on a rank-deficient factor completes its basis from round-off
SOAP = ({"lr": 3e-3, "refresh.every": 8}, {"lr": 3e-3, "precondition_frequency": 8})
SHAMPOO = (
    {"lr": 1e-3, "refresh.every": 9},
    {"lr": 1e-3, "betas": (0.95, 0.95), "graft_betas": (0.95, 0.95), "precondition_frequency": 9},
)
DYKAF = ({"lr": 3e-3, "refresh.every": 8}, {"lr": 3e-3, "precondition_frequency": 8})
KL = (
    {"lr": 1e-2, "refresh.every": 7, "factors.beta": 0.98, "inner.momentum": 0.9, "factors.damping": 0.0},
    {"lr": 1e-2, "precondition_frequency": 7},
)
CASES = {"soap": ("soap", SOAP), "shampoo": ("shampoo", SHAMPOO), "dykaf": ("dykaf", DYKAF), "kl_shampoo": ("kl", KL)}


# -- N-D weights: the documented block, with merge_dims on and off, max_dim cutting a side ---------------------

#: (parameter shape, block the docs give it, [shapes] overrides); the reference steps the block with
#: max_precond_dim = max_dim
ND = [
    pytest.param((4, 3, 2, 2), (4, 12), {}, id="conv-o,i*kh*kw"),
    pytest.param((5, 2, 3), (5, 6), {}, id="3d"),
    pytest.param((4, 3, 2, 2), (4, 12), {"shapes.max_dim": 10}, id="conv-right-over-max"),
    pytest.param((6, 2, 2), (6, 4), {"shapes.max_dim": 5}, id="3d-left-over-max"),
    pytest.param((6, 4), (6, 4), {"shapes.max_dim": 6}, id="side-equal-to-max-is-rotated"),
    pytest.param((4, 3, 2, 2), (12, 4), {"shapes.merge_dims": True, "shapes.max_dim": 12}, id="merge-conv-(12,4)"),
    pytest.param((2, 3, 4, 5), (6, 20), {"shapes.merge_dims": True, "shapes.max_dim": 12}, id="merge-3-modes-(first,rest)"),
    pytest.param((4, 3, 2, 2), (4, 12), {"shapes.merge_dims": False, "shapes.max_dim": 12}, id="no-merge-at-12"),
]


@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf", "kl_shampoo"])
@pytest.mark.parametrize("shape, block, shapes", ND)
def test_nd_parameter_steps_as_the_reference_on_its_documented_block(preset, shape, block, shapes):
    """An N-D parameter steps exactly as the float64 reference steps the 2-D block the shape policy documents.

    Fails on a wrong flattening (``(o·kh·kw, i)``, a transposed block, ``(o·i, kh·kw)``), on a merge rule
    other than SOAP's greedy one (or merging without ``merge_dims``), on ``> max_dim`` where the policy says
    ``≤`` (the ``side-equal-to-max`` case), on rotating a side longer than ``max_dim`` or not rotating one within
    it, and on an update not reshaped back in the parameter's own order."""
    kind, (ours_ov, ref_kw) = CASES[preset]
    gen = torch.Generator().manual_seed(_seed(preset, shape, block))
    steps = 20
    start = torch.randn(block, generator=gen, dtype=F64)
    grads = _block_grads(gen, block, steps)
    max_dim = shapes.get("shapes.max_dim", 10000)
    ref = _reference(kind, start, grads, max_precond_dim=max_dim, **ref_kw)
    ours, _ = _ours(preset, shape, start, grads, {**ours_ov, **shapes})
    assert (ours[-1].reshape(block) - start).abs().max() > 1e-3  # it moved
    _assert_history(ours, ref, block)


def test_the_nd_cases_discriminate():
    """The references tell the documented block from its plausible wrong neighbours (so the test above can
    fail): SOAP on (4, 12) vs on (12, 4) (merged) vs (4, 12) with the right side cut at max_dim 10."""
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(4, 12, generator=gen, dtype=F64)
    grads = _block_grads(gen, (4, 12), 14)
    a = _reference("soap", start, grads, **SOAP[1])
    b = _reference("soap", start.reshape(12, 4), [g.reshape(12, 4) for g in grads], **SOAP[1])
    c = _reference("soap", start, grads, max_precond_dim=10, **SOAP[1])
    assert (a[-1] - b[-1].reshape(4, 12)).abs().max() > 1e-4
    assert (a[-1] - c[-1]).abs().max() > 1e-4


# -- 1-D and 0-D parameters, precondition_1d on and off -------------------------------------------------------

#: (shape, [shapes] overrides, the reference's parameter shape, its max_precond_dim): the reference factors a
#: 2-D (d, 1) parameter's left side (and a trivial 1 × 1 right one) and never a 1-D one
VECTORS = [
    pytest.param((7,), {"shapes.precondition_1d": True}, (7, 1), 10000, id="1d-preconditioned"),
    pytest.param((7,), {"shapes.precondition_1d": True, "shapes.max_dim": 7}, (7, 1), 7, id="1d-preconditioned-at-max"),
    pytest.param((7,), {"shapes.precondition_1d": True, "shapes.max_dim": 6}, (7,), 10000, id="1d-over-max-not-rotated"),
    pytest.param((7,), {}, (7,), 10000, id="1d-default"),
    pytest.param((), {}, (1,), 10000, id="0d"),
    pytest.param((), {"shapes.precondition_1d": True}, (1,), 10000, id="0d-never-rotated"),
    pytest.param((1,), {"shapes.precondition_1d": True}, (1, 1), 10000, id="1d-size-1-preconditioned"),
    pytest.param((3, 4), {"shapes.merge_dims": True, "shapes.max_dim": 12}, (12, 1), 12, id="2d-merged-to-one-mode"),
    pytest.param((2, 3, 2), {"shapes.merge_dims": True, "shapes.max_dim": 12}, (12, 1), 12, id="3d-merged-to-one-mode"),
    pytest.param((13, 1), {"shapes.merge_dims": True, "shapes.max_dim": 12}, (13,), 10000, id="merged-one-mode-over-max"),
]


@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf"])
@pytest.mark.parametrize("shape, shapes, ref_shape, ref_max", VECTORS)
def test_vectors_scalars_and_one_mode_blocks_step_as_the_reference(preset, shape, shapes, ref_shape, ref_max):
    """1-D and 0-D parameters and a merge to one mode (spec soap.md §7; dykaf.md §8: "1-D: as SOAP"): one d × d
    factor with ``precondition_1d`` (or a single merged mode ≤ max_dim, whatever ``precondition_1d``), none
    otherwise, and never for a 0-D parameter.

    Fails on ``precondition_1d`` ignored or applied without its ``d ≤ max_dim`` condition, on a 0-D parameter
    given a factor, on a 1-D block rotated on its trivial side instead, and on a one-mode merge not preconditioned
    (or preconditioned past max_dim)."""
    kind, (ours_ov, ref_kw) = CASES[preset]
    if preset == "dykaf":
        # every block here is one-sided or unrotated: DyKAF keeps SOAP's EMA there (dykaf.md §8), which the SOAP
        # reference's (d, 1) parameter (a trivial 1 × 1 right side) reproduces
        kind = "soap"
    gen = torch.Generator().manual_seed(_seed(preset, shape, ref_shape))
    steps = 20
    start = torch.randn(ref_shape, generator=gen, dtype=F64)
    grads = _block_grads(gen, ref_shape, steps)
    ref = _reference(kind, start, grads, max_precond_dim=ref_max, **ref_kw)
    ours, _ = _ours(preset, shape, start, grads, {**ours_ov, **shapes})
    _assert_history(ours, ref, ref_shape)


def test_precondition_1d_changes_the_step():
    """The vector cases discriminate: SOAP's reference moves a preconditioned (7, 1) block otherwise than the
    plain 1-D Adam path, so a preset ignoring ``precondition_1d`` fails above."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(7, 1, generator=gen, dtype=F64)
    grads = _block_grads(gen, (7, 1), 14)
    a = _reference("soap", start, grads, **SOAP[1])
    b = _reference("soap", start.reshape(7), [g.reshape(7) for g in grads], **SOAP[1])
    assert (a[-1].reshape(7) - b[-1]).abs().max() > 1e-4


class _AllButUnitSides:
    """A ``max_precond_dim`` for the KL reference that factors every side but a size-1 one: the (d, 1) block of
    a preconditioned 1-D parameter with its trivial right side absent (``s ≡ 1``, kl_shampoo.md §8)."""

    def __ge__(self, d):
        return d > 1


@pytest.mark.parametrize("preset, klsoap", [("kl_shampoo", False), ("kl_soap", True)])
def test_kl_preconditioned_vector_is_one_sided_with_unit_other_root(preset, klsoap):
    """A 1-D parameter kept in the KL pipeline (``route.vectors = "pipeline"``) with ``precondition_1d``: the
    left side is the one-sided KL estimate, the right side absent with ``s ≡ 1``.

    Fails on the trivial side given a tracked root (a (d, 1) block with both sides: it scales the step, ~1e-4
    here), on the vector routed to AdamW despite ``vectors = "pipeline"``, and on ``precondition_1d`` ignored."""
    gen = torch.Generator().manual_seed(21)
    d, steps = 7, 20
    start = torch.randn(d, 1, generator=gen, dtype=F64)
    grads = [torch.randn(d, 1, generator=gen, dtype=F64) for _ in range(steps)]
    hp = kl_ref.KlHyper(lr=1e-4, beta1=0.9, beta2=0.98, rho=0.98, eps=1e-8, weight_decay=0.01, klsoap=klsoap)
    hp = dataclasses.replace(hp, max_precond_dim=_AllButUnitSides())
    W, state, ref = start.clone(), kl_ref.KlState(), []
    for g in grads:
        W = kl_ref.kl_update(W, g, state, hp)
        ref.append(W.clone())
    overrides = {"route.vectors": "pipeline", "shapes.precondition_1d": True, "lr": 1e-4, "factors.beta": 0.98}
    overrides.update({"inner.betas": [0.9, 0.98]} if klsoap else {"inner.momentum": 0.9})
    ours, opt = _ours(preset, (d,), start, grads, overrides, name="blocks.0.bias")
    assert [g["pipeline"] for g in opt.param_groups] == ["main"]
    _assert_history(ours, ref, (d, 1))
    # the same vector as a (d, 1) matrix keeps both roots, and steps otherwise (the case discriminates)
    both, _ = _ours(preset, (d, 1), start, grads, overrides)
    assert (both[-1] - ours[-1].reshape(d, 1)).abs().max() > 1e-6


@pytest.mark.parametrize("preset, klsoap", [("kl_shampoo", False), ("kl_soap", True)])
@pytest.mark.parametrize(
    "shape, shapes",
    [
        pytest.param((), {"shapes.precondition_1d": True}, id="0d-with-precondition_1d"),
        pytest.param((7,), {}, id="1d-without"),
        pytest.param((7,), {"shapes.precondition_1d": True, "shapes.max_dim": 6}, id="1d-over-max"),
    ],
)
def test_kl_unrotated_scalar_and_vector_have_unit_roots_on_both_sides(preset, klsoap, shape, shapes):
    """0-D parameters (whatever ``precondition_1d``) and 1-D ones without it, or longer than max_dim, kept in the
    KL pipeline: no side rotated, ``s ≡ 1`` on both: the reference with both sides absent (max_precond_dim 0).

    Fails on a 0-D parameter given a factor by ``precondition_1d`` (SOAP and Shampoo cannot see a 1 × 1 basis;
    KL's tracked root scales the step) and on a 1-D one preconditioned without it or past max_dim."""
    gen = torch.Generator().manual_seed(_seed(preset, shape))
    block, steps = ((1, 1) if shape == () else (shape[0], 1)), 12
    start = torch.randn(block, generator=gen, dtype=F64)
    grads = [torch.randn(block, generator=gen, dtype=F64) for _ in range(steps)]
    ref = _reference("kl", start, grads, lr=1e-4, using_klsoap=klsoap, max_precond_dim=0)
    overrides = {"route.vectors": "pipeline", "lr": 1e-4, "factors.beta": 0.98, **shapes}
    overrides.update({"inner.betas": [0.9, 0.98]} if klsoap else {"inner.momentum": 0.9})
    ours, _ = _ours(preset, shape, start, grads, overrides, name="blocks.0.scale")
    _assert_history(ours, ref, block)


# -- tiny and very rectangular blocks -------------------------------------------------------------------------

TINY = [
    pytest.param((1, 6), {}, id="1x6"),
    pytest.param((6, 1), {}, id="6x1"),
    pytest.param((2, 2), {}, id="2x2"),
    pytest.param((1, 1), {}, id="1x1"),
    pytest.param((4, 300), {"shapes.max_dim": 100}, id="4x300-one-sided"),
    pytest.param((300, 4), {"shapes.max_dim": 100}, id="300x4-one-sided"),
    pytest.param((4, 30), {}, id="4x30"),
]


@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf", "kl_shampoo"])
@pytest.mark.parametrize("shape, shapes", TINY)
def test_tiny_and_rectangular_blocks_step_as_the_reference(preset, shape, shapes):
    """Blocks whose factor is a scalar (1 × n, n × 1, 1 × 1), a 2 × 2 block, a very rectangular one with its long
    side over max_dim (one-sided) and one within it.

    Fails on a scalar side special-cased wrongly (dropped, or its 1 × 1 basis/root mishandled), on a one-sided
    block whose absent side is not the identity (KL: ``s ≡ 1``), and on the long side rotated past max_dim."""
    kind, (ours_ov, ref_kw) = CASES[preset]
    gen = torch.Generator().manual_seed(_seed(preset, shape))
    steps = 20
    start = torch.randn(shape, generator=gen, dtype=F64)
    grads = _block_grads(gen, shape, steps)
    ref = _reference(kind, start, grads, max_precond_dim=shapes.get("shapes.max_dim", 10000), **ref_kw)
    ours, _ = _ours(preset, shape, start, grads, {**ours_ov, **shapes})
    _assert_history(ours, ref, shape)


# -- the write: parameters stored in another layout ------------------------------------------------------------

#: parameters whose memory is not their block's: a block reshaped from them is a copy
STRIDED = [
    ("channels_last", (4, 3, 2, 2), lambda t: t.contiguous(memory_format=torch.channels_last)),
    ("transposed", (6, 4), lambda t: t.mT.contiguous().mT),
    ("permuted", (4, 3, 5), lambda t: t.permute(0, 2, 1).contiguous().permute(0, 2, 1)),
    ("strided_slice", (5, 3), lambda t: torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)[:, ::2].copy_(t)),
]


@pytest.mark.parametrize("preset", [p for p in kronopt.PRESETS if p != "adamw"])
def test_a_parameter_in_another_memory_layout_steps_as_its_contiguous_copy(preset):
    """channels_last, column-major, permuted and sliced parameters (and gradients in the same layout) move bit for
    bit as contiguous copies of them: the block is the parameter's logical ``reshape``, whatever its strides.

    Fails on a step written into a reshaped copy (the parameter left unchanged), on a block read from the
    parameter's memory order (``view``/``as_strided`` of the storage) instead of its logical order, and on a
    step written back in memory order."""
    gen = torch.Generator().manual_seed(5)
    starts = [torch.randn(s, generator=gen) for _, s, _ in STRIDED]
    ours = [torch.nn.Parameter(f(x.clone())) for (_, _, f), x in zip(STRIDED, starts)]
    plain = [torch.nn.Parameter(x.clone()) for x in starts]
    assert all(not p.is_contiguous() or name == "channels_last" for (name, _, _), p in zip(STRIDED, ours))
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))
    names = [f"blocks.{i}.weight" for i in range(len(STRIDED))]
    opt_a = kronopt.build(list(zip(names, ours)), preset)
    opt_b = kronopt.build(list(zip(names, plain)), preset)
    _step_both(opt_a, ours, opt_b, plain, gen, 6)
    for (name, _, _), a, b, x in zip(STRIDED, ours, plain, starts):
        assert not torch.equal(b.detach(), x), name  # it moved
        assert torch.equal(a.detach(), b.detach()), name


def _step_both(opt_a, ours, opt_b, plain, gen, steps):
    """``steps`` steps of both optimizers on the same gradients: laid out as ``STRIDED`` says for ``ours``,
    contiguous for ``plain``."""
    for _ in range(steps):
        for (_, s, f), a, b in zip(STRIDED, ours, plain):
            g = torch.randn(s, generator=gen)
            a.grad, b.grad = f(g.clone()), g.clone()
        opt_a.step()
        opt_b.step()


def test_adamw_parameter_in_another_memory_layout_steps_as_torch_adamw():
    """The adamw preset on the same layouts: torch.optim.AdamW's step on a contiguous copy (up to rounding: its
    contiguous blocks take torch's fused kernel, documented to agree with the general path up to rounding)."""
    gen = torch.Generator().manual_seed(6)
    starts = [torch.randn(s, generator=gen) for _, s, _ in STRIDED]
    ours = [torch.nn.Parameter(f(x.clone())) for (_, _, f), x in zip(STRIDED, starts)]
    theirs = [torch.nn.Parameter(x.clone()) for x in starts]
    opt = kronopt.build(ours, "adamw", lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.1, foreach=False)
    _step_both(opt, ours, ref, theirs, gen, 4)
    for (name, _, _), a, b, x in zip(STRIDED, ours, theirs, starts):
        assert (b.detach() - x).abs().max() > 1e-2, name
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=name)


# -- buckets never mix -----------------------------------------------------------------------------------------

#: shapes of several buckets (and (2, 12), (2, 3, 4), (2, 2, 6) sharing the block (2, 12)), float32 and float64
MIXED = [
    ((6, 4), torch.float32, "blocks.0.w"),
    ((2, 12), torch.float32, "blocks.1.w"),
    ((2, 3, 4), torch.float32, "blocks.2.w"),
    ((2, 2, 6), torch.float32, "blocks.3.w"),
    ((4, 3, 2, 2), torch.float32, "conv.weight"),
    ((7,), torch.float32, "blocks.0.bias"),
    ((), torch.float32, "blocks.0.scale"),
    ((5, 1), torch.float32, "blocks.4.w"),
    ((6, 4), torch.float64, "blocks.5.w"),
]


@pytest.mark.parametrize(
    "preset, shapes",
    [
        ("soap", {}),
        ("soap", {"shapes.precondition_1d": True, "shapes.merge_dims": True, "shapes.max_dim": 12}),
        ("shampoo", {"shapes.max_dim": 5}),
        ("muon", {}),
        ("dykaf_rank1", {"shapes.precondition_1d": True}),
        ("kl_soap", {"shapes.merge_dims": True, "shapes.max_dim": 12}),
        ("pro_kl_shampoo", {}),
        ("pro_dykaf", {}),
        ("adamw", {}),
    ],
)
def test_parameters_of_many_shapes_together_step_as_each_alone(preset, shapes):
    """One optimizer over parameters of several shapes, ranks and dtypes (several buckets, one of three blocks
    from three different shapes) moves each bit for bit as an optimizer over it alone, with a parameter skipped
    (no gradient) on some steps.

    Fails on buckets keyed without the block shape, sides or dtype (blocks of different layouts stacked), on
    a shared bucket that writes block i into the wrong parameter or reshapes it in the wrong shape, on state
    or step counts shared across buckets, and on stepping small buckets together with other arithmetic."""
    gen = torch.Generator().manual_seed(7)
    starts = [torch.randn(s, generator=gen, dtype=d) for s, d, _ in MIXED]
    steps = 6
    grads = [[None if (k + i) % 4 == 3 else torch.randn(s, generator=gen, dtype=d) for i, (s, d, _) in enumerate(MIXED)] for k in range(steps)]
    together = [torch.nn.Parameter(x.clone()) for x in starts]
    opt = kronopt.build([(n, p) for (_, _, n), p in zip(MIXED, together)], preset, **shapes)
    assert any(b["blocks"] >= 2 for b in opt.bucket_summary())  # a bucket shared by parameters of other shapes
    for step in grads:
        for p, g in zip(together, step):
            p.grad = None if g is None else g.clone()
        opt.step()
    for i, ((_, _, name), x) in enumerate(zip(MIXED, starts)):
        alone = torch.nn.Parameter(x.clone())
        opt_alone = kronopt.build([(name, alone)], preset, **shapes)
        for step in grads:
            alone.grad = None if step[i] is None else step[i].clone()
            opt_alone.step()
        assert torch.equal(alone.detach(), together[i].detach()), (name, MIXED[i][0])


# -- per-group and fallback shape policies ---------------------------------------------------------------------


def test_each_group_and_the_fallback_use_their_own_shape_policy():
    """A group's ``[shapes]`` overrides shape only its parameters; a ``[fallback]`` config's ``[shapes]`` shapes
    the parameters routed to it (not the main config's).

    Fails on the shape policy read from the optimizer's top-level config instead of the group's, and on routed
    vectors shaped by the main pipeline's policy (here: a SOAP fallback with ``precondition_1d`` under Muon)."""
    gen = torch.Generator().manual_seed(8)
    conv = torch.randn(4, 12, generator=gen, dtype=F64)
    vec = torch.randn(7, 1, generator=gen, dtype=F64)
    steps = 12
    g_conv = _block_grads(gen, (4, 12), steps)
    g_vec = _block_grads(gen, (7, 1), steps)

    # groups: the same conv shape, one group merging at 12 ((12, 4) blocks), one cutting the right side at 10
    a = torch.nn.Parameter(conv.reshape(4, 3, 2, 2).clone())
    b = torch.nn.Parameter(conv.reshape(4, 3, 2, 2).clone())
    opt = kronopt.build(
        [{"params": [a], "shapes.merge_dims": True, "shapes.max_dim": 12}, {"params": [b], "shapes.max_dim": 10}],
        "soap",
        **SOAP[0],
    )
    hist = run_history(opt, [a, b], [[g.reshape(4, 3, 2, 2), g.reshape(4, 3, 2, 2)] for g in g_conv])
    ref_a = _reference("soap", conv.reshape(12, 4), [g.reshape(12, 4) for g in g_conv], max_precond_dim=12, **SOAP[1])
    ref_b = _reference("soap", conv, g_conv, max_precond_dim=10, **SOAP[1])
    _assert_history([h[0] for h in hist], ref_a, (12, 4))
    _assert_history([h[1] for h in hist], ref_b, (4, 12))

    # the fallback: Muon's matrices, a SOAP fallback that preconditions its 1-D parameters
    muon = kronopt.to_dict(kronopt.PRESETS["muon"])
    soap = kronopt.to_dict(kronopt.PRESETS["soap"])
    fallback = {k: v for k, v in soap.items() if k not in ("distributed", "route")}
    fallback.update(lr=3e-3, refresh={**soap["refresh"], "every": SOAP[0]["refresh.every"]}, shapes={**soap["shapes"], "precondition_1d": True})
    cfg = {**muon, "fallback": fallback}
    bias = torch.nn.Parameter(vec.reshape(7).clone())
    w = torch.nn.Parameter(torch.randn(4, 4, generator=gen, dtype=F64))
    opt = kronopt.build([("blocks.0.bias", bias), ("blocks.0.w", w)], cfg)
    assert {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]} == {
        "blocks.0.bias": "fallback",
        "blocks.0.w": "main",
    }
    ours = []
    for g in g_vec:
        bias.grad = g.reshape(7).clone()
        w.grad = torch.randn(4, 4, generator=gen, dtype=F64)
        opt.step()
        ours.append(bias.detach().clone())
    _assert_history(ours, _reference("soap", vec, g_vec, **SOAP[1]), (7, 1))


# -- Muon: N-D blocks, the route of vectors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, flat, make, shapes",
    [
        pytest.param((4, 3, 5), (4, 15), lambda t: t, {}, id="3d"),
        pytest.param((8, 3, 3, 3), (8, 27), lambda t: t.contiguous(memory_format=torch.channels_last), {}, id="conv-channels_last"),
        pytest.param((5, 12), (5, 12), lambda t: t.mT.contiguous().mT, {}, id="transposed"),
        pytest.param((4, 300), (4, 300), lambda t: t, {"shapes.max_dim": 100}, id="max_dim-does-not-matter"),
        pytest.param((3, 4, 5), (12, 5), lambda t: t, {"shapes.merge_dims": True, "shapes.max_dim": 12}, id="merged-(12,5)"),
    ],
)
def test_muon_on_an_nd_block_equals_torch_muon_on_the_documented_matrix(shape, flat, make, shapes):
    """Muon steps an N-D / strided parameter as torch.optim.Muon steps its documented 2-D block (muon.md §7:
    a conv as (out, in·kh·kw)), the shape factor √max(1, m/n) from that block; ``max_dim`` changes nothing (no
    factors). Fails on the scale taken from the parameter's own last dims, on a wrong flattening, and on a
    strided parameter updated in memory order or left unchanged."""
    gen = torch.Generator().manual_seed(9)
    start = torch.randn(shape, generator=gen)
    ours = torch.nn.Parameter(make(start.clone()))
    theirs = torch.nn.Parameter(start.reshape(flat).clone())
    opt = kronopt.build([("blocks.0.weight", ours)], "muon", lr=1e-3, **shapes)
    ref = torch.optim.Muon([theirs])
    for _ in range(8):
        g = torch.randn(shape, generator=gen)
        ours.grad, theirs.grad = make(g.clone()), g.reshape(flat).clone()
        opt.step()
        ref.step()
    assert (theirs.detach() - start.reshape(flat)).abs().max() > 1e-3
    torch.testing.assert_close(ours.detach().reshape(flat), theirs.detach(), rtol=2e-5, atol=2e-5)


def test_muon_routes_scalars_and_vectors_to_adamw_and_keeps_them_with_vectors_pipeline():
    """muon.md §7: every 0-D and 1-D parameter goes to the AdamW fallback (torch.optim.AdamW with the fallback's
    hyperparameters); with ``route.vectors = "pipeline"`` they are Muon blocks, (d, 1) and (1, 1), stepped as
    torch.optim.Muon steps those matrices.

    Fails on a 0-D parameter missed by the route (``ndim == 1`` instead of ``≤ 1``), on vectors sent to Muon
    by default or to AdamW despite ``"pipeline"``, and on a wrong (d, 1)/(1, 1) block or shape factor."""
    gen = torch.Generator().manual_seed(10)
    shapes = {"blocks.0.bias": (7,), "blocks.0.scale": ()}
    for vectors in ("fallback", "pipeline"):
        dtype = F64 if vectors == "fallback" else torch.float32
        starts = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
        ours = {k: torch.nn.Parameter(v.clone()) for k, v in starts.items()}
        opt = kronopt.build(list(ours.items()), "muon", lr=1e-3, **{"route.vectors": vectors})
        assert {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]} == dict.fromkeys(
            shapes, "fallback" if vectors == "fallback" else "main"
        )
        if vectors == "fallback":
            fb = opt.config.fallback
            theirs = {k: torch.nn.Parameter(v.clone()) for k, v in starts.items()}
            ref = torch.optim.AdamW(
                list(theirs.values()), lr=fb.lr, betas=fb.inner.betas, eps=fb.inner.eps, weight_decay=fb.weight_decay
            )
            view = {k: s for k, s in shapes.items()}
        else:
            view = {"blocks.0.bias": (7, 1), "blocks.0.scale": (1, 1)}
            theirs = {k: torch.nn.Parameter(v.reshape(view[k]).clone()) for k, v in starts.items()}
            ref = torch.optim.Muon(list(theirs.values()))
        for _ in range(6):
            for k, s in shapes.items():
                g = torch.randn(s, generator=gen, dtype=dtype)
                ours[k].grad, theirs[k].grad = g.clone(), g.reshape(view[k]).clone()
            opt.step()
            ref.step()
        for k in shapes:
            assert (theirs[k].detach().reshape(shapes[k]) - starts[k]).abs().max() > 1e-4, (vectors, k)
            tol = {"rtol": 1e-12, "atol": 1e-14} if vectors == "fallback" else {"rtol": 2e-5, "atol": 2e-5}
            torch.testing.assert_close(ours[k].detach(), theirs[k].detach().reshape(shapes[k]), **tol, msg=f"{vectors} {k}")


def test_muon_scale_shape_last_two_dims_takes_the_factor_from_the_kernel_dims():
    """muon.md §5: "kronopt uses the flattened block by default and offers ``scale_shape = last_two_dims`` for
    parity with [KellerJordan/Muon]", whose factor for an (o, i, kh, kw) kernel is √max(1, kh/kw). On an
    (8, 3, 5, 2) kernel that is √2.5 against the flattened (8, 30) block's 1: torch.optim.Muon on the flattened
    matrix with its lr times √2.5 (no weight decay, which torch scales by the unadjusted lr)."""
    gen = torch.Generator().manual_seed(12)
    shape, flat = (8, 3, 5, 2), (8, 30)
    start = torch.randn(shape, generator=gen)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.reshape(flat).clone())
    opt = kronopt.build([("blocks.0.weight", ours)], "muon", lr=1e-3, weight_decay=0.0, **{"inner.scale_shape": "last_two_dims"})
    ref = torch.optim.Muon([theirs], lr=1e-3 * math.sqrt(2.5), weight_decay=0.0)
    for _ in range(5):
        g = torch.randn(shape, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.reshape(flat).clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach().reshape(flat), theirs.detach(), rtol=2e-5, atol=2e-5)


# -- a checkpoint of one shape policy is not silently taken by another ----------------------------------------


@pytest.mark.filterwarnings("ignore:loading optimizer state saved under a different config")
@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_shampoo", "muon"])
@pytest.mark.parametrize(
    "shape, saved, loaded",
    [
        pytest.param((4, 3, 2, 2), {"shapes.merge_dims": True, "shapes.max_dim": 12}, {"shapes.max_dim": 12}, id="merge-(12,4)-into-(4,12)"),
        pytest.param((3, 4), {"shapes.merge_dims": True, "shapes.max_dim": 12}, {"shapes.max_dim": 12}, id="merge-(12,1)-into-(3,4)"),
        pytest.param((6, 6), {}, {"shapes.max_dim": 5}, id="both-sides-into-none"),
    ],
)
def test_a_state_saved_under_another_block_shape_is_refused_or_harmless(preset, shape, saved, loaded):
    """A state dict saved under one shape policy and loaded under another whose block differs is refused with a
    ``ValueError`` (its factors, bases or momentum do not fit the block), unless the pipeline keeps no
    block-shaped state (Muon on a (6, 6) block cut at max_dim: no factors, its momentum the parameter's shape).

    Fails on a (12, 4) state silently reshaped into a (4, 12) block (or a (12, 1) one into (3, 4)), which would
    step with another parameter's statistics."""
    gen = torch.Generator().manual_seed(13)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    opt = kronopt.build([("blocks.0.weight", p)], preset, **saved)
    for _ in range(3):
        p.grad = torch.randn(shape, generator=gen, dtype=F64)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    other = kronopt.build([("blocks.0.weight", q)], preset, **loaded)
    harmless = preset == "muon" and shape == (6, 6)
    if harmless:
        other.load_state_dict(sd)
        ref = torch.nn.Parameter(p.detach().clone())
        same = kronopt.build([("blocks.0.weight", ref)], preset, **saved)
        same.load_state_dict(copy.deepcopy(sd))
        g = torch.randn(shape, generator=gen, dtype=F64)
        q.grad, ref.grad = g.clone(), g.clone()
        other.step()
        same.step()
        assert torch.equal(q.detach(), ref.detach())
    else:
        with pytest.raises(ValueError):
            other.load_state_dict(sd)
