"""Numeric validation against the original graph (ONNX Runtime fp32, the reference).

Three ways in, one comparator (bertopt.parity.compare_outputs, Polygraphy's rules):

- `validate_candidates`: live candidates (optimized ONNX, Ascend emulation, the OM on an NPU) run
  on the same realistic feeds as the reference;
- `validate_results`: an ais_bench results folder from another machine, together with the input
  folders it was fed (facts note, section 5):
  inputs ``DIR/<input name>/<idx>.npy`` (``[1, seq]`` each), results ``<idx>_<output index>.npy``,
  possibly in an ``--output_dirname`` subfolder; the padded rows of a last partial batch are not written;
- `write_inputs`: realistic inputs in that layout, to feed ais_bench.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertopt.backends import DEFAULT_TOLERANCE, Backend, Skipped
from bertopt.backends.ascend import om_backend
from bertopt.backends.emulation import EmulationBackend
from bertopt.backends.ort import OrtBackend
from bertopt.errors import BertoptError
from bertopt.facts import ModelFacts, detect_facts
from bertopt.files import new_folder
from bertopt.graph import load_graph
from bertopt.parity import (Comparison, InputSpecs, OrtRunner, compare_outputs, graph_only, input_specs_of,
                            realistic_feeds)

RESULT_FILE = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)\.npy$")
MAX_LISTED = 5


@dataclass
class CandidateReport:
    """One candidate's verdict: a comparison, or why there is none (skipped, or it failed to run)."""

    name: str
    kind: str
    comparison: Comparison | None = None
    skipped: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        """True/False for a verdict; None when the candidate was skipped."""
        if self.skipped:
            return None
        return self.comparison is not None and self.comparison.passed

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "passed": self.passed, "skipped": self.skipped,
                "error": self.error, "notes": self.notes}
        if self.comparison is not None:
            data.update(self.comparison.to_dict())
        return data


