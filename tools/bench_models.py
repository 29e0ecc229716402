"""ONNX Runtime CPU latency of the original export and of bertopt's output, shape by shape.

    .venv/bin/python tools/bench_models.py                       # bert-base, seq 64,128,384 x batch 1,8
    .venv/bin/python tools/bench_models.py --sizes base --seq 64 --batch 1 --repeat 5 --no-write

The seed's matrix (base|large x seq 64..512 x batch 1..64) is hours of CPU time on a 2-core machine, so
the default is a subset: bert-base at seq 64, 128 and 384 (short, middle, the seed's SQuAD length) and
batch 1 and 8; `--sizes`, `--seq` and `--batch` pick others. Decisions:

- Baseline: the ORIGINAL dynamic export fed the same shape, which is what a user runs on a CPU without
  bertopt. A `freeze-shapes`-only baseline would need a third session (see memory) or a second timed
  pass per shape, for a question (how much of a difference static shapes alone make) that only matters
  if the ratio is not ~1.
- Candidate: `bertopt optimize --passes default` (the Ascend pipeline, bertopt's product) at the shape,
  run in process into a temporary folder. Exports come from bertopt's content cache, once per size.
- Sessions: bertopt.validation.parity.OrtRunner, CPUExecutionProvider, sequential execution, ORT's default graph
  optimisation level (ORT_ENABLE_ALL, what users get) and the same fixed intra-op thread count
  (`--threads`, default 2) for both models, so neither gets more cores.
- Feeds: one realistic padded batch (bertopt.validation.parity.realistic_feeds, seed 0), the same for both models.
- Timing: a round times one run of each model, and the order alternates between rounds (original
  first, then optimized first), so the drift of a shared, noisy machine and any after-effect of the
  previous run fall on both alike. After each model's first run (checked, below) come `--warmup` untimed
  rounds; the last one's length decides how many timed rounds fit `--budget` seconds, at least 3 and at
  most `--repeat`: bert-base at seq 64, batch 1 gets its 20 rounds in ~15 s, while one round at seq 384,
  batch 8 takes ~20 s here, and a fixed count would make the default subset take far over 5 minutes.
  Median and p90 (linear interpolation: with 3 rounds, near the max) per model; the ratio is optimized
  median / original median. Both sessions keep ORT's defaults otherwise (thread spinning
  included): interleaving two spinning sessions on 2 cores measured within noise of running each alone
  (bert-base, seq 128, batch 1: 371 and 360 ms alone, 391 and 366 ms interleaved).
- Correctness: the first outputs of the two models are compared (bertopt.validation.parity.compare_outputs, atol
  1e-3, rtol 0: any element off by more than 1e-3 fails, NaN too); a mismatch stops the tool before
  anything is timed, so a wrong model is never reported as fast.
- Memory: two sessions at a time (bert-large at batch 8, seq 384 takes a few GB each), released before
  the next shape; each optimized model is deleted once its shape is done.

The table goes into BENCHMARKS.md between this tool's markers, with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from bench_pipeline import environment, export, write_section

if TYPE_CHECKING:
    from bertopt.model.facts import ModelFacts
    from bertopt.validation.parity import OrtRunner

BEGIN, END = "<!-- bench_models:begin -->", "<!-- bench_models:end -->"
MAX_ABS_DIFF = 1e-3
MIN_ROUNDS = 3

Outputs = dict[str, np.ndarray]
Feed = dict[str, np.ndarray]


@dataclass
class ShapeResult:
    seq: int
    batch: int
    original_ms: list[float]
    optimized_ms: list[float]
    max_abs: float

    @property
    def ratio(self) -> float:
        return statistics.median(self.optimized_ms) / statistics.median(self.original_ms)


def optimize_at(model: Path, batch: int, seq: int, folder: Path) -> tuple[Path, ModelFacts]:
    """`bertopt optimize --passes default --batch B --seq S`; the output path and the model's facts."""
    from bertopt.flow.run import optimize

    output = folder / f"{model.stem}-bs{batch}-seq{seq}.onnx"
    return output, optimize(model, output, "default", batch=batch, seq=seq, force=True).facts


def feeds_for(original: Path, optimized: Path, facts: ModelFacts, batch: int, seq: int) -> tuple[Feed, Feed]:
    """One realistic batch, as each model declares its inputs (a pass may change their dtypes)."""
    from bertopt.validation.parity import adapt_feed, graph_only, input_specs_of, realistic_feeds

    feed = realistic_feeds(facts, input_specs_of(graph_only(original)), batch=batch, seq=seq)[0]
    return feed, adapt_feed(feed, input_specs_of(graph_only(optimized)))


