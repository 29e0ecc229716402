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

from bertopt.ascend.layernorm import decomposed_layernorm_pattern, layernorm_pattern
from bertopt.golden import assert_graph_matches, graph_text
from bertopt.graph import load_graph, producer, to_model, unique_name
from bertopt.passes.canonicalize_layernorm import layernorm_for_atc
from bertopt.pipeline import Instruments, PassManager, PassOptions
from bertopt.testing import SpecResult, assert_parity, run_spec
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ

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


SPELLINGS = {
    "mul-variance": ([square_with_mul], {"variances_to_pow": LAYERNORMS, "subs_merged": 0, "operands_reordered": 0}),
    "duplicated-sub": ([duplicate_sub], {"variances_to_pow": 0, "subs_merged": LAYERNORMS, "operands_reordered": 0}),
    "mul-variance-duplicated-sub": ([square_with_mul, duplicate_sub],
                                    {"variances_to_pow": LAYERNORMS, "subs_merged": LAYERNORMS,
                                     "operands_reordered": 0}),
    # invisible in a golden: graph_text lists a commutative op's operands in its own order
    "constants-first": ([constants_first], {"variances_to_pow": 0, "subs_merged": 0,
                                            "operands_reordered": 2 * LAYERNORMS}),
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