def tolerances(kind: str, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """Explicit tolerances win; otherwise the kind's default (fp32 1e-4, fp16/NPU 1e-2)."""
    default = DEFAULT_TOLERANCE[kind]
    return (default if atol is None else atol), (default if rtol is None else rtol)


# --------------------------------------------------------------------------- live candidates

def validate_candidates(reference: Path, candidates: list[Backend | Skipped], facts: ModelFacts, *,
                        batch: int, seq: int, samples: int = 2, seed: int = 0,
                        atol: dict[str, float] | None = None, rtol: dict[str, float] | None = None,
                        threads: int | None = None) -> list[CandidateReport]:
    """Run the reference once on realistic feeds, then every candidate on the same feeds, in order.

    One model session is alive at a time, so the peak memory is one model's, not the sum of all:
    the reference runs on every feed and its session is released before any candidate runs (only its
    outputs are kept); each candidate builds its session on its first `run` (backends are lazy, see
    bertopt.backends) and is closed once it has run on every feed, before the next one starts. A
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
    runner = OrtRunner(reference, threads=threads)
    return [runner.run(feed) for feed in feeds]


def _check(candidate: Backend | Skipped, feeds: list[dict], expected: list[dict], masks,
           atol: dict[str, float], rtol: dict[str, float]) -> CandidateReport:
    if isinstance(candidate, Skipped):
        return CandidateReport(candidate.name, candidate.kind, skipped=candidate.reason)
    report = CandidateReport(candidate.name, candidate.kind)
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
    name = facts.input_for("attention_mask")
    return [feed[name] for feed in feeds] if name in feeds[0] else None


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
    """'10' after '9', as ais_bench orders its input files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_inputs(folder: Path, specs: InputSpecs) -> tuple[list[str], dict[str, np.ndarray]]:
    """(sample stems in natural order, input name -> ``[samples, seq]`` array) from ``folder/<name>/``."""
    if not folder.is_dir():
        raise BertoptError(f"--inputs {folder}: no such folder")
    stems: list[str] | None = None
    arrays: dict[str, np.ndarray] = {}
    for name in specs:
        sub = folder / name
        if not sub.is_dir():
            raise BertoptError(f"--inputs {folder}: no folder {name}/ for model input {name}")
        found = sorted((p.stem for p in sub.glob("*.npy")), key=natural_key)
        if not found:
            raise BertoptError(f"--inputs {sub}: no .npy files")
        if stems is not None and found != stems:
            raise BertoptError(f"--inputs {folder}: {name}/ holds other samples than {next(iter(specs))}/ "
                               f"({_listed(set(found) ^ set(stems))})")
        stems = found
        arrays[name] = _stack_rows(sub, found, specs[name][0])
    return stems, arrays


def _stack_rows(folder: Path, stems: list[str], dtype: np.dtype) -> np.ndarray:
    rows = [_load(folder / f"{stem}.npy") for stem in stems]
    shape = rows[0].shape
    for stem, row in zip(stems, rows):
        if row.ndim != 2 or row.shape[0] != 1 or row.shape != shape:
            raise BertoptError(f"{folder / stem}.npy: shape {list(row.shape)}; expected [1, seq] like "
                               f"{folder / stems[0]}.npy {list(shape)}")
        if not np.issubdtype(row.dtype, np.integer) and not np.issubdtype(dtype, np.floating):
            raise BertoptError(f"{folder / stem}.npy: dtype {row.dtype}; expected integers")
    return np.concatenate(rows).astype(dtype, copy=False)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BertoptError(f"{path}: not a readable .npy file ({type(exc).__name__})") from None


def results_folder(folder: Path) -> Path:
    """The folder holding the ``*_N.npy`` files: `folder` itself or its one ais_bench subfolder."""
    if not folder.is_dir():
        raise BertoptError(f"--results {folder}: no such folder")
    if any(RESULT_FILE.match(p.name) for p in folder.glob("*.npy")):
        return folder
    subfolders = sorted(p for p in folder.iterdir()
                        if p.is_dir() and any(RESULT_FILE.match(q.name) for q in p.glob("*.npy")))
    if len(subfolders) == 1:
        return subfolders[0]
    if not subfolders:
        raise BertoptError(f"--results {folder}: no <sample>_<output>.npy files (ais_bench --outfmt NPY)")
    raise BertoptError(f"--results {folder}: several result folders ({_listed(p.name for p in subfolders)}); "
                       f"pass one of them")


def read_results(folder: Path, stems: list[str], output_names: list[str],
                 row_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Output name -> ``[samples, ...]`` from ``<stem>_<index>.npy``, every file checked."""
    folder = results_folder(folder)
    by_key = {}
    extra = []
    for path in folder.glob("*.npy"):
        match = RESULT_FILE.match(path.name)
        if match:
            by_key[(match["stem"], int(match["index"]))] = path
        else:
            extra.append(path.name)
    _check_output_count(folder, by_key, len(output_names))
    wanted = {(stem, index) for stem in stems for index in range(len(output_names))}
    extra += [by_key[key].name for key in set(by_key) - wanted]
    missing = [f"{stem}_{index}.npy" for stem, index in sorted(wanted - set(by_key), key=_key_order)]
    if missing:
        raise BertoptError(f"--results {folder}: missing {len(missing)} file(s) for the given inputs: "
                           f"{_listed(missing)}")
    if extra:
        raise BertoptError(f"--results {folder}: {len(extra)} file(s) match no input sample: {_listed(sorted(extra))}")
    return {name: _stack_results(folder, stems, index, row_shapes[name])
            for index, name in enumerate(output_names)}


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


def _stack_results(folder: Path, stems: list[str], index: int, row_shape: tuple) -> np.ndarray:
    rows = []
    for stem in stems:
        path = folder / f"{stem}_{index}.npy"
        row = _load(path)
        if row.shape != row_shape:
            raise BertoptError(f"{path}: shape {list(row.shape)}; the reference gives {list(row_shape)} per sample")
        rows.append(row)
    return np.concatenate(rows)


def _listed(items) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def run_reference_rows(reference: Path, specs: InputSpecs, inputs: dict[str, np.ndarray],
                       threads: int | None = None) -> dict[str, np.ndarray]:
    """The reference on ``[samples, seq]`` inputs: in batches of its static batch size, the last one
    padded with zero rows (as ais_bench pads; the padding is dropped), or one sample at a time."""
    static_batch = {shape[0] for _, shape in specs.values() if shape and isinstance(shape[0], int)}
    batch = static_batch.pop() if len(static_batch) == 1 else 1
    runner = OrtRunner(reference, threads=threads)
    total = len(next(iter(inputs.values())))
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, total, batch):
        feed = {name: padded_batch(values[start:start + batch], batch) for name, values in inputs.items()}
        rows = min(batch, total - start)
        for name, value in runner.run(feed).items():
            chunks.setdefault(name, []).append(value[:rows])
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def padded_batch(rows: np.ndarray, batch: int) -> np.ndarray:
    """`rows` filled up to `batch` with all-zero rows (ais_bench pads a last partial batch so)."""
    if len(rows) == batch:
        return rows
    return np.concatenate([rows, np.zeros((batch - len(rows),) + rows.shape[1:], dtype=rows.dtype)])


def validate_results(reference: Path, inputs_dir: Path, results_dir: Path, *, atol: float | None = None,
                     rtol: float | None = None, threads: int | None = None) -> CandidateReport:
    """Compare an ais_bench results folder with the reference run on the inputs it was fed."""
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
    name = f"ais_bench results {results_folder(results_dir)}"
    return CandidateReport(name, "results", comparison=comparison)


def _check_seq(specs: InputSpecs, inputs: dict[str, np.ndarray]) -> None:
    for name, (_, shape) in specs.items():
        seq = inputs[name].shape[1]
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != seq:
            raise BertoptError(f"--inputs: {name} files have seq {seq}; the model takes {shape[1]}")


def reference_facts(reference: Path) -> ModelFacts:
    return detect_facts(load_graph(reference))


# --------------------------------------------------------------------------- two models

def validate_models(reference: Path, candidate: Path, *, batch: int | None = None, seq: int | None = None,
                    samples: int = 2, atol: float | None = None, rtol: float | None = None,
                    device_id: int = 0, threads: int | None = None) -> CandidateReport:
    """The candidate (.onnx on ORT CPU, .om on the NPU) against the reference on realistic feeds.

    Shapes: the options, else the reference's static shape, else the candidate's (an .om is static).
    """
    facts = reference_facts(reference)
    backend = candidate_backend(candidate, device_id, threads)
    ref_batch, ref_seq = static_shape(input_specs_of(graph_only(reference)))
    cand_batch, cand_seq = (static_shape(input_specs_of(graph_only(candidate)))
                            if candidate.suffix != ".om" else (None, None))
    batch = batch or ref_batch or cand_batch or 1
    seq = seq or ref_seq or cand_seq or facts.max_positions or 128
    tol = {backend.kind: atol} if atol is not None else None
    rtols = {backend.kind: rtol} if rtol is not None else None
    [report] = validate_candidates(reference, [backend], facts, batch=batch, seq=seq, samples=samples,
                                   atol=tol, rtol=rtols, threads=threads)
    return report


def candidate_backend(candidate: Path, device_id: int = 0, threads: int | None = None) -> Backend:
    """An .om runs on the NPU through ais_bench (or is refused here); anything else is ONNX on ORT CPU."""
    if candidate.suffix == ".om":
        if not candidate.is_file():
            raise BertoptError(f"{candidate}: no such file")
        backend = om_backend(candidate, device_id)
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
    return value if isinstance(value, int) else None
