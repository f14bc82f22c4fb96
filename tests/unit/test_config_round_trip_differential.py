"""Differential bug hunt of the config promises (docs/configs.md "Validation", "Round trip"; docs/extending.md).

* **Round trips.** Every preset, every file in ``configs/`` and every variant of the ablation files,
  and configs with overrides of every kind (dotted stage keys, ``[fallback]``, ``[storage]``,
  ``[shapes]``, ``[route]``, ``[refresh] stagger``, ``inner.scale_shape``, custom Newton–Schulz
  triples, floats such as 1e-8, 0.1 and subnormals, the ``"beta2"`` tie, per-group overrides) go
  through ``dumps`` → ``loads`` unchanged; the oracle is the file's own TOML values, the TOML text
  (which keeps ``1`` and ``1.0`` apart where ``==`` does not) and the parameters: an optimizer built
  from the round-tripped config, or rebuilt by ``from_state_dict``, steps bit for bit as the original.
* **Invalid configs** fail before anything is built, every problem listed with its dotted path.
* **A user stage** registered with options is used from a TOML file, checked against a hand-written
  update, and survives ``dumps``/``loads`` and ``state_dict``/``from_state_dict``.

Bugs this hunt found (each test below fails on the code it was written against; its docstring
says what is wrong and what is right):

* an invalid value in a table that no cross-stage check involves (``[refresh]``, ``[shapes]``,
  ``[storage]``, ``[post]``, ``[route]``, the ``[fallback]``) hides an incompatible stage
  combination, and any error hides "the route sends parameters to a fallback there is not"
  (``config._check_compatible_anyway`` gives up when any part failed; ``_build_config`` returns
  before the route check);
* a number too large for a float (``lr = 10**400`` in TOML) or a regular expression that Python's
  ``re`` refuses with ``OverflowError`` (``a{4294967296}``) escapes as a raw ``OverflowError``
  (a traceback from ``kronopt show``) instead of a ``ConfigError`` listing it with the others;
* ``kronopt.load(path)`` of a file with a TOML syntax error does not name the file;
* a user stage field left at ``None`` (an optional option, which TOML omits) makes ``dumps`` raise;
  a stage field named ``type`` is accepted at registration and then shadows the stage's registry
  key in ``to_dict`` (round trip and ``from_state_dict`` fail);
* ``dumps`` of a plain config dict holding tuples (which ``from_dict`` accepts) raises;
* ``split.rank = 1`` (rank one) and ``split.rank = 1.0`` (the whole side) compare and hash equal;
* a param group may set the top-level-only ``[distributed]`` table, which is then ignored.
"""

import io
import pathlib
import tomllib
from typing import Any, ClassVar

import attrs
import pytest
import torch
from torch import Tensor

import kronopt
from kronopt.app.ablate import flatten
from kronopt.types import InnerCapabilities, NoState
from kronopt.validators import each, float_tuple, ge, gt, in_, le, lt, to_bool, to_float, to_int, to_str, triples

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).parents[2]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.toml"))
ABLATION_FILES = sorted((ROOT / "configs" / "ablations").glob("*.toml"))

#: small parameters of every kind the shape policy and the route see: two blocks of one bucket, the
#: transposed shape, a 4-D tensor (merge_dims, scale_shape = "last_two_dims"), a vector, a scalar and a
#: name the routed presets send to their fallback
SHAPES = {"embed.w": (10, 6), "l0.w": (8, 6), "l1.w": (8, 6), "l2.w": (6, 8), "conv.w": (4, 3, 2, 2), "l0.b": (6,), "scale": ()}


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))) for n, s in SHAPES.items()]


def _copy(named: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]


def _grads(steps: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES.values()] for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]], grads: list[list[Tensor]]) -> None:
    for step in grads:
        for (_, p), g in zip(named, step):
            p.grad = g.clone()
        opt.step()


def _assert_same(a: list[tuple[str, torch.nn.Parameter]], b: list[tuple[str, torch.nn.Parameter]]) -> None:
    for (name, p), (_, q) in zip(a, b):
        assert torch.equal(p.detach(), q.detach()), f"{name} differs"


