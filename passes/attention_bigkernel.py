"""attention-bigkernel: rewrite every attention block into the form ATC fuses into its big kernels.

ATC fuses BERT attention into AttentionLnQKV and AttentionScore only when the graph has one
standard form (the facts note, section 4; `bertopt.ascend.check` checks it on any model). This pass
replaces the seed's `fix_onnx.py` (auto-optimizer's big-kernel knowledge) for any hidden size,
head count and exporter, reading hidden/heads/head_dim from ModelFacts:

1. the encoder works on 2-D [batch*seq, hidden]: a Reshape [-1, hidden] before the first
   LayerNorm's output Add (after a LayerNormalization op), a Reshape back to [batch, seq, hidden]
   after the last LayerNorm, and every Reshape between the two that only flattens or unflattens
   tokens (onnxsim's around each Gemm) removed;
2. so the LayerNorm output feeding Q, K, V has four consumers (three MatMuls, the residual Add);
3. Q, K, V are MatMul -> Add -> Reshape -> Transpose(0,2,1,3); a single K Transpose (0,2,3,1) is
   split into (0,2,1,3) then (0,1,3,2); Gemm linear layers (onnxsim) become MatMul + Add;
4. the scale is one Mul by 1/sqrt(head_dim) after the scores MatMul, named `bert_*` (ATC's fusion
   matches the name): a Div by sqrt(head_dim) or SDPA's Mul(q, s), Mul(k, s) pair becomes that;
5. the mask added to the scores is expanded to [batch, 1, seq, seq] by one Expand shared by all
   layers (fold-attention-mask leaves it [batch, 1, 1, seq]);
6. the context Reshape after Softmax -> MatMul -> Transpose reshapes to [-1, hidden].

A block is matched by one pattern rooted at its context Reshape, with OneOf for the variants.
A block that does not match is named in the notes with the matcher's reason and left alone; the
2-D encoder (points 1, 2 and 6) is then not applied either, since it needs every block's shapes
to follow. Numerics are unchanged up to float rounding (Div by 8 vs Mul by 0.125, the SDPA scale
moved after the MatMul, Gemm vs MatMul + Add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.form import (CONTEXT_SEARCH_DEPTH, HEAD_PERM, KEY_PERM, SCALE_NAME_PREFIX, BlockReport,
                                 attention_softmaxes, block_input, check_blocks, context_reshape, heads,
                                 is_token_flattening, projection, transpose)
from bertopt.facts import ModelFacts
from bertopt.graph import add_node, constant_value, infer_shapes, make_constant, replace_uses, unique_name
from bertopt.pattern import Const, Match, OneOf, Op, Pattern, Var, _
from bertopt.pipeline import PassOptions, PassResult, register_pass

SPLIT_KEY_PERM = [0, 2, 3, 1]
SCALE_RTOL = 1e-4


@dataclass
class Rewrite:
    """What the pass changed, counted as the issue asks."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("blocks_rewritten", "blocks_total", "k_transposes_split", "scales_rewritten", "masks_expanded",
         "reshapes_2d", "reshapes_removed", "gemms_to_matmul", "operands_reordered"), 0))
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    @property
    def changed(self) -> bool:
        return any(n for key, n in self.counts.items() if key != "blocks_total")


@register_pass("attention-bigkernel", "rewrite every attention block into the form ATC fuses into "
               "AttentionLnQKV/AttentionScore (2-D encoder, K transpose split, bert_ Mul scale, full mask)",
               requires=("static-shapes",))
