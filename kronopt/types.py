"""Shared vocabulary: block layouts, basis records, the step context and the stage protocols.

Axis names follow the einops vocabulary used across the package: ``b`` blocks in a
bucket, ``m`` rows, ``n`` columns.
"""

import weakref
from collections.abc import Callable
from typing import Any, Generic, Literal, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from . import linalg

SideKind = Literal["full", "restricted", "none"]
SIDE_KINDS: tuple[str, ...] = ("full", "restricted", "none")


@attrs.frozen(kw_only=True)
class Layout:
    """The shape of one bucket: ``batch`` blocks of ``m × n``, and how each side is kept.

    A side is ``"full"`` (an ``m × m`` / ``n × n`` factor and basis),
    ``"restricted"`` (a rank-``r`` orthonormal subspace with its ``r × r`` spectrum
    plus one flat eigenvalue on the complement; ``rank_left`` / ``rank_right`` give
    ``r``) or ``"none"`` (not rotated: the identity).

    ``phase`` is the bucket's refresh phase under a staggered refresh schedule
    (``[refresh] stagger = true``): the optimizer runs the bucket with the schedule's
    ``at_phase(phase)`` (:class:`kronopt.refresh.Staggered`). Blocks of different
    phases are never stacked together. 0 without staggering; the stages ignore it.
    """

    batch: int
    m: int
    n: int
    left: SideKind
    right: SideKind
    rank_left: int = 0
    rank_right: int = 0
    phase: int = 0
    param_dims: tuple[int, ...] = ()

    @property
    def sides(self) -> tuple[SideKind, SideKind]:
        return (self.left, self.right)


class StageOutputError(ValueError):
    """A stage broke its run-time contract: it returned a direction or a state tensor whose shape, dtype or
    device is not what its ``init`` set up (and the step's gradient has), a state tensor without the block
    axis first, a new state of another type than the one given, a basis change whose permutations are not
    index tensors of its shape (on a CPU: not permutations), or it changed a tensor it was given in place
    (stages are pure). Raised by
    :func:`kronopt.compose.init_state` and :func:`kronopt.compose.step`; the message names the slot, the
    stage's registry key and the field."""


@attrs.frozen(kw_only=True, eq=False)
class BasisState:
    """Orthonormal bases and eigenvalue estimates of one bucket.

    ``Q_L`` ``(b m m)`` and ``Q_R`` ``(b n n)`` have orthonormal columns in
    descending eigenvalue order; ``None`` means the identity (a ``none`` side).
    ``lam_L`` ``(b m)`` and ``lam_R`` ``(b n)`` are the eigenvalue estimates that
    go with the columns (``None`` when the basis keeps none). ``refreshes`` counts
    completed refreshes (a Python int: it is known on the host without a sync);
    ``failures`` ``(b)`` counts, per block, the sides whose refresh kept the old
    basis because the decomposition failed. ``ready`` is False until a first
    refresh has run (before it the bases are the identity and the eigenvalue
    estimates 1).
    """

    Q_L: Tensor | None
    Q_R: Tensor | None
    lam_L: Tensor | None
    lam_R: Tensor | None
    failures: Tensor
    refreshes: int = 0
    ready: bool = True


@attrs.frozen(kw_only=True, eq=False)
class BasisChange:
    """The event of a refresh: old and new bases and the column permutations.

    ``perm_L`` ``(b m)`` / ``perm_R`` ``(b n)`` say which old column each new
    column continues (``new[:, j]`` continues ``old[:, perm[j]]``); ``None`` when
    the refresh keeps no correspondence (a fresh eigendecomposition) or the side
    is not rotated. Per-coordinate statistics follow the permutation; first
    moments are rotated from the old basis to the new one.
    """

    old: BasisState
    new: BasisState
    perm_L: Tensor | None = None
    perm_R: Tensor | None = None


