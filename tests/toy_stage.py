"""A toy stage for tests: the smallest real stage (one pass), used to test the stage model
itself and the registry (CLI, pipeline and Ray job entry points generated from one line)."""

from __future__ import annotations

import pyarrow as pa

from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import read_table
from ovpipe.core.stage import Pass, ShardOutput, SinglePassStage, Stage


class KeepEvenStage(SinglePassStage):
    """A tiny stage: keeps rows with an even `x` and ledgers the odd ones (drop_odd=False: keeps all)."""

    name = "keep_even"
    config_sections = ("run",)
    schema_version = 1
    input_suffixes = (".parquet",)

    def __init__(self, drop_odd: bool = True):
        self.drop_odd = drop_odd

    def process(self, task):
        table = read_table(task.input)
        ledger = Ledger(self.name)
        keep = []
        for i, x in enumerate(table.column("x").to_pylist()):
            if self.drop_odd and x % 2:
                ledger.drop(f"{task.input.uri()}#row={i}", "odd", str(x), None)
            else:
                keep.append(i)
        return ShardOutput(table.take(keep), ledger, table.num_rows)


class MarkPass(Pass):
    """Pass 1 of the two-pass toy: keeps every row, adds `seed`; fails on the shards in `fail`."""

    name = "mark"
    config_sections = ("run",)
    folder = "_marked"

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail = fail

    def process(self, task):
        if task.shard in self.fail:
            raise RuntimeError(f"toy failure in {task.shard}")
        table = read_table(task.input)
        seed = task.config.run.seed
        return ShardOutput(table.append_column("seed", pa.array([seed] * table.num_rows, pa.int64())),
                           Ledger(self.name), table.num_rows)


class KeepEvenAfterMark(KeepEvenStage):
    """Pass 2 of the two-pass toy: KeepEvenStage reading pass 1, writing the stage's output."""

    name = "keep_even_marked"
    config_sections = ("run", "pack")  # a section pass 1 does not hash: a change only pass 2 sees
    reads = "mark"
    folder = ""


class TwoPassToy(Stage):
    """mark (OUT/_marked) -> keep_even_marked (OUT): the smallest multi-pass stage."""

    name = "two_pass_toy"

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail = fail

    def passes(self):
        return [MarkPass(self.fail), KeepEvenAfterMark()]


class OptionalToy(KeepEvenStage):
    """An optional step for the pipeline's step choice: enabled when run.seed is 7."""

    name = "optional_toy"

    def enabled(self, cfg) -> bool:
        return cfg.run.seed == 7
