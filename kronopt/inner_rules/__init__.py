r"""Inner rules: the ``inner`` slot.

An inner rule turns the gradient ``G (b m n)`` into a direction ``D (b m n)`` in
the original coordinates; the step is ``W ← W − lr·D`` (see :mod:`kronopt.post`
for weight decay). It sees the current basis in ``ctx.basis`` and decides what
it keeps in that basis; a rule that keeps rotated state follows each refresh in
:meth:`on_basis_change`.
"""

from ._common import MomentumState
from .adam import AdamInner, AdamState
from .adam_rank1 import AdamRank1Inner, AdamRank1State
from .eigenvalue import EigenvalueInner
from .orthogonalize import OrthogonalizeInner
from .sgd import SgdInner

__all__ = ["AdamInner", "AdamRank1Inner", "AdamRank1State", "AdamState", "EigenvalueInner", "MomentumState", "OrthogonalizeInner", "SgdInner"]
