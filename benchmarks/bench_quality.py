"""Learning-quality benchmark: every method on the same test clips, with 95 % intervals and paired tests.

    python benchmarks/bench_quality.py                       # every scenario, 3 seeds (hours on 2 cores)
    python benchmarks/bench_quality.py --quick               # smoke size (under 2 minutes)
    python benchmarks/bench_quality.py --scenario non-IID --only kd   # a subset
    python benchmarks/bench_quality.py data=esc50 data.root=/data/ESC-50 model=pretrained   # real data
    python benchmarks/bench_quality.py --scenario non-IID data=esc50 data.root=outputs/real data.clip_seconds=0.5 \
        --label-skew "partition=classes partition.sites=[[dog,cow],[owl]]"   # classes not in ESC-50 groups

Protocol (the same for every row):
- Sites: 5, one ESC-50 semantic group each (--label-skew: other class sets; the Dirichlet scenario: 50 sites,
  Dirichlet(0.1) over classes, FedPFT's setting); sites are simulated in one
  process with the functions the Flower apps call (`load_site`, `train_adapters`, the replay and
  server-generator functions, FedAvg's example-weighted mean), so a row's number is what its Flower run
  gives, minus transport.
- Budget: every method trains `--rounds` rounds of `train.local_epochs` local epochs. Centralised (one
  site holding every training clip) trains rounds x (local epochs + replay.kd_epochs) epochs, the most any
  server-side method adds, and its "train fit" column shows whether that budget fits its training set.
- Scoring: the final adapters of every method on the same test clips (all sites' test splits pooled), by
  retrieval among all classes. Local only: each site's adapters on every test clip (mean over sites); its
  "within site" column scores each site's adapters on its own test clips only.
- Seeds vary the split of every site's clips into train/val/test, the initial adapters, batch order and
  generator sampling; the synthetic dataset itself stays the same.
- Intervals: 95 % bootstrap over (seed, clip) units; "vs" columns are paired bootstrap differences on the
  same clips, with a two-sided p-value. Forgetting (class-incremental) comes from the val split: per class
  that no site trains in the last stage, its best val accuracy over the rounds minus its final one.
- quality.csv gets one row per scenario x method x seed as soon as it finishes; a rerun with the same
  settings skips the rows already there. quality.md is rebuilt from the CSV at the end.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from a2v_flower import config as C
from a2v_flower import server_generators as R
from a2v_flower import site_generators as SR
from a2v_flower.models.generators.from_statistics import (StatsGenerator, sample_server_generator,
                                                 train_server_generator)
from a2v_flower.cache import TensorCache
from a2v_flower.data.site import SiteData, federation, load_site
from a2v_flower.metrics import similarity
from a2v_flower.models.adapters import build_adapters, embedding_moments, input_norm
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
from a2v_flower.models.generators import GeneratorSpec, build_generator
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.training import TrainSpec, class_means, predict, train_adapters

SITES = ["federation.num_sites=5", "generator=cvae"]  # generator: the configured size of every neural generator
GROUPS = ("partition=groups", "partition.sites=[[animals],[natural],[human],[domestic],[urban]]")  # label skew
IID = ("partition=iid",)  # every site holds every class (class-incremental: forgetting without label skew)
# 100 clips per class: 20 per class held out for test (200 test clips), 10 for val, 70 to train.
DEFAULT_SIZE = ["data.clips_per_class=100", "adapter.width=128", "train.local_epochs=4", "train.batch_size=32",
                "generator.epochs=10",
                "replay.synthetic_samples_per_class=32"]
# Smoke size: 50 clips per class of 1 s (IID over 5 sites: 2 test clips per class and site), small adapters.
QUICK_SIZE = [*DEFAULT_SIZE, "data.clips_per_class=50", "data.seconds=1.0", "data.clip_seconds=1.0",
              "model.audio.max_length=128", "adapter.width=64", "train.local_epochs=1", "generator.epochs=2"]
HARD = ("data.noise=1.5", "data.overlap=0.85")  # raised until centralised stays below 0.9 (see BENCHMARKS.md)
REFINE_EPOCHS = 3                              # server epochs of the refinement rows (replay.refine_epochs)
DP_EPSILONS = (10.0, 100.0)  # the two privacy levels measured (delta 1e-5, clip sqrt(K*D))
ONE_SHOT = (300, 40)  # one-shot rows: server samples per class, server epochs (conf/experiment/one_shot.yaml)


@dataclass(frozen=True)
class Method:
    """One row of a table: how sites and server behave."""

    name: str
    kind: str = "fedavg"              # fedavg | local (no aggregation) | central (one site, all data) | probe
    train: tuple = ()                 # TrainSpec overrides, ((key, value), ...)
    generator: str | None = None      # site generators: gaussian | vae | cvae | gan
    granularity: str = "unified"
    kd: bool = False                  # strategy=kd
    refine: bool = False              # replay.refine_epochs > 0
    augment: bool = False             # replay.synthetic_samples_per_class: samples of every class a site lacks
    server_gen: bool = False          # server_generator.epochs > 0 (no site generators)
    equal_bytes: bool = False         # neural generator shrunk to the gaussian's bytes
    reset: bool = True                # reset=on_class_change
    joint: bool = False               # class-incremental scenario: every class from round 1
    covariance: str = "diag"          # gaussian generators: diag | lowrank | full (generator.covariance)
    one_shot: bool = False            # sites send class models once; the server trains fresh adapters on samples
    dp_epsilon: float | None = None   # gaussian generators: the DP release of each class (generator.dp_epsilon)


@dataclass(frozen=True)
class Scenario:
    """Partition, data difficulty, and whether sites meet their classes in two stages."""

    name: str
    overrides: tuple[str, ...] = ()   # partition and data difficulty
    incremental: bool = False
    reference: str = "centralised"    # the row every other row is compared with
    quick: bool = True                # in --quick runs of every scenario (else only when --scenario names it)


DIRICHLET = ("partition=dirichlet", "partition.alpha=0.1", "federation.num_sites=50")  # FedPFT's label skew
SCENARIOS = [Scenario("non-IID", GROUPS), Scenario("non-IID, hard data", GROUPS + HARD),
             Scenario("class-incremental, hard data", IID + HARD, incremental=True, reference="FedAvg"),
             Scenario("Dirichlet 0.1, 50 sites", DIRICHLET, quick=False)]  # 50 sites: too few clips a site at smoke size


def select(name: str, skew: tuple[str, ...] = (), quick: bool = False) -> list[Scenario]:
    """The scenario called `name` (else those whose names contain it; with `quick` and no name, those marked for
    smoke runs); `skew` replaces the ESC-50 groups partition."""
    scenarios = [replace(s, overrides=skew + s.overrides[len(GROUPS):]) if skew and s.overrides[:len(GROUPS)] == GROUPS
                 else s for s in SCENARIOS]
    if quick and not name:
        return [s for s in scenarios if s.quick]
    return [s for s in scenarios if s.name == name] or [s for s in scenarios if name in s.name]


def methods(scenario: Scenario, quick: bool) -> list[Method]:
    """Rows of a scenario, in table order; --quick keeps one of each kind."""
    if scenario.incremental:
        replays = [("gaussian", "per_class", True), ("gaussian", "unified", False), ("cvae", "unified", False)] if quick \
            else [("gaussian", "per_class", True), ("gaussian", "unified", False), ("vae", "per_class", True),
                  ("cvae", "per_class", True), ("cvae", "unified", True), ("cvae", "unified", False),
                  ("gan", "unified", False)]
        rows = [Method("FedAvg"), Method("joint (all classes from round 1)", joint=True)]
        rows += [Method(f"+ replay ({g}, {gr}{'' if reset else ', reset=off'})", generator=g, granularity=gr,
                        augment=True, reset=reset) for g, gr, reset in replays]
        rows = with_equal_bytes(rows, skip=("cvae", "unified", True))  # reset: nothing old left to replay
        if not quick:
            rows += [Method("+ kd (gaussian, per_class)", generator="gaussian", granularity="per_class", kd=True),
                     Method("+ refinement (gaussian, per_class)", generator="gaussian", granularity="per_class",
                            refine=True)]
            rows += [Method(f"+ replay + refinement ({g}, per_class)", generator=g, granularity="per_class",
                            augment=True, refine=True) for g in ("gaussian", "cvae")]
            rows += [Method("+ refinement (gaussian, per_class, lowrank)", generator="gaussian",
                            granularity="per_class", refine=True, covariance="lowrank"),
                     Method("+ replay + refinement (gaussian, per_class, lowrank)", generator="gaussian",
                            granularity="per_class", augment=True, refine=True, covariance="lowrank")]
            rows += [Method("+ kd (server generator)", kd=True, server_gen=True)]
        return rows
    rows = [Method("linear probe (ceiling)", kind="probe"), Method("centralised", kind="central"),
            Method("local only", kind="local"), Method("FedAvg"), Method("FedAvg, MSE loss", train=(("loss", "mse"),)),
            Method("+ kd (gaussian)", generator="gaussian", kd=True)]
    if "hard" in scenario.name:
        rows = [m for m in rows if m.name != "FedAvg, MSE loss"]
    if quick:
        return rows
    rows += [Method("+ kd (gaussian) + restricted softmax (0.5)", generator="gaussian", kd=True,
                    train=(("absent_scale", 0.5),)),
             Method("+ refinement (gaussian)", generator="gaussian", refine=True),
             Method("+ kd (server generator)", kd=True, server_gen=True)]
    rows += [Method(f"+ {kind} (gaussian, {cov})", generator="gaussian", kd=kind == "kd", refine=kind != "kd",
                    covariance=cov) for kind in ("kd", "refinement") for cov in ("lowrank", "full")]
    rows += [Method(f"one-shot (gaussian, {cov})", generator="gaussian", one_shot=True, covariance=cov)
             for cov in ("diag", "lowrank", "full")]
    rows += [Method(f"one-shot (gaussian, lowrank, DP epsilon {eps:g})", generator="gaussian", one_shot=True,
                    covariance="lowrank", dp_epsilon=eps) for eps in DP_EPSILONS]
    if "hard" not in scenario.name:  # levers that do not help on the default data are not repeated on hard data
        rows += [Method("+ proximal (mu 0.001)", train=(("proximal_mu", 0.001),)),
                 Method("+ restricted softmax (0.5)", train=(("absent_scale", 0.5),))]
    return rows


def with_equal_bytes(rows: list[Method], skip: tuple = ()) -> list[Method]:
    """After each neural-generator method (but `skip` = (generator, granularity, reset)), the same method with
    its generator at the gaussian's bytes."""
    out = []
    for m in rows:
        out.append(m)
        if m.generator not in (None, "gaussian") and (m.generator, m.granularity, m.reset) != skip:
            out.append(replace(m, name=f"{m.name} at gaussian bytes", equal_bytes=True))
    return out


