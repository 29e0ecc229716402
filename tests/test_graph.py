"""The graph layer: loading bad files, atomic saves, external data, constants and rewiring."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
import pytest
from onnx import TensorProto, helper, numpy_helper

from bertopt import graph as G
from bertopt.errors import BertoptError
from bertopt.graph import io as graph_io


def small_model() -> onnx.ModelProto:
    """y = Relu(x + c) with c a Constant node, so lifting has something to do."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [4], [1, 2, 3, 4])),
        helper.make_node("Add", ["x", "c"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(BertoptError, match="no such file"):
        G.load_model(tmp_path / "absent.onnx")


def test_random_bytes_are_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BertoptError, match="not"):
        G.load_model(path)


def test_truncated_model_is_refused(tmp_path):
    data = small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BertoptError):
        G.load_model(path)


def test_constant_nodes_are_lifted():
    graph = G.load_graph(small_model())
    assert [n.op for n in graph.nodes] == ["Add", "Relu"]
    assert np.array_equal(G.constant_value(graph.nodes[0].inputs[1]), [1, 2, 3, 4])


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = G.save_graph(G.load_graph(small_model()), tmp_path / "out" / "m.onnx")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]
    assert onnx.load(str(path)).graph.node[0].op_type == "Add"


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD", 10)
    graph = G.load_graph(small_model())
    weights = np.arange(4096, dtype=np.float32).reshape(1024, 4)
    graph.nodes[0].inputs[1] = gs.Constant("big", weights)
    path = G.save_graph(graph, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < weights.nbytes
    reloaded = G.load_graph(path)
    assert np.array_equal(G.constant_value(reloaded.nodes[0].inputs[1]), weights)


def test_replace_uses_keeps_graph_output_names():
    graph = G.load_graph(small_model())
    relu = graph.nodes[1]
    G.splice_out(relu, graph)
    graph.cleanup()
    assert [t.name for t in graph.outputs] == ["y"]
    assert graph.outputs[0].inputs[0].op == "Add"


def test_insert_after_puts_a_node_between_a_tensor_and_all_its_readers():
    graph = G.load_graph(small_model())
    graph.inputs[0].shape = [3, 4]
    G.infer_shapes(graph)
    add, relu = graph.nodes
    node = G.insert_after(graph, add.outputs[0], "Neg")
    assert relu.inputs[0] is node.outputs[0] and node.inputs[0] is add.outputs[0]
    tail = G.insert_after(graph, relu.outputs[0], "Neg")  # a graph output: the new node takes its name
    assert [t.name for t in graph.outputs] == ["y"] and graph.outputs[0] is tail.outputs[0]
    G.verify(graph.toposort())


def test_put_first_and_set_inputs_keep_consumer_links():
    graph = G.load_graph(small_model())
    add = graph.nodes[0]
    x, c = add.inputs
    assert not G.put_first(add, x)
    assert G.put_first(add, c) and list(add.inputs) == [c, x]
    G.set_inputs(add, [x, x])
    assert add in x.outputs and add not in c.outputs


def test_copies_and_the_nodes_between_two_tensors():
    graph = G.load_graph(small_model())
    graph.inputs[0].shape = [3, 4]
    G.infer_shapes(graph)
    add, relu = graph.nodes
    x = graph.inputs[0]
    copy = G.insert_after(graph, x, "Identity", shape=[3, 4])
    assert G.is_copy_of(copy.outputs[0], x) and not G.is_copy_of(add.outputs[0], x)
    assert {n.op for n in G.nodes_between(x, relu.outputs[0])} == {"Identity", "Add", "Relu"}
    assert G.nodes_between(add.outputs[0], x) == []


def test_reinfer_shapes_forgets_stale_shapes():
    graph = G.load_graph(small_model())
    graph.inputs[0].shape = [3, 4]
    G.infer_shapes(graph)
    graph.nodes[0].outputs[0].shape = [99, 99]  # stale, as after a rewrite
    G.reinfer_shapes(graph)
    assert graph.nodes[0].outputs[0].shape == [3, 4]


def test_infer_shapes_records_static_shapes():
    graph = G.load_graph(small_model())
    graph.inputs[0].shape = [3, 4]
    G.infer_shapes(graph)
    assert graph.nodes[0].outputs[0].shape == [3, 4]
    assert all(G.is_static(t) for t in graph.tensors().values())


def test_skeleton_drops_weights_but_keeps_small_constants():
    graph = G.load_graph(small_model())
    graph.nodes[0].inputs[1] = gs.Constant("w", np.ones((1, 4), np.float32))
    graph.nodes.append(gs.Node("Add", inputs=[graph.nodes[1].outputs[0], gs.Constant("big", np.ones((512, 4), np.float32))],
                               outputs=[gs.Variable("z", dtype=np.float32, shape=[512, 4])]))
    graph.outputs.append(graph.nodes[-1].outputs[0])
    skeleton = G.skeleton_model(graph)
    assert {i.name for i in skeleton.graph.initializer} == {"w"}
    assert "big" in {i.name for i in skeleton.graph.input}
    G.verify(graph)


def test_new_names_never_clash_with_existing_ones():
    graph = G.load_graph(small_model())
    graph.nodes[0].name = "bertopt_Mul_0"
    first = G.add_node(graph, "Mul", [graph.inputs[0], graph.inputs[0]])[0]
    second = G.make_constant(graph, "bertopt_Mul", np.ones(1, np.float32))
    names = [n.name for n in graph.nodes] + [first.name, second.name]
    assert len(set(names)) == len(names)


def test_piecewise_save_reads_back_as_the_same_model(tmp_path):
    model = small_model()
    model.graph.initializer.extend([numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w"),
                                    numpy_helper.from_array(np.ones(3, dtype=np.int64), "k")])
    model.producer_name = "bertopt-test"
    model.metadata_props.add(key="note", value="kept")
    G.save_model(model, tmp_path / "m.onnx")
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert loaded == model


def test_constant_bytes_read_lazy_weights_without_loading_them(tiny_export):
    graph = G.load_graph(tiny_export("legacy14"))
    table = next(t for n in graph.nodes if n.op == "Gather" for t in n.inputs[:1] if isinstance(t, gs.Constant))
    assert isinstance(table._values, LazyValues)
    raw = G.constant_bytes(table)
    assert isinstance(table._values, LazyValues)  # still lazy: nothing was converted or kept
    assert bytes(raw) == np.ascontiguousarray(table.values).tobytes()
    edited = gs.Constant("edited", np.arange(6, dtype=np.float32).reshape(2, 3).T)  # not C-contiguous
    assert bytes(G.constant_bytes(edited)) == np.ascontiguousarray(edited.values).tobytes()


def test_save_graph_writes_what_the_exporter_would(tiny_export, tmp_path):
    from bertopt.testing import run_spec

    graph = run_spec(tiny_export("legacy14"), "default", batch=2, seq=16).graph  # lazy and edited weights
    lazy = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues)]
    assert lazy and len(lazy) < sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
    expected = G.to_model(graph)
    G.save_graph(graph, tmp_path / "m.onnx")
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert all(isinstance(t._values, LazyValues) for t in lazy)  # the stand-ins are gone again
    by_name = {t.name: t for t in loaded.graph.initializer}
    assert sorted(by_name) == sorted(t.name for t in expected.graph.initializer)
    assert all(by_name[t.name] == t for t in expected.graph.initializer)
    loaded.graph.ClearField("initializer")
    expected.graph.ClearField("initializer")
    assert loaded == expected
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]
