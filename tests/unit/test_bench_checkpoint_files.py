"""``kronopt bench --model`` on the checkpoints people have on disk: a Hugging Face model's or trainer's folder,
shards of ``torch.save``d files with their ``pytorch_model.bin.index.json``, a training checkpoint that keeps the
model's state dict under a key (Lightning's ``.ckpt``, a script's ``{"model": …, "optimizer": …}``), names
whose endings are in capitals. Each file is written here by hand, so the expected names and shapes are the
test's own."""

import json

import pytest
import torch

from kronopt.app import bench, cli
from .test_bench_model import TINY, _safetensors


def _names_and_shapes(params):
    return list(zip(params.names, params.shapes))


def test_a_trainer_folder_is_read_from_its_model_file(tmp_path):
    """A trainer's checkpoint folder holds the model beside the optimizer, the scheduler, the arguments (a
    pickle of a class, which must not be opened) and JSON: the model file is the one read."""
    _safetensors(tmp_path / "model.safetensors", {"embed.weight": torch.zeros(30, 8), "layers.0.weight": torch.zeros(16, 8)})
    torch.save({"state": {}, "param_groups": []}, tmp_path / "optimizer.pt")
    torch.save({"last_epoch": 3}, tmp_path / "scheduler.pt")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04 a pickle of a class")
    (tmp_path / "trainer_state.json").write_text("{}")
    params = bench.model_params(str(tmp_path))
    assert _names_and_shapes(params) == [("embed.weight", (30, 8)), ("layers.0.weight", (16, 8))]
    assert params.source == "checkpoint model.safetensors"


