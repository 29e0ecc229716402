"""bertopt.graph.onnxfile and the graph layer on top of it: weights found in the file without parsing them,
left there until a pass reads one, and streamed back out (inline or as external data)."""

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error, bertopt

from bertopt import graph as G
from bertopt.errors import BertoptError
from bertopt.graph import io as graph_io
from bertopt.graph import onnxfile
from bertopt.graph import values as graph_values
from bertopt.graph.onnxfile import Weight


def ort_outputs(model, feeds: dict) -> list:
    source = str(model) if not isinstance(model, onnx.ModelProto) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def tiny_feeds(path) -> dict:
    """Ids, mask and token types of a tiny export, batch 2, seq 16."""
    rng = np.random.default_rng(0)
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: rng.integers(0, 2 if "mask" in i.name or "type" in i.name else 50, (2, 16)).astype(np.int64)
            for i in model.graph.input}


def file_weights(graph: gs.Graph) -> list[gs.Constant]:
    return [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and isinstance(t._values, G.FileValues)]


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def save_external(model: onnx.ModelProto, path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


# --------------------------------------------------------------------------- scanning

def test_scan_finds_each_weight_where_onnx_reads_it(tiny_export):
    path = tiny_export("legacy14")
    scanned = onnxfile.scan(path)
    loaded = onnx.load(str(path))
    raw = {t.name: t.raw_data for t in loaded.graph.initializer if t.HasField("raw_data")}
    assert len(raw) > 10 and sorted(scanned.extents) == sorted(raw)
    assert all(scanned.extents[name].read() == data for name, data in raw.items())
    assert not any(t.HasField("raw_data") for t in scanned.skeleton.graph.initializer)
    assert scanned.full_model() == loaded


def test_scan_merges_a_model_written_one_weight_at_a_time(tiny_export, tmp_path):
    path = G.save_graph(G.load_graph(tiny_export("legacy14")), tmp_path / "m.onnx")  # a graph field per weight
    assert onnxfile.scan(path).full_model() == onnx.load(str(path))


def test_weights_stay_in_the_file_until_a_pass_reads_them(tiny_export):
    path = tiny_export("legacy14")
    graph = G.load_graph(path)
    expected = arrays(onnx.load(str(path)))
    table = max(file_weights(graph), key=lambda t: t._values.nbytes)
    peeked = G.peek_values(table)
    assert not peeked.flags.writeable and isinstance(table._values, G.FileValues)
    assert bytes(G.constant_bytes(table)) == expected[table.name].tobytes()
    loaded = table.values
    assert loaded.flags.writeable and isinstance(table._values, np.ndarray)
    np.testing.assert_array_equal(loaded, expected[table.name])
    np.testing.assert_array_equal(peeked, expected[table.name])


def test_a_weight_is_scanned_in_pieces_without_loading_it(tiny_export, monkeypatch):
    monkeypatch.setattr(graph_values, "CHUNK_BYTES", 1000)
    path = tiny_export("legacy14")
    table = max(file_weights(G.load_graph(path)), key=lambda t: t._values.nbytes)
    pieces = [piece.copy() for piece in G.value_chunks(table)]  # each piece lives until the next is read
    assert len(pieces) > 2 and all(len(piece) == 250 for piece in pieces[:-1])
    np.testing.assert_array_equal(np.concatenate(pieces), arrays(onnx.load(str(path)))[table.name].reshape(-1))
    assert not next(G.value_chunks(table)).flags.writeable and isinstance(table._values, G.FileValues)


def test_constant_nodes_keep_their_values_and_only_initializers_are_referenced(tmp_path):
    value = numpy_helper.from_array(np.array([1.5, -2.0, 3.25, 4.0], np.float32), "v")  # raw_data in a node
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["s"]),
             helper.make_node("Mul", ["s", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.full(4, 0.5, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "constants.onnx"
    onnx.save(model, str(path))
    assert list(onnxfile.scan(path).extents) == ["w"]
    loaded = G.load_graph(path)
    assert [n.op for n in loaded.nodes] == ["Add", "Mul"]
    out = G.save_graph(loaded, tmp_path / "out.onnx")
    x = {"x": np.arange(4, dtype=np.float32)}
    np.testing.assert_array_equal(ort_outputs(out, x)[0], ort_outputs(model, x)[0])


# --------------------------------------------------------------------------- bad files

def corrupt_copy(path, tmp_path, damage: str):
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]  # inside a weight
    elif damage == "wire type":
        data[0] = 1 << 3 | 7  # no wire type 7 exists
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("damage", ["truncated", "wire type"])
def test_a_damaged_file_is_refused_with_one_line(tiny_export, tmp_path, damage):
    bad = corrupt_copy(tiny_export("legacy14"), tmp_path, damage)
    with pytest.raises(BertoptError, match="bad.onnx: .*(truncated|corrupt)") as refused:
        G.load_graph(bad)
    assert "\n" not in str(refused.value)


def test_a_weight_shorter_than_its_shape_is_refused(tmp_path):
    tensor = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], raw_data=np.ones(3, np.float32).tobytes())
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [tensor])
    path = tmp_path / "short.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(BertoptError, match=r"weight 'w' holds 12 bytes where its shape \[4\] and type need 16"):
        G.load_graph(path)


