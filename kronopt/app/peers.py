"""Other libraries' optimizers that ``kronopt bench`` times against kronopt: a name → constructor registry.

A peer is named ``package.Class`` on the command line (``torch.Muon``,
``pytorch_optimizer.SOAP``, ``heavyball.SOAP``). Each entry builds the peer with
settings as close to the matching kronopt preset as the peer allows; the table in
README.md ("Benchmarking against other libraries") lists them, and
:data:`PEERS` holds the same text in :attr:`Peer.settings`.

``pytorch-optimizer`` and ``heavyball`` are optional (``pip install
'kronopt[peers]'``): :func:`unavailable` says why a peer cannot be built (not
installed, an import error, a class the installed version lacks) so the bench can
report it as a line instead of failing. Verified with pytorch-optimizer 4.1.0 and
heavyball 3.2.1.

heavyball compiles parts of its step with ``torch.compile`` by default (a module
switch, ``heavyball.utils.compile_mode``); :func:`eager` turns that off for the
duration of a run, so that every optimizer in a bench runs eagerly, kronopt
included.
"""

import contextlib
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, Literal

import attrs
import torch

import kronopt

__all__ = [
    "PEERS", "PEER_PACKAGES", "Peer", "StepAll", "build", "build_imported", "eager", "grouped", "in_groups",
    "is_import_name", "is_peer_name", "state_bytes", "unavailable", "unavailable_imported",
]

#: the install hint printed for a missing optional peer
INSTALL_HINT = "pip install 'kronopt[peers]'"


class StepAll:
    """Several optimizers stepped as one: a peer that takes matrices only, plus an AdamW for the rest."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()


def state_bytes(*opts: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizers' ``state``, walking nested dicts, lists and tuples.

    Each tensor object counts once (``numel × element_size``), so a tensor held
    under two keys is not counted twice. Parameters themselves are not state.

    Invariants:
        torch.optim.AdamW after one step: ``2 × numel × 4`` bytes of moments plus
        one float32 ``step`` per parameter (``test_bench.py::test_state_bytes_of_torch_adamw``).
    """
    seen: set[int] = set()
    total = 0
    # walked with a list of what is left (a nested function calling itself would hold itself in a cycle)
    left: list[Any] = [per_param for opt in opts for per_param in opt.state.values()]
    while left:
        x = left.pop()
        if not isinstance(x, torch.Tensor | dict | list | tuple) or id(x) in seen:
            continue  # a container seen before is not walked again (one that holds itself would never end)
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        else:
            left.extend(x.values() if isinstance(x, dict) else x)
    return total


def _groups(params: list) -> list[list[torch.nn.Parameter]]:
    """The parameters of each param group in ``params``: a list of tensors (one group) or of dicts (torch.optim's
    param groups, as :func:`grouped` makes them)."""
    return [list(g["params"]) for g in params] if params and isinstance(params[0], dict) else [list(params)]


def grouped(parts: Sequence[Sequence[torch.nn.Parameter]]) -> list:
    """Parameters in param groups as a constructor takes them: one group as its plain list of tensors (how the bench
    has always built every optimizer), several as torch.optim's dicts, each ``{"params": [...]}`` with no setting of
    its own (``kronopt bench --groups`` sets the groups' rates once the optimizer is built). Empty groups are
    dropped; none left gives ``[]``."""
    parts = [list(ps) for ps in parts if len(ps)]
    if len(parts) <= 1:
        return parts[0] if parts else []
    return [{"params": ps} for ps in parts]


def in_groups(
    items: Sequence[Any], groups: Sequence[Sequence[int]] | None = None, keep: Sequence[bool] | None = None
) -> list:
    """``items`` (parameters, or ``(name, parameter)`` pairs) in the param groups ``groups`` (each a list of positions in
    ``items``; ``None``: one group), those where ``keep`` holds (all without it), as :func:`grouped` gives them."""
    at = [range(len(items))] if groups is None else groups
    return grouped([[items[i] for i in g if keep is None or keep[i]] for g in at])


