"""The attention form ATC's big kernels match, and the six conditions it checks per block.

ATC fuses BERT attention into its AttentionLnQKV and AttentionScore kernels only when every block
has one standard form (facts notes: ascend-facts.md sections 5-6, graph-facts.md section 4). With x
the LayerNorm output [batch*seq, hidden]::

    q = Transpose(Reshape(Add(MatMul(x, Wq), bq), [b, s, heads, hd]), perm=[0, 2, 1, 3])
    k = Transpose(Transpose(Reshape(Add(MatMul(x, Wk), bk), ...), perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2])
    v = Transpose(Reshape(Add(MatMul(x, Wv), bv), ...), perm=[0, 2, 1, 3])
    p = Softmax(Add(Mul(MatMul(q, k), 1/sqrt(hd)) named *bert*, mask[b, 1, s, s]))
    context = Reshape(Transpose(MatMul(p, v), perm=[0, 2, 1, 3]), [-1, hidden])

and x feeds exactly the three projections and the residual Add. The sub-patterns (`projection`, `heads`,
`transpose`) are the model's (`bertopt.model.forms`), shared with the attention-bigkernel pass, which
rewrites to this form.
Whether ATC's passes then fuse the block (its shapes, the chip, the CANN version, the LayerNorm and
Gelu around it) is bertopt.ascend.gates' question, asked of the same located block (`locate_block`).

The scale's name: MulAddFusionPass, which makes the FusedMulAdd the AttentionScore kernel needs, only
fuses a Mul whose node name CONTAINS `bert` (canndev `mul_add_fusion_pass.cc` lines 83-89, see
bertopt/data/fusion_gates.json), so any such name passes `scale-mul`; the pass names its Muls `bert_*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import onnx_graphsurgeon as gs

from bertopt.graph import producer
from bertopt.graph.pattern import Const, Op, Pat, Pattern, Var, _
from bertopt.model.encoder import is_token_flattening
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import (CONTEXT_SEARCH_DEPTH, HEAD_PERM, KEY_PERM, context_reshape, heads, projection,
                                 transpose)

CONDITIONS = {
    "2d-encoder": "the LayerNorm output feeding Q/K/V is 2-D [batch*seq, hidden], read directly",
    "ln-consumers": "that LayerNorm output has exactly 4 consumers: Q, K, V MatMul and the residual Add",
    "qkv-form": "Q, K, V are MatMul -> Add -> Reshape -> Transpose(0,2,1,3); K then Transpose(0,1,3,2)",
    "scale-mul": "the scores are scaled by a Mul by 1/sqrt(head_dim) whose name contains 'bert'",
    "mask-shape": "the mask added to the scores has the full shape [batch, 1, seq, seq]",
    "context-reshape": "Softmax -> MatMul -> Transpose(0,2,1,3) -> Reshape to [-1, hidden]",
}
SCALE_NAME_PREFIX = "bert_"  # how the attention-bigkernel pass names the scale Muls it writes
SCALE_NAME_MARK = "bert"  # what ATC's MulAddFusionPass looks for in the name
# How far above the scores MatMul the Q projection may be looked for.
PROJECTION_SEARCH_DEPTH = 6
# Q, K, V MatMuls and the residual Add: what ZAttentionLnQKVONNXFusionPass wants reading the LayerNorm.
BLOCK_INPUT_READERS = 4


@dataclass
class Check:
    """One condition: ok is None when the check was skipped (reason says why)."""

    name: str
    ok: bool | None
    reason: str


@dataclass
class BlockReport:
    layer: int
    softmax: str
    checks: list[Check] = field(default_factory=list)

    @property
    def conforming(self) -> bool:
        return all(check.ok for check in self.checks)

    def failing(self) -> list[str]:
        return [check.name for check in self.checks if check.ok is False]


def newly_conforming(before: list[BlockReport], after: list[BlockReport]) -> int:
    """How many blocks conform in `after` that did not in `before` (blocks known by their Softmax's name)."""
    was = {block.softmax: block.conforming for block in before}
    return sum(1 for block in after if block.conforming and not was.get(block.softmax, False))


# ----------------------------------------------------------------------------- shared patterns

def standard_head(x: Pat, facts: ModelFacts, tag: str) -> Op:
    return transpose(heads(projection(x, tag), facts, tag), HEAD_PERM, f"{tag}_transpose")


def standard_scores(facts: ModelFacts) -> Pattern:
    """The scores MatMul of the standard form: MatMul(q, k^T) with K's Transpose split in two."""
    x = Var("x")
    key = transpose(standard_head(x, facts, "k"), KEY_PERM, "k_transpose2")
    return Pattern(Op("MatMul", standard_head(x, facts, "q"), key, name="scores"))


def standard_values(facts: ModelFacts) -> Pattern:
    return Pattern(Op("MatMul", Var("probs"), standard_head(Var("x"), facts, "v"), name="context_matmul"))


def scale_named_for_atc(name: str) -> bool:
    """Whether MulAddFusionPass would take a Mul of this name (the name test only)."""
    return SCALE_NAME_MARK in name


def standard_scale(facts: ModelFacts) -> Pattern:
    def named_for_atc(node: gs.Node) -> bool:
        return scale_named_for_atc(node.name)

    return Pattern(Op("Mul", Op("MatMul", _, _, name="scores"),
                      Const(1.0 / math.sqrt(facts.head_dim), rtol=1e-4),
                      name="scale", where=(named_for_atc, f"a name containing '{SCALE_NAME_MARK}'")))


def standard_context(facts: ModelFacts) -> Pattern:
    return Pattern(Op("Reshape", transpose(Op("MatMul", Var("probs"), _, name="context_matmul"), HEAD_PERM,
                                           "context_transpose"),
                      Const([-1, facts.hidden]), name="context_reshape"))


# ----------------------------------------------------------------------------- per block

@dataclass
class BlockNodes:
    """One attention block's landmarks, located leniently so that any export can be described."""

    softmax: gs.Node
    scores: gs.Tensor | None = None  # the scaled (or not) scores operand of the Add
    mask: gs.Tensor | None = None
    scores_matmul: gs.Node | None = None
    projection_input: gs.Tensor | None = None  # what the Q projection reads
    x: gs.Tensor | None = None  # the block input: the LayerNorm output (see block_input)


def attention_softmaxes(graph: gs.Graph) -> list[gs.Node]:
    """One Softmax per attention block: BERT-family encoders have no other."""
    return [node for node in graph.nodes if node.op == "Softmax"]


def check_blocks(graph: gs.Graph, facts: ModelFacts) -> list[BlockReport]:
    """Each attention block's six conditions. Needs the shapes inferred (graph.infer_shapes)."""
    reports = []
    for layer, softmax in enumerate(attention_softmaxes(graph)):
        block = locate_block(softmax)
        here = block_facts(facts, block)
        checks = [_check_2d(block, here), _check_consumers(block), _check_qkv(block, here, graph),
                  _check_scale(block, here, graph), _check_mask(block, here),
                  _check_context(block, here, graph)]
        reports.append(BlockReport(layer, softmax.name, checks))
    return reports


def block_facts(facts: ModelFacts, block: BlockNodes) -> ModelFacts:
    """The facts as this block sees them, from Q [rows, heads, seq, head_dim] of its Q.K^T MatMul where that
    shape is inferred: the model's in every block but where attention is windowed, as Swin's blocks attend
    within windows (each a row of the batch) and its stages widen."""
    matmul = block.scores_matmul
    query = list(matmul.inputs[0].shape or []) if matmul is not None else []
    if len(query) != 4 or not all(isinstance(d, int) and d > 0 for d in query):
        return facts
    rows, heads, seq, head_dim = query
    return replace(facts, batch=rows, seq=seq, hidden=heads * head_dim, heads=heads, head_dim=head_dim)


def locate_block(softmax: gs.Node) -> BlockNodes:
    """The block around `softmax`: scores, mask, scores MatMul, Q projection input, block input."""
    block = BlockNodes(softmax)
    add = producer(softmax.inputs[0])
    if add is None or add.op != "Add":
        return block
    for index, operand in enumerate(add.inputs):
        matmul = _scores_matmul(operand)
        if matmul is not None:
            block.scores, block.mask = operand, add.inputs[1 - index]
            block.scores_matmul = matmul
            break
    if block.scores_matmul is not None:
        block.projection_input = _projection_input(block.scores_matmul)
    if block.projection_input is not None:
        block.x = block_input(block.projection_input)
    return block


def _scores_matmul(tensor: gs.Tensor, depth: int = 3) -> gs.Node | None:
    """The MatMul of two computed tensors (Q and K) that `tensor` is, or is a scaling of."""
    node = producer(tensor)
    if node is None or depth == 0:
        return None
    if node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs):
        return node
    if node.op in ("Mul", "Div", "Cast"):
        return _scores_matmul(node.inputs[0], depth - 1) or (
            _scores_matmul(node.inputs[1], depth - 1) if len(node.inputs) > 1 else None)
    return None


