"""schemathesis hooks for tests/service/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A spec refused with 422 although it satisfies the published JobSpec schema (checked here with jsonschema)
must name one of the rules the JobSpec description says in words (service/openapi.py, UNSTATED_RULES);
any other refusal is a rule the document hides, and fails the run.
"""

from __future__ import annotations

import functools
import json
import re

import jsonschema
import schemathesis

SAID_IN_WORDS = (
    re.compile(r"n_embd \(\d+\) must be a multiple of n_head \(\d+\)"),
    re.compile(r"schedule\.warmup_steps \(\d+\) must be less than max_steps \(\d+\)"),
    re.compile(r"lr_too_low_update_ratio \(.*\) must be below exploding_update_ratio"),
    re.compile(r"the job needs about .* per worker .* but a worker has"),
)


@schemathesis.check
def spec_refused_only_for_rules_in_words(ctx, response, case):
    if case.operation.label != "POST /v1/jobs" or response.status_code != 422:
        return None
    if not isinstance(case.body, dict) or not _published_spec(case.operation.schema.raw_schema).is_valid(case.body):
        return None  # not a spec the document admits: any refusal is fine
    errors = response.json().get("errors", [])
    hidden = [line for line in errors if not any(rule.search(line) for rule in SAID_IN_WORDS)]
    if hidden or not errors:
        raise AssertionError(f"a spec valid by the published schema was refused for a rule it does not state: {hidden}")
    return None


@functools.cache
def _validator(components: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/JobSpec", "components": json.loads(components)}
    )


def _published_spec(document: dict) -> jsonschema.Draft202012Validator:
    """The document's JobSpec schema (OpenAPI 3.1 schemas are JSON Schema 2020-12)."""
    return _validator(json.dumps(document["components"], sort_keys=True))
