"""Where a kronopt optimizer's step spends its time, by stage slot (``kronopt bench --stages``).

While a :class:`StageClock` is installed (:meth:`StageClock.installed`), the methods of every stage a
kronopt optimizer holds (the slots' methods, :data:`SLOT_METHODS`; plain functions, static and class methods,
nothing else a class may hold under such a name) and the few functions of kronopt that do a slot's work
outside them (:data:`SLOT_FUNCTIONS`: a factor update left to the state write, the CPU's plain AdamW and
plain Muon, the small buckets' rotated-Adam directions, the batched parameter write) are wrapped; while the clock runs (:meth:`StageClock.running`),
each wrapped call adds its time to its slot, less the time of the wrapped calls it makes itself (an inner
rule's moment read by a split counts as the inner rule's, not twice). What the step spends outside them
is kronopt's own (:data:`OWN`): stacking the gradients and checking them, the state writes, the
bookkeeping and the Python around it all.

Wrapped or not, a stage computes what it would: the wrappers only read the clock (a microsecond or two a
call, counted in kronopt's own share). A ``compile = true`` config's compiled kernels run inside the stages'
methods, so they are timed as eager ones are. On an accelerator the clock waits for the device at each
boundary (``sync``), so the split is that of a step whose stages run one after another, host and device in
step; the bench reports that step's own mean beside the split. Only the bench's process is ever patched, and
only for as long as the ``with`` block lasts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import compose, post

#: the slots, in the order the tables show them, then kronopt's own share
SLOTS: tuple[str, ...] = ("factors", "basis", "inner", "split", "post")
OWN = "kronopt"
#: a split's shares, as the tables show them and a record holds them beside ``step_ms``
SHARES: tuple[str, ...] = (*SLOTS, OWN)

#: the methods timed on each slot's stage (those a stage has; the pipeline's calls, :func:`kronopt.compose.step`,
#: and the CPU's fast paths: the ``ema``, ``projector_splitting`` and ``kl`` estimators' ``update_each``, ``kl``'s
#: ``eigvals_each``, the ``eigenvalue`` rule's ``direction_each``, plain Muon's ``orthogonalize`` and the parameter
#: writes ``apply_`` and ``apply_block_``)
SLOT_METHODS: dict[str, tuple[str, ...]] = {
    "factors": ("update", "update_each", "factors", "on_basis_change", "eigvals", "eigvals_each", "flat_eigvals"),
    "basis": ("refresh",),
    "inner": ("direction", "direction_each", "on_basis_change", "moment", "orthogonalize"),
    "split": ("complement", "complement_each", "on_basis_change"),
    "post": ("graft", "apply_", "apply_block_"),
}

#: kronopt's functions that do a slot's work outside the stages' methods: a factor update left to the state write
#: (:func:`kronopt.compose.run_deferred_`), the CPU's plain AdamW, whose rule and parameter write are one (fused)
#: kernel or one pass per block (counted as the inner rule's), the CPU's plain Muon's momentum, look-ahead and
#: direction around its stage's ``orthogonalize``, the directions of small rotated-Adam buckets made together
#: (:func:`kronopt.compose.rotated_adam_directions`), and the parameter writes of many buckets at once
SLOT_FUNCTIONS: tuple[tuple[Any, str, str], ...] = (
    (compose, "run_deferred_", "factors"),
    (compose, "adam_step", "inner"),
    (compose, "rotated_adam_directions", "inner"),
    (compose, "adam_block", "inner"),
    (compose, "fused_adamw_", "inner"),
    (compose, "muon_look_ahead", "inner"),
    (compose, "muon_block_direction", "inner"),
    (compose, "muon_momentum_", "inner"),
    (post, "apply_together_", "post"),
)

_running: StageClock | None = None  # the clock the wrappers add to, while one runs


class StageClock:
    """The time each slot took over the steps it ran for (:attr:`totals`, seconds by slot), exclusive of the
    wrapped calls inside each call. ``sync``: called before each reading of the clock (an accelerator's
    synchronisation), or ``None``."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = dict.fromkeys(SLOTS, 0.0)
        self._sync = sync
        self._open: list[str] = []
        self._since = 0.0

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def enter(self, slot: str) -> None:
        now = self._now()
        if self._open:
            self.totals[self._open[-1]] += now - self._since
        self._open.append(slot)
        self._since = now

    def leave(self) -> None:
        now = self._now()
        self.totals[self._open.pop()] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def running(self) -> Iterator[StageClock]:
        """Time the wrapped calls made in the block (one clock runs at a time)."""
        global _running
        if _running is not None:
            raise RuntimeError("a stage clock is running already")
        _running = self
        try:
            yield self
        finally:
            _running = None
            self._open.clear()

    @staticmethod
    @contextlib.contextmanager
    def installed(stages: Iterable[tuple[str, Any]]) -> Iterator[None]:
        """Wrap, for the block, the slot methods of ``stages`` (``(slot, stage)`` pairs: each method where the
        stage's class finds it, once however many stages share it; a name that holds anything but a function, a
        static or a class method there, such as an option's slot, is left alone) and :data:`SLOT_FUNCTIONS`;
        everything is put back as it was when the block ends, even by an exception."""
        undo: list[Callable[[], None]] = []
        done: set[tuple[int, str]] = set()
        try:
            for slot, stage in stages:
                for name in SLOT_METHODS[slot]:
                    owner = next((c for c in type(stage).__mro__ if name in vars(c)), None)
                    if owner is None or owner is object or (id(owner), name) in done:
                        continue
                    done.add((id(owner), name))
                    if _function_of(vars(owner)[name]) is not None:
                        undo.append(_wrap(owner, name, slot))
            for module, name, slot in SLOT_FUNCTIONS:
                undo.append(_wrap(module, name, slot))
            yield
        finally:
            for put_back in reversed(undo):
                put_back()


