"""Render images from adapter outputs with SD / FLUX pipelines (no text encoders), and judge them with CLIP."""

from __future__ import annotations

import gc
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from a2v_flower import devices
from a2v_flower.models.text_encoders import CLIP_DIM, CLIP_SEQ_LEN, T5_DIM, tiny_clip_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PIPELINES_BUILT = 0  # pipelines constructed or loaded in this process (tests check lazy loading)


@dataclass(frozen=True)
class DiffusionSpec:
    """Which pipeline renders, and how: name_or_path None = tiny random pipeline built from config."""

    type: str = "sd"                  # "sd" (CLIP 77x768) or "flux" (T5 Lx4096 + pooled 768)
    name_or_path: str | None = None   # hub id or local folder of a full pipeline
    steps: int = 2
    guidance_scale: float = 7.5       # SD: classifier-free guidance; FLUX-dev: embedded guidance
    height: int = 64
    width: int = 64
    seed: int = 0                     # builds the tiny pipeline and seeds every render
    dtype: str = "float32"
    cpu_offload: bool = False         # model CPU offload; only with CUDA
    attention_slicing: bool = False   # SD UNet only; FLUX has no sliced attention
    device: str = "auto"              # a device setting (devices.py): auto | cpu | cuda | cuda:N

    def __post_init__(self):
        if self.type not in ("sd", "flux"):
            raise ValueError(f"diffusion.type={self.type!r} is not allowed; expected 'sd' or 'flux'")
        if self.dtype not in DTYPES:
            raise ValueError(f"diffusion.dtype={self.dtype!r} is not allowed; expected one of {list(DTYPES)}")


def _counted(pipe):
    """Count a freshly built pipeline in PIPELINES_BUILT and return it."""
    global PIPELINES_BUILT
    PIPELINES_BUILT += 1
    return pipe


def _tiny_vae(latent_channels: int, **kwargs) -> AutoencoderKL:
    """Tiny VAE with 4 blocks, so vae_scale_factor is 8 like the real SD / FLUX VAEs."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         **kwargs)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Random SD-1.x pipeline (1 M params) taking (B, 77, 768) prompt_embeds; no text encoder."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_DIM, attention_head_dim=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return _counted(StableDiffusionPipeline(
        vae=_tiny_vae(4), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False))


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Random FLUX.1-dev-like pipeline taking (B, L, 4096) + pooled (B, 768); no text encoders."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(  # 16 latent channels packed 2x2 -> 64 input channels
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = _tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False,
                    shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1 VAE values
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev scheduler_config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return _counted(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None, transformer=transformer))


def load_pipeline(spec: DiffusionSpec):
    """Build or load the pipeline of `spec` without text encoders, on its dtype and device."""
    dtype = DTYPES[spec.dtype]
    if spec.name_or_path is None:
        pipe = (tiny_sd_pipeline if spec.type == "sd" else tiny_flux_pipeline)(spec.seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif spec.type == "sd":
        pipe = _counted(StableDiffusionPipeline.from_pretrained(
            spec.name_or_path, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, torch_dtype=dtype))
    else:
        pipe = _counted(FluxPipeline.from_pretrained(
            spec.name_or_path, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            torch_dtype=dtype))
    device = devices.resolve(spec.device)
    if spec.cpu_offload:  # preflight refuses it without CUDA; a library call is told here, not ignored
        devices.check_placement(device.type, cpu_offload=True, who=f"the pipeline (device {device})")
        pipe.enable_model_cpu_offload(device=device)  # moves each model to the GPU only while it runs
    else:
        pipe.to(device)
    if spec.attention_slicing:
        if spec.type == "flux":
            log.warning("diffusion.attention_slicing has no effect on FLUX (its transformer has no sliced attention)")
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)  # Renderer.render_images shows one labelled bar per call instead
    return pipe


def _bad(head: str, t: torch.Tensor, expected: str) -> ValueError:
    """ValueError naming the head, its received shape and dtype, and the expected shape."""
    return ValueError(f"conditioning head {head!r} has shape {tuple(t.shape)} and dtype {t.dtype}; "
                      f"expected shape {expected}")


def check_conditioning(spec_type: str, pipe, embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check adapter outputs fit `pipe`, then cast them to its dtype and execution device."""
    heads = ("clip",) if spec_type == "sd" else ("t5", "pooled")
    if sorted(embeds) != sorted(heads):
        raise ValueError(f"diffusion.type={spec_type!r} needs heads {list(heads)}, got {sorted(embeds)}")
    if spec_type == "sd":
        dim = pipe.unet.config.cross_attention_dim
        clip = embeds["clip"]
        if clip.ndim != 3 or tuple(clip.shape[1:]) != (CLIP_SEQ_LEN, dim) or not clip.is_floating_point():
            raise _bad("clip", clip, f"(B, {CLIP_SEQ_LEN}, {dim}) floating point")
        model = pipe.unet
    else:
        t5, pooled = embeds["t5"], embeds["pooled"]
        t5_dim, pooled_dim = pipe.transformer.config.joint_attention_dim, pipe.transformer.config.pooled_projection_dim
        if t5.ndim != 3 or t5.shape[-1] != t5_dim or not t5.is_floating_point():
            raise _bad("t5", t5, f"(B, L, {t5_dim}) floating point")
        if pooled.ndim != 2 or pooled.shape != (t5.shape[0], pooled_dim) or not pooled.is_floating_point():
            raise _bad("pooled", pooled, f"({t5.shape[0]}, {pooled_dim}) floating point (batch of 't5')")
        model = pipe.transformer
    # A bf16 pipeline has no text encoder to cast fp32 adapter outputs for it: do it here.
    return {k: v.to(device=pipe._execution_device, dtype=model.dtype) for k, v in embeds.items()}


