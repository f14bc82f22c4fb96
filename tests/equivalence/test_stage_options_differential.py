"""A differential hunt of the inner rules' and factor estimators' options away from their defaults.

Each option docs/stages.md lists for ``sgd``, ``adam``, ``adam_rank1``, ``orthogonalize``, ``eigenvalue`` and the
``ema`` / ``kl`` / ``projector_splitting`` estimators is run at a non-default value, over several steps with basis
refreshes where a basis is involved, against an independent value:

* ``torch.optim.SGD`` / ``AdamW`` / ``Muon`` where the configuration reduces to them;
* the clean-room float64 references of ``tests/reference`` (``shampoo``, ``soap``, ``dykaf``, ``kl_shampoo``,
  ``newton_schulz``; they never import kronopt);
* :class:`Pipeline64` below, a plain float64 loop over one block written from docs/stages.md and the specs
  (soap.md §5–§9, muon.md §2–§5, dykaf.md §3–§7, kl_shampoo.md §5–§6). It calls no kronopt code: the
  Newton–Schulz iteration, the rank-one second moment and the projector splitting come from ``tests/reference``.

The blocks are small and float64 (so the state is float64 and ``rtol`` can be 1e-9). Where a first basis is built
from a rank-deficient factor its null-space eigenvectors are fixed by round-off, and an eigenvalue power of that
near-zero eigenvalue amplifies it; those cases use a square block or a first refresh after enough gradients.
"""

import math
import warnings
import zlib
from typing import Any

import pytest
import torch

import kronopt
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference import newton_schulz as ns_ref
from tests.reference.dykaf import dykaf_reference, kron_init, ksl_dense, parallel_dense, rank1_update
from tests.reference.kl_shampoo import kl_reference
from tests.reference.shampoo import shampoo_reference
from tests.reference.soap import soap_reference

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed(*key: Any) -> int:
    """A seed that does not change between runs (``hash`` of a string does)."""
    return zlib.crc32(repr(key).encode())


