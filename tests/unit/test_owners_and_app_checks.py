"""The blocks' owners taken from a rank's state dict, and two checks of the applications; each test failed on
the code before its fix.

* The owners a load takes are checked (a rank outside the world was taken, and the block then belonged to no
  rank), the ranks' assigned cost is recounted from them (a group added after the resume was balanced against
  the construction's split), and a load refused late (in torch's own ``load_state_dict``) keeps the owners.
* A default ``kronopt train`` directory under a dangling ``runs`` link stops (it looped forever), and an
  ablation's ``[tune] seeds`` past the generators are refused when the file is read.
"""

import multiprocessing
import os
import queue
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import kronopt
from kronopt import distributed as kdist
from kronopt.app import ablate, train as train_mod

# -- train: default run directories (_fresh_dir) ------------------------------------------------------------


def test_fresh_dir_under_a_dangling_runs_symlink_stops(tmp_path, monkeypatch):
    (tmp_path / "runs").symlink_to(tmp_path / "nowhere")
    calls = {"n": 0}
    mkdir = Path.mkdir

    class Looping(Exception):
        pass

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 200:
            raise Looping(f"{calls['n']} mkdir calls, the last of {self}")
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", counted)
    try:
        out = train_mod._fresh_dir(tmp_path / "runs" / "train-soap-20260101-000000")
    except Looping:
        raise
    except OSError:
        return  # refused with an error: fine
    assert out.is_dir()


# -- ablate: [tune] seeds past the generators ---------------------------------------------------------------


def test_tune_seeds_past_max_seed_are_refused_when_parsed():
    errors: list = []
    ablate.parse_tune({"seeds": [train_mod.MAX_SEED + 1]}, errors)
    assert errors, "tune.seeds accepted a seed TaskConfig refuses"


# -- optimizer: owners adopted from a rank's own state dict (2 gloo ranks) ---------------------------------

SHAPES_A = [(9, 9), (9, 9), (5, 9), (8, 6)]
SHAPES_B = [(12, 12), (7, 7)]
SHAPES_C = [(10, 10), (6, 6), (3, 3)]
CFG = {"state_dtype": "float64"}


def _params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in shapes]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _steps(opt, params, first, last):
    for k in range(first, last):
        gen = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()


def _plan_owners(opt):
    return {id(p): r for b in opt._buckets if b.plan is not None for p, r in zip(b.plan.params, b.plan.owners)}


def _actual_loads(opt, world):
    loads = [0] * world
    for b in opt._buckets:
        for r in () if b.plan is None else b.plan.owners:
            loads[r] += kdist.block_cost(b.layout)
    return loads


def _saved_after_add_param_group():
    """Group A at construction, B by add_param_group after 2 steps, saved after 4: the rank's own dict."""
    A, B = _params(SHAPES_A, 0), _params(SHAPES_B, 1)
    opt = kronopt.build(A, "soap", **CFG)
    _steps(opt, A, 0, 2)
    opt.add_param_group({"params": B})
    _steps(opt, A + B, 2, 4)
    return A, B, opt, opt.state_dict()


def _together(A, B):
    A2, B2 = _clone(A), _clone(B)
    return A2, B2, kronopt.build([{"params": A2}, {"params": B2}], "soap", **CFG)


def _job(rank, world):
    out = {}
    A, B, opt, sd = _saved_after_add_param_group()
    C = _params(SHAPES_C, 2)

    # the resumed optimizer's balance (loads) and the next group's owners, against the uninterrupted run's
    A2, B2, opt2 = _together(A, B)
    opt2.load_state_dict(sd)
    out["loads_recorded"], out["loads_actual"] = list(opt2._loads), _actual_loads(opt2, world)
    C2 = _clone(C)
    opt.add_param_group({"params": C})
    opt2.add_param_group({"params": C2})
    out["C_owners"] = ([opt._owner[id(p)] for p in C], [opt2._owner[id(p)] for p in C2])

    # saved owners out of range: refused, or taken?
    A3, B3, opt3 = _together(A, B)
    bad = dict(sd, kronopt={**sd["kronopt"], "owners": {"world_size": world, "ranks": [5] + sd["kronopt"]["owners"]["ranks"][1:]}})
    try:
        opt3.load_state_dict(bad)
        out["out_of_range"] = "loaded"
    except ValueError as exc:
        out["out_of_range"] = f"refused: {exc}"

    # a load that fails after the owners' try block (torch's deepcopy of the saved groups)
    A4, B4, opt4 = _together(A, B)
    before = dict(opt4._owner)
    groups = [dict(g) for g in sd["param_groups"]]
    groups[0]["note"] = (x for x in ())  # not deepcopy-able: passes kronopt's checks, fails in torch's load
    try:
        opt4.load_state_dict(dict(sd, param_groups=groups))
        out["late_failure"] = None
    except TypeError:
        plans = _plan_owners(opt4)
        out["late_failure"] = {"owner_unchanged": opt4._owner == before,
                               "owner_matches_plans": all(opt4._owner[k] == r for k, r in plans.items())}
    return out


def _entry(rank, world, store, results):
    torch.set_num_threads(1)
    # a store file, not a port found free beforehand (another process could take it before rank 0 binds it)
    dist.init_process_group("gloo", init_method=Path(store).resolve().as_uri(), rank=rank, world_size=world)
    try:
        results.put((rank, _job(rank, world), None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()) or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs torch.distributed with gloo and forked processes")
    store = tmp_path_factory.mktemp("owners") / "store"
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, 2, str(store), results)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            rank, value, error = results.get(timeout=60)
            assert error is None, f"rank {rank}:\n{error}"
            out[rank] = value
    except queue.Empty:
        pytest.fail("the ranks did not answer within 60 s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(2)]


def test_adopted_owners_keep_the_loads_and_the_next_groups_owners_of_the_saved_run(ranks):
    for r, res in enumerate(ranks):
        assert res["loads_recorded"] == res["loads_actual"], f"rank {r}: {res['loads_recorded']} vs {res['loads_actual']}"
        original, resumed = res["C_owners"]
        assert resumed == original, f"rank {r}: the added group's owners {resumed}, the uninterrupted run's {original}"


def test_saved_owners_outside_the_world_are_refused(ranks):
    for r, res in enumerate(ranks):
        assert res["out_of_range"].startswith("refused"), f"rank {r}: {res['out_of_range']}"


def test_a_load_refused_after_the_owners_try_block_leaves_the_owners_as_they_were(ranks):
    for r, res in enumerate(ranks):
        late = res["late_failure"]
        assert late is not None, f"rank {r}: the load did not fail"
        assert late["owner_unchanged"] and late["owner_matches_plans"], f"rank {r}: {late}"
