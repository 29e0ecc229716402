"""attention-bigkernel: goldens per export variant, parity, the six points of the standard form: where the
2-D Reshape goes for both LayerNorm forms, a mask Expand per layer, the scale Mul's name, the block
input's four readers."""

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.ascend.check import check_ascend
from bertopt.ascend.form import scale_named_for_atc
from bertopt.errors import BertoptError
from bertopt.graph import load_graph, producer, save_graph, to_model, unique_name
from bertopt.graph.golden import graph_text
from bertopt.model.forms import layernorm_pattern, mask_misfit
from bertopt.pipeline import Instruments, PassManager, PassOptions
from bertopt.testing import SpecResult, assert_graph_matches, assert_parity, run_spec

GOLDEN = GOLDEN_DIR / "attention-bigkernel"
PASS = "attention-bigkernel"


def run_pass(before: SpecResult, spec: str = PASS) -> SpecResult:
    """Run `spec` on a copy of an earlier result's graph (so the "before" stays intact)."""
    graph = before.graph.copy()
    options = PassOptions(batch=before.batch, seq=before.seq)
    manager = PassManager(spec, options, Instruments(verify_each=True))
    facts, records = manager.run(graph, before.facts)
    return SpecResult(graph, facts, records, before.batch, before.seq)


def frozen(path, spec: str = "freeze-shapes") -> SpecResult:
    return run_spec(path, spec, batch=TINY_BATCH, seq=TINY_SEQ)


def scale_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The Muls right after a scores MatMul (Q times K transposed)."""
    return [n for n in graph.nodes if n.op == "Mul" and producer(n.inputs[0]) is not None
            and producer(n.inputs[0]).op == "MatMul" and not isinstance(producer(n.inputs[0]).inputs[1], gs.Constant)]


def layernorms(graph: gs.Graph) -> list:
    return layernorm_pattern().find_all(graph, allow_escape=True)


def block_inputs(graph: gs.Graph) -> list[gs.Tensor]:
    """Per layer, the tensor its Q, K and V projections read."""
    read = [n.inputs[0] for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    return list({id(t): t for t in read if sum(r.op == "MatMul" for r in t.outputs) == 3}.values())


def residual_add(x: gs.Tensor) -> gs.Node:
    return next(n for n in x.outputs if n.op == "Add")


@pytest.mark.golden
@pytest.mark.parametrize("variant, scales_rewritten", [("legacy14", 0), ("legacy17", 0), ("dynamo18", 2)])
def test_golden_and_parity_per_export(tiny_export, variant, scales_rewritten):
    """Legacy exports name the scale Mul '/model/bert/.../Mul': it keeps its name; dynamo's are renamed."""
    path = tiny_export(variant)
    before = frozen(path)
    after = run_pass(before)
    assert_graph_matches(before.graph, GOLDEN / f"{variant}.before.txt")
    assert_graph_matches(after.graph, GOLDEN / f"{variant}.after.txt")
    record = after.record(PASS)
    assert record.changed
    assert record.counts["blocks_rewritten"] == record.counts["blocks_total"] == 2
    assert record.counts["k_transposes_split"] == 2
    assert record.counts["scales_rewritten"] == scales_rewritten
    assert all(scale_named_for_atc(n.name) for n in scale_nodes(after.graph))
    assert record.counts["masks_expanded"] == 0  # transformers 5 expands its mask to [batch, 1, seq, seq]
    assert record.counts["reshapes_2d"] == 4  # first, last, two context Reshapes
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


