"""Numeric validation against the original graph (ONNX Runtime fp32, the reference).

Three ways in, one comparator (bertopt.validation.parity.compare_outputs, Polygraphy's rules):

- `validate_candidates`: live candidates (optimized ONNX, Ascend emulation, the OM on an NPU; a run's
  are made by `run_candidates`) run on the same realistic feeds as the reference;
- `validate_results`: an ais_bench results folder from another machine, together with the input
  folders it was fed;
- `write_inputs`: realistic inputs in that layout, to feed ais_bench.

The ais_bench layout, as its source writes it (``Ascend/tools`` ``ais-bench_workload/tool/ais_bench/
ais_bench/infer/``: ``io_oprations.py`` get_narray_from_files_list / save_tensors_to_file, ``utils.py``,
``summary.py``, ``__main__.py``; the ait/msit benchmark component's copies are the same):

- inputs ``DIR/<input name>/<idx>.npy`` (``[1, seq]`` each here), one folder per OM input, bound to the
  inputs by position (``--input a,b,c``); files in natural order (numbers as integers, text lower-cased);
  a batch is as many files as fit the OM input's bytes, concatenated;
- a last partial batch is filled with copies of that batch's first file (not zeros), and no output is
  written for those rows;
- outputs ``<output>/<output_dirname>/<stem>_<output index>.npy`` (``--outfmt NPY``), ``<stem>`` being the
  sample's first input file name cut at its first dot; ``<output>/<output_dirname>_summary.json`` beside the
  folder holds throughput and timings; with several devices (``--device 0,1``) each device writes
  ``<output_dirname>/device<N>/`` and ``device<N>_summary.json`` for its share of the inputs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bertopt.ascend.atc import gelu_impls_from
from bertopt.errors import BertoptError
from bertopt.files import new_folder
from bertopt.graph import load_graph, static_dim
from bertopt.model.facts import ModelFacts, detect_facts
from bertopt.validation.backends import Backend, Skipped
from bertopt.validation.backends.emulation import EmulationBackend
from bertopt.validation.backends.npu import om_backend
from bertopt.validation.backends.ort import OrtBackend, ort_backends
from bertopt.validation.parity import (Comparison, InputSpecs, OrtRunner, compare_outputs, graph_only, input_specs_of,
                                       kept_tokens, realistic_feeds, tolerances)

RESULT_FILE = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)\.npy$")
DEVICE_FOLDER = re.compile(r"^device(?P<id>\d+)$")
SUMMARY_SUFFIX = "_summary.json"
MAX_LISTED = 5


@dataclass
class CandidateReport:
    """One candidate's verdict: a comparison, or why there is none (skipped, or it failed to run).

    `performance` holds what ais_bench's summaries say about an ais_bench results folder (one entry per
    device: throughput, NPU compute time; see AisBenchSummary); it is empty for other candidates.
    """

    name: str
    kind: str
    comparison: Comparison | None = None
    skipped: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    performance: list[dict] = field(default_factory=list)
    informational: bool = False  # shown for comparison, never the run's verdict

    @property
    def passed(self) -> bool | None:
        """True/False for a verdict; None when the candidate was skipped."""
        if self.skipped:
            return None
        return self.comparison is not None and self.comparison.passed

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "informational": self.informational,
                "passed": self.passed, "skipped": self.skipped,
                "error": self.error, "notes": self.notes, "performance": self.performance}
        if self.comparison is not None:
            data.update(self.comparison.to_dict())
        return data


# --------------------------------------------------------------------------- the candidates of a run

OPTIMIZED_LABEL = "optimized ONNX fp32"


@dataclass(frozen=True)
class AscendCandidates:
    """What the ascend target adds to a run's candidates: the emulation of the Gelu kernel atc is asked for
    (`gelu`, under atc's `precision` mode, None for ATC's default, for CANN `cann`), the other kernel beside
    it, and the OM (`om`, None where atc did not run) on NPU `device`, its outputs bound by position to
    `output_names` (the graph's; an OM names its own "<op>:<index>:<name>")."""

    gelu: str
    precision: str | None
    cann: str
    om: Path | None = None
    device: int = 0
    output_names: Sequence[str] | None = None


def run_candidates(optimized: Path, ascend: AscendCandidates | None = None, *, threads: int | None = None,
                   cuda: bool = True) -> list[Backend | Skipped]:
    """A run's candidates in the order they are reported: the optimized ONNX in fp32 first (its verdict is the
    run's parity) on ORT CPU and, with `cuda`, on ORT CUDA where ONNX Runtime has it; then, for the ascend
    target, the emulations (`emulation_candidates`) and the OM, or why it cannot run here."""
    found: list[Backend | Skipped] = (
        list(ort_backends(optimized, OPTIMIZED_LABEL, threads=threads)) if cuda
        else [OrtBackend(optimized, name=f"{OPTIMIZED_LABEL} (ORT CPU)", threads=threads)])
    if ascend is None:
        return found
    found += emulation_candidates(optimized, ascend.gelu, precision=ascend.precision, cann=ascend.cann,
                                  threads=threads)
    found.append(om_backend(ascend.om, ascend.device, output_names=ascend.output_names))
    return found


def emulation_candidates(optimized: Path, gelu: str, *, precision: str | None = None, cann: str | None = None,
                         threads: int | None = None, others_informational: bool = True) -> list[EmulationBackend]:
    """The Ascend emulation of each Gelu kernel atc offers, `gelu` (the one atc is asked for) first; the others
    are informational, the evidence for choosing one (a run's validation; its SQuAD check scores them all
    alike: `others_informational=False`)."""
    return [EmulationBackend(optimized, gelu=impl, precision=precision, cann=cann, threads=threads,
                             informational=others_informational and index > 0)
            for index, impl in enumerate(gelu_impls_from(gelu))]


# --------------------------------------------------------------------------- live candidates

def validate_candidates(reference: Path, candidates: list[Backend | Skipped], facts: ModelFacts, *,
                        batch: int, seq: int, samples: int = 2, seed: int = 0,
                        atol: dict[str, float] | None = None, rtol: dict[str, float] | None = None,
                        threads: int | None = None) -> list[CandidateReport]:
    """Run the reference once on realistic feeds, then every candidate on the same feeds, in order.

    One model session is alive at a time, so the peak memory is one model's, not the sum of all:
    the reference runs on every feed and its session is released before any candidate runs (only its
    outputs are kept); each candidate builds its session on its first `run` (backends are lazy, see
    bertopt.validation.backends) and is closed once it has run on every feed, before the next one starts. A
    candidate that fails to build or to run is reported with its error, and the others still run.

    `atol`/`rtol` map a candidate kind to its tolerance; kinds they leave out get the defaults.
    """
    specs = input_specs_of(graph_only(reference))
    feeds = realistic_feeds(facts, specs, batch=batch, seq=seq, seed=seed, count=samples)
    expected = _reference_outputs(reference, feeds, threads)
    masks = _masks(facts, feeds)
    return [_check(candidate, feeds, expected, masks, atol or {}, rtol or {}) for candidate in candidates]


def _reference_outputs(reference: Path, feeds: list[dict], threads: int | None) -> list[dict]:
    """The reference's outputs on every feed; its session goes when this returns."""
    try:
        runner = OrtRunner(reference, threads=threads)
        return [runner.run(feed) for feed in feeds]
    except BertoptError as exc:
        raise BertoptError(f"{reference}: {exc}") from None


def _check(candidate: Backend | Skipped, feeds: list[dict], expected: list[dict], masks,
           atol: dict[str, float], rtol: dict[str, float]) -> CandidateReport:
    if isinstance(candidate, Skipped):
        return CandidateReport(candidate.name, candidate.kind, skipped=candidate.reason)
    report = CandidateReport(candidate.name, candidate.kind, informational=candidate.informational)
    try:
        actual = [candidate.run(feed) for feed in feeds]
        if isinstance(candidate, EmulationBackend):
            report.notes = candidate.notes + [n for n in [candidate.padding_row_check(feeds[0])] if n]
    except BertoptError as exc:
        report.error = str(exc)
        return report
    finally:
        candidate.close()
    tol_a, tol_r = tolerances(candidate.kind, atol.get(candidate.kind), rtol.get(candidate.kind))
    report.comparison = compare_outputs(expected, actual, atol=tol_a, rtol=tol_r, masks=masks)
    return report


def _masks(facts: ModelFacts, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray] | None:
    """Which tokens each feed keeps (an additive mask keeps its zeros), for the answer-span agreement."""
    kept = [kept_tokens(facts, feed) for feed in feeds]
    return None if kept[0] is None else kept


# --------------------------------------------------------------------------- ais_bench folders

def write_inputs(facts: ModelFacts, specs: InputSpecs, output: Path, *, batch: int, seq: int, count: int,
                 seed: int = 0) -> list[Path]:
    """`count` realistic samples as ``output/<input name>/<idx>.npy`` (``[1, seq]`` each).

    Rows come from batches of `batch` (so padded and full rows mix as in real data). The folder
    appears whole or not at all, and an existing one is never touched.
    """
    if output.exists():
        raise BertoptError(f"--output {output} already exists; choose a new folder")
    if batch < 1 or count < 1:
        raise BertoptError(f"--batch and --count must be >= 1 (got {batch}, {count})")
    batches = realistic_feeds(facts, specs, batch=batch, seq=seq, seed=seed, count=math.ceil(count / batch))
    with new_folder(output) as staging:
        for name in specs:
            rows = np.concatenate([feed[name] for feed in batches])[:count]
            (staging / name).mkdir()
            for index, row in enumerate(rows):
                np.save(staging / name / f"{index}.npy", row[None, :])
    return [output / name for name in specs]


def natural_key(text: str) -> list:
    """'10' after '9', text lower-cased: how ais_bench orders its input files (utils.natural_sort)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def output_stem(file_name: str) -> str:
    """What ais_bench calls a sample's outputs: its first input file's name cut at the first dot
    (``12.npy`` -> ``12``, ``a.b.npy`` -> ``a``; io_oprations.save_tensors_to_file)."""
    return file_name.split(".", 1)[0]


def read_inputs(folder: Path, specs: InputSpecs) -> tuple[list[str], dict[str, np.ndarray]]:
    """(output stems of the samples in ais_bench's order, input name -> ``[samples, seq]``) from
    ``folder/<name>/``; every input folder must hold files of the same names."""
    if not folder.is_dir():
        raise BertoptError(f"--inputs {folder}: no such folder")
    names: list[str] | None = None
    arrays: dict[str, np.ndarray] = {}
    for name in specs:
        sub = folder / name
        if not sub.is_dir():
            raise BertoptError(f"--inputs {folder}: no folder {name}/ for model input {name}")
        found = sorted((p.name for p in sub.glob("*.npy")), key=natural_key)
        if not found:
            raise BertoptError(f"--inputs {sub}: no .npy files")
        if names is not None and found != names:
            raise BertoptError(f"--inputs {folder}: {name}/ holds other samples than {next(iter(specs))}/ "
                               f"({_listed(sorted(set(found) ^ set(names)))})")
        names = found
        arrays[name] = _stack_rows(sub, found, specs[name][0])
    return _output_stems(folder, names), arrays


def _output_stems(folder: Path, file_names: list[str]) -> list[str]:
    """Output stems, refusing two files ais_bench would write to the same outputs."""
    seen: dict[str, str] = {}
    for file_name in file_names:
        stem = output_stem(file_name)
        if stem in seen:
            raise BertoptError(f"--inputs {folder}: {seen[stem]} and {file_name} would both have outputs "
                               f"{stem}_<n>.npy (ais_bench names them by the input file's name up to its "
                               f"first dot); rename one")
        seen[stem] = file_name
    return list(seen)


def _stack_rows(folder: Path, file_names: list[str], dtype: np.dtype) -> np.ndarray:
    rows = [_load(folder / file_name) for file_name in file_names]
    shape = rows[0].shape
    for file_name, row in zip(file_names, rows):
        if row.ndim != 2 or row.shape[0] != 1 or row.shape != shape:
            raise BertoptError(f"{folder / file_name}: shape {list(row.shape)}; expected [1, seq] like "
                               f"{folder / file_names[0]} {list(shape)}")
        if not np.issubdtype(row.dtype, np.integer) and not np.issubdtype(dtype, np.floating):
            raise BertoptError(f"{folder / file_name}: dtype {row.dtype}; expected integers")
    return np.concatenate(rows).astype(dtype, copy=False)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BertoptError(f"{path}: not a readable .npy file ({type(exc).__name__})") from None


def result_folders(folder: Path) -> list[Path]:
    """The folders holding ``<stem>_<index>.npy`` files: `folder` itself, its ``device<N>/`` folders (a
    run on several devices, ``--device 0,1``: each device got a share of the inputs and wrote its own
    folder), or either of those inside its one ais_bench subfolder (``result/`` -> ``result/result_bs8``)."""
    if not folder.is_dir():
        raise BertoptError(f"--results {folder}: no such folder")
    own = _result_set(folder)
    if own:
        return own
    nested = {sub: found for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if (found := _result_set(sub))}
    if len(nested) == 1:
        return next(iter(nested.values()))
    if not nested:
        raise BertoptError(f"--results {folder}: no <sample>_<output>.npy files (ais_bench --outfmt NPY)")
    raise BertoptError(f"--results {folder}: several result folders ({_listed(sub.name for sub in nested)}); "
                       f"pass one of them")


def _result_set(folder: Path) -> list[Path]:
    if _has_results(folder):
        return [folder]
    devices = [p for p in folder.iterdir() if p.is_dir() and DEVICE_FOLDER.match(p.name) and _has_results(p)]
    return sorted(devices, key=lambda p: int(DEVICE_FOLDER.match(p.name)["id"]))


def _has_results(folder: Path) -> bool:
    return any(RESULT_FILE.match(p.name) for p in folder.glob("*.npy"))


def read_results(folder: Path, stems: list[str], output_names: list[str],
                 row_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Output name -> ``[samples, ...]`` from the ``<stem>_<index>.npy`` files (of every device), each
    checked. A padded row of a last partial batch has no file: ais_bench skips it when writing."""
    folders = result_folders(folder)
    by_key, extra = _indexed_results(folder, folders)
    _check_output_count(folder, by_key, len(output_names))
    wanted = {(stem, index) for stem in stems for index in range(len(output_names))}
    extra += [by_key[key].name for key in set(by_key) - wanted]
    missing = [f"{stem}_{index}.npy" for stem, index in sorted(wanted - set(by_key), key=_key_order)]
    if missing:
        raise BertoptError(f"--results {folder}: missing {len(missing)} file(s) for the given inputs: "
                           f"{_listed(missing)}")
    if extra:
        raise BertoptError(f"--results {folder}: {len(extra)} file(s) match no input sample: {_listed(sorted(extra))}")
    return {name: _stack_results(by_key, stems, index, row_shapes[name])
            for index, name in enumerate(output_names)}


def _indexed_results(folder: Path, folders: list[Path]) -> tuple[dict[tuple[str, int], Path], list[str]]:
    """(stem, output index) -> file over all result folders, and the names of .npy files that are not results."""
    by_key: dict[tuple[str, int], Path] = {}
    extra: list[str] = []
    for sub in folders:
        for path in sub.glob("*.npy"):
            match = RESULT_FILE.match(path.name)
            if not match:
                extra.append(path.name)
                continue
            key = (match["stem"], int(match["index"]))
            if key in by_key:
                raise BertoptError(f"--results {folder}: {path.name} is in both {by_key[key].parent.name}/ and "
                                   f"{sub.name}/")
            by_key[key] = path
    return by_key, extra


def _key_order(key: tuple[str, int]) -> tuple:
    return natural_key(key[0]), key[1]


def _check_output_count(folder: Path, by_key: dict, expected: int) -> None:
    """An output index the model lacks, or every sample one output short, is a count mismatch;
    a file missing here and there is left to the missing-file check, which names it."""
    per_sample: dict[str, int] = {}
    for stem, index in by_key:
        per_sample[stem] = max(per_sample.get(stem, 0), index + 1)
    counts = set(per_sample.values())
    if counts and max(counts) != expected:
        raise BertoptError(f"--results {folder}: files hold {'/'.join(map(str, sorted(counts)))} output(s) "
                           f"per sample; the model has {expected}")


def _stack_results(by_key: dict[tuple[str, int], Path], stems: list[str], index: int,
                   row_shape: tuple) -> np.ndarray:
    rows = []
    for stem in stems:
        path = by_key[(stem, index)]
        row = _load(path)
        if row.shape != row_shape:
            raise BertoptError(f"{path}: shape {list(row.shape)}; the reference gives {list(row_shape)} per sample")
        rows.append(row)
    return np.concatenate(rows)


def _listed(items) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


@dataclass(frozen=True)
class AisBenchSummary:
    """What ais_bench's ``<output>/<dirname>_summary.json`` says about one run (summary.py ``report``).

    Times are milliseconds. ``NPU_compute_time`` is the model execution of one batch (``aclmdlExecute``
    timed in ModelInferenceProcessor::Execute), without the host-device copies ``H2D_latency`` and
    ``D2H_latency`` time. ``throughput`` is ais_bench's own ``1000 * batch size / mean NPU_compute_time``:
    samples per second of execution, a padded last batch counted as full.
    """

    path: Path
    throughput: float
    npu_compute_ms: dict[str, float]
    h2d_ms: dict[str, float] | None
    d2h_ms: dict[str, float] | None
    batch: int | None  # from ``--batchsize`` in the run's recorded arguments, when it was given

    def to_dict(self) -> dict:
        return {"summary": str(self.path), "throughput": self.throughput, "batch": self.batch,
                "npu_compute_ms": self.npu_compute_ms, "h2d_ms": self.h2d_ms, "d2h_ms": self.d2h_ms}

    def line(self) -> str:
        npu = self.npu_compute_ms
        return (f"ais_bench {self.path.name}: throughput {self.throughput:.1f} samples/s (ais_bench's 1000 x "
                f"batch / mean NPU compute), NPU compute per batch mean {npu['mean']:.3f} ms, median "
                f"{npu['median']:.3f}, p99 {npu['p99']:.3f}, over {npu['count']} runs")


def read_summary(result_folder: Path) -> AisBenchSummary | None:
    """The summary ais_bench wrote beside `result_folder` (``<dirname>_summary.json``), or None if absent.

    The keys are summary.py's: ``throughput``, and ``NPU_compute_time`` / ``H2D_latency`` / ``D2H_latency``
    each with ``min max mean median count`` and a 99th percentile. That last key is ``percentile(99%)``
    in the 2022 ais_bench; the ait generation's NPU_compute_time spells it with a run of spaces before the
    ``)`` (a line continuation inside the string literal), so any key starting ``percentile(`` is read.
    """
    path = result_folder.parent / f"{result_folder.name}{SUMMARY_SUFFIX}"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return AisBenchSummary(path=path, throughput=float(data["throughput"]),
                               npu_compute_ms=_timing(data["NPU_compute_time"]),
                               h2d_ms=_timing(data["H2D_latency"]) if "H2D_latency" in data else None,
                               d2h_ms=_timing(data["D2H_latency"]) if "D2H_latency" in data else None,
                               batch=_batch_argument(data.get("args")))
    except (OSError, ValueError) as exc:
        raise BertoptError(f"{path}: not a readable ais_bench summary ({type(exc).__name__})") from None
    except (KeyError, TypeError, AttributeError, StopIteration):
        raise BertoptError(f"{path}: not an ais_bench summary (no throughput and NPU_compute_time min/max/"
                           f"mean/median/percentile(99%)/count)") from None


def _timing(block: dict) -> dict[str, float]:
    percentile = next(value for key, value in block.items() if key.startswith("percentile("))
    return {"min": float(block["min"]), "max": float(block["max"]), "mean": float(block["mean"]),
            "median": float(block["median"]), "p99": float(percentile), "count": int(block["count"])}


def _batch_argument(args) -> int | None:
    """``--batchsize N`` (or ``--batchsize=N``) from the ais_bench command line the summary records."""
    args = [str(arg) for arg in args or []]
    for position, arg in enumerate(args):
        if arg == "--batchsize" and position + 1 < len(args) and args[position + 1].isdigit():
            return int(args[position + 1])
        if arg.startswith("--batchsize=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return None


def padding_notes(folders: list[Path], stems: list[str], batch: int | None) -> list[str]:
    """What ais_bench did to a last partial batch, per result folder (each device pads its own share).

    ais_bench fills the missing rows of a last partial batch with copies of that batch's first file
    (io_oprations: ``padding_infer_fake_file`` -> ``files_list[0]``) and writes no output for those rows
    (save_tensors_to_file skips them), so only the real samples exist to be compared.
    """
    if batch is None:
        return [f"the OM's batch size is unknown here (a dynamic reference, no --batchsize in a summary): "
                f"where it does not divide a folder's samples, ais_bench filled the last batch with copies of "
                f"that batch's first input files and wrote no output for them; the {len(stems)} real samples "
                f"are compared"]
    order = {stem: position for position, stem in enumerate(stems)}
    notes = []
    for folder in folders:
        mine = sorted({match["stem"] for p in folder.glob("*.npy") if (match := RESULT_FILE.match(p.name))},
                      key=lambda stem: order.get(stem, len(order)))
        real = len(mine) % batch
        if real:
            first = mine[len(mine) - real]
            notes.append(f"{folder.name}: {len(mine)} samples at batch {batch}: ais_bench filled the last batch's "
                         f"{batch - real} empty row(s) with copies of sample {first}'s input files and wrote no "
                         f"output for them; the {real} real row(s) of that batch are compared")
    return notes


def run_reference_rows(reference: Path, specs: InputSpecs, inputs: dict[str, np.ndarray],
                       threads: int | None = None) -> dict[str, np.ndarray]:
    """The reference on ``[samples, seq]`` inputs: in batches of its static batch size, the last one
    padded as ais_bench pads (copies of the batch's first row; their outputs are dropped), or one sample
    at a time."""
    return run_in_batches(OrtRunner(reference, threads=threads).run, inputs, static_shape(specs)[0] or 1)


def run_in_batches(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], inputs: dict[str, np.ndarray],
                   batch: int) -> dict[str, np.ndarray]:
    """`run`'s outputs for every row of `inputs` ({name: [rows, ...]}): fed `batch` rows at a time, the last
    batch padded as ais_bench pads (`padded_batch`) and the padding's outputs dropped."""
    total = len(next(iter(inputs.values())))
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, total, batch):
        feed = {name: padded_batch(values[start:start + batch], batch) for name, values in inputs.items()}
        rows = min(batch, total - start)
        for name, value in run(feed).items():
            chunks.setdefault(name, []).append(value[:rows])
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def padded_batch(rows: np.ndarray, batch: int) -> np.ndarray:
    """`rows` filled up to `batch` with copies of its first row, as ais_bench fills a last partial batch
    with copies of that batch's first file (io_oprations.get_narray_from_files_list)."""
    if len(rows) == batch:
        return rows
    return np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)])


