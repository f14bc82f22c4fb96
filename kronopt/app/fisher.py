r"""The Fisher-approximation lab: how closely each factor estimator tracks the empirical Fisher.

For a stream of gradients :math:`G_1, \dots, G_T` (``m × n``) the target is the EMA

.. math::
    F_0 = 0,\qquad F_t = \beta F_{t-1} + (1-\beta)\,\mathrm{vec}\,G_t\,\mathrm{vec}\,G_t^\top

(row-major vec; the quantity SOAP's EMA factors and DyKAF's default start both
target). Any registered factor estimator is driven through the stage API
(:func:`track`) and its :math:`L \otimes R` is compared with :math:`F_t` and with the
exact nearest Kronecker product :math:`K^*_t` (SVD of the rearrangement for small
blocks, matrix-free power iteration beyond; :mod:`kronopt.linalg`). Metrics
(:func:`fisher_metrics`):

* ``e``: :math:`\|F - L\otimes R\|_F/\|F\|_F`; ``e_s``: the same after the best scalar rescaling;
* ``e_nkp``: the floor, :math:`\|F - K^*\|_F/\|F\|_F`;
* ``gap``: :math:`\|L\otimes R - K^*\|_F/\|K^*\|_F`; ``gap_s``: the same after the best scalar
  rescaling of :math:`L\otimes R` (EMA factors are off in scale by about ``mn``).

Each is computed so that an exact fit reads at rounding (about 1e-16), not at the 1e-8 that
differences of squares under a square root bottom out at (:func:`fisher_metrics` says how).

Gradient sources (:func:`gradient_stream`): ``iid``, ``anisotropic`` (0.3·A Z B + Z′),
``mixture`` (two Kronecker structures), and ``real``: per-example gradients of a linear
softmax classifier learning the class of the next byte from the bits of the previous
two bytes of the source text of Python's standard library (read deterministically,
present on every Python install). :func:`hessian_experiment` compares the
preconditioners of presets with the exact Hessian of that classifier (DyKAF spec §14).

Command line: ``kronopt fisher --out DIR`` (see ``kronopt fisher --help``).
"""

import argparse
import csv
import json
import math
import sysconfig
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

import kronopt
from kronopt import linalg
from kronopt.inspection import bucket_views
from kronopt.bases import EighBasis
from kronopt.registry import FACTORS, SLOTS, PluginError, PluginLoadError
from kronopt.types import Layout, StepContext, capabilities

from . import _args
from ._extras import MissingExtraError, pyplot

SOURCES: tuple[str, ...] = ("iid", "anisotropic", "mixture", "real")
DEFAULT_ESTIMATORS: tuple[str, ...] = ("ema", "projector_splitting", "projector_splitting:variant=parallel")
#: blocks with both sides at most this long get the dense SVD; larger ones the power iteration
DENSE_MAX: int = 32

#: the real data set: 16 features (bits of the previous two bytes), 8 classes of the next byte
FEATURES: int = 16
CLASSES: int = 8


# -- driving an estimator ---------------------------------------------------------------------------------


def parse_estimator(spec: str) -> tuple[str, dict[str, Any]]:
    """``"key:opt=value:opt=value"`` → ``(key, options)``; values are TOML values or bare strings."""
    key, *parts = spec.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        name, sep, text = part.partition("=")
        if not sep:
            raise ValueError(f"estimator option {part!r} in {spec!r} is not NAME=VALUE")
        try:
            options[name] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            options[name] = text
    return key, options


def track(name: str, grads: Sequence[Tensor], **options: Any) -> list[tuple[Tensor, Tensor]]:
    """Drive the registered factor estimator ``name`` over ``grads`` and return ``(L, R)`` after each.

    The estimator is built from its registry key and ``options`` (validated like a
    config), given a layout of one ``m × n`` block with both sides rotated, and stepped
    through its stage API. An estimator that reads the basis (KL-Shampoo) gets an
    :class:`~kronopt.bases.EighBasis` of its own factors, refreshed after every update;
    one that tracks its own eigenvalues passes them on as the step context does.

    Args:
        name: a key of :data:`kronopt.registry.FACTORS` (``"ema"``, ``"projector_splitting"``).
        grads: ``m × n`` gradients, all of one dtype.
        options: the estimator's fields.

    Returns:
        ``(L (m m), R (n n))`` after each gradient, so that ``L ⊗ R`` (row-major vec)
        estimates the Fisher.
    """
    est = FACTORS.get(name)(**options)
    if not capabilities(est).provides_factors:
        raise ValueError(f"factor estimator {name!r} keeps no factors; nothing to compare")
    m, n = grads[0].shape
    dtype, device = grads[0].dtype, grads[0].device
    layout = Layout(batch=1, m=m, n=n, left="full", right="full")
    basis_stage = EighBasis()
    basis = basis_stage.init(layout, dtype=dtype, device=device)
    state = est.init(layout, dtype=dtype, device=device)
    out = []
    own = capabilities(est).provides_eigvals  # the estimator's eigenvalues, else the basis's
    for t, G in enumerate(grads):  # the first gradient is the estimator's first call (ctx.step == 0), as in
        eigvals = est.eigvals(state) if own else (basis.lam_L, basis.lam_R)  # the optimizer (skip_first_call)
        ctx = StepContext(step=t, layout=layout, basis=basis, eigvals=eigvals, eigvals_from_basis=not own)
        state = est.update(state, G.unsqueeze(0), ctx)
        L, R = est.factors(state)
        basis, _ = basis_stage.refresh(basis, (L, R), ctx)
        out.append((L[0].clone(), R[0].clone()))
    return out


