"""A tiny GPT-style stack with dropout everywhere, the reference model of the tests."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from act_ckpt import attention_core


class Attention(nn.Module):
    """Causal self-attention written out (Megatron's unfused core), or fused (SDPA)."""

    def __init__(self, d: int, heads: int, p: float, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.p, self.fused = heads, p, fused
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        else:
            with attention_core():
                scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
                mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
                att = self.drop(scores.masked_fill(mask, float("-inf")).softmax(-1))
                y = att @ v
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, s, d)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, p: float, fused: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, p, fused)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, d=32, heads=4, layers=3, seq=16, p=0.1, fused=False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(Block(d, heads, p, fused) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(ids) + self.pos[: ids.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss_and_grads(
    model: nn.Module, ids: torch.Tensor, seed: int = 1234
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward from a fixed RNG state; returns the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    """Every gradient within ``rtol`` of the reference, relative to the reference's largest entry."""
    assert got.keys() == ref.keys()
    for name, g in got.items():
        r = ref[name]
        err = (g - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= rtol * max(scale, 1e-12), f"{name}: max abs error {err:.3e}, reference scale {scale:.3e}"
