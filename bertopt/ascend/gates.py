"""Will ATC fuse this block? ATC's fusion gates, per attention block and per fusion pass.

For each attention block the five fusions bertopt cares about, in the order ATC needs them:

- ``layer-norm``: `LayerNormONNXFusionPass` turns the decomposed LayerNorm producing the block's input
  into ATC's LayerNorm (or the model already has ONNX LayerNormalization, where the CANN version's
  parser takes it);
- ``ln-qkv``: `ZAttentionLnQKVONNXFusionPass`, that LayerNorm with the Q/K/V projections, which takes
  post-norm blocks only: a pre-norm block (GPT-2, ViT, CLIP, Whisper) is a ``form`` verdict saying so
  (whether a dead stand-in consumer, msit's `Add(x, 0)`, would survive to ATC's fusion is not known);
- ``mul-add``: `MulAddFusionPass`, the scale Mul and the mask Add into the FusedMulAdd the next needs;
- ``attention-score``: `ZAttentionScoreFusionPass`, scores, FusedMulAdd, Softmax and context;
- ``gelu``: `GeluONNXFusionPass`, the block's feed-forward Gelu in its erf spelling.

Each gets one verdict: ``fuses``; ``shape``, the form is right but the kernel will not take this shape,
chip or CANN version (the reasons name the condition and the numbers); or ``form``, the graph is not
in the form the pass matches (the reasons name the condition). The conditions and their numbers are
data, ``bertopt/data/fusion_gates.json``, keyed by CANN version and citing the line of the 2022
canndev source each was read from; the AI-core count per soc is data there too.

Decisions where the sources are silent:
- Precision: ATC's default on the 310P is ``force_fp16`` (facts note, section 3), so the float16
  conditions (LayerNorm output, Softmax output) are taken as met.
- ATC's own choices are assumed to go the fusing way: the FRACTAL_NZ format of the LayerNorm output,
  MatMul+Add becoming BatchMatMulV2 with bias, Reshape+Transpose becoming ConfusionTransposeD, K's
  second Transpose becoming the BatchMatMul's transpose flag. The form conditions
  (bertopt.ascend.form) are what bertopt can see of them.
- Consumer order: `ZAttentionLnQKVONNXFusionPass` takes the LayerNorm output's first three consumers
  (anchor order) as Q, K, V. bertopt assumes ATC's ONNX parser links consumers in the ONNX file's
  node order (not verified against the parser's source), so the residual Add must come after the
  three MatMuls in graph order.
- A pass a CANN version does not have (the attention passes in 5.0, by the commit dates) is a
  ``shape`` verdict: nothing in the graph could make it fuse.
- A soc whose AI-core count is not in the data does not fuse `ZAttentionLnQKVONNXFusionPass`, and
  says so: the pass fuses only at 8 or 32 cores.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.ascend.cann import CannTarget, version_key
from bertopt.ascend.form import BlockNodes, BlockReport, attention_softmaxes, block_facts, locate_block
from bertopt.ascend.layernorm import decomposed_layernorm_pattern
from bertopt.errors import BertoptError
from bertopt.graph.pattern import Const, OneOf, Op, Pattern, Var, _
from bertopt.model.encoder import is_token_flattening
from bertopt.model.facts import ModelFacts
from bertopt.model.forms import TANH, erf_gelu_pattern, gelu_kind, quick_gelu_pattern, tanh_gelu_pattern

FUSES, SHAPE, FORM = "fuses", "shape", "form"
FUSIONS = ("layer-norm", "ln-qkv", "mul-add", "attention-score", "gelu")
# GeluONNXFusionPass compares its 1.0 and 0.5 with std::numeric_limits<float>::epsilon().
FLOAT32_EPSILON = float(np.finfo(np.float32).eps)
# The form conditions each fusion needs (bertopt.ascend.form.CONDITIONS).
LN_QKV_FORM = ("2d-encoder", "ln-consumers", "qkv-form")
# Why no pre-norm block fuses (fusion_gates.json, ln-qkv sources, "pre_norm").
PRE_NORM_REASON = ("pre-norm block: its residual Add reads the LayerNorm's input, not its output, so the LayerNorm "
                   "output lacks the fourth consumer the pass requires beside Q, K and V (the residual Add it "
                   "relinks to the kernel's norm output: the pass is written for the post-norm block), and bertopt "
                   "writes no stand-in for it (msit's dead Add(x, 0))")
ATTENTION_SCORE_FORM = ("qkv-form", "scale-mul", "mask-shape", "context-reshape")


# ----------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class FusionGates:
    """One CANN version's gate data: the conditions of each pass, and the passes it does not have."""

    cann: str
    source: str
    passes: dict[str, dict]  # fusion -> its entry in fusion_gates.json
    absent: dict[str, str]  # fusion -> why this version has no such pass
    note: str

    def pass_name(self, fusion: str) -> str:
        return self.passes[fusion]["pass"]

    @property
    def attention_passes(self) -> list[str]:
        """The big-kernel passes, whose effect fusion_result.json must show where they were predicted."""
        return [entry["pass"] for entry in self.passes.values() if entry.get("attention")]


