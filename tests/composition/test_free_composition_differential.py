"""Free composition, differentially: stage combinations no preset uses, against float64 references.

Each reference below is written from the formulas of docs/architecture.md ("One step"),
docs/stages.md and the stages' docstrings, in plain torch float64, without calling the code
under test (no ``kronopt.linalg``, no stage method). The optimizer runs one ``6 × 5`` float64
parameter, so every side is rotated and full (``shapes.max_dim`` is the default).

The rest of the file checks the registry and plugin mechanism end to end with a stage
registered in this module (``Registry.override``, restored after each test) and with the
installed example plugin, the ``kronopt ablate`` variant resolution, and the config files.
"""

import io
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import torch

import kronopt
from kronopt.config import ConfigError, dumps, load, loads, to_dict
from kronopt.registry import StageContractError
from kronopt.types import BasisChange, InnerCapabilities, Layout, StepContext
from tests.composition._support import leaves as _leaves

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64
M, N = 6, 5


# -- the harness ---------------------------------------------------------------------------------------------


def _grads(seed: int, steps: int, shape: tuple[int, int] = (M, N)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


def _w0(seed: int, shape: tuple[int, int] = (M, N)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(shape, generator=gen, dtype=F64)


def _run(spec: Any, grads: list[torch.Tensor], w0: torch.Tensor, **overrides: Any) -> list[torch.Tensor]:
    """The parameter after each step of a one-parameter optimizer built from ``spec`` and ``overrides``."""
    p = torch.nn.Parameter(w0.clone())
    opt = kronopt.build([p], spec, **overrides)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def _assert_trajectory(got: list[torch.Tensor], want: list[torch.Tensor], *, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, i=i: f"step {i + 1}: {m}")


def _due(t: int, first: bool, every: int, at_first_call: bool, offset: int = 0) -> bool:
    """docs/stages.md, refresh ``every``: first call ∧ at_first_call, or t ≥ 1 ∧ t ≡ offset (mod k)."""
    return (first and at_first_call) or (t >= 1 and t % every == offset)


def _eigh_desc(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, Q = torch.linalg.eigh(X)
    return lam.flip(-1), Q.flip(-1)


class RefBasis:
    """A float64 reference of the ``eigh`` and ``qr`` bases on both sides of one block.

    ``eigh``: a fresh descending eigendecomposition, no permutation. ``qr``: the first refresh as
    ``eigh``; each later one per side ``e = diag(Qᵀ X Q)``, ``π = argsort(e)↓``, ``Q ← qr(X Q[:, π])``,
    eigenvalue estimates ``e[π]``, and ``π`` reported (docs/stages.md, ``qr``).
    """

    def __init__(self, kind: str, *, power_steps: int = 1, sort: bool = True):
        self.kind, self.power_steps, self.sort = kind, power_steps, sort
        self.Q = [torch.eye(M, dtype=F64), torch.eye(N, dtype=F64)]
        self.lam = [torch.ones(M, dtype=F64), torch.ones(N, dtype=F64)]
        self.ready = False

    def refresh(self, factors: tuple[torch.Tensor, torch.Tensor]) -> tuple[list, list, list]:
        old = list(self.Q)
        perms: list = [None, None]
        for i, X in enumerate(factors):
            if self.kind == "eigh" or not self.ready:
                self.lam[i], self.Q[i] = _eigh_desc(X)
            else:
                Q = self.Q[i]
                e = torch.diagonal(Q.T @ X @ Q)
                pi = torch.argsort(e, descending=True) if self.sort else torch.arange(len(e))
                Q = Q[:, pi]
                for _ in range(self.power_steps):
                    Q = torch.linalg.qr(X @ Q).Q
                self.Q[i] = Q
                self.lam[i] = e[pi]
                perms[i] = pi if self.sort else None
        self.ready = True
        return old, list(self.Q), perms


def _ema_factors(L: torch.Tensor, R: torch.Tensor, G: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * L + (1 - beta) * G @ G.T, beta * R + (1 - beta) * G.T @ G


def reference_pipeline(
    grads: list[torch.Tensor],
    w0: torch.Tensor,
    *,
    basis: str,
    inner: str,
    lr: float,
    beta_f: float,
    every: int,
    at_first_call: bool,
    skip_first_call: bool,
    factor_update: str,
    inner_opts: dict[str, Any],
    grafting: tuple[float, float, float] | None = None,
    normalize: bool = False,
    weight_decay: float = 0.0,
    wd_order: str = "before",
    basis_opts: dict[str, Any] | None = None,
    offset: int = 0,
) -> list[torch.Tensor]:
    """The pipeline of docs/architecture.md "One step" with ``ema`` factors on a full ``6 × 5`` block.

    inner ``adam`` (moments in the basis; on a refresh ``m ← Q_newᵀ Q_old m Q_oldᵀ Q_new`` and ``v``
    permuted with the columns), ``eigenvalue`` (momentum in the original coordinates, ``s = (λ₊ + ε)^p``,
    scaling 1 before the first refresh), ``sgd`` (``B ← μB + G``, ``D = G + μB`` or ``B``).
    ``grafting = (β₁, β₂, ε)``: ``D ← D ‖A‖/‖D‖`` with ``A`` Adam on the raw gradient, ``A`` itself until
    the basis is ready. ``normalize``: ``D / (1e-30 + RMS(D))`` before grafting.
    """
    W = w0.clone()
    L, R = torch.zeros(M, M, dtype=F64), torch.zeros(N, N, dtype=F64)
    B = RefBasis(basis, **(basis_opts or {}))
    m = torch.zeros(M, N, dtype=F64)
    v = torch.zeros(M, N, dtype=F64)
    gm, gv = torch.zeros(M, N, dtype=F64), torch.zeros(M, N, dtype=F64)
    calls, t = 0, 0
    out = []

    def observe(G: torch.Tensor, t: int, first: bool) -> None:
        nonlocal L, R, m, v
        L, R = _ema_factors(L, R, G, beta_f)
        if _due(t, first, every, at_first_call, offset):
            old, new, perms = B.refresh((L, R))
            if inner == "adam":
                m = new[0].T @ old[0] @ m @ old[1].T @ new[1]
                if perms[0] is not None:
                    v = v[perms[0], :]
                if perms[1] is not None:
                    v = v[:, perms[1]]

    for G in grads:
        first = calls == 0
        calls += 1
        if first and skip_first_call:
            observe(G, t, True)
            out.append(W.clone())
            continue
        t += 1
        if factor_update == "before":
            observe(G, t, first)
        QL, QR = B.Q
        if inner == "adam":
            b1, b2 = inner_opts["betas"]
            eps = inner_opts["eps"]
            H = QL.T @ G @ QR
            m = b1 * m + (1 - b1) * H
            v = b2 * v + (1 - b2) * H * H
            if inner_opts["eps_placement"] == "after_correction":
                N_ = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            else:
                N_ = m / (v.sqrt() + eps) * ((1 - b2**t) ** 0.5 / (1 - b1**t))
            D = QL @ N_ @ QR.T
        elif inner == "eigenvalue":
            beta, p, eps = inner_opts["momentum"], inner_opts["exponent"], inner_opts["eps"]
            m = beta * m + (1 - beta) * G
            m_hat = m / (1 - beta**t)
            if not B.ready:
                D = m_hat
            else:
                lamL, lamR = B.lam[0].clamp(min=0), B.lam[1].clamp(min=0)
                where = inner_opts.get("eps_placement", "inside")
                if where == "inside":
                    scale = ((lamL + eps) ** p)[:, None] * ((lamR + eps) ** p)[None, :]
                elif where == "outside":
                    scale = (1 / (lamL ** (-p) + eps))[:, None] * (1 / (lamR ** (-p) + eps))[None, :]
                else:  # "product": 1 / ((λ_L λ_R)^(-p) + ε)
                    scale = 1 / ((lamL[:, None] * lamR[None, :]) ** (-p) + eps)
                D = QL @ ((QL.T @ m_hat @ QR) * scale) @ QR.T
        elif inner == "sgd":
            mu, nesterov = inner_opts["momentum"], inner_opts["nesterov"]
            m = mu * m + G
            D = G + mu * m if nesterov else m
        else:  # pragma: no cover
            raise AssertionError(inner)
        if normalize:
            D = D / (1e-30 + D.pow(2).mean().sqrt())
        if grafting is not None:
            g1, g2, geps = grafting
            gm = g1 * gm + (1 - g1) * G
            gv = g2 * gv + (1 - g2) * G * G
            A = (gm / (1 - g1**t)) / ((gv / (1 - g2**t)).sqrt() + geps)
            D = A if not B.ready else D * (A.norm() / D.norm())
        if factor_update == "after":
            observe(G, t, first)
        if wd_order == "before":
            W = W * (1 - lr * weight_decay) - lr * D
        else:
            W = W - lr * D
            W = W * (1 - lr * weight_decay)
        out.append(W.clone())
    return out


def _cfg(factors: str, basis: str, inner: str, *, every: int, at_first_call: bool, skip: bool, update: str,
         inner_opts: dict[str, Any], lr: float, beta_f: float = 0.9, post: dict[str, Any] | None = None,
         weight_decay: float = 0.0, basis_opts: dict[str, Any] | None = None, offset: int = 0) -> dict[str, Any]:
    raw = to_dict(kronopt.PRESETS["soap"])
    raw.update(
        lr=lr, weight_decay=weight_decay, skip_first_call=skip, factor_update=update,
        factors={"type": factors} if factors == "none" else {"type": factors, "beta": beta_f},
        basis={"type": basis, **(basis_opts or {})},
        inner={"type": inner, **inner_opts},
        split={"type": "full"},
        refresh={"type": "every", "every": every, "at_first_call": at_first_call, "offset": offset},
    )
    raw["post"] = {**raw["post"], **(post or {})}
    return raw


ADAM = {"betas": [0.8, 0.9], "eps": 1e-3, "eps_placement": "after_correction", "bias_correction": True}
ADAM_SOAP = {"betas": [0.85, 0.95], "eps": 1e-8, "eps_placement": "before_correction", "bias_correction": True}
EIGEN = {"momentum": 0.8, "exponent": -0.25, "eps": 1e-6, "eps_placement": "inside", "bias_correction": True}
SGD = {"momentum": 0.7, "nesterov": True}


@pytest.mark.parametrize(
    "basis,inner,opts,update,skip,at_first",
    [
        pytest.param("eigh", "adam", ADAM, "after", False, True, id="ema-eigh-adam-after"),
        pytest.param("eigh", "adam", ADAM_SOAP, "before", False, False, id="ema-eigh-adam-before"),
        pytest.param("qr", "adam", ADAM, "before", False, True, id="ema-qr-adam-before"),
        pytest.param("qr", "eigenvalue", EIGEN, "after", True, True, id="ema-qr-eigenvalue-skip"),
        pytest.param("qr", "eigenvalue", EIGEN, "before", False, False, id="ema-qr-eigenvalue-before"),
        pytest.param("eigh", "sgd", SGD, "after", False, True, id="ema-eigh-sgd"),
    ],
)
def test_unused_combinations_match_the_float64_reference(basis, inner, opts, update, skip, at_first):
    """Combinations no preset uses, 7 steps with a refresh every 2 updates, against :func:`reference_pipeline`.

    Fails on: a refresh at the wrong update (the schedule read with the wrong ``t`` in a combination the
    presets never run, e.g. ``factor_update = "before"`` with ``qr``), Adam's first moment not rotated or
    its second moment not permuted with the ``qr`` columns, the eigenvalue rule reading the basis's
    estimates stale or unsorted, a refresh's side effects applied to the wrong stage."""
    grads, w0 = _grads(1, 7), _w0(1)
    raw = _cfg("ema", basis, inner, every=2, at_first_call=at_first, skip=skip, update=update, inner_opts=opts, lr=0.05)
    got = _run(raw, grads, w0)
    want = reference_pipeline(
        grads, w0, basis=basis, inner=inner, lr=0.05, beta_f=0.9, every=2, at_first_call=at_first,
        skip_first_call=skip, factor_update=update, inner_opts=opts,
    )
    _assert_trajectory(got, want)


@pytest.mark.parametrize(
    "basis,inner,opts,normalize,wd_order",
    [
        pytest.param("eigh", "sgd", SGD, False, "before", id="eigh-sgd-graft"),
        pytest.param("qr", "sgd", {"momentum": 0.5, "nesterov": False}, True, "after", id="qr-sgd-normalize-graft"),
        pytest.param("eigh", "adam", ADAM, True, "before", id="eigh-adam-normalize-graft"),
        pytest.param("qr", "eigenvalue", EIGEN, False, "after", id="qr-eigenvalue-graft"),
    ],
)
def test_post_grafting_and_normalize_with_other_inner_rules(basis, inner, opts, normalize, wd_order):
    """``[post]`` grafting (and ``normalize``) composed with inner rules the presets never graft.

    Step 1 (the basis not ready: the refresh follows the direction) must be the grafting Adam step
    itself, every later one the inner direction rescaled to its norm, with decoupled weight decay in
    the configured order. Fails on: grafting applied before/without the ready flag, the graft moments
    taking the inner rule's betas, ``normalize`` applied after grafting, the decay order swapped."""
    grads, w0 = _grads(2, 6), _w0(2)
    graft = (0.7, 0.9, 1e-6)
    post = {"grafting": "adam", "graft_betas": list(graft[:2]), "graft_eps": graft[2], "normalize": normalize,
            "weight_decay_order": wd_order}
    raw = _cfg("ema", basis, inner, every=2, at_first_call=True, skip=False, update="after", inner_opts=opts,
               lr=0.03, post=post, weight_decay=0.1)
    got = _run(raw, grads, w0)
    want = reference_pipeline(
        grads, w0, basis=basis, inner=inner, lr=0.03, beta_f=0.9, every=2, at_first_call=True, skip_first_call=False,
        factor_update="after", inner_opts=opts, grafting=graft, normalize=normalize, weight_decay=0.1, wd_order=wd_order,
    )
    _assert_trajectory(got, want)


FACTOR_BASES = [("none", "identity"), ("ema", "eigh"), ("ema", "qr"), ("kl", "identity"), ("kl", "eigh"), ("kl", "qr"),
                ("projector_splitting", "eigh"), ("projector_splitting", "qr")]


@pytest.mark.parametrize("factors,basis", FACTOR_BASES, ids=["-".join(fb) for fb in FACTOR_BASES])
def test_sgd_inner_with_any_basis_is_torch_sgd(factors, basis):
    """``sgd`` is basis-free (docs/stages.md: "a rotation and its inverse cancel"): under every factor
    estimator and basis it must step exactly as ``torch.optim.SGD`` (Nesterov momentum), refreshes
    included. Fails on: the rule rotating its buffer without rotating back, a refresh's
    ``on_basis_change`` touching the buffer, a factor estimator's state leaking into the direction."""
    grads, w0 = _grads(3, 6), _w0(3)
    raw = _cfg(factors, basis, "sgd", every=2, at_first_call=True, skip=False, update="after",
               inner_opts={"momentum": 0.6, "nesterov": True}, lr=0.02, beta_f=0.9)
    got = _run(raw, grads, w0)
    ref = torch.nn.Parameter(w0.clone())
    sgd = torch.optim.SGD([ref], lr=0.02, momentum=0.6, nesterov=True)
    want = []
    for g in grads:
        ref.grad = g.clone()
        sgd.step()
        want.append(ref.detach().clone())
    _assert_trajectory(got, want, rtol=1e-12, atol=1e-13)


# -- a stage registered by the user, in this module ------------------------------------------------------------


@attrs.frozen(eq=False)
class _Tally:
    """A nested record: a tensor, a Python int and a field that stays ``None``."""

    sq: torch.Tensor
    hits: int = 0
    spare: torch.Tensor | None = None


@attrs.frozen(eq=False)
class _NestedState:
    buf: torch.Tensor
    tally: _Tally
    count: int = 0
    unused: torch.Tensor | None = None


@attrs.frozen(kw_only=True)
class NestedMomentumInner:
    """Heavy-ball momentum whose state nests a record (test stage).

    ``B ← μB + G``, ``D = B``; ``tally.sq ← tally.sq + G²`` (never read by the direction), ``tally.hits``
    and ``count`` count the calls (Python ints), ``unused`` and ``tally.spare`` stay ``None``.
    """

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()
    momentum: float = attrs.field(default=0.5, converter=float)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> _NestedState:
        z = torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device)
        return _NestedState(buf=z, tally=_Tally(sq=z.clone()))

    def direction(self, state: _NestedState, G: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, _NestedState]:
        B = state.buf * self.momentum + G
        tally = _Tally(sq=state.tally.sq + G * G, hits=state.tally.hits + 1)
        return B.clone(), _NestedState(buf=B, tally=tally, count=state.count + 2)

    def on_basis_change(self, state: _NestedState, change: BasisChange) -> _NestedState:
        return state


@pytest.fixture
def nested_inner():
    restore = kronopt.INNER_RULES.override("nested_momentum_test", NestedMomentumInner, description="nested test rule")
    try:
        yield "nested_momentum_test"
    finally:
        restore()


def _nested_opt(key: str, params: list[torch.nn.Parameter], **over: Any) -> kronopt.KronOptimizer:
    return kronopt.build(params, "adamw", **{"inner.type": key, "inner.momentum": 0.5, "lr": 0.1, "weight_decay": 0.0, **over})


def test_user_stage_with_nested_state_steps_saves_and_resumes_bit_for_bit(nested_inner):
    """A stage registered from a test module (``Registry.override``) with a nested state record, Python ints
    and ``None`` fields: it steps by its formula, its ints and nested tensors reach ``state[p]`` and the
    state dict by dotted path, ``torch.save``/``torch.load(weights_only=True)`` + ``from_state_dict``
    resumes bit for bit (ints included), and ``inspect()`` shows the nested record.

    Fails on: nested records flattened under the wrong path or dropped, ints not saved or not restored
    (``count`` would restart), a ``None`` field saved as something a weights-only load refuses, the
    resumed optimizer stepping differently."""
    grads, w0 = _grads(5, 5), _w0(5)
    p = torch.nn.Parameter(w0.clone())
    opt = _nested_opt(nested_inner, [p])
    B, W = torch.zeros(M, N, dtype=F64), w0.clone()
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
        B = 0.5 * B + g
        W = W - 0.1 * B
    torch.testing.assert_close(p.detach(), W, rtol=0, atol=1e-14)
    entry = opt.state[p]
    assert entry["inner.count"] == 6 and entry["inner.tally.hits"] == 3
    assert "inner.unused" not in entry and "inner.tally.spare" not in entry
    torch.testing.assert_close(entry["inner.tally.sq"], sum(g * g for g in grads[:3]), rtol=0, atol=1e-13)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    q = torch.nn.Parameter(p.detach().clone())
    twin = kronopt.from_state_dict([q], saved)
    assert twin.state[q]["inner.count"] == 6 and twin.state[q]["inner.tally.hits"] == 3
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    assert torch.equal(p.detach(), q.detach())
    for k, v in opt.state[p].items():
        w = twin.state[q][k]
        assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), k
    view = next(iter(twin.inspect().values()))
    record = view.records["inner"]
    assert {"buf", "tally.sq"} <= set(record), record.keys()
    torch.testing.assert_close(record["tally.sq"], twin.state[q]["inner.tally.sq"], rtol=0, atol=0)


def test_user_stage_nested_state_overflow_is_caught_per_block(nested_inner):
    """The non-finite guard must test a state tensor nested two records deep: a finite gradient whose square
    overflows ``tally.sq`` (the direction stays finite) skips that block only (``nonfinite_scope =
    "block"``), its parameter and every state tensor left exactly as they were, the other block of the
    bucket stepped. Fails on: the guard walking only the top level of a stage's record."""
    gen = torch.Generator().manual_seed(6)
    ps = [torch.nn.Parameter(torch.randn(M, N, generator=gen, dtype=F64)) for _ in range(2)]
    opt = _nested_opt(nested_inner, ps, nonfinite="skip", nonfinite_scope="block")
    for p in ps:
        p.grad = torch.randn(M, N, generator=gen, dtype=F64)
    opt.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}) for p in ps]
    ps[0].grad = torch.full((M, N), 1e200, dtype=F64)  # 1e400 overflows tally.sq; B and D stay finite
    ps[1].grad = torch.randn(M, N, generator=gen, dtype=F64)
    opt.step()
    w0, s0 = before[0]
    assert torch.equal(ps[0].detach(), w0), "the overflowing block was written"
    for k, v in s0.items():
        if k != "nonfinite":
            assert torch.equal(opt.state[ps[0]][k], v), f"state {k} of the skipped block changed"
    assert not torch.equal(ps[1].detach(), before[1][0]), "the healthy block was not stepped"
    assert all(torch.isfinite(v).all() for v in opt.state[ps[0]].values() if isinstance(v, torch.Tensor))
    counts = opt.nonfinite_counts()
    assert sorted(counts.values()) == [0, 1], counts


