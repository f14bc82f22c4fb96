"""``kronopt bench --model config.json``: a Hugging Face model's parameters from its config alone, made by
``transformers`` on the meta device. One test runs the real package (where it is installed: it is no dependency
of kronopt's, nor of CI's); the others put a stand-in ``transformers`` in ``sys.modules`` to pin which class is
made, where, and every error."""

import json
import sys
import types

import pytest
import torch
from torch import nn

from kronopt.app import bench, cli
from .test_bench_model import TINY, _safetensors

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
         "max_position_embeddings": 32, "tie_word_embeddings": False, "dtype": "bfloat16"}


def _llama_names_and_shapes(tied: bool) -> list:
    """LLaMA's parameters, written out by hand: head dim 16 / 4 = 4, so k and v project to 2 × 4 = 8."""
    layer = [("self_attn.q_proj.weight", (16, 16)), ("self_attn.k_proj.weight", (8, 16)),
             ("self_attn.v_proj.weight", (8, 16)), ("self_attn.o_proj.weight", (16, 16)),
             ("mlp.gate_proj.weight", (32, 16)), ("mlp.up_proj.weight", (32, 16)), ("mlp.down_proj.weight", (16, 32)),
             ("input_layernorm.weight", (16,)), ("post_attention_layernorm.weight", (16,))]
    out = [("model.embed_tokens.weight", (64, 16))]
    out += [(f"model.layers.{i}.{n}", s) for i in range(2) for n, s in layer]
    out += [("model.norm.weight", (16,))] + ([] if tied else [("lm_head.weight", (64, 16))])
    return out


def test_the_real_transformers_makes_a_llama_from_its_config(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    for spec in (tmp_path / "config.json", tmp_path):  # the file, or a model's folder holding no weights
        params = bench.model_params(str(spec))
        assert sorted(zip(params.names, params.shapes)) == sorted(_llama_names_and_shapes(tied=False))
        assert set(params.dtypes) == {torch.bfloat16} and params.source == "LlamaForCausalLM of config.json"
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "tie_word_embeddings": True, "dtype": None}))
    tied = bench.model_params(str(tmp_path))
    assert sorted(zip(tied.names, tied.shapes)) == sorted(_llama_names_and_shapes(tied=True))
    assert set(tied.dtypes) == {torch.float32}
    assert bench.routing("muon", tied) == {"pipeline": (14, 4608), "fallback": (6, 1104)}
    assert cli.main(["bench", "muon", "--model", str(tmp_path / "config.json"), *TINY]) == 0
    assert "20 parameters" in capsys.readouterr().out
    _safetensors(tmp_path / "model.safetensors", {"w": torch.zeros(3, 3)})  # weights beside it are read instead
    assert bench.model_params(str(tmp_path)).names == ("w",)


class _Config:
    def __init__(self, **raw):
        self.__dict__.update(raw)


class _Tiny(nn.Module):
    made_on: list = []

    def __init__(self, config, head: bool = True):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _Tiny.made_on.append((type(self).__name__, self.proj.weight.device.type))


class TinyForCausalLM(_Tiny):
    pass


class _Auto:
    def __init__(self, head: bool, knows: tuple):
        self.head, self.knows = head, knows

    def from_config(self, config, **kwargs):
        assert kwargs == {"trust_remote_code": False}
        if config.model_type not in self.knows:
            raise ValueError(f"Unrecognized configuration class for this kind of AutoModel: {config.model_type}")
        return _Tiny(config, head=self.head)


@pytest.fixture
def fake_transformers(monkeypatch):
    """A stand-in ``transformers``: ``TinyForCausalLM`` by name; the causal-LM auto class knows ``tiny`` only, the
    bare one ``tiny`` and ``encoder``."""
    module = types.ModuleType("transformers")
    module.AutoConfig = types.SimpleNamespace(for_model=lambda model_type, **raw: _Config(model_type=model_type, **raw))
    module.TinyForCausalLM = TinyForCausalLM
    module.AutoModelForCausalLM = _Auto(head=True, knows=("tiny",))
    module.AutoModel = _Auto(head=False, knows=("tiny", "encoder"))
    monkeypatch.setitem(sys.modules, "transformers", module)
    _Tiny.made_on.clear()
    return module


def _config(tmp_path, **raw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "tiny", "vocab_size": 10, "hidden_size": 4, **raw}))
    return str(path)


def test_the_class_the_config_names_is_made_on_the_meta_device(tmp_path, fake_transformers):
    params = bench.model_params(_config(tmp_path, architectures=["TinyForCausalLM"]))
    assert _Tiny.made_on == [("TinyForCausalLM", "meta")]
    assert list(zip(params.names, params.shapes)) == [("embed.weight", (10, 4)), ("proj.weight", (4, 4)),
                                                      ("lm_head.weight", (10, 4))]
    assert params.dtypes == (torch.float32,) * 3 and params.source == "TinyForCausalLM of config.json"


def test_without_a_known_class_the_auto_classes_are_tried_in_turn(tmp_path, fake_transformers):
    """An architecture ``transformers`` does not have falls to the causal-LM auto class; a model type that one
    does not know, to the bare model (no head)."""
    params = bench.model_params(_config(tmp_path, architectures=["NoSuchModel"]))
    assert params.names[-1] == "lm_head.weight" and _Tiny.made_on[-1][0] == "_Tiny"  # the auto class's
    bench.model_params(_config(tmp_path, architectures=["NoSuchModel", "TinyForCausalLM"]))
    assert _Tiny.made_on[-1][0] == "TinyForCausalLM"  # the first name transformers has
    params = bench.model_params(_config(tmp_path, model_type="encoder"))
    assert params.names == ("embed.weight", "proj.weight")
    assert [where for _, where in _Tiny.made_on] == ["meta", "meta", "meta"]
    with pytest.raises(ValueError, match="transformers makes no model of it: Unrecognized configuration class"):
        bench.model_params(_config(tmp_path, model_type="decoder"))


def test_a_config_that_makes_no_model_is_a_clear_error(tmp_path, fake_transformers, monkeypatch):
    with pytest.raises(ValueError, match=r"config.json' cannot be made into a model \(not a Hugging Face model's config"):
        bench.model_params(_config(tmp_path, model_type=None))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be made into a model"):
        bench.model_params(str(tmp_path / "config.json"))

    class Broken(TinyForCausalLM):
        def __init__(self, config):
            raise TypeError("__init__() missing 1 required positional argument")

    monkeypatch.setattr(fake_transformers, "TinyForCausalLM", Broken)
    with pytest.raises(ValueError, match="TypeError: __init__"):
        bench.model_params(_config(tmp_path, architectures=["TinyForCausalLM"]))


def test_a_config_without_transformers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ValueError, match=r"needs the transformers package \(pip install transformers\)"):
        bench.model_params(_config(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint file .* and no Hugging Face config.json"):
        bench.model_params(str(tmp_path / "empty"))
