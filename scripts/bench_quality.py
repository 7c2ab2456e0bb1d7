"""Learning-quality benchmark: every method side by side on hard data, non-IID and class-incremental.

    python scripts/bench_quality.py                 # default size, 3 seeds (about half an hour on 2 cores)
    python scripts/bench_quality.py --quick         # smoke size (a minute or two)
    python scripts/bench_quality.py data=esc50 data.root=/data/ESC-50 model=pretrained   # real data

Sites are simulated in one process with the same functions the Flower apps call (site loading with
the embedding cache, `train_adapters`, the replay functions, weighted averaging as FedAvg does), so a
method's number here is the number its Flower run would give, minus network and process overhead.

Every row with a neural generator (vae, cvae, gan) at its configured size is followed by the same
method with the generator shrunk to the gaussian baseline's bytes ("at gaussian bytes"): the largest
`hidden` (with latent_dim = min(latent_dim, hidden)) whose weights are no larger than the gaussian
generator's weights for the same classes and granularity. Sizes are computed from the data and printed.

Writes <out>/quality.csv, quality.md and quality_rounds.png, and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from a2v_flower import config as C
from a2v_flower import server_generators as R
from a2v_flower import site_generators as SR
from a2v_flower.models.generators import stats as SG
from a2v_flower.cache import TensorCache
from a2v_flower.data.site import SiteData, load_site
from a2v_flower.metrics import retrieval
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
from a2v_flower.models.generators import GeneratorSpec, build_generator
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.training import class_means, predict, train_adapters


# Default size of this benchmark (what the published table used); command-line overrides come after.
DEFAULT_SIZE = ["train.local_epochs=4", "generator.epochs=10", "adapter.width=128"]
QUICK_SIZE = [*DEFAULT_SIZE, "data.clips_per_class=16"]


@dataclass(frozen=True)
class Method:
    """One row of the table: how sites and server behave."""

    name: str
    aggregate: bool = True            # False: each site keeps its adapters (local only)
    central: bool = False             # one site holding all data (upper bound)
    generator: str | None = None      # generator type, None = no generators
    granularity: str = "unified"
    kd: bool = False
    refine: bool = False
    augment: bool = False
    replay: bool = False              # class-incremental: replay own old classes from the site's generator
    equal_bytes: bool = False         # neural generator shrunk to the gaussian's bytes (see equal_bytes_spec)
    reset: bool = True                # reset=on_class_change (a unified generator then forgets old classes)
    server_gen: bool = False          # kd on samples of the server's own generator (server_generator.epochs=20, batch_per_class=8)


def methods(quick: bool) -> list[Method]:
    """Methods compared, in table order; --quick keeps one of each kind."""
    baselines = [Method("local only", aggregate=False), Method("FedAvg"),
                 Method("centralised (upper bound)", central=True)]
    server_side = [Method("+ kd (gaussian)", generator="gaussian", kd=True),
                   Method("+ refinement (gaussian)", generator="gaussian", refine=True),
                   Method("+ augmentation (gaussian)", generator="gaussian", augment=True),
                   Method("+ kd (server generator, no site generators)", kd=True, server_gen=True)]
    replay_generators = [("gaussian", "per_class"), ("cvae", "unified")] if quick else [
        ("gaussian", "per_class"), ("vae", "per_class"), ("cvae", "unified"), ("cvae", "per_class"),
        ("cvae", "per_group"), ("gan", "unified"), ("gan", "per_group")]
    replays = [Method(f"+ replay ({g}, {gr})", generator=g, granularity=gr, replay=True)
               for g, gr in replay_generators]
    if not quick:  # a unified generator reset on each new class has nothing old left to replay: without reset
        replays += [Method(f"+ replay ({g}, unified, reset=off)", generator=g, replay=True, reset=False)
                    for g in ("gaussian", "cvae")]
    neural_augmentation = [] if quick else [Method("+ augmentation (cvae, unified)", generator="cvae", augment=True)]
    return with_equal_bytes(baselines + server_side + replays + neural_augmentation)


def with_equal_bytes(rows: list[Method]) -> list[Method]:
    """After each neural-generator method, the same method with its generator at the gaussian's bytes."""
    out = []
    for m in rows:
        out.append(m)
        if m.generator not in (None, "gaussian"):
            out.append(replace(m, name=f"{m.name} at gaussian bytes", equal_bytes=True))
    return out


