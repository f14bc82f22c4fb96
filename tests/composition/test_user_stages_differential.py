"""A researcher's own stages, one in every slot, used the way docs/extending.md and docs/configs.md say.

The stages (``_SOURCE``: AdaGrad-style Kronecker factors, a float64 eigenbasis, RMS-normalised momentum
whitened by the eigenvalues, a split that adds ``alpha·G`` and keeps a per-block counter, a refresh at
updates 1, 2, 4, 8, …) are written once as the source of a module and used twice:

* in process, registered with ``Registry.override`` (docs/extending.md §4), against a float64 reference
  loop written from their docstrings: batched with same-shape blocks, routed to a ``[fallback]`` with
  other options, through ``state_dict``/``from_state_dict``;
* as an installed package: a module and a ``.dist-info`` (``METADATA`` + ``entry_points.txt``, what
  ``pip install`` writes) on ``PYTHONPATH`` of a fresh interpreter, so that kronopt finds the stages of
  every slot through real entry points without the user importing anything (docs/extending.md §5). The
  ``.dist-info`` is never put on this process's ``sys.path``: the global registries would list it.

Bugs this file found, each fixed (each docstring says what was wrong and what is right):

* registering a key that an installed plugin declares succeeds when discovery has not run yet, and then
  every lookup of that slot fails, ``adam`` included, blaming a "built-in" stage (``registry.Registry._add``);
* a bad option of one stage hides every cross-stage check, also those that do not involve that stage; a bad
  ``[refresh]`` value adds a false "needs refresh.at_first_call = true" error (``config._check_compatible_anyway``);
* a stage class that is not an attrs class is registered, and ``from_dict`` then raises a raw
  ``NotAnAttrsClassError`` instead of a ``ConfigError`` (``registry.check_stage``);
* the stage contract suite (tests/contract) passes stages that modify their inputs in place, read tensors on
  the host, keep non-symmetric factors or mix the blocks of a bucket, and reports a wrong direction shape
  as a bare tuple.
"""

import importlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch

import kronopt
from kronopt.types import StageOutputError
from kronopt.registry import StageContractError

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64
MODULE = "kronopt_h4_user_stages"
DIST = "kronopt-h4-user-stages"

