r"""The numerics of kronopt, in one place.

Every function here is pure, batched over a leading ``b`` axis, and guards its
input shapes. Stages never call :mod:`torch.linalg` directly.

Precision policy: matrix functions (``eigh``, QR) run in the dtype of their
input, which is the state dtype (float32 by default, float64 when parameters are
float64); an ``eigh`` that fails is retried once in float64 and cast back, and a
second failure raises :class:`ArithmeticError`. Outputs that are not finite are
reported through a per-block mask rather than a host synchronisation, so the
caller can keep its last good value with ``torch.where``.
"""

import math
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

# -- guards --------------------------------------------------------------------------


def _check_batched_square(name: str, A: Tensor) -> None:
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be a batch of square matrices (b n n), got shape {tuple(A.shape)}")


def _check_batched(name: str, X: Tensor) -> None:
    if X.ndim != 3:
        raise ValueError(f"{name} must be a batch of matrices (b m n), got shape {tuple(X.shape)}")


# -- elementary products -------------------------------------------------------------


def sym(A: Tensor) -> Tensor:
    r"""Symmetric part :math:`(A + A^\top)/2`; exactly symmetric in floating point."""
    return (A + A.mT) * 0.5


def gram_left(G: Tensor) -> Tensor:
    r""":math:`G G^\top`, ``b m n, b m2 n -> b m m2``; exactly symmetric."""
    _check_batched("G", G)
    return sym(G @ G.mT)


def gram_right(G: Tensor) -> Tensor:
    r""":math:`G^\top G`, ``b m n, b m n2 -> b n n2``; exactly symmetric."""
    _check_batched("G", G)
    return sym(G.mT @ G)


def ema_gram_left(L: Tensor, G: Tensor, beta: float) -> Tensor:
    r""":math:`\beta L + (1-\beta) G G^\top` in one fused product, then :func:`sym`."""
    _check_batched("G", G)
    return sym(torch.baddbmm(L, G, G.mT, beta=beta, alpha=1 - beta))


def ema_gram_right(R: Tensor, G: Tensor, beta: float) -> Tensor:
    r""":math:`\beta R + (1-\beta) G^\top G` in one fused product, then :func:`sym`."""
    _check_batched("G", G)
    return sym(torch.baddbmm(R, G.mT, G, beta=beta, alpha=1 - beta))


def rotate(X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None) -> Tensor:
    r"""Into the basis: :math:`Q_L^\top X Q_R` (``None`` is the identity), ``b m n``."""
    if Q_L is not None:
        X = Q_L.mT @ X
    if Q_R is not None:
        X = X @ Q_R
    return X


def unrotate(X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None) -> Tensor:
    r"""Back from the basis: :math:`Q_L X Q_R^\top` (``None`` is the identity), ``b m n``."""
    if Q_L is not None:
        X = Q_L @ X
    if Q_R is not None:
        X = X @ Q_R.mT
    return X


def change_basis(
    X: Tensor,
    old: tuple[Tensor | None, Tensor | None],
    new: tuple[Tensor | None, Tensor | None],
) -> Tensor:
    r"""Re-express rotated coordinates in a new basis.

    .. math::
        X' = (Q_L'^\top Q_L)\, X\, (Q_R^\top Q_R') = \mathrm{rotate}_{new}(\mathrm{unrotate}_{old}(X)).

    Cost: two ``m×m`` and two ``n×n``-by-block products per side instead of a full
    unrotate + rotate of ``X``.
    """
    (L_old, R_old), (L_new, R_new) = old, new
    if L_old is not None or L_new is not None:
        T_L = _relative(L_old, L_new)
        X = T_L @ X
    if R_old is not None or R_new is not None:
        T_R = _relative(R_old, R_new)
        X = X @ T_R.mT
    return X


def _relative(Q_old: Tensor | None, Q_new: Tensor | None) -> Tensor:
    """``Q_newᵀ Q_old``, with ``None`` as the identity."""
    if Q_old is None:
        return Q_new.mT  # type: ignore[union-attr]
    if Q_new is None:
        return Q_old
    return Q_new.mT @ Q_old


def permute_columns(Q: Tensor, perm: Tensor) -> Tensor:
    """Columns of each ``Q[i]`` reordered by ``perm[i]``: ``b n k, b k -> b n k``."""
    index = perm.unsqueeze(-2).expand(Q.shape[0], Q.shape[1], perm.shape[-1])
    return torch.gather(Q, -1, index)


