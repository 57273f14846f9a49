"""Assign stage: each image's top-k concepts by cosine similarity.

Reads:  embed output (the sample row + ``embedding`` fixed_size_list<float16, D>, unit length),
        and the concept table of ``assign.vocabulary`` embedded with the same model's text tower
        (``curation.concepts.load_or_build``: cached, keyed by model, weights, vocabulary and
        template hashes).
Writes: ``OUT/<shard>.parquet``: the input row, without ``embedding`` unless
        ``assign.keep_embedding``, + ``concept_ids`` fixed_size_list<int32, k> (row indices of the
        vocabulary, best first) + ``concept_scores`` fixed_size_list<float32, k> (cosine
        similarities, non-increasing, computed exactly in float64 and rounded to float32 whatever
        the backend). Ties are broken by the lower concept id. Rows whose
        embedding is null or not finite are ledgered (``bad_embedding``).

Search backends (``assign.backend``): ``faiss`` (IndexFlatIP: exact inner product; on GPUs a
float16 GpuIndexFlatIP when faiss has GPUs), ``torch`` (float32 matmul + topk, CPU or CUDA), and
``auto`` (FAISS wherever it is installed: faiss-cpu on CPU, faiss-gpu on CUDA; else torch;
faiss-cpu was 1.05-1.34x torch in four runs of benchmarks/assign.py). The choice is a fixed
rule, never timed at run time; and since the backend only proposes candidates that are rescored
exactly, the output does not depend on it anyway. Queries go in chunks of ``assign.query_chunk``.

How it runs: ``prepare`` (driver) loads or builds the concept cache once; an actor pool (one
actor per GPU, or per ``run.workers`` on CPU) each holding the concept vectors processes whole
input shards and commits each one through the one commit path (``Pass.execute`` override,
``ovpipe.core.stage.run_shard_safely``); with ``run.executor = "local"`` the default path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from curation.concepts import embed_concepts, flat_ip_index, load_or_build
from curation.embed import ModelSpec, resolve_device
from ovpipe.core.executor import cluster_workers, ensure_ray, uses_ray
from ovpipe.core.ledger import Ledger
from ovpipe.core.progress import Progress
from ovpipe.core.shards import DATA_DIR, MANIFEST_DIR, STAGE_FILE, Location, read_json, read_table
from ovpipe.core.stage import (PassContext, Shard, ShardOutput, ShardTask, SinglePassStage, record_result,
                               run_shard_safely)

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

CONCEPT_IDS = "concept_ids"
WINDOW_MARGIN = 8  # candidates beyond k that the backend proposes for exact rescoring
NEAR_TIE = 1e-5  # float32 scores of unit vectors are within this of the exact ones
CONCEPT_SCORES = "concept_scores"
EMBEDDING = "embedding"


# ------------------------------------------------------------------------------------ search


def resolve_backend(backend: str, device: str) -> str:
    """auto: FAISS where it is installed (faiss-cpu on CPU; on CUDA only faiss-gpu), else torch.
    A fixed rule, never a timing; the output is the same either way (exact rescoring). On this
    project's CPU benchmark FAISS was 1.05-1.34x torch over three runs (benchmarks/assign.py)."""
    if backend != "auto":
        return backend
    try:
        import faiss
    except ImportError:
        return "torch"
    if device.startswith("cuda"):
        return "faiss" if faiss.get_num_gpus() > 0 else "torch"
    return "faiss"


