"""NVMe offload keeps the optimizer state out of memory, and a damaged swap file is a clear error.

The memory test runs in a fresh subprocess (a clean peak-RSS counter): a bf16 model of 144M parameters whose
optimizer state (fp32 master + two Adam moments, 12 bytes per parameter: 1.73 GB) is swapped to files. The
process's peak RSS over construction and two steps must stay below the size of that state, i.e. the state
was never whole in memory (without offload the same run holds all of it on top of the model). The model is large enough that the
interpreter, torch and the extension modules (~0.7 GB of RSS with the swap buffers) are well below the state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from offload_io.io import SwapIOError
from zero_shard import ZeroConfig, ZeroShardedOptimizer, default_optimizer_factory

_MEMORY_SCRIPT = r"""
import json, resource, sys, torch
from torch import nn
from zero_shard import ZeroConfig, ZeroShardedOptimizer, default_optimizer_factory

torch.manual_seed(0)
torch.set_num_threads(2)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
layers = []
for _ in range(36):  # built one layer at a time in bf16, so fp32 construction never holds the whole model
    layers.append(nn.Linear(2000, 2000, bias=False).to(torch.bfloat16))
model = nn.Sequential(*layers)
numel = sum(p.numel() for p in model.parameters())
# Small reduce buckets with overlap: the fp32 gradient transients of backward stay a few MB.
cfg = {"stage": 2, "sub_group_size": 2_000_000, "reduce_bucket_size": 4_000_000, "overlap_comm": True}
if sys.argv[2] == "nvme":
    cfg["offload_optimizer"] = {"device": "nvme", "nvme_path": sys.argv[1]}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
opt = ZeroShardedOptimizer(
    list(model.named_parameters()), default_optimizer_factory(lr=1e-3), ZeroConfig.model_validate(cfg),
    compute_dtype=torch.bfloat16,
)
losses = []
for step in range(2):
    x = torch.randn(4, 2000, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
    loss = model(x).float().pow(2).mean()
    opt.backward(loss)
    opt.step()
    losses.append(loss.item())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"numel": numel, "imported": imported, "before": before, "peak": peak, "losses": losses, "bytes": opt.state_bytes()}))
"""


def _run(tmp_path: Path, kind: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), kind], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_nvme_offload_peak_rss_below_optimizer_state(tmp_path: Path) -> None:
    nvme = _run(tmp_path, "nvme")
    state_bytes = 12 * nvme["numel"]
    assert nvme["bytes"]["swapped"] == state_bytes
    assert nvme["peak"] < state_bytes, (nvme["peak"] / 2**20, state_bytes / 2**20)
    # Over the interpreter with torch imported: model (2 B/param), gradients (2 B/param), swap buffers and
    # transients, far from the 12 B/param of the state.
    grown = nvme["peak"] - nvme["imported"]
    assert grown < 0.75 * state_bytes, (grown / 2**20, state_bytes / 2**20)
    assert not any((tmp_path / "zero-all-swap").iterdir())  # scratch removed at exit


def _tiny(tmp_path: Path) -> tuple[nn.Module, ZeroShardedOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = ZeroConfig.model_validate(
        {"stage": 1, "sub_group_size": 64, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}
    )
    return model, ZeroShardedOptimizer(list(model.named_parameters()), default_optimizer_factory(), cfg)


def _step(model: nn.Module, opt: ZeroShardedOptimizer) -> None:
    opt.backward(model(torch.ones(4, 8)).pow(2).mean())
    opt.step()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_swap_file_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    model, opt = _tiny(tmp_path)
    _step(model, opt)
    run_dir = opt.offload.nvme.scratch.path
    victim = sorted(run_dir.glob("*.swp"))[1]
    if damage == "missing":
        os.remove(victim)
        needle = "missing"
    else:
        victim.write_bytes(victim.read_bytes()[:10])
        needle = "truncated"
    with pytest.raises(SwapIOError, match=rf"{victim.name}.*{needle}"):
        _step(model, opt)
    opt.offload.close()
    assert not run_dir.exists()
