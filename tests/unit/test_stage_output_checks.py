"""What a user's stage returns at run time is checked against what its ``init`` set up (docs/extending.md,
"Run-time checks"): a direction or a state tensor of the wrong shape or dtype, a state tensor changed in place, a
state tensor without the block axis, an exception in ``init``: each raised naming the slot, the stage's key and the
field (:class:`kronopt.types.StageOutputError`), where each was taken silently (broadcast into the weights or the
stacks) or failed deep in the optimizer naming no stage."""

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import pytest
import torch

import kronopt
from kronopt import compose
from kronopt.bases import EighBasis
from kronopt.types import BasisCapabilities, InnerCapabilities, NoState, StageOutputError


@attrs.frozen(eq=False)
class _Buf:
    buf: torch.Tensor


def _inner(direction: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]], init: Callable[..., Any] | None = None) -> type:
    """An inner rule keeping a ``(b m n)`` buffer (or what ``init`` makes), stepping by ``direction(state, G)``."""

    @attrs.frozen(kw_only=True)
    class Rule:
        """test rule"""

        capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()

        def init(self, layout: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
            if init is not None:
                return init(layout, dtype=dtype, device=device)
            return _Buf(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

        def direction(self, state: Any, G: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, Any]:
            return direction(state, G)

        def on_basis_change(self, state: Any, change: Any) -> Any:
            return state

    return Rule


def _params(k: int = 2, shape: tuple[int, int] = (6, 4)) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(*shape)) for _ in range(k)]


def _build(ps: list[torch.nn.Parameter], preset: str = "adamw", **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kronopt.build([(f"p{i}", p) for i, p in enumerate(ps)], preset, **{"weight_decay": 0.0, **options})


def _step(opt: Any, ps: list[torch.nn.Parameter], grads: list[torch.Tensor] | None = None) -> None:
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape) if grads is None else grads[i]
    opt.step()


@pytest.mark.parametrize(
    ("make", "got"),
    [(lambda B: B.mT.contiguous(), r"\(2, 4, 6\)"), (lambda B: B[..., :1], r"\(2, 6, 1\)"), (lambda B: B.double(), r"\(2, 6, 4\), torch.float64")],
    ids=["transposed", "one_column", "float64"],
)
def test_a_direction_unlike_the_gradient_is_refused_naming_the_stage(register: Any, make: Any, got: str) -> None:
    # WRONG before: (b n m) was reshaped into the weights, (b m 1) broadcast or failed in a reshape naming no stage
    key = register("bad_dir", _inner(lambda s, G: (make(s.buf * 0.9 + G), _Buf(s.buf * 0.9 + G))))
    ps = _params()
    opt = _build(ps, **{"inner.type": key})
    before = [p.detach().clone() for p in ps]
    with pytest.raises(StageOutputError, match=rf"inner stage 'bad_dir' .*returned a direction of shape {got}.*expected shape \(2, 6, 4\), torch.float32"):
        _step(opt, ps)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))  # nothing written


@pytest.mark.parametrize(
    ("make", "got"),
    [(lambda B: B.sum(-1, keepdim=True), r"shape \(2, 6, 1\), torch.float32"), (lambda B: B.double(), r"shape \(2, 6, 4\), torch.float64")],
    ids=["shape", "dtype"],
)
def test_a_state_tensor_unlike_its_init_is_refused_naming_the_field(register: Any, make: Any, got: str) -> None:
    # WRONG before: broadcast back into the stack (compose._StateWalk.select), or the float32 stack replaced by float64
    key = register("bad_state", _inner(lambda s, G: (s.buf * 0.9 + G, _Buf(make(s.buf * 0.9 + G)))))
    ps = _params()
    opt = _build(ps, **{"inner.type": key})
    with pytest.raises(StageOutputError, match=rf"inner stage 'bad_state' .*state field 'buf' with {got}, expected shape \(2, 6, 4\), torch.float32"):
        _step(opt, ps)
    assert opt.state[ps[0]]["inner.buf"].shape == (6, 4) and opt.state[ps[0]]["inner.buf"].dtype == torch.float32