def _round_trip(cfg: kronopt.KronConfig) -> kronopt.KronConfig:
    """``loads(dumps(cfg))``, checked equal and with the same TOML text (``==`` takes ``1 == 1.0``)."""
    text = kronopt.dumps(cfg)
    back = kronopt.loads(text)
    assert back == cfg
    assert kronopt.dumps(back) == text
    assert kronopt.from_dict(tomllib.loads(text)) == cfg
    return back


def _leaves(table: dict[str, Any]) -> dict[str, Any]:
    """Every value of a nested table by its dotted path."""
    return flatten(table)


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_value_a_config_file_writes_is_the_value_its_config_holds(path):
    """Each key of ``configs/x.toml``, read by ``tomllib`` alone, has the same value (and, for an ``int``
    such as ``every`` or a rank, the same type) in ``to_dict(load(x))``; the text round trip is exact.

    Catches: a file key dropped or renamed by the loader, a value converted on the way (an int rank made a
    fraction, a string pattern altered), the writer losing a key the file sets."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    cfg = kronopt.load(path)
    resolved = _leaves(kronopt.to_dict(cfg))
    for key, value in _leaves(raw).items():
        assert key in resolved, key
        got = resolved[key]
        assert got == value, (key, got, value)
        # an int may become a float where a float is expected; nothing else changes type
        assert type(got) is type(value) or (type(value) is int and type(got) is float), (key, got, value)
    _round_trip(cfg)


def test_every_preset_and_ablation_variant_round_trips_through_its_toml_text():
    """The presets and every variant of every ablation file (a base preset with dotted overrides, a swept
    stage), resolved as ``kronopt ablate`` resolves them, come back from their own TOML text unchanged."""
    from kronopt.app.ablate import load_ablation

    for name in kronopt.PRESETS:
        _round_trip(kronopt.resolve(name))
    variants = 0
    for path in ABLATION_FILES:
        for variant in load_ablation(path).variants:
            _round_trip(kronopt.resolve(variant.spec, **variant.overrides))
            variants += 1
    assert variants >= len(ABLATION_FILES)


#: overrides of every kind, each on a preset it applies to
OVERRIDES = {
    "soap_records": ("soap", {
        "refresh.every": 3, "inner.betas": [0.9, 0.95], "factors.beta": "beta2", "inner.eps": 1e-8, "lr": 0.1,
        "weight_decay": 0.1, "shapes.max_dim": 7, "shapes.merge_dims": True, "shapes.precondition_1d": True,
        "refresh.stagger": True, "storage.factors": "bfloat16", "storage.moments": "float32",
    }),
    "muon_custom_ns": ("muon", {
        "inner.scale_shape": "last_two_dims", "inner.coefficients": "custom",
        "inner.custom_coefficients": [[3.4445, -4.775, 2.0315], [3, -3.2, 1.2]], "inner.custom_beyond": "cycle",
        "inner.ns_dtype": "float32", "fallback.inner.eps": 1e-8, "fallback.storage.moments": "bfloat16",
        "route.fallback_names": ["^embed", "scale$"], "fallback.lr": 0.1, "fallback.post.weight_decay_order": "after",
    }),
    "pro_kl_int_rank": ("pro_kl_shampoo", {"split.rank": 2, "split.complement_scale": 0.5, "refresh.every": 2, "fallback.weight_decay": 0.1}),
    "pro_soap_fraction": ("pro_soap", {"split.rank": 0.5, "refresh.every": 2, "storage.basis": "bfloat16"}),
    "shampoo_grafting": ("shampoo", {
        "post.grafting": "adam", "post.graft_betas": [0.5, 0.25], "post.graft_eps": 1e-10, "refresh.every": 2,
        "inner.exponent": -0.5, "post.normalize": True,
    }),
    "kl_offset": ("kl_shampoo", {"refresh.every": 2, "refresh.offset": 1, "factors.damping": 0.1, "route.vectors": "fallback"}),
    "dykaf_tie": ("dykaf", {"factors.beta": "beta2", "inner.betas": [0.8, 0.9], "refresh.every": 2, "skip_first_call": False}),
    "adamw_to_sgd": ("adamw", {"inner.type": "sgd", "inner.momentum": 0.1, "inner.nesterov": True, "state_dtype": "float64"}),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_a_round_tripped_config_steps_bit_for_bit_as_the_original(case):
    """An optimizer built from ``loads(dumps(cfg))`` and one built from ``cfg`` step the same parameters
    on the same gradients to the same bits (4 steps: first calls, refreshes, staggered phases)."""
    preset, overrides = OVERRIDES[case]
    cfg = kronopt.resolve(preset, **overrides)
    back = _round_trip(cfg)
    a, b = _params(), _params()
    grads = _grads(4)
    _run(kronopt.build(a, cfg), a, grads)
    _run(kronopt.build(b, back), b, grads)
    _assert_same(a, b)


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_from_state_dict_rebuilds_the_optimizer_and_continues_bit_for_bit(case):
    """``from_state_dict(params, state_dict())``, through ``torch.save``/``torch.load(weights_only=True)``,
    rebuilds the same config and takes the next steps to the same bits as the original optimizer."""
    preset, overrides = OVERRIDES[case]
    a = _params()
    opt = kronopt.build(a, preset, **overrides)
    _run(opt, a, _grads(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    c = _copy(a)
    resumed = kronopt.from_state_dict(c, torch.load(buf, weights_only=True))
    assert resumed.config == opt.config and kronopt.dumps(resumed.config) == kronopt.dumps(opt.config)
    grads = _grads(3, seed=5)
    _run(opt, a, grads)
    _run(resumed, c, grads)
    _assert_same(a, c)


@pytest.mark.parametrize("preset", ["dykaf", "kl_shampoo"])
def test_per_group_overrides_come_back_with_from_state_dict(preset):
    """Per-group dotted overrides (a refresh period, bfloat16 factors, the β₂ tie, a shape policy, a group
    and a fallback lr) are restored from the saved groups: a resume given the bare groups (no overrides)
    steps as the original optimizer."""

    def groups(named, with_overrides):
        g0, g1 = {"params": named[:3]}, {"params": named[3:]}
        if with_overrides:
            g0.update({"refresh.every": 2, "storage.factors": "bfloat16"})
            g1.update({"lr": 0.05, "shapes.max_dim": 5})
            if kronopt.PRESETS[preset].fallback is not None:
                g1.update({"fallback.lr": 0.2, "fallback.inner.eps": 1e-6})
            else:
                g0.update({"factors.beta": "beta2", "inner.betas": [0.5, 0.6]})
        return [g0, g1]

    a = _params()
    opt = kronopt.build(groups(a, True), preset)
    _run(opt, a, _grads(3))
    sd = opt.state_dict()
    c = _copy(a)
    resumed = kronopt.from_state_dict(groups(c, False), sd)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in opt.param_groups]
    grads = _grads(3, seed=7)
    _run(opt, a, grads)
    _run(resumed, c, grads)
    _assert_same(a, c)


@pytest.mark.parametrize("value", [0.1, 1e-8, 0.30000000000000004, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-300, 3])
def test_floats_survive_the_toml_text_exactly(value):
    """A float option comes back bit for bit from the TOML text (shortest repr, exponents, subnormals,
    the largest float; an int where a float is expected becomes that float)."""
    cfg = kronopt.resolve("soap", **{"inner.eps": value, "post.graft_eps": value})
    back = _round_trip(cfg)
    assert back.inner.eps.hex() == float(value).hex() and back.post.graft_eps.hex() == float(value).hex()


def test_configs_that_step_differently_do_not_compare_equal():
    """``split.rank = 1`` (a rank-one subspace) and ``split.rank = 1.0`` (a fraction: the whole side, no
    restricted side) build different optimizers, yet ``==`` and ``hash`` take them as the same config.

    Wrong: ``KronConfig.__eq__`` (attrs' field-by-field ``==``, where ``1 == 1.0``) is the oracle of the
    documented round trip ``loads(dumps(cfg)) == cfg`` and of "each configs/x.toml loads to its preset";
    a writer or a loader that turned an integer rank into a float (or back) would pass both, and a cache
    keyed by configs would share one entry. Right: configs that build different layouts compare unequal
    (e.g. the rank field compared with its type, ``attrs.field(eq=...)``)."""
    as_int = kronopt.resolve("pro_soap", **{"split.rank": 1})
    as_fraction = kronopt.resolve("pro_soap", **{"split.rank": 1.0})
    assert as_int.block((8, 6))[1] != as_fraction.block((8, 6))[1], "the premise: the layouts differ"
    assert as_int != as_fraction


def test_dumps_writes_a_plain_config_dict_that_holds_tuples():
    """``dumps`` takes "a config (or a plain config dict)", and ``from_dict`` accepts tuples where TOML has
    arrays (``inner.betas = (0.9, 0.95)``); ``dumps`` of that same dict raises ``TypeError: cannot write
    tuple to TOML`` (``config._toml_value`` knows lists only). Right: a tuple is written as an array, so
    ``loads(dumps(raw)) == from_dict(raw)``."""
    raw = kronopt.to_dict(kronopt.PRESETS["soap"])
    raw["inner"]["betas"] = (0.9, 0.95)
    expected = kronopt.from_dict(raw)
    assert kronopt.loads(kronopt.dumps(raw)) == expected


# -- invalid configs -------------------------------------------------------------------------------

#: a TOML config with a problem in every table: unknown keys at three levels, wrong types, NaN and inf
#: as strings, booleans as a string and an int, negative ints, an unknown stage, a bad regex, bad
#: [fallback] values, [distributed] inside [fallback]
MANY_PROBLEMS = """
lr = "nan"
weight_decay = -0.1
skip_first_call = "true"
compile = 1
max_skipped_steps = -3
bogus_top = 1
nonfinite = "ignore"

[factors]
type = "ema"
beta = "inf"
extra = 2

[basis]
type = "qrr"

[inner]
type = "adam"
betas = [0.9, "x"]
eps = -1e-8
eps_placement = "middle"

[split]
type = "full"
rank = 3

[refresh]
type = "every"
every = 0
stagger = "yes"
offset = -1

[shapes]
max_dim = -5
merge_dims = 0
foo = 1

[storage]
factors = "float16"
bar = "x"

[route]
vectors = "somewhere"
fallback_names = ["(unclosed"]

[distributed]
shard_work = "no"

[fallback]
lr = -1
distributed = {}

[fallback.factors]
type = "none"
[fallback.basis]
type = "identity"
[fallback.inner]
type = "adam"
betas = [1.5, 0.9]
[fallback.split]
type = "nope"
[fallback.refresh]
type = "every"
every = 1.5
"""

MANY_PATHS = {
    "bogus_top", "lr", "weight_decay", "skip_first_call", "nonfinite", "max_skipped_steps", "compile",
    "factors.beta", "factors.extra", "basis.type", "inner.betas", "inner.eps", "inner.eps_placement", "split.rank",
    "refresh.every", "refresh.stagger", "refresh.offset", "shapes.max_dim", "shapes.merge_dims", "shapes.foo",
    "storage.factors", "storage.bar", "route.vectors", "route.fallback_names", "distributed.shard_work",
    "fallback.distributed", "fallback.lr", "fallback.inner.betas", "fallback.split.type", "fallback.refresh.every",
}


def test_a_toml_file_with_a_problem_in_every_table_lists_each_before_anything_is_built(tmp_path, monkeypatch):
    """One ``ConfigError`` lists all 30 problems, each at its dotted path, with the bad value or the
    accepted keys; ``build`` raises it before an optimizer is constructed and the parameters are untouched."""
    path = tmp_path / "bad.toml"
    path.write_text(MANY_PROBLEMS, encoding="utf-8")
    constructed = []
    real_init = kronopt.KronOptimizer.__init__

    def spy(self, *args, **kwargs):
        constructed.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(kronopt.KronOptimizer, "__init__", spy)
    named = _params()
    before = _copy(named)
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.build(named, str(path))
    assert {p for p, _ in info.value.errors} == MANY_PATHS
    assert len(info.value.errors) == len(MANY_PATHS) and f"({len(MANY_PATHS)} errors)" in str(info.value)
    messages = dict(info.value.errors)
    assert messages["lr"] == "must be a number, got 'nan'"
    assert messages["factors.beta"].endswith("got 'inf'")
    assert messages["skip_first_call"] == "must be true or false, got 'true'"
    assert messages["compile"] == "must be true or false, got 1"
    assert messages["max_skipped_steps"] == "must be ≥ 0, got -3"
    assert "available: eigh, identity, qr" in messages["basis.type"]
    assert "not a valid regular expression" in messages["route.fallback_names"]
    assert messages["fallback.refresh.every"] == "must be an integer, got 1.5"
    assert not constructed
    _assert_same(named, before)
    assert all(p.grad is None for _, p in named)


#: a problem in a table that no cross-stage check reads, beside ``factors = "none"`` under the ``qr``
#: basis (which needs Kronecker factors; soap's basis)
UNRELATED = {
    "refresh": ("soap", {"refresh.every": 0}),
    "shapes": ("soap", {"shapes.max_dim": -1}),
    "storage": ("soap", {"storage.factors": "float16"}),
    "post": ("soap", {"post.grafting": "sgd"}),
    "route": ("soap", {"route.vectors": "elsewhere"}),
    "fallback": ("muon", {"fallback.refresh.every": 0, "basis.type": "qr"}),
}


@pytest.mark.parametrize("via", ["overrides", "dict"])
@pytest.mark.parametrize("table", list(UNRELATED))
def test_an_error_in_another_table_does_not_hide_an_incompatible_stage_combination(table, via):
    """``factors = "none"`` with the ``qr`` basis is refused at ``basis.type`` on its own; with one bad value
    in ``[refresh]``, ``[shapes]``, ``[storage]``, ``[post]``, ``[route]`` or the ``[fallback]`` beside it,
    the error lists the bad value only.

    Wrong: ``config._check_compatible_anyway`` skips the cross-stage checks whenever any stage or record
    failed to build, although none of these tables takes part in a stage combination; the user fixes the
    value and only then learns of the combination (docs/configs.md: "every problem is reported at once").
    Right: both problems in one ``ConfigError`` (the record or the unrelated stage at its default)."""
    preset, extra = UNRELATED[table]
    overrides = {"factors.type": "none", **extra}
    with pytest.raises(kronopt.ConfigError) as info:
        if via == "overrides":
            kronopt.resolve(preset, **overrides)
        else:
            kronopt.from_dict(kronopt.apply_overrides(kronopt.to_dict(kronopt.PRESETS[preset]), overrides))
    paths = {p for p, _ in info.value.errors}
    bad = {k for k in extra if k != "basis.type"}
    assert paths == bad | {"basis.type"}, info.value.errors


def test_a_route_to_a_missing_fallback_is_listed_beside_other_errors():
    """``route.vectors = "fallback"`` in a config without ``[fallback]`` is an error of its own
    ("sends parameters to the fallback, but there is no [fallback] table"), but with ``lr = -1`` beside it
    only ``lr`` is listed: ``_build_config`` (and ``_evolve_config``) return before the route check when
    any error was found. Right: both listed."""
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve("soap", lr=-1.0, **{"route.vectors": "fallback"})
    assert {p for p, _ in info.value.errors} == {"lr", "route"}, info.value.errors


def _huge_lr_toml() -> str:
    text = kronopt.dumps(kronopt.PRESETS["adamw"])
    assert "lr = 0.001\n" in text and "every = 1\n" in text
    return text.replace("lr = 0.001\n", "lr = " + "9" * 400 + "\n", 1).replace("every = 1\n", "every = 0\n", 1)


OVERFLOWS = {
    "toml_lr": ("lr", lambda: kronopt.loads(_huge_lr_toml())),
    "complement_scale": ("split.complement_scale", lambda: kronopt.resolve("pro_kl_shampoo", **{"split.complement_scale": 10**400, "refresh.every": 0})),
    "graft_eps": ("post.graft_eps", lambda: kronopt.resolve("shampoo", **{"post.graft_eps": 10**400, "refresh.every": 0})),
    "ns_triple": ("inner.custom_coefficients", lambda: kronopt.resolve(
        "muon", **{"inner.coefficients": "custom", "inner.custom_coefficients": [[10**400, 1, 1]], "refresh.every": 0})),
    "regex_repeat": ("route.fallback_names", lambda: kronopt.resolve("muon", **{"route.fallback_names": ["a{4294967296}"], "refresh.every": 0})),
}


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_a_value_python_cannot_hold_is_a_config_error_listed_with_the_others(case):
    """An integer too large for a float (TOML reads ``lr = 999…9`` as a Python int; ``to_float`` calls
    ``math.isfinite`` on it, ``float()`` elsewhere) and a pattern ``re.compile`` refuses with
    ``OverflowError`` (``a{4294967296}``; ``config._regexes`` catches ``re.error`` only) raise a raw
    ``OverflowError`` out of ``from_dict``/``with_overrides`` (which catch ``TypeError``/``ValueError``),
    hiding every other problem (here ``refresh.every = 0``); ``kronopt show`` prints a traceback.
    Right: ``ConfigError`` with both paths (``lr: must be a finite number, got …``)."""
    path, make = OVERFLOWS[case]
    with pytest.raises(kronopt.ConfigError) as info:
        make()
    assert {p for p, _ in info.value.errors} == {path, "refresh.every"}


def test_load_names_the_file_of_a_toml_syntax_error(tmp_path):
    """``kronopt.load(path)`` of a file with a TOML syntax error says ``not valid TOML: Invalid value (at
    line 1, column 6)`` without the file's name (``load`` hands the text to ``loads``), while
    ``kronopt.resolve(path)`` and a missing file (``cannot read config file '…'``) name it. Right: the
    message names the file, as ``resolve`` does."""
    bad = tmp_path / "my_broken_config.toml"
    bad.write_text("lr = = 1\n", encoding="utf-8")
    with pytest.raises(kronopt.ConfigError) as via_resolve:
        kronopt.resolve(str(bad))
    assert bad.name in str(via_resolve.value)
    with pytest.raises(kronopt.ConfigError) as via_load:
        kronopt.load(bad)
    assert "line 1" in str(via_load.value)
    assert bad.name in str(via_load.value)


@pytest.mark.parametrize("how", ["missing", "directory"])
def test_a_config_path_that_cannot_be_read_is_one_error_naming_it(tmp_path, how):
    """A missing ``.toml`` path and a directory: ``load``, ``resolve`` and ``build`` raise one ``ConfigError``
    naming the path (no ``FileNotFoundError``/``IsADirectoryError``), and nothing is stepped."""
    path = tmp_path / "nowhere.toml"
    if how == "directory":
        path.mkdir()
    W = torch.nn.Parameter(torch.ones(3, 2))
    for call in (lambda: kronopt.load(path), lambda: kronopt.resolve(str(path)), lambda: kronopt.build([W], str(path))):
        with pytest.raises(kronopt.ConfigError) as info:
            call()
        assert len(info.value.errors) == 1 and str(path) in str(info.value)
    assert torch.equal(W, torch.ones(3, 2))


def test_a_param_group_cannot_set_the_top_level_only_distributed_table():
    """``[distributed]`` is "top-level only; a [fallback] table may not set it" (docs/distributed.md), and
    ``fallback.distributed`` is refused; a param group's ``"distributed.shard_work": False`` is accepted and
    silently ignored (the optimizer reads ``self.config.distributed`` only). Right: a ``ConfigError`` at
    ``param_groups[0].distributed.shard_work``, as for any setting that cannot take effect where it is given."""
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.build([{"params": [torch.nn.Parameter(torch.ones(3, 2))], "distributed.shard_work": False}], "adamw")
    assert [p for p, _ in info.value.errors] == ["param_groups[0].distributed.shard_work"]


# -- a user stage ----------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class _EmaState:
    """``buf`` (``b m n``): the EMA of the gradients."""

    buf: Tensor


@attrs.frozen(kw_only=True)
class _UserEmaInner:
    """User rule: D = c · B, B ← μ B + (1 − μ) G, c = scales[0] · coeffs[0][0] · (−1 if negate); zero for the first ``delay`` steps."""

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
    momentum: float = attrs.field(default=0.9, converter=to_float, validator=[ge(0.0), lt(1.0)])
    scales: tuple[float, float] = attrs.field(default=(1.0, 1.0), converter=float_tuple(2), validator=each(gt(0.0)))
    mode: str = attrs.field(default="linear", converter=to_str, validator=in_(("linear", "sign")))
    delay: int = attrs.field(default=0, converter=to_int, validator=[ge(0), le(9)])
    negate: bool = attrs.field(default=False, converter=to_bool)
    coeffs: tuple[tuple[float, float, float], ...] = attrs.field(default=(), converter=triples)

    def __attrs_post_init__(self) -> None:
        if self.mode == "sign" and self.coeffs:
            raise ValueError(f"mode = 'sign' takes no coeffs, got {self.coeffs!r}")

    def init(self, layout, *, dtype, device):
        return _EmaState(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

    def direction(self, state, G, ctx):
        B = state.buf * self.momentum + G * (1 - self.momentum)
        c = self.scales[0] * (self.coeffs[0][0] if self.coeffs else 1.0) * (-1.0 if self.negate else 1.0)
        D = torch.sign(B) if self.mode == "sign" else B
        return D * (0.0 if ctx.step <= self.delay else c), _EmaState(B)

    def on_basis_change(self, state, change):
        return state


USER_KEY = "user_ema_rt_test"


@pytest.fixture
def user_stage():
    restore = kronopt.INNER_RULES.override(USER_KEY, _UserEmaInner, description="a test's user stage")
    yield USER_KEY
    restore()


USER_TOML = f"""
lr = 0.1
weight_decay = 0.01

[factors]
type = "none"

[basis]
type = "identity"

[inner]
type = "{USER_KEY}"
momentum = 0.5
scales = [2, 0.25]
mode = "linear"
delay = 1
negate = true
coeffs = [[0.5, 1, 2]]

[split]
type = "full"

[refresh]
type = "every"
every = 1
"""


def test_a_user_stage_with_options_from_a_toml_file_steps_as_its_formula_and_round_trips(user_stage, tmp_path):
    """A registered user inner rule named with five kinds of options in a TOML file: the options arrive
    converted (ints to floats, lists to tuples), the optimizer follows the hand-written update in float64
    (``W ← W(1 − ηλ) − η c B``, nothing moved but decay during the delay), and the config round-trips
    through ``dumps``/``loads`` and through ``state_dict``/``from_state_dict``, bit for bit."""
    path = tmp_path / "user.toml"
    path.write_text(USER_TOML, encoding="utf-8")
    cfg = kronopt.load(path)
    inner = cfg.inner
    assert type(inner) is _UserEmaInner
    assert (inner.momentum, inner.scales, inner.delay, inner.negate, inner.coeffs) == (0.5, (2.0, 0.25), 1, True, ((0.5, 1.0, 2.0),))
    assert kronopt.to_dict(cfg)["inner"]["type"] == USER_KEY
    _round_trip(cfg)

    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(6)]
    W = torch.nn.Parameter(W0.clone())
    opt = kronopt.build([W], str(path))
    ref, B = W0.clone(), torch.zeros_like(W0)
    lr, wd, c = 0.1, 0.01, 2.0 * 0.5 * -1.0
    for t, G in enumerate(grads[:3], start=1):
        W.grad = G.clone()
        opt.step()
        B = 0.5 * B + 0.5 * G
        ref = ref * (1 - lr * wd) - lr * (0.0 if t <= 1 else c) * B
        torch.testing.assert_close(W.detach(), ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(opt.state[W]["inner.buf"], B, rtol=1e-13, atol=1e-15)

    sd = opt.state_dict()
    assert sd["kronopt"]["config"]["inner"]["type"] == USER_KEY
    W2 = torch.nn.Parameter(W.detach().clone())
    resumed = kronopt.from_state_dict([W2], sd)
    assert resumed.config == opt.config
    for G in grads[3:]:
        W.grad, W2.grad = G.clone(), G.clone()
        opt.step()
        resumed.step()
    assert torch.equal(W, W2)


def test_a_user_stage_in_the_fallback_table_round_trips_and_resumes(user_stage):
    """The user rule as muon's ``[fallback]`` inner rule (vectors, the embedding and the scalar go to it),
    with options set by dotted overrides: TOML round trip and a bit-for-bit resume."""
    overrides = {"fallback.inner.type": USER_KEY, "fallback.inner.mode": "sign", "fallback.inner.scales": [0.5, 1], "fallback.inner.momentum": 0.25}
    cfg = kronopt.resolve("muon", **overrides)
    assert type(cfg.fallback.inner) is _UserEmaInner and cfg.fallback.inner.mode == "sign"
    _round_trip(cfg)
    a = _params()
    opt = kronopt.build(a, cfg)
    assert {g["pipeline"] for g in opt.param_groups} == {"main", "fallback"}
    _run(opt, a, _grads(2))
    c = _copy(a)
    resumed = kronopt.from_state_dict(c, opt.state_dict())
    grads = _grads(2, seed=11)
    _run(opt, a, grads)
    _run(resumed, c, grads)
    _assert_same(a, c)


def test_a_user_stage_option_errors_are_listed_with_their_paths(user_stage):
    """Every bad option of the user stage (range, type, choice, unknown key) is listed at its path, beside a
    bad built-in value, with the stage's own accepted keys; a cross-field check fails at ``inner``."""
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve("adamw", lr=-1.0, **{
            "inner.type": USER_KEY, "inner.momentum": 1.5, "inner.scales": [1.0], "inner.mode": "cubic",
            "inner.delay": True, "inner.negate": "no", "inner.coeffs": [[1, 2]], "inner.momentun": 0.1,
        })
    errors = dict(info.value.errors)
    assert set(errors) == {
        "lr", "inner.momentum", "inner.scales", "inner.mode", "inner.delay", "inner.negate", "inner.coeffs", "inner.momentun",
    }, info.value.errors
    assert errors["inner.momentum"] == "must be < 1.0, got 1.5"
    assert errors["inner.momentun"] == "unknown key; _UserEmaInner accepts: coeffs, delay, mode, momentum, negate, scales"
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.resolve("adamw", **{"inner.type": USER_KEY, "inner.mode": "sign", "inner.coeffs": [[1, 2, 3]]})
    assert info.value.errors == [("inner", "mode = 'sign' takes no coeffs, got ((1.0, 2.0, 3.0),)")]


@attrs.frozen(kw_only=True)
class _OptionalCapInner:
    """User rule: G clipped to ±cap, or G where ``cap`` is not set."""

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
    cap: float | None = attrs.field(default=None, converter=attrs.converters.optional(to_float))

    def init(self, layout, *, dtype, device):
        return NoState()

    def direction(self, state, G, ctx):
        return (G.clone() if self.cap is None else G.clamp(-self.cap, self.cap)), state

    def on_basis_change(self, state, change):
        return state


def test_a_user_stage_option_left_at_none_is_omitted_when_written_back():
    """docs/configs.md: "there is no null, so optional fields are simply omitted"; docs/extending.md: a stage
    that is an attrs record round-trips "with no extra code". A user option that defaults to ``None`` and is
    not set makes ``to_dict`` hold ``cap: None`` and ``dumps`` raise ``TypeError: cannot write NoneType to
    TOML`` (``kronopt show`` and ``kronopt train``'s ``config.toml`` with it). Right: the key is omitted and
    ``loads(dumps(cfg)) == cfg``."""
    restore = kronopt.INNER_RULES.override("user_optional_cap_test", _OptionalCapInner)
    try:
        unset = kronopt.resolve("adamw", **{"inner.type": "user_optional_cap_test"})
        set_ = kronopt.resolve("adamw", **{"inner.type": "user_optional_cap_test", "inner.cap": 0.5})
        assert kronopt.loads(kronopt.dumps(set_)) == set_
        assert kronopt.loads(kronopt.dumps(unset)) == unset
    finally:
        restore()


@attrs.frozen(kw_only=True)
class _FieldNamedTypeInner:
    """User rule with an option named ``type``: D = G."""

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
    type: str = attrs.field(default="plain", converter=to_str, validator=in_(("plain", "fancy")))

    def init(self, layout, *, dtype, device):
        return NoState()

    def direction(self, state, G, ctx):
        return G.clone(), state

    def on_basis_change(self, state, change):
        return state


def test_a_stage_option_named_type_is_refused_or_round_trips():
    """``type`` names the stage in its table, yet a stage class with a field ``type`` registers without
    complaint; ``to_dict`` then writes ``{"type": <the field's value>}`` over the registry key, so the
    config reads back as the unknown stage ``'plain'`` (and ``from_state_dict`` fails the same way).
    Right: registration refuses the field (a ``StageContractError``/``ValueError`` naming it), or the
    config round-trips."""
    try:
        restore = kronopt.INNER_RULES.override("user_field_type_test", _FieldNamedTypeInner)
    except (TypeError, ValueError) as exc:
        assert "type" in str(exc)
        return
    try:
        cfg = kronopt.resolve("adamw", **{"inner.type": "user_field_type_test"})
        assert kronopt.to_dict(cfg)["inner"]["type"] == "user_field_type_test"
        assert kronopt.loads(kronopt.dumps(cfg)) == cfg
    finally:
        restore()
