"""Rewind-and-skip: a loss spike takes the run back to its last good checkpoint and the batches that fed
it are left out; bounded by rewind.max_rewinds. The component alone, a run in one process, and real DDP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradwatch
import workers.training
from gradwatch.spec import load_spec
from tests.conftest import small_spec
from tests.workers.poison import poisoned_indices
from workers.data import build_data
from workers.loop import Trainer
from workers.rewind import BatchLog, replay_batches
from workers.session import LocalSession
from workers.training import DivergenceStop, enter_job

POISON_STEP = 60
BATCH = 32


# ------------------------------------------------------------------ the component alone
def test_a_rewind_skips_the_window_and_keeps_the_log_of_the_steps_before():
    log = BatchLog()
    for step in range(1, 11):
        log.fed(step, epoch=step // 4, batch=step % 4, indices=[step * 10])
    left_out = log.rewind(to_step=5, last_step=8, steps=2)
    assert [(b.step, b.epoch, b.batch) for b in left_out] == [(7, 1, 3), (8, 2, 0)]
    assert [b.describe()["indices"] for b in left_out] == [[70], [80]]
    assert log.skips(1, 3) and log.skips(2, 0) and not log.skips(1, 2)
    assert [b.step for b in log.fed_batches] == [1, 2, 3, 4, 5]  # the rest is fed again on the way forward
    assert log.generation == 1
    restored = BatchLog()
    restored.load_state_dict(json.loads(json.dumps(log.state_dict())))
    assert restored.skipped == {(1, 3), (2, 0)}


def test_a_rewind_must_go_back_before_the_step_it_leaves_out():
    with pytest.raises(ValueError, match="to step 8, but the anomaly was seen at step 8"):
        BatchLog().rewind(to_step=8, last_step=8, steps=1)
    with pytest.raises(ValueError, match="at least 1 step"):
        BatchLog(max_steps=0)


def test_replay_restarts_from_the_restored_place_and_leaves_out_the_skipped_batch():
    data = TensorDataset(torch.arange(12))
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=True))
    log, where = BatchLog(), {"epoch": 0, "taken": 0}
    step = {"n": 0}

    def moved(epoch, taken):
        where.update(epoch=epoch, taken=taken)

    it = replay_batches(
        loader, log, place=lambda: (where["epoch"], where["taken"]), moved=moved, next_step=lambda: step["n"] + 1
    )
    seen = []
    for _ in range(8):  # one epoch of 6 batches and 2 of the next
        seen.append(next(it)[0].tolist())
        step["n"] += 1
    assert [b.step for b in log.fed_batches] == list(range(1, 9))
    assert log.fed_batches[0].indices == seen[0]  # indices from the sampler: the batch's own samples
    # back to step 3 (epoch 0, 3 batches taken), leaving out the batch of step 5
    log.rewind(to_step=3, last_step=5, steps=1)
    step["n"], where["epoch"], where["taken"] = 3, 0, 3
    again = []
    for _ in range(4):
        again.append(next(it)[0].tolist())
        step["n"] += 1
    assert again == [seen[3], seen[5], seen[6], seen[7]]  # step 5's batch is gone, the rest in order


def test_run_batches_refuses_a_loader_whose_order_does_not_replay():
    run = workers.training.Run(LocalSession(), load_spec(small_spec(scaling={"num_workers": 1})), job_id="gw-x")
    loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="does not replay its order.*DistributedSampler"):
        run.batches(loader)


# ------------------------------------------------------------------ one process
def _poison_spec(steps, **overrides):
    return small_spec(
        scaling={"num_workers": overrides.pop("world_size", 1)},
        data={
            "name": "tests.workers.poison:poisoned_data",
            "options": {"steps": steps, "world_size": overrides.pop("ranks", 1), "batch_size": BATCH},
        },
        optimizer={"name": "sgd", "lr": 0.1},
        max_steps=120,
        validation={"every_steps": 40},
        checkpoint={"every_steps": 25, "keep": 1},
        **overrides,
    )


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_the_built_in_loop_rewinds_past_a_poisoned_batch_and_never_feeds_it_again(tmp_path):
    spec = load_spec(_poison_spec([POISON_STEP], on_spike="rewind"))
    trainer = Trainer(spec, LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    out = trainer.train()
    assert out.steps == 120 and math.isfinite(out.val_loss)
    assert trainer.run.rewinds == 1
    (rewind,) = [r for r in _history(tmp_path) if r.get("event") == "rewind"]
    n_train = len(build_data(spec.data, spec.seed).train)  # type: ignore[arg-type]
    poisoned = poisoned_indices(n_train, [POISON_STEP], 1, BATCH, spec.seed)[POISON_STEP]
    assert rewind["step"] == POISON_STEP and rewind["to_step"] == 50 and rewind["cause"] == "loss_spike"
    assert [(b["step"], b["indices"]) for b in rewind["skipped"]] == [(POISON_STEP, poisoned)]
    fed = {tuple(b.describe()["indices"]) for b in trainer.run.batch_log.fed_batches}
    assert tuple(poisoned[0]) not in fed  # the poisoned batch never came back


def test_a_user_loop_rewinds_through_run_batches(tmp_path):
    enter_job(None)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    # the samples of batch 25 of every epoch (no shuffling, past the detectors' warm-up): huge and mislabelled
    x[200:208] *= 1000.0
    y[200:208] = 1 - y[200:208]
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=False))
    model = torch.nn.Linear(8, 2)
    run = gradwatch.start(max_steps=90, on_spike="rewind", serve_metrics=False, session=LocalSession())
    try:
        optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
        batches = run.batches(loader)
        saved = fed_poison = 0
        while run.step < run.max_steps:
            xb, yb = next(batches)
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            run.backward(loss, samples=len(xb))
            optimizer.step()
            fed_poison += bool((xb.abs() > 100).any())
            if run.step % 20 == 0 and run.step > saved:
                run.save_checkpoint()
                saved = run.step
        run.finish()
        # each epoch's batch 25 spikes once (steps 26, 57 and 88), is rewound and left out of that epoch
        assert run.rewinds == 3 and run.batch_log.skipped == {(0, 25), (1, 25), (2, 25)}
        assert run.step == 90 and fed_poison == 3
    finally:
        run.close(0)
        enter_job(None)


def test_a_poison_that_comes_back_every_batch_ends_the_run_failed_after_max_rewinds(tmp_path):
    steps = list(range(POISON_STEP, POISON_STEP + 12))
    spec = load_spec(_poison_spec(steps, on_spike="rewind", rewind={"max_rewinds": 2}))
    trainer = Trainer(spec, LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    with pytest.raises(DivergenceStop, match=r"loss spike at step 60 after 2 rewinds \(rewind.max_rewinds is 2\)"):
        trainer.train()
    assert trainer.run.rewinds == 2
    assert [r["step"] for r in _history(tmp_path) if r.get("event") == "rewind"] == [POISON_STEP, POISON_STEP]


# ------------------------------------------------------------------ real DDP: 2 workers on Ray
# The rewound run trains on the clean run's batches but one (left out), from the same start: its final
# validation loss is within this share of the clean run's; without the rewind the poison puts it far off.
CLEAN_TOLERANCE = 0.1


def _ddp_run(tmp_path, name, steps, **overrides):
    from workers.driver import run_job

    events: list[dict] = []
    spec = load_spec(_poison_spec(steps, world_size=2, ranks=2, name=name, **overrides))
    result = run_job(spec, storage_path=tmp_path / name, listeners=[lambda _status, new: events.extend(new)])
    return spec, result, events


def test_ddp_rewind_skips_the_poisoned_batch_and_ends_like_a_clean_run(local_ray, tmp_path):
    _, clean, clean_events = _ddp_run(tmp_path, "clean", [], on_spike="rewind")
    spec, rewound, events = _ddp_run(tmp_path, "rewound", [POISON_STEP], on_spike="rewind")
    _, alerted, _ = _ddp_run(tmp_path, "alerted", [POISON_STEP])

    assert clean.state == "succeeded" and not [e for e in clean_events if e.get("kind") == "rewind"]
    assert rewound.state == "succeeded", rewound.error
    assert rewound.steps == 120 and rewound.ranks[0].param_hash == rewound.ranks[1].param_hash
    (rewind,) = [e for e in events if e.get("kind") == "rewind"]
    n_train = len(build_data(load_spec(_poison_spec([])).data, spec.seed).train)  # type: ignore[arg-type]
    poisoned = poisoned_indices(n_train, [POISON_STEP], 2, BATCH, spec.seed)[POISON_STEP]
    assert (rewind["name"], rewind["step"], rewind["to_step"]) == ("loss_spike", POISON_STEP, 50)
    assert [(b["step"], b["indices"]) for b in rewind["skipped"]] == [(POISON_STEP, poisoned)]  # both ranks' samples
    assert "skipping the batches of steps 60" in rewind["detail"]
    off = abs(rewound.val_loss - clean.val_loss) / clean.val_loss
    assert off < CLEAN_TOLERANCE, (rewound.val_loss, clean.val_loss)
    # the poison does hurt: the same run without the rewind ends far from the clean one (or fails)
    assert alerted.val_loss is None or abs(alerted.val_loss - clean.val_loss) / clean.val_loss > CLEAN_TOLERANCE, (
        alerted.val_loss,
        clean.val_loss,
    )


def test_ddp_a_poison_on_every_batch_after_the_rewind_ends_failed_after_max_rewinds(local_ray, tmp_path):
    steps = list(range(POISON_STEP, POISON_STEP + 12))
    _, result, events = _ddp_run(tmp_path, "recurring", steps, on_spike="rewind", rewind={"max_rewinds": 2})
    assert result.state == "failed"
    assert "loss spike at step 60 after 2 rewinds (rewind.max_rewinds is 2)" in (result.error or ""), result.error
    rewinds = [e for e in events if e.get("kind") == "rewind"]
    assert [(e["step"], e["skipped"][0]["step"]) for e in rewinds] == [(POISON_STEP, POISON_STEP)] * 2
