"""attrs validators and converters whose messages read well under a config path (public: use them in plugin stages).

A failing validator raises ``ValueError("must be ≥ 1, got 0")``; the config
builder prefixes the path (``refresh.every: must be ≥ 1, got 0``).
"""

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any


def _check(pred: Callable[[Any], bool], text: str) -> Callable[[Any, Any, Any], None]:
    def validate(_inst: Any, _attr: Any, value: Any) -> None:
        if not pred(value):
            raise ValueError(f"must be {text}, got {value!r}")

    return validate


def ge(bound: float) -> Callable[[Any, Any, Any], None]:
    return _check(lambda v: v >= bound, f"≥ {bound}")


def gt(bound: float) -> Callable[[Any, Any, Any], None]:
    return _check(lambda v: v > bound, f"> {bound}")


def lt(bound: float) -> Callable[[Any, Any, Any], None]:
    return _check(lambda v: v < bound, f"< {bound}")


def le(bound: float) -> Callable[[Any, Any, Any], None]:
    return _check(lambda v: v <= bound, f"≤ {bound}")


def in_(choices: Iterable[Any]) -> Callable[[Any, Any, Any], None]:
    options = tuple(choices)
    return _check(lambda v: v in options, "one of " + ", ".join(repr(c) for c in options))


class _Listed(Exception):
    """An error of several problems, each a message of its own, which ``str()`` joins with ``"; "``."""

    def __init__(self, problems: Iterable[str]):
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("; ".join(self.problems))


class Problems(_Listed, ValueError):
    """Several problems of one value (a list's bad entries) or of one stage's options, each a message of its own.

    ``str()`` joins them with ``"; "``, so a plain ``ValueError`` handler reads them as one; the config reads
    :attr:`problems` to judge each apart (a stage's check across its options that names an option refused for
    its own value is dropped, its other problems listed). A stage's ``__attrs_post_init__`` that finds several
    problems raises them as one ``Problems``.
    """


class _TypeProblems(_Listed, TypeError):
    """:class:`Problems` where each is a wrong type (a list's entries that are not of the type asked)."""


def problems_of(exc: BaseException) -> tuple[str, ...]:
    """The separate problems an error reports: a :class:`Problems`' list, or its message alone."""
    return getattr(exc, "problems", None) or (str(exc),)


def _indexed(i: int, problem: str) -> str:
    """An entry's problem named by its index: ``[1] must be …``, or ``[1][0] must be …`` inside a nested list."""
    return f"[{i}]{problem}" if problem.startswith("[") else f"[{i}] {problem}"


def _entries(value: Any, convert: Callable[[Any], Any], *, first: int = 0) -> tuple[Any, ...]:
    """``convert`` applied to every entry of a list (whose first entry is the ``first`` of the list the user
    wrote); every bad entry named by its index, in one error (a ``TypeError`` where every problem is one)."""
    out, problems, all_types = [], [], True
    for i, item in enumerate(value, first):
        try:
            out.append(convert(item))
        except (TypeError, ValueError) as exc:
            all_types = all_types and isinstance(exc, TypeError)
            problems += [_indexed(i, p) for p in problems_of(exc)]
    if problems:
        raise _TypeProblems(problems) if all_types else Problems(problems)
    return tuple(out)


