"""`bertopt validate`, `bertopt inputs` and `bertopt run`'s atc and validation steps, from the command line.

Exit codes: 0 every check passed, 1 a check failed, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from test_cli import assert_one_line_error, digest
from test_validate import write_results

TIMEOUT = 300


def bertopt(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "bertopt", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def perturbed(model_path, target, shift: float = 0.5):
    """A copy whose QA head bias is shifted: outputs differ well beyond fp32 tolerance."""
    model = onnx.load(str(model_path))
    [bias] = [init for init in model.graph.initializer if init.name.endswith("qa_outputs.bias")]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(shift), bias.name))
    onnx.save(model, str(target))
    return target


def test_validate_two_models_pass_and_fail(tiny_export, tmp_path):
    original = tiny_export("legacy14")
    same = bertopt("validate", str(original), str(original), "--batch", "2", "--seq", "16")
    assert same.returncode == 0, same.stderr
    assert "start_logits" in same.stdout and "PASSED" in same.stdout
    worse = perturbed(original, tmp_path / "worse.onnx")
    before = digest(worse)
    failed = bertopt("validate", str(original), str(worse), "--batch", "2", "--seq", "16")
    assert failed.returncode == 1, failed.stderr
    assert "FAIL" in failed.stdout and "beyond tolerance" in failed.stderr
    assert digest(worse) == before


def test_validate_refuses_an_om_without_ais_bench(tiny_export, tmp_path):
    om = tmp_path / "model.om"
    om.write_bytes(b"\0" * 64)
    result = bertopt("validate", str(tiny_export("legacy14")), str(om), "--batch", "1", "--seq", "16")
    assert_one_line_error(result, 2, "ais_bench is not installed")


def test_validate_needs_a_candidate_or_both_folders(tiny_export, tmp_path):
    assert_one_line_error(bertopt("validate", str(tiny_export("legacy14"))), 2, "either CANDIDATE")
    assert_one_line_error(bertopt("validate", str(tiny_export("legacy14")), "--inputs", str(tmp_path)), 2,
                          "either CANDIDATE")


def test_inputs_then_results_folder_pass_fail_and_bad(tiny_export, tmp_path):
    original = tiny_export("legacy14")
    prep = tmp_path / "prep"
    made = bertopt("inputs", str(original), "--batch", "4", "--seq", "16", "--count", "6", "--output", str(prep))
    assert made.returncode == 0, made.stderr
    assert "ais_bench --input" in made.stdout and len(list((prep / "input_ids").glob("*.npy"))) == 6
    assert_one_line_error(bertopt("inputs", str(original), "--seq", "16", "--output", str(prep)), 2,
                          "already exists")

    good = write_results(tmp_path / "good" / "result_bs1", prep, original)
    passed = bertopt("validate", str(original), "--inputs", str(prep), "--results", str(tmp_path / "good"))
    assert passed.returncode == 0, passed.stderr
    assert "ais_bench results" in passed.stdout
    assert "ais_bench result_bs1_summary.json: throughput 248.4 samples/s" in " ".join(passed.stdout.split())

    write_results(tmp_path / "padded" / "result_bs4", prep, original, batch=4, devices=[0, 1])
    padded = bertopt("validate", str(original), "--inputs", str(prep), "--results", str(tmp_path / "padded"))
    assert padded.returncode == 0, padded.stderr
    assert "device0: 3 samples at batch 4: ais_bench filled the last batch's 1 empty row(s) with copies of " \
           "sample 0's input files and wrote no output for them" in " ".join(padded.stdout.split())
    assert "device1_summary.json: throughput" in " ".join(padded.stdout.split())

    bad = write_results(tmp_path / "bad", prep, original, shift=0.2)
    failed = bertopt("validate", str(original), "--inputs", str(prep), "--results", str(bad))
    assert failed.returncode == 1 and "FAIL" in failed.stdout

    (good / "3_0.npy").unlink()
    assert_one_line_error(bertopt("validate", str(original), "--inputs", str(prep), "--results",
                                  str(tmp_path / "good")), 2, "missing 1 file(s) for the given inputs: 3_0.npy")


# --------------------------------------------------------------------------- run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "o"
    result = bertopt("run", "bert-tiny", "--batch", "2", "--seq", "16", "--output", str(out),
                     path="/usr/bin:/bin")
    return result, out


def test_run_writes_atc_and_validation(tiny_run):
    result, out = tiny_run
    assert result.returncode == 0, result.stderr
    assert "atc not found" in result.stdout and "atc --model ../optimized.onnx --output ../om/optimized" in result.stdout
    assert "Ascend emulation: force_fp16, Gelu high_performance" in result.stdout and "same span" in result.stdout
    assert "warning: ATC is not predicted to fuse attention" in result.stdout and "hidden = 32" in result.stdout
    assert "skipped: no compiled OM" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert {"original_model", "optimized_model", "facts", "passes", "parity", "atc", "check", "validation",
            "warnings"} <= report.keys()
    atc = report["atc"]
    assert atc["status"] == "not-found" and atc["soc"] == "Ascend310P3" and atc["soc_source"] == "default"
    assert atc["cann"] == {"version": "6.0", "source": "default"} and atc["overrides"] == {}
    assert report["check"]["legal"] is True and report["check"]["fusion_predicted"] is False
    assert atc["argv"][-2:] == ["--optypelist_for_implmode=Gelu", "--op_select_implmode=high_performance"]
    assert (out / "atc.sh").is_file()
    kinds = [(c["kind"], c["passed"]) for c in report["validation"]]
    assert kinds[0] == ("onnx", True) and ("emulation", True) in kinds and ("npu", None) in kinds
    emulations = [c for c in report["validation"] if c["kind"] == "emulation"]
    assert [(c["informational"], "Gelu high_performance" in c["name"]) for c in emulations] == [(False, True),
                                                                                              (True, False)]
    assert "Gelu high_precision" in emulations[1]["name"] and "[for comparison]" in emulations[1]["name"]
    fp32 = report["validation"][0]
    assert {"max_abs", "p99_abs", "max_rel", "p99_rel", "atol", "rtol", "passed"} <= fp32["outputs"][0].keys()
    assert fp32["span_agreement"] == 1.0
    assert report["parity"]["passed"] is True


def test_run_target_ort_has_no_atc_step(tmp_path):
    result = bertopt("run", "bert-tiny", "--batch", "2", "--seq", "16", "--output", str(tmp_path / "o"),
                     "--target", "ort", "--soc", "Ascend910B")
    assert result.returncode == 0, result.stderr
    assert "atc: skipped (--target ort" in result.stdout and "emulation" not in result.stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["atc"] is None and [c["kind"] for c in report["validation"]] == ["onnx"]


def test_run_with_a_failing_atc_exits_1_with_its_log_tail(tmp_path):
    """A fake atc that exits 1: tests our process handling; no OM exists or is claimed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "atc").write_text("#!/bin/bash\necho 'ATC start working now'\necho 'E10001: bad soc' >&2\nexit 1\n")
    (bin_dir / "atc").chmod(0o755)
    out = tmp_path / "o"
    result = bertopt("run", "bert-tiny", "--batch", "2", "--seq", "16", "--output", str(out), "--soc",
                     "Ascend910B", "--atc-arg=--debug_dir=dbg", path=f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("bertopt: error")]
    assert len(errors) == 1 and "atc failed with exit code 1" in errors[0] and "E10001" in errors[0]
    assert "Traceback" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["atc"]["status"] == "failed" and report["atc"]["log_tail"][-1] == "E10001: bad soc"
    assert report["atc"]["soc_source"] == "option" and report["atc"]["argv"][-1] == "--debug_dir=dbg"
    assert not list((out / "om").glob("*.om"))


def test_run_refuses_a_bad_atc_arg_before_any_work(tmp_path):
    result = bertopt("run", "bert-tiny", "--output", str(tmp_path / "o"), "--atc-arg=soc_version=X")
    assert_one_line_error(result, 2, "start with '--'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, fragment", [(("--cann", "4.0"), "CANN"),
                                            (("--cann", "6.0", "--atc-arg=--precision_mode_v2=fp16"), "no such flag"),
                                            (("--gelu-impl", "fastest"), "--gelu-impl")])
def test_run_refuses_a_cann_version_flag_or_gelu_kernel_it_cannot_honour(tmp_path, args, fragment):
    result = bertopt("run", "bert-tiny", "--output", str(tmp_path / "o"), *args)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "o").exists()


def test_run_an_fp16_export_is_held_to_fp16_tolerances(tmp_path):
    out = tmp_path / "o"
    result = bertopt("run", "bert-tiny", "--dtype", "fp16", "--exporter", "dynamo", "--batch", "2", "--seq", "16",
                     "--target", "ort", "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["facts"]["dtype"] == "float16" and "fp16 weights" in report["model_description"]
    assert report["validation"][0]["outputs"][0]["atol"] == 2.0 ** -7
