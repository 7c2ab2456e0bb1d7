"""A synthetic dataset in the ESC-50 layout: class-distinct synthesised sounds with difficulty knobs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from a2v_flower.data.esc50 import CSV_COLUMNS, ESC50_CLASSES


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """What to synthesise; equal specs give byte-identical datasets."""

    classes: tuple[str, ...]
    clips_per_class: int
    seconds: float
    sample_rate: int
    noise: float  # background noise amplitude relative to the class sound
    overlap: float  # 0 = independent classes, 1 = each class equals its partner
    variation: float  # per-clip jitter of pitch, rhythm and timbre
    seed: int

    def fingerprint(self) -> str:
        """Short hash of the spec, used as the cache folder name."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _class_params(rng: np.random.Generator) -> dict:
    """Random timbre of one class: pitch, harmonics, amplitude modulation, noise band, rhythm."""
    return {
        "f0": float(np.exp(rng.uniform(np.log(120), np.log(2500)))),
        "harmonics": rng.uniform(0, 1, size=4) * np.array([1.0, 0.7, 0.5, 0.3]),
        "am_rate": float(rng.uniform(0.5, 12.0)),
        "band": float(np.exp(rng.uniform(np.log(300), np.log(6000)))),
        "noisiness": float(rng.uniform(0.0, 0.8)),
        "bursts": float(rng.uniform(0.5, 6.0)),  # events per second
    }


def _mix(a: dict, b: dict, t: float) -> dict:
    """Interpolate two class timbres (geometric for frequencies and rates)."""
    out = {}
    for k in a:
        if k in ("f0", "band", "am_rate", "bursts"):
            out[k] = float(np.exp((1 - t) * np.log(a[k]) + t * np.log(b[k])))
        else:
            out[k] = (1 - t) * np.asarray(a[k]) + t * np.asarray(b[k])
    return out


def _render(p: dict, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Synthesise one clip of a class with per-clip variation and background noise."""
    n = int(spec.seconds * spec.sample_rate)
    t = np.arange(n) / spec.sample_rate
    v = spec.variation
    f0 = p["f0"] * np.exp(rng.normal(0, 0.15 * v))
    tone = sum(a * np.sin(2 * np.pi * f0 * (i + 1) * t + rng.uniform(0, 2 * np.pi))
               for i, a in enumerate(p["harmonics"] * np.exp(rng.normal(0, 0.3 * v, 4))))
    noise = rng.standard_normal(n)
    spec_noise = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(n, 1 / spec.sample_rate)
    spec_noise *= np.exp(-0.5 * ((freqs - p["band"]) / (0.3 * p["band"])) ** 2)
    band_noise = np.fft.irfft(spec_noise, n)
    band_noise /= band_noise.std() + 1e-8
    sound = (1 - p["noisiness"]) * tone + p["noisiness"] * band_noise
    am = 0.5 * (1 + np.sin(2 * np.pi * p["am_rate"] * np.exp(rng.normal(0, 0.2 * v)) * t))
    rate = p["bursts"] * np.exp(rng.normal(0, 0.3 * v))
    phase = rng.uniform(0, 1)
    env = np.clip(np.sin(np.pi * ((t * rate + phase) % 1.0)), 0, None) ** 2
    x = sound * (0.4 + 0.6 * am) * env
    x /= np.abs(x).max() + 1e-8
    x = x + spec.noise * 0.5 * rng.standard_normal(n)
    return (0.8 * x / (np.abs(x).max() + 1e-8)).astype(np.float32)


def expected_bytes(spec: SyntheticSpec) -> int:
    """Bytes the dataset's 16-bit wav files take."""
    return len(spec.classes) * spec.clips_per_class * (int(spec.seconds * spec.sample_rate) * 2 + 44)


def remove_stale(root: Path) -> None:
    """Remove `<root>.tmp-<pid>` folders of generators that died (a process still writing its own is left)."""
    for tmp in root.parent.glob(f"{root.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid != 0


def _write(tmp: Path, spec: SyntheticSpec) -> None:
    """Write the dataset's audio and meta/esc50.csv into `tmp`."""
    (tmp / "audio").mkdir(parents=True, exist_ok=True)
    (tmp / "meta").mkdir(exist_ok=True)
    base = {c: _class_params(np.random.default_rng([spec.seed, ESC50_CLASSES.index(c)]))
            for c in spec.classes}
    rows = []
    for ci, name in enumerate(spec.classes):
        partner = spec.classes[ci ^ 1] if (ci ^ 1) < len(spec.classes) else name
        params = _mix(base[name], base[partner], spec.overlap / 2)  # overlap 1 -> both meet midway
        target = ESC50_CLASSES.index(name)
        for k in range(spec.clips_per_class):
            rng = np.random.default_rng([spec.seed, target, k])
            fold, src = k % 5 + 1, 100000 + 1000 * target + k
            fname = f"{fold}-{src}-A-{target}.wav"
            sf.write(tmp / "audio" / fname, _render(params, spec, rng), spec.sample_rate, subtype="PCM_16")
            rows.append([fname, fold, target, name, name in ESC10, src, "A"])
    with open(tmp / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)


def generate(root: str | Path, spec: SyntheticSpec) -> Path:
    """Write the dataset to `root` (audio/*.wav, meta/esc50.csv) atomically; return `root`."""
    root = Path(root)
    if (root / "meta" / "esc50.csv").is_file():
        return root
    unknown = [c for c in spec.classes if c not in ESC50_CLASSES]
    if unknown:
        raise ValueError(f"data.classes: {unknown} are not ESC-50 categories; allowed: {ESC50_CLASSES}")
    remove_stale(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    try:
        _write(tmp, spec)
    except BaseException as err:  # a full disk, Ctrl-C: no partial copy is left to fill it
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, sf.LibsndfileError)):  # libsndfile says only "System error."
            free = shutil.disk_usage(tmp.parent).free if tmp.parent.is_dir() else 0
            raise OSError(f"cannot write the synthetic dataset to {root} ({free / 2**20:.0f} MiB free there, about "
                          f"{expected_bytes(spec) / 2**20:.0f} MiB needed): {err}") from None
        raise
    try:
        os.replace(tmp, root)  # atomic: concurrent generators race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won; its copy is identical
    return root


ESC10 = {"dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing",
         "clock_tick", "helicopter", "chainsaw"}
