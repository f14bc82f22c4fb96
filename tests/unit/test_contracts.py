"""Typed stage contracts: what registration refuses, the deprecated old-style flags, and the core
reading capabilities through ``kronopt.types.capabilities``.

Stage classes are built by hand and registered on fresh ``Registry`` instances (or through
``override`` on a global registry, restored at once); the global registries are never left modified.
"""

import importlib.metadata
import warnings
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import torch

import kronopt
from kronopt import compose, types
from kronopt.factors import EmaKronFactors, NoFactors
from kronopt.refresh import EveryRefresh
from kronopt.registry import PluginLoadError, Registry, StageContractError
from kronopt.splits import FullSplit
from kronopt.types import (
    CONTRACTS,
    BasisCapabilities,
    FactorCapabilities,
    InnerCapabilities,
    NoState,
    SplitCapabilities,
    capabilities,
    protocol_members,
)

GROUP = "kronopt.tests.contracts"
HERE = "tests.unit.test_contracts"


def _same(self: Any, state: Any, *args: Any) -> Any:
    return state


def _none(self: Any, *args: Any, **kwargs: Any) -> Any:
    return NoState()


#: the required members of each slot, as do-nothing functions
REQUIRED: dict[str, dict[str, Any]] = {
    "factors": {"init": _none, "update": _same, "factors": lambda self, state: (None, None)},
    "basis": {"init": _none, "refresh": lambda self, state, factors, ctx: (state, None)},
    "inner": {"init": _none, "direction": lambda self, state, G, ctx: (G, state), "on_basis_change": _same},
    "split": {"sides": lambda self, m, n, rotated: (("full", 0), ("full", 0)), "init": _none,
              "complement": lambda self, state, G, D, ctx, moment: (D, state)},
    "refresh": {"due": lambda self, step, *, first_call: True},
}

#: every optional member a capability can bring, as a do-nothing function
OPTIONAL: dict[str, Any] = {
    "eigvals": lambda self, state: (None, None),
    "flat_eigvals": lambda self, state: (None, None),
    "on_basis_change": _same,
    "moment": lambda self, state, ctx: None,
    "second_moment": lambda self, state: None,
    "is_elementwise": lambda self: True,
    "param_dims": lambda self, shape, layout: (),
    "starts_on_nonzero": lambda self, layout: False,
}


def make_stage(slot: str, *, caps: Any = None, drop: tuple[str, ...] = (), add: tuple[str, ...] = (),
               attributes: dict[str, Any] | None = None, name: str = "HandStage") -> type:
    """An attrs stage class of ``slot``: its required members minus ``drop``, the optional members
    ``add``, the capability record ``caps`` (if given) and extra class attributes (old-style flags)."""
    ns: dict[str, Any] = {k: v for k, v in REQUIRED[slot].items() if k not in drop}
    ns.update({k: OPTIONAL[k] for k in add})
    if caps is not None:
        ns["capabilities"] = caps
    ns.update(attributes or {})
    ns["__module__"] = HERE
    ns["__qualname__"] = name
    return attrs.frozen(kw_only=True)(type(name, (), ns))


def fresh(slot: str) -> Registry:
    return Registry(slot, group=GROUP, contract=CONTRACTS[slot], entry_points=lambda: [])


def _capabilities_with_members() -> list[Any]:
    """(slot, capability, its members) for every capability that brings members."""
    out = []
    for slot, contract in CONTRACTS.items():
        if contract.capabilities is None:
            continue
        for field in attrs.fields(contract.capabilities):
            proto = field.metadata["protocol"]
            if proto is not None:
                out.append(pytest.param(slot, field.name, protocol_members(proto), id=f"{slot}-{field.name}"))
    return out


CAPABILITIES_WITH_MEMBERS = _capabilities_with_members()


def _record(slot: str, **on: bool) -> Any:
    Record = CONTRACTS[slot].capabilities
    if slot == "inner" and on.get("supports_restricted"):
        on.setdefault("exposes_moment", True)  # the record requires it (see the next tests)
    return Record(**on)


# -- a well-formed stage --------------------------------------------------------------------------


