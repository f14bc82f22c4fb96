"""Generate ``docs/stages.md`` from the registries: ``python -m kronopt.app.docs > docs/stages.md``.

Each built-in stage is rendered from its class: the registry key and one-line
description, the class docstring (its maths), and a table of its options built
from its attrs fields (type and default) with their text from the docstring's
``Attributes:`` section. The config tables that are not slots (``[post]``,
``[shapes]``, ``[route]``) and the top-level keys follow, then "What composes": the
matrix of every built-in factors × basis × inner × split, each tried with
:func:`kronopt.from_dict` (no training), marked as building or refused with the
short reason. Plugins are left out, so the page is the same on every install;
``kronopt stages`` lists them.

``tests/unit/test_docs.py`` fails when ``docs/stages.md`` differs from this output.
"""

import argparse
import inspect
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

import kronopt  # noqa: F401  (registers the built-ins)
from kronopt.config import STAGE_SLOTS, ConfigError, KronConfig, Route, Shapes, Storage, from_dict, to_dict
from kronopt.post import Post
from kronopt.registry import SLOTS
from kronopt.types import capabilities

#: where the generated page lives, relative to the repository root
STAGES_MD = Path("docs") / "stages.md"

_SLOT_TITLES = {
    "factors": "factor estimators: the Kronecker factors `L`, `R` of the gradient's second moment",
    "basis": "bases: orthonormal `Q_L`, `Q_R` (and eigenvalue estimates) from the factors",
    "inner": "inner rules: the update applied in the rotated basis",
    "split": "splits: how each rotated side is represented, and the complement of a restricted side",
    "refresh": "refresh schedules: when the basis is recomputed",
}


_ROLES = re.compile(r":(?:class|func|meth|mod|data|attr|obj):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")


def _inline(text: str) -> str:
    """reStructuredText inline markup → Markdown."""
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLES.sub(lambda m: f"`{m.group(1)}`", text)
    return text.replace("``", "`")


