"""Editing a gs graph: rewiring uses, adding nodes and constants under unique names.

gs keeps producer/consumer links on each tensor (``tensor.inputs`` are its producers,
``tensor.outputs`` its consumers), so walking the graph is O(1) per step and no pass needs an index
of its own or touches protobuf by hand.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None



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