def permute_along(X: Tensor, perm: Tensor, dim: int) -> Tensor:
    """Reorder ``X (b m n)`` along ``dim`` (1 rows, 2 columns) by the batched ``perm``."""
    _check_batched("X", X)
    if dim == 1:
        index = perm.unsqueeze(-1).expand_as(X)
    elif dim == 2:
        index = perm.unsqueeze(-2).expand_as(X)
    else:
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    return torch.gather(X, dim, index)


def block_norm(X: Tensor) -> Tensor:
    """Frobenius norm of each block, ``b m n -> b 1 1``."""
    _check_batched("X", X)
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)


def match_norm(D: Tensor, A: Tensor) -> Tensor:
    r"""``D`` rescaled per block to the Frobenius norm of ``A``: :math:`D\,\|A\|_F/\|D\|_F` (0 stays 0)."""
    norm_D = block_norm(D)
    ratio = block_norm(A) / norm_D.clamp(min=torch.finfo(D.dtype).tiny)
    return D * torch.where(norm_D > 0, ratio, torch.zeros_like(ratio))


# -- symmetric eigendecomposition ------------------------------------------------------


@attrs.frozen(eq=False)
class Eigh:
    """Result of :func:`eigh_descending`.

    ``lam (b n)`` descending, ``Q (b n n)`` matching columns, ``ok (b)`` True where
    the block's output is finite (a False block must not be used).
    """

    lam: Tensor
    Q: Tensor
    ok: Tensor


def _eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """The raw solver, isolated so tests can make it fail."""
    return torch.linalg.eigh(A)


def eigh_descending(A: Tensor) -> Eigh:
    r"""Eigendecomposition of a batch of symmetric matrices, eigenvalues descending.

    .. math::
        A = Q \,\mathrm{diag}(\lambda)\, Q^\top,\qquad \lambda_1 \ge \dots \ge \lambda_n .

    Runs in ``A``'s dtype; if the solver raises, retries once in float64 and casts
    back. Each eigenvector's sign is fixed so that its largest-magnitude entry is
    positive (a deterministic convention; every consumer in kronopt is invariant to
    column signs).

    Raises:
        ArithmeticError: the float64 retry failed too.
    """
    _check_batched_square("A", A)
    try:
        lam, Q = _eigh(A)
    except RuntimeError as first:
        try:
            lam, Q = _eigh(A.to(torch.float64))
        except RuntimeError as second:
            raise ArithmeticError(f"eigh failed in {A.dtype} ({first}) and in float64 ({second})") from second
        lam, Q = lam.to(A.dtype), Q.to(A.dtype)
    lam, Q = lam.flip(-1), Q.flip(-1)
    pivot = Q.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(Q, -2, pivot))
    Q = Q * torch.where(signs == 0, torch.ones_like(signs), signs)
    ok = torch.isfinite(lam).all(dim=-1) & torch.isfinite(Q).all(dim=(-2, -1))
    return Eigh(lam=lam, Q=Q, ok=ok)


def rayleigh_quotients(A: Tensor, Q: Tensor) -> Tensor:
    r"""Diagonal of :math:`Q^\top A Q` without forming it: ``b n, n k -> b k``."""
    _check_batched_square("A", A)
    return (Q * (A @ Q)).sum(dim=-2)


def power_qr(A: Tensor, Q: Tensor) -> Tensor:
    r"""One warm-started subspace (power) iteration: the Q factor of :math:`\mathrm{QR}(A Q)`.

    Column signs follow the QR routine; consumers are sign invariant.
    """
    _check_batched_square("A", A)
    Q_new, _ = torch.linalg.qr(A @ Q)
    return Q_new


def finite_blocks(*tensors: Tensor | None) -> Tensor:
    """``(b)`` mask: True where every given tensor is finite on that block.

    One reduction pass per tensor: a block's sum is non-finite iff it holds a NaN or
    an infinity (or its entries are so large that the sum overflows, which a
    gradient's square would too).
    """
    ok: Tensor | None = None
    for t in tensors:
        if t is None:
            continue
        block_ok = torch.isfinite(t.sum(dim=tuple(range(1, t.ndim))))
        ok = block_ok if ok is None else ok & block_ok
    if ok is None:
        raise ValueError("finite_blocks needs at least one tensor")
    return ok


