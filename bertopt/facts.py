"""ModelFacts: what the passes need to know about a model, detected once from its graph."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError

ROLES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class ModelFacts:
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


# An embedding lookup reads its indices straight from a graph input, possibly through these.
_PASS_THROUGH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}
_INT_DTYPES = {np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.bool_)}
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
    layers, heads_attr = _attention_layers(graph)
    if layers == 0:
        raise BertoptError("not a BERT-family encoder: no attention Softmax or Attention op found")
    _assign_mask_role(graph, roles)
    hidden = _attention_width(graph) or int(word_table.shape[1])
    head_dim = _head_dim(graph, hidden, heads_attr)
    batch, seq = static_dims(graph.inputs)
    return ModelFacts(
        family="bert",
        num_layers=layers,
        hidden=hidden,
        heads=hidden // head_dim,
        head_dim=head_dim,
        vocab_size=int(word_table.shape[0]),
        max_positions=_max_positions(graph, lookups, int(word_table.shape[1])),
        type_vocab_size=int(type_table.shape[0]) if type_table is not None else None,
        roles=roles,
        batch=batch,
        seq=seq,
        opset=int(graph.opset),
        ir_version=int(graph.ir_version or 0),
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


def _attention_layers(graph: gs.Graph) -> tuple[int, int | None]:
    fused = [n for n in graph.nodes if n.op == "Attention"]
    if fused:
        return len(fused), fused[0].attrs.get("q_num_heads")
    return sum(1 for n in graph.nodes if n.op == "Softmax" and _feeds_matmul(n)), None


# Between the attention Softmax and its MatMul with V: SDPA's NaN guard, dropout, casts.
_SOFTMAX_TO_MATMUL = {"Where", "Dropout", "Cast", "Identity"}


def _feeds_matmul(node: gs.Node, depth: int = 3) -> bool:
    for consumer in (c for out in node.outputs for c in out.outputs):
        if consumer.op == "MatMul":
            return True
        if depth > 0 and consumer.op in _SOFTMAX_TO_MATMUL and _feeds_matmul(consumer, depth - 1):
            return True
    return False


def _assign_mask_role(graph: gs.Graph, roles: dict[str, str]) -> None:
    """The attention mask is the remaining integer input that reaches an attention Softmax."""
    for tensor in graph.inputs:
        if tensor.name in roles or np.dtype(tensor.dtype) not in _INT_DTYPES:
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


def _attention_width(graph: gs.Graph) -> int | None:
    """The width of the Q/K/V projections, from the weight of the first attention input projection.

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
    if node.op not in ("MatMul", "Gemm"):
        return None
    weights = [t for t in node.inputs if isinstance(t, gs.Constant) and len(t.shape) == 2]
    if not weights:
        return None
    shape = weights[0].shape
    return int(shape[0] if node.attrs.get("transB") else shape[1])


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
    static = isinstance(batch, int) and isinstance(seq, int) and batch > 0 and seq > 0
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
