"""Flower ClientApp: a site trains adapters on its cached audio embeddings and scores held-out clips."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from a2v_flower import config as C
from a2v_flower import site_generators
from a2v_flower.cache import TensorCache, sha1_of
from a2v_flower.data.schedule import stage_classes
from a2v_flower.data.site import SiteData, load_site
from a2v_flower.metrics import retrieval
from a2v_flower.models.adapters import build_adapters, embedding_moments
from a2v_flower.models.audio_encoder import AudioEncoder
from a2v_flower.models.generators import ReplaySpec
from a2v_flower.names import safe_name
from a2v_flower.records import flatten, from_record, to_record, unflatten
from a2v_flower.resume import restore_site_state, save_site_state, site_state_dir
from a2v_flower.schema import Config
from a2v_flower.tracking import use_flower_logging
from a2v_flower.training import class_means, predict, train_adapters

log = logging.getLogger(__name__)
app = ClientApp()

# Per-process memo: in simulation one Ray actor serves many rounds (and sites), so the encoder and
# the embedded site data are built once; in deployment each message is a new process and the disk
# cache does the same job.
_ENCODERS: dict = {}
_SITES: dict = {}    # at most MEMO_SITES sites per process; the disk cache holds every site's embeddings
_CONFIGS: dict = {}  # (run config text, node's local paths) -> (its typed config, sha1 of both)
_TARGETS: dict = {}  # run config sha1 -> class targets (on disk too: a node's next message may reach another actor)
MEMO_SITES = 64
RECEIVED_KEPT = 16  # class targets of that many run configs stay in <cache_dir>/received


def _site(msg: Message, context: Context) -> tuple:
    """The run config (with this node's data root and cache), the site id and its embedded clips (memoised)."""
    use_flower_logging()
    site_id = int(context.node_config["partition-id"])
    conf = run_config(msg, context, site_id)
    n = context.node_config.get("num-partitions")
    if n is not None and int(n) != conf.federation.num_sites:
        raise ValueError(f"SuperNode num-partitions={n} but federation.num_sites={conf.federation.num_sites}")
    data, part, aspec, device = C.data_spec(conf), C.partition_spec(conf), conf.model.audio, C.site_device(conf)
    if (repr(aspec), device) not in _ENCODERS:  # setdefault would build (and hash) a new encoder on every message
        _ENCODERS[repr(aspec), device] = AudioEncoder(aspec, device)
    encoder = _ENCODERS[repr(aspec), device]
    key = (data, part, repr(aspec), site_id)
    if key not in _SITES:
        if len(_SITES) >= MEMO_SITES:  # a simulated actor serves many of 1000 sites: keep the latest only
            del _SITES[next(iter(_SITES))]
        _SITES[key] = load_site(data, part, encoder, site_id)
    return conf, site_id, _SITES[key]


def _setup(msg: Message, context: Context):
    """Config, site data, class targets and adapters (global, or this site's own when not aggregating)."""
    conf, site_id, site = _site(msg, context)
    targets = received(msg, conf, site_id, "targets")
    norm = received(msg, conf, site_id, "input_norm") if conf.adapter.normalise else None
    dim = site.splits["train"][0].shape[-1]  # D of the cached embeddings: no transformers import for it
    adapters = build_adapters(dim, targets, seed=conf.seed, norm=norm, **C.adapter_keywords(conf))
    resumed = int(msg.content["config"].get("resume-round", 0))
    if resumed and "restored" not in context.state:  # first message of a resumed run: this site's saved state
        restore_site_state(site_state_dir(conf, context.node_config), site_id, resumed, context.state)
        context.state["restored"] = ConfigRecord({"round": resumed})
    own = conf.strategy.aggregation == "none" and "adapters" in context.state
    if own or "arrays" in msg.content:  # "train.generators" messages carry no adapters
        adapters.load_state_dict((context.state["adapters"] if own else msg.content["arrays"]).to_torch_state_dict())
    adapters.to(C.site_device(conf))  # device.site: auto = the GPU Ray handed this actor, else the CPU
    return conf, site_id, site, targets, adapters


def received(msg: Message, conf: Config, site_id: int, name: str) -> dict[str, torch.Tensor]:
    """What the server sends once per node (`name`: "targets", the class targets, or "input_norm", the adapters'
    input standardisation), then kept once per process and on disk, keyed by the run config: not in every
    node's context.state (in simulation those live in the ServerApp's process, one per site)."""
    key = sha1_of(next(digest for c, digest in _CONFIGS.values() if c is conf), name)  # not to_yaml: 30 ms a call
    cache = TensorCache(Path(conf.paths.cache_dir) / "received")
    if name in msg.content:
        _TARGETS[key] = from_record(msg.content[name])
        if not cache.path(key).is_file():
            cache.put(key, _TARGETS[key])
            cache.prune(keep=RECEIVED_KEPT)  # one entry per run config: the newest few are the runs going on
    if key not in _TARGETS and (found := cache.get(key)) is not None:
        _TARGETS[key] = found
    if key not in _TARGETS:
        raise RuntimeError(f"site {site_id}: no {name} received from the server")
    return _TARGETS[key]


def run_config(msg: Message, context: Context, site_id: int) -> Config:
    """The run's typed config: sent once per node (kept in context.state), checked against the message's hash,
    with this node's data root and cache folder (node config data-root / cache-dir: a deployment's SuperNode may
    keep them elsewhere)."""
    if "run-config" in msg.content:
        context.state["run-config"] = msg.content["run-config"]
    if "run-config" not in context.state:
        raise RuntimeError(f"site {site_id}: no run config received from the server")
    text = str(context.state["run-config"]["yaml"])
    digest = msg.content["config"].get("config-sha1", "") if "config" in msg.content else ""
    if digest and digest != sha1_of(text)[:12]:
        raise RuntimeError(f"site {site_id}: its run config (sha1 {sha1_of(text)[:12]}) is not the server's "
                           f"(config-sha1 {digest})")
    local = {k: str(context.node_config[n]) for k, n in (("data.root", "data-root"), ("paths.cache_dir", "cache-dir"))
             if n in context.node_config}
    memo = (text, tuple(sorted(local.items())))
    if memo not in _CONFIGS:  # typing and checking a config costs ~60 ms: once per process and run
        _CONFIGS.clear()
        _CONFIGS[memo] = C.typed(text, local), sha1_of(*memo)
    return _CONFIGS[memo][0]


def round_data(conf: Config, site: SiteData, site_id: int, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split restricted to this round's stage of the class-incremental schedule (if any)."""
    x, y = site.splits["train"]
    names = stage_classes(C.schedule_of(conf), site_id, rnd)
    if names is None:
        return x, y
    keep = torch.isin(y, torch.tensor([site.classes.index(c) for c in names]))
    return x[keep], y[keep]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the adapters locally; reply with their weights, counts, per-class statistics and metrics."""
    conf, site_id, site, targets, adapters = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    x, y = round_data(conf, site, site_id, rnd)
    trained = _trained(context, site, y)
    replay = C.replay_spec(conf, site.classes)
    extra, figures = {}, {}
    if replay is not None:
        sequential = replay.sharing == "sequential"
        states, losses, resets = train_generators(context, msg, replay, conf, site, site_id, x, y, targets, rnd,
                                                  train=replay.train and not sequential)
        figures = site_generators.generator_report(losses, resets)
        done = context.state.pop("gen_pass", None)  # sequential: this round's "train.generators" pass trained them
        if sequential and done is not None and done["round"] == rnd:
            figures = {k: v for k, v in done.items() if k != "round"}
        if replay.sharing == "none":
            extra["generators"] = to_record(flatten({k: site_generators.weights_only(v) for k, v in states.items()}))
        elif replay.sharing == "averaged":
            extra["generators"] = to_record(flatten(states))
        figures |= site_generators.generator_quality(states, x, y, adapters, site.classes, replay, targets,
                                                     C.site_device(conf))
        per_key = {k[4:]: v for k, v in figures.items() if k.startswith("gen/")}  # "<key>/<figure>"
        figures = {k: v for k, v in figures.items() if not k.startswith("gen/")}
        extra["generator_report"] = ConfigRecord(per_key)  # keys differ between sites: not a MetricRecord
        site_generators.log_generators(site_id, replay, unflatten(per_key))
    n_real = len(y)  # the site's own clips come first; synthetic samples follow
    if "synthetic" in msg.content:  # augmentation / replay: the server's samples of classes this site lacks
        syn = from_record(msg.content["synthetic"])
        x, y = torch.cat([x, syn["x"]]), torch.cat([y, syn["y"].long()])
    if bad := int((~torch.isfinite(x)).flatten(1).any(1).sum()):  # e.g. a NaN embedding: never trained on
        raise ValueError(f"site {site_id}: {bad} of {len(x)} training inputs hold NaN or Inf; refusing to train")
    calls, site.encoder_calls = site.encoder_calls, 0  # report each clip encoding once
    if replay is not None and replay.only:  # generator_only_mode: adapters untouched
        loss = 0.0
    else:
        loss = train_adapters(adapters, x, y, targets, conf.train, seed=conf.seed + 7919 * rnd + site_id)
    adapters.cpu()  # what travels and what is kept are CPU tensors
    if conf.strategy.aggregation == "none":
        context.state["adapters"] = ArrayRecord(adapters.state_dict())
    if (folder := site_state_dir(conf, context.node_config)) is not None:
        save_site_state(folder, site_id, rnd, context.state)
    return Message(content=RecordDict({
        "arrays": to_record(adapters.state_dict(), conf.adapter.wire),  # the server averages in float32
        "metrics": MetricRecord({"num-examples": len(y), "unit-weight": 1, "train_loss": loss, "site": site_id,
                                 "encoder_calls": calls, "skipped": len(site.skipped),
                                 "synthetic": len(y) - n_real, **figures}),
        "class_stats": class_stats(adapters, x[:n_real], y[:n_real], len(site.classes), trained,
                                   outputs=conf.server_generator.epochs > 0),
        **extra,
    }), reply_to=msg)


@app.train("generators")
def train_shared_generators(msg: Message, context: Context) -> Message:
    """sharing=sequential: train the shared generator states this site is handed, and hand them back; the
    pass's losses and resets are kept for this round's train reply, which reports them."""
    conf, site_id, site, targets, _ = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    x, y = round_data(conf, site, site_id, rnd)
    _trained(context, site, y)
    replay = C.replay_spec(conf, site.classes)
    states, losses, resets = train_generators(context, msg, replay, conf, site, site_id, x, y, targets, rnd,
                                              train=True)
    figures = site_generators.generator_report(losses, resets)
    context.state["gen_pass"] = MetricRecord(figures | {"round": rnd})
    mine = {key: states[key] for key in losses}  # the keys this site trained (it may hold only some classes)
    return Message(content=RecordDict({
        "generators": to_record(flatten(mine)),
        "metrics": MetricRecord({"site": site_id, "generator_loss": figures["generator_loss"],
                                 "resets": figures["resets"]}),
    }), reply_to=msg)


@app.query("site")
def which_site(msg: Message, context: Context) -> Message:
    """The partition id this node serves and the federation size it was given (num-partitions, 0 if unset):
    the server asks before round 1 to size the federation, and later when a node is new to it."""
    size = int(context.node_config.get("num-partitions", 0))
    return Message(content=RecordDict({"metrics": MetricRecord({"site": int(context.node_config["partition-id"]),
                                                                "num-partitions": size})}), reply_to=msg)


@app.query("prepare")
def prepare(msg: Message, context: Context) -> Message:
    """Before round 1: read and embed this site's clips (kept on disk for every later message and run), so that
    round 1 trains like any later round; reply with how many clips were embedded and skipped, and the count, sum
    and sum of squares per (token, dim) of its training embeddings (the adapters' input standardisation)."""
    _, site_id, site = _site(msg, context)
    calls, site.encoder_calls = site.encoder_calls, 0  # each clip's encoding is reported once
    return Message(content=RecordDict({"metrics": MetricRecord({
        "site": site_id, "clips": sum(len(y) for _, y in site.splits.values()), "encoder_calls": calls,
        "skipped": len(site.skipped)}),
        "input_moments": to_record(embedding_moments(site.splits["train"][0]))}), reply_to=msg)


def _trained(context: Context, site: SiteData, y: torch.Tensor) -> list[int]:
    """Classes this site has trained on in any round so far (kept in context.state), this round's included."""
    before = list(context.state["trained"]["classes"]) if "trained" in context.state else []
    now = sorted(set(before) | {site.classes[c] for c in y.unique().tolist()})
    context.state["trained"] = ConfigRecord({"classes": now})
    return [site.classes.index(c) for c in now]


def train_generators(context: Context, msg: Message, replay: ReplaySpec, conf: Config, site: SiteData,
                     site_id: int, x, y, targets, rnd: int, train: bool) -> tuple[dict, dict, dict]:
    """This site's generators: received (shared), loaded (pretrained) or kept in context.state; trained
    when `train`; checkpointed (generator_checkpoint.save); returns their full states, the loss components
    per key trained and the resets made (see `train_site_generators`)."""
    classes = site.classes
    states = {name[4:]: from_record(rec) for name, rec in context.state.items() if name.startswith("gen/")}
    seen = {classes.index(c) for c in context.state["gen_seen"]["classes"]} if "gen_seen" in context.state else set()
    if "shared_generators" in msg.content:
        shared = unflatten(from_record(msg.content["shared_generators"]))
        log.info("[Client %s]: Receiving %d SHARED generators from server (sharing=%s)", site_id, len(shared),
                 replay.sharing)
        states.update(shared)
    if replay.pretrained and not states:
        states, seen = site_generators.load_site_generators(replay, site_id, classes, y, tuple(x.shape[1:]))
    losses, resets = {}, {}
    if train:
        new = set(y.unique().tolist()) - seen
        if seen and new:
            log.info("[Client %s] Detected new classes: %s", site_id, sorted(classes[c] for c in new))
        scheduled = bool(replay.reset_every) and rnd > 1 and (rnd - 1) % replay.reset_every == 0
        val = site.splits["val"] if replay.generator.early_stopping_patience else None
        # mean/variance of every class this site has trained on: a reset's "quality before" needs them
        kept = from_record(context.state["class_moments"]) if "class_moments" in context.state else {}
        states, losses = site_generators.train_site_generators(
            states, seen, x, y, classes, replay.granularity, replay.groups, replay.generator, targets,
            replay.reset_on_new_classes, scheduled_reset=scheduled, layers=replay.reset_layers, val=val, resets=resets,
            moments=kept, site=site_id, device=C.site_device(conf))
        context.state["class_moments"] = to_record(kept | site_generators.class_moments(x, y))
        seen |= set(y.unique().tolist())
        freq = replay.checkpoint_frequency
        if replay.checkpoint_save:
            site_generators.save_site_generators(replay, site_id, states, classes, seen, tuple(x.shape[1:]), rnd,
                                   round_copy=bool(freq) and (rnd % freq == 0 or rnd == conf.num_rounds))
    if not replay.shared:  # shared states come from the server every round
        for key, state in states.items():
            context.state[f"gen/{key}"] = to_record(state)
    context.state["gen_seen"] = ConfigRecord({"classes": sorted(classes[c] for c in seen)})
    return states, losses, resets


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Zero-shot retrieval of the site's held-out clips among all federation classes."""
    conf, site_id, site, targets, adapters = _setup(msg, context)
    x, y = site.splits[conf.evaluate.split]
    if len(y) == 0:  # too few clips to hold any out: counts as zero examples in the global metrics
        zeros = [0] * len(site.classes)
        m = {"top1": 0.0, "top5": 0.0, "cosine": 0.0, "correct_per_class": zeros, "count_per_class": zeros}
    else:
        m = retrieval(predict(adapters, x), y, targets)
    trained = set(context.state["trained"]["classes"]) if "trained" in context.state else set()
    m["trained_here"] = sum(site.classes[c] in trained for c in y.tolist())  # clips of classes this site trained
    n_img = int(msg.content["config"].get("render-clips", 0))
    if n_img and len(y):
        m["clip_images"] = render_clips(conf, context, site, site_id, adapters, x, y, n_img,
                                        int(msg.content["config"]["server-round"]))
    return Message(content=RecordDict({"metrics": MetricRecord(m | {"num-examples": len(y), "site": site_id})}),
                   reply_to=msg)


def render_clips(conf: Config, context: Context, site: SiteData, site_id: int, adapters, x, y, n: int,
                 rnd: int) -> int:
    """Images of up to `n` held-out clips (classes taken in turn) from the global adapters, rendered on this
    site (clips never leave it): <image-dir or run_dir/images>/round_RRR/site_S/ with a labelled grid."""
    from a2v_flower.rendering.gallery import save_grid, write_gallery
    from a2v_flower.rendering.pipelines import Renderer

    order = sorted(range(len(y)), key=lambda i: ((y[:i] == y[i]).sum().item(), y[i].item()))[:n]
    root = (Path(str(context.node_config["image-dir"])) if "image-dir" in context.node_config
            else Path(conf.paths.run_dir or conf.paths.output_root) / "images")
    folder = root / f"round_{rnd:03d}" / f"site_{site_id}"
    renderer = Renderer(conf.diffusion, C.site_device(conf))
    images = renderer.render_images(predict(adapters, x[order]), desc=f"site {site_id}: held-out clip images")
    renderer.free()
    folder.mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for j, (i, img) in enumerate(zip(order, images)):
        name = f"clip_{j:02d}_{safe_name(site.classes[int(y[i])], 'class')}.png"
        img.save(folder / name)
        entries.append([j, site.classes[int(y[i])], Path(name)])
        rows.append((f"{j}: {site.classes[int(y[i])]}", [img]))
    save_grid(rows, folder / "grid.png", ["from the clip's audio"])
    write_gallery(folder, ["held-out clip", "true class", "from the clip's audio"], entries,
                  title=f"site {site_id}: held-out clips, round {rnd}", links={"all classes": "../index.html"})
    log.info("[Client %s] rendered %d held-out clips into %s", site_id, len(images), folder)
    return len(images)


def class_stats(adapters, x: torch.Tensor, y: torch.Tensor, num_classes: int, trained: list[int],
                outputs: bool = False) -> ArrayRecord:
    """Audio-embedding mean/variance and counts per class of this round's training clips, which classes the
    site has trained on in any round ("seen": its generators cover them) and, with `outputs` (only the
    server generator needs them: a 77x768 mean per class), the per-class adapter-output means."""
    stats = {f"out/{k}": v for k, v in class_means(predict(adapters, x), y).items()} if outputs else {}
    for c in y.unique().tolist():
        stats[f"audio_mean/{c}"] = x[y == c].mean(0)
        stats[f"audio_var/{c}"] = x[y == c].var(0, unbiased=False)
    stats["counts"] = torch.bincount(y, minlength=num_classes).float()
    stats["seen"] = torch.zeros(num_classes)
    stats["seen"][trained] = 1.0
    return to_record(stats)
