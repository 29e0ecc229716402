"""legalize-ascend and legalize-ort: goldens, Gelu written back as its own function, lowering to a CANN
version (opset, IR version, LayerNormalization decomposed), its operator list, no-change runs, parity
with the original on ONNX Runtime."""

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.ascend.cann import cann_target
from bertopt.ascend.check import check_ascend
from bertopt.ascend.gates import atc_gelu_pattern, fusion_gates
from bertopt.ascend.layernorm import decomposed_layernorm_pattern
from bertopt.ascend.legality import check_model_level
from bertopt.errors import BertoptError, CheckFailed
from bertopt.graph import to_model, verify
from bertopt.graph.golden import graph_text
from bertopt.model.forms import SQRT_2_OVER_PI, canonical_erf_pattern, canonical_tanh_pattern, gelu_kind
from bertopt.passes.legalize_ascend import legalize_ascend
from bertopt.pipeline import PassOptions, PassResult
from bertopt.testing import assert_graph_matches, assert_parity, run_spec
from bertopt.validation.parity import FP16_ATOL

ASCEND = "freeze-shapes,fuse-gelu,legalize-ascend"
FULL_ASCEND = "freeze-shapes,fold-attention-mask,fuse-gelu,attention-bigkernel,legalize-ascend"
CANN6, CANN8 = cann_target("6.0"), cann_target("8.0")
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

def assert_legal(graph: gs.Graph, target) -> None:
    failed = [f"{c.name}: {c.reason}" for c in check_model_level(graph, target) if c.ok is False]
    assert failed == []


@pytest.mark.golden
@pytest.mark.parametrize("variant, act, erf_sites, tanh_sites", [
    ("dynamo20", "gelu", 2, 0),                 # ONNX Gelu op, opset 20 -> 13 (the default CANN 6.0)
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
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert model.ir_version == 7 and "LayerNormalization" not in ops(result.graph)
    assert set(ops(result.graph)) <= CANN6.operators
    record = result.record("legalize-ascend")
    written = record.counts["gelu_erf_written"] + record.counts["gelu_tanh_written"]
    assert written + result.record("fuse-gelu").counts["gelu_atc_form"] == erf_sites + tanh_sites
    assert record.counts["shape_ops"] == 0
    assert record.counts["fp16_unsafe_constants"] == 1  # the exporter's -3.4e38 mask fill (not this pass's job)
    assert_parity(path, result)


@pytest.mark.parametrize("cann, note", [(CANN6, "CANN 6.0: opset 20 -> 13, IR version 10 -> 7"),
                                         (CANN8, "CANN 8.0: opset 20 -> 17, IR version 10 -> 8")])
def test_dynamo20_lowers_to_the_versions_opset_and_ir(tiny_export, cann, note):
    result = run_spec(tiny_export("dynamo20"), ASCEND, batch=TINY_BATCH, seq=TINY_SEQ, cann=cann)
    record = result.record("legalize-ascend")
    assert record.counts["lowered_Split"] == 1
    assert note in record.notes[0]
    split = next(n for n in result.graph.nodes if n.op == "Split")
    assert "num_outputs" not in split.attrs


# --- the case: a dynamo opset-18 export through the whole ascend pipeline, per CANN version ----------

def test_dynamo18_for_cann6_is_opset13_ir7_with_layernorms_atc_fuses(tiny_export):
    path = tiny_export("dynamo18")
    assert ops(run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ).graph)["LayerNormalization"] == 5
    result = run_spec(path, FULL_ASCEND, batch=TINY_BATCH, seq=TINY_SEQ, cann=CANN6)
    model = to_model(result.graph)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)] and model.ir_version == 7
    assert "LayerNormalization" not in ops(result.graph)
    record = result.record("legalize-ascend")
    assert record.counts["layernorm_decomposed"] == 5
    assert "5 LayerNormalization(s) decomposed" in record.notes[0]
    # the shape LayerNormONNXFusionPass fuses: one shared Sub, Pow(2), eps Add, gamma/beta on input 1
    matches = decomposed_layernorm_pattern().find_all(result.graph)
    assert len(matches) == 5
    assert all(len(m.node("centred").outputs[0].outputs) == 2 for m in matches)
    assert_legal(result.graph, CANN6)
    assert_parity(path, result)


