"""Holes in the run-time stage-output checks (:class:`kronopt.types.StageOutputError`, docs/extending.md "Run-time
checks") that a plugin author's stages went through: a tensor a stage was given changed in place where it was not
the state the step started from (the factors a refresh reads, the basis a refresh just made), an in-place change
blamed on the stage owning the field rather than the one that made it, a new state record of another type, and a
malformed column permutation in a basis change. Each test's stage lives here, registered for the test only."""

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import pytest
import torch

import kronopt
from kronopt import compose, linalg
from kronopt.bases import EighBasis, QrBasis
from kronopt.types import BasisCapabilities, InnerCapabilities, StageOutputError


@attrs.frozen(eq=False)
class _Buf:
    buf: torch.Tensor


def _inner(direction: Callable[[Any, torch.Tensor, Any], tuple[torch.Tensor, Any]]) -> type:
    """An inner rule keeping a ``(b m n)`` buffer, stepping by ``direction(state, G, ctx)``."""

    @attrs.frozen(kw_only=True)
    class Rule:
        """test rule"""

        capabilities: ClassVar[InnerCapabilities] = InnerCapabilities()

        def init(self, layout: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
            return _Buf(torch.zeros(layout.batch, layout.m, layout.n, dtype=dtype, device=device))

        def direction(self, state: Any, G: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, Any]:
            return direction(state, G, ctx)

        def on_basis_change(self, state: Any, change: Any) -> Any:
            return state

    return Rule


def _basis(inner_cls: type, after: Callable[[Any, Any, Any], Any]) -> type:
    """A basis stage refreshing as ``inner_cls`` does, then ``after(new, change, factors)`` (its result the change)."""

    @attrs.frozen(kw_only=True)
    class Basis:
        """test basis"""

        capabilities: ClassVar[BasisCapabilities] = inner_cls.capabilities

        def init(self, layout: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
            return inner_cls().init(layout, dtype=dtype, device=device)

        def refresh(self, state: Any, factors: Any, ctx: Any) -> Any:
            new, change = inner_cls().refresh(state, factors, ctx)
            return new, after(new, change, factors)

    return Basis


def _build(ps: list[torch.nn.Parameter], preset: str = "soap", **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kronopt.build([(f"p{i}", p) for i, p in enumerate(ps)], preset, **{"weight_decay": 0.0, **options})


def _params(shape: tuple[int, int] = (6, 4), k: int = 2) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for _ in range(k)]


def _step(opt: Any, ps: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def _saved(opt: Any, ps: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values() if isinstance(v, torch.Tensor)]


def _unchanged(opt: Any, ps: list[torch.nn.Parameter], before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_saved(opt, ps), before))


@pytest.mark.parametrize("factor_update", ["after", "before"])
def test_a_refresh_changing_the_factors_it_reads_in_place_is_refused_naming_the_basis(register: Any, factor_update: str) -> None:
    # WRONG before: the factors a refresh reads are the update's new tensors, not the state the step started from
    # (the only one whose version counters were read), so factors.L was silently doubled
    def double_left(new: Any, change: Any, factors: Any) -> Any:
        factors[0].mul_(2.0)
        return change

    key = register("doubles_factor", _basis(EighBasis, double_left), kronopt.BASES)
    ps = _params()
    opt = _build(ps, **{"basis.type": key, "refresh.every": 1, "skip_first_call": False, "factor_update": factor_update})
    before = _saved(opt, ps)
    with pytest.raises(StageOutputError, match=r"basis stage 'doubles_factor' .*: factors\[0\], which it was given, was changed in place"):
        _step(opt, ps, torch.Generator().manual_seed(1))
    assert _unchanged(opt, ps, before)  # nothing written


def _scales_basis(s: Any, G: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, Any]:
    ctx.basis.Q_L.mul_(3.0)
    return G.clone(), _Buf(0.5 * s.buf + G)


def test_an_inner_rule_changing_the_basis_a_refresh_just_made_is_refused_naming_it(register: Any) -> None:
    # WRONG before: with factor_update = "before" a refresh step's ctx.basis is the refresh's new basis, which no
    # check tracked: the stored Q_L ended with Q_Lᵀ Q_L = 9 I
    key = register("scales_basis", _inner(_scales_basis))
    ps = _params()
    opt = _build(ps, **{"inner.type": key, "basis.type": "eigh", "refresh.every": 1, "factor_update": "before", "skip_first_call": False})
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(StageOutputError, match=r"inner stage 'scales_basis' .*: ctx\.basis\.Q_L, which it was given, was changed in place"):
        for _ in range(3):
            _step(opt, ps, gen)
    Q = opt.state[ps[0]]["basis.Q_L"]
    torch.testing.assert_close(Q.mT @ Q, torch.eye(6))  # the stored basis still orthonormal


def test_an_in_place_change_names_the_stage_that_made_it_not_the_owner_of_the_field(register: Any) -> None:
    # WRONG before: "basis stage 'eigh' (EighBasis): its state field 'Q_L' was changed in place": the field's owner
    key = register("scales_basis", _inner(_scales_basis))
    ps = _params()
    opt = _build(ps, **{"inner.type": key, "basis.type": "eigh", "refresh.every": 100, "skip_first_call": False})
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(StageOutputError, match=r"inner stage 'scales_basis' .*: ctx\.basis\.Q_L, which it was given") as info:
        for _ in range(3):
            _step(opt, ps, gen)
    assert "eigh" not in str(info.value)


@pytest.mark.parametrize(
    ("make", "got"),
    [
        (lambda G: {"buf": G}, r"new state as a dict, expected a _Buf"),
        (lambda G: _Buf(0.5), r"state field 'buf' as a float, expected a tensor"),
        (lambda G: G.clone(), r"new state as a tensor, expected a _Buf"),
    ],
    ids=["dict_record", "float_field", "bare_tensor"],
)
def test_a_new_state_of_another_type_is_refused_at_once_naming_the_stage(register: Any, make: Any, got: str) -> None:
    # WRONG before: a dict was taken at the first step (no attrs fields to walk) and the second crashed with a bare
    # AttributeError naming no stage; a float for a tensor field, or a bare tensor for the record, ended in the
    # state write's ValueError naming no stage
    key = register("wrong_record", _inner(lambda s, G, ctx: (G.clone(), make(G))))
    ps = _params()
    opt = _build(ps, "adamw", **{"inner.type": key})
    before = _saved(opt, ps)
    with pytest.raises(StageOutputError, match=rf"inner stage 'wrong_record' .*returned its {got}"):
        _step(opt, ps, torch.Generator().manual_seed(1))
    assert _unchanged(opt, ps, before)


@pytest.mark.parametrize(
    ("bad", "got"),
    [
        (lambda p: p + 1, r"perm_L is not a permutation of 0\.\.5"),
        (lambda p: torch.zeros_like(p), r"perm_L is not a permutation of 0\.\.5"),
        (lambda p: p[:, :-1], r"perm_L with shape \(2, 5\), expected shape \(2, 6\)"),
        (lambda p: p.float(), r"perm_L is of dtype torch\.float32, expected an index dtype"),
    ],
    ids=["out_of_range", "repeated", "short", "float"],
)
def test_a_malformed_permutation_is_refused_naming_the_basis_and_the_field(register: Any, bad: Any, got: str) -> None:
    # WRONG before: a raw torch indexing error deep in adam's on_basis_change naming no stage (or, for a repeated
    # index, nothing at all: the second moments of one column copied into others)
    def spoil(new: Any, change: Any, factors: Any) -> Any:
        return change if change.perm_L is None else attrs.evolve(change, perm_L=bad(change.perm_L))

    key = register("bad_perm", _basis(QrBasis, spoil), kronopt.BASES)
    ps = _params()
    opt = _build(ps, **{"basis.type": key, "refresh.every": 1, "skip_first_call": False})
    gen = torch.Generator().manual_seed(1)
    _step(opt, ps, gen)  # the first refresh is an eigh: no permutation
    before = _saved(opt, ps)
    with pytest.raises(StageOutputError, match=rf"basis stage 'bad_perm' .*returned a basis change whose {got}"):
        _step(opt, ps, gen)
    assert _unchanged(opt, ps, before)


def test_the_checks_read_no_value_on_the_host_on_the_device_path(monkeypatch: Any) -> None:
    """Every slot checked (soap's qr refresh hands over permutations) on the device-agnostic path, the one a GPU
    takes: the checks read shapes, dtypes and version counters only; the permutation's range is read on a CPU alone."""
    monkeypatch.setattr(compose, "CHECK_OWN_STAGES", True)
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", False)
    ps = _params()
    opt = _build(ps, nonfinite="skip", **{"refresh.every": 1, "skip_first_call": False})
    gen = torch.Generator().manual_seed(1)
    _step(opt, ps, gen)  # the first call (it reads whether it used any gradient) and the eigh refresh

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("host synchronisation inside step()")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for _ in range(2):
        _step(opt, ps, gen)  # qr refreshes, each with a permutation per side
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in ps)
