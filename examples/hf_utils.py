"""What the Hugging Face examples (clm/, seq2seq/) share: flags, data, ds_config, optimizer, loop.

It follows DeepSpeed-Chat's step-1 script (``dschat/utils``) so a user's script maps onto it
line by line; the reusable pieces (split indices, loaders, HF export) live in ``zero_all.data``.
Only ``import zero_all as deepspeed`` differs from a DeepSpeed script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import zero_all as deepspeed
from zero_all.data import RepeatingLoader, build_dataloader, parse_data_split, split_indices

T_IMPORT = time.perf_counter()  # for "setup_seconds": model, data and engine set-up before the first step

# ----------------------------------------------------------------------------------------- flags


def common_parser(description: str, *, default_model: str, default_data: str) -> argparse.ArgumentParser:
    """DeepSpeed-Chat's step-1 flags (same names and meaning), plus a few of ours (marked)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data_path",
        nargs="*",
        default=[default_data],
        help="parquet/json/csv files, saved Dataset folders, or hub names",
    )
    p.add_argument("--data_split", default="9,1,0", help="proportions of train, eval and held-out parts, e.g. '9,1,0'")
    p.add_argument(
        "--data_output_path",
        default=None,
        help="cache for split indices and tokenized data (default: OUTPUT_DIR/data_cache)",
    )
    p.add_argument(
        "--model_name_or_path", default=default_model, help="a model folder: config.json + tokenizer (+ weights)"
    )
    p.add_argument("--max_seq_len", type=int, default=64, help="tokens per sample (padded / truncated)")
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--per_device_eval_batch_size", type=int, default=16)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--gradient_checkpointing", action="store_true", help="HF gradient checkpointing")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload of the optimizer to CPU (CPU Adam)")
    p.add_argument("--output_dir", default="output", help="where the HF-format model (and logs) go")
    p.add_argument("--enable_tensorboard", action="store_true")
    p.add_argument("--tensorboard_path", default=None, help="default: OUTPUT_DIR/tensorboard")
    p.add_argument("--print_loss", action="store_true", help="print every step's loss on every rank")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    # ours
    p.add_argument(
        "--max_steps", type=int, default=-1, help="(ours) stop after this many optimizer steps; -1: epochs decide"
    )
    p.add_argument("--checkpoint_dir", default=None, help="(ours) also save an engine checkpoint here at the end")
    p.add_argument(
        "--progress", default="auto", choices=["auto", "on", "off"], help="(ours) tqdm bar on rank 0; auto: on a TTY"
    )
    p.add_argument(
        "--eval_max_batches", type=int, default=-1, help="(ours) cap evaluation at this many batches per rank"
    )
    deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config
    return p


def check_args(args: argparse.Namespace) -> None:
    """Fail early, on every rank, with a message naming the flag."""
    try:
        parse_data_split(args.data_split, parts=3)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None  # "--data_split '9,1': 2 parts, expected 3 (...)"
    if args.max_seq_len < 2:
        raise SystemExit(f"--max_seq_len must be >= 2, got {args.max_seq_len}")


def set_random_seed(seed: int) -> None:
    """The same seed on every rank, so every rank builds the same initial model (DeepSpeed-Chat's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    """The world size (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def quiet_libraries() -> None:
    """No per-map / per-shard progress bars from datasets and transformers (ours is the training bar)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


_BAR: Any = None  # the progress bar while training runs: lines go above it, not through it


def print_rank_0(*msg: Any) -> None:
    """print on rank 0 only (above the progress bar while one is drawn)."""
    if rank() != 0:
        return
    if _BAR is not None and _BAR.enabled:
        _BAR.write(" ".join(str(m) for m in msg))
    else:
        print(*msg, flush=True)


# ------------------------------------------------------------------------------------------ data


def load_raw_dataset(path: str, cache_dir: str | None = None):
    """One ``datasets.Dataset`` from a file (parquet/json/jsonl/csv), a ``save_to_disk`` folder, or a hub name."""
    import datasets

    p = Path(path)
    builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        return ds
    if p.is_file():
        if p.suffix not in builders:
            raise SystemExit(f"--data_path {path}: unknown file type {p.suffix!r}; accepted: {', '.join(builders)}")
        return datasets.load_dataset(builders[p.suffix], data_files=str(p), split="train", cache_dir=cache_dir)
    if p.exists():
        raise SystemExit(f"--data_path {path}: a folder, but not one written by Dataset.save_to_disk")
    try:  # a hub dataset name (needs network access, or HF_DATASETS_OFFLINE with a warm cache)
        return datasets.load_dataset(path, split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001  (the hub's errors are many; the message says what was tried)
        raise SystemExit(
            f"--data_path {path}: not a file or folder here, and loading it from the hub failed: {e}"
        ) from None


def require_columns(ds: Any, columns: Sequence[str], source: str) -> None:
    """A clear error naming the data and the columns it has."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise SystemExit(
            f"--data_path {source}: missing column(s) {missing}; it has {ds.column_names}. "
            f"This script reads {list(columns)}"
        )


