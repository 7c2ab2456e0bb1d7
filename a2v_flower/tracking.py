"""Per-round metrics of a run: metrics.jsonl, the log, wandb (offline by default) and a plot."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from a2v_flower.schema import Wandb

log = logging.getLogger(__name__)


def use_flower_logging() -> None:
    """Send this package's log records through Flower's handlers, so they reach `flwr run --stream`."""
    pkg = logging.getLogger("a2v_flower")
    pkg.setLevel(logging.INFO)
    pkg.handlers = logging.getLogger("flwr").handlers
    pkg.propagate = False


class RunTracker:
    """Writes one JSON line per round event to <run_dir>/metrics.jsonl and mirrors it to wandb."""

    def __init__(self, run_dir: str | Path, config: dict, wandb: Wandb):
        """`config`: the run's config as plain dicts (recorded with the wandb run); `wandb`: conf's wandb.*."""
        wandb_mode, project, name, group = wandb.mode, wandb.project, wandb.name, wandb.group
        self.run_dir, self.name = Path(run_dir), name
        self.path = self.run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self._wandb: Future | None = None
        if wandb_mode != "disabled":  # wandb.init takes seconds (it starts a service): it overlaps round 1
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = ThreadPoolExecutor(1).submit(self._start_wandb, wandb_mode, project, name, group, config)

    def _start_wandb(self, mode: str, project: str, name: str, group: str | None, config: dict):
        """The wandb run, its charts keyed by federated round."""
        import wandb

        run = wandb.init(mode=mode, project=project, name=name, group=group, config=config, dir=str(self.run_dir),
                         reinit="finish_previous")
        run.define_metric("*", step_metric="round")
        return run

    @property
    def wandb(self):
        """The wandb run (waits for wandb.init), or None when wandb is disabled."""
        return self._wandb.result() if self._wandb is not None else None

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
            flat = wandb_keys(kind, metrics)
            if image is not None and Path(image).is_file():
                import wandb

                flat[f"{kind}/image"] = wandb.Image(str(image))
            self.wandb.log({"round": round_, **flat})

    def finish(self, summary: dict) -> None:
        """Write summary.json and accuracy.png, close wandb."""
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.plot(self.run_dir / "accuracy.png", summary.get("chance_top1"))
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()

    def plot(self, path: Path, chance: float | None = None) -> None:
        """Top-1 retrieval accuracy by round, global and per site, with the chance level."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rows = [r for r in self.history if r["kind"] == "eval"]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [r["round"] for r in rows]
        ax.plot(rounds, [r["top1"] for r in rows], "k-o", label="global", linewidth=2)
        for site in sorted({s for r in rows for s in r.get("sites", {})}):
            ax.plot(rounds, [r["sites"].get(site, {}).get("top1", float("nan")) for r in rows], "--",
                    label=f"site {site}", alpha=0.7)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set(xlabel="round", ylabel="top-1 retrieval accuracy", ylim=(0, 1.02),
               title=f"{self.name}: top-1 retrieval by round\n{self.run_dir.name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def wandb_keys(kind: str, metrics: dict, prefix: str | None = None) -> dict:
    """A metrics.jsonl row as wandb keys: `server/...` as named (the predecessor's dashboards use them), the rest under
    `kind/`; nested dicts (per site, per class) flattened with '/', e.g. eval/sites/0/top1; non-numbers dropped."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else key if str(key).startswith("server/") else f"{kind}/{key}"
        if isinstance(value, dict):
            out |= wandb_keys(kind, value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out
