"""Every problem of a config is listed at once (docs/configs.md, "Validation" and "Overrides"): a config with
several problems lists each, as it lists that problem alone, on every route (a preset with overrides, a dict,
a TOML file).

A fuzz of combinations of single invalid settings found these ways one problem hid or misdescribed another
(each test below fails on the code it was written against; its docstring says what was wrong):

* a whole table given as one override (``**{"inner": {...}}``) on the dict / TOML route raised alone;
* a stage's checks across its options stopped at the first problem (``orthogonalize``'s empty custom list before
  its Newton–Schulz options; ``lowrank_flat``'s infinite complement scale before its own);
* a bad ``[route]`` key hid the route to a missing ``[fallback]``;
* on the dict / TOML route a refused top-level value was judged at its class default by the combination checks
  (a second error blaming ``skip_first_call = false``, which the user never wrote);
* list converters named only the first bad entry, without its index;
* on the dict route a dotted key below a value (``lr.x``) replaced the value, and ``fallback.*`` on a config
  without a ``[fallback]`` gave five "missing table" errors.

Expected messages are written out by hand, from the rules of docs/configs.md.
"""

import pathlib

import pytest

import kronopt
from kronopt.config import ConfigError
from kronopt.inner_rules.orthogonalize import OrthogonalizeInner
from kronopt.splits import LowRankFlatSplit
from kronopt.validators import auto_or_int_tuple, float_tuple, graft_betas, str_tuple, triples

ROUTES = ["preset", "dict", "toml"]

GRAM_4 = (
    "ns_restarts (ns_form = 'gram'): Newton–Schulz restarts [4] leave 4 iterations without a restart, more than 3 "
    "(the Gram matrix drifts in low precision; 'auto' chooses them)"
)
GRAM_NONE = (
    "ns_restarts (ns_form = 'gram'): Newton–Schulz restarts [] leave 5 iterations without a restart, more than 3 "
    "(the Gram matrix drifts in low precision; 'auto' chooses them)"
)
CUSTOM_EMPTY = "coefficients = 'custom' needs a non-empty custom_coefficients list"
NO_FALLBACK = "sends parameters to the fallback, but there is no [fallback] table"
RESTRICTED = (
    "split 'lowrank_flat' keeps a restricted side, whose first subspace is built on a parameter's first call: "
    "it needs skip_first_call = true and refresh.at_first_call = true"
)


def _errors(route: str, preset: str, overrides: dict, tmp_path: pathlib.Path) -> list[tuple[str, str]]:
    """The errors of ``preset`` with ``overrides`` on one route: the preset's name, its dict, its TOML file."""
    with pytest.raises(ConfigError) as info:
        if route == "preset":
            kronopt.resolve(preset, **overrides)
        elif route == "dict":
            kronopt.resolve(kronopt.to_dict(kronopt.PRESETS[preset]), **overrides)
        else:
            path = tmp_path / f"{preset}.toml"
            path.write_text(kronopt.dumps(kronopt.PRESETS[preset]), encoding="utf-8")
            kronopt.resolve(str(path), **overrides)
    return info.value.errors


@pytest.mark.parametrize("route", ROUTES)
def test_a_whole_table_override_is_listed_with_every_other_problem(route, tmp_path):
    """``apply_overrides`` raised the refused whole table alone, hiding ``lr`` and ``refresh.every`` (which the
    preset route listed beside it)."""
    got = _errors(route, "soap", {"inner": {"type": "adam"}, "lr": "fast", "refresh.every": 0}, tmp_path)
    assert sorted(got) == [
        ("inner", "is a table: set one of its keys (e.g. 'inner.type')"),
        ("lr", "must be a number, got 'fast'"),
        ("refresh.every", "must be ≥ 1, got 0"),
    ]


def test_apply_overrides_alone_lists_the_configs_problems_with_a_refused_override():
    with pytest.raises(ConfigError) as info:
        kronopt.apply_overrides(kronopt.to_dict(kronopt.PRESETS["soap"]), {"inner": {"type": "adam"}, "factors.beta": 2})
    assert sorted(info.value.errors) == [
        ("factors.beta", "must be < 1.0, got 2.0"),
        ("inner", "is a table: set one of its keys (e.g. 'inner.type')"),
    ]