# ---- generator sizes ----------------------------------------------------------------------------

def weight_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a generator's weights and buffers as a site sends them (optimizer state and RNG stay home)."""
    return sum(v.numel() * v.element_size() for v in SR.weights_only(state).values())


def generator_bytes(spec: GeneratorSpec, token_shape: tuple[int, int]) -> int:
    """Bytes of the weights of one generator of `spec` (a neural generator's size does not depend on its data)."""
    return weight_bytes(build_generator(spec, token_shape).state_tensors())


def gaussian_bytes_per_key(sites: list[SiteData], granularity: str, gspec: GeneratorSpec, targets) -> float:
    """Mean bytes of one gaussian generator's weights (one key), fitted on all of a site's training classes."""
    classes, sizes = sites[0].classes, []
    for site in sites:
        x, y = site.splits["train"]
        states, _ = SR.train_site_generators({}, set(), x, y, classes, granularity, C.default_groups(classes),
                                            replace(gspec, type="gaussian"), targets, True)
        sizes += [weight_bytes(state) for state in states.values()]
    return float(np.mean(sizes))


def equal_bytes_spec(spec: GeneratorSpec, budget: float, token_shape: tuple[int, int]) -> GeneratorSpec:
    """`spec` with the largest hidden (latent_dim = min(spec.latent_dim, hidden)) whose weights fit in `budget`.

    Falls back to hidden = latent_dim = 1 (the smallest network) when even that exceeds the budget.
    """
    best = replace(spec, hidden=1, latent_dim=1)
    for hidden in range(1, spec.hidden + 1):
        candidate = replace(spec, hidden=hidden, latent_dim=min(spec.latent_dim, hidden))
        if generator_bytes(candidate, token_shape) > budget:
            break  # bytes grow with hidden
        best = candidate
    return best