def fusion_gates(target: CannTarget) -> FusionGates:
    """The gates of `target`'s CANN version; BertoptError when the data has none for it."""
    data = _data()
    key = version_key(target.version)
    for entry in data["versions"]:
        upper = entry["to"]
        if version_key(entry["from"]) <= key and (upper is None or key <= version_key(upper)):
            gate_set = data["gate_sets"][entry["gate_set"]]
            return FusionGates(cann=target.version, source=gate_set["source"], passes=gate_set["passes"],
                               absent=entry["absent"], note=entry["note"])
    raise BertoptError(f"no fusion-gate data for {target.label} in bertopt/data/fusion_gates.json")


def ai_core_count(soc: str) -> int | None:
    """The AI-core count of `soc` ("Ascend310P3"), or None when bertopt's data does not have it."""
    entry = _data()["ai_core_counts"].get(soc)
    return entry["count"] if entry else None


@functools.lru_cache(maxsize=None)
def _data() -> dict:
    return json.loads(importlib.resources.files("bertopt").joinpath("data", "fusion_gates.json").read_text())


# ----------------------------------------------------------------------------- shape and chip gates

@dataclass(frozen=True)
class AttentionShape:
    """The numbers the kernels' gates test, for one block of a static model (`block_facts`)."""

    batch: int
    seq: int
    hidden: int
    heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        """M of the LayerNorm+QKV kernel: the rows of the 2-D [batch*seq, hidden] encoder."""
        return self.batch * self.seq

    @classmethod
    def of(cls, facts: ModelFacts) -> "AttentionShape | None":
        if not facts.is_static:
            return None
        return cls(facts.batch, facts.seq, facts.hidden, facts.heads, facts.head_dim)


def ln_qkv_shape_gates(shape: AttentionShape, soc: str, gates: FusionGates) -> list[str]:
    """The conditions of `ZAttentionLnQKVONNXFusionPass` this shape and chip fail, with their numbers."""
    if "ln-qkv" in gates.absent:
        return [f"CANN {gates.cann} has no {gates.pass_name('ln-qkv')}: {gates.absent['ln-qkv']}"]
    g = gates.passes["ln-qkv"]
    failed = []
    cores = ai_core_count(soc)
    if cores is None:
        failed.append(f"the AI-core count of {soc} is not in bertopt's data; the kernel runs only on "
                      f"{_either(g['ai_core_counts'])} cores")
    elif cores not in g["ai_core_counts"]:
        failed.append(f"{soc} has {cores} AI cores, not {_either(g['ai_core_counts'])}")
    if shape.hidden not in g["hidden"]:
        failed.append(f"hidden = {shape.hidden} is not {_either(g['hidden'])}")
    align = g["align"]
    for label, value in (("batch*seq", shape.tokens), ("hidden", shape.hidden)):
        if value % align:
            failed.append(f"{label} = {value} is not a multiple of {align}")
    if all(shape.tokens % m for m in g["tokens_multiple_of_any"]):
        failed.append(f"batch*seq = {shape.tokens} is not a multiple of {_either(g['tokens_multiple_of_any'])}")
    if shape.seq % align:
        failed.append(f"seq = {shape.seq} is not a multiple of {align}")
    else:
        tiles = shape.seq // align
        if not any(t % tiles == 0 or tiles % t == 0 for t in g["seq_tiles_of_any"]):
            failed.append(f"seq/{align} = {tiles} neither divides nor is a multiple of "
                          f"{_either(g['seq_tiles_of_any'])}")
    return failed


