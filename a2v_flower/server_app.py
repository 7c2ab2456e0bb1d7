"""Flower ServerApp: size the run to the federation, check the config, build targets and adapters, run the rounds."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from a2v_flower import config as C
from a2v_flower import preflight
from a2v_flower.cache import TensorCache, sha1_of
from a2v_flower.checkpoints import save_tensors
from a2v_flower.data.schedule import held_classes, seen_classes
from a2v_flower.data.site import federation, split_site
from a2v_flower.metrics import pool_evaluations, retrieval
from a2v_flower.models.adapters import build_adapters, input_norm
from a2v_flower.models.audio_encoder import encoder_dim
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.nodes import federation_size, short_reason
from a2v_flower.records import from_record
from a2v_flower.resume import load_server_checkpoint, save_server_checkpoint
from a2v_flower.server_generators import ServerGenerators
from a2v_flower.strategy import A2VStrategy
from a2v_flower.tracking import RunTracker, use_flower_logging
from a2v_flower.training import predict

log = logging.getLogger("a2v_flower")
app = ServerApp()


def prepare_run(run_config: dict, grid: Grid) -> tuple:
    """Config (sized to the federation, checked, absolute paths), the run folder it is saved in (the resumed
    run's folder) and node -> site of the SuperNodes connected so far."""
    cfg = C.absolute_paths(C.load_config(run_config), Path.cwd())
    asked = cfg.federation.num_sites
    # a config file (a2v-run, deploy.py) or an override asked for its size; composed defaults follow the federation
    explicit = bool(run_config.get("config-file")) or "federation.num_sites" in str(run_config.get("overrides", ""))
    cfg.federation.num_sites, node_sites = federation_size(grid, asked, cfg.federation.timeout, explicit)
    try:
        preflight.check_run(cfg)
    except ValueError as err:
        if cfg.federation.num_sites == asked:
            raise
        raise ValueError(f"{err} (the federation has {cfg.federation.num_sites} SuperNodes, the config asks for "
                         f"{asked} sites: start {asked} SuperNodes, e.g. flwr run --federation-config "
                         f"num-supernodes={asked}, or change the config)") from None
    given = str(run_config.get("config-file", "") or "")
    run_dir = Path(cfg.resume).resolve() if cfg.resume else Path(given).parent if given else C.run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.paths.run_dir = str(run_dir)  # sites keep their per-round state under <run_dir>/state
    OmegaConf.save(cfg, run_dir / ("config_resumed.yaml" if cfg.resume else "config.yaml"))
    return cfg, run_dir, node_sites


def prepare_sites(grid: Grid, nodes: list[int], run_yaml: str, tracker: RunTracker, timeout: float) -> list[dict]:
    """Before round 1 the sites of `nodes` read and embed their clips (a "query.prepare" message), one-time work
    that would otherwise make round 1 several times longer than later rounds; returns each site's moments of its
    training embeddings (`embedding_moments`). A site that fails here is only warned about: it fails its first
    round with the same reason, where federation.min_sites decides."""
    start = time.monotonic()
    content = {"run-config": ConfigRecord({"yaml": run_yaml}),
               "config": ConfigRecord({"config-sha1": sha1_of(run_yaml)[:12]})}
    msgs = [Message(RecordDict(content), message_type="query.prepare", dst_node_id=n) for n in nodes]
    sites, moments = {}, []
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log.warning("a site could not read its data before round 1: %s", short_reason(reply.error.reason))
        else:
            m = reply.content["metrics"]
            sites[int(m["site"])] = {k: int(m[k]) for k in ("clips", "encoder_calls", "skipped")}
            got = from_record(reply.content["input_moments"])
            if all(torch.isfinite(t).all() for t in got.values()):
                moments.append(got)
            else:  # it would poison every site's input standardisation; the site fails its round on its own
                log.warning("site %s: its embedding moments hold NaN or Inf: left out of the input standardisation",
                            m["site"])
    row = {k: sum(s[k] for s in sites.values()) for k in ("clips", "encoder_calls", "skipped")}
    row["seconds"] = round(time.monotonic() - start, 1)
    tracker.log(0, "prepare", row | {"sites": sites})
    log.info("%d sites ready in %.1f s: %d clips, %d embedded now (the rest from the cache), %d unreadable files "
             "skipped", len(sites), row["seconds"], row["clips"], row["encoder_calls"], row["skipped"])
    return moments


def server_test_set(cfg, clips: list, sites: list[list[int]], classes: list[str]) -> tuple:
    """evaluate.mode=server: the clips no site holds, embedded here once (the disk cache keeps them): (x, y)."""
    from a2v_flower.data.site import embed_clips, server_clips
    from a2v_flower.models.audio_encoder import AudioEncoder

    audio = C.audio_spec(cfg)
    x, kept, skipped = embed_clips(AudioEncoder(audio), server_clips(clips, sites),
                                   TensorCache(Path(cfg.paths.cache_dir) / "embeddings"),
                                   int(cfg.data.clip_seconds * audio.sampling_rate), desc="server test clips")
    log.info("server test set: %d clips no site holds (%d unreadable skipped)", len(kept), len(skipped))
    return x, torch.tensor([classes.index(c.category) for c in kept])


def prepare_nodes(grid: Grid, cfg, resumed_norm: bool) -> list[int]:
    """Nodes prepared before round 1: all when every site trains in round 1; with sampling, a seeded sample of
    one round's size when the input standardisation must be estimated (else sites prepare when first drawn)."""
    nodes = sorted(grid.get_node_ids())
    if cfg.strategy.fraction_train >= 1:
        return nodes
    if not cfg.adapter.normalise or resumed_norm:
        return []
    k = max(1, math.ceil(cfg.strategy.fraction_train * len(nodes)))
    return sorted(random.Random(cfg.seed).sample(nodes, k))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds. summary.json says whether this run (its id) completed them and which sites failed."""
    use_flower_logging()
    run_config = dict(context.run_config)
    given = str(run_config.get("config-file", "") or "")
    run_dir = Path(given).parent if given else None
    summary = {"run_id": str(run_config.get("launch-id") or f"flwr-{context.run_id}"), "completed": False}
    try:
        cfg, run_dir, node_sites = prepare_run(run_config, grid)
        run_rounds(grid, cfg, run_dir, node_sites, summary)
    except Exception as err:
        summary["error"] = " ".join(str(err).split()) or type(err).__name__
        log.error("run stopped: %s", summary["error"])
        if run_dir is not None and run_dir.is_dir():  # what a launcher reads: not a summary of an older run
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        raise


def run_rounds(grid: Grid, cfg, run_dir: Path, node_sites: dict[int, int], summary: dict) -> None:
    """Run `num_rounds` of adapter federation; save the global adapters and complete `summary`."""
    log.info("run folder: %s", run_dir)
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    # the partition this run used, site -> clip ids (ESC-50 file names; a Hugging Face clip's content hash)
    (run_dir / "partition.json").write_text(json.dumps({"mode": cfg.partition.mode, "seed": cfg.seed, "sites": {
        str(s): [clips[i].path.name for i in idx] for s, idx in enumerate(sites)}}, indent=1))
    held, schedule = held_classes(clips, sites), C.schedule_of(cfg)  # both checked by preflight.check_run
    sizes = [len(s) for s in sites]
    log.info("%d clips, %d classes, sites hold %s clips", len(clips), len(classes),
             sizes if len(sites) <= 20 else f"{min(sizes)}-{max(sizes)}")
    no_eval = [s for s, idx in enumerate(sites) if not split_site([classes.index(clips[i].category) for i in idx],
                                                                  C.data_spec(cfg), s)[cfg.evaluate.split]]
    if no_eval:  # they still train; their evaluation replies count zero examples
        log.warning("%d of %d sites hold too few clips for a %s split (first: %s)", len(no_eval), len(sites),
                    cfg.evaluate.split, no_eval[:5])
    summary["sites_without_eval_clips"] = len(no_eval)
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.text_spec(cfg),
                            C.t5_seq_len(cfg), TensorCache(Path(cfg.paths.cache_dir) / "targets"), C.server_device(cfg))
    dim = encoder_dim(C.audio_spec(cfg))
    tracker = RunTracker(run_dir, OmegaConf.to_container(cfg), cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name,
                         cfg.wandb.group)
    n, low, run_yaml = cfg.federation.num_sites, C.min_sites(cfg), OmegaConf.to_yaml(cfg)
    resumed = load_server_checkpoint(run_dir, cfg) if cfg.resume else None  # (round, adapters, state, meta)
    norm = ({k[len("input_norm/"):]: resumed[2].pop(k) for k in list(resumed[2]) if k.startswith("input_norm/")}
            if resumed else None) or None
    moments = prepare_sites(grid, nodes, run_yaml, tracker, cfg.federation.timeout) if (
        nodes := prepare_nodes(grid, cfg, norm is not None)) else []
    if cfg.adapter.normalise and norm is None:  # the federation's moments: sent once per node, with the targets
        if not moments:
            raise RuntimeError(f"no site sent its embedding moments before round 1 ({len(nodes)} asked, none answered "
                               f"within federation.timeout={cfg.federation.timeout} s): the adapters' input "
                               "standardisation needs them (adapter.normalise=false runs without)")
        norm = input_norm(moments)
        log.info("adapter inputs standardised with the moments of %d sites' training embeddings", len(moments))

    def make_adapters():
        return build_adapters(dim, targets, cfg.adapter.width, cfg.adapter.heads, cfg.seed, cfg.adapter.kind,
                              cfg.adapter.rank, norm if cfg.adapter.normalise else None,
                              cfg.model.audio.tokens if cfg.adapter.token_embedding else 0)

    adapters = make_adapters()
    generators = ServerGenerators(classes, targets, (cfg.model.audio.tokens, dim), make_adapters, C.train_spec(cfg),
                                  cfg.seed, C.replay_spec(cfg, classes), C.server_generator_spec(cfg),
                                  kd=cfg.strategy.aggregation == "kd", device=C.server_device(cfg))
    strategy = A2VStrategy(cfg.strategy.aggregation, targets, tracker, classes, generators,
                           fraction_train=cfg.strategy.fraction_train,
                           fraction_evaluate=cfg.strategy.fraction_evaluate,
                           min_train_nodes=max(1, round(low * cfg.strategy.fraction_train)),
                           min_evaluate_nodes=max(1, round(low * cfg.strategy.fraction_evaluate)),
                           min_available_nodes=low,  # rounds go on with >= min_sites of the n sites
                           seen_fn=lambda rnd: {classes.index(c) for c in seen_classes(schedule, held, rnd)},
                           timeout=cfg.federation.timeout, run_config=run_yaml, num_sites=n, min_sites=low,
                           wire=cfg.adapter.wire, input_norm=norm if cfg.adapter.normalise else None,
                           evaluate_on_sites=cfg.evaluate.mode == "federated")
    strategy.site_of_node.update(node_sites)
    done = 0
    if resumed:  # continue after the newest server checkpoint; sites restore their state of that round
        done, state, strategy_state, meta = resumed
        adapters.load_state_dict(state)
        generators.load_state_tensors(strategy_state)
        strategy.best_acc = {int(c): a for c, a in meta.get("best_acc", {}).items()}
        strategy.round_offset = strategy.resume_round = done
        tracker.keep_rounds(done)
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.num_rounds)
    saved_norm = {f"input_norm/{k}": v for k, v in (adapters.input_norm() or {}).items()}  # beside the weights
    held_out = server_test_set(cfg, clips, sites, classes) if cfg.evaluate.mode == "server" else None
    untrained = cfg.mode.generator_only_mode and not cfg.replay.refine_epochs  # one-shot trains them on the server
    every = 0 if untrained else cfg.diffusion.render_every  # generator-only: never render
    render = None
    if every:  # diffusers (and torch._dynamo through it): 3 s of CPU to import, only for a run that renders
        from a2v_flower.diffusion import Renderer
        from a2v_flower.rendering import RoundRenderer

        device = C.server_device(cfg)
        render = RoundRenderer(Renderer(C.diffusion_spec(cfg, device)), every, run_dir / "images",
                               classes, targets, cfg.diffusion.judge, cfg.diffusion.free_after_render, device)
    strategy.clip_images = lambda rnd: cfg.diffusion.clip_images if render and render.due(rnd, cfg.num_rounds) else 0

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """End of a round: rendering (when due), the server checkpoint, and the round's one line on the console."""
        if server_round == 0:  # Flower's call before the first round: nothing to do
            return None
        server_round += done
        summary["rounds_done"] = server_round
        adapters.load_state_dict(arrays.to_torch_state_dict())
        save_server_checkpoint(run_dir, server_round, adapters, generators.state_tensors() | saved_norm,
                               {"best_acc": {str(c): a for c, a in strategy.best_acc.items()}}, cfg)
        metrics = {}
        if held_out is not None:  # evaluate.mode=server: the global adapters on the clips no site holds
            row = retrieval(predict(adapters, held_out[0]), held_out[1], targets) | {"num-examples": len(held_out[1])}
            glob = pool_evaluations({"server": row}, classes, sorted(strategy.seen_fn(server_round)), strategy.best_acc)
            tracker.log(server_round, "eval", glob | {"trained_here": 0.0})
        if render and render.due(server_round, cfg.num_rounds):
            metrics = render(server_round, adapters, generators.class_stats, cfg.num_rounds)
            tracker.log(server_round, "render", metrics,
                        image=run_dir / "images" / f"round_{server_round:03d}" / "grid.png")
        ev = next((r for r in tracker.history if r["kind"] == "eval" and r["round"] == server_round), None)
        seconds, failed = round(time.time() - strategy.round_started, 1), strategy.failures.count(server_round)
        scores = ("top-1 {top1:.3f} ({hits}/{num_examples} clips) | top-5 {top5:.3f} | seen top-1 {seen_top1:.3f} | "
                  "forgetting {forgetting:.3f}".format(**ev, hits=round(ev["top1"] * ev["num_examples"]))
                  if ev else "no held-out clips evaluated")
        log.info("round %d/%d: %s | failures %d | %.1f s", server_round, cfg.num_rounds, scores, failed, seconds)
        return MetricRecord(metrics | {"failures": failed, "seconds": seconds})

    summary |= {"run_dir": str(run_dir), "rounds": cfg.num_rounds, "rounds_done": done, "num_sites": n,
                "min_sites": low}
    # The config itself travels once per node (with the class targets); every message names it by hash.
    digest = ConfigRecord({"config-sha1": sha1_of(run_yaml)[:12]})
    try:
        result = strategy.start(grid, ArrayRecord(adapters.state_dict()), cfg.num_rounds - done,
                                cfg.federation.timeout, train_config=digest, evaluate_config=digest,
                                evaluate_fn=after_round)
    except BaseException:
        if tracker.wandb is not None:
            tracker.wandb.finish(exit_code=1)  # the wandb run is marked failed
        raise
    finally:  # also when a round failed: which sites failed, and why
        summary["failures"] = {str(r): sites for r, sites in strategy.failures.rounds.items()}
    if len(result.arrays):  # empty when no round succeeded
        adapters.load_state_dict(result.arrays.to_torch_state_dict())
    save_tensors(run_dir / "adapters.safetensors", adapters.state_dict() | saved_norm,
                 {"diffusion": cfg.diffusion.type, "classes": classes, "rounds": cfg.num_rounds})
    evals = [r for r in tracker.history if r["kind"] == "eval"]
    summary |= {"completed": summary["rounds_done"] == cfg.num_rounds, "classes": classes,
                "chance_top1": 1 / len(classes),
                "final_top1": evals[-1]["top1"] if evals else None,
                "final_top5": evals[-1]["top5"] if evals else None,
                "final_eval_clips": evals[-1]["num_examples"] if evals else 0,
                "encoder_calls": sum(r["encoder_calls"] for r in tracker.history if r["kind"] in ("prepare", "train"))}
    tracker.finish(summary)
    log.info("done: final top1=%s (chance %.3f); outputs in %s", summary["final_top1"], summary["chance_top1"], run_dir)
