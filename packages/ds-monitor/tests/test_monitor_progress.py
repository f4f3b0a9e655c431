"""The progress bar: drawn when asked, quiet on other ranks and off when the stream is not a TTY."""

from __future__ import annotations

import io

import torch

from ds_monitor.progress import ProgressBar


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_step_loss_lr_throughput_and_eta() -> None:
    out = FakeTTY()
    with ProgressBar(total=10, rank=0, file=out, mininterval=0) as bar:
        assert bar.enabled
        for step in range(4):
            bar.update(loss=torch.tensor(2.5 - step), lr=3e-4, samples_per_sec=123.4, tokens_per_sec=5.0e4)
    text = out.getvalue()
    assert "4/10" in text
    assert "loss=-0.5" in text and "lr=3.000e-04" in text
    assert "samples/s=123.4" in text and "tokens/s=5.000e+04" in text
    assert "<" in text  # tqdm's "elapsed<remaining" ETA


def test_not_a_tty_means_off_unless_asked() -> None:
    out = io.StringIO()
    bar = ProgressBar(total=3, rank=0, file=out)
    bar.update(loss=1.0)
    bar.close()
    assert not bar.enabled and out.getvalue() == "" and bar.step == 1
    forced = ProgressBar(total=3, rank=0, file=out, enable=True, mininterval=0)
    forced.update(loss=1.0)
    forced.close()
    assert "1/3" in out.getvalue()


def test_quiet_on_non_zero_ranks() -> None:
    out = FakeTTY()
    bar = ProgressBar(total=3, rank=1, file=out, enable=True)
    bar.update(loss=1.0)
    bar.write("hello")
    bar.close()
    assert not bar.enabled and out.getvalue() == ""
