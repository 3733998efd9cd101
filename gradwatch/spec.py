"""The job spec: what a user writes to describe one training job.

Imports only pydantic, PyYAML and the standard library, so the CLI, the
service and the workers can all load it cheaply. Every model forbids unknown
keys; a bad spec is refused with every error and its field path.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gradwatch.spec_telemetry import Strict, TelemetrySpec

MAX_SPEC_BYTES = 256 * 1024
MAX_SPEC_NODES = 4096  # keys, values and items together; a real spec has under 200
MAX_ERROR_LINES = 50
MAX_CORPUS_CHARS = 16_000_000
# The data roots again, in the environment of a job's driver and workers, which check `data.path`
# against them on their own file system (the operator's setting of the same name).
DATA_ROOTS_ENV = "GRADWATCH_DATA_ROOTS"
# A spec validated without the server's figure assumes workers of this much memory.
DEFAULT_WORKER_MEMORY_BYTES = 8 * 1024**3
# Any C0 control but tab and newline, DEL, and C1: ESC sequences would reach other people's terminals.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Whitespace only after a unit: four adjacent optional \s* made "1d" + spaces + "x" take O(spaces^4).
_DURATION = re.compile(
    r"^(?:(\d+(?:\.\d+)?)\s*d\s*)?(?:(\d+(?:\.\d+)?)\s*h\s*)?(?:(\d+(?:\.\d+)?)\s*m\s*)?"
    r"(?:(\d+(?:\.\d+)?)\s*s)?$"
)
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
# What parse_duration reads, as one pattern for the JSON schema: a number of seconds or the units in
# order, with a digit other than 0 somewhere (a timeout of 0 is refused). Unambiguous, so linear time.
DURATION_PATTERN = (
    r"^(?=[^1-9]*[1-9])\s*(?:\d+(?:\.\d+)?|(?:\d+(?:\.\d+)?\s*d\s*)?(?:\d+(?:\.\d+)?\s*h\s*)?"
    r"(?:\d+(?:\.\d+)?\s*m\s*)?(?:\d+(?:\.\d+)?\s*s)?)\s*$"
)
_NON_JSON_FIX = (
    " cannot be stored (a spec holds JSON values: text, finite numbers, true/false, null, lists, mappings): "
    "write binary data as base64 text, dates as text, numbers finite"
)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# --------------------------------------------------------------------- models
class MLPModel(Strict):
    """A multi-layer perceptron over flattened inputs."""

    name: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default=[128, 64], min_length=1, max_length=64, description="Width of each hidden layer."
    )
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_gain: float = Field(1.0, gt=0.0, le=100.0, description="Scale of the initial weights.")


class CNNModel(Strict):
    """A small convolutional classifier for image-shaped inputs."""

    name: Literal["cnn"]
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[16, 32], min_length=1, max_length=8)
    kernel_size: int = Field(3, ge=1, le=7)
    hidden: int = Field(64, ge=1, le=65536)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class CharTransformerModel(Strict):
    """A small GPT-style character language model."""

    name: Literal["char-transformer"]
    n_layer: int = Field(2, ge=1, le=48)
    n_head: int = Field(2, ge=1, le=64)
    n_embd: int = Field(64, ge=8, le=4096)
    block_size: int = Field(64, ge=2, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> CharTransformerModel:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class CustomModel(Strict):
    """User code: `package.module:factory`, called as factory(**options, data_info=...)."""

    name: str = Field(json_schema_extra={"pattern": _IMPORT_PATH.pattern})
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _importable(cls, value: str, info: ValidationInfo) -> str:
        return check_import_path(value, info)


BUILTIN_MODELS = ("mlp", "cnn", "char-transformer")
BUILTIN_DATA = ("digits", "synthetic-classification", "synthetic-regression", "text")


def _tag(builtins: tuple[str, ...]):
    def pick(value: Any) -> str | None:
        name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
        if not isinstance(name, str):
            return None
        if name in builtins:
            return name
        return "custom" if ":" in name else None

    return pick


def _unknown(kind: str, builtins: tuple[str, ...]) -> str:
    return (
        f"unknown {kind} name: use one of {', '.join(builtins)}, "
        f"or a 'package.module:factory' import path of your own code"
    )


ModelSpec = Annotated[
    Annotated[MLPModel, Tag("mlp")]
    | Annotated[CNNModel, Tag("cnn")]
    | Annotated[CharTransformerModel, Tag("char-transformer")]
    | Annotated[CustomModel, Tag("custom")],
    Discriminator(
        _tag(BUILTIN_MODELS), custom_error_type="unknown_name", custom_error_message=_unknown("model", BUILTIN_MODELS)
    ),
]


# ----------------------------------------------------------------------- data
class _Split(Strict):
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of the examples held out for validation.")
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of the remaining examples used for training.")


class DigitsData(_Split):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""

    name: Literal["digits"]
    as_images: bool = Field(False, description="Keep the 1x8x8 shape (for cnn) instead of 64 features.")


class SyntheticClassificationData(_Split):
    name: Literal["synthetic-classification"]
    n_samples: int = Field(4096, ge=16, le=10_000_000)
    n_features: int = Field(20, ge=1, le=100_000)
    n_classes: int = Field(4, ge=2, le=10_000)
    noise: float = Field(0.1, ge=0.0, le=10.0)


class SyntheticRegressionData(_Split):
    name: Literal["synthetic-regression"]
    n_samples: int = Field(4096, ge=16, le=10_000_000)
    n_features: int = Field(20, ge=1, le=100_000)
    noise: float = Field(0.1, ge=0.0, le=100.0)


class TextData(_Split):
    """A character corpus from a local file (default: a text that ships with gradwatch)."""

    name: Literal["text"]
    path: str | None = Field(
        None,
        max_length=4096,
        description="UTF-8 text file; default is the bundled corpus. On a server without user code, "
        "only files under its data roots.",
    )
    block_size: int = Field(64, ge=2, le=4096, description="Characters per training example.")
    max_chars: int | None = Field(
        None,
        ge=100,
        le=MAX_CORPUS_CHARS,
        description=f"Read at most this many characters (at most {MAX_CORPUS_CHARS}).",
    )

    @field_validator("path")
    @classmethod
    def _confined(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_data_path(value, info)


class CustomData(Strict):
    """User code: `package.module:factory`, called as factory(**options, seed=...)."""

    name: str = Field(json_schema_extra={"pattern": _IMPORT_PATH.pattern})
    options: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _importable(cls, value: str, info: ValidationInfo) -> str:
        return check_import_path(value, info)


DataSpec = Annotated[
    Annotated[DigitsData, Tag("digits")]
    | Annotated[SyntheticClassificationData, Tag("synthetic-classification")]
    | Annotated[SyntheticRegressionData, Tag("synthetic-regression")]
    | Annotated[TextData, Tag("text")]
    | Annotated[CustomData, Tag("custom")],
    Discriminator(
        _tag(BUILTIN_DATA), custom_error_type="unknown_name", custom_error_message=_unknown("data", BUILTIN_DATA)
    ),
]


# ------------------------------------------------------------ the trainer
class BuiltinTrain(Strict):
    """The built-in supervised loop over the spec's `model` and `data` (the default)."""

    loop: Literal["builtin"] = "builtin"


