"""Flower ServerApp: validate the config, build targets and adapters, run the federated rounds."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from a2v_flower import config as C
from a2v_flower.cache import TensorCache
from a2v_flower.checkpoints import save_tensors
from a2v_flower.data.site import federation
from a2v_flower.diffusion import Renderer
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import encoder_dim
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.rendering import RoundRenderer
from a2v_flower.strategy import A2VStrategy
from a2v_flower.tracking import RunTracker, use_flower_logging

log = logging.getLogger("a2v_flower")
app = ServerApp()


def prepare_run(run_config: dict) -> tuple:
    """Config (validated, absolute paths) and the run folder it is saved in."""
    cfg = C.absolute_paths(C.load_config(run_config), Path.cwd())
    C.validate(cfg)
    given = str(run_config.get("config-file", "") or "")
    run_dir = Path(given).parent if given else C.run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    return cfg, run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num_rounds` of adapter federation and save the global adapters and a summary."""
    use_flower_logging()
    cfg, run_dir = prepare_run(dict(context.run_config))
    log.info("run folder: %s", run_dir)
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))  # validates the partition
    log.info("%d clips, %d classes, sites hold %s clips", len(clips), len(classes), [len(s) for s in sites])
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.text_spec(cfg),
                            C.t5_seq_len(cfg), TensorCache(Path(cfg.paths.cache_dir) / "targets"))
    dim = encoder_dim(C.audio_spec(cfg))
    replay = C.replay_spec(cfg, classes)  # validates generator groups against the classes

    def make_adapters():
        return build_adapters(dim, targets, cfg.adapter.width, cfg.adapter.heads, cfg.seed)

    adapters = make_adapters()
    tracker = RunTracker(run_dir, OmegaConf.to_container(cfg), cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name)
    n = cfg.federation.num_sites
    strategy = A2VStrategy(cfg.strategy.aggregation, targets, tracker, classes,
                           fraction_train=cfg.strategy.fraction_train,
                           fraction_evaluate=cfg.strategy.fraction_evaluate,
                           min_train_nodes=max(1, round(n * cfg.strategy.fraction_train)),
                           min_evaluate_nodes=max(1, round(n * cfg.strategy.fraction_evaluate)),
                           min_available_nodes=n, replay=replay, make_adapters=make_adapters,
                           train_spec=C.train_spec(cfg), seed=cfg.seed, token_shape=(cfg.model.audio.tokens, dim))
    every = 0 if cfg.mode.generator_only_mode else cfg.diffusion.render_every  # generator-only: never render
    render = RoundRenderer(Renderer(C.diffusion_spec(cfg)), every, run_dir / "images",
                           classes, targets, cfg.diffusion.judge, cfg.diffusion.free_after_render)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Per-round side effects on the global adapters: rendering (when due)."""
        if not render.due(server_round, cfg.num_rounds):
            return None
        adapters.load_state_dict(arrays.to_torch_state_dict())
        metrics = render(server_round, adapters, strategy.class_stats)
        tracker.log(server_round, "render", metrics, image=run_dir / "images" / f"round_{server_round:03d}" / "grid.png")
        return MetricRecord(metrics) if metrics else None

    run_cfg = ConfigRecord({"run-config": OmegaConf.to_yaml(cfg)})
    result = strategy.start(grid, ArrayRecord(adapters.state_dict()), cfg.num_rounds, cfg.federation.timeout,
                            train_config=run_cfg, evaluate_config=run_cfg, evaluate_fn=after_round)
    if len(result.arrays):  # empty when no round succeeded
        adapters.load_state_dict(result.arrays.to_torch_state_dict())
    save_tensors(run_dir / "adapters.safetensors", adapters.state_dict(),
                 {"diffusion": cfg.diffusion.type, "classes": classes, "rounds": cfg.num_rounds})
    evals = [r for r in tracker.history if r["kind"] == "eval"]
    summary = {"run_dir": str(run_dir), "rounds": cfg.num_rounds, "classes": classes,
               "chance_top1": 1 / len(classes),
               "final_top1": evals[-1]["top1"] if evals else None,
               "final_top5": evals[-1]["top5"] if evals else None,
               "encoder_calls": sum(r["encoder_calls"] for r in tracker.history if r["kind"] == "train")}
    tracker.finish(summary)
    log.info("done: final top1=%s (chance %.3f); outputs in %s", summary["final_top1"], summary["chance_top1"], run_dir)
