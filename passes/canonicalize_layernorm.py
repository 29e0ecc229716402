"""layernorm-for-atc: rewrite decomposed LayerNorms into the one spelling ATC's LayerNorm fusion takes.

ATC fuses a decomposed LayerNorm into its LayerNorm kernel (`LayerNormONNXFusionPass`; the form and
its source are in bertopt.ascend.layernorm) only when it is spelled exactly one way, and the
AttentionLnQKV kernel then needs that fused LayerNorm in front of Q, K and V. Exporters write the
same computation other ways; this pass rewrites, in every decomposed LayerNorm it finds
(`layernorm_pattern`), each spelling the ATC pass refuses:

- a variance `Mul(d, d)` becomes `Pow(d, 2)` (the pass reads the exponent: "the exp of pow ... should
  be equal to 2"); `((x - u) * (x - u)).mean(-1)` in a model's own LayerNorm exports this way;
- a second `Sub(x, mean)` read by the Div is dropped for the one the variance reads ("pow0_input0 and
  div0_input0 are different"); older PyTorch exports wrote the subtraction twice;
- the Casts torch writes into a float16 LayerNorm (an upcast to double after the Sub, a Cast back after
  the Div) are dropped and the chain computed in x's type, its constants retyped: no spelling with
  those Casts fuses (bertopt.ascend.layernorm, "Float16", with the measured effect on the logits);
- gamma and beta go to input 1 of their Mul and Add, where the pass reads them (`GetInputDesc(1)`).

Each rewrite but the Casts' computes the same values (d * d and d ** 2 round alike in fp32; the two
Subs were the same subtraction). Afterwards every rewritten LayerNorm is matched against the exact form the ATC
pass takes (`decomposed_layernorm_pattern`); one that still differs (an epsilon above 0.1, keepdims
0...) is named in the notes with the reason. LayerNormalization ops are not touched: where the CANN
version has none, legalize-ascend writes them out in the fused spelling.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.layernorm import decomposed_layernorm_pattern, in_dtype
from bertopt.graph import make_constant, replace_uses
from bertopt.graph.pattern import Match
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import layernorm_pattern
from bertopt.pipeline import PassOptions, PassResult, register_pass


@register_pass("layernorm-for-atc", "rewrite decomposed LayerNorms into the spelling ATC's LayerNorm fusion "
               "takes (Pow(d, 2) variance, one Sub(x, mean), no Casts inside, gamma/beta on input 1)")
def layernorm_for_atc(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    matches = layernorm_pattern().find_all(graph)
    decomposed = [m for m in matches if m.root.op == "Add"]
    ops = len(matches) - len(decomposed)
    if not decomposed:
        return PassResult.no_change(f"no decomposed LayerNorm in the graph ({ops} LayerNormalization op(s), "
                                    "which legalize-ascend writes out where the CANN version needs it)")
    counts = {"layernorms": len(decomposed), "casts_removed": 0, "variances_to_pow": 0, "subs_merged": 0,
              "operands_reordered": 0}
    for match in decomposed:
        counts["casts_removed"] += _drop_casts(graph, match)
        counts["variances_to_pow"] += _square_as_pow(graph, match)
        counts["subs_merged"] += _merge_twin_sub(match)
        counts["operands_reordered"] += _affine_constants_second(match)
    if not any(counts[key] for key in ("casts_removed", "variances_to_pow", "subs_merged", "operands_reordered")):
        refused = _not_fusable(graph, decomposed)
        return PassResult.no_change(f"all {len(decomposed)} decomposed LayerNorm(s) already spelled as ATC's "
                                    "LayerNormONNXFusionPass matches (Pow(d, 2), one Sub, gamma/beta on input 1)"
                                    + "".join(f"; {note}" for note in refused))
    graph.cleanup(remove_unused_graph_inputs=False)  # the merged twins, before matching the exact form
    refused = _not_fusable(graph, decomposed)
    fusable = len(decomposed) - len(refused)
    notes = [f"{fusable} of {len(decomposed)} decomposed LayerNorm(s) now spelled as ATC's LayerNorm fusion "
             "matches", *refused]
    return PassResult(changed=True, counts=counts, notes=notes)


def _drop_casts(graph: gs.Graph, match: Match) -> int:
    """torch's float16 LayerNorm without its Casts: computed in x's type, constants retyped to it."""
    casts = [node for node in match.nodes if node.op == "Cast"]  # the pattern's upcast and downcast
    for cast in casts:
        replace_uses(cast.outputs[0], cast.inputs[0])
    if not casts:
        return 0
    dtype = np.dtype(match["x"].dtype)
    for name in ("square", "variance", "shifted_variance", "deviation", "normalised"):
        node = match.node(name)
        node.outputs[0].dtype = dtype
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.values.dtype.kind == "f" and tensor.values.dtype != dtype:
                node.inputs[index] = make_constant(graph, tensor.name, in_dtype(tensor.values, dtype))
    return len(casts)


def _square_as_pow(graph: gs.Graph, match: Match) -> int:
    square = match.node("square")
    if square.op == "Pow":
        return 0
    centred = square.inputs[0]
    two = make_constant(graph, "bertopt_ln_two", np.array(2.0, dtype=np.dtype(centred.dtype or np.float32)))
    square.op = "Pow"
    square.inputs[1] = two
    return 1


def _merge_twin_sub(match: Match) -> int:
    """The Div reads the Sub the variance reads; the twin is left without readers for cleanup."""
    try:
        twin = match.node("centred_twin")
    except KeyError:
        return 0
    replace_uses(twin.outputs[0], match.node("centred").outputs[0])
    return 1


def _affine_constants_second(match: Match) -> int:
    moved = 0
    for name in ("scaled", "shifted"):
        node = match.node(name)
        if isinstance(node.inputs[0], gs.Constant):
            node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]
            moved += 1
    return moved


def _not_fusable(graph: gs.Graph, matches: list[Match]) -> list[str]:
    """One note per LayerNorm the ATC pass would still refuse, with the first difference found."""
    exact = decomposed_layernorm_pattern()
    return [f"LayerNorm ending at '{m.root.name}' still differs from the fused form: {exact.explain(m.root, graph)}"
            for m in matches if exact.match(m.root, graph) is None]

