"""Name → stage-class registries, one per slot, with entry-point plugins.

A registry maps permanent snake_case keys (``"ema"``, ``"qr"``) to stage classes.
Built-in stages register themselves when :mod:`kronopt` is imported. Third-party
packages declare entry points in the group of the slot (``kronopt.factors``,
``kronopt.bases``, ``kronopt.inner_rules``, ``kronopt.splits``,
``kronopt.refresh``); they are *discovered* from package metadata without being
imported and *loaded* only when a config names them. ``KRONOPT_NO_PLUGINS=1``
turns discovery off.

Every stage is checked against its slot's contract (:data:`kronopt.types.CONTRACTS`)
when it is registered, by :meth:`Registry.register`, :meth:`Registry.override` or a
plugin load: it must have the members of the slot's Protocol, declare its
capabilities as the slot's typed record (``capabilities: ClassVar[InnerCapabilities]``)
and have the members each declared capability needs. A class-level flag that is not
a capability of the slot (``provide_eigvals = True``) is refused. Old-style flags
(``needs_eigvals = False`` as a class attribute) are translated into the record with a
``DeprecationWarning``, for one release.
"""

import difflib
import importlib.metadata
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import attrs

from .types import _TRANSLATED, CONTRACTS, Capabilities, SlotContract, capabilities, protocol_members

T = TypeVar("T")

_NO_PLUGINS_ENV = "KRONOPT_NO_PLUGINS"


class PluginError(ValueError):
    """A problem found while discovering plugins: a bad name or a name declared twice."""


class StageContractError(TypeError):
    """A stage does not meet its slot's contract; raised when it is registered.

    The message names the stage (key and class), the slot, and the capability or
    member at fault.
    """


class PluginLoadError(ImportError):
    """A plugin entry point could not be loaded; names the distribution behind it."""

    def __init__(self, distribution: str, key: str, group: str, cause: BaseException):
        self.distribution = distribution
        self.key = key
        self.group = group
        self.cause = cause
        super().__init__(
            f"plugin {key!r} (entry point group {group!r}) from distribution "
            f"{distribution!r} failed to load: {type(cause).__name__}: {cause}"
        )


@attrs.frozen(kw_only=True)
class Entry(Generic[T]):
    """One registered stage: its key, class, one-line description and origin."""

    key: str
    cls: type[T]
    description: str
    source: str  # "kronopt" for built-ins, else the distribution name


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


#: a class-level name that reads like a capability flag (``provides_x``, ``needs_x``, ``supports_x``, …)
_CAPABILITY_LIKE = re.compile(r"^(provides?|needs?|supports?|restricts?|exposes?|has|keeps?|follows?|requires?)(_|$)")

#: the release that stops translating old-style flags
LEGACY_FLAGS_REMOVED_IN = "0.3"


