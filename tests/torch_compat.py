"""What the tests need of torch that not every supported release has (pyproject allows torch >= 2.9),
probed on the installed torch rather than read off its version number."""

import pytest
import torch

#: ``Tensor.grad_dtype`` (torch 2.11 has it, 2.9 not): ``p.grad_dtype = None`` lets a gradient of another
#: dtype than its parameter be assigned. Releases without it refuse the assignment, so no such gradient
#: can reach an optimizer there and the tests of how kronopt steps one have nothing to test.
needs_grad_dtype = pytest.mark.skipif(
    not hasattr(torch.Tensor, "grad_dtype"),
    reason="this torch refuses a gradient of another dtype than its parameter (no Tensor.grad_dtype)",
)


def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


#: torch.distributed with the gloo backend (a build without it runs no CPU process group)
needs_gloo = pytest.mark.skipif(not _gloo(), reason="needs torch.distributed with gloo")


def no_compiler() -> Exception:
    """What inductor raises where the C++ compiler it is configured with is missing (its exception takes the
    compiler's name in torch 2.13, nothing in 2.9)."""
    import torch._inductor.exc as inductor

    try:
        missing = inductor.InvalidCxxCompiler("/nonexistent/g++")
    except TypeError:
        missing = inductor.InvalidCxxCompiler()
    return inductor.InductorError(missing, None)


def _dcp_saves_without_collectives() -> bool:
    try:
        import inspect

        import torch.distributed.checkpoint as dcp
    except ImportError:
        return False
    return "use_collectives" in inspect.signature(dcp.save).parameters


#: ``torch.distributed.checkpoint.save(..., use_collectives=False)`` (a metadata file a rank, ``__<rank>.metadata``):
#: probed on the installed torch's ``save``
needs_dcp_without_collectives = pytest.mark.skipif(
    not _dcp_saves_without_collectives(), reason="this torch's dcp.save has no use_collectives (no rank-local metadata)"
)


def _mkl_gives_stack_bits() -> bool:
    from kronopt import linalg

    return linalg._processor().vendor == "AuthenticAMD"


#: Whether torch's batched CPU products give a block in a stack the bits it gets alone, in the layouts kronopt hands
#: them (``linalg.mm``'s row layout for stacks of vectors, the KSL step's stacks): measured so on AMD processors
#: (MKL's generic kernels, oneDNN's block by block), where the tests below pin it bit for bit. On an Intel Xeon with
#: AMX (the fiftieth session) MKL's own kernels round some of these stacks by their size (matrix-vector stacks of
#: 100 × 300, a rank-one side's power product, DyKAF's step on 128 × 640 blocks), within a few units of rounding:
#: there the tests hold them to DESIGN.md's invariant 4 as written, the block alone up to float rounding.
STACK_BITS_EXACT = _mkl_gives_stack_bits()


def assert_block_as_alone(got: torch.Tensor, alone: torch.Tensor, what: object = "") -> None:
    """A block's result in a stack against the same block stepped alone: the same bits where ``STACK_BITS_EXACT``,
    else within 100 units of rounding of the dtype, relative to the largest entry."""
    if STACK_BITS_EXACT:
        assert torch.equal(got, alone), what
        return
    scale = alone.abs().max().clamp_min(torch.finfo(alone.dtype).tiny)
    err = ((got - alone).abs().max() / scale).item()
    assert err <= 100 * torch.finfo(alone.dtype).eps, (what, err)
