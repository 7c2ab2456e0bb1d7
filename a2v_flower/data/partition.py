"""Assign clips to sites (explicit classes, semantic groups, IID, Dirichlet) and split each site."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from a2v_flower.data.esc50 import ESC50_GROUPS, Clip

MODES = ("classes", "groups", "iid", "dirichlet", "pool")


def site_classes(mode: str, sites: list[list[str]] | None, classes: list[str]) -> list[list[str]]:
    """Expand `partition.sites` (class or group names) to class lists; validate them."""
    if sites is None or len(sites) == 0:
        raise ValueError(f"partition.sites is required for partition.mode={mode!r}: one list per site")
    out = []
    for i, names in enumerate(sites):
        if not names:
            raise ValueError(f"partition.sites[{i}] is empty: every site needs at least one {mode[:-1]}")
        if mode == "groups":
            unknown = [g for g in names if g not in ESC50_GROUPS]
            if unknown:
                raise ValueError(f"partition.sites[{i}]: unknown groups {unknown}; "
                                 f"allowed: {list(ESC50_GROUPS)}")
            expanded = [c for g in names for c in ESC50_GROUPS[g] if c in classes]
            if not expanded:
                raise ValueError(f"partition.sites[{i}]={list(names)}: these groups have no class in "
                                 f"the dataset's classes {classes}")
            out.append(expanded)
        else:
            unknown = [c for c in names if c not in classes]
            if unknown:
                raise ValueError(f"partition.sites[{i}]: unknown classes {unknown}; allowed: {classes}")
            out.append(list(names))
    orphans = [c for c in classes if not any(c in s for s in out)]
    if orphans:
        raise ValueError(f"partition.sites: classes {orphans} are in no site; add them to a site or "
                         "drop them with data.classes")
    return out


def partition(clips: list[Clip], mode: str, num_sites: int, seed: int,
              sites: list[list[str]] | None = None, alpha: float = 0.5, per_site: int = 4) -> list[list[int]]:
    """Return, for each site, the indices of its clips. Disjoint (every clip used at most once), except `pool`:
    each site draws `per_site` distinct clips of the shared pool, every clip as often as any other (seeded
    permutations of the pool dealt out in blocks; cross-device scale: 100,000 sites need no 100,000 x `per_site`
    files; evaluate.mode=server keeps the test clips out of the pool)."""
    if mode not in MODES:
        raise ValueError(f"partition.mode={mode!r} is not allowed; expected one of {list(MODES)}")
    if num_sites < 1:
        raise ValueError(f"federation.num_sites={num_sites} must be >= 1")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(clips):
        by_class[c.category].append(i)
    classes = sorted(by_class, key=lambda c: clips[by_class[c][0]].target)
    out: list[list[int]] = [[] for _ in range(num_sites)]
    if mode in ("classes", "groups"):
        lists = site_classes(mode, sites, classes)
        if len(lists) != num_sites:
            raise ValueError(f"partition.sites has {len(lists)} sites but federation.num_sites="
                             f"{num_sites}; make them equal")
        for c in classes:  # a class held by k sites is dealt to them in turn, without overlap
            owners = [s for s, names in enumerate(lists) if c in names]
            for j, idx in enumerate(rng.permutation(by_class[c])):
                out[owners[j % len(owners)]].append(int(idx))
    elif mode == "iid":
        for j, idx in enumerate(rng.permutation(len(clips))):
            out[j % num_sites].append(int(idx))
    elif mode == "pool":
        if not 1 <= per_site <= len(clips):
            raise ValueError(f"partition.clips_per_site={per_site} is not allowed; expected 1..{len(clips)} (the pool)")
        blocks = len(clips) // per_site  # each seeded permutation of the pool deals this many sites disjoint clips
        perms = np.stack([rng.permutation(len(clips)) for _ in range(-(-num_sites // blocks))])
        out = [perms[s // blocks, (s % blocks) * per_site:(s % blocks + 1) * per_site].tolist() for s in range(num_sites)]
    else:
        if alpha <= 0:
            raise ValueError(f"partition.alpha={alpha} must be > 0")
        for c in classes:
            idx = rng.permutation(by_class[c])
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites)) * len(idx)).astype(int)[:-1]
            for s, part in enumerate(np.split(idx, cuts)):
                out[s].extend(int(i) for i in part)
        for s in [s for s in range(num_sites) if not out[s]]:  # with many sites most draws are empty:
            donor = max(range(num_sites), key=lambda d: len(out[d]))  # the largest site gives one clip
            if len(out[donor]) > 1:
                out[s].append(out[donor].pop())
    empty = [s for s, idx in enumerate(out) if not idx]
    if empty:
        raise ValueError(f"partition: {len(empty)} sites got no clips (first: {empty[:5]}; mode={mode!r}, "
                         f"{len(clips)} clips, {num_sites} sites); use fewer sites or more data "
                         "(e.g. data.clips_per_class)")
    return [sorted(s) for s in out]


def held_out(labels: list[int], share: float, seed: int) -> list[int]:
    """Positions of a seeded `share` of each class's clips (at least one of a class with two or more): a test
    set of clips no site trains on (evaluate.mode=server, as the FedAvg paper's centralised test set)."""
    rng = np.random.default_rng([seed, 7])
    by_label: dict[int, list[int]] = defaultdict(list)
    for pos, y in enumerate(labels):
        by_label[y].append(pos)
    out = []
    for y in sorted(by_label):
        n = len(by_label[y])
        out += [int(i) for i in rng.permutation(by_label[y])[:min(n - 1, max(1, round(share * n)))]]
    return sorted(out)


def split(labels: list[int], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Stratified split of positions 0..N-1 into named parts (e.g. train/val/test), seeded."""
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"data.splits={dict(fractions)} must be non-negative and sum to 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in fractions}
    by_label: dict[int, list[int]] = defaultdict(list)
    for pos, y in enumerate(labels):
        by_label[y].append(pos)
    names = list(fractions)
    for y in sorted(by_label):
        idx = rng.permutation(by_label[y])
        counts = np.floor(np.array([fractions[n] for n in names]) * len(idx)).astype(int)
        for k in np.argsort([-fractions[n] for n in names])[: len(idx) - counts.sum()]:
            counts[k] += 1  # hand out the remainder to the largest parts first
        start = 0
        for name, n in zip(names, counts):
            parts[name].extend(int(i) for i in idx[start:start + n])
            start += n
    big = max(names, key=lambda k: len(parts[k]))
    for name in sorted(names, key=lambda k: -fractions[k]):  # a small site's classes all round down to `big`:
        if not parts[name] and fractions[name] * len(labels) >= 0.5 and len(parts[big]) > 1:  # a share that
            parts[name].append(parts[big].pop(_movable(parts[big], labels, rng)))  # rounds to one clip gets one
    return {k: sorted(v) for k, v in parts.items()}


def _movable(positions: list[int], labels: list[int], rng: np.random.Generator) -> int:
    """Index into `positions` of a clip to move to an empty share: drawn with `rng` among the clips of classes
    that keep >= 2 clips there (else among all). `positions` is filled class by class, so taking its last clip
    would give every small site's held-out clip to its highest-numbered class."""
    left = defaultdict(int)
    for pos in positions:
        left[labels[pos]] += 1
    pool = [j for j, pos in enumerate(positions) if left[labels[pos]] >= 2] or list(range(len(positions)))
    return pool[int(rng.integers(len(pool)))]
