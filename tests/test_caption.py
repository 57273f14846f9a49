"""The caption stage end to end: a real chat-completions server on 127.0.0.1 (latency, errors,
timeouts, malformed and oversized replies, death and return), real Parquet, a real local Ray."""

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.caption import (
    CaptionStage,
    MissingBackend,
    choose_languages,
    concept_caption,
)
from curation.caption_filter import CJK
from ovpipe.config import load_config
from ovpipe.core.ledger import read_ledger
from ovpipe.core.shards import Location, read_manifest_entries
from ovpipe.core.stage import OutputConflict, run_stage
from ovpipe.testing.chat_server import ChatServer, default_reply
from tests.conftest import python_exe, sigkill_after_commits, subprocess_env
from tests.helpers import LONG_EN, LONG_ZH

FAST_RETRIES = ["caption.backoff_base_s=0.02", "caption.backoff_max_s=0.2"]


@pytest.fixture(scope="module")
def ingested(demo_ingested) -> Path:
    return demo_ingested


def openai_overrides(server: ChatServer, *extra: str) -> list[str]:
    return ['caption.backend="openai"', 'caption.model="test-captioner"',
            f'caption.base_url="{server.base_url}"', *FAST_RETRIES, *extra]


def caption(inp, out, overrides, **kw):
    return run_stage(CaptionStage(), str(inp), str(out), load_config(overrides=list(overrides)), quiet=True, **kw)


def kept(out: Path) -> pa.Table:
    entries = sorted((out / "data").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in entries])


def data_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))
            if "_manifest" not in p.parts}


def stage_data(folder: Path) -> Path:
    """A stage output's data/ folder, or a plain folder of shards as it is."""
    return folder / "data" if (folder / "_manifest").is_dir() else folder


def input_ids(inp: Path) -> list[str]:
    return pa.concat_tables([pq.read_table(p) for p in sorted(stage_data(inp).glob("*.parquet"))])["sample_id"].to_pylist()


def pass1_summary(out: Path) -> dict:
    return json.loads((out / "_captions" / "_manifest" / "_summary.json").read_text())


def pass1_entries(out: Path) -> dict:
    return {k: {f: v for f, v in e.items() if f not in ("seconds", "node")}
            for k, e in read_manifest_entries(Location.parse(str(out / "_captions"))).items()}


def test_every_sample_ends_captioned_or_ledgered_despite_a_misbehaving_server(ingested, tmp_path):
    with ChatServer(latency_s=0.02, jitter_s=0.03, error_rate=0.15, timeout_rate=0.03, hang_s=3.0,
                    malformed_rate=0.05, oversized_rate=0.05, oversized_bytes=300_000, seed=1) as server:
        summary = caption(ingested, tmp_path / "o", openai_overrides(
            server, "caption.max_in_flight=3", "caption.request_timeout_s=0.6", "caption.max_retries=10",
            "caption.max_response_bytes=100000", "caption.zh_share=0.4", "run.workers=1"))
        stats = server.stats
    ids = input_ids(ingested)
    assert summary.input_rows == len(ids) == summary.kept_rows + summary.dropped_rows
    out = kept(tmp_path / "o")
    assert sorted(out["sample_id"].to_pylist()) == sorted(ids)  # nothing lost, nothing doubled
    assert summary.dropped_rows == 0
    # every misbehaviour happened and was retried
    assert all(stats.answers[k] > 0 for k in ("error", "timeout", "malformed", "oversized")), stats.answers
    assert stats.answers["malformed"] >= 2  # both kinds of malformed body, cut off and absurdly deep
    assert stats.requests == len(ids) + sum(stats.answers[k] for k in ("error", "timeout", "malformed", "oversized"))
    assert stats.max_in_flight <= 3  # the in-flight bound holds (one shard at a time)
    # the caption is in the language asked, and the columns are as documented
    for row in out.select(["caption", "language", "captioner"]).to_pylist():
        assert bool(CJK.search(row["caption"])) == (row["language"] == "zh")
        assert row["captioner"] == "test-captioner@v1"
    assert {"caption_key", "caption_minhash"}.isdisjoint(out.column_names)
    assert out.column_names[-3:] == ["caption", "language", "captioner"]
    assert 0.2 < out["language"].to_pylist().count("zh") / out.num_rows < 0.6


