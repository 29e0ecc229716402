"""gemm-to-matmul: every linear layer written as Gemm becomes MatMul -> Add.

onnxsim 0.8.1 rewrites the exporters' MatMul + Add into Reshape -> Gemm -> Reshape (the facts note,
section 3), and ATC's standard attention form (`bertopt.ascend.form`) has Q, K and V as MatMul -> Add:
its AttentionLnQKV fusion does not take a Gemm. So the `ascend` pipeline runs this pass just before
attention-bigkernel, which then finds the projections it rewrites.

A linear layer is ``Gemm(x, W[, b])`` with a constant W, ``transA`` 0 and ``alpha`` = ``beta`` = 1: then
Gemm computes ``x @ W + b`` (``x @ W^T + b`` with ``transB``, whose W is written transposed as a new
constant, named after it). Any other Gemm is left as it is. The Gemm's output keeps its name and readers;
without a bias it is the MatMul's. Numerics are those of a MatMul and an Add (float rounding only).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.graph import make_constant
from bertopt.graph.builder import Builder
from bertopt.graph.pattern import Const, Match, Op, Var
from bertopt.graph.rules import Rule, apply_rules
from bertopt.model.facts import ModelFacts
from bertopt.pipeline import PassOptions, PassResult, register_pass


def _is_linear(node: gs.Node) -> bool:
    attrs = node.attrs
    return not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


LINEAR = (_is_linear, "a linear layer (transA 0, alpha 1, beta 1)")
# The bias, Gemm's optional third input, is read from the node (an omitted one has no name).
GEMM = Op("Gemm", Var("x"), Const(name="weight"), where=LINEAR, partial_inputs=True)


def _matmul_add(match: Match, b: Builder) -> gs.Tensor:
    weight, bias = match["weight"], (match.root.inputs[2:] or [None])[0]
    if match.root.attrs.get("transB", 0):
        weight = make_constant(b.graph, f"{weight.name}_transposed", np.ascontiguousarray(weight.values.T))
    product = b.MatMul(match["x"], weight, dtype=match.output.dtype)
    return b.Add(product, bias) if bias is not None and bias.name else product


@register_pass("gemm-to-matmul", "every linear-layer Gemm (onnxsim's) becomes MatMul -> Add, the form ATC's "
               "attention fusion reads")
def gemm_to_matmul(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    result = apply_rules(graph, [Rule(GEMM, _matmul_add, name="gemms_to_matmul")])
    if not result.changed:
        return PassResult.no_change(f"no linear-layer Gemm: {result.why_not}")
    count = result["gemms_to_matmul"]
    return PassResult(changed=True, counts={"gemms_to_matmul": count},
                      notes=[f"{count} Gemm(s) written as MatMul -> Add"])