_SOURCE = '''
"""A researcher's stages, one per slot (tests/composition/test_user_stages_differential.py)."""

from collections.abc import Callable
from typing import ClassVar

import attrs
import torch
from torch import Tensor

from kronopt import linalg
from kronopt.types import (
    BasisCapabilities, BasisChange, BasisState, FactorCapabilities, InnerCapabilities, Layout, SideKind,
    SplitCapabilities, StepContext,
)
from kronopt.validators import ge, gt, lt, to_bool, to_float, to_int


@attrs.frozen(eq=False)
class AdagradState:
    L: Tensor | None
    R: Tensor | None


@attrs.frozen(kw_only=True)
class AdagradKronFactors:
    """Sum of scaled G Gᵀ and Gᵀ G (AdaGrad-style Shampoo factors): L ← L + s·G Gᵀ, R ← R + s·Gᵀ G."""

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities(provides_factors=True)
    scale: float = attrs.field(default=1.0, converter=to_float, validator=gt(0.0))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> AdagradState:
        b = layout.batch
        L = torch.zeros(b, layout.m, layout.m, dtype=dtype, device=device) if layout.left == "full" else None
        R = torch.zeros(b, layout.n, layout.n, dtype=dtype, device=device) if layout.right == "full" else None
        return AdagradState(L, R)

    def update(self, state: AdagradState, G: Tensor, ctx: StepContext) -> AdagradState:
        L = None if state.L is None else state.L + self.scale * (G @ G.mT)
        R = None if state.R is None else state.R + self.scale * (G.mT @ G)
        return AdagradState(L, R)

    def factors(self, state: AdagradState) -> tuple[Tensor | None, Tensor | None]:
        return state.L, state.R


def _eigh_descending(X: Tensor) -> tuple[Tensor, Tensor]:
    lam, Q = torch.linalg.eigh(X.double())
    return Q.flip(-1).to(X.dtype), lam.flip(-1).to(X.dtype)


@attrs.frozen(kw_only=True)
class Eigh64Basis:
    """Eigenbasis of each factor computed in float64, eigenvalues descending."""

    capabilities: ClassVar[BasisCapabilities] = BasisCapabilities(needs_factors=True, provides_eigvals=True)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BasisState:
        b = layout.batch

        def side(kind: str, d: int):
            if kind == "none":
                return None, None
            eye = torch.eye(d, dtype=dtype, device=device).expand(b, d, d).clone()
            return eye, torch.ones(b, d, dtype=dtype, device=device)

        Q_L, lam_L = side(layout.left, layout.m)
        Q_R, lam_R = side(layout.right, layout.n)
        return BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=lam_L, lam_R=lam_R,
                          failures=torch.zeros(b, dtype=torch.int64, device=device), ready=False)

    def refresh(self, state: BasisState, factors, ctx: StepContext) -> tuple[BasisState, BasisChange]:
        Q_L, lam_L, Q_R, lam_R = state.Q_L, state.lam_L, state.Q_R, state.lam_R
        if Q_L is not None:
            Q_L, lam_L = _eigh_descending(factors[0])
        if Q_R is not None:
            Q_R, lam_R = _eigh_descending(factors[1])
        new = BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=lam_L, lam_R=lam_R, failures=state.failures,
                         refreshes=state.refreshes + 1, ready=True)
        return new, BasisChange(old=state, new=new)


@attrs.frozen(eq=False)
class RmsMomentumState:
    buf: Tensor


@attrs.frozen(kw_only=True)
class RmsMomentumInner:
    """Momentum whitened by the eigenvalues and normalised to unit RMS per block.

    B ← μB + G (original coordinates); H = Q_Lᵀ B Q_R / (λ_L λ_Rᵀ + eps)^(1/4); D = Q_L (H / RMS(H)) Q_Rᵀ.
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(needs_eigvals=True)
    momentum: float = attrs.field(default=0.9, converter=to_float, validator=[ge(0.0), lt(1.0)])
    eps: float = attrs.field(default=1e-12, converter=to_float, validator=gt(0.0))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> RmsMomentumState:
        return RmsMomentumState(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

    def direction(self, state: RmsMomentumState, G: Tensor, ctx: StepContext):
        B = state.buf * self.momentum + G
        H = linalg.rotate(B, ctx.basis.Q_L, ctx.basis.Q_R)
        lam_L, lam_R = ctx.eigvals
        scale = torch.ones_like(H)
        if lam_L is not None:
            scale = scale * lam_L.clamp_min(0)[..., :, None]
        if lam_R is not None:
            scale = scale * lam_R.clamp_min(0)[..., None, :]
        H = H / (scale + self.eps) ** 0.25
        H = H / (H.square().mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-30)
        return linalg.unrotate(H, ctx.basis.Q_L, ctx.basis.Q_R), RmsMomentumState(B)

    def on_basis_change(self, state: RmsMomentumState, change: BasisChange) -> RmsMomentumState:
        return state


@attrs.frozen(eq=False)
class CountState:
    count: Tensor


@attrs.frozen(kw_only=True)
class FullPlusGradSplit:
    """Full sides; adds alpha·G to the direction and counts its calls per block."""

    capabilities: ClassVar[SplitCapabilities] = SplitCapabilities()
    alpha: float = attrs.field(default=0.1, converter=to_float, validator=ge(0.0))

    def sides(self, m: int, n: int, rotated: tuple[bool, bool]) -> tuple[tuple[SideKind, int], tuple[SideKind, int]]:
        return (("full" if rotated[0] else "none", 0), ("full" if rotated[1] else "none", 0))

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> CountState:
        return CountState(torch.zeros(layout.batch, dtype=dtype, device=device))

    def complement(self, state: CountState, G: Tensor, D: Tensor, ctx: StepContext, moment: Callable[[], Tensor]):
        return D + self.alpha * G, CountState(state.count + 1)


@attrs.frozen(kw_only=True)
class DoublingRefresh:
    """Refresh at updates 1, 2, 4, 8, … from ``start`` on (and on the first call with ``at_first_call``)."""

    at_first_call: bool = attrs.field(default=True, converter=to_bool)
    start: int = attrs.field(default=1, converter=to_int, validator=ge(1))

    def due(self, step: int, *, first_call: bool) -> bool:
        if first_call and self.at_first_call:
            return True
        return step >= self.start and (step & (step - 1)) == 0
'''