def _eigh_basis_with(lams: Callable[[Any], tuple[Any, Any]]) -> type:
    """The ``eigh`` basis, its eigenvalue estimates replaced by ``lams(new_state)`` (``(lam_L, lam_R)``) after each
    refresh, declaring ``provides_eigvals``."""

    @attrs.frozen(kw_only=True)
    class EditedEig:
        """eigh, edited eigenvalue estimates"""

        capabilities: ClassVar[BasisCapabilities] = BasisCapabilities(needs_factors=True, provides_eigvals=True)

        def init(self, layout: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
            return EighBasis().init(layout, dtype=dtype, device=device)

        def refresh(self, state: Any, factors: Any, ctx: Any) -> Any:
            new, change = EighBasis().refresh(state, factors, ctx)
            lam_L, lam_R = lams(new)
            new = attrs.evolve(new, lam_L=lam_L, lam_R=lam_R)
            return new, attrs.evolve(change, new=new)

    return EditedEig


def test_basis_eigenvalues_of_the_wrong_shape_are_refused_naming_the_basis(register: Any) -> None:
    # WRONG before: lam (b 1) broadcast by the eigenvalue rule and into the stored (b m) stack
    key = register("wrong_eig", _eigh_basis_with(lambda new: (new.lam_L[:, :1], new.lam_R[:, :1])), kronopt.BASES)
    torch.manual_seed(0)
    ps = _params(shape=(8, 6))
    opt = _build(ps, "soap", **{"basis.type": key, "inner.type": "eigenvalue"})
    with pytest.raises(StageOutputError, match=r"basis stage 'wrong_eig' .*state field 'lam_L' with shape \(2, 1\).*expected shape \(2, 8\)"):
        for _ in range(3):
            _step(opt, ps)


def test_a_basis_declaring_eigenvalues_that_returns_none_is_refused_naming_it(register: Any) -> None:
    """A basis that declares ``provides_eigvals`` but returns ``lam_L = lam_R = None``: before, the next step failed
    deep in the eigenvalue rule (``AttributeError: 'NoneType' object has no attribute 'shape'``, naming no stage);
    now refused at the refresh, naming the basis and the field (found in the fifty-fifth session)."""
    key = register("no_eig", _eigh_basis_with(lambda new: (None, None)), kronopt.BASES)
    torch.manual_seed(0)
    ps = _params(shape=(8, 6))
    opt = _build(ps, "shampoo", **{"basis.type": key, "refresh.every": 1})
    with pytest.raises(StageOutputError, match=r"basis stage 'no_eig' .*declares provides_eigvals but returned None as lam_L .*shape \(2, 8\)"):
        for _ in range(3):
            _step(opt, ps)


def test_a_stage_changing_its_state_in_place_is_refused_naming_it(register: Any) -> None:
    # WRONG before: no error, and a block skipped for its non-finite gradient (promised: state untouched) changed
    def direction(s: Any, G: torch.Tensor) -> Any:
        s.buf.mul_(0.5).add_(G)
        return s.buf.clone(), s

    key = register("inplace", _inner(direction))
    ps = _params()
    opt = _build(ps, **{"inner.type": key})
    with pytest.raises(StageOutputError, match=r"inner stage 'inplace' .*state field 'buf' was changed in place"):
        _step(opt, ps)


def test_a_stage_changing_the_gradient_in_place_is_refused_naming_it(register: Any) -> None:
    # WRONG before: the stages after it and the factor update read the changed G, silently
    def direction(s: Any, G: torch.Tensor) -> Any:
        G.mul_(2.0)
        return s.buf * 0.9 + G, _Buf(s.buf * 0.9 + G)

    key = register("mutates_g", _inner(direction))
    ps = _params()
    opt = _build(ps, "soap", **{"inner.type": key})
    with pytest.raises(StageOutputError, match=r"inner stage 'mutates_g' .*changed the gradient G in place"):
        for _ in range(2):
            _step(opt, ps)


def test_a_state_tensor_without_the_block_axis_is_refused_at_build(register: Any) -> None:
    # WRONG before: built and stepped, then the first bucket split (one parameter without a gradient) crashed in
    # optimizer._split with "slice() cannot be applied to a 0-dim tensor", naming no stage
    @attrs.frozen(eq=False)
    class S:
        buf: torch.Tensor
        calls: torch.Tensor

    def init(layout: Any, *, dtype: torch.dtype, device: torch.device) -> S:
        return S(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device))

    key = register("zero_d", _inner(lambda s, G: (s.buf * 0.9 + G, S(s.buf * 0.9 + G, s.calls + 1)), init))
    with pytest.raises(StageOutputError, match=r"inner stage 'zero_d' .*init returned its state field 'calls' with shape \(\).*block axis first"):
        _build(_params(), **{"inner.type": key})


