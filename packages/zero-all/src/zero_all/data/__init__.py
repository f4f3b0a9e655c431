"""Data helpers that DeepSpeed tutorials make every user copy: splits, loaders, HF export.

- :func:`parse_data_split` / :func:`split_indices`: DeepSpeed-Chat's ``--data_split 9,1,0``,
  with the index arrays cached under ``--data_output_path`` so every rank and every rerun
  sees the same split.
- :class:`RepeatingLoader`: an endless iterator over a data loader (DeepSpeed's
  ``deepspeed.utils.RepeatingLoader``), advancing the sampler's epoch each pass.
- :func:`build_dataloader`: the loader ``initialize(training_data=...)`` returns
  (``DistributedSampler`` over the data-parallel ranks, the config's ``seed``,
  ``dataloader_drop_last``, ``collate_fn``); it accepts a ``datasets.Dataset`` too.
- :func:`save_hf_format`: the trained model as safetensors + ``config.json`` (+ tokenizer)
  that ``from_pretrained`` loads, consolidated from the ZeRO partitions.
"""

from zero_all.data.hf_export import consolidated_state_dict, save_hf_format
from zero_all.data.loader import RepeatingLoader, build_dataloader
from zero_all.data.split import DataSplitError, parse_data_split, split_indices

__all__ = [
    "DataSplitError",
    "RepeatingLoader",
    "build_dataloader",
    "consolidated_state_dict",
    "parse_data_split",
    "save_hf_format",
    "split_indices",
]
