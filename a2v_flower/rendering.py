"""A render round: images per class from the global adapters beside an oracle image, a grid, a gallery, a judge."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from a2v_flower.diffusion import ImageJudge, Renderer, save_grid, write_gallery
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.names import safe_name
from a2v_flower.replay import class_audio_means

log = logging.getLogger(__name__)


class RoundRenderer:
    """Renders, saves and judges one image per class each `every` rounds; the pipeline loads lazily."""

    def __init__(self, renderer: Renderer, every: int, out_dir: Path, classes: list[str],
                 targets: dict[str, torch.Tensor], judge_id: str | None, free_after: bool = True):
        self.renderer, self.every, self.out_dir = renderer, every, Path(out_dir)
        self.classes, self.targets, self.judge_id, self.free_after = classes, targets, judge_id, free_after

    def due(self, server_round: int, last_round: int) -> bool:
        """Render in every `every`-th round and in the last one (never when every = 0)."""
        return self.every > 0 and server_round > 0 and (server_round % self.every == 0 or server_round == last_round)

    @torch.no_grad()
    def __call__(self, server_round: int, adapters: AdapterSet, class_stats: dict) -> dict:
        """Render the round; return judge metrics of adapter images and oracle images."""
        present, audio = class_audio_means(class_stats, len(self.classes))
        if not present:
            log.warning("round %s: no class statistics yet, nothing to render", server_round)
            return {}
        out = adapters.eval()(audio)                                    # per head (C', ...)
        oracle = {h: t[present] for h, t in self.targets.items()}       # true class text embeddings
        with tqdm(total=2, desc=f"round {server_round} rendering", leave=False) as bar:
            images = self.renderer.render_images(out)
            bar.update()
            oracle_images = self.renderer.render_images(oracle)
            bar.update()
        if self.free_after:
            self.renderer.free()
        folder = self.out_dir / f"round_{server_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        names = [safe_name(self.classes[c], "class") for c in present]
        entries = []
        for name, img, ora in zip(names, images, oracle_images):
            img.save(folder / f"{name}.png")
            ora.save(folder / f"{name}_oracle.png")
            entries += [(f"{name}.png", f"{name}: from audio"), (f"{name}_oracle.png", f"{name}: oracle text")]
        save_grid([(n, [a, b]) for n, a, b in zip(names, images, oracle_images)], folder / "grid.png",
                  ["audio", "oracle"])
        write_gallery(folder, entries)
        judge = ImageJudge.from_pretrained(self.judge_id) if self.judge_id else ImageJudge.tiny()
        metrics = {f"images/{k}": v for k, v in judge.judge(images, present, self.classes).items()}
        metrics |= {f"oracle_images/{k}": v for k, v in judge.judge(oracle_images, present, self.classes).items()}
        log.info("round %s: rendered %d classes into %s (judge accuracy %.2f, oracle %.2f)", server_round,
                 len(present), folder, metrics["images/accuracy"], metrics["oracle_images/accuracy"])
        return metrics