def test_in_flight_bound_is_reached_and_held(ingested, tmp_path):
    with ChatServer(latency_s=0.05) as server:
        caption(ingested, tmp_path / "o", openai_overrides(server, "caption.max_in_flight=5", "run.workers=1"))
        assert server.stats.max_in_flight == 5


KINDS = ["good", "empty", "truncated", "refusal", "repetition", "wrong_script", "too_short", "too_long",
         "dup", "near", "flaky"]
EXPECTED = {"empty": "caption_empty", "truncated": "caption_truncated", "refusal": "caption_refusal",
            "repetition": "caption_repetition", "wrong_script": "caption_wrong_script",
            "too_short": "caption_too_short", "too_long": "caption_too_long"}
NEAR_EN = ("A wooden kitchen table holds a red teapot, two white cups with saucers, a plate of ginger cookies, "
           "a folded newspaper, a pair of reading glasses and a small vase of yellow tulips beside a sunny "
           "window with thin cotton curtains and a view of the garden outside, photo number {k}")
NEAR_ZH = ("木制餐桌上放着一个红色茶壶、两个带托盘的白色杯子、一盘姜饼、一份折好的报纸、一副老花镜和一小瓶黄色郁金香，"
           "旁边是挂着薄棉窗帘的明亮窗户，窗外可以看到花园，照片编号{k}")


def scripted(kinds: dict[str, str]):
    seen: Counter = Counter()
    lock = threading.Lock()

    def reply(body, key):
        zh = bool(CJK.search(body["messages"][0]["content"][1]["text"]))
        kind = kinds[key]
        with lock:
            seen[key] += 1
            first = seen[key] == 1
        good = default_reply(body, key)
        table = {
            "good": good,
            "empty": ("", "stop"),
            "truncated": ("一个白色背景上的红色圆形，旁边" if zh else "A red circle on a white background next to", "length"),
            "refusal": ("抱歉，我无法查看这张图片。" if zh else "I'm sorry, but I can't help with that image.", "stop"),
            "repetition": ("一只猫坐在垫子上。" + "猫坐着，" * 8 if zh else "A cat sits on a mat. " + "the cat sits " * 8, "stop"),
            "wrong_script": ("An orange cat is sitting on the windowsill in the sun." if zh
                             else "一只橘色的猫坐在窗台上晒太阳。", "stop"),
            "too_short": ("猫咪。" if zh else "A cat.", "stop"),
            "too_long": (LONG_ZH if zh else LONG_EN, "stop"),
            "dup": ("一张白色背景上有红色圆形的普通照片。" if zh else "A plain photo of a red circle on white.", "stop"),
            "near": ((NEAR_ZH if zh else NEAR_EN).format(k=int(key, 16) % 10**6), "stop"),
            "flaky": (("抱歉，我无法查看。", "stop") if first and zh else
                      ("I'm sorry, I cannot see it.", "stop") if first else good),
        }
        return table[kind]

    return reply, seen


def test_each_rejection_kind_is_caught_and_ledgered(ingested, tmp_path):
    ids = sorted(input_ids(ingested))
    kinds = {sid: KINDS[i % len(KINDS)] for i, sid in enumerate(ids)}
    reply, seen = scripted(kinds)
    with ChatServer(reply=reply) as server:
        summary = caption(ingested, tmp_path / "o", openai_overrides(
            server, "caption.max_caption_tokens=150", "caption.near_dup_threshold=0.75", "caption.zh_share=0.5"))
    ledger = read_ledger(Location.parse(str(tmp_path / "o"))).to_arrow().to_pylist()
    reason = {r["sample_id"]: r["reason"] for r in ledger}
    assert len(reason) == len(ledger) == summary.dropped_rows
    out = kept(tmp_path / "o")
    language = dict(zip(out["sample_id"].to_pylist(), out["language"].to_pylist()))
    languages = dict(zip(ids, choose_languages(ids, [None] * len(ids), load_config(
        overrides=["caption.zh_share=0.5"]).caption, seed=0)))
    assert {languages[s] for s in ids if kinds[s] in EXPECTED} == {"en", "zh"}  # both languages tested
    for sid, kind in kinds.items():
        if kind in EXPECTED:
            assert reason.get(sid) == EXPECTED[kind], (kind, reason.get(sid))
            assert seen[sid] == 2  # one retry of a rejected caption, with another seed
        elif kind in ("good", "flaky"):
            assert sid in language and sid not in reason
    for kind, why in (("dup", "duplicate_caption"), ("near", "near_duplicate_caption")):
        for lang in ("en", "zh"):
            group = sorted((s for s in ids if kinds[s] == kind and languages[s] == lang),
                           key=lambda s: (int(s, 16), s))  # sample_hash is the same 64 bits
            assert [s for s in group if s in language] == group[:1]  # the smallest key wins
            assert all(reason[s] == why for s in group[1:])
    details = {r["reason"]: r["detail"] for r in ledger}
    assert "after one retry" in details["caption_refusal"]
    assert re.search(r"same normalised caption as sample [0-9a-f]{16}", details["duplicate_caption"])


