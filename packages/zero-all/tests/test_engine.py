"""Engine end to end on gloo ranks: initialize() from a ds_config dict vs torch DDP + AdamW, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_cases import (
    GLOBAL_MICRO,
    TinyNet,
    client_optimizer_and_dataloader,
    engine_vs_ddp_and_resume,
    initialize_errors,
    resume_elsewhere,
)

from zero_all.cli import consolidate_checkpoint, main
from zero_testkit import run_distributed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """World size 2, ZeRO-2, fp32: 20 steps vs DDP, checkpoint at 10, resumed run."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    results = run_distributed(engine_vs_ddp_and_resume, 2, 2, str(ckpt), timeout=240)
    return {"ckpt": ckpt, "results": results}


def test_losses_match_ddp_adamw(saved: dict) -> None:
    r = saved["results"][0]
    np.testing.assert_allclose(r["engine"], r["ref"], rtol=1e-5, atol=0)
    assert r["engine"][-1] < r["engine"][0]  # it learns
    assert r["lr"] == [pytest.approx(1e-2)]  # WarmupLR reached warmup_max_lr
    assert r["grad_norm"] is not None and r["grad_norm"] > 0 and r["skipped"] is False


def test_resume_same_world_size_is_bit_identical(saved: dict) -> None:
    for r in saved["results"]:
        assert r["resumed"] == r["engine"][10:]  # exact float equality, not approx
        assert r["client_state"] == {"step": 10, "note": "ten"}
        assert r["global_steps"] == 20
        for name, value in r["at_save"].items():
            np.testing.assert_array_equal(r["resumed_params"][name], value)


def test_checkpoint_layout(saved: dict) -> None:
    ckpt = saved["ckpt"]
    assert (ckpt / "latest").read_text() == "global_step10"
    names = sorted(p.name for p in (ckpt / "global_step10").iterdir())
    assert names == [
        "manifest.json",
        "model.safetensors",
        "rank00000.json",
        "rank00000.safetensors",
        "rank00001.json",
        "rank00001.safetensors",
    ]
    assert not any(p.suffix == ".pt" for p in ckpt.rglob("*"))


@pytest.mark.parametrize(("world_size", "stage"), [(1, 0), (4, 1)])
def test_resume_at_other_world_size_and_stage(saved: dict, tmp_path: Path, world_size: int, stage: int) -> None:
    bad = None
    if world_size == 1:
        # A copy with a flipped byte in one shard: loading must name the file.
        bad = tmp_path / "bad"
        shutil.copytree(saved["ckpt"], bad)
        shard = bad / "global_step10" / "rank00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01
        shard.write_bytes(bytes(data))
    results = run_distributed(
        resume_elsewhere, world_size, stage, str(saved["ckpt"]), str(bad) if bad else None, timeout=240
    )
    want = saved["results"][0]["engine"][10:]
    np.testing.assert_allclose(results[0]["losses"], want, rtol=1e-5, atol=0)
    assert results[0]["client_state"] == {"step": 10, "note": "ten"}
    if bad is not None:
        assert results[0]["error"] is not None and "rank00001.safetensors" in results[0]["error"]
    for name, value in saved["results"][0]["at_save"].items():
        np.testing.assert_array_equal(results[0]["weights_only"][name], value)


def test_consolidate_matches_the_saved_weights(saved: dict, tmp_path: Path) -> None:
    state = consolidate_checkpoint(saved["ckpt"])
    model = TinyNet()
    model.load_state_dict(state)  # strict: every key, fp32
    at_save = saved["results"][0]["at_save"]
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        np.testing.assert_array_equal(p.detach().numpy(), at_save[name])
    out = tmp_path / "full.safetensors"
    assert main(["consolidate", str(saved["ckpt"]), str(out), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file

    loaded = load_file(out)
    assert loaded["fc1.weight"].dtype == torch.bfloat16
    assert main(["consolidate", str(tmp_path / "nothing"), str(out)]) == 1


def test_initialize_error_paths() -> None:
    (errors,) = run_distributed(initialize_errors, 1, timeout=120)
    assert errors["bf16_frozen"]["dtypes"] == ["torch.bfloat16"]
    skip = errors["fp16_skip"]
    assert skip["dtype"] == "torch.float16"
    # (skipped, lr, loss scale, global steps). The scale halves from 2**8 on the overflow. WarmupLR
    # does not advance on the skipped step: after the first real step it is at its iteration 0
    # (lr 0.0); had it advanced on the skip, it would be at iteration 1 (lr = 1e-2 / 5).
    assert skip["seen"][0] == (True, 0.0, 128.0, 1)
    assert skip["seen"][1] == (False, 0.0, 128.0, 2)
    assert "3 / (2 x 1) = 1.5" in errors["batch"]
    assert "train_micro_batch_size_per_gpu is 'auto'" in errors["auto_micro"]
    assert "no optimizer" in errors["no_optimizer"]
    assert errors["onebit"].startswith("NotImplementedError") and "OneBitAdam" in errors["onebit"]
    assert "accepted:" in errors["onebit"]
    assert "optimizer.params.lr is 'auto'" in errors["lr_auto"]
    assert errors["offload"].startswith("NotImplementedError") and "ratio=0.5" in errors["offload"]
    assert "fp16" in errors["fp16_and_bf16"] and "bf16" in errors["fp16_and_bf16"]
    assert errors["stage3_nvme"].startswith("NotImplementedError") and "offload_param" in errors["stage3_nvme"]
    assert "needs config=" in errors["no_config"]
    assert "data_types.grad_accum_dtype: 'fp16' with a torch.bfloat16 model" in errors["grad_accum_fp16_on_bf16"]
    assert errors["accum_default"] == "torch.bfloat16" and errors["accum_fp32"] == "torch.float32"
    # HF's ZeRO-3 config trains (integration_tests/test_zero3_seed_config.py); without a loader its "auto"
    # micro batch cannot resolve.
    assert (
        "train_micro_batch_size_per_gpu is 'auto': pass training_data as a DataLoader" in errors["zero3_auto_no_loader"]
    )


def test_client_optimizer_auto_config_and_dataloader(tmp_path: Path) -> None:
    r = run_distributed(client_optimizer_and_dataloader, 2, str(tmp_path), timeout=120)[0]
    assert r["tbs"] == 8  # micro 4 from the DataLoader x 1 x 2 ranks
    assert r["hf_stage"] == 2 and r["hf_sched"] == "WarmupLR"
    assert r["lr"] == [pytest.approx(0.0)]  # the client's WarmupLR at step 0 (lr from the client optimizer: 3e-3)
    assert r["loader_is_given"] is True
    assert r["dl2_batch"] == 4 and r["dl2_len"] == 64 // 2 // 4  # DistributedSampler: half the data per rank
    assert r["client_opt_lr"] == [pytest.approx(3e-3)]
    # steps_per_print=1 and csv_monitor: a line per step, and DeepSpeed-named CSV files with the loss.
    printed = r["printed"]
    assert "[zero-all] step=1, skipped=0, lr=0.003, loss=" in printed and "step=3," in printed
    assert "time (ms) | forward:" in printed  # wall_clock_breakdown
    loss_csv = tmp_path / "job" / "Train_Samples_train_loss.csv"
    assert loss_csv.is_file() and len(loss_csv.read_text().strip().splitlines()) >= 3
    assert (tmp_path / "job" / "Train_Samples_lr.csv").is_file()


def test_global_micro_divides_world_sizes() -> None:
    assert all(GLOBAL_MICRO % ws == 0 for ws in (1, 2, 4))