def test_user_stage_is_listed_by_kronopt_stages_and_round_trips_in_show(nested_inner, capsys):
    """``kronopt stages`` (in process, where the override lives) lists the user stage with its description,
    and a config naming it round-trips ``dumps → loads``. Fails on: ``stages`` reading a stale copy of
    the registry, ``to_dict`` failing to find the key of an overridden class."""
    from kronopt.app.cli import main

    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if "nested_momentum_test" in ln), None)
    assert line is not None and "nested test rule" in line, out
    cfg = kronopt.resolve("adamw", **{"inner.type": nested_inner, "inner.momentum": 0.25})
    text = dumps(cfg)
    assert 'type = "nested_momentum_test"' in text and "momentum = 0.25" in text
    assert loads(text) == cfg


# -- contract refusals ----------------------------------------------------------------------------------------------


class _StatelessInner:
    """An inner rule keeping nothing; the test stages below declare capabilities on it, or drop a member."""

    def init(self, layout, *, dtype, device):
        return None

    def on_basis_change(self, state, change):
        return state


class _PassThrough(_StatelessInner):
    def direction(self, state, G, ctx):
        return G, state


@attrs.frozen(kw_only=True)
class _ClaimsSecondMoment(_PassThrough):
    """Declares has_second_moment without second_moment() (test stage)."""

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(has_second_moment=True)


