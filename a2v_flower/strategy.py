"""FedAvg of adapters, plus class targets sent once per site and per-round metrics for the run."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from a2v_flower import replay as R
from a2v_flower import server_generator as SG
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.tracking import RunTracker

log = logging.getLogger(__name__)

AGGREGATIONS = {"avg": "num-examples", "uniform": "unit-weight", "none": "num-examples", "kd": "num-examples"}


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> ArrayRecord (numpy-backed, as Flower sends them)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (serialised numpy, as they travel)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors."""
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}


class RoundFailed(RuntimeError):
    """A round ended with fewer sites than `federation.min_sites`, or too few SuperNodes are connected."""


def short_reason(reason: str) -> str:
    """The gist of a site's error reply (Flower sends a remote traceback): one line, at most 300 characters."""
    lines = [line for line in str(reason).splitlines() if line.strip()] or ["error without a reason"]
    text = reason.rsplit("Message: ", 1)[1] if "Message: " in reason else lines[-1]
    return " ".join(text.split()).rstrip("'>")[:300]


def query_sites(grid: Grid, nodes: list[int], timeout: float) -> dict[int, tuple[int, int]]:
    """Node -> (partition-id, num-partitions or 0) as each node reports it (a "query.site" message)."""
    msgs = [Message(content=RecordDict(), message_type="query.site", dst_node_id=n) for n in nodes]
    return {r.metadata.src_node_id: (int(r.content["metrics"]["site"]), int(r.content["metrics"]["num-partitions"]))
            for r in grid.send_and_receive(msgs, timeout=timeout) if not r.has_error()}


