"""Live candidates (one session at a time), and ais_bench folders: writing inputs, reading results
(checked file by file, from one device or several), ais_bench's summary, and the offline comparison.

The results folders here are what tests/ais_bench_double.ais_bench_run leaves: ais_bench's layout, padding
and summary format, with ONNX Runtime where the OM would run. They exercise the folder handling and the
comparison; no test claims an OM ran.
"""

from __future__ import annotations

import json
import re
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ais_bench_double import ais_bench_run
from onnx import TensorProto, helper

from bertopt.errors import BertoptError
from bertopt.graph import save_graph
from bertopt.testing import run_spec
from bertopt.validation.backends import Skipped
from bertopt.validation.backends.emulation import EmulationBackend
from bertopt.validation.backends.ort import OrtBackend
from bertopt.validation.candidates import (natural_key, output_stem, padded_batch, read_inputs, reference_facts,
                                           run_reference_rows, validate_candidates, validate_results, write_inputs)
from bertopt.validation.parity import OrtRunner, graph_only, input_specs_of

# 10 samples at batch 4: the third batch holds samples 8 and 9 and two copies of sample 8's files.
SEQ, BATCH, SAMPLES = 16, 4, 10


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory):
    """(dynamic original, the same frozen at batch 4) as files."""
    original = tiny_export("legacy14")
    folder = tmp_path_factory.mktemp("validate")
    static = save_graph(run_spec(original, "freeze-shapes", batch=BATCH, seq=SEQ).graph, folder / "bs4.onnx")
    return original, static


@pytest.fixture
def inputs_dir(models, tmp_path):
    original, _ = models
    specs = input_specs_of(graph_only(original))
    write_inputs(reference_facts(original), specs, tmp_path / "prep", batch=BATCH, seq=SEQ, count=SAMPLES)
    return tmp_path / "prep"


def write_results(folder, inputs_dir, model, *, batch: int = 1, shift: float = 0.0, devices=None,
                  generation: str = "2022"):
    """`python -m ais_bench --output <folder's parent> --output_dirname <folder's name> --outfmt NPY` with
    `model` standing in for the OM (see ais_bench_run); returns `folder`."""
    input_dirs = [inputs_dir / name for name in OrtRunner(model).input_names]
    ais_bench_run(model, input_dirs, folder.parent, folder.name, batch=batch, shift=shift, devices=devices,
                  generation=generation)
    return folder


def test_inputs_are_written_in_ais_bench_layout(models, inputs_dir):
    original, _ = models
    assert sorted(p.name for p in inputs_dir.iterdir()) == ["attention_mask", "input_ids", "token_type_ids"]
    files = sorted((inputs_dir / "input_ids").glob("*.npy"))
    assert len(files) == SAMPLES and (inputs_dir / "input_ids" / "9.npy").exists()
    row = np.load(inputs_dir / "attention_mask" / "0.npy")
    assert row.shape == (1, SEQ) and row.dtype == np.int64
    masks = np.concatenate([np.load(inputs_dir / "attention_mask" / f"{i}.npy") for i in range(SAMPLES)])
    assert (masks.sum(axis=1) == SEQ).any() and (masks.sum(axis=1) < SEQ).any()
    with pytest.raises(BertoptError, match="already exists"):
        write_inputs(None, {}, inputs_dir, batch=1, seq=SEQ, count=1)


def test_inputs_are_read_in_natural_order(models, inputs_dir):
    stems, arrays = read_inputs(inputs_dir, input_specs_of(graph_only(models[0])))
    assert stems[:3] == ["0", "1", "2"] and stems[-3:] == ["7", "8", "9"]
    assert arrays["input_ids"].shape == (SAMPLES, SEQ)
    assert sorted(["b2.npy", "A10.npy", "a9.npy", "a10.npy"], key=natural_key) == ["a9.npy", "A10.npy", "a10.npy", "b2.npy"]


def test_outputs_are_named_by_the_input_file_up_to_its_first_dot(models, inputs_dir, tmp_path):
    assert output_stem("12.npy") == "12" and output_stem("q7.seq384.npy") == "q7"
    original, static = models
    for folder in inputs_dir.iterdir():
        for path in folder.glob("*.npy"):
            path.rename(path.with_name(f"q{path.stem}.seq{SEQ}.npy"))
    results = write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH)
    assert (results / "q9_1.npy").exists() and not (results / f"q9.seq{SEQ}_1.npy").exists()
    assert validate_results(static, inputs_dir, results).passed
    for folder in inputs_dir.iterdir():
        (folder / f"q3.seq{SEQ}.npy").rename(folder / "q3.other.npy")
        np.save(folder / f"q3.seq{SEQ}.npy", np.load(folder / "q3.other.npy"))
    with pytest.raises(BertoptError, match=r"q3.other.npy and q3.seq16.npy would both have outputs q3_<n>.npy"):
        read_inputs(inputs_dir, input_specs_of(graph_only(original)))


