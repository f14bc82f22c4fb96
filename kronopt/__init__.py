"""kronopt: matrix-aware PyTorch optimizers composed from interchangeable, batched stages.

Importing the package registers every built-in stage.
"""

from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from . import bases, factors, inner_rules, refresh, splits  # noqa: F401  (registers the built-ins)
from .config import ConfigError, KronConfig, apply_overrides, dumps, from_dict, load, loads, read_toml, to_dict, with_overrides
from .optimizer import KronOptimizer
from .presets import PRESETS
from .registry import BASES, FACTORS, INNER_RULES, REFRESH, SLOTS, SPLITS, PluginLoadError, Registry

for _registry in SLOTS.values():  # the built-ins are in: a later registration checks the plugins first
    _registry._discover_on_register = True
del _registry

__version__ = "0.1.0"

__all__ = [
    "BASES",
    "FACTORS",
    "INNER_RULES",
    "PRESETS",
    "REFRESH",
    "SLOTS",
    "SPLITS",
    "ConfigError",
    "KronConfig",
    "KronOptimizer",
    "PluginLoadError",
    "Registry",
    "build",
    "dumps",
    "from_dict",
    "from_state_dict",
    "load",
    "loads",
    "resolve",
    "to_dict",
    "with_overrides",
]


def _raw(spec: str | Path | Mapping[str, Any] | KronConfig) -> dict[str, Any]:
    if isinstance(spec, KronConfig):
        return to_dict(spec)
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, str) and spec in PRESETS:
        return to_dict(PRESETS[spec])
    if not isinstance(spec, (str, PathLike)):
        raise TypeError(
            f"a config spec is a preset name, a TOML path, a dict or a KronConfig, not a {type(spec).__name__}"
            " (kronopt.build takes the parameters first: build(model.named_parameters(), 'soap'))"
        )
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return read_toml(path)[0]
    raise ConfigError([("", f"unknown preset {str(spec)!r}; presets: {', '.join(PRESETS)}; or give a .toml path or a dict")])


def resolve(spec: str | Path | Mapping[str, Any] | KronConfig, **overrides: Any) -> KronConfig:
    """The validated config of a preset name, TOML path, dict or config, with dotted overrides applied."""
    if isinstance(spec, KronConfig) or (isinstance(spec, str) and spec in PRESETS):
        return with_overrides(spec if isinstance(spec, KronConfig) else PRESETS[spec], overrides)
    return from_dict(apply_overrides(_raw(spec), overrides))


def build(
    params: Iterable[Any], spec: str | Path | Mapping[str, Any] | KronConfig = "soap", **overrides: Any
) -> KronOptimizer:
    """Build an optimizer: ``kronopt.build(model.named_parameters(), "soap", lr=1e-3, **{"refresh.every": 20})``.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        spec: a preset name (:data:`PRESETS`), a path to a TOML file, a dict or a
            :class:`KronConfig`.
        overrides: top-level hyperparameters and dotted stage keys.

    Raises:
        ConfigError: listing every problem of the config, before anything is built.
    """
    return KronOptimizer(params, resolve(spec, **overrides))


def from_state_dict(params: Iterable[Any], state_dict: Mapping[str, Any]) -> KronOptimizer:
    """Rebuild the optimizer a :meth:`KronOptimizer.state_dict` came from (its config travels with it) and load it."""
    kron = state_dict.get("kronopt")
    if not isinstance(kron, Mapping) or "config" not in kron:
        raise ValueError(
            "this state dict carries no kronopt config (no 'kronopt' section with a 'config': another optimizer's, "
            "or torch.distributed.checkpoint's, which keeps only 'state' and 'param_groups'); build the optimizer "
            "with kronopt.build(params, <its preset or config>) and call load_state_dict"
        )
    opt = KronOptimizer(params, from_dict(config.without_fallback_settings(kron["config"])))
    opt.load_state_dict(dict(state_dict))
    return opt
