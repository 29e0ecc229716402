"""The encoder's token-wise span: from the first LayerNorm's input to the output of the LayerNorm that ends
the last layer, where every tensor is [batch, seq, n] (what attention-bigkernel flattens to [batch*seq, n]).

- The first LayerNorm makes the first attention block's input, or sits above it through a token-wise
  MatMul + Add with constant weights (ALBERT projects its normalised embeddings first); without one the
  span starts at the block input itself.
- The last is LN(Add(LN(Add(x, attention)), ffn)) after the last block's input x.
- Operands from outside the span that token-wise nodes inside it broadcast against [batch, seq, n] (XLM
  multiplies every LayerNorm output by its padding mask [batch, seq, 1]) belong to it; one of another
  shape means the span cannot be read as tokens, and `encoder_span` says which.
- Nodes inside it that name an axis of a [batch, seq, n] tensor (a ReduceMean's axes, a Softmax's axis)
  must name the feature axis: counted from the end (-1) it stays the feature axis once the tokens are
  flattened; counted from the start (I-BERT's LayerNorm, written without LayerNorm ops, reduces over
  axis 2) it would name an axis the 2-D tensor lacks, so it is rewritten to -1; an axis of batch or seq
  means the span cannot be read as tokens.

`flatten_tokens` writes the span on [batch*seq, n] and `unflatten_output` reshapes its output back to
[batch, seq, hidden]; between the two, what reads the tokens across the span (attention's context
Reshape) is the caller's to retarget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.graph import (add_node, constant_value, insert_after, make_constant, nodes_between, producer, replace_uses,
                           static_dim)
from bertopt.graph.pattern import Match
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import layernorm_pattern

# ALBERT's first block reads MatMul + Add of its embedding LayerNorm: two nodes to look through.
EMBEDDING_PROJECTION_NODES = 2
# Ops that broadcast their operands against each other (where an operand from outside meets the tokens).
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"})
TOKEN_RANK = 3  # [batch, seq, n]


@dataclass
class EncoderSpan:
    source: gs.Tensor  # what the first LayerNorm reads (else the first block's input)
    output: gs.Tensor  # the output of the LayerNorm ending the last layer
    nodes: list[gs.Node]  # every node on a path from source to output
    operands: list[tuple[gs.Node, int]]  # (node, input index) of the outside operands broadcast against tokens
    feature_axes: list[gs.Node]  # nodes naming the feature axis of a token tensor from the start (axis 2)


def encoder_span(graph: gs.Graph, first_input: gs.Tensor, last_input: gs.Tensor,
                 facts: ModelFacts) -> EncoderSpan | str:
    """The span from the first attention block's input to the last's (see the module docstring), or why
    there is none."""
    layernorms = layernorm_pattern().find_all(graph, allow_escape=True)
    output = last_layernorm_output(layernorms, last_input)
    if output is None:
        return f"cannot find the LayerNorm that ends the last layer (after '{last_input.name}')"
    first = first_layernorm(layernorms, first_input)
    source = first["x"] if first is not None else first_input
    nodes = nodes_between(source, output)
    operands = token_operands(nodes, source, facts)
    if isinstance(operands, str):
        return operands
    axes = feature_axis_nodes(nodes, facts)
    return axes if isinstance(axes, str) else EncoderSpan(source, output, nodes, operands, axes)


def first_layernorm(layernorms: list[Match], first_input: gs.Tensor) -> Match | None:
    """Of `layernorms` (matches of `layernorm_pattern`), the one making the first block's input, else the
    one above it through a token-wise MatMul + Add with constant weights (ALBERT's embedding projection)."""
    by_output = {id(m.root.outputs[0]): m for m in layernorms}
    tensor = first_input
    for _node in range(EMBEDDING_PROJECTION_NODES):
        if id(tensor) in by_output:
            break
        node = producer(tensor)
        computed = [t for t in node.inputs if not isinstance(t, gs.Constant)] if node is not None else []
        if node is None or node.op not in ("MatMul", "Add") or len(computed) != 1:
            return None
        tensor = computed[0]
    return by_output.get(id(tensor))


def last_layernorm_output(layernorms: list[Match], last_input: gs.Tensor) -> gs.Tensor | None:
    """The output of the LayerNorm that ends the last layer, given its block input `last_input`:
    LN(Add(LN(Add(x, attention)), ffn))."""
    by_input = {id(m["x"]): m.root.outputs[0] for m in layernorms}
    tensor = last_input
    for _step in ("attention output LayerNorm", "layer output LayerNorm"):
        tensor = next((by_input[id(add.outputs[0])] for add in tensor.outputs
                       if add.op == "Add" and id(add.outputs[0]) in by_input), None)
        if tensor is None:
            return None
    return tensor


def token_operands(nodes: list[gs.Node], source: gs.Tensor, facts: ModelFacts) -> list[tuple[gs.Node, int]] | str:
    """Operands from outside `nodes` that token-wise nodes among them broadcast against [batch, seq, n]:
    (node, input index) of each, or why the span cannot be read as tokens."""
    inside = {id(out) for node in nodes for out in node.outputs} | {id(source)}
    tokens = [facts.batch, facts.seq]
    found = []
    for node in nodes:
        if node.op not in BROADCASTING or not any(
                id(t) in inside and list(t.shape or [])[:2] == tokens and len(t.shape) == 3 for t in node.inputs):
            continue
        for index, tensor in enumerate(node.inputs):
            if id(tensor) in inside or len(tensor.shape or []) < 2:
                continue
            if len(tensor.shape) != 3 or list(tensor.shape[:2]) != tokens:
                return (f"{node.op} '{node.name}' broadcasts '{tensor.name}' {list(tensor.shape)} against the "
                        f"[batch, seq, n] tokens, which the 2-D encoder would break")
            found.append((node, index))
    return found


def feature_axis_nodes(nodes: list[gs.Node], facts: ModelFacts) -> list[gs.Node] | str:
    """Of `nodes`, those whose data input is [batch, seq, n] and that name its feature axis as 2 (see the
    module docstring), or why the span cannot be read as tokens (a node naming the batch or seq axis)."""
    found = []
    for node in nodes:
        shape = list(node.inputs[0].shape or []) if node.inputs else []
        axes = _named_axes(node)
        if len(shape) != TOKEN_RANK or shape[:2] != [facts.batch, facts.seq] or axes is None:
            continue
        if {axis % TOKEN_RANK for axis in axes} != {TOKEN_RANK - 1}:
            return (f"{node.op} '{node.name}' works on axes {axes} of the [batch, seq, n] tokens, which the 2-D "
                    "encoder would merge")
        if any(axis >= 0 for axis in axes):
            found.append(node)
    return found


def _named_axes(node: gs.Node) -> list[int] | None:
    """The axes a node names: its `axis`/`axes` attribute, or a Reduce's constant axes input (opset 18)."""
    for key in ("axis", "axes"):
        if key in node.attrs:
            value = node.attrs[key]
            return [int(value)] if isinstance(value, int) else [int(a) for a in value]
    if node.op.startswith("Reduce") and len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        return None if value is None else [int(a) for a in np.ravel(value)]
    return None


def _name_feature_axis_from_end(graph: gs.Graph, node: gs.Node) -> None:
    if "axis" in node.attrs:
        node.attrs["axis"] = -1
    elif "axes" in node.attrs:
        node.attrs["axes"] = [-1]
    else:  # a Reduce's axes input (opset 18), perhaps shared: a constant of its own
        node.inputs[1] = make_constant(graph, "bert_feature_axis", np.array([-1], dtype=np.int64))


def is_token_flattening(node: gs.Node) -> bool:
    """A Reshape between [batch, seq, n] and [batch*seq, n]: it moves tokens, never features."""
    if node.op != "Reshape":
        return False
    before, after = node.inputs[0].shape, node.outputs[0].shape
    return (before is not None and after is not None and {len(before), len(after)} <= {2, 3}
            and len(before) != len(after) and before[-1] == after[-1] and static_dim(before[-1]))


def flatten_tokens(graph: gs.Graph, span: EncoderSpan, facts: ModelFacts) -> Counter:
    """The span on [batch*seq, n]: a Reshape [-1, width] on its source, which every former reader then reads;
    every Reshape inside that only flattened or unflattened tokens removed; each feature axis named from the
    start named from the end; each outside operand read flattened (one Reshape per tensor). Counts
    `reshapes_2d` (written), `reshapes_removed` and `axes_from_end`."""
    counts: Counter = Counter()
    tokens, source = facts.batch * facts.seq, span.source
    width = source.shape[-1] if source.shape else facts.hidden  # ALBERT normalises its embedding size
    if list(source.shape or []) != [tokens, width]:
        target = make_constant(graph, "bert_shape_2d", np.array([-1, width], dtype=np.int64))
        counts["reshapes_2d"] += 1
        insert_after(graph, source, "Reshape", extra=[target], shape=[tokens, width])
    for node in span.nodes:
        if is_token_flattening(node):
            replace_uses(node.outputs[0], node.inputs[0], graph)
            counts["reshapes_removed"] += 1
    for node in span.feature_axes:
        _name_feature_axis_from_end(graph, node)
        counts["axes_from_end"] += 1
    flat: dict[int, gs.Tensor] = {}
    for node, index in span.operands:
        tensor = node.inputs[index]
        if id(tensor) not in flat:
            target = make_constant(graph, "bert_shape_2d", np.array([-1, tensor.shape[-1]], dtype=np.int64))
            flat[id(tensor)] = add_node(graph, "Reshape", [tensor, target], dtype=tensor.dtype,
                                        shape=[tokens, tensor.shape[-1]])[0]
            counts["reshapes_2d"] += 1
        node.inputs[index] = flat[id(tensor)]
    return counts


def unflatten_output(graph: gs.Graph, span: EncoderSpan, facts: ModelFacts) -> int:
    """A Reshape back to [batch, seq, hidden] after the span's output, unless every reader already reshapes
    it so; how many Reshapes were written (0 or 1)."""
    full, last = [facts.batch, facts.seq, facts.hidden], span.output
    if last not in graph.outputs and last.outputs and all(_reshapes_to(node, full) for node in last.outputs):
        return 0
    target = make_constant(graph, "bert_shape_3d", np.array(full, dtype=np.int64))
    insert_after(graph, last, "Reshape", extra=[target], shape=full)
    return 1


def _reshapes_to(node: gs.Node, shape: list[int]) -> bool:
    value = constant_value(node.inputs[1]) if node.op == "Reshape" else None
    return value is not None and value.tolist() == shape
