"""Class targets: the text-conditioning embeddings of each class prompt, for SD (CLIP) or FLUX (T5 + CLIP)."""

from __future__ import annotations


import torch

from a2v_flower.cache import TensorCache, model_identity, sha1_of
from a2v_flower.schema import CLIP_SEQ_LEN, TextSpec

CLIP_DIM, T5_DIM = 768, 4096  # real SD-1.5 / FLUX.1 conditioning widths (CLIP_SEQ_LEN positions for SD)


def head_shapes(diffusion: str, t5_seq_len: int = 16) -> dict[str, tuple[int, ...]]:
    """Output shape of each adapter head for a diffusion family."""
    if diffusion == "sd":
        return {"clip": (CLIP_SEQ_LEN, CLIP_DIM)}
    if diffusion == "flux":
        return {"t5": (t5_seq_len, T5_DIM), "pooled": (CLIP_DIM,)}
    raise ValueError(f"diffusion.type={diffusion!r} is not allowed; expected 'sd' or 'flux'")


def tiny_clip_tokenizer():
    """Byte-level CLIP BPE with no merges (one token per character): no files, no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    syms = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in syms + [s + "</w>" for s in syms]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_SEQ_LEN)


def tiny_t5_tokenizer():
    """Unigram T5 tokenizer over printable ASCII; pad=0, eos=1, unk=2 like the real one."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_clip(spec: TextSpec):
    """CLIP text tokenizer + encoder: from `spec.clip` or tiny random (768-d, 1 layer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # transformers loads slowly

    if spec.clip is None:
        tok = tiny_clip_tokenizer()
        torch.manual_seed(spec.seed)
        config = CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM,
                             num_hidden_layers=1, num_attention_heads=12, projection_dim=CLIP_DIM,
                             max_position_embeddings=CLIP_SEQ_LEN, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1)
        return tok, CLIPTextModel(config).eval()
    sub = spec.clip_subfolder
    tok = CLIPTokenizer.from_pretrained(spec.clip, subfolder=sub.replace("text_encoder", "tokenizer"))
    return tok, CLIPTextModel.from_pretrained(spec.clip, subfolder=sub).eval()


def build_t5(spec: TextSpec):
    """T5 tokenizer + encoder: from `spec.t5` or tiny random (d_model 4096, 1 layer)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    if spec.t5 is None:
        tok = tiny_t5_tokenizer()
        torch.manual_seed(spec.seed + 1)
        config = T5Config(vocab_size=len(tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                       pad_token_id=0, eos_token_id=1)
        return tok, T5EncoderModel(config).eval()
    sub = spec.t5_subfolder
    tok = T5TokenizerFast.from_pretrained(spec.t5, subfolder=sub.replace("text_encoder", "tokenizer"))
    return tok, T5EncoderModel.from_pretrained(spec.t5, subfolder=sub).eval()


@torch.no_grad()
def encode_prompts(prompts: list[str], diffusion: str, spec: TextSpec, t5_seq_len: int = 16,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Text-conditioning embeddings of `prompts`, as the diffusers pipelines compute them; the encoders run on
    `device`, the embeddings come back as float32 CPU tensors (they are cached and travel)."""
    head_shapes(diffusion, t5_seq_len)  # validates `diffusion`
    tok, clip = build_clip(spec)
    ids = tok(prompts, padding="max_length", max_length=CLIP_SEQ_LEN, truncation=True,
              return_tensors="pt").input_ids
    out = clip.to(device)(ids.to(device))
    if diffusion == "sd":
        return {"clip": out.last_hidden_state.float().cpu()}                    # (C, 77, 768)
    t5_tok, t5 = build_t5(spec)
    t5_ids = t5_tok(prompts, padding="max_length", max_length=t5_seq_len, truncation=True,
                    return_tensors="pt").input_ids
    return {"t5": t5.to(device)(t5_ids.to(device)).last_hidden_state.float().cpu(),  # (C, L, 4096)
            "pooled": out.pooler_output.float().cpu()}                           # (C, 768)


def class_targets(classes: list[str], template: str, diffusion: str, spec: TextSpec,
                  t5_seq_len: int, cache: TensorCache, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Targets per head, (C, ...) in `classes` order; computed once (on `device`, in float32: the same targets
    up to rounding wherever they are made, so the cache key leaves the device out), then read from `cache`."""
    prompts = [template.format(c.replace("_", " ")) for c in classes]
    ident = [model_identity(spec.clip, {"sub": spec.clip_subfolder, "seed": spec.seed})]
    if diffusion == "flux":
        ident.append(model_identity(spec.t5, {"sub": spec.t5_subfolder, "seed": spec.seed}))
    key = sha1_of("targets", ident, prompts, diffusion, t5_seq_len)
    targets = cache.get(key)
    if targets is None:
        targets = encode_prompts(prompts, diffusion, spec, t5_seq_len, device)
        cache.put(key, targets)
    return targets