_TOKENIZE_FLAGS = {
    "max_seq_len", "max_target_len", "prompt_column", "response_column", "source_lang", "target_lang", "source_prefix",
}  # fmt: skip


def _fingerprint(args: argparse.Namespace, tokenizer: Any, kind: str) -> str:
    files = []
    for path in args.data_path:
        p = Path(path)
        stat = p.stat() if p.exists() else None
        files.append(
            [str(p.resolve()) if p.exists() else path, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0]
        )
    vocab = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    # Every flag that changes what the tokenize function produces.
    shaping = {k: v for k, v in sorted(vars(args).items()) if k in _TOKENIZE_FLAGS}
    key = json.dumps([kind, files, args.data_split, args.seed, vocab, tokenizer.pad_token, shaping])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def on_rank_0(fn: Callable[[], Any], what: str) -> None:
    """Run ``fn`` on rank 0 while the others wait; a failure there stops every rank (no hang at a barrier)."""
    error = None
    if rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, after the other ranks know)
            error = e
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flag)
        if error is None and int(flag.item()):
            raise SystemExit(f"rank {rank()}: {what} failed on rank 0 (see its error)")
    if error is not None:
        raise error


def prepare_splits(
    args: argparse.Namespace,
    tokenizer: Any,
    *,
    kind: str,
    columns: Sequence[str],
    tokenize: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
):
    """DeepSpeed-Chat's ``create_prompt_dataset``: load, check columns, split, tokenize, cache.

    Every data path is split with ``--data_split`` (indices cached as .npy under
    ``--data_output_path``); part 0 of each is training data, part 1 evaluation data, part 2
    held out. The tokenized tensors are cached there too (``save_to_disk``: Arrow, no pickle),
    keyed by the data files, split, seed, sequence length and vocabulary; rank 0 builds them,
    the others wait and read them. Returns ``(train, eval)`` ``datasets.Dataset`` in torch format.
    """
    import datasets

    cache = Path(args.data_output_path or Path(args.output_dir) / "data_cache").resolve()
    raw_cache = str(cache / "hf_datasets")
    trains, evals = [], []
    for i, path in enumerate(args.data_path):
        raw = load_raw_dataset(path, raw_cache)
        require_columns(raw, columns, path)
        parts = split_indices(
            len(raw), args.data_split, seed=args.seed, cache_dir=cache, name=f"{kind}{i}_{Path(path).stem}"
        )
        trains.append(raw.select(parts[0]))
        evals.append(raw.select(parts[1]))
    key = _fingerprint(args, tokenizer, kind)
    out = cache / f"{kind}_tokenized_{key}"

    def build() -> None:
        if (out / "done").exists():
            return
        for name, dsets in (("train", trains), ("eval", evals)):
            ds = datasets.concatenate_datasets(dsets)
            ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {name}")
            ds.save_to_disk(str(out / name))
        (out / "done").write_text("ok\n")

    on_rank_0(build, f"tokenizing into {out}")
    train = datasets.load_from_disk(str(out / "train")).with_format("torch")
    evald = datasets.load_from_disk(str(out / "eval")).with_format("torch")
    if len(train) == 0:
        raise SystemExit(f"--data_split {args.data_split}: the training part is empty")
    return train, evald


