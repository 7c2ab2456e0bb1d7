"""Adapters: map an audio clip's compact tokens (K, D) into each text-conditioning space.

Each head is a small attention-pooling resampler (as the predecessor's MAPBlock, without its
hundreds of millions of parameters): one learned query per output token cross-attends to the
audio tokens, so a 77-token CLIP sequence or an L-token T5 sequence costs `width * out_dim`
parameters in the output projection, not `K * D * L * out_dim` as a flat linear map would.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenAdapter(nn.Module):
    """Learned queries attend to audio tokens: (B, K, D) -> (B, Q, out_dim), or (B, out_dim) if pooled."""

    def __init__(self, in_dim: int, out_shape: tuple[int, ...], width: int = 256, heads: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter.width={width} must be divisible by adapter.heads={heads}")
        self.pooled = len(out_shape) == 1
        num_queries, out_dim = (1, out_shape[0]) if self.pooled else out_shape
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.out = nn.Linear(width, out_dim)
        # Fixed affine map into the target space (set from the class targets, never trained or sent):
        # the network predicts a class's deviation from the mean prompt embedding in units of its spread.
        self.register_buffer("shift", torch.zeros(out_shape), persistent=False)
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.inp(x)                                                # (B, K, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)        # (B, Q, W)
        h = q + self.attn(q, kv, kv, need_weights=False)[0]
        h = h + self.mlp(h)
        y = self.out(h)                                                 # (B, Q, out_dim)
        y = y[:, 0] if self.pooled else y
        return self.shift + self.scale * y


class AdapterSet(nn.ModuleDict):
    """One TokenAdapter per conditioning head ("clip" for SD; "t5" and "pooled" for FLUX)."""

    def __init__(self, in_dim: int, shapes: dict[str, tuple[int, ...]], width: int = 256, heads: int = 4):
        super().__init__({name: TokenAdapter(in_dim, shape, width, heads) for name, shape in shapes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(x) for name, head in self.items()}

    @torch.no_grad()
    def set_target_space(self, class_targets: dict[str, torch.Tensor]) -> AdapterSet:
        """Centre each head on the mean class target and scale it by the targets' RMS spread."""
        for name, head in self.items():
            t = class_targets[name].float()                             # (C, *out_shape)
            head.shift.copy_(t.mean(0))
            head.scale.copy_((t - t.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6))
        return self


def build_adapters(in_dim: int, class_targets: dict[str, torch.Tensor], width: int, heads: int,
                   seed: int) -> AdapterSet:
    """Adapters for the heads of `class_targets`, seeded, mapped into the targets' space."""
    torch.manual_seed(seed)
    shapes = {name: tuple(t.shape[1:]) for name, t in class_targets.items()}
    return AdapterSet(in_dim, shapes, width, heads).set_target_space(class_targets)
