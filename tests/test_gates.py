"""bertopt.ascend.gates: ATC's fusion gates, as arithmetic on shapes and as verdicts on tiny graphs.

The shape and chip gates are tested on the numbers of the real models (bert-base, bert-large, MiniLM)
directly; the structural verdicts on tiny exports edited the way other tools spell things.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from bertopt.ascend.cann import cann_target
from bertopt.ascend.check import check_ascend
from bertopt.ascend.gates import (FORM, FUSES, SHAPE, AttentionShape, ai_core_count, attention_score_shape_gates,
                                  fusion_gates, ln_qkv_shape_gates)
from bertopt.graph import add_node, make_constant
from bertopt.testing import run_spec
from conftest import TINY_BATCH, TINY_SEQ

CANN6 = cann_target("6.0")
GATES = fusion_gates(CANN6)
P310 = "Ascend310P3"


def bert_base(batch: int, seq: int) -> AttentionShape:
    return AttentionShape(batch=batch, seq=seq, hidden=768, heads=12, head_dim=64)


def bert_large(batch: int, seq: int) -> AttentionShape:
    return AttentionShape(batch=batch, seq=seq, hidden=1024, heads=16, head_dim=64)


def minilm(batch: int, seq: int) -> AttentionShape:
    return AttentionShape(batch=batch, seq=seq, hidden=384, heads=12, head_dim=32)


# ----------------------------------------------------------------------------- shape and chip gates

@pytest.mark.parametrize("shape", [bert_base(8, 384), bert_base(4, 384), bert_base(16, 128), bert_base(12, 128),
                                   bert_large(8, 384), bert_large(4, 512), bert_large(32, 64)])
def test_shapes_that_fuse_on_310p3(shape):
    assert ln_qkv_shape_gates(shape, P310, GATES) == []
    assert attention_score_shape_gates(shape, P310, GATES) == []


def test_bert_base_batch_1_seq_384_misses_the_tokens_gate():
    shape = bert_base(1, 384)
    assert ln_qkv_shape_gates(shape, P310, GATES) == ["batch*seq = 384 is not a multiple of 1536 or 2048"]
    assert attention_score_shape_gates(shape, P310, GATES) == ["batch*heads = 12 is not a multiple of 8"]


@pytest.mark.parametrize("batch, seq", [(1, 128), (8, 128), (8, 384), (64, 512)])
def test_minilm_fuses_at_no_shape(batch, seq):
    shape = minilm(batch, seq)
    assert "hidden = 384 is not 768 or 1024" in ln_qkv_shape_gates(shape, P310, GATES)
    assert "head_dim = 32 is not 64" in attention_score_shape_gates(shape, P310, GATES)


@pytest.mark.parametrize("seq, expected", [
    (160, "seq/16 = 10 neither divides nor is a multiple of 12 or 8"),
    (320, "seq/16 = 20 neither divides nor is a multiple of 12 or 8"),
    (200, "seq = 200 is not a multiple of 16"),
])
def test_seq_tiling_of_the_ln_qkv_kernel(seq, expected):
    assert expected in ln_qkv_shape_gates(bert_base(48, seq), P310, GATES)


@pytest.mark.parametrize("shape, expected", [
    (bert_base(256, 64), "batch = 256 is above 128"),
    (bert_base(8, 1024), "seq = 1024 is above 512"),
    (bert_base(8, 176), "seq = 176 is not a multiple of 32"),
    (AttentionShape(8, 128, 512, 8, 64), "heads = 8 is not 12 or 16"),
])
def test_attention_score_gates(shape, expected):
    assert expected in attention_score_shape_gates(shape, P310, GATES)


def test_a_hidden_not_aligned_to_16_is_named():
    failed = ln_qkv_shape_gates(AttentionShape(1, 1536, 1000, 10, 100), P310, GATES)
    assert "hidden = 1000 is not a multiple of 16" in failed and "hidden = 1000 is not 768 or 1024" in failed


def test_chips_other_than_310p():
    shape = bert_base(8, 384)
    assert attention_score_shape_gates(shape, "Ascend910B3", GATES) == [
        "Ascend910B3: the pass refuses inference graphs on Ascend910 (it fuses training there)"]
    assert attention_score_shape_gates(shape, "Ascend310B1", GATES) == ["Ascend310B1 is not Ascend310P or Ascend910"]
    assert ln_qkv_shape_gates(shape, "Ascend310B1", GATES) == [
        "the AI-core count of Ascend310B1 is not in bertopt's data; the kernel runs only on 8 or 32 cores"]


def test_ai_core_count_is_data():
    assert ai_core_count(P310) == 8
    assert ai_core_count("Ascend999") is None


def test_cann_5_has_no_attention_passes():
    gates = fusion_gates(cann_target("5.0"))
    shape = bert_base(8, 384)
    [reason] = ln_qkv_shape_gates(shape, P310, gates)
    assert reason.startswith("CANN 5.0 has no ZAttentionLnQKVONNXFusionPass")
    [reason] = attention_score_shape_gates(shape, P310, gates)
    assert reason.startswith("CANN 5.0 has no ZAttentionScoreFusionPass")


def test_later_versions_use_the_2022_gates_and_say_so():
    gates = fusion_gates(cann_target("9.0"))
    assert gates.passes is GATES.passes and "NOT re-checked" in gates.note
    assert gates.attention_passes == ["ZAttentionLnQKVONNXFusionPass", "ZAttentionScoreFusionPass"]


def test_every_pass_cites_its_source():
    from importlib.resources import files

    data = json.loads(files("bertopt").joinpath("data", "fusion_gates.json").read_text())
    for gate_set in data["gate_sets"].values():
        for entry in gate_set["passes"].values():
            assert entry["file"].endswith(".cc") and len(entry["commit"]) == 40 and entry["sources"]
    assert all("source" in entry for entry in data["ai_core_counts"].values())


# ----------------------------------------------------------------------------- verdicts on graphs

@pytest.fixture(scope="module")
def bertopt_output(tiny_export):
    return run_spec(tiny_export("legacy14"), "default", batch=TINY_BATCH, seq=TINY_SEQ).graph


def predict(graph, cann=CANN6, soc=P310):
    return check_ascend(graph, cann=cann, soc=soc).fusion


def verdict(prediction, layer: int, fusion: str):
    return prediction.blocks[layer].verdict(fusion)


def test_tiny_output_fuses_the_small_passes_and_names_the_kernel_gates(bertopt_output):
    prediction = predict(bertopt_output)
    for layer in (0, 1):
        assert verdict(prediction, layer, "mul-add").verdict == FUSES
        assert verdict(prediction, layer, "gelu").verdict == FUSES
        score = verdict(prediction, layer, "attention-score")
        assert score.verdict == SHAPE
        assert score.reasons == ["heads = 2 is not 12 or 16", "head_dim = 16 is not 64",
                                 "seq = 16 is not a multiple of 32", "batch*heads = 4 is not a multiple of 8"]
    assert verdict(prediction, 1, "layer-norm").verdict == FUSES
    assert "hidden = 32 is not 768 or 1024" in verdict(prediction, 1, "ln-qkv").reasons
    assert not prediction.all_fuse
    assert prediction.expected_effects()["MulAddFusionPass"] == 2
    assert prediction.expected_effects()["ZAttentionScoreFusionPass"] == 0


def scale_mul(graph: gs.Graph, layer: int = 0) -> gs.Node:
    softmax = [n for n in graph.nodes if n.op == "Softmax"][layer]
    add = softmax.inputs[0].inputs[0]
    return next(t.inputs[0] for t in add.inputs if t.inputs and t.inputs[0].op == "Mul")


@pytest.mark.parametrize("name, fuses, reason", [
    ("encoder_scale", False, "the Mul's name 'encoder_scale' does not contain 'bert'"),
    ("Bert_scale", False, "the Mul's name 'Bert_scale' does not contain 'bert'"),
    ("bert_lamb_scale", False, "the Mul's name 'bert_lamb_scale' contains 'lamb'"),
    ("/model/bert/encoder/layer.0/attention/self/Mul", True, None),
])
def test_mul_add_needs_bert_in_the_scale_name(bertopt_output, name, fuses, reason):
    graph = bertopt_output.copy()
    scale_mul(graph).name = name
    report = check_ascend(graph, cann=CANN6, soc=P310)
    mul_add = verdict(report.fusion, 0, "mul-add")
    assert mul_add.fuses is fuses
    scale_check = next(c for c in report.blocks[0].checks if c.name == "scale-mul")
    assert scale_check.ok is ("bert" in name)  # the form's rule: the name contains bert
    if reason:
        assert mul_add.verdict == FORM and mul_add.reasons == [reason]
        score = verdict(report.fusion, 0, "attention-score")
        assert score.verdict == FORM and any(r.startswith("no FusedMulAdd") for r in score.reasons)


def test_mul_add_needs_the_scale_read_by_the_mask_add_alone(bertopt_output):
    graph = bertopt_output.copy()
    mul = scale_mul(graph)
    add_node(graph, "Identity", [mul.outputs[0]])
    mul_add = verdict(predict(graph), 0, "mul-add")
    assert mul_add.verdict == FORM and mul_add.reasons == ["the Mul is read by Add, Identity, not by one Add"]


@pytest.mark.parametrize("where, reason", [
    ("context", "the context MatMul's name 'bert/gradient_tape/MatMul' contains 'gradient_tape'"),
    ("dense", "'bert/Quant_dense', reading the context, has 'Quant' in its name"),
])
def test_attention_score_skips_tapes_and_quantised_graphs_by_name(bertopt_output, where, reason):
    graph = bertopt_output.copy()
    softmax = [n for n in graph.nodes if n.op == "Softmax"][0]
    context = next(n for n in softmax.outputs[0].outputs if n.op == "MatMul")
    if where == "context":
        context.name = "bert/gradient_tape/MatMul"
    else:
        reshape = context.outputs[0].outputs[0].outputs[0].outputs[0]
        reshape.outputs[0].outputs[0].name = "bert/Quant_dense"
    score = verdict(predict(graph), 0, "attention-score")
    assert score.verdict == FORM and score.reasons[0] == reason
    # the tiny model's shape fails the kernel too, and a form verdict still says so
    assert score.reasons[1:] and all(r.startswith("in form, still not at this shape: ") for r in score.reasons[1:])
    assert "in form, still not at this shape: heads = 2 is not 12 or 16" in score.reasons


def test_failures_group_blocks_with_the_same_verdict(bertopt_output):
    failures = predict(bertopt_output).failures()
    assert ("attention-score (shape) in all 2 blocks: ZAttentionScoreFusionPass: heads = 2 is not 12 or 16; "
            "head_dim = 16 is not 64; seq = 16 is not a multiple of 32; batch*heads = 4 is not a multiple of 8"
            ) in failures
    assert not any(line.startswith(("gelu", "mul-add")) for line in failures)


def gelu_input(graph: gs.Graph, layer: int = 0) -> tuple[gs.Node, gs.Tensor]:
    div = [n for n in graph.nodes if n.op == "Div" and n.outputs[0].outputs
           and n.outputs[0].outputs[0].op == "Erf"][layer]
    return div, div.inputs[0]


def test_gelu_argument_spelt_as_mul_does_not_fuse(bertopt_output):
    graph = bertopt_output.copy()
    div, x = gelu_input(graph)
    div.op = "Mul"
    div.inputs[1] = make_constant(graph, "inv_sqrt2", np.array(0.70710678, np.float32))
    gelu = verdict(predict(graph), 0, "gelu")
    assert gelu.verdict == FORM
    assert "expected Div, found Mul" in gelu.reasons[0]
    assert verdict(predict(graph), 1, "gelu").verdict == FUSES


@pytest.mark.parametrize("value, fuses", [(1.41421356, True), (1.414215, True), (1.4142, False), (1.41, False)])
def test_gelu_divisor_within_1e5_of_1_41421(bertopt_output, value, fuses):
    graph = bertopt_output.copy()
    div, _ = gelu_input(graph)
    div.inputs[1] = make_constant(graph, "sqrt2", np.array(value, np.float32))
    assert verdict(predict(graph), 0, "gelu").fuses is fuses


def test_tanh_gelu_does_not_fuse(tiny_export):
    graph = run_spec(tiny_export("legacy14", hidden_act="gelu_new"), "default", batch=TINY_BATCH,
                     seq=TINY_SEQ).graph
    gelu = verdict(predict(graph), 0, "gelu")
    assert gelu.verdict == FORM and "tanh approximation" in gelu.reasons[0]


def test_layernorm_with_mul_variance_does_not_fuse(bertopt_output):
    graph = bertopt_output.copy()
    square = _layer_input_layernorm_pow(graph, 1)
    square.op = "Mul"
    square.inputs[1] = square.inputs[0]  # Mul(d, d): the spelling ATC's pass does not match
    prediction = predict(graph)
    layer_norm = verdict(prediction, 1, "layer-norm")
    assert layer_norm.verdict == FORM and "expected Pow, found Mul" in layer_norm.reasons[0]
    ln_qkv = verdict(prediction, 1, "ln-qkv")
    assert ln_qkv.verdict == FORM
    assert ln_qkv.reasons[0] == "the block input is not made by a LayerNorm ATC fuses (see layer-norm)"


def _layer_input_layernorm_pow(graph: gs.Graph, layer: int) -> gs.Node:
    """The Pow of the LayerNorm whose output feeds block `layer`'s Q/K/V projections."""
    from bertopt.ascend.form import attention_softmaxes, locate_block

    node = locate_block(attention_softmaxes(graph)[layer]).x.inputs[0]
    frontier = [node]
    while frontier:
        node = frontier.pop()
        if node.op == "Pow":
            return node
        frontier += [t.inputs[0] for t in node.inputs if t.inputs]
    raise AssertionError("no Pow above the block input")