@attrs.frozen(kw_only=True, eq=False)
class Rotation:
    r"""A block in its basis, :math:`H = Q_L^\top G Q_R`, with the half product it was made through
    (:meth:`StepContext.rotated`): ``left`` :math:`Q_L^\top G` where the left side went first, ``right``
    :math:`G Q_R` where the right side did (the other is ``None``). Under a narrow ``rotation_dtype``
    (:class:`kronopt.linalg.NarrowProducts`) ``H`` is in ``G``'s dtype and the half product may be in the narrow
    one: a reader casts it (``.to(G.dtype)``)."""

    H: Tensor
    left: Tensor | None
    right: Tensor | None


def rotate_in(
    G: Tensor, Q_L: Tensor | None, Q_R: Tensor | None, *, exact_basis: bool, dtype: torch.dtype | None = None
) -> Rotation:
    r""":math:`Q_L^\top G Q_R` (a ``None`` side is the identity) as :meth:`StepContext.rotated` makes it: the right
    side first on a tall block (``m > n``) whose bases keep every digit of the compute dtype (``exact_basis``), the
    left side first otherwise; ``dtype``: the products' (:func:`kronopt.linalg.rotate`'s)."""
    right_first = Q_L is not None and Q_R is not None and G.shape[-2] > G.shape[-1] and exact_basis
    narrow = linalg.NarrowProducts.of(G, dtype, Q_L, Q_R)
    if narrow is not None:
        H, left, right = narrow.rotate_halves(G, Q_L, Q_R, right_first=right_first)
        return Rotation(H=narrow.back(H), left=left, right=right)
    if right_first:
        right = linalg.mm(G, Q_R)
        return Rotation(H=linalg.mm(Q_L.mT, right), left=None, right=right)  # type: ignore[union-attr]
    left = G if Q_L is None else linalg.mm(Q_L.mT, G)
    return Rotation(H=left if Q_R is None else linalg.mm(left, Q_R), left=left, right=None)