@pytest.mark.parametrize("slot", list(CONTRACTS))
def test_a_well_formed_stage_registers_silently(slot):
    caps = None if CONTRACTS[slot].capabilities is None else CONTRACTS[slot].capabilities()
    cls = make_stage(slot, caps=caps)
    reg = fresh(slot)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.register("hand", description="hand-built")(cls)
    assert reg.get("hand") is cls
    if caps is not None:
        assert capabilities(cls) is caps and capabilities(cls()) is caps


def test_every_capability_with_members_is_listed():
    """The parametrisation below covers the capabilities the issue names, so none is left unchecked."""
    names = {(p.values[0], p.values[1]) for p in CAPABILITIES_WITH_MEMBERS}
    assert names == {
        ("factors", "provides_eigvals"), ("factors", "follows_basis"), ("factors", "supports_restricted"),
        ("inner", "supports_restricted"), ("inner", "exposes_moment"), ("inner", "has_second_moment"),
        ("split", "follows_basis"), ("inner", "elementwise"), ("inner", "reads_param_shape"),
        ("factors", "waits_for_nonzero"),
    }


@pytest.mark.parametrize("slot,capability,members", CAPABILITIES_WITH_MEMBERS)
def test_a_declared_capability_without_its_member_is_refused(slot, capability, members):
    caps = _record(slot, **{capability: True})
    drop = members if set(members) & set(REQUIRED[slot]) else ()
    cls = make_stage(slot, caps=caps, drop=drop)
    reg = fresh(slot)
    with pytest.raises(StageContractError) as info:
        reg.register("hand", description="hand-built")(cls)
    msg = str(info.value)
    assert f"{slot} stage 'hand'" in msg and f"{HERE}.HandStage" in msg
    if not drop:  # a member only the capability brings: the message names both
        assert f"capability {capability!r}" in msg or "capability 'supports_restricted'" in msg
    for member in members:
        assert f"{member}()" in msg
    assert "hand" not in reg.keys()
    # with the member, the same declaration registers
    ok = make_stage(slot, caps=caps, add=tuple(m for m in members if m not in REQUIRED[slot]))
    reg.register("hand", description="hand-built")(ok)
    assert capabilities(reg.get("hand")) == caps


@pytest.mark.parametrize("slot", list(CONTRACTS))
def test_a_stage_missing_a_protocol_member_is_refused(slot):
    contract = CONTRACTS[slot]
    caps = None if contract.capabilities is None else contract.capabilities()
    for member in protocol_members(contract.protocol):
        cls = make_stage(slot, caps=caps, drop=(member,))
        with pytest.raises(StageContractError) as info:
            fresh(slot).register("hand", description="hand-built")(cls)
        msg = str(info.value)
        assert f"{slot} stage 'hand'" in msg and f"lacks {member}()" in msg
        assert f"required of every {slot} stage (kronopt.types.{contract.protocol.__name__})" in msg


@pytest.mark.parametrize("slot,capability,members", CAPABILITIES_WITH_MEMBERS)
def test_an_optional_member_without_its_capability_is_refused(slot, capability, members):
    """A forgotten declaration would make the core skip the member silently; it is refused instead."""
    optional = [m for m in members if m not in REQUIRED[slot]]
    if not optional:
        pytest.skip("the member is required of every stage of the slot")
    cls = make_stage(slot, caps=CONTRACTS[slot].capabilities(), add=tuple(optional))
    with pytest.raises(StageContractError, match=rf"defines {optional[0]}\(\) but does not declare the {slot} capability"):
        fresh(slot).register("hand", description="hand-built")(cls)


def test_inner_supports_restricted_requires_exposes_moment():
    with pytest.raises(ValueError, match="supports_restricted needs exposes_moment"):
        InnerCapabilities(supports_restricted=True)


# -- misspelled and misplaced capabilities --------------------------------------------------------


