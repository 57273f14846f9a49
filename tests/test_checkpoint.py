"""Checkpoints: a run SIGKILLed after step k and resumed gives the uninterrupted run's loss
sequence exactly (2 gloo ranks under torchrun, CPU); a checkpoint saved by 2 ranks resumes on 1
(DCP reshards model and optimizer, the data position continues with the same packs); the
Checkpointer round-trips model, optimizer, scheduler, data position and RNG in one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from packing import tokenizer as ptok
from tests.conftest import subprocess_env
from tests.helpers import write_test_packs
from trainer.train import KILL_ENV


@pytest.fixture(scope="module")
def init_export(tmp_path_factory):
    """A phase-1.5 starting point without running phase 1: a tiny seeded model's export."""
    from trainer.export import export_model
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config

    run = tmp_path_factory.mktemp("init_run")
    export_model(build_model(tiny_vision_config(), tiny_llm_config(), seed=0), run / "export")
    return run


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt_packs")
    # 9 packs: 2 ranks read 8 per epoch, so the runs below cross an epoch boundary
    write_test_packs(folder, ptok.load_tokenizer("qwen"), n_shards=3, packs_per_shard=3, loss_on="assistant")
    return folder


def torchrun(nproc: int, packs, run_dir, init, *sets: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(OMP_NUM_THREADS="1")
    env.pop(KILL_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    base = ["train.phase=2", f'train.init_from="{init}"', "train.steps=6", "train.lr=0.001", "train.checkpoint_interval=2",
            "train.keep_checkpoints=5", "train.export=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer.train", "--input", str(packs), "--output", str(run_dir)]
    for s in [*base, *sets]:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(len(recs)))
    return [r["loss"] for r in recs]


@pytest.mark.slow
def test_kill_resume_and_world_size_change(packs, init_export, tmp_path):
    full, killed, one = tmp_path / "full", tmp_path / "killed", tmp_path / "one"
    r = torchrun(2, packs, full, init_export)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(full)
    assert len(ref) == 6

    # SIGKILL after step index 4: checkpoint step-4 is the newest, step 4's metrics line is redone
    r = torchrun(2, packs, killed, init_export, kill_after=4)
    assert r.returncode != 0
    assert (killed / "checkpoints/latest").read_text().strip() == "step-00000004"
    assert len(losses(killed)) == 5
    r = torchrun(2, packs, killed, init_export)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] == 4
    assert losses(killed) == ref  # exactly, not approximately

    # 2 ranks x 1 pack per step == 1 rank x 2 packs per step: the same packs, so the same losses
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints/step-00000004", one / "checkpoints/step-00000004")
    (one / "checkpoints/latest").write_text("step-00000004")
    r = torchrun(1, packs, one, init_export, "train.micro_batch=2")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((one / "summary.json").read_text())
    assert s["resumed_from_step"] == 4 and s["world_size"] == 1
    resumed = [json.loads(ln) for ln in (one / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in resumed] == [4, 5]
    for got, want in zip([x["loss"] for x in resumed], ref[4:]):
        assert abs(got - want) < 1e-5 * max(1.0, abs(want)), (got, want)


@pytest.fixture()
def one_process_group(process_group):
    from trainer import fsdp

    fsdp.init_distributed()
    yield


def test_checkpointer_round_trip(packs, tmp_path, one_process_group):
    from trainer import fsdp
    from trainer.checkpoint import Checkpointer
    from trainer.data import PackStream
    from trainer.model import build_model, tiny_llm_config, tiny_vision_config
    from trainer.step import make_optimizer
    from trainer.train import keep_vision_in_graph, warmup_cosine

    model = build_model(tiny_vision_config(), tiny_llm_config(vocab_size=512), seed=0)
    keep_vision_in_graph(model)  # as in training: every part gets a gradient (and optimizer state)
    fsdp.apply_fsdp(model, torch.device("cpu"))
    opt = make_optimizer(model, "2", {"vision": 1e-2, "projector": 1e-2, "llm": 1e-2})
    sched = warmup_cosine(opt, 10, 0.1, 0.0)
    stream = PackStream(str(packs), seed=0)

    def one_step():
        ids = torch.randint(0, 500, (1, 12))
        batch = {"input_ids": ids, "targets": ids, "position_ids": torch.arange(12)[None],
                 "segment_ids": torch.zeros(1, 12, dtype=torch.long)}
        model(batch)["loss_sum"].backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    it = iter(stream)
    for _ in range(2):
        one_step()
        next(it)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    path = ckpt.save(2, model, opt, sched, [stream])
    assert ckpt.latest() == path and not list((tmp_path / "checkpoints").glob("*.tmp"))
    want_params = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    want_lr, want_pos, want_rand = sched.get_last_lr(), stream.state_dict(), torch.rand(3)
    want_next = next(it)["pack_id"]

    one_step()  # move everything on
    next(it)
    got = ckpt.load(path, model, opt, sched, [stream])
    assert got["step"] == 2
    for n, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), want_params[n]), n
    assert sched.get_last_lr() == want_lr and stream.state_dict() == want_pos
    assert torch.equal(torch.rand(3), want_rand)
    assert next(iter(stream))["pack_id"] == want_next
    state = opt.state_dict()["state"]
    assert state and all(float(s["step"]) == 2 for s in state.values())


def test_reposition_at_another_world_size(packs):
    """After the group consumed n items, rank r of W' continues at item n + r of the same stream."""
    from trainer.checkpoint import reposition
    from trainer.data import PackStream

    order = [p["pack_id"] for p in PackStream(str(packs), seed=0).epoch(0)]
    for world, rank, consumed in ((2, 1, 4), (3, 2, 3), (1, 0, 5)):
        s = PackStream(str(packs), rank=rank, world_size=world, seed=0)
        reposition(s, 0, consumed)
        assert next(iter(s))["pack_id"] == order[consumed + rank]
    s = PackStream(str(packs), rank=1, world_size=2, seed=0)
    reposition(s, 0, 8)  # 2 ranks read 8 of the 9 packs per epoch: rank 1 goes on in epoch 1
    first = next(iter(s))
    assert s.state_dict()["epoch"] == 1
    assert first["pack_id"] == [p["pack_id"] for p in PackStream(str(packs), seed=0).epoch(1)][1]