# ---- generator sizes ----------------------------------------------------------------------------

def nbytes(tensors) -> int:
    """Bytes of tensors as they travel."""
    return sum(v.numel() * v.element_size() for v in tensors)


def generator_bytes(spec: GeneratorSpec, token_shape: tuple[int, int]) -> int:
    """Bytes of the weights of one generator of `spec` (a neural generator's size does not depend on its data)."""
    return nbytes(SR.weights_only(build_generator(spec, token_shape).state_tensors()).values())


def gaussian_bytes_per_key(sites: list[SiteData], granularity: str, gspec: GeneratorSpec, targets) -> float:
    """Mean bytes of one gaussian generator's weights (one key), fitted on all of a site's training classes."""
    classes, sizes = sites[0].classes, []
    for site in sites:
        x, y = site.splits["train"]
        states, _ = SR.train_site_generators({}, set(), x, y, classes, granularity, C.default_groups(classes),
                                            replace(gspec, type="gaussian"), targets, True)
        sizes += [nbytes(SR.weights_only(s).values()) for s in states.values()]
    return float(np.mean(sizes))


def equal_bytes_spec(spec: GeneratorSpec, budget: float, token_shape: tuple[int, int]) -> GeneratorSpec:
    """`spec` with the largest hidden (latent_dim = min(spec.latent_dim, hidden)) whose weights fit in `budget`."""
    best = replace(spec, hidden=1, latent_dim=1)
    for hidden in range(1, spec.hidden + 1):
        candidate = replace(spec, hidden=hidden, latent_dim=min(spec.latent_dim, hidden))
        if generator_bytes(candidate, token_shape) > budget:
            break  # bytes grow with hidden
        best = candidate
    return best


