"""``basis.null_space = "canonical"`` against the float64 reference of the same choice (tests/reference/null_space.py).

The other equivalence tests make the first gradient well posed (``reference_grads``' ``first="surplus"``), since
under the solver's choice two correct implementations part on a rank-deficient first factor. Under the canonical
choice they need not: here the first gradients are drawn as they come, non-square blocks included, and the
refreshes meet rank-deficient factors (every 2 and every 3 calls, from the second call on).
"""

import pytest
import torch

import kronopt
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.soap import soap_reference

#: 24 × 2 and 2 × 24: the long side's factor stays rank-deficient through the first refreshes, whose power steps
#: meet null spaces; 3 × 5 starts from a zero gradient (a zero factor: the identity)
SHAPES = [(6, 4), (4, 6), (9, 3), (2, 7), (24, 2), (2, 24), (3, 5), (5, 5), (7,)]
ZERO_FIRST = SHAPES.index((3, 5))


@pytest.mark.parametrize("every", [2, 3])
def test_soap_with_the_canonical_null_space_matches_its_reference_from_a_random_first_gradient(gen, every):
    """Would catch: a flag against another scale, the old column taken before the sort, the power step's half of
    the option left out, the seeds' columns taken in other places, the zero factor's identity missing."""
    steps = 30
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps, first="random")
    grads[0][ZERO_FIRST] = torch.zeros(SHAPES[ZERO_FIRST], dtype=torch.float64)
    ref = soap_reference(params, grads, precondition_frequency=every, null_space="canonical")
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours_params, "soap", lr=3e-3, **{"refresh.every": every, "basis.null_space": "canonical"})
    assert_histories_close(run_history(opt, ours_params, grads), ref)


def test_under_the_solvers_choice_a_random_first_gradient_parts_the_two(gen):
    """A contrast, by design (no bug of the canonical path can fail it): the default ``"solver"`` run parts from the
    canonical reference by far more than the tolerance, so the equality above is not one any basis would meet."""
    steps = 12
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps, first="random")
    ref = soap_reference(params, grads, precondition_frequency=3, null_space="canonical")
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours_params, "soap", lr=3e-3, **{"refresh.every": 3})
    ours = run_history(opt, ours_params, grads)
    with pytest.raises(AssertionError):
        assert_histories_close(ours, ref)
