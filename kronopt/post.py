r"""The ``post`` stage: RMS normalisation and grafting of the whole direction, then decoupled weight decay and the step.

Not a registry slot: one configurable record that every pipeline ends with.
"""

import functools
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from . import compiled, linalg
from .validators import each, ge, graft_betas, in_, lt, to_bool, to_float, to_str, unless_tie
from .types import Layout, NoState, StepContext


@attrs.frozen(eq=False)
class GraftState:
    """Adam moments of the grafting direction, ``b m n``, original coordinates."""

    exp_avg: Tensor
    exp_avg_sq: Tensor


@attrs.frozen(kw_only=True)
class Post:
    r"""Normalisation, grafting and decoupled weight decay.

    With ``normalize`` the whole direction (the inner rule's, plus a split's
    complement) is divided per block by :math:`10^{-30} + \mathrm{RMS}(D)`
    (KL-Shampoo's ``normalize_grads``, which Pro-KLShampoo keeps). With ``grafting = "adam"`` the direction :math:`D` of the inner rule is rescaled
    per block to the norm of an Adam direction :math:`A` on the raw gradient,
    :math:`D \leftarrow D\,\|A\|_F / \|D\|_F`, and replaced by :math:`A` until the
    basis has had its first refresh (layer-wise grafting as in Distributed Shampoo).
    :math:`A = \hat m_g / (\sqrt{\hat v_g} + \epsilon_g)` keeps its own moments.

    The write (``apply``) is decoupled weight decay, ``"before"`` (torch.optim:
    :math:`W \leftarrow W(1-\eta\lambda) - \eta D`) or ``"after"`` (SOAP:
    :math:`W \leftarrow W - \eta D`, then :math:`W \leftarrow W - \eta\lambda W`).

    Attributes:
        normalize: divide the direction by its RMS per block, before grafting.
        weight_decay_order: ``"before"`` or ``"after"`` the step.
        grafting: ``"none"`` or ``"adam"``.
        graft_betas: Adam betas of the grafting direction; the first may be ``"momentum"``, the inner rule's
            first-moment retention (``inner.momentum`` or ``inner.betas[0]``), so that an ablation of it moves
            the graft's too (the ``shampoo`` preset, whose grafting direction ``A`` uses the inner rule's first moment).
        graft_eps: Adam ε of the grafting direction.
    """

    weight_decay_order: Literal["before", "after"] = attrs.field(
        default="before", converter=to_str, validator=in_(("before", "after"))
    )
    grafting: Literal["none", "adam"] = attrs.field(default="none", converter=to_str, validator=in_(("none", "adam")))
    graft_betas: tuple[float | str, float] = attrs.field(
        default=(0.9, 0.999), converter=graft_betas, validator=each(unless_tie(ge(0.0), lt(1.0)))
    )
    graft_eps: float = attrs.field(default=1e-8, converter=to_float, validator=ge(0.0))
    normalize: bool = attrs.field(default=False, converter=to_bool)

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> GraftState | NoState:
        if self.grafting == "none":
            return NoState()
        shape = (layout.batch, layout.m, layout.n)
        return GraftState(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def graft(
        self, state: GraftState | NoState, G: Tensor, D: Tensor, ctx: StepContext
    ) -> tuple[Tensor, GraftState | NoState]:
        """The direction normalised (``normalize``), then grafted (``grafting``)."""
        if self.normalize:
            D = linalg.normalize_rms(D)
        if isinstance(state, NoState):
            return D, state
        m, v = linalg.adam_moments(state.exp_avg, state.exp_avg_sq, G, self.graft_betas)
        N, scale = linalg.adam_ratio(
            m, v, step=ctx.step, betas=self.graft_betas, eps=self.graft_eps, eps_placement="after_correction",
            bias_correction=True,
        )
        A = N * scale
        if not ctx.basis.ready:
            return A, GraftState(m, v)
        return linalg.match_norm(D, A), GraftState(m, v)

    def apply_(self, params: Sequence[Tensor], D: Tensor, *, lr: float, weight_decay: float, ok: Tensor) -> None:
        """Write the step into ``params`` in place: block ``i`` of ``D (b m n)`` goes to ``params[i]``.

        Blocks where ``ok`` is False are left exactly as they are (no decay either).
        The per-block factors are tensors, so nothing synchronises with the host. ``D``
        is consumed: its non-finite entries are zeroed in place (they lie in blocks
        where ``ok`` is False, which then add ``0 · D = 0``).
        """
        if (twin := compiled.variant("post_apply")) is not None: return twin(self, params, D, lr=lr, weight_decay=weight_decay, ok=ok)  # noqa: E501,E701
        if _every_block_plainly(lr, weight_decay, ok):
            # every block written (and so D finite): the same factors for all, no mask, nothing to zero
            # (plain Python numbers only: a tensor or NumPy learning rate sets the factors' dtype itself)
            _apply_plainly_([(self, params, D, lr, weight_decay)])
            return
        okf = ok.to(_factor_dtype(D.dtype))
        D = D.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        steps = [d.view(p.shape) for d, p in zip(D.unbind(0), params)]
        scale = list((okf * -lr).unbind(0))  # -lr on written blocks, 0 elsewhere
        decay = list((1 - (lr * weight_decay) * okf).unbind(0)) if _decays(weight_decay) else None
        self._apply_all_(list(params), steps, scale, decay)

    def _apply_all_(self, params: list[Tensor], steps: list[Tensor], scale: list[Tensor], decay: list[Tensor] | None) -> None:
        if decay is not None and self.weight_decay_order == "before":
            torch._foreach_mul_(params, decay)
        torch._foreach_addcmul_(params, steps, scale)
        if decay is not None and self.weight_decay_order == "after":
            torch._foreach_mul_(params, decay)

    def block_factors(self, D: Tensor, *, lr: float, weight_decay: float) -> tuple[Tensor, Tensor | None]:
        """The step and decay factors :meth:`apply_` gives a written block, as 0-d tensors of ``D``'s dtype
        computed as :meth:`apply_` computes them from its mask (so :meth:`apply_block_` writes the same bits)."""
        return _block_factors(_factor_dtype(D.dtype), D.device, lr, weight_decay)

    def apply_block_(self, param: Tensor, D: Tensor, factors: tuple[Tensor, Tensor | None]) -> None:
        """:meth:`apply_` for one block that is written (its ``ok`` True, ``D`` finite), with the
        :meth:`block_factors` ``factors``: the same arithmetic, without masks or sanitising."""
        scale, decay = factors
        step = D.view(param.shape)
        if decay is not None and self.weight_decay_order == "before":
            param.mul_(decay)
        param.addcmul_(step, scale)
        if decay is not None and self.weight_decay_order == "after":
            param.mul_(decay)


def _decays(weight_decay: Any) -> bool:
    """Whether the write applies a decay factor: for a number, where it is not 0; for a tensor (a scheduler's, on
    an accelerator) always, unread (a factor of ``1 − lr·0 = 1`` is exact), since reading it would synchronise."""
    return isinstance(weight_decay, torch.Tensor) or bool(weight_decay)


def _every_block_plainly(lr: Any, weight_decay: Any, ok: Tensor, all_ok: bool = False) -> bool:
    """Whether :meth:`Post.apply_` writes every block with one shared factor: ``lr`` and ``weight_decay`` plain
    Python numbers (a tensor or NumPy learning rate sets the factors' dtype itself) and every block written,
    read on the host (on a CPU, :func:`linalg.cpu_all`) unless ``all_ok`` says so already."""
    return type(lr) in (int, float) and type(weight_decay) in (int, float) and (all_ok or linalg.cpu_all(ok))


def apply_together_(work: Sequence[tuple[Post, Sequence[Tensor], Tensor, float, float, Tensor]], *, all_ok: bool = False) -> None:
    """:meth:`Post.apply_` of several buckets' steps, each ``(post, params, D, lr, weight_decay, ok)``, the same
    bits. The buckets that :meth:`Post.apply_` would write with one shared factor are written together: one
    set of ``foreach`` calls (the decay and the step) per weight-decay order, factor dtype, device and whether it
    decays, whatever their ``lr`` and ``weight_decay`` (:func:`_apply_plainly_`); the others in turn. ``all_ok``:
    every ``ok`` is known to be all True on a CPU (read on the host already)."""
    plain = []
    for post, params, D, lr, weight_decay, ok in work:
        if compiled.variant("post_apply") is not None or not _every_block_plainly(lr, weight_decay, ok, all_ok):
            post.apply_(params, D, lr=lr, weight_decay=weight_decay, ok=ok)
        else:
            plain.append((post, params, D, lr, weight_decay))
    _apply_plainly_(plain)


def _apply_plainly_(work: Sequence[tuple[Post, Sequence[Tensor], Tensor, float, float]]) -> None:
    """Steps whose every block is written with one shared factor (:func:`_every_block_plainly`), each
    ``(post, params, D, lr, weight_decay)``: one set of ``foreach`` calls per weight-decay order, factor dtype,
    device and whether it decays, each block with its own step's factors (:func:`_block_factors`; a ``foreach``
    call takes a factor per tensor, so param groups of other rates cost no call of their own: the same kernel on
    each block, the same bits)."""
    together: dict[tuple, tuple[Post, list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None]] = {}
    for post, params, D, lr, weight_decay in work:
        dtype = _factor_dtype(D.dtype)
        scale, decay = _block_factors(dtype, D.device, lr, weight_decay)
        key = (post.weight_decay_order, dtype, D.device, decay is None)
        if key not in together:
            together[key] = (post, [], [], [], None if decay is None else [])
        _, ps, steps, scales, decays = together[key]
        blocks = [D.view(params[0].shape)] if len(params) == 1 else [d.view(p.shape) for d, p in zip(D.unbind(0), params)]
        ps.extend(params)
        steps.extend(blocks)
        scales.extend([scale] * len(blocks))
        if decays is not None:
            decays.extend([decay] * len(blocks))  # type: ignore[list-item]
    for post, ps, steps, scales, decays in together.values():
        post._apply_all_(ps, steps, scales, decays)


@functools.cache
def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the step and decay factors: the direction's, but never narrower than float32.
    In bfloat16, ``1 − lr·wd`` rounds to 1 for ``lr·wd`` below about ``2⁻⁹`` (weight decay would
    vanish from float32 parameters) and ``lr`` itself loses all but 8 bits. (Kept per dtype: asked
    once a bucket and step, and ``torch.promote_types`` is an operator call.)"""
    return torch.promote_types(dtype, torch.float32)


_FACTORS: dict[tuple[torch.dtype, torch.device, float, float], tuple[Tensor, Tensor | None]] = {}


def _block_factors(dtype: torch.dtype, device: torch.device, lr: float, weight_decay: float) -> tuple[Tensor, Tensor | None]:
    """``(−lr, 1 − lr·wd)`` as 0-d tensors, computed from a mask entry of 1 as :meth:`Post.apply_`
    computes them (the same bits), and kept: the buckets of a step share them (a schedule's new
    learning rate adds an entry; the cache is emptied past 64)."""
    lr, weight_decay = float(lr), float(weight_decay)  # made from the key's numbers: a tensor's dtype must not enter
    key = (dtype, device, lr, weight_decay)
    hit = _FACTORS.get(key)
    if hit is None:
        if len(_FACTORS) >= 64:
            _FACTORS.clear()
        with torch.inference_mode(False):
            one = torch.ones((), dtype=dtype, device=device)
            hit = _FACTORS[key] = (one * -lr, (1 - (lr * weight_decay) * one) if weight_decay else None)
    return hit
