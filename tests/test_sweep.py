"""`bertopt sweep` on bert-tiny: layout, summary, resume, the memory-budget scheduler, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertopt.errors import BertoptError
from bertopt.sweep import GIB, SweepConfig, admits, concurrency, sweep

SHAPES = [(16, 1), (16, 2), (32, 1), (32, 2)]


def tiny_config(output: Path, **changes) -> SweepConfig:
    fields = dict(sizes=("bert-tiny",), seqs=(16, 32), batches=(1, 2), output=output, jobs=2, samples=1)
    return SweepConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    output = tmp_path_factory.mktemp("sweep") / "out"
    return output, sweep(tiny_config(output))


def test_layout_holds_every_shape_and_the_summary(swept):
    output, _ = swept
    assert (output / "sweep.json").is_file() and (output / "bert-tiny" / "original.onnx").is_file()
    for seq, batch in SHAPES:
        folder = output / "bert-tiny" / f"seq{seq}_bs{batch}"
        assert {p.name for p in folder.iterdir()} >= {"optimized.onnx", "atc.sh", "result.json"}
        assert "--output om/optimized" in (folder / "atc.sh").read_text()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["passed"] and summary["counts"] == {"shapes": 4, "passed": 4, "done_before": 0}
    assert (output / "summary.md").read_text().count("| bert-tiny |") == 4


def test_rows_carry_the_verdicts(swept):
    _, result = swept
    assert result.passed
    assert [(row["seq"], row["batch"]) for row in result.rows] == SHAPES
    for row in result.rows:
        assert row["status"] == "passed" and row["conforming"] is True and row["parity_passed"] is True
        assert row["parity_max_abs"] < 1e-4 and "freeze-shapes" in row["passes_changed"]
        assert row["atc"] == "not-found" and not row["done_before"]


def test_resume_redoes_only_the_shape_without_result(swept):
    output, _ = swept
    folders = {shape: output / "bert-tiny" / f"seq{shape[0]}_bs{shape[1]}" for shape in SHAPES}
    before = {shape: (folder / "optimized.onnx").stat().st_mtime_ns for shape, folder in folders.items()}
    (folders[(32, 1)] / "result.json").unlink()
    (folders[(32, 1)] / "leftover.tmp").write_text("half-written")
    result = sweep(tiny_config(output))
    redone = {(row["seq"], row["batch"]) for row in result.rows if not row["done_before"]}
    assert redone == {(32, 1)} and result.passed
    assert not (folders[(32, 1)] / "leftover.tmp").exists()
    after = {shape: (folder / "optimized.onnx").stat().st_mtime_ns for shape, folder in folders.items()}
    assert [shape for shape in SHAPES if after[shape] != before[shape]] == [(32, 1)]


def test_admits_counts_jobs_and_memory():
    assert admits([], 10 * GIB, 4 * GIB, 2)  # too big for the budget: still runs, alone
    assert not admits([1 * GIB], 10 * GIB, 4 * GIB, 2)
    assert admits([1 * GIB], 3 * GIB, 4 * GIB, 2)
    assert not admits([1 * GIB], 3 * GIB + 1, 4 * GIB, 2)
    assert not admits([1, 1], 1, 4 * GIB, 2)  # --jobs bounds it whatever the memory


def test_concurrency_from_budget_and_estimates():
    large, base = 4 * GIB, int(1.3 * GIB)  # ~3x of bert-large's and bert-base's weights
    assert concurrency([base] * 6, 11 * GIB, 8) == 6  # 7.8 GiB fits
    assert concurrency([large] * 6, 11 * GIB, 8) == 2  # a third would need 12 GiB
    assert concurrency([large] * 6, 11 * GIB, 1) == 1
    assert concurrency([large, base, base], 6 * GIB, 8) == 2  # 5.3 GiB fits, 6.6 does not
    assert concurrency([16 * GIB], 8 * GIB, 4) == 1


@pytest.mark.parametrize("changes, message", [
    (dict(sizes=("bert-huge",)), "not a preset"),
    (dict(seqs=(16, 256)), "--seq 256: bert-tiny has 128 position embeddings"),
    (dict(batches=(0,)), "--batch 0"),
    (dict(seqs=(-1,)), "--seq -1"),
    (dict(jobs=0), "--jobs 0"),
    (dict(memory_budget_gib=0.0), "--memory-budget"),
])
def test_bad_input_is_one_line(tmp_path, changes, message):
    with pytest.raises(BertoptError, match=message) as caught:
        sweep(tiny_config(tmp_path / "out", **changes))
    assert "\n" not in str(caught.value)


def test_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BertoptError, match="not a sweep folder"):
        sweep(tiny_config(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_sweep_command_resumes_and_refuses_bad_lists(tmp_path):
    from test_cli import assert_one_line_error, bertopt

    args = ("sweep", "--sizes", "bert-tiny", "--seq", "16", "--batch", "1,2", "--jobs", "2",
            "--output", str(tmp_path / "s"))
    first = bertopt(*args)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "s" / "summary.md").exists()
    again = bertopt(*args)
    assert again.returncode == 0 and again.stdout.count("done before") == 2
    assert_one_line_error(bertopt("sweep", "--seq", "16,x", "--output", str(tmp_path / "t")), 2,
                          "expected comma-separated integers")
