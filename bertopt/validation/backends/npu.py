"""The compiled OM on an Ascend device through ais_bench's InferSession.

Runs only where ais_bench imports and the device node exists; every other case is a `Skipped` saying
why. Nothing here imitates the device (the test double of InferSession lives in tests/).

What ais_bench does, read in its source (``Ascend/tools``
``ais-bench_workload/tool/ais_bench/ais_bench/infer/interface.py`` and ``backend/.../PyInferenceSession.cpp``,
2022; the ait generation, ``ait/components/benchmark/ais_bench/infer/interface.py``, mirrored in
``mjlovesz/sync-ait``):

- ``InferSession(device_id, model_path)`` loads the OM; ``get_inputs()`` / ``get_outputs()`` return
  aclruntime ``tensor_desc`` objects with ``name``, ``datatype`` (the pybind enum ``aclruntime.dtype``:
  ``int8 uint8 int16 uint16 int32 uint32 int64 uint64 float16 float32 double bool``, ``PyTensor.cpp``;
  ait's surgeon maps them to numpy the same way, ``auto_optimizer/inference_engine/inference/
  acl_inference.py``), ``format``, ``shape`` (a negative dim is dynamic, ait ``_dymbatch_prepare``),
  ``size`` and ``realsize`` (bytes).
- ``infer(feeds, mode="static")`` hands each array to the device as a raw buffer (``BaseTensor(ptr,
  nbytes)``); the only check is ``nbytes == realsize`` (``ModelInferenceProcessor::
  CheckInVectorAndFillBaseTensor``). An int64 array fed to an int32 input fails that check; a float32 array
  fed to an int32 input passes it and is read as integers. So bertopt checks each feed's dtype and shape
  against the OM's inputs first: integers are cast to the OM's integer type when every value fits, anything
  else is refused with one line.
- Output names of an OM compiled from ONNX are ``<producer op>:<index>:<ONNX output name>``, e.g.
  ``/Cast:0:start_logits`` (ACL ``aclmdlGetOutputNameByIndex``; facts note, section 1). Outputs are bound to
  the reference's outputs **by position**: OM output i is reference output i. The text after the last
  ``:`` is only a cross-check (decision): where it names a *different* reference output than the position
  does, the run is refused rather than compare a swapped pair; where it names none (an ONNX name with
  colons of its own), the position decides. Without the reference's names, outputs are named by that text.
- Releasing the session: the ait generation has ``free_resource()`` (and a static ``finalize()`` that tears
  down aclruntime for the whole process); the 2022 ``Ascend/tools`` one has only ``finalize()``. bertopt
  calls ``free_resource`` where it exists, else ``finalize``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import numpy as np

from bertopt.errors import BertoptError, first_line
from bertopt.validation.backends import Skipped

# aclruntime.dtype member names -> numpy (PyTensor.cpp RegistPyTensorEnumType; "double" is float64).
ACLRUNTIME_DTYPES = {
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64, "float16": np.float16,
    "float32": np.float32, "double": np.float64, "bool": np.bool_,
}


class AisBenchBackend:
    """The compiled OM on an Ascend device through ais_bench's InferSession (static shapes).

    The OM is loaded onto the device on the first `run` and released by `close` (see bertopt.validation.backends).
    `output_names` are the reference's outputs in order: OM output i is returned as `output_names[i]`.
    """

    kind = "npu"
    informational = False

    def __init__(self, om: Path, device_id: int, session_class, output_names: Sequence[str] | None = None) -> None:
        self.name = f"OM on NPU {device_id} (ais_bench)"
        self._om = om
        self._device_id = device_id
        self._session_class = session_class
        self._output_names = list(output_names) if output_names is not None else None
        self._session = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session or self._open()
        arrays = [fit_feed(desc, feeds) for desc in session.get_inputs()]
        try:
            outputs = session.infer(feeds=arrays, mode="static")
        except Exception as exc:  # aclruntime raises bare RuntimeErrors for a failed execution
            raise BertoptError(f"ais_bench failed to run {self._om} on device {self._device_id}: "
                               f"{first_line(exc)}") from None
        return bind_outputs([desc.name for desc in session.get_outputs()], outputs, self._output_names)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        release = getattr(session, "free_resource", None) or getattr(session, "finalize", None)
        if release is None:
            return
        try:
            release()
        except Exception as exc:  # aclruntime's errors, whatever their type
            raise BertoptError(f"ais_bench could not release {self._om} on device {self._device_id}: "
                               f"{first_line(exc)}") from None

    def _open(self):
        try:
            self._session = self._session_class(self._device_id, str(self._om))
        except Exception as exc:  # aclruntime raises bare RuntimeErrors (and others) for a bad OM or device
            raise BertoptError(f"ais_bench cannot load {self._om} on device {self._device_id}: "
                               f"{first_line(exc)}") from None
        return self._session


def om_dtype(desc) -> np.dtype:
    """The numpy dtype of an OM input or output as ais_bench describes it (``desc.datatype``)."""
    datatype = desc.datatype
    name = getattr(datatype, "name", None) or str(datatype).rsplit(".", 1)[-1]
    if name not in ACLRUNTIME_DTYPES:
        raise BertoptError(f"the OM's {desc.name} has data type {datatype}, which bertopt does not know")
    return np.dtype(ACLRUNTIME_DTYPES[name])


def fit_feed(desc, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The feed for OM input `desc`, in its dtype and shape, or BertoptError saying why it cannot be."""
    if desc.name not in feeds:
        raise BertoptError(f"the OM has input {desc.name} the reference does not feed (it feeds {sorted(feeds)})")
    value = np.asarray(feeds[desc.name])
    shape = tuple(int(d) for d in desc.shape)
    if any(d < 0 for d in shape):
        raise BertoptError(f"the OM's input {desc.name} has dynamic shape {list(shape)}; bertopt runs static "
                           f"OMs (compile with a fixed --input_shape)")
    if value.shape != shape:
        raise BertoptError(f"feed {desc.name} has shape {list(value.shape)}; the OM input takes {list(shape)}")
    dtype = om_dtype(desc)
    if value.dtype != dtype:
        value = _cast_ints(desc.name, value, dtype)
    return np.ascontiguousarray(value)


