"""A plain Ray Train script that adds gradwatch telemetry in a few lines (no gradwatch service).

Each rank serves `/metrics` and, with `--sd-dir`, writes its endpoint there for Prometheus'
file_sd (`file_sd_configs: [{files: ["DIR/*.json"]}]`). The gradwatch lines are marked.

    python examples/custom/ray_train_plain.py --steps 300 --sd-dir /tmp/gradwatch-sd
"""

from __future__ import annotations

import argparse
import os

import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import gradwatch  # gradwatch


def train_func(config: dict) -> None:
    run = gradwatch.start(
        job_id=config["job_id"],
        max_steps=config["steps"],
        sd_dir=config["sd_dir"],  # gradwatch
        telemetry={"interval": 5, "grace_seconds": config["grace"]},
    )  # gradwatch
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer = run.watch(model, optimizer)  # gradwatch
    generator = torch.Generator().manual_seed(1 + ray.train.get_context().get_world_rank())
    true_w = torch.linspace(-1, 1, 16).unsqueeze(1)
    for _ in range(config["steps"]):
        x = torch.randn(64, 16, generator=generator)
        y = x @ true_w + 0.1 * torch.randn(64, 1, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        run.backward(loss, samples=len(x))  # gradwatch: instead of loss.backward()
        optimizer.step()
    run.finish()  # gradwatch
    run.close()  # gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--job-id", default="plain-ray-train")
    parser.add_argument("--sd-dir", default=None, help="Write each rank's endpoint here for Prometheus' file_sd.")
    parser.add_argument("--storage-path", default=os.path.abspath("runs"))
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=15.0,
        help="Keep /metrics up at the end until scraped again, at most this long.",
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # A Ray of its own unless RAY_ADDRESS names a cluster (never a stray one that runs on this machine). Its
    # dashboard serves the State API that Ray Train's placement-group cleaner polls: without it the cleaner
    # warns every few seconds that it cannot see the controller.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "job_id": args.job_id,
            "steps": args.steps,
            "sd_dir": args.sd_dir,
            "grace": args.grace_seconds,
        },
        scaling_config=ScalingConfig(num_workers=args.workers),
        run_config=RunConfig(name=args.job_id, storage_path=args.storage_path),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
