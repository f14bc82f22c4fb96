"""``kronopt bench``: a peer whose state cannot be read, bounds on ``--threads`` and on the parameter set's size, a
record written when nothing ran, and ``--compare`` on records it cannot read, of other configs under one name, and
of a ratio asked but not measured."""

import json
import sys
import types

import pytest

import kronopt
from kronopt.app import _args, bench, cli

TINY = ["--shapes", "8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]


class _NoState:
    """An optimizer with ``step()`` and no ``state``."""

    def __init__(self, params):
        self.params = list(params)

    def step(self):
        for p in self.params:
            p.data.add_(p.grad, alpha=-1e-3)


class _StateRaises(_NoState):
    """An optimizer whose ``state`` raises when read."""

    @property
    def state(self):
        raise RuntimeError("state unreadable")


@pytest.fixture
def odd_peers(monkeypatch):
    module = types.ModuleType("kronopt_test_odd_peers")
    module.NoState, module.StateRaises = _NoState, _StateRaises
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def test_a_peer_whose_state_cannot_be_read_keeps_its_times_and_the_others_rows(odd_peers, tmp_path, capsys):
    """It was timed, then reading its state raised after the run: a traceback, no table, no record."""
    path = tmp_path / "run.json"
    names = [f"{odd_peers}:NoState", f"{odd_peers}:StateRaises"]
    assert cli.main(["bench", "adamw", *names, *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in names:
        (line,) = [l for l in out.splitlines() if l.startswith(name)]
        assert line.split()[-2] == "-" and "failed" not in line  # state MiB, then faults MiB
    rows = {r["optimizer"]: r for r in json.loads(path.read_text())["results"]["rows"]}
    assert rows["adamw"]["state_bytes"] > 0 and all(rows[n]["state_bytes"] is None and rows[n]["mean_ms"] > 0 for n in names)


def test_threads_beyond_the_bound_are_an_argument_error(capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("ran"))
    assert cli.main(["bench", "adamw", *TINY[:-2], "--threads", "2147483648"]) == 2
    assert f"--threads: must be ≤ {_args.MAX_THREADS}, got 2147483648" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--shapes", "99999999999x99999999999"], ["--d", "1000000", "--layers", "1"]])
def test_a_parameter_set_beyond_the_machines_memory_is_refused_before_anything(flags, capsys, monkeypatch):
    """Both raised from the allocator midway (a storage size that overflows int64, 12 TB asked)."""
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("ran"))
    assert cli.main(["bench", "adamw", *flags, "--steps", "2", "--warmup", "1"]) == 2
    err = capsys.readouterr().err
    assert "copies of it" in err and "more than this machine's" in err and "Traceback" not in err


def test_the_memory_bound_counts_the_copies_against_the_machines_memory(monkeypatch):
    params = bench.ParamSet.of([(1000, 1000)])  # 4 MB of float32
    monkeypatch.setattr(bench.os, "sysconf", lambda key: {"SC_PHYS_PAGES": 7 * 4 * 10**6 // 4096 + 1, "SC_PAGE_SIZE": 4096}[key])
    assert bench._memory_problem(params, "cpu") is None  # seven copies fit
    monkeypatch.setattr(bench.os, "sysconf", lambda key: {"SC_PHYS_PAGES": 7 * 4 * 10**6 // 4096 - 1, "SC_PAGE_SIZE": 4096}[key])
    assert "7 copies" in bench._memory_problem(params, "cpu")
    assert bench._memory_problem(params, "cuda") is None  # two copies on the CPU where the work runs elsewhere
    assert "14 copies" in bench._memory_problem(params, "cuda", ranks=7)  # each rank its own


def test_a_record_is_written_when_every_optimizer_named_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench.peers, "unavailable", lambda name: "not installed (test)")
    path = tmp_path / "none.json"
    assert cli.main(["bench", "heavyball.SOAP", "heavyball.SOAP", *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("heavyball.SOAP: not installed (test)") == 1 and f"record written to {path}" in out
    data = json.loads(path.read_text())
    assert data["settings"]["missing"] == {"heavyball.SOAP": "not installed (test)"} and data["results"]["rows"] == []


def _record(rows, ratios=(), asked=(), configs=None):
    return {"format": "kronopt-bench/1", "time": "2026-12-06T00:00:00Z", "versions": {"torch": "2.13.0"},
            "machine": {}, "settings": {"optimizers": [r.get("optimizer") for r in rows if isinstance(r, dict)] if isinstance(rows, list) else [],
                                        "ratios": [list(p) for p in asked], "configs": configs or {}},
            "load_average": {}, "results": {"rows": rows, "ratios": list(ratios)}}


@pytest.mark.parametrize(
    "rows, ratios, what",
    [
        ([{"mean_ms": 1.0}], [], "KeyError"),
        (5, [], "TypeError"),
        ([{"optimizer": "a", "mean_ms": "x"}], [], "no number for mean_ms"),
        ([{"optimizer": "a", "mean_ms": 1.0}], [{"pair": ["a"], "ratio": 1.0}], "not a pair of two names"),
    ],
    ids=["a row without a name", "rows not a list", "a mean not a number", "a pair of one name"],
)
def test_compare_refuses_a_record_of_the_right_tag_and_a_broken_shape(rows, ratios, what, tmp_path, capsys):
    """Each raised from the comparison's own code (KeyError, TypeError, a format code, IndexError)."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_record([{"optimizer": "a", "mean_ms": 1.0, "median_ms": 1.0}])))
    bad.write_text(json.dumps(_record(rows, ratios)))
    assert cli.main(["bench", "--compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json' is not a well-formed kronopt bench record" in err and what in err and "Traceback" not in err


def test_compare_names_the_file_that_is_not_text(tmp_path, capsys):
    good, binary = tmp_path / "good.json", tmp_path / "binary.json"
    good.write_text(json.dumps(_record([{"optimizer": "a", "mean_ms": 1.0, "median_ms": 1.0}])))
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert cli.main(["bench", "--compare", str(good), str(binary)]) == 2
    assert "binary.json' is not a text file" in capsys.readouterr().err


def test_records_name_each_kronopt_optimizers_config_and_the_source(tmp_path, capsys):
    """One file name holding soap's config, then muon's: the comparison named no difference but the load."""
    config = tmp_path / "x.toml"
    paths = []
    for preset in ("soap", "muon"):
        config.write_text(kronopt.dumps(kronopt.resolve(preset)))
        paths.append(tmp_path / f"{preset}.json")
        assert cli.main(["bench", str(config), *TINY, "--json", str(paths[-1])]) == 0
    a, b = (json.loads(p.read_text()) for p in paths)
    assert a["versions"]["kronopt_source"] == b["versions"]["kronopt_source"] == bench._source_digest()
    assert a["settings"]["configs"][str(config)] == bench._config_digest("soap")
    assert bench.compare_records(a, b)["differences"][f"settings.configs.{config}"] == (
        bench._config_digest("soap"), bench._config_digest("muon")
    )


def test_compare_tells_a_ratio_asked_but_not_measured_from_one_not_asked():
    row = {"optimizer": "adamw", "mean_ms": 1.0, "median_ms": 1.0}
    a = _record([row], asked=[("heavyball.SOAP", "adamw")])  # its peer was not installed: no figure recorded
    b = _record([row], ratios=[{"pair": ["heavyball.SOAP", "adamw"], "ratio": 4.0}], asked=[("heavyball.SOAP", "adamw")])
    c = _record([row])
    assert [r["a_state"] for r in bench.compare_records(a, b)["ratios"]] == ["unmeasured"]
    assert [r["a_state"] for r in bench.compare_records(c, b)["ratios"]] == ["absent"]
    assert bench._ratio(None, "unmeasured").startswith("not measured")


def test_a_scaling_width_beyond_the_machines_memory_is_refused_before_anything(capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("ran"))
    assert cli.main(["bench", "adamw", *TINY, "--scaling", "16,3000000"]) == 2
    assert "--scaling: at d = 3000000: the parameter set holds" in capsys.readouterr().err
