"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from packing import tokenizer as ptok
from packing.schema import PACK_SCHEMA

# The tiny seeded open_clip model every embed/assign test uses (no download).
TINY_EMBED = ["embed.model=ovpipe-tiny-clip", "embed.pretrained=random", "embed.batch_size=8"]


def data_files(out: Path) -> dict[str, bytes]:
    """Every data and ledger shard of a stage output, by relative path (manifests excluded:
    they hold timings)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))
            if "_manifest" not in p.parts}


# Long captions: over the caption length limits in English and Chinese.
LONG_EN = " ".join(f"object{i} stands near item{i}" for i in range(120))
LONG_ZH = (  # ordinary descriptive prose, about 330 characters
    "这张照片拍摄于一个阳光明媚的下午，画面中央是一座古老的石桥，桥身由灰白色的花岗岩砌成，表面布满了青苔和岁月留下的裂纹。"
    "桥下的河水清澈见底，几条红色的鲤鱼在水草之间缓缓游动，水面倒映着蓝天和白云。河岸左侧种着一排高大的垂柳，细长的枝条随风摆动，"
    "几乎触碰到水面。右侧是一条用鹅卵石铺成的小路，路边摆放着三张木制长椅，其中一张上坐着一位戴草帽的老人，他正低头翻看一本旧书。"
    "远处可以看到几栋白墙黑瓦的传统民居，屋檐下挂着红灯笼，门前晾晒着五颜六色的衣物。天空中有两只燕子掠过，"
    "整个场景显得宁静而富有生活气息。照片的右下角有一块褪色的木牌，上面用毛笔写着“古桥”两个字，字迹已经有些模糊。"
    "画面的色调温暖，光线从左上方照射下来，在桥面和石阶上投下了清晰的阴影，使整体构图层次分明，富有立体感和历史的厚重感。"
)


# ---------------------------------------------------------------- packed shards for the trainer

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 24  # small images keep tests fast


def png(seed: int, w: int, h: int) -> bytes:
    """A seeded random RGB PNG of w x h."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def demo_samples() -> list[dict]:
    """Caption samples (phase 1 / 1.5 shape) and multi-turn instruction samples (phase 2 shape)."""
    return [
        {"id": "s-cap-1", "source": "coyo", "images": [png(1, 90, 60)],
         "conv": [{"from": "human", "value": "<image>\nDescribe the image."},
                  {"from": "gpt", "value": "A red bicycle leaning against a brick wall."}]},
        {"id": "s-text", "source": "text", "images": [],
         "conv": [{"from": "human", "value": "What is 12 + 30?"},
                  {"from": "gpt", "value": "12 + 30 = 42."}]},
        {"id": "s-zh", "source": "laion-cn", "images": [png(2, 50, 120)],
         "conv": [{"from": "human", "value": "<image>\n请描述这张图片。"},
                  {"from": "gpt", "value": "一只猫坐在窗台上，阳光照进来。"}]},
        {"id": "s-multi", "source": "sft", "images": [png(3, 64, 64), png(4, 140, 70)],
         "conv": [{"from": "system", "value": "You are a careful assistant."},
                  {"from": "human", "value": "Compare <image> and <image>."},
                  {"from": "gpt", "value": "The first is square, the second is wide."},
                  {"from": "human", "value": "Which is larger?"},
                  {"from": "gpt", "value": "The second one.\nIt has more pixels."}]},
        {"id": "s-tricky", "source": "coyo", "images": [png(5, 200, 30)],
         "conv": [{"from": "human", "value": "<image>"},
                  {"from": "gpt", "value": "Text that mentions <|im_end|> and  spaces\n\nand lines."}]},
    ]


def pack_rows(groups: list[list[dict]], tok, loss_on: str = "assistant") -> list[dict]:
    rows = []
    for g, samples in enumerate(groups):
        row = {k: [] for k in ("sample_ids", "sample_lens", "input_ids", "loss_mask", "images", "image_hw",
                               "image_sample", "sources", "conversations")}
        for i, s in enumerate(samples):
            hws = []
            for data in s["images"]:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                hws.append(list(ptok.smart_resize(h, w, MIN_PIXELS, MAX_PIXELS)))
            r = ptok.render_sample(s["conv"], hws, tok, loss_on=loss_on)
            row["sample_ids"].append(s["id"])
            row["sample_lens"].append(len(r.input_ids))
            row["input_ids"] += r.input_ids
            row["loss_mask"] += r.loss_mask
            row["images"] += s["images"]
            row["image_hw"] += hws
            row["image_sample"] += [i] * len(hws)
            row["sources"].append(s["source"])
            row["conversations"].append(json.dumps(s["conv"], ensure_ascii=False))
        row["pack_id"] = f"pack-{g}"
        row["num_tokens"] = len(row["input_ids"])
        rows.append(row)
    return rows


def write_test_packs(folder: Path, tok, n_shards: int = 2, packs_per_shard: int = 3,
                     loss_on: str = "assistant") -> list[Path]:
    """Packed Parquet shards of the demo samples (rotated so packs differ)."""
    samples = demo_samples()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    k = 0
    for s in range(n_shards):
        groups = []
        for _ in range(packs_per_shard):
            rot = samples[k % len(samples):] + samples[:k % len(samples)]
            groups.append(rot[: 2 + k % 3])
            k += 1
        rows = pack_rows(groups, tok, loss_on)
        for j, r in enumerate(rows):
            r["pack_id"] = f"shard{s}-pack{j}"
        path = folder / f"packs-{s:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=PACK_SCHEMA), path)
        paths.append(path)
    return paths
