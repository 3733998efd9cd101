"""Python SDK for the gradwatch service.

from service.client import Client
gw = Client()                      # GRADWATCH_URL / GRADWATCH_TOKEN
job = gw.submit("examples/digits-mlp.yaml")
for line in gw.logs(job["id"], follow=True):
    print(line)
print(gw.wait(job["id"])["state"])
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gradwatch.names import DEFAULT_SERVICE_URL, TERMINAL_STATES
from gradwatch.spec import JobSpec


class GradwatchError(Exception):
    """The server refused a request; `status` is the HTTP code, `errors` the spec problems of a 422."""

    def __init__(self, message: str, *, status: int | None = None, errors: list[str] | None = None):
        self.status = status
        self.errors = errors or []
        text = message if not self.errors else message + "\n" + "\n".join(f"  {e}" for e in self.errors)
        super().__init__(text)
        self.message = message


def saved_token(data_dir: str | Path | None = None) -> str | None:
    """The token `gradwatch up` saved on this machine, if any."""
    from service.settings import default_data_dir

    base = Path(data_dir or os.environ.get("GRADWATCH_DATA_DIR") or default_data_dir()).expanduser()
    try:
        return (base / "token").read_text().strip() or None
    except OSError:
        return None


def read_token_file(path: Path, environment: str) -> str:
    """The token in the file at `path` (surrounding whitespace dropped); ValueError naming the path
    and the fix when it cannot be read or is empty. `environment` is the variable that holds the
    token instead of a file, for the message."""
    try:
        token = path.expanduser().read_text().strip()
    except OSError as exc:
        raise ValueError(
            f"cannot read the token file {path}: {exc.strerror}; point --token-file at a readable file "
            f"holding the token, or set {environment}"
        ) from None
    if not token:
        raise ValueError(f"the token file {path} is empty: write the token into it, or set {environment}")
    return token


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0):
        self.url = (url or os.environ.get("GRADWATCH_URL") or DEFAULT_SERVICE_URL).rstrip("/")
        self.token = token or os.environ.get("GRADWATCH_TOKEN") or saved_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- requests
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise GradwatchError(
                f"cannot reach the gradwatch service at {self.url}: {exc} "
                "(is `gradwatch up` running? set GRADWATCH_URL)"
            ) from None
        _raise_for(response)
        return (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else response.text
        )

    def submit(self, spec: dict[str, Any] | str | Path | JobSpec) -> dict[str, Any]:
        """Queue a job. `spec`: a mapping, a JobSpec, a path to a YAML/JSON file, or YAML/JSON text."""
        if isinstance(spec, JobSpec):
            return self._request("POST", "/v1/jobs", json=spec.model_dump(mode="json", exclude_unset=True))
        if isinstance(spec, dict):
            return self._request("POST", "/v1/jobs", json=spec)
        if isinstance(spec, Path) or (
            isinstance(spec, str) and "\n" not in spec and spec.endswith((".yaml", ".yml", ".json"))
        ):
            try:
                spec = Path(spec).read_text()
            except OSError as exc:
                raise GradwatchError(f"cannot read spec file {spec}: {exc.strerror}") from None
        return self._request("POST", "/v1/jobs", content=spec.encode(), headers={"Content-Type": "application/yaml"})

    def jobs(
        self,
        state: str | list[str] | None = None,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Newest first. See `jobs_page` for the cursor to the next page."""
        return self.jobs_page(state, name=name, labels=labels, limit=limit, cursor=cursor, offset=offset)["data"]

    def jobs_page(
        self,
        state: str | list[str] | None = None,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        params: list[tuple[str, str | int]] = [("limit", limit), ("offset", offset)]
        params += [("state", s) for s in ([state] if isinstance(state, str) else state or [])]
        params += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        if name:
            params.append(("name", name))
        if cursor:
            params.append(("cursor", cursor))
        return self._request("GET", "/v1/jobs", params=params)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def report(self, job_id: str) -> str:
        """The job's report: one self-contained HTML page (`gradwatch report`)."""
        return self._request("GET", f"/v1/jobs/{job_id}/report")

    def report_url(self, job_id: str) -> str:
        return f"{self.url}/v1/jobs/{job_id}/report"

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def alerts(
        self,
        job_id: str | None = None,
        *,
        status: str | None = None,
        since_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if job_id:
            params["job_id"] = job_id
        if status:
            params["status"] = status
        if since_id is not None:
            params["since_id"] = since_id
        return self._request("GET", "/v1/alerts", params=params)["data"]

    def targets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/targets")

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with follow, they keep coming until the job ends."""
        if not follow:
            text = self._request("GET", f"/v1/jobs/{job_id}/logs")
            yield from text.splitlines()
            return
        try:
            with self._http.stream(
                "GET",
                f"/v1/jobs/{job_id}/logs",
                params={"follow": "true"},
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise GradwatchError(f"log stream from {self.url} broke: {exc}") from None

    def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 1.0) -> dict[str, Any]:
        """Block until the job ends; returns it. TimeoutError if `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['state']} after {timeout:g} s")
            time.sleep(poll)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except (json.JSONDecodeError, ValueError):
        body = {"detail": response.text.strip() or response.reason_phrase}
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        detail = json.dumps(detail) if detail is not None else response.reason_phrase
    errors = body.get("errors") if isinstance(body, dict) and isinstance(body.get("errors"), list) else None
    raise GradwatchError(f"{detail} (HTTP {response.status_code})", status=response.status_code, errors=errors)


__all__ = ["Client", "GradwatchError"]
