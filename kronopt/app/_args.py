"""Command-line values: typed parsers and a collector that lists every problem at once.

Every ``kronopt`` subcommand reads its flags as strings and parses them here, after
argparse, so that one run reports *every* bad flag (argparse stops at the first).
A parser takes the flag's text and returns the value or raises ``ValueError`` with a
message that reads well after the flag (``--steps: must be ≥ 1, got 0``);
:class:`Problems` runs parsers, collects their messages with the flag's name, and
:meth:`Problems.check` raises one :class:`UsageError` naming each. ``kronopt``'s
``main`` prints it and exits with code 2, without a traceback.

Files named on the command line are read through :func:`load_torch_file`, which
never unpickles code (``torch.load(..., weights_only=True)``).
"""

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

import kronopt
from kronopt.config import ConfigError

T = TypeVar("T")

__all__ = [
    "DEVICE_TYPES",
    "MAX_THREADS",
    "Problems",
    "UsageError",
    "choices",
    "device",
    "device_type",
    "input_file",
    "integer",
    "integers",
    "load_torch_file",
    "number",
    "numbers",
    "output_dir",
    "parse_sets",
    "pattern",
    "set_item",
    "shape",
    "shapes",
]


class UsageError(ConfigError):
    """Bad command-line arguments; ``errors`` holds ``(flag or path, message)`` for every problem."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        lines = [f"{where}: {msg}" if where else msg for where, msg in errors]
        plural = "s" * (len(errors) != 1)
        ValueError.__init__(self, f"invalid arguments ({len(errors)} error{plural}):\n  " + "\n  ".join(lines))


# -- parsers: text → value, or ValueError with a message ----------------------------------------


def _bounds(
    value: float, minimum: float | None, maximum: float | None, *, above: float | None = None, below: float | None = None
) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"must be ≥ {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be ≤ {maximum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"must be < {below}, got {value}")


def integer(text: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A decimal integer within ``[minimum, maximum]`` (``"12"``, ``"-3"``, ``"1_000"``)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None
    _bounds(value, minimum, maximum)
    return value


def number(
    text: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """A finite float in ``[minimum, maximum]``, ``> above``, ``< below`` (``"0.95"``, ``"3e-4"``); NaN and ±inf refused."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {text!r}")
    _bounds(value, minimum, maximum, above=above, below=below)
    return value


def _items(text: str) -> list[str]:
    """The entries of a comma-separated list; an empty one (``"3,,4"``, a trailing comma) is refused, where it was
    dropped and a typo ran with one entry fewer than meant. A text of no entries (``""``, ``","``) is an empty list."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        return []
    if not all(parts):
        raise ValueError(f"has an empty entry between its commas: {text!r}")
    return parts


def _each(text: str, parse: Callable[[str], T], *, allow_empty: bool, what: str) -> list[T]:
    parts = _items(text)
    if not parts and not allow_empty:
        raise ValueError(f"must be a comma-separated list of {what} with at least one entry, got {text!r}")
    out, bad = [], []
    for part in parts:
        try:
            out.append(parse(part))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError("; ".join(bad))
    return out


def integers(text: str, *, minimum: int | None = None, allow_empty: bool = False) -> list[int]:
    """A comma-separated list of integers, each ≥ ``minimum`` (``"10,50,100"``)."""
    return _each(text, lambda s: integer(s, minimum=minimum), allow_empty=allow_empty, what="integers")


def numbers(text: str, *, above: float | None = None, allow_empty: bool = False) -> list[float]:
    """A comma-separated list of finite numbers, each ``> above`` (``"0.01,3e-3"``)."""
    return _each(text, lambda s: number(s, above=above), allow_empty=allow_empty, what="numbers")


def shape(text: str) -> tuple[int, ...]:
    """A tensor shape ``"768x768"`` (or ``"768"``, ``"4x8x3"``), every dimension ≥ 1."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a shape like 768x768 or 768") from None
    if any(d < 1 for d in dims):
        raise ValueError(f"{text.strip()!r} has a dimension < 1; every dimension must be ≥ 1")
    return dims


def shapes(text: str) -> list[tuple[int, ...]]:
    """A comma-separated list of shapes (``"768x768,3072x768,768"``), at least one."""
    return _each(text, shape, allow_empty=False, what="shapes like 768x768 or 768")


def choices(text: str, known: Sequence[str], *, allow_empty: bool = False) -> list[str]:
    """A comma-separated list of names, each one of ``known``."""
    names = _items(text)
    if not names and not allow_empty:
        raise ValueError(f"must name at least one of: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}")
    return names


