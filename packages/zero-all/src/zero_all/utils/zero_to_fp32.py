"""DeepSpeed's ``zero_to_fp32`` functions over zero-all's (pickle-free) checkpoint format.

``get_fp32_state_dict_from_zero_checkpoint(dir, tag=None)`` returns the full state dict a model's
``load_state_dict`` accepts: every trainable parameter reassembled from the ranks' fp32 master
shards (any stage, any world size), buffers and frozen parameters as saved. It is what
``zero-all consolidate`` writes to a file (the same code, ``zero_all.cli.consolidate_checkpoint``).
``dir`` is the save directory (``tag`` or its ``latest`` file picks the checkpoint) or one
checkpoint directory. DeepSpeed's ``*.pt`` checkpoints are not read (zero-all never unpickles).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from zero_all.checkpoint.files import write_tensors
from zero_all.cli import consolidate_checkpoint

__all__ = [
    "convert_zero_checkpoint_to_fp32_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
]


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    lazy_mode: bool = False,
) -> dict[str, torch.Tensor]:
    """The consolidated fp32 state dict of a zero-all checkpoint (on the CPU).

    Args:
        checkpoint_dir: the save directory (holding ``latest`` and the tag folders) or one tag folder.
        tag: which checkpoint (default: the one named in ``latest``).
        exclude_frozen_parameters: not supported (the checkpoint does not mark which saved
            non-trainable tensors are frozen parameters rather than buffers): True raises.
        lazy_mode: accepted; the tensors are always materialised (safetensors reads are cheap).
    """
    if exclude_frozen_parameters:
        raise NotImplementedError(
            "get_fp32_state_dict_from_zero_checkpoint(exclude_frozen_parameters=True) is not supported: "
            "drop the frozen names from the returned dict instead"
        )
    del lazy_mode
    return consolidate_checkpoint(Path(checkpoint_dir), tag, "fp32")


def load_state_dict_from_zero_checkpoint(
    model: torch.nn.Module, checkpoint_dir: str | os.PathLike[str], tag: str | None = None
) -> torch.nn.Module:
    """Move ``model`` to the CPU, load the consolidated fp32 weights into it and return it (as DeepSpeed).

    Loaded with ``strict=False`` as DeepSpeed does; a saved name the model lacks, or a shape that
    differs, is still an error (``load_state_dict`` checks shapes).
    """
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(
            f"load_state_dict_from_zero_checkpoint: the checkpoint in {checkpoint_dir} holds tensors this model "
            f"does not have: {result.unexpected_keys[:5]}"
        )
    return model


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    max_shard_size: str | int = "5GB",
    safe_serialization: bool = True,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
) -> Path:
    """Write ``output_dir/model.safetensors`` (one file); returns its path.

    ``safe_serialization=False`` (DeepSpeed's pickled ``pytorch_model.bin``) is refused with a
    warning and safetensors written instead; ``max_shard_size`` is accepted, the output is not split.
    """
    if not safe_serialization:
        warnings.warn(
            "convert_zero_checkpoint_to_fp32_state_dict: zero-all writes no pickles; writing model.safetensors",
            UserWarning,
            stacklevel=2,
        )
    del max_shard_size
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    write_tensors(path, state, metadata={"format": "pt"})
    return path
