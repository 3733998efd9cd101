"""Every endpoint fuzzed from the published OpenAPI document: whatever comes in, no 5xx comes out."""

from __future__ import annotations

import tempfile

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.api import create_app
from service.settings import Settings
from tests.service.fakes import FakeCluster

AUTH = {"Authorization": "Bearer fuzz"}

# Built at import: schemathesis' fixture-based loader does not work with this pytest.
app = create_app(
    Settings(
        data_dir=tempfile.mkdtemp(prefix="gradwatch-fuzz-"),
        token="fuzz",
        allowed_hosts="testserver",
        scheduler_enabled=False,
        max_body_bytes=64 * 1024,
    ),
    cluster=FakeCluster(),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
