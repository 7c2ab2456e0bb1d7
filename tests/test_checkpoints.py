"""Checkpoint files: predecessor naming, metadata round trip, all-or-nothing loads, no pickle execution."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from a2v_flower import checkpoints as ck
from a2v_flower.checkpoints import (
    GeneratorMeta, generator_checkpoint_name, load_generator_checkpoints, load_tensors,
    save_generator_checkpoints, save_tensors,
)

META = {"type": "cvae", "token_shape": (4, 8), "cond_dim": 32, "site": "client",
        "seen_classes": ["dog", "rooster"], "config_fingerprint": "abc123"}


def state(seed: int) -> dict[str, torch.Tensor]:
    """A generator-like state: weights, AdamW state and a uint8 RNG state."""
    g = torch.Generator().manual_seed(seed)
    return {"model.enc.weight": torch.randn(6, 5, generator=g),
            "optim.main.enc.weight.exp_avg": torch.randn(6, 5, generator=g),
            "optim.main.enc.weight.step": torch.tensor(float(seed)),
            "rng": torch.randint(0, 255, (16,), generator=g, dtype=torch.uint8)}


def save(tmp_path, keys=("dog", "rooster"), seed=0, round_=1, **kw):
    """Per-class checkpoints of `keys` under base 'gen', node 0."""
    meta = {**META, "classes": {k: [k] for k in keys}}
    return save_generator_checkpoints(tmp_path, "gen", 0, "per_class", {k: state(seed + i) for i, k in enumerate(keys)},
                                      meta, round_, **kw)


# ---- naming -------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity, key, round_, expected", [
    ("unified", "unified", None, "vae_unified_node0.safetensors"),
    ("unified", "unified", 5, "vae_unified_node0_round_5.safetensors"),
    ("per_class", "dog", None, "vae_unified_node0_class_dog.safetensors"),
    ("per_class", "dog", 5, "vae_unified_node0_class_dog_round_5.safetensors"),
    ("per_group", "animals", None, "vae_unified_node0_group_animals.safetensors"),
    ("per_group", "animals", 10, "vae_unified_node0_group_animals_round_10.safetensors"),
])
def test_names_follow_the_predecessor(granularity, key, round_, expected):
    assert generator_checkpoint_name("vae_unified", 0, granularity, key, round_) == expected


def test_name_rejects_bad_granularity_and_path_keys():
    with pytest.raises(ValueError, match=r"'per_node'.*\['unified', 'per_class', 'per_group'\]"):
        generator_checkpoint_name("gen", 0, "per_node", "dog")
    with pytest.raises(ValueError, match="key='../dog'"):
        generator_checkpoint_name("gen", 0, "per_class", "../dog")


def test_meta_keys_agree_with_their_owner():
    assert ck.META_FIELDS == tuple(f.name for f in dataclasses.fields(GeneratorMeta))


# ---- round trip ---------------------------------------------------------------------------------

def test_round_trip_of_two_keys_keeps_tensors_and_metadata(tmp_path):
    paths = save(tmp_path, round_=3, round_copy=True)
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.iterdir()) == [
        "gen_node0_class_dog.safetensors", "gen_node0_class_dog_round_3.safetensors",
        "gen_node0_class_rooster.safetensors", "gen_node0_class_rooster_round_3.safetensors"]
    expect = {"type": "cvae", "token_shape": [4, 8], "cond_dim": 32,
              "classes": {"dog": ["dog"], "rooster": ["rooster"]}}          # per-key classes, as generator_keys()
    for round_ in (None, 3):
        loaded = load_generator_checkpoints(tmp_path, "gen", 0, "per_class", ["dog", "rooster"], expect, round_=round_)
        for i, key in enumerate(["dog", "rooster"]):
            tensors, meta = loaded[key]
            assert tensors.keys() == state(i).keys()
            assert all(torch.equal(tensors[k], v) for k, v in state(i).items())
            assert meta == GeneratorMeta(type="cvae", granularity="per_class", key=key, token_shape=[4, 8], cond_dim=32,
                                         classes=[key], site="client", round=3, seen_classes=["dog", "rooster"],
                                         config_fingerprint="abc123")


def test_save_rejects_two_unified_keys_and_unknown_meta(tmp_path):
    with pytest.raises(ValueError, match="one key for 'unified'"):
        save_generator_checkpoints(tmp_path, "gen", 0, "unified", {"a": state(0), "b": state(1)}, META, 1)
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        save_generator_checkpoints(tmp_path, "gen", 0, "unified", {"unified": state(0)},
                                   {**META, "classes": ["dog"], "colour": "red"}, 1)
    assert not list(tmp_path.iterdir())


# ---- all-or-nothing loads -----------------------------------------------------------------------

def test_a_corrupt_file_among_three_fails_the_whole_load(tmp_path):
    save(tmp_path, keys=("dog", "rooster", "pig"))
    bad = tmp_path / "gen_node0_class_rooster.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])      # truncated mid-tensor
    result = None
    with pytest.raises(ValueError, match="gen_node0_class_rooster.safetensors") as err:
        result = load_generator_checkpoints(tmp_path, "gen", 0, "per_class", ["dog", "rooster", "pig"])
    assert result is None and "class_dog" not in str(err.value) and "class_pig" not in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    save(tmp_path, keys=("dog",))
    with pytest.raises(ValueError, match="gen_node0_class_frog.safetensors: file does not exist"):
        load_generator_checkpoints(tmp_path, "gen", 0, "per_class", ["dog", "frog"])


@pytest.mark.parametrize("field, in_file, asked", [
    ("granularity", "'unified'", "'per_class'"),
    ("token_shape", "[4, 8]", "[4, 16]"),
    ("classes", "['dog']", "['cat']"),
])
def test_a_mismatch_names_the_file_and_both_values(tmp_path, field, in_file, asked):
    save(tmp_path, keys=("dog",))
    expect = {"token_shape": (4, 16)} if field == "token_shape" else {"classes": ["cat"]} if field == "classes" else {}
    if field == "granularity":                                         # a unified file under a per_class name
        save_tensors(tmp_path / "gen_node0_class_dog.safetensors", state(0),
                     {**META, "granularity": "unified", "key": "dog", "classes": ["dog"]})
    with pytest.raises(ValueError) as err:
        load_generator_checkpoints(tmp_path, "gen", 0, "per_class", ["dog"], expect)
    assert f"gen_node0_class_dog.safetensors: {field} is {in_file} in the file but {asked} was asked" in str(err.value)


# ---- no code execution on load ------------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file: what a malicious .pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_pickled_code_is_never_executed(tmp_path, fmt):
    marker, path = tmp_path / "marker", tmp_path / "legacy.pt"
    obj = {"generator_state_dict": {"w": torch.ones(2)}, "x": _Payload(marker)}
    torch.save(obj, path) if fmt == "torch_zip" else path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match="legacy.pt"):
        load_tensors(path)
    assert not marker.exists()
    _ = torch.load(path, weights_only=False) if fmt == "torch_zip" else pickle.loads(path.read_bytes())
    assert marker.exists()                                             # the file really is malicious


def test_an_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save(tmp_path, seed=0, round_=1)
    save_tensors(tmp_path / "adapters.safetensors", state(5))
    real_save_file, calls = ck.save_file, []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) in (2, 3):                                        # 2nd and 3rd writes die mid-way
            with open(filename, "wb") as f:
                f.write(b"\x00" * 7)
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):                   # the first key was staged already
        save(tmp_path, seed=10, round_=2)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(tmp_path / "adapters.safetensors", state(99))
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [             # no temp files left behind
        "adapters.safetensors", "gen_node0_class_dog.safetensors", "gen_node0_class_rooster.safetensors"]
    loaded = load_generator_checkpoints(tmp_path, "gen", 0, "per_class", ["dog", "rooster"], {"round": 1})
    for i, key in enumerate(["dog", "rooster"]):                       # both keys still hold round 1
        assert torch.equal(loaded[key][0]["model.enc.weight"], state(i)["model.enc.weight"])
    assert torch.equal(load_tensors(tmp_path / "adapters.safetensors")[0]["rng"], state(5)["rng"])
