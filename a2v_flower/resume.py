"""The files a resumed run reads: the server's checkpoint of each round and each site's state of each round."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.config import value
from a2v_flower.records import from_record, to_record

log = logging.getLogger(__name__)

# What must match between a run and its resumption (rounds, names, paths and rendering may change).
RESUME_KEYS = ("seed", "data", "partition", "model", "adapter", "train", "strategy", "generator", "granularity",
               "sharing", "reset", "mode", "replay", "server_generator", "schedule", "prompt_template",
               "federation.num_sites", "diffusion.type")


def _plain(value):
    """A config value as plain dicts and lists (what a checkpoint's metadata holds)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}  # as JSON metadata keeps them
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _known(now, saved):
    """`now` without the keys `saved` (an older run's) never had, at any depth."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return {k: _known(v, saved[k]) for k, v in now.items() if k in saved}
    return now


def _round_files(folder: Path, prefix: str) -> list[Path]:
    """`<prefix>_round_{R}.safetensors` files of `folder`, oldest round first."""
    return sorted(folder.glob(f"{prefix}_round_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def _keep_last_two(folder: Path, prefix: str, rnd: int) -> None:
    """Remove round files older than rnd - 1 (a crash while round R is saved must not lose R - 1)."""
    for old in _round_files(folder, prefix):
        if int(old.stem.rsplit("_", 1)[1]) < rnd - 1:
            old.unlink(missing_ok=True)


def save_server_checkpoint(run_dir: Path, rnd: int, adapters: torch.nn.Module, tensors: dict, meta: dict,
                           conf) -> Path:
    """<run_dir>/checkpoints/server_round_{R}.safetensors: global adapters, strategy state, round, config keys."""
    tensors = tensors | {f"adapters/{k}": v for k, v in adapters.state_dict().items()}
    meta = meta | {"round": rnd, "resume_keys": {k: _plain(value(conf, k)) for k in RESUME_KEYS}}
    folder = run_dir / "checkpoints"
    path = save_tensors(folder / f"server_round_{rnd}.safetensors", tensors, meta)
    _keep_last_two(folder, "server", rnd)
    return path


ADDED = {"normalise": "input standardisation", "token_embedding": "token embedding"}  # adapter keys added since


def load_server_checkpoint(run_dir: Path, conf) -> tuple[int, dict, dict, dict]:
    """The newest server checkpoint of `run_dir`: (round, adapter state, strategy tensors, metadata).
    Raises naming the file if it is corrupt, stray or not this app's, and the key with both values if the
    config differs."""
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
        now = _plain(value(conf, key))
        if key == "adapter" and isinstance(saved, dict):  # written before a key of ADDED existed: it was off
            saved = dict.fromkeys(ADDED, False) | saved
        now = _known(now, saved)  # keys added since: the older run had no such key
        if now != saved:
            off = [k for k in ADDED if key == "adapter" and saved.get(k) is False and now.get(k)]
            hint = (f"; it was written before the adapters' {' and '.join(ADDED[k] for k in off)}: resume it with "
                    + " ".join(f"adapter.{k}=false" for k in off)) if off else ""
            raise ValueError(f"resume: {key}={now!r} differs from the checkpoint's {key}={saved!r} ({files[-1]}); "
                             f"a resumed run must use the same config (num_rounds, name, paths may change){hint}")
    rnd = int(meta["round"])
    if rnd >= conf.num_rounds:
        raise ValueError(f"resume: {files[-1]} is at round {rnd} but num_rounds={conf.num_rounds}; "
                         f"set num_rounds above {rnd} to train further")
    adapters = {k[9:]: v for k, v in tensors.items() if k.startswith("adapters/")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("adapters/")}
    return rnd, adapters, rest, meta


def site_state_dir(conf, node_config) -> Path | None:
    """Where a site keeps its per-round state: node config `state-dir` (deployment) or <run_dir>/state."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    run_dir = conf.paths.run_dir
    return Path(run_dir) / "state" if run_dir else None


def save_site_state(folder: Path, site: int, rnd: int, state: RecordDict) -> None:
    """What a site keeps between rounds (generators, seen classes, own adapters), on disk per round, so a
    resumed run restores it: <folder>/site_{N}_round_{R}.safetensors; rounds before R-1 are removed."""
    tensors, meta = {}, {"round": rnd, "site": site, "configs": {}}
    for name, rec in state.items():
        if name in ("targets", "run-config"):  # the server sends both again after a resume
            continue
        if isinstance(rec, ArrayRecord):
            tensors |= {f"{name}//{k}": v for k, v in from_record(rec).items()}
            meta.setdefault("arrays", []).append(name)
        elif isinstance(rec, ConfigRecord):
            meta["configs"][name] = {k: list(v) if isinstance(v, list) else v for k, v in rec.items()}
    save_tensors(folder / f"site_{site}_round_{rnd}.safetensors", tensors, meta)
    _keep_last_two(folder, f"site_{site}", rnd)


def restore_site_state(folder: Path, site: int, rnd: int, state: RecordDict) -> None:
    """Load what `save_site_state` wrote after round `rnd` into an empty state (all or nothing)."""
    path = folder / f"site_{site}_round_{rnd}.safetensors"
    tensors, meta = load_tensors(path)  # raises naming the file if missing or corrupt; state untouched
    if meta.get("round") != rnd or meta.get("site") != site:
        raise ValueError(f"{path}: holds site {meta.get('site')} round {meta.get('round')}, "
                         f"expected site {site} round {rnd}")
    arrays: dict = {}
    for key, t in tensors.items():
        name, _, k = key.partition("//")
        arrays.setdefault(name, {})[k] = t
    for name in meta.get("arrays", []):
        state[name] = to_record(arrays.get(name, {}))
    for name, values in meta["configs"].items():
        state[name] = ConfigRecord(values)
    log.info("[Client %s] restored its state after round %s from %s", site, rnd, path)