# -- metrics ------------------------------------------------------------------------------------------------


def _layout(cfg: Any, m: int, n: int) -> Layout:
    """One ``m × n`` block's layout as the optimizer gives it under ``cfg`` (:meth:`KronConfig.block`: a
    restricted side of pro_soap's, a side longer than ``shapes.max_dim`` not rotated)."""
    return attrs.evolve(cfg.block((m, n))[1], batch=1)


def ema_weights(t: int, beta: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Weights :math:`w_i = (1-\beta)\beta^{t-i}`, ``i = 1..t``, of :math:`F_t`."""
    i = torch.arange(1, t + 1, dtype=dtype)
    return (1 - beta) * beta ** (t - i)


def exact_nkp(grads: Tensor, weights: Tensor, *, dense_max: int = DENSE_MAX) -> linalg.NearestKron:
    r"""Exact NKP of :math:`F = \sum_i w_i \mathrm{vec} G_i \mathrm{vec} G_i^\top`: dense SVD or power iteration."""
    T, m, n = grads.shape
    if max(m, n) <= dense_max:
        g = grads.reshape(T, m * n)
        F = g.mT @ (weights.unsqueeze(-1) * g)
        return linalg.nearest_kron_dense(linalg.sym(F.unsqueeze(0)), m, n)
    return linalg.nearest_kron_power(grads, weights, iters=2000, tol=1e-12)


def fisher_metrics(
    grads: Tensor, weights: Tensor, L: Tensor, R: Tensor, nkp: linalg.NearestKron, *, dense_max: int = DENSE_MAX
) -> dict[str, float]:
    r"""``e``, ``e_s``, ``e_nkp``, ``gap``, ``gap_s`` of ``L ⊗ R`` against :math:`F = \sum w_i\,\mathrm{vec}G_i\mathrm{vec}G_i^\top`.

    Each is the norm of a difference, and each is formed so that a value near 0 reads near 0 (an exact fit
    about 1e-16, not the 1e-8 that :math:`\sqrt{\|F\|^2 - 2\langle F, K\rangle + \|K\|^2}` bottoms out at, the
    rounding of the squares it subtracts):

    * ``gap`` and ``gap_s`` compare two Kronecker products, which need no :math:`F`. With unit
      :math:`\hat L, \hat U` signed so that :math:`\langle\hat L, \hat U\rangle \ge 0`,
      :math:`L\otimes R - \sigma U\otimes V = \delta\otimes B + \hat U\otimes(B - D)`
      (:math:`\delta = \hat L - \hat U`, :math:`B, D` the right factors carrying the scales), so
      :math:`\|\cdot\|^2 = \|\delta\|^2\|B\|^2 - \|\delta\|^2\langle B, B - D\rangle + \|B - D\|^2`, whose middle
      term is at most :math:`\|\delta\|/2` of the other two (no cancellation near 0); ``gap_s`` is the
      sine of the angle between the products,
      :math:`\sqrt{\sin^2\theta_L + \cos^2\theta_L\sin^2\theta_R}`, each sine
      :math:`\|\hat x - \hat y\|\,\|\hat x + \hat y\|/2`.
    * ``e``, ``e_s`` and ``e_nkp`` need :math:`F - K` itself. Where both sides are at most ``dense_max``
      long (the sizes whose exact NKP forms :math:`F` anyway, :func:`exact_nkp`) the differences are formed,
      :math:`F` a block of rows at a time (blocks of at most :data:`ROW_BLOCK` entries, never the whole): cost
      :math:`O(T m^2 n^2)`. Beyond, :math:`F` is never formed and the expanded norms
      :math:`\|F\|^2 = \sum_{ij} w_iw_j\langle G_i,G_j\rangle^2`,
      :math:`\langle F, L\otimes R\rangle = \sum_i w_i\langle L, G_iRG_i^\top\rangle` are used (cost
      :math:`O(T^2mn + Tmn(m+n))`), unless one of the three reads below :data:`EXPANDED_FLOOR`, where they
      have lost half their digits: then the differences are formed as above after all.

    The scale :math:`c = \langle F, K\rangle/\|K\|^2` of ``e_s`` and the norms divided by are sums without
    cancellation in either form.
    """
    T, m, n = grads.shape
    g = grads.reshape(T, -1)
    gram = g @ g.mT
    F2 = float(weights @ gram.square() @ weights)
    GRG = linalg.sandwich(grads, R.expand(T, *R.shape))
    FK = float((weights * (GRG * L).sum((-2, -1))).sum())
    K2 = float(L.square().sum() * R.square().sum())
    sigma = float(nkp.sigma[0])
    U, V = nkp.U[0], nkp.V[0]
    scale = FK / K2 if K2 > 0 else 0.0
    expanded = {
        "e": math.sqrt(max(F2 - 2 * FK + K2, 0.0) / F2),
        "e_s": math.sqrt(max(1 - FK**2 / (F2 * K2), 0.0)) if K2 > 0 else 1.0,
        "e_nkp": math.sqrt(max(F2 - sigma**2, 0.0) / F2),
    }
    if max(m, n) <= dense_max or min(expanded.values()) < EXPANDED_FLOOR:
        norm_F = math.sqrt(F2)
        terms = [(1.0, L, R), (scale, L, R), (sigma, U, V)]
        e, e_s, e_nkp = (d / norm_F for d in _distances_to_fisher(grads, weights, terms))
        fit = {"e": e, "e_s": e_s if K2 > 0 else 1.0, "e_nkp": e_nkp}
    else:
        fit = expanded
    norm_Ks = sigma * float(U.norm() * V.norm())
    gap = _kron_distance(L, R, sigma * U, V) / norm_Ks
    gap_s = _kron_sine(L, R, U, V) if K2 > 0 else 1.0
    return {**fit, "gap": gap, "gap_s": gap_s}


#: the most entries in one block of rows of :math:`F` (or of a Kronecker product) that :func:`fisher_metrics` forms:
#: 16 MiB in float64, a few such blocks alive at once
ROW_BLOCK: int = 1 << 21
#: an expanded-norm metric below this has lost about half its digits (float64): it is formed directly instead
EXPANDED_FLOOR: float = 1e-4


def _distances_to_fisher(grads: Tensor, weights: Tensor, terms: Sequence[tuple[float, Tensor, Tensor]]) -> list[float]:
    r""":math:`\|F - c\,A\otimes B\|_F` for each ``(c, A (m m), B (n n))``, :math:`F` formed a block of rows at a time.

    Row :math:`(a, b)` of :math:`F` (row-major vec) is :math:`\sum_t w_t G_t[a, b]\,\mathrm{vec}\,G_t`, and of
    :math:`A\otimes B` it is :math:`A[a, :]\otimes B[b, :]`; each block is a sum of squares, so nothing cancels.
    """
    T, m, n = grads.shape
    rows = max(1, ROW_BLOCK // (n * m * n))
    weighted = weights.view(-1, 1, 1) * grads
    flat = grads.reshape(T, m * n)
    sums = [0.0] * len(terms)
    for a0 in range(0, m, rows):
        a1 = min(m, a0 + rows)
        block = (weighted[:, a0:a1].reshape(T, -1).mT @ flat).reshape(a1 - a0, n, m, n)  # (a b) (c d)
        for j, (c, A, B) in enumerate(terms):
            kron = A[a0:a1, None, :, None] * B[None, :, None, :]  # A[a, c] B[b, d]
            sums[j] += float(torch.linalg.vector_norm(block - c * kron) ** 2)
    return [math.sqrt(x) for x in sums]


def _kron_distance(A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> float:
    r""":math:`\|A\otimes B - C\otimes D\|_F` without subtracting squares (:func:`fisher_metrics` derives it)."""
    a, c = float(A.norm()), float(C.norm())
    if a == 0 or c == 0:
        return a * float(B.norm()) + c * float(D.norm())
    A_unit, C_unit = A / a, C / c
    sign = -1.0 if float((A_unit * C_unit).sum()) < 0 else 1.0
    delta = float((sign * A_unit - C_unit).square().sum())
    B_s, D_s = (sign * a) * B, c * D
    diff = B_s - D_s
    total = delta * float(B_s.square().sum()) - delta * float((B_s * diff).sum()) + float(diff.square().sum())
    return math.sqrt(max(total, 0.0))


def _sine(X: Tensor, Y: Tensor) -> tuple[float, float]:
    r"""``(sin, |cos|)`` of the angle between nonzero ``X`` and ``Y``, the sine as
    :math:`\|\hat x - \hat y\|\,\|\hat x + \hat y\|/2`: accurate near 0, where :math:`\sqrt{1 - \cos^2}` is not."""
    x, y = X / X.norm(), Y / Y.norm()
    return float((x - y).norm() * (x + y).norm()) / 2, abs(float((x * y).sum()))


def _kron_sine(L: Tensor, R: Tensor, U: Tensor, V: Tensor) -> float:
    r"""Sine of the angle between :math:`L\otimes R` and :math:`U\otimes V`:
    :math:`\sqrt{\sin^2\theta_L + \cos^2\theta_L\,\sin^2\theta_R}` (its cosine is :math:`\cos\theta_L\cos\theta_R`)."""
    sin_L, cos_L = _sine(L, U)
    sin_R, _ = _sine(R, V)
    return min(1.0, math.sqrt(sin_L**2 + (cos_L * sin_R) ** 2))


# -- gradient sources ---------------------------------------------------------------------------------------


_STDLIB_CACHE: dict[int, bytes] = {}


def stdlib_text(limit: int = 400_000) -> bytes:
    """The first ``limit`` bytes of the standard library's top-level ``*.py`` files, in sorted order."""
    if limit not in _STDLIB_CACHE:
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks, size = [], 0
        for path in sorted(root.glob("*.py")):
            data = path.read_bytes()
            chunks.append(data)
            size += len(data)
            if size >= limit:
                break
        text = b"".join(chunks)[:limit]
        if len(text) < 1000:
            raise RuntimeError(f"found too little Python source under {root} to build the data set")
        _STDLIB_CACHE[limit] = text
    return _STDLIB_CACHE[limit]


def byte_class(c: int) -> int:
    """One of 8 classes: space, newline, lowercase, uppercase, digit, underscore/dot, bracket/quote, other."""
    ch = chr(c)
    if ch == " ":
        return 0
    if ch == "\n":
        return 1
    if "a" <= ch <= "z":
        return 2
    if "A" <= ch <= "Z":
        return 3
    if "0" <= ch <= "9":
        return 4
    if ch in "_.":
        return 5
    if ch in "()[]{}'\"":
        return 6
    return 7


def byte_dataset(rows: int, *, classes: int = CLASSES, limit: int = 400_000) -> tuple[Tensor, Tensor]:
    """``X (rows 16)``, ``y (rows)``: ±1/4 bits of the previous two bytes → class of the next byte (mod ``classes``).

    Rows are spread evenly over the text (deterministic).
    """
    text = stdlib_text(limit)
    positions = torch.linspace(2, len(text) - 1, rows).long().tolist()
    X = torch.empty(rows, FEATURES, dtype=torch.float64)
    y = torch.empty(rows, dtype=torch.int64)
    for r, p in enumerate(positions):
        bits = [(text[p - 2] >> k) & 1 for k in range(8)] + [(text[p - 1] >> k) & 1 for k in range(8)]
        X[r] = torch.tensor(bits, dtype=torch.float64) * 0.5 - 0.25
        y[r] = byte_class(text[p]) % classes
    return X, y


def gradient_stream(source: str, m: int, n: int, steps: int, *, seed: int = 0) -> list[Tensor]:
    """``steps`` float64 gradients of one source (``real`` is always ``8 × 16``)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if source == "iid":
        return [randn(m, n) for _ in range(steps)]
    if source == "anisotropic":
        A, B = randn(m, m), randn(n, n)
        return [0.3 * A @ randn(m, n) @ B + randn(m, n) for _ in range(steps)]
    if source == "mixture":
        A1, B1 = randn(m, m) / math.sqrt(m), randn(n, n) / math.sqrt(n)
        A2 = torch.diag(torch.logspace(0, 1, m, dtype=torch.float64)).flip(0)
        B2 = torch.diag(torch.logspace(0, 1, n, dtype=torch.float64))
        out = []
        for _ in range(steps):  # step t's coin drawn with it: the first t gradients never depend on how many follow
            c = float(torch.rand((), generator=gen))
            out.append((A1 if c < 0.5 else A2) @ randn(m, n) @ (B1 if c < 0.5 else B2))
        return out
    if source == "real":
        return _real_stream(steps, gen)
    raise ValueError(f"unknown source {source!r}; sources: {', '.join(SOURCES)}")


def _real_stream(steps: int, gen: torch.Generator, *, lr: float = 0.5) -> list[Tensor]:
    """Per-example gradients ``(p − y) xᵀ`` of a linear softmax classifier trained online by SGD."""
    X, y = byte_dataset(4000)
    W = torch.zeros(CLASSES, FEATURES, dtype=torch.float64)
    out = []
    for i in torch.randint(len(y), (steps,), generator=gen).tolist():
        p = torch.softmax(W @ X[i], dim=0)
        p[y[i]] -= 1.0
        G = torch.outer(p, X[i])
        out.append(G)
        W = W - lr * G
    return out


# -- the lab ------------------------------------------------------------------------------------------------


def run_lab(
    *,
    sources: Sequence[str] = SOURCES,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    checkpoints: Sequence[int] = (10, 50, 100, 200),
    m: int = 8,
    n: int = 12,
    beta: float = 0.95,
    seed: int = 0,
    curve_points: int = 60,
    dense_max: int = DENSE_MAX,
) -> dict[str, Any]:
    """Every estimator on every source: rows at the checkpoints and curves of ``gap_s`` and ``e_s``."""
    T = max(checkpoints)
    curve_steps = sorted({*checkpoints, *(max(1, round(T * k / curve_points)) for k in range(1, curve_points + 1))})
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for source in sources:
        grads = torch.stack(gradient_stream(source, m, n, T, seed=seed))
        nkps = {t: exact_nkp(grads[:t], ema_weights(t, beta), dense_max=dense_max) for t in curve_steps}
        curves[source] = {}
        for spec in estimators:
            key, options = parse_estimator(spec)
            if "beta" in {a.name for a in _fields(key)}:
                options.setdefault("beta", beta)
            history = track(key, list(grads), **options)
            curve: dict[str, list[float]] = {"step": [], "gap_s": [], "e_s": [], "e_nkp": []}
            for t in curve_steps:
                L, R = history[t - 1]
                met = fisher_metrics(grads[:t], ema_weights(t, beta), L, R, nkps[t], dense_max=dense_max)
                curve["step"].append(t)
                for k in ("gap_s", "e_s", "e_nkp"):
                    curve[k].append(met[k])
                if t in checkpoints:
                    rows.append({"source": source, "estimator": spec, "T": t, **met})
            curves[source][spec] = curve
    shape = {"m": CLASSES, "n": FEATURES} if list(sources) == ["real"] else {"m": m, "n": n}
    return {"config": {"beta": beta, "seed": seed, **shape, "checkpoints": list(checkpoints)}, "rows": rows, "curves": curves}


def _fields(key: str) -> tuple[Any, ...]:
    import attrs

    return attrs.fields(FACTORS.get(key))


# -- the Hessian experiment ---------------------------------------------------------------------------------


def exact_hessian_rearranged(W: Tensor, X: Tensor) -> Tensor:
    r""":math:`\mathcal R(H)` for mean softmax cross-entropy of ``z = W x``: ``(C² d²)``.

    .. math::
        H = \frac1N\sum_i (\mathrm{diag}\,p_i - p_ip_i^\top)\otimes x_ix_i^\top,\qquad
        \mathcal R(H) = \frac1N\sum_i \mathrm{vec}(\mathrm{diag}\,p_i - p_ip_i^\top)\,\mathrm{vec}(x_ix_i^\top)^\top

    (one GEMM; the row-major vec is class-major, as the optimizer's blocks).
    """
    P = torch.softmax(X @ W.mT, dim=-1)
    A = torch.diag_embed(P) - P.unsqueeze(-1) * P.unsqueeze(-2)
    XX = X.unsqueeze(-1) * X.unsqueeze(-2)
    return A.reshape(len(X), -1).mT @ XX.reshape(len(X), -1) / len(X)


def _kron_metrics(RH: Tensor, vecL: Tensor, vecR: Tensor, floor: float) -> dict[str, float]:
    """Raw squared difference and scale-free error of a rank-one ``vec L vec Rᵀ`` against ``R(H)``: the difference
    formed (``R(H)`` is ``c² × d²``, small), the error as :func:`_sine`, so neither subtracts squares (an exact fit
    reads rounding, not its square root)."""
    K = torch.outer(vecL, vecR)
    return {"diff2": float((RH - K).square().sum()), "e_s": _scale_free_error(RH, K), "floor": floor}


def _scale_free_error(H: Tensor, K: Tensor) -> float:
    r""":math:`\sqrt{1 - \langle H, K\rangle^2 / (\|H\|^2 \|K\|^2)}`, the sine of the angle between ``H`` and ``K``
    (:func:`_sine`, accurate near 0); 1 where either is zero."""
    return _sine(H, K)[0] if float(H.norm()) > 0 and float(K.norm()) > 0 else 1.0


def nkp_floor(RH: Tensor) -> float:
    r"""The best rank-one fit's relative error to ``R(H)``, :math:`\sqrt{\sum_{i \ge 2} \sigma_i^2} / \|R(H)\|_F`, from
    its singular values (not :math:`\|R(H)\|^2 - \sigma_1^2`, which loses half the digits of a near-Kronecker ``H``)."""
    sigma = torch.linalg.svdvals(RH)
    total = float(sigma.norm())
    return float(sigma[1:].norm()) / total if total > 0 else 0.0


def hessian_settings(lr: float, options: dict[str, Any]) -> dict[str, Any]:
    """The overrides every optimizer of :func:`hessian_experiment` runs with, its own ``options`` last."""
    return {"inner.betas": [0.9, 0.999], "factors.beta": 0.999, "refresh.every": 10, "weight_decay": 0.0, "lr": lr,
            **options}


def hessian_lacks(cfg: Any) -> list[str]:
    """Why ``cfg``'s stages cannot take the keys of :func:`hessian_settings`, one phrase per key they lack
    (``"factors.beta, which its factors 'none' lack"`` for AdamW, ``"inner.betas, which its inner 'eigenvalue'
    lacks"`` for Shampoo)."""
    lacking = []
    for key in hessian_settings(0.01, {}):
        slot, dot, field = key.partition(".")
        if not dot:
            continue
        stage = getattr(cfg, slot)
        if field not in attrs.fields_dict(type(stage)):
            kind = SLOTS[slot].key_of(type(stage))
            lacking.append(f"{key}, which its {slot} {kind!r} {'lack' if slot.endswith('s') else 'lacks'}")
    return lacking


def hessian_presets() -> list[str]:
    """The presets :func:`hessian_experiment` takes: those whose stages have every key of :func:`hessian_settings`
    and that keep both sides of the classifier's weight in full."""
    names = []
    for name, cfg in kronopt.PRESETS.items():
        if hessian_lacks(cfg):
            continue
        layout = _layout(kronopt.resolve(cfg, **hessian_settings(0.01, {})), CLASSES, FEATURES)
        if (layout.left, layout.right) == ("full", "full"):
            names.append(name)
    return names


def hessian_experiment(
    optimizers: Sequence[str] = ("soap", "dykaf", "dykaf:factors.variant=parallel"),
    *,
    rows: int = 4000,
    classes: int = CLASSES,
    batch: int = 100,
    epochs: int = 5,
    lrs: Sequence[float] = (1e-2,),
    seed: int = 0,
) -> dict[str, Any]:
    r"""Train the linear softmax classifier with each optimizer and compare its preconditioner with the exact Hessian.

    Each optimizer runs the pipeline (:func:`kronopt.compose.step`) on the single
    ``classes × 16`` block in float64 with the spec's settings (betas (0.9, 0.999),
    factor β 0.999, refresh every 10, no weight decay); after every step it records,
    against the exact Hessian over the training rows, the factor form ``L ⊗ R`` and the
    eigen-corrected form :math:`(Q_L\otimes Q_R)\,\mathrm{diag}(\mathrm{vec}\,\hat V)(Q_L\otimes Q_R)^\top`.

    Returns:
        ``{"runs": [...], "final": [...]}`` with per-step ``diff2`` (raw squared
        Frobenius difference), ``e_s`` (scale-free) and the NKP floor.
    """
    import kronopt
    from kronopt import compose

    X, y = byte_dataset(rows, classes=classes)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=gen)
    n_train, n_val = int(0.7 * rows), int(0.2 * rows)
    train, val = order[:n_train], order[n_train : n_train + n_val]
    bound = math.sqrt(6.0 / (classes + FEATURES))
    W0 = (torch.rand(classes, FEATURES, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    batches = [train[i : i + batch] for e in range(epochs) for i in range(0, n_train, batch)]
    runs, final = [], []
    for spec in optimizers:
        name, options = parse_estimator(spec)
        for lr in lrs:
            cfg = kronopt.resolve(name, **hessian_settings(lr, options)).bound()
            layout = _layout(cfg, classes, FEATURES)
            state = compose.init_state(cfg, layout, dtype=torch.float64, device=torch.device("cpu"))
            W = W0.clone()
            curve: dict[str, list[float]] = {"step": [], "factor_diff2": [], "factor_e_s": [], "eigen_diff2": [],
                                             "eigen_e_s": [], "floor": []}
            for k, idx in enumerate(batches, start=1):
                xb, yb = X[idx], y[idx]
                P = torch.softmax(xb @ W.mT, dim=-1)
                P[torch.arange(len(idx)), yb] -= 1.0
                G = P.mT @ xb / len(idx)
                D, state = compose.step(cfg, layout, state, G.unsqueeze(0))
                if D is not None:
                    W = W - lr * D[0]
                RH = exact_hessian_rearranged(W, X[train])
                floor = nkp_floor(RH)
                L, R = cfg.factors.factors(state.factors)
                fac = _kron_metrics(RH, L[0].reshape(-1), R[0].reshape(-1), floor)
                eig = _eigen_metrics(cfg, layout, state, RH, floor)
                curve["step"].append(k)
                curve["factor_diff2"].append(fac["diff2"])
                curve["factor_e_s"].append(fac["e_s"])
                curve["eigen_diff2"].append(eig["diff2"])
                curve["eigen_e_s"].append(eig["e_s"])
                curve["floor"].append(floor)
            acc = float((torch.argmax(X[val] @ W.mT, dim=-1) == y[val]).double().mean())
            runs.append({"optimizer": spec, "lr": lr, "val_accuracy": acc, "curve": curve})
            final.append({"optimizer": spec, "lr": lr, "val_accuracy": acc,
                          **{k: v[-1] for k, v in curve.items() if k != "step"}})
    return {"config": {"rows": rows, "classes": classes, "features": FEATURES, "batch": batch, "epochs": epochs},
            "runs": runs, "final": final}


def _eigen_metrics(cfg: Any, layout: Layout, state: Any, RH: Tensor, floor: float) -> dict[str, float]:
    r"""Metrics of :math:`(Q_L\otimes Q_R)\mathrm{diag}(\mathrm{vec}\hat V)(Q_L\otimes Q_R)^\top` against ``H``."""
    view = bucket_views(cfg, layout, state, ["W"], "main")[0]
    if view.second_moment is None:  # the inner rule keeps no second moment
        return {"diff2": float("nan"), "e_s": float("nan"), "floor": floor}
    V = view.second_moment
    beta2 = cfg.inner.betas[1]
    t = max(state.step, 1)
    V = V / (1 - beta2**t)
    Q_L, Q_R = view.left.basis, view.right.basis
    Q = torch.kron(Q_L, Q_R)
    H_hat = (Q * V.reshape(-1)) @ Q.mT
    c, d = Q_L.shape[0], Q_R.shape[0]
    H = _unrearrange(RH, c, d)
    return {"diff2": float((H - H_hat).square().sum()), "e_s": _scale_free_error(H, H_hat), "floor": floor}


def _unrearrange(RA: Tensor, m: int, n: int) -> Tensor:
    """Inverse of :func:`kronopt.linalg.rearrange_kron` for one ``(m² n²)`` matrix."""
    return RA.reshape(m, m, n, n).movedim(1, 2).reshape(m * n, m * n)


# -- output -------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = f"{'source':<12} {'estimator':<38} {'T':>5} {'e':>9} {'e_s':>7} {'e_nkp':>7} {'gap':>9} {'gap_s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['source']:<12} {r['estimator']:<38} {r['T']:>5} {r['e']:>9.3g} {r['e_s']:>7.4f} {r['e_nkp']:>7.4f} "
            f"{r['gap']:>9.3g} {r['gap_s']:>7.4f}"
        )
    return "\n".join(lines)


def format_hessian(final: Sequence[dict[str, Any]]) -> str:
    header = f"{'optimizer':<32} {'lr':>7} {'val acc':>8} {'‖H−L⊗R‖²':>11} {'e_s(L⊗R)':>10} {'‖H−Ĥ_E‖²':>11} {'e_s(Ĥ_E)':>9} {'floor':>7}"
    lines = [header, "-" * len(header)]
    for r in final:
        lines.append(
            f"{r['optimizer']:<32} {r['lr']:>7.3g} {r['val_accuracy']:>8.3f} {r['factor_diff2']:>11.4g} "
            f"{r['factor_e_s']:>10.4f} {r['eigen_diff2']:>11.4g} {r['eigen_e_s']:>9.4f} {r['floor']:>7.4f}"
        )
    return "\n".join(lines)


def write_outputs(out: Path, lab: dict[str, Any] | None, hessian: dict[str, Any] | None, *, plot: bool = True) -> list[Path]:
    """CSV, JSON and (with matplotlib) PNG files under ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if lab is not None:
        path = out / "fisher.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["source", "estimator", "T", "e", "e_s", "e_nkp", "gap", "gap_s"])
            w.writeheader()
            w.writerows(lab["rows"])
        written.append(path)
        path = out / "fisher.json"
        path.write_text(json.dumps(lab, indent=1))
        written.append(path)
    if hessian is not None:
        path = out / "hessian.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(hessian["final"][0]))
            w.writeheader()
            w.writerows(hessian["final"])
        written.append(path)
        path = out / "hessian.json"
        path.write_text(json.dumps(hessian, indent=1))
        written.append(path)
    if plot:
        plt = pyplot("kronopt fisher plots")
        if lab is not None:
            sources = list(lab["curves"])
            fig, axes = plt.subplots(1, len(sources), figsize=(4.2 * len(sources), 3.6), squeeze=False)
            for ax, source in zip(axes[0], sources):
                for spec, c in lab["curves"][source].items():
                    ax.semilogy(c["step"], [max(v, 1e-16) for v in c["gap_s"]], label=spec)
                ax.set_title(source)
                ax.set_xlabel("step t")
                ax.grid(True, alpha=0.3)
            axes[0][0].set_ylabel("scale-free distance to exact NKP")
            axes[0][-1].legend(fontsize=7)
            fig.tight_layout()
            path = out / "fisher.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        if hessian is not None:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
            for run in hessian["runs"]:
                label = f"{run['optimizer']} lr={run['lr']:g}"
                axes[0].semilogy(run["curve"]["step"], run["curve"]["factor_diff2"], label=label + " L⊗R")
                axes[0].semilogy(run["curve"]["step"], run["curve"]["eigen_diff2"], "--", label=label + " eigen")
                axes[1].plot(run["curve"]["step"], run["curve"]["factor_e_s"], label=label + " L⊗R")
                axes[1].plot(run["curve"]["step"], run["curve"]["eigen_e_s"], "--", label=label + " eigen")
            if hessian["runs"]:
                c = hessian["runs"][0]["curve"]
                axes[1].plot(c["step"], c["floor"], "k:", label="NKP floor")
            axes[0].set_title("‖H − Ĥ‖²_F")
            axes[1].set_title("scale-free error")
            for ax in axes:
                ax.set_xlabel("step")
                ax.grid(True, alpha=0.3)
            axes[1].legend(fontsize=6)
            fig.tight_layout()
            path = out / "hessian.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# -- command line -------------------------------------------------------------------------------------------



def check_estimator(spec: str) -> str:
    """A ``key:opt=value`` estimator spec that :func:`track` can drive; ``ValueError`` saying why not."""
    key, options = parse_estimator(spec)
    try:
        cls = FACTORS.get(key)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    except (PluginLoadError, PluginError) as exc:
        raise ValueError(str(exc)) from None
    try:
        est = cls(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{spec!r}: {exc}") from None
    if not capabilities(est).provides_factors:
        raise ValueError(f"factor estimator {key!r} keeps no factors; nothing to compare")
    return spec


def _specs(text: str, check: Callable[[str], object], *, allow_empty: bool) -> list[str]:
    """Comma-separated specs, each passed through ``check``; every bad one in one ``ValueError``."""
    parts = _args._items(text)
    if not parts and not allow_empty:
        raise ValueError("must name at least one")
    bad = []
    for part in parts:
        try:
            check(part)
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError("; ".join(bad))
    return parts


#: ``kronopt fisher``'s integer flags: (least, greatest or None)
_INT_FLAGS: dict[str, tuple[int, int | None]] = {
    "m": (1, None),
    "n": (1, None),
    "seed": (0, 2**63 - 1),
    "hessian_rows": (10, None),  # 70 % train, 20 % validation: both non-empty
    "hessian_classes": (2, CLASSES),  # the byte classes, merged modulo this
    "hessian_epochs": (1, None),
    "threads": (0, _args.MAX_THREADS),  # the rule of every command
}


def check_fisher(args: argparse.Namespace) -> dict[str, Any]:
    """``kronopt fisher``'s settings, parsed; every bad argument in one :class:`~kronopt.app._args.UsageError`."""
    p = _args.Problems()
    settings: dict[str, Any] = {"out": p.value("--out", args.out, _args.output_dir, Path(args.out or "."))}
    sources = p.value("--source", args.source, lambda t: _args.choices(t, SOURCES, allow_empty=True), [])
    settings["sources"] = sources
    lab = any(part.strip() for part in args.source.split(","))  # the lab runs: its settings must be usable
    steps = p.value("--steps", args.steps, lambda t: _args.integers(t, minimum=1, allow_empty=not lab), [])
    settings["checkpoints"] = sorted(set(steps))
    settings["estimators"] = p.value(
        "--estimators", args.estimators, lambda t: _specs(t, check_estimator, allow_empty=not lab), []
    )
    for name, (low, high) in _INT_FLAGS.items():
        settings[name] = p.integer(f"--{name.replace('_', '-')}", getattr(args, name), minimum=low, maximum=high,
                                   fallback=low)
    settings["beta"] = p.number("--beta", args.beta, above=0.0, below=1.0)  # DyKAF's estimators need β > 0
    settings["hessian_optimizers"], settings["hessian_lrs"] = [], []
    if args.hessian:
        lrs = p.value("--hessian-lrs", args.hessian_lrs, lambda t: _args.numbers(t, above=0.0), [])
        try:
            specs = _args._items(args.hessian_optimizers)
        except ValueError as exc:
            p.add("--hessian-optimizers", str(exc))
            specs = []
        else:
            if not specs:
                p.add("--hessian-optimizers", "must name at least one preset or TOML file (or give --no-hessian)")
        for spec in specs:
            try:
                name, options = parse_estimator(spec)
            except ValueError as exc:
                p.add("--hessian-optimizers", str(exc))
            else:
                where = f"--hessian-optimizers {spec}"
                cfg = p.config(name, options, prefix=where)  # the user's own keys first
                lacking = None if cfg is None else hessian_lacks(cfg)
                if lacking:  # the lab's own keys would be reported as the user's
                    p.add(where, f"{name} does not fit the Hessian experiment: the lab sets {', and '.join(lacking)}; "
                          "it takes optimizers with full Kronecker factors L, R kept as an EMA and an Adam inner "
                          f"rule ({', '.join(hessian_presets())})")
                    cfg = None
                elif cfg is not None:
                    cfg = p.config(name, hessian_settings(lrs[0] if lrs else 0.01, options), prefix=where)
                layout = None if cfg is None else _layout(cfg, settings["hessian_classes"], FEATURES)
                if layout is not None and (layout.left, layout.right) != ("full", "full"):
                    p.add(
                        "--hessian-optimizers",
                        f"{spec} keeps the sides {layout.left}/{layout.right} on a classifier's weight; the lab compares "
                        "full Kronecker factors L ⊗ R with the Hessian, so it takes optimizers that rotate both sides "
                        f"in full ({', '.join(hessian_presets())})",
                    )
        settings["hessian_optimizers"], settings["hessian_lrs"] = specs, lrs
    elif not lab:
        p.add("--source", "is empty and --no-hessian is given: nothing to run")
    if not args.no_plot:
        try:
            pyplot("kronopt fisher plots")  # fail before the work, not after
        except MissingExtraError as exc:
            p.add("", str(exc))
    p.check()
    return settings


def cmd_fisher(args: argparse.Namespace) -> int:
    settings = check_fisher(args)
    threads = torch.get_num_threads()
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    try:
        return _fisher(settings, plot=not args.no_plot)
    finally:
        torch.set_num_threads(threads)


def _fisher(s: dict[str, Any], *, plot: bool) -> int:
    t0 = time.perf_counter()
    lab = None
    if s["sources"]:
        lab = run_lab(sources=s["sources"], estimators=s["estimators"], checkpoints=s["checkpoints"], m=s["m"], n=s["n"],
                      beta=s["beta"], seed=s["seed"])
        print(f"Fisher approximation, β = {s['beta']}, {s['m']}×{s['n']} blocks (real: {CLASSES}×{FEATURES}), seed {s['seed']}")
        print("e: ‖F − L⊗R‖/‖F‖; e_s: after the best scalar; e_nkp: the exact NKP's; gap(_s): ‖L⊗R − K*‖/‖K*‖ (scale-free)")
        print(format_table(lab["rows"]))
    hessian = None
    if s["hessian_optimizers"]:
        hessian = hessian_experiment(s["hessian_optimizers"], rows=s["hessian_rows"], classes=s["hessian_classes"],
                                     epochs=s["hessian_epochs"], lrs=s["hessian_lrs"], seed=s["seed"])
        print()
        print(f"Hessian experiment: linear softmax, {s['hessian_classes']} classes × {FEATURES} features, "
              f"{s['hessian_rows']} rows, batch 100, {s['hessian_epochs']} epochs (final step)")
        print(format_hessian(hessian["final"]))
    written = write_outputs(s["out"], lab, hessian, plot=plot)
    print()
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_subcommand(subparsers: Any) -> None:
    """Register ``kronopt fisher``."""
    p = subparsers.add_parser(
        "fisher",
        help="Fisher-approximation lab: factor estimators against the exact nearest Kronecker product",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--out", default="fisher_out", help="output folder (CSV, JSON, PNG)")
    p.add_argument("--source", default="iid,anisotropic,mixture,real", help=f"comma-separated, of: {', '.join(SOURCES)}; '' for none")
    p.add_argument("--steps", default="10,50,100,200", help="checkpoints T, each ≥ 1 (the stream is max T long)")
    p.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS),
                   help="factor estimator keys, with options as key:opt=value:opt=value")
    p.add_argument("--m", default="8", help="rows of the synthetic blocks (≥ 1)")
    p.add_argument("--n", default="12", help="columns of the synthetic blocks (≥ 1)")
    p.add_argument("--beta", default="0.95", help="EMA factor of the target Fisher, in (0, 1)")
    p.add_argument("--seed", default="0")
    p.add_argument("--hessian", action=argparse.BooleanOptionalAction, default=True, help="run the Hessian experiment")
    p.add_argument("--hessian-optimizers", default="soap,dykaf,dykaf:factors.variant=parallel",
                   help="presets, with dotted overrides as name:key=value")
    p.add_argument("--hessian-lrs", default="0.01", help="learning rates, each > 0")
    p.add_argument("--hessian-rows", default="4000", help="rows of the data set (≥ 10)")
    p.add_argument("--hessian-classes", default=str(CLASSES), help=f"classes, 2 to {CLASSES}")
    p.add_argument("--hessian-epochs", default="5", help="epochs (≥ 1)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG files (no matplotlib needed)")
    p.add_argument("--threads", default="1", help="torch CPU threads (these problems are tiny: 1 is fastest; 0: torch's default)")
    p.set_defaults(func=cmd_fisher)
