"""A CPU stack's QR spread over single-threaded workers (kronopt/lapack_threads.py)."""

import ctypes

import pytest
import torch

from kronopt import lapack_threads, linalg


@pytest.fixture
def two_threads():
    """torch at two threads (the spread needs two), and a pool made afresh for the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    lapack_threads._forget_pool()
    yield
    torch.set_num_threads(before)


def _stack(b: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(b, n, n, generator=torch.Generator().manual_seed(seed)).mT.contiguous().mT


def _spreads(P: torch.Tensor) -> None:
    if not lapack_threads.workers(P):
        pytest.skip("torch's LAPACK here is not MKL with its per-thread setter")


@pytest.mark.parametrize("b", [2, 5])
def test_a_spread_qr_is_torchs_q_up_to_rounding_and_the_same_bits_every_call(two_threads, b):
    """Odd and even stacks; the first call on fresh workers gives the bits of every later one (torch's
    set-up of a new thread would otherwise give that call's MKL two threads), with and without ``overwrite``."""
    P = _stack(b, 256, 1)
    _spreads(P)
    expected = torch.linalg.qr(P)[0]
    first = linalg.q_factor(P)
    assert torch.allclose(first, expected, atol=1e-5, rtol=0)
    assert torch.allclose(first.mT @ first, torch.eye(256).expand(b, 256, 256), atol=1e-5, rtol=0)
    for overwrite in (False, True, False):
        given = P.clone().mT.contiguous().mT
        assert torch.equal(linalg.q_factor(given, overwrite=overwrite), first)
        assert torch.equal(given, first) == overwrite


def test_each_matrix_is_computed_alone_whatever_the_chunks(two_threads):
    """A matrix's Q is the same whether its stack has 2 or 5 matrices (other chunks, other neighbours)."""
    P = _stack(5, 128, 2)
    _spreads(P)
    whole = linalg.q_factor(P)
    for lo in (0, 3):
        assert torch.equal(linalg.q_factor(P[lo : lo + 2]), whole[lo : lo + 2])


def test_the_workers_run_one_thread_of_openmp_and_of_mkl(two_threads):
    P = _stack(2, 128, 3)
    _spreads(P)
    mkl = ctypes.CDLL(lapack_threads._library_path("libtorch_cpu.so")).MKL_Get_Max_Threads
    seen = {}

    def look(chunk: slice) -> None:
        seen[chunk.start] = (torch.get_num_threads(), mkl())

    lapack_threads.spread(look, 2, 2)
    assert seen == {0: (1, 1), 1: (1, 1)}
    assert torch.get_num_threads() == 2  # the caller's own thread keeps its count


def test_an_error_in_a_chunk_is_raised_after_every_chunk_ran(two_threads):
    _spreads(_stack(2, 128, 4))
    ran = []

    def fail_first(chunk: slice) -> None:
        ran.append(chunk.start)
        if chunk.start == 0:
            raise ArithmeticError("chunk 0")

    with pytest.raises(ArithmeticError, match="chunk 0"):
        lapack_threads.spread(fail_first, 4, 2)
    assert sorted(ran) == [0, 2]


def test_what_is_not_spread(two_threads):
    """One matrix, small sides, one thread, and a stack autograd tracks take the plain call (the same bits as torch's)."""
    _spreads(_stack(2, 128, 5))
    assert lapack_threads.workers(_stack(1, 256, 5)) == 0
    assert lapack_threads.workers(_stack(4, lapack_threads.MIN_SIDE - 1, 5)) == 0
    tracked = _stack(3, 128, 6).requires_grad_()
    assert torch.equal(linalg.q_factor(tracked).detach(), torch.linalg.qr(tracked.detach())[0])
    torch.set_num_threads(1)
    assert lapack_threads.workers(_stack(4, 256, 5)) == 0
