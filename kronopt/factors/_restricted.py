"""What the factor estimators with a restricted side share: following a subspace change."""

from typing import Any

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..types import BasisChange


def factors_or_power(state: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(L, R)`` of a state with ``L``/``R`` and ``power_L``/``power_R``: a restricted side gives its
    power product ``(b d r)`` (what the basis refreshes the subspace from) instead of a factor."""
    return (
        state.L if state.power_L is None else state.power_L,
        state.R if state.power_R is None else state.power_R,
    )


def flat_eigvals(state: Any) -> tuple[Tensor | None, Tensor | None]:
    r"""The flat eigenvalue :math:`\mu` ``(b)`` of each restricted side (``None`` elsewhere)."""
    return state.mu_L, state.mu_R


def follow_subspace(state: Any, change: BasisChange) -> Any:
    r"""``state`` (with ``sub_L``/``sub_R`` ``(b r r)`` and ``mu_L``/``mu_R`` ``(b)``) re-projected onto the new subspaces.

    Each restricted side's :math:`(S, \mu)` becomes the M-projection of its old
    factor onto the new subspace (:func:`kronopt.linalg.reproject_flat`, trace kept,
    :math:`\mu' \ge 0`). Before the first refresh the state is already expressed in
    the first call's subspace, so it is kept.
    """
    if not change.old.ready:
        return state
    sub_L, mu_L = _reproject(state.sub_L, state.mu_L, change.old.Q_L, change.new.Q_L)
    sub_R, mu_R = _reproject(state.sub_R, state.mu_R, change.old.Q_R, change.new.Q_R)
    return attrs.evolve(state, sub_L=sub_L, mu_L=mu_L, sub_R=sub_R, mu_R=mu_R)


def _reproject(
    sub: Tensor | None, mu: Tensor | None, U_old: Tensor | None, U_new: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    if sub is None or mu is None or U_old is None or U_new is None:
        return sub, mu
    sub_new, mu_new, _ = linalg.reproject_flat(U_new, U_old, sub, mu)
    # μ' is a difference of traces: at the size of their rounding it is 0 (μ = 0 kept across a refresh that only
    # turns the subspace within itself), as the estimators' updates keep it (see EmaKronFactors._restricted)
    d, r = U_new.shape[-2], U_new.shape[-1]
    total = torch.diagonal(sub, dim1=-2, dim2=-1).sum(-1).abs() + (d - r) * mu.abs()
    floor = linalg.rounding_floor(d, mu.dtype) * total / max(d - r, 1)
    return sub_new, torch.where(mu_new > floor, mu_new, 0.0)
