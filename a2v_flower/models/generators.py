"""Generators of synthetic audio embeddings: p(x | class) in the adapters' (K, D) input space.

Every type is one nn.Module with the same surface: `fit_batch(x, cond)` (one step on a mini-batch,
named loss components back), `sample(n, cond)`, `val_loss(x, cond)` and `state_tensors()` /
`load_state_tensors()` (weights, AdamW state, standardisation buffers and noise RNG as named
tensors, for safetensors files or a Flower ArrayRecord). Conditions always come from
`class_condition` via `condition_for`, at training and at sampling time alike.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

CONDITION_DIM = 32           # width of class_condition vectors
GRANULARITIES = ("unified", "per_class", "per_group")
FULL_FRECHET_MAX_DIM = 2048  # above this many features sample_quality uses diagonal covariances
_PROJECTION_CHUNK = 16384    # rows of the random projection drawn at a time (bounds memory for T5 heads)
Cond = Tensor | None


# ---- conditions ---------------------------------------------------------------------------------

def _project(t: Tensor, dim: int, seed: int) -> Tensor:
    """(C, F) @ seeded Gaussian (F, dim), drawn in row chunks so wide heads never build the whole matrix."""
    rng = torch.Generator().manual_seed(seed)
    out = torch.zeros(t.shape[0], dim, dtype=torch.float64)
    for start in range(0, t.shape[1], _PROJECTION_CHUNK):
        block = t[:, start:start + _PROJECTION_CHUNK]
        out += block @ torch.randn(block.shape[1], dim, generator=rng, dtype=torch.float64)
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


# ---- spec ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorSpec:
    """Generator architecture and optimisation hyper-parameters (conf: generator.*)."""

    type: str = "cvae"
    latent_dim: int = 16
    hidden: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    batch_size: int = 32
    grad_clip: float = 1.0          # max gradient norm per optimizer (0 = off)
    kl_weight: float = 1e-2         # target beta on the per-latent-dim KL (recon is a per-element MSE)
    kl_warmup: float = 0.5          # fraction of `epochs` over which beta ramps 0 -> kl_weight
    early_stopping_patience: int = 0  # epochs without a lower val loss before stopping (0 = off)
    seed: int = 0

    def __post_init__(self):
        if self.type not in GENERATOR_TYPES:
            raise ValueError(f"generator.type={self.type!r} is not allowed; expected one of {list(GENERATOR_TYPES)}")
        for key in ("latent_dim", "hidden", "epochs", "batch_size", "lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"generator.{key}={getattr(self, key)!r} is not allowed; expected a number > 0")
        for key in ("weight_decay", "grad_clip", "kl_weight", "early_stopping_patience"):
            if getattr(self, key) < 0:
                raise ValueError(f"generator.{key}={getattr(self, key)!r} is not allowed; expected a number >= 0")
        if not 0 <= self.kl_warmup <= 1:
            raise ValueError(f"generator.kl_warmup={self.kl_warmup!r} is not allowed; expected 0 <= value <= 1")


def kl_beta(epoch: int, epochs: int, kl_warmup: float, kl_weight: float) -> float:
    """KL weight at `epoch`: 0 at epoch 0, linear up to exactly kl_weight at epoch ceil(kl_warmup * epochs)."""
    warm = math.ceil(kl_warmup * epochs)
    return kl_weight if warm == 0 else kl_weight * min(1.0, epoch / warm)


# ---- shared plumbing ----------------------------------------------------------------------------

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


def _mlp(n_in: int, hidden: int, n_out: int, act=nn.SiLU) -> nn.Sequential:
    """Two hidden layers and a linear output (no Tanh: targets are standardised, not bounded)."""
    return nn.Sequential(nn.Linear(n_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_out))


def _params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """An optimizer's parameters in state-dict order."""
    return [p for group in opt.param_groups for p in group["params"]]