#: (slot, registry key, class name in ``_SOURCE``, entry-point group)
STAGES = [
    ("factors", "adagrad_kron", "AdagradKronFactors", "kronopt.factors"),
    ("basis", "eigh64", "Eigh64Basis", "kronopt.bases"),
    ("inner", "rms_momentum", "RmsMomentumInner", "kronopt.inner_rules"),
    ("split", "full_plus_grad", "FullPlusGradSplit", "kronopt.splits"),
    ("refresh", "doubling", "DoublingRefresh", "kronopt.refresh"),
]

CONFIG = textwrap.dedent(
    """
    lr = 0.05

    [factors]
    type = "adagrad_kron"
    scale = 0.5

    [basis]
    type = "eigh64"

    [inner]
    type = "rms_momentum"
    momentum = 0.8
    eps = 0.01

    [split]
    type = "full_plus_grad"
    alpha = 0.2

    [refresh]
    type = "doubling"

    [route]
    fallback_names = ["head"]

    [fallback]
    lr = 0.02

    [fallback.factors]
    type = "adagrad_kron"
    scale = 2.0

    [fallback.basis]
    type = "eigh64"

    [fallback.inner]
    type = "rms_momentum"
    momentum = 0.5
    eps = 0.05

    [fallback.split]
    type = "full_plus_grad"
    alpha = 0.0

    [fallback.refresh]
    type = "doubling"
    at_first_call = false
    start = 2
    """
)

#: the options of each pipeline of CONFIG, as the reference reads them
MAIN = {"lr": 0.05, "scale": 0.5, "momentum": 0.8, "eps": 0.01, "alpha": 0.2, "at_first_call": True, "start": 1}
FALLBACK = {"lr": 0.02, "scale": 2.0, "momentum": 0.5, "eps": 0.05, "alpha": 0.0, "at_first_call": False, "start": 2}

#: name → shape: three same-shape blocks (one bucket), a transposed one, a vector (no rotated side) and a
#: "head" that the route sends to the fallback
SHAPES = {"a": (5, 4), "b": (5, 4), "c": (5, 4), "d": (4, 5), "v": (3,), "head": (5, 4)}


def _write_module(where: Path) -> None:
    (where / f"{MODULE}.py").write_text(_SOURCE, encoding="utf-8")


def _write_dist_info(where: Path, entry_points: list[tuple[str, str, str]]) -> None:
    """What ``pip install`` leaves for importlib.metadata: ``<dist>-<version>.dist-info`` with the entry points."""
    info = where / f"{DIST.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n", encoding="utf-8")
    groups: dict[str, list[str]] = {}
    for group, key, value in entry_points:
        groups.setdefault(group, []).append(f"{key} = {value}")
    text = "".join(f"[{g}]\n" + "\n".join(lines) + "\n\n" for g, lines in groups.items())
    (info / "entry_points.txt").write_text(text, encoding="utf-8")


def _run_python(code: str, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KRONOPT_NO_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def user_stages(tmp_path_factory):
    """The stages of ``_SOURCE`` imported from a plain module (no metadata) and registered in process."""
    where = tmp_path_factory.mktemp("user_stages_module")
    _write_module(where)
    sys.path.insert(0, str(where))
    try:
        module = importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(where))
    restores = [kronopt.SLOTS[slot].override(key, getattr(module, name), description=f"test {key}") for slot, key, name, _ in STAGES]
    try:
        yield module
    finally:
        for restore in reversed(restores):
            restore()
        sys.modules.pop(MODULE, None)


# -- the float64 reference, written from the stages' docstrings ----------------------------------------------


def _eigh_desc(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, Q = torch.linalg.eigh(X)
    return Q.flip(-1), lam.flip(-1)


def _reference(w0: torch.Tensor, grads: list[torch.Tensor], o: dict) -> list[torch.Tensor]:
    """One parameter through the five stages, factor update after the direction (the default), no decay."""
    W = w0.clone()
    G0 = grads[0] if w0.ndim == 2 else grads[0].reshape(-1, 1)
    m, n = G0.shape
    rotated = w0.ndim == 2  # a vector is an (n, 1) block with no rotated side
    L, R = torch.zeros(m, m, dtype=F64), torch.zeros(n, n, dtype=F64)
    Q_L, Q_R = torch.eye(m, dtype=F64), torch.eye(n, dtype=F64)
    lam_L, lam_R = torch.ones(m, dtype=F64), torch.ones(n, dtype=F64)
    B = torch.zeros(m, n, dtype=F64)
    out = []
    for t, g in enumerate(grads, start=1):
        G = g.reshape(m, n)
        B = o["momentum"] * B + G
        if rotated:
            H = Q_L.T @ B @ Q_R / (lam_L.clamp_min(0)[:, None] * lam_R.clamp_min(0)[None, :] + o["eps"]) ** 0.25
        else:
            H = B / (1.0 + o["eps"]) ** 0.25
        H = H / (H.square().mean().sqrt() + 1e-30)
        D = (Q_L @ H @ Q_R.T if rotated else H) + o["alpha"] * G
        W = W - o["lr"] * D.reshape(W.shape)
        out.append(W.clone())
        if rotated:
            L = L + o["scale"] * G @ G.T
            R = R + o["scale"] * G.T @ G
            if (t == 1 and o["at_first_call"]) or (t >= o["start"] and t & (t - 1) == 0):
                (Q_L, lam_L), (Q_R, lam_R) = _eigh_desc(L), _eigh_desc(R)
    return out


def _params(seed: int) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for k, s in SHAPES.items()}


