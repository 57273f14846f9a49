"""The packed-shard collator: pack rows (packing/schema.py PACK_SCHEMA) -> a model micro-batch.

Reads, per pack: ``sample_lens``, ``input_ids``, ``loss_mask``, ``conversations``, ``images``,
``image_hw``, ``image_sample`` (see docs/data-contracts.md). Writes one batch dict
(trainer/model.py documents the tensors):

* ``input_ids``, ``position_ids`` (restarting per sample), ``segment_ids`` (sample index in the
  row; padding gets its own id), ``targets`` (next token where it carries loss, else -100):
  (B, L), rows right-padded to the longest pack of the micro-batch;
* ``cu_seqlens`` int32: sequence starts of the batch flattened row by row (padding included as
  its own sequence), for varlen kernels;
* ``pixel_values`` (N, 3*14*14) and ``grid_hw`` (n_images, 2) in patches, images in order of
  appearance (row, sample, image);
* ``num_loss_tokens``, ``pack_ids``, ``sample_ids``.

Every sample is re-rendered with packing.tokenizer.render_sample (the same module the packer's
length rule comes from) and checked against the pack: its token count against ``sample_lens``,
its ids against the pack's ``input_ids`` and its loss mask against ``loss_mask``. Any mismatch
raises PackMismatchError naming the pack, the sample and the first differing position: a wrong
tokenizer, template or image size would otherwise train silently on misaligned data.

Targets: position t predicts token t+1 of the SAME sample, and only where the rendering's loss
mask is 1 (assistant / caption tokens and their closing ``<|im_end|>``); never on the system
prompt, user turns, vision tokens, or across a sample boundary (the last token of a sample has no
target).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ovpipe.core.images import MAX_SOURCE_PIXELS, open_image, to_rgb

from packing import tokenizer as ptok
from trainer.attention import cu_seqlens_from_segments
from trainer.model import CLIP_MEAN, CLIP_STD
from trainer.params import Phase, get_phase

PATCH = 14
MERGE = 2
MAX_IMAGE_PIXELS = 4 * ptok.DEFAULT_MAX_PIXELS  # bound on untrusted image_hw (after resize)


class PackMismatchError(ValueError):
    """A pack disagrees with what the trainer's rendering makes of its samples."""


def decode_image(data: bytes, hw: Sequence[int]) -> torch.Tensor:
    """Encoded bytes -> (3, h, w) float tensor, resized to the pack's (h, w) if needed, CLIP-normalised."""
    h, w = int(hw[0]), int(hw[1])
    if h <= 0 or w <= 0 or h % (PATCH * MERGE) or w % (PATCH * MERGE) or h * w > MAX_IMAGE_PIXELS:
        raise PackMismatchError(f"image_hw {h}x{w}: sides must be positive multiples of "
                                f"{PATCH * MERGE} with at most {MAX_IMAGE_PIXELS} pixels")
    try:
        im = open_image(data)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PackMismatchError(f"image bytes do not decode: {type(e).__name__}: {e}"[:300]) from None
    with im:
        if im.size[0] * im.size[1] > MAX_SOURCE_PIXELS:  # packs come from ovpipe, but files can be swapped
            raise PackMismatchError(f"source image {im.size[0]}x{im.size[1]} is over {MAX_SOURCE_PIXELS:,} pixels")
        # as displayed (EXIF orientation: image_hw was measured after it), alpha on white, 16-bit scaled:
        # the same conversion as every other stage
        im = to_rgb(im)
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def patchify(img: torch.Tensor) -> torch.Tensor:
    """(3, h, w) -> (h/14 * w/14, 3*14*14), patches in 2x2-merge order: the four patches of each
    28x28 block are consecutive, blocks in raster order (what the projector's merge expects)."""
    c, h, w = img.shape
    gh, gw = h // PATCH, w // PATCH
    x = img.view(c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/2, gw/2, 2, 2, c, 14, 14)
    return x.reshape(gh * gw, c * PATCH * PATCH)


