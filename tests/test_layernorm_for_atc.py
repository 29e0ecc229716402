"""layernorm-for-atc: the LayerNorm spellings ATC's LayerNormONNXFusionPass refuses, rewritten to the one it
fuses. Tiny legacy exports (decomposed LayerNorms) edited into each spelling, goldens before and after,
parity with the unedited export on ONNX Runtime, and the no-change reasons."""

import io

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.ascend.check import check_ascend
from bertopt.ascend.layernorm import decomposed_layernorm_pattern
from bertopt.graph import load_graph, producer, to_model, unique_name
from bertopt.graph.golden import graph_text
from bertopt.model.forms import layernorm_pattern
from bertopt.passes.canonicalize_layernorm import layernorm_for_atc
from bertopt.pipeline import Instruments, PassManager, PassOptions
from bertopt.testing import SpecResult, assert_graph_matches, assert_parity, run_spec
from bertopt.validation.parity import FP16_ATOL

GOLDEN = GOLDEN_DIR / "layernorm-for-atc"
PASS = "layernorm-for-atc"
LAYERNORMS = 5  # embeddings + 2 per layer in the 2-layer tiny BERT


def run_pass(graph: gs.Graph, before: SpecResult, spec: str = PASS) -> SpecResult:
    manager = PassManager(spec, PassOptions(batch=before.batch, seq=before.seq), Instruments(verify_each=True))
    facts, records = manager.run(graph, before.facts)
    return SpecResult(graph, facts, records, before.batch, before.seq)


def frozen(path) -> SpecResult:
    return run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)


def decomposed(graph: gs.Graph) -> list:
    return [m for m in layernorm_pattern().find_all(graph) if m.root.op == "Add"]


def square_with_mul(graph: gs.Graph) -> None:
    """Variance as Mul(d, d), as torch.onnx writes ((x - u) * (x - u)).mean(-1)."""
    for match in decomposed(graph):
        square = match.node("square")
        square.op = "Mul"
        square.inputs[1] = square.inputs[0]


def duplicate_sub(graph: gs.Graph) -> None:
    """A second Sub(x, mean) for the Div, as older PyTorch exported it."""
    for match in decomposed(graph):
        centred = match.node("centred")
        twin = gs.Variable(unique_name(graph, "twin"), dtype=np.float32)
        graph.nodes.append(gs.Node("Sub", unique_name(graph, "Sub"), inputs=list(centred.inputs), outputs=[twin]))
        match.node("normalised").inputs[0] = twin
    graph.toposort()


def constants_first(graph: gs.Graph) -> None:
    """gamma and beta on input 0 of their Mul and Add."""
    for match in decomposed(graph):
        for name in ("scaled", "shifted"):
            node = match.node(name)
            if not isinstance(node.inputs[0], gs.Constant):
                node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]


NONE = {"casts_removed": 0, "variances_to_pow": 0, "subs_merged": 0, "operands_reordered": 0}
SPELLINGS = {
    "mul-variance": ([square_with_mul], {**NONE, "variances_to_pow": LAYERNORMS}),
    "duplicated-sub": ([duplicate_sub], {**NONE, "subs_merged": LAYERNORMS}),
    "mul-variance-duplicated-sub": ([square_with_mul, duplicate_sub],
                                    {**NONE, "variances_to_pow": LAYERNORMS, "subs_merged": LAYERNORMS}),
    # invisible in a golden: graph_text lists a commutative op's operands in its own order
    "constants-first": ([constants_first], {**NONE, "operands_reordered": 2 * LAYERNORMS}),
}


@pytest.mark.golden
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_each_spelling_becomes_the_fused_form(tiny_export, spelling):
    path = tiny_export("legacy14")
    before = frozen(path)
    edits, counts = SPELLINGS[spelling]
    graph = before.graph.copy()
    for edit in edits:
        edit(graph)
    assert decomposed_layernorm_pattern().find_all(graph) == []  # ATC would fuse none of them
    assert len(decomposed(graph)) == LAYERNORMS
    if spelling != "constants-first":
        assert_graph_matches(graph, GOLDEN / f"legacy14-{spelling}.before.txt")
    after = run_pass(graph, before)
    assert_graph_matches(after.graph, GOLDEN / "legacy14.after.txt")  # every spelling ends as legacy 14's own
    record = after.record(PASS)
    assert record.changed and record.counts == {"layernorms": LAYERNORMS, **counts}
    assert record.notes == [f"{LAYERNORMS} of {LAYERNORMS} decomposed LayerNorm(s) now spelled as ATC's "
                            "LayerNorm fusion matches"]
    assert len(decomposed_layernorm_pattern().find_all(after.graph)) == LAYERNORMS
    assert sum(n.op == "Sub" for n in after.graph.nodes) == LAYERNORMS
    assert_parity(path, after)


