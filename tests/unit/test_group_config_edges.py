"""A param group's config: overrides resolved per exact value, every problem of a group listed at once, and the
bounds of the keys a build would otherwise fail on (``bucket_cap_mib``, a staggered ``refresh.every``)."""

import time

import pytest
import torch

import kronopt
from kronopt import ConfigError


def test_groups_whose_tensor_rates_print_alike_keep_their_own_rates():
    """``repr`` of a tensor rounds to four decimals: the resolved configs were cached by it, and the second group ran
    at the first group's rate (its ``param_groups`` entry overwritten with it)."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = kronopt.build(
        [{"params": [a], "lr": torch.tensor(0.1), "weight_decay": torch.tensor(0.01)},
         {"params": [b], "lr": torch.tensor(0.10004), "weight_decay": torch.tensor(0.01004)}],
        "soap",
    )
    lrs = [float(g["lr"]) for g in opt.param_groups]
    decays = [float(g["weight_decay"]) for g in opt.param_groups]
    assert lrs == pytest.approx([0.1, 0.10004], rel=1e-7) and decays == pytest.approx([0.01, 0.01004], rel=1e-7)
    assert [c.lr for c in opt._group_cfgs] == pytest.approx([0.1, 0.10004], rel=1e-7)


def test_a_group_with_a_top_level_key_lists_its_other_problems_too():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ConfigError) as caught:
        kronopt.build([{"params": [p], "nonfinite": "raise", "refresh.every": 0, "storage.moments": "float16"}], "soap")
    paths = [path for path, _ in caught.value.errors]
    assert any(path.endswith("nonfinite") for path in paths)
    assert any(path.endswith("refresh.every") for path in paths) and any(path.endswith("storage.moments") for path in paths)


def test_a_bucket_cap_past_any_memory_is_a_config_error():
    """1e308 MiB was accepted and the build then raised ``OverflowError`` (the cap in bytes is an int)."""
    with pytest.raises(ConfigError, match="bucket_cap_mib: must be ≤"):
        kronopt.resolve("soap", bucket_cap_mib=1e308)
    assert kronopt.resolve("soap", bucket_cap_mib=2.0**43).bucket_cap_mib == 2.0**43


def test_a_staggered_period_longer_than_the_blocks_costs_only_the_blocks():
    """Each block takes the next unused phase while any is left (the balance of a period of any length): ``every =
    2⁶³`` raised ``OverflowError`` at the build (a list of a phase's cost each), 10⁶ took seconds."""
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(5)]
    start = time.perf_counter()
    opt = kronopt.build(params, "soap", **{"refresh.every": 2**62, "refresh.stagger": True})
    assert time.perf_counter() - start < 5.0
    assert sorted(r["phase"] for r in opt.bucket_summary()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("spec", ["soap", "dict", "toml"])
def test_a_whole_table_as_one_override_is_refused_however_the_config_is_given(spec, tmp_path):
    """A preset name refused ``storage={...}``; a dict or a TOML file took it and replaced the whole table, so
    ``refresh={"type": "every", "every": 4}`` reset soap's ``at_first_call`` and a dotted ``storage.moments`` beside
    a ``storage`` table was dropped."""
    given = {"soap": "soap", "dict": kronopt.to_dict(kronopt.PRESETS["soap"]), "toml": tmp_path / "soap.toml"}[spec]
    if spec == "toml":
        given.write_text(kronopt.dumps(kronopt.PRESETS["soap"]))
    for overrides in ({"refresh": {"type": "every", "every": 4}}, {"storage.moments": "bfloat16", "storage": {"factors": "bfloat16"}}):
        with pytest.raises(ConfigError, match="is a table"):
            kronopt.resolve(given, **overrides)
    assert kronopt.resolve(given, **{"refresh.every": 4}).refresh.at_first_call is True  # one key: the rest kept



@pytest.mark.parametrize("spec", ["soap", "dict"])
def test_a_records_check_across_its_keys_is_listed_beside_a_refused_key(spec):
    """``offset < every`` is checked when the record is made, which a refused key (``stagger = 1``, an unknown key)
    prevented: only the refused key was listed. Now the accepted keys are checked too, the refused ones at their
    defaults; a check that names a refused key is left out (it would judge the default, not the value given)."""
    given = "soap" if spec == "soap" else kronopt.to_dict(kronopt.PRESETS["soap"])
    with pytest.raises(ConfigError) as caught:
        kronopt.resolve(given, **{"refresh.stagger": 1, "refresh.offset": 10})
    assert [p for p, _ in caught.value.errors] == ["refresh.stagger", "refresh"]
    assert "offset must be < every, got offset = 10, every = 10" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        kronopt.resolve(given, **{"refresh.every": "x", "refresh.offset": 12})
    assert [p for p, _ in caught.value.errors] == ["refresh.every"]  # not "offset < every" against the default 10