# ------------------------------------------------------------------------------------- ds_config


def build_ds_config(args: argparse.Namespace, total_steps: int, show_bar: bool) -> dict[str, Any]:
    """DeepSpeed-Chat's ``get_train_ds_config``, from the flags (when no --deepspeed_config is given)."""
    zero: dict[str, Any] = {"stage": args.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if args.zero_stage == 3:
        # DeepSpeed-Chat's stage-3 values.
        zero.update(
            stage3_param_persistence_threshold=int(1e4),
            stage3_max_live_parameters=int(3e7),
            stage3_prefetch_bucket_size=int(3e7),
        )
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world(),
        # With the progress bar on, the engine's own step lines would break it (the bar shows the same).
        "steps_per_print": total_steps + 1 if show_bar else 10,
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "seed": args.seed,
    }
    if args.dtype in ("fp16", "bf16"):
        cfg[args.dtype] = {"enabled": True}
    if os.environ.get("EXAMPLE_ENGINE") == "deepspeed":
        cfg["zero_allow_untested_optimizer"] = True  # DeepSpeed asks this for an Adam that is not its own
    if args.enable_tensorboard:
        cfg["tensorboard"] = {"enabled": True, "output_path": tensorboard_path(args), "job_name": "run"}
    return cfg


def tensorboard_path(args: argparse.Namespace) -> str:
    """Where TensorBoard events go (the ``tensorboard.output_path``)."""
    return str(Path(args.tensorboard_path or Path(args.output_dir) / "tensorboard").resolve())


