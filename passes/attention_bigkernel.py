"""attention-bigkernel: rewrite every attention block into the form ATC fuses into its big kernels.

ATC fuses BERT attention into AttentionLnQKV and AttentionScore only when the graph has one
standard form (the facts note, sections 5-6; `bertopt.ascend.check` checks it on any model). This
pass replaces the seed's `fix_onnx.py` for any hidden size, head count and exporter, reading
hidden/heads/head_dim from ModelFacts. The reference rewriters it follows: msit surgeon's
`KnowledgeBigKernel` (repo `Ascend/msit`, mirrored in `xiaobingling93-pixel/Ascend-msit`,
`msit/components/debug/surgeon/auto_optimizer/pattern/knowledges/big_kernel/`, files
`knowledge_big_kernel.py`, `transform_refactor.py`, `util.py`) and MagicONNX's
`BertBigKernelOptimizer` (repo `jadehh/MagicONNX`, `magiconnx/optimize/optimizers/bertbigkernel_optimizer.py`).

1. the encoder works on 2-D [batch*seq, hidden]: a Reshape [-1, hidden] on the INPUT of the first
   LayerNorm (all its readers read the 2-D tensor), a Reshape back to [batch, seq, hidden] after the
   last LayerNorm, and every Reshape between the two that only flattens or unflattens tokens
   (onnxsim's around each Gemm) removed. Where: msit's `TransformRefactor.update_layernorm` puts it
   after the node that feeds the first LayerNorm, for the decomposed form and (here) the
   LayerNormalization op alike; MagicONNX and the seed's fix_onnx.py put it inside the first
   LayerNorm, between the gamma Mul and the beta Add. bertopt takes msit's place because ATC's
   passes need the LayerNorm whole: `LayerNormONNXFusionPass` matches Mul -> Add with nothing between
   (`layer_norm_onnx_fusion_pass.cc`, SetInputs(FusedNodeAdd1, {FusedNodeMul0})), and
   `ZAttentionLnQKVONNXFusionPass` wants the LayerNorm's own output read by Q, K, V and the residual
   Add (`attention_ln_qkv_onnx_fusion_pass.cc`, IsMatch: 4 peer anchors), not a Reshape of it; both
   in repo `dengguojie/vue-element-admin`, `ops/built-in/fusion_pass/graph_fusion/ai_core/`. When
   the first block's input is not a LayerNorm output (ALBERT projects its embeddings first), the
   LayerNorm above it through that MatMul + Add is the first one; without one, the Reshape goes on
   the block input itself. An operand from outside the encoder that a token-wise node broadcasts
   against [batch, seq, n] (XLM multiplies every LayerNorm output by its padding mask [batch, seq, 1])
   is flattened to [batch*seq, n] with it; one of another shape stops the 2-D encoder, named;
2. so the LayerNorm output feeding Q, K, V has four readers (three MatMuls, the residual Add). msit
   (`update_mask_add_node`) gives an input with fewer than four a dummy `Add(x, 0)` that nothing reads.
   That happens when the residual Add reads something else: msit's own case is GPT-2 (pre-LN, the
   residual reads the LayerNorm's input); none of the BERT-family exports bertopt makes has it
   (bert/roberta/distilbert/albert x legacy 14/17, dynamo 18/20, SDPA 14: four readers every time).
   bertopt does not write the dead Add: the PassManager's cleanup after each pass drops a node that
   reaches no graph output (as msit's own `BaseGraph.remove_unused_nodes` does). Where the residual
   reads the block input through a copy that changes nothing (Identity, a Cast to the same type, a
   Reshape to the same shape) it reads the block input instead, which gives the four readers;
   otherwise the block is named in the notes and keeps its readers;
3. Q, K, V are MatMul -> Add -> Reshape -> Transpose(0,2,1,3); a single K Transpose (0,2,3,1) is
   split into (0,2,1,3) then (0,1,3,2); SDPA from the dynamo exporter (torch 2.13) swaps K's last two
   axes as Reshape [batch*heads, seq, hd] -> Transpose(0,2,1) -> Reshape [batch, heads, hd, seq],
   which becomes that second Transpose; XLM's key/value cache Concat, written by the legacy exporter
   with one input (no cache), is a copy and is dropped; Gemm linear layers (onnxsim) become MatMul + Add;
4. the scale is one Mul by 1/sqrt(head_dim) after the scores MatMul whose name contains `bert`:
   ATC's `MulAddFusionPass` (`mul_add_fusion_pass.cc`, same folder) fuses the Mul into the
   FusedMulAdd AttentionScore needs only when `mul_name.find("bert")` succeeds (and the name holds
   neither `adam` nor `lamb`). A Div by sqrt(head_dim), SDPA's Mul(q, s), Mul(k, s) pair (s the
   square root of the scale) or XLM's Q alone divided by sqrt(head_dim) before the MatMul becomes
   such a Mul, typed like the scores; the Muls bertopt writes or renames are called `bert_*`, a Mul
   already named with `bert` keeps its name;
5. the mask added to the scores is expanded to [batch, 1, seq, seq] by one Expand per layer, as
   msit (`update_mask_add_node`: `<i>.mask_expand` per attention) and MagicONNX
   (`broadcast_input_mask`: `Expand_before_<mask Add>` per layer) both write it; neither says why,
   and `MulAddFusionPass` takes a shared producer too (it only counts the producer's outputs), so
   this follows the references rather than a condition read in ATC. fold-attention-mask leaves the
   mask [batch, 1, 1, seq]; a mask already full-shape (transformers 5 expands its own) is left as it
   is (msit would still add a same-shape Expand per layer: a copy that changes nothing);
6. the context Reshape after Softmax -> MatMul -> Transpose reshapes to [-1, hidden].

A block is matched by one pattern rooted at its context Reshape, with OneOf for the variants.
A block that does not match is named in the notes with the matcher's reason and left alone; the
2-D encoder (points 1, 2 and 6) is then not applied either, since it needs every block's shapes
to follow. Numerics are unchanged up to float rounding (Div by 8 vs Mul by 0.125, the SDPA and XLM
scales moved after the MatMul, Gemm vs MatMul + Add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.form import (CONTEXT_SEARCH_DEPTH, HEAD_PERM, KEY_PERM, SCALE_NAME_PREFIX, BlockReport,
                                 attention_softmaxes, block_input, check_blocks, context_reshape, heads,
                                 is_token_flattening, projection, scale_named_for_atc, transpose)
from bertopt.ascend.layernorm import layernorm_pattern
from bertopt.graph import (add_node, constant_value, infer_shapes, make_constant, producer, remove_noop_casts, replace_uses,
                           unique_name)
from bertopt.graph.pattern import Const, Match, OneOf, Op, Pattern, Var
from bertopt.model.facts import ModelFacts
from bertopt.pipeline import PassOptions, PassResult, register_pass

SPLIT_KEY_PERM = [0, 2, 3, 1]
BATCHED_KEY_PERM = [0, 2, 1]
SCALE_RTOL = 1e-4
# Q, K, V MatMuls and the residual Add: what ZAttentionLnQKVONNXFusionPass wants reading the LayerNorm.
BLOCK_INPUT_READERS = 4
# Nodes that hand their input on unchanged when they keep its shape and type.
NO_OP_COPIES = frozenset({"Identity", "Cast", "Reshape"})
# Ops that broadcast their operands against each other (where a 3-D operand meets the 2-D encoder).
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"})
# ALBERT's first block reads MatMul + Add of its embedding LayerNorm: two nodes to look through.
EMBEDDING_PROJECTION_NODES = 2


@dataclass
class Rewrite:
    """What the pass changed, counted as the issue asks."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("blocks_rewritten", "blocks_total", "k_transposes_split", "k_transposes_unbatched", "scales_rewritten",
         "masks_expanded", "reshapes_2d", "reshapes_removed", "concats_removed", "gemms_to_matmul",
         "operands_reordered", "residuals_rewired"), 0))
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    @property
    def changed(self) -> bool:
        return any(n for key, n in self.counts.items() if key != "blocks_total")