def _projection_input(scores_matmul: gs.Node) -> gs.Tensor | None:
    """The data input of the nearest MatMul/Gemm with a constant weight above the Q side."""
    frontier = [scores_matmul.inputs[0]]
    for _depth in range(PROJECTION_SEARCH_DEPTH):
        parents = []
        for tensor in frontier:
            node = producer(tensor)
            if node is None:
                continue
            if node.op in ("MatMul", "Gemm") and isinstance(node.inputs[1], gs.Constant):
                return node.inputs[0]
            parents += [t for t in node.inputs if not isinstance(t, gs.Constant)]
        frontier = parents
    return None


def block_input(projection_input: gs.Tensor) -> gs.Tensor:
    """The block's input as the residual Add sees it, given what the Q projection reads.

    onnxsim flattens the tokens for the projections alone (``Reshape(x, [-1, hidden]) -> Gemm``)
    while the residual Add reads x: then x is the block input. A Reshape that is x's only reader
    is the one the standard form puts after a LayerNormalization op, and its output is the input.
    """
    node = producer(projection_input)
    if node is not None and is_token_flattening(node) and len(node.inputs[0].outputs) > 1:
        return node.inputs[0]
    return projection_input


def _check_2d(block: BlockNodes, facts: ModelFacts) -> Check:
    name = "2d-encoder"
    x = block.x
    if x is None:
        return Check(name, False, "cannot find the Q projection (a MatMul/Gemm with a constant weight) "
                                  f"above the scores of Softmax '{block.softmax.name}'")
    want = [facts.batch * facts.seq, facts.hidden] if facts.is_static else None
    if want is None:
        return Check(name, False, "the graph inputs are not static; ATC needs [batch*seq, hidden]")
    if list(x.shape or []) != want:
        return Check(name, False, f"the LayerNorm output '{x.name}' is {_shape(x)}, "
                                  f"not 2-D [batch*seq, hidden] = {want}")
    if x is not block.projection_input:
        return Check(name, False, f"Q/K/V read '{x.name}' through a Reshape, not directly")
    return Check(name, True, f"'{x.name}' is {want}")


