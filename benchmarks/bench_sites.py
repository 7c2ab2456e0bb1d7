"""Learning against the number of sites on the same data: the real ServerApp and ClientApp in one process.

    python benchmarks/bench_sites.py --sites 3,30,100                       # issue 30's protocol, federated eval
    python benchmarks/bench_sites.py --sites 3,100 --server-test num_rounds=8 train.local_epochs=8
    python benchmarks/bench_sites.py --sites 100 --server-test --direct num_rounds=40    # no messages: faster

Every run holds the same 300 clips (10 classes x 30, 1 s, seed 0), IID, default adapter, loss and optimiser; extra
arguments are Hydra overrides added to every run. Flower's transport is left out (tests/inprocess.py: a Grid that
hands each message to the ClientApp), which gives the Flower figures exactly (issue 30) in a fraction of the time.

--server-test: the server keeps 20 % of every class (60 clips) as the test set and the sites train on all of their
clips (`evaluate.mode=server data.splits={train:1,val:0,test:0}`): every size trains on the same 240 clips and is
scored on the same 60. Without it every site keeps 70/10/20 % of its clips (the default), so a size's test set is
its sites' held-out clips (60 at 3 sites, 100 at 100: different clips and class mix).

--direct: FedAvg written out with the package's own functions (the sites' data, build_adapters, train_adapters with
the ClientApp's seeds, the wire's float16 both ways, Flower's weighted average in float32, retrieval): no messages,
no config per message. It gives the in-process figures exactly (checked every round: 3 sites federated, 2 rounds;
30 sites --server-test, 8 rounds; tests/test_bench_sites.py) at a fraction of the CPU, and reports each round's update sizes: the mean of
the sites' ||update|| and the norm of their average (how much of what the sites learn survives averaging).

Printed per run: clips trained on, optimiser steps per site per round (epochs x batches), the held-out clips per
class, round 1 top-1/top-5, final top-1 with its 95 % Wilson interval; <out>/sites.json keeps every round.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.inprocess: the in-process Grid

from a2v_flower import config as C  # noqa: E402
from a2v_flower.data.site import federation, server_clips, split_site  # noqa: E402
from benchmarks.bench_system import wilson  # noqa: E402

DATA = ["partition=iid", "data.clips_per_class=30", "data.seconds=1.0", "data.clip_seconds=1.0",
        "model.audio.max_length=128", "diffusion.render_every=0", "wandb.mode=disabled"]
SERVER_TEST = ["evaluate.mode=server", "data.splits={train:1.0,val:0.0,test:0.0}"]


def layout(cfg) -> dict:
    """What the sites train on and what is scored: training clips per site, steps per site-round, test class mix."""
    data, part = C.data_spec(cfg), C.partition_spec(cfg)
    clips, classes, sites = federation(data, part)
    train, test = [], Counter()
    for s, idx in enumerate(sites):
        labels = [classes.index(clips[i].category) for i in idx]
        parts = split_site(labels, data, s)
        train.append(len(parts["train"]))
        if cfg.evaluate.mode == "federated":
            test.update(labels[j] for j in parts[cfg.evaluate.split])
    if cfg.evaluate.mode == "server":
        test.update(classes.index(c.category) for c in server_clips(clips, sites))
    steps = [cfg.train.local_epochs * math.ceil(n / cfg.train.batch_size) for n in train]
    return {"train_clips": sum(train), "train_per_site": [min(train), max(train)],
            "steps_per_site_round": sum(steps) / len(steps), "test_per_class": [test[c] for c in range(len(classes))]}


def run(n: int, overrides: list[str], out: Path) -> dict:
    """One in-process run of n sites; its figures."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.inprocess import run_server

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what Message() needs in process
    cache = out / "cache"
    cfg = C.compose_config([*DATA, f"federation.num_sites={n}", f"paths.cache_dir={cache}",
                            f"paths.output_root={out}/runs", *overrides])
    cfg = C.absolute_paths(cfg, Path.cwd())
    facts = layout(cfg)
    name = "_".join([str(n), *(o.replace("/", "-") for o in overrides)])[:120]
    t0 = time.time()
    run_server(cfg, out / "runs" / name)
    rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    top1, clips = evals[-1]["top1"], evals[-1]["num_examples"]
    return {"sites": n, "overrides": overrides, **facts, "test_clips": clips,
            "round1": [evals[0]["top1"], evals[0]["top5"]], "final_top1": top1, "final_top5": evals[-1]["top5"],
            "ci95": wilson(top1, clips), "top1_by_round": [round(r["top1"], 3) for r in evals],
            "seconds": round(time.time() - t0)}