def test_unavailable_images_and_failed_requests_are_ledgered(ray_address, ingested, tmp_path):
    table = pq.read_table(sorted((ingested / "data").glob("*.parquet"))[0])
    uris = table["image_uri"].to_pylist()
    uris[0] = str(tmp_path / "missing.parquet")
    (tmp_path / "junk.bin").write_bytes(b"not an image at all")
    members, rows = table["image_member"].to_pylist(), table["image_row"].to_pylist()
    uris[1], members[1], rows[1] = str(tmp_path / "junk.bin"), None, None
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri", pa.array(uris))
    table = table.set_column(table.schema.get_field_index("image_member"), "image_member", pa.array(members))
    table = table.set_column(table.schema.get_field_index("image_row"), "image_row", pa.array(rows, pa.int64()))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part.parquet")
    with ChatServer(error_rate=1.0, error_statuses=(503,)) as server:
        summary = caption(tmp_path / "in", tmp_path / "o", openai_overrides(server, "caption.max_retries=2"))
        requests = server.stats.requests
    n = table.num_rows
    assert summary.dropped_by_reason == {"image_unavailable": 2, "caption_request_failed": n - 2}
    assert requests == 3 * (n - 2)  # the first try and two retries, then the ledger


def test_client_errors_are_not_retried_and_the_api_key_comes_from_the_environment(ingested, tmp_path, monkeypatch):
    monkeypatch.setenv("OVPIPE_TEST_KEY", "sk-test-123")
    one_shard = sorted((ingested / "data").glob("*.parquet"))[0]
    n = pq.read_metadata(one_shard).num_rows
    with ChatServer(error_rate=1.0, error_statuses=(400,)) as server:
        summary = caption(one_shard, tmp_path / "o", openai_overrides(
            server, 'caption.api_key_env="OVPIPE_TEST_KEY"', 'run.executor="local"'))
        assert server.stats.requests == n  # a 400 is final: no retries
        assert server.stats.authorizations == Counter({"Bearer sk-test-123": n})
    assert summary.dropped_by_reason == {"caption_request_failed": n}
    detail = read_ledger(Location.parse(str(tmp_path / "o"))).to_arrow()["detail"][0].as_py()
    assert "HTTP 400" in detail


def test_server_that_dies_mid_run_and_comes_back_loses_nothing(ingested, tmp_path):
    settings = ["caption.max_in_flight=4", "caption.max_retries=12", "caption.backoff_base_s=0.1",
                "caption.backoff_max_s=1.0", "caption.zh_share=0.3"]
    with ChatServer(latency_s=0.02) as server:
        reference = caption(ingested, tmp_path / "ref", openai_overrides(server, *settings))
    with ChatServer(latency_s=0.05) as server:
        outage = {}

        def kill_and_revive():
            deadline = time.monotonic() + 60
            while server.stats.requests < 25 and time.monotonic() < deadline:
                time.sleep(0.005)
            outage["at"] = server.stats.requests
            server.die()
            time.sleep(1.0)
            server.revive()

        killer = threading.Thread(target=kill_and_revive)
        killer.start()
        summary = caption(ingested, tmp_path / "o", openai_overrides(server, *settings))
        killer.join()
    assert outage["at"] < summary.input_rows  # it died mid-run
    assert summary.dropped_rows == reference.dropped_rows == 0
    assert data_files(tmp_path / "o") == data_files(tmp_path / "ref")