def validate_results(reference: Path, inputs_dir: Path, results_dir: Path, *, atol: float | None = None,
                     rtol: float | None = None, threads: int | None = None) -> CandidateReport:
    """Compare an ais_bench results folder with the reference run on the inputs it was fed, and report
    what ais_bench's summary says about speed and what it did to a last partial batch (the OM's batch
    taken from the reference's static batch, else the ``--batchsize`` the summary records)."""
    facts = reference_facts(reference)
    specs = input_specs_of(graph_only(reference))
    stems, inputs = read_inputs(inputs_dir, specs)
    _check_seq(specs, inputs)
    expected = run_reference_rows(reference, specs, inputs, threads)
    row_shapes = {name: (1,) + value.shape[1:] for name, value in expected.items()}
    actual = read_results(results_dir, stems, list(expected), row_shapes)
    tol_a, tol_r = tolerances("results", atol, rtol)
    mask_name = facts.input_for("attention_mask")
    masks = [inputs[mask_name]] if mask_name in inputs else None
    comparison = compare_outputs([expected], [actual], atol=tol_a, rtol=tol_r, masks=masks)
    comparison.samples = len(stems)
    folders = result_folders(results_dir)
    summaries = {folder: read_summary(folder) for folder in folders}
    batch = static_shape(specs)[0] or next((s.batch for s in summaries.values() if s and s.batch), None)
    notes = padding_notes(folders, stems, batch) + [_summary_note(folder, summary)
                                                    for folder, summary in summaries.items()]
    name = f"ais_bench results {folders[0] if len(folders) == 1 else folders[0].parent}"
    return CandidateReport(name, "results", comparison=comparison, notes=notes,
                           performance=[s.to_dict() for s in summaries.values() if s])


