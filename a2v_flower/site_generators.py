"""The site's side of generators: train, reset and checkpoint its generators on its own embeddings (data
never leaves the site), and measure how close their samples are to its real clips."""

from __future__ import annotations

import logging

import torch

from a2v_flower import checkpoints as ckpt
from a2v_flower.cache import sha1_of
from a2v_flower.metrics import retrieval
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.models.generators import (CONDITION_DIM, GeneratorSpec, ReplaySpec, build_generator, generator_keys,
                                          key_for, moment_quality, sample_classes, sample_quality, train_generator)
from a2v_flower.training import predict

log = logging.getLogger(__name__)


def train_site_generators(states: dict[str, dict[str, torch.Tensor]], seen: set[int], x: torch.Tensor,
                          y: torch.Tensor, classes: list[str], granularity: str, groups: dict | None,
                          spec: GeneratorSpec, class_targets: dict[str, torch.Tensor], reset_on_new: bool, *,
                          scheduled_reset: bool = False, layers: tuple[str, ...] = (),
                          val: tuple[torch.Tensor, torch.Tensor] | None = None, resets: dict | None = None,
                          moments: dict[str, torch.Tensor] | None = None, site: int | None = None,
                          device: torch.device | str = "cpu"
                          ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
    """Train (or continue) one generator per key on the site's (x, y); reset keys that meet new classes
    (`reset_on_new`: the site has trained before, on `seen`, and the key's state never saw some of this
    round's classes) or all keys (`scheduled_reset`), entirely or only the parameters named by `layers`.

    Returns the updated full states (weights + optimizer) and, per key, the last epoch's loss components
    ("loss" is the total). A reset is recorded in `resets[key]`: why, and sample quality (mean distance,
    diagonal Fréchet) just before the reset, on the classes the old state knew, and after retraining, on
    this round's classes, both against the classes' mean/variance: `moments` ("mean/<c>", "var/<c>", from
    `class_moments`) kept by the site for classes no longer in its data, this round's data for the others.
    The generators train on `device`; the states returned are CPU tensors.
    """
    keys = generator_keys(granularity, classes, groups)
    out, losses, tag = dict(states), {}, "" if site is None else f"[Client {site}] "
    for key, members in keys.items():
        ids = [classes.index(c) for c in members]
        mask = torch.isin(y, torch.tensor(ids))
        if not mask.any():
            continue
        gen = build_generator(spec, tuple(x.shape[1:]), device=device)
        old = states.get(key)
        # classes this state was ever trained on, kept in the state (a shared generator remembers every site's);
        # never forgotten, so each class resets a generator at most once in a run
        key_seen = set(old["seen"].tolist()) if old is not None and "seen" in old else set(seen) & set(ids)
        now = set(y[mask].unique().tolist())
        new = now - key_seen
        # a class change: this site trained before (`seen`) and now brings classes the generator never saw
        why = ("new classes " + str(sorted(classes[c] for c in new)) if reset_on_new and new and seen
               else "schedule" if scheduled_reset else None)
        what = {"unified": "the unified generator", "per_class": f"generator for class {key!r}",
                "per_group": f"generator for group {key!r}"}[granularity]
        if old is not None and why:
            ref = (moments or {}) | class_moments(x[mask], y[mask])
            before = _quality(old, spec, ref, sorted(key_seen), class_targets, device)
            fresh = gen.state_tensors()
            gen.load_state_tensors(partial_reset(old, fresh, layers) if layers else fresh)
            log.info("%sResetting %s (%s, %s): quality before %s", tag, what, why,
                     "layers " + ", ".join(layers) if layers else "all layers", _fmt(before))
        elif old is not None:
            gen.load_state_tensors(old)
        vmask = torch.isin(val[1], torch.tensor(ids)) if val is not None else None
        history = train_generator(gen, x[mask], y[mask], class_targets, spec,
                                  (val[0][vmask], val[1][vmask]) if vmask is not None and vmask.any() else None)
        out[key] = gen.state_tensors() | {"seen": torch.tensor(sorted(key_seen | now), dtype=torch.long)}
        losses[key] = {k: float(v) for k, v in history[-1].items() if k != "epoch"}
        if old is not None and why:
            after = _quality(out[key], spec, ref, sorted(now), class_targets, device)
            log.info("%sGenerator reset complete: %s retrained, quality after %s", tag, what, _fmt(after))
            if resets is not None:
                resets[key] = {"why": why, "before": before, "after": after}
    return out, losses


def class_moments(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per class of y: "mean/<c>" and "var/<c>" (K, D) of its embeddings, what a site keeps of a class so
    that a reset's "quality before" can still be measured once the class's clips have left its stage."""
    out = {}
    for c in y.unique().tolist():
        out[f"mean/{c}"], out[f"var/{c}"] = x[y == c].mean(0), x[y == c].var(0, unbiased=False)
    return out


def generator_report(losses: dict[str, dict[str, float]], resets: dict[str, dict]) -> dict[str, float]:
    """A generator pass's figures for the site's reply: mean total loss, resets and their quality, and each
    key's loss components as "gen/<key>/<component>" (the same scalar keys on every site, as Flower needs)."""
    measured = [r for r in resets.values() if r["before"] and r["after"]]
    out = {"generator_loss": _mean([c["loss"] for c in losses.values()]), "resets": len(resets),
           "reset_frechet_before": _mean([r["before"]["frechet"] for r in measured]),
           "reset_frechet_after": _mean([r["after"]["frechet"] for r in measured])}
    return out | {f"gen/{key}/{k}": v for key, comps in losses.items() for k, v in comps.items()}


def log_generators(site: int, replay: ReplaySpec, per_key: dict[str, dict[str, float]]) -> None:
    """One INFO line per generator key: loss components (if trained this round) and sample statistics."""
    label = {"unified": "Generator", "per_class": "Class", "per_group": "Group"}[replay.granularity]
    for key, f in sorted(per_key.items()):
        parts = [k for k in f if k not in ("loss", "diversity") and not k.startswith("sample_")]
        comps = f" ({', '.join(f'{k}={f[k]:.4f}' for k in parts)})" if parts else ""
        loss = f"Loss={f['loss']:.4f}{comps}" if "loss" in f else ""
        samples = (f"samples mean={f['sample_mean']:.3f} std={f['sample_std']:.3f} range=[{f['sample_min']:.3f}, "
                   f"{f['sample_max']:.3f}], diversity={f['diversity']:.3f}") if "sample_mean" in f else ""
        log.info("[Client %s] %s %r: %s %s", site, label, key, replay.generator.type.upper(),
                 "; ".join(p for p in (loss, samples) if p))


def partial_reset(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], layers: tuple[str, ...]
                  ) -> dict[str, torch.Tensor]:
    """`state` with the parameters whose names start with one of `layers` taken from `fresh`, and their
    AdamW moments dropped (they restart with the weights); everything else is kept."""
    def hit(k: str) -> bool:
        name = k[6:] if k.startswith("model.") else k.split(".", 2)[2] if k.startswith("optim.") else ""
        return name.startswith(tuple(layers))

    out = {k: (fresh[k] if k.startswith("model.") and hit(k) else v) for k, v in state.items()
           if not (k.startswith("optim.") and hit(k))}
    return out


def check_reset_layers(spec: GeneratorSpec, layers: tuple[str, ...]) -> None:
    """ValueError naming reset.layers unless every prefix names at least one parameter of the generator."""
    names = [n for n, _ in build_generator(spec, (2, 4)).named_parameters()]
    if layers and not names:
        raise ValueError(f"reset.layers={list(layers)} but generator.type={spec.type!r} has no trainable layers; "
                         "use reset.layers=[] (whole reset) or generator=vae|cvae|gan")
    for prefix in layers:
        if not any(n.startswith(prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"reset.layers entry {prefix!r} names no parameter of generator.type="
                             f"{spec.type!r}; allowed prefixes start with one of {tops} (e.g. {names[0]!r})")


def _quality(state: dict, spec: GeneratorSpec, moments: dict[str, torch.Tensor], ids: list[int],
             class_targets: dict, device: torch.device | str = "cpu", n: int = 64) -> dict:
    """Sample quality of a generator state on the classes `ids` that `moments` knows: mean over classes of
    mean_l2 and diagonal frechet between `n` samples (seeded by class) and the class's mean/variance."""
    ids = [c for c in ids if f"mean/{c}" in moments]
    if not ids:
        return {}
    gen = build_generator(spec, tuple(moments[f"mean/{ids[0]}"].shape), device=device)
    gen.load_state_tensors(state)
    rows = []
    for c in ids:
        with torch.no_grad():
            fake = sample_classes(gen.eval(), class_targets, torch.full((n,), c),
                                  generator=torch.Generator().manual_seed(c)).cpu()
        rows.append(moment_quality(moments[f"mean/{c}"], moments[f"var/{c}"], fake))
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("mean_l2", "frechet")}


def _class_sample(state: dict, spec: GeneratorSpec, real: torch.Tensor, c: int, class_targets: dict,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict]:
    """As many samples of class `c` from a generator state (on `device`) as `real` has rows (seeded by c), on the
    CPU, and their quality against `real` (mean distance, Fréchet, precision, coverage)."""
    gen = build_generator(spec, tuple(real.shape[1:]), device=device)
    gen.load_state_tensors(state)
    with torch.no_grad():
        fake = sample_classes(gen.eval(), class_targets, torch.full((len(real),), c),
                              generator=torch.Generator().manual_seed(c)).cpu()
    return fake, sample_quality(real, fake)


def _fmt(q: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in q.items()) or "n/a (no class statistics kept for its classes)"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def generator_quality(states: dict, x: torch.Tensor, y: torch.Tensor, adapters: AdapterSet, classes: list[str],
                      replay: ReplaySpec, class_targets: dict[str, torch.Tensor], device: torch.device | str = "cpu"
                      ) -> dict[str, float]:
    """Per class: synthetic vs real embeddings (mean distance, Fréchet, precision, coverage, diversity), averaged
    over the site's classes; retrieval top-1 of the current adapters on the synthetic samples; and per key
    ("gen/<key>/...") the samples' mean, std, range and diversity (mean pairwise L2, over its classes)."""
    rows, xs, ys, by_key = [], [], [], {}
    for c in y.unique().tolist():
        key = key_for(replay.granularity, classes[c], replay.groups)
        real = x[y == c]
        if key not in states or len(real) < 2:
            continue
        fake, quality = _class_sample(states[key], replay.generator, real, c, class_targets, device)
        rows.append(quality)
        xs.append(fake), ys.append(torch.full((len(fake),), c))
        by_key.setdefault(key, []).append((fake, quality["diversity_fake"]))
    keys = ("mean_l2", "frechet", "precision", "coverage", "diversity_fake", "diversity_real")
    if not rows:  # same keys on every site (Flower checks replies agree)
        return {f"gen_{k}": 0.0 for k in keys} | {"gen_synthetic_top1": 0.0, "gen_classes_measured": 0}
    out = {f"gen_{k}": sum(r[k] for r in rows) / len(rows) for k in keys}
    out["gen_synthetic_top1"] = retrieval(predict(adapters, torch.cat(xs)), torch.cat(ys), class_targets)["top1"]
    for key, parts in by_key.items():
        fake = torch.cat([f for f, _ in parts])
        out |= {f"gen/{key}/sample_mean": fake.mean().item(), f"gen/{key}/sample_std": fake.std().item(),
                f"gen/{key}/sample_min": fake.min().item(), f"gen/{key}/sample_max": fake.max().item(),
                f"gen/{key}/diversity": _mean([d for _, d in parts])}
    return out | {"gen_classes_measured": len(rows)}


def weights_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a generator needs to sample: its weights and buffers, not optimizer state or RNG."""
    return {k: v for k, v in state.items() if k.startswith("model.")}


def _fingerprint(replay: ReplaySpec) -> str:
    """Hash of what must match between the run that saved generators and the one that loads them."""
    return sha1_of(replay.generator.type, replay.generator.latent_dim, replay.generator.hidden, replay.granularity,
                   replay.groups)[:12]


def save_site_generators(replay: ReplaySpec, site: int, states: dict, classes: list[str], seen: set[int],
                         token_shape: tuple[int, int], rnd: int, round_copy: bool) -> None:
    """Checkpoint a site's generators (weights + optimizer) under the predecessor's names, atomically."""
    if not states:
        return
    keys = generator_keys(replay.granularity, classes, replay.groups)
    meta = {"type": replay.generator.type, "token_shape": list(token_shape), "cond_dim": CONDITION_DIM,
            "classes": {k: keys[k] for k in states}, "site": f"node{site}",
            "seen_classes": sorted(classes[c] for c in seen), "config_fingerprint": _fingerprint(replay)}
    ckpt.save_generator_checkpoints(replay.checkpoint_dir, replay.checkpoint_base, site, replay.granularity,
                                    states, meta, rnd, round_copy)


def load_site_generators(replay: ReplaySpec, site: int, classes: list[str], y: torch.Tensor,
                         token_shape: tuple[int, int]) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
    """Load the generators of this site's classes: all or nothing. Metadata (type, classes, token shape,
    config) and every tensor's name and shape are checked against the configured generator first; a
    mismatch names the file and both sides."""
    keys = generator_keys(replay.granularity, classes, replay.groups)
    mine = sorted({key_for(replay.granularity, classes[c], replay.groups) for c in y.unique().tolist()})
    fresh = build_generator(replay.generator, token_shape)
    shapes = {k: tuple(v.shape) for k, v in fresh.state_tensors().items() if k.startswith("model.")}
    loaded = ckpt.load_generator_checkpoints(replay.checkpoint_dir, replay.checkpoint_base, site, replay.granularity,
                                             mine, expect={"type": replay.generator.type,
                                                           "classes": {k: keys[k] for k in mine},
                                                           "token_shape": list(token_shape),
                                                           "config_fingerprint": _fingerprint(replay)},
                                             shapes=shapes)
    seen = {classes.index(c) for _, meta in loaded.values() for c in meta.seen_classes if c in classes}
    log.info("site %s: loaded %d pretrained generators from %s", site, len(loaded), replay.checkpoint_dir)
    return {k: tensors for k, (tensors, _) in loaded.items()}, seen
