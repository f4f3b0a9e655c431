"""The Hugging Face workflow end to end on 2 gloo ranks: examples/clm (tiny Llama), examples/seq2seq (tiny T5).

The assets (parquet/JSON data, a BPE tokenizer, model configs) are built locally by
examples/tools, as the examples do without a hub. Checked: the loss falls, perplexity is finite
and falls, the Hugging Face export loads with ``from_pretrained`` and gives the trained
module's logits exactly, the "auto" config resolves from the flags, and
``initialize(training_data=datasets.Dataset)`` gives every rank a disjoint share.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("zero_all")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

from zero_testkit import run_distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "tools"))
sys.path.insert(0, str(HERE.parent / "examples"))
import hf_cases  # noqa: E402  (after the importorskips)

AUTO_CONFIG = HERE.parent / "examples" / "deepspeed_configs" / "ds_config_zero2_auto.json"
TIMEOUT = 420  # two ranks importing transformers on a loaded 2-core machine


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from make_assets import make_all

    paths = make_all(tmp_path_factory.mktemp("assets"), clm_rows=600, mt_rows=600)
    return {k: str(v) for k, v in paths.items()}


def _falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_clm_zero0_and_zero2_train_and_export(tmp_path: Path, assets: dict[str, str]) -> None:
    results = run_distributed(hf_cases.clm_stages, 2, str(tmp_path), assets, timeout=TIMEOUT)
    r0, r1 = results
    for stage in ("z0", "z2"):
        res = r0[stage]
        assert res["steps"] == 12 and res["zero_stage"] == int(stage[1])
        assert len(res["losses"]) == 12 and all(math.isfinite(x) for x in res["losses"])
        assert _falls(res["losses"]), res["losses"]
        assert math.isfinite(res["perplexity_after"]) and res["perplexity_after"] < res["perplexity_before"]
        # Both ranks agree on the evaluation (it is all-reduced).
        assert res["perplexity_after"] == r1[stage]["perplexity_after"]
        # The cosine schedule ran to its end (0 at the last step), through the client scheduler.
        assert res["lr_history_last"][0] == pytest.approx(0.0, abs=1e-9)
        assert res["engine_dtype"] == res["loaded_dtype"] == "torch.bfloat16"
        assert res["weights_equal"]
        assert res["logits_equal"]
        # As loaded (fp32 RoPE buffer), within bf16 rounding of the logits.
        assert res["max_logit_diff"] <= 2**-6 * max(1.0, res["max_logit"]), res
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(res["files"])
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in res["files"])
    # Same seed, data and bf16 code path at both stages: the same run, up to the order in which
    # bf16 gradients are summed (all-reduce vs reduce-scatter): measured 1.4e-3 relative at most.
    assert r0["z0"]["losses"][:2] == r0["z2"]["losses"][:2]
    assert r0["z0"]["losses"] == pytest.approx(r0["z2"]["losses"], rel=1e-2)
    outs = r0["z2"]["outputs"]
    assert Path(outs["checkpoint"], "manifest.json").exists() or any(Path(outs["checkpoint"]).iterdir())
    assert any(Path(outs["tensorboard"]).rglob("events.out.tfevents.*"))


def test_seq2seq_zero2_auto_config(tmp_path: Path, assets: dict[str, str]) -> None:
    r0, _ = run_distributed(hf_cases.seq2seq_auto, 2, str(tmp_path), assets, str(AUTO_CONFIG), timeout=TIMEOUT)
    assert r0["zero_stage"] == 2
    assert _falls(r0["losses"]), r0["losses"]
    assert math.isfinite(r0["perplexity_after"]) and r0["perplexity_after"] < r0["perplexity_before"]
    # "auto" filled from the flags: micro batch 4, accumulation 1, bf16 from --dtype, clipping 1.0,
    # the config's own WarmupLR; offload_optimizer cpu is accepted (the model is on CPU, so the
    # master weights and Adam state already live there: nothing to move).
    assert r0["resolved"] == {
        "micro": 4,
        "gas": 1,
        "bf16": True,
        "clip": 1.0,
        "scheduler": "WarmupLR",
        "offload": {"device": "cpu", "pin_memory": True},
    }
    assert r0["logits_equal"]
    assert 0.0 <= r0["exact_match"] <= 1.0


def test_initialize_with_hf_dataset_shards_disjoint(tmp_path: Path) -> None:
    (result, _) = run_distributed(hf_cases.hf_dataset_shards, 2, [40, 37], timeout=TIMEOUT)
    for epoch in result["40"]:
        a, b = epoch["per_rank"]
        assert not set(a) & set(b) and sorted(a + b) == list(range(40))  # disjoint and covering
        assert epoch["shapes"] == [(2,)]  # rows came as tensors (with_format("torch")), stacked
    assert result["40"][0]["per_rank"] != result["40"][1]["per_rank"]  # set_epoch reshuffles
    for epoch in result["37"]:
        a, b = epoch["per_rank"]
        # DistributedSampler pads 37 to 38 with one repeated index, as in DeepSpeed.
        assert sorted(set(a + b)) == list(range(37)) and len(a) == len(b) == 19


def test_bad_data_split_is_a_clear_error() -> None:
    main = hf_cases.load_main("clm")
    for bad, words in (("9,1", "expected 3"), ("9,x,0", "non-negative numbers"), ("0,0,0", "not all zero")):
        with pytest.raises(SystemExit) as info:
            main.parse_args(["--data_split", bad])
        assert "--data_split" in str(info.value) and words in str(info.value), str(info.value)


def test_missing_column_is_a_clear_error(tmp_path: Path, assets: dict[str, str]) -> None:
    import hf_utils

    main = hf_cases.load_main("clm")
    args = main.parse_args(
        ["--data_path", assets["clm_data"], "--output_dir", str(tmp_path), "--response_column", "answer"]
    )
    tokenizer = hf_utils.load_tokenizer(assets["llama"])
    with pytest.raises(SystemExit) as info:
        hf_utils.prepare_splits(
            args, tokenizer, kind="clm", columns=["prompt", "answer"], tokenize=main.tokenize_fn(tokenizer, args)
        )
    msg = str(info.value)
    assert assets["clm_data"] in msg and "['answer']" in msg and "'chosen'" in msg, msg


def test_clm_zero3_trains_and_exports_consolidated(tmp_path: Path, assets: dict[str, str]) -> None:
    for res in run_distributed(hf_cases.clm_zero3, 2, str(tmp_path), assets, timeout=TIMEOUT):
        assert res["zero_stage"] == 3 and res["steps"] == 12
        assert _falls(res["losses"]), res["losses"]
        assert math.isfinite(res["perplexity_after"]) and res["perplexity_after"] < res["perplexity_before"]
        assert res["released"]  # between steps the layers' parameters hold no memory
        assert res["weights_equal"] and res["logits_equal"]
