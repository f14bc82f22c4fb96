"""Edges of ``kronopt bench --model FOLDER`` on a ``torch.distributed.checkpoint`` saved without rank coordination
(``use_collectives=False``: one ``__<rank>.metadata`` a rank), and of the norm statistics left out of a
checkpoint's parameters. A review's tests: "WRONG:" ones failed on the code reviewed (mended since), "OK:" ones
pin what was checked and found right.

Most ranks' files are made here in one process: ``dcp.save(..., use_collectives=False)`` without a process group
writes rank 0's ``__0.metadata``, copied under another rank's name (the bench reads no more of a rank's file than
its tensors' records, which do not name the rank). One test spawns two gloo ranks (FSDP2, an empty shard)."""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kronopt.app import bench

from ..torch_compat import needs_dcp_without_collectives

dcp = pytest.importorskip("torch.distributed.checkpoint")

pytestmark = needs_dcp_without_collectives

#: the names and shapes of ``_model_state()``, written out by hand
NAMES_AND_SHAPES = [("embed.weight", (10, 4)), ("block.weight", (6, 4)), ("block.bias", (6,))]


def _model_state() -> dict[str, torch.Tensor]:
    return {"embed.weight": torch.zeros(10, 4), "block.weight": torch.zeros(6, 4), "block.bias": torch.zeros(6)}


def _rank_file(state, folder: Path, rank: int, name: str | None = None) -> Path:
    """``state`` saved by DCP without rank coordination, its ``__0.metadata`` put in ``folder`` as rank ``rank``'s
    (or under ``name``)."""
    scratch = folder.parent / f"{folder.name}-scratch-{rank}-{name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP assumes a single process
        dcp.save(state, checkpoint_id=str(scratch), use_collectives=False)
    folder.mkdir(exist_ok=True)
    target = folder / (name or f"__{rank}.metadata")
    shutil.copyfile(scratch / "__0.metadata", target)
    return target


def _names_and_shapes(params):
    return list(zip(params.names, params.shapes))


# -- WRONG ---------------------------------------------------------------------------------------------------------


