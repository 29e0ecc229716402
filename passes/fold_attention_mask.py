"""fold-attention-mask: one fp16-safe additive attention mask, computed once, shared by every layer.

Every exporter turns the `attention_mask` input ([batch, seq], 1 = token, 0 = padding) into an
"extended" mask that is added to the attention scores, and each spells it differently:

- transformers <= 4.20: ``Unsqueeze(1) -> Unsqueeze(2) -> Cast(float) -> Sub(1, .) -> Mul(., -10000)``,
  computed once and added to the scores of every layer;
- transformers 4.21 to 4.x: the same chain with ``Mul(., finfo(float32).min)`` (-3.4028235e38);
- transformers 5, eager (legacy exporter): ``Cast(bool) -> Flatten -> Gather -> Reshape -> And ->
  Expand -> Where(., 0, -3.4028235e38)``, about 31 nodes of Shape/Range/ConstantOfShape arithmetic
  before freeze-shapes folds them and 8 after;
- SDPA attention (legacy exporter): the same boolean graph ending in one ``Where(., 0, -inf)`` per
  layer, and a NaN guard ``Where(IsNaN(p), 0, p)`` after every Softmax (a row masked everywhere is
  all -inf, so its softmax is NaN);
- dynamo exporter: ``Cast(bool) -> GatherND -> And -> Where(., 0, -3.4028235e38)``;
- dynamo exporter with SDPA at opset 23: the boolean mask (``And`` of the GatherND) goes straight
  into the ``attn_mask`` input of each ONNX ``Attention`` op.

-3.4e38 is -inf in fp16 (ATC compiles to fp16 on the 310P), and -inf turns fully masked rows into
NaN. This pass replaces all of them with the canonical mask the seed's model had::

    Mul(Sub(1, Cast(Unsqueeze(attention_mask, axes=[1, 2]), float)), mask_value)   # [batch, 1, 1, seq]

with `PassOptions.mask_value` (default -10000). It needs no static shape, so it runs on dynamic
graphs too.

How a mask is recognised, whatever its form: the sites are every ``Softmax(Add(scores, M))`` and
every ``Attention(q, k, v, M)`` (matched with the pattern matcher) where M is computed from the
attention_mask input alone: no other graph input reaches M except through ``Shape``/``Size``, which
read only shapes. Each distinct M is then evaluated with ONNX Runtime on a few masks (the
subgraph that computes it, with zeros fed to the other inputs whose shapes it reads) and must broadcast
to [batch, 1|heads, 1|seq, seq] and be 0 (or True) where the mask is 1 and at most -1000 (or False)
where it is 0. An additive bias, a causal mask or anything else that fails this is left alone and
named in the notes, so a graph is never silently given a different function.

Attention-23 (dynamo, SDPA) decision: its boolean mask is replaced by the canonical float mask too.
ONNX Attention adds a float `attn_mask` to the scores (and applies a boolean one as 0 / -inf), so
the result is the same, but the mask is then the fp16-safe one, and stays right when a legalization
pass decomposes the op into MatMul/Softmax for a target without Attention-23. ONNX Runtime accepts
an attn_mask only with its query dim spelled out, so these sites get ``Expand(mask, [batch, 1, seq,
seq])``; on a graph with dynamic inputs they are left alone with a note (run freeze-shapes first).

NaN guards are removed only after the Softmax of a layer whose mask was replaced: with a finite
mask and finite scores a softmax row cannot be NaN, so ``Where(IsNaN(p), 0, p)`` is dead.

Fully masked rows (never produced by a tokenizer: [CLS] is always kept) are the one place the
result differs from the original: the original gives a uniform row (finfo.min swamps the scores)
or zeros (-inf plus the guard); the canonical mask gives the softmax of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

from bertopt.errors import BertoptError
from bertopt.facts import ModelFacts
from bertopt.graph import add_node, constant_value, is_static, make_constant, replace_uses
from bertopt.parity import OrtRunner
from bertopt.pattern import Const, Match, OneOf, Op, Pattern, Var, _
from bertopt.pipeline import PassOptions, PassResult, register_pass

# A masked score at or below this vanishes from the softmax in fp32 and fp16 alike (exp(-1000) is 0).
MASKED_AT_MOST = -1000.0
# The canonical value plus any realistic score must stay finite in fp16 (max 65504).
FP16_SAFE_LIMIT = 32768.0
# Probe shape for graphs with dynamic inputs: small, with room for a few patterns per row.
PROBE_BATCH, PROBE_SEQ = 3, 8
# Ops whose output depends on their input's shape only, never on its values.
SHAPE_ONLY_OPS = {"Shape", "Size"}

NAN_GUARD = Pattern(Op("Where", Op("IsNaN", Var("probs")), Const(0.0), Var("probs")))


@dataclass
class Site:
    """One place a mask enters attention: input `index` of `node` (an Add or an Attention)."""

    node: gs.Node
    index: int
    softmax: gs.Node | None  # the Softmax after an Add site; None for Attention

    @property
    def mask(self) -> gs.Tensor:
        return self.node.inputs[self.index]

    @property
    def scores(self) -> gs.Tensor:
        """A tensor of the scores' dtype: the other Add operand, or Attention's query."""
        return self.node.inputs[1 - self.index] if self.softmax is not None else self.node.inputs[0]


@register_pass("fold-attention-mask", "replace every exporter's attention-mask subgraph with one "
               "fp16-safe (1 - mask) * mask_value shared by all layers; drop dead NaN guards")
def fold_attention_mask(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    value = _checked_mask_value(options.mask_value)
    mask_input = next((t for t in graph.inputs if t.name == facts.input_for("attention_mask")), None)
    if mask_input is None:
        return PassResult.no_change("the model has no attention_mask input; nothing to fold")
    mask_only = _mask_only_tensors(graph, mask_input)
    sites = _find_sites(graph, mask_only)
    if not sites:
        return PassResult.no_change(_nothing_found(graph, mask_input, mask_only))
    if _already_canonical(graph, sites, mask_input, value):
        return PassResult.no_change(f"all {len(sites)} attention layers already share the canonical "
                                    f"mask (1 - {mask_input.name}) * {value:g}")
    sites, rejected = _foldable(sites, mask_input)
    problems = _probe_masks(graph, facts, mask_input, sites) if sites else {}
    accepted = [site for site in sites if problems[site.mask.name] is None]
    rejected += [f"left mask '{name}' alone: {problem}" for name, problem in problems.items() if problem]
    if not accepted:
        return PassResult.no_change("no attention mask folded; " + "; ".join(rejected))
    return _fold(graph, mask_input, accepted, value, rejected)


def _checked_mask_value(value: float) -> float:
    if not np.isfinite(value) or not -FP16_SAFE_LIMIT <= value <= MASKED_AT_MOST:
        raise BertoptError(f"mask_value must be finite and between {-FP16_SAFE_LIMIT:g} and "
                           f"{MASKED_AT_MOST:g} to mask in fp16 without overflow (got {value:g})")
    return float(value)


def _foldable(sites: list[Site], mask_input: gs.Tensor) -> tuple[list[Site], list[str]]:
    """ONNX Runtime takes an Attention attn_mask only with its query dim (seq) spelled out, so the
    canonical mask is expanded to [batch, 1, seq, seq] for those sites: that needs static shapes."""
    if is_static(mask_input):
        return sites, []
    attention = [site for site in sites if site.softmax is None]
    notes = [f"left the attn_mask of {len(attention)} Attention op(s) alone: it must be expanded to "
             "[batch, 1, seq, seq], which needs static shapes (run freeze-shapes first)"] if attention else []
    return [site for site in sites if site.softmax is not None], notes


def _mask_only_tensors(graph: gs.Graph, mask_input: gs.Tensor) -> set[int]:
    """ids of the tensors computed from `mask_input` and constants only (shapes of others allowed)."""
    others = [t for t in graph.inputs if t is not mask_input]
    return _reachable([mask_input]) - _reachable(others)


def _reachable(starts: list[gs.Tensor]) -> set[int]:
    """ids of the tensors whose values depend on `starts`; Shape/Size cut the dependency."""
    seen = {id(t) for t in starts}
    frontier = list(starts)
    while frontier:
        for node in frontier.pop().outputs:
            if node.op in SHAPE_ONLY_OPS:
                continue
            for out in node.outputs:
                if id(out) not in seen:
                    seen.add(id(out))
                    frontier.append(out)
    return seen


def _softmax_pattern(mask_only: set[int]) -> Pattern:
    def one_operand_is_mask(add: gs.Node) -> bool:
        return sum(id(t) in mask_only for t in add.inputs) == 1

    add = Op("Add", _, _, name="add", where=(one_operand_is_mask, "an operand computed from the "
                                             "attention_mask input alone"))
    return Pattern(Op("Softmax", add, name="softmax"))


def _attention_pattern(mask_only: set[int]) -> Pattern:
    def mask_is_mask_only(attention: gs.Node) -> bool:
        return id(attention.inputs[3]) in mask_only

    return Pattern(Op("Attention", _, _, _, _, partial_inputs=True, outputs=None,
                      where=(mask_is_mask_only, "an attn_mask computed from the attention_mask input alone")))


def _find_sites(graph: gs.Graph, mask_only: set[int]) -> list[Site]:
    sites = []
    for match in _softmax_pattern(mask_only).find_all(graph, allow_escape=True):
        add = match.node("add")
        index = next(i for i, t in enumerate(add.inputs) if id(t) in mask_only)
        sites.append(Site(add, index, match.node("softmax")))
    for match in _attention_pattern(mask_only).find_all(graph, allow_escape=True):
        sites.append(Site(match.root, 3, None))
    return sites


def _nothing_found(graph: gs.Graph, mask_input: gs.Tensor, mask_only: set[int]) -> str:
    looked_for = (f"looked for Softmax(Add(scores, M)) and Attention(q, k, v, M) with M computed from "
                  f"'{mask_input.name}' alone")
    patterns = (("Softmax", _softmax_pattern(mask_only)), ("Attention", _attention_pattern(mask_only)))
    for op, pattern in patterns:
        candidate = next((n for n in graph.nodes if n.op == op), None)
        if candidate is not None:
            return f"{looked_for}; nearest candidate: {pattern.explain(candidate, graph)}"
    return f"{looked_for}; the graph has no Softmax or Attention op"


# --------------------------------------------------------------------------- the canonical mask

def _canonical_pattern(value: float) -> Pattern:
    unsqueezed = OneOf(Op("Unsqueeze", Var("mask"), Const([1, 2])),
                       Op("Unsqueeze", Var("mask"), attrs={"axes": [1, 2]}))
    return Pattern(Op("Mul", Op("Sub", Const(1.0), Op("Cast", unsqueezed)), Const(value)))


def _already_canonical(graph: gs.Graph, sites: list[Site], mask_input: gs.Tensor, value: float) -> bool:
    masks = {id(mask): mask for mask in map(_unexpanded, sites)}
    if len(masks) != 1:
        return False
    mask = next(iter(masks.values()))
    match = _canonical_pattern(value).match(mask.inputs[0], graph) if mask.inputs else None
    return match is not None and match["mask"] is mask_input and not _guards_after(graph, sites)


def _unexpanded(site: Site) -> gs.Tensor:
    """The mask before the Expand this pass puts in front of an Attention op."""
    producer = site.mask.inputs[0] if site.mask.inputs else None
    if site.softmax is None and producer is not None and producer.op == "Expand":
        return producer.inputs[0]
    return site.mask


def _canonical_mask(graph: gs.Graph, mask_input: gs.Tensor, dtype: np.dtype, value: float) -> gs.Variable:
    """(1 - Cast(Unsqueeze(mask, [1, 2]))) * value, shaped [batch, 1, 1, seq] (dims symbolic or not)."""
    batch, seq = mask_input.shape if mask_input.shape is not None else (None, None)
    shape = [batch, 1, 1, seq]
    axes = np.array([1, 2], dtype=np.int64)
    if graph.opset >= 13:
        unsqueezed = add_node(graph, "Unsqueeze", [mask_input, make_constant(graph, "mask_axes", axes)],
                              dtype=mask_input.dtype, shape=shape)
    else:
        unsqueezed = add_node(graph, "Unsqueeze", [mask_input], attrs={"axes": axes.tolist()},
                              dtype=mask_input.dtype, shape=shape)
    as_float = add_node(graph, "Cast", unsqueezed,
                        attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}, dtype=dtype, shape=shape)
    kept = add_node(graph, "Sub", [make_constant(graph, "mask_one", np.array(1.0, dtype=dtype)), *as_float],
                    dtype=dtype, shape=shape)
    scaled = add_node(graph, "Mul", [*kept, make_constant(graph, "mask_value", np.array(value, dtype=dtype))],
                      dtype=dtype, shape=shape)
    return scaled[0]


def _expanded_for_attention(graph: gs.Graph, canonical: gs.Variable) -> gs.Variable:
    batch, _one, _also_one, seq = canonical.shape
    shape = np.array([batch, 1, seq, seq], dtype=np.int64)
    return add_node(graph, "Expand", [canonical, make_constant(graph, "mask_shape", shape)],
                    dtype=canonical.dtype, shape=shape.tolist())[0]


def _fold(graph: gs.Graph, mask_input: gs.Tensor, sites: list[Site], value: float,
          notes: list[str]) -> PassResult:
    old_masks = {id(site.mask): site.mask for site in sites}
    old_constants = sorted({c for mask in old_masks.values() for c in _masking_constants(mask)})
    nodes_before = {id(n) for n in graph.nodes}
    canonical = _canonical_mask(graph, mask_input, _scores_dtype(sites), value)
    expanded = _expanded_for_attention(graph, canonical) if any(s.softmax is None for s in sites) else None
    for site in sites:
        site.node.inputs[site.index] = canonical if site.softmax is not None else expanded
    guards = _remove_dead_guards(graph, sites)
    graph.cleanup(remove_unused_graph_inputs=False)
    removed = len(nodes_before - {id(n) for n in graph.nodes})
    old = ", ".join(f"{c:g}" for c in old_constants) or "none (boolean mask)"
    notes = [f"replaced {len(old_masks)} mask(s) feeding {len(sites)} attention layer(s) with "
             f"(1 - {mask_input.name}) * {value:g}; old masking constant(s): {old}", *notes]
    return PassResult(changed=True, notes=notes, counts={
        "masks_replaced": len(old_masks), "layers": len(sites),
        "nan_guards_removed": guards, "nodes_removed": removed})


def _scores_dtype(sites: list[Site]) -> np.dtype:
    dtypes = {np.dtype(site.scores.dtype) for site in sites if site.scores.dtype is not None}
    if len(dtypes) > 1:
        raise BertoptError(f"attention scores have mixed dtypes {sorted(d.name for d in dtypes)}")
    return dtypes.pop() if dtypes else np.dtype(np.float32)


def _masking_constants(mask: gs.Tensor) -> set[float]:
    """The very negative fill values (one-element float constants) of the old mask subgraph."""
    found = set()
    for node in _closure([mask]):
        for tensor in node.inputs:
            values = constant_value(tensor)
            if values is not None and values.size == 1 and values.dtype.kind == "f":
                found.update(float(v) for v in values.reshape(-1) if v <= MASKED_AT_MOST)
    return found


def _guards_after(graph: gs.Graph, sites: list[Site]) -> list[Match]:
    softmax_outputs = {id(site.softmax.outputs[0]) for site in sites if site.softmax is not None}
    return [m for m in NAN_GUARD.find_all(graph) if id(m["probs"]) in softmax_outputs]


def _remove_dead_guards(graph: gs.Graph, sites: list[Site]) -> int:
    guards = _guards_after(graph, sites)
    for guard in guards:
        replace_uses(guard.output, guard["probs"], graph)
    return len(guards)


# --------------------------------------------------------------------------- verifying a mask

def _closure(tensors: list[gs.Tensor]) -> list[gs.Node]:
    """Every node that `tensors` are computed from, inputs first."""
    order, seen, stack = [], set(), [(t, False) for t in tensors]
    while stack:
        tensor, done = stack.pop()
        node = tensor.inputs[0] if tensor.inputs else None
        if done:
            order.append(node)
        elif node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.append((tensor, True))
            stack.extend((t, False) for t in node.inputs)
    return order


def _probe_masks(graph: gs.Graph, facts: ModelFacts, mask_input: gs.Tensor,
                 sites: list[Site]) -> dict[str, str | None]:
    """Each distinct mask's name -> why it is not an attention mask (None when it is one)."""
    masks = list(dict.fromkeys(site.mask.name for site in sites))
    batch, seq = _probe_shape(mask_input, facts)
    probes = _probe_inputs(batch, seq)
    try:
        runner, other_feeds = _probe_runner(graph, mask_input, masks, batch, seq)
        results = [runner.run({mask_input.name: probe.astype(_np_dtype(mask_input)), **other_feeds})
                   for probe in probes]
    except BertoptError as exc:
        return {name: f"cannot evaluate it: {exc}" for name in masks}
    problems: dict[str, str | None] = dict.fromkeys(masks)
    for probe, outputs in zip(probes, results):
        for name in masks:
            problems[name] = problems[name] or _mask_problem(outputs[name], probe)
    return problems


