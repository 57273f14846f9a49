"""Ingest readers (Parquet bytes/paths, img2dataset, WebDataset tars, image folders), untrusted
image kinds, and exact dedup across sources, shards and runs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
from PIL import Image

from curation.ingest import INGEST_SCHEMA, IngestStage
from ovpipe.config import load_config
from ovpipe.core.images import BadImage, fetch_image_bytes, probe_image, to_rgb
from ovpipe.core.stage import run_stage
from tests.helpers import data_files


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def jpeg(w: int, h: int, seed: int) -> bytes:
    return encode(rgb(w, h, seed), "JPEG", quality=80)


def ingest(raw, out, *overrides, executor="local"):
    cfg = load_config(overrides=[f"run.executor={executor!r}", *overrides])
    return run_stage(IngestStage(), str(raw), str(out), cfg, quiet=True)


def kept_and_ledger(out: Path) -> tuple[pa.Table, pa.Table]:
    kept = pq.read_table(out, schema=INGEST_SCHEMA)
    ledger_dir = out / "_ledger"
    ledger = pq.read_table(ledger_dir) if ledger_dir.exists() else pa.table({"reason": pa.array([], pa.string())})
    return kept, ledger


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------ readers


def test_parquet_with_image_paths_relative_and_absolute(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imgs").mkdir(parents=True)
    (raw / "imgs" / "a.jpg").write_bytes(jpeg(40, 30, 1))
    (tmp_path / "b.png").write_bytes(encode(rgb(20, 50, 2), "PNG"))
    pq.write_table(pa.table({"image_path": ["imgs/a.jpg", str(tmp_path / "b.png"), "imgs/missing.jpg", None],
                             "caption": ["a", "b", "c", "d"]}), raw / "paths.parquet")
    summary = ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert kept["width"].to_pylist() == [40, 20] and kept["height"].to_pylist() == [30, 50]
    assert kept["text"].to_pylist() == ["a", "b"]
    assert sorted(ledger["reason"].to_pylist()) == ["missing_image", "unreadable_path"]
    assert summary.input_rows == 4 == summary.kept_rows + summary.dropped_rows
    # the reference points at the image file itself
    assert [xxhash.xxh3_64_hexdigest(b) for b in fetch_image_bytes(kept)] == kept["sample_id"].to_pylist()


def test_img2dataset_parquet_as_it_comes(tmp_path):
    """img2dataset's parquet output: jpg bytes, caption, key, status, error_message."""
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({
        "jpg": pa.array([jpeg(32, 32, 3), None], pa.binary()),
        "caption": ["a cat", "a dog"], "key": ["000000000", "000000001"], "url": ["http://x/1", "http://x/2"],
        "status": ["success", "failed_to_download"], "error_message": [None, "HTTP Error 404"],
        "width": [32, None], "height": [32, None],
    }), raw / "00000.parquet")
    ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert kept["input_key"].to_pylist() == ["000000000"] and kept["text"].to_pylist() == ["a cat"]
    assert kept["image_member"].to_pylist() == ["jpg"]
    assert ledger["reason"].to_pylist() == ["missing_image"]
    assert "failed_to_download" in ledger["detail"][0].as_py() and "404" in ledger["detail"][0].as_py()


def test_webdataset_tar_img2dataset_layout(tmp_path):
    """img2dataset's webdataset output: NNNNN.tar with key.jpg/.txt/.json, plus a sidecar
    NNNNN.parquet of metadata that is not a shard."""
    raw = tmp_path / "raw"
    raw.mkdir()
    a, b = jpeg(64, 48, 4), encode(rgb(30, 30, 5), "WEBP")
    write_tar(raw / "00000.tar", [
        ("000000000.jpg", a), ("000000000.txt", "a red bus".encode()),
        ("000000000.json", json.dumps({"key": "000000000", "license": "cc0"}).encode()),
        ("000000001.webp", b), ("000000001.json", json.dumps({"caption": "一只猫"}).encode()),
        ("000000002.txt", b"caption without an image"),
    ])
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), raw / "00000.parquet")
    summary = ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert summary.shards == 1  # the sidecar parquet is not read as a shard
    assert kept["text"].to_pylist() == ["a red bus", "一只猫"]
    assert kept["license"].to_pylist() == ["cc0", None]
    assert kept["format"].to_pylist() == ["JPEG", "WEBP"]
    assert kept["image_member"].to_pylist() == ["000000000.jpg", "000000001.webp"]
    assert ledger["reason"].to_pylist() == ["missing_image"]
    assert fetch_image_bytes(kept) == [a, b]  # fetched back by (tar, member)


