"""What ATC's ONNX parser takes: opset, IR version, operator list, static shapes, the fp16 range.

These are the model-level checks of ``bertopt check``; `legalize-ascend` makes a graph pass them.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.form import Check
from bertopt.graph import FP16_MAX, exceeds_fp16, peek_values

ATC_MAX_OPSET = 17
ATC_MAX_IR_VERSION = 8
ONNX_DOMAINS = ("", "ai.onnx", None)


@functools.lru_cache(maxsize=None)
def atc_operator_list() -> frozenset[str]:
    """ATC's ONNX op types, from the package data bertopt/data/atc_onnx_ops.txt ('#' starts a comment)."""
    import importlib.resources

    text = importlib.resources.files("bertopt").joinpath("data", "atc_onnx_ops.txt").read_text()
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(line for line in lines if line)


def unsupported_ops(graph: gs.Graph) -> Counter[str]:
    """How many nodes of each op type ATC's ONNX parser does not take (any op outside the ONNX domain)."""
    supported = atc_operator_list()
    return Counter(node.op if node.domain in ONNX_DOMAINS else f"{node.domain}.{node.op}"
                   for node in graph.nodes if node.domain not in ONNX_DOMAINS or node.op not in supported)


def fp16_unsafe_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Float constants with an element beyond the fp16 range (inf or |x| > 65504)."""
    return [tensor for tensor in graph.tensors().values()
            if isinstance(tensor, gs.Constant) and np.dtype(tensor.dtype).kind == "f"
            and exceeds_fp16(peek_values(tensor))]



def check_model_level(graph: gs.Graph) -> list[Check]:
    return [_check_opset(graph), _check_ir(graph), _check_operators(graph), _check_shape_ops(graph),
            _check_static_inputs(graph), _check_fp16(graph)]


def _check_opset(graph: gs.Graph) -> Check:
    opset = int(graph.opset)
    ok = opset <= ATC_MAX_OPSET
    return Check("opset", ok, f"default-domain opset {opset} {'<=' if ok else '>'} {ATC_MAX_OPSET}")


def _check_ir(graph: gs.Graph) -> Check:
    ir = int(graph.ir_version or 0)
    ok = ir <= ATC_MAX_IR_VERSION
    return Check("ir-version", ok, f"IR version {ir} {'<=' if ok else '>'} {ATC_MAX_IR_VERSION}")


def _check_operators(graph: gs.Graph) -> Check:
    missing = unsupported_ops(graph)
    if missing:
        return Check("operators", False, f"not in ATC's ONNX operator list: {', '.join(sorted(missing))}")
    return Check("operators", True, f"all {len({n.op for n in graph.nodes})} op types are in ATC's list")


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