class EntrypointTrain(Strict):
    """User code: your own training function, `package.module:function`, called on every rank as
    function(config). It reports to gradwatch through `import gradwatch` (docs/training-api.md)."""

    entrypoint: str = Field(
        json_schema_extra={"pattern": _IMPORT_PATH.pattern},
        description="`package.module:function` of the training function.",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Passed to the function as its argument.")

    @field_validator("entrypoint")
    @classmethod
    def _importable(cls, value: str, info: ValidationInfo) -> str:
        return check_import_path(value, info)


def _train_tag(value: Any) -> str:
    keys = value if isinstance(value, dict) else vars(value) if isinstance(value, BaseModel) else {}
    return "entrypoint" if "entrypoint" in keys else "builtin"


TrainSpec = Annotated[
    Annotated[BuiltinTrain, Tag("builtin")] | Annotated[EntrypointTrain, Tag("entrypoint")],
    Discriminator(_train_tag),
]


# ------------------------------------------------------------------ training
class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=100.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw only.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


class ScheduleSpec(Strict):
    name: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to the peak learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine: final lr as a share of the peak.")
    step_size: int = Field(100, ge=1, description="step: decay every this many steps.")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step: decay factor.")


class ScalingSpec(Strict):
    num_workers: int = Field(2, ge=1, le=4096, description="DDP world size: one Ray Train worker per rank.")
    use_gpu: bool = Field(False, description="One GPU per worker and the NCCL backend.")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=1024)
    gpus_per_worker: float = Field(1.0, gt=0.0, le=16, description="Used only when use_gpu is true.")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack",
        description="How workers spread over Ray nodes (a placement group strategy): pack fills few "
        "nodes, spread prefers one worker per node, strict_spread demands it (as many nodes as workers).",
    )

    def per_worker(self) -> dict[str, float]:
        """What each worker asks Ray for, in Ray's resource names."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def demand(self) -> dict[str, float]:
        """What the whole job's workers ask Ray for (the driver and Ray Train's controller ask for none)."""
        return {name: self.num_workers * amount for name, amount in self.per_worker().items()}


class ValidationSpec(Strict):
    every_steps: int = Field(50, ge=1)
    max_batches: int | None = Field(None, ge=1, description="Cap on validation batches per rank.")


class CheckpointSpec(Strict):
    every_steps: int = Field(200, ge=1)
    keep: int = Field(2, ge=1, le=1000)


class RollbackSpec(Strict):
    max_rollbacks: int = Field(3, ge=1, le=100)
    lr_factor: float = Field(0.5, gt=0.0, lt=1.0, description="Learning rate is multiplied by this per rollback.")
    skip_batches: int = Field(0, ge=0, description="Batches skipped after the restored step.")


class RewindSpec(Strict):
    """`on_spike: rewind` / `on_divergence: rewind`: back to the last good checkpoint, the batches that fed the
    anomaly skipped on the way forward (docs/rewind.md)."""

    max_rewinds: int = Field(3, ge=1, le=100, description="Rewinds a run may make; the next one ends it failed.")
    skip_steps: int = Field(
        1,
        ge=1,
        le=4096,
        description="The batches of this many steps, ending at the step the anomaly was seen at, are skipped "
        "after the rewind (every rank's batch of each such step).",
    )


class JobSpec(Strict):
    """One training job: what to train, on what, how, and on how many workers."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="Lowercase letters, digits, '.', '_' and '-'; at most 63 characters.",
    )
    labels: dict[
        Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$")], Annotated[str, Field(max_length=128)]
    ] = Field(default_factory=dict, max_length=16)
    owner: str | None = Field(None, max_length=128)
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first when the cluster is full.")
    train: TrainSpec = Field(
        default_factory=BuiltinTrain,
        description="The built-in loop (default), or `{entrypoint: 'pkg.mod:function', "
        "config: {...}}` for your own training function.",
    )
    model: ModelSpec | None = Field(
        None, description="The built-in loop's model (required by it, unused by an entrypoint)."
    )
    data: DataSpec | None = Field(
        None, description="The built-in loop's data (required by it, unused by an entrypoint)."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    batch_size: int = Field(64, ge=1, le=1_000_000, description="Examples per worker per step.")
    max_steps: int | None = Field(None, ge=1, le=100_000_000)
    epochs: int | None = Field(None, ge=1, le=1_000_000)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_failures: int = Field(0, ge=-1, le=1000, description="Worker-group restarts allowed; -1 is unlimited.")
    on_divergence: Literal["alert", "stop", "rollback", "rewind"] = "alert"
    on_spike: Literal["alert", "rewind"] = Field(
        "alert", description="rewind: back to the last good checkpoint, skipping the batches that fed the loss spike."
    )
    on_hang: Literal["alert", "restart", "fail"] = Field(
        "alert",
        description="A rank stuck past telemetry.hang_after (docs/hangs.md): alert (the hang event and "
        "TrainingHang), restart (the worker group from the last checkpoint, max_hang_restarts times) or fail.",
    )
    max_hang_restarts: int = Field(
        2, ge=1, le=100, description="on_hang: restart restarts a hung job at most this many times, then fails it."
    )
    max_skipped_steps: int | None = Field(
        100,
        ge=1,
        le=100_000_000,
        description="End the run failed this many steps after an update was first skipped (non-finite "
        "loss or gradient) unless 10 updates in a row were applied since: weights that no "
        "update reaches cannot learn. null goes on to the end.",
    )
    rollback: RollbackSpec = Field(default_factory=RollbackSpec)
    rewind: RewindSpec = Field(default_factory=RewindSpec)
    timeout: float | None = Field(
        None,
        gt=0,
        description="Wall-clock limit, e.g. '2h', '30m', '90s' or seconds.",
        json_schema_extra={
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "null"},
            ]
        },
    )

    @field_validator("model", "data")
    @classmethod
    def _builtin_needs_it(cls, value: Any, info: ValidationInfo) -> Any:
        train = info.data.get("train")
        if train is None:  # train itself was invalid: its own error says why
            return value
        if value is None and isinstance(train, BuiltinTrain):
            raise PydanticCustomError("missing", "Field required")
        if value is not None and isinstance(train, EntrypointTrain):
            raise ValueError(
                f"a train.entrypoint job builds its own {info.field_name}: remove {info.field_name}, "
                "or pass what the function needs in train.config"
            )
        return value

    max_queued: float | None = Field(
        86400.0,
        gt=0,
        description="Longest a job may wait in the queue, e.g. '30m', '24h' or seconds; past it the job ends "
        "failed with the reason it waited for. null waits for ever.",
        json_schema_extra={
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "null"},
            ]
        },
    )

    @field_validator("timeout", "max_queued", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _plain_text(cls, data: Any) -> Any:
        found = control_characters(data)
        if found:
            where = ", ".join(_printable(path) for path in found)
            raise ValueError(
                "control characters are not allowed in a spec (they would reach other people's "
                f"terminals): remove them from {where}"
            )
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs (how long to train)")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.max_steps is not None and self.schedule.warmup_steps >= self.max_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be less than max_steps ({self.max_steps})"
            )
        if self.precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("precision bf16 needs scaling.use_gpu: true (CPU training runs in fp32)")
        if self.model is None or self.data is None:
            return self
        model_name, data_name = self.model.name, self.data.name
        if model_name == "char-transformer" and data_name not in ("text",) and ":" not in data_name:
            raise ValueError(f"model char-transformer needs data text, not {data_name}")
        if data_name == "text" and model_name != "char-transformer" and ":" not in model_name:
            raise ValueError(f"data text needs model char-transformer, not {model_name}")
        if model_name == "cnn" and data_name == "digits" and not getattr(self.data, "as_images", False):
            raise ValueError("model cnn on digits needs data.as_images: true")
        return self

    @model_validator(mode="after")
    def _fits_a_worker(self, info: ValidationInfo) -> JobSpec:
        limit = (info.context or {}).get("worker_memory_bytes") or DEFAULT_WORKER_MEMORY_BYTES
        estimate = estimate_worker_memory(self)
        if estimate is not None and estimate.total > limit:
            raise ValueError(
                f"the job needs about {_gib(estimate.total)} per worker ({estimate.parameters:,} parameters: "
                f"{_gib(estimate.model_bytes)} with gradients and optimizer state; data {_gib(estimate.data_bytes)}; "
                f"activations {_gib(estimate.activation_bytes)}) but a worker has {_gib(limit)}: use a smaller "
                "model, fewer samples or features, or a smaller batch_size"
            )
        return self

    def summary(self) -> str:
        steps = f"{self.max_steps} steps" if self.max_steps else f"{self.epochs} epochs"
        device = "GPU" if self.scaling.use_gpu else "CPU"
        if isinstance(self.train, EntrypointTrain):
            return f"{self.name}: {self.train.entrypoint} on {self.scaling.num_workers} {device} workers, {steps}"
        return (
            f"{self.name}: {self.model_name} on {self.data.name if self.data else '-'}, "
            f"{self.scaling.num_workers} {device} workers x batch {self.batch_size}, {self.optimizer.name} lr "
            f"{self.optimizer.lr:g}, {steps}"
        )

    @property
    def model_name(self) -> str:
        """What trains: the built-in model's name, or the entrypoint of a training function."""
        if isinstance(self.train, EntrypointTrain):
            return self.train.entrypoint
        return self.model.name if self.model else "-"


