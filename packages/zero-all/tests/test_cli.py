"""The ``zero-all`` command's ``env`` report (``consolidate`` is tested with the engine checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

from zero_all.cli import env_report, main


def test_env_report_lists_torch_packages_and_native_build(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["torch"] == torch.__version__
    assert printed["packages"]["zero_all"] == "0.1.0" and printed["packages"]["zero_shard"] == "0.1.0"
    assert "gloo" in printed["torch_distributed_backends"]
    assert printed["ds_native_build"]["abi_version"] >= 1
    # The async IO backends compiled in and those usable here (the thread pool always is).
    assert "threadpool" in printed["ds_native_build"]["io_backends_usable"]
    assert set(printed["ds_native_build"]["io_backends_usable"]) <= set(printed["ds_native_build"]["io_backends"])
    assert env_report()["cuda_devices"] == torch.cuda.device_count()


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit):
        main(["frobnicate"])
