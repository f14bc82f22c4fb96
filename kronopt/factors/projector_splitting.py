r"""The ``projector_splitting`` factor estimator (DyKAF).

DyKAF tracks the nearest Kronecker product of the empirical Fisher
:math:`F_t = \beta F_{t-1} + (1-\beta)\,\mathrm{vec}\,G_t\,\mathrm{vec}\,G_t^\top`
with a rank-one dynamical low-rank integrator on the rearranged matrix
:math:`\mathcal R(F_t)`; see ``shared/specs/dykaf.md`` and
:func:`kronopt.linalg.projector_split_ksl`.
"""

from typing import ClassVar, Literal

import attrs
import torch
from torch import Tensor

from .. import linalg
from ..validators import ge, gt, in_, lt, to_beta, to_int, to_str, unless_tie
from ..registry import FACTORS
from ..types import FactorCapabilities, Layout, StepContext

VARIANTS: tuple[str, ...] = ("ksl", "parallel")
INITS: tuple[str, ...] = ("kron", "kron_reference", "eps", "sum")
ONE_SIDED: tuple[str, ...] = ("ema", "sum")
INIT_SOLVERS: tuple[str, ...] = ("svd", "power")


def _init_choice(_inst: object, _attr: object, value: str) -> None:
    if value == "zeros":
        raise ValueError(
            "'zeros' is not supported by projector splitting: the integrator normalises R by its norm, "
            f"which is undefined at R = 0; use one of {', '.join(repr(i) for i in INITS)}"
        )
    in_(INITS)(_inst, _attr, value)


@attrs.frozen(eq=False)
class ProjectorSplittingState:
    """``L (b m m)``, ``R (b n n)`` (``None`` on a side that is not rotated), the per-block
    flag ``initialised (b)`` and the number of calls seen (a Python int)."""

    L: Tensor | None
    R: Tensor | None
    initialised: Tensor
    calls: int = 0


