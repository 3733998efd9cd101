"""Stored alerts change only with news of the same alert: forged and replayed Alertmanager webhooks
through the real route (POST /v1/alerts with Alertmanager's token), against the real store.

Who may send the webhook at all is tested in test_security.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.routes import create_app
from service.auth import consumer_token
from service.settings import Settings
from tests.service.fakes import FakeCluster

ADMIN = "operator-s3cret"
STARTS = "2026-01-02T03:04:05Z"


@pytest.fixture
def http(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", token=ADMIN, allowed_hosts="testserver", scheduler_enabled=False)
    app = create_app(settings, cluster=FakeCluster())
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        client.alertmanager = {"Authorization": f"Bearer {consumer_token(settings, 'alertmanager')}"}
        yield client


def alert(status="firing", starts=STARTS, ends=None, summary="gw-a diverges", **labels) -> dict:
    return {
        "status": status,
        "labels": {"alertname": "TrainingDiverging", "job_id": "gw-a", "severity": "critical", **labels},
        "annotations": {"summary": summary},
        "startsAt": starts,
        "endsAt": ends or "0001-01-01T00:00:00Z",
        "fingerprint": "fp-gw-a",
    }


def send(http, *alerts) -> dict:
    body = {"version": "4", "status": alerts[0]["status"], "receiver": "gradwatch", "alerts": list(alerts)}
    response = http.post("/v1/alerts", json=body, headers=http.alertmanager)
    assert response.status_code == 200, response.text
    return response.json()


def stored(http) -> list[dict]:
    return http.get("/v1/alerts").json()["data"]


def test_a_known_fingerprint_with_other_labels_does_not_rewrite_the_alert(http):
    assert send(http, alert())["new"] == 1
    # the same fingerprint and startsAt, other labels: a forgery (or a collision), never the same alert
    for forged in (
        alert(summary="all is well", severity="info"),
        alert(summary="all is well", job_id="gw-b"),
        alert(summary="all is well", team="mallory"),
        alert(status="resolved", ends="2026-01-02T03:09:00Z", summary="all is well", severity="info"),
    ):
        assert send(http, forged) == {"received": 1, "new": 0, "updated": 0, "refused": 1}, forged
    (row,) = stored(http)
    assert (row["status"], row["summary"], row["severity"], row["job_id"]) == (
        "firing",
        "gw-a diverges",
        "critical",
        "gw-a",
    )
    assert row["labels"] == alert()["labels"]
    # the same labels with a new summary is the same alert's news
    assert send(http, alert(summary="gw-a diverges faster"))["updated"] == 1
    assert [a["summary"] for a in stored(http)] == ["gw-a diverges faster"]


def test_an_old_firing_replayed_after_the_resolution_does_not_reopen_the_alert(http):
    send(http, alert())
    resolved = alert(status="resolved", ends="2026-01-02T03:09:00Z")
    assert send(http, resolved)["updated"] == 1
    assert send(http, alert()) == {"received": 1, "new": 0, "updated": 0, "refused": 1}  # the replayed firing
    earlier = alert(status="resolved", ends="2026-01-02T03:06:00Z")  # an older resolution, replayed
    assert send(http, earlier)["refused"] == 1
    (row,) = stored(http)
    assert (row["status"], row["ends_at"]) == ("resolved", "2026-01-02T03:09:00.000Z")
    # the alert firing again is a new one (Prometheus gives it a new startsAt): stored beside it
    again = send(http, alert(starts="2026-01-02T04:00:00Z"))
    assert again["new"] == 1
    assert sorted((a["starts_at"], a["status"]) for a in stored(http)) == [
        ("2026-01-02T03:04:05.000Z", "resolved"),
        ("2026-01-02T04:00:00.000Z", "firing"),
    ]


def test_a_replay_inside_one_notification_changes_nothing_either(http):
    send(http, alert())
    reply = send(http, alert(status="resolved", ends="2026-01-02T03:09:00Z"), alert())
    assert reply == {"received": 2, "new": 0, "updated": 1, "refused": 1}
    assert [a["status"] for a in stored(http)] == ["resolved"]
