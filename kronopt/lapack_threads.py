r"""A CPU stack's LAPACK calls spread over threads, one matrix at a time per thread.

torch runs a batched LAPACK routine (``geqrf``, ``householder_product``) as a loop over the
stack, each matrix handed to MKL with all of torch's threads. MKL's QR routines use those
threads poorly: on two cores a ``1024²`` QR runs about 1.3 × faster than on one, a ``256²``
one not at all. So where a stack holds several matrices, :func:`spread` splits it into as many
contiguous chunks as torch has threads and runs each chunk on a thread of its own, with MKL
held to one thread in it (``mkl_set_num_threads_local``): the threads then work side by side,
each on its own matrices. A whole refresh of one side (``linalg.sorted_power_step``, its
``n³`` power product included) took, with the padded ``householder_product`` of
``linalg._form_q``, 0.77–0.80 of the time before on stacks of 4 × 1024², 4 × 768² and
8 × 512², about 0.85 on 20 × 256² and 0.95 on 32 × 128² (two cores of an AMD EPYC, old and new
in separate processes, medians of 5 calls in each of 3 runs).

The result does not depend on the scheduling: each matrix is computed by single-threaded MKL
whatever the chunks. It differs from the unspread call only in rounding (MKL's blocking by
thread count), as results already do between thread counts.

Only where torch's LAPACK is MKL and its per-thread setter can be found (the x86-64 wheels);
elsewhere, with one thread, a single matrix, or a stack autograd tracks, the caller's plain
call runs.
"""

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["spread", "workers"]

#: spread only where a matrix of the stack has at least this side: below it the threads'
#: handover (tens of microseconds) is not small against one matrix's work
MIN_SIDE = 128

_lock = threading.Lock()
_pool: tuple[ThreadPoolExecutor, int] | None = None  # the executor and its number of threads


def _forget_pool() -> None:
    """In a forked child: the parent's worker threads are not there, so the next spread makes its own."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _library_path(name: str) -> str:
    """The path of a shared library shipped in torch's ``lib`` folder."""
    return os.path.join(os.path.dirname(torch.__file__), "lib", name)


def _library(name: str) -> ctypes.CDLL | None:
    """A shared library shipped with torch (already loaded by torch: the same handle), else ``None``."""
    try:
        return ctypes.CDLL(_library_path(name))
    except OSError:
        return None


@functools.cache
def _thread_setters() -> tuple[Callable[[int], int], Callable[[int], None]] | None:
    """MKL's ``mkl_set_num_threads_local`` (its C form, by value) and OpenMP's ``omp_set_num_threads``,
    from the libraries torch runs, where torch's LAPACK is MKL; else ``None``. Both set the calling
    thread's own count."""
    if not torch.backends.mkl.is_available():
        return None
    torch_cpu, gomp = _library("libtorch_cpu.so"), _library("libgomp.so.1")
    try:
        mkl = torch_cpu.MKL_Set_Num_Threads_Local  # type: ignore[union-attr]  # the lower-case names take a pointer
        omp = gomp.omp_set_num_threads  # type: ignore[union-attr]
    except AttributeError:  # a library missing (None) or without the name
        return None
    mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
    omp.argtypes, omp.restype = [ctypes.c_int], None
    return mkl, omp


def _single_threaded() -> None:
    """A worker's start: torch's own setup of the thread first (on its first op torch sets the thread's
    OpenMP and MKL counts to its own), then one thread for MKL and for OpenMP in it, for good."""
    torch.get_num_threads()
    mkl, omp = _thread_setters()  # type: ignore[misc]  # workers() found them
    mkl(1)
    omp(1)


def workers(X: torch.Tensor) -> int:
    """The threads :func:`spread` would use on the stack ``X (b n k)``: 0 where it would not spread."""
    if X.device.type != "cpu" or X.dim() != 3 or min(X.shape[-2:]) < MIN_SIDE:
        return 0
    w = min(torch.get_num_threads(), X.shape[0])
    if w < 2 or _thread_setters() is None:
        return 0
    return w


def _executor(w: int) -> ThreadPoolExecutor:
    """The shared executor, with at least ``w`` threads (made anew if torch's thread count grew)."""
    global _pool
    with _lock:
        if _pool is None or _pool[1] < w:
            if _pool is not None:
                _pool[0].shutdown(wait=False)
            _pool = (ThreadPoolExecutor(w, thread_name_prefix="kronopt-lapack", initializer=_single_threaded), w)
        return _pool[0]


def spread(fn: Callable[[slice], None], b: int, w: int) -> None:
    """Run ``fn(chunk)`` on ``w`` single-threaded workers over ``w`` contiguous chunks of ``range(b)``.

    ``fn`` writes its results itself (into slices of tensors it shares with the caller); an
    exception in a chunk is raised here, after every chunk has finished."""
    edges = [b * i // w for i in range(w + 1)]
    chunks = [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    futures = [_executor(w).submit(fn, chunk) for chunk in chunks]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
