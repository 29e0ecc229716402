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

Exporters also write spellings of the same LayerNorm that this pass does not match, found by
`bertopt.model.forms.layernorm_pattern` (and rewritten by the `layernorm-for-atc` pass):

- the variance as `Mul(d, d)`: torch.onnx (legacy at opset 14 and dynamo at 18, torch 2.13) writes it
  for a hand-written LayerNorm `((x - u) * (x - u)).mean(-1, keepdim=True)`, checked by exporting one;
  the pass wants `Pow` with exponent 2 (`CheckValue`);
- `Sub(x, mean)` twice, one for the variance and one for the Div: "duplicated sub nodes exported from
  older version of PyTorch" (ONNX Runtime's LayerNormFusion, repo `microsoft/onnxruntime`,
  `onnxruntime/core/optimizer/layer_norm_fusion.cc`, which fuses both); the ATC pass wants the Pow and
  the Div to read one Sub (`CheckEdges`: "pow0_input0 and div0_input0 are different");
- torch's float16 LayerNorm: the legacy exporter (opsets below 17) writes a `model.half()` LayerNorm as
  `Sub -> Cast(to=DOUBLE) -> Pow -> ReduceMean -> Add(eps) -> Sqrt`, `Div(Cast, Sqrt) -> Cast(to=FLOAT16)
  -> Mul(gamma) -> Add(beta)`, measured on its tiny fp16 export (torch 2.13).

Float16: what ATC fuses, and what bertopt writes. LayerNormONNXFusionPass (commit ce519dc5, the one
bertopt/data/fusion_gates.json cites) has a Cast in cases 3 and 4 only between the Sub and the Pow
(lines 145-190), with the Div still reading the Sub (`CheckEdges`, lines 406-426) and the Mul reading
the Div directly. torch's spelling (the Div reads the upcast, a second Cast between the Div and the
Mul) matches none of its six cases, and in a valid ONNX graph case 3 is no upcast at all: Div(Sub,
Sqrt) takes one type, so its Cast must keep the Sub's. An upcast LayerNorm therefore has no spelling
ATC fuses; the float16 case-1 chain has one: since canndev 9f3f119c (2022-05-25) the pass reads float16
scalars as float16 (`GetScalarFromOp`, lines 476-481, `fp16_t::toFloat`); before it, through a float
pointer, as GeluONNXFusionPass still does (see legalize-ascend), so an older CANN would misread them
(which CANN releases carry that commit is not known). So `layernorm-for-atc` drops torch's Casts and
legalize-ascend decomposes a float16 LayerNormalization in float16, constants typed like x. The
variance is then computed in float16 on ONNX Runtime (ATC's LayerNorm kernel computes its own way),
and an epsilon below float16's range becomes its smallest subnormal, about 6e-8 (BERT's 1e-12 would round
to 0, and a zero variance would then divide by zero). Measured against the original float16
export on ONNX Runtime (`default`, batch 2, seq 128, 4 realistic samples): a 4-layer hidden-256 BERT
moves the logits by at most 2.4e-4 (legacy 14, Casts dropped), 7.3e-4 (legacy 17, LayerNormalization
decomposed); bert-base's architecture by 9.8e-4 and 2.0e-3, against 9.8e-4 and 2.0e-3 for the same
pipeline without the LayerNorm rewrites: inside the float16 tolerance (bertopt.validation.parity.FP16_ATOL,
7.8e-3). A square of a centred value above 256 overflows float16 in this chain (torch upcast to avoid
that); an activation that large would already be inf in the float16 emulation of a float32 export.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph import make_constant, unique_name
from bertopt.graph.builder import Builder
from bertopt.graph.pattern import Const, OneOf, Op, Pattern, Var

