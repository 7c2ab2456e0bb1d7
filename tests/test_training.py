"""Adapter training: MSE and contrastive losses (SD's one head, FLUX's two), FedProx, restricted softmax, kd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from a2v_flower import config as C
from a2v_flower.metrics import retrieval, similarity
from a2v_flower.models.adapters import build_adapters, embedding_moments, input_norm
from a2v_flower.server_generators import distill
from a2v_flower.training import adapter_loss, contrastive_logits, predict, train_adapters

G = torch.Generator().manual_seed(0)
SD = {"clip": torch.randn(5, 4, 16, generator=G)}                                # 5 classes, 4 tokens x 16
FLUX = {"t5": torch.randn(5, 3, 24, generator=G), "pooled": torch.randn(5, 16, generator=G)}


def toy(classes=(0, 1, 2, 3, 4), n=12, seed=0):
    """n clips per class: (N, 4, 8) tokens around a class centre, labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([c for c in classes for _ in range(n)])
    centres = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1)) * 3
    return centres[y] + 0.3 * torch.randn(len(y), 4, 8, generator=g), y


@pytest.mark.parametrize("targets", [SD, FLUX], ids=["sd", "flux"])
def test_contrastive_gradient_moves_toward_own_target_and_away_from_the_others(targets):
    out = {h: torch.randn(1, *t.shape[1:], generator=torch.Generator().manual_seed(3)).requires_grad_()
           for h, t in targets.items()}
    y = torch.tensor([2])
    adapter_loss(out, y, targets, C.spec("train", loss="contrastive", temperature=0.1)).backward()
    assert all(o.grad.abs().sum() > 0 for o in out.values())  # every head gets a gradient
    stepped = {h: (o - 0.05 * o.grad).detach() for h, o in out.items()}
    before, after = similarity({h: o.detach() for h, o in out.items()}, targets)[0], similarity(stepped, targets)[0]
    others = [c for c in range(5) if c != 2]
    assert after[2] > before[2]                                   # toward its own target
    assert after[others].mean() < before[others].mean()           # away from the others on average
    hardest = others[int(before[others].argmax())]
    assert after[hardest] < before[hardest]                       # and from the nearest wrong class


@pytest.mark.parametrize("kind", ["attention", "lowrank"])
@pytest.mark.parametrize("targets", [SD, FLUX], ids=["sd", "flux"])
@pytest.mark.parametrize("loss", ["contrastive", "mse+contrastive"])
def test_contrastive_training_retrieves_every_class(targets, loss, kind):
    x, y = toy()
    adapters = build_adapters(8, targets, 16, 2, seed=0, kind=kind, rank=4)
    train_adapters(adapters, x, y, targets, C.spec("train", local_epochs=30, batch_size=16, lr=3e-3, loss=loss, temperature=0.1))
    assert retrieval(predict(adapters, x), y, targets)["top1"] == 1.0


def test_mse_is_the_mean_squared_error_summed_over_heads():
    out = {h: torch.randn(2, *t.shape[1:], generator=torch.Generator().manual_seed(4)) for h, t in FLUX.items()}
    y = torch.tensor([0, 3])
    want = sum(F.mse_loss(out[h], FLUX[h][y]) for h in FLUX)
    assert torch.allclose(adapter_loss(out, y, FLUX, C.spec("train", loss="mse")), want)
    both = adapter_loss(out, y, FLUX, C.spec("train", loss="mse+contrastive", temperature=0.5))
    assert torch.allclose(both, want + F.cross_entropy(similarity(out, FLUX) / 0.5, y))


def test_restricted_softmax_scales_only_the_absent_classes_logits():
    out = {"clip": torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(5))}
    present = torch.tensor([True, True, False, False, True])
    full = contrastive_logits(out, SD, 0.1)
    restricted = contrastive_logits(out, SD, 0.1, present, absent_scale=0.5)
    assert torch.equal(restricted[:, present], full[:, present])
    assert torch.allclose(restricted[:, ~present], 0.5 * full[:, ~present])


def test_restricted_softmax_changes_training_of_a_site_missing_classes():
    x, y = toy(classes=(0, 1))
    runs = {}
    for scale in (1.0, 0.0):
        adapters = build_adapters(8, SD, 16, 2, seed=0)
        train_adapters(adapters, x, y, SD, C.spec("train", local_epochs=2, batch_size=8, loss="contrastive", absent_scale=scale))
        runs[scale] = predict(adapters, x)["clip"]
    assert not torch.allclose(runs[1.0], runs[0.0])


def test_proximal_term_keeps_weights_near_the_received_ones():
    x, y = toy(classes=(0, 1))
    start = build_adapters(8, SD, 16, 2, seed=0)
    drift = {}
    for mu in (0.0, 10.0):
        adapters = build_adapters(8, SD, 16, 2, seed=0)
        train_adapters(adapters, x, y, SD, C.spec("train", local_epochs=5, batch_size=8, lr=3e-3, proximal_mu=mu))
        drift[mu] = sum((p - q).pow(2).sum() for p, q in zip(adapters.parameters(), start.parameters()))
    assert drift[10.0] < 0.5 * drift[0.0]