@pytest.mark.parametrize("route", ROUTES)
def test_orthogonalize_lists_an_empty_custom_list_and_a_bad_restart_plan_together(route, tmp_path):
    """Each alone is listed; together only "custom needs a list" was (``__attrs_post_init__`` raised at the first)."""
    got = _errors(route, "muon", {"inner.coefficients": "custom", "inner.ns_form": "gram", "inner.ns_restarts": [4]}, tmp_path)
    assert got == [("inner", f"{CUSTOM_EMPTY}; {GRAM_4}")]


@pytest.mark.parametrize("route", ROUTES)
def test_a_problem_that_names_a_refused_option_is_dropped_alone(route, tmp_path):
    """``custom_coefficients`` refused for its own value stands at its default (empty) in the stage's checks: "custom
    needs a list" is dropped (the user gave a list), the restart plan's problem is listed, not dropped with it."""
    overrides = {"inner.coefficients": "custom", "inner.custom_coefficients": [[1, 2]], "inner.ns_form": "gram", "inner.ns_restarts": [4]}
    got = _errors(route, "muon", overrides, tmp_path)
    assert got == [("inner.custom_coefficients", "[0] must have 3 entries, got 2"), ("inner", GRAM_4)]


@pytest.mark.parametrize("route", ROUTES)
def test_lowrank_flat_lists_an_infinite_complement_and_a_bad_restart_plan_together(route, tmp_path):
    overrides = {"split.complement_scale": 1e300, "split.complement_mult": 1e10, "split.ns_form": "gram", "split.ns_restarts": []}
    got = _errors(route, "pro_soap", overrides, tmp_path)
    assert got == [("split", f"complement_scale × complement_mult must be finite, got 1e+300 × 10000000000.0; {GRAM_NONE}")]


def test_stages_built_in_python_name_every_problem_of_their_options():
    with pytest.raises(ValueError) as info:
        OrthogonalizeInner(coefficients="custom", ns_form="gram", ns_restarts=[4])
    assert str(info.value) == f"{CUSTOM_EMPTY}; {GRAM_4}"
    with pytest.raises(ValueError) as info:
        LowRankFlatSplit(complement_scale=1e300, complement_mult=1e10, ns_form="gram", ns_restarts=[], ns_coefficients="cans")
    assert str(info.value).startswith("complement_scale × complement_mult must be finite")
    assert "ns_coefficients = 'cans' needs ns_dtype = 'float64'" in str(info.value) and GRAM_NONE in str(info.value)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "bad, path",
    [
        ({"route.fallback_names": ["("]}, "route.fallback_names"),
        ({"route.bogus": 1}, "route.bogus"),
    ],
)
def test_a_bad_route_key_does_not_hide_a_route_to_a_missing_fallback(route, bad, path, tmp_path):
    """The route check runs with the refused route keys at their defaults: ``vectors = "fallback"`` still sends
    the vectors to a ``[fallback]`` soap does not have (only the bad key was listed)."""
    got = _errors(route, "soap", {"route.vectors": "fallback", **bad}, tmp_path)
    assert {p for p, _ in got} == {path, "route"}
    assert ("route", NO_FALLBACK) in got


@pytest.mark.parametrize("route", ROUTES)
def test_a_fallbacks_route_is_refused_beside_a_bad_key_of_it(route, tmp_path):
    got = _errors(route, "muon", {"fallback.route.vectors": "fallback", "fallback.route.bogus": 1}, tmp_path)
    assert sorted(p for p, _ in got) == ["fallback.route", "fallback.route.bogus"]
    assert dict(got)["fallback.route"].startswith("a fallback routes nothing")


@pytest.mark.parametrize("route", ROUTES)
def test_a_refused_top_level_value_is_not_judged_at_a_value_never_written(route, tmp_path):
    """pro_soap sets ``skip_first_call = true``; ``"yes"`` is refused. The dict and TOML routes judged the
    combination at the class default (false) and added "it needs skip_first_call = true"."""
    got = _errors(route, "pro_soap", {"skip_first_call": "yes"}, tmp_path)
    assert got == [("skip_first_call", "must be true or false, got 'yes'")]


