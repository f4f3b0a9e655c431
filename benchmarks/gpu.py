"""GPU benchmarks, side by side in one run: Adam kernels against the memory-bandwidth floor, and the engine's
training step against plain torch on the same GPT.

1. Adam (fp32 params, grads and moments, split into ``--tensors`` tensors like a model's parameters):
   ds-native ``FusedAdam`` vs ``torch.optim.AdamW(fused=True)`` vs ``AdamW(foreach=True)``, all three
   stepping the very same buffers. A step reads p, g, m, v and writes p, m, v: 28 bytes per parameter,
   so ``28 × params / time`` is the bandwidth it reached; the floor is a device-to-device copy measured
   in the same run (``dst.copy_(src)``, read + write). Goals: FusedAdam at least torch's fused, and at
   least 85% of the copy bandwidth.
2. Engine: a GPT of ~350M parameters (GPT-2 medium: 24 layers, d 1024, vocab 50304, seq 1024), one GPU,
   bf16 with ZeRO stage 0, 1 and 2 (``zero_all.initialize``) against plain torch on the same model
   (fp32 weights, ``torch.autocast(bfloat16)``, ``AdamW(fused=True)``), both clipping at 1.0. Step time,
   model TFLOPS (``6·params + 12·layers·d·seq`` FLOPs per token: PaLM's count, attention included) and
   peak GPU memory. Goal: the engine's step at most 1.05× plain torch's.

Without a CUDA device it says so in one line, writes ``{"cuda": false, ...}`` to ``--json`` and exits 0.
``--dry-run`` runs every code path on the CPU at toy sizes (figures meaningless; for checking the script).

    python benchmarks/gpu.py [--quick] [--json PATH] [--dry-run] [--only adam|engine]
                             [--sizes 1e8 5e8 1e9] [--tensors 64] [--layers 24 --d-model 1024 --seq 1024 --batch 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/act_ckpt.py and amp_scaler.py would shadow the packages of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
BYTES_PER_PARAM = 28  # fp32 Adam: read p, g, m, v (16), write p, m, v (12)
ADAM_HYPER = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
GOALS = {"adam_vs_torch_fused": 1.0, "adam_frac_of_copy": 0.85, "engine_vs_torch": 1.05}

# Sizes per mode: Adam parameter counts; the engine's GPT; timed repetitions.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "sizes": [1e8, 5e8, 1e9],
        "gpt": {"layers": 24, "d_model": 1024, "heads": 16, "vocab": 50304, "seq": 1024, "batch": 8},
        "adam_rounds": 7,
        "adam_reps": 10,
        "warmup": 3,
        "steps": 10,
    },
    "quick": {
        "sizes": [1e8],
        "gpt": {"layers": 12, "d_model": 768, "heads": 12, "vocab": 50304, "seq": 512, "batch": 8},
        "adam_rounds": 5,
        "adam_reps": 5,
        "warmup": 2,
        "steps": 5,
    },
    "dry-run": {
        "sizes": [2e5],
        "gpt": {"layers": 2, "d_model": 64, "heads": 4, "vocab": 256, "seq": 32, "batch": 2},
        "adam_rounds": 2,
        "adam_reps": 2,
        "warmup": 1,
        "steps": 2,
    },
}


# ---- timing ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Wall time of ``reps`` calls (launch overhead included, as a training loop pays it) over ``reps``."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, reps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds of a fresh random order (drift and clock
    changes then fall on every implementation alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            times[name].append(_seconds_per_call(fns[name], reps, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---- 1. Adam against the bandwidth floor ------------------------------------------------------------------


def copy_bandwidth(device: torch.device, numel: int, rounds: int, reps: int) -> float:
    """GB/s of ``dst.copy_(src)`` over ``numel`` fp32 (bytes read + bytes written)."""
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = _interleaved({"copy": lambda: dst.copy_(src)}, rounds, reps, device)["copy"]
    return 2 * numel * 4 / t / 1e9


def _split(flat: torch.Tensor, k: int) -> list[torch.Tensor]:
    size = flat.numel() // k
    return list(flat.split([size] * (k - 1) + [flat.numel() - size * (k - 1)]))


def _adam_makers(device: torch.device) -> tuple[dict[str, Callable[..., torch.optim.Optimizer]], dict[str, str]]:
    """The implementations that can run here, and why the others cannot."""
    makers: dict[str, Callable[..., torch.optim.Optimizer]] = {}
    missing: dict[str, str] = {}
    try:
        import ds_native
        from ds_native.optim import FusedAdam

        if device.type != "cuda":
            missing["ds_native FusedAdam"] = "CUDA tensors only"
        elif not ds_native.build_info()["cuda"]:
            missing["ds_native FusedAdam"] = "ds-native was built without its CUDA extension"
        else:
            makers["ds_native FusedAdam"] = lambda ps: FusedAdam(ps, adamw_mode=True, **ADAM_HYPER)
    except ImportError as exc:
        missing["ds_native FusedAdam"] = f"ds-native not importable: {exc}"
    makers["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, fused=True, **ADAM_HYPER)
    makers["torch AdamW foreach"] = lambda ps: torch.optim.AdamW(ps, foreach=True, **ADAM_HYPER)
    return makers, missing


def bench_adam(device: torch.device, size: int, tensors: int, rounds: int, reps: int) -> list[dict[str, Any]]:
    """Every implementation steps the same params, grads and moments (pre-set as each one's state)."""
    gen = torch.Generator(device=device).manual_seed(0)
    flat_p = torch.randn(size, device=device, generator=gen).mul_(0.02)
    flat_g = torch.randn(size, device=device, generator=gen).mul_(1e-3)
    flat_m, flat_v = torch.zeros_like(flat_p), torch.zeros_like(flat_p)
    params = [torch.nn.Parameter(t) for t in _split(flat_p, tensors)]
    for p, g in zip(params, _split(flat_g, tensors), strict=True):
        p.grad = g
    makers, missing = _adam_makers(device)
    steps: dict[str, Callable[[], object]] = {}
    for name, make in makers.items():
        opt = make(params)
        fused = name == "torch AdamW fused"
        for p, m, v in zip(params, _split(flat_m, tensors), _split(flat_v, tensors), strict=True):
            # torch's fused kernel keeps the step count on the device; the others on the host.
            step = torch.zeros((), dtype=torch.float32, device=device if fused else "cpu")
            opt.state[p] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
        steps[name] = opt.step
    times = _interleaved(steps, rounds, reps, device)
    rows = []
    for name, t in times.items():
        rows.append({"size": size, "impl": name, "ms": t * 1e3, "gbps": BYTES_PER_PARAM * size / t / 1e9})
    for name, why in missing.items():
        rows.insert(0, {"size": size, "impl": name, "ms": None, "gbps": None, "skipped": why})
    del steps, params, flat_p, flat_g, flat_m, flat_v
    _free(device)
    return rows


# ---- 2. the engine against plain torch ----------------------------------------------------------------------


def _gpt(spec: dict[str, Any], device: torch.device) -> torch.nn.Module:
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    from gpt import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=spec["vocab"],
        block_size=spec["seq"],
        n_layer=spec["layers"],
        n_head=spec["heads"],
        n_embd=spec["d_model"],
        dropout=0.0,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: no host copy of 350M parameters
        return GPT(cfg)


def model_flops_per_step(num_params: int, spec: dict[str, Any]) -> float:
    """PaLM's count: 6 FLOPs per parameter per token, plus 12·layers·d·seq per token for attention."""
    tokens = spec["batch"] * spec["seq"]
    return tokens * (6 * num_params + 12 * spec["layers"] * spec["d_model"] * spec["seq"])


def _engine_config(spec: dict[str, Any], stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": spec["batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "overlap_comm": True},
    }


