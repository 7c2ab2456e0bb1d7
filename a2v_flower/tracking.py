"""Per-round metrics of a run: metrics.jsonl, the log, wandb (offline by default) and a plot."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def use_flower_logging() -> None:
    """Send this package's log records through Flower's handlers, so they reach `flwr run --stream`."""
    pkg = logging.getLogger("a2v_flower")
    pkg.setLevel(logging.INFO)
    pkg.handlers = logging.getLogger("flwr").handlers
    pkg.propagate = False


class RunTracker:
    """Writes one JSON line per round event to <run_dir>/metrics.jsonl and mirrors it to wandb."""

    def __init__(self, run_dir: str | Path, config: dict, wandb_mode: str = "offline",
                 project: str = "a2v_flower", name: str = "run"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.wandb = None
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(mode=wandb_mode, project=project, name=name, config=config,
                                    dir=str(self.run_dir), reinit="finish_previous")

    def keep_rounds(self, last: int) -> None:
        """Resume: reload metrics.jsonl up to round `last` (a crashed round's partial rows are dropped)."""
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] \
            if self.path.is_file() else []
        self.history = [r for r in rows if r["round"] <= last]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, round_: int, kind: str, metrics: dict, image: Path | None = None) -> None:
        """Record `metrics` of one kind ("train", "eval", "render", ...) for a round, with an optional image."""
        line = json.dumps({"round": round_, "kind": kind, "time": time.time(), **metrics})
        self.history.append(json.loads(line))  # as a resumed run reads it back (site ids become strings)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.wandb is not None:
            flat = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            if image is not None and Path(image).is_file():
                import wandb

                flat[f"{kind}/image"] = wandb.Image(str(image))
            self.wandb.log({"round": round_, **flat})

    def finish(self, summary: dict) -> None:
        """Write summary.json and accuracy.png, close wandb."""
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.plot(self.run_dir / "accuracy.png")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()

    def plot(self, path: Path) -> None:
        """Top-1 retrieval accuracy by round, global and per site."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.history if r["kind"] == "eval"]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [r["round"] for r in rows]
        ax.plot(rounds, [r["top1"] for r in rows], "k-o", label="global", linewidth=2)
        for site in sorted({s for r in rows for s in r.get("sites", {})}):
            ax.plot(rounds, [r["sites"].get(site, {}).get("top1", float("nan")) for r in rows], "--",
                    label=f"site {site}", alpha=0.7)
        ax.set(xlabel="round", ylabel="top-1 retrieval accuracy", ylim=(0, 1.02), title=self.run_dir.name)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