# ------------------------------------------------------------------- helpers
class MemoryEstimate(BaseModel):
    """A rough upper estimate of one worker's memory, in bytes."""

    parameters: int
    model_bytes: int  # fp32 weights, gradients and two optimizer moments: 16 bytes a parameter
    data_bytes: int  # every worker builds the whole data set
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.model_bytes + self.data_bytes + self.activation_bytes


def estimate_worker_memory(spec: JobSpec) -> MemoryEstimate | None:
    """Built-in models and data only (user code's size is unknown before it runs)."""
    data, model, batch = spec.data, spec.model, spec.batch_size
    if isinstance(data, DigitsData):
        features, outputs, data_bytes = 64, 10, 1797 * (64 * 4 + 8)
    elif isinstance(data, SyntheticClassificationData):
        features, outputs = data.n_features, data.n_classes
        data_bytes = data.n_samples * (data.n_features * 4 + 8) * 2  # generated, then split (a copy)
    elif isinstance(data, SyntheticRegressionData):
        features, outputs = data.n_features, 1
        data_bytes = data.n_samples * (data.n_features + 1) * 4 * 2
    elif isinstance(data, TextData):
        features, outputs = data.block_size, 256  # a generous character vocabulary
        # text, ids, and x/y blocks of int64 per character
        data_bytes = (data.max_chars or MAX_CORPUS_CHARS) * (4 + 8 + 16)
    else:
        return None
    if isinstance(model, MLPModel):
        widths = [features, *model.hidden, outputs]
        parameters = sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
        activations = batch * sum(widths) * 4 * 3  # outputs, activations and their gradients
    elif isinstance(model, CNNModel):
        c, h, w, parameters, activations = 1, 8, 8, 0, 0
        for out_c in model.channels:
            parameters += c * out_c * model.kernel_size**2 + out_c
            activations += batch * out_c * h * w * 4 * 3
            if min(h, w) >= 4:
                h, w = h // 2, w // 2
            c = out_c
        parameters += c * h * w * model.hidden + model.hidden + model.hidden * outputs + outputs
    elif isinstance(model, CharTransformerModel):
        d, n, t = model.n_embd, model.n_layer, model.block_size
        parameters = 12 * n * d * d + (outputs + t) * d + d * outputs
        activations = batch * t * (n * (16 * d + 2 * model.n_head * t) + 2 * outputs) * 4
    else:
        return None
    return MemoryEstimate(
        parameters=parameters, model_bytes=parameters * 16, data_bytes=data_bytes, activation_bytes=activations
    )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 / 10 else f"{n / 1024**2:.0f} MiB"


