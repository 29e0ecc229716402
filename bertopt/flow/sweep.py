"""`bertopt sweep`: one model family over a matrix of static shapes, one folder per shape.

    <out>/sweep.json                          marks the folder as a sweep (what was asked)
    <out>/<size>/original.onnx                the export, once per size (from the export cache)
    <out>/<size>/seq<S>_bs<B>/optimized.onnx  the `default` pipeline frozen at that shape
                              atc.sh          the ATC command (run when atc exists)
                              result.json     the shape's row; written last, atomically
    <out>/summary.json, summary.md            one row per shape

Shapes run in spawned worker processes (a fresh one per job, so a finished job's memory goes back
to the system), never more at once than `jobs` nor than fit the memory budget. A shape with a
result.json is done and skipped on a re-run; a shape folder without one is redone from scratch.
A worker that dies (the OOM killer) costs only its own shape, an error row; Ctrl-C stops every
worker and removes the folders of the shapes they had not finished. bertopt.flow.sweep_ray runs the same
shapes as Ray tasks across machines, with the helpers below.

Parity is checked on at most `samples` batches, and on no more of them than it takes to hold
MIN_PARITY_ROWS rows: a static batch of 16 or more is checked on one batch (decision for issue 15:
every row of a batch goes through both graphs anyway, and the sweep's slowest shapes are the largest
batches, whose second batch doubled validation, the largest part of their cost).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from bertopt.errors import BertoptError, first_line
from bertopt.files import write_json, write_text

SIZE_ALIASES = {"base": "bert-base", "large": "bert-large"}
MARKER_NAME = "sweep.json"
RESULT_NAME = "result.json"
ORIGINAL_NAME = "original.onnx"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
GIB = 1 << 30
# Peak RSS of one shape job: the larger of optimizing (about 2.1x the weight bytes, its ONNX file) and
# validating (one ORT session at a time: about 2x the weights, plus activations led by the attention
# scores, batch x heads x seq^2 fp32, 6-8x their bytes at seq 256-512), over a Python + ORT floor.
# Fitted on the shapes tools/bench_sweep.py measured (BENCHMARKS.md) and rounded up, so that every
# measured peak is below its estimate: bert-base seq 512 batch 64 6028 MiB (estimate 7483),
# bert-large seq 384 batch 32 3919 MiB (estimate 5791). The former 6x-the-weights rule gave 2494 MiB
# to the first and 7650 MiB to every bert-large shape.
PEAK_FLOOR_BYTES = 300 << 20
PEAK_WEIGHTS_FACTOR = 2.5
PEAK_SCORES_FACTOR = 8.0
MIN_PARITY_ROWS = 16
# How long a stopped worker may take to clean up (its SIGTERM waits for a running ORT call to return)
# before it is killed.
STOP_GRACE_SECONDS = 5.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SweepConfig:
    sizes: tuple[str, ...]
    seqs: tuple[int, ...]
    batches: tuple[int, ...]
    output: Path
    jobs: int | None = None  # None: os.cpu_count()
    memory_budget_gib: float | None = None  # None: half of MemAvailable
    passes: str = "default"
    samples: int = 2
    soc: str | None = None
    cann: str | None = None  # None: the installed toolkit's version, else the seed's
    threads: int | None = None  # ONNX Runtime threads of validation; None: its default (every core)
    passes_from: tuple[str, ...] = ()  # --passes-from: files and modules the driver and every worker load
    image_size: int | None = None  # image models: square images of this size (None: the model's static size)
    frames: int | None = None  # audio models: input frames (None: the model's static count)


@dataclass(frozen=True)
class Shape:
    """One job: a size's export frozen at (seq, batch) into its own folder."""

    size: str
    seq: int
    batch: int
    original: Path
    folder: Path
    estimate: int  # bytes of peak memory expected
    passes: str
    samples: int
    soc: str
    soc_source: str
    cann: str
    cann_source: str
    threads: int | None = None
    passes_from: tuple[str, ...] = ()  # absolute file paths and module names: a Ray node must see the same
    image_size: int | None = None  # freeze-shapes' --image-size and --frames (None: the model's static size)
    frames: int | None = None


