"""The prose pages name functions, tests, paths, learning rates and an example config: each must be what the code has.

A renamed function, a moved test or a retuned learning rate leaves the docs stale without breaking anything
else; these checks read every page and fail where one names something that is not there.
"""

import functools
import importlib
import re
from pathlib import Path

import pytest
import torch

import kronopt

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md"] + [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))]
#: library modules whose attributes pages name as `module.attr`
MODULES = ("linalg", "distributed", "compose", "inspection", "types", "registry", "validators", "config", "post")
_FILE_SUFFIXES = ("py", "toml", "md", "json", "csv", "png", "txt", "sh")


def _text(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


@functools.cache
def _test_sources() -> str:
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    return "\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in files)


@pytest.mark.parametrize("page", PAGES)
def test_every_library_attribute_a_page_names_exists(page):
    """`linalg.reproject_flat`-style names resolve (a page kept naming a function after it was renamed)."""
    pattern = r"`(?:kronopt\.)?(" + "|".join(MODULES) + r")\.([A-Za-z_]\w*)(?:\(\))?`"
    missing = set()
    for module, attr in set(re.findall(pattern, _text(page))):
        if attr in _FILE_SUFFIXES:  # a file name such as `config.toml`
            continue
        if module == "linalg" and hasattr(torch.linalg, attr):  # torch.linalg's, written short
            continue
        owner = importlib.import_module(f"kronopt.{module}")
        if not hasattr(owner, attr) and not (module == "post" and hasattr(owner.Post, attr)):
            missing.add(f"{module}.{attr}")
    assert not missing, f"{page} names {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES)
def test_every_test_and_repository_path_a_page_names_exists(page):
    text = _text(page)
    tests = sorted(n for n in set(re.findall(r"`(test_\w+)`", text)) if f"def {n}" not in _test_sources())
    paths = sorted(
        p for p in set(re.findall(r"`((?:tests|kronopt|configs|plugins)/[\w./-]*)`", text))
        if "<" not in p and not (ROOT / p).exists()
    )
    assert not tests and not paths, f"{page} names tests {tests} and paths {paths} that do not exist"


def test_the_configs_page_example_is_the_soap_preset_and_shows_every_record():
    block = re.search(r"```toml\n(.*?)```", _text("docs/configs.md"), re.S).group(1)
    assert kronopt.to_dict(kronopt.loads(block)) == kronopt.to_dict(kronopt.resolve("soap"))
    for record in ("post", "shapes", "route", "storage", "distributed"):
        assert f"[{record}]" in block, record


def test_the_configs_page_default_learning_rates_are_the_presets():
    """The bold **default** column of "Default learning rates" is what `resolve` gives (and the fallback's)."""
    rows = re.findall(
        r"^\| `(\w+)` \|[^\n]*?\| \*\*([\d.e-]+)\*\*(?:, AdamW \*\*([\d.e-]+)\*\*)? \|", _text("docs/configs.md"), re.M
    )
    assert {preset for preset, _, _ in rows} >= {"soap", "shampoo", "muon", "dykaf", "kl_shampoo", "pro_kl_shampoo"}
    for preset, lr, fallback_lr in rows:
        cfg = kronopt.resolve(preset)
        assert cfg.lr == pytest.approx(float(lr)), preset
        if fallback_lr:
            assert cfg.fallback.lr == pytest.approx(float(fallback_lr)), preset
