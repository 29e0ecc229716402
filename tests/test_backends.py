"""Backends: ORT candidates and the OM backend (its refusal without ais_bench, its session's lifetime)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from bertopt.backends import Skipped
from bertopt.ascend.npu import AisBenchBackend, om_backend
from bertopt.backends.ort import OrtBackend, ort_backends
from bertopt.errors import BertoptError
from bertopt.parity import OrtRunner, realistic_feeds
from test_parity import qa_facts, qa_model


# --------------------------------------------------------------------------- ORT and the OM

def test_ort_backend_casts_feeds_to_the_declared_inputs():
    backend = OrtBackend(qa_model(int_type=TensorProto.INT32), name="int32 ids")
    [feed] = realistic_feeds(qa_facts(), batch=2, seq=8)
    outputs = backend.run(feed)
    assert set(outputs) == {"start_logits", "end_logits"} and outputs["start_logits"].shape == (2, 8)
    assert backend.kind == "onnx"


def test_ort_backends_include_the_cpu():
    names = [b.name for b in ort_backends(qa_model(), "optimized")]
    assert names[0] == "optimized (ORT CPU)"
    assert all("CUDA" in name for name in names[1:])


def test_om_backend_is_skipped_without_an_om_or_ais_bench(tmp_path):
    assert om_backend(None).reason.startswith("no compiled OM")
    om = tmp_path / "model.om"
    om.write_bytes(b"not really an OM")
    skipped = om_backend(om)
    assert isinstance(skipped, Skipped) and skipped.kind == "npu"
    assert "ais_bench is not installed" in skipped.reason


class OnnxAsOm:
    """What AisBenchBackend calls on ais_bench's InferSession (which needs an NPU), answered by ORT."""

    def __init__(self, path: str) -> None:
        self._runner = OrtRunner(path)
        self.freed = False

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=name) for name in self._runner.input_names]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=name) for name in self._runner.output_names]

    def infer(self, feeds: list[np.ndarray], mode: str) -> list[np.ndarray]:
        return list(self._runner.run(dict(zip(self._runner.input_names, feeds))).values())

    def free_resource(self) -> None:
        self.freed = True


def test_the_om_is_loaded_on_the_first_run_and_freed_on_close(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(qa_model(), model)
    loaded: list[OnnxAsOm] = []

    def load(device_id: int, path: str) -> OnnxAsOm:
        loaded.append(OnnxAsOm(path))
        return loaded[-1]

    backend = AisBenchBackend(model, 0, load)
    assert loaded == []
    [feed] = realistic_feeds(qa_facts(), batch=2, seq=8)
    backend.run(feed)
    outputs = backend.run(feed)
    np.testing.assert_array_equal(outputs["end_logits"], OrtRunner(model).run(feed)["end_logits"])
    assert len(loaded) == 1
    backend.close()
    assert loaded[0].freed


def test_an_om_that_cannot_load_is_a_bertopt_error(tmp_path):
    def refuse(device_id: int, path: str):
        raise RuntimeError("aclmdlLoadFromFile failed\nstack trace")

    [feed] = realistic_feeds(qa_facts(), batch=2, seq=8)
    with pytest.raises(BertoptError, match=r"ais_bench cannot load .*model.om on device 3: aclmdlLoadFromFile failed$"):
        AisBenchBackend(tmp_path / "model.om", 3, refuse).run(feed)