@attrs.frozen(kw_only=True)
class _NoDirection(_StatelessInner):
    """Lacks direction() (test stage)."""

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()


@attrs.frozen(kw_only=True)
class _NeedsEigvals(_PassThrough):
    """Needs eigenvalues (test stage)."""

    capabilities: ClassVar[InnerCapabilities] = InnerCapabilities(needs_eigvals=True)


def test_contract_refusals_and_duplicate_keys_name_what_is_wrong():
    """Registration refuses a declared capability without its member and a missing Protocol member
    (``StageContractError`` naming stage, capability and member), and a duplicate key (``ValueError`` naming
    both classes); nothing is left registered. Fails on: a check that runs only for plugins, or a refused
    stage left half-registered in the global registry."""
    reg = kronopt.INNER_RULES
    with pytest.raises(StageContractError, match=r"'claims_m2'.*has_second_moment.*second_moment\(\)"):
        reg.register("claims_m2", description="x")(_ClaimsSecondMoment)
    assert "claims_m2" not in reg.keys()
    with pytest.raises(StageContractError, match=r"'no_dir'.*lacks direction\(\)"):
        reg.override("no_dir", _NoDirection)
    assert "no_dir" not in reg.keys()
    with pytest.raises(ValueError, match=r"duplicate inner stage 'adam'.*AdamInner.*_NeedsEigvals"):
        reg.register("adam", description="again")(_NeedsEigvals)
    assert reg.get("adam").__name__ == "AdamInner"


