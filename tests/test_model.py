"""The model: loading the LLM from a local HF Qwen3 folder, the vision tower from RICE-ViT
checkpoints in both naming schemes (numerically checked against transformers' MLCD = RICE-ViT
implementation), image features replacing the <|image_pad|> embeddings, addressable blocks."""

from __future__ import annotations

import torch

from trainer.checkpoint_convert import load_rice_vit
from trainer.collate import patchify
from trainer.model import (IMAGE_PAD_ID, VisionConfig, build_model, patch_positions, tiny_llm_config,
                           tiny_vision_config)


def test_llm_loads_from_local_hf_folder(tmp_path):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(3)
    cfg = tiny_llm_config(vocab_size=1000)
    ref = Qwen3ForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "qwen3")
    model = build_model(tiny_vision_config(), llm_path=tmp_path / "qwen3").eval()
    ids = torch.randint(0, 1000, (1, 17))
    with torch.no_grad():
        expect = ref(input_ids=ids, use_cache=False).logits
        batch = {"input_ids": ids, "position_ids": torch.arange(17)[None],
                 "segment_ids": torch.zeros(1, 17, dtype=torch.long),
                 "targets": torch.full((1, 17), -100)}
        got = model(batch, return_logits=True)["logits"]
    assert torch.allclose(got, expect, atol=1e-5)


def test_rice_vit_from_hf_mlcd_checkpoint_matches_transformers(tmp_path):
    """A synthetic checkpoint written by transformers' MLCDVisionModel (RICE-ViT's HF class) loads
    into our tower, and our tower's patch features equal MLCD's last hidden states."""
    from transformers import MLCDVisionConfig, MLCDVisionModel

    vcfg = VisionConfig(hidden_size=32, depth=2, num_heads=2, intermediate_size=64)
    torch.manual_seed(5)
    mlcd = MLCDVisionModel(MLCDVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=56, patch_size=14,
                                            hidden_act="gelu", attn_implementation="sdpa")).eval()
    mlcd.save_pretrained(tmp_path / "rice")
    model = build_model(vcfg, tiny_llm_config(vocab_size=1000), vision_checkpoint=tmp_path / "rice").eval()

    img = torch.randn(3, 56, 84)
    with torch.no_grad():
        ref = mlcd(pixel_values=img[None]).last_hidden_state[0, 1:]  # raster order, CLS dropped
        ours = model.vision(patchify(img), torch.tensor([[4, 6]]))     # 2x2-merge order
    rc = patch_positions(torch.tensor([[4, 6]]), 2)
    ref_merge_order = ref[rc[:, 0] * 6 + rc[:, 1]]
    assert (ours - ref_merge_order).abs().max() < 1e-5


def test_rice_vit_from_llava_ov_names(tmp_path):
    from safetensors.torch import save_file

    src = build_model(tiny_vision_config(), tiny_llm_config(vocab_size=1000), seed=1)
    state = {}
    for k, v in src.state_dict().items():
        if k.startswith("vision."):
            state["model.visual." + k.removeprefix("vision.")] = v.clone()
        elif k.startswith("projector."):
            state["model.visual.merger." + k.removeprefix("projector.")] = v.clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    dst = build_model(tiny_vision_config(), tiny_llm_config(vocab_size=1000), seed=2)
    loaded = load_rice_vit(dst, tmp_path)
    assert any(k.startswith("projector.") for k in loaded)
    for k, v in src.state_dict().items():
        if k.startswith(("vision.", "projector.")):
            assert torch.equal(v, dst.state_dict()[k]), k
    # a checkpoint for a different depth is refused with the names
    del state["model.visual.blocks.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    try:
        load_rice_vit(dst, tmp_path)
    except ValueError as e:
        assert "blocks.1.mlp.fc2.bias" in str(e)
    else:
        raise AssertionError("missing tensor not detected")


def test_image_features_replace_pads_and_blocks_are_addressable():
    model = build_model(tiny_vision_config(), tiny_llm_config(vocab_size=152000), seed=0).eval()
    assert len(model.blocks()) == 2 + 2
    assert model.blocks()[0] is model.vision.blocks[0] and model.blocks()[-1] is model.llm.model.layers[-1]
    ids = torch.tensor([[5, 6, IMAGE_PAD_ID, IMAGE_PAD_ID, 7]])
    pixels = torch.randn(8, 588)
    grid = torch.tensor([[2, 4]])
    with torch.no_grad():
        emb = model.embed(ids, pixels, grid)
        feats = model.image_features(pixels, grid)
        plain = model.llm.get_input_embeddings()(ids)
    assert torch.equal(emb[0, 2:4], feats)
    assert torch.equal(emb[0, [0, 1, 4]], plain[0, [0, 1, 4]])