def _grads(seed: int, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen, dtype=F64) for k, s in SHAPES.items()} for _ in range(steps)]


def test_user_stages_of_every_slot_match_the_reference_batched_routed_and_resumed(user_stages, tmp_path):
    """A TOML config naming a user stage in every slot, main pipeline and ``[fallback]`` with other options,
    steps each parameter as the float64 reference of the stages' docstrings over 9 updates (refreshes at 1, 2,
    4, 8 in the main pipeline, at 2, 4, 8 in the fallback); the three same-shape blocks share one bucket; the
    split's per-block counter reaches ``opt.state``; ``state_dict`` → ``torch.load(weights_only=True)`` →
    ``from_state_dict`` after 5 updates continues bit for bit.

    Fails on: a user stage of some slot not called, called out of the documented order (factors after the
    direction, refresh when due, split after the inner rule), the fallback stepping with the main pipeline's
    options, a user stage's state not saved or not restored, blocks of a bucket mixed."""
    path = tmp_path / "mine.toml"
    path.write_text(CONFIG, encoding="utf-8")
    cfg = kronopt.load(path)
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg
    assert type(cfg.fallback.refresh).__name__ == "DoublingRefresh" and cfg.fallback.refresh.start == 2

    P, grads = _params(1), _grads(2, 9)
    w0 = {k: p.detach().clone() for k, p in P.items()}
    opt = kronopt.build(list(P.items()), path)
    for g in grads[:5]:
        for k, p in P.items():
            p.grad = g[k].clone()
        opt.step()
    rows = {(r["pipeline"], r["m"], r["n"]): r["blocks"] for r in opt.bucket_summary()}
    assert rows[("main", 5, 4)] == 3 and rows[("fallback", 5, 4)] == 1, rows
    assert float(opt.state[P["a"]]["split.count"]) == 5.0 and opt.state[P["a"]]["basis.refreshes"] == 3

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    Q = {k: torch.nn.Parameter(p.detach().clone()) for k, p in P.items()}
    twin = kronopt.from_state_dict(list(Q.items()), torch.load(buf, weights_only=True))
    got: dict[str, list[torch.Tensor]] = {k: [] for k in P}
    for g in grads[5:]:
        for k in P:
            P[k].grad, Q[k].grad = g[k].clone(), g[k].clone()
        opt.step()
        twin.step()
        for k in P:
            assert torch.equal(P[k], Q[k]), f"{k}: the resumed optimizer steps differently"
            got[k].append(P[k].detach().clone())
    for k in P:
        want = _reference(w0[k], [g[k] for g in grads], FALLBACK if k == "head" else MAIN)
        for i, (a, b) in enumerate(zip(got[k], want[5:])):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, k=k, i=i: f"{k}, update {i + 6}: {m}")


