"""Train a text-to-text model (T5) on translation pairs with zero-all, DeepSpeed-Chat-style flags.

    ds-launch --num_gpus 2 examples/seq2seq/main.py --model_name_or_path assets/tiny-t5 \
        --data_path assets/data/translation.jsonl --source_lang en --target_lang zx \
        --deepspeed_config examples/deepspeed_configs/ds_config_zero2_auto.json --output_dir out/t5

The data has the WMT layout (a ``translation`` column of ``{lang: text}``), as
``run_translation.py`` reads it. Sources get --source_prefix (T5's task prefix) and an eos;
targets are the labels (padding -> -100); T5 shifts them right into the decoder input itself.
After training, greedy ``generate`` on a few eval samples gives an exact-match score.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import zero_all as deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_utils as U

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def parse_args(argv: list[str] | None = None):
    """The common flags plus run_translation.py's language and prefix flags."""
    p = U.common_parser(
        __doc__.splitlines()[0],
        default_model=str(ASSETS / "tiny-t5"),
        default_data=str(ASSETS / "data" / "translation.jsonl"),
    )
    p.add_argument("--source_lang", default="en")
    p.add_argument("--target_lang", default="zx")
    p.add_argument("--source_prefix", default="translate English to Zorbish: ", help="T5's task prefix")
    p.add_argument("--max_target_len", type=int, default=None, help="(ours) label tokens; default --max_seq_len")
    p.add_argument("--generate_samples", type=int, default=32, help="(ours) eval samples to translate at the end")
    p.set_defaults(max_seq_len=32, learning_rate=3e-3, num_warmup_steps=10)
    args = p.parse_args(argv)
    U.check_args(args)
    args.max_target_len = args.max_target_len or args.max_seq_len
    return args


def tokenize_fn(tokenizer: Any, args) -> Any:
    """Batched map: ``prefix + source + eos`` -> input_ids/attention_mask; ``target + eos`` -> labels."""

    def tokenize(rows: dict[str, list[dict[str, str]]]) -> dict[str, list[list[int]]]:
        pairs = rows["translation"]
        for i, pair in enumerate(pairs):
            if args.source_lang not in pair or args.target_lang not in pair:
                raise SystemExit(
                    f"--data_path: row {i} of a batch has translation keys {sorted(pair)}; "
                    f"--source_lang {args.source_lang!r} / --target_lang {args.target_lang!r} must be among them"
                )
        sources = [args.source_prefix + p[args.source_lang] + tokenizer.eos_token for p in pairs]
        targets = [p[args.target_lang] + tokenizer.eos_token for p in pairs]
        enc = tokenizer(sources, max_length=args.max_seq_len, padding="max_length", truncation=True)
        lab = tokenizer(text_target=targets, max_length=args.max_target_len, padding="max_length", truncation=True)
        enc["labels"] = [
            [t if m else -100 for t, m in zip(ids, mask, strict=True)]
            for ids, mask in zip(lab["input_ids"], lab["attention_mask"], strict=True)
        ]
        return dict(enc)

    return tokenize


@torch.no_grad()
def exact_match(engine: Any, tokenizer: Any, eval_ds: Any, n: int, max_len: int) -> float | None:
    """Greedy-decoded translations of the first ``n`` eval samples that equal the reference (rank 0)."""
    if n <= 0 or len(eval_ds) == 0:
        return None
    rows = eval_ds[: min(n, len(eval_ds))]
    engine.module.eval()
    out = engine.module.generate(
        input_ids=rows["input_ids"].to(engine.device),
        attention_mask=rows["attention_mask"].to(engine.device),
        max_new_tokens=max_len,
        do_sample=False,
    )
    engine.module.train()
    refs = [[t for t in lab.tolist() if t != -100] for lab in rows["labels"]]
    hyps = tokenizer.batch_decode(out, skip_special_tokens=True)
    gold = tokenizer.batch_decode(refs, skip_special_tokens=True)
    return sum(h.strip() == g.strip() for h, g in zip(hyps, gold, strict=True)) / len(gold)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the script; returns the summary (and, for tests, the engine under "engine")."""
    from transformers import AutoModelForSeq2SeqLM

    args = parse_args(argv)
    U.thread_count()
    U.quiet_libraries()
    deepspeed.init_distributed()
    U.set_random_seed(args.seed)

    tokenizer = U.load_tokenizer(args.model_name_or_path)
    model = U.create_hf_model(AutoModelForSeq2SeqLM, args.model_name_or_path, tokenizer)
    model.config.decoder_start_token_id = tokenizer.pad_token_id  # T5: the decoder starts from pad
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_ds, eval_ds = U.prepare_splits(
        args, tokenizer, kind="seq2seq", columns=["translation"], tokenize=tokenize_fn(tokenizer, args)
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
        f"ZeRO-{engine.zero_optimization_stage()} | bf16={engine.config.bf16.enabled} | batch {engine.train_batch_size()} | "
        f"{len(train_ds)} train / {len(eval_ds)} eval pairs | {total_steps} steps"
    )
    evals = U.eval_loader(eval_ds, args)
    ppl_history = []

    def evaluate(epoch: int) -> None:
        loss, ppl = U.evaluate(engine, evals, args.eval_max_batches, causal=False)
        ppl_history.append({"epoch": epoch, "step": engine.global_steps, "eval_loss": loss, "perplexity": ppl})
        engine.monitor.write_events(
            [("Eval/loss", loss, engine.global_samples), ("Eval/perplexity", ppl, engine.global_samples)]
        )
        U.print_rank_0(f"epoch {epoch} step {engine.global_steps}: eval loss {loss:.4f}, perplexity {ppl:.2f}")

    evaluate(0)
    stats = U.train(engine, train_loader, args, total_steps, evaluate)
    if ppl_history[-1]["step"] != engine.global_steps:
        evaluate(-1)
    em = exact_match(engine, tokenizer, eval_ds, args.generate_samples, args.max_target_len) if U.rank() == 0 else None
    if em is not None:
        U.print_rank_0(f"exact match on {min(args.generate_samples, len(eval_ds))} eval pairs: {em:.2%}")
    summary = {
        "model": type(model).__name__,
        "params": n_params,
        "world_size": engine.world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "ds_config": engine.config.raw,
        "steps": engine.global_steps,
        "perplexity_before": ppl_history[0]["perplexity"],
        "perplexity_after": ppl_history[-1]["perplexity"],
        "exact_match": em,
        "evaluations": ppl_history,
        **stats,
    }
    summary = U.finish(args, engine, tokenizer, summary)
    return {**summary, "engine": engine, "tokenizer": tokenizer, "eval_dataset": eval_ds}


if __name__ == "__main__":
    main()
