"""One stage in one process (no torch.distributed): every schedule equals the plain model."""

from __future__ import annotations

import pytest
import torch

from pipe3d import PipelineEngine, PipelineModule
from pipe3d.models import Reference, batches, gpt_specs, loss_fn


@pytest.mark.parametrize(("schedule", "chunks", "interval"), [("gpipe", 1, 0), ("1f1b", 1, 2), ("interleaved", 2, 1)])
def test_one_stage_matches_the_plain_model(schedule: str, chunks: int, interval: int) -> None:
    module = PipelineModule(
        gpt_specs(), num_stages=1, loss_fn=loss_fn, seed_layers=True, num_chunks=chunks,
        activation_checkpoint_interval=interval,
    )  # fmt: skip
    ref = Reference(gpt_specs())
    data = batches(4)
    engine = PipelineEngine(module, 4, schedule=schedule)
    loss = engine.forward_backward(iter(data))
    total = sum(loss_fn(ref(x), y) for x, y in data) / len(data)
    total.backward()
    assert abs(float(loss) - float(total.detach())) <= 1e-6
    grads = dict(ref.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-6)
    ev = engine.eval_batch(iter(data))
    assert float(ev) == pytest.approx(float(total.detach()), abs=1e-6)


def test_bad_arguments() -> None:
    module = PipelineModule(gpt_specs(), num_stages=1, loss_fn=loss_fn)
    engine = PipelineEngine(module, 2)
    with pytest.raises(TypeError, match="must be an iterator"):
        engine.train_batch(batches(2))
    with pytest.raises(TypeError, match=r"pair \(inputs, labels\)"):
        engine.train_batch(iter([torch.zeros(2, 8, dtype=torch.long)] * 2))
    with pytest.raises(ValueError, match="use schedule='interleaved'"):
        PipelineEngine(PipelineModule(gpt_specs(), num_stages=1, loss_fn=loss_fn, num_chunks=2), 2)
    with pytest.raises(ValueError, match=r"optimizer= .* or backward="):
        PipelineEngine(module, 2, optimizer=torch.optim.SGD(module.parameters(), 0.1), backward=lambda t, b: None)
    no_loss = PipelineModule(gpt_specs(), num_stages=1)
    with pytest.raises(ValueError, match="scalar loss"):
        PipelineEngine(no_loss, 1).train_batch(iter(batches(1)))
