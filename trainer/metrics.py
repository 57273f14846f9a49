"""Training metrics: one JSON line per step, progress with ETA, a PNG loss curve at the end.

Writes (rank 0 only), under RUN_DIR::

    metrics.jsonl   one object per step: step, loss, lr, grad_norm, tokens (incl. padding),
                    effective_tokens (non-padding), loss_tokens, tokens_per_s,
                    effective_tokens_per_s, mfu (null when the peak is unknown), seconds, eta_s;
                    validation lines carry val_loss instead
    loss.png        training (and validation) loss against the step

MFU is an estimate: model FLOPs of the effective tokens over the step's wall time and the peak of
all devices. Per token 6 x the matmul parameters it passes through (LLM blocks for text tokens;
ViT blocks + projector for image patches; lm_head only at loss positions), plus causal attention
6 x layers x width x len per token within its own sample (block-diagonal, so only same-sample
context counts). Embedding lookups and norms are not counted; frozen parts are counted as if they
trained (the usual convention), so phase 1's MFU reads high.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.nn as nn

# dense bf16 peak per device (no sparsity), FLOP/s
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(configured_tflops: float = 0.0) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def _matmul_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and getattr(m, "weight", None) is not None)


class FlopCounter:
    """Model FLOPs of one step from its token counts (see module docstring)."""

    def __init__(self, model):
        llm_cfg = model.llm.config
        self.llm_block = sum(_matmul_params(layer) for layer in model.llm.model.layers)
        self.vision = _matmul_params(model.vision)
        self.projector = _matmul_params(model.projector)
        self.lm_head = llm_cfg.vocab_size * llm_cfg.hidden_size
        self.llm_attn = llm_cfg.num_hidden_layers * llm_cfg.num_attention_heads * llm_cfg.head_dim
        vc = model.vision.cfg if hasattr(model.vision, "cfg") else None
        self.vision_attn = (vc.depth * vc.hidden_size) if vc is not None else 0

    def step_flops(self, sample_lens: list[int], loss_tokens: int, patches_per_image: list[int]) -> float:
        tokens = sum(sample_lens)
        patches = sum(patches_per_image)
        f = 6 * self.llm_block * tokens + 6 * self.lm_head * loss_tokens
        f += 6 * self.llm_attn * sum(n * n for n in sample_lens)  # causal: 12·d·n²/2 per sample
        f += 6 * self.vision * patches + 6 * self.projector * patches / 4
        f += 12 * self.vision_attn * sum(p * p for p in patches_per_image)  # bidirectional per image
        return float(f)


class Metrics:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_interval_s: float = 5.0, log=None, phase: str = ""):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.phase = phase  # the training phase ("1", "1.5", "2"): labels progress lines and the plot
        self.prefix = f"[train phase {phase}] " if phase else ""
        self.total, self.start = total_steps, start_step
        self.enabled = enabled
        self.interval = progress_interval_s
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.t0 = time.monotonic()
        self.last_print = 0.0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_after(start_step)

    def _drop_after(self, step: int) -> None:
        """On resume, lines of steps the killed run did after its last checkpoint are redone: drop them."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        done = record["step"] + 1 - self.start
        elapsed = time.monotonic() - self.t0
        if "loss" in record:
            record["eta_s"] = round(elapsed / max(done, 1) * (self.total - record["step"] - 1), 1)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        now = time.monotonic()
        last = record["step"] + 1 == self.total
        if "loss" in record and (now - self.last_print >= self.interval or last or done == 1):
            self.last_print = now
            mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
            self.log(f"{self.prefix}step {record['step'] + 1}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                     f"{record['effective_tokens_per_s']:,.0f} eff tok/s{mfu} eta {record['eta_s']:.0f}s")
        if "val_loss" in record:
            self.log(f"{self.prefix}step {record['step'] + 1}/{self.total} val_loss {record['val_loss']:.4f}")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def plot(self, png: str | Path | None = None) -> Path | None:
        if not self.enabled:
            return None
        import matplotlib.pyplot as plt

        png = Path(png or self.path.with_name("loss.png"))
        fig = self.figure()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png

    def figure(self):
        """The loss curve: per optimizer step (integer ticks), titled with the training phase."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        recs = self.records()
        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"] + 1, r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"] + 1, r["val_loss"]) for r in recs if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel("loss (mean token cross-entropy)")
        ax.ticklabel_format(axis="y", useOffset=False)  # 11.879 reads better than +1.1878e1 and 0.001
        run = self.path.parent.name
        title = f"training phase {self.phase}" if self.phase else run
        ax.set_title(title + (f" ({run})" if self.phase and run != self.phase else ""))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig


def summary_text(summary: dict, run_dir: str | Path) -> str:
    """A finished phase in a few readable lines (the end of `ovpipe train` and of the torchrun
    entry point), from its summary.json and metrics.jsonl."""
    run_dir = Path(run_dir)
    recs = Metrics(run_dir, 0, enabled=False).records()
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    rate = sum(r["effective_tokens_per_s"] for r in train) / len(train) if train else None
    first = f"{train[0]['loss']:.4f} -> " if len(train) > 1 else ""
    final = summary.get("final_loss")
    lines = [f"training phase {summary.get('phase')}: {summary.get('steps')} steps"
             + (f" (resumed at step {summary['resumed_from_step']})" if summary.get("resumed_from_step") else "")
             + f" on {summary.get('world_size', 1)} process(es) in {summary.get('seconds', 0):.1f}s",
             f"  loss {first}{final:.4f}" if isinstance(final, (int, float)) else "  loss: no steps recorded"]
    if val:
        lines[-1] += f", validation loss {val[-1]['val_loss']:.4f}"
    if rate:
        lines[-1] += f"; {rate:,.0f} effective tokens/s"
    if (run_dir / "loss.png").exists():
        lines.append(f"  loss plot: {run_dir / 'loss.png'}")
    if summary.get("export"):
        lines.append(f"  model: {summary['export']} (Hugging Face folder: {summary['export']}/llm)")
    return "\n".join(lines)
