"""``kronopt bench --groups``: every optimizer of a run, kronopt's and the others', steps the parameters in the same
param groups with the same rates (weight decay off on vectors, or a learning rate per layer), so a run times what
a training script's groups cost each of them."""

import json

import pytest
import torch

import kronopt
from kronopt.app import bench, cli, peers

#: a small model's names and shapes: an embedding, two numbered layers, a final norm and a head
NET = [
    ("embed.weight", (16, 8)),
    ("model.layers.0.attn.weight", (8, 8)),
    ("model.layers.0.norm.weight", (8,)),
    ("model.layers.1.attn.weight", (8, 8)),
    ("model.layers.1.mlp.weight", (12, 8)),
    ("norm.weight", (8,)),
    ("lm_head.weight", (16, 8)),
]


def _set(grouping, net=NET, dtype=torch.float32):
    names, shapes = zip(*net)
    return bench.ParamSet(shapes, names, [dtype] * len(shapes), grouping=grouping)


def _params(net=NET, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for _, shape in net]


def _opts(opt):
    return opt.opts if isinstance(opt, peers.StepAll) else (opt,)


def _rates_by_param(opt, params):
    """Each parameter's ``(lr, weight_decay)`` in the optimizer (each one a StepAll holds), by position; a parameter in
    two groups fails."""
    found = {}
    for o in _opts(opt):
        for group in o.param_groups:
            for p in group["params"]:
                assert id(p) not in found, "a parameter in two param groups"
                found[id(p)] = (group.get("lr"), group.get("weight_decay"))
    return [found[id(p)] for p in params]


def _assert_rates_follow_the_groups(name, grouping, net=NET):
    """``name`` built in ``grouping``'s groups: each parameter's rates are :func:`bench.param_groups`' over those it has
    in one group (the optimizer's own rates, or its fallback's for what it routes there). Returns the optimizer and
    its parameters."""
    params, plain_params = _params(net), _params(net)
    opt, _ = bench._make(name, params, _set(grouping, net))
    plain, _ = bench._make(name, plain_params, _set("one", net))
    wanted = {i: r for g, r in bench.param_groups(_set(grouping, net)) for i in g}
    for i, ((lr, wd), (lr0, wd0)) in enumerate(zip(_rates_by_param(opt, params), _rates_by_param(plain, plain_params))):
        assert lr == pytest.approx(lr0 * wanted[i].get("lr_scale", 1.0), rel=1e-12), (name, grouping, net[i][0])
        assert wd == wanted[i].get("weight_decay", wd0), (name, grouping, net[i][0])
    return opt, params


def test_the_groupings_partition_a_models_parameters_as_documented():
    """Values written out by hand: fails on a layer read from another part of the name, a group out of order, a
    decay on a layer below the top, or a vector that keeps its weight decay."""
    assert bench.param_groups(_set("one")) == [(list(range(7)), {})]
    assert bench.param_groups(_set("decay")) == [([0, 1, 3, 4, 6], {}), ([2, 5], {"weight_decay": 0.0})]
    assert bench.param_groups(_set("layers")) == [
        ([0, 5, 6], {}),  # no number in the name: the optimizer's own rate
        ([1, 2], {"lr_scale": 0.9}),  # layer 0, one below the top
        ([3, 4], {"lr_scale": 1.0}),
    ]
    # the first part that is a number, whole: "h0" is no layer, "10" is layer 10 (the top: 0.9 ** 8 below it for 2)
    odd = [("h0.weight", (4, 4)), ("blocks.10.w", (4, 4)), ("blocks.2.w.3", (4,))]
    assert bench.param_groups(_set("layers", odd)) == [([0], {}), ([1], {"lr_scale": 1.0}), ([2], {"lr_scale": 0.9**8})]
    # no vector: one group, not an empty second one
    assert bench.param_groups(_set("decay", NET[:2])) == [([0, 1], {})]


def test_an_unknown_grouping_is_refused():
    with pytest.raises(ValueError, match="grouping"):
        _set("per-layer")