def _function_of(member: Any) -> Callable[..., Any] | None:
    """The plain function behind a class member (itself, or a static or class method's), else ``None``: an
    attrs slot, a property, ``functools.singledispatchmethod`` or ``partialmethod`` is not wrapped (calling
    a wrapper in its place would read an option as a method, or fail)."""
    fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
    return fn if inspect.isfunction(fn) else None


def _wrap(owner: Any, name: str, slot: str) -> Callable[[], None]:
    """Replace ``owner.name`` (a class's method or a module's function) by a wrapper that times it into ``slot``
    while a clock runs; returns what puts it back."""
    original = vars(owner)[name]
    fn = _function_of(original) or original  # a module's function is itself
    rewrap = type(original) if isinstance(original, (staticmethod, classmethod)) else (lambda f: f)

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        clock = _running
        if clock is None:
            return fn(*args, **kwargs)
        clock.enter(slot)
        try:
            return fn(*args, **kwargs)
        finally:
            clock.leave()

    setattr(owner, name, rewrap(timed))
    return lambda: setattr(owner, name, original)


def stages_of(optimizer: Any) -> list[tuple[str, Any]]:
    """Every ``(slot, stage)`` of a :class:`kronopt.KronOptimizer`'s configs: each param group's, fallback routes
    and overrides included (a bucket's own config differs from its group's in the refresh phase alone, its stages
    the same objects)."""
    return [(slot, getattr(cfg, slot)) for cfg in optimizer._group_cfgs for slot in SLOTS]


def split_ms(clock: StageClock, step_seconds: float, steps: int) -> dict[str, float]:
    """The mean ms per step of each slot and of kronopt's own share (:data:`OWN`: the step less its slots), and
    ``step_ms``, the clocked steps' own mean, from ``clock`` over ``steps`` steps that took ``step_seconds``."""
    out = {slot: clock.totals[slot] / steps * 1e3 for slot in SLOTS}  # then OWN: the step less its slots
    step_ms = step_seconds / steps * 1e3
    out[OWN] = max(step_ms - sum(out.values()), 0.0)
    out["step_ms"] = step_ms
    return out
