"""The published OpenAPI document, made to state what this server does.

FastAPI's generated document describes the routes' Python signatures; this module corrects it where the
service answers otherwise: the error bodies (422 is `{"detail": str, "errors": [str]}`, every other
error `{"detail": str}`, always JSON), the codes every route can answer (401 and 403 from the token check,
403 from the Host/Origin guard, 404 for an unknown job, 413 and 415 for bodies), and the job spec as
this server accepts it: with its settings (user code, data roots) and the rules between fields that a
JSON schema can state. The rules it cannot state are said in words in the JobSpec description.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gradwatch.spec import DEFAULT_WORKER_MEMORY_BYTES, JobSpec
from service.api.models import AlertmanagerWebhook, ErrorOut, SpecErrorsOut
from service.settings import Settings

# Any text a spec holds: no C0 control but tab and newline, no DEL, no C1 (gradwatch/spec.py refuses them),
# and no lone surrogate (no UTF-8 text holds one). The range's ends are the characters themselves.
PLAIN_TEXT = "^[\\t\\n -~\u00a0-\ud7ff\ue000-\U0010ffff]*$"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# The rules between fields this document says in words only: no JSON schema states the last three, and
# n_embd's (one alternative per head count) is past what generators of test data can read. The service
# refuses a spec that breaks one with 422 and an error line that says which.
UNSTATED_RULES = (
    "model.n_embd must be a multiple of model.n_head",
    "schedule.warmup_steps must be less than max_steps",
    "telemetry.detectors.lr_too_low_update_ratio must be below telemetry.detectors.exploding_update_ratio",
    "the job's estimated memory per worker (parameters with gradients and optimizer state, data, "
    "activations) must fit this server's worker memory",
)
ERROR_TEXT = {
    400: "A Content-Length header that is not a number.",
    401: "No bearer token, or one this server does not know (`WWW-Authenticate: Bearer`).",
    403: "The token lacks the route's scope, or the request came with a Host this server does not answer "
    "to, a cross-site Sec-Fetch-Site or a foreign Origin.",
    404: "No such job.",
    409: "The job's state does not allow it.",
    413: "A body over this server's size limit (GRADWATCH_MAX_BODY_BYTES).",
    415: "A body that is neither JSON nor YAML.",
    422: "The request is not valid: `errors` has one line per problem, `field.path: reason`.",
    429: "Over a limit of this server: queued jobs, or open log streams.",
    501: "No report can be drawn for this job (its run left no metrics yet).",
}


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of `app` as configured by `settings`."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorOut"] = ErrorOut.model_json_schema()
    components["RequestErrorsOut"] = _request_errors()
    _add_model(components, "JobSpec", job_spec_schema(settings))
    _add_model(components, "AlertmanagerWebhook", webhook_schema())
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method in METHODS:
                _errors_of(path, operation, settings)
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    _hoist_defs(media.get("schema", {}), components)
    return schema


def _hoist_defs(body: dict[str, Any], components: dict[str, Any]) -> None:
    """A request body given as a model's own JSON schema: its `$defs` move to the components, where its
    `#/$defs/...` references (relative to a root the document does not have) can reach them."""
    for name, definition in body.pop("$defs", {}).items():
        components.setdefault(name, definition)
    _point_refs(body, components)
    for name in list(components):
        _point_refs(components[name], components)


def _point_refs(node: Any, components: dict[str, Any]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = "#/components/schemas/" + ref.removeprefix("#/$defs/")
        for value in node.values():
            _point_refs(value, components)
    elif isinstance(node, list):
        for value in node:
            _point_refs(value, components)


def allowed_methods(schema: dict[str, Any], path: str) -> list[str]:
    """The methods the document lists for the path template that `path` fits, upper case."""
    for template, item in schema.get("paths", {}).items():
        pattern = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return sorted(method.upper() for method in item if method in METHODS)
    return []


def _request_errors() -> dict[str, Any]:
    out = SpecErrorsOut.model_json_schema()
    out["title"] = "RequestErrorsOut"
    out["required"] = ["detail", "errors"]
    out["properties"]["detail"].pop("default", None)
    out["properties"]["detail"]["description"] = "What was refused, e.g. `the job spec is not valid`."
    return out


def _add_model(components: dict[str, Any], name: str, model_schema: dict[str, Any]) -> None:
    components.update(model_schema.pop("$defs", {}))
    components[name] = model_schema


def _errors_of(path: str, operation: dict[str, Any], settings: Settings) -> None:
    """Every error code `operation` can answer, each with its real body, as JSON."""
    responses = operation.setdefault("responses", {})
    codes = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
    codes |= {400, 403}  # the body limit and the Host/Origin guard answer before any route
    if "security" in operation:
        codes |= {401, 403}
    if "{job_id}" in path:
        codes.add(404)
    if "requestBody" in operation:
        codes |= {413, 422}
    for code in sorted(codes):
        body = "RequestErrorsOut" if code == 422 else "ErrorOut"
        text = ERROR_TEXT.get(code, "Refused.")
        if code == 413:
            text = f"A body over this server's limit of {settings.max_body_bytes} bytes."
        responses[str(code)] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }


# ------------------------------------------------------------------ the job spec
def job_spec_schema(settings: Settings) -> dict[str, Any]:
    """JobSpec's JSON schema as this server applies it."""
    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema["$defs"]
    user_code = settings.allow_user_code
    if not user_code:  # the service refuses `module:factory` names and entrypoints
        for name in ("CustomModel", "CustomData", "EntrypointTrain"):
            defs.pop(name)
        _drop_refs(schema, {"CustomModel", "CustomData", "EntrypointTrain"})
    text_path = defs["TextData"]["properties"]["path"]
    roots = [str(root).rstrip("/") for root in settings.data_root_paths]
    if not user_code and not roots:
        text_path["anyOf"] = [{"type": "null"}]
        text_path["description"] = "This server reads no files named in specs: leave it out for the bundled corpus."
    elif not user_code:
        # An absolute path under a root, no `..` segment (`.` and `//` are normalised away), plain text.
        char, not_dot = PLAIN_TEXT[1:-2].replace(" -~", " -.0-~"), PLAIN_TEXT[1:-2].replace(" -~", " -\\-0-~")
        segment = f"(?:{not_dot}{char}*|\\.{not_dot}{char}*|\\.\\.{char}+|\\.|)"
        under = "|".join(re.escape(root) for root in roots)
        text_path["anyOf"][0]["pattern"] = f"^(?:{under})(?:/{segment}){'+' if '' in roots else '*'}$"
    defs["OptimizerSpec"]["properties"]["betas"]["prefixItems"] = [
        {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    ] * 2
    labels = schema["properties"]["labels"]
    (key_pattern, value_schema), *_ = labels.pop("patternProperties").items()
    labels["propertyNames"] = {"pattern": key_pattern}
    labels["additionalProperties"] = value_schema
    schema["properties"]["owner"] = {
        "type": "null",
        "default": None,
        "description": "Set by the service: the user of the token that submits the job. A spec may repeat "
        "that name; any other is refused.",
    }
    _plain_text(schema)
    schema["allOf"] = _cross_field(user_code)
    memory = settings.worker_memory_bytes or DEFAULT_WORKER_MEMORY_BYTES
    schema["description"] = (
        f"{schema.get('description', '')} Besides this schema the service refuses, with 422 and a line saying "
        f"which: {'; '.join(UNSTATED_RULES)} ({memory} bytes on this server)."
    )
    return schema


def _drop_refs(node: Any, names: set[str]) -> None:
    """Remove the alternatives that point at `names` from every oneOf/anyOf under `node`."""
    if isinstance(node, dict):
        for key in ("oneOf", "anyOf"):
            if key in node:
                node[key] = [alt for alt in node[key] if alt.get("$ref", "").rsplit("/", 1)[-1] not in names]
        for value in node.values():
            _drop_refs(value, names)
    elif isinstance(node, list):
        for value in node:
            _drop_refs(value, names)


def _plain_text(node: Any) -> None:
    """Every string a spec may hold is plain text: a pattern on each that has no tighter one."""
    if isinstance(node, dict):
        if node.get("type") == "string" and "const" not in node and "enum" not in node:
            if "pattern" not in node:
                node["pattern"] = PLAIN_TEXT
            elif node["pattern"] != PLAIN_TEXT and "\\s" in node["pattern"]:
                # \s also matches control characters: only space, tab and Unicode spaces are plain
                node["pattern"] = node["pattern"].replace("\\s", "[^\\S\\x0b-\\x1f\\x85]")
        for value in node.values():
            _plain_text(value)
    elif isinstance(node, list):
        for value in node:
            _plain_text(value)


def _cross_field(user_code: bool) -> list[dict[str, Any]]:
    """The relations between fields that the spec module checks and a JSON schema can state."""

    def has(**fields: Any) -> dict[str, Any]:
        return {"properties": fields, "required": list(fields)}

    def name_in(*names: str) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"enum": list(names)}}, "required": ["name"]}

    run_length = {
        "anyOf": [
            {"properties": {"max_steps": {"type": "integer"}, "epochs": {"type": "null"}}, "required": ["max_steps"]},
            {"properties": {"epochs": {"type": "integer"}, "max_steps": {"type": "null"}}, "required": ["epochs"]},
        ],
        "description": "Exactly one of max_steps and epochs.",
    }
    precision = {
        "anyOf": [
            {"properties": {"precision": {"const": "fp32"}}},
            has(scaling={"properties": {"use_gpu": {"const": True}}, "required": ["use_gpu"]}),
        ],
        "description": "precision bf16 needs scaling.use_gpu: true.",
    }
    plain = ("synthetic-classification", "synthetic-regression")
    pairs = [
        has(model=name_in("mlp"), data=name_in("digits", *plain)),
        has(model=name_in("cnn"), data=name_in(*plain)),
        has(
            model=name_in("cnn"),
            data={
                "type": "object",
                "properties": {"name": {"const": "digits"}, "as_images": {"const": True}},
                "required": ["name", "as_images"],
            },
        ),
        has(model=name_in("char-transformer"), data=name_in("text")),
    ]
    if user_code:
        custom = {"type": "object", "properties": {"name": {"pattern": ":"}}, "required": ["name"]}
        pairs += [has(model=custom, data={"type": "object"}), has(model={"type": "object"}, data=custom)]
        builtin_loop = {"properties": {"train": {"not": {"required": ["entrypoint"]}}}}
        model_and_data = {
            "anyOf": [
                {"allOf": [builtin_loop, {"anyOf": pairs}]},
                {
                    "properties": {
                        "train": {"required": ["entrypoint"]},
                        "model": {"type": "null"},
                        "data": {"type": "null"},
                    },
                    "required": ["train"],
                },
            ],
            "description": "The built-in loop needs a model and data that go together (char-transformer with text, "
            "cnn on digits with as_images); a train.entrypoint job has neither.",
        }
    else:
        model_and_data = {
            "anyOf": pairs,
            "description": "A model and data that go together: char-transformer with text, cnn on digits with "
            "as_images: true.",
        }
    return [copy.deepcopy(rule) for rule in (run_length, precision, model_and_data)]


def webhook_schema() -> dict[str, Any]:
    """Alertmanager's webhook body as the service reads it."""
    schema = AlertmanagerWebhook.model_json_schema(ref_template="#/components/schemas/{model}")
    alert = schema["$defs"]["AmAlert"]
    alert["properties"]["startsAt"].update(
        format="date-time",
        description="RFC 3339; Alertmanager's zero time (0001-01-01...) means unset and is refused here.",
    )
    return schema
