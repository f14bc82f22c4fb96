"""End to end: the installed example plugin (plugins/kronopt-example-plugin) through real entry points.

CI installs the plugin (``python -m pip install -e plugins/kronopt-example-plugin``).
In a checkout without it these tests are skipped, except under ``CI=1``, where a
missing plugin is an error rather than a silent skip.
"""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kronopt
from kronopt.registry import Registry

DIST = "kronopt-example-plugin"

if os.environ.get("CI"):
    import kronopt_example_plugin  # noqa: F401  (in CI the plugin must be installed)
else:
    pytest.importorskip("kronopt_example_plugin", reason=f"{DIST} is not installed")

ROOT = Path(__file__).resolve().parents[1]

CONFIG = textwrap.dedent(
    """
    lr = 0.02

    [factors]
    type = "none"

    [basis]
    type = "identity"

    [inner]
    type = "sign_momentum"
    momentum = 0.8

    [split]
    type = "full"

    [refresh]
    type = "every"
    """
)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "KRONOPT_NO_PLUGINS"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(autouse=True)
def _plugins_on(monkeypatch):
    monkeypatch.delenv("KRONOPT_NO_PLUGINS", raising=False)


def test_declared_in_the_installed_metadata():
    eps = [ep for ep in importlib.metadata.entry_points(group="kronopt.inner_rules") if ep.name == "sign_momentum"]
    assert len(eps) == 1
    assert eps[0].value == "kronopt_example_plugin.inner:SignMomentumInner"
    assert eps[0].dist is not None and eps[0].dist.name == DIST


def test_found_and_loaded_through_the_real_entry_points():
    assert "sign_momentum" in kronopt.INNER_RULES.keys()
    entry = kronopt.INNER_RULES.entry("sign_momentum")
    assert entry.source == DIST
    assert entry.cls.__module__ == "kronopt_example_plugin.inner" and entry.cls.__name__ == "SignMomentumInner"
    # a fresh registry reading the real metadata finds the same entry point
    fresh: Registry = Registry("inner", group="kronopt.inner_rules")
    assert fresh.keys() == ["sign_momentum"]
    assert fresh.entry("sign_momentum").cls is entry.cls and fresh.entry("sign_momentum").source == DIST


def test_discovered_without_being_imported_in_a_fresh_interpreter():
    result = _run_python(
        """
        import sys
        import kronopt
        assert "sign_momentum" in kronopt.INNER_RULES.keys(), kronopt.INNER_RULES.keys()
        assert not any(m.startswith("kronopt_example_plugin") for m in sys.modules), "imported by discovery"
        cfg = kronopt.from_dict({
            "factors": {"type": "none"}, "basis": {"type": "identity"},
            "inner": {"type": "sign_momentum", "momentum": 0.5},
            "split": {"type": "full"}, "refresh": {"type": "every"},
        })
        assert "kronopt_example_plugin.inner" in sys.modules
        print(type(cfg.inner).__module__, kronopt.INNER_RULES.entry("sign_momentum").source)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kronopt_example_plugin.inner", DIST]


def test_kronopt_no_plugins_hides_it_in_a_fresh_interpreter():
    result = _run_python(
        """
        import kronopt
        assert "sign_momentum" not in kronopt.INNER_RULES.keys()
        try:
            kronopt.build([], {"inner": {"type": "sign_momentum"}})
        except kronopt.ConfigError as exc:
            print(dict(exc.errors)["inner.type"])
        """,
        KRONOPT_NO_PLUGINS="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unknown inner stage 'sign_momentum'; available: adam,")


def _least_squares(gen):
    X = torch.randn(128, 8, generator=gen, dtype=torch.float64)
    A = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    Y = X @ A + 0.01 * torch.randn(128, 3, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(8, 3, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return X, Y, model


def _train(model, opt, X, Y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_toml_config_builds_and_trains_a_least_squares_model(tmp_path, gen):
    cfg = kronopt.loads(CONFIG)
    assert type(cfg.inner).__name__ == "SignMomentumInner" and cfg.inner.momentum == 0.8
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg
    path = tmp_path / "sign.toml"
    path.write_text(CONFIG, encoding="utf-8")

    X, Y, model = _least_squares(gen)
    opt = kronopt.build(model.named_parameters(), path)
    assert opt.config == cfg
    W0 = model.weight.detach().clone()
    losses = _train(model, opt, X, Y, 1)
    # first step from zero: every weight moved by exactly lr in the direction of −sign(grad)
    assert set(((model.weight.detach() - W0) / 0.02).round(decimals=9).abs().unique().tolist()) <= {0.0, 1.0}
    losses += _train(model, opt, X, Y, 149)
    assert losses[-1] < 0.01 * losses[0], (losses[0], losses[-1])
    assert max(losses[-10:]) < min(losses[:10])


def test_training_resumes_from_a_state_dict(gen):
    X, Y, model = _least_squares(gen)
    opt = kronopt.build(model.parameters(), kronopt.loads(CONFIG))
    _train(model, opt, X, Y, 10)
    twin = torch.nn.Linear(8, 3, dtype=torch.float64)
    twin.load_state_dict(model.state_dict())
    resumed = kronopt.from_state_dict(twin.parameters(), opt.state_dict())
    assert type(resumed.config.inner).__name__ == "SignMomentumInner"
    a = _train(model, opt, X, Y, 8)
    b = _train(twin, resumed, X, Y, 8)
    assert a == b
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