def _check_consumers(block: BlockNodes) -> Check:
    name = "ln-consumers"
    x = block.x
    if x is None:
        return Check(name, False, "cannot find the LayerNorm output feeding Q/K/V")
    ops = sorted(node.op for node in x.outputs)
    listed = ", ".join(ops)
    if ops == ["Add", "MatMul", "MatMul", "MatMul"]:
        return Check(name, True, f"'{x.name}' feeds {listed}")
    return Check(name, False, f"'{x.name}' has {len(ops)} consumer(s) ({listed}); ATC wants {BLOCK_INPUT_READERS}: "
                              "the Q, K, V MatMuls and the residual Add")


def _check_qkv(block: BlockNodes, facts: ModelFacts, graph: gs.Graph) -> Check:
    name = "qkv-form"
    if block.scores_matmul is None:
        return Check(name, False, f"Softmax '{block.softmax.name}' does not read Add(MatMul(Q, K) ..., mask)")
    scores = standard_scores(facts)
    match = scores.match(block.scores_matmul, graph)
    if match is None:
        return Check(name, False, "Q/K: " + scores.explain(block.scores_matmul, graph))
    context = _context_matmul(block.softmax)
    if context is None:
        return Check(name, False, f"no MatMul reads Softmax '{block.softmax.name}' directly, so V "
                                  "cannot be checked")
    values = standard_values(facts)
    v_match = values.match(context, graph)
    if v_match is None:
        return Check(name, False, "V: " + values.explain(context, graph))
    if v_match["x"] is not match["x"]:
        return Check(name, False, f"V reads '{v_match['x'].name}', Q and K read '{match['x'].name}'")
    return Check(name, True, "Q, K, V in the standard form, K transposed in two steps")


