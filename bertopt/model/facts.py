"""ModelFacts: what the passes need to know about a model, detected once from its graph.

Sizes and input roles come from the graph's structure, not from names. A model is a transformer when
it has attention blocks (Softmax probabilities weighting the values, or ONNX Attention ops); its
inputs get their roles by use:

- `input_ids`: the indices of a Gather into the largest float embedding table; `token_type_ids`: a
  graph input indexing a table of at most 16 rows; `position_ids`: one indexing any other table;
- `pixel_values`: a 4-D float input read by a Conv (ViT's, DeiT's and CLIP's patch embedding);
  `input_features`: a 3-D float input read by a Conv (Whisper's Conv1d front end, exported as Conv);
- `attention_mask`: the remaining integer or float input that reaches attention.

The family is named by structure (`family_of`): vision models by their window partition (Swin), their
prepended tokens (DeiT has a class and a distillation token) and CLIP's quick_gelu or pre-encoder
LayerNorm; Whisper's encoder by its audio front end; T5's encoder by RMSNorm and its relative position
bias; causal models as CLIP's text tower (quick_gelu, end-of-text pooling by ArgMax) or GPT-2; BART's
encoder by its positions, counted from 2 (`_position_numbering`); every other text encoder as "bert".

Two facts come from evaluating a small part of the graph (bertopt.graph.evaluate), since exporters
spell them in many ways:

- `attention`: "causal" when the first attention layer, with every token kept by the attention
  mask, still removes exactly the positions after each query (GPT-2, CLIP's text tower), else
  "bidirectional";
- `mask_kind`: "binary" when the attention-mask input keeps a token with 1 and removes it with 0
  (integer or float), "additive" when a float input is added to the scores as it is (0 keeps, a very
  negative value removes): its values reach the scores through reshaping ops and casts to float only.

Models whose attention bertopt cannot rewrite are refused with the mechanism in the way (relative
position scores, pooling between layers, convolution heads, rotary embeddings), not a generic line.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph import is_static, static_dim
from bertopt.graph.evaluate import SubgraphEvaluator, input_dtype, value_dependents

ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "input_features")
TOKEN_ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")  # [batch, seq] inputs
# What a model reads, by the role of its content input.
MODALITIES = {"pixel_values": "image", "input_features": "audio"}
FAMILIES = ("bert", "bart-encoder", "gpt2", "clip-text", "t5-encoder", "vit", "deit", "clip-vision", "swin",
            "whisper-encoder")


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
    vocab_size: int | None  # None for models without token inputs (images, audio)
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
    norm: str = "layernorm"  # or "rmsnorm" (T5: no mean subtracted, no beta)
    norm_position: str = "post"  # "pre": each block normalises its input and adds the residual unnormalised
    # "causal", "relative-bias" (T5: a learned bias by relative position), or "windowed" (Swin: attention within
    # windows of patches, a relative position bias added)
    attention_kind: str = "standard"
    image_size: tuple[int, int] | None = None  # [height, width] of pixel_values where static
    frames: int | None = None  # the frames of input_features where static

    @property
    def modality(self) -> str:
        """"text", "image" or "audio": what the model's content input is."""
        return next((MODALITIES[r] for r in self.roles.values() if r in MODALITIES), "text")

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
        batch, seq = static_batch_seq(graph, self.roles)
        image_size, frames = content_dims(graph, self.roles)
        return replace(self, batch=batch, seq=seq, opset=int(graph.opset), image_size=image_size, frames=frames,
                       ir_version=int(graph.ir_version or self.ir_version))


# An embedding lookup reads its indices straight from a graph input, possibly through these (XLM and
# FlauBERT slice the ids to the last `seq` columns, for their cache, before the lookup).
_PASS_THROUGH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Slice"}
_MAX_TYPE_VOCAB = 16  # token-type tables are tiny (BERT: 2); word tables have thousands of rows