@pytest.mark.parametrize("preset", ["soap", "adamw", "muon"])
def test_kronopt_takes_the_groups_and_their_rates_and_shares_its_buckets(preset):
    """Each parameter's rates as :func:`param_groups` gives them over those it has in one group (the preset's own
    rates, read from its config there, or its fallback's for what it routes to the fallback: muon's embedding, head
    and gains); the groups differ in their rates alone, so the blocks of a shape stay in one bucket, as in one group.
    Fails on a group left out, a rate on the wrong group, or a step that stacks by group."""
    cfg = kronopt.resolve(preset)
    for grouping in ("layers", "decay"):
        opt, params = _assert_rates_follow_the_groups(preset, grouping)
        plain_params = _params()
        plain, _ = bench._make(preset, plain_params, _set("one"))
        own = _rates_by_param(plain, plain_params)
        assert own[1] == (cfg.lr, cfg.weight_decay)  # a layer's matrix: the preset's own rates
        if preset == "adamw" and grouping == "decay":  # its vectors stay in its one pipeline: decayed in one group
            assert own[2][1] == cfg.weight_decay > 0 and _rates_by_param(opt, params)[2][1] == 0.0
        for p, g in zip([*params, *plain_params], [*_params(seed=1), *_params(seed=1)]):
            p.grad = g.detach()
        opt.step()
        plain.step()
        assert sorted((b["m"], b["n"], b["blocks"]) for b in opt.bucket_summary()) == sorted(
            (b["m"], b["n"], b["blocks"]) for b in plain.bucket_summary()
        )


def test_the_rates_change_the_step_as_a_learning_rate_per_layer_does():
    """The same run with the rates given to kronopt at build time: the same parameters after a step. Fails where the
    rates set after the build are not the ones the step uses."""
    params, by_hand = _params(), _params()
    opt, _ = bench._make("soap", params, _set("layers"))
    lr = kronopt.resolve("soap").lr
    named = list(zip([n for n, _ in NET], by_hand))
    ref = kronopt.build(
        [{"params": [named[i] for i in (0, 5, 6)]}, {"params": [named[i] for i in (1, 2)], "lr": lr * 0.9},
         {"params": [named[i] for i in (3, 4)], "lr": lr}],
        "soap",
    )
    for step in range(3):
        for a, b, g in zip(params, by_hand, _params(seed=step + 1)):
            a.grad, b.grad = g.detach().clone(), g.detach().clone()
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(params, by_hand))
    assert not torch.equal(params[1], _params()[1])


@pytest.mark.parametrize("peer", ["torch.AdamW", "torch.Muon"])
@pytest.mark.parametrize("grouping", ["decay", "layers"])
def test_a_peer_takes_the_same_groups_and_rates(peer, grouping):
    """torch's AdamW and Muon (plus its AdamW for the rest, and the muon preset's fallback AdamW for the embedding
    and the head, by name): every parameter in exactly one group, with its group's rates over the optimizer's own
    (read from a build in one group). Fails on a peer that drops the groups or takes the rates on other groups."""
    opt, params = _assert_rates_follow_the_groups(peer, grouping)
    for p, g in zip(params, _params(seed=1)):
        p.grad = g.detach()
    opt.step()


