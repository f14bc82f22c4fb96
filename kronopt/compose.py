r"""One pipeline step for one bucket, as a pure function of a frozen config.

For a bucket of ``b`` blocks with gradients ``G (b m n)``::

    first call and skip_first_call:  observe(G); no update
    otherwise:                       t ← t + 1
                                     [observe(G)            if factor_update = "before"]
                                     D ← inner.direction(G) ; D ← split.complement(D) ; D ← post.graft(D)
                                     [observe(G)            if factor_update = "after"]

where ``observe`` updates the factors and, when the refresh schedule says so,
refreshes the basis and announces the change to every stage that keeps state in
it. The caller writes ``W ← post.apply(W, D)``. Nothing here branches on which
preset runs, and nothing synchronises with the host: the branches read Python
ints and bools only.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from . import linalg
from .config import KronConfig, Storage
from .types import BasisChange, BasisState, Layout, StageOutputError, StepContext, capabilities, rotate_in


@attrs.frozen(kw_only=True, eq=False)
class BucketState:
    """Everything a bucket keeps: one record per stage plus the call and update counters."""

    factors: Any
    basis: BasisState
    inner: Any
    split: Any
    post: Any
    calls: int = 0
    step: int = 0


def init_state(cfg: KronConfig, layout: Layout, *, dtype: torch.dtype, device: torch.device) -> BucketState:
    """Fresh state of every stage for ``layout``; ``cfg`` must be bound (:meth:`KronConfig.bound`).

    Raises:
        StageOutputError: a stage's ``init`` made a state tensor without the block axis first (:func:`_check_init`).
        Exception: what a stage's ``init`` raised, naming the stage (:func:`_init_stage`).
    """
    if cfg.bound() is not cfg:
        raise ValueError("the config ties factors.beta or post.graft_betas to the inner rule's: pass cfg.bound()")
    kw = {"dtype": dtype, "device": device}
    state = BucketState(**{slot: _init_stage(slot, getattr(cfg, slot), layout, kw) for slot in _SLOTS})
    stored = storage_dtypes(cfg.storage, dtype)
    return state if stored is None else to_storage(state, stored)


#: the stage records of a :class:`BucketState`, in its order
_SLOTS = ("factors", "basis", "inner", "split", "post")


def _init_stage(slot: str, stage: Any, layout: Layout, kw: dict[str, Any]) -> Any:
    """``stage.init(layout, **kw)``, its record checked (:func:`_check_init`); an exception it raises names the
    stage: raised again as the same type with the stage named first, from the original, where that type is a plain
    built-in one, else the original with a note naming the stage (a caller may tell its exceptions by type: a
    ``ValueError`` refuses a layout at build, ``optimizer._try_layout``)."""
    try:
        record = stage.init(layout, **kw)
    except Exception as exc:
        if type(exc) in _PLAIN_ERRORS and len(exc.args) == 1 and isinstance(exc.args[0], str):
            raise type(exc)(f"{_stage_label(slot, stage)}: init raised: {exc.args[0]}") from exc
        exc.add_note(f"raised by the init of the {_stage_label(slot, stage)}")
        raise
    _check_init(slot, stage, record, layout.batch)
    return record


#: exception types :func:`_init_stage` raises again with the stage named in the message (one string argument)
_PLAIN_ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError, AttributeError, IndexError, ZeroDivisionError, AssertionError)


# -- run-time checks of what a stage returns (StageOutputError) ---------------------------
#
# Host-side comparisons of types, shapes, dtypes and version counters: nothing synchronises. Each output is checked
# where step (or _observe) first receives it, before anything is written, and each call's inputs after it returns
# (_Given: the tensors it was given, changed in place, blame the stage that was given them); init_state checks each
# fresh record once. One value is read, on a CPU only, where that waits for nothing: a refresh's permutations
# (_check_change, one scatter a side on refresh steps); elsewhere no value is read and no kernel runs.


def _stage_label(slot: str, stage: Any) -> str:
    """``inner stage 'adam' (AdamInner)``: the slot, the stage's registry key where it has one, its class."""
    from .registry import SLOTS

    cls = type(stage)
    try:
        key = SLOTS[slot].key_of(cls) if slot in SLOTS else None
    except KeyError:
        key = None
    return f"{slot} stage {key!r} ({cls.__qualname__})" if key else f"{slot} stage {cls.__qualname__}"


def _described(t: Tensor, like: Tensor | None = None) -> str:
    """``shape (2, 6, 4), torch.float32`` (and the device where ``like``'s differs, or where no ``like``)."""
    text = f"shape {tuple(t.shape)}, {t.dtype}"
    return text if like is not None and t.device == like.device else f"{text} on {t.device}"


def _check_init(slot: str, stage: Any, record: Any, batch: int, path: str = "") -> None:
    """Every tensor of a fresh state record carries the block axis first (the stage contract): a 0-d tensor or
    one of another leading size has no per-block meaning (a bucket splits and joins by rows, the non-finite
    guard writes per block), so it is refused here, naming the stage and the field."""
    if isinstance(record, Tensor):
        if record.ndim == 0 or record.shape[0] != batch:
            where = f"state field {path!r}" if path else "state"
            raise StageOutputError(
                f"{_stage_label(slot, stage)}: init returned its {where} with {_described(record)}; every state "
                f"tensor must carry the block axis first, of size {batch} (layout.batch): (b ...)"
            )
        return
    for name in _field_names(type(record)) or ():
        value = getattr(record, name)
        if value is not None:
            _check_init(slot, stage, value, batch, f"{path}.{name}" if path else name)


#: check the outputs of kronopt's own stages too (tests/unit/test_stage_output_checks.py sets it for every preset;
#: a step skips them otherwise, so a built-in pipeline pays nothing for the checks of :func:`step`)
CHECK_OWN_STAGES = False

_CHECKED: dict[tuple[int, bool], tuple[KronConfig, frozenset[str]]] = {}


def _checked_slots(cfg: KronConfig) -> frozenset[str]:
    """The slots of ``cfg`` whose stage's outputs :func:`step` checks: a stage from outside kronopt (a plugin's, a
    user's), or every stage under :data:`CHECK_OWN_STAGES`. Cached by config (one dictionary read a step)."""
    key = (id(cfg), CHECK_OWN_STAGES)
    hit = _CHECKED.get(key)
    if hit is not None and hit[0] is cfg:
        return hit[1]
    slots = frozenset(s for s in _SLOTS if CHECK_OWN_STAGES or not _own_stage(getattr(cfg, s)))
    if len(_CHECKED) >= 64:
        _CHECKED.clear()
    _CHECKED[key] = (cfg, slots)
    return slots


def _own_stage(stage: Any) -> bool:
    module = type(stage).__module__
    return module == "kronopt" or module.startswith("kronopt.")


def _check_output(
    slot: str, checked: frozenset[str], cfg: KronConfig, new: Any, old: Any, layout: Layout, G: Tensor,
    g_version: int | None, D: Tensor | None = None, given: "_Given | None" = None,
) -> None:
    """The checks of one stage call's outputs, where ``slot`` is among ``checked``: its direction ``D`` (``None``:
    none, or the one it was given), its new state record against the one it was given, what it was given
    (``given``, :class:`_Given`, made before the call) and ``G`` untouched."""
    if slot not in checked:
        return
    stage = getattr(cfg, slot)
    if D is not None:
        _check_direction(D, G, slot, stage)
    _check_state(new, old, layout.batch, slot, stage)
    if given is not None:
        given.check(slot, stage)
    _check_gradient(G, g_version, slot, stage)


def _check_direction(D: Any, G: Tensor, slot: str, stage: Any) -> None:
    """``D`` is a tensor of ``G``'s shape and dtype ``(b m n)``; else a :class:`StageOutputError`."""
    if isinstance(D, Tensor) and D.shape == G.shape and D.dtype is G.dtype:
        return
    got = _described(D, G) if isinstance(D, Tensor) else f"a {type(D).__name__}, not a tensor"
    raise StageOutputError(
        f"{_stage_label(slot, stage)} returned a direction of {got}, expected {_described(G, G)} "
        "(the gradient's: (b m n))"
    )


def _check_state(new: Any, old: Any, batch: int, slot: str, stage: Any, path: str = "") -> None:
    """A stage's new state record is of the type of the record it was given (a record field too, and a tensor field
    a tensor), and each of its tensors has the shape and dtype of the same field of the record it was given (a field
    that was ``None`` or absent: the block axis first, ``batch`` rows); else a :class:`StageOutputError` naming the
    stage and the field. Fields handed back as they were are skipped: only the step's new tensors cost."""
    if new is old:
        return
    if isinstance(new, Tensor):
        if old is not None and not isinstance(old, Tensor):
            _type_mismatch(new, old, slot, stage, path.rstrip("."))
        if not _fits(new, old, batch):
            _state_mismatch(new, old, batch, slot, stage, path.rstrip("."))
        return
    if type(new) is not type(old) and old is not None:  # (a record where a field was None may appear)
        _type_mismatch(new, old, slot, stage, path.rstrip("."))
    for name in _field_names(type(new)) or ():
        n = getattr(new, name)
        if n is None:
            continue
        o = getattr(old, name, None)
        if n is o:
            continue
        if type(n) is Tensor and type(o) is Tensor:  # the common case: a new tensor for a stack
            if n.shape == o.shape and n.dtype is o.dtype:
                continue
            _state_mismatch(n, o, batch, slot, stage, path + name)
        elif isinstance(n, Tensor):
            if o is not None and not isinstance(o, Tensor):
                _type_mismatch(n, o, slot, stage, path + name)
            if not _fits(n, o, batch):
                _state_mismatch(n, o, batch, slot, stage, path + name)
        elif _field_names(type(n)) is not None or _field_names(type(o)) is not None:
            _check_state(n, o, batch, slot, stage, f"{path}{name}.")
        elif isinstance(o, Tensor):
            _type_mismatch(n, o, slot, stage, path + name)


def _type_mismatch(new: Any, old: Any, slot: str, stage: Any, path: str) -> None:
    """A new state (or state field, ``path``) of another type than the one the stage was given: a dict for its
    attrs record, a number for a tensor (the state write walks records by their attrs fields, the next call would
    read the record's fields)."""
    got = "a tensor" if isinstance(new, Tensor) else f"a {type(new).__qualname__}"
    what = f"state field {path!r} as {got}" if path else f"new state as {got}"
    expected = "a tensor" if isinstance(old, Tensor) else f"a {type(old).__qualname__}"
    raise StageOutputError(
        f"{_stage_label(slot, stage)} returned its {what}, expected {expected} (the type of the state it was given)"
    )


def _fits(new: Tensor, old: Any, batch: int) -> bool:
    """Whether ``new`` may stand where ``old`` stood: its shape and dtype, or, where ``old`` was no tensor, the block
    axis first (a field that appears, :func:`write_` selects it per block)."""
    if isinstance(old, Tensor):
        return new.shape == old.shape and new.dtype is old.dtype
    return new.ndim >= 1 and new.shape[0] == batch


def _state_mismatch(new: Tensor, old: Any, batch: int, slot: str, stage: Any, path: str) -> None:
    expected = _described(old, new) if isinstance(old, Tensor) else f"the block axis first, of size {batch}"
    where = f"state field {path!r}" if path else "state"
    raise StageOutputError(
        f"{_stage_label(slot, stage)} returned its {where} with {_described(new, old if isinstance(old, Tensor) else new)}, "
        f"expected {expected} (as its init made it)"
    )


def _state_tensors(record: Any, out: list[Tensor]) -> list[Tensor]:
    """Every tensor of a state record (recursively), in field order."""
    names = _FIELDS.get(type(record)) or _field_names(type(record))
    if names is None:
        if isinstance(record, Tensor):
            out.append(record)
        return out
    for name in names:
        value = getattr(record, name)
        if type(value) is Tensor:
            out.append(value)
        elif value is not None and type(value) not in (int, bool, float, str):
            _state_tensors(value, out)
    return out


