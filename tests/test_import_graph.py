"""The module import graph (scripts/import_graph.py) has no cycle, counting imports inside
functions, and the ground layer (ovpipe.core) imports no stage and nothing above it."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_and_the_ground_imports_no_stage():
    g = _graph_module()
    graph = g.build_graph()
    assert "ovpipe.core.stage" in graph and "curation.ingest" in graph  # it sees the project
    assert g.cycles(graph) == []
    assert g.layer_violations(graph) == []


def test_the_checker_finds_a_cycle_and_a_layer_violation():
    g = _graph_module()
    graph = {"ovpipe.core.shards": {"curation.ingest"}, "curation.ingest": {"ovpipe.core.shards"},
             "curation.balance": {"ovpipe.cli"}}
    assert g.cycles(graph) == [["curation.ingest", "ovpipe.core.shards"]]
    assert len(g.layer_violations(graph)) == 2