def _eigh_descending(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, Q = torch.linalg.eigh(X)
    return lam.flip(-1), Q.flip(-1)


# -- the float64 reference pipeline ---------------------------------------------------------------------------


class Pipeline64:
    """One ``m × n`` block through docs/architecture.md "One step", in float64, written from docs/stages.md.

    A call: on the first call with ``skip_first_call`` only ``observe``; otherwise ``t ← t + 1``, ``observe``
    (``factor_update = "before"``), the inner direction, ``post`` (normalise, graft), ``observe`` (``"after"``),
    then the decoupled decay before or after ``W ← W − lr·D``. ``observe`` updates the factors and refreshes
    when ``(first call ∧ at_first_call) ∨ (t ≥ 1 ∧ t ≡ offset mod every)``.

    * factors ``ema`` (``L ← βL + (1−β)GGᵀ``), ``kl`` (kl_shampoo.md §5–§6: the other side's tracked inverse
      from the old basis and roots, ``s = min(λ^{-1/2}, c)``, roots permuted with the basis columns),
      ``ps`` (projector splitting, dykaf.md §3–§5, on the dense rearranged matrix of ``tests/reference/dykaf``);
    * basis ``identity``, ``eigh`` (descending, no permutation) or ``qr`` (eigh first; then
      ``e = diag(QᵀXQ)``, ``π = argsort(e)↓`` unless unsorted, ``power_steps`` × ``Q ← qr(X Q)``, estimates ``e_π``);
    * inner ``adam`` / ``adam_rank1`` (moments in the basis, ``m`` rotated and ``v`` (``l``, ``r``) permuted at a
      refresh; ε before or after the bias correction, ``normalize`` before the scale), ``eigenvalue``
      (momentum in the original coordinates, scale 1 before the first refresh), ``sgd``, ``orthogonalize``
      (``tests/reference/newton_schulz`` in float64, shape factor of muon.md §5).
    """

    def __init__(
        self, w0: torch.Tensor, *, factors: str = "none", beta_f: float = 0.9, factor_opts: dict | None = None,
        basis: str = "identity", sort: bool = True, power_steps: int = 1, inner: str = "adam",
        opts: dict | None = None, every: int = 1, at_first_call: bool = False, offset: int = 0,
        skip_first_call: bool = False, factor_update: str = "after", lr: float = 1e-2, wd: float = 0.0,
        wd_order: str = "before", normalize: bool = False, grafting: tuple[float, float, float] | None = None,
    ):
        self.W = w0.clone()
        m, n = self.W.shape
        self.m, self.n = m, n
        self.factors, self.beta_f, self.fo = factors, beta_f, dict(factor_opts or {})
        self.basis, self.sort, self.power_steps = basis, sort, power_steps
        self.inner, self.o = inner, dict(opts or {})
        self.every, self.at_first_call, self.offset = every, at_first_call, offset
        self.skip, self.update = skip_first_call, factor_update
        self.lr, self.wd, self.wd_order, self.normalize, self.grafting = lr, wd, wd_order, normalize, grafting
        self.L, self.R = torch.zeros(m, m, dtype=F64), torch.zeros(n, n, dtype=F64)
        self.Q = [torch.eye(m, dtype=F64), torch.eye(n, dtype=F64)]
        self.lam = [torch.ones(m, dtype=F64), torch.ones(n, dtype=F64)]
        self.ready = basis == "identity"
        s0 = self.fo.get("init_factor", 0.1) ** -0.5
        self.s = [torch.full((m,), s0, dtype=F64), torch.full((n,), s0, dtype=F64)]  # kl: tracked λ^{-1/2}
        self.ps_started = False
        self.mom = torch.zeros(m, n, dtype=F64)
        self.v = torch.zeros(m, n, dtype=F64)
        self.l, self.r = torch.full((m,), 1e-8, dtype=F64), torch.full((n,), 1e-8, dtype=F64)
        self.gm, self.gv = torch.zeros(m, n, dtype=F64), torch.zeros(m, n, dtype=F64)
        self.calls, self.t = 0, 0
        self.permutations = 0  # refreshes whose sort moved a column (so a test can tell it was exercised)

    # factors and basis
    def _observe(self, G: torch.Tensor, t: int, first: bool) -> None:
        if self.factors == "ema":
            b = self.beta_f
            self.L, self.R = b * self.L + (1 - b) * G @ G.T, b * self.R + (1 - b) * G.T @ G
        elif self.factors == "kl":
            self._kl(G, t)
        elif self.factors == "ps":
            self._projector_splitting(G)
        due = (first and self.at_first_call) or (t >= 1 and t % self.every == self.offset)
        if due and self.basis != "identity":
            self._refresh()

    def _kl(self, G: torch.Tensor, t: int) -> None:
        rho, m, n = self.beta_f, self.m, self.n
        if t == 0:  # kl_shampoo.md §5: the first call sets the factors only
            self.L, self.R = (1 - rho) * G @ G.T / n, (1 - rho) * G.T @ G / m
            return
        (QL, QR), (sL, sR) = self.Q, self.s
        self.L = rho * self.L + (1 - rho) / n * G @ QR @ torch.diag(sR**2) @ QR.T @ G.T
        self.R = rho * self.R + (1 - rho) / m * G.T @ QL @ torch.diag(sL**2) @ QL.T @ G
        H = QL.T @ G @ QR
        kappa = self.fo.get("damping", 0.0)
        d = [(H**2 * (sR**2)[None, :]).sum(1) / n + kappa * (sR**2).mean(),
             (H**2 * (sL**2)[:, None]).sum(0) / m + kappa * (sL**2).mean()]
        for i, size in enumerate((m, n)):
            lam_prev = torch.nan_to_num(1 / self.s[i] ** 2, nan=0.0, posinf=0.0)
            s_new = torch.nan_to_num((rho * lam_prev + (1 - rho) * d[i]) ** -0.5, nan=0.0, posinf=0.0)
            if self.fo.get("clamping", True):
                s_new = s_new.clamp(max=max(10.0, min(float(size), self.fo.get("max_clamp", 4000.0))))
            self.s[i] = s_new

    def _projector_splitting(self, G: torch.Tensor) -> None:
        b, init = self.beta_f, self.fo.get("init", "kron")
        step = ksl_dense if self.fo.get("variant", "ksl") == "ksl" else parallel_dense
        if not self.ps_started:
            self.ps_started = True
            if init in ("kron", "kron_reference"):
                self.L, self.R = kron_init(G, b, init)
            elif init == "eps":
                self.L = 1e-3 * torch.eye(self.m, dtype=F64) / math.sqrt(self.m)
                self.R = 1e-3 * torch.eye(self.n, dtype=F64) / math.sqrt(self.n)
            else:  # sum
                self.L, self.R = G @ G.T, G.T @ G
            if init == "kron":
                return  # the kron start is the EMA's first term: G₁ is not fed again
        self.L, self.R = step(self.L, self.R, G, b)

    def _refresh(self) -> None:
        old = list(self.Q)
        perms: list = [None, None]
        for i, X in enumerate((self.L, self.R)):
            if self.basis == "eigh" or not self.ready:
                self.lam[i], self.Q[i] = _eigh_descending(X)
                continue
            Q = self.Q[i]
            e = torch.diagonal(Q.T @ X @ Q)
            pi = torch.argsort(e, descending=True) if self.sort else torch.arange(len(e))
            Q = Q[:, pi]
            for _ in range(self.power_steps):
                Q = torch.linalg.qr(X @ Q).Q
            self.Q[i], self.lam[i] = Q, e[pi]
            if self.sort:
                perms[i] = pi
                self.permutations += int(not torch.equal(pi, torch.arange(len(pi))))
        self.ready = True
        for i in range(2):
            if perms[i] is not None and self.factors == "kl":
                self.s[i] = self.s[i][perms[i]]
        if self.inner in ("adam", "adam_rank1"):
            self.mom = self.Q[0].T @ old[0] @ self.mom @ old[1].T @ self.Q[1]
            if perms[0] is not None:
                self.v, self.l = self.v[perms[0], :], self.l[perms[0]]
            if perms[1] is not None:
                self.v, self.r = self.v[:, perms[1]], self.r[perms[1]]

    # inner rules
    def _direction(self, G: torch.Tensor, t: int) -> torch.Tensor:
        o, (QL, QR) = self.o, self.Q
        if self.inner in ("adam", "adam_rank1"):
            b1, b2 = o.get("betas", (0.9, 0.999))
            eps = o.get("eps", 1e-8)
            H = QL.T @ G @ QR
            self.mom = b1 * self.mom + (1 - b1) * H
            if self.inner == "adam":
                self.v = b2 * self.v + (1 - b2) * H * H
                v = self.v
            else:  # dykaf.md §7
                self.l, self.r = rank1_update(self.l, self.r, H * H, b2)
                v = torch.outer(self.l, self.r)
            c1, c2 = (1 - b1**t, 1 - b2**t) if o.get("bias_correction", True) else (1.0, 1.0)
            if o.get("eps_placement", "after_correction") == "after_correction":
                ratio, scale = self.mom / (v.sqrt() / math.sqrt(c2) + eps), 1 / c1
            else:
                ratio, scale = self.mom / (v.sqrt() + eps), math.sqrt(c2) / c1
            if o.get("normalize", False):
                ratio = ratio / (1e-30 + ratio.pow(2).mean().sqrt())
            return scale * (QL @ ratio @ QR.T)
        if self.inner == "eigenvalue":
            beta, p = o.get("momentum", 0.9), o.get("exponent", -0.25)
            eps, where = o.get("eps", 1e-12), o.get("eps_placement", "inside")
            self.mom = beta * self.mom + (1 - beta) * G
            m_hat = self.mom / (1 - beta**t) if o.get("bias_correction", True) else self.mom
            if not self.ready:
                return m_hat
            lam = [1 / s**2 for s in self.s] if self.factors == "kl" else self.lam
            lL, lR = lam[0].clamp(min=0), lam[1].clamp(min=0)
            if where == "inside":
                scale = ((lL + eps) ** p)[:, None] * ((lR + eps) ** p)[None, :]
            elif where == "outside":
                scale = (1 / (lL ** (-p) + eps))[:, None] * (1 / (lR ** (-p) + eps))[None, :]
            else:  # product
                scale = 1 / ((lL[:, None] * lR[None, :]) ** (-p) + eps)
            D = QL @ ((QL.T @ m_hat @ QR) * scale) @ QR.T
            return D / (1e-30 + D.pow(2).mean().sqrt()) if o.get("normalize", False) else D
        if self.inner == "sgd":
            mu = o.get("momentum", 0.0)
            if mu == 0:
                return G
            self.mom = mu * self.mom + G
            return G + mu * self.mom if o.get("nesterov", False) else self.mom
        if self.inner == "orthogonalize":
            beta, nesterov = o.get("momentum", 0.95), o.get("nesterov", True)
            if o.get("momentum_form", "ema") == "ema":
                self.mom = beta * self.mom + (1 - beta) * G
                U = (1 - beta) * G + beta * self.mom if nesterov else self.mom
            else:
                self.mom = beta * self.mom + G
                U = G + beta * self.mom if nesterov else self.mom
            steps = o.get("steps", 5)
            if o.get("coefficients", "kj") == "custom":
                tuples = [tuple(c) for c in o["custom_coefficients"]]
                cycle = o.get("custom_beyond", "repeat_last") == "cycle"
                coeffs = [tuples[k] if k < len(tuples) else tuples[k % len(tuples) if cycle else -1] for k in range(steps)]
            else:
                coeffs = ns_ref.coefficients(o.get("coefficients", "kj"), steps)
            O = ns_ref.newton_schulz(QL.T @ U @ QR, coeffs, eps=o.get("eps", 1e-7), norm=o.get("norm", "clamp"))
            s = ns_ref.SHAPE_SCALES[o.get("scale", "original")](self.m, self.n) * o.get("extra_scale", 1.0)
            return s * (QL @ O @ QR.T)
        raise AssertionError(self.inner)

    def step(self, G: torch.Tensor) -> torch.Tensor:
        first = self.calls == 0
        self.calls += 1
        if first and self.skip:
            self._observe(G, self.t, True)
            return self.W.clone()
        self.t += 1
        t = self.t
        if self.update == "before":
            self._observe(G, t, first)
        D = self._direction(G, t)
        if self.normalize:
            D = D / (1e-30 + D.pow(2).mean().sqrt())
        if self.grafting is not None:
            g1, g2, g_eps = self.grafting
            self.gm = g1 * self.gm + (1 - g1) * G
            self.gv = g2 * self.gv + (1 - g2) * G * G
            A = (self.gm / (1 - g1**t)) / ((self.gv / (1 - g2**t)).sqrt() + g_eps)
            D = A if not self.ready else D * (A.norm() / D.norm())
        if self.update == "after":
            self._observe(G, t, first)
        if self.wd_order == "before":
            self.W = self.W * (1 - self.lr * self.wd) - self.lr * D
        else:
            self.W = (self.W - self.lr * D) * (1 - self.lr * self.wd)
        return self.W.clone()


# -- the harness ----------------------------------------------------------------------------------------------

#: Pipeline64 keyword → (config table, key); the rest are top-level or handled below
_TABLE_KEYS = {
    "every": ("refresh", "every"), "at_first_call": ("refresh", "at_first_call"), "offset": ("refresh", "offset"),
    "sort": ("basis", "sort"), "power_steps": ("basis", "power_steps"),
    "wd_order": ("post", "weight_decay_order"), "normalize": ("post", "normalize"),
}


def _config(**kw: Any) -> dict[str, Any]:
    """The kronopt config (a dict) of the Pipeline64 keywords ``kw``."""
    factors = kw.get("factors", "none")
    cfg: dict[str, Any] = {
        "lr": kw.get("lr", 1e-2), "weight_decay": kw.get("wd", 0.0),
        "skip_first_call": kw.get("skip_first_call", False), "factor_update": kw.get("factor_update", "after"),
        "factors": {"type": "none"} if factors == "none" else {
            "type": {"ps": "projector_splitting"}.get(factors, factors), "beta": kw.get("beta_f", 0.9),
            **(kw.get("factor_opts") or {}),
        },
        "basis": {"type": kw.get("basis", "identity")},
        "inner": {"type": kw.get("inner", "adam"),
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in (kw.get("opts") or {}).items()}},
        "split": {"type": "full"},
        "refresh": {"type": "every", "every": 1, "at_first_call": False},
        "post": {},
    }
    for key, (table, name) in _TABLE_KEYS.items():
        if key in kw:
            cfg[table][name] = kw[key]
    if kw.get("grafting"):
        g1, g2, g_eps = kw["grafting"]
        cfg["post"].update(grafting="adam", graft_betas=[g1, g2], graft_eps=g_eps)
    return cfg


