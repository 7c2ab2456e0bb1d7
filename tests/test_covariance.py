"""Gaussian class models with covariance (generators.covariance, gaussian): what they keep of a class, pooling,
state, bytes, and the differentially private release."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from a2v_flower import config as C
from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.models.generators import (build_generator, condition_for, sample_classes,
                                          train_generator)
from a2v_flower.models.generators import covariance as CV
from a2v_flower.models.generators.gaussian import pool_states

TOKENS = (2, 8)   # (K, D): 16 features
F = TOKENS[0] * TOKENS[1]


def correlated(n: int, seed: int, noise: float = 0.1, classes: int = 2):
    """Classes whose features move together: x = mean_c + A_c u (u in R^3) + noise; targets {"clip": (C, 3, 5)}."""
    g = torch.Generator().manual_seed(100)  # the same classes for every seed; `seed` draws the rows
    means, mix = 3 * torch.randn(classes, F, generator=g), torch.randn(classes, F, 3, generator=g)
    targets = {"clip": torch.randn(classes, 3, 5, generator=g)}
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n)
    x = means[y] + (mix[y] @ torch.randn(len(y), 3, 1, generator=g)).squeeze(-1) + noise * torch.randn(len(y), F,
                                                                                                          generator=g)
    return x.view(-1, *TOKENS), y, targets


def fitted(covariance: str, x, y, targets, **kw):
    spec = C.spec("generator", type="gaussian", covariance=covariance, rank=3, **kw)
    gen = build_generator(spec, TOKENS)
    train_generator(gen, x, y, targets, spec)
    return gen


def draw(gen, targets, c: int, n: int = 6000, seed: int = 1) -> torch.Tensor:
    return sample_classes(gen, targets, torch.full((n,), c), generator=torch.Generator().manual_seed(seed)).flatten(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def raw_moments(gen, c: int, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """A class's mean and (unshrunk) covariance in embedding space, read from the state's statistics."""
    s = gen._slots(condition_for(gen, targets, torch.tensor([c])), 1)[0]
    n, m, sd = gen.count[s], gen.norm.mean.flatten().double(), gen.norm.std.flatten().double()
    mean_z = gen.total[s] / n
    if gen.covariance == "full":
        cov_z = gen.scatter[s] / n - torch.outer(mean_z, mean_z)
    else:
        cov_z = gen.factor[s].double() @ gen.factor[s].double().T / n
    return m + sd * mean_z, cov_z * torch.outer(sd, sd)


@pytest.mark.parametrize("covariance,most", [("diag", None), ("lowrank", 0.1), ("full", 0.1)])
def test_lowrank_and_full_keep_the_correlations_diag_loses(covariance, most):
    x, y, targets = correlated(400, 0)
    gen = fitted(covariance, x, y, targets)
    for c in (0, 1):
        real, fake = x[y == c].flatten(1), draw(gen, targets, c)
        assert rel_err(fake.mean(0), real.mean(0)) < 0.02
        err = rel_err(torch.cov(fake.T), torch.cov(real.T))
        assert err > 0.5 if most is None else err < most, (covariance, c, err)


@pytest.mark.parametrize("covariance", ["lowrank", "full"])
def test_state_round_trip_and_seeded_sampling(covariance, tmp_path):
    x, y, targets = correlated(50, 0)
    gen = fitted(covariance, x, y, targets)
    save_tensors(tmp_path / "g.safetensors", gen.state_tensors())
    copy = build_generator(C.spec("generator", type="gaussian", covariance=covariance, rank=3), TOKENS)
    copy.load_state_tensors(load_tensors(tmp_path / "g.safetensors")[0])
    assert torch.equal(draw(gen, targets, 1, 50), draw(copy, targets, 1, 50))
    assert not torch.equal(draw(gen, targets, 1, 50), draw(gen, targets, 1, 50, seed=2))
    diag = fitted("diag", x, y, targets)
    with pytest.raises(ValueError, match=f"not fitted with generator.covariance='{covariance}'"):
        copy.load_state_tensors(diag.state_tensors())


@pytest.mark.parametrize("covariance,noise,tol", [("full", 0.1, 1e-6), ("lowrank", 0.0, 1e-5), ("lowrank", 0.1, 0.05)])
def test_pooling_two_sites_equals_fitting_their_data_together(covariance, noise, tol):
    """sharing=averaged: full pools sums of outer products (exact); lowrank refits the factor, exact when each
    site's scatter has rank <= r, approximate otherwise (what a site cut stays cut)."""
    (x1, y1, targets), (x2, y2, _) = correlated(60, 1, noise), correlated(90, 2, noise)
    x2 = x2 * 1.5 + 0.5  # another site's standardised space
    pooled = build_generator(C.spec("generator", type="gaussian", covariance=covariance, rank=3), TOKENS)
    pooled.load_state_tensors(pool_states([fitted(covariance, x1, y1, targets).state_tensors(),
                                           fitted(covariance, x2, y2, targets).state_tensors()]))
    whole = fitted(covariance, torch.cat([x1, x2]), torch.cat([y1, y2]), targets)
    for c in (0, 1):
        (m_p, cov_p), (m_w, cov_w) = raw_moments(pooled, c, targets), raw_moments(whole, c, targets)
        assert rel_err(m_p, m_w) < 1e-6  # float32 standardisers: exact to their precision
        assert rel_err(cov_p, cov_w) < tol, (covariance, c, rel_err(cov_p, cov_w))
        if noise:  # the pooled state never loses a feature's variance: the diagonal residual keeps it
            var_p = pooled._moments(condition_for(pooled, targets, torch.tensor([c])), 1)[1][0]
            var_w = whole._moments(condition_for(whole, targets, torch.tensor([c])), 1)[1][0]
            assert rel_err(var_p * pooled.norm.std.flatten().double() ** 2,
                           var_w * whole.norm.std.flatten().double() ** 2) < 1e-5