def test_a_misspelled_capability_in_the_record_is_a_type_error():
    with pytest.raises(TypeError, match="provide_eigvals"):
        FactorCapabilities(provide_eigvals=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="must be <class 'bool'>"):
        BasisCapabilities(needs_factors=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_record", [True, False], ids=["typed", "old-style"])
def test_a_misspelled_flag_is_refused_naming_the_close_capability(with_record):
    caps = FactorCapabilities(provides_eigvals=True) if with_record else None
    cls = make_stage("factors", caps=caps, add=("eigvals",), attributes={"provide_eigvals": True})
    with pytest.raises(StageContractError) as info:
        fresh("factors").register("typo", description="typo")(cls)
    msg = str(info.value)
    assert "factors stage 'typo'" in msg and "declares 'provide_eigvals', which is not a capability of factors stages" in msg
    assert "did you mean 'provides_eigvals'?" in msg and "FactorCapabilities(...)" in msg


def test_a_capability_like_name_that_is_not_a_bool_is_refused_too():
    cls = make_stage("inner", caps=InnerCapabilities(), attributes={"needs_eigenvalues": "yes"})
    with pytest.raises(StageContractError, match="'needs_eigenvalues', which is not a capability of inner stages; did you mean 'needs_eigvals'"):
        fresh("inner").register("typo", description="typo")(cls)


def test_a_capability_of_another_slot_is_refused():
    cls = make_stage("inner", caps=InnerCapabilities(), attributes={"needs_factors": True})
    with pytest.raises(StageContractError, match="'needs_factors', which is not a capability of inner stages"):
        fresh("inner").register("misplaced", description="misplaced")(cls)
    refresh = make_stage("refresh", attributes={"restricts": True})
    with pytest.raises(StageContractError, match="refresh stages declare no capabilities"):
        fresh("refresh").register("flagged", description="flagged")(refresh)


def test_a_record_of_another_slot_is_refused():
    cls = make_stage("inner", caps=BasisCapabilities(needs_factors=True))
    with pytest.raises(StageContractError, match="its capabilities must be InnerCapabilities, got BasisCapabilities"):
        fresh("inner").register("wrong", description="wrong")(cls)


def test_a_record_and_old_style_flags_together_are_refused():
    cls = make_stage("inner", caps=InnerCapabilities(), attributes={"needs_eigvals": False})
    with pytest.raises(StageContractError, match="declares needs_eigvals as a class flag and also a capabilities record"):
        fresh("inner").register("both", description="both")(cls)


# -- override and plugins are checked too ---------------------------------------------------------


def test_override_checks_the_contract_and_leaves_the_registry_unchanged():
    before = kronopt.INNER_RULES.get("adam")
    bad = make_stage("inner", caps=InnerCapabilities(needs_eigvals=True), drop=("direction",))
    with pytest.raises(StageContractError, match="inner stage 'adam' .* lacks direction"):
        kronopt.INNER_RULES.override("adam", bad)
    assert kronopt.INNER_RULES.get("adam") is before


#: a third-party class whose declared capability lacks its member (loaded through an entry point below)
BadPlugin = make_stage("inner", caps=InnerCapabilities(has_second_moment=True), name="BadPlugin")


def _dist(tmp_path: Path, name: str) -> importlib.metadata.Distribution:
    info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")
    return importlib.metadata.PathDistribution(info)


def test_a_lazily_loaded_plugin_is_checked_and_reported_with_its_distribution(tmp_path):
    ep = importlib.metadata.EntryPoint(name="bad", value=f"{HERE}:BadPlugin", group=GROUP)._for(_dist(tmp_path, "kronopt-bad"))
    reg = Registry("inner", group=GROUP, contract=CONTRACTS["inner"], entry_points=lambda: [ep])
    assert "bad" in reg.keys()  # discovered, not loaded
    with pytest.raises(PluginLoadError) as info:
        reg.get("bad")
    msg = str(info.value)
    assert "distribution 'kronopt-bad'" in msg and isinstance(info.value.cause, StageContractError)
    assert "inner stage 'bad'" in msg and "capability 'has_second_moment'" in msg and "second_moment()" in msg


# -- the deprecated old-style flags ---------------------------------------------------------------


def test_old_style_flags_are_translated_with_a_deprecation_warning():
    cls = make_stage("inner", add=("moment",), attributes={"needs_eigvals": True, "supports_restricted": True})
    reg = fresh("inner")
    with pytest.warns(DeprecationWarning, match=r"inner stage 'legacy' .* declares its capabilities as class flags "
                      r"\(needs_eigvals, supports_restricted\); this is deprecated .*InnerCapabilities\("
                      r"needs_eigvals=True, supports_restricted=True, exposes_moment=True\)"):
        reg.register("legacy", description="old style")(cls)
    # members that were read by their presence become capabilities (moment -> exposes_moment)
    assert capabilities(cls) == InnerCapabilities(needs_eigvals=True, supports_restricted=True, exposes_moment=True)
    assert "capabilities" not in vars(cls)  # the third-party class itself is left as it was


def test_old_style_flags_still_drive_the_config_checks():
    """An old-style inner rule needing eigenvalues is still refused with the identity basis."""
    cls = make_stage("inner", attributes={"needs_eigvals": True})
    with pytest.warns(DeprecationWarning, match="class flags"):
        restore = kronopt.INNER_RULES.override("legacy_eig", cls)
    try:
        raw = kronopt.to_dict(kronopt.PRESETS["adamw"])
        raw["inner"] = {"type": "legacy_eig"}
        with pytest.raises(kronopt.ConfigError, match="inner 'legacy_eig' needs eigenvalue estimates, but neither basis 'identity'"):
            kronopt.from_dict(raw)
    finally:
        restore()
    assert "legacy_eig" not in kronopt.INNER_RULES.keys()


def test_old_style_flags_that_break_the_contract_are_refused():
    cls = make_stage("inner", attributes={"needs_eigvals": False, "supports_restricted": True})  # no moment()
    with pytest.raises(StageContractError, match="flags do not make a valid InnerCapabilities: supports_restricted needs exposes_moment"):
        fresh("inner").register("legacy", description="old style")(cls)


def test_a_stage_declaring_nothing_has_no_capabilities_and_no_warning():
    cls = make_stage("split")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh("split").register("bare", description="bare")(cls)
    assert capabilities(cls) == SplitCapabilities()


def test_reading_an_old_flag_on_a_typed_stage_warns_and_gives_the_record_value():
    with pytest.warns(DeprecationWarning, match=r"EmaKronFactors.provides_factors is deprecated .*capabilities\(stage\).provides_factors"):
        assert EmaKronFactors.provides_factors is True
    with pytest.warns(DeprecationWarning):
        assert NoFactors().provides_factors is False


def test_capabilities_of_an_unregistered_undeclared_class_is_a_type_error():
    class Loose:
        pass

    with pytest.raises(TypeError, match="declares no capabilities"):
        capabilities(Loose())


# -- the core reads the typed record --------------------------------------------------------------


@attrs.frozen(eq=False)
class Heard:
    """The split state after a basis change was announced."""

    count: int = 0


@attrs.frozen(kw_only=True)
class ListeningSplit(FullSplit):
    """``full`` that counts the basis changes it hears (declares ``follows_basis``)."""

    capabilities: ClassVar[SplitCapabilities] = SplitCapabilities(follows_basis=True)

    def init(self, layout: types.Layout, *, dtype: torch.dtype, device: torch.device) -> Heard:
        return Heard()

    def on_basis_change(self, state: Heard, change: types.BasisChange) -> Heard:
        return Heard(state.count + 1)


def test_compose_calls_on_basis_change_of_a_split_that_declares_follows_basis():
    cfg = attrs.evolve(kronopt.PRESETS["soap"], split=ListeningSplit(), refresh=EveryRefresh(every=1, at_first_call=True),
                       skip_first_call=False).bound()
    layout = types.Layout(batch=1, m=3, n=2, left="full", right="full")
    state = compose.init_state(cfg, layout, dtype=torch.float64, device=torch.device("cpu"))
    G = torch.ones(1, 3, 2, dtype=torch.float64)
    for _ in range(3):
        _, state = compose.step(cfg, layout, state, G)
    assert state.split.count == 3


# -- config compatibility messages ----------------------------------------------------------------


def test_restricted_split_with_stages_that_do_not_support_it_names_the_ones_that_do():
    raw = kronopt.to_dict(kronopt.PRESETS["pro_kl_shampoo"])
    raw["factors"] = {"type": "none"}
    raw["inner"] = {"type": "adam_rank1"}
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_dict(raw)
    errors = dict(info.value.errors)
    assert errors["factors.type"] == (
        "split 'lowrank_flat' keeps a restricted side, which factors 'none' does not support; "
        "factors stages that do: ema, kl, projector_splitting"
    )
    assert errors["inner.type"].startswith("split 'lowrank_flat' keeps a restricted side, which inner 'adam_rank1' does "
                                           "not support; inner stages that do: adam, eigenvalue")
