"""The Ascend emulation: the Gelu kernels ATC compiles, the precision modes, and what fp16 shows about masks."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from conftest import TINY_BATCH, TINY_SEQ
from onnx import TensorProto, helper, numpy_helper

from bertopt.ascend.kernels import QUADRATIC, TANH, gelu_kernel, gelu_reference, kernel_gelu
from bertopt.errors import BertoptError
from bertopt.graph import to_model
from bertopt.graph.builder import Builder
from bertopt.testing import run_spec
from bertopt.validation.backends.emulation import EMULATION_NAME, EmulationBackend, emulate_ascend
from bertopt.validation.backends.ort import OrtBackend
from bertopt.validation.candidates import validate_candidates

FP32_MIN = float(np.finfo(np.float32).min)
FP16_ULP_AT_1 = 2.0 ** -10


def one_op_model(nodes, inits=(), opset=17, shape=(4,)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def scalars(**values: float) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in values.items()]


def every_fp16(low: float = -12.0, high: float = 12.0) -> np.ndarray:
    """Every finite fp16 value in [low, high], as fp32: the whole input domain of an fp16 kernel there."""
    values = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    values = values[np.isfinite(values) & (values >= low) & (values <= high)]
    return np.unique(values).astype(np.float32)


def exact_gelu(x: np.ndarray) -> np.ndarray:
    return torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64)).numpy()


def fp16_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between fp16 values in units of the last place (their bit patterns as ordered ints)."""
    def ordered(v):
        bits = np.asarray(v, np.float16).view(np.int16).astype(np.int32)
        return np.where(bits < 0, -32768 - bits, bits)
    return np.abs(ordered(a) - ordered(b))


# --------------------------------------------------------------------------- the kernels

def test_quadratic_kernel_is_its_formula_on_a_grid():
    x = np.linspace(-8, 8, 16001)
    formula = x * (np.sign(x) * (-0.1444 * (np.minimum(np.abs(0.7071 * x), 1.769) - 1.769) ** 2 + 0.5) + 0.5)
    np.testing.assert_allclose(gelu_reference(x, QUADRATIC, np.float64), formula, rtol=0, atol=1e-15)
    error = np.abs(formula - exact_gelu(x))
    assert 0.017 < error.max() < 0.019, "the FastGeluV2 form is ~1.8e-2 off exact Gelu at worst"
    saturated = np.abs(x) >= 1.769 / 0.7071
    assert np.all(formula[saturated & (x < 0)] == 0) and np.all(formula[saturated & (x > 0)] == x[saturated & (x > 0)])
    tanh_error = np.abs(gelu_reference(x, TANH, np.float64) - exact_gelu(x)).max()
    assert 4e-4 < tanh_error < 5e-4


def test_quadratic_kernel_in_fp16_stays_within_fp16_rounding_of_its_formula():
    x = every_fp16().astype(np.float64)
    formula = x * (np.sign(x) * (-0.1444 * (np.minimum(np.abs(0.7071 * x), 1.769) - 1.769) ** 2 + 0.5) + 0.5)
    fp16 = gelu_reference(x, QUADRATIC, np.float16).astype(np.float64)
    assert np.all(np.abs(fp16 - formula) <= 8 * FP16_ULP_AT_1 * np.maximum(np.abs(x), 1) / 2)
    assert np.abs(fp16 - formula).max() > 1e-4, "fp16 steps must differ from the exact formula"


def kernel_model(form: str, dtype) -> onnx.ModelProto:
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", dtype=np.float32, shape=["n"])
    y = kernel_gelu(Builder(graph, like=x), x, form, dtype)
    y.name = "y"
    graph.inputs, graph.outputs = [x], [y]
    return to_model(graph.toposort())


@pytest.mark.parametrize("form, ulps", [(QUADRATIC, 0), (TANH, 1)])
def test_onnx_kernel_computes_the_numpy_reference_in_fp16(form, ulps):
    """Over every fp16 input in [-12, 12]: bit for bit for the quadratic form, whose steps are +, * and
    min; within an ulp for the tanh form, whose exp comes from ORT and numpy respectively."""
    x = every_fp16()
    y = OrtBackend(kernel_model(form, np.float16), name="kernel").run({"x": x})["y"]
    expected = gelu_reference(x, form, np.float16)
    assert np.all(np.float32(np.float16(y)) == y), "every step is rounded to fp16"
    assert fp16_ulps(y, expected).max() <= ulps
    if ulps:
        assert np.mean(fp16_ulps(y, expected) == 0) > 0.99


