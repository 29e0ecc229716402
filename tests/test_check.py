"""bertopt.ascend.check.check_ascend: the six block conditions, the fusion prediction and the model-level
checks, on exports bertopt did not touch, on the seed's onnxsim form and on bertopt's output; and the exit
status of `bertopt check` (0 only when legal for the CANN version and every block predicted to fuse)."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxsim
import pytest
from conftest import TINY_BATCH, TINY_SEQ
from onnx import TensorProto, helper

from bertopt.ascend.cann import cann_target
from bertopt.ascend.check import check_ascend
from bertopt.ascend.form import CONDITIONS
from bertopt.errors import BertoptError
from bertopt.graph import exceeds_fp16
from bertopt.testing import run_spec

CLI_TIMEOUT = 600


CANN6, CANN8 = cann_target("6.0"), cann_target("8.0")


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
    # transformers 5 already expands its mask and keeps the LayerNorm output's four readers, and its
    # scale Mul's name ('/model/bert/...') contains 'bert', which is all ATC's MulAddFusionPass asks of it
    assert report.failing_conditions() == {"2d-encoder", "qkv-form", "context-reshape"}
    assert "is [2, 16, 32], not 2-D [batch*seq, hidden] = [32, 32]" in check(report, 0, "2d-encoder").reason
    assert "expected constant ~[-1, 32], got [ 2, 16, -1]" in check(report, 1, "context-reshape").reason
    assert check(report, 0, "scale-mul").reason == "Mul '/model/bert/encoder/layer.0/attention/self/Mul' by 0.25"
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
    assert report.failing_conditions() == {"2d-encoder", "ln-consumers", "qkv-form"}
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
    report = check_ascend(save_graph(graph, tmp_path / "out.onnx"), cann=CANN8)  # takes opset 14 and 17
    assert report.conforming, report.render()
    assert all(check.ok for block in report.blocks for check in block.checks)
    assert [check.name for check in report.blocks[0].checks] == list(CONDITIONS)


def test_model_level_checks_are_separate_from_the_blocks(tiny_export):
    """dynamo exports are opset 18: the blocks conform, the model does not until legalization."""
    graph = frozen(tiny_export("dynamo18"), "freeze-shapes,fold-attention-mask,attention-bigkernel")
    report = check_ascend(graph, cann=CANN6)
    assert report.blocks_conforming and not report.model_conforming and not report.conforming
    assert model_check(report, "opset").reason == "default-domain opset 18 outside CANN 6.0's 9-13"
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
    assert any(line.split()[:4] == ["layer", "0", "2d-encoder", "fail"] for line in text.splitlines())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["conforming"] is False and data["blocks"][0]["conforming"] is False
    assert data["facts"]["hidden"] == 32


def test_non_bert_model_is_a_clear_error(tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, dtype=np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "mlp.onnx"))
    with pytest.raises(BertoptError, match="not a transformer bertopt knows"):
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


# ----------------------------------------------------------------------------- verdict: legal and fusing

@pytest.fixture(scope="module")
def tiny_output(tiny_export, tmp_path_factory):
    """bertopt's default output for a tiny model: legal for CANN 6.0, in the form, too small to fuse."""
    from bertopt.graph import save_graph

    graph = run_spec(tiny_export("legacy14"), "default", batch=TINY_BATCH, seq=TINY_SEQ).graph
    return save_graph(graph, tmp_path_factory.mktemp("tiny") / "optimized.onnx")


def test_legal_in_form_but_too_small_to_fuse(tiny_output):
    report = check_ascend(tiny_output, cann=CANN6, soc="Ascend310P3")
    assert report.model_conforming and report.conforming and not report.soc_assumed
    assert not report.fusion_predicted
    assert report.passed(require_fusion=False) and not report.passed()
    summary = report.failure_summary()
    assert any(line.startswith("ln-qkv (shape) in all 2 blocks: ZAttentionLnQKVONNXFusionPass: "
                               "hidden = 32 is not 768 or 1024") for line in summary), summary
    assert any("attention-score (shape)" in line and "head_dim = 16 is not 64" in line for line in summary)
    assert report.failure_summary(require_fusion=False) == []


