"""``kronopt bench --model module:factory``: the bench on a user's own model, its parameters by name, shape and dtype.

The names matter: kronopt's routed presets send an embedding or a head to their fallback by name, so a
bench on the same shapes under other names would time another optimizer. The model is made on the meta
device where its factory can run there.
"""

import textwrap

import pytest
import torch

from kronopt.app import bench, cli
from tests.torch_compat import needs_gloo

#: the test model, written as a module on a temporary PYTHONPATH entry (the bench imports it by name)
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    DEVICES = []  # the device each factory call made its parameters on

    class Net(nn.Module):
        def __init__(self, vocab=100, d=32):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.body = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.embed.weight  # tied: one parameter
            self.frozen = nn.Parameter(torch.ones(d, d), requires_grad=False)
            DEVICES.append(self.body[0].weight.device.type)

    def half():
        return Net().to(torch.bfloat16)

    def reads_values():
        net = Net()
        net.body[0].weight.sum().item()  # no value on the meta device
        return net

    def not_a_module():
        return [nn.Linear(2, 2)]

    def raises():
        raise RuntimeError("no weights here")

    def frozen():
        net = Net()
        net.requires_grad_(False)
        return net

    def complex_weights():
        net = nn.Linear(3, 3)
        net.weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))
        return net

    LIMIT = 3
    """
)

#: Net's trainable parameters, written out by hand: the tied head once, the frozen matrix left out
NET = [
    ("embed.weight", (100, 32)),
    ("body.0.weight", (128, 32)),
    ("body.0.bias", (128,)),
    ("body.2.weight", (32, 128)),
    ("body.2.bias", (32,)),
    ("norm.weight", (32,)),
    ("norm.bias", (32,)),
]

TINY = ["--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """The module ``bench_models`` importable, fresh for each test."""
    (tmp_path / "bench_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "bench_models", raising=False)
    import bench_models

    return bench_models


def test_the_model_gives_its_trainable_parameters_by_name_shape_and_dtype_from_the_meta_device(models):
    params = bench.model_params("bench_models:Net")
    assert list(zip(params.names, params.shapes)) == NET
    assert params.dtypes == (torch.float32,) * len(NET)
    assert models.DEVICES == ["meta"]  # made once, holding no memory
    assert params.source == "model bench_models:Net" and params.numel == sum(torch.Size(s).numel() for _, s in NET)
    half = bench.model_params("bench_models:half")
    assert half.shapes == params.shapes and half.dtypes == (torch.bfloat16,) * len(NET)


def test_the_factory_takes_python_literals_as_its_arguments(models):
    params = bench.model_params("bench_models:Net(50, d=16)")
    assert params.shapes == ((50, 16), (64, 16), (64,), (16, 64), (16,), (16,), (16,))
    assert params.source == "model bench_models:Net(50, d=16)"


@pytest.mark.parametrize("spec", ["bench_models:Net(d=)", "bench_models:Net(**{'d': 4})", "bench_models:Net(d=foo)",
                                  "bench_models:Net(d=16", "bench_models:Net(d=16))"])
def test_arguments_that_are_not_python_literals_are_a_clear_error(models, spec):
    with pytest.raises(ValueError, match="are not Python literals given as"):
        bench.model_params(spec)


def test_a_factory_that_reads_values_is_made_for_real(models):
    params = bench.model_params("bench_models:reads_values")
    assert list(zip(params.names, params.shapes)) == NET
    assert models.DEVICES == ["meta", "cpu"]  # tried on the meta device first


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bench_models.Net", "'bench_models.Net' is no file or folder here, no module:factory"),
        ("bench_models:Net(d=-1)", "bench_models:Net(d=-1) raised RuntimeError"),
        ("no_such_module_here:Net", "'no_such_module_here' cannot be imported (ModuleNotFoundError"),
        ("bench_models:Nope", "module 'bench_models' has no 'Nope'"),
        ("bench_models:LIMIT", "bench_models:LIMIT is not callable"),
        ("bench_models:not_a_module", "bench_models:not_a_module() made a list, not a torch.nn.Module"),
        ("bench_models:raises", "bench_models:raises() raised RuntimeError: no weights here"),
        ("bench_models:frozen", "the model of bench_models:frozen has no trainable parameter"),
        ("bench_models:complex_weights", "a dtype the bench does not step (it takes float32, bfloat16, float16, float64): weight (torch.complex64)"),
    ],
)
def test_a_model_that_cannot_be_read_is_a_clear_error(models, spec, message, capsys):
    with pytest.raises(ValueError) as err:
        bench.model_params(spec)
    assert message in str(err.value)
    assert cli.main(["bench", "adamw", "--model", spec, *TINY]) == 2
    out = capsys.readouterr().err
    assert any(line.strip().startswith("--model: ") and message in line for line in out.splitlines())
    assert "Traceback" not in out


def test_model_and_shapes_together_are_refused_with_every_problem_listed(models, capsys):
    assert cli.main(["bench", "adamw", "--model", "bench_models:Nope", "--shapes", "4x4", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--model: module 'bench_models' has no 'Nope'" in err
    assert "--model: names the parameter set, as --shapes does: give one of them" in err
    assert "--steps: must be ≥ 1" in err
    assert cli.main(["bench", "adamw", "--model", "bench_models:Net", "--d", "64", "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--d: sizes the transformer-shaped set; cannot be combined with --model" in err
    assert "--layers: sizes the transformer-shaped set; cannot be combined with --model" in err
    assert cli.main(["bench", "adamw", "--shapes", "4x4", "--d", "64"]) == 2
    assert "--d: sizes the transformer-shaped set; cannot be combined with --shapes" in capsys.readouterr().err


def _built(monkeypatch) -> list:
    """Every kronopt optimizer the bench builds, in order."""
    made = []
    real = bench.kronopt.build

    def build(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(bench.kronopt, "build", build)
    return made


def test_the_bench_steps_the_model_by_its_names_so_routing_sees_them(models, monkeypatch, capsys):
    """kl_shampoo sends the embedding to its fallback by name: a 100 × 32 bucket of AdamW's, where the same
    shapes under the bench's own names would be preconditioned."""
    made = _built(monkeypatch)
    assert cli.main(["bench", "kl_shampoo", "torch.AdamW", "--model", "bench_models:Net", *TINY]) == 0
    out = capsys.readouterr().out
    assert out.startswith("7 parameters, 0.01 M numbers (model bench_models:Net), device cpu,")
    assert {"kl_shampoo", "torch.AdamW"} <= set(out.split())
    [opt] = made
    embedding = [b for b in opt.bucket_summary() if (b["m"], b["n"]) == (100, 32)]
    assert [b["pipeline"] for b in embedding] == ["fallback"]
    by_shape = bench._make("kl_shampoo", [torch.nn.Parameter(torch.zeros(s)) for _, s in NET])[0]
    assert [b["pipeline"] for b in by_shape.bucket_summary() if (b["m"], b["n"]) == (100, 32)] == ["main"]


