"""``kronopt bench --model FOLDER`` on a ``torch.distributed.checkpoint`` (DCP) folder: the model's tensors read
from its ``.metadata`` alone, whatever else was saved beside them (an optimizer's state, kronopt's too, counters),
and a metadata file that names anything but DCP's own records refused before it is made. The checkpoints are
saved here by DCP itself, in this one process."""

import os
import pickle
import warnings

import pytest
import torch
from torch import nn

import kronopt
from kronopt.app import bench, cli
from .test_bench_model import TINY
from ..torch_compat import needs_dcp_without_collectives

dcp = pytest.importorskip("torch.distributed.checkpoint")

#: the names and shapes of ``_model()``'s parameters, written out by hand
NAMES_AND_SHAPES = [("embed.weight", (10, 4)), ("block.weight", (6, 4)), ("block.bias", (6,)), ("norm.weight", (6,)),
                    ("norm.bias", (6,))]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"embed": nn.Embedding(10, 4), "block": nn.Linear(4, 6), "norm": nn.LayerNorm(6)})


def _save(state, folder) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is set up
        dcp.save(state, checkpoint_id=str(folder))
    return str(folder)


def _stepped_adamw(model):
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def _names_and_shapes(params):
    return list(zip(params.names, params.shapes))


def test_the_model_beside_its_optimizer_is_read_from_the_metadata(tmp_path):
    model = _model()
    folder = _save({"model": model.state_dict(), "optim": _stepped_adamw(model).state_dict(), "step": 3}, tmp_path / "ck")
    for spec in (folder, os.path.join(folder, ".metadata")):
        params = bench.model_params(spec)
        assert _names_and_shapes(params) == NAMES_AND_SHAPES
        assert params.source == "checkpoint ck/.metadata, its 'model' entry"
    os.remove(os.path.join(folder, "__0_0.distcp"))  # the shards are never opened
    assert _names_and_shapes(bench.model_params(folder)) == NAMES_AND_SHAPES


def test_a_state_dict_saved_alone_an_app_state_and_kronopts_own_state(tmp_path):
    model = _model()
    assert _names_and_shapes(bench.model_params(_save(model.state_dict(), tmp_path / "alone"))) == NAMES_AND_SHAPES
    nested = {"app": {"model": model.state_dict(), "optimizer": _stepped_adamw(model).state_dict()}}
    assert _names_and_shapes(bench.model_params(_save(nested, tmp_path / "app"))) == NAMES_AND_SHAPES
    # the model's tensors at the top, an optimizer's nested beside them (as torchtitan saves them)
    flat = {**model.state_dict(), "optimizer": _stepped_adamw(model).state_dict()}
    assert _names_and_shapes(bench.model_params(_save(flat, tmp_path / "flat"))) == NAMES_AND_SHAPES
    opt = kronopt.build(list(model.named_parameters()), "soap")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    params = bench.model_params(_save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "kron"))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


def test_a_checkpoint_of_two_unnamed_entries_is_a_clear_error(tmp_path):
    model = _model()
    folder = _save({"net": model.state_dict(), "opt": _stepped_adamw(model).state_dict()}, tmp_path / "two")
    with pytest.raises(ValueError, match=r"several entries \('net', 'opt'\) and no model's state dict at its top: save the model's state dict under 'model'"):
        bench.model_params(folder)


class _Payload:
    """Unpickled, it would write a file: what a malicious checkpoint's metadata could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_metadata_file_naming_anything_else_is_refused_unmade(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "made"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match=r"cannot be read as a checkpoint \(UnpicklingError: it names io.open"):
        bench.model_params(str(folder))
    assert not marker.exists()
    (folder / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not the metadata of a torch.distributed.checkpoint"):
        bench.model_params(str(folder))


def test_the_command_line_benches_a_dcp_folder(tmp_path, capsys):
    model = _model()
    folder = _save({"model": model.state_dict(), "optim": _stepped_adamw(model).state_dict()}, tmp_path / "ck")
    assert cli.main(["bench", "kl_shampoo", "--model", folder, *TINY]) == 0
    out = capsys.readouterr().out
    assert "5 parameters" in out and "(checkpoint ck/.metadata, its 'model' entry)" in out


@needs_dcp_without_collectives
def test_a_save_without_rank_coordination_is_read_from_its_rank_metadata(tmp_path):
    """``use_collectives=False``: no ``.metadata``, a ``__0.metadata`` (the two-rank case, merged, is in
    tests/distributed/test_bench_dcp_ranks.py)."""
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "step": 3}, checkpoint_id=str(tmp_path / "ck"), use_collectives=False)
    assert sorted(os.listdir(tmp_path / "ck")) == ["__0.metadata", "__0_0.distcp"]
    for spec in (tmp_path / "ck", tmp_path / "ck" / "__0.metadata"):
        params = bench.model_params(str(spec))
        assert _names_and_shapes(params) == NAMES_AND_SHAPES
        assert params.source == "checkpoint ck/__*.metadata of 1 rank, its 'model' entry"
