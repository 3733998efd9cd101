"""The served API's limits, on a real uvicorn on 127.0.0.1 (the scheduler's Ray is the in-memory
FakeCluster): a connection that never finishes its headers is closed after header_timeout, past
max_connections requests get 503, and each user has a share of the log streams."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from service.api.routes import LogFollowers, create_app
from service.api.serving import server_config
from service.settings import Settings
from tests.promstack import wait_for
from tests.service.fakes import FakeCluster, spec
from tests.stack import free_port

ADMIN = "limits-admin-token"


@contextmanager
def served(settings: Settings) -> Iterator[tuple[object, str, int]]:
    app = create_app(settings, cluster=FakeCluster(cpus=4))
    port = free_port()
    server = uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, timeout=20, what="uvicorn")
        yield app, url, port
    finally:
        server.should_exit = True
        thread.join(10)


def closed_by_server(sock: socket.socket, within: float) -> float:
    """Seconds until the server closed `sock` (recv gives b''), failing after `within`."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(1024)
    except TimeoutError:
        pytest.fail(f"the server kept a connection with unfinished headers open over {within} s")
    assert data == b"", data
    return time.monotonic() - start


def test_a_connection_with_unfinished_headers_is_closed_after_header_timeout(tmp_path):
    settings = Settings(data_dir=tmp_path, token=ADMIN, scheduler_enabled=False, header_timeout=1.0)
    with served(settings) as (_, url, port):
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never ends the head
            took = closed_by_server(slow, within=10)
        assert 0.8 <= took < 5
        with socket.create_connection(("127.0.0.1", port)) as silent:  # connects, sends nothing
            assert closed_by_server(silent, within=10) < 5
        # a kept-alive connection: the first request answered, the next head is timed again
        with socket.create_connection(("127.0.0.1", port)) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            kept.settimeout(5)
            answer = b""
            while not answer.endswith(b"}"):  # the head and the JSON body, in however many reads
                answer += kept.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 1")
            assert closed_by_server(kept, within=10) < 5
        # a request whose head came in time is served whole, however long its answer takes
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_past_max_connections_a_request_gets_503(tmp_path):
    settings = Settings(data_dir=tmp_path, token=ADMIN, scheduler_enabled=False, max_connections=3)
    with served(settings) as (_, url, port):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            wait_for(
                lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 503,
                timeout=10,
                what="a request past the connection cap to be refused",
            )
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout=10, what="room again")


def test_each_user_has_a_share_of_the_log_streams(tmp_path):
    settings = Settings(
        data_dir=tmp_path, token=ADMIN, scheduler_enabled=False, max_log_followers=3, max_log_followers_per_user=2
    )
    with served(settings) as (app, url, _):
        tokens = {name: app.state.store.users.add(name, ["submit"]) for name in ("alice", "bob")}
        auth = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
        jobs = {name: httpx.post(f"{url}/v1/jobs", json=spec(name), headers=auth[name]).json()["id"] for name in tokens}

        def follow(client: httpx.Client, name: str):
            return client.stream("GET", f"{url}/v1/jobs/{jobs[name]}/logs", params={"follow": "true"})

        with httpx.Client(timeout=10) as client:
            client.headers.update(auth["alice"])
            with follow(client, "alice") as one, follow(client, "alice") as two:
                assert one.status_code == two.status_code == 200
                third = client.get(f"{url}/v1/jobs/{jobs['alice']}/logs", params={"follow": "true"})
                assert third.status_code == 429
                assert third.json()["detail"].startswith("alice has 2 log streams open, the limit per user")
                client.headers.update(auth["bob"])
                with follow(client, "bob") as bobs:  # alice's streams leave bob his share
                    assert bobs.status_code == 200
                    client.headers.update(auth["alice"])
        wait_for(lambda: app.state.log_followers.open_streams == 0, timeout=10, what="the streams to be let go")


def test_log_followers_count_per_user_and_in_all():
    settings = Settings(token=ADMIN, max_log_followers=3, max_log_followers_per_user=2)
    followers = LogFollowers(settings)
    for user in ("a", "a", "b"):
        assert followers.refusal(user) is None
        followers.open(user)
    assert "limit per user" in (followers.refusal("a") or "")
    assert "this server's limit" in (followers.refusal("c") or "")
    followers.close("a")
    assert followers.refusal("c") is None and followers.of == {"a": 1, "b": 1}
