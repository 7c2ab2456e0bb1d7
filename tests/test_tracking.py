"""Run tracking: metrics.jsonl rows, wandb key names (read back from a real offline run file), the accuracy plot."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from a2v_flower.tracking import wandb_keys


def wandb_records(path) -> list:
    """Protobuf records of an offline run file (`run-*.wandb`: a 7-byte W&B header, then LevelDB log blocks),
    up to the last whole one: wandb's service process may still be appending."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if pos + 7 + length > len(data):  # a chunk wandb is still writing: the records before it are whole
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            records.append(Record.FromString(pending))
            pending = b""
        elif kind == 0:
            break
    return records


def test_wandb_keys_keep_the_seeds_names_and_flatten_sites():
    row = {"server/generator_loss": 0.5, "train_loss": 0.1, "sites": {0: {"train_loss": 0.2, "bytes_up": 9}},
           "per_class": {"dog": 1.0}, "seen_classes": ["dog"], "ok": True}
    assert wandb_keys("train", row) == {"server/generator_loss": 0.5, "train/train_loss": 0.1,
                                        "train/sites/0/train_loss": 0.2, "train/sites/0/bytes_up": 9,
                                        "train/per_class/dog": 1.0}


def test_offline_wandb_run_has_the_seeds_key_names(kd_run):
    """The shared kd run (tests/conftest.py KD_RUN: strategy=kd, wandb offline, named kd_run in group sweep_x)."""
    run_dir = Path(kd_run["run"])
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    for _ in range(120):  # wandb's service process may still be writing the file when finish() returns
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group) == ("kd_run", "sweep_x")
    keys = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for item in r.history.item}
    assert {"round", "server/generator_loss", "server/adapter_finetuning_loss"} <= keys  # as the predecessor names them
    assert not any(k.startswith("train/server/") for k in keys)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = set(next(r for r in rows if r["kind"] == "eval")["sites"])
    assert {f"eval/sites/{s}/top1" for s in sites} | {f"train/sites/{s}/train_loss" for s in sites} <= keys
