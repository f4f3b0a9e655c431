"""Rank functions for test_trainer.py: the Hugging Face Trainer, with and without zero-all, on 2 gloo ranks.

Every case builds its model from the tiny local configs (examples/tools/make_assets.py) with a
fixed seed, tokenizes a small slice of the local data with ``datasets`` and trains through the
real ``transformers.Trainer`` / ``Seq2SeqTrainer``. The per-step losses come from the Trainer's
own log history (``logging_steps=1``: each is the mean over the ranks of that optimizer step).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

SEQ = 32


def _quiet() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cache(assets: dict[str, str]) -> str:
    # The test's own datasets cache (next to its assets), not the user-wide one that other jobs lock;
    # tokenized sets stay in memory, so the two ranks never write the same cache file.
    return str(Path(assets["clm_data"]).parent / "hf_cache")


def clm_data(assets: dict[str, str], rows: int) -> tuple[Any, Any]:
    """``rows`` prompt+answer texts of the reward-model parquet, tokenized to SEQ tokens, labels masked at padding."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["llama"])
    tok.pad_token = tok.eos_token
    ds = datasets.load_dataset("parquet", data_files=assets["clm_data"], split="train", cache_dir=_cache(assets))
    ds = ds.select(range(rows))

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        texts = [p + c + tok.eos_token for p, c in zip(batch["prompt"], batch["chosen"], strict=True)]
        enc = tok(texts, max_length=SEQ, padding="max_length", truncation=True)
        enc["labels"] = [
            [t if m else -100 for t, m in zip(ids, mask, strict=True)]
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
        ]
        return enc

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, keep_in_memory=True), tok


def llama(assets: dict[str, str], seed: int) -> Any:
    """The tiny Llama from its config, initialised from ``seed`` (the same weights on every rank and every run)."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(AutoConfig.from_pretrained(assets["llama"]))


class _Losses:
    """The ``loss`` of each logged step, from the Trainer's log history."""

    @staticmethod
    def of(trainer: Any) -> dict[int, float]:
        return {h["step"]: float(h["loss"]) for h in trainer.state.log_history if "loss" in h}

    @staticmethod
    def grad_norms(trainer: Any) -> dict[int, float]:
        return {h["step"]: float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h}

    @staticmethod
    def lrs(trainer: Any) -> dict[int, float]:
        return {h["step"]: float(h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h}


def _args(cls: Any, out: Path, **kw: Any) -> Any:
    base = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-3,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "lr_scheduler_type": "linear",
        "max_steps": 6,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 11,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    base.update(kw)
    return cls(**base)


ZERO1 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"},
}


