"""Tests for a2v_flower.rendering (pipelines, gallery, judge): tiny SD / FLUX pipelines driven by adapter-shaped tensors, grids, CLIP judge."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline, StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from a2v_flower import config as C  # noqa: E402
from a2v_flower.rendering import pipelines  # noqa: E402
from a2v_flower.rendering.gallery import save_grid, write_gallery  # noqa: E402
from a2v_flower.rendering.judge import ImageJudge, classification_metrics  # noqa: E402
from a2v_flower.rendering.pipelines import Renderer, check_conditioning, load_pipeline, render  # noqa: E402

SD = C.spec("diffusion", height=64, width=64)
FLUX = C.spec("diffusion", "diffusion=flux", guidance_scale=3.5, height=32, width=48)


def sd_embeds(batch: int = 2, seq: int = 77, dim: int = 768) -> dict[str, torch.Tensor]:
    """Adapter-shaped SD conditioning: {"clip": (B, 77, 768)}."""
    return {"clip": torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(1))}


def flux_embeds(batch: int = 2, pooled_batch: int | None = None, pooled_dim: int = 768) -> dict[str, torch.Tensor]:
    """Adapter-shaped FLUX conditioning: {"t5": (B, 16, 4096), "pooled": (B, 768)}."""
    g = torch.Generator().manual_seed(2)
    return {"t5": torch.randn(batch, 16, 4096, generator=g),
            "pooled": torch.randn(pooled_batch or batch, pooled_dim, generator=g)}


@pytest.fixture(scope="module")
def sd_pipe():
    return load_pipeline(SD)


@pytest.fixture(scope="module")
def flux_pipe():
    return load_pipeline(FLUX)


def as_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def test_sd_renders_requested_size_and_is_seeded(sd_pipe):
    images = render(sd_pipe, SD, sd_embeds())
    assert len(images) == 2 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    again = as_array(render(sd_pipe, SD, sd_embeds()))
    np.testing.assert_allclose(as_array(images), again, atol=1e-5)
    # A different embedding changes the picture (the conditioning reaches the UNet).
    other = as_array(render(sd_pipe, SD, {"clip": sd_embeds()["clip"] * -1}))
    assert np.abs(other - again).max() > 1e-3


def test_flux_renders_requested_size(flux_pipe):
    images = render(flux_pipe, FLUX, flux_embeds())
    assert len(images) == 2 and all(im.size == (48, 32) for im in images)


@pytest.mark.parametrize("spec, embeds, received, expected", [
    (SD, sd_embeds(dim=1024), "(2, 77, 1024)", "(B, 77, 768)"),
    (SD, sd_embeds(seq=16), "(2, 16, 768)", "(B, 77, 768)"),
    (FLUX, flux_embeds(pooled_dim=1024), "(2, 1024)", "(2, 768)"),
    (FLUX, flux_embeds(pooled_batch=3), "(3, 768)", "(2, 768)"),
    (FLUX, {"t5": torch.randn(2, 16, 768), "pooled": torch.randn(2, 768)}, "(2, 16, 768)", "(B, L, 4096)"),
])
def test_wrong_shape_names_received_and_expected(spec, embeds, received, expected, request):
    pipe = request.getfixturevalue("sd_pipe" if spec.type == "sd" else "flux_pipe")
    with pytest.raises(ValueError) as err:
        render(pipe, spec, embeds)
    assert received in str(err.value) and expected in str(err.value)


def test_missing_head_is_named(flux_pipe):
    with pytest.raises(ValueError, match="pooled"):
        check_conditioning("flux", flux_pipe, {"t5": torch.randn(1, 16, 4096)})


def test_spec_rejects_unknown_values():
    with pytest.raises(ValueError, match="'sdxl'"):
        C.spec("diffusion", type="sdxl")
    with pytest.raises(ValueError, match="'fp8'"):
        C.spec("diffusion", dtype="fp8")


def test_flux_bf16_pipeline_takes_fp32_adapter_outputs():
    spec = C.spec("diffusion", "diffusion=flux", dtype="bfloat16", height=32, width=32)
    pipe = load_pipeline(spec)
    assert pipe.transformer.dtype == torch.bfloat16
    cast = check_conditioning("flux", pipe, flux_embeds())
    assert all(t.dtype == torch.bfloat16 for t in cast.values())
    images = render(pipe, spec, flux_embeds())  # fp32 in: crashes with a dtype mismatch without the cast
    assert [im.size for im in images] == [(32, 32)] * 2


def test_renderer_builds_pipeline_lazily_once():
    renderer = Renderer(SD)
    before = pipelines.PIPELINES_BUILT
    assert renderer.pipe is None and pipelines.PIPELINES_BUILT == before
    images = renderer.render_images(sd_embeds(batch=3), batch_size=2)
    assert len(images) == 3 and renderer.pipe is not None
    assert pipelines.PIPELINES_BUILT == before + 1
    renderer.render_images(sd_embeds(batch=1))
    assert pipelines.PIPELINES_BUILT == before + 1
    renderer.free()
    assert renderer.pipe is None


def test_renderer_batching_does_not_change_images():
    # Image i is seeded with seed + i whatever the batch it falls in.
    renderer = Renderer(SD)
    whole = as_array(renderer.render_images(sd_embeds(batch=3), batch_size=3))
    split = as_array(renderer.render_images(sd_embeds(batch=3), batch_size=1))
    np.testing.assert_allclose(whole, split, atol=1e-2)  # batched convolutions may differ in the last bit


@pytest.mark.parametrize("spec, embeds, cls, none_parts", [
    (SD, sd_embeds(batch=1), StableDiffusionPipeline, ["text_encoder", "tokenizer"]),
    (FLUX, flux_embeds(batch=1), FluxPipeline, ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]),
])
def test_save_and_reload_renders_identically(spec, embeds, cls, none_parts, tmp_path, request):
    pipe = request.getfixturevalue("sd_pipe" if spec.type == "sd" else "flux_pipe")
    pipe.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path, **dict.fromkeys(none_parts))
    np.testing.assert_allclose(as_array(render(pipe, spec, embeds)), as_array(render(reloaded, spec, embeds)),
                               atol=1e-5)
    # load_pipeline takes the same folder and counts it as a built pipeline.
    before = pipelines.PIPELINES_BUILT
    loaded = load_pipeline(C.spec("diffusion", type=spec.type, name_or_path=str(tmp_path)))
    assert isinstance(loaded, cls) and pipelines.PIPELINES_BUILT == before + 1


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 0, 1])
    preds = np.array([0, 0, 1, 1])
    m = classification_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    # class 0: P=1, R=2/3 -> F1=0.8; class 1: P=1/2, R=1 -> F1=2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # A class only ever predicted (never true) counts in macro F1 with F1 = 0.
    assert classification_metrics(np.array([2, 0]), np.array([1, 0]))["macro_f1"] == pytest.approx(1 / 3)


def test_tiny_judge_returns_bounded_metrics():
    judge = ImageJudge.tiny(seed=0, image_size=32, patch_size=8)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(4)]
    metrics = judge.judge(images, [0, 1, 2, 1], ["dog", "church_bells", "rain"])
    assert set(metrics) == {"accuracy", "balanced_accuracy", "macro_f1", "clip_score"}
    assert all(0 <= metrics[k] <= 1 for k in ("accuracy", "balanced_accuracy", "macro_f1"))
    assert 0 <= metrics["clip_score"] <= 100
    assert metrics == judge.judge(images, [0, 1, 2, 1], ["dog", "church_bells", "rain"])  # deterministic


def test_grid_and_gallery_are_written(tmp_path):
    cells = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    path = save_grid([("dog", cells), ("church bells", cells[:2])], tmp_path / "grid" / "round_1.png",
                     column_titles=["seed 0", "seed 1", "seed 2"])
    with Image.open(path) as grid:
        width, height = grid.size
        assert (width - 3 * 128) > 0 and height == 22 + 2 * 128  # 64-px images upscaled to 128-px cells
        assert grid.getpixel((width - 64, height - 64)) == (255, 255, 255)  # row 2 has only 2 images
        assert grid.getpixel((width - 128 - 64, height - 64)) == (0, 128, 0)  # green, upscaled without blur
    index = write_gallery(tmp_path, ["class", "image"], [["round 1 <grid>", path], ["other", Path("grid/other.png")]],
                          title="run x", links={"next: round 2": "../round_002/index.html"})
    page = index.read_text()
    assert index == tmp_path / "index.html"
    assert 'src="grid/round_1.png"' in page and "round 1 &lt;grid&gt;" in page and 'src="grid/other.png"' in page
    assert "<th>class</th><th>image</th>" in page and '<a href="../round_002/index.html">next: round 2</a>' in page
