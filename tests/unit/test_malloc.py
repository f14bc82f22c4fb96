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
    pages = 3 * 3 * 16 * 2**20 // 4096  # what three rounds touch, in 4 KiB pages
    if unmapped < pages // 4:  # a kernel that maps transparent huge pages always: a fault per 2 MiB
        pytest.skip(f"{unmapped} faults for {pages} small pages: pages come in larger here")
    assert retained < unmapped // 50, (unmapped, retained)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.retain_freed_memory() is False


def test_bounds_are_checked_before_anything_is_set(monkeypatch):
    def fail():
        raise AssertionError("nothing may be set when an argument is wrong")

    monkeypatch.setattr(malloc, "_glibc", fail)
    with pytest.raises(ValueError) as err:
        malloc.retain_freed_memory(mmap_threshold=2**31, trim_threshold=0)
    assert "mmap_threshold" in str(err.value) and "trim_threshold" in str(err.value)
    with pytest.raises(ValueError, match="mmap_threshold"):
        malloc.retain_freed_memory(mmap_threshold=True)


class FakeLibc:
    """``mallopt`` that records its calls and refuses an mmap bound above ``mmap_max``."""

    def __init__(self, mmap_max=2**31 - 1, trim_ok=True):
        self.calls, self.mmap_max, self.trim_ok = [], mmap_max, trim_ok

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return int(value <= self.mmap_max if param == malloc._M_MMAP_THRESHOLD else self.trim_ok)


def test_glibc_is_told_both_bounds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(malloc, "_glibc", lambda: libc)
    assert malloc.retain_freed_memory(mmap_threshold=2**20, trim_threshold=2**30) is True
    assert sorted(libc.calls) == [(malloc._M_MMAP_THRESHOLD, 2**20), (malloc._M_TRIM_THRESHOLD, 2**30)]


def test_an_old_glibc_gets_its_largest_mmap_bound(monkeypatch):
    """glibc before 2.35 refuses an mmap bound above 32 MiB: the call falls back to 32 MiB."""
    libc = FakeLibc(mmap_max=32 * 2**20)
    monkeypatch.setattr(malloc, "_glibc", lambda: libc)
    assert malloc.retain_freed_memory() is True
    mmap = [v for p, v in libc.calls if p == malloc._M_MMAP_THRESHOLD]
    assert mmap == [2**31 - 1, 32 * 2**20]


def test_a_refused_setting_is_reported(monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: FakeLibc(trim_ok=False))
    assert malloc.retain_freed_memory() is False
    monkeypatch.setattr(malloc, "_glibc", lambda: FakeLibc(mmap_max=2**10))
    assert malloc.retain_freed_memory(mmap_threshold=2**20) is False  # below 32 MiB: no fallback