@dataclass
class SweepResult:
    rows: list[dict]
    passed: bool
    output: Path


# --------------------------------------------------------------------------- scheduling

def admits(running: list[int], estimate: int, budget: int, jobs: int) -> bool:
    """Whether a job of `estimate` bytes may start beside `running` ones (their estimates).

    A job larger than the whole budget still runs, alone: refusing it would stall the sweep.
    """
    if len(running) >= jobs:
        return False
    return not running or sum(running) + estimate <= budget


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes: what the kernel can give without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise BertoptError("/proc/meminfo has no MemAvailable; pass --memory-budget")


def peak_estimate(weights_bytes: int, heads: int, batch: int, seq: int) -> int:
    """Bytes one shape's job is expected to peak at (see PEAK_FLOOR_BYTES)."""
    scores = batch * heads * seq * seq * 4
    return int(PEAK_FLOOR_BYTES + PEAK_WEIGHTS_FACTOR * weights_bytes + PEAK_SCORES_FACTOR * scores)


def parity_batches(batch: int, samples: int) -> int:
    """How many batches the parity check runs: at most `samples`, and no more than reach MIN_PARITY_ROWS rows."""
    return max(1, min(samples, -(-MIN_PARITY_ROWS // batch)))


# --------------------------------------------------------------------------- the sweep

def sweep(config: SweepConfig, progress: Progress = lambda message: None) -> SweepResult:
    """Export each size once, run every shape not done before, then write the summary."""
    jobs, budget = _check_config(config)
    sizes = resolve_sizes(config.sizes)
    claim_output(config.output, config)
    prepared = {size: _prepare_size(size, name, config, progress) for size, name in sizes.items()}
    shapes = make_shapes(config, prepared)
    done, todo = split_done(shapes)
    progress(f"{len(shapes)} shape(s): {len(done)} done before, {len(todo)} to run "
             f"(at most {jobs} job(s) within {budget / GIB:.1f} GiB)")
    return finish(config, prepared, done + _run_all(todo, jobs, budget, progress))


def check_matrix(config: SweepConfig) -> None:
    """The numbers and the pipeline every sweep takes, local or on Ray; a bad one is one clear line
    before any work."""
    from bertopt.pipeline import load_passes, parse_spec

    if not config.sizes or not config.seqs or not config.batches:
        raise BertoptError("sweep needs at least one size, one seq and one batch")
    for value in config.batches:
        if value <= 0:
            raise BertoptError(f"--batch {value}: batch sizes must be positive")
    for value in config.seqs:
        if value <= 0:
            raise BertoptError(f"--seq {value}: sequence lengths must be positive")
    if config.samples <= 0:
        raise BertoptError(f"--samples {config.samples}: must be at least 1")
    if config.threads is not None and config.threads <= 0:
        raise BertoptError(f"--cpus-per-shape {config.threads}: must be at least 1")
    for flag, value in (("--image-size", config.image_size), ("--frames", config.frames)):
        if value is not None and value <= 0:
            raise BertoptError(f"{flag} {value}: must be positive")
    load_passes(*config.passes_from)
    parse_spec(config.passes, "ascend")


def _check_config(config: SweepConfig) -> tuple[int, int]:
    """(jobs, budget bytes) of the local sweep."""
    check_matrix(config)
    jobs = config.jobs if config.jobs is not None else (os.cpu_count() or 1)
    if jobs <= 0:
        raise BertoptError(f"--jobs {jobs}: must be at least 1")
    if config.memory_budget_gib is not None and config.memory_budget_gib <= 0:
        raise BertoptError(f"--memory-budget {config.memory_budget_gib}: must be positive (GiB)")
    budget = (int(config.memory_budget_gib * GIB) if config.memory_budget_gib is not None
              else available_memory() // 2)
    return jobs, budget


def resolve_sizes(sizes: tuple[str, ...]) -> dict[str, str]:
    """Folder name -> what the exporter takes (a preset or an HF folder); unknown names fail here."""
    from bertopt.flow.export import resolve_source  # imports torch: only when sweeping

    resolved = {}
    for size in sizes:
        name = SIZE_ALIASES.get(size, size)
        resolve_source(name)
        resolved[Path(size).name] = name
    return resolved


def claim_output(output: Path, config: SweepConfig) -> None:
    """Use an empty or new folder, or one that holds a sweep; never write into anything else."""
    marker = output / MARKER_NAME
    if output.exists() and not output.is_dir():
        raise BertoptError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not marker.is_file():
        raise BertoptError(f"--output {output}: holds files but no {MARKER_NAME}, so it is not a sweep folder; "
                           "choose another folder")
    write_json(marker, {"bertopt_sweep": 1, "last_request": {
        "sizes": list(config.sizes), "seqs": list(config.seqs), "batches": list(config.batches),
        "passes": config.passes, "passes_from": list(config.passes_from), "samples": config.samples,
        "image_size": config.image_size, "frames": config.frames}})


@dataclass(frozen=True)
class PreparedSize:
    original: Path
    weights_bytes: int
    max_positions: int | None
    heads: int
    seconds: float = 0.0  # the export's wall time (a cached one is a file link)
    cached: bool = False
    peak_rss_mib: int = 0  # the exporting process's high-water mark


def _prepare_size(size: str, name: str, config: SweepConfig, progress: Progress) -> PreparedSize:
    """Export (or link the cached export) in a spawned process, so torch's memory is not kept here."""
    progress(f"{size}: exporting {name} (cached by content)")
    worker = Worker(export_and_measure, name, config.output / size / ORIGINAL_NAME)
    try:
        prepared = worker.outcome()
    finally:  # on Ctrl-C: the worker ignores it
        stop_workers([worker])
    check_positions(size, prepared, config.seqs)
    return prepared


def check_positions(size: str, prepared: PreparedSize, seqs: tuple[int, ...]) -> None:
    too_long = [seq for seq in seqs if prepared.max_positions and seq > prepared.max_positions]
    if too_long:
        raise BertoptError(f"--seq {too_long[0]}: {size} has {prepared.max_positions} position embeddings")


def export_and_measure(name: str, path: Path) -> PreparedSize:
    """Worker: export `name` to `path`; read its position count from the graph (not from a config)."""
    from bertopt.flow.export import export_onnx, resolve_source
    from bertopt.graph import load_graph
    from bertopt.model.facts import detect_facts

    result = export_onnx(resolve_source(name), path)
    facts = detect_facts(load_graph(result.path))
    weights = sum(p.stat().st_size for p in result.path.parent.glob(result.path.name + "*"))
    return PreparedSize(result.path, weights, facts.max_positions, facts.heads, round(result.seconds, 2),
                        result.cached, peak_rss_mib())


def make_shapes(config: SweepConfig, prepared: dict[str, PreparedSize]) -> list[Shape]:
    from bertopt.ascend.cann import resolve_cann
    from bertopt.ascend.soc import detect_soc
    from bertopt.plugins import resolve_source

    soc, soc_source = detect_soc(config.soc)
    cann, cann_source = resolve_cann(config.cann)
    passes_from = tuple(resolve_source(source) for source in config.passes_from)
    return [Shape(size, seq, batch, info.original, config.output / size / f"seq{seq}_bs{batch}",
                  peak_estimate(info.weights_bytes, info.heads, batch, seq), config.passes, config.samples, soc,
                  soc_source, cann.version, cann_source, config.threads, passes_from, config.image_size, config.frames)
            for size, info in prepared.items() for seq in config.seqs for batch in config.batches]


def split_done(shapes: list[Shape]) -> tuple[list[dict], list[Shape]]:
    """(rows of the shapes whose result.json exists, the shapes still to run)."""
    done = [_done_row(shape) for shape in shapes if (shape.folder / RESULT_NAME).is_file()]
    return done, [shape for shape in shapes if not (shape.folder / RESULT_NAME).is_file()]


def _done_row(shape: Shape) -> dict:
    row = json.loads((shape.folder / RESULT_NAME).read_text())
    return dict(row, done_before=True)


def finish(config: SweepConfig, prepared: dict[str, PreparedSize], rows: list[dict]) -> SweepResult:
    """Sort the rows as asked and write summary.json and summary.md."""
    rows = _sorted_rows(rows, config)
    exports = {size: {"seconds": info.seconds, "cached": info.cached, "weights_bytes": info.weights_bytes,
                      "heads": info.heads, "peak_rss_mib": info.peak_rss_mib} for size, info in prepared.items()}
    _write_summary(config.output, rows, exports)
    return SweepResult(rows, all(row["status"] == "passed" for row in rows), config.output)


# --------------------------------------------------------------------------- worker processes

class WorkerDied(BertoptError):
    """A worker process ended without sending its outcome: killed (the OOM killer's SIGKILL) or crashed."""

    exit_code = 1


class Worker:
    """`target(*args)` in a fresh spawned process; what it returns or raises comes back through a pipe.

    Not a ProcessPoolExecutor: when one of a pool's processes dies, the pool breaks, terminates its
    other processes and fails every pending job, and cannot say which job killed it. A process of
    its own per job dies alone, and its exit code says how.

    Workers ignore Ctrl-C. The terminal sends SIGINT to the whole process group, and a worker
    raising KeyboardInterrupt by itself prints a traceback when it is hit while starting up; the
    interrupted sweep stops its workers itself (`stop_workers`).
    """

    def __init__(self, target: Callable, *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.results, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=_work, args=(sender, target, *args))
        with _sigint_ignored():  # an ignored signal stays ignored through exec: from the worker's first instruction
            self.process.start()
        sender.close()  # the worker now holds the only sending end, so its death reads as end-of-file here

    @property
    def pid(self) -> int:
        return self.process.pid

    def outcome(self) -> Any:
        """Wait for what `target` returned, or raise what it raised; WorkerDied when it sent nothing."""
        try:
            returned, value = self.results.recv()
        except EOFError:
            self.reap()
            raise WorkerDied(_death_note(self.process.exitcode)) from None
        self.reap()
        if not returned:
            raise value
        return value

    def reap(self) -> None:
        """Wait for the process to end (killing it after the grace period) and release the pipe."""
        self.process.join(STOP_GRACE_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.results.close()


def finished_workers(workers: Iterable[Worker]) -> list[Worker]:
    """Block until at least one of `workers` has sent its outcome or died; those that have."""
    by_pipe = {worker.results: worker for worker in workers}
    return [by_pipe[pipe] for pipe in multiprocessing.connection.wait(list(by_pipe))]


def stop_workers(workers: Iterable[Worker]) -> None:
    """End `workers` now: SIGTERM to all at once (each runs its `finally` blocks), then reap them."""
    workers = list(workers)
    for worker in workers:
        worker.process.terminate()
    for worker in workers:
        worker.reap()


def _work(sender: multiprocessing.connection.Connection, target: Callable, *args: Any) -> None:
    """Worker side: run `target` and send (returned, value); SIGTERM becomes SystemExit, which exits quietly."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        outcome = (True, target(*args))
    except Exception as exc:  # re-raised in the sweep
        outcome = (False, exc)
    try:
        sender.send(outcome)
    except BrokenPipeError:  # the sweep itself was killed; a result.json written is still the shape's
        pass


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile: a Ctrl-C in these few milliseconds is lost (press it again).

    Only the main thread may change it, and only there does Ctrl-C raise KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _death_note(exitcode: int) -> str:
    if exitcode < 0:
        how = f"killed by {signal.Signals(-exitcode).name}"
        how += ", e.g. by the OOM killer" if -exitcode == signal.SIGKILL else ""
    else:
        how = f"exit code {exitcode}"
    return f"worker process died ({how}); rerun the sweep to retry"


# --------------------------------------------------------------------------- running the shapes

def _run_all(shapes: list[Shape], jobs: int, budget: int, progress: Progress) -> list[dict]:
    """Start shapes in order whenever `admits` lets them; collect rows as they finish.

    Whatever ends this early (Ctrl-C), no worker outlives it and no unfinished shape folder stays.
    """
    pending, rows = list(shapes), []
    running: dict[Worker, Shape] = {}
    try:
        while pending or running:
            while pending and admits([s.estimate for s in running.values()], pending[0].estimate, budget, jobs):
                shape = pending.pop(0)
                worker = Worker(run_shape, shape)
                running[worker] = shape
                progress(f"{shape.size} seq {shape.seq} batch {shape.batch}: started (pid {worker.pid})")
            for worker in finished_workers(running):
                row = _collect(worker, running[worker])
                del running[worker]  # only now: a Ctrl-C while collecting still finds it in `running`
                progress(f"{row['size']} seq {row['seq']} batch {row['batch']}: {row['status']} "
                         f"({row['seconds']:.1f} s)")
                rows.append(row)
    finally:
        stop_workers(running)
        for shape in running.values():
            discard_unfinished(shape)
    return rows


def _collect(worker: Worker, shape: Shape) -> dict:
    """The worker's row, or an error row when the worker died (e.g. killed for memory) before sending one."""
    try:
        return worker.outcome()
    except WorkerDied as died:
        discard_unfinished(shape)
        return error_row(shape, str(died))


def error_row(shape: Shape, error: str, node: str | None = None) -> dict:
    """The row of a shape whose job ended without one of its own (killed, or lost with its node)."""
    return _row(shape, status="error", seconds=0.0, error=error, node=node)


def discard_unfinished(shape: Shape) -> None:
    """Remove what a stopped or dead worker was writing (e.g. a model half saved in a temporary folder)."""
    if not (shape.folder / RESULT_NAME).is_file():
        shutil.rmtree(shape.folder, ignore_errors=True)


def run_shape(shape: Shape, node: str | None = None) -> dict:
    """Worker: optimize, write atc.sh, validate, check conformance, then write result.json last.

    The folder is emptied first: whatever an interrupted run left there is not trusted.
    A parity failure is a verdict (kept); an exception is an error row without result.json (rerun).
    `node` names the machine (a Ray node) that ran it, for the summary.
    """
    start = time.perf_counter()
    shutil.rmtree(shape.folder, ignore_errors=True)
    shape.folder.mkdir(parents=True)
    try:
        row = _row(shape, seconds=0.0, node=node, **_evaluate(shape))
    except Exception as exc:  # recorded in the row; the sweep goes on
        return _row(shape, status="error", seconds=time.perf_counter() - start, error=first_line(exc), node=node)
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["peak_rss_mib"] = peak_rss_mib()
    write_json(shape.folder / RESULT_NAME, row)
    return row


def peak_rss_mib() -> int:
    """This process's high-water RSS; a spawned worker's starts at its parent's RSS when it forked."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class _Clock:
    """Wall seconds of consecutive phases, each named when it ends."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 2)
        self._last = now


def _evaluate(shape: Shape) -> dict:
    from bertopt.ascend.atc import AtcOptions, compile_om, in_work_dir
    from bertopt.ascend.cann import cann_target
    from bertopt.ascend.check import check_ascend
    from bertopt.flow.run import OM_PREFIX, OPTIMIZED_NAME, optimize_file
    from bertopt.pipeline import Instruments, PassManager, PassOptions, load_passes
    from bertopt.validation.candidates import run_candidates, validate_candidates

    load_passes(*shape.passes_from)  # a spawned worker or a Ray node starts with bertopt's and the entry points'
    optimized, target = shape.folder / OPTIMIZED_NAME, cann_target(shape.cann)
    options = PassOptions(batch=shape.batch, seq=shape.seq, image_size=shape.image_size, frames=shape.frames,
                          target="ascend", cann=target)
    manager = PassManager(shape.passes, options, Instruments(reproducer_dir=shape.folder / "reproducer"))
    clock = _Clock()

    def lap_before_saving(message: str) -> None:  # optimize_file says "saving" between the passes and the save
        if message.startswith("saving"):
            clock.lap("load_and_passes")

    graph, facts, records = optimize_file(shape.original, optimized, manager, lap_before_saving)
    clock.lap("save")
    options = AtcOptions(model=in_work_dir(OPTIMIZED_NAME), output=in_work_dir(OM_PREFIX), soc_version=shape.soc,
                         cann=target)
    atc = compile_om(shape.folder, options, shape.soc_source, shape.cann_source)
    conformance = check_ascend(graph, cann=target, soc=shape.soc)
    del graph  # before the two ORT sessions load the weights again
    gc.collect()  # a gs graph is a reference cycle: it goes only when the collector runs
    clock.lap("atc_and_conformance")
    batches = parity_batches(shape.batch, shape.samples)
    # a shape is judged on the optimized ONNX's parity alone (on ORT CPU, with the shape's threads)
    report = validate_candidates(shape.original, run_candidates(optimized, threads=shape.threads, cuda=False),
                                 facts, batch=shape.batch, seq=shape.seq, samples=batches, threads=shape.threads)[0]
    clock.lap("validation")
    comparison = report.comparison
    parity_max = max(o.max_abs for o in comparison.outputs) if comparison else None
    passed = report.passed is True and conformance.conforming
    return {"status": "passed" if passed else "failed",
            "passes_changed": [r.name for r in records if r.changed],
            "conforming": conformance.conforming, "fuses": conformance.fusion_predicted,
            "fusion_gates": conformance.fusion.failures(),
            "parity_max_abs": parity_max, "parity_passed": report.passed,
            "parity": comparison.summary_line() if comparison else report.error,
            "parity_batches": batches, "atc": atc.status, "phase_seconds": clock.phases}


def _row(shape: Shape, *, status: str, seconds: float, error: str | None = None, node: str | None = None,
         **fields) -> dict:
    base = {"size": shape.size, "seq": shape.seq, "batch": shape.batch, "status": status,
            "passes_changed": [], "conforming": None, "fuses": None, "fusion_gates": [], "parity_max_abs": None, "parity_passed": None,
            "parity": None, "atc": None, "error": error, "seconds": round(seconds, 2),
            "folder": str(shape.folder), "node": node, "estimate_mib": round(shape.estimate / (1 << 20)),
            "done_before": False}
    return dict(base, **fields)


# --------------------------------------------------------------------------- summary

def _sorted_rows(rows: list[dict], config: SweepConfig) -> list[dict]:
    order = [Path(size).name for size in config.sizes]
    return sorted(rows, key=lambda row: (order.index(row["size"]), row["seq"], row["batch"]))


def render_table(rows: list[dict]) -> str:
    """A Markdown table, one row per model: what the terminal shows and summary.md holds.

    A `node` column (the Ray node that ran the shape) appears when any row has one.
    """
    with_node = any(row.get("node") for row in rows)
    lines = ["| size | seq | batch | passes changed | conforming | ATC fuses | parity max abs | parity | status "
             "| seconds |" + (" node |" if with_node else ""),
             "|---|---:|---:|---|---|---|---:|---|---|---:|" + ("---|" if with_node else "")]
    for row in rows:
        parity = {True: "PASSED", False: "FAILED", None: "-"}[row["parity_passed"]]
        worst = "-" if row["parity_max_abs"] is None else f"{row['parity_max_abs']:.2e}"
        status = row["status"] + (" (done before)" if row["done_before"] else "")
        status += f": {row['error']}" if row.get("error") else ""
        line = (f"| {row['size']} | {row['seq']} | {row['batch']} | {len(row['passes_changed'])} "
                f"| {_yes_no(row['conforming'])} | {_yes_no(row.get('fuses'))} | {worst} | {parity} | {status} "
                f"| {row['seconds']:.1f} |")
        lines.append(line + (f" {row.get('node') or '-'} |" if with_node else ""))
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def _write_summary(output: Path, rows: list[dict], exports: dict[str, dict]) -> None:
    passed = sum(row["status"] == "passed" for row in rows)
    write_json(output / SUMMARY_JSON, {"passed": passed == len(rows), "counts": {
        "shapes": len(rows), "passed": passed, "done_before": sum(row["done_before"] for row in rows)},
        "exports": exports, "rows": rows})
    write_text(output / SUMMARY_MD, f"# bertopt sweep\n\n{passed} of {len(rows)} shape(s) passed.\n\n"
                                    f"{render_table(rows)}\n")