def test_damaged_files_exit_2_with_one_line(tiny_export, tmp_path):
    bad = corrupt_copy(tiny_export("legacy14"), tmp_path, "truncated")
    assert_one_line_error(bertopt("optimize", str(bad), "--output", str(tmp_path / "o.onnx")), 2, "truncated")


@pytest.mark.parametrize("command", ["run", "check"])
def test_missing_external_data_is_refused_up_front(tiny_export, tmp_path, command):
    path = tmp_path / "ext.onnx"
    save_external(onnx.load(str(tiny_export("legacy14"))), path)
    (tmp_path / "ext.onnx.data").unlink()
    args = ["--output", str(tmp_path / "o")] if command == "run" else []
    assert_one_line_error(bertopt(command, str(path), *args), 2, "ext.onnx.data', which is missing")
    assert not (tmp_path / "o").exists()


def test_external_data_that_ends_early_is_refused(tiny_export, tmp_path):
    path = tmp_path / "ext.onnx"
    save_external(onnx.load(str(tiny_export("legacy14"))), path)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BertoptError, match="lie beyond its end"):
        G.load_graph(path)


# --------------------------------------------------------------------------- writing

def test_a_streamed_weight_is_the_bytes_protobuf_would_write(tmp_path):
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    tensor.doc_string = "a field after raw_data"
    tensor.metadata_props.add(key="k", value="v")
    head = helper.make_model(helper.make_graph([], "g", [], []))
    stand_in = onnx.TensorProto()
    stand_in.CopyFrom(tensor)
    stand_in.ClearField("raw_data")
    onnxfile.write_model(tmp_path / "m.onnx", head, [Weight(stand_in, memoryview(tensor.raw_data))])
    whole = onnx.ModelProto()
    whole.graph.initializer.add().CopyFrom(tensor)
    assert (tmp_path / "m.onnx").read_bytes() == head.SerializeToString() + whole.SerializeToString()


def test_weights_from_the_file_and_from_memory_are_written_alike(tiny_export, tmp_path):
    path = tiny_export("legacy14")
    from_file = G.save_graph(G.load_graph(path), tmp_path / "file.onnx")
    from_memory = G.save_graph(G.load_graph(onnx.load(str(path))), tmp_path / "memory.onnx")
    assert from_file.read_bytes() == from_memory.read_bytes()


def test_weights_a_pass_edits_are_written_from_memory(tiny_export, tmp_path):
    path = tiny_export("legacy14")
    graph = G.load_graph(path)
    edited, untouched = file_weights(graph)[:2]
    edited.values = edited.values * 2
    out = G.save_graph(graph, tmp_path / "m.onnx")
    original, written = arrays(onnx.load(str(path))), arrays(onnx.load(str(out)))
    np.testing.assert_array_equal(written[edited.name], original[edited.name] * 2)
    assert written[untouched.name].tobytes() == original[untouched.name].tobytes()
    assert isinstance(untouched._values, G.FileValues)


