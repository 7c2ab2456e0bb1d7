"""Safetensors files written atomically and read back whole: the one place that touches weights on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from a2v_flower.names import check_granularity, safe_name

META_KEY = "a2v_meta"  # JSON metadata stored in the safetensors header


def _stage(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None) -> Path:
    """Write a hidden temp file beside `path` (removed again if writing fails); the caller renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta or {})})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """Write `tensors` (+ JSON `meta`) to `path` via a temp file and rename: never a half-written file."""
    path = Path(path)
    os.replace(_stage(path, tensors, meta), path)
    return path


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_tensors` to CPU; a corrupt file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {err}") from err
    return tensors, meta


# ---- generator checkpoints ----------------------------------------------------------------------

GENERATOR_EXT = ".safetensors"
_KEY_INFIX = {"per_class": "_class_", "per_group": "_group_"}  # the predecessor's file-name infixes

@dataclass(kw_only=True)
class GeneratorMeta:
    """Self-description of one generator file (weights and optimizer state sit beside it in the same file)."""

    type: str                     # generator type: vae, cvae, gan, gaussian
    granularity: str              # unified, per_class or per_group
    key: str                      # generator key: "unified", a class name or a group name
    token_shape: list[int]        # (K, D) of the embeddings it models
    cond_dim: int                 # condition width (0 for unconditioned types)
    classes: list[str]            # classes this generator models
    site: str = ""                # where it was trained: "client" or "server"
    round: int | None = None      # server round the weights are from
    seen_classes: list[str] = field(default_factory=list)  # classes trained so far (reset on new class)
    config_fingerprint: str = ""  # hash of the config that built it

    def __post_init__(self):
        """Normalise JSON values (tuples -> lists, ints) and check the granularity."""
        check_granularity(self.granularity)
        self.token_shape, self.cond_dim = [int(s) for s in self.token_shape], int(self.cond_dim)
        self.classes, self.seen_classes = list(self.classes), list(self.seen_classes)

    @classmethod
    def from_dict(cls, d: Mapping, strict: bool = True) -> GeneratorMeta:
        """Build from a dict; ValueError naming missing (and, if strict, unknown) fields or bad values."""
        if (unknown := sorted(set(d) - set(META_FIELDS))) and strict:
            raise ValueError(f"generator metadata has unknown fields {unknown}; allowed: {list(META_FIELDS)}")
        try:
            return cls(**{k: d[k] for k in META_FIELDS if k in d})
        except (TypeError, ValueError) as err:                           # missing field or bad value
            raise ValueError(f"generator metadata is invalid: {err}") from err


META_FIELDS = tuple(GeneratorMeta.__dataclass_fields__)  # the metadata keys of a generator file, in order


def generator_checkpoint_name(base: str, node: int | str, granularity: str, key: str,
                              round_: int | None = None) -> str:
    """`{base}_node{N}[_class_{c} | _group_{g}][_round_{R}].safetensors` (unified ignores `key`)."""
    check_granularity(granularity)
    safe_name(base, "generator_checkpoint.base_name")                            # names stay inside the folder
    safe_name(key, "generator key")
    name = f"{base}_node{node}"
    if granularity != "unified":
        name += f"{_KEY_INFIX[granularity]}{key}"
    return name + ("" if round_ is None else f"_round_{int(round_)}") + GENERATOR_EXT


def _meta_for(key: str, granularity: str, meta: Mapping, round_: int | None) -> GeneratorMeta:
    """`key`'s GeneratorMeta: `meta` plus granularity/key/round; `classes` may map key -> classes."""
    classes = meta.get("classes")
    if isinstance(classes, Mapping):
        if key not in classes:
            raise ValueError(f"meta classes has no entry for generator key {key!r}; it has {list(classes)}")
        classes = classes[key]
    return GeneratorMeta.from_dict({**meta, "granularity": granularity, "key": key, "round": round_,
                                    **({} if classes is None else {"classes": classes})})


def save_generator_checkpoints(directory: str | Path, base: str, node: int | str, granularity: str,
                               states: Mapping[str, dict[str, torch.Tensor]], meta: Mapping,
                               round_: int | None, round_copy: bool = False) -> list[Path]:
    """Write each key's file (+ `_round_{R}` copy), all staged before any rename; returns the paths."""
    # meta: GeneratorMeta fields shared by the keys (granularity, key, round come from the arguments);
    # its classes is a list or a mapping key -> classes (generator_keys(...)). A failed write changes no file.
    if not states or (granularity == "unified" and len(states) != 1):
        raise ValueError(f"states has keys {list(states)}; expected one key for 'unified', at least one otherwise")
    if round_copy and round_ is None:
        raise ValueError("round_copy=True needs round_")
    staged: list[tuple[Path, Path]] = []                                # (temp file, final path)
    try:
        for key, tensors in states.items():
            info = asdict(_meta_for(key, granularity, meta, round_))
            for r in (None, round_) if round_copy else (None,):
                path = Path(directory) / generator_checkpoint_name(base, node, granularity, key, r)
                staged.append((_stage(path, tensors, info), path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    return [path for _, path in staged]


def _canon(name: str, value: Any) -> Any:
    """A metadata value in comparable form: class lists sorted, token_shape as a list of ints."""
    if value is None or name not in ("classes", "seen_classes", "token_shape"):
        return value
    return [int(s) for s in value] if name == "token_shape" else sorted(value)


def _mismatches(meta: GeneratorMeta, wanted: Mapping, key: str) -> list[str]:
    """'<field> is <file value> in the file but <wanted> was asked' for each field that differs."""
    out = []
    for name, want in wanted.items():
        want = want.get(key) if name == "classes" and isinstance(want, Mapping) else want
        have, want = _canon(name, getattr(meta, name)), _canon(name, want)
        if have != want:
            out.append(f"{name} is {have!r} in the file but {want!r} was asked")
    return out


def _shape_mismatches(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How a file's "model." tensors differ from the configured generator's `shapes` (a 0 there matches any
    size: buffers that grow, such as the gaussian's per-class slots); AdamW moments must match their weights."""
    have = {k: list(v.shape) for k, v in tensors.items() if k.startswith("model.")}
    out = []
    if missing := sorted(set(shapes) - set(have)):
        out.append(f"tensors {missing[:3]} of the configured generator are not in the file")
    if extra := sorted(set(have) - set(shapes)):
        out.append(f"tensors {extra[:3]} in the file are not in the configured generator")
    for name, want in shapes.items():
        got = have.get(name)
        if got is not None and (len(got) != len(want) or any(w and g != w for g, w in zip(got, want))):
            out.append(f"{name} has shape {got} in the file but {list(want)} was asked")
    for name, t in tensors.items():  # optim.<optimizer>.<parameter>.<exp_avg | exp_avg_sq | step>
        param = "model." + name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("optim.") else None
        if param and t.dim() and param in shapes and list(t.shape) != list(shapes[param]):
            out.append(f"{name} has shape {list(t.shape)} in the file but {list(shapes[param])} was asked")
    return out


def load_generator_checkpoints(directory: str | Path, base: str, node: int | str, granularity: str,
                               keys: list[str], expect: Mapping | None = None, round_: int | None = None,
                               shapes: Mapping[str, tuple[int, ...]] | None = None
                               ) -> dict[str, tuple[dict[str, torch.Tensor], GeneratorMeta]]:
    """All or nothing: {key: (tensors, meta)}, or one ValueError naming every missing, corrupt or mismatched file."""
    # expect: any GeneratorMeta fields but key (classes as a list or a mapping key -> classes);
    # granularity and each file's key are always checked. round_ reads the `_round_{R}` copies.
    # shapes: name -> shape of the configured generator's "model." tensors (another kind or size is refused).
    expect, allowed = dict(expect or {}), [k for k in META_FIELDS if k != "key"]
    if unknown := sorted(set(expect) - set(allowed)):
        raise ValueError(f"expect has unknown fields {unknown}; allowed: {allowed}")
    if expect.setdefault("granularity", granularity) != granularity:
        raise ValueError(f"expect granularity {expect['granularity']!r} contradicts granularity={granularity!r}")
    if not keys:
        raise ValueError(f"no generator keys to load from {directory}")
    loaded, problems = {}, []
    for key in keys:
        name = generator_checkpoint_name(base, node, granularity, key, round_)
        try:
            tensors, raw = load_tensors(Path(directory) / name)
            meta = GeneratorMeta.from_dict(raw, strict=False)           # newer fields are ignored
        except FileNotFoundError:
            problems.append(f"{name}: file does not exist")
            continue
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        problems += [f"{name}: {m}" for m in _mismatches(meta, {**expect, "key": key}, key)]
        if shapes:
            problems += [f"{name}: {m}" for m in _shape_mismatches(tensors, shapes)]
        loaded[key] = (tensors, meta)
    if problems:
        raise ValueError(f"generator checkpoints in {directory} not loaded (nothing changed): " + "; ".join(problems))
    return loaded