class _Given:
    """What one stage call is given, by name (``"state"``: its own record; ``ctx.basis``, ``ctx.eigvals``,
    ``ctx.flat``; the factors a refresh reads; a basis change), with the version counters of its tensors read on
    the host before the call (no sync; an inference tensor, which keeps no counter, is left out). :meth:`check`,
    after the call, refuses a tensor among them changed in place, naming the stage that was given it: a tensor
    several stages read (the basis, the factors a refresh reads) is checked after each call that is given it,
    not only where it was the state the step started from. ``rest``: inputs several calls share (a context's,
    a basis change's), walked once, their counters read again for each call."""

    __slots__ = ("given", "tensors", "versions")

    def __init__(self, *given: tuple[str, Any], rest: "_Given | None" = None, read: bool = True) -> None:
        tensors: list[Tensor] = []
        for _, value in given:
            _given_tensors(value, tensors)
        if rest is not None:
            given, tensors = given + rest.given, tensors + rest.tensors
        self.given, self.tensors, self.versions = given, tensors, None
        if read:  # (not for a ``rest``: each call's own reads its counters)
            try:
                self.versions = [t._version for t in tensors]
            except RuntimeError:  # an inference tensor among them
                self.tensors = [t for t in tensors if not t.is_inference()]
                self.versions = [t._version for t in self.tensors]

    def check(self, slot: str, stage: Any) -> None:
        """A :class:`StageOutputError` where a tensor given to the call of ``stage`` changed in place during it."""
        if [t._version for t in self.tensors] == self.versions:
            return
        changed = {id(t) for t, v in zip(self.tensors, self.versions) if t._version != v}
        what = "a tensor it was given"
        for name, value in self.given:
            path = next((path for path, t in _named_tensors(value, name) if id(t) in changed), None)
            if path is not None:
                if name == "state":
                    what = "its state" if path == name else f"its state field {path[6:]!r}"
                else:
                    what = f"{path}, which it was given,"
                break
        raise StageOutputError(
            f"{_stage_label(slot, stage)}: {what} was changed in place during the step; a stage returns new tensors "
            "and leaves what it is given untouched"
        )


def _given_tensors(value: Any, out: list[Tensor]) -> None:
    """The tensors of ``value`` (a tensor, ``None``, a tuple of them, a record) appended to ``out``."""
    if type(value) is Tensor:
        out.append(value)
    elif type(value) is tuple:
        for part in value:
            _given_tensors(part, out)
    elif value is not None:
        _state_tensors(value, out)


def _named_tensors(value: Any, path: str) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor of ``value`` (a tensor, a tuple, a record; recursively): the error's walk."""
    if isinstance(value, Tensor):
        return [(path, value)]
    if type(value) is tuple:
        return [pair for i, part in enumerate(value) for pair in _named_tensors(part, f"{path}[{i}]")]
    names = _field_names(type(value)) or ()
    return [pair for name in names for pair in _named_tensors(getattr(value, name), f"{path}.{name}")]


def _ctx_given(ctx: StepContext) -> _Given:
    """The tensors of ``ctx`` a stage reads, by name, as the ``rest`` of a :class:`_Given` (its shared products
    are made from them)."""
    return _Given(("ctx.basis", ctx.basis), ("ctx.eigvals", ctx.eigvals), ("ctx.flat", ctx.flat), read=False)


def _check_gradient(G: Tensor, version: int | None, slot: str, stage: Any) -> None:
    """``G``'s version counter is still ``version`` (``None``: an inference tensor, not tracked)."""
    if version is not None and G._version != version:
        raise StageOutputError(
            f"{_stage_label(slot, stage)} changed the gradient G in place; a stage only reads G (the stages "
            "after it and the factor update read it too)"
        )


#: the dtypes a basis change's permutation may have (torch's index dtypes: ``gather``, indexing)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_change(change: Any, new: BasisState, layout: Layout, stage: Any) -> None:
    """A basis stage's event is a :class:`BasisChange` whose permutations ``perm_L (b m)`` / ``perm_R (b n)`` (where
    not ``None``) are tensors of an index dtype, one entry per column of that side of the new basis (``m``, ``n``,
    or a restricted side's rank), on the bucket's device; else a :class:`StageOutputError` naming the basis stage
    and the field. On a CPU, where reading a value waits for nothing (:func:`kronopt.linalg.host_verdicts`), each
    block's permutation is also read to be one of ``0 .. k-1`` (:func:`_permutes`, on refreshes only);
    elsewhere the values stay on the device (no host synchronisation): an index out of range is then torch's own
    error where a stage uses it, a repeated one is not caught."""
    if not isinstance(change, BasisChange):
        raise StageOutputError(
            f"{_stage_label('basis', stage)} returned a {type(change).__name__} as its basis change, expected a "
            "kronopt.types.BasisChange"
        )
    failures = getattr(new, "failures", None)
    device = failures.device if isinstance(failures, Tensor) else None
    sides = (("perm_L", getattr(new, "Q_L", None), layout.m), ("perm_R", getattr(new, "Q_R", None), layout.n))
    for name, Q, side in sides:
        perm = getattr(change, name)
        if perm is None:
            continue
        k = Q.shape[-1] if isinstance(Q, Tensor) else side
        shape = (layout.batch, k)
        if not isinstance(perm, Tensor):
            problem = f"{name} is a {type(perm).__name__}, expected a tensor"
        elif perm.dtype not in _INDEX_DTYPES:
            problem = f"{name} is of dtype {perm.dtype}, expected an index dtype (torch.int64 or torch.int32)"
        elif perm.shape != shape:
            problem = f"{name} with shape {tuple(perm.shape)}, expected shape {shape} (b, k: the new basis's columns)"
        elif device is not None and perm.device != device:
            problem = f"{name} is on {perm.device}, expected {device} (the basis's)"
        elif linalg.host_verdicts(perm) and not _permutes(perm):
            problem = f"{name} is not a permutation of 0..{k - 1} on every block (an index out of range or repeated)"
        else:
            continue
        raise StageOutputError(
            f"{_stage_label('basis', stage)} returned a basis change whose {problem}; new column j continues old "
            f"column {name}[:, j], and the stages' on_basis_change permute their per-column statistics by it"
        )
    if capabilities(stage).provides_eigvals:
        _check_eigvals(new, layout, stage)


def _check_eigvals(new: BasisState, layout: Layout, stage: Any) -> None:
    """A basis that declares ``provides_eigvals`` returns, beside each rotated side's basis ``Q (b d k)``, its
    eigenvalue estimates ``(b k)`` (their dtype is :func:`_check_state`'s to judge): the rules that read them (the
    eigenvalue rule, the split's flat part) would otherwise fail deep in the next step, naming no stage."""
    for side, Q, lam in (("left", new.Q_L, new.lam_L), ("right", new.Q_R, new.lam_R)):
        if not isinstance(Q, Tensor):
            continue
        shape = (layout.batch, Q.shape[-1])
        if isinstance(lam, Tensor) and lam.shape == shape:
            continue
        got = _described(lam, Q) if isinstance(lam, Tensor) else ("None" if lam is None else f"a {type(lam).__name__}")
        name = "lam_L" if side == "left" else "lam_R"
        raise StageOutputError(
            f"{_stage_label('basis', stage)} declares provides_eigvals but returned {got} as {name} for its rotated "
            f"{side} side, expected a tensor of shape {shape} (one estimate per column of Q)"
        )


def _permutes(perm: Tensor) -> bool:
    """Whether each row of ``perm (b k)`` holds every index ``0 .. k-1`` once, read on the host (a CPU's): one
    scatter into ``(b k)`` flags, which refuses an index out of range itself (a sort costs several times as much)."""
    seen = torch.zeros(perm.shape, dtype=torch.bool, device=perm.device)
    try:
        seen.scatter_(1, perm, True)
    except RuntimeError:  # an index out of range
        return False
    return bool(seen.all())


# -- storage dtypes ([storage]) -----------------------------------------------------------

