"""tools/bench_models.py on bert-tiny: a timed shape, the agreement guard, and its BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))  # the tools are scripts, not a package
import bench_models  # noqa: E402

PIPELINE_SECTION = "<!-- bench_pipeline:begin -->\npipeline table\n<!-- bench_pipeline:end -->\n\nReading: it.\n"


def test_a_shape_is_optimized_checked_and_timed(tiny_export, tmp_path):
    args = argparse.Namespace(threads=1, warmup=1, repeat=3, budget=60.0)
    result = bench_models.bench_shape(tiny_export("legacy14"), 2, 16, args, tmp_path)
    assert (result.seq, result.batch) == (16, 2)
    assert len(result.original_ms) == len(result.optimized_ms) == 3
    assert result.max_abs <= bench_models.MAX_ABS_DIFF and result.ratio > 0
    assert not list(tmp_path.glob("*-bs2-seq16.onnx")), "the optimized model is deleted after its shape"
    row = bench_models.table("tiny", [result]).splitlines()[-1]
    assert row.startswith("| | 16 | 2 | 3 | ") and row.count("|") == 11


def test_rounds_alternate_which_model_runs_first():
    calls = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, feed: dict) -> None:
            calls.append(self.name)

    times = bench_models.time_interleaved([Recorder("original"), Recorder("optimized")], [{}, {}], 3)
    assert calls == ["original", "optimized", "optimized", "original", "original", "optimized"]
    assert [len(t) for t in times] == [3, 3]


def test_the_budget_sets_the_rounds_between_the_minimum_and_repeat():
    assert bench_models.rounds_within(20, round_seconds=2, repeat=20) == 10
    assert bench_models.rounds_within(20, round_seconds=0.1, repeat=20) == 20
    assert bench_models.rounds_within(20, round_seconds=15, repeat=20) == bench_models.MIN_ROUNDS
    assert bench_models.rounds_within(20, round_seconds=15, repeat=2) == 2


def test_outputs_that_differ_stop_the_tool_before_timing():
    reference = {"start_logits": np.zeros((1, 4), np.float32)}
    candidate = {"start_logits": np.array([[0, 0, 0, 2e-3]], np.float32)}
    assert bench_models.check_agreement(reference, reference, "same") == 0
    with pytest.raises(SystemExit, match="differ from the original"):
        bench_models.check_agreement(reference, candidate, "off by 2e-3")


def test_its_section_is_appended_once_then_replaced_leaving_the_pipeline_section(tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n" + PIPELINE_SECTION)
    for text in ("first table", "second table"):
        bench_models.write_section(text, bench_models.BEGIN, bench_models.END, benchmarks)
    written = benchmarks.read_text()
    assert written == ("# Benchmarks\n\n" + PIPELINE_SECTION + "\n" + bench_models.BEGIN + "\nsecond table\n"
                       + bench_models.END + "\n")
