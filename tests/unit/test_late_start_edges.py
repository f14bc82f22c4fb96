"""Edges of the late start of DyKAF blocks (dykaf.md §5: a block whose first gradient is exactly zero waits
for its first nonzero one; KronOptimizer._starts_on_nonzero / _nonzero, linalg._nonzero_each): the optimizer
and the factor stage must read "nonzero" alike."""

import pytest
import torch

import kronopt
from tests.torch_compat import needs_grad_dtype


@pytest.mark.parametrize(
    "preset, options, factor",
    [
        ("dykaf", {}, "factors.L"),
        ("dykaf", {"factors.init": "kron_reference"}, None),  # sqrt(sigma) start: not linear in G
        ("pro_dykaf", {}, "factors.R"),  # left side restricted: the full side is R
    ],
    ids=["kron", "kron_reference", "pro_dykaf"],
)
def test_a_tiny_nonzero_first_gradient_starts_the_block(preset, options, factor):
    """The optimizer reads a gradient of float32 entries of size 1e-24 as nonzero (``linalg._nonzero_each``:
    max |entry|, no underflow) and gives the block its first call with it; the factor stage must then start
    the block from it (the kron start is linear in G: the factors are 1e-24 times those of the unscaled
    gradient; ``kron_reference`` is checked for the start alone). On the code before, the stage decided "nonzero"
    by the Frobenius norm (``block_norm(G) > 0``), whose squares underflow to 0 below about 1e-23, so the
    block's first call started nothing: it stayed uninitialised with its first call spent, and later started
    inside its bucket from the identity direction (not the spec's start)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 4, generator=gen)
    G1 = torch.randn(8, 4, generator=gen)
    other = torch.randn(8, 4, generator=gen)
    states = []
    for scale in (1.0, 1e-24):
        A = torch.nn.Parameter(W.clone())
        B = torch.nn.Parameter(W.clone())
        opt = kronopt.build([A, B], preset, **options)
        A.grad = G1 * scale
        B.grad = other.clone()
        opt.step()
        assert A.grad.abs().amax() > 0  # a normal float32 number, not even subnormal
        states.append((bool(opt.state[A]["factors.initialised"]), None if factor is None else opt.state[A][factor] / scale))
    (ref_ok, ref), (tiny_ok, tiny) = states
    assert ref_ok
    assert tiny_ok, "a nonzero first gradient (entries 1e-24) left the block uninitialised after its first call"
    if factor is not None:
        torch.testing.assert_close(tiny, ref, rtol=1e-4, atol=0.0)


@needs_grad_dtype
def test_a_gradient_that_rounds_to_zero_in_the_state_dtype_waits():
    """A float64 gradient (``grad_dtype = None``) of entries 1e-50 on a float32 parameter is nonzero as given but
    zero in the float32 the factor stage reads it in: the optimizer must read it as the stage does, so the block
    waits (no call spent) and starts from its first gradient that is nonzero in float32, as a block that only
    ever saw that gradient. On the code before, its first call was spent on the zero (``calls`` 1, the factors
    never started) and the next gradient started it inside the bucket from the identity direction."""
    gen = torch.Generator().manual_seed(0)
    W, other = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    G0 = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 1e-50
    G1, G2 = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    A, B, C = (torch.nn.Parameter(W.clone()) for _ in range(3))
    A.grad_dtype = None
    opt, alone = kronopt.build([A, B], "dykaf"), kronopt.build([C], "dykaf")
    A.grad, B.grad = G0, other.clone()
    opt.step()
    assert opt.state[A]["calls"] == 0 and torch.equal(A.detach(), W)
    for g in (G1, G2):
        A.grad, B.grad, C.grad = g.clone(), other.clone(), g.clone()
        opt.step()
        alone.step()
    assert opt.state[A]["calls"] == alone.state[C]["calls"] == 2
    torch.testing.assert_close(A.detach(), C.detach(), rtol=1e-6, atol=1e-7)
    for key in ("factors.L", "factors.R"):
        torch.testing.assert_close(opt.state[A][key], alone.state[C][key], rtol=1e-5, atol=0.0)