# ---- one run: a method, a scenario, a seed --------------------------------------------------------

def on_wire(state: dict, wire: str, back: bool = True) -> dict:
    """A state dict cast to the adapter.wire dtype (and back to float32 with `back`)."""
    out = {k: v.to(getattr(torch, wire)) for k, v in state.items()}
    return {k: v.float() for k, v in out.items()} if back else out


def average(states: list[dict], weights: list[float]) -> dict:
    """Weighted mean of state dicts (what FedAvg's aggregate_arrayrecords computes)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return {k: sum(wi * s[k].double() for wi, s in zip(w, states)).float() for k in states[0]}


def stage(site: SiteData, rnd: int, rounds: int, incremental: bool) -> list[int]:
    """Classes a site trains on in a round: all, or its first half then the rest (class-incremental)."""
    present = site.present
    if not incremental or len(present) < 2:
        return present
    half = (len(present) + 1) // 2
    return present[:half] if rnd <= rounds // 2 else present[half:]


def owners_of(stats: dict, key: str) -> dict[int, list[int]]:
    """Class -> sites whose statistics mark it under `key` ("counts": trained this round, "seen": ever)."""
    out: dict[int, list[int]] = {}
    for site, st in sorted(stats.items()):
        for c in torch.nonzero(st[key]).flatten().tolist():
            out.setdefault(c, []).append(site)
    return out


def hits(adapters, x: torch.Tensor, y: torch.Tensor, targets) -> torch.Tensor:
    """(N,) 1.0 where retrieval among all classes ranks the clip's own class first; ValueError unless every
    similarity behind it is finite."""
    if not len(y):
        return torch.empty(0)
    scores = similarity(predict(adapters, x), targets)
    if not torch.isfinite(scores).all():  # a NaN weight or input would score as a plausible number: refuse it
        raise ValueError("adapters or inputs hold NaN or Inf: this row's figure would not be trusted")
    return (scores.argmax(1) == y).float()


def per_class(correct: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """Accuracy per class (nan where a class has no clips)."""
    return np.array([correct[y == c].mean().item() if (y == c).any() else np.nan for c in range(num_classes)])


def pooled(sites: list[SiteData], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every site's clips of a split, concatenated in site order."""
    return torch.cat([s.splits[split][0] for s in sites]), torch.cat([s.splits[split][1] for s in sites])


