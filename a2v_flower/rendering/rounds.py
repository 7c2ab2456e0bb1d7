"""A render round: images per class from the global adapters beside an oracle image, a grid, a gallery, a judge."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from a2v_flower.rendering.gallery import save_grid, write_gallery
from a2v_flower.rendering.judge import ImageJudge, judge_metrics
from a2v_flower.rendering.pipelines import Renderer
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.names import safe_name
from a2v_flower.server_generators import class_audio_means

log = logging.getLogger(__name__)


class RoundRenderer:
    """Renders, saves and judges one image per class each `every` rounds; the pipeline loads lazily, the judge
    (CLIP, on `device`) on the first render round and is kept for the later ones."""

    def __init__(self, renderer: Renderer, *, every: int, out_dir: Path, classes: list[str],
                 targets: dict[str, torch.Tensor], judge_id: str | None, free_after: bool = True,
                 device: torch.device | str = "cpu"):
        self.renderer, self.every, self.out_dir = renderer, every, Path(out_dir)
        self.classes, self.targets, self.judge_id, self.free_after = classes, targets, judge_id, free_after
        self.device, self._judge = torch.device(device), None

    @property
    def judge(self) -> ImageJudge:
        """The CLIP judge, built on first use and kept (it is small beside a pipeline, and slow to load)."""
        if self._judge is None:
            self._judge = (ImageJudge.from_pretrained(self.judge_id, self.device) if self.judge_id
                           else ImageJudge.tiny(device=self.device))
        return self._judge

    def due(self, server_round: int, last_round: int) -> bool:
        """Render in every `every`-th round and in the last one (never when every = 0)."""
        return self.every > 0 and server_round > 0 and (server_round % self.every == 0 or server_round == last_round)

    def neighbours(self, server_round: int, last_round: int) -> dict[str, str]:
        """Links from a round's gallery to the previous and next render rounds' galleries."""
        before = [r for r in range(server_round - 1, 0, -1) if self.due(r, last_round)][:1]
        after = [r for r in range(server_round + 1, last_round + 1) if self.due(r, last_round)][:1]
        return ({f"previous: round {r}": f"../round_{r:03d}/index.html" for r in before}
                | {f"next: round {r}": f"../round_{r:03d}/index.html" for r in after})

    @torch.no_grad()
    def __call__(self, server_round: int, adapters: AdapterSet, class_stats: dict, last_round: int = 0) -> dict:
        """Render the round; return judge metrics of adapter images and oracle images."""
        present, audio = class_audio_means(class_stats, len(self.classes))
        if not present:
            log.warning("round %s: no class statistics yet, nothing to render", server_round)
            return {}
        model = copy.deepcopy(adapters).to(self.device).eval()          # the server's own copy stays on the CPU
        out = model(audio.to(self.device))                              # per head (C', ...)
        oracle = {h: t[present] for h, t in self.targets.items()}       # true class text embeddings
        images = self.renderer.render_images(out, desc=f"round {server_round}: images from audio")
        oracle_images = self.renderer.render_images(oracle, desc=f"round {server_round}: oracle images")
        if self.free_after:
            self.renderer.free()
        cos, oracle_cos = (self.judge.scores(im, self.classes) for im in (images, oracle_images))  # (C', C) each
        metrics = {f"images/{k}": v for k, v in judge_metrics(cos, present).items()}
        metrics |= {f"oracle_images/{k}": v for k, v in judge_metrics(oracle_cos, present).items()}
        folder = self.out_dir / f"round_{server_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        names, rows = [safe_name(self.classes[c], "class") for c in present], []
        for i, (name, img, ora) in enumerate(zip(names, images, oracle_images)):
            img.save(folder / f"{name}.png")
            ora.save(folder / f"{name}_oracle.png")
            rows.append([name, Path(f"{name}.png"), self.verdict(cos[i], name), Path(f"{name}_oracle.png"),
                         self.verdict(oracle_cos[i], name)])
        save_grid([(n, [a, b]) for n, a, b in zip(names, images, oracle_images)], folder / "grid.png",
                  ["from audio", "oracle text"])
        write_gallery(folder, ["class", "from audio", "judge (audio)", "oracle text", "judge (oracle)"], rows,
                      title=f"{self.out_dir.parent.name}: round {server_round}, judge accuracy "
                            f"{metrics['images/accuracy']:.2f} (oracle {metrics['oracle_images/accuracy']:.2f})",
                      links=self.neighbours(server_round, last_round or server_round)
                      | {f"{p.parent.name.replace('_', ' ')}: held-out clips": f"{p.parent.name}/index.html"
                         for p in sorted(folder.glob("site_*/index.html"))})  # sites render theirs first
        log.info("round %s: rendered %d classes into %s (judge accuracy %.2f, oracle %.2f)", server_round,
                 len(present), folder, metrics["images/accuracy"], metrics["oracle_images/accuracy"])
        return metrics

    def verdict(self, cos: torch.Tensor, true: str) -> str:
        """The judge's predicted class for one image and its CLIP score (100 x cosine), ticked when right."""
        pred = self.classes[int(cos.argmax())]
        return f"{'✓' if pred == true else '✗'} {pred} ({100 * cos.max().item():.1f})"
