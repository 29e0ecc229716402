"""What keeps `optimize` near the cost of copying the file (issue 16) without changing what it writes:
the mask probe feeds weights instead of serialising them, the snapshot kept before each pass, bertopt's
toposort, freeze-shapes' skipped last fold, the fp16 range kept with a weight still in its file, and an
input read once."""

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from bertopt.graph import (FileValues, GraphSnapshot, constant_exceeds_fp16, load_graph, onnxfile, save_graph,
                           toposort, values)
from bertopt.graph.evaluate import SubgraphEvaluator, value_dependents
from bertopt.graph.shapes import SKELETON_VALUE_LIMIT
from bertopt.model.facts import attention_layer_softmaxes, detect_facts
from bertopt.passes.freeze_shapes import _nothing_to_fold
from bertopt.flow.run import optimize_file
from bertopt.pipeline import PassManager, PassOptions, structural_digest
from bertopt.testing import run_spec

VARIANTS = ["legacy14", "legacy17", "sdpa14", "dynamo18", "dynamo20"]


def _never_serialised(monkeypatch) -> None:
    """Building a weight's whole TensorProto (what embedding it in a model needs) fails the test; small
    constants (shape arithmetic, axes) may be embedded."""
    whole = FileValues.tensor.fget

    def guarded(self: FileValues) -> onnx.TensorProto:
        if math.prod(self.shape) > SKELETON_VALUE_LIMIT:
            pytest.fail(f"a weight of shape {self.shape} was serialised")
        return whole(self)

    monkeypatch.setattr(FileValues, "tensor", property(guarded))


def _first_mask(graph: gs.Graph) -> gs.Tensor:
    """The operand added to the first attention layer's scores that the tokens do not decide: the mask."""
    add = attention_layer_softmaxes(graph)[0].inputs[0].inputs[0]
    tokens = value_dependents([t for t in graph.inputs if t.name != "attention_mask"])
    return next(t for t in add.inputs if id(t) not in tokens)


def _run_passes(graph: gs.Graph, spec: str) -> None:
    PassManager(spec, PassOptions(batch=2, seq=16), instruments=[]).run(graph, detect_facts(graph))


def test_the_mask_probe_reads_weights_where_they_lie(tiny_export, monkeypatch):
    path = tiny_export("legacy14")
    graph = load_graph(path)
    mask = _first_mask(graph)
    _never_serialised(monkeypatch)
    evaluator = SubgraphEvaluator(graph, [mask], batch=2, seq=5)
    fed = {t.name for t in evaluator._weights}
    assert any(t.op == "Gather" and t.inputs[0].name in fed for t in graph.nodes)  # a Shape pulls in the embeddings
    assert all(np.prod(t.shape) > SKELETON_VALUE_LIMIT for t in evaluator._weights)
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    value = evaluator.run({"attention_mask": keep})[mask.name]
    monkeypatch.undo()

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(mask.name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 5), dtype=np.int64)
    expected = session.run([mask.name], {"input_ids": zeros, "token_type_ids": zeros, "attention_mask": keep})[0]
    np.testing.assert_array_equal(value, expected)
    assert (value[0, ..., 3:] < -1000).all() and (value[1] == 0).all()


def test_facts_serialise_no_weight(tiny_export, monkeypatch):
    graph = load_graph(tiny_export("legacy14"))
    _never_serialised(monkeypatch)
    assert detect_facts(graph).attention == "bidirectional"