def _split_doc(cls: type) -> tuple[list[str], dict[str, str], list[tuple[str, list[str]]]]:
    """(body lines, attribute texts, other sections) of a Google-style class docstring."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    body: list[str] = []
    attributes: dict[str, str] = {}
    sections: list[tuple[str, list[str]]] = []
    current: str | None = None
    for line in lines:
        header = _SECTION.match(line)
        if header:
            current = header.group(1)
            if current != "Attributes":
                sections.append((current, []))
            continue
        if current is None:
            body.append(line)
        elif line and not line.startswith(" "):
            current = None
            body.append(line)
        elif current == "Attributes":
            entry = re.match(r"^ {4}(\w+):\s*(.*)$", line)
            if entry:
                last = entry.group(1)
                attributes[last] = entry.group(2)
            elif line.strip() and attributes:
                last = list(attributes)[-1]
                attributes[last] += " " + line.strip()
        else:
            sections[-1][1].append(line.strip())
    return body, attributes, sections


def _body_markdown(body: list[str]) -> list[str]:
    """Docstring body → Markdown: ``.. math::`` blocks become ```` ```math ```` fences."""
    out: list[str] = []
    i = 0
    while i < len(body):
        line = body[i]
        if line.strip() == ".. math::":
            i += 1
            block: list[str] = []
            while i < len(body) and (not body[i].strip() or body[i].startswith(" ")):
                block.append(body[i].strip())
                i += 1
            while block and not block[-1]:
                block.pop()
            out += ["```math", *[b for b in block if b], "```"]
            continue
        out.append(_inline(line))
        i += 1
    while out and not out[-1].strip():
        out.pop()
    return out


def _type_name(tp: Any) -> str:
    if tp is None:
        return ""
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "").replace("|", "\\|")
    return getattr(tp, "__name__", str(tp)).replace("|", "\\|")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if value is None:
        return "—"
    return repr(value)


def _default(field: Any) -> str:
    default = field.default
    if default is attrs.NOTHING:
        return "(required)"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return "(table)" if attrs.has(type(default.factory())) else _value(default.factory())
    return _value(default)


def _options_table(cls: type, attributes: dict[str, str], *, skip: Sequence[str] = ()) -> list[str]:
    fields = [f for f in attrs.fields(cls) if f.init and f.name not in skip]
    if not fields:
        return ["No options."]
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        meaning = _inline(attributes.get(f.name, "")).replace("|", "\\|")
        rows.append(f"| `{f.alias}` | {_type_name(f.type)} | `{_default(f)}` | {meaning} |")
    return rows


def _capabilities_line(cls: type) -> list[str]:
    """``Capabilities: `provides_factors`, ….`` from the stage's typed record (none: no line)."""
    names = [f"`{name}`" for name, on in attrs.asdict(capabilities(cls)).items() if on]
    return ["Capabilities: " + ", ".join(names) + ".", ""] if names else []


def _render_class(cls: type, heading: str, *, skip: Sequence[str] = (), stage: bool = False) -> list[str]:
    body, attributes, sections = _split_doc(cls)
    out = [heading, ""]
    text = _body_markdown(body)
    if text:
        out += [*text, ""]
    for name, lines in sections:
        out += [f"*{name}.* " + _inline(" ".join(x for x in lines if x)), ""]
    if stage:
        out += _capabilities_line(cls)
    out += [*_options_table(cls, attributes, skip=skip), ""]
    return out


#: the slots the "What composes" matrix varies (refresh is a schedule: every stage composes with it)
_MATRIX_SLOTS: tuple[str, ...] = ("factors", "basis", "inner", "split")


def _builtin_keys(slot: str) -> list[str]:
    return [e.key for e in SLOTS[slot].entries(load_plugins=False) if e.source == "kronopt"]


def _refusal_reasons(combo: dict[str, str]) -> list[str] | None:
    """``None`` when the combination builds, else the short reason of each problem found.

    The config is the ``soap`` preset with the four slots set to ``{"type": key}``
    (every stage at its defaults). A short reason is a problem's first clause with
    the stage keys taken out, so that the same rule reads the same in every cell.
    """
    from kronopt.presets import PRESETS

    raw = to_dict(PRESETS["soap"])
    raw.update({slot: {"type": key} for slot, key in combo.items()})
    try:
        from_dict(raw)
    except ConfigError as err:
        reasons = []
        for _, msg in err.errors:
            reason = msg.split(";")[0]
            for key in combo.values():
                reason = reason.replace(f" {key!r}", "")
            reasons.append(reason.strip())
        return reasons
    return None


def composition_markdown() -> list[str]:
    """The "What composes" section: per split, a factors × basis by inner table of ✓ / ✗ with reason letters."""
    keys = {slot: _builtin_keys(slot) for slot in _MATRIX_SLOTS}
    legend: dict[str, str] = {}  # reason -> letter, in order of first appearance
    tables: list[str] = []
    built = refused = 0
    for split in keys["split"]:
        tables += [f"Split `{split}`:", "", "| factors + basis | " + " | ".join(f"`{k}`" for k in keys["inner"]) + " |"]
        tables += ["|---|" + "---|" * len(keys["inner"])]
        for factors in keys["factors"]:
            for basis in keys["basis"]:
                cells = []
                for inner in keys["inner"]:
                    reasons = _refusal_reasons({"factors": factors, "basis": basis, "inner": inner, "split": split})
                    if reasons is None:
                        built += 1
                        cells.append("✓")
                        continue
                    refused += 1
                    letters = []
                    for r in reasons:
                        letter = legend.setdefault(r, chr(ord("A") + len(legend)))
                        if letter not in letters:
                            letters.append(letter)
                    cells.append("✗ " + " ".join(sorted(letters)))
                tables.append(f"| `{factors}` + `{basis}` | " + " | ".join(cells) + " |")
        tables.append("")
    total = built + refused
    out = [
        "## What composes",
        "",
        "Every built-in factors × basis × inner × split, each stage at its defaults (the `soap` preset",
        f"with the four slots replaced), tried with `kronopt.from_dict`: {built} of {total} build (✓),",
        f"{refused} are refused when the config is built (✗, with the letters of the reasons below). The",
        "error itself names the stages and lists the stages that would work;",
        "`tests/composition/test_matrix.py` runs every combination that builds on every block shape.",
        "",
        *tables,
        "Reasons:",
        "",
        *[f"- **{letter}**: {_inline(reason)}." for reason, letter in legend.items()],
        "",
    ]
    return out


def stages_markdown() -> str:
    """The text of ``docs/stages.md``: every built-in stage and config table, from the code."""
    out = [
        "# Stages",
        "",
        "<!-- Generated by `python -m kronopt.app.docs` (or `kronopt stages --markdown`) from the registries.",
        "     Do not edit by hand: change the stage's docstring and run `python -m kronopt.app.docs --write`.",
        "     tests/unit/test_docs.py fails when this file is out of date. -->",
        "",
        "Every built-in stage, by slot. In a config, a slot is a table whose `type` is the",
        "stage's key and whose other keys are the options below (see [configs.md](configs.md));",
        "`kronopt show CONFIG` prints a config with every default filled in. Plugin stages are",
        "not listed here: `kronopt stages` lists everything installed, and",
        "[extending.md](extending.md) shows how to add a stage.",
        "",
    ]
    for slot in STAGE_SLOTS:
        entries = [e for e in SLOTS[slot].entries(load_plugins=False) if e.source == "kronopt"]
        out += [f"- [`[{slot}]`](#{slot}): " + ", ".join(f"`{e.key}`" for e in entries)]
    out += ["- [what composes](#what-composes): which factors × basis × inner × split build"]
    out += ["- [other tables](#other-tables): `[post]`, `[shapes]`, `[route]`, `[storage]`, top-level keys", ""]
    for slot in STAGE_SLOTS:
        out += [f"## {slot}", "", f"`[{slot}]` — {_SLOT_TITLES.get(slot, slot)}.", ""]
        for e in SLOTS[slot].entries(load_plugins=False):
            if e.source != "kronopt":
                continue
            heading = f"### `{e.key}` ({e.cls.__name__})\n\n{_inline(e.description)}."
            out += _render_class(e.cls, heading, stage=slot != "refresh")
    out += composition_markdown()
    out += ["## other tables", ""]
    out += _render_class(Post, "### `[post]` (Post)")
    out += _render_class(Shapes, "### `[shapes]` (Shapes)")
    out += _render_class(Route, "### `[route]` (Route)")
    out += _render_class(Storage, "### `[storage]` (Storage)")
    out += _render_class(KronConfig, "### top-level keys (KronConfig)", skip=(*STAGE_SLOTS, "post", "shapes", "route", "storage"))
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronopt.app.docs", description="Print docs/stages.md.")
    parser.add_argument("--write", nargs="?", const=str(STAGES_MD), metavar="PATH",
                        help=f"write the page instead of printing it (default path: {STAGES_MD})")
    args = parser.parse_args(argv)
    text = stages_markdown()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
