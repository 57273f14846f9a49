"""Packed-shard streaming reader: deterministic rank sharding, per-epoch reshuffle, resumable position.

Reads: the pack stage's output folder (or any folder / single file of PACK_SCHEMA Parquet shards;
an ovpipe stage output is listed through its manifest, so only committed shards are read). Yields:
one pack per item, a dict of the PACK_SCHEMA fields (plus ``_shard`` and ``_row`` for messages).

Order. Epoch e's stream is every pack of every shard exactly once: the shards in an order
permuted by (seed, e), and the rows of each shard in an order permuted by (seed, e, shard). Rank r
of W takes stream items r, r + W, r + 2W, ...; the stream is cut to a multiple of W so every rank
gets the same number of packs per epoch (at most W - 1 packs of an epoch are skipped, different
ones every epoch). Same seed + same shards => the same order, whatever the machine.

Position. ``state_dict()`` is ``{epoch, shard_index, shard, row, rank, world_size, seed}``:
the NEXT pack this rank will read is row ``row`` (in the epoch's permuted row order) of shard
number ``shard_index`` of the epoch's shard order, whose name is ``shard``. ``load_state_dict``
resumes exactly there (and refuses a different shard list, rank count or seed).

Memory: one shard's rows for this rank are held at a time (packer shards are bounded in size).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import xxhash

from ovpipe.core.shards import Location, list_input_shards
from packing.schema import PACK_SCHEMA, PACK_SCHEMA_VERSION

VERSION_KEY = b"ovpipe.pack_schema_version"


@dataclass
class DataPosition:
    epoch: int = 0
    shard_index: int = 0
    shard: str = ""
    row: int = 0
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shards_digest: str = ""  # the packed shards read (names, row counts); "" in older checkpoints


class PackStream:
    def __init__(self, root: str | Location, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.root = root if isinstance(root, Location) else Location.parse(root)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shards = list_input_shards(self.root)
        if not self.shards:
            raise FileNotFoundError(f"no packed shards under {self.root.uri()!r}")
        self.num_rows = [self._check_shard(s) for s in self.shards]
        if sum(self.num_rows) < world_size:
            raise ValueError(f"{sum(self.num_rows)} packs under {self.root.uri()!r} for {world_size} ranks: "
                             "every rank needs at least one pack per epoch")
        listing = [[s.name, n] for s, n in zip(self.shards, self.num_rows)]
        self.shards_digest = xxhash.xxh3_64_hexdigest(json.dumps(listing).encode())
        self.pos = DataPosition(rank=rank, world_size=world_size, seed=seed, shards_digest=self.shards_digest)

    def _check_shard(self, shard: Location) -> int:
        with shard.fs.open_input_file(shard.path) as f:
            meta = pq.ParquetFile(f).schema_arrow
        version = (meta.metadata or {}).get(VERSION_KEY)
        if version != str(PACK_SCHEMA_VERSION).encode():
            raise ValueError(f"{shard.uri()}: pack schema version {version!r}, this trainer reads "
                             f"{PACK_SCHEMA_VERSION}; re-pack or update the trainer")
        missing = set(PACK_SCHEMA.names) - set(meta.names)
        if missing:
            raise ValueError(f"{shard.uri()}: missing pack columns {sorted(missing)}")
        with shard.fs.open_input_file(shard.path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    # ------------------------------------------------------------------ order

    def shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def row_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard, 1]).permutation(self.num_rows[shard])

    def packs_per_epoch(self) -> int:
        """Packs each rank reads per epoch (same on every rank)."""
        return sum(self.num_rows) // self.world_size

    def _offsets(self, order: list[int]) -> list[int]:
        out = [0]
        for s in order:
            out.append(out[-1] + self.num_rows[s])
        return out

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.pos)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pos = DataPosition(**state)
        if (pos.rank, pos.world_size, pos.seed) != (self.rank, self.world_size, self.seed):
            raise ValueError(f"data position was saved for rank {pos.rank}/{pos.world_size} seed {pos.seed}; "
                             f"this reader is rank {self.rank}/{self.world_size} seed {self.seed}")
        if pos.shards_digest and pos.shards_digest != self.shards_digest:
            raise ValueError(f"the packed shards under {self.root.uri()!r} changed since this position was saved "
                             "(shards added, removed or re-packed): resuming would repeat or skip packs. Point "
                             "the trainer at the packs the run started with, or start a new run folder")
        pos.shards_digest = self.shards_digest
        order = self.shard_order(pos.epoch)
        # shard "" = a stream never read yet (a mixture dataset not drawn before the checkpoint)
        if pos.shard and pos.shard_index < len(order) and self.shards[order[pos.shard_index]].name != pos.shard:
            raise ValueError(f"data position points at shard {pos.shard!r} but the shard list changed "
                             f"(index {pos.shard_index} is now {self.shards[order[pos.shard_index]].name!r})")
        self.pos = pos

    # ------------------------------------------------------------------ reading

    def epoch(self, epoch: int, start: int | None = None) -> Iterator[dict[str, Any]]:
        """This rank's packs of one epoch, from global stream index ``start`` (default: its first)."""
        order = self.shard_order(epoch)
        offsets = self._offsets(order)
        total = (offsets[-1] // self.world_size) * self.world_size
        g = self.rank if start is None else start
        while g < total:
            k = bisect.bisect_right(offsets, g) - 1  # shard number in this epoch's order
            shard = order[k]
            rows = self.row_order(epoch, shard)
            mine = list(range(g - offsets[k], min(offsets[k + 1], total) - offsets[k], self.world_size))
            table = self._read(shard, rows[mine])
            for i, rec in enumerate(table.to_pylist()):
                rec["_shard"], rec["_row"] = self.shards[shard].name, int(rows[mine[i]])
                nxt = g + self.world_size
                self._set_pos(epoch, order, offsets, nxt, total)
                yield rec
                g = nxt

    def _set_pos(self, epoch, order, offsets, g, total) -> None:
        if g >= total:  # this rank's epoch is done: point at its first pack of the next epoch
            epoch, g = epoch + 1, self.rank
            order = self.shard_order(epoch)
            offsets = self._offsets(order)
        k = bisect.bisect_right(offsets, g) - 1
        self.pos.epoch, self.pos.shard_index, self.pos.row = epoch, k, g - offsets[k]
        self.pos.shard = self.shards[order[k]].name

    def _read(self, shard: int, rows: np.ndarray):
        loc = self.shards[shard]
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.ParquetFile(f).read(columns=PACK_SCHEMA.names)
        return table.take(rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Endless stream from the current position, epoch after epoch."""
        if not self.pos.shard:  # fresh reader: this rank's first pack of epoch 0
            order = self.shard_order(0)
            self._set_pos(0, order, self._offsets(order), self.rank, sum(self.num_rows))
        while True:
            epoch = self.pos.epoch
            order = self.shard_order(epoch)
            offsets = self._offsets(order)
            yield from self.epoch(epoch, offsets[self.pos.shard_index] + self.pos.row)
            if self.pos.epoch == epoch:  # nothing left for this rank in this epoch
                self._set_pos(epoch, order, offsets, offsets[-1], 0)

    def batches(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """Micro-batches of ``batch_size`` packs; the position is saved after each full batch is read."""
        batch = []
        for pack in self:
            batch.append(pack)
            if len(batch) == batch_size:
                yield batch
                batch = []
