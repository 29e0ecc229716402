"""The command line on bad input: one clear line on stderr, a non-zero exit, the input untouched."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from test_facts import small_cnn

TIMEOUT = 300


def bertopt(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "bertopt", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_file(tmp_path):
    assert_one_line_error(bertopt("run", str(tmp_path / "absent.onnx"), "--output", str(tmp_path / "o")),
                          2, "no such file")


@pytest.mark.parametrize("content", ["random", "truncated"])
def test_not_onnx(tmp_path, tiny_export, content):
    path = tmp_path / "bad.onnx"
    data = tiny_export("legacy14").read_bytes()
    path.write_bytes(np.random.default_rng(0).bytes(4096) if content == "random" else data[: len(data) // 3])
    before = digest(path)
    assert_one_line_error(bertopt("run", str(path), "--output", str(tmp_path / "o")), 2, "bad.onnx")
    assert digest(path) == before
    assert not (tmp_path / "o" / "optimized.onnx").exists()


def test_not_a_bert_encoder(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), str(path))
    assert_one_line_error(bertopt("run", str(path), "--output", str(tmp_path / "o")), 2,
                          "not a transformer bertopt knows")


def test_unknown_pass(tmp_path, tiny_export):
    result = bertopt("run", str(tiny_export("legacy14")), "--passes", "default,fold-everything",
                     "--output", str(tmp_path / "o"))
    assert_one_line_error(result, 2, "unknown pass 'fold-everything'")


@pytest.mark.parametrize("shape, fragment", [(("--batch", "0"), "must be positive"),
                                             (("--seq", "-4"), "must be positive"),
                                             (("--seq", "512"), "exceeds the model's 128 position")])
def test_bad_shapes(tmp_path, tiny_export, shape, fragment):
    path = tiny_export("legacy14")
    before = digest(path)
    assert_one_line_error(bertopt("run", str(path), *shape, "--output", str(tmp_path / "o")), 2, fragment)
    assert digest(path) == before


def test_existing_results_need_force(tmp_path, tiny_export):
    model = tiny_export("legacy14")
    out = tmp_path / "o"
    first = bertopt("run", str(model), "--passes", "freeze-shapes", "--batch", "2", "--seq", "16",
                    "--output", str(out), "--target", "ort")
    assert first.returncode == 0, first.stderr
    report = json.loads((out / "report.json").read_text())
    assert {"original_model", "optimized_model", "facts", "passes"} <= report.keys()
    assert [(p["name"], p["changed"]) for p in report["passes"]] == [("freeze-shapes", True)]
    assert {"seconds", "counts"} <= report["passes"][0].keys()
    stamp = digest(out / "optimized.onnx")
    assert_one_line_error(bertopt("run", str(model), "--output", str(out)), 2, "--force")
    assert digest(out / "optimized.onnx") == stamp
    forced = bertopt("run", str(model), "--passes", "freeze-shapes", "--batch", "2", "--seq", "16",
                     "--output", str(out), "--force", "--target", "ort")
    assert forced.returncode == 0, forced.stderr


def test_passes_lists_freeze_shapes():
    result = bertopt("passes")
    assert result.returncode == 0
    assert "freeze-shapes" in result.stdout and "pipeline ascend (`default` with --target ascend):" in result.stdout


def test_optimize_writes_only_the_model(tmp_path, tiny_export):
    model = tiny_export("legacy14")
    before = digest(model)
    out = tmp_path / "opt.onnx"
    result = bertopt("optimize", str(model), "--passes", "freeze-shapes", "--batch", "2", "--seq", "16",
                     "--output", str(out), "--target", "ort")
    assert result.returncode == 0, result.stderr
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[1].dim_value == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.onnx"]
    assert_one_line_error(bertopt("optimize", str(model), "--output", str(out)), 2, "--force")
    assert_one_line_error(bertopt("optimize", str(model), "--output", str(model), "--force"), 2,
                          "never overwrites its input")
    assert digest(model) == before


def test_an_optimize_output_illegal_for_the_cann_version_is_written_and_exits_1(tmp_path, tiny_export):
    out = tmp_path / "opt.onnx"
    result = bertopt("optimize", str(tiny_export("legacy14")), "--passes", "freeze-shapes", "--batch", "2",
                     "--seq", "16", "--output", str(out), "--cann", "6.0")
    assert_one_line_error(result, 1, "not legal for the CANN version's ATC")
    assert "opset 14 outside CANN 6.0's 9-13" in result.stderr and out.is_file()


def test_check_exit_codes(tmp_path, tiny_export):
    model = tiny_export("legacy14")
    out = tmp_path / "o"
    assert bertopt("run", str(model), "--batch", "2", "--seq", "16", "--output", str(out)).returncode == 0
    legal = bertopt("check", str(out / "optimized.onnx"), "--legal-only")
    assert legal.returncode == 0, legal.stdout
    assert "2 of 2 in the standard form" in legal.stdout
    tiny = bertopt("check", str(out / "optimized.onnx"))
    assert_one_line_error(tiny, 1, "hidden = 32 is not 768 or 1024")
    raw = bertopt("check", str(model), "--json")
    assert raw.returncode == 1
    report = json.loads(raw.stdout)
    assert report["conforming"] is False and not report["blocks_conforming"]
    assert_one_line_error(bertopt("check", str(model), "--target", "ort"), 2, "only ascend")


@pytest.mark.parametrize("args, fragment", [(("run", "--batch", "abc"), "Invalid value for '--batch'"),
                                            (("squad", "check", "minilm", "--force"), "No such option: --force"),
                                            (("transmogrify",), "No such command")])
def test_usage_errors_are_one_line(args, fragment):
    assert_one_line_error(bertopt(*args), 2, fragment)


@pytest.mark.parametrize("command", ["run", "optimize"])
def test_an_output_that_cannot_be_created_is_refused_before_any_work(tmp_path, tiny_export, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / ("out.onnx" if command == "optimize" else "out")
    result = bertopt(command, str(tiny_export("legacy14")), "--output", str(target), "--batch", "2", "--seq", "16")
    assert_one_line_error(result, 2, "is a file, not a folder")


def test_an_unwritable_output_parent_is_refused(tmp_path, monkeypatch):
    from bertopt.errors import BertoptError
    from bertopt.files import check_writable_folder

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a read-only filesystem answers
    with pytest.raises(BertoptError, match="not writable"):
        check_writable_folder(tmp_path / "new" / "out", "--output")