def _printable(path: str) -> str:
    """A field path fit for an error line: no control characters, no lone surrogates, not too long."""
    text = _CONTROL.sub("?", path.encode("utf-8", "backslashreplace").decode("utf-8"))
    return text if len(text) <= 80 else text[:77] + "..."


def control_characters(data: Any) -> list[str]:
    """Field paths (at most 5) of strings, keys or values, holding control characters other than tab
    and newline. Iterative: a spec nested 10,000 deep is walked, not recursed into."""
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack and len(found) < 5:
        value, path = stack.pop()
        if isinstance(value, str):
            if _CONTROL.search(value):
                found.append(path or "<spec>")
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and _CONTROL.search(key):
                    found.append(repr(where))
                else:
                    stack.append((item, where))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(value))
    return sorted(found)


def non_json_values(data: Any) -> list[tuple[str, str]]:
    """(field path, what it is) of at most 5 values JSON cannot hold, anywhere in the spec, `train.config`
    included: YAML's `!!binary` (bytes), dates and timestamps, `!!set`, and non-finite floats (`.inf`,
    `.nan`, `1e999`). The store keeps specs as JSON. Iterative, like control_characters."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack and len(found) < 5:
        value, path = stack.pop()
        where = path or "<spec>"
        if isinstance(value, bytes | bytearray):
            found.append((where, "binary data"))
        elif isinstance(value, datetime.date | datetime.time):
            found.append((where, f"a YAML {type(value).__name__}"))
        elif isinstance(value, set | frozenset):
            found.append((where, "a YAML set"))
        elif isinstance(value, float) and not math.isfinite(value):
            found.append((where, f"the non-finite number {value}"))
        elif isinstance(value, dict):
            for key, item in value.items():
                key_path = f"{path}.{key}" if path else str(key)
                if not isinstance(key, str | int | float | bool) and key is not None:
                    found.append((key_path, f"a {type(key).__name__} key"))
                else:
                    stack.append((item, key_path))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(value))
    return sorted(found)


def check_data_path(value: str, info: ValidationInfo) -> str:
    """`data.path` on a server without user code: only under its data roots, decided without touching
    the file system (a refusal says nothing about whether a file exists). Context key `data_roots`."""
    if (info.context or {}).get("user_code", "import") != "deny":
        return value  # user code may read any file anyway; local runs read what their user can
    roots = [str(r) for r in (info.context or {}).get("data_roots") or []]
    if not roots:
        raise ValueError(
            "this server reads no files named in specs (user code is off and no data roots are "
            "set): leave data.path out for the bundled corpus, or ask the operator to set "
            "GRADWATCH_DATA_ROOTS"
        )
    if not value.startswith("/") or "\x00" in value:
        raise ValueError(f"write an absolute path under one of the data roots: {', '.join(roots)}")
    normal = posixpath.normpath(value)
    if ".." in value.split("/") or not any(normal == r or normal.startswith(r.rstrip("/") + "/") for r in roots):
        raise ValueError(
            f"only files under the data roots ({', '.join(roots)}) may be read; write a path "
            "inside one of them, without '..'"
        )
    return normal


def parse_duration(text: str) -> float:
    """'2h', '1h30m', '45s', '90' -> seconds."""
    text = text.strip()
    if _NUMBER.match(text):
        if not math.isfinite(float(text)):
            raise ValueError(f"not a duration: {text[:20]!r}... is too large a number")
        return float(text)
    match = _DURATION.match(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"not a duration: use e.g. '90s', '30m', '2h' or '1h30m', got {text!r}")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if not math.isfinite(total):
        raise ValueError(f"not a duration: {text[:20]!r}... is too large a number")
    return total


def format_duration(seconds: float) -> str:
    """Seconds in the largest whole unit: 7200 -> '2h', 1800 -> '30m', 90 -> '90s'."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def overran(timeout: float | None, elapsed: float) -> str | None:
    """Why a job that has run `elapsed` seconds must stop for its `timeout`; None while it may go on.

    One clock per job: under the service the launcher's, from the submit to Ray (the job's
    `started_at`); under `gradwatch run` the driver's, from its start.
    """
    if timeout is None or elapsed <= timeout:
        return None
    return f"ran longer than its timeout of {format_duration(timeout)}"


