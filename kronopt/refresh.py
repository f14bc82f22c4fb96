"""Refresh schedules: the ``refresh`` slot (when the basis is recomputed).

A schedule may also offer *staggering* (:class:`Staggered`): the optimizer then
gives each block a phase ``p`` in ``0 … phases() - 1`` and runs the block's bucket
with :meth:`Staggered.at_phase` ``(p)``, a schedule shifted by ``p`` updates, so the
blocks' refreshes are spread over the period instead of all falling on one step
(docs/architecture.md, "Staggered refresh").
"""

from typing import Protocol, Self, runtime_checkable

import attrs

from .validators import ge, to_bool, to_int
from .registry import REFRESH


@runtime_checkable
class Staggered(Protocol):
    """A refresh schedule whose blocks can be spread over phases (the optimizer's side of staggering).

    ``phases()`` is the number of distinct phases to spread blocks over (1: no
    staggering); ``at_phase(p)`` is the schedule a block of phase ``p`` runs, a value
    like any stage. Phase 0 must be the schedule itself.
    """

    def phases(self) -> int: ...

    def at_phase(self, phase: int) -> Self: ...


@REFRESH.register("every", description="refresh every k parameter updates (and optionally on the first call)")
@attrs.frozen(kw_only=True)
class EveryRefresh:
    r"""Refresh when the update count ``t`` is ``offset`` modulo ``every``.

    .. math::
        \text{due}(t) = \big[\text{first call} \wedge \text{at\_first\_call}\big]
        \;\vee\; \big[t \ge 1 \wedge t \equiv \text{offset} \pmod{k}\big]

    With ``stagger = true`` the optimizer spreads the blocks over the ``k`` phases
    (balanced by cost: blocks taken largest first, each to the phase with the least
    cost so far; param groups in order, those of an equal schedule together; the
    phases depend on the groups' shapes, order and schedules only, so a loaded
    state dict rebuilds the same buckets) and runs a
    block of phase ``p`` with ``offset`` shifted by ``p``: it refreshes at the
    updates ``t ≡ offset + p (mod k)``, ``t ≥ 1``, plus the first call as before.
    Every block still refreshes every ``k`` updates, but on any one step only
    about ``1/k`` of the cost is paid. Blocks of different phases go into
    different buckets (each still batched). With phase 0 only (one block, or
    ``every = 1``) the schedule is exactly the unstaggered one.

    Attributes:
        every: period k ≥ 1 (SOAP's ``precondition_frequency``).
        at_first_call: also refresh on a parameter's first call (SOAP builds its
            first basis there).
        offset: the residue ``0 ≤ offset < every`` of the refresh updates (0: the
            multiples of ``every``).
        stagger: spread the blocks' refreshes over the period (per-block phases,
            see above); ``false`` refreshes every block on the same updates.
    """

    every: int = attrs.field(default=10, converter=to_int, validator=ge(1))
    at_first_call: bool = attrs.field(default=False, converter=to_bool)
    offset: int = attrs.field(default=0, converter=to_int, validator=ge(0))
    stagger: bool = attrs.field(default=False, converter=to_bool)

    def __attrs_post_init__(self) -> None:
        if self.offset >= self.every:
            raise ValueError(f"offset must be < every, got offset = {self.offset}, every = {self.every}")

    def due(self, step: int, *, first_call: bool) -> bool:
        if first_call and self.at_first_call:
            return True
        return step > 0 and step % self.every == self.offset

    def phases(self) -> int:
        """``every`` phases with ``stagger``, else 1."""
        return self.every if self.stagger else 1

    def at_phase(self, phase: int) -> "EveryRefresh":
        """The schedule of a block of phase ``phase``: ``offset`` shifted by it (modulo ``every``)."""
        if not 0 <= phase < self.every:
            raise ValueError(f"phase must be in [0, {self.every}), got {phase}")
        return attrs.evolve(self, offset=(self.offset + phase) % self.every)