def fill_auto(raw: dict[str, Any], args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    """Resolve a Hugging Face-style config's "auto" values from the flags, as the HF Trainer does.

    What the flags do not decide (e.g. ``reduce_bucket_size``) is left "auto" for zero-all's
    own resolver (it takes the model's hidden size, as Hugging Face does).
    """
    cfg = json.loads(json.dumps(raw))

    def fill(section: dict[str, Any], key: str, value: Any) -> None:
        if section.get(key) == "auto":
            section[key] = value

    fill(cfg, "train_micro_batch_size_per_gpu", args.per_device_train_batch_size)
    fill(cfg, "gradient_accumulation_steps", args.gradient_accumulation_steps)
    fill(cfg, "train_batch_size", args.per_device_train_batch_size * args.gradient_accumulation_steps * world())
    fill(cfg, "gradient_clipping", 1.0)
    for name in ("fp16", "bf16"):
        if name in cfg:
            fill(cfg[name], "enabled", args.dtype == name)
    opt = (cfg.get("optimizer") or {}).get("params", {})
    for key, value in {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
    }.items():
        fill(opt, key, value)
    sched = (cfg.get("scheduler") or {}).get("params", {})
    for key, value in {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": args.learning_rate,
        "warmup_num_steps": args.num_warmup_steps,
        "total_num_steps": total_steps,
    }.items():
        fill(sched, key, value)
    if "tensorboard" in cfg and args.enable_tensorboard:
        cfg["tensorboard"].update(enabled=True, output_path=tensorboard_path(args))
    elif args.enable_tensorboard:
        cfg["tensorboard"] = {"enabled": True, "output_path": tensorboard_path(args), "job_name": "run"}
    return cfg


def read_ds_config(path: str) -> dict[str, Any]:
    """A ds_config file as DeepSpeed reads it (``//`` comments allowed), as a plain dict."""
    return deepspeed.load_config(path).raw


# ------------------------------------------------------------------------------------- optimizer

NO_DECAY = ("bias", "norm.weight", "layernorm.weight", "layer_norm.weight", "ln_f.weight")


def optimizer_grouped_parameters(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """DeepSpeed-Chat's two groups: weight decay on weights, none on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(nd in name.lower() for nd in NO_DECAY) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adam_class(offload: bool) -> type[torch.optim.Optimizer]:
    """DeepSpeed-Chat's ``DeepSpeedCPUAdam if offload else FusedAdam``, from zero-all's kernels.

    FusedAdam is a CUDA kernel; on a CPU-only machine the CPU Adam kernel plays its part, and on
    a GPU with a ds-native built without CUDA, torch's fused AdamW does.
    """
    import ds_native
    from ds_native.optim import CPUAdam, FusedAdam

    if offload or not torch.cuda.is_available():
        return CPUAdam
    if ds_native.build_info().get("cuda"):
        return FusedAdam
    return torch.optim.AdamW


# ------------------------------------------------------------------------------------------ loop


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch to ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine: Any, loader: Any, max_batches: int = -1, causal: bool = True) -> tuple[float, float]:
    """Token-weighted mean loss over the eval set (all ranks), and its perplexity ``exp(loss)``.

    Each batch's mean loss is weighted by the tokens it scored: labels other than -100, less
    the first position for a causal LM (it predicts from the second token on).
    """
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(loader):
        if 0 <= max_batches <= i:
            break
        batch = to_device(batch, engine.device)
        loss = engine(**batch).loss.double()
        labels = batch["labels"][:, 1:] if causal else batch["labels"]
        tokens = (labels != -100).sum()
        total += torch.stack([loss * tokens, tokens.double()])
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    mean = float(total[0] / total[1].clamp(min=1))
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = float("inf")
    return mean, ppl


def show_progress(args: argparse.Namespace) -> bool:
    """Whether rank 0 draws the tqdm bar."""
    if args.progress == "auto":
        return rank() == 0 and sys.stderr.isatty()
    return args.progress == "on" and rank() == 0


def train(
    engine: Any, train_loader: Any, args: argparse.Namespace, total_steps: int, on_epoch_end: Callable[[int], None]
) -> dict[str, Any]:
    """The DeepSpeed loop: ``loss = engine(**batch).loss; engine.backward(loss); engine.step()``.

    Runs ``total_steps`` optimizer steps (epochs of ``train_loader``, the sampler's epoch set each
    pass), with a tqdm bar on rank 0 (ETA, loss, samples/s). Returns losses and throughput.
    """
    from ds_monitor import ProgressBar

    global _BAR
    bar = ProgressBar(total=total_steps, desc="train", enable=show_progress(args), rank=rank())
    _BAR = bar
    losses: list[float] = []
    data = RepeatingLoader(train_loader)
    steps_per_epoch = max(1, len(train_loader) // args.gradient_accumulation_steps)
    t_first = samples_first = None
    t0 = time.perf_counter()
    setup = t0 - T_IMPORT
    engine.train()
    with bar:
        while engine.global_steps < total_steps:
            batch = to_device(next(data), engine.device)
            loss = engine(**batch).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if not boundary:
                continue
            value = loss.item()
            losses.append(value)
            if args.print_loss:
                print(f"rank {rank()} step {engine.global_steps} loss {value:.4f}", flush=True)
            # Throughput from the second step on: the first pays one-off costs (allocations, imports).
            if t_first is None:
                t_first, samples_first = time.perf_counter(), engine.global_samples
                rate = None
            else:
                rate = (engine.global_samples - samples_first) / max(time.perf_counter() - t_first, 1e-9)
            bar.update(loss=value, lr=engine.get_lr()[0], samples_per_sec=rate)
            if engine.global_steps % steps_per_epoch == 0 or engine.global_steps == total_steps:
                on_epoch_end(engine.global_steps // steps_per_epoch)
    _BAR = None
    wall = time.perf_counter() - t0
    timed = max(time.perf_counter() - t_first, 1e-9) if t_first is not None else wall
    samples_timed = engine.global_samples - (samples_first or 0)
    return {
        "losses": losses,
        "setup_seconds": setup,
        "train_seconds": wall,
        "samples_per_sec": samples_timed / timed if len(losses) > 1 else None,
        "seconds_per_step": timed / max(len(losses) - 1, 1),
    }


def planned_steps(args: argparse.Namespace, train_len: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) from the data size, the batch and --max_steps."""
    per_rank = math.ceil(train_len / world())
    batches = math.ceil(per_rank / args.per_device_train_batch_size)
    per_epoch = max(1, batches // args.gradient_accumulation_steps)
    total = per_epoch * args.num_train_epochs
    if args.max_steps > 0:
        total = args.max_steps
    return total, per_epoch


def eval_loader(dataset: Any, args: argparse.Namespace) -> Any:
    """This rank's share of the eval set, in order (a non-shuffled DistributedSampler)."""
    return build_dataloader(dataset, args.per_device_eval_batch_size, shuffle=False, seed=args.seed)


def write_summary(args: argparse.Namespace, summary: dict[str, Any]) -> Path:
    """``OUTPUT_DIR/metrics.json``: what the run measured (rank 0)."""
    path = Path(args.output_dir).resolve() / "metrics.json"
    if rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def thread_count() -> None:
    """One rank per core: split the CPU threads between the local ranks (the launcher sets LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


# ----------------------------------------------------------------------------------------- model


def has_weights(path: str) -> bool:
    """Whether a model folder holds weights (else the model is built from its config, from scratch)."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any((Path(path) / n).exists() for n in names)


def load_tokenizer(path: str) -> Any:
    """The fast tokenizer, with a pad token added when it has none (Llama's have none), padding on the right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def create_hf_model(model_class: Any, path: str, tokenizer: Any, dtype: torch.dtype = torch.float32) -> Any:
    """DeepSpeed-Chat's ``create_hf_model``: ``from_pretrained`` (or ``from_config`` with no weights),
    pad/eos ids in the config, embeddings resized to a multiple of 8 (for tensor cores)."""
    from transformers import AutoConfig

    pretrained = has_weights(path)
    if pretrained:
        model = model_class.from_pretrained(path, dtype=dtype)
    else:
        model = model_class.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    # Mean-resizing (new rows from the old rows' statistics) only means something for trained embeddings.
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)), mean_resizing=pretrained)
    return model


def engine_config(args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    """The ds_config as a dict: --deepspeed_config with its "auto" values filled, or one built from the flags."""
    if args.deepspeed_config:
        return fill_auto(read_ds_config(args.deepspeed_config), args, total_steps)
    return build_ds_config(args, total_steps, show_progress(args))


def client_optimizer_and_scheduler(args: argparse.Namespace, model: Any, ds_config: dict[str, Any], total_steps: int):
    """DeepSpeed-Chat's optimizer and schedule, unless the ds_config brings its own sections.

    Returns ``(optimizer, model_parameters, lr_scheduler)`` for ``initialize``.
    """
    from transformers import get_scheduler

    groups = optimizer_grouped_parameters(model, args.weight_decay)
    if "optimizer" in ds_config:
        optimizer, params = None, groups
    else:
        optimizer = adam_class(args.offload)(groups, lr=args.learning_rate, betas=(0.9, 0.95))
        params = None
    scheduler = None
    if "scheduler" not in ds_config and optimizer is not None:
        # initialize() re-points this scheduler at the optimizer that trains (zero-shard's, over the
        # fp32 partitions), whose step() torch did not wrap: torch then warns once that step() "has
        # been overridden". The schedule itself is followed (the integration test checks it).
        warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps,
            num_training_steps=total_steps,
        )
    return optimizer, params, scheduler


def finish(args: argparse.Namespace, engine: Any, tokenizer: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Save the engine checkpoint (if asked), the HF-format model, ``metrics.json``; print where they are."""
    from zero_all.data import save_hf_format

    out: dict[str, Any] = {}
    if args.checkpoint_dir:
        engine.save_checkpoint(args.checkpoint_dir)
        out["checkpoint"] = str(Path(args.checkpoint_dir).resolve() / f"global_step{engine.global_steps}")
    engine.module.config.use_cache = True  # off while training; generation wants it
    out["hf_model"] = str(save_hf_format(engine, tokenizer, Path(args.output_dir) / "hf_model"))
    if args.enable_tensorboard:
        out["tensorboard"] = tensorboard_path(args)
    out["metrics"] = str(Path(args.output_dir).resolve() / "metrics.json")
    summary = {**summary, "outputs": out}
    write_summary(args, summary)
    for name, path in out.items():
        print_rank_0(f"[{name}] {path}")
    engine.destroy()
    return summary
