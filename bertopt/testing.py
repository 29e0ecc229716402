"""Helpers for testing passes, bertopt's own and users': run a pipeline, compare with a golden,
check numeric parity with the original on ONNX Runtime.

    result = run_spec(model_path, "freeze-shapes,fuse-gelu", batch=2, seq=16)
    assert_graph_matches(result.graph, GOLDEN_DIR / "fuse-gelu" / "legacy14.after.txt")
    assert_parity(model_path, result)           # realistic padded inputs, fp32, 1e-4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph import ModelSource, load_graph, to_model
from bertopt.graph.golden import UPDATE_ENV, graph_text, text_diff
from bertopt.model.facts import ModelFacts, detect_facts
from bertopt.pipeline import Instruments, PassManager, PassOptions, PassRecord
from bertopt.report.diff import diff_graph_texts
from bertopt.validation.parity import Comparison, parity_check


@dataclass
class SpecResult:
    graph: gs.Graph
    facts: ModelFacts
    records: list[PassRecord]
    batch: int
    seq: int

    def record(self, name: str) -> PassRecord:
        """The record of the (last) run of pass `name`."""
        return [r for r in self.records if r.name == name][-1]


def run_spec(model: ModelSource, spec: str, *, batch: int, seq: int, **options) -> SpecResult:
    """Load `model`, run the pipeline `spec` with verification after every pass, return the result."""
    graph = load_graph(model)
    facts = detect_facts(graph)
    manager = PassManager(spec, PassOptions(batch=batch, seq=seq, **options), Instruments(verify_each=True))
    facts, records = manager.run(graph, facts)
    return SpecResult(graph, facts, records, batch, seq)


def assert_parity(original: ModelSource | os.PathLike, result: SpecResult, *, atol: float | None = None,
                  rtol: float | None = None, samples: int = 2) -> Comparison:
    """Both graphs on the same realistic inputs (ids across the vocab, padded masks); fail on a diff.

    Tolerances default to the model's dtype: 1e-4 for fp32, bertopt.validation.parity.FP16_ATOL for fp16."""
    comparison = parity_check(original, to_model(result.graph), result.facts, batch=result.batch,
                              seq=result.seq, samples=samples, atol=atol, rtol=rtol)
    assert comparison.passed, comparison.summary_line()
    return comparison


def assert_graph_matches(graph: gs.Graph, path: str | os.PathLike) -> None:
    """Compare `graph` with the snapshot at `path`; rewrite it when BERTOPT_UPDATE_GOLDENS=1."""
    path = Path(path)
    actual = graph_text(graph)
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        raise AssertionError(f"no golden at {path}; run `python tools/regen_goldens.py` and review it")
    expected = path.read_text()
    if expected != actual:
        raise AssertionError(f"graph differs from the golden {path}:\n{_structural_summary(expected, actual)}\n"
                             + text_diff(expected, actual, str(path), "this run"))


def _structural_summary(expected: str, actual: str) -> str:
    """What changed, by region ("layer 1 attention: Mul -> Div"), read from the two snapshot texts."""
    try:
        return diff_graph_texts(expected, actual, "golden", "this run").text()
    except BertoptError as exc:
        return f"(no structural summary: {exc})"