def test_the_last_batch_is_padded_as_ais_bench_pads(models, inputs_dir, tmp_path):
    """The double writes what ais_bench writes: no file for the two padded rows of the third batch."""
    original, static = models
    results = write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH)
    assert sorted(int(p.name.split("_")[0]) for p in results.glob("*_0.npy")) == list(range(SAMPLES))
    summary = json.loads((results.parent / "result_bs4_summary.json").read_text())
    assert summary["filesinfo"]["9"]["infiles"][0].endswith("/9.npy") and "10" not in summary["filesinfo"]
    rows = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(padded_batch(rows[:1], 3), [rows[0]] * 3)
    specs = input_specs_of(graph_only(static))
    _, arrays = read_inputs(inputs_dir, specs)
    batched = run_reference_rows(static, specs, arrays)
    one_by_one = run_reference_rows(original, input_specs_of(graph_only(original)), arrays)
    assert batched["start_logits"].shape == (SAMPLES, SEQ)
    for name in batched:
        np.testing.assert_allclose(batched[name], one_by_one[name], atol=1e-5)


def test_results_of_a_batch_4_run_pass_with_the_summary_and_the_padding_reported(models, inputs_dir, tmp_path):
    original, static = models
    write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH)
    report = validate_results(original, inputs_dir, tmp_path / "result")
    assert report.passed, report.comparison.summary_line()
    assert report.kind == "results" and report.comparison.samples == SAMPLES
    assert report.comparison.span_agreement == 1.0
    assert all(o.atol == 1e-2 for o in report.comparison.outputs)
    padding, speed = report.notes
    assert padding == ("result_bs4: 10 samples at batch 4: ais_bench filled the last batch's 2 empty row(s) with "
                       "copies of sample 8's input files and wrote no output for them; the 2 real row(s) of "
                       "that batch are compared")
    [performance] = report.performance
    times = [4.0, 4.01, 4.02]
    assert performance["batch"] == BATCH and performance["throughput"] == pytest.approx(1000 * 4 / np.mean(times))
    assert performance["npu_compute_ms"] == pytest.approx(
        {"min": 4.0, "max": 4.02, "mean": 4.01, "median": 4.01, "p99": np.percentile(times, 99), "count": 3})
    assert performance["h2d_ms"]["mean"] == 0.5 and performance["summary"].endswith("result/result_bs4_summary.json")
    assert speed.startswith("ais_bench result_bs4_summary.json: throughput 997.5 samples/s") and "over 3 runs" in speed
    assert report.to_dict()["performance"] == report.performance
    json.dumps(report.to_dict())


def test_results_of_several_devices_are_read_together(models, inputs_dir, tmp_path):
    """--device 0,1: each device took 5 of the 10 samples, padded its own last batch and wrote
    result_bs4/device<N>/ with device<N>_summary.json beside it."""
    original, static = models
    write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH, devices=[0, 1],
                  generation="ait")
    assert sorted(p.name for p in (tmp_path / "result" / "result_bs4").iterdir()) == [
        "device0", "device0_summary.json", "device1", "device1_summary.json"]
    assert sorted(p.name for p in (tmp_path / "result" / "result_bs4" / "device1").glob("*_0.npy")) == [
        f"{i}_0.npy" for i in range(5, 10)]
    for given in (tmp_path / "result", tmp_path / "result" / "result_bs4"):
        report = validate_results(original, inputs_dir, given)
        assert report.passed and report.comparison.samples == SAMPLES
        assert report.name.endswith("result_bs4")
        assert [p["summary"].rsplit("/", 1)[1] for p in report.performance] == ["device0_summary.json",
                                                                                 "device1_summary.json"]
        assert report.notes[0].startswith("device0: 5 samples at batch 4: ais_bench filled the last batch's 3 "
                                          "empty row(s) with copies of sample 4's")
        assert report.notes[1].startswith("device1: 5 samples at batch 4") and "sample 9's" in report.notes[1]


def test_a_missing_summary_is_said_and_a_broken_one_refused(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH)
    summary = results.parent / "result_bs4_summary.json"
    summary.write_text("{\"throughput\": 3.5}")
    with pytest.raises(BertoptError, match="result_bs4_summary.json: not an ais_bench summary"):
        validate_results(static, inputs_dir, results)
    summary.write_text("{not json")
    with pytest.raises(BertoptError, match=r"result_bs4_summary.json: not a readable ais_bench summary \(JSONDecodeError\)"):
        validate_results(static, inputs_dir, results)
    summary.unlink()
    report = validate_results(static, inputs_dir, results)
    assert report.passed and report.performance == []
    assert report.notes[-1] == f"no result_bs4_summary.json beside {results}: ais_bench's throughput is not reported"


