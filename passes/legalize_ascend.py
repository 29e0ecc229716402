"""legalize-ascend: the last pass for ATC. Make the graph one the run's CANN version takes.

The target is `options.cann` (bertopt.ascend.cann; its data, with sources, in bertopt/data/cann.json):
CANN 5.0/6.0 parse ONNX 1.8 models at opset 9-13, IR 7, without LayerNormalization; 7.0 ONNX 1.12;
8.0 and 9.0 ONNX 1.12 with per-operator opset ranges (e.g. ReduceMean up to 16, LayerNormalization
17-18). ATC looks every node up at the model's opset, so the model's opset must lie inside the range
of each op it holds. In order:

1. **Gelu written out for ATC.** ATC has no ONNX Gelu, but fuses the erf subgraph
   ``Div(x, 1.4142135) -> Erf -> Add(., 1) -> Mul(x, .) -> Mul(., 0.5)`` into its own Gelu op (the
   one ``--optypelist_for_implmode=Gelu`` selects). Every erf Gelu (ONNX ``Gelu``, com.microsoft
   ``Gelu``/``BiasGelu``, or a decomposed erf form in another operand order or association) is
   written as exactly that subgraph; every tanh Gelu (ONNX ``Gelu(approximate="tanh")``,
   com.microsoft ``FastGelu``, decomposed tanh forms) as ``Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x,
   Mul(Pow(x, 3), 0.044715)), 0.7978846)), 1))``. Never erf for tanh or the reverse: the two differ
   by up to ~1e-3. Subgraphs already in the canonical form are left alone. The erf Gelu of a float16
   tensor is written in float32 between two Casts: ATC's pass reads its constants as float32 whatever
   their type, so a float16 one never matches (`bertopt.model.forms`, which spells both forms, has the
   source); a tanh Gelu, which ATC does not fuse, keeps the tensor's type.
2. **LayerNormalization decomposed** where the version has none (5.0-7.0), or where keeping it would
   leave no opset every other op accepts (8.0+: LayerNormalization needs 17, ReduceMean stops at 16):
   written as the ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add chain ATC's
   LayerNormONNXFusionPass fuses back into its LayerNorm kernel (bertopt.ascend.layernorm), in the
   input's type, float32 or float16 (the float16 chain's cost in precision is measured there).
3. **Operator list.** Any op the version's list lacks (or any op outside the ONNX domain) is a
   BertoptError naming each one and the version: ATC would otherwise fail later, with a worse message.
4. **Opset.** The highest opset inside the version's range and every op's own range, never above the
   graph's (bertopt does not raise opsets), each node newer than it lowered by itself
   (`bertopt.graph.opset`, which says how and why not with `onnx.version_converter`); a node with no
   lowering whose older schema means something else is refused, naming op, opset and version. The
   checker run after the pass then validates every node against the target opset's schemas, types
   included.
5. **IR version** at most the version's (ONNX 1.8: 7, ONNX 1.12: 8). The newer IR versions added
   float8/4-bit types and function overloads, which a BERT graph at these opsets does not use.

Reported, not fixed (other passes own them): remaining ``Shape`` ops, and float constants outside
the fp16 range (ATC compiles to fp16 on 310P, where they become inf).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.cann import CannTarget
from bertopt.ascend.layernorm import decomposed_layernorm
from bertopt.ascend.legality import (LAYER_NORMALIZATION, fp16_unsafe_constants, onnx_op_types, ops_outside_opset,
                                     opset_window, unsupported_ops)
from bertopt.errors import BertoptError, CheckFailed
from bertopt.graph.builder import Builder
from bertopt.graph.opset import in_onnx_domain, lower_opset, set_default_opset
from bertopt.graph.pattern import Match, Op, Var
from bertopt.graph.rules import Rule, apply_rules
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import DECOMPOSED, ERF, TANH, atc_gelu, in_atc_form, whole_gelu_pattern
from bertopt.pipeline import PassOptions, PassResult, register_pass


# The ONNX op, its bias (an optional third input) read from the node; Mean and InvStdDev must be unread.
LAYERNORM_OP = Op(LAYER_NORMALIZATION, Var("x"), Var("scale"), partial_inputs=True, outputs=None,
                  where=(in_onnx_domain, "the ONNX op"))


@register_pass("legalize-ascend", "lower to the run's CANN version (--cann): Gelu as ATC's erf subgraph (tanh "
               "stays tanh), LayerNormalization decomposed where the version lacks it, the version's opset and "
               "IR version; refuse ops outside its ONNX operator list")
def legalize_ascend(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    target = options.cann
    source_opset, source_ir = int(graph.opset), graph.ir_version
    gelus = write_gelus_for_atc(graph)
    layernorms = decompose_layernorms_for(graph, target)
    check_atc_operators(graph, target)
    opset = target_opset(graph, target)
    lowered = lower_opset(graph, opset, f"{target.label} needs opset {opset}")
    pruned = set_default_opset(graph, opset)
    if not graph.ir_version or graph.ir_version > target.ir_version:
        graph.ir_version = target.ir_version
    counts = {"gelu_erf_written": gelus[ERF], "gelu_tanh_written": gelus[TANH],
              "layernorm_decomposed": layernorms, **{f"lowered_{op}": n for op, n in sorted(lowered.items())}}
    notes = _leftovers(graph, counts)
    changed = bool(gelus or layernorms or lowered or pruned or graph.opset != source_opset
                   or graph.ir_version != source_ir)
    if changed:
        notes.insert(0, f"{target.label}: opset {source_opset} -> {graph.opset}, IR version {source_ir} -> "
                        f"{graph.ir_version}, {sum(gelus.values())} Gelu(s) written in ATC's form, "
                        f"{layernorms} LayerNormalization(s) decomposed")
        return PassResult(changed=True, counts=counts, notes=notes)
    notes.insert(0, f"already legal for {target.label}: opset {graph.opset}, IR {graph.ir_version}, every Gelu "
                    "in ATC's form, every op in its list")
    return PassResult(changed=False, counts=counts, notes=notes)


# ----------------------------------------------------------------------------- 1. Gelu for ATC

def write_gelus_for_atc(graph: gs.Graph) -> Counter:
    """Every Gelu, fused or decomposed, as ATC's canonical subgraph of its own function; counts by function."""
    return apply_rules(graph, [rule for kind in (ERF, TANH) for rule in (
        Rule(whole_gelu_pattern(kind), _write_gelu(kind), name=kind),
        Rule(DECOMPOSED[kind](), _write_gelu(kind), check=in_atc_form(kind), name=kind))]).applied