@register_pass("attention-bigkernel", "rewrite every attention block into the form ATC fuses into "
               "AttentionLnQKV/AttentionScore (2-D encoder, K transpose split, bert Mul scale, mask Expand per "
               "layer)",
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
    casts = remove_noop_casts(graph, after=("Softmax",))  # ViT's, CLIP's, Whisper's eager attention
    if casts:
        rewrite.counts["noop_casts_removed"] = casts
    if rewrite.counts["gemms_to_matmul"] or casts:
        infer_shapes(graph)
    matches = _match_blocks(graph, facts, softmaxes, rewrite)
    for match in matches:
        _rewrite_block(graph, facts, match, rewrite)
    _expand_masks(graph, facts, matches, rewrite)
    for match in matches:
        _residual_reads_block_input(match, rewrite)
    encoder_2d = len(matches) == len(softmaxes) and _make_encoder_2d(graph, facts, matches, rewrite)
    if len(matches) < len(softmaxes):
        rewrite.notes.append("the 2-D encoder (Reshape [-1, hidden] ... back) was not applied: it needs "
                             "every attention block in the standard form")
    _refresh_shapes(graph)
    if encoder_2d:  # the block inputs' readers count once Q, K, V read them directly
        rewrite.notes += _too_few_readers(matches)
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
    key = _key_spellings(heads(projection(x, "k"), facts, "k"), facts)
    value = _uncached(transpose(heads(projection(x, "v"), facts, "v"), HEAD_PERM, "v_transpose"), "v")
    scale = 1.0 / math.sqrt(facts.head_dim)
    scores = Op("MatMul", query, key, name="scores")
    half = Const(math.sqrt(scale), rtol=SCALE_RTOL)
    query_alone = OneOf(Op("Div", query, Const(1.0 / scale, rtol=SCALE_RTOL), name="q_scale"),
                        Op("Mul", query, Const(scale, rtol=SCALE_RTOL), name="q_scale"))
    scaled = OneOf(
        Op("Mul", scores, Const(scale, rtol=SCALE_RTOL), name="scale"),
        Op("Div", scores, Const(1.0 / scale, rtol=SCALE_RTOL), name="scale"),
        Op("MatMul", Op("Mul", query, half, name="q_scale"), Op("Mul", key, half, name="k_scale"),
           name="scores"),
        Op("MatMul", query_alone, key, name="scores"))
    probs = Op("Softmax", Op("Add", scaled, Var("mask"), name="mask_add"), name="softmax",
               where=(_last_axis, "a softmax over the last axis"))
    context = Op("MatMul", probs, value, name="context_matmul")
    # SDPA exports reshape the context to the shape it already has before the Transpose.
    context = OneOf(context, Op("Reshape", context, Const(), name="context_noop",
                                where=(_keeps_shape, "a Reshape to the shape it already has")))
    merged = transpose(context, HEAD_PERM, "context_transpose")
    return Pattern(Op("Reshape", merged, Const(name="context_shape"), name="context_reshape"))


def _key_spellings(key_heads: Op, facts: ModelFacts) -> OneOf:
    """K transposed to [batch, heads, head_dim, seq]: the standard two Transposes, the single
    (0, 2, 3, 1) one, or SDPA's from the dynamo exporter, which swaps the last two axes of
    [batch*heads, seq, head_dim]: Reshape -> Transpose(0, 2, 1) -> Reshape."""
    heads_first = transpose(key_heads, HEAD_PERM, "k_transpose")
    merged = [facts.batch * facts.heads, facts.seq, facts.head_dim]
    split = [facts.batch, facts.heads, facts.head_dim, facts.seq]
    batched = Op("Reshape", Op("Transpose", Op("Reshape", heads_first, Const(), name="k_merge",
                                               where=_reshapes_into(merged)),
                               attrs={"perm": BATCHED_KEY_PERM}),
                 Const(), name="k_unmerge", where=_reshapes_into(split))
    return OneOf(transpose(_uncached(heads_first, "k"), KEY_PERM, "k_transpose2"),
                 transpose(key_heads, SPLIT_KEY_PERM, "k_transpose"),
                 batched)


def _uncached(heads_first: Op, tag: str) -> OneOf:
    """XLM's key/value cache Concat, which the legacy exporter writes with one input (no cache): a copy."""
    return OneOf(heads_first, Op("Concat", heads_first, name=f"{tag}_cache"))


def _reshapes_into(shape: list[int]) -> tuple:
    def reshapes(node: gs.Node) -> bool:
        return list(node.outputs[0].shape or []) == shape

    return reshapes, f"a Reshape to {shape}"


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
    _unbatch_key_transpose(graph, match, rewrite)
    _rewrite_scale(graph, facts, match, rewrite)
    for copy, count in (("context_noop", "reshapes_removed"), ("k_cache", "concats_removed"),
                        ("v_cache", "concats_removed")):
        if _has(match, copy):
            replace_uses(match.node(copy).outputs[0], match.node(copy).inputs[0], graph)
            rewrite.add(count)


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


def _unbatch_key_transpose(graph: gs.Graph, match: Match, rewrite: Rewrite) -> None:
    """SDPA's Reshape -> Transpose(0, 2, 1) -> Reshape becomes the standard second Transpose (0, 1, 3, 2)."""
    if not _has(match, "k_unmerge"):
        return
    heads_first = match.node("k_transpose").outputs[0]
    swapped = add_node(graph, "Transpose", [heads_first], attrs={"perm": list(KEY_PERM)}, dtype=heads_first.dtype)
    replace_uses(match.node("k_unmerge").outputs[0], swapped[0], graph)
    rewrite.add("k_transposes_unbatched")


def _rewrite_scale(graph: gs.Graph, facts: ModelFacts, match: Match, rewrite: Rewrite) -> None:
    scores = match.node("scores")
    scale = np.array(1.0 / math.sqrt(facts.head_dim), dtype=np.dtype(scores.outputs[0].dtype or np.float32))
    if _has(match, "q_scale"):
        _unscale_operands(scores, match)
        _insert_after(graph, scores.outputs[0], "Mul", extra=[make_constant(graph, "bert_scale", scale)],
                      name=unique_name(graph, f"{SCALE_NAME_PREFIX}Mul"))
        rewrite.add("scales_rewritten")
        return
    node = match.node("scale")
    changed = node.op == "Div" or not scale_named_for_atc(node.name)
    if node.op == "Div":
        node.op = "Mul"
        node.inputs[1] = make_constant(graph, "bert_scale", scale)
    if not scale_named_for_atc(node.name):
        node.name = unique_name(graph, f"{SCALE_NAME_PREFIX}Mul")
    _order_operands(node, scores.outputs[0], rewrite)
    rewrite.add("scales_rewritten", int(changed))


def _unscale_operands(scores: gs.Node, match: Match) -> None:
    """SDPA scales Q and K by sqrt(scale) each, XLM Q alone by the whole scale; the MatMul reads them
    unscaled instead ((q / s) k = (q k) / s)."""
    for index, name in enumerate(("q_scale", "k_scale")):
        if _has(match, name):
            scores.inputs[index] = match.node(name).inputs[_computed_index(match.node(name))]


def _computed_index(node: gs.Node) -> int:
    return 0 if not isinstance(node.inputs[0], gs.Constant) else 1


def _has(match: Match, name: str) -> bool:
    try:
        match.node(name)
    except KeyError:
        return False
    return True


def _expand_masks(graph: gs.Graph, facts: ModelFacts, matches: list[Match], rewrite: Rewrite) -> None:
    """Point 5: each layer's mask Add reads an Expand to [batch, 1, seq, seq] of its own."""
    full = [facts.batch, 1, facts.seq, facts.seq]
    target = make_constant(graph, "bert_mask_shape", np.array(full, dtype=np.int64))
    for match in matches:
        add, mask = match.node("mask_add"), match["mask"]
        scores = next(t for t in add.inputs if t is not mask)
        if list(mask.shape or []) != full:
            mask = add_node(graph, "Expand", [mask, target], dtype=mask.dtype, shape=full)[0]
            rewrite.add("masks_expanded")
        if list(add.inputs) != [scores, mask]:
            _set_inputs(add, [scores, mask])
            rewrite.add("operands_reordered")


def _residual_reads_block_input(match: Match, rewrite: Rewrite) -> None:
    """Point 2: the residual Add reads the block input itself, not a copy of it (the copy is dropped)."""
    x, found = _block_input(match), _residual_operand(match)
    if found is None:
        return
    residual, index = found
    if residual.inputs[index] is not x and _is_copy_of(residual.inputs[index], x):
        residual.inputs[index] = x
        rewrite.add("residuals_rewired")


def _too_few_readers(matches: list[Match]) -> list[str]:
    """Point 2: notes naming each block input with fewer than four readers, and what the residual reads."""
    notes = []
    for layer, match in enumerate(matches):
        # what Q reads now: the first block's input may have become the encoder's 2-D Reshape
        x, found = block_input(match.node("q_matmul").inputs[0]), _residual_operand(match)
        if len(x.outputs) >= BLOCK_INPUT_READERS:
            continue
        reads = "no residual Add follows the attention output projection"
        if found is not None:
            residual, index = found
            reads = f"the residual Add '{residual.name}' reads '{residual.inputs[index].name}', not the block input"
        notes.append(f"layer {layer}: '{x.name}' has {len(x.outputs)} readers, ATC's LayerNorm+QKV kernel wants "
                     f"{BLOCK_INPUT_READERS}: {reads} (msit would add an Add(x, 0) that nothing reads, which the "
                     "pipeline's cleanup drops)")
    return notes


def _residual_operand(match: Match) -> tuple[gs.Node, int] | None:
    """The residual Add after the output projection Add(MatMul(context, Wo), bo), and its other input."""
    tensor = match.node("context_reshape").outputs[0]
    for op in ("MatMul", "Add", "Add"):
        readers = [node for node in tensor.outputs if node.op == op]
        if len(readers) != 1:
            return None
        projection, tensor = tensor, readers[0].outputs[0]
    residual = readers[0]
    index = next((i for i, t in enumerate(residual.inputs) if t is not projection), None)
    return None if index is None else (residual, index)


def _is_copy_of(tensor: gs.Tensor, source: gs.Tensor) -> bool:
    """`tensor` is `source` handed on by nodes that keep its shape and type."""
    while tensor is not source:
        node = producer(tensor)
        if node is None or node.op not in NO_OP_COPIES or not node.inputs:
            return False
        inner = node.inputs[0]
        if inner.dtype != tensor.dtype or inner.shape is None or list(inner.shape) != list(tensor.shape or []):
            return False
        tensor = inner
    return True


# ----------------------------------------------------------------------------- the 2-D encoder

def _make_encoder_2d(graph: gs.Graph, facts: ModelFacts, matches: list[Match], rewrite: Rewrite) -> bool:
    """Points 1 and 6: tokens flattened from the first LayerNorm's input to the last LayerNorm."""
    layernorms = layernorm_pattern().find_all(graph, allow_escape=True)
    last_output = _last_layernorm_output(layernorms, _block_input(matches[-1]))
    if last_output is None:
        rewrite.notes.append("the 2-D encoder was not applied: cannot find the LayerNorm that ends the "
                             f"last layer (after '{_block_input(matches[-1]).name}')")
        return False
    source = _encoder_source(layernorms, _block_input(matches[0]))
    region = _encoder_nodes(source, last_output)
    operands, blocker = _token_operands(region, source, facts)
    if blocker:
        rewrite.notes.append(f"the 2-D encoder was not applied: {blocker}")
        return False
    _flatten_encoder_input(graph, facts, source, rewrite)
    for node in region:
        if is_token_flattening(node):
            replace_uses(node.outputs[0], node.inputs[0], graph)
            rewrite.add("reshapes_removed")
    _flatten_token_operands(graph, facts, operands, rewrite)
    for match in matches:
        _retarget_context(graph, facts, match, rewrite)
    _unflatten_last_output(graph, facts, last_output, rewrite)
    return True


def _block_input(match: Match) -> gs.Tensor:
    return block_input(match["x"])


def _encoder_source(layernorms: list[Match], first_input: gs.Tensor) -> gs.Tensor:
    """Point 1: the first LayerNorm's input, else the first block's input (see the module docstring)."""
    first = _first_layernorm(layernorms, first_input)
    return first["x"] if first is not None else first_input


def _flatten_encoder_input(graph: gs.Graph, facts: ModelFacts, source: gs.Tensor, rewrite: Rewrite) -> None:
    """Point 1: Reshape [-1, width] on the encoder's source, which every former reader then reads."""
    tokens = facts.batch * facts.seq
    width = source.shape[-1] if source.shape else facts.hidden  # ALBERT normalises its embedding size
    if list(source.shape or []) == [tokens, width]:
        return
    target = make_constant(graph, "bert_shape_2d", np.array([-1, width], dtype=np.int64))
    rewrite.add("reshapes_2d")
    _insert_after(graph, source, "Reshape", extra=[target], shape=[tokens, width])


def _token_operands(region: list[gs.Node], source: gs.Tensor,
                    facts: ModelFacts) -> tuple[list[tuple[gs.Node, int]], str | None]:
    """Operands from outside the encoder that token-wise nodes inside it broadcast against [batch, seq, n]
    (XLM multiplies each LayerNorm output by its padding mask [batch, seq, 1]): (node, input index) of
    each, to flatten with the encoder, or why the encoder cannot be flattened."""
    inside = {id(out) for node in region for out in node.outputs} | {id(source)}
    tokens = [facts.batch, facts.seq]
    found = []
    for node in region:
        if node.op not in BROADCASTING or not any(
                id(t) in inside and list(t.shape or [])[:2] == tokens and len(t.shape) == 3 for t in node.inputs):
            continue
        for index, tensor in enumerate(node.inputs):
            if id(tensor) in inside or len(tensor.shape or []) < 2:
                continue
            if len(tensor.shape) != 3 or list(tensor.shape[:2]) != tokens:
                return [], (f"{node.op} '{node.name}' broadcasts '{tensor.name}' {list(tensor.shape)} against the "
                            f"[batch, seq, n] tokens, which the 2-D encoder would break")
            found.append((node, index))
    return found, None


def _flatten_token_operands(graph: gs.Graph, facts: ModelFacts, operands: list[tuple[gs.Node, int]],
                            rewrite: Rewrite) -> None:
    """Each operand `_token_operands` found, read as [batch*seq, n] (one Reshape per tensor)."""
    flat: dict[int, gs.Tensor] = {}
    for node, index in operands:
        tensor = node.inputs[index]
        if id(tensor) not in flat:
            width = tensor.shape[-1]
            target = make_constant(graph, "bert_shape_2d", np.array([-1, width], dtype=np.int64))
            flat[id(tensor)] = add_node(graph, "Reshape", [tensor, target], dtype=tensor.dtype,
                                        shape=[facts.batch * facts.seq, width])[0]
            rewrite.add("reshapes_2d")
        node.inputs[index] = flat[id(tensor)]


def _first_layernorm(layernorms: list[Match], first_input: gs.Tensor) -> Match | None:
    """The LayerNorm making the first block's input, else the one above it through a token-wise
    MatMul + Add with constant weights (ALBERT's embedding projection)."""
    by_output = {id(m.root.outputs[0]): m for m in layernorms}
    tensor = first_input
    for _node in range(EMBEDDING_PROJECTION_NODES):
        if id(tensor) in by_output:
            break
        node = producer(tensor)
        computed = [t for t in node.inputs if not isinstance(t, gs.Constant)] if node is not None else []
        if node is None or node.op not in ("MatMul", "Add") or len(computed) != 1:
            return None
        tensor = computed[0]
    return by_output.get(id(tensor))


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

def _last_layernorm_output(layernorms: list[Match], last_input: gs.Tensor) -> gs.Tensor | None:
    """The output of the LayerNorm that ends the last layer: LN(Add(LN(Add(x, attention)), ffn))."""
    by_input = {id(m["x"]): m.root.outputs[0] for m in layernorms}
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
