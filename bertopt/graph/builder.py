"""Writing ONNX nodes into a gs graph as expressions: ``b.Mul(b.Add(b.Erf(b.Div(x, SQRT2)), 1.0), 0.5)``.

``b = Builder(graph, like=x)``; ``b.Op(*inputs, **attributes)`` appends one node and returns its output
(a list of them with ``outputs=N``). What the issue left open, decided here:

- An input may be a tensor or a plain number (or numpy array). A Python number becomes a new constant typed
  like the call's first tensor operand, else like `like`, else float32 (int64 for an int): ``b.Div(x, 2.0)``
  on a float16 `x` divides by a float16 2. A numpy value keeps its own dtype, so a caller can force one.
  A float meeting an integer tensor is a TypeError, not a silent truncation.
- Outputs get a dtype and shape where they follow from the inputs: elementwise ops (ELEMENTWISE, with
  numpy broadcasting over the shapes, symbolic dimensions included) take them from their tensor operands,
  Cast its `to`, comparisons bool. Anything else is left unknown unless given (``dtype=``, ``shape=``); shape
  inference fills it in later.
- Keywords: ``name=`` (else a unique ``bertopt_<Op>_N``), ``domain=``, ``outputs=`` (how many), ``out=``
  (an existing tensor, or list of them, the node writes instead of new ones), ``dtype=``/``shape=``;
  everything else is an attribute. An attribute whose name clashes with one of those (RandomNormal's
  ``dtype`` and ``shape``) goes in ``attrs={...}``.
- Names are unique in the graph: a node's from `bertopt.graph.unique_name`, its outputs ``<node>_out``
  (``_out<i>`` for several), as `bertopt.graph.add_node` names them.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.graph import make_constant, unique_name

# Ops whose output has the type of their (float) operands and their broadcast shape.
ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "Asin", "Asinh", "Atan", "Atanh", "BitwiseAnd", "BitwiseNot", "BitwiseOr",
    "BitwiseXor", "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu", "Erf", "Exp", "FastGelu", "BiasGelu",
    "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Mean", "Min", "Mish",
    "Mod", "Mul", "Neg", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
    "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
})
# Elementwise ops whose output is bool whatever their operands.
BOOLEAN = frozenset({"And", "Equal", "Greater", "GreaterOrEqual", "IsInf", "IsNaN", "Less", "LessOrEqual",
                     "Not", "Or", "Xor"})
Operand = gs.Tensor | float | int | np.ndarray | np.generic


class Builder:
    """Appends nodes to `graph`; `like` types the constants of calls that have no tensor operand."""

    def __init__(self, graph: gs.Graph, like: gs.Tensor | None = None) -> None:
        self.graph = graph
        self.like = like
        self.nodes: list[gs.Node] = []  # every node this builder made, in order

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():  # ONNX op types are capitalised; anything else is a typo
            raise AttributeError(op_type)
        return lambda *inputs, **keywords: self.op(op_type, *inputs, **keywords)

    def op(self, op_type: str, *inputs: Operand | None, name: str | None = None, domain: str | None = None,
           outputs: int = 1, out: gs.Tensor | Sequence[gs.Tensor] | None = None, dtype=None,
           shape: Sequence | None = None, attrs: dict | None = None,
           **attributes) -> gs.Variable | list[gs.Variable]:
        """One `op_type` node; its output, or the list of them when `outputs` > 1 or `out` is a list.
        A None input is an omitted optional input."""
        tensors = [self._tensor(i, inputs, op_type) for i in inputs]
        attributes = {**attributes, **(attrs or {})}
        node_name = name or unique_name(self.graph, f"bertopt_{op_type}")
        if out is not None:
            results = list(out) if isinstance(out, (list, tuple)) else [out]
        else:
            dtype = dtype if dtype is not None else _output_dtype(op_type, tensors, attributes)
            shape = shape if shape is not None else _output_shape(op_type, tensors)
            count = max(outputs, 1)
            results = [gs.Variable(f"{node_name}_out{i}" if count > 1 else f"{node_name}_out", dtype=dtype,
                                   shape=shape) for i in range(count)]
        node = gs.Node(op_type, node_name, attrs=attributes, inputs=tensors, outputs=results, domain=domain)
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return results if outputs > 1 or isinstance(out, (list, tuple)) else results[0]

    def constant(self, value, like: gs.Tensor | None = None) -> gs.Constant:
        """A new constant: a Python number typed like `like` (else the builder's `like`), a numpy value as is."""
        if isinstance(value, (np.ndarray, np.generic)):
            return make_constant(self.graph, "bertopt_const", np.asarray(value))
        return make_constant(self.graph, "bertopt_const", np.array(value, _number_dtype(value, like or self.like)))

    def _tensor(self, operand: Operand | None, inputs: Sequence, op_type: str) -> gs.Tensor:
        if operand is None:
            return gs.Variable.empty()
        if isinstance(operand, gs.Tensor):
            return operand
        if not isinstance(operand, (numbers.Number, np.ndarray, np.generic)):
            raise TypeError(f"{op_type} input {operand!r} is neither a tensor nor a number")
        return self.constant(operand, next((i for i in inputs if isinstance(i, gs.Tensor)), None))


def _number_dtype(value, like: gs.Tensor | None) -> np.dtype:
    """The dtype a Python number takes beside `like`: like's own where known."""
    given = np.asarray(value).dtype
    if like is None or like.dtype is None:
        return {"f": np.dtype(np.float32), "b": given}.get(given.kind, np.dtype(np.int64))
    dtype = np.dtype(like.dtype)
    if dtype.kind in "iub" and given.kind == "f" and not float(value).is_integer():
        raise TypeError(f"{value} beside the {dtype} tensor '{like.name}' would be truncated")
    return dtype


def _output_dtype(op_type: str, inputs: list[gs.Tensor], attributes: dict):
    if op_type == "Cast":
        return onnx.helper.tensor_dtype_to_np_dtype(attributes["to"])
    if op_type in BOOLEAN:
        return np.dtype(bool)
    if op_type in ELEMENTWISE:
        computed = [t for t in inputs if not isinstance(t, gs.Constant)]
        return (computed or inputs)[0].dtype if inputs else None
    return None


def _output_shape(op_type: str, inputs: list[gs.Tensor]) -> list | None:
    """The broadcast of the operands' shapes for an elementwise op; None where any is unknown."""
    if op_type not in ELEMENTWISE | BOOLEAN | {"Cast"}:
        return None
    shapes = [t.shape for t in inputs if t.name or isinstance(t, gs.Constant)]
    if not shapes or any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    return [_broadcast_dim([s[axis] for s in padded]) for axis in range(rank)]


def _broadcast_dim(dims: list):
    """Dims of 1 give way; equal dims (numbers or names) stay; anything else is unknown (None)."""
    rest = {d for d in dims if d != 1}
    if not rest:
        return 1
    return rest.pop() if len(rest) == 1 else None
