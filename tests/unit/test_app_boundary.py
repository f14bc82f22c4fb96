"""The library apart from the application: ``import kronopt`` loads nothing of ``kronopt.app``.

The application (``kronopt/app/``) depends on the library, never the other way round;
the old module paths of the application are deprecation shims that warn and hand back
the moved module.
"""

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import kronopt

ROOT = Path(kronopt.__file__).parent
REPO = ROOT.parent

#: the deprecation shims at the application's old paths: the only library files that import kronopt.app
SHIMS = {"kronopt.ablate", "kronopt.cli", "kronopt.docs", "kronopt.fisher", "kronopt.spectrum", "kronopt.task", "kronopt.train"}


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout's kronopt."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module the file at ``path`` imports (see :func:`_imports_in`)."""
    return _imports_in(path.read_text(encoding="utf-8"), _module_name(path), is_package=path.name == "__init__.py")


def _imports_in(text: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``text`` imports, read as module ``module``: relative imports resolved, ``from X import Y`` as ``X.Y`` too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _is_app(module: str) -> bool:
    return module == "kronopt.app" or module.startswith("kronopt.app.")


def test_import_kronopt_loads_no_application():
    """A fresh ``import kronopt`` imports no ``kronopt.app`` module, no shim, and neither matplotlib nor tqdm.

    torch itself may import tqdm (torch.hub), so the optional packages are judged
    against what ``import torch`` alone loaded.
    """
    code = (
        "import json, sys, torch\n"
        "before = set(sys.modules)\n"
        "import kronopt\n"
        "new = set(sys.modules) - before\n"
        "print(json.dumps({'app': sorted(m for m in sys.modules if m.startswith('kronopt.app')),\n"
        "                  'kronopt': sorted(m for m in sys.modules if m.startswith('kronopt')),\n"
        "                  'extras': sorted(m for m in new if m.split('.')[0] in ('matplotlib', 'tqdm')),\n"
        "                  'file': kronopt.__file__}))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert Path(seen["file"]).resolve() == (ROOT / "__init__.py").resolve(), "the subprocess imported another kronopt"
    assert seen["app"] == []
    assert not SHIMS & set(seen["kronopt"]), seen["kronopt"]
    assert seen["extras"] == []


def test_library_never_imports_the_application():
    """No module outside ``kronopt/app/`` imports ``kronopt.app`` (read from the syntax tree), except the shims."""
    offenders = {}
    for path in sorted(ROOT.rglob("*.py")):
        if (ROOT / "app") in path.parents:
            continue
        hits = sorted(m for m in _imports(path) if _is_app(m))
        if hits:
            offenders[_module_name(path)] = hits
    assert set(offenders) == SHIMS, offenders


@pytest.mark.parametrize(
    "text", ["from .app import cli", "from . import app", "import kronopt.app.train", "from kronopt.app.task import TinyGPT",
             "from kronopt import app", "from ..app import train"]
)
def test_import_checker_sees_every_spelling(text):
    """The checker above catches each spelling of an import of the application (as ``kronopt.factors.x``'s text)."""
    module = "kronopt.x" if not text.startswith("from ..") else "kronopt.factors.x"
    assert any(_is_app(m) for m in _imports_in(text, module)), text
    assert not any(_is_app(m) for m in _imports_in("from . import apply\nimport kronopt.application", module))


def test_old_paths_warn_and_return_the_moved_modules():
    """Each shim warns with a DeprecationWarning naming the new path and *is* the moved module (so patches reach it)."""
    code = (
        "import importlib, json, warnings\n"
        "out = {}\n"
        f"for old in {sorted(SHIMS - {'kronopt.cli'})!r}:\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        mod = importlib.import_module(old)\n"
        "    new = importlib.import_module(old.replace('kronopt.', 'kronopt.app.'))\n"
        "    out[old] = [mod is new, [(w.category.__name__, str(w.message)) for w in caught]]\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from kronopt.train import TaskConfig, train\n"
        "    import kronopt.task.data, kronopt.cli\n"
        "import kronopt.app.train, kronopt.app.task.data, kronopt.app.bench, kronopt.app.cli\n"
        "out['same'] = [TaskConfig is kronopt.app.train.TaskConfig, kronopt.task.data is kronopt.app.task.data,\n"
        "               kronopt.cli.bench is kronopt.app.bench.bench, kronopt.cli.main is kronopt.app.cli.main]\n"
        "out['cli'] = [(w.category.__name__, str(w.message)) for w in caught]\n"
        "print(json.dumps(out))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for old in SHIMS - {"kronopt.cli"}:
        same, caught = seen[old]
        assert same, old
        new = old.replace("kronopt.", "kronopt.app.")
        assert caught == [["DeprecationWarning", f"{old} has moved to {new}; import it from there ({old} will be removed)"]]
    assert seen["same"] == [True] * 4
    assert ["DeprecationWarning", "kronopt.cli has moved to kronopt.app.cli; import it from there (kronopt.cli will be "
            "removed)"] in seen["cli"]


def test_the_command_line_runs_from_its_new_home():
    """The ``kronopt`` script is ``kronopt.app.cli:main``, and ``python -m kronopt.app`` runs it."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == {"kronopt": "kronopt.app.cli:main"}
    done = subprocess.run([sys.executable, "-m", "kronopt.app", "show", "adamw", "--set", "lr=0.5"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "lr = 0.5" in done.stdout


def test_no_application_module_imports_the_command_line_back():
    """Only ``kronopt/app/__main__.py`` imports ``kronopt.app.cli``: the command registry is a plain list, no cycle."""
    importers = sorted(_module_name(path) for path in (ROOT / "app").rglob("*.py") if "kronopt.app.cli" in _imports(path))
    assert importers == ["kronopt.app.__main__"]
