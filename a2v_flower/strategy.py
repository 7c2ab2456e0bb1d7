"""FedAvg of adapters, plus class targets sent once per site and per-round metrics for the run."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from a2v_flower.tracking import RunTracker

log = logging.getLogger(__name__)

AGGREGATIONS = {"avg": "num-examples", "uniform": "unit-weight", "none": "num-examples"}


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> ArrayRecord (numpy-backed, as Flower sends them)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors."""
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}


class A2VStrategy(FedAvg):
    """FedAvg whose weighting follows `aggregation` (avg: by examples, uniform: equal, none: unused)."""

    def __init__(self, aggregation: str, class_targets: dict[str, torch.Tensor], tracker: RunTracker,
                 classes: list[str], **kwargs):
        super().__init__(weighted_by_key=AGGREGATIONS[aggregation], **kwargs)
        self.aggregation = aggregation
        self.targets = to_record(class_targets)
        self.tracker, self.classes = tracker, classes
        self.has_targets: set[int] = set()           # nodes that already hold the class targets
        self.class_stats: dict[int, dict[str, torch.Tensor]] = {}  # last per-class statistics per site

    def _with_targets(self, messages: Iterable[Message]) -> list[Message]:
        """Give every message its own RecordDict; add the class targets for nodes that lack them."""
        out = []
        for msg in messages:
            content = RecordDict(dict(msg.content.items()))
            if msg.metadata.dst_node_id not in self.has_targets:
                content["targets"] = self.targets
                self.has_targets.add(msg.metadata.dst_node_id)
            out.append(Message(content=content, message_type=msg.metadata.message_type,
                               dst_node_id=msg.metadata.dst_node_id))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, plus targets where needed."""
        return self._with_targets(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, plus targets where needed."""
        return self._with_targets(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each site's class statistics aside, then average the adapters (FedAvg wants one ArrayRecord)."""
        replies = list(replies)
        sites = {}
        for msg in replies:
            if msg.has_error():
                log.warning("round %s: site on node %s failed: %s", server_round,
                            msg.metadata.src_node_id, msg.error.reason)
                continue
            metrics = msg.content["metrics"]
            site = int(metrics["site"])
            self.class_stats[site] = from_record(msg.content["class_stats"])
            del msg.content["class_stats"]
            sites[site] = {k: metrics[k] for k in ("train_loss", "num-examples", "encoder_calls", "skipped")}
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.tracker.log(server_round, "train", {
            "train_loss": float(np.mean([s["train_loss"] for s in sites.values()])) if sites else None,
            "encoder_calls": int(sum(s["encoder_calls"] for s in sites.values())),
            "skipped_files": int(sum(s["skipped"] for s in sites.values())),
            "failures": len(replies) - len(sites), "sites": sites})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Global retrieval metrics = all sites' held-out clips pooled; per-site metrics logged too."""
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            log.warning("round %s: no site returned evaluation results", server_round)
            return None
        rows = {int(m.content["metrics"]["site"]): m.content["metrics"] for m in ok}
        n = sum(r["num-examples"] for r in rows.values())
        if n == 0:
            log.warning("round %s: no site has held-out clips to evaluate", server_round)
            return None
        correct = np.sum([r["correct_per_class"] for r in rows.values()], axis=0)
        count = np.sum([r["count_per_class"] for r in rows.values()], axis=0)
        glob = {k: float(sum(r[k] * r["num-examples"] for r in rows.values()) / n) for k in ("top1", "top5", "cosine")}
        per_class = {c: float(correct[i] / count[i]) for i, c in enumerate(self.classes) if count[i]}
        sites = {s: {k: float(r[k]) for k in ("top1", "top5", "cosine")} | {"n": int(r["num-examples"])}
                 for s, r in sorted(rows.items()) if r["num-examples"]}
        self.tracker.log(server_round, "eval", glob | {"num_examples": int(n), "per_class": per_class,
                                                       "sites": sites})
        log.info("round %d: global top1=%.3f top5=%.3f cosine=%.3f | %s", server_round, glob["top1"],
                 glob["top5"], glob["cosine"], " ".join(f"site{s}={v['top1']:.2f}" for s, v in sites.items()))
        return MetricRecord(glob | {"num-examples": int(n)})