def llama_runs(rank: int, world_size: int, root: str, assets: dict[str, str]) -> dict[str, Any]:
    """The tiny Llama: the Trainer's DDP path and zero-all ZeRO-1 (fp32, same seed and data); then bf16 with resume."""
    from transformers import Trainer, TrainingArguments

    from zero_all.integrations.transformers import ZeroAllTrainer

    _quiet()
    train, _ = clm_data(assets, 96)
    out: dict[str, Any] = {}

    # Two epochs of 12 micro-batches per rank with accumulation 5: steps of 5, 5 and a shorter 2 in each
    # epoch, so the Trainer's own boundary decisions (not a fixed count) must reach the engine.
    fp32 = dict(max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=5)
    ddp = Trainer(
        model=llama(assets, 5), args=_args(TrainingArguments, Path(root) / "ddp", **fp32), train_dataset=train
    )
    ddp.train()
    out["ddp"] = _Losses.of(ddp)
    out["ddp_lr"] = _Losses.lrs(ddp)
    out["ddp_norm"] = _Losses.grad_norms(ddp)
    out["ddp_type"] = type(ddp.model_wrapped).__name__

    z1 = ZeroAllTrainer(
        model=llama(assets, 5),
        args=_args(TrainingArguments, Path(root) / "z1", **fp32),
        train_dataset=train,
        zero_all_config=copy.deepcopy(ZERO1),
    )
    z1.train()
    out["z1"] = _Losses.of(z1)
    out["z1_lr"] = _Losses.lrs(z1)
    out["z1_norm"] = _Losses.grad_norms(z1)
    out["z1_engine"] = type(z1.model_wrapped).__name__
    out["z1_stage"] = z1.engine.zero_optimization_stage()
    out["z1_resolved"] = z1.zero_all_resolved_config

    # bf16, a checkpoint every 3 steps; then a fresh Trainer resumes from checkpoint-3.
    bf_args = dict(bf16=True, max_steps=6, save_strategy="steps", save_steps=3, save_only_model=False)
    full = ZeroAllTrainer(
        model=llama(assets, 5),
        args=_args(TrainingArguments, Path(root) / "bf16", **bf_args),
        train_dataset=train,
        zero_all_config=copy.deepcopy(ZERO1),
    )
    full.train()
    out["bf16"] = _Losses.of(full)
    out["bf16_dtype"] = str(next(full.model.parameters()).dtype)
    ckpt = Path(root) / "bf16" / "checkpoint-3"
    out["ckpt_files"] = sorted(p.name for p in ckpt.iterdir())
    resumed = ZeroAllTrainer(
        model=llama(assets, 99),  # different weights: everything must come from the checkpoint
        args=_args(TrainingArguments, Path(root) / "bf16", **bf_args),
        train_dataset=train,
        zero_all_config=copy.deepcopy(ZERO1),
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    out["resumed"] = _Losses.of(resumed)
    out["resumed_global_steps"] = resumed.engine.global_steps
    same = all(
        torch.equal(a, b)
        for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True)
    )
    out["resumed_weights_equal"] = same
    # ZeRO-3 in the same processes (one process start and transformers import fewer on CI).
    out["zero3"] = zero3_runs(rank, world_size, root, assets)
    return out


def mt_data(assets: dict[str, str], rows: int, tok: Any) -> Any:
    """Translation pairs (``translate English to Zorbish: ...`` -> the cipher), SEQ source and label tokens."""
    import datasets

    ds = datasets.load_dataset("json", data_files=assets["mt_data"], split="train", cache_dir=_cache(assets))
    ds = ds.select(range(rows))

    def tokenize(batch: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
        src = ["translate English to Zorbish: " + p["en"] + tok.eos_token for p in batch["translation"]]
        tgt = [p["zx"] + tok.eos_token for p in batch["translation"]]
        enc = tok(src, max_length=SEQ, padding="max_length", truncation=True)
        labels = tok(text_target=tgt, max_length=SEQ, padding="max_length", truncation=True)["input_ids"]
        enc["labels"] = [[t if t != tok.pad_token_id else -100 for t in row] for row in labels]
        return enc

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, keep_in_memory=True)