def attention_score_shape_gates(shape: AttentionShape, soc: str, gates: FusionGates) -> list[str]:
    """The conditions of `ZAttentionScoreFusionPass` this shape and chip fail, with their numbers."""
    if "attention-score" in gates.absent:
        return [f"CANN {gates.cann} has no {gates.pass_name('attention-score')}: "
                f"{gates.absent['attention-score']}"]
    g = gates.passes["attention-score"]
    failed = []
    refused = [family for family in g["inference_refused_on"] if family in soc]
    if refused:
        failed.append(f"{soc}: the pass refuses inference graphs on {refused[0]} (it fuses training there)")
    elif not any(family in soc for family in g["soc_contains_any"]):
        failed.append(f"{soc} is not {_either(g['soc_contains_any'])}")
    if shape.batch > g["max_batch"]:
        failed.append(f"batch = {shape.batch} is above {g['max_batch']}")
    if shape.heads not in g["heads"]:
        failed.append(f"heads = {shape.heads} is not {_either(sorted(g['heads']))}")
    if shape.head_dim != g["head_dim"]:
        failed.append(f"head_dim = {shape.head_dim} is not {g['head_dim']}")
    if shape.seq % g["seq_multiple_of"]:
        failed.append(f"seq = {shape.seq} is not a multiple of {g['seq_multiple_of']}")
    if shape.seq > g["max_seq"]:
        failed.append(f"seq = {shape.seq} is above {g['max_seq']}")
    if (shape.batch * shape.heads) % g["batch_heads_multiple_of"]:
        failed.append(f"batch*heads = {shape.batch * shape.heads} is not a multiple of "
                      f"{g['batch_heads_multiple_of']}")
    return failed


def _either(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" or {values[-1]}"


# ----------------------------------------------------------------------------- verdicts

@dataclass
class FusionVerdict:
    fusion: str  # one of FUSIONS
    pass_name: str
    verdict: str  # FUSES | SHAPE | FORM
    reasons: list[str] = field(default_factory=list)

    @property
    def fuses(self) -> bool:
        return self.verdict == FUSES

    def line(self) -> str:
        """`pass: reason; reason` (or `pass` alone when it fuses)."""
        return self.pass_name + (": " + "; ".join(self.reasons) if self.reasons else "")


@dataclass
class BlockPrediction:
    layer: int
    verdicts: list[FusionVerdict]

    @property
    def fuses(self) -> bool:
        return all(v.fuses for v in self.verdicts)

    def verdict(self, fusion: str) -> FusionVerdict:
        return next(v for v in self.verdicts if v.fusion == fusion)


@dataclass
class FusionPrediction:
    """What ATC's fusion passes are predicted to do to every attention block of one model."""

    cann: str
    soc: str
    ai_core_count: int | None
    gate_source: str
    gate_note: str
    blocks: list[BlockPrediction]
    attention_passes: list[str]

    @property
    def all_fuse(self) -> bool:
        """Every block predicted to fuse in all five passes (False for a model without blocks)."""
        return bool(self.blocks) and all(block.fuses for block in self.blocks)

    def expected_effects(self) -> dict[str, int]:
        """Pass name -> the number of blocks it is predicted to fuse."""
        counts = {v.pass_name: 0 for block in self.blocks for v in block.verdicts}
        for block in self.blocks:
            for v in block.verdicts:
                counts[v.pass_name] += v.fuses
        return counts

    def grouped(self) -> list[tuple[str, FusionVerdict]]:
        """(which blocks, verdict) per fusion in FUSIONS order, blocks with the same verdict together."""
        rows = []
        for fusion in FUSIONS:
            groups: dict[tuple[str, str], tuple[list[int], FusionVerdict]] = {}
            for block in self.blocks:
                v = block.verdict(fusion)
                groups.setdefault((v.verdict, v.line()), ([], v))[0].append(block.layer)
            rows += [(_layers(layers, len(self.blocks)), v) for layers, v in groups.values()]
        return rows

    def failures(self) -> list[str]:
        """One line per distinct failing verdict, naming the pass, the gate and the blocks it holds for."""
        return [f"{v.fusion} ({v.verdict}) in {blocks}: {v.line()}" for blocks, v in self.grouped() if not v.fuses]

    def to_dict(self) -> dict:
        return {"cann": self.cann, "soc": self.soc, "ai_core_count": self.ai_core_count,
                "gate_source": self.gate_source, "gate_note": self.gate_note, "all_fuse": self.all_fuse,
                "expected_effects": self.expected_effects(), "attention_passes": self.attention_passes,
                "blocks": [{"layer": b.layer, "fuses": b.fuses, "fusions": [asdict(v) for v in b.verdicts]}
                           for b in self.blocks]}


def _layers(layers: list[int], total: int) -> str:
    if len(layers) == total and total > 1:
        return f"all {total} blocks"
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))