def test_user_stage_needing_eigenvalues_is_refused_with_the_identity_basis_listing_alternatives():
    """The config validator applies a user stage's declared capabilities like a built-in's: ``needs_eigvals``
    with ``factors = none`` + ``basis = identity`` is refused at ``inner.type``, naming the stages and listing
    bases that would work (each a registered key that provides eigenvalues); with ``ema`` + ``eigh`` it
    builds. Fails on: the check reading capabilities by class attribute instead of the typed record."""
    restore = kronopt.INNER_RULES.override("needs_eig_test", _NeedsEigvals)
    try:
        with pytest.raises(ConfigError) as err:
            kronopt.resolve("adamw", **{"inner.type": "needs_eig_test"})
        (path, msg), = err.value.errors
        assert path == "inner.type" and "'needs_eig_test'" in msg and "'identity'" in msg, msg
        listed = {k.strip() for k in msg.rsplit(":", 1)[1].split(",")}
        assert listed == {"eigh", "qr"}, msg
        kronopt.resolve("adamw", **{"inner.type": "needs_eig_test", "factors.type": "ema", "basis.type": "eigh"})
    finally:
        restore()


# -- rotation equivariance and the installed plugin in a basis --------------------------------------------------------

ORTHO = {"momentum": 0.8, "nesterov": True, "ns_dtype": "float64", "steps": 5}