class _DeprecatedFlag:
    """Read-only alias of an old-style flag on a class that declares typed capabilities.

    Installed at registration, for one release, so that code still reading
    ``Stage.provides_eigvals`` gets the typed record's value (with a ``DeprecationWarning``).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type) -> bool:
        warnings.warn(
            f"{owner.__qualname__}.{self.name} is deprecated and goes in kronopt {LEGACY_FLAGS_REMOVED_IN}; "
            f"read kronopt.types.capabilities(stage).{self.name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return bool(attrs.asdict(capabilities(owner))[self.name])


def _class_attributes(cls: type) -> dict[str, Any]:
    """Names defined on ``cls`` or its bases (not ``object``), nearest definition first."""
    out: dict[str, Any] = {}
    for base in cls.__mro__:
        if base is object:
            continue
        for name, value in vars(base).items():
            out.setdefault(name, value)
    return out


def _declared(cls: type) -> object:
    """The ``capabilities`` record the class itself (or a base) declares, or ``None``."""
    return _class_attributes(cls).get("capabilities")


def _members_text(names: Iterable[str]) -> str:
    return ", ".join(f"{n}()" for n in names)


@attrs.frozen(kw_only=True)
class _Checked:
    """The outcome of a contract check: the typed record and the old-style flags it came from."""

    record: Capabilities | None
    legacy_flags: tuple[str, ...] = ()
    legacy: bool = False


def check_stage(contract: SlotContract, cls: type, key: str) -> _Checked:
    """Check ``cls`` against the slot contract; raise :class:`StageContractError` naming what is wrong.

    Order: unknown capability-like flags, the capability record (or old-style flags translated
    into it), the slot Protocol's members, then each capability's members both ways (a declared
    capability needs its members; an optional member needs its capability declared, else the core
    would never call it).
    """
    slot = contract.slot
    where = f"{slot} stage {key!r} ({cls.__module__}.{cls.__qualname__})"
    Record = contract.capabilities
    names = contract.capability_names()
    how = (
        f"declare them as `capabilities: ClassVar[{Record.__name__}] = {Record.__name__}(...)`"
        if Record is not None
        else f"{slot} stages declare no capabilities"
    )
    if not isinstance(cls, type):
        raise StageContractError(f"{where} is not a class")
    if not attrs.has(cls):
        raise StageContractError(
            f"{where} is not an attrs class: a stage is a frozen record of its options, which configs build, "
            "validate and write back; decorate it with @attrs.frozen(kw_only=True)"
        )
    fields = {f.name for f in attrs.fields(cls)}
    if any(f.alias == "type" for f in attrs.fields(cls) if f.init):
        raise StageContractError(
            f"{where} has an option named 'type', the key by which a config table names its stage: rename the option"
        )
    found = _class_attributes(cls)

    flags: dict[str, Any] = {}
    for name, value in found.items():
        if name.startswith("_") or name in fields or name == "capabilities" or isinstance(value, _DeprecatedFlag):
            continue
        plain = not callable(value) and not isinstance(value, (property, classmethod, staticmethod))
        if not (isinstance(value, bool) or (plain and _CAPABILITY_LIKE.match(name))):
            continue
        if name in names:
            flags[name] = value
            continue
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = f"{slot} capabilities: {', '.join(names)}; " if names else ""
        raise StageContractError(
            f"{where} declares {name!r}, which is not a capability of {slot} stages{hint} ({known}{how})"
        )

    record = found.get("capabilities")
    legacy = False
    if record is not None:
        if Record is None:
            raise StageContractError(f"{where} declares capabilities, but {how}")
        if not isinstance(record, Record):
            raise StageContractError(
                f"{where}: its capabilities must be {Record.__name__}, got {type(record).__name__}"
            )
        if flags:
            raise StageContractError(
                f"{where} declares {', '.join(sorted(flags))} as a class flag and also a capabilities record; "
                f"keep only the record ({Record.__name__}({', '.join(f'{k}={v!r}' for k, v in flags.items())}))"
            )
    elif Record is not None:  # old style: class flags, and members read by their presence (or nothing at all)
        values: dict[str, Any] = {}
        for f in attrs.fields(Record):
            if f.name in flags:
                values[f.name] = flags[f.name]
            elif f.metadata["legacy"] == "member":
                values[f.name] = all(hasattr(cls, m) for m in protocol_members(f.metadata["protocol"]))
        try:
            record = Record(**values)
        except (TypeError, ValueError) as exc:
            raise StageContractError(f"{where}: its flags do not make a valid {Record.__name__}: {exc}") from exc
        legacy = bool(flags) or record != Record()  # declaring nothing at all means no capabilities

    required = protocol_members(contract.protocol)
    missing = [m for m in required if not hasattr(cls, m)]
    if missing:
        raise StageContractError(
            f"{where} lacks {_members_text(missing)}, required of every {slot} stage "
            f"(kronopt.types.{contract.protocol.__name__})"
        )

    if record is not None:
        declared = attrs.asdict(record)
        claimed = set(required)
        owner: dict[str, str] = {}  # optional member -> the capability that brings it
        for f in attrs.fields(type(record)):
            proto = f.metadata["protocol"]
            if proto is None:
                continue
            members = protocol_members(proto)
            for m in members:
                if m not in owner or f.metadata["legacy"] == "member":
                    owner[m] = f.name
            if declared[f.name]:
                claimed.update(members)
                lacking = [m for m in members if not hasattr(cls, m)]
                if lacking:
                    raise StageContractError(
                        f"{where} declares the {slot} capability {f.name!r} but lacks its member "
                        f"{_members_text(lacking)} (kronopt.types.{proto.__name__})"
                    )
        for m, cap in owner.items():
            if m not in claimed and hasattr(cls, m):
                raise StageContractError(
                    f"{where} defines {m}() but does not declare the {slot} capability {cap!r}, so it would "
                    f"never be called; set {type(record).__name__}({cap}=True) or rename the method"
                )
    return _Checked(record=record, legacy_flags=tuple(sorted(flags)), legacy=legacy)



def _origin(entry: "Entry[Any]") -> str:
    """Who registered an entry, for a message: kronopt for a built-in, the plugin's distribution, or "your code" (a
    ``register`` call outside kronopt, whose source is kronopt's by default)."""
    if entry.source != "kronopt" or entry.cls.__module__.split(".")[0] == "kronopt":
        return entry.source
    return "your code"

