"""Optional dependencies of the command line (plots, progress bars), imported on demand.

The library core needs neither; ``pip install 'kronopt[cli]'`` brings both. A
command that needs a missing one fails with :class:`MissingExtraError`, whose
message says what to install.
"""

from typing import Any


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the install command."""


def pyplot(purpose: str = "plots") -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} need matplotlib, which is not installed: pip install 'kronopt[cli]' (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def progress(iterable: Any = None, *, total: int | None = None, desc: str = "", disable: bool = False) -> Any:
    """A tqdm progress bar, or a silent pass-through when tqdm is missing or ``disable``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(iterable, total)
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False)


class _Silent:
    """The part of tqdm's interface kronopt uses, doing nothing."""

    def __init__(self, iterable: Any, total: int | None) -> None:
        self.iterable, self.total = iterable, total

    def __iter__(self) -> Any:
        return iter(self.iterable if self.iterable is not None else range(self.total or 0))

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
