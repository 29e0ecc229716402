"""Ascend-numerics EMULATION on ONNX Runtime: the optimized graph computed the way the OM computes it.

This is an emulation, labelled so everywhere; it never stands in for a run on the device. It
reproduces two numeric choices ATC makes, each as the user chose it:

**The Gelu kernel** (``--gelu-impl``: ``high_performance``, the seed's, or ``high_precision``), as
`bertopt.ascend.kernels` describes it per CANN version: from CANN 5.1 high_performance is the
piecewise-quadratic FastGeluV2 form computed step by step in the input's dtype (fp16 under
force_fp16), high_precision the tanh form in fp32. ATC computes as Gelu:

- each ONNX ``Gelu`` op (as ATC's Gelu; its ``approximate`` attribute is not read, unverified);
- each erf subgraph its ``GeluONNXFusionPass`` fuses (canndev mirror ``dengguojie/vue-element-admin``,
  ``ops/built-in/fusion_pass/graph_fusion/ai_core/gelu_onnx_fusion_pass.cc``, 2022-02-10):
  ``RealDiv(x, c) -> Erf -> Add(., 1) -> Mul(x, .) -> Mul(., 0.5)`` or ``Mul(Mul(x, 0.5), Add)``, with
  ``|c - 1.41421| <= 1e-5`` in fp32, the Add's constant 1 and the Mul's 0.5 within fp32 epsilon, and the
  Div, Erf, Add and first Mul each feeding only the next. Anything else, e.g. the ``Mul(x, 0.7071)``
  spelling or ``Div(x, 1.4142)`` (1.0e-5 off), stays an Erf and is computed op by op (a note says so).

**The precision mode** (``--precision_mode`` or ``--precision_mode_v2`` given through ``--atc-arg``;
default ``force_fp16``, ATC's default on 310P). Values and meanings from ATC's pages
(CANN 6.0.1 ``aoepar_16_044``, CANN 9.0 ``atlasatcparam_16_0068`` / ``_0069`` on hiascend.com), for an
fp32 ONNX model:

- ``force_fp16`` / ``fp16``: every op in fp16;
- ``must_keep_origin_dtype`` / ``origin``: every op in fp32, nothing rounded;
- ``allow_fp32_to_fp16``: matrix ops (MatMul, Gemm) in fp16, vector ops keep fp32;
- ``force_fp32`` / ``cube_fp16in_fp32out``: matrix ops take fp16 inputs and write fp32 (the docs'
  first choice for them), vector ops fp32;
- ``allow_mix_precision`` / ``allow_mix_precision_fp16`` / ``mixed_float16``: APPROXIMATE. Ops whose
  ops-info has ``precision_reduce=true`` go to fp16 (on 310P: MatMul, MatMulV2, BatchMatMul(V2), GEMM;
  ``aic-ascend310p-ops-info.ini`` in the canndev mirror, 2022; no op of a BERT graph has ``false``),
  the others (gray list) follow "the previous operator" (docs). GE decides that per input from the
  producer of each input in turn, the first one deciding (``hicann/ge``,
  ``.../dtype_strategy/op_dtype_selection_strategy_allow_mix_precision_base.cc``, RunForOpInGrayList);
  the emulation lets an op follow the producer of its first computed float input (weights are read in
  the op's dtype, so a bias-first ``Add(bias, MatMul)`` follows the MatMul as ATC's bias fusion would)
  and keeps fp32 where there is none. ATC's graph fusions before dtype selection are not modelled.
- the bf16 and hif8 modes (``allow_mix_precision_bf16``, ``allow_fp32_to_bf16``, ``mixed_bfloat16``,
  ``mixed_hif8``, ``cube_hif8``) exist only on other chips (docs: bf16 on Atlas A2/A3) and are not
  modelled; the emulation then computes as force_fp16 and says so in its notes, as for an unknown value.

Where an op runs in fp16 its float inputs are rounded to fp16 (weights read through a ``Cast`` to fp16
and back, which ONNX Runtime folds into the weight when it builds the session, with numpy's rounding,
so no rounded copy of the weights is made here) and so is each float output (``Cast`` to fp16 and back),
while the op itself runs on ONNX Runtime's fp32 kernels. Graph int inputs stay int64; outputs are fp32.
So values beyond +-65504 become inf (a -3.4e38 mask constant is -inf), and each tensor carries fp16's
11-bit precision, as on the NPU, whose cube units also accumulate in fp32 and write fp16.

Why rounding and not an fp16 graph: ORT 1.32's CPU provider loads an all-fp16 BERT (MatMul,
Softmax, Erf, LayerNormalization, ReduceMean, Pow... all accepted), but for ops without an fp16
kernel it silently inserts Casts and computes in fp32, so which tensors get rounded depends on ORT's
kernel coverage. Rounding after every op does not, and it is the stricter of the two: on bert-tiny
(bs2 seq16, 4 samples) it differs from fp32 by up to 3.6e-4 on the logits against 1.7e-4 to 2.3e-4
for the all-fp16 graph, and both give the same NaNs from a -3.4e38 mask constant.
"""

