"""legalize-ort: the last pass for ONNX Runtime. Every Gelu is one fused node.

ONNX Runtime runs every standard op at every opset the exporters write, and its own optimizer
fuses what it can at session start, so the only thing to legalise is the one ORT cannot fuse
from every spelling: Gelu. Any Gelu still decomposed (when the pipeline skipped fuse-gelu, or a
pass reintroduced one) becomes the fused op fuse-gelu uses: the ONNX ``Gelu`` at opset >= 20,
else ``com.microsoft.Gelu`` (erf) or ``com.microsoft.FastGelu`` (tanh), each keeping its own
function. Gelu nodes already fused, in either form, are left as they are. A graph with nothing
decomposed is reported unchanged.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from bertopt.graph.rules import apply_rules
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import ERF, TANH, fusion_rules, gelu_kind
from bertopt.pipeline import PassOptions, PassResult, register_pass


@register_pass("legalize-ort", "every Gelu as ONNX Runtime's fused op (ONNX Gelu at opset >= 20, "
               "else com.microsoft Gelu/FastGelu)")
def legalize_ort(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    fused = apply_rules(graph, fusion_rules()).applied
    if not fused:
        already = sum(1 for node in graph.nodes if gelu_kind(node))
        return PassResult.no_change(f"nothing to legalise for ONNX Runtime: no decomposed Gelu "
                                    f"({already} Gelu op(s) already fused)")
    return PassResult(changed=True, counts={"gelu_erf": fused[ERF], "gelu_tanh": fused[TANH]},
                      notes=[f"fused {sum(fused.values())} Gelu(s) left decomposed"])
