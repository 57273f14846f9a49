"""Export a trained model for inference, and load it back.

Writes, under ``RUN_DIR/export/``::

    llm/                                      the LLM as a complete Hugging Face folder, which
                                              AutoModelForCausalLM / AutoTokenizer / pipeline()
                                              and vLLM load as they are:
        config.json                           written by save_pretrained ("architectures":
                                              ["Qwen3ForCausalLM"], float32, use_cache on)
        model.safetensors                     the weights (a tied lm_head stored once)
        generation_config.json                eos = <|im_end|> and <|endoftext|>, pad = <|endoftext|>
        tokenizer.json, tokenizer_config.json the training tokenizer (pack.tokenizer: Qwen's BPE
        (+ chat_template.jinja)               converted from tiktoken, or the HF folder's own) with
                                              the ChatML chat template the packs were rendered with
    vision_projector.safetensors               vision tower (``vision.*``) and projector (``projector.*``)
    ovpipe_model.json                          vision config, image-pad id, phase, the run it came from

``load_exported(folder)`` rebuilds the whole ``VisionLanguageModel``; the next training phase's
``train.init_from`` points at the run folder and loads its export this way. Under FSDP2 the full
weights are gathered (a collective: every rank calls ``export_model``) and written by rank 0 only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

from packing.tokenizer import DEFAULT_SYSTEM_PROMPT
from trainer.model import VisionConfig, VisionLanguageModel, build_model

MODEL_FILE = "ovpipe_model.json"
VISION_FILE = "vision_projector.safetensors"
LLM_DIR = "llm"
ARCHITECTURE = "Qwen3ForCausalLM"  # build_model's LLM class (an FSDP wrapper renames the Python class)
# ChatML as packing.tokenizer.render_sample writes it (a system turn first, with the pack stage's
# default system prompt when the conversation has none); an image is <|vision_start|><|image_pad|>
# <|vision_end|>, which a Qwen-VL processor expands to the image's tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights (on rank 0; other ranks get an empty dict under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized() and any(hasattr(m, "unshard") for m in model.modules()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_model(model: VisionLanguageModel, folder: str | Path, extra: dict | None = None, *,
                 tokenizer: str = "qwen", system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Path | None:
    """Collective under FSDP. Returns the folder on rank 0, None elsewhere. ``tokenizer`` and
    ``system_prompt``: the pack stage's (``pack.tokenizer``, ``pack.system_prompt``), so the exported
    tokenizer and chat template render conversations as the model was trained on them."""
    from safetensors.torch import save_file

    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    folder = Path(folder)
    (folder / LLM_DIR).mkdir(parents=True, exist_ok=True)
    llm_cfg = model.llm.config
    llm = {k[len("llm."):]: v.float().contiguous().clone() for k, v in state.items() if k.startswith("llm.")}
    if llm_cfg.tie_word_embeddings:
        llm.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; safetensors stores it once
    save_file(llm, str(folder / LLM_DIR / "model.safetensors"), metadata={"format": "pt"})
    write_hf_files(llm_cfg, folder / LLM_DIR, tokenizer, system_prompt)
    rest = {k: v.float().contiguous().clone() for k, v in state.items() if k.split(".")[0] in ("vision", "projector")}
    save_file(rest, str(folder / VISION_FILE), metadata={"format": "pt"})
    (folder / MODEL_FILE).write_text(json.dumps({
        "vision_config": asdict(model.vision.cfg), "image_pad_id": model.image_pad_id,
        "llm": LLM_DIR, "vision_projector": VISION_FILE, **(extra or {})}, indent=2))
    return folder


def write_hf_files(llm_cfg, folder: Path, tokenizer: str = "qwen", system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
    """config.json (save_pretrained: architectures, model_type, dtype), generation_config.json and
    the tokenizer with its chat template, beside the weights."""
    import copy

    from transformers import GenerationConfig

    cfg = copy.deepcopy(llm_cfg)
    cfg.architectures = [ARCHITECTURE]
    cfg.dtype = torch.float32  # the weights are written in float32
    cfg.use_cache = True  # inference default; training always passes use_cache=False
    cfg._attn_implementation = "sdpa"  # not ovpipe's per-sample kernel, which only ovpipe registers
    cfg.save_pretrained(str(folder))
    tok = hf_tokenizer(tokenizer, system_prompt)
    tok.save_pretrained(str(folder))
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], bos_token_id=eos[1],
                     do_sample=False).save_pretrained(str(folder))


def hf_tokenizer(spec: str = "qwen", system_prompt: str = DEFAULT_SYSTEM_PROMPT):
    """The training tokenizer (packing.tokenizer.load_tokenizer's spec) as a transformers fast
    tokenizer with the ChatML template: a local Hugging Face folder as it is (its own template
    kept when it has one); "qwen" converted from the tiktoken BPE with the same ids."""
    import json as _json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from packing.tokenizer import load_tokenizer

    if spec != "qwen":
        tok = AutoTokenizer.from_pretrained(spec)
    else:
        ours = load_tokenizer("qwen")
        tok = PreTrainedTokenizerFast(tokenizer_object=_qwen_fast_tokenizer(), eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", unk_token=None, bos_token=None,
                                      model_max_length=131072, clean_up_tokenization_spaces=False)
        wrong = {t: i for t, i in ours.special.items() if tok.convert_tokens_to_ids(t) != i}
        if wrong:
            raise AssertionError(f"converted Qwen tokenizer gives other ids to {sorted(wrong)[:5]}")
    if not tok.chat_template:
        prompt = _json.dumps(system_prompt, ensure_ascii=False)
        tok.chat_template = "{%- set default_system = " + prompt + " %}" + CHAT_TEMPLATE
    return tok


@lru_cache(maxsize=1)
def _qwen_fast_tokenizer_json() -> str:
    """Qwen's tiktoken BPE as a `tokenizers` JSON (converting takes seconds: once per process)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from packing.tokenizer import QWEN_PAT_STR, QWEN_SPECIAL_TOKENS, qwen_vocab_file

    tk = TikTokenConverter(vocab_file=str(qwen_vocab_file()), pattern=QWEN_PAT_STR).converted()
    tk.normalizer = normalizers.NFC()  # packing's encode_text normalises to NFC first
    # in id order: they follow the BPE ranks (151643 onwards), as in Qwen's tokenizer.json
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, _ in sorted(QWEN_SPECIAL_TOKENS.items(), key=lambda kv: kv[1])])
    return tk.to_str()


def _qwen_fast_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_qwen_fast_tokenizer_json())


def load_exported(folder: str | Path, attn_implementation: str = "sdpa") -> VisionLanguageModel:
    """Rebuild the model from an export folder (strict: every tensor must match by name and shape)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / MODEL_FILE).exists():
        raise FileNotFoundError(f"{folder} is not an ovpipe export (no {MODEL_FILE}); point at RUN_DIR/export "
                                "of a finished training run")
    meta = json.loads((folder / MODEL_FILE).read_text())
    model = build_model(VisionConfig(**meta["vision_config"]), llm_path=folder / meta["llm"],
                        attn_implementation=attn_implementation)
    model.image_pad_id = meta["image_pad_id"]
    tensors = load_file(str(folder / meta["vision_projector"]))
    own = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("vision", "projector")}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{folder / meta['vision_projector']}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {bad[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model