@pytest.mark.parametrize("form", [QUADRATIC, TANH])
def test_onnx_kernel_in_fp32_matches_the_numpy_reference(form):
    x = np.linspace(-10, 10, 4001).astype(np.float32)
    y = OrtBackend(kernel_model(form, np.float32), name="kernel").run({"x": x})["y"]
    np.testing.assert_allclose(y, gelu_reference(x, form, np.float32), rtol=1e-6, atol=1e-7)


def test_kernel_by_implmode_and_cann_version():
    for version in ("5.1.RC1", "6.0", "6.0.RC1", "8.0.RC2", "9.0"):
        assert (gelu_kernel("high_performance", version).form, gelu_kernel("high_performance", version).compute) \
            == (QUADRATIC, "input")
        assert (gelu_kernel("high_precision", version).form, gelu_kernel("high_precision", version).compute) \
            == (TANH, "float32")
    assert (gelu_kernel("high_performance", "5.0.4").form, gelu_kernel("high_performance", "5.0.4").compute) \
        == (TANH, "input")
    assert gelu_kernel("high_performance", "3.3").compute == "float32"
    assert "gelu.py" in gelu_kernel("high_performance", "6.0").source
    with pytest.raises(BertoptError, match="high_performance, high_precision"):
        gelu_kernel("fast", "6.0")
    with pytest.raises(BertoptError, match="CANN version"):
        gelu_kernel("high_performance", "latest")


# --------------------------------------------------------------------------- emulation numerics

def test_every_op_output_is_rounded_to_fp16():
    model = one_op_model([helper.make_node("Add", ["x", "c"], ["y"])], scalars(c=1.0))
    x = np.array([2.0 ** -12, 70000.0, -70000.0, 0.1], np.float32)
    y = EmulationBackend(model).run({"x": x})["y"]
    assert y.dtype == np.float32
    assert y[0] == 1.0, "1 + 2^-12 is 1 in fp16"
    assert y[1] == math.inf and y[2] == -math.inf
    assert y[3] == np.float32(np.float16(np.float32(1.1)))


def test_constants_are_rounded_and_overflows_named():
    model = one_op_model([helper.make_node("Mul", ["x", "c"], ["y"])],
                         [numpy_helper.from_array(np.array([1 + 2 ** -12, FP32_MIN, 3.0, 1e5], np.float32), "c")])
    emulated = emulate_ascend(model)
    assert len(emulated.hazards) == 1 and "overflows fp16" in emulated.hazards[0] and "c (" in emulated.hazards[0]
    y = EmulationBackend(model).run({"x": np.ones(4, np.float32)})["y"]
    assert y.tolist() == [1.0, -math.inf, 3.0, math.inf]


