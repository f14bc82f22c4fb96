"""Registries and entry-point plugins, with hand-built entry points on fresh registries.

Each test builds its own :class:`kronopt.Registry` and feeds it
``importlib.metadata.EntryPoint`` objects through ``entry_points=``; the global
registries are only touched through ``Registry.override`` and restored.
"""

import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch

import kronopt
from kronopt.registry import PluginLoadError, Registry
from kronopt.types import CONTRACTS
from tests.unit._plugin_fixture import ScaledGradientInner, Undocumented

#: the fixture's stand-in plugin declares the old-style flag ``needs_eigvals`` on purpose (a
#: third-party class written before typed capabilities); tests/unit/test_contracts.py checks the warning

GROUP = "kronopt.tests.inner_rules"
FIXTURE = "tests.unit._plugin_fixture"
MISSING = "kronopt_no_such_plugin_module_4f1c"


class AlphaInner:
    """Alpha."""


class BetaInner:
    """Beta."""


def _dist(tmp_path: Path, name: str) -> importlib.metadata.Distribution:
    """A real installed-style distribution (``<name>-1.0.dist-info/METADATA``) under ``tmp_path``."""
    info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")
    return importlib.metadata.PathDistribution(info)


def _ep(name: str, value: str, dist: importlib.metadata.Distribution | None = None) -> importlib.metadata.EntryPoint:
    ep = importlib.metadata.EntryPoint(name=name, value=value, group=GROUP)
    return ep._for(dist) if dist is not None else ep


def _registry(*eps: importlib.metadata.EntryPoint, builtins: bool = True) -> Registry:
    reg: Registry = Registry("inner", group=GROUP, entry_points=lambda: list(eps))
    if builtins:
        reg.register("alpha", description="the alpha rule")(AlphaInner)
        reg.register("beta", description="the beta rule")(BetaInner)
    return reg


@pytest.fixture(autouse=True)
def _plugins_on(monkeypatch):
    monkeypatch.delenv("KRONOPT_NO_PLUGINS", raising=False)


@pytest.fixture
def fixture_unimported(monkeypatch):
    """Make ``tests.unit._plugin_fixture`` look never imported (restored afterwards)."""
    monkeypatch.delitem(sys.modules, FIXTURE)
    monkeypatch.delattr(sys.modules["tests.unit"], "_plugin_fixture")


# -- registration and lookup -------------------------------------------------------------


def test_register_get_and_describe():
    reg = _registry()
    assert reg.keys() == ["alpha", "beta"]
    assert reg.get("alpha") is AlphaInner
    entry = reg.entry("beta")
    assert (entry.key, entry.cls, entry.description, entry.source) == ("beta", BetaInner, "the beta rule", "kronopt")
    assert reg.key_of(BetaInner) == "beta"
    assert "alpha" in reg and "gamma" not in reg and 3 not in reg
    assert [e.key for e in reg.entries()] == ["alpha", "beta"]
    with pytest.raises(KeyError, match="ScaledGradientInner is not a registered inner stage"):
        reg.key_of(ScaledGradientInner)


@pytest.mark.parametrize("key", ["Alpha", "sign-momentum", "1st", "two words", ""])
def test_keys_must_be_snake_case_identifiers(key):
    with pytest.raises(ValueError, match="snake_case"):
        _registry(builtins=False).register(key, description="x")


def test_duplicate_key_raises_naming_both_sources():
    reg = _registry()
    with pytest.raises(ValueError) as info:
        reg.register("alpha", description="again", source="some-package")(ScaledGradientInner)
    msg = str(info.value)
    assert "duplicate inner stage 'alpha'" in msg
    assert f"your code ({__name__}.AlphaInner)" in msg  # registered outside kronopt (its default source was named)
    assert f"some-package ({FIXTURE}.ScaledGradientInner)" in msg
    assert reg.get("alpha") is AlphaInner  # the first registration stands
    with pytest.raises(ValueError, match=r"already registered by kronopt \(kronopt\.inner_rules\.adam\.AdamInner\), now by your code"):
        kronopt.INNER_RULES.register("adam", description="mine")(ScaledGradientInner)


