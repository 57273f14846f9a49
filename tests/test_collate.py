"""The collator: token counts equal the packer's stored lengths, ids equal an independent
rendering (transformers' apply_chat_template with a Hugging Face tokenizer built from the same
BPE ranks, plus image-pad expansion), loud failures on mismatches, and loss only where it belongs.

`write_test_packs` builds packed shards the way the packer does (PACK_SCHEMA rows: samples rendered
with packing/tokenizer.py, images resized by smart_resize, concatenated); other tests import it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from packing import tokenizer as ptok
from tests.helpers import demo_samples, pack_rows, png, write_test_packs
from trainer.collate import PackCollator, PackMismatchError, decode_image, patchify

# ---------------------------------------------------------------- an independent HF tokenizer

QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="session")
def hf_tokenizer():
    """A Hugging Face fast tokenizer from the same tiktoken ranks (tokenizers' BPE, built by
    transformers' TikTokenConverter), with Qwen2-VL's special tokens and chat template."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(vocab_file=str(ptok.qwen_vocab_file()), pattern=QWEN2_PATTERN,
                             extra_special_tokens=SPECIALS)
    backend = conv.converted()
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalises to NFC
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = QWEN2VL_CHAT_TEMPLATE
    assert hf.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert hf.convert_tokens_to_ids("<|im_start|>") == 151644
    assert hf("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    return hf


def hf_render(hf, conv: list[dict], image_hw: list[list[int]]) -> list[int]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in conv:
        parts = turn["value"].split("<image>")
        if len(parts) == 1:
            content = turn["value"]
        else:
            content = []
            for j, p in enumerate(parts):
                if j:
                    content.append({"type": "image"})
                if p:
                    content.append({"type": "text", "text": p})
        messages.append({"role": roles[turn["from"]], "content": content})
    text = hf.apply_chat_template(messages, tokenize=False)
    # (Samples whose text contains special-token text are left out of this comparison: a HF
    # tokenizer turns "<|im_end|>" inside content into the control token; ovpipe deliberately
    # keeps it plain text, see test_caption_with_special_token_text_stays_plain_text.)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for t in ids:  # expand each image pad to (h/28)(w/28) copies
        if t == 151655:
            h, w = image_hw[k]
            out += [t] * ((h // 28) * (w // 28))
            k += 1
        else:
            out.append(t)
    return out


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="session")
def tok():
    return ptok.load_tokenizer("qwen")


def test_token_counts_equal_stored_lengths(tok, tmp_path):
    from trainer.data import PackStream

    write_test_packs(tmp_path, tok)
    stream = PackStream(str(tmp_path), seed=0)
    collate = PackCollator(tok, phase="2")
    n = 0
    for pack in stream.epoch(0):
        batch = collate([pack])
        seg = batch["segment_ids"][0]
        lens = [int((seg == j).sum()) for j in range(len(pack["sample_lens"]))]
        assert lens == pack["sample_lens"]
        assert batch["input_ids"][0].tolist() == pack["input_ids"]
        assert batch["grid_hw"].prod(1).sum() == batch["pixel_values"].shape[0]
        assert (batch["input_ids"] == 151655).sum() * 4 == batch["pixel_values"].shape[0]
        n += 1
    assert n == 6


def test_ids_equal_hf_apply_chat_template(tok, hf_tokenizer):
    samples = [s for s in demo_samples() if "<|im_end|>" not in json.dumps(s["conv"])]
    rows = pack_rows([samples], tok)
    batch = PackCollator(tok, phase="2")(rows)
    ids, seg = batch["input_ids"][0], batch["segment_ids"][0]
    hws = rows[0]["image_hw"]
    k = 0
    for j, s in enumerate(samples):
        mine = ids[seg == j].tolist()
        expect = hf_render(hf_tokenizer, s["conv"], hws[k:k + len(s["images"])])
        k += len(s["images"])
        assert mine == expect, (s["id"], mine[:40], expect[:40])


def test_caption_with_special_token_text_stays_plain_text(tok):
    s = [x for x in demo_samples() if x["id"] == "s-tricky"]
    batch = PackCollator(tok, phase="2")(pack_rows([s], tok))
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tok.im_end) == 3  # system, user, assistant turns; the caption's text is not one
    assert "<|im_end|>" in tok.decode(ids)


@pytest.mark.parametrize("damage", ["shift_length", "wrong_id", "wrong_image_hw", "count_mismatch"])
def test_mismatch_fails_loudly(tok, damage):
    rows = pack_rows([demo_samples()[:3]], tok)
    row = rows[0]
    if damage == "shift_length":  # same total, one token moved between samples
        row["sample_lens"][0] += 1
        row["sample_lens"][1] -= 1
    elif damage == "wrong_id":
        row["input_ids"][row["sample_lens"][0] + 5] += 1
    elif damage == "wrong_image_hw":
        row["image_hw"][0] = [row["image_hw"][0][0] + 28, row["image_hw"][0][1]]
    else:
        row["num_tokens"] += 1
    with pytest.raises(PackMismatchError, match="pack pack-0"):
        PackCollator(tok, phase="2")(rows)


def _assistant_token_positions(ids: list[int], tok, last_only: bool) -> set[int]:
    """Independent of render_sample: scan ChatML, return positions of assistant content tokens and
    their closing <|im_end|>."""
    turns, i = [], 0
    while i < len(ids):
        if ids[i] == tok.im_start:
            j = i + 1
            header = ""
            while not header.endswith("\n"):
                header += tok.decode([ids[j]])
                j += 1
            end = ids.index(tok.im_end, j)
            turns.append((header.strip(), j, end))
            i = end + 1
        else:
            i += 1
    assistant = [(j, end) for role, j, end in turns if role == "assistant"]
    if last_only:
        assistant = assistant[-1:]
    return {p for j, end in assistant for p in range(j, end + 1)}


@pytest.mark.parametrize("phase", ["1", "2"])
def test_loss_only_on_assistant_tokens_never_across_samples(tok, phase):
    loss_on = "last" if phase == "1" else "assistant"
    samples = demo_samples()
    rows = pack_rows([samples], tok, loss_on=loss_on)
    batch = PackCollator(tok, phase=phase)(rows)
    ids, tgt, seg = batch["input_ids"][0].tolist(), batch["targets"][0], batch["segment_ids"][0]
    start = 0
    for j, s in enumerate(samples):
        n = int((seg == j).sum())
        sids, stgt = ids[start:start + n], tgt[start:start + n].tolist()
        expect = _assistant_token_positions(sids, tok, last_only=(phase == "1"))
        got = {t + 1 for t, v in enumerate(stgt) if v != -100}
        assert got == expect, s["id"]
        assert stgt[-1] == -100  # the last token of a sample predicts nothing in the next sample
        for t, v in enumerate(stgt):
            if v != -100:
                assert v == sids[t + 1]
                assert v not in (tok.image_pad, tok.vision_start, tok.vision_end)
        start += n
    # the system prompt and user text are never targets
    text = tok.decode([v for v in tgt.tolist() if v != -100])
    assert "helpful assistant" not in text and "Describe the image" not in text
    assert "A red bicycle" in text
    if phase == "1":
        assert "The first is square" not in text and "It has more pixels" in text
    else:
        assert "The first is square" in text


def test_patchify_merge_order():
    img = torch.arange(3 * 56 * 84, dtype=torch.float32).view(3, 56, 84)
    p = patchify(img)
    assert p.shape == (4 * 6, 3 * 14 * 14)
    # patches 0..3 are the 2x2 block at the top-left: (0,0), (0,1), (1,0), (1,1)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]):
        assert torch.equal(p[k], img[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1))


def test_decode_image_resizes_and_rejects_bad_sizes():
    x = decode_image(png(0, 90, 60), (56, 84))
    assert x.shape == (3, 56, 84)
    with pytest.raises(PackMismatchError):
        decode_image(png(0, 90, 60), (50, 84))


def test_decode_image_shows_images_as_displayed_and_names_broken_bytes():
    """image_hw was measured after EXIF orientation: a rotated phone photo must be rotated, not
    squashed; transparent pixels are white, as in every other stage."""
    raw = np.zeros((56, 112, 3), np.uint8)
    raw[:, 56:] = 255  # stored: left half black, right half white (112 wide, 56 high)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 56 wide, 112 high
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, "JPEG", quality=95, exif=exif)
    x = decode_image(buf.getvalue(), (112, 56))
    top, bottom = x[:, :56].mean().item(), x[:, 56:].mean().item()
    assert bottom - top > 3.0, (top, bottom)  # black on top, white below once rotated
    buf = io.BytesIO()
    Image.new("RGBA", (56, 56), (0, 0, 0, 0)).save(buf, "PNG")
    white = decode_image(buf.getvalue(), (56, 56))
    assert torch.allclose(white, decode_image(_png_white(), (56, 56)), atol=1e-5)
    with pytest.raises(PackMismatchError, match="do not decode"):
        decode_image(b"\x89PNG\r\n\x1a\n not really", (56, 56))


