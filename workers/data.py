"""Built-in data sets (no download) and user data factories.

Every data set yields `(x, y, index)` so a run can prove which examples each
rank saw. Splits are deterministic in the spec's seed: every rank builds the
same train/val split and DistributedSampler shards it.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import importlib.util
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import Dataset, TensorDataset

from gradwatch.spec import (
    DATA_ROOTS_ENV,
    MAX_CORPUS_CHARS,
    CustomData,
    DataSpec,
    DigitsData,
    SyntheticClassificationData,
    SyntheticRegressionData,
    TextData,
)

Task = Literal["classification", "regression", "language_model"]
BuiltinData = DigitsData | SyntheticClassificationData | SyntheticRegressionData | TextData


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    task: Task
    input_shape: tuple[int, ...]
    num_outputs: int  # classes, regression targets, or vocabulary size
    vocab: str | None = None


class IndexedDataset(Dataset):
    """Wraps tensors so each item also carries its index in the full train or val set."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def build_data(spec: DataSpec, seed: int) -> DataBundle:
    """The spec's `data` section -> train and val sets."""
    if isinstance(spec, DigitsData):
        return _digits(spec, seed)
    if isinstance(spec, SyntheticClassificationData):
        return _synthetic_classification(spec, seed)
    if isinstance(spec, SyntheticRegressionData):
        return _synthetic_regression(spec, seed)
    if isinstance(spec, TextData):
        return _text(spec, seed)
    return _custom(spec, seed)


