"""``bucket_cap_mib``: no bucket holds more optimizer state than the cap, and nothing else changes.

A step makes a bucket's new state before writing it into the old, so its transient memory follows the
largest bucket's state; the cap cuts blocks of one shape into several buckets. What is checked here:
the buckets' sizes against the state each parameter really holds (``opt.state[p]``), the same bits as
without a cap on every preset (blocks whose sides are multiples of 4, where a bucket steps its blocks
exactly as alone: DESIGN.md's invariant 4), the cap kept when parts split by missing gradients join
again and across a save and load, and the memory a step holds at once, counted by
``kronopt.app.bench.TransientMemory``, falling with the cap.
"""

import math
import warnings

import attrs
import pytest
import torch

import kronopt
from kronopt.app.bench import TransientMemory
from kronopt.config import ConfigError

PRESETS = ["adamw", "soap", "shampoo", "muon", "dykaf", "kl_shampoo", "kl_soap", "pro_kl_shampoo", "pro_soap"]


def _params(count: int = 10, shape: tuple[int, int] = (16, 32)) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (f"layers.{i}.mlp.fc.weight", torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i))))
        for i in range(count)
    ]


def _grad(t: int, i: int, shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * t + i))


def _run(preset: str, cap: float, *, steps: int = 12, absent: frozenset[int] = frozenset(), shape=(16, 32)):
    """Weights after ``steps`` steps; at the steps in ``absent`` every third parameter has no gradient."""
    named = _params(shape=shape)
    opt = kronopt.build(named, preset, bucket_cap_mib=cap, **{"refresh.every": 5} if preset != "adamw" and preset != "muon" else {})
    for t in range(steps):
        for i, (_, p) in enumerate(named):
            p.grad = None if t in absent and i % 3 == 0 else _grad(t, i, p.shape)
        opt.step()
    return [p.detach().clone() for _, p in named], opt


def _block_bytes(opt, p) -> int:
    """The bytes of the state one parameter holds, as ``state[p]`` shows it (views of its bucket's stacks)."""
    return sum(v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "adamw"])