def test_the_bench_steps_the_models_dtypes(models, monkeypatch, capsys):
    made = _built(monkeypatch)
    assert cli.main(["bench", "adamw", "--model", "bench_models:half", *TINY]) == 0
    assert "(model bench_models:half), bfloat16, device cpu" in capsys.readouterr().out
    [opt] = made
    assert {p.dtype for group in opt.param_groups for p in group["params"]} == {torch.bfloat16}
    assert {p.grad.dtype for group in opt.param_groups for p in group["params"]} == {torch.bfloat16}


@pytest.mark.parametrize("source", [["--model", "bench_models:Net"], ["--shapes", "8x4,4"], []])
def test_dtype_sets_every_parameters_dtype(models, source, monkeypatch, capsys):
    made = _built(monkeypatch)
    assert cli.main(["bench", "adamw", *source, "--dtype", "float16", *TINY]) == 0
    assert ", float16, device cpu" in capsys.readouterr().out.splitlines()[0]
    [opt] = made
    assert {p.dtype for group in opt.param_groups for p in group["params"]} == {torch.float16}
    assert cli.main(["bench", "adamw", *source, "--dtype", "float64", *TINY]) == 2
    assert "--dtype: 'float64' is not one of: float32, bfloat16, float16" in capsys.readouterr().err


