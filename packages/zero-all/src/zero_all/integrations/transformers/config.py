"""``HfZeroAllConfig``: a ds_config whose ``"auto"`` values come from ``TrainingArguments`` and the model.

transformers' ``HfTrainerDeepSpeedConfig`` fills a DeepSpeed config in two passes: when the
``TrainingArguments`` exist (batch sizes, clipping, optimizer hyperparameters, precision) and
when the Trainer knows the model and the number of optimizer steps (bucket sizes from the
hidden size, the scheduler's warm-up and total steps). This class does the same for zero-all,
key for key, so a config written for the Trainer + DeepSpeed means the same thing here:

==============================================  ==============================================
key                                             filled from (and checked against when not auto)
==============================================  ==============================================
train_micro_batch_size_per_gpu                  ``per_device_train_batch_size``
gradient_accumulation_steps                     ``gradient_accumulation_steps``
train_batch_size                                world size x micro batch x accumulation
gradient_clipping                               ``max_grad_norm``
optimizer.params.lr / betas / eps               ``learning_rate`` / ``[adam_beta1, adam_beta2]`` /
/ weight_decay                                  ``adam_epsilon`` / ``weight_decay``
scheduler.params.warmup_min_lr                  0 (filled only; not a Trainer argument)
scheduler.params.warmup_max_lr                  ``learning_rate``
scheduler.params.warmup_num_steps               ``get_warmup_steps(num_training_steps)``, at least 1
scheduler.params.total_num_steps                the Trainer's number of optimizer steps
fp16.enabled / bf16.enabled                     ``fp16 or fp16_full_eval`` / ``bf16 or bf16_full_eval``
zero_optimization.reduce_bucket_size            hidden_size² (filled only)
zero_optimization.stage3_prefetch_bucket_size   0.9 x hidden_size² (stage 3; filled only)
stage3_param_persistence_threshold              10 x hidden_size (stage 3; filled only)
==============================================  ==============================================

A value that is not ``"auto"`` and disagrees with the ``TrainingArguments`` is an error naming
both sides (transformers collects the same list and refuses to start). An ``"auto"`` left
over after both passes (a key nothing determines, or a bucket size for a model whose config
has no hidden size) is an error naming the key.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from zero_all.config.auto import _find_auto
from zero_all.config.loader import ConfigError
from zero_all.config.model import ZeroAllConfig

__all__ = ["HfZeroAllConfig"]

_HIDDEN_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


def _hidden_size(model: Any) -> int | None:
    """The model's hidden size as transformers reads it (hidden_size, the largest of hidden_sizes, text_config's)."""
    cfg = getattr(model, "config", None)
    for node in (cfg, getattr(cfg, "text_config", None)):
        if node is None:
            continue
        if isinstance(getattr(node, "hidden_size", None), int):
            return int(node.hidden_size)
        sizes = getattr(node, "hidden_sizes", None)
        if sizes:
            return int(max(sizes))
    return None


def _same(ds_val: Any, hf_val: Any) -> bool:
    """Equal as numbers where both are numbers (2e8 == 200000000), else as lists / values."""
    if isinstance(ds_val, (list, tuple)) and isinstance(hf_val, (list, tuple)):
        return len(ds_val) == len(hf_val) and all(_same(a, b) for a, b in zip(ds_val, hf_val, strict=True))
    if isinstance(ds_val, bool) or isinstance(hf_val, bool):
        return bool(ds_val) == bool(hf_val) and isinstance(ds_val, bool) == isinstance(hf_val, bool)
    if isinstance(ds_val, (int, float)) and isinstance(hf_val, (int, float)):
        return float(ds_val) == float(hf_val)
    return ds_val == hf_val


class HfZeroAllConfig:
    """A ds_config (path, dict or JSON string) prepared for the Hugging Face Trainer: transformers' ``HfDeepSpeedConfig``.

    ``trainer_config_process(args)`` fills what the ``TrainingArguments`` decide and checks the values
    they contradict; ``trainer_config_finalize(args, model, num_training_steps)`` fills the rest and
    returns the resolved dict that ``zero_all.initialize(config=...)`` takes. ``ZeroAllTrainer`` calls
    both; a custom loop can too. The file is validated on construction (unknown keys, wrong types).
    """

    def __init__(self, config_file_or_dict: Any) -> None:
        if isinstance(config_file_or_dict, HfZeroAllConfig):
            config_file_or_dict = config_file_or_dict.config
        # Validation as initialize() would do it ("auto" is accepted where DeepSpeed accepts it).
        self.source = config_file_or_dict if isinstance(config_file_or_dict, str) else "<dict>"
        self.config: dict[str, Any] = copy.deepcopy(ZeroAllConfig.load(config_file_or_dict).raw)
        self.mismatches: list[str] = []
        self._dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ queries (HfDeepSpeedConfig's names)
    def find_config_node(self, ds_key_long: str) -> tuple[dict[str, Any] | None, str]:
        """The dict holding the last part of a dotted key, and that part (None when a parent is missing)."""
        *parents, key = ds_key_long.split(".")
        node: Any = self.config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return None, key
        return (node if isinstance(node, dict) else None), key

    def get_value(self, ds_key_long: str, default: Any = None) -> Any:
        """The value of a dotted key (``"zero_optimization.stage"``), or ``default``."""
        node, key = self.find_config_node(ds_key_long)
        return default if node is None else node.get(key, default)

    def is_auto(self, ds_key_long: str) -> bool:
        """Whether the key is present and ``"auto"``."""
        return self.get_value(ds_key_long) == "auto"

    def is_true(self, ds_key_long: str) -> bool:
        """Whether the key is present and ``True``."""
        return self.get_value(ds_key_long) is True

    def zero_stage(self) -> int:
        """The configured ZeRO stage (0 when the section is absent)."""
        return int(self.get_value("zero_optimization.stage", 0) or 0)

    def is_zero3(self) -> bool:
        """Whether ZeRO stage 3 is configured."""
        return self.zero_stage() == 3

    def is_offload(self) -> bool:
        """Whether optimizer or parameter offload to cpu/nvme is configured."""
        return any(
            self.get_value(f"zero_optimization.{k}.device") in ("cpu", "nvme")
            for k in ("offload_optimizer", "offload_param")
        )

    def dtype(self) -> torch.dtype:
        """The training dtype the precision sections decide (after ``trainer_config_process``)."""
        if self._dtype is None:
            raise ValueError("HfZeroAllConfig.dtype(): call trainer_config_process(args) first")
        return self._dtype

    # ------------------------------------------------------------------ filling
    def fill_match(self, ds_key_long: str, hf_val: Any, hf_key: str | None = None, must_match: bool = True) -> None:
        """Replace an ``"auto"`` by ``hf_val``; a value that is present, not auto and different is recorded as a mismatch."""
        node, key = self.find_config_node(ds_key_long)
        if node is None or key not in node:
            return
        if node[key] == "auto":
            node[key] = hf_val
            return
        if must_match and node[key] is not None and not _same(node[key], hf_val):
            self.mismatches.append(f"ds_config {ds_key_long}={node[key]!r} vs TrainingArguments {hf_key}={hf_val!r}")

    def fill_only(self, ds_key_long: str, value: Any) -> None:
        """Replace an ``"auto"`` by ``value``; any other value is kept as written."""
        self.fill_match(ds_key_long, value, must_match=False)

    def _raise_mismatches(self) -> None:
        if self.mismatches:
            lines = "\n  ".join(self.mismatches)
            self.mismatches = []
            raise ConfigError(
                f"the ds_config ({self.source}) contradicts the TrainingArguments:\n  {lines}\n"
                'Change one side, or write "auto" in the ds_config to take the TrainingArguments\' value.'
            )

    def trainer_config_process(self, args: Any, auto_find_batch_size: bool = False) -> None:
        """Fill and check what the ``TrainingArguments`` decide; ConfigError listing every contradiction."""
        micro = int(args.per_device_train_batch_size)
        gas = int(args.gradient_accumulation_steps)
        self.fill_match(
            "train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", not auto_find_batch_size
        )
        self.fill_match("gradient_accumulation_steps", gas, "gradient_accumulation_steps")
        self.fill_match(
            "train_batch_size",
            int(args.world_size) * micro * gas,
            "world_size*per_device_train_batch_size*gradient_accumulation_steps",
            not auto_find_batch_size,
        )
        self.fill_match("gradient_clipping", float(args.max_grad_norm), "max_grad_norm")
        self.fill_match("optimizer.params.lr", float(args.learning_rate), "learning_rate")
        self.fill_match("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "[adam_beta1, adam_beta2]")
        self.fill_match("optimizer.params.eps", float(args.adam_epsilon), "adam_epsilon")
        self.fill_match("optimizer.params.weight_decay", float(args.weight_decay), "weight_decay")
        self.fill_only("scheduler.params.warmup_min_lr", 0.0)
        self.fill_match("scheduler.params.warmup_max_lr", float(args.learning_rate), "learning_rate")
        self.fill_match("fp16.enabled", bool(args.fp16 or args.fp16_full_eval), "fp16 or fp16_full_eval")
        self.fill_match("bf16.enabled", bool(args.bf16 or args.bf16_full_eval), "bf16 or bf16_full_eval")
        if self.is_true("bf16.enabled"):
            self._dtype = torch.bfloat16
        elif self.is_true("fp16.enabled"):
            self._dtype = torch.float16
        else:
            self._dtype = torch.float32
        self._raise_mismatches()

    def trainer_config_finalize(self, args: Any, model: Any, num_training_steps: int) -> dict[str, Any]:
        """Fill what needs the model and the run's length; the resolved config (a copy) for ``initialize()``."""
        wanted = [k for k in _HIDDEN_KEYS if self.is_auto(k)]
        if wanted:
            hidden = _hidden_size(model)
            if hidden is None:
                raise ConfigError(
                    f"ds_config {', '.join(wanted)} = 'auto' is resolved from the model's hidden size, but "
                    f"{type(model).__name__}.config has no hidden_size / hidden_sizes: write integers for these keys"
                )
            self.fill_only("zero_optimization.reduce_bucket_size", hidden * hidden)
            if self.is_zero3():
                self.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
                self.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden)
            # Below stage 3 the stage-3 knobs mean nothing; DeepSpeed's default stands in for the "auto".
            self.fill_only("zero_optimization.stage3_prefetch_bucket_size", 50_000_000)
            self.fill_only("zero_optimization.stage3_param_persistence_threshold", 100_000)
        self.fill_match("scheduler.params.total_num_steps", int(num_training_steps), "max_steps (calculated)")
        # At least 1, as transformers writes it (DeepSpeed >= 0.19.6 refuses a warm-up of 0 steps).
        warmup = max(1, int(args.get_warmup_steps(num_training_steps)))
        self.fill_match("scheduler.params.warmup_num_steps", warmup, "warmup_steps (calculated)")
        self._raise_mismatches()
        left = _find_auto(self.config)
        if left:
            raise ConfigError(
                f"ds_config {left} is 'auto', but neither the TrainingArguments nor the model determine it "
                "(the keys filled from them are listed in docs/trainer.md): write a value"
            )
        return copy.deepcopy(self.config)
