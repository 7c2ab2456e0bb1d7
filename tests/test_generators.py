"""Generators: each type learns a toy two-class set; conditions, KL schedule, state, granularity, quality."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from a2v_flower import config as C
from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.models import generators as G
from a2v_flower.models.generators import fitting
from a2v_flower.models.generators import (build_generator, class_condition, generator_keys,
                                          key_for, kl_beta, sample_classes,
                                          sample_quality, train_generator)

TOKENS = (4, 8)   # (K, D)
SMALL = dict(hidden=64, latent_dim=8, batch_size=32, lr=3e-3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLPs: intra-op threads only add contention (many-fold slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy(n_per_class: int = 64, seed: int = 0):
    """Two well-separated classes: means ~8 apart, within-class noise std 0.3; targets {"clip": (2, 3, 5)}."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(2, *TOKENS, generator=g)                       # (2, K, D)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = means[y] + 0.3 * torch.randn(len(y), *TOKENS, generator=g)     # (N, K, D)
    return x, y, {"clip": torch.randn(2, 3, 5, generator=g)}, means


def mean_dist(samples: torch.Tensor, centre: torch.Tensor) -> float:
    """Mean L2 distance of flattened samples to a (K, D) centre."""
    return (samples - centre).flatten(1).norm(dim=1).mean().item()


# ---- every type learns the classes --------------------------------------------------------------

@pytest.mark.parametrize("kind,epochs", [("cvae", 60), ("gan", 150), ("gaussian", 1)])
def test_conditional_types_sample_near_their_own_class(kind, epochs):
    x, y, targets, means = toy()
    spec = C.spec("generator", type=kind, epochs=epochs, **SMALL)
    gen = build_generator(spec, TOKENS)
    train_generator(gen, x, y, targets, spec)
    for c in (0, 1):
        s = sample_classes(gen, targets, torch.full((200,), c), generator=torch.Generator().manual_seed(1))
        assert s.shape == (200, *TOKENS)
        own, other = mean_dist(s, means[c]), mean_dist(s, means[1 - c])
        assert own < 0.5 * other, (kind, c, own, other)
        spread = s.std(0).mean() / x[y == c].std(0).mean()              # not collapsed, not exploded
        assert 0.05 < spread < 2.0, (kind, c, spread.item())


def test_unconditioned_vae_per_class_samples_near_its_class():
    x, y, targets, means = toy()
    spec = C.spec("generator", type="vae", epochs=60, **SMALL)
    for c in (0, 1):
        gen = build_generator(spec, TOKENS)
        train_generator(gen, x[y == c], y[y == c], targets, spec)
        s = gen.sample(200, generator=torch.Generator().manual_seed(1))
        assert mean_dist(s, means[c]) < 0.5 * mean_dist(s, means[1 - c])
        spread = s.std(0).mean() / x[y == c].std(0).mean()              # not collapsed, not exploded
        assert 0.05 < spread < 2.0, spread.item()


# ---- conditions ---------------------------------------------------------------------------------

def test_class_condition_is_deterministic_unit_norm_and_distinct():
    g = torch.Generator().manual_seed(0)
    targets = {"t5": torch.randn(3, 4, 16, generator=g), "pooled": torch.randn(3, 12, generator=g)}
    ids = torch.tensor([2, 0, 1, 2])
    a, b = class_condition(targets, ids, dim=16), class_condition(targets, ids, dim=16)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(4))
    assert torch.equal(a[0], a[3]) and not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])
    assert not torch.allclose(a, class_condition(targets, ids, dim=16, seed=1))
    with pytest.raises(ValueError, match="out of range"):
        class_condition(targets, torch.tensor([3]))


def test_class_condition_is_the_same_whether_its_projection_is_kept_or_drawn_in_chunks(monkeypatch):
    from a2v_flower.models.generators import base

    g = torch.Generator().manual_seed(0)
    targets = {"t5": torch.randn(3, 40, 16, generator=g), "pooled": torch.randn(3, 12, generator=g)}
    kept = class_condition(targets, torch.arange(3))                    # projections kept per process
    monkeypatch.setattr(base, "_PROJECTION_CHUNK", 100)                 # a wide head: several chunks, none kept
    monkeypatch.setattr(base, "_PROJECTION_CACHE_BYTES", 0)
    base._projection.cache_clear()
    assert torch.equal(class_condition(targets, torch.arange(3)), kept)