def _inputs(key: Any, shape: tuple[int, int], steps: int, *, scale: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(_seed(*key))
    w0 = torch.randn(shape, generator=gen, dtype=F64)
    return w0, [scale * torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


def _ours(spec: Any, w0: torch.Tensor, grads: list[torch.Tensor], **overrides: Any) -> list[torch.Tensor]:
    p = torch.nn.Parameter(w0.clone())
    opt = kronopt.build([p], spec, **overrides)
    return [h[0] for h in run_history(opt, [p], [[g] for g in grads])]


def _assert_trajectory(
    got: list[torch.Tensor], want: list[torch.Tensor], w0: torch.Tensor, *, rtol: float = 1e-9, atol: float = 1e-11
) -> None:
    assert (want[-1] - w0).abs().max() > 1e-4, "the reference did not move: the test would prove nothing"
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda msg, k=k: f"call {k + 1}: {msg}")


def _check(key: Any, *, shape: tuple[int, int] = (5, 4), steps: int = 9, **kw: Any) -> Pipeline64:
    """Run the config of ``kw`` and :class:`Pipeline64` on the same seeded float64 inputs; compare every call."""
    w0, grads = _inputs(key, shape, steps)
    ref = Pipeline64(w0, **kw)
    want = [ref.step(g) for g in grads]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the eigenvalue rule's own normalize
        got = _ours(_config(**kw), w0, grads)
    _assert_trajectory(got, want, w0)
    return ref


def test_the_reference_pipeline_tells_options_apart():
    """Pipeline64 is what the tests below compare against, so its options must matter: flipping any one of them
    moves the trajectory (a reference that ignored an option would pass a kronopt that ignores it too)."""
    w0, grads = _inputs("discriminate", (5, 4), 8)

    def last(**kw: Any) -> torch.Tensor:
        ref = Pipeline64(w0, **kw)
        return [ref.step(g) for g in grads][-1]

    base = dict(factors="ema", basis="qr", every=2, lr=0.05)
    for inner, default, flips in [
        ("adam", {"betas": (0.9, 0.99)}, [{"bias_correction": False}, {"eps_placement": "before_correction", "eps": 1e-2},
                                          {"normalize": True}, {"betas": (0.0, 0.99)}]),
        ("adam_rank1", {"betas": (0.9, 0.99)}, [{"bias_correction": False}, {"normalize": True}]),
        ("eigenvalue", {"eps": 1e-3}, [{"exponent": -0.5}, {"eps_placement": "outside"}, {"eps_placement": "product"},
                                       {"bias_correction": False}, {"momentum": 0.0}]),
        # the classic form is the EMA's U / (1 − β): only an ε between the two norms tells them apart
        ("orthogonalize", {"eps": 10.0}, [{"nesterov": False}, {"momentum_form": "classic"}, {"steps": 2},
                                          {"coefficients": "polar_express"}, {"scale": "spectral"}, {"norm": "add"}]),
        ("sgd", {"momentum": 0.5}, [{"nesterov": True}, {"momentum": 0.0}]),
    ]:
        ref = last(**base, inner=inner, opts=default)
        for flip in flips:
            assert (last(**base, inner=inner, opts={**default, **flip}) - ref).abs().max() > 1e-6, (inner, flip)
    for factors, fo in [("kl", {"damping": 1e-1}), ("kl", {"init_factor": 1.0}), ("ps", {"variant": "parallel"}),
                        ("ps", {"init": "eps"})]:
        kw = dict(basis="eigh", every=2, inner="eigenvalue", opts={"eps": 1e-3}, lr=0.05, factors=factors)
        assert (last(**kw, factor_opts=fo) - last(**kw)).abs().max() > 1e-6, (factors, fo)


# -- sgd ------------------------------------------------------------------------------------------------------


def test_sgd_momentum_and_nesterov_per_param_group_equal_torch_sgd():
    """``sgd`` (docs/stages.md: "as torch.optim.SGD") with a different ``momentum`` / ``nesterov`` / ``lr`` per
    param group, on a matrix, a vector and a 3-D weight (one group keeps the default, no momentum at all):
    ``torch.optim.SGD`` with the same groups, step for step. Fails on: a group's inner options not reaching its
    buckets, the buffer started as ``(1−μ)G`` (dampening) or from ``μ·G``, Nesterov ``G + μB`` computed with
    the old buffer, state kept for ``momentum = 0`` that then leaks."""
    gen = torch.Generator().manual_seed(_seed("sgd-groups"))
    shapes = [(5, 4), (3,), (4, 2, 2), (6, 3)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = kronopt.build(
        [{"params": ours[:2], "inner.momentum": 0.9},
         {"params": [ours[2]], "inner.momentum": 0.5, "inner.nesterov": True, "lr": 0.05},
         {"params": [ours[3]]}],
        "adamw", lr=0.1, weight_decay=0.0, **{"inner.type": "sgd"},
    )
    ref = torch.optim.SGD(
        [{"params": theirs[:2], "momentum": 0.9}, {"params": [theirs[2]], "momentum": 0.5, "nesterov": True, "lr": 0.05},
         {"params": [theirs[3]]}],
        lr=0.1,
    )
    for _ in range(7):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=F64)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("skip", [False, True], ids=["every-call", "skip-first-call"])
@pytest.mark.parametrize("wd_order", ["before", "after"])
@pytest.mark.parametrize("factors,basis", [("none", "identity"), ("ema", "qr")])
@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.6, True)])
def test_sgd_with_decoupled_weight_decay_equals_torch_sgd_with_the_decay_applied_by_hand(
    momentum, nesterov, factors, basis, wd_order, skip
):
    """kronopt's weight decay is decoupled (docs/stages.md ``[post]``), so ``sgd`` with ``weight_decay`` is
    ``torch.optim.SGD`` without decay plus ``W ← W(1 − lr·λ)`` before or after its step; with
    ``skip_first_call`` the first call changes nothing (not the buffer, not the decay) and the rest is SGD on
    the later gradients. Under ``ema`` + ``qr`` the basis refreshes every 2 updates and must not matter.
    Fails on: the decay coupled into the gradient (torch's L2 form), applied on the wrong side of the step,
    applied on a skipped first call, the buffer fed the skipped call's gradient, a refresh touching the buffer."""
    w0, grads = _inputs(("sgd-wd", momentum, nesterov), (5, 4), 7)
    lr, wd = 0.05, 0.3
    cfg = _config(factors=factors, basis=basis, inner="sgd", opts={"momentum": momentum, "nesterov": nesterov}, every=2,
                  at_first_call=True, skip_first_call=skip, lr=lr, wd=wd, wd_order=wd_order)
    got = _ours(cfg, w0, grads)
    p = torch.nn.Parameter(w0.clone())
    sgd = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=nesterov)
    want = []
    for k, g in enumerate(grads):
        if not (skip and k == 0):
            with torch.no_grad():
                if wd_order == "before":
                    p.mul_(1 - lr * wd)
                p.grad = g.clone()
                sgd.step()
                if wd_order == "after":
                    p.mul_(1 - lr * wd)
        want.append(p.detach().clone())
    _assert_trajectory(got, want, w0, rtol=1e-13, atol=1e-14)


