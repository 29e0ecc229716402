"""legalize-ascend and legalize-ort: goldens, Gelu written back as its own function, opset/IR
lowering, ATC's operator list, no-change runs, parity with the original on ONNX Runtime."""

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from bertopt.errors import BertoptError
from bertopt.golden import assert_graph_matches, graph_text
from bertopt.graph import to_model, verify
from bertopt.passes.fuse_gelu import SQRT_2_OVER_PI, gelu_kind
from bertopt.ascend.legality import atc_operator_list
from bertopt.passes.legalize_ascend import (canonical_erf_pattern, canonical_tanh_pattern,
                                            legalize_ascend)
from bertopt.pipeline import PassOptions
from bertopt.testing import assert_parity, run_spec
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ

ASCEND = "freeze-shapes,fuse-gelu,legalize-ascend"
ORT = "freeze-shapes,fuse-gelu,legalize-ort"


def ops(graph: gs.Graph) -> Counter:
    return Counter(n.op for n in graph.nodes)


def assert_atc_form(graph: gs.Graph, erf_sites: int, tanh_sites: int) -> None:
    """Every Gelu is the canonical subgraph of its own function, and nothing else is left."""
    canonical = (len(canonical_erf_pattern().find_all(graph)), len(canonical_tanh_pattern().find_all(graph)))
    assert canonical == (erf_sites, tanh_sites)
    assert (ops(graph)["Erf"], ops(graph)["Tanh"]) == (erf_sites, tanh_sites)
    assert not any(gelu_kind(n) for n in graph.nodes)
    assert not any(n.domain for n in graph.nodes)


# --- legalize-ascend on exports ---------------------------------------------------------------------

@pytest.mark.golden
@pytest.mark.parametrize("variant, act, erf_sites, tanh_sites", [
    ("dynamo20", "gelu", 2, 0),                 # ONNX Gelu op, opset 20 -> 17
    ("dynamo20", "gelu_pytorch_tanh", 0, 2),    # Gelu(approximate="tanh") stays tanh
    ("legacy14", "gelu_new", 0, 2),             # com.microsoft.FastGelu back to the tanh form
    ("legacy17", "gelu", 2, 0),
])
def test_legalize_ascend_golden_form_and_parity(tiny_export, variant, act, erf_sites, tanh_sites):
    path = tiny_export(variant, hidden_act=act)
    result = run_spec(path, ASCEND, batch=TINY_BATCH, seq=TINY_SEQ)
    assert_graph_matches(result.graph, GOLDEN_DIR / "legalize-ascend" / f"{variant}-{act}.after.txt")
    assert_atc_form(result.graph, erf_sites, tanh_sites)
    model = to_model(result.graph)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", min(17, result.facts.opset))]
    assert result.facts.opset <= 17 and model.ir_version <= 8
    assert set(ops(result.graph)) <= atc_operator_list()
    record = result.record("legalize-ascend")
    assert (record.counts["gelu_erf_written"], record.counts["gelu_tanh_written"]) == (erf_sites, tanh_sites)
    assert record.counts["shape_ops"] == 0
    assert record.counts["fp16_unsafe_constants"] == 1  # the exporter's -3.4e38 mask fill (not this pass's job)
    assert_parity(path, result)


