"""Issue 12, the exports users bring: no mask input, float masks, fp16, XLM/FlauBERT, decoders, models
bertopt cannot rewrite, and `default` run on its own output. Each case through `default` (or the passes
that concern it) with ATC conformance, fp16 legality and parity with the original."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import TINY_BATCH, TINY_SEQ
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.ascend.check import check_ascend
from bertopt.ascend.legality import fp16_unsafe_constants
from bertopt.errors import BertoptError
from bertopt.graph import is_static, load_graph, save_graph, to_model
from bertopt.graph.golden import graph_text
from bertopt.model.facts import detect_facts
from bertopt.testing import assert_parity, run_spec
from bertopt.validation.parity import FP16_ATOL, graph_only, input_specs_of, parity_check, realistic_feeds

FOLD = "fold-attention-mask"


def default(path, **options):
    return run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ, **options)


def mask_operands(graph: gs.Graph) -> list[gs.Tensor]:
    """What each attention layer adds to its scores: the Add operand that is not the scores."""
    found = []
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        add = softmax.inputs[0].inputs[0]
        assert add.op == "Add", f"Softmax '{softmax.name}' reads {add.op}, not Add(scores, mask)"
        found.append(next(t for t in add.inputs if not _computed_by_matmul(t)))
    return found


def shared_mask(graph: gs.Graph) -> gs.Tensor:
    """The one mask every layer reads (attention-bigkernel gives each layer an Expand of it)."""
    sources = {id(m): m for m in (_unexpanded(t) for t in mask_operands(graph))}
    assert len(sources) == 1, f"the layers read {len(sources)} different masks"
    return next(iter(sources.values()))


def _unexpanded(tensor: gs.Tensor) -> gs.Tensor:
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer.inputs[0] if producer is not None and producer.op == "Expand" else tensor


def _computed_by_matmul(tensor: gs.Tensor, depth: int = 3) -> bool:
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0:
        return False
    return node.op == "MatMul" or any(_computed_by_matmul(t, depth - 1) for t in node.inputs)


def assert_ready_for_atc(graph: gs.Graph) -> None:
    report = check_ascend(graph)
    assert report.blocks_conforming, report.render()
    assert report.model_conforming, report.render()


# --------------------------------------------------------------------------- 1. no attention-mask input

@pytest.mark.parametrize("variant", ["legacy14", "dynamo18", "sdpa14"])
def test_no_mask_input_gets_a_shared_zero_mask(user_export, variant):
    path = user_export(variant=variant, mask="none")
    result = default(path)
    assert result.facts.input_for("attention_mask") is None
    zero = shared_mask(result.graph)
    assert isinstance(zero, gs.Constant) and not zero.values.any()
    assert all(list(mask.shape) == [TINY_BATCH, 1, TINY_SEQ, TINY_SEQ] for mask in mask_operands(result.graph))
    assert_ready_for_atc(result.graph)
    assert_parity(path, result)


def test_legacy_scores_without_a_mask_get_the_add(user_export):
    record = default(user_export(mask="none")).record(FOLD)
    assert record.changed and record.counts["masks_added"] == 2
    assert "added a zero mask to the scores of 2 attention layer(s)" in record.notes[0]


def test_a_dynamic_graph_without_a_mask_waits_for_static_shapes(user_export):
    record = run_spec(user_export(mask="none"), FOLD, batch=TINY_BATCH, seq=TINY_SEQ).record(FOLD)
    assert not record.changed
    assert "needs static shapes (run freeze-shapes first)" in record.notes[0]


# --------------------------------------------------------------------------- 2. float masks

@pytest.mark.parametrize("mask, kind, canonical", [("float", "binary", "(1 - attention_mask) * -10000"),
                                                   ("additive", "additive", "max(attention_mask, -10000)")])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_float_masks_are_frozen_and_folded(user_export, variant, mask, kind, canonical):
    path = user_export(variant=variant, mask=mask)
    assert detect_facts(load_graph(path)).mask_kind == kind
    result = default(path)
    assert all(is_static(t) for t in result.graph.inputs)
    record = result.record(FOLD)
    assert record.changed and canonical in record.notes[0], record.notes
    assert_ready_for_atc(result.graph)
    assert_parity(path, result)


def test_additive_parity_feeds_use_the_models_most_negative_value(user_export):
    path = user_export(mask="additive")
    facts = detect_facts(load_graph(path))
    [feed] = realistic_feeds(facts, input_specs_of(graph_only(path)), batch=4, seq=TINY_SEQ)
    values = set(np.unique(feed["attention_mask"]).tolist())
    assert values == {0.0, float(np.finfo(np.float32).min)}


# --------------------------------------------------------------------------- 3. fp16 models

FP16_VARIANTS = ["legacy14", "legacy17", "sdpa14", "dynamo18", "dynamo18sdpa"]


@pytest.mark.parametrize("variant", FP16_VARIANTS)
def test_fp16_mask_is_folded_exactly_in_fp16(user_export, variant):
    """The folded mask changes no output bit: -10000 is exact in fp16, and every kept score gets 0."""
    path = user_export(variant=variant, dtype="fp16")
    frozen = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    folded = run_spec(path, f"freeze-shapes,{FOLD}", batch=TINY_BATCH, seq=TINY_SEQ)
    assert folded.record(FOLD).changed
    shared_mask(folded.graph)
    assert fp16_unsafe_constants(folded.graph) == []
    comparison = parity_check(to_model(frozen.graph), to_model(folded.graph), folded.facts, batch=TINY_BATCH,
                              seq=TINY_SEQ, samples=3, atol=0.0, rtol=0.0)
    assert comparison.passed, comparison.summary_line()


@pytest.mark.parametrize("variant", FP16_VARIANTS)
def test_fp16_passes_keep_parity_at_the_fp16_tolerance(user_export, variant):
    path = user_export(variant=variant, dtype="fp16")
    result = run_spec(path, f"freeze-shapes,{FOLD},fuse-gelu", batch=TINY_BATCH, seq=TINY_SEQ)
    assert result.facts.num_layers == 2 and result.facts.hidden == 32
    comparison = assert_parity(path, result, samples=3)
    assert {o.atol for o in comparison.outputs} == {FP16_ATOL}
    assert max(o.max_abs for o in comparison.outputs) < FP16_ATOL / 2


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_fp16_tolerance_has_room_on_a_deeper_model(tmp_path, variant):
    """FP16_ATOL's measurement: `default --target ort` on a 4-layer, hidden-256 fp16 BERT."""
    from user_exports import EXPORT_VARIANTS

    from bertopt.flow.export import export_onnx, resolve_source

    exporter, opset, attention = EXPORT_VARIANTS[variant]
    source = resolve_source("bert-base", config_overrides=dict(num_hidden_layers=4, hidden_size=256,
                                                                num_attention_heads=4, intermediate_size=1024))
    path = export_onnx(source, tmp_path / "m.onnx", exporter=exporter, opset=opset, dtype="fp16").path
    result = run_spec(path, "default", batch=2, seq=128, target="ort")
    comparison = assert_parity(path, result, samples=4)
    assert max(o.max_abs for o in comparison.outputs) < FP16_ATOL / 2