def _probe_shape(mask_input: gs.Tensor, facts: ModelFacts) -> tuple[int, int]:
    if is_static(mask_input):
        return int(mask_input.shape[0]), int(mask_input.shape[1])
    return PROBE_BATCH, min(PROBE_SEQ, facts.max_positions or PROBE_SEQ)


def _probe_inputs(batch: int, seq: int) -> list[np.ndarray]:
    """0/1 masks of [batch, seq]: rows padded to different lengths, random holes, and their complement,
    so that every position is seen both kept and removed, even at batch 1."""
    padded = np.zeros((batch, seq), dtype=np.int64)
    for row in range(batch):
        padded[row, :max(1, seq - row * max(1, seq // batch))] = 1
    holes = np.random.default_rng(0).integers(0, 2, size=(batch, seq))
    return [padded, holes, 1 - holes]


def _probe_runner(graph: gs.Graph, mask_input: gs.Tensor, names: list[str], batch: int,
                  seq: int) -> tuple[OrtRunner, dict[str, np.ndarray]]:
    """An ORT session computing the named masks; other inputs it reads (for their shapes) get zeros."""
    tensors = graph.tensors()
    nodes = _closure([tensors[name] for name in names])
    read = {id(t) for node in nodes for t in node.inputs}
    others = {t.name: _zeros_like_input(t, batch, seq) for t in graph.inputs
              if id(t) in read and t is not mask_input}
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                 value.shape) for name, value in others.items()]
    inputs.append(onnx.helper.make_tensor_value_info(
        mask_input.name, onnx.helper.np_dtype_to_tensor_dtype(_np_dtype(mask_input)), [batch, seq]))
    constants = {id(t): t for node in nodes for t in node.inputs if isinstance(t, gs.Constant)}
    probe = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes], "mask_probe", inputs,
        [onnx.helper.make_empty_tensor_value_info(name) for name in names],
        initializer=[OnnxExporter.export_tensor_proto(t) for t in constants.values()])
    model = onnx.helper.make_model(probe, opset_imports=update_import_domains(graph))
    model.ir_version = graph.ir_version or model.ir_version
    return OrtRunner(model, threads=1), others