def test_dynamo18_for_cann8_keeps_layernormalization_at_opset17(tiny_export):
    path = tiny_export("dynamo18")
    result = run_spec(path, FULL_ASCEND, batch=TINY_BATCH, seq=TINY_SEQ, cann=CANN8)
    model = to_model(result.graph)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and model.ir_version == 8
    assert ops(result.graph)["LayerNormalization"] == 5
    assert result.record("legalize-ascend").counts["layernorm_decomposed"] == 0
    assert_legal(result.graph, CANN8)
    assert_parity(path, result)


def test_legacy14_for_cann8_keeps_its_opset(tiny_export):
    """Opset 14 is inside every op's CANN 8.0 range (ReduceMean: 8-16): nothing to lower or decompose."""
    path = tiny_export("legacy14")
    result = run_spec(path, FULL_ASCEND, batch=TINY_BATCH, seq=TINY_SEQ, cann=CANN8)
    assert int(result.graph.opset) == 14 and ops(result.graph)["ReduceMean"] == 10
    assert_legal(result.graph, CANN8)
    assert_parity(path, result)


def test_without_fuse_gelu_the_same_canonical_graph(tiny_export):
    """legalize-ascend alone canonicalises dynamo's x*(0.5*(1+erf)) exactly as after fuse-gelu."""
    path = tiny_export("dynamo18")
    direct = run_spec(path, "freeze-shapes,legalize-ascend", batch=TINY_BATCH, seq=TINY_SEQ)
    via_fusion = run_spec(path, ASCEND, batch=TINY_BATCH, seq=TINY_SEQ)
    assert graph_text(direct.graph) == graph_text(via_fusion.graph)
    assert direct.record("legalize-ascend").counts["gelu_erf_written"] == 2
    assert_parity(path, direct)


# --- float16 models ----------------------------------------------------------------------------------

FLOAT16 = np.dtype(np.float16)


@pytest.mark.parametrize("variant", ["legacy17", "dynamo18", "dynamo18sdpa"])
def test_fp16_layernormalization_decomposed_in_float16(user_export, variant):
    """CANN 6.0 has no LayerNormalization: the float16 op is written out in float16, constants typed like
    its input (ATC's Pow and Add take one type), within the float16 tolerance of the original."""
    path = user_export(variant=variant, dtype="fp16")
    result = run_spec(path, "freeze-shapes,fold-attention-mask,legalize-ascend", batch=TINY_BATCH, seq=TINY_SEQ,
                      cann=CANN6)  # SDPA's NaN guards (IsNaN, not in CANN 6.0's list) go with the mask
    assert result.record("legalize-ascend").counts["layernorm_decomposed"] == 5
    matches = decomposed_layernorm_pattern().find_all(result.graph)
    assert len(matches) == 5
    assert {m["x"].dtype for m in matches} == {m["two"].values.dtype for m in matches} == {FLOAT16}
    assert {float(m["epsilon"].values) for m in matches} == {float(np.finfo(FLOAT16).smallest_subnormal)}
    assert_legal(result.graph, CANN6)
    comparison = assert_parity(path, result, samples=3)
    assert {o.atol for o in comparison.outputs} == {FP16_ATOL}


def float32_gelus(graph: gs.Graph) -> list:
    """The canonical erf Gelus, each computing in float32 between a Cast from and a Cast back to float16."""
    found = []
    for match in canonical_erf_pattern().find_all(graph):
        cast_in, cast_out = match["x"].inputs[0], match.root.outputs[0].outputs[0]
        assert (cast_in.op, cast_out.op) == ("Cast", "Cast")
        assert (cast_in.inputs[0].dtype, match["x"].dtype, cast_out.outputs[0].dtype) == (
            FLOAT16, np.float32, FLOAT16)
        found.append(match)
    return found


