"""Rewind-and-skip: which batch fed which step, and which batches a rewound run leaves out.

`on_spike: rewind` (or `on_divergence: rewind`) takes a run back to its last good checkpoint and skips,
on the way forward again, the batches of the steps that fed the anomaly (docs/rewind.md). This module
is the bookkeeping, with no torch.distributed in it: `BatchLog` records each step's batch (its epoch, its
place in the epoch's order and, when known, its sample indices) and holds the places to skip;
`replay_batches` is the data iteration that uses it, for the built-in loop and `Run.batches` alike.

A batch is named by its place in its epoch (epoch, batch number), not by its samples: replayed from a
checkpoint, a sampler whose order depends only on its seed and epoch (`DistributedSampler`, or no
shuffle) yields the same batch at the same place, on every rank alike, so every rank skips the same
step without a word between them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DistributedSampler, SequentialSampler

# Steps whose batches are remembered (a few thousand small records); a rewind's window must lie in them.
MAX_LOGGED_STEPS = 4096


@dataclass
class FedBatch:
    """The batch one step trained on, on this rank."""

    step: int
    epoch: int
    batch: int  # its place in the epoch's order, from 0
    indices: Any = None  # its sample indices: a tensor (read only when needed) or a list, or None when unknown

    def describe(self) -> dict[str, Any]:
        """As an event lists it: step, epoch, batch and the sample indices (a list, or None)."""
        indices = self.indices
        if indices is not None and hasattr(indices, "tolist"):
            indices = indices.tolist()  # the one read of a tensor that may live on a GPU: at a rewind only
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "indices": indices}


class BatchLog:
    """This rank's record of the batches fed to the last MAX_LOGGED_STEPS steps, and the batches to skip."""

    def __init__(self, max_steps: int = MAX_LOGGED_STEPS):
        if max_steps < 1:
            raise ValueError(f"BatchLog keeps at least 1 step, not {max_steps}")
        self.fed_batches: deque[FedBatch] = deque(maxlen=max_steps)
        self.skipped: set[tuple[int, int]] = set()  # (epoch, batch) left out from now on
        self.generation = 0  # bumped by every rewind: an iteration under way starts again from the restored place

    def fed(self, step: int, epoch: int, batch: int, indices: Any = None) -> None:
        """`step` trains on the batch at (`epoch`, `batch`). A step fed again (after a rewind) replaces its record."""
        while self.fed_batches and self.fed_batches[-1].step >= step:
            self.fed_batches.pop()
        self.fed_batches.append(FedBatch(step, epoch, batch, indices))

    def skips(self, epoch: int, batch: int) -> bool:
        """Whether the batch at (`epoch`, `batch`) is left out."""
        return bool(self.skipped) and (epoch, batch) in self.skipped

    def rewind(self, to_step: int, last_step: int, steps: int) -> list[FedBatch]:
        """The run goes back to `to_step`; the batches of the `steps` steps ending at `last_step` are skipped
        from now on. Returns them (those this log still holds), oldest first."""
        if last_step <= to_step:
            raise ValueError(
                f"a rewind goes back to a step before the one it leaves out: to step {to_step}, but the "
                f"anomaly was seen at step {last_step}"
            )
        first = last_step - steps + 1
        left_out = [b for b in self.fed_batches if first <= b.step <= last_step]
        self.skipped.update((b.epoch, b.batch) for b in left_out)
        while self.fed_batches and self.fed_batches[-1].step > to_step:  # fed again on the way forward
            self.fed_batches.pop()
        self.generation += 1
        return left_out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the skipped batches (plain lists, loadable with torch's weights_only)."""
        return {"skipped": sorted([e, b] for e, b in self.skipped)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """After a restart: the batches skipped before the checkpoint stay skipped."""
        self.skipped = {(int(e), int(b)) for e, b in (state or {}).get("skipped", [])}


def replayable(loader: Any) -> bool:
    """Whether `loader` yields the same batches in the same places when an epoch is iterated again: its
    sampler's order depends only on its seed and epoch (DistributedSampler) or it does not shuffle."""
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, DistributedSampler | SequentialSampler)


def sampler_batches(loader: Any) -> list[list[int]] | None:
    """The sample indices of each batch of the epoch the sampler is set to, when `loader` is replayable and
    batches through a batch sampler; else None. Iterates the indices only, not the data."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not replayable(loader) or batch_sampler is None:
        return None
    return [list(b) for b in batch_sampler]


def replay_batches(
    loader: Iterable[Any],
    log: BatchLog,
    *,
    place: Callable[[], tuple[int, int]],
    moved: Callable[[int, int], None],
    next_step: Callable[[], int],
    indices_of: Callable[[Any], Any] | None = None,
) -> Iterator[Any]:
    """Endless batches of `loader`, epoch after epoch, that resume where `place()` says (epoch, batches
    taken in it), skip the batches `log` leaves out and record the rest for the step they feed. After a
    rewind (the log's generation moves) the iteration starts again from the restored place.

    `moved(epoch, taken)` is told each new place; `next_step()` is the step a batch yielded now feeds;
    `indices_of(batch)` gives a batch's sample indices (else they come from the sampler when it is replayable).
    """
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    while True:
        epoch, start = place()
        if set_epoch is not None:
            set_epoch(epoch)
        order = sampler_batches(loader) if indices_of is None else None
        generation = log.generation
        for i, batch in enumerate(loader):
            if log.generation != generation:
                break
            if i < start:
                continue
            moved(epoch, i + 1)
            if log.skips(epoch, i):
                continue
            indices = indices_of(batch) if indices_of is not None else (order[i] if order and i < len(order) else None)
            log.fed(next_step(), epoch, i, indices)
            yield batch
        if log.generation == generation:  # the epoch ran out; after a rewind, place() says where to go on
            moved(epoch + 1, 0)


__all__ = ["MAX_LOGGED_STEPS", "BatchLog", "FedBatch", "replay_batches", "replayable", "sampler_batches"]