@torch.no_grad()
def render(pipe, spec: DiffusionSpec, embeds: dict[str, torch.Tensor], first_index: int = 0) -> list[Image.Image]:
    """One PIL image per row of `embeds`; image i is seeded with spec.seed + first_index + i."""
    embeds = check_conditioning(spec.type, pipe, embeds)
    batch = next(iter(embeds.values())).shape[0]
    # One CPU generator per image: the same seed gives the same image, whatever the batching or device.
    generators = [torch.Generator().manual_seed(spec.seed + first_index + i) for i in range(batch)]
    common = dict(height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                  guidance_scale=spec.guidance_scale, generator=generators, output_type="pil")
    if spec.type == "sd":
        # Without a tokenizer the pipeline cannot encode "" for CFG, so the unconditional branch is zeros.
        negative = torch.zeros_like(embeds["clip"]) if spec.guidance_scale > 1 else None
        return pipe(prompt_embeds=embeds["clip"], negative_prompt_embeds=negative, **common).images
    return pipe(prompt_embeds=embeds["t5"], pooled_prompt_embeds=embeds["pooled"], **common).images


class Renderer:
    """Holds a DiffusionSpec and builds its pipeline only when the first image is asked for."""

    def __init__(self, spec: DiffusionSpec):
        self.spec, self.device = spec, devices.resolve(spec.device)
        self.pipe = None

    def render_images(self, embeds: dict[str, torch.Tensor], batch_size: int = 8,
                      desc: str = "rendering") -> list[Image.Image]:
        """Render every row of `embeds` in batches of `batch_size`, loading the pipeline if needed."""
        if self.pipe is None:
            self.pipe = load_pipeline(self.spec)
        total = next(iter(embeds.values())).shape[0]
        images = []
        with tqdm(total=total, desc=desc, unit="image") as bar:
            for start in range(0, total, batch_size):
                chunk = {k: v[start:start + batch_size] for k, v in embeds.items()}
                images += render(self.pipe, self.spec, chunk, first_index=start)
                bar.update(len(images) - bar.n)
        return images

    def free(self) -> None:
        """Drop the pipeline and return its GPU memory."""
        del self.pipe
        self.pipe = None
        gc.collect()
        devices.empty_cache(self.device)


