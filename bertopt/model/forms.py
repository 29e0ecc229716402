"""Model forms: the subgraphs a BERT export writes, and the ones bertopt writes back, each spelt once.

For now the Gelu, which fuse-gelu, legalize-ascend, legalize-ort and the Ascend checker all read or write:

- its decomposed spellings (`erf_gelu_pattern`, `tanh_gelu_pattern`, every association exporters write,
  see fuse-gelu's docstring) and the whole-node Gelus (`gelu_kind`: the ONNX op, ORT's contrib ops);
- the one node ONNX Runtime runs (`fused_gelu`): the ONNX ``Gelu`` at opset >= 20, else
  ``com.microsoft.Gelu`` (erf) or ``com.microsoft.FastGelu`` (tanh);
- the subgraph ATC takes (`atc_gelu`, recognised by `canonical_erf_pattern` / `canonical_tanh_pattern`):
  ``Mul(Mul(x, Add(Erf(Div(x, 1.4142135)), 1)), 0.5)``, the erf subgraph ATC's GeluONNXFusionPass fuses
  (a float16 x computed in float32 between two Casts: `_erf_gelu_in_float32` has the source), and
  ``Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), 0.7978846)), 1))``, which keeps x's type.

The two functions are never exchanged: erf and tanh Gelu differ by up to ~1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.graph.builder import Builder
from bertopt.graph.pattern import Const, Match, OneOf, Op, Pattern, Var
from bertopt.graph.rules import Check, Rule

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBE_COEFF = 0.044715
# Exporters and fp16 models round these constants differently; 1e-3 still tells them apart.
CONSTANT_RTOL = 1e-3
# The largest relative error of rounding to float16 (half its machine epsilon).
FLOAT16_ROUNDING = 2.0 ** -11

ONNX_GELU_OPSET = 20
MS_DOMAIN = "com.microsoft"
ERF, TANH = "erf", "tanh"
# com.microsoft op -> function; BiasGelu is Gelu(x + bias), as ORT's own optimizer writes it.
MS_GELU_KINDS = {"Gelu": ERF, "BiasGelu": ERF, "FastGelu": TANH}
ONNX_APPROXIMATE = {"none": ERF, "tanh": TANH}
ONNX_DOMAINS = ("", "ai.onnx", None)


# ----------------------------------------------------------------------------- what exporters write

def _gate(x: Var, one_plus: Op) -> OneOf:
    """0.5 * x * one_plus, in each association exporters write."""
    return OneOf(Op("Mul", Op("Mul", x, one_plus), 0.5, name="out"),
                 Op("Mul", x, Op("Mul", 0.5, one_plus), name="out"),
                 Op("Mul", Op("Mul", 0.5, x), one_plus, name="out"),
                 Op("Div", Op("Mul", x, one_plus), 2.0, name="out"))


def erf_gelu_pattern() -> Pattern:
    x = Var("x")
    argument = OneOf(Op("Div", x, Const(SQRT2, rtol=CONSTANT_RTOL)),
                     Op("Mul", x, Const(1.0 / SQRT2, rtol=CONSTANT_RTOL)))
    return Pattern(_gate(x, Op("Add", Op("Erf", argument), 1.0)))


def tanh_gelu_pattern() -> Pattern:
    x = Var("x")
    sqrt_2_over_pi = Const(SQRT_2_OVER_PI, rtol=CONSTANT_RTOL)
    coeff = Const(CUBE_COEFF, rtol=CONSTANT_RTOL)
    cube = OneOf(Op("Pow", x, 3.0), Op("Mul", Op("Mul", x, x), x))
    coeff_x_squared = OneOf(Op("Mul", x, Op("Mul", x, coeff)), Op("Mul", Op("Mul", x, x), coeff))
    argument = OneOf(Op("Mul", Op("Add", x, Op("Mul", cube, coeff)), sqrt_2_over_pi),
                     Op("Mul", Op("Mul", x, sqrt_2_over_pi), Op("Add", coeff_x_squared, 1.0)))
    return Pattern(_gate(x, Op("Add", Op("Tanh", argument), 1.0)))


DECOMPOSED = {ERF: erf_gelu_pattern, TANH: tanh_gelu_pattern}

QUICK_GELU_ALPHA = 1.702


def quick_gelu_pattern() -> Pattern:
    """CLIP's quick_gelu, x * sigmoid(1.702 x): a function of its own (up to ~2e-2 from Gelu), never
    rewritten into a Gelu. ATC's FastGelu computes exactly it (x / (1 + exp(-1.702 |x|)) * exp(0.851 (x - |x|)),
    hicann/ops-nn activation/fast_gelu/README.md), but ATC's ONNX parser reaches that op only from the custom
    op NPUFastGelu (activation/fast_gelu/framework/npu_fast_gelu_onnx_plugin.cpp, 2025 source), which ONNX
    Runtime cannot run and no 2022 CANN source shows; no ONNX fusion pass for the Sigmoid form is known, so
    ATC compiles its Mul and Sigmoid as they are (both in every version's operator list)."""
    x = Var("x")
    return Pattern(Op("Mul", x, Op("Sigmoid", Op("Mul", x, Const(QUICK_GELU_ALPHA, rtol=CONSTANT_RTOL))), name="out"))


def gelu_kind(node: gs.Node) -> str | None:
    """ERF or TANH for a node that is a whole Gelu (ONNX op or ORT contrib op), else None."""
    if node.domain == MS_DOMAIN:
        return MS_GELU_KINDS.get(node.op)
    if node.op == "Gelu" and node.domain in ONNX_DOMAINS:
        return ONNX_APPROXIMATE.get(node.attrs.get("approximate", "none"))
    return None


def whole_gelu_pattern(kind: str) -> Pattern:
    """A Gelu of function `kind` that is one node; FastGelu and BiasGelu may take a bias (`m.get("bias")`,
    an omitted input has no name)."""
    def is_kind(node: gs.Node) -> bool:
        return gelu_kind(node) == kind

    ops, x, described = tuple(MS_GELU_KINDS), Var("x"), (is_kind, f"a whole {kind} Gelu")  # Gelu: ONNX's too
    return Pattern(OneOf(Op(ops, x, where=described), Op(ops, x, Var("bias"), where=described)))


# ----------------------------------------------------------------------------- what bertopt writes

def fused_gelu(b: Builder, x: gs.Tensor, kind: str) -> gs.Variable:
    """The one node ONNX Runtime runs for a Gelu of function `kind` at the graph's opset."""
    if b.graph.opset >= ONNX_GELU_OPSET:
        return b.Gelu(x, approximate="tanh" if kind == TANH else "none")
    return b.op("FastGelu" if kind == TANH else "Gelu", x, domain=MS_DOMAIN)


def fusion_rules(keep_atc_form: bool = False) -> list[Rule]:
    """Every decomposed Gelu as `fused_gelu` of its own function (rules named ERF and TANH); with
    `keep_atc_form`, one already in `atc_gelu`'s subgraph is declined."""
    def fuse(kind: str):
        return lambda match, b: fused_gelu(b, match["x"], kind)

    return [Rule(DECOMPOSED[kind](), fuse(kind), in_atc_form(kind) if keep_atc_form else None, name=kind)
            for kind in (ERF, TANH)]


def atc_gelu(b: Builder, x: gs.Tensor, kind: str) -> gs.Variable:
    """The Gelu of function `kind` as the subgraph ATC takes (the module docstring)."""
    if kind == ERF and _narrow_float(x):
        return _erf_gelu_in_float32(b, x)
    if kind == ERF:
        return b.Mul(b.Mul(x, b.Add(b.Erf(b.Div(x, SQRT2)), 1.0)), 0.5)
    cube = b.Mul(b.Pow(x, 3.0), CUBE_COEFF)
    return b.Mul(b.Mul(x, 0.5), b.Add(b.Tanh(b.Mul(b.Add(x, cube), SQRT_2_OVER_PI)), 1.0))


def _narrow_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f" and np.dtype(tensor.dtype).itemsize < 4


def _erf_gelu_in_float32(b: Builder, x: gs.Tensor) -> gs.Variable:
    """The erf Gelu of a float16 x in the one spelling ATC fuses for it: computed in float32 between Casts.

    GeluONNXFusionPass reads each scalar through a float pointer, whatever its type
    (`gelu_onnx_fusion_pass.cc` at canndev 17c9f69b, GetScalarFromOp line 138: `reinterpret_cast<const
    float*>`, after line 134 accepts DT_FLOAT16), so a float16 constant's two bytes are read as the low
    half of a float32 whose high half lies past the constant: not 1.41421 (line 205); nor does float16
    have a value within the pass's 1e-5 of it (the nearest, 1.4140625, is 1.5e-4 off). Float32
    constants are read right, and the pattern's input (Input0, lines 90-101) may be any node, here
    the Cast, so the pass fuses the float32 subgraph into its Gelu. Not checked: which type ATC then
    computes that Gelu in (the precision mode decides) and whether it merges the two Casts away.
    On ONNX Runtime the Gelu is computed more exactly than a float16 chain would, then rounded back.
    """
    wide = b.Cast(x, to=onnx.TensorProto.FLOAT)
    return b.Cast(atc_gelu(b, wide, ERF), to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(x.dtype)))


