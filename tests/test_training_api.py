"""The training API in one process (no Ray): decisions, named series, checkpoints and the guard."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

import gradwatch
from gradwatch.status import read_result, read_status
from workers import training
from workers.session import LocalSession


@pytest.fixture(autouse=True)
def fresh_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_STORAGE_PATH", str(tmp_path / "storage"))  # the run directories
    training.enter_job(None)
    yield
    run = training.current()
    if run is not None:
        run.close(0)
    training.enter_job(None)


def sample(registry, metric, **labels):
    return registry.get_sample_value(metric, labels)


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)


def start(session=None, **kwargs):
    return gradwatch.start(
        max_steps=40, telemetry={"interval": 5, "grace_seconds": 0}, serve_metrics=False, session=session, **kwargs
    )


def test_an_unsafe_update_is_skipped_by_the_guarded_optimizer_and_counted():
    run = start()
    model = tiny()
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    for step in range(1, 11):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step == 4:
            loss = loss * float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        safe = run.backward(loss, samples=len(x))
        optimizer.step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert safe is (step != 4) and unchanged is (step == 4), step
    assert run.step == 10 and run.skipped_steps == 1
    run.flush()
    registry, labels = run.telemetry.metrics.registry, {"job_id": run.job_id, "rank": "0"}
    assert sample(registry, "gradwatch_skipped_steps_total", **labels) == 1
    assert sample(registry, "gradwatch_nonfinite_total", **labels, kind="loss") == 1
    assert sample(registry, "gradwatch_step", **labels) == 10
    assert sample(registry, "gradwatch_samples_total", **labels) == 10 * 32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_report_after_your_own_backward_measures_layers_and_updates():
    run = start()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model, optimizer)
    x, y = data()
    for _ in range(5):  # telemetry.interval 5: step 5 is measured
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if run.report(loss):
            optimizer.step()
    registry = run.telemetry.metrics.registry
    run.flush()  # the series take steps in batches: what a reader calls before reading them itself
    for layer in ("0", "2"):
        ratio = sample(registry, "gradwatch_layer_update_ratio", job_id=run.job_id, layer=layer)
        assert 0 < ratio < 1, layer
    assert sample(registry, "gradwatch_grad_norm", job_id=run.job_id) > 0
    history = run.telemetry.last
    assert history["step"] == 5 and history["layer_grad_norm"].keys() == {"0", "2"}


def test_named_losses_and_scalars_are_gauges_and_their_number_is_bounded():
    run = start()
    model = tiny()
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    mse = torch.nn.functional.mse_loss(model(x), y)
    reg = 0.01 * sum(p.abs().sum() for p in model.parameters())
    optimizer.zero_grad()
    run.backward(mse + reg, losses={"mse": mse, "l1": reg})
    optimizer.step()
    run.log(temperature=0.7)
    registry, labels = run.telemetry.metrics.registry, {"job_id": run.job_id, "rank": "0"}
    assert sample(registry, "gradwatch_loss_term", **labels, term="mse") == pytest.approx(mse.item())
    assert sample(registry, "gradwatch_loss_term", **labels, term="l1") == pytest.approx(float(reg))
    assert sample(registry, "gradwatch_scalar", **labels, name="temperature") == pytest.approx(0.7)

    run.log(**{f"s{i}": float(i) for i in range(gradwatch.MAX_NAMED_SERIES - 3)})  # 16 names in all now
    with pytest.raises(ValueError, match="at most 16 named losses and scalars"):
        run.log(one_too_many=1.0)
    with pytest.raises(ValueError, match="use letters, digits and '_'"):
        run.log(**{"bad name": 1.0})


def test_a_restart_restores_the_saved_state_and_returns_the_extra(tmp_path):
    session = LocalSession(checkpoint_root=tmp_path)
    run = start(session)
    model = tiny()
    optimizer = run.watch(model, torch.optim.Adam(model.parameters(), lr=0.01))
    assert run.restore() is None  # a fresh run
    x, y = data()
    for _ in range(12):
        optimizer.zero_grad()
        run.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()
    run.save_checkpoint({"epoch": 3, "cursor": 17})
    saved = [p.detach().clone() for p in model.parameters()]
    run.close(0)

    training.enter_job(None)  # the worker group restarts: a new process, the same checkpoint storage
    again = start(session)
    fresh = tiny(seed=5)
    again.watch(fresh, torch.optim.Adam(fresh.parameters(), lr=0.01))
    assert again.restore() == {"epoch": 3, "cursor": 17}
    assert again.step == 12
    assert all(torch.equal(a, b) for a, b in zip(saved, fresh.parameters(), strict=True))
    registry = again.telemetry.metrics.registry
    assert sample(registry, "gradwatch_restarts_total", job_id=again.job_id, rank="0") == 1


def exploding(run, model, optimizer, steps):
    """Train normally, then make the loss blow up until the guard acts."""
    x, y = data()
    for step in range(1, steps + 1):
        loss = torch.nn.functional.mse_loss(model(x), y) * (1.0 if step <= 30 else 10.0 ** (step - 30))
        optimizer.zero_grad()
        run.backward(loss)
        optimizer.step()
        if step == 25:
            run.save_checkpoint({"at": 25})


def test_on_divergence_stop_ends_the_run_with_a_reason():
    run = start(on_divergence="stop")
    model = tiny()
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(gradwatch.DivergenceStop, match="on_divergence is stop"):
        exploding(run, model, optimizer, 40)
    # outside a job, rank 0 writes the result itself
    result = read_result(run.run_dir or pytest.fail("no run directory"))
    assert result is not None and result.state == "failed" and "on_divergence is stop" in (result.error or "")
    assert result.steps == run.step


def test_on_divergence_rollback_returns_to_the_last_good_checkpoint_with_a_lower_lr():
    run = start(on_divergence="rollback")
    model = tiny()
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    restored: list[dict] = []
    run.on_rollback = restored.append
    x, y = data()
    for step in range(1, 41):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if 30 < step and not restored:
            loss = loss * 10.0 ** (step - 30)
        optimizer.zero_grad()
        run.backward(loss)
        optimizer.step()
        run.end_step()  # act on a divergence now, not at the next step
        if step == 25:
            run.save_checkpoint({"at": 25})
            good = [p.detach().clone() for p in model.parameters()]
        if restored:
            break
    assert restored == [{"at": 25}] and run.rollbacks == 1
    assert run.step == 25 and optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert all(torch.equal(a, b) for a, b in zip(good, model.parameters(), strict=True))


def test_outside_a_job_several_ranks_need_one_job_id():
    class TwoRanks(LocalSession):
        world_size = 2

    with pytest.raises(ValueError, match="give every rank the same job_id"):
        gradwatch.start(session=TwoRanks())
    with pytest.raises(RuntimeError, match=r"call run.watch\(model, optimizer\) before reporting"):
        gradwatch.start(serve_metrics=False).report(1.0)


@pytest.fixture
def ddp_session():
    """A DDP model on a gloo group of this one process, seen by the run as one of two ranks: the run takes
    its DDP path (the loss rides on the gradient all-reduce, a step is recorded during the next one). The
    real two-rank runs are in tests/workers (Ray Train)."""
    import torch.distributed as dist

    class OneOfTwo(LocalSession):
        world_size = 2

        def prepare_model(self, model):
            return torch.nn.parallel.DistributedDataParallel(model)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield OneOfTwo()
    dist.destroy_process_group()


def test_with_ddp_a_step_is_recorded_while_the_next_all_reduce_runs(ddp_session):
    import inspect

    run = start(session=ddp_session, job_id="ddp-shadow")
    model = ddp_session.prepare_model(tiny())
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    recorded_in = {}
    end_step = run.telemetry.end_step

    recorded_norms = {}

    def spying(step, *args, **kwargs):
        recorded_in[step] = [f.function for f in inspect.stack()[1:6]]
        recorded_norms[step] = kwargs["grad_norm"]
        return end_step(step, *args, **kwargs)

    run.telemetry.end_step = spying
    sources = {}
    reduced_grad_norm = run.telemetry.reduced_grad_norm

    def norm_source():
        norm = reduced_grad_norm()
        sources[run.step + 1] = "hook" if norm is not None else "parameters"
        return norm

    run.telemetry.reduced_grad_norm = norm_source
    x, y = data()
    losses, grad_norms = [], []
    for step in range(1, 6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        assert run.backward(loss, samples=len(x))
        grad_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        optimizer.step()
        losses.append(loss.item())
        assert run.step == step  # current at once, though not yet recorded
        assert step not in recorded_in and step - 1 in recorded_in or step == 1
    assert all("hook" in recorded_in[s] for s in range(1, 5)), recorded_in  # inside DDP's comm hook
    run.flush()
    assert "hook" not in recorded_in[5] and run.telemetry.last["step"] == 5
    assert [recorded_norms[s] for s in range(1, 6)] == pytest.approx(grad_norms, rel=1e-5)
    # one bucket holds every gradient: the hook took its norm, except on measured steps (1 and 5)
    assert [s for s, source in sources.items() if source == "hook"] == [2, 3, 4]
    registry, labels = run.telemetry.metrics.registry, {"job_id": run.job_id, "rank": "0"}
    assert sample(registry, "gradwatch_step", **labels) == 5
    assert sample(registry, "gradwatch_loss", **labels, split="train") == pytest.approx(losses[-1])


def test_with_ddp_an_error_while_recording_surfaces_from_the_next_backward(ddp_session):
    run = start(session=ddp_session, job_id="ddp-error")
    model = ddp_session.prepare_model(tiny())
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def broken(*args, **kwargs):
        raise ValueError("disk full")

    run.telemetry.end_step = broken
    x, y = data()
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    run.backward(loss)
    optimizer.step()  # step 1's recording waits for step 2's all-reduce
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="recording step 1 failed: disk full"):
        run.backward(loss)


def test_outside_a_job_the_run_leaves_a_run_directory_that_report_and_replay_read(tmp_path, capsys):
    from service.report.report import load_run, render_report
    from workers.replay import replay_file

    run = gradwatch.start(max_steps=30, telemetry={"interval": 5, "grace_seconds": 30}, job_id="local-run")
    directory = run.run_dir
    assert directory is not None and directory == tmp_path / "storage" / "local-run"
    assert (read_status(directory) or pytest.fail("no status.json")).state == "running"
    model = tiny()
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.05))
    x, y = data()
    while run.step < 30:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        run.backward(loss, samples=len(x))
        optimizer.step()
        run.log(accuracy=run.step / 100)
    run.log_validation(0.5)
    run.finish()
    started = time.monotonic()
    run.close()  # nothing scraped /metrics: no grace period to wait for
    assert time.monotonic() - started < 5
    assert run.max_steps == 30
    assert training.current() is None  # the next start() makes a new run

    line = [entry for entry in capsys.readouterr().err.splitlines() if entry.startswith("gradwatch: job local-run")]
    assert len(line) == 1 and "metrics http://127.0.0.1:" in line[0] and str(directory) in line[0], line
    status, result = read_status(directory), read_result(directory)
    assert status is not None and status.state == "succeeded" and status.step == 30
    assert result is not None and result.state == "succeeded" and result.steps == 30 and result.world_size == 1
    assert [r.rank for r in result.ranks] == [0] and result.ranks[0].steps == 30
    records = [json.loads(raw) for raw in (directory / "history.jsonl").read_text().splitlines()]
    scalars = [r for r in records if r.get("event") == "scalars"]
    assert [r["step"] for r in scalars] == list(range(1, 31))
    assert scalars[-1]["scalars"] == {"accuracy": pytest.approx(0.3)}
    assert any("val_loss" in r for r in records)
    assert (directory / "steps-rank0.jsonl").stat().st_size > 0
    assert json.loads((directory / "spec.json").read_text())["max_steps"] == 30

    replayed = replay_file(directory / "history.jsonl")
    assert replayed.steps == 30
    page = render_report(load_run(directory))
    assert "local-run" in page and "<html" in page.lower()


def test_the_default_run_directory_is_runs_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_STORAGE_PATH")
    monkeypatch.chdir(tmp_path)
    run = start(job_id="here")
    assert run.run_dir == tmp_path / "runs" / "here" and (tmp_path / "runs" / "here" / "status.json").exists()
    explicit = tmp_path / "elsewhere"
    run.close(0)
    result = read_result(tmp_path / "runs" / "here")
    assert result is not None and result.state == "failed" and "before run.finish()" in (result.error or "")
    assert start(job_id="there", run_dir=explicit).run_dir == explicit and (explicit / "spec.json").exists()


def test_close_waits_the_grace_period_only_once_something_scraped_the_endpoint():
    for scrape in (False, True):
        run = gradwatch.start(max_steps=3, telemetry={"grace_seconds": 1.5}, job_id=f"grace-{scrape}")
        model = tiny()
        optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.05))
        x, y = data()
        for _ in range(3):
            optimizer.zero_grad()
            run.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
        run.finish()
        assert run.metrics_url is not None and not run.scraped
        if scrape:
            body = httpx.get(run.metrics_url, timeout=10).text
            assert 'gradwatch_step{job_id="grace-True",rank="0"} 3.0' in body and run.scraped
        started = time.monotonic()
        run.close()
        waited = time.monotonic() - started
        assert (waited >= 1.4) if scrape else (waited < 1.0), (scrape, waited)


def test_close_ends_as_soon_as_a_scrape_after_the_last_step_is_answered():
    run = gradwatch.start(max_steps=4, telemetry={"interval": 1, "grace_seconds": 60}, job_id="scraped-last")
    model = tiny()
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.05))
    x, y = data()

    def step() -> None:
        optimizer.zero_grad()
        run.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()

    step()  # the endpoint is served from the first step on
    url = run.metrics_url
    assert url is not None
    bodies: list[str] = []
    stop, first = threading.Event(), threading.Event()

    def scrape() -> None:  # a scraper every 0.2 s, like Prometheus
        while not stop.wait(0.2):
            try:
                bodies.append(httpx.get(url, timeout=10).text)
            except httpx.HTTPError:
                return  # the endpoint closed
            first.set()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    assert first.wait(timeout=30), "the endpoint was never scraped"
    for _ in range(3):
        step()
    run.finish()
    started = time.monotonic()
    run.close()
    waited = time.monotonic() - started
    stop.set()
    scraper.join(timeout=10)
    assert waited < 10, f"close() waited {waited:.1f} s though the endpoint was scraped every 0.2 s"
    assert 'gradwatch_step{job_id="scraped-last",rank="0"} 4.0' in bodies[-1], bodies[-1][-2000:]


def test_run_log_takes_numbers_only():
    run = start()
    model = tiny()
    run.watch(model, torch.optim.SGD(model.parameters(), lr=0.05))
    with pytest.raises(ValueError, match=r"run.log\(acc=...\): give a number, got str"):
        run.log(acc="high")