def _split(n: int, val_fraction: float, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    train = perm[n_val:]
    train = train[: max(1, int(round(len(train) * train_fraction)))]
    return train, perm[:n_val]


def _finish(x: torch.Tensor, y: torch.Tensor, spec: BuiltinData, seed: int, task: Task, num_outputs: int) -> DataBundle:
    train_idx, val_idx = _split(len(x), spec.val_fraction, spec.train_fraction, seed)
    return DataBundle(
        train=IndexedDataset(x[train_idx], y[train_idx]),
        val=IndexedDataset(x[val_idx], y[val_idx]),
        task=task,
        input_shape=tuple(x.shape[1:]),
        num_outputs=num_outputs,
    )


def scikit_learn_datasets() -> Path:
    """scikit-learn's `datasets` folder (its bundled data, no download), found without importing
    scikit-learn: that import alone takes 1-2 s of every worker's start."""
    found = importlib.util.find_spec("sklearn")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(
            "the digits data set and the default corpus come with scikit-learn: pip install scikit-learn"
        )
    return Path(next(iter(found.submodule_search_locations))) / "datasets"


def _digits(spec: DigitsData, seed: int) -> DataBundle:
    import numpy as np

    # the file `sklearn.datasets.load_digits()` reads: 64 pixels (0-16) and the digit, per row
    with gzip.open(scikit_learn_datasets() / "data" / "digits.csv.gz", "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    x = torch.tensor(table[:, :-1], dtype=torch.float32) / 16.0
    if spec.as_images:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(table[:, -1].astype(np.int64))
    return _finish(x, y, spec, seed, "classification", 10)


def _synthetic_classification(spec: SyntheticClassificationData, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(seed + 1)
    centers = torch.randn(spec.n_classes, spec.n_features, generator=g) * 2.0
    y = torch.randint(0, spec.n_classes, (spec.n_samples,), generator=g)
    x = centers[y] + torch.randn(spec.n_samples, spec.n_features, generator=g) * (1.0 + spec.noise * 4)
    return _finish(x, y, spec, seed, "classification", spec.n_classes)


def _synthetic_regression(spec: SyntheticRegressionData, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(spec.n_features, 1, generator=g)
    x = torch.randn(spec.n_samples, spec.n_features, generator=g)
    y = torch.tanh(x @ w / spec.n_features**0.5) * 3 + torch.randn(spec.n_samples, 1, generator=g) * spec.noise
    return _finish(x, y, spec, seed, "regression", 1)


def default_corpus_path() -> Path:
    """The bundled data-set descriptions of scikit-learn: real English text on every install."""
    return scikit_learn_datasets() / "descr"


class CorpusRefused(ValueError):
    """A `data.path` that may not or cannot be read; the message never says whether the file exists."""


def read_corpus(path: str | None, max_chars: int | None, roots: list[str] | None = None) -> str:
    """At most `max_chars` (or MAX_CORPUS_CHARS) characters of a UTF-8 file, reading no more bytes than
    those need. `roots`: the file, symbolic links resolved, must lie under one of these folders."""
    limit = min(max_chars or MAX_CORPUS_CHARS, MAX_CORPUS_CHARS)
    if not path:
        source = default_corpus_path()
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(source.glob("*.rst")))
        return text[:limit]
    return _read_regular_file(path, limit, roots)


def _read_regular_file(path: str, limit: int, roots: list[str] | None) -> str:
    refused = CorpusRefused(
        f"data.path {path!r}: cannot be used; it must be a readable regular UTF-8 file"
        + (f" under the data roots ({', '.join(roots)})" if roots else "")
    )
    real = os.path.realpath(path)
    if roots is not None and not any(
        real == os.path.realpath(r) or real.startswith(os.path.realpath(r) + os.sep) for r in roots
    ):
        raise refused
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: `real` has no links left.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise refused from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # devices, FIFOs, sockets, folders
        os.close(fd)
        raise refused
    with os.fdopen(fd, "rb") as f:
        raw = f.read(limit * 4)  # UTF-8 takes at most 4 bytes a character
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(raw, final=False)  # a character cut at the end waits, and is dropped
    except UnicodeDecodeError:
        raise refused from None
    return text[:limit]


def _text(spec: TextData, seed: int) -> DataBundle:
    # Set by the service for jobs of a server without user code: check data.path on this node too.
    roots = os.environ.get(DATA_ROOTS_ENV)
    text = read_corpus(
        spec.path, spec.max_chars, [r for r in roots.split(os.pathsep) if r] if roots is not None else None
    )
    if len(text) < spec.block_size * 4:
        raise ValueError(
            f"data.path: corpus has {len(text)} characters; need at least {spec.block_size * 4} "
            f"for block_size {spec.block_size}"
        )
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    # Non-overlapping blocks keep train and val disjoint; y is x shifted by one character.
    n_blocks = (len(ids) - 1) // spec.block_size
    starts = torch.arange(n_blocks) * spec.block_size
    offsets = torch.arange(spec.block_size)
    x = ids[starts[:, None] + offsets]
    y = ids[starts[:, None] + offsets + 1]
    bundle = _finish(x, y, spec, seed, "language_model", len(vocab))
    bundle.vocab = vocab
    return bundle


def load_factory(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _custom(spec: CustomData, seed: int) -> DataBundle:
    """A user factory returns a DataBundle, or (train, val) datasets of (x, y) items for classification."""
    result = load_factory(spec.name)(**spec.options, seed=seed)
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        train, val = result
        x0, _ = train[0][:2]
        ys = torch.as_tensor([int(train[i][1]) for i in range(len(train))])
        return DataBundle(_WithIndex(train), _WithIndex(val), "classification", tuple(x0.shape), int(ys.max()) + 1)
    raise TypeError(
        f"data factory {spec.name} must return a DataBundle or a (train, val) pair of datasets, "
        f"got {type(result).__name__}"
    )


class _MapDataset(Protocol):
    """What a custom data factory's datasets must be: sized and indexable by position."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Any: ...


class _WithIndex(Dataset):
    def __init__(self, inner: _MapDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        x, y = self.inner[i][:2]
        return x, y, i


__all__ = ["DataBundle", "IndexedDataset", "TensorDataset", "build_data", "read_corpus", "load_factory"]
