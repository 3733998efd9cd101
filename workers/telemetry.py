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

# The detectors take a healthy run's steps in batches: their Python runs warm, several steps at a
# time, instead of cold after every step's tensor work (a third of their cost on a small model).
# They fall behind by at most this many steps or seconds; a non-finite step, and anything that reads
# the detectors (`Telemetry.monitor`: the divergence guard, checkpoints, progress, the end), catches
# them up first, so every decision still sees every step.
DETECTOR_BATCH_STEPS = 16
DETECTOR_BATCH_SECONDS = 0.25


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
    def hook(state: LocalNormHook, bucket):  # no annotations: DDP checks them, and these would be strings
        buffer = bucket.buffer()
        if state.armed:
            state.local_sq += buffer.float().pow(2).sum()
        if not bucket.is_last():
            return default_hooks.allreduce_hook(_WORLD, bucket)
        state.last_ready = time.perf_counter()
        if state.loss is None and not state.armed:
            return default_hooks.allreduce_hook(_WORLD, bucket)
        loss = state.loss if state.loss is not None else state.local_sq.new_zeros(())
        # As few tensor ops as can be: every step pays for them (views for the riders, one cat, one div).
        loss_rider, sq_rider = loss.reshape(1), state.local_sq.reshape(1)
        if loss_rider.dtype != buffer.dtype:
            loss_rider = loss_rider.to(buffer.dtype)
        if sq_rider.dtype != buffer.dtype:
            sq_rider = sq_rider.to(buffer.dtype)
        n = buffer.numel()
        packed = torch.cat([buffer, loss_rider, sq_rider]).div_(state.world_size)
        if buffer.device.type == "cpu":
            # The last bucket has nothing left to overlap with: reduce it here and hand DDP a finished
            # future, which spares a Python callback on the communication thread (on CPU, a thread switch
            # and a GIL hand-over in every step).
            dist.all_reduce(packed)
            state.reduced = packed[n:]
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(packed[:n])
            return done
        future = dist.all_reduce(packed, async_op=True).get_future()

        def unpack(fut):
            reduced = fut.value()[0]
            state.reduced = reduced[n:]  # a view: nothing else writes to `packed`
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
        self._monitor = DynamicsMonitor(self.cfg.detectors, warmup_steps=self._schedule_warmup)
        # Recorded steps the detectors have not taken yet: (step, global loss, lr, gradient norm, the
        # measured step's per-layer norms and update ratios or None, its history record).
        self._queued: list[tuple[int, float, float, float, tuple[Any, Any] | None, dict[str, Any]]] = []
        self._queued_since = 0.0
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
        self._rank0_gauges: SimpleNamespace | None = None
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
            local_grad_norm=m.local_grad_norm.labels(*labels),
        )

    def _group_layers(self, model: torch.nn.Module, device: torch.device) -> None:
        """The trained parameters, and the at most `max_layers` layer groups their norms are reported by."""
        inner: torch.nn.Module = getattr(model, "module", model)  # DDP's wrapped model, or the model
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        self.params: list[torch.Tensor] = [p for _, p in named]
        groups = group_layers([n for n, _ in named], self.cfg.max_layers)
        self.layer_names = sorted(set(groups.values()), key=list(groups.values()).index)
        self._layer_of = [self.layer_names.index(groups[n]) for n, _ in named]  # each parameter's layer
        self._float_params = all(p.dtype == torch.float32 for p in self.params)

    # ------------------------------------------------------------ detectors
    @property
    def monitor(self) -> DynamicsMonitor:
        """The detectors, caught up with every recorded step."""
        if self._queued:
            self._catch_up()
        return self._monitor

    def _catch_up(self) -> None:
        """Feed the detectors the steps they have not taken yet, in order, publishing as each step would have."""
        queued, self._queued = self._queued, []
        monitor = self._monitor
        for step, global_loss, lr, grad_norm, layers, record in queued:
            monitor.observe_step(step, global_loss, lr=lr, grad_norm=grad_norm)
            if layers is not None:
                monitor.observe_gradients(step, grad_norm, *layers)
            record["loss_ema"] = monitor.loss_ema
            self._publish(step, record, flush=False)
        if monitor.loss_ema is not None:
            self._children.loss_ema.set(monitor.loss_ema)
        if self.history:
            self.history.flush()

    def detector_state(self) -> str:
        """The detectors' whole state (references, EMAs, latches, what was raised), for a checkpoint."""
        return json.dumps(self.monitor.state_dict())

    def restore_detectors(self, state: str | None) -> None:
        """After a resume or a rollback: the detectors continue from the checkpoint's state (fresh when
        it has none), remembering every phase and anomaly the run went through since."""
        phases, raised = self.monitor.phases_entered, self.monitor.anomalies_raised
        self._monitor.events()
        monitor = self._monitor = DynamicsMonitor(self.cfg.detectors, warmup_steps=self._schedule_warmup)
        self._gauges_stale = True  # a restored monitor may hold another phase than the gauges show
        if state:
            monitor.load_state_dict(json.loads(state))
        monitor.entered = phases if len(phases) > len(monitor.entered) else monitor.entered
        for kind, step in raised.items():
            monitor.raised.setdefault(kind, step)

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
        self._catch_up()  # the last steps reach the gauges and the history
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
        """[loss, |G_small|^2] averaged over ranks by the gradient all-reduce (the loss first), or None
        without the DDP hook."""
        if self.hook is None or self.hook.reduced is None or self.hook.loss is None:
            return None
        return self.hook.reduced

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
        param_grad_norms: list[float] | None,
        mean_local_sq: float | None = None,
        lr: float,
        samples: int,
        seconds: float,
        applied: bool,
    ) -> None:
        """Record one finished step."""
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

        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "global_loss": global_loss,
            "loss_ema": None,  # the detectors' EMA after this step, once they have taken it
            "grad_norm": grad_norm,
            "lr": lr,
            "step_seconds": seconds,
            "time": now,
        }
        layers = None
        if param_grad_norms is not None:
            stats, layers = self._measure(grad_norm, param_grad_norms, mean_local_sq, lr)
            record.update(stats)
        self.last = record
        finite = math.isfinite(global_loss) and math.isfinite(grad_norm)
        if not finite:
            record["nonfinite"] = True
        # Every step reaches the detectors and the history (with what the detectors made of it), so
        # `gradwatch replay` of the history sees what the detectors saw.
        if not self._queued:
            self._queued_since = now
        self._queued.append((step, global_loss, lr, grad_norm, layers, record))
        if (
            not finite
            or len(self._queued) >= DETECTOR_BATCH_STEPS
            or now - self._queued_since >= DETECTOR_BATCH_SECONDS
        ):
            self._catch_up()

    def _measure(
        self, grad_norm: float, param_grad_norms: list[float], mean_local_sq: float | None, lr: float
    ) -> tuple[dict[str, Any], tuple[dict[str, float], dict[str, float]]]:
        """A measured step's per-layer statistics: exported now; returns them for the history and, with the
        per-layer gradient norms and update ratios, for the detectors.

        `param_grad_norms` are the parameters' gradient norms (already on the host: the update guard
        fetched them), `mean_local_sq` the mean over ranks of |G_small|^2 (from the DDP hook).
        """
        deltas = torch._foreach_sub(self.params, self._before) if self._before is not None else self.params
        norms = list(torch._foreach_norm([*self.params, *deltas]))  # one fused call for weights and updates
        self._before = None
        if not self._float_params:
            norms = [t.float() for t in norms]
        hook = self.hook if mean_local_sq is not None else None  # this rank's |G_small|^2, from the hook
        if hook is not None:
            norms.append(hook.local_sq)
        # Few tiny ops (on a small model their dispatch, not the math, is the cost of a measured step):
        # the norms come over in one piece and are summed per layer on the host.
        values = torch.stack(norms).tolist()  # the one host sync of the measurement
        n_params, n_layers = len(self.params), len(self.layer_names)
        g_sq, w_sq, u_sq = [0.0] * n_layers, [0.0] * n_layers, [0.0] * n_layers
        for i, layer in enumerate(self._layer_of):
            g_sq[layer] += param_grad_norms[i] ** 2
            w_sq[layer] += values[i] ** 2
            u_sq[layer] += values[n_params + i] ** 2
        if hook is None or mean_local_sq is None:  # no DDP hook: this rank's gradient is the global one
            local_sq = mean_local_sq = grad_norm**2
        else:
            local_sq = values[-1]
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

        c = self._children
        c.local_grad_norm.set(math.sqrt(local_sq) if local_sq >= 0 else float("nan"))
        series = self.metrics.job
        if series is not None:
            g = self._global_gauges(series)
            g.grad_norm.set(grad_norm)
            g.weight_norm.set(weight_norm)
            g.learning_rate.set(lr)
            for name, grad_gauge, weight_gauge, update_gauge in g.layers:
                grad_gauge.set(layer_grad[name])
                weight_gauge.set(layer_weight[name])
                update_gauge.set(layer_update[name])
            if noise_scale is not None:
                if g.noise_scale is None:  # exported from its first estimate on, never as a made-up 0
                    g.noise_scale = series.noise_scale.labels(self._labels[0])
                g.noise_scale.set(noise_scale)
        stats = {
            "weight_norm": weight_norm,
            "local_grad_norm": math.sqrt(max(local_sq, 0.0)),
            "gradient_noise_scale": noise_scale,
            "critical_batch_hint": self.gns.critical_batch_hint,
            "layer_grad_norm": layer_grad,
            "layer_weight_norm": layer_weight,
            "layer_update_ratio": layer_update,
        }
        return stats, (layer_grad, layer_update)

    def _global_gauges(self, m: JobSeries) -> SimpleNamespace:
        """Rank 0's series of the measured steps, labelled children looked up once (at the first one)."""
        if self._rank0_gauges is None:
            job = self._labels[0]
            self._rank0_gauges = SimpleNamespace(
                grad_norm=m.grad_norm.labels(job),
                weight_norm=m.weight_norm.labels(job),
                learning_rate=m.learning_rate.labels(job),
                noise_scale=None,
                layers=[
                    (
                        name,
                        m.layer_grad_norm.labels(job, name),
                        m.layer_weight_norm.labels(job, name),
                        m.layer_update_ratio.labels(job, name),
                    )
                    for name in self.layer_names
                ],
            )
        return self._rank0_gauges

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
        if self._queued:
            self._catch_up()  # the steps before it come first
        if self.history:
            self.history.write(json.dumps({**event, "time": time.time()}, default=str) + "\n")
            self.history.flush()

    def _publish(self, step: int, record: dict[str, Any] | None, *, flush: bool = True) -> list[dict[str, Any]]:
        m = self.metrics
        if not self._monitor.pending_events and (m.job is None or (not self._gauges_stale and self.history is None)):
            return []  # most steps: nothing changed, nothing to write
        events = [e if isinstance(e, dict) else e.__dict__ for e in self._monitor.events()]
        if m.job is not None:
            if events or self._gauges_stale:  # phase and anomalies change only with an event
                m.job.set_phase(self._monitor.phase)
                m.job.set_anomalies(self._monitor.anomalies)
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
                    "phase": self._monitor.phase,
                    "anomalies": sorted(k for k, v in self._monitor.anomalies.items() if v),
                }
                self.history.write(json.dumps(record, default=str) + "\n")
                if flush:
                    self.history.flush()
        return events
