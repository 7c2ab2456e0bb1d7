"""Conditional GAN generator (non-saturating loss), both networks gradient-clipped."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from a2v_flower.models.generators.base import BaseGenerator, Cond, mlp
from a2v_flower.models.generators.quality import frechet_distance
from a2v_flower.generator_schema import GeneratorSpec


class GANGenerator(BaseGenerator):
    """Conditional GAN; generator and discriminator each own a clipped AdamW."""

    def __init__(self, token_shape: tuple[int, int], cond_dim: int, spec: GeneratorSpec):
        super().__init__(token_shape, cond_dim, spec)
        self.latent_dim = spec.latent_dim
        self.g_net = mlp(spec.latent_dim + self.cond_dim, spec.hidden, self.features)
        self.d_net = mlp(self.features + self.cond_dim, spec.hidden, 1, act=partial(nn.LeakyReLU, 0.2))
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
        return {"loss": adv_g.item() + adv_d.item(), "adv_g": adv_g.item(), "adv_d": adv_d.item()}

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
