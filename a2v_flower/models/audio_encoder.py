"""Frozen AST audio encoder: mono waveforms in, a compact (tokens, D) representation per clip out.

Reading, resampling, caching and batching clips is the data layer's job (`a2v_flower.data.site`)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from a2v_flower.cache import model_identity, sha1_of
from a2v_flower.schema import AST_DEFAULTS, AudioEncoderSpec

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTION = "sdpa"  # torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on a GPU)


def compact_tokens(hidden: torch.Tensor, tokens: int, columns: list[int] | None = None, grid_time: int = 0
                   ) -> torch.Tensor:
    """(B, 2 + P, D) AST states -> (B, tokens, D): mean of [CLS, DIST] then `tokens-1` pooled patch groups.

    The P patches lie frequency-major on a (P / grid_time, grid_time) grid of (frequency, time) positions. With
    `columns` (per clip, the time columns that hold its sound) only those patches are pooled, so the padding of a
    short clip in a long AST window does not drown its sound; without it every patch is pooled."""
    summary = hidden[:, :2].mean(dim=1, keepdim=True)                                # (B, 1, D)
    if columns is None:
        patches = F.adaptive_avg_pool1d(hidden[:, 2:].transpose(1, 2), tokens - 1)   # (B, D, K-1)
        return torch.cat([summary, patches.transpose(1, 2)], dim=1)                   # (B, K, D)
    grid = hidden[:, 2:].unflatten(1, (-1, grid_time))                               # (B, F, T, D)
    pooled = [F.adaptive_avg_pool1d(g[:, :c].flatten(0, 1).t()[None], tokens - 1)[0].t()  # (K-1, D) per clip
              for g, c in zip(grid, columns)]
    return torch.cat([summary, torch.stack(pooled)], dim=1)                           # (B, K, D)


def sound_columns(lengths: list[int], max_length: int, ast: dict) -> list[int]:
    """Per clip, the AST's time columns of patches that start within its sound: `lengths` are samples holding
    sound (the feature extractor's frames are 400 samples, hop 160), at least one column each."""
    columns = (max_length - ast["patch_size"]) // ast["time_stride"] + 1
    frames = [min(max_length, 1 + max(0, n - 400) // 160) for n in lengths]
    return [max(1, min(columns, -(-f // ast["time_stride"]))) for f in frames]


class AudioEncoder:
    """ASTFeatureExtractor + frozen ASTModel on `device` in `spec.dtype`, loaded on first use; `encode` maps
    waveforms to (N, tokens, D) float32 CPU tensors (what the cache holds, whatever ran the network).

    Its `identity` needs no weights, so a process whose clips are all cached never loads the model.
    """

    def __init__(self, spec: AudioEncoderSpec, device: torch.device | str = "cpu"):
        if spec.tokens < 2:
            raise ValueError(f"model.audio.tokens={spec.tokens} must be >= 2 (summary + pooled patches)")
        self.spec, self.device, self.dtype = spec, torch.device(device), DTYPES[spec.dtype]
        self.model = None      # transformers ASTModel, built on first use
        self.extractor = None  # ASTFeatureExtractor
        self.calls = 0  # clips this instance has run through the network
        # tokens made in bfloat16 or on a GPU differ slightly: their own cache entries. float32 on a CPU adds
        # nothing, so embeddings cached before devices existed stay valid
        placement = () if (spec.dtype, self.device.type) == ("float32", "cpu") else (spec.dtype, self.device.type)
        tiny = {"tiny": spec.tiny_config or None, "seed": spec.seed}
        self.identity = sha1_of(model_identity(spec.name_or_path, tiny),
                                spec.max_length, spec.tokens, spec.sampling_rate, "pool: sound columns", *placement)

    def load(self) -> AudioEncoder:
        """Build the tiny random AST (seeded: same weights in every process) or load the named one."""
        if self.model is not None:
            return self
        from transformers import ASTConfig, ASTFeatureExtractor, ASTModel, AutoFeatureExtractor  # slow import

        spec = self.spec
        if spec.name_or_path is None:
            torch.manual_seed(spec.seed)
            config = ASTConfig(num_mel_bins=128, max_length=spec.max_length, attn_implementation=ATTENTION,
                               **dict(spec.tiny_config))
            self.model = ASTModel(config)
            self.extractor = ASTFeatureExtractor(num_mel_bins=128, max_length=spec.max_length,
                                                 sampling_rate=spec.sampling_rate)
        else:
            self.model = ASTModel.from_pretrained(spec.name_or_path, attn_implementation=ATTENTION)
            self.extractor = AutoFeatureExtractor.from_pretrained(spec.name_or_path)
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        log.info("Loaded audio encoder %s on %s (%s)", spec.name_or_path or "tiny-random-AST", self.device, spec.dtype)
        return self

    @torch.no_grad()
    def encode(self, waves: list[np.ndarray], lengths: list[int] | None = None) -> torch.Tensor:
        """Embed mono float32 waveforms at the encoder's rate: (N, tokens, D). `lengths` (samples of each clip
        that hold sound; default: all of it) keep the pooled patch tokens to the clip's own time columns."""
        self.load()
        ast = {k: getattr(self.model.config, k) for k in AST_DEFAULTS}
        frames = self.model.config.max_length  # the model's window (a loaded model's own, whatever the config says)
        columns = sound_columns([len(w) for w in waves] if lengths is None else list(lengths), frames, ast)
        grid_time = (frames - ast["patch_size"]) // ast["time_stride"] + 1
        out = []
        for i in range(0, len(waves), self.spec.batch_size):
            batch = waves[i:i + self.spec.batch_size]
            feats = self.extractor(batch, sampling_rate=self.spec.sampling_rate, return_tensors="pt")
            feats = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)  # masks keep theirs
                     for k, v in feats.items()}                                          # input_values (B, F, 128)
            hidden = self.model(**feats).last_hidden_state                               # (B, T, D)
            out.append(compact_tokens(hidden, self.spec.tokens, columns[i:i + len(batch)], grid_time)
                       .float().cpu())                                                    # the cache's form
            self.calls += len(batch)
        return torch.cat(out)


# transformers.ASTConfig's defaults that shapes depend on: known without importing transformers (1.6 s)
def patch_tokens(spec: AudioEncoderSpec) -> int:
    """Patch tokens P per clip (the AST's states are (2 + P, D)): its patch grid over mel bins x frames."""
    return spec.patch_tokens()


def encoder_dim(spec: AudioEncoderSpec) -> int:
    """Token width D of the encoder, read from its config only (no weights loaded); the tiny model's from
    AST_DEFAULTS and its `tiny` overrides, so a ServerApp with cached targets never imports transformers."""
    if spec.name_or_path is None:
        return int((AST_DEFAULTS | dict(spec.tiny_config))["hidden_size"])
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec.name_or_path).hidden_size