def test_bytes_per_class_follow_the_covariance():
    x, y, targets = correlated(40, 0)
    per_class = {c: sum(v.numel() * v.element_size() for k, v in fitted(c, x, y, targets).state_tensors().items()
                        if k.startswith("model.") and not k.startswith("model.norm")) / 2 for c in CV.COVARIANCES}
    key, base = 32 * 4, 8 + 2 * 8 * F                                  # condition key; count, sum, squares (float64)
    assert per_class == {"diag": key + base, "lowrank": key + base + 4 * F * 3, "full": key + base + 8 * F * F}


def test_shrinkage_is_chosen_from_the_data_and_keeps_the_diagonal():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2000, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    cov = torch.cov(rows.T)
    few, rho_few = CV.shrink_to_diagonal(torch.cov(rows[:25].T), 25)
    many, rho_many = CV.shrink_to_diagonal(cov, 2000)
    assert 0 <= rho_many < 0.05 < rho_few <= 1           # few rows: shrink hard; many: trust the estimate
    assert torch.allclose(few.diagonal(), torch.cov(rows[:25].T).diagonal())
    assert rel_err(many, cov) < 0.05
    assert torch.linalg.eigvalsh(few).min() > 0           # 25 rows of 20 features: shrunk to positive definite


def test_top_factor_and_merge_are_exact_up_to_the_rank():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 12, generator=g, dtype=torch.float64), torch.randn(30, 12, generator=g, dtype=torch.float64)
    a, b = a @ torch.randn(12, 30, generator=g, dtype=torch.float64)[:, :30], b @ torch.randn(12, 30, generator=g,
                                                                                               dtype=torch.float64)
    both = torch.cat([a, b])
    scatter = lambda r: (r - r.mean(0)).T @ (r - r.mean(0))  # noqa: E731
    w = CV.merge_factor(40, a.mean(0), CV.top_factor((a - a.mean(0)).T, 30), 30, b.mean(0), (b - b.mean(0)).T, 30)
    assert rel_err(w @ w.T, scatter(both)) < 1e-9                       # rank 30 of a 30-dim space: exact
    w = CV.top_factor((both - both.mean(0)).T, 5)
    vals = torch.linalg.eigvalsh(scatter(both)).flip(0)
    assert torch.allclose(torch.linalg.eigvalsh(w @ w.T).flip(0)[:5], vals[:5])  # the top 5 directions