def test_contrastive_kd_matches_the_teachers_softmax():
    x, y = toy(n=8)
    teacher = build_adapters(8, SD, 16, 2, seed=1)
    train_adapters(teacher, x, y, SD, C.spec("train", local_epochs=20, batch_size=16, lr=3e-3, loss="contrastive"))
    student = build_adapters(8, SD, 16, 2, seed=9)
    p = contrastive_logits(predict(teacher, x), SD, 0.1).softmax(1)

    def kl() -> float:
        return F.kl_div(contrastive_logits(predict(student, x), SD, 0.1).log_softmax(1), p, reduction="batchmean")

    before = kl()
    distill(student, {0: teacher}, {c: [0] for c in range(5)}, x, y, SD,
            C.spec("train", local_epochs=30, batch_size=16, lr=3e-3, loss="contrastive"))
    assert kl() < 0.2 * before


def test_attention_adapter_projects_its_queries_once_and_matches_multihead_attention():
    head = build_adapters(8, SD, 16, 2, seed=0)["clip"].train()
    x = toy()[0][:5]
    kv, q = head.inp(x), head.queries.unsqueeze(0).expand(5, -1, -1)  # the per-sample form it replaced
    h = q + head.attn(q, kv, kv, need_weights=False)[0]
    want = head.shift + head.scale * head.out(h + head.mlp(h))
    assert torch.allclose(head(x), want, atol=1e-6)


def test_lowrank_adapter_has_fewer_parameters_and_refuses_an_unknown_kind():
    count = {k: sum(p.numel() for p in build_adapters(64, {"clip": torch.randn(3, 77, 768)}, 256, 4, 0, kind=k)
                    .parameters()) for k in ("attention", "lowrank")}
    assert count == {"attention": 760_448, "lowrank": 371_392}
    with pytest.raises(ValueError, match=r"adapter.kind='mlp' is not allowed; expected one of \['attention'"):
        build_adapters(8, SD, 16, 2, seed=0, kind="mlp")


def test_adamw_takes_torchs_steps_without_importing_dynamo():
    """training.AdamW matches torch.optim.AdamW step for step (weight decay, moments, a parameter without a
    gradient in one step), and training adapters never imports torch._dynamo (torch.optim would: ~1.4 s of
    CPU in each ClientApp process)."""
    import subprocess
    import sys

    from a2v_flower.training import AdamW

    ours, theirs = (build_adapters(8, SD, 16, 2, seed=0, kind="attention") for _ in range(2))
    opt_ours = AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = toy()
    for step in range(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            adapter_loss(model(x[step::5]), y[step::5], SD, C.spec("train")).backward()
            if step == 2:  # a parameter skipped in one step keeps its own step count, as in torch
                next(model.parameters()).grad = None
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    code = ("import sys, torch; from a2v_flower.models.adapters import build_adapters; "
            "from a2v_flower.schema import TrainSpec; from a2v_flower.training import train_adapters; "
            "t = {'clip': torch.randn(5, 4, 16)}; "
            "train_adapters(build_adapters(8, t, 16, 2, 0), torch.randn(20, 4, 8), torch.arange(20) % 5, t, "
            "TrainSpec(local_epochs=1, batch_size=16, lr=1e-3, weight_decay=0.0, cosine_weight=0.0, grad_clip=1.0, "
            "loss='mse', temperature=0.1, proximal_mu=0.0, absent_scale=1.0)); print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_input_norm_pools_the_sites_moments_exactly():
    """The server's standardisation from the sites' (count, sum, sum of squares) is the mean and std of all their
    embeddings together; no labels travel."""
    x = torch.randn(50, 3, 4, generator=torch.Generator().manual_seed(0)) * 3 + 7
    norm = input_norm([embedding_moments(x[:20]), embedding_moments(x[20:])])
    assert set(embedding_moments(x)) == {"count", "sum", "sum_sq"}
    assert torch.allclose(norm["mean"], x.mean(0), atol=1e-5)
    assert torch.allclose(norm["std"], x.std(0, unbiased=False), atol=1e-5)
    with pytest.raises(ValueError, match="no embeddings"):
        input_norm([])


def test_standardised_adapters_ignore_an_offset_every_clip_shares():
    """Real embeddings share a large per-dimension offset (mean pairwise cosine 0.998 on real recordings): with the
    federation's standardisation the adapters see the same input whatever that offset is."""
    x, y = toy()
    offset = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(1)) * 50
    outs = []
    for data in (x, x + offset):
        adapters = build_adapters(8, SD, 16, 2, seed=0, kind="lowrank", rank=4,
                                  norm=input_norm([embedding_moments(data)]))
        outs.append(predict(adapters, data)["clip"])
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    raw = build_adapters(8, SD, 16, 2, seed=0, kind="lowrank", rank=4)
    assert raw.input_norm() is None and not torch.allclose(predict(raw, x + offset)["clip"], outs[0], atol=1e-2)


@pytest.mark.parametrize("kind", ["attention", "lowrank"])
def test_token_embedding_tells_the_audio_tokens_apart(kind):
    """Attention pooling alone treats the K tokens as a set (an order swap changes nothing); with the token embedding
    (model.audio.tokens, adapter.token_embedding) the adapters know which token holds what, and refuse another K."""
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))
    swapped = x[:, [1, 0, 2, 3]]
    blind = build_adapters(8, SD, 16, 2, seed=0, kind=kind, rank=4)
    assert torch.allclose(predict(blind, x)["clip"], predict(blind, swapped)["clip"], atol=1e-5)
    told = build_adapters(8, SD, 16, 2, seed=0, kind=kind, rank=4, tokens=4)
    assert {n for n, _ in told.named_parameters() if "token_embedding" in n} == {"clip.token_embedding"}
    assert not torch.allclose(predict(told, x)["clip"], predict(told, swapped)["clip"], atol=1e-3)
    with pytest.raises(ValueError, match="built for 4 audio tokens .* got 3"):
        told(x[:, :3])
