"""Embed stage: one L2-normalised float16 open_clip image embedding per sample, on a Ray Data
actor pool.

Reads:  ingest output (``curation.ingest.INGEST_SCHEMA``; needs ``sample_id`` and the image
        reference ``image_uri`` / ``image_member`` / ``image_row``). Image bytes are fetched by
        reference (``ovpipe.core.images.fetch_image_bytes``).
Writes: ``OUT/<shard>.parquet``: the input row + ``embedding`` fixed_size_list<float16, D>
        (D = the model's embed dim: 1024 for MetaCLIP-H/14); ledger rows (stage ``embed``) for
        images that cannot be fetched or decoded (``image_not_found``, ``corrupt_image``, and
        ``probe_image``'s reasons).

Model: open_clip name + pretrained tag, local checkpoint or ``random`` (seeded init; tests, demo,
benchmarks). Production default: ``ViT-H-14-quickgelu`` + ``metaclip_fullcc``
(MetaCLIP-H/14-Full-CC2.5B). Preprocessing is the model's own open_clip transform, split in two:
the PIL part (resize, crop, RGB) runs in CPU decode tasks, ToTensor + Normalize on the actor.

How it runs (docs/architecture.md): pending input shards -> Ray Data ``from_items`` -> decode
tasks (CPU; fetch + decode a shard, or a group of shards when there are more than
``DECODE_TASKS_PER_CPU`` per cluster CPU; yield blocks of ``decode_rows`` images) -> ``EmbedActor``
pool (GPU when the cluster has GPUs, CPU otherwise; each actor writes its rows of a shard to a
part file ``OUT/_tmp/embed-parts/<run>/<shard index>-<first row>.arrow`` and hands on one small
record) -> the driver counts each shard's rows (no embedding reaches it) -> once a shard is
complete, a ``Committer`` actor (one per node; the run's tasks reach it once, and each call names only
the shards completed by one block and their parts) assembles its parts and commits it (data, ledger,
manifest entry last) with ``ovpipe.core.stage.commit_shard``, then deletes the parts. Every forward pass is padded to ``batch_size`` rows: with a fixed GEMM
shape, an image's embedding on CPU is bit-identical whatever its batch-mates or the pool size.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image, ImageOps

from curation import thumbnail
from curation.config import EmbedSection
from ovpipe.core.images import BadImage, fetch_image_bytes, open_image, probe_image
from ovpipe.core.executor import ensure_ray, uses_ray
from ovpipe.core.ledger import Ledger
from ovpipe.core.progress import Progress
from ovpipe.core.shards import TMP_DIR, Location, read_table
from ovpipe.core.stage import PassContext, Shard, ShardOutput, ShardTask, SinglePassStage, commit_shard

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

EMBEDDING = "embedding"
REF_COLUMNS = ["sample_id", "image_uri", "image_member", "image_row"]
RANDOM = "random"
# Tiny open_clip configs (no weights anywhere: always `pretrained = "random"`), for tests and demo.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "ovpipe-tiny-clip": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
_MAX_ENCODED_BYTES = 1 << 31  # ingest already bounded encoded sizes; this only guards probe_image
DECODE_TASK_MEMORY = 1 << 30  # bytes reserved per decode task
# Decode tasks per cluster CPU: a run has at most this many per CPU (shards are grouped when there
# are more), so Ray Data's per-task and per-block cost on the driver grows with the cluster, not
# with the number of shards; several per CPU keep the load balanced.
DECODE_TASKS_PER_CPU = 4
_SHARD_MARKER = -1  # `row` of a shard-level marker (empty shard, or a shard that failed to load)


# ---------------------------------------------------------------------------------------- model


def register_tiny_models() -> None:
    """Make the TINY_MODELS configs known to open_clip by name (idempotent, no network)."""
    import open_clip

    missing = {n: c for n, c in TINY_MODELS.items() if open_clip.get_model_config(n) is None}
    if missing:  # open_clip reads the files when they are added and keeps the configs in memory
        with tempfile.TemporaryDirectory(prefix="ovpipe-openclip-configs-") as folder:
            for name, cfg in missing.items():
                with open(os.path.join(folder, f"{name}.json"), "w") as f:
                    json.dump(cfg, f)
            open_clip.add_model_config(folder)


_file_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """xxh3-64 of a file's bytes (streamed), memoised per (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        h = xxhash.xxh3_64()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        _file_digests[key] = h.hexdigest()
    return _file_digests[key]


