"""Assign clips to sites and split each site. IID, Dirichlet, pathological (N classes a site) and shards are Flower
Datasets' partitioners; explicit class lists and semantic groups, which no partitioner does, are dealt here."""

from __future__ import annotations

from collections import defaultdict

import warnings

import numpy as np

from a2v_flower.data.esc50 import ESC50_GROUPS, Clip

MODES = ("classes", "groups", "iid", "dirichlet", "pathological", "shards", "pool")


def site_classes(mode: str, sites: list[list[str]] | None, classes: list[str],
                 groups: dict[str, list[str]] = ESC50_GROUPS) -> list[list[str]]:
    """Expand `partition.sites` (class names, or names of `groups`) to class lists; validate them."""
    if sites is None or len(sites) == 0:
        raise ValueError(f"partition.sites is required for partition.mode={mode!r}: one list per site")
    out = []
    for i, names in enumerate(sites):
        if not names:
            raise ValueError(f"partition.sites[{i}] is empty: every site needs at least one {mode[:-1]}")
        if mode == "groups":
            unknown = [g for g in names if g not in groups]
            if unknown:
                raise ValueError(f"partition.sites[{i}]: unknown groups {unknown}; "
                                 f"allowed: {list(groups)}")
            expanded = [c for g in names for c in groups[g] if c in classes]
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


def partition(clips: list[Clip], mode: str, num_sites: int, seed: int, sites: list[list[str]] | None = None,
              alpha: float = 0.5, min_partition_size: int = 0, classes_per_site: int = 2,
              shards_per_site: int = 2, per_site: int = 4) -> list[list[int]]:
    """Return, for each site, the indices of its clips. Disjoint (every clip used at most once), except `pool`:
    each site draws `per_site` distinct clips of the shared pool, every clip as often as any other (seeded
    permutations of the pool dealt out in blocks; cross-device scale: 100,000 sites need no 100,000 x `per_site`
    files; evaluate.mode=server keeps the test clips out of the pool)."""
    if mode not in MODES:
        raise ValueError(f"partition.mode={mode!r} is not allowed; expected one of {list(MODES)}")
    if num_sites < 1:
        raise ValueError(f"federation.num_sites={num_sites} must be >= 1")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(clips):
        by_class[c.category].append(i)
    classes = sorted(by_class, key=lambda c: clips[by_class[c][0]].target)
    if mode == "pool":
        if not 1 <= per_site <= len(clips):
            raise ValueError(f"partition.clips_per_site={per_site} is not allowed; expected 1..{len(clips)} (the pool)")
        rng, blocks = np.random.default_rng(seed), len(clips) // per_site  # a permutation deals `blocks` sites
        perms = np.stack([rng.permutation(len(clips)) for _ in range(-(-num_sites // blocks))])
        return [sorted(perms[s // blocks, (s % blocks) * per_site:(s % blocks + 1) * per_site].tolist())
                for s in range(num_sites)]
    if num_sites > len(clips):  # Flower Datasets' partitioners fail on it: the same error as an empty site
        out = [[i] for i in range(len(clips))] + [[] for _ in range(num_sites - len(clips))]
    elif mode in ("classes", "groups"):
        out = by_site_classes(clips, mode, num_sites, seed, sites, by_class, classes)
    else:
        labels = [classes.index(c.category) for c in clips]
        out = flower_partition(labels, mode, num_sites, seed, alpha, min_partition_size,
                               classes_per_site, shards_per_site)
    if mode == "dirichlet" and not min_partition_size:
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


def by_site_classes(clips: list[Clip], mode: str, num_sites: int, seed: int, sites: list[list[str]] | None,
                    by_class: dict[str, list[int]], classes: list[str]) -> list[list[int]]:
    """partition=classes|groups: each site holds the classes it lists; a class held by k sites is dealt to them
    in turn, without overlap. A dataset whose clips carry groups (a Hugging Face group column) names its own."""
    groups = ESC50_GROUPS
    if any(c.group is not None for c in clips):
        groups = defaultdict(list)
        for c in classes:
            groups[str(clips[by_class[c][0]].group)].append(c)
    lists = site_classes(mode, sites, classes, dict(groups))
    if len(lists) != num_sites:
        raise ValueError(f"partition.sites has {len(lists)} sites but federation.num_sites="
                         f"{num_sites}; make them equal")
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(num_sites)]
    for c in classes:
        owners = [s for s, names in enumerate(lists) if c in names]
        for j, idx in enumerate(rng.permutation(by_class[c])):
            out[owners[j % len(owners)]].append(int(idx))
    return out


def flower_partition(labels: list[int], mode: str, num_sites: int, seed: int, alpha: float, min_partition_size: int,
                     classes_per_site: int, shards_per_site: int) -> list[list[int]]:
    """Clip indices per site from Flower Datasets' partitioner for `mode`, over a table of (clip, label)."""
    import datasets
    from flwr_datasets import partitioner as fp

    table = datasets.Dataset.from_dict({"clip": list(range(len(labels))), "label": labels})
    if mode == "iid":  # IidPartitioner deals contiguous shards: shuffled first, seeded
        table, part = table.shuffle(seed=seed), fp.IidPartitioner(num_sites)
    elif mode == "dirichlet":
        part = fp.DirichletPartitioner(num_sites, "label", alpha, min_partition_size=min_partition_size, seed=seed)
    elif mode == "pathological":  # site i first gets class i, so every class is held while sites >= classes
        part = fp.PathologicalPartitioner(num_sites, "label", classes_per_site, "first-deterministic", seed=seed)
    else:
        part = fp.ShardPartitioner(num_sites, "label", shards_per_site, seed=seed)
    part.dataset = table
    try:
        with warnings.catch_warnings():  # the Dirichlet partitioner warns at every redraw; its error says enough
            warnings.simplefilter("ignore")
            return [list(part.load_partition(s)["clip"]) for s in range(num_sites)]
    except ValueError as err:
        raise ValueError(f"partition.mode={mode!r} ({type(part).__name__}: alpha={alpha}, min_partition_size="
                         f"{min_partition_size}, classes_per_site={classes_per_site}, shards_per_site="
                         f"{shards_per_site}, {len(labels)} clips, {num_sites} sites) failed: {err}") from None


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
