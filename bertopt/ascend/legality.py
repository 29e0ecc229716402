"""What one CANN version's ATC ONNX parser takes, judged on a graph: the model-level checks of
``bertopt check``, which `legalize-ascend` makes a graph pass for the same target.

Every limit comes from the target (bertopt.ascend.cann, data in bertopt/data/cann.json with sources):
the default-domain opset within the version's range and within the documented range of every op the
graph holds (ATC looks each node up at the model's opset, see cann.json), the IR version, the
operator list, LayerNormalization only where the version lists it. Version-independent: static
input shapes and no Shape ops (the attention kernels need static shapes), float constants inside
the fp16 range (ATC compiles to fp16 on 310P, where they become inf).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.cann import DEFAULT_VERSION, CannTarget, cann_target
from bertopt.ascend.form import Check
from bertopt.graph import FP16_MAX, constant_exceeds_fp16
from bertopt.graph.opset import in_onnx_domain

LAYER_NORMALIZATION = "LayerNormalization"


def onnx_op_types(graph: gs.Graph) -> set[str]:
    """The default-domain op types the graph holds."""
    return {node.op for node in graph.nodes if in_onnx_domain(node)}


def unsupported_ops(graph: gs.Graph, target: CannTarget) -> Counter[str]:
    """How many nodes of each op type the target's ONNX parser does not take (any op outside the ONNX domain)."""
    return Counter(node.op if in_onnx_domain(node) else f"{node.domain}.{node.op}"
                   for node in graph.nodes
                   if not in_onnx_domain(node) or node.op not in target.operators)


def opset_window(op_types: set[str], target: CannTarget) -> tuple[int, int]:
    """The default-domain opsets a model holding `op_types` may declare for `target` (empty if low > high)."""
    low, high = target.opset_range
    for op in op_types:
        op_low, op_high = target.opset_bounds(op)
        low, high = max(low, op_low), min(high, op_high)
    return low, high


def ops_outside_opset(op_types: set[str], opset: int, target: CannTarget) -> list[str]:
    """`op (documented range)` for each op whose own range excludes `opset`."""
    return [f"{op} (opset {low}-{high})" for op, (low, high) in sorted(target.operator_opsets.items())
            if op in op_types and not low <= opset <= high]


def fp16_unsafe_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Float constants with an element beyond the fp16 range (inf or |x| > 65504)."""
    return [tensor for tensor in graph.tensors().values()
            if isinstance(tensor, gs.Constant) and np.dtype(tensor.dtype).kind == "f"
            and constant_exceeds_fp16(tensor)]


def check_model_level(graph: gs.Graph, target: CannTarget | None = None) -> list[Check]:
    """The model-level checks against `target` (None: the default target, as PassOptions.cann)."""
    target = target or cann_target(DEFAULT_VERSION)
    return [_check_opset(graph, target), _check_operator_opsets(graph, target), _check_ir(graph, target),
            _check_operators(graph, target), _check_layer_normalization(graph, target),
            _check_shape_ops(graph), _check_static_inputs(graph), _check_fp16(graph)]


def _check_opset(graph: gs.Graph, target: CannTarget) -> Check:
    opset, (low, high) = int(graph.opset), target.opset_range
    ok = low <= opset <= high
    return Check("opset", ok, f"default-domain opset {opset} {'within' if ok else 'outside'} "
                              f"{target.label}'s {low}-{high}")


def _check_operator_opsets(graph: gs.Graph, target: CannTarget) -> Check:
    opset = int(graph.opset)
    outside = ops_outside_opset(onnx_op_types(graph), opset, target)
    if outside:
        return Check("operator-opsets", False, f"at opset {opset}, {target.label} does not take "
                                               f"{', '.join(outside)}")
    documented = sorted(onnx_op_types(graph) & target.operator_opsets.keys())
    reason = (f"{', '.join(documented)} documented for opset {opset} by {target.label}" if documented
              else f"{target.label} documents no per-operator range for these ops")
    return Check("operator-opsets", True, reason)


def _check_ir(graph: gs.Graph, target: CannTarget) -> Check:
    ir = int(graph.ir_version or 0)
    ok = ir <= target.ir_version
    return Check("ir-version", ok, f"IR version {ir} {'<=' if ok else '>'} {target.ir_version} "
                                   f"({target.label}, ONNX {target.onnx_version})")


def _check_operators(graph: gs.Graph, target: CannTarget) -> Check:
    missing = unsupported_ops(graph, target)
    missing.pop(LAYER_NORMALIZATION, None)  # its own check says what to do about it
    if missing:
        return Check("operators", False, f"not in {target.label}'s ONNX operator list: "
                                         f"{', '.join(sorted(missing))}")
    return Check("operators", True, f"all {len({n.op for n in graph.nodes})} op types are in "
                                    f"{target.label}'s list")


def _check_layer_normalization(graph: gs.Graph, target: CannTarget) -> Check:
    count = sum(node.op == LAYER_NORMALIZATION for node in graph.nodes)
    if count and not target.layer_normalization:
        return Check("layer-normalization", False, f"{count} LayerNormalization op(s): {target.label} has none "
                                                   "(legalize-ascend writes them decomposed)")
    if count:
        return Check("layer-normalization", True, f"{count} LayerNormalization op(s), in {target.label}'s list")
    return Check("layer-normalization", True, "no LayerNormalization op")


def _check_shape_ops(graph: gs.Graph) -> Check:
    shapes = [node.name for node in graph.nodes if node.op == "Shape"]
    if shapes:
        return Check("no-shape-ops", False,
                     f"{len(shapes)} Shape op(s) (freeze the shapes), e.g. {shapes[:3]}")
    return Check("no-shape-ops", True, "no Shape op")


def _check_static_inputs(graph: gs.Graph) -> Check:
    dynamic = [f"{t.name}{list(t.shape) if t.shape is not None else ''}" for t in graph.inputs
               if t.shape is None or not all(isinstance(d, int) and d > 0 for d in t.shape)]
    if dynamic:
        return Check("static-inputs", False, f"dynamic input(s): {', '.join(dynamic)}")
    return Check("static-inputs", True, "every input has a static shape")


def _check_fp16(graph: gs.Graph) -> Check:
    unsafe = fp16_unsafe_constants(graph)
    if unsafe:
        examples = ", ".join(f"'{t.name}' ({_extreme(t.values):.4g})" for t in unsafe[:3])
        return Check("fp16-constants", False, f"{len(unsafe)} float constant(s) beyond fp16's ±{FP16_MAX:g} "
                                              f"(inf in fp16), e.g. {examples}")
    return Check("fp16-constants", True, "every float constant fits fp16")


def _extreme(values: np.ndarray) -> float:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return float(flat[np.nanargmax(np.abs(flat))])