def test_a_bad_rank_file_is_named_in_the_error(tmp_path):
    """WRONG: a folder whose ``__0.metadata`` is sound and whose ``__1.metadata`` is not DCP's metadata (or is cut
    or garbage) is refused with "'…/__0.metadata' cannot be read as a checkpoint (not the metadata of a
    torch.distributed.checkpoint)": checkpoint_params names the path it was handed (the lowest rank's), not the
    rank file that failed, so the user is sent to a sound file. The error should name ``__1.metadata``."""
    folder = tmp_path / "ck"
    _rank_file({"model": _model_state()}, folder, 0)
    (folder / "__1.metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"__1\.metadata"):
        bench.model_params(str(folder))
    (folder / "__1.metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=r"__1\.metadata"):
        bench.model_params(str(folder))


def test_a_name_torch_never_writes_is_not_a_rank_file(tmp_path):
    """WRONG: torch writes and reads a rank's metadata as ``f"__{rank}.metadata"`` (filesystem.py
    ``_get_metadata_path``): no leading zero, ASCII digits. ``_RANK_METADATA`` (``__(\\d+)\\.metadata``, ``\\d`` any
    Unicode digit) takes ``__01.metadata`` and ``__١.metadata`` (an Arabic-Indic one) for rank 1 too, so the bench
    merges a file no torch save wrote and no torch load reads, and beside a real ``__1.metadata`` the dict by
    ``int(rank)`` keeps one of the two by directory order. Only ``__(0|[1-9][0-9]*)\\.metadata`` (ASCII) should
    count."""
    folder = tmp_path / "ck"
    _rank_file({"model": _model_state()}, folder, 0)
    _rank_file({"model": {"copy.weight": torch.zeros(7, 7)}}, folder, 1, name="__01.metadata")
    _rank_file({"model": {"other.weight": torch.zeros(5, 5)}}, folder, 1, name="__\u0661.metadata")
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


def test_ranks_that_disagree_on_a_tensor_the_bench_does_not_read_do_not_block_it(tmp_path):
    """WRONG: the ranks' files are merged, and checked for disagreement, over every tensor of the save, before the
    model's entry is chosen and integer tensors dropped; so a rank-local tensor of a rank-dependent size outside
    the model (a sampler's remaining indices, a per-rank loss history) refuses the whole checkpoint, though
    ``dcp.load`` reads it (each rank its own file) and the model's tensors agree. The check should cover the
    tensors the bench returns (the chosen entry's floating ones), or only refuse when those disagree."""
    folder = tmp_path / "ck"
    for rank in (0, 1):
        _rank_file({"model": _model_state(), "loader": {"order": torch.arange(5 + rank)},
                    "metrics": {"losses": torch.zeros(3 + rank)}}, folder, rank)
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES
    assert params.source == "checkpoint ck/__*.metadata of 2 ranks, its 'model' entry"


def test_a_metadata_file_named_in_another_case_is_read_itself(tmp_path):
    """WRONG (a regression): checkpoint_params matches a name's ending in any case, as its docstring says;
    ``_file_entries`` lowercases the name and sends ``.METADATA`` to ``_dcp_entries``, which now tests
    ``path.name == ".metadata"`` case-sensitively and so reads the folder's rank files instead (none here): "holds
    no floating tensor to step", where before this change the file named was read. ``_dcp_entries`` should read the
    file it was handed when its lowercased name is ``.metadata`` (and a ``__N.METADATA``'s folder by the same
    rule)."""
    folder = tmp_path / "upper"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": _model_state()}, checkpoint_id=str(tmp_path / "plain"))
    shutil.copyfile(tmp_path / "plain" / ".metadata", folder / ".METADATA")
    params = bench.checkpoint_params(folder / ".METADATA")
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


def test_the_source_line_names_the_folder_when_run_inside_it(tmp_path, monkeypatch):
    """WRONG (minor): ``kronopt bench --model .`` in a DCP folder (or ``--model __0.metadata``) says "checkpoint
    /__*.metadata" (and "/.metadata" for a coordinated save), as if the files were at the file system's root: the
    label is ``path.parent.name``, which is "" for a relative path of one part. It should name the folder
    (``path.absolute().parent.name``)."""
    folder = tmp_path / "ck"
    _rank_file({"model": _model_state()}, folder, 0)
    monkeypatch.chdir(folder)
    for spec in (".", "__0.metadata"):
        assert bench.model_params(spec).source == "checkpoint ck/__*.metadata of 1 rank, its 'model' entry"


# -- OK ------------------------------------------------------------------------------------------------------------


def test_a_save_in_progress_leaves_tmp_files_that_are_not_read(tmp_path):
    """OK: DCP writes ``__<rank>.metadata.tmp`` (``.metadata.tmp`` when coordinated) and renames it when done; a
    rank's unfinished file, or a coordinated save's leftover, is not read, and a folder holding only tmp files
    is no DCP folder."""
    folder = tmp_path / "ck"
    _rank_file({"model": _model_state()}, folder, 0)
    (folder / "__1.metadata.tmp").write_bytes(b"\x80\x04cut")
    (folder / ".metadata.tmp").write_bytes(b"\x80\x04cut")
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES
    assert params.source == "checkpoint ck/__*.metadata of 1 rank, its 'model' entry"
    only_tmp = tmp_path / "tmp_only"
    only_tmp.mkdir()
    (only_tmp / "__0.metadata.tmp").write_bytes(b"\x80\x04cut")
    with pytest.raises(ValueError, match="holds no checkpoint file"):
        bench.model_params(str(only_tmp))


def test_ranks_are_ordered_by_number_and_rank_0_may_be_missing(tmp_path):
    """OK: ranks 2 and 10 (no rank 0: its file not there yet, or that rank saved elsewhere) are read, rank 2's
    tensors first (by number, not by name: "__10" sorts before "__2")."""
    folder = tmp_path / "ck"
    _rank_file({"model": {**_model_state(), "two.weight": torch.zeros(2, 2)}}, folder, 2)
    _rank_file({"model": {**_model_state(), "ten.weight": torch.zeros(3, 3)}}, folder, 10)
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == [*NAMES_AND_SHAPES, ("two.weight", (2, 2)), ("ten.weight", (3, 3))]


def test_a_hostile_rank_file_beside_a_sound_one_is_refused_unmade(tmp_path):
    """OK: every rank's file goes through the allow-list unpickler, not only the lowest rank's."""

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "made"), "w"))

    folder = tmp_path / "ck"
    _rank_file({"model": _model_state()}, folder, 0)
    (folder / "__1.metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"UnpicklingError: it names io.open"):
        bench.model_params(str(folder))
    assert not (tmp_path / "made").exists()


def test_a_global_metadata_wins_over_rank_files_as_torch_load_reads_it(tmp_path):
    """OK: ``dcp.load`` reads ``.metadata`` where there is one and falls back to the rank's own file
    (state_dict_loader.py); the folder route does too, even where the rank files are of a later save (both read
    the coordinated save's)."""
    folder = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": _model_state()}, checkpoint_id=str(folder))
    _rank_file({"model": {"later.weight": torch.zeros(4, 4)}}, folder, 0)
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES
    assert params.source == "checkpoint ck/.metadata, its 'model' entry"


def test_norm_statistics_in_a_dcp_save_and_a_safetensors_file(tmp_path):
    """OK: a batch norm's running statistics (bf16 too) are left out and counted, its integer counter among the
    other tensors, whatever the checkpoint's kind."""
    bn = nn.BatchNorm1d(3).to(torch.bfloat16)
    state = {**_model_state(), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}
    folder = tmp_path / "ck"
    _rank_file({"model": state}, folder, 0)
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == [*NAMES_AND_SHAPES, ("bn.weight", (3,)), ("bn.bias", (3,))]
    expected = (
        "checkpoint ck/__*.metadata of 1 rank, its 'model' entry, 2 norm statistics left out, 1 other tensors left out"
    )
    assert params.source == expected
    header = {k: {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[v.dtype],
                  "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in state.items()}
    text = json.dumps(header).encode()  # a header alone: the bench reads no tensor's data
    (tmp_path / "m.safetensors").write_bytes(len(text).to_bytes(8, "little") + text)
    params = bench.model_params(str(tmp_path / "m.safetensors"))
    assert params.source == "checkpoint m.safetensors, 2 norm statistics left out, 1 other tensors left out"


# -- two ranks -----------------------------------------------------------------------------------------------------


def job_save(rank, world, where):
    """FSDP2 over a model whose 1-row tensors leave rank 1 an empty shard, with a batch norm; saved by both ranks
    (``uneven``), and by rank 0 alone while rank 1 saves an empty dict (``nothing``), and the other way round
    (``nothing0``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from . import _dcp_workers as d

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1), nn.BatchNorm1d(1), nn.Linear(1, 3))
    fully_shard(model, mesh=mesh)
    state = {"model": model.state_dict(), "step": torch.tensor(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.dcp.save(state, checkpoint_id=Path(where) / "uneven", use_collectives=False)
        d.dcp.save(state if rank == 0 else {}, checkpoint_id=Path(where) / "nothing", use_collectives=False)
        d.dcp.save(state if rank == 1 else {}, checkpoint_id=Path(where) / "nothing0", use_collectives=False)
    return {k: tuple(v.to_local().shape) for k, v in model.state_dict().items() if hasattr(v, "to_local")}


JOBS = {"save": job_save}


@pytest.mark.distributed
@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_fsdp2_with_an_empty_shard_and_a_rank_that_saved_nothing(tmp_path):
    """OK: rank 1 holds empty shards of the 1-row tensors; every rank's file records a DTensor at its whole size,
    so the merge gives the whole shapes; a rank that saved nothing (rank 0's file among them, the one the folder
    is read by) adds nothing and refuses nothing; the norm's statistics, plain tensors on every rank, agree."""
    from . import _dcp_workers as d

    ranks = d.spawn(2, ["save"], tmp_path, module=__name__)
    assert ranks[1]["save"]["0.weight"] == (0, 4)  # the empty shard this test is about
    expected = [("0.weight", (1, 4)), ("0.bias", (1,)), ("1.weight", (1,)), ("1.bias", (1,)), ("2.weight", (3, 1)),
                ("2.bias", (3,))]
    for name in ("uneven", "nothing", "nothing0"):
        assert {"__0.metadata", "__1.metadata"} <= set(os.listdir(tmp_path / name)), name
        params = bench.model_params(str(tmp_path / name))
        assert _names_and_shapes(params) == expected, name
        assert params.source == (
            f"checkpoint {name}/__*.metadata of 2 ranks, its 'model' entry, 2 norm statistics left out, "
            "1 other tensors left out"
        )
