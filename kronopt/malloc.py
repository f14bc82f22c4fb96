r"""Keep freed memory in the process (glibc), so a CPU step does not fault its temporaries in again.

A preconditioned step on a CPU allocates temporaries the size of a gradient or of a factor
(16 MiB for a ``4096 × 1024`` block in float32) and frees them within the step. glibc's
``malloc`` serves blocks from 128 KiB up with ``mmap`` until a freed one raises that bound
(to at most 32 MiB), and gives the top of its heap back to the OS once more than twice the
bound lies free there. A step that frees several such temporaries in a row crosses that line,
so the next step gets fresh pages from the OS and pays a page fault for each 4 KiB of them
(a few microseconds each on a virtual machine, most of it zeroing the page). At ``d = 1024``
that was 220–254 MiB of faults per step of ``soap`` (``docs/results.md``, "Step time against
width").

:func:`retain_freed_memory` sets glibc's two bounds so that blocks of any size come from the
heap (glibc before 2.35 takes at most 32 MiB, and then blocks above that are still mapped one by
one) and the heap's free top stays in the process: later steps reuse the same pages. It is a
setting of the whole process, like ``torch.set_num_threads``, so kronopt never makes it on
its own: call it once at the start of a CPU training script, or pass
``--retain-freed-memory`` to ``kronopt bench``. The same effect without code:
``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment, or
a caching allocator preloaded (jemalloc, tcmalloc), as PyTorch's CPU launcher
``python -m torch.backends.xeon.run_cpu`` offers. GPU memory is unaffected (PyTorch's CUDA
allocator caches already).

What it costs: memory that the process frees stays counted in its resident size, up to
``trim_threshold`` of it at the top of the heap, instead of going back to the OS.
"""

import ctypes
import functools
import os

__all__ = ["retain_freed_memory"]

#: glibc's ``mallopt`` parameter numbers (``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: the largest value a C ``int`` holds: ``mallopt`` takes its value as one
_INT_MAX = 2**31 - 1

#: the largest ``mmap`` threshold glibc before 2.35 accepts on a 64-bit system (half its heap size)
_OLD_GLIBC_MMAP_MAX = 32 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else ``None`` (musl has a ``mallopt`` that does nothing)."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        return ctypes.CDLL(None)  # the libc already loaded into the process
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name, no handle
        return None


def retain_freed_memory(*, mmap_threshold: int = _INT_MAX, trim_threshold: int = _INT_MAX) -> bool:
    """Keep the C heap's freed blocks in the process instead of returning them to the OS (glibc only).

    Args:
        mmap_threshold: blocks from this size (bytes) up are still mapped and unmapped one by
            one; the default ``2**31 - 1`` means none in practice. glibc before 2.35 takes at
            most 32 MiB: a larger value falls back to that there.
        trim_threshold: free memory (bytes) the top of the heap may hold before glibc gives it
            back; the default ``2**31 - 1`` means never in practice.

    Returns:
        ``True`` when glibc took both settings; ``False`` on another C library (macOS, Windows,
        musl), where nothing is changed, or when glibc refused one.

    Raises:
        ValueError: a bound outside ``[1, 2**31 - 1]``, with every such problem listed.
    """
    problems = []
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_MAX:
            problems.append(f"{name} must be an integer number of bytes in [1, {_INT_MAX}], got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    libc = _glibc()
    if libc is None:
        return False
    # setting either one also turns off glibc's own adjustment of both, so both are set
    took_mmap = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    if not took_mmap and mmap_threshold > _OLD_GLIBC_MMAP_MAX:
        took_mmap = libc.mallopt(_M_MMAP_THRESHOLD, _OLD_GLIBC_MMAP_MAX)
    took_trim = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    return bool(took_mmap) and bool(took_trim)
