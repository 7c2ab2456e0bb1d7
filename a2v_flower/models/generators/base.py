"""What every generator shares: class conditions, standardisation, clipped steps and state as named tensors."""

from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from a2v_flower.generator_schema import GeneratorSpec

CONDITION_DIM = 32           # width of class_condition vectors
_PROJECTION_CHUNK = 16384    # rows of the random projection drawn at a time (bounds memory for T5 heads)
_PROJECTION_CACHE_BYTES = 64 << 20  # projections up to this size are drawn once per process (a CLIP head: 15 MB)
Cond = Tensor | None


@functools.lru_cache(maxsize=8)
def _projection(features: int, dim: int, seed: int) -> tuple[Tensor, ...]:
    """The seeded Gaussian (features, dim) matrix as row chunks, kept: every class_condition call (one per
    class and site when the server samples) would otherwise draw it again, 58 ms for a CLIP head."""
    return tuple(_chunks(features, dim, seed))


def _chunks(features: int, dim: int, seed: int):
    """Row chunks of the seeded Gaussian (features, dim) matrix, drawn in order from one generator."""
    rng = torch.Generator().manual_seed(seed)
    for start in range(0, features, _PROJECTION_CHUNK):
        yield torch.randn(min(_PROJECTION_CHUNK, features - start), dim, generator=rng, dtype=torch.float64)


def _project(t: Tensor, dim: int, seed: int) -> Tensor:
    """(C, F) @ seeded Gaussian (F, dim), in row chunks so that wide heads never build the whole matrix."""
    features, start = t.shape[1], 0
    kept = features * dim * 8 <= _PROJECTION_CACHE_BYTES
    out = torch.zeros(t.shape[0], dim, dtype=torch.float64)
    for block in _projection(features, dim, seed) if kept else _chunks(features, dim, seed):
        out += t[:, start:start + len(block)] @ block  # the offsets follow the blocks, however they were cut
        start += len(block)
    return out


@torch.no_grad()
def class_condition(class_targets: dict[str, Tensor], class_ids: Tensor, dim: int = CONDITION_DIM,
                    seed: int = 0) -> Tensor:
    """(B, dim) unit-norm condition per class id, built from the class's text targets.

    Per head: flatten, subtract the across-class mean (the prompt template's shared part), scale to
    unit mean row norm, project with a fixed random matrix seeded by `seed` and the head name; sum
    the heads, L2-normalise. Conditions depend on the whole class list: always pass the
    federation's targets (C rows).
    """
    sizes = {h: t.shape[0] for h, t in class_targets.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"class_targets={sizes} (classes per head) must be non-empty and agree")
    c, class_ids = next(iter(sizes.values())), torch.as_tensor(class_ids, dtype=torch.long).cpu()
    if class_ids.numel() and (class_ids.min() < 0 or class_ids.max() >= c):
        raise ValueError(f"class id {class_ids.max().item()} out of range; expected 0..{c - 1}")
    total = torch.zeros(c, dim, dtype=torch.float64)
    for head in sorted(class_targets):
        t = class_targets[head].detach().cpu().double().flatten(1)      # (C, F)
        t = t - t.mean(0)
        total += _project(t / t.norm(dim=1).mean().clamp_min(1e-12), dim, seed + zlib.crc32(head.encode()))
    return F.normalize(total, dim=1).float()[class_ids]                 # (B, dim)


class Standardiser(nn.Module):
    """Per-feature mean/std of the training embeddings, kept as (saved) buffers."""

    def __init__(self, token_shape: tuple[int, int]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(token_shape))
        self.register_buffer("std", torch.ones(token_shape))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Set mean/std from x (N, K, D)."""
        x = x.to(self.mean)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(self.mean) - self.mean) / self.std

    def inverse(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean


def mlp(n_in: int, hidden: int, n_out: int, act=nn.SiLU) -> nn.Sequential:
    """Two hidden layers and a linear output (no Tanh: targets are standardised, not bounded)."""
    return nn.Sequential(nn.Linear(n_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_out))


def _params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """An optimizer's parameters in state-dict order."""
    return [p for group in opt.param_groups for p in group["params"]]