@attrs.frozen(kw_only=True, eq=False)
class StepContext:
    r"""Every cross-stage input of one bucket step, typed.

    Attributes:
        step: number of parameter updates including the current one (1-based;
            0 on a first call that only initialises).
        layout: the bucket's layout.
        basis: the current basis (the pre-refresh one while the direction is
            computed).
        eigvals: the eigenvalue estimates ``(lam_L (b m), lam_R (b n))`` that go
            with the basis columns: the factor estimator's own when it tracks them
            (``FactorCapabilities.provides_eigvals``), else the basis's. This is the one
            place an inner rule reads eigenvalues from. ``None`` on a side without.
            On a restricted side of rank ``r`` they are the ``r`` subspace values.
        eigvals_from_basis: whether ``eigvals`` are the basis's own (the factor estimator
            provides none). When they are not, nothing reads the basis's estimates, and a
            basis may skip them at a refresh and keep the ones it had (``qr`` without
            ``sort`` then skips its Rayleigh quotients). When they are, they are a solver's,
            known only down to its rounding: the ``lowrank_flat`` split's whitened norm
            gives the ones within it the pseudo-inverse root's zero weight.
        flat: the flat eigenvalue ``mu (b)`` of each restricted side (the value of
            :math:`\hat R = U S U^\top + \mu P_\perp` on the complement), from the
            factor estimator's ``flat_eigvals``; ``None`` on a side that is not restricted.
        exact_basis: whether the basis is held in the compute dtype. When it is stored
            narrower (``[storage] basis``), its columns are orthonormal only to the storage's
            rounding, and a stage must not save work by using :math:`Q^\top Q = I`.
        refresh_follows: whether a basis refresh follows this factor update in the same call.
            A factor estimator may skip work only the refresh reads: a restricted side's power
            product :math:`\hat F U` (``factors()`` there) is then computed on the updates a
            refresh follows and left as it was on the others. ``True`` (compute everything)
            wherever the caller does not know.
        defer: where the optimizer takes a factor update at its state write instead of now
            (:class:`kronopt.linalg.DeferredWrite`, through ``defer=`` of
            :func:`kronopt.linalg.accumulate_gram_left` and :func:`kronopt.linalg.projector_split_ksl`;
            only an update proven finite on every block beforehand), else ``None``. Set only for a
            factor update that nothing later in the call reads (``factor_update = "after"``, no
            refresh follows), on a CPU bucket whose state is kept in the compute dtype.
        rotation_dtype: the dtype of the products that take a block into its basis and back
            (:meth:`rotated`, :meth:`rotate`, :meth:`unrotate`; the config's ``rotation_dtype``,
            :class:`kronopt.linalg.NarrowProducts`), ``None`` for the compute dtype. A stage that rotates
            through these methods follows the setting; the factors, the bases and their refreshes keep the
            compute dtype.
        finite_fallback: whether a refresh itself tests its new basis for blocks it left non-finite and keeps
            their old one (``True``, what a stage must do wherever the caller does not say otherwise). ``False``:
            the caller tests every tensor of the call's new state anyway and makes a call whose new basis is not
            finite again through :func:`kronopt.compose.step`, with this ``True``, so a refresh may skip its own test
            (the CPU's small buckets made together, :func:`kronopt.compose.rotated_adams`).
    """

    step: int
    layout: Layout
    basis: BasisState
    eigvals: tuple[Tensor | None, Tensor | None] = (None, None)
    eigvals_from_basis: bool = True
    flat: tuple[Tensor | None, Tensor | None] = (None, None)
    shared: dict[str, Any] = attrs.field(factory=dict, repr=False)
    exact_basis: bool = True
    refresh_follows: bool = True
    defer: "list[linalg.DeferredWrite] | None" = attrs.field(default=None, repr=False)
    finite_fallback: bool = True
    rotation_dtype: torch.dtype | None = None

    def rotated(self, G: Tensor) -> "Rotation":
        r"""``G`` in this context's basis, :math:`Q_L^\top G Q_R` (a ``None`` side is the identity), with the
        half-rotated product it went through (:class:`Rotation`), computed once per bucket call for every
        stage that asks: the contexts of one call share ``shared``, and the products are reused only for this
        very ``G`` and these very bases.

        With two full bases both orders cost :math:`m^2 n + m n^2`; the right side goes first on a tall block
        (``m > n``) held in the compute dtype (:attr:`exact_basis`), the left side first otherwise. A factor
        estimator that reads the half product picks its Gram operands from what it finds (``kl``: on a tall block
        ``G Q_R`` is the long side's operand, free; the short side's then comes from ``H`` through a sandwich
        where the block is more than twice as long as wide, which saves a product)."""
        Q_L, Q_R = self.basis.Q_L, self.basis.Q_R
        hit = self.shared.get("rotated")
        if hit is not None and hit[0] is G and hit[1] is Q_L and hit[2] is Q_R:
            return hit[3]
        rotation = rotate_in(G, Q_L, Q_R, exact_basis=self.exact_basis, dtype=self.rotation_dtype)
        self.shared["rotated"] = (G, Q_L, Q_R, rotation)
        return rotation

    def rotate(self, X: Tensor) -> Tensor:
        r""":math:`Q_L^\top X Q_R` in this context's basis and :attr:`rotation_dtype` (:func:`kronopt.linalg.rotate`);
        not kept (:meth:`rotated` keeps the gradient's)."""
        return linalg.rotate(X, self.basis.Q_L, self.basis.Q_R, dtype=self.rotation_dtype)

    def unrotate(self, X: Tensor) -> Tensor:
        r""":math:`Q_L X Q_R^\top`: back from this context's basis, in :attr:`rotation_dtype`
        (:func:`kronopt.linalg.unrotate`)."""
        return linalg.unrotate(X, self.basis.Q_L, self.basis.Q_R, dtype=self.rotation_dtype)

    def _restricted_subspace(self) -> tuple[bool, Tensor]:
        """``(left, U)``: whether the restricted side is the left one (the left one where both are) and its
        subspace."""
        left = self.layout.left == "restricted"
        if not left and self.layout.right != "restricted":
            raise ValueError("the subspace split needs a layout with a restricted side")
        U = self.basis.Q_L if left else self.basis.Q_R
        assert U is not None, "a restricted side has a basis"
        return left, U

    def subspace_coordinates(self, X: Tensor) -> Tensor:
        r"""``X``'s coordinates in the restricted side's subspace :math:`U`: :math:`X U` ``(b m r)`` for a
        restricted right side, :math:`U^\top X` ``(b r n)`` for a restricted left one (the left one where both
        are, as the ``lowrank_flat`` split's complement takes it). Computed once per
        bucket call for this very ``X`` and basis: the inner rule's rotation of the momentum and the
        split's complement :math:`X - X U U^\top` both start from it."""
        left, U = self._restricted_subspace()
        hit = self.shared.get("subspace")
        if hit is not None and hit[0] is X and hit[1] is U:
            return hit[2]
        Y = linalg.mm(U.mT, X) if left else linalg.mm(X, U)
        self.shared["subspace"] = (X, U, Y)
        return Y

    def subspace_split(self, X: Tensor) -> tuple[Tensor, Tensor]:
        r"""``X`` split against the restricted side's subspace: its coordinates (:meth:`subspace_coordinates`)
        and its complement :math:`X - X U U^\top` (:math:`X - U U^\top X` on a restricted left side), in
        ``X``'s layout. Computed once per bucket call for this very ``X`` and basis: the gradient's split
        serves the factor estimator (KL's restricted update) and an inner rule that keeps its momentum split
        (``momentum_basis = "subspace"``)."""
        left, U = self._restricted_subspace()
        hit = self.shared.get("split")
        if hit is not None and hit[0] is X and hit[1] is U:
            return hit[2], hit[3]
        Y, C = linalg.subspace_split(X, U, left=left, coords=self.subspace_coordinates(X))
        self.shared["split"] = (X, U, Y, C)
        return Y, C

    def offer_moment_complement(self, C: Tensor) -> None:
        """An inner rule that keeps its moment split against the restricted subspace hands the complement
        part to the split stage here (:meth:`moment_complement`), for this call and this basis."""
        self.shared["moment_complement"] = (self._restricted_subspace()[1], C)

    def moment_complement(self, moment: Callable[[], Tensor]) -> Tensor:
        r"""The inner rule's moment outside the restricted subspace, :math:`M - M U U^\top` (a restricted left
        side: :math:`M - U U^\top M`): the part the rule offered this call (:meth:`offer_moment_complement`),
        else computed from ``moment()`` and its :meth:`subspace_coordinates`."""
        left, U = self._restricted_subspace()
        hit = self.shared.get("moment_complement")
        if hit is not None and hit[0] is U:
            return hit[1]
        M = moment()
        return linalg.subspace_split(M, U, left=left, coords=self.subspace_coordinates(M))[1]


