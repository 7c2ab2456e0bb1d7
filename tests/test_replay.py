"""Generators in the federation: site training with reset, server sampling, kd and refinement."""

from __future__ import annotations

import math

import pytest
import torch

from a2v_flower import config as C
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.generators import build_generator
from a2v_flower.server_generators import distill, refine, synthesize
from a2v_flower.site_generators import (_quality, check_reset_layers, class_moments, partial_reset,
                                        train_site_generators, weights_only)
from a2v_flower.training import predict

CLASSES = ["dog", "rain", "siren"]
TARGETS = {"pooled": torch.randn(3, 12, generator=torch.Generator().manual_seed(0))}


def toy(classes=(0, 1), n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([c for c in classes for _ in range(n)])
    centres = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1)) * 3
    return centres[y] + 0.3 * torch.randn(len(y), 4, 8, generator=g), y


def test_site_generators_per_class_and_reset(caplog):
    spec = C.spec("generator", type="gaussian")
    x, y = toy((0, 1))
    states, losses = train_site_generators({}, set(), x, y, CLASSES, "per_class", None, spec, TARGETS, True)
    assert set(states) == {"dog", "rain"} and set(losses) == {"dog", "rain"}  # no data of siren, no generator
    x2, y2 = toy((0, 2), seed=1)
    st, _ = train_site_generators({}, set(), x, y, CLASSES, "unified", None, C.spec("generator", type="cvae", epochs=2),
                                  TARGETS, True)
    resets = {}
    with caplog.at_level("INFO"):
        train_site_generators(st, {0, 1}, x2, y2, CLASSES, "unified", None, C.spec("generator", type="cvae", epochs=2),
                              TARGETS, True, resets=resets)
    assert "Resetting the unified generator (new classes ['siren'], all layers): quality before" in caplog.text
    assert set(resets) == {"unified"} and resets["unified"]["why"] == "new classes ['siren']"
    assert set(resets["unified"]["before"]) == {"mean_l2", "frechet"} and resets["unified"]["after"]["frechet"] >= 0


def _steps(state):
    return {k: int(v) for k, v in state.items() if k.endswith(".step")}


def test_reset_rules_per_granularity_and_schedule():
    spec = C.spec("generator", type="cvae", epochs=1)
    x, y = toy((0, 1))
    groups = {"pets": ["dog"], "weather": ["rain", "siren"]}
    for gran, expect_reset in (("unified", {"unified"}), ("per_class", {"siren"}), ("per_group", {"weather"})):
        st, _ = train_site_generators({}, set(), x, y, CLASSES, gran, groups, spec, TARGETS, True)
        x2, y2 = toy((0, 1, 2), seed=4)
        resets = {}
        out, _ = train_site_generators(st, {0, 1}, x2, y2, CLASSES, gran, groups, spec, TARGETS, True, resets=resets)
        assert set(resets) == (expect_reset & set(st)), gran  # siren had no generator of its own before
        members = {"unified": CLASSES, **groups, **{c: [c] for c in CLASSES}}
        for key in st:  # a reset key restarts its AdamW step count; a kept one continues it
            n = int(torch.isin(y2, torch.tensor([CLASSES.index(c) for c in members[key]])).sum())
            steps_now = math.ceil(n / spec.batch_size)
            before, after = max(_steps(st[key]).values()), max(_steps(out[key]).values())
            assert after == (steps_now if key in resets else before + steps_now), (gran, key)
        off = {}
        train_site_generators(st, {0, 1}, x2, y2, CLASSES, gran, groups, spec, TARGETS, False, resets=off)
        assert off == {}  # reset_generator_on_class_change=false
    st, _ = train_site_generators({}, set(), x, y, CLASSES, "per_class", None, spec, TARGETS, True)
    resets = {}
    train_site_generators(st, {0, 1}, x, y, CLASSES, "per_class", None, spec, TARGETS, False, scheduled_reset=True,
                          resets=resets)
    assert set(resets) == {"dog", "rain"} and all(r["why"] == "schedule" for r in resets.values())


def test_partial_reset_reinitialises_only_named_layers_and_their_moments():
    spec = C.spec("generator", type="cvae", epochs=2)
    x, y = toy((0, 1))
    st, _ = train_site_generators({}, set(), x, y, CLASSES, "unified", None, spec, TARGETS, True)
    fresh = build_generator(spec, (4, 8)).state_tensors()
    part = partial_reset(st["unified"], fresh, ("dec",))
    assert torch.equal(part["model.dec.0.weight"], fresh["model.dec.0.weight"])
    assert torch.equal(part["model.enc.0.weight"], st["unified"]["model.enc.0.weight"])
    assert not any(k.startswith("optim.opt.dec.") for k in part)       # moments restart with the weights
    assert any(k.startswith("optim.opt.enc.") for k in part)            # the others keep theirs
    gen = build_generator(spec, (4, 8))
    gen.load_state_tensors(part)  # a partial state loads
    with pytest.raises(ValueError, match=r"reset.layers entry 'decoder' names no parameter of generator.type='cvae'"):
        check_reset_layers(spec, ("decoder",))
    with pytest.raises(ValueError, match="has no trainable layers"):
        check_reset_layers(C.spec("generator", type="gaussian"), ("dec",))