def test_an_imported_optimizer_takes_several_groups_as_dicts():
    """``module:Class`` gets torch.optim's group dicts, its rates set on them."""
    params = _params()
    opt, _ = bench._make("torch.optim:AdamW", params, _set("decay"))
    assert [len(g["params"]) for g in opt.param_groups] == [5, 2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # AdamW's own, and none on the vectors


def test_the_other_libraries_take_the_groups():
    """pytorch_optimizer's SOAP and Muon (its own AdamW groups beside the Muon ones), heavyball's SOAP and Muon."""
    pytest.importorskip("pytorch_optimizer")
    pytest.importorskip("heavyball")
    for peer in ("pytorch_optimizer.SOAP", "pytorch_optimizer.Muon", "heavyball.SOAP", "heavyball.Muon"):
        params = _params()
        opt, _ = bench._make(peer, params, _set("layers"))
        lrs = [lr for lr, _ in _rates_by_param(opt, params)]
        assert lrs[1] == pytest.approx(0.9 * lrs[3]), peer
        with peers.eager():
            for p, g in zip(params, _params(seed=1)):
                p.grad = g.detach()
            opt.step()


def test_the_command_line_names_the_groups_and_records_them(tmp_path, capsys):
    path = tmp_path / "run.json"
    args = ["bench", "soap", "torch.AdamW", "--shapes", "8x4,6x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]
    assert cli.main([*args, "--groups", "decay", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 parameters, 0.00 M numbers, 2 param groups (--groups decay)" in out
    assert json.loads(path.read_text())["settings"]["groups"] == "decay"
    assert cli.main([*args, "--groups", "per-layer"]) == 2
    assert "--groups: 'per-layer' is not one of: one, decay, layers" in capsys.readouterr().err


def test_a_comparison_names_another_grouping_and_reads_an_older_record_as_one_group(tmp_path):
    args = ["bench", "adamw", "--shapes", "8x4,4", "--steps", "1", "--warmup", "0", "--threads", "1"]
    paths = [tmp_path / f"{g}.json" for g in ("one", "layers")]
    for path, grouping in zip(paths, ("one", "layers")):
        assert cli.main([*args, "--groups", grouping, "--json", str(path)]) == 0
    a, b = (json.loads(p.read_text()) for p in paths)
    assert bench.compare_records(a, b)["differences"]["settings.groups"] == ("one", "layers")
    del a["settings"]["groups"]  # a record written before --groups: one group
    assert "settings.groups" not in bench.compare_records(a, {**b, "settings": {**b["settings"], "groups": "one"}})["differences"]


def test_the_scaling_table_and_the_world_ranks_step_in_the_groups(monkeypatch):
    """``--scaling``'s sets and each ``--world`` rank's optimizers are built in the run's groups too."""
    seen = []
    real = bench._make

    def spy(name, params, param_set=None):
        seen.append(None if param_set is None else param_set.grouping)
        return real(name, params, param_set)

    monkeypatch.setattr(bench, "_make", spy)
    bench.scaling(["adamw"], [4], steps=1, warmup=0, device="cpu", grouping="decay")
    assert seen and set(seen) == {"decay"}
    rows = bench._rank_rows(
        {"names": ["adamw"], "params": _set("layers"), "seed": 0, "warmup": 0, "steps": 1}, lambda failed: failed
    )
    assert seen[-1] == "layers" and rows[0]["failed"] is None


def test_the_transformer_shaped_set_is_named_by_layer_so_layers_are_its_layers(capsys):
    """``--d``/``--layers``' set: ``layers.<l>.…`` names (none a preset routes by name), a group per layer under
    ``--groups layers``, the top layer at the optimizer's own rate."""
    params = bench.transformer_set(8, 3)
    assert params.names[:6] == ("layers.0.attn.qkv.weight", "layers.0.attn.out.weight", "layers.0.mlp.up.weight",
                                "layers.0.mlp.down.weight", "layers.0.norm1.weight", "layers.0.norm2.weight")
    assert list(params.shapes) == bench.transformer_shapes(8, 3) and params.names[-1] == "layers.2.norm2.weight"
    groups = bench.param_groups(bench.ParamSet(params.shapes, params.names, params.dtypes, grouping="layers"))
    assert groups == [(list(range(0, 6)), {"lr_scale": 0.9**2}), (list(range(6, 12)), {"lr_scale": 0.9}),
                      (list(range(12, 18)), {"lr_scale": 1.0})]
    for name in ("muon", "kl_shampoo"):  # the presets that route by name: every matrix stays in the main pipeline
        assert bench.routing(name, params) == bench.routing(name, bench.ParamSet.of(params.shapes))
    assert cli.main(["bench", "adamw", "--d", "8", "--layers", "3", "--steps", "1", "--warmup", "0", "--threads", "1",
                     "--groups", "layers"]) == 0
    assert "18 parameters, 0.00 M numbers, 3 param groups (--groups layers)" in capsys.readouterr().out


def test_an_optimizer_without_param_groups_keeps_its_rates_with_a_warning(tmp_path, monkeypatch):
    """A ``module:Class`` that wraps another optimizer and holds no ``param_groups`` of its own cannot take the groups'
    rates: said, not silently passed over."""
    (tmp_path / "wrapped_opt.py").write_text(
        "import torch\n\n"
        "class Wrapper:\n"
        "    def __init__(self, params):\n"
        "        self.inner = torch.optim.SGD(params, lr=0.01)\n\n"
        "    def step(self):\n"
        "        self.inner.step()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="wrapped_opt:Wrapper holds no param_groups"):
        opt, _ = bench._make("wrapped_opt:Wrapper", _params(), _set("layers"))
    assert [g["lr"] for g in opt.inner.param_groups] == [0.01] * 3