def detect_facts(graph: gs.Graph) -> ModelFacts:
    """Detect what the passes need from the graph's structure (not from tensor names).

    Raises BertoptError when the graph is not a transformer bertopt can rewrite.
    """
    lookups = _embedding_lookups(graph)
    from_inputs = [(table, inp) for table, inp in lookups if inp is not None]
    roles = _content_roles(graph)
    word_table = type_table = None
    if from_inputs:
        word_table, ids = max(from_inputs, key=lambda pair: pair[0].shape[0])
        roles[ids.name] = "input_ids"
        type_table = _token_type_table(from_inputs, ids, roles)
        _position_roles(from_inputs, roles)
    elif not roles:
        raise BertoptError("not a transformer bertopt knows: no embedding lookup reads a graph input, and no "
                           "Conv reads image (pixel_values) or audio (input_features) inputs")
    softmaxes = attention_layer_softmaxes(graph)
    obstacle = architecture_obstacle(graph, softmaxes, roles)
    if obstacle:
        raise BertoptError(f"unsupported attention: {obstacle}")
    layers, heads_attr = _attention_layers(graph, softmaxes)
    if layers == 0:
        raise BertoptError("not a transformer bertopt knows: no attention Softmax or Attention op found")
    _refuse_cache_inputs(graph, roles)
    _assign_mask_role(graph, roles)
    hidden = _attention_width(graph) or _embedding_width(graph, word_table)
    head_dim = _head_dim(graph, hidden, heads_attr)
    batch, seq = static_batch_seq(graph, roles, softmaxes)
    mask = next((t for t in graph.inputs if roles.get(t.name) == "attention_mask"), None)
    first_position, counted_by = _position_numbering(graph)
    max_positions = (_max_positions(lookups, int(word_table.shape[1]), first_position)
                     if word_table is not None else None)
    attention = _attention_kind(graph, softmaxes, mask, roles, batch, seq, max_positions)
    heads = hidden // head_dim
    relative = _relative_position_bias(lookups, heads, softmaxes)
    windowed = _window_partition(graph)
    norm, position = norm_placement(graph, softmaxes)
    image_size, frames = content_dims(graph, roles)
    return ModelFacts(
        family=family_of(graph, roles, attention, relative, norm, counted_by, windowed),
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        vocab_size=int(word_table.shape[0]) if word_table is not None else None,
        max_positions=max_positions,
        type_vocab_size=int(type_table.shape[0]) if type_table is not None else None,
        roles=roles,
        batch=batch,
        seq=seq,
        opset=int(graph.opset),
        ir_version=int(graph.ir_version or 0),
        mask_kind=_mask_kind(mask) if mask is not None else None,
        attention=attention,
        dtype=_weights_dtype(graph, word_table),
        norm=norm,
        norm_position=position,
        attention_kind=("windowed" if windowed else "relative-bias" if relative else
                        "causal" if attention == "causal" else "standard"),
        image_size=image_size,
        frames=frames,
    )


# --------------------------------------------------------------------------- inputs by use

_CONTENT_RANKS = {4: "pixel_values", 3: "input_features"}  # Conv2d over images, Conv1d over log-mel frames


def _content_roles(graph: gs.Graph) -> dict[str, str]:
    """Float inputs a Conv reads as its data: images ([batch, channels, height, width]) or audio
    features ([batch, mel bins, frames])."""
    roles = {}
    for tensor in graph.inputs:
        if tensor.dtype is None or np.dtype(tensor.dtype).kind != "f" or tensor.shape is None:
            continue
        role = _CONTENT_RANKS.get(len(tensor.shape))
        if role and any(_reads_as_data(node, tensor) for node in tensor.outputs):
            roles[tensor.name] = role
    return roles


def content_shape(graph: gs.Graph) -> tuple[str, int | None]:
    """What the model's content input is, read from the graph alone: ("text", None), ("image", its side) or
    ("audio", its frames), the size None where it is not static (a run names its output folder by it)."""
    roles = _content_roles(graph)
    image, frames = content_dims(graph, roles)
    modality = next((MODALITIES[role] for role in roles.values()), "text")
    return modality, image[0] if image else frames


def _reads_as_data(node: gs.Node, tensor: gs.Tensor, depth: int = 3) -> bool:
    if node.op == "Conv":
        return node.inputs[0] is tensor
    if depth and node.op in ("Cast", "Identity"):
        return any(_reads_as_data(reader, node.outputs[0], depth - 1) for reader in node.outputs[0].outputs)
    return False


def content_dims(graph: gs.Graph, roles: dict[str, str]) -> tuple[tuple[int, int] | None, int | None]:
    """(image [height, width], audio frames) of the content input, where static."""
    for tensor in graph.inputs:
        role = roles.get(tensor.name)
        dims = list(tensor.shape or [])
        if role == "pixel_values" and all(static_dim(d) and d > 0 for d in dims[2:4]):
            return (int(dims[2]), int(dims[3])), None
        if role == "input_features" and static_dim(dims[-1]) and dims[-1] > 0:
            return None, int(dims[-1])
    return None, None


