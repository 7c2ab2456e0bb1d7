"""Compare the runs of a sweep: one CSV + Markdown table and a plot of accuracy by round per run.

    a2v-run -m strategy=avg,uniform,none partition=iid,groups seed=0,1,2,3,4
    python -m a2v_flower.sweep_report outputs/multirun/<date>/<time>

Reads every run folder below the given folder (each has config.yaml, metrics.jsonl, summary.json);
writes sweep.csv, sweep.md and sweep_rounds.png there and prints the tables. The columns are the config
keys that differ between the runs (paths, names and wandb left out). When `seed` is among them, a second
table pools each setting's seeds: mean final top-1, standard deviation and a 95 % t-interval over seeds, and
the paired difference to the first setting over their common seeds.
A job's wall time runs from Hydra's start of the job (.hydra/config.yaml, written before flwr starts) to
its summary.json, so it includes the start-up of the SuperLink, Ray and the first embedding.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import yaml

KEYS = ("strategy.aggregation", "partition.mode", "generator.type", "granularity.granularity", "mode",
        "sharing.mode", "reset.reset_generator_on_class_change", "diffusion.type", "num_rounds", "seed")
NOT_SETTINGS = ("paths.", "wandb.", "name", "resume", "generator_checkpoint.dir",  # differ without changing a run
                "generator_checkpoint.base_name")
COLUMNS = 8  # swept keys shown in the tables at most (sweep.csv has them all)
# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (more: 1.96)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
SEED_SD = 0.053  # the default run's final top-1 over seeds 0-4 (BENCHMARKS.md, "Default run")


def pick(run_config: dict, dotted: str):
    """run_config["a"]["b"] for "a.b" (None when absent); `mode` is shown by the flag that is on."""
    for part in dotted.split("."):
        run_config = run_config.get(part) if isinstance(run_config, dict) else None
    if dotted == "mode" and isinstance(run_config, dict):
        return "generator_only" if run_config.get("generator_only_mode") else (
            "use_pretrained" if run_config.get("use_pretrained_generators") else "federated")
    return run_config


def cell(value, width: int = 40) -> str:
    """A value as table text, cut to `width` characters (a list of sites can run to hundreds)."""
    text = str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def flat(run_config: dict, prefix: str = "") -> dict[str, str]:
    """Every leaf of a config as "a.b" -> its value's text (lists and null included); a mapping keyed by
    anything but names (a schedule's site ids) is one leaf."""
    out = {}
    for k, v in run_config.items():
        nested = isinstance(v, dict) and v and all(isinstance(key, str) for key in v)
        out |= flat(v, f"{prefix}{k}.") if nested else {f"{prefix}{k}": str(v)}
    return out


def varying_keys(run_configs: list[dict]) -> list[str]:
    """Config keys whose values differ between the runs, the usual ones (KEYS) first; `mode` stands for its flags."""
    flats = [flat(c) for c in run_configs]
    keys = {k for f in flats for k in f if not k.startswith(NOT_SETTINGS)}
    differ = {k for k in keys if len({f.get(k) for f in flats}) > 1}
    follow = {k for k in differ if k.endswith(".seed") and all(f.get(k) == f.get("seed") for f in flats)}
    differ -= follow  # a node's seed that is the run's seed (conf: ${seed}) is not a setting of its own
    if any(k.startswith("mode.") for k in differ):
        differ = {k for k in differ if not k.startswith("mode.")} | {"mode"}
    return [k for k in KEYS if k in differ] + sorted(differ - set(KEYS))


def mean_interval(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, standard deviation and the half-width of its 95 % t-interval (None where too few values)."""
    mean = statistics.fmean(values) if values else None
    sd = statistics.stdev(values) if len(values) > 1 else None
    half = None if sd is None else (T95[len(values) - 2] if len(values) <= 31 else 1.96) * sd / len(values) ** 0.5
    return mean, sd, half


def by_setting(rows: list[dict], settings: list[str]) -> dict[tuple, list[dict]]:
    """The runs grouped by their values of `settings`, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in settings), []).append(r)
    return groups


def over_seeds(rows: list[dict], settings: list[str]) -> list[dict]:
    """One row per setting (the varying keys but `seed`): its seeds' final top-1 pooled, and its paired
    difference to the first setting over the seeds both completed (one seed draws the same data, partition,
    splits and initial weights for every setting that does not change them itself)."""
    groups = by_setting(rows, settings)
    finals = {setting: {str(r["seed"]): r["final_top1"] for r in runs
                        if r["outcome"] == "completed" and r["final_top1"] is not None}
              for setting, runs in groups.items()}
    reference = next(iter(finals.values()))
    out = []
    for i, (setting, final) in enumerate(finals.items()):
        done = list(final.values())
        mean, sd, half = mean_interval(done)
        diffs = [v - reference[seed] for seed, v in final.items() if seed in reference]
        dmean, _, dhalf = mean_interval(diffs)
        out.append({**dict(zip(settings, setting)), "runs": f"{len(done)} of {len(groups[setting])}",
                    "mean": mean, "sd": sd,
                    "ci": None if half is None else (max(0.0, mean - half), min(1.0, mean + half)),
                    "range": (min(done), max(done)) if done else None,
                    "vs": "reference" if i == 0 else "-" if dmean is None else
                          f"{dmean:+.3f}" + ("" if dhalf is None else f" [{dmean - dhalf:+.3f}, {dmean + dhalf:+.3f}]")
                          + f" ({len(diffs)} seeds)"})
    return out


