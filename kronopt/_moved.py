"""Deprecated module paths: the application moved to :mod:`kronopt.app`.

``kronopt.train``, ``kronopt.ablate``, ``kronopt.spectrum``, ``kronopt.fisher``,
``kronopt.docs``, ``kronopt.task`` and ``kronopt.cli`` are small shims. Importing one
warns (:class:`DeprecationWarning`, pointing at the importing line) and hands back the
module of :mod:`kronopt.app` itself, so ``from kronopt.train import train`` and
``monkeypatch.setattr(kronopt.train, ...)`` still reach the code that runs.
``import kronopt`` imports none of them.
"""

import sys
import warnings
from types import FrameType, ModuleType


def _importer_level(old: str) -> int:
    """``warnings.warn``'s ``stacklevel``, called from :func:`warn`, of the line that imported shim ``old``.

    ``warnings`` skips the import machinery's frames when it counts, and so does
    this. 2 (the caller of :func:`warn`) when the shim is not on the stack.
    """
    frame, level = sys._getframe(2), 2  # 0: here, 1: warn, 2: warn's caller
    while frame is not None and frame.f_globals.get("__name__") != old:
        frame = frame.f_back
        level += frame is not None and not _internal(frame)
    return level + 1 if frame is not None else 2


def _internal(frame: FrameType) -> bool:
    """A frame of the import machinery, which ``warnings`` does not count."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def warn(old: str, new: str) -> None:
    """Warn (:class:`DeprecationWarning`, at the importing line) that module ``old`` moved to ``new``."""
    warnings.warn(
        f"{old} has moved to {new}; import it from there ({old} will be removed)",
        DeprecationWarning,
        stacklevel=_importer_level(old),
    )


def alias(old: str, new: ModuleType, *, as_main: bool = False) -> None:
    """Make module ``old`` another name of ``new`` (with a warning); run ``new.main()`` when run as a script."""
    if as_main:  # python -m <old>
        print(f"{old} has moved to {new.__name__}: python -m {new.__name__}", file=sys.stderr)
        raise SystemExit(new.main())
    warn(old, new.__name__)
    sys.modules[old] = new
