"""Checkpoints with torch.distributed.checkpoint (DCP): resume after a kill exactly where the run
stopped, also at another world size.

Writes, under ``RUN_DIR/checkpoints/``::

    step-00000010/            one checkpoint (DCP: .metadata + one __N_M.distcp file per rank)
        trainer.json          step, scheduler state, world size, the global data position
        rank-00000.json       this rank's data position(s) and RNG states (torch, CUDA, numpy, random)
    latest                    the name of the newest complete checkpoint (the commit record)

What is saved: model and optimizer (sharded DTensors through ``get_state_dict``: each rank writes
its own shards, DCP reshards on load, so a checkpoint written by W ranks loads on W' ranks), the
LR scheduler, the data position and the RNG states. A checkpoint is written into
``step-N.tmp/`` and renamed, then ``latest`` is replaced atomically: a run killed mid-save resumes
from the previous checkpoint, never from a half-written one.

Data position at another world size: ranks read a shared stream in lock step (rank r of W reads
items r, r+W, ...; trainer/data.py), so after n packs per rank the whole group has consumed the
first n*W items of the epoch. ``trainer.json`` stores (epoch, consumed) per dataset and a run
resumed with W' ranks starts rank r' at item consumed + r'. At the same world size each rank's own
saved position and RNG state are restored exactly.
"""

from __future__ import annotations

import base64
import bisect
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "numpy": _jsonable(np.random.get_state()), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(
            np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


# ----------------------------------------------------------------------------- data position


def global_position(state: dict[str, Any]) -> dict[str, int]:
    """Rank 0's PackStream state -> (epoch, consumed): the group has read items [0, consumed)."""
    return {"epoch": state["epoch"], "consumed": state.get("global_index", 0),
            "shards_digest": state.get("shards_digest", "")}


def stream_global_index(stream) -> int:
    """Global stream index of the next item this rank reads."""
    pos = stream.pos
    if not pos.shard:
        return stream.rank
    order = stream.shard_order(pos.epoch)
    offsets = np.cumsum([0] + [stream.num_rows[s] for s in order]).tolist()
    return int(offsets[pos.shard_index] + pos.row)


def reposition(stream, epoch: int, consumed: int, shards_digest: str = "") -> None:
    """Point ``stream`` (any rank / world size) at item ``consumed + rank`` of ``epoch``."""
    order = stream.shard_order(epoch)
    offsets = np.cumsum([0] + [stream.num_rows[s] for s in order]).tolist()
    total = (offsets[-1] // stream.world_size) * stream.world_size
    g = consumed + stream.rank
    if g >= total:  # this world size's cut of the epoch is used up: next epoch
        epoch, g = epoch + 1, stream.rank
        order = stream.shard_order(epoch)
        offsets = np.cumsum([0] + [stream.num_rows[s] for s in order]).tolist()
    k = bisect.bisect_right(offsets, g) - 1
    stream.load_state_dict({"epoch": epoch, "shard_index": k, "shard": stream.shards[order[k]].name,
                            "row": g - offsets[k], "rank": stream.rank, "world_size": stream.world_size,
                            "seed": stream.seed, "shards_digest": shards_digest})


# ----------------------------------------------------------------------------- save / load


class Checkpointer:
    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep

    def latest(self) -> Path | None:
        marker = self.folder / LATEST
        if not marker.exists():
            return None
        path = self.folder / marker.read_text().strip()
        if not (path / "trainer.json").exists():
            raise FileNotFoundError(f"{marker} names {path.name}, which is incomplete or missing; delete "
                                    f"{marker} to resume from an older checkpoint, or start a new run folder")
        return path

    def save(self, step: int, model, optimizer, scheduler, streams: list, extra: dict | None = None) -> Path:
        """Collective: every rank calls it. Returns the committed checkpoint folder."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        rank, world = _world()
        name = f"step-{step:08d}"
        tmp, final = self.folder / f"{name}.tmp", self.folder / name
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        data = [s.state_dict() for s in streams]
        for s, d in zip(streams, data):
            d["global_index"] = stream_global_index(s)
        _write_json(tmp / f"rank-{rank:05d}.json", {"data": data, "rng": rng_state()})
        _barrier()
        if rank == 0:
            _write_json(tmp / "trainer.json", {
                "step": step, "world_size": world, "scheduler": scheduler.state_dict(),
                "data": [global_position(d) for d in data], **(extra or {})})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_text_atomic(self.folder / LATEST, name)
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler, streams: list) -> dict[str, Any]:
        """Collective. Restores everything in place; returns trainer.json (``step`` = steps done)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        rank, world = _world()
        meta = json.loads((path / "trainer.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(meta["scheduler"])
        own = path / f"rank-{rank:05d}.json"
        if meta["world_size"] == world and own.exists():
            mine = json.loads(own.read_text())
            for s, d in zip(streams, mine["data"]):
                d = {k: v for k, v in d.items() if k != "global_index"}
                s.load_state_dict(d)
            set_rng_state(mine["rng"])
        else:  # another world size: the shared position, and fresh seeded RNG streams per rank
            for s, d in zip(streams, meta["data"]):
                reposition(s, d["epoch"], d["consumed"], d.get("shards_digest", ""))
            torch.manual_seed(meta.get("seed", 0) * 1_000_003 + meta["step"] * 131 + rank)
        return meta

    def _prune(self) -> None:
        done = sorted(p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in a checkpoint's JSON")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
