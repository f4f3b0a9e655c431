"""The engine with ``offload_optimizer`` cpu/nvme: a checkpoint taken with NVMe offload is a normal checkpoint.

Saved at step 3 by an engine offloading to NVMe (stage 2, with an ``aio`` section), it is loaded by an engine
without offload and by one with CPU offload at stage 3; all three continue with the same losses (fp32,
1e-5 relative), and no swap file is left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import engine_cases as ec

import zero_all
from zero_testkit import run_distributed


def _config(world_size: int, stage: int, offload: dict[str, Any] | None) -> dict[str, Any]:
    cfg = ec.ds_config(world_size, stage)
    if offload is not None:
        cfg["zero_optimization"]["offload_optimizer"] = offload
        cfg["zero_optimization"]["sub_group_size"] = 100
    cfg["aio"] = {"block_size": 65536, "queue_depth": 4, "intra_op_parallelism": 2}
    return cfg


def offload_resume(rank: int, world_size: int, ckpt: str, nvme: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    nvme_cfg = {"device": "nvme", "nvme_path": nvme}
    engine, *_ = zero_all.initialize(model=ec.make_model(), config=_config(world_size, 2, nvme_cfg))
    off = engine.optimizer.offload
    reader = off.nvme.swapper.reader
    out["aio"] = (getattr(reader, "block_size", 65536), getattr(reader, "parallelism", 2))
    first = ec.train_engine(engine, rank, world_size, 0, 3)
    engine.save_checkpoint(ckpt)
    out["straight"] = first + ec.train_engine(engine, rank, world_size, 3, 6)
    run_dir = off.nvme.scratch.path
    off.close()
    out["removed"] = not run_dir.exists()
    for name, stage, offload in (("none", 2, None), ("cpu-stage3", 3, {"device": "cpu"})):
        other, *_ = zero_all.initialize(model=ec.make_model(), config=_config(world_size, stage, offload))
        other.load_checkpoint(ckpt)
        out[name] = ec.train_engine(other, rank, world_size, 3, 6)
    return out


def test_nvme_checkpoint_resumes_without_offload(tmp_path: Path) -> None:
    res = run_distributed(offload_resume, 2, str(tmp_path / "ckpt"), str(tmp_path / "nvme"), timeout=240)
    for r in res:
        assert r["aio"] == (65536, 2)  # the aio section reached the IO handle
        assert r["removed"]
        ref = r["straight"][3:]
        for name in ("none", "cpu-stage3"):
            assert max(abs(a - b) / abs(b) for a, b in zip(r[name], ref, strict=True)) <= 1e-5, (name, r[name], ref)
    assert not any((tmp_path / "nvme" / "zero-all-swap").iterdir())