def test_param_groups_with_different_inner_rules_are_torch_adamw_and_torch_sgd():
    """``"inner.type"`` per param group starts that group's inner table afresh (docs/configs.md "Overrides"): one
    optimizer with an AdamW group (non-default betas, decay) and an SGD group (momentum, its own lr, no decay)
    steps exactly as ``torch.optim.AdamW`` and ``torch.optim.SGD`` side by side. Fails on: the Adam betas or the
    decay leaking into the SGD group, the groups' state shared, a group built with the other group's rule."""
    gen = torch.Generator().manual_seed(_seed("mixed-inner-groups"))
    shapes = [(5, 4), (3,), (4, 2, 2), (6, 3)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = kronopt.build(
        [{"params": ours[:2]}, {"params": ours[2:], "inner.type": "sgd", "inner.momentum": 0.8, "weight_decay": 0.0, "lr": 0.02}],
        "adamw", lr=3e-3, weight_decay=0.1, **{"inner.betas": [0.8, 0.9], "inner.eps": 1e-6},
    )
    adamw = torch.optim.AdamW(theirs[:2], lr=3e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    sgd = torch.optim.SGD(theirs[2:], lr=0.02, momentum=0.8)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=F64)
            b.grad = a.grad.clone()
        opt.step()
        adamw.step()
        sgd.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- adam -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "betas,eps,wd", [((0.0, 0.5), 1e-8, 0.1), ((0.99, 0.9999), 1e-3, 0.5), ((0.5, 0.0), 1e-6, 0.0), ((0.0, 0.0), 0.0, 0.0)],
    ids=["beta1=0", "betas-near-1", "beta2=0", "sign-descent"],
)
def test_adam_at_extreme_betas_and_eps_equals_torch_adamw(betas, eps, wd):
    """The ``adamw`` preset (identity basis, ε after the bias correction) at betas and ε far from the defaults
    equals ``torch.optim.AdamW`` in float64 on a matrix, a vector, a 3-D weight and a scalar. β₁ = 0 makes
    ``1 − β₁ᵗ = 1``, β₂ = 0 makes ``v = G²``, and β = ε = 0 is sign descent. Fails on: ``0 ** t`` or a bias
    correction special-cased wrongly at β = 0, ε = 0 sent down a path that adds a floor, a per-dtype fast path
    that ignores the betas."""
    gen = torch.Generator().manual_seed(_seed("adamw-extremes", betas, eps))
    shapes = [(7, 5), (5,), (3, 2, 2), ()]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = kronopt.build(ours, "adamw", lr=1e-2, weight_decay=wd, **{"inner.betas": list(betas), "inner.eps": eps})
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=wd, betas=betas, eps=eps)
    for _ in range(8):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=F64)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


ADAM_OPTIONS = [
    pytest.param({"betas": (0.0, 0.99), "bias_correction": False}, id="beta1=0-no-bias-correction"),
    pytest.param({"betas": (0.8, 0.9), "eps_placement": "before_correction", "normalize": True}, id="before-normalize"),
    pytest.param({"betas": (0.8, 0.9), "eps": 1e-3, "normalize": True}, id="after-normalize"),
    pytest.param({"betas": (0.6, 0.5), "eps": 1e-6, "bias_correction": False, "eps_placement": "before_correction"},
                 id="before-no-bias-correction"),
    pytest.param({"betas": (0.9, 0.95), "eps": 0.0}, id="eps=0"),
]
BASES = [
    pytest.param({"factors": "none", "basis": "identity"}, id="identity"),
    pytest.param({"factors": "ema", "basis": "eigh", "factor_update": "before", "beta_f": 0.7}, id="ema-eigh-before"),
    pytest.param({"factors": "ema", "basis": "qr", "skip_first_call": True, "at_first_call": True}, id="ema-qr-soap-order"),
    pytest.param({"factors": "ema", "basis": "qr", "sort": False, "power_steps": 2}, id="ema-qr-unsorted-2-steps"),
]


@pytest.mark.parametrize("where", BASES)
@pytest.mark.parametrize("opts", ADAM_OPTIONS)
def test_adam_options_against_the_float64_reference(opts, where):
    """The ``adam`` rule's ``bias_correction``, ``eps_placement``, ``normalize`` and betas away from their
    defaults, in the identity basis and in ``eigh`` / ``qr`` bases refreshed every 3 updates (decay after the
    step): :class:`Pipeline64`, 9 calls. ``normalize`` divides the ratio by its RMS before the bias-correction
    scale (``AdamConventions``). Fails on: ``bias_correction = false`` still dividing by ``1 − β₁ᵗ`` (or only
    one of the two corrections dropped), ε added after the correction where it belongs before, the RMS taken
    after the scale or of the rotated ratio of a different basis, the moments not following a refresh."""
    _check(("adam", opts, where), inner="adam", opts=opts, every=3, wd=0.1, wd_order="after", **where)


def _normalized_adam_step_rms(split: dict[str, Any]) -> list[tuple[float, float]]:
    """(RMS of the step / lr, the bias-correction scale c_t) over 3 updates of SOAP with ``inner.normalize`` on a
    6 × 16 block, under ``split`` (its complement made negligible where it has one)."""
    gen = torch.Generator().manual_seed(_seed("normalize-rms"))
    p = torch.nn.Parameter(torch.zeros(6, 16, dtype=F64))
    b1, b2 = 0.9, 0.95
    opt = kronopt.build([p], "soap", lr=1.0, weight_decay=0.0, **{
        "inner.normalize": True, "inner.betas": [b1, b2], "refresh.every": 1, **split,
    })
    p.grad = torch.randn(6, 16, generator=gen, dtype=F64)
    opt.step()  # the first call builds the basis (and a restricted side's subspace) only
    out = []
    for t in range(1, 4):
        before = p.detach().clone()
        p.grad = torch.randn(6, 16, generator=gen, dtype=F64)
        opt.step()
        out.append(((before - p.detach()).pow(2).mean().sqrt().item(), math.sqrt(1 - b2**t) / (1 - b1**t)))
    return out


def test_adam_normalize_gives_the_block_direction_the_rms_of_the_bias_correction_scale():
    """``normalize`` divides the direction by its RMS per block before the bias-correction scale (docs/stages.md
    ``adam``; SOAP's ``normalize_grads``), so every step has RMS ``c_t = √(1−β₂ᵗ)/(1−β₁ᵗ)`` exactly (a hand
    count), whatever the gradient, with full ``eigh`` / ``qr`` bases refreshed every update."""
    for rms, c_t in _normalized_adam_step_rms({}):
        assert rms == pytest.approx(c_t, rel=1e-12)


def test_adam_normalize_on_a_restricted_side_normalises_the_subspace_coordinates():
    """The same with the right side kept at rank 4 of 16 (``lowrank_flat``, its complement scaled by 1e-12):
    ``normalize`` divides the rotated ``6 × 4`` ratio by its RMS, per coordinate of the basis, so the subspace block
    ``Q_L N Uᵀ`` alone has RMS ``√(4/16) · c_t`` over the block's 6 × 16 entries (the complement, matched to the
    subspace block's RMS per coordinate, brings the whole step to ``c_t``: see
    tests/unit/test_tie_route_and_placement_edges.py). Fails on: the block normalised after the rotation back
    (RMS ``c_t`` here, and twice SOAP's with the complement)."""
    split = {"split.type": "lowrank_flat", "split.rank": 4, "split.side": "right", "split.complement_mult": 1e-12,
             "split.complement_scale": "match_subspace_rms"}
    for rms, c_t in _normalized_adam_step_rms(split):
        assert rms == pytest.approx(math.sqrt(4 / 16) * c_t, rel=1e-9)


