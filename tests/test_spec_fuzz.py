"""Any input to the spec loader either validates or is refused with SpecError lines `path: reason`.

Property tests (hypothesis) over arbitrary JSON-like values, mutated example
specs and arbitrary text and bytes, plus the hostile inputs a public endpoint
gets: YAML bombs, deep nesting, oversized specs, slow-to-match durations.
"""

from __future__ import annotations

import functools
import json
import re
import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradwatch.spec import MAX_SPEC_BYTES, JobSpec, SpecError, json_schema, load_spec, parse_duration, parse_text
from tests.conftest import EXAMPLES

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The hostile inputs below are sized so that a regression (a regex that backtracks, an alias that
# expands) takes minutes or hours on them; the fixed code takes milliseconds. A limit far from both
# cannot be tripped by a busy machine, and still catches the regression.
QUICK_S = 10.0
LINE = re.compile(r"(?P<path>[^\n\r]+?): (?P<reason>[^\n\r]*\S[^\n\r]*)")
EXAMPLE_SPECS = {p.name: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}


def outcome(source: Any, *, user_code: str = "skip") -> JobSpec | list[str]:
    """The JobSpec, or the SpecError lines after checking their shape; any other exception fails the test."""
    try:
        spec = load_spec(source, user_code=user_code)
    except SpecError as exc:
        assert exc.errors, "a SpecError must say what is wrong"
        for line in exc.errors:
            assert isinstance(line, str) and LINE.fullmatch(line), f"not a `path: reason` line: {line!r}"
        return exc.errors
    assert isinstance(spec, JobSpec)
    return spec


# ---------------------------------------------------------------- strategies
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["mlp", "digits", "2h", "1d 2h", "a.b:c", "", "nan", "-1", "1e999"])
)
keys = st.text(max_size=12) | st.sampled_from(
    ["name", "model", "data", "optimizer", "scaling", "telemetry", "timeout", "hidden", "lr", "interval"]
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=20
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists (the root is ())."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def mutate(data: st.DataObject, spec: dict[str, Any]) -> dict[str, Any]:
    """One mutation of a copy of `spec`: drop, set, nest deeper or rename, somewhere in it."""
    spec = json.loads(json.dumps(spec))
    kind = data.draw(st.sampled_from(["drop", "set", "nest", "rename"]), label="mutation")
    containers = [p for p in paths(spec) if isinstance(get(spec, p), dict | list) and get(spec, p)]
    path = data.draw(st.sampled_from(containers), label="at")
    parent = get(spec, path)
    key = data.draw(st.sampled_from(list(parent) if isinstance(parent, dict) else range(len(parent))), label="key")
    if kind == "drop":
        del parent[key]
    elif kind == "set":
        parent[key] = data.draw(json_values, label="value")
    elif kind == "nest":
        parent[key] = data.draw(
            st.sampled_from([[parent[key]], {"value": parent[key]}, {key: parent[key]}]), label="nested"
        )
    elif isinstance(parent, dict):
        new = data.draw(
            keys | st.sampled_from([f"{key}s", str(key).upper(), f"{key}_", str(key)[:-1]]), label="renamed"
        )
        parent[new] = parent.pop(key)
    else:
        parent.insert(0, parent.pop(key))
    return spec


# ---------------------------------------------------------------- properties
@FUZZ
@given(json_values)
@example({"name": {"2001-01-01": 1}})
@example({"labels": {"a\nb": "c"}})
def test_any_json_like_value_validates_or_is_refused_with_lines(value):
    if isinstance(value, dict):
        outcome(value)
    outcome(json.dumps(value).encode())  # what the HTTP API hands over
    outcome(yaml.safe_dump(value))  # and a CLI user's YAML
    outcome(value if not isinstance(value, dict) else [value])  # a non-mapping in Python


@FUZZ
@given(st.sampled_from(sorted(EXAMPLE_SPECS)), st.data())
def test_mutated_examples_validate_or_are_refused_with_lines(name, data):
    spec = EXAMPLE_SPECS[name]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        spec = mutate(data, spec)
    user_code = data.draw(st.sampled_from(["skip", "deny"]), label="user_code")
    result = outcome(spec, user_code=user_code)
    # The same verdict from the spec as YAML text.
    assert isinstance(outcome(yaml.safe_dump(spec), user_code=user_code), type(result))


@pytest.mark.parametrize("name", sorted(EXAMPLE_SPECS))
def test_examples_themselves_validate(name):
    assert isinstance(outcome(EXAMPLE_SPECS[name]), JobSpec)


yaml_chars = st.sampled_from(list("{}[]:,-?&*!|>'\"%@`#~ \n\t.0123456789aezTn\\")) | st.characters()
yaml_text = st.text(alphabet=yaml_chars, max_size=200)


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=400) | yaml_text)
@example("a: 2001-02-30\n")
@example("a: !!int abc\n")
@example("a: !!float abc\n")
@example("a: !!timestamp abc\n")
@example("a: " + "1" * 5000 + "\n")
@example("name: {2001-01-01: 1}\n")
@example(b"\xff\xfe")
@example("a: \ud800")
def test_parse_text_on_anything_returns_a_mapping_or_raises_spec_error(text):
    try:
        data = parse_text(text)
    except SpecError as exc:
        assert exc.errors and all(LINE.fullmatch(line) for line in exc.errors), exc.errors
    else:
        assert isinstance(data, dict)
        outcome(text)


