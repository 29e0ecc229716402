"""A constant's values, read without keeping them: whole, in chunks, or as bytes; the fp16 range."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from bertopt.graph import onnxfile
from bertopt.graph.io import PLAIN_TYPES, FileValues, numpy_dtype

FP16_MAX = float(np.finfo(np.float16).max)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor, or None when the tensor is computed at run time."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def peek_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values (read-only) without keeping them loaded on the tensor.

    gs imports weights lazily and save_graph writes untouched ones from where they were read;
    reading `.values` would keep a numpy copy of every weight scanned (1.3 GB on bert-large) until
    the end. A weight still in its file is a view of the file's bytes, whose pages are let go when
    the next weight is peeked.
    """
    lazy = tensor._values
    if isinstance(lazy, FileValues) and lazy.plain:
        return lazy.view()
    if type(lazy) is LazyValues and lazy.tensor.data_type in PLAIN_TYPES and lazy.tensor.HasField("raw_data"):
        # a read-only view of the one copy reading raw_data makes; lazy.load() would make two more
        raw = lazy.tensor
        return np.frombuffer(raw.raw_data, numpy_dtype(raw)).reshape(raw.dims)
    return lazy.load() if isinstance(lazy, LazyValues) else tensor.values


# Scans that need no whole array (a range check) read a weight in pieces of this many bytes.
CHUNK_BYTES = 1 << 20


def value_chunks(tensor: gs.Constant) -> Iterator[np.ndarray]:
    """A constant's values as consecutive flat, read-only pieces, for scans that need no whole array.

    A weight still in its file is read a piece at a time into one reused buffer (a piece is valid
    until the next is asked for): nothing is mapped or kept, so a scan of every weight stays ~1 MB
    resident where peek_values maps the largest weight whole (bert-large's 125 MB embedding table).
    """
    lazy = tensor._values
    if isinstance(lazy, FileValues) and lazy.plain:
        yield from onnxfile.array_chunks(lazy.extent, numpy_dtype(lazy.stand_in), CHUNK_BYTES)
    else:
        yield peek_values(tensor).reshape(-1)


def exceeds_fp16(values: np.ndarray) -> bool:
    """Whether an element lies beyond fp16's range (inf included, NaN not).

    From the minimum and maximum, which make no temporary arrays: bert-large's 1.3 GB of weights
    are scanned in a fraction of the time `abs(values[~isnan(values)])` took.
    """
    if values.size == 0:
        return False
    low, high = values.min(), values.max()
    if np.isnan(low) or np.isnan(high):  # rare: NaN propagates through min/max, so drop them first
        return exceeds_fp16(values[~np.isnan(values)])
    return max(-float(low), float(high)) > FP16_MAX


def constant_exceeds_fp16(tensor: gs.Constant) -> bool:
    """Whether a constant has an element beyond fp16's range (`exceeds_fp16`), read in pieces.

    For a weight still in its file the answer is kept with it, since its bytes there do not change:
    legalize-ascend and the legality check after the pipeline read bert-large's 1.3 GB once, not twice.
    """
    lazy = tensor._values
    if not isinstance(lazy, FileValues):
        return any(exceeds_fp16(chunk) for chunk in value_chunks(tensor))
    if lazy.beyond_fp16 is None:
        lazy.beyond_fp16 = any(exceeds_fp16(chunk) for chunk in value_chunks(tensor))
    return lazy.beyond_fp16


def constant_bytes(tensor: gs.Constant) -> bytes | memoryview:
    """A constant's bytes (little-endian, C order) without converting them: a view of the file or the
    TensorProto's raw data while the weight is still lazily imported, else the loaded array's buffer."""
    lazy = tensor._values
    if isinstance(lazy, FileValues):
        return lazy.extent.view()
    if isinstance(lazy, LazyValues) and lazy.tensor.HasField("raw_data"):
        return lazy.tensor.raw_data
    return memoryview(np.ascontiguousarray(peek_values(tensor))).cast("B")