class BaseGenerator(nn.Module):
    """Standardisation, seeded noise, conditions, clipped steps and state flattening for every type.

    Every type has the same surface: `fit_batch(x, cond)` (one step on a mini-batch; back come "loss",
    the total, and its named components), `sample(n, cond)`, `val_loss(x, cond)` and `state_tensors()` /
    `load_state_tensors()` (weights, AdamW state, standardisation buffers and noise RNG as named tensors,
    for safetensors files or a Flower ArrayRecord).
    """

    conditional = True    # takes class_condition vectors
    single_pass = False   # True: one pass over the data is a complete fit (moment estimators)

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__()
        if len(token_shape) != 2 or min(token_shape) < 1:
            raise ValueError(f"token_shape={tuple(token_shape)} is not allowed; expected (K, D) with K, D >= 1")
        self.token_shape = tuple(int(s) for s in token_shape)
        self.features = self.token_shape[0] * self.token_shape[1]
        self.cond_dim = cond_dim if self.conditional else 0
        self.grad_clip = spec.grad_clip
        self.norm = Standardiser(self.token_shape)
        self.rng = torch.Generator().manual_seed(spec.seed)   # training noise and default sampling noise
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # name -> optimizer; state travels with weights

    def _noise(self, *shape: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise from a CPU generator, moved to the module's device."""
        return torch.randn(shape, generator=generator or self.rng).to(self.norm.mean.device)

    def _cond(self, cond: Cond, n: int) -> Tensor:
        """(n, cond_dim) condition scaled to entries of order 1; (n, 0) for unconditioned types."""
        if not self.conditional:
            return torch.zeros(n, 0, device=self.norm.mean.device)
        if cond is None:
            raise ValueError(f"{type(self).__name__} is conditional: pass cond from condition_for(...)")
        cond = cond.to(self.norm.mean).reshape(-1, self.cond_dim) * math.sqrt(self.cond_dim)
        return cond.expand(n, -1) if cond.shape[0] == 1 else cond

    def _step(self, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        """zero_grad, backward, clip this optimizer's parameters, step."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(_params(opt), self.grad_clip)
        opt.step()

    def state_tensors(self) -> dict[str, Tensor]:
        """Weights and buffers ("model."), AdamW state ("optim.<opt>.<param>.<key>"), noise RNG ("rng"); on the CPU."""
        out = {f"model.{k}": v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}  # they travel
        names = {id(p): n for n, p in self.named_parameters()}
        for opt_name, opt in self.optimizers.items():
            for p in _params(opt):
                for key, value in opt.state.get(p, {}).items():
                    out[f"optim.{opt_name}.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
        return {**out, "rng": self.rng.get_state()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `state_tensors`; optimizers without saved state start fresh. A "seen" entry (class ids
        the state was trained on, kept beside it by the site) is not part of the model and is ignored."""
        names = {id(p): n for n, p in self.named_parameters()}
        prefixes = {(o, i): f"optim.{o}.{names[id(p)]}." for o, opt in self.optimizers.items()
                    for i, p in enumerate(_params(opt))}
        unknown = [k for k in tensors if not (k.startswith("model.") or k in ("rng", "seen")
                                              or any(k.startswith(p) for p in prefixes.values()))]
        if unknown:
            raise ValueError(f"unexpected generator state keys {sorted(unknown)[:5]} for {type(self).__name__}")
        self.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        for o, opt in self.optimizers.items():
            state = {i: {k[len(pre):]: v.clone() for k, v in tensors.items() if k.startswith(pre)}
                     for (name, i), pre in prefixes.items() if name == o}
            opt.load_state_dict({"state": {i: s for i, s in state.items() if s},
                                 "param_groups": opt.state_dict()["param_groups"]})
        if "rng" in tensors:
            self.rng.set_state(tensors["rng"].cpu().to(torch.uint8).clone())
