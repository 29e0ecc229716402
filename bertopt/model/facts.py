"""ModelFacts: what the passes need to know about a model, detected once from its graph.

Sizes and input roles come from the graph's structure, not from names. Two facts come from
evaluating a small part of the graph (bertopt.graph.evaluate), since exporters spell them in many ways:

- `attention`: "causal" when the first attention layer, with every token kept by the attention
  mask, still removes exactly the positions after each query (a GPT-2-style decoder; `family` is
  then "gpt2"), else "bidirectional" (`family` "bert");
- `mask_kind`: "binary" when the attention-mask input keeps a token with 1 and removes it with 0
  (integer or float), "additive" when a float input is added to the scores as it is (0 keeps, a very
  negative value removes): its values reach the scores through reshaping ops and casts to float only.

Models whose attention bertopt cannot rewrite are refused with the mechanism in the way (relative
position scores, pooling between layers, convolution heads, rotary embeddings), not a generic line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph import static_dim
from bertopt.graph.evaluate import SubgraphEvaluator, input_dtype, value_dependents

ROLES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class ModelFacts:
    """What a pass may rely on about the model, read from the graph's structure (`detect_facts`), never
    from tensor names: its family and sizes, which input plays which role, its static batch and seq once
    frozen, opset, IR version, mask kind, attention direction and weight dtype."""

    family: str
    num_layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    type_vocab_size: int | None
    roles: dict[str, str] = field(default_factory=dict)  # graph input name -> role in ROLES
    batch: int | None = None
    seq: int | None = None
    opset: int = 0
    ir_version: int = 0
    mask_kind: str | None = None  # "binary" or "additive"; None without an attention-mask input
    attention: str = "bidirectional"  # or "causal"
    dtype: str = "float32"  # what the weights are stored in (the word embeddings'): "float16" after model.half()

    def input_for(self, role: str) -> str | None:
        """The graph input that plays `role`, or None when the model has no such input."""
        return next((name for name, r in self.roles.items() if r == role), None)

    @property
    def is_static(self) -> bool:
        return self.batch is not None and self.seq is not None

    def to_dict(self) -> dict:
        return asdict(self)

    def refreshed(self, graph: gs.Graph) -> "ModelFacts":
        """Passes change shapes and opsets, never the architecture: re-read only those."""
        batch, seq = static_dims(graph.inputs)
        return replace(self, batch=batch, seq=seq, opset=int(graph.opset),
                       ir_version=int(graph.ir_version or self.ir_version))


# An embedding lookup reads its indices straight from a graph input, possibly through these (XLM and
# FlauBERT slice the ids to the last `seq` columns, for their cache, before the lookup).
_PASS_THROUGH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Slice"}
_MAX_TYPE_VOCAB = 16  # token-type tables are tiny (BERT: 2); word tables have thousands of rows


def detect_facts(graph: gs.Graph) -> ModelFacts:
    """Detect what the passes need from the graph's structure (not from tensor names).

    Raises BertoptError when the graph is not a BERT-family encoder.
    """
    lookups = _embedding_lookups(graph)
    from_inputs = [(table, inp) for table, inp in lookups if inp is not None]
    if not from_inputs:
        raise BertoptError("not a BERT-family encoder: no embedding lookup reads a graph input")
    word_table, ids = max(from_inputs, key=lambda pair: pair[0].shape[0])
    roles = {ids.name: "input_ids"}
    type_table = _token_type_table(from_inputs, ids, roles)
    softmaxes = attention_layer_softmaxes(graph)
    obstacle = architecture_obstacle(graph, softmaxes)
    if obstacle:
        raise BertoptError(f"unsupported attention: {obstacle}")
    layers, heads_attr = _attention_layers(graph, softmaxes)
    if layers == 0:
        raise BertoptError("not a BERT-family encoder: no attention Softmax or Attention op found")
    _assign_mask_role(graph, roles)
    hidden = _attention_width(graph) or int(word_table.shape[1])
    head_dim = _head_dim(graph, hidden, heads_attr)
    batch, seq = static_dims(graph.inputs)
    mask = next((t for t in graph.inputs if roles.get(t.name) == "attention_mask"), None)
    max_positions = _max_positions(graph, lookups, int(word_table.shape[1]))
    attention = _attention_kind(graph, softmaxes, mask, roles, batch, seq, max_positions)
    return ModelFacts(
        family="gpt2" if attention == "causal" else "bert",
        num_layers=layers,
        hidden=hidden,
        heads=hidden // head_dim,
        head_dim=head_dim,
        vocab_size=int(word_table.shape[0]),
        max_positions=max_positions,
        type_vocab_size=int(type_table.shape[0]) if type_table is not None else None,
        roles=roles,
        batch=batch,
        seq=seq,
        opset=int(graph.opset),
        ir_version=int(graph.ir_version or 0),
        mask_kind=_mask_kind(mask) if mask is not None else None,
        attention=attention,
        dtype=np.dtype(word_table.dtype).name,
    )


def _embedding_lookups(graph: gs.Graph) -> list[tuple[gs.Constant, gs.Variable | None]]:
    """(table, graph input feeding the indices or None) for every Gather from a 2-D float table."""
    inputs = {t.name for t in graph.inputs}
    lookups = []
    for node in graph.nodes:
        if node.op != "Gather" or len(node.inputs) < 2:
            continue
        table = node.inputs[0]
        # shape and dtype, not values: reading .values would load the table and keep it loaded
        if isinstance(table, gs.Constant) and len(table.shape) == 2 and np.dtype(table.dtype).kind == "f":
            source = _trace_to_input(node.inputs[1], inputs)
            lookups.append((table, source))
    return lookups


def _trace_to_input(tensor: gs.Tensor, inputs: set[str]) -> gs.Variable | None:
    for _ in range(8):
        if tensor.name in inputs and not tensor.inputs:
            return tensor
        if not tensor.inputs or tensor.inputs[0].op not in _PASS_THROUGH:
            return None
        tensor = tensor.inputs[0].inputs[0]
    return None


def _token_type_table(from_inputs, ids, roles: dict[str, str]) -> gs.Constant | None:
    for table, source in from_inputs:
        if source is not ids and table.shape[0] <= _MAX_TYPE_VOCAB:
            roles[source.name] = "token_type_ids"
            return table
    return None


def _max_positions(graph: gs.Graph, lookups, width: int) -> int | None:
    """Position tables (as wide as the word table) are looked up by computed ids, not a graph input."""
    rows = [t.shape[0] for t, source in lookups if source is None and t.shape[1] == width]
    return int(max(rows)) - _position_offset(graph) if rows else None


def _position_offset(graph: gs.Graph) -> int:
    """RoBERTa numbers positions from padding_idx + 1 (cumsum of the mask, plus padding_idx), so
    its 514-row table holds 512 positions; BERT's positions start at 0."""
    for node in graph.nodes:
        if node.op != "Add":
            continue
        scalars = [t for t in node.inputs if isinstance(t, gs.Constant) and int(np.prod(t.shape)) == 1
                   and np.dtype(t.dtype).kind == "i"]
        others = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(scalars) == 1 and len(others) == 1 and _computed_by_cumsum(others[0]):
            return int(np.asarray(scalars[0].values).reshape(-1)[0]) + 1
    return 0