def test_a_package_with_a_stage_in_every_slot_is_found_through_entry_points_and_resumed(tmp_path):
    """The installed-package path (docs/extending.md §5), in fresh interpreters: every slot's entry point is
    discovered without importing the module and credited to its distribution; a TOML config naming the five
    keys builds and trains (loss down); a second interpreter rebuilds the optimizer from the saved state dict
    alone (the config in it names the plugin keys: nothing imports the module) and continues bit for bit.

    Fails on: a slot's entry-point group not read, discovery importing the plugin, ``from_state_dict`` unable
    to find a plugin stage of a non-inner slot, a plugin stage's state not restored."""
    site = tmp_path / "site"
    site.mkdir()
    _write_module(site)
    _write_dist_info(site, [(group, key, f"{MODULE}:{name}") for _, key, name, group in STAGES])
    (tmp_path / "mine.toml").write_text(CONFIG.split("[route]")[0], encoding="utf-8")
    common = f"""
        import sys, torch, kronopt
        MODULE, DIST = {MODULE!r}, {DIST!r}
        KEYS = {[(slot, key) for slot, key, _, _ in STAGES]!r}
        def model():
            gen = torch.Generator().manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64), torch.nn.Tanh(),
                                       torch.nn.Linear(5, 2, dtype=torch.float64))
        gen = torch.Generator().manual_seed(1)
        X = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        Y = X @ torch.randn(6, 2, generator=gen, dtype=torch.float64)  # learnable
        def train(net, opt, steps):
            losses = []
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(X), Y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses
    """
    first = _run_python(
        common
        + """
        for slot, key in KEYS:
            assert key in kronopt.SLOTS[slot].keys(), (slot, kronopt.SLOTS[slot].keys())
        assert MODULE not in sys.modules, "discovery imported the plugin"
        torch.manual_seed(0)
        net = model()
        opt = kronopt.build(net.parameters(), "mine.toml")
        assert MODULE in sys.modules
        for slot, key in KEYS:
            entry = kronopt.SLOTS[slot].entry(key)
            assert entry.source == DIST and entry.cls.__module__ == MODULE, (slot, entry)
        losses = train(net, opt, 12)
        assert losses[-1] < 0.5 * losses[0], losses
        torch.save({"opt": opt.state_dict(), "net": net.state_dict()}, "saved.pt")
        train(net, opt, 4)
        torch.save(net.state_dict(), "after.pt")
        print("OK")
        """,
        site,
        tmp_path,
    )
    assert first.returncode == 0 and first.stdout.strip() == "OK", first.stderr[-3000:]
    second = _run_python(
        common
        + """
        saved = torch.load("saved.pt", weights_only=True)
        torch.manual_seed(0)
        net = model()
        net.load_state_dict(saved["net"])
        opt = kronopt.from_state_dict(net.parameters(), saved["opt"])
        assert type(opt.config.factors).__module__ == MODULE
        train(net, opt, 4)
        after = torch.load("after.pt", weights_only=True)
        assert all(torch.equal(after[k], v) for k, v in net.state_dict().items()), "resume is not bit for bit"
        print("OK")
        """,
        site,
        tmp_path,
    )
    assert second.returncode == 0 and second.stdout.strip() == "OK", second.stderr[-3000:]


# -- bugs ----------------------------------------------------------------------------------------------------------


