"""bertopt.ascend.check.check_ascend: the six block conditions and the model-level checks, on exports
bertopt did not touch, on the seed's onnxsim form and on bertopt's output."""

import json

import numpy as np
import onnx
import onnxsim
import pytest
from onnx import TensorProto, helper

from bertopt.ascend.check import check_ascend
from bertopt.ascend.form import CONDITIONS
from bertopt.graph import exceeds_fp16
from bertopt.errors import BertoptError
from bertopt.testing import run_spec
from conftest import TINY_BATCH, TINY_SEQ


def frozen(path, spec="freeze-shapes"):
    return run_spec(path, spec, batch=TINY_BATCH, seq=TINY_SEQ).graph


def check(report, layer: int, name: str):
    return next(c for c in report.blocks[layer].checks if c.name == name)


def model_check(report, name: str):
    return next(c for c in report.model_checks if c.name == name)


def test_unprocessed_export_fails_condition_by_condition(tiny_export):
    report = check_ascend(frozen(tiny_export("legacy14")))
    assert not report.conforming and not report.blocks_conforming
    assert len(report.blocks) == 2
    # transformers 5 already expands its mask and keeps the LayerNorm output's four readers
    assert report.failing_conditions() == {"2d-encoder", "qkv-form", "scale-mul", "context-reshape"}
    assert "is [2, 16, 32], not 2-D [batch*seq, hidden] = [32, 32]" in check(report, 0, "2d-encoder").reason
    assert "expected constant ~[-1, 32], got [ 2, 16, -1]" in check(report, 1, "context-reshape").reason
    assert "bert_" in check(report, 0, "scale-mul").reason
    assert "perm is [0, 2, 3, 1]" in check(report, 0, "qkv-form").reason
    assert model_check(report, "fp16-constants").ok is False  # the -3.4e38 mask fill


def test_seed_onnxsim_output_is_not_conforming(tiny_export, tmp_path):
    """The seed ran onnxsim with fixed shapes and gave the result to fix_onnx.py."""
    model = onnx.load(str(tiny_export("legacy14")))
    simplified, _ = onnxsim.simplify(model, overwrite_input_shapes={i.name: [TINY_BATCH, TINY_SEQ]
                                                                    for i in model.graph.input})
    onnx.save(simplified, str(tmp_path / "sim.onnx"))
    report = check_ascend(tmp_path / "sim.onnx")
    assert not report.conforming
    assert report.failing_conditions() == {"2d-encoder", "ln-consumers", "qkv-form", "scale-mul"}
    assert "2 consumer(s) (Add, Reshape)" in check(report, 0, "ln-consumers").reason
    assert "found Gemm" in check(report, 0, "qkv-form").reason


def test_folded_mask_fails_only_the_mask_shape_among_mask_checks(tiny_export):
    report = check_ascend(frozen(tiny_export("legacy14"), "freeze-shapes,fold-attention-mask"))
    assert "mask-shape" in report.failing_conditions()
    assert "is [2, 1, 1, 16]; only dim 1 may broadcast" in check(report, 0, "mask-shape").reason
    assert model_check(report, "fp16-constants").ok  # -10000 fits fp16


@pytest.mark.parametrize("variant", ["legacy14", "legacy17"])
def test_bertopt_output_is_conforming(tiny_export, variant, tmp_path):
    from bertopt.graph import save_graph

    graph = frozen(tiny_export(variant), "freeze-shapes,fold-attention-mask,attention-bigkernel")
    report = check_ascend(save_graph(graph, tmp_path / "out.onnx"))
    assert report.conforming, report.render()
    assert all(check.ok for block in report.blocks for check in block.checks)
    assert [check.name for check in report.blocks[0].checks] == list(CONDITIONS)


def test_model_level_checks_are_separate_from_the_blocks(tiny_export):
    """dynamo exports are opset 18: the blocks conform, the model does not until legalization."""
    graph = frozen(tiny_export("dynamo18"), "freeze-shapes,fold-attention-mask,attention-bigkernel")
    report = check_ascend(graph)
    assert report.blocks_conforming and not report.model_conforming and not report.conforming
    assert model_check(report, "opset").reason == "default-domain opset 18 > 17"
    graph.ir_version = 10
    assert model_check(check_ascend(graph), "ir-version").ok is False


def test_operators_outside_atc_list_are_named(tiny_export):
    graph = frozen(tiny_export("legacy17"))
    next(n for n in graph.nodes if n.op == "Erf").op = "Gelu"
    result = model_check(check_ascend(graph), "operators")
    assert result.ok is False and "Gelu" in result.reason


def test_dynamic_model_reports_shapes(tiny_export):
    report = check_ascend(tiny_export("legacy14"))
    assert model_check(report, "static-inputs").ok is False
    assert model_check(report, "no-shape-ops").ok is False
    assert "not static" in check(report, 0, "mask-shape").reason


def test_report_renders_and_serialises(tiny_export):
    report = check_ascend(frozen(tiny_export("legacy14")))
    text = report.render()
    assert "NOT conforming" in text and "0 of 2 in the standard form" in text
    assert any(line.split()[:4] == ["layer", "0", "scale-mul", "fail"] for line in text.splitlines())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["conforming"] is False and data["blocks"][0]["conforming"] is False
    assert data["facts"]["hidden"] == 32


def test_non_bert_model_is_a_clear_error(tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, dtype=np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "mlp.onnx"))
    with pytest.raises(BertoptError, match="not a BERT-family encoder"):
        check_ascend(tmp_path / "mlp.onnx")


def test_not_an_onnx_file_is_a_clear_error(tmp_path):
    (tmp_path / "junk.onnx").write_text("hello")
    with pytest.raises(BertoptError, match="not a readable ONNX model|not an ONNX model"):
        check_ascend(tmp_path / "junk.onnx")


@pytest.mark.parametrize("values, beyond", [
    ([1.0, -65504.0, 65504.0], False),
    ([1.0, -70000.0], True),
    ([np.inf, 0.0], True),
    ([np.nan, 3.0], False),
    ([np.nan, -1e9], True),
    ([np.nan, np.nan], False),
    ([], False),
])
def test_exceeds_fp16(values, beyond):
    assert exceeds_fp16(np.asarray(values, np.float32)) is beyond
