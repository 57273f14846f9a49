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
