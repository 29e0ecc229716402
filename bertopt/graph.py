"""Loading, saving and editing ONNX graphs through onnx-graphsurgeon.

Every pass works on a ``gs.Graph``. gs keeps producer/consumer links on each tensor
(``tensor.inputs`` are its producers, ``tensor.outputs`` its consumers), so walking the graph is
O(1) per step and no pass needs an index of its own or touches protobuf by hand.

A graph loaded from a file keeps its initializers' bytes in that file (FileValues, found by
bertopt.onnxfile without parsing them): a pass that reads a value loads that weight alone, and
save_graph copies every weight no pass loaded from the file to the output, never through Python.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from bertopt import onnxfile
from bertopt.errors import BertoptError
from bertopt.onnxfile import Extent, ScannedModel, Weight, copy_fields

# gs warns about every constant it declines to fold; passes report what matters themselves.
G_LOGGER.severity = G_LOGGER.ERROR

# protobuf cannot serialise a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
FP16_MAX = float(np.finfo(np.float16).max)

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
    """The model at `source` without its weights' bytes, and where they lie (bertopt.onnxfile).

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
        raise BertoptError(f"cannot import the ONNX graph: {exc}") from None
    if scanned is not None:
        _refer_to_file(graph, scanned.extents)
    lift_constant_nodes(graph)
    return graph


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

    @property
    def tensor(self) -> onnx.TensorProto:
        whole = onnx.TensorProto()
        whole.CopyFrom(self.stand_in)
        whole.raw_data = self.extent.read()
        return whole

    @property
    def plain(self) -> bool:
        """Whether the bytes are the numpy array itself (see _PLAIN_TYPES)."""
        return self.stand_in.data_type in _PLAIN_TYPES

    def load(self) -> np.ndarray:
        if not self.plain:
            return LazyValues(self.tensor).load()
        return onnxfile.array_of(self.extent, _numpy_dtype(self.stand_in), self.shape)

    def view(self) -> np.ndarray:
        """A read-only array over the file's bytes (no copy; only for plain types)."""
        return np.frombuffer(self.extent.view(), _numpy_dtype(self.stand_in)).reshape(self.shape)


