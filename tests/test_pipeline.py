"""Sound -> image with a trained run: A2VPipeline.from_run and `a2v-generate`, on tiny runs made in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from a2v_flower import config as C
from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.pipeline import A2VPipeline, main
from tests.conftest import TINY


def tiny_run(folder: Path, cache_dir: Path, *overrides: str) -> Path:
    """A finished one-round run of the real ServerApp and ClientApp (config.yaml, adapters.safetensors)."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.inprocess import run_server

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = C.absolute_paths(C.compose_config([*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_root={folder}",
                                             "num_rounds=1", "train.local_epochs=1", "diffusion.render_every=0",
                                             *overrides]), folder)
    run_server(cfg, folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, cache_dir):
    return tiny_run(tmp_path_factory.mktemp("sd"), cache_dir)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> list[Path]:
    """A stereo 44.1 kHz wav and a mono 8 kHz flac: the loader downmixes and resamples both."""
    folder = tmp_path_factory.mktemp("sounds")
    t = np.arange(44100) / 44100
    sf.write(folder / "bark.wav", np.stack([np.sin(2 * np.pi * 440 * t), np.sign(np.sin(2 * np.pi * 3 * t))], 1) * 0.3,
             44100)
    sf.write(folder / "rain.flac", np.random.default_rng(0).normal(0, 0.2, 8000), 8000)
    return [folder / "bark.wav", folder / "rain.flac"]


def test_from_run_renders_one_image_per_clip(sd_run, sounds):
    pipe = A2VPipeline.from_run(sd_run)
    out = pipe(audio=[str(p) for p in sounds])
    assert [im.size for im in out.images] == [(64, 64)] * 2
    assert set(out.classes) <= set(pipe.classes) and all(-1 <= s <= 1 for s in out.scores)
    one, again = (np.asarray(pipe(audio=sounds[0]).images[0], dtype=float) for _ in range(2))
    assert np.array_equal(one, again)  # same clip, same seed: the same picture
    # in a batch of two, the same picture up to float rounding of batched kernels
    assert np.abs(one - np.asarray(out.images[0], dtype=float)).max() <= 2
    # the adapters hold the run's final global weights
    state, _ = load_tensors(sd_run / "adapters.safetensors")
    norm = {k: state.pop(f"input_norm/{k}") for k in ("mean", "std")}  # the federation's input standardisation
    assert all(np.array_equal(pipe.adapters.state_dict()[k].numpy(), v.numpy()) for k, v in state.items())
    assert all(torch.equal(pipe.adapters.input_norm()[k], v) for k, v in norm.items()) and norm["std"].min() > 0


def test_console_script_writes_pngs_and_a_page(sd_run, sounds, tmp_path):
    out = tmp_path / "pics"
    proc = subprocess.run([str(Path(sys.executable).parent / "a2v-generate"), str(sd_run), *map(str, sounds),
                           "--out", str(out), "diffusion.steps=1", "diffusion.height=32", "diffusion.width=32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["00_bark.png", "01_rain.png", "index.html"]
    page = (out / "index.html").read_text()
    assert "bark.wav" in page and 'src="01_rain.png"' in page and f"a2v-generate: {sd_run.name}" in page
    assert "2 images in" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["{missing}", "{bark}"], "has no config.yaml; expected the folder of a finished run"),
    (["{run}", "{bark}", "{garbage}"], "garbage.wav' is unreadable"),
    (["{run}", "{bark}", "{tmp}/nope.wav"], "nope.wav' does not exist"),
    (["{run}", "{bark}", "diffusion.stepz=3"], "override 'diffusion.stepz=3': expected key=value with a key"),
])
def test_bad_input_is_named_and_writes_nothing(sd_run, sounds, tmp_path, args, message):
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all")
    fill = {"missing": tmp_path / "no_run", "bark": sounds[0], "garbage": tmp_path / "garbage.wav", "run": sd_run,
            "tmp": tmp_path}
    with pytest.raises(SystemExit, match=message):
        main([a.format(**fill) for a in args] + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (sd_run / "generated").exists()


def test_flux_run_renders_and_needs_its_pooled_head(tmp_path_factory, cache_dir, sounds, tmp_path):
    run = tiny_run(tmp_path_factory.mktemp("flux"), cache_dir, "diffusion=flux", "diffusion.height=32",
                   "diffusion.width=32")
    assert A2VPipeline.from_run(run)(audio=[sounds[1]]).images[0].size == (32, 32)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoints", "state", "wandb"))
    state, meta = load_tensors(run / "adapters.safetensors")
    save_tensors(broken / "adapters.safetensors", {k: v for k, v in state.items() if not k.startswith("pooled.")}, meta)
    with pytest.raises(SystemExit, match=r"has adapter heads \['t5'\] but diffusion.type='flux' needs \['pooled', 't5'\]"):
        main([str(broken), str(sounds[0])])
    assert not (broken / "generated").exists()


def test_help_answers_without_importing_diffusers():
    """`a2v-generate --help` prints its usage and exits 0 before diffusers (and transformers' image
    processors, with their warnings) are imported: they load only to render."""
    code = ("import sys\nfrom a2v_flower import pipeline\ntry:\n    pipeline.main(['--help'])\n"
            "except SystemExit as stop:\n    assert stop.code == 0, stop.code\nprint('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: a2v-generate") and out.stdout.split()[-1] == "False"
    assert "torchvision" not in out.stderr
