"""The Hugging Face Trainer's ``train_samples_per_second``: zero-all against DeepSpeed and the Trainer's own DDP.

One script, one model, one dataset, one ``TrainingArguments``; only the route differs:

  ddp        ``transformers.Trainer`` as it is (accelerate's DistributedDataParallel)
  zero-all   ``zero_all.integrations.transformers.Trainer`` with the ds_config below
  deepspeed  ``transformers.Trainer`` with ``deepspeed=`` the same ds_config (when ``deepspeed`` imports,
             here or in ``--ds-python``'s environment)

The ds_config is the Hugging Face ZeRO-2 one with "auto" everywhere (optimizer and schedule from the
Trainer). Each route runs in fresh processes (``torch.distributed.run``, gloo, 2 ranks by default); the
figure is the Trainer's own ``train_samples_per_second`` (its ``train()`` wall time, engine set-up
included), and ``--steps`` optimizer steps after one discarded warm-up run per route.

    python benchmarks/trainer.py [--quick] [--json PATH] [--ds-python PATH] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ZERO2_AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": "auto",
        "contiguous_gradients": True,
    },
}


def _worker(args: argparse.Namespace) -> None:
    """One rank of one route (started by torch.distributed.run)."""
    # This folder holds benchmarks named like our packages (act_ckpt.py...): keep them off the import path.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import datasets
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A route that stops making progress prints every thread's stack and exits, instead of hanging.
    faulthandler.dump_traceback_later(args.route_timeout, exit=True)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")  # every route reuses it (DeepSpeed on CPU would pick another backend)
    tok = AutoTokenizer.from_pretrained(args.assets + "/tiny-llama")
    tok.pad_token = tok.eos_token
    # Rank 0 builds the Arrow cache (ours, beside the assets) first; the tokenized set stays in memory.
    cache = args.assets + "/hf_cache"
    if dist.get_rank() == 0:
        datasets.load_dataset("parquet", data_files=args.assets + "/data/rm_pairs.parquet", cache_dir=cache)
    dist.barrier()
    raw = datasets.load_dataset(
        "parquet", data_files=args.assets + "/data/rm_pairs.parquet", split="train", cache_dir=cache
    )

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        texts = [p + c + tok.eos_token for p, c in zip(batch["prompt"], batch["chosen"], strict=True)]
        enc = tok(texts, max_length=args.seq, padding="max_length", truncation=True)
        enc["labels"] = [list(x) for x in enc["input_ids"]]
        return enc

    train = raw.map(tokenize, batched=True, remove_columns=raw.column_names, keep_in_memory=True)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    results = []
    for run in ("warm-up", "measured"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        kw: dict[str, Any] = {
            "output_dir": tempfile.mkdtemp(prefix="trainer-bench-"),
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "max_steps": 2 if run == "warm-up" else args.steps,
            "logging_steps": 10**6,
            "save_strategy": "no",
            "report_to": [],
            "seed": 0,
            "use_cpu": True,
            "disable_tqdm": True,
            "bf16": args.dtype == "bf16",
        }
        if args.route == "zero-all":
            from zero_all.integrations.transformers import ZeroAllTrainer

            trainer = ZeroAllTrainer(
                model=model, args=TrainingArguments(**kw), train_dataset=train, zero_all_config=dict(ZERO2_AUTO)
            )
        elif args.route == "deepspeed":
            trainer = Trainer(
                model=model, args=TrainingArguments(deepspeed=dict(ZERO2_AUTO), **kw), train_dataset=train
            )
        else:
            trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=train)
        out = trainer.train()
        results.append(out.metrics)
    if dist.get_rank() == 0:
        m = results[-1]
        Path(args.out).write_text(
            json.dumps(
                {
                    "route": args.route,
                    "train_samples_per_second": m["train_samples_per_second"],
                    "train_runtime": m["train_runtime"],
                    "train_loss": m["train_loss"],
                    "wrapped": type(trainer.model_wrapped).__name__,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a DDP reducer / gloo destructor left to run after the other rank
    # has exited can wait on it forever (seen here).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _deepspeed_python(explicit: str | None) -> str | None:
    """A Python whose environment imports deepspeed and transformers: ``--ds-python``, this one, or none."""
    candidates = [explicit] if explicit else [sys.executable]
    for py in candidates:
        if (
            py
            and subprocess.run([py, "-c", "import deepspeed, transformers, accelerate"], capture_output=True).returncode
            == 0
        ):
            return py
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny Llama, few steps (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--ds-python", help="a Python with deepspeed + transformers installed, for the DeepSpeed row")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--route-timeout", type=int, default=900, help="seconds one route may take before it is stopped")
    ap.add_argument("--routes", default="ddp,zero-all,deepspeed", help="comma-separated subset to run")
    # internal: one worker
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--route", help=argparse.SUPPRESS)
    ap.add_argument("--assets", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = {"hidden": 128, "layers": 4, "batch": 8, "seq": 64, "steps": 20} if args.quick else {
        "hidden": 256, "layers": 8, "batch": 8, "seq": 128, "steps": 40}  # fmt: skip
    for k, v in size.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        _worker(args)
        return

    try:
        import accelerate  # noqa: F401
        import datasets  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"trainer benchmark skipped: {e.name} is not installed (pip install 'zero-all[trainer]')")
        return
    sys.path.insert(0, str(ROOT / "examples" / "tools"))
    from make_assets import make_all

    assets = make_all(ROOT / "bench-results" / "trainer-assets", clm_rows=1000, mt_rows=10)
    ds_py = _deepspeed_python(args.ds_python)
    routes = [("ddp", sys.executable), ("zero-all", sys.executable)]
    if ds_py:
        routes.append(("deepspeed", ds_py))
    else:
        print("deepspeed (with transformers) is not importable here and no --ds-python: DeepSpeed row skipped")
    wanted = args.routes.split(",")
    routes = [(r, p) for r, p in routes if r in wanted]
    rows = []
    for route, py in routes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--standalone",
               __file__, "--worker", "--route", route, "--assets", str(Path(assets["llama"]).parent), "--out", out,
               "--dtype", args.dtype, "--threads", str(args.threads), "--route-timeout", str(args.route_timeout)]  # fmt: skip
        cmd += [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "batch", "seq", "steps")]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"{route}: {time.perf_counter() - t0:.0f} s (processes, imports, data, both runs)", flush=True)
        if proc.returncode != 0:
            print(f"{route}: failed\n{proc.stderr[-3000:]}")
            continue
        rows.append(json.loads(Path(out).read_text()))
    base = next((r["train_samples_per_second"] for r in rows if r["route"] == "ddp"), None)
    print(
        f"Trainer, tiny Llama {args.layers}x{args.hidden}, batch {args.batch}x{args.seq} per rank, {args.nproc} "
        f"ranks (gloo), {args.dtype}, {args.steps} steps, ZeRO-2 'auto' config"
    )
    print(f"{'route':<10} {'wrapped as':<24} {'samples/s':>10} {'vs DDP':>7} {'train_loss':>10}")
    for r in rows:
        ratio = r["train_samples_per_second"] / base if base else float("nan")
        print(
            f"{r['route']:<10} {r['wrapped']:<24} {r['train_samples_per_second']:>10.2f} {ratio:>6.2f}x {r['train_loss']:>10.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
