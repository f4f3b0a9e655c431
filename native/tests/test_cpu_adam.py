"""CPUAdam against torch.optim.Adam/AdamW and a float64 reference, on every compiled ISA.

Tolerances: all ISA variants run the same IEEE operations, so they must agree bitwise.
Against torch (same formula, a few float roundings in another order) parameters agree to
~1e-6; against float64 our error must stay within 2x torch's own float32 error (+1e-6).
"""

from __future__ import annotations

import pytest
import torch

import ds_native
from ds_native import _ds_native_cpu
from ds_native.optim import CPUAdam, cpu_adam_step

ISAS = [isa for isa in ds_native.build_info()["cpu_isa_variants"] if _ds_native_cpu.isa_supported_by_cpu(isa)]
STEPS = 100


def _groups_spec() -> list[dict]:
    # Several groups with per-group overrides; sizes 0, 1, 7, 1023 (not multiples of any SIMD width).
    return [
        {"sizes": [0, 1, 7], "hyper": {}},
        {"sizes": [1023, 33], "hyper": {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}},
    ]


def _make_params(sizes_per_group: list[list[int]], gen: torch.Generator) -> list[list[torch.Tensor]]:
    return [[torch.randn(n, generator=gen) for n in sizes] for sizes in sizes_per_group]


