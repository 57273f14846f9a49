"""Routed files (ovpipe.core.routed): the map side of pack's and caption dedup's shuffles."""

import numpy as np
import pyarrow as pa
import pytest

from ovpipe.core.routed import read_routed, write_routed
from ovpipe.core.shards import Location


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"id": pa.array(np.arange(n) + 1000 * seed, pa.int64()),
                     "text": [f"row {i} " * int(k) for i, k in enumerate(rng.integers(0, 5, n))],
                     "tokens": pa.array([list(range(int(k))) for k in rng.integers(0, 4, n)], pa.list_(pa.int32()))})


@pytest.mark.parametrize("compression", ["zstd", None])
def test_every_destination_reads_back_its_rows_in_input_order_across_files(tmp_path, compression):
    n_dest = 7  # destinations 3 and 5 get no rows
    files, tables, routes = [], [], []
    for seed in range(3):
        t = _table(200, seed)
        route = np.random.default_rng(10 + seed).choice([0, 1, 2, 4, 6], t.num_rows)
        loc = Location.parse(str(tmp_path / f"map-{seed}.routed"))
        assert write_routed(loc, t, route, n_dest, compression) == loc.path
        files.append(loc), tables.append(t), routes.append(route)
    for d in range(n_dest):
        want = pa.concat_tables([t.filter(pa.array(r == d)) for t, r in zip(tables, routes)])
        got = read_routed(files, d, tables[0].schema)
        assert got.num_rows == want.num_rows and got.equals(want), d
    assert read_routed(files, 3, tables[0].schema).num_rows == 0
    assert read_routed([], 0, tables[0].schema).schema == tables[0].schema
    # after the header and offsets, a routed file is an ordinary Arrow IPC stream
    data = open(files[1].path, "rb").read()
    assert data[:8] == b"OVROUTE1"
    n = int.from_bytes(data[8:16], "little")
    batches = list(pa.ipc.open_stream(data[16 + 8 * (n + 1):]))
    assert n == n_dest and [b.num_rows for b in batches] == [int((routes[1] == d).sum()) for d in range(n_dest)]


def test_files_of_other_schemas_are_read_each_with_its_own(tmp_path):
    """The schema message is decoded once per run of equal schemas, never assumed: a file
    written with int32 ids beside one with int64 ids reads back right, cast to the asked schema."""
    a = pa.table({"id": pa.array([1, 2, 3], pa.int64())})
    b = pa.table({"id": pa.array([4, 5], pa.int32())})
    locs = [Location.parse(str(tmp_path / f"{k}.routed")) for k in "ab"]
    write_routed(locs[0], a, np.zeros(3, int), 1)
    write_routed(locs[1], b, np.zeros(2, int), 1)
    assert read_routed(locs + locs[:1], 0, a.schema).column("id").to_pylist() == [1, 2, 3, 4, 5, 1, 2, 3]
    not_routed = tmp_path / "x.routed"
    not_routed.write_bytes(b"PAR1" + bytes(40))
    with pytest.raises(ValueError, match="not a routed file"):
        read_routed([Location.parse(str(not_routed))], 0, a.schema)


def test_bad_routes_and_missing_files_are_named(tmp_path):
    t = _table(10, 0)
    loc = Location.parse(str(tmp_path / "m.routed"))
    with pytest.raises(ValueError, match=r"routes must lie in 0\.\.3"):
        write_routed(loc, t, np.full(10, 4), 4)
    write_routed(loc, t, np.zeros(10, int), 4)
    with pytest.raises(ValueError, match="has 4 destinations, not 6"):
        read_routed([loc], 5, t.schema)
    gone = Location.parse(str(tmp_path / "gone.routed"))
    with pytest.raises(FileNotFoundError) as e:
        read_routed([loc, gone], 0, t.schema)
    assert e.value.filename == gone.uri()
