"""``zero_all.accelerator.get_accelerator()``: DeepSpeed's accelerator object, over ``torch.accelerator``.

DeepSpeed scripts (DeepSpeed-Chat's, most examples) never name CUDA directly: they write
``get_accelerator().device_name(local_rank)``, ``get_accelerator().empty_cache()``,
``get_accelerator().is_bf16_supported()``. This module gives the same methods with DeepSpeed's
return values, in two implementations chosen the way torch chooses its current accelerator:

- :class:`DeviceAccelerator` for the device ``torch.accelerator.current_accelerator()`` reports
  (CUDA here; any accelerator torch knows works through the same generic calls);
- :class:`CPUAccelerator` when there is none, with DeepSpeed's CPU-accelerator semantics: memory
  queries report this process's resident memory (the peak is the largest value sampled since the
  last reset), streams and events are ``None`` and ``stream()`` is a no-op context, the device
  count is ``LOCAL_SIZE`` or the number of NUMA nodes with CPUs.

``DS_ACCELERATOR=cpu`` (DeepSpeed's variable) forces the CPU one; :func:`set_accelerator` installs
any object. Only the commonly used part of DeepSpeed's interface is provided: op builders, graph
capture and the legacy ``*Tensor`` type properties are not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["CPUAccelerator", "DeviceAccelerator", "get_accelerator", "set_accelerator"]


class _Common:
    """What both implementations share: names, dtypes, pinning, tensor placement."""

    _name: str
    _communication_backend_name: str

    def communication_backend_name(self) -> str:
        """The torch.distributed backend for this device (nccl for CUDA, gloo for the CPU)."""
        return self._communication_backend_name

    def supported_dtypes(self) -> list[torch.dtype]:
        """fp32, plus bf16/fp16 where supported."""
        out = [torch.float32]
        if self.is_bf16_supported():
            out.append(torch.bfloat16)
        if self.is_fp16_supported():
            out.append(torch.float16)
        return out

    def is_bf16_supported(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def is_fp16_supported(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def random(self) -> Any:
        """The ``torch.random`` module (DeepSpeed's accessor)."""
        return torch.random

    def lazy_call(self, callback: Callable[[], Any]) -> Any:
        """Run ``callback`` (now: there is no lazy device initialisation to wait for)."""
        return callback()

    def range_push(self, msg: str, domain: Any = None, category: Any = None) -> None:
        """Open a profiler range (a no-op outside CUDA)."""

    def range_pop(self, domain: Any = None) -> None:
        """Close a profiler range (a no-op outside CUDA)."""

    def is_triton_supported(self) -> bool:
        """Whether Triton kernels can run (only on CUDA with triton installed)."""
        return False

    def visible_devices_envs(self) -> list[str]:
        """The environment variables that select visible devices."""
        return ["CUDA_VISIBLE_DEVICES"]

    def set_visible_devices_envs(self, current_env: dict[str, str], local_accelerator_ids: list[int]) -> None:
        """Set those variables in ``current_env`` to ``local_accelerator_ids``."""
        for env in self.visible_devices_envs():
            current_env[env] = ",".join(map(str, local_accelerator_ids))

    def export_envs(self) -> list[str]:
        """Environment-variable prefixes a launcher forwards (``NCCL`` on CUDA)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self._name!r}, backend={self._communication_backend_name!r})"


class DeviceAccelerator(_Common):
    """A torch accelerator device (``cuda``, ...) through torch.accelerator and its device module."""

    def __init__(self, device_type: str = "cuda") -> None:
        self._name = device_type
        self._mod = torch.get_device_module(device_type)
        self._communication_backend_name = {"cuda": "nccl", "xpu": "xccl", "hpu": "hccl"}.get(device_type, "gloo")

    # ---- device
    def is_synchronized_device(self) -> bool:
        """False: kernels run asynchronously to the host."""
        return False

    def use_host_timers(self) -> bool:
        """Whether host timers measure device work (not for an asynchronous device)."""
        return self.is_synchronized_device()

    def resolves_data_dependency(self) -> bool:
        """As DeepSpeed: same as :meth:`is_synchronized_device`."""
        return self.is_synchronized_device()

    def handles_memory_backpressure(self) -> bool:
        """As DeepSpeed: same as :meth:`is_synchronized_device`."""
        return self.is_synchronized_device()

    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"``, or ``"cuda:<i>"`` with an index."""
        return self._name if device_index is None else f"{self._name}:{device_index}"

    def device(self, device_index: int | None = None) -> torch.device:
        """A ``torch.device`` for that index."""
        return torch.device(self._name, device_index)

    def set_device(self, device_index: int) -> None:
        """Make ``device_index`` this process's current device."""
        torch.accelerator.set_device_index(device_index)

    def current_device(self) -> int:
        """The current device's index."""
        return torch.accelerator.current_device_index()

    def current_device_name(self) -> str:
        """``"cuda:<current index>"``."""
        return f"{self._name}:{self.current_device()}"

    def device_count(self) -> int:
        """Devices visible to this process."""
        return torch.accelerator.device_count()

    def is_available(self) -> bool:
        """Whether the device can be used."""
        return torch.accelerator.is_available()

    def synchronize(self, device_index: int | None = None) -> None:
        """Wait for all kernels on the device."""
        torch.accelerator.synchronize(device_index)

    # ---- RNG
    def manual_seed(self, seed: int) -> None:
        """Seed the current device's generator."""
        self._mod.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        """Seed every device's generator."""
        self._mod.manual_seed_all(seed)

    def initial_seed(self) -> int:
        """The current device's initial seed."""
        return int(self._mod.initial_seed())

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        """The device generator's state (a ByteTensor)."""
        return self._mod.get_rng_state() if device_index is None else self._mod.get_rng_state(device_index)

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        """Restore a state from :meth:`get_rng_state`."""
        if device_index is None:
            self._mod.set_rng_state(new_state)
        else:
            self._mod.set_rng_state(new_state, device_index)

    def default_generator(self, device_index: int) -> torch.Generator:
        """The default generator of device ``device_index``."""
        return self._mod.default_generators[device_index]

    # ---- streams and events
    @property
    def Stream(self) -> type:
        """The device's stream class."""
        return self._mod.Stream

    @property
    def Event(self) -> type:
        """The device's event class."""
        return self._mod.Event

    def stream(self, stream: Any) -> Any:
        """A context that makes ``stream`` current."""
        return self._mod.stream(stream)

    def current_stream(self, device_index: int | None = None) -> Any:
        """The current stream."""
        return self._mod.current_stream(device_index)

    def default_stream(self, device_index: int | None = None) -> Any:
        """The default stream."""
        return self._mod.default_stream(device_index)

    # ---- memory
    def empty_cache(self) -> None:
        """Release cached, unused device memory."""
        torch.accelerator.empty_cache()

    def memory_allocated(self, device_index: int | None = None) -> int:
        """Bytes held by tensors."""
        return torch.accelerator.memory_allocated(device_index)

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        """Peak of :meth:`memory_allocated` since the last reset."""
        return torch.accelerator.max_memory_allocated(device_index)

    def reset_max_memory_allocated(self, device_index: int | None = None) -> None:
        """Reset the peak counters."""
        torch.accelerator.reset_peak_memory_stats(device_index)

    def memory_reserved(self, device_index: int | None = None) -> int:
        """Bytes held by the caching allocator."""
        return torch.accelerator.memory_reserved(device_index)

    def max_memory_reserved(self, device_index: int | None = None) -> int:
        """Peak of :meth:`memory_reserved`."""
        return torch.accelerator.max_memory_reserved(device_index)

    memory_cached = memory_reserved
    max_memory_cached = max_memory_reserved
    reset_max_memory_cached = reset_max_memory_allocated

    def memory_stats(self, device_index: int | None = None) -> dict[str, Any]:
        """The allocator's statistics."""
        return dict(torch.accelerator.memory_stats(device_index))

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        """Reset the peak counters."""
        torch.accelerator.reset_peak_memory_stats(device_index)

    def total_memory(self, device_index: int | None = None) -> int:
        """The device's memory in bytes."""
        return int(torch.accelerator.get_memory_info(device_index)[1])

    def available_memory(self, device_index: int | None = None) -> int:
        """Free device memory in bytes (as the driver reports it)."""
        return int(torch.accelerator.get_memory_info(device_index)[0])

    # ---- data types and tensors
    def is_bf16_supported(self) -> bool:
        """Whether bf16 kernels run natively."""
        fn = getattr(self._mod, "is_bf16_supported", None)
        return bool(fn()) if fn is not None else True

    def is_fp16_supported(self) -> bool:
        """Whether fp16 runs (CUDA: compute capability 6.0 or newer, as DeepSpeed checks)."""
        if self._name == "cuda":
            major, _ = torch.cuda.get_device_capability()
            return major >= 6
        return True

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1, **_: Any) -> torch.Tensor:
        """A page-locked copy of a CPU tensor (fast, asynchronous host-to-device copies)."""
        return tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is page-locked."""
        return tensor.is_pinned()

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives on this device type."""
        return tensor.device.type == self._name

    def is_triton_supported(self) -> bool:
        """CUDA with compute capability 8.0+ and triton installed."""
        if self._name != "cuda":
            return False
        try:
            import triton  # noqa: F401  # type: ignore[import-not-found]
        except ImportError:
            return False
        return torch.cuda.get_device_capability()[0] >= 8

    def export_envs(self) -> list[str]:
        """``NCCL`` variables are forwarded by launchers on CUDA."""
        return ["NCCL"] if self._name == "cuda" else []

    def range_push(self, msg: str, domain: Any = None, category: Any = None) -> None:
        """Open an NVTX range (CUDA)."""
        if self._name == "cuda":
            torch.cuda.nvtx.range_push(msg)

    def range_pop(self, domain: Any = None) -> None:
        """Close the NVTX range."""
        if self._name == "cuda":
            torch.cuda.nvtx.range_pop()


