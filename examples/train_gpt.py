"""Train a small GPT with zero-all, DeepSpeed-style: the README's demo.

    ds-launch --num_gpus 2 examples/train_gpt.py --steps 30 --save-dir /tmp/ckpt
    ds-launch --num_gpus 2 examples/train_gpt.py --steps 60 --save-dir /tmp/ckpt --resume

The loop is exactly a DeepSpeed loop; only the import differs (``import zero_all as deepspeed``).
On CPU the ranks talk over gloo; with GPUs each rank takes one and they use NCCL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import zero_all as deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig, make_token_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("ds_config_zero2_bf16.json")))
    parser.add_argument("--steps", type=int, default=30, help="train until this many optimizer steps")
    parser.add_argument("--save-dir", default=None, help="save a checkpoint here at the end")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    parser.add_argument("--samples", type=int, default=4096, help="generated training sequences")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher (unused: LOCAL_RANK is read)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    cfg = GPTConfig()
    torch.manual_seed(0)  # same initial weights on every rank
    model = GPT(cfg)
    data = make_token_data(args.samples, cfg)
    dataset = torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])

    engine, _, loader, _ = deepspeed.initialize(model=model, training_data=dataset, config=args.config)
    rank = engine.global_rank
    if args.resume:
        path, client_state = engine.load_checkpoint(args.save_dir)
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps} (client_state {client_state})", flush=True)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(
            f"GPT {n / 1e6:.2f}M params | {engine.world_size} ranks on {engine.device} | "
            f"ZeRO-{engine.zero_optimization_stage()} | batch {engine.train_batch_size()} "
            f"= {engine.train_micro_batch_size_per_gpu()} x {engine.gradient_accumulation_steps()} x {engine.world_size}",
            flush=True,
        )

    t0 = time.perf_counter()
    epoch = 0
    engine.train()
    while engine.global_steps < args.steps:
        if loader.sampler is not None and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for x, y in loader:
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()  # prints step/loss/lr every steps_per_print steps
            if engine.global_steps >= args.steps:
                break
        epoch += 1
    if rank == 0:
        print(f"trained to step {engine.global_steps} in {time.perf_counter() - t0:.1f}s", flush=True)

    if args.save_dir:
        engine.save_checkpoint(args.save_dir, client_state={"epoch": epoch})
        if rank == 0:
            print(f"saved checkpoint {args.save_dir}/global_step{engine.global_steps}", flush=True)


if __name__ == "__main__":
    main()