def test_external_data_in(tiny_export, tmp_path):
    path = tiny_export("legacy14")
    external = tmp_path / "ext.onnx"
    save_external(onnx.load(str(path)), external)
    graph = G.load_graph(external)
    assert {t._values.extent.file.path.name for t in file_weights(graph)} == {"ext.onnx.data"}
    out = G.save_graph(graph, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "out.onnx"]
    assert out.read_bytes() == G.save_graph(G.load_graph(onnx.load(str(external))), tmp_path / "ref.onnx").read_bytes()
    feeds = tiny_feeds(path)
    for got, want in zip(ort_outputs(out, feeds), ort_outputs(path, feeds)):
        np.testing.assert_array_equal(got, want)


def test_external_data_out(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the weights were over protobuf's 2 GiB
    monkeypatch.setattr(onnxfile, "ALIGN_THRESHOLD", 4096)
    path = tiny_export("legacy14")
    graph = G.load_graph(path)
    file_weights(graph)[0].values = file_weights(graph)[0].values + 1  # one weight from memory too
    out = G.save_graph(graph, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out), load_external_data=False)
    entries = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
               if t.data_location == TensorProto.EXTERNAL]
    assert entries and all(e["location"] == "m.onnx.data" for e in entries)
    assert all(int(e["offset"]) % onnxfile.ALIGNMENT == 0 for e in entries if int(e["length"]) > 4096)
    expected = G.to_model(graph)
    assert arrays(onnx.load(str(out))).keys() == arrays(expected).keys()
    assert all(np.array_equal(arrays(onnx.load(str(out)))[k], v) for k, v in arrays(expected).items())
    feeds = tiny_feeds(path)
    for got, want in zip(ort_outputs(out, feeds), ort_outputs(expected, feeds)):
        np.testing.assert_array_equal(got, want)


def test_saving_over_the_source_file_keeps_its_weights(tiny_export, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_export("legacy14").read_bytes())
    expected = G.save_graph(G.load_graph(onnx.load(str(path))), tmp_path / "expected.onnx").read_bytes()
    graph = G.load_graph(path)
    G.save_graph(graph, path)  # renamed over the file the weights are copied from
    again = G.save_graph(graph, tmp_path / "again.onnx")  # the weights still come from the file that was read
    assert path.read_bytes() == again.read_bytes() == expected


@pytest.mark.integration
def test_a_weight_over_2_gib_is_written_as_external_data_and_read_back(tmp_path):
    rows, width = 524_300, 1024  # float32: 2,147,532,800 bytes, past protobuf's 2 GiB
    data = tmp_path / "big.onnx.data"
    try:
        with open(data, "wb") as handle:
            handle.truncate(rows * width * 4)  # sparse: zeros, except the rows written below
            for row in (0, 7, rows - 1):
                handle.seek(row * width * 4)
                handle.write(np.full(width, row + 0.5, np.float32).tobytes())
        table = onnx.TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, width])
        _point_at(table, "big.onnx.data", rows * width * 4)
        graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                                  [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, width])], [table])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "big.onnx"))
        out = G.save_graph(G.load_graph(tmp_path / "big.onnx"), tmp_path / "out" / "big.onnx")
        assert (tmp_path / "out" / "big.onnx.data").stat().st_size == rows * width * 4
        reread = G.load_graph(out)
        [weight] = file_weights(reread)
        assert list(weight.shape) == [rows, width] and weight._values.extent.file.path.name == "big.onnx.data"
        ids = np.array([0, 7, rows - 1], np.int64)
        [y] = ort_outputs(out, {"ids": ids})
        np.testing.assert_array_equal(y, np.repeat((ids + 0.5).astype(np.float32)[:, None], width, axis=1))
    finally:
        for leftover in [data, tmp_path / "out" / "big.onnx.data"]:
            leftover.unlink(missing_ok=True)  # pytest keeps the last runs' folders: not 4 GB of them


def _point_at(tensor: onnx.TensorProto, location: str, length: int) -> None:
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def test_outputs_are_readable_by_others(tiny_export, tmp_path):
    from bertopt.files import new_folder, write_json

    umask = os.umask(0o022)
    try:
        model = G.save_graph(G.load_graph(tiny_export("legacy14")), tmp_path / "m.onnx")
        write_json(tmp_path / "report.json", {"ok": True})
        with new_folder(tmp_path / "results") as staging:
            (staging / "x").write_text("x")
    finally:
        os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in (model, tmp_path / "report.json", tmp_path / "results")] == \
        ["0o644", "0o644", "0o755"]
