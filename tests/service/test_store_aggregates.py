"""Each of the store's aggregates driven alone, on its own in-memory SQLite database."""

from __future__ import annotations

import pytest

from gradwatch.spec import load_spec
from service.auth import split_token
from service.store.alerts import Alerts, AlertUpdate
from service.store.engine import Database
from service.store.errors import UserExists, UserNotFound
from service.store.jobs import Jobs
from service.store.users import Users
from tests.service.fakes import spec


@pytest.fixture
def db():
    database = Database("sqlite://")
    yield database
    database.close()


def test_users_alone_issue_authenticate_and_revoke_tokens(db):
    users = Users(db)
    assert not users.has_tokens()
    text = users.add("alice", ["submit"], now=10.0)
    token = users.authenticate(text)
    assert token is not None and (token.user, token.scopes, token.job_id) == ("alice", "submit", None)
    token_id, secret = split_token(text) or ("", "")
    assert token.digest != secret and secret not in token.digest  # only the hash is kept
    wrong = secret[:-1] + ("a" if secret[-1] != "a" else "b")
    forged = f"{text[: -len(secret)]}{wrong}"
    assert split_token(forged) == (token_id, wrong) and users.authenticate(forged) is None
    second = users.issue_token("alice", ["read"], now=20.0)
    assert [(u.name, [t.scopes for t in ts]) for u, ts in users.everyone()] == [("alice", ["submit", "read"])]
    with pytest.raises(UserExists, match="gradwatch user token alice"):
        users.add("alice", ["read"])
    assert users.revoke("alice") == 2
    assert users.authenticate(text) is None and users.authenticate(second) is None
    assert not users.has_tokens()
    with pytest.raises(UserNotFound, match="no active user 'alice'"):
        users.issue_token("alice", ["read"])
    with pytest.raises(UserNotFound, match="no user 'bob'"):
        users.revoke("bob")


def test_a_jobs_token_lives_until_its_job_ends_across_aggregates_on_one_database(db):
    jobs, users = Jobs(db), Users(db)
    job = jobs.create(load_spec(spec("digits")), owner="alice")
    text = users.issue_token("alice", ["job:progress"], job_id=job.id)  # no user row needed for a job's token
    token = users.authenticate(text)
    assert token is not None and token.job_id == job.id
    assert users.everyone() == []  # job tokens are no person's
    ended, needs_stop = jobs.request_stop(job.id, "cancel", "not needed")
    assert (ended.state, needs_stop) == ("cancelled", False)
    assert users.authenticate(text) is None


def test_alerts_alone_store_list_and_refuse_forgeries(db):
    alerts = Alerts(db)
    firing = AlertUpdate(
        fingerprint="f1",
        status="firing",
        starts_at=100.0,
        ends_at=None,
        labels={"alertname": "TrainingLossSpike", "job_id": "gw-1"},
        annotations={"summary": "loss spiked"},
    )
    assert alerts.ingest([firing], now=5.0) == (1, 0, 0)
    forged = AlertUpdate(**{**firing.__dict__, "labels": {"alertname": "Other", "job_id": "gw-1"}})
    assert alerts.ingest([forged]) == (0, 0, 1)
    [row] = alerts.listing(job_id="gw-1")
    assert (row.alertname, row.summary, row.received_at) == ("TrainingLossSpike", "loss spiked", 5.0)
    assert alerts.listing(owner="alice") == []  # no stored job is alice's: the alert is nobody's
