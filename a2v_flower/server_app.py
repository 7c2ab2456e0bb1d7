"""Flower ServerApp: size the run to the federation, check the config, build targets and adapters, run the rounds."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

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
from a2v_flower.schema import Config
from a2v_flower.server_generators import ServerGenerators
from a2v_flower.strategy import A2VStrategy
from a2v_flower.tracking import RunTracker, use_flower_logging
from a2v_flower.training import predict

log = logging.getLogger("a2v_flower")
app = ServerApp()


def prepare_run(run_config: dict, grid: Grid) -> tuple[Config, Path, dict[int, int]]:
    """The typed config (sized to the federation, checked, absolute paths), the run folder it is saved in (the
    resumed run's folder) and node -> site of the SuperNodes connected so far."""
    # a config file (a2v-run, deploy.py) or an override asked for its size; composed defaults follow the federation
    explicit = bool(run_config.get("config-file")) or "federation.num_sites" in str(run_config.get("overrides", ""))
    sized, node_sites = {}, {}

    def size(asked: int, timeout: float) -> int:
        sized["asked"], (sized["n"], found) = asked, federation_size(grid, asked, timeout, explicit)
        node_sites.update(found)
        return sized["n"]

    try:
        conf = preflight.check_run(C.for_federation(run_config, Path.cwd(), size))
    except ValueError as err:
        if sized.get("n") == sized.get("asked"):
            raise
        asked = sized["asked"]
        raise ValueError(f"{err} (the federation has {sized['n']} SuperNodes, the config asks for {asked} sites: "
                         f"start {asked} SuperNodes, e.g. flwr run --federation-config num-supernodes={asked}, "
                         "or change the config)") from None
    given = str(run_config.get("config-file", "") or "")
    run_dir = Path(conf.resume).resolve() if conf.resume else Path(given).parent if given else C.run_dir_for(conf)
    run_dir.mkdir(parents=True, exist_ok=True)
    conf.paths.run_dir = str(run_dir)  # sites keep their per-round state under <run_dir>/state
    (run_dir / ("config_resumed.yaml" if conf.resume else "config.yaml")).write_text(C.to_yaml(conf))
    return conf, run_dir, node_sites


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


def server_test_set(conf: Config, clips: list, sites: list[list[int]], classes: list[str]) -> tuple:
    """evaluate.mode=server: the clips no site holds, embedded here once (the disk cache keeps them): (x, y)."""
    from a2v_flower.data.site import embed_clips, server_clips
    from a2v_flower.models.audio_encoder import AudioEncoder

    audio = conf.model.audio
    x, kept, skipped = embed_clips(AudioEncoder(audio), server_clips(clips, sites),
                                   TensorCache(Path(conf.paths.cache_dir) / "embeddings"),
                                   int(conf.data.clip_seconds * audio.sampling_rate), desc="server test clips")
    log.info("server test set: %d clips no site holds (%d unreadable skipped)", len(kept), len(skipped))
    return x, torch.tensor([classes.index(c.category) for c in kept])


def prepare_nodes(grid: Grid, conf: Config, resumed_norm: bool) -> list[int]:
    """Nodes prepared before round 1: all when every site trains in round 1; with sampling, a seeded sample of
    one round's size when the input standardisation must be estimated (else sites prepare when first drawn)."""
    nodes = sorted(grid.get_node_ids())
    if conf.strategy.fraction_train >= 1:
        return nodes
    if not conf.adapter.normalise or resumed_norm:
        return []
    k = max(1, math.ceil(conf.strategy.fraction_train * len(nodes)))
    return sorted(random.Random(conf.seed).sample(nodes, k))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds. summary.json says whether this run (its id) completed them and which sites failed."""
    use_flower_logging()
    run_config = dict(context.run_config)
    given = str(run_config.get("config-file", "") or "")
    run_dir = Path(given).parent if given else None
    summary = {"run_id": str(run_config.get("launch-id") or f"flwr-{context.run_id}"), "completed": False}
    try:
        conf, run_dir, node_sites = prepare_run(run_config, grid)
        run_rounds(grid, conf, run_dir, node_sites, summary)
    except Exception as err:
        summary["error"] = " ".join(str(err).split()) or type(err).__name__
        log.error("run stopped: %s", summary["error"])
        if run_dir is not None and run_dir.is_dir():  # what a launcher reads: not a summary of an older run
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        raise


def run_rounds(grid: Grid, conf: Config, run_dir: Path, node_sites: dict[int, int], summary: dict) -> None:
    """Run `num_rounds` of adapter federation; save the global adapters and complete `summary`."""
    log.info("run folder: %s", run_dir)
    # 1. The federation: clips, classes and each site's clips (partition.json), the class targets, the tracker.
    clips, classes, sites = describe_federation(conf, run_dir, summary)
    targets = class_targets(classes, conf.prompt_template, conf.diffusion.type, conf.model.text,
                            conf.diffusion.t5_seq_len, TensorCache(Path(conf.paths.cache_dir) / "targets"),
                            C.server_device(conf))
    tracker = RunTracker(run_dir, C.plain(conf), conf.wandb)
    run_yaml = C.to_yaml(conf)
    # 2. A resumed run's last checkpoint; else the sites embed their clips and send the moments of their
    #    embeddings, which standardise the adapters' input (adapter.normalise).
    resumed = load_server_checkpoint(run_dir, conf) if conf.resume else None  # (round, adapters, state, meta)
    norm = input_standardisation(grid, conf, resumed, run_yaml, tracker)
    # 3. The global adapters and the server's side of generators (a resumed run's state restored into both).
    adapters, generators, done, best_acc = global_models(conf, classes, targets, norm, resumed)
    if resumed:
        tracker.keep_rounds(done)
        log.info("resuming %s after round %d of %d", run_dir, done, conf.num_rounds)
    # 4. What ends a round: rendering (when due), the server's own test set (evaluate.mode=server), the checkpoint.
    render = round_renderer(conf, run_dir, classes, targets)
    held_out = server_test_set(conf, clips, sites, classes) if conf.evaluate.mode == "server" else None
    # 5. The strategy, complete: FedAvg of the adapters, with everything a round needs.
    strategy = build_strategy(conf, clips, sites, classes, render, generators, tracker, node_sites,
                              handout={"targets": targets, "run-config": run_yaml, "input_norm": norm},
                              resumed=(done, best_acc))
    after_round = round_end(conf, run_dir, adapters, generators, strategy, tracker, render, held_out, targets,
                            classes, summary, done)
    # 6. The rounds; summary.json says which sites failed, and why, even when a round failed.
    summary |= {"run_dir": str(run_dir), "rounds": conf.num_rounds, "rounds_done": done,
                "num_sites": conf.federation.num_sites, "min_sites": strategy.min_sites}
    digest = ConfigRecord({"config-sha1": sha1_of(run_yaml)[:12]})  # the config travels once per node; then its hash
    try:
        result = strategy.start(grid, ArrayRecord(adapters.state_dict()), conf.num_rounds - done,
                                conf.federation.timeout, train_config=digest, evaluate_config=digest,
                                evaluate_fn=after_round)
    except BaseException:
        if tracker.wandb is not None:
            tracker.wandb.finish(exit_code=1)  # the wandb run is marked failed
        raise
    finally:
        summary["failures"] = {str(r): sites for r, sites in strategy.failures.rounds.items()}
    # 7. The global adapters (with their input standardisation) and the run's summary.
    if len(result.arrays):  # empty when no round succeeded
        adapters.load_state_dict(result.arrays.to_torch_state_dict())
    finish_run(conf, run_dir, adapters, tracker, classes, summary)


def global_models(conf: Config, classes: list[str], targets: dict, norm: dict | None, resumed: tuple | None):
    """The global adapters (inputs standardised with `norm`) and the server's side of generators, with a resumed
    run's state restored: (adapters, generators, rounds done, best accuracy per class so far)."""
    dim = encoder_dim(conf.model.audio)
    make_adapters = partial(build_adapters, dim, targets, seed=conf.seed, norm=norm, **C.adapter_keywords(conf))
    adapters = make_adapters()
    generators = ServerGenerators(classes=classes, class_targets=targets, token_shape=(conf.model.audio.tokens, dim),
                                  make_adapters=make_adapters, train_spec=conf.train, options=conf.replay,
                                  seed=conf.seed, replay=C.replay_spec(conf, classes),
                                  server_gen=conf.server_generator, kd=conf.strategy.aggregation == "kd",
                                  device=C.server_device(conf))
    if not resumed:
        return adapters, generators, 0, {}
    done, state, strategy_state, meta = resumed  # continue after the newest server checkpoint
    adapters.load_state_dict(state)
    generators.load_state_tensors(strategy_state)
    return adapters, generators, done, {int(c): acc for c, acc in meta.get("best_acc", {}).items()}


def build_strategy(conf: Config, clips: list, sites: list[list[int]], classes: list[str], render,
                   generators: ServerGenerators, tracker: RunTracker, node_sites: dict[int, int], handout: dict,
                   resumed: tuple[int, dict]) -> A2VStrategy:
    """The strategy of the run: sampling, the rounds a site may miss, what nodes get once, which classes count as
    seen in a round (class-incremental schedule) and how many held-out clips each site renders."""
    schedule, held = C.schedule_of(conf), held_classes(clips, sites)
    return A2VStrategy(
        aggregation=conf.strategy.aggregation, fraction_train=conf.strategy.fraction_train,
        fraction_evaluate=conf.strategy.fraction_evaluate, num_sites=conf.federation.num_sites,
        min_sites=C.min_sites(conf), timeout=conf.federation.timeout, handout=handout, tracker=tracker,
        classes=classes, generators=generators,
        seen_fn=lambda rnd: {classes.index(c) for c in seen_classes(schedule, held, rnd)},
        clip_images=lambda rnd: conf.diffusion.clip_images if render and render.due(rnd, conf.num_rounds) else 0,
        wire=conf.adapter.wire, evaluate_on_sites=conf.evaluate.mode == "federated", site_of_node=node_sites,
        resumed=resumed)


def describe_federation(conf: Config, run_dir: Path, summary: dict) -> tuple[list, list[str], list[list[int]]]:
    """Clips, classes and each site's clip indices; partition.json (site -> clip ids: ESC-50 file names, a Hugging
    Face clip's content hash), and a warning for sites too small for a held-out split."""
    data = C.data_spec(conf)
    clips, classes, sites = federation(data, C.partition_spec(conf))
    (run_dir / "partition.json").write_text(json.dumps({"mode": conf.partition.mode, "seed": conf.seed, "sites": {
        str(s): [clips[i].path.name for i in idx] for s, idx in enumerate(sites)}}, indent=1))
    sizes = [len(s) for s in sites]
    log.info("%d clips, %d classes, sites hold %s clips", len(clips), len(classes),
             sizes if len(sites) <= 20 else f"{min(sizes)}-{max(sizes)}")
    split = conf.evaluate.split
    no_eval = [s for s, idx in enumerate(sites)
               if not split_site([classes.index(clips[i].category) for i in idx], data, s)[split]]
    if no_eval:  # they still train; their evaluation replies count zero examples
        log.warning("%d of %d sites hold too few clips for a %s split (first: %s)", len(no_eval), len(sites),
                    split, no_eval[:5])
    summary["sites_without_eval_clips"] = len(no_eval)
    return clips, classes, sites


def input_standardisation(grid: Grid, conf: Config, resumed: tuple | None, run_yaml: str,
                          tracker: RunTracker) -> dict[str, torch.Tensor] | None:
    """The adapters' input mean and std (None with adapter.normalise=false): a resumed run's, else pooled from
    the moments the prepared sites send (the sites embed their clips before round 1 either way)."""
    norm = ({k[len("input_norm/"):]: resumed[2].pop(k) for k in list(resumed[2]) if k.startswith("input_norm/")}
            if resumed else None) or None
    nodes = prepare_nodes(grid, conf, norm is not None)
    moments = prepare_sites(grid, nodes, run_yaml, tracker, conf.federation.timeout) if nodes else []
    if not conf.adapter.normalise:
        return None
    if norm is None:  # the federation's moments: sent once per node, with the targets
        if not moments:
            raise RuntimeError(f"no site sent its embedding moments before round 1 ({len(nodes)} asked, none answered "
                               f"within federation.timeout={conf.federation.timeout} s): the adapters' input "
                               "standardisation needs them (adapter.normalise=false runs without)")
        norm = input_norm(moments)
        log.info("adapter inputs standardised with the moments of %d sites' training embeddings", len(moments))
    return norm


def round_renderer(conf: Config, run_dir: Path, classes: list[str], targets: dict):
    """The renderer of render rounds (None when nothing renders: diffusion.render_every=0, or generator-only
    runs that never train the adapters). diffusers (3 s of CPU to import) is imported only for a run that renders."""
    untrained = conf.mode.generator_only_mode and not conf.replay.refine_epochs  # one-shot trains them on the server
    d = conf.diffusion
    if untrained or not d.render_every:
        return None
    from a2v_flower.rendering.pipelines import Renderer
    from a2v_flower.rendering.rounds import RoundRenderer

    device = C.server_device(conf)
    return RoundRenderer(Renderer(d, device), every=d.render_every, out_dir=run_dir / "images", classes=classes,
                         targets=targets, judge_id=d.judge, free_after=d.free_after_render, device=device)


def saved_input_norm(adapters) -> dict[str, torch.Tensor]:
    """The adapters' input standardisation as saved beside their weights (`input_norm/mean|std`; none if off)."""
    return {f"input_norm/{k}": v for k, v in (adapters.input_norm() or {}).items()}


def round_end(conf: Config, run_dir: Path, adapters, generators: ServerGenerators, strategy: A2VStrategy,
              tracker: RunTracker, render, held_out: tuple | None, targets: dict, classes: list[str],
              summary: dict, done: int):
    """Flower's evaluate_fn: the end of each round (its number counted from the start of the run)."""
    saved_norm = saved_input_norm(adapters)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Rendering (when due), the server checkpoint, and the round's one line on the console."""
        if server_round == 0:  # Flower's call before the first round: nothing to do
            return None
        server_round += done
        summary["rounds_done"] = server_round
        adapters.load_state_dict(arrays.to_torch_state_dict())
        save_server_checkpoint(run_dir, server_round, adapters, generators.state_tensors() | saved_norm,
                               {"best_acc": {str(c): a for c, a in strategy.best_acc.items()}}, conf)
        metrics = {}
        if held_out is not None:  # evaluate.mode=server: the global adapters on the clips no site holds
            row = retrieval(predict(adapters, held_out[0]), held_out[1], targets) | {"num-examples": len(held_out[1])}
            glob = pool_evaluations({"server": row}, classes, sorted(strategy.seen_fn(server_round)), strategy.best_acc)
            tracker.log(server_round, "eval", glob | {"trained_here": 0.0})
        if render and render.due(server_round, conf.num_rounds):
            metrics = render(server_round, adapters, generators.class_stats, conf.num_rounds)
            tracker.log(server_round, "render", metrics,
                        image=run_dir / "images" / f"round_{server_round:03d}" / "grid.png")
        ev = next((r for r in tracker.history if r["kind"] == "eval" and r["round"] == server_round), None)
        seconds, failed = round(time.time() - strategy.round_started, 1), strategy.failures.count(server_round)
        scores = ("top-1 {top1:.3f} ({hits}/{num_examples} clips) | top-5 {top5:.3f} | seen top-1 {seen_top1:.3f} | "
                  "forgetting {forgetting:.3f}".format(**ev, hits=round(ev["top1"] * ev["num_examples"]))
                  if ev else "no held-out clips evaluated")
        log.info("round %d/%d: %s | failures %d | %.1f s", server_round, conf.num_rounds, scores, failed, seconds)
        return MetricRecord(metrics | {"failures": failed, "seconds": seconds})

    return after_round


def finish_run(conf: Config, run_dir: Path, adapters, tracker: RunTracker, classes: list[str], summary: dict) -> None:
    """adapters.safetensors (with the input standardisation beside the weights) and summary.json."""
    save_tensors(run_dir / "adapters.safetensors", adapters.state_dict() | saved_input_norm(adapters),
                 {"diffusion": conf.diffusion.type, "classes": classes, "rounds": conf.num_rounds})
    evals = [r for r in tracker.history if r["kind"] == "eval"]
    summary |= {"completed": summary["rounds_done"] == conf.num_rounds, "classes": classes,
                "chance_top1": 1 / len(classes),
                "final_top1": evals[-1]["top1"] if evals else None,
                "final_top5": evals[-1]["top5"] if evals else None,
                "final_eval_clips": evals[-1]["num_examples"] if evals else 0,
                "encoder_calls": sum(r["encoder_calls"] for r in tracker.history if r["kind"] in ("prepare", "train"))}
    tracker.finish(summary)
    log.info("done: final top1=%s (chance %.3f); outputs in %s", summary["final_top1"], summary["chance_top1"], run_dir)
