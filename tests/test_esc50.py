"""ESC-50 loading: awkward audio files, metadata checks, skipped files."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import soundfile as sf

from a2v_flower import config as C
from a2v_flower.cache import TensorCache
from a2v_flower.data.esc50 import CSV_COLUMNS, Clip, load_audio, load_clip, read_metadata
from a2v_flower.data.site import embed_clips
from a2v_flower.models.audio_encoder import AudioEncoder

SR = 16000
TINY_AST = (("hidden_size", 32), ("intermediate_size", 64), ("num_attention_heads", 2), ("num_hidden_layers", 1))


def tone(sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    sf.write(tmp_path / "a.wav", tone(44100, 5.0, channels=2), 44100)
    wave = load_audio(tmp_path / "a.wav", SR, 5 * SR)
    assert wave.dtype == np.float32 and wave.shape == (5 * SR,)
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * SR / len(wave) - 440) < 2  # the tone survived resampling


def test_8bit_and_short_file_is_padded(tmp_path):
    sf.write(tmp_path / "b.wav", tone(8000, 1.0), 8000, subtype="PCM_U8")
    wave = load_audio(tmp_path / "b.wav", SR, 5 * SR)
    assert wave.shape == (5 * SR,)
    assert np.abs(wave[: SR // 2]).max() > 0.3      # 8-bit scaled to [-1, 1], not 0..255
    assert np.all(wave[int(1.01 * SR):] == 0)        # zero padding after the 1-s clip


def test_long_file_is_trimmed(tmp_path):
    sf.write(tmp_path / "c.wav", tone(SR, 7.0), SR)
    assert load_audio(tmp_path / "c.wav", SR, 5 * SR).shape == (5 * SR,)


def write_meta(root, rows, columns=CSV_COLUMNS):
    (root / "meta").mkdir(parents=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)


def test_metadata_missing_column_names_the_file(tmp_path):
    write_meta(tmp_path, [["1-1-A-0.wav", 1, 0, "dog", True, 1, "A"]], columns=CSV_COLUMNS[:3])
    with pytest.raises(ValueError, match="missing columns.*category"):
        read_metadata(tmp_path)


def test_metadata_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta/esc50.csv"):
        read_metadata(tmp_path / "nowhere")


def test_metadata_unknown_class(tmp_path):
    write_meta(tmp_path, [["1-1-A-0.wav", 1, 0, "dog", True, 1, "A"]])
    with pytest.raises(ValueError, match="'cat'.*allowed.*dog"):
        read_metadata(tmp_path, classes=["cat"])


def test_unreadable_file_is_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "good.wav", tone(SR, 1.0), SR)
    (tmp_path / "audio" / "bad.wav").write_bytes(b"RIFF not really a wave file")
    clips = [Clip(tmp_path / "audio" / n, 1, 0, "dog") for n in ("good.wav", "bad.wav", "missing.wav")]
    enc = AudioEncoder(C.spec("model.audio", max_length=128, tokens=4, tiny=TINY_AST))
    with caplog.at_level(logging.WARNING):
        x, kept, skipped = embed_clips(enc, clips, TensorCache(tmp_path / "cache"), SR)
    assert x.shape == (1, 4, 32) and [c.path.name for c in kept] == ["good.wav"]
    assert sorted(s.split("/")[-1] for s in skipped) == ["bad.wav", "missing.wav"]
    assert "bad.wav" in caplog.text


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"garbage")
    enc = AudioEncoder(C.spec("model.audio", max_length=128, tokens=4, tiny=TINY_AST))
    with pytest.raises(ValueError, match="No usable audio"):
        embed_clips(enc, [Clip(tmp_path / "bad.wav", 1, 0, "dog")], TensorCache(tmp_path / "c"), SR)


def test_a_clips_sound_length_ignores_padding_and_trailing_digital_silence(tmp_path):
    """ESC-50 pads short events with exact zeros: the samples that hold sound end at the last non-zero one."""
    wave = np.zeros(44100, dtype=np.float32)
    wave[:11025] = 0.1 * np.sin(np.arange(11025) / 10)  # 0.25 s of sound, 0.75 s of digital silence
    sf.write(tmp_path / "short.wav", wave, 44100)
    out, length = load_clip(tmp_path / "short.wav", SR, 5 * SR)
    assert out.shape == (5 * SR,) and abs(length - SR // 4) <= 1
    assert load_clip(tmp_path / "short.wav", SR, SR // 8)[1] == SR // 8  # trimmed to the window
