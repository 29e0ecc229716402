"""LayerNorm in the decomposed spelling ATC's `LayerNormONNXFusionPass` fuses into its LayerNorm kernel.

The pass (canndev, mirrored in repo `dengguojie/vue-element-admin`,
`ops/built-in/fusion_pass/graph_fusion/ai_core/layer_norm_onnx_fusion_pass.cc`) matches

    mean = ReduceMean(x)            keep_dims true, axes give begin_norm_axis
    d    = Sub(x, mean)             ONE Sub: its output has exactly 2 consumers, Pow and Div
    var  = ReduceMean(Pow(d, 2))    exponent a constant scalar (shape [] or [1]) equal to 2
    y    = Add(Mul(Div(d, Sqrt(Add(var, eps))), gamma), beta)

with epsilon a constant scalar <= 0.1 on either input of its Add, gamma on input 1 of the Mul and
beta on input 1 of the last Add (both constants shaped like x's normalised dims), and every other
intermediate read by exactly one node (`CheckEdges`, `CheckValue`, `GetScalarFromOp`, `CheckShape`).

Exporters also write spellings of the same LayerNorm that this pass does not match, found here by
`layernorm_pattern` (and rewritten by the `layernorm-for-atc` pass):

- the variance as `Mul(d, d)`: torch.onnx (legacy at opset 14 and dynamo at 18, torch 2.13) writes it
  for a hand-written LayerNorm `((x - u) * (x - u)).mean(-1, keepdim=True)`, checked by exporting one;
  the pass wants `Pow` with exponent 2 (`CheckValue`);
- `Sub(x, mean)` twice, one for the variance and one for the Div: "duplicated sub nodes exported from
  older version of PyTorch" (ONNX Runtime's LayerNormFusion, repo `microsoft/onnxruntime`,
  `onnxruntime/core/optimizer/layer_norm_fusion.cc`, which fuses both); the ATC pass wants the Pow and
  the Div to read one Sub (`CheckEdges`: "pow0_input0 and div0_input0 are different").
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph import add_node, make_constant, unique_name
from bertopt.pattern import Const, OneOf, Op, Pattern, Var, _

# ONNX 18 moved ReduceMean's `axes` from an attribute to an input.
AXES_AS_INPUT_SINCE = 18
# LayerNormONNXFusionPass::CheckValue: "the epsilon of Add0 ... should be close to 0".
MAX_FUSED_EPSILON = 0.1


def write_decomposed_layernorm(graph: gs.Graph, x: gs.Tensor, scale: gs.Tensor, bias: gs.Tensor | None,
                               epsilon: float, axis: int, out: gs.Tensor) -> None:
    """Compute LayerNormalization(x, scale, bias) into `out` in the spelling ATC fuses.

    Written at the graph's opset (ReduceMean axes as an attribute before 18, as an input from 18).
    A missing bias becomes a zero constant, since the fusion needs the Mul and the Add both. Only
    float32 inputs: ONNX LayerNormalization computes in float32 anyway (stash_type 1), so the
    decomposition then computes exactly what the op did, up to rounding.
    """
    dtype = np.dtype(x.dtype) if x.dtype is not None else None
    if dtype != np.float32:
        raise BertoptError(f"LayerNormalization on {dtype} input '{x.name}': bertopt writes the decomposed "
                           "form for float32 only")
    axes = _normalised_axes(x, axis)
    if bias is None:
        bias = make_constant(graph, "bertopt_ln_zero_bias", np.zeros(scale.shape, np.float32))
    like = {"dtype": x.dtype, "shape": x.shape}
    mean = _reduce_mean(graph, x, axes)
    centred = add_node(graph, "Sub", [x, mean], **like)[0]
    two = make_constant(graph, "bertopt_ln_two", np.array(2.0, np.float32))
    squared = add_node(graph, "Pow", [centred, two], **like)[0]
    variance = _reduce_mean(graph, squared, axes)
    eps = make_constant(graph, "bertopt_ln_epsilon", np.array(epsilon, np.float32))
    shifted = add_node(graph, "Add", [variance, eps], dtype=x.dtype)[0]
    deviation = add_node(graph, "Sqrt", [shifted], dtype=x.dtype)[0]
    normalised = add_node(graph, "Div", [centred, deviation], **like)[0]
    scaled = add_node(graph, "Mul", [normalised, scale], **like)[0]
    graph.nodes.append(gs.Node("Add", name=unique_name(graph, "bertopt_ln_beta"), inputs=[scaled, bias],
                               outputs=[out]))


def decomposed_layernorm_pattern() -> Pattern:
    """The decomposed LayerNorm exactly as LayerNormONNXFusionPass matches it (case 1, with affine).

    Bound names: x, two, epsilon, scale, bias; nodes `mean` and `centred` (the one shared Sub).
    """
    x = Var("x")
    mean = Op("ReduceMean", x, name="mean", where=_keeps_dims, partial_inputs=True)
    centred = Op("Sub", x, mean, name="centred")
    squared = Op("Pow", centred, Const(2.0, name="two", where=_is_scalar))
    variance = Op("ReduceMean", squared, where=_keeps_dims, partial_inputs=True)
    eps = Const(name="epsilon", where=(_small_scalar, f"a scalar <= {MAX_FUSED_EPSILON}"))
    normalised = Op("Div", centred, Op("Sqrt", Op("Add", variance, eps)))
    scaled = Op("Mul", normalised, Const(name="scale"), commute=False)
    return Pattern(Op("Add", scaled, Const(name="bias"), commute=False))


def layernorm_pattern() -> Pattern:
    """Any LayerNorm, bound to its input x: a LayerNormalization op (node `layernorm`), or the decomposed
    form in any spelling above (nodes `mean`, `centred` read by the variance, `square` (`Pow(d, 2)` or
    `Mul(d, d)`), `centred_twin` when the Div reads a second Sub, `normalised`, `scaled`, `shifted`).

    Operands of the Mul by gamma and the Add of beta may come in either order. Of the constants only
    the Pow exponent is read: gamma and beta may stay lazily loaded.
    """
    x = Var("x")
    mean = Op("ReduceMean", x, name="mean", partial_inputs=True)
    centred = Op("Sub", x, mean, name="centred")
    square = OneOf(Op("Pow", centred, Const(2.0), name="square"), Op("Mul", centred, centred, name="square"))
    variance = Op("ReduceMean", square, partial_inputs=True)
    numerator = OneOf(centred, Op("Sub", x, mean, name="centred_twin"))
    normalised = Op("Div", numerator, Op("Sqrt", Op("Add", variance, Const())), name="normalised")
    scaled = Op("Mul", normalised, Const(), name="scaled")
    decomposed = Op("Add", scaled, Const(), name="shifted")
    op = Op("LayerNormalization", x, _, partial_inputs=True, outputs=None, name="layernorm")
    return Pattern(OneOf(op, decomposed))


def _normalised_axes(x: gs.Tensor, axis: int) -> list[int]:
    """The axes LayerNormalization normalises: [axis, ..., rank - 1] (negative: [axis, ..., -1])."""
    if axis < 0:
        return list(range(axis, 0))
    if x.shape is None:
        raise BertoptError(f"LayerNormalization on '{x.name}' with axis {axis} and unknown rank")
    return list(range(axis, len(x.shape)))


def _reduce_mean(graph: gs.Graph, data: gs.Tensor, axes: list[int]) -> gs.Tensor:
    if int(graph.opset) >= AXES_AS_INPUT_SINCE:
        axes_input = make_constant(graph, "bertopt_ln_axes", np.array(axes, np.int64))
        return add_node(graph, "ReduceMean", [data, axes_input], attrs={"keepdims": 1}, dtype=data.dtype)[0]
    return add_node(graph, "ReduceMean", [data], attrs={"axes": axes, "keepdims": 1}, dtype=data.dtype)[0]


def _keeps_dims(node: gs.Node) -> bool:
    return node.attrs.get("keepdims", 1) == 1


def _is_scalar(values: np.ndarray) -> bool:
    return values.size == 1 and values.ndim <= 1


def _small_scalar(values: np.ndarray) -> bool:
    return _is_scalar(values) and float(values.reshape(-1)[0]) <= MAX_FUSED_EPSILON
