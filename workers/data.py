"""Built-in data sets (no download) and user data factories.

Every data set yields `(x, y, index)` so a run can prove which examples each
rank saw. Splits are deterministic in the spec's seed: every rank builds the
same train/val split and DistributedSampler shards it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, TensorDataset

Task = Literal["classification", "regression", "language_model"]


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


def build_data(spec: Any, seed: int) -> DataBundle:
    """The spec's `data` section -> train and val sets."""
    name = spec.name
    if name == "digits":
        return _digits(spec, seed)
    if name == "synthetic-classification":
        return _synthetic_classification(spec, seed)
    if name == "synthetic-regression":
        return _synthetic_regression(spec, seed)
    if name == "text":
        return _text(spec, seed)
    return _custom(spec, seed)


def _split(n: int, val_fraction: float, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    train = perm[n_val:]
    train = train[: max(1, int(round(len(train) * train_fraction)))]
    return train, perm[:n_val]


def _finish(x: torch.Tensor, y: torch.Tensor, spec: Any, seed: int, task: Task, num_outputs: int) -> DataBundle:
    train_idx, val_idx = _split(len(x), spec.val_fraction, getattr(spec, "train_fraction", 1.0), seed)
    return DataBundle(
        train=IndexedDataset(x[train_idx], y[train_idx]),
        val=IndexedDataset(x[val_idx], y[val_idx]),
        task=task,
        input_shape=tuple(x.shape[1:]),
        num_outputs=num_outputs,
    )


def _digits(spec: Any, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    if spec.as_images:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    return _finish(x, y, spec, seed, "classification", 10)


def _synthetic_classification(spec: Any, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(seed + 1)
    centers = torch.randn(spec.n_classes, spec.n_features, generator=g) * 2.0
    y = torch.randint(0, spec.n_classes, (spec.n_samples,), generator=g)
    x = centers[y] + torch.randn(spec.n_samples, spec.n_features, generator=g) * (1.0 + spec.noise * 4)
    return _finish(x, y, spec, seed, "classification", spec.n_classes)


def _synthetic_regression(spec: Any, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(spec.n_features, 1, generator=g)
    x = torch.randn(spec.n_samples, spec.n_features, generator=g)
    y = torch.tanh(x @ w / spec.n_features**0.5) * 3 + torch.randn(spec.n_samples, 1, generator=g) * spec.noise
    return _finish(x, y, spec, seed, "regression", 1)


def default_corpus_path() -> Path:
    """The bundled data-set descriptions of scikit-learn: real English text on every install."""
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "descr"


def read_corpus(path: str | None, max_chars: int | None) -> str:
    source = Path(path) if path else default_corpus_path()
    if source.is_dir():
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(source.glob("*.rst")))
    else:
        text = source.read_text(encoding="utf-8")
    return text[:max_chars] if max_chars else text


def _text(spec: Any, seed: int) -> DataBundle:
    text = read_corpus(spec.path, spec.max_chars)
    if len(text) < spec.block_size * 4:
        raise ValueError(f"data.path: corpus has {len(text)} characters; need at least {spec.block_size * 4} "
                         f"for block_size {spec.block_size}")
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


def _custom(spec: Any, seed: int) -> DataBundle:
    """A user factory returns a DataBundle, or (train, val) datasets of (x, y) items for classification."""
    result = load_factory(spec.name)(**spec.options, seed=seed)
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        train, val = result
        x0, _ = train[0][:2]
        ys = torch.as_tensor([int(train[i][1]) for i in range(len(train))])
        return DataBundle(_WithIndex(train), _WithIndex(val), "classification", tuple(x0.shape),
                          int(ys.max()) + 1)
    raise TypeError(f"data factory {spec.name} must return a DataBundle or a (train, val) pair of datasets, "
                    f"got {type(result).__name__}")


class _WithIndex(Dataset):
    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.inner[i][:2]
        return x, y, i


__all__ = ["DataBundle", "IndexedDataset", "TensorDataset", "build_data", "read_corpus", "load_factory"]
