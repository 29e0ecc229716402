"""Candidates: anything that turns feeds into outputs and is checked against the original graph.

Every backend answers ``run(feeds) -> outputs`` (numpy arrays by name) and says what it is:

- ``name``: what the report shows ("optimized ONNX (ORT CPU)", "Ascend fp16 emulation (ORT CPU)");
- ``informational``: shown for comparison, never a verdict of the run (e.g. the Gelu kernel atc
  was not asked for, emulated beside the one it was);
- ``kind``: how much to trust it and which tolerance applies by default (the table is
  bertopt.validation.parity.KIND_TOLERANCE): ``onnx`` (the optimized graph in fp32: 1e-4), ``emulation``
  (Ascend numerics reproduced on ONNX Runtime: fp16 tolerance 1e-2, never a substitute for the device),
  ``npu`` (the compiled OM on an Ascend device through ais_bench: 1e-2).

A backend that cannot run here is not constructed; the code that looks for it returns a `Skipped`
saying why, so a report always lists what was not checked.

Constructing a backend is cheap: its session (an ONNX Runtime session holding the weights, an
ais_bench session holding the OM on the device) is built on the first ``run`` and released by
``close``, so a list of candidates costs nothing until each is used, and validation keeps one
session alive at a time. A failure to build the session surfaces from ``run`` as a BertoptError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str
    kind: str
    informational: bool

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for one batch of feeds (graph input name -> array); the first call builds
        the session."""

    def close(self) -> None:
        """Release the session; a later `run` builds it again."""


@dataclass(frozen=True)
class Skipped:
    """A candidate that could not run here, and why (one line for the report)."""

    name: str
    kind: str
    reason: str