from __future__ import annotations

import gc
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from bertopt.ascend.cann import DEFAULT_VERSION
from bertopt.ascend.kernels import GeluKernel, gelu_kernel, kernel_gelu
from bertopt.graph import (FP16_MAX, ModelSource, add_node, exceeds_fp16, infer_shapes, load_graph, peek_values,
                           producer, save_graph, to_model)
from bertopt.graph.builder import Builder
from bertopt.graph.opset import in_onnx_domain
from bertopt.graph.pattern import Const, Match, OneOf, Op, Var
from bertopt.graph.rules import Rule, apply_rules
from bertopt.validation.backends.ort import OrtBackend

DEFAULT_GELU = "high_performance"  # the seed's --op_select_implmode
DEFAULT_PRECISION = "force_fp16"  # ATC's default --precision_mode on 310P
CUBE_OPS = frozenset({"MatMul", "Gemm"})  # ONNX ops ATC runs on the cube unit (MatMulV2, BatchMatMulV2, GEMM)

# Per op: FP16 (inputs and outputs fp16), FP16_IN (fp16 inputs, fp32 output), FP32; FOLLOW for vector ops
# under mixed precision (ATC's gray list).
FP16, FP16_IN, FP32, FOLLOW = "fp16", "fp16 in, fp32 out", "fp32", "follow"

# ATC's GeluONNXFusionPass constants (gelu_onnx_fusion_pass.cc): RealDiv by 1.41421 within 1e-5.
ATC_GELU_DIVISOR, ATC_GELU_DIVISOR_TOLERANCE = np.float32(1.41421), np.float32(1e-5)
FP32_EPSILON = np.finfo(np.float32).eps
PLACEHOLDER_DOMAIN = "bertopt.emulation"  # a whole Gelu while precisions are decided; never exported


@dataclass(frozen=True)
class PrecisionPolicy:
    cube: str  # FP16 | FP16_IN | FP32
    vector: str  # FP16 | FP32 | FOLLOW
    note: str | None = None  # said in the candidate's notes: approximation or not modelled


_MIXED = PrecisionPolicy(FP16, FOLLOW, "modelled approximately: MatMul/Gemm in fp16 (310P ops-info "
                         "precision_reduce=true), every other op follows the producer of its first computed "
                         "input (ATC's gray list); ATC's fusions before it picks dtypes are not modelled")
