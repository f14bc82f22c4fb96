"""Refresh schedules: ``every`` with its offset and the phases of a staggered refresh."""

import pytest

import kronopt
from kronopt.refresh import EveryRefresh, Staggered


def _due_steps(schedule, steps=range(1, 13)):
    return [t for t in steps if schedule.due(t, first_call=False)]


def test_every_refreshes_on_the_multiples_of_k():
    assert _due_steps(EveryRefresh(every=4)) == [4, 8, 12]
    assert not EveryRefresh(every=4).due(0, first_call=False)


def test_offset_shifts_the_refresh_updates():
    # (t - p) ≡ 0 mod k, t ≥ 1: written out by hand
    assert _due_steps(EveryRefresh(every=4, offset=1)) == [1, 5, 9]
    assert _due_steps(EveryRefresh(every=4, offset=3)) == [3, 7, 11]


@pytest.mark.parametrize("offset", [0, 2])
def test_the_first_call_refreshes_whatever_the_offset(offset):
    assert EveryRefresh(every=4, offset=offset, at_first_call=True).due(0, first_call=True)
    assert EveryRefresh(every=4, offset=offset).due(0, first_call=True) is False


def test_phases_and_at_phase():
    plain = EveryRefresh(every=4)
    staggered = EveryRefresh(every=4, stagger=True)
    assert isinstance(plain, Staggered)
    assert plain.phases() == 1 and staggered.phases() == 4
    assert staggered.at_phase(0) == staggered
    assert staggered.at_phase(3).offset == 3
    assert EveryRefresh(every=4, offset=3, stagger=True).at_phase(2).offset == 1  # (3 + 2) mod 4
    with pytest.raises(ValueError, match=r"phase must be in \[0, 4\), got 4"):
        staggered.at_phase(4)


def test_offset_must_be_below_every():
    with pytest.raises(ValueError, match="offset must be < every, got offset = 4, every = 4"):
        EveryRefresh(every=4, offset=4)


def test_stagger_is_read_from_toml_and_round_trips():
    text = kronopt.config.dumps(kronopt.PRESETS["soap"]).replace("stagger = false", "stagger = true")
    cfg = kronopt.config.loads(text)
    assert cfg.refresh.stagger and cfg.refresh.phases() == cfg.refresh.every == 10
    assert kronopt.config.loads(kronopt.config.dumps(cfg)) == cfg


def test_presets_do_not_stagger():
    assert not any(getattr(cfg.refresh, "stagger", False) for cfg in kronopt.PRESETS.values())