def test_class_condition_removes_the_shared_template_part():
    g = torch.Generator().manual_seed(0)
    shared = 100 * torch.randn(1, 6, 10, generator=g)                   # "a photo of a ..." dominates
    targets = {"clip": shared + torch.randn(3, 6, 10, generator=g)}
    cond = class_condition(targets, torch.arange(3))
    assert (cond @ cond.T - torch.eye(3)).abs().max() < 0.9             # classes stay apart


def test_cvae_uses_class_condition_in_fit_and_sample(monkeypatch):
    x, y, targets, _ = toy(16)
    calls = []

    def spy(class_targets, class_ids, dim=G.CONDITION_DIM, seed=0):
        calls.append((dim, seed))
        return real(class_targets, class_ids, dim, seed)

    real = G.class_condition
    monkeypatch.setattr(fitting, "class_condition", spy)
    spec = C.spec("generator", type="cvae", epochs=2, **SMALL)
    gen = build_generator(spec, TOKENS)
    seen = {"fit": [], "sample": []}
    fit, sample = gen.fit_batch, gen.sample
    gen.fit_batch = lambda xb, cond, **kw: seen["fit"].append(cond) or fit(xb, cond, **kw)
    gen.sample = lambda n, cond, **kw: seen["sample"].append(cond) or sample(n, cond, **kw)

    train_generator(gen, x, y, targets, spec)
    n_train_calls = len(calls)
    sample_classes(gen, targets, torch.tensor([1, 1, 1]))
    assert n_train_calls >= 1 and len(calls) > n_train_calls
    assert len(set(calls)) == 1                                         # same dim and seed both times
    table = real(targets, torch.arange(2), gen.cond_dim)                # (2, cond_dim)
    for cond in seen["fit"]:
        assert all(any(torch.equal(row, t) for t in table) for row in cond)
    assert torch.equal(seen["sample"][0], table[[1, 1, 1]])


# ---- KL warm-up ---------------------------------------------------------------------------------

def test_kl_beta_ramps_to_kl_weight_at_ceil_warmup_epochs():
    epochs, warmup, weight = 10, 0.25, 1e-2                             # ceil(2.5) = 3
    betas = [kl_beta(e, epochs, warmup, weight) for e in range(epochs)]
    assert betas[0] == 0.0 and 0 < betas[1] < betas[2] < weight
    assert betas[3] == weight and all(b == weight for b in betas[3:])
    assert kl_beta(0, epochs, 0.0, weight) == weight                    # no warm-up: full weight at once

    x, y, targets, _ = toy(8)
    spec = C.spec("generator", type="cvae", epochs=epochs, kl_warmup=warmup, kl_weight=weight, **SMALL)
    history = train_generator(build_generator(spec, TOKENS), x, y, targets, spec)
    assert [h["kl_beta"] for h in history] == betas
    assert all({"recon", "kl"} <= set(h) for h in history)


# ---- state round trip ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["vae", "cvae", "gan", "gaussian"])
def test_state_round_trip_keeps_samples_and_optimizer(kind, tmp_path):
    x, y, targets, _ = toy(16)
    spec = C.spec("generator", type=kind, epochs=2, **SMALL)
    gen = build_generator(spec, TOKENS)
    train_generator(gen, x, y, targets, spec)
    state = gen.state_tensors()
    assert {"model.norm.mean", "model.norm.std", "rng"} <= set(state)
    if kind != "gaussian":
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert any(k.startswith("optim.") and k.endswith(key) for k in state), key
    save_tensors(tmp_path / "gen.safetensors", state)
    loaded, _ = load_tensors(tmp_path / "gen.safetensors")

    copy = build_generator(C.spec("generator", type=kind, epochs=2, **{**SMALL, "seed": 7}), TOKENS)
    ids = torch.tensor([0, 1, 0, 1])
    draw = lambda g: sample_classes(g, targets, ids, generator=torch.Generator().manual_seed(3))  # noqa: E731
    if kind != "gaussian":                                              # differs before loading
        assert not torch.allclose(draw(gen), draw(copy))
    copy.load_state_tensors(loaded)
    assert torch.equal(draw(gen), draw(copy))

    cond = G.condition_for(gen, targets, y[:8])
    steps = lambda g: [g.fit_batch(x[:8], cond, kl_beta=0.01) for _ in range(2)]  # noqa: E731
    assert steps(gen) == steps(copy)
    if kind != "gaussian":                                              # the optimizer state matters
        fresh = build_generator(spec, TOKENS)
        fresh.load_state_tensors({k: v for k, v in loaded.items() if not k.startswith("optim.")})
        copy.load_state_tensors(loaded)
        assert steps(fresh)[1] != steps(copy)[1]