def test_synthesize_uses_owner_sites_and_lands_near_class():
    spec = C.spec("generator", type="gaussian")
    xa, ya = toy((0,), seed=2)
    xb, yb = toy((1, 2), seed=3)
    sa, _ = train_site_generators({}, set(), xa, ya, CLASSES, "per_class", None, spec, TARGETS, True)
    sb, _ = train_site_generators({}, set(), xb, yb, CLASSES, "per_class", None, spec, TARGETS, True)
    site_states = {0: {k: weights_only(v) for k, v in sa.items()}, 1: {k: weights_only(v) for k, v in sb.items()}}
    x, y = synthesize(site_states, {0: [0], 1: [1], 2: [1]}, CLASSES, "per_class", None, spec, (4, 8), TARGETS,
                      per_class=10)
    assert x.shape == (30, 4, 8) and torch.bincount(y).tolist() == [10, 10, 10]
    centres = torch.stack([xa.mean(0), xb[yb == 1].mean(0), xb[yb == 2].mean(0)])
    nearest = torch.cdist(x.flatten(1), centres.flatten(1)).argmin(1)
    assert torch.equal(nearest, y)
    x2, y2 = synthesize(site_states, {0: [0], 1: [1]}, CLASSES, "per_class", None, spec, (4, 8), TARGETS, 5,
                        wanted=[1])
    assert y2.tolist() == [1] * 5


def test_distill_matches_owner_teachers_mean():
    x, y = toy((0, 1), n=16)
    teachers = {s: build_adapters(8, TARGETS, 16, 2, seed=s) for s in (0, 1, 2)}
    student = build_adapters(8, TARGETS, 16, 2, seed=9)
    owners = {0: [0, 1], 1: [2]}
    target0 = (predict(teachers[0], x[y == 0])["pooled"] + predict(teachers[1], x[y == 0])["pooled"]) / 2
    before = (predict(student, x[y == 0])["pooled"] - target0).pow(2).mean()
    distill(student, teachers, owners, x, y, TARGETS, C.spec("train", local_epochs=60, lr=3e-3, batch_size=16))
    after = (predict(student, x[y == 0])["pooled"] - target0).pow(2).mean()
    assert after < 0.5 * before


def test_refine_moves_outputs_toward_class_targets():
    x, y = toy((0, 1, 2), n=10)
    adapters = build_adapters(8, TARGETS, 16, 2, seed=0)
    err = lambda: (predict(adapters, x)["pooled"] - TARGETS["pooled"][y]).pow(2).mean()  # noqa: E731
    before = err()
    refine(adapters, x, y, TARGETS, C.spec("train", local_epochs=40, lr=3e-3, batch_size=16))
    assert err() < 0.5 * before


def test_distill_skips_classes_without_a_teacher():
    x, y = toy((0, 1), n=8)
    student = build_adapters(8, TARGETS, 16, 2, seed=9)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loss = distill(student, {0: build_adapters(8, TARGETS, 16, 2, seed=0)}, {0: [0], 1: [5]}, x, y,
                   TARGETS, C.spec("train", local_epochs=2, batch_size=8))
    assert not math.isnan(loss) and any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert math.isnan(distill(student, {}, {0: [0]}, x, y, TARGETS, C.spec("train", local_epochs=1)))  # no teacher at all


def test_reset_of_a_gaussian_measures_quality_on_the_classes_it_knows():
    spec = C.spec("generator", type="gaussian")
    x, y = toy((0,))
    st, _ = train_site_generators({}, set(), x, y, CLASSES, "unified", None, spec, TARGETS, True)
    x2, y2 = toy((0, 1), seed=5)
    resets = {}
    out, _ = train_site_generators(st, {0}, x2, y2, CLASSES, "unified", None, spec, TARGETS, True, resets=resets)
    assert resets["unified"]["why"] == "new classes ['rain']" and resets["unified"]["before"]["frechet"] >= 0
    assert out["unified"]["seen"].tolist() == [0, 1]


def test_quality_before_a_reset_uses_the_kept_statistics_of_classes_that_left_the_stage():
    spec = C.spec("generator", type="cvae", epochs=3)
    x, y = toy((0, 1))
    st, _ = train_site_generators({}, set(), x, y, CLASSES, "unified", None, spec, TARGETS, True)
    x2, y2 = toy((2,), seed=6)  # the next stage: only siren; dog and rain clips are gone
    without, kept = {}, {}
    train_site_generators(st, {0, 1}, x2, y2, CLASSES, "unified", None, spec, TARGETS, True, resets=without)
    train_site_generators(st, {0, 1}, x2, y2, CLASSES, "unified", None, spec, TARGETS, True, resets=kept,
                          moments=class_moments(x, y))
    assert without["unified"]["before"] == {}  # nothing to compare the old state's dog and rain samples with
    before = kept["unified"]["before"]
    assert before["frechet"] > 0 and before["mean_l2"] > 0 and kept["unified"]["after"]["frechet"] > 0
    # it is the old state's quality on dog and rain: a state that never saw them scores far worse there
    never, _ = train_site_generators({}, set(), x2, y2, CLASSES, "unified", None, spec, TARGETS, True)
    assert _quality(never["unified"], spec, class_moments(x, y), [0, 1], TARGETS)["frechet"] > 2 * before["frechet"]


def test_loss_components_per_generator_type():
    x, y = toy((0, 1))
    for kind, parts in (("cvae", {"loss", "recon", "kl", "kl_beta"}), ("gan", {"loss", "adv_g", "adv_d"}),
                        ("gaussian", {"loss"})):
        _, losses = train_site_generators({}, set(), x, y, CLASSES, "unified", None, C.spec("generator", type=kind, epochs=2),
                                          TARGETS, True)
        comps = losses["unified"]
        assert set(comps) == parts, kind
        if kind == "gan":
            assert comps["loss"] == pytest.approx(comps["adv_g"] + comps["adv_d"])
