"""service/stack/supervisor.py: children that are ready at their probe, named with their log when they fail,
and `gradwatch up` killed and started again on its port."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import httpx
import pytest

from service.stack.supervisor import (
    ChildFailed,
    ServiceProcess,
    free_port,
    port_is_free,
    start_child,
    wait_for,
)

PYTHON = sys.executable


def test_wait_for_refuses_a_negative_timeout_and_an_empty_interval():
    with pytest.raises(ValueError, match=r"timeout >= 0 and interval > 0 seconds, got -1 and 0.1"):
        wait_for(lambda: True, timeout=-1, interval=0.1)
    with pytest.raises(ValueError, match=r"got 1 and 0"):
        wait_for(lambda: True, timeout=1, interval=0)


def test_wait_for_returns_the_first_truthy_result_and_names_the_last_one_on_timeout():
    calls: Iterator[object] = iter([None, 0, [], "up"])
    assert wait_for(lambda: next(calls), timeout=5, interval=0.01) == "up"
    with pytest.raises(TimeoutError, match=r"for the port to be refused; last result: ConnectError"):
        port = free_port()  # nothing listens there: every try is a connection error
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1), 0.3, 0.1, "the port to be refused")


def test_a_child_that_exits_is_named_with_its_code_log_and_tail(tmp_path):
    log = tmp_path / "logs" / "failing.log"  # its folder is made
    command = [PYTHON, "-c", "print('bad flag --x', flush=True); raise SystemExit(3)"]
    with pytest.raises(ChildFailed) as failed:
        start_child("failing", command, free_port(), log, timeout=30)
    assert str(failed.value).startswith(f"failing exited with 3 (log {log}):\n")
    assert str(failed.value).endswith("bad flag --x")


def test_a_child_not_ready_in_time_is_named_and_stopped(tmp_path):
    log = tmp_path / "slow.log"
    port = free_port()
    command = [PYTHON, "-c", "import time; print('still loading', flush=True); time.sleep(120)"]
    with pytest.raises(ChildFailed, match=rf"slow did not answer http://127.0.0.1:{port}/-/ready within 1 s") as late:
        start_child("slow", command, port, log, timeout=1)
    assert f"(log {log})" in str(late.value)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    mine = [p for p in pids if _cmdline(p).endswith("time.sleep(120)")]
    assert mine == [], "the child that was not ready still runs"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_a_binary_that_is_not_there_is_named(tmp_path):
    with pytest.raises(ChildFailed, match=r"^nothing could not be started \(/nonexistent/server\): "):
        start_child("nothing", ["/nonexistent/server"], free_port(), tmp_path / "nothing.log")


def test_a_probe_is_a_path(tmp_path):
    with pytest.raises(ValueError, match=r"probe of web must be a path starting with '/', got 'healthz'"):
        start_child("web", [PYTHON, "-c", "pass"], free_port(), tmp_path / "web.log", probe="healthz")


def test_a_server_is_ready_at_its_probe_and_stops_with_sigterm(tmp_path):
    port = free_port()
    command = [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    child = start_child("web", command, port, tmp_path / "web.log", tmp_path, probe="/")
    try:
        assert child.url == f"http://127.0.0.1:{port}" and child.ready()
        assert not port_is_free(port)
    finally:
        child.stop()
    assert child.process.returncode == -signal.SIGTERM
    with pytest.raises(httpx.ConnectError):  # nothing listens there any more
        httpx.get(f"{child.url}/", timeout=2)


@pytest.mark.timeout(240)
def test_gradwatch_up_is_killed_and_started_again_on_its_port(tmp_path):
    env = {
        **os.environ,
        "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",  # no Ray: the service starts without one
        "GRADWATCH_SCHEDULER_ENABLED": "false",
    }
    service = ServiceProcess(tmp_path / "gradwatch", ["--no-monitoring"], env=env, token="supervisor-token")
    with pytest.raises(RuntimeError, match=r"was never started: call start\(\) first"):
        service.kill()
    service.start()
    try:
        first = service.process
        assert first is not None and service.client.jobs() == []
        with pytest.raises(RuntimeError, match=rf"already runs at {service.url} \(pid {first.pid}\): stop\(\) it"):
            service.start()
        service.kill()
        assert first.returncode == -signal.SIGKILL
        service.start()  # the same port, data dir and log
        assert service.process is not first and service.client.jobs() == []
    finally:
        service.stop()
    assert service.process is not None and service.process.returncode == 0  # SIGTERM: a clean exit
    assert service.log.read_text().count(f"gradwatch API  {service.url}") == 2
    with pytest.raises(TypeError, match=r"not one string"):
        ServiceProcess(tmp_path, "--no-monitoring")
