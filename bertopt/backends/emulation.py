"""Ascend-numerics EMULATION on ONNX Runtime: the optimized graph computed the way the OM computes it.

This is an emulation, labelled so everywhere; it never stands in for a run on the device. It
reproduces the two numeric choices the seed's OM makes (facts note, section 4):

- **fp16**, ATC's default precision on 310P. Every float weight is rounded to fp16 (read through a
  ``Cast`` to fp16 and back, which ONNX Runtime folds into the weight when it builds the session, with
  numpy's rounding, so no rounded copy of the weights is made here), and every float tensor an op
  produces is rounded to fp16 (``Cast`` to fp16 and back after each op) while the op itself runs on
  ONNX Runtime's fp32 kernels. Graph int inputs stay int64; outputs are fp32 holding fp16 values. So
  values beyond +-65504 become inf (a -3.4e38 mask constant is -inf), and each tensor carries fp16's
  11-bit precision, as on the NPU, whose cube units also accumulate in fp32 and write fp16.
- **The high-performance Gelu** (``--optypelist_for_implmode=Gelu
  --op_select_implmode=high_performance``): the tanh approximation
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the same function as Ascend's fast Gelu
  ``x / (1 + exp(-sqrt(8/pi) (x + 0.044715 x^3)))``.

Why rounding and not an fp16 graph: ORT 1.32's CPU provider loads an all-fp16 BERT (MatMul,
Softmax, Erf, LayerNormalization, ReduceMean, Pow... all accepted), but for ops without an fp16
kernel it silently inserts Casts and computes in fp32, so which tensors get rounded depends on ORT's
kernel coverage. Rounding after every op does not, and it is the stricter of the two: on bert-tiny
(bs2 seq16, 4 samples) it differs from fp32 by up to 3.6e-4 on the logits against 1.7e-4 to 2.3e-4
for the all-fp16 graph, and both give the same NaNs from a -3.4e38 mask constant.
"""

from __future__ import annotations

import gc
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from bertopt.backends.ort import OrtBackend
from bertopt.conformance import FP16_MAX, exceeds_fp16
from bertopt.graph import (ModelSource, add_node, constant_value, infer_shapes, load_graph, make_constant,
                           peek_values, replace_uses, save_graph, to_model)

# Gelu's erf form feeds Erf with x / sqrt(2) (a Div by 1.4142 or a Mul by 0.7071).
SQRT2 = math.sqrt(2.0)
# With u = x / sqrt(2), the tanh form's argument sqrt(2/pi) (x + 0.044715 x^3) is
# (2 / sqrt(pi)) (u + 2 * 0.044715 u^3): erf(u) ~ tanh(that).
TANH_SCALE = 2.0 / math.sqrt(math.pi)
TANH_CUBIC = 2.0 * 0.044715
EMULATION_NAME = "Ascend fp16 emulation (ORT CPU)"


@dataclass
class Emulated:
    graph: gs.Graph  # its weights still where the model was read from: save_graph streams them
    hazards: list[str]  # fp16 problems visible in the graph itself, e.g. constants that overflow
    gelus: int  # Gelu computations switched to the tanh approximation

    @property
    def model(self) -> onnx.ModelProto:
        """The emulated model in memory, weights included."""
        return to_model(self.graph)


def emulate_ascend_fp16(model: ModelSource) -> Emulated:
    """The model as the Ascend OM computes it: tanh Gelu, fp16 weights and fp16-rounded tensors."""
    graph = load_graph(model)
    infer_shapes(graph)  # every op output needs its dtype to be rounded
    gelus = _tanh_gelu(graph)
    _round_every_output(graph)
    hazards = _round_constants(graph)  # after the outputs: its own Casts need no second rounding
    graph.toposort()
    return Emulated(graph, hazards, gelus)