def _position_roles(from_inputs, roles: dict[str, str]) -> None:
    """A graph input indexing any other table holds positions (users' exports with position_ids)."""
    for _, source in from_inputs:
        roles.setdefault(source.name, "position_ids")


def _refuse_cache_inputs(graph: gs.Graph, roles: dict[str, str]) -> None:
    """Float inputs of rank 4 beside token ids are a decoder's key/value cache: not something to freeze."""
    for tensor in graph.inputs:
        if (tensor.name not in roles and tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f"
                and tensor.shape is not None and len(tensor.shape) == 4):
            raise BertoptError(f"input {tensor.name} is a key/value cache (past_key_values): export the model "
                               "without its cache (use_cache=False)")


def _embedding_width(graph: gs.Graph, word_table: gs.Constant | None) -> int:
    if word_table is not None:
        return int(word_table.shape[1])
    conv = next(n for n in graph.nodes if n.op == "Conv")
    return int(conv.inputs[1].shape[0])


def _weights_dtype(graph: gs.Graph, word_table: gs.Constant | None) -> str:
    """The word embeddings' dtype, or the first Conv's weights' for image and audio models."""
    if word_table is None:
        conv = next(n for n in graph.nodes if n.op == "Conv")
        return np.dtype(conv.inputs[1].dtype).name
    return np.dtype(word_table.dtype).name


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


def _max_positions(lookups, width: int, first_position: int) -> int | None:
    """Position tables (as wide as the word table) are looked up by computed ids, not a graph input."""
    rows = [t.shape[0] for t, source in lookups if source is None and t.shape[1] == width]
    return int(max(rows)) - first_position if rows else None


def _position_numbering(graph: gs.Graph) -> tuple[int, str | None]:
    """The id of the first position and what counts them, where it is not BERT's (0, None): RoBERTa's
    are the cumsum of the mask plus padding_idx, from padding_idx + 1 ("mask"); BART's a Range plus
    BartLearnedPositionalEmbedding.offset, 2 ("range"). Their position tables hold that many more rows
    than positions."""
    for node in graph.nodes:
        if node.op != "Add":
            continue
        scalars = [t for t in node.inputs if isinstance(t, gs.Constant) and int(np.prod(t.shape)) == 1
                   and np.dtype(t.dtype).kind == "i"]
        others = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(scalars) != 1 or len(others) != 1:
            continue
        start = int(np.asarray(scalars[0].values).reshape(-1)[0])
        if _computed_by(others[0], "CumSum", depth=4):
            return start + 1, "mask"
        if start > 0 and _computed_by(others[0], "Range", depth=4) and _indexes_a_table(node.outputs[0]):
            return start, "range"
    return 0, None


def _indexes_a_table(ids: gs.Tensor) -> bool:
    return any(reader.op == "Gather" and reader.inputs[1] is ids and isinstance(reader.inputs[0], gs.Constant)
               for reader in ids.outputs)


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
        try:
            removed = np.broadcast_to(removed, np.broadcast_shapes(removed.shape, (1, 1, seq, seq)))
        except ValueError:  # a constant of another length than the probe's (a per-head bias), not a mask
            raise BertoptError(f"'{self.tensor.name}' is {list(value.shape)}: "
                               f"no mask of [{seq}, {seq}] scores") from None
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

def architecture_obstacle(graph: gs.Graph, softmaxes: list[gs.Node], roles: dict[str, str] | None = None) -> str | None:
    """The mechanism that puts a model's attention outside the form bertopt rewrites, or None.

    Each is recognised by the ops it needs, which plain BERT-family encoders never contain. The Convs
    of an image or audio front end (those reached from its input before any MatMul) are no obstacle.
    """
    front_end = _front_end(graph, roles or {})
    ops = {node.op for node in graph.nodes if id(node) not in front_end}
    if ops & {"AveragePool", "MaxPool"}:
        return ("pooling between layers (Funnel Transformer, CANINE's downsampling): the sequence is pooled "
                "from block to block, so attention layers differ in length")
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