@pytest.mark.parametrize(
    "factors,basis,update",
    [("ema", "eigh", "before"), ("ema", "qr", "after"), ("kl", "qr", "before"), ("projector_splitting", "eigh", "after")],
)
def test_orthogonalize_in_any_basis_equals_muon_without_one(factors, basis, update):
    """Newton–Schulz is rotation-equivariant (docs/stages.md, ``orthogonalize``): in float64 arithmetic the
    rule under any factor estimator and basis must give the unrotated rule's trajectory to round-off, refreshes
    included. Fails on: the momentum rotated into the basis and not back, a refresh rotating the
    original-coordinate buffer, the wrong side's basis applied to a tall block."""
    grads, w0 = _grads(7, 6), _w0(7)
    plain = _run(_cfg("none", "identity", "orthogonalize", every=2, at_first_call=True, skip=False, update="after",
                      inner_opts=ORTHO, lr=0.05), grads, w0)
    got = _run(_cfg(factors, basis, "orthogonalize", every=2, at_first_call=True, skip=False, update=update,
                    inner_opts=ORTHO, lr=0.05), grads, w0)
    _assert_trajectory(got, plain, rtol=1e-12, atol=1e-13)


def test_example_plugin_in_an_eigh_basis_matches_its_formula():
    """The installed example plugin (inner ``sign_momentum``, loaded through its entry point) composed with
    ``ema`` factors and the ``eigh`` basis, against its docstring formula ``B ← βB + (1−β)G``,
    ``D = Q_L sign(Q_Lᵀ B Q_R) Q_Rᵀ`` with the reference basis (refresh every 2, after the direction).
    Fails on: the plugin given a stale or the post-refresh basis for the direction, the registry
    loading another class under the key."""
    if "sign_momentum" not in kronopt.INNER_RULES.keys():
        pytest.skip("the example plugin is not installed")
    assert kronopt.INNER_RULES.entry("sign_momentum").source == "kronopt-example-plugin"
    grads, w0 = _grads(8, 6), _w0(8)
    raw = _cfg("ema", "eigh", "sign_momentum", every=2, at_first_call=True, skip=False, update="after",
               inner_opts={"momentum": 0.6}, lr=0.01)
    got = _run(raw, grads, w0)
    W, Bm = w0.clone(), torch.zeros(M, N, dtype=F64)
    L, R = torch.zeros(M, M, dtype=F64), torch.zeros(N, N, dtype=F64)
    basis = RefBasis("eigh")
    want = []
    for t, G in enumerate(grads, start=1):
        Bm = 0.6 * Bm + 0.4 * G
        QL, QR = basis.Q
        D = QL @ torch.sign(QL.T @ Bm @ QR) @ QR.T
        L, R = _ema_factors(L, R, G, 0.9)
        if _due(t, t == 1, 2, True):
            basis.refresh((L, R))
        W = W - 0.01 * D
        want.append(W.clone())
    _assert_trajectory(got, want, rtol=1e-12, atol=1e-13)


