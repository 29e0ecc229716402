"""Model forms: the subgraphs a BERT export writes, and the ones bertopt writes back, each spelt once.

The Gelu, which fuse-gelu, legalize-ascend, legalize-ort and the Ascend checker all read or write:

- its decomposed spellings (`erf_gelu_pattern`, `tanh_gelu_pattern`, every association exporters write,
  see fuse-gelu's docstring) and the whole-node Gelus (`gelu_kind`: the ONNX op, ORT's contrib ops);
- the one node ONNX Runtime runs (`fused_gelu`): the ONNX ``Gelu`` at opset >= 20, else
  ``com.microsoft.Gelu`` (erf) or ``com.microsoft.FastGelu`` (tanh);
- the subgraph ATC takes (`atc_gelu`, recognised by `canonical_erf_pattern` / `canonical_tanh_pattern`):
  ``Mul(Mul(x, Add(Erf(Div(x, 1.4142135)), 1)), 0.5)``, the erf subgraph ATC's GeluONNXFusionPass fuses
  (a float16 x computed in float32 between two Casts: `_erf_gelu_in_float32` has the source), and
  ``Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), 0.7978846)), 1))``, which keeps x's type.

The two functions are never exchanged: erf and tanh Gelu differ by up to ~1e-3.

The LayerNorm in every spelling exporters write (`layernorm_pattern`; the one ATC fuses is
`bertopt.ascend.layernorm`'s).

Attention: its sub-patterns (`projection`, `heads`, `transpose`, shared with ATC's standard form in
`bertopt.ascend.form`), one block as the exporters write it (`attention_block_pattern`, found per Softmax
by `attention_blocks`, which attention-bigkernel rewrites), the Reshape merging the heads after a Softmax
(`context_reshape`), and the residual Add after the block (`residual_operand`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bertopt.graph.builder import Builder
from bertopt.graph.opset import in_onnx_domain
from bertopt.graph.pattern import Const, Match, OneOf, Op, Pat, Pattern, Var, _
from bertopt.graph.rules import Check, Rule
from bertopt.model.facts import ModelFacts

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBE_COEFF = 0.044715
# Exporters and fp16 models round these constants differently; 1e-3 still tells them apart.
CONSTANT_RTOL = 1e-3
# The largest relative error of rounding to float16 (half its machine epsilon).
FLOAT16_ROUNDING = 2.0 ** -11

ONNX_GELU_OPSET = 20
MS_DOMAIN = "com.microsoft"
ERF, TANH = "erf", "tanh"
# com.microsoft op -> function; BiasGelu is Gelu(x + bias), as ORT's own optimizer writes it.
MS_GELU_KINDS = {"Gelu": ERF, "BiasGelu": ERF, "FastGelu": TANH}
ONNX_APPROXIMATE = {"none": ERF, "tanh": TANH}


# ----------------------------------------------------------------------------- what exporters write

def _gate(x: Var, one_plus: Op) -> OneOf:
    """0.5 * x * one_plus, in each association exporters write."""
    return OneOf(Op("Mul", Op("Mul", x, one_plus), 0.5, name="out"),
                 Op("Mul", x, Op("Mul", 0.5, one_plus), name="out"),
                 Op("Mul", Op("Mul", 0.5, x), one_plus, name="out"),
                 Op("Div", Op("Mul", x, one_plus), 2.0, name="out"))


def erf_gelu_pattern() -> Pattern:
    x = Var("x")
    argument = OneOf(Op("Div", x, Const(SQRT2, rtol=CONSTANT_RTOL)),
                     Op("Mul", x, Const(1.0 / SQRT2, rtol=CONSTANT_RTOL)))
    return Pattern(_gate(x, Op("Add", Op("Erf", argument), 1.0)))


def tanh_gelu_pattern() -> Pattern:
    x = Var("x")
    sqrt_2_over_pi = Const(SQRT_2_OVER_PI, rtol=CONSTANT_RTOL)
    coeff = Const(CUBE_COEFF, rtol=CONSTANT_RTOL)
    cube = OneOf(Op("Pow", x, 3.0), Op("Mul", Op("Mul", x, x), x))
    coeff_x_squared = OneOf(Op("Mul", x, Op("Mul", x, coeff)), Op("Mul", Op("Mul", x, x), coeff))
    argument = OneOf(Op("Mul", Op("Add", x, Op("Mul", cube, coeff)), sqrt_2_over_pi),
                     Op("Mul", Op("Mul", x, sqrt_2_over_pi), Op("Add", coeff_x_squared, 1.0)))
    return Pattern(_gate(x, Op("Add", Op("Tanh", argument), 1.0)))


DECOMPOSED = {ERF: erf_gelu_pattern, TANH: tanh_gelu_pattern}

QUICK_GELU_ALPHA = 1.702


def quick_gelu_pattern() -> Pattern:
    """CLIP's quick_gelu, x * sigmoid(1.702 x): a function of its own (up to ~2e-2 from Gelu), never
    rewritten into a Gelu. ATC's FastGelu computes exactly it (x / (1 + exp(-1.702 |x|)) * exp(0.851 (x - |x|)),
    hicann/ops-nn activation/fast_gelu/README.md), but ATC's ONNX parser reaches that op only from the custom
    op NPUFastGelu (activation/fast_gelu/framework/npu_fast_gelu_onnx_plugin.cpp, 2025 source), which ONNX
    Runtime cannot run and no 2022 CANN source shows; no ONNX fusion pass for the Sigmoid form is known, so
    ATC compiles its Mul and Sigmoid as they are (both in every version's operator list)."""
    x = Var("x")
    return Pattern(Op("Mul", x, Op("Sigmoid", Op("Mul", x, Const(QUICK_GELU_ALPHA, rtol=CONSTANT_RTOL))), name="out"))


def gelu_kind(node: gs.Node) -> str | None:
    """ERF or TANH for a node that is a whole Gelu (ONNX op or ORT contrib op), else None."""
    if node.domain == MS_DOMAIN:
        return MS_GELU_KINDS.get(node.op)
    if node.op == "Gelu" and in_onnx_domain(node):
        return ONNX_APPROXIMATE.get(node.attrs.get("approximate", "none"))
    return None


def whole_gelu_pattern(kind: str) -> Pattern:
    """A Gelu of function `kind` that is one node; FastGelu and BiasGelu may take a bias (`m.get("bias")`,
    an omitted input has no name)."""
    def is_kind(node: gs.Node) -> bool:
        return gelu_kind(node) == kind

    ops, x, described = tuple(MS_GELU_KINDS), Var("x"), (is_kind, f"a whole {kind} Gelu")  # Gelu: ONNX's too
    return Pattern(OneOf(Op(ops, x, where=described), Op(ops, x, Var("bias"), where=described)))


# ----------------------------------------------------------------------------- what bertopt writes

def fused_gelu(b: Builder, x: gs.Tensor, kind: str) -> gs.Variable:
    """The one node ONNX Runtime runs for a Gelu of function `kind` at the graph's opset."""
    if b.graph.opset >= ONNX_GELU_OPSET:
        return b.Gelu(x, approximate="tanh" if kind == TANH else "none")
    return b.op("FastGelu" if kind == TANH else "Gelu", x, domain=MS_DOMAIN)


def fusion_rules(keep_atc_form: bool = False) -> list[Rule]:
    """Every decomposed Gelu as `fused_gelu` of its own function (rules named ERF and TANH); with
    `keep_atc_form`, one already in `atc_gelu`'s subgraph is declined."""
    def fuse(kind: str):
        return lambda match, b: fused_gelu(b, match["x"], kind)

    return [Rule(DECOMPOSED[kind](), fuse(kind), in_atc_form(kind) if keep_atc_form else None, name=kind)
            for kind in (ERF, TANH)]


def atc_gelu(b: Builder, x: gs.Tensor, kind: str) -> gs.Variable:
    """The Gelu of function `kind` as the subgraph ATC takes (the module docstring)."""
    if kind == ERF and _narrow_float(x):
        return _erf_gelu_in_float32(b, x)
    if kind == ERF:
        return b.Mul(b.Mul(x, b.Add(b.Erf(b.Div(x, SQRT2)), 1.0)), 0.5)
    cube = b.Mul(b.Pow(x, 3.0), CUBE_COEFF)
    return b.Mul(b.Mul(x, 0.5), b.Add(b.Tanh(b.Mul(b.Add(x, cube), SQRT_2_OVER_PI)), 1.0))


def _narrow_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f" and np.dtype(tensor.dtype).itemsize < 4


def _erf_gelu_in_float32(b: Builder, x: gs.Tensor) -> gs.Variable:
    """The erf Gelu of a float16 x in the one spelling ATC fuses for it: computed in float32 between Casts.

    GeluONNXFusionPass reads each scalar through a float pointer, whatever its type
    (`gelu_onnx_fusion_pass.cc` at canndev 17c9f69b, GetScalarFromOp line 138: `reinterpret_cast<const
    float*>`, after line 134 accepts DT_FLOAT16), so a float16 constant's two bytes are read as the low
    half of a float32 whose high half lies past the constant: not 1.41421 (line 205); nor does float16
    have a value within the pass's 1e-5 of it (the nearest, 1.4140625, is 1.5e-4 off). Float32
    constants are read right, and the pattern's input (Input0, lines 90-101) may be any node, here
    the Cast, so the pass fuses the float32 subgraph into its Gelu. Not checked: which type ATC then
    computes that Gelu in (the precision mode decides) and whether it merges the two Casts away.
    On ONNX Runtime the Gelu is computed more exactly than a float16 chain would, then rounded back.
    """
    wide = b.Cast(x, to=onnx.TensorProto.FLOAT)
    return b.Cast(atc_gelu(b, wide, ERF), to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(x.dtype)))


