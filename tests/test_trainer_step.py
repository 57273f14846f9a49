"""Train step and data reader: phase 1 trains only the projector (vision and LLM bit-identical after
a step), phases 1.5/2 train everything, the step runs end to end on packed shards, and the reader
shards deterministically across ranks, reshuffles per epoch and resumes from (shard, row)."""

from __future__ import annotations

import pytest
import torch

from packing import tokenizer as ptok
from tests.helpers import write_test_packs
from trainer.collate import PackCollator
from trainer.data import PackStream
from trainer.model import build_model, tiny_llm_config, tiny_vision_config
from trainer.params import param_groups
from trainer.step import DEFAULT_LR, make_optimizer, train_cpu, train_step


@pytest.fixture(scope="module")
def tok():
    return ptok.load_tokenizer("qwen")


@pytest.fixture(scope="module")
def packs(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packs")
    write_test_packs(folder, tok, n_shards=3, packs_per_shard=3, loss_on="assistant")
    return folder


@pytest.fixture(scope="module")
def caption_packs(tok, tmp_path_factory):
    """Packed with loss on the last assistant turn only: phases 1 and 1.5's loss rule."""
    folder = tmp_path_factory.mktemp("caption_packs")
    write_test_packs(folder, tok, n_shards=3, packs_per_shard=3, loss_on="last")
    return folder


def _snapshot(model, part):
    return {k: v.detach().clone() for k, v in getattr(model, part).state_dict().items()}


@pytest.mark.parametrize("phase,changes", [("1", {"projector"}), ("2", {"vision", "projector", "llm"})])
def test_phase_trains_only_its_parts(packs, caption_packs, tok, phase, changes):
    packs = caption_packs if phase == "1" else packs
    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=0)
    before = {p: _snapshot(model, p) for p in ("vision", "projector", "llm")}
    opt = make_optimizer(model, phase, DEFAULT_LR)
    batch = PackCollator(tok, phase=phase)(list(PackStream(str(packs)).epoch(0))[:2])
    m = train_step(model, opt, [batch])
    assert m["loss_tokens"] == batch["num_loss_tokens"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
    for part, old in before.items():
        new = getattr(model, part).state_dict()
        identical = all(torch.equal(old[k], new[k]) for k in old)
        if part in changes:
            assert not identical, f"phase {phase}: {part} did not train"
        else:
            assert identical, f"phase {phase}: frozen {part} changed"


def test_param_groups_have_separate_lrs():
    model = build_model(tiny_vision_config(), tiny_llm_config(vocab_size=1000), seed=0)
    groups = param_groups(model, "2", {"vision": 1.0, "projector": 2.0, "llm": 3.0}, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["vision"]["lr"] == 1.0 and by_name["projector"]["lr"] == 2.0 and by_name["llm"]["lr"] == 3.0
    assert by_name["llm.no_decay"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters()])
    assert [g["name"] for g in param_groups(model, "1", {"projector": 1.0})] == ["projector", "projector.no_decay"]


def test_micro_batch_split_does_not_change_the_loss(packs, tok):
    """Loss normalised by the step's loss-token count: 1 micro-batch of 2 packs == 2 of 1."""
    packs_ = list(PackStream(str(packs)).epoch(0))[:2]
    collate = PackCollator(tok, phase="2")
    losses = []
    for groups in ([packs_], [packs_[:1], packs_[1:]]):
        model = build_model(tiny_vision_config(), tiny_llm_config(), seed=0)
        opt = make_optimizer(model, "2", DEFAULT_LR)
        losses.append(train_step(model, opt, [collate(g) for g in groups])["loss"])
    assert abs(losses[0] - losses[1]) < 1e-5


def test_cpu_training_end_to_end(caption_packs):
    hist = train_cpu(str(caption_packs), steps=3, phase="1.5", micro_batch=2, log=lambda s: None)
    assert len(hist) == 3 and all(h["loss"] > 0 and h["loss_tokens"] > 0 for h in hist)
    assert hist[-1]["data"]["epoch"] == 0 and hist[-1]["data"]["shard"]


def test_overfits_one_batch(packs, tok):
    model = build_model(tiny_vision_config(), tiny_llm_config(), seed=0)
    opt = make_optimizer(model, "2", {"vision": 1e-3, "projector": 1e-3, "llm": 3e-3})
    batch = PackCollator(tok, phase="2")(list(PackStream(str(packs)).epoch(0))[:1])
    losses = [train_step(model, opt, [batch])["loss"] for _ in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses


# ---------------------------------------------------------------- data reader


def _ids(stream, n):
    it = iter(stream)
    return [p["pack_id"] for _, p in zip(range(n), it)]  # range first: zip must not pull n+1


def test_ranks_partition_each_epoch_and_reshuffle(packs):
    world = 2
    per_rank = [list(PackStream(str(packs), rank=r, world_size=world, seed=7).epoch(0)) for r in range(world)]
    ids = [[p["pack_id"] for p in rank] for rank in per_rank]
    assert len(ids[0]) == len(ids[1]) == 9 // 2
    assert not set(ids[0]) & set(ids[1])  # disjoint
    again = [p["pack_id"] for p in PackStream(str(packs), rank=0, world_size=world, seed=7).epoch(0)]
    assert again == ids[0]  # deterministic
    e1 = [p["pack_id"] for p in PackStream(str(packs), rank=0, world_size=1, seed=7).epoch(1)]
    e0 = [p["pack_id"] for p in PackStream(str(packs), rank=0, world_size=1, seed=7).epoch(0)]
    assert sorted(e0) == sorted(e1) and len(set(e0)) == 9 and e0 != e1  # every pack once, new order


@pytest.mark.parametrize("stop_after", [1, 4, 5, 11])
def test_resume_from_saved_position(packs, stop_after):
    """Read k packs, save the position, resume in a new reader: the continuation is identical
    (across an epoch boundary too: 4 packs per epoch for rank 1 of 2)."""
    full = _ids(PackStream(str(packs), rank=1, world_size=2, seed=3), stop_after + 6)
    s = PackStream(str(packs), rank=1, world_size=2, seed=3)
    first = _ids(s, stop_after)
    state = s.state_dict()
    assert set(state) >= {"epoch", "shard", "row"}
    resumed = PackStream(str(packs), rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    assert first + _ids(resumed, 6) == full


def test_collator_refuses_packs_made_with_another_loss_rule(packs, tok):
    with pytest.raises(ValueError, match="loss mask differs"):
        for p in PackStream(str(packs)).epoch(0):
            PackCollator(tok, phase="1")([p])


def test_resume_refuses_other_world_size(packs):
    s = PackStream(str(packs), rank=0, world_size=2, seed=3)
    _ids(s, 2)
    with pytest.raises(ValueError, match="rank"):
        PackStream(str(packs), rank=0, world_size=3, seed=3).load_state_dict(s.state_dict())


def test_refuses_other_schema_version(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pack_id": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="schema version"):
        PackStream(str(tmp_path))


@pytest.mark.slow
def test_train_on_pack_stage_output(ray_address, tmp_path):
    """End to end on the real pack stage's output (LLaVA JSONL with images -> `ovpipe pack` ->
    PackStream through the manifest -> collator -> CPU train step): every pack's token counts equal
    the packer's stored lengths and the step runs."""
    import json

    from tests.helpers import demo_samples, png

    from ovpipe.config import load_config
    from ovpipe.core.stage import run_stage
    from packing.stage import PackStage

    src = tmp_path / "llava"
    (src / "images").mkdir(parents=True)
    recs = []
    for k, s in enumerate(demo_samples() * 2):
        names = []
        for j, data in enumerate(s["images"]):
            names.append(f"{k}-{j}.png")
            (src / "images" / names[-1]).write_bytes(png(100 * k + j, 60 + 20 * j + k, 50 + 10 * k))
        rec = {"id": f"{s['id']}-{k}", "conversations": s["conv"]}
        if names:
            rec["image"] = names if len(names) > 1 else names[0]
        recs.append(rec)
    (src / "part-0.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n")
    out = tmp_path / "pack"
    cfg = load_config(overrides=[f"pack.image_folder=\"{src / 'images'}\"", "pack.buckets=2", "pack.plot=false",
                                 "pack.max_len=400", "pack.max_pixels=50176"])
    run_stage(PackStage(), str(src), str(out), cfg, quiet=True)
    stream = PackStream(str(out))
    collate = PackCollator(phase="2", max_len=400)
    n_samples = 0
    for pack in stream.epoch(0):
        batch = collate([pack])
        seg = batch["segment_ids"][0]
        assert [int((seg == j).sum()) for j in range(len(pack["sample_lens"]))] == pack["sample_lens"]
        n_samples += len(pack["sample_ids"])
    assert n_samples == len(recs)
    hist = train_cpu(str(out), steps=2, phase="2", micro_batch=2, max_len=400, log=lambda s: None)
    assert all(h["loss_tokens"] > 0 for h in hist)


# ---------------------------------------------------------------- config: train.phase


def test_train_stage_is_an_input_alias_of_train_phase(tmp_path):
    """`train.stage` (the old name) in a TOML file or `--set` loads as `train.phase`; what the config
    prints (model_dump, to_toml: `ovpipe config show`) says `phase`; unknown keys stay refused."""
    from ovpipe.config import load_config
    from ovpipe.core.config import ConfigError, to_toml

    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nstage = "1.5"\n')
    cfg = load_config(str(toml))
    assert cfg.train.phase == "1.5" and cfg.train.model_dump()["phase"] == "1.5"
    assert "stage" not in cfg.train.model_dump()
    text = to_toml(cfg)
    assert 'phase = "1.5"' in text and "stage =" not in text
    assert load_config(None, ["train.stage=2"]).train.phase == "2"  # a number on the command line
    assert load_config(None, ["train.phase=1.5"]).train.phase == "1.5"
    assert load_config(str(toml), ["train.phase=1.5"]).train.phase == "1.5"  # both, agreeing
    with pytest.raises(ConfigError, match="disagree"):
        load_config(str(toml), ["train.phase=2"])
    with pytest.raises(ConfigError, match="unknown key 'train.stages'"):
        load_config(None, ["train.stages=2"])
    with pytest.raises(ConfigError, match="train.phase"):
        load_config(None, ["train.phase=3"])
    again = tmp_path / "again.toml"  # the printed config loads back as it was
    again.write_text(text)
    assert load_config(str(again)) == cfg
