"""``kronopt.malloc.retain_freed_memory``: glibc keeps freed blocks, so reused temporaries fault no pages."""

import subprocess
import sys
import textwrap

import pytest

from kronopt import malloc

# Three 16 MiB tensors made, touched and freed, three times over, in one process: first with
# glibc's static bounds (128 KiB: each block mapped and unmapped on its own, so every round faults
# all its pages in), then retained. glibc's own default adjusts the bounds as blocks come and go,
# which leaves the pages of some rounds and not of others, so the first measurement pins it.
_ROUNDS = textwrap.dedent(
    """
    import resource, torch
    from kronopt import malloc

    def faults(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            ts = [torch.ones(4 * 2**20) for _ in range(3)]
            del ts
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert malloc.retain_freed_memory(mmap_threshold=128 * 1024, trim_threshold=128 * 1024)
    faults(1)
    unmapped = faults(3)
    assert malloc.retain_freed_memory()
    faults(3)  # the heap grows to hold the blocks once
    print(unmapped, faults(3))
    """
)


@pytest.mark.skipif(malloc._glibc() is None, reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _ROUNDS], capture_output=True, text=True, check=True, timeout=120)
    unmapped, retained = map(int, out.stdout.split())
    pages = 3 * 3 * 16 * 2**20 // 4096  # what three rounds touch
    assert unmapped >= pages * 9 // 10, (unmapped, pages)  # the test sees the faults it is about
    assert retained < pages // 50, (unmapped, retained)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.retain_freed_memory() is False


def test_bounds_are_checked_before_anything_is_set(monkeypatch):
    def fail():
        raise AssertionError("nothing may be set when an argument is wrong")

    monkeypatch.setattr(malloc, "_glibc", fail)
    with pytest.raises(ValueError) as err:
        malloc.retain_freed_memory(mmap_threshold=malloc.MAX_MMAP_THRESHOLD + 1, trim_threshold=0)
    assert "mmap_threshold" in str(err.value) and "trim_threshold" in str(err.value)
    with pytest.raises(ValueError, match="mmap_threshold"):
        malloc.retain_freed_memory(mmap_threshold=True)


def test_glibc_is_told_both_bounds(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(malloc, "_glibc", lambda: FakeLibc())
    assert malloc.retain_freed_memory(mmap_threshold=2**20, trim_threshold=2**30) is True
    assert sorted(calls) == [(malloc._M_MMAP_THRESHOLD, 2**20), (malloc._M_TRIM_THRESHOLD, 2**30)]
