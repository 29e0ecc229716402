"""Start and end logits for every feature: from a model run here, or from an ais_bench results folder.

A model is fed in batches of its static batch size, the last batch padded with all-zero rows whose
outputs are dropped (as ais_bench pads); a dynamic model takes any batch. ais_bench writes one file
per feature and output, ``<feature index>_<output index>.npy``: output 0 is the start logits and
output 1 the end logits of a QA model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from bertopt.errors import BertoptError

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
QA_OUTPUTS = ("start_logits", "end_logits")


def run_features(run: Runner, feeds: dict[str, np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits ``[features, seq]`` of `run` over `feeds` ({input name: [features, seq]})."""
    if batch < 1:
        raise BertoptError(f"batch must be >= 1 (got {batch})")
    total = len(next(iter(feeds.values())))
    starts, ends = [], []
    for first in range(0, total, batch):
        rows = min(batch, total - first)
        outputs = run({name: _padded(values[first:first + rows], batch) for name, values in feeds.items()})
        start, end = _qa_logits(outputs)
        starts.append(start[:rows])
        ends.append(end[:rows])
    return np.concatenate(starts), np.concatenate(ends)


def _padded(rows: np.ndarray, batch: int) -> np.ndarray:
    if len(rows) == batch:
        return rows
    return np.concatenate([rows, np.zeros((batch - len(rows),) + rows.shape[1:], dtype=rows.dtype)])


def _qa_logits(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """start/end logits by name, else the first two outputs (a user's export may name them otherwise)."""
    if all(name in outputs for name in QA_OUTPUTS):
        return outputs[QA_OUTPUTS[0]], outputs[QA_OUTPUTS[1]]
    values = list(outputs.values())
    if len(values) < 2 or values[0].ndim != 2 or values[0].shape != values[1].shape:
        raise BertoptError(f"not a question-answering model: expected start and end logits [batch, seq], "
                           f"got outputs {[list(v.shape) for v in values]}")
    return values[0], values[1]


def static_batch(shapes: list[tuple]) -> int | None:
    """The batch size every ``[batch, seq]`` input fixes, or None when the batch is dynamic."""
    batches = {shape[0] for shape in shapes if len(shape) == 2 and isinstance(shape[0], int)}
    return batches.pop() if len(batches) == 1 else None


def read_results(folder: Path, count: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits of features ``0..count-1`` from an ais_bench ``--outfmt NPY`` folder
    (the folder itself or its one subfolder holding ``0_0.npy``, e.g. ``result/result_bs8``)."""
    folder = _results_dir(Path(folder))
    missing = [f"{i}_{o}.npy" for i in range(count) for o in (0, 1) if not (folder / f"{i}_{o}.npy").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BertoptError(f"--results {folder}: missing {len(missing)} file(s) for the features: {shown}")
    return _stack(folder, count, 0, seq), _stack(folder, count, 1, seq)


def _results_dir(folder: Path) -> Path:
    if not folder.is_dir():
        raise BertoptError(f"--results {folder}: no such folder")
    if (folder / "0_0.npy").is_file():
        return folder
    inner = sorted(p for p in folder.iterdir() if (p / "0_0.npy").is_file())
    if len(inner) != 1:
        found = "none" if not inner else ", ".join(p.name for p in inner)
        raise BertoptError(f"--results {folder}: expected 0_0.npy in it or in one subfolder (found {found})")
    return inner[0]


def _stack(folder: Path, count: int, output: int, seq: int) -> np.ndarray:
    logits = np.empty((count, seq), dtype=np.float32)
    for index in range(count):
        path = folder / f"{index}_{output}.npy"
        try:
            row = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BertoptError(f"{path}: not a readable .npy file ({type(exc).__name__})") from None
        if row.size != seq:
            raise BertoptError(f"{path}: shape {list(row.shape)}; expected [1, {seq}] logits")
        logits[index] = row.reshape(seq)
    return logits