PRECISION_POLICIES = {
    "force_fp16": PrecisionPolicy(FP16, FP16), "fp16": PrecisionPolicy(FP16, FP16),
    "must_keep_origin_dtype": PrecisionPolicy(FP32, FP32), "origin": PrecisionPolicy(FP32, FP32),
    "allow_fp32_to_fp16": PrecisionPolicy(FP16, FP32),
    "force_fp32": PrecisionPolicy(FP16_IN, FP32), "cube_fp16in_fp32out": PrecisionPolicy(FP16_IN, FP32),
    "allow_mix_precision": _MIXED, "allow_mix_precision_fp16": _MIXED, "mixed_float16": _MIXED,
}
UNMODELLED_PRECISIONS = ("allow_mix_precision_bf16", "allow_fp32_to_bf16", "mixed_bfloat16", "mixed_hif8",
                         "cube_hif8")


def precision_policy(value: str) -> PrecisionPolicy:
    """How the emulation computes under precision mode `value`; never refuses (ATC judges the value)."""
    if value in PRECISION_POLICIES:
        return PRECISION_POLICIES[value]
    why = ("a bf16/hif8 mode, not available on Atlas inference products (310P)" if value in UNMODELLED_PRECISIONS
           else "not a precision mode value ATC documents")
    return PrecisionPolicy(FP16, FP16, f"not modelled ({why}): emulated as {DEFAULT_PRECISION}")


def emulation_name(precision: str = DEFAULT_PRECISION, gelu: str = DEFAULT_GELU) -> str:
    return f"Ascend emulation: {precision}, Gelu {gelu} (ORT CPU)"


EMULATION_NAME = emulation_name()


@dataclass
class Emulated:
    graph: gs.Graph  # its weights still where the model was read from: save_graph streams them
    hazards: list[str]  # fp16 problems visible in the graph itself, e.g. constants that overflow
    gelus: int  # Gelu computations switched to the chosen kernel
    notes: list[str] = field(default_factory=list)  # what the emulation could not model, or only approximately

    @property
    def model(self) -> onnx.ModelProto:
        """The emulated model in memory, weights included."""
        return to_model(self.graph)


def emulate_ascend(model: ModelSource, *, gelu: str = DEFAULT_GELU, precision: str = DEFAULT_PRECISION,
                   cann: str = DEFAULT_VERSION) -> Emulated:
    """The model as the Ascend OM computes it: the chosen Gelu kernel and precision mode."""
    kernel = gelu_kernel(gelu, cann)
    policy = precision_policy(precision)
    graph = load_graph(model)
    infer_shapes(graph)  # every op output needs its dtype to be rounded
    gelus, unfused = _collapse_gelus(graph)
    precisions = _precisions(graph, policy)
    hazards = _apply_precisions(graph, precisions)
    _expand_gelus(graph, kernel, precisions)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    notes = [f"precision mode {precision}: {policy.note}"] if policy.note else []
    if unfused:
        notes.append(f"{unfused} Erf node(s) not in the form ATC fuses into Gelu (GeluONNXFusionPass: "
                     "Div(x, 1.41421 +- 1e-5) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)): computed op by op as Erf")
    return Emulated(graph, hazards, gelus, notes)


# --------------------------------------------------------------------------- Gelu sites


def _collapse_gelus(graph: gs.Graph) -> tuple[int, int]:
    """Each Gelu ATC computes as one op becomes one placeholder node; returns how many, and the Erfs left."""
    onnx_gelu = Op("Gelu", Var("x"), where=(in_onnx_domain, "the ONNX op"))
    placeholder = Rule(OneOf(onnx_gelu, _atc_erf_gelu()),
                       lambda match, b: b.Gelu(match["x"], domain=PLACEHOLDER_DOMAIN), name="gelu")
    collapsed = apply_rules(graph, [placeholder])["gelu"]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return collapsed, sum(node.op == "Erf" for node in graph.nodes)


def _atc_erf_gelu() -> OneOf:
    """The erf Gelu GeluONNXFusionPass fuses, each constant one scalar compared in fp32: Mul(Mul(x, Add), 0.5)
    or Mul(Mul(x, 0.5), Add); every intermediate read by the next node only (the matcher's rule)."""
    x = Var("x")
    divisor = _scalar_near(ATC_GELU_DIVISOR, ATC_GELU_DIVISOR_TOLERANCE)
    gate = Op("Add", Op("Erf", Op("Div", x, Const(where=divisor))), Const(where=_scalar_near(1.0, FP32_EPSILON)))
    half = Const(where=_scalar_near(0.5, FP32_EPSILON))
    return OneOf(Op("Mul", Op("Mul", x, gate), half), Op("Mul", Op("Mul", x, half), gate))