def _zeros_like_input(tensor: gs.Tensor, batch: int, seq: int) -> np.ndarray:
    """Zeros (a valid token id and type) for a graph input: [batch, seq] when 2-D, else its static shape."""
    if tensor.shape is not None and len(tensor.shape) == 2:
        return np.zeros((batch, seq), dtype=_np_dtype(tensor))
    if is_static(tensor):
        return np.zeros(tensor.shape, dtype=_np_dtype(tensor))
    raise BertoptError(f"the mask reads input '{tensor.name}' of unknown shape {tensor.shape}")


def _np_dtype(tensor: gs.Tensor) -> np.dtype:
    return np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.int64)


def _mask_problem(value: np.ndarray, mask: np.ndarray) -> str | None:
    """Why `value` is not the boolean or additive extended form of `mask` (None when it is)."""
    batch, seq = mask.shape
    try:
        shape = np.broadcast_shapes(value.shape, (batch, 1, 1, seq))
    except ValueError:
        shape = ()
    if len(shape) != 4:
        return (f"its shape {list(value.shape)} does not broadcast to [batch, 1, 1, seq] "
                f"= [{batch}, 1, 1, {seq}]")
    full = np.broadcast_to(value, shape)
    keep = np.broadcast_to((mask != 0)[:, None, None, :], shape)
    if value.dtype == np.bool_:
        wrong = full != keep
        return f"it differs from the mask at {int(wrong.sum())} position(s)" if wrong.any() else None
    if value.dtype.kind != "f":
        return f"it is {value.dtype}, neither a boolean nor a float mask"
    kept, masked = full[keep], full[~keep]
    if np.any(kept != 0):
        return f"it is {kept[kept != 0][0]:g} at a position the mask keeps (expected 0)"
    if masked.size and not np.all(masked <= MASKED_AT_MOST):
        bad = masked[~(masked <= MASKED_AT_MOST)][0]
        return f"it is {bad:g} at a position the mask removes (expected <= {MASKED_AT_MOST:g})"
    return None