def _cast_ints(name: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Integers to another integer type when every value fits; ais_bench would read any other mismatch's
    bytes as the OM's type, so it is refused."""
    if np.issubdtype(value.dtype, np.integer) and np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        if value.size == 0 or (value.min() >= limits.min and value.max() <= limits.max):
            return value.astype(dtype)
        raise BertoptError(f"feed {name} holds values outside {dtype} ({value.min()}..{value.max()}), the "
                           f"OM input's type")
    raise BertoptError(f"feed {name} is {value.dtype}; the OM input is {dtype} (ais_bench copies raw bytes, "
                       f"so bertopt casts only integers that fit)")


def onnx_output_name(om_name: str) -> str:
    """``/Cast:0:start_logits`` -> ``start_logits``: the ONNX name an OM compiled from ONNX carries last."""
    return om_name.rsplit(":", 1)[-1]


def bind_outputs(om_names: list[str], values: list[np.ndarray],
                 reference_names: list[str] | None) -> dict[str, np.ndarray]:
    """The OM's outputs under the reference's names, by position (see the module docstring)."""
    if reference_names is None:
        names = [onnx_output_name(name) for name in om_names]
        if len(set(names)) != len(names):
            raise BertoptError(f"the OM's outputs {om_names} do not name distinct ONNX outputs")
        return dict(zip(names, values))
    if len(om_names) != len(reference_names) or len(values) != len(om_names):
        raise BertoptError(f"the OM has {len(om_names)} output(s) {om_names}; the reference has "
                           f"{len(reference_names)} {reference_names}")
    for index, (om_name, reference) in enumerate(zip(om_names, reference_names)):
        carried = onnx_output_name(om_name)
        if carried != reference and carried in reference_names:
            raise BertoptError(f"OM output {index} is {om_name} but the reference's output {index} is "
                               f"{reference}: the OM's outputs are not in the reference's order")
    return dict(zip(reference_names, values))


def ais_bench_session_class():
    """ais_bench's InferSession, or None when ais_bench (with its aclruntime) does not import."""
    try:
        return importlib.import_module("ais_bench.infer.interface").InferSession
    except Exception:  # ImportError, or aclruntime failing to find CANN's libraries
        return None


def npu_device_present(device_id: int) -> bool:
    return Path(f"/dev/davinci{device_id}").exists()


def om_backend(om: Path | None, device_id: int = 0,
               output_names: Sequence[str] | None = None) -> AisBenchBackend | Skipped:
    """The OM backend, or why it cannot run here. Pass the reference's output names (in order) so the
    OM's outputs are bound to them by position."""
    name, kind = f"OM on NPU {device_id} (ais_bench)", "npu"
    if om is None or not Path(om).is_file():
        return Skipped(name, kind, "no compiled OM (atc did not run here)")
    session_class = ais_bench_session_class()
    if session_class is None:
        return Skipped(name, kind, "ais_bench is not installed (or cannot load CANN's aclruntime)")
    if not npu_device_present(device_id):
        return Skipped(name, kind, f"no Ascend device /dev/davinci{device_id}")
    return AisBenchBackend(Path(om), device_id, session_class, output_names)
