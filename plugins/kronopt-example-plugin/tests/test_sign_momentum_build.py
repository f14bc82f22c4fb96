"""``sign_momentum`` through kronopt's public API: registry, config dicts, the optimizer."""

import pytest
import torch

import kronopt
from kronopt_example_plugin.inner import SignMomentumInner


def _config(**inner):
    return {
        "lr": 0.01,
        "factors": {"type": "none"},
        "basis": {"type": "identity"},
        "inner": {"type": "sign_momentum", **inner},
        "split": {"type": "full"},
        "refresh": {"type": "every"},
    }


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def test_registered_from_the_entry_point_under_the_distribution_name():
    entry = kronopt.INNER_RULES.entry("sign_momentum")
    assert entry.cls is SignMomentumInner
    assert entry.source == "kronopt-example-plugin"
    assert entry.description == "Sign of the EMA momentum in the rotated basis (signSGD with momentum, Lion-like)"
    assert kronopt.INNER_RULES.key_of(SignMomentumInner) == "sign_momentum"


def test_first_step_moves_each_weight_by_lr_times_the_sign_of_its_gradient(gen):
    W0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    v0 = torch.randn(5, generator=gen, dtype=torch.float64)
    params = [torch.nn.Parameter(W0.clone()), torch.nn.Parameter(v0.clone())]
    opt = kronopt.build(params, _config(momentum=0.9), lr=0.05)
    assert isinstance(opt.config.inner, SignMomentumInner) and opt.config.inner.momentum == 0.9
    gW = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    gW[0, :2] = 0.0  # no gradient, no move
    gv = torch.randn(5, generator=gen, dtype=torch.float64)
    params[0].grad, params[1].grad = gW, gv
    opt.step()
    for p, start, g in ((params[0], W0, gW), (params[1], v0, gv)):
        moved = (start - p.detach()) / 0.05
        torch.testing.assert_close(moved, torch.sign(g), rtol=0, atol=1e-12)
        assert set(moved.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(params[0].detach()[0, :2], W0[0, :2])


def test_later_steps_follow_the_momentum_not_the_latest_gradient(gen):
    p = torch.nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    opt = kronopt.build([p], _config(momentum=0.9), lr=1.0)
    p.grad = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    opt.step()
    p.grad = torch.tensor([[-0.5, 20.0]], dtype=torch.float64)  # buffer 0.9·[0.1, −0.1] + 0.1·g = [0.04, 1.91]
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[-2.0, 0.0]], dtype=torch.float64))


def test_dotted_overrides_and_round_trip():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = kronopt.build([p], "adamw", **{"inner.type": "sign_momentum", "inner.momentum": 0.5})
    assert opt.config.inner == SignMomentumInner(momentum=0.5)
    data = kronopt.to_dict(opt.config)
    assert data["inner"] == {"type": "sign_momentum", "momentum": 0.5}
    assert kronopt.loads(kronopt.dumps(opt.config)) == opt.config


def test_bad_momentum_is_a_config_error_with_its_path():
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.from_dict(_config(momentum=1.5, beta=0.1))
    assert ("inner.momentum", "must be < 1.0, got 1.5") in info.value.errors
    assert any(path == "inner.beta" and "accepts: momentum" in msg for path, msg in info.value.errors)


def test_works_with_a_rotating_basis(gen):
    cfg = _config(momentum=0.8)
    cfg.update(factors={"type": "ema"}, basis={"type": "eigh"}, refresh={"type": "every", "every": 2})
    W = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    opt = kronopt.build([W], cfg, lr=0.01)
    for _ in range(5):
        start = W.detach().clone()
        W.grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        opt.step()
        # whatever the basis, the direction is an orthonormal image of a ±1 matrix: ‖ΔW‖ = lr·√(mn)
        torch.testing.assert_close((start - W.detach()).norm(), torch.tensor(0.01 * 15**0.5, dtype=torch.float64))