def _rss_bytes() -> int:
    """This process's resident memory (Linux /proc; ru_maxrss elsewhere, which is the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _numa_nodes_with_cpus() -> int:
    nodes = 0
    for node in Path("/sys/devices/system/node").glob("node[0-9]*"):
        try:
            if (node / "cpulist").read_text().strip():
                nodes += 1
        except OSError:
            continue
    return max(nodes, 1)


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class CPUAccelerator(_Common):
    """DeepSpeed's CPU accelerator: the host as the device (see the module docstring)."""

    def __init__(self) -> None:
        self._name = "cpu"
        self._communication_backend_name = "gloo"
        self._max_mem = _rss_bytes()

    def is_synchronized_device(self) -> bool:
        """True: CPU ops finish before they return."""
        return True

    def use_host_timers(self) -> bool:
        """True."""
        return True

    def resolves_data_dependency(self) -> bool:
        """True."""
        return True

    def handles_memory_backpressure(self) -> bool:
        """True."""
        return True

    def device_name(self, device_index: int | None = None) -> str:
        """Always ``"cpu"`` (the index is ignored, as in DeepSpeed)."""
        return "cpu"

    def device(self, device_index: int | None = None) -> torch.device:
        """``torch.device("cpu")``."""
        return torch.device("cpu")

    def set_device(self, device_index: int) -> None:
        """Nothing to select on the CPU."""

    def current_device(self) -> int:
        """``LOCAL_RANK`` (0 without a launcher), as DeepSpeed's CPU accelerator."""
        return int(os.environ.get("LOCAL_RANK", "0"))

    def current_device_name(self) -> str:
        """``"cpu"``."""
        return "cpu"

    def device_count(self) -> int:
        """``LOCAL_SIZE`` when a launcher set it, else the NUMA nodes that have CPUs (at least 1)."""
        local = int(os.environ.get("LOCAL_SIZE", "0"))
        return local if local > 0 else _numa_nodes_with_cpus()

    def is_available(self) -> bool:
        """True."""
        return True

    def synchronize(self, device_index: int | None = None) -> None:
        """Nothing to wait for."""

    # ---- RNG: the CPU generator
    def manual_seed(self, seed: int) -> None:
        """Seed torch's CPU generator."""
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        """Seed torch's CPU generator (there is one)."""
        torch.manual_seed(seed)

    def initial_seed(self) -> int:
        """torch's initial seed."""
        return int(torch.initial_seed())

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        """The CPU generator's state."""
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        """Restore the CPU generator's state."""
        torch.set_rng_state(new_state)

    def default_generator(self, device_index: int | None = None) -> torch.Generator:
        """``torch.default_generator``."""
        return torch.default_generator

    # ---- streams and events: none on the CPU
    Stream = None
    """No streams on the CPU (DeepSpeed's CPU accelerator returns None too)."""
    Event = None
    """No events on the CPU."""

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[None]:
        """A no-op context."""
        return contextlib.nullcontext()

    def current_stream(self, device_index: int | None = None) -> None:
        """None."""
        return None

    def default_stream(self, device_index: int | None = None) -> None:
        """None."""
        return None

    # ---- memory: this process's resident set
    def _sample(self) -> int:
        mem = _rss_bytes()
        self._max_mem = max(self._max_mem, mem)
        return mem

    def empty_cache(self) -> None:
        """Nothing cached."""

    def memory_allocated(self, device_index: int | None = None) -> int:
        """This process's resident memory in bytes."""
        return self._sample()

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        """The largest resident memory sampled since the last reset."""
        self._sample()
        return self._max_mem

    def reset_max_memory_allocated(self, device_index: int | None = None) -> None:
        """Restart the peak from the current resident memory."""
        self._max_mem = _rss_bytes()

    memory_reserved = memory_allocated
    memory_cached = memory_allocated
    max_memory_reserved = max_memory_allocated
    max_memory_cached = max_memory_allocated
    reset_max_memory_cached = reset_max_memory_allocated
    reset_peak_memory_stats = reset_max_memory_allocated

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        """``allocated_bytes.all.current`` and ``.peak``, as DeepSpeed's CPU accelerator reports."""
        current = self._sample()
        return {"allocated_bytes.all.current": current, "allocated_bytes.all.peak": self._max_mem}

    def total_memory(self, device_index: int | None = None) -> int:
        """The machine's physical memory in bytes."""
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def available_memory(self, device_index: int | None = None) -> int:
        """``MemAvailable`` from /proc/meminfo (free pages elsewhere)."""
        avail = _meminfo("MemAvailable")
        return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    # ---- data types and tensors
    def is_bf16_supported(self) -> bool:
        """True (DeepSpeed's CPU accelerator says so; torch has bf16 CPU kernels)."""
        return True

    def is_fp16_supported(self) -> bool:
        """Whether oneDNN has fp16 kernels for this CPU (DeepSpeed's test)."""
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            return False

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1, **_: Any) -> torch.Tensor:
        """The tensor itself: there is no device to pin for."""
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is page-locked."""
        return tensor.is_pinned() if torch.accelerator.is_available() else False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is on the CPU."""
        return tensor.device.type == "cpu"


