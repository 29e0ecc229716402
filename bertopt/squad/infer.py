"""Start and end logits for every feature: from a model run here, or from an ais_bench results folder.

A model is fed in batches of its static batch size, the last batch padded with copies of its first row
whose outputs are dropped (as ais_bench pads); a dynamic model takes any batch. ais_bench writes one file
per feature and output, ``<feature index>_<output index>.npy`` (in ``device<N>/`` folders when several
devices ran): output 0 is the start logits and output 1 the end logits of a QA model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from bertopt.errors import BertoptError
from bertopt.validation.candidates import run_in_batches
from bertopt.validation.candidates import read_results as read_result_files

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
QA_OUTPUTS = ("start_logits", "end_logits")


def run_features(run: Runner, feeds: dict[str, np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits ``[features, seq]`` of `run` over `feeds` ({input name: [features, seq]})."""
    if batch < 1:
        raise BertoptError(f"batch must be >= 1 (got {batch})")

    def qa_logits(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(QA_OUTPUTS, _qa_logits(run(feed))))  # each batch checked before its rows are kept

    logits = run_in_batches(qa_logits, feeds, batch)
    return logits[QA_OUTPUTS[0]], logits[QA_OUTPUTS[1]]


def _qa_logits(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """start/end logits by name, else the first two outputs (a user's export may name them otherwise)."""
    if all(name in outputs for name in QA_OUTPUTS):
        return outputs[QA_OUTPUTS[0]], outputs[QA_OUTPUTS[1]]
    values = list(outputs.values())
    if len(values) < 2 or values[0].ndim != 2 or values[0].shape != values[1].shape:
        raise BertoptError(f"not a question-answering model: expected start and end logits [batch, seq], "
                           f"got outputs {[list(v.shape) for v in values]}")
    return values[0], values[1]


def read_results(folder: Path, count: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits ``[count, seq]`` of features ``0..count-1`` from an ais_bench ``--outfmt NPY``
    folder (the folder itself or its one subfolder, e.g. ``result/result_bs8``), every file checked."""
    stems = [str(index) for index in range(count)]
    logits = read_result_files(Path(folder), stems, list(QA_OUTPUTS), {name: (1, seq) for name in QA_OUTPUTS})
    return logits[QA_OUTPUTS[0]], logits[QA_OUTPUTS[1]]