def test_dynamo20_lowers_to_opset17_ir8(tiny_export):
    result = run_spec(tiny_export("dynamo20"), ASCEND, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record("legalize-ascend")
    assert record.counts["lowered_Split"] == 1
    assert "opset 20 -> 17, IR version 10 -> 8" in record.notes[0]
    split = next(n for n in result.graph.nodes if n.op == "Split")
    assert "num_outputs" not in split.attrs


def test_without_fuse_gelu_the_same_canonical_graph(tiny_export):
    """legalize-ascend alone canonicalises dynamo's x*(0.5*(1+erf)) exactly as after fuse-gelu."""
    path = tiny_export("dynamo18")
    direct = run_spec(path, "freeze-shapes,legalize-ascend", batch=TINY_BATCH, seq=TINY_SEQ)
    via_fusion = run_spec(path, ASCEND, batch=TINY_BATCH, seq=TINY_SEQ)
    assert graph_text(direct.graph) == graph_text(via_fusion.graph)
    assert direct.record("legalize-ascend").counts["gelu_erf_written"] == 2
    assert_parity(path, direct)


def test_second_run_is_no_change(tiny_export):
    result = run_spec(tiny_export("dynamo20"), ASCEND + ",legalize-ascend", batch=1, seq=8)
    first, second = result.records[-2:]
    assert first.changed and not second.changed
    assert second.notes[0].startswith("already legal for ATC: opset 17, IR 8")
    assert (second.counts["gelu_erf_written"], second.counts["gelu_tanh_written"]) == (0, 0)


def test_leftovers_are_reported_not_fixed(tiny_export):
    """Shape ops and fp16-unsafe constants belong to other passes: counted and described only."""
    path = tiny_export("legacy14")
    once = run_spec(path, ASCEND, batch=1, seq=8)
    assert once.record("legalize-ascend").changed  # legacy writes Mul(0.5, .), not Mul(., 0.5)
    unfrozen = run_spec(path, "legalize-ascend", batch=1, seq=8).record("legalize-ascend")
    assert unfrozen.counts["shape_ops"] > 0
    assert "Shape op(s) remain" in unfrozen.notes[1]
    assert "outside the fp16 range" in unfrozen.notes[2]


# --- tanh is never written back as erf ----------------------------------------------------------------

def _single_op_graph(op: str, domain: str | None, attrs: dict, opset: int) -> gs.Graph:
    x = gs.Variable("x", np.float32, [4, 64])
    y = gs.Variable("y", np.float32, [4, 64])
    node = gs.Node(op, "gelu", attrs=attrs, inputs=[x], outputs=[y], domain=domain)
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=opset)


