"""The ablation's data read once and keyed by ``Corpus.sha256`` (f2f5b9e): an unreadable file of the standard
library's corpus is a ``ConfigError`` naming it, as it was before (found by a review of that commit)."""

import pytest

from kronopt.app import ablate
from kronopt.app.ablate import parse_ablation, run_ablation
from kronopt.app.train import TaskConfig
from kronopt.config import ConfigError

TINY = {"layers": 1, "width": 16, "heads": 1, "context": 8, "batch": 2, "steps": 2}


@pytest.fixture
def stdlib_with_a_broken_file(tmp_path, monkeypatch):
    """A standard-library corpus of three files, one of them a dangling symlink (globbed, but unreadable)."""
    a, c = tmp_path / "a.py", tmp_path / "c.py"
    a.write_text("x = 1\n" * 200)
    c.write_text("y = 2\n" * 200)
    broken = tmp_path / "broken.py"
    broken.symlink_to(tmp_path / "nowhere")
    files = lambda: ([a, broken], [c])  # noqa: E731
    monkeypatch.setattr(ablate, "stdlib_files", files)
    monkeypatch.setattr("kronopt.app.task.data.stdlib_files", files)
    return broken


def test_run_ablation_reports_an_unreadable_stdlib_file_as_a_config_error(stdlib_with_a_broken_file, monkeypatch):
    """An unreadable file of the default (stdlib) corpus is a ``ConfigError`` at ``task.data`` before any
    training, so ``kronopt ablate`` exits 2 with one message, as before f2f5b9e (where ``data_sha256`` read it
    first). Catches: ``run_ablation`` now reads the data through ``load_corpus``, whose stdlib branch lets the
    raw ``FileNotFoundError`` / ``PermissionError`` out (a traceback from the command line)."""
    trained = []
    monkeypatch.setattr(ablate, "train", lambda *a, **k: trained.append(1))
    ab = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="nowhere|broken"):
        run_ablation(ab, task=TaskConfig(**TINY), progress=False)
    assert trained == []


def test_data_sha256_names_the_unreadable_stdlib_file(stdlib_with_a_broken_file):
    """``data_sha256(None)``'s error names the standard-library file it could not read, as before f2f5b9e.
    Catches: the refactor to list comprehensions (whose loop variable does not leak) leaves ``path`` as ``None``
    in the ``except``, so the message reads ``no such file: 'None'``."""
    with pytest.raises(ConfigError) as info:
        ablate.data_sha256(None)
    message = str(info.value)
    assert "'None'" not in message
    assert "nowhere" in message or "broken" in message