@pytest.mark.golden
def test_golden_onnxsim_gemm_graph(onnxsim_export):
    """onnxsim's Gemms are gemm-to-matmul's, which `default` runs just before this pass."""
    before = run_spec(onnxsim_export, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    after = run_pass(before, f"gemm-to-matmul,{PASS}")
    assert_graph_matches(after.graph, GOLDEN / "legacy14-onnxsim.after.txt")
    assert after.record("gemm-to-matmul").counts["gemms_to_matmul"] == 13  # 6 per layer and the QA head
    counts = after.record(PASS).counts
    assert counts["reshapes_removed"] == 8  # onnxsim's flatten/unflatten around each Gemm of the layers
    assert counts["blocks_rewritten"] == 2
    ops = {n.op for n in after.graph.nodes}
    assert "Gemm" not in ops
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(onnxsim_export, after)


@pytest.mark.golden
def test_golden_with_the_folded_mask(tiny_export):
    path = tiny_export("legacy14")
    before = frozen(path, "freeze-shapes,fold-attention-mask")
    after = run_pass(before)
    assert_graph_matches(after.graph, GOLDEN / "legacy14-folded.after.txt")
    assert after.record(PASS).counts["masks_expanded"] == 2
    expands = [n for n in after.graph.nodes if n.op == "Expand"]
    assert [e.outputs[0].shape for e in expands] == [[TINY_BATCH, 1, TINY_SEQ, TINY_SEQ]] * 2
    assert [[r.op for r in e.outputs[0].outputs] for e in expands] == [["Add"], ["Add"]]  # one per layer
    assert expands[0].inputs[0] is expands[1].inputs[0]  # of the one folded mask
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()  # legality for the CANN version is legalize-ascend's
    assert_parity(path, after)


def test_commuted_operands_give_the_same_graph(tiny_export):
    before = frozen(tiny_export("legacy14"))
    commuted = before.graph.copy()
    for node in commuted.nodes:
        if node.op in ("Add", "Mul") and len(node.inputs) == 2:
            first, second = node.inputs[0], node.inputs[1]
            node.inputs.clear()
            node.inputs.extend([second, first])
    swapped = SpecResult(commuted, before.facts, before.records, before.batch, before.seq)
    assert graph_text(run_pass(swapped).graph) == graph_text(run_pass(before).graph)


def test_div_scale_becomes_a_bert_mul(tiny_export):
    """Older exports scale with Div(sqrt(head_dim)); ATC wants Mul(1/sqrt(head_dim)) named bert_*."""
    path = tiny_export("legacy14")
    before = frozen(path)
    for node in before.graph.nodes:
        if node.op == "Mul" and any(isinstance(t, gs.Constant) and t.values.size == 1
                                    and np.isclose(t.values, 0.25) for t in node.inputs):
            node.op = "Div"
            index = next(i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant))
            node.inputs[index] = gs.Constant(f"{node.name}_divisor", np.array(4.0, dtype=np.float32))
            if index == 0:
                first, second = node.inputs[0], node.inputs[1]
                node.inputs.clear()
                node.inputs.extend([second, first])
    assert sum(n.op == "Div" for n in before.graph.nodes) > 2
    after = run_pass(before)
    scales = scale_nodes(after.graph)
    assert len(scales) == 2
    assert all(float(n.inputs[1].values) == pytest.approx(0.25) for n in scales)
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


@pytest.mark.parametrize("variant, overrides", [
    ("legacy14", dict(hidden_size=48, num_attention_heads=3, intermediate_size=96)),
    ("legacy17", dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)),
    ("dynamo18", dict(hidden_size=64, num_attention_heads=2, intermediate_size=128)),
])
def test_other_sizes(tiny_export, variant, overrides):
    path = tiny_export(variant, **overrides)
    after = frozen(path, f"freeze-shapes,{PASS}")
    hidden, heads = overrides["hidden_size"], overrides["num_attention_heads"]
    assert (after.facts.hidden, after.facts.heads) == (hidden, heads)
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()
    context = [n for n in after.graph.nodes if n.op == "Reshape" and n.inputs[0].inputs
               and n.inputs[0].inputs[0].op == "Transpose"]
    assert [c.inputs[1].values.tolist() for c in context] == [[-1, hidden]] * 2
    scale = 1 / math.sqrt(hidden // heads)
    assert [float(n.inputs[1].values) for n in scale_nodes(after.graph)] == pytest.approx([scale] * 2)
    assert_parity(path, after)


def test_sdpa_export_after_mask_folding(tiny_export):
    """SDPA scales Q and K by sqrt(scale) each and reshapes the context to its own shape."""
    path = tiny_export("sdpa14")
    after = frozen(path, f"freeze-shapes,fold-attention-mask,{PASS}")
    assert after.record(PASS).counts["scales_rewritten"] == 2
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


def pre_scales(graph: gs.Graph) -> list[gs.Node]:
    """Muls and Divs by a constant that a scores MatMul reads (Q or K scaled before the product)."""
    scores = [n for n in graph.nodes if n.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in n.inputs)]
    return [producer(t) for n in scores for t in n.inputs
            if producer(t) is not None and producer(t).op in ("Mul", "Div")
            and any(isinstance(i, gs.Constant) for i in producer(t).inputs)]


