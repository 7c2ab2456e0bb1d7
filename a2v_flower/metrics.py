"""Zero-shot retrieval of held-out clips: is the adapter output nearest to its own class's target?"""

from __future__ import annotations

import numpy as np
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


def pool_evaluations(rows: dict[int, dict], classes: list[str], seen: list[int], best_acc: dict[int, float]) -> dict | None:
    """One round's global metrics from the sites' evaluation replies (site -> metrics).

    top1/top5/cosine pool every site's held-out clips; `seen_top1` is top-1 on the classes trained so far;
    `forgetting` is the mean, over seen classes with a history, of best earlier accuracy minus now
    (`best_acc`, class -> best accuracy so far, is updated). None when no site has held-out clips.
    """
    n = sum(r["num-examples"] for r in rows.values())
    if n == 0:
        return None
    correct = np.sum([r["correct_per_class"] for r in rows.values()], axis=0)
    count = np.sum([r["count_per_class"] for r in rows.values()], axis=0)
    glob = {k: float(sum(r[k] * r["num-examples"] for r in rows.values()) / n) for k in ("top1", "top5", "cosine")}
    # share of the held-out clips whose class the site scoring them has trained on (a tiny site tests on others)
    glob["trained_here"] = float(sum(r.get("trained_here", r["num-examples"]) for r in rows.values()) / n)
    seen = [c for c in seen if count[c]]
    glob["seen_top1"] = float(correct[seen].sum() / count[seen].sum()) if seen else 0.0
    forgetting = {classes[c]: max(0.0, best_acc[c] - correct[c] / count[c]) for c in seen if c in best_acc}
    glob["forgetting"] = float(np.mean(list(forgetting.values()))) if forgetting else 0.0
    for c in seen:
        best_acc[c] = max(best_acc.get(c, 0.0), float(correct[c] / count[c]))
    return glob | {
        "num_examples": int(n), "per_class": {c: float(correct[i] / count[i]) for i, c in enumerate(classes) if count[i]},
        "seen_classes": [classes[c] for c in seen], "forgetting_per_class": forgetting,
        "sites": {s: {k: float(r[k]) for k in ("top1", "top5", "cosine")} | {"n": int(r["num-examples"])}
                  | {"trained_here": int(r.get("trained_here", r["num-examples"]))}
                  for s, r in sorted(rows.items()) if r["num-examples"]}}


def summarise_training(sites: dict[int, dict], failures: int) -> dict:
    """One round's training row: mean loss, summed counts, mean generator figures and bytes, per-site rows."""
    first = next(iter(sites.values()), {})
    return {k: float(np.mean([s[k] for s in sites.values()])) for k in first
            if k.startswith("gen_") or k.startswith("bytes_")} | {
        "train_loss": float(np.mean([s["train_loss"] for s in sites.values()])) if sites else None,
        "encoder_calls": int(sum(s["encoder_calls"] for s in sites.values())),
        "skipped_files": int(sum(s["skipped"] for s in sites.values())),
        "failures": failures, "sites": sites}


COUNTS = ("num-examples", "encoder_calls", "skipped", "synthetic", "resets", "clip_images", "correct_per_class",
          "count_per_class", "trained_here")  # metrics summed over sites (the rest are weighted means)
IDS = ("site", "unit-weight")  # metrics that identify or weight a reply: no aggregate means anything


def aggregate_metrics(records: list, weight_key: str):
    """Flower's per-round aggregate of the sites' MetricRecords: counts summed, ids dropped, every other
    metric averaged with weights `weight_key` (equal weights when they sum to 0); lists element-wise."""
    from flwr.app import MetricRecord

    rows = [next(iter(r.metric_records.values())) for r in records]
    out = {}
    for key in dict.fromkeys(k for m in rows for k in m if k not in IDS):  # every key, in first-seen order
        have = [m for m in rows if key in m]
        values = np.array([m[key] for m in have], dtype=float)           # (sites,) or (sites, classes)
        if key in COUNTS:
            total = values.sum(0).round().astype(int)
            out[key] = total.tolist() if total.ndim else int(total)
            continue
        w = np.array([float(m[weight_key]) for m in have])
        w = w / w.sum() if w.sum() > 0 else np.full(len(have), 1 / len(have))
        mean = np.tensordot(w, values, axes=1)
        out[key] = mean.tolist() if mean.ndim else float(mean)
    return MetricRecord(out)
