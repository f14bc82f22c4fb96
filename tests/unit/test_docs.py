"""docs/stages.md is generated from the registries and must not drift from them."""

from pathlib import Path

from kronopt.app import cli
from kronopt.app.docs import stages_markdown
from kronopt.registry import SLOTS

ROOT = Path(__file__).resolve().parents[2]


def test_stages_md_is_up_to_date():
    committed = (ROOT / "docs" / "stages.md").read_text(encoding="utf-8")
    assert committed == stages_markdown(), (
        "docs/stages.md is out of date with the registered stages: run `python -m kronopt.app.docs --write`"
    )


def test_every_built_in_stage_is_documented_with_its_options():
    text = stages_markdown()
    for slot, registry in SLOTS.items():
        assert f"## {slot}" in text
        for entry in registry.entries(load_plugins=False):
            if entry.source == "kronopt":
                assert f"### `{entry.key}` ({entry.cls.__name__})" in text
    assert "| `beta` | float \\| str | `0.95` | retention $\\beta \\in [0, 1)$ (SOAP's `shampoo_beta`), or `\"beta2\"`" in text
    assert "```math\nL \\leftarrow \\beta L + (1-\\beta)\\, G G^\\top" in text
    assert "### `[post]` (Post)" in text and "| `max_dim` | int | `10000` |" in text
    assert "sign_momentum" not in text  # plugins are left out: the page is the same on every install


def test_cli_stages_markdown_prints_the_page(capsys):
    assert cli.main(["stages", "--markdown"]) == 0
    assert capsys.readouterr().out == stages_markdown()


def test_what_composes_marks_each_built_in_combination_as_from_dict_does():
    """One ✓ per built-in factors × basis × inner × split that ``from_dict`` accepts, one ✗ per refusal."""
    import kronopt
    from tests.composition._support import combinations, config_dict

    built = refused = 0
    for combo in combinations(load_plugins=False):
        try:
            kronopt.from_dict(config_dict(combo))
            built += 1
        except kronopt.ConfigError:
            refused += 1
    section = stages_markdown().split("## What composes", 1)[1].split("\n## ", 1)[0]
    assert section.count("✓") == built + 1 and section.count("✗") == refused + 1  # +1: the intro names each mark
    assert f"{built} of {built + refused} build" in section
    assert "| `kl` + `qr` | " in section and "sign_momentum" not in section
