"""Issue 28 item 2: "the AST window follows the clip length" against what main does, "pool only the sound
columns" of a window of model.audio.max_length frames.

    python benchmarks/bench_window.py real0.5 3      # or real5 (0.5 s of sound padded to 5 s), synth

`WindowEncoder` runs the same AST weights on a window cut to each clip's sound (the patch grid keeps the sound's
time columns and their position embeddings; no padding patch enters attention) and pools every patch; main's
encoder runs the full window and pools the sound's columns only. Both rows: the linear probe and centralised
(bench_quality's protocol, the app's default adapters) on the same splits. A clip that fills the window (every
synthetic clip: 50 of 50 columns) gets identical tokens from both. Results: BENCHMARKS.md.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_adapter_gap as G  # noqa: E402
from benchmarks import bench_quality as B  # noqa: E402
from a2v_flower.models.audio_encoder import (AST_DEFAULTS, AudioEncoder, compact_tokens,  # noqa: E402
                                             sound_columns)


class WindowEncoder(AudioEncoder):
    """The same AST (weights of the configured window), run on a window cut to each clip's sound: the patch grid
    keeps the sound's columns only (the position embeddings of those columns), every patch pooled."""

    def __init__(self, spec):
        super().__init__(spec)
        self.identity = self.identity + "-window-follows-clip"

    @torch.no_grad()
    def encode(self, waves, lengths=None):
        self.load()
        m = self.model
        ast = {k: getattr(m.config, k) for k in AST_DEFAULTS}
        frames = m.config.max_length
        cols = sound_columns([len(w) for w in waves] if lengths is None else list(lengths), frames, ast)
        grid_time = (frames - ast["patch_size"]) // ast["time_stride"] + 1
        out = []
        for w, c in zip(waves, cols):  # one clip at a time: its own window
            feats = self.extractor([w], sampling_rate=self.spec.sampling_rate, return_tensors="pt")["input_values"]
            t = (c - 1) * ast["time_stride"] + ast["patch_size"]        # frames the window keeps
            x = feats[:, :t]                                             # (1, t, 128)
            emb = m.embeddings
            patches = emb.patch_embeddings(x)                            # (1, F*c, D)
            pos = emb.position_embeddings                                # (1, 2 + F*T, D)
            grid = pos[:, 2:].unflatten(1, (-1, grid_time))[:, :, :c].flatten(1, 2)
            h = torch.cat([emb.cls_token + pos[:, :1], emb.distillation_token + pos[:, 1:2], patches + grid], 1)
            for layer in m.layers:
                h = layer(h, None)
            h = m.layernorm(h)
            out.append(compact_tokens(h, self.spec.tokens).float())
            self.calls += 1
        return torch.cat(out)


if __name__ == "__main__":
    which, nseeds = sys.argv[1], int(sys.argv[2])
    over = {"real0.5": ["data=esc50", "data.root=outputs/real", "data.clip_seconds=0.5"],
            "real5": ["data=esc50", "data.root=outputs/real", "data.clip_seconds=5.0"],
            "synth": []}[which]
    skew = G.SKEW if which.startswith("real") else B.GROUPS  # the label skew of bench_quality's non-IID rows
    seeds = list(range(nseeds))
    for name, cls in (("sound columns (main)", AudioEncoder), ("window follows clip", WindowEncoder)):
        t = time.time()
        cfg, data = B.load_splits(over, skew, seeds, cls)
        ref, fit = G.probe(data)
        G.report(f"{which} {name}: probe", ref, fit, t=time.time() - t)
        t = time.time()
        c, fit = G.central(cfg, data, tokens=True)  # the app default: token embedding on
        G.report(f"{which} {name}: centralised", c, fit, ref, time.time() - t)
        x = torch.cat([s.splits[k][0] for s in data[0][1] for k in ("train", "val", "test")])
        print(f"  finite {bool(torch.isfinite(x).all())} shape {tuple(x.shape)} mean pairwise cos "
              f"{F.cosine_similarity(x.flatten(1)[:, None], x.flatten(1)[None], dim=-1).mean():.4f}", flush=True)
