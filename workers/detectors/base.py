"""What every detector shares: the event and finding records, a sorted window, robust trend statistics."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

MAD_TO_SIGMA = 1.4826  # median absolute deviation times this is a normal distribution's sigma


@dataclass(frozen=True)
class Event:
    """A change of state worth one log line: a phase entered, or an anomaly raised or cleared.

    For `kind="phase"`, `name` is the phase entered and `raised` is always True.
    """

    step: int
    kind: Literal["phase", "anomaly"]
    name: str
    raised: bool
    detail: str


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on one observation: does its condition hold, and why, in words.

    `urgent` findings (a non-finite loss or gradient, both losses rising over several evaluations) count
    even during warmup.
    """

    holds: bool
    detail: str = ""
    urgent: bool = False


QUIET = Finding(False)


def median_sorted(ordered: list[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def resolution(value: float) -> float:
    """The step between neighbouring values at the precision `value` was written with: 1e-4 for 0.0004 or
    1.2345, 1e-15 for a loss straight from a float tensor. A log that rounds its losses (the Hugging Face
    Trainer keeps 4 decimals) repeats a value, and moves by whole steps of this, without anything being
    frozen or spiking. 0 for a whole number (1.0, 3.0): nothing says it was rounded."""
    if not math.isfinite(value) or value == 0.0:
        return 0.0
    mantissa, _, exponent = repr(abs(value)).partition("e")
    decimals = mantissa.partition(".")[2].rstrip("0")
    if not decimals and not exponent:
        return 0.0
    return 10.0 ** (int(exponent or 0) - len(decimals))


class SortedWindow:
    """The last `size` values, also kept sorted, so the median costs nothing per step."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self.ordered: list[float] = []

    def add(self, value: float) -> None:
        if len(self.values) == self.size:
            old = self.values.popleft()
            del self.ordered[bisect_left(self.ordered, old)]
        self.values.append(value)
        insort(self.ordered, value)

    def __len__(self) -> int:
        return len(self.values)

    def median(self) -> float:
        return median_sorted(self.ordered)

    def mad(self, center: float) -> float:
        return median_sorted(sorted(abs(v - center) for v in self.ordered))


def mann_kendall_z(values: np.ndarray) -> float:
    """Mann-Kendall's z of a monotone trend in `values` (positive: rising), ties left in: a robust test
    that the series rises or falls, whatever the noise's shape; |z| > 3 happens by chance about 0.3 % of the time."""
    n = len(values)
    if n < 4:
        return 0.0
    s = float(np.sign(values[None, :] - values[:, None])[np.triu_indices(n, 1)].sum())
    var = n * (n - 1) * (2 * n + 5) / 18.0
    if s == 0.0:
        return 0.0
    return (s - math.copysign(1.0, s)) / math.sqrt(var)


def theil_sen(values: np.ndarray, positions: np.ndarray) -> float:
    """Theil-Sen slope: the median of the pairwise slopes, robust to a third of the points being outliers."""
    n = len(values)
    if n < 2:
        return 0.0
    i, j = np.triu_indices(n, 1)
    dx = positions[j] - positions[i]
    keep = dx > 0
    if not keep.any():
        return 0.0
    return float(np.median((values[j] - values[i])[keep] / dx[keep]))


class BlockMedians:
    """A series cut into blocks of `block` steps, each kept as its median: a long history at a fixed cost,
    on which trends are tested (a log every 1 or every 50 steps gives the same blocks)."""

    def __init__(self, block: int, keep: int) -> None:
        self.block = block
        self.blocks: deque[float] = deque(maxlen=keep)
        self.ends: deque[int] = deque(maxlen=keep)  # the step each block closed at
        self.current: list[float] = []
        self.current_index: int | None = None

    def add(self, step: int, value: float) -> bool:
        """Take one value; returns whether a block closed (its median is now the last of `blocks`)."""
        index = step // self.block
        closed = False
        if self.current_index is not None and index != self.current_index and self.current:
            self.blocks.append(median_sorted(sorted(self.current)))
            self.ends.append(step - 1)
            self.current = []
            closed = True
        self.current_index = index
        self.current.append(value)
        return closed

    def last(self, n: int) -> np.ndarray:
        return np.fromiter(list(self.blocks)[-n:], dtype=float)
