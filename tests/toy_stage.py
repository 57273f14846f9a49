"""A toy stage for tests: the smallest real stage (one pass), used to test the stage model
itself and the registry (CLI, pipeline and Ray job entry points generated from one line)."""

from __future__ import annotations

from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import read_table
from ovpipe.core.stage import ShardOutput, SinglePassStage


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