def average(states: list[dict], weights: list[float]) -> dict:
    """Weighted mean of state dicts (what FedAvg's aggregate_arrayrecords computes)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return {k: sum(wi * s[k].double() for wi, s in zip(w, states)).float() for k in states[0]}


def schedule(site: SiteData, rnd: int, rounds: int, incremental: bool) -> list[int]:
    """Classes a site trains on in a round: all, or its first half then its second half (class-incremental)."""
    present = site.present
    if not incremental or len(present) < 2:
        return present
    half = (len(present) + 1) // 2
    return present[:half] if rnd <= rounds // 2 else present[half:]


def run(method: Method, sites: list[SiteData], targets, make, spec, gspec: GeneratorSpec | None, rounds: int,
        incremental: bool, seed: int) -> dict:
    """Federated rounds of one method; per round top-1 on all classes seen so far, forgetting, bytes.

    gspec is the method's generator (type and size already chosen), None without generators.
    """
    torch.manual_seed(seed)
    if method.central:
        xs = [s.splits["train"] for s in sites]
        merged = SiteData(sites[0].classes, {"train": (torch.cat([x for x, _ in xs]), torch.cat([y for _, y in xs])),
                                             "test": sites[0].splits["test"]})
        sites_run = [merged]
    else:
        sites_run = sites
    global_ad = make(seed)  # seeds vary the initial adapters, batch order and generator sampling
    locals_ = [copy.deepcopy(global_ad) for _ in sites_run]
    gens: dict[int, dict] = {i: {} for i in range(len(sites_run))}
    seen_gen: dict[int, set] = {i: set() for i in range(len(sites_run))}
    classes, seen, history, nbytes, gen_bytes = sites[0].classes, set(), [], 0, 0
    best: dict[int, float] = {}
    token_shape = tuple(sites[0].splits["train"][0].shape[1:])
    server_pool = None  # last round's server-side synthetic samples (augmentation)
    sg_spec = SG.ServerGeneratorSpec(epochs=20, batch_per_class=8)
    server_gen = SG.StatsGenerator(token_shape, sg_spec) if method.server_gen else None
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        states, weights, stats = [], [], {}
        for i, site in enumerate(sites_run):
            x, y = site.splits["train"]
            now = schedule(site, rnd, rounds, incremental and not method.central)  # joint = all data at once
            mask = torch.isin(y, torch.tensor(now))
            x, y = x[mask], y[mask]
            seen |= set(now)
            if method.generator:
                gens[i], _ = SR.train_site_generators(gens[i], seen_gen[i], x, y, classes, method.granularity,
                                                     C.default_groups(classes), replace(gspec, seed=seed), targets,
                                                     method.reset)
                seen_gen[i] |= set(now)
            extra_x, extra_y = [], []
            if method.replay and gens[i]:  # own old classes, from the site's own generators
                old = sorted(seen_gen[i] - set(now))
                if old:
                    w = {k: SR.weights_only(v) for k, v in gens[i].items()}
                    sx, sy = R.synthesize({0: w}, {c: [0] for c in old}, classes, method.granularity,
                                          C.default_groups(classes), gspec, token_shape, targets,
                                          max(8, len(y) // max(1, len(now))),
                                          seed=seed + rnd)
                    extra_x.append(sx), extra_y.append(sy)
            if method.augment and server_pool is not None:  # 8 samples of every class this site lacks
                px, py = server_pool
                take = torch.cat([torch.nonzero(py == c).flatten()[:8] for c in py.unique().tolist()
                                  if c not in set(y.tolist())] or [torch.empty(0, dtype=torch.long)])
                extra_x.append(px[take]), extra_y.append(py[take])
            model = locals_[i] if not method.aggregate else copy.deepcopy(global_ad)
            train_adapters(model, torch.cat([x, *extra_x]), torch.cat([y, *extra_y]), targets, spec, seed + rnd + i)
            locals_[i] = model
            states.append(model.state_dict())
            weights.append(len(y))
            nbytes += sum(v.numel() * v.element_size() for v in model.state_dict().values())
            stats[i] = {"counts": torch.bincount(y, minlength=len(classes)).float(),
                        **{f"audio_mean/{c}": x[y == c].mean(0) for c in y.unique().tolist()}}
            if method.server_gen:  # what a site sends when the server trains its own generator
                stats[i] |= {f"audio_var/{c}": x[y == c].var(0, unbiased=False) for c in y.unique().tolist()}
                stats[i] |= {f"out/{k}": v for k, v in class_means(predict(model, x), y).items()}
                nbytes += sum(v.numel() * v.element_size() for k, v in stats[i].items() if k.startswith("out/"))
            gen_bytes += sum(weight_bytes(g) for g in gens[i].values())
        if method.aggregate:
            global_ad.load_state_dict(average(states, weights))
        if method.server_gen:
            owners = {}
            for i, st in stats.items():
                for c in torch.nonzero(st["counts"]).flatten().tolist():
                    owners.setdefault(c, []).append(i)
            teachers = {i: copy.deepcopy(locals_[i]) for i in range(len(sites_run))}
            SG.train_server_generator(server_gen, teachers, stats, targets, sg_spec, seed + rnd)
            sx, sy = SG.sample_server_generator(server_gen, stats, targets, 32, seed + 7 * rnd)
            R.distill(global_ad, teachers, owners, sx, sy, replace(spec, epochs=5), seed)
        if method.generator and (method.kd or method.refine or method.augment):
            owners = {}
            for i, st in stats.items():
                for c in torch.nonzero(st["counts"]).flatten().tolist():
                    owners.setdefault(c, []).append(i)
            w = {i: {k: SR.weights_only(v) for k, v in g.items()} for i, g in gens.items()}
            sx, sy = R.synthesize(w, owners, classes, method.granularity, C.default_groups(classes), gspec,
                                  token_shape, targets, 32, seed=seed + rnd)
            server_pool = (sx, sy)
            if method.kd:
                teachers = {i: locals_[i] for i in range(len(sites_run))}
                R.distill(global_ad, teachers, owners, sx, sy, replace(spec, epochs=5), seed)
            if method.refine:
                present, means = R.class_audio_means(stats, len(classes))
                R.refine(global_ad, torch.cat([sx, means]), torch.cat([sy, torch.tensor(present)]), targets,
                         replace(spec, epochs=3), seed)
        # evaluation on every site's held-out clips of the classes seen so far
        xt = torch.cat([s.splits["test"][0] for s in sites])
        yt = torch.cat([s.splits["test"][1] for s in sites])
        keep = torch.isin(yt, torch.tensor(sorted(seen)))
        if method.aggregate:
            m = retrieval(predict(global_ad, xt[keep]), yt[keep], targets)
            correct, count = np.array(m["correct_per_class"]), np.array(m["count_per_class"])
        else:  # each site's own adapters on its own held-out clips
            correct = count = 0
            for s, model in zip(sites, locals_):
                xs_, ys_ = s.splits["test"]
                k = torch.isin(ys_, torch.tensor(sorted(seen)))
                if k.any():
                    m = retrieval(predict(model, xs_[k]), ys_[k], targets)
                    correct = correct + np.array(m["correct_per_class"])
                    count = count + np.array(m["count_per_class"])
        acc = {c: correct[c] / count[c] for c in range(len(classes)) if count[c]}
        for c, a in acc.items():
            best[c] = max(best.get(c, 0.0), a)
        history.append(float(correct.sum() / max(1, count.sum())))
    forgetting = float(np.mean([best[c] - acc.get(c, 0.0) for c in best])) if best else 0.0
    per_site_round = rounds * len(sites_run)
    return {"top1": history[-1], "forgetting": forgetting, "history": history,
            "bytes_per_site_round": (nbytes + gen_bytes) / per_site_round,
            "gen_bytes_per_site_round": gen_bytes / per_site_round, "seconds": time.perf_counter() - t0}


def main() -> None:
    """Parse arguments, load sites once, run every method x scenario x seed, write the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (data, model, train, ...)")
    ap.add_argument("--quick", action="store_true", help="smoke size: 1 seed, 3 rounds, fewer methods")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--only", default="", help="run only methods whose name contains this text")
    args = ap.parse_args()
    t_start = time.perf_counter()
    seeds, rounds = (1, 3) if args.quick else (args.seeds, args.rounds)
    cfg = C.absolute_paths(C.compose_config(["partition=groups", "federation.num_sites=5",
                                             "partition.sites=[[animals],[natural],[human],[domestic],[urban]]",
                                             "generator=cvae", *(QUICK_SIZE if args.quick else DEFAULT_SIZE),
                                             *args.overrides]), Path.cwd())
    C.validate(cfg)
    encoder = AudioEncoder(C.audio_spec(cfg))
    sites = [load_site(C.data_spec(cfg), C.partition_spec(cfg), encoder, i) for i in range(cfg.federation.num_sites)]
    classes = sites[0].classes
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.text_spec(cfg), C.t5_seq_len(cfg),
                            TensorCache(Path(cfg.paths.cache_dir) / "targets"))
    dim = encoder_dim(C.audio_spec(cfg))
    token_shape = tuple(sites[0].splits["train"][0].shape[1:])

    def make(seed: int):
        return build_adapters(dim, targets, cfg.adapter.width, cfg.adapter.heads, seed)

    base_gspec = C.replay_spec(cfg, classes).generator
    chosen: dict[tuple[str, str, bool], GeneratorSpec] = {}

    def generator_spec(method: Method) -> GeneratorSpec | None:
        """The method's generator: the configured size, or the largest at most the gaussian's bytes."""
        if method.generator is None:
            return None
        key = (method.generator, method.granularity, method.equal_bytes)
        if key not in chosen:
            configured = chosen[key] = replace(base_gspec, type=method.generator)
            if method.equal_bytes:
                budget = gaussian_bytes_per_key(sites, method.granularity, base_gspec, targets)
                chosen[key] = equal_bytes_spec(configured, budget, token_shape)
                print(f"{method.generator} {method.granularity} at gaussian bytes: hidden={chosen[key].hidden} "
                      f"latent_dim={chosen[key].latent_dim}, {generator_bytes(chosen[key], token_shape):,} B "
                      f"per generator; gaussian {budget:,.0f} B; configured size (hidden={configured.hidden} "
                      f"latent_dim={configured.latent_dim}) {generator_bytes(configured, token_shape):,} B", flush=True)
        return chosen[key]

    rows = []
    for scenario in ("non-IID (one group per site)", "class-incremental"):
        for method in methods(args.quick):
            if args.only not in method.name or (scenario.startswith("non") and method.replay):
                continue  # replay of old classes only means something when classes change
            gspec = generator_spec(method)
            runs = [run(method, sites, targets, make, C.train_spec(cfg), gspec, rounds,
                        scenario == "class-incremental", seed) for seed in range(seeds)]
            row = {"scenario": scenario, "method": method.name,
                   "generator_size": "" if gspec is None or gspec.type == "gaussian" else
                   f"hidden {gspec.hidden}, latent {gspec.latent_dim}",
                   "top1_mean": np.mean([r["top1"] for r in runs]), "top1_std": np.std([r["top1"] for r in runs]),
                   "forgetting_mean": np.mean([r["forgetting"] for r in runs]),
                   "forgetting_std": np.std([r["forgetting"] for r in runs]),
                   "mb_per_site_round": np.mean([r["bytes_per_site_round"] for r in runs]) / 1e6,
                   "gen_bytes_per_site_round": np.mean([r["gen_bytes_per_site_round"] for r in runs]),
                   "seconds": np.mean([r["seconds"] for r in runs]),
                   "history": np.mean([r["history"] for r in runs], axis=0).round(4).tolist()}
            rows.append(row)
            print(f"{scenario:30s} {method.name:52s} top1 {row['top1_mean']:.3f}±{row['top1_std']:.3f} "
                  f"forgetting {row['forgetting_mean']:.3f} {row['mb_per_site_round']:.2f} MB "
                  f"(generators {row['gen_bytes_per_site_round'] / 1e3:.1f} kB) {row['seconds']:.1f}s", flush=True)
    write(rows, Path(args.out), seeds, rounds, len(classes), time.perf_counter() - t_start)


