"""zero_shard.host_memory: the buffers stage 3 frees are reused at the next gather, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zero_shard.host_memory import _libc

# One process per run: mallopt is process-wide and only ever raised. World size 1 (no collectives) still frees
# every unit after use and allocates it again at the next step, as on N ranks.
_CHILD = """
import ctypes, resource, torch
# Start from glibc's own starting thresholds (128 KiB), pinned: left dynamic, how much glibc happens to keep
# depends on everything the process allocated and freed before (0 to 2,000 faults a step between two venvs).
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 128 << 10) == 1 and libc.mallopt(-1, 128 << 10) == 1
from torch import nn
from zero_shard import ZeroConfig, ZeroShardedOptimizer
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(*[nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)) for _ in range(6)])
opt = ZeroShardedOptimizer(
    list(model.named_parameters()), lambda g: torch.optim.SGD(g, lr=1e-3),
    ZeroConfig(stage=3, stage3_param_persistence_threshold=0, reduce_bucket_size=int(1e6)), module=model,
)
x = torch.randn(64, 512)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.backward(model(x).square().mean())
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
numel = sum(p.numel() for p in model.parameters())
print(min(faults[1:]), numel * 4 // 4096, opt.coordinator.retains_freed_memory)
"""


def _step_faults(**env: str) -> tuple[int, int, str]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        check=True,
    )
    faults, pages, retained = out.stdout.split()
    return int(faults), int(pages), retained


@pytest.mark.skipif(_libc() is None, reason="needs glibc (mallopt)")
def test_stage3_step_reuses_freed_buffers() -> None:
    plain, pages, retained = _step_faults(ZERO_SHARD_RETAIN_FREED_MEMORY="0")
    assert retained == "False"
    kept, _, retained = _step_faults()
    assert retained == "True"
    # Left alone, glibc unmaps each freed unit buffer (4 MB, above its threshold) and a step faults the whole
    # model in again; retained, a step reuses nearly all of it.
    assert plain > pages // 2, (plain, pages)
    assert kept < pages // 50, (kept, plain, pages)
