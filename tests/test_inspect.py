"""`ovpipe inspect`: schema, row count, rows with concept names, a pack decoded with image markers,
ledger examples by stage and reason; clear errors for paths that are not ovpipe outputs. Stage
outputs come from the real runner (ovpipe.core.stage.run_stage, local executor: no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.concepts import load_builtin_vocabulary
from ovpipe.cli import main
from ovpipe.config import load_config
from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import read_table
from ovpipe.core.stage import ShardOutput, SinglePassStage, run_stage
from ovpipe.inspect_output import InspectError, decode_with_markers, describe
from packing import tokenizer as ptok
from tests.helpers import write_test_packs
from tests.toy_stage import KeepEvenStage


class ConceptToy(SinglePassStage):
    """Keeps every row; hashes the assign section, as the assign stage does (so its header names
    the vocabulary)."""

    name = "concept_toy"
    config_sections = ("assign",)

    def process(self, task):
        table = read_table(task.input)
        return ShardOutput(table, Ledger(self.name), table.num_rows)


def _cfg():
    return load_config(overrides=["run.executor=local"])


@pytest.fixture()
def outputs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({
        "sample_id": [f"{x:016x}" for x in range(5)], "x": list(range(5)),
        "caption": ["a red circle", "一只猫", "a dog on a sofa", "a blue square", "a tree"],
        "width": [64, 80, 96, 40, 30], "height": [48, 60, 96, 40, 30],
        "image": [b"\x89PNG" + bytes(100 * (i + 1)) for i in range(5)],
        "concept_ids": pa.array([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], pa.list_(pa.int32(), 2)),
    }), raw / "part-0.parquet")
    assigned, kept = tmp_path / "assigned", tmp_path / "kept"
    run_stage(ConceptToy(), str(raw), str(assigned), _cfg(), quiet=True)
    run_stage(KeepEvenStage(), str(assigned), str(kept), _cfg(), quiet=True)
    return assigned, kept


def test_inspect_shows_schema_rows_and_concept_names(outputs):
    assigned, kept = outputs
    names = [en for en, _ in load_builtin_vocabulary()]
    text = describe(str(assigned), rows=2)
    assert "stage: concept_toy" in text and "rows: 5 in the data files" in text
    assert "concept_ids: fixed_size_list<element: int32>[2]" in text
    assert f"0 {names[0]!r}, 1 {names[1]!r}" in text  # ids named from the vocabulary in the header
    assert '"一只猫"' in text and "<104 bytes>" in text  # text as text, bytes as sizes
    assert f"4 {names[4]!r}" not in text  # only the rows asked for
    # a downstream output (its header has no assign section) finds the names through its inputs
    down = describe(str(kept), rows=3)
    assert "rows: 3 in the data files; samples read 5, kept 3, dropped 2" in down
    assert f"4 {names[4]!r}, 5 {names[5]!r}" in down


def test_inspect_ledger_examples_by_stage_and_reason(outputs):
    _, kept = outputs
    text = describe(str(kept), rows=0, stage="keep_even", reason="odd", ledger_rows=1)
    assert "keep_even      odd" in text and "examples of keep_even/odd" in text
    assert text.count("#row=") == 1  # --ledger-rows 1
    none = describe(str(kept), rows=0, reason="no_such_reason")
    assert "no rows with stage=* reason=no_such_reason; the ledger has: keep_even/odd" in none


def test_inspect_decodes_a_pack_with_image_markers(tmp_path):
    tok = ptok.load_tokenizer("qwen")
    (path,) = write_test_packs(tmp_path / "packs", tok, n_shards=1, packs_per_shard=1)
    pack = pq.read_table(path).to_pylist()[0]
    text, images = decode_with_markers(tok, pack["input_ids"], pack["image_hw"])
    assert images == len(pack["image_hw"]) > 0
    h, w = pack["image_hw"][0]
    assert f"<|vision_start|><image #0 {h}x{w}: {ptok.image_tokens(h, w)} tokens><|vision_end|>" in text
    assert "<|image_pad|>" not in text and text.count("<|im_start|>assistant") == len(pack["sample_ids"])
    printed = describe(str(path), rows=1)
    assert "pack_id: string" in printed and f"pack {pack['pack_id']} decoded" in printed


def test_inspect_cli_and_clear_errors(outputs, tmp_path, capsys):
    assigned, _ = outputs
    assert main(["inspect", str(assigned), "--rows", "1"]) == 0
    assert "first 1 of 5 rows" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    with pytest.raises(InspectError, match="not an ovpipe stage output"):
        describe(str(tmp_path / "plain"))
    json.loads((assigned / "_manifest" / "_stage.json").read_text())  # inspect wrote nothing over it
