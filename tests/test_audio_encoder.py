"""The frozen AST encoder and its embedding cache: second runs never re-encode; save/load round trip."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

from a2v_flower import config as C
from a2v_flower.cache import TensorCache
from a2v_flower.data.site import federation, load_site
from a2v_flower.data.site import embed_clips
from a2v_flower.models.audio_encoder import (AST_DEFAULTS, AudioEncoder, compact_tokens,
                                             encoder_dim, sound_columns)


def test_compact_tokens_shape_and_summary():
    hidden = torch.randn(2, 2 + 30, 16)
    out = compact_tokens(hidden, 4)
    assert out.shape == (2, 4, 16)
    assert torch.allclose(out[:, 0], hidden[:, :2].mean(1))
    assert torch.allclose(out[:, 1:].mean(1), hidden[:, 2:].mean(1), atol=1e-6)  # equal groups of 10


def test_encoder_dim_is_the_tiny_models_width_without_transformers(make_cfg, tmp_path):
    spec = C.validate(make_cfg(f"paths.cache_dir={tmp_path}")).model.audio
    encoder = AudioEncoder(spec)
    encoder.load()
    assert encoder_dim(spec) == encoder.model.config.hidden_size     # the configured tiny override
    plain = C.spec("model.audio", tiny=None)
    assert encoder_dim(plain) == ASTConfig().hidden_size            # no override: ASTConfig's default
    ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(
        tmp_path / "ast")
    assert encoder_dim(C.spec("model.audio", name_or_path=str(tmp_path / "ast"))) == 32  # a saved model: its config.json
    code = ("import sys, a2v_flower.server_app, a2v_flower.config as C\n"
            "from a2v_flower.models.audio_encoder import encoder_dim\n"
            "print(encoder_dim(C.validate(C.compose_config([])).model.audio), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(encoder.model.config.hidden_size), "False"], out.stderr[-2000:]


def test_second_load_makes_zero_encoder_calls(make_cfg, tmp_path):
    cfg = make_cfg(f"paths.cache_dir={tmp_path}/fresh")  # a cache of its own
    data, part, spec = C.data_spec(cfg), C.partition_spec(cfg), C.validate(cfg).model.audio
    first = load_site(data, part, AudioEncoder(spec), 0)
    fresh = AudioEncoder(spec)  # a new process in deployment: nothing in memory
    second = load_site(data, part, fresh, 0)
    assert first.encoder_calls > 0 and second.encoder_calls == 0
    assert fresh.model is None  # the weights were never even loaded
    for name in first.splits:
        assert torch.equal(first.splits[name][0], second.splits[name][0])


def test_changed_clip_or_encoder_is_re_encoded(make_cfg, tmp_path):
    cfg = make_cfg(f"paths.cache_dir={tmp_path}/c2")
    clips, _, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    cache, spec = TensorCache(tmp_path / "emb"), C.validate(cfg).model.audio
    few = [clips[i] for i in sites[0][:3]]
    embed_clips(AudioEncoder(spec), few, cache, 16000)
    shutil.copy(few[1].path, few[0].path)  # clip 0 now has clip 1's content
    enc = AudioEncoder(spec)
    embed_clips(enc, few, cache, 16000)
    assert enc.calls == 0  # same content as a cached clip: keyed by content, not by name
    other = AudioEncoder(C.spec("model.audio", **{**spec.__dict__, "tokens": spec.tokens + 1}))
    x, _, _ = embed_clips(other, few, cache, 16000)
    assert other.calls == 3 and x.shape[1] == spec.tokens + 1


def test_corrupt_cache_entry_is_recomputed(make_cfg, tmp_path):
    cfg = make_cfg(f"paths.cache_dir={tmp_path}/c3")
    clips, _, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    cache, spec = TensorCache(tmp_path / "emb"), C.validate(cfg).model.audio
    few = [clips[i] for i in sites[0][:2]]
    x1, _, _ = embed_clips(AudioEncoder(spec), few, cache, 16000)
    next(cache.root.rglob("*.safetensors")).write_bytes(b"truncated")
    enc = AudioEncoder(spec)
    x2, _, _ = embed_clips(enc, few, cache, 16000)
    assert enc.calls == 1 and torch.allclose(x1, x2)


def test_pretrained_path_loads_a_saved_model(tmp_path):
    """The real path (from_pretrained on a folder) with a tiny model saved by save_pretrained."""
    torch.manual_seed(0)
    model = ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               max_length=128))
    ASTFeatureExtractor(max_length=128).save_pretrained(tmp_path / "ast")
    model.save_pretrained(tmp_path / "ast")
    enc = AudioEncoder(C.spec("model.audio", name_or_path=str(tmp_path / "ast"), max_length=128, tokens=3))
    wave = [torch.randn(16000).numpy() * 0.1]
    out = enc.encode(wave)
    feats = ASTFeatureExtractor(max_length=128)(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**feats).last_hidden_state
    # 1 s = 98 frames of the 128-frame window: 10 of its 12 patch columns hold sound, the last 2 only padding
    ref = compact_tokens(hidden, 3, columns=[10], grid_time=12)
    assert out.shape == (1, 3, 32) and torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, compact_tokens(hidden, 3), atol=1e-3)  # padding pooled in: another embedding


def test_pooled_tokens_see_only_the_columns_that_hold_sound():
    """A short clip's padding (here: huge values in its last 3 time columns) leaves its pooled tokens alone; without
    `columns` every patch is pooled as before."""
    grid_f, grid_t, d = 4, 6, 5
    hidden = torch.randn(2, 2 + grid_f * grid_t, d)
    padded = hidden.clone()
    padded[:, 2:] = padded[:, 2:].unflatten(1, (grid_f, grid_t)).index_fill(2, torch.tensor([3, 4, 5]), 1e6).flatten(1, 2)
    out = compact_tokens(padded, 3, columns=[3, 3], grid_time=grid_t)
    assert torch.allclose(out, compact_tokens(hidden, 3, columns=[3, 3], grid_time=grid_t))
    assert out.abs().max() < 100 and compact_tokens(padded, 3).abs().max() > 1e5
    full = compact_tokens(hidden, 3, columns=[grid_t, grid_t], grid_time=grid_t)
    assert torch.allclose(full, compact_tokens(hidden, 3), atol=1e-6)  # a clip that fills the window: unchanged


def test_sound_columns_follow_the_clip_length():
    ast = dict(AST_DEFAULTS)  # 10-frame time stride, 16-frame patches; frames are 400 samples, hop 160
    assert sound_columns([16000, 8000, 100, 10 ** 6], 512, ast) == [10, 5, 1, 50]