def linear_probe(sites: list[SiteData], seed: int) -> dict:
    """Logistic regression on the flattened embeddings (weight decay chosen on val): the ceiling of any adapter."""
    (x, y), (xv, yv), (xt, yt) = (pooled(sites, s) for s in ("train", "val", "test"))
    mean, std = x.flatten(1).mean(0), x.flatten(1).std(0) + 1e-6
    feats = [(a.flatten(1) - mean) / std for a in (x, xv, xt)]
    best = None
    for wd in (1e-4, 1e-3, 1e-2, 1e-1):
        torch.manual_seed(seed)
        model = torch.nn.Linear(feats[0].shape[1], len(sites[0].classes))
        opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(feats[0]), y) + wd * model.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val = (model(feats[1]).argmax(1) == yv).float().mean().item()
            if best is None or val > best[0]:
                best = (val, (model(feats[2]).argmax(1) == yt).float(), (model(feats[0]).argmax(1) == y).float())
    return {"correct": best[1], "train_fit": best[2].mean().item()}


def run(m: Method, sc: Scenario, sites: list[SiteData], targets, make, spec: TrainSpec, gspec: GeneratorSpec | None,
        rounds: int, seed: int, samples: tuple[int, int], kd_epochs: int, refine_epochs: int,
        wire: str = "float32") -> dict:
    """Rounds of one method; the final adapters scored on the pooled test clips, forgetting from val.

    `samples` = (server samples per class for kd/refinement, samples per lacking class sent to a site).
    """
    if m.kind == "probe":
        return linear_probe(sites, seed)
    torch.manual_seed(seed)
    spec = replace(spec, **dict(m.train))
    classes, token_shape = sites[0].classes, tuple(sites[0].splits["train"][0].shape[1:])
    if m.one_shot:
        return one_shot(m, sc, sites, targets, make, spec, gspec, seed)
    incremental = sc.incremental and not m.joint
    if m.kind == "central":
        train = pooled(sites, "train")
        sites_run = [SiteData(classes, {"train": train})]
        spec = replace(spec, local_epochs=spec.local_epochs + kd_epochs)  # the server epochs kd adds
    else:
        sites_run = sites
    global_ad = make(seed)
    locals_ = [copy.deepcopy(global_ad) for _ in sites_run]
    gens: dict[int, dict] = {i: {} for i in range(len(sites_run))}
    seen: dict[int, set] = {i: set() for i in range(len(sites_run))}
    stats: dict[int, dict] = {}
    sg_spec = C.spec("server_generator", epochs=20, batch_per_class=8)
    server_gen = StatsGenerator(token_shape, sg_spec) if m.server_gen else None
    xv, yv = pooled(sites, "val")
    val_history, up, down, gen_up = [], 0, 0, 0
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        pool = None  # what the server sends each site: samples of every class some site's generators cover
        if m.augment and stats:
            covered = owners_of(stats, "seen")
            w = {i: {k: SR.weights_only(v) for k, v in g.items()} for i, g in gens.items()}
            pool = R.synthesize(w, covered, classes, m.granularity, C.default_groups(classes), gspec, token_shape,
                                targets, samples[1], seed=seed + 31 * rnd)
        states, weights = [], []
        for i, site in enumerate(sites_run):
            x, y = site.splits["train"]
            keep = torch.isin(y, torch.tensor(stage(site, rnd, rounds, incremental)))
            x, y = x[keep], y[keep]
            if m.generator:
                gens[i], _ = SR.train_site_generators(gens[i], seen[i], x, y, classes, m.granularity,
                                                     C.default_groups(classes), replace(gspec, seed=seed), targets,
                                                     m.reset)
            seen[i] |= set(y.unique().tolist())
            xa, ya = x, y
            if pool is not None:  # the samples of classes this site lacks this round
                take = ~torch.isin(pool[1], y.unique())
                xa, ya = torch.cat([x, pool[0][take]]), torch.cat([y, pool[1][take]])
                down += nbytes([pool[0][take], pool[1][take]])
            model = locals_[i] if m.kind == "local" else copy.deepcopy(global_ad)
            if m.kind != "local":  # adapter.wire: what the site receives, as it travels
                model.load_state_dict(on_wire(global_ad.state_dict(), wire))
            train_adapters(model, xa, ya, targets, spec, seed=seed + 7919 * rnd + i)
            locals_[i] = model
            states.append(on_wire(model.state_dict(), wire, back=False))
            weights.append(len(ya))
            stats[i] = site_stats(x, y, seen[i], len(classes))
            if m.server_gen:  # the per-class adapter outputs only the server generator needs
                stats[i] |= {f"out/{k}": v for k, v in class_means(predict(model, x), y).items()}
            sent = [v for g in gens[i].values() for v in SR.weights_only(g).values()]
            gen_up += nbytes(sent)
            up += nbytes(states[-1].values()) + nbytes(stats[i].values()) + nbytes(sent)
            down += nbytes(on_wire(global_ad.state_dict(), wire, back=False).values())
        if m.kind != "local":
            global_ad.load_state_dict(average(states, weights))  # in float64, as the server's float32 mean
        server_training(m, global_ad, locals_, stats, gens, server_gen, sg_spec, classes, gspec, token_shape, targets,
                        spec, samples[0], kd_epochs, refine_epochs, seed, rnd)
        val_models = locals_ if m.kind == "local" else [global_ad]
        val_history.append(np.mean([per_class(hits(a, xv, yv, targets), yv, len(classes)) for a in val_models], 0))
    return finish(m, sc, sites, sites_run, global_ad, locals_, targets, rounds, val_history,
                  {"up": up, "down": down, "gen": gen_up, "seconds": time.perf_counter() - t0})