# -- adam_rank1 -----------------------------------------------------------------------------------------------

RANK1_OPTIONS = [
    pytest.param({"betas": (0.8, 0.9)}, id="after-correction"),  # the rule's default placement; the presets use "before"
    pytest.param({"betas": (0.5, 0.9), "bias_correction": False}, id="no-bias-correction"),
    pytest.param({"betas": (0.9, 0.95), "eps_placement": "before_correction", "normalize": True}, id="before-normalize"),
    pytest.param({"betas": (0.0, 0.8), "eps": 1e-4}, id="beta1=0"),
]


@pytest.mark.parametrize(
    "where",
    [
        pytest.param({"factors": "none", "basis": "identity"}, id="identity"),
        pytest.param({"factors": "ema", "basis": "qr", "beta_f": 0.7, "every": 2}, id="ema-qr-sorted"),
        pytest.param({"factors": "ema", "basis": "eigh", "every": 3, "factor_update": "before"}, id="ema-eigh"),
        pytest.param({"factors": "ps", "basis": "qr", "beta_f": 0.8, "every": 3,
                      "factor_opts": {"variant": "parallel", "init": "eps"}},
                     id="dykaf-parallel-eps"),
    ],
)
@pytest.mark.parametrize("opts", RANK1_OPTIONS)
def test_adam_rank1_options_against_dykaf_section_7_in_float64(opts, where):
    """``adam_rank1`` (dykaf.md §7: ``V ≈ l rᵀ`` by the parallel rank-one integrator from ``l = r = 1e-8·𝟙``,
    ``l`` / ``r`` permuted with the basis columns at a refresh) with its conventions away from the presets'
    (``after_correction``, no bias correction, ``normalize``, β₁ = 0), under the identity, sorted ``qr``, ``eigh``
    and DyKAF's own factors: :class:`Pipeline64` (the integrator from ``tests/reference/dykaf``), 10 calls.
    Where the ``qr`` sort moves columns the test also asserts that it happened. Fails on: ``l`` and ``r`` not
    permuted (or permuted with the other side's π), the integrator fed ``G`` instead of ``G'²`` or ``β₁``
    instead of ``β₂``, ε outside the root, a convention of ``AdamConventions`` not honoured by this rule."""
    ref = _check(("rank1", opts, where), inner="adam_rank1", opts=opts, steps=10, wd=0.05, **where)
    if where.get("basis") == "qr":
        assert ref.permutations > 0


# -- orthogonalize --------------------------------------------------------------------------------------------

ORTHO_OPTIONS = [
    pytest.param({"momentum": 0.8, "nesterov": False}, id="plain-momentum"),
    pytest.param({"momentum": 0.0, "steps": 3}, id="no-momentum-3-steps"),
    pytest.param({"momentum": 0.9, "momentum_form": "classic"}, id="classic-nesterov"),
    pytest.param({"momentum": 0.9, "momentum_form": "classic", "nesterov": False, "norm": "add", "eps": 0.3},
                 id="classic-plain-add"),
    pytest.param({"momentum": 0.5, "coefficients": "polar_express", "steps": 10}, id="polar-express-beyond-its-list"),
    pytest.param({"momentum": 0.5, "coefficients": "quintic", "steps": 7}, id="quintic-cycles"),
    pytest.param({"momentum": 0.5, "coefficients": "cans", "steps": 6}, id="cans"),
    pytest.param({"momentum": 0.5, "coefficients": "deepseekv4", "steps": 11}, id="deepseekv4"),
    pytest.param({"coefficients": "custom", "custom_coefficients": [[3.0, -3.2, 1.2], [2.0, -1.5, 0.5]],
                  "custom_beyond": "cycle", "steps": 5}, id="custom-cycle"),
    pytest.param({"coefficients": "custom", "custom_coefficients": [[3.0, -3.2, 1.2], [2.0, -1.5, 0.5]], "steps": 5},
                 id="custom-repeat-last"),
    pytest.param({"scale": "match_rms_adamw", "extra_scale": 0.7}, id="match-rms-adamw-extra"),
    pytest.param({"scale": "spectral", "eps": 30.0}, id="spectral-eps-above-the-norm"),
    pytest.param({"scale": "unit_rms_norm"}, id="unit-rms-norm"),
    pytest.param({"scale": "none", "norm": "add", "eps": 0.5}, id="none-add"),
]


@pytest.mark.parametrize("shape", [(6, 3), (3, 6)], ids=["tall", "wide"])
@pytest.mark.parametrize("opts", ORTHO_OPTIONS)
def test_orthogonalize_options_in_float64_against_the_newton_schulz_reference(opts, shape):
    """Every ``orthogonalize`` option away from its default, with ``ns_dtype = "float64"``: the momentum forms of
    muon.md §2, the schedules of §4 past their lists (``repeat_last`` / ``cycle``, custom tuples), the shape
    factors of §5 with ``extra_scale``, the ``clamp`` / ``add`` norms with an ε that matters (above ``‖U‖``
    in one case, so ``X = U/ε``), on a tall and a wide block with decoupled decay: the float64
    ``tests/reference/newton_schulz`` iteration in :class:`Pipeline64`, 6 calls. Fails on: a wrong tuple or the
    wrong extension past a schedule's list, the shape factor of the transposed block, ``extra_scale`` dropped,
    ε added where it clamps, the classic buffer ``μB + G`` given the EMA's look-ahead."""
    _check(("ortho", opts, shape), shape=shape, steps=6, inner="orthogonalize", opts={**opts, "ns_dtype": "float64"},
           lr=0.05, wd=0.1)


@pytest.mark.parametrize("opts", ORTHO_OPTIONS[:4])
def test_orthogonalize_options_in_a_refreshed_basis_against_the_reference(opts):
    """The same options under ``ema`` factors and a sorted ``qr`` basis refreshed every 2 updates: Newton–Schulz
    is rotation-equivariant, and the reference rotates ``U`` into the basis and back. Fails on: the momentum
    buffer rotated by a refresh (it lives in the original coordinates), the classic form's buffer rotated."""
    _check(("ortho-basis", opts), shape=(5, 4), steps=6, inner="orthogonalize", opts={**opts, "ns_dtype": "float64"},
           factors="ema", basis="qr", every=2, at_first_call=True, lr=0.05, wd=0.1)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        pytest.param({"inner.momentum": 0.8}, {"momentum": 0.8}, id="momentum-0.8"),
        pytest.param({"inner.momentum": 0.5, "inner.nesterov": False, "inner.steps": 8, "inner.scale": "match_rms_adamw"},
                     {"momentum": 0.5, "nesterov": False, "ns_steps": 8, "adjust_lr_fn": "match_rms_adamw"},
                     id="plain-8-steps-rms"),
        pytest.param({"inner.steps": 3, "weight_decay": 0.3, "inner.scale": "original"},
                     {"ns_steps": 3, "weight_decay": 0.3, "adjust_lr_fn": "original"}, id="3-steps-decay"),
        pytest.param({"inner.coefficients": "custom", "inner.custom_coefficients": [[3.0, -3.2, 1.2]], "inner.momentum": 0.0},
                     {"ns_coefficients": (3.0, -3.2, 1.2), "momentum": 0.0}, id="custom-tuple-no-momentum"),
    ],
)
def test_muon_options_match_torch_muon_to_bfloat16_rounding(ours, theirs):
    """``torch.optim.Muon``'s options (momentum, nesterov, ``ns_steps``, ``ns_coefficients``, weight decay,
    ``adjust_lr_fn``) set to non-default values on both sides, float32 parameters, bfloat16 Newton–Schulz, 10
    steps on a tall, a wide and a square matrix. kronopt forms the Nesterov look-ahead as one ``lerp`` (an ulp
    away from torch's two), and bfloat16 iterations then part by a rounding now and then, so the check is
    each parameter's displacement to 1 % (a wrong option moves it by 2 % (3 steps for 5) to tens of percent).
    Fails on: an option not forwarded, steps counted from 0, the custom tuple read as a schedule name, the
    decay scaled by the shape factor."""
    gen = torch.Generator().manual_seed(_seed("torch-muon", sorted(ours)))
    shapes = [(16, 8), (8, 16), (12, 12)]
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    start = [p.detach().clone() for p in a]
    opt = kronopt.build(a, "muon", lr=1e-2, **{"weight_decay": 0.1, **ours})
    ref = torch.optim.Muon(b, lr=1e-2, **{"weight_decay": 0.1, **theirs})
    for _ in range(10):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        opt.step()
        ref.step()
    for pa, pb, p0 in zip(a, b, start):
        moved = (pb.detach() - p0).norm()
        assert moved > 1e-2
        assert (pa.detach() - pb.detach()).norm() <= 1e-2 * moved