def each(*validators: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """Apply ``validators`` to every item of a sequence; every bad item is named by its index, in one error
    (``[0] must be < 1.0, got 1.5; [1] must be ≥ 0.0, got -0.1``)."""

    def validate(inst: Any, attr: Any, value: Any) -> None:
        # an item's first problem: the next validators assume it passed
        _entries(value, lambda item: [v(inst, attr, item) for v in validators])

    return validate


def one_cpu_number(value: Any) -> bool:
    """A one-entry real tensor on the CPU (read without a synchronisation): how a param group may hold a rate."""
    import torch

    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu" and not value.is_complex()


def real_number(value: Any) -> bool:
    """A real number of any type (``int``, ``float``, NumPy's scalars, ``Fraction``), not a ``bool``: what a number
    setting takes (:func:`to_float`), and a param group's ``lr`` or ``weight_decay`` besides a one-entry tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def to_float(value: Any) -> float:
    """A finite number as a float (an infinite or NaN setting would reach every parameter: ``lr = inf`` in TOML)."""
    if one_cpu_number(value):  # a param group's lr or weight_decay given as a tensor, as torch.optim allows
        value = value.item()
    if not real_number(value):
        raise TypeError(f"must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:  # an integer past the float range (TOML reads `lr = 999...9` as an int)
        raise ValueError(f"must be a finite number, got an integer of {value.bit_length()} bits, past the float range") from None
    if not math.isfinite(out):
        raise ValueError(f"must be a finite number, got {value!r}")
    return out


#: the value of a factor estimator's ``beta`` that ties it to the inner rule's β₂
#: (SOAP's and DyKAF's ``shampoo_beta = -1``); :meth:`kronopt.config.KronConfig.bound` resolves it
BETA_TIE = "beta2"


def to_beta(value: Any) -> float | str:
    """A retention in ``[0, 1)`` (a number) or :data:`BETA_TIE`."""
    if value == BETA_TIE:
        return BETA_TIE
    if isinstance(value, str):
        raise ValueError(f"must be a number or {BETA_TIE!r} (tie to the inner rule's β₂), got {value!r}")
    return to_float(value)


#: the value of the grafting direction's β₁ (``post.graft_betas[0]``) that ties it to the inner rule's first-moment
#: retention (``inner.momentum``, or ``inner.betas[0]``): the graft's first moment is then the inner rule's own EMA
#: (soap.md §9, Shampoo); :meth:`kronopt.config.KronConfig.bound` resolves it
MOMENTUM_TIE = "momentum"


def graft_betas(value: Any) -> tuple[float | str, float]:
    """Two Adam betas, the first a number or :data:`MOMENTUM_TIE`."""
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == MOMENTUM_TIE:
        return (MOMENTUM_TIE, *_entries(value[1:], to_float, first=1))
    if isinstance(value, list | tuple) and any(isinstance(v, str) for v in value):
        raise ValueError(f"must be two numbers, or {MOMENTUM_TIE!r} and a number (β₁ tied to the inner rule's), got {value!r}")
    return float_tuple(2)(value)  # type: ignore[return-value]


def unless_tie(*validators: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """Apply ``validators`` unless the value is a tie (:data:`BETA_TIE`, :data:`MOMENTUM_TIE`)."""

    def validate(inst: Any, attr: Any, value: Any) -> None:
        if value not in (BETA_TIE, MOMENTUM_TIE):
            for v in validators:
                v(inst, attr, value)

    return validate


def to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, got {value!r}")
    return value


def to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, got {value!r}")
    return value


def to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, got {value!r}")
    return value


def float_tuple(length: int | None = None) -> Callable[[Any], tuple[float, ...]]:
    """A list of ``length`` numbers (any length: ``None``) as a tuple of floats; every entry that is no finite
    number named by its index, in one error (``[0] must be a number, got 'a'; [1] must be a number, got 'b'``)."""

    def convert(value: Any) -> tuple[float, ...]:
        if not isinstance(value, list | tuple):
            raise TypeError(f"must be a list of numbers, got {value!r}")
        if length is not None and len(value) != length:
            raise ValueError(f"must have {length} entries, got {len(value)}")
        return _entries(value, to_float)

    return convert


def auto_or_int_tuple(value: Any) -> str | tuple[int, ...]:
    """``"auto"`` or a list of integers (as a tuple); every entry that is no integer named by its index."""
    if value == "auto":
        return "auto"
    if not isinstance(value, list | tuple):
        raise TypeError(f"must be 'auto' or a list of integers, got {value!r}")
    return _entries(value, to_int)


def str_tuple(value: Any) -> tuple[str, ...]:
    """A list of strings as a tuple; every entry that is no string named by its index."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"must be a list of strings, got {value!r}")
    return _entries(value, to_str)


def triples(value: Any) -> tuple[tuple[float, float, float], ...]:
    """A list of ``[a, b, c]`` number triples as tuples; every bad triple, or bad number in one, named by its
    index (``[0] must have 3 entries, got 2; [1][0] must be a number, got 'a'``)."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"must be a list of [a, b, c] triples, got {value!r}")
    return _entries(value, float_tuple(3))  # type: ignore[return-value]


__all__ = [
    "BETA_TIE",
    "MOMENTUM_TIE",
    "Problems",
    "auto_or_int_tuple",
    "each",
    "float_tuple",
    "graft_betas",
    "ge",
    "gt",
    "in_",
    "le",
    "lt",
    "problems_of",
    "str_tuple",
    "to_beta",
    "to_bool",
    "to_float",
    "to_int",
    "to_str",
    "triples",
    "unless_tie",
]