def check_import_path(value: str, info: ValidationInfo) -> str:
    """Validate a `module:factory` path; import it unless the caller said not to.

    Context keys: `user_code` = "import" (default: import and check the factory),
    "skip" (syntax only: the code runs elsewhere), "deny" (refuse user code).
    """
    if not _IMPORT_PATH.match(value):
        raise ValueError(f"{value!r} is not an import path: write 'package.module:factory'")
    mode = (info.context or {}).get("user_code", "import")
    if mode == "deny":
        raise ValueError(
            f"user code ({value}) is disabled on this server: use a built-in name, "
            "or ask the operator to allow user code (GRADWATCH_ALLOW_USER_CODE=true)"
        )
    if mode == "skip":
        return value
    module_name, attr = value.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and not (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            raise ValueError(
                f"cannot import module {module_name!r}: it imports {exc.name!r}, which is not installed: install it"
            ) from None
        raise ValueError(
            f"cannot import module {module_name!r}: {exc}: run from the folder that holds "
            f"{module_name.split('.')[0]!r}, add that folder to PYTHONPATH, or install its package"
        ) from None
    except Exception as exc:  # any other import failure is the user's code to fix
        raise ValueError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(module, attr, None)):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    return value


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (a spec never needs them, and they enable YAML bombs)
    and stops counting at MAX_SPEC_NODES nodes, so a spec of 30,000 keys costs no more than 4,096."""

    nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError([f"<yaml>: aliases are not allowed in a spec (line {event.start_mark.line + 1})"])
        self.nodes += 1
        if self.nodes > MAX_SPEC_NODES:
            line = self.peek_event().start_mark.line + 1
            raise SpecError(
                [f"<spec>: more than {MAX_SPEC_NODES} keys and values (at line {line}); a spec needs a few dozen"]
            )
        return super().compose_node(parent, index)


class SpecError(Exception):
    """A spec that cannot be used; `errors` holds one `field.path: reason (got VALUE)` line each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def parse_text(text: str | bytes) -> dict[str, Any]:
    """YAML or JSON text -> a mapping; raises SpecError with a readable reason."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([f"<spec>: {len(text)} bytes is over the {MAX_SPEC_BYTES} byte limit for a spec"])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError(["<spec>: not UTF-8 text"]) from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # JSON is YAML too
    except SpecError:
        raise
    except yaml.YAMLError as exc:
        raise SpecError([f"<spec>: not valid YAML or JSON: {exc}".replace("\n", " ")]) from None
    except RecursionError:
        raise SpecError(["<spec>: nested too deeply"]) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # PyYAML's constructors fail outside YAMLError on values like `2001-02-30`, `!!int x` or 5000 digits.
        raise SpecError([f"<spec>: a value YAML cannot read: {exc}".replace("\n", " ")]) from None
    if not isinstance(data, dict):
        raise SpecError([f"<spec>: a spec is a mapping of fields, got {type(data).__name__}"])
    return _join_surrogates(data)


def _join_surrogates(data: Any) -> Any:
    """YAML reads the JSON escape of a character beyond U+FFFF (`\\ud83d\\ude00`) as two lone surrogates:
    join each such pair into its character, as a JSON parser does. Iterative, like control_characters."""

    def joined(text: Any) -> Any:
        if not isinstance(text, str) or not any("\ud800" <= c <= "\udfff" for c in text):
            return text
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")

    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            items = list(value.items())
            value.clear()
            for key, item in items:
                value[joined(key)] = joined(item)
                stack.append(item)
        elif isinstance(value, list):
            value[:] = [joined(item) for item in value]
            stack.extend(value)
    return data


def format_errors(error: ValidationError) -> list[str]:
    """One line per error: `field.path: reason (got VALUE)`."""
    lines = []
    for item in error.errors(include_url=False):
        loc = _clean_loc(item["loc"])
        path = ".".join(str(p) for p in loc) or "<spec>"
        msg = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        if item["type"] == "missing":
            lines.append(f"{path}: field required")
        elif item["type"] == "finite_number":
            lines.append(f"{path}: must be a finite number, not infinity or NaN: write a number (got {_show(got)})")
        elif item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown field (not allowed here; check its spelling)")
        else:
            lines.append(f"{path}: {msg} (got {_show(got)})")
        if len(lines) == MAX_ERROR_LINES:
            lines.append(f"<spec>: ... and {error.error_count() - MAX_ERROR_LINES} more errors")
            break
    # One line each, whatever the keys hold, and no control characters from them.
    return [_CONTROL.sub("?", " ".join(line.splitlines())) for line in lines]


def _clean_loc(loc: tuple[Any, ...]) -> list[Any]:
    # Tagged unions put the tag in the path (model.mlp.hidden): drop it, users never wrote it.
    tags = {"model": {*BUILTIN_MODELS, "custom"}, "data": {*BUILTIN_DATA, "custom"}, "train": {"builtin", "entrypoint"}}
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i == 1 and part in tags.get(loc[0], ()):
            continue
        out.append(part)
    return out


def _show(value: Any) -> str:
    if isinstance(value, dict) and "name" in value and len(value) > 3:
        value = {"name": value["name"], "...": "..."}
    try:
        text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    except (TypeError, ValueError, RecursionError):  # date keys, ints over 4300 digits, deep nesting
        text = f"a {type(value).__name__} too odd to show"
    return text if len(text) <= 80 else text[:77] + "..."


def load_spec(
    source: str | Path | dict[str, Any] | bytes,
    *,
    user_code: str = "import",
    data_roots: list[str] | None = None,
    worker_memory_bytes: int | None = None,
) -> JobSpec:
    """A path, YAML/JSON text or a mapping -> a valid JobSpec, or SpecError listing every problem.

    `user_code`: "import", "skip" or "deny" (see check_import_path); with "deny", `data.path` must lie
    under `data_roots`. `worker_memory_bytes`: refuse built-in models and data estimated above it.
    """
    if not isinstance(source, (str, Path, dict, bytes)):
        raise SpecError([f"<spec>: a spec is a mapping of fields, got {type(source).__name__}"])
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml", ".json"))
    ):
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > MAX_SPEC_BYTES:
                raise SpecError([f"<spec>: {path} is {size} bytes, over the {MAX_SPEC_BYTES} byte limit"])
            source = path.read_bytes()
        except OSError as exc:
            raise SpecError([f"<spec>: cannot read {path}: {exc.strerror}"]) from None
    data = source if isinstance(source, dict) else parse_text(source)
    odd = [f"{_CONTROL.sub('?', path)}: {what}{_NON_JSON_FIX}" for path, what in non_json_values(data)]
    try:
        spec = JobSpec.model_validate(
            data,
            context={
                "user_code": user_code,
                "data_roots": data_roots or [],
                "worker_memory_bytes": worker_memory_bytes,
            },
        )
    except ValidationError as exc:
        errors = format_errors(exc)
        named = {line.split(":", 1)[0] for line in errors}
        raise SpecError([line for line in odd if line.split(":", 1)[0] not in named] + errors) from None
    except RecursionError:
        raise SpecError(["<spec>: nested too deeply"]) from None
    if odd:  # in train.config, which takes any value: the store keeps specs as JSON
        raise SpecError(odd)
    return spec


def json_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gradwatch JobSpec"
    return schema