def _torch_step(spec: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Callable[..., float]]:
    model = _gpt(spec, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def _engine_step(spec: dict[str, Any], device: torch.device, stage: int) -> tuple[torch.nn.Module, Callable]:
    import zero_all

    engine, *_ = zero_all.initialize(model=_gpt(spec, device), config=_engine_config(spec, stage))
    if engine.device.type != device.type:
        raise RuntimeError(f"the engine chose {engine.device}, the benchmark runs on {device}")

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return engine, step


def bench_engine(
    device: torch.device, spec: dict[str, Any], warmup: int, steps: int, stages: list[int]
) -> list[dict[str, Any]]:
    """Step time, TFLOPS and peak memory of plain torch and of the engine at each ZeRO stage."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, spec["vocab"], (warmup + steps, spec["batch"], spec["seq"] + 1), generator=gen)
    variants: list[tuple[str, Callable[[], tuple[torch.nn.Module, Callable]]]] = [
        ("torch autocast+fused AdamW", lambda: _torch_step(spec, device))
    ]
    variants += [(f"zero-all ZeRO-{s} bf16", lambda s=s: _engine_step(spec, device, s)) for s in stages]
    rows = []
    for name, build in variants:
        _free(device)
        # Peak memory of this variant alone: whatever an earlier one left behind is subtracted.
        base_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        owner, step = build()
        module = getattr(owner, "module", owner)
        num_params = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
        batches = [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device)) for b in data]
        for x, y in batches[:warmup]:
            step(x, y)
        _sync(device)
        t0 = time.perf_counter()
        losses = [step(x, y) for x, y in batches[warmup:]]
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
        rows.append(
            {
                "variant": name,
                "params": num_params,
                "ms": seconds * 1e3,
                "tflops": model_flops_per_step(num_params, spec) / seconds / 1e12,
                "peak_gib": (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**30
                if device.type == "cuda"
                else None,
                "first_loss": float(losses[0]),
                "last_loss": float(losses[-1]),
            }
        )
        del owner, step, module, batches, losses
    _free(device)
    base = rows[0]["ms"]
    for r in rows:
        r["vs_torch"] = r["ms"] / base
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- report ----------------------------------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pipes), columns padded to their widest cell."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def count(n: float) -> str:
    """1.2B, 355M, 200K: parameter counts for the tables."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def goals(adam: list[dict[str, Any]], copy_gbps: float | None, engine: list[dict[str, Any]]) -> dict[str, Any]:
    """Each goal of the issue, measured: value and whether it is met (None when not measured)."""
    out: dict[str, Any] = {}
    ours = {r["size"]: r for r in adam if r["impl"] == "ds_native FusedAdam" and r["ms"] is not None}
    theirs = {r["size"]: r for r in adam if r["impl"] == "torch AdamW fused"}
    for size, r in ours.items():
        key = count(size)
        ratio = theirs[size]["ms"] / r["ms"]
        frac = r["gbps"] / copy_gbps if copy_gbps else None
        out[f"adam {key}: FusedAdam speed / torch fused"] = {
            "value": ratio,
            "met": ratio >= GOALS["adam_vs_torch_fused"],
        }
        out[f"adam {key}: FusedAdam GB/s / copy GB/s"] = {
            "value": frac,
            "met": None if frac is None else frac >= GOALS["adam_frac_of_copy"],
        }
    for r in engine[1:]:
        out[f"engine {r['variant']}: step / torch step"] = {
            "value": r["vs_torch"],
            "met": r["vs_torch"] <= GOALS["engine_vs_torch"],
        }
    return out


def report(result: dict[str, Any]) -> str:
    """The tables the run prints (also what tools/gpu_check.py shows from the JSON)."""
    parts = [f"{result['device_name']} | torch {result['torch']} (CUDA {result['torch_cuda']}) | {result['date']}"]
    if result.get("dry_run"):
        parts.append("DRY RUN on the CPU at toy sizes: the figures mean nothing")
    if result.get("copy_gbps"):
        parts.append(f"copy bandwidth (read + write): {result['copy_gbps']:.0f} GB/s")
    if result["adam"]:
        rows = []
        for r in result["adam"]:
            frac = r["gbps"] / result["copy_gbps"] if r.get("gbps") and result.get("copy_gbps") else None
            rows.append([count(r["size"]), r["impl"], r["ms"], r["gbps"], frac, r.get("skipped", "")])
        parts.append(format_table(["params", "Adam", "ms/step", "GB/s", "of copy", "note"], rows))
    if result["engine"]:
        rows = [
            [
                r["variant"],
                count(r["params"]),
                r["ms"],
                r["vs_torch"],
                r["tflops"],
                r["peak_gib"],
                r["last_loss"],
            ]
            for r in result["engine"]
        ]
        spec = result["gpt"]
        parts.append(
            f"GPT {spec['layers']} layers, d {spec['d_model']}, seq {spec['seq']}, batch {spec['batch']}, one device"
        )
        parts.append(format_table(["step", "params", "ms/step", "vs torch", "TFLOPS", "peak GiB", "loss"], rows))
    if result["goals"]:
        rows = [[k, v["value"], {True: "yes", False: "NO", None: "-"}[v["met"]]] for k, v in result["goals"].items()]
        parts.append(format_table(["goal", "value", "met"], rows))
    return "\n\n".join(parts)


def _no_cuda_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; the preset (full, quick, dry-run) fills what is not given."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100M-param Adam and a 12-layer GPT (well under a minute)")
    ap.add_argument("--dry-run", action="store_true", help="every code path on the CPU at toy sizes")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--only", choices=["adam", "engine"], help="run one part")
    ap.add_argument("--sizes", type=float, nargs="+", help="Adam parameter counts (e.g. 1e8 1e9)")
    ap.add_argument("--tensors", type=int, default=64, help="tensors the Adam parameters are split into")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    for key in ("layers", "d_model", "heads", "vocab", "seq", "batch"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key, help="GPT size (default: the preset's)")
    ap.add_argument("--steps", type=int, help="timed engine steps per variant")
    args = ap.parse_args(argv)
    args.mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    preset = PRESETS[args.mode]
    args.sizes = [int(s) for s in (args.sizes or preset["sizes"])]
    args.gpt = {k: getattr(args, k) or v for k, v in preset["gpt"].items()}
    if args.gpt["d_model"] % args.gpt["heads"]:
        ap.error(f"--d-model {args.gpt['d_model']} must be a multiple of --heads {args.gpt['heads']}")
    args.steps = args.steps or preset["steps"]
    args.warmup, args.adam_rounds, args.adam_reps = preset["warmup"], preset["adam_rounds"], preset["adam_reps"]
    if args.tensors < 1 or any(s < args.tensors for s in args.sizes):
        ap.error("--tensors must be >= 1 and at most every --sizes value")
    return args


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = _no_cuda_reason()
    base = {
        "benchmark": "gpu",
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
    }
    if reason is not None and not args.dry_run:
        print(f"benchmarks/gpu.py: no CUDA here ({reason}); nothing measured")
        _write(args.json, {**base, "cuda": False, "reason": reason})
        return 0
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    # The engine's device choice (zero_all.get_device) must match the benchmark's.
    os.environ["DS_ACCELERATOR"] = device.type
    result: dict[str, Any] = {
        **base,
        "cuda": reason is None,
        "dry_run": args.dry_run,
        "mode": args.mode,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor()}",
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else None,
        "gpt": args.gpt,
        "copy_gbps": None,
        "adam": [],
        "engine": [],
    }
    if args.only in (None, "adam"):
        result["copy_gbps"] = copy_bandwidth(device, max(args.sizes), args.adam_rounds, args.adam_reps)
        for size in args.sizes:
            result["adam"] += bench_adam(device, size, args.tensors, args.adam_rounds, args.adam_reps)
    if args.only in (None, "engine"):
        result["engine"] = bench_engine(device, args.gpt, args.warmup, args.steps, args.stages)
    result["goals"] = goals(result["adam"], result["copy_gbps"], result["engine"])
    print(report(result))
    _write(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
