"""Every endpoint fuzzed from the published OpenAPI document with a person's narrow tokens: a
`read` token gets no 5xx and 403 from every route that changes something; a `submit` token gets
no 5xx."""

from __future__ import annotations

import tempfile

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.api import create_app
from service.settings import Settings
from tests.service.fakes import FakeCluster

# Built at import: schemathesis' fixture-based loader does not work with this pytest.
app = create_app(
    Settings(
        data_dir=tempfile.mkdtemp(prefix="gradwatch-fuzz-tokens-"),
        token="fuzz-admin",
        allowed_hosts="testserver",
        scheduler_enabled=False,
    ),
    cluster=FakeCluster(),
)
READ = {"Authorization": f"Bearer {app.state.store.add_user('reader', ['read'])}"}
SUBMIT = {"Authorization": f"Bearer {app.state.store.add_user('submitter', ['submit'])}"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_read_token_changes_nothing(case):
    response = case.call(headers=with_token(case, READ))
    assert response.status_code < 500, response.text
    assert response.status_code != 401, response.text
    documented = case.method.upper() == case.operation.method.upper()  # not a probe with another method
    if documented and case.method.upper() in MUTATING:
        # 413: a body over the size limit is refused from its Content-Length before anyone reads it
        assert response.status_code in (403, 413), (case.method, case.path, response.status_code, response.text)
    assert sum(app.state.store.count_by_state().values()) == 0  # nothing was ever submitted


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_submit_token_gets_no_server_error(case):
    response = case.call_and_validate(headers=with_token(case, SUBMIT), checks=[not_a_server_error])
    assert response.status_code != 401, response.text


def with_token(case, token: dict[str, str]) -> dict[str, str]:
    """The case's generated headers with our token in place of any Authorization it made up."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    case.headers = {**headers, **token}
    return case.headers