@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_fp16_erf_gelu_is_written_in_float32_between_casts(user_export, variant):
    """GeluONNXFusionPass reads every scalar through a float pointer: a float16 1.41421 is never seen (and
    float16 has no value within its 1e-5). The Gelu of a float16 model is written in float32 between
    Casts, the spelling whose constants it reads: predicted to fuse, closer to exact than float16."""
    path = user_export(variant=variant, dtype="fp16")
    fp16_divisor = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    assert not any(atc_gelu_pattern(fusion_gates(CANN6)).match(n, fp16_divisor.graph)
                   for n in fp16_divisor.graph.nodes if n.op == "Mul")
    result = run_spec(path, ASCEND, batch=TINY_BATCH, seq=TINY_SEQ, cann=CANN6)
    assert result.record("legalize-ascend").counts["gelu_erf_written"] == 2
    assert len(float32_gelus(result.graph)) == 2
    assert not any(n.op == "Div" and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].dtype == FLOAT16
                   for n in result.graph.nodes)
    assert_legal(result.graph, CANN6)
    assert_parity(path, result, samples=3)
    again = run_spec(path, ASCEND + ",fuse-gelu,legalize-ascend", batch=TINY_BATCH, seq=TINY_SEQ, cann=CANN6)
    assert graph_text(again.graph) == graph_text(result.graph)  # the inner Gelu is float32: no new Casts


@pytest.mark.parametrize("variant", ["legacy14", "legacy17", "dynamo18", "dynamo18sdpa"])
def test_fp16_default_conforms_and_its_gelu_and_layernorm_fuse(user_export, variant):
    path = user_export(variant=variant, dtype="fp16")
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    report = check_ascend(result.graph)
    assert report.blocks_conforming and report.model_conforming, report.render()
    for block in report.fusion.blocks:  # the tiny shapes stop the attention kernels, not the form
        assert [block.verdict(f).verdict for f in ("layer-norm", "mul-add", "gelu")] == ["fuses"] * 3, report.render()
    assert len(float32_gelus(result.graph)) == 2
    assert not [t for t in result.graph.tensors().values() if t.dtype == np.float64]
    assert_parity(path, result, samples=3)


def test_tanh_gelu_of_float16_stays_float16():
    """ATC fuses no tanh Gelu (GeluONNXFusionPass matches the erf form only): written in the input's type."""
    x = gs.Variable("x", dtype=np.float16, shape=[2, 8])
    y = gs.Variable("y", dtype=np.float16, shape=[2, 8])
    graph = gs.Graph(nodes=[gs.Node("FastGelu", "gelu", domain="com.microsoft", inputs=[x], outputs=[y])],
                     inputs=[x], outputs=[y], opset=13)
    graph.import_domains = [onnx.helper.make_opsetid("", 13), onnx.helper.make_opsetid("com.microsoft", 1)]
    legalize_ascend(graph, None, PassOptions(cann=CANN6))
    assert len(canonical_tanh_pattern().find_all(graph)) == 1
    assert {n.op for n in graph.nodes} == {"Mul", "Pow", "Add", "Tanh"}
    assert {t.values.dtype for t in graph.tensors().values() if isinstance(t, gs.Constant)} == {FLOAT16}


def test_second_run_is_no_change(tiny_export):
    result = run_spec(tiny_export("dynamo20"), ASCEND + ",legalize-ascend", batch=1, seq=8)
    first, second = result.records[-2:]
    assert first.changed and not second.changed
    assert second.notes[0].startswith("already legal for CANN 6.0: opset 13, IR 7")
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
    assert graph.opset == min(opset, 13)
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
    assert model.opset_import[0].version == 13 and model.ir_version == 7
    reduce, split = graph.nodes
    assert reduce.attrs["axes"] == [-1] and len(reduce.inputs) == 1
    assert list(split.inputs[1].values) == [3, 2]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, {"x": feed}), expected):
        np.testing.assert_array_equal(got, want)


