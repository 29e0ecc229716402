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
  into the ``attn_mask`` input of each ONNX ``Attention`` op;
- XLM and FlauBERT (``masked_fill``): ``Where(Equal(mask, 0), -3.4028235e38, scores)`` replaces the
  scores themselves;
- GPT-2-style decoders: padding and causality in one ``Where(And(tril, mask), 0, -3.4028235e38)``;
- T5 with SDPA attention: the position bias and the mask in one ``Where(mask, position_bias,
  -3.4028235e38)``, added to the scores;
- fp16 exports: all of the above with finfo(float16).min = -65504;
- a float attention-mask input: a 0/1 mask, spelled as the integer one after a Cast(bool), or an
  additive mask (0 keeps, very negative removes) added to the scores as it is;
- no attention-mask input: the scores go straight into the Softmax (the legacy exporter), or a zero
  mask computed from shapes alone (the dynamo exporter).

-3.4e38 is -inf in fp16 (ATC compiles to fp16 on the 310P), and -inf turns fully masked rows into
NaN. This pass replaces all of them with the canonical mask the seed's model had::

    Mul(Sub(1, Cast(Unsqueeze(attention_mask, axes=[1, 2]), float)), mask_value)   # [batch, 1, 1, seq]

with `PassOptions.mask_value` (default -10000, exact in fp16), in the dtype of the scores. The
other kinds of model get the same shape and values, spelled for what they have:

- an additive mask input: ``Max(Cast(Unsqueeze(attention_mask, [1, 2]), float), mask_value)``: the
  same function for any value at or above mask_value, and -inf or finfo.min clamped to an fp16-safe
  one (both remove the token: exp(-10000) is 0 in fp32 and fp16);
- no mask input: a zero constant ``[batch, 1, 1, seq]`` added to every layer's scores, so the
  ``Softmax(Add(scaled scores, mask))`` form ATC's attention fusion needs exists (attention-bigkernel
  expands it to [batch, 1, seq, seq] like any mask). Decision: a constant needs static shapes, so on a
  dynamic graph such a model is left alone with a note (run freeze-shapes first);
- causal models (`ModelFacts.attention`): ``Min`` of the mask above and a constant ``[1, 1, seq, seq]``
  holding mask_value above the diagonal (Min, not Add, so a token both padded and later stays at
  mask_value). Also static shapes only.

