"""fuse-gelu: find every Gelu, in whatever form the exporter wrote it, and make each one node.

Forms recognised (every Add/Mul in either operand order, see `bertopt.pattern.COMMUTATIVE`):

- erf (exact) Gelu, ``0.5 * x * (1 + erf(x / sqrt(2)))``: the argument is ``Div(x, 1.4142135)`` or
  ``Mul(x, 0.70710678)`` (any spelling within 1e-3 relative, so fp16-rounded constants too), and
  the gate is any association of the three factors: ``(x * (1 + erf)) * 0.5`` (legacy exporter),
  ``x * (0.5 * (1 + erf))`` (dynamo), ``(0.5 * x) * (1 + erf)``, or ``(x * (1 + erf)) / 2``;
- tanh approximation, ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (HF "gelu_new"),
  with the cube as ``Pow(x, 3)`` or ``x * x * x``, and HF "gelu_fast"'s spelling
  ``tanh((x * sqrt(2/pi)) * (1 + 0.044715 * x * x))``; same gate associations;
- the ONNX ``Gelu`` op (opset 20, ``approximate="none"|"tanh"``): already one node, counted only.

The fused node must run in ONNX Runtime, so that parity can be checked after every pass:

- opset >= 20: the ONNX ``Gelu`` op, ``approximate="none"`` or ``"tanh"``;
- opset < 20: ORT's contrib ops ``com.microsoft.Gelu`` (erf) and ``com.microsoft.FastGelu`` (tanh).
  Both run on ORT's CPU provider; the ONNX checker accepts a custom domain given its opset import
  (gs adds it on export). Shape inference knows no schema for them, so `bertopt.graph` declares
  their output types in the skeleton it checks, and inference carries on past them.

Measured on the tiny exports (2 layers), fused against the original on ORT CPU fp32: max abs
difference ~1e-7 on the logits for every form, well inside the 1e-4 parity bound.

The node remembers which function it is: erf sites become Gelu / approximate "none", tanh sites
FastGelu / approximate "tanh", and `gelu_kind` reads that back for the legalize passes, which
write each one out again as its own function, never the other (they differ by up to ~1e-3).

Counts: ``gelu_erf`` and ``gelu_tanh`` (subgraphs fused by this run), ``gelu_op`` (Gelu already
one node: the ONNX op, or a node an earlier run fused) and ``gelu_sites`` (all of them). ATC fuses
the erf sites into its own Gelu op, which ``--optypelist_for_implmode=Gelu`` then selects.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

import onnx_graphsurgeon as gs

from bertopt.facts import ModelFacts
from bertopt.graph import unique_name
from bertopt.pattern import Const, Match, OneOf, Op, Pattern, Var
from bertopt.pipeline import PassOptions, PassResult, register_pass

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


def _gate(x: Var, one_plus: Op) -> Op | OneOf:
    """0.5 * x * one_plus, in each association exporters write."""
    half = Const(0.5)
    return OneOf(Op("Mul", Op("Mul", x, one_plus), half, name="out"),
                 Op("Mul", x, Op("Mul", half, one_plus), name="out"),
                 Op("Mul", Op("Mul", half, x), one_plus, name="out"),
                 Op("Div", Op("Mul", x, one_plus), Const(2.0), name="out"))


def erf_gelu_pattern() -> Pattern:
    x = Var("x")
    argument = OneOf(Op("Div", x, Const(SQRT2, rtol=CONSTANT_RTOL)),
                     Op("Mul", x, Const(1.0 / SQRT2, rtol=CONSTANT_RTOL)))
    return Pattern(_gate(x, Op("Add", Op("Erf", argument), Const(1.0))))


def tanh_gelu_pattern() -> Pattern:
    x = Var("x")
    sqrt_2_over_pi = Const(SQRT_2_OVER_PI, rtol=CONSTANT_RTOL)
    coeff = Const(CUBE_COEFF, rtol=CONSTANT_RTOL)
    cube = OneOf(Op("Pow", x, Const(3.0)), Op("Mul", Op("Mul", x, x), x))
    coeff_x_squared = OneOf(Op("Mul", x, Op("Mul", x, coeff)), Op("Mul", Op("Mul", x, x), coeff))
    argument = OneOf(Op("Mul", Op("Add", x, Op("Mul", cube, coeff)), sqrt_2_over_pi),
                     Op("Mul", Op("Mul", x, sqrt_2_over_pi), Op("Add", coeff_x_squared, Const(1.0))))
    return Pattern(_gate(x, Op("Add", Op("Tanh", argument), Const(1.0))))


def canonical_erf_pattern() -> Pattern:
    x = Var("x")
    erf = Op("Erf", Op("Div", x, Const(SQRT2, rtol=1e-6)))
    inner = Op("Mul", x, Op("Add", erf, Const(1.0), commute=False), commute=False)
    return Pattern(Op("Mul", inner, Const(0.5), commute=False))


def canonical_tanh_pattern() -> Pattern:
    """The tanh form as legalize-ascend writes it, its constants as rounded to float16 or float32."""
    x = Var("x")
    cube = Op("Mul", Op("Pow", x, Const(3.0)), Const(CUBE_COEFF, rtol=FLOAT16_ROUNDING), commute=False)
    argument = Op("Mul", Op("Add", x, cube, commute=False), Const(SQRT_2_OVER_PI, rtol=FLOAT16_ROUNDING),
                  commute=False)
    gate = Op("Add", Op("Tanh", argument), Const(1.0), commute=False)
    return Pattern(Op("Mul", Op("Mul", x, Const(0.5), commute=False), gate, commute=False))


def gelu_kind(node: gs.Node) -> str | None:
    """ERF or TANH for a node that is a whole Gelu (ONNX op or ORT contrib op), else None."""
    if node.domain == MS_DOMAIN:
        return MS_GELU_KINDS.get(node.op)
    if node.op == "Gelu" and node.domain in ("", "ai.onnx", None):
        return ONNX_APPROXIMATE.get(node.attrs.get("approximate", "none"))
    return None


def fuse_gelu_subgraphs(graph: gs.Graph, keep_atc_form: bool = False) -> tuple[Counter, int]:
    """Replace every decomposed Gelu by one fused node; returns how many of each kind (ERF, TANH) and,
    with `keep_atc_form`, how many were left alone because they are already what legalize-ascend writes."""
    fused: Counter = Counter()
    kept = 0
    canonical = {ERF: canonical_erf_pattern(), TANH: canonical_tanh_pattern()}
    for kind, pattern in ((ERF, erf_gelu_pattern()), (TANH, tanh_gelu_pattern())):
        for match in pattern.find_all(graph):
            if keep_atc_form and canonical[kind].match(match.root, graph) is not None:
                kept += 1
                continue
            _replace_with_fused(graph, match, kind)
            fused[kind] += 1
    return fused, kept


def _replace_with_fused(graph: gs.Graph, match: Match, kind: str) -> None:
    """The fused node takes over the root's output tensor, so consumers and graph outputs follow."""
    out = match.output
    match.root.outputs.clear()
    if graph.opset >= ONNX_GELU_OPSET:
        op, domain, attrs = "Gelu", None, {"approximate": "tanh" if kind == TANH else "none"}
    else:
        op, domain, attrs = ("FastGelu" if kind == TANH else "Gelu"), MS_DOMAIN, {}
    graph.nodes.append(gs.Node(op, unique_name(graph, f"bertopt_{op}"), attrs=attrs,
                               inputs=[match["x"]], outputs=[out], domain=domain))


