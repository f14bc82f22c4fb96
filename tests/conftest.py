import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small LAPACK and BLAS calls run far slower with a contended OpenMP
    pool on a loaded machine. A module takes it for every test with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def register():
    """``register(key, cls, registry=kronopt.INNER_RULES)``: ``cls`` under ``key`` for this test (a stage of the
    test's own), each registry as it was afterwards."""
    import warnings

    import kronopt

    restores = []

    def add(key, cls, registry=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restores.append((registry if registry is not None else kronopt.INNER_RULES).override(key, cls))
        return key

    yield add
    for restore in reversed(restores):
        restore()
