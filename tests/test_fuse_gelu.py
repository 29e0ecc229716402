"""fuse-gelu on tiny exports of every variant and on hand-rewritten Gelu spellings: goldens, counts,
the fused node's function, no-change reasons, parity with the original on ONNX Runtime."""

import functools
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ

from bertopt.graph import save_graph, unique_name
from bertopt.model.forms import erf_gelu_pattern, gelu_kind, tanh_gelu_pattern
from bertopt.testing import assert_graph_matches, assert_parity, run_spec

GOLDEN = GOLDEN_DIR / "fuse-gelu"
# The target that fuses every Gelu: for ascend, fuse-gelu keeps the ones already in ATC's form (tested apart).
FUSING = "ort"
# variant -> (fused op as "domain.op" or "op", expected counts)
EXPECTED = {
    "legacy14": ("com.microsoft.Gelu", {"gelu_erf": 2, "gelu_tanh": 0, "gelu_op": 0, "gelu_atc_form": 0, "gelu_sites": 2}),
    "legacy17": ("com.microsoft.Gelu", {"gelu_erf": 2, "gelu_tanh": 0, "gelu_op": 0, "gelu_atc_form": 0, "gelu_sites": 2}),
    "sdpa14": ("com.microsoft.Gelu", {"gelu_erf": 2, "gelu_tanh": 0, "gelu_op": 0, "gelu_atc_form": 0, "gelu_sites": 2}),
    "dynamo18": ("com.microsoft.Gelu", {"gelu_erf": 2, "gelu_tanh": 0, "gelu_op": 0, "gelu_atc_form": 0, "gelu_sites": 2}),
    "dynamo20": ("Gelu", {"gelu_erf": 0, "gelu_tanh": 0, "gelu_op": 2, "gelu_atc_form": 0, "gelu_sites": 2}),
}


def fused_ops(graph: gs.Graph) -> Counter:
    return Counter(f"{n.domain}.{n.op}" if n.domain else n.op for n in graph.nodes if gelu_kind(n))


def frozen(path, tmp_path, name="frozen.onnx"):
    result = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    return result.graph, tmp_path / name


