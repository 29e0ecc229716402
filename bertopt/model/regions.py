"""Which part of a transformer encoder each node belongs to: "embeddings", "mask", "layer 3 attention",
"layer 3 ffn", "head", read from the graph's structure.

Tensor and node names are the exporter's and the passes' choice, so the structure comes first:

- Boundary markers along the main path, in topological order: every LayerNorm (the op, or the end of
  its decomposed form Sub/Sqrt -> Div -> Mul(gamma) -> Add(beta)) and every attention Softmax (or
  fused Attention op). Counting Softmaxes gives the layer; the LayerNorm before the first Softmax
  closes the embeddings, the first one after a Softmax closes that layer's attention, the next its
  feed-forward block.
- A node belongs to the region of the first marker it reaches (it feeds it, or is it); a node that
  reaches none lies after the last LayerNorm: the head.
- The mask: nodes computed from the attention-mask input before it meets any weight (a MatMul/Gemm
  or embedding Gather with a constant table), and the shape arithmetic feeding only those.

A graph with no attention op at all is not an encoder this can read; its nodes are named from the
exporter's name path instead (`/bert/encoder/layer.3/attention/...` -> "layer 3 attention"), or
"graph" when the name says nothing.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.model.facts import detect_facts

ATTENTION_OPS = frozenset({"Softmax", "Attention", "MultiHeadAttention"})
LAYER_NORM_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                            "SkipSimplifiedLayerNormalization"})
LAYER = re.compile(r"^layer (\d+) (\w+)$")


def node_regions(graph: gs.Graph, order: list[gs.Node]) -> dict[int, str]:
    """id(node) -> region name, for the nodes of `graph` in topological `order`."""
    markers = _markers(order)
    if not any(name.endswith("attention") for name in markers.values()):
        return {id(node): _name_region(node.name) for node in order}
    regions = _first_marker_reached(order, markers)
    for node_id in _mask_nodes(graph, order):
        regions[node_id] = "mask"
    return regions


def layer_of(region: str) -> tuple[int, str] | None:
    """(layer number, part) of "layer 3 attention", None for the other regions."""
    match = LAYER.match(region)
    return (int(match[1]), match[2]) if match else None


def region_rank(region: str) -> tuple:
    """Sort key: embeddings, mask, the layers in order (attention before ffn), head, anything else."""
    layer = layer_of(region)
    if layer:
        return (2, layer[0], layer[1] != "attention", "")
    fixed = {"embeddings": 0, "mask": 1, "head": 3}
    return (fixed.get(region, 4), 0, False, region)


def _markers(order: list[gs.Node]) -> dict[int, str]:
    """id(marker node) -> the region it closes, walking the attention ops and LayerNorms in order."""
    markers: dict[int, str] = {}
    layer, since_attention = -1, 0
    for node in order:
        if node.op in ATTENTION_OPS:
            layer, since_attention = layer + 1, 0
            markers[id(node)] = f"layer {layer} attention"
        elif _ends_layer_norm(node):
            since_attention += 1
            markers[id(node)] = ("embeddings" if layer < 0 else
                                 f"layer {layer} attention" if since_attention == 1 else
                                 f"layer {layer} ffn" if since_attention == 2 else "head")
    return markers


def _ends_layer_norm(node: gs.Node) -> bool:
    if node.op in LAYER_NORM_OPS:
        return True
    return _decomposed_norm_core(node) is not None and not _continues_norm(node)


def _decomposed_norm_core(node: gs.Node) -> gs.Node | None:
    """The Div (x - mean) / sqrt(var + eps) this node ends (itself, or through Mul gamma / Add beta)."""
    for _ in range(3):
        if node.op == "Div" and _produced_by(node.inputs, "Sub") and _produced_by(node.inputs, "Sqrt"):
            return node
        if node.op not in ("Mul", "Add") or not any(isinstance(t, gs.Constant) for t in node.inputs):
            return None
        parents = [t.inputs[0] for t in node.inputs if not isinstance(t, gs.Constant) and t.inputs]
        if len(parents) != 1:
            return None
        node = parents[0]
    return None


def _continues_norm(node: gs.Node) -> bool:
    """Whether the only consumer is the norm's own gamma Mul / beta Add (so `node` is not its end)."""
    consumers = [c for out in node.outputs for c in out.outputs]
    return (len(consumers) == 1 and consumers[0].op in ("Mul", "Add")
            and any(isinstance(t, gs.Constant) for t in consumers[0].inputs)
            and _decomposed_norm_core(consumers[0]) is not None)


def _produced_by(tensors, op: str) -> bool:
    return any(t.inputs and t.inputs[0].op == op for t in tensors if not isinstance(t, gs.Constant))


def _first_marker_reached(order: list[gs.Node], markers: dict[int, str]) -> dict[int, str]:
    """Backwards over the order: a node takes the earliest marker (in `order`) among its consumers'."""
    rank = {node_id: index for index, node_id in enumerate(m for m in (id(n) for n in order) if m in markers)}
    names = {rank[node_id]: name for node_id, name in markers.items()}
    first: dict[int, int | None] = {}
    for node in reversed(order):
        if id(node) in rank:
            first[id(node)] = rank[id(node)]
            continue
        reached = [first.get(id(c)) for out in node.outputs for c in out.outputs]
        reached = [r for r in reached if r is not None]
        first[id(node)] = min(reached) if reached else None
    return {node_id: "head" if r is None else names[r] for node_id, r in first.items()}


_SHAPE_OF = frozenset({"Shape", "Size"})


def _mask_nodes(graph: gs.Graph, order: list[gs.Node]) -> set[int]:
    mask_inputs = _mask_inputs(graph)
    weighted: set[int] = set()  # ids of tensors computed from a weight
    from_mask: set[int] = {id(t) for t in graph.inputs if t.name in mask_inputs}
    mask: set[int] = set()
    for node in order:
        variables = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if node.op in _SHAPE_OF:  # the mask chain reads the hidden states' shape, never their values
            continue
        if _is_weight_node(node) or any(id(t) in weighted for t in variables):
            weighted.update(id(t) for t in node.outputs)
        elif any(id(t) in from_mask for t in variables):
            from_mask.update(id(t) for t in node.outputs)
            mask.add(id(node))
    for node in reversed(order):
        consumers = [c for out in node.outputs for c in out.outputs]
        unweighted = not any(id(t) in weighted for t in node.outputs)
        if unweighted and consumers and all(id(c) in mask for c in consumers):
            mask.add(id(node))
    return mask


def _mask_inputs(graph: gs.Graph) -> set[str]:
    try:
        return {name for name, role in detect_facts(graph).roles.items() if role == "attention_mask"}
    except BertoptError:
        return {t.name for t in graph.inputs if "mask" in t.name.lower()}


def _is_weight_node(node: gs.Node) -> bool:
    if node.op not in ("MatMul", "Gemm", "Gather"):
        return False
    return any(isinstance(t, gs.Constant) and len(t.shape) >= 2 and np.dtype(t.dtype).kind == "f"
               for t in node.inputs)


_NAME_LAYER = re.compile(r"layers?[._/](\d+)/(\w+)")


def _name_region(name: str) -> str:
    """The region an exporter's name path gives, e.g. /bert/encoder/layer.3/intermediate/... -> layer 3 ffn."""
    match = _NAME_LAYER.search(name or "")
    if match:
        part = "attention" if match[2].startswith(("attention", "attn", "self")) else "ffn"
        return f"layer {match[1]} {part}"
    if "embedding" in (name or ""):
        return "embeddings"
    return "graph"
