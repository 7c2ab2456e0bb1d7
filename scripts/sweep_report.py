"""Compare the runs of a sweep: one CSV + Markdown table and a plot of accuracy by round per run.

    a2v-run -m strategy=avg,uniform,none partition=iid,groups
    python scripts/sweep_report.py outputs/multirun/<date>/<time>

Reads every run folder below the given folder (each has config.yaml, metrics.jsonl, summary.json);
writes sweep.csv, sweep.md and sweep_rounds.png there and prints the table. A job's wall time runs from
Hydra's start of the job (.hydra/config.yaml, written before flwr starts) to its summary.json, so it
includes the start-up of the SuperLink, Ray and the first embedding.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

KEYS = ("strategy.aggregation", "partition.mode", "generator.type", "granularity.granularity", "mode",
        "sharing.mode", "reset.reset_generator_on_class_change", "diffusion.type", "num_rounds", "seed")


def pick(cfg: dict, dotted: str):
    """cfg["a"]["b"] for "a.b" (None when absent); a mapping is shown by its generator_only_mode flag."""
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    if isinstance(cfg, dict):
        return "generator_only" if cfg.get("generator_only_mode") else (
            "use_pretrained" if cfg.get("use_pretrained_generators") else "federated")
    return cfg


def wall_seconds(run: Path) -> int | None:
    """Seconds from the job's start (Hydra writes .hydra/config.yaml first) to summary.json; None without .hydra."""
    started = run / ".hydra" / "config.yaml"
    if not started.is_file():
        return None
    return round((run / "summary.json").stat().st_mtime - started.stat().st_mtime)


def collect(root: Path) -> list[dict]:
    """One row per run folder under `root`; a failed run's row says why (its summary's error) and has no scores."""
    rows = []
    for summary in sorted(root.rglob("summary.json")):
        run = summary.parent
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        metrics = run / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        evals = [e for e in lines if e["kind"] == "eval"]
        s = json.loads(summary.read_text())
        why = s.get("error") or f"{s.get('rounds_done')} of {s.get('rounds')} rounds done"
        rows.append({"run": str(run.relative_to(root)), **{k: pick(cfg, k) for k in KEYS},
                     "outcome": "completed" if s.get("completed") else f"FAILED: {why}",
                     "final_top1": s.get("final_top1"), "final_top5": s.get("final_top5"),
                     "best_top1": max((e["top1"] for e in evals), default=None),
                     "seen_top1": evals[-1].get("seen_top1") if evals else None,
                     "forgetting": evals[-1].get("forgetting") if evals else None,
                     "wall_s": wall_seconds(run), "chance": s.get("chance_top1"),
                     "top1_by_round": [round(e["top1"], 4) for e in evals]})
    return rows


def main() -> None:
    """Write the comparison of all runs under the given folder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a multirun folder (or any folder holding run folders)")
    root = ap.parse_args().root
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no run folders with summary.json under {root}")
    varying = [k for k in KEYS if len({str(r[k]) for r in rows}) > 1] or list(KEYS[:2])
    with open(root / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ["run", *varying, "outcome", "final top-1", "best top-1", "final top-5", "top-1 seen classes", "forgetting",
            "wall s (with start-up)"]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    title = f"sweep over {', '.join(varying)}: {len(rows)} runs"
    lines = [f"# {title}", "", f"In `{root}`.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["run"], *[str(r[k]) for k in varying], r["outcome"],
                                 *[fmt(r[k]) for k in ("final_top1", "best_top1", "final_top5", "seen_top1",
                                                       "forgetting", "wall_s")]]) + " |" for r in rows]
    (root / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        label = ", ".join(f"{k.split('.')[0]}={r[k]}" for k in varying)
        ax.plot(range(1, len(r["top1_by_round"]) + 1), r["top1_by_round"], marker="o", label=label)
    chance = {r["chance"] for r in rows} - {None}
    if len(chance) == 1:
        ax.axhline(chance.pop(), color="grey", linestyle=":", label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set(xlabel="round", ylabel="top-1 retrieval", ylim=(0, 1), title=f"top-1 retrieval by round, {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "sweep_rounds.png", dpi=100)


if __name__ == "__main__":
    main()
