"""Review of ``kronopt bench --model config.json`` (:func:`kronopt.app.bench.config_params`): the cases it gets
wrong. Each test fails on the code under review. Those that need the real ``transformers`` skip without it (it is
not a dependency, nor in CI); the others put a stand-in ``transformers`` in ``sys.modules``, so CI runs them."""

import argparse
import builtins
import json
import socket
import sys
import types

import pytest
import torch

from kronopt.app import bench

from .test_bench_hf_config import _Config, _Tiny, fake_transformers  # noqa: F401  (fake_transformers: a fixture)

_SMALL_LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 64}


def _write(tmp_path, raw: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.fixture
def no_network(monkeypatch):
    """Every host lookup and connection, recorded and refused (so a test never waits on the network)."""
    tried: list = []

    def lookup(host, *args, **kwargs):
        tried.append(host)
        raise socket.gaierror(f"the test refuses to look up {host!r}")

    def connect(self, address):
        tried.append(address)
        raise OSError(f"the test refuses to connect to {address!r}")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return tried


def _outcome(spec: str):
    """The parameter set, or the ValueError's text (both are acceptable outcomes where only the network is tested)."""
    try:
        return bench.model_params(spec)
    except ValueError as exc:
        return str(exc)


# ---------------------------------------------------------------------------------------------------------------
# the network, and code from a model's repository


@pytest.mark.parametrize("attention", ["kernels-community/flash-attn2", "flash_attention_2"])
def test_an_attention_kernel_the_config_names_is_not_fetched_from_the_hub(tmp_path, no_network, attention):
    """A config's ``attn_implementation`` (``"kernels-community/…"``, or ``"flash_attention_2"`` where the
    flash-attn package is missing and the ``kernels`` package is installed) makes transformers fetch an attention
    kernel from the Hugging Face Hub while the model is made: the bench looks up huggingface.co, and where the
    network is reachable downloads that repository's kernel and loads its code. Wrong: reading a parameter set must
    never reach the network nor run code from a repository; the attention implementation changes no parameter.
    Right: no lookup at all (the parameter set, or a ValueError naming the file)."""
    pytest.importorskip("transformers")
    spec = _write(tmp_path, {**_SMALL_LLAMA, "architectures": ["LlamaForCausalLM"], "attn_implementation": attention})
    _outcome(spec)
    assert no_network == [], f"config_params went to the network: {no_network[:3]}"


def test_a_backbone_the_config_names_by_hub_repository_is_not_looked_up(tmp_path, no_network):
    """A DETR-style config naming its backbone by a Hub repository (``"backbone": "microsoft/resnet-50"``,
    ``"use_timm_backbone": false``, no ``backbone_config``) makes transformers ask the Hub whether that repository
    exists and download its config, while the config is read. Wrong: the bench reaches the network (here it looks
    up huggingface.co; offline, the user gets a connection error; online, it downloads). Right: nothing is looked
    up; such a config is a ValueError naming the file (or is read offline)."""
    pytest.importorskip("transformers")
    spec = _write(tmp_path, {"model_type": "detr", "architectures": ["DetrForObjectDetection"],
                             "use_timm_backbone": False, "backbone": "microsoft/resnet-50",
                             "use_pretrained_backbone": False})
    _outcome(spec)
    assert no_network == [], f"config_params went to the network: {no_network[:3]}"


def test_the_real_auto_classes_never_offer_to_run_the_repositorys_code(tmp_path, monkeypatch, no_network):
    """A config whose ``auto_map`` names code for ``AutoModelForCausalLM`` (model type ``vit``, which that auto
    class does not know) makes ``AutoModelForCausalLM.from_config`` — called without ``trust_remote_code=False`` —
    ask on stdin "Do you wish to run the custom code? [y/N]" (the bench waits on it), and on "y" fetch
    ``evil/repo``'s ``modeling_evil.py`` and run it. Wrong: ``auto_map`` must never be honoured, nor offered.
    Right: no question, no dynamic module; the bare ``ViTModel`` (or a ValueError)."""
    pytest.importorskip("transformers")
    from transformers.models.auto import auto_factory

    asked, loaded = [], []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")

    def dynamic_module(class_ref, repo_id, **kwargs):
        loaded.append((class_ref, repo_id))
        raise RuntimeError("the test stands in for running the repository's code")

    monkeypatch.setattr(auto_factory, "get_class_from_dynamic_module", dynamic_module)
    spec = _write(tmp_path, {"model_type": "vit", "hidden_size": 16, "intermediate_size": 32,
                             "num_attention_heads": 4, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8,
                             "auto_map": {"AutoModelForCausalLM": "evil/repo--modeling_evil.EvilForCausalLM"}})
    _outcome(spec)
    assert asked == [], "the user was asked whether to run the repository's code"
    assert loaded == [], f"the repository's code was to be run: {loaded}"


class _AskingAuto:
    """An auto class as transformers' behaves: ``from_config`` asks whether to run the code the config's
    ``auto_map`` names for it unless called with ``trust_remote_code=False`` (its default, ``None``, means ask;
    ``"y"`` then runs it)."""

    def __init__(self, name: str, knows: tuple, asked: list):
        self.name, self.knows, self.asked = name, knows, asked

    def from_config(self, config, **kwargs):
        if self.name in (getattr(config, "auto_map", None) or {}) and kwargs.get("trust_remote_code") is not False:
            self.asked.append(self.name)
            raise ValueError("the user declined to run the custom code")
        if config.model_type not in self.knows:
            raise ValueError(f"Unrecognized configuration class for this kind of AutoModel: {config.model_type}")
        return _Tiny(config, head=self.name == "AutoModelForCausalLM")


def test_the_auto_classes_are_never_left_to_ask_about_the_repositorys_code(tmp_path, monkeypatch):
    """The stand-in of the test above, for CI: the config's ``auto_map`` names repository code for both auto
    classes; ``config_params`` calls ``from_config`` leaving ``trust_remote_code`` at transformers' default (ask
    the user, run the code on "y"). Wrong: the repository's code is offered. Right: never offered (pass
    ``trust_remote_code=False``, or drop ``auto_map``); the auto class's own model."""
    asked: list = []
    module = types.ModuleType("transformers")
    module.AutoConfig = types.SimpleNamespace(for_model=lambda model_type, **raw: _Config(model_type=model_type, **raw))
    module.AutoModelForCausalLM = _AskingAuto("AutoModelForCausalLM", ("tiny",), asked)
    module.AutoModel = _AskingAuto("AutoModel", ("tiny",), asked)
    monkeypatch.setitem(sys.modules, "transformers", module)
    spec = _write(tmp_path, {"model_type": "tiny", "vocab_size": 10, "hidden_size": 4,
                             "auto_map": {"AutoModelForCausalLM": "evil/repo--modeling.Evil",
                                          "AutoModel": "evil/repo--modeling.Evil"}})
    _outcome(spec)
    assert asked == [], f"{', '.join(asked)} offered to run the repository's code"


# ---------------------------------------------------------------------------------------------------------------
# wrong parameter sets


def test_an_encoder_decoder_config_without_architectures_keeps_its_encoder(tmp_path):
    """A BART config without ``architectures`` (one written by ``BartConfig().to_json_file``, say) is made as
    ``AutoModelForCausalLM``'s class, ``BartForCausalLM``: the decoder alone, its encoder (half the model) left
    out; so for Marian, mBART, Pegasus, Blenderbot, PLBart, … (encoder-decoder types that the causal-LM auto class
    also maps, to their decoder). Wrong: 30 of the model's 49 parameters. Right: the encoder-decoder model the
    config describes (``config.is_encoder_decoder``: the seq2seq or bare auto class), its encoder's layers in."""
    pytest.importorskip("transformers")
    spec = _write(tmp_path, {"model_type": "bart", "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                             "decoder_ffn_dim": 32, "vocab_size": 64})
    params = bench.model_params(spec)
    assert any("encoder.layers.0.self_attn" in n for n in params.names), f"no encoder in {params.source}"


def test_a_parameter_the_model_keeps_in_float32_keeps_its_dtype(tmp_path):
    """DeepSeek-V3's router weight (``mlp.gate.weight``) is made in float32 whatever the model's dtype, and
    transformers keeps it so on loading (``_keep_in_fp32_modules_strict``); so for GLM-4-MoE, Kimi, Nemotron-H,
    ERNIE-4.5-MoE, … The bench sets every parameter to the config's ``torch_dtype`` (bfloat16). Wrong: the
    router's dtype differs from the model transformers makes from this config (``from_config``, on the CPU).
    Right: each parameter's dtype as transformers makes it under the config's dtype."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V3")
    spec = _write(tmp_path, {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                             "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 8,
                             "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
                             "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
                             "n_group": 1, "topk_group": 1, "vocab_size": 64, "q_lora_rank": 8, "kv_lora_rank": 8,
                             "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4,
                             "torch_dtype": "bfloat16"})
    params = bench.model_params(spec)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(tmp_path)))
    made = {n: p.dtype for n, p in model.named_parameters()}
    assert {n: d for n, d in zip(params.names, params.dtypes) if made[n] != d} == {}


def test_a_dtype_transformers_reads_as_half_precision_is_half_precision(tmp_path):
    """``"torch_dtype": "half"`` is torch's name for float16: transformers reads it so (``config.dtype`` is
    ``torch.float16``) and makes the model in float16. The bench matches the raw string against the drawn dtypes'
    canonical names only, and says float32. Wrong: float32. Right: float16 (the config's dtype as transformers
    reads it)."""
    transformers = pytest.importorskip("transformers")
    spec = _write(tmp_path, {**_SMALL_LLAMA, "architectures": ["LlamaForCausalLM"], "torch_dtype": "half"})
    assert transformers.AutoConfig.from_pretrained(str(tmp_path)).dtype == torch.float16
    assert set(bench.model_params(spec).dtypes) == {torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# which file a model's folder is read from


@pytest.mark.parametrize("trainer_files", [("training_args.bin",),
                                           ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")])
def test_a_folder_holding_a_config_and_the_trainers_files_but_no_weights_reads_its_config(
        tmp_path, fake_transformers, trainer_files):  # noqa: F811
    """A model's folder with its ``config.json`` and the files a ``transformers`` Trainer leaves beside a model
    (``training_args.bin``, its pickled arguments, which many Hub repositories ship; a DeepSpeed checkpoint's
    ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``) but no weights: the folder's only torch.save'd file,
    ``training_args.bin``, is taken for the checkpoint (a ValueError: it holds no tensors), or the four for
    "several checkpoint files". Wrong: the config, which the change reads for "a folder holding a config.json and
    no weights", is never reached. Right: none of these is weights; the config's model."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny", "vocab_size": 10, "hidden_size": 4,
                                                      "architectures": ["TinyForCausalLM"]}))
    for name in trainer_files:
        payload = argparse.Namespace(output_dir="out", learning_rate=1e-4) if name == "training_args.bin" else {"step": 1}
        torch.save(payload, tmp_path / name)
    params = bench.model_params(str(tmp_path))
    assert params.source == "TinyForCausalLM of config.json"
    assert params.names == ("embed.weight", "proj.weight", "lm_head.weight")