def test_registering_a_key_an_installed_plugin_declares_is_refused_at_once(tmp_path):
    """docs/extending.md §4: "Registering a key that is already taken raises a ValueError naming both classes and
    where each came from". A script that imports kronopt and registers its own stage under a key an installed
    plugin declares (the §4 example's own key, ``sign_momentum``, is the example plugin's, which the README's
    quickstart installs) is accepted: discovery has not run yet. The next lookup in the slot then raises, for
    every key: ``from_dict`` of the plain ``soap`` preset dict fails at ``inner.type`` with "plugin inner stage
    … collides with the built-in stage of that name (__main__.Mine)", naming the user's class a built-in.
    Right: the registration raises (a ``ValueError`` naming the distribution), and the slot keeps working."""
    site = tmp_path / "site"
    site.mkdir()
    _write_module(site)
    _write_dist_info(site, [("kronopt.inner_rules", "taken_by_plugin", f"{MODULE}:RmsMomentumInner")])
    result = _run_python(
        """
        from typing import ClassVar
        import attrs, kronopt
        from kronopt.types import InnerCapabilities

        @attrs.frozen(kw_only=True)
        class Mine:
            capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
            def init(self, layout, *, dtype, device): return None
            def direction(self, state, G, ctx): return G, state
            def on_basis_change(self, state, change): return state

        try:
            kronopt.INNER_RULES.register("taken_by_plugin", description="mine")(Mine)
            print("registered")
        except ValueError as exc:
            print("refused:", exc)
        try:
            kronopt.from_dict(kronopt.to_dict(kronopt.PRESETS["soap"]))
            print("soap builds")
        except Exception as exc:
            print("soap fails:", str(exc).replace("\\n", " "))
        """,
        site,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("refused:") and DIST in lines[0], lines
    assert lines[1] == "soap builds", lines


def _soap(**over):
    return kronopt.apply_overrides(kronopt.to_dict(kronopt.PRESETS["soap"]), over)


HIDDEN = {
    # factors "none" with the eigh basis is refused at basis.type on its own; inner's bad β₁ is not involved
    "built_in_inner_value": (
        lambda: _soap(**{"factors.type": "none", "basis.type": "eigh", "inner.betas": [2.0, 0.9]}),
        {"inner.betas", "basis.type"},
    ),
    # the user's inner rule needs eigenvalues, which factors none + identity do not give; the split's bad
    # alpha is not involved
    "user_split_value": (
        lambda: _soap(**{"factors.type": "none", "basis.type": "identity", "inner.type": "rms_momentum",
                         "split.type": "full_plus_grad", "split.alpha": -1.0}),
        {"split.alpha", "inner.type"},
    ),
    # pro_kl_shampoo sets refresh.at_first_call = true; only its period is wrong
    "built_in_refresh_value": (
        lambda: kronopt.apply_overrides(kronopt.to_dict(kronopt.PRESETS["pro_kl_shampoo"]), {"refresh.every": 0}),
        {"refresh.every"},
    ),
    # the user's schedule refreshes on the first call; only its start is wrong
    "user_refresh_value": (
        lambda: kronopt.apply_overrides(
            kronopt.to_dict(kronopt.PRESETS["pro_kl_shampoo"]), {"refresh.type": "doubling", "refresh.start": 0}
        ),
        {"refresh.start"},
    ),
}


@pytest.mark.parametrize("case", list(HIDDEN))
def test_a_bad_option_of_one_stage_neither_hides_nor_fakes_the_combination_checks(user_stages, case):
    """docs/configs.md, "Overrides": "Every problem is listed at once: a bad value in one table does not hide an
    incompatible combination of stages … (the checks run on the config with the bad values left at their
    defaults, except where a stage they judge is itself in error)".

    Wrong: ``config._check_compatible_anyway`` returns as soon as any stage other than the refresh failed, so
    a bad ``inner.betas`` hides "basis 'eigh' needs Kronecker factors" and a bad ``split.alpha`` hides "inner
    'rms_momentum' needs eigenvalue estimates", checks that do not judge the stage in error; and a failed
    ``[refresh]`` is replaced by a default ``every`` schedule (``at_first_call = false``), so a low-rank
    config whose schedule does refresh on the first call gets a second, false error telling the user to set
    ``refresh.at_first_call = true``. Right: exactly the bad value and the incompatibility that does not
    involve it (no false one)."""
    make, want = HIDDEN[case]
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_dict(make())
    assert {p for p, _ in info.value.errors} == want, info.value.errors


@attrs.frozen(eq=False)
class _Buf:
    buf: torch.Tensor


class _PlainInner:
    """An inner rule written as a plain class (no attrs), otherwise complete."""

    capabilities = kronopt.types.InnerCapabilities()

    def init(self, layout, *, dtype, device):
        return _Buf(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

    def direction(self, state, G, ctx):
        return G, state

    def on_basis_change(self, state, change):
        return state


def test_a_stage_that_is_not_an_attrs_class_is_refused_at_registration():
    """docs/extending.md §1 and §3: a stage is a frozen attrs record of its options and "the contract is checked
    when the stage is registered (register, override, or the first load of a plugin)"; a plugin that is not an
    attrs class fails to load (``PluginLoadError``: "is not an attrs class"). The same class registered in
    process is accepted, and the first config naming it raises ``attr.exceptions.NotAnAttrsClassError`` out of
    ``from_dict`` (``config._build_record`` calls ``attrs.fields``), a traceback where a ``ConfigError`` or a
    refusal was due. Right: ``StageContractError`` at registration (or, at the least, a ``ConfigError``)."""
    try:
        restore = kronopt.INNER_RULES.override("plain_inner_test", _PlainInner)
    except StageContractError as exc:
        assert "attrs" in str(exc)
        return
    try:
        with pytest.raises(kronopt.ConfigError):
            kronopt.resolve("adamw", **{"inner.type": "plain_inner_test"})
    finally:
        restore()


# -- the stage contract suite against stages that break the contract -----------------------------------------------


def _inner_rule(direction):
    @attrs.frozen(kw_only=True)
    class Broken:
        """An inner rule that breaks the contract (test stage)."""

        capabilities = kronopt.types.InnerCapabilities()

        def init(self, layout, *, dtype, device):
            return _Buf(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

        def on_basis_change(self, state, change):
            return state

    Broken.direction = direction
    return Broken


@attrs.frozen(eq=False)
class _Factors:
    L: torch.Tensor | None
    R: torch.Tensor | None


@attrs.frozen(kw_only=True)
class _SkewFactors:
    """L ← L + G Gᵀ + (strictly upper ones): not symmetric (test stage)."""

    capabilities = kronopt.types.FactorCapabilities(provides_factors=True)

    def init(self, layout, *, dtype, device):
        b, kw = layout.batch, {"dtype": dtype, "device": device}
        return _Factors(
            torch.zeros(b, layout.m, layout.m, **kw) if layout.left == "full" else None,
            torch.zeros(b, layout.n, layout.n, **kw) if layout.right == "full" else None,
        )

    def update(self, state, G, ctx):
        L = None if state.L is None else state.L + G @ G.mT + torch.ones_like(state.L).triu(1)
        R = None if state.R is None else state.R + G.mT @ G
        return _Factors(L, R)

    def factors(self, state):
        return state.L, state.R


def _shape_check(slot, key):
    from tests.contract import test_stage_contract as contract

    contract.test_init_and_update_keep_shape_dtype_device(slot, key, "full", "full", torch.float32, "cpu")


def _batching_check(slot, key):
    from tests.contract import test_stage_contract as contract

    contract.test_a_bucket_equals_its_blocks_run_alone(slot, key, "full", "full")


BROKEN = [
    pytest.param("inner", _inner_rule(lambda self, s, G, ctx: (G, _Buf(s.buf[..., :1] + 0))), _shape_check,
                 r"inner\.buf shape|state field 'buf' with shape \(2, 5, 1\)", id="state_changes_shape"),
    pytest.param("inner", _inner_rule(lambda self, s, G, ctx: (G.mean(-1, keepdim=True), s)), _shape_check,
                 r"direction", id="direction_of_the_wrong_shape"),
    pytest.param("inner", _inner_rule(lambda self, s, G, ctx: (s.buf.mul_(0.5).add_(G).clone(), s)), _shape_check,
                 r"in place", id="old_state_changed_in_place"),
    pytest.param("inner", _inner_rule(lambda self, s, G, ctx: (G.mul_(2), s)), _shape_check,
                 r"gradient", id="gradient_changed_in_place"),
    pytest.param("inner", _inner_rule(lambda self, s, G, ctx: (G * (2.0 if G.abs().max().item() > 0 else 1.0), s)),
                 _shape_check, r"host", id="host_read"),
    pytest.param("factors", _SkewFactors, _shape_check, r"symmetric", id="non_symmetric_factor"),
    pytest.param("inner", _inner_rule(lambda self, s, G, ctx: (G / G.norm(), s)), _batching_check,
                 r"block", id="blocks_of_a_bucket_mixed"),
]


@pytest.mark.parametrize("slot,cls,check,message", BROKEN)
def test_the_contract_suite_rejects_a_stage_that_breaks_the_contract(slot, cls, check, message):
    """docs/extending.md §3 (``direction`` is pure: "returns a new state and never modifies the old one"; "a bucket
    of b blocks gives the same result as b separate runs"), DESIGN.md invariants 4 and 5 (batching changes
    nothing; factors stay symmetric PSD) and "nothing in the hot path synchronises with the host"; STYLE.md §2.7:
    "A plugin is supported only if it passes" the contract suite. The suite's dynamic check catches a state
    tensor that changes shape ("inner.buf shape (2, 5, 3) -> (2, 5, 1)"), but a wrong direction shape only as a
    bare tuple, and it passes stages that change the old state or ``G`` in place (a skipped step then keeps the
    change; the factor update after the direction reads the changed ``G``), call ``.item()`` in the step, keep
    a non-symmetric factor (``eigh`` reads one triangle), or normalise over the whole bucket. Right: each is an
    ``AssertionError`` whose message says what is wrong, or, for the first four, the step's own run-time check of
    a stage from outside kronopt (``StageOutputError``, raised before anything is written), which now comes first."""
    key = f"broken_{slot}_test"
    restore = kronopt.SLOTS[slot].override(key, cls)
    try:
        with pytest.raises((AssertionError, StageOutputError), match=message):
            check(slot, key)
    finally:
        restore()
