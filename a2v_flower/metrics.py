"""Zero-shot retrieval of held-out clips: is the adapter output nearest to its own class's target?"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _centered(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten, remove the across-class mean target (the prompt template's shared part), L2-normalise."""
    mean = targets.flatten(1).mean(0)
    return (F.normalize(outputs.flatten(1) - mean, dim=1), F.normalize(targets.flatten(1) - mean, dim=1))


def similarity(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, C) cosine similarity of outputs to class targets, averaged over heads."""
    sims = [o @ t.T for o, t in (_centered(outputs[h], targets[h]) for h in targets)]
    return torch.stack(sims).mean(0)


def retrieval(outputs: dict[str, torch.Tensor], labels: torch.Tensor,
              targets: dict[str, torch.Tensor]) -> dict:
    """Top-1/top-5 retrieval accuracy, mean cosine to the true target, per-class correct/total counts."""
    sim = similarity(outputs, targets)
    num_classes = sim.shape[1]
    ranked = sim.topk(min(5, num_classes), dim=1).indices
    hit1 = ranked[:, 0] == labels
    hit5 = (ranked == labels[:, None]).any(1)
    cos = torch.stack([F.cosine_similarity(outputs[h].flatten(1), targets[h][labels].flatten(1))
                       for h in targets]).mean(0)
    return {
        "top1": hit1.float().mean().item(),
        "top5": hit5.float().mean().item(),
        "cosine": cos.mean().item(),
        "correct_per_class": torch.bincount(labels[hit1], minlength=num_classes).tolist(),
        "count_per_class": torch.bincount(labels, minlength=num_classes).tolist(),
    }
