"""The job spec: valid specs load, bad ones get every error with its field path."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from gradwatch.spec import MAX_SPEC_BYTES, JobSpec, SpecError, json_schema, load_spec, parse_duration
from tests.conftest import EXAMPLES, small_spec


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid_and_matches_the_schema(path):
    spec = load_spec(path)
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())
    # round trip: the dumped spec validates to the same spec
    again = JobSpec.model_validate(json.loads(spec.model_dump_json()))
    assert again == spec


def test_three_mistakes_give_three_errors_with_paths():
    bad = small_spec(optimizer={"lr": -0.1}, scaling={"num_workers": 0})
    bad["batch_sise"] = 32
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    errors = info.value.errors
    assert any(e.startswith("batch_sise: unknown field") for e in errors), errors
    assert any(e.startswith("optimizer.lr: ") and "(got -0.1)" in e for e in errors), errors
    assert any(e.startswith("scaling.num_workers: ") and "(got 0)" in e for e in errors), errors
    assert len(errors) == 3


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(SpecError) as info:
        load_spec(small_spec(model={"name": "resnet"}, data={"name": "imagenet"}))
    text = "\n".join(info.value.errors)
    assert "model: unknown model name: use one of mlp, cnn, char-transformer" in text
    assert "data: unknown data name: use one of digits, synthetic-classification, synthetic-regression, text" in text


def test_nested_errors_have_full_paths():
    with pytest.raises(SpecError) as info:
        load_spec(
            small_spec(
                model={"name": "mlp", "hidden": [16, 0], "activaton": "relu"},
                data={"name": "digits", "val_fraction": 1.5},
            )
        )
    errors = info.value.errors
    assert any(e.startswith("model.hidden.1: ") for e in errors), errors
    assert any(e.startswith("model.activaton: unknown field") for e in errors), errors
    assert any(e.startswith("data.val_fraction: ") for e in errors), errors


def test_cross_field_rules():
    cases = [
        (small_spec(schedule={"name": "cosine", "warmup_steps": 100}, max_steps=50), "warmup_steps (100) must be less"),
        (small_spec(max_steps=None), "set max_steps or epochs"),
        (small_spec(epochs=2), "not both"),
        (small_spec(precision="bf16"), "bf16 needs scaling.use_gpu"),
        (small_spec(model={"name": "char-transformer"}), "needs data text"),
        (
            small_spec(model={"name": "char-transformer", "n_embd": 30, "n_head": 4}, data={"name": "text"}),
            "multiple of n_head",
        ),
    ]
    for spec, needle in cases:
        with pytest.raises(SpecError) as info:
            load_spec(spec)
        assert needle in "\n".join(info.value.errors), (needle, info.value.errors)


def test_user_code_import_path_is_checked():
    with pytest.raises(SpecError) as info:
        load_spec(small_spec(model={"name": "no_such_pkg.models:build"}))
    assert "cannot import module 'no_such_pkg.models'" in info.value.errors[0]
    with pytest.raises(SpecError) as info:
        load_spec(small_spec(model={"name": "json:no_such_factory"}))
    assert "has no callable 'no_such_factory'" in info.value.errors[0]
    assert load_spec(small_spec(model={"name": "json:loads"})).model.name == "json:loads"
    with pytest.raises(SpecError) as info:
        load_spec(small_spec(model={"name": "json:loads"}), user_code="deny")
    assert "disabled on this server" in info.value.errors[0]


def test_durations():
    assert parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("45s") == 45
    assert parse_duration("90") == 90
    assert load_spec(small_spec(timeout="30m")).timeout == 1800
    with pytest.raises(SpecError) as info:
        load_spec(small_spec(timeout="soon"))
    assert info.value.errors[0].startswith("timeout: not a duration")


def test_yaml_and_json_text_and_refusals():
    text = yaml.safe_dump(small_spec())
    assert load_spec(text.encode()).name == "test-job"
    assert load_spec(json.dumps(small_spec())).name == "test-job"
    with pytest.raises(SpecError, match="aliases are not allowed"):
        load_spec("a: &x [1, 2]\nb: *x\nname: y\n")
    with pytest.raises(SpecError, match="byte limit"):
        load_spec(b"name: x\n" + b"#" * MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match="a spec is a mapping"):
        load_spec("- 1\n- 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec("name: [unclosed\n")


def test_schema_is_a_valid_json_schema_and_documents_fields():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert "scaling" in schema["properties"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**small_spec(), "bogus": 1}, schema)


def test_a_number_given_as_true_or_false_is_refused_with_its_path():
    spec = small_spec(
        max_steps=True,
        optimizer={"name": "sgd", "lr": False},
        telemetry={"interval": True, "enabled": False, "detectors": {"ema_alpha": True}},
    )
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    lines = {line.split(":")[0] for line in str(err.value).splitlines()}
    assert lines == {"max_steps", "optimizer.lr", "telemetry.interval", "telemetry.detectors.ema_alpha"}
    assert "a number is needed here, not true" in str(err.value)
    # a true/false field still takes one, and the numbers themselves pass
    ok = load_spec(small_spec(max_steps=7, telemetry={"interval": 2, "enabled": False}))
    assert ok.max_steps == 7 and ok.telemetry.enabled is False
