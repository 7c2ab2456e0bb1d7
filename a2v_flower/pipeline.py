"""A trained run as a diffusers-style pipeline, and `a2v-generate`: sound files in, one image each out.

    a2v-generate outputs/<date>/<time>_default dog.wav rain.flac              # -> <run>/generated/
    a2v-generate outputs/<date>/<time>_default dog.wav --out pics diffusion.steps=20 diffusion.height=512

    from a2v_flower.pipeline import A2VPipeline
    images = A2VPipeline.from_run("outputs/<date>/<time>_default")(audio=["dog.wav"]).images
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from a2v_flower import config as C
from a2v_flower import devices
from a2v_flower.cache import TensorCache
from a2v_flower.checkpoints import load_tensors
from a2v_flower.data.esc50 import load_clip
from a2v_flower.metrics import similarity
from a2v_flower.models.adapters import AdapterSet, build_adapters
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
from a2v_flower.models.text_encoders import class_targets, head_shapes

if TYPE_CHECKING:  # diffusers is imported only to render: `a2v-generate --help` answers without it
    from a2v_flower.rendering.pipelines import Renderer

log = logging.getLogger(__name__)


@dataclass
class A2VPipelineOutput:
    """One image per clip, with the class whose text target the clip's adapter output is nearest to (cosine)."""

    images: list[Image.Image]
    classes: list[str]
    scores: list[float]


