"""An ONNX file at the byte level: its weights are found without parsing them and written back by copying.

An ``.onnx`` file is one protobuf message, ``ModelProto``, in protobuf's wire format. Each field is a
tag, the varint ``field_number << 3 | wire_type``, then its value; wire type 2 (length-delimited) is a
varint byte count followed by that many bytes, and holds strings, bytes and sub-messages alike. The field
numbers this module relies on, from ``onnx/onnx.proto`` (read below from onnx's generated descriptors,
so they cannot drift from the ones onnx uses):

- ``ModelProto.graph = 7`` (a GraphProto);
- ``GraphProto.initializer = 5`` (repeated TensorProto);
- ``TensorProto.raw_data = 9`` (the weight's little-endian bytes), ``external_data = 13`` (key/value
  entries ``location``, ``offset``, ``length``) and ``data_location = 14`` (``EXTERNAL`` = 1).

Two properties of the format carry the module:

1. A parser merges a field that occurs more than once: repeated fields are concatenated, sub-messages
   merged, scalars last-wins. So a model may be written as the model without its initializers followed,
   per initializer, by the fragment ``graph { initializer { ... } }``: that is how ``write_model`` writes
   one weight at a time, and why ``scan`` walks every occurrence of ``graph``, in order.
2. A weight's bytes are the value of one ``raw_data`` field: a contiguous (offset, length) range of the
   file. ``scan`` records that range (an ``Extent``) instead of copying the bytes and hands protobuf only
   the rest, the skeleton (a few MB for bert-large's 1.3 GB). A weight stored as external data has its
   extent in another file (``location`` relative to the model's folder, ``offset``, ``length``).

``write_model`` writes a model's head (its fields but the initializers), then per weight the fragment's
framing, the TensorProto's fields before ``raw_data``, the ``raw_data`` header, the bytes (copied by the
kernel from the file they came from with ``os.copy_file_range``, or written from memory) and the fields
after it: byte for byte what ``TensorProto.SerializeToString`` gives, as protobuf writes fields in
field-number order. With ``external`` the bytes go to a data file instead, each weight over
``ALIGN_THRESHOLD`` at an offset aligned to ``ALIGNMENT`` so ONNX Runtime can map it (the defaults of
ONNX Runtime's ``Graph::OffsetAlignmentInfo``, ``onnxruntime/core/graph/graph.h``, also used by onnx-ir's
``onnx_ir/external_data.py``).

Reading a weight (DataFile): a pass that tests values gets a read-only view through a memory map, whose
pages are dropped from the process when the next weight is viewed; `.values`, which gs keeps, is a
private copy read with pread. onnx-ir's ExternalTensor (``onnx_ir/_core.py``) is the prior art: it maps
the data file and keeps each view until ``release()``. Dropping the pages matters here because a fault
maps a whole folio of the page cache and RSS counts mapped file pages: scanning every weight of
bert-large through kept views would make the process 1.3 GB resident.

A file whose structure does not hold together (a length past the end, a tag of an unknown wire type, a
weight whose byte count does not fit its shape, external data that is missing or too short) is refused
with one line (BertoptError) before anything else reads it.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from bertopt.errors import BertoptError

GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

# Tensors of at least this many bytes go to the data file when a model is written with external data
# (onnx.save_model's default size_threshold).
EXTERNAL_MIN_BYTES = 1024
ALIGNMENT = 65536
ALIGN_THRESHOLD = 1 << 20

# Types whose elements are packed below a byte: their byte count is not elements x itemsize.
_SUB_BYTE_TYPES = frozenset(getattr(onnx.TensorProto, name) for name in
                            ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT6E2M3", "FLOAT6E3M2")
                            if hasattr(onnx.TensorProto, name))


class CorruptModel(BertoptError):
    """The file is not a well-formed ONNX model; the message says where it breaks."""


# --------------------------------------------------------------------------- files holding weights

class DataFile:
    """A file holding weights, open from the scan on, so later reads and copies see the file that was
    scanned even if its name is replaced meanwhile (e.g. a model saved over the file it came from)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the finalizer below
        self.size = os.fstat(self._file.fileno()).st_size
        self._map: mmap.mmap | None = None
        self._viewed: tuple[int, int] | None = None
        weakref.finalize(self, self._file.close)

    def fileno(self) -> int:
        return self._file.fileno()

    def view(self, offset: int, length: int) -> memoryview:
        """A read-only view of the bytes, without copying them.

        The pages of the previous view are dropped from this process (the page cache keeps them, and
        a view still in use reads them in again): a pass scanning every weight holds one at a time.
        """
        if length == 0:
            return memoryview(b"")
        if self._map is None:
            self._map = mmap.mmap(self.fileno(), 0, access=mmap.ACCESS_READ)
        self._release_previous_view()
        self._viewed = (offset, length)
        return memoryview(self._map)[offset:offset + length]

    def _release_previous_view(self) -> None:
        if self._viewed is None or not hasattr(self._map, "madvise"):
            return
        offset, length = self._viewed
        start = offset - offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fileno(), length, offset)
        if len(data) < length:  # Linux reads at most ~2 GiB per call
            buffer = bytearray(length)
            self.read_into(memoryview(buffer), offset)
            data = bytes(buffer)
        return data

    def read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill `buffer` from `offset` (pread: no map, the buffer is the only copy)."""
        done = 0
        while done < len(buffer):
            count = os.preadv(self.fileno(), [buffer[done:]], offset + done)
            if count == 0:
                raise BertoptError(f"{self.path}: ends before byte {offset + len(buffer)} (changed since it was read?)")
            done += count

    def copy_to(self, out_fd: int, offset: int, length: int) -> None:
        """Append `length` bytes from `offset` to `out_fd` at its position, in the kernel where it can."""
        done = 0
        while done < length:
            count = _copy_chunk(self.fileno(), out_fd, offset + done, length - done)
            if count == 0:
                raise BertoptError(f"{self.path}: ends before byte {offset + length} (changed since it was read?)")
            done += count


# copy_file_range's errors that mean "not here" (old kernel, other OS, file systems it cannot span).
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _copy_chunk(source: int, target: int, offset: int, length: int) -> int:
    """copy_file_range where the kernel and file systems have it, else a read and a write."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(source, target, length, offset)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    data = os.pread(source, min(length, 1 << 24), offset)
    _write_all(target, data)
    return len(data)


