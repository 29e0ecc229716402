"""Wall time and peak memory of bertopt's pipeline beside the floor and the tools it replaces.

    .venv/bin/python tools/bench_pipeline.py                       # base and large, 3 runs each
    .venv/bin/python tools/bench_pipeline.py --sizes base --repeat 1 --no-write
    .venv/bin/python tools/bench_pipeline.py --baseline ab0c60e    # also bertopt as of that commit

Each measurement is a separate process (its peak RSS comes from the kernel via wait4), repeated and
reported as the median; the tools take turns (one run of each per round), so a burst of load from
the other users of the machine falls on all of them. Dirty pages are flushed (untimed) before each
run, so no run pays for writing back its predecessor's output. bertopt runs from compiled bytecode, as
installed (compile_bytecode). Measured per size, on the legacy opset-14 export at the given batch/seq:

- copy floor: `cat IN > OUT && sync`, copying the file and waiting for it to reach the disk;
- floor:      onnx.load + onnx.save of the dynamic export (what any whole-model tool pays);
- bertopt:    `bertopt optimize` with the `default` pipeline (alone, and followed by `sync` like the
              copy) and with `freeze-shapes` alone;
- onnxsim:    onnxsim.simplify with fixed input shapes (the seed's way of freezing shapes);
- ORT:        onnxruntime.transformers optimize_model(model_type="bert") on the dynamic export.

A start-up table follows: what a process pays to import each library bertopt stands on, and bertopt's
own pipeline module (what `optimize`, and `run` on an ONNX file, import; `run` imports torch and
transformers only to export a checkpoint), each in a fresh process.

The tables go into BENCHMARKS.md between this tool's markers, with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- bench_pipeline:begin -->", "<!-- bench_pipeline:end -->"
PRESETS = {"tiny": "bert-tiny", "base": "bert-base", "large": "bert-large"}

COPY_FLOOR = "cat IN > OUT && sync (copy floor)"
LOAD_SAVE_FLOOR = "onnx.load + onnx.save (floor)"
FLOOR = "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
ONNXSIM = """import onnx, onnxsim, sys
batch, seq = int(sys.argv[3]), int(sys.argv[4])
model = onnx.load(sys.argv[1])
shapes = {i.name: [batch, seq] for i in model.graph.input}
model, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
assert ok
onnx.save(model, sys.argv[2])"""
# Starts argv[2:], waits for it, writes "<wall seconds> <peak RSS KiB>" to argv[1]; exits with its code.
LAUNCHER = """import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{time.perf_counter() - start} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))"""
# bertopt optimize's steps, timed in one process: where the time goes, verification's share included.
PHASES = """import json, sys, time
from bertopt.model.facts import detect_facts
from bertopt.graph import load_graph, save_graph
from bertopt.pipeline import PassManager, PassOptions
batch, seq = int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
graph = load_graph(sys.argv[1])
facts = detect_facts(graph)
loaded = time.perf_counter()
_, records = PassManager("default", PassOptions(batch=batch, seq=seq)).run(graph, facts)
passed = time.perf_counter()
save_graph(graph, sys.argv[2])
print(json.dumps({"load": loaded - start, "passes": passed - loaded, "save": time.perf_counter() - passed,
                  "per_pass": {r.name: [r.seconds, r.verify_seconds] for r in records}}))"""
ORT_OPTIMIZER = """import sys
from onnxruntime.transformers.optimizer import optimize_model
optimize_model(sys.argv[1], model_type="bert", num_heads=int(sys.argv[3]), hidden_size=int(sys.argv[4])
               ).save_model_to_file(sys.argv[2])"""


@dataclass
class Measurement:
    tool: str
    seconds: list[float]
    peak_mib: list[float]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_mib(self) -> float:
        return statistics.median(self.peak_mib)


def measure_in_turns(cases: dict[str, list[str]], repeat: int, label: str) -> list[Measurement]:
    """Run every case once per round, `repeat` rounds; wall seconds and peak RSS of each run."""
    results = {tool: Measurement(tool, [], []) for tool in cases}
    for round_number in range(repeat):
        for tool, argv in cases.items():
            print(f"[{label}] round {round_number + 1}/{repeat}: {tool}", flush=True)
            seconds, peak = measure_once(argv)
            results[tool].seconds.append(seconds)
            results[tool].peak_mib.append(peak)
    return list(results.values())


def measure(argv: list[str], repeat: int) -> tuple[list[float], list[float]]:
    """Run `argv` `repeat` times; wall seconds and peak RSS (MiB) of each run."""
    runs = [measure_once(argv) for _ in range(repeat)]
    return [seconds for seconds, _ in runs], [peak for _, peak in runs]


def measure_once(argv: list[str]) -> tuple[float, float]:
    """Run `argv` once after flushing dirty pages; its wall seconds and peak RSS (MiB).

    The run is started by a small launcher process (LAUNCHER), not by this one: Linux carries the
    high-water RSS of the process that forks across the child's exec, so a child of this process,
    which may hold an exported bert-large, would report this process's peak instead of its own.
    """
    os.sync()
    with tempfile.TemporaryFile() as errors, tempfile.NamedTemporaryFile("r") as report:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, report.name, *argv], stdout=subprocess.DEVNULL,
                              stderr=errors)
        if done.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"failed: {' '.join(argv)}\n{errors.read().decode()[-2000:]}")
        wall, peak_kib = report.read().split()
    return float(wall), int(peak_kib) / 1024


def export(size: str, folder: Path) -> Path:
    from bertopt.flow.export import export_onnx, resolve_source

    return export_onnx(resolve_source(PRESETS[size]), folder / f"bert_{size}.onnx").path


def bench_size(size: str, batch: int, seq: int, repeat: int, folder: Path,
               baseline: Path | None = None) -> list[Measurement]:
    from bertopt.graph import load_graph
    from bertopt.model.facts import detect_facts

    model = export(size, folder)
    facts = detect_facts(load_graph(model))
    out = str(folder / "out.onnx")
    python = sys.executable
    # --no-parity: the passes' job alone (fix_onnx.py's); the default adds ONNX Runtime running both graphs once
    checked = [python, "-m", "bertopt", "optimize", str(model), "--batch", str(batch), "--seq", str(seq),
               "--output", out, "--force", "--passes"]
    optimize = [*checked[:-1], "--no-parity", "--passes"]
    cases = {
        COPY_FLOOR: ["sh", "-c", 'cat "$1" > "$2" && sync', "sh", str(model), out],
        LOAD_SAVE_FLOOR: [python, "-c", FLOOR, str(model), out],
        "bertopt optimize --passes default --no-parity": [*optimize, "default"],
        "bertopt optimize --passes default --no-parity, then sync": ["sh", "-c", '"$@" && sync', "sh", *optimize,
                                                                     "default"],
        # --target ort: freeze-shapes alone leaves opset 14, which ATC's legality check (exit 1) refuses
        "bertopt optimize --passes freeze-shapes --target ort --no-parity": [*optimize, "freeze-shapes", "--target",
                                                                             "ort"],
        "bertopt optimize --passes default (its parity check included)": [*checked, "default"],
    }
    if baseline is not None:  # the same command on an earlier source tree: what a change gained
        # -P: the working directory (a checkout holding bertopt/) must not come before PYTHONPATH
        cases[f"bertopt optimize --passes default, as of {baseline.name.removeprefix('bertopt-')}"] = [
            "env", f"PYTHONPATH={baseline}", python, "-P", *[a for a in optimize[1:] if a != "--no-parity"], "default"]
    cases["onnxsim 0.8.1 (fixed shapes)"] = [python, "-c", ONNXSIM, str(model), out, str(batch), str(seq)]
    cases["ORT optimize_model(bert), dynamic"] = [python, "-c", ORT_OPTIMIZER, str(model), out,
                                                  str(facts.heads), str(facts.hidden)]
    return measure_in_turns(cases, repeat, size)


def baseline_tree(revision: str, folder: Path) -> Path:
    """bertopt's sources as of a git revision, laid out as installed (passes/ is bertopt.passes), for
    PYTHONPATH: the installed packages are shared, only bertopt's own code differs."""
    tree = folder / f"bertopt-{revision}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (tree / "bertopt" / "passes").symlink_to(tree / "passes")
    return tree


