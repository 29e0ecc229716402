"""fold-attention-mask on every mask form: goldens before/after, parity, counts, fp16 range, no-change."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ
from onnx import TensorProto, helper, numpy_helper
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.errors import BertoptError
from bertopt.graph import load_graph, to_model
from bertopt.model.facts import detect_facts
from bertopt.passes.fold_attention_mask import fold_attention_mask
from bertopt.pipeline import PassOptions
from bertopt.testing import assert_graph_matches, assert_parity, run_spec

GOLDEN = GOLDEN_DIR / "fold-attention-mask"
FOLD = "fold-attention-mask"
FP16_MAX = 65504.0
FINFO_MIN = float(np.finfo(np.float32).min)

# golden name -> (export variant, passes run before the fold)
EXPORTS = {
    "legacy14-dynamic": ("legacy14", ""),
    "legacy14": ("legacy14", "freeze-shapes"),
    "legacy17": ("legacy17", "freeze-shapes"),
    "sdpa14": ("sdpa14", "freeze-shapes"),
    "dynamo18-dynamic": ("dynamo18", ""),
    "dynamo18": ("dynamo18", "freeze-shapes"),
    "dynamo23sdpa": ("dynamo23sdpa", "freeze-shapes"),
}


# --------------------------------------------------------------------------- a transformers 4.20 graph

HIDDEN, HEADS, VOCAB = 32, 2, 100
HEAD_DIM = HIDDEN // HEADS


def chain420_model(fill: float = -10000.0, *, commuted: bool = False, bias: float | None = None,
                   with_mask: bool = True, where: str | None = None,
                   head_bias: int | None = None) -> onnx.ModelProto:
    """A two-layer BERT encoder whose extended mask is the transformers <= 4.20 chain.

    `commuted` swaps the operands of the mask Mul and of the scores Add; `bias` adds a constant to
    the mask (then it is no longer a pure mask); `with_mask=False` drops the mask and its input;
    `where` masks with masked_fill instead: "removed" is Where(mask == 0, fill, scores) as XLM writes
    it, "kept" is Where(bool(mask), scores, fill). `head_bias` (with `with_mask=False`) adds a zero
    constant [1, heads, head_bias, head_bias] to the scores, as a zero-initialised relative position bias.
    """
    rng = np.random.default_rng(42)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, *shape: int) -> str:
        return const(name, rng.normal(0, 0.2, size=shape).astype(np.float32))

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_node", **attrs))
        return output

    words = node("Gather", [weight("word_table", VOCAB, HIDDEN), "input_ids"], "words")
    types = node("Gather", [weight("type_table", 2, HIDDEN), "token_type_ids"], "types")
    hidden = node("Add", [words, types], "embeddings")
    mask = None
    if with_mask:
        mask = node("Unsqueeze", ["attention_mask", const("axis1", np.array([1]))], "mask_u1")
        mask = node("Unsqueeze", [mask, const("axis2", np.array([2]))], "mask_u2")
        mask = node("Cast", [mask], "mask_float", to=TensorProto.FLOAT)
        mask = node("Sub", [const("one", np.float32(1.0)), mask], "mask_inverted")
        fill_name = const("fill", np.float32(fill))
        mask = node("Mul", [fill_name, mask] if commuted else [mask, fill_name], "extended_mask")
        if bias is not None:
            mask = node("Add", [mask, const("bias", np.float32(bias))], "biased_mask")
        if where == "removed":
            mask = node("Equal", ["mask_u2", const("zero", np.int64(0))], "mask_removed")
        elif where == "kept":
            mask = node("Cast", ["mask_u2"], "mask_kept", to=TensorProto.BOOL)
    heads_shape = const("heads_shape", np.array([0, 0, HEADS, HEAD_DIM]))
    merged_shape = const("merged_shape", np.array([0, 0, HIDDEN]))
    for layer in range(2):
        def project(kind: str, perm: list[int]) -> str:
            out = node("MatMul", [hidden, weight(f"w{kind}{layer}", HIDDEN, HIDDEN)], f"{kind}{layer}")
            out = node("Reshape", [out, heads_shape], f"{kind}{layer}_heads")
            return node("Transpose", [out], f"{kind}{layer}_t", perm=perm)

        q, k, v = project("q", [0, 2, 1, 3]), project("k", [0, 2, 3, 1]), project("v", [0, 2, 1, 3])
        scores = node("MatMul", [q, k], f"scores{layer}")
        scale = const(f"scale{layer}", np.float32(np.sqrt(HEAD_DIM)))
        scores = node("Div", [scores, scale], f"scaled{layer}")
        if where == "removed":
            scores = node("Where", [mask, const(f"fill{layer}", np.float32(fill)), scores], f"masked{layer}")
        elif where == "kept":
            scores = node("Where", [mask, scores, const(f"fill{layer}", np.float32(fill))], f"masked{layer}")
        elif mask is not None:
            scores = node("Add", [mask, scores] if commuted else [scores, mask], f"masked{layer}")
        elif head_bias:
            zeros = const(f"head_bias{layer}", np.zeros((1, HEADS, head_bias, head_bias), np.float32))
            scores = node("Add", [scores, zeros], f"biased{layer}")
        probs = node("Softmax", [scores], f"probs{layer}", axis=-1)
        context = node("MatMul", [probs, v], f"context{layer}")
        context = node("Transpose", [context], f"context{layer}_t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merged_shape], f"context{layer}_merged")
        hidden = node("Add", [hidden, context], f"layer{layer}")
    nodes.append(helper.make_node("Identity", [hidden], ["last_hidden_state"], name="output"))
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids")
             if with_mask or name != "attention_mask"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"]) for name in names]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                           ["batch", "sequence", HIDDEN])
    graph = helper.make_graph(nodes, "bert420", inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


HAND_BUILT = {
    "chain420": chain420_model(),
    "chain420-commuted": chain420_model(commuted=True),
    "chain420-finfo": chain420_model(FINFO_MIN),
}
MASKED_FILL = {"removed": chain420_model(FINFO_MIN, where="removed"),
               "kept": chain420_model(FINFO_MIN, where="kept")}

# golden name -> (family, export variant, export options): exports users bring (issue 12), frozen first
USER_EXPORTS = {
    "nomask-legacy14": ("bert", "legacy14", {"mask": "none"}),
    "float-dynamo18": ("bert", "dynamo18", {"mask": "float"}),
    "additive-legacy14": ("bert", "legacy14", {"mask": "additive"}),
    "fp16-dynamo18": ("bert", "dynamo18", {"dtype": "fp16"}),
    "sdpa-dynamo18": ("bert", "dynamo18sdpa", {}),
    "xlm-legacy14": ("xlm", "legacy14", {}),
    "gpt2-dynamo18": ("gpt2", "dynamo18", {}),
}


# --------------------------------------------------------------------------- helpers

def _before_and_after(model, previous: str, **options):
    spec = f"{previous},{FOLD}" if previous else FOLD
    if previous:
        before = run_spec(model, previous, batch=TINY_BATCH, seq=TINY_SEQ).graph
    else:
        before = load_graph(model)
    return before, run_spec(model, spec, batch=TINY_BATCH, seq=TINY_SEQ, **options)


def _mask_operands(graph: gs.Graph) -> list[gs.Tensor]:
    """What each attention layer adds to its scores: the mask Add operand or the Attention attn_mask."""
    found = []
    for node in graph.nodes:
        if node.op == "Attention":
            found.append(node.inputs[3])
        elif node.op == "Softmax" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Add":
            add = node.inputs[0].inputs[0]
            found.extend(t for t in add.inputs if _graph_inputs_read(t) == {"attention_mask"})
    return found


def _graph_inputs_read(tensor: gs.Tensor) -> set[str]:
    return {t.name for t in _upstream(tensor) if not t.inputs and not isinstance(t, gs.Constant)}


def _upstream(tensor: gs.Tensor) -> list[gs.Tensor]:
    seen, stack, found = set(), [tensor], []
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        found.append(t)
        stack.extend(t.inputs[0].inputs if t.inputs else [])
    return found


def _mask_path_constants(graph: gs.Graph) -> list[float]:
    return [float(v) for mask in _mask_operands(graph) for t in _upstream(mask)
            if isinstance(t, gs.Constant) and t.values.dtype.kind == "f" for v in t.values.reshape(-1)]


# --------------------------------------------------------------------------- goldens and parity

@pytest.mark.golden
@pytest.mark.parametrize("name", list(EXPORTS))
def test_exports_golden_and_parity(tiny_export, name):
    variant, previous = EXPORTS[name]
    path = tiny_export(variant)
    before, after = _before_and_after(path, previous)
    assert after.record(FOLD).changed, after.record(FOLD).notes
    assert_graph_matches(before, GOLDEN / f"{name}.before.txt")
    assert_graph_matches(after.graph, GOLDEN / f"{name}.after.txt")
    assert_parity(path, after)


@pytest.mark.golden
@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_hand_built_chains_golden_and_parity(name):
    """The commuted chain prints like the plain one; every chain folds to the same graph."""
    model = HAND_BUILT[name]
    before, after = _before_and_after(model, "")
    assert after.record(FOLD).changed, after.record(FOLD).notes
    assert_graph_matches(before, GOLDEN / f"{name.replace('-commuted', '')}.before.txt")
    assert_graph_matches(after.graph, GOLDEN / "chain420.after.txt")
    assert_parity(model, after)


@pytest.mark.golden
@pytest.mark.parametrize("name", list(USER_EXPORTS))
def test_user_exports_golden_parity_and_second_run(user_export, name):
    family, variant, options = USER_EXPORTS[name]
    path = user_export(family, variant, **options)
    before, after = _before_and_after(path, "freeze-shapes")
    assert after.record(FOLD).changed, after.record(FOLD).notes
    assert_graph_matches(before, GOLDEN / f"{name}.before.txt")
    assert_graph_matches(after.graph, GOLDEN / f"{name}.after.txt")
    assert_parity(path, after)
    again = run_spec(to_model(after.graph), FOLD, batch=TINY_BATCH, seq=TINY_SEQ).record(FOLD)
    assert not again.changed and "already share the canonical mask" in again.notes[0]


@pytest.mark.golden
def test_a_mask_carrying_t5s_position_bias_is_folded_and_the_bias_kept(tiny_export):
    """T5 exported with SDPA: Where(mask, position_bias, finfo.min) is added to the scores (-inf in fp16);
    the bias moves onto the scores and the mask becomes the canonical one."""
    path = tiny_export("sdpa14", preset="t5-tiny-encoder")
    before, after = _before_and_after(path, "freeze-shapes")
    record = after.record(FOLD)
    assert record.changed and record.counts["biases_kept"] == 1, record.notes
    assert "the bias it carried in 2 layer(s) is added to their scores" in record.notes[0]
    assert all(abs(v) <= FP16_MAX for v in _mask_path_constants(after.graph))
    assert not [n for n in after.graph.nodes if n.op == "Where"]
    assert_graph_matches(before, GOLDEN / "t5-sdpa14.before.txt")
    assert_graph_matches(after.graph, GOLDEN / "t5-sdpa14.after.txt")
    assert_parity(path, after)
    again = run_spec(to_model(after.graph), FOLD, batch=TINY_BATCH, seq=TINY_SEQ).record(FOLD)
    assert not again.changed and "already share the canonical mask" in again.notes[0]


@pytest.mark.parametrize("form", list(MASKED_FILL))
def test_masked_fill_becomes_the_canonical_add(form):
    """Both orientations of Where(condition, fill, scores) fold to the graph the Add chain folds to."""
    model = MASKED_FILL[form]
    result = run_spec(model, FOLD, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(FOLD)
    assert record.counts["layers"] == 2 and "old masking constant(s): -3.40282e+38" in record.notes[0]
    assert not [n for n in result.graph.nodes if n.op == "Where"]
    assert_graph_matches(result.graph, GOLDEN / "chain420.after.txt")
    assert_parity(model, result)


def test_a_where_that_fills_kept_tokens_is_not_folded():
    """Where(bool(mask), fill, scores) removes the tokens the mask keeps: the probe must refuse it."""
    model = chain420_model(FINFO_MIN, where="kept")
    for node in model.graph.node:
        if node.op_type == "Where":
            node.input[1], node.input[2] = node.input[2], node.input[1]
    record = run_spec(model, FOLD, batch=TINY_BATCH, seq=TINY_SEQ).record(FOLD)
    assert not record.changed
    assert "the condition differs from the mask" in record.notes[0]


# --------------------------------------------------------------------------- what the pass reports

@pytest.mark.parametrize("name, masks, guards, old_constant", [
    ("legacy14", 1, 0, "-3.40282e+38"),
    ("legacy14-dynamic", 1, 0, "-3.40282e+38"),
    ("sdpa14", 2, 2, "-inf"),
    ("dynamo18", 1, 0, "-3.40282e+38"),
    ("dynamo23sdpa", 1, 0, "none (boolean mask)"),
])
def test_counts_and_old_constant(tiny_export, name, masks, guards, old_constant):
    variant, previous = EXPORTS[name]
    spec = f"{previous},{FOLD}" if previous else FOLD
    result = run_spec(tiny_export(variant), spec, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(FOLD)
    assert record.counts["masks_replaced"] == masks
    assert record.counts["layers"] == 2
    assert record.counts["nan_guards_removed"] == guards
    assert record.counts["nodes_removed"] > 0
    assert f"old masking constant(s): {old_constant}" in record.notes[0]
    assert not [n for n in result.graph.nodes if n.op == "IsNaN"]


def test_hand_built_chain_reports_its_constant():
    record = run_spec(HAND_BUILT["chain420"], FOLD, batch=TINY_BATCH, seq=TINY_SEQ).record(FOLD)
    assert record.counts == {"masks_replaced": 1, "layers": 2, "masks_added": 0, "nan_guards_removed": 0,
                             "noop_casts_removed": 0, "nodes_removed": 5, "biases_kept": 0}
    assert "old masking constant(s): -10000" in record.notes[0]


@pytest.mark.parametrize("name", ["legacy14-dynamic", "legacy14", "sdpa14", "dynamo18", "dynamo23sdpa"])
def test_mask_path_is_fp16_safe_and_shared(tiny_export, name):
    variant, previous = EXPORTS[name]
    spec = f"{previous},{FOLD}" if previous else FOLD
    graph = run_spec(tiny_export(variant), spec, batch=TINY_BATCH, seq=TINY_SEQ).graph
    masks = _mask_operands(graph)
    assert len(masks) == 2 and masks[0] is masks[1], "both layers must read one mask"
    constants = _mask_path_constants(graph)
    assert constants and all(np.isfinite(v) and abs(v) <= FP16_MAX for v in constants), constants
    assert -10000.0 in constants


def test_mask_value_option_is_honoured(tiny_export):
    path = tiny_export("legacy14")
    result = run_spec(path, f"freeze-shapes,{FOLD}", batch=TINY_BATCH, seq=TINY_SEQ, mask_value=-5000.0)
    constants = _mask_path_constants(result.graph)
    assert -5000.0 in constants and -10000.0 not in constants
    assert "* -5000" in result.record(FOLD).notes[0]
    assert_parity(path, result)


def test_a_new_mask_value_refolds_a_canonical_mask():
    folded = run_spec(HAND_BUILT["chain420"], FOLD, batch=TINY_BATCH, seq=TINY_SEQ)
    again = run_spec(to_model(folded.graph), FOLD, batch=TINY_BATCH, seq=TINY_SEQ, mask_value=-5000.0)
    assert again.record(FOLD).changed
    assert -5000.0 in _mask_path_constants(again.graph)


@pytest.mark.parametrize("value", [0.0, -10.0, -1e5, float("-inf"), float("nan")])
def test_unsafe_mask_values_are_refused(value):
    with pytest.raises(BertoptError, match="mask_value must be finite and between"):
        run_spec(HAND_BUILT["chain420"], FOLD, batch=TINY_BATCH, seq=TINY_SEQ, mask_value=value)


# --------------------------------------------------------------------------- no change

def test_graph_without_a_mask_is_no_change():
    result = run_spec(chain420_model(with_mask=False), FOLD, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(FOLD)
    assert not record.changed
    assert "no attention_mask input" in record.notes[0]


@pytest.mark.parametrize("name", ["legacy14-dynamic", "sdpa14", "dynamo18", "dynamo23sdpa"])
def test_second_run_is_no_change(tiny_export, name):
    variant, previous = EXPORTS[name]
    spec = f"{previous},{FOLD},{FOLD}" if previous else f"{FOLD},{FOLD}"
    result = run_spec(tiny_export(variant), spec, batch=TINY_BATCH, seq=TINY_SEQ)
    first, second = result.records[-2:]
    assert first.changed and not second.changed
    assert "already share the canonical mask (1 - attention_mask) * -10000" in second.notes[0]


def test_an_additive_bias_is_not_mistaken_for_a_mask():
    """M + 0.5 is computed from the mask alone, but it is not a mask: the probe must refuse it."""
    result = run_spec(chain420_model(bias=0.5), FOLD, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(FOLD)
    assert not record.changed
    assert "left mask" in record.notes[0] and "0.5 at a position the mask keeps" in record.notes[0]


def test_a_fixed_length_bias_on_dynamic_scores_is_read_as_no_mask():
    """The facts probe the scores at a seq of their own; a constant of another length broadcast no more (numpy
    raised, a traceback). Frozen at its length, the zero bias may become the zero mask: the same numbers."""
    model = chain420_model(with_mask=False, head_bias=TINY_SEQ)
    assert detect_facts(load_graph(model)).attention == "bidirectional"
    result = run_spec(model, f"freeze-shapes,{FOLD}", batch=TINY_BATCH, seq=TINY_SEQ)
    assert result.record(FOLD).changed
    assert_parity(model, result)


def test_a_mask_of_the_wrong_sign_is_not_folded():
    record = run_spec(chain420_model(10000.0), FOLD, batch=TINY_BATCH, seq=TINY_SEQ).record(FOLD)
    assert not record.changed
    assert "10000 at a position the mask removes (expected <= -1000)" in record.notes[0]


def test_batch_one_static_graph_folds_with_parity(tiny_export):
    """At batch 1 the probe still sees every position both kept and removed."""
    path = tiny_export("legacy14")
    result = run_spec(path, f"freeze-shapes,{FOLD}", batch=1, seq=8)
    assert result.record(FOLD).counts["masks_replaced"] == 1
    assert_parity(path, result)


def test_scores_without_a_mask_explain_the_nearest_candidate():
    """A graph whose mask input does not reach the scores says what it looked for and what failed."""
    model = chain420_model(with_mask=False)
    model.graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                           ["batch", "sequence"]))
    graph = load_graph(model)
    facts = detect_facts(graph)
    assert facts.input_for("attention_mask") == "attention_mask"
    result = fold_attention_mask(graph, facts, PassOptions())
    assert not result.changed
    assert "looked for Softmax(Add(scores, M))" in result.notes[0]
    assert "expected Add, found Div" in result.notes[0]


def test_dynamic_attention_23_is_left_with_a_reason(tiny_export):
    result = run_spec(tiny_export("dynamo23sdpa"), FOLD, batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(FOLD)
    assert not record.changed
    assert "needs static shapes (run freeze-shapes first)" in record.notes[0]
