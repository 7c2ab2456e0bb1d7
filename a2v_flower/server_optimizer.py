"""The server's step on the sites' averaged update: FedAvgM's server learning rate and momentum (Hsu et al. 2019).

FedAvg replaces the global adapters by the sites' average. With many tiny sites (cross-device: a few clips each)
every site takes only a few optimiser steps per round, and their updates, made from different clips, partly cancel:
the average moves far less per round than a few large sites' does. FedAvgM treats `received - average` as a
gradient: new = received - lr * v, with v = momentum * v + (received - average). lr=1, momentum=0 is FedAvg exactly.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


class ServerMomentum:
    """Server learning rate `lr` and heavy-ball `momentum` over rounds on the averaged adapters (FedAvgM)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0):
        if not lr > 0:
            raise ValueError(f"strategy.server_lr={lr!r} is not allowed; expected a number > 0 (1 = FedAvg)")
        if not 0 <= momentum < 1:
            raise ValueError(f"strategy.server_momentum={momentum!r} is not allowed; expected a number in [0, 1)")
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, np.ndarray] = {}  # key -> (shape of the array) running pseudo-gradient

    @property
    def active(self) -> bool:
        """False when the step is FedAvg's (lr 1, no momentum): the average is returned untouched."""
        return self.lr != 1.0 or self.momentum != 0.0

    def step(self, sent: ArrayRecord, averaged: ArrayRecord) -> ArrayRecord:
        """The new global adapters from the ones `sent` to the sites this round and the sites' `averaged` reply
        (float32 both); arrays that are not floating point (none today) are taken from the average."""
        if not self.active:
            return averaged
        out = {}
        for key, arr in averaged.items():
            new = arr.numpy()
            if not np.issubdtype(new.dtype, np.floating):
                out[key] = Array(new)
                continue
            old = sent[key].numpy().astype(new.dtype)
            grad = old - new                                           # the sites' update, as a gradient
            v = self.velocity[key] = self.momentum * self.velocity[key] + grad if key in self.velocity else grad
            out[key] = Array(np.asarray(old - self.lr * v, dtype=new.dtype))
        return ArrayRecord(out)
