"""The ``zero-all`` command: ``zero-all consolidate CKPT_DIR OUT`` (DeepSpeed's zero_to_fp32 equivalent).

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

__all__ = ["consolidate_checkpoint", "main"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    out_dtype = _DTYPES[dtype]
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
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zero-all`` console script."""
    parser = argparse.ArgumentParser(prog="zero-all", description="zero-all checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write one full safetensors state dict from a sharded checkpoint")
    c.add_argument("ckpt_dir", help="save directory (uses 'latest') or one checkpoint directory")
    c.add_argument("out", help="output .safetensors file")
    c.add_argument("--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    c.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="parameter dtype (default fp32)")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
