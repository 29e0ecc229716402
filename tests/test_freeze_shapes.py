"""freeze-shapes on tiny exports of every variant: goldens, static shapes, MatMul kept, parity."""

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ
from user_exports import user_export  # noqa: F401 (a fixture)

from bertopt.errors import BertoptError
from bertopt.graph import is_static
from bertopt.model.facts import ModelFacts
from bertopt.passes.freeze_shapes import freeze_shapes
from bertopt.pipeline import PassOptions
from bertopt.testing import assert_graph_matches, assert_parity, run_spec

VARIANTS = ["legacy14", "legacy17", "sdpa14", "dynamo18", "dynamo20"]


@pytest.mark.golden
@pytest.mark.parametrize("variant", VARIANTS)
def test_freeze_shapes_golden_and_parity(tiny_export, variant):
    path = tiny_export(variant)
    before = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    assert_graph_matches(before.graph, GOLDEN_DIR / "freeze-shapes" / f"{variant}.after.txt")
    assert_parity(path, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_everything_static_no_shape_op_matmuls_kept(tiny_export, variant):
    from bertopt.graph import load_graph

    path = tiny_export(variant)
    matmuls_before = Counter(n.op for n in load_graph(path).nodes)["MatMul"]
    result = run_spec(path, "freeze-shapes", batch=3, seq=24)
    ops = Counter(n.op for n in result.graph.nodes)
    assert ops["Shape"] == 0
    assert ops["MatMul"] == matmuls_before
    assert "Gemm" not in ops
    unknown = [t.name for t in result.graph.tensors().values() if not t.__class__.__name__ == "Constant"
               and not is_static(t)]
    assert unknown == []
    assert (result.facts.batch, result.facts.seq) == (3, 24)
    assert result.record("freeze-shapes").changed


def test_second_freeze_is_no_change(tiny_export):
    result = run_spec(tiny_export("legacy14"), "freeze-shapes,freeze-shapes", batch=1, seq=8)
    first, second = result.records
    assert first.changed and not second.changed
    assert "already static" in second.notes[0]


def test_refreezing_at_another_shape_is_refused(tiny_export, tmp_path):
    from bertopt.graph import save_graph

    frozen = run_spec(tiny_export("legacy14"), "freeze-shapes", batch=1, seq=8)
    path = save_graph(frozen.graph, tmp_path / "static.onnx")
    with pytest.raises(BertoptError, match="already static at batch 1, seq 8"):
        run_spec(path, "freeze-shapes", batch=2, seq=8)


@pytest.mark.parametrize("batch, seq, message", [(0, 8, "must be positive"), (1, -3, "must be positive"),
                                                 (1, 129, "exceeds the model's 128 position")])
def test_bad_shapes_are_refused(tiny_export, batch, seq, message):
    with pytest.raises(BertoptError, match=message):
        run_spec(tiny_export("legacy14"), "freeze-shapes", batch=batch, seq=seq)


@pytest.mark.parametrize("mask", ["float", "additive"])
@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_float_mask_inputs_are_frozen(user_export, variant, mask):
    path = user_export(variant=variant, mask=mask)
    result = run_spec(path, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    assert {t.name: list(t.shape) for t in result.graph.inputs}["attention_mask"] == [TINY_BATCH, TINY_SEQ]
    assert result.facts.is_static
    assert_parity(path, result)


def test_a_broadcast_of_float_data_is_not_folded():
    """Expand(const [b, 1, 1, s] -> [b, 1, s, s]) only copies values: folding it is no shape arithmetic."""
    x = gs.Variable("x", dtype=np.float32, shape=[2, 1, 4, 4])
    ids = gs.Variable("ids", dtype=np.int64, shape=["b", "s"])
    expanded, y = gs.Variable("expanded", dtype=np.float32), gs.Variable("y", dtype=np.float32)
    zero = gs.Constant("zero", np.zeros((2, 1, 1, 4), np.float32))
    nodes = [gs.Node("Expand", inputs=[zero, gs.Constant("shape", np.array([2, 1, 4, 4]))], outputs=[expanded]),
             gs.Node("Add", inputs=[x, expanded], outputs=[y])]
    graph = gs.Graph(nodes=nodes, inputs=[ids, x], outputs=[y], opset=14)
    facts = ModelFacts("bert", 1, 4, 1, 4, 10, 16, 2, roles={"ids": "input_ids"})
    freeze_shapes(graph, facts, PassOptions(batch=2, seq=4))
    assert [node.op for node in graph.nodes] == ["Expand", "Add"]
