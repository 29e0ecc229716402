"""bertopt.report.diff / bertopt.report.render / the golden mismatch summary, on tiny exports and hand-made edits."""

from collections import Counter
from xml.etree import ElementTree

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import TINY_BATCH, TINY_SEQ

from bertopt.errors import BertoptError
from bertopt.graph import load_graph
from bertopt.graph.golden import graph_text
from bertopt.graph.pattern import COMMUTATIVE
from bertopt.report import render
from bertopt.report.diff import NO_DIFFERENCE, diff_graph_texts, diff_graphs
from bertopt.report.render import render_diff
from bertopt.testing import assert_graph_matches, run_spec

SVG = "{http://www.w3.org/2000/svg}"


def _scale_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The attention-score scale (Mul or Div by a constant) of each layer, in layer order."""
    softmaxes = [n for n in graph.toposort().nodes if n.op == "Softmax"]
    scales = []
    for softmax in softmaxes:
        add = softmax.inputs[0].inputs[0]
        scales += [t.inputs[0] for t in add.inputs if t.inputs and t.inputs[0].op in ("Mul", "Div")]
    return scales


def _flip_scale(graph: gs.Graph, layer: int) -> tuple[str, str]:
    """Mul(x, c) <-> Div(x, 1/c) in one layer, in place; returns (old op, new op)."""
    node = _scale_nodes(graph)[layer]
    constant = next(t for t in node.inputs if isinstance(t, gs.Constant))
    variable = next(t for t in node.inputs if not isinstance(t, gs.Constant))
    old = node.op
    node.op = "Div" if old == "Mul" else "Mul"
    _set_inputs(node, [variable, gs.Constant(f"{constant.name}_flipped", np.asarray(1 / constant.values, np.float32))])
    return old, node.op


def _set_inputs(node: gs.Node, inputs: list[gs.Tensor]) -> None:
    node.inputs.clear()  # gs keeps consumer links in sync only through clear/append
    node.inputs.extend(inputs)


def _rename_and_swap(graph: gs.Graph) -> None:
    """Rename every node and inner tensor, and swap the operands of every commutative op."""
    io = {id(t) for t in graph.inputs + graph.outputs}
    for number, tensor in enumerate(graph.tensors().values()):
        if id(tensor) not in io:
            tensor.name = f"renamed_{number}"
    for number, node in enumerate(graph.nodes):
        node.name = f"node_{number}"
        if node.op in COMMUTATIVE and len(node.inputs) == 2:
            _set_inputs(node, list(node.inputs)[::-1])


def test_identical_graphs_even_renamed_and_swapped(tiny_export):
    path = tiny_export("legacy14")
    renamed = load_graph(path)
    _rename_and_swap(renamed)
    diff = diff_graphs(load_graph(path), renamed)
    assert diff.empty and diff.edits == [] and diff.signature == []
    assert diff.text().startswith(NO_DIFFERENCE)
    assert diff.counts == {"unchanged": len(renamed.nodes), "changed": 0, "removed": 0, "added": 0}


def test_one_rewritten_node_shows_as_exactly_that_change_in_its_region(tiny_export):
    path = tiny_export("legacy14")
    edited = load_graph(path)
    old_op, new_op = _flip_scale(edited, layer=1)
    diff = diff_graphs(path, edited)
    assert [e.region for e in diff.edits] == ["layer 1 attention"]
    assert diff.edits[0].text() == f"{old_op}(0.25) -> {new_op}(4.0)"
    assert diff.counts == {"unchanged": len(edited.nodes) - 1, "changed": 0, "removed": 1, "added": 1}
    deltas = {op: after - before for op, (before, after) in diff.histogram.items() if before != after}
    assert deltas == {old_op: -1, new_op: 1}
    text = diff.text()
    assert "changed regions: layer 1 attention\n" in text
    assert f"layer 1 attention:\n  {old_op}(0.25) -> {new_op}(4.0)\n" in text


def test_the_same_change_in_every_layer_is_collapsed(tiny_export):
    path = tiny_export("legacy14")
    edited = load_graph(path)
    for layer, scale in enumerate(_scale_nodes(edited)):
        _flip_scale(edited, layer)
        scale.name = f"bert_scale_{layer}"  # a name ATC's fusion reads: shown, with the layer number as *
    text = diff_graphs(path, edited).text()
    assert "changed regions: layers 0-1 attention\n" in text
    assert "layers 0-1 attention (the same change in each):\n  Mul(0.25) -> Div(4.0) named bert_scale_*\n" in text
    assert "layer 0 attention:" not in text and "layer 1 attention:" not in text


def test_changed_constant_in_place_is_a_changed_node(tiny_export):
    path = tiny_export("legacy14")
    edited = load_graph(path)
    scale = _scale_nodes(edited)[0]
    _set_inputs(scale, [t if not isinstance(t, gs.Constant) else gs.Constant("half", np.asarray(0.5, np.float32))
                        for t in scale.inputs])
    diff = diff_graphs(path, edited)
    assert diff.counts["changed"] == 1 and diff.counts["removed"] == diff.counts["added"] == 0
    assert [e.text() for e in diff.edits] == ["Mul(0.25) -> Mul(0.5)"]
    assert diff.edits[0].region == "layer 0 attention"


def test_freeze_shapes_before_after(tiny_export):
    path = tiny_export("legacy14")
    before = load_graph(path)
    after = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ).graph
    diff = diff_graphs(before, after, "dynamic", "frozen")
    expected = Counter(n.op for n in after.nodes)
    expected.subtract(Counter(n.op for n in before.nodes))
    assert {op: after_count - before_count for op, (before_count, after_count) in diff.histogram.items()} == \
        {op: delta for op, delta in expected.items()}
    assert "input input_ids: int64[batch, seq] -> int64[2, 16]" in diff.signature
    assert "output start_logits: float32[batch, seq] -> float32[2, 16]" in diff.signature
    attention = [e for e in diff.edits if e.region == "layer 0 attention"]
    removed = Counter(n.op for e in attention for n in e.old if n.op != "Reshape")
    assert set(removed) >= {"Shape", "Gather", "Unsqueeze", "Concat"}
    assert all(n.op == "Reshape" for e in attention for n in e.new)  # the shape arithmetic became constants
    assert diff.counts["added"] == 0
    text = diff.text()
    assert "layers 0-1 attention (the same change in each):" in text
    assert text.index("signature:") < text.index("op histogram") < text.index("layers 0-1 attention (")
    assert "Shape                9 -> 0      -9" in text


def _insert_after(graph: gs.Graph, tensor: gs.Variable, op: str) -> gs.Node:
    """A view-only node between `tensor` and all its consumers, as a pass inserting a Reshape would."""
    viewed = gs.Variable(f"{tensor.name}_viewed", dtype=tensor.dtype, shape=tensor.shape)
    for consumer in list(tensor.outputs):
        _set_inputs(consumer, [viewed if t is tensor else t for t in consumer.inputs])
    node = gs.Node(op, f"inserted_{op}", inputs=[tensor], outputs=[viewed])
    graph.nodes.append(node)
    return node


def test_an_inserted_view_node_is_the_only_change(tiny_export):
    path = tiny_export("legacy14")
    edited = load_graph(path)
    layer_norm_out = next(n for n in edited.toposort().nodes if n.op == "Add" and
                          any(c.op == "MatMul" for c in n.outputs[0].outputs)).outputs[0]
    _insert_after(edited, layer_norm_out, "Identity")
    diff = diff_graphs(path, edited)
    assert diff.counts == {"unchanged": len(edited.nodes) - 1, "changed": 0, "removed": 0, "added": 1}
    assert [(e.region, e.text()) for e in diff.edits] == [("layer 0 attention", "added Identity named inserted_Identity")]


def test_default_pipeline_diff_keeps_the_unchanged_layers_matched(tiny_export):
    path = tiny_export("legacy14")
    after = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ).graph
    diff = diff_graphs(load_graph(path), after, "original", "bertopt")
    regions = {e.region for e in diff.edits}
    assert not any(region.endswith("ffn") for region in regions)  # Gelu is written back in ATC's erf form
    added = Counter(n.op for e in diff.edits for n in e.new)
    assert set(added) <= {"Reshape", "Transpose", "MatMul", "Unsqueeze", "Cast", "Sub", "Mul", "Expand", "Add"}
    assert diff.counts["added"] <= 2 * 2 + 5 + 2  # per layer a K Transpose, the 2-D Reshapes, the new mask
    folded = [e for e in diff.edits if e.folded]
    assert {e.region for e in folded} >= {"layer 0 attention", "layer 1 attention", "mask"}
    assert all(n.op not in ("MatMul", "Softmax") for e in folded for n in e.old)
    text = diff.text()
    assert "layers 0-1 attention (the same change in each):\n" in text
    embeddings = text.split("embeddings:\n")[1].split("\n", 1)[0]
    assert "Reshape([-1, 32]) named bertopt_Reshape_*" in embeddings  # on the first LayerNorm's input
    assert "  folded to constants: " in text


def test_bad_model_path_is_one_line_error(tmp_path):
    with pytest.raises(BertoptError, match="no such file"):
        diff_graphs(tmp_path / "missing.onnx", tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def frozen_diff(tiny_export):
    path = tiny_export("legacy14")
    after = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ).graph
    return diff_graphs(load_graph(path), after, "dynamic", "frozen")


def _svg_groups(path) -> list:
    return list(ElementTree.parse(path).getroot().iter(f"{SVG}g"))


def _node_kinds(groups: list) -> Counter:
    return Counter(g.get("class") for g in groups if (g.get("class") or "").startswith("node"))


@pytest.mark.skipif(render.shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_render_svg_has_both_clusters_and_leaves_folded_shape_arithmetic_out(frozen_diff, tmp_path):
    result = render_diff(frozen_diff, tmp_path / "diff.svg", "svg", context=1)
    assert result.drawn and result.path == tmp_path / "diff.svg"
    assert "layer 0 attention" in result.note  # one representative layer, not both
    groups = _svg_groups(result.path)
    titles = [g.find(f"{SVG}text").text for g in groups if g.get("class") == "cluster"]
    assert titles == ["before: dynamic (16 nodes folded to constants, not drawn)", "after: frozen"]
    kinds = _node_kinds(groups)
    assert kinds["node changed"] > 0 and kinds["node unchanged"] > 0
    assert kinds["node removed"] == kinds["node added"] == 0  # freezing only folds and makes shapes constant
    assert not list(tmp_path.glob(".diff.svg.*"))  # the staging file is gone


@pytest.mark.skipif(render.shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_render_colours_removed_and_added_nodes(tiny_export, tmp_path):
    path = tiny_export("legacy14")
    edited = load_graph(path)
    _flip_scale(edited, layer=1)
    groups = _svg_groups(render_diff(diff_graphs(path, edited), tmp_path / "diff.svg").path)
    assert _node_kinds(groups) == Counter({"node removed": 1, "node added": 1, "node unchanged": 4})
    for kind in ("removed", "added"):
        fills = {p.get("fill") for g in groups if g.get("class") == f"node {kind}" for p in g.iter() if p.get("fill")}
        assert render.FILL[kind] in fills


@pytest.mark.skipif(render.shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_render_whole_draws_the_unchanged_nodes_of_the_layer_too(frozen_diff, tmp_path):
    def drawn(**options) -> Counter:
        return _node_kinds(_svg_groups(render_diff(frozen_diff, tmp_path / "diff.svg", context=0, **options).path))

    changes, whole = drawn(), drawn(whole=True)
    assert changes["node unchanged"] == 0
    assert whole["node unchanged"] > 10 and whole["node changed"] == changes["node changed"]
    assert ">Softmax(axis=&#45;1)<" in (tmp_path / "diff.svg").read_text()  # unchanged, drawn only when whole


@pytest.mark.skipif(render.shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_render_png(frozen_diff, tmp_path):
    result = render_diff(frozen_diff, tmp_path / "diff.png", "png")
    assert result.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_without_dot_falls_back_to_a_note(frozen_diff, tmp_path, monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    result = render_diff(frozen_diff, tmp_path / "diff.svg")
    assert not result.drawn and "Graphviz `dot` is not installed" in result.note
    assert list(tmp_path.iterdir()) == []


def test_render_refuses_unknown_format(frozen_diff, tmp_path):
    with pytest.raises(BertoptError, match="expected one of svg, png"):
        render_diff(frozen_diff, tmp_path / "diff.gif", "gif")


def test_snapshot_texts_diff_like_graphs(tiny_export):
    path = tiny_export("legacy14")
    original, edited = load_graph(path), load_graph(path)
    old_op, new_op = _flip_scale(edited, layer=1)
    assert diff_graph_texts(graph_text(original), graph_text(original)).empty
    diff = diff_graph_texts(graph_text(original), graph_text(edited))
    assert [(e.region, e.text()) for e in diff.edits] == [("layer 1 attention", f"{old_op}(0.25) -> {new_op}(4.0)")]


def test_golden_mismatch_starts_with_the_structural_summary(tiny_export, tmp_path):
    path = tiny_export("legacy14")
    golden = tmp_path / "golden.txt"
    golden.write_text(graph_text(load_graph(path)))
    edited = load_graph(path)
    old_op, new_op = _flip_scale(edited, layer=1)
    with pytest.raises(AssertionError) as failure:
        assert_graph_matches(edited, golden)
    message = str(failure.value)
    summary = f"layer 1 attention:\n  {old_op}(0.25) -> {new_op}(4.0)"
    assert summary in message
    assert message.index(summary) < message.index(f"--- {golden}")  # the unified diff is still there, below
    assert "+%" in message and f"{new_op}(" in message.split(f"--- {golden}")[1]
