"""Adapters: map an audio clip's compact tokens (K, D) into each text-conditioning space.

Each head is a small attention-pooling resampler (as the predecessor's MAPBlock, without its
hundreds of millions of parameters): one learned query per output token cross-attends to the
audio tokens, so a 77-token CLIP sequence or an L-token T5 sequence costs `width * out_dim`
parameters in the output projection, not `K * D * L * out_dim` as a flat linear map would.
Two forms (`adapter.kind`): `attention` runs an MLP and a full output projection on every output
token; `lowrank` runs its MLP on the K audio tokens and maps the pooled values through a rank-r
projection, so an output token costs only its attention weights (see BENCHMARKS.md for both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("attention", "lowrank")
# Init std of the learned token embedding: about the spread of `inp`'s outputs (nn.Linear's default init on
# LayerNormed inputs gives std 1/sqrt(3) = 0.58), so every token is told apart from the first step. At 0.02 (the
# queries' init) AdamW barely moves it within a run's epochs and the adapter stays blind to which token is which
# (real recordings: test top-1 0.500 vs 0.810 at 0.5, BENCHMARKS.md "Why the adapters lost to the linear probe").
TOKEN_EMBEDDING_STD = 0.5


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., T, W) -> (..., H, T, W / H)."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def token_embedding(tokens: int, width: int) -> nn.Parameter | None:
    """(K, W) learned embedding of each audio token's index, or None for tokens=0. Attention pooling treats the K
    tokens as a set; without this the adapter cannot tell the summary token from a frequency band's (a linear
    probe on the mean of the 8 standardised tokens scores 0.476 on the real recordings, on all 8 in order 0.833)."""
    return nn.Parameter(torch.randn(tokens, width) * TOKEN_EMBEDDING_STD) if tokens else None


class TokenAdapter(nn.Module):
    """Learned queries attend to audio tokens: (B, K, D) -> (B, Q, out_dim), or (B, out_dim) if pooled."""

    def __init__(self, in_dim: int, out_shape: tuple[int, ...], width: int, heads: int, tokens: int = 0):
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter.width={width} must be divisible by adapter.heads={heads}")
        self.pooled = len(out_shape) == 1
        num_queries, out_dim = (1, out_shape[0]) if self.pooled else out_shape
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.token_embedding = token_embedding(tokens, width)           # (K, W) or None
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
        kv, a, w = self.inp(x), self.attn, self.queries.shape[1]        # (B, K, W)
        if self.token_embedding is not None:
            kv = kv + self.token_embedding
        q = F.linear(self.queries, a.in_proj_weight[:w], a.in_proj_bias[:w])   # (Q, W): once per batch
        k, v = F.linear(kv, a.in_proj_weight[w:], a.in_proj_bias[w:]).chunk(2, -1)
        heads = [_heads(t, a.num_heads) for t in (q, k, v)]               # (H, Q, W/H), (B, H, K, W/H) x 2
        o = F.scaled_dot_product_attention(heads[0].expand(len(x), -1, -1, -1), heads[1], heads[2])
        h = self.queries + a.out_proj(o.transpose(1, 2).flatten(2))    # (B, Q, W), as nn.MultiheadAttention
        h = h + self.mlp(h)
        y = self.out(h)                                                 # (B, Q, out_dim)
        y = y[:, 0] if self.pooled else y
        return self.shift + self.scale * y


class LowRankAdapter(nn.Module):
    """`lowrank`: MLP on the K audio tokens, learned queries (already in key space) pool them, and the pooled
    values reach the output through a rank-r map applied to the K values of each head, not to the Q outputs."""

    def __init__(self, in_dim: int, out_shape: tuple[int, ...], *, width: int, heads: int, rank: int,
                 tokens: int = 0):
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter.width={width} must be divisible by adapter.heads={heads}")
        self.pooled, self.heads = len(out_shape) == 1, heads
        num_queries, out_dim = (1, out_shape[0]) if self.pooled else out_shape
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.token_embedding = token_embedding(tokens, width)           # (K, W) or None
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.kv = nn.Linear(width, 2 * width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.base = nn.Parameter(torch.zeros(num_queries, rank))        # each output token's own offset
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, out_dim)
        self.register_buffer("shift", torch.zeros(out_shape), persistent=False)
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.inp(x)
        if self.token_embedding is not None:
            kv = kv + self.token_embedding
        kv = kv + self.mlp(kv)                                          # (B, K, W)
        k, v = (_heads(t, self.heads) for t in self.kv(kv).chunk(2, -1))  # (B, H, K, W/H)
        q = _heads(self.queries, self.heads)                            # (H, Q, W/H)
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, Q, K)
        down = self.down.weight.t().unflatten(0, (self.heads, -1))      # (H, W/H, r)
        z = self.base + (att @ (v @ down)).sum(1)                       # (B, Q, r)
        y = self.up(z)                                                  # (B, Q, out_dim)
        y = y[:, 0] if self.pooled else y
        return self.shift + self.scale * y


class AdapterSet(nn.ModuleDict):
    """One adapter of `kind` per conditioning head ("clip" for SD; "t5" and "pooled" for FLUX).

    Inputs are standardised per (token, dim) by the fixed `in_mean`/`in_std` (the federation's statistics of the
    audio embeddings, `set_input_norm`; identity until set): a component that every clip shares, which the
    per-token LayerNorm does not remove, would otherwise dominate the adapters' input. With `tokens` = K each
    head learns an embedding of each token's index (`token_embedding`); 0: the K tokens are a set to it."""

    def __init__(self, in_dim: int, shapes: dict[str, tuple[int, ...]], *, width: int, heads: int, kind: str,
                 rank: int, tokens: int = 0):
        if kind not in KINDS:
            raise ValueError(f"adapter.kind={kind!r} is not allowed; expected one of {list(KINDS)}")
        make = (lambda s: TokenAdapter(in_dim, s, width, heads, tokens)) if kind == "attention" else (
            lambda s: LowRankAdapter(in_dim, s, width=width, heads=heads, rank=rank, tokens=tokens))
        super().__init__({name: make(shape) for name, shape in shapes.items()})
        self.tokens = tokens
        self.register_buffer("in_mean", torch.zeros(()), persistent=False)  # (K, D) once set; not trained or sent
        self.register_buffer("in_std", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tokens and x.shape[1] != self.tokens:
            raise ValueError(f"adapters built for {self.tokens} audio tokens (model.audio.tokens) got {x.shape[1]}")
        x = (x - self.in_mean) / self.in_std                            # (B, K, D)
        return {name: head(x) for name, head in self.items()}

    @torch.no_grad()
    def set_input_norm(self, norm: dict[str, torch.Tensor] | None) -> AdapterSet:
        """Standardise inputs with norm["mean"], norm["std"] (K, D) (see `input_norm`); None: identity."""
        dev = self.in_mean.device
        self.in_mean = norm["mean"].float().to(dev) if norm else torch.zeros((), device=dev)
        self.in_std = norm["std"].float().to(dev) if norm else torch.ones((), device=dev)
        return self

    def input_norm(self) -> dict[str, torch.Tensor] | None:
        """The input standardisation as set by `set_input_norm` (None when it is the identity)."""
        return None if self.in_mean.dim() == 0 else {"mean": self.in_mean.cpu(), "std": self.in_std.cpu()}

    @torch.no_grad()
    def set_target_space(self, class_targets: dict[str, torch.Tensor]) -> AdapterSet:
        """Centre each head on the mean class target and scale it by the targets' RMS spread."""
        for name, head in self.items():
            t = class_targets[name].float()                             # (C, *out_shape)
            head.shift.copy_(t.mean(0))
            head.scale.copy_((t - t.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6))
        return self


def embedding_moments(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a site sends for the input standardisation: count, sum and sum of squares per (token, dim) of its
    embeddings x (N, K, D), in float64 (no labels)."""
    x = x.double()
    return {"count": torch.tensor(float(len(x)), dtype=torch.float64), "sum": x.sum(0), "sum_sq": x.pow(2).sum(0)}


def input_norm(moments: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pooled mean and std per (token, dim) of every site's `embedding_moments`, float32; a std below 1 % of the
    mean std (a dimension nearly constant across the federation) is raised to it, so it is not blown up."""
    n = sum(m["count"] for m in moments)
    if not n > 0:
        raise ValueError("no embeddings to compute the adapters' input standardisation from")
    mean = sum(m["sum"] for m in moments) / n
    std = (sum(m["sum_sq"] for m in moments) / n - mean ** 2).clamp_min(0).sqrt()
    return {"mean": mean.float(), "std": std.clamp_min(0.01 * float(std.mean()) + 1e-12).float()}


def build_adapters(in_dim: int, class_targets: dict[str, torch.Tensor], width: int, heads: int,
                   seed: int, kind: str = "attention", rank: int = 64,
                   norm: dict[str, torch.Tensor] | None = None, tokens: int = 0) -> AdapterSet:
    """Adapters for the heads of `class_targets`, seeded, mapped into the targets' space, inputs standardised
    by `norm` (`input_norm`; None: as they come), with a learned embedding of each of `tokens` audio tokens
    (0: none; the app passes model.audio.tokens when adapter.token_embedding is on)."""
    torch.manual_seed(seed)
    shapes = {name: tuple(t.shape[1:]) for name, t in class_targets.items()}
    adapters = AdapterSet(in_dim, shapes, width=width, heads=heads, kind=kind, rank=rank, tokens=tokens)
    return adapters.set_target_space(class_targets).set_input_norm(norm)
