"""The compact representation's cost (B3): retrieval with the 8 tokens per clip that sites cache vs 32 tokens vs
the mean of the patch tokens vs all of the AST's tokens, each trained centrally to convergence by one rule.

    python benchmarks/bench_tokens.py                # 10 classes x 50 clips (200 test clips), 2 seeds
    python benchmarks/bench_tokens.py --quick        # smoke size
    python benchmarks/bench_tokens.py --seeds 5 data.clips_per_class=200    # Hydra overrides after the options

Every row sees the same clips: the synthetic dataset is embedded once by the tiny AST at 1024 frames (so
that "all tokens" is the real AST's 1214: CLS, distillation token, 12 x 101 patches) and each representation
is derived from those states: `compact_tokens(h, 8)` (what sites cache), `compact_tokens(h, 32)`, the mean of
the patch tokens (1 token), all tokens. One site holds every clip (centralised; the app's stratified
train/val/test split). Adapters of the configured size train with AdamW on the app's loss, an epoch at a time,
until the val loss has not improved for `--patience` epochs (at most `--max-epochs`), and the best epoch is
kept: the same budget rule, hyper-parameters and seeds for every row.

Reported per row: test top-1 (mean over seeds) with a 95 % percentile-bootstrap interval over the test clips,
the paired difference to the 8-token row (same resamples), bytes per cached clip (float32, at the tiny
AST's width and at the real AST's D = 768), adapter forward FLOPs per sample (both widths), epochs to the
best val loss and training time. Writes <out>/tokens.json and tokens.md and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from a2v_flower import config as C
from a2v_flower.cache import TensorCache, sha1_of
from a2v_flower.data.site import federation, load_site
from a2v_flower.metrics import similarity
from a2v_flower.models.adapters import AdapterSet, build_adapters
from a2v_flower.models.adapters import embedding_moments, input_norm
from a2v_flower.models.audio_encoder import AST_DEFAULTS, AudioEncoder, compact_tokens, sound_columns
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.training import TrainSpec, adapter_loss, predict

# 50 clips per class split 25/5/20: the >= 200 test clips every row is scored on, and a training set small enough
# that the task is not solved by every representation; adapter.width=128: the quality benchmark's size
SIZE = ["partition=iid", "federation.num_sites=1", "model.audio.max_length=1024", "data.clips_per_class=50",
        "data.splits={train: 0.5, val: 0.1, test: 0.4}", "adapter.width=128", "wandb.mode=disabled"]
QUICK = [*SIZE[:2], "model.audio.max_length=128", "data.clips_per_class=10", "data.seconds=1.0",
         "data.clip_seconds=1.0"]
REAL_DIM = 768  # the real AST's token width


class AllTokens(AudioEncoder):
    """The frozen AST with every token of its last hidden state kept: (N, 2 + P, D) per batch of waveforms."""

    def __init__(self, spec):
        super().__init__(spec)
        self.identity = sha1_of(self.identity, "all-tokens")  # its own embedding-cache entries

    @torch.no_grad()
    def encode(self, waves, lengths=None):
        """(N, 3 + P, D): the AST's states, then a row holding each clip's count of sound columns (the pooling
        with `columns` needs it; `representations` takes it off)."""
        self.load()
        ast = {k: getattr(self.model.config, k) for k in AST_DEFAULTS}
        cols = sound_columns([len(w) for w in waves] if lengths is None else list(lengths), self.spec.max_length, ast)
        out = []
        for i in range(0, len(waves), self.spec.batch_size):
            feats = self.extractor(waves[i:i + self.spec.batch_size], sampling_rate=self.spec.sampling_rate,
                                   return_tensors="pt")
            out.append(self.model(**feats).last_hidden_state)                      # (B, 2 + P, D)
            self.calls += len(waves[i:i + self.spec.batch_size])
        h = torch.cat(out)
        return torch.cat([h, torch.tensor(cols, dtype=h.dtype)[:, None, None].expand(-1, 1, h.shape[2])], 1)


def representations(h: torch.Tensor, grid_time: int) -> dict[str, torch.Tensor]:
    """The compared clip representations of `AllTokens` rows h (N, 3 + P, D): AST states and sound columns."""
    cols, h = h[:, -1, 0].round().long().tolist(), h[:, :-1]
    return {"8 tokens, sound columns (cached by sites)": compact_tokens(h, 8, cols, grid_time),
            "8 tokens, every patch (padding too)": compact_tokens(h, 8),
            "32 tokens, sound columns": compact_tokens(h, 32, cols, grid_time),
            "mean of patch tokens (1 token)": h[:, 2:].mean(1, keepdim=True), f"all tokens ({h.shape[1]})": h}


def fit(adapters: AdapterSet, train, val, targets, spec: TrainSpec, patience: int, max_epochs: int,
        seed: int) -> int:
    """Epochs of AdamW on the app's loss until the val loss stalls `patience` epochs; keeps the best epoch.
    Returns the best epoch (1-based)."""
    (x, y), (xv, yv) = train, val
    opt = torch.optim.AdamW(adapters.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = math.inf, None, 0
    for epoch in range(1, max_epochs + 1):
        adapters.train()
        order = torch.randperm(len(x), generator=order_rng)
        for i in range(0, len(x), spec.batch_size):
            idx = order[i:i + spec.batch_size]
            loss = adapter_loss(adapters(x[idx]), y[idx], targets, spec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapters.parameters(), spec.grad_clip)
            opt.step()
        with torch.no_grad():
            val_loss = adapter_loss(predict(adapters, xv), yv, targets, spec).item()
        if val_loss < best:
            best, best_state, best_epoch = val_loss, copy.deepcopy(adapters.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    adapters.load_state_dict(best_state)
    return best_epoch


def adapter_flops(in_dim: int, tokens: int, targets, width: int, heads: int) -> int:
    """Forward FLOPs of the adapters for one sample: the counted matmuls (torch's FlopCounterMode) plus the
    attention products it does not see on CPU (scores and weighted values: 4 * queries * tokens * width)."""
    from torch.utils.flop_counter import FlopCounterMode

    adapters = build_adapters(in_dim, targets, width, heads, 0)
    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        adapters(torch.zeros(1, tokens, in_dim))
    queries = sum(1 if head.pooled else head.queries.shape[0] for head in adapters.values())
    return counter.get_total_flops() + 4 * queries * tokens * width


def bootstrap(values: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values` (N,) over the resamples idx (B, N)."""
    means = values[idx].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def main() -> None:
    """Embed once, train every representation with every seed, write the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size: 10 clips per class, short clips, 3 epochs")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--patience", type=int, default=10, help="epochs without a lower val loss before stopping")
    ap.add_argument("--max-epochs", type=int, default=150)
    ap.add_argument("--out", default="outputs/bench_tokens")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the app's config")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.max_epochs, args.patience = min(args.seeds, 2), 3, 2
    cfg = C.absolute_paths(C.compose_config([*(QUICK if args.quick else SIZE), *args.overrides]), Path.cwd())
    C.validate(cfg)
    data, part = C.data_spec(cfg), C.partition_spec(cfg)
    _, classes, _ = federation(data, part)
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.validate(cfg).model.text, cfg.diffusion.t5_seq_len,
                            TensorCache(Path(cfg.paths.cache_dir) / "targets"))
    t0 = time.perf_counter()
    site = load_site(data, part, AllTokens(C.validate(cfg).model.audio), 0)  # every clip, embedded once (disk cache)
    embed_s = time.perf_counter() - t0
    if not len(site.splits["val"][1]):
        raise ValueError(f"no val clips to stop on: data.clips_per_class={cfg.data.clips_per_class} with "
                         f"data.splits={dict(cfg.data.splits)}; raise data.clips_per_class")
    ast = AST_DEFAULTS | dict(C.validate(cfg).model.audio.tiny or ())
    grid_time = (cfg.model.audio.max_length - ast["patch_size"]) // ast["time_stride"] + 1
    splits = {name: (representations(x, grid_time), y) for name, (x, y) in site.splits.items()}
    n_test = len(site.splits["test"][1])
    spec = C.validate(cfg).train
    width, heads = cfg.adapter.width, cfg.adapter.heads
    resample = torch.randint(0, n_test, (2000, n_test), generator=torch.Generator().manual_seed(0))
    rows, correct = [], {}
    for name in splits["train"][0]:
        x = {s: (reps[name], y) for s, (reps, y) in splits.items()}
        tokens, dim = x["train"][0].shape[1:]
        hits, epochs, seconds = [], [], 0.0
        for seed in range(args.seeds):
            norm = input_norm([embedding_moments(x["train"][0])]) if cfg.adapter.normalise else None
            adapters = build_adapters(dim, targets, width, heads, seed, norm=norm)
            t0 = time.perf_counter()
            epochs.append(fit(adapters, x["train"], x["val"], targets, spec, args.patience, args.max_epochs, seed))
            seconds += time.perf_counter() - t0
            xt, yt = x["test"]
            hits.append((similarity(predict(adapters, xt), targets).argmax(1) == yt).float())
            print(f"{name}, seed {seed}: best epoch {epochs[-1]}, top-1 {hits[-1].mean():.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        correct[name] = torch.stack(hits).mean(0)                                 # (N,) mean over seeds
        rows.append({"representation": name, "tokens": int(tokens), "bytes_per_clip": int(tokens * dim * 4),
                     "bytes_per_clip_real_ast": int(tokens * REAL_DIM * 4),
                     "adapter_flops": adapter_flops(dim, tokens, targets, width, heads),
                     "adapter_flops_real_ast": adapter_flops(REAL_DIM, tokens, targets, width, heads),
                     "top1": correct[name].mean().item(), "top1_ci95": bootstrap(correct[name], resample),
                     "top1_per_seed": [h.mean().item() for h in hits], "best_epochs": epochs,
                     "train_s_per_seed": seconds / args.seeds})
    base = next(iter(correct.values()))  # the first row: what sites cache
    for row in rows:
        diff = correct[row["representation"]] - base
        row["diff_vs_8"], row["diff_vs_8_ci95"] = diff.mean().item(), bootstrap(diff, resample)
    write(rows, Path(args.out), {"test_clips": n_test, "train_clips": len(site.splits["train"][1]),
                                 "val_clips": len(site.splits["val"][1]), "classes": len(classes),
                                 "seeds": args.seeds, "patience": args.patience, "max_epochs": args.max_epochs,
                                 "token_dim": int(dim), "adapter_width": width, "embed_s": embed_s,
                                 "diffusion": cfg.diffusion.type,
                                 "normalise": bool(cfg.adapter.normalise)})


def write(rows: list[dict], out: Path, info: dict) -> None:
    """tokens.json (rows + run facts) and tokens.md (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    lines = [f"{info['classes']} classes (chance {1 / info['classes']:.3f}), {info['train_clips']} train / "
             f"{info['val_clips']} val / {info['test_clips']} test clips, the same for every row; "
             f"{info['seeds']} seeds; early stopping on val loss (patience {info['patience']}, at most "
             f"{info['max_epochs']} epochs); adapter width {info['adapter_width']}, {info['diffusion']} targets; "
             f"adapter inputs standardised: {info['normalise']}.", "",
             f"| representation | tokens | bytes / clip (D={info['token_dim']}) | bytes / clip (D={REAL_DIM}) "
             f"| adapter MFLOPs / sample (D={info['token_dim']}) | (D={REAL_DIM}) | best epoch per seed "
             "| train s / seed | top-1 [95 % CI] | vs 8 tokens [95 % CI] |", "|---" * 10 + "|"]
    for r in rows:
        lo, hi = r["top1_ci95"]
        dlo, dhi = r["diff_vs_8_ci95"]
        lines.append(f"| {r['representation']} | {r['tokens']} | {r['bytes_per_clip']:,} | "
                     f"{r['bytes_per_clip_real_ast']:,} | {r['adapter_flops'] / 1e6:,.0f} | "
                     f"{r['adapter_flops_real_ast'] / 1e6:,.0f} | {', '.join(map(str, r['best_epochs']))} | "
                     f"{r['train_s_per_seed']:.0f} | {r['top1']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['diff_vs_8']:+.3f} [{dlo:+.3f}, {dhi:+.3f}] |")
    (out / "tokens.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