class Float64Adam:
    """Textbook Adam/AdamW in float64 (the reference every float32 implementation approximates)."""

    def __init__(self, params: list[torch.Tensor], lr, betas, eps, weight_decay, adamw_mode, bias_correction=True):
        self.p = [p.double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.adamw, self.bc, self.t = adamw_mode, bias_correction, 0

    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        bc1 = 1 - self.b1**self.t if self.bc else 1.0
        bc2 = 1 - self.b2**self.t if self.bc else 1.0
        for i, g in enumerate(grads):
            g = g.double()
            if self.wd and not self.adamw:
                g = g + self.wd * self.p[i]
            if self.wd and self.adamw:
                self.p[i] = self.p[i] * (1 - self.lr * self.wd)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            denom = self.v[i].sqrt() / bc2**0.5 + self.eps
            self.p[i] = self.p[i] - (self.lr / bc1) * self.m[i] / denom


def _max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max([(x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True) if x.numel()] + [0.0])


@pytest.mark.parametrize("adamw_mode", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd"])
def test_matches_torch_and_float64_on_every_isa(adamw_mode: bool, weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(1000 + 10 * adamw_mode + int(weight_decay > 0))
    spec = _groups_spec()
    init = _make_params([g["sizes"] for g in spec], gen)
    defaults = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}

    def groups(tensors: list[list[torch.Tensor]]) -> list[dict]:
        return [{"params": ps, **g["hyper"]} for ps, g in zip(tensors, spec, strict=True)]

    ours = {isa: [[torch.nn.Parameter(p.clone()) for p in ps] for ps in init] for isa in ISAS}
    opts = {isa: CPUAdam(groups(ours[isa]), adamw_mode=adamw_mode, **defaults) for isa in ISAS}
    theirs = [[torch.nn.Parameter(p.clone()) for p in ps] for ps in init]
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    torch_opt = torch_cls(groups(theirs), **defaults)
    refs = [
        Float64Adam(ps, **{**defaults, **g["hyper"]}, adamw_mode=adamw_mode) for ps, g in zip(init, spec, strict=True)
    ]

    for _ in range(STEPS):
        grads = [[torch.randn(p.shape, generator=gen) for p in ps] for ps in init]  # fresh every step
        for isa in ISAS:
            for ps, gs in zip(ours[isa], grads, strict=True):
                for p, g in zip(ps, gs, strict=True):
                    p.grad = g.clone()
            with ds_native.forced_isa(isa):
                opts[isa].step()
        for ps, gs in zip(theirs, grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
        torch_opt.step()
        for ref, gs in zip(refs, grads, strict=True):
            ref.step(gs)

    flat = {isa: [p.detach() for ps in ours[isa] for p in ps] for isa in ISAS}
    flat_torch = [p.detach() for ps in theirs for p in ps]
    flat_ref = [p for ref in refs for p in ref.p]
    for isa in ISAS:
        for a, b in zip(flat[isa], flat["scalar"], strict=True):
            assert torch.equal(a, b), f"{isa} differs from scalar"
    ours_vs_torch = _max_abs(flat["scalar"], flat_torch)
    assert ours_vs_torch < 1e-5
    assert _max_abs(flat["scalar"], flat_ref) <= 2 * _max_abs(flat_torch, flat_ref) + 1e-6
    # The state is torch's too: step counts and moments.
    for p_ours, p_torch in zip(ours["scalar"][1], theirs[1], strict=True):
        s, t = opts["scalar"].state[p_ours], torch_opt.state[p_torch]
        assert s["step"].item() == t["step"].item() == STEPS
        torch.testing.assert_close(s["exp_avg"], t["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-5, atol=1e-7)


def test_large_tensor_with_tail_every_isa() -> None:
    # 10**6 + 3: many slices and a tail that is not a multiple of any vector width. Adam is
    # elementwise, so the float64 reference follows a sample of elements (every 101st and the tail).
    gen = torch.Generator().manual_seed(7)
    n = 10**6 + 3
    init = torch.randn(n, generator=gen)
    sample = torch.cat([torch.arange(0, n, 101), torch.arange(n - 40, n)])
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    ours = {isa: torch.nn.Parameter(init.clone()) for isa in ISAS}
    opts = {isa: CPUAdam([ours[isa]], **hyper) for isa in ISAS}
    theirs = torch.nn.Parameter(init.clone())
    torch_opt = torch.optim.AdamW([theirs], **hyper, fused=True)
    ref = Float64Adam([init[sample]], **hyper, adamw_mode=True)
    for _ in range(STEPS):
        g = torch.randn(n, generator=gen)
        for isa in ISAS:
            ours[isa].grad = g
            with ds_native.forced_isa(isa):
                opts[isa].step()
        theirs.grad = g
        torch_opt.step()
        ref.step([g[sample]])
    for isa in ISAS:
        assert torch.equal(ours[isa].detach(), ours["scalar"].detach()), isa
    assert _max_abs([ours["scalar"].detach()], [theirs.detach()]) < 1e-5
    got, torch_got = ours["scalar"].detach()[sample], theirs.detach()[sample]
    assert _max_abs([got], ref.p) <= 2 * _max_abs([torch_got], ref.p) + 1e-6


def test_bias_correction_off_matches_float64() -> None:
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(n, generator=gen) for n in (1, 7, 1023)]
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = CPUAdam(params, **hyper, bias_correction=False)
    ref = Float64Adam(init, **hyper, adamw_mode=True, bias_correction=False)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen) for p in init]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        ref.step(grads)
    assert _max_abs([p.detach() for p in params], ref.p) < 1e-5
    # And it really is different from the bias-corrected run.
    assert _max_abs([p.detach() for p in params], init) > 1e-3


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_grads_and_copy_out(low: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3 if low == torch.bfloat16 else 4)
    sizes = [0, 1, 7, 1023, 40_000]
    init = [torch.randn(n, generator=gen) for n in sizes]
    results = {}
    for isa in ISAS:
        p_low = [p.clone() for p in init]  # grads handed in as bf16/fp16
        p_f32 = [p.clone() for p in init]  # the same grads, upcast first (what torch would do)
        opt_low = CPUAdam([torch.nn.Parameter(p) for p in p_low], lr=1e-2, weight_decay=0.01)
        opt_f32 = CPUAdam([torch.nn.Parameter(p) for p in p_f32], lr=1e-2, weight_decay=0.01)
        outs = [torch.empty(n, dtype=low) for n in sizes]
        g_gen = torch.Generator().manual_seed(99)
        with ds_native.forced_isa(isa):
            for _ in range(20):
                grads = [torch.randn(n, generator=g_gen).to(low) for n in sizes]
                opt_low.step(grads=grads, out=outs)
                opt_f32.step(grads=[g.float() for g in grads])
                for p, o in zip(opt_low.param_groups[0]["params"], outs, strict=True):
                    # Copy-out: exactly the fp32 result rounded to nearest even, as torch rounds it.
                    assert torch.equal(o.view(torch.int16), p.detach().to(low).view(torch.int16))
        for a, b in zip(opt_low.param_groups[0]["params"], opt_f32.param_groups[0]["params"], strict=True):
            assert torch.equal(a, b)  # the kernel's upcast is exact
        results[isa] = [p.detach().clone() for p in opt_low.param_groups[0]["params"]]
    for isa in ISAS:
        assert all(torch.equal(a, b) for a, b in zip(results[isa], results["scalar"], strict=True)), isa


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_copy_out_rounding_of_every_kind_of_float(low: torch.dtype) -> None:
    # Random bit patterns cover NaNs (with payloads), infinities, denormals, overflow to
    # inf and exact ties; lr=0 leaves the params as they are (NaN stays NaN).
    gen = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31 - 1, (100_003,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x477FF000, 0x7F7FFFFF, 0x387FE000, -0x40800000], dtype=torch.int32)
    p = torch.cat([bits, ties]).view(torch.float32).clone()
    for isa in ISAS:
        q = p.clone()
        out = torch.empty(q.shape, dtype=low)
        with ds_native.forced_isa(isa):
            cpu_adam_step(
                [q], [torch.zeros_like(q)], [torch.zeros_like(q)], [torch.zeros_like(q)], 1, lr=0.0, out=[out]
            )
        assert torch.equal(q.isnan(), p.isnan())
        finite = ~p.isnan()
        assert torch.equal(q[finite], p[finite])
        assert torch.equal(out.view(torch.int16), q.to(low).view(torch.int16)), isa


def test_bitwise_deterministic_for_thread_counts_and_reruns() -> None:
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(n, generator=gen) for n in (300_001, 5, 70_000)]
    grads = [[torch.randn(p.shape, generator=gen).bfloat16() for p in init] for _ in range(5)]
    runs = []
    for threads in (1, 2, 2):
        params = [p.clone() for p in init]
        opt = CPUAdam([torch.nn.Parameter(p) for p in params], lr=1e-3, weight_decay=0.01, num_threads=threads)
        for gs in grads:
            opt.step(grads=gs)
        runs.append(params)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))


