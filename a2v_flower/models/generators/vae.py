"""VAE generators: unconditioned (`vae`, one per class) and conditioned on the class (`cvae`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from a2v_flower.models.generators.base import BaseGenerator, Cond, mlp
from a2v_flower.generator_schema import GeneratorSpec


class VAEGenerator(BaseGenerator):
    """Unconditioned VAE on the flattened, standardised (K*D) embedding."""

    conditional = False

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        self.latent_dim, self.kl_weight = spec.latent_dim, spec.kl_weight
        self.enc = mlp(self.features + self.cond_dim, spec.hidden, 2 * spec.latent_dim)
        self.dec = mlp(spec.latent_dim + self.cond_dim, spec.hidden, self.features)
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