def _computed_by_cumsum(tensor: gs.Tensor, hops: int = 4) -> bool:
    if hops == 0 or not tensor.inputs:
        return False
    node = tensor.inputs[0]
    return node.op == "CumSum" or any(_computed_by_cumsum(t, hops - 1) for t in node.inputs
                                      if not isinstance(t, gs.Constant))


def attention_layer_softmaxes(graph: gs.Graph) -> list[gs.Node]:
    """The Softmaxes whose probabilities weight the values: they feed a MatMul or Einsum, possibly
    through SDPA's NaN guard, dropout, casts or a reshape to [batch*heads, seq, seq] (DeBERTa)."""
    return [n for n in graph.nodes if n.op == "Softmax" and _feeds_matmul(n)]


def _attention_layers(graph: gs.Graph, softmaxes: list[gs.Node]) -> tuple[int, int | None]:
    fused = [n for n in graph.nodes if n.op == "Attention"]
    if fused:
        return len(fused), fused[0].attrs.get("q_num_heads")
    return len(softmaxes), None


_SOFTMAX_TO_MATMUL = {"Where", "Dropout", "Cast", "Identity", "Reshape"}


def _feeds_matmul(node: gs.Node, depth: int = 3) -> bool:
    for consumer in (c for out in node.outputs for c in out.outputs):
        if consumer.op in ("MatMul", "Einsum"):
            return True
        if depth > 0 and consumer.op in _SOFTMAX_TO_MATMUL and _feeds_matmul(consumer, depth - 1):
            return True
    return False