def canonical_erf_pattern() -> Pattern:
    x = Var("x")
    erf = Op("Erf", Op("Div", x, Const(SQRT2, rtol=1e-6)))
    inner = Op("Mul", x, Op("Add", erf, 1.0, commute=False), commute=False)
    return Pattern(Op("Mul", inner, 0.5, commute=False))


def canonical_tanh_pattern() -> Pattern:
    """The tanh form as `atc_gelu` writes it, its constants as rounded to float16 or float32."""
    x = Var("x")
    cube = Op("Mul", Op("Pow", x, 3.0), Const(CUBE_COEFF, rtol=FLOAT16_ROUNDING), commute=False)
    argument = Op("Mul", Op("Add", x, cube, commute=False), Const(SQRT_2_OVER_PI, rtol=FLOAT16_ROUNDING),
                  commute=False)
    gate = Op("Add", Op("Tanh", argument), 1.0, commute=False)
    return Pattern(Op("Mul", Op("Mul", x, 0.5, commute=False), gate, commute=False))


CANONICAL = {ERF: canonical_erf_pattern, TANH: canonical_tanh_pattern}


def in_atc_form(kind: str) -> Check:
    """A check leaving a Gelu alone when it already is `atc_gelu`'s subgraph of its function."""
    canonical = CANONICAL[kind]()

    def check(match: Match) -> str | None:
        return "already in the subgraph ATC takes" if canonical.match(match.root, match.graph) else None

    return check