@pytest.mark.golden
@pytest.mark.parametrize("variant", list(EXPECTED))
def test_fuse_gelu_golden_counts_and_parity(tiny_export, variant):
    path = tiny_export(variant)
    result = run_spec(path, "freeze-shapes,fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING)
    assert_graph_matches(result.graph, GOLDEN / f"{variant}.after.txt")
    op, counts = EXPECTED[variant]
    record = result.record("fuse-gelu")
    assert record.counts == counts
    assert record.changed == bool(counts["gelu_erf"] + counts["gelu_tanh"])
    assert fused_ops(result.graph) == {op: 2}
    assert not any(n.op == "Erf" for n in result.graph.nodes)
    assert all(gelu_kind(n) == "erf" for n in result.graph.nodes if gelu_kind(n))
    assert_parity(path, result)


@pytest.mark.golden
@pytest.mark.parametrize("variant, fused_op", [("legacy14", "com.microsoft.FastGelu"), ("dynamo20", "Gelu")])
def test_tanh_approximation_fuses_as_tanh(tiny_export, variant, fused_op):
    path = tiny_export(variant, hidden_act="gelu_new")
    result = run_spec(path, "freeze-shapes,fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING)
    assert_graph_matches(result.graph, GOLDEN / f"{variant}-gelu_new.after.txt")
    assert result.record("fuse-gelu").counts == {"gelu_erf": 0, "gelu_tanh": 2, "gelu_op": 0, "gelu_atc_form": 0, "gelu_sites": 2}
    assert fused_ops(result.graph) == {fused_op: 2}
    assert all(gelu_kind(n) == "tanh" for n in result.graph.nodes if gelu_kind(n))
    assert not any(n.op in ("Tanh", "Erf") for n in result.graph.nodes)
    assert_parity(path, result)


def test_gelu_fast_spelling_fuses_as_tanh(tiny_export):
    path = tiny_export("legacy14", hidden_act="gelu_fast")
    result = run_spec(path, "freeze-shapes,fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING)
    assert result.record("fuse-gelu").counts["gelu_tanh"] == 2
    assert fused_ops(result.graph) == {"com.microsoft.FastGelu": 2}
    assert_parity(path, result)


# --- the same Gelu in other spellings must give the same golden -----------------------------------

def _emit(graph: gs.Graph, op: str, *operands, out: gs.Tensor | None = None) -> gs.Tensor:
    inputs = [o if isinstance(o, gs.Tensor) else gs.Constant(unique_name(graph, "c"), np.array(o, np.float32))
              for o in operands]
    out = out or gs.Variable(unique_name(graph, "t"), dtype=np.float32)
    graph.nodes.append(gs.Node(op, unique_name(graph, op), inputs=inputs, outputs=[out]))
    return out


def _erf_spelling(graph, x, out, spelling):
    e = functools.partial(_emit, graph)
    if spelling == "x*(0.5*(1+erf(x*0.70710678)))":
        e("Mul", x, e("Mul", 0.5, e("Add", 1.0, e("Erf", e("Mul", x, 0.70710678)))), out=out)
    elif spelling == "(0.5*x)*(erf(x/1.41421356)+1)":
        e("Mul", e("Mul", 0.5, x), e("Add", e("Erf", e("Div", x, 1.41421356)), 1.0), out=out)
    elif spelling == "0.5*(((1+erf(x/1.4142135))*x))":
        e("Mul", 0.5, e("Mul", e("Add", 1.0, e("Erf", e("Div", x, 1.4142135))), x), out=out)
    elif spelling == "(x*(1+erf(x/1.4142135)))/2":
        e("Div", e("Mul", x, e("Add", 1.0, e("Erf", e("Div", x, 1.4142135)))), 2.0, out=out)


def _tanh_cubed_by_muls(graph, x, out, spelling):
    e = functools.partial(_emit, graph)
    cube = e("Mul", x, e("Mul", x, x))
    inner = e("Mul", 0.7978845608, e("Add", e("Mul", 0.044715, cube), x))
    e("Mul", e("Mul", e("Add", 1.0, e("Tanh", inner)), x), 0.5, out=out)


def respell(graph: gs.Graph, pattern, spell, spelling: str) -> int:
    """Rewrite every Gelu `pattern` finds into `spelling`; returns how many."""
    matches = pattern.find_all(graph)
    for match in matches:
        out = match.output
        match.root.outputs.clear()
        spell(graph, match["x"], out, spelling)
    graph.cleanup().toposort()
    return len(matches)


@pytest.mark.golden
@pytest.mark.parametrize("spelling", ["x*(0.5*(1+erf(x*0.70710678)))", "(0.5*x)*(erf(x/1.41421356)+1)",
                                      "0.5*(((1+erf(x/1.4142135))*x))", "(x*(1+erf(x/1.4142135)))/2"])
def test_other_erf_spellings_give_the_plain_golden(tiny_export, tmp_path, spelling):
    path = tiny_export("legacy14")
    graph, respelled = frozen(path, tmp_path)
    assert respell(graph, erf_gelu_pattern(), _erf_spelling, spelling) == 2
    save_graph(graph, respelled)
    result = run_spec(respelled, "fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING)
    assert result.record("fuse-gelu").counts["gelu_erf"] == 2
    assert_graph_matches(result.graph, GOLDEN / "legacy14.after.txt")
    assert_parity(path, result)


@pytest.mark.golden
def test_cube_as_muls_gives_the_pow_golden(tiny_export, tmp_path):
    path = tiny_export("legacy14", hidden_act="gelu_new")
    graph, respelled = frozen(path, tmp_path)
    assert respell(graph, tanh_gelu_pattern(), _tanh_cubed_by_muls, "x*x*x") == 2
    assert [float(n.inputs[1].values) for n in graph.nodes if n.op == "Pow"] == [2.0] * 5  # LayerNorms only
    save_graph(graph, respelled)
    result = run_spec(respelled, "fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING)
    assert result.record("fuse-gelu").counts["gelu_tanh"] == 2
    assert_graph_matches(result.graph, GOLDEN / "legacy14-gelu_new.after.txt")
    assert_parity(path, result)


# --- no change --------------------------------------------------------------------------------------

def test_second_run_changes_nothing_but_counts_the_sites(tiny_export):
    result = run_spec(tiny_export("legacy17"), "freeze-shapes,fuse-gelu,fuse-gelu", batch=1, seq=8, target=FUSING)
    second = result.records[-1]
    assert not second.changed
    assert second.counts == {"gelu_erf": 0, "gelu_tanh": 0, "gelu_op": 2, "gelu_atc_form": 0, "gelu_sites": 2}
    assert "no Gelu to fuse: 2 Gelu op(s) already one node" in second.notes[0]


def test_no_gelu_at_all_is_no_change(tiny_export):
    result = run_spec(tiny_export("legacy14", hidden_act="relu"), "freeze-shapes,fuse-gelu", batch=1, seq=8, target=FUSING)
    record = result.record("fuse-gelu")
    assert not record.changed and record.counts == {}
    assert record.notes == ["no Gelu found (looked for the erf form, the tanh approximation and the Gelu op): "
                            "the graph has no Erf, Tanh or Gelu node"]


def test_near_miss_is_explained(tiny_export, tmp_path):
    graph, broken = frozen(tiny_export("legacy14"), tmp_path)
    for div in (n for n in graph.nodes if n.op == "Div" and n.outputs[0].outputs[0].op == "Erf"):
        div.inputs[1] = gs.Constant(unique_name(graph, "c"), np.array(1.5, np.float32))
    save_graph(graph, broken)
    record = run_spec(broken, "fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING).record("fuse-gelu")
    assert not record.changed
    assert "2 Erf/Tanh node(s), none in a Gelu; nearest candidate Mul" in record.notes[0]
    assert "expected constant ~1.41421, got 1.5" in record.notes[0]


def test_shape_inference_carries_on_past_contrib_gelu(tiny_export):
    """Later passes re-infer shapes; ONNX knows no com.microsoft schema, yet shapes must flow on."""
    from bertopt.graph import infer_shapes, is_static

    result = run_spec(tiny_export("legacy17"), "freeze-shapes,fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ, target=FUSING)
    gelu = next(n for n in result.graph.nodes if gelu_kind(n))
    downstream = gelu.outputs[0].outputs[0].outputs[0]  # the FFN output MatMul's result
    downstream.shape = None
    infer_shapes(result.graph)
    assert downstream.shape == [TINY_BATCH, TINY_SEQ, 32]
    assert all(is_static(t) for t in result.graph.tensors().values() if isinstance(t, gs.Variable))


def test_for_the_ascend_target_a_gelu_already_in_atcs_form_is_left_alone(tiny_export):
    """The legacy exporter writes exactly the erf subgraph ATC fuses: fusing it would only have legalize-ascend
    write it back, and `default` on its own output would report changes forever."""
    result = run_spec(tiny_export("legacy14"), "freeze-shapes,fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ,
                      target="ascend")
    record = result.record("fuse-gelu")
    assert record.changed is False and record.counts["gelu_atc_form"] == 2 and record.counts["gelu_erf"] == 0
    assert "already in the subgraph ATC takes" in " ".join(record.notes)
    respelled = run_spec(tiny_export("dynamo18"), "freeze-shapes,fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ,
                         target="ascend")
    assert respelled.record("fuse-gelu").counts["gelu_erf"] == 2, "the dynamo spelling is not ATC's: fused"
