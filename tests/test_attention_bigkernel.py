"""attention-bigkernel: goldens per export variant, parity, the six points of the standard form."""

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxsim
import pytest

from bertopt.ascend.check import check_ascend
from bertopt.errors import BertoptError
from bertopt.golden import assert_graph_matches, graph_text
from bertopt.graph import load_graph, save_graph, to_model
from bertopt.pipeline import Instruments, PassManager, PassOptions
from bertopt.testing import SpecResult, assert_parity, run_spec
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ

GOLDEN = GOLDEN_DIR / "attention-bigkernel"
PASS = "attention-bigkernel"


def run_pass(before: SpecResult, spec: str = PASS) -> SpecResult:
    """Run `spec` on a copy of an earlier result's graph (so the "before" stays intact)."""
    graph = before.graph.copy()
    options = PassOptions(batch=before.batch, seq=before.seq)
    manager = PassManager(spec, options, Instruments(verify_each=True))
    facts, records = manager.run(graph, before.facts)
    return SpecResult(graph, facts, records, before.batch, before.seq)


def frozen(path, spec: str = "freeze-shapes") -> SpecResult:
    return run_spec(path, spec, batch=TINY_BATCH, seq=TINY_SEQ)


def scale_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == "Mul" and n.name.startswith("bert_")]


@pytest.fixture(scope="module")
def onnxsim_export(tiny_export, tmp_path_factory):
    """The seed's step 2: onnxsim with fixed input shapes (MatMul+Add become Reshape -> Gemm -> Reshape)."""
    model = onnx.load(str(tiny_export("legacy14")))
    shapes = {tensor.name: [TINY_BATCH, TINY_SEQ] for tensor in model.graph.input}
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
    assert ok
    path = tmp_path_factory.mktemp("onnxsim") / "legacy14-sim.onnx"
    onnx.save(simplified, str(path))
    return path


@pytest.mark.golden
@pytest.mark.parametrize("variant, masks_expanded", [("legacy14", 0), ("legacy17", 0), ("dynamo18", 0)])
def test_golden_and_parity_per_export(tiny_export, variant, masks_expanded):
    path = tiny_export(variant)
    before = frozen(path)
    after = run_pass(before)
    assert_graph_matches(before.graph, GOLDEN / f"{variant}.before.txt")
    assert_graph_matches(after.graph, GOLDEN / f"{variant}.after.txt")
    record = after.record(PASS)
    assert record.changed
    assert record.counts["blocks_rewritten"] == record.counts["blocks_total"] == 2
    assert record.counts["k_transposes_split"] == 2
    assert record.counts["scales_rewritten"] == 2
    assert record.counts["masks_expanded"] == masks_expanded
    assert record.counts["reshapes_2d"] == 4  # first, last, two context Reshapes
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


@pytest.mark.golden
def test_golden_onnxsim_gemm_graph(onnxsim_export):
    before = run_spec(onnxsim_export, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    after = run_pass(before)
    assert_graph_matches(after.graph, GOLDEN / "legacy14-onnxsim.after.txt")
    counts = after.record(PASS).counts
    assert counts["gemms_to_matmul"] == 13  # 6 per layer and the QA head
    assert counts["reshapes_removed"] == 8  # onnxsim's flatten/unflatten around each Gemm of the layers
    assert counts["blocks_rewritten"] == 2
    ops = {n.op for n in after.graph.nodes}
    assert "Gemm" not in ops
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(onnxsim_export, after)


@pytest.mark.golden
def test_golden_with_the_folded_mask(tiny_export):
    path = tiny_export("legacy14")
    before = frozen(path, "freeze-shapes,fold-attention-mask")
    after = run_pass(before)
    assert_graph_matches(after.graph, GOLDEN / "legacy14-folded.after.txt")
    assert after.record(PASS).counts["masks_expanded"] == 1
    expands = [n for n in after.graph.nodes if n.op == "Expand"]
    assert len(expands) == 1 and expands[0].outputs[0].shape == [TINY_BATCH, 1, TINY_SEQ, TINY_SEQ]
    assert len(expands[0].outputs[0].outputs) == 2  # one Expand shared by both layers
    report = check_ascend(after.graph)
    assert report.conforming, report.render()
    assert_parity(path, after)


def test_commuted_operands_give_the_same_graph(tiny_export):
    before = frozen(tiny_export("legacy14"))
    commuted = before.graph.copy()
    for node in commuted.nodes:
        if node.op in ("Add", "Mul") and len(node.inputs) == 2:
            first, second = node.inputs[0], node.inputs[1]
            node.inputs.clear()
            node.inputs.extend([second, first])
    swapped = SpecResult(commuted, before.facts, before.records, before.batch, before.seq)
    assert graph_text(run_pass(swapped).graph) == graph_text(run_pass(before).graph)


def test_div_scale_becomes_a_bert_mul(tiny_export):
    """Older exports scale with Div(sqrt(head_dim)); ATC wants Mul(1/sqrt(head_dim)) named bert_*."""
    path = tiny_export("legacy14")
    before = frozen(path)
    for node in before.graph.nodes:
        if node.op == "Mul" and any(isinstance(t, gs.Constant) and t.values.size == 1
                                    and np.isclose(t.values, 0.25) for t in node.inputs):
            node.op = "Div"
            index = next(i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant))
            node.inputs[index] = gs.Constant(f"{node.name}_divisor", np.array(4.0, dtype=np.float32))
            if index == 0:
                first, second = node.inputs[0], node.inputs[1]
                node.inputs.clear()
                node.inputs.extend([second, first])
    assert sum(n.op == "Div" for n in before.graph.nodes) > 2
    after = run_pass(before)
    scales = scale_nodes(after.graph)
    assert len(scales) == 2
    assert all(float(n.inputs[1].values) == pytest.approx(0.25) for n in scales)
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


