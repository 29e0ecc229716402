"""div-to-mul: `x / c` becomes `x * (1 / c)` for a nonzero float constant `c`.

A multiply is cheaper than a divide on most kernels; the two differ by rounding only (about one ulp).
Written with bertopt's rule API: the pattern says what to find, the rewrite what to put instead, and
bertopt rewires the consumers, removes the Div and says why nothing matched when nothing did.
"""

import numpy as np
import onnx_graphsurgeon as gs

from bertopt import Builder, Const, Match, ModelFacts, Op, PassOptions, PassResult, Rule, Var, apply_rules, \
    register_pass


def _nonzero_float(values: np.ndarray) -> bool:
    return values.dtype.kind == "f" and bool(np.all(values != 0))


DIVISION = Op("Div", Var("x"), Const(name="c", where=(_nonzero_float, "a nonzero float")))


def _multiply(match: Match, b: Builder) -> gs.Tensor:
    divisor = match["c"].values
    return b.Mul(match["x"], (1 / divisor).astype(divisor.dtype))


@register_pass("div-to-mul", "x / c becomes x * (1 / c) for a nonzero float constant c")
def div_to_mul(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    result = apply_rules(graph, [Rule(DIVISION, _multiply, name="divisions")])
    if not result.changed:
        return PassResult.no_change(f"no division by a float constant: {result.why_not}")
    return PassResult(changed=True, counts={"divisions": result["divisions"]})
