"""Build, locally, what the Hugging Face examples would otherwise download from the hub.

No hub is reachable from our CI machines, so this makes the stand-ins from nothing, with the
same libraries and file layouts a real run uses:

- ``make_clm_dataset``: a parquet file with DeepSpeed-Chat's reward-model columns ``prompt``,
  ``response``, ``chosen``, ``rejected`` (Dahoas/rm-static's layout), from templated
  question/answer pairs a tiny model can learn in a few hundred steps;
- ``make_translation_dataset``: JSON lines in the WMT layout ``{"translation": {"en": ..., "zx": ...}}``
  for an invented language ("Zorbish": a word-for-word cipher that moves adjectives after
  nouns), the shape of ``wmt16`` for ``run_translation.py``-style T5 training;
- ``train_tokenizer``: a byte-level BPE trained with ``tokenizers`` and wrapped as a
  transformers ``PreTrainedTokenizerFast`` (``save_pretrained`` / ``AutoTokenizer`` round-trip);
- ``make_tiny_llama`` / ``make_tiny_t5``: a model folder (``config.json`` + tokenizer) for
  ``--model_name_or_path``; the training scripts build the model with ``from_config`` (training
  from scratch) when the folder holds no weights, and with ``from_pretrained`` when it does.

``python examples/tools/make_assets.py --out DIR`` runs them all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = [
    "ASSET_VERSION",
    "make_clm_dataset",
    "make_tiny_llama",
    "make_tiny_t5",
    "make_translation_dataset",
    "train_tokenizer",
]

ASSET_VERSION = 1
"""Bumped when what these functions write changes (cached tokenized data keys on it)."""

_COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "brown", "grey"]
_THINGS = [
    "apple", "sky", "grass", "banana", "coal", "snow", "plum", "carrot", "bear", "cloud", "cherry", "ocean",
    "leaf", "lemon", "crow", "milk", "grape", "pumpkin", "acorn", "stone", "tomato", "river", "frog", "corn",
]  # fmt: skip
_LANDS = [
    "Avalon", "Brindor", "Caldera", "Dunmore", "Elbaria", "Fenwick", "Galdor", "Hestia", "Ithaca", "Jorvik",
    "Kestrel", "Lorien", "Morrow", "Norland", "Orinth", "Pellar", "Quenta", "Rivena", "Sorrel", "Tamsin",
]  # fmt: skip
_CAPITALS = [
    "Aster", "Brook", "Cinder", "Dale", "Ember", "Frost", "Glen", "Haven", "Iris", "Jade",
    "Knoll", "Lark", "Marsh", "Nook", "Oak", "Pike", "Quill", "Reed", "Sage", "Thorn",
]  # fmt: skip
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def _qa(rng: random.Random) -> tuple[str, str, str]:
    """One (prompt, good answer, bad answer) from a fixed world the model can memorise."""
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(_THINGS))
        good, bad = _COLORS[i % len(_COLORS)], _COLORS[(i + 1 + rng.randrange(len(_COLORS) - 1)) % len(_COLORS)]
        return (
            f"Human: What color is the {_THINGS[i]}? Assistant:",
            f" The {_THINGS[i]} is {good}.",
            f" The {_THINGS[i]} is {bad}.",
        )
    if kind == 1:
        i = rng.randrange(len(_LANDS))
        j = (i + 1 + rng.randrange(len(_LANDS) - 1)) % len(_LANDS)
        return (
            f"Human: What is the capital of {_LANDS[i]}? Assistant:",
            f" The capital of {_LANDS[i]} is {_CAPITALS[i]}.",
            f" The capital of {_LANDS[i]} is {_CAPITALS[j]}.",
        )
    a, b = rng.randrange(7), rng.randrange(7)
    wrong = (a + b + 1 + rng.randrange(3)) % len(_NUMBERS)
    return (
        f"Human: What is {_NUMBERS[a]} plus {_NUMBERS[b]}? Assistant:",
        f" {_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}.",
        f" {_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[wrong]}.",
    )


def make_clm_dataset(path: str | Path, num_rows: int = 4000, seed: int = 0) -> Path:
    """Write a parquet file with columns prompt, response, chosen, rejected (response == chosen)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "chosen": [], "rejected": []}
    for _ in range(num_rows):
        prompt, good, bad = _qa(rng)
        rows["prompt"].append(prompt)
        rows["response"].append(good)
        rows["chosen"].append(good)
        rows["rejected"].append(bad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows).to_parquet(str(path))
    return path


_EN_NOUNS = ["cat", "dog", "bird", "fish", "horse", "child", "farmer", "king", "queen", "baker", "sailor", "wolf"]
_EN_ADJS = ["big", "small", "old", "young", "happy", "sad", "quick", "lazy", "brave", "quiet"]
_EN_VERBS = ["sees", "likes", "follows", "helps", "finds", "calls", "feeds", "watches"]


def _zorbish(word: str) -> str:
    """The invented language's word for ``word``: a fixed, invertible letter cipher plus a suffix."""
    table = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ozqyrxbwlsmtpuekhnjgvicfda")
    return word.translate(table) + ("a" if len(word) % 2 else "u")


def make_translation_dataset(path: str | Path, num_rows: int = 3000, seed: int = 0) -> Path:
    """Write JSON lines ``{"translation": {"en": ..., "zx": ...}}`` (the WMT layout)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(num_rows):
            a1, n1, v, a2, n2 = (
                rng.choice(_EN_ADJS),
                rng.choice(_EN_NOUNS),
                rng.choice(_EN_VERBS),
                rng.choice(_EN_ADJS),
                rng.choice(_EN_NOUNS),
            )
            en = f"the {a1} {n1} {v} the {a2} {n2}"
            # Zorbish puts the adjective after its noun and has no article.
            zx = " ".join(_zorbish(w) for w in (n1, a1, v, n2, a2))
            f.write(json.dumps({"translation": {"en": en, "zx": zx}}) + "\n")
    return path


SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]


def train_tokenizer(texts: list[str], out_dir: str | Path | None = None, vocab_size: int = 500, with_pad: bool = True):
    """Train a byte-level BPE on ``texts``; save it as a transformers fast tokenizer in ``out_dir``.

    ``<pad>`` (id 0) is always in the vocabulary; ``with_pad=False`` leaves ``pad_token`` unset,
    as Llama's tokenizers do, so the training script has to add it (DeepSpeed-Chat's flow).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        **({"pad_token": "<pad>"} if with_pad else {}),
    )
    fast.model_max_length = 512
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def make_tiny_llama(out_dir: str | Path, tokenizer, hidden_size: int = 128, layers: int = 4) -> Path:
    """A tiny Llama's ``config.json`` (+ the tokenizer) in ``out_dir``: a folder for ``--model_name_or_path``."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_t5(out_dir: str | Path, tokenizer, d_model: int = 128, layers: int = 2) -> Path:
    """A tiny T5's ``config.json`` (+ the tokenizer) in ``out_dir``; pad is the decoder start token, as in T5."""
    from transformers import T5Config

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=32,
        d_ff=d_model * 2,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # T5 v1.0: tied, and the output is scaled by d_model**-0.5
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
