"""Render rounds: due only when configured, lazy pipeline, files written, judged."""

from __future__ import annotations

import re

import torch
from PIL import Image

from a2v_flower import config as C
from a2v_flower.rendering import pipelines
from a2v_flower.rendering.pipelines import Renderer
from a2v_flower.models.adapters import build_adapters
from a2v_flower.rendering.rounds import RoundRenderer
from a2v_flower.server_generators import class_audio_means


def stats(counts, k=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"counts": torch.tensor(counts, dtype=torch.float)}
    for c, n in enumerate(counts):
        if n:
            out[f"audio_mean/{c}"] = torch.randn(k, d, generator=g)
    return out


def test_class_means_are_count_weighted():
    a, b = stats([2, 0, 1]), stats([2, 6, 0], seed=1)
    present, means = class_audio_means({0: a, 1: b}, 3)
    assert present == [0, 1, 2]
    assert torch.allclose(means[0], (a["audio_mean/0"] + b["audio_mean/0"]) / 2)
    assert torch.allclose(means[1], b["audio_mean/1"])


def test_render_round_is_lazy_and_writes_outputs(tmp_path):
    classes = ["dog", "rain", "siren"]
    targets = {"clip": torch.randn(3, 77, 768)}
    adapters = build_adapters(16, targets, 32, 2, 0)
    rr = RoundRenderer(Renderer(C.spec("diffusion")), every=2, out_dir=tmp_path, classes=classes,
                       targets=targets, judge_id=None)
    assert [r for r in range(1, 6) if rr.due(r, last_round=5)] == [2, 4, 5]
    assert not RoundRenderer(rr.renderer, every=0, out_dir=tmp_path, classes=classes, targets=targets,
                             judge_id=None).due(5, 5)
    assert rr.renderer.pipe is None  # nothing built before a render round
    built = pipelines.PIPELINES_BUILT
    metrics = rr(2, adapters, {0: stats([1, 1, 0])}, last_round=5)
    assert pipelines.PIPELINES_BUILT == built + 1 and rr.renderer.pipe is None  # built once, freed after
    folder = tmp_path / "round_002"
    for name in ("dog.png", "dog_oracle.png", "rain.png", "grid.png", "index.html"):
        assert (folder / name).is_file(), name
    assert not (folder / "siren.png").exists()  # no statistics for siren yet
    assert 0 <= metrics["images/accuracy"] <= 1 and 0 <= metrics["oracle_images/macro_f1"] <= 1
    with Image.open(folder / "grid.png") as grid:
        assert grid.height >= 2 * 128  # two classes, cells of at least 128 px
    page = (folder / "index.html").read_text()
    # audio and oracle side by side per class, with the judge's predicted class and score, and round navigation
    judged = judge_rows(page)
    assert [row[0] for row in judged] == ["dog", "rain"]
    assert all(row[1] == f'{row[0]}.png' and row[3] == f'{row[0]}_oracle.png' for row in judged)
    assert all(re.fullmatch(r"[✓✗] (dog|rain|siren) \(-?\d+\.\d\)", row[k]) for row in judged for k in (2, 4))
    accuracy = sum(row[2].startswith("✓") for row in judged) / 2
    assert accuracy == metrics["images/accuracy"] and f"judge accuracy {accuracy:.2f}" in page
    assert '"../round_004/index.html">next: round 4' in page and "previous" not in page
    assert rr.neighbours(5, 5) == {"previous: round 4": "../round_004/index.html"}


def judge_rows(page: str) -> list[list[str]]:
    """Cells of the gallery table's rows (an image cell as its file name)."""
    rows = re.findall(r"<tr>(.*?)</tr>", page)[1:]
    return [[img or text for img, text in re.findall(r'<td>(?:<a href="[^"]*"><img src="([^"]*)"[^>]*></a>|([^<]*))</td>',
                                                       row)] for row in rows]


def test_sites_render_held_out_clips_only_in_render_rounds(make_cfg, tmp_path, task_identity):
    import json

    from tests.inprocess import run_server

    cfg = make_cfg("num_rounds=2", "diffusion.render_every=2", "diffusion.clip_images=3", "train.local_epochs=1")
    built = pipelines.PIPELINES_BUILT
    run_server(cfg, tmp_path / "run")
    images = tmp_path / "run" / "images"
    assert not (images / "round_001").exists()  # not a render round
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    held_out = {int(s): v["n"] for s, v in evals[-1]["sites"].items()}
    for site, n in held_out.items():
        folder = images / "round_002" / f"site_{site}"
        clips = sorted(p.name for p in folder.glob("clip_*.png"))
        assert len(clips) == min(3, n) and (folder / "grid.png").is_file() and (folder / "index.html").is_file()
    assert pipelines.PIPELINES_BUILT == built + len(held_out) + 1  # one per site and one on the server, round 2
    assert [r["clip_images"] for r in evals] == [0, sum(min(3, n) for n in held_out.values())]
