"""The compiled OM on an Ascend device through ais_bench's InferSession.

Runs only where ais_bench imports and the device node exists; every other case is a `Skipped`
saying why. Nothing here imitates the device.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from bertopt.backends import Skipped
from bertopt.errors import BertoptError, first_line

class AisBenchBackend:
    """The compiled OM on an Ascend device through ais_bench's InferSession (static shapes).

    The OM is loaded onto the device on the first `run` and unloaded by `close` (see bertopt.backends).
    """

    kind = "npu"

    def __init__(self, om: Path, device_id: int, session_class) -> None:
        self.name = f"OM on NPU {device_id} (ais_bench)"
        self._om = om
        self._device_id = device_id
        self._session_class = session_class
        self._session = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session or self._open()
        inputs = [arg.name for arg in session.get_inputs()]
        missing = [name for name in inputs if name not in feeds]
        if missing:
            raise BertoptError(f"the OM has input(s) {missing} the reference does not feed")
        outputs = session.infer(feeds=[np.ascontiguousarray(feeds[name]) for name in inputs], mode="static")
        return dict(zip([arg.name for arg in session.get_outputs()], outputs))

    def close(self) -> None:
        if self._session is not None:
            self._session.free_resource()
            self._session = None

    def _open(self):
        try:
            self._session = self._session_class(self._device_id, str(self._om))
        except Exception as exc:  # aclruntime raises bare RuntimeErrors (and others) for a bad OM or device
            raise BertoptError(f"ais_bench cannot load {self._om} on device {self._device_id}: "
                               f"{first_line(exc)}") from None
        return self._session


def ais_bench_session_class():
    """ais_bench's InferSession, or None when ais_bench (with its aclruntime) does not import."""
    try:
        return importlib.import_module("ais_bench.infer.interface").InferSession
    except Exception:  # ImportError, or aclruntime failing to find CANN's libraries
        return None


def npu_device_present(device_id: int) -> bool:
    return Path(f"/dev/davinci{device_id}").exists()


def om_backend(om: Path | None, device_id: int = 0) -> AisBenchBackend | Skipped:
    """The OM backend, or why it cannot run here."""
    name, kind = f"OM on NPU {device_id} (ais_bench)", "npu"
    if om is None or not Path(om).is_file():
        return Skipped(name, kind, "no compiled OM (atc did not run here)")
    session_class = ais_bench_session_class()
    if session_class is None:
        return Skipped(name, kind, "ais_bench is not installed (or cannot load CANN's aclruntime)")
    if not npu_device_present(device_id):
        return Skipped(name, kind, f"no Ascend device /dev/davinci{device_id}")
    return AisBenchBackend(Path(om), device_id, session_class)
