"""Make the examples' local stand-ins for hub downloads: datasets, tokenizers, tiny model folders.

    python examples/tools/make_assets.py --out assets

writes ``assets/data/rm_pairs.parquet`` (prompt/response/chosen/rejected),
``assets/data/translation.jsonl`` (WMT layout), ``assets/tiny-llama/`` and ``assets/tiny-t5/``
(config.json + tokenizer). Deterministic; skips what exists unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_assets as ta


def make_all(out: str | Path, force: bool = False, clm_rows: int = 4000, mt_rows: int = 3000) -> dict[str, Path]:
    """Build every asset under ``out``; returns their paths by name."""
    out = Path(out).resolve()
    paths = {
        "clm_data": out / "data" / "rm_pairs.parquet",
        "mt_data": out / "data" / "translation.jsonl",
        "llama": out / "tiny-llama",
        "t5": out / "tiny-t5",
    }
    stamp = out / "assets.json"
    want = {"version": ta.ASSET_VERSION, "clm_rows": clm_rows, "mt_rows": mt_rows}
    if not force and stamp.exists() and json.loads(stamp.read_text()) == want:
        return paths
    import datasets

    datasets.disable_progress_bars()
    ta.make_clm_dataset(paths["clm_data"], clm_rows)
    ta.make_translation_dataset(paths["mt_data"], mt_rows)

    clm = datasets.load_dataset("parquet", data_files=str(paths["clm_data"]), split="train")
    mt = datasets.load_dataset("json", data_files=str(paths["mt_data"]), split="train")
    texts = [p + c for p, c in zip(clm["prompt"], clm["chosen"], strict=True)] + [
        t[k] for t in mt["translation"] for k in ("en", "zx")
    ]
    # Llama's tokenizer ships without a pad token (the script adds one); T5's has pad = id 0.
    ta.make_tiny_llama(paths["llama"], ta.train_tokenizer(texts, with_pad=False))
    ta.make_tiny_t5(paths["t5"], ta.train_tokenizer(texts, with_pad=True))
    stamp.write_text(json.dumps(want))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets", help="folder to write into")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args()
    for name, path in make_all(args.out, args.force).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