@pytest.mark.golden
def test_dynamo_sdpa_k_transpose_and_scales(user_export):
    """torch 2.13's dynamo exporter writes SDPA's K^T as Reshape [b*h, s, hd] -> Transpose(0, 2, 1) ->
    Reshape [b, h, hd, s] and scales Q and K by sqrt(1/sqrt(hd)) each: the two Transposes of the
    standard form, one bert Mul after the scores."""
    path = user_export(variant="dynamo18sdpa")
    before = frozen(path, "freeze-shapes,fold-attention-mask")
    assert run_pass(before, PASS).record(PASS).changed
    after = run_pass(before)
    assert_graph_matches(before.graph, GOLDEN / "dynamo18sdpa.before.txt")
    assert_graph_matches(after.graph, GOLDEN / "dynamo18sdpa.after.txt")
    counts = after.record(PASS).counts
    assert counts["k_transposes_unbatched"] == counts["scales_rewritten"] == counts["blocks_rewritten"] == 2
    assert pre_scales(after.graph) == []
    assert [float(n.inputs[1].values) for n in scale_nodes(after.graph)] == [0.25, 0.25]
    assert all(scale_named_for_atc(n.name) for n in scale_nodes(after.graph))
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()
    assert_parity(path, after)


@pytest.mark.parametrize("variant, concats", [pytest.param("legacy14", 4, marks=pytest.mark.golden),
                                              ("dynamo18", 0)])
def test_xlm_query_divided_alone(user_export, variant, concats):
    """XLM divides Q alone by sqrt(hd) before the scores MatMul ((q / s) k = (q k) / s: one bert Mul after
    it), multiplies every LayerNorm output by its padding mask [batch, seq, 1] (flattened with the 2-D
    encoder), and the legacy exporter writes its key/value cache Concat with one input (a copy, dropped)."""
    path = user_export("xlm", variant)
    before = frozen(path, "freeze-shapes,fold-attention-mask")
    assert [n.op for n in pre_scales(before.graph)] == ["Div", "Div"]
    after = run_pass(before)
    if variant == "legacy14":
        assert_graph_matches(after.graph, GOLDEN / "xlm-legacy14.after.txt")
    counts = after.record(PASS).counts
    assert counts["scales_rewritten"] == counts["blocks_rewritten"] == 2
    assert counts["concats_removed"] == concats
    assert pre_scales(after.graph) == []
    assert [float(n.inputs[1].values) for n in scale_nodes(after.graph)] == [0.25, 0.25]
    padding = [n for n in after.graph.nodes if n.op == "Mul" and producer(n.inputs[1]) is not None
               and producer(n.inputs[1]).op == "Reshape"]
    assert [n.outputs[0].shape for n in padding] == [[TINY_BATCH * TINY_SEQ, 32]]  # layer 1's input
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()
    assert_parity(path, after)