def test_illegal_model_fails_even_without_fusion(tiny_export):
    report = check_ascend(frozen(tiny_export("legacy14")), cann=CANN6)
    assert not report.passed(require_fusion=False)
    summary = report.failure_summary(require_fusion=False)
    assert "opset: default-domain opset 14 outside CANN 6.0's 9-13" in summary
    assert any(line.startswith("fp16-constants: ") for line in summary)


def test_fusion_prediction_renders_and_serialises(tiny_output):
    report = check_ascend(tiny_output, cann=CANN6)
    assert report.soc_assumed and report.soc == "Ascend310P3"
    text = report.render()
    assert "CANN 6.0, Ascend310P3 (assumed: no --soc)" in text.splitlines()[0]
    assert "fusion prediction: 0 of 2 blocks fuse in all of ATC's passes" in text
    assert any(line.split()[:5] == ["all", "2", "blocks", "gelu", "fuses"] for line in text.splitlines())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["legal"] is True and data["fusion_predicted"] is False
    assert data["cann"] == "6.0" and data["fusion"]["expected_effects"]["GeluONNXFusionPass"] == 2


# ----------------------------------------------------------------------------- `bertopt check` exit status

def bertopt_check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "bertopt", "check", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=env)


def test_cli_check_fails_naming_the_gate(tiny_output):
    result = bertopt_check(str(tiny_output), "--cann", "6.0", "--soc", "Ascend310P3")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "hidden = 32 is not 768 or 1024" in result.stderr
    assert "ZAttentionLnQKVONNXFusionPass" in result.stdout


def test_cli_check_json(tiny_output):
    result = bertopt_check(str(tiny_output), "--cann", "6.0", "--soc", "Ascend310P3", "--json")
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is False and data["legal"] is True and data["cann"] == "6.0"


def test_cli_check_illegal_for_the_version(tiny_export, tmp_path):
    from bertopt.graph import save_graph

    path = save_graph(frozen(tiny_export("legacy17"), "freeze-shapes,fold-attention-mask,attention-bigkernel"),
                      tmp_path / "opset17.onnx")
    result = bertopt_check(str(path), "--cann", "6.0")
    assert result.returncode == 1, result.stderr
    assert "opset 17 outside CANN 6.0's 9-13" in result.stderr


@pytest.fixture(scope="module")
def bert_base_export(tmp_path_factory):
    from bertopt.flow.export import export_onnx, resolve_source

    return export_onnx(resolve_source("bert-base"), tmp_path_factory.mktemp("bert-base") / "b.onnx").path


def optimized(path, tmp_path, batch: int, seq: int):
    from bertopt.graph import save_graph

    return save_graph(run_spec(path, "default", batch=batch, seq=seq).graph, tmp_path / "optimized.onnx")


@pytest.mark.integration
def test_cli_check_passes_bert_base_at_batch_8_seq_384(bert_base_export, tmp_path):
    path = optimized(bert_base_export, tmp_path, batch=8, seq=384)
    report = check_ascend(path, cann=CANN6, soc="Ascend310P3")
    assert report.passed(), report.render()
    assert report.fusion.expected_effects()["ZAttentionLnQKVONNXFusionPass"] == 12
    result = bertopt_check(str(path), "--cann", "6.0", "--soc", "Ascend310P3")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_cli_check_fails_bert_base_at_batch_1_seq_384(bert_base_export, tmp_path):
    path = optimized(bert_base_export, tmp_path, batch=1, seq=384)
    result = bertopt_check(str(path), "--cann", "6.0", "--soc", "Ascend310P3")
    assert result.returncode == 1, result.stderr
    assert "batch*seq = 384 is not a multiple of 1536 or 2048" in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("batch, seq", [(8, 128), (4, 384)])
def test_cli_check_fails_any_minilm_output(tmp_path, batch, seq):
    from bertopt.flow.export import export_onnx, resolve_source

    path = export_onnx(resolve_source("minilm"), tmp_path / "m.onnx").path
    result = bertopt_check(str(optimized(path, tmp_path, batch=batch, seq=seq)), "--cann", "6.0",
                           "--soc", "Ascend310P3")
    assert result.returncode == 1, result.stderr
    assert "hidden = 384 is not 768 or 1024" in result.stderr and "head_dim = 32 is not 64" in result.stderr
