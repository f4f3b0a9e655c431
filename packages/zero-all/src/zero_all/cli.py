"""The ``zero-all`` command: ``consolidate`` (DeepSpeed's zero_to_fp32 equivalent), ``env`` (ds_report) and
``estimate`` (DeepSpeed's ZeRO-2/3 memory estimators, see zero_all.estimators).

``zero-all estimate --params 1.3B --gpus-per-node 8 [--nodes 2] [--stage 3 --largest-layer-params 50M]``
prints DeepSpeed's tables of per-CPU / per-GPU memory for each offload option.

``zero-all consolidate CKPT_DIR OUT``:

Consolidation reads every rank's shard of a zero-all checkpoint, reassembles each parameter
from its flat ranges (zero-shard's ``consolidate``) and writes one safetensors state dict
that ``model.load_state_dict`` accepts: fp32 (or ``--dtype bf16``/``fp16``) parameters, plus
the module's buffers and tied-weight names from the saved ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zero_all.checkpoint.engine_io import MODEL_FILE
from zero_all.checkpoint.files import CheckpointError, write_tensors
from zero_all.checkpoint.layout import CheckpointReader, read_latest
from zero_all.config.model import TORCH_DTYPES

__all__ = ["consolidate_checkpoint", "main"]


def consolidate_checkpoint(
    ckpt_dir: str | Path, tag: str | None = None, dtype: str = "fp32"
) -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint: parameters from the fp32 master copy, buffers as saved.

    ``ckpt_dir`` is either the save directory (with ``latest``; ``tag`` picks another) or one
    checkpoint directory (the one holding ``manifest.json``).
    """
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "manifest.json").is_file() and tag is None:
        root, tag = ckpt_dir.parent, ckpt_dir.name
    else:
        root = ckpt_dir
        tag = tag or read_latest(root)
        if tag is None:
            raise CheckpointError(
                f"{root}: no manifest.json and no 'latest' file; pass a checkpoint directory or --tag"
            )
    reader = CheckpointReader(root, tag)
    from zero_shard import consolidate

    shards = []
    for tensors, meta in reader.read_all_ranks():
        shards.append(
            ({k[len("optim/") :]: v for k, v in tensors.items() if k.startswith("optim/")}, meta["optimizer"])
        )
    params = consolidate(shards)
    out_dtype = TORCH_DTYPES[dtype]
    state = reader.read_shared(MODEL_FILE) if reader.has(MODEL_FILE) else {}
    tied = reader.manifest.get("tied", {})
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        source = tied.get(key, key)
        if source in params:
            result[key] = params[source].to(out_dtype)
        else:
            result[key] = value  # a buffer (kept in its saved dtype)
    for name, value in params.items():
        result.setdefault(name, value.to(out_dtype))
    # A stage-3 model file holds no parameters, so tied aliases (an LM head tied to the embedding) come from here.
    for key, source in tied.items():
        if key not in result and source in result:
            result[key] = result[source]
    return result


_PACKAGES = [
    "zero_all",
    "zero_shard",
    "amp_scaler",
    "act_ckpt",
    "offload_io",
    "onebit_comm",
    "pipe3d",
    "ds_launch",
    "ds_monitor",
    "ds_native",
]


def env_report() -> dict[str, object]:
    """What ``zero-all env`` prints: versions of torch and every zero-all package, devices, the native build."""
    import importlib
    import platform

    report: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "torch_distributed_backends": [b for b in ("gloo", "nccl", "mpi") if _backend_available(b)],
    }
    packages: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            packages[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except ImportError as e:
            packages[name] = f"not installed ({e.name})"
    report["packages"] = packages
    try:
        import ds_native

        report["ds_native_build"] = ds_native.build_info()
    except ImportError:
        report["ds_native_build"] = None
    return report


def _backend_available(name: str) -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and getattr(dist, f"is_{name}_available", lambda: False)())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zero-all`` console script."""
    parser = argparse.ArgumentParser(prog="zero-all", description="zero-all checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write one full safetensors state dict from a sharded checkpoint")
    c.add_argument("ckpt_dir", help="save directory (uses 'latest') or one checkpoint directory")
    c.add_argument("out", help="output .safetensors file")
    c.add_argument("--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    c.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp32", help="parameter dtype (default fp32)")
    sub.add_parser("env", help="report torch, devices, the zero-all packages and the native build (ds_report)")
    e = sub.add_parser("estimate", help="DeepSpeed's ZeRO-2/3 memory estimates for params, grads and optimizer states")
    e.add_argument("--params", required=True, type=_count, help="total parameters, e.g. 1300000000, 1.3B, 350M")
    e.add_argument(
        "--largest-layer-params", type=_count, default=None, help="parameters of the largest layer (stage 3)"
    )
    e.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1)")
    e.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    e.add_argument("--stage", type=int, choices=(2, 3), default=None, help="only this stage (default: both)")
    e.add_argument("--buffer-factor", type=float, default=1.5, help="additional_buffer_factor (default 1.5)")
    args = parser.parse_args(argv)
    if args.command == "env":
        import json

        print(json.dumps(env_report(), indent=2))
        return 0
    if args.command == "estimate":
        return _estimate(args, parser)
    try:
        state = consolidate_checkpoint(args.ckpt_dir, args.tag, args.dtype)
    except CheckpointError as e:
        print(f"zero-all consolidate: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out, state, metadata={"format": "pt"})
    n = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {n:,} elements ({args.dtype} parameters)")
    return 0


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def _count(text: str) -> int:
    """A parameter count: an integer, or a number with K/M/B/T (``1.3B`` = 1,300,000,000)."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _SUFFIXES else t
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 1300000000, 1.3B, 350M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a parameter count must be >= 0, got {text!r}")
    return int(value)


def _estimate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from zero_all import estimators

    if args.gpus_per_node < 1 or args.nodes < 1:
        parser.error("--gpus-per-node and --nodes must be >= 1")
    if args.stage in (None, 2):
        estimators.estimate_zero2_model_states_mem_needs_all_cold(
            args.params, args.gpus_per_node, args.nodes, args.buffer_factor
        )
    if args.stage in (None, 3):
        if args.largest_layer_params is None:
            if args.stage == 3:
                parser.error("--stage 3 needs --largest-layer-params")
            return 0
        if args.stage is None:
            print()
        estimators.estimate_zero3_model_states_mem_needs_all_cold(
            args.params, args.largest_layer_params, args.gpus_per_node, args.nodes, args.buffer_factor
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