def _front_end(graph: gs.Graph, roles: dict[str, str]) -> set[int]:
    """The nodes between a content input (pixel_values, input_features) and the first MatMul."""
    frontier = [t for t in graph.inputs if roles.get(t.name) in MODALITIES]
    seen: set[int] = set()
    while frontier:
        for node in frontier.pop().outputs:
            if node.op not in ("MatMul", "Gemm", "Softmax") and id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.outputs)
    return seen


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
    head_dims = []
    for node in graph.nodes:
        if node.op == "Transpose" and list(node.attrs.get("perm", [])) in ([0, 2, 1, 3], [0, 2, 3, 1]):
            dims = _reshape_target(node.inputs[0])
            if dims and dims[-1] > 0 and hidden % dims[-1] == 0:
                return int(dims[-1])
            if dims and dims[-1] > 0:
                head_dims.append(int(dims[-1]))
    if head_dims:  # T5-11B: 128 heads of d_kv 128 over d_model 1024
        raise BertoptError(f"unsupported attention: heads of {head_dims[0]} do not divide the hidden size "
                           f"{hidden} (Q, K, V project to another width); bertopt's passes need heads x head "
                           "size = hidden")
    raise BertoptError("not a transformer bertopt knows: cannot find the attention head reshape")


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


def static_batch_seq(graph: gs.Graph, roles: dict[str, str],
                     softmaxes: list[gs.Node] | None = None) -> tuple[int | None, int | None]:
    """(batch, seq) of a static model: token models from their [batch, seq] inputs; image and audio models
    take batch from their content input and seq (the tokens attention sees: ViT-B/16 at 224 has 197) from
    the attention probabilities' inferred shape."""
    if not any(role in MODALITIES for role in roles.values()):
        return static_dims([t for t in graph.inputs if t.name in roles])
    content = next(t for t in graph.inputs if roles.get(t.name) in MODALITIES)
    batch = content.shape[0] if content.shape else None
    if not static_dim(batch) or batch <= 0 or not is_static(content):
        return None, None
    probabilities = [s.outputs[0].shape for s in (softmaxes if softmaxes is not None
                                                   else attention_layer_softmaxes(graph))]
    seq = probabilities[0][-1] if probabilities and probabilities[0] else None
    return (batch, int(seq)) if static_dim(seq) and seq > 0 else (batch, None)


def check_shape(facts: ModelFacts, batch: int, seq: int) -> None:
    """Refuse shapes the model cannot run at (one clear line, before any work is done).

    Image and audio models take their tokens from the image or the frames: `seq` does not apply to them.
    """
    if batch <= 0 or seq <= 0:
        raise BertoptError(f"batch and seq must be positive (got batch {batch}, seq {seq})")
    refuse_beyond_memory(facts, batch, seq)
    if facts.modality != "text":
        if facts.is_static and facts.batch != batch:
            raise BertoptError(f"the model is already static at batch {facts.batch}; it cannot be frozen at "
                               f"batch {batch} (give the dynamic export)")
        return
    if facts.max_positions is not None and seq > facts.max_positions:
        raise BertoptError(f"seq {seq} exceeds the model's {facts.max_positions} position embeddings")
    if facts.is_static and (facts.batch, facts.seq) != (batch, seq):
        raise BertoptError(f"the model is already static at batch {facts.batch}, seq {facts.seq}; "
                           f"it cannot be frozen at batch {batch}, seq {seq} (give the dynamic export)")


def refuse_beyond_memory(facts: ModelFacts, batch: int, seq: int) -> None:
    """Refuse (one line) a shape whose one batch cannot fit in this machine's memory on ONNX Runtime, before
    anything is allocated: every command that optimizes or validates runs the model here once."""
    tokens = seq if facts.modality == "text" else (facts.seq or seq)
    needed, available = activation_bytes(facts, batch, tokens), _memory_available()
    if needed > available:
        raise BertoptError(f"batch {batch}, seq {tokens}: one batch needs at least {needed / 2**30:.3g} GiB "
                           f"on ONNX Runtime (one layer's attention scores and feed-forward activations, fp32), "
                           f"more than the {available / 2**30:.3g} GiB available here")


def activation_bytes(facts: ModelFacts, batch: int, tokens: int) -> int:
    """A lower bound of one batch's memory: one layer's attention scores (batch x heads x tokens x tokens)
    and feed-forward activations (batch x tokens x 4 hidden, BERT's intermediate size), fp32."""
    return 4 * batch * tokens * (max(facts.heads, 1) * tokens + 4 * max(facts.hidden, 1))