class Registry(Generic[T]):
    """A registry of stage classes for one slot.

    Args:
        slot: the slot name used in configs and messages (``"factors"``).
        group: the entry-point group plugins use (``"kronopt.factors"``).
        contract: the slot's contract (:data:`kronopt.types.CONTRACTS`); every stage
            registered, overridden or loaded is checked against it (and a plugin
            must be an attrs class). ``None``: no checks (a registry of plain classes).
        entry_points: optional callable returning entry points, for tests; by
            default :func:`importlib.metadata.entry_points` filtered by ``group``.
    """

    def __init__(
        self,
        slot: str,
        *,
        group: str,
        contract: SlotContract | None = None,
        entry_points: Callable[[], Iterable[importlib.metadata.EntryPoint]] | None = None,
    ) -> None:
        self.slot = slot
        self.group = group
        self.contract = contract
        self._loading: str | None = None  # the plugin key being imported (it may register itself)
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points = entry_points
        self._plugins: dict[str, importlib.metadata.EntryPoint] | None = None
        #: set once kronopt's built-ins are registered (kronopt/__init__.py): a later registration (user code)
        #: discovers the plugins first, so that a key an installed plugin declares is refused at once
        self._discover_on_register = False

    # -- registration -------------------------------------------------------------
    def _check_key(self, key: str) -> None:
        """A key is a snake_case identifier (a config names the stage by it, in TOML and in dotted overrides)."""
        if not key.isidentifier() or key != key.lower():
            raise ValueError(f"{self.slot} key must be a snake_case identifier, got {key!r}")

    def register(self, key: str, *, description: str, source: str = "kronopt") -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` under ``key``; duplicates raise."""
        self._check_key(key)

        def decorate(cls: type[T]) -> type[T]:
            self._add(Entry(key=key, cls=cls, description=description, source=source), stacklevel=4)
            return cls

        return decorate

    def _add(self, entry: Entry[T], *, stacklevel: int = 3) -> None:
        loading = entry.key == self._loading  # a plugin registering itself on import
        if not loading and self._discover_on_register and self._plugins is None:
            self.plugins()  # imports nothing
        ep = (self._plugins or {}).get(entry.key)
        if entry.source == "kronopt" and ep is not None and not loading and entry.cls.__module__ != ep.module:
            what = "built-in" if entry.cls.__module__.startswith("kronopt.") else "registered"
            raise PluginError(
                f"{what} {self.slot} stage {entry.key!r} ({entry.cls.__module__}.{entry.cls.__qualname__}) collides "
                f"with the plugin of that name from distribution {_distribution_name(ep)!r}; register it under "
                "another key"
            )
        if ep is not None and entry.source == "kronopt" and entry.cls.__module__ == ep.module:  # its module, imported
            entry = attrs.evolve(entry, source=_distribution_name(ep))
        old = self._entries.get(entry.key)
        if old is not None:
            raise ValueError(
                f"duplicate {self.slot} stage {entry.key!r}: already registered by "
                f"{_origin(old)} ({old.cls.__module__}.{old.cls.__qualname__}), "
                f"now by {_origin(entry)} ({entry.cls.__module__}.{entry.cls.__qualname__})"
            )
        self._check(entry, stacklevel=stacklevel + 1)
        self._entries[entry.key] = entry

    def _check(self, entry: Entry[T], *, stacklevel: int) -> None:
        """Check the entry's class against the slot contract; translate old-style flags (deprecated)."""
        if self.contract is None:
            return
        cls = entry.cls
        checked = check_stage(self.contract, cls, entry.key)
        if checked.record is None:
            return
        Record = type(checked.record)
        if checked.record is not _declared(cls):  # no record on the class: remember the translated one
            _TRANSLATED[cls] = checked.record
        if checked.legacy:
            declared = [f"{k}=True" for k, v in attrs.asdict(checked.record).items() if v]
            warnings.warn(
                f"{self.slot} stage {entry.key!r} ({cls.__module__}.{cls.__qualname__}, from {entry.source}) declares "
                f"its capabilities as class flags ({', '.join(checked.legacy_flags) or 'none'}); this is deprecated "
                f"and stops working in kronopt {LEGACY_FLAGS_REMOVED_IN}: declare "
                f"`capabilities: ClassVar[{Record.__name__}] = {Record.__name__}({', '.join(declared)})` instead",
                DeprecationWarning,
                stacklevel=stacklevel,
            )
            return
        found = _class_attributes(cls)
        for f in attrs.fields(Record):  # old readers of the flags keep working for one release
            if f.metadata["legacy"] == "flag" and f.name not in found:
                setattr(cls, f.name, _DeprecatedFlag(f.name))

    def override(self, key: str, cls: type[T], *, description: str = "test override") -> Callable[[], None]:
        """Replace (or add) ``key`` for a test; returns a function restoring the old entry.

        The class and the key are checked like a registered one's.
        """
        self._check_key(key)
        if self._discover_on_register and self._plugins is None:
            self.plugins()  # a later discovery must not take the override for a colliding stage
        old = self._entries.get(key)
        entry = Entry(key=key, cls=cls, description=description, source="override")
        self._check(entry, stacklevel=3)
        self._entries[key] = entry

        def restore() -> None:
            if old is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = old

        return restore

    # -- plugins --------------------------------------------------------------------
    def plugins(self) -> dict[str, importlib.metadata.EntryPoint]:
        """Entry points of this slot's group, discovered without importing them."""
        if os.environ.get(_NO_PLUGINS_ENV, "") not in ("", "0"):
            return {}
        if self._plugins is None:
            source = self._entry_points or (lambda: importlib.metadata.entry_points(group=self.group))
            found: dict[str, importlib.metadata.EntryPoint] = {}
            for ep in source():
                dist = _distribution_name(ep)
                if not ep.name.isidentifier() or ep.name != ep.name.lower():
                    raise PluginError(
                        f"plugin {self.slot} stage {ep.name!r} from distribution {dist!r} is not a snake_case "
                        "identifier; rename its entry point"
                    )
                old = self._entries.get(ep.name)
                if old is not None and old.source == "override":  # shadows the plugin until restored
                    found[ep.name] = ep
                    continue
                if old is not None:
                    if old.cls.__module__ == ep.module:  # the plugin's module was imported and registered itself
                        self._entries[ep.name] = attrs.evolve(old, source=dist)
                        continue
                    raise PluginError(
                        f"plugin {self.slot} stage {ep.name!r} from distribution {dist!r} collides with the "
                        f"built-in stage of that name ({old.cls.__module__}.{old.cls.__qualname__})"
                    )
                if ep.name in found:
                    raise PluginError(
                        f"plugin {self.slot} stage {ep.name!r} is declared by two distributions: "
                        f"{_distribution_name(found[ep.name])!r} and {dist!r}"
                    )
                found[ep.name] = ep
            self._plugins = found
        return {k: v for k, v in self._plugins.items() if k not in self._entries}

    def _load_plugin(self, key: str) -> Entry[T]:
        ep = self.plugins()[key]
        dist = _distribution_name(ep)
        self._loading = key
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - wrapped with the distribution name
            raise PluginLoadError(dist, key, self.group, exc) from exc
        finally:
            self._loading = None
        if key in self._entries:  # the module registered itself on import
            entry = attrs.evolve(self._entries[key], source=dist)
            self._entries[key] = entry
            return entry
        if self.contract is not None and (not isinstance(cls, type) or not attrs.has(cls)):
            raise PluginLoadError(dist, key, self.group, TypeError(f"{cls!r} is not an attrs class"))
        doc = (cls.__doc__ or "").strip().splitlines()
        entry = Entry(key=key, cls=cls, description=doc[0].rstrip(".") if doc else "", source=dist)
        try:
            self._add(entry)
        except StageContractError as exc:
            raise PluginLoadError(dist, key, self.group, exc) from exc
        return entry

    # -- lookup ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every key: registered stages and discovered (not yet loaded) plugins."""
        return sorted(set(self._entries) | set(self.plugins()))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._entries or key in self.plugins())

    def entry(self, key: str) -> Entry[T]:
        """The entry for ``key``, loading a plugin on first use; unknown keys list the known ones."""
        plugins = self.plugins()  # surfaces discovery problems on every lookup
        if key in self._entries:
            return self._entries[key]
        if key in plugins:
            return self._load_plugin(key)
        raise KeyError(
            f"unknown {self.slot} stage {key!r}; available: {', '.join(self.keys()) or '(none)'} (a plugin's stage "
            f"is there once its package, with an entry point in group {self.group!r}, is installed, or the module "
            "that registers it is imported)"
        )

    def get(self, key: str) -> type[T]:
        return self.entry(key).cls

    def entries(self, *, load_plugins: bool = True) -> list[Entry[T]]:
        """All entries, sorted by key (plugins loaded when ``load_plugins``: each on its own, so one that fails
        to load keeps none of the others out; the first failure is raised once all have been tried)."""
        if load_plugins:
            failed: PluginLoadError | None = None
            for key in self.plugins():
                try:
                    self._load_plugin(key)
                except PluginLoadError as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed
        return [self._entries[k] for k in sorted(self._entries)]

    def key_of(self, cls: type) -> str:
        """The key under which ``cls`` is registered."""
        for entry in self._entries.values():
            if entry.cls is cls:
                return entry.key
        raise KeyError(f"{cls.__qualname__} is not a registered {self.slot} stage")


FACTORS: Registry = Registry("factors", group="kronopt.factors", contract=CONTRACTS["factors"])
BASES: Registry = Registry("basis", group="kronopt.bases", contract=CONTRACTS["basis"])
INNER_RULES: Registry = Registry("inner", group="kronopt.inner_rules", contract=CONTRACTS["inner"])
SPLITS: Registry = Registry("split", group="kronopt.splits", contract=CONTRACTS["split"])
REFRESH: Registry = Registry("refresh", group="kronopt.refresh", contract=CONTRACTS["refresh"])

#: slot name in configs → its registry
SLOTS: dict[str, Registry] = {
    "factors": FACTORS,
    "basis": BASES,
    "inner": INNER_RULES,
    "split": SPLITS,
    "refresh": REFRESH,
}