def _numpy_dtype(tensor: onnx.TensorProto) -> np.dtype:
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
    while the rest of the model is exported, then written by bertopt.onnxfile: from the file they
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


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor, or None when the tensor is computed at run time."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def peek_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values (read-only) without keeping them loaded on the tensor.

    gs imports weights lazily and save_graph writes untouched ones from where they were read;
    reading `.values` would keep a numpy copy of every weight scanned (1.3 GB on bert-large) until
    the end. A weight still in its file is a view of the file's bytes, whose pages are let go when
    the next weight is peeked.
    """
    lazy = tensor._values
    if isinstance(lazy, FileValues) and lazy.plain:
        return lazy.view()
    if type(lazy) is LazyValues and lazy.tensor.data_type in _PLAIN_TYPES and lazy.tensor.HasField("raw_data"):
        # a read-only view of the one copy reading raw_data makes; lazy.load() would make two more
        raw = lazy.tensor
        return np.frombuffer(raw.raw_data, _numpy_dtype(raw)).reshape(raw.dims)
    return lazy.load() if isinstance(lazy, LazyValues) else tensor.values


# Scans that need no whole array (a range check) read a weight in pieces of this many bytes.
CHUNK_BYTES = 1 << 20


def value_chunks(tensor: gs.Constant) -> Iterator[np.ndarray]:
    """A constant's values as consecutive flat, read-only pieces, for scans that need no whole array.

    A weight still in its file is read a piece at a time into one reused buffer (a piece is valid
    until the next is asked for): nothing is mapped or kept, so a scan of every weight stays ~1 MB
    resident where peek_values maps the largest weight whole (bert-large's 125 MB embedding table).
    """
    lazy = tensor._values
    if isinstance(lazy, FileValues) and lazy.plain:
        yield from onnxfile.array_chunks(lazy.extent, _numpy_dtype(lazy.stand_in), CHUNK_BYTES)
    else:
        yield peek_values(tensor).reshape(-1)


# Types whose raw_data is the little-endian numpy array itself (not bfloat16, float8 or packed int4).
_PLAIN_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                          onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                          onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}) if sys.byteorder == "little" else frozenset()


def exceeds_fp16(values: np.ndarray) -> bool:
    """Whether an element lies beyond fp16's range (inf included, NaN not).

    From the minimum and maximum, which make no temporary arrays: bert-large's 1.3 GB of weights
    are scanned in a fraction of the time `abs(values[~isnan(values)])` took.
    """
    if values.size == 0:
        return False
    low, high = values.min(), values.max()
    if np.isnan(low) or np.isnan(high):  # rare: NaN propagates through min/max, so drop them first
        return exceeds_fp16(values[~np.isnan(values)])
    return max(-float(low), float(high)) > FP16_MAX


def constant_bytes(tensor: gs.Constant) -> bytes | memoryview:
    """A constant's bytes (little-endian, C order) without converting them: a view of the file or the
    TensorProto's raw data while the weight is still lazily imported, else the loaded array's buffer."""
    lazy = tensor._values
    if isinstance(lazy, FileValues):
        return lazy.extent.view()
    if isinstance(lazy, LazyValues) and lazy.tensor.HasField("raw_data"):
        return lazy.tensor.raw_data
    return memoryview(np.ascontiguousarray(peek_values(tensor))).cast("B")


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def replace_uses(old: gs.Tensor, new: gs.Tensor, graph: gs.Graph | None = None) -> None:
    """Make every consumer of `old` (and the graph outputs, when given) read `new` instead."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new
    if graph is not None and old in graph.outputs:
        _replace_graph_output(graph, old, new)


def _replace_graph_output(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Graph output names are a contract: the new producer takes over the old name."""
    name, dtype, shape = old.name, old.dtype, old.shape
    old.name = f"{name}__replaced"
    new.name = name
    if isinstance(new, gs.Variable):
        new.dtype = new.dtype or dtype
        new.shape = new.shape or shape
    graph.outputs = [new if t is old else t for t in graph.outputs]


def splice_out(node: gs.Node, graph: gs.Graph | None = None) -> None:
    """Remove a node whose first input passes straight through (Identity, Cast to same type...)."""
    replace_uses(node.outputs[0], node.inputs[0], graph)
    node.inputs.clear()
    node.outputs.clear()


def add_node(graph: gs.Graph, op: str, inputs: Sequence[gs.Tensor], *, name: str | None = None,
             attrs: dict | None = None, dtype=None, shape=None, outputs: int = 1) -> list[gs.Variable]:
    """Append a node with fresh output variables and return the outputs."""
    base = name or unique_name(graph, f"bertopt_{op}")
    outs = [gs.Variable(f"{base}_out{i}" if outputs > 1 else f"{base}_out", dtype=dtype, shape=shape)
            for i in range(outputs)]
    graph.nodes.append(gs.Node(op=op, name=base, attrs=attrs or {}, inputs=list(inputs), outputs=outs))
    return outs


def make_constant(graph: gs.Graph, name: str, value: np.ndarray) -> gs.Constant:
    """A new constant with a name unused in the graph."""
    return gs.Constant(unique_name(graph, name), np.asarray(value))


def unique_name(graph: gs.Graph, prefix: str) -> str:
    """`prefix_N`, unused by any node or tensor (a graph bertopt already rewrote holds such names).

    The names in use are collected once per graph and the ones handed out added to them: collecting
    them per call made a pass adding a node per layer quadratic. N comes from gs's counter, which
    only grows, so a name made since then by other means clashes only if it has this very form.
    """
    taken = graph.__dict__.get("_bertopt_names")
    if taken is None:
        taken = graph.__dict__["_bertopt_names"] = {node.name for node in graph.nodes} | set(graph.tensors())
    name = graph._generate_name(prefix, taken)
    taken.add(name)
    return name


def opset_of(graph: gs.Graph) -> int:
    return int(graph.opset)


# Constants up to this many elements stay in the skeleton: shape inference needs their values
# (Reshape targets, axes); larger ones are weights, whose type and shape are enough.
SKELETON_VALUE_LIMIT = 64


def skeleton_model(graph: gs.Graph) -> onnx.ModelProto:
    """The graph without its weights: large constants become typed graph inputs.

    Checking and shape inference cost the same on this as on the full model, but the weights are
    never copied, so verifying bert-large costs milliseconds of memory traffic instead of gigabytes.
    """
    small, large = [], []
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            (small if _element_count(tensor) <= SKELETON_VALUE_LIMIT else large).append(tensor)
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=True) for t in graph.inputs + large]
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    onnx_graph = onnx.helper.make_graph(
        [_skeleton_node(node) for node in graph.nodes], graph.name or "graph", inputs, outputs,
        initializer=[OnnxExporter.export_tensor_proto(t) for t in small],
        value_info=_custom_op_value_info(graph))
    model = onnx.helper.make_model(onnx_graph, opset_imports=update_import_domains(graph))
    if graph.ir_version:
        model.ir_version = graph.ir_version
    return model


# ONNX Runtime's fused activations: their output has their first input's type and shape.
SHAPE_PRESERVING_CUSTOM_OPS = {("com.microsoft", "Gelu"), ("com.microsoft", "FastGelu"),
                               ("com.microsoft", "BiasGelu")}


def _skeleton_node(node: gs.Node) -> onnx.NodeProto:
    """The node as exported, except that an Identity stands in for a shape-preserving custom op.

    ONNX shape inference has no schema for custom ops and would stop at them; through the Identity
    it carries the shape on, so every value after a fused Gelu keeps a known shape.
    """
    if (node.domain, node.op) in SHAPE_PRESERVING_CUSTOM_OPS:
        return onnx.helper.make_node("Identity", [node.inputs[0].name], [node.outputs[0].name], name=node.name)
    return OnnxExporter.export_node(node)


def _custom_op_value_info(graph: gs.Graph) -> list[onnx.ValueInfoProto]:
    """Types of the outputs of other ops outside the ONNX domain, so inference carries on past them."""
    outputs = [out for node in graph.nodes if node.domain not in ("", "ai.onnx", None)
               and (node.domain, node.op) not in SHAPE_PRESERVING_CUSTOM_OPS
               for out in node.outputs if isinstance(out, gs.Variable) and out.dtype is not None]
    return [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in outputs]


def _element_count(tensor: gs.Constant) -> int:
    """From the shape: reading `.values` would load a lazily imported weight into memory."""
    return int(np.prod(tensor.shape, dtype=np.int64))


def infer_shapes(graph: gs.Graph) -> None:
    """Run ONNX shape inference (with data propagation) and record the results on the variables."""
    inferred = onnx.shape_inference.infer_shapes(skeleton_model(graph), data_prop=True)
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, tensor in graph.tensors().items():
        info = known.get(name)
        if isinstance(tensor, gs.Variable) and info is not None and info.type.HasField("tensor_type"):
            tensor_type = info.type.tensor_type
            if tensor_type.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            if tensor_type.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in tensor_type.shape.dim]


def is_static(tensor: gs.Tensor) -> bool:
    return tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape)


def verify(graph: gs.Graph) -> None:
    """The ONNX checker with strict shape inference, on the weightless skeleton."""
    onnx.checker.check_model(skeleton_model(graph), full_check=True)
