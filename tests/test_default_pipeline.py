"""The `default` pipelines end to end: ATC conformance, parity, and what the output may not contain."""

import onnx_graphsurgeon as gs
import pytest
from conftest import TINY_BATCH, TINY_SEQ

from bertopt.ascend.check import check_ascend
from bertopt.ascend.legality import fp16_unsafe_constants
from bertopt.errors import BertoptError
from bertopt.testing import assert_parity, run_spec

EXPORTS = ["legacy14", "legacy17", "sdpa14", "dynamo18", "dynamo20"]


def assert_ready_for_atc(graph: gs.Graph) -> None:
    report = check_ascend(graph)
    assert report.conforming, report.render()
    assert not any(node.op == "Shape" for node in graph.nodes)
    assert int(graph.opset) <= 17 and graph.ir_version <= 8
    assert fp16_unsafe_constants(graph) == []


@pytest.mark.parametrize("variant", EXPORTS)
def test_ascend_default_conforms_with_parity(tiny_export, variant):
    path = tiny_export(variant)
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    assert [r.name for r in result.records] == ["freeze-shapes", "fold-attention-mask", "fuse-gelu",
                                                 "layernorm-for-atc", "gemm-to-matmul", "attention-bigkernel",
                                                 "legalize-ascend"]
    assert_ready_for_atc(result.graph)
    assert result.record("attention-bigkernel").counts["blocks_rewritten"] == 2  # shapes seen past fused Gelus
    assert_parity(path, result)


@pytest.mark.parametrize("variant", EXPORTS)
def test_ort_default_keeps_parity(tiny_export, variant):
    path = tiny_export(variant)
    result = run_spec(path, "default", batch=1, seq=TINY_SEQ, target="ort")
    assert "attention-bigkernel" not in [r.name for r in result.records]
    assert any(node.op in ("Gelu", "FastGelu") for node in result.graph.nodes)
    assert_parity(path, result)


def test_attention_23_is_refused_for_ascend(tiny_export):
    with pytest.raises(BertoptError, match="has no Attention"):
        run_spec(tiny_export("dynamo23sdpa"), "default", batch=TINY_BATCH, seq=TINY_SEQ)


def test_unprocessed_export_does_not_conform(tiny_export):
    frozen = run_spec(tiny_export("legacy14"), "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    report = check_ascend(frozen.graph)
    assert not report.conforming
    assert {"qkv-form", "context-reshape", "2d-encoder"} <= report.failing_conditions()
    # the export already scales by a Mul named /model/bert/...: ATC's MulAddFusionPass wants only "bert" in it
    assert "scale-mul" not in report.failing_conditions()


@pytest.mark.integration
@pytest.mark.parametrize("exporter, opset", [("legacy", 14), ("dynamo", 18)])
def test_minilm_real_weights(tmp_path, exporter, opset):
    from bertopt.flow.export import export_onnx, resolve_source

    path = export_onnx(resolve_source("minilm"), tmp_path / "m.onnx", exporter=exporter, opset=opset).path
    result = run_spec(path, "default", batch=8, seq=128)
    assert_ready_for_atc(result.graph)
    assert check_ascend(result.graph).blocks_conforming
    assert len(check_ascend(result.graph).blocks) == 6
    assert_parity(path, result, samples=1)


@pytest.mark.integration
def test_bert_base_batch_8(tmp_path):
    from bertopt.flow.export import export_onnx, resolve_source

    path = export_onnx(resolve_source("bert-base"), tmp_path / "b.onnx").path
    result = run_spec(path, "default", batch=8, seq=384)
    assert_ready_for_atc(result.graph)
    assert len(check_ascend(result.graph).blocks) == 12
    assert_parity(path, result, samples=1)


@pytest.mark.parametrize("preset", ["roberta-tiny", "distilbert-tiny", "albert-tiny"])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_other_families_conform_with_parity(tiny_export, preset, variant):
    path = tiny_export(variant, preset=preset)
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    assert_ready_for_atc(result.graph)
    # layernorm-for-atc and fuse-gelu have nothing to do where the export already spells LayerNorm and Gelu as
    # ATC fuses them, gemm-to-matmul where it has no Gemm (only onnxsim writes them)
    assert all(record.changed for record in result.records
               if record.name not in ("layernorm-for-atc", "fuse-gelu", "gemm-to-matmul"))
    assert_parity(path, result)


def test_classification_head(tiny_export):
    path = tiny_export("legacy14", head="cls")
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    assert_ready_for_atc(result.graph)
    assert [t.name for t in result.graph.outputs] == ["logits"]
    assert_parity(path, result)


def test_bert_of_another_size(tiny_export):
    path = tiny_export("legacy14", hidden_size=96, num_attention_heads=3, intermediate_size=192)
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    assert_ready_for_atc(result.graph)
    assert result.facts.head_dim == 32
    assert_parity(path, result)


BERT_MEDIUM = {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048}


@pytest.mark.integration
@pytest.mark.parametrize("preset, overrides, head, inputs", [
    ("roberta-base", {}, "qa", {"input_ids", "attention_mask"}),
    ("distilbert-base", {}, "cls", {"input_ids", "attention_mask"}),
    ("albert-base", {}, "qa", {"input_ids", "attention_mask", "token_type_ids"}),
    ("bert-base", BERT_MEDIUM, "qa", {"input_ids", "attention_mask", "token_type_ids"}),
], ids=["roberta-base", "distilbert-base-cls", "albert-base", "bert-medium"])
def test_base_sized_families(tmp_path, preset, overrides, head, inputs):
    from bertopt.flow.export import export_onnx, resolve_source

    source = resolve_source(preset, config_overrides=overrides)
    path = export_onnx(source, tmp_path / "m.onnx", head=head).path
    result = run_spec(path, "default", batch=1, seq=128)
    assert_ready_for_atc(result.graph)
    assert {role for role in ("input_ids", "attention_mask", "token_type_ids")
            if result.facts.input_for(role) is not None} == inputs
    assert result.facts.hidden == overrides.get("hidden_size", 768)
    assert_parity(path, result, samples=1)