# --------------------------------------------------------------------------- 4. XLM and FlauBERT

@pytest.mark.parametrize("family", ["xlm", "flaubert"])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_xlm_ids_through_a_slice_and_masked_fill(user_export, family, variant):
    path = user_export(family, variant)
    facts = detect_facts(load_graph(path))
    assert facts.roles == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    assert (facts.family, facts.num_layers, facts.hidden, facts.heads) == ("bert", 2, 32, 2)
    result = default(path)
    record = result.record(FOLD)
    assert record.changed and "old masking constant(s): -3.40282e+38" in record.notes[0]
    assert not [n for n in result.graph.nodes if n.op == "Where"], "masked_fill's Where must be gone"
    shared_mask(result.graph)
    assert fp16_unsafe_constants(result.graph) == []
    assert check_ascend(result.graph).model_conforming
    assert_parity(path, result)


# --------------------------------------------------------------------------- 5. decoders

@pytest.mark.parametrize("mask", ["int", "none"])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_gpt2_is_a_causal_decoder_with_an_fp16_safe_mask(user_export, variant, mask):
    path = user_export("gpt2", variant, mask=mask)
    facts = detect_facts(load_graph(path))
    assert (facts.family, facts.attention, facts.hidden, facts.heads) == ("gpt2", "causal", 32, 2)
    result = default(path)
    record = result.record(FOLD)
    assert "causal mask (-10000 above the diagonal)" in record.notes[0], record.notes
    causal = [t for t in result.graph.tensors().values() if isinstance(t, gs.Constant) and t.values.ndim == 4
              and t.values.shape[-2:] == (TINY_SEQ, TINY_SEQ)]
    assert len(causal) == 1 and np.array_equal(causal[0].values[0, 0] < 0, np.triu(np.ones((16, 16), bool), 1))
    assert fp16_unsafe_constants(result.graph) == []
    assert check_ascend(result.graph).model_conforming
    assert_parity(path, result)


