"""User code for the Ray tests: a model whose rank 1 is slow, and a data factory that fails."""

import time

import torch


class SlowOnRank1(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x):
        import ray.train

        if ray.train.get_context().get_world_rank() == 1:
            time.sleep(self.delay)
        return self.inner(x)


def build(data_info, delay: float = 0.02):
    return SlowOnRank1(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), delay)


def broken_data(seed: int, path: str = "/data/missing.npz"):
    """A data factory that fails the way real ones do: its input is not there."""
    raise FileNotFoundError(f"no such data file: {path}")
