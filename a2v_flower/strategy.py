"""The Flower strategy: FedAvg of the adapters, class targets sent once per node, per-round metrics.

Everything about generators (class statistics, sharing, synthetic samples, server training) lives in
`server_generators.ServerGenerators`, which the strategy calls at three points: composing train messages,
after averaging, and for checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from a2v_flower.metrics import aggregate_metrics, pool_evaluations, summarise_training
from a2v_flower.nodes import FailureLog, RoundFailed, learn_sites, wait_for_sites
from a2v_flower.records import cast, not_finite, payload_bytes, to_record
from a2v_flower.server_generators import ServerGenerators
from a2v_flower.tracking import RunTracker

log = logging.getLogger(__name__)

AGGREGATIONS = {"avg": "num-examples", "uniform": "unit-weight", "none": "num-examples", "kd": "num-examples"}


class A2VStrategy(FedAvg):
    """FedAvg whose weighting follows `aggregation` (avg: by examples, uniform: equal, none: unused)."""

    def __init__(self, aggregation: str, class_targets: dict[str, torch.Tensor], tracker: RunTracker,
                 classes: list[str], generators: ServerGenerators, seen_fn: Callable[[int], set[int]] | None = None,
                 timeout: float = 3600, clip_images: Callable[[int], int] | None = None, run_config: str = "",
                 num_sites: int = 1, min_sites: int = 1, wire: str = "float32",
                 input_norm: dict[str, torch.Tensor] | None = None, evaluate_on_sites: bool = True, **kwargs):
        super().__init__(weighted_by_key=AGGREGATIONS[aggregation], train_metrics_aggr_fn=aggregate_metrics,
                         evaluate_metrics_aggr_fn=aggregate_metrics, **kwargs)
        self.tracker, self.classes, self.generators, self.timeout = tracker, classes, generators, timeout
        self.targets = to_record(class_targets)
        self.input_norm = to_record(input_norm) if input_norm else None  # the adapters' input standardisation
        self.run_config = ConfigRecord({"yaml": run_config})  # the resolved config, sent once per node
        self.has_targets: set[int] = set()           # nodes that already hold the class targets
        self.site_of_node: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}         # node -> bytes of this round's train message
        self.bytes_down_eval: dict[int, int] = {}    # node -> bytes of this round's evaluate message
        self.clip_images = clip_images               # round -> held-out clips each site renders (0 = none)
        self.seen_fn = seen_fn                       # round -> class ids trained by some site so far
        self.best_acc: dict[int, float] = {}         # class -> best held-out accuracy so far (forgetting)
        self.round_offset = 0                        # rounds done before a resume
        self.resume_round = 0                        # > 0: sites restore their state of that round
        self.round_started = time.time()             # when this round's configure_train began
        self.num_sites, self.min_sites = num_sites, min_sites  # a round may lose num_sites - min_sites sites
        self.failures = FailureLog(num_sites, min_sites)
        self.sent: list[Message] = []                # messages of the current train/evaluate step
        self.wire = wire                             # dtype adapters travel in; averaged in float32
        self.evaluate_on_sites = evaluate_on_sites   # False (evaluate.mode=server): the server scores its own clips

    def _with_targets(self, messages: Iterable[Message], extra: dict | None = None) -> list[Message]:
        """Give every message its own RecordDict and `extra` config; add the class targets, the run config and
        the adapters' input standardisation for nodes that lack them."""
        out = []
        for msg in messages:
            content = RecordDict(dict(msg.content.items()))
            if extra or self.resume_round:
                content["config"] = ConfigRecord(dict(content["config"].items()) | (extra or {})
                                                 | ({"resume-round": self.resume_round} if self.resume_round else {}))
            if msg.metadata.dst_node_id not in self.has_targets:
                content["targets"], content["run-config"] = self.targets, self.run_config
                if self.input_norm is not None:
                    content["input_norm"] = self.input_norm
                self.has_targets.add(msg.metadata.dst_node_id)
            out.append(Message(content=content, message_type=msg.metadata.message_type,
                               dst_node_id=msg.metadata.dst_node_id))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, plus targets where needed, shared generators and synthetic samples."""
        server_round += self.round_offset
        self.round_started = time.time()
        wait_for_sites(grid, server_round, self.min_sites, self.timeout)
        train = super().configure_train(server_round, cast(arrays, self.wire), config, grid)
        messages = self.sent = self._with_targets(train)
        learn_sites(grid, [m.metadata.dst_node_id for m in messages], self.site_of_node, self.num_sites, self.timeout)
        replay = self.generators.replay
        if replay is not None and replay.sharing == "sequential" and replay.train:
            self.generators.train_sequentially(
                server_round, messages, lambda n: self.site_of_node.get(n, 1 << 30), grid, self.timeout,
                lambda replies, sent: self.note_failures(server_round, "train.generators", replies, sent))
        for msg in messages:
            for name, record in self.generators.outgoing(self.site_of_node.get(msg.metadata.dst_node_id),
                                                         server_round).items():
                msg.content[name] = record
        self.bytes_down = {msg.metadata.dst_node_id: payload_bytes(msg.content) for msg in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, plus targets where needed; in a render round sites also render some clips."""
        server_round += self.round_offset
        if not self.evaluate_on_sites:
            return []
        n = self.clip_images(server_round) if self.clip_images else 0
        wait_for_sites(grid, server_round, self.min_sites, self.timeout)
        evaluate = super().configure_evaluate(server_round, cast(arrays, self.wire), config, grid)
        messages = self.sent = self._with_targets(evaluate, {"render-clips": n} if n else None)
        learn_sites(grid, [m.metadata.dst_node_id for m in messages], self.site_of_node, self.num_sites, self.timeout)
        self.bytes_down_eval = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
        return messages

    def note_failures(self, server_round: int, step: str, replies: list[Message], sent: list[Message],
                      rejected: dict[int, str] | None = None) -> None:
        """Name the sites that failed `step` (FailureLog); a failed ClientApp kept nothing: resend its targets."""
        self.has_targets -= self.failures.note(server_round, step, replies, sent, self.site_of_node, rejected)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each site's class statistics and generators aside, average the adapters, then server training."""
        server_round += self.round_offset
        # by site: the same float sums whatever order replies arrive in (a resumed run matches an uninterrupted one)
        replies = sorted(replies, key=lambda m: -1 if m.has_error() else int(m.content["metrics"]["site"]))
        rejected = {m.metadata.src_node_id: why for m in replies if not m.has_error() and (why := unfit(m))}
        self.note_failures(server_round, "train", replies, self.sent, rejected)
        answered = len(replies)
        replies = [m for m in replies if m.metadata.src_node_id not in rejected]  # fails like any failed site
        sites, teachers = {}, {}
        for msg in replies:
            if msg.has_error():
                continue
            metrics, node = msg.content["metrics"], msg.metadata.src_node_id
            site = self.site_of_node[node] = int(metrics["site"])
            up = payload_bytes(msg.content)
            msg.content["arrays"] = cast(msg.content["arrays"], "float32")  # averaged in float32 as it travelled
            report = self.generators.receive(site, msg.content)
            if self.generators.wants_teachers:
                teachers[site] = msg.content["arrays"].to_torch_state_dict()
            sites[site] = {k: v for k, v in metrics.items() if k not in ("site", "unit-weight")}
            sites[site] |= {"bytes_up": up, "bytes_down": self.bytes_down.get(node, 0)} | report
        arrays, metrics = super().aggregate_train(server_round, replies)
        check_finite(server_round, arrays, "averaging")
        arrays, server = self.generators.after_aggregation(server_round, arrays, teachers)
        check_finite(server_round, arrays, "server training")
        self.tracker.log(server_round, "train", server | summarise_training(sites, answered - len(sites)))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Global retrieval metrics over all sites' held-out clips, per site, on classes seen so far, forgetting."""
        server_round += self.round_offset
        replies = list(replies)
        if not self.evaluate_on_sites:
            return None
        self.note_failures(server_round, "evaluate", replies, self.sent)
        rows = {int(m.content["metrics"]["site"]): m.content["metrics"] for m in replies if not m.has_error()}
        seen = sorted(self.seen_fn(server_round)) if self.seen_fn else list(range(len(self.classes)))
        glob = pool_evaluations(rows, self.classes, seen, self.best_acc) if rows else None
        if glob is None:
            log.warning("round %s: no site returned held-out evaluation results", server_round)
            return None
        glob["bytes_down"] = float(sum(self.bytes_down_eval.values()) / max(1, len(self.bytes_down_eval)))
        glob["clip_images"] = int(sum(r.get("clip_images", 0) for r in rows.values()))
        self.tracker.log(server_round, "eval", glob)
        return MetricRecord({k: glob[k] for k in ("top1", "top5", "cosine", "seen_top1", "forgetting")}
                            | {"num-examples": glob["num_examples"]})


def unfit(reply: Message) -> str:
    """Why a site's train reply cannot be used ('' if it can): adapters or class statistics not finite."""
    bad = [f"{name}/{k}" for name in ("arrays", "class_stats") if name in reply.content
           for k in not_finite(reply.content[name])]
    return f"update not finite: NaN or Inf in {bad[:3]}" if bad else ""


def check_finite(server_round: int, arrays: ArrayRecord | None, step: str) -> None:
    """Stop the run (RoundFailed) when the global adapters hold NaN or Inf after `step`."""
    if arrays is not None and (bad := not_finite(arrays)):
        raise RoundFailed(f"round {server_round}: the global adapters are not finite after {step} (NaN or Inf in "
                          f"{bad[:3]}); the run stops rather than save them")