def test_a_toml_file_with_a_refused_top_level_value_has_one_error(tmp_path):
    text = kronopt.dumps(kronopt.PRESETS["pro_soap"])
    assert "skip_first_call = true\n" in text
    path = tmp_path / "pro_soap.toml"
    path.write_text(text.replace("skip_first_call = true\n", 'skip_first_call = "yes"\n'), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        kronopt.load(path)
    assert info.value.errors == [("skip_first_call", "must be true or false, got 'yes'")]


@pytest.mark.parametrize("route", ROUTES)
def test_a_combination_not_naming_the_refused_value_is_still_listed(route, tmp_path):
    """The drop is for a problem that names the refused key only: a restricted split under a refresh that skips
    the first call is listed beside a bad ``lr``."""
    got = _errors(route, "pro_soap", {"lr": "fast", "refresh.at_first_call": False}, tmp_path)
    assert got == [("lr", "must be a number, got 'fast'"), ("refresh.at_first_call", RESTRICTED)]


LISTS = [
    (float_tuple(2), ["a", "b"], "[0] must be a number, got 'a'; [1] must be a number, got 'b'"),
    (float_tuple(2), [0.5, "b"], "[1] must be a number, got 'b'"),
    (float_tuple(), [float("inf"), 1, "x"], "[0] must be a finite number, got inf; [2] must be a number, got 'x'"),
    (str_tuple, ["ok", 5, 6], "[1] must be a string, got 5; [2] must be a string, got 6"),
    (auto_or_int_tuple, ["a", 1, "b"], "[0] must be an integer, got 'a'; [2] must be an integer, got 'b'"),
    (triples, [[1, 2], ["a", 1, "c"]], "[0] must have 3 entries, got 2; [1][0] must be a number, got 'a'; [1][2] must be a number, got 'c'"),
    (graft_betas, ["momentum", "x"], "[1] must be a number, got 'x'"),
]


@pytest.mark.parametrize("convert, value, message", LISTS)
def test_list_converters_name_every_bad_entry_by_its_index(convert, value, message):
    with pytest.raises((TypeError, ValueError)) as info:
        convert(value)
    assert str(info.value) == message


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "preset, key, value, message",
    [
        ("soap", "inner.betas", ["a", "b"], "[0] must be a number, got 'a'; [1] must be a number, got 'b'"),
        ("muon", "inner.ns_restarts", ["a", "b"], "[0] must be an integer, got 'a'; [1] must be an integer, got 'b'"),
        ("muon", "route.fallback_names", ["ok", 5, "("],
         "[1] must be a string, got 5; [2] '(' is not a valid regular expression: missing ), unterminated subpattern at position 0"),
        ("muon", "route.fallback_names", ["(", "a{4294967296}"],
         "[0] '(' is not a valid regular expression: missing ), unterminated subpattern at position 0; "
         "[1] 'a{4294967296}' is not a valid regular expression: the repetition number is too large"),
    ],
)
def test_a_config_list_names_every_bad_entry_by_its_index(route, preset, key, value, message, tmp_path):
    assert _errors(route, preset, {key: value}, tmp_path) == [(key, message)]


@pytest.mark.parametrize("route", ROUTES)
def test_a_key_below_a_value_keeps_its_path(route, tmp_path):
    """The dict route replaced ``lr`` by a table ``{"x": 1}`` ("lr: must be a number, got {'x': 1}"), losing the path."""
    got = _errors(route, "soap", {"lr.x": 1, "inner.betas.x": 1, "refresh.every": 0}, tmp_path)
    assert sorted(got) == [
        ("inner.betas.x", "unknown key; inner options are not tables"),
        ("lr.x", "'lr' is a value, not a table"),
        ("refresh.every", "must be ≥ 1, got 0"),
    ]


@pytest.mark.parametrize("route", ROUTES)
def test_fallback_keys_without_a_fallback_are_one_error(route, tmp_path):
    """The dict route made a ``[fallback]`` of the keys given and listed its five missing stage tables."""
    got = _errors(route, "soap", {"fallback.lr": 1e-3, "fallback.inner.eps": 1e-8, "lr": -1}, tmp_path)
    assert sorted(got) == [("fallback", "this config has no [fallback] to override"), ("lr", "must be ≥ 0.0, got -1.0")]