# ONNX 18 moved ReduceMean's `axes` from an attribute to an input.
AXES_AS_INPUT_SINCE = 18
# LayerNormONNXFusionPass::CheckValue: "the epsilon of Add0 ... should be close to 0".
MAX_FUSED_EPSILON = 0.1
# The constant types LayerNormONNXFusionPass::GetScalarFromOp reads (DT_FLOAT, DT_FLOAT16).
FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def decomposed_layernorm(b: Builder, x: gs.Tensor, scale: gs.Tensor, bias: gs.Tensor | None, epsilon: float,
                         axis: int) -> gs.Variable:
    """LayerNormalization(x, scale, bias) in the spelling ATC fuses, written with `b`; its output.

    Written at the graph's opset (ReduceMean axes as an attribute before 18, as an input from 18).
    A missing bias becomes a zero constant, since the fusion needs the Mul and the Add both. Float32
    and float16 inputs (the two the pass reads its scalars in, `GetScalarFromOp`), the constants
    typed like x: ATC's Pow and Add take two inputs of one type (canndev
    `ops/built-in/op_proto/elewise_calculation_ops.cc`, PowVerify and AddVerify: CheckTwoInputDtypeSame).
    In float32 this computes what the op did up to rounding. In float16 it does not: ONNX
    LayerNormalization computes in float32 (stash_type 1) and this chain in float16, its epsilon
    rounded too (`in_dtype`); the module docstring says why and what that costs.
    """
    dtype = np.dtype(x.dtype) if x.dtype is not None else None
    if dtype not in FUSED_DTYPES:
        raise BertoptError(f"LayerNormalization on {dtype} input '{x.name}': bertopt writes the decomposed "
                           "form for float32 and float16 only, the types ATC's LayerNorm fusion reads")
    graph, axes = b.graph, _normalised_axes(x, axis)
    if bias is None:
        bias = make_constant(graph, "bertopt_ln_zero_bias", np.zeros(scale.shape, dtype))
    like = {"dtype": x.dtype, "shape": x.shape}
    mean = _reduce_mean(b, x, axes)
    centred = b.Sub(x, mean, **like)
    squared = b.Pow(centred, make_constant(graph, "bertopt_ln_two", np.array(2.0, dtype)), **like)
    variance = _reduce_mean(b, squared, axes)
    eps = make_constant(graph, "bertopt_ln_epsilon", in_dtype(np.array(epsilon), dtype))
    deviation = b.Sqrt(b.Add(variance, eps, dtype=x.dtype), dtype=x.dtype)
    scaled = b.Mul(b.Div(centred, deviation, **like), scale, **like)
    return b.Add(scaled, bias, name=unique_name(graph, "bertopt_ln_beta"))


def in_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as `dtype`, a non-zero one that would round to 0 kept as the smallest non-zero of its sign:
    an epsilon stays a guard against dividing by a zero variance (BERT's 1e-12 is 0 in float16)."""
    cast = np.asarray(values).astype(dtype)
    lost = (cast == 0) & (np.asarray(values) != 0)
    return np.where(lost, np.copysign(np.finfo(dtype).smallest_subnormal, values), cast).astype(dtype)


def decomposed_layernorm_pattern() -> Pattern:
    """The decomposed LayerNorm exactly as LayerNormONNXFusionPass matches it (cases 1 and 3, with affine).

    Bound names: x, two, epsilon, scale, bias; nodes `mean` and `centred` (the one shared Sub).
    """
    x = Var("x")
    mean = Op("ReduceMean", x, name="mean", where=_keeps_dims, partial_inputs=True)
    centred = Op("Sub", x, mean, name="centred")
    # case 3: a Cast before the Pow, the Div still reading the Sub (so, in ONNX, a Cast to the same type)
    powered = OneOf(centred, Op("Cast", centred, where=(_keeps_type, "a Cast to its input's type")))
    squared = Op("Pow", powered, Const(2.0, name="two", where=_is_scalar))
    variance = Op("ReduceMean", squared, where=_keeps_dims, partial_inputs=True)
    eps = Const(name="epsilon", where=(_small_scalar, f"a scalar <= {MAX_FUSED_EPSILON}"))
    normalised = Op("Div", centred, Op("Sqrt", Op("Add", variance, eps)))
    scaled = Op("Mul", normalised, Const(name="scale"), commute=False)
    return Pattern(Op("Add", scaled, Const(name="bias"), commute=False))


def _normalised_axes(x: gs.Tensor, axis: int) -> list[int]:
    """The axes LayerNormalization normalises: [axis, ..., rank - 1] (negative: [axis, ..., -1])."""
    if axis < 0:
        return list(range(axis, 0))
    if x.shape is None:
        raise BertoptError(f"LayerNormalization on '{x.name}' with axis {axis} and unknown rank")
    return list(range(axis, len(x.shape)))


def _reduce_mean(b: Builder, data: gs.Tensor, axes: list[int]) -> gs.Tensor:
    if int(b.graph.opset) >= AXES_AS_INPUT_SINCE:
        axes_input = make_constant(b.graph, "bertopt_ln_axes", np.array(axes, np.int64))
        return b.ReduceMean(data, axes_input, keepdims=1, dtype=data.dtype)
    return b.ReduceMean(data, axes=axes, keepdims=1, dtype=data.dtype)


def _keeps_type(node: gs.Node) -> bool:
    return node.inputs[0].dtype is not None and node.inputs[0].dtype == node.outputs[0].dtype


def _keeps_dims(node: gs.Node) -> bool:
    return node.attrs.get("keepdims", 1) == 1


def _is_scalar(values: np.ndarray) -> bool:
    return values.size == 1 and values.ndim <= 1


def _small_scalar(values: np.ndarray) -> bool:
    return _is_scalar(values) and float(values.reshape(-1)[0]) <= MAX_FUSED_EPSILON