@pytest.mark.parametrize("blocks_allowed", [1, 3, 4, 10])
def test_buckets_are_the_fewest_of_nearly_equal_size_under_the_cap(preset, blocks_allowed):
    named = _params()
    probe = kronopt.build(named, preset)
    per = _block_bytes(probe, named[0][1])
    assert per > 0
    cap_mib = (blocks_allowed * per + per // 2) / 2**20  # room for blocks_allowed blocks and half of another
    opt = kronopt.build(named, preset, bucket_cap_mib=cap_mib)
    sizes = [row["blocks"] for row in opt.bucket_summary()]
    assert sum(sizes) == 10
    assert len(sizes) == math.ceil(10 / blocks_allowed)
    assert max(sizes) - min(sizes) <= 1
    assert all(n * per <= cap_mib * 2**20 for n in sizes)


def test_a_block_larger_than_the_cap_is_a_bucket_of_its_own():
    named = _params(count=3)
    opt = kronopt.build(named, "soap", bucket_cap_mib=1e-6)
    assert [row["blocks"] for row in opt.bucket_summary()] == [1, 1, 1]


def test_no_cap_and_a_cap_above_the_state_keep_one_bucket():
    named = _params()
    assert [r["blocks"] for r in kronopt.build(named, "soap").bucket_summary()] == [10]
    assert [r["blocks"] for r in kronopt.build(named, "soap", bucket_cap_mib=1e3).bucket_summary()] == [10]
    with pytest.raises(ConfigError, match="bucket_cap_mib"):
        kronopt.build(named, "soap", bucket_cap_mib=math.inf)  # no cap is 0


@pytest.mark.parametrize("preset", PRESETS)
def test_a_cap_changes_no_bit_of_the_trajectory(preset):
    ref, _ = _run(preset, 0.0)
    capped, opt = _run(preset, 1e-6)  # one block a bucket
    assert len(opt.bucket_summary()) == 10
    for a, b in zip(ref, capped):
        assert torch.equal(a, b)


def test_parts_joined_after_missing_gradients_stay_under_the_cap():
    named = _params()
    per = _block_bytes(kronopt.build(named, "soap"), named[0][1])
    cap = (4 * per) / 2**20
    ref, plain = _run("soap", 0.0, absent=frozenset({3, 4}))
    capped, opt = _run("soap", cap, absent=frozenset({3, 4}))
    sizes = [row["blocks"] for row in opt.bucket_summary()]
    assert sum(sizes) == 10 and max(sizes) <= 4
    assert [row["blocks"] for row in plain.bucket_summary()] != sizes  # the uncapped parts joined beyond it
    for a, b in zip(ref, capped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved_cap, loaded_cap", [(1e-6, 0.0), (0.0, 1e-6)])
def test_a_load_across_caps_continues_the_same_trajectory_under_the_loading_cap(saved_cap, loaded_cap):
    named = _params()
    opt = kronopt.build(named, "soap", bucket_cap_mib=saved_cap, **{"refresh.every": 5})
    for t in range(7):
        for i, (_, p) in enumerate(named):
            p.grad = _grad(t, i, p.shape)
        opt.step()
    saved = opt.state_dict()
    again = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    other = kronopt.build(again, "soap", bucket_cap_mib=loaded_cap, **{"refresh.every": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cap changes no number: no "different config" warning
        other.load_state_dict(saved)
    for t in range(7, 13):
        for i, ((_, p), (_, q)) in enumerate(zip(named, again)):
            p.grad = _grad(t, i, p.shape)
            q.grad = p.grad.clone()
        opt.step()
        other.step()
    for (_, p), (_, q) in zip(named, again):
        assert torch.equal(p, q)
    sizes = [row["blocks"] for row in other.bucket_summary()]
    assert sizes == ([1] * 10 if loaded_cap else [10])


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_a_cap_bounds_the_memory_a_step_allocates(preset):
    """Eight blocks, stepped as one bucket and then one block a bucket: the most memory a step holds at once
    (a plain step and a refresh) falls to about an eighth."""
    peaks = {}
    for cap in (0.0, 1e-6):
        named = _params(count=8, shape=(64, 128))
        opt = kronopt.build(named, preset, bucket_cap_mib=cap, **{"refresh.every": 4})
        seen = []
        for t in range(9):
            for i, (_, p) in enumerate(named):
                p.grad = _grad(t, i, p.shape)
            with TransientMemory() as mode:
                opt.step()
            seen.append(mode.peak)
        peaks[cap] = max(seen[2:])  # past the first calls, a refresh among them
    state = sum(_block_bytes(opt, p) for _, p in named)
    assert peaks[0.0] > 0.5 * state  # without a cap a step holds about a bucket's state anew
    assert peaks[1e-6] < 0.25 * peaks[0.0]


def test_the_cap_is_validated_and_top_level_only():
    w = ("w", torch.nn.Parameter(torch.randn(4, 4)))
    with pytest.raises(ConfigError, match="bucket_cap_mib"):
        kronopt.build([w], "soap", bucket_cap_mib=-1)
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises((ConfigError, ValueError), match="bucket_cap_mib"):
        kronopt.build([{"params": [("w", p)]}, {"params": [("v", q)], "bucket_cap_mib": 1.0}], "soap")
    cfg = kronopt.config.from_dict({**kronopt.config.to_dict(kronopt.presets.SOAP), "bucket_cap_mib": 64})
    assert kronopt.config.from_dict(kronopt.config.to_dict(cfg)).bucket_cap_mib == 64.0
    assert kronopt.presets.SOAP.bucket_cap_mib == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_a_cap_lowers_the_cuda_allocators_peak_as_the_counters(preset):
    """On a GPU, the caching allocator's own peak over a step (``torch.cuda.max_memory_allocated`` above what
    was allocated before it) falls with the cap as the counter's does: eight blocks in one bucket, then one
    block a bucket."""
    device = torch.device("cuda")
    seen = {}
    for cap in (0.0, 1e-6):
        named = [(n, torch.nn.Parameter(p.detach().to(device))) for n, p in _params(count=8, shape=(256, 512))]
        opt = kronopt.build(named, preset, bucket_cap_mib=cap, **{"refresh.every": 4})
        peaks = []
        for t in range(9):
            for i, (_, p) in enumerate(named):
                p.grad = _grad(t, i, p.shape).to(device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with TransientMemory() as mode:
                opt.step()
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - before, mode.peak))
        seen[cap] = tuple(max(x) for x in zip(*peaks[2:]))
        del opt, named
    (alloc_plain, counted_plain), (alloc_capped, counted_capped) = seen[0.0], seen[1e-6]
    assert alloc_capped < 0.4 * alloc_plain
    assert counted_capped < 0.4 * counted_plain


@pytest.mark.parametrize("key, value", [("bucket_cap_mib", 5.0), ("nonfinite", "raise"), ("nonfinite_scope", "block"),
                                        ("max_skipped_steps", 3), ("matmul_precision", "inherit")])
def test_a_fallback_table_gives_a_top_level_only_value_at_its_default_only(key, value):
    """These values are read from the top-level config for every parameter, the fallback's too: a ``[fallback]`` table
    setting another value was accepted and ignored (``fallback.nonfinite = "raise"`` raised for nothing). Now refused
    in a TOML file and an override, listed with the config's other problems; the default (as dumps write it) passes."""
    text = kronopt.dumps(kronopt.resolve("kl_shampoo"))
    head, sep, tail = text.partition("[fallback]\n")
    line = next(x for x in tail.splitlines() if x.startswith(f"{key} = "))
    bad = head + sep + tail.replace(line, f"{key} = {value!r}".replace("'", '"'), 1)
    with pytest.raises(ConfigError) as info:
        kronopt.loads(bad.replace("[fallback]\nlr = ", "[fallback]\nlr = -", 1))
    paths = [path for path, _ in info.value.errors]
    assert paths == ["fallback.lr", f"fallback.{key}"], info.value
    assert "read from the top-level config for every parameter" in str(info.value)
    with pytest.raises(ConfigError, match=rf"fallback\.{key}: is read from the top-level config"):
        kronopt.resolve("kl_shampoo", **{f"fallback.{key}": value})
    assert kronopt.loads(text) == kronopt.resolve("kl_shampoo")  # the defaults, as written: a round trip
    cfg = kronopt.resolve("kl_shampoo")
    with pytest.raises(ValueError, match=rf"the fallback sets {key} = "):  # built in Python: not a config whose dump fails
        attrs.evolve(cfg, fallback=attrs.evolve(cfg.fallback, **{key: value}))
    assert getattr(kronopt.resolve("kl_shampoo", **{key: value}), key) == value  # at the top level: taken


def test_a_state_dict_whose_fallback_table_set_an_ignored_value_loads_as_its_run_stepped():
    """A checkpoint of kronopt before the refusal may carry ``fallback.bucket_cap_mib = 5`` (or another ignored
    value) in its config: it loads without a warning into the optimizer of its preset, rebuilds with
    ``from_state_dict`` and reads with ``saved_views``, its fallback stepping as before (the top-level values)."""
    named = _params(count=2) + [("layers.0.norm.weight", torch.nn.Parameter(torch.ones(32)))]
    opt = kronopt.build(named, "kl_shampoo")
    for t in range(2):
        for i, (_, p) in enumerate(named):
            p.grad = _grad(t, i, p.shape)
        opt.step()
    saved = opt.state_dict()
    saved["kronopt"]["config"]["fallback"].update(bucket_cap_mib=5.0, nonfinite="raise", matmul_precision="inherit")
    other = kronopt.build([(n, torch.nn.Parameter(p.detach().clone())) for n, p in named], "kl_shampoo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(saved)
        rebuilt = kronopt.from_state_dict([(n, torch.nn.Parameter(p.detach().clone())) for n, p in named], saved)
    assert rebuilt.config == opt.config
    assert set(kronopt.inspection.saved_views(saved)) == {n for n, _ in named}