# ----------------------------------------------------------------------------- LayerNorm

def layernorm_pattern() -> Pattern:
    """Any LayerNorm, bound to its input x: a LayerNormalization op (node `layernorm`), or the decomposed
    form in any spelling exporters write (`bertopt.ascend.layernorm` lists them; nodes `mean`, `centred`
    read by the variance, `square` (`Pow(d, 2)` or `Mul(d, d)`), `centred_twin` when the Div reads a second
    Sub, `upcast`/`downcast` for torch's float16 Casts, `variance`, `shifted_variance`, `deviation`,
    `normalised`, `scaled`, `shifted`).

    Operands of the Mul by gamma and the Add of beta may come in either order. Of the constants only
    the Pow exponent is read: gamma and beta may stay lazily loaded.
    """
    x = Var("x")
    mean = Op("ReduceMean", x, name="mean", partial_inputs=True)
    centred = Op("Sub", x, mean, name="centred")
    wide = OneOf(Op("Cast", centred, name="upcast"), centred)
    square = OneOf(Op("Pow", wide, Const(2.0), name="square"), Op("Mul", wide, wide, name="square"))
    variance = Op("ReduceMean", square, partial_inputs=True, name="variance")
    numerator = OneOf(wide, centred, Op("Sub", x, mean, name="centred_twin"))
    deviation = Op("Sqrt", Op("Add", variance, Const(), name="shifted_variance"), name="deviation")
    normalised = Op("Div", numerator, deviation, name="normalised")
    scaled = Op("Mul", OneOf(Op("Cast", normalised, name="downcast"), normalised), Const(), name="scaled")
    decomposed = Op("Add", scaled, Const(), name="shifted")
    op = Op("LayerNormalization", x, _, partial_inputs=True, outputs=None, name="layernorm")
    return Pattern(OneOf(op, decomposed))


