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
   is flattened to [batch*seq, n] with it; one of another shape stops the 2-D encoder, named. A node that
   names the feature axis from the start (I-BERT's LayerNorm: ReduceMean over axis 2) names it from the
   end (-1) instead, since the 2-D tensor has no axis 2; a node reducing over batch or seq stops it, named;
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
   with one input (no cache), is a copy and is dropped. Gemm linear layers (onnxsim's) are the
   gemm-to-matmul pass's, which `default` runs before this one;
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

A block is matched by one pattern rooted at its context Reshape, with OneOf for the variants
(`bertopt.model.forms.attention_block_pattern`); the encoder's span and its flattening are
`bertopt.model.encoder`'s. A block that does not match is named in the notes with the matcher's reason
and left alone; the 2-D encoder (points 1, 2 and 6) is then not applied either, since it needs every
block's shapes to follow. Numerics are unchanged up to float rounding (Div by 8 vs Mul by 0.125, the SDPA and XLM
scales moved after the MatMul).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.form import (BLOCK_INPUT_READERS, SCALE_NAME_PREFIX, attention_softmaxes, block_input,
                                 check_blocks, newly_conforming, scale_named_for_atc)
from bertopt.graph import (add_node, constant_value, infer_shapes, insert_after, is_copy_of, make_constant, put_first,
                           reinfer_shapes, remove_noop_casts, replace_uses, set_inputs, unique_name)
from bertopt.graph.pattern import Match
from bertopt.model.encoder import encoder_span, flatten_tokens, unflatten_output
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import HEAD_PERM, KEY_PERM, SPLIT_KEY_PERM, attention_blocks, residual_operand
from bertopt.pipeline import PassOptions, PassResult, register_pass

COUNTS = ("blocks_rewritten", "blocks_total", "k_transposes_split", "k_transposes_unbatched", "scales_rewritten",
          "masks_expanded", "reshapes_2d", "reshapes_removed", "concats_removed", "operands_reordered",
          "residuals_rewired", "axes_from_end")
# Copies in a block that change nothing once it is in the standard form, and what removing each counts as.
COPIES = {"context_noop": "reshapes_removed", "k_cache": "concats_removed", "v_cache": "concats_removed"}


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
    if all(block.conforming for block in before):
        return PassResult.no_change(f"all {len(before)} attention blocks are already in the standard form "
                                    "ATC fuses")
    result = PassResult(changed=False, counts=dict.fromkeys(COUNTS, 0))
    result.counts["blocks_total"] = len(softmaxes)
    if casts := remove_noop_casts(graph, after=("Softmax",)):  # ViT's, CLIP's, Whisper's eager attention
        result.counts["noop_casts_removed"] = casts
    matches, misses = attention_blocks(graph, facts, softmaxes)
    result.notes += [f"layer {layer} (Softmax '{softmaxes[layer].name}') left unchanged: {why}"
                     for layer, why in misses.items()]
    for match in matches:
        _rewrite_block(graph, facts, match, result)
    _expand_masks(graph, facts, matches, result)
    for match in matches:
        _residual_reads_block_input(match, result)
    encoder_2d = len(matches) == len(softmaxes) and _make_encoder_2d(graph, facts, matches, result)
    if len(matches) < len(softmaxes):
        result.notes.append("the 2-D encoder (Reshape [-1, hidden] ... back) was not applied: it needs "
                             "every attention block in the standard form")
    reinfer_shapes(graph)  # the shapes recorded before the rewrite are stale (2-D now)
    if encoder_2d:  # the block inputs' readers count once Q, K, V read them directly
        result.notes += _too_few_readers(matches)
    result.counts["blocks_rewritten"] = newly_conforming(before, check_blocks(graph, facts))
    if not any(n for key, n in result.counts.items() if key != "blocks_total"):
        return PassResult.no_change("; ".join(result.notes) or "nothing to rewrite")
    result.notes.insert(0, f"{result.counts['blocks_rewritten']} of {len(softmaxes)} attention blocks "
                            "brought into the standard form ATC fuses")
    result.changed = True
    return result


# ----------------------------------------------------------------------------- per block

def _rewrite_block(graph: gs.Graph, facts: ModelFacts, match: Match, result: PassResult) -> None:
    """Points 3 and 4; the computed operand first, as ATC's fusion patterns are written (Add(MatMul, bias))."""
    for tag in ("q", "k", "v"):
        add, product = match.node(f"{tag}_add"), match.node(f"{tag}_matmul").outputs[0]
        result.counts["operands_reordered"] += put_first(add, product)
    _standard_key_transposes(graph, match, result)
    _rewrite_scale(graph, facts, match, result)
    for name, count in COPIES.items():
        copy = match.get_node(name)
        if copy is not None:
            replace_uses(copy.outputs[0], copy.inputs[0], graph)
            result.counts[count] += 1


def _standard_key_transposes(graph: gs.Graph, match: Match, result: PassResult) -> None:
    """K's single Transpose (0, 2, 3, 1) split in two; SDPA's Reshape -> Transpose(0, 2, 1) -> Reshape becomes
    the standard second Transpose (0, 1, 3, 2)."""
    k_transpose, unmerge = match.node("k_transpose"), match.get_node("k_unmerge")
    if list(k_transpose.attrs["perm"]) == SPLIT_KEY_PERM:
        k_transpose.attrs["perm"] = list(HEAD_PERM)
        insert_after(graph, k_transpose.outputs[0], "Transpose", attrs={"perm": list(KEY_PERM)})
        result.counts["k_transposes_split"] += 1
    if unmerge is not None:
        swapped = add_node(graph, "Transpose", [k_transpose.outputs[0]], attrs={"perm": list(KEY_PERM)},
                           dtype=k_transpose.outputs[0].dtype)
        replace_uses(unmerge.outputs[0], swapped[0], graph)
        result.counts["k_transposes_unbatched"] += 1


def _rewrite_scale(graph: gs.Graph, facts: ModelFacts, match: Match, result: PassResult) -> None:
    scores = match.node("scores")
    scale = np.array(1.0 / math.sqrt(facts.head_dim), dtype=np.dtype(scores.outputs[0].dtype or np.float32))
    if match.get_node("q_scale") is not None:
        # SDPA scales Q and K by sqrt(scale) each, XLM Q alone by the whole scale; the MatMul reads them
        # unscaled instead ((q / s) k = (q k) / s) and one Mul scales its product
        for index, node in enumerate(map(match.get_node, ("q_scale", "k_scale"))):
            if node is not None:
                scores.inputs[index] = node.inputs[0 if not isinstance(node.inputs[0], gs.Constant) else 1]
        insert_after(graph, scores.outputs[0], "Mul", extra=[make_constant(graph, "bert_scale", scale)],
                     name=unique_name(graph, f"{SCALE_NAME_PREFIX}Mul"))
        result.counts["scales_rewritten"] += 1
        return
    node = match.node("scale")
    changed = node.op == "Div" or not scale_named_for_atc(node.name)
    if node.op == "Div":
        node.op = "Mul"
        node.inputs[1] = make_constant(graph, "bert_scale", scale)
    if not scale_named_for_atc(node.name):
        node.name = unique_name(graph, f"{SCALE_NAME_PREFIX}Mul")
    result.counts["operands_reordered"] += put_first(node, scores.outputs[0])
    result.counts["scales_rewritten"] += int(changed)


def _expand_masks(graph: gs.Graph, facts: ModelFacts, matches: list[Match], result: PassResult) -> None:
    """Point 5: each layer's mask Add reads an Expand to [batch, 1, seq, seq] of its own."""
    full = [facts.batch, 1, facts.seq, facts.seq]
    target = make_constant(graph, "bert_mask_shape", np.array(full, dtype=np.int64))
    for match in matches:
        add, mask = match.node("mask_add"), match["mask"]
        scores = next(t for t in add.inputs if t is not mask)
        if list(mask.shape or []) != full:
            mask = add_node(graph, "Expand", [mask, target], dtype=mask.dtype, shape=full)[0]
            result.counts["masks_expanded"] += 1
        if list(add.inputs) != [scores, mask]:
            set_inputs(add, [scores, mask])
            result.counts["operands_reordered"] += 1


def _residual_reads_block_input(match: Match, result: PassResult) -> None:
    """Point 2: the residual Add reads the block input itself, not a copy of it (the copy is dropped)."""
    x, found = block_input(match["x"]), residual_operand(match.node("context_reshape").outputs[0])
    if found is None:
        return
    residual, index = found
    if residual.inputs[index] is not x and is_copy_of(residual.inputs[index], x):
        residual.inputs[index] = x
        result.counts["residuals_rewired"] += 1


def _too_few_readers(matches: list[Match]) -> list[str]:
    """Point 2: notes naming each block input with fewer than four readers, and what the residual reads."""
    notes = []
    for layer, match in enumerate(matches):
        # what Q reads now: the first block's input may have become the encoder's 2-D Reshape
        x = block_input(match.node("q_matmul").inputs[0])
        if len(x.outputs) >= BLOCK_INPUT_READERS:
            continue
        found = residual_operand(match.node("context_reshape").outputs[0])
        reads = (f"the residual Add '{found[0].name}' reads '{found[0].inputs[found[1]].name}', not the block input"
                 if found is not None else "no residual Add follows the attention output projection")
        notes.append(f"layer {layer}: '{x.name}' has {len(x.outputs)} readers, ATC's LayerNorm+QKV kernel wants "
                     f"{BLOCK_INPUT_READERS}: {reads} (msit would add an Add(x, 0) that nothing reads, which the "
                     "pipeline's cleanup drops)")
    return notes


# ----------------------------------------------------------------------------- the 2-D encoder

def _make_encoder_2d(graph: gs.Graph, facts: ModelFacts, matches: list[Match], result: PassResult) -> bool:
    """Points 1 and 6: tokens flattened from the first LayerNorm's input to the last LayerNorm."""
    span = encoder_span(graph, block_input(matches[0]["x"]), block_input(matches[-1]["x"]), facts)
    if isinstance(span, str):
        result.notes.append(f"the 2-D encoder was not applied: {span}")
        return False
    for key, n in flatten_tokens(graph, span, facts).items():
        result.counts[key] += n
    for match in matches:
        reshape = match.node("context_reshape")
        if constant_value(reshape.inputs[1]).tolist() != [-1, facts.hidden]:
            target = np.array([-1, facts.hidden], dtype=np.int64)
            reshape.inputs[1] = make_constant(graph, "bert_context_shape", target)
            result.counts["reshapes_2d"] += 1
    result.counts["reshapes_2d"] += unflatten_output(graph, span, facts)
    return True
