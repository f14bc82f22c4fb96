"""Shared helpers of the composition suites: combinations, configs, tiny models, state walks.

Every combination is a ``(factors, basis, inner, split)`` tuple of registry keys,
plugins included. A config is the ``soap`` preset's dict with the four slots set
to ``{"type": key}`` (so each stage keeps its defaults and no option of another
stage leaks in), a short refresh period and a small ``shapes.max_dim``.
"""

import itertools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

import kronopt
from kronopt.registry import SLOTS

#: the slots a combination chooses (refresh keeps the preset's schedule, with a short period)
COMBO_SLOTS: tuple[str, ...] = ("factors", "basis", "inner", "split")

#: ``shapes.max_dim`` of every composition config: small, so one shape has a side over it
MAX_DIM = 8

#: name → parameter shape; every block kind the shape policy makes (see ``kronopt/_shapes.py``)
SHAPES: dict[str, tuple[int, ...]] = {
    "square": (5, 5),
    "tall": (7, 3),
    "wide": (3, 7),
    "row": (1, 6),  # 1 × n
    "column": (6, 1),  # n × 1
    "conv": (4, 2, 2, 2),  # (o, i, kh, kw) → (4, 8)
    "over_max_dim": (11, 4),  # left side 11 > MAX_DIM: not rotated
}


def combinations(*, load_plugins: bool = True) -> list[tuple[str, ...]]:
    """Every registered ``(factors, basis, inner, split)``; built-ins only when not ``load_plugins``."""
    keys = []
    for slot in COMBO_SLOTS:
        entries = SLOTS[slot].entries(load_plugins=load_plugins)
        keys.append([e.key for e in entries if load_plugins or e.source == "kronopt"])
    return list(itertools.product(*keys))


def config_dict(combo: tuple[str, ...], *, every: int = 2, max_dim: int = MAX_DIM, **top: Any) -> dict[str, Any]:
    """The soap preset's dict with the combination's stages at their defaults."""
    raw = kronopt.to_dict(kronopt.PRESETS["soap"])
    for slot, key in zip(COMBO_SLOTS, combo):
        raw[slot] = {"type": key}
    raw["refresh"] = {"type": "every", "every": every, "at_first_call": True}
    raw["shapes"] = {**raw["shapes"], "max_dim": max_dim}
    raw.update(top)
    return raw


_ALTERNATIVES = re.compile(r"(?:use (?:a |an )?\w+ of type|stages that do): ([\w, ()]+)")


def check_refusal(combo: tuple[str, ...], err: kronopt.ConfigError) -> None:
    """A refusal names the stages involved and says what would work.

    Every listed problem names at least one stage key of the combination; the
    message offers at least one list of alternatives ("use … of type: a, b" /
    "… stages that do: a, b"), and each alternative is a registered key.
    """
    assert err.errors, "a ConfigError with no errors"
    quoted = {f"'{k}'" for k in combo}
    for path, msg in err.errors:
        assert any(q in msg for q in quoted), f"{path}: {msg!r} names none of the stages {combo}"
    lists = [m.group(1) for _, msg in err.errors for m in [_ALTERNATIVES.search(msg)] if m]
    assert lists, f"the refusal of {combo} lists no alternatives:\n{err}"
    known = {k for slot in COMBO_SLOTS for k in SLOTS[slot].keys()}
    for text in lists:
        for alt in (a.strip() for a in text.split(",")):
            assert alt == "(none)" or alt in known, f"alternative {alt!r} in {text!r} is not a registered stage"


def make_params(shapes: list[tuple[int, ...]], gen: torch.Generator, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor reachable from ``obj`` (dicts, lists, tuples, attrs records), by path."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{path}[{i}]")
    elif attrs.has(type(obj)):
        for f in attrs.fields(type(obj)):
            yield from tensors(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)


def nonfinite_tensors(opt: kronopt.KronOptimizer, params: list[Tensor]) -> list[str]:
    """Paths of every parameter, ``opt.state`` tensor and ``opt.inspect()`` tensor holding a NaN or an infinity."""
    bad = [f"param[{i}]" for i, p in enumerate(params) if not torch.isfinite(p).all()]
    for i, p in enumerate(params):
        bad += [f"state[{i}].{k}" for k, t in tensors(opt.state[p]) if t.is_floating_point() and not torch.isfinite(t).all()]
    for name, view in opt.inspect().items():
        bad += [f"inspect[{name}].{k}" for k, t in tensors(view) if t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


def snapshot(opt: kronopt.KronOptimizer, params: list[Tensor]) -> list[dict[str, Any]]:
    """A deep copy of each parameter and its ``opt.state`` entry (tensors cloned)."""
    out = []
    for p in params:
        entry = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in opt.state[p].items()}
        entry["__param__"] = p.detach().clone()
        out.append(entry)
    return out


def bit_identical(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and bits (NaN == NaN, -0.0 != 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        width = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def snapshot_diff(
    before: list[dict[str, Any]], after: list[dict[str, Any]], *, ignore: tuple[str, ...] = (), tensors_only: bool = False
) -> list[str]:
    """The ``param[i].key`` entries that differ (tensors bit for bit, other values by ``==``, unless ``tensors_only``)."""
    diff = []
    for i, (x, y) in enumerate(zip(before, after)):
        for k in sorted(set(x) | set(y)):
            if k in ignore:
                continue
            if k not in x or k not in y:
                diff.append(f"param[{i}].{k} (appeared or vanished)")
            elif isinstance(x[k], Tensor) or isinstance(y[k], Tensor):
                if not (isinstance(x[k], Tensor) and isinstance(y[k], Tensor) and bit_identical(x[k], y[k])):
                    diff.append(f"param[{i}].{k}")
            elif not tensors_only and x[k] != y[k]:
                diff.append(f"param[{i}].{k} ({x[k]!r} → {y[k]!r})")
    return diff


def leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted path."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
