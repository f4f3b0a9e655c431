"""Rank functions for test_hf_examples.py (run in 2 gloo processes by zero_testkit)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_main(name: str) -> Any:
    """examples/<name>/main.py as a module (two scripts share the file name main.py)."""
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"{name}_main", EXAMPLES / name / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _common(out: Path, assets: dict[str, str], data: str, model: str, stage: int, steps: int) -> list[str]:
    return [
        "--model_name_or_path", assets[model],
        "--data_path", assets[data],
        "--data_split", "8,2,0",
        "--data_output_path", str(out.parent / "data_cache"),
        "--output_dir", str(out),
        "--zero_stage", str(stage),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "16",
        "--eval_max_batches", "2",
        "--num_warmup_steps", "2",
        "--progress", "off",
        "--seed", "7",
    ]  # fmt: skip


def clm_stages(rank: int, world_size: int, root: str, assets: dict[str, str]) -> dict[str, Any]:
    """The CLM example at ZeRO 0 and 2; on rank 0 the HF export is reloaded and its logits compared."""
    import torch
    from transformers import LlamaForCausalLM

    main = load_main("clm")
    results: dict[str, Any] = {}
    for stage in (0, 2):
        out = Path(root) / f"clm_z{stage}"
        argv = [*_common(out, assets, "clm_data", "llama", stage, 12), "--learning_rate", "3e-3", "--dtype", "bf16"]
        if stage == 2:
            argv += ["--checkpoint_dir", str(out / "ckpt"), "--enable_tensorboard"]
        summary = main.main(argv)
        engine = summary["engine"]
        res = {k: summary[k] for k in ("losses", "perplexity_before", "perplexity_after", "steps", "zero_stage")}
        res["lr_history_last"] = engine.get_lr()
        if rank == 0:
            loaded = LlamaForCausalLM.from_pretrained(summary["outputs"]["hf_model"], dtype="auto")
            res["loaded_dtype"] = str(next(loaded.parameters()).dtype)
            res["engine_dtype"] = str(next(engine.module.parameters()).dtype)
            mine, theirs = engine.module.state_dict(), loaded.state_dict()
            res["weights_equal"] = sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
            batch = summary["eval_dataset"][:4]
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with torch.no_grad():
                engine.module.eval()
                loaded.eval()
                ref = engine.module(**kw).logits
                got = loaded(**kw).logits
                # The engine cast the module's float buffers (RoPE's inv_freq) to bf16, as DeepSpeed's
                # module.bfloat16() does; from_pretrained keeps that buffer in fp32. Cast the same way,
                # the logits must be bit-identical.
                same = loaded.to(next(engine.module.parameters()).dtype)(**kw).logits
            res["max_logit_diff"] = float((ref.float() - got.float()).abs().max())
            res["max_logit"] = float(ref.float().abs().max())
            res["logits_equal"] = bool(torch.equal(ref, same))
            res["files"] = sorted(p.name for p in Path(summary["outputs"]["hf_model"]).iterdir())
            res["outputs"] = summary["outputs"]
        results[f"z{stage}"] = res
    return results


def seq2seq_auto(rank: int, world_size: int, root: str, assets: dict[str, str], config: str) -> dict[str, Any]:
    """The seq2seq example at ZeRO-2 with the Hugging Face "auto" config (CPU optimizer offload)."""
    import torch
    from transformers import T5ForConditionalGeneration

    main = load_main("seq2seq")
    out = Path(root) / "t5"
    argv = [*_common(out, assets, "mt_data", "t5", 2, 12), "--deepspeed_config", config, "--generate_samples", "4"]
    argv += ["--dtype", "bf16", "--learning_rate", "3e-3"]
    summary = main.main(argv)
    engine = summary["engine"]
    res = {k: summary[k] for k in ("losses", "perplexity_before", "perplexity_after", "zero_stage", "exact_match")}
    res["resolved"] = {
        "micro": engine.train_micro_batch_size_per_gpu(),
        "gas": engine.gradient_accumulation_steps(),
        "bf16": engine.config.bf16.enabled,
        "clip": engine.gradient_clipping(),
        "scheduler": type(engine.lr_scheduler).__name__,
        "offload": engine.config.raw["zero_optimization"].get("offload_optimizer"),
    }
    if rank == 0:
        loaded = T5ForConditionalGeneration.from_pretrained(summary["outputs"]["hf_model"], dtype="auto")
        rows = summary["eval_dataset"][:4]
        with torch.no_grad():
            engine.module.eval()
            kw = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "labels": rows["labels"]}
            res["logits_equal"] = bool(torch.equal(engine.module(**kw).logits, loaded(**kw).logits))
    return res


def hf_dataset_shards(rank: int, world_size: int, sizes: list[int]) -> dict[str, Any]:
    """initialize(training_data=datasets.Dataset): what each rank reads in two epochs, per dataset size."""
    import datasets
    import torch
    import torch.distributed as dist

    import zero_all

    out: dict[str, Any] = {}
    for n in sizes:
        ds = datasets.Dataset.from_dict({"idx": list(range(n)), "x": [[float(i), 1.0] for i in range(n)]})
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        engine, _, loader, _ = zero_all.initialize(
            model=model,
            training_data=ds,
            config={
                "train_micro_batch_size_per_gpu": 3,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                "seed": 5,
                "zero_optimization": {"stage": 2},
            },
        )
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            seen, shapes = [], set()
            for batch in loader:
                seen += batch["idx"].tolist()
                shapes.add(tuple(batch["x"].shape[1:]))
                loss = engine(batch["x"].float()).pow(2).mean()
                engine.backward(loss)
                engine.step()
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, seen)
            epochs.append({"per_rank": gathered, "shapes": sorted(shapes)})
        out[str(n)] = epochs
    return out


def clm_zero3(rank: int, world_size: int, root: str, assets: dict[str, str]) -> dict[str, Any]:
    """The CLM example at ZeRO-3: partitioned Llama, the HF export consolidated from the partitions.

    The engine's parameters are partitioned, so they are compared inside GatheredParameters, on every
    rank (a gather is a collective)."""
    import torch
    from transformers import LlamaForCausalLM

    from zero_all.zero import GatheredParameters

    main = load_main("clm")
    out = Path(root) / "clm_z3"
    argv = [*_common(out, assets, "clm_data", "llama", 3, 12), "--learning_rate", "3e-3", "--dtype", "bf16"]
    summary = main.main(argv)
    engine = summary["engine"]
    res = {k: summary[k] for k in ("losses", "perplexity_before", "perplexity_after", "steps", "zero_stage")}
    # The last evaluation may keep units for reuse (stage3_max_reuse_distance); this frees them.
    engine.empty_partition_cache()
    res["released"] = all(p.untyped_storage().nbytes() == 0 for p in engine.module.model.layers[0].mlp.parameters())
    loaded = LlamaForCausalLM.from_pretrained(summary["outputs"]["hf_model"], dtype="auto")
    theirs = loaded.state_dict()
    with GatheredParameters(list(engine.module.parameters())):
        mine = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        batch = summary["eval_dataset"][:4]
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            engine.module.eval()
            ref = engine.module(**kw).logits
    res["weights_equal"] = sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        same = loaded.eval().to(next(iter(mine.values())).dtype)(**kw).logits
    res["logits_equal"] = bool(torch.equal(ref, same))
    return res