def _memory_available() -> int:
    """Physical memory, or the address-space limit of this process where that is lower (the fuzzer sets one)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return physical if limit == resource.RLIM_INFINITY else min(physical, limit)


# --------------------------------------------------------------------------- norms, bias, family

# Ops a normalisation is made of, walked up from its output; a residual Add (two computed operands) ends it.
_NORM_OPS = {"Add", "Mul", "Div", "Sqrt", "Pow", "ReduceMean", "Sub", "Cast", "Reciprocal"}
_WHOLE_NORMS = {"LayerNormalization": "layernorm", "SimplifiedLayerNormalization": "rmsnorm",
                "RMSNormalization": "rmsnorm", "SkipLayerNormalization": "layernorm",
                "SkipSimplifiedLayerNormalization": "rmsnorm"}
# Ops between a projection and the attention scores: heads split, scaled, biased, a fused QKV split.
_TO_PROJECTION = {"Transpose", "Reshape", "Mul", "Div", "Add", "Split", "Slice", "Squeeze", "Unsqueeze", "Cast",
                  "Identity", "Gather"}


def norm_kind(tensor: gs.Tensor, depth: int = 12) -> str | None:
    """"layernorm" or "rmsnorm" when `tensor` is a normalisation's output (a whole op, or decomposed:
    a mean of squares, with the mean subtracted first for LayerNorm), else None."""
    frontier, ops = [tensor], set()
    for _ in range(depth):
        nodes = [t.inputs[0] for t in frontier if t.inputs]
        for node in nodes:
            if node.op in _WHOLE_NORMS:
                return _WHOLE_NORMS[node.op]
        nodes = [n for n in nodes if n.op in _NORM_OPS and not _is_residual_add(n)]
        ops |= {n.op for n in nodes}
        frontier = [t for n in nodes for t in n.inputs if not _constant_like(t)]
    if "ReduceMean" not in ops:
        return None
    return "layernorm" if "Sub" in ops else "rmsnorm"


def _is_residual_add(node: gs.Node) -> bool:
    return node.op == "Add" and not any(_constant_like(t) for t in node.inputs)


def _projection_input(softmax: gs.Node) -> gs.Tensor | None:
    """What the first block's query projection reads: up from its scores through head reshapes, scales,
    biases and a fused QKV split to the first MatMul/Gemm with a constant weight."""
    matmuls = _scores_matmuls(softmax)
    frontier = [matmuls[0].inputs[0]] if matmuls else []
    for _ in range(10):
        nodes = [t.inputs[0] for t in frontier if t.inputs]
        for node in nodes:
            if node.op in ("MatMul", "Gemm") and any(_constant_like(t) for t in node.inputs[1:]):
                return _unflattened(node.inputs[0])
        frontier = [t for n in nodes if n.op in _TO_PROJECTION for t in n.inputs if not _constant_like(t)]
    return None


def _unflattened(tensor: gs.Tensor) -> gs.Tensor:
    """Above the Reshape to [tokens, hidden] that GPT-2's Conv1D (a Gemm) and 2-D encoders read through, and
    above Swin's window partition (Reshape, Pad, Transpose)."""
    while tensor.inputs and tensor.inputs[0].op in ("Reshape", "Flatten", "Identity", "Cast", "Pad", "Transpose"):
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _constant_like(tensor: gs.Tensor) -> bool:
    """A constant, or the legacy exporter's Identity of one (weights shared or renamed)."""
    while tensor.inputs and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return isinstance(tensor, gs.Constant)


def norm_placement(graph: gs.Graph, softmaxes: list[gs.Node]) -> tuple[str, str]:
    """(norm kind, "pre" or "post") from the first attention block: post-norm blocks (BERT) read a
    normalised stream that the residual Add reads too; pre-norm blocks (ViT, GPT-2, T5) normalise a
    copy of the stream for attention and add the residual to the stream itself."""
    x = _projection_input(softmaxes[0]) if softmaxes else None
    kind = norm_kind(x) if x is not None else None
    if x is None or kind is None:
        return "layernorm", "post"
    residual = any(_is_residual_add(reader) for reader in x.outputs)
    return kind, "post" if residual else "pre"