def predict_fusion(graph: gs.Graph, facts: ModelFacts, blocks: list[BlockReport], target: CannTarget,
                   soc: str) -> FusionPrediction:
    """Each block's five verdicts. `blocks` are check_blocks' reports on the same graph (shapes inferred)."""
    gates = fusion_gates(target)
    order = {id(node): index for index, node in enumerate(graph.nodes)}
    softmaxes = attention_softmaxes(graph)
    gelus = _gelu_sites(graph)
    predictions = []
    for index, (report, softmax) in enumerate(zip(blocks, softmaxes)):
        nodes = locate_block(softmax)
        here = block_facts(facts, nodes)
        shape = AttentionShape.of(here)
        forms = {check.name: check for check in report.checks}
        layer_norm = _layer_norm_verdict(graph, nodes, target, gates)
        mul_add = _mul_add_verdict(nodes, here, gates)
        following = softmaxes[index + 1] if index + 1 < len(softmaxes) else None
        predictions.append(BlockPrediction(report.layer, [
            layer_norm,
            _ln_qkv_verdict(nodes, forms, layer_norm, here, shape, soc, gates, order),
            mul_add,
            _attention_score_verdict(nodes, forms, mul_add, shape, soc, gates),
            _gelu_verdict(graph, gelus, softmax, following, order, gates),
        ]))
    return FusionPrediction(cann=target.version, soc=soc, ai_core_count=ai_core_count(soc),
                            gate_source=gates.source, gate_note=gates.note, blocks=predictions,
                            attention_passes=gates.attention_passes)


def _verdict(fusion: str, gates: FusionGates, form: list[str], shape: list[str]) -> FusionVerdict:
    """Form problems first: a kernel's shape gates only matter once its pattern is there. The shape gates
    that would fail anyway follow them (ViT-B/16's 197 tokens fail AttentionScore whatever the form)."""
    name = gates.pass_name(fusion)
    if form:
        return FusionVerdict(fusion, name, FORM, form + [f"in form, still not at this shape: {r}" for r in shape])
    if shape:
        return FusionVerdict(fusion, name, SHAPE, shape)
    return FusionVerdict(fusion, name, FUSES)


def _failed_forms(forms: dict, names: tuple[str, ...]) -> list[str]:
    return [f"{name}: {forms[name].reason}" for name in names if forms[name].ok is False]


# ----------------------------------------------------------------------------- LayerNorm

def _layer_norm_verdict(graph: gs.Graph, nodes: BlockNodes, target: CannTarget,
                        gates: FusionGates) -> FusionVerdict:
    name = gates.pass_name("layer-norm")
    x = nodes.x
    producer = x.inputs[0] if x is not None and x.inputs else None
    if producer is not None and is_token_flattening(producer) and producer.inputs[0].inputs:
        # GPT-2's Conv1D flattens the tokens before its projection: the LayerNorm is above that Reshape
        x, producer = producer.inputs[0], producer.inputs[0].inputs[0]
    if producer is None:
        return FusionVerdict("layer-norm", name, FORM, ["cannot find the block input's LayerNorm"])
    if producer.op == "LayerNormalization":
        if target.layer_normalization:
            return FusionVerdict("layer-norm", name, FUSES,
                                 [f"ONNX LayerNormalization '{producer.name}', which {target.label}'s parser "
                                  "takes as ATC's LayerNorm (no fusion pass needed)"])
        return FusionVerdict("layer-norm", name, FORM,
                             [f"ONNX LayerNormalization '{producer.name}' is not in {target.label}'s operator "
                              "list; legalize-ascend writes it decomposed"])
    pattern = decomposed_layernorm_pattern()
    if pattern.match(producer, graph) is None:
        return FusionVerdict("layer-norm", name, FORM,
                             [f"'{x.name}' is not the decomposed LayerNorm the pass matches: "
                              + pattern.explain(producer, graph)])
    return FusionVerdict("layer-norm", name, FUSES)