@dataclass(frozen=True)
class Extent:
    """Where one weight's bytes lie: `length` bytes at `offset` of `file`."""

    file: DataFile
    offset: int
    length: int

    def view(self) -> memoryview:
        return self.file.view(self.offset, self.length)

    def read(self) -> bytes:
        return self.file.pread(self.offset, self.length)


# --------------------------------------------------------------------------- reading

@dataclass
class ScannedModel:
    """The model without its weights' bytes, and where each initializer's bytes are (by name).

    Initializers stored as external data appear as onnx.load leaves them once it has read their data
    (no external-data entries, DEFAULT location), so the skeleton's tensors describe a self-contained model.
    """

    skeleton: onnx.ModelProto
    extents: dict[str, Extent]

    def full_model(self) -> onnx.ModelProto:
        """The whole model in memory, as `onnx.load` with its external data would give it."""
        model = onnx.ModelProto()
        model.CopyFrom(self.skeleton)
        for tensor in model.graph.initializer:
            extent = self.extents.get(tensor.name)
            if extent is not None:
                tensor.raw_data = extent.read()
        return model


def scan(path: Path) -> ScannedModel:
    """Read `path`'s structure and everything but its weights' bytes; refuse a malformed file (one line)."""
    model_file = DataFile(path)
    if model_file.size == 0:
        raise CorruptModel(f"{path}: empty file, not an ONNX model")
    skeleton_bytes, raw_ranges = _skeleton(model_file)
    skeleton = onnx.ModelProto()
    try:
        skeleton.ParseFromString(skeleton_bytes)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CorruptModel(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    _refuse_undecodable_text(path, skeleton)
    extents, data_files = {}, {}
    for tensor, raw in zip(skeleton.graph.initializer, raw_ranges):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            extent = _external_extent(path, tensor, data_files)
            without_external_data(tensor)
        else:
            extent = Extent(model_file, *raw) if raw is not None else None
        if extent is not None:
            _check_size(path, tensor, extent)
            extents[tensor.name] = extent
    return ScannedModel(skeleton, extents)


def _refuse_undecodable_text(path: Path, message: Message) -> None:
    """Refuse a string field (a name, an op type) that is not UTF-8: protobuf parses it and hands it out as
    bytes, which every reader of names then fails on."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            texts = value if field.is_repeated else [value]
            if any(isinstance(text, bytes) for text in texts):
                raise CorruptModel(f"{path}: text that is not UTF-8 in field {field.full_name}: corrupt, "
                                   f"not a readable ONNX model")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                _refuse_undecodable_text(path, item)


def _skeleton(source: DataFile) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The file with each initializer's raw_data left out, and those (offset, length) ranges in order.

    Every occurrence of the graph field is walked and their contents joined into one graph, which is
    what a parser's merge of them gives (see the module docstring).
    """
    data = _Window(source)
    model_fields, graph_fields, raw_ranges = [], [], []
    seen_graph = False
    for number, wire, start, end, field_start in _fields(data, 0, source.size):
        if number != GRAPH or wire != LENGTH_DELIMITED:
            model_fields.append(data.slice(field_start, end))
            continue
        seen_graph = True
        for inner, inner_wire, value, value_end, inner_start in _fields(data, start, end):
            if inner == INITIALIZER and inner_wire == LENGTH_DELIMITED:
                kept, raw = _tensor_without_raw_data(data, value, value_end)
                graph_fields.append(field_header(INITIALIZER, len(kept)) + kept)
                raw_ranges.append(raw)
            else:
                graph_fields.append(data.slice(inner_start, value_end))
    graph = b"".join(graph_fields)
    if seen_graph:
        model_fields.append(field_header(GRAPH, len(graph)) + graph)
    return b"".join(model_fields), raw_ranges


class _Window:
    """The file read through one small buffer: tags, lengths and the fields kept, never a weight's bytes.

    pread, not the memory map: a page fault maps a whole folio of the page cache (up to 2 MB here), so
    touching each weight's header through the map made bert-large's scan resident at 257 MB.
    """

    SIZE = 1 << 16

    def __init__(self, file: DataFile) -> None:
        self.file = file
        self.start = 0
        self.data = b""

    def __getitem__(self, position: int) -> int:
        if not self.start <= position < self.start + len(self.data):
            self._fill(position)
        return self.data[position - self.start]

    def slice(self, start: int, end: int) -> bytes:
        if end - start > self.SIZE:
            return self.file.pread(start, end - start)
        if not (self.start <= start and end <= self.start + len(self.data)):
            self._fill(start)
        return self.data[start - self.start:end - self.start]

    def _fill(self, position: int) -> None:
        self.start, self.data = position, self.file.pread(position, min(self.SIZE, self.file.size - position))


def _tensor_without_raw_data(data: _Window, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    kept, raw = [], None
    for number, wire, value, value_end, field_start in _fields(data, start, end):
        if number == RAW_DATA and wire == LENGTH_DELIMITED:
            raw = (value, value_end - value)  # a repeated scalar field: the last one counts
        else:
            kept.append(data.slice(field_start, value_end))
    return b"".join(kept), raw


def _fields(data: _Window, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, field start) of each field in [start, end)."""
    path = data.file.path
    position = start
    while position < end:
        field_start = position
        tag, position = _varint(data, position, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise CorruptModel(f"{path}: corrupt at byte {field_start} (field number 0), not a readable ONNX model")
        if wire == VARINT:
            _, value_end = _varint(data, position, end)
        elif wire == LENGTH_DELIMITED:
            length, position = _varint(data, position, end)
            value_end = position + length
        elif wire in (FIXED64, FIXED32):
            value_end = position + (8 if wire == FIXED64 else 4)
        else:
            raise CorruptModel(f"{path}: corrupt at byte {field_start} (wire type {wire}), not a readable ONNX model")
        if value_end > end:
            raise CorruptModel(f"{path}: truncated or corrupt (a field at byte {field_start} runs past byte {end}), "
                               f"not a readable ONNX model")
        yield number, wire, position, value_end, field_start
        position = value_end


def _varint(data: _Window, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while position < end and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise CorruptModel(f"{data.file.path}: truncated or corrupt (a varint at byte {position} does not end), "
                       f"not a readable ONNX model")


def _external_extent(path: Path, tensor: onnx.TensorProto, data_files: dict[Path, DataFile]) -> Extent:
    """The extent an external-data entry names, checked: inside the model's folder, present, long enough."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    where = f"{path}: weight '{tensor.name}' is external data in '{location}'"
    relative = Path(location)
    if not location or relative.is_absolute() or ".." in relative.parts:
        raise BertoptError(f"{where}: not a file inside the model's folder")
    data_path = path.parent / relative
    if not data_path.is_file():
        raise BertoptError(f"{where}, which is missing (expected {data_path})")
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise BertoptError(f"{where}: offset/length are not integers") from None
    if data_path not in data_files:
        data_files[data_path] = DataFile(data_path)
    data_file = data_files[data_path]
    length = data_file.size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > data_file.size:
        raise BertoptError(f"{where}: bytes {offset}-{offset + length} lie beyond its end ({data_file.size} bytes)")
    return Extent(data_file, offset, length)


def _check_size(path: Path, tensor: onnx.TensorProto, extent: Extent) -> None:
    expected = expected_nbytes(tensor)
    if expected is not None and expected != extent.length:
        raise CorruptModel(f"{path}: weight '{tensor.name}' holds {extent.length} bytes where its shape "
                           f"{list(tensor.dims)} and type need {expected}: corrupt or truncated")


def expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """The byte count of a tensor's raw data from its dims and type; None where that is not fixed."""
    if tensor.data_type in _SUB_BYTE_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):
        return None
    return math.prod(tensor.dims) * itemsize


def without_external_data(tensor: onnx.TensorProto) -> None:
    """What onnx.load does to a tensor once it has read its external data in."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


# --------------------------------------------------------------------------- writing

Payload = Extent | bytes | memoryview


@dataclass
class Weight:
    """An initializer to write: `tensor` without its data, `data` its raw bytes.

    `data` None means the tensor carries its own data (e.g. `float_data`) and is written whole.
    """

    tensor: onnx.TensorProto
    data: Payload | None = None

    @property
    def nbytes(self) -> int:
        if self.data is None:
            return 0
        return self.data.length if isinstance(self.data, Extent) else len(self.data)


def write_model(path: Path, head: onnx.ModelProto, weights: Iterable[Weight], *,
                external: str | None = None) -> None:
    """Write `head` (a model without initializers) then `weights` as its initializers, in order.

    With `external` (a file name beside `path`), weights of EXTERNAL_MIN_BYTES or more are written
    there and referenced by external-data entries; their TensorProtos stay in `path`.
    """
    with open(path, "wb", buffering=0) as out:
        _write_all(out.fileno(), head.SerializeToString())
        if external is None:
            for weight in weights:
                _write_initializer(out.fileno(), weight)
            return
        with open(path.parent / external, "wb", buffering=0) as data:
            for weight in weights:
                if weight.nbytes >= EXTERNAL_MIN_BYTES:
                    weight = Weight(_store_external(data.fileno(), weight, external))
                _write_initializer(out.fileno(), weight)


def _write_initializer(out: int, weight: Weight) -> None:
    """The fragment `graph { initializer { tensor } }`, the tensor's bytes streamed in place."""
    if weight.data is None:
        before, header, after = weight.tensor.SerializeToString(), b"", b""
    else:
        before, after = split_at_raw_data(weight.tensor)
        header = field_header(RAW_DATA, weight.nbytes)
    size = len(before) + len(header) + weight.nbytes + len(after)
    initializer = field_header(INITIALIZER, size)
    _write_all(out, field_header(GRAPH, len(initializer) + size) + initializer + before + header)
    _write_payload(out, weight.data)
    _write_all(out, after)


def _store_external(data_fd: int, weight: Weight, location: str) -> onnx.TensorProto:
    """Append the weight's bytes to the data file (aligned when large); its tensor, pointing at them."""
    offset = os.lseek(data_fd, 0, os.SEEK_CUR)
    if weight.nbytes > ALIGN_THRESHOLD and offset % ALIGNMENT:
        _write_all(data_fd, bytes(ALIGNMENT - offset % ALIGNMENT))
        offset = os.lseek(data_fd, 0, os.SEEK_CUR)
    _write_payload(data_fd, weight.data)
    tensor = onnx.TensorProto()
    tensor.CopyFrom(weight.tensor)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", weight.nbytes)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def _write_payload(out: int, data: Payload | None) -> None:
    if isinstance(data, Extent):
        data.file.copy_to(out, data.offset, data.length)
    elif data is not None:
        _write_all(out, data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def split_at_raw_data(tensor: onnx.TensorProto) -> tuple[bytes, bytes]:
    """The serialised fields of `tensor` numbered below raw_data's, and those above it."""
    before, after = onnx.TensorProto(), onnx.TensorProto()
    copy_fields(tensor, before, lambda field: field.number < RAW_DATA)
    copy_fields(tensor, after, lambda field: field.number > RAW_DATA)
    return before.SerializeToString(), after.SerializeToString()


def copy_fields(source: Message, target: Message, keep: Callable[[FieldDescriptor], bool]) -> None:
    """Copy the fields of `source` that `keep` accepts into `target` (an empty message of its type)."""
    for field, value in source.ListFields():
        if not keep(field):
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def field_header(number: int, length: int) -> bytes:
    """Tag (wire type 2, length-delimited) and varint length of one protobuf field."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(length)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def array_chunks(extent: Extent, dtype: np.dtype, nbytes: int) -> Iterator[np.ndarray]:
    """The extent's values as consecutive flat read-only pieces of about `nbytes`, read with pread into
    one reused buffer: each piece is valid until the next is asked for."""
    count = extent.length // dtype.itemsize
    buffer = np.empty(max(1, min(nbytes // dtype.itemsize, count)), dtype)
    for start in range(0, count, len(buffer)):
        piece = buffer[:min(len(buffer), count - start)]
        extent.file.read_into(memoryview(piece.view(np.uint8)), extent.offset + start * dtype.itemsize)
        readable = piece.view()
        readable.flags.writeable = False
        yield readable


def array_of(extent: Extent, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable array read from the file (the only copy)."""
    array = np.empty(shape, dtype)
    extent.file.read_into(memoryview(array.reshape(-1).view(np.uint8)), extent.offset)
    return array