def _context_matmul(softmax: gs.Node) -> gs.Node | None:
    probs = softmax.outputs[0]
    return next((n for n in probs.outputs if n.op == "MatMul" and n.inputs[0] is probs), None)


def _check_scale(block: BlockNodes, facts: ModelFacts, graph: gs.Graph) -> Check:
    name = "scale-mul"
    want = 1.0 / math.sqrt(facts.head_dim)
    node = producer(block.scores) if block.scores is not None else None
    if node is None:
        return Check(name, False, f"cannot find the scores added to the mask before Softmax "
                                  f"'{block.softmax.name}'")
    if node.op == "Div":
        return Check(name, False, f"the scale is Div '{node.name}'; ATC wants a Mul by {want:.6g} whose name "
                                  f"contains '{SCALE_NAME_MARK}'")
    if node.op == "MatMul":
        scaled = any(p is not None and p.op in ("Mul", "Div") for p in map(producer, node.inputs))
        found = "Q and K are scaled before the scores MatMul" if scaled else "the scores are not scaled"
        return Check(name, False, f"{found}; ATC wants one Mul by {want:.6g} after the MatMul")
    pattern = standard_scale(facts)
    if pattern.match(node, graph, allow_escape=True) is None:
        return Check(name, False, pattern.explain(node, graph, allow_escape=True))
    return Check(name, True, f"Mul '{node.name}' by {want:.6g}")


def _check_mask(block: BlockNodes, facts: ModelFacts) -> Check:
    name = "mask-shape"
    if block.mask is None:
        return Check(name, False, f"Softmax '{block.softmax.name}' does not read Add(scores, mask)")
    if not facts.is_static:
        return Check(name, False, "the graph inputs are not static; ATC needs [batch, 1, seq, seq]")
    want = [facts.batch, 1, facts.seq, facts.seq]
    if list(block.mask.shape or []) != want:
        return Check(name, False, f"the mask '{block.mask.name}' is {_shape(block.mask)}; only dim 1 may "
                                  f"broadcast: ATC wants {want}")
    return Check(name, True, f"the mask is {want}")


def _check_context(block: BlockNodes, facts: ModelFacts, graph: gs.Graph) -> Check:
    name = "context-reshape"
    reshape = context_reshape(block.softmax)
    if reshape is None:
        return Check(name, False, f"no Reshape within {CONTEXT_SEARCH_DEPTH} nodes after Softmax "
                                  f"'{block.softmax.name}'")
    pattern = standard_context(facts)
    match = pattern.match(reshape, graph)
    if match is None:
        return Check(name, False, pattern.explain(reshape, graph))
    if match["probs"] is not block.softmax.outputs[0]:
        return Check(name, False, f"the context MatMul reads '{match['probs'].name}', not the Softmax")
    return Check(name, True, f"Reshape '{reshape.name}' to [-1, {facts.hidden}]")


def _shape(tensor: gs.Tensor) -> str:
    return "of unknown shape" if tensor.shape is None else str(list(tensor.shape))