def site_stats(x: torch.Tensor, y: torch.Tensor, seen: set, num_classes: int) -> dict:
    """The class statistics a site's reply carries: counts, classes seen, per-class audio mean and variance."""
    return {"counts": torch.bincount(y, minlength=num_classes).float(),
            "seen": torch.isin(torch.arange(num_classes), torch.tensor(sorted(seen))).float(),
            **{f"audio_mean/{c}": x[y == c].mean(0) for c in y.unique().tolist()},
            **{f"audio_var/{c}": x[y == c].var(0, unbiased=False) for c in y.unique().tolist()}}


def one_shot(m: Method, sc: Scenario, sites: list[SiteData], targets, make, spec: TrainSpec, gspec: GeneratorSpec,
             seed: int) -> dict:
    """FedPFT's setting (`+experiment=one_shot`): every site fits its class models once and sends them with its
    class statistics; the server trains fresh global adapters on ONE_SHOT[0] samples per class (and the class
    means) toward the class targets for ONE_SHOT[1] epochs. No adapter leaves a site, no FedAvg."""
    classes, token_shape = sites[0].classes, tuple(sites[0].splits["train"][0].shape[1:])
    t0, gens, stats, up = time.perf_counter(), {}, {}, 0
    for i, site in enumerate(sites):
        x, y = site.splits["train"]
        gens[i], _ = SR.train_site_generators({}, set(), x, y, classes, m.granularity, C.default_groups(classes),
                                             replace(gspec, seed=seed), targets, m.reset)
        stats[i] = site_stats(x, y, set(y.unique().tolist()), len(classes))
        gens[i] = {k: SR.weights_only(v) for k, v in gens[i].items()}
        up += nbytes(stats[i].values()) + nbytes(v for g in gens[i].values() for v in g.values())
    gen_up = up - sum(nbytes(st.values()) for st in stats.values())
    global_ad = make(seed)
    x, y = R.synthesize(gens, owners_of(stats, "seen"), classes, m.granularity, C.default_groups(classes), gspec,
                        token_shape, targets, ONE_SHOT[0], seed=seed + 1)
    present, means = R.class_audio_means(stats, len(classes))
    R.refine(global_ad, torch.cat([x, means]), torch.cat([y, torch.tensor(present)]), targets,
             replace(spec, local_epochs=ONE_SHOT[1]), seed)
    return finish(m, sc, sites, sites, global_ad, [global_ad], targets, 1, [],
                  {"up": up, "down": 0, "gen": gen_up, "seconds": time.perf_counter() - t0})


def server_training(m: Method, global_ad, locals_, stats, gens, server_gen, sg_spec, classes, gspec, token_shape,
                    targets, spec: TrainSpec, per_class: int, kd_epochs: int, refine_epochs: int, seed: int,
                    rnd: int) -> None:
    """What A2VStrategy.server_training does after averaging: the server generator, kd, refinement."""
    if not (m.kd or m.refine):
        return
    x, y = torch.empty(0, *token_shape), torch.empty(0, dtype=torch.long)
    if m.generator:
        w = {i: {k: SR.weights_only(v) for k, v in g.items()} for i, g in gens.items()}
        x, y = R.synthesize(w, owners_of(stats, "seen"), classes, m.granularity, C.default_groups(classes), gspec,
                            token_shape, targets, per_class, seed=seed + rnd)
    teachers = dict(enumerate(locals_))
    if server_gen is not None:
        train_server_generator(server_gen, teachers, stats, targets, sg_spec, seed + rnd)
        sx, sy = sample_server_generator(server_gen, stats, targets, per_class, seed + 7 * rnd)
        x, y = torch.cat([x, sx]), torch.cat([y, sy])
    if m.kd:
        R.distill(global_ad, teachers, owners_of(stats, "counts"), x, y, targets, replace(spec, local_epochs=kd_epochs), seed)
    if m.refine:
        present, means = R.class_audio_means(stats, len(classes))
        R.refine(global_ad, torch.cat([x, means]), torch.cat([y, torch.tensor(present)]), targets,
                 replace(spec, local_epochs=refine_epochs), seed)