def wall_seconds(run: Path) -> int | None:
    """Seconds from the job's start (Hydra writes .hydra/config.yaml first) to summary.json; None without either."""
    started = run / ".hydra" / "config.yaml"
    if not started.is_file() or not (run / "summary.json").is_file():
        return None
    return round((run / "summary.json").stat().st_mtime - started.stat().st_mtime)


def collect(root: Path) -> tuple[list[dict], list[str]]:
    """One row per run folder under `root` (a failed run's row says why, its summary's error, and has no
    scores), and the config keys that differ between them. A job that started (Hydra wrote its .hydra/) but left no
    summary, e.g. a parallel launcher's worker that died, has a FAILED row too."""
    runs = sorted({p.parent for p in root.rglob("summary.json")} | {p.parent.parent for p in root.rglob(".hydra/config.yaml")})
    run_configs = [yaml.safe_load((run / "config.yaml" if (run / "config.yaml").is_file() else run / ".hydra" / "config.yaml")
                           .read_text()) for run in runs]
    varying = varying_keys(run_configs) if len(runs) > 1 else []
    rows = []
    for run, run_config in zip(runs, run_configs):
        summary = run / "summary.json"
        metrics = run / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        evals = [e for e in lines if e["kind"] == "eval"]
        s = json.loads(summary.read_text()) if summary.is_file() else {
            "error": "no summary.json: the run stopped before its ServerApp wrote one (see its run.log)"}
        verdict = json.loads((run / "outcome.json").read_text()) if (run / "outcome.json").is_file() else {}
        if verdict.get("completed") is False and s.get("completed"):  # a summary left by an earlier launch
            s = {"error": verdict.get("line")}
        why = s.get("error") or f"{s.get('rounds_done')} of {s.get('rounds')} rounds done"
        rows.append({"run": str(run.relative_to(root)), **{k: pick(run_config, k) for k in dict.fromkeys([*KEYS, *varying])},
                     "outcome": "completed" if s.get("completed") else f"FAILED: {why}",
                     "final_top1": s.get("final_top1"), "final_top5": s.get("final_top5"),
                     "best_top1": max((e["top1"] for e in evals), default=None),
                     "seen_top1": evals[-1].get("seen_top1") if evals else None,
                     "forgetting": evals[-1].get("forgetting") if evals else None,
                     "wall_s": wall_seconds(run), "chance": s.get("chance_top1"),
                     "top1_by_round": [round(e["top1"], 4) for e in evals]})
    return rows, varying


def main() -> None:
    """Write the comparison of all runs under the given folder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a multirun folder (or any folder holding run folders)")
    root = ap.parse_args().root
    rows, varying = collect(root)
    if not rows:
        raise SystemExit(f"no run folders with summary.json under {root}")
    varying = varying or list(KEYS[:2])
    with open(root / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    shown = varying[:COLUMNS] + (["seed"] if "seed" in varying[COLUMNS:] else [])
    more = f" and {len(varying) - len(shown)} more keys (sweep.csv)" if len(varying) > len(shown) else ""
    head = ["run", *shown, "outcome", "final top-1", "best top-1", "final top-5", "top-1 seen classes", "forgetting",
            "wall s (with start-up)"]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    title = f"sweep over {', '.join(shown)}{more}: {len(rows)} runs"
    lines = [f"# {title}", "", f"In `{root}`.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["run"], *[cell(r[k]) for k in shown], r["outcome"],
                                 *[fmt(r[k]) for k in ("final_top1", "best_top1", "final_top5", "seen_top1",
                                                       "forgetting", "wall_s")]]) + " |" for r in rows]
    settings, columns = [k for k in varying if k != "seed"], [k for k in shown if k != "seed"]
    if "seed" in varying:
        head = [*columns, "seeds completed", "final top-1 mean", "sd", "95 % CI over seeds (t; within [0, 1])",
                "min to max", "vs the first, paired by seed: diff [95 % CI]"]
        lines += ["", f"## final top-1 over seeds, by {', '.join(columns) or 'setting'}{more}", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in over_seeds(rows, settings):
            ci = "-" if g["ci"] is None else f"[{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]"
            span = "-" if g["range"] is None else f"{g['range'][0]:.3f} to {g['range'][1]:.3f}"
            lines.append("| " + " | ".join([*[cell(g[k]) for k in columns], g["runs"], fmt(g["mean"]), fmt(g["sd"]),
                                            ci, span, g["vs"]]) + " |")
    else:
        lines += ["", f"One run per setting. On the default config, seeds alone move the final top-1 by a standard "
                      f"deviation of {SEED_SD} (BENCHMARKS.md): add `seed=0,1,2,3,4` to the sweep before reading a "
                      "difference between rows."]
    (root / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def label(r: dict, keys: list[str]) -> str:
        return cell(", ".join(f"{k.split('.')[0] if k in KEYS else k}={r[k]}" for k in keys) or "runs", 70)

    if "seed" in varying:  # one colour per setting: its seeds thin, their mean by round thick
        for i, runs in enumerate(by_setting(rows, settings).values()):
            for r in runs:
                ax.plot(range(1, len(r["top1_by_round"]) + 1), r["top1_by_round"], color=f"C{i % 10}", alpha=0.35,
                        lw=1)
            curves = [r["top1_by_round"] for r in runs if r["outcome"] == "completed"]
            if curves and len({len(c) for c in curves}) == 1:
                mean = [statistics.fmean(v) for v in zip(*curves)]
                ax.plot(range(1, len(mean) + 1), mean, color=f"C{i % 10}", lw=2.5, marker="o",
                        label=f"{label(runs[0], settings)} (mean of {len(curves)} seeds)")
    else:
        for r in rows:
            ax.plot(range(1, len(r["top1_by_round"]) + 1), r["top1_by_round"], marker="o", label=label(r, shown))
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