def direct(n: int, overrides: list[str], out: Path) -> dict:
    """--direct: one run of n sites as FedAvg written out (see the module docstring); its figures."""
    import torch

    from a2v_flower.cache import TensorCache
    from a2v_flower.data.site import embed_clips, load_site
    from a2v_flower.metrics import retrieval
    from a2v_flower.models.adapters import build_adapters, embedding_moments, input_norm
    from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
    from a2v_flower.models.text_encoders import class_targets
    from a2v_flower.training import predict, train_adapters

    cfg = C.absolute_paths(C.compose_config([*DATA, f"federation.num_sites={n}", f"paths.cache_dir={out / 'cache'}",
                                             *overrides]), Path.cwd())
    facts, t0 = layout(cfg), time.time()
    data, part, audio = C.data_spec(cfg), C.partition_spec(cfg), C.as_config(cfg).model.audio
    encoder = AudioEncoder(audio, torch.device("cpu"))
    sites = [load_site(data, part, encoder, s) for s in range(n)]
    clips, classes, parts = federation(data, part)
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.as_config(cfg).model.text,
                            cfg.diffusion.t5_seq_len, TensorCache(Path(cfg.paths.cache_dir) / "targets"))
    norm = input_norm([embedding_moments(s.splits["train"][0]) for s in sites])

    def make():
        return build_adapters(encoder_dim(audio), targets, seed=cfg.seed, norm=norm, **C.adapter_keywords(cfg))

    def wire(state):  # as the adapters travel (adapter.wire), back in float32
        return {k: v.to(getattr(torch, cfg.adapter.wire)).float() for k, v in state.items()}

    if cfg.evaluate.mode == "server":
        x, kept, _ = embed_clips(encoder, server_clips(clips, parts), TensorCache(Path(cfg.paths.cache_dir) / "embeddings"),
                                 int(cfg.data.clip_seconds * audio.sampling_rate), desc="server test clips")
        tests = [(x, torch.tensor([classes.index(c.category) for c in kept]))]
    else:
        tests = [s.splits[cfg.evaluate.split] for s in sites if len(s.splits[cfg.evaluate.split][1])]
    spec, adapters, evals, sizes = C.as_config(cfg).train, make(), [], []
    state = adapters.state_dict()
    for rnd in range(1, cfg.num_rounds + 1):
        sent, updates, weights = wire(state), [], []
        for s, site in enumerate(sites):
            local = make()
            local.load_state_dict(sent)
            train_adapters(local, *site.splits["train"], targets, spec, seed=cfg.seed + 7919 * rnd + s)
            updates.append(wire(local.state_dict()))
            weights.append(len(site.splits["train"][1]))
        state = {k: sum(u[k] * (w / sum(weights)) for u, w in zip(updates, weights)) for k in sent}
        flat = torch.stack([torch.cat([(u[k] - sent[k]).flatten() for k in sent]) for u in updates])  # (sites, P)
        mean = (torch.tensor(weights, dtype=torch.float)[:, None] * flat).sum(0) / sum(weights)
        sizes.append([round(flat.norm(dim=1).mean().item(), 2), round(mean.norm().item(), 2)])
        adapters.load_state_dict(wire(state) if cfg.evaluate.mode == "federated" else state)
        scores = [(retrieval(predict(adapters, x), y, targets), len(y)) for x, y in tests]
        total = sum(k for _, k in scores)
        evals.append({m: sum(r[m] * k for r, k in scores) / total for m in ("top1", "top5")} | {"n": total})
    top1, clips_scored = evals[-1]["top1"], evals[-1]["n"]
    return {"sites": n, "overrides": overrides, "direct": True, **facts, "test_clips": clips_scored,
            "round1": [evals[0]["top1"], evals[0]["top5"]], "final_top1": top1, "final_top5": evals[-1]["top5"],
            "ci95": wilson(top1, clips_scored), "top1_by_round": [round(e["top1"], 3) for e in evals],
            "update_norms_by_round": sizes, "seconds": round(time.time() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every run (e.g. num_rounds=40)")
    ap.add_argument("--sites", default="3,30,100", help="site counts, comma-separated (default 3,30,100)")
    ap.add_argument("--server-test", action="store_true", help="one server-side test set for every size (see above)")
    ap.add_argument("--direct", action="store_true", help="FedAvg written out, no messages (see above)")
    ap.add_argument("--out", default="outputs/bench_sites", help="folder for runs, cache and sites.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*(SERVER_TEST if args.server_test else []), *args.overrides]
    results = []
    for n in map(int, args.sites.split(",")):
        r = direct(n, overrides, out) if args.direct else run(n, overrides, out)
        results.append(r)
        print(f"{n} sites {' '.join(args.overrides)}: train {r['train_clips']} clips ({r['train_per_site'][0]}-"
              f"{r['train_per_site'][1]}/site, {r['steps_per_site_round']:.1f} steps/site-round), test "
              f"{r['test_clips']} {r['test_per_class']}, round 1 {r['round1'][0]:.3f}/{r['round1'][1]:.3f}, final "
              f"{r['final_top1']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] top-5 {r['final_top5']:.3f}, "
              f"by round {r['top1_by_round']}, {r['seconds']} s", flush=True)
        if "update_norms_by_round" in r:
            print(f"  mean site ||update|| and ||average update|| by round: {r['update_norms_by_round']}", flush=True)
    with open(out / "sites.json", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