def compile_bytecode(trees: list[Path]) -> None:
    """Measured processes import bertopt from compiled bytecode, as an installed copy does (pip compiles
    it when installing; the other packages here have theirs). A PYTHONDONTWRITEBYTECODE in the
    environment would make every run compile bertopt's sources again (0.1 s), so it is dropped for the
    measured processes, and each tree is compiled first (into its __pycache__ folders, which git ignores)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for tree in trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "bertopt"), str(tree / "passes")],
                       check=True, stdout=subprocess.DEVNULL)


def phases(size: str, batch: int, seq: int, folder: Path) -> str:
    """One in-process `default` run split into load, each pass (its verification apart), save.

    The previous tool's output is deleted and flushed first: the save then measures writing the model,
    not freeing (or waiting on the write-back of) the file it replaces.
    """
    (folder / "out.onnx").unlink(missing_ok=True)
    os.sync()
    done = subprocess.run([sys.executable, "-c", PHASES, str(export(size, folder)), str(folder / "out.onnx"),
                           str(batch), str(seq)], capture_output=True, text=True, check=True)
    times = json.loads(done.stdout.splitlines()[-1])
    total = times["load"] + times["passes"] + times["save"]
    verify = sum(v for _, v in times["per_pass"].values())
    rows = [f"| bert-{size}, one run | seconds | share |", "|---|---:|---:|",
            f"| load | {times['load']:.2f} | {times['load'] / total:.0%} |"]
    rows += [f"| {name} (its verification {v:.2f} s) | {s + v:.2f} | {(s + v) / total:.0%} |"
             for name, (s, v) in times["per_pass"].items()]
    other = times["passes"] - sum(s + v for s, v in times["per_pass"].values())
    rows += [f"| between passes (snapshot kept for reproducers, facts refresh) | {other:.2f} | {other / total:.0%} |",
             f"| save | {times['save']:.2f} | {times['save'] / total:.0%} |",
             f"| **verification after every pass, in all** | **{verify:.2f}** | **{verify / total:.0%}** |"]
    return "\n".join(rows)


# What a process imports, heaviest last; bertopt.flow.run is the pipeline `optimize` and `run` load.
STARTUP_MODULES = ["ml_dtypes", "onnx", "onnx_graphsurgeon", "onnxruntime", "bertopt.flow.run", "torch",
                   "transformers"]


def startup(repeat: int) -> str:
    """Wall seconds and peak RSS of a fresh Python process that imports one module, beside one that imports
    nothing: start-up is the fixed cost every bertopt command pays, and bert-base's ratio to its copy is
    mostly that."""
    cases = {"python -c pass": [sys.executable, "-c", "pass"]}
    cases |= {f"import {module} ({_version(module)})": [sys.executable, "-c", f"import {module}"]
              for module in STARTUP_MODULES}
    rows = ["| start-up | wall s (median) | peak RSS MiB (median) |", "|---|---:|---:|"]
    rows += [f"| {m.tool} | {m.median_seconds:.2f} | {m.median_mib:.0f} |"
             for m in measure_in_turns(cases, repeat, "start-up")]
    return "\n".join(rows)


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.split(".")[0].replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


def table(size: str, results: list[Measurement]) -> str:
    copy, floor = (next(m for m in results if m.tool == tool) for tool in (COPY_FLOOR, LOAD_SAVE_FLOOR))
    rows = [f"| bert-{size} | tool | wall s (median) | x copy | x load+save | peak RSS MiB (median) | x load+save |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for m in results:
        rows.append(f"| | {m.tool} | {m.median_seconds:.2f} | {m.median_seconds / copy.median_seconds:.2f} | "
                    f"{m.median_seconds / floor.median_seconds:.2f} | {m.median_mib:.0f} | "
                    f"{m.median_mib / floor.median_mib:.2f} |")
    return "\n".join(rows)


def environment() -> str:
    import onnx
    import onnxruntime
    import onnxsim
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}; "
            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, onnxsim {onnxsim.__version__}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def _load_average() -> str:
    """The 1, 5 and 15 minute load averages (`uptime`): the machine is shared."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def write_section(text: str, begin: str = BEGIN, end: str = END, path: Path = BENCHMARKS) -> None:
    """Replace the text between `begin` and `end` in `path` (tools/bench_models.py has its own markers);
    append the section when the markers are absent."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="base,large")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--baseline", metavar="REVISION", help="also measure `optimize` as of this git revision, "
                        "in turn with the others: what a change gained")
    args = parser.parse_args()
    load = _load_average()
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        baseline = baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
        compile_bytecode([REPO] + ([baseline] if baseline else []))
        for size in args.sizes.split(","):
            sections.append(table(size, bench_size(size, args.batch, args.seq, args.repeat, Path(tmp), baseline)))
            sections.append(phases(size, args.batch, args.seq, Path(tmp)))
        sections.append(startup(args.repeat))
    command = "python tools/bench_pipeline.py " + " ".join(sys.argv[1:])
    text = (f"## Pipeline cost (tools/bench_pipeline.py)\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} with "
            f"`{command.strip()}`: legacy opset-14 export, batch {args.batch}, seq {args.seq}, median of "
            f"{args.repeat} separate processes each, the tools taking turns; load average before: {load}, "
            f"after: {_load_average()}.\nMachine: {environment()}.\n\n" + "\n\n".join(sections))
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
