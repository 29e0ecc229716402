"""ONNX Runtime as a candidate backend: the CPU always, CUDA when that provider is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bertopt.parity import OrtRunner, adapt_feed, graph_only, input_specs_of

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OrtBackend:
    """One model on one ONNX Runtime provider; feeds are cast to the inputs the model declares."""

    def __init__(self, model: Path | str | onnx.ModelProto, *, name: str, kind: str = "onnx",
                 provider: str = CPU, threads: int | None = None) -> None:
        self.name = name
        self.kind = kind
        self.provider = provider
        self._specs = input_specs_of(graph_only(model))
        self._runner = OrtRunner(model, threads=threads, providers=[provider])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runner.run(adapt_feed(feeds, self._specs))


def ort_backends(model: Path | str | onnx.ModelProto, label: str, *,
                 threads: int | None = None) -> list[OrtBackend]:
    """`label` on the CPU, plus on CUDA when onnxruntime here was built with it."""
    backends = [OrtBackend(model, name=f"{label} (ORT CPU)", threads=threads)]
    if CUDA in ort.get_available_providers():
        backends.append(OrtBackend(model, name=f"{label} (ORT CUDA)", provider=CUDA, threads=threads))
    return backends