def test_spellings_give_the_export_itself(tiny_export):
    """Rewritten, every spelling is the graph legacy 14 exported, node for node."""
    before = frozen(tiny_export("legacy14"))
    graph = before.graph.copy()
    for edit in (square_with_mul, duplicate_sub, constants_first):
        edit(graph)
    assert graph_text(run_pass(graph, before).graph) == graph_text(before.graph)


def test_torch_writes_the_mul_variance(tmp_path):
    """Which exports write Mul(d, d): torch.onnx for a LayerNorm written out by hand, legacy and dynamo."""

    class HandWrittenLayerNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, 32))
            self.beta = torch.nn.Parameter(torch.linspace(-0.1, 0.1, 32))

        def forward(self, x):
            u = x.mean(-1, keepdim=True)
            s = ((x - u) * (x - u)).mean(-1, keepdim=True)
            return self.gamma * ((x - u) / torch.sqrt(s + 1e-5)) + self.beta

    buffer = io.BytesIO()
    torch.onnx.export(HandWrittenLayerNorm(), (torch.randn(TINY_BATCH, TINY_SEQ, 32),), buffer, opset_version=14,
                      dynamo=False, input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(buffer.getvalue())
    squares = [n for n in model.graph.node if n.op_type == "Mul" and n.input[0] == n.input[1]]
    assert len(squares) == 1 and not any(n.op_type == "Pow" for n in model.graph.node)
    graph = load_graph(model)
    result = layernorm_for_atc(graph, None, PassOptions())  # a lone LayerNorm has no BERT facts; none are read
    graph.cleanup()
    assert result.changed and result.counts["variances_to_pow"] == 1
    assert len(decomposed_layernorm_pattern().find_all(graph)) == 1
    x = np.random.default_rng(0).standard_normal((TINY_BATCH, TINY_SEQ, 32)).astype(np.float32)
    want = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(to_model(graph).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fused_spelling_reports_no_change(tiny_export):
    before = frozen(tiny_export("legacy14"))
    after = run_pass(before.graph.copy(), before)
    record = after.record(PASS)
    assert not record.changed
    assert record.notes == [f"all {LAYERNORMS} decomposed LayerNorm(s) already spelled as ATC's "
                            "LayerNormONNXFusionPass matches (Pow(d, 2), one Sub, gamma/beta on input 1)"]


def test_layernormalization_ops_report_no_change(tiny_export):
    before = frozen(tiny_export("dynamo18"))
    after = run_pass(before.graph.copy(), before)
    record = after.record(PASS)
    assert not record.changed
    assert record.notes == [f"no decomposed LayerNorm in the graph ({LAYERNORMS} LayerNormalization op(s), which "
                            "legalize-ascend writes out where the CANN version needs it)"]


def test_a_difference_it_does_not_rewrite_is_named(tiny_export):
    """An epsilon above ATC's 0.1 stays: the note says which LayerNorm and why it still will not fuse."""
    path = tiny_export("legacy14")
    before = frozen(path)
    graph = before.graph.copy()
    square_with_mul(graph)
    first = decomposed(graph)[0]
    sqrt = producer(first.node("normalised").inputs[1])
    epsilon_add = producer(sqrt.inputs[0])
    index = next(i for i, t in enumerate(epsilon_add.inputs) if isinstance(t, gs.Constant))
    epsilon_add.inputs[index] = gs.Constant(unique_name(graph, "eps"), np.array(0.5, np.float32))
    record = run_pass(graph, before).record(PASS)
    assert record.counts["variances_to_pow"] == LAYERNORMS
    assert record.notes[0].startswith(f"{LAYERNORMS - 1} of {LAYERNORMS} decomposed LayerNorm(s)")
    assert f"LayerNorm ending at '{first.root.name}' still differs" in record.notes[1]
    assert "a scalar <= 0.1" in record.notes[1]


# ----------------------------------------------------------------------------- torch's float16 LayerNorm

def fusing(graph: gs.Graph) -> set[str]:
    """The fusions check predicts for every block (the tiny model's shapes stop the attention kernels)."""
    blocks = check_ascend(graph).fusion.blocks
    return {fusion for fusion in {v.fusion for v in blocks[0].verdicts} if all(b.verdict(fusion).fuses for b in blocks)}


@pytest.mark.golden
def test_fp16_casts_are_dropped(user_export):
    """torch upcasts a float16 LayerNorm to double inside (Sub -> Cast -> Pow ..., Div(Cast, Sqrt) -> Cast):
    no spelling ATC fuses has those Casts, so the chain is computed in float16, constants retyped."""
    path = user_export(dtype="fp16")
    before = frozen(path)
    assert_graph_matches(before.graph, GOLDEN / "fp16-legacy14.before.txt")
    assert [(m.node("upcast").attrs["to"], m.node("downcast").attrs["to"]) for m in decomposed(before.graph)] == [
        (onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)] * LAYERNORMS
    assert "layer-norm" not in fusing(run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ).graph)
    after = run_pass(before.graph.copy(), before)
    assert_graph_matches(after.graph, GOLDEN / "fp16-legacy14.after.txt")
    assert after.record(PASS).counts == {"layernorms": LAYERNORMS, **NONE, "casts_removed": 2 * LAYERNORMS}
    matches = decomposed_layernorm_pattern().find_all(after.graph)
    assert len(matches) == LAYERNORMS
    assert {m["two"].values.dtype for m in matches} == {m["epsilon"].values.dtype for m in matches} == {
        np.dtype(np.float16)}
    assert not any(n.op == "Cast" and n.attrs["to"] == onnx.TensorProto.DOUBLE for n in after.graph.nodes)
    assert "layer-norm" in fusing(after.graph)
    comparison = assert_parity(path, after, samples=3)
    assert {o.atol for o in comparison.outputs} == {FP16_ATOL}


def test_fp16_default_conforms(user_export):
    """With the Casts gone attention-bigkernel finds the LayerNorm ending the last layer: 2-D encoder."""
    path = user_export(dtype="fp16")
    result = run_spec(path, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    assert result.record(PASS).counts["casts_removed"] == 2 * LAYERNORMS
    report = check_ascend(result.graph)
    assert report.blocks_conforming and report.model_conforming, report.render()
    assert fusing(result.graph) == {"layer-norm", "mul-add", "gelu"}
    assert_parity(path, result, samples=3)


def test_the_layernorm_pattern_sees_through_the_casts(user_export):
    """attention-bigkernel alone (no layernorm-for-atc first) finds the float16 LayerNorms by their Casts."""
    result = run_spec(user_export(dtype="fp16"), "freeze-shapes,attention-bigkernel", batch=TINY_BATCH, seq=TINY_SEQ)
    assert len(decomposed(result.graph)) == LAYERNORMS
    assert not any("2-D encoder was not applied" in note for note in result.record("attention-bigkernel").notes)
    assert check_ascend(result.graph).blocks_conforming


def test_a_same_type_cast_before_the_pow_is_atcs_case_3(tiny_export):
    """LayerNormONNXFusionPass case 3: Sub -> Cast -> Pow with the Div reading the Sub (in ONNX a Cast that
    keeps the type, which layernorm-for-atc drops as it does torch's)."""
    before = frozen(tiny_export("legacy14"))
    graph = before.graph.copy()
    for match in decomposed(graph):
        square, centred = match.node("square"), match.node("centred").outputs[0]
        same = gs.Variable(unique_name(graph, "same"), dtype=np.float32)
        graph.nodes.append(gs.Node("Cast", unique_name(graph, "Cast"), attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[centred], outputs=[same]))
        square.inputs[0] = same
    graph.toposort()
    assert len(decomposed_layernorm_pattern().find_all(graph)) == LAYERNORMS
    after = run_pass(graph, before)
    assert after.record(PASS).counts["casts_removed"] == LAYERNORMS
    assert graph_text(after.graph) == graph_text(before.graph)


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["legacy14", "legacy17"])
def test_fp16_layernorm_in_float16_on_a_deeper_model(tmp_path, variant):
    """The measurement in bertopt.ascend.layernorm's docstring: `default` on a 4-layer hidden-256 float16
    BERT, torch's Casts dropped (legacy 14) or LayerNormalization decomposed in float16 (legacy 17)."""
    from user_exports import EXPORT_VARIANTS

    from bertopt.flow.export import export_onnx, resolve_source

    exporter, opset, attention = EXPORT_VARIANTS[variant]
    source = resolve_source("bert-base", config_overrides=dict(num_hidden_layers=4, hidden_size=256,
                                                                num_attention_heads=4, intermediate_size=1024))
    path = export_onnx(source, tmp_path / "m.onnx", exporter=exporter, opset=opset, dtype="fp16").path
    result = run_spec(path, "default", batch=2, seq=128)
    assert len(decomposed_layernorm_pattern().find_all(result.graph)) == 9
    comparison = assert_parity(path, result, samples=4)
    assert max(o.max_abs for o in comparison.outputs) < FP16_ATOL / 4
