"""`bertopt sweep` on bert-tiny: layout, summary, resume (also after a real kill), a worker killed from
outside, Ctrl-C, the memory-budget scheduler, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import onnx
import pytest

from bertopt.errors import BertoptError
from bertopt.flow.sweep import GIB, SweepConfig, admits, peak_estimate, sweep

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
        assert "--output ../om/optimized" in (folder / "atc.sh").read_text()
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


def concurrency(estimates: list[int], budget: int, jobs: int) -> int:
    """How many of `estimates` (in order) `admits` starts together on an idle machine."""
    running: list[int] = []
    for estimate in estimates:
        if not admits(running, estimate, budget, jobs):
            break
        running.append(estimate)
    return len(running)


def test_concurrency_from_budget_and_estimates():
    large, base = 4 * GIB, int(1.3 * GIB)  # ~3x of bert-large's and bert-base's weights
    assert concurrency([base] * 6, 11 * GIB, 8) == 6  # 7.8 GiB fits
    assert concurrency([large] * 6, 11 * GIB, 8) == 2  # a third would need 12 GiB
    assert concurrency([large] * 6, 11 * GIB, 1) == 1
    assert concurrency([large, base, base], 6 * GIB, 8) == 2  # 5.3 GiB fits, 6.6 does not
    assert concurrency([16 * GIB], 8 * GIB, 4) == 1


@pytest.mark.parametrize("weights, heads, seq, batch, measured_mib", [
    (435836945, 12, 64, 1, 1024), (435836945, 12, 512, 64, 6028),  # bert-base (BENCHMARKS.md, bench_sweep)
    (1336891321, 16, 64, 1, 2687), (1336891321, 16, 256, 16, 3591), (1336891321, 16, 384, 32, 3919),  # large
])
def test_the_estimate_covers_measured_peaks_without_doubling_them(weights, heads, seq, batch, measured_mib):
    estimate = peak_estimate(weights, heads, batch, seq) / (1 << 20)
    assert measured_mib < estimate < 2 * measured_mib


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


def test_sweep_passes_image_size_and_frames_to_freeze_shapes(tmp_path):
    """As `run` does: each shape freezes image and audio inputs at --image-size / --frames (tiny ViT's and
    Whisper's position embeddings fix 32 px and 64 frames, so other sizes are refused, naming the value)."""
    from test_cli import bertopt

    done = bertopt("sweep", "--sizes", "vit-tiny,whisper-tiny-encoder", "--seq", "16", "--batch", "1", "--jobs", "1",
                   "--image-size", "48", "--frames", "100", "--output", str(tmp_path / "s"))
    assert done.returncode == 1, done.stderr
    rows = {row["size"]: row for row in json.loads((tmp_path / "s" / "summary.json").read_text())["rows"]}
    assert "--image-size 48" in rows["vit-tiny"]["error"]
    assert "--frames 100" in rows["whisper-tiny-encoder"]["error"]
    asked = json.loads((tmp_path / "s" / "sweep.json").read_text())["last_request"]
    assert (asked["image_size"], asked["frames"]) == (48, 100)


# --------------------------------------------------------------------------- killed, interrupted

# Two shapes, one at a time: when the second starts, the first is done and the second has seconds to go.
TWO_SHAPES = ("--sizes", "bert-tiny", "--seq", "16", "--batch", "1,2", "--jobs", "1")


def start_sweep(output: Path) -> subprocess.Popen:
    """`bertopt sweep` as a shell starts a job: in a process group of its own, which the test signals whole."""
    return subprocess.Popen([sys.executable, "-m", "bertopt", "sweep", *TWO_SHAPES, "--output", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def read_progress_until(process: subprocess.Popen, fragment: str) -> str:
    for line in process.stderr:
        if fragment in line:
            return line
    raise AssertionError(f"the sweep ended without printing {fragment!r}")


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.01)


def worker_pid(progress_line: str) -> int:
    return int(re.search(r"\(pid (\d+)\)", progress_line)[1])


def live_processes_in_group(group: int) -> list[int]:
    """Pids of the group's processes that still run (zombies excluded: this container's init never reaps)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:  # ended while listed
            continue
        if int(pgrp) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def temporary_files(output: Path) -> list[Path]:
    """What the atomic writers stage beside a file before renaming it (`.optimized.onnx.*`, `.result.json.*`)."""
    return list(output.rglob(".*"))


def test_sweep_killed_midway_reruns_only_the_missing_shape(tmp_path):
    """SIGKILL to the whole process group once the first shape is done: nothing runs on to clean up."""
    output = tmp_path / "s"
    process = start_sweep(output)
    read_progress_until(process, "batch 2: started")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = output / "bert-tiny" / "seq16_bs1" / "result.json"
    assert sorted(path.parent.name for path in output.rglob("result.json")) == ["seq16_bs1"]
    for model in output.rglob("optimized.onnx"):  # complete under its final name, or absent
        onnx.checker.check_model(onnx.load(model))
    assert not (output / "summary.json").exists()
    before = (done.read_bytes(), done.stat().st_mtime_ns)

    from test_cli import bertopt

    again = bertopt("sweep", *TWO_SHAPES, "--output", str(output))
    assert again.returncode == 0, again.stderr
    assert "1 done before, 1 to run" in again.stderr and "seq 16 batch 1: started" not in again.stderr
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before
    summary = json.loads((output / "summary.json").read_text())
    assert summary["passed"] and summary["counts"] == {"shapes": 2, "passed": 2, "done_before": 1}
    assert again.stdout.count("| bert-tiny |") == 2 and not temporary_files(output)


def test_ctrl_c_is_one_line_and_leaves_no_worker_nor_unfinished_shape(tmp_path):
    """SIGINT to the whole group, as the terminal sends it, once the second shape's worker writes its folder."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here (a background job), so the sweep started from here would ignore it too")
    output = tmp_path / "s"
    process = start_sweep(output)
    read_progress_until(process, "batch 2: started")
    wait_until((output / "bert-tiny" / "seq16_bs2").is_dir)
    os.killpg(process.pid, signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert rest == "bertopt: interrupted\n", rest
    wait_until(lambda: not live_processes_in_group(process.pid), timeout=10)
    assert [path.name for path in (output / "bert-tiny").iterdir() if path.is_dir()] == ["seq16_bs1"]
    assert not temporary_files(output)


def test_a_worker_killed_from_outside_costs_only_its_shape(tmp_path):
    """The OOM killer's SIGKILL to one busy worker, while another runs beside it and two wait.

    No test-only seam in the sweep: its progress line names each worker's pid (as one finds the
    process to watch in top), and the test kills that pid from outside, once the worker has begun
    writing its folder.
    """
    output = tmp_path / "out"
    victim = output / "bert-tiny" / "seq16_bs2"

    def kill_the_16_2_worker_when_busy(message: str) -> None:
        if message.startswith("bert-tiny seq 16 batch 2: started"):
            wait_until(victim.is_dir)
            os.kill(worker_pid(message), signal.SIGKILL)

    result = sweep(tiny_config(output), kill_the_16_2_worker_when_busy)
    rows = {(row["seq"], row["batch"]): row for row in result.rows}
    assert rows[(16, 2)]["status"] == "error" and not result.passed
    assert rows[(16, 2)]["error"] == ("worker process died (killed by SIGKILL, e.g. by the OOM killer); "
                                      "rerun the sweep to retry")
    assert [shape for shape in SHAPES if rows[shape]["status"] == "passed"] == [(16, 1), (32, 1), (32, 2)]
    assert not victim.exists()  # what it had begun writing is gone, and with no result.json a rerun redoes it