def test_with_a_dynamic_reference_and_no_summary_the_padding_is_described_without_numbers(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH)
    (results.parent / "result_bs4_summary.json").unlink()
    report = validate_results(original, inputs_dir, results)
    assert report.notes[0].startswith("the OM's batch size is unknown here") and "copies of that batch's first" in report.notes[0]


def test_results_beyond_tolerance_fail(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, static, batch=BATCH)
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
    results = write_results(tmp_path / "result", inputs_dir, static, batch=BATCH, shift=5e-3)
    assert validate_results(static, inputs_dir, results).passed
    assert not validate_results(static, inputs_dir, results, atol=1e-3, rtol=1e-3).passed


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "missing 1 file(s) for the given inputs: 5_1.npy"),
    ("padding", "match no input sample: 10_0.npy"),
    ("stray", "match no input sample: notes.npy"),
    ("shape", "5_1.npy: shape [1, 15]"),
    ("outputs", "files hold 3 output(s) per sample; the model has 2"),
])
def test_bad_results_folders_are_refused(models, inputs_dir, tmp_path, damage, fragment):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, static, batch=BATCH)
    if damage == "missing":
        (results / "5_1.npy").unlink()
    elif damage == "padding":  # an output for a padded row: ais_bench never writes one
        np.save(results / "10_0.npy", np.zeros((1, SEQ), np.float32))
    elif damage == "stray":
        np.save(results / "notes.npy", np.zeros(1))
    elif damage == "shape":
        np.save(results / "5_1.npy", np.zeros((1, SEQ - 1), np.float32))
    else:
        for stem in range(SAMPLES):
            np.save(results / f"{stem}_2.npy", np.zeros((1, SEQ), np.float32))
    with pytest.raises(BertoptError, match=re.escape(fragment)):
        validate_results(static, inputs_dir, tmp_path / "result")


def test_a_sample_written_by_two_devices_is_refused(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, static, batch=BATCH, devices=[0, 1])
    np.save(results / "device1" / "2_0.npy", np.load(results / "device0" / "2_0.npy"))
    with pytest.raises(BertoptError, match=r"2_0.npy is in both device0/ and device1/"):
        validate_results(static, inputs_dir, results)


def test_bad_input_folders_are_refused(models, inputs_dir, tmp_path):
    original, static = models
    results = write_results(tmp_path / "result", inputs_dir, static, batch=BATCH)
    (inputs_dir / "token_type_ids" / "4.npy").unlink()
    with pytest.raises(BertoptError, match="holds other samples"):
        validate_results(static, inputs_dir, results)
    np.save(inputs_dir / "token_type_ids" / "4.npy", np.zeros((2, SEQ), np.int64))
    with pytest.raises(BertoptError, match=r"4.npy: shape \[2, 16\]"):
        validate_results(static, inputs_dir, results)


def test_several_result_subfolders_need_a_choice(models, inputs_dir, tmp_path):
    original, static = models
    write_results(tmp_path / "result" / "result_bs1", inputs_dir, original)
    write_results(tmp_path / "result" / "result_bs4", inputs_dir, static, batch=BATCH)
    with pytest.raises(BertoptError, match=r"several result folders \(result_bs1, result_bs4\); pass one"):
        validate_results(static, inputs_dir, tmp_path / "result")
    assert validate_results(static, inputs_dir, tmp_path / "result" / "result_bs4").passed


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
    facts = reference_facts(original)  # its causal-mask probe is a small session of its own, closed at once
    before = len(sessions.alive_at_creation)
    reports = validate_candidates(original, candidates, facts, batch=BATCH, seq=SEQ)
    assert [r.passed for r in reports] == [True, True, None]
    # reference, optimized, emulation (and the loader's checks of each file): each alone
    assert len(sessions.alive_at_creation[before:]) >= 3 and set(sessions.alive_at_creation[before:]) == {1}
    assert len(sessions.alive) == 0, "every session is released once its candidate has run"


def test_a_candidate_that_cannot_load_is_an_error_and_the_others_still_run(models, sessions):
    original, static = models
    candidates = [OrtBackend(unloadable_model(), name="broken"), OrtBackend(static, name="optimized")]
    broken, optimized = validate_candidates(original, candidates, reference_facts(original), batch=BATCH, seq=SEQ)
    assert broken.passed is False and broken.comparison is None
    assert "ONNX Runtime cannot load the model" in broken.error
    assert optimized.passed is True and optimized.error is None
    assert max(sessions.alive_at_creation) == 1 and len(sessions.alive) == 0
