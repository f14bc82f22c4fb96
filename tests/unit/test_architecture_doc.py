"""docs/architecture.md names every module of the package, so its map cannot drift from the code."""

import re
from pathlib import Path

import kronopt

ROOT = Path(kronopt.__file__).parent
REPO = ROOT.parent
PAGE = REPO / "docs" / "architecture.md"


def _modules() -> list[str]:
    """Every ``.py`` file and every subpackage under ``kronopt/``, as repository paths (``kronopt/factors/kl.py``, ``kronopt/app/``)."""
    files = [p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts]
    packages = {p.parent for p in files if p.name == "__init__.py" and p.parent != ROOT}
    return sorted([p.relative_to(REPO).as_posix() for p in files] + [p.relative_to(REPO).as_posix() + "/" for p in packages])


def _named(text: str) -> set[str]:
    """The paths the page writes in backticks (``kronopt/...``)."""
    return set(re.findall(r"`(kronopt/[\w./]*)`", text))


def test_every_module_is_named_on_the_architecture_page():
    """Each file and subpackage under ``kronopt/`` appears on the page as `kronopt/<path>` (a new module must be described)."""
    missing = [m for m in _modules() if m not in _named(PAGE.read_text(encoding="utf-8"))]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"


def test_the_page_names_no_module_that_does_not_exist():
    """Every `kronopt/<path>` the page names is a file or folder of the package (no stale entries such as factors.py)."""
    stale = sorted(name for name in _named(PAGE.read_text(encoding="utf-8"))
                   if "<" not in name and not (REPO / name).exists())
    assert not stale, f"docs/architecture.md names modules that do not exist: {', '.join(stale)}"


def test_the_check_sees_modules_and_subpackages():
    """The list the checks compare against holds files in subpackages and the subpackages themselves."""
    modules = _modules()
    assert {"kronopt/__init__.py", "kronopt/factors/kl.py", "kronopt/app/", "kronopt/app/task/model.py"} <= set(modules)
    assert all(m.startswith("kronopt/") for m in modules)
