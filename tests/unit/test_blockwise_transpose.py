"""``linalg.contiguous``: a stack of transposed blocks copied block by block (issue 14, forty-fourth session).

torch's CPU copy runs a cache-blocked transpose only for a 2-D matrix, so the transposed operands the steps lay
row-major (a right Gram's ``Gᵀ``, DyKAF's ``Gᵀ``) are copied matrix by matrix. Each test asks what a wrong copy
would change: a value, the layout, the memory it shares, or the path it takes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kronopt import linalg


class _Copies(TorchDispatchMode):
    """The ``copy_`` calls made under it, by the number of dimensions of their source."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.sources.append(args[1].ndim)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 256, 1024), (1, 2048, 512), (3, 300, 257)])  # G's shape; its .mT is copied
def test_a_stack_of_transposed_blocks_is_copied_exactly_into_rows_block_by_block(shape, dtype):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    T = G.mT
    before = G.clone()
    with _Copies() as seen:
        out = linalg.contiguous(T)
    expected = torch.stack([G[k].T.clone(memory_format=torch.contiguous_format) for k in range(shape[0])])
    assert out.shape == T.shape and out.dtype == dtype
    assert out.is_contiguous()
    assert torch.equal(out, expected)  # each entry moved as it is: a copy, no arithmetic
    assert out.untyped_storage().data_ptr() != G.untyped_storage().data_ptr()
    assert torch.equal(G, before)  # the source is only read
    assert seen.sources == [2] * shape[0]  # one matrix copy a block (torch's blocked 2-D transpose), not one of the stack


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(4, 64, 64).mT, id="small-blocks"),  # below the size: one batched copy
        pytest.param(lambda: torch.randn(2, 512, 1024)[:, :, :700].mT, id="rows-with-gaps"),  # not a transposed row-major stack
        pytest.param(lambda: torch.randn(512, 300).mT, id="a-matrix"),  # 2-D: torch's own copy is the blocked one
        pytest.param(lambda: torch.randn(2, 8, 512, 256).mT, id="four-dims"),
    ],
)
def test_what_the_blockwise_path_does_not_take_is_copied_as_tensor_contiguous_does(make):
    T = make()
    with _Copies() as seen:
        out = linalg.contiguous(T)
    assert out.is_contiguous() and torch.equal(out, T.contiguous())
    assert len(seen.sources) <= 1  # one copy of the whole tensor, not a loop


def test_a_contiguous_stack_is_returned_itself():
    T = torch.randn(2, 512, 256)
    assert linalg.contiguous(T) is T


def test_a_tracked_stack_keeps_its_gradient():
    G = torch.randn(2, 256, 512, requires_grad=True)
    out = linalg.contiguous(G.mT)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    assert torch.equal(G.grad, weight.mT)  # d/dG of Σ w ⊙ Gᵀ is wᵀ: the copy is seen by autograd


def test_under_no_grad_a_tracked_stack_takes_the_blockwise_path():
    G = torch.randn(2, 256, 512, requires_grad=True)
    with torch.no_grad(), _Copies() as seen:
        out = linalg.contiguous(G.mT)
    assert seen.sources == [2, 2] and torch.equal(out, G.detach().mT.contiguous())


@pytest.mark.parametrize("oned", [True, False])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_one_block_through_onednn_comes_row_major_and_right(monkeypatch, oned, layout):
    """The one-block stack's product (its turned form transposes oneDNN's result as a matrix now) against float64."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", oned)
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(1, 512, 384, generator=gen)
    B = torch.randn(1, 384, 256, generator=gen)
    if layout == "columns":  # A column-major: the turned form (xᵀ read as a weight), its result transposed back
        A = A.mT.contiguous().mT
    C = linalg.mm(A, B)
    assert C.shape == (1, 512, 256) and C.is_contiguous()
    torch.testing.assert_close(C.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-4)


def test_dykaf_wide_block_step_is_the_same_with_its_transposed_operand_copied_either_way(monkeypatch):
    """DyKAF's wide-block step lays ``Gᵀ`` with :func:`linalg.contiguous`: the same bits as ``Tensor.contiguous``."""
    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", True)  # the route that lays Gᵀ, whatever the processor
    laid = []
    blockwise = linalg.contiguous
    monkeypatch.setattr(linalg, "contiguous", lambda T: laid.append(T.shape) or blockwise(T))
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(2, 256, 1024, generator=gen)
    L = torch.randn(2, 256, 256, generator=gen)
    L = L @ L.mT / 256
    R = torch.randn(2, 1024, 1024, generator=gen)
    R = R @ R.mT / 1024
    new = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9)
    if torch.backends.mkldnn.is_available():
        assert (2, 1024, 256) in laid  # Gᵀ went through it
    monkeypatch.setattr(linalg, "contiguous", lambda T: T.contiguous())
    old = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