class A2VPipeline:
    """A run's global adapters between its frozen audio encoder and its diffusion pipeline (SD or FLUX), all three
    on one device (the adapters' device; from_run: device.server)."""

    def __init__(self, *, adapters: AdapterSet, encoder: AudioEncoder, renderer: Renderer,
                 targets: dict[str, torch.Tensor], classes: list[str], num_samples: int):
        self.adapters, self.encoder, self.renderer = adapters.eval(), encoder, renderer
        self.device = next(adapters.parameters()).device
        self.targets = {h: t.to(self.device) for h, t in targets.items()}
        self.classes, self.num_samples = classes, num_samples

    @classmethod
    def from_run(cls, run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> A2VPipeline:
        """The pipeline of a finished run: <run_dir>/config.yaml and adapters.safetensors; `overrides`
        (key=value, e.g. diffusion.steps=20 or diffusion.name_or_path=...) change how images are made."""
        from a2v_flower.rendering.pipelines import Renderer

        run_dir = Path(run_dir)
        for name in ("config.yaml", "adapters.safetensors"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"run folder {str(run_dir)!r} has no {name}; expected the folder of a "
                                        "finished run (a2v-run prints it on its last line)")
        conf = C.load_run(run_dir / "config.yaml", overrides)
        state, meta = load_tensors(run_dir / "adapters.safetensors")
        norm = {k.split("/", 1)[1]: state.pop(k) for k in list(state) if k.startswith("input_norm/")}
        if conf.adapter.normalise and not norm:
            raise ValueError(f"{run_dir / 'adapters.safetensors'} has no input_norm tensors but the run's config has "
                             "adapter.normalise=true: the file is not the one that run wrote")
        heads, need = sorted({k.split(".")[0] for k in state}), sorted(head_shapes(conf.diffusion.type))
        if heads != need:
            raise ValueError(f"{run_dir / 'adapters.safetensors'} has adapter heads {heads} but diffusion.type="
                             f"{conf.diffusion.type!r} needs {need}")
        audio, device = conf.model.audio, C.server_device(conf)  # a2v-generate: one process, every GPU in sight
        devices.check_placement(device.type, audio.dtype, conf.diffusion.dtype, conf.diffusion.cpu_offload,
                                who=f"a2v-generate (device.server={str(device)!r})")
        targets = class_targets(meta["classes"], conf.prompt_template, conf.diffusion.type, conf.model.text,
                                conf.diffusion.t5_seq_len, TensorCache(Path(conf.paths.cache_dir) / "targets"), device)
        adapters = build_adapters(encoder_dim(audio), targets, seed=conf.seed, **C.adapter_keywords(conf))
        adapters.load_state_dict(state)  # the target space (shift, scale) comes from the same targets
        adapters.set_input_norm(norm or None)  # the federation's input standardisation, saved beside the weights
        return cls(adapters=adapters.to(device), encoder=AudioEncoder(audio, device),
                   renderer=Renderer(conf.diffusion, device), targets=targets, classes=meta["classes"],
                   num_samples=int(conf.data.clip_seconds * audio.sampling_rate))

    def load(self, clip: str | Path | np.ndarray) -> tuple[np.ndarray, int]:
        """A clip as the encoder takes it and its samples holding sound: any file `load_clip` reads, or a mono
        waveform at the encoder's rate (all of it sound)."""
        if isinstance(clip, np.ndarray):
            wave, length = clip.astype(np.float32), len(clip)
        elif not Path(clip).is_file():
            raise FileNotFoundError(f"audio file {str(clip)!r} does not exist")
        else:
            try:
                wave, length = load_clip(clip, self.encoder.spec.sampling_rate, self.num_samples)
            except Exception as err:  # noqa: BLE001 - whatever the decoder raises, the file is unreadable
                raise ValueError(f"audio file {str(clip)!r} is unreadable: {err}") from err
        if wave.ndim != 1 or not np.isfinite(wave).all():
            raise ValueError(f"audio {str(clip)[:80]!r} must be a finite mono waveform, got shape {wave.shape}")
        return wave, length

    @torch.no_grad()
    def __call__(self, audio: str | Path | np.ndarray | list) -> A2VPipelineOutput:
        """One image per clip; every clip is read before anything is computed, so a bad one fails first."""
        waves, lengths = zip(*[self.load(clip) for clip in (audio if isinstance(audio, list) else [audio])])
        out = self.adapters(self.encoder.encode(list(waves), list(lengths)).to(self.device))  # per head (N, ...)
        sim = similarity(out, self.targets)                                  # (N, C)
        images = self.renderer.render_images(out, desc="images from audio")
        return A2VPipelineOutput(images, [self.classes[i] for i in sim.argmax(1).tolist()],
                                 sim.max(1).values.tolist())


def write_images(out_dir: Path, names: list[str], result: A2VPipelineOutput, title: str) -> Path:
    """<out_dir>/NN_<name>.png per clip and an index.html with the file, its nearest class and its image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, image, cls, score) in enumerate(zip(names, result.images, result.classes, result.scores)):
        png = Path(f"{i:02d}_{Path(name).stem}.png")
        image.save(out_dir / png)
        rows.append([name, f"{cls} ({score:.2f})", png])
    from a2v_flower.rendering.gallery import write_gallery

    return write_gallery(out_dir, ["audio", "nearest class (cosine)", "image"], rows, title=title)


def main(argv: list[str] | None = None) -> None:
    """`a2v-generate RUN_DIR AUDIO... [--out DIR] [key=value ...]`: PNGs and index.html, or an error and nothing."""
    ap = argparse.ArgumentParser(prog="a2v-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="folder of a finished run (config.yaml, adapters.safetensors)")
    ap.add_argument("inputs", nargs="+", metavar="AUDIO",
                    help="audio files (wav, flac, ogg, ...), then optional overrides key=value")
    ap.add_argument("--out", type=Path, help="folder for the images and index.html (default: RUN_DIR/generated)")
    args = ap.parse_intermixed_args(argv)
    overrides = [a for a in args.inputs if "=" in a and not Path(a).exists()]
    files = [a for a in args.inputs if a not in overrides]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not files:
            raise ValueError("no audio files given")
        result = A2VPipeline.from_run(args.run_dir, overrides)(audio=files)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"a2v-generate: {err}") from None
    out_dir = args.out or args.run_dir / "generated"
    page = write_images(out_dir, [Path(f).name for f in files], result, f"a2v-generate: {args.run_dir.name}")
    log.info("%d images in %s (open %s)", len(files), out_dir, page)


if __name__ == "__main__":
    main()
