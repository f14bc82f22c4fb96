"""Name → stage-class registries, one per slot, with entry-point plugins.

A registry maps permanent snake_case keys (``"ema"``, ``"qr"``) to stage classes.
Built-in stages register themselves when :mod:`kronopt` is imported. Third-party
packages declare entry points in the group of the slot (``kronopt.factors``,
``kronopt.bases``, ``kronopt.inner_rules``, ``kronopt.splits``,
``kronopt.refresh``); they are *discovered* from package metadata without being
imported and *loaded* only when a config names them. ``KRONOPT_NO_PLUGINS=1``
turns discovery off.
"""

import importlib.metadata
import os
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import attrs

T = TypeVar("T")

_NO_PLUGINS_ENV = "KRONOPT_NO_PLUGINS"


class PluginError(ValueError):
    """A problem found while discovering plugins: a bad name or a name declared twice."""


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


class Registry(Generic[T]):
    """A registry of stage classes for one slot.

    Args:
        slot: the slot name used in configs and messages (``"factors"``).
        group: the entry-point group plugins use (``"kronopt.factors"``).
        required: attributes a loaded plugin class must have (the slot's protocol);
            a plugin lacking one, or not an attrs class, fails to load.
        entry_points: optional callable returning entry points, for tests; by
            default :func:`importlib.metadata.entry_points` filtered by ``group``.
    """

    def __init__(
        self,
        slot: str,
        *,
        group: str,
        required: tuple[str, ...] = (),
        entry_points: Callable[[], Iterable[importlib.metadata.EntryPoint]] | None = None,
    ) -> None:
        self.slot = slot
        self.group = group
        self.required = required
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points = entry_points
        self._plugins: dict[str, importlib.metadata.EntryPoint] | None = None

    # -- registration -------------------------------------------------------------
    def register(self, key: str, *, description: str, source: str = "kronopt") -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` under ``key``; duplicates raise."""
        if not key.isidentifier() or key != key.lower():
            raise ValueError(f"{self.slot} key must be a snake_case identifier, got {key!r}")

        def decorate(cls: type[T]) -> type[T]:
            self._add(Entry(key=key, cls=cls, description=description, source=source))
            return cls

        return decorate

    def _add(self, entry: Entry[T]) -> None:
        loading = entry.key == getattr(self, "_loading", None)  # a plugin registering itself on import
        if entry.source == "kronopt" and self._plugins and entry.key in self._plugins and not loading:
            ep = self._plugins[entry.key]
            raise PluginError(
                f"built-in {self.slot} stage {entry.key!r} collides with the plugin of that name from "
                f"distribution {_distribution_name(ep)!r}"
            )
        old = self._entries.get(entry.key)
        if old is not None:
            raise ValueError(
                f"duplicate {self.slot} stage {entry.key!r}: already registered by "
                f"{old.source} ({old.cls.__module__}.{old.cls.__qualname__}), "
                f"now by {entry.source} ({entry.cls.__module__}.{entry.cls.__qualname__})"
            )
        self._entries[entry.key] = entry

    def override(self, key: str, cls: type[T], *, description: str = "test override") -> Callable[[], None]:
        """Replace (or add) ``key`` for a test; returns a function restoring the old entry."""
        old = self._entries.get(key)
        self._entries[key] = Entry(key=key, cls=cls, description=description, source="override")

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
        self._check_plugin_class(cls, dist, key)
        doc = (cls.__doc__ or "").strip().splitlines()
        entry = Entry(key=key, cls=cls, description=doc[0].rstrip(".") if doc else "", source=dist)
        self._add(entry)
        return entry

    def _check_plugin_class(self, cls: object, dist: str, key: str) -> None:
        if not self.required:
            return
        problem = None
        if not isinstance(cls, type) or not attrs.has(cls):
            problem = f"{cls!r} is not an attrs class"
        else:
            missing = [name for name in self.required if not hasattr(cls, name)]
            if missing:
                problem = f"{cls.__qualname__} lacks {', '.join(missing)} required of a {self.slot} stage"
        if problem:
            raise PluginLoadError(dist, key, self.group, TypeError(problem))

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
        raise KeyError(f"unknown {self.slot} stage {key!r}; available: {', '.join(self.keys()) or '(none)'}")

    def get(self, key: str) -> type[T]:
        return self.entry(key).cls

    def entries(self, *, load_plugins: bool = True) -> list[Entry[T]]:
        """All entries, sorted by key (plugins loaded when ``load_plugins``)."""
        if load_plugins:
            for key in self.plugins():
                self._load_plugin(key)
        return [self._entries[k] for k in sorted(self._entries)]

    def key_of(self, cls: type) -> str:
        """The key under which ``cls`` is registered."""
        for entry in self._entries.values():
            if entry.cls is cls:
                return entry.key
        raise KeyError(f"{cls.__qualname__} is not a registered {self.slot} stage")


FACTORS: Registry = Registry(
    "factors", group="kronopt.factors", required=("init", "update", "factors", "provides_factors")
)
BASES: Registry = Registry(
    "basis", group="kronopt.bases", required=("init", "refresh", "needs_factors", "provides_eigvals")
)
INNER_RULES: Registry = Registry(
    "inner", group="kronopt.inner_rules", required=("init", "direction", "on_basis_change", "needs_eigvals")
)
SPLITS: Registry = Registry("split", group="kronopt.splits", required=("sides", "init", "complement"))
REFRESH: Registry = Registry("refresh", group="kronopt.refresh", required=("due",))

#: slot name in configs → its registry
SLOTS: dict[str, Registry] = {
    "factors": FACTORS,
    "basis": BASES,
    "inner": INNER_RULES,
    "split": SPLITS,
    "refresh": REFRESH,
}