def t5_seq2seq(rank: int, world_size: int, root: str, assets: dict[str, str], config: str) -> dict[str, Any]:
    """Seq2SeqTrainer on the tiny T5 with the Hugging Face ZeRO-2 "auto" config, through the one-import route."""
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration

    # The one import a Seq2SeqTrainer script changes; its --deepspeed argument is then zero-all's.
    from zero_all.integrations.transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    _quiet()
    tok = AutoTokenizer.from_pretrained(assets["t5"])
    data = mt_data(assets, 192, tok).train_test_split(test_size=32, seed=0)
    torch.manual_seed(3)
    model = T5ForConditionalGeneration(AutoConfig.from_pretrained(assets["t5"]))
    args = _args(
        Seq2SeqTrainingArguments,
        Path(root) / "t5",
        deepspeed=config,
        bf16=True,
        max_steps=16,
        learning_rate=3e-3,
        warmup_steps=3,
        max_grad_norm=0.5,
        adam_beta2=0.98,
        weight_decay=0.0,
        eval_strategy="steps",
        eval_steps=8,
    )
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"], processing_class=tok
    )
    first_eval = trainer.evaluate()["eval_loss"]
    trainer.train()
    last_eval = trainer.evaluate()["eval_loss"]
    export = Path(root) / "t5" / "final"
    trainer.save_model(str(export))
    out: dict[str, Any] = {
        "losses": _Losses.of(trainer),
        "evals": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
        "first_eval": first_eval,
        "last_eval": last_eval,
        "stage": trainer.engine.zero_optimization_stage(),
        "resolved": trainer.zero_all_resolved_config,
        "world_size": world_size,
        "args": {
            "micro": args.per_device_train_batch_size,
            "gas": args.gradient_accumulation_steps,
            "lr": args.learning_rate,
            "betas": [args.adam_beta1, args.adam_beta2],
            "eps": args.adam_epsilon,
            "wd": args.weight_decay,
            "clip": args.max_grad_norm,
            "warmup": args.get_warmup_steps(16),
        },
        "deepspeed_arg": args.deepspeed,
        "engine_dtype": str(next(trainer.model.parameters()).dtype),
        "lr_last": trainer.engine.get_lr()[0],
    }
    if rank == 0:
        loaded = T5ForConditionalGeneration.from_pretrained(str(export), dtype="auto")
        mine, theirs = trainer.model.state_dict(), loaded.state_dict()
        out["export_files"] = sorted(p.name for p in export.iterdir())
        out["export_equal"] = all(torch.equal(mine[k], theirs[k]) for k in theirs) and set(theirs) <= set(mine)
        out["export_dtype"] = str(next(loaded.parameters()).dtype)
    return out


def write_json(path: str, obj: Any) -> None:
    """For debugging a failing case by hand."""
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def zero3_runs(rank: int, world_size: int, root: str, assets: dict[str, str]) -> dict[str, Any]:
    """ZeRO-3: from_pretrained_zero3 builds the model partitioned and loads the weights; the Trainer trains and exports."""
    import torch.distributed as dist
    from transformers import LlamaForCausalLM, TrainingArguments

    from zero_all.integrations.transformers import ZeroAllTrainer, from_pretrained_zero3
    from zero_all.zero import GatheredParameters

    _quiet()
    train, _ = clm_data(assets, 48)
    src = llama(assets, 5)
    folder = Path(root) / "pretrained"
    if rank == 0:
        src.save_pretrained(str(folder))
    dist.barrier()
    model = from_pretrained_zero3(LlamaForCausalLM, str(folder))
    out: dict[str, Any] = {}
    q = model.model.layers[0].self_attn.q_proj.weight
    out["local_numel"] = int(q.numel())  # the partitioned parameter holds no full tensor between uses
    loaded_equal = True
    for (_, p), (_, ref) in zip(model.named_parameters(), src.named_parameters(), strict=True):
        with GatheredParameters([p]):
            loaded_equal &= bool(torch.equal(p.data, ref.data))
    out["loaded_equal"] = loaded_equal
    cfg = {
        **ZERO1,
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
    }
    trainer = ZeroAllTrainer(
        model=model,
        args=_args(TrainingArguments, Path(root) / "z3", max_steps=3, gradient_accumulation_steps=1),
        train_dataset=train,
        zero_all_config=cfg,
    )
    trainer.train()
    out["losses"] = _Losses.of(trainer)
    out["stage"] = trainer.engine.zero_optimization_stage()
    out["resolved_z"] = trainer.zero_all_resolved_config["zero_optimization"]
    trainer.save_model(str(Path(root) / "z3" / "final"))
    full = trainer.engine.consolidated_state_dict(torch.float32)
    if rank == 0:
        loaded = LlamaForCausalLM.from_pretrained(str(Path(root) / "z3" / "final"))
        out["export_equal"] = all(torch.equal(v, full[k]) for k, v in loaded.state_dict().items() if k in full)
        out["export_changed"] = not torch.equal(loaded.model.norm.weight, src.model.norm.weight)
    return out
