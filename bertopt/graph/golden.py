"""Readable, name-insensitive text snapshots of graphs, for golden before/after tests.

`graph_text(graph)` writes one line per node in a canonical order:

    %7 = MatMul(%5, const[32x32 float32 #3f2a9c])  axis=...
    start_logits = Squeeze(%40, const[1] int64 = [-1])

Graph inputs and outputs keep their names (they are the model's contract); every other tensor is
named `%N` by its position in the canonical order, so renaming a tensor or node changes nothing.
The order is topological with ties broken by a structural hash of each node (its op, attributes
and the hashes of its inputs), and the inputs of commutative ops are listed in hash order, so a
graph whose Add/Mul operands were swapped prints the same text. Small constants are shown by
value, large ones by shape, dtype and a hash of their values rounded to 4 significant digits
(stable across the last-bit noise of different exporters, yet sensitive to any real change).

`assert_graph_matches(graph, path)` compares with a stored snapshot and fails with a unified diff;
with BERTOPT_UPDATE_GOLDENS=1 in the environment it rewrites the snapshot instead
(`tools/regen_goldens.py` runs the golden tests that way).
"""

from __future__ import annotations

import difflib
import hashlib
import heapq
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph.pattern import COMMUTATIVE

UPDATE_ENV = "BERTOPT_UPDATE_GOLDENS"
SMALL_CONSTANT = 16


def graph_text(graph: gs.Graph) -> str:
    """The canonical text of `graph` (see the module docstring)."""
    hashes = structural_hashes(graph)
    names: dict[int, str] = {id(t): t.name for t in graph.inputs}
    numbers = itertools.count()
    lines = [f"input {t.name}: {type_text(t)}" for t in graph.inputs]
    for node in topological_order(graph.nodes, key=lambda node: _node_key(node, hashes)):
        for out in node.outputs:
            names.setdefault(id(out), out.name if out in graph.outputs else f"%{next(numbers)}")
        args = ", ".join(_operand(t, names) for t in _ordered_inputs(node, hashes))
        results = ", ".join(names[id(o)] for o in node.outputs)
        attrs = "  ".join(f"{k}={attr_text(v)}" for k, v in sorted(node.attrs.items()))
        domain = f"{node.domain}." if node.domain else ""
        lines.append(f"{results} = {domain}{node.op}({args})" + (f"  {attrs}" if attrs else ""))
    lines += [f"output {t.name}: {type_text(t)}" for t in graph.outputs]
    return "\n".join(lines) + "\n"


def text_diff(expected: str, actual: str, expected_label: str = "expected",
              actual_label: str = "actual") -> str:
    """A unified diff of two graph texts ('' when they are equal)."""
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                        fromfile=expected_label, tofile=actual_label, n=2))


@dataclass
class ParsedGraph:
    """A graph read back from its snapshot text; constants carry their snapshot text, not their values."""

    graph: gs.Graph
    constant_texts: dict[int, str]  # id(gs.Constant) -> its text in the snapshot

    def constant_text(self, tensor: gs.Constant) -> str:
        return self.constant_texts[id(tensor)]


_NODE_LINE = re.compile(r"(?P<results>[^=]+?) = (?P<op>[\w.]+)\((?P<rest>.*)$")
_PORT_LINE = re.compile(r"(?P<kind>input|output) (?P<name>.+): (?P<dtype>[\w?]+)(?P<shape>\[.*\]|\?)$")
_CONSTANT = re.compile(r"const\[(?P<shape>\S+) (?P<dtype>\w+)")


def parse_graph_text(text: str) -> ParsedGraph:
    """Rebuild the graph a snapshot describes (the inverse of `graph_text`, up to large constants' values).

    Raises BertoptError on a line that is not in the snapshot format.
    """
    tensors: dict[str, gs.Variable] = {}
    constant_texts: dict[int, str] = {}
    graph = gs.Graph()
    for number, line in enumerate(text.splitlines(), 1):
        try:
            _parse_line(line, graph, tensors, constant_texts)
        except (ValueError, KeyError, TypeError) as exc:
            raise BertoptError(f"snapshot line {number} is not in the graph-text format: {line[:60]!r} "
                               f"({exc})") from None
    return ParsedGraph(graph, constant_texts)


def _parse_line(line: str, graph: gs.Graph, tensors: dict[str, gs.Variable], constant_texts: dict[int, str]) -> None:
    port = _PORT_LINE.match(line)
    if port:
        tensor = tensors.setdefault(port["name"], gs.Variable(port["name"]))
        tensor.dtype = None if port["dtype"] == "?" else np.dtype(port["dtype"])
        tensor.shape = None if port["shape"] == "?" else [_dim(d) for d in _split_top(port["shape"][1:-1])]
        (graph.inputs if port["kind"] == "input" else graph.outputs).append(tensor)
        return
    node = _NODE_LINE.match(line)
    if not node:
        raise ValueError("neither a node nor an input/output line")
    args, attrs = _split_call(node["rest"])
    domain, _, op = node["op"].rpartition(".")
    inputs = [_parse_operand(arg, tensors, constant_texts) for arg in _split_top(args)]
    outputs = [tensors.setdefault(name, gs.Variable(name)) for name in node["results"].split(", ")]
    attributes = dict(item.split("=", 1) for item in attrs.split("  ") if item)
    graph.nodes.append(gs.Node(op, attrs=attributes, inputs=inputs, outputs=outputs, domain=domain or None))


def _split_call(rest: str) -> tuple[str, str]:
    """`args)  attrs` -> (args, attrs), finding the parenthesis that closes the call."""
    depth = 0
    for index, char in enumerate(rest):
        if char in "([":
            depth += 1
        elif char in "])":
            if depth == 0 and char == ")":
                return rest[:index], rest[index + 1:].strip()
            depth -= 1
    raise ValueError("unclosed call")