def test_unknown_key_lists_every_available_key_plugins_included(tmp_path):
    reg = _registry(_ep("plug", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "some-plugin")))
    with pytest.raises(KeyError) as info:
        reg.get("gamma")
    assert info.value.args[0].startswith("unknown inner stage 'gamma'; available: alpha, beta, plug (a plugin's stage")
    with pytest.raises(KeyError, match=r"available: \(none\)"):
        _registry(builtins=False).get("gamma")


def test_override_replaces_or_adds_and_restore_undoes_it():
    reg = _registry()
    restore = reg.override("alpha", ScaledGradientInner)
    assert reg.get("alpha") is ScaledGradientInner and reg.entry("alpha").source == "override"
    restore()
    assert reg.entry("alpha").cls is AlphaInner and reg.entry("alpha").source == "kronopt"
    restore = reg.override("gamma", ScaledGradientInner)
    assert reg.keys() == ["alpha", "beta", "gamma"]
    restore()
    assert reg.keys() == ["alpha", "beta"]
    with pytest.raises(ValueError, match="snake_case"):  # a key no config could name, refused as register refuses it
        reg.override("Gamma-2", ScaledGradientInner)
    assert reg.keys() == ["alpha", "beta"]


def test_override_on_the_global_registry_reaches_configs_and_is_restored():
    cfg = {
        "lr": 0.1,
        "factors": {"type": "none"},
        "basis": {"type": "identity"},
        "inner": {"type": "scaled_gradient_test", "scale": 2.0},
        "split": {"type": "full"},
        "refresh": {"type": "every"},
    }
    restore = kronopt.INNER_RULES.override("scaled_gradient_test", ScaledGradientInner)
    try:
        p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
        opt = kronopt.build([p], cfg)
        p.grad = torch.arange(6, dtype=torch.float64).reshape(2, 3)
        opt.step()
        torch.testing.assert_close(p.detach(), 1 - 0.1 * 2.0 * p.grad)
    finally:
        restore()
    assert "scaled_gradient_test" not in kronopt.INNER_RULES.keys()
    with pytest.raises(kronopt.ConfigError, match="unknown inner stage 'scaled_gradient_test'; available: adam"):
        kronopt.from_dict(cfg)


def test_global_slots_use_the_documented_entry_point_groups():
    assert {slot: reg.group for slot, reg in kronopt.SLOTS.items()} == {
        "factors": "kronopt.factors",
        "basis": "kronopt.bases",
        "inner": "kronopt.inner_rules",
        "split": "kronopt.splits",
        "refresh": "kronopt.refresh",
    }
    builtins = [
        e for reg in kronopt.SLOTS.values() for e in reg.entries(load_plugins=False) if e.cls.__module__.startswith("kronopt.")
    ]
    assert builtins and all(e.source == "kronopt" for e in builtins)


# -- discovery and lazy loading ----------------------------------------------------------


