"""Mends to ``kronopt bench`` a fuzz found (session 55): ``--world`` without an upper bound, ``--json`` over the
run's own inputs, ``--compare`` leaving out the ratios a record asked for and could not measure, a peer's
``sys.exit()`` ending the bench, a ``--world`` run of missing peers only writing a one-process record, hand-edited
records crashing ``--compare``, ``--alone``'s "no figure" for an optimizer a record never ran, and ``--model
missing_dir/`` said to be no ``module:factory``. Each test failed on the code before its mend."""

import json
import os

import pytest

from kronopt.app import bench, cli

TINY = ["--d", "16", "--layers", "1", "--steps", "3", "--warmup", "1", "--threads", "1"]


def _said(capsys) -> str:
    out = capsys.readouterr()
    return out.out + out.err


# --- 1. --world has an upper bound -----------------------------------------------------------------------------------


def test_world_past_the_bound_is_refused_with_every_size_named(capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_world", lambda *a, **k: pytest.fail("the run started"))
    assert cli.main(["bench", "adamw", *TINY, "--world", f"1,{bench._MAX_WORLD + 1},100000"]) == 2
    said = _said(capsys)
    assert "--world" in said and f"at most {bench._MAX_WORLD} ranks" in said and "100000" in said


def test_world_at_the_bound_is_accepted_by_the_checks():
    args = cli.build_parser().parse_args(["bench", "adamw", *TINY, "--world", str(bench._MAX_WORLD)])
    assert bench.check_bench(args).worlds == [bench._MAX_WORLD]


def test_the_memory_check_names_world_where_the_ranks_make_it_too_big(capsys, monkeypatch):
    """A set that one process holds easily, but 2 rank processes (each a torch process of its own) exceed a
    machine of 512 MiB: the problem is --world's, not --d's."""
    sizes = {"SC_PHYS_PAGES": 512 * 2**20 // 4096, "SC_PAGE_SIZE": 4096}
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: sizes[name] if name in sizes else real(name))
    monkeypatch.setattr(bench, "bench_world", lambda *a, **k: pytest.fail("the run started"))
    assert cli.main(["bench", "adamw", *TINY, "--world", "1,2"]) == 2
    said = _said(capsys)
    assert "--world: the parameter set" in said and "--d:" not in said and "rank processes" in said


# --- 2. --json never overwrites the run's inputs ---------------------------------------------------------------------


def test_json_refuses_the_config_file_the_run_benches(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.toml").write_text('preset = "adamw"\n')
    before = (tmp_path / "mine.toml").read_text()
    (tmp_path / "link.json").symlink_to(tmp_path / "mine.toml")
    for target in ("mine.toml", "./link.json", str(tmp_path / "sub" / ".." / "mine.toml")):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert cli.main(["bench", "mine.toml", *TINY, "--json", target]) == 2
        assert "--json" in _said(capsys)
    assert (tmp_path / "mine.toml").read_text() == before


def test_json_refuses_the_model_file_and_a_file_of_the_model_folder(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(4, 4)}, tmp_path / "sd.pt")
    (tmp_path / "m").mkdir()
    torch.save({"w": torch.zeros(4, 4)}, tmp_path / "m" / "pytorch_model.bin")
    small = ["--steps", "1", "--warmup", "0", "--threads", "1"]
    assert cli.main(["bench", "adamw", "--model", "sd.pt", *small, "--json", "sd.pt"]) == 2
    assert "--json" in _said(capsys)
    assert cli.main(["bench", "adamw", "--model", "m", *small, "--json", "m/pytorch_model.bin"]) == 2
    assert "--json" in _said(capsys)
    assert set(torch.load(tmp_path / "sd.pt")) == {"w"}  # untouched
    # a record beside the model, not one of its files, is fine
    assert cli.main(["bench", "adamw", "--model", "m", *small, "--json", "sd.pt"]) == 0


def test_json_refuses_a_link_in_the_model_folder_that_points_out_of_it(tmp_path, monkeypatch):
    """A Hugging Face cache's snapshot files are links into its ``blobs`` folder: ``--json <snapshot>/config.json``
    resolved to the blob, outside the snapshot folder, and would have overwritten the cached file."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_text("{}")
    snapshot = tmp_path / "snapshots" / "1"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(tmp_path / "blobs" / "abc")
    monkeypatch.setattr(bench, "_model_inputs", lambda spec: ([], [snapshot]))
    found = bench._json_input_problem(snapshot / "config.json", ["adamw"], "org/m")
    assert found is not None and "inside the folder --model org/m reads" in found
    assert bench._json_input_problem(tmp_path / "blobs" / "abc", ["adamw"], "org/m") is None  # not named as its file


# --- records written by hand -----------------------------------------------------------------------------------------


def _row(name, mean=1.0, **extra):
    return {"optimizer": name, "mean_ms": mean, "median_ms": mean, "state_bytes": 8, "runs": 1, "run_means": [mean],
            "failed": None, **extra}


def _record(optimizers, *, asked=(), ratios=None, worlds=(), alone=False, missing=None):
    """A record as ``kronopt bench --json`` writes it, of the figures the comparison reads."""
    settings = {"optimizers": list(optimizers), "missing": missing or {}, "ratios": [list(q) for q in asked],
                "worlds": list(worlds), "alone": alone}
    if worlds:
        results = {"world": [_row(n, world=w) for w in worlds for n in optimizers],
                   "ratios": ratios if ratios is not None else {str(w): [] for w in worlds}}
    else:
        results = {"rows": [_row(n) for n in optimizers], "ratios": ratios or [], "matrix_work": None, "scaling": []}
        if alone:
            results["matrix_work"] = {n: {"pair": [n, f"{n} alone"], "ratio": 2.0, "alone_ms": 0.5} for n in optimizers}
    return {"format": "kronopt-bench/1", "settings": settings, "results": results}


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


# --- 3. --compare lists the ratios asked and not measured ------------------------------------------------------------


def test_compare_lists_a_ratio_asked_and_not_measured_in_both(tmp_path, capsys):
    a = _record(["adamw"], asked=[("adamw", "heavyball.SOAP")], missing={"heavyball.SOAP": "not installed"})
    b = _record(["adamw"], asked=[("adamw", "heavyball.SOAP"), ("heavyball.SOAP", "adamw")])
    found = bench.compare_records(a, b)
    states = {r["pair"]: (r["a_state"], r["b_state"]) for r in found["ratios"]}
    assert states == {("adamw", "heavyball.SOAP"): ("unmeasured", "unmeasured"),
                      ("heavyball.SOAP", "adamw"): ("absent", "unmeasured")}
    assert cli.main(["bench", "--compare", _write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b)]) == 0
    said = _said(capsys)
    assert "adamw / heavyball.SOAP  A not measured" in said and "heavyball.SOAP / adamw  A not asked  B not measured" in said


def test_compare_lists_a_world_records_unmeasured_ratio_at_each_world_size():
    a = _record(["muon"], asked=[("muon", "heavyball.SOAP")], worlds=[1, 2])
    found = bench.compare_records(a, a)
    assert [(r["world"], r["pair"], r["a_state"]) for r in found["ratios"]] == [
        (1, ("muon", "heavyball.SOAP"), "unmeasured"), (2, ("muon", "heavyball.SOAP"), "unmeasured"),
    ]


def test_compare_reads_a_world_size_a_record_did_not_run_as_absent_not_unmeasured():
    """A record of world sizes 1 and 2 beside one of 1, 2 and 4, both asking the same pair: at 4 the first never ran
    (absent), where the state read only the pair and said "not measured"."""
    a = _record(["muon"], asked=[("muon", "heavyball.SOAP")], worlds=[1, 2])
    b = _record(["muon"], asked=[("muon", "heavyball.SOAP")], worlds=[1, 2, 4])
    found = bench.compare_records(a, b)
    assert [(r["world"], r["a_state"], r["b_state"]) for r in found["ratios"]] == [
        (1, "unmeasured", "unmeasured"), (2, "unmeasured", "unmeasured"), (4, "absent", "unmeasured"),
    ]


# --- 4. a peer's sys.exit() is its failure ---------------------------------------------------------------------------


@pytest.fixture
def exiting_peers(tmp_path, monkeypatch):
    (tmp_path / "exits55_step.py").write_text(
        "import torch\n"
        "class Exits(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        super().__init__(params, lr=1e-3)\n"
        "    def step(self, closure=None):\n"
        "        raise SystemExit(3)\n"
        "class ExitsBuilt(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        raise SystemExit('no')\n"
    )
    (tmp_path / "exits55_import.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("world", [False, True], ids=["one process", "world 1"])
def test_a_peer_that_exits_at_a_step_or_when_built_is_reported_failed_and_the_run_goes_on(exiting_peers, capsys, world):
    names = ["exits55_step:Exits", "exits55_step:ExitsBuilt", "adamw"]
    assert cli.main(["bench", *names, *TINY, *(["--world", "1"] if world else [])]) == 0
    said = _said(capsys)
    assert "failed at step 1: SystemExit: 3" in said and "failed when built: SystemExit: no" in said
    timed = [line.split() for line in said.splitlines() if "adamw" in line.split()]
    assert timed and all("failed" not in row for row in timed)  # the run went on and timed adamw


def test_a_peer_whose_import_exits_is_reported_missing(exiting_peers, capsys):
    assert cli.main(["bench", "exits55_import:X", "adamw", *TINY]) == 0
    said = _said(capsys)
    assert "exits55_import:X: cannot be imported" in said and "sys.exit(4)" in said


def test_keyboard_interrupt_of_a_peer_still_ends_the_bench(tmp_path, monkeypatch):
    (tmp_path / "stops55.py").write_text(
        "import torch\n"
        "class Stops(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        super().__init__(params, lr=1e-3)\n"
        "    def step(self, closure=None):\n"
        "        raise KeyboardInterrupt\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # not taken for the peer's failure (its row "failed" and the bench going on): the command ends, interrupted
    assert cli.main(["bench", "stops55:Stops", *TINY]) == 130


# --- 5. a --world run of missing peers only is a --world record ------------------------------------------------------


def test_a_world_run_of_missing_peers_writes_a_world_record_and_prints_the_ratios(tmp_path, capsys):
    path = tmp_path / "w.json"
    args = ["bench", "nosuch55_a:X", "nosuch55_b:Y", *TINY, "--world", "1,2", "--ratio", "nosuch55_a:X/nosuch55_b:Y"]
    assert cli.main([*args, "--json", str(path)]) == 0
    said = _said(capsys)
    assert said.count("not measured") == 2 and "at world 2" in said
    data = bench.read_record(path)
    assert data["results"]["world"] == [] and data["results"]["ratios"] == {"1": [], "2": []}
    # it pairs with a --world record, not with a one-process one
    other = _write(tmp_path / "o.json", _record(["adamw"], worlds=[1, 2]))
    assert cli.main(["bench", "--compare", str(path), other]) == 0
    assert "world 2: nosuch55_a:X / nosuch55_b:Y  A not measured" in _said(capsys)
    single = _write(tmp_path / "s.json", _record(["adamw"]))
    assert cli.main(["bench", "--compare", str(path), single]) == 2


def test_a_one_process_run_of_missing_peers_prints_its_ratios(capsys):
    assert cli.main(["bench", "nosuch55_a:X", "nosuch55_b:Y", *TINY, "--ratio", "nosuch55_a:X/nosuch55_b:Y"]) == 0
    assert "nosuch55_a:X / nosuch55_b:Y  not measured" in _said(capsys)


# --- 6. a hand-edited record is refused, naming what is wrong --------------------------------------------------------


def _full():
    data = _record(["adamw", "soap"], asked=[("soap", "adamw")], alone=True)
    data["results"]["ratios"] = [{"pair": ["soap", "adamw"], "ratio": 2.0, "range": [2.0, 2.0], "runs": 1, "failed": []}]
    data["results"]["scaling"] = [{
        "d": 8, "rows": [_row("adamw"), _row("soap", 3.0)], "alone": {"soap": 0.5},
        "matrix_work": {"adamw": None, "soap": {"pair": ["soap", "soap alone"], "ratio": 6.0, "alone_ms": 0.5}},
    }]
    return data


def _scaled(key, value):
    return lambda d: d["results"]["scaling"][0].__setitem__(key, value)


MUTATIONS = {
    "optimizers an int": (lambda d: d["settings"].__setitem__("optimizers", 5), "settings.optimizers"),
    "optimizers holding a dict": (lambda d: d["settings"].__setitem__("optimizers", [1, {}]), "settings.optimizers"),
    "a pair of ints": (lambda d: d["results"].__setitem__("ratios", [{"pair": [1, 2], "ratio": 1.0}]), "--ratio"),
    "a matrix_work string": (lambda d: d["results"].__setitem__("matrix_work", {"soap": "x"}), "matrix_work"),
    "a matrix_work ratio string": (
        lambda d: d["results"].__setitem__("matrix_work", {"soap": {"ratio": "x", "alone_ms": 1}}), "ratio"),
    "a scaling matrix_work string": (_scaled("matrix_work", {"soap": "x"}), "matrix_work at d = 8"),
    "a scaling matrix_work ratio string": (_scaled("matrix_work", {"soap": {"ratio": "x"}}), "matrix_work at d = 8"),
    "a scaling d string": (_scaled("d", "big"), "width d"),
    "a scaling d null": (_scaled("d", None), "width d"),
    "a row with a world": (lambda d: d["results"]["rows"][0].__setitem__("world", "x"), "world size"),
    "asked ratios an int": (lambda d: d["settings"].__setitem__("ratios", 7), "settings.ratios"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_an_edited_record_is_refused_naming_what_is_wrong(tmp_path, capsys, name):
    mutate, named = MUTATIONS[name]
    good = _write(tmp_path / "good.json", _full())
    bench.read_record(tmp_path / "good.json")
    data = _full()
    mutate(data)
    bad = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match="not a well-formed kronopt bench record") as info:
        bench.read_record(tmp_path / "bad.json")
    assert named in str(info.value)
    for order in ((good, bad), (bad, good)):
        assert cli.main(["bench", "--compare", *order]) == 2
        assert "not a well-formed" in _said(capsys)


@pytest.mark.parametrize("world", [None, "two", 2.5, True])
def test_a_world_row_without_a_whole_world_size_is_refused(tmp_path, world):
    data = _record(["muon"], worlds=[2])
    data["results"]["world"][0]["world"] = world
    with pytest.raises(ValueError, match="without a world size"):
        bench.read_record(_write(tmp_path / "w.json", data))


# --- 7. --alone: "not run" for an optimizer the record did not time --------------------------------------------------


def test_compare_alone_says_not_run_for_an_optimizer_the_record_did_not_time(tmp_path, capsys):
    a = _record(["soap", "shampoo"], alone=True)
    b = _record(["soap", "adamw"], alone=True)
    b["results"]["matrix_work"]["adamw"] = None
    assert cli.main(["bench", "--compare", _write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b)]) == 0
    lines = {line.split()[0]: line for line in _said(capsys).split("matrix work alone")[-1].splitlines()[1:] if line}
    assert "B not run" in lines["shampoo"] and "A not run" in lines["adamw"] and "B no figure" in lines["adamw"]


# --- 8. --model of a missing path says so ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nonexist55_dir/", "nonexist55_dir/sub/", "a/b/c55", "nets55.py", "weights55.json"])
def test_a_missing_path_given_to_model_is_said_to_be_missing(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=f"no file or folder '{spec}'"):
        bench.model_params(spec)