def targets_for(ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """Shifted targets of ONE sample: target[t] = ids[t+1] where loss_mask[t+1], else -100."""
    out = [-100] * len(ids)
    for t in range(len(ids) - 1):
        if loss_mask[t + 1]:
            out[t] = int(ids[t + 1])
    return out


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


class PackCollator:
    """Callable on a list of pack rows (dicts with PACK_SCHEMA fields)."""

    def __init__(self, tok: ptok.Tokenizer | None = None, phase: Phase | str = "1.5",
                 check_loss_mask: bool = True, system_prompt: str = ptok.DEFAULT_SYSTEM_PROMPT,
                 max_len: int = 8192):
        self.max_len = max_len  # the pack stage's pack.max_len (its truncate policy cuts there)
        self.tok = tok or ptok.load_tokenizer("qwen")
        self.system_prompt = system_prompt  # must be the pack stage's pack.system_prompt
        self.phase = phase if isinstance(phase, Phase) else get_phase(phase)  # training phase
        self.check_loss_mask = check_loss_mask
        self.pad_id = self.tok.special.get("<|endoftext|>", 0)
        self.vision_ids = {self.tok.vision_start, self.tok.vision_end, self.tok.image_pad}

    def render_pack(self, pack: dict[str, Any]) -> list[dict[str, Any]]:
        """Re-render and check every sample of one pack; returns per-sample ids/targets/images."""
        pid = pack.get("pack_id", "?")
        lens = [int(n) for n in pack["sample_lens"]]
        ids_all, mask_all = pack["input_ids"], pack["loss_mask"]
        n = len(lens)
        # pack.store_token_ids=false writes empty id / mask lists: then only lengths are checked
        stored_ids = len(ids_all) > 0 or len(mask_all) > 0
        if not stored_ids:
            ids_all = mask_all = [0] * sum(lens)
        if int(pack["num_tokens"]) > self.max_len:
            raise PackMismatchError(f"pack {pid}: {pack['num_tokens']} tokens > max_len {self.max_len}")
        if not (sum(lens) == int(pack["num_tokens"]) == len(ids_all) == len(mask_all)):
            raise PackMismatchError(f"pack {pid}: sum(sample_lens)={sum(lens)}, num_tokens={pack['num_tokens']}, "
                                    f"len(input_ids)={len(ids_all)}, len(loss_mask)={len(mask_all)} differ")
        for col in ("sample_ids", "conversations"):
            if len(pack[col]) != n:
                raise PackMismatchError(f"pack {pid}: {col} has {len(pack[col])} entries for {n} samples")
        if not (len(pack["images"]) == len(pack["image_hw"]) == len(pack["image_sample"])):
            raise PackMismatchError(f"pack {pid}: images / image_hw / image_sample lengths differ")
        if list(pack["image_sample"]) != sorted(pack["image_sample"]) or any(
                not 0 <= s < n for s in pack["image_sample"]):
            raise PackMismatchError(f"pack {pid}: image_sample must be non-decreasing indices < {n}")
        out, start = [], 0
        for i in range(n):
            sid = pack["sample_ids"][i]
            where = f"pack {pid} sample {i} ({sid})"
            img_idx = [k for k, s in enumerate(pack["image_sample"]) if s == i]
            hws = [pack["image_hw"][k] for k in img_idx]
            try:
                conv = json.loads(pack["conversations"][i])
                r = ptok.render_sample(conv, hws, self.tok, loss_on=self.phase.loss_on,
                                       system_prompt=self.system_prompt)
            except ValueError as e:
                raise PackMismatchError(f"{where}: cannot render its conversation: {e}") from None
            kept = len(img_idx)
            if len(r.input_ids) > self.max_len:  # the packer's 'truncate' policy cut it at max_len
                r, kept = ptok.truncate(r, self.max_len, self.tok)
            if len(r.input_ids) != lens[i]:
                raise PackMismatchError(
                    f"{where}: the collator renders {len(r.input_ids)} tokens but the pack stores "
                    f"sample_lens={lens[i]}; the pack was made with another tokenizer, chat template "
                    f"or image size rule. Re-pack with the trainer's tokenizer.")
            stored = list(ids_all[start:start + lens[i]])
            if stored_ids and r.input_ids != stored:
                j = _first_diff(r.input_ids, stored)
                raise PackMismatchError(
                    f"{where}: token {j} differs (rendered {r.input_ids[j:j + 5]}..., pack has "
                    f"{stored[j:j + 5]}...); same length, different ids: another tokenizer or template.")
            if stored_ids and self.check_loss_mask and r.loss_mask != list(mask_all[start:start + lens[i]]):
                j = _first_diff(r.loss_mask, list(mask_all[start:start + lens[i]]))
                raise PackMismatchError(
                    f"{where}: loss mask differs from the pack's at token {j}: the pack was made with "
                    f"another loss rule than training phase {self.phase.name}'s loss_on={self.phase.loss_on!r}")
            mask = [m if t not in self.vision_ids else 0 for t, m in zip(r.input_ids, r.loss_mask)]
            out.append({"sample_id": sid, "ids": r.input_ids, "targets": targets_for(r.input_ids, mask),
                        "images": img_idx[:kept]})
            start += lens[i]
        return out

    def __call__(self, packs: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self.render_pack(p) for p in packs]
        B, L = len(packs), max(sum(len(s["ids"]) for s in row) for row in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        targets = torch.full((B, L), -100, dtype=torch.long)
        position_ids = torch.zeros((B, L), dtype=torch.long)
        segment_ids = torch.zeros((B, L), dtype=torch.long)
        pixels, grids, sample_ids = [], [], []
        for b, (pack, row) in enumerate(zip(packs, rows)):
            t = 0
            for j, s in enumerate(row):
                n = len(s["ids"])
                input_ids[b, t:t + n] = torch.tensor(s["ids"])
                targets[b, t:t + n] = torch.tensor(s["targets"])
                position_ids[b, t:t + n] = torch.arange(n)
                segment_ids[b, t:t + n] = j
                sample_ids.append(s["sample_id"])
                for k in s["images"]:
                    hw = pack["image_hw"][k]
                    pixels.append(patchify(decode_image(pack["images"][k], hw)))
                    grids.append((int(hw[0]) // PATCH, int(hw[1]) // PATCH))
                t += n
            segment_ids[b, t:] = len(row)  # padding attends only to padding
            position_ids[b, t:] = torch.arange(L - t)
        batch = {
            "input_ids": input_ids, "targets": targets, "position_ids": position_ids,
            "segment_ids": segment_ids, "cu_seqlens": cu_seqlens_from_segments(segment_ids),
            "num_loss_tokens": int((targets != -100).sum()),
            "pack_ids": [p.get("pack_id") for p in packs], "sample_ids": sample_ids,
        }
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["grid_hw"] = torch.tensor(grids, dtype=torch.long)
        return batch


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