@pytest.mark.parametrize("nesterov", [False, True])
def test_float16_newton_schulz_is_scale_invariant_like_every_other_dtype(nesterov):
    """Newton–Schulz normalises its input (muon.md §3), so the Muon step does not depend on the gradient's
    scale. With ``ns_dtype = "float16"`` (a choice of ``inner.ns_dtype``) a gradient whose Frobenius norm
    passes float16's largest value (65504; here entries of a few thousand) must give the same step as the
    same gradient at scale 1, to float16 rounding, as it does in bfloat16. Fails on: the momentum cast to
    float16 before it is normalised (its norm overflows to ``inf`` and ``X = U / inf`` is 0: a zero step,
    silently), and with ``nesterov`` the look-ahead written in float16 (entries past 65504 overflow: a NaN
    step)."""
    G = torch.randn(32, 16, generator=torch.Generator().manual_seed(_seed("fp16")))
    steps = {}
    for scale in (1.0, 1e4):
        p = torch.nn.Parameter(torch.zeros(32, 16))
        opt = kronopt.build([p], "adamw", lr=1.0, weight_decay=0.0, **{
            "inner.type": "orthogonalize", "inner.ns_dtype": "float16", "inner.nesterov": nesterov, "inner.momentum": 0.5,
        })
        p.grad = G * scale
        opt.step()
        steps[scale] = p.detach().clone()
    assert steps[1.0].norm() > 1.0  # the scale-1 step is the polar factor times √2, norm ≈ 5
    torch.testing.assert_close(steps[1e4], steps[1.0], rtol=0.0, atol=2e-2)


# -- eigenvalue -----------------------------------------------------------------------------------------------

EIGEN_OPTIONS = [
    pytest.param({"momentum": 0.0, "exponent": -0.5, "eps": 1e-6}, id="no-momentum-exp-1/2"),
    pytest.param({"momentum": 0.8, "exponent": -1 / 3, "eps": 1e-4, "bias_correction": False}, id="exp-1/3-no-bias-correction"),
    pytest.param({"momentum": 0.7, "exponent": -1.0, "eps": 1e-3, "eps_placement": "outside"}, id="exp-1-outside"),
    pytest.param({"momentum": 0.7, "exponent": -0.25, "eps": 1e-3, "eps_placement": "outside", "normalize": True},
                 id="outside-normalize"),
    pytest.param({"momentum": 0.6, "exponent": -0.5, "eps": 1e-4, "eps_placement": "product", "bias_correction": False},
                 id="product-exp-1/2"),
    pytest.param({"momentum": 0.6, "exponent": -0.25, "eps": 1e-4, "eps_placement": "product"}, id="product-exp-1/4"),
    pytest.param({"momentum": 0.6, "exponent": -0.25, "eps": 1e-4, "momentum_basis": "eigen", "bias_correction": False},
                 id="eigen-momentum"),
    pytest.param({"momentum": 0.6, "exponent": -0.5, "eps": 1e-4, "momentum_basis": "eigen", "eps_placement": "outside"},
                 id="eigen-momentum-outside"),
]


@pytest.mark.parametrize(
    "where",
    [
        # square: the first basis, built on the first call, comes from a full-rank factor
        pytest.param({"basis": "eigh", "at_first_call": True, "shape": (4, 4)}, id="eigh-first-call"),
        pytest.param({"basis": "qr", "skip_first_call": True, "at_first_call": True, "factor_update": "before",
                      "beta_f": 0.3, "shape": (4, 4)}, id="qr-skip-before"),
        pytest.param({"basis": "qr", "sort": False, "factor_update": "before", "beta_f": 0.5}, id="qr-unsorted-late-start"),
    ],
)
@pytest.mark.parametrize("opts", EIGEN_OPTIONS)
def test_eigenvalue_options_against_the_float64_reference(opts, where):
    """The ``eigenvalue`` rule's ``exponent`` (−1/2, −1/3, −1), ``eps`` and its three placements, no bias
    correction, no momentum, ``normalize`` (deprecated) and ``momentum_basis = "eigen"`` (the same direction in
    exact arithmetic), under ``ema`` factors and ``eigh`` / sorted / unsorted ``qr`` bases refreshed every 2
    updates, both factor orders: :class:`Pipeline64`, 9 calls. The estimates are ``eigh``'s eigenvalues or the
    ``qr`` Rayleigh quotients of the updated factor in the old basis. Fails on: ε inside where it belongs
    outside (or per side where it belongs to the product), ``λ^p`` by a power that only works for ±1/4, ±1/2,
    the bias correction kept, the eigen-basis momentum not carried across a refresh, the scale applied before
    the first refresh."""
    where = dict(where)
    shape = where.pop("shape", (5, 4))
    _check(("eigen", opts, where.get("basis"), where.get("sort", True)), shape=shape, inner="eigenvalue", opts=opts,
           factors="ema", every=2, lr=1e-2, wd=0.05, **where)


@pytest.mark.parametrize(
    "graft,opts",
    [
        pytest.param((0.9, 0.99, 1e-8), {"momentum": 0.0, "exponent": -0.5, "eps": 1e-6}, id="graft-0.9-0.99"),
        pytest.param((0.5, 0.9, 1e-3), {"momentum": 0.8, "exponent": -1 / 3, "eps": 1e-4, "bias_correction": False},
                     id="graft-0.5-0.9-big-eps"),
    ],
)
def test_eigenvalue_with_grafting_options_against_the_float64_reference(graft, opts):
    """``[post]`` Adam grafting with its betas and ε away from the shampoo preset's, on an ``eigh`` basis refreshed
    every 3 updates (factors before the direction, Shampoo's order): the Adam direction itself until the first
    refresh, then the eigenvalue direction rescaled to its norm. Fails on: ``graft_eps`` or ``graft_betas``
    not read, the inner rule's bias correction leaking into the graft, grafting before the basis is ready."""
    _check(("graft", graft), inner="eigenvalue", opts=opts, factors="ema", basis="eigh", every=3,
           factor_update="before", grafting=graft, lr=1e-2)


SHAMPOO_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "precondition_frequency": "refresh.every",
                "exponent": "inner.exponent", "eps": "inner.eps", "factor_beta": "factors.beta", "graft_eps": "post.graft_eps"}


@pytest.mark.parametrize(
    "options",
    [
        {"betas": (0.9, 0.95), "graft_betas": (0.9, 0.8), "graft_eps": 1e-3, "precondition_frequency": 3},
        {"betas": (0.0, 0.95), "graft_betas": (0.0, 0.99), "factor_beta": 0.5, "exponent": -1 / 3, "eps": 1e-6,
         "precondition_frequency": 4, "weight_decay": 0.2},
    ],
    ids=["graft-beta2-eps", "no-momentum-exp-1/3"],
)
def test_shampoo_preset_options_match_the_shampoo_reference(options):
    """The ``shampoo`` preset with its grafting ε and β₂, the factor retention, the exponent and ε set away from
    the preset's (graft β₁ kept equal to the inner momentum: see the next test), against
    ``tests/reference/shampoo.py`` over 14 calls on three shapes."""
    shapes = [(5, 4), (4, 6), (4, 4)]
    gen = torch.Generator().manual_seed(_seed("shampoo", sorted(options)))
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, 14)
    ref = shampoo_reference(params, grads, lr=1e-3, **options)
    overrides = {SHAMPOO_KEYS[k]: v for k, v in options.items() if k in SHAMPOO_KEYS}
    overrides.update({"lr": 1e-3, "inner.momentum": options["betas"][0], "post.graft_betas": list(options["graft_betas"])})
    overrides.setdefault("factors.beta", options["betas"][1])
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    ours = run_history(kronopt.build(ours_params, "shampoo", **overrides), ours_params, grads)
    assert_histories_close(ours, ref)


