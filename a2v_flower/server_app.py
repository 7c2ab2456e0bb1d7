"""Flower ServerApp: validate the config, build targets and adapters, run the federated rounds."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from a2v_flower import config as C
from a2v_flower import preflight
from a2v_flower.cache import TensorCache
from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.data.schedule import held_classes, seen_classes
from a2v_flower.data.site import federation
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import encoder_dim
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.strategy import A2VStrategy, query_sites
from a2v_flower.tracking import RunTracker, use_flower_logging

log = logging.getLogger("a2v_flower")
app = ServerApp()


def prepare_run(run_config: dict, grid: Grid) -> tuple:
    """Config (sized to the federation, checked, absolute paths), the run folder it is saved in (the resumed
    run's folder) and node -> site of the SuperNodes connected so far."""
    cfg = C.absolute_paths(C.load_config(run_config), Path.cwd())
    asked = cfg.federation.num_sites
    # a config file (a2v-run, deploy.py) or an override asked for its size; composed defaults follow the federation
    explicit = bool(run_config.get("config-file")) or "federation.num_sites" in str(run_config.get("overrides", ""))
    cfg.federation.num_sites, node_sites = federation_size(grid, cfg, explicit)
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


def federation_size(grid: Grid, cfg, explicit: bool) -> tuple[int, dict[int, int]]:
    """The number of sites is the federation's: the num-partitions its SuperNodes report (the config's when
    none do). Refused, naming both numbers: SuperNodes that disagree, or a config that asked for another size."""
    asked, timeout, start = cfg.federation.num_sites, cfg.federation.timeout, time.monotonic()
    while not (nodes := list(grid.get_node_ids())):
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"no SuperNode connected within federation.timeout={timeout} s")
        time.sleep(1)
    reports = query_sites(grid, nodes, timeout)  # node -> (partition-id, num-partitions)
    sizes = sorted({size for _, size in reports.values() if size})
    if len(sizes) > 1:
        raise ValueError(f"SuperNodes disagree on num-partitions: {sizes}; give every SuperNode the same "
                         "--node-config num-partitions=N")
    have = sizes[0] if sizes else asked
    if have != asked and explicit:
        raise ValueError(f"federation.num_sites={asked} but the federation has {have} SuperNodes (num-partitions="
                         f"{have}); set federation.num_sites={have}, or start {asked} SuperNodes (simulation: "
                         f"flwr run --federation-config num-supernodes={asked})")
    if out := sorted(site for site, _ in reports.values() if not 0 <= site < have):
        raise ValueError(f"SuperNodes with partition-id {out}: expected 0..{have - 1} for {have} sites")
    if have != asked:
        log.warning("federation.num_sites=%d but the federation has %d SuperNodes: the run has %d sites", asked,
                    have, have)
    return have, {node: site for node, (site, _) in reports.items()}


# What must match between a run and its resumption (rounds, names, paths and rendering may change).
RESUME_KEYS = ("seed", "data", "partition", "model", "adapter", "train", "strategy", "generator", "granularity",
               "sharing", "reset", "mode", "replay", "server_generator", "schedule", "prompt_template", "federation.num_sites",
               "diffusion.type")