@dataclass(frozen=True)
class ModelSpec:
    """Which open_clip model and weights; picklable, so it travels to actors."""

    name: str
    pretrained: str
    init_seed: int = 0
    precision: str = "auto"

    @classmethod
    def from_config(cls, cfg: EmbedSection) -> "ModelSpec":
        return cls(cfg.model, cfg.pretrained, cfg.init_seed, cfg.precision)

    @property
    def is_random(self) -> bool:
        return self.pretrained == RANDOM

    @property
    def is_file(self) -> bool:
        return not self.is_random and os.path.isfile(self.pretrained)

    def model_config(self) -> dict[str, Any]:
        import open_clip

        if self.name == thumbnail.NAME:  # the built-in stand-in (curation/thumbnail.py): no weights
            if not self.is_random:
                raise ValueError(f"embed.model {thumbnail.NAME!r} has no weights: set embed.pretrained=random")
            return thumbnail.CONFIG
        if ":" in self.name:
            raise ValueError(f"embed.model {self.name!r}: hf-hub:/local-dir: models are not supported; "
                             "use an open_clip model name with a pretrained tag or a local checkpoint file")
        register_tiny_models()
        cfg = open_clip.get_model_config(self.name)
        if cfg is None:
            raise ValueError(f"embed.model {self.name!r} is not an open_clip model name nor one of "
                             f"{sorted(TINY_MODELS)}; see open_clip.list_models()")
        return cfg

    def weights_identity(self) -> str:
        """What identifies the weights: the seed for random init, the content hash of a local
        checkpoint, or the tag plus where open_clip gets it from."""
        import open_clip

        if self.is_random:
            return f"random:seed={self.init_seed}"
        if self.is_file:
            return f"file:xxh3={file_digest(self.pretrained)}"
        tag = open_clip.get_pretrained_cfg(self.name, self.pretrained)
        if not tag:
            raise ValueError(
                f"embed.pretrained {self.pretrained!r} is neither a file nor an open_clip tag of "
                f"{self.name!r} (tags: {open_clip.list_pretrained_tags_by_model(self.name)}); "
                "use 'random' for a seeded random init")
        return f"tag:{self.pretrained}:{tag.get('hf_hub') or tag.get('url')}"

    def identity(self) -> dict[str, Any]:
        """Model identity for config hashes and concept-cache keys."""
        text = json.dumps(self.model_config(), sort_keys=True)
        return {"model": self.name, "weights": self.weights_identity(), "precision": self.precision,
                "model_config": xxhash.xxh3_64_hexdigest(text.encode())}

    def resolve_precision(self, device: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if device.startswith("cuda") else "fp32"


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(setting: str) -> str:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no CUDA device here; use 'auto' or 'cpu'")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def load_model(spec: ModelSpec, device: str = "cpu"):
    """The open_clip model in eval mode on `device` in the spec's precision. Random init is seeded
    and made on CPU in fp32, so every worker and device starts from the same weights."""
    import open_clip
    import torch

    spec.model_config()  # validates the name, registers the tiny configs
    if spec.name == thumbnail.NAME:
        return thumbnail.build_model(spec.init_seed).to(device=device, dtype=getattr(
            torch, _DTYPES[spec.resolve_precision(device)])).eval()
    with torch.random.fork_rng(devices=[]), _quiet_logging(spec.is_random):
        torch.manual_seed(spec.init_seed)
        pretrained = None if spec.is_random else spec.pretrained
        model = open_clip.create_model(spec.name, pretrained=pretrained, device="cpu")
    dtype = getattr(torch, _DTYPES[spec.resolve_precision(device)])
    return model.to(device=device, dtype=dtype).eval()


@contextlib.contextmanager
def _quiet_logging(on: bool):
    """open_clip warns 'initialized randomly' on the root logger; for `random` that is the point."""
    import logging

    root = logging.getLogger()
    level = root.level
    if on:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def preprocess_config(spec: ModelSpec) -> dict[str, Any]:
    """open_clip's eval preprocessing settings for this model, computed without loading it (the
    same merge open_clip's create_model does: defaults, then the pretrained tag, then the size of
    the vision tower). EmbedActor checks it against the loaded model's own."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if spec.name == thumbnail.NAME:
        return _normalised_pp(thumbnail.preprocess_cfg(spec.model_config()))
    cfg = asdict(PreprocessCfg())
    if not spec.is_random and not spec.is_file:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or {})
    size = spec.model_config()["vision_cfg"]["image_size"]
    cfg["size"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return _normalised_pp(cfg)


def _normalised_pp(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    size = out["size"]
    out["size"] = list(size) if isinstance(size, (list, tuple)) else [size, size]
    out["mean"], out["std"] = [float(v) for v in out["mean"]], [float(v) for v in out["std"]]
    return out


def split_transform(pp: dict[str, Any]) -> tuple[Callable, np.ndarray, np.ndarray]:
    """The model's own eval transform split at ToTensor: (PIL part, mean, std). The tensor part
    (ToTensor: /255, Normalize: (x - mean) / std) runs batched on the actor (``to_model_input``)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize

    cfg = dict(pp, size=tuple(pp["size"]))
    steps = image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms
    cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    tail = steps[cut:]
    if len(tail) != 2 or not isinstance(tail[1], Normalize):
        raise RuntimeError(f"unexpected open_clip transform tail {tail}; cannot batch its tensor part")
    return Compose(steps[:cut]), np.asarray(pp["mean"], np.float32), np.asarray(pp["std"], np.float32)


def to_model_input(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray):
    """uint8 NHWC -> normalised float32 NCHW, the same arithmetic as ToTensor + Normalize."""
    import torch

    x = torch.from_numpy(np.array(pixels, np.uint8)).permute(0, 3, 1, 2).float().div(255)  # own copy: writable
    return x.sub_(torch.from_numpy(mean)[:, None, None]).div_(torch.from_numpy(std)[:, None, None])


def decode_image(data: bytes | None, pil_transform: Callable, max_pixels: int) -> np.ndarray:
    """Untrusted bytes -> the PIL part of the model's transform -> uint8 HWC; raises BadImage."""
    if data is None:
        raise BadImage("image_not_found", "the image reference could not be read")
    probe_image(data, _MAX_ENCODED_BYTES, max_pixels)  # bombs are refused before any decode
    try:
        with open_image(data) as img:
            img = ImageOps.exif_transpose(img)  # as displayed, like ingest's width/height
            return np.asarray(pil_transform(img.convert("RGB")), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage("corrupt_image", f"decode failed: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------- embedding


def _oom_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def forward_padded(forward: Callable, x, batch: int, on_oom: Callable[[int], None] | None = None):
    """Run `forward` over `x` in passes of exactly `batch` rows (the last one zero-padded), so
    each row's result does not depend on its batch-mates. A CUDA OOM halves the batch and
    retries the same rows. Returns (output rows, the batch size that worked)."""
    import torch

    outs, i = [], 0
    while i < len(x):
        chunk = x[i:i + batch]
        if len(chunk) < batch:
            chunk = torch.cat([chunk, chunk.new_zeros((batch - len(chunk), *chunk.shape[1:]))])
        try:
            y = forward(chunk)
        except _oom_error():
            if batch == 1:
                raise
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_oom:
                on_oom(batch)
            continue
        n = min(batch, len(x) - i)
        outs.append(y[:n])
        i += n
    return (torch.cat(outs) if outs else x.new_zeros((0,))), batch


class Embedder:
    """A loaded model plus its preprocessing: uint8 images in, unit float16 vectors out."""

    def __init__(self, spec: ModelSpec, batch_size: int, device: str = "auto", num_threads: float = 0):
        import math

        import torch

        if num_threads:  # Ray sets OMP_NUM_THREADS from num_cpus; say it to torch explicitly too
            torch.set_num_threads(max(1, math.ceil(num_threads)))
        self.device = resolve_device(device)
        self.spec = spec
        self.model = load_model(spec, self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.batch = batch_size
        pp = preprocess_config(spec)
        own = _normalised_pp(self.model.visual.preprocess_cfg)
        if own != pp:
            raise RuntimeError(f"{spec.name}: computed preprocessing {pp} differs from the model's {own}")
        _, self.mean, self.std = split_transform(pp)
        self.dim = int(self.model.text_projection.shape[1] if hasattr(self.model, "text_projection")
                       else self.model.visual.output_dim)

    def _forward(self, x):
        import torch

        with torch.inference_mode():
            feats = self.model.encode_image(x.to(self.device, self.dtype, non_blocking=True))
            return torch.nn.functional.normalize(feats.float(), dim=-1)

    def _oom(self, batch: int) -> None:
        print(f"[embed] CUDA out of memory: batch size halved to {batch}", file=sys.stderr, flush=True)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float16)
        x = to_model_input(pixels, self.mean, self.std)
        out, self.batch = forward_padded(self._forward, x, self.batch, self._oom)
        return out.half().cpu().numpy()

    def embed_block(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoded block (DecodeShards) -> the same block with embeddings instead of pixels
        (zeros where the image was bad; those rows are ledgered)."""
        ok = (batch["reason"] == "") & (batch["row"] != _SHARD_MARKER)
        emb = np.zeros((len(ok), self.dim), np.float16)
        if ok.any():
            emb[ok] = self.embed(batch["pixels"][ok])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out[EMBEDDING] = emb
        return out


class EmbedActor:
    """Ray Data callable class: one model per actor, reused for every batch. Each batch's rows of
    each shard go to a part file under ``parts``; the actor hands on one small record per part
    (shard, rows, part path), so embeddings never travel to the driver."""

    def __init__(self, spec: ModelSpec, batch_size: int, device: str, num_threads: float, parts: Location):
        self.embedder = Embedder(spec, batch_size, device, num_threads)
        self.parts = parts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.embedder.embed_block(batch)
        records: dict[str, list] = {k: [] for k in ("shard_index", "shard_rows", "rows", "part", "reason", "detail")}
        for shard_index in np.unique(out["shard_index"]).tolist():
            sel = out["shard_index"] == shard_index
            part = {k: out[k][sel] for k in ("row", "reason", "detail", "shard_rows", EMBEDDING)}
            marker = part["row"][0] == _SHARD_MARKER  # an empty shard, or one that failed to load
            records["shard_index"].append(shard_index)
            records["shard_rows"].append(int(part["shard_rows"][0]))
            records["rows"].append(0 if marker else len(part["row"]))
            records["part"].append("" if marker else write_part(self.parts, shard_index, part))
            records["reason"].append(str(part["reason"][0]) if marker else "")
            records["detail"].append(str(part["detail"][0]) if marker else "")
        n = len(records["part"])
        return {"shard_index": np.asarray(records["shard_index"], np.int32),
                "shard_rows": np.asarray(records["shard_rows"], np.int64),
                "rows": np.asarray(records["rows"], np.int64),
                "part": np.asarray(records["part"], dtype=object),
                "reason": np.asarray(records["reason"], dtype=object),
                "detail": np.asarray(records["detail"], dtype=object),
                "done_at": np.full(n, time.time())}  # when this batch finished (timings)


# ------------------------------------------------------------------------- decode (CPU side)


def _batch(shard_index: int, shard_rows: int, rows: list[int], pixels: np.ndarray,
           reasons: list[str], details: list[str]) -> dict[str, np.ndarray]:
    return {
        "shard_index": np.full(len(rows), shard_index, np.int32),
        "shard_rows": np.full(len(rows), shard_rows, np.int64),
        "row": np.asarray(rows, np.int64),
        "reason": np.asarray(reasons, dtype=object),
        "detail": np.asarray(details, dtype=object),
        "pixels": pixels,
    }


def decode_shards(batch: dict[str, np.ndarray], tasks: list[ShardTask], pp: dict[str, Any], max_pixels: int,
                  rows_per_block: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF (CPU tasks): decode the shards whose indices are in the batch (one
    after another), in blocks of about ``rows_per_block`` rows that may span shards (small shards
    do not each cost the driver a block; every row carries its shard)."""
    decoder = DecodeShards(tasks, pp, max_pixels, rows_per_block)
    held: list[dict[str, np.ndarray]] = []
    for shard_index in batch["shard_index"].tolist():
        for block in decoder.decode_shard(int(shard_index)):
            held.append(block)
            if sum(len(b["row"]) for b in held) >= rows_per_block:
                yield _concat_blocks(held)
                held = []
    if held:
        yield _concat_blocks(held)


def _concat_blocks(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return blocks[0] if len(blocks) == 1 else {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def decode_group(shards: int, cpus: int) -> int:
    """Shards per decode task: 1 until there are more than DECODE_TASKS_PER_CPU per CPU."""
    return max(1, -(-shards // max(1, DECODE_TASKS_PER_CPU * cpus)))


class DecodeShards:
    """Fetch one shard's images by reference and yield blocks of decoded, resized uint8 images
    (bad ones flagged with a ledger reason, not raised). A shard that cannot be read at all
    yields one marker row carrying the error."""

    def __init__(self, tasks: list[ShardTask], pp: dict[str, Any], max_pixels: int, rows_per_block: int):
        self.tasks, self.max_pixels, self.rows_per_block = tasks, max_pixels, rows_per_block
        self.pil, _, _ = split_transform(pp)
        self.hw = tuple(pp["size"])

    def decode_shard(self, shard_index: int) -> Iterator[dict[str, np.ndarray]]:
        blank = np.zeros((1, *self.hw, 3), np.uint8)
        try:
            refs = read_table(self.tasks[shard_index].input, columns=REF_COLUMNS)
            problems: dict[int, tuple[str, str]] = {}
            images = fetch_image_bytes(refs, problems=problems)
        except Exception as e:  # the whole shard is unreadable: report it, do not kill the pipeline
            yield _batch(shard_index, 0, [_SHARD_MARKER], blank, ["shard_failed"], [f"{type(e).__name__}: {e}"])
            return
        n = len(images)
        if n == 0:
            yield _batch(shard_index, 0, [_SHARD_MARKER], blank, [""], [""])
            return
        for start in range(0, n, self.rows_per_block):
            rows = list(range(start, min(start + self.rows_per_block, n)))
            pixels = np.zeros((len(rows), *self.hw, 3), np.uint8)
            reasons, details = [], []
            for j, r in enumerate(rows):
                try:
                    if r in problems:
                        raise BadImage(*problems[r])
                    pixels[j] = decode_image(images[r], self.pil, self.max_pixels)
                    reasons.append(""), details.append("")
                except BadImage as bad:
                    reasons.append(bad.reason), details.append(bad.detail)
                images[r] = None  # free the encoded bytes as we go
            yield _batch(shard_index, n, rows, pixels, reasons, details)


# ----------------------------------------------------------------------------------- output


def fixed_size_embeddings(emb: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(emb, np.float16).reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def assemble(task: ShardTask, rows: np.ndarray, reasons: np.ndarray, details: np.ndarray,
             embeddings: np.ndarray, dim: int) -> ShardOutput:
    """Input rows of a shard + their embeddings (kept) or ledger rows (dropped), in input order."""
    table = read_table(task.input)
    missing = [c for c in REF_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"input shard {task.input.uri()!r} lacks columns {missing}; run ingest first")
    order = np.argsort(rows, kind="stable")
    rows, reasons, details, embeddings = rows[order], reasons[order], details[order], embeddings[order]
    if not np.array_equal(rows, np.arange(table.num_rows)):
        raise RuntimeError(f"embed: shard {task.shard} got rows {rows[:5]}... for {table.num_rows} input rows")
    kept = reasons == ""
    ledger = Ledger("embed")
    ids = table.column("sample_id").to_pylist()
    for r in np.flatnonzero(~kept).tolist():
        ledger.drop(f"{task.input.uri()}#row={r}", str(reasons[r]), str(details[r]), ids[r])
    out = table.filter(pa.array(kept))
    emb = embeddings[kept] if len(embeddings) else np.zeros((0, dim), np.float16)
    out = out.append_column(pa.field(EMBEDDING, pa.list_(pa.float16(), dim), nullable=False),
                            fixed_size_embeddings(emb.reshape(-1, dim)))
    return ShardOutput(out, ledger, table.num_rows)


# ------------------------------------------------------------------------------------ stage


class EmbedStage(SinglePassStage):
    name = "embed"
    config_sections = ("embed",)
    schema_version = 1
    input_suffixes = (".parquet",)

    def __init__(self):
        self._embedder: Embedder | None = None  # only for the in-process (`run.executor = local`) path
        # after a Ray run: actor start-up and steady-state rates (run_embed_pipeline), for benchmarks
        self.timings: dict[str, float] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_embedder"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._embedder = None

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        """The model identity goes into the config hash: other weights = another output."""
        return {"model": ModelSpec.from_config(ctx.cfg.embed).identity()}

    # In-process path (run.executor = "local"): same decode, same padded forward, same assembly.
    def process(self, task: ShardTask) -> ShardOutput:
        e = task.config.embed
        spec = ModelSpec.from_config(e)
        if self._embedder is None:
            self._embedder = Embedder(spec, e.batch_size, e.device)
        decoder = DecodeShards([task], preprocess_config(spec), e.max_pixels, e.decode_rows)
        parts = list(decoder.decode_shard(0))
        if parts[0]["reason"][0] == "shard_failed":
            raise RuntimeError(parts[0]["detail"][0])
        return _assemble_parts(task, [self._embedder.embed_block(p) for p in parts], self._embedder.dim)

    def execute(self, pending: list[ShardTask], ctx: PassContext, progress: Progress) -> dict[str, str]:
        """On Ray: the Ray Data actor pool below; locally: one shard after another (process)."""
        if not uses_ray(ctx.cfg):
            return super().execute(pending, ctx, progress)
        return run_embed_pipeline(self, pending, ctx.cfg, progress, self.timings)


def _assemble_parts(task: ShardTask, parts: list[dict[str, np.ndarray]], dim: int) -> ShardOutput:
    real = [p for p in parts if not (len(p["row"]) == 1 and p["row"][0] == _SHARD_MARKER)]
    if not real:
        z = np.zeros(0, np.int64)
        return assemble(task, z, z.astype(object), z.astype(object), np.zeros((0, dim), np.float16), dim)
    cat = {k: np.concatenate([p[k] for p in real]) for k in ("row", "reason", "detail", EMBEDDING)}
    return assemble(task, cat["row"], cat["reason"], cat["detail"], cat[EMBEDDING], dim)


def pool_resources(cfg: Config) -> tuple[int, float, float]:
    """(pool size, GPUs per actor, CPUs per actor) for the cluster we are connected to."""
    import ray

    e = cfg.embed
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0)) if e.device != "cpu" else 0.0
    if gpus > 0 and e.num_gpus_per_actor > 0:
        per = e.num_gpus_per_actor
        return e.pool_size or max(int(gpus // per), 1), per, e.num_cpus_per_actor
    cpus = int(res.get("CPU", 1))
    return e.pool_size or max(int(cpus // (e.num_cpus_per_actor + 1)), 1), 0.0, e.num_cpus_per_actor


def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's (which print every few seconds when not a TTY)."""
    import logging

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass
class _Partial:
    """What the driver knows of one shard in flight: row counts and its part files' names."""

    expected: int = -1
    received: int = 0
    parts: list = field(default_factory=list)


PARTS_DIR = "embed-parts"  # under OUT/_tmp/: one run's part files, deleted as each shard commits


def run_embed_pipeline(stage: EmbedStage, pending: list[ShardTask], cfg: Config, progress,
                       timings: dict | None = None) -> dict[str, str]:
    """Ray Data: decode tasks -> EmbedActor pool (each actor writes its rows of a shard to a part
    file and hands on one small record) -> the driver counts rows per shard -> each complete
    shard goes to a ``Committer`` actor (assembles the parts, ``commit_shard``, deletes them). No
    embedding passes through the driver. Returns {shard: error} for failed shards."""
    import ray

    ensure_ray(cfg)
    quiet_ray_data()
    e = cfg.embed
    spec = ModelSpec.from_config(e)
    pp = preprocess_config(spec)
    pool, gpus, cpus = pool_resources(cfg)
    parts_root = pending[0].output_root.join(TMP_DIR, PARTS_DIR)
    parts_root.delete_tree()  # left by a killed run: never read (each commit names its own parts)
    run_parts = parts_root.join(uuid.uuid4().hex[:12])
    t0 = time.monotonic()
    group = decode_group(len(pending), int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"shard_index": i} for i in range(len(pending))],
                             override_num_blocks=-(-len(pending) // group))
    # Decoding asks for memory (a shard's encoded bytes are held while it decodes); that also
    # keeps Ray Data from fusing decode into the actors, which would serialise decode and forward.
    ds = ds.map_batches(decode_shards, fn_args=(pending, pp, e.max_pixels, e.decode_rows),
                        batch_size=group, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY)
    # An actor call takes at least a decode block (it forwards in padded passes of batch_size, so
    # the rows per call change no embedding): Ray Data's cost on the driver is per block.
    ds = ds.map_batches(EmbedActor, fn_constructor_args=(spec, e.batch_size, e.device if gpus else "cpu", cpus,
                                                         run_parts),
                        batch_size=max(e.batch_size, e.decode_rows), batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=pool),
                        num_gpus=gpus or None, num_cpus=cpus)
    # held here for the whole run: a committer restarted after a crash gets its arguments again
    stage_ref, pending_ref = ray.put(stage), ray.put(pending)
    committers = start_committers(stage_ref, pending_ref, len(pending))
    partial: dict[int, _Partial] = {}
    failed: dict[str, str] = {}
    commits: dict[Any, list[int]] = {}  # commit call -> its shard indices
    submitted: set[int] = set()
    first_batch, done_at, wall0 = None, [], time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            if first_batch is None:
                first_batch = time.monotonic()
            done_at.append((batch["done_at"], batch["rows"]))
            calls: dict[int, list[tuple[int, list[str]]]] = {}  # committer -> (shard index, parts)
            for i in _gather(batch, pending, partial, failed, progress):
                calls.setdefault(len(submitted) % len(committers), []).append((i, partial.pop(i).parts))
                submitted.add(i)
            for c, shards in calls.items():  # one call per committer per block: a few small strings
                commits[committers[c].commit.remote(shards)] = [i for i, _ in shards]
            _collect(commits, pending, failed, progress, wait=False)
    except Exception as err:  # the pipeline itself broke (e.g. the model failed to load)
        for i, task in enumerate(pending):
            if i not in submitted and task.shard not in failed:
                failed[task.shard] = f"embed pipeline failed: {type(err).__name__}: {err}"
    _collect(commits, pending, failed, progress, wait=True)
    parts_root.delete_tree()
    if timings is not None:
        timings.update(start=t0, first_batch=first_batch, end=time.monotonic(), **_actor_timings(done_at, wall0))
    return failed


class Committer:
    """Commits complete shards from their part files (``commit_parts``). One per node, started
    once per run with the stage and the run's tasks (a task per shard would start a worker
    process per commit; the tasks once, so a call carries only shard indices and part names)."""

    def __init__(self, stage: EmbedStage, pending: list[ShardTask]):
        self.stage, self.pending = stage, pending

    def commit(self, shards: list[tuple[int, list[str]]]) -> list[tuple[int, dict[str, Any] | str]]:
        """(shard index, its entry's counts, or the error that failed that shard only) per shard.
        The parts are deleted once every shard of the call is committed: a call retried after this
        actor died part-way finds them all."""
        done: list[tuple[int, dict[str, Any] | str]] = []
        for i, parts in shards:
            try:
                done.append((i, commit_parts(self.stage, self.pending[i], parts)))
            except Exception as err:
                done.append((i, f"{type(err).__name__}: {err}"))
        fs = self.pending[0].output_root.fs
        for (i, result), (_, parts) in zip(done, shards):
            if isinstance(result, dict):
                for path in parts:
                    Location(fs, path).delete_if_exists()
        return done


def start_committers(stage_ref, pending_ref, shards: int) -> list:
    """One Committer per alive node that has CPUs (a 0-CPU head, where the driver runs, gets none
    unless it is the only node), at most one per shard, pinned to its node so every node writes
    (a soft pin was seen to put a loaded node's committer on the head). Commits are I/O: no CPU
    reserved (the pool and decode hold them). An actor that dies mid-commit is restarted on its
    node and the call retried: it rewrites the same names, manifest entry last; if the node is
    gone, its shards fail and the next run redoes them. The stage and the run's tasks come as
    object refs (put once), which the caller keeps alive for restarts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [n for n in alive if n.get("Resources", {}).get("CPU", 0) > 0] or alive
    actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(Committer)
    if not nodes:  # no node list (should not happen on a live cluster): one committer, anywhere
        return [actor.remote(stage_ref, pending_ref)]
    return [actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(stage_ref, pending_ref) for n in nodes[:max(shards, 1)]]


def write_part(folder: Location, shard_index: int, part: dict[str, np.ndarray]) -> str:
    """One actor batch's rows of one shard -> an Arrow IPC file; returns its path in the output's
    filesystem (the driver hands the paths of a shard's parts to its committer, which opens them
    with that filesystem: a URI would not open on an object store's)."""
    emb = part[EMBEDDING]
    table = pa.table({"row": pa.array(part["row"], pa.int64()),
                      "reason": pa.array(part["reason"].tolist(), pa.string()),
                      "detail": pa.array(part["detail"].tolist(), pa.string()),
                      EMBEDDING: fixed_size_embeddings(emb.reshape(len(part["row"]), -1))})
    dest = folder.join(f"{shard_index:06d}-{int(part['row'][0]):09d}.arrow")
    folder.fs.create_dir(folder.path, recursive=True)
    with dest.fs.open_output_stream(dest.path) as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return dest.path


def read_part(path: str, fs) -> dict[str, np.ndarray]:
    with fs.open_input_file(path) as f:
        table = pa.ipc.open_file(f).read_all()
    emb = table.column(EMBEDDING).combine_chunks()
    return {"row": table.column("row").to_numpy(),
            "reason": np.asarray(table.column("reason").to_pylist(), dtype=object),
            "detail": np.asarray(table.column("detail").to_pylist(), dtype=object),
            EMBEDDING: emb.values.to_numpy().reshape(len(table), emb.type.list_size)}


def commit_parts(stage: EmbedStage, task: ShardTask, parts: list[str]) -> dict[str, Any]:
    """On a worker: one shard's part files -> its output (the same ``assemble`` as in-process), committed
    through ``commit_shard`` (data, ledger, manifest entry last). The caller deletes the parts."""
    start = time.monotonic()
    fs = task.output_root.fs
    read = [read_part(p, fs) for p in parts]
    # the width from the parts: asking the model config would import open_clip (and torch) here
    dim = read[0][EMBEDDING].shape[1] if read else ModelSpec.from_config(task.config.embed).model_config()["embed_dim"]
    entry = commit_shard(stage, task, _assemble_parts(task, read, dim), start)
    return {k: entry[k] for k in ("shard", "input_rows", "kept_rows", "dropped_rows")}  # the driver needs no more


def _actor_timings(done_at: list[tuple[np.ndarray, np.ndarray]], wall0: float) -> dict[str, float]:
    """Start-up = until the first actor batch finished; steady rate = rows of later batches over
    the time from the first to the last batch finishing (gaps from a starved pipeline count)."""
    if not done_at:
        return {}
    t = np.concatenate([d for d, _ in done_at])
    rows = np.concatenate([r for _, r in done_at])
    first, last = float(t.min()), float(t.max())
    later = int(rows[t > first].sum())
    return {"actor_startup_s": first - wall0, "actor_steady_s": last - first, "actor_steady_rows": later,
            "actor_steady_rows_per_s": later / (last - first) if last > first else float("nan")}


def _collect(commits: dict[Any, list[int]], pending, failed, progress, wait: bool) -> None:
    """Progress for committed shards; a failed commit fails its shard(s) only."""
    import ray

    if not commits:
        return
    ready, _ = ray.wait(list(commits), num_returns=len(commits), timeout=None if wait else 0)
    for ref in ready:
        shards = commits.pop(ref)
        try:
            results = ray.get(ref)
        except Exception as err:  # the committer itself died past its retries
            results = [(i, f"{type(err).__name__}: {err}") for i in shards]
        for i, result in results:
            if isinstance(result, dict):
                progress.update(1, result["input_rows"])
            else:
                failed[pending[i].shard] = result
                progress.update(1, 0)


def _gather(batch, pending, partial, failed, progress) -> list[int]:
    """Count the records of one output block; returns the indices of the shards now complete."""
    complete = []
    for j in range(len(batch["shard_index"])):
        shard_index = int(batch["shard_index"][j])
        if batch["reason"][j] == "shard_failed":
            failed[pending[shard_index].shard] = str(batch["detail"][j])
            partial.pop(shard_index, None)
            progress.update(1, 0)
            continue
        state = partial.setdefault(shard_index, _Partial())
        state.expected = int(batch["shard_rows"][j])
        if batch["part"][j]:
            state.parts.append(str(batch["part"][j]))
            state.received += int(batch["rows"][j])
        if state.received == state.expected:
            complete.append(shard_index)
    return complete
