"""Embed stage with a tiny seeded open_clip model: on a Ray Data actor pool and in-process."""

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
import torch
from PIL import Image

from curation.embed import (
    EMBEDDING,
    Embedder,
    ModelSpec,
    decode_image,
    forward_padded,
    load_model,
    preprocess_config,
    split_transform,
    to_model_input,
)
from ovpipe.config import load_config
from ovpipe.core.images import fetch_image_bytes
from ovpipe.core.shards import read_manifest_entries, Location
from ovpipe.core.stage import run_stage
from tests.conftest import python_exe, sigkill_after_commits, subprocess_env
from tests.helpers import TINY_EMBED as TINY

SPEC = ModelSpec("ovpipe-tiny-clip", "random", 0, "auto")


def data_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))
            if "_manifest" not in p.parts}


def _png(seed: int, w: int = 50, h: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def embed_input(demo_ingested, tmp_path_factory) -> Path:
    """Ingested demo shards plus one shard of bad references: a missing file, a row past the end
    of its container, and bytes that look like a JPEG but do not decode."""
    root = tmp_path_factory.mktemp("embed")
    src = root / "input"
    src.mkdir()
    entries = read_manifest_entries(Location.parse(str(demo_ingested)))
    for e in entries.values():
        shutil.copy(demo_ingested / e["output"], src / Path(e["output"]).name)
    good = pq.read_table(src / sorted(os.listdir(src))[0]).slice(0, 2)
    garbage = root / "garbage.parquet"
    pq.write_table(pa.table({"image": [b"\xff\xd8\xff\xe0" + b"\x00" * 64]}), garbage)
    bad = pa.concat_tables([good] * 3).to_pydict()
    bad["image_uri"][2] = str(root / "nope.parquet")  # missing file
    bad["image_row"][3] = 999  # past the end of its container
    bad["image_uri"][4], bad["image_member"][4], bad["image_row"][4] = str(garbage), "image", 0
    bad["sample_id"][4] = xxhash.xxh3_64_hexdigest(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # as ingest would name it
    pq.write_table(pa.Table.from_pydict(bad, schema=good.schema), src / "zz_bad.parquet")
    return src


@pytest.fixture(scope="module")
def embedded(embed_input, tmp_path_factory) -> dict[str, Path]:
    """The same input embedded twice: on a Ray Data pool of 2 actors with 7-image blocks, and
    in-process (run.executor = local, 64-image blocks)."""
    root = tmp_path_factory.mktemp("embedded")
    ray_cfg = load_config(overrides=TINY + ["embed.pool_size=2", "embed.num_cpus_per_actor=0.5",
                                            "embed.decode_rows=7"])
    summary = run_stage(_stage(), str(embed_input), str(root / "ray"), ray_cfg, quiet=True)
    local_cfg = load_config(overrides=TINY + ["run.executor=local"])
    run_stage(_stage(), str(embed_input), str(root / "local"), local_cfg, quiet=True)
    return {"ray": root / "ray", "local": root / "local", "summary": summary}


def _stage():
    from curation.embed import EmbedStage

    return EmbedStage()


def test_output_schema_accounting_and_ledger(embedded, embed_input):
    summary = embedded["summary"]
    inputs = sum(pq.read_metadata(p).num_rows for p in embed_input.glob("*.parquet"))
    assert summary.input_rows == inputs == summary.kept_rows + summary.dropped_rows
    assert summary.dropped_by_reason == {"corrupt_image": 1, "image_not_found": 2}
    ledger = pq.read_table(embedded["ray"] / "_ledger" / "zz_bad.parquet").to_pydict()
    assert ledger["stage"] == ["embed"] * 3 and [loc.rsplit("#", 1)[1] for loc in ledger["locator"]] == \
        ["row=2", "row=3", "row=4"]
    kept = pq.read_table(embedded["ray"] / "data" / "zz_bad.parquet")
    assert kept.num_rows == 3
    field = kept.schema.field(EMBEDDING)
    assert field.type == pa.list_(pa.float16(), 64) and not field.nullable
    vecs = np.asarray(kept[EMBEDDING].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      np.float32).reshape(-1, 64)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)


def test_embedding_independent_of_batch_composition_and_worker_count(embedded):
    """2 actors and 7-image blocks vs one in-process model and 64-image blocks: the same bytes."""
    ray_files, local_files = data_files(embedded["ray"]), data_files(embedded["local"])
    assert len(ray_files) == 11 + 1 and ray_files == local_files


def test_stage_embeddings_equal_the_model_on_its_own_preprocessing(embedded):
    """The stage's split preprocessing + padded batches give what open_clip's own transform and a
    one-image forward give (fp32 on CPU; compared after the float16 cast)."""
    table = pq.read_table(sorted((embedded["ray"] / "data").glob("*.parquet"))[0])
    import open_clip

    model = load_model(SPEC)
    _, _, preprocess = open_clip.create_model_and_transforms("ovpipe-tiny-clip", pretrained=None)
    images = fetch_image_bytes(table)
    got = np.asarray(table[EMBEDDING].combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(-1, 64)
    for i, data in enumerate(images[:4]):
        with Image.open(io.BytesIO(data)) as img:
            x = preprocess(img.convert("RGB"))[None]
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1).half().numpy()[0]
        assert np.abs(ref.astype(np.float32) - got[i].astype(np.float32)).max() <= 1e-3


def test_split_preprocessing_is_the_model_transform_exactly():
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("ovpipe-tiny-clip", pretrained=None)
    pp = preprocess_config(SPEC)
    pil, mean, std = split_transform(pp)
    for seed, (w, h) in enumerate([(50, 40), (31, 77), (200, 33)]):
        data = _png(seed, w, h)
        ours = to_model_input(decode_image(data, pil, 10**8)[None], mean, std)[0]
        with Image.open(io.BytesIO(data)) as img:
            theirs = preprocess(img.convert("RGB"))
        assert torch.equal(ours, theirs)


def test_padded_batches_make_rows_independent_of_batch_mates():
    embedder = Embedder(SPEC, batch_size=8)
    pil, _, _ = split_transform(preprocess_config(SPEC))
    pixels = np.stack([decode_image(_png(s), pil, 10**8) for s in range(13)])
    all_at_once = embedder.embed(pixels)
    order = np.random.default_rng(0).permutation(13)
    shuffled = np.concatenate([embedder.embed(pixels[order[i:i + 3]]) for i in range(0, 13, 3)])
    back = np.empty_like(shuffled)
    back[order] = shuffled
    alone = np.concatenate([embedder.embed(pixels[i:i + 1]) for i in range(13)])
    assert np.array_equal(all_at_once, back) and np.array_equal(all_at_once, alone)


def test_oom_halves_the_batch_and_retries_the_same_rows():
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(x) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return x * 2

    x = torch.arange(11, dtype=torch.float32)[:, None]
    halved = []
    out, batch = forward_padded(forward, x, 16, on_oom=halved.append)
    assert torch.equal(out, x * 2) and batch == 4 and halved == [8, 4]
    assert calls == [16, 8, 4, 4, 4]  # every pass is padded to the current batch size


def test_bad_bytes_are_ledger_reasons_not_crashes():
    pil, _, _ = split_transform(preprocess_config(SPEC))
    from ovpipe.core.images import BadImage

    for data, reason in [(None, "image_not_found"), (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "corrupt_image"),
                         (_png(1)[:60], "truncated_image")]:
        with pytest.raises(BadImage) as err:
            decode_image(data, pil, 10**8)
        assert err.value.reason == reason


def test_model_identity_distinguishes_seeds_and_names():
    a = ModelSpec("ovpipe-tiny-clip", "random", 0).identity()
    b = ModelSpec("ovpipe-tiny-clip", "random", 1).identity()
    c = ModelSpec("ViT-B-32", "random", 0).identity()
    assert len({str(a), str(b), str(c)}) == 3
    prod = ModelSpec("ViT-H-14-quickgelu", "metaclip_fullcc")
    assert prod.identity()["weights"].startswith("tag:metaclip_fullcc:")  # no download needed
    assert preprocess_config(prod)["size"] == [224, 224]
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        ModelSpec("ViT-H-14-quickgelu", "no-such-tag").identity()


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_is_byte_identical(embedded, embed_input, ray_address, tmp_path):
    out = tmp_path / "killed"
    cmd = [python_exe(), "-m", "ray_jobs.embed", "--input", str(embed_input), "--output", str(out),
           "--model", "ovpipe-tiny-clip", "--pretrained", "random", "--batch-size", "8", "--quiet"]
    env = subprocess_env(ray_address, OVPIPE_FAULT_SHARD_DELAY_S="1.5")
    manifest = out / "_manifest"
    committed = len(sigkill_after_commits(cmd, env, manifest, at_least=2, timeout_s=300))
    assert 2 <= committed < 12, "the kill must land mid-stage"
    time.sleep(1.0)
    resumed = run_stage(_stage(), str(embed_input), str(out), load_config(overrides=TINY), quiet=True)
    assert resumed.shards_skipped >= 2 and resumed.input_rows == embedded["summary"].input_rows
    assert data_files(out) == data_files(embedded["ray"])
