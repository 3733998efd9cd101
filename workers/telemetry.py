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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from wsgiref.simple_server import WSGIServer

import torch

from gradwatch.status import event_line
from workers.board import BoardClient
from workers.detectors import DynamicsMonitor
from workers.gns import GradientNoiseScale, group_layers
from workers.heartbeat import COLLECTIVE
from workers.metrics import JobSeries, WorkerMetrics

log = logging.getLogger("gradwatch.telemetry")

# A healthy run's steps reach the per-step series, the detectors and the history in batches: their
# Python runs warm, several steps at a time, instead of cold after every step's tensor work (most of
# their cost on a small model). They fall behind by at most this many steps or seconds (the gauges a
# scrape reads too); a non-finite step, and anything that reads the detectors or the last record
# (`Telemetry.monitor`, `Telemetry.last`: the divergence guard, checkpoints, progress, the end),
# catches them up first, so every decision still sees every step.
DETECTOR_BATCH_STEPS = 16
DETECTOR_BATCH_SECONDS = 0.25


class LocalNormHook:
    """DDP comm hook: the gradient all-reduce, carrying the loss and |G_small|^2 along for free.

    Each bucket holds this rank's own gradient until the all-reduce averages it, so on measured
    steps summing the buckets' squared norms gives |G_small|^2. The loss and that sum ride as two
    extra elements on the last bucket's all-reduce, so neither costs a collective of its own.
    It calls the process group itself (no `dist.all_reduce` wrapper) and, on CPU, reduces the last
    bucket in place of a callback: every step pays for each Python line here.
    """

    def __init__(self, device: torch.device, group: Any, numel: int):
        self.armed = False
        self.numel = numel  # the trained parameters' elements: a last bucket this big holds every gradient
        self.group = group  # the DDP model's process group: the hook reduces over it, as DDP would
        self.world_size = group.size()
        self.cpu = device.type == "cpu"
        self.local_sq = torch.zeros((), device=device, dtype=torch.float32)
        self.loss: torch.Tensor | None = None
        self.reduced: torch.Tensor | None = None  # mean over ranks of the riders, after backward
        self.last_ready = 0.0  # when this rank's last bucket was ready: after it, the rank only waits
        self.carrying = 0  # how many riders the last bucket carries this step
        # Work to do while the last bucket's all-reduce runs (on CPU): the previous step's recording. Its
        # error, if any, is kept for the caller: an exception must not cross DDP's backward.
        self.shadow: Callable[[], None] | None = None
        self.error: Exception | None = None
        self.grad_norm: torch.Tensor | None = None  # the reduced gradient's norm, when one bucket holds it all
        self.heartbeat: Any = None  # the rank's Heartbeat: the last bucket's all-reduce is the wait for the others

    @staticmethod
    def hook(state: LocalNormHook, bucket):  # no annotations: DDP checks them, and these would be strings
        buffer = bucket.buffer()
        if state.armed:  # one op for float32 buckets; others are summed in float32
            state.local_sq += (
                torch.dot(buffer, buffer) if buffer.dtype == torch.float32 else buffer.float().pow(2).sum()
            )
        if not bucket.is_last():
            buffer.div_(state.world_size)
            return state.group.allreduce([buffer]).get_future().then(_first)
        state.last_ready = time.perf_counter()
        if state.heartbeat is not None:
            state.heartbeat.enter(COLLECTIVE)
        riders = state.riders()
        state.carrying = len(riders)
        if riders:
            if riders[0].dtype != buffer.dtype:
                riders = [r.to(buffer.dtype) for r in riders]
            packed = torch.cat([buffer, *riders])
        else:
            packed = buffer
        packed.div_(state.world_size)
        work = state.group.allreduce([packed])
        if not state.cpu:
            return work.get_future().then(state._unpack)
        # The last bucket has nothing left to overlap with: on CPU, reduce it here and hand DDP a
        # finished future, which spares a Python callback on the communication thread (a thread
        # switch and a GIL hand-over in every step). The wait is for the slowest rank: the shadow
        # work runs in it.
        shadow, state.shadow = state.shadow, None
        if shadow is not None:
            try:
                shadow()
            except Exception as error:  # noqa: BLE001 - handed to the caller after the backward
                state.error = error
            state.last_ready = time.perf_counter()
        work.wait()
        return state._unpack(packed)

    def _unpack(self, result: Any) -> Any:
        """The reduced last bucket for DDP (a finished future on CPU, the value in a callback on GPU);
        what rode along is kept as a view (nothing else writes to it)."""
        finished = isinstance(result, torch.Tensor)
        packed = result if finished else result.value()[0]
        if not self.carrying:
            reduced = packed
        else:
            n = packed.numel() - self.carrying
            self.reduced, reduced = packed[n:], packed[:n]
        if finished:
            if not self.armed and reduced.numel() == self.numel:  # one op on the bucket, not one per parameter
                self.grad_norm = torch.linalg.vector_norm(reduced, dtype=torch.float32)
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(reduced)
            return done
        return reduced

    def begin(self, measure: bool, loss: torch.Tensor | None) -> None:
        """A step starts: `measure` sums this rank's |G_small|^2; `loss` (detached) rides along."""
        self.armed, self.loss, self.reduced = measure, None if loss is None else loss.reshape(1), None
        self.grad_norm = None
        if measure:
            self.local_sq.zero_()

    def riders(self) -> list[torch.Tensor]:
        """What rides on the last bucket: the loss, then on measured steps |G_small|^2 (a zero loss when
        the caller has none), each one element."""
        if not self.armed:
            return [] if self.loss is None else [self.loss]
        loss = self.loss if self.loss is not None else self.local_sq.new_zeros(1)
        return [loss, self.local_sq.reshape(1)]


