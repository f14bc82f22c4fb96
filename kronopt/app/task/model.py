"""A small GPT-style byte-level language model in pure torch.

Pre-norm transformer blocks (RMSNorm, causal self-attention through
:func:`torch.nn.functional.scaled_dot_product_attention`, a 4× GELU MLP), learned
token and position embeddings and an untied output head over the 256 byte values.

Parameter names follow the conventions that routes match on: ``embed_tokens``,
``embed_positions`` and ``head`` match the fallback pattern of presets with a
``[route]`` (Muon sends them to AdamW), the norms' gains are 1-D, and every other
parameter is a matrix (``blocks.<i>.attn.qkv.weight``, ``blocks.<i>.mlp.up.weight`` …).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

VOCAB = 256


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class _Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(width)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.RMSNorm(width)
        self.mlp = _Mlp(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A byte-level GPT: ``layers`` blocks of ``width`` channels and ``heads`` heads over ``context`` bytes.

    ``forward(idx)`` takes int64 bytes ``(b, t)`` with ``t ≤ context`` and returns
    logits ``(b, t, 256)``. Weights are drawn from the global torch RNG
    (``N(0, 0.02²)``, the residual projections scaled by ``1/√(2·layers)``), so
    seeding torch fixes them.
    """

    def __init__(self, *, layers: int, width: int, heads: int, context: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.context = context
        self.embed_tokens = nn.Embedding(VOCAB, width)
        self.embed_positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm_out = nn.RMSNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.embed_tokens(idx) + self.embed_positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_out(x))

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats."""
        logits = self.forward(idx)
        return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"))
