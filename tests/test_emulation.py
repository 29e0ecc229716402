"""The Ascend fp16 emulation: rounding, constants, the fast Gelu, and what it shows about mask constants."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from bertopt.backends.emulation import EmulationBackend, emulate_ascend_fp16
from bertopt.backends.ort import OrtBackend
from bertopt.graph import to_model
from bertopt.testing import run_spec
from bertopt.validate import validate_candidates
from conftest import TINY_BATCH, TINY_SEQ

FP32_MIN = float(np.finfo(np.float32).min)


def one_op_model(nodes, inits=(), opset=17, shape=(4,)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------- emulation numerics

def test_every_op_output_is_rounded_to_fp16():
    model = one_op_model([helper.make_node("Add", ["x", "c"], ["y"])],
                         [numpy_helper.from_array(np.array(1.0, np.float32), "c")])
    x = np.array([2.0 ** -12, 70000.0, -70000.0, 0.1], np.float32)
    y = EmulationBackend(model).run({"x": x})["y"]
    assert y.dtype == np.float32
    assert y[0] == 1.0, "1 + 2^-12 is 1 in fp16"
    assert y[1] == math.inf and y[2] == -math.inf
    assert y[3] == np.float32(np.float16(np.float32(1.1)))


def test_constants_are_rounded_and_overflows_named():
    model = one_op_model([helper.make_node("Mul", ["x", "c"], ["y"])],
                         [numpy_helper.from_array(np.array([1 + 2 ** -12, FP32_MIN, 3.0, 1e5], np.float32), "c")])
    emulated = emulate_ascend_fp16(model)
    assert len(emulated.hazards) == 1 and "overflows fp16" in emulated.hazards[0] and "c (" in emulated.hazards[0]
    y = EmulationBackend(model).run({"x": np.ones(4, np.float32)})["y"]
    assert y.tolist() == [1.0, -math.inf, 3.0, math.inf]


def erf_gelu_model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("sqrt2", math.sqrt(2)), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["u"]), helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["xe"]),
             helper.make_node("Mul", ["xe", "half"], ["y"])]
    return one_op_model(nodes, inits, shape=(200,))


def tanh_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_erf_gelu_becomes_the_high_performance_tanh_form():
    emulated = emulate_ascend_fp16(erf_gelu_model())
    assert emulated.gelus == 1
    assert not any(node.op_type == "Erf" for node in emulated.model.graph.node)
    x = np.linspace(-6, 6, 200).astype(np.float32)
    y = EmulationBackend(erf_gelu_model()).run({"x": x})["y"]
    np.testing.assert_allclose(y, tanh_gelu(x.astype(np.float64)), atol=6e-3, rtol=2e-3)


def test_an_erf_that_is_not_gelu_is_left_alone():
    model = one_op_model([helper.make_node("Erf", ["x"], ["y"])])
    assert emulate_ascend_fp16(model).gelus == 0


def test_gelu_op_gets_the_tanh_approximation():
    model = one_op_model([helper.make_node("Gelu", ["x"], ["y"])], opset=20, shape=(200,))
    x = np.linspace(-6, 6, 200).astype(np.float32)
    assert emulate_ascend_fp16(model).gelus == 1
    y = EmulationBackend(model).run({"x": x})["y"]
    np.testing.assert_allclose(y, tanh_gelu(x.astype(np.float64)), atol=6e-3, rtol=2e-3)


# --------------------------------------------------------------------------- the mask constant

def mask_where(graph: gs.Graph) -> gs.Node:
    """The export's Where(keep, 0, -3.4e38) that builds the additive attention mask."""
    [node] = [n for n in graph.nodes if n.op == "Where" and isinstance(n.inputs[2], gs.Constant)
              and n.inputs[2].values.size == 1 and n.inputs[2].values.item() < -1e30]
    assert float(node.inputs[1].values) == 0.0
    return node


