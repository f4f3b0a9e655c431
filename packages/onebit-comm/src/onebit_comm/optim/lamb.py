"""1-bit LAMB (Li et al., 2021, arXiv:2104.06069), configured as DeepSpeed's ``"OneBitLamb"``.

Warm-up (steps ``1..freeze_step``): LAMB on gradients averaged in full precision, with DeepSpeed's
trust ratio ``clamp(||w|| / ||update||, min_coeff, max_coeff)`` per parameter, tracking an EMA of
it (``coeff_beta``) and, at ``freeze_step``, a copy of the variance ("fresh" variance).

Compression phase: the variance is frozen; the momentum is averaged with the 1-bit all-reduce after
scaling each parameter's momentum by ``scaling_coeff`` (computed once, at the first compressed step,
so that every parameter's momentum has the same RMS: one scale per chunk then suits them all). The
gradient is reconstructed from the momentum change to keep the fresh variance up to date, and the
frozen trust ratio is corrected by the *frozen-ratio factor* ``max(denom / denom_fresh)`` (mixed with
1 by the weight-decay share of the update), clamped to ``[factor_min, factor_max]`` and to within
``factor_threshold`` of the previous step's factor. ``p -= lr * coeff_freeze * factor * update``.

Per-parameter state that is not per element (trust-ratio EMA, last factor, scaling coefficient) is
kept as Python lists, one entry per parameter packed in the tensor (see ``bind_flat_layout``).
No bias correction, as in DeepSpeed 0.19 (``bias_correction`` etc. are accepted, no effect).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from onebit_comm.optim.base import CompressedOptimizer

__all__ = ["OneBitLamb"]


class OneBitLamb(CompressedOptimizer):
    """1-bit LAMB (see the module docstring for the algorithm).

    Args:
        params: parameters or param groups (``exp_avg_mask`` as for :class:`OneBitAdam`).
        lr, betas, eps, weight_decay: as for LAMB.
        freeze_step: warm-up steps before compression (DeepSpeed default 100000).
        max_coeff, min_coeff: bounds of the warm-up trust ratio (10.0, 0.01).
        coeff_beta: EMA rate of the trust ratio frozen for the compression phase (0.9).
        factor_max, factor_min, factor_threshold: bounds of the frozen-ratio factor and of its change
            per step (4.0, 0.5, 0.1).
        bias_correction, eps_inside_sqrt, max_grad_norm: accepted for DeepSpeed configs; no effect (as there).
        amsgrad: must be False. cuda_aware, comm_backend_name: accepted; torch.distributed carries the bytes.
        process_group: the data-parallel group (None: the default group).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        freeze_step: int = 100000,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
        cuda_aware: bool = False,
        comm_backend_name: str = "nccl",
        coeff_beta: float = 0.9,
        factor_max: float = 4.0,
        factor_min: float = 0.5,
        factor_threshold: float = 0.1,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if int(freeze_step) < 0:
            raise ValueError(f"OneBitLamb: freeze_step must be >= 0, got {freeze_step!r}")
        if not 0 < min_coeff <= max_coeff:
            raise ValueError(f"OneBitLamb: need 0 < min_coeff <= max_coeff, got {min_coeff!r}, {max_coeff!r}")
        if not 0 < factor_min <= factor_max:
            raise ValueError(f"OneBitLamb: need 0 < factor_min <= factor_max, got {factor_min!r}, {factor_max!r}")
        if not 0.0 <= coeff_beta < 1.0 or factor_threshold < 0:
            raise ValueError("OneBitLamb: coeff_beta must be in [0, 1) and factor_threshold >= 0")
        super().__init__(
            params,
            name="OneBitLamb",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt,
            max_grad_norm=max_grad_norm,
            amsgrad=amsgrad,
            cuda_aware=cuda_aware,
            comm_backend_name=comm_backend_name,
            process_group=process_group,
            # max_coeff / min_coeff are read per param group; the rest optimizer-wide.
            settings={
                "freeze_step": int(freeze_step),
                "coeff_beta": float(coeff_beta),
                "factor_max": float(factor_max),
                "factor_min": float(factor_min),
                "factor_threshold": float(factor_threshold),
                "max_coeff": max_coeff,
                "min_coeff": min_coeff,
            },
        )
        self.lamb_coeffs: list[float] = []  # the trust ratios of the last step (DeepSpeed exposes these too)

    def needs_averaged_gradients(self) -> bool:
        """True during warm-up (steps ``<= freeze_step``)."""
        return self._next_step() <= self.freeze_step

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            s = len(self.segments(p))
            state["step"] = 0
            for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_fresh"):
                state[k] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["lamb_coeff_freeze"] = [0.0] * s
            state["last_factor"] = [1.0] * s
        return state

    def _views(self, p: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        flat = t.view(-1)
        return [flat[o : o + n] for o, n in self.segments(p)]

    @staticmethod
    def _norms(ts: list[torch.Tensor]) -> list[float]:
        # One host sync for all segments, not one per parameter.
        return torch.stack([torch.linalg.vector_norm(t) for t in ts]).tolist()

    def _set_scaling_coeffs(self) -> None:
        """Once, at the first compressed step: equalise every parameter's momentum RMS (DeepSpeed's rule)."""
        rms: dict[torch.Tensor, list[float]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "scaling_coeff" not in st:
                    views = self._views(p, st["exp_avg"])
                    rms[p] = [
                        nrm / math.sqrt(max(1, v.numel())) for nrm, v in zip(self._norms(views), views, strict=True)
                    ]
        every = [r for rs in rms.values() for r in rs]
        if not every:
            return
        united = sum(every) / len(every)
        for p, rs in rms.items():
            self.state[p]["scaling_coeff"] = [united / r if r > 0 else 1.0 for r in rs]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One warm-up or compressed step."""
        loss = self._run_closure(closure)
        self.lamb_coeffs = []
        warm = self.needs_averaged_gradients()
        if not warm:
            self._set_scaling_coeffs()
        for group, p, grad in self._grads():
            state = self._init_state(p)
            if warm:
                self._warm_step(p, group, state, self._average_(grad))
            else:
                if "scaling_coeff" not in state:  # a parameter that had no gradient until now
                    state["scaling_coeff"] = [1.0] * len(self.segments(p))
                self._compressed_step(p, group, state, grad)
            state["step"] += 1
        return loss

    def _warm_step(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> None:
        b1, b2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if state["step"] + 1 == self.freeze_step:
            state["exp_avg_sq_fresh"].copy_(v)
        update = m / (v.sqrt() + group["eps"])
        if group["weight_decay"] > 0.0:
            update.add_(p, alpha=group["weight_decay"])
        pv, uv = self._views(p, p), self._views(p, update)
        w_norms, u_norms = self._norms(pv), self._norms(uv)
        for s, (pw, u, wn, un) in enumerate(zip(pv, uv, w_norms, u_norms, strict=True)):
            coeff = 1.0
            if wn != 0 and un != 0:
                coeff = min(max(wn / un, group["min_coeff"]), group["max_coeff"])
            if coeff != 1.0:
                state["lamb_coeff_freeze"][s] = (
                    self.coeff_beta * state["lamb_coeff_freeze"][s] + (1 - self.coeff_beta) * coeff
                )
            self.lamb_coeffs.append(coeff)
            pw.add_(u, alpha=-group["lr"] * coeff)

    def _compressed_step(
        self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor
    ) -> None:
        b1, b2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        m, v, v_fresh = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_sq_fresh"]
        m_last = m.clone()
        m.mul_(b1).add_(grad, alpha=1 - b1)
        mv = self._views(p, m)
        for t, c in zip(mv, state["scaling_coeff"], strict=True):
            t.mul_(c)
        self._compressed_(p, m)
        for t, c in zip(mv, state["scaling_coeff"], strict=True):
            t.div_(c)
        self._mask_(group, m)
        g_rec = (m - m_last * b1) / (1 - b1)
        v_fresh.mul_(b2).addcmul_(g_rec, g_rec, value=1 - b2)
        denom = v.sqrt() + eps
        prelim = m / denom
        update = prelim + wd * p if wd > 0.0 else prelim
        ratio_max = (denom / (v_fresh.sqrt() + eps)).view(-1)
        segs = self.segments(p)
        factors = torch.stack([ratio_max[o : o + n].max() for o, n in segs]).tolist()
        if wd > 0.0:
            ratios = [
                min(1.0, a / b) if b > 0 else 1.0
                for a, b in zip(self._norms(self._views(p, prelim)), self._norms(self._views(p, update)), strict=True)
            ]
        for s, (pw, u) in enumerate(zip(self._views(p, p), self._views(p, update), strict=True)):
            factor = factors[s]
            if wd > 0.0:
                factor = factor * ratios[s] + (1.0 - ratios[s])
            factor = min(max(factor, self.factor_min), self.factor_max)
            last = state["last_factor"][s]
            factor = min(max(factor, last * (1.0 - self.factor_threshold)), last * (1.0 + self.factor_threshold))
            state["last_factor"][s] = factor
            coeff = state["lamb_coeff_freeze"][s] * factor
            self.lamb_coeffs.append(coeff)
            pw.add_(u, alpha=-group["lr"] * coeff)