def save_checkpoint(run_dir: Path, rnd: int, adapters, strategy: A2VStrategy, cfg) -> Path:
    """<run_dir>/checkpoints/server_round_{R}.safetensors: global adapters, strategy state, round; the
    previous round's file is kept (a crash while sites save their round-R state must not lose R-1)."""
    tensors, meta = strategy.state_tensors()
    tensors |= {f"adapters/{k}": v for k, v in adapters.state_dict().items()}
    meta |= {"round": rnd, "resume_keys": {k: _plain(OmegaConf.select(cfg, k)) for k in RESUME_KEYS}}
    folder = run_dir / "checkpoints"
    path = save_tensors(folder / f"server_round_{rnd}.safetensors", tensors, meta)
    for old in folder.glob("server_round_*.safetensors"):
        if int(old.stem.rsplit("_", 1)[1]) < rnd - 1:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path, cfg) -> tuple[int, dict, dict, dict]:
    """The newest server checkpoint of `run_dir`: (round, adapter state, strategy tensors, metadata).
    Raises naming the file if it is corrupt, and the key with both values if the config differs."""
    folder, files = run_dir / "checkpoints", []
    for path in sorted(folder.glob("[!.]*")):  # hidden temp files of an interrupted write are not checkpoints
        match = re.fullmatch(r"server_round_(\d+)\.safetensors", path.name)
        if not match:
            raise ValueError(f"resume: {path} is not a server checkpoint (expected server_round_<R>.safetensors); "
                             f"move it out of {folder}")
        files.append((int(match.group(1)), path))
    if not files:
        raise FileNotFoundError(f"resume={str(run_dir)!r}: no server_round_*.safetensors in {folder}")
    files = [path for _, path in sorted(files)]
    tensors, meta = load_tensors(files[-1])
    if "resume_keys" not in meta or meta.get("round") != int(files[-1].stem.rsplit("_", 1)[1]):
        raise ValueError(f"resume: {files[-1]} has no resume metadata of its round (it holds {sorted(meta)}): "
                         "not a server checkpoint written by this app")
    for key, saved in meta.get("resume_keys", {}).items():
        now = _plain(OmegaConf.select(cfg, key))
        if now != saved:
            raise ValueError(f"resume: {key}={now!r} differs from the checkpoint's {key}={saved!r} ({files[-1]}); "
                             "a resumed run must use the same config (num_rounds, name, paths may change)")
    rnd = int(meta["round"])
    if rnd >= cfg.num_rounds:
        raise ValueError(f"resume: {files[-1]} is at round {rnd} but num_rounds={cfg.num_rounds}; "
                         f"set num_rounds above {rnd} to train further")
    adapters = {k[9:]: v for k, v in tensors.items() if k.startswith("adapters/")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("adapters/")}
    return rnd, adapters, rest, meta


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


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
    from a2v_flower.diffusion import Renderer  # diffusers: imported by a run, not by resume pre-checks
    from a2v_flower.rendering import RoundRenderer

    log.info("run folder: %s", run_dir)
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))  # validates the partition
    held, schedule = held_classes(clips, sites), C.schedule_of(cfg)  # both checked by preflight.check_run
    log.info("%d clips, %d classes, sites hold %s clips", len(clips), len(classes), [len(s) for s in sites])
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.text_spec(cfg),
                            C.t5_seq_len(cfg), TensorCache(Path(cfg.paths.cache_dir) / "targets"))
    dim = encoder_dim(C.audio_spec(cfg))
    replay = C.replay_spec(cfg, classes)  # validates generator groups against the classes

    def make_adapters():
        return build_adapters(dim, targets, cfg.adapter.width, cfg.adapter.heads, cfg.seed)

    adapters = make_adapters()
    tracker = RunTracker(run_dir, OmegaConf.to_container(cfg), cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name)
    n, low = cfg.federation.num_sites, C.min_sites(cfg)  # rounds go on with >= min_sites of the n sites
    strategy = A2VStrategy(cfg.strategy.aggregation, targets, tracker, classes,
                           fraction_train=cfg.strategy.fraction_train,
                           fraction_evaluate=cfg.strategy.fraction_evaluate,
                           min_train_nodes=max(1, round(low * cfg.strategy.fraction_train)),
                           min_evaluate_nodes=max(1, round(low * cfg.strategy.fraction_evaluate)),
                           min_available_nodes=low, replay=replay, make_adapters=make_adapters,
                           train_spec=C.train_spec(cfg), seed=cfg.seed, token_shape=(cfg.model.audio.tokens, dim),
                           seen_fn=lambda rnd: {classes.index(c) for c in seen_classes(schedule, held, rnd)},
                           timeout=cfg.federation.timeout, server_gen=C.server_generator_spec(cfg),
                           num_sites=n, min_sites=low)
    strategy.site_of_node.update(node_sites)
    done = 0
    if cfg.resume:  # continue after the newest server checkpoint; sites restore their state of that round
        done, state, strategy_state, meta = load_checkpoint(run_dir, cfg)
        adapters.load_state_dict(state)
        strategy.load_state_tensors(strategy_state, meta)
        strategy.round_offset = strategy.resume_round = done
        tracker.keep_rounds(done)
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.num_rounds)
    every = 0 if cfg.mode.generator_only_mode else cfg.diffusion.render_every  # generator-only: never render
    render = RoundRenderer(Renderer(C.diffusion_spec(cfg)), every, run_dir / "images",
                           classes, targets, cfg.diffusion.judge, cfg.diffusion.free_after_render)
    strategy.clip_images = lambda rnd: cfg.diffusion.clip_images if render.due(rnd, cfg.num_rounds) else 0

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """End of a round: rendering (when due) and the server checkpoint."""
        if server_round == 0:  # Flower's call before the first round: nothing to do
            return None
        server_round += done
        summary["rounds_done"] = server_round
        adapters.load_state_dict(arrays.to_torch_state_dict())
        save_checkpoint(run_dir, server_round, adapters, strategy, cfg)
        if not render.due(server_round, cfg.num_rounds):
            return None
        metrics = render(server_round, adapters, strategy.class_stats)
        tracker.log(server_round, "render", metrics, image=run_dir / "images" / f"round_{server_round:03d}" / "grid.png")
        return MetricRecord(metrics) if metrics else None

    run_cfg = ConfigRecord({"run-config": OmegaConf.to_yaml(cfg)})
    summary |= {"run_dir": str(run_dir), "rounds": cfg.num_rounds, "rounds_done": done, "num_sites": n,
                "min_sites": low}
    try:
        result = strategy.start(grid, ArrayRecord(adapters.state_dict()), cfg.num_rounds - done,
                                cfg.federation.timeout, train_config=run_cfg, evaluate_config=run_cfg,
                                evaluate_fn=after_round)
    except BaseException:
        if tracker.wandb is not None:
            tracker.wandb.finish(exit_code=1)  # the wandb run is marked failed
        raise
    finally:  # also when a round failed: which sites failed, and why
        summary["failures"] = {str(r): sites for r, sites in strategy.failures.items()}
    if len(result.arrays):  # empty when no round succeeded
        adapters.load_state_dict(result.arrays.to_torch_state_dict())
    save_tensors(run_dir / "adapters.safetensors", adapters.state_dict(),
                 {"diffusion": cfg.diffusion.type, "classes": classes, "rounds": cfg.num_rounds})
    evals = [r for r in tracker.history if r["kind"] == "eval"]
    summary |= {"completed": summary["rounds_done"] == cfg.num_rounds, "classes": classes,
                "chance_top1": 1 / len(classes),
                "final_top1": evals[-1]["top1"] if evals else None,
                "final_top5": evals[-1]["top5"] if evals else None,
                "encoder_calls": sum(r["encoder_calls"] for r in tracker.history if r["kind"] == "train")}
    tracker.finish(summary)
    log.info("done: final top1=%s (chance %.3f); outputs in %s", summary["final_top1"], summary["chance_top1"], run_dir)
