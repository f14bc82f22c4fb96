"""``kronopt bench --model FOLDER`` on a ``torch.distributed.checkpoint`` saved by two ranks without rank
coordination (``use_collectives=False``): no ``.metadata``, one ``__<rank>.metadata`` a rank, each recording the
tensors its rank saved. The bench reads every rank's file and merges them: an FSDP2 model's parameters at their
whole sizes, a tensor one rank alone saved, and two ranks that record one tensor at different sizes refused."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kronopt.app import bench

from ..torch_compat import needs_dcp_without_collectives
from . import _dcp_workers as d

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    needs_dcp_without_collectives,
]

#: the names and whole shapes of ``_model()``'s parameters, written out by hand
NAMES_AND_SHAPES = [("embed.weight", (10, 4)), ("block.weight", (6, 4)), ("block.bias", (6,)), ("norm.weight", (6,)),
                    ("norm.bias", (6,))]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block, self.norm = nn.Embedding(10, 4), nn.Linear(4, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.block(self.embed(x)))


def job_save(rank, world, where):
    """Each rank saves its FSDP2 shards and a tensor of its own (``rank<r>.scale``, a (r + 2)-vector) under the
    model's key, and, in a second folder, a plain tensor ``w`` of a size that differs from rank to rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = Net()
    fully_shard(model, mesh=mesh)
    state = {"model": {**model.state_dict(), f"rank{rank}.scale": torch.ones(rank + 2)}, "step": torch.tensor(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.dcp.save(state, checkpoint_id=Path(where) / "fsdp2", use_collectives=False)
        d.dcp.save({"model": {"w": torch.zeros(rank + 2, 3)}}, checkpoint_id=Path(where) / "disagree",
                   use_collectives=False)
    return sorted(type(t).__name__ for t in model.state_dict().values())


JOBS = {"save": job_save}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    where = tmp_path_factory.mktemp("bench-dcp-ranks")
    ranks = d.spawn(2, ["save"], where, module=__name__)
    return where, ranks


def test_every_ranks_metadata_is_read_and_merged(saved):
    where, ranks = saved
    assert ranks[0]["save"] == ["DTensor"] * 5  # the model was sharded: each rank saved its parts
    folder = where / "fsdp2"
    assert sorted(p.name for p in folder.iterdir() if "metadata" in p.name) == ["__0.metadata", "__1.metadata"]
    for spec in (folder, folder / "__1.metadata"):  # the folder, or any rank's file: every rank's is read
        params = bench.model_params(str(spec))
        expected = [*NAMES_AND_SHAPES, ("rank0.scale", (2,)), ("rank1.scale", (3,))]
        assert list(zip(params.names, params.shapes)) == expected
        assert params.source == "checkpoint fsdp2/__*.metadata of 2 ranks, its 'model' entry"


def test_two_ranks_that_record_one_tensor_at_different_sizes_are_refused(saved):
    where, _ = saved
    with pytest.raises(ValueError, match=r"disagree on the tensor 'model\.w' \(\(3, 3\), torch.float32 in __1"):
        bench.model_params(str(where / "disagree"))


def test_a_rank_metadata_beside_a_global_one_is_not_read(saved, tmp_path):
    """A folder holding a ``.metadata`` is a coordinated save: a stray rank file beside it is not merged in."""
    where, _ = saved
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / ".metadata").write_bytes((where / "fsdp2" / "__0.metadata").read_bytes())
    (folder / "__1.metadata").write_bytes((where / "disagree" / "__1.metadata").read_bytes())
    params = bench.model_params(str(folder))
    assert list(zip(params.names, params.shapes)) == [*NAMES_AND_SHAPES, ("rank0.scale", (2,))]
    assert params.source == "checkpoint both/.metadata, its 'model' entry"
