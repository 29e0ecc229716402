"""Live candidates (one session at a time), and ais_bench folders: writing inputs, reading results
(checked file by file), and the offline comparison.

The result files here are written by the tests in ais_bench's layout from ONNX Runtime outputs: they
exercise the folder handling and the comparison, not an NPU.
"""

from __future__ import annotations

import re
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bertopt.backends import Skipped
from bertopt.backends.emulation import EmulationBackend
from bertopt.backends.ort import OrtBackend
from bertopt.errors import BertoptError
from bertopt.graph import save_graph
from bertopt.parity import OrtRunner, graph_only, input_specs_of
from bertopt.testing import run_spec
from bertopt.validate import (read_inputs, reference_facts, run_reference_rows, validate_candidates,
                              validate_results, write_inputs)

SEQ, BATCH, SAMPLES = 16, 8, 13  # 13 samples at batch 8: the second batch carries 3 padded rows


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory):
    """(dynamic original, the same frozen at batch 8) as files."""
    original = tiny_export("legacy14")
    folder = tmp_path_factory.mktemp("validate")
    static = save_graph(run_spec(original, "freeze-shapes", batch=BATCH, seq=SEQ).graph, folder / "bs8.onnx")
    return original, static


@pytest.fixture
def inputs_dir(models, tmp_path):
    original, _ = models
    specs = input_specs_of(graph_only(original))
    write_inputs(reference_facts(original), specs, tmp_path / "prep", batch=4, seq=SEQ, count=SAMPLES)
    return tmp_path / "prep"


def write_results(folder, inputs_dir, model, *, shift: float = 0.0):
    """What `ais_bench --output result --output_dirname result_bs8 --outfmt NPY` leaves: one file per
    real sample and output, none for the padded rows, plus a summary JSON."""
    folder.mkdir(parents=True)
    runner = OrtRunner(model)
    names = [p.name for p in sorted(inputs_dir.iterdir())]
    for path in sorted((inputs_dir / names[0]).glob("*.npy")):
        feed = {name: np.load(inputs_dir / name / path.name) for name in runner.input_names}
        for index, value in enumerate(runner.run(feed).values()):
            np.save(folder / f"{path.stem}_{index}.npy", value + shift)
    (folder.parent / f"{folder.name}_summary.json").write_text("{}")
    return folder


def test_inputs_are_written_in_ais_bench_layout(models, inputs_dir):
    original, _ = models
    assert sorted(p.name for p in inputs_dir.iterdir()) == ["attention_mask", "input_ids", "token_type_ids"]
    files = sorted((inputs_dir / "input_ids").glob("*.npy"))
    assert len(files) == SAMPLES and (inputs_dir / "input_ids" / "12.npy").exists()
    row = np.load(inputs_dir / "attention_mask" / "0.npy")
    assert row.shape == (1, SEQ) and row.dtype == np.int64
    masks = np.concatenate([np.load(inputs_dir / "attention_mask" / f"{i}.npy") for i in range(SAMPLES)])
    assert (masks.sum(axis=1) == SEQ).any() and (masks.sum(axis=1) < SEQ).any()
    with pytest.raises(BertoptError, match="already exists"):
        write_inputs(None, {}, inputs_dir, batch=1, seq=SEQ, count=1)


def test_inputs_are_read_in_natural_order(models, inputs_dir):
    stems, arrays = read_inputs(inputs_dir, input_specs_of(graph_only(models[0])))
    assert stems[:3] == ["0", "1", "2"] and stems[-3:] == ["10", "11", "12"]
    assert arrays["input_ids"].shape == (SAMPLES, SEQ)


def test_static_batch_reference_pads_the_last_batch(models, inputs_dir):
    original, static = models
    specs = input_specs_of(graph_only(static))
    _, arrays = read_inputs(inputs_dir, specs)
    batched = run_reference_rows(static, specs, arrays)
    one_by_one = run_reference_rows(original, input_specs_of(graph_only(original)), arrays)
    assert batched["start_logits"].shape == (SAMPLES, SEQ)
    for name in batched:
        np.testing.assert_allclose(batched[name], one_by_one[name], atol=1e-5)


def test_results_of_a_batch_8_run_pass(models, inputs_dir, tmp_path):
    original, static = models
    write_results(tmp_path / "result" / "result_bs8", inputs_dir, original)
    report = validate_results(static, inputs_dir, tmp_path / "result")
    assert report.passed, report.comparison.summary_line()
    assert report.kind == "results" and report.comparison.samples == SAMPLES
    assert report.comparison.span_agreement == 1.0
    assert all(o.atol == 1e-2 for o in report.comparison.outputs)