class Searcher:
    """Exact top-k inner product over unit concept vectors, deterministic under ties."""

    def __init__(self, concepts: np.ndarray, backend: str = "auto", device: str = "cpu",
                 query_chunk: int = 4096, num_threads: int = 0, index=None):
        self.n, self.dim = concepts.shape
        self.concepts = np.ascontiguousarray(concepts, np.float16)  # for exact rescoring
        self.device = device
        self.backend = resolve_backend(backend, device)
        self.query_chunk = query_chunk
        if self.backend == "faiss":
            import faiss


            if num_threads:
                faiss.omp_set_num_threads(num_threads)
            index = index if index is not None else flat_ip_index(concepts)
            if device.startswith("cuda"):
                options = faiss.GpuClonerOptions()
                options.useFloat16 = True  # half the memory; distances still accumulate in float32
                self.gpu_res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self.gpu_res, _cuda_index(device), index, options)
            self.index = index
        elif self.backend == "torch":
            import torch

            if num_threads:
                torch.set_num_threads(num_threads)
            self.matrix = torch.from_numpy(np.ascontiguousarray(concepts, np.float32)).to(device)
        else:
            raise ValueError(f"assign.backend {backend!r}: use faiss, torch or auto")

    def _raw(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            scores, ids = self.index.search(q, kk)
            return scores, ids
        import torch

        with torch.inference_mode():
            s = torch.from_numpy(q).to(self.device) @ self.matrix.T
            top = torch.topk(s, kk, dim=1, largest=True, sorted=True)
            return top.values.cpu().numpy(), top.indices.cpu().numpy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n, k], scores float32 [n, k]) for float queries [n, D], k <= N."""
        q = np.ascontiguousarray(queries, np.float32)
        ids = np.zeros((len(q), k), np.int32)
        scores = np.zeros((len(q), k), np.float32)
        for start in range(0, len(q), self.query_chunk):
            chunk = q[start:start + self.query_chunk]
            ids[start:start + len(chunk)], scores[start:start + len(chunk)] = self._search_chunk(chunk, k)
        return ids, scores

    def _search_chunk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The backend proposes a window of candidates; their scores are recomputed in float64, so
        the output (ids, order, scores) does not depend on the backend's rounding, its thread
        count or the chunking. A row whose k-th exact score is not clearly above everything the
        window left out (a tie or a near-tie at the window's edge) is searched again, wider."""
        kk = min(k + WINDOW_MARGIN, self.n)
        s, i = self._raw(q, kk)
        ids, scores, unsure = self._rescore(q, i, s, k)
        for r in np.flatnonzero(unsure):  # rare: widen the window for that row until it is sure
            width = kk
            while True:
                width = min(2 * width, self.n)
                s_r, i_r = self._raw(q[r:r + 1], width)
                ids_r, scores_r, unsure_r = self._rescore(q[r:r + 1], i_r, s_r, k)
                if width == self.n or not unsure_r[0]:
                    ids[r], scores[r] = ids_r[0], scores_r[0]
                    break
        return ids, scores

    def _rescore(self, q: np.ndarray, cand: np.ndarray, backend_scores: np.ndarray, k: int):
        q64 = q.astype(np.float64)
        exact = np.empty(cand.shape, np.float64)
        for j in range(cand.shape[1]):  # column by column: memory stays at one [n, D] float64
            exact[:, j] = np.einsum("nd,nd->n", q64, self.concepts[cand[:, j]].astype(np.float64))
        ids, scores = _tie_sorted(cand, exact, k)
        # everything outside the window scored at most the window's lowest backend score
        unsure = (cand.shape[1] < self.n) & (scores[:, -1] <= backend_scores.min(axis=1) + NEAR_TIE)
        return ids, scores.astype(np.float32), unsure