def _scalar_near(wanted: float, tolerance: np.float32) -> tuple:
    def near(values: np.ndarray) -> bool:
        return values.size == 1 and abs(np.float32(values.item()) - np.float32(wanted)) <= tolerance

    return near, f"a scalar within {tolerance:.3g} of {wanted:.6g} in fp32"


def _expand_gelus(graph: gs.Graph, kernel: GeluKernel, precisions: dict[int, str]) -> None:
    """Each placeholder computed as `kernel` does, in fp16 steps where its precision is fp16."""
    def expand(match: Match, b: Builder) -> gs.Tensor:
        dtype = kernel.step_dtype(np.float16 if precisions[id(match.root)] == FP16 else np.float32)
        return kernel_gelu(b, match["x"], kernel.form, dtype)

    placeholder = Op("Gelu", Var("x"), where=lambda node: node.domain == PLACEHOLDER_DOMAIN)
    apply_rules(graph, [Rule(placeholder, expand, name="kernel")])


# --------------------------------------------------------------------------- precisions


def _precisions(graph: gs.Graph, policy: PrecisionPolicy) -> dict[int, str]:
    """Each node's precision (by id), in topological order so that a follower sees its producer's."""
    chosen: dict[int, str] = {}
    for node in graph.nodes:
        if node.op in CUBE_OPS:
            chosen[id(node)] = policy.cube
        elif policy.vector == FOLLOW:
            chosen[id(node)] = _followed(node, chosen)
        else:
            chosen[id(node)] = policy.vector
    return chosen


def _followed(node: gs.Node, chosen: dict[int, str]) -> str:
    for tensor in node.inputs:
        source = producer(tensor)
        if source is not None and _is_float(tensor):
            return FP16 if chosen[id(source)] == FP16 else FP32
    return FP32


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _apply_precisions(graph: gs.Graph, precisions: dict[int, str]) -> list[str]:
    """Round the inputs of fp16 ops that are not fp16 yet, and the outputs of fp16 ops; returns the
    fp16 hazards of the weights read in fp16."""
    rounded = {id(t) for node in graph.nodes if precisions[id(node)] == FP16 for t in node.outputs if _is_float(t)}
    copies: dict[int, gs.Tensor] = {}
    hazards: list[str] = []
    for node in list(graph.nodes):
        if precisions[id(node)] in (FP16, FP16_IN):
            for index, tensor in enumerate(node.inputs):
                if _is_float(tensor) and id(tensor) not in rounded:
                    node.inputs[index] = _fp16_copy(graph, tensor, copies, hazards)
        if precisions[id(node)] == FP16:
            _round_outputs(graph, node)
    return hazards


def _fp16_copy(graph: gs.Graph, tensor: gs.Tensor, copies: dict[int, gs.Tensor], hazards: list[str]) -> gs.Tensor:
    """`tensor` read through fp16 (one copy shared by every fp16 consumer); ORT folds it for a weight."""
    if id(tensor) not in copies:
        if isinstance(tensor, gs.Constant):
            hazards += _fp16_overflow(tensor)
        copies[id(tensor)] = _through_fp16(graph, tensor, f"{tensor.name}__fp16")
    return copies[id(tensor)]


def _through_fp16(graph: gs.Graph, tensor: gs.Tensor, name: str, into: gs.Variable | None = None) -> gs.Variable:
    half = add_node(graph, "Cast", [tensor], name=f"{name}__to_fp16", attrs={"to": TensorProto.FLOAT16},
                    dtype=np.float16, shape=tensor.shape)[0]
    out = into if into is not None else gs.Variable(name, dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("Cast", name=f"{name}__from_fp16", attrs={"to": TensorProto.FLOAT},
                               inputs=[half], outputs=[out]))
    return out