def test_a_new_state_tensor_without_the_block_axis_is_refused(register: Any) -> None:
    # WRONG before: a field that was None at init came back (1,), broadcast by the state walk into a (b ...) stack
    @attrs.frozen(eq=False)
    class S:
        buf: torch.Tensor | None

    key = register("late_field", _inner(lambda s, G: (G, S(G.sum().reshape(1))), lambda layout, **kw: S(None)))
    ps = _params()
    opt = _build(ps, **{"inner.type": key})
    with pytest.raises(StageOutputError, match=r"inner stage 'late_field' .*state field 'buf' with shape \(1,\).*block axis first, of size 2"):
        _step(opt, ps)


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_an_exception_in_init_names_the_stage_keeping_its_type_and_cause(register: Any, error: type) -> None:
    # WRONG before: "boom in init" alone, naming no stage
    def init(layout: Any, **kw: Any) -> Any:
        raise error("boom in init")

    key = register("raising_init", _inner(lambda s, G: (G, s), init))
    with pytest.raises(error, match=r"inner stage 'raising_init' .*init raised: boom in init") as info:
        opt = _build(_params(1), **{"inner.type": key})
        _step(opt, list(opt.param_groups[0]["params"]))
    assert isinstance(info.value.__cause__, error) and str(info.value.__cause__) == "boom in init"


def test_a_builtin_pipeline_is_not_checked_and_a_plugin_slot_is(register: Any, monkeypatch: Any) -> None:
    """kronopt's own stages are checked by the suite (below), so their steps skip the checks: nothing to pay."""
    monkeypatch.setattr(compose, "CHECK_OWN_STAGES", False)
    ps = _params()
    opt = _build(ps, "soap")
    assert compose._checked_slots(opt._bucket_config(opt._buckets[0])) == frozenset()
    # a stage that hands its state back as it was and returns a new direction passes them
    key = register("plain", _inner(lambda s, G: (G * 2.0, s), lambda layout, **kw: NoState()))
    opt = _build(ps, **{"inner.type": key, "lr": 0.5})
    assert compose._checked_slots(opt._bucket_config(opt._buckets[0])) == {"inner"}
    _step(opt, ps, [torch.ones(6, 4)] * 2)
    assert all(torch.equal(p.detach(), torch.full((6, 4), -1.0)) for p in ps)


def _run_preset(preset: str, options: dict[str, Any]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6, 5))]
    opt = _build(ps, preset, **{"nonfinite_scope": "block", **options})
    warnings.simplefilter("ignore", RuntimeWarning)  # (the skipped block's report; pytest restores the filters)
    for i in range(7):
        grads = [torch.randn(p.shape) for p in ps]
        if i == 3:
            grads[1][0, 0] = float("inf")  # a block skipped (its state kept) while the others step
        if i == 5:
            grads[2] = None  # a bucket split
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("options", [{}, {"storage.moments": "bfloat16", "storage.factors": "bfloat16"}], ids=["compute", "bfloat16"])
@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_every_builtin_stage_passes_the_checks_bit_for_bit(monkeypatch: Any, preset: str, options: dict[str, Any]) -> None:
    """With the checks on for kronopt's own stages (CHECK_OWN_STAGES) every preset runs as with them off, to the bit:
    no built-in stage changes its input in place or returns a tensor unlike its init's, and nothing is computed."""
    monkeypatch.setattr(compose, "CHECK_OWN_STAGES", False)
    off = _run_preset(preset, options)
    monkeypatch.setattr(compose, "CHECK_OWN_STAGES", True)
    on = _run_preset(preset, options)
    assert len(on) == len(off) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(on, off))
