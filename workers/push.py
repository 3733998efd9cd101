"""The driver's reports to the service over HTTP: the one way the service learns a job's status.

The service gives each driver its job's URL and a token good for that job only
(GRADWATCH_PUSH_URL, GRADWATCH_PUSH_TOKEN). A background thread sends the newest status with the
events not yet delivered, retrying every RETRY_SECONDS for as long as the job runs, so a slow or
restarting service never holds up training and loses no event (past MAX_PENDING_EVENTS undelivered
the oldest are dropped and counted); `finish` delivers the last status and the result before the
driver exits, retrying for its `timeout`. A result it could not deliver is still in the run folder's
result.json, which the service reads where it sees that folder; status.json and result.json stay
the run's local artifacts either way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from gradwatch.status import RunResult, RunStatus

log = logging.getLogger("gradwatch.push")

RETRY_SECONDS = 1.0
MAX_PENDING_EVENTS = 10_000  # beyond this, the oldest undelivered events are dropped (and counted)


class Pusher:
    def __init__(self, url: str, token: str, job_id: str, timeout: float = 10.0, client: httpx.Client | None = None):
        self.job_id = job_id
        self._http = client or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._http.headers["Authorization"] = f"Bearer {token}"
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._status: dict[str, Any] | None = None
        self._events: list[dict[str, Any]] = []
        self.dropped_events = 0
        self._thread = threading.Thread(target=self._run, name=f"push-{job_id}", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, job_id: str) -> Pusher | None:
        """A pusher when the service sent a URL and the job's token (in the environment, or in a file
        named by GRADWATCH_JOB_TOKEN_FILE where the service shares a folder with the nodes)."""
        url, token = os.environ.get("GRADWATCH_PUSH_URL"), os.environ.get("GRADWATCH_PUSH_TOKEN")
        if not token and os.environ.get("GRADWATCH_JOB_TOKEN_FILE"):
            try:
                token = Path(os.environ["GRADWATCH_JOB_TOKEN_FILE"]).read_text().strip()
            except OSError as exc:
                log.warning("cannot read the job's token: %s", exc)
        return cls(url, token, job_id) if url and token else None

    def listener(self, status: RunStatus, events: list[dict[str, Any]]) -> None:
        """A JobWatch listener: note the newest status and queue the events; the thread sends them."""
        with self._lock:
            self._status = status.model_dump(mode="json")
            self._events.extend(events)
            if len(self._events) > MAX_PENDING_EVENTS:
                self.dropped_events += len(self._events) - MAX_PENDING_EVENTS
                del self._events[:-MAX_PENDING_EVENTS]
        self._wake.set()

    def _send_progress(self) -> bool:
        with self._lock:
            status, events = self._status, list(self._events)
        if status is None:
            return True
        try:
            response = self._http.post(f"/v1/jobs/{self.job_id}/progress", json={"status": status, "events": events})
        except httpx.HTTPError as exc:
            log.warning("could not report progress to the service: %s", exc)
            return False
        if response.status_code != 200:
            log.warning("the service refused progress (%s): %s", response.status_code, response.text[:300])
            return response.status_code in (401, 403, 404, 409, 422)  # retrying cannot help
        with self._lock:
            del self._events[: len(events)]
            if self._status is status:
                self._status = None  # sent; wait for the next one
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self._send_progress():
                self._stop.wait(RETRY_SECONDS)
                self._wake.set()

    def finish(self, result: RunResult, timeout: float = 60.0) -> bool:
        """Deliver the last status and the result (retrying up to `timeout` s); True once delivered."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=15)
        deadline = time.monotonic() + timeout
        body = {"result": result.model_dump(mode="json")}
        while True:
            sent = self._send_progress()
            if sent:
                try:
                    response = self._http.post(f"/v1/jobs/{self.job_id}/result", json=body)
                    if response.status_code == 200:
                        return True
                    log.warning("the service refused the result (%s): %s", response.status_code, response.text[:300])
                    if response.status_code in (401, 403, 404, 409, 422):
                        return False
                except httpx.HTTPError as exc:
                    log.warning("could not report the result to the service: %s", exc)
            if time.monotonic() >= deadline:
                return False
            time.sleep(RETRY_SECONDS)