_STORAGE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.lru_cache(maxsize=64)
def storage_dtypes(storage: Storage, compute: torch.dtype) -> dict[str, torch.dtype] | None:
    """Per :class:`BucketState` record (``factors``, ``basis``, ``inner``, ``split``, ``post``), the dtype
    its floating tensors are stored in; ``None`` when every record is stored in ``compute`` (no cast)."""
    out = {name: compute if choice == "compute" else _STORAGE_NAMES[choice] for name, choice in storage.by_field().items()}
    return None if all(d == compute for d in out.values()) else out


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` if it is a floating tensor of another dtype (counters and masks keep theirs)."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def to_storage(state: BucketState, stored: dict[str, torch.dtype]) -> BucketState:
    """``state`` with each record's floating tensors rounded to its storage dtype (``stored``: :func:`storage_dtypes`),
    or to a state record's ``STORAGE_FLOOR`` for the fields it names where that is wider (:func:`map_stored`)."""
    return attrs.evolve(state, **{name: map_stored(getattr(state, name), d, _cast) for name, d in stored.items()})


def map_stored(record: Any, dtype: torch.dtype, fn: Callable[[Tensor, torch.dtype], Tensor]) -> Any:
    """A copy of a state record with ``fn(tensor, its storage dtype)`` applied to every tensor (recursively): ``dtype``,
    or the wider dtype a record class names for a field in its ``STORAGE_FLOOR`` (a ``{field: dtype}`` class
    attribute): a tensor whose rounding the stage's rule would amplify, kept at least that precise whatever
    ``[storage]`` says (never wider than ``dtype``'s compute dtype, as every floor is at most float32)."""
    if isinstance(record, Tensor):
        return fn(record, dtype)
    names = _field_names(type(record))
    if names is None:
        return record
    floor: dict[str, torch.dtype] = getattr(type(record), "STORAGE_FLOOR", {})
    changes = {}
    for name in names:
        value = getattr(record, name)
        if isinstance(value, Tensor) or _field_names(type(value)) is not None:
            changes[name] = map_stored(value, torch.promote_types(dtype, floor[name]) if name in floor else dtype, fn)
    return attrs.evolve(record, **changes) if changes else record


def _with_storage(fn: Callable[..., tuple[Tensor | None, BucketState]]) -> Callable[..., tuple[Tensor | None, BucketState]]:
    """The storage hook of :func:`step`: with a ``[storage]`` dtype narrower than the compute dtype
    (``G.dtype``), the stored state is upcast before the step and the new state rounded to the storage
    dtypes after it. A tensor the step left unchanged comes back as the stored tensor itself (so the
    optimizer sees it unchanged and does not rewrite it). Without one, the step runs as it is."""

    @functools.wraps(fn)
    def step(
        cfg: KronConfig, layout: Layout, state: BucketState, G: Tensor, *, defer: list[linalg.DeferredWrite] | None = None
    ) -> tuple[Tensor | None, BucketState]:
        stored = storage_dtypes(cfg.storage, G.dtype)
        if stored is None:
            return fn(cfg, layout, state, G, defer=defer)
        back: dict[int, Tensor] = {}

        def up(t: Tensor) -> Tensor:
            u = _cast(t, G.dtype)
            back[id(u)] = t
            return u

        upcast = map_tensors(state, up)
        D, new = fn(cfg, layout, upcast, G)

        def down(t: Tensor, d: torch.dtype) -> Tensor:
            kept = back.get(id(t))
            return kept if kept is not None else _cast(t, d)

        rounded = {name: map_stored(getattr(new, name), d, down) for name, d in stored.items()}
        del upcast  # kept alive until here: the ids in ``back`` stay unique
        return D, attrs.evolve(new, **rounded)

    return step


def context(
    cfg: KronConfig, layout: Layout, state: BucketState, t: int, shared: dict[str, Any] | None = None,
    *, refresh_follows: bool = True, defer: list[linalg.DeferredWrite] | None = None, finite_fallback: bool = True,
) -> StepContext:
    """The :class:`StepContext` the stages see at update ``t``: basis, eigenvalue estimates (the factor
    estimator's own when it tracks them, else the basis's) and the flat eigenvalues of restricted sides.
    The contexts of one call share ``shared`` (products several stages use, :meth:`StepContext.rotated`,
    and the estimator's eigenvalues, taken once for the same factor record)."""
    basis = state.basis
    shared = {} if shared is None else shared
    from_basis = not capabilities(cfg.factors).provides_eigvals
    if not from_basis:
        hit = shared.get("eigvals")
        if hit is not None and hit[0] is state.factors:
            eigvals = hit[1]
        else:
            eigvals = cfg.factors.eigvals(state.factors)
            shared["eigvals"] = (state.factors, eigvals)
    else:
        eigvals = (basis.lam_L, basis.lam_R)
    restricted = "restricted" in (layout.left, layout.right)  # only with an estimator that supports it (validated)
    flat = cfg.factors.flat_eigvals(state.factors) if restricted else (None, None)
    return StepContext(
        step=t, layout=layout, basis=basis, eigvals=eigvals, eigvals_from_basis=from_basis, flat=flat, shared=shared,
        exact_basis=_held_in_compute_dtype(cfg.storage.basis, basis), refresh_follows=refresh_follows, defer=defer,
        finite_fallback=finite_fallback, rotation_dtype=rotation_dtype(cfg),
    )


def rotation_dtype(cfg: KronConfig) -> torch.dtype | None:
    """The products' dtype of the rotations under ``cfg`` (its ``rotation_dtype``; ``None``: the compute dtype)."""
    return None if cfg.rotation_dtype == "compute" else _STORAGE_NAMES[cfg.rotation_dtype]


def _held_in_compute_dtype(choice: str, basis: BasisState) -> bool:
    """Whether a basis stored as ``choice`` (``[storage] basis``) keeps every digit of the compute dtype
    its tensors arrive in (upcast by :func:`_with_storage`)."""
    Q = basis.Q_L if basis.Q_L is not None else basis.Q_R
    return choice == "compute" or Q is None or _STORAGE_NAMES[choice] == Q.dtype


def _observe(
    cfg: KronConfig, layout: Layout, state: BucketState, G: Tensor, *, t: int, first_call: bool, shared: dict[str, Any],
    defer: list[linalg.DeferredWrite] | None = None, checked: frozenset[str] = frozenset(), g_version: int | None = None,
) -> BucketState:
    """The factor update, then the refresh where one is due. ``defer``: the update may leave its factors to
    the state write (``StepContext.defer``), unless a refresh follows and reads them. ``checked``: the slots whose
    outputs are checked (:func:`_checked_slots`), ``g_version`` the version counter ``G`` had (:func:`_check_output`)."""
    due = cfg.refresh.due(t, first_call=first_call)
    ctx = context(cfg, layout, state, t, shared, refresh_follows=due, defer=None if due else defer)
    in_ctx = _ctx_given(ctx) if "factors" in checked or "basis" in checked else None
    given = _Given(("state", state.factors), rest=in_ctx) if "factors" in checked else None
    factors = cfg.factors.update(state.factors, G, ctx)
    if checked:
        _check_output("factors", checked, cfg, factors, state.factors, layout, G, g_version, given=given)
    if not due:
        return evolve(state, factors=factors)
    return _refreshed(cfg, layout, state, factors, ctx, G, checked=checked, g_version=g_version, in_ctx=in_ctx)


def _refreshed(
    cfg: KronConfig, layout: Layout, state: BucketState, factors: Any, ctx: StepContext, G: Tensor, *,
    checked: frozenset[str] = frozenset(), g_version: int | None = None, in_ctx: Any = None,
) -> BucketState:
    """:func:`_observe`'s refresh, after the factor update made ``factors`` (``ctx`` the update's): the basis from
    them, then the stages that follow it, each checked as :func:`_observe` says."""
    read = cfg.factors.factors(factors)
    given = _Given(("state", state.basis), ("factors", tuple(read)), rest=in_ctx) if "basis" in checked else None
    basis, change = cfg.basis.refresh(state.basis, read, ctx)
    if checked:
        _check_output("basis", checked, cfg, basis, state.basis, layout, G, g_version, given=given)
        if "basis" in checked:
            _check_change(change, basis, layout, cfg.basis)
    in_change = _Given(("change", change), read=False) if checked - {"basis", "post"} else None
    given = _Given(("state", state.inner), rest=in_change) if "inner" in checked else None
    inner = cfg.inner.on_basis_change(state.inner, change)
    if checked:
        _check_output("inner", checked, cfg, inner, state.inner, layout, G, g_version, given=given)
    if capabilities(cfg.split).follows_basis:
        given = _Given(("state", state.split), rest=in_change) if "split" in checked else None
        split = cfg.split.on_basis_change(state.split, change)
        if checked:
            _check_output("split", checked, cfg, split, state.split, layout, G, g_version, given=given)
    else:
        split = state.split
    if capabilities(cfg.factors).follows_basis:
        given = _Given(("state", factors), rest=in_change) if "factors" in checked else None
        followed = cfg.factors.on_basis_change(factors, change)
        if checked:
            _check_output("factors", checked, cfg, followed, factors, layout, G, g_version, given=given)
        factors = followed
    return evolve(state, factors=factors, basis=basis, inner=inner, split=split)


@_with_storage
def step(
    cfg: KronConfig, layout: Layout, state: BucketState, G: Tensor, *, defer: list[linalg.DeferredWrite] | None = None
) -> tuple[Tensor | None, BucketState]:
    """One call for a bucket: the direction ``D (b m n)`` (``None``: do not touch W) and the new state.

    ``defer`` (a list, on a CPU bucket whose state is kept in the compute dtype): a factor update made
    after the direction (``factor_update = "after"``) with no refresh following may be left to the state
    write; it then comes back there as :class:`kronopt.linalg.DeferredWrite` records, and the new state
    holds the factor's old stack (the caller runs them, :func:`run_deferred_`).

    What a stage from outside kronopt returns is checked where it is received (:class:`StageOutputError`: a
    direction or state tensor unlike the gradient or the state it was given, a new state record of another type,
    a basis change whose permutation is malformed, a tensor it was given changed in place, checked after each call
    it was given to: its state, ``ctx.basis``/``eigvals``/``flat``, the factors a refresh reads, a basis change):
    host-side reads of types, shapes, dtypes and version counters, no value read but a refresh's permutations on a
    CPU (:func:`_check_change`); kronopt's own stages, whose outputs a test checks so for every preset
    (:data:`CHECK_OWN_STAGES`), are not, so a built-in pipeline pays nothing."""
    first_call = state.calls == 0
    calls = state.calls + 1
    shared: dict[str, Any] = {}  # products of G that several stages use, computed once (StepContext.rotated)
    checked = _checked_slots(cfg)
    g_version = None if not checked or G.is_inference() else G._version
    if first_call and cfg.skip_first_call:
        state = _observe(cfg, layout, state, G, t=state.step, first_call=True, shared=shared, checked=checked, g_version=g_version)
        return None, evolve(state, calls=calls)
    t = state.step + 1
    if cfg.factor_update == "before":
        state = _observe(cfg, layout, state, G, t=t, first_call=first_call, shared=shared, checked=checked, g_version=g_version)
    ctx = context(cfg, layout, state, t, shared)
    in_ctx = _ctx_given(ctx) if checked - {"factors", "basis"} else None
    given = _Given(("state", state.inner), rest=in_ctx) if "inner" in checked else None
    D, inner = cfg.inner.direction(state.inner, G, ctx)
    if checked:
        _check_output("inner", checked, cfg, inner, state.inner, layout, G, g_version, D, given)
    D_inner = D
    given = _Given(("state", state.split), rest=in_ctx) if "split" in checked else None
    D, split = cfg.split.complement(state.split, G, D, ctx, lambda: cfg.inner.moment(inner, ctx))
    if checked:
        D_split = None if D is D_inner else D
        _check_output("split", checked, cfg, split, state.split, layout, G, g_version, D_split, given)
    given = _Given(("state", state.post), rest=in_ctx) if "post" in checked else None
    D, post = cfg.post.graft(state.post, G, D, ctx)
    if checked:
        _check_output("post", checked, cfg, post, state.post, layout, G, g_version, D, given)
    state = evolve(state, inner=inner, split=split, post=post)
    if cfg.factor_update == "after":
        if not capabilities(cfg.factors).reads_rotated:
            shared.clear()  # nothing reads the direction's rotation of G any more: free it before the update
        state = _observe(
            cfg, layout, state, G, t=t, first_call=first_call, shared=shared, defer=defer, checked=checked, g_version=g_version
        )
    return D, evolve(state, calls=calls, step=t)


def is_plain_adam(cfg: KronConfig, layout: Layout, dtype: torch.dtype) -> bool:
    """Whether :func:`adam_step` may stand in for :func:`step` on a bucket: AdamW proper (the ``adam``
    inner rule without ``normalize``, no factors, the identity basis, the full split, a plain ``post``),
    its state stored in the compute dtype ``dtype``, no skipped first call, no ``compile``."""
    from .inner_rules.adam import AdamInner

    return type(cfg.inner) is AdamInner and not cfg.inner.normalize and _inner_rule_alone(cfg, layout, dtype)


def _inner_rule_alone(cfg: KronConfig, layout: Layout, dtype: torch.dtype) -> bool:
    """Whether a config's step is its inner rule's alone, in the original coordinates: no factors, the identity
    basis, the full split, a plain ``post`` (no normalisation, no grafting), its state stored in the compute dtype
    ``dtype``, no skipped first call, no ``compile``, no restricted side (:func:`is_plain_adam`, :func:`is_plain_muon`)."""
    from .bases import IdentityBasis
    from .factors.ema import NoFactors
    from .splits import FullSplit

    return (
        type(cfg.factors) is NoFactors
        and type(cfg.basis) is IdentityBasis
        and type(cfg.split) is FullSplit
        and not cfg.post.normalize
        and cfg.post.grafting == "none"
        and not cfg.skip_first_call
        and not cfg.compile
        and storage_dtypes(cfg.storage, dtype) is None
        and "restricted" not in (layout.left, layout.right)
    )


def is_plain_muon(cfg: KronConfig, layout: Layout, dtype: torch.dtype) -> bool:
    """Whether a CPU may step a bucket as :meth:`~kronopt.optimizer.KronOptimizer._step_plain_muon` does, block
    by block around one batched iteration: Muon proper (the ``orthogonalize`` rule with its ``ema`` momentum and
    a named schedule, whose iteration keeps a finite input finite), no factors, the identity basis, the full
    split, a plain ``post``, its state stored in the compute dtype ``dtype``, no skipped first call, no
    ``compile``. Only the momentum and the counters then change."""
    from .inner_rules.orthogonalize import OrthogonalizeInner

    return (
        type(cfg.inner) is OrthogonalizeInner
        and cfg.inner.momentum_form == "ema"
        and cfg.inner.coefficients != "custom"
        and _inner_rule_alone(cfg, layout, dtype)
    )


def rotated_adam_due(cfg: KronConfig, layout: Layout, state: BucketState, dtype: torch.dtype) -> bool:
    """Whether :func:`rotated_adams` may stand in for :func:`step` on this call of a bucket: a config, layout and
    compute dtype it takes (:func:`_rotated_adam_config`), past the first call (a refresh due at this update
    included)."""
    return state.calls > 0 and _config_verdict(_ROTATED_ADAM, _rotated_adam_config, cfg, layout, dtype)


#: :func:`_rotated_adam_config`'s verdicts, by config (its ``id``, the config kept to tell a reused one), layout, dtype
#: and :data:`CHECK_OWN_STAGES`: one dictionary read a bucket and step
_ROTATED_ADAM: dict[tuple[Any, ...], tuple[KronConfig, bool]] = {}


def _config_verdict(
    cache: dict[tuple[Any, ...], tuple[KronConfig, bool]], verdict: Callable[[KronConfig, Layout, torch.dtype], bool],
    cfg: KronConfig, layout: Layout, dtype: torch.dtype,
) -> bool:
    """``verdict(cfg, layout, dtype)``, kept in ``cache`` by config (its ``id``, the config kept to tell a reused one),
    layout, dtype and :data:`CHECK_OWN_STAGES` (at most 64 entries): one dictionary read a bucket and step."""
    key = (id(cfg), layout, dtype, CHECK_OWN_STAGES)
    hit = cache.get(key)
    if hit is None or hit[0] is not cfg:
        if len(cache) >= 64:
            cache.clear()
        hit = cache[key] = (cfg, verdict(cfg, layout, dtype))
    return hit[1]


def _plain_tail(
    cfg: KronConfig, layout: Layout, dtype: torch.dtype, *, together: bool = False, restricted: bool = False
) -> bool:
    """What the CPU's in-place paths ask of a config past its inner rule: the factor update after the direction,
    the full split, a plain ``post``, no restricted side, the state stored in the compute dtype, no ``compile``,
    kronopt's own stages alone (none checked). ``together`` (:func:`eigen_steps`' terms): the factor update before
    the direction and a grafting ``post`` too; ``restricted`` (theirs for pro_kl_shampoo's calls): the ``lowrank_flat``
    split and at most one restricted side, instead of the full split and none."""
    from .splits import FullSplit, LowRankFlatSplit

    sides = (layout.left, layout.right).count("restricted")
    return (
        (together or cfg.factor_update == "after")
        and (
            type(cfg.split) is LowRankFlatSplit and sides <= 1 if restricted
            else type(cfg.split) is FullSplit and not sides
        )
        and not cfg.post.normalize
        and (together or cfg.post.grafting == "none")
        and not cfg.compile
        and storage_dtypes(cfg.storage, dtype) is None
        and not _checked_slots(cfg)
    )


def _rotated_adam_config(cfg: KronConfig, layout: Layout, dtype: torch.dtype) -> bool:
    """Whether :func:`rotated_adams` takes a config's calls past the first on ``layout`` in compute dtype ``dtype``: the
    ``adam`` inner rule without ``normalize`` in whatever basis (SOAP, DyKAF, KL-SOAP), a factor estimator updated after
    the direction, the full split, a plain ``post``, no restricted side, the state stored in the compute dtype, no
    ``compile``, kronopt's own stages alone (none checked)."""
    from .inner_rules.adam import AdamInner

    return type(cfg.inner) is AdamInner and not cfg.inner.normalize and _plain_tail(cfg, layout, dtype)


def rotated_adams(
    calls: Sequence[tuple[KronConfig, Layout, BucketState, Tensor, list[linalg.DeferredWrite] | None]],
    *, in_place: Sequence[Callable[[], bool] | None] | None = None,
) -> list[tuple[Tensor, BucketState]]:
    """:func:`step` of several buckets, each ``(cfg, layout, state, G, defer)`` a call where :func:`rotated_adam_due`
    holds, the same bits on a CPU (the only device the optimizer takes it on: an accelerator's fused ``foreach`` kernels
    may round otherwise): the factor updates, of several buckets at once where their stage can (an ``update_each``
    method: the ``ema``, ``projector_splitting`` and ``kl`` estimators'), else each in its turn, then the directions of
    them all (:func:`rotated_adam_directions`, each reading its call's rotation of ``G`` where the factor update made
    it: KL-SOAP's), then each due refresh in its turn (:func:`_refreshed`). The factor updates
    read neither the directions nor the moments (the ``after`` update of :func:`step` reads the old basis, which
    they leave as it was), so their order changes no bit. On small blocks a step costs its calls, not
    its arithmetic: a SOAP bucket's step is about 33 operator calls and the Python around each stage, nine of them
    elementwise.

    ``in_place``: per call, ``None`` or its caller's proof, a function that says whether the call's new moments and
    direction are sure to be finite on every block, every block being written (its gradients finite, every block
    taken). It is asked only where nothing else of the step can make a block fail: no refresh due, and the factor
    update left whole to the state write (a :class:`~kronopt.linalg.DeferredWrite` is made only where proven
    finite), its new factor record holding none of the floating tensors the guard tests. Where it says so, the
    call's moments are updated in their stacks (:func:`kronopt.linalg.adam_moments_each_`: no new tensor, nothing
    to test or copy), after every other call of the run and its refresh, so that a call that raises leaves no
    moment written; elsewhere new moments are made, as without it. The caller tells the calls made in place by
    their new moments, the stacks themselves.

    A refresh made here does not test its new basis itself (:attr:`StepContext.finite_fallback` off): where its
    result is finite, that test keeps it as it is, so the result is the same. The caller tests every tensor of the
    new states (the optimizer does, :meth:`~kronopt.KronOptimizer._step_small_buckets`) and makes a call whose
    new basis is not finite again with :func:`step`, where the refresh keeps the old basis of such a block."""
    due = [cfg.refresh.due(state.step + 1, first_call=False) for cfg, _, state, _, _ in calls]
    shared: list[dict[str, Any]] = [{} for _ in calls]
    _seed_eigvals(calls, list(range(len(calls))), [call[2] for call in calls], shared)
    ctxs = [
        context(cfg, layout, state, state.step + 1, shared[i], refresh_follows=d, defer=None if d else defer,
                finite_fallback=False)
        for i, ((cfg, layout, state, _, defer), d) in enumerate(zip(calls, due))
    ]
    updated = _updated_factors(calls, list(range(len(calls))), [call[2].factors for call in calls], ctxs)
    factors = [updated[i] for i in range(len(calls))]
    # (a factor update that left nothing to the write made new factors: no walk of its record needed to tell)
    proven = [
        in_place is not None and (prove := in_place[i]) is not None and not due[i] and bool(calls[i][4])
        and not changed_tensors(record, calls[i][2].factors) and prove()
        for i, record in enumerate(factors)
    ]
    # the calls made in place last, after every refresh: a call that raises (a refresh's solver) leaves no moment
    # of the run written
    made: list[Any] = [None] * len(calls)
    for own in (False, True):
        at = [i for i in range(len(calls)) if proven[i] == own]
        if not at:
            continue
        directions = rotated_adam_directions([calls[i] for i in at], in_place=own, ctxs=[ctxs[i] for i in at])
        for i, (D, inner) in zip(at, directions):
            cfg, layout, state, G, _ = calls[i]
            counters = {"calls": state.calls + 1, "step": state.step + 1}
            if due[i]:
                made[i] = (D, evolve(_refreshed(cfg, layout, evolve(state, inner=inner), factors[i], ctxs[i], G), **counters))
            else:
                made[i] = (D, evolve(state, factors=factors[i], inner=inner, **counters))
    return made


def rotated_adam_directions(
    calls: Sequence[tuple[KronConfig, Layout, BucketState, Tensor, list[linalg.DeferredWrite] | None]],
    *, in_place: bool = False, ctxs: Sequence[StepContext] | None = None,
) -> list[tuple[Tensor, Any]]:
    """The ``adam`` inner rule's ``direction`` of each call of :func:`rotated_adams`, ``(D, new moments)``, the same
    bits: each bucket's rotations in its turn, the elementwise work of them all in one ``foreach`` call per
    operation, Adam setting and update (on a CPU each runs the very kernel on every tensor, without the Python around it).
    ``in_place``: the moments of every call are updated in their stacks (:func:`rotated_adams`). ``ctxs``: each call's
    context, whose rotation of ``G`` a factor update may have made already (``kl``'s, :meth:`StepContext.rotated`):
    taken from there, as the pipeline's stages share it."""
    from .inner_rules.adam import AdamState

    # a state stored in the compute dtype (rotated_adam_due) holds its basis exactly
    H = [
        rotate_in(G, state.basis.Q_L, state.basis.Q_R, exact_basis=True, dtype=rotation_dtype(cfg)).H
        if ctxs is None else ctxs[i].rotated(G).H
        for i, (cfg, _, state, G, _) in enumerate(calls)
    ]
    settings: dict[tuple[Any, ...], list[int]] = {}
    for i, (cfg, _, state, _, _) in enumerate(calls):
        inner = cfg.inner
        key = (inner.betas, inner.eps, inner.eps_placement, inner.bias_correction, state.step + 1)
        settings.setdefault(key, []).append(i)
    out: list[Any] = [None] * len(calls)
    for (betas, eps, placement, bias_correction, t), at in settings.items():
        states = [calls[i][2] for i in at]
        m, v = [s.inner.exp_avg for s in states], [s.inner.exp_avg_sq for s in states]
        if in_place:
            linalg.adam_moments_each_(m, v, [H[i] for i in at], betas)
        else:
            m, v = linalg.adam_moments_each(m, v, [H[i] for i in at], betas)
        N, scale = linalg.adam_ratio_each(
            m, v, step=t, betas=betas, eps=eps, eps_placement=placement, bias_correction=bias_correction
        )
        D = [
            linalg.unrotate(N_i, s.basis.Q_L, s.basis.Q_R, dtype=rotation_dtype(calls[i][0]))
            for N_i, s, i in zip(N, states, at)
        ]
        torch._foreach_mul_(D, scale)
        for k, i in enumerate(at):
            out[i] = (D[k], AdamState(m[k], v[k]))
    return out


def eigen_steps_due(cfg: KronConfig, layout: Layout, state: BucketState, dtype: torch.dtype) -> bool:
    """Whether :func:`eigen_steps` may stand in for :func:`step` on this call of a bucket: a config, layout and compute
    dtype it takes (:func:`_eigen_steps_config`), past the first call (a refresh due at this update included)."""
    return state.calls > 0 and _config_verdict(_EIGEN_STEPS, _eigen_steps_config, cfg, layout, dtype)


#: :func:`_eigen_steps_config`'s verdicts, by config (its ``id``, the config kept), layout, dtype and
#: :data:`CHECK_OWN_STAGES`, as :data:`_ROTATED_ADAM`'s
_EIGEN_STEPS: dict[tuple[Any, ...], tuple[KronConfig, bool]] = {}


def _eigen_steps_config(cfg: KronConfig, layout: Layout, dtype: torch.dtype) -> bool:
    """Whether :func:`eigen_steps` takes a config's calls past the first on ``layout`` in compute dtype ``dtype``: the
    ``eigenvalue`` inner rule (KL-Shampoo's, Shampoo's, Pro-KLShampoo's) without ``normalize``, whatever factor
    estimator, then :func:`_plain_tail`'s terms, the factor update before the direction and grafting allowed: its
    momentum whole (``momentum_basis`` ``"original"`` or ``"eigen"``) with the full split and no restricted side, or
    split against the subspace of a restricted side (``"subspace"``) with the ``lowrank_flat`` split and at most one
    (no normalising ``post``, the state in the compute dtype, no ``compile``, kronopt's own stages alone)."""
    from .inner_rules.eigenvalue import EigenvalueInner

    inner = cfg.inner
    if type(inner) is not EigenvalueInner or inner.normalize:
        return False
    if inner.momentum_basis == "subspace":  # split where the layout has one restricted side, else whole
        return _plain_tail(cfg, layout, dtype, together=True, restricted=True)
    return _plain_tail(cfg, layout, dtype, together=True)


def eigen_steps(
    calls: Sequence[tuple[KronConfig, Layout, BucketState, Tensor, list[linalg.DeferredWrite] | None]],
) -> list[tuple[Tensor, BucketState]]:
    """:func:`step` of several buckets, each ``(cfg, layout, state, G, defer)`` a call where :func:`eigen_steps_due`
    holds, the same bits on a CPU (the only device the optimizer takes it on): the factor updates (each stage's calls
    together where it can: ``update_each``, the ``kl`` and ``ema`` estimators') and due refreshes of the calls that
    update before the direction (``factor_update = "before"``, Shampoo's), then the directions of each inner rule's
    calls together (:meth:`~kronopt.inner_rules.eigenvalue.EigenvalueInner.direction_each`), the complements of each
    ``lowrank_flat`` split's calls together (:meth:`~kronopt.splits.LowRankFlatSplit.complement_each`) and each call's
    grafting (``post.graft``), then the factor updates and refreshes of the others. The estimators' eigenvalues a
    context reads are taken for many calls at once where the stage can (``eigvals_each``, the ``kl`` estimator's). A
    call whose
    factors update after the direction shares one context between the two, so its rotation of ``G`` is made once
    (:meth:`StepContext.rotated`), as :func:`step`'s stages share it; the factor update reads neither the direction
    nor the momentum, so the order changes no bit.

    As in :func:`rotated_adams`, a refresh made here does not test its new basis (:attr:`StepContext.finite_fallback`
    off): the caller tests every new tensor and makes a call whose new basis is not finite again with :func:`step`.
    The new states' small vectors (the ``kl`` estimator's inverse roots and flat eigenvalues) may be views into one
    vector of the call's buckets: the optimizer copies them into its own stacks; another caller keeping them should
    copy them too."""
    t = [state.step + 1 for _, _, state, _, _ in calls]
    due = [cfg.refresh.due(t_i, first_call=False) for (cfg, _, _, _, _), t_i in zip(calls, t)]
    states = [call[2] for call in calls]
    shared: list[dict[str, Any]] = [{} for _ in calls]
    before = [i for i, call in enumerate(calls) if call[0].factor_update == "before"]
    after = [i for i, call in enumerate(calls) if call[0].factor_update != "before"]

    def contexts(at: list[int], *, observing: bool) -> dict[int, StepContext]:
        """The contexts of the calls at ``at`` on their ``states``, their eigenvalues taken together; ``observing``:
        a factor update's (its refresh and deferral as :func:`_observe` sets them)."""
        _seed_eigvals(calls, at, states, shared)
        out = {}
        for i in at:
            cfg, layout, _, _, defer = calls[i]
            held = defer if observing and not due[i] and cfg.factor_update == "after" else None
            out[i] = context(
                cfg, layout, states[i], t[i], shared[i], refresh_follows=due[i] if observing else True, defer=held,
                finite_fallback=False,
            )
        return out

    def observe(at: list[int], ctxs: dict[int, StepContext]) -> None:
        """:func:`_observe` of the calls at ``at`` with their contexts ``ctxs``, into ``states``."""
        factors = _updated_factors(calls, at, {i: states[i].factors for i in at}, ctxs)
        for i in at:
            cfg, layout, _, G, _ = calls[i]
            record = factors[i]
            if due[i]:
                states[i] = _refreshed(cfg, layout, states[i], record, ctxs[i], G)
            else:
                states[i] = evolve(states[i], factors=record)

    if before:
        observe(before, contexts(before, observing=True))
    ctxs = {**contexts(before, observing=False), **contexts(after, observing=True)}
    directions: list[Any] = [None] * len(calls)
    for group in _by_stage(calls, "inner", "direction_each").values():
        rule = calls[group[0]][0].inner
        inputs = [states[i].inner for i in group], [calls[i][3] for i in group], [ctxs[i] for i in group]
        for i, (D, inner) in zip(group, rule.direction_each(*inputs)):
            directions[i] = D
            states[i] = evolve(states[i], inner=inner)
    # the complements of the lowrank_flat split's calls, together
    for at in _by_stage(calls, "split", "complement_each").values():
        split = calls[at[0]][0].split
        made = split.complement_each(
            [states[i].split for i in at], [calls[i][3] for i in at], [directions[i] for i in at],
            [ctxs[i] for i in at],
            [functools.partial(calls[i][0].inner.moment, states[i].inner, ctxs[i]) for i in at],
        )
        for i, (D, record) in zip(at, made):
            directions[i] = D
            states[i] = evolve(states[i], split=record)
    for i, (cfg, _, _, G, _) in enumerate(calls):
        if cfg.post.grafting != "none":
            directions[i], post = cfg.post.graft(states[i].post, G, directions[i], ctxs[i])
            states[i] = evolve(states[i], post=post)
    if after:
        observe(after, ctxs)
    return [
        (D, evolve(state, calls=call[2].calls + 1, step=t_i))
        for D, state, call, t_i in zip(directions, states, calls, t)
    ]


def _updated_factors(
    calls: Sequence[tuple[Any, ...]], at: list[int], records: Any, ctxs: Any
) -> dict[int, Any]:
    """The new factor records of the calls at ``at`` (``records[i]`` and ``ctxs[i]`` call ``i``'s factor record and
    context), by position: the calls of each stage that updates several buckets at once in one ``update_each`` (the
    ``ema``, ``projector_splitting`` and ``kl`` estimators'), every other call's ``update`` in its turn. The calls
    read each their own bucket, so their order changes no bit."""
    out: dict[int, Any] = {}
    for group in _by_stage([calls[i] for i in at], "factors", "update_each").values():
        positions = [at[k] for k in group]
        stage = calls[positions[0]][0].factors
        made = stage.update_each(
            [records[i] for i in positions], [calls[i][3] for i in positions], [ctxs[i] for i in positions]
        )
        out.update(zip(positions, made))
    for i in at:
        if i not in out:
            out[i] = calls[i][0].factors.update(records[i], calls[i][3], ctxs[i])
    return out


def _seed_eigvals(
    calls: Sequence[tuple[Any, ...]], at: list[int], states: Sequence[BucketState], shared: list[dict[str, Any]]
) -> None:
    """The estimators' eigenvalues of the calls at ``at`` (their ``states``), taken together where their stage can
    (``eigvals_each``, the ``kl`` estimator's) and put in each call's ``shared`` as :func:`context` keeps them."""
    for group in _by_stage([calls[i] for i in at], "factors", "eigvals_each").values():
        stage = calls[at[group[0]]][0].factors
        for k, eigvals in zip(group, stage.eigvals_each([states[at[k]].factors for k in group])):
            shared[at[k]]["eigvals"] = (states[at[k]].factors, eigvals)


def _by_stage(calls: Sequence[tuple[Any, ...]], slot: str, method: str) -> dict[int, list[int]]:
    """The positions of the calls whose config's stage in ``slot`` has ``method``, by that stage (its ``id``)."""
    out: dict[int, list[int]] = {}
    for i, call in enumerate(calls):
        stage = getattr(call[0], slot)
        if hasattr(stage, method):
            out.setdefault(id(stage), []).append(i)
    return out


def rotated_gradient_bound(entries: int, g_abs: float, columns: float = 1.0) -> float:
    r"""A bound on every entry of a block's rotated gradient :math:`H = Q_L^\top G Q_R` from :math:`|G| \le` ``g_abs``,
    the block having ``entries`` = :math:`mn` entries and ``columns`` the product of the two bases' largest column
    norms (1 for orthonormal bases, and on a side without one): :math:`|H_{ij}| \le \|Q_{L,:i}\|\,\|G\|_2\,
    \|Q_{R,:j}\|`, and :math:`\|G\|_2 \le \|G\|_F \le \sqrt{mn}\,g_{abs}`; taken twice over for the rounding of
    the products (NaN stays NaN)."""
    return 2.0 * math.sqrt(entries) * g_abs * columns


def rotated_adam_is_safe(
    cfg: KronConfig, t: int, dtype: torch.dtype, entries: int, h_abs: float, m_abs: float, v_max: float,
    spread: float = 1.0,
) -> bool:
    r"""Whether a rotated Adam call (:func:`rotated_adams`) at update ``t`` in ``dtype`` is sure to give finite moments
    and a finite direction on a block of ``entries`` = :math:`mn` entries bounded by :math:`|H| \le` ``h_abs``
    (:func:`rotated_gradient_bound`), :math:`|m| \le` ``m_abs`` and :math:`0 \le v \le` ``v_max``, whose bases'
    spectral norms multiply to at most ``spread`` (1 for orthonormal bases); ``False`` where it cannot say (a
    non-finite bound, ``eps`` 0 as the dtype holds it).

    :math:`|m'| \le a = \max(m_{abs}, h_{abs})` (a convex combination), :math:`v' \le v_{max} + h_{abs}^2`, and every
    entry of the direction :math:`s\,Q_L N Q_R^\top`, :math:`N = m' / (\sqrt{v'}/d + \epsilon)`, is at most its
    Frobenius norm, :math:`\|Q_L\|_2 \|N\|_F \|Q_R\|_2\,s \le \mathrm{spread}\,\sqrt{mn}\,a / \epsilon / c_1` (the
    scale :math:`s` is at most :math:`1/c_1`). Each, and :math:`h_{abs}^2`, kept under a quarter of the dtype's
    largest value: room for every rounding on the way. :func:`adam_block_is_safe_of_terms`' test with ``h_abs`` for
    the gradient's bound, and the direction's bound times ``spread · √(mn)`` (at least 1)."""
    terms = adam_safety_terms(cfg, t, dtype)
    if not adam_block_is_safe_of_terms(terms, h_abs, m_abs, v_max):  # the unrotated block's terms, h for |g|
        return False
    eps, c1, big = terms
    return math.isfinite(spread) and spread * math.sqrt(entries) * max(m_abs, h_abs) / eps / c1 < big


def momentum_block_is_safe(dtype: torch.dtype, g_abs: float, buf_abs: float) -> bool:
    r"""Whether an EMA momentum :math:`\mathrm{lerp}(B, G, w)` with :math:`w \in [0, 1]` in ``dtype`` is sure to be
    finite on a block bounded by ``|G| ≤ g_abs`` and ``|B| ≤ buf_abs``; ``False`` when it cannot say (a
    non-finite bound). The result is a convex combination of the two, and the difference that ``lerp`` forms on
    the way is at most their sum, so both bounds are kept under a quarter of the dtype's largest value."""
    return math.isfinite(g_abs) and math.isfinite(buf_abs) and max(g_abs, buf_abs) < torch.finfo(dtype).max / 4


def eigen_momentum_due(cfg: KronConfig, layout: Layout, state: BucketState, dtype: torch.dtype) -> bool:
    """Whether :func:`momentum_in_place_step` may stand in for :func:`step` on this call of a bucket: a config,
    layout and compute dtype it takes (:func:`_eigen_momentum_config`), past the first call, with no refresh due
    (a refresh rotates the momentum into a new tensor)."""
    if state.calls == 0 or cfg.refresh.due(state.step + 1, first_call=False):
        return False
    return _config_verdict(_EIGEN_MOMENTUM, _eigen_momentum_config, cfg, layout, dtype)


#: :func:`_eigen_momentum_config`'s verdicts, by config (its ``id``, the config kept), layout, dtype and
#: :data:`CHECK_OWN_STAGES`, as :data:`_ROTATED_ADAM`'s
_EIGEN_MOMENTUM: dict[tuple[Any, ...], tuple[KronConfig, bool]] = {}


def _eigen_momentum_config(cfg: KronConfig, layout: Layout, dtype: torch.dtype) -> bool:
    """Whether :func:`momentum_in_place_step` takes a config's calls on ``layout`` in compute dtype ``dtype``: the
    ``eigenvalue`` inner rule (KL-Shampoo's) without ``normalize``, its momentum whole (``momentum_basis``
    ``"original"`` or ``"eigen"``), a scale of its eigenvalues bounded by its ``eps`` (``exponent`` below 0), the
    factor update after the direction, the full split, a plain ``post``, no restricted side, the state stored in the
    compute dtype, no ``compile``, kronopt's own stages alone (none checked)."""
    from .inner_rules.eigenvalue import EigenvalueInner

    inner = cfg.inner
    return (
        type(inner) is EigenvalueInner
        and not inner.normalize
        and inner.momentum_basis in ("original", "eigen")
        and inner.exponent < 0
        and _plain_tail(cfg, layout, dtype)
    )


def momentum_in_place_step(
    cfg: KronConfig, layout: Layout, state: BucketState, G: Tensor, defer: list[linalg.DeferredWrite],
    prove: Callable[[StepContext], bool],
) -> tuple[Tensor, BucketState]:
    """:func:`step` of a call where :func:`eigen_momentum_due` holds, the same bits, its momentum updated in its stack
    where ``prove`` says the call cannot fail.

    The factor update runs first: it reads the old state alone, as the direction does (the direction reads the old
    eigenvalue estimates, and the factor update no moment), so the order changes no bit, and the rotation of ``G``
    one makes serves the other as before. The update's factors are left to the state write where they are proven
    finite beforehand (``defer``), and whatever it made anew (the eigenvalue estimates, a factor it did not leave to
    the write) is read finite here; then nothing but the momentum and the direction can make a block fail, and
    ``prove(ctx)``, the caller's, says whether those are sure to be finite on every block
    (:func:`eigen_momentum_is_safe`). Where it does
    the rule updates its momentum in its own stack (``direction(..., in_place=True)``): no new tensor, nothing to
    test or copy. Elsewhere the call is :func:`step`'s. The caller tells the calls made in place by their new
    momentum, the stack itself."""
    t = state.step + 1
    shared: dict[str, Any] = {}
    factors = _observe(cfg, layout, state, G, t=t, first_call=False, shared=shared, defer=defer).factors
    ctx = context(cfg, layout, state, t, shared)
    # the update's new tensors (its eigenvalue estimates, a factor it did not leave to the write) and the
    # direction's eigenvalue estimates, read finite in one test
    read = changed_tensors(factors, state.factors) + [lam for lam in ctx.eigvals if lam is not None]
    in_place = (not read or linalg.cpu_all(linalg.all_finite(read))) and prove(ctx)
    D, inner = cfg.inner.direction(state.inner, G, ctx, in_place=in_place)  # type: ignore[call-arg]
    D, split = cfg.split.complement(state.split, G, D, ctx, lambda: cfg.inner.moment(inner, ctx))
    D, post = cfg.post.graft(state.post, G, D, ctx)
    return D, evolve(state, factors=factors, inner=inner, split=split, post=post, calls=state.calls + 1, step=t)


def eigen_momentum_is_safe(
    cfg: KronConfig, ctx: StepContext, dtype: torch.dtype, x_abs: float, m_abs: float, columns: float = 1.0,
    spread: float = 1.0,
) -> bool:
    r"""Whether the ``eigenvalue`` rule's call (:func:`momentum_in_place_step`) at ``ctx``, its eigenvalue estimates
    (``ctx.eigvals``) read finite by the caller, in ``dtype`` is sure to give
    a finite momentum and a finite direction on a block whose momentum's input (the rotated gradient :math:`H`
    under ``momentum_basis = "eigen"``, the gradient under ``"original"``) is bounded by ``x_abs`` and its momentum by
    ``m_abs``, its bases' largest column norms multiplying to ``columns`` and their spectral norms to at most
    ``spread`` (1 and about :math:`\sqrt{mn}` for orthonormal bases); ``False`` where it cannot say (a non-finite
    bound, ``eps`` 0 as the dtype holds it).

    The new momentum is a convex combination, :math:`|m'| \le a = \max(m_{abs}, x_{abs})`, and ``lerp`` forms a
    difference of at most their sum on the way (:func:`momentum_block_is_safe`). Bias-corrected, :math:`a/c_1`.
    Under ``"original"`` it is rotated into the basis first: at most :func:`rotated_gradient_bound` of that. The
    scale of each entry is at most :math:`1/\epsilon` (``eps_placement`` ``"product"``: the denominator
    :math:`(\lambda_{L,i}\lambda_{R,j})^{-p} + \epsilon` of finite non-negative roots; ``"outside"``: per rotated
    side), or :math:`\epsilon^{p}` a side (``"inside"``: :math:`(\lambda + \epsilon)^{p}`, ``p < 0``), and the
    rotation back multiplies the largest entry by at most ``spread`` times :math:`\sqrt{mn}`; each bound is kept
    under a quarter of the dtype's largest value, room for every rounding on the way. Before the first refresh
    (``ctx.basis.ready`` false) the direction is the momentum itself."""
    inner = cfg.inner
    big = torch.finfo(dtype).max / 4
    eps = _held_as(inner.eps, dtype)
    if not (eps > 0 and math.isfinite(columns) and math.isfinite(spread) and momentum_block_is_safe(dtype, x_abs, m_abs)):
        return False
    c1 = 1 - inner.momentum**ctx.step if inner.bias_correction else 1.0
    a = max(m_abs, x_abs) / c1
    if not (c1 > 0 and a < big):
        return False
    if not ctx.basis.ready:
        return True
    sides = [lam for lam in ctx.eigvals if lam is not None]
    m, n = ctx.layout.m, ctx.layout.n
    if inner.momentum_basis == "original":
        a = rotated_gradient_bound(m * n, a, columns)
    if inner.eps_placement == "inside":
        scale = eps ** (inner.exponent * len(sides))
    elif inner.eps_placement == "outside":
        scale = eps ** -len(sides)
    else:
        scale = 1 / eps
    return a * scale < big and spread * math.sqrt(m * n) * a * scale < big


def muon_look_ahead(buf: Tensor, g: Tensor, weight: float, *, out: Tensor) -> Tensor:
    """Plain Muon's look-ahead of one block into ``out`` (the CPU's block-by-block form,
    :meth:`kronopt.KronOptimizer._step_plain_muon`): the momentum ``buf`` moved ``weight`` of the way to the
    gradient ``g`` (``1 − μ²`` with Nesterov; ``1 − μ`` without it, the new momentum itself)."""
    return torch.lerp(buf, g, weight, out=out)


def muon_block_direction(O: Tensor, scale: float, *, out: Tensor) -> Tensor:
    """Plain Muon's direction of one block into ``out``: its orthogonalised look-ahead ``O`` times the shape
    factor ``scale``."""
    return out.copy_(O).mul_(scale)


def muon_momentum_(buf: Tensor, g: Tensor, momentum: float) -> None:
    """Plain Muon's momentum of one block advanced in place once its direction is written:
    ``buf ← μ buf + (1 − μ) g``."""
    buf.lerp_(g, 1 - momentum)


def adam_step(
    cfg: KronConfig, state: BucketState, grads: Sequence[Tensor], out: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, BucketState]:
    """:func:`step` for a bucket where :func:`is_plain_adam` holds, bit for bit, on the blocks' gradients
    ``grads`` (``b`` tensors ``(m n)``, only read: no stacking copy; of the state's dtype or a narrower one it holds
    exactly, each cast into its block of ``D`` before the moments read it), with the new moments and the
    direction written into ``out = (m, v, D)`` (scratch tensors ``(b m n)``) instead of fresh ones: on
    CPU a fresh tensor of a few MiB costs as much as a pass over it (the allocator hands the pages back
    and takes them again). The other stages keep nothing here, so only the inner rule's record and the
    counters change."""
    t = state.step + 1
    m, v = out[0], out[1]
    for i, g in enumerate(grads):  # the same entrywise operations as on the stack, block by block
        # (a gradient narrower than the state cast into the direction's block first: written last, below)
        _adam_moments(cfg, state.inner.exp_avg[i], state.inner.exp_avg_sq[i], widened_block(g, out[2][i]), m[i], v[i])
    D = _adam_direction(cfg, t, m, v, out[2])
    return D, attrs.evolve(state, inner=attrs.evolve(state.inner, exp_avg=m, exp_avg_sq=v), calls=state.calls + 1, step=t)


@functools.cache
def widens_exactly(narrow: torch.dtype, wide: torch.dtype) -> bool:
    """Whether every value of the floating dtype ``narrow`` is one of ``wide``'s and ``narrow`` is the narrower
    (bfloat16 and float16 in float32 or float64, float32 in float64; not float16 in bfloat16, whose range
    is wider but whose digits are fewer): a cast from one to the other is exact, and the plain paths take such
    gradients (:func:`widened_block`). (Kept per pair: asked per gradient and step, and ``torch.promote_types``
    is an operator call.)"""
    return narrow != wide and narrow.is_floating_point and torch.promote_types(narrow, wide) == wide


def state_holds(dtype: torch.dtype, state: torch.dtype) -> bool:
    """Whether a plain path takes a gradient of ``dtype`` beside a state of dtype ``state``: the state's own, or a
    narrower one it holds exactly (:func:`widens_exactly`), which it casts block by block (:func:`widened_block`)."""
    return dtype == state or widens_exactly(dtype, state)


def widened_block(g: Tensor, into: Tensor) -> Tensor:
    """A block's gradient ``g`` in the dtype of ``into`` (a scratch tensor of the block's shape): ``g`` itself where it
    is of that dtype, else cast into ``into``, exactly (a narrower dtype the state's holds:
    :func:`widens_exactly`): the values the general path's stack of the gradients cast to the state's dtype holds, so
    the block's arithmetic gives its bits. The caller's arithmetic reads it before it writes ``into``
    (:func:`adam_block` and :func:`adam_step` write their direction there last)."""
    return g if g.dtype == into.dtype else into.copy_(g)


def adam_block(cfg: KronConfig, t: int, m: Tensor, v: Tensor, g: Tensor, out: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """One block of :func:`adam_step` at update ``t``: its new moments into ``out[0]``, ``out[1]`` and its
    direction into ``out[2]`` (returned), from the moments ``m``, ``v`` and the gradient ``g`` (all ``(m n)``).
    The same operations on the same entries as :func:`adam_step`, so the same bits; small enough to stay
    in the CPU's cache from the first operation to the last. Every operation is entrywise, so ``out`` may
    be ``(m, v, scratch)``: the moments updated in place."""
    _adam_moments(cfg, m, v, g, out[0], out[1])
    return _adam_direction(cfg, t, out[0], out[1], out[2])


def fuses_adamw(cfg: KronConfig) -> bool:
    """Whether torch's fused AdamW kernel (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)``
    runs) computes this plain AdamW's arithmetic: ε after the bias correction, bias correction on, the
    decoupled decay before the step. It then equals :func:`adam_block` and the write up to rounding."""
    inner = cfg.inner
    return (
        hasattr(torch, "_fused_adamw_")
        and inner.eps_placement == "after_correction"
        and inner.bias_correction
        and cfg.post.weight_decay_order == "before"
    )


def fused_adamw_(
    cfg: KronConfig, t: int, params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor],
    *, lr: float, weight_decay: float,
) -> None:
    """Update ``t`` of blocks known to stay finite (:func:`adam_block_is_safe`) in one call of torch's fused
    AdamW kernel: the parameters ``params`` and the moments ``ms``, ``vs`` in place, from ``grads`` (only
    read); every list holds one contiguous tensor per block, all of one dtype and device (:func:`fuses_adamw`)."""
    beta1, beta2 = cfg.inner.betas
    step = torch.full((), float(t), dtype=torch.float32, device=params[0].device)
    torch._fused_adamw_(
        params, grads, ms, vs, [], [step] * len(params), lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=cfg.inner.eps, amsgrad=False, maximize=False,
    )


def adam_block_is_safe(cfg: KronConfig, t: int, dtype: torch.dtype, g_abs: float, m_abs: float, v_max: float) -> bool:
    r"""Whether :func:`adam_block` at update ``t`` is sure to give finite moments and a finite direction in
    ``dtype`` on a block bounded by ``|g| ≤ g_abs``, ``|m| ≤ m_abs``, ``0 ≤ v ≤ v_max``; ``False`` when
    it cannot say (a non-finite bound, ``eps = 0``).

    The new first moment is a convex combination of ``m`` and ``g``, so :math:`|m'| \le a = \max(g_{abs}, m_{abs})`;
    the new second moment is at most :math:`v_{max} + g_{abs}^2`; the direction's denominator is at least
    :math:`\epsilon`, so :math:`|D| \le a / \epsilon \cdot s` with the bias-correction scale
    :math:`s \le 1/(1-\beta_1^t)`. Each bound is kept under a quarter of the dtype's largest value, which
    leaves room for the rounding of every operation on the way.
    """
    return adam_block_is_safe_of_terms(adam_safety_terms(cfg, t, dtype), g_abs, m_abs, v_max)


def adam_block_is_safe_of_terms(terms: tuple[float, float, float], g_abs: float, m_abs: float, v_max: float) -> bool:
    """:func:`adam_block_is_safe` with its config's :func:`adam_safety_terms` given."""
    eps, c1, big = terms
    if not (eps > 0 and c1 > 0 and math.isfinite(g_abs) and math.isfinite(m_abs) and math.isfinite(v_max)):
        return False
    a = max(g_abs, m_abs)
    return a < big and g_abs < math.sqrt(big) and v_max + g_abs * g_abs < big and a / eps / c1 < big


