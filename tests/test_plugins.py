"""Passes from outside bertopt: the example package in tests/plugin_example (installed by `make test`,
found through its `bertopt.passes` entry point), --passes-from files and modules on run, optimize,
passes and sweep, bertopt.testing on such a pass, and broken plugins as one line each."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import onnx_graphsurgeon as gs
import pytest
from conftest import GOLDEN_DIR, TINY_BATCH, TINY_SEQ
from test_cli import assert_one_line_error, bertopt
from test_sweep import tiny_config

from bertopt import pipeline
from bertopt.flow.sweep import sweep
from bertopt.testing import assert_graph_matches, assert_parity, run_spec

EXAMPLE = "div-to-mul"
ENTRY_POINT = "entry point div-to-mul = bertopt_example_plugin.div_to_mul (bertopt-example-plugin 0.1.0)"
# A user's file: it may import from anywhere, here the example package, and registers under its own name.
FILE_PLUGIN = '''
from bertopt import register_pass
from bertopt_example_plugin.div_to_mul import div_to_mul

register_pass("div-to-mul-again", "div-to-mul, registered from a file")(div_to_mul)
'''
SHAPE = ["--batch", str(TINY_BATCH), "--seq", str(TINY_SEQ)]


@pytest.fixture
def fresh_registry(monkeypatch):
    """A copy of this process's registry for one test: what the test registers goes away with it."""
    monkeypatch.setattr(pipeline, "_REGISTRY", dict(pipeline.registered_passes()))
    monkeypatch.setattr(pipeline, "_LOADED", dict(pipeline._LOADED))


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def passes_table(stdout: str) -> dict[str, list[str]]:
    """`bertopt passes`'s table: pass name -> its cells, each cell's wrapped lines joined."""
    rows: dict[str, list[str]] = {}
    name = None
    for line in stdout.splitlines():
        if not line.startswith("│ "):
            continue
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        name = cells[0] or name
        joined = rows.setdefault(name, [""] * len(cells))
        rows[name] = [f"{old} {new}".strip() if new else old for old, new in zip(joined, cells)]
    return rows


def unwrapped(text: str) -> str:
    return text.replace(" ", "")


