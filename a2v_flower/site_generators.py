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
                                          key_for, sample_classes, sample_quality, train_generator)
from a2v_flower.training import predict

log = logging.getLogger(__name__)


def train_site_generators(states: dict[str, dict[str, torch.Tensor]], seen: set[int], x: torch.Tensor,
                          y: torch.Tensor, classes: list[str], granularity: str, groups: dict | None,
                          spec: GeneratorSpec, class_targets: dict[str, torch.Tensor], reset_on_new: bool, *,
                          scheduled_reset: bool = False, layers: tuple[str, ...] = (),
                          val: tuple[torch.Tensor, torch.Tensor] | None = None,
                          resets: dict | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Train (or continue) one generator per key on the site's (x, y); reset keys that meet new classes
    (`reset_on_new`: the site has trained before, on `seen`, and the key's state never saw some of this
    round's classes) or all keys (`scheduled_reset`), entirely or only the parameters named by `layers`.

    Returns the updated full states (weights + optimizer) and the last epoch's loss per key. A reset is
    recorded in `resets[key]`: why, and sample quality (Fréchet, mean distance) on this round's data just
    before the reset and after retraining.
    """
    keys = generator_keys(granularity, classes, groups)
    out, losses = dict(states), {}
    for key, members in keys.items():
        ids = [classes.index(c) for c in members]
        mask = torch.isin(y, torch.tensor(ids))
        if not mask.any():
            continue
        gen = build_generator(spec, tuple(x.shape[1:]))
        old = states.get(key)
        # classes this state was ever trained on, kept in the state (a shared generator remembers every site's);
        # never forgotten, so each class resets a generator at most once in a run
        key_seen = set(old["seen"].tolist()) if old is not None and "seen" in old else set(seen) & set(ids)
        now = set(y[mask].unique().tolist())
        new = now - key_seen
        # a class change: this site trained before (`seen`) and now brings classes the generator never saw
        why = ("new classes " + str(sorted(classes[c] for c in new)) if reset_on_new and new and seen
               else "schedule" if scheduled_reset else None)
        if old is not None and why:
            known = mask & torch.isin(y, torch.tensor(sorted(key_seen), dtype=torch.long))  # it can only sample these
            before = _quality(old, spec, x[known], y[known], class_targets)
            fresh = gen.state_tensors()
            gen.load_state_tensors(partial_reset(old, fresh, layers) if layers else fresh)
            log.info("Resetting generator %r (%s, %s): quality before %s", key, why,
                     "layers " + ", ".join(layers) if layers else "all layers", _fmt(before))
        elif old is not None:
            gen.load_state_tensors(old)
        vmask = torch.isin(val[1], torch.tensor(ids)) if val is not None else None
        history = train_generator(gen, x[mask], y[mask], class_targets, spec,
                                  (val[0][vmask], val[1][vmask]) if vmask is not None and vmask.any() else None)
        out[key] = gen.state_tensors() | {"seen": torch.tensor(sorted(key_seen | now), dtype=torch.long)}
        losses[key] = sum(v for k, v in history[-1].items() if k not in ("epoch", "kl_beta", "val"))
        if old is not None and why:
            after = _quality(out[key], spec, x[mask], y[mask], class_targets)
            log.info("Generator %r after reset and retraining: quality %s", key, _fmt(after))
            if resets is not None:
                resets[key] = {"why": why, "before": before, "after": after}
    return out, losses


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


def _quality(state: dict, spec: GeneratorSpec, x: torch.Tensor, y: torch.Tensor, class_targets: dict) -> dict:
    """Sample quality of a generator state on (x, y): mean over classes of mean_l2 and frechet."""
    rows = [_class_sample(state, spec, x[y == c], c, class_targets)[1] for c in y.unique().tolist()
            if (y == c).sum() >= 2]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("mean_l2", "frechet")} if rows else {}


def _class_sample(state: dict, spec: GeneratorSpec, real: torch.Tensor, c: int, class_targets: dict
                  ) -> tuple[torch.Tensor, dict]:
    """As many samples of class `c` from a generator state as `real` has rows (seeded by c), and their
    quality against `real` (mean distance, Fréchet, precision, coverage)."""
    gen = build_generator(spec, tuple(real.shape[1:]))
    gen.load_state_tensors(state)
    with torch.no_grad():
        fake = sample_classes(gen.eval(), class_targets, torch.full((len(real),), c),
                              generator=torch.Generator().manual_seed(c))
    return fake, sample_quality(real, fake)


def _fmt(q: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in q.items()) or "n/a (fewer than 2 clips per class)"


def generator_quality(states: dict, x: torch.Tensor, y: torch.Tensor, adapters: AdapterSet, classes: list[str],
                      replay: ReplaySpec, class_targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per class: synthetic vs real embeddings (mean distance, Fréchet, precision, coverage), averaged over the
    site's classes; plus retrieval top-1 of the current adapters on the synthetic samples."""
    rows, xs, ys = [], [], []
    for c in y.unique().tolist():
        key = key_for(replay.granularity, classes[c], replay.groups)
        real = x[y == c]
        if key not in states or len(real) < 2:
            continue
        fake, quality = _class_sample(states[key], replay.generator, real, c, class_targets)
        rows.append(quality)
        xs.append(fake), ys.append(torch.full((len(fake),), c))
    keys = ("mean_l2", "frechet", "precision", "coverage")
    if not rows:  # same keys on every site (Flower checks replies agree)
        return {f"gen_{k}": 0.0 for k in keys} | {"gen_synthetic_top1": 0.0, "gen_classes_measured": 0}
    out = {f"gen_{k}": sum(r[k] for r in rows) / len(rows) for k in keys}
    out["gen_synthetic_top1"] = retrieval(predict(adapters, torch.cat(xs)), torch.cat(ys), class_targets)["top1"]
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


def load_site_generators(replay: ReplaySpec, site: int, classes: list[str], y: torch.Tensor
                         ) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
    """Load the generators of this site's classes: all or nothing; a mismatch names file and both sides."""
    keys = generator_keys(replay.granularity, classes, replay.groups)
    mine = sorted({key_for(replay.granularity, classes[c], replay.groups) for c in y.unique().tolist()})
    loaded = ckpt.load_generator_checkpoints(replay.checkpoint_dir, replay.checkpoint_base, site, replay.granularity,
                                             mine, expect={"type": replay.generator.type,
                                                           "classes": {k: keys[k] for k in mine},
                                                           "config_fingerprint": _fingerprint(replay)})
    seen = {classes.index(c) for _, meta in loaded.values() for c in meta.seen_classes if c in classes}
    log.info("site %s: loaded %d pretrained generators from %s", site, len(loaded), replay.checkpoint_dir)
    return {k: tensors for k, (tensors, _) in loaded.items()}, seen
