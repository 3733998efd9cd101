"""A model whose rank 1 is slow: user code for the straggler test (a slow node, in miniature)."""

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