def test_the_matrix_work_alone_is_recorded_on_the_models_names(models):
    """``--alone`` records what the optimizer on the model does: no product of kl_shampoo's touches the embedding's
    side of 100 once the embedding goes to the fallback by name; on the bench's own names one does."""
    params = bench.model_params("bench_models:Net")

    def sides(per_step):
        return {d for calls in per_step for _, args, _ in calls for a in args if isinstance(a, tuple) for d in _dims(a)}

    named = bench.record_matrix_work("kl_shampoo", params, steps=3, device="cpu")
    plain = bench.record_matrix_work("kl_shampoo", params.shapes, steps=3, device="cpu")
    assert 100 not in sides(named) and 100 in sides(plain)


def _dims(recorded) -> tuple:
    """The sizes of a recorded tensor argument (``("tensor", shape, dtype, device, kind)``), else nothing."""
    return tuple(recorded[1]) if len(recorded) == 5 and recorded[0] == "tensor" else ()



@pytest.mark.distributed
@needs_gloo
def test_the_world_ranks_step_the_model_by_its_names(models, monkeypatch, capsys):
    """The ranks (forked here, so they see the test's module) build kl_shampoo on the model's names: the
    state summed over two ranks is one process's on the named parameters, not on the bench's own names."""
    rows = []
    real = bench.bench_world
    monkeypatch.setattr(bench, "bench_world", lambda *a, **k: rows.extend(real(*a, **k)) or rows)
    monkeypatch.setattr(bench, "START_METHOD", "fork")
    args = ["bench", "kl_shampoo", "--model", "bench_models:Net", "--steps", "2", "--warmup", "1", "--world", "2", "--threads", "1"]
    assert cli.main(args) == 0
    assert "(model bench_models:Net), CPU processes on gloo" in capsys.readouterr().out
    params = [torch.nn.Parameter(torch.zeros(s)) for _, s in NET]
    named = bench._make("kl_shampoo", params, [n for n, _ in NET])[0].state_bytes()
    plain = bench._make("kl_shampoo", params)[0].state_bytes()
    assert named != plain
    [row] = rows
    assert row["state_bytes_sum"] == named


def test_a_peer_matched_to_a_routed_preset_sends_what_it_routes_by_name_to_adamw(models):
    """torch.Muon follows the muon preset, which sends an embedding or a head to its AdamW by name: on the model's
    names the 100 × 32 embedding goes to the AdamW beside Muon (with the preset's fallback settings), as the
    preset's does; on no names it stays a matrix for Muon. A peer matched to an unrouted preset is untouched."""
    from kronopt.app import peers

    params = [torch.nn.Parameter(torch.zeros(s)) for _, s in NET]
    names = [n for n, _ in NET]
    opt, size = peers.build("torch.Muon", params, names)
    muon, *adamws = opt.opts
    assert isinstance(muon, torch.optim.Muon) and all(isinstance(a, torch.optim.AdamW) for a in adamws)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert in_muon == {id(p) for p, (n, s) in zip(params, NET) if len(s) == 2 and n != "embed.weight"}
    [aside] = [a for a in adamws if any(p is params[0] for g in a.param_groups for p in g["params"])]
    assert [p for g in aside.param_groups for p in g["params"]] == [params[0]]
    assert aside.defaults["betas"] == (0.9, 0.95) and aside.defaults["eps"] == 1e-10
    unnamed, _ = peers.build("torch.Muon", params)
    assert any(p is params[0] for g in unnamed.opts[0].param_groups for p in g["params"])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert size() > 0 and {id(p) for a in adamws for p in a.state} >= {id(params[0])}
    plain, _ = peers.build("torch.AdamW", params, names)
    assert isinstance(plain, torch.optim.AdamW) and len(plain.param_groups[0]["params"]) == len(params)