@pytest.mark.parametrize("cut", ["inside_a_member", "at_a_member_boundary"])
def test_truncated_tar_keeps_what_was_read_and_ledgers_the_break(tmp_path, cut):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tar(tmp_path / "full.tar", [(f"{i:03d}.jpg", jpeg(64, 64, i)) for i in range(4)])
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + 100 if cut == "inside_a_member" else last.offset
    (raw / "cut.tar").write_bytes(data[:end])
    summary = ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert kept.num_rows == 3
    assert ledger["reason"].to_pylist() == ["unreadable_shard"]
    assert summary.input_rows == kept.num_rows + ledger.num_rows


def test_image_folder_with_sidecar_captions(tmp_path):
    raw = tmp_path / "photos"
    (raw / "trip").mkdir(parents=True)
    (raw / "trip" / "b.jpg").write_bytes(jpeg(50, 40, 6))
    (raw / "trip" / "b.txt").write_text("  a beach at dusk \n", encoding="utf-8")
    (raw / "trip" / "a.png").write_bytes(encode(rgb(10, 12, 7), "PNG"))
    (raw / "trip" / "c.jpg").write_bytes(b"")
    (raw / "trip" / "notes.md").write_text("not an image")
    summary = ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert summary.shards == 1 and summary.input_rows == 3
    assert kept["input_key"].to_pylist() == ["a", "b"]
    assert kept["text"].to_pylist() == [None, "a beach at dusk"]
    assert kept["source"].to_pylist() == ["trip", "trip"]
    assert ledger["reason"].to_pylist() == ["empty_image"]
    assert [xxhash.xxh3_64_hexdigest(b) for b in fetch_image_bytes(kept)] == kept["sample_id"].to_pylist()


# ------------------------------------------------------------------------------ untrusted images