def set_item(text: str) -> tuple[str, Any]:
    """A ``--set KEY=VALUE`` override; the value is parsed as a TOML value when it is one, else kept as a string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def pattern(text: str) -> str:
    """A Python regular expression."""
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


#: the device types kronopt's commands run on: a timer must wait for the device's work (``meta`` does none),
#: and the training task has been run nowhere else (``mps``, ``xpu``)
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda")
#: the most torch threads ``--threads`` sets, in every command (torch takes a C int, and far more threads than
#: cores only times the scheduler; a million of them crash the process)
MAX_THREADS: int = 4 * (os.cpu_count() or 1)


def device_type(text: str) -> torch.device:
    """The device ``text`` names, refused unless of a type in :data:`DEVICE_TYPES` (whether this machine has it
    is :func:`device`'s concern)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"must be a torch device such as 'cpu' or 'cuda:0', got {text!r}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"runs on 'cpu' or a CUDA device ('cuda', 'cuda:0'), got {text!r}")
    return dev


def device(text: str) -> str:
    """A device a command runs on: ``"cpu"`` or a CUDA device this machine has (``"cuda"``, ``"cuda:1"``).
    Other types are refused (:data:`DEVICE_TYPES`), and so is a CUDA device torch does not see."""
    dev = device_type(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{text!r} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        raise ValueError(f"{text!r} asked for, but torch sees {count} CUDA device{'s' * (count != 1)} (cuda:0 to cuda:{count - 1})")
    return text


def input_file(text: str) -> Path:
    """An existing, readable regular file."""
    path = Path(text)
    if not text or not path.exists():
        raise ValueError(f"no such file: {text!r}")
    if path.is_dir():
        raise ValueError(f"{text!r} is a directory, not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror or exc}") from None
    return path


def output_dir(text: str) -> Path:
    """A directory to write into: existing, or creatable under the nearest existing directory."""
    path = Path(text)
    if not text:
        raise ValueError("must be a directory path, got ''")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text!r} exists and is not a directory")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"cannot create {text!r}: {str(parent)!r} is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {str(parent)!r}: permission denied")
    return path


# -- reading files safely -------------------------------------------------------------------------


def load_torch_file(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` a file named by the user, which may never run code (``mmap``: its tensors mapped from the
    file, not read, where only their shapes are wanted; a file of the zip format ``torch.save`` writes).

    Loads with ``weights_only=True``: only tensors, dicts, lists, tuples, strings,
    numbers, booleans and ``None`` are rebuilt — exactly what a
    ``KronOptimizer.state_dict()`` holds (``test_cli_errors.py::test_every_preset_state_loads_weights_only``).
    Any other pickled object (a class, a function, an object with a ``__reduce__``)
    is refused before it is created.

    Raises:
        ValueError: the file cannot be read or holds anything else; the message
            names the file (the caller adds the flag).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure here comes from the file's bytes, not from kronopt
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        blocked = [line for line in lines if "GLOBAL" in line]
        if blocked:
            raise ValueError(
                f"{str(path)!r} holds objects other than tensors and plain data, so it was not loaded "
                f"({blocked[0]}); kronopt reads only files written by torch.save(optimizer.state_dict())"
            ) from None
        detail = lines[0].split(". ")[0][:200] if lines else ""
        raise ValueError(f"{str(path)!r} is not a file written by torch.save ({type(exc).__name__}: {detail})") from None


# -- the collector --------------------------------------------------------------------------------


class Problems:
    """Every problem with one command's arguments, collected before any work starts.

    Each method parses one flag's text and returns its value; when the text is bad it
    records ``(flag, message)`` and returns ``fallback`` so that parsing goes on. Call
    :meth:`check` before using any value: it raises one :class:`UsageError` listing
    every recorded problem.

    Examples:
        >>> p = Problems()
        >>> p.integer("--steps", "0", minimum=1, fallback=1)
        1
        >>> p.value("--shapes", "12xq", shapes, [])
        []
        >>> try:
        ...     p.check()
        ... except UsageError as exc:
        ...     print(exc)
        invalid arguments (2 errors):
          --steps: must be ≥ 1, got 0
          --shapes: '12xq' is not a shape like 768x768 or 768
    """

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self._usage = False  # any problem beyond a config's own

    def add(self, where: str, message: str, *, usage: bool = True) -> None:
        """Record one problem at a flag or config path (``usage=False``: a problem inside a config)."""
        self.errors.append((where, message))
        self._usage = self._usage or usage

    def extend(self, exc: ConfigError, *, prefix: str = "", usage: bool = True) -> None:
        """Record every problem of a :class:`ConfigError`, its paths under ``prefix``."""
        for where, message in exc.errors:
            self.add(": ".join(p for p in (prefix, where) if p), message, usage=usage)

    def value(self, flag: str, text: str, parse: Callable[[str], T], fallback: T) -> T:
        """``parse(text)``, or ``fallback`` with the problem recorded under ``flag``."""
        try:
            return parse(text)
        except ValueError as exc:
            self.add(flag, str(exc))
            return fallback

    def integer(
        self, flag: str, text: str, *, minimum: int | None = None, maximum: int | None = None, fallback: int = 1
    ) -> int:
        return self.value(flag, text, lambda s: integer(s, minimum=minimum, maximum=maximum), fallback)

    def number(
        self,
        flag: str,
        text: str,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
        below: float | None = None,
        fallback: float = 0.0,
    ) -> float:
        return self.value(
            flag, text, lambda s: number(s, minimum=minimum, maximum=maximum, above=above, below=below), fallback
        )

    def sets(self, items: Sequence[str], *, flag: str = "--set") -> dict[str, Any]:
        """The ``--set KEY=VALUE`` overrides as a dict; each malformed item is recorded."""
        out: dict[str, Any] = {}
        for item in items:
            try:
                key, value = set_item(item)
            except ValueError as exc:
                self.add(flag, str(exc))
            else:
                out[key] = value
        return out

    def config(self, spec: Any, overrides: dict[str, Any], *, prefix: str = "") -> Any:
        """``kronopt.resolve(spec, **overrides)``, or ``None`` with each config error recorded under ``prefix``."""
        try:
            return kronopt.resolve(spec, **overrides)
        except ConfigError as exc:
            self.extend(exc, prefix=prefix, usage=False)
            return None

    def check(self) -> None:
        """Raise one error naming every recorded problem; nothing when there is none.

        Raises:
            UsageError: some problem is in the arguments themselves.
            ConfigError: every problem is inside a config (``kronopt show`` of a bad file).
        """
        if self.errors:
            raise UsageError(list(self.errors)) if self._usage else ConfigError(list(self.errors))


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` overrides as a dict; raises :class:`UsageError` naming every malformed item."""
    problems = Problems()
    out = problems.sets(items)
    problems.check()
    return out
