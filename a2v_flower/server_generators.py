"""The server's side of generators: what sites tell it (class statistics, generator states), shared generators
(averaged or handed site to site), synthetic samples for augmentation, and server training of the global
adapters on them (kd, refinement, the server's own generator). The strategy calls it; it never sees data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from a2v_flower.generator_schema import Replay, ServerGeneratorSpec
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.models.generators import GeneratorSpec, ReplaySpec, build_generator, key_for, sample_classes
from a2v_flower.models.generators.from_statistics import StatsGenerator, train_and_sample
from a2v_flower.models.generators.gaussian import pool_states
from a2v_flower.records import flatten, from_record, to_record, unflatten
from a2v_flower.training import TrainSpec, predict, train_adapters

log = logging.getLogger(__name__)


HANDED_ON = ("config", "targets", "run-config", "input_norm")  # a train message's records the sequential pass repeats


class ServerGenerators:
    """Per-site class statistics and generators, shared states, and the server's own generator."""

    def __init__(self, *, classes: list[str], class_targets: dict[str, torch.Tensor], token_shape: tuple[int, int],
                 make_adapters: Callable[[], AdapterSet], train_spec: TrainSpec, options: Replay, seed: int,
                 replay: ReplaySpec | None, server_gen: ServerGeneratorSpec | None, kd: bool,
                 device: torch.device | str = "cpu"):
        self.classes, self.class_targets, self.token_shape, self.kd, self.seed = classes, class_targets, token_shape, kd, seed
        self.make_adapters, self.train_spec, self.options, self.replay = make_adapters, train_spec, options, replay
        self.device = torch.device(device)  # device.server: generators, server generator, kd and refinement
        self.server_gen = server_gen if server_gen is not None and server_gen.epochs else None
        self.stats_generator = StatsGenerator(token_shape, self.server_gen).to(device) if self.server_gen else None
        self.class_stats: dict[int, dict[str, torch.Tensor]] = {}            # site -> last per-class statistics
        self.generators: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # site -> key -> weights
        self.shared: dict[str, dict[str, torch.Tensor]] = {}                 # sharing: key -> the one state

    @property
    def wants_teachers(self) -> bool:
        """Server training needs the sites' own adapters of this round (kd or the server generator)."""
        return self.kd or self.server_gen is not None

    def receive(self, site: int, content: RecordDict) -> dict:
        """Keep a site's class statistics and generators aside (removed from the reply FedAvg averages); returns
        its generators' figures per key (loss components, sample statistics) for its metrics row."""
        self.class_stats[site] = from_record(content["class_stats"])
        del content["class_stats"]
        if "generators" in content:
            self.generators[site] = unflatten(from_record(content["generators"]))
            del content["generators"]
        report = content.pop("generator_report", None)
        return {"generators": unflatten(dict(report))} if report is not None else {}

    def owners(self, seen: bool = False) -> dict[int, list[int]]:
        """Class index -> sites that trained it this round (adapter teachers), or with `seen` in any round."""
        out: dict[int, list[int]] = {}
        for site, stats in sorted(self.class_stats.items()):
            for c in torch.nonzero(stats["seen" if seen and "seen" in stats else "counts"]).flatten().tolist():
                out.setdefault(c, []).append(site)
        return out

    def synthetic(self, per_class: int, wanted: list[int] | None = None, seed: int = 0):
        """Samples of the sites' generators: (x (N, K, D), y (N,))."""
        r = self.replay
        return synthesize(self.generators, self.owners(seen=True), self.classes, r.granularity, r.groups,
                          r.generator, self.token_shape, self.class_targets, per_class, wanted, seed, self.device)

    def outgoing(self, site: int | None, server_round: int) -> dict[str, ArrayRecord]:
        """Records for a site's train message: the shared generators, and (augmentation) samples of the
        classes some site's generators cover but this site has no clips of this round."""
        out = {"shared_generators": to_record(flatten(self.shared))} if self.shared else {}
        n = self.options.synthetic_samples_per_class if self.replay else 0
        if n and self.generators and site in self.class_stats:
            now = set(torch.nonzero(self.class_stats[site]["counts"]).flatten().tolist())
            lacking = [c for c in self.owners(seen=True) if c not in now]
            x, y = self.synthetic(n, lacking, seed=self.seed + 31 * server_round + site)
            if len(y):
                out["synthetic"] = to_record({"x": x, "y": y})
        return out

    def train_sequentially(self, server_round: int, messages: list[Message], site_of: Callable[[int], int],
                           grid: Grid, timeout: float, on_failure: Callable[[list[Message], list[Message]], None]
                           ) -> None:
        """sharing=sequential: hand the one shared state per key to the sites one after another (by site id);
        each trains it on its data and returns it. Weights, AdamW moments and step counts pass on intact."""
        for msg in sorted(messages, key=lambda m: site_of(m.metadata.dst_node_id)):
            content = RecordDict({k: msg.content[k] for k in HANDED_ON if k in msg.content})
            if self.shared:
                content["shared_generators"] = to_record(flatten(self.shared))
            out = Message(content=content, message_type="train.generators", dst_node_id=msg.metadata.dst_node_id)
            reply = next(iter(grid.send_and_receive([out], timeout=timeout)), None)
            if reply is None or reply.has_error():
                on_failure([reply] if reply is not None else [], [out])  # named, and counted against min_sites
                continue
            trained = unflatten(from_record(reply.content["generators"]))
            self.shared = {**self.shared, **trained}
            log.info("round %s: site %s trained shared generators %s", server_round,
                     reply.content["metrics"]["site"], sorted(trained))

    def after_aggregation(self, server_round: int, arrays: ArrayRecord | None, teachers: dict
                          ) -> tuple[ArrayRecord | None, dict]:
        """End of a round's training: share generators, then train the global adapters on synthetic samples."""
        if self.replay and self.replay.sharing == "averaged" and self.generators:
            self.shared = average_by_key(self.generators, self.class_stats, self.owners(),
                                         pooled=self.replay.generator.type == "gaussian")
        if self.replay and self.replay.shared:
            self.generators = {site: self.shared for site in self.class_stats}  # the same objects, not copies
        # generator-only: adapters came back untouched; with refine_epochs the server alone trains them (one-shot)
        if arrays is None or (self.replay is not None and self.replay.only and not self.options.refine_epochs):
            return arrays, {}
        return self.server_training(server_round, arrays, teachers)

    def server_training(self, server_round: int, arrays: ArrayRecord, teachers: dict) -> tuple[ArrayRecord, dict]:
        """Train the server's own generator (if on), then kd distillation and/or refinement of the global
        adapters with the synthetic samples of the sites' generators and the server's."""
        r, sg, opts = self.replay, self.server_gen, self.options
        site_samples = r is not None and bool(self.generators)
        if not (site_samples or sg) or not (self.kd or opts.refine_epochs):
            return arrays, {}
        glob, models = self.make_adapters().to(self.device), {s: self.make_adapters().to(self.device) for s in teachers}
        glob.load_state_dict(arrays.to_torch_state_dict())
        for site, state in teachers.items():
            models[site].load_state_dict(state)
        out: dict = {}
        x, y = (self.synthetic(opts.samples_per_class, seed=self.seed + server_round) if site_samples else
                (torch.empty(0, *self.token_shape), torch.empty(0, dtype=torch.long)))
        if sg:
            sx, sy, out = train_and_sample(self.stats_generator, sg, opts.samples_per_class, models, self.class_stats,
                                           self.class_targets, self.classes, self.seed + server_round,
                                           self.seed + 7 * server_round)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
        out["server/synthetic_samples"] = len(y)
        if self.kd and len(y):
            spec = replace(self.train_spec, local_epochs=opts.kd_epochs)
            out["server/kd_loss"] = distill(glob, models, self.owners(), x, y, self.class_targets, spec, self.seed)
            log.info("Distillation completed. Average loss: %.4f", out["server/kd_loss"])
        if opts.refine_epochs:
            present, means = class_audio_means(self.class_stats, len(self.classes))
            xs, ys = torch.cat([x, means]), torch.cat([y, torch.tensor(present, dtype=torch.long)])
            spec = replace(self.train_spec, local_epochs=opts.refine_epochs)
            out["server/adapter_finetuning_loss"] = refine(glob, xs, ys, self.class_targets, spec, self.seed)
            log.info("Adapter fine-tuning completed. Average loss: %.4f", out["server/adapter_finetuning_loss"])
        log.info("round %s: server training %s", server_round,
                 {k: round(v, 4) for k, v in out.items() if isinstance(v, float)})
        return ArrayRecord(glob.cpu().state_dict()), out

    # ---- resume: everything carried from one round to the next ------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Class statistics, generators (or shared states) and the server generator as flat tensors."""
        t = {f"stats/{site}/{k}": v for site, st in self.class_stats.items() for k, v in st.items()}
        if self.shared:
            t |= {f"shared/{k}": v for k, v in flatten(self.shared).items()}
        else:
            t |= {f"gen/{site}/{k}": v for site, g in self.generators.items() for k, v in flatten(g).items()}
        if self.stats_generator is not None:
            t |= {f"server_gen/{k}": v.cpu() for k, v in self.stats_generator.state_dict().items()}
        return t

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`."""
        parts: dict[str, dict] = {}
        for name, v in tensors.items():
            kind, _, rest = name.partition("/")
            parts.setdefault(kind, {})[rest] = v
        if self.stats_generator is not None and parts.get("server_gen"):
            self.stats_generator.load_state_dict(parts["server_gen"])
        self.class_stats = {int(s): st for s, st in unflatten(parts.get("stats", {})).items()}
        self.shared = unflatten(parts.get("shared", {}))
        self.generators = ({site: self.shared for site in self.class_stats} if self.shared else
                           {int(s): unflatten(g) for s, g in unflatten(parts.get("gen", {})).items()})


def average_by_key(generators: dict[int, dict[str, dict]], class_stats: dict, owners: dict[int, list[int]],
                   pooled: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """sharing=averaged: one state per key, the mean over the sites that trained it (weights and AdamW
    moments), weighted by their clips of the key's classes this round; gaussian states are pooled instead
    (`pooled`: sufficient statistics, see `pool_states`). Memory: one state per key."""
    keys: dict[str, list[int]] = {}
    for site, gens in generators.items():
        for key in gens:
            keys.setdefault(key, []).append(site)
    shared = {}
    for key, sites in keys.items():
        weight = [float(sum(class_stats[s]["counts"][c] for c in owners if s in owners[c])) or 1.0 for s in sites]
        states = [generators[s][key] for s in sites]
        shared[key] = pool_states(states) if pooled else average_states(states, weight)
    return shared


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of generator states, optimizer moments included (keys present in all of them)."""
    keys = set.intersection(*(set(s) for s in states)) | ({"seen"} if all("seen" in s for s in states) else set())
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    out = {}
    for k in keys:
        if k == "seen":  # classes any of the averaged states was trained on
            out[k] = torch.unique(torch.cat([s[k] for s in states]))
        elif k == "rng" or not states[0][k].is_floating_point():
            out[k] = states[0][k].clone()   # RNG state, step counters: taken from the first site
        else:
            out[k] = sum(wi * s[k].double() for wi, s in zip(w, states)).to(states[0][k].dtype)
    return out


def synthesize(site_states: dict[int, dict[str, dict[str, torch.Tensor]]], owners: dict[int, list[int]],
               classes: list[str], granularity: str, groups: dict | None, spec: GeneratorSpec,
               token_shape: tuple[int, int], class_targets: dict[str, torch.Tensor], per_class: int,
               wanted: list[int] | None = None, seed: int = 0, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of every wanted class, split over the generators of the sites owning it, drawn on
    `device` (the noise from one seeded CPU generator) and returned on the CPU."""
    rng = torch.Generator().manual_seed(seed)
    xs, ys, cache = [], [], {}
    for c in (wanted if wanted is not None else sorted(owners)):
        sites = [s for s in owners.get(c, []) if key_for(granularity, classes[c], groups) in site_states.get(s, {})]
        for j, site in enumerate(sites):
            n = per_class // len(sites) + (j < per_class % len(sites))
            key = key_for(granularity, classes[c], groups)
            if (site, key) not in cache:
                gen = build_generator(spec, token_shape, device=device)
                gen.load_state_tensors(site_states[site][key])
                cache[site, key] = gen.eval()
            with torch.no_grad():
                xs.append(sample_classes(cache[site, key], class_targets, torch.full((n,), c), generator=rng).cpu())
            ys.append(torch.full((n,), c))
    if not xs:
        return torch.empty(0, *token_shape), torch.empty(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


def distill(global_adapters: AdapterSet, teachers: dict[int, AdapterSet], owners: dict[int, list[int]],
            x: torch.Tensor, y: torch.Tensor, class_targets: dict[str, torch.Tensor], spec: TrainSpec,
            seed: int = 0) -> float:
    """Fit the global adapters to the mean output, on (x, y), of the teachers that own each sample's class
    (spec.loss: MSE to that output and/or cross-entropy to its softmax over the class targets)."""
    keep = torch.tensor([any(s in teachers for s in owners.get(int(c), [])) for c in y], dtype=torch.bool)
    x, y = x[keep], y[keep]  # classes whose owners all failed this round have no teacher
    if not len(y):
        return float("nan")
    outs = {s: predict(t, x) for s, t in teachers.items()}
    target = {h: torch.empty_like(next(iter(outs.values()))[h]) for h in global_adapters}
    for c in y.unique().tolist():  # every sample of class c: the mean of its owners' outputs
        rows, sites = y == c, [s for s in owners.get(c, []) if s in outs]
        for h, t in target.items():
            t[rows] = torch.stack([outs[s][h][rows] for s in sites]).mean(0)
    return train_adapters(global_adapters, x, y, class_targets, spec, seed, teacher=target)


def refine(global_adapters: AdapterSet, x: torch.Tensor, y: torch.Tensor, class_targets: dict[str, torch.Tensor],
           spec: TrainSpec, seed: int = 0) -> float:
    """global_model_train: fit the global adapters toward the class targets on (synthetic + real-mean) samples."""
    return train_adapters(global_adapters, x, y, class_targets, spec, seed)


def class_audio_means(class_stats: dict, num_classes: int) -> tuple[list[int], torch.Tensor]:
    """Count-weighted mean audio embedding per class over all sites' statistics: (classes, (C', K, D))."""
    sums, counts = {}, torch.zeros(num_classes)
    for stats in class_stats.values():
        n = stats["counts"]
        for c in torch.nonzero(n).flatten().tolist():
            sums[c] = sums.get(c, 0) + n[c] * stats[f"audio_mean/{c}"]
            counts[c] += n[c]
    present = sorted(sums)
    return present, torch.stack([sums[c] / counts[c] for c in present]) if present else torch.empty(0)
