"""What one shape of `bertopt sweep` costs, split into export, load + passes, save and validation, and the
seed's whole matrix (bert-base and bert-large, seq 64..512, batch 1..64: 72 shapes) extrapolated from it.

    .venv/bin/python tools/bench_sweep.py                      # the shapes below; about 15 minutes here
    .venv/bin/python tools/bench_sweep.py --sizes base --shapes 64x1,128x8 --no-write

Every measured shape is a real `bertopt sweep` of that one shape (one job), started by bench_pipeline's
launcher so its wall time and peak RSS (the sweep and its workers) come from the kernel. Each size's first
shape exports with an empty export cache (the export's own cost); the others reuse it, as a sweep does.
The split comes from the shape's result.json (`phase_seconds`, `peak_rss_mib` of its worker process).

Validation's cost is fitted per size as  a + batches * batch * (b * seq + c * seq^2)  (least squares over
the measured shapes; `batches` by the sweep's rule, bertopt.flow.sweep.parity_batches), load + passes + save
as the measured shapes' mean: the matrix's time is the sum over its 72 shapes, one at a time, plus each
size's export. It is an extrapolation, and the table says which numbers are measured. One shape per size
is also validated with 1 and with 2 batches (`bertopt validate --samples`), the rule's saving.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import environment, measure, write_section  # noqa: E402

from bertopt.flow.sweep import SIZE_ALIASES, Worker, parity_batches  # noqa: E402

BEGIN, END = "<!-- bench_sweep:begin -->", "<!-- bench_sweep:end -->"
SHAPES = {"base": "64x1,128x8,256x16,512x64", "large": "64x1,128x8,256x16,384x32"}
COMPARE = {"base": (256, 32), "large": (256, 16)}
MATRIX_SEQS = (64, 128, 256, 320, 384, 512)
MATRIX_BATCHES = (1, 4, 8, 16, 32, 64)
SAMPLES = 2  # the sweep's default --samples


def sweep_one(size: str, seq: int, batch: int, folder: Path) -> dict:
    """`bertopt sweep` of one shape; its row, export and the whole process tree's wall time and peak."""
    output = folder / f"{size}_seq{seq}_bs{batch}"
    argv = [sys.executable, "-m", "bertopt", "sweep", "--sizes", size, "--seq", str(seq), "--batch", str(batch),
            "--jobs", "1", "--output", str(output)]
    print(f"[{size}] seq {seq} batch {batch}", flush=True)
    [wall], [peak] = measure(argv, 1)
    summary = json.loads((output / "summary.json").read_text())
    [row] = summary["rows"]
    return {"row": row, "export": summary["exports"][size], "wall": wall, "tree_peak_mib": peak}


def validation_seconds(size: str, seq: int, batch: int, folder: Path) -> dict[int, float]:
    """`bertopt validate` of a swept shape's two models with 1 and with 2 batches."""
    shape = folder / f"{size}_seq{seq}_bs{batch}" / size
    times = {}
    for batches in (1, 2):
        print(f"[{size}] validate seq {seq} batch {batch}, {batches} batch(es)", flush=True)
        [wall], _ = measure([sys.executable, "-m", "bertopt", "validate", str(shape / "original.onnx"),
                             str(shape / f"seq{seq}_bs{batch}" / "optimized.onnx"), "--batch", str(batch),
                             "--seq", str(seq), "--samples", str(batches)], 1)
        times[batches] = wall
    return times