def with_where_constant(graph: gs.Graph, value: float) -> onnx.ModelProto:
    """Replace the mask constant, as the mask-folding pass does with -10000."""
    node = mask_where(graph)
    node.inputs[2] = gs.Constant(f"mask_value_{abs(int(value))}", np.array(value, np.float32))
    return to_model(graph)


def with_multiplicative_mask(graph: gs.Graph, value: float) -> onnx.ModelProto:
    """The transformers 4.21-4.x mask: (1 - float(keep)) * value (facts note, section 2)."""
    node = mask_where(graph)
    keep, out = node.inputs[0], node.outputs[0]
    keep_f = gs.Variable("keep_f", dtype=np.float32)
    dropped = gs.Variable("dropped", dtype=np.float32)
    graph.nodes += [gs.Node("Cast", inputs=[keep], outputs=[keep_f], attrs={"to": TensorProto.FLOAT}),
                    gs.Node("Sub", inputs=[gs.Constant("one_f", np.array(1.0, np.float32)), keep_f],
                            outputs=[dropped]),
                    gs.Node("Mul", inputs=[dropped, gs.Constant("mask_scale", np.array(value, np.float32))],
                            outputs=[out])]
    node.outputs.clear()
    graph.cleanup().toposort()
    return to_model(graph)


@pytest.fixture(scope="module")
def frozen_tiny(tiny_export):
    return tiny_export("legacy14")


def emulation_verdict(original, candidate: onnx.ModelProto):
    result = run_spec(original, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    [report] = validate_candidates(original, [EmulationBackend(candidate)], result.facts, batch=TINY_BATCH,
                                   seq=TINY_SEQ, samples=3)
    return report


def frozen(original) -> gs.Graph:
    return run_spec(original, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ).graph


def test_fp16_emulation_turns_the_old_min_float_mask_into_nan(frozen_tiny):
    report = emulation_verdict(frozen_tiny, with_multiplicative_mask(frozen(frozen_tiny), FP32_MIN))
    assert report.kind == "emulation" and report.passed is False
    assert all(o.nan_or_inf > 0 and not o.passed for o in report.comparison.outputs)
    assert report.comparison.span_agreement == 0.0
    assert any("overflows fp16" in note for note in report.notes)


def test_fp16_emulation_passes_the_same_mask_with_minus_10000(frozen_tiny):
    report = emulation_verdict(frozen_tiny, with_multiplicative_mask(frozen(frozen_tiny), -10000.0))
    assert report.passed is True, report.comparison.summary_line()
    assert report.comparison.span_agreement == 1.0
    assert all(o.atol == 1e-2 and o.max_abs > 1e-6 for o in report.comparison.outputs), \
        "fp16 rounding must leave a visible difference"
    assert report.notes == []


def test_where_mask_overflow_shows_in_padding_rows_and_folding_cures_it(frozen_tiny):
    """Where(keep, 0, -inf) is harmless while a row has a real token; an all-padding row is NaN."""
    unfolded = emulation_verdict(frozen_tiny, to_model(frozen(frozen_tiny)))
    assert unfolded.passed is True
    assert any("all-padding batch" in note and "NaN" in note for note in unfolded.notes)
    folded = emulation_verdict(frozen_tiny, with_where_constant(frozen(frozen_tiny), -10000.0))
    assert folded.passed is True and folded.notes == []


def test_fp32_optimized_candidate_is_held_to_1e_4(frozen_tiny):
    result = run_spec(frozen_tiny, "freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ)
    [exact, emulated] = validate_candidates(
        frozen_tiny, [OrtBackend(to_model(result.graph), name="optimized"), EmulationBackend(to_model(result.graph))],
        result.facts, batch=TINY_BATCH, seq=TINY_SEQ)
    assert exact.passed and all(o.atol == 1e-4 and o.max_abs < 1e-5 for o in exact.comparison.outputs)
    assert emulated.passed and max(o.max_abs for o in emulated.comparison.outputs) > 1e-4, \
        "fp16 emulation must differ from fp32 by more than the fp32 tolerance"