def test_dp_sigma_is_the_zcdp_gaussian_mechanism():
    log_d = math.log(1 / CV.DP_DELTA)
    rho = (math.sqrt(log_d + 1.0) - math.sqrt(log_d)) ** 2
    assert CV.dp_sigma(1.0) == pytest.approx(math.sqrt(3) / math.sqrt(2 * rho))
    assert CV.dp_sigma(1.0) == pytest.approx(2 * CV.dp_sigma(2.0), rel=0.1)  # noise ~ 1 / epsilon
    assert CV.dp_sigma(0.5) > CV.dp_sigma(1.0) > CV.dp_sigma(8.0)


def test_private_sums_clip_each_row_and_add_noise_of_the_stated_scale():
    x = torch.zeros(50, F, dtype=torch.float64)
    x[0, 0] = 1000.0                                                   # one outlier row: clipped to the bound
    n, s, q = CV.private_sums(x, 2.0, 1e9, True, torch.Generator().manual_seed(0))  # epsilon huge: no noise
    assert n == pytest.approx(50, abs=1e-3) and s[0].item() == pytest.approx(2.0, abs=1e-3) and q[0, 0].item() == pytest.approx(4.0, abs=1e-3)
    draws = torch.stack([CV.private_sums(x, 2.0, 1.0, False, torch.Generator().manual_seed(i))[1] for i in range(200)])
    assert draws[:, 1:].std().item() == pytest.approx(CV.dp_sigma(1.0) * 2.0, rel=0.1)
    _, _, q = CV.private_sums(x, 2.0, 1.0, True, torch.Generator().manual_seed(0))
    assert torch.equal(q, q.T)                                         # symmetric noise on outer products


@pytest.mark.parametrize("covariance", CV.COVARIANCES)
def test_dp_release_is_noisy_once_and_costs_less_at_larger_epsilon(covariance):
    x, y, targets = correlated(300, 0)
    clip = x.flatten(1).norm(dim=1).max().item()                       # no row clipped: only the noise differs
    errs = {}
    for eps in (0.5, 50.0):
        gen = fitted(covariance, x, y, targets, dp_epsilon=eps, dp_clip=clip)
        assert torch.equal(gen.norm.mean, torch.zeros(TOKENS)) and torch.equal(gen.norm.std, torch.ones(TOKENS))
        errs[eps] = rel_err(draw(gen, targets, 0).mean(0), x[y == 0].flatten(1).mean(0))
        before = {k: v.clone() for k, v in gen.state_tensors().items() if k.startswith("model.")}
        train_generator(gen, x, y, targets, C.spec("generator", type="gaussian"))  # a second round: released once
        assert all(torch.equal(v, gen.state_tensors()[k]) for k, v in before.items())
    assert errs[50.0] < 0.05 < errs[0.5], errs


def _doc_commands() -> list[list[str]]:
    """Overrides of every `a2v-run ...` line of docs/label-skew.md (the page this feature's users read)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "label-skew.md").read_text()
    return [shlex.split(line.split("#")[0]) for line in re.findall(r"^\s*a2v-run(.*)$", text, flags=re.M)]


def test_the_label_skew_page_has_commands():
    assert len(_doc_commands()) >= 3


@pytest.mark.parametrize("overrides", _doc_commands())
def test_every_label_skew_command_composes(overrides, make_cfg):
    C.validate(make_cfg(*overrides))


def test_dp_with_sequential_sharing_is_refused_before_start(make_cfg):
    """A class is released once: a site handed a state that holds it would skip its own clips of it."""
    with pytest.raises(ValueError, match=r"generator.dp_epsilon=1.0 is not allowed with sharing.mode='sequential'"):
        C.validate(make_cfg("generator=gaussian", "generator.dp_epsilon=1.0", "sharing=sequential"))
    C.validate(make_cfg("generator=gaussian", "generator.dp_epsilon=1.0", "sharing=averaged"))
