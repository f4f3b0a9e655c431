"""The Hugging Face ``Trainer`` / ``Seq2SeqTrainer`` trained by zero-all's engine (``pip install zero-all[trainer]``).

A Trainer script changes one import and keeps its ``--deepspeed ds_config.json``::

    from zero_all.integrations.transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    # was: from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

or keeps transformers' ``TrainingArguments`` and passes one argument::

    trainer = ZeroAllTrainer(model=model, args=args, ..., zero_all_config="ds_config.json")

``HfZeroAllConfig`` is transformers' ``HfDeepSpeedConfig`` for zero-all: the ``"auto"`` values filled
from ``TrainingArguments`` and the model, contradictions refused. See docs/trainer.md.
"""

from zero_all.integrations.transformers.arguments import ZeroAllSeq2SeqTrainingArguments, ZeroAllTrainingArguments
from zero_all.integrations.transformers.config import HfZeroAllConfig
from zero_all.integrations.transformers.trainer import ZeroAllSeq2SeqTrainer, ZeroAllTrainer, ZeroAllTrainerMixin
from zero_all.integrations.transformers.zero3 import from_pretrained_zero3

# The drop-in names: `from zero_all.integrations.transformers import Trainer, TrainingArguments`.
Trainer = ZeroAllTrainer
Seq2SeqTrainer = ZeroAllSeq2SeqTrainer
TrainingArguments = ZeroAllTrainingArguments
Seq2SeqTrainingArguments = ZeroAllSeq2SeqTrainingArguments

__all__ = [
    "HfZeroAllConfig",
    "Seq2SeqTrainer",
    "Seq2SeqTrainingArguments",
    "Trainer",
    "TrainingArguments",
    "ZeroAllSeq2SeqTrainer",
    "ZeroAllSeq2SeqTrainingArguments",
    "ZeroAllTrainer",
    "ZeroAllTrainerMixin",
    "ZeroAllTrainingArguments",
    "from_pretrained_zero3",
]
