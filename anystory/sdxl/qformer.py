"""QFormer: compress an image encoder's tokens into a few learned-query tokens.

AnyStory uses two of them on the same CLIP features: a 64-query one for the semantic (decoupled cross-attention)
condition and a 1-query one for the router's per-subject routing token. Each layer lets the queries attend to the
image tokens *and* to themselves (the perceiver-resampler form IP-Adapter Plus uses), then a feed-forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"QFormer width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, queries: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        b, nq, d = queries.shape
        q_in = self.norm_queries(queries)
        kv_in = torch.cat([self.norm_media(media), q_in], dim=1)
        q = self.to_q(q_in).view(b, nq, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(kv_in).view(b, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, nq, d)
        queries = queries + self.to_out(out)
        return queries + self.ff(queries)


class QFormer(nn.Module):
    """``[B, T, in_dim]`` image tokens -> ``[B, num_queries, out_dim]`` condition tokens."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 64, dim: int = 1024, depth: int = 4,
                 heads: int = 16):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * dim**-0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList([QFormerLayer(dim, heads) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        media = self.proj_in(image_tokens)
        queries = self.queries.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, media)
        return self.norm_out(self.proj_out(queries))