@FUZZ
@given(st.text(alphabet=" \t1234567890.dhmsx:-e", max_size=60) | st.text(max_size=20))
@example("1d" + " " * 3000 + "x")
@example("1" * 40 + "x")
def test_any_timeout_text_is_read_or_refused_quickly(text):
    started = time.perf_counter()
    result = outcome({**EXAMPLE_SPECS["digits-mlp.yaml"], "timeout": text})
    assert time.perf_counter() - started < QUICK_S
    if isinstance(result, JobSpec):
        assert result.timeout > 0


@functools.cache
def timeout_pattern() -> re.Pattern[str]:
    """The pattern the published JSON schema gives `timeout`, read once (building the schema takes ms)."""
    return re.compile(json_schema()["properties"]["timeout"]["anyOf"][1]["pattern"])


def test_the_published_timeout_pattern_matches_in_linear_time():
    pattern = timeout_pattern()
    for good in ("2h", "30m", "1h30m", "90", "1.5h", " 90 s ", "1d 2h 3m 4s"):
        assert pattern.search(good), good
    for bad in ("", " ", "x", "1 1", "h"):
        assert not pattern.search(bad), bad
    started = time.perf_counter()
    for hostile in ("1" * 5000 + "x", "1h" * 5000 + "x", "1 " * 5000 + "x", " " * 5000 + "x"):
        assert not pattern.search(hostile)
    assert time.perf_counter() - started < QUICK_S


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=" \t\n1234567890.dhmsx:-e+_", max_size=24))
@example("0100d0d0d")
@example("0.0s")
def test_the_published_timeout_pattern_admits_exactly_the_timeouts_read(text):
    pattern = timeout_pattern()
    try:
        read = parse_duration(text) > 0
    except ValueError:
        read = False
    assert bool(pattern.search(text)) == read, (text, read)


# ------------------------------------------------------ hostile inputs
def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "bomb",
    [
        billion_laughs(),
        "name: &n x\nmodel: {name: mlp}\ndata: {name: digits}\nmax_steps: 10\nlabels: {a: *n}\n",
        "base: &b {name: mlp}\nmodel:\n  <<: *b\n",
        "a: &a [*a]\n",
    ],
    ids=["billion-laughs", "one-alias", "merge-key", "self-reference"],
)
def test_yaml_aliases_and_bombs_are_refused_at_once(bomb):
    started = time.perf_counter()
    errors = outcome(bomb)
    assert time.perf_counter() - started < QUICK_S
    assert isinstance(errors, list) and any("aliases are not allowed" in e for e in errors)


@pytest.mark.parametrize(
    "text",
    [
        "{a: " * 10_000 + "1" + "}" * 10_000,
        "[" * 10_000 + "]" * 10_000,
        "a: " + "[" * 10_000 + "]" * 10_000,
        "".join(" " * i + f"k{i}:\n" for i in range(600)),
    ],
    ids=["flow-mappings", "json-lists", "value", "block-mappings"],
)
def test_deeply_nested_yaml_is_refused_cleanly(text):
    started = time.perf_counter()
    errors = outcome(text)
    assert time.perf_counter() - started < 5.0
    assert isinstance(errors, list) and any("nested too deeply" in e for e in errors), errors


def test_deeply_nested_values_in_a_mapping_are_refused_or_kept_whole():
    deep: Any = 1
    for _ in range(10_000):
        deep = [deep]
    base = EXAMPLE_SPECS["digits-mlp.yaml"]
    for spec in ({**base, "batch_size": deep}, {**base, "labels": {"team": deep}}, {**base, "name": {"x": deep}}):
        assert isinstance(outcome(spec), list)
    custom = {**base, "model": {"name": "mypkg.models:build", "options": {"layers": deep}}}
    assert isinstance(outcome(custom), JobSpec)  # options are the user's own business


@pytest.mark.parametrize(
    "make",
    [
        lambda: "name: x\n" + "#" * MAX_SPEC_BYTES,
        lambda: ("name: x\n" + "#" * MAX_SPEC_BYTES).encode(),
        lambda: json.dumps({"name": "x", "labels": {"a": "b" * MAX_SPEC_BYTES}}).encode(),
    ],
    ids=["text", "bytes", "json"],
)
def test_oversized_specs_are_refused_before_parsing(make, monkeypatch):
    def parsed(*args, **kwargs):
        raise AssertionError("an oversized spec reached the parser")

    monkeypatch.setattr(yaml, "load", parsed)
    errors = outcome(make())
    assert isinstance(errors, list) and "byte limit" in errors[0]


def test_oversized_spec_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "#" * MAX_SPEC_BYTES)
    errors = outcome(path)
    assert isinstance(errors, list) and "byte limit" in errors[0]


@pytest.mark.parametrize("value", [[1, 2], 3, None, 1.5, True])
def test_a_spec_that_is_not_a_mapping_is_refused(value):
    errors = outcome(value)
    assert isinstance(errors, list) and errors[0].startswith("<spec>: a spec is a mapping")
    errors = outcome(json.dumps(value).encode())
    assert isinstance(errors, list) and errors[0].startswith("<spec>: a spec is a mapping")


def test_odd_keys_and_values_still_give_one_line_each():
    base = EXAMPLE_SPECS["digits-mlp.yaml"]
    for spec in (
        {**base, "labels": {"a\nb": "c"}},
        {**base, "optimizer": {"lr\r\n": 1}},
        {**base, "name": 10**5000},
        {**base, "name": {"when": "2001-01-01"}},
    ):
        errors = outcome(spec)
        assert isinstance(errors, list) and len(errors) == 1, errors