@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_a_snapshot_is_what_a_copy_then_was(tiny_export, tmp_path, variant):
    graph = run_spec(tiny_export(variant), "freeze-shapes", batch=2, seq=16).graph
    snapshot, copy = GraphSnapshot(graph), graph.copy()
    _run_passes(graph, "fold-attention-mask,fuse-gelu,attention-bigkernel,legalize-ascend")
    before = snapshot.graph()
    assert snapshot.graph() is before
    assert not {id(n) for n in before.nodes} & {id(n) for n in graph.nodes}
    assert not {id(t) for t in before.tensors().values()} & {id(t) for t in graph.tensors().values()}
    save_graph(before, tmp_path / "snapshot.onnx")
    save_graph(copy, tmp_path / "copy.onnx")
    assert (tmp_path / "snapshot.onnx").read_bytes() == (tmp_path / "copy.onnx").read_bytes()
    assert structural_digest(before) != structural_digest(graph)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_toposort_puts_nodes_where_gs_does(tiny_export, variant, seed):
    graph = load_graph(tiny_export(variant))
    graph.nodes = [graph.nodes[i] for i in np.random.default_rng(seed).permutation(len(graph.nodes))]
    ours, theirs = GraphSnapshot(graph).graph(), GraphSnapshot(graph).graph()
    toposort(ours)
    theirs.toposort()
    assert [[t.name for t in n.outputs] for n in ours.nodes] == [[t.name for t in n.outputs] for n in theirs.nodes]


def test_toposort_leaves_a_cycle_to_gs():
    x = gs.Variable("x", np.float32, [1])
    a, b = gs.Variable("a", np.float32, [1]), gs.Variable("b", np.float32, [1])
    nodes = [gs.Node("Add", "first", inputs=[x, b], outputs=[a]), gs.Node("Relu", "second", inputs=[a], outputs=[b])]
    with pytest.raises(Exception, match="[Cc]ycle"):
        toposort(gs.Graph(nodes, [x], [b]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_freeze_shapes_skips_only_what_gs_would_not_fold(tiny_export, variant):
    raw = load_graph(tiny_export(variant))
    frozen = run_spec(tiny_export(variant), "freeze-shapes", batch=2, seq=16).graph
    assert _nothing_to_fold(frozen)
    for graph in (raw, frozen):
        if _nothing_to_fold(graph):
            digest, count = structural_digest(graph), len(graph.nodes)
            graph.fold_constants(fold_shapes=False).cleanup()
            assert (structural_digest(graph), len(graph.nodes)) == (digest, count)


def test_a_graph_with_constant_arithmetic_has_something_to_fold(tiny_export):
    assert not _nothing_to_fold(load_graph(tiny_export("legacy14")))


def test_the_fp16_range_of_a_weight_in_its_file_is_read_once(tmp_path, monkeypatch):
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "wide"], ["y"]), onnx.helper.make_node("Add", ["y", "narrow"], ["z"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [256])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [256])],
        initializer=[onnx.numpy_helper.from_array(np.full(256, 7e4, np.float32), "wide"),
                     onnx.numpy_helper.from_array(np.full(256, 6e4, np.float32), "narrow")]),
        opset_imports=[onnx.helper.make_opsetid("", 14)])
    onnx.save(model, tmp_path / "m.onnx")
    graph = load_graph(tmp_path / "m.onnx")
    wide, narrow = (graph.tensors()[name] for name in ("wide", "narrow"))
    assert isinstance(wide._values, FileValues)
    assert constant_exceeds_fp16(wide) and not constant_exceeds_fp16(narrow)
    monkeypatch.setattr(values, "value_chunks", lambda tensor: pytest.fail("read again"))
    assert constant_exceeds_fp16(wide) and not constant_exceeds_fp16(narrow)
    monkeypatch.undo()
    narrow.values = np.full(256, 7e4, np.float32)  # a pass replaced it: no longer the file's bytes
    assert constant_exceeds_fp16(narrow)


def test_optimize_reads_its_input_once(tiny_export, tmp_path, monkeypatch):
    scanned = []
    scan = onnxfile.scan
    monkeypatch.setattr(onnxfile, "scan", lambda path: scanned.append(path) or scan(path))
    source = tiny_export("legacy14")
    optimize_file(source, tmp_path / "out.onnx", PassManager("default", PassOptions(batch=2, seq=16), []))
    assert scanned == [source]