def _summary_note(folder: Path, summary: AisBenchSummary | None) -> str:
    if summary is None:
        return f"no {folder.name}{SUMMARY_SUFFIX} beside {folder}: ais_bench's throughput is not reported"
    return summary.line()


def _check_seq(specs: InputSpecs, inputs: dict[str, np.ndarray]) -> None:
    for name, (_, shape) in specs.items():
        seq = inputs[name].shape[1]
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != seq:
            raise BertoptError(f"--inputs: {name} files have seq {seq}; the model takes {shape[1]}")


def reference_facts(reference: Path) -> ModelFacts:
    return detect_facts(load_graph(reference))


def reference_outputs(reference: Path) -> list[str]:
    """The reference's graph outputs, in order (what an OM's outputs are bound to by position)."""
    return [output.name for output in graph_only(reference).graph.output]


# --------------------------------------------------------------------------- two models

def validate_models(reference: Path, candidate: Path, *, batch: int | None = None, seq: int | None = None,
                    samples: int = 2, atol: float | None = None, rtol: float | None = None,
                    device_id: int = 0, threads: int | None = None) -> CandidateReport:
    """The candidate (.onnx on ORT CPU, .om on the NPU) against the reference on realistic feeds.

    Shapes: the options, else the reference's static shape, else the candidate's (an .om is static).
    """
    facts = reference_facts(reference)
    backend = candidate_backend(candidate, device_id, threads, output_names=reference_outputs(reference))
    ref_batch, ref_seq = static_shape(input_specs_of(graph_only(reference)))
    cand_batch, cand_seq = (static_shape(input_specs_of(graph_only(candidate)))
                            if candidate.suffix != ".om" else (None, None))
    batch = batch if batch is not None else ref_batch or cand_batch or 1  # --batch 0 is refused, not replaced
    seq = seq if seq is not None else ref_seq or cand_seq or facts.max_positions or 128
    tol = {backend.kind: atol} if atol is not None else None
    rtols = {backend.kind: rtol} if rtol is not None else None
    [report] = validate_candidates(reference, [backend], facts, batch=batch, seq=seq, samples=samples,
                                   atol=tol, rtol=rtols, threads=threads)
    return report


def candidate_backend(candidate: Path, device_id: int = 0, threads: int | None = None, *,
                      output_names: list[str] | None = None) -> Backend:
    """An .om runs on the NPU through ais_bench (or is refused here), its outputs bound by position to
    `output_names` (the reference's); anything else is ONNX on ORT CPU."""
    if candidate.suffix == ".om":
        if not candidate.is_file():
            raise BertoptError(f"{candidate}: no such file")
        backend = om_backend(candidate, device_id, output_names)
        if isinstance(backend, Skipped):
            raise BertoptError(f"{candidate}: cannot run an OM here ({backend.reason}); run it with "
                               f"ais_bench on the device and use --inputs/--results")
        return backend
    return OrtBackend(candidate, name=f"{candidate.name} (ORT CPU)", kind="onnx", threads=threads)


def static_shape(specs: InputSpecs) -> tuple[int | None, int | None]:
    """(batch, seq) when every input fixes them, else None for that dim."""
    dims = [shape for _, shape in specs.values() if len(shape) == 2]
    return _single_int(d[0] for d in dims), _single_int(d[1] for d in dims)


def _single_int(values) -> int | None:
    found = set(values)
    value = found.pop() if len(found) == 1 else None
    return value if static_dim(value) else None
