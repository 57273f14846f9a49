"""FSDP2 on CPU with real torch.distributed processes (gloo): two ranks' gradients equal one
process's gradients on the same packs (the loss divided by the loss tokens of all ranks and
micro-batches), and the loss goes down; the run-level loop (`trainer.train.train`) chains stages
1 -> 1.5 -> 2 with stage 1 leaving the vision tower and the LLM bit-identical."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from packing import tokenizer as ptok
from tests.test_collate import write_test_packs

LR = {"vision": 1e-3, "projector": 1e-3, "llm": 1e-3}


@pytest.fixture(scope="module")
def tok():
    return ptok.load_tokenizer("qwen")


@pytest.fixture(scope="module")
def packs(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_packs")
    write_test_packs(folder, tok, n_shards=2, packs_per_shard=3, loss_on="assistant")
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, packs: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from trainer import fsdp
    from trainer.collate import PackCollator
    from trainer.data import PackStream
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config
    from trainer.step import make_optimizer
    from trainer.train import clip_and_step, forward_backward, keep_vision_in_graph

    _, _, device = fsdp.init_distributed()
    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=0)
    keep_vision_in_graph(model)
    fsdp.apply_fsdp(model, device)
    opt = make_optimizer(model, "2", LR)
    mine = list(itertools.islice(iter(PackStream(packs, rank, world, seed=0)), 2))  # items rank, rank + 2
    collate = PackCollator(stage="2")
    mbs = [collate([p]) for p in mine]  # two micro-batches: gradient accumulation
    tokens = fsdp.all_reduce_sum(sum(mb["num_loss_tokens"] for mb in mbs), device)
    forward_backward(model, mbs, tokens, sharded=True)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    losses = []
    opt.zero_grad(set_to_none=True)
    for _ in range(6):
        loss = forward_backward(model, mbs, tokens, sharded=True)
        clip_and_step(opt, 1.0)
        losses.append(fsdp.all_reduce_sum(loss, device) / tokens)
    if rank == 0:
        torch.save(grads, Path(out) / "grads.pt")
        (Path(out) / "losses.json").write_text(json.dumps({"losses": losses, "tokens": tokens,
                                                           "packs": [p["pack_id"] for p in mine]}))
    else:
        (Path(out) / "packs1.json").write_text(json.dumps([p["pack_id"] for p in mine]))
    dist.destroy_process_group()


def test_two_ranks_match_one_process_and_loss_decreases(packs, tmp_path):
    import torch.multiprocessing as mp

    from trainer.collate import PackCollator
    from trainer.data import PackStream
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config
    from trainer.params import apply_stage
    from trainer.train import forward_backward, keep_vision_in_graph

    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(packs), str(tmp_path)), nprocs=2, join=True)
    fsdp_grads = torch.load(tmp_path / "grads.pt")
    result = json.loads((tmp_path / "losses.json").read_text())

    # one process, no FSDP, the same four packs (global stream items 0..3) as four micro-batches
    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=0)
    keep_vision_in_graph(model)
    apply_stage(model, "2")
    four = list(itertools.islice(iter(PackStream(str(packs), seed=0)), 4))
    assert sorted(p["pack_id"] for p in four) == sorted(
        result["packs"] + json.loads((tmp_path / "packs1.json").read_text()))
    collate = PackCollator(stage="2")
    mbs = [collate([p]) for p in four]
    tokens = sum(mb["num_loss_tokens"] for mb in mbs)
    assert tokens == result["tokens"]
    forward_backward(model, mbs, tokens, sharded=False)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ref) == set(fsdp_grads) and len(ref) > 20
    for name, g in ref.items():
        torch.testing.assert_close(fsdp_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # a wrong normalisation (the default mean over ranks, or per-rank token counts) is 2x off
    big = max(ref, key=lambda n: ref[n].abs().sum())
    assert not torch.allclose(fsdp_grads[big] / 2, ref[big], rtol=1e-2)

    losses = result["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_stage_chain_1_15_2(tok, tmp_path, process_group):
    """Stage 1 -> 1.5 -> 2 in one test, each from the previous export; stage 2 mixes two datasets."""
    from safetensors.torch import load_file

    from ovpipe.config import load_config
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config
    from trainer.train import train

    caption = tmp_path / "caption_packs"
    write_test_packs(caption, tok, n_shards=2, packs_per_shard=3, loss_on="last")
    sft_a, sft_b = tmp_path / "sft_a", tmp_path / "sft_b"
    write_test_packs(sft_a, tok, n_shards=2, packs_per_shard=2, loss_on="assistant")
    write_test_packs(sft_b, tok, n_shards=1, packs_per_shard=4, loss_on="assistant")

    def cfg(stage, steps, init_from="", **extra):
        sets = [f"train.stage={stage}", f"train.steps={steps}", f'train.init_from="{init_from}"',
                "train.lr=0.001", "train.checkpoint_interval=10"]
        sets += [f"train.{k}={json.dumps(v)}" for k, v in extra.items()]
        return load_config(None, sets)

    s1 = train(str(caption), str(tmp_path / "run1"), cfg("1", 3))
    initial = build_model(tiny_vision_config(), tiny_llm_config(), seed=0).state_dict()
    export1 = {**load_file(str(tmp_path / "run1/export/vision_projector.safetensors")),
               **{"llm." + k: v for k, v in load_file(str(tmp_path / "run1/export/llm/model.safetensors")).items()}}
    for name, value in export1.items():
        if name.startswith(("vision.", "llm.")):
            assert torch.equal(value, initial[name]), f"stage 1 changed frozen {name}"
    assert any(not torch.equal(export1[n], initial[n]) for n in export1 if n.startswith("projector.")), \
        "stage 1 did not train the projector"
    assert s1["stage"] == "1" and s1["export"]

    train(str(caption), str(tmp_path / "run15"), cfg("1.5", 2, str(tmp_path / "run1")))
    export15 = load_file(str(tmp_path / "run15/export/vision_projector.safetensors"))
    llm15 = load_file(str(tmp_path / "run15/export/llm/model.safetensors"))
    assert any(not torch.equal(export15[n], export1[n]) for n in export15 if n.startswith("vision."))
    assert any(not torch.equal(llm15[n], export1["llm." + n]) for n in llm15)

    s2 = train(str(sft_a), str(tmp_path / "run2"),
               cfg("2", 4, str(tmp_path / "run15"), datasets=[str(sft_b)], mixture_weights=[0.5, 0.5]))
    recs = [json.loads(ln) for ln in (tmp_path / "run2/metrics.jsonl").read_text().splitlines()]
    used = {j for r in recs for j in r["datasets"]}
    assert used == {0, 1}, f"stage 2 mixture used datasets {used}"
    assert s2["stage"] == "2" and (tmp_path / "run2/loss.png").stat().st_size > 0
    with pytest.raises(ValueError, match="init_from"):
        train(str(sft_a), str(tmp_path / "run_bad"), cfg("2", 1))