# ----------------------------------------------------------------------------- LayerNorm + QKV

def _ln_qkv_verdict(nodes: BlockNodes, forms: dict, layer_norm: FusionVerdict, facts: ModelFacts,
                    shape: AttentionShape | None, soc: str, gates: FusionGates, order: dict[int, int]) -> FusionVerdict:
    form = [] if layer_norm.fuses else ["the block input is not made by a LayerNorm ATC fuses (see layer-norm)"]
    if facts.norm_position == "pre":
        form.append(PRE_NORM_REASON)
    form += _failed_forms(forms, LN_QKV_FORM)
    if not form:
        form += _consumer_order(nodes.x, order)
    if shape is None:
        form.append("the graph inputs are not static")
    return _verdict("ln-qkv", gates, form, [] if shape is None else ln_qkv_shape_gates(shape, soc, gates))


def _consumer_order(x: gs.Tensor, order: dict[int, int]) -> list[str]:
    """The residual Add must come after the three projections (see the module docstring)."""
    readers = sorted(x.outputs, key=lambda node: order.get(id(node), -1))
    if [node.op for node in readers[:3]] == ["MatMul"] * 3:
        return []
    return [f"in node order '{x.name}' is read first by {', '.join(n.op for n in readers)}: the pass takes "
            "the LayerNorm's first three consumers as Q, K, V and needs the residual Add last"]


# ----------------------------------------------------------------------------- scale Mul + mask Add

def _mul_add_verdict(nodes: BlockNodes, facts: ModelFacts, gates: FusionGates) -> FusionVerdict:
    g = gates.passes["mul-add"]
    mul = nodes.scores.inputs[0] if nodes.scores is not None and nodes.scores.inputs else None
    if mul is None or mul.op != "Mul":
        found = "nothing" if mul is None else f"{mul.op} '{mul.name}'"
        return _verdict("mul-add", gates, [f"the scores added to the mask come from {found}, not a Mul"], [])
    form = []
    if g["name_contains"] not in mul.name:
        form.append(f"the Mul's name '{mul.name}' does not contain '{g['name_contains']}'")
    excluded = [word for word in g["name_excludes"] if word in mul.name]
    if excluded:
        form.append(f"the Mul's name '{mul.name}' contains '{excluded[0]}'")
    if len(mul.inputs) != 2:
        form.append(f"the Mul has {len(mul.inputs)} inputs, not 2")
    readers = mul.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "Add":
        form.append(f"the Mul is read by {', '.join(n.op for n in readers) or 'nothing'}, not by one Add")
    else:
        form += _mask_add_problems(readers[0], mul.outputs[0])
    if not facts.is_static:
        form.append("the graph inputs are not static (the pass leaves dynamic shapes alone)")
    return _verdict("mul-add", gates, form, [])


def _mask_add_problems(add: gs.Node, scaled: gs.Tensor) -> list[str]:
    if len(add.inputs) != 2:
        return [f"the Add '{add.name}' has {len(add.inputs)} inputs, not 2"]
    other = add.inputs[1] if add.inputs[0] is scaled else add.inputs[0]
    producer = other.inputs[0] if other.inputs else None
    if producer is not None and len(producer.outputs) != 1:
        return [f"the mask comes from {producer.op} '{producer.name}', which has {len(producer.outputs)} "
                "outputs (the pass wants 1)"]
    return []


# ----------------------------------------------------------------------------- attention score

def _attention_score_verdict(nodes: BlockNodes, forms: dict, mul_add: FusionVerdict,
                             shape: AttentionShape | None, soc: str, gates: FusionGates) -> FusionVerdict:
    form = _failed_forms(forms, ATTENTION_SCORE_FORM)
    if not mul_add.fuses:
        form.append(f"no FusedMulAdd: {mul_add.line()}")
    form += _score_names(nodes)
    if shape is None:
        form.append("the graph inputs are not static")
    return _verdict("attention-score", gates, form,
                    [] if shape is None else attention_score_shape_gates(shape, soc, gates))