def save_grid(rows: list[tuple[str, list[Image.Image]]], path: str | Path,
              column_titles: list[str] | None = None, min_cell: int = 128) -> Path:
    """Write a PNG grid: one labelled row per (label, images), optional titles above the columns; images
    smaller than `min_cell` pixels (tiny pipelines make 64 px) are upscaled by a whole factor, pixels kept sharp."""
    w, h = rows[0][1][0].size
    scale = max(1, math.ceil(min_cell / min(w, h)))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default(size=14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + int(max(probe.textlength(label, font=font) for label, _ in rows))
    title_h = 22 if column_titles else 0
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * cell_w, title_h + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles or []):
        draw.text((label_w + c * cell_w + 4, 3), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = title_h + r * cell_h
        draw.text((6, top + cell_h // 2 - 8), label, fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (label_w + c * cell_w, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_gallery(folder: str | Path, header: list[str], rows: list[list[str | Path]], title: str = "a2v gallery",
                  links: dict[str, str] | None = None) -> Path:
    """Write folder/index.html: `title`, `links` (label -> href, e.g. the previous and next round), and a table
    with `header` and one row per list of cells; a Path cell is an image (relative to `folder`), others text."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def cell(value) -> str:
        if not isinstance(value, Path):
            return f"<td>{html.escape(str(value))}</td>"
        src = html.escape((value.relative_to(folder) if value.is_absolute() else value).as_posix())
        return f'<td><a href="{src}"><img src="{src}" alt="{src}"></a></td>'

    nav = " | ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in (links or {}).items())
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}} td{{padding:4px;"
            "vertical-align:middle} img{width:160px;image-rendering:pixelated}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>{nav}</p>\n<table>\n<tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>\n"
            + "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
            + "\n</table>\n</body></html>\n")
    (folder / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over true classes) and macro F1 (over true or predicted classes)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    recall = [np.mean(preds[labels == c] == c) for c in np.unique(labels)]
    f1 = []
    for c in np.union1d(labels, preds):
        tp = np.sum((preds == c) & (labels == c))
        f1.append(2 * tp / (np.sum(preds == c) + np.sum(labels == c)))
    return {"accuracy": float(np.mean(preds == labels)), "balanced_accuracy": float(np.mean(recall)),
            "macro_f1": float(np.mean(f1))}


class ImageJudge:
    """CLIP zero-shot classifier of rendered images: "This is a photo of {class}."."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: torch.device | str = "cpu"):
        self.model, self.processor, self.device = model.eval().to(device), processor, torch.device(device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | str = "cpu") -> ImageJudge:
        """A real CLIP from a hub id or local folder."""
        return cls(CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path), device)

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32, patch_size: int = 8,
             device: torch.device | str = "cpu") -> ImageJudge:
        """A random 32-d, 1-layer CLIP with the offline character tokenizer (for tests)."""
        tok = tiny_clip_tokenizer()
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        cfg = CLIPConfig(projection_dim=32, vision_config=dict(**tower, image_size=image_size, patch_size=patch_size),
                         text_config=dict(**tower, vocab_size=len(tok), max_position_embeddings=CLIP_SEQ_LEN,
                                          bos_token_id=0, eos_token_id=1, pad_token_id=1))
        torch.manual_seed(seed)
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        return cls(CLIPModel(cfg), CLIPProcessor(image_processor=images, tokenizer=tok), device)

    @torch.no_grad()
    def scores(self, images: list[Image.Image], class_names: list[str]) -> torch.Tensor:
        """(N, C) cosine of each image with each class prompt; the judge predicts the argmax."""
        prompts = [f"This is a photo of {name.replace('_', ' ')}." for name in class_names]
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pixels = self.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        txt = torch.nn.functional.normalize(self.model.get_text_features(**text).pooler_output, dim=-1)  # (C, P)
        img = torch.nn.functional.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output,
                                            dim=-1)                                                   # (N, P)
        return (img @ txt.T).float().cpu()                                                           # (N, C)

    def judge(self, images: list[Image.Image], labels: list[int], class_names: list[str]) -> dict[str, float]:
        """Zero-shot accuracy, balanced accuracy, macro F1 and CLIP score of `images` against their labels."""
        return judge_metrics(self.scores(images, class_names), labels)


def judge_metrics(cos: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Classification metrics of the judge's (N, C) scores, and the CLIP score (100 x cosine) of the true class."""
    labels_t = torch.as_tensor(labels)
    metrics = classification_metrics(cos.argmax(1).numpy(), labels_t.numpy())
    metrics["clip_score"] = (100 * cos[torch.arange(len(labels)), labels_t]).clamp_min(0).mean().item()
    return metrics
