"""Tensor and sequence parallelism on 2 gloo ranks against the dense layers (fp32, 1e-5); PP=2 x TP=2 on 4."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import act_ckpt
from pipe3d import LayerSpec, PipelineEngine, PipelineModule, PipelineParallelGrid, PipeModelDataParallelTopology
from pipe3d.models import DIM, SEQ, VOCAB, DenseBlock, Embed, ParallelBlock, batches, loss_fn
from pipe3d.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from zero_testkit import run_distributed

TOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=lambda e: f"rank {dist.get_rank()} {what}: {e}")


def _slices(rank: int, world: int) -> None:
    # Linear layers and the embedding hold the dense layer's slices and give its outputs and grads.
    torch.manual_seed(0)
    dense_c, dense_r = nn.Linear(8, 12), nn.Linear(12, 8)
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(8, 12, gather_output=False), RowParallelLinear(12, 8, input_is_parallel=True)
    _close(col.weight, dense_c.weight[rank * 6 : rank * 6 + 6], "column weight slice")
    _close(row.weight, dense_r.weight[:, rank * 6 : rank * 6 + 6], "row weight slice")
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = row(F.gelu(col(x)))
    yd = dense_r(F.gelu(dense_c(x2)))
    _close(y, yd, "column->row output")
    y.square().sum().backward()
    yd.square().sum().backward()
    _close(x.grad, x2.grad, "input grad")
    _close(col.weight.grad, dense_c.weight.grad[rank * 6 : rank * 6 + 6], "column weight grad")
    _close(row.weight.grad, dense_r.weight.grad[:, rank * 6 : rank * 6 + 6], "row weight grad")
    _close(row.bias.grad, dense_r.bias.grad, "row bias grad")
    gathered = ColumnParallelLinear(8, 12)  # gather_output=True
    assert gathered(x).shape == (2, 3, 12)

    torch.manual_seed(2)
    emb_d = nn.Embedding(VOCAB, 4)
    torch.manual_seed(2)
    emb = VocabParallelEmbedding(VOCAB, 4)
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    out = emb(ids)
    _close(out, emb_d(ids), "vocab-parallel embedding")
    out.sum().backward()
    emb_d(ids).sum().backward()
    half = VOCAB // world
    _close(emb.weight.grad, emb_d.weight.grad[rank * half : (rank + 1) * half], "embedding grad")

    # Vocab-parallel cross-entropy equals F.cross_entropy on the whole vocabulary.
    logits = torch.randn(3, 5, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    target = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(5))
    full = logits.clone().requires_grad_()
    part = logits[..., rank * half : (rank + 1) * half].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(part, target).mean()
    ref = F.cross_entropy(full.reshape(-1, VOCAB), target.reshape(-1))
    _close(loss, ref, "vocab-parallel cross-entropy")
    loss.backward()
    ref.backward()
    _close(part.grad, full.grad[..., rank * half : (rank + 1) * half], "cross-entropy grad")


def _block(rank: int, world: int, sequence_parallel: bool) -> None:
    torch.manual_seed(7)
    dense = DenseBlock(DIM, heads=2)
    torch.manual_seed(7)
    par = ParallelBlock(DIM, heads=2, sequence_parallel=sequence_parallel)
    x = torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(8))
    xd = x.clone().requires_grad_()
    xp = (scatter_to_sequence_parallel_region(x) if sequence_parallel else x).clone().requires_grad_()
    yd, yp = dense(xd), par(xp)
    want = yd.chunk(world, dim=1)[rank] if sequence_parallel else yd
    _close(yp, want, "block output")
    yd.square().sum().backward()
    # With sequence parallelism each rank holds part of the output: its loss is that part's.
    yp.square().sum().backward()
    _close(xp.grad, xd.grad.chunk(world, dim=1)[rank] if sequence_parallel else xd.grad, "block input grad")
    half = DIM // world
    _close(par.q.weight.grad, dense.q.weight.grad[rank * half : (rank + 1) * half], "q grad")
    _close(par.fc2.weight.grad, dense.fc2.weight.grad[:, rank * 4 * half : (rank + 1) * 4 * half], "fc2 grad")
    _close(par.ln1.weight.grad, dense.ln1.weight.grad, "layer norm grad")
    _close(par.fc2.bias.grad, dense.fc2.bias.grad, "row bias grad")


def _dropout(rank: int, world: int) -> None:
    """Dropout inside a parallel region draws per-rank masks; checkpointing redraws the same ones."""
    act_ckpt.model_parallel_manual_seed(11, group=dist.group.WORLD)
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(8, 16, gather_output=False), RowParallelLinear(16, 8, input_is_parallel=True)

    def region(x: torch.Tensor) -> torch.Tensor:
        h = col(x)
        with act_ckpt.get_rng_tracker().fork():
            h = F.dropout(h, p=0.5)
        return row(h)

    x = torch.ones(4, 8)
    with act_ckpt.get_rng_tracker().fork():
        mask = F.dropout(torch.ones(64), 0.5)
    masks = [torch.empty_like(mask) for _ in range(world)]
    dist.all_gather(masks, mask)
    assert not torch.equal(masks[0], masks[1]), "the model-parallel stream must differ per rank"
    outside = F.dropout(torch.ones(64), 0.5)
    others = [torch.empty_like(outside) for _ in range(world)]
    dist.all_gather(others, outside)
    assert torch.equal(others[0], others[1]), "the default stream must agree across tensor-parallel ranks"

    states = act_ckpt.get_rng_tracker().get_states()
    cpu = torch.get_rng_state()
    plain = region(x)
    plain.sum().backward()
    grads = [p.grad.clone() for p in (*col.parameters(), *row.parameters())]
    for p in (*col.parameters(), *row.parameters()):
        p.grad = None
    act_ckpt.get_rng_tracker().set_states(states)
    torch.set_rng_state(cpu)
    ck = act_ckpt.checkpoint(region, x)
    _close(ck, plain, "checkpointed output")
    ck.sum().backward()
    for g, p in zip(grads, (*col.parameters(), *row.parameters()), strict=True):
        _close(p.grad, g, "checkpointed grad")


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def _pp_tp(rank: int, world: int) -> None:
    """PP=2 x TP=2: each stage's blocks tensor-parallel; losses and gradients equal the dense model."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    grid = PipelineParallelGrid(topo)
    tp = grid.get_tensor_model_parallel_group()
    specs = [LayerSpec(Embed), *(LayerSpec(ParallelBlock, DIM, 2, tp) for _ in range(2)), LayerSpec(_Head)]
    dense_specs = [LayerSpec(Embed), *(LayerSpec(DenseBlock, DIM, 2) for _ in range(2)), LayerSpec(_Head)]
    module = PipelineModule(specs, grid=grid, loss_fn=loss_fn, seed_layers=True, partition_method="uniform")
    ref_layers = []
    for i, s in enumerate(dense_specs):
        torch.manual_seed(1234 + i)
        ref_layers.append(s.build())
    data = batches(4, seed=3)
    ref_loss = 0.0
    for x, y in data:
        h = x
        for layer in ref_layers:
            h = layer(h)
        loss = loss_fn(h, y) / len(data)
        loss.backward()
        ref_loss += float(loss.detach())
    engine = PipelineEngine(module, 4, schedule="1f1b")
    got = float(engine.forward_backward(iter(data)))
    assert abs(got - ref_loss) <= TOL, (rank, got, ref_loss)
    tp_rank, half = grid.get_tensor_model_parallel_rank(), DIM // 2
    for idx, layer in module.layer_modules().items():
        ref = ref_layers[idx]
        if isinstance(layer, ParallelBlock):
            _close(layer.q.weight.grad, ref.q.weight.grad[tp_rank * half : (tp_rank + 1) * half], f"layer {idx} q")
            _close(layer.ln2.weight.grad, ref.ln2.weight.grad, f"layer {idx} ln2")
        else:
            for (n, p), (_, r) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
                _close(p.grad, r.grad, f"layer {idx} {n}")


def _all(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    _slices(rank, world)
    _block(rank, world, False)
    _block(rank, world, True)
    _dropout(rank, world)


def test_tensor_parallel_layers_block_and_dropout_match_dense() -> None:
    run_distributed(_all, 2, timeout=120)


def test_pipeline_x_tensor_parallel_on_4_ranks() -> None:
    run_distributed(_pp_tp, 4, timeout=180)
