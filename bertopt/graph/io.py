"""Reading and writing ONNX models as onnx-graphsurgeon graphs, weights never passing through Python.

A graph loaded from a file keeps its initializers' bytes in that file (FileValues, found by
bertopt.graph.onnxfile without parsing them): a pass that reads a value loads that weight alone, and
save_graph copies every weight no pass loaded from the file to the output, never through Python.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from bertopt.errors import BertoptError, first_line
from bertopt.graph import onnxfile
from bertopt.graph.edit import replace_uses
from bertopt.graph.onnxfile import Extent, ScannedModel, Weight, copy_fields

# gs warns about every constant it declines to fold; passes report what matters themselves.
G_LOGGER.severity = G_LOGGER.ERROR

# protobuf cannot serialise a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

ModelSource = str | os.PathLike | onnx.ModelProto


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Read an ONNX model (with its external data) or pass a ModelProto through.

    Raises BertoptError with one readable line for a missing path, a file that is not ONNX, or
    external data that is missing.
    """
    if isinstance(source, onnx.ModelProto):
        return source
    return scan_file(source).full_model()


def scan_file(source: str | os.PathLike) -> ScannedModel:
    """The model at `source` without its weights' bytes, and where they lie (bertopt.graph.onnxfile).

    Raises BertoptError with one readable line for a missing path, a file that is not ONNX, or
    external data that is missing or too short.
    """
    path = Path(source)
    if not path.exists():
        raise BertoptError(f"{path}: no such file")
    if not path.is_file():
        raise BertoptError(f"{path}: not a file")
    try:
        scanned = onnxfile.scan(path)
    except OSError as exc:
        raise BertoptError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    model = scanned.skeleton
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise BertoptError(f"{path}: not an ONNX model (no graph, nodes or opset)")
    refuse_what_ort_cannot_load(path, scanned)
    return scanned


def load_graph(source: ModelSource) -> gs.Graph:
    """Load a model as a gs graph with Constant nodes lifted into constant tensors.

    From a file, the initializers' bytes stay in the file (FileValues) until a pass reads them;
    save_graph copies the untouched ones from there.
    """
    scanned = None if isinstance(source, onnx.ModelProto) else scan_file(source)
    model = source if scanned is None else scanned.skeleton
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:  # gs raises bare Exceptions on malformed graphs
        raise BertoptError(f"cannot import the ONNX graph: {first_line(exc)}") from None
    _refuse_unfeedable_types(graph)
    if scanned is not None:
        _refer_to_file(graph, scanned.extents)
    lift_constant_nodes(graph)
    return graph


def refuse_what_ort_cannot_load(path: Path, scanned: ScannedModel) -> None:
    """Refuse (one line) a model ONNX Runtime cannot load: an unknown op or domain, a tensor nothing
    produces, a cycle, a type or IR version it does not take, two producers of one tensor...

    Every command ends in ONNX Runtime (parity, feeds, the emulation), and bertopt's own readers assume
    what its loader checks, so this is the one check of a graph's validity, made before anything reads
    it. It costs milliseconds: ONNX Runtime loads the weightless skeleton, each weight whose bytes were
    left in the file (`scanned.extents`) declared as a graph input of its type and shape instead.
    """
    import onnxruntime as ort

    model = _weights_as_inputs(scanned)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # its errors come back as the exception, not on stderr
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's Fail/InvalidGraph/... share no public base class
        raise BertoptError(f"{path}: ONNX Runtime cannot load the input: {_ort_reason(exc)}") from None


def _weights_as_inputs(scanned: ScannedModel) -> onnx.ModelProto:
    """The skeleton with each weight that has no bytes in it (they are in the file) as a typed graph input."""
    model = onnx.ModelProto()
    copy_fields(scanned.skeleton, model, lambda field: field.name != "graph")
    copy_fields(scanned.skeleton.graph, model.graph, lambda field: field.name != "initializer")
    declared = {value.name for value in model.graph.input}
    for tensor in scanned.skeleton.graph.initializer:
        if tensor.name not in scanned.extents:
            model.graph.initializer.append(tensor)
        elif tensor.name not in declared:  # declared once: a repeated initializer is the last one, to ORT too
            declared.add(tensor.name)
            model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return model


