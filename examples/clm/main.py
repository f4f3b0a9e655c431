"""Train a causal LM (Llama) with zero-all: DeepSpeed-Chat's step-1 (SFT) script, same flags.

    ds-launch --num_gpus 2 examples/clm/main.py --model_name_or_path assets/tiny-llama \
        --data_path assets/data/rm_pairs.parquet --data_split 9,1,0 --zero_stage 2 --dtype bf16 \
        --output_dir out/clm --enable_tensorboard

Each sample is ``prompt + chosen + eos``, padded to --max_seq_len; padding is not scored
(labels -100). Perplexity on the eval part is measured before training and after every epoch.
The model is written in Hugging Face format to OUTPUT_DIR/hf_model. Only the import differs
from a DeepSpeed script: ``import zero_all as deepspeed``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if os.environ.get("EXAMPLE_ENGINE") == "deepspeed":  # this same script on DeepSpeed, to time the two
    import deepspeed
else:
    import zero_all as deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_utils as U

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def parse_args(argv: list[str] | None = None):
    """The flags (see hf_utils.common_parser) plus the two column names."""
    p = U.common_parser(
        __doc__.splitlines()[0],
        default_model=str(ASSETS / "tiny-llama"),
        default_data=str(ASSETS / "data" / "rm_pairs.parquet"),
    )
    p.add_argument("--prompt_column", default="prompt", help="(ours) the prompt column")
    p.add_argument("--response_column", default="chosen", help="(ours) the answer column (DeepSpeed-Chat SFT: chosen)")
    p.set_defaults(max_seq_len=48)
    args = p.parse_args(argv)
    U.check_args(args)
    return args


def tokenize_fn(tokenizer: Any, args) -> Any:
    """Batched map: ``prompt + response + eos`` -> input_ids, attention_mask, labels (pad -> -100)."""

    def tokenize(rows: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        texts = [
            p + r + tokenizer.eos_token
            for p, r in zip(rows[args.prompt_column], rows[args.response_column], strict=True)
        ]
        enc = tokenizer(texts, max_length=args.max_seq_len, padding="max_length", truncation=True)
        enc["labels"] = [
            [t if m else -100 for t, m in zip(ids, mask, strict=True)]
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
        ]
        return dict(enc)

    return tokenize


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the script; returns the summary (and, for tests, the engine under "engine")."""
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    U.thread_count()
    U.quiet_libraries()
    deepspeed.init_distributed()
    U.set_random_seed(args.seed)

    tokenizer = U.load_tokenizer(args.model_name_or_path)
    model = U.create_hf_model(AutoModelForCausalLM, args.model_name_or_path, tokenizer)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_ds, eval_ds = U.prepare_splits(
        args,
        tokenizer,
        kind="clm",
        columns=[args.prompt_column, args.response_column],
        tokenize=tokenize_fn(tokenizer, args),
    )
    total_steps, _ = U.planned_steps(args, len(train_ds))
    ds_config = U.engine_config(args, total_steps)
    optimizer, params, lr_scheduler = U.client_optimizer_and_scheduler(args, model, ds_config, total_steps)

    engine, _, train_loader, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        lr_scheduler=lr_scheduler,
        training_data=train_ds,
        # The config is already resolved from the flags (and --deepspeed_config): pass it alone, since
        # args.deepspeed_config together with config= is refused (as DeepSpeed refuses it).
        config=ds_config,
    )
    n_params = sum(p.numel() for p in model.parameters())
    U.print_rank_0(
        f"{type(model).__name__} {n_params / 1e6:.2f}M params | {engine.world_size} ranks on {engine.device} | "
        f"ZeRO-{engine.zero_optimization_stage()} | {args.dtype} | batch {engine.train_batch_size()} = "
        f"{engine.train_micro_batch_size_per_gpu()} x {engine.gradient_accumulation_steps()} x {engine.world_size} | "
        f"{len(train_ds)} train / {len(eval_ds)} eval samples | {total_steps} steps"
    )
    evals = U.eval_loader(eval_ds, args)
    ppl_history = []

    def evaluate(epoch: int) -> None:
        loss, ppl = U.evaluate(engine, evals, args.eval_max_batches)
        ppl_history.append({"epoch": epoch, "step": engine.global_steps, "eval_loss": loss, "perplexity": ppl})
        engine.monitor.write_events(
            [("Eval/loss", loss, engine.global_samples), ("Eval/perplexity", ppl, engine.global_samples)]
        )
        U.print_rank_0(f"epoch {epoch} step {engine.global_steps}: eval loss {loss:.4f}, perplexity {ppl:.2f}")

    evaluate(0)
    stats = U.train(engine, train_loader, args, total_steps, evaluate)
    if ppl_history[-1]["step"] != engine.global_steps:
        evaluate(-1)
    summary = {
        "model": type(model).__name__,
        "params": n_params,
        "world_size": engine.world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "dtype": args.dtype,
        "steps": engine.global_steps,
        "train_batch_size": engine.train_batch_size(),
        "perplexity_before": ppl_history[0]["perplexity"],
        "perplexity_after": ppl_history[-1]["perplexity"],
        "evaluations": ppl_history,
        **stats,
    }
    summary = U.finish(args, engine, tokenizer, summary)
    return {**summary, "engine": engine, "tokenizer": tokenizer, "eval_dataset": eval_ds}


if __name__ == "__main__":
    main()
