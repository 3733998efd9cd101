"""Training-dynamics telemetry of one worker: measure, detect, export.

Per step: loss, loss EMA, step time, samples, non-finite counts, heartbeat.
Every `telemetry.interval` steps: global and per-layer gradient norms, weight
norms and update ratios (fused `torch._foreach_norm`, one host sync for all of
them), the learning rate, and the gradient noise scale from the DDP comm hook.
Rank 0 exports the series that are identical on every rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from wsgiref.simple_server import WSGIServer

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from gradwatch.status import event_line
from workers.board import BoardClient
from workers.detectors import DynamicsMonitor
from workers.gns import GradientNoiseScale, group_layers
from workers.metrics import JobSeries, WorkerMetrics

log = logging.getLogger("gradwatch.telemetry")
# allreduce_hook's process group: None is the default (world) group, which its annotation leaves out.
_WORLD: Any = None


class LocalNormHook:
    """DDP comm hook: the gradient all-reduce, carrying the loss and |G_small|^2 along for free.

    Each bucket holds this rank's own gradient until the all-reduce averages it, so on measured
    steps summing the buckets' squared norms gives |G_small|^2. The loss and that sum ride as two
    extra elements on the last bucket's all-reduce, so neither costs a collective of its own.
    """

    def __init__(self, device: torch.device, world_size: int):
        self.armed = False
        self.world_size = world_size
        self.local_sq = torch.zeros((), device=device, dtype=torch.float32)
        self.loss: torch.Tensor | None = None
        self.reduced: torch.Tensor | None = None  # mean over ranks of [loss, |G_small|^2], after backward
        self.last_ready = 0.0  # when this rank's last bucket was ready: after it, the rank only waits

    @staticmethod
    def hook(state: LocalNormHook, bucket):
        buffer = bucket.buffer()
        if state.armed:
            state.local_sq += buffer.detach().float().pow(2).sum()
        if bucket.is_last():
            state.last_ready = time.perf_counter()
        if not bucket.is_last() or (state.loss is None and not state.armed):
            return default_hooks.allreduce_hook(_WORLD, bucket)
        loss = state.loss if state.loss is not None else torch.zeros((), device=buffer.device)
        riders = torch.stack([loss.float().reshape(()), state.local_sq]).to(buffer.dtype)
        n = buffer.numel()
        packed = torch.cat([buffer, riders]).div_(state.world_size)
        future = dist.all_reduce(packed, async_op=True).get_future()

        def unpack(fut):
            reduced = fut.value()[0]
            state.reduced = reduced[n:].float().clone()
            return reduced[:n]

        return future.then(unpack)

    def begin(self, measure: bool, loss: torch.Tensor | None) -> None:
        self.armed, self.loss, self.reduced = measure, loss, None
        if measure:
            self.local_sq.zero_()


class Telemetry:
    def __init__(
        self,
        spec: Any,
        job_id: str,
        rank: int,
        world_size: int,
        model: torch.nn.Module,
        device: torch.device,
        *,
        board: BoardClient | None = None,
        history_path: Path | None = None,
        metrics: WorkerMetrics | None = None,
    ):
        self.cfg = spec.telemetry
        self.enabled = self.cfg.enabled
        self.rank, self.world_size = rank, world_size
        self.batch_size = spec.batch_size
        self.board = board
        self.metrics = metrics or WorkerMetrics(job_id, rank)
        if self.metrics.job is not None:
            self.metrics.job.set_info(spec.name, spec.owner or "", spec.model_name, world_size, spec.labels)
        # the schedule's warm-up is the detectors' too: a rising learning rate is not a run to judge yet
        self._schedule_warmup = spec.schedule.warmup_steps
        self.monitor = DynamicsMonitor(self.cfg.detectors, warmup_steps=self._schedule_warmup)
        self._gauges_stale = True
        self.gns = GradientNoiseScale(self.cfg.gns_ema)
        self.history = history_path.open("a") if history_path and rank == 0 else None
        # Each rank's own step time, one line per measured step (the history is rank 0's alone).
        self.step_times = history_path.with_name(f"steps-rank{rank}.jsonl").open("a") if history_path else None
        self._unlogged = [0.0, 0]  # step seconds and steps since the last line of step_times
        self._labels = (job_id, str(rank))
        self._children = self._step_children()
        self._server: WSGIServer | None = None
        self.endpoint: tuple[str, int] | None = None
        self.last: dict[str, Any] = {}
        self._group_layers(model, device)
        self._before: list[torch.Tensor] | None = None
        self._layer_gauges: list[tuple[str, Any, Any, Any]] | None = None
        self.hook: LocalNormHook | None = None
        if world_size > 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            self.hook = LocalNormHook(device, world_size)
            model.register_comm_hook(self.hook, LocalNormHook.hook)
        self.measuring = False
        if self.metrics.job is not None:
            self.metrics.job.global_batch.labels(job_id).set(spec.batch_size * world_size)

    def _step_children(self) -> SimpleNamespace:
        """The per-step series' labelled children, looked up once: the step path only sets values."""
        m, labels = self.metrics, self._labels
        return SimpleNamespace(
            step=m.step.labels(*labels),
            epoch=m.epoch.labels(*labels),
            loss=m.loss.labels(*labels, "train"),
            samples=m.samples.labels(*labels),
            step_duration=m.step_duration.labels(*labels),
            heartbeat=m.heartbeat.labels(*labels),
            loss_ema=m.loss_ema.labels(*labels),
            nonfinite_loss=m.nonfinite.labels(*labels, "loss"),
            nonfinite_grad=m.nonfinite.labels(*labels, "grad"),
            skipped=m.skipped_steps.labels(*labels),
        )

    def _group_layers(self, model: torch.nn.Module, device: torch.device) -> None:
        """The trained parameters, and the at most `max_layers` layer groups their norms are reported by."""
        inner: torch.nn.Module = getattr(model, "module", model)  # DDP's wrapped model, or the model
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        self.params: list[torch.Tensor] = [p for _, p in named]
        groups = group_layers([n for n, _ in named], self.cfg.max_layers)
        self.layer_names = sorted(set(groups.values()), key=list(groups.values()).index)
        self._group_index = torch.tensor([self.layer_names.index(groups[n]) for n, _ in named], device=device)

    # ------------------------------------------------------------ detectors
    def detector_state(self) -> str:
        """The detectors' whole state (references, EMAs, latches, what was raised), for a checkpoint."""
        return json.dumps(self.monitor.state_dict())

    def restore_detectors(self, state: str | None) -> None:
        """After a resume or a rollback: the detectors continue from the checkpoint's state (fresh when
        it has none), remembering every phase and anomaly the run went through since."""
        phases, raised = self.monitor.phases_entered, self.monitor.anomalies_raised
        self.monitor.events()
        self.monitor = DynamicsMonitor(self.cfg.detectors, warmup_steps=self._schedule_warmup)
        self._gauges_stale = True  # a restored monitor may hold another phase than the gauges show
        if state:
            self.monitor.load_state_dict(json.loads(state))
        self.monitor.entered = phases if len(phases) > len(self.monitor.entered) else self.monitor.entered
        for kind, step in raised.items():
            self.monitor.raised.setdefault(kind, step)

    @property
    def phases_entered(self) -> list[tuple[str, int]]:
        return self.monitor.phases_entered

    @property
    def anomalies_raised(self) -> dict[str, int]:
        return self.monitor.anomalies_raised

    # ------------------------------------------------------------- exporter
    def serve(self, host: str) -> tuple[str, int]:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(0, addr=host, registry=self.metrics.registry)
        self.endpoint = (host, self._server.server_port)
        if self.board:
            self.board.post_endpoint(self.rank, host, self.endpoint[1], os.getpid())
        return self.endpoint

    def close(self, grace_seconds: float) -> None:
        if self.history:
            self.history.close()
            self.history = None
        if self.step_times:
            self.step_times.close()
            self.step_times = None
        if self._server is None:
            return
        time.sleep(grace_seconds)  # let Prometheus scrape the final values
        if self.board:
            self.board.drop_endpoint(self.rank)
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    # ---------------------------------------------------------------- steps
    def should_measure(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.interval == 0 or step == 1)

    def begin_step(self, step: int) -> None:
        self.measuring = self.should_measure(step)
        if self.measuring:
            self._before = [p.detach().clone() for p in self.params]

    def before_backward(self, loss: torch.Tensor | None) -> None:
        """Hand the DDP hook what rides on the gradient all-reduce: the loss when the caller needs its
        mean over ranks, and the measured step's local norms."""
        if self.hook is not None:
            self.hook.begin(self.measuring, loss)

    def sync_wait_seconds(self, backward_done: float) -> float:
        """Time this rank spent after its own gradients were ready, waiting for the all-reduce (slower ranks)."""
        if self.hook is None or not self.hook.last_ready:
            return 0.0
        return max(0.0, backward_done - self.hook.last_ready)

    def mean_loss(self) -> torch.Tensor | None:
        """The loss averaged over ranks by the gradient all-reduce, or None without the DDP hook."""
        if self.hook is None or self.hook.reduced is None or self.hook.loss is None:
            return None
        return self.hook.reduced[:1]

    def grad_norms(self) -> list[torch.Tensor] | None:
        """Per-parameter gradient norms on measured steps (before clipping), else None."""
        if not self.measuring:
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return list(torch._foreach_norm(grads))

    def end_step(
        self,
        step: int,
        epoch: int,
        *,
        loss: float,
        global_loss: float,
        grad_norm: float,
        param_grad_norms: list[torch.Tensor] | None,
        lr: float,
        samples: int,
        seconds: float,
        applied: bool,
    ) -> list[dict[str, Any]]:
        """Record one finished step; returns detector events that changed state."""
        c = self._children
        now = time.time()
        c.step.set(step)
        c.epoch.set(epoch)
        c.loss.set(loss)
        c.samples.inc(samples)
        c.step_duration.observe(seconds)
        c.heartbeat.set(now)
        if not math.isfinite(loss):
            c.nonfinite_loss.inc()
        if not math.isfinite(grad_norm) and self.metrics.rank0:
            c.nonfinite_grad.inc()  # the all-reduced gradient is the same on every rank: count it once per job
        if not applied:
            c.skipped.inc()
        self._unlogged[0] += seconds
        self._unlogged[1] += 1
        if self.step_times and self.measuring:  # the mean over the interval, not the measured step alone
            self.step_times.write(
                json.dumps({"step": step, "step_seconds": self._unlogged[0] / self._unlogged[1], "time": now}) + "\n"
            )
            self.step_times.flush()
            self._unlogged = [0.0, 0]

        self.monitor.observe_step(step, global_loss, lr=lr, grad_norm=grad_norm)
        if self.monitor.loss_ema is not None:
            c.loss_ema.set(self.monitor.loss_ema)
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "global_loss": global_loss,
            "loss_ema": self.monitor.loss_ema,
            "grad_norm": grad_norm,
            "lr": lr,
            "step_seconds": seconds,
            "time": now,
        }
        if param_grad_norms is not None:
            record.update(self._measure(step, grad_norm, param_grad_norms, lr))
        self.last = record
        if not (math.isfinite(global_loss) and math.isfinite(grad_norm)):
            record["nonfinite"] = True
        # Every step reaches the history, so `gradwatch replay` of it sees what the detectors saw.
        return self._publish(step, record)

    def _measure(self, step: int, grad_norm: float, param_grad_norms: list[torch.Tensor], lr: float) -> dict[str, Any]:
        deltas = torch._foreach_sub(self.params, self._before) if self._before is not None else self.params
        weight_and_update_norms = torch._foreach_norm([*self.params, *deltas])  # one fused call for both
        self._before = None
        n_layers = len(self.layer_names)
        # Rows: gradient, weight, update; squared norms summed per layer with one index_add (few tiny ops:
        # on a small model their dispatch, not the math, is the cost of a measured step).
        sq = torch.stack([t.float() for t in (*param_grad_norms, *weight_and_update_norms)]).pow(2)
        by_layer = torch.zeros(3, n_layers, device=sq.device).index_add_(1, self._group_index, sq.view(3, -1))
        parts = [by_layer]
        local_sq = grad_norm**2
        if self.hook is not None and self.hook.reduced is not None:
            parts.append(torch.stack([self.hook.local_sq, self.hook.reduced[1]]))
        values = torch.cat([p.reshape(-1) for p in parts]).cpu().tolist()  # the one host sync of this step
        g_sq, w_sq, u_sq = (values[i * n_layers : (i + 1) * n_layers] for i in range(3))
        if len(parts) > 1:
            local_sq, mean_local_sq = values[3 * n_layers : 3 * n_layers + 2]
        else:
            mean_local_sq = local_sq
        layer_grad = {name: math.sqrt(v) for name, v in zip(self.layer_names, g_sq, strict=False)}
        layer_weight = {name: math.sqrt(v) for name, v in zip(self.layer_names, w_sq, strict=False)}
        layer_update = {
            name: math.sqrt(u) / math.sqrt(w) if w > 0 else 0.0
            for name, u, w in zip(self.layer_names, u_sq, w_sq, strict=False)
        }
        weight_norm = math.sqrt(sum(w_sq))
        noise_scale = None
        if math.isfinite(grad_norm) and math.isfinite(mean_local_sq):
            noise_scale = self.gns.update(mean_local_sq, grad_norm**2, self.batch_size, self.world_size)
        self.monitor.observe_gradients(step, grad_norm, layer_grad, layer_update)

        self.metrics.local_grad_norm.labels(*self._labels).set(math.sqrt(local_sq) if local_sq >= 0 else float("nan"))
        measured = {
            "weight_norm": weight_norm,
            "local_grad_norm": math.sqrt(max(local_sq, 0.0)),
            "gradient_noise_scale": noise_scale,
            "critical_batch_hint": self.gns.critical_batch_hint,
            "layer_grad_norm": layer_grad,
            "layer_weight_norm": layer_weight,
            "layer_update_ratio": layer_update,
        }
        if self.metrics.job is not None:
            self._set_job_gauges(self.metrics.job, grad_norm, lr, measured)
        return measured

    def _set_job_gauges(self, series: JobSeries, grad_norm: float, lr: float, measured: dict[str, Any]) -> None:
        """Rank 0: the global norms, learning rate, per-layer norms and noise scale of a measured step."""
        job = self._labels[0]
        series.grad_norm.labels(job).set(grad_norm)
        series.weight_norm.labels(job).set(measured["weight_norm"])
        series.learning_rate.labels(job).set(lr)
        if self._layer_gauges is None:  # look the labelled children up once, at the first measured step
            self._layer_gauges = [
                (
                    name,
                    series.layer_grad_norm.labels(job, name),
                    series.layer_weight_norm.labels(job, name),
                    series.layer_update_ratio.labels(job, name),
                )
                for name in self.layer_names
            ]
        for name, grad_gauge, weight_gauge, update_gauge in self._layer_gauges:
            grad_gauge.set(measured["layer_grad_norm"][name])
            weight_gauge.set(measured["layer_weight_norm"][name])
            update_gauge.set(measured["layer_update_ratio"][name])
        if measured["gradient_noise_scale"] is not None:
            series.noise_scale.labels(job).set(measured["gradient_noise_scale"])

    def observe_validation(self, step: int, val_loss: float, val_accuracy: float | None) -> list[dict[str, Any]]:
        m, labels = self.metrics, self._labels
        m.loss.labels(*labels, "val").set(val_loss)
        if val_accuracy is not None:
            m.accuracy.labels(*labels, "val").set(val_accuracy)
        self.monitor.observe_validation(step, val_loss)
        return self._publish(
            step, {"step": step, "val_loss": val_loss, "val_accuracy": val_accuracy, "time": time.time()}
        )

    def record_event(self, event: dict[str, Any]) -> None:
        """A restart or rollback, into the run's history (rank 0), so a report can mark where it happened."""
        if self.history:
            self.history.write(json.dumps({**event, "time": time.time()}, default=str) + "\n")
            self.history.flush()

    def _publish(self, step: int, record: dict[str, Any] | None) -> list[dict[str, Any]]:
        m = self.metrics
        events = [e if isinstance(e, dict) else e.__dict__ for e in self.monitor.events()]
        if m.job is not None:
            if events or self._gauges_stale:  # phase and anomalies change only with an event
                m.job.set_phase(self.monitor.phase)
                m.job.set_anomalies(self.monitor.anomalies)
                self._gauges_stale = False
            for event in events:
                if event["kind"] == "anomaly" and event["raised"]:
                    m.job.anomaly_raised.labels(m.job_id, event["name"]).inc()
                log.warning("%s", event_line(event))
                if self.board:
                    self.board.post_event({**event, "job_rank": self.rank})
            if self.history and record is not None:
                record = {
                    **record,
                    "phase": self.monitor.phase,
                    "anomalies": sorted(k for k, v in self.monitor.anomalies.items() if v),
                }
                self.history.write(json.dumps(record, default=str) + "\n")
                self.history.flush()
        return events