def test_encoders_are_bidirectional(tiny_export):
    facts = detect_facts(load_graph(tiny_export("legacy14")))
    assert (facts.family, facts.attention) == ("bert", "bidirectional")


# --------------------------------------------------------------------------- 6. refusals

OBSTACLES = {
    "deberta-v2": "disentangled attention (DeBERTa)",
    "funnel": "pooling between layers (Funnel Transformer",
    "convbert": "span-based dynamic convolution heads (ConvBERT)",
    "squeezebert": "grouped Conv1d projections (SqueezeBERT)",
    "modernbert": "rotary position embeddings",
}


@pytest.mark.parametrize("family", list(OBSTACLES))
@pytest.mark.parametrize("variant", ["legacy14", pytest.param("dynamo18", marks=pytest.mark.integration)])
def test_refusals_name_the_real_obstacle(user_export, family, variant):
    with pytest.raises(BertoptError, match="unsupported attention: ") as refused:
        detect_facts(load_graph(user_export(family, variant)))
    assert OBSTACLES[family] in str(refused.value)
    assert "\n" not in str(refused.value)


def test_modernbert_names_its_fused_projection_too(user_export):
    with pytest.raises(BertoptError, match="fused Wqkv projection"):
        detect_facts(load_graph(user_export("modernbert")))


def test_a_refusal_is_one_line_and_exit_2(user_export, tmp_path):
    from test_cli import assert_one_line_error, bertopt

    result = bertopt("optimize", str(user_export("funnel")), "--batch", "1", "--seq", "8",
                     "--output", str(tmp_path / "o.onnx"))
    assert_one_line_error(result, 2, "pooling between layers")


# --------------------------------------------------------------------------- 7. default on its own output

IDEMPOTENT = [("legacy14", "int"), ("dynamo18", "int"), ("legacy14", "none")]


def _default_twice(user_export, tmp_path, variant, mask):
    first = default(user_export(variant=variant, mask=mask))
    again = default(save_graph(first.graph, tmp_path / "once.onnx"))
    return first, again


@pytest.mark.parametrize("variant, mask", IDEMPOTENT)
def test_default_writes_the_same_graph_on_its_own_output(user_export, tmp_path, variant, mask):
    first, again = _default_twice(user_export, tmp_path, variant, mask)
    assert graph_text(again.graph) == graph_text(first.graph)
    changed = {r.name for r in again.records if r.changed}
    assert not changed & {"freeze-shapes", FOLD, "layernorm-for-atc", "attention-bigkernel"}, changed


@pytest.mark.parametrize("variant, mask", IDEMPOTENT)
def test_default_reports_no_change_on_its_own_output(user_export, tmp_path, variant, mask):
    _first, again = _default_twice(user_export, tmp_path, variant, mask)
    assert [r.name for r in again.records if r.changed] == []


# --------------------------------------------------------------------------- 8. SDPA from the dynamo exporter

def test_dynamo_sdpa_mask_is_folded(user_export):
    path = user_export(variant="dynamo18sdpa")
    result = run_spec(path, f"freeze-shapes,{FOLD}", batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(FOLD)
    assert record.counts["masks_replaced"] == 1 and record.counts["nan_guards_removed"] == 2
    shared_mask(result.graph)
    assert_parity(path, result)


def test_dynamo_sdpa_conforms(user_export):
    path = user_export(variant="dynamo18sdpa")
    result = default(path)
    assert_ready_for_atc(result.graph)