def test_sigkill_mid_stage_then_resume_recaptions_nothing_finished(ray_address, ingested, tmp_path):
    with ChatServer(latency_s=0.01) as server:
        overrides = openai_overrides(server, "caption.zh_share=0.3")
        caption(ingested, tmp_path / "ref", overrides)
        out = tmp_path / "killed"
        cmd = [python_exe(), "-m", "ray_jobs.caption", "--input", str(ingested), "--output", str(out),
               "--workers", "1", "--quiet"] + [a for o in overrides for a in ("--set", o)]
        env = subprocess_env(ray_address, OVPIPE_FAULT_SHARD_DELAY_S="0.4")
        manifest = out / "_captions" / "_manifest"
        committed = sigkill_after_commits(cmd, env, manifest, at_least=3)
        assert 3 <= len(committed) < 10, "the kill must land mid-stage"
        time.sleep(1.0)  # let Ray reap the dead driver's workers
        server.reset_stats()
        resumed = caption(ingested, out, overrides)
        asked = set(server.stats.per_sample)
    finished = {s for name in committed for s in pq.read_table(ingested / "data" / f"{name}.parquet")["sample_id"].to_pylist()}
    assert pass1_summary(out)["shards_skipped"] == len(committed)
    assert asked and not asked & finished  # finished samples were not captioned again
    assert len(asked) == resumed.input_rows - len(finished)
    assert data_files(out) == data_files(tmp_path / "ref")
    assert resumed.kept_rows + resumed.dropped_rows == resumed.input_rows


def test_dedup_setting_change_is_refused_then_overwrite_keeps_the_captions(ingested, tmp_path):
    out = tmp_path / "o"
    with ChatServer() as server:
        caption(ingested, out, openai_overrides(server))
        # the dedup pass writes its loser lists under its own output, never into pass 1's folder
        shards = sorted(p.stem for p in (ingested / "data").glob("*.parquet"))
        assert sorted(p.stem for p in (out / "_dedup").glob("*.parquet")) == shards
        assert not (out / "_captions" / "_dedup").exists()
        captions = pass1_entries(out)
        stamps = {p.name: p.stat().st_mtime_ns for p in (out / "_captions" / "data").glob("*.parquet")}
        dedup_bytes = {p.name: p.read_bytes() for p in (out / "_dedup").glob("*.parquet")}
        with pytest.raises(OutputConflict):
            caption(ingested, out, openai_overrides(server, "caption.near_dup_threshold=0.5"))
        # a refused run changes nothing: the loser lists still match the committed output
        assert {p.name: p.read_bytes() for p in (out / "_dedup").glob("*.parquet")} == dedup_bytes
        server.reset_stats()
        summary = caption(ingested, out, openai_overrides(server, "caption.near_dup_threshold=0.5"),
                          overwrite=True)
        assert server.stats.requests == 0
        first = pass1_summary(out)
        assert first["shards_skipped"] == first["shards"] and summary.shards == 2 * first["shards"]  # both passes
        # pass 1's committed captions are untouched: same manifest entries, same files
        assert pass1_entries(out) == captions
        assert {p.name: p.stat().st_mtime_ns for p in (out / "_captions" / "data").glob("*.parquet")} == stamps
        assert sorted(p.stem for p in (out / "_dedup").glob("*.parquet")) == shards
        assert summary.input_rows == summary.kept_rows + summary.dropped_rows == len(input_ids(ingested))
        caption(ingested, out, openai_overrides(server, "caption.prompt_version='v2'"), overwrite=True)
        assert server.stats.requests == summary.input_rows  # a changed prompt does recaption
        assert pass1_entries(out) != captions


VOCAB = [("red circle", "红色圆形"), ("apple", "苹果"), ("dog", "狗"), ("grass", "草地"), ("blue sky", "蓝天")]


