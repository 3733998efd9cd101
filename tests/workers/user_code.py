"""User code for the Ray tests: a model whose rank 1 (or the ranks named) is slow, and a data factory that fails."""

import math
import time

import torch


class SlowOnRanks(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, delay: float, ranks: tuple[int, ...]):
        super().__init__()
        self.inner, self.delay, self.ranks = inner, delay, ranks

    def forward(self, x):
        import ray.train

        if ray.train.get_context().get_world_rank() in self.ranks:
            time.sleep(self.delay)
        return self.inner(x)


def build(data_info, delay: float = 0.02, ranks: list[int] | None = None):
    """A linear model on the data's shape whose forward sleeps `delay` on rank 1 (or on `ranks`): a pace
    set by sleeping, not by the machine's speed, so a job runs as long as a test needs and leaves the CPUs
    free while it does."""
    linear = torch.nn.Linear(math.prod(data_info.input_shape), data_info.num_outputs)
    return SlowOnRanks(torch.nn.Sequential(torch.nn.Flatten(), linear), delay, tuple(ranks or (1,)))


def broken_data(seed: int, path: str = "/data/missing.npz"):
    """A data factory that fails the way real ones do: its input is not there."""
    raise FileNotFoundError(f"no such data file: {path}")