def adam_safety_terms(cfg: KronConfig, t: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """:func:`adam_block_is_safe`'s terms of a config at update ``t`` in ``dtype``: ``(eps, c1, big)``, ``eps`` as
    the dtype holds it (the kernels add it in that dtype: an ``eps`` below its smallest subnormal number is 0
    there, and proves nothing), the bias correction's :math:`1-\beta_1^t` (1 without it) and a quarter of the
    dtype's largest value."""
    inner = cfg.inner
    c1 = 1 - inner.betas[0] ** t if inner.bias_correction else 1.0
    return _held_as(inner.eps, dtype), c1, torch.finfo(dtype).max / 4


@functools.lru_cache(maxsize=64)
def _held_as(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype`` (and back to a Python float)."""
    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


def adam_blocks_are_safe(extremes: Tensor, terms: Tensor) -> Tensor:
    """:func:`adam_block_is_safe` of many blocks at once, the same verdicts: ``extremes`` ``(k, 5)`` float64, each
    block's smallest and largest gradient entry, smallest and largest first moment and largest second moment
    (NaN where the gradient holds one); ``terms`` ``(k, 3)`` float64, its :func:`adam_safety_terms`. Returns ``(k)``
    bools in a dozen calls whatever ``k`` (a thousand small blocks' verdicts in Python cost more than their
    arithmetic). The bounds are the scalar form's, Python's ``max`` included (the first argument unless the second
    is larger, so a NaN second is passed over): ``max |g|`` the larger of the negated smallest and the largest
    entry, NaN where their sum is; each comparison its own in float64, whose operations round alike."""
    g_lo, g_hi, m_lo, m_hi, v_max = extremes.unbind(1)
    eps, c1, big = terms.unbind(1)
    g_abs = torch.where((g_lo + g_hi).isnan(), g_lo + g_hi, _py_max(-g_lo, g_hi))
    m_abs = _py_max(-m_lo, m_hi)
    a = _py_max(g_abs, m_abs)
    return (
        (eps > 0) & (c1 > 0) & g_abs.isfinite() & m_abs.isfinite() & v_max.isfinite() & (a < big)
        & (g_abs < big.sqrt()) & (v_max + g_abs * g_abs < big) & (a / eps / c1 < big)
    )


def _py_max(a: Tensor, b: Tensor) -> Tensor:
    """Python's ``max(a, b)`` entry by entry: ``b`` where it is larger, else ``a`` (NaN compares as not larger)."""
    return torch.where(b > a, b, a)


def _adam_moments(cfg: KronConfig, m: Tensor, v: Tensor, g: Tensor, m_out: Tensor, v_out: Tensor) -> None:
    beta1, beta2 = cfg.inner.betas
    torch.lerp(m, g, 1 - beta1, out=m_out)
    torch.mul(v, beta2, out=v_out).addcmul_(g, g, value=1 - beta2)


def _adam_direction(cfg: KronConfig, t: int, m: Tensor, v: Tensor, out: Tensor) -> Tensor:
    inner = cfg.inner
    N, scale = linalg.adam_ratio(
        m, v, step=t, betas=inner.betas, eps=inner.eps, eps_placement=inner.eps_placement,
        bias_correction=inner.bias_correction, out=out,
    )
    return N.mul_(scale)


# -- generic operations on state records ------------------------------------------------


_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The attrs field names of ``cls`` (``None``: not an attrs class), cached: the records are walked every step."""
    try:
        return _FIELDS[cls]
    except KeyError:
        names = tuple(f.name for f in attrs.fields(cls)) if attrs.has(cls) else None
        _FIELDS[cls] = names
        return names


def map_tensors(record: Any, fn: Any) -> Any:
    """A copy of an attrs state record with ``fn`` applied to every tensor (recursively)."""
    return zip_records([record], lambda ts: fn(ts[0]))


def zip_tensors(new: Any, old: Any, fn: Any) -> Any:
    """Combine two records of the same structure tensor by tensor with ``fn(new, old)``."""
    return zip_records([new, old], lambda ts: fn(*ts))


def zip_records(records: list[Any], fn: Any) -> Any:
    """Combine records of the same structure tensor by tensor with ``fn(tensors)``: a copy of the first
    record with each tensor replaced; its ints, bools and ``None`` fields kept."""
    first = records[0]
    if isinstance(first, Tensor):
        return fn(records)
    names = _field_names(type(first))
    if names is None:
        return first
    changes = {}
    for name in names:
        value = getattr(first, name)
        if isinstance(value, Tensor) or _field_names(type(value)) is not None:
            changes[name] = zip_records([getattr(r, name) for r in records], fn)
    return attrs.evolve(first, **changes) if changes else first


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """``{"inner.exp_avg": tensor, "calls": 3, ...}``: tensors and Python scalars by dotted path."""
    out: dict[str, Any] = {}
    for name in _field_names(type(record)) or ():
        value = getattr(record, name)
        path = f"{prefix}{name}"
        if _field_names(type(value)) is not None:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten(template: Any, flat: dict[str, Any], prefix: str = "") -> Any:
    """Fill a template record (from :func:`init_state`) with the values of :func:`flatten`.

    Raises:
        ValueError: the saved entries are not those of this template (another pipeline's state).
    """
    if not prefix:
        expected = flatten(template)
        missing = sorted(expected.keys() - flat.keys())
        extra = sorted(flat.keys() - expected.keys())
        kinds = sorted(k for k in expected.keys() & flat.keys() if (expected[k] is None) != (flat[k] is None))
        if missing or extra or kinds:
            raise ValueError(
                "saved state does not fit this pipeline: "
                + "; ".join(
                    f"{what}: {', '.join(keys)}"
                    for what, keys in (("missing", missing), ("unexpected", extra), ("tensor vs none", kinds))
                    if keys
                )
            )
    changes = {}
    for f in attrs.fields(type(template)):
        value = getattr(template, f.name)
        path = f"{prefix}{f.name}"
        if attrs.has(type(value)):
            changes[f.name] = unflatten(value, flat, path + ".")
        elif path in flat:
            new = flat[path]
            if isinstance(value, Tensor):
                if not isinstance(new, Tensor) or new.shape != value.shape:
                    got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                    raise ValueError(f"saved state {path!r} has shape {got}, expected {tuple(value.shape)}")
                new = new.to(device=value.device, dtype=value.dtype)
            changes[f.name] = new
        elif value is not None:
            raise ValueError(f"saved state lacks {path!r}")
    return attrs.evolve(template, **changes)


# -- per-block state: the optimizer's ``state[p]`` ----------------------------------------


def is_batched(value: Any, batch: int) -> bool:
    """Whether a state value carries the block axis first (a tensor ``(b ...)``).

    The stage contract gives every state tensor the leading axis ``b``, and :func:`init_state` refuses a
    stage whose ``init`` makes one without it (0-d, or a leading size other than ``b``: a bucket splits
    and joins by rows, and the non-finite guard writes per block). A record built by hand with one
    is treated as shared by the whole bucket here and in :func:`block_entries` / :func:`stack_entries`.
    """
    return isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch


def block_entries(record: Any, batch: int) -> list[dict[str, Any]]:
    """Per block, ``{dotted path: value}``: ``t[i]`` for batched tensors (a view of the stack,
    no copy); bucket-wide tensors, ints and bools as they are (the same object for every
    block); ``None`` fields left out."""
    flat = {k: v for k, v in flatten(record).items() if v is not None}
    batched = [k for k, v in flat.items() if is_batched(v, batch)]
    shared = {k: v for k, v in flat.items() if k not in batched}
    return [{**{k: flat[k][i] for k in batched}, **shared} for i in range(batch)]


def scalar_entries(record: Any) -> dict[str, Any]:
    """The Python ints and bools of a record by dotted path (the counters that change every step): the
    entries of :func:`flatten` that are neither tensors nor ``None``, in its order (read every step, so
    without a path for the others)."""
    out: dict[str, Any] = {}
    _scalars_into(out, record, "")
    return out


def _scalars_into(out: dict[str, Any], record: Any, prefix: str) -> None:
    for name in _field_names(type(record)) or ():
        value = getattr(record, name)
        if value is None or isinstance(value, Tensor):
            continue
        if _field_names(type(value)) is not None:
            _scalars_into(out, value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = value


def with_scalars_of(record: Any, other: Any) -> Any:
    """``record`` with the Python ints and bools of ``other`` (a record of the same structure, e.g. the
    state a call started from): its tensors and ``None`` fields kept."""
    names = _init_names(type(record))
    if names is None or type(other) is not type(record):
        return record
    changes = {}
    for name, init in names:
        value, before = getattr(record, name), getattr(other, name)
        if _init_names(type(value)) is not None:
            kept = with_scalars_of(value, before)
        elif value is None or isinstance(value, Tensor) or before is None or value == before:
            continue
        else:
            kept = before
        if kept is not value and init is not None:
            changes[init] = kept
    return attrs.evolve(record, **changes) if changes else record


def adopt_saved(cfg: KronConfig, entry: dict[str, Any]) -> dict[str, Any]:
    """A block's saved entry as this pipeline keeps it: each stage with an ``adopt_saved(entry)`` member (an
    optional one, for a stage that can read its state saved in another form, e.g. the eigenvalue rule's
    momentum kept whole or split) converts what it recognises; anything else is left for
    :func:`stack_entries` to check."""
    for stage in (cfg.factors, cfg.basis, cfg.inner, cfg.split, cfg.post):
        adopt = getattr(stage, "adopt_saved", None)
        if adopt is not None:
            entry = adopt(entry)
    return entry


def stack_entries(template: Any, entries: list[dict[str, Any]], names: list[str]) -> Any:
    """The inverse of :func:`block_entries`: fill ``template`` (from :func:`init_state`, batch
    ``len(entries)``) with the blocks' values stacked along a new first axis.

    Values shared by the bucket (ints, bools, bucket-wide tensors) must agree across
    the blocks. Nothing here mutates its inputs.

    Raises:
        ValueError: naming the block (``names[i]``) and the key: a missing or unexpected
            entry, a shape that does not fit, or blocks that disagree on a shared value.
    """
    batch = len(entries)
    expected = flatten(template)
    wanted = {k for k, v in expected.items() if v is not None}
    flat: dict[str, Any] = {k: None for k, v in expected.items() if v is None}
    for i, entry in enumerate(entries):
        missing, extra = sorted(wanted - entry.keys()), sorted(entry.keys() - expected.keys())
        none_given = sorted(k for k in entry.keys() & flat.keys() if entry[k] is not None)
        if missing or extra or none_given:
            raise ValueError(
                f"saved state of {names[i]} does not fit this pipeline: "
                + "; ".join(
                    f"{what}: {', '.join(keys)}"
                    for what, keys in (("missing", missing), ("unexpected", extra), ("tensor vs none", none_given))
                    if keys
                )
            )
    for key in sorted(wanted):
        like = expected[key]
        values = [entry[key] for entry in entries]
        if is_batched(like, batch):
            for name, value in zip(names, values):
                if not isinstance(value, Tensor) or tuple(value.shape) != tuple(like.shape[1:]):
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"saved state {key!r} of {name} has shape {got}, expected {tuple(like.shape[1:])}")
            flat[key] = _stack_like([v.to(device=like.device, dtype=like.dtype) for v in values])
            continue
        first = values[0]
        for name, value in zip(names[1:], values[1:]):
            same = (
                isinstance(value, Tensor) and value.shape == first.shape and torch.equal(value.cpu(), first.cpu())
                if isinstance(first, Tensor)
                else not isinstance(value, Tensor) and value == first
            )
            if not same:
                raise ValueError(f"saved state {key!r} differs between {names[0]} and {name}, which share a bucket")
        flat[key] = first
    return unflatten(template, flat)


def _stack_like(blocks: list[Tensor]) -> Tensor:
    """``torch.stack(blocks)``, but keeping the blocks' memory layout under the batch axis.

    A stack written by a step has the layout of the stage's output (a QR basis is
    column-major); reductions over it round by that layout, so a resumed stack
    must have it too, or the resume would differ in the last bits.
    """
    first = blocks[0]
    dense = torch.empty_like(first).stride() == first.stride()  # preserve_format keeps the strides of a dense tensor
    if not dense or any(b.stride() != first.stride() for b in blocks):
        return torch.stack(blocks)
    out = torch.empty_strided((len(blocks), *first.shape), (first.numel(), *first.stride()), dtype=first.dtype, device=first.device)
    for i, block in enumerate(blocks):
        out[i].copy_(block)
    return out


def cat_states(records: list[Any]) -> Any:
    """The records of several buckets of one pipeline joined into one: each tensor the blocks' rows of every
    record in turn (one ``cat``, into a stack of the first record's memory layout), the ints, bools and
    ``None`` fields the first record's (the caller joins records whose counters agree). ``None`` where a
    tensor's layout differs between the records: a stack's layout decides how reductions over it round, so
    joining such stacks would change the bits of the blocks' next steps."""
    try:
        return zip_records(records, cat_stacks)
    except _LayoutsDiffer:
        return None


class _LayoutsDiffer(Exception):
    """Raised by :func:`cat_stacks` inside :func:`cat_states`' walk."""


def cat_stacks(stacks: list[Tensor]) -> Tensor:
    """``torch.cat(stacks)`` into a stack whose blocks keep the stacks' own memory layout (a plain ``cat`` makes a
    column-major basis row-major, and reductions over it round by the layout); :class:`_LayoutsDiffer` where it
    differs between them. Joins buckets (:func:`cat_states`) and picks a split bucket's rows (``t[i : i + 1]``).
    Made outside ``torch.inference_mode()``, as a step's new state is (:func:`_stack_outside_inference`): a split or
    join under it would otherwise leave stacks a later plain step cannot update."""
    block = stacks[0][0]
    if any(s[0].stride() != block.stride() for s in stacks):
        raise _LayoutsDiffer
    shape = (sum(s.shape[0] for s in stacks), *block.shape)
    with torch.inference_mode(False):
        if torch.empty_like(block).stride() != block.stride():  # not dense: a plain cat
            return torch.cat(stacks)
        out = torch.empty_strided(shape, (block.numel(), *block.stride()), dtype=block.dtype, device=block.device)
        return torch.cat(stacks, out=out)


def finite_new_state(new: Any, old: Any, *also: Tensor | None) -> Tensor | None:
    """``(b)`` mask: True where every floating tensor the step changed is finite on that block (``None``: none changed).

    A finite gradient can still overflow a state tensor (a 1e20 gradient squared in
    float32); the optimizer treats such a block like a non-finite gradient. Tensors in
    ``also`` (e.g. the direction) join the same test: one finiteness pass for all.
    """
    return finite_blocks_of(changed_tensors(new, old, *also))


def finite_blocks_of(changed: list[Tensor]) -> Tensor | None:
    """:func:`finite_new_state`'s mask of tensors already found (:func:`changed_tensors`,
    :meth:`StagedWrite.changed`); ``None`` where there are none."""
    return linalg.finite_blocks(*changed) if changed else None


def changed_tensors(new: Any, old: Any, *also: Tensor | None) -> list[Tensor]:
    """The floating tensors of ``new`` that the step made (not ``old``'s own), then those of ``also``:
    what :func:`finite_new_state` tests."""
    return _tested([n for n, o in _tensor_pairs(new, old) if n is not o], also)


def _tested(made: list[Tensor], also: tuple[Tensor | None, ...]) -> list[Tensor]:
    """Of a step's new tensors, the floating ones with a block axis, then ``also``'s (the direction): what the
    finiteness test reads."""
    return [n for n in made if n.ndim >= 1 and n.is_floating_point()] + [t for t in also if t is not None]


def _stack_outside_inference(t: Tensor) -> Tensor:
    """``t`` as a stack to keep: an inference tensor (made by a step under ``torch.inference_mode()``) copied into a
    plain one, which the steps after it, outside that mode, may update in place (an inference tensor they could not)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape lie alike in memory: the same strides but along dims of size 1, whose
    stride no entry's place reads (a ``(b, d, 1)`` stack written ``(d, 1, d)`` or ``(d, 1, 1)`` is one layout).
    A new tensor of another layout replaces its stack (and every view of it); of this one, it is written in."""
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for x, y, size in zip(sa, sb, a.shape) if size != 1)


class _StateWalk:
    """:func:`write_`'s walk of a new state record against the stacks' record. Its own object, not
    functions nested in :func:`write_`: a nested function that calls itself holds itself through its
    closure, a reference cycle that would keep every new state tensor of the step alive until
    Python's cycle collector runs (tests: ``test_a_step_leaves_no_reference_cycles``)."""

    __slots__ = ("counters", "ok", "replaced", "writes")

    def __init__(self, ok: Tensor | None) -> None:
        self.ok = ok  # None: a staged walk (stage_write), which stops at the first replaced field
        self.replaced = False
        # the writes wait for the end of the walk: a new tensor that shares storage with a stack to be
        # written is then copied first (a write could otherwise change it before it is read)
        self.writes: list[tuple[Tensor, Tensor]] = []
        self.counters: dict[str, Any] = {}  # the ints and bools that changed, by dotted path (scalar_entries' keys)

    def select(self, n: Tensor | None, o: Tensor | None) -> Tensor | None:
        if n is o:
            return o
        if n is None or o is None or n.shape != o.shape or not _same_layout(n, o) or n.dtype != o.dtype or n.device != o.device:
            self.replaced = True
            if n is None or o is None:
                return n if n is None else _stack_outside_inference(n)
            if self.ok is None:
                raise _NeedsVerdict
            return _stack_outside_inference(torch.where(self.ok.view(-1, *([1] * (n.ndim - 1))), n, o))
        self.writes.append((o, n))
        return o

    def merge(self, n: Any, o: Any, field: str, prefix: str = "") -> Any:
        # the stacks' record itself where only its tensors' contents changed (no new record per
        # step): a record is rebuilt only where a counter or a replaced field differs. Walked every
        # step for every bucket, so the common cases come first: a field the step left as it was, then
        # a new tensor for a stack.
        if n is o:
            return o
        names = _init_names(type(n))
        if names is None:  # not a record
            n_tensor, o_tensor = isinstance(n, Tensor), isinstance(o, Tensor)
            if n_tensor or o_tensor:
                if not ((n_tensor or n is None) and (o_tensor or o is None)):
                    raise ValueError(f"state field {field!r} changed between a tensor and a {type(n if o_tensor else o).__name__}")
                return self.select(n, o)
            if (n is None) != (o is None):
                self.replaced = True
            return n
        # a record that appears or changes type is built from the new one, its tensors still
        # selected per block against the old fields of the same name
        if type(o) is type(n):
            base = o
        else:
            base, self.replaced = n, True
        changes = {}
        for name, init in names:
            value, before = getattr(n, name), getattr(o, name, None)
            if value is before:
                kept = before
            elif type(value) is Tensor and type(before) is Tensor:  # a new tensor for a stack: no walk
                kept = self.select(value, before)
            else:
                kept = self.merge(value, before, name, f"{prefix}{name}.")
            if init is not None:
                current = before if base is o else getattr(base, name)
                if kept is not current and not _same(kept, current):
                    changes[init] = kept
                    if kept is not None and not isinstance(kept, Tensor) and _field_names(type(kept)) is None:
                        self.counters[f"{prefix}{name}"] = kept
        return evolve(base, **changes) if changes else base


class _NeedsVerdict(Exception):
    """A staged walk (:func:`stage_write`) met a field to replace, which is made per block from the verdicts."""


@attrs.define(eq=False)
class StagedWrite:
    """A step's new state walked against the stacks before the verdicts (:func:`stage_write`): the record to keep,
    the ``(stack, new tensor)`` writes still to make (:func:`write_staged_`) and the ints and bools that changed,
    by :func:`scalar_entries`' dotted paths."""

    kept: Any
    writes: list[tuple[Tensor, Tensor]]
    counters: dict[str, Any]

    def changed(self, *also: Tensor | None) -> list[Tensor]:
        """:func:`changed_tensors` of the walked state, from the writes (no second walk)."""
        return _tested([n for _, n in self.writes], also)


def stage_write(stacks: Any, new: Any) -> StagedWrite | None:
    """:func:`write_`'s walk of ``new`` against ``stacks`` before any verdict is known, for a step whose every new
    tensor goes into its stack in place (nearly every step): the finiteness test then takes the changed tensors
    from it (:meth:`StagedWrite.changed`) and the writes follow (:func:`write_staged_`), one walk of the state for
    both. ``None`` where a field is replaced or appears (a first call, a change of layout): :func:`write_` then."""
    walk = _StateWalk(None)
    try:
        kept = walk.merge(new, stacks, "")
    except _NeedsVerdict:
        return None
    if walk.replaced:
        return None
    return StagedWrite(kept, walk.writes, walk.counters)


def write_(
    stacks: Any, new: Any, ok: Tensor, *, copies: list[tuple[Tensor, Tensor]] | None = None, all_ok: bool | None = None,
    counters: dict[str, Any] | None = None,
) -> tuple[Any, bool]:
    """Write a step's new state into the existing stacks, per block where ``ok`` holds.

    ``stacks`` is the record the step started from; ``new`` the record it returned.
    Each new tensor is selected into its stack in place (:func:`masked_write_`), so
    views of the stacks (the optimizer's ``state[p]``) stay valid. A new tensor that
    aliases another stack is copied first (a write could otherwise change it before
    it is read). A field whose dtype, device, layout or shape changed (selected per
    block into a new tensor; the shapes must broadcast), or that appears or disappears,
    is replaced instead; so is a record that changes type (built from the new one, its
    tensors selected against the old fields of the same names). ``new`` is
    consumed: its non-finite entries may be zeroed in place.

    ``copies`` (a list): where every write is a plain copy (on a CPU with every block ok), the
    ``(stack, new tensor)`` pairs are appended there for the caller to copy, with other buckets',
    in one call, instead of copied here. ``all_ok``, when given, is that verdict already read
    (:func:`kronopt.linalg.cpu_all` of ``ok``), as :func:`masked_write_` takes it. ``counters`` (a dict):
    filled with the ints and bools that changed, by :func:`scalar_entries`' dotted paths (where nothing was
    replaced, all that a record's copies of them need).

    Returns:
        The record to keep (the stacks' records, rebuilt only where the new record's
        ints and bools or a replaced field differ) and whether any stack was replaced
        (its views must then be rebuilt).
    """
    walk = _StateWalk(ok)
    kept = walk.merge(new, stacks, "")
    if counters is not None:
        counters.update(walk.counters)
    _write_all_(walk.writes, ok, copies, all_ok)
    return kept, walk.replaced


def write_staged_(
    staged: StagedWrite, ok: Tensor, *, copies: list[tuple[Tensor, Tensor]] | None = None, all_ok: bool | None = None
) -> Any:
    """The writes of a :func:`stage_write` walk, per block where ``ok`` holds, as :func:`write_` makes them (the
    same bits); returns the record to keep (nothing is replaced: the staged walk stops short of that)."""
    _write_all_(staged.writes, ok, copies, all_ok)
    return staged.kept


def _write_all_(
    writes: list[tuple[Tensor, Tensor]], ok: Tensor, copies: list[tuple[Tensor, Tensor]] | None, all_ok: bool | None
) -> None:
    """Each ``(stack, new tensor)`` written in place where ``ok`` holds (:func:`write_`)."""
    written = {o.untyped_storage().data_ptr() for o, _ in writes}
    writes = [(o, n.clone() if n.untyped_storage().data_ptr() in written else n) for o, n in writes]
    if not writes:
        return
    if (linalg.cpu_all(ok) if all_ok is None else all_ok) and all(o.device.type == "cpu" for o, _ in writes):
        # on a CPU the verdict is read for free: with every block ok (nearly every step) each write
        # is a plain copy, and all of them go in one call
        if copies is not None:
            copies.extend(writes)
        else:
            torch._foreach_copy_([o for o, _ in writes], [n for _, n in writes])
    else:
        for o, n in writes:
            masked_write_(o, n, ok, all_ok=False)  # the verdict is read once, above


def run_deferred_(deferred: Sequence[linalg.DeferredWrite], ok: Tensor, *, all_ok: bool | None = None) -> None:
    """Each deferred value (:class:`kronopt.linalg.DeferredWrite`) into its stack, in order, on the blocks
    where ``ok`` holds; the others keep their old value exactly. With every block ok on a CPU (the
    verdict read there for free) each value is computed into its stack in place; otherwise into a
    tensor of its own, then written per block by :func:`masked_write_`, as :func:`write_` writes a new
    state tensor (so the same bits, the sign of a zero included). ``all_ok``: that verdict already read
    (:func:`kronopt.linalg.cpu_all` of ``ok``)."""
    if not deferred:
        return
    if linalg.cpu_all(ok) if all_ok is None else all_ok:  # (deferral runs on a CPU only: the stacks are there too)
        for d in deferred:
            d.into(d.target)
        return
    for d in deferred:
        new = torch.empty_like(d.target)
        d.into(new)
        masked_write_(d.target, new, ok, all_ok=False)


_INIT_NAMES: dict[type, tuple[tuple[str, str | None], ...] | None] = {}


def _init_names(cls: type) -> tuple[tuple[str, str | None], ...] | None:
    """``(field name, its name in __init__)`` of an attrs class (``None``: not an __init__ argument), cached;
    ``None`` for a class that is not an attrs class."""
    try:
        return _INIT_NAMES[cls]
    except KeyError:
        names = (
            tuple((f.name, (f.alias or f.name.lstrip("_")) if f.init else None) for f in attrs.fields(cls))
            if attrs.has(cls) else None
        )
        _INIT_NAMES[cls] = names
        return names


def evolve(record: Any, **changes: Any) -> Any:
    """``attrs.evolve`` of an attrs record, the same record, from the cached ``__init__`` names (:func:`_init_names`):
    a step rebuilds a few records of every bucket, and ``attrs.evolve`` looks its fields up again each time."""
    cls = type(record)
    for name, init in _init_names(cls):  # type: ignore[union-attr]
        if init is not None and init not in changes:
            changes[init] = getattr(record, name)
    return cls(**changes)


def _same(kept: Any, current: Any) -> bool:
    """Whether a merged field needs no rebuild: the same object, or an equal plain number, bool or string."""
    return kept is current or (type(kept) is type(current) and type(kept) in (int, float, bool, str) and kept == current)


def _tensor_pairs(new: Any, old: Any, out: list[tuple[Tensor, Any]] | None = None) -> list[tuple[Tensor, Any]]:
    """``(tensor of new, the same field of old)`` for every tensor of the record ``new`` (recursively);
    ``old`` is a record of the same structure, walked in step (``None`` where it has no such field)."""
    out = [] if out is None else out
    for name in _field_names(type(new)) or ():
        value, before = getattr(new, name), getattr(old, name, None)
        if isinstance(value, Tensor):
            out.append((value, before))
        elif value is not None:
            _tensor_pairs(value, before, out)
    return out


#: below this many entries per block a masked write on a CPU is one ``torch.where`` (fewer calls than a copy a block)
_BLOCK_COPIES_MIN = 4096


def masked_write_(old: Tensor, new: Tensor, ok: Tensor, *, all_ok: bool | None = None) -> None:
    """``old[i] ← new[i]`` where ``ok[i]``, in place; blocks where ``ok`` is False keep ``old`` exactly, the others take
    ``new``'s bits whatever ``old`` held there.

    On a CPU, where reading the verdict on the host waits for nothing, a write of large floating blocks with every
    block ``ok`` (nearly every step) is one plain copy, and with some blocks refused, a copy of each written block
    (torch's ``where`` kernel is not vectorised there: several times slower). ``all_ok``, when given, is that verdict
    already read (:func:`kronopt.linalg.cpu_all`), so a caller writing many tensors reads it once. Elsewhere (a
    device, whose verdicts stay there; small blocks; integer state) one ``torch.where(..., out=old)``. A blend
    ``old·(1−w) + new·w``, which this was on those paths until the sixty-seventh session, keeps a NaN or an
    infinity of ``old`` in a written block (``0 · inf`` is NaN): a stack loaded from a checkpoint or edited may hold
    one, which the block's new value replaces on every path now.
    """
    shape = (-1, *([1] * (old.ndim - 1)))
    if not old.is_floating_point() or old.ndim < 2 or old[0].numel() < _BLOCK_COPIES_MIN or not linalg.host_verdicts(ok):
        torch.where(ok.view(shape), new, old, out=old)
        return
    if all_ok if all_ok is not None else bool(ok.all()):
        old.copy_(new)
        return
    for i, written in enumerate(ok.tolist()):
        if written:
            old[i].copy_(new[i])