def test_state_dict_moves_between_cpu_adam_and_torch() -> None:
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(n, generator=gen) for n in (7, 300)]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(10)]

    def run(first: str, second: str, adamw: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(p.clone()) for p in init]

        def make(kind: str) -> torch.optim.Optimizer:
            if kind == "ours":
                return CPUAdam(params, lr=1e-2, weight_decay=0.1, adamw_mode=adamw)
            cls = torch.optim.AdamW if adamw else torch.optim.Adam
            return cls(params, lr=1e-2, weight_decay=0.1)

        opt = make(first)
        for i, gs in enumerate(grads):
            if i == 5:  # hand over mid-run through state_dict
                sd = opt.state_dict()
                opt = make(second)
                opt.load_state_dict(sd)
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step()
        return [p.detach() for p in params]

    for adamw in (True, False):
        baseline = run("ours", "ours", adamw)
        for first, second in (("ours", "torch"), ("torch", "ours")):
            got = run(first, second, adamw)
            assert _max_abs(got, baseline) < 1e-6, (first, second, adamw)


def test_loaded_torch_state_keeps_adam_mode() -> None:
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    torch_opt = torch.optim.Adam([p], lr=1e-2, weight_decay=0.1)  # L2 mode
    torch_opt.step()
    ours = CPUAdam([p])
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["adamw_mode"] is False
    assert ours.param_groups[0]["weight_decay"] == 0.1
    assert ours.state[p]["step"].item() == 1


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        CPUAdam([torch.nn.Parameter(torch.randn(4, 4).t())]).step(grads=[torch.randn(4, 4).t().contiguous()])
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    p.grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 not supported"):
        CPUAdam([p]).step()
    p = torch.nn.Parameter(torch.randn(4, device="meta"))
    p.grad = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="cpu tensors only"):
        CPUAdam([p]).step()
    q = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"gradient of param 0.*3 elements"):
        CPUAdam([q]).step(grads=[torch.randn(3)])
    with pytest.raises(TypeError, match="out for param 0"):
        CPUAdam([q]).step(grads=[torch.randn(4)], out=[torch.empty(4)])
    with pytest.raises(ValueError, match=r"grads=.*2 entries"):
        CPUAdam([q]).step(grads=[torch.randn(4), torch.randn(4)])
    with pytest.raises(ValueError, match="betas"):
        CPUAdam([q], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        CPUAdam([q], lr=-1.0)
    opt = CPUAdam([q])
    opt.param_groups[0]["amsgrad"] = True
    q.grad = torch.randn(4)
    with pytest.raises(NotImplementedError, match="amsgrad"):
        opt.step()
    with pytest.raises(ValueError, match="exp_avgs: has 0 entries"):
        cpu_adam_step([q.detach()], [q.grad], [], [], 1, lr=1e-3)


def test_params_without_grad_are_skipped_and_closure_runs() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = CPUAdam([a, b], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (a * 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert torch.all(a.detach() < 1.0)


class _SubclassedCPUAdam(CPUAdam):
    def step(self, closure=None, **kwargs):  # torch's Optimizer hooks this override itself
        return super().step(closure, **kwargs)


@pytest.mark.parametrize("cls", [CPUAdam, _SubclassedCPUAdam], ids=["CPUAdam", "subclass"])
def test_step_hooks_run_once_and_may_replace_arguments(cls: type) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    q = torch.nn.Parameter(torch.ones(5))
    opt = cls([q], lr=0.1)
    calls: list[str] = []
    replacement = torch.full((5,), -1.0)

    def pre(o, args, kwargs):
        calls.append("pre")
        assert o is opt and args[0] is opt
        return args, {**kwargs, "grads": [replacement]}

    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        opt.step(grads=[torch.ones(5)])
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"]
    # The pre-hook's gradient (negative) was used: the params moved up, not down.
    assert torch.all(q.detach() > 1.0)


def test_step_appears_in_the_profiler() -> None:
    q = torch.nn.Parameter(torch.ones(5))
    q.grad = torch.ones(5)
    opt = CPUAdam([q])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#CPUAdam.step" in {e.key for e in prof.key_averages()}


def test_a_bad_tensor_changes_nothing_in_its_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
    opt = CPUAdam([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    opt.step()
    before = a.detach().clone()
    with pytest.raises(TypeError, match=r"gradient of param 1 \(group 0\): dtype float64"):
        opt.step(grads=[torch.ones(6), torch.ones(6, dtype=torch.float64)])
    assert torch.equal(a.detach(), before)
    assert opt.state[a]["step"].item() == 1 and opt.state[b]["step"].item() == 1


@pytest.mark.parametrize("saved_step", [3, 3.0, torch.tensor(3.0, dtype=torch.float64), torch.tensor([3.0])])
def test_step_count_in_any_saved_form_resumes(saved_step: object) -> None:
    q = torch.nn.Parameter(torch.randn(10))
    q.grad = torch.randn(10)
    opt = CPUAdam([q], lr=1e-2)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = saved_step
    ref = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone())], lr=1e-2, weight_decay=0.0)
    ref_sd = ref.state_dict()
    ref_sd["state"] = {0: {k: (torch.tensor(3.0) if k == "step" else v.clone()) for k, v in sd["state"][0].items()}}
    ref.load_state_dict(ref_sd)
    opt.load_state_dict(sd)
    ref.param_groups[0]["params"][0].grad = q.grad.clone()
    opt.step()
    ref.step()
    assert opt.state[q]["step"].dtype == torch.float32 and opt.state[q]["step"].item() == 4.0
    assert _max_abs([q.detach()], [ref.param_groups[0]["params"][0].detach()]) < 1e-6


def test_copies_and_lr_schedulers_work() -> None:
    import copy
    import pickle
    import warnings

    q = torch.nn.Parameter(torch.ones(4))
    q.grad = torch.ones(4)
    opt = CPUAdam([q], lr=0.1, num_threads=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == 0.0125 and opt.state[q]["step"].item() == 3
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.num_threads == 1
        twin.step(grads=[torch.ones(4)])  # steps its own copy of the state only
        assert twin.state[next(iter(twin.state))]["step"].item() == 4
    assert opt.state[q]["step"].item() == 3
