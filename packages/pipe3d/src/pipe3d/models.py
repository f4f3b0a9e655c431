"""A tiny GPT as pipeline layers, and the same model as one plain module.

What the tests and ``benchmarks/pipeline.py`` train, and an example of writing a model for
:class:`~pipe3d.PipelineModule`: the embedding is a :class:`~pipe3d.TiedLayerSpec` reused as the
LM head (``forward_fn``), and :class:`Reference` is the identical model in one process (same
seeds per layer as ``PipelineModule(seed_layers=True)``), the baseline every pipeline run must match.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipe3d.module import LayerSpec, TiedLayerSpec

__all__ = [
    "DIM",
    "SEQ",
    "VOCAB",
    "Block",
    "DenseBlock",
    "Embed",
    "ParallelBlock",
    "Reference",
    "batches",
    "gpt_specs",
    "lm_head",
    "loss_fn",
]

VOCAB, DIM, SEQ = 32, 16, 8


class Block(nn.Module):
    """A pre-norm transformer block (causal self-attention + MLP), dropout-free for exact comparisons."""

    def __init__(self, dim: int = DIM, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    """Token + position embedding; its ``weight`` is tied to the LM head."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, seq: int = SEQ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) + self.pos[: ids.shape[1]]


def lm_head(embed: Embed, x: torch.Tensor) -> torch.Tensor:
    """Logits from the tied embedding matrix."""
    return x @ embed.weight.t()


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def gpt_specs(
    blocks: int = 4, tied: bool = True, vocab: int = VOCAB, dim: int = DIM, seq: int = SEQ, heads: int = 2
) -> list[Any]:
    """Embedding, ``blocks`` transformer blocks, final norm, LM head (tied to the embedding or not)."""
    specs: list[Any] = [TiedLayerSpec("embed", Embed, vocab, dim, seq) if tied else LayerSpec(Embed, vocab, dim, seq)]
    specs += [LayerSpec(Block, dim, heads) for _ in range(blocks)]
    specs.append(LayerSpec(nn.LayerNorm, dim))
    if tied:
        specs.append(TiedLayerSpec("embed", Embed, vocab, dim, seq, forward_fn=lm_head))
    else:
        specs.append(LayerSpec(nn.Linear, dim, vocab, bias=False))
    return specs


class Reference(nn.Module):
    """The same layers in one module, named as PipelineModule names them (``"3.weight"``, ``"tied_modules.embed.weight"``)."""

    def __init__(self, specs: list[Any], base_seed: int = 1234) -> None:
        super().__init__()
        self.tied_modules = nn.ModuleDict()
        self.funcs: list[Any] = []
        for idx, spec in enumerate(specs):
            torch.manual_seed(base_seed + idx)
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                mod = self.tied_modules[spec.key]
                fn = spec.forward_fn
                self.funcs.append((lambda m, f: (lambda x: m(x) if f is None else f(m, x)))(mod, fn))
            else:
                mod = spec.build()
                self.add_module(str(idx), mod)
                self.funcs.append(mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.funcs:
            x = f(x)
        return x


def batches(
    n: int, micro: int = 2, seed: int = 0, vocab: int = VOCAB, seq: int = SEQ
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` micro-batches of random token ids and next-token labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


class DenseBlock(nn.Module):
    """A pre-norm causal transformer block with separate q/k/v projections: the dense twin of :class:`ParallelBlock`."""

    def __init__(self, dim: int = DIM, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def _attend(self, h: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = h.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, t, heads, -1).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        return a.transpose(1, 2).reshape(b, t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(self._attend(self.ln1(x), self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ParallelBlock(DenseBlock):
    """:class:`DenseBlock` tensor-parallel over ``group``: heads and MLP columns split, Megatron-style.

    Built under the same seed as a DenseBlock it holds that block's slices. With
    ``sequence_parallel`` its input and output are split along the sequence.
    """

    def __init__(self, dim: int = DIM, heads: int = 2, group: Any = None, sequence_parallel: bool = False) -> None:
        nn.Module.__init__(self)
        from pipe3d.tensor_parallel import ColumnParallelLinear, RowParallelLinear, SequenceParallelLayerNorm
        from pipe3d.tensor_parallel.mappings import tp_world_size

        t = tp_world_size(group)
        if heads % t:
            raise ValueError(f"ParallelBlock: {heads} heads cannot be split over {t} tensor-parallel ranks")
        self.heads = heads // t
        sp = sequence_parallel
        norm = (lambda: SequenceParallelLayerNorm(dim, group=group)) if sp else (lambda: nn.LayerNorm(dim))
        col = dict(gather_output=False, group=group, sequence_parallel=sp)
        row = dict(input_is_parallel=True, group=group, sequence_parallel=sp)
        self.ln1 = norm()
        self.q, self.k, self.v = (ColumnParallelLinear(dim, dim, **col) for _ in range(3))
        self.o = RowParallelLinear(dim, dim, **row)
        self.ln2 = norm()
        self.fc1, self.fc2 = ColumnParallelLinear(dim, 4 * dim, **col), RowParallelLinear(4 * dim, dim, **row)
        self.sequence_parallel = sp
        self.group = group

    def _attend(self, h: torch.Tensor, heads: int) -> torch.Tensor:
        b = h.shape[0]
        q, k, v = self.q(h), self.k(h), self.v(h)  # the full sequence, this rank's heads
        t = q.shape[1]

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, t, heads, -1).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        return a.transpose(1, 2).reshape(b, t, -1)