def with_concepts(ingested: Path, out: Path, one_shard: bool = False) -> Path:
    """Assign-like shards: each sample gets 3 of 5 concepts from its hash (many repeats)."""
    out.mkdir()
    tables = []
    for p in sorted((ingested / "data").glob("*.parquet")):
        t = pq.read_table(p)
        ids = [[h % 5, (h // 5) % 5, (h // 25) % 5] for h in t["sample_hash"].to_pylist()]
        t = t.append_column("concept_ids", pa.array(ids, pa.list_(pa.int32())))
        t = t.append_column("concept_scores", pa.array([[0.3, 0.2, 0.1]] * t.num_rows, pa.list_(pa.float32())))
        tables.append((p.name, t))
    if one_shard:
        pq.write_table(pa.concat_tables([t for _, t in tables]), out / "all.parquet")
    else:
        for name, t in tables:
            pq.write_table(t, out / name)
    return out


def test_concepts_backend_is_deterministic_and_dedups_globally(ray_address, ingested, tmp_path):
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("id\ten\tzh\n" + "".join(f"{i}\t{en}\t{zh}\n" for i, (en, zh) in enumerate(VOCAB)))
    inp = with_concepts(ingested, tmp_path / "in")
    common = [f'caption.concepts_vocabulary="{vocab}"', "caption.concepts_top_k=2",
              'caption.language_by_source=["laion_cn=zh"]', "caption.zh_share=0.0"]
    one = caption(inp, tmp_path / "w1", common + ["run.workers=1"])
    caption(inp, tmp_path / "w2", common + ["run.workers=2"])
    assert data_files(tmp_path / "w1") == data_files(tmp_path / "w2")
    # the global pass: same winners whatever the sharding
    caption(with_concepts(ingested, tmp_path / "in1", one_shard=True), tmp_path / "s1", common)
    assert sorted(kept(tmp_path / "w1")["sample_id"].to_pylist()) == sorted(kept(tmp_path / "s1")["sample_id"].to_pylist())
    # the pseudo-captions name the top-k concepts in the language asked
    out, src = kept(tmp_path / "w1"), pa.concat_tables([pq.read_table(p) for p in sorted(stage_data(inp).glob("*.parquet"))])
    concept_of = dict(zip(src["sample_id"].to_pylist(), src["concept_ids"].to_pylist()))
    for row in out.to_pylist():
        names = list(dict.fromkeys(VOCAB[i][row["language"] == "zh"] for i in concept_of[row["sample_id"]]))[:2]
        assert row["caption"] == concept_caption(names, row["language"])
        assert row["language"] == ("zh" if row["source"] == "laion_cn" else "en")
        assert row["captioner"].startswith("concepts-top2:")
    # every kept caption is unique, and each winner is the smallest (sample_hash, sample_id)
    assert len(set(out["caption"].to_pylist())) == out.num_rows
    pass1 = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "w1" / "_captions" / "data").glob("*.parquet"))])
    groups: dict = {}
    for r in pass1.select(["caption", "sample_hash", "sample_id"]).to_pylist():
        groups.setdefault(r["caption"], []).append((r["sample_hash"], r["sample_id"]))
    assert sorted(out["sample_id"].to_pylist()) == sorted(min(g)[1] for g in groups.values())
    assert one.dropped_by_reason["duplicate_caption"] == pass1.num_rows - len(groups) > 0
    assert one.input_rows == one.kept_rows + one.dropped_rows


def test_concepts_backend_refuses_to_name_ids_of_another_vocabulary(ingested, tmp_path):
    """assign's ids index its own vocabulary; the built-in names would silently be wrong."""
    metaclip = tmp_path / "metadata.json"
    metaclip.write_text('["dog", "cat"]')
    with pytest.raises(ValueError, match="set caption.concepts_vocabulary"):
        caption(with_concepts(ingested, tmp_path / "in"), tmp_path / "o", [f'assign.vocabulary="{metaclip}"'])


def text_embeddings(captions, cfg):
    import torch

    from curation.caption import _text_tower
    from curation.embed import ModelSpec

    model, tok = _text_tower(ModelSpec.from_config(cfg.embed))
    with torch.no_grad():
        return model.encode_text(tok(captions)).float().numpy()