def write(rows: list[dict], out: Path, seeds: int, rounds: int, num_classes: int, seconds: float) -> None:
    """quality.csv, quality.md (table) and quality_rounds.png (accuracy by round)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"{seeds} seed(s), {rounds} rounds, {num_classes} classes (chance top-1 {1 / num_classes:.3f}); "
             "top-1 = retrieval on held-out clips of all classes seen so far. "
             f"Whole benchmark: {seconds / 60:.1f} min wall.", "",
             "| scenario | method | final top-1 | avg forgetting | MB sent / site / round | "
             "generator kB sent / site / round | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f" ({r['generator_size']})" if r["method"].endswith("at gaussian bytes") else ""
        gen_kb = f"{r['gen_bytes_per_site_round'] / 1e3:,.1f}" if r["gen_bytes_per_site_round"] else "-"
        lines.append(f"| {r['scenario']} | {r['method']}{size} | {r['top1_mean']:.3f} ± {r['top1_std']:.3f} | "
                     f"{r['forgetting_mean']:.3f} ± {r['forgetting_std']:.3f} | {r['mb_per_site_round']:.2f} | "
                     f"{gen_kb} | {r['seconds']:.1f} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({r["scenario"] for r in rows})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(7 * len(scenarios), 4.5), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        for r in rows:
            if r["scenario"] == sc:
                ax.plot(range(1, len(r["history"]) + 1), r["history"], marker="o", label=r["method"])
        ax.set(title=sc, xlabel="round", ylabel="top-1 (classes seen)", ylim=(0, 1))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "quality_rounds.png", dpi=100)


if __name__ == "__main__":
    main()
