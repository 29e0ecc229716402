"""PassManager: pipeline specs, no-change passes, verification, dumps, reproducers, parity probes."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from bertopt import pipeline
from bertopt.errors import BertoptError
from bertopt.model.facts import ModelFacts
from bertopt.pipeline import Instruments, PassInfo, PassManager, PassOptions, PassResult, parse_spec

FACTS = ModelFacts("bert", 1, 4, 1, 4, 10, 16, 2)


def tiny_graph() -> gs.Graph:
    x = gs.Variable("x", dtype=np.float32, shape=[2, 4])
    y = gs.Variable("y", dtype=np.float32, shape=[2, 4])
    mid = gs.Variable("mid", dtype=np.float32, shape=[2, 4])
    nodes = [gs.Node("Add", inputs=[x, gs.Constant("b", np.ones(4, np.float32))], outputs=[mid]),
             gs.Node("Relu", inputs=[mid], outputs=[y])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=14)
    graph.ir_version = 8
    return graph


@pytest.fixture
def fake_passes(monkeypatch):
    """Register throw-away passes for one test without touching the real registry."""
    pipeline.registered_passes()  # import the real passes first so they are not re-registered inside

    def add(name, fn, requires=()):
        monkeypatch.setitem(pipeline._REGISTRY, name, PassInfo(name, f"test pass {name}", fn, requires))

    return add


def noop(graph, facts, options):
    return PassResult.no_change("nothing to do here")


def bump_bias(graph, facts, options):
    bias = graph.nodes[0].inputs[1]
    graph.nodes[0].inputs[1] = gs.Constant(bias.name + "_bumped", bias.values + 1)
    return PassResult(changed=True, counts={"biases": 1})


def explode(graph, facts, options):
    raise IndexError("list index out of range")


def break_graph(graph, facts, options):
    graph.nodes[1].op = "NoSuchOp"
    return PassResult(changed=True)


def test_spec_default_minus_and_lists(fake_passes):
    fake_passes("noop", noop)
    ascend = pipeline.PIPELINES["ascend"]
    assert parse_spec("default") == ascend
    assert parse_spec("default", target="ort") == pipeline.PIPELINES["ort"]
    assert parse_spec("ort") == pipeline.PIPELINES["ort"]
    assert parse_spec("default,noop") == ascend + ["noop"]
    assert parse_spec("default,-freeze-shapes,noop") == [n for n in ascend if n != "freeze-shapes"] + ["noop"]
    assert parse_spec(" noop , noop ") == ["noop", "noop"]


@pytest.mark.parametrize("spec, message", [("nope", "unknown pass 'nope'"), ("default,-nope", "cannot remove"),
                                           ("", "names no pass")])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(BertoptError, match=message):
        parse_spec(spec)


def test_no_change_pass_leaves_graph_and_says_why(fake_passes):
    fake_passes("noop", noop)
    graph = tiny_graph()
    _, records = PassManager("noop").run(graph, FACTS)
    assert not records[0].changed and records[0].notes == ["nothing to do here"]
    assert [n.op for n in graph.nodes] == ["Add", "Relu"]


def test_counts_and_times_are_recorded(fake_passes):
    fake_passes("bump", bump_bias)
    _, records = PassManager("bump").run(tiny_graph(), FACTS)
    assert records[0].changed and records[0].counts == {"biases": 1}
    assert records[0].seconds > 0 and records[0].verify_seconds > 0


def test_failing_pass_is_named_and_leaves_a_reproducer(fake_passes, tmp_path):
    fake_passes("noop", noop)
    fake_passes("explode", explode)
    manager = PassManager("noop,explode", instruments=Instruments(reproducer_dir=tmp_path))
    with pytest.raises(pipeline.PassFailed, match=r"pass explode \(#2 of 'noop,explode'\) raised IndexError"):
        manager.run(tiny_graph(), FACTS)
    assert (tmp_path / "before-explode.onnx").exists()
    assert "spec: noop,explode" in (tmp_path / "pipeline.txt").read_text()


def test_verification_names_the_pass_that_broke_the_graph(fake_passes):
    fake_passes("break", break_graph)
    with pytest.raises(pipeline.PassFailed, match="pass break .* left an invalid graph"):
        PassManager("break").run(tiny_graph(), FACTS)


def test_dump_dir_holds_before_and_after_of_changing_passes_only(fake_passes, tmp_path):
    fake_passes("noop", noop)
    fake_passes("bump", bump_bias)
    PassManager("noop,bump", instruments=Instruments(dump_dir=tmp_path)).run(tiny_graph(), FACTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01-bump.after.onnx", "01-bump.before.onnx"]


def test_parity_probe_names_the_first_pass_that_breaks_numerics(fake_passes):
    fake_passes("noop", noop)
    fake_passes("bump", bump_bias)
    seen = []

    def probe(graph, facts):
        seen.append(graph.nodes[0].inputs[1].values.copy())
        drift = float(np.abs(graph.nodes[0].inputs[1].values - 1).max())
        return drift == 0, drift, f"max abs {drift}"

    manager = PassManager("noop,bump,bump", instruments=Instruments(parity_probe=probe))
    with pytest.raises(pipeline.PassFailed, match=r"pass bump \(#2 .*broke numerics: max abs 1.0"):
        manager.run(tiny_graph(), FACTS)
    assert len(seen) == 1  # the probe runs after passes that changed something only


def test_requirement_is_checked_before_the_pass(fake_passes):
    fake_passes("needs-static", noop, requires=("static-shapes",))
    graph = tiny_graph()
    graph.inputs[0].shape = ["batch", 4]
    with pytest.raises(BertoptError, match="requires that every graph input has a static shape"):
        PassManager("needs-static").run(graph, FACTS)


def test_requirement_names_the_dynamic_input_freeze_shapes_cannot_freeze(fake_passes, tiny_export):
    """An input without a role (ids, mask, token types) stays dynamic through freeze-shapes: the
    refusal names it instead of advising a freeze-shapes that already ran."""
    import onnx
    from onnx import TensorProto, helper

    from bertopt.testing import run_spec

    fake_passes("needs-static", noop, requires=("static-shapes",))
    model = onnx.load(str(tiny_export("legacy14")))
    model.graph.input.append(helper.make_tensor_value_info("langs", TensorProto.INT64, ["batch", "seq"]))
    with pytest.raises(BertoptError, match=r"input langs \[batch, seq\] has no static shape: freeze-shapes "
                                           r"fixes only the inputs it knows the role of"):
        run_spec(model, "freeze-shapes,needs-static", batch=2, seq=8)


def test_unknown_requirement_is_a_programming_error():
    with pytest.raises(ValueError):
        pipeline.register_pass("x", "y", requires=("magic",))


def test_options_reach_the_pass(fake_passes):
    seen = {}

    def record(graph, facts, options):
        seen["seq"] = options.seq
        return PassResult.no_change("recorded")

    fake_passes("record", record)
    PassManager("record", PassOptions(seq=128)).run(tiny_graph(), FACTS)
    assert seen == {"seq": 128}


# --- instruments: objects given at construction, hooks nested like MLIR's -----------------------------------

class Recorder(pipeline.Instrument):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def before(self, step, graph, facts):
        self.log.append(f"{self.name}.before {step.name}")

    def after(self, step, graph, facts, result, record):
        self.log.append(f"{self.name}.after {step.name} changed={result.changed}")

    def failed(self, step, error):
        self.log.append(f"{self.name}.failed {step.name}: {error}")
        return f"{self.name} noted it"


def test_hooks_nest_the_first_instrument_around_the_others(fake_passes):
    fake_passes("noop", noop)
    fake_passes("explode", explode)
    log = []
    manager = PassManager("noop,explode", instruments=[Recorder("a", log), Recorder("b", log)])
    with pytest.raises(pipeline.PassFailed, match=r"raised IndexError: list index out of range; b noted it; "
                                                  r"a noted it$"):
        manager.run(tiny_graph(), FACTS)
    assert log == ["a.before noop", "b.before noop", "b.after noop changed=False", "a.after noop changed=False",
                   "a.before explode", "b.before explode",
                   "b.failed explode: raised IndexError: list index out of range",
                   "a.failed explode: raised IndexError: list index out of range"]


def test_instruments_are_fixed_when_the_manager_is_made(fake_passes):
    fake_passes("noop", noop)
    chosen = Instruments()
    manager = PassManager("noop", instruments=chosen)
    chosen.append(Recorder("late", []))
    assert isinstance(manager.instruments, tuple) and len(manager.instruments) == len(chosen) - 1
    with pytest.raises(TypeError, match="is not an Instrument"):
        PassManager("noop", instruments=[lambda graph, facts: None])


def test_the_standard_instruments_in_their_order():
    chosen = Instruments(dump_dir="d", parity_probe=lambda g, f: (True, 0.0, ""), reproducer_dir="r",
                         progress=print, extra=[Recorder("mine", [])])
    assert [type(i).__name__ for i in chosen] == ["Reproducer", "Progress", "ParityProbe", "Recorder", "Dump",
                                                 "Verify", "Timing"]
    assert [type(i).__name__ for i in Instruments(verify_each=False)] == ["Timing"]


def test_progress_names_each_pass(fake_passes):
    fake_passes("noop", noop)
    fake_passes("bump", bump_bias)
    shown = []
    PassManager("noop,bump", instruments=Instruments(progress=shown.append)).run(tiny_graph(), FACTS)
    assert shown == ["pass 1/2: noop", "pass 2/2: bump"]


def quietly_bump(graph, facts, options):
    bump_bias(graph, facts, options)
    return PassResult.no_change("nothing to do here")


def test_a_pass_that_says_no_change_but_changed_the_graph_fails_under_verification(fake_passes):
    fake_passes("liar", quietly_bump)
    with pytest.raises(pipeline.PassFailed, match=r"pass liar \(#1 of 'liar'\) reported no change but changed "
                                                  r"the graph \(its structural hash differs\)"):
        PassManager("liar").run(tiny_graph(), FACTS)
    _, records = PassManager("liar", instruments=Instruments(verify_each=False)).run(tiny_graph(), FACTS)
    assert not records[0].changed  # unverified, the claim is taken as it is


def read_every_weight(graph, facts, options):
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            tensor.values  # loads a lazily imported weight onto the tensor
    graph.nodes = list(reversed(graph.nodes))  # order is not structure: the manager sorts it again
    return PassResult.no_change("only looked")


def test_reading_weights_and_reordering_nodes_is_no_change(fake_passes, tiny_export):
    from bertopt.testing import run_spec

    fake_passes("look", read_every_weight)
    result = run_spec(tiny_export("legacy14"), "look", batch=2, seq=8)
    assert result.record("look").notes == ["only looked"]


def test_what_a_pass_ensures_is_checked_after_it(fake_passes, monkeypatch):
    monkeypatch.setitem(pipeline.CONDITIONS, "no-relu", pipeline.Condition(
        lambda graph, facts: all(n.op != "Relu" for n in graph.nodes), "the graph has no Relu"))

    def drop_relu(graph, facts, options):
        relu = next(n for n in graph.nodes if n.op == "Relu")
        graph.outputs = [relu.inputs[0]]
        return PassResult(changed=True, counts={"relus": 1})

    for name, fn in (("drop-relu", drop_relu), ("noop", noop)):
        monkeypatch.setitem(pipeline._REGISTRY, name, PassInfo(name, "test", fn, ensures=("no-relu",)))
    PassManager("drop-relu").run(tiny_graph(), FACTS)
    with pytest.raises(pipeline.PassFailed, match=r"pass noop \(#1 of 'noop'\) does not ensure that the graph "
                                                  r"has no Relu"):
        PassManager("noop").run(tiny_graph(), FACTS)


def test_a_pass_must_return_a_pass_result(fake_passes):
    fake_passes("forgetful", lambda graph, facts, options: None)
    with pytest.raises(pipeline.PassFailed, match="pass forgetful .* returned NoneType, not a PassResult"):
        PassManager("forgetful").run(tiny_graph(), FACTS)


def test_where_a_pass_came_from(fake_passes):
    passes = pipeline.registered_passes()
    assert passes["fuse-gelu"].origin == "built-in"

    @pipeline.register_pass("scripted", "registered by a test module")
    def scripted(graph, facts, options):
        return PassResult.no_change("nothing")

    try:
        assert pipeline._REGISTRY["scripted"].origin == f"module {__name__}"
        with pytest.raises(pipeline.RegistrationError, match=r"pass 'scripted' is already registered \(module"):
            pipeline.register_pass("scripted", "again")(noop)
    finally:
        del pipeline._REGISTRY["scripted"]
