"""Edge cases of ``bench.checkpoint_params`` (``kronopt bench --model CHECKPOINT``) that the current code gets wrong.

Each test fails on the current code because of a bug; its docstring says what is wrong and what is right.
The CLI turns only a ``ValueError`` from ``model_params`` into a usage error (``Problems.value``): anything
else, or a bad value that gets past it and fails later, is a traceback.
"""

from __future__ import annotations

import json

import pytest
import torch

from kronopt.app import bench, cli

TINY = ["--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]


def _safetensors(path, header) -> str:
    """A safetensors file with this JSON header (dict) and no data: the 8-byte little-endian length, the header."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    return str(path)


@pytest.mark.parametrize("weight_map", [["part-1.safetensors"], "part-1.safetensors", None])
def test_an_index_whose_weight_map_is_not_a_table_is_a_value_error(tmp_path, weight_map):
    """Wrong: a ``.safetensors.index.json`` whose ``weight_map`` is a list, a string or null makes
    ``shards.values()`` raise ``AttributeError``, which ``checkpoint_params`` does not catch, so ``kronopt bench
    --model`` prints a traceback. Right: a ``ValueError`` naming the index (check ``isinstance(weight_map, dict)``
    with string values, or add ``AttributeError`` to the caught exceptions)."""
    _safetensors(tmp_path / "part-1.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        bench.model_params(str(index))


@pytest.mark.parametrize(
    "shape", [[-1, 4], "ab", [2.5], {"x": 1}, [2**70], [4, "8"]],
    ids=["negative", "string", "float", "object", "huge", "string-dim"],
)
def test_a_safetensors_shape_that_is_not_a_list_of_sizes_is_a_value_error(tmp_path, shape):
    """Wrong: a header's ``shape`` is taken as ``tuple(v["shape"])`` unchecked, so ``[-1, 4]``, ``"ab"``
    (becomes ``('a', 'b')``), ``[2.5]``, ``{"x": 1}`` or a dimension beyond int64 is accepted as a parameter
    shape, and the bench then fails later outside ``Problems`` (a ``ValueError`` out of ``cli.main`` for the
    negative one, a ``TypeError`` from ``torch.randn``/sorting for the others): a traceback. Right: a shape
    that is not a list of non-negative ints (within int64) makes the file "not a safetensors file", a
    ``ValueError`` from ``model_params`` naming it."""
    path = _safetensors(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(ValueError, match="bad.safetensors"):
        bench.model_params(path)


def test_a_bad_safetensors_shape_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    """The same bug through the CLI: ``kronopt bench kl_shampoo --model bad.safetensors`` with a header shape
    ``"ab"`` raises ``TypeError`` out of ``cli.main``. Right: a usage error (exit status 2) naming ``--model``."""
    path = _safetensors(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 0]}})
    assert cli.main(["bench", "kl_shampoo", "--model", path, *TINY]) == 2
    assert "--model" in capsys.readouterr().err


def test_a_state_dict_with_keys_that_are_not_names_is_a_value_error(tmp_path):
    """Wrong: ``torch.save({0: tensor})`` passes the "mapping of names to tensors" check (only the values are
    checked), so the ``ParamSet``'s names are ints and the bench crashes in routing with ``TypeError: expected
    string or bytes-like object, got 'int'`` (a traceback). Right: a mapping whose keys are not all strings is
    "not a mapping of names to tensors", a ``ValueError``."""
    torch.save({0: torch.zeros(2, 2), 1: torch.zeros(3)}, tmp_path / "intkeys.pt")
    with pytest.raises(ValueError, match="intkeys.pt"):
        bench.model_params(str(tmp_path / "intkeys.pt"))


def test_an_old_format_torch_save_state_dict_is_read_or_refused_for_what_it_is(tmp_path):
    """Wrong: a state dict written by ``torch.save(..., _use_new_zipfile_serialization=False)`` (the format of
    torch < 1.6, e.g. old ``pytorch_model.bin`` files) is loaded with ``mmap=True``, which torch refuses, and the
    message says the file ``is not a file written by torch.save`` — false: it is one, of the old format.
    Right: read it (retry ``load_torch_file`` without ``mmap`` when the file is not a zip, as
    ``torch.serialization._is_zipfile`` tells), or at least a message that says it is an old-format
    ``torch.save`` file and how to re-save it."""
    torch.save({"w": torch.zeros(5, 3), "b": torch.zeros(5)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    try:
        params = bench.model_params(str(tmp_path / "old.bin"))
    except ValueError as exc:
        assert "not a file written by torch.save" not in str(exc), str(exc)
    else:
        assert params.names == ("w", "b") and params.shapes == ((5, 3), (5,))


def test_a_tensor_in_two_shards_is_one_parameter(tmp_path):
    """Wrong: a sharded checkpoint's parameters are every entry of every shard's header, so a tensor name found
    in two shards (the index's ``weight_map`` maps it to one of them) is counted twice: two parameters of the
    same name, the report's size inflated. Right: the index is the authority — each name once, from the shard
    its ``weight_map`` names (keep a shard's header entries only where ``weight_map[name] == shard``)."""
    entry = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    _safetensors(tmp_path / "part-1.safetensors", {"a.weight": entry})
    _safetensors(tmp_path / "part-2.safetensors", {"a.weight": entry, "b.weight": entry})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "part-1.safetensors", "b.weight": "part-2.safetensors"}}))
    params = bench.model_params(str(index))
    assert params.names == ("a.weight", "b.weight")