def _run(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(to_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("op, domain, attrs, opset", [("FastGelu", "com.microsoft", {}, 17),
                                                      ("Gelu", None, {"approximate": "tanh"}, 20)])
def test_tanh_gelu_is_never_written_back_as_erf(op, domain, attrs, opset):
    """Over [-4, 4] the two Gelus differ by up to ~5e-4: the written graph must compute tanh's."""
    x = np.linspace(-4, 4, 256, dtype=np.float32).reshape(4, 64)
    tanh_gelu = 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    erf_gelu = 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    assert np.max(np.abs(tanh_gelu - erf_gelu)) > 1e-4
    graph = _single_op_graph(op, domain, attrs, opset)
    np.testing.assert_allclose(_run(graph, x), tanh_gelu, atol=1e-5)
    result = legalize_ascend(graph, None, PassOptions())
    graph.cleanup().toposort()
    verify(graph)
    assert result.counts["gelu_tanh_written"] == 1 and result.counts["gelu_erf_written"] == 0
    assert_atc_form(graph, erf_sites=0, tanh_sites=1)
    assert graph.opset == 17
    np.testing.assert_allclose(_run(graph, x), tanh_gelu, atol=1e-5)


def test_erf_gelu_with_bias_written_back_as_erf():
    graph = _single_op_graph("BiasGelu", "com.microsoft", {}, 17)
    bias = gs.Constant("bias", np.linspace(-1, 1, 64, dtype=np.float32))
    graph.nodes[0].inputs.append(bias)
    x = np.linspace(-4, 4, 256, dtype=np.float32).reshape(4, 64)
    expected = _run(graph, x)
    legalize_ascend(graph, None, PassOptions())
    graph.cleanup().toposort()
    verify(graph)
    assert_atc_form(graph, erf_sites=1, tanh_sites=0)
    np.testing.assert_allclose(_run(graph, x), expected, atol=1e-5)


# --- opset lowering on hand-built graphs -----------------------------------------------------------

def test_reduce_axes_and_uneven_split_lowered_from_opset18():
    x = gs.Variable("x", np.float32, [2, 5, 6])
    mean = gs.Variable("mean", np.float32, [2, 5, 1])
    a, b = gs.Variable("a", np.float32, [2, 3, 1]), gs.Variable("b", np.float32, [2, 2, 1])
    axes = gs.Constant("axes", np.array([-1], np.int64))
    graph = gs.Graph(nodes=[gs.Node("ReduceMean", "mean", {"keepdims": 1}, [x, axes], [mean]),
                            gs.Node("Split", "split", {"axis": 1, "num_outputs": 2}, [mean], [a, b])],
                     inputs=[x], outputs=[a, b], opset=18)
    graph.ir_version = 10
    feed = np.random.default_rng(0).standard_normal((2, 5, 6)).astype(np.float32)
    session = ort.InferenceSession(to_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": feed})
    result = legalize_ascend(graph, None, PassOptions())
    graph.cleanup().toposort()
    verify(graph)
    assert result.counts["lowered_ReduceMean"] == 1 and result.counts["lowered_Split"] == 1
    model = to_model(graph)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    reduce, split = graph.nodes
    assert reduce.attrs["axes"] == [-1] and len(reduce.inputs) == 1
    assert list(split.inputs[1].values) == [3, 2]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, {"x": feed}), expected):
        np.testing.assert_array_equal(got, want)


def test_newer_op_without_an_opset17_form_is_refused():
    """Pad-18's `axes` input has no opset-13 spelling bertopt knows; say so rather than guess."""
    x, y = gs.Variable("x", np.float32, [4, 64]), gs.Variable("y", np.float32, [4, 66])
    pads, axes = gs.Constant("pads", np.array([1, 1], np.int64)), gs.Constant("axes", np.array([1], np.int64))
    graph = gs.Graph(nodes=[gs.Node("Pad", "pad", inputs=[x, pads, gs.Variable.empty(), axes], outputs=[y])],
                     inputs=[x], outputs=[y], opset=18)
    with pytest.raises(BertoptError, match="Pad 'pad' \\(opset 18\\) has 4 inputs, opset 17 takes at most 3"):
        legalize_ascend(graph, None, PassOptions())


# --- ATC's operator list -----------------------------------------------------------------------------

def test_atc_list_has_what_bert_needs_and_no_gelu():
    supported = atc_operator_list()
    assert {"Erf", "LayerNormalization", "MatMul", "Softmax", "Where", "GatherND", "Tanh", "Pow"} <= supported
    assert "Gelu" not in supported and "Attention" not in supported
    assert all(onnx.defs.has(op) for op in supported - {
        "AdaptiveAvgPool2D", "AscendAntiQuant", "AscendQuant", "BatchMultiClassNMS", "Corr", "DeformableConv2D",
        "DynSeqOuter", "EmbeddingBag", "LSTMP", "MovingSumWithSigmoid", "RoiExtractor"})


def test_ops_outside_atc_list_are_named():
    graph = _single_op_graph("CastLike", None, {}, 17)
    graph.nodes[0].inputs.append(graph.inputs[0])
    extra = gs.Variable("z", np.float32, [4, 64])
    graph.nodes.append(gs.Node("FusedMatMul", "fmm", inputs=[graph.outputs[0], graph.inputs[0]],
                               outputs=[extra], domain="com.microsoft"))
    graph.outputs.append(extra)
    with pytest.raises(BertoptError, match=r"has no CastLike \(x1\), com.microsoft.FusedMatMul \(x1\); "
                                           "atc would reject this model"):
        legalize_ascend(graph, None, PassOptions())


def test_onnx_attention_op_is_reported_through_the_pipeline(tiny_export):
    with pytest.raises(BertoptError, match=r"pass legalize-ascend: .*has no Attention \(x2\)"):
        run_spec(tiny_export("dynamo23sdpa"), "legalize-ascend", batch=1, seq=8)


# --- legalize-ort ------------------------------------------------------------------------------------

@pytest.mark.golden
@pytest.mark.parametrize("variant", ["dynamo18", "legacy14"])
def test_legalize_ort_fuses_what_is_left(tiny_export, variant):
    path = tiny_export(variant)
    result = run_spec(path, "freeze-shapes,legalize-ort", batch=TINY_BATCH, seq=TINY_SEQ)
    assert_graph_matches(result.graph, GOLDEN_DIR / "legalize-ort" / f"{variant}.after.txt")
    record = result.record("legalize-ort")
    assert record.changed and record.counts == {"gelu_erf": 2, "gelu_tanh": 0}
    assert Counter(f"{n.domain}.{n.op}" for n in result.graph.nodes if gelu_kind(n)) == {"com.microsoft.Gelu": 2}
    assert_parity(path, result)


@pytest.mark.parametrize("variant", ["legacy17", "dynamo20"])
def test_legalize_ort_after_fuse_gelu_is_no_change(tiny_export, variant):
    path = tiny_export(variant)
    result = run_spec(path, ORT, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record("legalize-ort")
    assert not record.changed
    assert record.notes == ["nothing to legalise for ONNX Runtime: no decomposed Gelu (2 Gelu op(s) already fused)"]
    assert_parity(path, result)