def finish(m: Method, sc: Scenario, sites, sites_run, global_ad, locals_, targets, rounds: int, val_history: list,
           cost: dict) -> dict:
    """Per-clip test hits, train fit, within-site score, forgetting per old class, bytes and time."""
    xt, yt = pooled(sites, "test")
    if m.kind == "local":
        correct = torch.stack([hits(a, xt, yt, targets) for a in locals_]).mean(0)
        within = float(np.mean([hits(a, *s.splits["test"], targets).mean().item() for a, s in zip(locals_, sites)]))
        fit = float(np.mean([hits(a, *s.splits["train"], targets).mean().item() for a, s in zip(locals_, sites)]))
    else:
        correct, within = hits(global_ad, xt, yt, targets), float("nan")
        fit = hits(global_ad, *pooled(sites, "train"), targets).mean().item()
    forgetting = []
    if sc.incremental and not m.joint:
        final = {c for s in sites for c in stage(s, rounds, rounds, True)}
        old = [c for c in range(len(sites[0].classes)) if c not in final]
        history = np.stack(val_history)  # (rounds, classes) val accuracy
        forgetting = [float(history[:, c].max() - history[-1, c]) for c in old if not np.isnan(history[-1, c])]
    n = len(sites_run) * rounds
    return {"correct": correct, "train_fit": fit, "within_site": within, "forgetting": forgetting,
            "mb_up": cost["up"] / n / 1e6, "mb_down": cost["down"] / n / 1e6, "gen_kb": cost["gen"] / n / 1e3,
            "s_per_round": cost["seconds"] / rounds}


# ---- CSV, intervals, tables ------------------------------------------------------------------------

FIELDS = ["setup", "scenario", "method", "seed", "top1", "train_fit", "within_site", "mean_forgetting", "mb_up",
          "mb_down", "gen_kb", "s_per_round", "generator_size", "correct", "forgetting"]


def finished(path: Path, setup: str) -> dict[tuple[str, str, int], dict]:
    """Rows of quality.csv written with these settings, by (scenario, method, seed)."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {(r["scenario"], r["method"], int(r["seed"])): r for r in csv.DictReader(f) if r["setup"] == setup}


def append(path: Path, row: dict) -> None:
    """Append one row (header first if the file is new), flushed so a stopped run keeps it."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def bootstrap(values: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values` (resampling units with replacement)."""
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float, float, float]:
    """Mean of a - b on the same units, its 95 % interval and a two-sided paired-bootstrap p-value."""
    d = a - b
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), float(p)


def summarise(rows: list[dict], order: list[tuple[str, str]], references: dict[str, str]) -> list[dict]:
    """Per (scenario, method): pooled top-1 with its interval and the paired comparison with the reference row."""
    rng = np.random.default_rng(0)
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["scenario"], r["method"]), []).append(r)
    out = []
    for key in order:
        if key not in by:
            continue
        runs = sorted(by[key], key=lambda r: int(r["seed"]))
        seeds = [int(r["seed"]) for r in runs]
        correct = np.concatenate([np.array(r["correct"].split(), dtype=float) for r in runs])
        forget = np.array([float(v) for r in runs for v in r["forgetting"].split()])
        s = {"scenario": key[0], "method": key[1], "seeds": len(runs), "top1": correct.mean(),
             "ci": bootstrap(correct, rng), "units": len(correct),
             "forgetting": forget.mean() if len(forget) else float("nan"),
             "forgetting_ci": bootstrap(forget, rng) if len(forget) else (float("nan"),) * 2,
             **{k: float(np.mean([float(r[k]) for r in runs])) for k in ("train_fit", "within_site", "mb_up",
                                                                         "mb_down", "gen_kb", "s_per_round")},
             "generator_size": runs[0]["generator_size"], "vs": None}
        ref = by.get((key[0], references[key[0]]), [])
        ref = {int(r["seed"]): r for r in ref}
        if key[1] != references[key[0]] and all(sd in ref for sd in seeds):
            base = np.concatenate([np.array(ref[sd]["correct"].split(), dtype=float) for sd in seeds])
            s["vs"] = paired(correct, base, rng)
        out.append(s)
    return out


