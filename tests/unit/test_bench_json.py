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
    # the real file back before the cache is cleared: a reading of the test's processor left cached (by the checks
    # below) made later tests take another processor's paths
    with monkeypatch.context() as patch:
        patch.setattr(linalg, "_CPUINFO", str(info))
        linalg._processor.cache_clear()
        try:
            data = bench.record(plan, {}, threads=1, load=(0.5, None), retained=False)
        finally:
            patch.undo()
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


# -- --compare A.json B.json ---------------------------------------------------------------------------------


def _record(means, ratios=(), *, world=False, threads=2, load=(0.5, 1.0)):
    """A stand-in record as ``--json`` writes one: ``means`` by optimizer (or by ``(world, optimizer)``)."""
    key = "world" if world else "rows"
    rows = [{**({"world": k[0], "optimizer": k[1]} if world else {"optimizer": k}), "mean_ms": m, "median_ms": m / 2}
            for k, m in means.items()]
    found = {"1": [{"pair": list(p), "ratio": r} for p, r in ratios]} if world else [{"pair": list(p), "ratio": r} for p, r in ratios]
    return {"format": "kronopt-bench/1", "time": "2026-12-05T00:00:00Z", "versions": {"torch": "2.13.0"},
            "machine": {"processor": "Test CPU"}, "settings": {"threads": threads, "optimizers": list(dict.fromkeys(k[1] if world else k for k in means))},
            "load_average": {"start": load[0], "end": load[1]}, "results": {key: rows, "ratios": found}}


def test_two_records_side_by_side():
    """Every optimizer of either record, B's mean over A's (none where one lacks it), each record's ratios, and what
    differs: fails on rows matched by position instead of name, the ratio taken the other way, or a difference missed."""
    a = _record({"soap": 100.0, "adamw": 4.0}, [(("soap", "adamw"), 25.0)])
    b = _record({"adamw": 5.0, "soap": 80.0, "muon": 30.0}, [(("soap", "adamw"), 16.0), (("muon", "adamw"), 6.0)],
                threads=1, load=(0.5, 3.0))
    found = bench.compare_records(a, b)
    rows = {r["optimizer"]: r for r in found["rows"]}
    assert list(rows) == ["soap", "adamw", "muon"]
    assert rows["soap"]["b_over_a"] == 0.8 and rows["adamw"]["b_over_a"] == 1.25 and rows["muon"]["b_over_a"] is None
    assert (rows["soap"]["a_median_ms"], rows["soap"]["b_median_ms"]) == (50.0, 40.0)
    assert [(r["pair"], r["a"], r["b"]) for r in found["ratios"]] == [(("soap", "adamw"), 25.0, 16.0), (("muon", "adamw"), None, 6.0)]
    assert found["differences"]["settings.threads"] == (2, 1) and found["differences"]["load_average.end"] == (1.0, 3.0)
    assert "load_average.start" not in found["differences"] and "versions.torch" not in found["differences"]