class _Generator(nn.Module):
    """Standardisation, seeded noise, conditions, clipped steps and state flattening for every type."""

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
        """Weights and buffers ("model."), AdamW state ("optim.<opt>.<param>.<key>") and noise RNG ("rng")."""
        out = {f"model.{k}": v.detach().clone() for k, v in self.state_dict().items()}
        names = {id(p): n for n, p in self.named_parameters()}
        for opt_name, opt in self.optimizers.items():
            for p in _params(opt):
                for key, value in opt.state.get(p, {}).items():
                    out[f"optim.{opt_name}.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().clone()
        return {**out, "rng": self.rng.get_state()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `state_tensors`; optimizers without saved state start fresh. A "seen" entry (class ids
        the state was trained on, kept beside it by a2v_flower.replay) is not part of the model and is ignored."""
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


# ---- generator types ----------------------------------------------------------------------------

class VAEGenerator(_Generator):
    """Unconditioned VAE on the flattened, standardised (K*D) embedding."""

    conditional = False

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        self.latent_dim, self.kl_weight = spec.latent_dim, spec.kl_weight
        self.enc = _mlp(self.features + self.cond_dim, spec.hidden, 2 * spec.latent_dim)
        self.dec = _mlp(spec.latent_dim + self.cond_dim, spec.hidden, self.features)
        self.optimizers["opt"] = torch.optim.AdamW(self.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def _losses(self, x: Tensor, cond: Cond, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-element reconstruction MSE and per-latent-dim KL, both batch means."""
        z0, c = self.norm(x).flatten(1), self._cond(cond, len(x))      # (B, K*D), (B, cond_dim)
        mu, logvar = self.enc(torch.cat([z0, c], 1)).chunk(2, dim=1)    # (B, L) each
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + (0.5 * logvar).exp() * self._noise(*mu.shape, generator=generator)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
        return F.mse_loss(self.dec(torch.cat([z, c], 1)), z0), kl

    def fit_batch(self, x: Tensor, cond: Cond = None, kl_beta: float | None = None) -> dict[str, float]:
        """One AdamW step on recon + beta * kl (beta defaults to the target kl_weight)."""
        self.train()
        recon, kl = self._losses(x, cond)
        loss = recon + (self.kl_weight if kl_beta is None else kl_beta) * kl
        self._step(self.optimizers["opt"], loss)
        return {"loss": loss.item(), "recon": recon.item(), "kl": kl.item()}

    @torch.no_grad()
    def val_loss(self, x: Tensor, cond: Cond = None) -> float:
        """recon + kl_weight * kl on held-out data, with fixed noise."""
        self.eval()
        recon, kl = self._losses(x, cond, torch.Generator().manual_seed(0))
        return (recon + self.kl_weight * kl).item()

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        """(n, K, D) decoded prior samples, de-standardised."""
        self.eval()
        z = torch.cat([self._noise(n, self.latent_dim, generator=generator), self._cond(cond, n)], 1)
        return self.norm.inverse(self.dec(z).view(n, *self.token_shape))


class CVAEGenerator(VAEGenerator):
    """Conditional VAE: encoder and decoder both see the class condition."""

    conditional = True


class GANGenerator(_Generator):
    """Conditional GAN (non-saturating loss); generator and discriminator each own a clipped AdamW."""

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        self.latent_dim = spec.latent_dim
        self.g_net = _mlp(spec.latent_dim + self.cond_dim, spec.hidden, self.features)
        self.d_net = _mlp(self.features + self.cond_dim, spec.hidden, 1, act=partial(nn.LeakyReLU, 0.2))
        # beta1 = 0.5, the usual GAN choice: less momentum keeps the two players from overshooting.
        adamw = dict(lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.5, 0.999))
        self.optimizers.update(g=torch.optim.AdamW(self.g_net.parameters(), **adamw),
                               d=torch.optim.AdamW(self.d_net.parameters(), **adamw))

    def _fake(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(n, K*D) standardised fakes for scaled conditions c (n, cond_dim)."""
        return self.g_net(torch.cat([self._noise(len(c), self.latent_dim, generator=generator), c], 1))

    def fit_batch(self, x: Tensor, cond: Cond = None, kl_beta: float | None = None) -> dict[str, float]:
        """One discriminator step, then one generator step (kl_beta is ignored)."""
        self.train()
        real, c = self.norm(x).flatten(1), self._cond(cond, len(x))    # (B, K*D), (B, cond_dim)
        fake = self._fake(c)
        logits = self.d_net(torch.cat([torch.cat([real, fake.detach()]), torch.cat([c, c])], 1))  # (2B, 1)
        truth = torch.cat([torch.ones(len(x), 1), torch.zeros(len(x), 1)]).to(logits)
        adv_d = 2 * F.binary_cross_entropy_with_logits(logits, truth)   # = BCE(real, 1) + BCE(fake, 0)
        self._step(self.optimizers["d"], adv_d)
        g_logits = self.d_net(torch.cat([fake, c], 1))
        adv_g = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
        self._step(self.optimizers["g"], adv_g)
        return {"adv_g": adv_g.item(), "adv_d": adv_d.item()}

    @torch.no_grad()
    def val_loss(self, x: Tensor, cond: Cond = None) -> float:
        """Diagonal Fréchet distance (standardised space) between held-out data and fakes, fixed noise."""
        self.eval()
        fake = self._fake(self._cond(cond, len(x)), torch.Generator().manual_seed(0))
        return frechet_distance(self.norm(x).flatten(1), fake, full=False)

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        """(n, K, D) generator outputs, de-standardised."""
        self.eval()
        return self.norm.inverse(self._fake(self._cond(cond, n), generator).view(n, *self.token_shape))


class GaussianGenerator(_Generator):
    """Baseline: per-class mean and diagonal variance (running sums); classes keyed by their condition.

    No parameters, no optimizer: `fit_batch` adds the batch's count, sum and sum of squares
    (float64, standardised space) to the slot of each distinct condition; `sample` draws
    mean + std * noise from the slot whose key matches each row's condition.
    """

    single_pass = True
    MATCH_TOL = 1e-3  # the same class always yields the same condition; different classes are ~1 apart

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        self.register_buffer("keys", torch.zeros(0, self.cond_dim))                   # (S, cond_dim)
        self.register_buffer("count", torch.zeros(0, dtype=torch.float64))            # (S,)
        self.register_buffer("total", torch.zeros(0, self.features, dtype=torch.float64))  # (S, K*D)
        self.register_buffer("total_sq", torch.zeros(0, self.features, dtype=torch.float64))

    def _slot(self, key: Tensor, create: bool) -> int:
        """Index of the stored key matching `key`, appending an empty slot if `create`."""
        if len(self.keys) and (d := (self.keys - key).norm(dim=1)).min() < self.MATCH_TOL:
            return int(d.argmin())
        if not create:
            raise ValueError("GaussianGenerator has no statistics for this condition (class never fitted)")
        self.keys = torch.cat([self.keys, key[None]])
        self.count, self.total, self.total_sq = (torch.cat([b, b.new_zeros(1, *b.shape[1:])])
                                                 for b in (self.count, self.total, self.total_sq))
        return len(self.keys) - 1

    def _moments(self, cond: Cond, n: int) -> tuple[Tensor, Tensor]:
        """(n, K*D) mean and variance of each row's class."""
        s = torch.tensor([self._slot(k, create=False) for k in self._cond(cond, n)])
        mean = self.total[s] / self.count[s, None]
        return mean, (self.total_sq[s] / self.count[s, None] - mean ** 2).clamp_min(0)

    @torch.no_grad()
    def fit_batch(self, x: Tensor, cond: Cond = None, kl_beta: float | None = None) -> dict[str, float]:
        """Add the batch to its classes' running sums; returns the batch's Gaussian NLL afterwards."""
        z = self.norm(x).flatten(1).double()                            # (B, K*D)
        keys, inverse = torch.unique(self._cond(cond, len(x)), dim=0, return_inverse=True)
        for u, key in enumerate(keys):
            s, zb = self._slot(key, create=True), z[inverse == u]
            self.count[s] += len(zb)
            self.total[s] += zb.sum(0)
            self.total_sq[s] += zb.pow(2).sum(0)
        return {"nll": self.val_loss(x, cond)}

    @torch.no_grad()
    def val_loss(self, x: Tensor, cond: Cond = None) -> float:
        """Mean per-element Gaussian negative log-likelihood (standardised space)."""
        z = self.norm(x).flatten(1).double()
        mean, var = self._moments(cond, len(x))
        var = var.clamp_min(1e-6)
        return (0.5 * ((z - mean) ** 2 / var + var.log() + math.log(2 * math.pi))).mean().item()

    @torch.no_grad()
    def sample(self, n: int, cond: Cond = None, generator: torch.Generator | None = None) -> Tensor:
        """(n, K, D) mean + std * noise of each row's class, de-standardised."""
        mean, var = self._moments(cond, n)
        z = mean + var.sqrt() * self._noise(n, self.features, generator=generator).double()
        return self.norm.inverse(z.float().view(n, *self.token_shape))

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Resize the per-class buffers to the saved number of classes, then load."""
        for name in ("keys", "count", "total", "total_sq"):
            setattr(self, name, torch.empty_like(tensors[f"model.{name}"]))
        super().load_state_tensors(tensors)


GENERATOR_TYPES: dict[str, type[_Generator]] = {
    "vae": VAEGenerator, "cvae": CVAEGenerator, "gan": GANGenerator, "gaussian": GaussianGenerator,
}


def build_generator(spec: GeneratorSpec, token_shape: tuple[int, int], cond_dim: int = CONDITION_DIM) -> _Generator:
    """A fresh generator of `spec.type`, weights seeded by `spec.seed` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return GENERATOR_TYPES[spec.type](tuple(token_shape), cond_dim, spec)


# ---- training and sampling ----------------------------------------------------------------------

def condition_for(gen: _Generator, class_targets: dict[str, Tensor], class_ids: Tensor) -> Cond:
    """The condition `gen` is trained and sampled with: class_condition for conditional types, else None."""
    return class_condition(class_targets, class_ids, dim=gen.cond_dim) if gen.conditional else None


def sample_classes(gen: _Generator, class_targets: dict[str, Tensor], class_ids: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """(n, K, D) samples, one per entry of class_ids (unconditioned types ignore the class)."""
    class_ids = torch.as_tensor(class_ids, dtype=torch.long)
    return gen.sample(len(class_ids), condition_for(gen, class_targets, class_ids), generator=generator)


def train_generator(gen: _Generator, x: Tensor, y: Tensor, class_targets: dict[str, Tensor],
                    spec: GeneratorSpec, val: tuple[Tensor, Tensor] | None = None) -> list[dict]:
    """Mini-batched epochs of `gen.fit_batch` on (x, y); returns per-epoch mean loss components (+ "val").

    Beta ramps over ceil(kl_warmup * epochs) epochs of this call. With `val` = (x_val, y_val) and a
    patience > 0, training stops after that many epochs without a lower val loss and the best
    epoch's state is restored. Moment-based types (gaussian) make a single pass.
    """
    if x.dim() != 3 or tuple(x.shape[1:]) != gen.token_shape or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x {tuple(x.shape)} with {len(y)} labels does not fit token_shape {gen.token_shape}; "
                         "expected (N > 0, K, D) and N labels")
    if spec.early_stopping_patience and val is None:
        log.warning("generator.early_stopping_patience=%s without validation data: early stopping is off",
                    spec.early_stopping_patience)
    if not bool(gen.norm.fitted):
        gen.norm.fit(x)
    cond = condition_for(gen, class_targets, y)                         # (N, cond_dim) or None
    val_cond = condition_for(gen, class_targets, val[1]) if val is not None else None
    order_rng = torch.Generator().manual_seed(spec.seed)
    history, best, best_state, stale = [], math.inf, None, 0
    for epoch in range(1 if gen.single_pass else spec.epochs):
        beta = kl_beta(epoch, spec.epochs, spec.kl_warmup, spec.kl_weight)
        order, sums = torch.randperm(len(x), generator=order_rng), {}
        for start in range(0, len(x), spec.batch_size):
            idx = order[start:start + spec.batch_size]
            for k, v in gen.fit_batch(x[idx], None if cond is None else cond[idx], kl_beta=beta).items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        row = {"epoch": epoch, **{k: v / len(x) for k, v in sums.items()}}
        row.update({"kl_beta": beta} if "kl" in row else {})
        if val is not None:
            row["val"] = gen.val_loss(val[0], val_cond)
        history.append(row)
        log.debug("generator epoch %s: %s", epoch, row)
        if val is not None and spec.early_stopping_patience:
            if row["val"] < best:
                best, best_state, stale = row["val"], gen.state_tensors(), 0
            elif (stale := stale + 1) >= spec.early_stopping_patience:
                log.info("generator early stop at epoch %s (best val %.4g)", epoch, best)
                break
    if best_state is not None:
        gen.load_state_tensors(best_state)
    return history


# ---- granularity --------------------------------------------------------------------------------

def _check_granularity(granularity: str) -> None:
    """ValueError unless granularity is one of GRANULARITIES."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"generator.granularity={granularity!r} is not allowed; expected one of {list(GRANULARITIES)}")


def generator_keys(granularity: str, classes: list[str],
                   groups: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Which classes each generator models: {"unified": all}, {class: [class]} or {group: its classes}."""
    _check_granularity(granularity)
    if granularity != "per_group":
        return {"unified": list(classes)} if granularity == "unified" else {c: [c] for c in classes}
    if not groups:
        raise ValueError("generator.groups is empty but granularity='per_group'; expected {group: [classes]}")
    owner: dict[str, str] = {}
    for name, members in groups.items():
        if not members:
            raise ValueError(f"generator.groups.{name}=[] is empty; every group needs at least one class")
        for c in members:
            if c not in classes:
                raise ValueError(f"generator.groups.{name} names unknown class {c!r}; known classes: {list(classes)}")
            if c in owner:
                raise ValueError(f"class {c!r} is in generator.groups.{owner[c]} and generator.groups.{name}; "
                                 "each class belongs to exactly one group")
            owner[c] = name
    if missing := [c for c in classes if c not in owner]:
        raise ValueError(f"classes {missing} are in no group of generator.groups (groups: {list(groups)})")
    return {name: list(members) for name, members in groups.items()}


def key_for(granularity: str, class_name: str, groups: dict[str, list[str]] | None = None) -> str:
    """The generator key that models `class_name`."""
    _check_granularity(granularity)
    if granularity != "per_group":
        return "unified" if granularity == "unified" else class_name
    for name, members in (groups or {}).items():
        if class_name in members:
            return name
    raise ValueError(f"class {class_name!r} is in no group of generator.groups (groups: {list(groups or {})})")


# ---- sample quality and sizes -------------------------------------------------------------------

def frechet_distance(a: Tensor, b: Tensor, full: bool) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and b; full or diagonal covariances."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    mean_term = (a.mean(0) - b.mean(0)).pow(2).sum()
    if not full:
        return (mean_term + (a.std(0) - b.std(0)).pow(2).sum()).item()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    sa_half = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    m = sa_half @ sb @ sa_half                                          # tr sqrt(Sa Sb) = tr sqrt(Sa^½ Sb Sa^½)
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return (mean_term + sa.trace() + sb.trace() - 2 * cross).item()


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Exact pairwise L2 distances (no matmul shortcut, so identical rows give exactly 0)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


@torch.no_grad()
def sample_quality(real: Tensor, fake: Tensor, threshold: float | None = None) -> dict:
    """Compare one class's real (N, K, D) and synthetic (M, K, D) embeddings, flattened.

    mean_l2: distance between the means. frechet: Fréchet distance, frechet_kind "full" covariance
    only when N and M exceed the K*D features and K*D <= FULL_FRECHET_MAX_DIM, else "diag".
    diversity_fake / diversity_real: mean pairwise L2. precision: share of fakes within `threshold`
    of some real; coverage: share of reals within `threshold` of some fake; threshold: the one used
    (default: median nearest-neighbour distance among the reals).
    """
    r, f = real.double().flatten(1), fake.double().flatten(1)
    if len(r) < 2 or len(f) < 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"sample_quality needs >= 2 real and >= 2 fake rows of equal size; "
                         f"got real {tuple(real.shape)}, fake {tuple(fake.shape)}")
    thr = _dist(r, r).fill_diagonal_(math.inf).min(1).values.median().item() if threshold is None else threshold
    fr = _dist(f, r)                                                    # (M, N)
    full = min(len(r), len(f)) > r.shape[1] and r.shape[1] <= FULL_FRECHET_MAX_DIM
    return {
        "mean_l2": (r.mean(0) - f.mean(0)).norm().item(),
        "frechet": frechet_distance(r, f, full),
        "frechet_kind": "full" if full else "diag",
        "diversity_fake": (_dist(f, f).sum() / (len(f) * (len(f) - 1))).item(),
        "diversity_real": (_dist(r, r).sum() / (len(r) * (len(r) - 1))).item(),
        "precision": (fr.min(1).values <= thr).double().mean().item(),
        "coverage": (fr.min(0).values <= thr).double().mean().item(),
        "threshold": float(thr),
    }


def predecessor_vae_params(seq: int = 1214, dim: int = 768, hidden: int = 1024, latent: int = 256) -> int:
    """Parameters of the predecessor's flattened (seq*dim) VAE, for size comparisons (~1.91e9 by default)."""
    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    flat = seq * dim
    encoder = linear(flat, hidden) + linear(hidden, hidden) + linear(hidden, 2 * latent)
    decoder = linear(latent, hidden) + linear(hidden, hidden) + linear(hidden, flat)
    return encoder + decoder