def check_agreement(reference: Outputs, candidate: Outputs, shape: str) -> float:
    """The largest absolute difference; a difference above MAX_ABS_DIFF (or a NaN) stops the tool."""
    from bertopt.validation.parity import compare_outputs

    comparison = compare_outputs([reference], [candidate], atol=MAX_ABS_DIFF, rtol=0.0)
    if not comparison.passed:
        raise SystemExit(f"{shape}: the optimized model's outputs differ from the original's, "
                         f"not timing it: {comparison.summary_line()}")
    return max(o.max_abs for o in comparison.outputs)


def timed_run(runner: OrtRunner, feed: Feed) -> float:
    start = time.perf_counter()
    runner.run(feed)
    return (time.perf_counter() - start) * 1000


def time_interleaved(runners: list[OrtRunner], feeds: list[Feed], rounds: int) -> list[list[float]]:
    """Milliseconds per run of each model, one run of each per round, the order reversed every round."""
    times: list[list[float]] = [[] for _ in runners]
    for round_index in range(rounds):
        order = range(len(runners)) if round_index % 2 == 0 else reversed(range(len(runners)))
        for index in order:
            times[index].append(timed_run(runners[index], feeds[index]))
    return times


def rounds_within(budget: float, round_seconds: float, repeat: int) -> int:
    """As many rounds as fit `budget` seconds, but at least MIN_ROUNDS, and never more than `repeat`."""
    return min(repeat, max(MIN_ROUNDS, int(budget / round_seconds)))


def bench_shape(original: Path, batch: int, seq: int, args: argparse.Namespace, folder: Path) -> ShapeResult:
    from bertopt.validation.parity import OrtRunner

    shape = f"{original.stem} seq {seq} batch {batch}"
    print(f"[{shape}] optimizing", flush=True)
    optimized, facts = optimize_at(original, batch, seq, folder)
    try:
        feeds = feeds_for(original, optimized, facts, batch, seq)
        runners = [OrtRunner(original, threads=args.threads), OrtRunner(optimized, threads=args.threads)]
        outputs = [runner.run(feed) for runner, feed in zip(runners, feeds)]
        max_abs = check_agreement(*outputs, shape)
        warmup = time_interleaved(runners, feeds, args.warmup)
        rounds = rounds_within(args.budget, sum(times[-1] for times in warmup) / 1000, args.repeat)
        print(f"[{shape}] outputs agree (max abs diff {max_abs:.2g}); timing {rounds} rounds", flush=True)
        original_ms, optimized_ms = time_interleaved(runners, feeds, rounds)
    finally:
        optimized.unlink(missing_ok=True)
    return ShapeResult(seq, batch, original_ms, optimized_ms, max_abs)


def bench_size(size: str, args: argparse.Namespace, folder: Path) -> list[ShapeResult]:
    original = export(size, folder)
    return [bench_shape(original, batch, seq, args, folder) for seq in args.seq for batch in args.batch]


def table(size: str, results: list[ShapeResult]) -> str:
    rows = [f"| bert-{size} | seq | batch | rounds | original ms (median) | p90 | bertopt ms (median) | p90 | "
            "bertopt / original | max abs diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| | {r.seq} | {r.batch} | {len(r.original_ms)} | {statistics.median(r.original_ms):.1f} | "
                    f"{np.percentile(r.original_ms, 90):.1f} | {statistics.median(r.optimized_ms):.1f} | "
                    f"{np.percentile(r.optimized_ms, 90):.1f} | {r.ratio:.2f} | {r.max_abs:.1g} |")
    return "\n".join(rows)


def heading(args: argparse.Namespace) -> str:
    command = "python tools/bench_models.py " + " ".join(sys.argv[1:])
    return (f"## ONNX Runtime CPU latency (tools/bench_models.py)\n\nMeasured {time.strftime('%Y-%m-%d')} "
            f"with `{command.strip()}`: the legacy opset-14 export (dynamic axes, fed each shape) against "
            f"`bertopt optimize --passes default` at that shape; CPUExecutionProvider, ORT_ENABLE_ALL, "
            f"{args.threads} intra-op threads each; after a checked first run, {args.warmup} warm-up "
            f"round(s), then as many timed rounds (one run of each model, the order alternating) as fit "
            f"{args.budget:g} s, between {MIN_ROUNDS} and {args.repeat}.\nMachine: {environment()}.\n\n")


def int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="base")
    parser.add_argument("--seq", type=int_list, default=[64, 128, 384])
    parser.add_argument("--batch", type=int_list, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds per shape, at most")
    parser.add_argument("--budget", type=float, default=20, help="seconds of timed rounds per shape (>= 3 rounds)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the checked first runs")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both models")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.repeat < 1 or args.warmup < 1 or args.budget <= 0:
        parser.error("--repeat, --warmup and --budget must be positive")
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for size in args.sizes.split(","):
            sections.append(table(size, bench_size(size, args, Path(tmp))))
    text = heading(args) + "\n\n".join(sections)
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
