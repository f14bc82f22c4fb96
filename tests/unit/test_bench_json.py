"""``kronopt bench --json FILE``: the run's record, for a user's own comparisons: strict JSON holding the settings
as given, the versions and processor, and every figure the tables print, the same numbers; a bad path refused
before anything runs."""

import json
import math

import pytest

from kronopt.app import bench, cli

TINY = ["--shapes", "8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]


def _capture(monkeypatch, name):
    """Wrap ``bench.<name>`` so that what it returned is kept (the figures the record must hold)."""
    seen = []
    real = getattr(bench, name)
    monkeypatch.setattr(bench, name, lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


def test_the_record_holds_the_settings_and_the_figures_the_tables_print(tmp_path, monkeypatch, capsys):
    """Fails on a record that reports other figures than the run's (rows, ratios, matrix work, scaling), drops a
    setting given on the command line, or is not plain JSON (a tuple, NaN)."""
    rows_seen = _capture(monkeypatch, "bench")
    table_seen = _capture(monkeypatch, "scaling")
    path = tmp_path / "run.json"
    args = ["bench", "adamw", "soap", *TINY, "--repeat", "2", "--seed", "3", "--ratio", "soap/adamw", "--alone",
            "--scaling", "8", "--json", str(path)]
    assert cli.main(args) == 0
    assert f"record written to {path}" in capsys.readouterr().out
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["format"] == "kronopt-bench/1" and data["versions"]["torch"] and data["machine"]["cpus"] >= 1
    settings = data["settings"]
    assert settings["optimizers"] == ["adamw", "soap"] and settings["params"]["shapes"] == [[8, 4], [4]]
    assert (settings["steps"], settings["warmup"], settings["seed"], settings["repeat"], settings["threads"]) == (2, 1, 3, 2, 1)
    assert settings["widths"] == [8] and settings["alone"] is True and settings["device"] == "cpu"
    results = data["results"]
    main = rows_seen[0]  # the main table's run (the scaling table's runs come after it)
    printed = {r["optimizer"]: r for r in results["rows"]}
    assert list(printed) == ["adamw", "soap"]
    for row in main[:2]:
        assert printed[row["optimizer"]]["run_means"] == row["run_means"] and printed[row["optimizer"]]["mean_ms"] == row["mean_ms"]
        assert printed[row["optimizer"]]["vs_first_range"] == list(row["vs_first_range"])
    (ratio,) = results["ratios"]
    assert ratio["pair"] == ["soap", "adamw"] and ratio["ratio"] == bench.ratios(main, [("soap", "adamw")])[0]["ratio"]
    assert set(results["matrix_work"]) == {"adamw", "soap"} and results["matrix_work"]["soap"]["ratio"] > 0
    (width,) = results["scaling"]
    assert width["d"] == 8 and [r["mean_ms"] for r in width["rows"]] == [r["mean_ms"] for r in table_seen[0][0]["rows"]]
    assert not list(tmp_path.glob("*.partial"))


def test_the_world_record_holds_each_world_size_and_its_ratios(tmp_path, monkeypatch):
    def world(size, job):
        return [[{"times": [1e-3 * (1 + i)], "state_bytes": 8, "gather_bytes": 4 * (size > 1), "fault_bytes": None,
                  "failed": None, "dropped": False} for i in range(2)] for _ in range(size)]

    monkeypatch.setattr(bench, "_world", world)
    path = tmp_path / "world.json"
    assert cli.main(["bench", "adamw", "soap", *TINY, "--world", "1,2", "--ratio", "soap/adamw", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["settings"]["worlds"] == [1, 2] and data["settings"]["threads"] == 1
    assert [(r["world"], r["optimizer"]) for r in data["results"]["world"]] == [(1, "adamw"), (1, "soap"), (2, "adamw"), (2, "soap")]
    assert {w: [r["ratio"] for r in found] for w, found in data["results"]["ratios"].items()} == {"1": [2.0], "2": [2.0]}
    assert [r["comm_bytes"] for r in data["results"]["world"]] == [0, 0, 4, 4]


def test_figures_that_are_not_finite_become_null_and_tuples_lists():
    assert bench._plain_json({"a": (1.0, math.nan), 2: [math.inf, {"b": -math.inf}], "c": None}) == {
        "a": [1.0, None], "2": [None, {"b": None}], "c": None,
    }


@pytest.mark.parametrize("where", ["folder", "no parent"])
def test_a_path_that_cannot_be_written_is_refused_before_the_run(where, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("ran with a path it could not write"))
    path = tmp_path if where == "folder" else tmp_path / "missing" / "run.json"
    assert cli.main(["bench", "adamw", *TINY, "--repeat", "0", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--repeat: must be ≥ 1" in err  # listed with the other problems
    assert ("is a folder" if where == "folder" else "is not a folder") in err