def _relative_position_bias(lookups, heads: int, softmaxes: list[gs.Node]) -> bool:
    """T5's bias: a [buckets, heads] table looked up by computed relative positions, added to the scores."""
    return bool(softmaxes) and any(source is None and len(table.shape) == 2 and table.shape[1] == heads
                                   and table.shape[0] != heads for table, source in lookups)


def _window_partition(graph: gs.Graph) -> bool:
    """Swin's window_partition (transformers' modeling_swin, swinv2): [batch, h/w, w, w/w, w, channels]
    transposed (2, 3) into windows of patches; no other transformer here has a 6-D Transpose."""
    return any(node.op == "Transpose" and list(node.attrs.get("perm", [])) == [0, 1, 3, 2, 4, 5]
               for node in graph.nodes)


def family_of(graph: gs.Graph, roles: dict[str, str], attention: str, relative: bool, norm: str,
              positions_counted_by: str | None, windowed: bool) -> str:
    """The family, named by what the graph is made of (module docstring), never by tensor names."""
    ops = {node.op for node in graph.nodes}
    quick_gelu = "Sigmoid" in ops and any(_is_quick_gelu(node) for node in graph.nodes if node.op == "Sigmoid")
    modality = next((MODALITIES[r] for r in roles.values() if r in MODALITIES), "text")
    if modality == "audio":
        return "whisper-encoder"
    if modality == "image":
        if windowed:
            return "swin"
        if _prepended_tokens(graph) >= 2:
            return "deit"
        return "clip-vision" if quick_gelu or _normalised_before_blocks(graph) else "vit"
    if relative or norm == "rmsnorm":
        return "t5-encoder"
    if attention == "causal":
        return "clip-text" if quick_gelu or "ArgMax" in ops else "gpt2"
    return "bart-encoder" if positions_counted_by == "range" else "bert"


QUICK_GELU_ALPHA = 1.702  # bertopt.model.forms.quick_gelu_pattern (forms imports the pattern layer facts does not)


def _is_quick_gelu(sigmoid: gs.Node) -> bool:
    """x * sigmoid(1.702 x) (CLIP's quick_gelu): the Sigmoid reads Mul(x, 1.702) and is multiplied by x."""
    scaled = sigmoid.inputs[0].inputs[0] if sigmoid.inputs[0].inputs else None
    if scaled is None or scaled.op != "Mul":
        return False
    constants = [t for t in scaled.inputs if isinstance(t, gs.Constant) and t.values.size == 1]
    if not constants or abs(float(constants[0].values.reshape(-1)[0]) - QUICK_GELU_ALPHA) > 1e-3:
        return False
    x = next((t for t in scaled.inputs if not isinstance(t, gs.Constant)), None)
    return any(reader.op == "Mul" and x in reader.inputs for reader in sigmoid.outputs[0].outputs)


def _prepended_tokens(graph: gs.Graph) -> int:
    """Tokens concatenated before the patches (ViT, CLIP: a class token; DeiT: class and distillation)."""
    for node in graph.nodes:
        # the token axis of [batch, tokens, hidden] (shape arithmetic concatenates on axis 0)
        if node.op == "Concat" and node.attrs.get("axis") in (1, -2) and any(
                _computed_by(t, "Conv", depth=4) for t in node.inputs):
            return sum(not _computed_by(t, "Conv", depth=4) for t in node.inputs)
    return 0


def _normalised_before_blocks(graph: gs.Graph) -> bool:
    """CLIP's vision tower normalises the embeddings (pre_layrnorm) before its first pre-norm block."""
    softmaxes = attention_layer_softmaxes(graph)
    x = _projection_input(softmaxes[0]) if softmaxes else None
    if x is None or not x.inputs:
        return False
    stream = _norm_input(x)
    return stream is not None and norm_kind(stream) is not None


def _norm_input(output: gs.Tensor, depth: int = 12) -> gs.Tensor | None:
    """The tensor a decomposed or whole norm normalises: the input of its first ReduceMean (or the op)."""
    frontier = [output]
    for _ in range(depth):
        nodes = [t.inputs[0] for t in frontier if t.inputs]
        for node in nodes:
            if node.op in _WHOLE_NORMS or node.op == "ReduceMean":
                source = node.inputs[0]
                while source.inputs and source.inputs[0].op in ("Cast", "Pow"):
                    source = source.inputs[0].inputs[0]
                return source
        frontier = [t for n in nodes if n.op in _NORM_OPS for t in n.inputs if not _constant_like(t)]
    return None