def test_results_beyond_tolerance_fail(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, original)
    end = np.load(results / "7_1.npy")
    end[0, 3] = np.nan
    np.save(results / "7_1.npy", end)
    np.save(results / "2_0.npy", np.load(results / "2_0.npy") + 0.5)
    report = validate_results(static, inputs_dir, results)
    assert report.passed is False
    start, end_stats = report.comparison.outputs
    assert not start.passed and start.max_abs == pytest.approx(0.5, abs=1e-6)
    assert not end_stats.passed and end_stats.min_atol_to_pass == float("inf")


def test_a_tight_tolerance_fails_where_the_default_passes(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, original, shift=5e-3)
    assert validate_results(static, inputs_dir, results).passed
    assert not validate_results(static, inputs_dir, results, atol=1e-3, rtol=1e-3).passed


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "missing 1 file(s) for the given inputs: 5_1.npy"),
    ("extra", "match no input sample: 13_0.npy"),
    ("stray", "match no input sample: notes.npy"),
    ("shape", "5_1.npy: shape [1, 15]"),
    ("outputs", "files hold 3 output(s) per sample; the model has 2"),
])
def test_bad_results_folders_are_refused(models, inputs_dir, tmp_path, damage, fragment):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, original)
    if damage == "missing":
        (results / "5_1.npy").unlink()
    elif damage == "extra":
        np.save(results / "13_0.npy", np.zeros((1, SEQ), np.float32))
    elif damage == "stray":
        np.save(results / "notes.npy", np.zeros(1))
    elif damage == "shape":
        np.save(results / "5_1.npy", np.zeros((1, SEQ - 1), np.float32))
    else:
        for stem in range(SAMPLES):
            np.save(results / f"{stem}_2.npy", np.zeros((1, SEQ), np.float32))
    with pytest.raises(BertoptError, match=re.escape(fragment)):
        validate_results(static, inputs_dir, tmp_path / "result")


def test_bad_input_folders_are_refused(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, original)
    (inputs_dir / "token_type_ids" / "4.npy").unlink()
    with pytest.raises(BertoptError, match="holds other samples"):
        validate_results(static, inputs_dir, results)
    np.save(inputs_dir / "token_type_ids" / "4.npy", np.zeros((2, SEQ), np.int64))
    with pytest.raises(BertoptError, match=r"4.npy: shape \[2, 16\]"):
        validate_results(static, inputs_dir, results)


def test_several_result_subfolders_need_a_choice(models, inputs_dir, tmp_path):
    original, static = models
    write_results(tmp_path / "result" / "result_bs1", inputs_dir, original)
    write_results(tmp_path / "result" / "result_bs8", inputs_dir, original)
    with pytest.raises(BertoptError, match="several result folders"):
        validate_results(static, inputs_dir, tmp_path / "result")
    assert validate_results(static, inputs_dir, tmp_path / "result" / "result_bs8").passed


# --------------------------------------------------------------------------- live candidates

class SessionCount:
    """Every ONNX Runtime session created, and how many were alive (itself included) when it was."""

    def __init__(self) -> None:
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.alive_at_creation: list[int] = []


@pytest.fixture
def sessions(monkeypatch) -> SessionCount:
    count = SessionCount()

    class CountedSession(ort.InferenceSession):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            count.alive.add(self)
            count.alive_at_creation.append(len(count.alive))

    monkeypatch.setattr(ort, "InferenceSession", CountedSession)
    return count


def unloadable_model() -> onnx.ModelProto:
    """A well-formed model ONNX Runtime refuses to load: its one op exists in no opset."""
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_candidates_run_one_session_at_a_time(models, sessions):
    original, static = models
    candidates = [OrtBackend(static, name="optimized"), EmulationBackend(static),
                  Skipped("OM", "npu", "no device")]
    assert sessions.alive_at_creation == [], "a backend builds its session on its first run, not before"
    reports = validate_candidates(original, candidates, reference_facts(original), batch=BATCH, seq=SEQ)
    assert [r.passed for r in reports] == [True, True, None]
    assert sessions.alive_at_creation == [1, 1, 1], "reference, optimized, emulation: each alone"
    assert len(sessions.alive) == 0, "every session is released once its candidate has run"


def test_a_candidate_that_cannot_load_is_an_error_and_the_others_still_run(models, sessions):
    original, static = models
    candidates = [OrtBackend(unloadable_model(), name="broken"), OrtBackend(static, name="optimized")]
    broken, optimized = validate_candidates(original, candidates, reference_facts(original), batch=BATCH, seq=SEQ)
    assert broken.passed is False and broken.comparison is None
    assert "ONNX Runtime cannot load the model" in broken.error
    assert optimized.passed is True and optimized.error is None
    assert max(sessions.alive_at_creation) == 1 and len(sessions.alive) == 0
