"""The Gelu kernels ATC compiles, by implementation mode and CANN version: what each computes, step by step.

The data is ``bertopt/data/gelu_kernels.json`` (forms, constants, version ranges, sources). In short,
from the TBE operator source (canndev mirror, repository ``dengguojie/vue-element-admin``,
``ops/built-in/tbe/impl/gelu.py``, ``fast_gelu_v2.py`` and ``dynamic/gelu.py``):

- ``high_performance`` from CANN 5.1 (canndev 2022-01-19): the piecewise-quadratic FastGeluV2 form,
  ``x * (sgn(x) * (-0.1444 * (min(|0.7071 x|, 1.769) - 1.769)^2 + 0.5) + 0.5)``, computed in the
  input's dtype, so in fp16 under ATC's default precision mode; its largest error against exact Gelu
  is ~1.8e-2 (tanh form: ~5e-4);
- ``high_performance`` before (CANN 5.0.x): the tanh form kept in fp16;
- ``high_precision`` (and no implmode): the tanh form ``x / (1 + exp(-1.5957691 (x + 0.044715 x^3)))``
  in fp32, an fp16 input cast up first and the result cast back.

Each form is a list of the kernel's own steps (`Step`), interpreted twice: by numpy (`gelu_reference`,
for tests and measurements) and as ONNX nodes (`kernel_gelu`, for the emulation), each step rounded to
fp16 where the kernel computes in fp16. TBE casts a scalar operand to the tensor's dtype
(``util_astype(scalar, dtype)`` in ``auto_schedule/python/tbe/dsl/compute/math.py`` of the same mirror),
so in fp16 the constants are fp16 too. An fp16 step is emulated as the fp32 operation rounded to fp16,
which for +, -, *, / and min is the correctly rounded fp16 result (fp32's 24 bits are enough to make
double rounding harmless); that the vector unit rounds to nearest even is an assumption.

Not modelled, said here rather than guessed: ``sgn`` is ``(x + 1e-12) / |x + 1e-12|`` in the kernel and
from 2022-02-25 ``(x + 1e-12) * vrec(|x + 1e-12|)`` with the hardware's approximate reciprocal; the
emulation uses an exact sign (an fp16 reciprocal off by an ulp moves the output by about
``0.25 |x| 2^-11``). In fp16 the 1e-12 offset rounds to 0, so at exactly x = 0 the 2022 kernel divides 0 by
0; the emulation returns 0 there. ``exp`` is ONNX Runtime's, not the vector unit's.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from bertopt.ascend.cann import version_key
from bertopt.errors import BertoptError
from bertopt.graph.builder import Builder

QUADRATIC, TANH = "quadratic", "tanh"
COMPUTE_IN_INPUT_DTYPE, COMPUTE_IN_FP32 = "input", "float32"

# An operand is the kernel's input ("x"), an earlier step's result (its index) or a scalar constant.
Operand = Union[str, int, float]
Step = tuple[str, tuple[Operand, ...]]



@dataclass(frozen=True)
class GeluKernel:
    """The kernel ATC compiles for one implmode on one CANN version."""

    impl_mode: str
    cann: str
    form: str  # QUADRATIC | TANH
    compute: str  # COMPUTE_IN_INPUT_DTYPE | COMPUTE_IN_FP32
    source: str

    def step_dtype(self, input_dtype: np.dtype) -> np.dtype:
        """The dtype every step is computed in, for an input of `input_dtype`."""
        return np.dtype(np.float32) if self.compute == COMPUTE_IN_FP32 else np.dtype(input_dtype)

    def describe(self) -> str:
        dtype = "fp32" if self.compute == COMPUTE_IN_FP32 else "the input's dtype"
        return f"Gelu {self.impl_mode} on CANN {self.cann}: the {_data()['forms'][self.form]['description']} in {dtype}"


def gelu_kernel(impl_mode: str, cann: str) -> GeluKernel:
    """The Gelu kernel for `impl_mode` on CANN `cann` ("6.0", "8.0.RC2", ...); BertoptError otherwise."""
    version = version_key(cann)
    for entry in _data()["versions"]:
        low, below = (version_key(bound) if bound else None for bound in entry["cann"])
        if (low is None or version >= low) and (below is None or version < below):
            if impl_mode not in entry:
                modes = [key for key in entry if key not in ("cann", "source")]
                raise BertoptError(f"Gelu implementation {impl_mode!r}: expected one of {', '.join(modes)}")
            chosen = entry[impl_mode]
            return GeluKernel(impl_mode, cann, chosen["form"], chosen["compute"], entry["source"])
    raise BertoptError(f"no Gelu kernel known for CANN {cann}")  # the ranges cover every version


def kernel_steps(form: str) -> list[Step]:
    """The kernel's steps in its own order, with its constants (from the data file; floats, so that no
    constant reads as a step index)."""
    k = {name: float(value) for name, value in _data()["forms"][form]["constants"].items()}
    if form == QUADRATIC:
        return [("Mul", ("x", k["c"])), ("Abs", (0,)), ("Min", (1, k["clip"])), ("Add", (2, -k["clip"])),
                ("Mul", (3, 3)), ("Mul", (4, k["a_half"])), ("Add", (5, k["half"])), ("Sign", ("x",)),
                ("Mul", (6, 7)), ("Add", (8, k["half"])), ("Mul", ("x", 9))]
    return [("Mul", ("x", "x")), ("Mul", (0, "x")), ("Mul", (1, k["cubic"])), ("Add", ("x", 2)),
            ("Mul", (3, k["scale"])), ("Min", (4, 0.0)), ("Exp", (5,)), ("Abs", (4,)), ("Mul", (7, -1.0)),
            ("Exp", (8,)), ("Add", (9, 1.0)), ("Div", ("x", 10)), ("Mul", (11, 6))]


_NUMPY_OPS = {"Mul": np.multiply, "Add": np.add, "Div": np.divide, "Min": np.minimum, "Abs": np.abs,
              "Sign": np.sign, "Exp": np.exp}


def gelu_reference(x: np.ndarray, form: str, dtype: np.dtype | type) -> np.ndarray:
    """The kernel in numpy, every step in `dtype` (fp16 steps are fp32 operations rounded to fp16)."""
    dtype = np.dtype(dtype)
    x = np.asarray(x).astype(dtype)
    results: list[np.ndarray] = []

    def value(operand: Operand) -> np.ndarray:
        if operand == "x":
            return x
        if isinstance(operand, int) and not isinstance(operand, bool):
            return results[operand]
        return dtype.type(operand)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for op, operands in kernel_steps(form):
            results.append(np.asarray(_NUMPY_OPS[op](*map(value, operands)), dtype=dtype))
    return results[-1]


def kernel_gelu(b: Builder, x: gs.Tensor, form: str, dtype: np.dtype | type) -> gs.Tensor:
    """The kernel's steps as ONNX nodes on the fp32 tensor `x`; returns the result.

    With fp16 steps, `x` must already hold fp16 values, each constant is the fp16 value of the kernel's
    (stored as fp32), and every step's result is rounded through a Cast to fp16 and back.
    """
    in_fp16 = np.dtype(dtype) == np.float16
    steps = kernel_steps(form)
    results: list[gs.Tensor] = []

    def operand(value: Operand) -> gs.Tensor | float:
        if value == "x":
            return x
        if isinstance(value, int) and not isinstance(value, bool):
            return results[value]
        return float(np.float16(value)) if in_fp16 else value  # a number: a constant typed like x

    for op, operands in steps:
        exact = b.op(op, *map(operand, operands))
        results.append(b.Cast(b.Cast(exact, to=TensorProto.FLOAT16), to=TensorProto.FLOAT) if in_fp16 else exact)
    return results[-1]


@functools.lru_cache(maxsize=None)
def _data() -> dict:
    return json.loads(importlib.resources.files("bertopt").joinpath("data", "gelu_kernels.json").read_text())
