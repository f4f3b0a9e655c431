"""Log a small plain-PyTorch training run with ds-monitor, then plot it.

    python packages/ds-monitor/examples/log_a_training_run.py --out-dir logs
    ds-monitor plot logs --out loss.png

Two runs with different peak learning rates are written under ``logs/<job_name>`` (TensorBoard
event files and CSV files side by side); ``ds-monitor plot logs`` overlays them.
"""

from __future__ import annotations

import argparse
import math

import torch

from ds_monitor import (
    MonitorMaster,
    ProgressBar,
    ThroughputTimer,
    Timers,
    count_params,
    dense_transformer_flops,
    tags,
)


def train(out_dir: str, job: str, lr_max: float, steps: int, batch: int) -> None:
    """One run: AdamW on a small MLP, warm-up + cosine LR, every figure sent to the monitors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr_max)
    target = torch.randn(32, 1)
    flops = dense_transformer_flops(count_params(model), batch)  # one "token" per sample for an MLP
    tput = ThroughputTimer(batch, flops_per_step=flops, synchronize=False)
    timers = Timers(synchronize=False)
    section = {"enabled": True, "output_path": out_dir, "job_name": job}
    loss_scale = 2.0**16
    with MonitorMaster(tensorboard=section, csv_monitor=section) as monitor, ProgressBar(steps, desc=job) as bar:
        for step in range(1, steps + 1):
            lr = lr_max * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            x = torch.randn(batch, 32)
            y = torch.tanh(x @ target)
            tput.start()
            timers("forward").start()
            loss = torch.nn.functional.mse_loss(model(x), y)
            timers("forward").stop()
            timers("backward").start()
            opt.zero_grad()
            loss.backward()
            timers("backward").stop()
            timers("step").start()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            timers("step").stop()
            tput.stop(global_step=True)
            if step % 50 == 0:
                loss_scale /= 2  # stands in for fp16 overflows, to fill the loss-scale panel
            samples = step * batch  # DeepSpeed logs against samples seen
            events = [
                (tags.TRAIN_LOSS, loss.item(), samples),
                (tags.LR, lr, samples),
                (tags.LOSS_SCALE, loss_scale, samples),
                (tags.GRAD_NORM, grad_norm, samples),
            ]
            monitor.write_events(events + tput.events(samples))
            bar.update(loss=loss, lr=lr, samples_per_sec=tput.avg_samples_per_sec() if tput.counted_steps else None)
            if step % 100 == 0:
                monitor.write_events(timers.events(["forward", "backward", "step"], samples, normalizer=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="logs")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    for job, lr in (("lr-1e-2", 1e-2), ("lr-3e-3", 3e-3)):
        train(args.out_dir, job, lr, args.steps, args.batch)
    print(f"now: ds-monitor plot {args.out_dir} --out loss.png")


if __name__ == "__main__":
    main()
