"""The activation_checkpointing section: DeepSpeed keys and defaults, clear errors."""

from __future__ import annotations

import pytest

from act_ckpt.config import ActivationCheckpointingConfig, parse_activation_checkpointing, section_of


def test_defaults_match_deepspeed() -> None:
    c = ActivationCheckpointingConfig()
    assert c.model_dump() == {
        "partition_activations": False,
        "contiguous_memory_optimization": False,
        "cpu_checkpointing": False,
        "number_checkpoints": None,
        "synchronize_checkpoint_boundary": False,
        "profile": False,
    }


def test_every_deepspeed_key_is_accepted() -> None:
    c = parse_activation_checkpointing(
        {
            "partition_activations": True,
            "contiguous_memory_optimization": True,
            "cpu_checkpointing": True,
            "number_checkpoints": 12,
            "synchronize_checkpoint_boundary": True,
            "profile": True,
        }
    )
    c.check_consistent()
    assert c.number_checkpoints == 12 and c.cpu_checkpointing


def test_number_checkpoints_false_reads_as_null() -> None:
    # Configs in the wild write `"number_checkpoints": false` for "not set".
    assert parse_activation_checkpointing({"number_checkpoints": False}).number_checkpoints is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"partition_activation": True}, "activation_checkpointing.partition_activation: unknown key; accepted keys:"),
        ({"cpu_checkpointing": "yes"}, "activation_checkpointing.cpu_checkpointing: Input should be a valid boolean"),
        ({"number_checkpoints": 0}, "activation_checkpointing.number_checkpoints: Input should be greater than 0"),
        ({"number_checkpoints": 2.5}, "activation_checkpointing.number_checkpoints: Value error"),
        ({"profile": 1}, "activation_checkpointing.profile"),
    ],
)
def test_bad_values_name_the_key(section: dict, expected: str) -> None:
    with pytest.raises(ValueError, match="^" + expected.replace(".", r"\.").replace("(", r"\(")):
        parse_activation_checkpointing(section)


def test_not_a_dict_is_refused() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing must be a dict"):
        parse_activation_checkpointing([True])


def test_contiguous_needs_partition_and_number() -> None:
    with pytest.raises(ValueError, match=r"contiguous_memory_optimization=true needs .*partition_activations"):
        parse_activation_checkpointing({"contiguous_memory_optimization": True}).check_consistent()
    with pytest.raises(ValueError, match=r"needs activation_checkpointing\.number_checkpoints"):
        parse_activation_checkpointing(
            {"contiguous_memory_optimization": True, "partition_activations": True}
        ).check_consistent()


def test_section_of_a_ds_config() -> None:
    ds = {"train_batch_size": 8, "activation_checkpointing": {"cpu_checkpointing": True}}
    assert parse_activation_checkpointing(section_of(ds)).cpu_checkpointing
    assert section_of({"train_batch_size": 8}) is None