def _tie_sorted(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (score descending, id ascending), first k kept."""
    order = np.lexsort((ids, -scores), axis=1)
    ids = np.take_along_axis(ids, order, 1)[:, :k]
    scores = np.take_along_axis(scores, order, 1)[:, :k]
    return ids.astype(np.int32), scores


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


# ------------------------------------------------------------------------------------- stage


def _fixed(values: np.ndarray, typ: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), typ), values.shape[1])


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, dim] from a (fixed-size) list column, and a mask of rows that are usable."""
    n = len(column)
    out = np.zeros((n, dim), np.float32)
    ok = np.zeros(n, bool)
    if n == 0:
        return out, ok
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == dim and arr.null_count == 0:
        values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if len(values) == n * dim:
            out = values.reshape(n, dim)
            ok[:] = True
    else:
        for r, v in enumerate(arr.to_pylist()):
            if v is not None and len(v) == dim and all(x is not None for x in v):
                out[r] = v
                ok[r] = True
    ok &= np.isfinite(out).all(axis=1)
    return out, ok


class AssignStage(SinglePassStage):
    name = "assign"
    config_sections = ("assign",)
    schema_version = 1
    input_suffixes = (".parquet",)

    def __init__(self):
        self._concepts: np.ndarray | None = None  # float16 [N, D]; driver / actor only
        self._index = None
        self._searcher: Searcher | None = None

    def __getstate__(self):  # the concept vectors travel through the object store, not pickles
        return {k: v for k, v in self.__dict__.items() if k not in ("_concepts", "_index", "_searcher")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._concepts = self._index = self._searcher = None

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        cfg = ctx.cfg
        spec = ModelSpec.from_config(cfg.embed)
        identity = spec.identity()
        if shards:
            check_embed_model(shards[0].input, identity)
        a = cfg.assign
        table = load_or_build(a.vocabulary, spec, a.template, a.cache_dir, a.text_batch_size, a.device,
                              build=_remote_build_if_gpu(cfg))
        self._concepts = table.embeddings
        self.cache_folder = str(table.folder)
        self.cache_hit = table.hit
        return {"concepts": table.key, "num_concepts": len(table.names), "dim": table.dim, "embed_model": identity}

    def searcher(self, cfg: Config, num_threads: int = 0) -> Searcher:
        if self._searcher is None:
            index = None
            if self._concepts is None:  # a task in another process: read the cache from disk
                self._concepts, index = _read_cached(self.cache_folder)
            a = cfg.assign
            self._searcher = Searcher(self._concepts, a.backend, resolve_device(a.device), a.query_chunk,
                                      num_threads, index)
        return self._searcher

    def process(self, task: ShardTask) -> ShardOutput:
        a = task.config.assign
        searcher = self.searcher(task.config)
        table = read_table(task.input)
        if EMBEDDING not in table.column_names:
            raise ValueError(f"input shard {task.input.uri()!r} has no {EMBEDDING!r} column; run embed first")
        q, ok = embedding_matrix(table.column(EMBEDDING), searcher.dim)
        k = min(a.k, searcher.n)
        ids, scores = searcher.search(q[ok], k)
        ledger = Ledger(self.name)
        sample_ids = table.column("sample_id").to_pylist()
        for r in np.flatnonzero(~ok).tolist():
            ledger.drop(f"{task.input.uri()}#row={r}", "bad_embedding",
                        f"embedding is null, not {searcher.dim}-d, or not finite", sample_ids[r])
        out = table.filter(pa.array(ok))
        if not a.keep_embedding:
            out = out.drop_columns([EMBEDDING])
        out = out.append_column(pa.field(CONCEPT_IDS, pa.list_(pa.int32(), k), nullable=False),
                                _fixed(ids, pa.int32()))
        out = out.append_column(pa.field(CONCEPT_SCORES, pa.list_(pa.float32(), k), nullable=False),
                                _fixed(scores, pa.float32()))
        return ShardOutput(out, ledger, table.num_rows)

    def execute(self, pending: list[ShardTask], ctx: PassContext, progress: Progress) -> dict[str, str]:
        """On Ray: a pool of actors that each hold the concept index once; locally: process()."""
        if not uses_ray(ctx.cfg):
            return super().execute(pending, ctx, progress)
        return run_assign_pool(self, pending, ctx.cfg, progress)


def _read_cached(folder: str):
    from pathlib import Path

    import faiss

    emb = np.load(Path(folder) / "embeddings.npy", allow_pickle=False)
    return emb, faiss.read_index(str(Path(folder) / "index.faiss"))


def input_stage_header(first_shard) -> tuple[Location, dict[str, Any] | None]:
    """The stage output folder a data shard belongs to, and its ``_manifest/_stage.json`` (None
    when there is none: Parquet made outside ovpipe)."""
    folder = first_shard.path.rsplit("/", 1)[0]
    header = Location(first_shard.fs, folder)
    if header.name == DATA_DIR and not header.join(MANIFEST_DIR).exists():  # OUT/data/<shard>
        header = Location(first_shard.fs, folder.rsplit("/", 1)[0])
    stage_file = header.join(MANIFEST_DIR, STAGE_FILE)
    return header, (read_json(stage_file) if stage_file.exists() else None)


def check_embed_model(first_shard, identity: dict[str, Any]) -> None:
    """The input's embeddings must come from the model whose text tower embeds the concepts."""
    header, stage = input_stage_header(first_shard)
    if stage is None:
        return
    made_by = stage.get("payload", {}).get("global_state", {}).get("model")
    if made_by is not None and made_by != identity:
        raise ValueError(
            f"the embeddings in {header.uri()!r} were made by {made_by}, but embed.* in this config "
            f"names {identity}; concepts must be embedded by the same model. Use the embed run's config.")


def _remote_build_if_gpu(cfg: Config):
    """On a cluster with GPUs, embed the vocabulary in a one-GPU Ray task (the driver may have none)."""
    try:
        import ray
    except ImportError:
        return None
    if not uses_ray(cfg) or cfg.assign.device == "cpu":
        return None
    ensure_ray(cfg)
    if ray.cluster_resources().get("GPU", 0) < 1:
        return None

    def build(names, spec, template, batch_size, device):
        task = ray.remote(num_gpus=1)(embed_concepts)
        return ray.get(task.remote(names, spec, template, batch_size, "cuda"))

    return build


class AssignActor:
    """Holds the concept vectors once; processes and commits whole shards."""

    def __init__(self, stage: AssignStage, concepts: np.ndarray, cfg: Config, num_threads: int):
        stage._concepts = concepts
        self.stage = stage
        stage.searcher(cfg, num_threads)

    def run(self, task: ShardTask) -> dict[str, Any]:
        return run_shard_safely(self.stage, task)


def run_assign_pool(stage: AssignStage, pending: list[ShardTask], cfg: Config, progress) -> dict[str, str]:
    import ray

    ensure_ray(cfg)
    a = cfg.assign
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0)) if a.device != "cpu" else 0.0
    if gpus and a.num_gpus_per_actor:
        size, opts = a.pool_size or max(int(gpus // a.num_gpus_per_actor), 1), {"num_gpus": a.num_gpus_per_actor}
    else:
        size, opts = a.pool_size or cluster_workers(cfg), {}
    size = min(size, len(pending))
    concepts = ray.put(stage._concepts)
    remote = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=2)(AssignActor)
    actors = [remote.options(**opts).remote(stage, concepts, cfg, 1) for _ in range(size)]
    failed: dict[str, str] = {}
    queue, in_flight = list(pending), {}  # ref -> (actor, task)
    while queue or in_flight:
        busy = {id(actor) for actor, _ in in_flight.values()}
        for actor in actors:
            if queue and id(actor) not in busy:
                task = queue.pop(0)
                in_flight[actor.run.remote(task)] = (actor, task)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        _actor, task = in_flight.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:  # the actor died: that shard failed, the next run retries it
            result = {"shard": task.shard, "error": f"{type(e).__name__}: {e}"}
        record_result("assign", result, failed, progress)
    for actor in actors:
        ray.kill(actor)
    return failed