def canonical_erf_pattern() -> Pattern:
    x = Var("x")
    erf = Op("Erf", Op("Div", x, Const(SQRT2, rtol=1e-6)))
    inner = Op("Mul", x, Op("Add", erf, 1.0, commute=False), commute=False)
    return Pattern(Op("Mul", inner, 0.5, commute=False))


def canonical_tanh_pattern() -> Pattern:
    """The tanh form as `atc_gelu` writes it, its constants as rounded to float16 or float32."""
    x = Var("x")
    cube = Op("Mul", Op("Pow", x, 3.0), Const(CUBE_COEFF, rtol=FLOAT16_ROUNDING), commute=False)
    argument = Op("Mul", Op("Add", x, cube, commute=False), Const(SQRT_2_OVER_PI, rtol=FLOAT16_ROUNDING),
                  commute=False)
    gate = Op("Add", Op("Tanh", argument), 1.0, commute=False)
    return Pattern(Op("Mul", Op("Mul", x, 0.5, commute=False), gate, commute=False))


CANONICAL = {ERF: canonical_erf_pattern, TANH: canonical_tanh_pattern}


def in_atc_form(kind: str) -> Check:
    """A check leaving a Gelu alone when it already is `atc_gelu`'s subgraph of its function."""
    canonical = CANONICAL[kind]()

    def check(match: Match) -> str | None:
        return "already in the subgraph ATC takes" if canonical.match(match.root, match.graph) else None

    return check