def _split_top(text: str) -> list[str]:
    """Split on ', ' outside brackets (constant values are bracketed lists)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char == "["
        depth -= char == "]"
        if depth == 0 and text.startswith(", ", index):
            parts.append(text[start:index])
            start = index + 2
    tail = text[start:]
    return parts + [tail] if tail or parts else parts


def _parse_operand(text: str, tensors: dict[str, gs.Variable], constant_texts: dict[int, str]) -> gs.Tensor:
    if text == "<none>":
        return gs.Variable.empty()
    constant = _CONSTANT.match(text)
    if constant:
        shape = () if constant["shape"] == "scalar" else tuple(int(d) for d in constant["shape"].split("x"))
        # zero-stride zeros: the shape and dtype the region finder reads, without the memory
        tensor = gs.Constant("", np.broadcast_to(np.zeros((), np.dtype(constant["dtype"])), shape))
        constant_texts[id(tensor)] = text
        return tensor
    name = text[1:] if text.startswith("?") else text
    return tensors.setdefault(name, gs.Variable(name))


def _dim(text: str) -> int | str | None:
    if text == "None":
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def constant_text(tensor: gs.Constant) -> str:
    """A constant as the snapshots show it: small by value, large by shape, dtype and rounded-value hash."""
    values = np.asarray(tensor.values)
    shape = "x".join(str(d) for d in values.shape) or "scalar"
    if values.size <= SMALL_CONSTANT:
        return f"const[{shape} {values.dtype}] = {_values(values)}"
    rounded = values.astype(np.float64) if values.dtype.kind in "fc" else values
    if values.dtype.kind == "f":
        rounded = np.array([float(f"{v:.4g}") for v in rounded.reshape(-1)])
    digest = hashlib.sha256(np.ascontiguousarray(rounded).tobytes()).hexdigest()[:6]
    return f"const[{shape} {values.dtype} #{digest}]"


def _values(values: np.ndarray) -> str:
    flat = values.reshape(-1).tolist()
    if values.dtype.kind == "f":
        flat = [float(f"{v:.6g}") for v in flat]
    return str(flat[0] if values.ndim == 0 else flat)


def structural_hashes(graph: gs.Graph,
                      constant_text: Callable[[gs.Constant], str] = constant_text) -> dict[int, str]:
    """id(tensor) -> hash of how it is computed (graph inputs by name, constants by `constant_text`).

    Equal hashes in two graphs mean equal computations, whatever the tensors are called; the graph
    diff (bertopt.report.diff) matches nodes across graphs by them.
    """
    hashes: dict[int, str] = {}
    for tensor in graph.inputs:
        hashes[id(tensor)] = _digest("input", tensor.name)
    for node in topological_order(graph.nodes, key=lambda node: ""):
        inputs = [_tensor_hash(t, hashes, constant_text) for t in node.inputs]
        if node.op in COMMUTATIVE:
            inputs.sort()
        node_hash = _digest(node.domain or "", node.op,
                            repr(sorted((k, attr_text(v)) for k, v in node.attrs.items())), *inputs)
        for index, out in enumerate(node.outputs):
            hashes[id(out)] = _digest(node_hash, str(index))
    return hashes


def _tensor_hash(tensor: gs.Tensor, hashes: dict[int, str],
                 constant_text: Callable[[gs.Constant], str] = constant_text) -> str:
    if id(tensor) not in hashes:
        hashes[id(tensor)] = _digest("const", constant_text(tensor)) if isinstance(tensor, gs.Constant) \
            else _digest("empty" if not tensor.name else "free", tensor.name)
    return hashes[id(tensor)]


def topological_order(nodes: list[gs.Node], key) -> list[gs.Node]:
    """Topological order that always takes the ready node with the smallest `key` (then the first)."""
    producers = {id(out) for node in nodes for out in node.outputs}
    waiting = {id(n): sum(1 for t in n.inputs if id(t) in producers) for n in nodes}
    ticket = itertools.count()
    ready = [(key(n), next(ticket), n) for n in nodes if waiting[id(n)] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for consumer in (c for out in node.outputs for c in out.outputs):
            if id(consumer) not in waiting:
                continue
            waiting[id(consumer)] -= sum(1 for t in consumer.inputs if t in node.outputs)
            if waiting[id(consumer)] == 0:
                heapq.heappush(ready, (key(consumer), next(ticket), consumer))
    return order


def _node_key(node: gs.Node, hashes: dict[int, str]) -> str:
    return hashes.get(id(node.outputs[0]), "") if node.outputs else ""


def _ordered_inputs(node: gs.Node, hashes: dict[int, str]) -> list[gs.Tensor]:
    if node.op in COMMUTATIVE:
        return sorted(node.inputs, key=lambda t: _tensor_hash(t, hashes))
    return list(node.inputs)


def _operand(tensor: gs.Tensor, names: dict[int, str]) -> str:
    if isinstance(tensor, gs.Constant):
        return constant_text(tensor)
    if not tensor.name:
        return "<none>"
    return names.get(id(tensor), f"?{tensor.name}")


def attr_text(value) -> str:
    if isinstance(value, gs.Constant):
        return constant_text(value)
    if isinstance(value, gs.Graph):
        return "<subgraph>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(attr_text(v) for v in value) + "]"
    return str(value)


def type_text(tensor: gs.Tensor) -> str:
    dtype = np.dtype(tensor.dtype).name if tensor.dtype is not None else "?"
    shape = "?" if tensor.shape is None else "[" + ", ".join(str(d) for d in tensor.shape) + "]"
    return f"{dtype}{shape}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