def _ort_reason(exc: Exception) -> str:
    """ONNX Runtime's message without its prefix (`[ONNXRuntimeError] : 10 : INVALID_GRAPH : `) and the
    source line and C++ signature some of its messages start with."""
    reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))
    return re.sub(r"^\S+\.(cc|h):\d+ [^(]*\([^)]*\) ", "", reason)


def _refuse_unfeedable_types(graph: gs.Graph) -> None:
    """Refuse a graph input of a type with no NumPy equivalent (bfloat16, float8...): gs keeps it as ONNX's
    type number, and no feed of it can be made."""
    for tensor in graph.inputs:
        if tensor.dtype is not None and not isinstance(tensor.dtype, np.dtype):
            name = onnx.TensorProto.DataType.Name(tensor.dtype)
            raise BertoptError(f"input '{tensor.name}' has type {name}, which NumPy, and so bertopt, cannot feed")


# Types whose raw_data is the little-endian numpy array itself (not bfloat16, float8 or packed int4).
PLAIN_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                         onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                         onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}) if sys.byteorder == "little" else frozenset()


class FileValues(LazyValues):
    """A weight whose bytes stay in the file the model was read from until something reads them.

    Shape, dtype and size come from the TensorProto without its data (`stand_in`); `load` reads the
    bytes into a new array (what gs keeps once a pass asks for `.values`); `tensor` builds the whole
    TensorProto, which is what gs's exporter embeds (to_model), so every gs path still works.
    """

    def __init__(self, stand_in: onnx.TensorProto, extent: Extent) -> None:
        described = LazyValues(stand_in)  # shape, dtype and nbytes as gs computes them, from dims and type
        self.shape, self.dtype, self.nbytes = described.shape, described.dtype, described.nbytes
        self.stand_in = stand_in
        self.extent = extent
        self.beyond_fp16: bool | None = None  # values.constant_exceeds_fp16, kept: the file's bytes do not change

    @property
    def tensor(self) -> onnx.TensorProto:
        whole = onnx.TensorProto()
        whole.CopyFrom(self.stand_in)
        whole.raw_data = self.extent.read()
        return whole

    @property
    def plain(self) -> bool:
        """Whether the bytes are the numpy array itself (see PLAIN_TYPES)."""
        return self.stand_in.data_type in PLAIN_TYPES

    def load(self) -> np.ndarray:
        if not self.plain:
            return LazyValues(self.tensor).load()
        return onnxfile.array_of(self.extent, numpy_dtype(self.stand_in), self.shape)

    def view(self) -> np.ndarray:
        """A read-only array over the file's bytes (no copy; only for plain types)."""
        return np.frombuffer(self.extent.view(), numpy_dtype(self.stand_in)).reshape(self.shape)


def numpy_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