def _split(params: list, keep: Callable[[torch.nn.Parameter], bool]) -> tuple[list, list]:
    """(the parameters ``keep`` holds for, the rest), each in its param groups (:func:`grouped`)."""
    groups = _groups(params)
    return grouped([[p for p in g if keep(p)] for g in groups]), grouped([[p for p in g if not keep(p)] for g in groups])


def _with_adamw_rest(main: Any, rest: list, make_rest: Callable[[list], Any]) -> tuple[Any, Callable[[], int]]:
    if not rest:
        return main, lambda: state_bytes(main)
    other = make_rest(rest)
    return StepAll(main, other), lambda: state_bytes(main, other)


# -- constructors: (the imported package, parameters) → (something with .step(), state bytes) ---------------


def _torch_adamw(torch_: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    opt = torch_.optim.AdamW(params)
    return opt, lambda: state_bytes(opt)


def _muon_rest(params: list) -> torch.optim.Optimizer:
    # the AdamW for vectors of KellerJordan/Muon, which the muon preset's fallback reproduces: betas (0.9, 0.95),
    # eps 1e-10, no decay, and that reference's lr (the preset's own is tuned; a learning rate costs no time)
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)


def _torch_muon(torch_: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    mats, rest = _split(params, lambda p: p.ndim == 2)  # torch.optim.Muon takes exactly 2-D parameters
    return _with_adamw_rest(torch_.optim.Muon(mats), rest, _muon_rest)


def _po_soap(po: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    opt = po.SOAP(
        params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
        precondition_frequency=10, max_precondition_dim=10000, merge_dims=False, precondition_1d=False,
        correct_bias=True, normalize_gradient=False,
    )
    return opt, lambda: state_bytes(opt)


def _po_muon(po: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    mats, rest = _split(params, lambda p: p.ndim >= 2)
    groups = [dict(params=ps, use_muon=True) for ps in _groups(mats)]
    if rest:  # its own AdamW groups, set like the muon preset's fallback
        groups += [dict(params=ps, use_muon=False) for ps in _groups(rest)]
    opt = po.Muon(
        groups, lr=1e-3, momentum=0.95, weight_decay=0.1, nesterov=True, ns_steps=5,
        adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_wd=0.0,
    )
    return opt, lambda: state_bytes(opt)


_HEAVYBALL_SOAP_LIKE = dict(
    eps=1e-8, weight_decay=0.01, precondition_frequency=10, use_precond_schedule=False, max_precond_dim=10000,
    merge_dims=False, precondition_1d=False, multi_tensor=True, compile_step=False,
)


def _hb_soap(hb: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    opt = hb.SOAP(params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, **_HEAVYBALL_SOAP_LIKE)
    return opt, lambda: state_bytes(opt)


def _hb_kl_shampoo(hb: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    opt = hb.KLShampoo(params, lr=1e-4, betas=(0.9, 0.95), shampoo_beta=0.98, init_factor=0.1, **_HEAVYBALL_SOAP_LIKE)
    return opt, lambda: state_bytes(opt)


def _hb_muon(hb: ModuleType, params: list) -> tuple[Any, Callable[[], int]]:
    mats, rest = _split(params, lambda p: p.ndim >= 2)
    main = hb.Muon(mats, lr=1e-3, betas=(0.95, 0.95), weight_decay=0.1, nesterov=True, multi_tensor=True, compile_step=False)
    return _with_adamw_rest(
        main, rest,
        lambda ps: hb.AdamW(ps, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, multi_tensor=True, compile_step=False),
    )


@attrs.frozen(kw_only=True)
class Peer:
    """One optimizer of another library, as ``kronopt bench`` builds it.

    Attributes:
        name: the command-line name, ``package.Class``.
        package: the module to import (``heavyball``).
        distribution: what ``pip install`` calls it (``heavyball``).
        attribute: the class the constructor uses, looked up on ``package`` (dotted for ``optim.AdamW``).
        settings: the settings, for the documentation table.
        matches: the kronopt preset the settings follow.
        construct: ``(package module, parameters) -> (optimizer with .step(), state bytes function)``; the
            parameters a list of tensors or of param-group dicts (:func:`grouped`).
        matrices: the parameters its main class takes, ``"2-D"`` (exactly two dimensions) or ``"≥ 2-D"``,
            the others going to an AdamW beside it (a run needs one it takes); ``None``: any.
    """

    name: str
    package: str
    distribution: str
    attribute: str
    settings: str
    matches: str
    construct: Callable[[ModuleType, list], tuple[Any, Callable[[], int]]] = attrs.field(repr=False)
    matrices: Literal["2-D", "≥ 2-D"] | None = None

    def takes(self, shapes: Sequence[tuple[int, ...]]) -> bool:
        """Whether its main class takes one of ``shapes`` (always, without :attr:`matrices`)."""
        if self.matrices is None:
            return True
        return any(len(s) == 2 if self.matrices == "2-D" else len(s) >= 2 for s in shapes)

    def build_on(
        self, package: ModuleType, params: list[torch.nn.Parameter], names: Sequence[str] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> tuple[Any, Callable[[], int]]:
        """:attr:`construct` on ``params``, in the param groups ``groups`` (each a list of positions in ``params``;
        ``None``: one group); with their ``names``, those that the matched preset sends to its
        fallback by name (an embedding, a head: ``route.fallback_names``) go instead to a
        ``torch.optim.AdamW`` with that fallback's settings, as the preset's own do, so that both do the
        same work on a model (Muon orthogonalises no embedding); where that leaves nothing the main class takes
        (a model whose only matrices are an embedding and a head), every parameter goes to the AdamW, as the
        preset's would. Each group keeps its parameters on either side (:func:`grouped`)."""
        if names is None:
            return self.construct(package, in_groups(params, groups))
        if len(names) != len(params):
            raise ValueError(f"{self.name}: {len(names)} names for {len(params)} parameters")
        preset = kronopt.PRESETS[self.matches]
        fallback = preset.fallback
        aside = [fallback is not None and preset.route.named_to_fallback(n) for n in names]
        if not any(aside):
            return self.construct(package, in_groups(params, groups))
        if not self.takes([tuple(p.shape) for p, a in zip(params, aside) if not a]):
            aside = [True] * len(params)  # nothing left for the main class: all to the AdamW
        main, rest = in_groups(params, groups, [not a for a in aside]), in_groups(params, groups, aside)
        adamw = torch.optim.AdamW(
            rest, lr=fallback.lr, betas=fallback.inner.betas, eps=fallback.inner.eps, weight_decay=fallback.weight_decay
        )
        if not main:
            return adamw, lambda: state_bytes(adamw)
        opt, _ = self.construct(package, main)
        parts = (*(opt.opts if isinstance(opt, StepAll) else (opt,)), adamw)
        return StepAll(*parts), lambda: state_bytes(*parts)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer(name="torch.AdamW", package="torch", distribution="torch", attribute="optim.AdamW", matches="adamw",
             settings="torch defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01",
             construct=_torch_adamw),
        Peer(name="torch.Muon", package="torch", distribution="torch", attribute="optim.Muon", matches="muon",
             settings="torch defaults on 2-D parameters (lr 1e-3, weight_decay 0.1, momentum 0.95, Nesterov, 5 "
                      "Newton–Schulz steps); every other parameter to torch.optim.AdamW(lr 3e-4, betas (0.9, 0.95), "
                      "eps 1e-10, weight_decay 0)",
             construct=_torch_muon, matrices="2-D"),
        Peer(name="pytorch_optimizer.SOAP", package="pytorch_optimizer", distribution="pytorch-optimizer",
             attribute="SOAP", matches="soap",
             settings="lr 3e-3, betas (0.95, 0.95), shampoo_beta 0.95, eps 1e-8, weight_decay 0.01, "
                      "precondition_frequency 10, max_precondition_dim 10000, merge_dims off, precondition_1d off",
             construct=_po_soap),
        Peer(name="pytorch_optimizer.Muon", package="pytorch_optimizer", distribution="pytorch-optimizer",
             attribute="Muon", matches="muon",
             settings="parameters with ≥ 2 dimensions: lr 1e-3, momentum 0.95, Nesterov, weight_decay 0.1, 5 "
                      "Newton–Schulz steps; the rest in its own AdamW group (lr 3e-4, betas (0.9, 0.95), eps 1e-10, "
                      "weight_decay 0)",
             construct=_po_muon, matrices="≥ 2-D"),
        Peer(name="heavyball.SOAP", package="heavyball", distribution="heavyball", attribute="SOAP", matches="soap",
             settings="lr 3e-3, betas (0.95, 0.95), shampoo_beta 0.95, eps 1e-8, weight_decay 0.01, "
                      "precondition_frequency 10 (use_precond_schedule off), max_precond_dim 10000, merge_dims off, "
                      "precondition_1d off; foreach (multi_tensor on), eager (compile_step off, compile_mode None)",
             construct=_hb_soap),
        Peer(name="heavyball.KLShampoo", package="heavyball", distribution="heavyball", attribute="KLShampoo",
             matches="kl_shampoo",
             settings="lr 1e-4, betas (0.9, 0.95) (momentum 0.9), shampoo_beta 0.98, init_factor 0.1, eps 1e-8, "
                      "weight_decay 0.01, precondition_frequency 10, otherwise as heavyball.SOAP; 1-D parameters stay "
                      "with it (precondition_1d off), where kronopt's kl_shampoo sends them to AdamW",
             construct=_hb_kl_shampoo),
        Peer(name="heavyball.Muon", package="heavyball", distribution="heavyball", attribute="Muon", matches="muon",
             settings="parameters with ≥ 2 dimensions: lr 1e-3, momentum 0.95 (betas[0]), Nesterov, weight_decay 0.1; "
                      "the rest to heavyball.AdamW(lr 3e-4, betas (0.9, 0.95), eps 1e-10, weight_decay 0); foreach, eager",
             construct=_hb_muon, matrices="≥ 2-D"),
    ]
}

#: the packages whose ``package.Class`` names are peers (an unknown one is an argument error)
PEER_PACKAGES: tuple[str, ...] = tuple(dict.fromkeys(p.package for p in PEERS.values()))


def is_peer_name(name: str) -> bool:
    """Whether ``name`` is spelled as a peer (``package.Class`` of a peer package), known or not."""
    package, dot, attr = name.partition(".")
    return bool(dot) and package in PEER_PACKAGES and bool(attr) and not name.endswith(".toml")


def _resolve(module: ModuleType, attribute: str) -> Any:
    obj: Any = module
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def unavailable(name: str) -> str | None:
    """Why the known peer ``name`` cannot be built here (one line), or ``None`` when it can.

    Importing the package is the test: a package that is not installed, that fails
    to import, or whose installed version lacks the class is reported, never raised.
    """
    peer = PEERS[name]
    try:
        module = importlib.import_module(peer.package)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == peer.package:
            return f"not installed ({INSTALL_HINT})"
        return f"cannot be imported ({type(exc).__name__}: {exc}; {INSTALL_HINT})"
    try:
        _resolve(module, peer.attribute)
    except AttributeError:
        version = getattr(module, "__version__", None) or _version(peer.distribution)
        return f"the installed {peer.distribution} {version} has no {peer.attribute} ({INSTALL_HINT} --upgrade)"
    return None


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def build(
    name: str, params: list[torch.nn.Parameter], names: Sequence[str] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
) -> tuple[Any, Callable[[], int]]:
    """The peer ``name`` on ``params`` (named ``names``, in the param groups ``groups``: :meth:`Peer.build_on`):
    ``(optimizer with .step(), state bytes function)``.

    Raises:
        KeyError: ``name`` is not in :data:`PEERS`.
        ImportError: its package is missing (check :func:`unavailable` first).
    """
    peer = PEERS[name]
    return peer.build_on(importlib.import_module(peer.package), params, names, groups)


# -- any optimizer class by import path: ``module:Class`` ------------------------------------------------


def is_import_name(name: str) -> bool:
    """Whether ``name`` is spelled ``module:Class`` (dotted module and attribute names, e.g. ``soap:SOAP``)
    and is not a TOML file's name (``cfg:v2.toml`` is a config)."""
    module, colon, attr = name.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    return bool(colon) and all(part.isidentifier() for part in parts) and not name.endswith(".toml")


def unavailable_imported(name: str) -> str | None:
    """Why ``module:Class`` cannot be built here (one line), or ``None`` when it can: the module does
    not import (it must be on ``PYTHONPATH``), lacks the attribute, or the attribute is not a class."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # a module that ends its process at import: a reported line too
        return f"cannot be imported (importing it called sys.exit({exc.code!r}))"
    except Exception as exc:  # any import failure is a reported line, not a crash
        return f"cannot be imported ({type(exc).__name__}: {exc}; is it on PYTHONPATH?)"
    try:
        obj = _resolve(module, attr)
    except AttributeError:
        return f"module {module_name!r} has no {attr!r}"
    if not isinstance(obj, type):
        return f"{name} is not a class"
    return _not_steppable(obj)


def _not_steppable(cls: type) -> str | None:
    """Why ``cls(params).step()`` is not how the class is used (one line), or ``None``: the bench builds it
    on the parameters alone and calls ``step()`` with no argument."""
    if not callable(getattr(cls, "step", None)):
        return f"{cls.__module__}:{cls.__qualname__} is not an optimizer (it has no step method)"
    # the first argument of each: the parameters (the class's signature), self (the plain function step)
    for what, fn in (("its constructor", cls), ("its step()", cls.step)):
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: left to the call
            continue
        needed = [
            q.name for q in params[1:]
            if q.default is inspect.Parameter.empty and q.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if needed:
            return (
                f"{what} needs {', '.join(needed)}; kronopt bench builds Class(params) and calls step() "
                "(write a wrapper module whose class sets them)"
            )
    return None


def build_imported(
    name: str, params: list[torch.nn.Parameter], groups: Sequence[Sequence[int]] | None = None
) -> tuple[Any, Callable[[], int]]:
    """The optimizer class ``module:Class`` on ``params`` with its own defaults: ``Class(params)``, or with several
    param ``groups`` (positions in ``params``) ``Class([{"params": ...}, ...])``, as torch.optim takes them.

    For an optimizer kronopt has no entry for, e.g. the reference SOAP
    (``nikhilvyas/SOAP``'s ``soap.py`` on ``PYTHONPATH`` as ``soap:SOAP``: its defaults
    are SOAP's published settings). Settings other than the defaults need a wrapper
    module whose class sets them.
    """
    module_name, _, attr = name.partition(":")
    cls = _resolve(importlib.import_module(module_name), attr)
    opt = cls(in_groups(params, groups))
    return opt, lambda: state_bytes(opt)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Within the block, heavyball (when imported) runs its step functions without ``torch.compile``.

    heavyball compiles its fused step functions on first call unless
    ``heavyball.utils.compile_mode`` is ``None``; the switch is set for the block
    and restored after it.
    """
    utils = sys.modules.get("heavyball.utils")
    if utils is None or not hasattr(utils, "compile_mode"):
        yield
        return
    old = utils.compile_mode
    utils.compile_mode = None
    try:
        yield
    finally:
        utils.compile_mode = old