def select_blocks(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``ok[i]`` else ``old``, per block (no host synchronisation)."""
    return torch.where(ok.view(-1, *([1] * (new.ndim - 1))), new, old)


# -- Newton–Schulz orthogonalization ---------------------------------------------------

#: name -> (coefficient tuples, what happens past the list: "cycle" or "repeat_last")
NS_SCHEDULES: dict[str, tuple[tuple[tuple[float, float, float], ...], str]] = {
    "kj": (((3.4445, -4.7750, 2.0315),), "repeat_last"),
    "polar_express": (
        (
            (8.2051, -22.9019, 16.4607),
            (4.0664, -2.8612, 0.5184),
            (3.9096, -2.8234, 0.5250),
            (3.2856, -2.4153, 0.4853),
            (2.2779, -1.6198, 0.3985),
            (1.8726, -1.2307, 0.3585),
            (1.8564, -1.2132, 0.3568),
            (1.8750, -1.2500, 0.3750),
        ),
        "repeat_last",
    ),
    "quintic": (
        (
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ),
        "cycle",
    ),
    "cans": (
        (
            (8.4703, -25.1081, 18.6293),
            (4.1828, -3.1087, 0.5806),
            (3.9619, -2.9541, 0.5630),
            (3.2866, -2.4647, 0.5074),
            (2.2737, -1.6447, 0.4162),
        ),
        "repeat_last",
    ),
    "deepseekv4": ((*([(3.4445, -4.7750, 2.0315)] * 8), (2.0, -1.5, 0.5), (2.0, -1.5, 0.5)), "repeat_last"),
}


def ns_coefficients(
    schedule: Sequence[tuple[float, float, float]], steps: int, beyond: str
) -> list[tuple[float, float, float]]:
    """The ``steps`` coefficient tuples of a schedule, extended by ``beyond`` (cycle / repeat_last)."""
    if not schedule:
        raise ValueError("a Newton–Schulz schedule needs at least one (a, b, c) tuple")
    if beyond not in ("cycle", "repeat_last"):
        raise ValueError(f"beyond must be 'cycle' or 'repeat_last', got {beyond!r}")
    out = []
    for k in range(steps):
        if k < len(schedule):
            out.append(tuple(schedule[k]))
        elif beyond == "cycle":
            out.append(tuple(schedule[k % len(schedule)]))
        else:
            out.append(tuple(schedule[-1]))
    return out  # type: ignore[return-value]


def newton_schulz(
    U: Tensor,
    coefficients: Sequence[tuple[float, float, float]],
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    norm: str = "clamp",
) -> Tensor:
    r"""Approximate polar factor of each ``U[i]`` by a quintic Newton–Schulz iteration.

    .. math::
        X_0 = U/\max(\|U\|_F, \epsilon), \qquad
        A = X X^\top,\; X \leftarrow a_k X + (b_k A + c_k A^2) X .

    The iteration runs on the shorter side (a tall block is transposed so the Gram
    matrix is ``min(m, n)²``) in ``dtype``. If :math:`U = P\Sigma V^\top` the output
    is :math:`P\,p(\Sigma/\|U\|_F)\,V^\top` with :math:`p` the composed scalar
    quintic, so zero singular values stay zero and ``NS(0) = 0``. The fused
    ``baddbmm`` form matches :func:`torch.optim.Muon`'s ``addmm`` per matrix.
    Frobenius normalisation guarantees :math:`\sigma_{\max}(X_0) \le 1`.

    Args:
        U: ``b m n`` batch.
        coefficients: one ``(a, b, c)`` per iteration.
        eps: floor of the norm (``norm="clamp"``) or added to it (``"add"``).
        dtype: arithmetic dtype of the iteration.
        norm: ``"clamp"`` (torch.optim.Muon) or ``"add"`` (KellerJordan/Muon).

    Returns:
        ``b m n`` in ``dtype``.

    References:
        Jordan et al., Muon (2024); Amsel et al., Polar Express, arXiv 2505.16932.
    """
    _check_batched("U", U)
    X = U.to(dtype)
    tall = U.shape[-2] > U.shape[-1]
    if tall:
        X = X.mT
    nrm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if norm == "clamp":
        X = X / nrm.clamp(min=eps)
    elif norm == "add":
        X = X / (nrm + eps)
    else:
        raise ValueError(f"norm must be 'clamp' or 'add', got {norm!r}")
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


def muon_scale(m: int, n: int, rule: str) -> float:
    """Shape factor ``s`` of an orthogonalized ``m × n`` update (muon spec §5)."""
    if rule == "original":
        return math.sqrt(max(1.0, m / n))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "spectral":
        return math.sqrt(max(m, n))
    if rule == "unit_rms_norm":
        return math.sqrt(m / n)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown scale rule {rule!r}")


MUON_SCALES: tuple[str, ...] = ("original", "match_rms_adamw", "spectral", "unit_rms_norm", "none")