def test_example_plugin_state_dict_round_trip_and_show(capsys):
    """The plugin stage saves and loads bit for bit (``from_state_dict`` after a weights-only load) and a
    config naming it round-trips through ``kronopt show`` (in process). Fails on: a plugin stage's key not
    written back by ``to_dict`` (``key_of`` not finding a lazily loaded class)."""
    if "sign_momentum" not in kronopt.INNER_RULES.keys():
        pytest.skip("the example plugin is not installed")
    from kronopt.app.cli import main

    grads, w0 = _grads(9, 4), _w0(9)
    p = torch.nn.Parameter(w0.clone())
    opt = kronopt.build([p], "soap", **{"inner.type": "sign_momentum", "inner.momentum": 0.7, "refresh.every": 2})
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    twin = kronopt.from_state_dict([q], torch.load(buf, weights_only=True))
    for g in grads[2:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    assert torch.equal(p.detach(), q.detach())
    path_cfg = kronopt.resolve("soap", **{"inner.type": "sign_momentum", "inner.momentum": 0.7})
    assert loads(dumps(path_cfg)) == path_cfg
    assert path_cfg.inner == kronopt.INNER_RULES.get("sign_momentum")(momentum=0.7)
    assert main(["show", "soap", "--set", "inner.type=sign_momentum", "--set", "inner.momentum=0.7"]) == 0
    assert loads(capsys.readouterr().out) == path_cfg


# -- config files and `kronopt show` -------------------------------------------------------------------------------------

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_file_loads_and_show_round_trips(path, capsys):
    """Every file in configs/ loads, equals its preset, and ``kronopt show FILE`` prints a config that loads
    back to the same config and shows the same text again (show → load → show is a fixed point).
    Fails on: a writer that drops a table or a nested fallback option, a float written lossily."""
    from kronopt.app.cli import main

    cfg = load(path)
    if path.stem in kronopt.PRESETS:
        assert cfg == kronopt.PRESETS[path.stem]
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert loads(shown) == cfg
    assert main(["show", path.stem if path.stem in kronopt.PRESETS else str(path)]) == 0
    assert capsys.readouterr().out == shown


# -- `kronopt ablate`: a variant differs from its base only where it says --------------------------------------------

ABLATIONS = sorted((ROOT / "configs" / "ablations").glob("*.toml"))




@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_variants_differ_from_their_base_only_where_they_say(path):
    """For every variant of every shipped ablation file, the resolved config of each unit differs from the
    variant's base (its preset or file, no overrides) only at keys its overrides name, inside a stage table
    whose ``type`` it switches (which starts that table afresh, docs/configs.md), or at ``lr`` /
    ``fallback.lr`` (the tuning grid). An override value it names must be in the resolved config as given.
    Fails on: an override leaking into another table (``inner.*`` reaching ``fallback.inner``), the lr grid
    not scaling the fallback, a sweep value landing on the wrong key."""
    from kronopt.app.ablate import load_ablation, plan_units
    from kronopt.app.train import task_from_dict

    ablation = load_ablation(path)
    task = task_from_dict(ablation.task)
    for variant in ablation.variants:
        base = _leaves(to_dict(kronopt.resolve(variant.spec)))
        switched = {k[: -len(".type")] for k, v in variant.overrides.items() if k.endswith(".type")}
        for unit in plan_units(variant, ablation.tune, task)[:2]:
            got = _leaves(to_dict(unit.config))
            for key in sorted(set(base) | set(got)):
                if base.get(key) == got.get(key) or key in ("lr", "fallback.lr") or key in variant.overrides:
                    continue
                assert any(key.startswith(f"{s}.") for s in switched), (
                    f"{path.name}: variant {variant.name!r} changes {key}: {base.get(key)!r} → {got.get(key)!r}"
                )
            for key, value in variant.overrides.items():
                if key in ("lr", "fallback.lr"):  # the grid's point (lr_mult scales a set lr)
                    continue
                want = list(value) if isinstance(value, tuple) else value
                assert got[key] == want, f"{path.name}: variant {variant.name!r}: {key} = {got[key]!r}, set {want!r}"


def _first_moment(inner: dict[str, Any]) -> float:
    """The first moment's retention of an inner rule's table, whatever the rule calls it."""
    return inner["betas"][0] if "betas" in inner else inner["momentum"]


@pytest.mark.parametrize(
    ("name", "shared"),
    [
        # the estimators' retention, and the rules' first moment (adam_rank1's second moment and ε placement
        # too, as SOAP's Adam): each must be the base's, a switched stage's own default being another
        ("factors.toml", lambda c: {"factors.beta": c["factors"]["beta"]}),
        ("inner.toml", lambda c: {"β₁": _first_moment(c["inner"])}),
        ("inner.toml", lambda c: {k: c["inner"][k] for k in ("betas", "eps_placement") if c["inner"]["type"].startswith("adam")}),
    ],
)
def test_shipped_ablations_hold_the_settings_their_stages_share_at_the_base(name, shared):
    """A variant that switches a stage's ``type`` starts it from that stage's defaults, which need not be the
    base's: the shipped stage ablations promise everything else as SOAP, so the settings the swapped stages
    share must be SOAP's in every variant. Fails on: kl's own β = 0.98 against ema's 0.95, adam_rank1's
    (0.9, 0.999) and ε after the correction against SOAP's Adam (0.95, 0.95) and before, SGD's or the
    eigenvalue rule's momentum 0.9 against β₁ = 0.95."""
    from kronopt.app.ablate import load_ablation

    ablation = load_ablation(ROOT / "configs" / "ablations" / name)
    base = shared(to_dict(kronopt.resolve("soap")))
    for variant in ablation.variants:
        got = shared(to_dict(kronopt.resolve(variant.spec, **variant.overrides)))
        assert {k: v for k, v in got.items() if k in base} == {k: base[k] for k in got}, (variant.name, got, base)


@pytest.mark.parametrize(
    "inner,opts,basis_opts,offset,update",
    [
        pytest.param("adam", ADAM, {"power_steps": 3}, 0, "after", id="adam-qr-3-power-steps"),
        pytest.param("adam", ADAM, {"sort": False}, 1, "after", id="adam-qr-unsorted-offset1"),
        pytest.param("eigenvalue", {**EIGEN, "eps_placement": "outside", "eps": 1e-3}, {"sort": False}, 0, "before",
                     id="eigenvalue-outside-qr-unsorted"),
        # the first refresh at update 2: L = Σ G Gᵀ has full rank (a zero eigenvalue makes "product" ill-conditioned)
        pytest.param("eigenvalue", {**EIGEN, "eps_placement": "product", "exponent": -0.5, "eps": 1e-4}, {"power_steps": 2},
                     0, "after", id="eigenvalue-product-qr-2-power-steps"),
    ],
)
def test_qr_basis_options_and_eigenvalue_eps_placements(inner, opts, basis_opts, offset, update):
    """``qr`` with ``power_steps > 1`` / ``sort = false``, a refresh ``offset``, and the eigenvalue rule's
    ``outside`` / ``product`` ε placements under ``ema`` factors (no preset combines these), against the
    reference (docs/stages.md, ``qr``: ``Q ← qr(X^p Q̃)``; unsorted: no permutation, estimates the
    quotients in column order). Fails on: power steps not repeated, an unsorted refresh still reporting a
    permutation (Adam's ``v`` permuted), estimates left stale where the basis's are read, ε in the wrong place."""
    grads, w0 = _grads(11, 8), _w0(11)
    at_first = opts.get("eps_placement") != "product"
    raw = _cfg("ema", "qr", inner, every=2, at_first_call=at_first, skip=False, update=update, inner_opts=opts, lr=0.04,
               basis_opts=basis_opts, offset=offset)
    got = _run(raw, grads, w0)
    want = reference_pipeline(
        grads, w0, basis="qr", inner=inner, lr=0.04, beta_f=0.9, every=2, at_first_call=at_first, skip_first_call=False,
        factor_update=update, inner_opts=opts, basis_opts=basis_opts, offset=offset,
    )
    _assert_trajectory(got, want, rtol=1e-8, atol=1e-10)