def _first(fut: Any) -> torch.Tensor:
    return fut.value()[0]


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
        self._max_steps = spec.max_steps  # the run's planned length (None for an epochs spec until the loop knows it)
        self._monitor = DynamicsMonitor(
            self.cfg.detectors, warmup_steps=self._schedule_warmup, max_steps=self._max_steps
        )
        # Recorded steps not yet taken by the series, the detectors and the history: (step, epoch, loss,
        # global loss, gradient norm, lr, samples, seconds, applied, time, a measured step's statistics and
        # per-layer norms and update ratios, else None).
        self._queued: list[tuple[Any, ...]] = []
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
        # Scrapes of /metrics: how many began, and the latest-begun one that was answered in full.
        self._scrapes = threading.Condition()
        self._scrapes_begun = 0
        self._scrape_answered = 0
        self._last: dict[str, Any] = {}
        self._group_layers(model, device)
        self._rank0_gauges: SimpleNamespace | None = None
        self.hook: LocalNormHook | None = None
        if world_size > 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            self.hook = LocalNormHook(device, model.process_group, sum(p.numel() for p in self.params))
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
        self.flush()
        return self._monitor

    def flush(self) -> None:
        """Take the queued steps, in order: the per-step series, the detectors, the history, publishing as
        each step would have. The gauges end at the last step's values; counters add up the batch."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        monitor, c, rank0 = self._monitor, self._children, self.metrics.rank0
        samples = nonfinite_loss = nonfinite_grad = skipped = 0
        record: dict[str, Any] = self._last
        last_measured: tuple[float, float, dict[str, Any]] | None = None  # grad norm, lr, statistics
        noise_scale = None  # the batch's last estimate
        for step, epoch, loss, global_loss, grad_norm, lr, n, seconds, applied, now, measured in queued:
            c.step_duration.observe(seconds)
            samples += n
            nonfinite_loss += not math.isfinite(loss)
            finite_grad = math.isfinite(grad_norm)
            nonfinite_grad += not finite_grad and rank0  # the all-reduced gradient is the same on every rank
            skipped += not applied
            self._log_step_time(step, seconds, now, measured is not None)
            monitor.observe_step(step, global_loss, lr=lr, grad_norm=grad_norm)
            if measured is not None:
                monitor.observe_gradients(step, grad_norm, *measured[1])
                last_measured = (grad_norm, lr, measured[0])
                if measured[0]["gradient_noise_scale"] is not None:
                    noise_scale = measured[0]["gradient_noise_scale"]
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "global_loss": global_loss,
                "loss_ema": monitor.loss_ema,
                "grad_norm": grad_norm,
                "lr": lr,
                "step_seconds": seconds,
                "time": now,
            }
            if measured is not None:
                record.update(measured[0])
            if not (finite_grad and math.isfinite(global_loss)):
                record["nonfinite"] = True
            self._publish(step, record, flush=False)
        self._last = record
        c.step.set(record["step"])
        c.epoch.set(record["epoch"])
        c.loss.set(record["loss"])
        c.heartbeat.set(record["time"])
        c.samples.inc(samples)
        if nonfinite_loss:
            c.nonfinite_loss.inc(nonfinite_loss)
        if nonfinite_grad:
            c.nonfinite_grad.inc(nonfinite_grad)
        if skipped:
            c.skipped.inc(skipped)
        if monitor.loss_ema is not None:
            c.loss_ema.set(monitor.loss_ema)
        if last_measured is not None:
            self._set_measured(*last_measured, noise_scale)
        if self.history:
            self.history.flush()
        if self.step_times:
            self.step_times.flush()

    def _log_step_time(self, step: int, seconds: float, now: float, measured: bool) -> None:
        """This rank's step time into its steps file: on each measured step, the mean over the interval."""
        self._unlogged[0] += seconds
        self._unlogged[1] += 1
        if self.step_times and measured:
            mean = self._unlogged[0] / self._unlogged[1]
            self.step_times.write(json.dumps({"step": step, "step_seconds": mean, "time": now}) + "\n")
            self._unlogged = [0.0, 0]

    def detector_state(self) -> str:
        """The detectors' whole state (references, EMAs, latches, what was raised), for a checkpoint."""
        return json.dumps(self.monitor.state_dict())

    def restore_detectors(self, state: str | None) -> None:
        """After a resume or a rollback: the detectors continue from the checkpoint's state (fresh when
        it has none), remembering every phase and anomaly the run went through since."""
        phases, raised = self.monitor.phases_entered, self.monitor.anomalies_raised
        self._monitor.events()
        monitor = self._monitor = DynamicsMonitor(
            self.cfg.detectors, warmup_steps=self._schedule_warmup, max_steps=self._max_steps
        )
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
        self._count_scrapes(self._server)
        self.endpoint = (host, self._server.server_port)
        if self.board:
            self.board.post_endpoint(self.rank, host, self.endpoint[1], os.getpid())
        return self.endpoint

    @property
    def scraped(self) -> bool:
        """Whether anything has fetched this rank's /metrics yet."""
        return self._scrapes_begun > 0

    def _count_scrapes(self, server: WSGIServer) -> None:
        """Number each request to /metrics and note when its whole body has been written, so close()
        knows when the final values have been scraped."""
        app = server.get_app()
        if app is None:
            return

        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            with self._scrapes:
                self._scrapes_begun += 1
                number = self._scrapes_begun
            yield from app(environ, start_response)  # the server writes each chunk before asking for the next
            with self._scrapes:
                self._scrape_answered = max(self._scrape_answered, number)
                self._scrapes.notify_all()

        server.set_app(counted)

    def close(self, grace_seconds: float, discoverable: bool = False) -> None:
        """Flush, then stop serving /metrics once a scrape begun after the flush has been answered (the
        final values reached Prometheus), at most `grace_seconds` later. At once when nothing ever
        scraped the endpoint, unless it is `discoverable` (announced to Prometheus: a short run may end
        before its first scrape)."""
        self.flush()  # the last steps reach the gauges and the history
        if self.history:
            self.history.close()
            self.history = None
        if self.step_times:
            self.step_times.close()
            self.step_times = None
        if self._server is None:
            return
        if (self.scraped or discoverable) and grace_seconds > 0:
            with self._scrapes:
                after = self._scrapes_begun + 1
                self._scrapes.wait_for(lambda: self._scrape_answered >= after, timeout=grace_seconds)
        if self.board:
            self.board.drop_endpoint(self.rank)
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    # ---------------------------------------------------------------- steps
    def should_measure(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.interval == 0 or step == 1)

    def begin_step(self, step: int) -> list[torch.Tensor] | None:
        """Whether `step` is measured; returns a measured step's weights before its update, negated (the
        measurement adds the updated weights to them in place: the update, with no new tensors)."""
        self.measuring = self.should_measure(step)
        return list(torch._foreach_neg([p.detach() for p in self.params])) if self.measuring else None

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
        """The loss (and on measured steps |G_small|^2 after it) averaged over ranks by the gradient
        all-reduce, or None without the DDP hook."""
        if self.hook is None or self.hook.reduced is None or self.hook.loss is None:
            return None
        return self.hook.reduced

    def local_sq(self) -> torch.Tensor | None:
        """A measured step's |G_small|^2 on this rank (the DDP hook's sum over its buckets), else None."""
        return self.hook.local_sq if self.measuring and self.hook is not None else None

    def reduced_grad_norm(self) -> torch.Tensor | None:
        """The all-reduced gradient's norm, taken by the DDP hook from the one bucket that held every
        gradient (a small model on CPU) in this step's backward, else None. Taken once: a later step
        whose backward skips the all-reduce (`no_sync`) gets None."""
        if self.hook is None:
            return None
        norm, self.hook.grad_norm = self.hook.grad_norm, None
        return norm

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
        local_sq: float | None = None,
        before: list[torch.Tensor] | None = None,
        lr: float,
        samples: int,
        seconds: float,
        applied: bool,
    ) -> None:
        """Record one finished step.

        A measured step's per-layer statistics are taken now (they need this update's weights). The rest
        (the per-step series, the detectors, the history) takes the step with the next batch, at once
        when it is not finite: a step only queues a row.
        """
        measured = None
        if param_grad_norms is not None:
            measured = self._measure(grad_norm, param_grad_norms, mean_local_sq, local_sq, before, lr)
        now = time.time()
        queued = self._queued
        if not queued:
            self._queued_since = now
        queued.append((step, epoch, loss, global_loss, grad_norm, lr, samples, seconds, applied, now, measured))
        if (
            len(queued) >= DETECTOR_BATCH_STEPS
            or now - self._queued_since >= DETECTOR_BATCH_SECONDS
            or not (math.isfinite(global_loss) and math.isfinite(grad_norm))
        ):
            self.flush()

    @property
    def last(self) -> dict[str, Any]:
        """The last recorded step's history record (every queued step taken first)."""
        self.flush()
        return self._last

    def _measure(
        self,
        grad_norm: float,
        param_grad_norms: list[float],
        mean_local_sq: float | None,
        local_sq: float | None,
        before: list[torch.Tensor] | None,
        lr: float,
    ) -> tuple[dict[str, Any], tuple[dict[str, float], dict[str, float]]]:
        """A measured step's per-layer statistics, exported with the batch its step is taken in; returns
        them for the history and, with the per-layer gradient norms and update ratios, for the detectors.

        `param_grad_norms` are the parameters' gradient norms (already on the host: the update guard
        fetched them), `mean_local_sq` the mean over ranks and `local_sq` this rank's |G_small|^2 (from the
        DDP hook), `before` the weights before the update.
        """
        deltas = self.params
        if before is not None:  # -w_before + w_after, in place
            torch._foreach_add_(before, [p.detach() for p in self.params])
            deltas = before
        norms = torch._foreach_norm([*self.params, *deltas])  # one fused call for weights and updates
        # Few tiny ops (on a small model their dispatch, not the math, is the cost of a measured step):
        # the norms come over in one piece (from a GPU; on the CPU each is read as it is) and are summed
        # per layer on the host.
        if self._float_params and norms[0].device.type == "cpu":
            values = [n.item() for n in norms]
        else:
            values = torch.stack([n.float() for n in norms]).tolist()  # the one host sync of the measurement
        n_params, n_layers = len(self.params), len(self.layer_names)
        g_sq, w_sq, u_sq = [0.0] * n_layers, [0.0] * n_layers, [0.0] * n_layers
        for i, layer in enumerate(self._layer_of):
            g_sq[layer] += param_grad_norms[i] ** 2
            w_sq[layer] += values[i] ** 2
            u_sq[layer] += values[n_params + i] ** 2
        if local_sq is None or mean_local_sq is None:  # no DDP hook: this rank's gradient is the global one
            local_sq = mean_local_sq = grad_norm**2
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

    def _set_measured(self, grad_norm: float, lr: float, stats: dict[str, Any], noise_scale: float | None) -> None:
        """A batch's last measured step's gauges (its statistics as `_measure` returned them), set with the
        batch like the per-step series: a scrape sees the last measured step of every batch, the history
        each one. `noise_scale` is the batch's last estimate."""
        self._children.local_grad_norm.set(stats["local_grad_norm"])
        series = self.metrics.job
        if series is None:
            return
        g = self._global_gauges(series)
        g.grad_norm.set(grad_norm)
        g.weight_norm.set(stats["weight_norm"])
        g.learning_rate.set(lr)
        layer_grad, layer_weight = stats["layer_grad_norm"], stats["layer_weight_norm"]
        layer_update = stats["layer_update_ratio"]
        for name, grad_gauge, weight_gauge, update_gauge in g.layers:
            grad_gauge.set(layer_grad[name])
            weight_gauge.set(layer_weight[name])
            update_gauge.set(layer_update[name])
        if noise_scale is not None:
            if g.noise_scale is None:  # exported from its first estimate on, never as a made-up 0
                g.noise_scale = series.noise_scale.labels(self._labels[0])
            g.noise_scale.set(noise_scale)

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
        self.flush()  # the steps before it come first
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
