"""The OpenAPI document states what the API does (the fuzz test checks it against a live service; these
are the quick checks of the same truths, in process)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.api.routes import create_app
from service.settings import Settings
from tests.service.fakes import FakeCluster

AUTH = {"Authorization": "Bearer t"}


@pytest.fixture
def api(tmp_path):
    app = create_app(
        Settings(data_dir=tmp_path, token="t", allowed_hosts="testserver", scheduler_enabled=False),
        cluster=FakeCluster(),
    )
    with TestClient(app) as client:
        yield client


def test_every_method_of_a_path_is_in_allow(api):
    for method in ("OPTIONS", "PUT", "DELETE"):
        response = api.request(method, "/v1/jobs", headers=AUTH)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, POST"
        assert "use GET or POST" in response.json()["detail"]
    assert api.request("OPTIONS", "/v1/jobs/gw-1/cancel", headers=AUTH).headers["allow"] == "POST"


def test_error_bodies_are_the_ones_sent(api):
    doc = api.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)
    for item in doc["paths"].values():
        for operation in item.values():
            for code, response in operation["responses"].items():
                if int(code) < 400:
                    continue
                body = "RequestErrorsOut" if code == "422" else "ErrorOut"
                assert response["content"] == {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}
    sent = api.get("/v1/jobs", params={"limit": 0}, headers=AUTH)
    assert sent.status_code == 422 and set(sent.json()) == {"detail", "errors"}
    assert doc["components"]["schemas"]["RequestErrorsOut"]["required"] == ["detail", "errors"]


def test_the_spec_schema_states_the_rules_between_fields(api):
    import jsonschema

    doc = api.get("/openapi.json").json()
    schema = {"$ref": "#/components/schemas/JobSpec", "components": doc["components"]}
    valid = jsonschema.Draft202012Validator(schema).is_valid
    base = {"name": "ok", "model": {"name": "mlp"}, "data": {"name": "digits"}}
    assert valid({**base, "max_steps": 10})
    assert not valid(base)  # neither max_steps nor epochs
    assert not valid({**base, "max_steps": 10, "epochs": 1})
    assert not valid({**base, "max_steps": 10, "precision": "bf16"})
    assert not valid({**base, "max_steps": 10, "model": {"name": "cnn"}})  # digits as images only
    assert not valid({"name": "ok", "max_steps": 10, "model": {"name": "mlp"}})  # no data
    assert not valid({"name": "ok", "max_steps": 10, "model": {"name": "cnn"}, "data": None})
    assert not valid({**base, "max_steps": 10, "model": {"name": "pkg.mod:factory"}})  # user code is off here
    assert not valid({**base, "max_steps": 10, "labels": {"team": "a\x1bb"}})
    assert api.post("/v1/jobs", json=base, headers=AUTH).status_code == 422
    assert "warmup_steps must be less than max_steps" in doc["components"]["schemas"]["JobSpec"]["description"]


def test_data_paths_are_stated_as_this_server_reads_them(tmp_path):
    import jsonschema

    from service.api.openapi import job_spec_schema

    def path_ok(roots: str, path: str) -> bool:
        settings = Settings(data_dir=tmp_path, token="t", data_roots=roots)
        schema = job_spec_schema(settings)["$defs"]["TextData"]["properties"]["path"]
        return jsonschema.Draft202012Validator(schema).is_valid(path)

    from gradwatch.spec import SpecError, load_spec

    def read(path: str) -> bool:
        spec = {"name": "t", "model": {"name": "char-transformer"}, "data": {"name": "text", "path": path}}
        try:
            load_spec({**spec, "max_steps": 5}, user_code="deny", data_roots=["/srv/corpora"])
        except SpecError:
            return False
        return True

    paths = ["/srv/corpora/books/a.txt", "/srv/corpora", "/srv/corpora/./a//b", "/srv/corpora/..x/y"]
    refused = ["/srv/corpora/../etc/passwd", "/srv/corporax/a.txt", "books/a.txt", "/srv/corpora/a\x1b"]
    for path in paths + refused:
        assert path_ok("/srv/corpora", path) == read(path) == (path in paths), path
    assert not path_ok("", "/srv/corpora/a.txt")  # no roots: no path at all
