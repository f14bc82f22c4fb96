"""Old home of :mod:`kronopt.validators` (kept so that existing imports keep working)."""

from .validators import *  # noqa: F403
from .validators import __all__  # noqa: F401