@pytest.mark.parametrize("variant, overrides", [
    ("legacy14", dict(hidden_size=48, num_attention_heads=3, intermediate_size=96)),
    ("legacy17", dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)),
    ("dynamo18", dict(hidden_size=64, num_attention_heads=2, intermediate_size=128)),
])
def test_other_sizes(tiny_export, variant, overrides):
    path = tiny_export(variant, **overrides)
    after = frozen(path, f"freeze-shapes,{PASS}")
    hidden, heads = overrides["hidden_size"], overrides["num_attention_heads"]
    assert (after.facts.hidden, after.facts.heads) == (hidden, heads)
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()
    context = [n for n in after.graph.nodes if n.op == "Reshape" and n.inputs[0].inputs
               and n.inputs[0].inputs[0].op == "Transpose"]
    assert [c.inputs[1].values.tolist() for c in context] == [[-1, hidden]] * 2
    scale = 1 / math.sqrt(hidden // heads)
    assert [float(n.inputs[1].values) for n in scale_nodes(after.graph)] == pytest.approx([scale] * 2)
    assert_parity(path, after)


def test_sdpa_export_after_mask_folding(tiny_export):
    """SDPA scales Q and K by sqrt(scale) each and reshapes the context to its own shape."""
    path = tiny_export("sdpa14")
    after = frozen(path, f"freeze-shapes,fold-attention-mask,{PASS}")
    assert after.record(PASS).counts["scales_rewritten"] == 2
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


def test_second_run_reports_no_change(tiny_export):
    result = frozen(tiny_export("dynamo18"), f"freeze-shapes,{PASS},{PASS}")
    first, second = result.records[1:]
    assert first.changed and not second.changed
    assert second.notes == ["all 2 attention blocks are already in the standard form ATC fuses"]


def test_unmatched_blocks_are_named_and_left_alone(tiny_export):
    """Without fold-attention-mask the SDPA NaN guard sits between Softmax and the context MatMul."""
    before = frozen(tiny_export("sdpa14"))
    after = run_pass(before)
    record = after.record(PASS)
    assert not record.changed
    assert graph_text(after.graph) == graph_text(before.graph)
    note = record.notes[0]
    assert "layer 0 (Softmax" in note and "layer 1 (Softmax" in note
    assert "expected Softmax, found Where" in note


def test_requires_static_shapes(tiny_export):
    with pytest.raises(BertoptError, match="requires that every graph input has a static shape"):
        run_spec(tiny_export("legacy14"), PASS, batch=TINY_BATCH, seq=TINY_SEQ)


def test_result_saves_and_reloads_conforming(tiny_export, tmp_path):
    after = frozen(tiny_export("legacy17"), f"freeze-shapes,{PASS}")
    path = save_graph(after.graph, tmp_path / "bigkernel.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert check_ascend(path).blocks_conforming
    assert to_model(load_graph(path)).graph.node


@pytest.mark.integration
def test_bert_base_seq384(tmp_path):
    from bertopt.export import export_onnx, resolve_source

    path = export_onnx(resolve_source("bert-base"), tmp_path / "bert-base.onnx", exporter="legacy").path
    after = run_spec(path, f"freeze-shapes,{PASS}", batch=1, seq=384)
    report = check_ascend(after.graph)
    assert len(report.blocks) == 12 and report.blocks_conforming, report.render()
    assert after.record(PASS).counts["blocks_rewritten"] == 12
    assert_parity(path, after, samples=1)
