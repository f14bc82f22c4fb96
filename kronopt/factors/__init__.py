r"""Factor estimators: the ``factors`` slot, one module per estimator.

A factor estimator keeps Kronecker factors :math:`L` ``(b m m)`` and :math:`R`
``(b n n)`` with :math:`\mathbb{E}[\mathrm{vec}\,G\,\mathrm{vec}\,G^\top] \approx L \otimes R`
(``None`` on a side that is not rotated) and updates them from each gradient.
"""

from .ema import EmaKronFactors, KronFactorsState, NoFactors
from .projector_splitting import ProjectorSplittingFactors, ProjectorSplittingState
from .kl import KlFactorsState, KlKronFactors

__all__ = ["EmaKronFactors", "KlFactorsState", "KlKronFactors", "KronFactorsState", "NoFactors", "ProjectorSplittingFactors", "ProjectorSplittingState"]
