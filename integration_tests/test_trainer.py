"""The Hugging Face Trainer trained by zero-all (zero_all.integrations.transformers), on 2 gloo ranks.

Real transformers, accelerate and datasets on the tiny local Llama / T5 (examples/tools). Checked:
ZeRO-1 fp32 gives the Trainer's own DDP losses and gradient norms (same seed, data and schedule;
≤ 1e-5 relative), including epochs whose last accumulation is shorter; bf16 with a checkpoint,
and ``resume_from_checkpoint`` from it continues with the same losses and ends with the same
weights; a Seq2SeqTrainer with the Hugging Face ZeRO-2 "auto" config through the one-import
route trains, evaluates, and its ``save_model`` output loads with ``from_pretrained``; the "auto"
values are what the TrainingArguments say; contradictions and unresolvable "auto" are errors
naming both sides / the key.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

from zero_testkit import run_distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "tools"))
import trainer_cases  # noqa: E402  (after the importorskips)

AUTO_CONFIG = HERE.parent / "examples" / "deepspeed_configs" / "ds_config_zero2_auto.json"
TIMEOUT = 420  # two ranks importing transformers and training 5 runs on a loaded 2-core machine


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from make_assets import make_all

    paths = make_all(tmp_path_factory.mktemp("assets"), clm_rows=200, mt_rows=200)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, str]) -> dict:
    root = tmp_path_factory.mktemp("llama")
    r0, r1 = run_distributed(trainer_cases.llama_runs, 2, str(root), assets, timeout=TIMEOUT)
    assert r0["z1"] == r1["z1"]  # the Trainer logs the mean over ranks: both ranks agree
    assert r1["zero3"]["loaded_equal"] and r1["zero3"]["local_numel"] == 0
    return r0


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_zero1_fp32_matches_the_trainers_ddp(llama: dict) -> None:
    assert llama["ddp_type"] == "DistributedDataParallel" and llama["z1_engine"] == "Engine"
    assert llama["z1_stage"] == 1
    # 2 epochs x (5 + 5 + 2 micro-batches): 6 optimizer steps, as the Trainer counts them.
    assert sorted(llama["ddp"]) == sorted(llama["z1"]) == [1, 2, 3, 4, 5, 6]
    worst = max(_rel(llama["z1"][step], ref) for step, ref in llama["ddp"].items())
    print(f"ZeRO-1 vs DDP: largest relative loss difference {worst:.1e}")  # shown with pytest -s
    for step, ref in llama["ddp"].items():
        assert _rel(llama["z1"][step], ref) <= 1e-5, (step, llama["z1"][step], ref)
        assert _rel(llama["z1_norm"][step], llama["ddp_norm"][step]) <= 1e-4, step
    assert llama["z1_lr"] == llama["ddp_lr"]  # the Trainer's linear warm-up/decay, logged as it logs it
    assert llama["ddp"][6] < llama["ddp"][1] - 0.5  # it learned: the comparison is not of two idle runs
    assert llama["z1_resolved"]["gradient_accumulation_steps"] == 5
    assert llama["z1_resolved"]["train_batch_size"] == 2 * 4 * 5
    assert llama["z1_resolved"]["bf16"] == {"enabled": False}
    assert llama["z1_resolved"]["zero_optimization"]["reduce_bucket_size"] == 128 * 128  # hidden_size²


def test_bf16_checkpoint_and_resume_continue_identically(llama: dict) -> None:
    assert llama["bf16_dtype"] == "torch.bfloat16"
    full, resumed = llama["bf16"], llama["resumed"]
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in full.values())
    # Steps 4-6 were trained again after loading checkpoint-3 (weights, fp32 master, Adam state,
    # schedule, data position): the same numbers, and the same final weights.
    for step in (4, 5, 6):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    assert llama["resumed_global_steps"] == 6
    assert llama["resumed_weights_equal"]
    files = set(llama["ckpt_files"])
    assert {"global_step3", "latest", "model.safetensors", "trainer_state.json"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt"}  # the state is in zero-all's pickle-free checkpoint


def test_seq2seq_zero2_auto_config_one_import(tmp_path: Path, assets: dict[str, str]) -> None:
    r0, r1 = run_distributed(trainer_cases.t5_seq2seq, 2, str(tmp_path), assets, str(AUTO_CONFIG), timeout=TIMEOUT)
    assert r0["stage"] == 2 and r0["deepspeed_arg"] is None  # --deepspeed went to zero-all, not DeepSpeed
    losses = [r0["losses"][s] for s in sorted(r0["losses"])]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert len(r0["evals"]) >= 2 and all(math.isfinite(e) for e in r0["evals"])
    assert r0["last_eval"] < 0.7 * r0["first_eval"]
    assert r0["last_eval"] == r1["last_eval"]
    # The resolved config is what the TrainingArguments imply.
    res, a = r0["resolved"], r0["args"]
    assert res["train_micro_batch_size_per_gpu"] == a["micro"] == 4
    assert res["gradient_accumulation_steps"] == a["gas"] == 2
    assert res["train_batch_size"] == r0["world_size"] * a["micro"] * a["gas"]
    assert res["gradient_clipping"] == a["clip"] == 0.5
    assert res["optimizer"]["params"] == {"lr": a["lr"], "betas": a["betas"], "eps": a["eps"], "weight_decay": a["wd"]}
    assert res["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": a["lr"], "warmup_num_steps": 3}
    assert res["bf16"] == {"enabled": True} and res["fp16"]["enabled"] is False
    assert res["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert r0["engine_dtype"] == "torch.bfloat16"
    assert r0["lr_last"] == pytest.approx(a["lr"])  # WarmupLR from the config reached warmup_max_lr
    # save_model: Hugging Face format, safetensors, loads with from_pretrained and holds the engine's weights.
    assert r0["export_equal"] and r0["export_dtype"] == "torch.bfloat16"
    assert "model.safetensors" in r0["export_files"] and "config.json" in r0["export_files"]


# ------------------------------------------------------------------ errors (one process, no training)


def _targs(tmp_path: Path, **kw):
    from transformers import TrainingArguments

    return trainer_cases._args(TrainingArguments, tmp_path, **kw)


def test_contradicting_config_names_both_sides(tmp_path: Path) -> None:
    from zero_all import ConfigError
    from zero_all.integrations.transformers import HfZeroAllConfig

    cfg = HfZeroAllConfig({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError) as info:
        cfg.trainer_config_process(_targs(tmp_path, max_grad_norm=0.5))
    msg = str(info.value)
    assert "train_micro_batch_size_per_gpu=8" in msg and "per_device_train_batch_size=4" in msg, msg
    assert "gradient_clipping=1.0" in msg and "max_grad_norm=0.5" in msg, msg
    assert "bf16.enabled=True" in msg and "bf16 or bf16_full_eval=False" in msg, msg


def test_contradiction_stops_the_trainer_before_training(tmp_path: Path) -> None:
    import torch

    from zero_all import ConfigError
    from zero_all.integrations.transformers import ZeroAllTrainer

    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4 vs TrainingArguments .*=2"):
        ZeroAllTrainer(
            model=torch.nn.Linear(2, 2),
            args=_targs(tmp_path),
            zero_all_config={"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1}},
        )
    with pytest.raises(ConfigError, match="needs a ds_config"):
        ZeroAllTrainer(model=torch.nn.Linear(2, 2), args=_targs(tmp_path))


def test_unresolvable_auto_names_the_key(tmp_path: Path) -> None:
    import torch

    from zero_all import ConfigError
    from zero_all.integrations.transformers import HfZeroAllConfig

    args = _targs(tmp_path)
    # A bucket size from the hidden size, for a model whose config has none.
    cfg = HfZeroAllConfig({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    cfg.trainer_config_process(args)
    with pytest.raises(
        ConfigError, match=r"zero_optimization.reduce_bucket_size = 'auto'.*Linear.config has no hidden"
    ):
        cfg.trainer_config_finalize(args, torch.nn.Linear(2, 2), 10)
    # A key no TrainingArguments value stands for.
    cfg = HfZeroAllConfig({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "amsgrad": "auto"}}})
    cfg.trainer_config_process(args)
    with pytest.raises(ConfigError, match=r"optimizer.params.amsgrad is 'auto', but neither"):
        cfg.trainer_config_finalize(args, torch.nn.Linear(2, 2), 10)


def test_scheduler_steps_filled_at_finalize(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from zero_all.integrations.transformers import HfZeroAllConfig

    args = _targs(tmp_path, warmup_steps=0)
    cfg = HfZeroAllConfig(
        {
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}},
            "zero_optimization": {
                "stage": 3,
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            },
        }
    )
    cfg.trainer_config_process(args)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, vocab_size=32,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    out = cfg.trainer_config_finalize(args, model, 40)
    # warm-up 0 becomes 1, as transformers writes it (DeepSpeed refuses 0).
    assert out["scheduler"]["params"] == {"total_num_steps": 40, "warmup_num_steps": 1}
    assert out["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert cfg.is_zero3() and cfg.dtype().is_floating_point


def test_zero3_from_pretrained_partitioned_trains_and_exports(llama: dict) -> None:
    res = llama["zero3"]  # rank 0's (the fixture checks both ranks' ZeRO-1 losses agree)
    assert res["local_numel"] == 0  # built partitioned: no rank holds the full weight between uses
    assert res["loaded_equal"]  # gathered, every parameter is the checkpoint's exactly
    assert res["stage"] == 3 and sorted(res["losses"]) == [1, 2, 3]
    assert all(math.isfinite(v) for v in res["losses"].values())
    # The stage-3 "auto" bucket sizes from hidden_size 128, as transformers fills them for DeepSpeed.
    assert res["resolved_z"] == {
        "stage": 3,
        "reduce_bucket_size": 128 * 128,
        "stage3_prefetch_bucket_size": int(0.9 * 128 * 128),
        "stage3_param_persistence_threshold": 10 * 128,
    }
    # save_model gathered the partitions: from_pretrained gets the trained (changed) weights.
    assert res["export_equal"] and res["export_changed"]