def test_shampoo_with_another_inner_momentum_still_grafts_the_inner_rules_first_moment():
    """soap.md §9 (and ``tests/reference/shampoo.py``): the grafting direction is ``A = m̂/(√v̂_g + ε_g)`` with the
    inner rule's first moment ``m̂``; grafting only rescales. An ablation that changes the ``shampoo`` preset's
    ``inner.momentum`` (0.95 → 0.9) must therefore still be Shampoo with β₁ = 0.9: the preset ties
    ``post.graft_betas[0]`` to ``inner.momentum``. Fails on: the graft's first moment kept at a fixed 0.95 (the
    trajectory then leaves the spec's by about 1e-4 here, 4e-3 at lr 1e-2), the tie left unresolved."""
    shapes = [(5, 4), (4, 6)]
    gen = torch.Generator().manual_seed(_seed("shampoo-momentum"))
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, 12)
    ref = shampoo_reference(params, grads, lr=1e-3, betas=(0.9, 0.95), graft_betas=(0.95, 0.95), precondition_frequency=3)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours_params, "shampoo", lr=1e-3, **{"inner.momentum": 0.9, "refresh.every": 3})
    assert_histories_close(run_history(opt, ours_params, grads), ref)


# -- factor estimators ----------------------------------------------------------------------------------------


def test_ema_factors_with_beta_zero_are_the_current_gram():
    """``ema`` with ``beta = 0`` keeps only ``G Gᵀ`` and ``Gᵀ G`` of the latest gradient (docs/stages.md
    invariant), refreshed by ``eigh`` after every update, under the eigenvalue rule (a square block, so the
    Gram is full rank): :class:`Pipeline64`, 8 calls. Fails on: ``beta = 0`` read as "no decay" or as the
    default, the factor not replaced at each update."""
    _check("ema-beta-0", shape=(4, 4), steps=8, inner="eigenvalue", opts={"momentum": 0.5, "exponent": -0.5, "eps": 1e-6},
           factors="ema", beta_f=0.0, basis="eigh", every=1, lr=1e-2)


def test_beta2_tie_follows_each_param_groups_inner_betas():
    """``factors.beta = "beta2"`` (docs/configs.md "Tied retention") binds per param group: a group that overrides
    ``inner.betas`` gets that group's β₂ as its factor retention. Each parameter is SOAP
    (``tests/reference/soap.py`` with ``shampoo_beta = -1``) with its own group's betas. Fails on: the tie
    resolved once for the whole optimizer (the second group's factors would decay at 0.8)."""
    shapes = [(5, 4), (4, 6)]
    gen = torch.Generator().manual_seed(_seed("tie-groups"))
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, 14)
    refs = [soap_reference([params[i]], [[g[i]] for g in grads], betas=betas, shampoo_beta=-1, precondition_frequency=3,
                           weight_decay=0.0) for i, betas in enumerate([(0.9, 0.8), (0.7, 0.6)])]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build([{"params": [ours[0]]}, {"params": [ours[1]], "inner.betas": [0.7, 0.6]}], "soap", lr=3e-3,
                        weight_decay=0.0, **{"factors.beta": "beta2", "inner.betas": [0.9, 0.8], "refresh.every": 3})
    history = run_history(opt, ours, grads)
    assert_histories_close([[h[0]] for h in history], refs[0])
    assert_histories_close([[h[1]] for h in history], refs[1])


@pytest.mark.parametrize(
    "factor_opts,inner,opts",
    [
        pytest.param({"variant": "parallel", "init": "sum"}, "adam", {"betas": (0.9, 0.99), "normalize": True},
                     id="parallel-sum-adam-normalize"),
        pytest.param({"variant": "ksl", "init": "kron_reference"}, "eigenvalue", {"momentum": 0.8, "exponent": -0.5, "eps": 1e-6},
                     id="ksl-kron-reference-eigenvalue"),
        pytest.param({"variant": "parallel", "init": "eps"}, "adam_rank1", {"betas": (0.5, 0.9), "bias_correction": False},
                     id="parallel-eps-rank1"),
    ],
)
def test_projector_splitting_options_with_other_inner_rules_against_the_float64_reference(factor_opts, inner, opts):
    """``projector_splitting``'s ``variant`` and ``init`` with a retention of its own (0.8) under inner rules and
    options no DyKAF preset uses (Shampoo's eigenvalue rule on DyKAF's factors, normalised Adam, the rank-one
    moment without bias correction), ``eigh`` refreshed every 3 updates with the first refresh at update 3:
    :class:`Pipeline64` with the dense integrators of ``tests/reference/dykaf``, 10 calls."""
    _check(("ps", factor_opts, inner), steps=10, inner=inner, opts=opts, factors="ps", beta_f=0.8, factor_opts=factor_opts,
           basis="eigh", every=3, lr=1e-2, wd=0.01)


DYKAF_KEYS = {"precondition_frequency": "refresh.every", "shampoo_beta": "factors.beta", "max_precond_dim": "shapes.max_dim",
              "variant": "factors.variant", "init": "factors.init", "one_sided": "factors.one_sided"}


@pytest.mark.parametrize(
    "preset,options,overrides",
    [
        pytest.param("dykaf", {"betas": (0.9, 0.85), "shampoo_beta": -1, "precondition_frequency": 3, "variant": "parallel",
                               "init": "eps"}, {"factors.beta": "beta2"}, id="beta2-tie-parallel-eps"),
        pytest.param("dykaf_rank1", {"betas": (0.8, 0.9), "shampoo_beta": 0.7, "precondition_frequency": 3, "init": "kron_reference",
                                     "max_precond_dim": 5, "one_sided": "sum"}, {}, id="rank1-one-sided-sum-kron-reference"),
        pytest.param("dykaf_rank1", {"betas": (0.9, 0.95), "shampoo_beta": -1, "precondition_frequency": 4, "variant": "parallel",
                                     "init": "sum"}, {"factors.beta": "beta2"}, id="rank1-beta2-tie-parallel-sum"),
    ],
)
def test_projector_splitting_options_combined_match_the_dykaf_reference(preset, options, overrides):
    """``projector_splitting`` options combined as ``tests/equivalence/test_dykaf.py`` does not, against
    ``tests/reference/dykaf.py`` (12 calls, a wide, a tall and a 1-D parameter): ``factors.beta = "beta2"`` is the
    authors' ``shampoo_beta = -1`` (the integrator's retention follows ``inner.betas[1]``), and the rank-one
    second moment (``rank1``) with ``one_sided = "sum"`` on a block whose long side passes ``max_dim`` and the
    authors' ``kron_reference`` start."""
    shapes = [(5, 4), (4, 6), (7,)]
    gen = torch.Generator().manual_seed(_seed("dykaf", preset, sorted(options)))
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, 12, first="single" if options["init"].startswith("kron") else "surplus")
    ref = dykaf_reference(params, grads, lr=3e-3, rank1=preset == "dykaf_rank1", **options)
    settings = {DYKAF_KEYS[k]: v for k, v in options.items() if k in DYKAF_KEYS}
    if options["shampoo_beta"] < 0:
        del settings["factors.beta"]
    settings.update({"inner.betas": list(options["betas"]), **overrides})
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours, preset, lr=3e-3, **settings)
    assert_histories_close(run_history(opt, ours, grads), ref)


