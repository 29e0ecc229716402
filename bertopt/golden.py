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
import os
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.pattern import COMMUTATIVE

UPDATE_ENV = "BERTOPT_UPDATE_GOLDENS"
SMALL_CONSTANT = 16


def graph_text(graph: gs.Graph) -> str:
    """The canonical text of `graph` (see the module docstring)."""
    hashes = _structural_hashes(graph)
    names: dict[int, str] = {id(t): t.name for t in graph.inputs}
    numbers = itertools.count()
    lines = [f"input {t.name}: {_type(t)}" for t in graph.inputs]
    for node in _kahn(graph.nodes, key=lambda node: _node_key(node, hashes)):
        for out in node.outputs:
            names.setdefault(id(out), out.name if out in graph.outputs else f"%{next(numbers)}")
        args = ", ".join(_operand(t, names) for t in _ordered_inputs(node, hashes))
        results = ", ".join(names[id(o)] for o in node.outputs)
        attrs = "  ".join(f"{k}={_attr(v)}" for k, v in sorted(node.attrs.items()))
        domain = f"{node.domain}." if node.domain else ""
        lines.append(f"{results} = {domain}{node.op}({args})" + (f"  {attrs}" if attrs else ""))
    lines += [f"output {t.name}: {_type(t)}" for t in graph.outputs]
    return "\n".join(lines) + "\n"


def text_diff(expected: str, actual: str, expected_label: str = "expected",
              actual_label: str = "actual") -> str:
    """A unified diff of two graph texts ('' when they are equal)."""
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                        fromfile=expected_label, tofile=actual_label, n=2))


def assert_graph_matches(graph: gs.Graph, path: str | os.PathLike) -> None:
    """Compare `graph` with the snapshot at `path`; rewrite it when BERTOPT_UPDATE_GOLDENS=1."""
    path = Path(path)
    actual = graph_text(graph)
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        raise AssertionError(f"no golden at {path}; run `python tools/regen_goldens.py` and review it")
    expected = path.read_text()
    if expected != actual:
        raise AssertionError(f"graph differs from the golden {path}:\n"
                             + text_diff(expected, actual, str(path), "this run"))


def _structural_hashes(graph: gs.Graph) -> dict[int, str]:
    """id(tensor) -> hash of how it is computed (graph inputs by name, constants by value)."""
    hashes: dict[int, str] = {}
    for tensor in graph.inputs:
        hashes[id(tensor)] = _digest("input", tensor.name)
    for node in _kahn(graph.nodes, key=lambda node: ""):
        inputs = sorted(_tensor_hash(t, hashes) for t in node.inputs) if node.op in COMMUTATIVE \
            else [_tensor_hash(t, hashes) for t in node.inputs]
        node_hash = _digest(node.domain or "", node.op, repr(sorted((k, _attr(v)) for k, v in node.attrs.items())),
                            *inputs)
        for index, out in enumerate(node.outputs):
            hashes[id(out)] = _digest(node_hash, str(index))
    return hashes


def _tensor_hash(tensor: gs.Tensor, hashes: dict[int, str]) -> str:
    if id(tensor) not in hashes:
        hashes[id(tensor)] = _digest("const", _constant_text(tensor)) if isinstance(tensor, gs.Constant) \
            else _digest("empty" if not tensor.name else "free", tensor.name)
    return hashes[id(tensor)]


def _kahn(nodes: list[gs.Node], key) -> list[gs.Node]:
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
        return _constant_text(tensor)
    if not tensor.name:
        return "<none>"
    return names.get(id(tensor), f"?{tensor.name}")


def _constant_text(tensor: gs.Constant) -> str:
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


def _attr(value) -> str:
    if isinstance(value, gs.Constant):
        return _constant_text(value)
    if isinstance(value, gs.Graph):
        return "<subgraph>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_attr(v) for v in value) + "]"
    return str(value)


def _type(tensor: gs.Tensor) -> str:
    dtype = np.dtype(tensor.dtype).name if tensor.dtype is not None else "?"
    shape = "?" if tensor.shape is None else "[" + ", ".join(str(d) for d in tensor.shape) + "]"
    return f"{dtype}{shape}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