_ACCELERATOR: Any = None


def _choose() -> Any:
    forced = os.environ.get("DS_ACCELERATOR")
    if forced is not None:
        if forced == "cpu":
            return CPUAccelerator()
        current = torch.accelerator.current_accelerator()
        if current is None or current.type != forced:
            raise RuntimeError(
                f"DS_ACCELERATOR={forced!r}: torch reports {current.type if current else 'no'} accelerator; "
                "accepted: 'cpu' or the type torch.accelerator.current_accelerator() reports"
            )
        return DeviceAccelerator(forced)
    current = torch.accelerator.current_accelerator(check_available=True)
    return DeviceAccelerator(current.type) if current is not None else CPUAccelerator()


def get_accelerator() -> Any:
    """This process's accelerator (created on first use; see the module docstring for the choice)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = _choose()
    return _ACCELERATOR


def set_accelerator(accel: Any) -> None:
    """Install ``accel`` as what :func:`get_accelerator` returns (None: choose again on next use)."""
    global _ACCELERATOR
    _ACCELERATOR = accel


@contextlib.contextmanager
def _using(accel: Any) -> Iterator[None]:
    """Temporarily install an accelerator (tests)."""
    global _ACCELERATOR
    old = _ACCELERATOR
    _ACCELERATOR = accel
    try:
        yield
    finally:
        _ACCELERATOR = old