def test_torch_shards_are_read_through_their_index_each_tensor_from_its_shard(tmp_path):
    """``pytorch_model.bin.index.json`` names a torch.save'd shard per tensor; a tensor found in two shards is
    taken from the one the index names (here the other shard's copy has another shape), and a folder holding
    the index and its shards is read through the index."""
    torch.save({"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(1, 1)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": torch.zeros(6, 4), "lm_head.weight": torch.zeros(9, 4, dtype=torch.bfloat16)},
               tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin",
                  "lm_head.weight": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for spec in (tmp_path / "pytorch_model.bin.index.json", tmp_path):
        params = bench.model_params(str(spec))
        assert _names_and_shapes(params) == [("a.weight", (4, 4)), ("b.weight", (6, 4)), ("lm_head.weight", (9, 4))]
        assert params.dtypes == (torch.float32, torch.float32, torch.bfloat16)
        assert params.source == "checkpoint pytorch_model.bin.index.json"


def test_a_folder_prefers_safetensors_to_the_same_weights_saved_by_torch(tmp_path):
    """A model repository often ships both; the safetensors index is read (its shards' headers only)."""
    _safetensors(tmp_path / "model-1.safetensors", {"w": torch.zeros(3, 5)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    assert _names_and_shapes(bench.model_params(str(tmp_path))) == [("w", (3, 5))]


def test_a_folder_with_one_checkpoint_of_another_name_and_endings_in_capitals(tmp_path):
    torch.save({"net.weight": torch.zeros(7, 2)}, tmp_path / "WEIGHTS.PT")
    assert _names_and_shapes(bench.model_params(str(tmp_path))) == [("net.weight", (7, 2))]
    assert _names_and_shapes(bench.model_params(str(tmp_path / "WEIGHTS.PT"))) == [("net.weight", (7, 2))]
    _safetensors(tmp_path / "Model.SafeTensors", {"x": torch.zeros(2, 3)})
    assert _names_and_shapes(bench.model_params(str(tmp_path / "Model.SafeTensors"))) == [("x", (2, 3))]
    # the folder now holds one safetensors file and one torch file: the safetensors kind comes first
    assert _names_and_shapes(bench.model_params(str(tmp_path))) == [("x", (2, 3))]


def test_a_folder_that_names_no_single_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint file"):
        bench.model_params(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no checkpoint file"):
        bench.model_params(str(tmp_path))
    _safetensors(tmp_path / "part-a.safetensors", {"w": torch.zeros(2, 2)})
    _safetensors(tmp_path / "part-b.safetensors", {"v": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"several checkpoint files \(part-a.safetensors, part-b.safetensors\)"):
        bench.model_params(str(tmp_path))


def test_a_lightning_checkpoint_is_read_from_its_state_dict(tmp_path):
    """Lightning's ``.ckpt``: the model's tensors under ``state_dict`` beside counters, optimizer states (whose
    tensors are not parameters) and callbacks; the report says where they were found."""
    ckpt = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0",
        "state_dict": {"model.embed.weight": torch.zeros(11, 4), "model.block.weight": torch.zeros(8, 4),
                       "model.norm.num_batches_tracked": torch.tensor(5)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(11, 4)}}, "param_groups": [{"lr": 0.1}]}],
        "lr_schedulers": [], "callbacks": {},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    params = bench.model_params(str(tmp_path / "last.ckpt"))
    assert _names_and_shapes(params) == [("model.embed.weight", (11, 4)), ("model.block.weight", (8, 4))]
    assert params.source == "checkpoint last.ckpt, its 'state_dict' entry, 1 other tensors left out"


def test_a_state_dict_under_a_key_of_its_own_and_several_of_them(tmp_path):
    torch.save({"weights": {"w": torch.zeros(3, 3)}, "step": 10}, tmp_path / "own.pt")
    assert bench.model_params(str(tmp_path / "own.pt")).names == ("w",)
    torch.save({"model": {"w": torch.zeros(3, 3)}, "ema": {"w": torch.zeros(3, 3), "v": torch.zeros(2)}}, tmp_path / "ema.pt")
    assert bench.model_params(str(tmp_path / "ema.pt")).names == ("w",)  # the model's, before an EMA of it
    torch.save({"student": {"w": torch.zeros(3, 3)}, "teacher": {"v": torch.zeros(4, 4)}}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"several state dicts, under 'student', 'teacher'"):
        bench.model_params(str(tmp_path / "two.pt"))


def test_an_index_whose_shard_is_not_a_tensor_file_is_an_error(tmp_path):
    (tmp_path / "inner.index.json").write_text(json.dumps({"weight_map": {}}))
    (tmp_path / "outer.index.json").write_text(json.dumps({"weight_map": {"w": "inner.index.json"}}))
    with pytest.raises(ValueError, match="its shard 'inner.index.json' is not a safetensors or torch.save'd file"):
        bench.model_params(str(tmp_path / "outer.index.json"))
    (tmp_path / "bad.index.json").write_text(json.dumps({"weight_map": {"w": "w.npy"}}))
    with pytest.raises(ValueError, match="its shard 'w.npy'"):
        bench.model_params(str(tmp_path / "bad.index.json"))


def test_the_command_line_benches_a_folder(tmp_path, capsys):
    _safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": torch.zeros(40, 8),
                                                  "model.layers.0.mlp.up_proj.weight": torch.zeros(32, 8)})
    assert cli.main(["bench", "kl_shampoo", "--model", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "(checkpoint model.safetensors), device cpu" in out
    assert "kl_shampoo  pipeline 1 (0.00 M numbers), fallback 1 (0.00 M numbers)" in out


def test_a_tied_weight_saved_under_two_names_counts_once(tmp_path):
    """torch.save keeps a tied head and embedding as one storage under two names (safetensors files drop the
    second name); the bench counts it once, by its first name, as it does a model's tied parameter. Two
    tensors that are views of one storage at other offsets are two parameters."""
    emb = torch.nn.Embedding(12, 4)
    head = torch.nn.Linear(4, 12, bias=False)
    head.weight = emb.weight
    packed = torch.zeros(2, 3, 3)
    state = {"emb.weight": emb.weight.detach(), "mid.weight": torch.zeros(4, 4), "head.weight": head.weight.detach(),
             "a.weight": packed[0], "b.weight": packed[1], "s.weight": torch.eye(3).to_sparse()}
    torch.save(state, tmp_path / "tied.pt")
    params = bench.model_params(str(tmp_path / "tied.pt"))
    assert _names_and_shapes(params) == [("emb.weight", (12, 4)), ("mid.weight", (4, 4)), ("a.weight", (3, 3)),
                                         ("b.weight", (3, 3)), ("s.weight", (3, 3))]
    assert params.source == "checkpoint tied.pt, 1 tied tensors counted once"


def test_a_folder_reads_its_single_file_before_an_index_as_transformers_does(tmp_path):
    """An index left beside the single file (its shards never downloaded) is not read: ``model.safetensors``
    comes first, as ``transformers`` loads it."""
    _safetensors(tmp_path / "model.safetensors", {"w": torch.zeros(2, 7)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    assert _names_and_shapes(bench.model_params(str(tmp_path))) == [("w", (2, 7))]


def test_an_empty_state_dict_under_a_known_key_gives_way_to_the_one_that_holds_tensors(tmp_path):
    torch.save({"model": {}, "ema": {"w": torch.zeros(3, 2)}}, tmp_path / "ema_only.pt")
    params = bench.model_params(str(tmp_path / "ema_only.pt"))
    assert params.names == ("w",) and params.source == "checkpoint ema_only.pt, its 'ema' entry"


def test_a_batch_norms_running_statistics_are_left_out_and_counted(tmp_path):
    """A convolutional net's checkpoint: a batch norm's ``running_mean`` and ``running_var`` are floating buffers,
    not parameters, and its ``num_batches_tracked`` an integer one; a parameter whose name merely contains
    ``running_mean`` is kept. Names and shapes written out by hand."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.InstanceNorm1d(5, track_running_stats=True)
    )
    net.add_module("head", torch.nn.Linear(8, 2))
    net.head.register_parameter("running_mean_gain", torch.nn.Parameter(torch.zeros(2)))
    torch.save(net.state_dict(), tmp_path / "cnn.pt")
    params = bench.model_params(str(tmp_path / "cnn.pt"))
    assert _names_and_shapes(params) == [
        ("0.weight", (8, 3, 3, 3)), ("0.bias", (8,)), ("1.weight", (8,)), ("1.bias", (8,)), ("head.weight", (2, 8)),
        ("head.bias", (2,)), ("head.running_mean_gain", (2,)),
    ]
    assert params.source == "checkpoint cnn.pt, 4 norm statistics left out, 2 other tensors left out"


def test_tied_names_in_torch_shards_are_counted_through_their_index(tmp_path):
    """A shard that keeps a tied head beside its embedding (one storage, two names, both mapped to that shard
    by the index) gives the weight once and says so, as the file alone does; a tied name the index maps to
    another shard is not counted there."""
    emb = torch.zeros(12, 4)
    torch.save({"emb.weight": emb, "head.weight": emb, "stale.weight": emb}, tmp_path / "part-1.bin")
    torch.save({"mid.weight": torch.zeros(4, 4), "stale.weight": torch.zeros(2, 2)}, tmp_path / "part-2.bin")
    weight_map = {"emb.weight": "part-1.bin", "head.weight": "part-1.bin", "mid.weight": "part-2.bin",
                  "stale.weight": "part-2.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = bench.model_params(str(tmp_path))
    assert _names_and_shapes(params) == [("emb.weight", (12, 4)), ("mid.weight", (4, 4)), ("stale.weight", (2, 2))]
    assert params.source == "checkpoint pytorch_model.bin.index.json, 1 tied tensors counted once"