def test_load_rejects_unknown_keys():
    gen = build_generator(C.spec("generator", type="cvae", **SMALL), TOKENS)
    with pytest.raises(ValueError, match="unexpected generator state keys"):
        gen.load_state_tensors({**gen.state_tensors(), "optim.opt.nope.exp_avg": torch.zeros(1)})


# ---- training loop ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,passes", [("vae", 3), ("gan", 3), ("gaussian", 1)])
def test_training_is_minibatched(kind, passes, monkeypatch):
    x, y, targets, _ = toy(25)                                          # N = 50
    spec = C.spec("generator", type=kind, epochs=3, **{**SMALL, "batch_size": 16})
    gen = build_generator(spec, TOKENS)
    sizes, fit = [], gen.fit_batch
    monkeypatch.setattr(gen, "fit_batch", lambda xb, cond, **kw: sizes.append(len(xb)) or fit(xb, cond, **kw))
    history = train_generator(gen, x, y, targets, spec)
    if kind == "gaussian":  # moments: every row in one batch (an exact factor, one private release per class)
        assert sizes == [50] and len(history) == passes
        return
    assert sizes == [16, 16, 16, 2] * passes == [16, 16, 16, 2] * len(history)
    assert len(sizes) == passes * math.ceil(50 / 16)
    if kind == "gan":
        assert {"adv_g", "adv_d"} <= set(history[-1])


def test_gan_clips_both_networks(monkeypatch):
    x, y, targets, _ = toy(8)
    gen = build_generator(C.spec("generator", type="gan", **SMALL), TOKENS)
    gen.norm.fit(x)
    clipped, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda ps, m: clipped.append({id(p) for p in ps}) or clip(ps, m))
    gen.fit_batch(x, G.condition_for(gen, targets, y))
    assert {id(p) for p in gen.d_net.parameters()} in clipped
    assert {id(p) for p in gen.g_net.parameters()} in clipped


def test_early_stopping_stops_and_restores_best_epoch(monkeypatch):
    x, y, targets, _ = toy(8)
    spec = C.spec("generator", type="cvae", epochs=10, early_stopping_patience=2, **SMALL)
    gen = build_generator(spec, TOKENS)
    scores, snapshots = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9]), []

    def fake_val(xv, cond):
        snapshots.append(gen.state_tensors()["model.dec.4.weight"])
        return next(scores)

    monkeypatch.setattr(gen, "val_loss", fake_val)
    history = train_generator(gen, x, y, targets, spec, val=(x, y))
    assert [h["val"] for h in history] == [1.0, 0.5, 0.6, 0.7]          # stops after 2 stale epochs
    assert torch.equal(gen.dec[4].weight, snapshots[1])                 # best epoch's weights back


# ---- specs and granularity ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"type": "diffusion"}, "Could not find 'generator/diffusion'; Available options in 'generator': cvae, gan"),
    ({"lr": 0.0}, "generator.lr=0.0"),
    ({"kl_warmup": 1.5}, "generator.kl_warmup=1.5"),
    ({"grad_clip": -1.0}, "generator.grad_clip=-1.0"),
    ({"type": "gaussian", "covariance": "sparse"}, r"generator.covariance='sparse' is not allowed; expected one of "
                                                    r"\['diag', 'lowrank', 'full'\]"),
    ({"type": "gaussian", "rank": 0}, "generator.rank=0 is not allowed"),
    ({"type": "gaussian", "dp_epsilon": 0.0}, "generator.dp_epsilon=0.0 is not allowed; expected null or > 0"),
    ({"type": "cvae", "dp_epsilon": 1.0}, "generator.dp_epsilon=1.0 is not allowed; .* with generator=gaussian"),
    ({"type": "gaussian", "dp_epsilon": 1.0, "dp_clip": -1.0}, "generator.dp_clip=-1.0 is not allowed"),
])
def test_spec_validation(kwargs, needle, make_cfg):
    overrides = [f"generator.{k}={v}" for k, v in kwargs.items() if k != "type"]
    with pytest.raises(ValueError, match=needle):
        C.validate(make_cfg(f"generator={kwargs.get('type', 'cvae')}", *overrides))


