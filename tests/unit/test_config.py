"""Configs are data: TOML ⇄ dict ⇄ objects, and every error is listed with its path."""

import pathlib

import attrs
import pytest
import torch

import kronopt
from kronopt.config import ConfigError, apply_overrides

CONFIGS = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.toml"))


def test_every_preset_has_its_file():
    assert {p.stem for p in CONFIGS} >= set(kronopt.PRESETS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_files_load_to_their_preset_and_round_trip(path):
    cfg = kronopt.load(path)
    if path.stem in kronopt.PRESETS:
        assert cfg == kronopt.PRESETS[path.stem]
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg
    assert kronopt.from_dict(kronopt.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides",
    [
        {"inner.coefficients": "custom", "inner.custom_coefficients": [[3.0, -3.2, 1.2], [2.0, -1.5, 0.5]]},
        {"inner.eps": 1e-300, "lr": 0.5, "route.fallback_names": ["emb\\w+", "head$"]},
        {"inner.scale": "spectral", "inner.extra_scale": 0.25, "fallback.inner.betas": [0.5, 0.25]},
    ],
)
def test_generated_configs_round_trip(overrides):
    cfg = kronopt.resolve("muon", **overrides)
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg


INVALID = [
    ({"refresh.every": 0}, ["refresh.every: must be ≥ 1, got 0"]),
    ({"inner.betas": [0.9, 1.0]}, ["inner.betas: [1] must be < 1.0, got 1.0"]),
    # every bad entry of a list, by its index (the first one alone was named before, without its place)
    ({"inner.betas": [1.5, -0.1]}, ["inner.betas: [0] must be < 1.0, got 1.5; [1] must be ≥ 0.0, got -0.1"]),
    ({"inner.betas": [0.9]}, ["inner.betas: must have 2 entries, got 1"]),
    ({"lr": -1.0}, ["lr: must be ≥ 0.0, got -1.0"]),
    ({"lr": "fast"}, ["lr: must be a number, got 'fast'"]),
    ({"basis.type": "lanczos"}, ["basis.type: unknown basis stage 'lanczos'; available: eigh, identity, qr"]),
    ({"factors.beta": 2, "basis.bogus": 1}, ["factors.beta: must be < 1.0, got 2.0", "basis.bogus: unknown key; QrBasis accepts: null_space, power_steps, sort"]),
    ({"nonfinite": "ignore"}, ["nonfinite: must be one of 'warn', 'raise', 'skip', got 'ignore'"]),
    ({"inner.type": "orthogonalize", "inner.coefficients": "custom"}, ["inner: coefficients = 'custom' needs a non-empty custom_coefficients list"]),
    ({"route.fallback_names": ["(unclosed"]}, ["route.fallback_names: [0] '(unclosed' is not a valid regular expression"]),
    ({"factors.type": "none"}, ["basis.type: basis 'qr' needs Kronecker factors, but factors 'none' keeps none; use factors of type: ema"]),
    ({"basis.type": "identity", "inner.type": "eigenvalue"}, ["inner.type: inner 'eigenvalue' needs eigenvalue estimates, but neither basis 'identity' nor factors 'ema' provides them; use a basis of type: eigh, qr"]),
    ({"shapes.max_dim": True}, ["shapes.max_dim: must be an integer, got True"]),
    ({"bogus": 1}, ["bogus: unknown key; a config accepts:"]),
]


@pytest.mark.parametrize("overrides, messages", INVALID)
def test_invalid_configs_list_every_error_with_its_path(overrides, messages):
    with pytest.raises(ConfigError) as err:
        kronopt.resolve("soap", **overrides)
    text = str(err.value)
    for message in messages:
        assert message in text
    assert len(err.value.errors) == len(messages)


def test_missing_tables_and_types_are_reported_together():
    with pytest.raises(ConfigError) as err:
        kronopt.from_dict({"lr": 1e-3, "factors": {"type": "ema"}, "basis": {}, "inner": "adam"})
    paths = [p for p, _ in err.value.errors]
    assert paths == ["basis.type", "inner", "split", "refresh"]


def test_route_to_missing_fallback_is_an_error():
    raw = kronopt.to_dict(kronopt.PRESETS["muon"])
    del raw["fallback"]
    with pytest.raises(ConfigError, match="route: sends parameters to the fallback, but there is no"):
        kronopt.from_dict(raw)


def test_nested_fallback_is_rejected():
    raw = kronopt.to_dict(kronopt.PRESETS["muon"])
    raw["fallback"]["fallback"] = raw["fallback"].copy()
    with pytest.raises(ConfigError, match="fallback.fallback: unknown key"):
        kronopt.from_dict(raw)


def test_overrides_swap_a_stage_and_start_its_table_afresh():
    raw = kronopt.to_dict(kronopt.PRESETS["soap"])
    out = apply_overrides(raw, {"basis.type": "eigh", "inner.betas": [0.5, 0.6], "refresh.every": 3})
    assert out["basis"] == {"type": "eigh"}
    assert out["inner"]["betas"] == [0.5, 0.6] and out["inner"]["type"] == "adam"
    assert raw["basis"]["type"] == "qr", "the input is not modified"
    cfg = kronopt.resolve("soap", **{"basis.type": "eigh"})
    assert type(cfg.basis).__name__ == "EighBasis"


def test_unknown_preset_and_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'sooap'; presets: adamw, soap, shampoo, muon"):
        kronopt.resolve("sooap")
    with pytest.raises(ConfigError, match="cannot read config file"):
        kronopt.resolve(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        kronopt.resolve(str(bad))


def test_a_spec_of_another_type_is_refused_with_the_argument_order_named():
    model = torch.nn.Linear(3, 2)
    # the arguments swapped: the spec is the parameters' generator (a TypeError from pathlib before)
    with pytest.raises(TypeError, match=r"not a generator \(kronopt.build takes the parameters first"):
        kronopt.build("soap", model.named_parameters())
    with pytest.raises(TypeError, match="not a list"):
        kronopt.resolve([("w", model.weight)])
    assert kronopt.resolve(pathlib.Path(__file__).parents[2] / "configs" / "soap.toml") == kronopt.resolve("soap")


def test_toml_writer_handles_special_floats_and_strings():
    text = kronopt.dumps({"a": float("inf"), "b": 'quote " and \\ backslash', "c": [1e-300, -0.0], "t": {"x": True}})
    import tomllib

    data = tomllib.loads(text)
    assert data["a"] == float("inf") and data["b"] == 'quote " and \\ backslash' and data["c"] == [1e-300, -0.0]
    assert data["t"] == {"x": True}


def test_toml_writer_escapes_control_characters():
    cfg = kronopt.resolve("muon", **{"route.fallback_names": ["a\x7fb", "tab\there"]})
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg


# -- factors.beta = "beta2": the factor retention tied to the inner rule's β₂ -----------------------


@pytest.mark.parametrize("preset", ["soap", "dykaf"])
def test_beta_tie_follows_inner_betas_and_survives_overrides(preset):
    torch = pytest.importorskip("torch")
    tied = kronopt.resolve(preset, **{"factors.beta": "beta2"})
    assert kronopt.to_dict(tied)["factors"]["beta"] == "beta2"  # the tie is kept, not resolved away
    moved = kronopt.resolve(tied, **{"inner.betas": [0.9, 0.99]})
    assert moved.factors.beta == "beta2" and moved.bound().factors.beta == 0.99
    explicit = kronopt.resolve(preset, **{"factors.beta": 0.99, "inner.betas": [0.9, 0.99]})
    _assert_same_trajectory(moved, explicit, seed=3)


def _assert_same_trajectory(a, b, *, seed):
    """Two configs step one 6 × 5 float64 parameter through 12 random gradients to the same bits."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    W2 = torch.nn.Parameter(W1.detach().clone())
    o1, o2 = kronopt.KronOptimizer([W1], a), kronopt.KronOptimizer([W2], b)
    for _ in range(12):
        G = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        W1.grad, W2.grad = G.clone(), G.clone()
        o1.step()
        o2.step()
    assert torch.equal(W1, W2)


def test_beta_tie_errors_name_the_problem():
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve("shampoo", **{"factors.beta": "beta2"})
    assert any(p == "factors.beta" and "inner 'eigenvalue' has no betas" in m for p, m in info.value.errors)
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve("dykaf", **{"factors.beta": "beta2", "inner.betas": [0.0, 0.0]})
    assert info.value.errors == [("factors.beta", "'beta2' = inner.betas[1] = 0.0: must be > 0.0, got 0.0")]
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve("soap", **{"factors.beta": "beta_2"})
    assert "must be a number or 'beta2'" in str(info.value)


def test_an_unbound_tie_is_refused_by_the_pure_step():
    torch = pytest.importorskip("torch")
    from kronopt import compose
    from kronopt.types import Layout

    cfg = kronopt.resolve("soap", **{"factors.beta": "beta2"})
    layout = Layout(batch=1, m=3, n=2, left="full", right="full")
    with pytest.raises(ValueError, match="pass cfg.bound"):
        compose.init_state(cfg, layout, dtype=torch.float64, device=torch.device("cpu"))
    compose.init_state(cfg.bound(), layout, dtype=torch.float64, device=torch.device("cpu"))


# -- post.graft_betas = ["momentum", β₂]: the graft's β₁ tied to the inner rule's first moment ------------


@pytest.mark.parametrize(("preset", "overrides", "beta1"), [
    ("shampoo", {"inner.momentum": 0.8}, 0.8),  # eigenvalue: its momentum
    ("soap", {"post.grafting": "adam", "inner.betas": [0.7, 0.95]}, 0.7),  # adam: betas[0]
    ("soap", {"post.grafting": "adam", "inner.type": "sgd", "inner.momentum": 0.6}, 0.6),
])
def test_momentum_tie_binds_the_graft_beta1_to_the_inner_rule(preset, overrides, beta1):
    torch = pytest.importorskip("torch")
    tied = kronopt.resolve(preset, **overrides, **{"post.graft_betas": ["momentum", 0.99]})
    assert kronopt.to_dict(tied)["post"]["graft_betas"] == ["momentum", 0.99]  # kept, not resolved away
    assert kronopt.loads(kronopt.dumps(tied)) == tied
    assert tied.bound().post.graft_betas == (beta1, 0.99)
    # the same trajectory as the number written out (a tie left unbound would not even build)
    explicit = kronopt.resolve(preset, **overrides, **{"post.graft_betas": [beta1, 0.99]})
    _assert_same_trajectory(tied, explicit, seed=4)


def test_momentum_tie_errors_name_the_problem():
    from tests.unit._plugin_fixture import ScaledGradientInner

    restore = kronopt.INNER_RULES.override("scaled_gradient_test", ScaledGradientInner)
    try:
        with pytest.raises(kronopt.ConfigError) as info:
            kronopt.resolve("shampoo", **{"inner.type": "scaled_gradient_test"})
    finally:
        restore()
    assert any(
        p == "post.graft_betas" and "inner 'scaled_gradient_test' has neither a momentum nor betas" in m
        for p, m in info.value.errors
    ), info.value.errors
    for bad in (["beta1", 0.9], [0.9, "momentum"], ["momentum", 1.0]):
        with pytest.raises(kronopt.ConfigError) as info:
            kronopt.resolve("shampoo", **{"post.graft_betas": bad})
        assert [p for p, _ in info.value.errors] == ["post.graft_betas"], (bad, info.value.errors)


# -- with_overrides: per-group overrides on the resolved objects -------------------------------------


@pytest.mark.parametrize("preset", ["soap", "muon", "pro_kl_shampoo", "dykaf"])
@pytest.mark.parametrize(
    "overrides",
    [
        {"lr": 0.5, "refresh.every": 3},
        {"inner.betas": [0.9, 0.99], "factors.beta": "beta2", "weight_decay": 0.1},
        {"fallback.lr": 1e-2, "fallback.inner.eps": 1e-6},
        {"basis.type": "eigh", "inner.type": "sgd", "inner.momentum": 0.5},
        {"split.type": "full"},
        {"shapes.max_dim": 64, "post.weight_decay_order": "before", "route.vectors": "main"},
        {"refresh.every": 0, "inner.bogus": 1, "lr": -1, "nope": 2},
        {"factors.type": "none"},
        {"inner.type": "bogus"},
    ],
)
def test_with_overrides_equals_the_dict_round_trip(preset, overrides):
    """Same config, or the same list of errors, as rebuilding from the dict (the semantics of `resolve`)."""
    cfg = kronopt.PRESETS[preset]
    try:
        expected = kronopt.from_dict(kronopt.apply_overrides(kronopt.to_dict(cfg), overrides))
    except kronopt.ConfigError as exc:
        expected = exc
    try:
        got = kronopt.with_overrides(cfg, overrides)
    except kronopt.ConfigError as exc:
        got = exc
    if isinstance(expected, kronopt.ConfigError):
        assert isinstance(got, kronopt.ConfigError), got
        assert sorted(got.errors) == sorted(expected.errors)  # a fallback.* key without a [fallback] included
    else:
        assert got == expected
        untouched = {slot for slot in ("factors", "basis", "inner", "split", "refresh") if not any(k.startswith(slot + ".") for k in overrides)}
        for slot in untouched:  # only what an override names is rebuilt
            assert getattr(got, slot) is getattr(cfg, slot)


def test_with_overrides_reports_malformed_keys_together():
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.with_overrides(kronopt.PRESETS["soap"], {"inner": 3, "lr.x": 1, "inner.betas.x": 1, "refresh.every": 0})
    assert sorted(info.value.errors) == [
        ("inner", "is a table: set one of its keys (e.g. 'inner.type')"),
        ("inner.betas.x", "unknown key; inner options are not tables"),
        ("lr.x", "'lr' is a value, not a table"),
        ("refresh.every", "must be ≥ 1, got 0"),
    ]


def test_a_fallback_route_is_refused_but_at_its_defaults():
    """A fallback has no fallback of its own and its parameters were routed by the top-level config: a route in
    it was accepted and did nothing. Refused in TOML, in overrides and in Python; muon's dump (which writes the
    fallback's route at its defaults) still loads."""
    text = kronopt.dumps(kronopt.resolve("muon"))
    assert "[fallback.route]" in text
    assert kronopt.loads(text) == kronopt.resolve("muon")
    bad = text.replace('[fallback.route]\nvectors = "pipeline"', '[fallback.route]\nvectors = "fallback"')
    assert bad != text
    with pytest.raises(kronopt.ConfigError, match="fallback.route: a fallback routes nothing"):
        kronopt.loads(bad)
    with pytest.raises(kronopt.ConfigError, match="fallback.route: a fallback routes nothing"):
        kronopt.resolve("muon", **{"fallback.route.fallback_names": ["embed"]})
    cfg = kronopt.resolve("muon")
    with pytest.raises(ValueError, match="a fallback routes nothing"):
        attrs.evolve(cfg, fallback=attrs.evolve(cfg.fallback, route=attrs.evolve(cfg.fallback.route, vectors="fallback")))