@register_pass("fuse-gelu", "fuse every Gelu form (erf, tanh approximation, ONNX Gelu) into one node")
def fuse_gelu(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    """For the ascend target, a Gelu already in the subgraph legalize-ascend writes for ATC is left as it is
    (`gelu_atc_form`): fusing it would only have legalize write it back, and `default` would never settle."""
    existing = Counter(kind for kind in map(gelu_kind, graph.nodes) if kind)
    fused, kept = fuse_gelu_subgraphs(graph, keep_atc_form=options.target == "ascend")
    counts = {"gelu_erf": fused[ERF], "gelu_tanh": fused[TANH], "gelu_op": sum(existing.values()),
              "gelu_atc_form": kept}
    counts["gelu_sites"] = sum(counts.values())
    if not counts["gelu_sites"]:
        return PassResult.no_change(_nothing_found(graph))
    by_function = fused + existing
    notes = [f"{by_function[ERF]} erf Gelu site(s) fused (ATC fuses the erf form into its Gelu op, which "
             f"--optypelist_for_implmode=Gelu selects), {by_function[TANH]} tanh-approximation site(s)"]
    if kept:
        notes.append(f"{kept} Gelu site(s) already in the subgraph ATC takes, left as they are")
    if not fused:
        notes.insert(0, f"no Gelu to fuse: {counts['gelu_op']} Gelu op(s) already one node, {kept} already in "
                        "ATC's form")
        return PassResult(changed=False, counts=counts, notes=notes)
    return PassResult(changed=True, counts=counts, notes=notes)


def _nothing_found(graph: gs.Graph) -> str:
    looked_for = "no Gelu found (looked for the erf form, the tanh approximation and the Gelu op)"
    seeds = [n for n in graph.nodes if n.op in ("Erf", "Tanh")]
    if not seeds:
        return f"{looked_for}: the graph has no Erf, Tanh or Gelu node"
    seed = seeds[0]
    pattern = erf_gelu_pattern() if seed.op == "Erf" else tanh_gelu_pattern()
    root = _furthest_gate_candidate(seed)
    if root is None:
        return f"{looked_for}: {seed.op} '{seed.name}' feeds no Mul or Div"
    return (f"{looked_for}: {len(seeds)} Erf/Tanh node(s), none in a Gelu; nearest candidate "
            f"{root.op} '{root.name}': {pattern.explain(root, graph)}")


def _furthest_gate_candidate(seed: gs.Node, depth: int = 3) -> gs.Node | None:
    """The Mul/Div furthest downstream of `seed` within `depth` steps: where a Gelu would end."""
    found, frontier = None, [seed]
    for _ in range(depth):
        frontier = list(_consumers(frontier))
        gates = [n for n in frontier if n.op in ("Mul", "Div")]
        found = gates[0] if gates else found
    return found


def _consumers(nodes: Iterable[gs.Node]) -> Iterable[gs.Node]:
    return (consumer for node in nodes for out in node.outputs for consumer in out.outputs)

