"""fuse-gelu: find every Gelu, in whatever form the exporter wrote it, and make each one node.

Forms recognised (every Add/Mul in either operand order, see `bertopt.graph.pattern.COMMUTATIVE`):

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
The spellings, the fused node and the rules that write it live in `bertopt.model.forms`, shared with
legalize-ort; this pass adds the counts and, for the ascend target, leaves ATC's form alone.

Counts: ``gelu_erf`` and ``gelu_tanh`` (subgraphs fused by this run), ``gelu_op`` (Gelu already
one node: the ONNX op, or a node an earlier run fused) and ``gelu_sites`` (all of them); CLIP's
quick_gelu, ``x * sigmoid(1.702 x)``, is another function and stays as it is, counted as
``quick_gelu_kept`` (why: `bertopt.model.forms.quick_gelu_pattern`). ATC fuses
the erf sites into its own Gelu op, which ``--optypelist_for_implmode=Gelu`` then selects.
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from bertopt.graph.rules import apply_rules
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import ERF, TANH, fusion_rules, gelu_kind, quick_gelu_pattern
from bertopt.pipeline import PassOptions, PassResult, register_pass

LOOKED_FOR = "no Gelu found (looked for the erf form, the tanh approximation and the Gelu op)"


@register_pass("fuse-gelu", "fuse every Gelu form (erf, tanh approximation, ONNX Gelu) into one node")
def fuse_gelu(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    """For the ascend target, a Gelu already in the subgraph legalize-ascend writes for ATC is left as it is
    (`gelu_atc_form`): fusing it would only have legalize write it back, and `default` would never settle."""
    existing = Counter(kind for kind in map(gelu_kind, graph.nodes) if kind)
    quick = len(quick_gelu_pattern().find_all(graph))
    result = apply_rules(graph, fusion_rules(keep_atc_form=options.target == "ascend"))
    fused, kept = result.applied, sum(result.declined.values())
    counts = {"gelu_erf": fused[ERF], "gelu_tanh": fused[TANH], "gelu_op": sum(existing.values()),
              "gelu_atc_form": kept}
    counts["gelu_sites"] = sum(counts.values())
    if quick:
        counts["quick_gelu_kept"] = quick
    if not counts["gelu_sites"]:
        if quick:
            return PassResult(changed=False, counts=counts, notes=[_quick_gelu_note(quick)])
        return PassResult.no_change(_nothing_found(graph, result.why_not))
    by_function = fused + existing
    notes = [f"{by_function[ERF]} erf Gelu site(s) fused (ATC fuses the erf form into its Gelu op, which "
             f"--optypelist_for_implmode=Gelu selects), {by_function[TANH]} tanh-approximation site(s)"]
    if kept:
        notes.append(f"{kept} Gelu site(s) already in the subgraph ATC takes, left as they are")
    if quick:
        notes.append(_quick_gelu_note(quick))
    if not result.changed:
        notes.insert(0, f"no Gelu to fuse: {counts['gelu_op']} Gelu op(s) already one node, {kept} already in "
                        "ATC's form")
    return PassResult(changed=result.changed, counts=counts, notes=notes)


def _quick_gelu_note(count: int) -> str:
    return (f"{count} quick_gelu site(s), x * sigmoid(1.702 x) (CLIP), kept as they are: another function than "
            "Gelu, legal for ATC as Mul and Sigmoid, which no ONNX fusion pass of ATC is known to fuse and the "
            "Gelu implmode flags do not touch")


def _nothing_found(graph: gs.Graph, why_not: str | None) -> str:
    """Every Gelu holds an Erf or a Tanh: without one there is nothing to look closer at."""
    seeds = sum(node.op in ("Erf", "Tanh") for node in graph.nodes)
    if not seeds:
        return f"{LOOKED_FOR}: the graph has no Erf, Tanh or Gelu node"
    return f"{LOOKED_FOR}: {seeds} Erf/Tanh node(s), none in a Gelu; {why_not}"