def on_python_path(monkeypatch, folder: Path) -> None:
    """Subprocesses started after this find modules (and installed distributions) in `folder` too."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


def test_bertopt_passes_says_where_each_pass_came_from():
    result = bertopt("passes")
    assert result.returncode == 0, result.stderr
    rows = passes_table(result.stdout)
    assert rows["freeze-shapes"][-1] == "built-in"
    assert unwrapped(rows[EXAMPLE][-1]) == unwrapped(ENTRY_POINT)


def test_an_installed_plugin_runs_after_default(tmp_path, tiny_export):
    out = tmp_path / "out"
    result = bertopt("run", str(tiny_export("legacy14")), "--passes", f"default,{EXAMPLE}", *SHAPE,
                     "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    last = report["passes"][-1]
    assert last["name"] == EXAMPLE and last["changed"] and last["counts"] == {"divisions": 2}  # the two Gelus
    assert report["parity"]["passed"]


@pytest.mark.golden
def test_bertopt_testing_works_for_an_installed_plugin(tiny_export):
    model = tiny_export("legacy14")
    result = run_spec(model, f"freeze-shapes,{EXAMPLE}", batch=TINY_BATCH, seq=TINY_SEQ)
    record = result.record(EXAMPLE)
    assert record.changed and record.counts == {"divisions": 2}
    assert not [n for n in result.graph.nodes if n.op == "Div" and isinstance(n.inputs[1], gs.Constant)]
    assert_graph_matches(result.graph, GOLDEN_DIR / EXAMPLE / "legacy14.after.txt")
    assert_parity(model, result)


def test_a_plugin_that_matches_nothing_says_why(tiny_export):
    result = run_spec(tiny_export("legacy14"), f"freeze-shapes,{EXAMPLE},{EXAMPLE}", batch=TINY_BATCH, seq=TINY_SEQ)
    again = result.records[-1]
    assert not again.changed
    assert again.notes[0].startswith("no division by a float constant: nearest candidate Div")
    assert "expected a constant" in again.notes[0]


def test_passes_from_a_file_on_passes_optimize_and_run(tmp_path, tiny_export):
    plugin = write(tmp_path, "my_passes.py", FILE_PLUGIN)
    listed = bertopt("passes", "--passes-from", str(plugin))
    assert listed.returncode == 0, listed.stderr
    assert unwrapped(passes_table(listed.stdout)["div-to-mul-again"][-1]) == unwrapped(f"file {plugin}")
    out = tmp_path / "opt.onnx"
    optimized = bertopt("optimize", str(tiny_export("legacy14")), "--passes-from", str(plugin),
                        "--passes", "freeze-shapes,div-to-mul-again", *SHAPE, "--target", "ort", "--output", str(out))
    assert optimized.returncode == 0, optimized.stderr
    assert "div-to-mul-again" in optimized.stdout and "divisions=2" in optimized.stdout
    run_out = tmp_path / "run"
    ran = bertopt("run", str(tiny_export("legacy14")), "--passes-from", str(plugin), "--passes",
                  "div-to-mul-again,default", *SHAPE, "--target", "ort", "--output", str(run_out))
    assert ran.returncode == 0, ran.stderr
    report = json.loads((run_out / "report.json").read_text())
    assert report["passes"][0]["name"] == "div-to-mul-again" and report["passes"][0]["changed"]


def test_passes_from_a_module_on_the_python_path(tmp_path, monkeypatch):
    write(tmp_path, "my_module_passes.py", FILE_PLUGIN)
    on_python_path(monkeypatch, tmp_path)
    result = bertopt("passes", "--passes-from", "my_module_passes")
    assert result.returncode == 0, result.stderr
    assert passes_table(result.stdout)["div-to-mul-again"][-1] == "module my_module_passes"


def test_a_failing_plugin_pass_leaves_a_reproducer_that_replays_with_its_file(tmp_path, tiny_export):
    plugin = write(tmp_path, "explode.py", '''
        from bertopt import register_pass

        @register_pass("explode", "raises")
        def explode(graph, facts, options):
            raise IndexError("list index out of range")
        ''')
    out = tmp_path / "out.onnx"
    result = bertopt("optimize", str(tiny_export("legacy14")), "--passes-from", str(plugin), "--passes",
                     "freeze-shapes,explode", *SHAPE, "--target", "ort", "--output", str(out))
    assert_one_line_error(result, 1, "pass explode (#2 of 'freeze-shapes,explode') raised IndexError")
    replay = (tmp_path / "out.reproducer" / "pipeline.txt").read_text().splitlines()[0]
    assert f"--passes explode --passes-from {plugin}" in replay


BROKEN_FILES = {
    "import error": ("import no_such_module_xyz\n", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    "syntax error": ("def (\n", "SyntaxError: invalid syntax"),
    "taken name": ('''
        from bertopt import PassResult, register_pass

        @register_pass("fuse-gelu", "a second fuse-gelu")
        def mine(graph, facts, options):
            return PassResult.no_change("mine")
        ''', "pass 'fuse-gelu' is already registered (built-in)"),
    "no pass": ("VALUE = 1\n", "registered no pass"),
    "wrong signature": ('''
        from bertopt import register_pass

        @register_pass("two-arguments", "forgets options")
        def two(graph, facts):
            pass
        ''', "pass two-arguments: two cannot be called as run(graph, facts, options)"),
    "unknown condition": ('''
        from bertopt import register_pass

        @register_pass("magic", "needs magic", requires=("magic",))
        def magic(graph, facts, options):
            pass
        ''', "pass magic: unknown condition(s) ['magic']"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_plugin_file_is_one_line_naming_it(tmp_path, case):
    text, message = BROKEN_FILES[case]
    plugin = write(tmp_path, "broken.py", text)
    result = bertopt("passes", "--passes-from", str(plugin))
    assert_one_line_error(result, 2, f"plugin file {plugin}: ")
    assert message in result.stderr


@pytest.mark.parametrize("source, message", [
    ("absent.py", "--passes-from {tmp}/absent.py: no such file"),
    ("no_such_plugin_module", "plugin module no_such_plugin_module: ModuleNotFoundError"),
    ("not a module!", "neither a Python file nor a module name"),
])
def test_a_plugin_that_cannot_be_found_is_one_line(tmp_path, source, message):
    target = str(tmp_path / source) if source.endswith(".py") else source
    assert_one_line_error(bertopt("passes", "--passes-from", target), 2, message.format(tmp=tmp_path))


def test_run_refuses_a_broken_plugin_before_any_work(tmp_path, tiny_export):
    plugin = write(tmp_path, "broken.py", "import no_such_module_xyz\n")
    result = bertopt("run", str(tiny_export("legacy14")), "--passes-from", str(plugin), "--output",
                     str(tmp_path / "out"))
    assert_one_line_error(result, 2, f"plugin file {plugin}: ModuleNotFoundError")
    assert not (tmp_path / "out").exists()


def fake_distribution(folder: Path, module_text: str) -> Path:
    """An installed distribution `broken-plugin` whose `bertopt.passes` entry point is `broken_plugin_mod`."""
    info = folder / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bertopt.passes]\nbroken = broken_plugin_mod\n")
    write(folder, "broken_plugin_mod.py", module_text)
    return folder


@pytest.mark.parametrize("module_text, message", [
    ("import no_such_module_xyz\n", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    (BROKEN_FILES["taken name"][0], "pass 'fuse-gelu' is already registered (built-in)"),
])
def test_a_broken_installed_plugin_is_one_line_naming_its_distribution(tmp_path, tiny_export, monkeypatch,
                                                                        module_text, message):
    model = tiny_export("legacy14")  # exported before the broken distribution is on the path
    on_python_path(monkeypatch, fake_distribution(tmp_path / "site", module_text))
    named = "plugin entry point broken = broken_plugin_mod (broken-plugin 0.1): "
    assert_one_line_error(bertopt("passes"), 2, named + message)
    ran = bertopt("run", str(model), "--passes", "freeze-shapes", *SHAPE, "--output", str(tmp_path / "out"))
    assert_one_line_error(ran, 2, named)


def test_sweep_workers_load_the_plugin_file(tmp_path, fresh_registry):
    plugin = write(tmp_path, "my_passes.py", FILE_PLUGIN)
    output = tmp_path / "sweep"
    result = sweep(tiny_config(output, seqs=(16,), batches=(2,), jobs=1, passes="div-to-mul-again,default",
                               passes_from=(str(plugin),)))
    [row] = result.rows
    assert row["status"] == "passed", row
    assert row["passes_changed"][0] == "div-to-mul-again"
    assert json.loads((output / "sweep.json").read_text())["last_request"]["passes_from"] == [str(plugin)]


def test_sweep_refuses_an_unknown_pass_before_exporting(tmp_path):
    result = bertopt("sweep", "--sizes", "bert-tiny", "--seq", "16", "--batch", "2", "--passes",
                     "default,div-to-mul-again", "--output", str(tmp_path / "sweep"))
    assert_one_line_error(result, 2, "unknown pass 'div-to-mul-again'")
    assert not (tmp_path / "sweep").exists()
