"""ONNX Runtime as a candidate backend: the CPU always, CUDA when that provider is installed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from bertopt.graph import ModelSource
from bertopt.validation.parity import InputSpecs, OrtRunner, adapt_feed, graph_only, input_specs_of

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OrtBackend:
    """One model on one ONNX Runtime provider; feeds are cast to the inputs the model declares.

    The session is built on the first `run` and released by `close` (see bertopt.validation.backends).
    """

    informational = False

    def __init__(self, model: Path | str | onnx.ModelProto, *, name: str, kind: str = "onnx",
                 provider: str = CPU, threads: int | None = None) -> None:
        self.name = name
        self.kind = kind
        self.provider = provider
        self._model = model
        self._threads = threads
        self._runner: OrtRunner | None = None
        self._specs: InputSpecs = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runner = self._runner or self._open()
        return runner.run(adapt_feed(feeds, self._specs))

    def close(self) -> None:
        self._runner = None

    def _open(self) -> OrtRunner:
        with self._session_model() as model:
            self._specs = input_specs_of(graph_only(model))
            self._runner = OrtRunner(model, threads=self._threads, providers=[self.provider])
        return self._runner

    @contextmanager
    def _session_model(self) -> Iterator[ModelSource]:
        """The model the session loads, alive only while the session is built (a subclass derives it)."""
        yield self._model


def ort_backends(model: Path | str | onnx.ModelProto, label: str, *,
                 threads: int | None = None) -> list[OrtBackend]:
    """`label` on the CPU, plus on CUDA when onnxruntime here was built with it."""
    backends = [OrtBackend(model, name=f"{label} (ORT CPU)", threads=threads)]
    if CUDA in ort.get_available_providers():
        backends.append(OrtBackend(model, name=f"{label} (ORT CUDA)", provider=CUDA, threads=threads))
    return backends
