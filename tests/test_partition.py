"""Partitioning clips to sites and splitting sites: coverage, disjointness, validation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from a2v_flower.data.esc50 import Clip
from a2v_flower.data.partition import partition, split

CLASSES = ["dog", "rooster", "rain", "sea_waves", "crying_baby", "sneezing"]


def clips(per_class: int = 10) -> list[Clip]:
    return [Clip(Path(f"{c}-{k}.wav"), k % 5 + 1, t, c) for t, c in enumerate(CLASSES) for k in range(per_class)]


def check_disjoint(parts, n):
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))


@pytest.mark.parametrize("mode,sites", [("iid", None), ("dirichlet", None),
                                        ("classes", [["dog", "rooster", "rain"], ["rain", "sea_waves"],
                                                     ["crying_baby", "sneezing"]]),
                                        ("groups", [["animals"], ["natural"], ["human"]])])
def test_modes_cover_all_clips_once(mode, sites):
    cs = clips()
    parts = partition(cs, mode, 3, seed=0, sites=sites, alpha=5.0)
    check_disjoint(parts, len(cs))
    assert sum(map(len, parts)) == len(cs)


def test_class_lists_are_respected_and_shared_class_split():
    cs = clips()
    parts = partition(cs, "classes", 2, 0, sites=[["dog", "rain", "rooster"], ["rain", "sea_waves", "crying_baby",
                                                                             "sneezing"]])
    site0 = Counter(cs[i].category for i in parts[0])
    site1 = Counter(cs[i].category for i in parts[1])
    assert set(site0) == {"dog", "rain", "rooster"} and site0["rain"] == 5 and site1["rain"] == 5


def test_groups_expand_to_dataset_classes():
    cs = clips()
    parts = partition(cs, "groups", 2, 0, sites=[["animals", "natural"], ["human"]])
    assert {cs[i].category for i in parts[1]} == {"crying_baby", "sneezing"}


def test_same_seed_same_partition_other_seed_differs():
    cs = clips()
    assert partition(cs, "iid", 3, 1) == partition(cs, "iid", 3, 1) != partition(cs, "iid", 3, 2)


@pytest.mark.parametrize("mode,sites,match", [
    ("classes", [["dog", "cat"], CLASSES], r"sites\[0\]: unknown classes \['cat'\]; allowed"),
    ("classes", [["dog"], ["rooster"]], r"classes \['rain', 'sea_waves', .*\] are in no site"),
    ("classes", [["dog"], []], r"sites\[1\] is empty"),
    ("groups", [["animals"], ["plants"]], r"unknown groups \['plants'\]; allowed: \['animals'"),
    ("groups", [["animals", "natural", "human"], ["urban"]], r"sites\[1\]=\['urban'\]: these groups have no class"),
    ("classes", [CLASSES], r"1 sites but federation.num_sites=2"),
    ("classes", None, r"partition.sites is required"),
    ("wrong", None, r"partition.mode='wrong' is not allowed; expected one of"),
])
def test_validation_errors_name_the_problem(mode, sites, match):
    with pytest.raises(ValueError, match=match):
        partition(clips(), mode, 2, 0, sites=sites)


def test_empty_site_is_an_error():
    with pytest.raises(ValueError, match=r"4 sites got no clips \(first: \[6, 7, 8, 9\]"):
        partition(clips(per_class=1), "iid", 10, 0)


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
def test_a_thousand_sites_each_get_clips(mode):
    cs = clips(per_class=500)  # 3000 clips: Dirichlet(0.5) over 1000 sites leaves most draws empty
    parts = partition(cs, mode, 1000, seed=0)
    check_disjoint(parts, len(cs))
    assert sum(map(len, parts)) == len(cs) and min(map(len, parts)) >= 1


def test_small_site_gets_a_test_clip_when_its_share_rounds_to_one():
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    three = split([0, 1, 2], fractions, seed=0)  # one clip per class: all would round down to train
    assert [len(three[k]) for k in ("train", "val", "test")] == [2, 0, 1]
    two = split([0, 1], fractions, seed=0)       # 0.2 x 2 clips rounds to none
    assert [len(two[k]) for k in ("train", "val", "test")] == [2, 0, 0]


def test_split_is_stratified_and_disjoint():
    labels = [c for c in range(4) for _ in range(10)]
    parts = split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    check_disjoint(list(parts.values()), len(labels))
    for name, frac in (("train", 7), ("val", 1), ("test", 2)):
        assert Counter(labels[i] for i in parts[name]) == {c: frac for c in range(4)}


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="data.splits"):
        split([0, 1], {"train": 0.5, "val": 0.1, "test": 0.1}, seed=0)


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_sites", [3, 30, 100, 1000])
def test_pooled_held_out_sets_keep_the_class_mix(mode, num_sites):
    """Small sites give their one held-out clip of a class drawn at random, not always their highest-numbered
    class: pooled over the sites, test and val hold the classes as the data does, within sampling noise."""
    cs = [Clip(Path(f"{c}-{k}.wav"), 1, t, c) for t, c in enumerate(CLASSES) for k in range(600)]  # 3600 clips
    parts = partition(cs, mode, num_sites, seed=0, alpha=0.5)
    pooled = {"val": Counter(), "test": Counter()}
    for s, idx in enumerate(parts):
        labels = [cs[i].target for i in idx]
        for name, pos in split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1000 * s).items():
            if name in pooled:
                pooled[name].update(labels[p] for p in pos)
    for name, counts in pooled.items():
        n = sum(counts.values())
        if name == "test":
            assert n >= 0.5 * num_sites  # a site whose test share rounds to one clip holds one out
        if n < 30:  # at 1,000 sites of ~4 clips no val share rounds to a clip
            continue
        expected = n / len(CLASSES)
        worst = max(abs(counts[t] - expected) for t in range(len(CLASSES)))
        assert worst <= 4 * expected ** 0.5 + 1, (name, dict(counts))  # 4 sd of a binomial count: noise, not bias


def test_dirichlet_seeds_give_sensible_site_sizes():
    """The default run's shape (10 classes x 32 clips, 3 sites, alpha 0.5) through Flower Datasets'
    DirichletPartitioner: for seeds 0-4 no site is starved or holds most clips, and each sees most classes."""
    ten = ["dog", "rooster", "rain", "sea_waves", "crying_baby", "sneezing", "clock_tick", "crackling_fire",
           "helicopter", "chainsaw"]
    cs = [Clip(Path(f"{c}-{k}.wav"), 1, t, c) for t, c in enumerate(ten) for k in range(32)]
    for seed in range(5):
        parts = partition(cs, "dirichlet", 3, seed)
        assert sum(map(len, parts)) == 320 and all(32 <= len(p) <= 176 for p in parts), (seed, list(map(len, parts)))
        assert all(len({cs[i].category for i in p}) >= 7 for p in parts)
    assert partition(cs, "dirichlet", 3, 0) != partition(cs, "dirichlet", 3, 1)


def test_dirichlet_min_partition_size_redraws_or_says_why():
    cs = clips()
    assert min(map(len, partition(cs, "dirichlet", 3, 0, alpha=0.5, min_partition_size=15))) >= 15
    with pytest.raises(ValueError, match=r"partition.mode='dirichlet' \(DirichletPartitioner: alpha=0.5, "
                                         r"min_partition_size=30.*60 clips, 3 sites\) failed"):
        partition(cs, "dirichlet", 3, 0, alpha=0.5, min_partition_size=30)


def test_pathological_gives_each_site_its_classes_and_covers_them():
    cs = clips()
    parts = partition(cs, "pathological", 6, seed=0, classes_per_site=2)
    check_disjoint(parts, len(cs))
    held = [{cs[i].category for i in p} for p in parts]
    assert all(len(h) <= 2 for h in held) and [CLASSES[s] in held[s] for s in range(6)] == [True] * 6


def test_shards_deal_equal_sorted_shards():
    cs = clips()
    parts = partition(cs, "shards", 3, seed=0, shards_per_site=2)
    check_disjoint(parts, len(cs))
    assert [len(p) for p in parts] == [20, 20, 20] and all(len({cs[i].category for i in p}) <= 2 for p in parts)


def test_groups_come_from_the_clips_when_they_carry_them():
    """A Hugging Face dataset's group column names the groups partition=groups deals (not ESC-50's)."""
    cs = [Clip(c.path, c.fold, c.target, c.category, group="pets" if c.category == "dog" else "other") for c in clips()]
    parts = partition(cs, "groups", 2, 0, sites=[["pets"], ["other"]])
    assert {cs[i].category for i in parts[0]} == {"dog"} and len(parts[1]) == 50
    with pytest.raises(ValueError, match=r"unknown groups \['animals'\]; allowed: \['pets', 'other'\]"):
        partition(cs, "groups", 2, 0, sites=[["animals"], ["other"]])
