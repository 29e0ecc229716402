"""Shapes and checks on the graph without its weights: the skeleton, inference, verification."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

from bertopt.graph.opset import in_onnx_domain

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
            (small if element_count(tensor) <= SKELETON_VALUE_LIMIT else large).append(tensor)
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
    outputs = [out for node in graph.nodes if not in_onnx_domain(node)
               and (node.domain, node.op) not in SHAPE_PRESERVING_CUSTOM_OPS
               for out in node.outputs if isinstance(out, gs.Variable) and out.dtype is not None]
    return [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in outputs]


def element_count(tensor: gs.Tensor) -> int:
    """A tensor's element count from its (static) shape: reading a constant's `.values` would load a lazily
    imported weight into memory."""
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


def reinfer_shapes(graph: gs.Graph) -> None:
    """Shapes inferred afresh after a rewrite made the recorded ones stale (tokens flattened to 2-D, say):
    the graph cleaned up and sorted, every shape but the graph inputs' and outputs' forgotten, then inferred."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    inputs, outputs = {id(t) for t in graph.inputs}, {id(t) for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in inputs and id(tensor) not in outputs:
            tensor.shape = None
    infer_shapes(graph)


def static_dim(dim) -> bool:
    """A dimension known before the model runs: a number (a name, None or a negative number is not one)."""
    return isinstance(dim, int) and dim >= 0


def is_static(tensor: gs.Tensor) -> bool:
    """Every dimension of the tensor's shape known (`static_dim`): bertopt's one meaning of a static shape."""
    return tensor.shape is not None and all(static_dim(d) for d in tensor.shape)


def verify(graph: gs.Graph) -> None:
    """The ONNX checker with strict shape inference, on the weightless skeleton."""
    onnx.checker.check_model(skeleton_model(graph), full_check=True)