def _power_triplet(G: torch.Tensor, iters: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The documented power solver (``kronopt.linalg.top_singular_triplet_power``'s docstring), written here:
    ``v₀ ∝ (‖G_{:,j}‖²)_j + 1``, then ``u ← Gv/‖Gv‖``, ``v ← Gᵀu/‖Gᵀu‖``, ``σ = ‖Gᵀu‖``."""
    v = G.pow(2).sum(0) + 1
    v = v / v.norm()
    for _ in range(iters):
        u = G @ v
        u = u / u.norm()
        w = G.T @ u
        sigma = w.norm()
        v = w / sigma
    return sigma, u, v


@pytest.mark.parametrize("init", ["kron", "kron_reference"])
@pytest.mark.parametrize("iters", [1, 3, 60])
def test_projector_splitting_power_init_solver_builds_the_documented_start(init, iters):
    """``init_solver = "power"`` with ``power_iters`` = k: after the first call the factors are the ``kron``
    start (``√(1−β)σ₁u₁u₁ᵀ``, ``√(1−β)σ₁v₁v₁ᵀ``; ``kron_reference``: ``√σ₁`` per factor, then ``G₁`` fed through
    the KSL step) built from k power iterations of the documented start; with enough of them, from the SVD
    triplet (``tests/reference/dykaf.kron_init``). A first gradient with a clear gap σ₁/σ₂ = 3. Fails on:
    ``power_iters`` ignored, the SVD used whatever ``init_solver`` says, σ₁ and √σ₁ swapped."""
    gen = torch.Generator().manual_seed(_seed("power-init"))
    U0 = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64)).Q
    V0 = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64)).Q
    G = U0[:, :4] @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64)) @ V0.T
    beta = 0.9
    p = torch.nn.Parameter(torch.zeros(6, 4, dtype=F64))
    opt = kronopt.build([p], "dykaf", **{"factors.init_solver": "power", "factors.power_iters": iters, "factors.beta": beta,
                                         "factors.init": init})
    p.grad = G.clone()
    opt.step()
    sigma, u, v = _power_triplet(G, iters)
    scale = math.sqrt(1 - beta) * sigma if init == "kron" else sigma.sqrt()
    L, R = scale * torch.outer(u, u), scale * torch.outer(v, v)
    if init == "kron_reference":
        L, R = ksl_dense(L, R, G, beta)
    torch.testing.assert_close(opt.state[p]["factors.L"], L, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["factors.R"], R, rtol=1e-10, atol=1e-12)
    L_svd, R_svd = kron_init(G, beta, init)
    if init == "kron_reference":
        L_svd, R_svd = ksl_dense(L_svd, R_svd, G, beta)
    if iters == 60:  # converged: the SVD's start
        torch.testing.assert_close(opt.state[p]["factors.L"], L_svd, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["factors.R"], R_svd, rtol=1e-10, atol=1e-12)
    else:  # not yet: the solver really is the power iteration
        assert (opt.state[p]["factors.L"] - L_svd).abs().max() > 1e-6


@pytest.mark.parametrize(
    "basis_opts,inner,opts,factor_opts",
    [
        pytest.param({"sort": True}, "eigenvalue", {"momentum": 0.7, "exponent": -0.25, "eps": 1e-6}, {},
                     id="sorted-qr-eigenvalue-exp-1/4"),
        pytest.param({"sort": True, "power_steps": 2}, "eigenvalue",
                     {"momentum": 0.9, "exponent": -0.5, "eps": 1e-8, "eps_placement": "product", "bias_correction": False,
                      "momentum_basis": "eigen"}, {"damping": 1e-3, "init_factor": 1.0}, id="sorted-qr-2-steps-damped"),
        pytest.param({"sort": True}, "adam", {"betas": (0.9, 0.98), "eps_placement": "before_correction"},
                     {"clamping": False}, id="sorted-qr-kl-soap-bias-corrected"),
        pytest.param({"sort": False}, "adam_rank1", {"betas": (0.0, 0.9), "normalize": True}, {"max_clamp": 2.0, "init_factor": 0.01},
                     id="unsorted-qr-rank1"),
    ],
)
def test_kl_factors_with_other_bases_and_inner_options_against_the_float64_reference(basis_opts, inner, opts, factor_opts):
    """``kl`` factors (kl_shampoo.md §5–§6) with options and stages its presets do not combine: a **sorted** ``qr``
    basis (the tracked eigenvalues must follow the column permutation, docs/stages.md ``kl``), two power steps,
    damping, no clamping or a low clamp, a bias-corrected KL-SOAP, the rank-one moment: :class:`Pipeline64`, 12
    calls on a square block (first call builds the basis, SOAP order). Where the sort moves columns the test
    asserts that it did. Fails on: the tracked roots left in place when the columns move, damping taken from
    the wrong side's roots, the clamp ``max(10, min(d, c_max))`` misread."""
    ref = _check(("kl", basis_opts, inner), shape=(4, 4), steps=12, inner=inner, opts=opts, factors="kl", beta_f=0.9,
                 factor_opts=factor_opts, basis="qr", every=3, skip_first_call=True, at_first_call=True, wd=0.01,
                 wd_order="after", **basis_opts)
    if basis_opts["sort"]:
        assert ref.permutations > 0


KL_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "precondition_frequency": "refresh.every",
           "normalize_grads": "post.normalize", "shampoo_beta": "factors.beta", "init_factor": "factors.init_factor",
           "using_clamping": "factors.clamping", "max_clamp_value": "factors.max_clamp", "max_precond_dim": "shapes.max_dim"}


@pytest.mark.parametrize(
    "options",
    [
        {"using_damping": True, "eps": 1e-2, "max_precond_dim": 5, "init_factor": 1.0, "precondition_frequency": 3},
        {"using_clamping": False, "normalize_grads": True, "shampoo_beta": 0.5, "betas": (0.0, 0.9), "precondition_frequency": 4},
        {"max_clamp_value": 1.0, "init_factor": 10.0, "using_damping": True, "eps": 1e-3, "precondition_frequency": 2},
    ],
    ids=["damped-one-side-unrotated", "unclamped-normalized-no-momentum", "lowest-clamp-damped"],
)
@pytest.mark.parametrize("klsoap", [False, True], ids=["kl_shampoo", "kl_soap"])
def test_kl_presets_at_combined_non_default_options_match_the_kl_reference(options, klsoap):
    """KL-Shampoo and KL-SOAP with options combined as ``tests/equivalence/test_kl.py`` does not: damping on a
    block with one side left unrotated (its ``s ≡ 1`` enters the other side's damping as mean 1), no momentum
    (β₁ = 0) with a low factor retention and no clamping, the lowest clamp ``c_max = 1`` (so ``c = 10``) with a
    large ``init_factor``: ``tests/reference/kl_shampoo.py``, 20 calls on four shapes."""
    shapes = [(6, 4), (4, 6), (5, 5), (3, 7)]
    gen = torch.Generator().manual_seed(_seed("kl", sorted(options), klsoap))
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, 20)
    ref = kl_reference(params, grads, lr=1e-3, using_klsoap=klsoap, **options)
    betas, eps = options.get("betas", (0.9, 0.98)), options.get("eps", 1e-8)
    overrides = {KL_KEYS[k]: v for k, v in options.items() if k in KL_KEYS}
    overrides.setdefault("factors.beta", betas[1])
    overrides.update({"lr": 1e-3, "factors.damping": eps if options.get("using_damping") else 0.0, "inner.eps": eps})
    overrides.update({"inner.betas": list(betas)} if klsoap else {"inner.momentum": betas[0]})
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(ours)], "kl_soap" if klsoap else "kl_shampoo",
                        **overrides)
    history = run_history(opt, ours, grads)
    assert not torch.equal(history[-1][0], params[0])
    assert_histories_close(history, ref)