def test_the_factory_may_live_in_a_python_file_off_the_path(tmp_path):
    (tmp_path / "my nets").mkdir()
    path = tmp_path / "my nets" / "scratch.py"
    path.write_text(MODELS)
    params = bench.model_params(f"{path}:Net(vocab=20, d=8)")
    assert params.shapes == ((20, 8), (32, 8), (32,), (8, 32), (8,), (8,), (8,))
    with pytest.raises(ValueError, match="cannot be imported \\(FileNotFoundError: no file"):
        bench.model_params(f"{tmp_path / 'absent.py'}:Net")
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on import')\n")
    with pytest.raises(ValueError, match="broken on import"):
        bench.model_params(f"{tmp_path / 'broken.py'}:Net")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        bench.model_params(f"{path}:Nope")


def test_files_of_one_name_in_two_folders_stay_apart_and_find_their_neighbours(tmp_path):
    """Two ``nets.py`` in two folders are two modules (each keeps its classes findable by name, as pickling
    needs), and each file's own imports find the files beside it, as ``python nets.py`` would."""
    for folder, d in (("a", 4), ("b", 6)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"layers_{folder}.py").write_text(f"import torch\nD = {d}\n")
        (tmp_path / folder / "nets.py").write_text(
            f"import torch\nfrom layers_{folder} import D\n"
            "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.w = torch.nn.Parameter(torch.zeros(D, D))\n"
        )
    a = bench.model_params(f"{tmp_path / 'a' / 'nets.py'}:Net")
    b = bench.model_params(f"{tmp_path / 'b' / 'nets.py'}:Net")
    assert a.shapes == ((4, 4),) and b.shapes == ((6, 6),)
    modules = {m.__file__: name for name, m in list(__import__("sys").modules.items()) if name.startswith("kronopt_bench_model_")}
    assert len({modules[str(tmp_path / f / "nets.py")] for f in "ab"}) == 2


def test_a_model_file_that_exits_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "script.py").write_text("import sys\nsys.exit('usage: script.py DATA')\n")
    assert cli.main(["bench", "adamw", "--model", f"{tmp_path / 'script.py'}:build", *TINY]) == 2
    err = capsys.readouterr().err
    assert "cannot be imported (SystemExit: usage: script.py DATA)" in err


def test_the_scaling_table_names_its_dtype(capsys):
    assert cli.main(["bench", "adamw", "--d", "8", "--layers", "1", "--dtype", "bfloat16", "--scaling", "8", *TINY]) == 0
    assert "scaling: one-layer transformer-shaped set (bfloat16)" in capsys.readouterr().out


def test_the_routing_of_each_kronopt_optimizer_is_reported_for_a_model(models, capsys):
    """kl_shampoo sends the embedding (by name) and the four vectors (by dimension) to its AdamW and keeps the two
    hidden matrices; soap keeps everything; a peer gets no line (counted by hand from Net)."""
    assert bench.routing("kl_shampoo", bench.model_params("bench_models:Net")) == {
        "pipeline": (2, 128 * 32 + 32 * 128), "fallback": (5, 100 * 32 + 128 + 32 + 32 + 32),
    }
    assert bench.routing("soap", bench.model_params("bench_models:Net")) == {"pipeline": (7, 11616)}
    assert cli.main(["bench", "kl_shampoo", "soap", "torch.AdamW", "--model", "bench_models:Net", *TINY]) == 0
    out = capsys.readouterr().out
    assert "kl_shampoo  pipeline 2 (0.01 M numbers), fallback 5 (0.00 M numbers)" in out
    assert "soap        pipeline 7 (0.01 M numbers)" in out
    assert not any(line.startswith("torch.AdamW  pipeline") for line in out.splitlines())
    assert cli.main(["bench", "soap", "--shapes", "4x4,4", *TINY]) == 0
    assert "routing:" not in capsys.readouterr().out  # the bench's own names route by dimension only