# -- the slot protocols: the members every stage of a slot has ------------------------------


@runtime_checkable
class FactorEstimator(Protocol):
    """Estimates the Kronecker factors ``L (b m m)``, ``R (b n n)`` from each new ``G``.

    What it offers beyond these members is declared in
    ``capabilities: ClassVar[FactorCapabilities]``.
    """

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> Any: ...

    def update(self, state: Any, G: Tensor, ctx: StepContext) -> Any: ...

    def factors(self, state: Any) -> tuple[Tensor | None, Tensor | None]: ...


@runtime_checkable
class Basis(Protocol):
    """Turns factors into orthonormal bases on the refresh schedule.

    Capabilities: ``capabilities: ClassVar[BasisCapabilities]``.
    """

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BasisState: ...

    def refresh(
        self, state: BasisState, factors: tuple[Tensor | None, Tensor | None], ctx: StepContext
    ) -> tuple[BasisState, BasisChange]: ...


@runtime_checkable
class InnerRule(Protocol):
    """The update rule; sees ``G`` in the original coordinates and ``ctx.basis``.

    Capabilities: ``capabilities: ClassVar[InnerCapabilities]``.
    """

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> Any: ...

    def direction(self, state: Any, G: Tensor, ctx: StepContext) -> tuple[Tensor, Any]: ...

    def on_basis_change(self, state: Any, change: BasisChange) -> Any: ...