def _score_names(nodes: BlockNodes) -> list[str]:
    """The pass skips training tapes and quantised graphs by node name (lines 290-297, 323-334)."""
    probs = nodes.softmax.outputs[0]
    context = next((n for n in probs.outputs if n.op == "MatMul"), None)
    if context is None:
        return []
    problems = [f"the context MatMul's name '{context.name}' contains 'gradient_tape'"] \
        if "gradient_tape" in context.name else []
    merged = context.outputs[0].outputs
    transposed = merged[0].outputs[0].outputs if len(merged) == 1 and merged[0].op == "Transpose" else []
    after = [n for reshape in transposed if reshape.op == "Reshape" for n in reshape.outputs[0].outputs]
    problems += [f"'{n.name}', reading the context, has 'Quant' in its name" for n in after if "Quant" in n.name]
    return problems


# ----------------------------------------------------------------------------- Gelu

def atc_gelu_pattern(gates: FusionGates) -> Pattern:
    """The erf Gelu exactly as GeluONNXFusionPass matches it (both arrangements of its two Muls)."""
    g = gates.passes["gelu"]
    scalar = (lambda values: values.size == 1 and values.ndim <= 1, "a scalar (shape [] or [1])")
    x = Var("x")
    div = Op("Div", x, Const(g["div_constant"], rtol=0.0, atol=g["div_tolerance"], where=scalar))
    gate = Op("Add", Op("Erf", div), Const(g["add_constant"], rtol=0.0, atol=FLOAT32_EPSILON, where=scalar))
    half = Const(g["mul_constant"], rtol=0.0, atol=FLOAT32_EPSILON, where=scalar)
    return Pattern(OneOf(Op("Mul", Op("Mul", _, half), gate), Op("Mul", Op("Mul", x, gate), half)))


def _gelu_sites(graph: gs.Graph) -> list[tuple[gs.Node, str]]:
    """Every Gelu in any spelling (root node, "erf" or "tanh"), in graph order."""
    found = [(node, gelu_kind(node)) for node in graph.nodes if gelu_kind(node)]
    for kind, pattern in (("erf", erf_gelu_pattern()), (TANH, tanh_gelu_pattern())):
        found += [(match.root, kind) for match in pattern.find_all(graph, allow_escape=True)]
    return found


def _gelu_verdict(graph: gs.Graph, sites: list[tuple[gs.Node, str]], softmax: gs.Node,
                  following: gs.Node | None, order: dict[int, int], gates: FusionGates) -> FusionVerdict:
    """The block's feed-forward Gelu: the first one after its Softmax and before the next block's."""
    start, end = order[id(softmax)], order[id(following)] if following is not None else len(order)
    mine = sorted(((node, kind) for node, kind in sites if start < order[id(node)] < end),
                  key=lambda site: order[id(site[0])])
    if not mine:
        quick = [m.root for m in quick_gelu_pattern().find_all(graph)
                 if start < order.get(id(m.root), -1) < end]
        if quick:
            return _verdict("gelu", gates, [f"quick_gelu x * sigmoid(1.702 x) at '{quick[0].name}' (CLIP): not a "
                                            "Gelu; ATC compiles its Mul and Sigmoid as they are"], [])
        return _verdict("gelu", gates, ["no Gelu between this block's Softmax and the next"], [])
    node, kind = mine[0]
    if gelu_kind(node):
        return _verdict("gelu", gates, [f"a {node.op} op '{node.name}', not the erf subgraph the pass matches "
                                        "(legalize-ascend writes it)"], [])
    if kind == TANH:
        return _verdict("gelu", gates, [f"the tanh approximation ending at '{node.name}': the pass matches "
                                        "only the erf form"], [])
    pattern = atc_gelu_pattern(gates)
    if pattern.match(node, graph) is None:
        return _verdict("gelu", gates, [f"the erf Gelu ending at '{node.name}' is not spelt as the pass matches: "
                                        + pattern.explain(node, graph)], [])
    return _verdict("gelu", gates, [], [])