# ----------------------------------------------------------------------------- attention

HEAD_PERM = [0, 2, 1, 3]  # [batch, seq, heads, head_dim] <-> [batch, heads, seq, head_dim]
KEY_PERM = [0, 1, 3, 2]  # K's last two axes swapped: [batch, heads, head_dim, seq]
SPLIT_KEY_PERM = [0, 2, 3, 1]  # both at once, from [batch, seq, heads, head_dim]
BATCHED_KEY_PERM = [0, 2, 1]  # SDPA's swap of [batch*heads, seq, head_dim]
# Exporters write the scale as 1/sqrt(head_dim), sqrt(head_dim) or the square root of either.
SCALE_RTOL = 1e-4
# How far from the Softmax the context Reshape is looked for (MatMul, [Reshape,] Transpose, Reshape).
CONTEXT_SEARCH_DEPTH = 5


def projection(x: Pat, tag: str) -> Op:
    """`Add(MatMul(x, W), b)` with constant W and b (either Add operand order)."""
    return Op("Add", Op("MatMul", x, Const(name=f"{tag}_weight"), name=f"{tag}_matmul"),
              Const(name=f"{tag}_bias"), name=f"{tag}_add")


def heads(source: Pat, facts: ModelFacts, tag: str) -> Op:
    """The Reshape of a projection to [batch, seq, heads, head_dim] (heads may be spelled -1)."""
    def splits_heads(values: np.ndarray) -> bool:
        flat = values.reshape(-1)
        return flat.size == 4 and int(flat[3]) == facts.head_dim and int(flat[2]) in (facts.heads, -1)

    described = f"[batch, seq, {facts.heads}, {facts.head_dim}]"
    target = Const(name=f"{tag}_shape", where=(splits_heads, described))
    return Op("Reshape", source, target, name=f"{tag}_reshape")


def transpose(source: Pat, perm: list[int], name: str) -> Op:
    return Op("Transpose", source, attrs={"perm": perm}, name=name)


def attention_block_pattern(facts: ModelFacts) -> Pattern:
    """One attention block, rooted at its context Reshape, in every form the exporters write.

    Q, K, V projected from `x` (nodes `{q,k,v}_matmul`, `{q,k,v}_add`, `{q,k,v}_reshape`, `{q,v}_transpose`);
    K transposed by `_key_spellings`; the scale after the scores (`scale`: Mul or Div) or before them (SDPA's
    `q_scale` and `k_scale`, XLM's `q_scale` alone); `mask_add` of `mask`, `softmax`, `context_matmul`, SDPA's
    `context_noop` Reshape, `context_transpose`, `context_reshape`; XLM's one-input cache Concats `k_cache`,
    `v_cache`.
    """
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