def attention_bigkernel(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    infer_shapes(graph)
    softmaxes = attention_softmaxes(graph)
    if not softmaxes:
        return PassResult.no_change("looked for attention blocks (a Softmax between the scores and the "
                                    "context MatMul); the graph has no Softmax")
    before = check_blocks(graph, facts)
    if all(block.conforming for block in before) and not _gemms(graph):
        return PassResult.no_change(f"all {len(before)} attention blocks are already in the standard form "
                                    "ATC fuses")
    rewrite = Rewrite()
    rewrite.counts["blocks_total"] = len(softmaxes)
    rewrite.add("gemms_to_matmul", _gemms_to_matmul(graph))
    if rewrite.counts["gemms_to_matmul"]:
        infer_shapes(graph)
    matches = _match_blocks(graph, facts, softmaxes, rewrite)
    for match in matches:
        _rewrite_block(graph, facts, match, rewrite)
    _expand_masks(graph, facts, matches, rewrite)
    if len(matches) == len(softmaxes):
        _make_encoder_2d(graph, facts, matches, rewrite)
    else:
        rewrite.notes.append("the 2-D encoder (Reshape [-1, hidden] ... back) was not applied: it needs "
                             "every attention block in the standard form")
    _refresh_shapes(graph)
    rewrite.counts["blocks_rewritten"] = _newly_conforming(before, check_blocks(graph, facts))
    if not rewrite.changed:
        return PassResult.no_change("; ".join(rewrite.notes) or "nothing to rewrite")
    rewrite.notes.insert(0, f"{rewrite.counts['blocks_rewritten']} of {len(softmaxes)} attention blocks "
                            "brought into the standard form ATC fuses")
    return PassResult(changed=True, counts=rewrite.counts, notes=rewrite.notes)


def _newly_conforming(before: list[BlockReport], after: list[BlockReport]) -> int:
    was = {block.softmax: block.conforming for block in before}
    return sum(1 for block in after if block.conforming and not was.get(block.softmax, False))


# ----------------------------------------------------------------------------- Gemm -> MatMul + Add

def _gemms(graph: gs.Graph) -> list[gs.Node]:
    """Gemms computing x @ W + b with a constant W: linear layers as onnxsim writes them."""
    def linear(node: gs.Node) -> bool:
        attrs = node.attrs
        return (node.op == "Gemm" and isinstance(node.inputs[1], gs.Constant) and not attrs.get("transA", 0)
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)

    return [node for node in graph.nodes if linear(node)]


def _gemms_to_matmul(graph: gs.Graph) -> int:
    """ATC's standard form has MatMul -> Add; the output tensor keeps its name and consumers."""
    gemms = _gemms(graph)
    for gemm in gemms:
        x, weight, bias = gemm.inputs[0], gemm.inputs[1], (gemm.inputs[2:] or [None])[0]
        output = gemm.outputs[0]
        values = weight.values.T if gemm.attrs.get("transB", 0) else weight.values
        if values is not weight.values:
            weight = make_constant(graph, f"{weight.name}_transposed", np.ascontiguousarray(values))
        gemm.outputs.clear()
        gemm.inputs.clear()
        if bias is None:
            graph.nodes.append(gs.Node("MatMul", unique_name(graph, "bertopt_MatMul"), inputs=[x, weight],
                                       outputs=[output]))
            continue
        product = add_node(graph, "MatMul", [x, weight], dtype=output.dtype)[0]
        graph.nodes.append(gs.Node("Add", unique_name(graph, "bertopt_Add"), inputs=[product, bias],
                                   outputs=[output]))
    graph.cleanup(remove_unused_graph_inputs=False)
    return len(gemms)


# ----------------------------------------------------------------------------- the block pattern

def block_pattern(facts: ModelFacts) -> Pattern:
    """One attention block, rooted at its context Reshape, in every form the exporters write."""
    x = Var("x")
    query = transpose(heads(projection(x, "q"), facts, "q"), HEAD_PERM, "q_transpose")
    key_heads = heads(projection(x, "k"), facts, "k")
    key = OneOf(transpose(transpose(key_heads, HEAD_PERM, "k_transpose"), KEY_PERM, "k_transpose2"),
                transpose(key_heads, SPLIT_KEY_PERM, "k_transpose"))
    value = transpose(heads(projection(x, "v"), facts, "v"), HEAD_PERM, "v_transpose")
    scale = 1.0 / math.sqrt(facts.head_dim)
    scores = Op("MatMul", query, key, name="scores")
    half = Const(math.sqrt(scale), rtol=SCALE_RTOL)
    scaled = OneOf(
        Op("Mul", scores, Const(scale, rtol=SCALE_RTOL), name="scale"),
        Op("Div", scores, Const(1.0 / scale, rtol=SCALE_RTOL), name="scale"),
        Op("MatMul", Op("Mul", query, half, name="q_scale"), Op("Mul", key, half, name="k_scale"),
           name="scores"))
    probs = Op("Softmax", Op("Add", scaled, Var("mask"), name="mask_add"), name="softmax",
               where=(_last_axis, "a softmax over the last axis"))
    context = Op("MatMul", probs, value, name="context_matmul")
    # SDPA exports reshape the context to the shape it already has before the Transpose.
    context = OneOf(context, Op("Reshape", context, Const(), name="context_noop",
                                where=(_keeps_shape, "a Reshape to the shape it already has")))
    merged = transpose(context, HEAD_PERM, "context_transpose")
    return Pattern(Op("Reshape", merged, Const(name="context_shape"), name="context_reshape"))


def _keeps_shape(node: gs.Node) -> bool:
    before, after = node.inputs[0].shape, node.outputs[0].shape
    return before is not None and list(before) == list(after or [])


def _last_axis(node: gs.Node) -> bool:
    rank = len(node.inputs[0].shape or [None] * 4)
    return node.attrs.get("axis", -1) in (-1, rank - 1)


def _match_blocks(graph: gs.Graph, facts: ModelFacts, softmaxes: list[gs.Node],
                  rewrite: Rewrite) -> list[Match]:
    pattern = block_pattern(facts)
    matches = pattern.find_all(graph)
    found = {id(m.node("softmax")) for m in matches}
    for layer, softmax in enumerate(softmaxes):
        if id(softmax) not in found:
            rewrite.notes.append(f"layer {layer} (Softmax '{softmax.name}') left unchanged: "
                                 f"{_why_not(pattern, graph, softmax)}")
    order = {id(node): i for i, node in enumerate(softmaxes)}
    return sorted(matches, key=lambda m: order[id(m.node("softmax"))])


def _why_not(pattern: Pattern, graph: gs.Graph, softmax: gs.Node) -> str:
    reshape = context_reshape(softmax)
    if reshape is None:
        return f"no context Reshape within {CONTEXT_SEARCH_DEPTH} nodes after it"
    return pattern.explain(reshape, graph)


# ----------------------------------------------------------------------------- per block

def _rewrite_block(graph: gs.Graph, facts: ModelFacts, match: Match, rewrite: Rewrite) -> None:
    for tag in ("q", "k", "v"):
        _order_operands(match.node(f"{tag}_add"), match.node(f"{tag}_matmul").outputs[0], rewrite)
    _split_key_transpose(graph, match, rewrite)
    _rewrite_scale(graph, facts, match, rewrite)
    if _has(match, "context_noop"):
        noop = match.node("context_noop")
        replace_uses(noop.outputs[0], noop.inputs[0], graph)
        rewrite.add("reshapes_removed")


def _order_operands(node: gs.Node, first: gs.Tensor, rewrite: Rewrite) -> None:
    """Computed operand first, as ATC's fusion patterns are written (Add(MatMul, bias), Mul(x, c))."""
    if node.inputs[0] is not first:
        _set_inputs(node, [first, node.inputs[0]])
        rewrite.add("operands_reordered")


def _split_key_transpose(graph: gs.Graph, match: Match, rewrite: Rewrite) -> None:
    k_transpose = match.node("k_transpose")
    if list(k_transpose.attrs["perm"]) != SPLIT_KEY_PERM:
        return
    k_transpose.attrs["perm"] = list(HEAD_PERM)
    _insert_after(graph, k_transpose.outputs[0], "Transpose", attrs={"perm": list(KEY_PERM)})
    rewrite.add("k_transposes_split")


def _rewrite_scale(graph: gs.Graph, facts: ModelFacts, match: Match, rewrite: Rewrite) -> None:
    scale = np.array(1.0 / math.sqrt(facts.head_dim), dtype=np.float32)
    scores = match.node("scores")
    if _has(match, "q_scale"):
        _unscale_operands(scores, match)
        _insert_after(graph, scores.outputs[0], "Mul", extra=[make_constant(graph, "bert_scale", scale)],
                      name=unique_name(graph, f"{SCALE_NAME_PREFIX}Mul"))
        rewrite.add("scales_rewritten")
        return
    node = match.node("scale")
    changed = node.op == "Div" or not node.name.startswith(SCALE_NAME_PREFIX)
    if node.op == "Div":
        node.op = "Mul"
        node.inputs[1] = make_constant(graph, "bert_scale", scale.astype(_dtype(node.inputs[1])))
    if not node.name.startswith(SCALE_NAME_PREFIX):
        node.name = unique_name(graph, f"{SCALE_NAME_PREFIX}Mul")
    _order_operands(node, scores.outputs[0], rewrite)
    rewrite.add("scales_rewritten", int(changed))


def _unscale_operands(scores: gs.Node, match: Match) -> None:
    """SDPA scales Q and K by sqrt(scale) each; the MatMul reads them unscaled instead."""
    scores.inputs[0] = match.node("q_scale").inputs[_computed_index(match.node("q_scale"))]
    scores.inputs[1] = match.node("k_scale").inputs[_computed_index(match.node("k_scale"))]


def _computed_index(node: gs.Node) -> int:
    return 0 if not isinstance(node.inputs[0], gs.Constant) else 1


def _has(match: Match, name: str) -> bool:
    try:
        match.node(name)
    except KeyError:
        return False
    return True


def _dtype(tensor: gs.Tensor) -> np.dtype:
    return np.dtype(tensor.dtype) if isinstance(tensor, gs.Constant) else np.dtype(np.float32)


def _expand_masks(graph: gs.Graph, facts: ModelFacts, matches: list[Match], rewrite: Rewrite) -> None:
    """Point 5: one Expand to [batch, 1, seq, seq] per distinct mask, shared by the layers."""
    full = [facts.batch, 1, facts.seq, facts.seq]
    expanded: dict[int, gs.Tensor] = {}
    for match in matches:
        add, mask = match.node("mask_add"), match["mask"]
        scores = next(t for t in add.inputs if t is not mask)
        if list(mask.shape or []) != full:
            if id(mask) not in expanded:
                target = make_constant(graph, "bert_mask_shape", np.array(full, dtype=np.int64))
                expanded[id(mask)] = add_node(graph, "Expand", [mask, target], dtype=mask.dtype,
                                              shape=full)[0]
                rewrite.add("masks_expanded")
            mask = expanded[id(mask)]
        if list(add.inputs) != [scores, mask]:
            _set_inputs(add, [scores, mask])
            rewrite.add("operands_reordered")


# ----------------------------------------------------------------------------- the 2-D encoder

def _make_encoder_2d(graph: gs.Graph, facts: ModelFacts, matches: list[Match], rewrite: Rewrite) -> None:
    """Points 1, 2 and 6: tokens flattened from the first block's input to the last LayerNorm."""
    first_input = _block_input(matches[0])
    last_output = _last_layernorm_output(graph, _block_input(matches[-1]))
    if last_output is None:
        rewrite.notes.append("the 2-D encoder was not applied: cannot find the LayerNorm that ends the "
                             f"last layer (after '{_block_input(matches[-1]).name}')")
        return
    tokens = facts.batch * facts.seq
    start = _flatten_first_input(graph, facts, first_input, tokens, rewrite)
    for node in _encoder_nodes(start, last_output):
        if is_token_flattening(node):
            replace_uses(node.outputs[0], node.inputs[0], graph)
            rewrite.add("reshapes_removed")
    for match in matches:
        _retarget_context(graph, facts, match, rewrite)
    _unflatten_last_output(graph, facts, last_output, rewrite)


def _block_input(match: Match) -> gs.Tensor:
    return block_input(match["x"])


def _flatten_first_input(graph: gs.Graph, facts: ModelFacts, first: gs.Tensor, tokens: int,
                         rewrite: Rewrite) -> gs.Tensor:
    """Reshape [-1, hidden] before the first LayerNorm's output Add (or after a LayerNormalization)."""
    if list(first.shape or []) == [tokens, facts.hidden]:
        return first
    target = make_constant(graph, "bert_shape_2d", np.array([-1, facts.hidden], dtype=np.int64))
    beta_add = _decomposed_output_add(first)
    rewrite.add("reshapes_2d")
    if beta_add is None:
        return _insert_after(graph, first, "Reshape", extra=[target], shape=[tokens, facts.hidden]).outputs[0]
    index = next(i for i, t in enumerate(beta_add.inputs) if not isinstance(t, gs.Constant))
    flat = add_node(graph, "Reshape", [beta_add.inputs[index], target], dtype=first.dtype,
                    shape=[tokens, facts.hidden])[0]
    _set_inputs(beta_add, [flat, beta_add.inputs[1 - index]])
    return first


def _decomposed_output_add(tensor: gs.Tensor) -> gs.Node | None:
    """The final Add(Mul(normalized, gamma), beta) of a decomposed LayerNorm producing `tensor`."""
    match = LAYERNORM.match(tensor.inputs[0], allow_escape=True) if tensor.inputs else None
    return match.root if match is not None and match.root.op == "Add" else None


def _retarget_context(graph: gs.Graph, facts: ModelFacts, match: Match, rewrite: Rewrite) -> None:
    reshape = match.node("context_reshape")
    if constant_value(reshape.inputs[1]).tolist() != [-1, facts.hidden]:
        target = np.array([-1, facts.hidden], dtype=np.int64)
        reshape.inputs[1] = make_constant(graph, "bert_context_shape", target)
        rewrite.add("reshapes_2d")


def _unflatten_last_output(graph: gs.Graph, facts: ModelFacts, last: gs.Tensor, rewrite: Rewrite) -> None:
    """Reshape back to [batch, seq, hidden] after the last LayerNorm, unless already there."""
    full = [facts.batch, facts.seq, facts.hidden]
    readers = last.outputs
    if last not in graph.outputs and readers and all(_reshapes_to(node, full) for node in readers):
        return
    target = make_constant(graph, "bert_shape_3d", np.array(full, dtype=np.int64))
    _insert_after(graph, last, "Reshape", extra=[target], shape=full)
    rewrite.add("reshapes_2d")


def _reshapes_to(node: gs.Node, shape: list[int]) -> bool:
    value = constant_value(node.inputs[1]) if node.op == "Reshape" else None
    return value is not None and value.tolist() == shape


def _encoder_nodes(start: gs.Tensor, end: gs.Tensor) -> list[gs.Node]:
    """Nodes on a path from `start` to `end`: downstream of one and upstream of the other."""
    downstream = _reach(start, lambda t: t.outputs, lambda n: n.outputs, stop=end)
    upstream = _reach(end, lambda t: t.inputs, lambda n: n.inputs, stop=start)
    return [node for node in downstream.values() if id(node) in upstream]


def _reach(tensor: gs.Tensor, nodes_of, tensors_of, stop: gs.Tensor) -> dict[int, gs.Node]:
    seen: dict[int, gs.Node] = {}
    frontier = [tensor]
    while frontier:
        current = frontier.pop()
        if current is stop:
            continue
        for node in nodes_of(current):
            if id(node) not in seen:
                seen[id(node)] = node
                frontier.extend(tensors_of(node))
    return seen


# ----------------------------------------------------------------------------- LayerNorm chain

def _layernorm_pattern() -> Pattern:
    """A LayerNormalization op, or the decomposed form legacy exports write, bound to its input x."""
    x = Var("x")
    centered = Op("Sub", x, Op("ReduceMean", x, partial_inputs=True))
    variance = Op("ReduceMean", Op("Pow", centered, Const(2.0)), partial_inputs=True)
    normalized = Op("Div", centered, Op("Sqrt", Op("Add", variance, Const())))
    decomposed = Op("Add", Op("Mul", normalized, Const()), Const())
    return Pattern(OneOf(Op("LayerNormalization", x, _, partial_inputs=True, outputs=None), decomposed))


LAYERNORM = _layernorm_pattern()


def _last_layernorm_output(graph: gs.Graph, last_input: gs.Tensor) -> gs.Tensor | None:
    """The output of the LayerNorm that ends the last layer: LN(Add(LN(Add(x, attention)), ffn))."""
    by_input = {id(m["x"]): m.root.outputs[0] for m in LAYERNORM.find_all(graph, allow_escape=True)}
    tensor = last_input
    for _step in ("attention output LayerNorm", "layer output LayerNorm"):
        tensor = next((by_input[id(add.outputs[0])] for add in tensor.outputs
                       if add.op == "Add" and id(add.outputs[0]) in by_input), None)
        if tensor is None:
            return None
    return tensor


# ----------------------------------------------------------------------------- helpers

def _insert_after(graph: gs.Graph, tensor: gs.Tensor, op: str, *, extra: list[gs.Tensor] = (),
                  attrs: dict | None = None, name: str | None = None, shape=None) -> gs.Node:
    """A new node reading `tensor` (then `extra`); every former reader of `tensor` reads its output."""
    output = add_node(graph, op, [tensor, *extra], name=name, attrs=attrs, dtype=tensor.dtype, shape=shape)[0]
    node = output.inputs[0]
    replace_uses(tensor, output, graph)
    node.inputs[0] = tensor  # replace_uses redirected the new node too
    return node


def _set_inputs(node: gs.Node, tensors: list[gs.Tensor]) -> None:
    """gs keeps consumer links in sync on clear/extend (its lists take no slice assignment)."""
    node.inputs.clear()
    node.inputs.extend(tensors)


def _refresh_shapes(graph: gs.Graph) -> None:
    """Shapes recorded before the rewrite are stale (2-D now); infer them afresh."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    inputs, outputs = {id(t) for t in graph.inputs}, {id(t) for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in inputs and id(tensor) not in outputs:
            tensor.shape = None
    infer_shapes(graph)
