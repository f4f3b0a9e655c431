"""The zero_optimization section: DeepSpeed's keys, aliases, defaults and clear errors."""

from __future__ import annotations

import warnings

import pytest
from pydantic import ValidationError

from zero_shard.config import ZeroConfig

EXAMPLE_ZERO2 = {
    "stage": 2,
    "allgather_partitions": True,
    "allgather_bucket_size": 2e8,
    "reduce_scatter": True,
    "reduce_bucket_size": 2e8,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "offload_optimizer": {"device": "cpu", "pin_memory": True},
}
EXAMPLE_ZERO3 = {
    "stage": 3,
    "offload_optimizer": {"device": "cpu", "pin_memory": True},
    "offload_param": {"device": "cpu", "pin_memory": True},
    "overlap_comm": True,
    "contiguous_gradients": True,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": True,
}


def test_defaults_match_deepspeed() -> None:
    c = ZeroConfig()
    assert c.stage == 0 and c.contiguous_gradients and c.reduce_scatter and c.allgather_partitions
    assert c.reduce_bucket_size == c.allgather_bucket_size == 500_000_000
    assert c.overlap_comm is False and ZeroConfig(stage=3).overlap_comm is True
    assert c.prefetch_bucket_size == 50_000_000 and c.param_persistence_threshold == 100_000
    assert c.max_live_parameters == c.max_reuse_distance == 1_000_000_000
    assert c.offload_optimizer is None and c.offload_param is None and c.unsupported_features() == []


def test_example_configs_validate() -> None:
    c2 = ZeroConfig.model_validate(EXAMPLE_ZERO2)
    assert c2.reduce_bucket_size == 200_000_000 and isinstance(c2.allgather_bucket_size, int)
    assert c2.offload_optimizer.device == "cpu" and c2.offload_optimizer.pin_memory
    assert c2.unsupported_features(model_on_cpu=True) == []
    assert c2.unsupported_features(model_on_cpu=False) == []  # CPU offload of an accelerator model (zero_shard.offload)
    c3 = ZeroConfig.model_validate(EXAMPLE_ZERO3)
    assert c3.prefetch_bucket_size == "auto" and c3.max_live_parameters == 1_000_000_000
    assert c3.gather_16bit_weights_on_model_save
    assert c3.unsupported_features(model_on_cpu=True) == []  # stage 3; CPU "offload" of a CPU model is a no-op
    assert c3.unsupported_features(model_on_cpu=False) == []  # both offloaded to CPU (zero_shard.offload)
    alone = ZeroConfig.model_validate({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}})
    assert any("without offload_optimizer" in f for f in alone.unsupported_features(model_on_cpu=True))
    r = c3.resolve_auto(hidden_size=64)
    assert (r.reduce_bucket_size, r.prefetch_bucket_size, r.param_persistence_threshold) == (4096, 3686, 640)
    assert c3.resolve_auto().reduce_bucket_size == 500_000_000 == c3.reduce_bucket_elements


def test_long_and_short_names() -> None:
    assert ZeroConfig(prefetch_bucket_size=7).prefetch_bucket_size == 7
    assert ZeroConfig.model_validate({"stage3_max_live_parameters": 5}).max_live_parameters == 5
    with pytest.raises(ValidationError, match="not both"):
        ZeroConfig.model_validate({"max_live_parameters": 1, "stage3_max_live_parameters": 2})


def test_deprecated_keys_map_and_warn() -> None:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = ZeroConfig.model_validate({"stage": 2, "cpu_offload": True})
    assert c.offload_optimizer is not None and c.offload_optimizer.device == "cpu"
    assert any("cpu_offload" in str(x.message) for x in w)
    with pytest.warns(DeprecationWarning, match="gather_16bit_weights_on_model_save"):
        c = ZeroConfig.model_validate({"stage3_gather_fp16_weights_on_model_save": True})
    assert c.gather_16bit_weights_on_model_save


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"stage": 4}, "stage"),
        ({"stage": 2, "reduce_bucket_sise": 1}, "reduce_bucket_sise"),
        ({"reduce_bucket_size": 2.5e0}, "reduce_bucket_size"),
        ({"allgather_bucket_size": -1}, "allgather_bucket_size"),
        ({"allgather_bucket_size": "auto"}, "allgather_bucket_size"),
        ({"overlap_comm": "yes please"}, "overlap_comm"),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param"),
        ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}, "ratio"),
        ({"offload_optimizer": {"device": "disk"}}, "offload_optimizer.device"),
    ],
)
def test_bad_input_names_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        ZeroConfig.model_validate(data)