@pytest.mark.parametrize("variant", ["legacy14", "legacy17"])
def test_ibert_layernorm_axis_counted_from_the_start(user_export, variant):
    """I-BERT (quant_mode off) spells its LayerNorm out as ReduceMean over axis 2 of [batch, seq, hidden]: on the
    2-D encoder that axis does not exist, so it must name the feature axis as -1. (The dynamo exporter drops
    its eps Add, so no LayerNorm is recognised there and the 2-D encoder is left alone, with the reason.)"""
    path = user_export("ibert", variant)
    before = frozen(path, "freeze-shapes,fold-attention-mask")
    means = [n for n in before.graph.nodes if n.op == "ReduceMean"]
    assert means and all(n.inputs[0].shape[:2] == [TINY_BATCH, TINY_SEQ] for n in means)
    after = run_pass(before)  # verify_each: an axis past the rank fails ONNX's checker here
    counts = after.record(PASS).counts
    assert counts["axes_from_end"] == len(means)
    assert all(n.attrs["axes"] == [-1] for n in after.graph.nodes if n.op == "ReduceMean")
    assert counts["blocks_rewritten"] == 2 and counts["reshapes_2d"] > 0
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()
    assert_parity(path, after)


def test_a_node_reducing_over_the_tokens_stops_the_2d_encoder(user_export):
    before = frozen(user_export("ibert"), "freeze-shapes,fold-attention-mask")
    mean = next(n for n in before.graph.nodes if n.op == "ReduceMean" and n.name.startswith("/model/ibert/encoder"))
    mean.attrs["axes"] = [1]
    record = run_pass(before).record(PASS)
    assert f"the 2-D encoder was not applied: ReduceMean '{mean.name}' works on axes [1] of the [batch, seq, n] " \
           "tokens, which the 2-D encoder would merge" in record.notes
    assert record.counts["reshapes_2d"] == 0


def test_a_token_operand_the_2d_encoder_cannot_flatten_is_named(user_export):
    """A [1, seq, 1] operand broadcast against the tokens [batch, seq, n] has no 2-D spelling here."""
    before = frozen(user_export("xlm"), "freeze-shapes,fold-attention-mask")
    padding = [n for n in before.graph.nodes if n.op == "Mul" and n.inputs[1].shape == [TINY_BATCH, TINY_SEQ, 1]]
    assert len(padding) == 3  # the embeddings' and each layer's output
    padding[1].inputs[1] = gs.Constant("ones", np.ones((1, TINY_SEQ, 1), np.float32))
    after = run_pass(before)
    record = after.record(PASS)
    assert any(note == f"the 2-D encoder was not applied: Mul '{padding[1].name}' broadcasts 'ones' [1, {TINY_SEQ}, "
               "1] against the [batch, seq, n] tokens, which the 2-D encoder would break" for note in record.notes)
    assert record.counts["reshapes_2d"] == 0 and record.counts["scales_rewritten"] == 2
    failing = {c.name for block in check_ascend(after.graph).blocks for c in block.checks if c.ok is False}
    assert failing == {"2d-encoder", "context-reshape"}


def test_second_run_reports_no_change(tiny_export):
    result = frozen(tiny_export("dynamo18"), f"freeze-shapes,{PASS},{PASS}")
    first, second = result.records[1:]
    assert first.changed and not second.changed
    assert second.notes == ["all 2 attention blocks are already in the standard form ATC fuses"]


def test_unmatched_blocks_are_named_and_left_alone(tiny_export):
    """Without fold-attention-mask the SDPA NaN guard sits between Softmax and the context MatMul."""
    before = frozen(tiny_export("sdpa14"))
    after = run_pass(before)
    record = after.record(PASS)
    assert not record.changed
    assert graph_text(after.graph) == graph_text(before.graph)
    note = record.notes[0]
    assert "layer 0 (Softmax" in note and "layer 1 (Softmax" in note
    assert "expected Softmax, found Where" in note


def test_requires_static_shapes(tiny_export):
    with pytest.raises(BertoptError, match="requires that every graph input has a static shape"):
        run_spec(tiny_export("legacy14"), PASS, batch=TINY_BATCH, seq=TINY_SEQ)