def _png_white() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (255, 255, 255)).save(buf, "PNG")
    return buf.getvalue()


def test_a_stream_never_read_before_its_checkpoint_resumes(tok, tmp_path):
    """A phase-2 mixture dataset not yet drawn saves the default position; resuming must work."""
    from trainer.data import PackStream

    write_test_packs(tmp_path / "p", tok, n_shards=3, packs_per_shard=2)
    fresh = PackStream(str(tmp_path / "p"), seed=0)
    resumed = PackStream(str(tmp_path / "p"), seed=0)
    resumed.load_state_dict(fresh.state_dict())
    assert [p["pack_id"] for p, _ in zip(resumed, range(4))] == \
        [p["pack_id"] for p, _ in zip(PackStream(str(tmp_path / "p"), seed=0), range(4))]


def test_truncated_sample_and_packs_without_stored_ids(tok):
    """The packer's 'truncate' policy keeps all images of a cut sample and stores the cut length;
    the collator renders the whole conversation, applies the same truncate() and feeds only the
    images that survived. With pack.store_token_ids=false (empty id lists) lengths are still checked."""
    samples = demo_samples()
    multi = samples[3]
    rows = pack_rows([[samples[0], multi]], tok)
    row = rows[0]
    n0 = row["sample_lens"][0]
    r = ptok.render_sample(multi["conv"], row["image_hw"][1:], tok)
    first_pad = r.input_ids.index(tok.image_pad)
    # cut inside the second image span: the whole span and everything after it go
    second_start = [i for i, t in enumerate(r.input_ids) if t == tok.vision_start][1]
    max_len = second_start + 3
    cut, kept = ptok.truncate(r, max_len, tok)
    assert kept == 1 and len(cut.input_ids) == second_start and first_pad < second_start
    row["sample_lens"][1] = len(cut.input_ids)
    row["input_ids"] = row["input_ids"][:n0] + cut.input_ids
    row["loss_mask"] = row["loss_mask"][:n0] + cut.loss_mask
    row["num_tokens"] = n0 + len(cut.input_ids)
    with pytest.raises(PackMismatchError, match="tokens > max_len"):  # the whole pack is too long
        PackCollator(tok, phase="2", max_len=max_len)(rows)
    rows = [{**row, **{k: row[k][1:] for k in ("sample_ids", "sample_lens", "sources", "conversations")},
             "images": row["images"][1:], "image_hw": row["image_hw"][1:], "image_sample": [0, 0],
             "input_ids": row["input_ids"][n0:], "loss_mask": row["loss_mask"][n0:],
             "num_tokens": len(cut.input_ids)}]
    row = rows[0]
    batch = PackCollator(tok, phase="2", max_len=max_len)(rows)
    assert batch["grid_hw"].shape[0] == 1  # only the image before the cut reaches the ViT
    assert (batch["input_ids"] == tok.image_pad).sum() * 4 == batch["pixel_values"].shape[0]
    row["input_ids"], row["loss_mask"] = [], []
    batch2 = PackCollator(tok, phase="2", max_len=max_len)(rows)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    row["sample_lens"][0] -= 1
    row["num_tokens"] -= 1
    with pytest.raises(PackMismatchError, match="sample_lens"):
        PackCollator(tok, phase="2", max_len=max_len)(rows)


def test_resuming_over_a_changed_shard_list_is_refused(tok, tmp_path):
    """A saved position means something only over the same packs: added or re-packed shards would
    silently repeat or skip packs."""
    from trainer.checkpoint import global_position, reposition
    from trainer.data import PackStream

    write_test_packs(tmp_path / "p", tok, n_shards=2, packs_per_shard=2)
    stream = PackStream(str(tmp_path / "p"), seed=0)
    next(iter(stream))
    saved = stream.state_dict()
    write_test_packs(tmp_path / "more", tok, n_shards=3, packs_per_shard=2)
    changed = PackStream(str(tmp_path / "more"), seed=0)
    with pytest.raises(ValueError, match="changed since this position was saved"):
        changed.load_state_dict(saved)
    with pytest.raises(ValueError, match="changed since this position was saved"):  # another world size
        reposition(changed, **global_position({**saved, "global_index": 1}))
    same = PackStream(str(tmp_path / "p"), seed=0)
    same.load_state_dict(saved)  # the same packs resume
