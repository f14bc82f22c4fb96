"""The composition matrix: every registered factors × basis × inner × split, on every block shape.

Each combination (plugins included: the example plugin adds inner
``sign_momentum``) either

* is refused when the config is built, with a :class:`kronopt.ConfigError` whose
  every line names a stage of the combination and which lists what would work
  (``use … of type: …`` / ``… stages that do: …``), or
* builds, and runs 25 float64 steps on each shape of :data:`SHAPES` (square, tall,
  wide, 1 × n, n × 1, a conv kernel, a side over ``shapes.max_dim``), one tiny
  single-parameter optimizer per shape, with ``refresh.every = 2`` so that refreshes
  happen; afterwards every parameter and every state tensor (``opt.state`` and
  ``opt.inspect()``) is finite.

The test does not hard-code which combinations build: stages that gain a
capability (a restricted side, eigenvalues) move combinations from "refused" to
"builds", and both outcomes are checked. Every combination runs on every shape
(the whole matrix takes a few seconds: the shapes are tiny), so no subset is chosen.
"""

import zlib

import pytest
import torch

import kronopt
from tests.composition._support import (
    SHAPES,
    check_refusal,
    combinations,
    config_dict,
    make_params,
    nonfinite_tensors,
)
from tests.strategies import generator

STEPS = 25

COMBOS = [pytest.param(c, id="-".join(c)) for c in combinations()]


def test_the_matrix_covers_every_registered_stage():
    from kronopt.registry import SLOTS

    combos = [p.values[0] for p in COMBOS]
    for i, slot in enumerate(("factors", "basis", "inner", "split")):
        assert {c[i] for c in combos} == set(SLOTS[slot].keys())
    assert any(c[2] == "sign_momentum" for c in combos) or "sign_momentum" not in SLOTS["inner"].keys()


@pytest.mark.parametrize("combo", COMBOS)
def test_combination_builds_and_runs_or_is_refused(combo):
    raw = config_dict(combo)
    try:
        kronopt.from_dict(raw)
    except kronopt.ConfigError as err:
        check_refusal(combo, err)
        with pytest.raises(kronopt.ConfigError):  # kronopt.build refuses it the same way, before any state
            kronopt.build([torch.nn.Parameter(torch.zeros(2, 2))], raw)
        return
    failures = []
    for name, shape in SHAPES.items():
        gen = generator(zlib.crc32("-".join((*combo, name)).encode()))
        params = make_params([shape], gen, torch.float64)
        opt = kronopt.build(params, raw)
        try:
            for _ in range(STEPS):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                opt.step()
            opt.flush_warnings()
        except Exception as exc:  # noqa: BLE001 - collected per shape, reported together
            failures.append(f"{name} {shape}: {type(exc).__name__}: {exc}")
            continue
        bad = nonfinite_tensors(opt, params)
        if bad:
            failures.append(f"{name} {shape}: non-finite {', '.join(bad)}")
        if not opt.inspect():
            failures.append(f"{name} {shape}: inspect() is empty after {STEPS} steps")
    assert not failures, f"{'-'.join(combo)} builds but fails:\n  " + "\n  ".join(failures)
