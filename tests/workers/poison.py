"""A test-only data factory for rewind-and-skip: synthetic classes with the batches of chosen steps poisoned.

The built-in loop shards the train set with a seeded DistributedSampler (workers/loop.py), so the sample
indices each rank trains on at a step are known before the run: this factory scales those samples'
inputs up by `factor` and gives them the next class's label: the loss of those steps spikes (confidently
wrong) and their gradients wreck the weights.
The set is large enough (250 steps an epoch at 2 x 32) that a test's run never meets those samples again.
"""

from __future__ import annotations

from torch.utils.data import DistributedSampler

from gradwatch.spec import SyntheticClassificationData
from workers.data import DataBundle, IndexedDataset, build_data


def poisoned_indices(n_train: int, steps: list[int], world_size: int, batch_size: int, seed: int) -> dict[int, list]:
    """Per step, each rank's sample indices of the batch the built-in loop feeds it at that step (a clean run)."""
    per_rank = n_train // world_size
    per_epoch = per_rank // batch_size  # the loop drops the last partial batch
    out: dict[int, list] = {}
    for step in steps:
        epoch, place = divmod(step - 1, per_epoch)
        ranks = []
        for rank in range(world_size):
            sampler = DistributedSampler(
                range(n_train), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            sampler.set_epoch(epoch)
            ranks.append(list(sampler)[place * batch_size : (place + 1) * batch_size])
        out[step] = ranks
    return out


def poisoned_data(
    seed: int, steps: list[int], world_size: int, batch_size: int, factor: float = 1000.0, n_samples: int = 20_000
) -> DataBundle:
    spec = SyntheticClassificationData(name="synthetic-classification", n_samples=n_samples, noise=0.5)
    bundle = build_data(spec, seed)
    train = bundle.train
    assert isinstance(train, IndexedDataset)
    x, y = train.x.clone(), train.y.clone()
    for ranks in poisoned_indices(len(x), steps, world_size, batch_size, seed).values():
        for indices in ranks:
            x[indices] *= factor
            y[indices] = (y[indices] + 1) % spec.n_classes
    bundle.train = IndexedDataset(x, y)
    return bundle
