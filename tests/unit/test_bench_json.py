"""``kronopt bench --json FILE``: the run's record, for a user's own comparisons: strict JSON holding the settings
as given, the versions and processor, and every figure the tables print, the same numbers; a bad path refused
before anything runs."""

import json
import math
import os
import re

import pytest

from kronopt import linalg
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


def test_the_world_record_holds_each_world_size_and_its_ratios(tmp_path, monkeypatch, capsys):
    """Each world size's own ratio (soap's step 2 × adamw's at world 1, 3 × at world 2), printed and recorded: fails
    on a world size given another's rows."""

    def world(size, job):
        return [[{"times": [1e-3 * (1 + i * size)], "state_bytes": 8, "gather_bytes": 4 * (size > 1), "fault_bytes": None,
                  "failed": None, "dropped": False} for i in range(2)] for _ in range(size)]

    monkeypatch.setattr(bench, "_world", world)
    path = tmp_path / "world.json"
    args = ["bench", "adamw", "soap", "heavyball.SOAP", *TINY, "--world", "1,2", "--ratio", "soap/adamw", "--ratio", "soap/heavyball.SOAP",
            "--json", str(path)]
    monkeypatch.setattr(bench.peers, "unavailable", lambda name: "not installed")  # a pair naming a missing peer
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    found = [(m.start(), m.group(1)) for m in re.finditer(r"soap / adamw +(\d\.\d+)", out)]
    assert [r for _, r in found] == ["2.000", "3.000"]
    heading = "ratios of the mean step time at world {}"
    assert out.index(heading.format(1)) < found[0][0] < out.index(heading.format(2)) < found[1][0]
    data = json.loads(path.read_text())
    settings = data["settings"]
    assert settings["worlds"] == [1, 2] and settings["threads"] == 1
    assert settings["ratios"] == [["soap", "adamw"], ["soap", "heavyball.SOAP"]] and settings["missing"] == {"heavyball.SOAP": "not installed"}
    assert [(r["world"], r["optimizer"]) for r in data["results"]["world"]] == [(1, "adamw"), (1, "soap"), (2, "adamw"), (2, "soap")]
    assert {w: [r["ratio"] for r in found] for w, found in data["results"]["ratios"].items()} == {"1": [2.0], "2": [3.0]}
    assert [r["comm_bytes"] for r in data["results"]["world"]] == [0, 0, 4, 4]


def test_the_record_names_the_processor_the_dtype_and_a_models_routing(tmp_path, monkeypatch):
    """The processor's ``model name`` from ``/proc/cpuinfo`` (a stand-in file here), ``--dtype`` as given (the
    parameters' dtypes alone would not tell a bfloat16 model from one made bfloat16), and for ``--model`` each
    kronopt optimizer's routing, as the table prints it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "json_models.py").write_text(
        "import torch\n\ndef net():\n    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Embedding(10, 8))\n"
    )
    args = cli.build_parser().parse_args(["bench", "adamw", "torch.AdamW", "--model", "json_models:net", "--dtype", "bfloat16"])
    plan = bench.check_bench(args)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineTest\ncpu family\t: 6\nmodel name\t: Test CPU @ 1 GHz\nflags\t: fpu\n")
    monkeypatch.setattr(linalg, "_CPUINFO", str(info))
    linalg._processor.cache_clear()
    try:
        data = bench.record(plan, {}, threads=1, load=(0.5, None), retained=False)
    finally:
        linalg._processor.cache_clear()
    assert data["machine"]["processor"] == "Test CPU @ 1 GHz" and data["machine"]["vendor"] == "GenuineTest"
    assert data["settings"]["dtype"] == "bfloat16" and set(data["settings"]["params"]["dtypes"]) == {"bfloat16"}
    expected = {where: {"parameters": c, "numbers": n} for where, (c, n) in bench.routing("adamw", plan.params).items()}
    assert data["settings"]["routing"] == {"adamw": expected} and expected["pipeline"]["parameters"] >= 1
    assert data["load_average"] == {"start": 0.5, "end": None}
    plan = bench.check_bench(cli.build_parser().parse_args(["bench", "adamw", "--shapes", "4x4"]))
    settings = bench.record(plan, {}, threads=1, load=(None, None), retained=False)["settings"]
    assert settings["dtype"] is None and settings["routing"] is None


def test_figures_that_are_not_finite_become_null_and_tuples_lists():
    assert bench._plain_json({"a": (1.0, math.nan), 2: [math.inf, {"b": -math.inf}], "c": None}) == {
        "a": [1.0, None], "2": [None, {"b": None}], "c": None,
    }


def _unwritable(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("where", ["folder", "no parent", "special file", "no write permission"])
def test_a_path_that_cannot_be_written_is_refused_before_the_run(where, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("ran with a path it could not write"))
    path = {"folder": tmp_path, "no parent": tmp_path / "missing" / "run.json", "special file": tmp_path / "fifo",
            "no write permission": tmp_path / "run.json"}[where]
    if where == "special file":
        os.mkfifo(path)  # as /dev/null would be: the record's move into place would replace it
    if where == "no write permission":  # (root writes anywhere: the refusal stood in for)
        monkeypatch.setattr(bench.tempfile, "NamedTemporaryFile", _unwritable)
    assert cli.main(["bench", "adamw", *TINY, "--json", str(path)]) == 2
    expected = {"folder": "is a folder", "no parent": "is not a folder", "special file": "is not a regular file",
                "no write permission": "cannot write in"}[where]
    assert expected in capsys.readouterr().err
    assert cli.main(["bench", "adamw", *TINY, "--repeat", "0", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--repeat: must be ≥ 1" in err and expected in err  # listed with the other problems


def test_a_record_is_written_whole_or_not_at_all_and_through_a_link(tmp_path, monkeypatch, capsys):
    """A write that fails on the way leaves neither the file nor a partial one (and an earlier record as it was);
    a path that is a link gets its target written, the link kept."""
    plan = bench.check_bench(cli.build_parser().parse_args(["bench", "adamw", "--shapes", "4x4", "--json", str(tmp_path / "run.json")]))
    (tmp_path / "run.json").write_text("earlier\n")
    monkeypatch.setattr(bench.os, "replace", _unwritable)
    with pytest.raises(PermissionError):
        bench._write_record(plan, {"a": 1})
    assert [f.name for f in tmp_path.iterdir()] == ["run.json"] and (tmp_path / "run.json").read_text() == "earlier\n"
    monkeypatch.undo()
    target = tmp_path / "target.json"
    (tmp_path / "link.json").symlink_to(target)
    plan = bench.check_bench(cli.build_parser().parse_args(["bench", "adamw", "--shapes", "4x4", "--json", str(tmp_path / "link.json")]))
    bench._write_record(plan, {"a": [1, None]})
    assert (tmp_path / "link.json").is_symlink() and json.loads(target.read_text()) == {"a": [1, None]}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["link.json", "run.json", "target.json"]


def test_a_record_takes_the_mode_a_new_file_would_or_the_one_it_replaces(tmp_path):
    """Not the temporary file's 0600: a new record is readable as any file the user makes (the umask's mode), and one
    that replaces an earlier record keeps that one's mode."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "run.json"
        plan = bench.check_bench(cli.build_parser().parse_args(["bench", "adamw", "--shapes", "4x4", "--json", str(path)]))
        bench._write_record(plan, {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        bench._write_record(plan, {"a": 2})
        assert path.stat().st_mode & 0o777 == 0o640 and json.loads(path.read_text()) == {"a": 2}
    finally:
        os.umask(old)
