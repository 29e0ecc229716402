"""Opsets: which nodes are the ONNX domain's, lowering them to an older default-domain opset, the imports.

`onnx.version_converter` cannot lower BERT exports (measured with onnx 1.23.2: "No Adapter From Version
$18 for Split" on a dynamo opset-18 export, "No Previous Version of Gelu exists" on opset 20), so
`lower_opset` lowers each node whose schema is newer than the target by itself, per `onnx.defs` schema
history: ``Reduce*-18`` get their constant axes back as the attribute; ``Split-18`` loses ``num_outputs``
(Split-13 splits evenly by output count; an uneven split gets Split-18's sizes as an input); ``Cast-19``
loses ``saturate`` (float8 only); ``Reshape-14`` loses ``allowzero`` where that changes nothing (0, or a
constant shape without zeros); ``Shape-15``'s ``start``/``end`` become a Slice of the full shape. Any other
newer op stays only if its older schema takes the same inputs and attributes (Add/Sub/Mul/Div-14, Pow-15,
Where-16, Equal-19, Transpose/Squeeze/Unsqueeze-21... only added types); otherwise CheckFailed naming op
and opset. Which opset to lower to is the target's decision (legalize-ascend's, for a CANN version).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError, CheckFailed
from bertopt.graph.edit import make_constant, unique_name
from bertopt.graph.values import constant_value

# How a node of the default ONNX domain may spell its domain.
ONNX_DOMAINS = ("", "ai.onnx", None)

# Rewrites one node into its older form in place; True when it had to change something.
Lowering = Callable[[gs.Graph, gs.Node], bool]


def in_onnx_domain(node: gs.Node) -> bool:
    return node.domain in ONNX_DOMAINS


def lower_opset(graph: gs.Graph, target: int, needed: str) -> Counter:
    """Rewrite the default-domain nodes whose schema is newer than `target`; counts by op type.

    `needed` ends every refusal: what asks for `target` ("CANN 6.0 needs opset 13")."""
    source = int(graph.opset)
    lowered: Counter = Counter()
    if source <= target:
        return lowered
    for node in [n for n in graph.nodes if in_onnx_domain(n)]:
        if onnx.defs.get_schema(node.op, source).since_version <= target:
            continue
        lowering = LOWERINGS.get(node.op)
        if lowering is not None and lowering(graph, node):
            lowered[node.op] += 1
        _check_signature_at(node, source, target, needed)
    return lowered


def set_default_opset(graph: gs.Graph, opset: int) -> bool:
    """Default domain at `opset`, other domains only while a node uses them; True if the imports changed."""
    used = {n.domain for n in graph.nodes} - set(ONNX_DOMAINS)
    before = [(d.domain, d.version) for d in graph.import_domains or []]
    graph.opset = opset
    graph.import_domains = [onnx.helper.make_opsetid("", opset)] + [
        d for d in graph.import_domains or [] if d.domain in used]
    return [(d.domain, d.version) for d in graph.import_domains] != before


def _check_signature_at(node: gs.Node, source: int, target: int, needed: str) -> None:
    """The node's inputs and attributes must mean the same under the op's `target` schema."""
    where = f"{node.op} '{node.name}' (opset {source})"
    if not onnx.defs.has(node.op, target):
        raise CheckFailed(f"{where} has no opset-{target} form; {needed}")
    schema = onnx.defs.get_schema(node.op, target)
    unknown = sorted(set(node.attrs) - set(schema.attributes))
    if unknown:
        raise CheckFailed(f"{where} uses attribute(s) {unknown} that opset {target} lacks; {needed} and "
                          "bertopt has no lowering for it")
    if len(node.inputs) > schema.max_input:
        raise CheckFailed(f"{where} has {len(node.inputs)} inputs, opset {target} takes at most "
                          f"{schema.max_input}; {needed} and bertopt has no lowering for it")


def _axes_input_to_attribute(graph: gs.Graph, node: gs.Node) -> bool:
    """Reduce*-18 -> 13: constant `axes` input -> `axes` attribute."""
    noop_when_empty = node.attrs.pop("noop_with_empty_axes", 0)
    axes_given = len(node.inputs) > 1 and node.inputs[1].name
    if axes_given:
        axes = constant_value(node.inputs[1])
        if axes is None:
            raise BertoptError(f"{node.op} '{node.name}' computes its axes at run time; "
                               "opset 13 needs them constant")
        if axes.size:
            node.attrs["axes"] = [int(a) for a in axes.reshape(-1)]
        node.inputs.pop(1)
    if noop_when_empty and "axes" not in node.attrs:
        raise BertoptError(f"{node.op} '{node.name}' with no axes and noop_with_empty_axes=1 is an "
                           "identity opset 13 cannot express")
    return True


def _num_outputs_to_sizes(graph: gs.Graph, node: gs.Node) -> bool:
    """Split-18 -> 13: drop `num_outputs`; an uneven split gets Split-18's sizes as an input."""
    count = node.attrs.pop("num_outputs", None)
    if count is None or (len(node.inputs) > 1 and node.inputs[1].name):
        return count is not None
    shape, axis = node.inputs[0].shape, node.attrs.get("axis", 0)
    dim = shape[axis] if shape is not None else None
    if not isinstance(dim, int):
        raise BertoptError(f"Split '{node.name}' splits a dimension of unknown size into {count}; "
                           "freeze shapes first")
    if dim % count:
        chunk = math.ceil(dim / count)
        sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
        node.inputs.append(make_constant(graph, f"{node.name}_split", np.array(sizes, dtype=np.int64)))
    return True


def _drop_saturate(graph: gs.Graph, node: gs.Node) -> bool:
    """Cast-19 -> 13: `saturate` only applies to float8 targets, which opset 13 does not have."""
    return node.attrs.pop("saturate", None) is not None


def _drop_allowzero(graph: gs.Graph, node: gs.Node) -> bool:
    """Reshape-14 -> 13: `allowzero` only matters for a 0 in the target shape (copied before 14)."""
    if "allowzero" not in node.attrs:
        return False
    if node.attrs.pop("allowzero"):
        shape = constant_value(node.inputs[1])
        if shape is None or not shape.all():
            raise BertoptError(f"Reshape '{node.name}' with allowzero=1 and a target shape that is not a "
                               "constant without zeros has no opset-13 spelling")
    return True


def _slice_shape(graph: gs.Graph, node: gs.Node) -> bool:
    """Shape-15 -> 13: `start`/`end` become a Slice of the full shape."""
    start, end = node.attrs.pop("start", None), node.attrs.pop("end", None)
    if start is None and end is None:
        return False
    sliced = node.outputs[0]
    full = gs.Variable(unique_name(graph, f"{node.name}_full"), dtype=np.int64)
    node.outputs = [full]
    bounds = [make_constant(graph, f"{node.name}_{what}", np.array([value], np.int64))
              for what, value in (("start", start or 0), ("end", np.iinfo(np.int64).max if end is None else end))]
    graph.nodes.append(gs.Node("Slice", name=unique_name(graph, f"{node.name}_slice"), inputs=[full, *bounds],
                               outputs=[sliced]))
    return True


LOWERINGS: dict[str, Lowering] = {
    **{op: _axes_input_to_attribute for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                                "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
                                                "ReduceSumSquare")},
    "Split": _num_outputs_to_sizes,
    "Cast": _drop_saturate,
    "Reshape": _drop_allowzero,
    "Shape": _slice_shape,
}