def test_residual_add_before_the_projections_in_node_order(bertopt_output):
    graph = bertopt_output.copy()
    from bertopt.ascend.form import attention_softmaxes, locate_block

    x = locate_block(attention_softmaxes(graph)[1]).x
    residual = next(n for n in x.outputs if n.op == "Add")
    first_reader = min(graph.nodes.index(n) for n in x.outputs)
    graph.nodes.remove(residual)
    graph.nodes.insert(first_reader, residual)
    ln_qkv = verdict(predict(graph), 1, "ln-qkv")
    assert ln_qkv.verdict == FORM and "needs the residual Add last" in ln_qkv.reasons[0]


def test_layer_normalization_op_depends_on_the_version(tiny_export):
    graph = run_spec(tiny_export("dynamo18"), "freeze-shapes,fold-attention-mask,attention-bigkernel",
                     batch=TINY_BATCH, seq=TINY_SEQ).graph
    assert any(n.op == "LayerNormalization" for n in graph.nodes)
    assert verdict(predict(graph, cann=cann_target("8.0")), 1, "layer-norm").verdict == FUSES
    old = verdict(predict(graph, cann=CANN6), 1, "layer-norm")
    assert old.verdict == FORM and "not in CANN 6.0's operator list" in old.reasons[0]


def test_other_chips_are_shape_verdicts(bertopt_output):
    prediction = predict(bertopt_output, soc="Ascend910B3")
    score = verdict(prediction, 1, "attention-score")
    assert score.verdict == SHAPE and score.reasons[0].startswith("Ascend910B3: the pass refuses inference")
    assert prediction.ai_core_count is None


def test_prediction_serialises(bertopt_output):
    data = json.loads(json.dumps(predict(bertopt_output).to_dict()))
    assert data["cann"] == "6.0" and data["soc"] == P310 and data["ai_core_count"] == 8
    assert [f["fusion"] for f in data["blocks"][0]["fusions"]] == ["layer-norm", "ln-qkv", "mul-add",
                                                                  "attention-score", "gelu"]


def test_the_readme_table_of_fusing_shapes_is_what_the_gates_say():
    """README.md's table comes from tools/fusion_table.py; a change of the gates data must regenerate it."""

    tool = Path(__file__).resolve().parent.parent / "tools" / "fusion_table.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, "README.md's fusion table is stale: run python tools/fusion_table.py"
