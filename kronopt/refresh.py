"""Refresh schedules: the ``refresh`` slot (when the basis is recomputed)."""

import attrs

from .validators import ge, to_bool, to_int
from .registry import REFRESH


@REFRESH.register("every", description="refresh every k parameter updates (and optionally on the first call)")
@attrs.frozen(kw_only=True)
class EveryRefresh:
    """Refresh when the update count ``t`` is a multiple of ``every``.

    Attributes:
        every: period k ≥ 1 (SOAP's ``precondition_frequency``).
        at_first_call: also refresh on a parameter's first call (SOAP builds its
            first basis there).
    """

    every: int = attrs.field(default=10, converter=to_int, validator=ge(1))
    at_first_call: bool = attrs.field(default=False, converter=to_bool)

    def due(self, step: int, *, first_call: bool) -> bool:
        if first_call and self.at_first_call:
            return True
        return step > 0 and step % self.every == 0