def test_compare_through_the_cli_reads_world_records_and_keeps_the_optimizers_named(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_record({(1, "soap"): 10.0, (2, "soap"): 6.0, (2, "adamw"): 3.0}, [(("soap", "adamw"), 2.0)], world=True)))
    b.write_text(json.dumps(_record({(1, "soap"): 12.0, (2, "soap"): 9.0, (2, "adamw"): 3.0}, [(("soap", "adamw"), 3.0)], world=True)))
    assert cli.main(["bench", "soap", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["1", "soap", "10.000", "12.000", "1.200", "5.000", "6.000"] in lines
    assert ["2", "soap", "6.000", "9.000", "1.500", "3.000", "4.500"] in lines
    assert not any(line[1:2] == ["adamw"] for line in lines) and "world 1: soap / adamw" not in out  # adamw not named
    assert "settings.threads" not in out and "differ" not in out
    assert cli.main(["bench", "--compare", str(a), str(b)]) == 0
    assert "world 1: soap / adamw  A 2.000  B 3.000" in capsys.readouterr().out


def test_a_record_compared_with_itself_reads_one(tmp_path, capsys):
    path = tmp_path / "run.json"
    assert cli.main(["bench", "adamw", "soap", *TINY, "--ratio", "soap/adamw", "--json", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["bench", "--compare", str(path), str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["adamw"], ["soap"]) and " / " not in line}
    assert rows["adamw"][3] == rows["soap"][3] == "1.000" and "differ" not in out
    assert re.search(r"^soap / adamw +A (\d\.\d{3})  B \1$", out, flags=re.M), out


def _scaling_entry(d, means, work):
    """A stand-in ``--scaling`` entry as ``--json`` writes one: ``means`` and ``work`` (step over matrix work) by optimizer."""
    return {"d": d, "rows": [{"optimizer": n, "mean_ms": m, "median_ms": m / 2} for n, m in means.items()],
            "matrix_work": {n: {"pair": [n, f"{n} alone"], "ratio": w} for n, w in work.items()}}


def test_compare_sets_the_scaling_and_matrix_work_tables_side_by_side(tmp_path, capsys):
    """Each width's rows matched by width and name (not by position), B over A, each record's step over its matrix
    work at that width (not the other record's, nor another width's); the ``--alone`` figures by name, with the
    work's mean; one a record lacks is not asked. Fails on a width or optimizer paired by position, the work ratio
    taken from the other record or width, or a table left out of the printout."""
    a = _record({"soap": 10.0})
    a["settings"].update(optimizers=["soap", "dykaf"], alone=True)
    a["results"]["scaling"] = [_scaling_entry(512, {"soap": 200.0, "dykaf": 250.0}, {"soap": 1.11, "dykaf": 1.18}),
                               _scaling_entry(1024, {"soap": 1800.0}, {"soap": 1.08})]
    a["results"]["matrix_work"] = {"soap": {"pair": ["soap", "soap alone"], "ratio": 1.3, "alone_ms": 7.5}, "adamw": None}
    b = _record({"soap": 12.0})
    b["results"]["scaling"] = [_scaling_entry(1024, {"soap": 1500.0}, {"soap": 1.02}),
                               _scaling_entry(768, {"soap": 900.0}, {"soap": 1.1}),
                               _scaling_entry(512, {"dykaf": 300.0, "soap": 160.0}, {"dykaf": 1.25, "soap": 1.05})]
    found = bench.compare_records(a, b)
    rows = {(r["d"], r["optimizer"]): r for r in found["scaling"]}
    assert list(rows) == [(512, "soap"), (512, "dykaf"), (768, "soap"), (1024, "soap")]  # by width, a width B alone has too
    assert rows[(512, "soap")]["b_over_a"] == 0.8 and rows[(512, "dykaf")]["b_over_a"] == 1.2
    assert rows[(1024, "soap")]["b_over_a"] == pytest.approx(1500 / 1800) and rows[(768, "soap")]["a_state"] == "absent"
    assert [(rows[k]["a_work"], rows[k]["b_work"]) for k in rows] == [(1.11, 1.05), (1.18, 1.25), (None, 1.1), (1.08, 1.02)]
    assert found["matrix_work"] == [
        {"optimizer": "soap", "a": 1.3, "b": None, "a_alone_ms": 7.5, "b_alone_ms": None, "a_state": None, "b_state": "absent"},
        {"optimizer": "adamw", "a": None, "b": None, "a_alone_ms": None, "b_alone_ms": None, "a_state": "none",
         "b_state": "absent"},
    ]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert cli.main(["bench", "dykaf", "--compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +512 dykaf +250\.000 +300\.000 +1\.200 +125\.000 +150\.000 +1\.180 +1\.250$", out, flags=re.M), out
    assert not re.search(r"^ +(512|1024) soap", out, flags=re.M)  # the optimizers named keep only their rows
    assert not re.search(r"^soap +A ", out, flags=re.M)  # in the --alone table too
    assert cli.main(["bench", "--compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +1024 soap +1800\.000 +1500\.000 +0\.833 +900\.000 +750\.000 +1\.080 +1\.020$", out, flags=re.M), out
    assert re.search(r"^soap   A 1\.300 \(the work 7\.500 ms\)  B not asked$", out, flags=re.M), out
    assert re.search(r"^adamw  A no figure  B not asked$", out, flags=re.M), out


def test_a_scaling_record_compared_with_itself_reads_one(tmp_path, capsys):
    path = tmp_path / "run.json"
    assert cli.main(["bench", "soap", *TINY, "--scaling", "8,16", "--json", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["bench", "--compare", str(path), str(path)]) == 0
    out = capsys.readouterr().out
    widths = [line.split() for line in out.splitlines() if line.split()[:2] in (["8", "soap"], ["16", "soap"])]
    assert len(widths) == 2 and all(w[4] == "1.000" and w[7] == w[8] for w in widths), out


def test_compare_refuses_run_flags_and_bad_records_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("ran"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else"}))
    args = ["bench", "--compare", str(tmp_path / "missing.json"), str(other), "--steps", "3", "--world", "2", "--json", str(tmp_path / "x.json")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    for flag in ("--steps", "--world", "--json"):
        assert f"{flag}: sets a run; --compare reads two records and runs nothing" in err
    assert "cannot read" in err and "is not a kronopt bench record" in err


def test_compare_says_which_optimizer_failed_and_which_was_not_run(tmp_path, capsys):
    """A failed optimizer (its row and its pair have no figure) reads otherwise than one the record never timed."""
    a = _record({"soap": 10.0, "adamw": 2.0, "peer": 4.0}, [(("soap", "adamw"), 5.0), (("peer", "adamw"), 2.0)])
    b = _record({"soap": 12.0, "adamw": 2.0}, [(("peer", "adamw"), None)])
    b["results"]["rows"].append({"optimizer": "peer", "mean_ms": None, "median_ms": None, "failed": {"step": 3, "error": "boom"}})
    b["results"]["ratios"][0]["failed"] = ["peer"]
    del a["results"]["rows"][1]  # adamw not run in A
    b["settings"]["optimizers"].append("peer")
    found = bench.compare_records(a, b)
    rows = {r["optimizer"]: r for r in found["rows"]}
    assert (rows["peer"]["a_state"], rows["peer"]["b_state"]) == (None, "failed") and rows["adamw"]["a_state"] == "absent"
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (a, b)):
        path.write_text(json.dumps(data))
    assert cli.main(["bench", "--compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip() and " / " not in line}
    assert lines["peer"][1:] == ["4.000", "failed", "-", "2.000", "failed"] and lines["adamw"][1:3] == ["not", "run"]
    assert re.search(r"^peer / adamw +A 2\.000  B no figure \(failed\)$", out, flags=re.M), out
    assert re.search(r"^soap / adamw +A 5\.000  B not asked$", out, flags=re.M), out


def test_compare_refuses_a_world_record_beside_a_one_process_one_and_a_name_in_neither(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_record({"soap": 1.0})))
    b.write_text(json.dumps(_record({(1, "soap"): 1.0}, world=True)))
    assert cli.main(["bench", "sop", "--compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "A is a one-process record, B a --world record: their rows do not pair up" in err
    assert "sop: is in neither record" in err


def test_compare_refuses_every_flag_that_sets_a_run():
    """``_RUN_FLAGS`` names every option of the bench parser but ``--compare`` itself, each defaulting to ``None`` (a
    switch to ``False``): a flag added to the parser later is refused under ``--compare`` (or this fails), not silently
    ignored, and a flag given at its default value is told from one not given."""
    parser = cli.build_parser()
    bench_parser = next(a for a in parser._subparsers._group_actions if a.choices).choices["bench"]
    options = {a.dest: a.default for a in bench_parser._actions if a.option_strings and a.dest != "help"}
    assert set(options) - {"compare"} == set(bench._RUN_FLAGS)
    assert all(options[k] in (None, False) for k in bench._RUN_FLAGS)


@pytest.mark.parametrize(
    "flags", [["--steps", "30"], ["--warmup", "12"], ["--threads", "0"], ["--seed", "0"], ["--repeat", "1"],
              ["--memory", "0"]],
)
def test_compare_refuses_a_run_flag_given_at_its_default_value(tmp_path, capsys, flags):
    """``--steps 30`` sets a run as much as ``--steps 31`` does: refused under ``--compare``, though 30 is the default."""
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_record({"soap": 1.0})))
    assert cli.main(["bench", "--compare", str(a), str(a), *flags]) == 2
    assert f"{flags[0]}: sets a run; --compare reads two records and runs nothing" in capsys.readouterr().err


def test_the_counts_take_their_defaults_where_not_given():
    """The counts whose flags default to ``None`` take the defaults the help names (a run that gives none steps 30
    timed steps after 12, seed 0, one run, no memory rounds, torch's threads)."""
    plan = bench.check_bench(cli.build_parser().parse_args(["bench", "adamw", "--device", "cpu"]))
    assert plan.counts == {"steps": 30, "warmup": 12, "threads": 0, "seed": 0, "repeat": 1}
    assert plan.memory_steps == 0
