r"""Keep freed memory in the process (glibc), so a CPU step does not fault its temporaries in again.

A preconditioned step on a CPU allocates temporaries the size of a gradient or of a factor
(16 MiB for a ``4096 × 1024`` block in float32) and frees them within the step. glibc's
``malloc`` serves blocks from 128 KiB up with ``mmap`` until a freed one raises that bound
(to at most 32 MiB), and gives the top of its heap back to the OS once more than twice the
bound lies free there. A step that frees several such temporaries in a row crosses that line,
so the next step gets fresh pages from the OS and pays a page fault for each 4 KiB of them
(a few microseconds each on a virtual machine, most of it zeroing the page). At ``d = 1024``
that was 135–226 MiB of faults per step of ``soap`` (``docs/results.md``, "Step time against
width").

:func:`retain_freed_memory` sets glibc's two bounds so that blocks up to 32 MiB come from the
heap and the heap's free top stays in the process: later steps reuse the same pages. It is a
setting of the whole process, like ``torch.set_num_threads``, so kronopt never makes it on
its own: call it once at the start of a CPU training script, or pass
``--retain-freed-memory`` to ``kronopt bench``. The same effect without code:
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment, or
a caching allocator preloaded (jemalloc, tcmalloc), as PyTorch's CPU launcher
``python -m torch.backends.xeon.run_cpu`` offers. GPU memory is unaffected (PyTorch's CUDA
allocator caches already).

What it costs: memory that the process frees stays counted in its resident size, up to
``trim_threshold`` of it at the top of the heap, instead of going back to the OS.
"""

import ctypes
import ctypes.util
import platform

__all__ = ["MAX_MMAP_THRESHOLD", "retain_freed_memory"]

#: glibc's ``mallopt`` parameter numbers (``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: the largest ``mmap`` threshold glibc accepts on a 64-bit system (half its 64 MiB heap size)
MAX_MMAP_THRESHOLD = 32 * 2**20

#: the largest value a C ``int`` holds, glibc's bound for the trim threshold
_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def retain_freed_memory(*, mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = _INT_MAX) -> bool:
    """Keep the C heap's freed blocks in the process instead of returning them to the OS (glibc only).

    Args:
        mmap_threshold: blocks from this size (bytes) up are still mapped and unmapped one by
            one; at most :data:`MAX_MMAP_THRESHOLD` (32 MiB), glibc's limit.
        trim_threshold: free memory (bytes) the top of the heap may hold before glibc gives it
            back; at most ``2**31 - 1``, the default (in practice: never).

    Returns:
        ``True`` when glibc took both settings; ``False`` on another C library (macOS, Windows,
        musl), where nothing is changed.

    Raises:
        ValueError: a bound outside ``[1, limit]``, with every such problem listed.
    """
    problems = []
    for name, value, limit in (
        ("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD), ("trim_threshold", trim_threshold, _INT_MAX)
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            problems.append(f"{name} must be an integer number of bytes in [1, {limit}], got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    libc = _glibc()
    if libc is None:
        return False
    # setting either one also turns off glibc's own adjustment of both, so set both
    took_mmap = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    took_trim = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    return bool(took_mmap) and bool(took_trim)