def _assign_mask_role(graph: gs.Graph, roles: dict[str, str]) -> None:
    """The attention mask is the remaining [batch, seq] input (integer or float) reaching attention."""
    for tensor in graph.inputs:
        if tensor.name in roles or tensor.dtype is None or np.dtype(tensor.dtype).kind not in "iubf":
            continue
        if _reaches_attention(tensor) or "mask" in tensor.name:
            roles[tensor.name] = "attention_mask"
            return


def _reaches_attention(tensor: gs.Tensor, limit: int = 200) -> bool:
    seen, frontier = set(), [tensor]
    while frontier and len(seen) < limit:
        for node in frontier.pop().outputs:
            if node.op in ("Softmax", "Attention"):
                return True
            if id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.outputs)
    return False


# --------------------------------------------------------------------------- the mask's kind

# Ops that carry a mask's values to the scores unchanged (only reshaped, broadcast or widened), or
# clamp them (fold-attention-mask's Max(mask, -10000), Min with a causal mask): still additive.
_VALUE_PRESERVING = {"Unsqueeze", "Reshape", "Expand", "Identity", "Squeeze", "Flatten", "Slice", "Max", "Min"}


def _mask_kind(mask: gs.Tensor) -> str:
    """"additive" when a float mask's values reach an attention Add (or Attention op) unchanged."""
    if np.dtype(mask.dtype).kind != "f":
        return "binary"
    frontier, seen = [mask], set()
    while frontier:
        for node in frontier.pop().outputs:
            if node.op in ("Add", "Attention"):
                return "additive"
            widening = node.op == "Cast" and _casts_to_float(node)
            if (node.op in _VALUE_PRESERVING or widening) and id(node) not in seen:
                seen.add(id(node))
                frontier.append(node.outputs[0])
    return "binary"


def _casts_to_float(cast: gs.Node) -> bool:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(cast.attrs["to"])).kind == "f"


# --------------------------------------------------------------------------- causal attention

# A masked score is at or below this (exp(-1000) is 0 in fp32 and fp16 alike).
MASKED_AT_MOST = -1000.0
# Probe length for dynamic graphs: long enough for a triangle to be told from anything else.
PROBE_SEQ = 6


def _attention_kind(graph: gs.Graph, softmaxes: list[gs.Node], mask: gs.Tensor | None,
                    roles: dict[str, str], batch: int | None, seq: int | None,
                    max_positions: int | None) -> str:
    """"causal" when, with every token kept, the first layer still removes exactly the later positions.

    A mask that cannot be evaluated counts as bidirectional: fold-attention-mask then probes it as a
    padding mask, finds the positions it removes besides padding, and leaves it alone with a note.
    """
    fused = next((n for n in graph.nodes if n.op == "Attention"), None)
    if fused is not None:
        return "causal" if fused.attrs.get("is_causal", 0) else "bidirectional"
    if not softmaxes:
        return "bidirectional"
    tokens = [t for t in graph.inputs if roles.get(t.name) in ("input_ids", "token_type_ids")]
    removal = _score_removal(softmaxes[0], value_dependents(tokens))
    if removal is None:
        return "bidirectional"
    probe_batch, probe_seq = (batch, seq) if batch and seq else (1, min(PROBE_SEQ, max_positions or PROBE_SEQ))
    keep_all = {} if mask is None else {mask.name: np.full(
        (probe_batch, probe_seq), 0 if _mask_kind(mask) == "additive" else 1, dtype=input_dtype(mask))}
    try:
        removed = removal.removed(graph, probe_batch, probe_seq, keep_all)
    except BertoptError:
        return "bidirectional"
    later = np.triu(np.ones((probe_seq, probe_seq), dtype=bool), k=1)
    return "causal" if removed.shape[-2:] == later.shape and np.all(removed == later) else "bidirectional"


