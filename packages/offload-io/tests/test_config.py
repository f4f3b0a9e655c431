"""The offload config sections: DeepSpeed's keys and defaults, clear errors on bad input."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from offload_io import AioConfig, OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig


def test_defaults_match_deepspeed() -> None:
    opt = OffloadOptimizerConfig()
    assert opt.device == OffloadDevice.none and not opt.enabled
    assert (opt.buffer_count, opt.pin_memory, opt.ratio, opt.pipeline) == (4, False, 1.0, False)
    par = OffloadParamConfig()
    assert (par.buffer_count, par.buffer_size, par.max_in_cpu) == (5, 100_000_000, 1_000_000_000)
    aio = AioConfig()
    # One deliberate difference: 8 MiB blocks by default where DeepSpeed has 1 MiB (faster, docs/aio.md);
    # a config that names DeepSpeed's value gets it.
    assert (aio.block_size, aio.queue_depth, aio.intra_op_parallelism) == (8 << 20, 8, 1)
    assert AioConfig.model_validate({"block_size": 1_048_576}).block_size == 1 << 20
    assert (aio.single_submit, aio.overlap_events, aio.use_gds) == (False, True, False)


def test_example_config_and_float_counts() -> None:
    opt = OffloadOptimizerConfig.model_validate({"device": "cpu", "pin_memory": True})
    assert opt.enabled and opt.device == "cpu" and opt.pin_memory
    par = OffloadParamConfig.model_validate({"device": "nvme", "nvme_path": "/tmp/x", "buffer_size": 1e8})
    assert par.buffer_size == 100_000_000 and isinstance(par.buffer_size, int)
    assert OffloadOptimizerConfig(pipeline_write=True).pipeline
    # Older DeepSpeed spells intra_op_parallelism "thread_count".
    assert AioConfig.model_validate({"thread_count": 4}).intra_op_parallelism == 4


@pytest.mark.parametrize(
    ("model", "data", "needle"),
    [
        (OffloadOptimizerConfig, {"device": "gpu"}, "device"),
        (OffloadOptimizerConfig, {"devcie": "cpu"}, "devcie"),
        (OffloadOptimizerConfig, {"ratio": 1.5}, "ratio"),
        (OffloadOptimizerConfig, {"device": "nvme"}, "nvme_path"),
        (OffloadParamConfig, {"buffer_size": 2.5}, "buffer_size"),
        (OffloadParamConfig, {"buffer_count": -1}, "buffer_count"),
        (AioConfig, {"queue_depth": 0}, "queue_depth"),
    ],
)
def test_bad_input_names_the_key(model: type, data: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        model.model_validate(data)
