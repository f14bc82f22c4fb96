"""Edge cases of ``kronopt bench --model module:factory(...)`` and ``--dtype`` that the change gets wrong.

Each test fails on the code as committed (1905efa) because of a real bug; its docstring says what is wrong
and what the right behaviour is.
"""

import sys
import textwrap

import pytest
import torch

from kronopt.app import bench, cli

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    CALLS = []  # the arguments each call of `counted` got

    def counted(n=2, **kwargs):
        CALLS.append((n, kwargs))
        return nn.Linear(n, n)

    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.LazyLinear(3)  # its weight is made by the first forward

    def lazy():
        return Lazy()

    def zero_size():
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        net.register_parameter("empty", nn.Parameter(torch.zeros(0, 4)))  # e.g. a table of no extra tokens
        return net

    def float8():
        net = nn.Linear(4, 4)
        net.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.float8_e4m3fn))
        return net
    """
)

#: a module that imports but fails with an AttributeError while importing (a typo, an old torch)
BROKEN = textwrap.dedent(
    """
    import torch
    from torch import nn

    ACT = torch.nn.NoSuchActivation  # AttributeError at import time

    def build():
        return nn.Linear(2, 2)
    """
)

TINY = ["--steps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """The modules ``edge_models`` and ``edge_broken`` importable, fresh for each test."""
    (tmp_path / "edge_models.py").write_text(MODELS)
    (tmp_path / "edge_broken.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("edge_models", "edge_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import edge_models

    return edge_models


@pytest.mark.parametrize("spec", ["edge_models:counted(3)(4)", "edge_models:counted(3).real(4)"])
def test_a_call_chained_after_the_factorys_call_is_refused(models, spec):
    """``_factory_call`` parses ``f(<rest>`` and only checks that the whole expression is *a* call, not that
    it calls the placeholder ``f``: ``m:counted(3)(4)`` parses as ``f(3)(4)``, whose outer call's arguments are
    ``(4,)``, so the factory is silently called with 4 and the ``3`` the user wrote is dropped
    (``m:counted(3).real(4)`` likewise). Right: ``call.func`` must be the bare name ``f``; anything else is the
    "not Python literals given as (arg, …, key=value, …)" ValueError."""
    with pytest.raises(ValueError, match="are not Python literals given as"):
        bench.model_params(spec)
    assert all(n != 4 for n, _ in models.CALLS)


def test_a_keyword_given_twice_is_refused(models):
    """``m:counted(n=3, n=4)`` is a SyntaxError in Python ("keyword argument repeated"), but
    ``ast.parse`` accepts it and ``_factory_call`` builds its kwargs with a dict comprehension, so the last
    value silently wins and the factory is built with n=4. Right: a repeated keyword is the same clear
    ValueError as any other argument list that is not a valid call of Python literals."""
    with pytest.raises(ValueError, match="are not Python literals given as"):
        bench.model_params("edge_models:counted(n=3, n=4)")


def test_a_lazy_module_is_a_clear_model_error_not_a_traceback(models, capsys):
    """A model with a lazy module (``nn.LazyLinear``) has ``UninitializedParameter``s whose shape cannot be read:
    ``model_params`` calls ``tuple(p.shape)`` on them and the RuntimeError torch raises escapes (it is not a
    ValueError, so ``Problems.value`` does not catch it), and ``kronopt bench --model`` dies with a traceback.
    Right: ``model_params`` raises a ValueError naming the uninitialized parameters (they are made by the first
    forward, so the bench cannot know their shapes), reported as a ``--model:`` problem with exit status 2."""
    with pytest.raises(ValueError, match="head.weight"):
        bench.model_params("edge_models:lazy")
    assert cli.main(["bench", "adamw", "--model", "edge_models:lazy", *TINY]) == 2
    assert "--model: " in capsys.readouterr().err


def test_a_model_with_a_zero_size_parameter_is_not_a_traceback(models, capsys):
    """``model_params`` accepts a parameter with a zero dimension (``nn.Parameter(torch.zeros(0, 4))``) and
    ``check_bench`` plans the run, but ``bench`` then refuses the set (``_check_run``: "every dimension ≥ 1")
    with a bare ValueError, a traceback from the command line. Right: either ``model_params`` refuses such a
    parameter by name (a ``--model:`` problem, exit status 2) or the bench leaves the empty parameter out
    (it costs no optimizer any work) and runs; never an uncaught exception."""
    try:
        rc = cli.main(["bench", "adamw", "--model", "edge_models:zero_size", *TINY])
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"kronopt bench --model raised {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert rc == 0 or (rc == 2 and "--model: " in err and "empty" in err)


def test_a_parameter_dtype_the_bench_cannot_draw_is_refused_when_planned(models, capsys):
    """The dtype check of ``model_params`` admits every floating dtype (``is_floating_point``), float8 included,
    but ``ParamSet.draw`` cannot make one (``torch.randn`` has no float8 kernel): ``kronopt bench --model`` on a
    model with a float8 parameter plans fine and then dies with NotImplementedError in the bench. Right: refuse
    a dtype the bench cannot draw (or step) in ``model_params``, as complex ones are, naming the parameter
    (a ``--model:`` problem, exit status 2)."""
    try:
        rc = cli.main(["bench", "adamw", "--model", "edge_models:float8", *TINY])
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"kronopt bench --model raised {type(exc).__name__}: {exc}")
    assert rc == 2
    assert "weight" in capsys.readouterr().err


def test_a_module_that_fails_to_import_with_an_attribute_error_is_not_reported_as_lacking_the_factory(models):
    """``model_params`` runs ``importlib.import_module`` and the attribute lookup in one ``try`` whose first
    handler is ``except AttributeError``: a module whose own import raises AttributeError (a typo, an attribute
    an older torch lacks) is reported as "module 'edge_broken' has no 'build'", which sends the user looking
    for a factory that is there. Right: an import failure of any kind is "'edge_broken' cannot be imported
    (AttributeError: …)", the lookup's AttributeError alone "has no 'build'"."""
    with pytest.raises(ValueError) as err:
        bench.model_params("edge_broken:build")
    assert "cannot be imported (AttributeError" in str(err.value), str(err.value)


def _built_dtypes(monkeypatch) -> list:
    """The parameter dtypes of every kronopt optimizer built, one set per build."""
    seen = []
    real = bench.kronopt.build

    def build(named, *args, **kwargs):
        named = list(named)
        seen.append({p.dtype for _, p in named})
        return real(named, *args, **kwargs)

    monkeypatch.setattr(bench.kronopt, "build", build)
    return seen


def test_dtype_applies_to_the_scaling_table_too(monkeypatch, capsys):
    """``--dtype bfloat16 --scaling 8`` steps the main table in bfloat16, but ``cmd_bench`` calls ``scaling``
    with no dtype, so the scaling table (and its replays) silently runs in float32 under a report whose first
    line says bfloat16. Right: ``--dtype`` is "the parameters' dtype" of every table the run prints; ``scaling``
    takes a dtype and ``cmd_bench`` passes the one given (or the scaling table is refused beside ``--dtype``)."""
    seen = _built_dtypes(monkeypatch)
    rc = cli.main(["bench", "adamw", "--d", "8", "--layers", "1", "--dtype", "bfloat16", "--scaling", "8", *TINY])
    assert rc == 0
    assert ", bfloat16, device cpu" in capsys.readouterr().out
    assert len(seen) >= 2  # the main table's and the scaling table's
    assert all(dtypes == {torch.bfloat16} for dtypes in seen), seen


def test_bench_does_not_silently_drop_a_dtype_given_with_a_param_set(monkeypatch):
    """``bench(names, shapes, dtype=...)`` now takes a ``ParamSet`` as ``shapes``, and ``ParamSet.of`` returns a
    set as it is, so an explicit ``dtype=torch.bfloat16`` is silently ignored and the optimizers step float32
    (``record_matrix_work`` and ``matmul_alone`` likewise). Right: a dtype given beside a set either applies to
    every parameter (as ``--dtype`` does) or is refused as a conflict; it is never dropped without a word
    (e.g. ``dtype: torch.dtype | None = None``, ``None`` meaning the set's own)."""
    seen = _built_dtypes(monkeypatch)
    params = bench.ParamSet([(4, 4), (4,)], ["body.weight", "body.bias"], [torch.float32, torch.float32])
    try:
        bench.bench(["adamw"], params, steps=1, warmup=0, device="cpu", dtype=torch.bfloat16)
    except ValueError:
        return  # refused as a conflict: fine
    assert seen == [{torch.bfloat16}]