def test_discovery_lists_plugins_without_importing_them(tmp_path, fixture_unimported):
    reg = _registry(_ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-scaled")))
    assert reg.keys() == ["alpha", "beta", "scaled"]
    assert "scaled" in reg
    assert list(reg.plugins()) == ["scaled"]
    assert [e.key for e in reg.entries(load_plugins=False)] == ["alpha", "beta"]
    assert FIXTURE not in sys.modules  # found from metadata alone


def test_a_plugin_is_loaded_on_first_use_and_registered_under_its_distribution(tmp_path, fixture_unimported):
    reg = _registry(_ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-scaled")))
    entry = reg.entry("scaled")
    assert FIXTURE in sys.modules
    assert entry.cls is sys.modules[FIXTURE].ScaledGradientInner
    assert entry.key == "scaled"
    assert entry.source == "kronopt-scaled"
    assert entry.description == "Scaled gradient: D = scale · G (a stage that keeps no state)"
    assert reg.plugins() == {}  # now a registered entry, no longer a pending plugin
    assert reg.entry("scaled") is entry  # loaded once
    assert reg.key_of(entry.cls) == "scaled"
    assert reg.keys() == ["alpha", "beta", "scaled"]


def test_a_class_without_docstring_gets_an_empty_description(tmp_path):
    reg = _registry(_ep("bare", f"{FIXTURE}:Undocumented", _dist(tmp_path, "kronopt-bare")))
    assert reg.entry("bare").cls is Undocumented
    assert reg.entry("bare").description == ""


def test_a_missing_module_is_discovered_but_fails_to_load_naming_the_distribution(tmp_path):
    reg = _registry(_ep("broken", f"{MISSING}:Thing", _dist(tmp_path, "kronopt-broken-plugin")))
    assert "broken" in reg.keys()
    with pytest.raises(PluginLoadError) as info:
        reg.get("broken")
    err = info.value
    assert isinstance(err, ImportError)
    assert (err.distribution, err.key, err.group) == ("kronopt-broken-plugin", "broken", GROUP)
    assert isinstance(err.cause, ModuleNotFoundError) and err.__cause__ is err.cause
    assert "'kronopt-broken-plugin'" in str(err) and MISSING in str(err)
    assert MISSING not in sys.modules
    # nothing was registered; the next lookup fails the same way
    assert [e.key for e in reg.entries(load_plugins=False)] == ["alpha", "beta"]
    with pytest.raises(PluginLoadError):
        reg.entry("broken")


def test_a_missing_attribute_fails_to_load(tmp_path):
    reg = _registry(_ep("gone", f"{FIXTURE}:NoSuchClass", _dist(tmp_path, "kronopt-gone")))
    with pytest.raises(PluginLoadError, match="'kronopt-gone' failed to load: AttributeError") as info:
        reg.get("gone")
    assert isinstance(info.value.cause, AttributeError)


def test_an_entry_point_without_a_distribution_is_reported_as_unknown():
    reg = _registry(_ep("orphan", f"{MISSING}:Thing"))
    with pytest.raises(PluginLoadError, match="<unknown distribution>"):
        reg.get("orphan")


def test_only_the_named_plugin_is_loaded(tmp_path):
    reg = _registry(
        _ep("broken", f"{MISSING}:Thing", _dist(tmp_path, "kronopt-broken-plugin")),
        _ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-scaled")),
    )
    assert reg.get("scaled") is ScaledGradientInner  # the broken one is never touched
    assert reg.get("alpha") is AlphaInner
    with pytest.raises(PluginLoadError, match="kronopt-broken-plugin"):
        reg.entries()  # loading every plugin does reach it


def test_discovery_runs_once(tmp_path):
    calls = []
    ep = _ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-scaled"))
    reg: Registry = Registry("inner", group=GROUP, entry_points=lambda: calls.append(1) or [ep])
    for _ in range(3):
        assert reg.keys() == ["scaled"]
    assert "scaled" in reg and reg.get("scaled") is ScaledGradientInner
    assert len(calls) == 1


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_kronopt_no_plugins_turns_discovery_off(monkeypatch, value):
    def source():
        raise AssertionError("entry points were read although discovery is off")

    monkeypatch.setenv("KRONOPT_NO_PLUGINS", value)
    reg: Registry = Registry("inner", group=GROUP, entry_points=source)
    reg.register("alpha", description="the alpha rule")(AlphaInner)
    assert reg.keys() == ["alpha"]
    assert reg.plugins() == {}
    assert "scaled" not in reg
    with pytest.raises(KeyError) as info:
        reg.get("scaled")
    assert info.value.args[0].startswith("unknown inner stage 'scaled'; available: alpha (a plugin's stage")
    assert reg.get("alpha") is AlphaInner  # built-ins are unaffected


@pytest.mark.parametrize("value", ["", "0"])
def test_kronopt_no_plugins_empty_or_zero_keeps_discovery_on(tmp_path, monkeypatch, value):
    monkeypatch.setenv("KRONOPT_NO_PLUGINS", value)
    reg = _registry(_ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-scaled")))
    assert "scaled" in reg.keys()


def test_no_plugins_can_be_set_after_discovery(tmp_path, monkeypatch):
    reg = _registry(_ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-scaled")))
    assert "scaled" in reg.keys()
    monkeypatch.setenv("KRONOPT_NO_PLUGINS", "1")
    assert reg.keys() == ["alpha", "beta"]
    with pytest.raises(KeyError):
        reg.get("scaled")


# -- collisions --------------------------------------------------------------------------


def test_a_plugin_named_like_a_built_in_raises_naming_its_distribution(tmp_path):
    reg = _registry(_ep("alpha", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-impostor")))
    with pytest.raises(ValueError) as info:
        reg.keys()
    msg = str(info.value)
    assert "'alpha'" in msg and "'kronopt-impostor'" in msg and "built-in" in msg
    with pytest.raises(ValueError, match="kronopt-impostor"):
        reg.get("gamma")  # every discovery reports it, it is not cached away


def test_two_distributions_declaring_one_key_raise_naming_both(tmp_path):
    reg = _registry(
        _ep("shared", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-first")),
        _ep("shared", f"{FIXTURE}:Undocumented", _dist(tmp_path, "kronopt-second")),
    )
    with pytest.raises(ValueError) as info:
        reg.keys()
    msg = str(info.value)
    assert "'shared' is declared by two distributions" in msg
    assert "'kronopt-first'" in msg and "'kronopt-second'" in msg
    with pytest.raises(ValueError, match="two distributions"):
        reg.get("shared")


def test_distinct_plugins_from_several_distributions_coexist(tmp_path):
    reg = _registry(
        _ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-first")),
        _ep("bare", f"{FIXTURE}:Undocumented", _dist(tmp_path, "kronopt-second")),
    )
    assert reg.keys() == ["alpha", "bare", "beta", "scaled"]
    assert {e.key: e.source for e in reg.entries()} == {
        "alpha": "kronopt",
        "bare": "kronopt-second",
        "beta": "kronopt",
        "scaled": "kronopt-first",
    }



# -- plugin hygiene ---------------------------------------------------------------------


def test_a_plugin_name_that_is_not_snake_case_is_rejected_naming_its_distribution(tmp_path):
    reg = _registry(_ep("Bad-Name", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-badname")))
    with pytest.raises(kronopt.registry.PluginError, match="'Bad-Name' from distribution 'kronopt-badname' is not a snake_case"):
        reg.keys()


def test_a_plugin_that_is_not_a_stage_class_fails_to_load(tmp_path):
    reg = Registry(
        "inner",
        group=GROUP,
        contract=CONTRACTS["inner"],
        entry_points=lambda: [
            _ep("sep", "os:sep", _dist(tmp_path, "kronopt-notaclass")),
            _ep("plain", f"{FIXTURE}:Undocumented", _dist(tmp_path, "kronopt-plain")),
            _ep("good", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-good")),
        ],
    )
    with pytest.raises(PluginLoadError, match="kronopt-notaclass.*is not an attrs class"):
        reg.get("sep")
    with pytest.raises(PluginLoadError, match="kronopt-plain.*is not an attrs class"):
        reg.get("plain")
    assert reg.get("good") is ScaledGradientInner


def test_a_built_in_registered_after_discovery_cannot_hide_a_plugin(tmp_path):
    reg = _registry(_ep("gamma", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-gamma")))
    assert "gamma" in reg.keys()
    with pytest.raises(kronopt.registry.PluginError, match="collides with the plugin of that name from distribution 'kronopt-gamma'"):
        reg.register("gamma", description="late built-in")(AlphaInner)


def test_a_self_registering_plugin_is_credited_to_its_distribution(tmp_path):
    reg = _registry(_ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-self")))
    reg.register("scaled", description="registered by its own module at import")(ScaledGradientInner)
    assert reg.entry("scaled").source == "kronopt-self"


def test_config_reports_plugin_conflicts_as_config_errors(tmp_path):
    bad = Registry("inner", group=GROUP, entry_points=lambda: [_ep("adam", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path, "kronopt-clash"))])
    bad.register("adam", description="built-in")(AlphaInner)
    raw = kronopt.to_dict(kronopt.PRESETS["adamw"])
    restore = kronopt.SLOTS["inner"]
    kronopt.registry.SLOTS["inner"] = bad
    try:
        with pytest.raises(kronopt.ConfigError, match="inner.type: plugin inner stage 'adam' from distribution 'kronopt-clash'"):
            kronopt.from_dict(raw)
    finally:
        kronopt.registry.SLOTS["inner"] = restore


def test_a_plugin_module_that_registers_itself_loads_lazily(tmp_path, monkeypatch):
    module = tmp_path / "selfreg_plugin_mod.py"
    module.write_text(
        "import attrs\n"
        "from tests.unit import _plugin_fixture as f\n"
        "import kronopt.registry as r\n"
        "REG = None\n"
        "def make(reg):\n"
        "    @reg.register('selfreg', description='registers itself')\n"
        "    @attrs.frozen(kw_only=True)\n"
        "    class SelfReg(f.ScaledGradientInner):\n"
        "        pass\n"
        "    return SelfReg\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    holder = {}

    def entry_points():
        return [_ep("selfreg", "selfreg_loader:cls", _dist(tmp_path, "kronopt-selfreg"))]

    reg = Registry("inner", group=GROUP, entry_points=entry_points)
    loader = tmp_path / "selfreg_loader.py"
    loader.write_text("import selfreg_plugin_mod, tests.unit.test_registry as t\ncls = selfreg_plugin_mod.make(t._CURRENT)\n")
    global _CURRENT
    _CURRENT = reg
    try:
        entry = reg.entry("selfreg")
    finally:
        _CURRENT = None
    assert entry.source == "kronopt-selfreg" and entry.cls.__name__ == "SelfReg"
    del holder


_CURRENT = None


def _broken_beside_working(tmp_path, order):
    """Two plugins of one slot, one whose module is missing and one that loads, in ``order`` (1 or -1)."""
    for sub in (f"b{order}", f"s{order}"):
        (tmp_path / sub).mkdir()
    return [
        _ep("broken", f"{MISSING}:Thing", _dist(tmp_path / f"b{order}", "kronopt-broken-plugin")),
        _ep("scaled", f"{FIXTURE}:ScaledGradientInner", _dist(tmp_path / f"s{order}", "kronopt-scaled")),
    ][::order]


def test_kronopt_stages_lists_every_working_plugin_beside_a_broken_one(tmp_path, monkeypatch, capsys):
    """A plugin that fails to load is reported under its slot, and the slot's other plugins are still listed,
    whichever order discovery gives them in."""
    from kronopt.app import cli

    for order in (1, -1):
        eps = _broken_beside_working(tmp_path, order)
        monkeypatch.setattr(cli, "SLOTS", {"inner": _registry(*eps)})
        assert cli.main(["stages"]) == 0
        out = capsys.readouterr().out
        assert "! plugin 'broken'" in out and "kronopt-broken-plugin" in out, out
        assert "scaled" in out and "(plugin: kronopt-scaled)" in out, out
        assert "alpha" in out and "beta" in out, out


def test_entries_load_every_plugin_before_raising_the_first_failure(tmp_path):
    """``Registry.entries()`` tries each plugin on its own: a broken one is raised after the working ones are
    loaded, whichever order discovery gives, so they are registered and listed afterwards."""
    for order in (1, -1):
        eps = _broken_beside_working(tmp_path, order)
        reg = _registry(*eps)
        with pytest.raises(PluginLoadError, match="kronopt-broken-plugin"):
            reg.entries()
        assert [e.key for e in reg.entries(load_plugins=False)] == ["alpha", "beta", "scaled"]