def _exif_rotated_jpeg() -> bytes:
    img = rgb(60, 20, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return encode(img, "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((16, 16, 3), 80 * i, np.uint8)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


KEPT_KINDS = {  # name: (bytes, expected (width, height, mode, frames))
    "cmyk": (lambda: encode(Image.new("CMYK", (30, 20), (0, 128, 128, 0)), "JPEG"), (30, 20, "CMYK", 1)),
    "png16": (lambda: encode(Image.fromarray(np.full((12, 18), 40000, np.uint16)), "PNG"), (18, 12, "I;16", 1)),
    "palette": (lambda: encode(rgb(25, 15, 9).convert("P"), "PNG"), (25, 15, "P", 1)),
    "alpha": (lambda: encode(Image.new("RGBA", (14, 22), (255, 0, 0, 100)), "PNG"), (14, 22, "RGBA", 1)),
    "animated": (_animated_gif, (16, 16, "P", 3)),
    "exif_rotated": (_exif_rotated_jpeg, (20, 60, "RGB", 1)),
}


@pytest.mark.parametrize("kind", sorted(KEPT_KINDS))
def test_unusual_images_are_kept_with_correct_metadata(kind):
    make, (w, h, mode, frames) = KEPT_KINDS[kind]
    info = probe_image(make(), 10**7, 10**8)
    assert (info.width, info.height, info.mode, info.frames) == (w, h, mode, frames)
    # and later stages can turn each into RGB pixels of the oriented size
    assert to_rgb(Image.open(io.BytesIO(make()))).size == (w, h)


BAD_KINDS = {  # name: (bytes, ledger reason)
    "zero_bytes": (lambda: b"", "empty_image"),
    "not_an_image": (lambda: b"<html>404 not found</html>", "not_an_image"),
    "corrupt_header": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt_image"),
    "truncated_jpeg": (lambda: jpeg(80, 80, 10)[:600], "truncated_image"),
    "truncated_png": (lambda: encode(rgb(80, 80, 11), "PNG")[:900], "truncated_image"),
    "decompression_bomb": (lambda: encode(Image.new("1", (12_000, 12_000)), "PNG", optimize=True), "too_many_pixels"),
    "too_many_bytes": (lambda: jpeg(64, 64, 12), "image_too_large"),
}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_images_get_their_reason(kind):
    make, reason = BAD_KINDS[kind]
    with pytest.raises(BadImage) as err:
        probe_image(make(), max_bytes=1000 if kind == "too_many_bytes" else 10**7, max_pixels=89_478_485)
    assert err.value.reason == reason


def test_jpeg_with_trailing_bytes_is_not_called_truncated():
    data = jpeg(40, 40, 13) + b"TRAILER-FROM-A-PHONE" * 10
    assert probe_image(data, 10**7, 10**8).width == 40


def test_decode_mode_is_strict_and_agrees_on_good_images():
    good = jpeg(40, 40, 14)
    assert probe_image(good, 10**7, 10**8, verify="decode").width == 40
    with pytest.raises(BadImage):
        probe_image(good[: len(good) // 2], 10**7, 10**8, verify="decode")


def test_every_bad_kind_is_ledgered_never_fatal(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    images = [make() for make, _ in BAD_KINDS.values()] + [jpeg(30, 30, 15)]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), raw / "bad.parquet")
    summary = ingest(raw, tmp_path / "out", "ingest.max_image_bytes=20000")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    # too_many_bytes (a few KB) is under this run's 20 KB limit, so it is kept with the good one
    assert kept.num_rows == 2 and summary.input_rows == len(images) == kept.num_rows + ledger.num_rows
    assert {"empty_image", "not_an_image", "corrupt_image", "truncated_image", "too_many_pixels"} <= set(
        ledger["reason"].to_pylist())


# ------------------------------------------------------------------------------ dedup


def _source_shards(root: Path, shards: dict[str, list[bytes]]) -> None:
    for rel, images in shards.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()),
                                 "key": [f"{rel}-{i}" for i in range(len(images))]}), path)


def test_duplicates_across_sources_and_shards_keep_one_with_a_pointer(ray_address, tmp_path):
    a, b, c, d = (jpeg(32, 32, 20 + i) for i in range(4))
    raw = tmp_path / "raw"
    _source_shards(raw, {"coyo/p0.parquet": [a, b, a], "coyo/p1.parquet": [c, b],
                         "laion/p0.parquet": [d, a, c]})
    summary = ingest(raw, tmp_path / "out", executor="ray")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert sorted(kept["sample_id"].to_pylist()) == sorted(xxhash.xxh3_64_hexdigest(x) for x in (a, b, c, d))
    # winners: smallest (shard name, row)
    winners = dict(zip(kept["sample_id"].to_pylist(), kept["input_key"].to_pylist()))
    assert winners[xxhash.xxh3_64_hexdigest(a)] == "coyo/p0.parquet-0"
    assert winners[xxhash.xxh3_64_hexdigest(c)] == "coyo/p1.parquet-0"
    assert ledger["reason"].to_pylist() == ["duplicate"] * 4
    assert summary.input_rows == 8 == kept.num_rows + ledger.num_rows
    detail = dict(zip(ledger["locator"].to_pylist(), ledger["detail"].to_pylist()))
    assert "coyo/p0.parquet row 0" in detail[f"{raw / 'laion/p0.parquet'}#row=1"]


