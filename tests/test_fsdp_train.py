"""FSDP2 on CPU with real torch.distributed processes (gloo): two ranks' gradients equal one
process's gradients on the same packs (the loss divided by the loss tokens of all ranks and
micro-batches), and the loss goes down; the run-level loop (`trainer.train.train`) chains phases
1 -> 1.5 -> 2 with phase 1 leaving the vision tower and the LLM bit-identical."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from packing import tokenizer as ptok
from tests.helpers import write_test_packs

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
    collate = PackCollator(phase="2")
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
    from trainer.params import apply_phase
    from trainer.train import forward_backward, keep_vision_in_graph

    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(packs), str(tmp_path)), nprocs=2, join=True)
    fsdp_grads = torch.load(tmp_path / "grads.pt")
    result = json.loads((tmp_path / "losses.json").read_text())

    # one process, no FSDP, the same four packs (global stream items 0..3) as four micro-batches
    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=0)
    keep_vision_in_graph(model)
    apply_phase(model, "2")
    four = list(itertools.islice(iter(PackStream(str(packs), seed=0)), 4))
    assert sorted(p["pack_id"] for p in four) == sorted(
        result["packs"] + json.loads((tmp_path / "packs1.json").read_text()))
    collate = PackCollator(phase="2")
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


def test_phase_chain_1_15_2(tok, tmp_path, process_group):
    """Phase 1 -> 1.5 -> 2 in one test, each from the previous export; phase 2 mixes two datasets."""
    from safetensors.torch import load_file

    from ovpipe.config import load_config
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config
    from trainer.train import train

    caption = tmp_path / "caption_packs"
    write_test_packs(caption, tok, n_shards=2, packs_per_shard=3, loss_on="last")
    sft_a, sft_b = tmp_path / "sft_a", tmp_path / "sft_b"
    write_test_packs(sft_a, tok, n_shards=2, packs_per_shard=2, loss_on="assistant")
    write_test_packs(sft_b, tok, n_shards=1, packs_per_shard=4, loss_on="assistant")

    def cfg(phase, steps, init_from="", **extra):
        sets = [f"train.phase={phase}", f"train.steps={steps}", f'train.init_from="{init_from}"',
                "train.lr=0.001", "train.checkpoint_interval=10"]
        sets += [f"train.{k}={json.dumps(v)}" for k, v in extra.items()]
        return load_config(None, sets)

    s1 = train(str(caption), str(tmp_path / "run1"), cfg("1", 3))
    initial = build_model(tiny_vision_config(), tiny_llm_config(), seed=0).state_dict()
    export1 = {**load_file(str(tmp_path / "run1/export/vision_projector.safetensors")),
               **{"llm." + k: v for k, v in load_file(str(tmp_path / "run1/export/llm/model.safetensors")).items()}}
    for name, value in export1.items():
        if name.startswith(("vision.", "llm.")):
            assert torch.equal(value, initial[name]), f"phase 1 changed frozen {name}"
    assert any(not torch.equal(export1[n], initial[n]) for n in export1 if n.startswith("projector.")), \
        "phase 1 did not train the projector"
    assert s1["phase"] == "1" and s1["export"]

    train(str(caption), str(tmp_path / "run15"), cfg("1.5", 2, str(tmp_path / "run1")))
    export15 = load_file(str(tmp_path / "run15/export/vision_projector.safetensors"))
    llm15 = load_file(str(tmp_path / "run15/export/llm/model.safetensors"))
    assert any(not torch.equal(export15[n], export1[n]) for n in export15 if n.startswith("vision."))
    assert any(not torch.equal(llm15[n], export1["llm." + n]) for n in llm15)

    s2 = train(str(sft_a), str(tmp_path / "run2"),
               cfg("2", 4, str(tmp_path / "run15"), datasets=[str(sft_b)], mixture_weights=[0.5, 0.5]))
    recs = [json.loads(ln) for ln in (tmp_path / "run2/metrics.jsonl").read_text().splitlines()]
    used = {j for r in recs for j in r["datasets"]}
    assert used == {0, 1}, f"phase 2 mixture used datasets {used}"
    assert s2["phase"] == "2" and (tmp_path / "run2/loss.png").stat().st_size > 0
    with pytest.raises(ValueError, match="init_from"):
        train(str(sft_a), str(tmp_path / "run_bad"), cfg("2", 1))


def test_train_stage_runs_one_phase_and_counts_packs(tok, tmp_path, process_group):
    """trainer/launch.py's TrainStage.run (the path of `ovpipe train` and the pipeline's train
    step) on tiny packs in this process: a summary with input = kept = packs, a run folder, no
    process group left behind; a second run leaves the finished folder as it is."""
    import torch.distributed as dist

    from ovpipe.config import load_config
    from trainer.launch import TrainStage

    packs = tmp_path / "packs"
    write_test_packs(packs, tok, n_shards=2, packs_per_shard=3, loss_on="last")
    cfg = load_config(None, ["train.steps=2", "train.nproc_per_node=1", "train.checkpoint_interval=2",
                             "train.export=false", "train.lr=0.001"])
    run = tmp_path / "run"
    s = TrainStage().run(str(packs), str(run), cfg, quiet=True)
    assert (s.stage, s.shards, s.shards_skipped, s.input_rows, s.kept_rows, s.dropped_rows) == \
        ("train", 1, 0, 6, 6, 0)
    assert s.output == str(run) and s.dropped_by_reason == {}
    assert json.loads((run / "summary.json").read_text())["phase"] == "1"
    assert json.loads((run / "train_config.json").read_text())["train"]["phase"] == "1"
    assert not dist.is_initialized()
    mtime = (run / "summary.json").stat().st_mtime_ns
    again = TrainStage().run(str(packs), str(run), cfg, quiet=True)
    assert again.shards_skipped == 1 and again.input_rows == 6 and again.config_hash == s.config_hash
    assert (run / "summary.json").stat().st_mtime_ns == mtime
    redo = TrainStage().run(str(packs), str(run), cfg, overwrite=True, quiet=True)
    assert redo.shards_skipped == 0 and (run / "summary.json").stat().st_mtime_ns != mtime
    with pytest.raises(ValueError, match="local or shared path"):
        TrainStage().run(str(packs), "s3://bucket/run", cfg)


def test_train_stage_pipeline_runs_and_output(tmp_path):
    """The pipeline's train step: the tiny model's demo chain 1 -> 1.5 -> 2 (each from the previous
    phase's folder), or the configured phase with a real model; object-store outputs need
    train.run_dir and are redirected under it."""
    from ovpipe.config import load_config
    from trainer.launch import TrainStage

    stage, step = TrainStage(), str(tmp_path / "train")
    runs = stage.pipeline_runs(load_config(), step)
    assert [f for f, _ in runs] == [str(tmp_path / "train" / p) for p in ("1", "1.5", "2")]
    got = [(c.train.phase, c.train.steps, c.train.init_from, c.train.checkpoint_interval, c.train.keep_checkpoints,
            c.train.lr) for _, c in runs]
    assert got == [("1", 3, "", 3, 1, 1e-3), ("1.5", 2, runs[0][0], 2, 1, 1e-4), ("2", 2, runs[1][0], 2, 1, 1e-4)]
    real = load_config(None, ["train.phase=2", 'train.init_from="/runs/s15"'])
    assert stage.pipeline_runs(real, step) == [(str(tmp_path / "train" / "2"), real)]

    assert stage.resolve_output(load_config(), step, "r-1") == step
    with pytest.raises(ValueError, match=r"set train\.run_dir"):
        stage.check(load_config(), "s3://bucket/out/versions/r-1/train")
    with_dir = load_config(None, ['train.run_dir="/shared/runs"'])
    stage.check(with_dir, "s3://bucket/out/versions/r-1/train")
    assert stage.resolve_output(with_dir, "s3://bucket/out/versions/r-1/train", "r-1") == "/shared/runs/r-1/train"


@pytest.mark.slow
def test_train_stage_under_torchrun(tok, tmp_path, monkeypatch):
    """TrainStage.run with 2 processes: torchrun ranks load the resolved config from the run
    folder's train_config.toml; a failing phase raises with its exit code."""
    from ovpipe.config import load_config
    from trainer.launch import TOML_FILE, TrainStage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    packs = tmp_path / "packs"
    write_test_packs(packs, tok, n_shards=2, packs_per_shard=2, loss_on="last")
    sets = ["train.nproc_per_node=2", "train.steps=2", "train.checkpoint_interval=2", "train.export=false"]
    run = tmp_path / "run"
    cfg = load_config(None, ["train.stage=1.5", f'train.init_from="{_tiny_export(tmp_path)}"', *sets])
    s = TrainStage().run(str(packs), str(run), cfg, quiet=True)
    assert s.input_rows == 4 and s.shards_skipped == 0
    assert 'phase = "1.5"' in (run / TOML_FILE).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["phase"] == "1.5" and summary["world_size"] == 2
    # one line: the failing rank's exception, the exit code, where the log is
    with pytest.raises(RuntimeError, match=r"training phase 2 failed on rank \d: ValueError: training phase 2 "
                       r"starts from the previous phase.* \(exit [1-9]\d*\); its output is in "):
        TrainStage().run(str(packs), str(tmp_path / "bad"), load_config(None, ["train.phase=2", *sets]), quiet=True)


def _tiny_export(tmp_path: Path) -> Path:
    from trainer.export import export_model
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config

    export_model(build_model(tiny_vision_config(), tiny_llm_config(), seed=0), tmp_path / "init" / "export")
    return tmp_path / "init"
