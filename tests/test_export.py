"""Export: the reloaded model gives the same logits as the trained one, and the LLM folder loads
with transformers' own Qwen3ForCausalLM."""

from __future__ import annotations

import json

import torch

from packing import tokenizer as ptok
from tests.helpers import write_test_packs
from trainer.collate import PackCollator
from trainer.data import PackStream
from trainer.export import export_model, load_exported
from trainer.model import build_model, tiny_llm_config, tiny_vision_config


def test_export_reloads_with_the_same_logits(tmp_path):
    tok = ptok.load_tokenizer("qwen")
    write_test_packs(tmp_path / "packs", tok, n_shards=1, packs_per_shard=2, loss_on="assistant")
    batch = PackCollator(tok, phase="2")(list(PackStream(str(tmp_path / "packs")).epoch(0)))
    assert "pixel_values" in batch
    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=3)
    with torch.no_grad():  # move away from the seeded init so a reload from scratch cannot pass
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    export_model(model, tmp_path / "export", {"phase": "2"})
    meta = json.loads((tmp_path / "export/ovpipe_model.json").read_text())
    assert meta["phase"] == "2" and meta["vision_config"]["hidden_size"] == 32

    loaded = load_exported(tmp_path / "export").eval()
    with torch.no_grad():
        a = model(batch, return_logits=True)
        b = loaded(batch, return_logits=True)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=0, atol=1e-5)
    assert float(a["loss_sum"]) == float(b["loss_sum"])
    fresh = build_model(tiny_vision_config(), tiny_llm_config(), seed=3).eval()
    with torch.no_grad():
        assert (fresh(batch, return_logits=True)["logits"] - a["logits"]).abs().max() > 1e-3

    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "export/llm")).eval()
    ids = batch["input_ids"][:1, :32]
    with torch.no_grad():
        ours = model.llm(input_ids=ids, use_cache=False).logits
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)  # tied, stored once


def test_export_is_a_complete_hugging_face_folder_that_auto_classes_and_pipeline_load(tmp_path):
    """config.json from save_pretrained (architectures set: vLLM dispatches on it), generation
    config, tokenizer + chat template beside the weights; AutoTokenizer renders a conversation to
    exactly the ids the packs hold, and AutoModelForCausalLM / pipeline() generate what the trained
    model predicts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    export_model(model, tmp_path / "export", {"phase": "1"}, system_prompt="You are a careful assistant.")
    llm = tmp_path / "export/llm"
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert AutoConfig.from_pretrained(str(llm)).architectures == ["Qwen3ForCausalLM"]
    tok_qwen = ptok.load_tokenizer("qwen")
    gen = GenerationConfig.from_pretrained(str(llm))
    assert tok_qwen.im_end in gen.eos_token_id

    tok = AutoTokenizer.from_pretrained(str(llm))
    conv = [{"role": "user", "content": "Describe this image in detail, please: café 123."},
            {"role": "assistant", "content": "A photo of a red circle on a white background."}]
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    rendered = ptok.render_sample(conv, [], tok_qwen, system_prompt="You are a careful assistant.")
    assert ids == rendered.input_ids  # the chat template is the one the packs were rendered with
    image_conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = tok.apply_chat_template(image_conv, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    hf = AutoModelForCausalLM.from_pretrained(str(llm)).eval()
    prompt = tok.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")["input_ids"]
    out = hf.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    expected = prompt
    with torch.no_grad():  # greedy continuation by the trained model itself
        for _ in range(4):
            nxt = model.llm(input_ids=expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(out, expected)

    gen_pipe = pipeline("text-generation", model=str(llm), tokenizer=str(llm))
    result = gen_pipe(conv[:1], max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"][-1]["role"] == "assistant"
    assert result[0]["generated_text"][-1]["content"] == tok.decode(expected[0, prompt.shape[1]:prompt.shape[1] + 3],
                                                                    skip_special_tokens=True)