def test_result_saves_and_reloads_conforming(tiny_export, tmp_path):
    after = frozen(tiny_export("legacy17"), f"freeze-shapes,{PASS}")
    path = save_graph(after.graph, tmp_path / "bigkernel.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert check_ascend(path).blocks_conforming
    assert to_model(load_graph(path)).graph.node


@pytest.mark.integration
def test_bert_base_seq384(tmp_path):
    from bertopt.flow.export import export_onnx, resolve_source

    path = export_onnx(resolve_source("bert-base"), tmp_path / "bert-base.onnx", exporter="legacy").path
    after = run_spec(path, f"freeze-shapes,{PASS}", batch=1, seq=384)
    report = check_ascend(after.graph)
    assert len(report.blocks) == 12 and report.blocks_conforming, report.render()
    assert after.record(PASS).counts["blocks_rewritten"] == 12
    assert_parity(path, after, samples=1)


# ----------------------------------------------------------------------------- the 2-D Reshape's place

@pytest.mark.parametrize("variant, form", [("legacy14", "Add"), ("legacy17", "LayerNormalization")])
def test_reshape_goes_on_the_first_layernorms_input(tiny_export, variant, form):
    """Both forms: the first LayerNorm reads [batch*seq, hidden] and its own output feeds Q, K, V, residual."""
    path = tiny_export(variant)
    after = run_pass(frozen(path))
    first = layernorms(after.graph)[0]
    assert first.root.op == form
    reshape = producer(first["x"])
    assert reshape.op == "Reshape" and reshape.inputs[1].values.tolist() == [-1, 32]
    assert reshape.inputs[0].shape == [TINY_BATCH, TINY_SEQ, 32]
    assert first["x"].shape == [TINY_BATCH * TINY_SEQ, 32]
    x = first.root.outputs[0]
    assert x is block_inputs(after.graph)[0]
    assert sorted(n.op for n in x.outputs) == ["Add", "MatMul", "MatMul", "MatMul"]
    last = layernorms(after.graph)[-1].root.outputs[0]
    assert [(n.op, n.inputs[1].values.tolist()) for n in last.outputs] == [("Reshape", [TINY_BATCH, TINY_SEQ, 32])]
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


def test_albert_reshape_goes_above_the_embedding_projection(tiny_export):
    """ALBERT's first block reads MatMul + Add of the embedding LayerNorm: that LayerNorm is the first."""
    path = tiny_export("legacy14", preset="albert-tiny")
    after = run_pass(frozen(path))
    first = layernorms(after.graph)[0]
    assert producer(first["x"]).op == "Reshape"
    embedding = first["x"].shape[-1]
    assert producer(first["x"]).inputs[1].values.tolist() == [-1, embedding] != [-1, after.facts.hidden]
    x = block_inputs(after.graph)[0]
    assert producer(x).op == "Add" and x.shape == [TINY_BATCH * TINY_SEQ, after.facts.hidden]
    assert_parity(path, after)


# ----------------------------------------------------------------------------- the scale Mul's name

def test_scale_names_containing_bert_are_kept(tiny_export):
    """ATC's MulAddFusionPass looks for 'bert' anywhere in the name; other names become bert_*."""
    path = tiny_export("legacy14")
    before = frozen(path)
    first, second = scale_nodes(before.graph)
    first.name, second.name = "layer0/attention/scale", "encoder.my_bert_scale"
    after = run_pass(before)
    assert after.record(PASS).counts["scales_rewritten"] == 1
    names = [n.name for n in scale_nodes(after.graph)]
    assert names[0].startswith("bert_Mul") and names[1] == "encoder.my_bert_scale"
    assert check_ascend(after.graph).blocks_conforming
    assert_parity(path, after)


# ----------------------------------------------------------------------------- four readers of the block input

def test_residual_through_a_copy_reads_the_block_input(tiny_export):
    """A residual reading the block input through an Identity: ATC's kernel would take the Identity as
    the fourth reader, bertopt's form wants the residual Add itself there, so the Add reads the input."""
    path = tiny_export("legacy14")
    before = frozen(path)
    for x in block_inputs(before.graph):
        residual = residual_add(x)
        copy = gs.Variable(unique_name(before.graph, "copy"), dtype=np.float32, shape=x.shape)
        before.graph.nodes.append(gs.Node("Identity", unique_name(before.graph, "Identity"), inputs=[x],
                                          outputs=[copy]))
        residual.inputs[list(residual.inputs).index(x)] = copy
    before.graph.toposort()
    assert [len(x.outputs) for x in block_inputs(before.graph)] == [4, 4]  # Q, K, V and the Identity
    after = run_pass(before)
    assert after.record(PASS).counts["residuals_rewired"] == 2
    assert not any(n.op == "Identity" for n in after.graph.nodes)
    report = check_ascend(after.graph)
    assert report.blocks_conforming, report.render()
    assert_parity(path, after)


def test_residual_reading_something_else_is_named(tiny_export, tmp_path):
    """Layer 0's residual edited to read the LayerNorm's input (as a pre-LN block does): three readers
    stay, the notes say why, and nothing dead is added (the pipeline's cleanup would drop it)."""
    before = frozen(tiny_export("legacy14"))
    x = block_inputs(before.graph)[0]
    residual = residual_add(x)
    residual.inputs[list(residual.inputs).index(x)] = layernorms(before.graph)[0]["x"]
    edited = save_graph(before.graph, tmp_path / "pre-ln-layer0.onnx")
    after = run_pass(before)
    record = after.record(PASS)
    assert record.counts["residuals_rewired"] == 0
    note = next(n for n in record.notes if n.startswith("layer 0:"))
    assert "has 3 readers, ATC's LayerNorm+QKV kernel wants 4" in note and "not the block input" in note
    assert [len(x.outputs) for x in block_inputs(after.graph)] == [3, 4]
    failing = {c.name for c in check_ascend(after.graph).blocks[0].checks if c.ok is False}
    assert failing == {"ln-consumers"}
    assert_parity(edited, after)


def test_swin_window_attention_is_left_alone_with_its_reason(tmp_path):
    """Swin attends within windows: scores [batch * windows, heads, window, window] plus a relative position
    bias [1, heads, window, window], zero-initialised in random weights, so it has a mask's values. Neither
    the mask fold nor the rewrite may put a [batch, 1, seq, seq] mask on those scores (both left invalid
    graphs)."""
    from bertopt.flow.export import export_onnx, random_source

    source = random_source("swin", dict(image_size=32, patch_size=4, window_size=4, embed_dim=16, depths=[2, 2],
                                        num_heads=[2, 2], num_labels=3))
    path = export_onnx(source, tmp_path / "swin.onnx", head="image-cls", cache_dir=tmp_path / "cache").path
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    fold, rewrite = result.record("fold-attention-mask"), result.record(PASS)
    assert rewrite.counts["blocks_rewritten"] == 0, rewrite.counts
    assert "its scores are [8, 2, 16, 16], not [batch, heads, seq, seq] = [2, heads, 16, 16] (windowed " \
           "attention?)" in "\n".join(fold.notes)
    assert "left unchanged: its scores are [8, 2, 16, 16], not [batch, heads, seq, seq]" in "\n".join(rewrite.notes)
    assert_parity(path, result)


def test_a_per_head_bias_is_not_the_mask_atc_expands():
    """Point 5 expands the mask to [batch, 1, seq, seq]: a [1, heads, seq, seq] operand cannot be."""
    assert "not a mask: it does not broadcast to [batch, 1, seq, seq] = [2, 1, 16, 16]" in \
        mask_misfit([1, 2, 16, 16], [2, 2, 16, 16], 2, 16)
    assert mask_misfit([2, 1, 1, 16], [2, 2, 16, 16], 2, 16) is None
    assert mask_misfit([1, 2, 16, 16], ["batch", 2, 16, 16], None, None) is None
