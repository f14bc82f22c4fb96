"""Review of ``kronopt bench --groups`` (39e8e8f) and the plain write in one set of ``foreach`` calls (7c93dfb).

Two defects it found are mended (an optimizer whose groups hold a learning rate of ``None``; a name part that
``str.isdigit`` takes and ``int`` does not): their tests fail on the code before the mend. The other tests pin what
held under review (the grouping carried by every path of a run, rates set after the build
taken by the step, the plain write's bits against the write it replaced)."""

import json
import random
import textwrap

import attrs
import pytest
import torch

import kronopt
from kronopt import post as post_module
from kronopt.app import bench, cli, peers
from tests.unit.test_bench_groups import NET, _assert_rates_follow_the_groups, _opts, _params, _rates_by_param, _set  # noqa: F401

def _module(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


# -- defects ---------------------------------------------------------------------------------------------------------

_LRLESS = """
    import torch

    class RelativeStep(torch.optim.Optimizer):
        '''As transformers' Adafactor (relative_step=True): ``lr`` None, the step size its own.'''

        def __init__(self, params, lr=None, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                size = 1e-2 if group["lr"] is None else group["lr"]
                for p in group["params"]:
                    p.add_(p.grad, alpha=-size)
"""


def test_an_optimizer_whose_groups_hold_no_learning_rate_is_built_in_layer_groups(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "review_lrless", _LRLESS)
    for grouping in ("decay", "layers"):  # decay sets weight_decay alone: it builds; layers scales lr: it raises
        params = _params()
        opt, _ = bench._make("review_lrless:RelativeStep", params, _set(grouping))
        assert [g["lr"] for g in opt.param_groups] == [None] * len(bench.param_groups(_set(grouping)))
        for p, g in zip(params, _params(seed=1)):
            p.grad = g.detach()
        opt.step()


def test_a_name_part_that_is_a_digit_but_no_number_is_no_layer():
    model = torch.nn.ModuleDict({"²": torch.nn.Linear(2, 2), "1": torch.nn.Linear(2, 2)})
    net = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert bench.param_groups(_set("layers", net)) == [([0, 1], {}), ([2, 3], {"lr_scale": 1.0})]


# -- what held: pinned -----------------------------------------------------------------------------------------------


def _old_apply_plainly_(work):
    """``post._apply_plainly_`` as it was before 7c93dfb: one set of foreach calls per (order, dtype, device, lr, wd)."""
    together = {}
    for post, params, D, lr, weight_decay in work:
        dtype = post_module._factor_dtype(D.dtype)
        key = (post.weight_decay_order, dtype, D.device, float(lr), float(weight_decay))
        if key not in together:
            scale, decay = post_module._block_factors(dtype, D.device, lr, weight_decay)
            together[key] = (post, [], [], [scale], None if decay is None else [decay])
        _, ps, steps, _, _ = together[key]
        ps.extend(params)
        steps.extend([D.view(params[0].shape)] if len(params) == 1 else [d.view(p.shape) for d, p in zip(D.unbind(0), params)])
    for post, ps, steps, scale, decay in together.values():
        post._apply_all_(ps, steps, scale * len(steps), None if decay is None else decay * len(steps))


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def test_the_plain_write_gives_the_bits_of_the_write_per_rate():
    """Random steps of several buckets (bfloat16, float16, float32 and float64 directions into parameters of other
    dtypes, both weight-decay orders, weight decay 0 and not, learning rates alike and apart, lr 0): the one set of
    calls per kind of write gives every parameter the bits the set per (lr, weight_decay) gave. Fails on a factor
    given to another block, or a block written with another group's rates."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for trial in range(120):
        spec = []
        for _ in range(rng.randint(1, 6)):
            blocks, shape = rng.randint(1, 3), (rng.randint(1, 4), rng.randint(1, 4))
            p_dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
            d_dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64])
            spec.append((
                rng.choice(["before", "after"]),
                [torch.randn(shape, generator=gen).to(p_dtype) for _ in range(blocks)],
                torch.randn((blocks, *shape), generator=gen).to(d_dtype),
                rng.choice([1e-3, 3e-4 * 0.9 ** rng.randint(0, 4), 0.0, 1, 0.1]),
                rng.choice([0.0, 0, 0.1, 1e-5]),
            ))
        out = []
        for write in (_old_apply_plainly_, post_module._apply_plainly_):
            work = [(post_module.Post(weight_decay_order=o), [p.clone() for p in ps], D.clone(), lr, wd) for o, ps, D, lr, wd in spec]
            write(work)
            out.append([p for w in work for p in w[1]])
        for before, now in zip(*out):
            assert before.dtype == now.dtype
            assert torch.equal(before.view(_BITS[before.dtype]), now.view(_BITS[now.dtype])), trial


@pytest.mark.parametrize("grouping", ["decay", "layers"])
def test_every_preset_takes_the_groups_and_their_rates(grouping):
    """Every kronopt preset (the existing test reads three): each parameter in one group with its group's rates over
    the preset's own, the main pipeline's and the fallback's alike."""
    for preset in kronopt.PRESETS:
        _assert_rates_follow_the_groups(preset, grouping)


@pytest.mark.parametrize("peer", ["torch.AdamW", "pytorch_optimizer.SOAP", "heavyball.SOAP"])
@pytest.mark.parametrize("grouping", ["decay", "layers"])
def test_a_peers_rates_set_after_the_build_step_as_rates_given_to_its_constructor(peer, grouping):
    """The peer built by the bench (rates set on its groups once built) and the same constructor given the groups
    with their rates in its dicts, as a training script gives them: the same bits after four steps. Fails on a peer
    that reads its rates once, when built."""
    entry = peers.PEERS[peer]
    package = pytest.importorskip(entry.package)
    groups = bench.param_groups(_set(grouping))
    net = NET  # the presets these peers match route nothing by name: the peer's own class takes every parameter
    assert kronopt.PRESETS[entry.matches].fallback is None
    built, by_hand = _params(net), _params(net)
    opt, _ = bench._make(peer, built, _set(grouping, net))
    lr = entry.construct(package, _params(net))[0].param_groups[0]["lr"]
    dicts = [
        {"params": [by_hand[i] for i in g], **({"lr": lr * r["lr_scale"]} if "lr_scale" in r else {}),
         **({"weight_decay": r["weight_decay"]} if "weight_decay" in r else {})}
        for g, r in groups
    ]
    ref, _ = entry.construct(package, dicts)
    with peers.eager():
        for step in range(4):
            for a, b, g in zip(built, by_hand, _params(net, seed=step + 1)):
                a.grad, b.grad = g.detach().clone(), g.detach().clone()
            opt.step()
            ref.step()
    assert all(torch.equal(a, b) for a, b in zip(built, by_hand))


def test_peers_routing_by_name_keep_the_groups_when_a_side_of_a_split_is_empty():
    """A model whose only matrices are an embedding and a head: torch.Muon's every parameter goes to the muon preset's
    fallback AdamW, in the groups; a layer of vectors alone leaves the main side without that group. Each parameter
    once, with its rate."""
    net = [("embed.weight", (16, 8)), ("layers.0.norm.weight", (8,)), ("layers.1.norm.weight", (8,)), ("lm_head.weight", (16, 8))]
    for grouping in ("decay", "layers"):
        opt, params = _assert_rates_follow_the_groups("torch.Muon", grouping, net)
        assert isinstance(opt, torch.optim.AdamW)
        for p, g in zip(params, _params(net, seed=1)):
            p.grad = g.detach()
        opt.step()
    # a matrix in layer 0 alone, a gain in layer 1 alone: each side of each split holds one of the three groups
    net = [("embed.weight", (16, 8)), ("layers.0.w", (8, 8)), ("layers.1.norm.weight", (8,)), ("lm_head.weight", (16, 8))]
    opt, params = _assert_rates_follow_the_groups("torch.Muon", "layers", net)
    at = {id(p): i for i, p in enumerate(params)}
    held = [[[at[id(p)] for p in g["params"]] for g in o.param_groups] for o in _opts(opt)]
    assert held == [[[1]], [[2]], [[0, 3]]]  # Muon; its AdamW for the rest; the muon preset's fallback AdamW by name


def test_an_optimizer_class_without_group_dicts_fails_loudly_not_silently(tmp_path, monkeypatch):
    """``module:Class`` that takes a list of Parameters alone (as KellerJordan/Muon's ``Muon``): under several groups
    its row says it failed when built; in one group it runs."""
    _module(tmp_path, monkeypatch, "review_tensors_only", """
        import torch

        class TensorsOnly(torch.optim.SGD):
            def __init__(self, params, lr=0.02):
                assert isinstance(params, list) and isinstance(params[0], torch.nn.Parameter)
                super().__init__(params, lr=lr)
    """)
    rows = bench.bench(["adamw", "review_tensors_only:TensorsOnly"], _set("decay"), steps=1, warmup=0, device="cpu")
    assert rows[1]["failed"] is not None and rows[1]["failed"]["step"] == 0
    # the line says why: the groups (the class's own assertion has no message)
    assert rows[1]["failed"]["error"] == (
        "AssertionError (built in 2 param groups (--groups decay); --groups one builds it on a plain list of tensors)"
    )
    rows = bench.bench(["adamw", "review_tensors_only:TensorsOnly"], _set("one"), steps=1, warmup=0, device="cpu")
    assert rows[1]["failed"] is None


def test_the_alone_replays_and_a_world_of_one_build_in_the_groups(monkeypatch):
    """``--alone``'s recording and ``bench_world``'s ranks (world 1, in this process) build every optimizer in the
    run's groups: the set given keeps its grouping through ``ParamSet.of``."""
    seen = []
    real = bench._make

    def spy(name, params, param_set=None):
        seen.append((name, param_set.grouping))
        return real(name, params, param_set)

    monkeypatch.setattr(bench, "_make", spy)
    bench.replay_makers(["soap"], _set("layers"), steps=2, device="cpu")
    assert seen == [("soap", "layers")]
    rows = bench.bench_world(["adamw", "torch.AdamW"], _set("decay"), worlds=[1], steps=1, warmup=0, threads=1)
    assert seen[1:] == [("adamw", "decay"), ("torch.AdamW", "decay")]
    assert all(r["failed"] is None for r in rows)


_TIED = """
    import torch
    from torch import nn

    class Tied(nn.Module):
        def __init__(self, v=32, d=8, n=2):
            super().__init__()
            self.embed = nn.Embedding(v, d)
            self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d)) for _ in range(n))
            self.norm = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, v, bias=False)
            self.lm_head.weight = self.embed.weight  # tied: named once

    def build():
        return Tied()
"""


def test_a_model_with_tied_weights_from_a_file_runs_in_layer_groups_and_records_them(tmp_path, capsys):
    """``--model path/nets.py:build`` (a tied embedding and head, layers numbered by a ModuleList): the tied weight
    once, in the unnumbered group; three groups named in the header and recorded; the routed peer (torch.Muon: the
    embedding to the muon preset's AdamW) runs in them."""
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent(_TIED))
    params = bench.model_params(f"{path}:build")
    layered = attrs.evolve(params, grouping="layers")
    names = list(params.names)
    assert names.count("embed.weight") == 1 and "lm_head.weight" not in names
    groups = bench.param_groups(layered)
    assert [[names[i] for i in g] for g, _ in groups][0] == ["embed.weight", "norm.weight", "norm.bias"]
    assert [r for _, r in groups] == [{}, {"lr_scale": 0.9}, {"lr_scale": 1.0}]
    record = tmp_path / "run.json"
    args = ["bench", "muon", "torch.Muon", "--model", f"{path}:build", "--steps", "1", "--warmup", "0", "--threads", "1"]
    assert cli.main([*args, "--groups", "layers", "--json", str(record)]) == 0
    out = capsys.readouterr().out
    assert "3 param groups (--groups layers)" in out and "failed" not in out
    assert json.loads(record.read_text())["settings"]["groups"] == "layers"


def test_bfloat16_parameters_step_in_the_groups():
    """``--dtype bfloat16``: kronopt's presets with a fallback (routing the embedding, the head and the gains) and
    torch's peers step bfloat16 parameters in layer groups."""
    net_set = _set("layers", dtype=torch.bfloat16)
    for name in ("muon", "kl_shampoo", "soap", "torch.Muon", "torch.AdamW"):
        params = _params(dtype=torch.bfloat16)
        opt, _ = bench._make(name, params, net_set)
        for p, g in zip(params, _params(seed=1, dtype=torch.bfloat16)):
            p.grad = g.detach()
        opt.step()
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params), name