CLASSES = ["dog", "cat", "rain", "sea"]


def test_generator_keys_and_key_for():
    groups = {"animals": ["dog", "cat"], "water": ["rain", "sea"]}
    assert generator_keys("unified", CLASSES) == {"unified": CLASSES}
    assert generator_keys("per_class", CLASSES) == {c: [c] for c in CLASSES}
    assert generator_keys("per_group", CLASSES, groups) == groups
    assert key_for("unified", "sea") == "unified"
    assert key_for("per_class", "sea") == "sea"
    assert key_for("per_group", "sea", groups) == "water"


@pytest.mark.parametrize("granularity,groups,needle", [
    ("per_sample", None, "granularity.granularity='per_sample'.*'unified', 'per_class', 'per_group'"),
    ("per_group", {"a": ["dog", "cat"], "b": ["cat", "rain", "sea"]},
     "'cat' is in granularity.groups.a and granularity.groups.b"),
    ("per_group", {"a": ["dog", "cat"], "b": ["rain"]}, r"\['sea'\] are in no group"),
    ("per_group", {"a": ["dog", "cat", "owl"], "b": ["rain", "sea"]}, "unknown class 'owl'.*known classes"),
    ("per_group", {"a": CLASSES, "b": []}, r"granularity.groups.b=\[\] is empty"),
    ("per_group", None, "granularity.groups is empty"),
])
def test_generator_keys_rejects_bad_settings(granularity, groups, needle):
    with pytest.raises(ValueError, match=needle):
        generator_keys(granularity, CLASSES, groups)


def test_key_for_rejects_ungrouped_class_and_bad_granularity():
    with pytest.raises(ValueError, match="'owl' is in no group"):
        key_for("per_group", "owl", {"a": ["dog"]})
    with pytest.raises(ValueError, match="granularity.granularity='global'"):
        key_for("global", "dog")


# ---- quality and sizes --------------------------------------------------------------------------

def test_sample_quality_identical_shifted_and_frechet():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 2, 3, generator=g) + 1.0                     # N = 40 > 6 features: full covariance
    same = sample_quality(real, real.clone())
    assert same["frechet_kind"] == "full"
    assert same["mean_l2"] < 1e-9 and abs(same["frechet"]) < 1e-6
    assert same["precision"] == 1.0 and same["coverage"] == 1.0
    assert same["diversity_fake"] == pytest.approx(same["diversity_real"])

    collapsed = sample_quality(real, real[:1].repeat(30, 1, 1))        # mode collapse: precise, not covering
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] < 0.2 and collapsed["diversity_fake"] == 0.0

    far = sample_quality(real, real + 10.0)
    assert far["mean_l2"] == pytest.approx(10 * math.sqrt(6)) and far["precision"] == 0.0 and far["coverage"] == 0.0

    # Fréchet(real, 2 * real) = |mu|^2 + tr(S) for both covariance kinds
    flat = real.flatten(1).double()
    expected = (flat.mean(0).pow(2).sum() + torch.cov(flat.T).trace()).item()
    assert sample_quality(real, 2 * real)["frechet"] == pytest.approx(expected, rel=1e-6)
    few = sample_quality(real[:5], 2 * real[:5])                        # N = 5 < 6 features: diagonal
    flat5 = flat[:5]
    assert few["frechet_kind"] == "diag"
    assert few["frechet"] == pytest.approx((flat5.mean(0).pow(2).sum() + flat5.var(0).sum()).item(), rel=1e-6)