def test_captions_that_do_not_match_their_image_embedding_are_ledgered(ray_address, ingested, tmp_path):
    """Image embeddings made from the captions' own text embeddings (tiny seeded open_clip):
    rows given the negated vector must fail the similarity check, the others pass."""
    import numpy as np

    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("id\ten\tzh\n" + "".join(f"{i}\t{en}\t{zh}\n" for i, (en, zh) in enumerate(VOCAB)))
    inp = with_concepts(ingested, tmp_path / "in")
    common = [f'caption.concepts_vocabulary="{vocab}"', "caption.zh_share=0.0", "caption.dedup_exact=false",
              "caption.near_dup_threshold=0.0", 'embed.model="ovpipe-tiny-clip"', 'embed.pretrained="random"']
    cfg = load_config(overrides=common)
    flipped = set()
    for p in sorted(inp.glob("*.parquet")):
        t = pq.read_table(p)
        captions = [concept_caption(list(dict.fromkeys(VOCAB[i][0] for i in ids))[:3], "en")
                    for ids in t["concept_ids"].to_pylist()]
        emb = text_embeddings(captions, cfg)
        sign = np.array([-1.0 if h % 3 == 0 else 1.0 for h in t["sample_hash"].to_pylist()], np.float32)
        flipped |= {s for s, f in zip(t["sample_id"].to_pylist(), sign) if f < 0}
        emb = (emb * sign[:, None]).astype(np.float16)
        t = t.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]))
        pq.write_table(t, p)
    summary = caption(inp, tmp_path / "o", common + ["caption.min_image_text_similarity=0.5"])
    ledger = read_ledger(Location.parse(str(tmp_path / "o"))).to_arrow().to_pylist()
    assert {r["sample_id"] for r in ledger if r["reason"] == "caption_low_similarity"} == flipped
    assert summary.dropped_by_reason == {"caption_low_similarity": len(flipped)} and flipped
    with pytest.raises(OutputConflict, match="similarity"):  # the threshold is part of the output's identity
        caption(inp, tmp_path / "o", common + ["caption.min_image_text_similarity=0.4"])


def test_concepts_backend_without_concepts_fails_clearly(ingested, tmp_path):
    with pytest.raises(RuntimeError, match=r"lacks columns \['concept_ids'\].*assign output"):
        caption(ingested, tmp_path / "o", [])


def test_vllm_backend_without_vllm_gives_a_clear_message(ingested, tmp_path):
    with pytest.raises(MissingBackend, match=r"pip install 'ovpipe\[gpu\]'"):
        caption(ingested, tmp_path / "o", ['caption.backend="vllm"', 'caption.model="Qwen/Qwen2.5-VL-7B-Instruct"'])


def test_vllm_backend_runs_its_shards_one_at_a_time_in_this_process(ray_address, ingested, tmp_path, monkeypatch):
    """The vLLM engine actors are the parallelism: the caption pass must not fan shards out as Ray
    tasks (a fake engine patched into this process would not be seen by them)."""
    import os

    import curation.caption as cap

    calls = []

    def fake_vllm(sample_ids, images, languages, c, seed):
        calls.append((os.getpid(), len(sample_ids)))
        return [cap.Answer(f"一张编号为{s}的照片，白色背景上有一个红色圆形。" if lang == "zh" else
                           f"A plain photo numbered {s} showing a red circle on a white background.")
                for s, lang in zip(sample_ids, languages)]

    monkeypatch.setattr(cap, "caption_vllm", fake_vllm)
    summary = caption(ingested, tmp_path / "o", ['caption.backend="vllm"', 'caption.model="fake-vl"'])
    shards = sorted((ingested / "data").glob("*.parquet"))
    assert [pid for pid, n in calls if n] == [os.getpid()] * len(shards)  # (n = 0: prepare's probe)
    assert sum(n for _, n in calls) == summary.input_rows == len(input_ids(ingested))
    assert summary.input_rows == summary.kept_rows + summary.dropped_rows
    assert set(summary.dropped_by_reason) <= {"duplicate_caption", "near_duplicate_caption"}


def test_foreign_output_folder_is_refused(ingested, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="not an ovpipe stage output"):
        run_stage(CaptionStage(), str(ingested), str(tmp_path / "o"), load_config(), overwrite=True, quiet=True)
    assert (tmp_path / "o" / "notes.txt").exists()


def test_images_are_sent_as_they_are_unless_over_the_pixel_budget():
    import base64
    import io

    from PIL import Image

    from curation.caption import image_data_url

    def encode(size, fmt):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
        return buf.getvalue()

    small = encode((64, 48), "PNG")
    assert image_data_url(small, 10_000) == "data:image/png;base64," + base64.b64encode(small).decode()
    url = image_data_url(encode((400, 300), "PNG"), 10_000)
    assert url.startswith("data:image/jpeg;base64,")
    resized = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert resized.width * resized.height <= 10_000 and abs(resized.width / resized.height - 4 / 3) < 0.05
    assert image_data_url(encode((64, 48), "BMP"), 10_000).startswith("data:image/jpeg;base64,")