def _tanh_gelu(graph: gs.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op == "Gelu":
            node.attrs["approximate"] = "tanh"
            count += 1
        elif node.op == "Erf" and _is_gelu_erf(node):
            _replace_erf_by_tanh(graph, node)
            count += 1
    return count


def _is_gelu_erf(node: gs.Node) -> bool:
    """Erf(x / sqrt(2)): the only form ATC fuses into its Gelu (and the only Erf in BERT)."""
    source = node.inputs[0]
    if not source.inputs or source.inputs[0].op not in ("Div", "Mul"):
        return False
    scale = source.inputs[0]
    value = constant_value(scale.inputs[1]) if len(scale.inputs) == 2 else None
    if value is None or value.size != 1:
        return False
    wanted = SQRT2 if scale.op == "Div" else 1.0 / SQRT2
    return math.isclose(float(value.item()), wanted, rel_tol=1e-3)


def _replace_erf_by_tanh(graph: gs.Graph, erf: gs.Node) -> None:
    u = erf.inputs[0]
    dtype = np.float32

    def op(kind: str, *inputs: gs.Tensor) -> gs.Variable:
        return add_node(graph, kind, inputs, dtype=dtype, shape=u.shape)[0]

    cube = op("Mul", op("Mul", u, u), u)
    cubic = op("Mul", cube, make_constant(graph, "emulation_tanh_cubic", np.array(TANH_CUBIC, dtype)))
    inner = op("Mul", op("Add", u, cubic), make_constant(graph, "emulation_tanh_scale", np.array(TANH_SCALE, dtype)))
    # The Tanh takes over the Erf's output tensor, so every consumer reads the approximation.
    graph.nodes.append(gs.Node("Tanh", name=f"{erf.name}_tanh", inputs=[inner], outputs=list(erf.outputs)))
    erf.outputs.clear()
    erf.inputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


def _round_constants(graph: gs.Graph) -> list[str]:
    """Every float weight read through fp16; returns the weights that overflow fp16."""
    hazards = []
    for tensor in [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.dtype == np.float32]:
        hazards += _fp16_overflow(tensor)
        _read_through_fp16(graph, tensor)
    return hazards


def _fp16_overflow(constant: gs.Constant) -> list[str]:
    values = peek_values(constant)
    if not exceeds_fp16(values):
        return []
    overflow = np.isfinite(values) & (np.abs(values) > FP16_MAX)
    if not overflow.any():
        return []
    example = float(values[overflow].flat[0])
    return [f"constant {constant.name} ({example:.4g}) overflows fp16: becomes {'-' if example < 0 else '+'}inf "
            f"on the NPU"]


def _read_through_fp16(graph: gs.Graph, constant: gs.Constant) -> None:
    """Consumers read Cast(Cast(constant, fp16), fp32); ONNX Runtime folds it into one rounded weight."""
    rounded = gs.Variable(f"{constant.name}__fp16", dtype=np.float32, shape=constant.shape)
    replace_uses(constant, rounded, graph)
    half = add_node(graph, "Cast", [constant], name=f"{constant.name}__to_fp16", attrs={"to": TensorProto.FLOAT16},
                    dtype=np.float16, shape=constant.shape)[0]
    graph.nodes.append(gs.Node("Cast", name=f"{constant.name}__from_fp16", attrs={"to": TensorProto.FLOAT},
                               inputs=[half], outputs=[rounded]))


def _round_every_output(graph: gs.Graph) -> None:
    """After each op, Cast its float outputs to fp16 and back: the op's result stored as fp16."""
    for node in list(graph.nodes):
        for index, tensor in enumerate(list(node.outputs)):
            if tensor.dtype is None or np.dtype(tensor.dtype) != np.float32:
                continue
            exact = gs.Variable(f"{tensor.name}__fp32", dtype=np.float32, shape=tensor.shape)
            node.outputs[index] = exact
            half = add_node(graph, "Cast", [exact], attrs={"to": TensorProto.FLOAT16},
                            dtype=np.float16, shape=tensor.shape)[0]
            graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}__round", attrs={"to": TensorProto.FLOAT},
                                       inputs=[half], outputs=[tensor]))


def _save_emulation(model: ModelSource, path: Path) -> list[str]:
    """Write the emulated model to `path`; returns its fp16 hazards."""
    emulated = emulate_ascend_fp16(model)
    save_graph(emulated.graph, path)
    return emulated.hazards


class EmulationBackend(OrtBackend):
    """The emulated model on ORT CPU; `notes` carry the graph's fp16 hazards for the report.

    The emulated model is built for the session, on the first `run`, and not kept: `notes` are
    known from then on.
    """

    def __init__(self, model: ModelSource | Path, *, threads: int | None = None) -> None:
        super().__init__(model, name=EMULATION_NAME, kind="emulation", threads=threads)
        self.notes: list[str] = []

    @contextmanager
    def _session_model(self) -> Iterator[Path]:
        # A file, with the emulated graph gone before ONNX Runtime loads it: handed a ModelProto, ORT
        # would hold it, its serialised bytes and its own copy of the weights at once. The weights the
        # emulation did not touch (all: it reads them through Casts) are copied from the model's file.
        with tempfile.TemporaryDirectory(prefix="bertopt-emulation-") as folder:
            path = Path(folder) / "emulated.onnx"
            self.notes = _save_emulation(self._model, path)
            gc.collect()  # the emulated gs graph is a reference cycle that holds the weights
            yield path

    def padding_row_check(self, feed: dict[str, np.ndarray]) -> str | None:
        """Run one all-padding batch (zero ids, mask, types), which is how ais_bench fills the last batch.

        Returns a note when any output is NaN/inf there: harmless for the discarded padding rows
        themselves, but the sign of a mask constant that overflows fp16.
        """
        outputs = self.run({name: np.zeros_like(value) for name, value in feed.items()})
        bad = {name: int(np.count_nonzero(~np.isfinite(v))) for name, v in outputs.items()}
        if not any(bad.values()):
            return None
        counts = ", ".join(f"{name} {count}/{outputs[name].size}" for name, count in bad.items() if count)
        return f"an all-padding batch (as ais_bench pads the last batch) gives NaN/inf: {counts}"