@dataclass
class _ScoreRemoval:
    """How an attention layer removes scores: `tensor` is an additive mask (very negative removes),
    or the condition of a Where that replaces the scores by a very negative fill (`removes_when`)."""

    tensor: gs.Tensor
    removes_when: bool | None = None  # None for an additive mask

    def removed(self, graph: gs.Graph, batch: int, seq: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Which positions are removed, broadcast to [.., seq, seq] and reduced over batch and heads."""
        value = SubgraphEvaluator(graph, [self.tensor], batch, seq).run(feeds)[self.tensor.name]
        removed = value <= MASKED_AT_MOST if self.removes_when is None else value == self.removes_when
        removed = np.broadcast_to(removed, np.broadcast_shapes(removed.shape, (1, 1, seq, seq)))
        return removed.reshape(-1, seq, seq).any(axis=0)


def _score_removal(softmax: gs.Node, token_dependent: set[int]) -> _ScoreRemoval | None:
    """The mask of an attention Softmax: the Add operand or Where condition that does not depend on
    the token inputs' values. None when the scores go in bare."""
    node = softmax.inputs[0].inputs[0] if softmax.inputs[0].inputs else None
    if node is not None and node.op == "Cast":  # XLM and GPT-2 in fp16 run the Softmax in fp32
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if node is None:
        return None
    free = [t for t in node.inputs if id(t) not in token_dependent]
    if node.op == "Add" and len(free) == 1 and len(node.inputs) == 2:
        return _ScoreRemoval(free[0])
    if node.op == "Where" and id(node.inputs[0]) not in token_dependent:
        fill = where_fill(node, lambda t: id(t) in token_dependent)
        if fill is not None:
            return _ScoreRemoval(node.inputs[0], removes_when=fill == 1)
    return None


def where_fill(where: gs.Node, is_scores: Callable[[gs.Tensor], bool]) -> int | None:
    """1 or 2: the branch of ``Where(condition, a, b)`` that is a very negative constant fill (at most
    MASKED_AT_MOST, masked_fill's finfo.min) beside scores (`is_scores`), or None."""
    for index in (1, 2):
        fill = where.inputs[index]
        if (isinstance(fill, gs.Constant) and fill.values.size == 1 and fill.values.dtype.kind == "f"
                and float(fill.values.reshape(-1)[0]) <= MASKED_AT_MOST and is_scores(where.inputs[3 - index])):
            return index
    return None


# --------------------------------------------------------------------------- what bertopt cannot rewrite

def architecture_obstacle(graph: gs.Graph, softmaxes: list[gs.Node]) -> str | None:
    """The mechanism that puts a model's attention outside the form bertopt rewrites, or None.

    Each is recognised by the ops it needs, which plain BERT-family encoders never contain.
    """
    ops = {node.op for node in graph.nodes}
    if ops & {"AveragePool", "MaxPool"}:
        return ("pooling between layers (Funnel Transformer): the sequence is pooled from block to block, "
                "so attention layers differ in length")
    if "Conv" in ops:
        # SqueezeBERT's heads are views of a Conv output; ConvBERT's self-attention heads are MatMul + Add
        if all(_computed_by(m.inputs[0], "Conv", depth=3) for s in softmaxes for m in _scores_matmuls(s)):
            return "Q, K and V are grouped Conv1d projections (SqueezeBERT), not MatMul + Add"
        return ("span-based dynamic convolution heads (ConvBERT): Conv ops and a Softmax over convolution "
                "kernels beside the self-attention heads")
    if "GatherElements" in ops and any(_computed_by(s.inputs[0], "GatherElements") for s in softmaxes):
        return ("disentangled attention (DeBERTa): content-to-position and position-to-content scores, "
                "gathered by relative position, are added to Q.K^T")
    if {"Sin", "Cos"} <= ops:
        return ("rotary position embeddings (Q and K rotated by sin/cos before the scores)"
                + (" and a fused Wqkv projection split into Q, K and V" if "Split" in ops else ""))
    return None


def _scores_matmuls(softmax: gs.Node, depth: int = 4) -> list[gs.Node]:
    found, frontier = [], [softmax]
    for _ in range(depth):
        parents = [t.inputs[0] for node in frontier for t in node.inputs if t.inputs]
        found += [p for p in parents if p.op == "MatMul"]
        frontier = [p for p in parents if p.op != "MatMul"]
    return found


def _computed_by(tensor: gs.Tensor, op: str, depth: int = 8) -> bool:
    """Whether an `op` node lies within `depth` producers above `tensor`."""
    frontier = [tensor]
    for _ in range(depth):
        nodes = [t.inputs[0] for t in frontier if t.inputs]
        if any(node.op == op for node in nodes):
            return True
        frontier = [t for node in nodes for t in node.inputs if not isinstance(t, gs.Constant)]
    return False


def _attention_width(graph: gs.Graph) -> int | None:
    """The width the Q/K/V projections read, from the weight of the first attention input projection.

    It is the hidden size even where the embeddings are narrower (ALBERT projects 128 -> 768).
    """
    for node in graph.nodes:
        if node.op in ("Softmax", "Attention"):
            return _projection_width(node)
    return None


def _projection_width(attention: gs.Node, depth: int = 12) -> int | None:
    """Breadth-first up from the attention op to the nearest MatMul/Gemm with a 2-D constant weight."""
    frontier, seen = [attention], set()
    for _ in range(depth):
        parents = []
        for node in frontier:
            for tensor in (t for t in node.inputs if not isinstance(t, gs.Constant) and t.inputs):
                parent = tensor.inputs[0]
                width = _weight_width(parent)
                if width is not None:
                    return width
                if id(parent) not in seen:
                    seen.add(id(parent))
                    parents.append(parent)
        frontier = parents
    return None


def _weight_width(node: gs.Node) -> int | None:
    """The input width of a projection: a fused QKV (GPT-2) is 3 x hidden wide, but reads hidden."""
    if node.op not in ("MatMul", "Gemm"):
        return None
    weights = [t for t in node.inputs if isinstance(t, gs.Constant) and len(t.shape) == 2]
    if not weights:
        return None
    shape = weights[0].shape
    return int(shape[1] if node.attrs.get("transB") else shape[0])


def _head_dim(graph: gs.Graph, hidden: int, heads_attr: int | None) -> int:
    """Head size from the [.., heads, head_dim] Reshape that feeds the Q/K/V head Transposes."""
    if heads_attr:
        return hidden // int(heads_attr)
    for node in graph.nodes:
        if node.op == "Transpose" and list(node.attrs.get("perm", [])) in ([0, 2, 1, 3], [0, 2, 3, 1]):
            dims = _reshape_target(node.inputs[0])
            if dims and dims[-1] > 0 and hidden % dims[-1] == 0:
                return int(dims[-1])
    raise BertoptError("not a BERT-family encoder: cannot find the attention head reshape")


def _reshape_target(tensor: gs.Tensor) -> list[int] | None:
    """The constant target dims of the Reshape producing `tensor` (-1 for a computed dim)."""
    if not tensor.inputs or tensor.inputs[0].op != "Reshape":
        return None
    shape = tensor.inputs[0].inputs[1]
    if isinstance(shape, gs.Constant):
        return [int(v) for v in shape.values.reshape(-1)]
    if shape.inputs and shape.inputs[0].op == "Concat":
        return [int(p.values.reshape(-1)[0]) if isinstance(p, gs.Constant) and p.values.size == 1 else -1
                for p in shape.inputs[0].inputs]
    return None


def static_dims(inputs: list[gs.Tensor]) -> tuple[int | None, int | None]:
    """(batch, seq) when every [batch, seq] input has the same static shape, else (None, None)."""
    shapes = {tuple(t.shape) for t in inputs if t.shape is not None and len(t.shape) == 2}
    if len(shapes) != 1:
        return None, None
    batch, seq = next(iter(shapes))
    static = static_dim(batch) and static_dim(seq) and batch > 0 and seq > 0
    return (batch, seq) if static else (None, None)


def check_shape(facts: ModelFacts, batch: int, seq: int) -> None:
    """Refuse shapes the model cannot run at (one clear line, before any work is done)."""
    if batch <= 0 or seq <= 0:
        raise BertoptError(f"batch and seq must be positive (got batch {batch}, seq {seq})")
    if facts.max_positions is not None and seq > facts.max_positions:
        raise BertoptError(f"seq {seq} exceeds the model's {facts.max_positions} position embeddings")
    if facts.is_static and (facts.batch, facts.seq) != (batch, seq):
        raise BertoptError(f"the model is already static at batch {facts.batch}, seq {facts.seq}; "
                           f"it cannot be frozen at batch {batch}, seq {seq} (give the dynamic export)")
