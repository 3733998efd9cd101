"""schemathesis hooks for tests/service/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A spec refused with 422 although it satisfies the published JobSpec schema (checked here with jsonschema)
must name one of the rules the JobSpec description says in words (service/api/openapi.py, UNSTATED_RULES);
any other refusal is a rule the document hides, and fails the run. A driver's push refused with 422
must likewise name a rule its route's description states: the body's job id is the route's, an
endpoint sits on the job's own nodes with a port in 1024-65535, or a text over a push's bounds.

The token of each run is of the scope GRADWATCH_FUZZ_SCOPE names (tests/service/test_api_fuzz.py):
`token_does_only_what_its_scope_allows` fails a read or read-all token let into a route that changes
something, and a job's token (its job GRADWATCH_FUZZ_JOB) let into any route but that job's pushes.
"""

from __future__ import annotations

import functools
import json
import os
import re

import jsonschema
import schemathesis

SAID_IN_WORDS = (
    re.compile(r"n_embd \(\d+\) must be a multiple of n_head \(\d+\)"),
    re.compile(r"schedule\.warmup_steps \(\d+\) must be less than max_steps \(\d+\)"),
    re.compile(r"lr_too_low_update_ratio \(.*\) must be below exploding_update_ratio"),
    re.compile(r"the job needs about .* per worker .* but a worker has"),
)


PUSH_RULES = (
    re.compile(r"a push to job .* carries that job's id only"),
    re.compile(r"is not the address of a Ray node this job's workers run on"),
    re.compile(r"port \d+ is outside 1024-65535"),
    re.compile(r"characters, over the \d+ limit of a push"),
    re.compile(r"endpoints, over one per rank of the largest job"),
)
PUSHES = ("POST /v1/jobs/{job_id}/progress", "POST /v1/jobs/{job_id}/result")


@schemathesis.check
def spec_refused_only_for_rules_in_words(ctx, response, case):
    if case.operation.label != "POST /v1/jobs" or response.status_code != 422:
        return None
    if not isinstance(case.body, dict) or not _published_spec(case.operation.schema.raw_schema).is_valid(case.body):
        return None  # not a spec the document admits: any refusal is fine
    _only_stated(response, SAID_IN_WORDS, "a spec valid by the published schema")
    return None


@schemathesis.check
def push_refused_only_for_rules_in_words(ctx, response, case):
    if case.operation.label not in PUSHES or response.status_code != 422:
        return None
    document = case.operation.schema.raw_schema
    schema = case.operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": document["components"]})
    if not isinstance(case.body, dict) or not validator.is_valid(case.body):
        return None  # not a body the document admits: any refusal is fine
    _only_stated(response, PUSH_RULES, "a push valid by the published schema")
    return None


MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN = frozenset({"GET /healthz"})  # needs no token
# Refused before any route runs: 400 a Content-Length that is no number, 413 a body over the size limit
REFUSED = frozenset({400, 403, 413})


@schemathesis.check
def token_does_only_what_its_scope_allows(ctx, response, case):
    scope, token = os.environ.get("GRADWATCH_FUZZ_SCOPE"), os.environ.get("GRADWATCH_FUZZ_TOKEN")
    label, status = case.operation.label, response.status_code
    if scope is None or label in OPEN or status in REFUSED or status == 401:
        return None
    if response.request.headers.get("Authorization") != f"Bearer {token}":
        return None  # the auth checks' own requests, without the token or with another
    if case.method.upper() != case.operation.method.upper():
        return None  # a probe with a method the path lacks (405)
    if scope in ("read", "read-all") and case.operation.method.upper() in MUTATING:
        raise AssertionError(f"a {scope} token was let into {label} ({status})")
    if scope == "job:progress":
        job = os.environ["GRADWATCH_FUZZ_JOB"]
        if label not in PUSHES or case.path_parameters != {"job_id": job}:
            raise AssertionError(f"job {job}'s token was let into {label} {case.path_parameters} ({status})")
    return None


def _only_stated(response, rules, what: str) -> None:
    errors = response.json().get("errors", [])
    hidden = [line for line in errors if not any(rule.search(line) for rule in rules)]
    if hidden or not errors:
        raise AssertionError(f"{what} was refused for a rule it does not state: {hidden}")


@functools.cache
def _validator(components: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/JobSpec", "components": json.loads(components)}
    )


def _published_spec(document: dict) -> jsonschema.Draft202012Validator:
    """The document's JobSpec schema (OpenAPI 3.1 schemas are JSON Schema 2020-12)."""
    return _validator(json.dumps(document["components"], sort_keys=True))
