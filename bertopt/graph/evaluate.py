"""Evaluate a few tensors of a graph with ONNX Runtime: the nodes they are computed from, nothing else.

ModelFacts and fold-attention-mask recognise attention masks by what they compute, not by how an
exporter spelled them: the subgraph computing a mask is cut out and run on probe inputs. Graph
inputs the subgraph reads only for their shapes get zeros of the probe shape.

Weights never enter the probe model: a constant of more than SKELETON_VALUE_LIMIT elements is an input
of the probe, fed at run time with a view of its bytes where they lie (bertopt.graph.values.peek_values),
so ONNX Runtime reads only what the subgraph uses (a few rows of an embedding table that a Shape of the
embeddings pulls in) and nothing is serialised. Small constants stay initializers, for ORT to fold.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

from bertopt.errors import BertoptError, first_line
from bertopt.graph.shapes import SKELETON_VALUE_LIMIT, element_count, is_static
from bertopt.graph.values import peek_values

# Ops whose output depends on their input's shape only, never on its values.
SHAPE_ONLY_OPS = {"Shape", "Size"}


def value_dependents(starts: list[gs.Tensor]) -> set[int]:
    """ids of the tensors whose values depend on `starts` (included); Shape/Size cut the dependency."""
    seen = {id(t) for t in starts}
    frontier = list(starts)
    while frontier:
        for node in frontier.pop().outputs:
            if node.op in SHAPE_ONLY_OPS:
                continue
            for out in node.outputs:
                if id(out) not in seen:
                    seen.add(id(out))
                    frontier.append(out)
    return seen


def closure(tensors: list[gs.Tensor]) -> list[gs.Node]:
    """Every node that `tensors` are computed from, inputs first."""
    order, seen, stack = [], set(), [(t, False) for t in tensors]
    while stack:
        tensor, done = stack.pop()
        node = tensor.inputs[0] if tensor.inputs else None
        if done:
            order.append(node)
        elif node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.append((tensor, True))
            stack.extend((t, False) for t in node.inputs)
    return order


class SubgraphEvaluator:
    """One ONNX Runtime session computing `tensors` of `graph` from the graph inputs they read.

    `batch` and `seq` give the probe shape of every [batch, seq] input; other inputs read must be static.
    Constant tensors are returned as they are.
    """

    def __init__(self, graph: gs.Graph, tensors: list[gs.Tensor], batch: int, seq: int) -> None:
        self._constants = {t.name: t.values for t in tensors if isinstance(t, gs.Constant)}
        computed = [t for t in tensors if not isinstance(t, gs.Constant)]
        nodes = closure(computed)
        read = {id(t) for node in nodes for t in node.inputs} | {id(t) for t in computed}
        self.inputs = {t.name: _probe_shape(t, batch, seq) for t in graph.inputs if id(t) in read}
        self._dtypes = {t.name: input_dtype(t) for t in graph.inputs if id(t) in read}
        self._weights = _weights(nodes)
        self._names = list(dict.fromkeys(t.name for t in computed))
        self._session = _session(graph, nodes, self._names, self._dtypes, self.inputs, self._weights) \
            if computed else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors by name; inputs missing from `feeds` get zeros of their probe shape."""
        if self._session is None:
            return dict(self._constants)
        full = {name: np.asarray(feeds[name], dtype=self._dtypes[name]) if name in feeds
                else np.zeros(shape, dtype=self._dtypes[name]) for name, shape in self.inputs.items()}
        full.update((weight.name, peek_values(weight)) for weight in self._weights)
        try:
            values = self._session.run(self._names, full)
        except Exception as exc:  # ORT raises its own exception types, all without a base class
            raise BertoptError(f"cannot evaluate {self._names}: {first_line(exc)}") from None
        return {**self._constants, **dict(zip(self._names, values))}


def input_dtype(tensor: gs.Tensor) -> np.dtype:
    return np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.int64)


def _probe_shape(tensor: gs.Tensor, batch: int, seq: int) -> tuple[int, ...]:
    if tensor.shape is not None and len(tensor.shape) == 2:
        return batch, seq
    if is_static(tensor):
        return tuple(int(d) for d in tensor.shape)
    raise BertoptError(f"input '{tensor.name}' has an unknown shape {tensor.shape}")


def _weights(nodes: list[gs.Node]) -> list[gs.Constant]:
    """The constants `nodes` read that are weights, not the small values ORT should see (and fold)."""
    constants = {id(t): t for node in nodes for t in node.inputs if isinstance(t, gs.Constant)}
    return [t for t in constants.values() if element_count(t) > SKELETON_VALUE_LIMIT]


def _session(graph: gs.Graph, nodes: list[gs.Node], names: list[str], dtypes: dict[str, np.dtype],
             shapes: dict[str, tuple[int, ...]], weights: list[gs.Constant]) -> ort.InferenceSession:
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(dtypes[name]),
                                                 shapes[name]) for name in shapes]
    inputs += [OnnxExporter.export_value_info_proto(t, do_type_check=True) for t in weights]
    fed = {id(t) for t in weights}
    constants = {id(t): t for node in nodes for t in node.inputs if isinstance(t, gs.Constant) and id(t) not in fed}
    probe = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes], "probe", inputs,
        [onnx.helper.make_empty_tensor_value_info(name) for name in names],
        initializer=[OnnxExporter.export_tensor_proto(t) for t in constants.values()])
    model = onnx.helper.make_model(probe, opset_imports=update_import_domains(graph))
    model.ir_version = graph.ir_version or model.ir_version
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's Fail/InvalidGraph/... share no public base class
        raise BertoptError(f"cannot evaluate {names}: {first_line(exc)}") from None