A ``Where(B, fill, scores)`` site becomes ``Add(scores, mask)``; a Softmax fed the bare scores (no mask
input) gets the Add inserted in front of it. A mask that carries a bias, ``Add(scores, Where(B, bias,
fill))`` (T5's SDPA export), becomes ``Add(Add(scores, bias), mask)``: the bias is kept, added to the
scores as T5's eager export does, and B is checked as a Where condition is. The bias must not depend on
the attention mask's values. A Cast between the masked scores and the Softmax to the type the scores
already have (XLM's ``.float()`` in an fp32 model) is dropped, so the Softmax reads the masked scores as
ATC's form has it; a real cast (fp16 scores, fp32 Softmax) stays.

How a mask is recognised, whatever its form: the sites are every ``Softmax(Add(scores, M))``,
``Softmax(Where(B, fill, scores))`` and ``Attention(q, k, v, M)`` where M (or B) depends on no graph
input's values but the attention mask's (``Shape``/``Size`` read only shapes; constants are free).
Each distinct M or B is then evaluated with ONNX Runtime on a few masks (bertopt.graph.evaluate; binary
0/1 probes, or 0 / finfo.min probes for an additive input) and must broadcast to
[batch, 1|heads, 1|seq, seq] and be 0 (or True) where the token is kept and at most -1000 (or False)
where it is removed; for a causal model "kept" also requires the key not to come after the query.
An additive bias, a mask the model does not announce, or anything else that fails this is left
alone and named in the notes, so a graph is never silently given a different function.

Attention-23 (dynamo, SDPA) decision: its boolean mask is replaced by the canonical float mask too.
ONNX Attention adds a float `attn_mask` to the scores (and applies a boolean one as 0 / -inf), so
the result is the same, but the mask is then the fp16-safe one, and stays right when a legalization
pass decomposes the op into MatMul/Softmax for a target without Attention-23. ONNX Runtime accepts
an attn_mask only with its query dim spelled out, so these sites get ``Expand(mask, [batch, 1, seq,
seq])``; on a graph with dynamic inputs they are left alone with a note (run freeze-shapes first).

NaN guards are removed only after the Softmax of a layer whose mask was replaced: with a finite
mask and finite scores a softmax row cannot be NaN, so ``Where(IsNaN(p), 0, p)`` is dead.

The pass is idempotent: a graph whose layers all read the canonical mask (also through the Expand
attention-bigkernel adds) is left alone.

Fully masked rows (never produced by a tokenizer: [CLS] is always kept) are the one place the
result differs from the original: the original gives a uniform row (finfo.min swamps the scores)
or zeros (-inf plus the guard); the canonical mask gives the softmax of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.graph import add_node, constant_value, is_static, make_constant, replace_uses
from bertopt.graph.evaluate import SubgraphEvaluator, closure, input_dtype, value_dependents
from bertopt.graph.pattern import Const, Match, OneOf, Op, Pattern, Var, _
from bertopt.model.facts import MASKED_AT_MOST, ModelFacts, attention_layer_softmaxes, where_fill
from bertopt.model.forms import mask_misfit
from bertopt.pipeline import PassOptions, PassResult, register_pass

# The canonical value plus any realistic score must stay finite in fp16 (max 65504).
FP16_SAFE_LIMIT = 32768.0
# Probe shape for graphs with dynamic inputs: small, with room for a few patterns per row.
PROBE_BATCH, PROBE_SEQ = 3, 8

NAN_GUARD = Pattern(Op("Where", Op("IsNaN", Var("probs")), Const(0.0), Var("probs")))


@dataclass
class Site:
    """One place a mask enters attention.

    kind "add": input `index` of the Add `node` before `softmax`; "where": the Where `node` whose
    condition (input 0) removes scores when it is `removes_when`; "biased": input `index` of the Add
    `node` is ``Where(condition, bias, fill)`` (or the fill first), a mask carrying a bias; "bare":
    `softmax` reads the scores straight; "attention": input 3 of the Attention `node`.
    """

    kind: str
    node: gs.Node
    softmax: gs.Node | None
    index: int = 0
    removes_when: bool = True
    cast: gs.Node | None = None  # a Cast between the masked scores and the Softmax (XLM's .float())

    @property
    def where(self) -> gs.Node | None:
        """The Where whose condition is the mask (kinds "where" and "biased")."""
        if self.kind == "biased":
            return self.node.inputs[self.index].inputs[0]
        return self.node if self.kind == "where" else None

    @property
    def source(self) -> gs.Tensor | None:
        """What is evaluated: the additive mask, the Where condition, or nothing for a bare site."""
        if self.kind == "bare":
            return None
        return self.where.inputs[0] if self.where is not None else self.node.inputs[self.index]

    @property
    def bias(self) -> gs.Tensor | None:
        """What a "biased" mask adds to the scores where the condition keeps them."""
        return self.where.inputs[2 if self.removes_when else 1] if self.kind == "biased" else None

    @property
    def scores(self) -> gs.Tensor:
        """A tensor of the scores' dtype."""
        if self.kind in ("add", "biased"):
            return self.node.inputs[1 - self.index]
        if self.kind == "where":
            return self.node.inputs[2 if self.removes_when else 1]
        return self.softmax.inputs[0] if self.kind == "bare" else self.node.inputs[0]


@dataclass
class Canonical:
    """What the canonical mask of this model is made of."""

    mask_input: gs.Tensor | None
    kind: str | None  # facts.mask_kind
    causal: bool
    value: float

    def describe(self) -> str:
        name = self.mask_input.name if self.mask_input is not None else None
        base = {"binary": f"(1 - {name}) * {self.value:g}", "additive": f"max({name}, {self.value:g})",
                None: "a zero mask"}[self.kind]
        return base + (f" plus a causal mask ({self.value:g} above the diagonal)" if self.causal else "")

    @property
    def needs_static_shapes(self) -> bool:
        return self.causal or self.mask_input is None


@register_pass("fold-attention-mask", "replace every exporter's attention-mask subgraph with one "
               "fp16-safe (1 - mask) * mask_value shared by all layers (a zero mask where there is no "
               "mask input, plus a causal one for decoders); drop dead NaN guards")
def fold_attention_mask(graph: gs.Graph, facts: ModelFacts, options: PassOptions) -> PassResult:
    value = _checked_mask_value(options.mask_value)
    mask_input = next((t for t in graph.inputs if t.name == facts.input_for("attention_mask")), None)
    canonical = Canonical(mask_input, facts.mask_kind if mask_input is not None else None,
                          facts.attention == "causal", value)
    free = _mask_only_tensors(graph, mask_input)
    sites, notes = _find_sites(graph, free, mask_input)
    if not sites:
        return PassResult.no_change(_nothing_found(graph, mask_input, free))
    if _already_canonical(graph, sites, canonical):
        return PassResult.no_change(f"all {len(sites)} attention layers already share the canonical "
                                    f"mask {canonical.describe()}")
    sites, rejected = _foldable(sites, canonical, facts)
    sites, misfits = _on_token_scores(sites, facts)
    rejected += misfits
    problems = _probe_masks(graph, facts, canonical, sites) if sites else {}
    accepted = [site for site in sites if site.source is None or problems[site.source.name] is None]
    rejected += [f"left mask '{name}' alone: {problem}" for name, problem in problems.items() if problem]
    if not accepted:
        return PassResult.no_change("no attention mask folded; " + "; ".join(notes + rejected))
    return _fold(graph, facts, canonical, accepted, notes + rejected)


def _checked_mask_value(value: float) -> float:
    if not np.isfinite(value) or not -FP16_SAFE_LIMIT <= value <= MASKED_AT_MOST:
        raise BertoptError(f"mask_value must be finite and between {-FP16_SAFE_LIMIT:g} and "
                           f"{MASKED_AT_MOST:g} to mask in fp16 without overflow (got {value:g})")
    return float(value)


def _foldable(sites: list[Site], canonical: Canonical, facts: ModelFacts) -> tuple[list[Site], list[str]]:
    """Constants of the model's shape (zero and causal masks) and the [batch, 1, seq, seq] Expand ONNX
    Runtime needs in front of an Attention attn_mask both need static shapes."""
    if facts.is_static:
        return sites, []
    if canonical.needs_static_shapes:
        what = "a zero mask" if canonical.mask_input is None else "a causal mask"
        reason = "the model has no attention_mask input; " if canonical.mask_input is None else ""
        return [], [f"{reason}{what} of the model's shape needs static shapes (run freeze-shapes first)"]
    attention = [site for site in sites if site.kind == "attention"]
    notes = [f"left the attn_mask of {len(attention)} Attention op(s) alone: it must be expanded to "
             "[batch, 1, seq, seq], which needs static shapes (run freeze-shapes first)"] if attention else []
    return [site for site in sites if site.kind != "attention"], notes


def _on_token_scores(sites: list[Site], facts: ModelFacts) -> tuple[list[Site], list[str]]:
    """The sites whose scores the canonical mask fits (`mask_misfit`), and a note for each other one."""
    misfits = {id(site): mask_misfit(None, site.scores.shape, facts.batch, facts.seq) for site in sites}
    notes = [f"left the scores of {site.node.name} alone: {misfits[id(site)]}" for site in sites if misfits[id(site)]]
    return [site for site in sites if not misfits[id(site)]], notes


def _mask_only_tensors(graph: gs.Graph, mask_input: gs.Tensor | None) -> set[int]:
    """ids of the tensors whose values depend on no graph input but `mask_input` (constants included).

    Only tensors of the graph are collected: a constant is in the set when a node reads it."""
    others = value_dependents([t for t in graph.inputs if t is not mask_input])
    tensors = {id(t) for node in graph.nodes for t in [*node.inputs, *node.outputs]}
    return (tensors | {id(t) for t in graph.inputs}) - others


# --------------------------------------------------------------------------- finding the sites

def _add_pattern(free: set[int]) -> Pattern:
    def one_operand_is_mask(add: gs.Node) -> bool:
        return sum(id(t) in free for t in add.inputs) == 1

    add = Op("Add", _, _, name="add", where=(one_operand_is_mask, "an operand computed from the "
                                             "attention_mask input alone"))
    return Pattern(Op("Softmax", OneOf(add, Op("Cast", add, name="cast")), name="softmax"))


def _where_pattern(free: set[int]) -> Pattern:
    def condition_is_mask(where: gs.Node) -> bool:
        return id(where.inputs[0]) in free and _fill_index(where, free) is not None

    where = Op("Where", _, _, _, name="where", where=(condition_is_mask, "a condition computed from the "
                                                      "attention_mask input alone and a very negative fill"))
    return Pattern(Op("Softmax", OneOf(where, Op("Cast", where, name="cast")), name="softmax"))


def _fill_index(where: gs.Node, free: set[int]) -> int | None:
    return where_fill(where, lambda tensor: id(tensor) not in free)


def _biased_mask_fill(mask: gs.Tensor, free: set[int], by_mask: set[int]) -> int | None:
    """The fill's branch (1 or 2) when `mask` is ``Where(B, bias, fill)`` (or ``Where(B, fill, bias)``)
    with B from the mask and a bias that is not zero and does not depend on the mask's values."""
    where = mask.inputs[0] if mask.inputs else None
    if where is None or where.op != "Where" or id(where.inputs[0]) not in free:
        return None

    def is_bias(tensor: gs.Tensor) -> bool:
        values = constant_value(tensor)
        return id(tensor) not in by_mask and (values is None or bool(values.any()))

    return where_fill(where, is_bias)


def _attention_pattern(free: set[int]) -> Pattern:
    def mask_is_mask_only(attention: gs.Node) -> bool:
        return id(attention.inputs[3]) in free

    return Pattern(Op("Attention", _, _, _, _, partial_inputs=True, outputs=None,
                      where=(mask_is_mask_only, "an attn_mask computed from the attention_mask input alone")))


def _find_sites(graph: gs.Graph, free: set[int], mask_input: gs.Tensor | None) -> tuple[list[Site], list[str]]:
    """Every attention layer's mask site; a layer fed bare scores only counts where there is no mask
    input (with one, adding the mask would change what the layer computes)."""
    sites = []
    by_mask = value_dependents([mask_input]) if mask_input is not None else set()
    for match in _add_pattern(free).find_all(graph, allow_escape=True):
        add = match.node("add")
        index = next(i for i, t in enumerate(add.inputs) if id(t) in free)
        fill = _biased_mask_fill(add.inputs[index], free, by_mask)
        sites.append(Site("add" if fill is None else "biased", add, match.node("softmax"), index=index,
                          removes_when=fill == 1, cast=match.get_node("cast")))
    for match in _where_pattern(free).find_all(graph, allow_escape=True):
        where = match.node("where")
        sites.append(Site("where", where, match.node("softmax"), removes_when=_fill_index(where, free) == 1,
                          cast=match.get_node("cast")))
    for match in _attention_pattern(free).find_all(graph, allow_escape=True):
        sites.append(Site("attention", match.root, None, index=3))
    seen = {id(site.softmax) for site in sites if site.softmax is not None}
    bare = [s for s in attention_layer_softmaxes(graph) if id(s) not in seen]
    if mask_input is None:
        sites += [Site("bare", softmax, softmax) for softmax in bare]
        return sites, []
    notes = [f"{len(bare)} attention layer(s) read no mask; left them alone"] if bare and sites else []
    return sites, notes


def _nothing_found(graph: gs.Graph, mask_input: gs.Tensor | None, free: set[int]) -> str:
    name = mask_input.name if mask_input is not None else "no graph input"
    looked_for = (f"looked for Softmax(Add(scores, M)), Softmax(Where(B, fill, scores)) and Attention(q, k, "
                  f"v, M) with M computed from '{name}' alone")
    patterns = (("Softmax", _add_pattern(free)), ("Attention", _attention_pattern(free)))
    for op, pattern in patterns:
        candidate = next((n for n in graph.nodes if n.op == op), None)
        if candidate is not None:
            return f"{looked_for}; nearest candidate: {pattern.explain(candidate, graph)}"
    return f"{looked_for}; the graph has no Softmax or Attention op"


# --------------------------------------------------------------------------- the canonical mask

def _padding_pattern(canonical: Canonical) -> Pattern | None:
    unsqueezed = OneOf(Op("Unsqueeze", Var("mask"), Const([1, 2])),
                       Op("Unsqueeze", Var("mask"), attrs={"axes": [1, 2]}))
    if canonical.kind == "binary":
        return Pattern(Op("Mul", Op("Sub", Const(1.0), Op("Cast", unsqueezed)), Const(canonical.value)))
    if canonical.kind == "additive":
        return Pattern(Op("Max", Op("Cast", unsqueezed), Const(canonical.value)))
    return None


def _already_canonical(graph: gs.Graph, sites: list[Site], canonical: Canonical) -> bool:
    if any(site.kind not in ("add", "attention") or _noop_cast(site) for site in sites):
        return False
    masks = {id(mask): mask for mask in map(_unexpanded, sites)}
    if len(masks) != 1 or _guards_after(graph, sites):
        return False
    mask = next(iter(masks.values()))
    if canonical.causal:
        parts = mask.inputs[0].inputs if mask.inputs and mask.inputs[0].op == "Min" else [mask]
        causal = [t for t in parts if isinstance(t, gs.Constant) and _is_causal_constant(t, canonical.value)]
        if len(causal) != 1:
            return False
        rest = [t for t in parts if t is not causal[0]]
        return not rest if canonical.mask_input is None else len(rest) == 1 and _is_padding(graph, rest[0], canonical)
    return _is_padding(graph, mask, canonical)


def _is_padding(graph: gs.Graph, mask: gs.Tensor, canonical: Canonical) -> bool:
    pattern = _padding_pattern(canonical)
    if pattern is None:
        values = constant_value(mask)
        return values is not None and values.ndim == 4 and not values.any()
    match = pattern.match(mask.inputs[0], graph) if mask.inputs else None
    return match is not None and match["mask"] is canonical.mask_input


def _is_causal_constant(tensor: gs.Constant, value: float) -> bool:
    values = tensor.values
    if values.ndim != 4 or values.shape[:2] != (1, 1) or values.shape[2] != values.shape[3]:
        return False
    return np.array_equal(values[0, 0], _causal_values(values.shape[3], value, values.dtype))


def _causal_values(seq: int, value: float, dtype: np.dtype) -> np.ndarray:
    return np.triu(np.full((seq, seq), value, dtype=dtype), k=1)


def _unexpanded(site: Site) -> gs.Tensor:
    """The mask before an Expand (this pass's in front of an Attention op, attention-bigkernel's to
    [batch, 1, seq, seq])."""
    mask = site.source
    producer = mask.inputs[0] if mask.inputs else None
    if producer is not None and producer.op == "Expand":
        return producer.inputs[0]
    return mask


def _canonical_mask(graph: gs.Graph, facts: ModelFacts, canonical: Canonical, dtype: np.dtype) -> gs.Tensor:
    """The canonical mask (see the module docstring), [batch, 1, 1, seq] or [batch, 1, seq, seq]."""
    value = canonical.value
    if canonical.mask_input is None:
        padding = None if canonical.causal else make_constant(
            graph, "mask_zero", np.zeros((facts.batch, 1, 1, facts.seq), dtype=dtype))
    else:
        padding = _padding_mask(graph, canonical.mask_input, canonical.kind, dtype, value)
    if not canonical.causal:
        return padding
    causal = make_constant(graph, "mask_causal", _causal_values(facts.seq, value, dtype)[None, None])
    if padding is None:
        return causal
    return add_node(graph, "Min", [padding, causal], dtype=dtype, shape=[facts.batch, 1, facts.seq, facts.seq])[0]


def _padding_mask(graph: gs.Graph, mask_input: gs.Tensor, kind: str, dtype: np.dtype, value: float) -> gs.Variable:
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
    fill = make_constant(graph, "mask_value", np.array(value, dtype=dtype))
    if kind == "additive":
        return add_node(graph, "Max", [*as_float, fill], dtype=dtype, shape=shape)[0]
    kept = add_node(graph, "Sub", [make_constant(graph, "mask_one", np.array(1.0, dtype=dtype)), *as_float],
                    dtype=dtype, shape=shape)
    return add_node(graph, "Mul", [*kept, fill], dtype=dtype, shape=shape)[0]


def _expanded_for_attention(graph: gs.Graph, facts: ModelFacts, canonical: gs.Tensor) -> gs.Variable:
    shape = np.array([facts.batch, 1, facts.seq, facts.seq], dtype=np.int64)
    return add_node(graph, "Expand", [canonical, make_constant(graph, "mask_shape", shape)],
                    dtype=canonical.dtype, shape=shape.tolist())[0]


def _fold(graph: gs.Graph, facts: ModelFacts, canonical: Canonical, sites: list[Site],
          notes: list[str]) -> PassResult:
    old_masks = {id(site.source): site for site in sites if site.source is not None}
    old_constants = sorted({c for site in old_masks.values() for c in _masking_constants(site)})
    nodes_before = {id(n) for n in graph.nodes}
    mask = _canonical_mask(graph, facts, canonical, _scores_dtype(sites))
    expanded = _expanded_for_attention(graph, facts, mask) if any(s.kind == "attention" for s in sites) else None
    casts = [site.cast for site in sites if _noop_cast(site)]
    biases = {id(site.bias) for site in sites if site.bias is not None}
    for site in sites:
        _use_mask(graph, site, mask if site.kind != "attention" else expanded)
    for cast in casts:
        replace_uses(cast.outputs[0], cast.inputs[0], graph)
    guards = _remove_dead_guards(graph, sites)
    graph.cleanup(remove_unused_graph_inputs=False)
    removed = len(nodes_before - {id(n) for n in graph.nodes})
    bare = sum(site.kind == "bare" for site in sites)
    return PassResult(changed=True, notes=[_summary(canonical, sites, old_masks, old_constants), *notes],
                      counts={"masks_replaced": len(old_masks), "layers": len(sites), "masks_added": bare,
                              "nan_guards_removed": guards, "noop_casts_removed": len(casts),
                              "nodes_removed": removed, "biases_kept": len(biases)})


def _summary(canonical: Canonical, sites: list[Site], old_masks: dict, old_constants: list[float]) -> str:
    bare = sum(site.kind == "bare" for site in sites)
    if bare == len(sites):
        return f"added {canonical.describe()} to the scores of {bare} attention layer(s) that had none"
    if old_constants:
        old = ", ".join(f"{c:g}" for c in old_constants)
    else:
        old = "none (additive mask input)" if canonical.kind == "additive" else "none (boolean mask)"
    biased = sum(site.kind == "biased" for site in sites)
    kept = f"; the bias it carried in {biased} layer(s) is added to their scores" if biased else ""
    return (f"replaced {len(old_masks)} mask(s) feeding {len(sites) - bare} attention layer(s) with "
            f"{canonical.describe()}; old masking constant(s): {old}{kept}")


def _noop_cast(site: Site) -> bool:
    """A Cast between the masked scores and the Softmax to the type the scores already have."""
    scores = site.scores.dtype
    return (site.cast is not None and scores is not None
            and onnx.helper.tensor_dtype_to_np_dtype(site.cast.attrs["to"]) == np.dtype(scores))


def _use_mask(graph: gs.Graph, site: Site, mask: gs.Tensor) -> None:
    """Point the site at `mask`: an Add operand, a Where turned into Add(scores, mask), an Add inserted
    in front of a bare Softmax, or an Attention attn_mask."""
    if site.kind in ("add", "attention"):
        site.node.inputs[site.index] = mask
        return
    scores = site.scores
    if site.kind == "biased":
        biased = add_node(graph, "Add", [scores, site.bias], dtype=scores.dtype, shape=scores.shape)[0]
        site.node.inputs[1 - site.index] = biased
        site.node.inputs[site.index] = mask
        return
    if site.kind == "bare":
        masked = add_node(graph, "Add", [scores, mask], dtype=scores.dtype, shape=scores.shape)[0]
        site.softmax.inputs[0] = masked
        return
    output = site.node.outputs[0]
    site.node.inputs.clear()
    site.node.outputs.clear()
    graph.nodes.append(gs.Node("Add", name=site.node.name, inputs=[scores, mask], outputs=[output]))


def _scores_dtype(sites: list[Site]) -> np.dtype:
    dtypes = {np.dtype(site.scores.dtype) for site in sites if site.scores.dtype is not None}
    if len(dtypes) > 1:
        raise BertoptError(f"attention scores have mixed dtypes {sorted(d.name for d in dtypes)}")
    return dtypes.pop() if dtypes else np.dtype(np.float32)


def _masking_constants(site: Site) -> set[float]:
    """The very negative fill values (one-element float constants) of the old mask subgraph."""
    tensors = [site.source] + [t for node in closure([site.source]) for t in node.inputs]
    if site.where is not None:
        tensors.append(site.where.inputs[1 if site.removes_when else 2])
    found = set()
    for tensor in tensors:
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

def _probe_masks(graph: gs.Graph, facts: ModelFacts, canonical: Canonical,
                 sites: list[Site]) -> dict[str, str | None]:
    """Each distinct mask's name -> why it is not this model's attention mask (None when it is)."""
    by_name = {site.source.name: site for site in sites if site.source is not None}
    if not by_name:
        return {}
    batch, seq = _probe_shape(canonical.mask_input, facts)
    keeps = _probe_keeps(batch, seq) if canonical.mask_input is not None else [np.ones((batch, seq), bool)]
    try:
        evaluator = SubgraphEvaluator(graph, [site.source for site in by_name.values()], batch, seq)
        results = [evaluator.run(_probe_feed(canonical, keep)) for keep in keeps]
    except BertoptError as exc:
        return {name: f"cannot evaluate it: {exc}" for name in by_name}
    causal = np.tril(np.ones((seq, seq), dtype=bool)) if canonical.causal else np.ones((1, 1), dtype=bool)
    problems: dict[str, str | None] = dict.fromkeys(by_name)
    for keep, outputs in zip(keeps, results):
        expected = keep[:, None, None, :] & causal[None, None]
        for name, site in by_name.items():
            problems[name] = problems[name] or _mask_problem(outputs[name], expected, site)
    return problems


def _probe_shape(mask_input: gs.Tensor | None, facts: ModelFacts) -> tuple[int, int]:
    if facts.is_static:
        return facts.batch, facts.seq
    if mask_input is not None and is_static(mask_input):
        return int(mask_input.shape[0]), int(mask_input.shape[1])
    return PROBE_BATCH, min(PROBE_SEQ, facts.max_positions or PROBE_SEQ)


def _probe_keeps(batch: int, seq: int) -> list[np.ndarray]:
    """Which tokens are kept, [batch, seq]: rows padded to different lengths, random holes, and their
    complement, so that every position is seen both kept and removed, even at batch 1."""
    padded = np.zeros((batch, seq), dtype=bool)
    for row in range(batch):
        padded[row, :max(1, seq - row * max(1, seq // batch))] = True
    holes = np.random.default_rng(0).integers(0, 2, size=(batch, seq)).astype(bool)
    return [padded, holes, ~holes]


def _probe_feed(canonical: Canonical, keep: np.ndarray) -> dict[str, np.ndarray]:
    """The mask input for `keep`: 1/0 for a binary mask, 0/finfo.min for an additive one."""
    if canonical.mask_input is None:
        return {}
    dtype = input_dtype(canonical.mask_input)
    if canonical.kind == "additive":
        return {canonical.mask_input.name: np.where(keep, 0, np.finfo(dtype).min).astype(dtype)}
    return {canonical.mask_input.name: keep.astype(dtype)}


def _mask_problem(value: np.ndarray, keep: np.ndarray, site: Site) -> str | None:
    """Why `value` is not the boolean or additive form of `keep` ([batch, 1, 1|seq, seq]; None when it is)."""
    try:
        shape = np.broadcast_shapes(value.shape, keep.shape)
    except ValueError:
        shape = ()
    batch, seq = keep.shape[0], keep.shape[-1]
    if len(shape) != 4 or shape[0] != batch or shape[-1] != seq:
        return f"its shape {list(value.shape)} does not broadcast to [batch, 1, 1, seq] = [{batch}, 1, 1, {seq}]"
    full = np.broadcast_to(value, shape)
    keep = np.broadcast_to(keep, shape)
    if site.where is not None:
        keep = keep if not site.removes_when else ~keep
        wrong = full != keep
        return f"the condition differs from the mask at {int(wrong.sum())} position(s)" if wrong.any() else None
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