def test_newer_op_without_an_older_form_is_refused():
    """Pad-18's `axes` input has no opset-13 spelling bertopt knows; say so rather than guess."""
    x, y = gs.Variable("x", np.float32, [4, 64]), gs.Variable("y", np.float32, [4, 66])
    pads, axes = gs.Constant("pads", np.array([1, 1], np.int64)), gs.Constant("axes", np.array([1], np.int64))
    graph = gs.Graph(nodes=[gs.Node("Pad", "pad", inputs=[x, pads, gs.Variable.empty(), axes], outputs=[y])],
                     inputs=[x], outputs=[y], opset=18)
    with pytest.raises(BertoptError, match="Pad 'pad' \\(opset 18\\) has 4 inputs, opset 13 takes at most 3; "
                                           "CANN 6.0 needs opset 13"):
        legalize_ascend(graph, None, PassOptions())


def _session_outputs(graph: gs.Graph, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(to_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _legalized(graph: gs.Graph, cann) -> PassResult:
    result = legalize_ascend(graph, None, PassOptions(cann=cann))
    graph.cleanup().toposort()
    verify(graph)
    return result


def _layernorm_and_mean_pooling_graph() -> gs.Graph:
    """LayerNormalization (CANN 8.0: opset 17-18) beside a ReduceMean (CANN 8.0: opset 8-16), opset 17."""
    rng = np.random.default_rng(1)
    x = gs.Variable("x", np.float32, [2, 5, 8])
    normed, pooled = gs.Variable("normed", np.float32, [2, 5, 8]), gs.Variable("pooled", np.float32, [2, 1, 8])
    scale = gs.Constant("gamma", rng.standard_normal(8).astype(np.float32))
    bias = gs.Constant("beta", rng.standard_normal(8).astype(np.float32))
    nodes = [gs.Node("LayerNormalization", "ln", {"axis": -1, "epsilon": 1e-12}, [x, scale, bias], [normed]),
             gs.Node("ReduceMean", "pool", {"axes": [1], "keepdims": 1}, [normed], [pooled])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[pooled], opset=17)
    graph.ir_version = 8
    return graph


def test_layernorm_decomposed_when_its_opset_excludes_another_op():
    """CANN 8.0 has LayerNormalization, but no opset takes it and ReduceMean both: decompose, lower to 16."""
    graph = _layernorm_and_mean_pooling_graph()
    feed = {"x": np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)}
    expected = _session_outputs(graph, feed)
    result = _legalized(graph, CANN8)
    assert result.counts["layernorm_decomposed"] == 1 and int(graph.opset) == 16
    assert len(decomposed_layernorm_pattern().find_all(graph)) == 1
    assert_legal(graph, CANN8)
    np.testing.assert_allclose(_session_outputs(graph, feed)[0], expected[0], atol=1e-5)


def test_layernorm_mean_output_in_use_is_refused():
    graph = _layernorm_and_mean_pooling_graph()
    mean = gs.Variable("mean", np.float32, [2, 5, 1])
    graph.nodes[0].outputs.append(mean)
    graph.outputs.append(mean)
    with pytest.raises(BertoptError, match=r"LayerNormalization 'ln' has its Mean/InvStdDev output\(s\) \['mean'\] "
                                           "read; CANN 6.0 has no LayerNormalization"):
        legalize_ascend(graph, None, PassOptions(cann=CANN6))


def _reshape_graph(target_shape: list[int], allowzero: int, opset: int = 14) -> gs.Graph:
    result_shape = [d or 2 for d in target_shape]  # a 0 copies the input's dim 0 (allowzero=0)
    x, y = gs.Variable("x", np.float32, [2, 3, 4]), gs.Variable("y", np.float32, result_shape)
    shape = gs.Constant("shape", np.array(target_shape, np.int64))
    graph = gs.Graph(nodes=[gs.Node("Reshape", "reshape", {"allowzero": allowzero}, [x, shape], [y])],
                     inputs=[x], outputs=[y], opset=opset)
    return graph


@pytest.mark.parametrize("target_shape, allowzero", [([0, 12], 0), ([6, 4], 1)])
def test_reshape14_allowzero_dropped_where_it_changes_nothing(target_shape, allowzero):
    graph = _reshape_graph(target_shape, allowzero)
    feed = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
    expected = _session_outputs(graph, feed)[0]
    assert _legalized(graph, CANN6).counts["lowered_Reshape"] == 1
    assert "allowzero" not in graph.nodes[0].attrs and int(graph.opset) == 13
    np.testing.assert_array_equal(_session_outputs(graph, feed)[0], expected)


def test_reshape14_allowzero_with_a_zero_in_the_shape_is_refused():
    with pytest.raises(BertoptError, match="Reshape 'reshape' with allowzero=1 and a target shape that is not a "
                                           "constant without zeros has no opset-13 spelling"):
        legalize_ascend(_reshape_graph([0, 12], 1), None, PassOptions(cann=CANN6))


def test_shape15_start_end_become_a_slice():
    x, dims = gs.Variable("x", np.float32, [2, 3, 4]), gs.Variable("dims", np.int64, [2])
    graph = gs.Graph(nodes=[gs.Node("Shape", "shape", {"start": 1}, [x], [dims])], inputs=[x], outputs=[dims],
                     opset=15)
    feed = {"x": np.zeros((2, 3, 4), np.float32)}
    assert list(_session_outputs(graph, feed)[0]) == [3, 4]
    assert _legalized(graph, CANN6).counts["lowered_Shape"] == 1
    assert [n.op for n in graph.nodes] == ["Shape", "Slice"] and not graph.nodes[0].attrs
    assert list(_session_outputs(graph, feed)[0]) == [3, 4]


def test_opset_below_the_versions_range_is_refused():
    """CANN 6.0 takes opset 9-13; bertopt lowers, it never raises a model's opset."""
    graph = _single_op_graph("Relu", None, {}, 8)
    with pytest.raises(BertoptError, match=r"no opset suits CANN 6.0 for this graph: it takes opset 9-13 and "
                                           r"bertopt does not raise a model's opset \(this one is 8\)"):
        legalize_ascend(graph, None, PassOptions(cann=CANN6))


# --- the version's operator list -------------------------------------------------------------------

def test_ops_outside_atc_list_are_named():
    graph = _single_op_graph("CastLike", None, {}, 17)
    graph.nodes[0].inputs.append(graph.inputs[0])
    extra = gs.Variable("z", np.float32, [4, 64])
    graph.nodes.append(gs.Node("FusedMatMul", "fmm", inputs=[graph.outputs[0], graph.inputs[0]],
                               outputs=[extra], domain="com.microsoft"))
    graph.outputs.append(extra)
    with pytest.raises(BertoptError, match=r"CANN 6.0's ONNX operator list \(bertopt/data/cann.json\) has no "
                                           r"CastLike \(x1\), com.microsoft.FusedMatMul \(x1\); "
                                           "atc would reject this model"):
        legalize_ascend(graph, None, PassOptions())


def test_onnx_attention_op_is_a_failed_check_through_the_pipeline(tiny_export):
    """The model is valid; the target cannot take it: exit 1, not the bad-input exit 2."""
    with pytest.raises(CheckFailed, match=r"pass legalize-ascend: .*has no Attention \(x2\)"):
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
    result = run_spec(path, ORT, batch=TINY_BATCH, seq=TINY_SEQ, target="ort")
    record = result.record("legalize-ort")
    assert not record.changed
    assert record.notes == ["nothing to legalise for ONNX Runtime: no decomposed Gelu (2 Gelu op(s) already fused)"]
    assert_parity(path, result)
