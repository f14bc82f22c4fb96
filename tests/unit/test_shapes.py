import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kronopt._shapes import block_spec, from_block, merge_dims, to_block


@pytest.mark.parametrize(
    "shape, expected",
    [((128, 64, 3, 3), (8192, 9)), ((50, 100), (5000,)), ((768, 768), (768, 768)), ((50257, 768), (50257, 768)), ((3, 4096, 4), (3, 4096, 4))],
)
def test_soap_merge_dims_table(shape, expected):
    assert merge_dims(shape, 10000) == expected


def test_block_policy():
    s = block_spec((16, 3, 3, 3), max_dim=10000, merge=False, precondition_1d=False)
    assert (s.m, s.n, s.rotate_left, s.rotate_right) == (16, 27, True, True)
    s = block_spec((7,), max_dim=10000, merge=False, precondition_1d=False)
    assert (s.m, s.n, s.rotate_left, s.rotate_right) == (7, 1, False, False)
    s = block_spec((7,), max_dim=10000, merge=False, precondition_1d=True)
    assert s.rotate_left and not s.rotate_right
    s = block_spec((50257, 768), max_dim=10000, merge=False, precondition_1d=False)
    assert (s.rotate_left, s.rotate_right) == (False, True)
    s = block_spec((), max_dim=10000, merge=False, precondition_1d=False)
    assert (s.m, s.n, s.rotate_left, s.rotate_right) == (1, 1, False, False)
    s = block_spec((50, 100), max_dim=10000, merge=True, precondition_1d=False)
    assert (s.m, s.n, s.rotate_left, s.rotate_right) == (5000, 1, True, False)


@given(st.lists(st.integers(1, 5), min_size=0, max_size=4), st.booleans(), st.integers(1, 30))
def test_block_round_trip_is_exact(shape, merge, max_dim):
    x = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)
    spec = block_spec(tuple(shape), max_dim=max_dim, merge=merge, precondition_1d=False)
    block = to_block(x, spec)
    assert block.shape == (spec.m, spec.n)
    assert torch.equal(from_block(block, spec), x)