def erf_gelu_model(divisor: float = math.sqrt(2), argument: str = "Div", gate: str = "x_first") -> onnx.ModelProto:
    """The erf Gelu as ATC's GeluONNXFusionPass knows it (Div by sqrt 2, then Mul(x, .) -> Mul(., 0.5), or
    Mul(Mul(x, 0.5), .)), or with another argument spelling."""
    nodes = [helper.make_node(argument, ["x", "k"], ["u"]), helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"])]
    if gate == "x_first":
        nodes += [helper.make_node("Mul", ["x", "e1"], ["xe"]), helper.make_node("Mul", ["xe", "half"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["hx", "e1"], ["y"])]
    return one_op_model(nodes, scalars(k=divisor, one=1.0, half=0.5), shape=(None,))


@pytest.mark.parametrize("gate", ["x_first", "half_first"])
def test_atc_erf_gelu_is_computed_as_the_high_performance_kernel(gate):
    emulated = emulate_ascend(erf_gelu_model(gate=gate))
    assert emulated.gelus == 1 and emulated.notes == []
    assert not any(node.op_type == "Erf" for node in emulated.model.graph.node)
    x = every_fp16(-8, 8)
    y = EmulationBackend(erf_gelu_model(gate=gate)).run({"x": x})["y"]
    assert np.array_equal(y, gelu_reference(x, QUADRATIC, np.float16).astype(np.float32))


def test_high_precision_is_the_tanh_form_in_fp32_rounded_once():
    x = every_fp16(-8, 8)
    y = EmulationBackend(erf_gelu_model(), gelu="high_precision").run({"x": x})["y"]
    expected = np.float16(gelu_reference(x, TANH, np.float32))
    assert fp16_ulps(y, expected).max() <= 1
    assert np.abs(y - exact_gelu(x)).max() < 4e-3
    quadratic = gelu_reference(x, QUADRATIC, np.float16).astype(np.float64)
    assert np.abs(quadratic - exact_gelu(x)).max() > 1.5e-2, "the two kernels must be told apart"


def test_cann_5_0_high_performance_is_the_tanh_form_in_fp16():
    x = every_fp16(-8, 8)
    y = EmulationBackend(erf_gelu_model(), cann="5.0.4").run({"x": x})["y"]
    assert fp16_ulps(y, gelu_reference(x, TANH, np.float16)).max() <= 1
    assert fp16_ulps(y, np.float16(gelu_reference(x, TANH, np.float32))).max() > 1, "fp16 steps, not one rounding"


@pytest.mark.parametrize("divisor, argument", [(1 / math.sqrt(2), "Mul"), (1.4142, "Div")])
def test_erf_spellings_atc_does_not_fuse_stay_erf(divisor, argument):
    """Mul(x, 0.7071) is not GeluONNXFusionPass's pattern; 1.4142 is 1.0e-5 off its 1.41421 in fp32."""
    model = erf_gelu_model(divisor, argument)
    emulated = emulate_ascend(model)
    assert emulated.gelus == 0
    assert any(node.op_type == "Erf" for node in emulated.model.graph.node)
    assert len(emulated.notes) == 1 and "1 Erf node(s) not in the form ATC fuses" in emulated.notes[0]
    x = every_fp16(-8, 8)
    y = EmulationBackend(model).run({"x": x})["y"]
    assert np.abs(y - exact_gelu(x)).max() < 1e-2
    assert np.abs(y - gelu_reference(x, QUADRATIC, np.float16)).max() > 1.5e-2


def test_an_erf_that_is_not_gelu_is_left_alone():
    model = one_op_model([helper.make_node("Erf", ["x"], ["y"])])
    assert emulate_ascend(model).gelus == 0


def test_gelu_op_gets_the_chosen_kernel():
    model = one_op_model([helper.make_node("Gelu", ["x"], ["y"])], opset=20, shape=(None,))
    x = every_fp16(-8, 8)
    assert emulate_ascend(model).gelus == 1
    y = EmulationBackend(model).run({"x": x})["y"]
    assert np.array_equal(y, gelu_reference(x, QUADRATIC, np.float16).astype(np.float32))


# --------------------------------------------------------------------------- precision modes

def dense_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Mul(3) -> MatMul(W) -> Add(b) -> y: a vector op before and after a cube op."""
    rng = np.random.default_rng(0)
    weights = {"s": np.array(3.0, np.float32), "w": rng.standard_normal((16, 8)).astype(np.float32) / 4,
               "b": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("MatMul", ["xs", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (4, 16))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (4, 8))],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weights


def half(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def is_fp16(a: np.ndarray) -> bool:
    return bool(np.all(half(a) == a))


def test_precision_modes_change_what_is_rounded():
    model, w = dense_model()
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32) / 3 + 1e-3
    exact = x * w["s"] @ w["w"] + w["b"]

    def run(precision):
        return EmulationBackend(model, precision=precision).run({"x": x})["y"]

    np.testing.assert_allclose(run("origin"), exact, rtol=1e-6, atol=1e-6)
    assert np.array_equal(run("must_keep_origin_dtype"), run("origin"))
    forced = run("force_fp16")
    assert is_fp16(forced) and np.array_equal(forced, run("fp16"))
    assert np.abs(forced - exact).max() > 1e-4
    all_fp16 = half(half(half(half(x) * 3) @ half(w["w"])) + half(w["b"]))  # inputs, weights, every op
    assert fp16_ulps(forced, all_fp16).max() <= 1  # numpy's and ORT's fp32 MatMul may round apart
    # allow_fp32_to_fp16: the Mul and the Add keep fp32, the MatMul reads and writes fp16
    only_cube = half(half(x * 3) @ half(w["w"])) + w["b"]
    np.testing.assert_allclose(run("allow_fp32_to_fp16"), only_cube, rtol=1e-6, atol=1e-6)
    assert not is_fp16(run("allow_fp32_to_fp16"))
    # cube_fp16in_fp32out: fp16 inputs, fp32 output
    fp32_out = half(x * 3) @ half(w["w"]) + w["b"]
    np.testing.assert_allclose(run("cube_fp16in_fp32out"), fp32_out, rtol=1e-6, atol=1e-6)
    assert np.array_equal(run("force_fp32"), run("cube_fp16in_fp32out"))
    # mixed: the Mul before any cube op stays fp32, the Add follows the MatMul into fp16
    mixed = run("mixed_float16")
    assert is_fp16(mixed) and np.array_equal(mixed, run("allow_mix_precision"))
    assert fp16_ulps(mixed, half(half(half(x * 3) @ half(w["w"])) + half(w["b"]))).max() <= 1


def test_precision_modes_not_modelled_say_so_and_compute_as_force_fp16():
    model, _ = dense_model()
    x = np.ones((4, 16), np.float32) / 3
    assert emulate_ascend(model).notes == [] and emulate_ascend(model, precision="origin").notes == []
    [mixed] = emulate_ascend(model, precision="mixed_float16").notes
    assert "approximately" in mixed and "gray list" in mixed
    for value in ("mixed_bfloat16", "allow_mix_precision_bf16", "no_such_mode"):
        backend = EmulationBackend(model, precision=value)
        y = backend.run({"x": x})["y"]
        assert np.array_equal(y, EmulationBackend(model).run({"x": x})["y"])
        assert len(backend.notes) == 1 and f"precision mode {value}: not modelled" in backend.notes[0]


def test_gelu_follows_the_precision_mode():
    """Kept in fp32 (origin), the high_performance kernel computes the quadratic form in fp32."""
    x = np.linspace(-6, 6, 301).astype(np.float32)
    y = EmulationBackend(erf_gelu_model(), precision="origin").run({"x": x})["y"]
    np.testing.assert_allclose(y, gelu_reference(x, QUADRATIC, np.float32), rtol=1e-6, atol=1e-7)
    assert not is_fp16(y)


def test_candidate_name_says_which_gelu_and_precision():
    model, _ = dense_model()
    backend = EmulationBackend(model, gelu="high_precision", precision="mixed_float16", cann="8.0.RC2")
    assert backend.name == "Ascend emulation: mixed_float16, Gelu high_precision (ORT CPU)"
    assert backend.kind == "emulation"
    assert EmulationBackend(model).name == EMULATION_NAME
    assert EMULATION_NAME == "Ascend emulation: force_fp16, Gelu high_performance (ORT CPU)"
    with pytest.raises(BertoptError):
        EmulationBackend(model, gelu="fastest")


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
    assert any("all-zero batch" in note and "NaN" in note for note in unfolded.notes)
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


# --------------------------------------------------------------------------- real weights

@pytest.fixture(scope="module")
def minilm_optimized(tmp_path_factory):
    from bertopt.flow.export import export_onnx, resolve_source

    folder = tmp_path_factory.mktemp("minilm")
    original = export_onnx(resolve_source("minilm"), folder / "m.onnx").path
    return original, run_spec(original, "default", batch=2, seq=128)


@pytest.mark.integration
def test_minilm_high_performance_gelu_moves_logits_clearly_more_than_high_precision(minilm_optimized):
    original, result = minilm_optimized
    optimized = to_model(result.graph)
    candidates = [EmulationBackend(optimized, gelu=gelu, precision=precision)
                  for gelu in ("high_performance", "high_precision") for precision in ("force_fp16", "origin")]
    reports = validate_candidates(original, candidates, result.facts, batch=2, seq=128, samples=2)
    shift = {report.name: max(o.max_abs for o in report.comparison.outputs) for report in reports}
    performance, precision = shift[candidates[0].name], shift[candidates[2].name]
    assert performance > 0.02, shift
    assert performance > 3 * precision, shift
    assert shift[candidates[1].name] > 0.01, "the quadratic form alone (fp32) moves the logits too"
    assert shift[candidates[3].name] < 3e-3, "tanh Gelu in fp32, nothing rounded: close to the original"
    assert all(report.notes == [] for report in reports)