def test_dedup_is_identical_with_ray_and_in_process_and_any_partitioning(ray_address, tmp_path):
    imgs = [jpeg(24, 24, 30 + i) for i in range(6)]
    raw = tmp_path / "raw"
    _source_shards(raw, {f"s/p{i}.parquet": [imgs[(i * 3 + j) % 6] for j in range(4)] for i in range(5)})
    ingest(raw, tmp_path / "local", "ingest.dedup_partitions=1")
    ingest(raw, tmp_path / "ray", "ingest.dedup_partitions=7", "run.workers=2", executor="ray")
    assert data_files(tmp_path / "local") == data_files(tmp_path / "ray")


def test_incremental_run_keeps_earlier_rows_and_ingests_only_new_shards(tmp_path):
    imgs = [jpeg(24, 24, 40 + i) for i in range(8)]
    raw = tmp_path / "raw"
    _source_shards(raw, {"s/p1.parquet": imgs[0:3], "s/p2.parquet": imgs[3:5], "s/p3.parquet": [imgs[5]]})
    first = ingest(raw, tmp_path / "out")
    before = data_files(tmp_path / "out")
    # new shards arrive; one sorts *before* the old ones and repeats an image kept by run 1
    _source_shards(raw, {"s/p0.parquet": [imgs[1], imgs[6]], "s/p4.parquet": [imgs[7], imgs[3]]})
    second = ingest(raw, tmp_path / "out")
    after = data_files(tmp_path / "out")
    assert second.shards_skipped == 3 and first.shards == 3 and second.shards == 5
    assert {k: v for k, v in after.items() if k in before} == before  # run 1's rows unchanged
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert sorted(kept["sample_id"].to_pylist()) == sorted(xxhash.xxh3_64_hexdigest(x) for x in imgs)
    assert ledger["reason"].to_pylist() == ["duplicate", "duplicate"]
    details = ledger["detail"].to_pylist()
    assert "s/p1.parquet row 1" in details[0] and "s/p2.parquet row 0" in details[1]  # run 1's rows won
    assert second.input_rows == 10 == second.kept_rows + second.dropped_rows


# ------------------------------------------------------------------- hostile inputs (review)


def test_corrupt_member_header_mid_tar_is_ledgered_not_a_silent_end(tmp_path):
    """tarfile stops quietly at a header it cannot parse; the samples after it must not vanish."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tar(tmp_path / "t.tar", [(f"{i:05d}.jpg", jpeg(32, 32, i)) for i in range(6)])
    data = bytearray((tmp_path / "t.tar").read_bytes())
    data[data.find(b"00003.jpg")] ^= 0x01  # member 3's header checksum is now wrong
    (raw / "t.tar").write_bytes(bytes(data))
    summary = ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert kept["input_key"].to_pylist() == ["00000", "00001", "00002"]
    assert ledger["reason"].to_pylist() == ["unreadable_shard"]
    assert "header" in ledger["detail"][0].as_py()
    assert summary.input_rows == kept.num_rows + ledger.num_rows


def test_absurdly_nested_json_member_and_long_txt_do_not_fail_or_drop(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tar(raw / "t.tar", [("a.jpg", jpeg(32, 32, 1)), ("a.json", b"[" * 200_000),
                              ("b.jpg", jpeg(32, 32, 2)), ("b.txt", b"x" * 100_000)])
    ingest(raw, tmp_path / "out", "ingest.max_text_bytes=1000")
    kept, _ = kept_and_ledger(tmp_path / "out")
    assert kept["input_key"].to_pylist() == ["a", "b"]
    assert kept["text"].to_pylist() == [None, "x" * 1000]  # cut, not dropped


def test_path_with_an_unknown_scheme_is_a_ledger_row(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imgs").mkdir(parents=True)
    (raw / "imgs" / "a.jpg").write_bytes(jpeg(32, 32, 1))
    pq.write_table(pa.table({"image_path": ["imgs/a.jpg", "nosuch://bucket/1.jpg"]}), raw / "p.parquet")
    summary = ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert kept.num_rows == 1 and ledger["reason"].to_pylist() == ["unreadable_path"]
    assert "nosuch://" in ledger["detail"][0].as_py() and summary.input_rows == 2


@pytest.mark.parametrize("column", [pa.array([1, 2]), pa.array([[b"x"], [b"y"]]),
                                    pa.array([{"path": "a"}, {"path": "b"}])], ids=["int", "list", "struct"])
def test_image_column_of_the_wrong_type_is_a_clear_error(tmp_path, column):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"image": column}), raw / "s.parquet")
    with pytest.raises(RuntimeError, match=r"column 'image' is .*not binary.*ingest\.image_columns"):
        ingest(raw, tmp_path / "out")


def test_only_the_supported_formats_are_ever_parsed():
    """EPS would hand the bytes to Ghostscript; PPM, ICO and the like are simply not accepted."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (eps, encode(rgb(16, 16, 1), "PPM"), encode(rgb(16, 16, 1), "ICO")):
        with pytest.raises(BadImage) as bad:
            probe_image(data, 1 << 20, 1 << 20)
        assert bad.value.reason == "not_an_image" and "JPEG" in bad.value.detail