def spawn_seconds(repeat: int = 3) -> float:
    """What a shape pays before its own clock starts: the sweep's worker process, spawned and answering."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        Worker(os.getpid).outcome()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_validation(points: list[tuple[int, int, float]]) -> np.ndarray:
    """(a, b, c) of  a + batches * batch * (b * seq + c * seq^2)  over (seq, batch, seconds)."""
    rows = [[1.0, parity_batches(b, SAMPLES) * b * s, parity_batches(b, SAMPLES) * b * s * s] for s, b, _ in points]
    coefficients, *_ = np.linalg.lstsq(np.array(rows), np.array([t for _, _, t in points]), rcond=None)
    return coefficients


def predicted_validation(coefficients: np.ndarray, seq: int, batch: int) -> float:
    a, b, c = coefficients
    return a + parity_batches(batch, SAMPLES) * batch * (b * seq + c * seq * seq)


def fixed_seconds(row: dict) -> float:
    phases = row["phase_seconds"]
    return phases["load_and_passes"] + phases["save"] + phases["atc_and_conformance"]


def shape_table(size: str, results: list[dict]) -> str:
    lines = [f"| {SIZE_ALIASES.get(size, size)} seq x batch | parity batches | load + passes s | save s | validation s | "
             "shape s | sweep wall s | worker peak MiB | estimate MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        row = result["row"]
        phases = row["phase_seconds"]
        lines.append(f"| {row['seq']} x {row['batch']} | {row['parity_batches']} | {phases['load_and_passes']:.1f} "
                     f"| {phases['save']:.1f} | {phases['validation']:.1f} | {row['seconds']:.1f} "
                     f"| {result['wall']:.1f} | {row['peak_rss_mib']} | {row['estimate_mib']} |")
    return "\n".join(lines)


def matrix_estimate(size: str, results: list[dict], spawn: float) -> tuple[float, float, str]:
    """(export s, the 36 shapes' s, a line on the fit) for one size; each shape also pays `spawn`."""
    points = [(r["row"]["seq"], r["row"]["batch"], r["row"]["phase_seconds"]["validation"]) for r in results]
    coefficients = fit_validation(points)
    fixed = float(np.mean([fixed_seconds(r["row"]) for r in results]))
    shapes = sum(spawn + fixed + predicted_validation(coefficients, s, b) for s in MATRIX_SEQS for b in MATRIX_BATCHES)
    worst = max(abs(predicted_validation(coefficients, s, b) - t) / t for s, b, t in points)
    export = next(r["export"] for r in results if not r["export"]["cached"])
    note = (f"{SIZE_ALIASES.get(size, size)}: export {export['seconds']:.0f} s (peak {export['peak_rss_mib']} MiB), load + passes + save "
            f"+ conformance {fixed:.1f} s per shape (mean), validation fit a={coefficients[0]:.2f} s, "
            f"b={coefficients[1]:.2e}, c={coefficients[2]:.2e} (worst residual on the measured shapes "
            f"{worst:.0%}); 36 shapes {shapes / 60:.0f} min")
    return export["seconds"], shapes, note


def report(results: dict[str, list[dict]], compare: dict[str, tuple], spawn: float, command: str) -> str:
    text = ["## Sweep cost per shape and for the whole matrix (tools/bench_sweep.py)", "",
            f"Measured {time.strftime('%Y-%m-%d')} with `{command}`: one `bertopt sweep` per shape (`--jobs 1`, default pipeline, "
            f"--samples {SAMPLES}), each size's first shape with an empty export cache.",
            f"Machine: {environment()}.", ""]
    total = 0.0
    notes = []
    for size, rows in results.items():
        text += [shape_table(size, rows), ""]
        export, shapes, note = matrix_estimate(size, rows, spawn)
        total += export + shapes
        notes.append(f"- {note}")
    for size, ((seq, batch), times) in compare.items():
        notes.append(f"- {SIZE_ALIASES.get(size, size)} seq {seq} batch {batch}, `bertopt validate`: 1 batch {times[1]:.1f} s, "
                     f"2 batches {times[2]:.1f} s (measured; the rule runs 1 batch from batch 16 on)")
    notes.append(f"- a shape's worker process costs {spawn:.1f} s to start (measured, `bertopt.flow.sweep.Worker`), "
                 "beside its own clock")
    text += ["Extrapolated (not measured) from the shapes above:", *notes,
             f"- the seed's whole matrix (72 shapes, one at a time, exports included): "
             f"**{total / 3600:.1f} h** on this machine"]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="base,large")
    parser.add_argument("--shapes", help="SEQxBATCH,... for every size (default: per size, see SHAPES)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python tools/bench_sweep.py" + "".join(f" {a}" for a in sys.argv[1:])
    results, compare = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_sweep.") as scratch:
        folder = Path(scratch)
        for size in args.sizes.split(","):
            os.environ["BERTOPT_CACHE"] = str(folder / f"cache-{size}")  # the first export is a real one
            shapes = [tuple(int(v) for v in shape.split("x")) for shape in (args.shapes or SHAPES[size]).split(",")]
            results[size] = [sweep_one(size, seq, batch, folder) for seq, batch in shapes]
            seq, batch = COMPARE.get(size) if COMPARE.get(size) in shapes else shapes[-1]
            compare[size] = ((seq, batch), validation_seconds(size, seq, batch, folder))
    text = report(results, compare, spawn_seconds(), command)
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
