"""Fixtures every distributed test module uses."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet():
    """Unnamed parameters with a name-routed preset are expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the route sends embeddings")
        yield


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The in-process references run one thread, as the ranks do: their blocks are small, and several
    threads only wait on each other on a loaded machine."""