def _write_gelu(kind: str):
    def rewrite(match: Match, b: Builder) -> gs.Tensor:
        x, bias = match["x"], match.get("bias")  # FastGelu and BiasGelu may add a bias first
        return atc_gelu(b, b.Add(x, bias) if bias is not None and bias.name else x, kind)

    return rewrite


# ----------------------------------------------------------------------------- 2. LayerNormalization

def decompose_layernorms_for(graph: gs.Graph, target: CannTarget) -> int:
    """Write every LayerNormalization decomposed when `target` cannot take it here; how many."""
    op_types = onnx_op_types(graph)
    if LAYER_NORMALIZATION not in op_types:
        return 0
    low, high = opset_window(op_types, target)
    if target.layer_normalization and low <= min(high, int(graph.opset)):
        return 0
    return apply_rules(graph, [Rule(LAYERNORM_OP, _decompose(target), name="layernorms")])["layernorms"]


def _decompose(target: CannTarget):
    def rewrite(match: Match, b: Builder) -> list[gs.Tensor | None]:
        node, graph = match.root, b.graph
        used_extras = [t.name for t in node.outputs[1:] if t.outputs or t in graph.outputs]
        if used_extras:
            raise BertoptError(f"LayerNormalization '{node.name}' has its Mean/InvStdDev output(s) {used_extras} "
                               f"read; {target.label} has no LayerNormalization and bertopt decomposes only Y")
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        y = decomposed_layernorm(b, match["x"], match["scale"], bias, float(node.attrs.get("epsilon", 1e-5)),
                                 int(node.attrs.get("axis", -1)))
        return [y] + [None] * (len(node.outputs) - 1)

    return rewrite


# ----------------------------------------------------------------------------- 3. operator list

def check_atc_operators(graph: gs.Graph, target: CannTarget) -> None:
    """Raise CheckFailed (exit 1: the model is valid, the target cannot take it) naming every op the target's
    ONNX parser does not support."""
    missing = unsupported_ops(graph, target)
    if missing:
        listed = ", ".join(f"{op} (x{n})" for op, n in sorted(missing.items()))
        raise CheckFailed(f"{target.label}'s ONNX operator list (bertopt/data/cann.json) has no {listed}; "
                           "atc would reject this model")


# ----------------------------------------------------------------------------- 4. opset and IR

def target_opset(graph: gs.Graph, target: CannTarget) -> int:
    """The highest opset the target and every op in the graph accept, at most the graph's own."""
    op_types = onnx_op_types(graph)
    low, high = opset_window(op_types, target)
    opset = min(high, int(graph.opset))
    if opset < low:
        outside = ops_outside_opset(op_types, opset, target)
        why = (f"it holds {', '.join(outside)}" if outside
               else f"it takes opset {target.opset_range[0]}-{target.opset_range[1]} and bertopt does not raise "
                    f"a model's opset (this one is {graph.opset})")
        raise CheckFailed(f"no opset suits {target.label} for this graph: {why}")
    return opset


# ----------------------------------------------------------------------------- leftovers

def _leftovers(graph: gs.Graph, counts: dict[str, int]) -> list[str]:
    """Count (into `counts`) and describe what ATC will still dislike but this pass does not fix."""
    shapes = [n.name for n in graph.nodes if n.op == "Shape"]
    unsafe = fp16_unsafe_constants(graph)
    counts["shape_ops"], counts["fp16_unsafe_constants"] = len(shapes), len(unsafe)
    notes = []
    if shapes:
        notes.append(f"{len(shapes)} Shape op(s) remain (freeze-shapes folds them), e.g. {shapes[:3]}")
    if unsafe:
        described = ", ".join(f"'{t.name}' (max |x| {np.max(np.abs(t.values)):.3g})" for t in unsafe[:3])
        notes.append(f"{len(unsafe)} float constant(s) outside the fp16 range (become inf in fp16), "
                     f"e.g. {described}")
    return notes