def markdown(summary: list[dict], scenarios: list[Scenario], header: str, chance: float = 0.1) -> str:
    """One table per scenario."""
    lines = [header]
    for sc in scenarios:
        ref, incremental = sc.reference, sc.incremental
        rows = [s for s in summary if s["scenario"] == sc.name]
        if not rows:
            continue
        lines += ["", f"**{sc.name}**: chance {chance:.3f}; seeds = data splits scored (each: the same test clips for "
                  "every row)", "",
                  f"| method | seeds | top-1 [95 % CI] | vs {ref}: diff [95 % CI], p | train fit | "
                  + ("forgetting (val) [95 % CI] | " if incremental else "within site | ")
                  + "generator kB up | MB up / down per site-round | s / round |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            vs = "reference" if s["method"] == ref else "-" if s["vs"] is None else \
                f"{s['vs'][0]:+.3f} [{s['vs'][1]:+.3f}, {s['vs'][2]:+.3f}], p={s['vs'][3]:.3f}"
            extra = (f"{s['forgetting']:.3f} [{s['forgetting_ci'][0]:.3f}, {s['forgetting_ci'][1]:.3f}]"
                     if not np.isnan(s["forgetting"]) else "-") if incremental else \
                ("-" if np.isnan(s["within_site"]) else f"{s['within_site']:.3f}")
            size = f" ({s['generator_size']})" if s["generator_size"] else ""
            cost = "- | - | -" if s["method"].startswith("linear probe") else \
                f"{s['gen_kb']:,.1f} | {s['mb_up']:.2f} / {s['mb_down']:.2f} | {s['s_per_round']:.1f}"
            lines.append(f"| {s['method']}{size} | {s['seeds']} ({s['units']} clips) | {s['top1']:.3f} "
                         f"[{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {vs} | "
                         f"{s['train_fit']:.3f} | {extra} | {cost} |")
    return "\n".join(lines) + "\n"


# ---- driver -----------------------------------------------------------------------------------------

def load(base: list[str], overrides: tuple[str, ...], seed: int, encoder: AudioEncoder) -> list[SiteData]:
    """The 5 sites of a scenario's data, split with `seed` (the synthetic clips themselves stay the same)."""
    scfg = C.absolute_paths(C.compose_config([*base, *overrides]), Path.cwd())
    data = replace(C.data_spec(scfg), seed=seed)
    return [load_site(data, C.partition_spec(scfg), encoder, i) for i in range(scfg.federation.num_sites)]


def load_splits(overrides: list[str], skew: tuple[str, ...], seeds, encoder_cls=AudioEncoder):
    """The config of the 5 sites' data with `overrides` and `skew`, and per seed (split) (seed, sites, class
    targets), clips embedded by `encoder_cls` (the bench_adapter_gap / bench_window experiments)."""
    base = [*SITES, *DEFAULT_SIZE, *overrides]
    cfg = C.absolute_paths(C.compose_config([*base, *skew]), Path.cwd())
    encoder, conf = encoder_cls(C.as_config(cfg).model.audio), C.as_config(cfg)
    out = []
    for seed in seeds:
        sites = load(base, skew, seed, encoder)
        targets = class_targets(sites[0].classes, conf.prompt_template, conf.diffusion.type, conf.model.text,
                                conf.diffusion.t5_seq_len, TensorCache(Path(conf.paths.cache_dir) / "targets"))
        out.append((seed, sites, targets))
    return cfg, out


def main() -> None:
    """Parse arguments, run every missing scenario x method x seed (appending to the CSV), write the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (data, model, train, ...)")
    ap.add_argument("--quick", action="store_true", help="smoke size: 1 seed, 2 rounds, small data, fewer methods")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="outputs/bench_quality")
    ap.add_argument("--scenario", default="", help="run only the scenario of this name (or whose names contain it)")
    ap.add_argument("--only", default="", help="run only methods whose name matches this regular expression "
                    "(re.search: plain text matches where it occurs), e.g. '^centralised$|^FedAvg$'")
    ap.add_argument("--label-skew", default="", help="overrides that replace the ESC-50 groups partition of the "
                    "non-IID scenarios, e.g. \"partition=classes partition.sites=[[a,b],[c]]\" (classes not ESC-50's)")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(1)  # the machine is shared; one thread per process scales best here
    seeds, rounds = (1, 2) if args.quick else (args.seeds, args.rounds)
    base = [*SITES, *(QUICK_SIZE if args.quick else DEFAULT_SIZE), *args.overrides]
    cfg = C.absolute_paths(C.compose_config(base), Path.cwd())
    C.validate(cfg)
    encoder = AudioEncoder(C.validate(cfg).model.audio)
    spec, rspec = C.validate(cfg).train, cfg.replay
    settings = [o for o in base if not o.startswith("paths.")]  # where caches live does not change a result
    skew = tuple(shlex.split(args.label_skew))
    setup = hashlib.sha1(json.dumps([settings, rounds, *([skew] if skew else [])]).encode()).hexdigest()[:10]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, done = out / "quality.csv", finished(out / "quality.csv", setup)
    scenarios = select(args.scenario, skew, args.quick)
    order = [(s.name, m.name) for s in scenarios for m in methods(s, args.quick)]
    references = {s.name: s.reference for s in scenarios}
    names = {m for _, m in order}
    t_start = time.perf_counter()
    for sc in scenarios:
        for seed in range(seeds):
            sites = None
            for m in methods(sc, args.quick):
                wanted = m.name == args.only if args.only in names else bool(re.search(args.only, m.name))  # exact
                if not wanted or (sc.name, m.name, seed) in done:  # name: that row alone; else a regular expression
                    continue
                sites = sites or load(base, sc.overrides, seed, encoder)
                classes = sites[0].classes
                targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.validate(cfg).model.text,
                                        cfg.diffusion.t5_seq_len, TensorCache(Path(cfg.paths.cache_dir) / "targets"))
                gspec = generator_spec(m, cfg, sites, targets)
                dim = encoder_dim(C.validate(cfg).model.audio)
                # adapter.normalise: the federation's moments of the sites' training embeddings, as the ServerApp
                # pools them before round 1
                norm = input_norm([embedding_moments(s.splits["train"][0]) for s in sites]) \
                    if cfg.adapter.normalise else None
                make = lambda s: build_adapters(dim, targets, cfg.adapter.width, cfg.adapter.heads, s,  # noqa: E731
                                                cfg.adapter.kind, cfg.adapter.rank, norm,
                                                cfg.model.audio.tokens if cfg.adapter.token_embedding else 0)
                r = run(m, sc, sites, targets, make, spec, gspec, rounds, seed,
                        (rspec.samples_per_class, rspec.synthetic_samples_per_class), rspec.kd_epochs, REFINE_EPOCHS,
                        cfg.adapter.wire)
                row = {"setup": setup, "scenario": sc.name, "method": m.name, "seed": seed,
                       "top1": f"{r['correct'].mean().item():.4f}",
                       "generator_size": "" if gspec is None or gspec.type == "gaussian" or not m.equal_bytes
                       else f"hidden {gspec.hidden}, latent {gspec.latent_dim}",
                       "correct": " ".join(f"{v:.2g}" for v in r["correct"].tolist()),
                       "forgetting": " ".join(f"{v:.4f}" for v in r.get("forgetting", [])),
                       "mean_forgetting": f"{np.mean(r['forgetting']):.4f}" if r.get("forgetting") else "",
                       **{k: f"{r.get(k, float('nan')):.4f}" for k in ("train_fit", "within_site", "mb_up", "mb_down",
                                                                        "gen_kb", "s_per_round")}}
                append(path, row)
                done[sc.name, m.name, seed] = row
                print(f"{sc.name:30s} {m.name:50s} seed {seed} top1 {row['top1']} fit {row['train_fit']} "
                      f"forgetting {row['mean_forgetting'] or '-'} {row['s_per_round']} s/round", flush=True)
    header = (f"{rounds} rounds x {cfg.train.local_epochs} local epochs, loss {cfg.train.loss}; "
              f"settings {' '.join([*settings, *skew])}; "
              f"this invocation {(time.perf_counter() - t_start) / 60:.1f} min")
    summary = summarise([r for r in done.values()], order, references)
    chance = 1 / len(federation(C.data_spec(cfg), replace(C.partition_spec(cfg), mode="iid", sites=None))[1])
    table = markdown(summary, scenarios, header, chance)
    (out / "quality.md").write_text(table)
    print(table)


_CHOSEN: dict = {}


def generator_spec(m: Method, cfg, sites: list[SiteData], targets) -> GeneratorSpec | None:
    """The method's generator: the configured size, or the largest at most the gaussian's bytes (printed)."""
    if m.generator is None:
        return None
    key = (m.generator, m.granularity, m.equal_bytes, m.covariance, m.dp_epsilon)
    if key not in _CHOSEN:
        token_shape = tuple(sites[0].splits["train"][0].shape[1:])
        configured = _CHOSEN[key] = replace(C.replay_spec(cfg, sites[0].classes).generator, type=m.generator,
                                            covariance=m.covariance, dp_epsilon=m.dp_epsilon)
        if m.equal_bytes:
            budget = gaussian_bytes_per_key(sites, m.granularity, configured, targets)
            _CHOSEN[key] = equal_bytes_spec(configured, budget, token_shape)
            print(f"{m.generator} {m.granularity} at gaussian bytes: hidden={_CHOSEN[key].hidden} latent_dim="
                  f"{_CHOSEN[key].latent_dim}, {generator_bytes(_CHOSEN[key], token_shape):,} B per generator; "
                  f"gaussian {budget:,.0f} B", file=sys.stderr, flush=True)
    return _CHOSEN[key]


if __name__ == "__main__":
    main()
