"""Pipelines on real gloo ranks against the single-process model: losses and gradients (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipe3d import PipelineEngine, PipelineModule
from pipe3d.models import Reference, batches, gpt_specs, loss_fn
from zero_testkit import DistributedTestError, run_distributed

TOL = 1e-5


def _reference_grads(specs, data, steps: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of ``steps`` SGD steps over ``data`` (a list per step of all micro-batches) and the first grads."""
    ref = Reference(specs)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    losses, first = [], {}
    for s in range(steps):
        mbs = data[s]
        total = sum(loss_fn(ref(x), y) for x, y in mbs) / len(mbs)
        total.backward()
        losses.append(float(total.detach()))
        if s == 0:
            first = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, first


def _pipeline(rank: int, world: int, pp: int, schedule: str, chunks: int, interval: int, tied: bool) -> None:
    dp = world // pp
    m, steps, lr = 4, 2, 0.5
    specs = gpt_specs(blocks=2, tied=tied)
    module = PipelineModule(
        specs,
        num_stages=pp,
        loss_fn=loss_fn,
        seed_layers=True,
        partition_method="uniform",
        activation_checkpoint_interval=interval,
        num_chunks=chunks,
    )
    dp_rank = module.mpu().get_data_parallel_rank()
    # Step s, replica d: its own micro-batches; the reference sees all replicas' micro-batches.
    data = {(s, d): batches(m, seed=100 * s + d) for s in range(steps) for d in range(dp)}
    ref_losses, ref_grads = _reference_grads(
        gpt_specs(blocks=2, tied=tied),
        [[mb for d in range(dp) for mb in data[(s, d)]] for s in range(steps)],
        steps,
        lr,
    )
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    engine = PipelineEngine(module, m, schedule=schedule)
    for s in range(steps):
        loss = engine.forward_backward(iter(data[(s, dp_rank)]))
        assert abs(float(loss) - ref_losses[s]) <= TOL, (rank, s, float(loss), ref_losses[s])
        if s == 0:
            for name, p in module.named_parameters():
                if name == "tied_modules.embed.pos" and module.stage_id != 0:
                    # Not a tied attribute: the head's copy of the embedding does not use it.
                    assert p.grad is None or not p.grad.any()
                    continue
                torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=TOL, msg=lambda e, n=name: f"{n}: {e}")
        if s > 0:
            # From the second batch on every receive's description is known, so each one but the
            # very first is posted before the instruction that needs it ([Note: posting receives early]).
            st = engine.stats
            assert st.recvs_posted_ahead >= st.recvs - 1 > 0 or pp * chunks == 1, (
                rank,
                st.recvs,
                st.recvs_posted_ahead,
            )
        opt.step()
        opt.zero_grad()
    # Every stage holds its own layers only.
    owned = {int(n.split(".")[0]) for n, _ in module.named_parameters() if n[0].isdigit()}
    assert owned == {i for i in module.local_layers() if i in owned}
    assert owned, "a stage built no layer"
    dist.barrier()


def _cases(rank: int, world: int, cases: list[tuple]) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # Several configurations in one set of processes: starting ranks costs more than a case.
    for case in cases:
        try:
            _pipeline(rank, world, *case)
        except Exception as e:
            raise AssertionError(f"case (pp, schedule, chunks, interval, tied)={case}: {e}") from e


def test_pipeline_2_ranks_match_single_process() -> None:
    """PP=2: GPipe, 1F1B, interleaved (2 chunks), and 1F1B checkpointing every layer (token ids first)."""
    cases = [(2, "gpipe", 1, 0, True), (2, "1f1b", 1, 0, True), (2, "interleaved", 2, 0, True), (2, "1f1b", 1, 1, True)]
    run_distributed(_cases, 2, cases, timeout=240)


def test_pipeline_2x2_ranks_match_single_process() -> None:
    """PP=2 x DP=2: 1F1B with tied weights, interleaved without."""
    run_distributed(_cases, 4, [(2, "1f1b", 1, 0, True), (2, "interleaved", 2, 1, False)], timeout=240)


def _shape_change(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn)
    engine = PipelineEngine(module, 2, schedule="gpipe")
    short = [(x[:, :6], y[:, :6]) for x, y in batches(1, seed=1)]
    engine.forward_backward(iter(batches(1) + short))  # micro-batch 1 is shorter: stage 0 must refuse


def _no_data(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn)
    PipelineEngine(module, 4).forward_backward(iter(batches(2)))  # 2 micro-batches for 4


def test_changed_shapes_and_short_data_fail_clearly_without_hanging() -> None:
    with pytest.raises(DistributedTestError, match="must keep their shapes and dtypes"):
        run_distributed(_shape_change, 2, timeout=120)
    with pytest.raises(DistributedTestError, match="ran out at micro-batch 2 of 4"):
        run_distributed(_no_data, 2, timeout=120)
