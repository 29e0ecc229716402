"""Tests of the declarative matcher, the rules that rewrite what it matches, and the node builder, on tiny
onnx-graphsurgeon graphs built by hand; rewrites are checked on ONNX Runtime against the graph before."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from bertopt.graph import to_model
from bertopt.graph.builder import Builder as OpBuilder
from bertopt.graph.pattern import Any, Const, Match, Miss, OneOf, Op, Pattern, Var, _
from bertopt.graph.rules import Rule, apply_rules
from bertopt.model.forms import SQRT2, canonical_erf_pattern


class Builder:
    """Builds a gs graph node by node; every node is named so messages can be asserted."""

    def __init__(self) -> None:
        self.graph = gs.Graph(opset=17)
        self.count = 0

    def input(self, name: str) -> gs.Variable:
        tensor = gs.Variable(name, dtype=np.float32, shape=[2, 4])
        self.graph.inputs.append(tensor)
        return tensor

    def const(self, value, dtype=np.float32) -> gs.Constant:
        self.count += 1
        return gs.Constant(f"c{self.count}", np.asarray(value, dtype=dtype))

    def op(self, op: str, *inputs: gs.Tensor, name: str | None = None, attrs: dict | None = None,
           outputs: int = 1):
        self.count += 1
        name = name or f"n{self.count}"
        outs = [gs.Variable(f"{name}_out{i}") for i in range(outputs)]
        self.graph.nodes.append(gs.Node(op, name, attrs=attrs or {}, inputs=list(inputs), outputs=outs))
        return outs[0] if outputs == 1 else outs

    def node(self, name: str) -> gs.Node:
        return next(n for n in self.graph.nodes if n.name == name)


def gelu_pattern(**root) -> Pattern:
    x = Var("x")
    erf = Op("Erf", Op("Div", x, Const(1.4142135, rtol=1e-3)), name="erf")
    return Pattern(Op("Mul", Op("Mul", x, Op("Add", erf, Const(1.0))), Const(0.5), name="out", **root))


def add_gelu(b: Builder, x: gs.Tensor, prefix: str = "", swapped: bool = False,
             half: float = 0.5, erf_op: str = "Erf") -> gs.Tensor:
    div = b.op("Div", x, b.const(1.4142135), name=f"{prefix}div")
    erf = b.op(erf_op, div, name=f"{prefix}erf")
    one = b.const(1.0)
    add = b.op("Add", *((one, erf) if swapped else (erf, one)), name=f"{prefix}add")
    mul = b.op("Mul", *((add, x) if swapped else (x, add)), name=f"{prefix}mul")
    c = b.const(half)
    return b.op("Mul", *((c, mul) if swapped else (mul, c)), name=f"{prefix}out")


@pytest.fixture
def gelu_graph():
    b = Builder()
    x = b.input("x")
    b.graph.outputs.append(add_gelu(b, x))
    return b, x


# --- basic matching and the Match object ---------------------------------------------------------

def test_erf_gelu_matches_and_binds_names(gelu_graph):
    b, x = gelu_graph
    m = gelu_pattern().match(b.node("out"), b.graph)
    assert isinstance(m, Match)
    assert m["x"] is x
    assert m.node("out") is b.node("out") is m.root
    assert m.node("erf") is b.node("erf")
    assert m.output is b.node("out").outputs[0]
    assert [n.name for n in m.nodes] == ["out", "mul", "add", "erf", "div"]
    assert m.escaping() == []


def test_unknown_names_raise_a_helpful_key_error(gelu_graph):
    b, _x = gelu_graph
    m = gelu_pattern().match(b.node("out"))
    with pytest.raises(KeyError, match=r"no tensor named 'out'.*known: \['x'\]"):
        m["out"]
    with pytest.raises(KeyError, match="no node named 'x'"):
        m.node("x")


def test_non_root_candidates_do_not_match(gelu_graph):
    b, _x = gelu_graph
    assert gelu_pattern().match(b.node("mul")) is None
    assert gelu_pattern().match(b.node("erf")) is None


# --- commuting -----------------------------------------------------------------------------------

def test_commuted_operands_match():
    b = Builder()
    x = b.input("x")
    add_gelu(b, x, swapped=True)
    m = gelu_pattern().match(b.node("out"))
    assert m is not None and m["x"] is x


def test_commute_false_opts_out():
    b = Builder()
    add_gelu(b, b.input("x"), swapped=True)
    assert gelu_pattern(commute=False).match(b.node("out")) is None
    half = b.node("out").inputs[0].name
    assert gelu_pattern(commute=False).explain(b.node("out")) == (
        f"Mul 'out' input 0: expected Mul, found constant '{half}' (0.5)")


def test_non_commutative_ops_keep_operand_order():
    b = Builder()
    x = b.input("x")
    b.op("Sub", b.const(1.0), x, name="sub")
    assert Pattern(Op("Sub", Var("x"), Const(1.0))).match(b.node("sub")) is None
    assert Pattern(Op("Sub", Const(1.0), Var("x"))).match(b.node("sub")) is not None


def test_commuting_backtracks_to_keep_vars_consistent():
    b = Builder()
    x, y = b.input("x"), b.input("y")
    b.op("Mul", y, b.op("Add", x, y, name="add"), name="mul")
    v = Var("v")
    m = Pattern(Op("Mul", v, Op("Add", v, Any()))).match(b.node("mul"))
    assert m is not None and m["v"] is y


# --- alternatives and op-type tuples --------------------------------------------------------------

def scale_pattern() -> Pattern:
    s = Var("scores")
    return Pattern(Op("Softmax", OneOf(Op("Div", s, Const(8.0)), Op("Mul", s, Const(0.125))),
                      name="softmax"))


@pytest.mark.parametrize("op, value", [("Div", 8.0), ("Mul", 0.125)])
def test_one_of_accepts_each_alternative(op, value):
    b = Builder()
    scores = b.input("scores")
    b.op("Softmax", b.op(op, scores, b.const(value), name="scale"), name="softmax")
    m = scale_pattern().match(b.node("softmax"))
    assert m is not None and m["scores"] is scores and m.nodes[1].op == op


def test_one_of_explains_the_alternative_that_got_furthest():
    b = Builder()
    b.op("Softmax", b.op("Mul", b.input("scores"), b.const(0.2), name="scale"), name="softmax")
    assert scale_pattern().match(b.node("softmax")) is None
    assert scale_pattern().explain(b.node("softmax")) == (
        "Softmax 'softmax' input 0 > Mul 'scale' input 1: expected constant ~0.125, got 0.2")


def test_op_type_tuple_and_one_of_at_the_root():
    b = Builder()
    x = b.input("x")
    b.op("Relu", x, name="relu")
    b.op("Tanh", x, name="tanh")
    b.op("Sigmoid", x, name="sigmoid")
    by_tuple = Pattern(Op(("Relu", "Tanh"), Var("x")))
    by_one_of = Pattern(OneOf(Op("Relu", Var("x")), Op("Tanh", Var("x"))))
    for pattern in (by_tuple, by_one_of):
        assert [m.root.name for m in pattern.find_all(b.graph)] == ["relu", "tanh"]
        assert pattern.match(b.node("sigmoid")) is None
    assert by_tuple.explain(b.node("sigmoid")) == "expected Relu or Tanh, found Sigmoid 'sigmoid'"


def test_root_must_be_an_op_and_inputs_patterns():
    with pytest.raises(TypeError, match="root must be an Op"):
        Pattern(Var("x"))
    with pytest.raises(TypeError, match="inputs must be patterns"):
        Op("Mul", Var("x"), "0.5")  # a number is a constant (issue 13); a string is nothing


# --- Var consistency and shared subexpressions ----------------------------------------------------

def test_same_var_must_bind_the_same_tensor():
    b = Builder()
    x, y = b.input("x"), b.input("y")
    b.op("Div", x, b.op("Sqrt", x, name="good_sqrt"), name="good")
    b.op("Div", x, b.op("Sqrt", y, name="bad_sqrt"), name="bad")
    v = Var("v")
    pattern = Pattern(Op("Div", v, Op("Sqrt", v)))
    assert pattern.match(b.node("good"))["v"] is x
    assert pattern.match(b.node("bad")) is None
    assert pattern.explain(b.node("bad")) == (
        "Div 'bad' input 1 > Sqrt 'bad_sqrt' input 0: "
        "'v' is already bound to graph input 'x', found graph input 'y'")


def test_any_and_underscore_bind_nothing():
    b = Builder()
    b.op("Div", b.input("x"), b.op("Sqrt", b.input("y")), name="div")
    m = Pattern(Op("Div", _, Op("Sqrt", Any()))).match(b.node("div"))
    assert m is not None
    with pytest.raises(KeyError):
        m["_"]


def layer_norm_core():
    """A decomposed LayerNorm: the centred tensor is shared by Pow and Div."""
    x = Var("x")
    centred = Op("Sub", x, Op("ReduceMean", x))
    var = Op("ReduceMean", Op("Pow", centred, Const(2.0)))
    return Pattern(Op("Div", centred, Op("Sqrt", Op("Add", var, Const(name="eps"))), name="norm"))


def build_layer_norm(b: Builder, x: gs.Tensor, share: bool) -> None:
    centred = b.op("Sub", x, b.op("ReduceMean", x), name="sub")
    other = centred if share else b.op("Sub", x, b.op("ReduceMean", x), name="sub2")
    var = b.op("ReduceMean", b.op("Pow", other, b.const(2.0)))
    b.op("Div", centred, b.op("Sqrt", b.op("Add", var, b.const(1e-12))), name="norm")


def test_shared_op_object_must_match_one_node():
    b = Builder()
    build_layer_norm(b, b.input("x"), share=True)
    m = layer_norm_core().match(b.node("norm"))
    assert m is not None and len(m.nodes) == 7 and constant_of(m["eps"]) == pytest.approx(1e-12)

    b = Builder()
    build_layer_norm(b, b.input("x"), share=False)
    assert layer_norm_core().match(b.node("norm")) is None
    assert "expected the Sub matched before (Sub 'sub'), found Sub 'sub2'" in (
        layer_norm_core().explain(b.node("norm")))


def constant_of(tensor: gs.Tensor) -> float:
    return float(tensor.values)


# --- constants -----------------------------------------------------------------------------------

def mul_by(const: Const) -> Pattern:
    return Pattern(Op("Mul", Var("x"), const, name="mul"))


def graph_mul_by(value, dtype=np.float32) -> Builder:
    b = Builder()
    b.op("Mul", b.input("x"), b.const(value, dtype), name="mul")
    return b


@pytest.mark.parametrize("const, value, matches", [
    (Const(1.4142135, rtol=1e-3), np.sqrt(2.0), True),
    (Const(1.414, rtol=1e-3), np.sqrt(2.0), True),
    (Const(1.414), np.sqrt(2.0), False),                      # default rtol is tight
    (Const(0.0, atol=1e-6), 1e-7, True),
    (Const(0.0, atol=1e-9), 1e-7, False),
    (Const(0.5), [0.5, 0.5, 0.5], True),                      # a scalar broadcasts
    (Const(0.5), [0.5, 0.6, 0.5], False),                     # ... to every element
    (Const([1.0, 2.0]), [1.0, 2.0], True),
    (Const([1.0, 2.0]), [1.0, 2.0, 3.0], False),
    (Const(0.5), np.zeros((0,)), False),                      # empty is not "every element 0.5"
    (Const(), [7.0, 8.0], True),
    (Const(shape=()), 3.0, True),
    (Const(shape=()), [3.0], False),
    (Const(-3.4028235e38, rtol=1e-3), np.finfo(np.float32).min, True),
    (Const(where=(lambda v: v.size == 1, "is a scalar")), 2.0, True),
    (Const(where=(lambda v: v.size == 1, "is a scalar")), [2.0, 2.0], False),
])
def test_constant_values_and_tolerances(const, value, matches):
    b = graph_mul_by(value)
    assert (mul_by(const).match(b.node("mul")) is not None) is matches


def test_integer_and_boolean_constants():
    assert mul_by(Const(-1)).match(graph_mul_by(-1, np.int64).node("mul")) is not None
    assert mul_by(Const(True)).match(graph_mul_by(True, np.bool_).node("mul")) is not None
    assert mul_by(Const(False)).match(graph_mul_by(True, np.bool_).node("mul")) is None


def test_const_rejects_computed_tensors_and_can_be_named():
    b = Builder()
    x = b.input("x")
    b.op("Mul", x, b.op("Relu", x, name="relu"), name="mul")
    pattern = Pattern(Op("Mul", Var("x"), Const(0.5), commute=False))
    assert pattern.explain(b.node("mul")) == (
        "Mul 'mul' input 1: expected constant ~0.5, found 'relu_out0' from Relu 'relu'")
    b = graph_mul_by(0.25)
    m = mul_by(Const(name="scale")).match(b.node("mul"))
    assert m["scale"] is b.node("mul").inputs[1]


def test_const_messages_for_shape_and_predicate():
    b = graph_mul_by([1.0, 2.0])
    assert mul_by(Const(shape=[3])).explain(b.node("mul")) == (
        "Mul 'mul' input 1: expected a constant of shape (3,), got shape (2,)")
    assert mul_by(Const(where=(lambda v: v.size == 1, "is a scalar"))).explain(b.node("mul")) == (
        "Mul 'mul' input 1: constant 'c1' ([1., 2.]) fails is a scalar")


# --- attributes, predicates, input and output counts ----------------------------------------------

def transpose_graph(**attrs) -> Builder:
    b = Builder()
    b.op("Transpose", b.input("x"), name="t", attrs=attrs)
    return b


def test_attribute_equality():
    pattern = Pattern(Op("Transpose", Var("x"), attrs={"perm": [0, 2, 3, 1]}))
    assert pattern.match(transpose_graph(perm=[0, 2, 3, 1]).node("t")) is not None
    assert pattern.match(transpose_graph(perm=[0, 2, 1, 3]).node("t")) is None
    assert pattern.match(transpose_graph(perm=[0, 2, 3]).node("t")) is None
    assert pattern.explain(transpose_graph(perm=[0, 2, 1, 3]).node("t")) == (
        "Transpose 't' attribute perm is [0, 2, 1, 3], expected [0, 2, 3, 1]")
    assert pattern.explain(transpose_graph().node("t")) == (
        "Transpose 't' has no attribute perm (expected [0, 2, 3, 1])")


def test_float_attributes_compare_through_float32():
    b = Builder()
    b.op("LayerNormalization", b.input("x"), b.const(np.ones(4)), b.const(np.zeros(4)), name="ln",
         attrs={"epsilon": float(np.float32(1e-12)), "axis": -1})
    pattern = Pattern(Op("LayerNormalization", Var("x"), Const(), Const(),
                         attrs={"epsilon": 1e-12, "axis": -1}))
    assert pattern.match(b.node("ln")) is not None
    pattern = Pattern(Op("LayerNormalization", Var("x"), Const(), Const(), attrs={"epsilon": 1e-5}))
    assert pattern.match(b.node("ln")) is None


def test_where_predicate_with_and_without_description():
    b = Builder()
    b.op("Softmax", b.input("x"), name="sm", attrs={"axis": 1})

    def last_axis(node: gs.Node) -> bool:
        return node.attrs.get("axis", -1) == -1

    described = Pattern(Op("Softmax", Var("x"), where=(last_axis, "softmax over the last axis")))
    assert described.match(b.node("sm")) is None
    assert described.explain(b.node("sm")) == "Softmax 'sm' fails softmax over the last axis"
    assert Pattern(Op("Softmax", Var("x"), where=last_axis)).explain(b.node("sm")) == (
        "Softmax 'sm' fails last_axis")
    assert Pattern(Op("Softmax", Var("x"), where=lambda n: True)).match(b.node("sm")) is not None


def test_extra_inputs_need_partial_inputs():
    b = Builder()
    b.op("Clip", b.input("x"), b.const(0.0), b.const(6.0), name="clip")
    assert Pattern(Op("Clip", Var("x"))).explain(b.node("clip")) == (
        "Clip 'clip' has 3 inputs, the pattern expects 1")
    assert Pattern(Op("Clip", Var("x"), partial_inputs=True)).match(b.node("clip")) is not None
    # partial_inputs allows extra inputs, never missing ones
    too_many = Op("Clip", Var("x"), Const(), Const(), Const(), partial_inputs=True)
    assert Pattern(too_many).match(b.node("clip")) is None


def test_output_count_and_output_index():
    b = Builder()
    first, second = b.op("Split", b.input("x"), name="split", outputs=2)
    b.op("Relu", second, name="uses_second")
    b.op("Relu", first, name="uses_first")
    split = Op("Split", Var("x"), outputs=2)
    pattern = Pattern(Op("Relu", split[1]))
    assert pattern.match(b.node("uses_second")) is None  # output 0 is read outside the match
    m = pattern.match(b.node("uses_second"), allow_escape=True)
    assert m is not None and m.escaping() == [first]
    assert pattern.explain(b.node("uses_first")) == (
        "Relu 'uses_first' input 0: expected output 1 of Split, found output 0 of Split 'split'")
    # a plain Op means output 0 of a node with the declared number of outputs
    assert Pattern(Op("Relu", Op("Split", Var("x")))).explain(b.node("uses_first")) == (
        "Relu 'uses_first' input 0: Split 'split' has 2 outputs, the pattern expects 1")
    any_outputs = Pattern(Op("Relu", Op("Split", Var("x"), outputs=None)))
    assert any_outputs.match(b.node("uses_first"), allow_escape=True) is not None


# --- explain --------------------------------------------------------------------------------------

def test_explain_names_the_failing_node_and_input_with_a_path():
    b = Builder()
    x = b.input("x")
    add_gelu(b, x, prefix="layer.0/", erf_op="Tanh")
    assert gelu_pattern().explain(b.node("layer.0/out")) == (
        "Mul 'layer.0/out' input 0 > Mul 'layer.0/mul' input 1 > Add 'layer.0/add' input 0: "
        "expected Erf, found Tanh 'layer.0/erf'")


def test_explain_reports_a_wrong_constant_at_its_input():
    b = Builder()
    add_gelu(b, b.input("x"), prefix="layer.0/", half=0.7071)
    assert gelu_pattern().explain(b.node("layer.0/out")) == (
        "Mul 'layer.0/out' input 1: expected constant ~0.5, got 0.7071")


def test_explain_of_a_match_and_of_a_wrong_root(gelu_graph):
    b, _x = gelu_graph
    assert gelu_pattern().explain(b.node("out")) == "matches 5 nodes from Mul 'out'"
    assert gelu_pattern().explain(b.node("add")) == "expected Mul, found Add 'add'"


# --- escaping intermediates -----------------------------------------------------------------------

def test_intermediate_used_outside_the_match_escapes(gelu_graph):
    b, _x = gelu_graph
    erf_out = b.node("erf").outputs[0]
    b.op("Neg", erf_out, name="outsider")
    pattern = gelu_pattern()
    assert pattern.match(b.node("out"), b.graph) is None
    assert pattern.find_all(b.graph) == []
    assert pattern.explain(b.node("out"), b.graph) == (
        "intermediate 'erf_out0' (output of Erf 'erf') is also used by Neg 'outsider', "
        "outside the match")
    [m] = pattern.find_all(b.graph, allow_escape=True)
    assert m.escaping() == [erf_out]


def test_intermediate_graph_output_escapes_but_root_output_does_not(gelu_graph):
    b, _x = gelu_graph
    assert len(gelu_pattern().find_all(b.graph)) == 1  # the root output is a graph output
    b.graph.outputs.append(b.node("mul").outputs[0])
    assert gelu_pattern().find_all(b.graph) == []
    assert gelu_pattern().explain(b.node("out"), b.graph) == (
        "intermediate 'mul_out0' (output of Mul 'mul') is a graph output")
    assert gelu_pattern().match(b.node("out")) is not None  # without the graph, outputs are unknown


# --- find_all -------------------------------------------------------------------------------------

def add_chain(length: int) -> Builder:
    b = Builder()
    t = b.input("x")
    for i in range(length):
        t = b.op("Add", t, b.input(f"y{i}"), name=f"a{i}")
    return b


def test_find_all_is_non_overlapping_in_graph_order():
    pattern = Pattern(Op("Add", Op("Add", Var("x"), Var("y")), Var("z"), name="top"))
    b = add_chain(5)
    assert [m.root.name for m in pattern.find_all(b.graph)] == ["a1", "a3"]
    claimed = [n.name for m in pattern.find_all(b.graph) for n in m.nodes]
    assert len(claimed) == len(set(claimed)) == 4


def test_find_all_backtracks_around_claimed_nodes():
    # a1 = Add(a0, a0b): both operands are Adds. a0_user claims a0 first (its output escapes to
    # a1, hence allow_escape); a1 still matches through the commuted order, using a0b.
    b = Builder()
    x, y = b.input("x"), b.input("y")
    a0 = b.op("Add", x, y, name="a0")
    b.op("Add", a0, b.input("z"), name="a0_user")
    a0b = b.op("Add", y, x, name="a0b")
    b.op("Add", a0, a0b, name="a1")
    pattern = Pattern(Op("Add", Op("Add", Var("x"), Var("y")), Any()))
    matches = pattern.find_all(b.graph, allow_escape=True)
    roots = [(m.root.name, [n.name for n in m.nodes]) for m in matches]
    assert roots == [("a0_user", ["a0_user", "a0"]), ("a1", ["a1", "a0b"])]


def test_find_all_is_deterministic_across_runs_and_layers():
    b = Builder()
    t = b.input("x")
    for i in range(4):
        t = add_gelu(b, t, prefix=f"l{i}/", swapped=bool(i % 2))
    b.graph.outputs.append(t)
    runs = [[m.root.name for m in gelu_pattern().find_all(b.graph)] for _ in range(3)]
    assert runs[0] == ["l0/out", "l1/out", "l2/out", "l3/out"]
    assert runs[0] == runs[1] == runs[2]


def test_find_all_stays_linear_on_thousands_of_nodes():
    layers = 600  # 3000 nodes
    calls = {"root": 0, "erf": 0}

    def count(key):
        def predicate(node):
            calls[key] += 1
            return True
        return predicate

    x = Var("x")
    erf = Op("Erf", Op("Div", x, Const(1.4142135, rtol=1e-3)), where=count("erf"))
    pattern = Pattern(Op("Mul", Op("Mul", x, Op("Add", erf, Const(1.0))), Const(0.5),
                         where=count("root")))
    b = Builder()
    t = b.input("x")
    for i in range(layers):
        t = add_gelu(b, t, prefix=f"l{i}/", swapped=bool(i % 3 == 0))
    b.graph.outputs.append(t)
    assert len(b.graph.nodes) == 5 * layers
    assert len(pattern.find_all(b.graph)) == layers
    # each Mul is tried once as a root (two per layer); only the real roots get as far as the Erf
    assert calls == {"root": 2 * layers, "erf": layers}


# --- plain numbers, get / in, tagged alternatives -------------------------------------------------

def test_a_plain_number_is_a_constant():
    b = graph_mul_by(0.5)
    assert mul_by(Const(0.5)).match(b.node("mul")) is not None
    assert Pattern(Op("Mul", Var("x"), 0.5)).match(b.node("mul")) is not None
    assert Pattern(Op("Mul", Var("x"), 0.6)).explain(b.node("mul")) == (
        "Mul 'mul' input 1: expected constant ~0.6, got 0.5")
    assert Pattern(Op("Mul", Var("x"), -1)).match(graph_mul_by(-1, np.int64).node("mul")) is not None


def biased_relu() -> Pattern:
    x = Var("x")
    return Pattern(Op("Relu", OneOf(Op("Add", x, Var("bias")), x), name="relu"))


def test_get_and_in_for_names_an_alternative_may_not_bind():
    b = Builder()
    x = b.input("x")
    b.op("Relu", b.op("Add", x, b.const([1.0, 2.0, 3.0, 4.0])), name="with_bias")
    b.op("Relu", x, name="plain")
    with_bias, plain = (biased_relu().match(b.node(n)) for n in ("with_bias", "plain"))
    assert "bias" in with_bias and with_bias.get("bias") is with_bias["bias"]
    assert "bias" not in plain and plain.get("bias") is None and plain.get("bias", x) is x
    assert "relu" not in with_bias  # `in` and `get` look at tensors, like m[...]; nodes are m.node(...)


def test_get_node_for_a_node_an_alternative_may_not_capture():
    b = Builder()
    x = b.input("x")
    b.op("Relu", b.op("Add", x, b.const([1.0, 2.0, 3.0, 4.0])), name="with_bias")
    b.op("Relu", x, name="plain")
    pattern = Pattern(Op("Relu", OneOf(Op("Add", Var("x"), Var("bias"), name="add"), Var("x")), name="relu"))
    with_bias, plain = (pattern.match(b.node(n)) for n in ("with_bias", "plain"))
    assert with_bias.get_node("add") is with_bias.node("add") and with_bias.get_node("relu").name == "with_bias"
    assert plain.get_node("add") is None and plain.get_node("add", "absent") == "absent"


def scale_by_tag(labels=None) -> Pattern:
    s = Var("scores")
    scale = OneOf(Op("Div", s, 8.0), Op("Mul", s, 0.125), tag="scale", labels=labels)
    return Pattern(Op("Softmax", scale))


@pytest.mark.parametrize("op, value, index, label", [("Div", 8.0, 0, "divide"), ("Mul", 0.125, 1, "multiply")])
def test_a_tag_says_which_alternative_matched(op, value, index, label):
    b = Builder()
    b.op("Softmax", b.op(op, b.input("scores"), b.const(value)), name="softmax")
    assert scale_by_tag().match(b.node("softmax")).tag("scale") == index
    assert scale_by_tag(("divide", "multiply")).match(b.node("softmax")).tag("scale") == label
    with pytest.raises(KeyError, match="no tag named 'other'.*known: \\['scale'\\]"):
        scale_by_tag().match(b.node("softmax")).tag("other")


def test_a_tag_met_twice_must_name_the_same_alternative():
    x = Var("x")

    def positive() -> OneOf:
        return OneOf(Op("Relu", x), Op("Abs", x), tag="positive")

    pattern = Pattern(Op("Add", positive(), positive(), commute=False))
    b = Builder()
    x_in = b.input("x")
    b.op("Add", b.op("Relu", x_in), b.op("Relu", x_in), name="same")
    b.op("Add", b.op("Abs", x_in), b.op("Relu", x_in), name="mixed")
    assert pattern.match(b.node("same")).tag("positive") == 0
    assert pattern.explain(b.node("mixed")) == (
        "Add 'mixed' input 1: tag 'positive' is already 1, this alternative is 0")
    with pytest.raises(TypeError, match="labels need a tag"):
        OneOf(Op("Relu", x), labels=("relu",))


def test_required_op_types_are_those_in_every_alternative():
    x = Var("x")
    argument = OneOf(Op("Div", x, 1.4), Op("Mul", x, 0.7))
    assert Pattern(Op("Mul", Op("Erf", argument), 0.5)).required_op_types() == {"Mul", "Erf"}
    assert Pattern(OneOf(Op("Relu", x), Op("Relu", Op("Abs", x)))).required_op_types() == {"Relu"}
    assert Pattern(Op(("Relu", "Tanh"), x)).required_op_types() == frozenset()


def test_attempt_returns_the_match_or_how_close_it_came(gelu_graph):
    b, _x = gelu_graph
    assert isinstance(gelu_pattern().attempt(b.node("out"), b.graph), Match)
    miss = gelu_pattern().attempt(b.node("mul"), b.graph)
    assert isinstance(miss, Miss) and miss.root is b.node("mul")
    assert str(miss) == f"nearest candidate Mul 'mul': {gelu_pattern().explain(b.node('mul'))}"


# --- the builder --------------------------------------------------------------------------------------

def run(graph: gs.Graph, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(to_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def exact_gelu(x: np.ndarray) -> np.ndarray:
    return torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64)).numpy()


def test_the_builder_writes_the_erf_gelu_as_an_expression():
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", dtype=np.float32, shape=["batch", 64])
    graph.inputs = [x]
    b = OpBuilder(graph, like=x)
    y = b.Mul(b.Mul(x, b.Add(b.Erf(b.Div(x, SQRT2)), 1.0)), 0.5)
    graph.outputs = [y]
    assert (y.dtype, y.shape) == (np.float32, ["batch", 64])
    assert [n.op for n in b.nodes] == ["Div", "Erf", "Add", "Mul", "Mul"]
    assert len({n.name for n in graph.nodes} | {t for t in graph.tensors()}) == 5 + len(graph.tensors())
    assert len(canonical_erf_pattern().find_all(graph)) == 1
    values = np.random.default_rng(0).normal(0, 3, (8, 64)).astype(np.float32)
    np.testing.assert_allclose(run(graph, x=values)[0], exact_gelu(values), rtol=1e-5, atol=1e-6)


def test_builder_constants_are_typed_like_their_operand():
    graph = gs.Graph(opset=17)
    half = gs.Variable("half", dtype=np.float16, shape=[2, 3])
    ids = gs.Variable("ids", dtype=np.int64, shape=[2, 3])
    b = OpBuilder(graph)
    assert b.Div(half, 2.0).inputs[0].inputs[1].values.dtype == np.float16
    assert b.Add(ids, 1).inputs[0].inputs[1].values.dtype == np.int64
    assert b.Mul(half, np.float32(3.0)).inputs[0].inputs[1].values.dtype == np.float32  # numpy: as given
    assert OpBuilder(graph).Sqrt(4.0).inputs[0].inputs[0].values.dtype == np.float32
    assert OpBuilder(graph, like=half).Sqrt(4.0).inputs[0].inputs[0].values.dtype == np.float16
    with pytest.raises(TypeError, match="would be truncated"):
        b.Add(ids, 0.5)
    with pytest.raises(TypeError, match="neither a tensor nor a number"):
        b.Add(ids, "one")


def test_builder_output_types_shapes_attributes_and_names():
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", dtype=np.float32, shape=["batch", 1, 8])
    mask = gs.Variable("mask", dtype=np.float32, shape=[1, 4, 1])
    b = OpBuilder(graph)
    assert b.Add(x, mask).shape == ["batch", 4, 8]  # broadcast, symbolic dimensions kept
    cast = b.Cast(x, to=onnx.TensorProto.FLOAT16)
    assert (cast.dtype, cast.shape) == (np.float16, ["batch", 1, 8])
    assert b.Less(x, 0.0).dtype == np.bool_
    reshaped = b.Reshape(x, np.array([-1, 8], np.int64))
    assert (reshaped.dtype, reshaped.shape) == (None, None)  # not elementwise: left to shape inference
    given = b.Reshape(x, np.array([-1, 8], np.int64), dtype=np.float32, shape=["n", 8])
    assert (given.dtype, given.shape) == (np.float32, ["n", 8])
    gelu = b.FastGelu(x, domain="com.microsoft", name="my_gelu")
    node = gelu.inputs[0]
    assert (node.name, node.domain, gelu.name, gelu.shape) == ("my_gelu", "com.microsoft", "my_gelu_out", x.shape)
    first, second = b.Split(x, axis=2, outputs=2)
    assert first.inputs[0] is second.inputs[0] and first.inputs[0].attrs == {"axis": 2}
    assert b.RandomNormalLike(x, attrs={"dtype": 1}).inputs[0].attrs == {"dtype": 1}
    y = gs.Variable("y", dtype=np.float32)
    assert b.Relu(x, out=y) is y and y.inputs[0].op == "Relu"
    assert b.Relu(None).inputs[0].inputs[0].name == ""  # an omitted optional input
    names = [n.name for n in graph.nodes]
    assert len(names) == len(set(names))
    with pytest.raises(AttributeError):
        b.relu(x)


# --- rules ------------------------------------------------------------------------------------------

def fuse_to_contrib_gelu() -> Rule:
    return Rule(gelu_pattern(), lambda m, b: b.Gelu(m["x"], domain="com.microsoft"), name="gelu")


def typed_gelu_graph(layers: int = 2, swapped=(False, True)) -> Builder:
    """Gelus one after another (`x -> gelu -> Relu -> gelu ...`), the last one a graph output."""
    b = Builder()
    t = b.input("x")
    for i in range(layers):
        t = add_gelu(b, t, prefix=f"l{i}/", swapped=swapped[i % len(swapped)])
        if i < layers - 1:
            t = b.op("Relu", t, name=f"l{i}/relu")
    t.dtype = np.float32
    b.graph.outputs.append(t)
    return b


def test_apply_rules_rewires_consumers_keeps_output_names_and_removes_what_died():
    b = typed_gelu_graph()
    before = b.graph.copy()
    relu = b.node("l0/relu")
    old_inner_name = relu.inputs[0].name
    result = apply_rules(b.graph, [fuse_to_contrib_gelu()])
    assert result["gelu"] == 2 and result.changed and result.declined == {}
    graph = b.graph
    assert sorted(n.op for n in graph.nodes) == ["Gelu", "Gelu", "Relu"]
    assert relu.inputs[0].inputs[0].op == "Gelu" and relu.inputs[0].name == old_inner_name
    assert [t.name for t in graph.outputs] == ["l1/out_out0"] and graph.outputs[0].inputs[0].op == "Gelu"
    assert len({n.name for n in graph.nodes}) == 3
    values = np.random.default_rng(1).normal(0, 2, (2, 4)).astype(np.float32)
    np.testing.assert_allclose(run(graph.toposort(), x=values)[0], run(before, x=values)[0], rtol=1e-6, atol=1e-6)


def test_a_check_declines_with_a_reason_and_why_not_says_it():
    b = typed_gelu_graph()
    rule = Rule(gelu_pattern(), lambda m, b: b.Gelu(m["x"], domain="com.microsoft"),
                check=lambda m: "kept: a layer-0 Gelu" if m.root.name.startswith("l0/") else None, name="gelu")
    result = apply_rules(b.graph, [rule])
    assert (result["gelu"], result.declined["gelu"]) == (1, 1)
    assert b.node("l0/out").outputs[0].outputs[0] is b.node("l0/relu")  # left as it was
    assert result.why_not == "nearest candidate Mul 'l0/out': rule gelu: kept: a layer-0 Gelu"


def test_a_rewrite_returning_none_declines_and_what_it_wrote_goes():
    b = typed_gelu_graph()
    result = apply_rules(b.graph, [Rule(gelu_pattern(), lambda m, b: b.Relu(m["x"]) and None, name="never")])
    assert not result.changed and result.declined["never"] == 2
    assert len(b.graph.nodes) == 11 and not any(n.name.startswith("bertopt_") for n in b.graph.nodes)
    assert result.why_not == "nearest candidate Mul 'l0/out': rule never: its rewrite declined"


def test_why_not_is_the_nearest_miss_over_every_root():
    """The first Gelu fails inside, at its Erf; the second, later in the graph, only at its root's constant
    once everything else matched: the second is nearer."""
    b = Builder()
    x = b.input("x")
    first = add_gelu(b, x, prefix="a/", erf_op="Tanh")
    second = add_gelu(b, b.op("Relu", first), prefix="b/", half=0.7)
    b.graph.outputs.append(second)
    result = apply_rules(b.graph, [fuse_to_contrib_gelu()])
    assert not result.changed
    assert result.why_not == "nearest candidate Mul 'b/out': Mul 'b/out' input 1: expected constant ~0.5, got 0.7"


def test_why_not_names_what_the_graph_lacks():
    b = Builder()
    b.graph.outputs.append(b.op("Mul", b.input("x"), b.const(0.5)))
    assert apply_rules(b.graph, [fuse_to_contrib_gelu()]).why_not == "the graph has no Add, Div or Erf node"
    b = Builder()
    b.graph.outputs.append(b.op("Sigmoid", b.input("x")))
    rules = [Rule(Op("Relu", Var("x")), lambda m, b: m["x"], name="r"),
             Rule(Op("Tanh", Var("x")), lambda m, b: m["x"], name="t")]
    assert apply_rules(b.graph, rules).why_not == "the graph has no Relu or Tanh node"


def test_a_graph_output_replaced_by_an_existing_tensor_goes_through_an_identity():
    b = Builder()
    x = b.input("x")
    y = b.op("Relu", x, name="relu")
    y.dtype = np.float32
    b.graph.outputs.append(y)
    result = apply_rules(b.graph, [Rule(Op("Relu", Var("x")), lambda m, b: m["x"], name="drop")])
    assert result["drop"] == 1 and [n.op for n in b.graph.nodes] == ["Identity"]
    assert b.graph.inputs[0].name == "x" and b.graph.outputs[0].name == "relu_out0"
    values = np.array([[-1.0, 2.0, -3.0, 4.0]] * 2, np.float32)
    np.testing.assert_array_equal(run(b.graph, x=values)[0], values)


def test_new_nodes_are_not_roots_and_a_rewrite_may_read_the_root():
    """Inserting after the root (Relu -> Relu(Neg(Relu))): the new Relu is not rewritten again in the sweep,
    and the old one, which the rewrite reads, stays."""
    b = Builder()
    y = b.op("Relu", b.input("x"), name="relu")
    y.dtype = np.float32
    b.graph.outputs.append(y)
    result = apply_rules(b.graph, [Rule(Op("Relu", Var("x")), lambda m, b: b.Relu(b.Neg(m.output)), name="wrap")])
    assert result["wrap"] == 1
    assert [n.op for n in b.graph.toposort().nodes] == ["Relu", "Neg", "Relu"]
    values = np.array([[-1.0, 2.0, -3.0, 4.0]] * 2, np.float32)
    np.testing.assert_array_equal(run(b.graph, x=values)[0], np.zeros_like(values))


def test_the_first_rule_that_rewrites_wins_and_names_share_counts():
    b = typed_gelu_graph()
    declining = Rule(gelu_pattern(), lambda m, b: None, name="first")
    fusing = Rule(gelu_pattern(), lambda m, b: b.Gelu(m["x"], domain="com.microsoft"), name="first")
    second = fuse_to_contrib_gelu()
    result = apply_rules(b.graph, [declining, fusing, second])
    assert (result["first"], result.declined["first"], result["gelu"]) == (2, 2, 0)


def test_a_rewrite_must_return_a_value_per_root_output():
    b = Builder()
    b.op("Split", b.input("x"), name="split", outputs=2)
    rule = Rule(Op("Split", Var("x"), outputs=2), lambda m, b: b.Relu(m["x"]), name="bad")
    with pytest.raises(ValueError, match=r"rule bad: its rewrite returned 1 value\(s\) for the 2 output\(s\)"):
        apply_rules(b.graph, [rule])
