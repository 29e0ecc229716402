"""gemm-to-matmul: onnxsim's Gemms as MatMul -> Add (golden, counts, parity), transB and bias-less Gemms,
Gemms that are not linear layers left alone and named, no change where there is no Gemm."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ

from bertopt.ascend.check import check_ascend
from bertopt.graph import save_graph
from bertopt.testing import assert_graph_matches, assert_parity, run_spec

PASS = "gemm-to-matmul"
LINEAR_GEMMS = 13  # Q, K, V, output, two FFN Gemms per layer, and the QA head


def gemms(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == "Gemm"]


@pytest.fixture(scope="module")
def frozen_onnxsim(onnxsim_export):
    return run_spec(onnxsim_export, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ).graph


def edited(graph: gs.Graph, path, edit) -> str:
    """A copy of `graph` with `edit(gemm, graph)` applied to every Gemm, saved to `path`."""
    copy = graph.copy()
    for gemm in gemms(copy):
        edit(gemm, copy)
    return save_graph(copy, path)


@pytest.mark.golden
def test_golden_counts_and_parity(onnxsim_export):
    result = run_spec(onnxsim_export, f"freeze-shapes,{PASS}", batch=TINY_BATCH, seq=TINY_SEQ)
    assert_graph_matches(result.graph, GOLDEN_DIR / PASS / "legacy14-onnxsim.after.txt")
    record = result.record(PASS)
    assert record.changed and record.counts == {"gemms_to_matmul": LINEAR_GEMMS}
    assert gemms(result.graph) == []
    matmuls = [n for n in result.graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    assert len(matmuls) == LINEAR_GEMMS
    assert all([r.op for r in n.outputs[0].outputs] == ["Add"] for n in matmuls)  # each with its bias
    assert_parity(onnxsim_export, result)


def test_the_attention_projections_become_what_atc_reads(onnxsim_export):
    """After it, attention-bigkernel brings every block into the standard form (the `default` order)."""
    result = run_spec(onnxsim_export, f"freeze-shapes,{PASS},attention-bigkernel", batch=TINY_BATCH, seq=TINY_SEQ)
    report = check_ascend(result.graph)
    assert report.blocks_conforming, report.render()
    assert_parity(onnxsim_export, result)


def test_transposed_weights_and_missing_bias(frozen_onnxsim, tmp_path):
    """transB Gemms get their weight written transposed; a Gemm without bias is a MatMul alone."""
    def transposed_without_bias(gemm: gs.Node, graph: gs.Graph) -> None:
        weight = gemm.inputs[1]
        gemm.inputs[1] = gs.Constant(f"{weight.name}_t", np.ascontiguousarray(weight.values.T))
        gemm.attrs["transB"] = 1
        gemm.inputs.pop(2)

    source = edited(frozen_onnxsim, tmp_path / "transb.onnx", transposed_without_bias)
    result = run_spec(source, PASS, batch=TINY_BATCH, seq=TINY_SEQ)
    assert result.record(PASS).counts == {"gemms_to_matmul": LINEAR_GEMMS}
    assert gemms(result.graph) == []
    weights = [n.inputs[1] for n in result.graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    assert len(weights) == LINEAR_GEMMS and all("_t_transposed" in w.name for w in weights)
    adds = sum(n.op == "Add" for n in frozen_onnxsim.nodes)
    assert sum(n.op == "Add" for n in result.graph.nodes) == adds  # none for the missing biases
    assert_parity(source, result)


def test_gemms_that_are_not_linear_layers_stay(frozen_onnxsim, tmp_path):
    def scaled(gemm: gs.Node, graph: gs.Graph) -> None:
        gemm.attrs["alpha"] = 0.5

    source = edited(frozen_onnxsim, tmp_path / "alpha.onnx", scaled)
    result = run_spec(source, PASS, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(PASS)
    assert not record.changed and len(gemms(result.graph)) == LINEAR_GEMMS
    assert record.notes[0].startswith("no linear-layer Gemm: nearest candidate Gemm '")
    assert "fails a linear layer (transA 0, alpha 1, beta 1)" in record.notes[0]


def test_no_gemm_no_change(tiny_export):
    result = run_spec(tiny_export("legacy14"), f"freeze-shapes,{PASS}", batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(PASS)
    assert not record.changed
    assert record.notes == ["no linear-layer Gemm: the graph has no Gemm node"]
