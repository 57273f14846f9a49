"""Packed sequences vs padded batches: effective (non-padding) tokens/s of training, CPU, tiny model.

The same samples (text-only, lengths from a log-normal mix capped at max_len = 2048, token ids
seeded) are trained on two ways with the trainer's own model and step (trainer/model.py,
trainer/train.py: the default LLM isolation path, loss on every next token of a sample, AdamW);
``--attention`` picks the isolation path (auto = per-sample causal SDPA on CPU; sdpa = block mask).

* packed: the project's packer (packing/pack.py) fills 2048-token packs; one pack per step;
* padded: batches of B = round(mean samples per pack) samples in a seeded random order, each
  batch padded to its longest sample (padding is its own segment, carries no loss).

Both process exactly the same samples and loss tokens; the headline is packed / padded effective
tokens/s (target >= 1.5 on the log-normal mix). Timings alternate packed and padded rounds and
keep the best round of each, as the machine is shared. Last line: one JSON object; also writes
benchmarks/results/train.json and train.png.

    .venv/bin/python benchmarks/train.py [--samples 240] [--rounds 2] [--attention auto|per_sample|sdpa]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packing.pack import pack_lengths  # noqa: E402
from trainer.model import build_model, tiny_llm_config, tiny_vision_config  # noqa: E402
from trainer.step import make_optimizer  # noqa: E402
from trainer.train import clip_and_step, forward_backward  # noqa: E402

VOCAB = 4096  # small vocabulary: the lm_head (same work both ways) must not hide the comparison
HIDDEN = 256


def lognormal_lengths(n: int, max_len: int, seed: int) -> np.ndarray:
    """Median ~400 tokens, long right tail (caption + image tokens of mixed-resolution images)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(400), 0.8, n).astype(np.int64), 16, max_len)


def row_batch(samples: list[np.ndarray], length: int | None = None) -> dict:
    """Samples concatenated into one row (packed) and padded to ``length``."""
    L = length or sum(len(s) for s in samples)
    ids = torch.zeros(1, L, dtype=torch.long)
    targets = torch.full((1, L), -100, dtype=torch.long)
    pos = torch.zeros(1, L, dtype=torch.long)
    seg = torch.full((1, L), len(samples), dtype=torch.long)
    t = 0
    for j, s in enumerate(samples):
        n = len(s)
        ids[0, t:t + n] = torch.from_numpy(s)
        targets[0, t:t + n - 1] = torch.from_numpy(s[1:])
        pos[0, t:t + n] = torch.arange(n)
        seg[0, t:t + n] = j
        t += n
    pos[0, t:] = torch.arange(L - t)
    return {"input_ids": ids, "targets": targets, "position_ids": pos, "segment_ids": seg,
            "num_loss_tokens": int((targets != -100).sum())}


def stack(rows: list[dict]) -> dict:
    out = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "targets", "position_ids", "segment_ids")}
    out["num_loss_tokens"] = sum(r["num_loss_tokens"] for r in rows)
    return out


def run(batches: list[dict], seed: int, attention: str = "auto") -> tuple[float, float]:
    """Seconds for one optimizer step per batch over all batches; and the mean loss."""
    model = build_model(tiny_vision_config(), tiny_llm_config(vocab_size=VOCAB, seed_hidden=HIDDEN), seed=seed,
                        attn_implementation=attention)
    model.train()
    opt = make_optimizer(model, "1.5", {"vision": 1e-4, "projector": 1e-4, "llm": 1e-4})
    forward_backward(model, [batches[0]], batches[0]["num_loss_tokens"], sharded=False)  # warm-up
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    losses = []
    for b in batches:
        losses.append(forward_backward(model, [b], b["num_loss_tokens"], sharded=False) / b["num_loss_tokens"])
        clip_and_step(opt, 1.0)
    return time.perf_counter() - t0, float(np.mean(losses))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=240)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", default="auto", help="LLM isolation path (build_model attn_implementation)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    lengths = lognormal_lengths(a.samples, a.max_len, a.seed)
    rng = np.random.default_rng(a.seed + 1)
    samples = [rng.integers(0, VOCAB, n) for n in lengths]
    packed = pack_lengths(lengths, a.max_len, seed=a.seed)
    packs = [packed.order[packed.offsets[p]:packed.offsets[p + 1]] for p in range(len(packed.offsets) - 1)]
    packed_batches = [row_batch([samples[i] for i in p]) for p in packs]
    B = max(1, round(a.samples / len(packs)))
    perm = rng.permutation(a.samples)
    padded_batches = []
    for k in range(0, a.samples, B):
        idx = perm[k:k + B]
        longest = int(lengths[idx].max())
        padded_batches.append(stack([row_batch([samples[i]], longest) for i in idx]))
    effective = int(lengths.sum())
    assert sum(b["num_loss_tokens"] for b in packed_batches) == sum(b["num_loss_tokens"] for b in padded_batches)
    padded_tokens = sum(b["input_ids"].numel() for b in padded_batches)
    packed_tokens = sum(b["input_ids"].numel() for b in packed_batches)
    print(f"{a.samples} samples, {effective} tokens: {len(packs)} packs (fill {effective / (len(packs) * a.max_len):.1%}) "
          f"vs {len(padded_batches)} padded batches of {B} ({effective / padded_tokens:.1%} real tokens)",
          file=sys.stderr)

    best = {"packed": float("inf"), "padded": float("inf")}
    loss = {}
    for r in range(a.rounds):
        for name, batches in (("packed", packed_batches), ("padded", padded_batches)):
            sec, loss[name] = run(batches, a.seed, a.attention)
            best[name] = min(best[name], sec)
            print(f"round {r + 1}/{a.rounds} {name}: {sec:.1f}s, {effective / sec:,.0f} effective tok/s",
                  file=sys.stderr)
    result = {
        "benchmark": "train_packed_vs_padded", "device": "cpu", "max_len": a.max_len, "samples": a.samples,
        "attention": build_model(tiny_vision_config(), tiny_llm_config(vocab_size=VOCAB, seed_hidden=16),
                                 attn_implementation=a.attention).llm_attention,
        "length_mix": "lognormal(median 400, sigma 0.8), clipped to [16, max_len]",
        "mean_sample_len": round(float(lengths.mean()), 1), "effective_tokens": effective,
        "packs": len(packs), "mean_samples_per_pack": round(a.samples / len(packs), 2), "padded_batch_size": B,
        "padded_batches": len(padded_batches), "packed_fill": round(effective / packed_tokens, 4),
        "padded_real_token_share": round(effective / padded_tokens, 4),
        "packed_seconds": round(best["packed"], 2), "padded_seconds": round(best["padded"], 2),
        "packed_effective_tokens_per_s": round(effective / best["packed"], 1),
        "padded_effective_tokens_per_s": round(effective / best["padded"], 1),
        "packed_mean_loss": round(loss["packed"], 4), "padded_mean_loss": round(loss["padded"], 4),
        "rounds": a.rounds, "load_avg_1m": round(__import__("os").getloadavg()[0], 2),
        "headline_ratio": round(best["padded"] / best["packed"], 3),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "train.png")
    print(json.dumps(result))
    return result


def _plot(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["packed", "padded"]
    vals = [r["packed_effective_tokens_per_s"], r["padded_effective_tokens_per_s"]]
    ax.bar(names, vals, color=["tab:green", "tab:gray"])
    ax.set_ylabel("effective tokens/s (CPU, tiny model)")
    ax.set_title(f"packed vs padded, max_len {r['max_len']}: ratio {r['headline_ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
