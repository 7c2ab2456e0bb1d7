"""Flower ClientApp: a site trains adapters on its cached audio embeddings and scores held-out clips."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import OmegaConf

from a2v_flower import config as C
from a2v_flower import replay as R
from a2v_flower.data.site import SiteData, load_site
from a2v_flower.metrics import retrieval
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
from a2v_flower.strategy import from_record, to_record
from a2v_flower.tracking import use_flower_logging
from a2v_flower.training import class_means, predict, train_adapters

log = logging.getLogger(__name__)
app = ClientApp()

# Per-process memo: in simulation one Ray actor serves many rounds (and sites), so the encoder and
# the embedded site data are built once; in deployment each message is a new process and the disk
# cache does the same job.
_ENCODERS: dict = {}
_SITES: dict = {}


def _setup(msg: Message, context: Context):
    """Config, site data, class targets and adapters (global, or this site's own when not aggregating)."""
    use_flower_logging()
    cfg = OmegaConf.create(str(msg.content["config"]["run-config"]))
    site_id = int(context.node_config["partition-id"])
    if "data-root" in context.node_config:  # deployment: each SuperNode may keep data elsewhere
        cfg.data.root = str(context.node_config["data-root"])
    if "cache-dir" in context.node_config:  # deployment: each SuperNode caches data/embeddings locally
        cfg.paths.cache_dir = str(context.node_config["cache-dir"])
    n = context.node_config.get("num-partitions")
    if n is not None and int(n) != cfg.federation.num_sites:
        raise ValueError(f"SuperNode num-partitions={n} but federation.num_sites={cfg.federation.num_sites}")
    data, part, aspec = C.data_spec(cfg), C.partition_spec(cfg), C.audio_spec(cfg)
    encoder = _ENCODERS.setdefault(aspec, AudioEncoder(aspec))
    key = (data, part, aspec, site_id)
    if key not in _SITES:
        _SITES[key] = load_site(data, part, encoder, site_id)
    if "targets" in msg.content:  # sent once per node; kept for later rounds
        context.state["targets"] = msg.content["targets"]
    if "targets" not in context.state:
        raise RuntimeError(f"site {site_id}: no class targets received from the server")
    targets = from_record(context.state["targets"])
    adapters = build_adapters(encoder_dim(aspec), targets, cfg.adapter.width, cfg.adapter.heads, cfg.seed)
    own = cfg.strategy.aggregation == "none" and "adapters" in context.state
    adapters.load_state_dict((context.state["adapters"] if own else msg.content["arrays"]).to_torch_state_dict())
    adapters.to("cuda" if torch.cuda.is_available() else "cpu")  # each process picks CUDA when present
    return cfg, site_id, _SITES[key], targets, adapters


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the adapters locally; reply with their weights, counts, per-class statistics and metrics."""
    cfg, site_id, site, targets, adapters = _setup(msg, context)
    x, y = site.splits["train"]
    rnd = int(msg.content["config"]["server-round"])
    replay = C.replay_spec(cfg, site.classes)
    extra, losses, quality = {}, {}, {}
    if replay is not None:
        states, losses = train_generators(context, msg, replay, x, y, site.classes, targets, site_id, rnd,
                                          cfg.num_rounds)
        sent = {key: (state if replay.shared else R.weights_only(state)) for key, state in states.items()}
        extra["generators"] = to_record(R.flatten(sent))
        quality = R.generator_quality(states, x, y, adapters, site.classes, replay, targets)
    if "synthetic" in msg.content:  # augmentation: the server's samples of classes this site lacks
        syn = from_record(msg.content["synthetic"])
        x, y = torch.cat([x, syn["x"]]), torch.cat([y, syn["y"].long()])
    calls, site.encoder_calls = site.encoder_calls, 0  # report each clip encoding once
    if replay is not None and replay.only:  # generator_only_mode: adapters untouched
        loss = 0.0
    else:
        loss = train_adapters(adapters, x, y, targets, C.train_spec(cfg), seed=cfg.seed + 7919 * rnd + site_id)
    adapters.cpu()  # what travels and what is kept are CPU tensors
    if cfg.strategy.aggregation == "none":
        context.state["adapters"] = ArrayRecord(adapters.state_dict())
    return Message(content=RecordDict({
        "arrays": ArrayRecord(adapters.state_dict()),
        "metrics": MetricRecord({"num-examples": len(y), "unit-weight": 1, "train_loss": loss, "site": site_id,
                                 "encoder_calls": calls, "skipped": len(site.skipped),
                                 "synthetic": len(y) - len(site.splits["train"][1]),
                                 "generator_loss": sum(losses.values()) / max(1, len(losses)),
                                 **quality}),
        "class_stats": class_stats(adapters, site, len(site.classes)),
        **extra,
    }), reply_to=msg)


def train_generators(context: Context, msg: Message, replay: R.ReplaySpec, x, y, classes, targets,
                     site_id: int, rnd: int, last_round: int) -> tuple[dict, dict]:
    """This site's generators: received (shared), loaded (pretrained) or kept in context.state; trained;
    checkpointed; returns their full states and the last training losses."""
    states = {name[4:]: from_record(rec) for name, rec in context.state.items() if name.startswith("gen/")}
    seen = {classes.index(c) for c in context.state["gen_seen"]["classes"]} if "gen_seen" in context.state else set()
    if "shared_generators" in msg.content:
        shared = R.unflatten(from_record(msg.content["shared_generators"]))
        log.info("[Client %s]: Receiving %d SHARED generators from server (sharing=averaged)", site_id, len(shared))
        states.update(shared)
    if replay.pretrained and not states:
        states, seen = R.load_site_generators(replay, site_id, classes, y)
    losses = {}
    if replay.train:
        states, losses = R.train_site_generators(states, seen, x, y, classes, replay.granularity, replay.groups,
                                                 replay.generator, targets, replay.reset_on_new_classes)
        seen |= set(y.unique().tolist())
        freq = replay.checkpoint_frequency
        R.save_site_generators(replay, site_id, states, classes, seen, tuple(x.shape[1:]), rnd,
                               round_copy=bool(freq) and (rnd % freq == 0 or rnd == last_round))
    for key, state in states.items():
        context.state[f"gen/{key}"] = to_record(state)
    context.state["gen_seen"] = ConfigRecord({"classes": sorted(classes[c] for c in seen)})
    return states, losses


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Zero-shot retrieval of the site's held-out clips among all federation classes."""
    cfg, site_id, site, targets, adapters = _setup(msg, context)
    x, y = site.splits[cfg.evaluate.split]
    if len(y) == 0:  # too few clips to hold any out: counts as zero examples in the global metrics
        zeros = [0] * len(site.classes)
        m = {"top1": 0.0, "top5": 0.0, "cosine": 0.0, "correct_per_class": zeros, "count_per_class": zeros}
    else:
        m = retrieval(predict(adapters, x), y, targets)
    return Message(content=RecordDict({"metrics": MetricRecord(m | {"num-examples": len(y), "site": site_id})}),
                   reply_to=msg)


def class_stats(adapters, site: SiteData, num_classes: int) -> ArrayRecord:
    """Per-class adapter-output means, audio-embedding mean/variance and counts of the train split."""
    x, y = site.splits["train"]
    stats = {f"out/{k}": v for k, v in class_means(predict(adapters, x), y).items()}
    for c in y.unique().tolist():
        stats[f"audio_mean/{c}"] = x[y == c].mean(0)
        stats[f"audio_var/{c}"] = x[y == c].var(0, unbiased=False)
    stats["counts"] = torch.bincount(y, minlength=num_classes).float()
    return to_record(stats)
