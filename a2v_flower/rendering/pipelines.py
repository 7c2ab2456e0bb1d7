"""Diffusers pipelines without text encoders (SD: CLIP 77x768; FLUX: T5 Lx4096 + CLIP pooled 768), built tiny and
random from configs or loaded by id/folder, and rendering from adapter outputs."""

from __future__ import annotations

import gc
import logging

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image
from tqdm.auto import tqdm

from a2v_flower import devices
from a2v_flower.models.text_encoders import CLIP_DIM, CLIP_SEQ_LEN, T5_DIM
from a2v_flower.schema import DiffusionSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PIPELINES_BUILT = 0  # pipelines constructed or loaded in this process (tests check lazy loading)


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


def load_pipeline(spec: DiffusionSpec, device: torch.device | str = "cpu"):
    """Build or load the pipeline of `spec` without text encoders, in its dtype, on `device`."""
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
    device = torch.device(device)
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

    def __init__(self, spec: DiffusionSpec, device: torch.device | str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.pipe = None

    def render_images(self, embeds: dict[str, torch.Tensor], batch_size: int = 8,
                      desc: str = "rendering") -> list[Image.Image]:
        """Render every row of `embeds` in batches of `batch_size`, loading the pipeline if needed."""
        if self.pipe is None:
            self.pipe = load_pipeline(self.spec, self.device)
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

