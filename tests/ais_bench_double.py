"""A test double of ais_bench's InferSession: an ONNX graph on ONNX Runtime behind the interface and the
behaviours ais_bench really has, so AisBenchBackend's handling of them is tested. It is not an OM, not an
NPU, and nothing that uses it may say an OM ran.

What it reproduces (sources in bertopt/ascend/npu.py's docstring):
- ``get_inputs()`` / ``get_outputs()`` return descriptors with ``name``, ``datatype`` (an enum named like
  ``aclruntime.dtype``: ``str()`` gives ``dtype.int64``), ``format``, ``shape``, ``size`` and ``realsize``;
  output names are ``<producer op>:<index>:<ONNX output name>`` as ATC writes them;
- ``infer(feeds, mode="static")`` checks only each buffer's byte size against ``realsize`` (a RuntimeError
  otherwise) and reads the bytes as the input's declared type: a wrong dtype of the right size is not an
  error, it is garbage, exactly as on the device;
- the 2022 generation (``Ascend/tools``) releases with ``finalize()`` only; the ait/msit generation has
  ``free_resource()`` too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bertopt.parity import OrtRunner, input_specs_of

# aclruntime.dtype, member names as PyTensor.cpp registers them.
dtype = enum.Enum("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                            "float16", "float32", "double", "bool"])
NUMPY_TO_ACL = {np.dtype(np.float64): dtype.double, np.dtype(np.bool_): dtype.bool}


def acl_dtype(numpy_dtype) -> enum.Enum:
    numpy_dtype = np.dtype(numpy_dtype)
    return NUMPY_TO_ACL.get(numpy_dtype) or dtype[numpy_dtype.name]


@dataclass
class TensorDesc:
    """aclruntime's tensor_desc: name, datatype, format, shape, realsize, size."""

    name: str
    datatype: enum.Enum
    shape: list[int]
    format: int = 2  # ACL_FORMAT_ND
    size: int = 0
    realsize: int = 0


class InferSession2022:
    """The 2022 ``Ascend/tools`` InferSession's interface over an ONNX model compiled at a static shape.

    `shapes` fixes every input's shape (what ``atc --input_shape`` does); `input_dtypes` overrides the type
    an input is compiled with (an OM whose ids are int32 although the ONNX model's are int64).
    """

    def __init__(self, device_id: int, model_path: str, *, shapes: dict[str, tuple[int, ...]],
                 input_dtypes: dict[str, np.dtype] | None = None) -> None:
        self.device_id = device_id
        self.model_path = model_path
        self._runner = OrtRunner(Path(model_path))
        model = onnx.load(model_path, load_external_data=False)
        specs = input_specs_of(model)
        self._onnx_dtypes = {name: spec_dtype for name, (spec_dtype, _) in specs.items()}
        declared = {name: np.dtype((input_dtypes or {}).get(name, spec_dtype)) for name, (spec_dtype, _) in specs.items()}
        self._inputs = [_desc(name, declared[name], shapes[name]) for name in specs]
        self._outputs = [TensorDesc(name, dtype.float32, []) for name in om_output_names(model)]
        self.finalized = False
        self.calls = 0

    def get_inputs(self) -> list[TensorDesc]:
        return self._inputs

    def get_outputs(self) -> list[TensorDesc]:
        return self._outputs

    def infer(self, feeds: list[np.ndarray], mode: str = "static", custom_sizes: int = 100000) -> list[np.ndarray]:
        if mode != "static":
            raise RuntimeError(f"the double runs static OMs only (mode {mode})")
        self.calls += 1
        onnx_feeds = {}
        for desc, array in zip(self._inputs, feeds):
            if array.nbytes != desc.realsize:
                raise RuntimeError(f"Check i name:{desc.name} in size:{array.nbytes} needsize:{desc.realsize} "
                                   f"not match")
            as_device_reads = np.frombuffer(array.tobytes(), dtype=_numpy(desc.datatype)).reshape(desc.shape)
            onnx_feeds[desc.name] = as_device_reads.astype(self._onnx_dtypes[desc.name])
        return list(self._runner.run(onnx_feeds).values())

    def finalize(self) -> None:
        self.finalized = True


class InferSessionAit(InferSession2022):
    """The ait/msit generation: ``free_resource()`` beside a ``finalize()`` that would end aclruntime for the
    whole process (so it must not be what releases one session)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.freed = False

    def free_resource(self) -> None:
        self.freed = True


def om_output_names(model: onnx.ModelProto) -> list[str]:
    """``<producer op>:<index>:<output>`` for every graph output, the names ATC gives an OM's outputs."""
    producers = {out: (node, index) for node in model.graph.node for index, out in enumerate(node.output)}
    names = []
    for position, output in enumerate(model.graph.output):
        node, index = producers[output.name]
        op_name = node.name or f"/{node.op_type}_{position}"
        names.append(f"{op_name}:{index}:{output.name}")
    return names


def session_factory(cls, *, shapes, input_dtypes=None, opened: list | None = None):
    """What AisBenchBackend takes as its session class: (device_id, om path) -> a session; each session
    made is appended to `opened`."""
    def make(device_id: int, model_path: str):
        session = cls(device_id, model_path, shapes=shapes, input_dtypes=input_dtypes)
        if opened is not None:
            opened.append(session)
        return session
    return make


def _desc(name: str, numpy_dtype: np.dtype, shape: tuple[int, ...]) -> TensorDesc:
    size = int(np.prod(shape)) * numpy_dtype.itemsize
    return TensorDesc(name, acl_dtype(numpy_dtype), list(shape), size=size, realsize=size)


def _numpy(acl: enum.Enum) -> np.dtype:
    return np.dtype({"double": np.float64, "bool": np.bool_}.get(acl.name, acl.name))