def attention_blocks(graph: gs.Graph, facts: ModelFacts,
                     softmaxes: list[gs.Node]) -> tuple[list[Match], dict[int, str]]:
    """The blocks `attention_block_pattern` matches whose mask Add adds a token mask to token scores
    (`mask_misfit`), in the order of their `softmaxes`, and for the index of each Softmax no block holds,
    why not: the matcher's reason at its context Reshape, or the misfit."""
    pattern = attention_block_pattern(facts)
    matches = pattern.find_all(graph)
    misfits = {id(m.node("softmax")): why for m in matches if (why := _block_mask_misfit(m, facts))}
    kept = [m for m in matches if id(m.node("softmax")) not in misfits]
    found = {id(m.node("softmax")) for m in kept}
    misses = {layer: misfits.get(id(softmax)) or _why_not(pattern, graph, softmax)
              for layer, softmax in enumerate(softmaxes) if id(softmax) not in found}
    order = {id(node): i for i, node in enumerate(softmaxes)}
    return sorted(kept, key=lambda m: order[id(m.node("softmax"))]), misses


def _block_mask_misfit(match: Match, facts: ModelFacts) -> str | None:
    scores = next(t for t in match.node("mask_add").inputs if t is not match["mask"])
    return mask_misfit(match["mask"].shape, scores.shape, facts.batch, facts.seq)


def mask_misfit(mask: list | None, scores: list | None, batch: int, seq: int) -> str | None:
    """Why what is added to attention scores of shape `scores` is not the attention mask of a
    [`batch`, `seq`] input (None when it may be): a mask is one for every head, broadcasting to
    [batch, 1, seq, seq], on scores [batch, heads, seq, seq]. Unknown shapes pass. Swin's window
    attention fails both: its scores are [batch * windows, heads, window, window] and it adds a
    relative position bias [1, heads, window, window]."""
    if batch is None or seq is None:
        return None
    known = [shape for shape in (mask, scores) if shape is not None and all(isinstance(d, int) for d in shape)]
    if scores in known and (len(scores) != 4 or scores[0] != batch or list(scores[2:]) != [seq, seq]):
        return (f"its scores are {list(scores)}, not [batch, heads, seq, seq] = [{batch}, heads, {seq}, {seq}] "
                "(windowed attention?)")
    if mask in known and not _broadcasts_to(tuple(mask), (batch, 1, seq, seq)):
        return (f"what it adds to the scores is {list(mask)}, not a mask: it does not broadcast to "
                f"[batch, 1, seq, seq] = [{batch}, 1, {seq}, {seq}] (a per-head bias?)")
    return None


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _why_not(pattern: Pattern, graph: gs.Graph, softmax: gs.Node) -> str:
    reshape = context_reshape(softmax)
    if reshape is None:
        return f"no context Reshape within {CONTEXT_SEARCH_DEPTH} nodes after it"
    return pattern.explain(reshape, graph)


def context_reshape(softmax: gs.Node) -> gs.Node | None:
    """The Reshape merging the heads after `softmax`: the nearest one reading a Transpose, else the
    nearest one (SDPA exports put a Reshape to the same shape between the MatMul and the Transpose)."""
    reshapes, frontier = [], [softmax.outputs[0]]
    for _depth in range(CONTEXT_SEARCH_DEPTH):
        nodes = [node for t in frontier for node in t.outputs]
        reshapes += [node for node in nodes if node.op == "Reshape"]
        frontier = [out for node in nodes for out in node.outputs]
    merging = [n for n in reshapes if n.inputs[0].inputs and n.inputs[0].inputs[0].op == "Transpose"]
    return (merging or reshapes or [None])[0]


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


def residual_operand(context: gs.Tensor) -> tuple[gs.Node, int] | None:
    """The residual Add after a block's output projection Add(MatMul(context, Wo), bo), and the index of
    its other input (what the residual reads); None where the block is not followed so."""
    tensor = context
    for op in ("MatMul", "Add", "Add"):
        readers = [node for node in tensor.outputs if node.op == op]
        if len(readers) != 1:
            return None
        projected, tensor = tensor, readers[0].outputs[0]
    residual = readers[0]
    index = next((i for i, t in enumerate(residual.inputs) if t is not projected), None)
    return None if index is None else (residual, index)
