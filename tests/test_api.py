"""`import bertopt`: the public API is light to import, documented, and does what the commands do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY_BATCH, TINY_SEQ
from test_plugins import fresh_registry  # noqa: F401 (a fixture)

import bertopt
from bertopt import pipeline

HEAVY = ("torch", "onnxruntime", "onnx", "onnx_graphsurgeon", "transformers")


def test_import_bertopt_imports_nothing_heavy():
    code = "import sys, bertopt; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    result = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_run_on_an_onnx_file_imports_no_exporter(tiny_export, tmp_path):
    """torch and transformers are for exporting: importing them was 10 of a tiny model's 13 s of `bertopt run`."""
    code = textwrap.dedent("""
        import sys
        from bertopt.api import run
        run(sys.argv[1], output=sys.argv[2], batch=2, seq=16)
        print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tiny_export("legacy14")), str(tmp_path / "run")],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_public_name_resolves_and_is_documented():
    for name in bertopt.__all__:
        value = getattr(bertopt, name)
        doc = (value.__doc__ or "").strip()
        assert doc and not doc.startswith(f"{name}("), f"bertopt.{name} has no docstring of its own"
    assert set(bertopt.__all__) <= set(dir(bertopt))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bertopt.nope


def test_run_and_validate_are_the_api_functions_beside_the_modules_that_implement_them():
    import bertopt.flow.run  # noqa: F401 (the flow behind bertopt.run)
    import bertopt.validation.candidates  # noqa: F401

    assert callable(bertopt.run) and bertopt.run.__module__ == "bertopt.api"
    assert callable(bertopt.validate) and bertopt.validate.__module__ == "bertopt.api"


def test_optimize_check_validate_and_run_from_python(tiny_export, tmp_path):
    model = tiny_export("legacy14")
    optimized = tmp_path / "optimized.onnx"
    result = bertopt.optimize(model, optimized, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    assert [r.name for r in result.passes] == pipeline.PIPELINES["ascend"] and not result.illegal
    report = bertopt.check(optimized)
    assert report.model_conforming and "hidden = 32 is not 768 or 1024" in "; ".join(report.failure_summary())
    assert bertopt.validate(model, optimized).passed
    with pytest.raises(bertopt.BertoptError, match="give either CANDIDATE or both"):
        bertopt.validate(model)
    run = bertopt.run(model, passes="freeze-shapes", batch=TINY_BATCH, seq=TINY_SEQ, target="ort",
                      output=tmp_path / "run")
    assert run.failures() == [] and json.loads((tmp_path / "run" / "report.json").read_text())["parity"]["passed"]


def test_a_pass_written_loaded_and_run_with_the_public_api(fresh_registry, tiny_export, tmp_path):
    plugin = tmp_path / "halve.py"
    plugin.write_text(textwrap.dedent('''
        import bertopt
        from bertopt import Const, Op, PassResult, Rule, Var

        # x * 0.5 written as x / 2: nothing gains, but the tiny model's Gelus have one each
        HALF = Rule(Op("Mul", Var("x"), Const(0.5)), lambda m, b: b.Div(m["x"], 2.0), name="halves")

        @bertopt.register_pass("halve-by-division", "x * 0.5 becomes x / 2")
        def halve(graph, facts, options):
            result = bertopt.apply_rules(graph, [HALF])
            if not result.changed:
                return PassResult.no_change(result.why_not)
            return PassResult(changed=True, counts={"halves": result["halves"]})
        '''))
    assert bertopt.load_passes(str(plugin)) == ["halve-by-division"]
    assert bertopt.load_passes(str(plugin)) == ["halve-by-division"]  # imported once

    class Seen(bertopt.Instrument):
        changed: list[str] = []

        def after(self, step, graph, facts, result, record):
            if result.changed:
                self.changed.append(step.name)

    from bertopt.graph import load_graph
    from bertopt.model.facts import detect_facts

    graph = load_graph(tiny_export("legacy14"))
    manager = bertopt.PassManager("freeze-shapes,halve-by-division",
                                  bertopt.PassOptions(batch=TINY_BATCH, seq=TINY_SEQ),
                                  bertopt.Instruments(extra=[Seen()]))
    _, records = manager.run(graph, detect_facts(graph))
    assert Seen.changed == ["freeze-shapes", "halve-by-division"] and records[-1].counts == {"halves": 2}
    assert pipeline.registered_passes()["halve-by-division"].origin == f"file {plugin}"
