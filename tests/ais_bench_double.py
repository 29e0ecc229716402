"""A test double of ais_bench's InferSession: an ONNX graph on ONNX Runtime behind the interface and the
behaviours ais_bench really has, so AisBenchBackend's handling of them is tested. It is not an OM, not an
NPU, and nothing that uses it may say an OM ran.

What it reproduces (sources in bertopt/validation/backends/npu.py's docstring):
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
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bertopt.validation.parity import OrtRunner, input_specs_of

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


# --------------------------------------------------------------------------- python -m ais_bench, on disk

def natural_sort(names: list[str]) -> list[str]:
    """utils.natural_sort: numbers as integers, text lower-cased."""
    return sorted(names, key=lambda key: [int(c) if c.isdigit() else c.lower() for c in re.split("([0-9]+)", key)])


def list_split(items: list, size: int, padding):
    """utils.list_split: chunks of `size`, the last one filled with `padding`."""
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        yield chunk + [padding] * (size - len(chunk))


def ais_bench_run(model: Path, input_dirs: list[Path], output: Path, dirname: str, *, batch: int,
                  devices: list[int] | None = None, shift: float = 0.0, generation: str = "2022",
                  npu_times_ms: list[float] | None = None) -> list[Path]:
    """What ``python -m ais_bench --model M --input d1,d2,.. --output O --output_dirname D --outfmt NPY
    --batchsize B [--device 0,1]`` leaves on disk, with ONNX Runtime running `model` where the OM would
    run (a double: no OM, no NPU). Returns the result folders (one per device).

    As io_oprations.py / __main__.py do it: the folders bound to the model's inputs by position, files in
    natural order; with several devices each gets a share (split_inputs_new) and writes ``D/device<N>/``;
    files of a batch are concatenated, a last partial batch filled with copies of its first file; outputs
    written per real row as ``<first input file name up to its first dot>_<output index>.npy``, nothing for
    padding; the summary JSON beside each folder in summary.py's format (`generation` "ait" spells
    NPU_compute_time's percentile key as that version's source does). `shift` is added to every output.
    """
    files = [natural_sort([str(f) for f in folder.glob("*.npy")]) for folder in input_dirs]
    runner = OrtRunner(model)
    args = ["ais_bench", "--model", "model.om", "--input", ",".join(map(str, input_dirs)), "--output", str(output),
            "--output_dirname", dirname, "--outfmt", "NPY", "--batchsize", str(batch)]
    run = dict(runner=runner, batch=batch, shift=shift, generation=generation, npu_times_ms=npu_times_ms)
    if devices is None:
        return [_device_run(files, output / dirname, args=args, **run)]
    args += ["--device", ",".join(map(str, devices))]
    shares = _split_inputs(files, len(devices))
    return [_device_run(share, output / dirname / f"device{device}", args=args, **run)
            for device, share in zip(devices, shares)]


def _split_inputs(files: list[list[str]], jobs: int) -> list[list[list[str]]]:
    """__main__.split_inputs_new: each input's files cut in `jobs` consecutive parts, one per device."""
    per_job = math.ceil(len(files[0]) / jobs)
    parts = [list(list_split(input_files, per_job, None)) for input_files in files]
    return [[[f for f in part[job] if f] if job < len(part) else [] for part in parts] for job in range(jobs)]


def _device_run(files: list[list[str]], folder: Path, *, runner: OrtRunner, batch: int, shift: float,
                generation: str, npu_times_ms: list[float] | None, args: list[str]) -> Path:
    folder.mkdir(parents=True)
    padding = "padding_infer_fake_file"
    batches = list(zip(*[list(list_split(input_files, batch, padding)) for input_files in files]))
    filesinfo = {}
    for index, infiles in enumerate(batches):
        feed = {name: np.concatenate([np.load(f if f != padding else per_input[0]) for f in per_input])
                for name, per_input in zip(runner.input_names, infiles)}
        outputs = list(runner.run(feed).values())
        for row in range(batch):
            if infiles[0][row] == padding:
                continue
            stem = Path(infiles[0][row]).name.split(".")[0]
            outfiles = []
            for output_index, value in enumerate(outputs):
                path = folder / f"{stem}_{output_index}.npy"
                np.save(path, value[row:row + 1] + np.float32(shift))
                outfiles.append(str(path))
            filesinfo[index * batch + row] = {"infiles": [per_input[row] for per_input in infiles], "outfiles": outfiles}
    times = npu_times_ms or [4.0 + 0.01 * i for i in range(len(batches))]
    summary = _summary(filesinfo, times, batch, generation, args)
    (folder.parent / f"{folder.name}_summary.json").write_text(json.dumps(summary))
    return folder


def _summary(filesinfo: dict, times: list[float], batch: int, generation: str, args: list[str]) -> dict:
    """summary.py's report(): the dict it json.dumps (int sample ids become strings)."""
    def stats(values, percentile_key="percentile(99%)"):
        return {"min": float(np.min(values)), "max": float(np.max(values)), "mean": float(np.mean(values)),
                "median": float(np.median(values)), percentile_key: float(np.percentile(values, 99)),
                "count": len(values)}

    # ait's summary.py breaks this string literal over two lines with a backslash: the key keeps the indent.
    npu_key = "percentile(99%" + " " * 36 + ")" if generation == "ait" else "percentile(99%)"
    return {"filesinfo": filesinfo, "args": args, "NPU_compute_time": stats(times, npu_key),
            "H2D_latency": stats([0.5] * len(times)), "D2H_latency": stats([0.2] * len(times)),
            "throughput": 1000 * batch / float(np.mean(times)), "npu_compute_time_list": times, "pid": 4242}
