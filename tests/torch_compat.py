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
