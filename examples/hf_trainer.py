"""A Hugging Face Trainer run watched by gradwatch: a tiny GPT-2 built from its config (nothing is
downloaded) learns a synthetic token sequence on the CPU.

    python examples/hf_trainer.py                       # one process
    torchrun --nproc-per-node 2 examples/hf_trainer.py --job-id my-run   # DDP, every rank the same id

One line on stderr gives rank 0's /metrics URL and the run directory ($GRADWATCH_STORAGE_PATH/<job id>,
else ./runs/<job id>); afterwards `gradwatch report <run directory>` draws the run and
`gradwatch replay <run directory>/history.jsonl` replays its detectors.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from gradwatch.integrations.transformers import GradwatchCallback

VOCAB, LENGTH = 64, 16


def sequences(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token runs that count up by a per-sequence stride (mod VOCAB): the next token is learnable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=g)
    stride = torch.randint(1, 4, (count, 1), generator=g)
    tokens = (start + stride * torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": t, "labels": t} for t in tokens]


def main(argv: list[str] | None = None, callbacks: Sequence[transformers.TrainerCallback] = ()) -> transformers.Trainer:
    """Train and return the Trainer; `callbacks` run before gradwatch's at each event."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--job-id", help="the run's id (default: a new gw- id; under DDP give every rank the same)")
    parser.add_argument("--prometheus-sd-dir", type=Path, help="write each rank's endpoint there as a file_sd file")
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=5.0,
        help="at the end, /metrics stays up until scraped again, at most this long",
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH)
    model = transformers.GPT2LMHeadModel(config)
    gradwatch = GradwatchCallback(
        job_id=args.job_id,
        sd_dir=args.prometheus_sd_dir,
        telemetry={"interval": 10, "grace_seconds": args.grace_seconds},
    )
    training_args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-"),  # the Trainer's own files; gradwatch's are apart
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=10,
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 4),
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=sequences(1024, seed=1),
        eval_dataset=sequences(64, seed=2),
        callbacks=[*callbacks, gradwatch],
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