class A2VStrategy(FedAvg):
    """FedAvg whose weighting follows `aggregation` (avg: by examples, uniform: equal, none: unused)."""

    def __init__(self, aggregation: str, class_targets: dict[str, torch.Tensor], tracker: RunTracker,
                 classes: list[str], replay: R.ReplaySpec | None = None,
                 make_adapters: Callable[[], AdapterSet] | None = None, train_spec=None, seed: int = 0,
                 token_shape: tuple[int, int] = (8, 64), seen_fn: Callable[[int], set[int]] | None = None,
                 timeout: float = 3600, server_gen: SG.ServerGeneratorSpec | None = None,
                 clip_images: Callable[[int], int] | None = None, num_sites: int = 1, min_sites: int = 1,
                 **kwargs):
        super().__init__(weighted_by_key=AGGREGATIONS[aggregation], **kwargs)
        self.aggregation, self.replay, self.make_adapters = aggregation, replay, make_adapters
        self.train_spec, self.seed, self.token_shape = train_spec, seed, token_shape
        self.class_targets = class_targets
        self.targets = to_record(class_targets)
        self.tracker, self.classes = tracker, classes
        self.has_targets: set[int] = set()           # nodes that already hold the class targets
        self.class_stats: dict[int, dict[str, torch.Tensor]] = {}  # last per-class statistics per site
        self.generators: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # site -> key -> weights
        self.site_of_node: dict[int, int] = {}
        self.shared: dict[str, dict[str, torch.Tensor]] = {}  # sharing=averaged: key -> state
        self.bytes_down: dict[int, int] = {}         # node -> bytes of this round's train message
        self.bytes_down_eval: dict[int, int] = {}    # node -> bytes of this round's evaluate message
        self.timeout = timeout
        self.clip_images = clip_images               # round -> held-out clips each site renders (0 = none)
        self.server_gen = server_gen if server_gen is not None and server_gen.epochs else None
        self.stats_generator = (SG.StatsGenerator(token_shape, server_gen) if self.server_gen else None)
        self.seen_fn = seen_fn                       # round -> class ids trained by some site so far
        self.best_acc: dict[int, float] = {}         # class -> best held-out accuracy so far (forgetting)
        self.round_offset = 0                        # rounds done before a resume
        self.resume_round = 0                        # > 0: sites restore their state of that round
        self.num_sites, self.min_sites = num_sites, min_sites  # a round may lose num_sites - min_sites sites
        self.failures: dict[int, dict[str, str]] = {}  # round -> site -> first reason it failed that round
        self.sent: list[Message] = []                # messages of the current train/evaluate step

    def owners(self, seen: bool = False) -> dict[int, list[int]]:
        """Class index -> sites whose last statistics show training clips of it this round (adapter teachers),
        or, with `seen`, that trained it in any round (their generators cover it)."""
        out: dict[int, list[int]] = {}
        for site, stats in sorted(self.class_stats.items()):
            for c in torch.nonzero(stats["seen" if seen and "seen" in stats else "counts"]).flatten().tolist():
                out.setdefault(c, []).append(site)
        return out

    def synthetic(self, per_class: int, wanted: list[int] | None = None, seed: int = 0):
        """Samples of the sites' generators: (x (N, K, D), y (N,))."""
        r = self.replay
        return R.synthesize(self.generators, self.owners(seen=True), self.classes, r.granularity, r.groups,
                            r.generator, self.token_shape, self.class_targets, per_class, wanted, seed)

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
        """FedAvg's messages, plus targets where needed and synthetic samples of classes a site lacks."""
        server_round += self.round_offset
        config = self._resume_config(config)
        self.wait_for_sites(grid, server_round)
        messages = self._with_targets(super().configure_train(server_round, arrays, config, grid))
        self.learn_sites(grid, [m.metadata.dst_node_id for m in messages])
        self.sent = messages
        if self.replay and self.replay.sharing == "sequential" and self.replay.train:
            self.train_sequentially(server_round, messages, grid)
        if self.shared:
            record = to_record(R.flatten(self.shared))
            for msg in messages:
                msg.content["shared_generators"] = record
        n = self.replay.synthetic_samples_per_class if self.replay else 0
        covered = self.owners(seen=True)  # classes some site's generators cover
        for msg in messages if n and self.generators else []:
            site = self.site_of_node.get(msg.metadata.dst_node_id)
            if site is None or site not in self.class_stats:  # no statistics from it yet
                continue
            now = set(torch.nonzero(self.class_stats[site]["counts"]).flatten().tolist())
            lacking = [c for c in covered if c not in now]
            x, y = self.synthetic(n, lacking, seed=self.seed + 31 * server_round + site)
            if len(y):
                msg.content["synthetic"] = to_record({"x": x, "y": y})
        self.bytes_down = {msg.metadata.dst_node_id: payload_bytes(msg.content) for msg in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, plus targets where needed."""
        config = self._resume_config(config)
        server_round += self.round_offset
        n = self.clip_images(server_round) if self.clip_images else 0
        if n:  # a render round: sites also render some of their held-out clips
            config = ConfigRecord(dict(config.items()) | {"render-clips": n})
        self.wait_for_sites(grid, server_round)
        messages = self._with_targets(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent = messages
        self.bytes_down_eval = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
        return messages

    def _resume_config(self, config: ConfigRecord) -> ConfigRecord:
        """After a resume, messages say which round's state the sites restore."""
        if not self.resume_round:
            return config
        return ConfigRecord(dict(config.items()) | {"resume-round": self.resume_round})

    def learn_sites(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes whose site (partition id) is not known yet (a SuperNode that joined late); refuse one
        whose num-partitions disagrees with the federation's size."""
        ask = [n for n in nodes if n not in self.site_of_node]
        for node, (site, size) in (query_sites(grid, ask, self.timeout) if ask else {}).items():
            if size and size != self.num_sites:
                raise RoundFailed(f"SuperNode {node} (partition-id={site}) has num-partitions={size} but the "
                                  f"federation has {self.num_sites} sites; start it with num-partitions={self.num_sites}")
            self.site_of_node[node] = site

    def wait_for_sites(self, grid: Grid, server_round: int) -> None:
        """Go on as soon as `min_sites` SuperNodes are connected (FedAvg would wait for all of them, forever
        when one has died); stop after federation.timeout seconds with fewer."""
        start = time.monotonic()
        while len(nodes := list(grid.get_node_ids())) < self.min_sites:
            if time.monotonic() - start > self.timeout:
                raise RoundFailed(f"round {server_round}: only {len(nodes)} SuperNodes connected after "
                                  f"federation.timeout={self.timeout:.0f} s; federation.min_sites={self.min_sites}")
            if time.monotonic() - start < 1:
                log.info("round %s: waiting for SuperNodes: %d connected, federation.min_sites=%d",
                         server_round, len(nodes), self.min_sites)
            time.sleep(1)

    def note_failures(self, server_round: int, step: str, replies: list[Message], sent: list[Message]) -> None:
        """Record each site that failed this step (error reply, or no reply to a message in `sent`); stop the
        run when more sites failed this round than federation.min_sites allows."""
        # by the message answered: the SuperLink's own error replies (node unavailable) come from node 1
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        answered = {node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in replies}
        failed = {node: short_reason(m.error.reason) for node, m in answered.items() if m.has_error()}
        failed |= {n: "no reply within federation.timeout" for n in set(node_of.values()) - set(answered)}
        row = self.failures.setdefault(server_round, {})
        for node, reason in failed.items():
            self.has_targets.discard(node)  # a failed ClientApp kept nothing: send the targets again
            who = f"site {self.site_of_node[node]}" if node in self.site_of_node else f"node {node}"
            row.setdefault(who, f"{step}: {reason}")
            log.warning("round %s: %s failed in %s: %s", server_round, who, step, reason)
        if not row:
            del self.failures[server_round]
        elif len(row) > self.num_sites - self.min_sites:
            who, why = next(iter(row.items()))
            raise RoundFailed(f"round {server_round}: {len(row)} of {self.num_sites} sites failed, more than "
                              f"federation.min_sites={self.min_sites} allows; first: {who}: {why}")

    def train_sequentially(self, server_round: int, messages: list[Message], grid: Grid) -> None:
        """sharing=sequential: hand the one shared state per key to the sites one after another (by site id);
        each trains it on its data and returns it. Weights, AdamW moments and step counts pass on intact."""
        order = sorted(messages, key=lambda m: self.site_of_node.get(m.metadata.dst_node_id, 1 << 30))
        for msg in order:
            content = RecordDict({"config": msg.content["config"]})
            if "targets" in msg.content:
                content["targets"] = msg.content["targets"]
            if self.shared:
                content["shared_generators"] = to_record(R.flatten(self.shared))
            node = msg.metadata.dst_node_id
            out = Message(content=content, message_type="train.generators", dst_node_id=node)
            reply = next(iter(grid.send_and_receive([out], timeout=self.timeout)), None)
            if reply is None or reply.has_error():
                self.note_failures(server_round, "train.generators", [reply] if reply is not None else [], [out])
                continue
            trained = R.unflatten(from_record(reply.content["generators"]))
            self.shared = {**self.shared, **trained}
            log.info("round %s: site %s trained shared generators %s", server_round,
                     reply.content["metrics"]["site"], sorted(trained))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each site's class statistics aside, then average the adapters (FedAvg wants one ArrayRecord)."""
        server_round += self.round_offset
        # by site: the same float sums whatever order replies arrive in (a resumed run matches an uninterrupted one)
        replies = sorted(replies, key=lambda m: -1 if m.has_error() else int(m.content["metrics"]["site"]))
        self.note_failures(server_round, "train", replies, self.sent)
        sites, teachers = {}, {}
        for msg in replies:
            if msg.has_error():
                continue
            metrics = msg.content["metrics"]
            site = int(metrics["site"])
            self.site_of_node[msg.metadata.src_node_id] = site
            up = payload_bytes(msg.content)
            self.class_stats[site] = from_record(msg.content["class_stats"])
            del msg.content["class_stats"]
            if "generators" in msg.content:
                self.generators[site] = R.unflatten(from_record(msg.content["generators"]))
                del msg.content["generators"]
            if self.aggregation == "kd" or self.server_gen:
                teachers[site] = msg.content["arrays"].to_torch_state_dict()
            sites[site] = {k: v for k, v in metrics.items() if k not in ("site", "unit-weight")}
            sites[site] |= {"bytes_up": up, "bytes_down": self.bytes_down.get(msg.metadata.src_node_id, 0)}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.replay and self.replay.sharing == "averaged" and self.generators:
            self.share_generators()
        elif self.replay and self.replay.sharing == "sequential":
            self.generators = {site: self.shared for site in self.class_stats}  # the same objects, not copies
        arrays, server = self.server_training(server_round, arrays, teachers)
        gen = {k: float(np.mean([s[k] for s in sites.values()])) for k in next(iter(sites.values()), {})
               if k.startswith("gen_") or k.startswith("bytes_")}
        self.tracker.log(server_round, "train", server | gen | {
            "train_loss": float(np.mean([s["train_loss"] for s in sites.values()])) if sites else None,
            "encoder_calls": int(sum(s["encoder_calls"] for s in sites.values())),
            "skipped_files": int(sum(s["skipped"] for s in sites.values())),
            "failures": len(replies) - len(sites), "sites": sites})
        return arrays, metrics

    def share_generators(self) -> None:
        """sharing=averaged: one state per key, the count-weighted mean over the sites that trained it
        (weights and AdamW moments); every site gets it next round. Memory: one state per key."""
        owners, keys = self.owners(), {}
        for site, gens in self.generators.items():
            for key in gens:
                keys.setdefault(key, []).append(site)
        shared = {}
        for key, sites in keys.items():
            weight = [float(sum(self.class_stats[s]["counts"][c] for c in owners if s in owners[c])) or 1.0
                      for s in sites]
            shared[key] = R.average_states([self.generators[s][key] for s in sites], weight)
        self.shared = shared
        self.generators = {site: shared for site in self.generators}  # the same objects, not copies

    def server_training(self, server_round: int, arrays: ArrayRecord | None, teachers: dict
                        ) -> tuple[ArrayRecord | None, dict]:
        """After averaging: train the server's own generator (if on), then kd distillation and/or refinement
        of the global adapters with the synthetic samples of the sites' generators and the server's."""
        r, sg = self.replay, self.server_gen
        if arrays is None or (r is not None and r.only):
            return arrays, {}
        opts = r or sg  # samples_per_class, refine_epochs, kd_epochs
        site_samples = r is not None and bool(self.generators)
        if opts is None or not (site_samples or sg) or not (self.aggregation == "kd" or opts.refine_epochs):
            return arrays, {}
        glob = self.make_adapters()
        glob.load_state_dict(arrays.to_torch_state_dict())
        models = {}
        for site, state in teachers.items():
            models[site] = self.make_adapters()
            models[site].load_state_dict(state)
        out: dict = {}
        if site_samples:
            x, y = self.synthetic(r.samples_per_class, seed=self.seed + server_round)
        else:
            x, y = torch.empty(0, *self.token_shape), torch.empty(0, dtype=torch.long)
        if sg:
            out["server/generator_loss"] = SG.train_server_generator(
                self.stats_generator, models, self.class_stats, self.class_targets, sg, self.seed + server_round)
            sx, sy = SG.sample_server_generator(self.stats_generator, self.class_stats, self.class_targets,
                                                sg.samples_per_class, self.seed + 7 * server_round)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
        out["server/synthetic_samples"] = len(y)
        if self.aggregation == "kd" and len(y):
            spec = replace(self.train_spec, epochs=opts.kd_epochs)
            out["server/kd_loss"] = R.distill(glob, models, self.owners(), x, y, spec, self.seed)
        if opts.refine_epochs:
            present, means = R.class_audio_means(self.class_stats, len(self.classes))
            xs, ys = torch.cat([x, means]), torch.cat([y, torch.tensor(present, dtype=torch.long)])
            spec = replace(self.train_spec, epochs=opts.refine_epochs)
            out["server/adapter_finetuning_loss"] = R.refine(glob, xs, ys, self.class_targets, spec, self.seed)
        log.info("round %s: server training %s", server_round,
                 {k: round(v, 4) for k, v in out.items() if isinstance(v, float)})
        return ArrayRecord(glob.state_dict()), out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Global retrieval metrics = all sites' held-out clips pooled; per-site metrics logged too; accuracy on
        the classes seen so far and forgetting (best earlier accuracy - now, mean over earlier-seen classes)."""
        server_round += self.round_offset
        replies = list(replies)
        self.note_failures(server_round, "evaluate", replies, self.sent)
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
        seen = sorted(self.seen_fn(server_round)) if self.seen_fn else list(range(len(self.classes)))
        seen = [c for c in seen if count[c]]
        glob["seen_top1"] = float(correct[seen].sum() / count[seen].sum()) if seen else 0.0
        forgetting = {self.classes[c]: max(0.0, self.best_acc[c] - correct[c] / count[c])
                      for c in seen if c in self.best_acc}
        glob["forgetting"] = float(np.mean(list(forgetting.values()))) if forgetting else 0.0
        for c in seen:
            self.best_acc[c] = max(self.best_acc.get(c, 0.0), float(correct[c] / count[c]))
        self.tracker.log(server_round, "eval", glob | {"num_examples": int(n), "per_class": per_class,
                                                       "seen_classes": [self.classes[c] for c in seen],
                                                       "forgetting_per_class": forgetting, "sites": sites,
                                                       "bytes_down": float(np.mean(list(self.bytes_down_eval.values())
                                                                                   or [0])),
                                                       "clip_images": int(sum(r["clip_images"] for r in rows.values()
                                                                              if "clip_images" in r))})
        log.info("round %d: global top1=%.3f top5=%.3f cosine=%.3f | seen classes %d top1=%.3f forgetting=%.3f | %s",
                 server_round, glob["top1"], glob["top5"], glob["cosine"], len(seen), glob["seen_top1"],
                 glob["forgetting"], " ".join(f"site{s}={v['top1']:.2f}" for s, v in sites.items()))
        return MetricRecord(glob | {"num-examples": int(n)})

    # ---- resume: everything the server carries from one round to the next ------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Strategy state as flat tensors + JSON metadata (class statistics, generators, forgetting)."""
        t = {f"stats/{site}/{k}": v for site, st in self.class_stats.items() for k, v in st.items()}
        if self.shared:
            t |= {f"shared/{k}": v for k, v in R.flatten(self.shared).items()}
        else:
            t |= {f"gen/{site}/{k}": v for site, g in self.generators.items() for k, v in R.flatten(g).items()}
        if self.stats_generator is not None:
            t |= {f"server_gen/{k}": v for k, v in self.stats_generator.state_dict().items()}
        return t, {"best_acc": {str(c): a for c, a in self.best_acc.items()}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of `state_tensors`."""
        stats, gens, shared = {}, {}, {}
        own = {k[11:]: v for k, v in tensors.items() if k.startswith("server_gen/")}
        if self.stats_generator is not None and own:
            self.stats_generator.load_state_dict(own)
        for name, v in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "server_gen":
                continue
            if kind == "shared":
                shared[rest] = v
            else:
                site, _, key = rest.partition("/")
                (stats if kind == "stats" else gens).setdefault(int(site), {})[key] = v
        self.class_stats = stats
        self.shared = R.unflatten(shared)
        self.generators = ({site: self.shared for site in stats} if self.shared
                           else {site: R.unflatten(g) for site, g in gens.items()})
        self.best_acc = {int(c): a for c, a in meta.get("best_acc", {}).items()}
