"""freeze-shapes: give the graph inputs a static batch and sequence length and fold what becomes constant.

The seed froze shapes with onnxsim, which also rewrites MatMul+Add into Reshape/Gemm/Reshape (ATC then
no longer finds the attention pattern). This pass only does what freezing needs: set the input shapes,
infer every shape, and fold the shape arithmetic (Shape/Gather/Unsqueeze/Concat/Range/ConstantOfShape...)
with onnx-graphsurgeon's folder, which evaluates constant subgraphs in ONNX Runtime. It never fuses or
reorders compute ops, so MatMul+Add stays MatMul+Add.

`Shape` nodes are folded here rather than by gs: onnx-graphsurgeon 0.6.1 ignores the `start`/`end`
attributes of opset-15 `Shape` (the dynamo exporter uses them) and would fold `Shape(x, start=1, end=2)`
of a [2, 16] input into [2, 16] instead of [16].
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from bertopt.errors import BertoptError
from bertopt.graph import infer_shapes, is_static, replace_uses, static_dim, toposort
from bertopt.graph.shapes import element_count
from bertopt.model.facts import ModelFacts, check_shape
from bertopt.pipeline import PassOptions, PassResult, register_pass

# Folding a constant larger than this would bloat the model; such tensors are left to be computed at
# run time.
FOLD_SIZE_LIMIT = 16 << 20
MAX_ROUNDS = 8

# gs folds through ONNX Runtime, whose optimiser warns about every Unsqueeze it leaves alone.
ort.set_default_logger_severity(3)


@register_pass("freeze-shapes", "set static batch/seq (images: batch and --image-size, audio: batch and --frames) "
               "on the inputs and fold the shape arithmetic (keeps MatMul+Add, unlike onnxsim)")
def freeze_shapes(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    check_shape(facts, options.batch, options.seq)
    ops_before = Counter(node.op for node in graph.nodes)
    inputs_set = _set_input_shapes(graph, facts, options)
    rounds = _fold_until_stable(graph)
    removed = ops_before - Counter(node.op for node in graph.nodes)
    if not inputs_set and not removed:
        shape = f"seq {options.seq}" if facts.modality == "text" else f"its {facts.modality} size"
        return PassResult.no_change(f"inputs already static at batch {options.batch}, {shape} "
                                    "and nothing left to fold")
    result = PassResult(changed=True, counts={"inputs_frozen": inputs_set,
                                              "nodes_folded": sum(removed.values()),
                                              **{f"removed_{op}": n for op, n in sorted(removed.items())}})
    result.notes.append(f"folded in {rounds} round(s); {len(graph.nodes)} nodes remain")
    dynamic = [t.name for t in graph.tensors().values() if isinstance(t, gs.Variable) and not is_static(t)]
    if dynamic:
        result.notes.append(f"{len(dynamic)} value(s) still without a static shape, e.g. {dynamic[:3]}")
    return result


def _set_input_shapes(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> int:
    """Fix every role-carrying input: token inputs at [batch, seq], images at [batch, channels, height,
    width] and audio features at [batch, mel bins, frames]; returns how many inputs changed."""
    changed = 0
    for tensor in graph.inputs:
        role = facts.roles.get(tensor.name)
        if role is None:
            continue
        shape = _frozen_shape(tensor, role, options)
        if list(tensor.shape) != shape:
            tensor.shape = shape
            changed += 1
    return changed


def _frozen_shape(tensor: gs.Tensor, role: str, options: PassOptions) -> list[int]:
    dims = list(tensor.shape or [])
    if role == "pixel_values" and len(dims) == 4:
        size = [options.image_size] * 2 if options.image_size else dims[2:4]
        _check_content_size(tensor, dims[2:4], size, "--image-size")
        return [options.batch, _static(dims[1], tensor, "channels", "the channel count"), *size]
    if role == "input_features" and len(dims) == 3:
        frames = options.frames or dims[2]
        _check_content_size(tensor, dims[2:], [frames], "--frames")
        return [options.batch, _static(dims[1], tensor, "mel bins", "the mel bin count"), frames]
    if len(dims) != 2:
        raise BertoptError(f"input {tensor.name} has shape {tensor.shape}, expected [batch, seq]")
    return [options.batch, options.seq]


def _check_content_size(tensor: gs.Tensor, model: list, wanted: list, flag: str) -> None:
    """Vision and audio models fix their size in their position embeddings: a static size is the only one."""
    if not all(static_dim(d) and d > 0 for d in wanted):
        raise BertoptError(f"input {tensor.name} has a dynamic size {tensor.shape}: give {flag}")
    if all(map(static_dim, model)) and list(model) != list(wanted):
        raise BertoptError(f"{flag} {wanted[-1]}: input {tensor.name} is static at {tensor.shape} (its position "
                           f"embeddings fix the size; export the model at that size)")


def _static(dim, tensor: gs.Tensor, name: str, described: str) -> int:
    if not static_dim(dim) or dim <= 0:
        raise BertoptError(f"input {tensor.name} has no static {name} ({tensor.shape}): {described} must be static")
    return dim


def _fold_until_stable(graph: gs.Graph) -> int:
    """Alternate shape inference and folding: each fold can make more shapes, hence more Shapes, known.

    Returns the rounds taken (a round that leaves the node count as it was ends them); the graph's
    shapes are then inferred on its final form. The last round usually finds nothing to fold: it costs
    one shape inference, not a call to gs's folder (which copies the whole graph before it looks), and
    its inference is not repeated when it left the graph as it was.
    """
    for rounds in range(1, MAX_ROUNDS + 1):
        before = _fold_state(graph)
        infer_shapes(graph)
        _fold_static_shape_ops(graph)
        if not _nothing_to_fold(graph):
            graph.fold_constants(fold_shapes=False, size_threshold=FOLD_SIZE_LIMIT,
                                 should_exclude_node=_broadcasts_float_data)
        toposort(graph.cleanup(remove_unused_graph_inputs=False))
        after = _fold_state(graph)
        if after[0] == before[0]:
            if after != before:
                infer_shapes(graph)
            return rounds
    infer_shapes(graph)
    return MAX_ROUNDS


def _fold_state(graph: gs.Graph) -> tuple[int, int]:
    """The node count and how many node inputs are constants: every fold changes one or the other, except
    turning a graph output that nothing reads into a constant, which changes no shape that inference gives."""
    return len(graph.nodes), sum(isinstance(t, gs.Constant) for node in graph.nodes for t in node.inputs)


def _nothing_to_fold(graph: gs.Graph) -> bool:
    """Whether gs's folder would find nothing: no node reads only constants (a node without inputs, such
    as a Constant node, counts as one), and no subgraph or function for it to recurse into."""
    return not graph.functions and not any(
        all(isinstance(t, gs.Constant) for t in node.inputs if not t.is_empty())
        or any(isinstance(attr, gs.Graph) for attr in node.attrs.values()) for node in graph.nodes)


def _broadcasts_float_data(node: gs.Node) -> bool:
    """A node making a float tensor larger than any of its inputs (an Expand of a mask to [batch, 1,
    seq, seq], a Tile) only copies values: folding it is not shape arithmetic, just a bigger model.
    It also keeps freeze-shapes from folding, on a second run, what the other passes wrote, such as
    attention-bigkernel's Expand of the constant zero mask."""
    out = node.outputs[0] if node.outputs else None
    if out is None or out.dtype is None or np.dtype(out.dtype).kind != "f" or not is_static(out):
        return False
    largest = max((element_count(t) for t in node.inputs if t.shape is not None and is_static(t)), default=0)
    return element_count(out) > largest


def _fold_static_shape_ops(graph: gs.Graph) -> None:
    for node in graph.nodes:
        if node.op != "Shape" or not is_static(node.inputs[0]):
            continue
        dims = list(node.inputs[0].shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        value = gs.Constant(f"{node.outputs[0].name}_value", np.array(dims[start:end], dtype=np.int64))
        replace_uses(node.outputs[0], value, graph)