@FACTORS.register(
    "projector_splitting",
    description="rank-1 projector-splitting tracker of the nearest Kronecker product of the Fisher EMA (DyKAF)",
)
@attrs.frozen(kw_only=True)
class ProjectorSplittingFactors:
    r"""DyKAF's Kronecker factors: a rank-one projector-splitting integrator on :math:`\mathcal R(F)`.

    Per call, on a block with both sides rotated (``variant = "ksl"``, :math:`r = \|R\|_F`,
    :math:`\bar R = R/r`, after :math:`L, R \leftarrow \sqrt\beta\,L, \sqrt\beta\,R` and
    :math:`G \leftarrow \sqrt{1-\beta}\,G`):

    .. math::
        U \propto rL + G\bar R G^\top,\quad \hat R = r\langle U, L\rangle \bar R + G^\top U G,\quad
        (L, R) \leftarrow (\sqrt{S}\,U,\ \hat R/\sqrt{S}),\ S = \|\hat R\|_F .

    ``variant = "parallel"`` is the basis-update & Galerkin form
    (:func:`kronopt.linalg.projector_split_parallel`).

    First call of a block (config key and constructor argument ``init``; the
    attribute is ``initialization`` because ``init`` is the slot method):

    * ``"kron"``: :math:`L_0 = \sqrt{1-\beta}\,\sigma_1 u_1u_1^\top`,
      :math:`R_0 = \sqrt{1-\beta}\,\sigma_1 v_1 v_1^\top` from the dominant singular
      triplet of :math:`G_1`, so :math:`L_0\otimes R_0` is exactly the nearest Kronecker
      product of the EMA's first term :math:`(1-\beta)\,\mathrm{vec}\,G_1\mathrm{vec}\,G_1^\top`;
      :math:`G_1` is not fed through the integrator again.
    * ``"kron_reference"``: the authors' code, :math:`\sqrt{\sigma_1}\,u_1u_1^\top`,
      :math:`\sqrt{\sigma_1}\,v_1v_1^\top`, then :math:`G_1` fed through the integrator.
    * ``"eps"``: :math:`10^{-3} I_m/\sqrt m`, :math:`10^{-3} I_n/\sqrt n`, then :math:`G_1` fed.
    * ``"sum"``: :math:`G_1G_1^\top`, :math:`G_1^\top G_1`, then :math:`G_1` fed.

    With ``kron``, ``kron_reference`` and ``sum`` a block whose first gradient is exactly
    zero stays uninitialised (``initialised`` is a per-block device flag, no host read)
    until a nonzero gradient arrives. Such a late start costs nothing extra: it is the
    integrator run from :math:`L = 0` with the direction :math:`\bar R = I/\sqrt n`
    (``fresh`` in :func:`kronopt.linalg.projector_split_ksl`), i.e. :math:`U \propto GG^\top`,
    :math:`R \propto G^\top U G`, the best fit of :math:`(1-\beta)\,G\otimes G` with
    that :math:`U` — exact for a rank-one gradient, an approximation of the SVD start
    otherwise. The first call's SVD (or power iteration) runs only on the first call.

    A block with one side not rotated (longer than ``shapes.max_dim``, or the trivial
    side of a 1-D parameter) keeps the other side as ``one_sided``: ``"ema"`` is SOAP's
    :math:`L \leftarrow \beta L + (1-\beta)GG^\top` from zero; ``"sum"`` the authors'
    :math:`L \leftarrow L + GG^\top` from :math:`10^{-3} I/\|I\|_F`.

    Attributes:
        beta: EMA retention of the Fisher, in ``(0, 1)`` (SOAP's ``shampoo_beta``), or
            ``"beta2"``: the inner rule's :math:`\beta_2`, as the authors' ``shampoo_beta = -1``
            (resolved by :meth:`kronopt.config.KronConfig.bound`).
        variant: ``"ksl"`` (K-, S-, L-steps) or ``"parallel"`` (basis update & Galerkin).
        initialization: ``"kron"``, ``"kron_reference"``, ``"eps"`` or ``"sum"`` (``"zeros"`` is rejected).
        init_solver: ``"svd"`` (batched SVD) or ``"power"`` for the first call's triplet.
        power_iters: iterations of the ``"power"`` solver, ≥ 1.
        one_sided: the factor of a block with one side not rotated: ``"ema"`` (SOAP) or ``"sum"`` (authors').

    Invariants:
        Factors exactly symmetric and PSD with equal Frobenius norms; ``initialization = "kron"``
        equals the EMA after one gradient; ``G = 0`` gives :math:`\beta\,L\otimes R`
        (``tests/unit/test_projector_splitting.py``).
    """

    capabilities: ClassVar[FactorCapabilities] = FactorCapabilities(provides_factors=True)
    beta: float | str = attrs.field(default=0.95, converter=to_beta, validator=unless_tie(gt(0.0), lt(1.0)))
    variant: Literal["ksl", "parallel"] = attrs.field(default="ksl", converter=to_str, validator=in_(VARIANTS))
    initialization: Literal["kron", "kron_reference", "eps", "sum"] = attrs.field(
        default="kron", converter=to_str, validator=_init_choice, alias="init"
    )
    init_solver: Literal["svd", "power"] = attrs.field(default="svd", converter=to_str, validator=in_(INIT_SOLVERS))
    power_iters: int = attrs.field(default=20, converter=to_int, validator=ge(1))
    one_sided: Literal["ema", "sum"] = attrs.field(default="ema", converter=to_str, validator=in_(ONE_SIDED))

    # -- slot API ----------------------------------------------------------------------------
    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> ProjectorSplittingState:
        b, m, n = layout.batch, layout.m, layout.n
        full_L, full_R = layout.left == "full", layout.right == "full"
        L = R = None
        if full_L:
            L = self._one_sided_start(b, m, dtype, device) if not full_R else torch.zeros(b, m, m, dtype=dtype, device=device)
        if full_R:
            R = self._one_sided_start(b, n, dtype, device) if not full_L else torch.zeros(b, n, n, dtype=dtype, device=device)
        initialised = torch.full((b,), not (full_L and full_R), dtype=torch.bool, device=device)
        return ProjectorSplittingState(L=L, R=R, initialised=initialised, calls=0)

    def update(self, state: ProjectorSplittingState, G: Tensor, ctx: StepContext) -> ProjectorSplittingState:
        L, R = state.L, state.R
        if L is not None and R is not None:
            L, R, initialised = self._two_sided(L, R, state.initialised, G, first=state.calls == 0)
            return ProjectorSplittingState(L=L, R=R, initialised=initialised, calls=state.calls + 1)
        if L is not None:
            L = self._one_sided(L, G)
        if R is not None:
            R = self._one_sided(R, G.mT)
        return ProjectorSplittingState(L=L, R=R, initialised=state.initialised, calls=state.calls + 1)

    def factors(self, state: ProjectorSplittingState) -> tuple[Tensor | None, Tensor | None]:
        return state.L, state.R

    # -- pieces --------------------------------------------------------------------------------
    def _one_sided_start(self, b: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.one_sided == "ema":
            return torch.zeros(b, d, d, dtype=dtype, device=device)
        eye = torch.eye(d, dtype=dtype, device=device)
        return (1e-3 * eye / d**0.5).expand(b, d, d).clone()

    def _one_sided(self, X: Tensor, G: Tensor) -> Tensor:
        """``X ← βX + (1−β) G Gᵀ`` (``ema``) or ``X ← X + G Gᵀ`` (``sum``); ``G`` is ``b d k``."""
        if self.one_sided == "ema":
            return linalg.ema_gram_left(X, G, self.beta)
        return linalg.sym(X + linalg.gram_left(G))

    def _integrate(self, L: Tensor, R: Tensor, G: Tensor, fresh: Tensor | None = None) -> tuple[Tensor, Tensor]:
        step = linalg.projector_split_ksl if self.variant == "ksl" else linalg.projector_split_parallel
        return step(L, R, G, self.beta, fresh=fresh)

    def _start(self, G: Tensor) -> tuple[Tensor, Tensor]:
        """The initial factors of every block from its first gradient ``G``."""
        b, m, n = G.shape
        if self.initialization == "eps":
            L0 = (1e-3 / m**0.5) * torch.eye(m, dtype=G.dtype, device=G.device).expand(b, m, m)
            R0 = (1e-3 / n**0.5) * torch.eye(n, dtype=G.dtype, device=G.device).expand(b, n, n)
            return L0, R0
        if self.initialization == "sum":
            return linalg.gram_left(G), linalg.gram_right(G)
        if self.init_solver == "svd":
            top = linalg.top_singular_triplet(G)
        else:
            top = linalg.top_singular_triplet_power(G, self.power_iters)
        scale = (1.0 - self.beta) ** 0.5 * top.sigma if self.initialization == "kron" else top.sigma.sqrt()
        scale = scale.view(b, 1, 1)
        L0 = linalg.sym(scale * (top.u.unsqueeze(-1) * top.u.unsqueeze(-2)))
        R0 = linalg.sym(scale * (top.v.unsqueeze(-1) * top.v.unsqueeze(-2)))
        return L0, R0

    def _two_sided(
        self, L: Tensor, R: Tensor, initialised: Tensor, G: Tensor, *, first: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        nonzero = linalg.block_norm(G).view(-1) > 0
        if not first:
            # Blocks still empty (every earlier gradient zero, or a first call the optimizer's
            # non-finite guard discarded) start here at no extra cost: the integrator from L = 0
            # with the identity direction. Zero gradients keep them empty.
            L, R = self._integrate(L, R, G, fresh=~initialised)
            return L, R, initialised | nonzero
        starting = ~initialised if self.initialization == "eps" else ~initialised & nonzero
        L0, R0 = self._start(G)
        L = linalg.select_blocks(starting, L0, L)
        R = linalg.select_blocks(starting, R0, R)
        L_new, R_new = self._integrate(L, R, G)
        # kron represents G₁'s EMA term already: feed only blocks that were initialised before
        feed = initialised if self.initialization == "kron" else initialised | starting
        L = linalg.select_blocks(feed, L_new, L)
        R = linalg.select_blocks(feed, R_new, R)
        return L, R, initialised | starting