def _refer_to_file(graph: gs.Graph, extents: dict[str, Extent]) -> None:
    """Make each imported initializer whose bytes were found in the file a FileValues."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues and tensor.name in extents:
            tensor._values = FileValues(tensor._values.tensor, extents[tensor.name])


def lift_constant_nodes(graph: gs.Graph) -> None:
    """Turn `Constant` nodes into gs.Constant tensors so passes see one kind of constant."""
    for node in [n for n in graph.nodes if n.op == "Constant" and len(n.outputs) == 1]:
        value = _constant_node_value(node)
        if value is None:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name, np.asarray(value))
        out.name = f"{out.name}__lifted"
        replace_uses(out, const)
        graph.outputs = [const if t is out else t for t in graph.outputs]
        node.outputs.clear()
        node.inputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return value.values if isinstance(value, gs.Constant) else np.asarray(value)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export a gs graph, keeping its IR version and opset imports."""
    return gs.export_onnx(graph)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write a model atomically: everything goes to a temporary folder beside `path` first.

    Models whose tensors exceed EXTERNAL_DATA_THRESHOLD are written with their weights in
    `<name>.data`. An interrupted save leaves no half-written file under the final name.
    """
    external = not fits_protobuf(model)
    weights = [_memory_weight(tensor, external) for tensor in model.graph.initializer]
    return _write_staged(Path(path), _without_initializers(model), weights, external)


def save_graph(graph: gs.Graph, path: str | os.PathLike) -> Path:
    """Export and write `graph` like save_model; weights no pass loaded are never copied into Python.

    gs.export_onnx would embed every weight's TensorProto in the model (and copy it twice). Instead
    the weights still lazily imported (all a pass did not load) are swapped for data-less stand-ins
    while the rest of the model is exported, then written by bertopt.graph.onnxfile: from the file they
    were read from (FileValues, copied by the kernel) or from their in-memory TensorProto.
    """
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    external = sum(t._values.nbytes for t in constants) > EXTERNAL_DATA_THRESHOLD  # nbytes: from the shape
    kept = {t.name: t for t in constants if _unloaded(t._values)}
    values = {name: tensor._values for name, tensor in kept.items()}
    stand_ins = {name: _data_less(value.stand_in if isinstance(value, FileValues) else value.tensor)
                 for name, value in values.items()}
    try:
        for name, tensor in kept.items():
            tensor._values = LazyValues(stand_ins[name])  # gs's exporter names the stand-in after the tensor
        head = to_model(graph)
    finally:
        for name, tensor in kept.items():
            tensor._values = values[name]
    weights = [_memory_weight(t, external) for t in head.graph.initializer if t.name not in kept]
    weights += [Weight(stand_ins[name], _payload(values[name])) for name in kept]
    return _write_staged(Path(path), _without_initializers(head), weights, external)


def _unloaded(values) -> bool:
    """A weight still as it was read: in its file, or raw bytes in an in-memory TensorProto."""
    return isinstance(values, FileValues) or (type(values) is LazyValues and values.tensor.HasField("raw_data"))


def _payload(values: LazyValues) -> Extent | bytes:
    return values.extent if isinstance(values, FileValues) else values.tensor.raw_data


def _memory_weight(tensor: onnx.TensorProto, external: bool) -> Weight:
    """A tensor held in memory: written whole, or with its raw bytes apart when they go to a data file."""
    if external and tensor.HasField("raw_data"):
        return Weight(_data_less(tensor), tensor.raw_data)
    return Weight(tensor)


def _data_less(tensor: onnx.TensorProto) -> onnx.TensorProto:
    stand_in = onnx.TensorProto()
    copy_fields(tensor, stand_in, lambda field: field.name != "raw_data")
    return stand_in


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    head = onnx.ModelProto()
    copy_fields(model, head, lambda field: field.name != "graph")
    copy_fields(model.graph, head.graph, lambda field: field.name != "initializer")
    return head


def _write_staged(path: Path, head: onnx.ModelProto, weights: list[Weight], external: bool) -> Path:
    """Write the model into a temporary folder beside `path`, then rename what was written into place.

    With `external`, the weights' bytes go to `<name>.data` beside it; an inline model removes a
    `<name>.data` left there by an earlier save.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnxfile.write_model(staging / path.name, head, weights, external=data_name if external else None)
        if external:
            os.replace(staging / data_name, path.parent / data_name)
        else:
            (path.parent / data_name).unlink(missing_ok=True)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the weights leave room for the rest of the model under protobuf's 2 GiB.

    Counted from the initializers' sizes: ModelProto.ByteSize() takes ~8 s on bert-large.
    """
    return sum(tensor_nbytes(t) for t in model.graph.initializer) <= EXTERNAL_DATA_THRESHOLD


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """A TensorProto's data size from its dims and type: reading `raw_data` would copy the bytes."""
    if tensor.HasField("raw_data"):
        return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return tensor.ByteSize()
