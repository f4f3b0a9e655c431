"""The README's demo: a tiny Llama trained with zero-all the way Hugging Face users train with DeepSpeed.

    python examples/demo.py --out demo-output        # what `nox -s demo` runs

1. builds the local stand-ins for hub downloads (tokenizer, parquet dataset, model config);
2. launches examples/clm/main.py on 2 CPU workers with ds-launch (every GPU, when there are
   any): ZeRO-2, bf16, 250 steps with a progress bar, perplexity before and after,
   an engine checkpoint, the Hugging Face export, TensorBoard events;
3. draws the loss and perplexity with ``ds-monitor plot``;
4. loads the export with ``AutoModelForCausalLM.from_pretrained`` and answers a question;
5. prints the absolute path of everything it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main() -> int:
    """Run the demo; returns the exit code of the first step that fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="folder for everything the demo writes (emptied first)")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps (an epoch is 225)")
    parser.add_argument("--workers", type=int, default=2, help="CPU worker processes when there is no GPU")
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out / "run", ignore_errors=True)
    t0 = time.perf_counter()

    from make_assets import make_all

    print(f"[1/4] local assets (tokenizer, dataset, model config) -> {out / 'assets'}", flush=True)
    assets = make_all(out / "assets")

    gpus = _gpus()
    launch = ["ds-launch", *([] if gpus else ["--num_gpus", str(args.workers)])]
    run = out / "run"
    cmd = [
        *launch,
        str(HERE / "clm" / "main.py"),
        "--model_name_or_path", str(assets["llama"]),
        "--data_path", str(assets["clm_data"]),
        "--data_split", "9,1,0",
        "--data_output_path", str(out / "data_cache"),
        "--max_seq_len", "48",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32",
        "--learning_rate", "3e-3",
        "--weight_decay", "0.01",
        "--lr_scheduler_type", "cosine",
        "--num_warmup_steps", "20",
        "--num_train_epochs", "2",
        "--max_steps", str(args.steps),
        "--zero_stage", str(args.zero_stage),
        "--dtype", args.dtype,
        "--seed", "1234",
        "--output_dir", str(run),
        "--checkpoint_dir", str(run / "checkpoints"),
        "--enable_tensorboard",
        "--progress", "on",
    ]  # fmt: skip
    where = f"{gpus} GPU(s)" if gpus else f"{args.workers} CPU workers (gloo)"
    print(f"[2/4] training on {where}: {' '.join(cmd[:4])} ...", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    launched = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    if rc:
        print(f"demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    train_done = time.perf_counter()

    print("[3/4] plotting with ds-monitor", flush=True)
    plot = run / "loss.png"
    rc = subprocess.call(
        ["ds-monitor", "plot", str(run / "tensorboard"), "--out", str(plot), "--metric", "Eval/perplexity",
         "--title", "tiny Llama, zero-all ZeRO-2 bf16"]
    )  # fmt: skip
    if rc:
        print(f"demo: ds-monitor plot failed (exit code {rc})", file=sys.stderr)
        return rc

    print("[4/4] loading the export with transformers", flush=True)
    metrics = json.loads((run / "metrics.json").read_text())
    hf_dir = metrics["outputs"]["hf_model"]
    answer = _ask(hf_dir, "Human: What is the capital of Avalon? Assistant:")
    total = time.perf_counter() - t0

    rate = metrics.get("samples_per_sec")
    print()
    print(f"Trained {metrics['model']} ({metrics['params'] / 1e6:.2f}M params) for {metrics['steps']} steps on "
          f"{metrics['world_size']} ranks, ZeRO-{metrics['zero_stage']}, {metrics['dtype']}: "
          f"{rate:.0f} samples/s; demo wall time {total:.0f} s, of which the training launch "
          f"{train_done - launched:.0f} s ({metrics['train_seconds']:.0f} s of steps).")  # fmt: skip
    print(f"Eval perplexity {metrics['perplexity_before']:.1f} before, {metrics['perplexity_after']:.2f} after.")
    print(f"The exported model answers: 'What is the capital of Avalon?' ->{answer}")
    print()
    print("Written:")
    rows = [
        ("Hugging Face model", hf_dir),
        ("engine checkpoint", metrics["outputs"].get("checkpoint", "")),
        ("TensorBoard log", metrics["outputs"].get("tensorboard", "")),
        ("loss plot (PNG)", str(plot)),
        ("metrics (JSON)", metrics["outputs"]["metrics"]),
        ("tokenized data cache", str(out / "data_cache")),
        ("tokenizer, dataset, config", str(out / "assets")),
    ]
    for name, path in rows:
        print(f"  {name:<28} {path}")
    print()
    print("Load it:")
    print(
        f"  python -c \"from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('{hf_dir}'); print(m)\""
    )
    print(f"See the curves: tensorboard --logdir {metrics['outputs'].get('tensorboard', '')}")
    return 0


def _ask(model_dir: str, prompt: str) -> str:
    """Greedy answer of the exported model to ``prompt`` (the proof that the export is the trained model)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


if __name__ == "__main__":
    raise SystemExit(main())