def _round_outputs(graph: gs.Graph, node: gs.Node) -> None:
    """Cast the node's float outputs to fp16 and back: its result stored as fp16, under the same tensor."""
    for index, tensor in enumerate(list(node.outputs)):
        if _is_float(tensor):
            exact = gs.Variable(f"{tensor.name}__fp32", dtype=np.float32, shape=tensor.shape)
            node.outputs[index] = exact
            _through_fp16(graph, exact, f"{tensor.name}__round", into=tensor)


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


def _save_emulation(model: ModelSource, path: Path, **choices: str) -> list[str]:
    """Write the emulated model to `path`; returns its notes: fp16 hazards, then what is not modelled."""
    emulated = emulate_ascend(model, **choices)
    save_graph(emulated.graph, path)
    return emulated.hazards + emulated.notes


class EmulationBackend(OrtBackend):
    """The emulated model on ORT CPU; `notes` carry the graph's fp16 hazards and what is not modelled.

    `gelu`: the Gelu implementation mode ATC compiles with (`informational`: a mode atc was not asked
    for, emulated beside the one it was so a user can compare the two); `precision`: the value of the user's
    ``--precision_mode`` or ``--precision_mode_v2`` (both flags' values are distinct), None for ATC's
    default; `cann`: the CANN version, which decides the Gelu kernel. A bad `gelu` or `cann` is a
    BertoptError here; a precision mode the emulation cannot model is emulated as force_fp16 and said so
    in `notes`. The emulated model is built for the session, on the first `run`, and not kept: `notes`
    are known from then on.
    """

    def __init__(self, model: ModelSource | Path, *, gelu: str = DEFAULT_GELU, precision: str | None = None,
                 cann: str | None = None, threads: int | None = None, informational: bool = False) -> None:
        self.precision = precision or DEFAULT_PRECISION
        self.gelu_kernel = gelu_kernel(gelu, cann or DEFAULT_VERSION)
        name = emulation_name(self.precision, gelu) + (" [for comparison]" if informational else "")
        super().__init__(model, name=name, kind="emulation", threads=threads)
        self.informational = informational
        self.notes: list[str] = []

    @contextmanager
    def _session_model(self) -> Iterator[Path]:
        # A file, with the emulated graph gone before ONNX Runtime loads it: handed a ModelProto, ORT
        # would hold it, its serialised bytes and its own copy of the weights at once. The weights the
        # emulation did not touch (all: it reads them through Casts) are copied from the model's file.
        with tempfile.TemporaryDirectory(prefix="bertopt-emulation-") as folder:
            path = Path(folder) / "emulated.onnx"
            self.notes = _save_emulation(self._model, path, gelu=self.gelu_kernel.impl_mode,
                                         precision=self.precision, cann=self.gelu_kernel.cann)
            gc.collect()  # the emulated gs graph is a reference cycle that holds the weights
            yield path

    def padding_row_check(self, feed: dict[str, np.ndarray]) -> str | None:
        """Run one all-zero batch (zero ids, mask, types): what ais_bench feeds without --input (its
        pure-inference mode; a last partial batch is padded with copies of a real row instead), and a row
        whose mask hides every token.

        Returns a note when any output is NaN/inf there: the sign of a mask constant that overflows fp16.
        """
        outputs = self.run({name: np.zeros_like(value) for name, value in feed.items()})
        bad = {name: int(np.count_nonzero(~np.isfinite(v))) for name, v in outputs.items()}
        if not any(bad.values()):
            return None
        counts = ", ".join(f"{name} {count}/{outputs[name].size}" for name, count in bad.items() if count)
        return f"an all-zero batch (fully masked rows, as ais_bench feeds without --input) gives NaN/inf: {counts}"