@runtime_checkable
class Split(Protocol):
    """How each side is represented and what is done with a restricted side's complement.

    ``sides(m, n, rotated)`` maps a block and which of its sides the shape policy
    rotates to ``((kind_L, rank_L), (kind_R, rank_R))``. ``complement`` may add a
    term for the part of the direction a restricted side does not cover;
    ``moment()`` returns the inner rule's first moment in the original coordinates.
    Capabilities: ``capabilities: ClassVar[SplitCapabilities]``.
    """

    def sides(self, m: int, n: int, rotated: tuple[bool, bool]) -> tuple[tuple[SideKind, int], tuple[SideKind, int]]: ...

    def init(self, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> Any: ...

    def complement(
        self, state: Any, G: Tensor, D: Tensor, ctx: StepContext, moment: Callable[[], Tensor]
    ) -> tuple[Tensor, Any]: ...


@runtime_checkable
class Refresh(Protocol):
    """When the basis is recomputed. A refresh schedule declares no capabilities."""

    def due(self, step: int, *, first_call: bool) -> bool: ...


# -- the members a capability adds ------------------------------------------------------------


@runtime_checkable
class ProvidesEigvals(Protocol):
    """A factor estimator that tracks its own eigenvalue estimates per basis column (``kl``)."""

    def eigvals(self, state: Any) -> tuple[Tensor | None, Tensor | None]:
        """``(lam_L (b m), lam_R (b n))`` in the order of the current basis columns (``(b r)`` on a
        restricted side); ``None`` on a side without. They reach the other stages as ``ctx.eigvals``."""
        ...


@runtime_checkable
class FollowsBasis(Protocol):
    """A stage that keeps state in the basis and must hear of every basis change."""

    def on_basis_change(self, state: Any, change: BasisChange) -> Any:
        """The state carried over to ``change.new`` (rotate first moments, permute per-column statistics)."""
        ...


@runtime_checkable
class RestrictedFactors(Protocol):
    r"""A factor estimator that can keep a ``"restricted"`` side of rank ``r``.

    On such a side :meth:`FactorEstimator.factors` returns the *power product*
    ``P (b d r)`` (the factor applied to the current subspace ``U = ctx.basis.Q``)
    instead of a ``d × d`` factor, and :meth:`flat_eigvals` gives the flat eigenvalue.
    """

    def flat_eigvals(self, state: Any) -> tuple[Tensor | None, Tensor | None]:
        """The flat eigenvalue ``mu (b)`` of each restricted side (``None`` elsewhere); it reaches the
        other stages as ``ctx.flat``."""
        ...


@runtime_checkable
class ExposesMoment(Protocol):
    """An inner rule whose first moment a split can read."""

    def moment(self, state: Any, ctx: StepContext) -> Tensor:
        """The first moment ``(b m n)`` in the original coordinates."""
        ...


@runtime_checkable
class HasSecondMoment(Protocol):
    """An inner rule that keeps a per-coordinate second moment (Adam-like)."""

    def second_moment(self, state: Any) -> Tensor:
        """The second moment ``(b m n)`` in the rotated basis."""
        ...


@runtime_checkable
class Elementwise(Protocol):
    """An inner rule that, on a block with no rotated side, works entry by entry."""

    def is_elementwise(self) -> bool:
        """Whether these options keep it so (an option that reads the whole block, such as a per-block
        RMS normalisation, does not): then each entry's direction and state depend only on that entry's
        gradients, and a row shard of a block can be stepped alone (FSDP2, docs/distributed.md)."""
        ...


@runtime_checkable
class StartsOnNonzero(Protocol):
    """A factor estimator that cannot start a block from an exactly zero gradient (DyKAF's start from the first
    gradient's singular triplet)."""

    def starts_on_nonzero(self, layout: Layout) -> bool:
        """Whether a block of ``layout`` waits for its first nonzero gradient: the optimizer then leaves such a
        block out of its bucket's first call while its gradient is zero, as if it had none (no state, no update,
        no step count; ``KronOptimizer._starts_on_nonzero``)."""
        ...


@runtime_checkable
class ReadsParamShape(Protocol):
    """An inner rule that reads more of a parameter's shape than its block's ``m × n``."""

    def param_dims(self, shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
        """What of a parameter's ``shape`` these options read, given its block's ``layout`` (``batch`` 0): the
        rule finds it in ``ctx.layout.param_dims``. ``()`` where the block says all it needs, so that blocks of
        parameters of different shapes still stack wherever the answer does not matter."""
        ...


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The public members a Protocol class requires (methods and annotated attributes), sorted."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if base in (object, Protocol, Generic):
            continue
        names.update(n for n in getattr(base, "__annotations__", {}) if not n.startswith("_"))
        names.update(n for n, v in vars(base).items() if callable(v) and not n.startswith("_"))
    return tuple(sorted(names))


# -- capability declarations -----------------------------------------------------------------

#: how a capability was spelled before typed declarations: a class-level bool flag of that
#: name, or (``"member"``) nothing at all, the member's presence being read instead
LegacyForm = Literal["flag", "member"]


def capability(protocol: type | None = None, *, legacy: LegacyForm = "flag") -> Any:
    """A capability field: ``False`` unless declared; ``protocol`` holds the members it needs."""
    return attrs.field(
        default=False,
        validator=attrs.validators.instance_of(bool),
        metadata={"protocol": protocol, "legacy": legacy},
    )


@attrs.frozen(kw_only=True)
class FactorCapabilities:
    """What a factor estimator offers beyond :class:`FactorEstimator`.

    Attributes:
        provides_factors: ``factors()`` returns real Kronecker factors (a basis that
            ``needs_factors`` can use them); false for ``none``.
        provides_eigvals: it tracks eigenvalue estimates per basis column: ``eigvals(state)``
            (:class:`ProvidesEigvals`). They replace the basis's in ``ctx.eigvals``.
        follows_basis: it keeps state in the basis: ``on_basis_change(state, change)``
            (:class:`FollowsBasis`), called on every refresh.
        supports_restricted: it can keep a restricted side: ``factors()`` returns the power
            product ``(b d r)`` there and ``flat_eigvals(state)`` the flat eigenvalue
            (:class:`RestrictedFactors`).
        reads_rotated: its ``update`` reads ``ctx.rotated(G)``, so a rotation an inner rule made
            earlier in the call is kept for it; otherwise the call drops it before the factor
            update (two gradient-sized tensors fewer held through the update and a refresh).
        waits_for_nonzero: some layouts' blocks cannot start from an exactly zero gradient:
            ``starts_on_nonzero(layout)`` says which (:class:`StartsOnNonzero`).
    """

    provides_factors: bool = capability()
    provides_eigvals: bool = capability(ProvidesEigvals)
    follows_basis: bool = capability(FollowsBasis, legacy="member")
    supports_restricted: bool = capability(RestrictedFactors)
    reads_rotated: bool = capability()
    waits_for_nonzero: bool = capability(StartsOnNonzero, legacy="member")


@attrs.frozen(kw_only=True)
class BasisCapabilities:
    """What a basis needs and offers beyond :class:`Basis`.

    Attributes:
        needs_factors: ``refresh`` reads the factors (a factor estimator must ``provides_factors``).
        provides_eigvals: its ``BasisState`` carries eigenvalue estimates ``lam_L``/``lam_R``.
        supports_restricted: ``init``/``refresh`` handle a restricted side: given the power
            product ``P (b d r)`` it returns an orthonormal ``U (b d r)`` in ``Q_L``/``Q_R`` and
            ``r`` eigenvalue estimates ``(b r)`` in ``lam_L``/``lam_R``.
        static: ``refresh`` changes nothing (the identity basis): a staggered refresh leaves its
            blocks in phase 0, as blocks with no rotated side (spreading them would only split buckets).
    """

    needs_factors: bool = capability()
    provides_eigvals: bool = capability()
    supports_restricted: bool = capability()
    static: bool = capability()


@attrs.frozen(kw_only=True)
class InnerCapabilities:
    """What an inner rule needs and offers beyond :class:`InnerRule`.

    Attributes:
        needs_eigvals: it reads ``ctx.eigvals`` (a basis or factor estimator must provide them).
        supports_restricted: it handles a restricted side (``ctx.basis`` holds ``U (b d r)``,
            ``ctx.eigvals`` the ``r`` subspace values, ``ctx.flat`` the flat eigenvalue) and
            yields the subspace block of the direction; the split adds the complement from
            ``moment()``, so it must also declare ``exposes_moment``.
        exposes_moment: ``moment(state, ctx)``, its first moment in the original coordinates, as
            its step uses it (the eigenvalue rule's bias-corrected where it corrects; a split's
            complement takes the same scale as the subspace block) (:class:`ExposesMoment`).
        has_second_moment: ``second_moment(state)``, its per-coordinate second moment in the
            basis (:class:`HasSecondMoment`); :func:`kronopt.inspection` reads it.
        elementwise: on a block with no rotated side it works entry by entry when
            ``is_elementwise()`` says its options allow (:class:`Elementwise`); FSDP2 then
            steps each rank's rows without communication.
        reads_param_shape: ``param_dims(shape, layout)`` names what of a parameter's shape
            beyond its block the rule reads (:class:`ReadsParamShape`); the optimizer puts it
            in each bucket's ``layout.param_dims`` and stacks only blocks that agree on it.
    """

    needs_eigvals: bool = capability()
    supports_restricted: bool = capability(ExposesMoment)
    exposes_moment: bool = capability(ExposesMoment, legacy="member")
    has_second_moment: bool = capability(HasSecondMoment, legacy="member")
    elementwise: bool = capability(Elementwise, legacy="member")
    reads_param_shape: bool = capability(ReadsParamShape, legacy="member")

    def __attrs_post_init__(self) -> None:
        if self.supports_restricted and not self.exposes_moment:
            raise ValueError(
                "supports_restricted needs exposes_moment: a split completes a restricted side from the rule's "
                "first moment (moment(state, ctx))"
            )


@attrs.frozen(kw_only=True)
class SplitCapabilities:
    """What a split offers beyond :class:`Split`.

    Attributes:
        restricts: ``sides()`` may return ``"restricted"`` sides; every other stage must then
            declare ``supports_restricted`` and the inner rule ``exposes_moment``.
        follows_basis: it keeps state in the basis: ``on_basis_change(state, change)``
            (:class:`FollowsBasis`).
    """

    restricts: bool = capability()
    follows_basis: bool = capability(FollowsBasis, legacy="member")


Capabilities = FactorCapabilities | BasisCapabilities | InnerCapabilities | SplitCapabilities


@attrs.frozen(kw_only=True)
class SlotContract:
    """A slot's contract: the Protocol of its required members and its capability record type
    (``None`` for a slot without capabilities). The registries check every stage against it."""

    slot: str
    protocol: type
    capabilities: type | None = None

    def capability_names(self) -> tuple[str, ...]:
        return () if self.capabilities is None else tuple(f.name for f in attrs.fields(self.capabilities))


CONTRACTS: dict[str, SlotContract] = {
    "factors": SlotContract(slot="factors", protocol=FactorEstimator, capabilities=FactorCapabilities),
    "basis": SlotContract(slot="basis", protocol=Basis, capabilities=BasisCapabilities),
    "inner": SlotContract(slot="inner", protocol=InnerRule, capabilities=InnerCapabilities),
    "split": SlotContract(slot="split", protocol=Split, capabilities=SplitCapabilities),
    "refresh": SlotContract(slot="refresh", protocol=Refresh),
}

#: classes registered with old-style flags, and the typed record they were translated to
_TRANSLATED: "weakref.WeakKeyDictionary[type, Capabilities]" = weakref.WeakKeyDictionary()


def capabilities(stage: object) -> Capabilities:
    """The typed capability record of a stage (instance or class): what the core reads.

    ``capabilities(cfg.inner).has_second_moment``. For a class registered with old-style
    flags it is the record they were translated into.

    Raises:
        TypeError: the stage declares no capabilities and was never registered.
    """
    cls = stage if isinstance(stage, type) else type(stage)
    translated = _TRANSLATED.get(cls)
    if translated is not None:
        return translated
    try:
        record = cls.capabilities  # type: ignore[attr-defined]
    except AttributeError:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} declares no capabilities; give it "
            "`capabilities: ClassVar[...Capabilities] = ...Capabilities(...)` or register it"
        ) from None
    return record  # type: ignore[no-any-return]


@attrs.frozen(eq=False)
class NoState:
    """The state of a stage that keeps none."""
