"""Optimizer state in CPU memory (ZeRO-Offload): host buffers and the accelerator ⇄ host transfers.

The fp32 master partition and the Adam moments live in host memory; the optimizer step runs there with
ds-native's CPU Adam. This module owns the memory and the copies:

- :func:`host_empty` — a CPU buffer: page-locked when asked and CUDA exists (asynchronous copies need it),
  else backed by huge pages (CPU Adam streams it every step; ``ds_native.memory``);
- :class:`HostTransfer` — for a model on an accelerator: copies a gradient partition down into a pinned
  host buffer on a side stream, and the updated 16-bit partition back up, each with an event so that the
  CPU step of one partition overlaps the copies of the others. On a CPU model every copy is a no-op: the
  "device" tensors are host tensors and are used in place.
"""

from __future__ import annotations

import torch

from offload_io.io import aligned_empty

__all__ = ["HostTransfer", "host_empty"]


def host_empty(numel: int, dtype: torch.dtype = torch.float32, *, pin: bool = False) -> torch.Tensor:
    """A 1-D CPU buffer of ``numel`` elements: pinned when ``pin`` and CUDA is available, else on huge pages."""
    return aligned_empty(numel, dtype, pin=pin)


class HostTransfer:
    """Down/up copies between one accelerator and host buffers, on their own streams (see the module docstring)."""

    def __init__(self, device: torch.device, *, pin: bool = True) -> None:
        self.device = device
        self.on_host = device.type == "cpu"
        self.pin = pin
        self._down = self._up = None
        if device.type == "cuda":
            self._down = torch.cuda.Stream(device)
            self._up = torch.cuda.Stream(device)
        self._staging: dict[tuple[str, int], torch.Tensor] = {}

    def staging(self, name: str, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable host buffer (pinned when configured) for transfer ``name`` of partition ``index``."""
        key = (name, index)
        buf = self._staging.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = host_empty(numel, dtype, pin=self.pin)
            self._staging[key] = buf
        return buf[:numel]

    def down(self, src: torch.Tensor, index: int) -> tuple[torch.Tensor, object | None]:
        """Start copying ``src`` to the host; returns (host tensor, event to wait on or None)."""
        if self.on_host or src.device.type == "cpu":
            return src, None
        dst = self.staging("grad", index, src.numel(), src.dtype)
        if self._down is None:
            dst.copy_(src)
            return dst, None
        self._down.wait_stream(torch.cuda.current_stream(self.device))  # the gradient is complete
        with torch.cuda.stream(self._down):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._down)
        src.record_stream(self._down)
        return dst, event

    @staticmethod
    def ready(event: object | None) -> None:
        """Block the CPU until a :meth:`down` copy has landed."""
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]

    def up(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Start copying host ``src`` into accelerator ``dst`` (no-op when they are the same memory)."""
        if src.data_ptr() == dst.data_ptr():
            return
        if self._up is None or dst.device.type == "cpu":
            dst.copy_(src)
            return
        with torch.cuda.stream(self._up):
            dst.copy_(src, non_blocking=True)

    def finish(self) -> None:
        """Make the compute stream wait for every up-copy (the parameters are then current)."""
        if self._up is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._up)