def test_a_bomb_on_a_later_tiff_page_is_refused():
    pages = [Image.new("L", (64, 64)), Image.new("L", (3000, 3000))]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")
    with pytest.raises(BadImage) as bad:
        probe_image(buf.getvalue(), 1 << 24, 1_000_000)
    assert bad.value.reason == "too_many_pixels" and "frame 1" in bad.value.detail


def test_fetch_by_reference_checks_identity_size_and_the_first_tar_member(tmp_path):
    a, b, c = jpeg(32, 32, 1), jpeg(32, 32, 2), jpeg(32, 32, 3)
    write_tar(tmp_path / "t.tar", [("a.jpg", a), ("b.jpg", b), ("a.jpg", c)])  # "a.jpg" twice
    (tmp_path / "f.jpg").write_bytes(a)
    refs = pa.table({"sample_id": [xxhash.xxh3_64_hexdigest(x) for x in (a, b, a, a)],
                     "image_uri": [str(tmp_path / "t.tar")] * 2 + [str(tmp_path / "f.jpg"), str(tmp_path / "gone.jpg")],
                     "image_member": ["a.jpg", "b.jpg", None, None], "image_row": pa.array([None] * 4, pa.int64())})
    problems: dict = {}
    assert fetch_image_bytes(refs, problems=problems) == [a, b, a, None]  # the first a.jpg, as ingest read it
    assert problems[3][0] == "image_not_found" and set(problems) == {3}
    (tmp_path / "f.jpg").write_bytes(c)  # replaced after ingest
    problems = {}
    assert fetch_image_bytes(refs, problems=problems)[2] is None
    assert problems[2][0] == "image_changed"
    problems = {}
    assert fetch_image_bytes(refs.slice(0, 2), problems=problems, max_bytes=len(a) - 1)[0] is None
    assert problems[0][0] == "image_too_large"


def test_a_shard_unreadable_during_dedup_is_failed_then_retried_not_committed_unchecked(tmp_path, monkeypatch):
    """If the dedup pass cannot read a shard (a transient error), its duplicates are unknown:
    that shard must fail this run (and commit on the next), never commit with duplicates in."""
    import curation.ingest as ingest_mod

    raw = tmp_path / "raw"
    _source_shards(raw, {"a/0.parquet": [jpeg(32, 32, 1)], "a/1.parquet": [jpeg(32, 32, 1), jpeg(32, 32, 2)]})
    real = ingest_mod._parquet_image_hashes

    def flaky(shard, cfg):
        if shard.path.endswith("1.parquet"):
            raise OSError("connection reset")
        return real(shard, cfg)

    monkeypatch.setattr(ingest_mod, "_parquet_image_hashes", flaky)
    with pytest.raises(RuntimeError, match="could not be read during the dedup pass"):
        ingest(raw, tmp_path / "out")
    monkeypatch.setattr(ingest_mod, "_parquet_image_hashes", real)
    ingest(raw, tmp_path / "out")
    kept, ledger = kept_and_ledger(tmp_path / "out")
    assert kept.num_rows == 2 and ledger["reason"].to_pylist() == ["duplicate"]