def _safetensors(path, tensors: dict) -> None:
    """A safetensors file written by hand (its format: an 8-byte little-endian header length, the JSON header,
    then the data), so the test needs no safetensors package."""
    import json

    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, data, at = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        data, at = data + raw, at + len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_a_checkpoint_gives_its_tensors_by_name_shape_and_dtype_without_the_model(tmp_path, capsys):
    """safetensors (one file, or shards with their index) and torch.save'd state dicts: the floating tensors by
    name, shape and dtype; an integer buffer left out and counted; routing sees the checkpoint's names."""
    one = {"model.embed_tokens.weight": torch.zeros(50, 8), "model.layers.0.mlp.up_proj.weight": torch.zeros(32, 8, dtype=torch.bfloat16),
           "model.layers.0.norm.weight": torch.zeros(8), "model.position_ids": torch.zeros(1, 16, dtype=torch.int64)}
    _safetensors(tmp_path / "one.safetensors", one)
    params = bench.model_params(str(tmp_path / "one.safetensors"))
    assert list(zip(params.names, params.shapes, params.dtypes)) == [
        ("model.embed_tokens.weight", (50, 8), torch.float32),
        ("model.layers.0.mlp.up_proj.weight", (32, 8), torch.bfloat16),
        ("model.layers.0.norm.weight", (8,), torch.float32),
    ]
    assert params.source == "checkpoint one.safetensors, 1 other tensors left out"
    _safetensors(tmp_path / "part-1.safetensors", {"a.weight": torch.zeros(4, 4)})
    _safetensors(tmp_path / "part-2.safetensors", {"b.weight": torch.zeros(6, 4), "lm_head.weight": torch.zeros(9, 4)})
    index = {"metadata": {}, "weight_map": {"a.weight": "part-1.safetensors", "b.weight": "part-2.safetensors",
                                            "lm_head.weight": "part-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    sharded = bench.model_params(str(tmp_path / "model.safetensors.index.json"))
    assert sharded.names == ("a.weight", "b.weight", "lm_head.weight") and sharded.shapes == ((4, 4), (6, 4), (9, 4))
    torch.save({"w": torch.zeros(5, 3), "scale": torch.tensor(2.0), "steps": torch.tensor(3)}, tmp_path / "sd.pt")
    saved = bench.model_params(str(tmp_path / "sd.pt"))
    assert saved.names == ("w", "scale") and saved.shapes == ((5, 3), ())
    assert bench.routing("kl_shampoo", params) == {"pipeline": (1, 256), "fallback": (2, 408)}
    assert cli.main(["bench", "kl_shampoo", "--model", str(tmp_path / "one.safetensors"), *TINY]) == 0
    assert "(checkpoint one.safetensors, 1 other tensors left out), bfloat16/float32, device cpu" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", b"\xff" * 8])
def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors"):
        bench.model_params(str(path))
    (tmp_path / "x.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        bench.model_params(str(tmp_path / "x.pt"))
    torch.save({"model": {"w": torch.zeros(2, 2)}, "optimizer": {"state": {}}, "model_args": 3}, tmp_path / "nested.pt")
    assert bench.model_params(str(tmp_path / "nested.pt")).names == ("w",)  # a training script's checkpoint
    torch.save({"step": 3, "config": {"lr": 0.1}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a mapping of names to tensors"):
        bench.model_params(str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="no checkpoint file"):
        bench.model_params(str(tmp_path / "absent.safetensors"))
