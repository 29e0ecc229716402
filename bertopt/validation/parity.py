"""Numeric parity: realistic inputs, ONNX Runtime runs, and an output comparator.

Every rewrite is checked by running the original and the rewritten graph on the same realistic
inputs and comparing their outputs with Polygraphy's semantics (``polygraphy/comparator/compare.py``,
``CompareFunc.simple`` in its default "elemwise" mode):

- ``absdiff = |candidate - reference|`` and ``reldiff = absdiff / |reference|``, where reference
  zeros are replaced by the float64 epsilon (2.22e-16) so the ratio stays defined;
- an element fails only when ``absdiff > atol`` AND ``reldiff > rtol``; a NaN in either diff
  counts as exceeding its tolerance, so any NaN fails, and so do infinities, even matching ones
  (inf - inf is NaN: Polygraphy's default ``infinities_compare_equal=False``);
- tolerances can be given per output (a dict by output name; the key ``""`` sets the default for
  the outputs it does not name, as in Polygraphy).

Beyond Polygraphy's report, each output also gets the exact smallest tolerances that would have
passed given the other one, and QA models get a task-level figure: how often the predicted
answer span is the same.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from bertopt.errors import BertoptError, first_line
from bertopt.graph import fits_protobuf, save_model, scan_file, static_dim
from bertopt.model.facts import ModelFacts, refuse_beyond_memory

# The tolerances, all of them here (atol and rtol alike: an element fails where it is off by more than both).
# A rewrite of an fp32 model on ONNX Runtime fp32: 1e-4, ONNX Runtime's BERT parity CI (facts note, section 7).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
# An fp16 model compared with its fp16 original. The rewrites only re-round fp16 arithmetic (a Div by
# 8 becomes a Mul by 0.125, a LayerNorm or Gelu is spelled differently, ONNX Runtime picks other
# kernels for static shapes), so an output moves by a few units in the last place of fp16, whose
# unit roundoff is 2**-11 = 4.9e-4 (IEEE 754 binary16: 11 significant bits). 2**-7 = 7.8e-3 is 16 of
# those units. Measured after `default --target ort` on fp16 exports (batch 2, seq 128, 4 samples):
# bert-base 1.95e-3 (dynamo 18) and 9.8e-4 (legacy 14) max abs on the logits, i.e. 2 units in the
# last place at their magnitude; a 4-layer hidden-256 BERT 1.2e-3 (tests/test_exports_users_bring.py).
# A real mistake (a mask in the wrong place, a wrong scale) moves outputs by far more.
FP16_ATOL = FP16_RTOL = 2.0 ** -7
# Ascend numerics (fp16 by default on 310P): the emulation, the OM on an NPU, ais_bench results. fp16 BERT
# needs ~1e-2 (TensorRT issues; facts note, section 7).
ASCEND_TOLERANCE = 1e-2
# By candidate kind (bertopt.validation.backends): a run gives the optimized ONNX its model's dtype's
# instead (`tolerances_for`).
KIND_TOLERANCE = {"onnx": DEFAULT_ATOL, "emulation": ASCEND_TOLERANCE, "npu": ASCEND_TOLERANCE,
                  "results": ASCEND_TOLERANCE}
# Polygraphy adds this to zero reference values so relative differences stay finite.
REL_EPSILON = 2.220446049250313e-16
# |candidate - reference| histogram bins: half decades from 1e-9 to 10, the same for every output and
# candidate so their pictures compare (fp32 rewrites land near 1e-7, fp16 near 1e-3).
HISTOGRAM_EDGES = tuple(float(10.0 ** (k / 2)) for k in range(-18, 3))

# bert-base vocabularies (uncased and cased, and MiniLM which reuses them) put [PAD] at 0 and
# [CLS]/[SEP] at 101/102; small test vocabularies keep their special tokens in ids 0..3.
BERT_CLS, BERT_SEP = 101, 102
SMALL_CLS, SMALL_SEP = 2, 3
FIRST_ORDINARY_ID = 4
PAD_ID = 0
MIN_VOCAB = 8

InputSpecs = dict[str, tuple[np.dtype, tuple]]


# --------------------------------------------------------------------------- realistic inputs

def input_specs_of(model: onnx.ModelProto | gs.Graph) -> InputSpecs:
    """Graph input name -> (numpy dtype, shape); dims are ints, symbolic names, or None; an input of
    unknown rank has shape (). `model` is a model or a graph already loaded (its inputs as they are now).

    Initializers that old IR versions also list as graph inputs are left out: nobody feeds them.
    """
    if isinstance(model, gs.Graph):
        return {tensor.name: (np.dtype(tensor.dtype), tuple(tensor.shape or ()))
                for tensor in model.inputs if isinstance(tensor, gs.Variable)}
    initializers = {init.name for init in model.graph.initializer}
    specs: InputSpecs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs[value.name] = (dtype, tuple(_dim_of(d) for d in tensor_type.shape.dim))
    return specs


def _dim_of(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def realistic_feeds(facts: ModelFacts, input_specs: InputSpecs | None = None, *, batch: int,
                    seq: int, seed: int = 0, count: int = 1) -> list[dict[str, np.ndarray]]:
    """`count` feeds shaped like tokenised, padded question/context pairs.

    Each row reads ``[CLS] a.. [SEP] b.. [SEP] [PAD]..``: a random valid length in [1, seq]
    (with batch > 1, at least one row is fully valid and one is padded), a random segment
    boundary, ordinary ids uniform in [4, vocab), padding id 0, token types 0 then 1 (all 0 when
    the model has a single token type), masks 1 then 0. Special ids follow the BERT WordPiece
    layout (CLS 101, SEP 102) when the vocabulary is that large, else ids 2 and 3.

    `input_specs` (see `input_specs_of`) gives each input's dtype and shape; without it, every
    input in `facts.roles` is int64 ``[batch, seq]``. The same seed gives the same feeds. An additive
    mask (`facts.mask_kind`) is 0 where a token is kept and finfo(dtype).min where it is padding,
    what transformers' extended masks hold.
    Raises BertoptError for inputs without a known role, non-integer ids, static dims that
    disagree with batch/seq, or a vocabulary too small to hold the special tokens.
    """
    if count < 1:
        raise BertoptError(f"count must be >= 1 (got {count})")
    check_feedable(facts, input_specs, batch=batch, seq=seq)
    if facts.modality != "text":
        return content_feeds(facts, input_specs, batch=batch, seed=seed, count=count)
    if input_specs is None:
        input_specs = {name: (np.dtype(np.int64), (batch, seq)) for name in facts.roles}
    vocab = facts.vocab_size
    two_segments = facts.type_vocab_size is None or facts.type_vocab_size >= 2
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        ids, types, mask = _token_batch(rng, batch, seq, vocab, two_segments)
        by_role = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
        feeds.append({name: _as_input(by_role[facts.roles[name]], facts.roles[name], facts, dtype)
                      for name, (dtype, _) in input_specs.items()})
    return feeds


def check_feedable(facts: ModelFacts, input_specs: InputSpecs | None, *, batch: int, seq: int) -> None:
    """Refuse (one line) what realistic feeds cannot be made for, before anything is built: a batch or seq
    below 1 or beyond this machine's memory, and for text models an input without a known role, ids that
    are not integers, a static dim other than batch or seq, a vocabulary too small for the special tokens.
    `optimize` and `run` call it before their passes: they check their output on these feeds."""
    if batch < 1 or seq < 1:
        raise BertoptError(f"batch and seq must be >= 1 (got {batch}, {seq})")
    refuse_beyond_memory(facts, batch, seq)
    if facts.modality != "text":
        return
    if input_specs is not None:
        _check_specs(facts, input_specs, batch, seq)
    if facts.vocab_size < MIN_VOCAB:
        raise BertoptError(f"vocabulary size {facts.vocab_size} is too small for realistic token ids")


# The processors' normalisation (transformers.image_utils): ViT's checkpoints use IMAGENET_STANDARD (0.5, 0.5),
# DeiT's IMAGENET_DEFAULT, CLIP's OPENAI_CLIP; each channel is (pixel / 255 - mean) / std.
IMAGE_NORMALISATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip-vision": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
# Whisper's feature extractor: log10 of a mel power spectrogram, floored at 8 below its maximum, then
# (x + 4) / 4 (WhisperFeatureExtractor._np_extract_fbank_features); a clip shorter than 30 s is padded
# with silence, whose frames hold the floor.
LOG_MEL_RANGE = 8.0


def content_feeds(facts: ModelFacts, input_specs: InputSpecs | None, *, batch: int, seed: int = 0,
                  count: int = 1) -> list[dict[str, np.ndarray]]:
    """Feeds for image and audio models: images in the processor's normalised range (smooth random scenes
    of 8-bit pixels, normalised as the family's processor does), or log-mel-like features (a random
    spectrum over a random length, the rest silence at the floor, scaled as Whisper's extractor does).

    The content input's dims other than batch come from `input_specs` where static, else from the facts
    (`image_size`, `frames`); raises BertoptError when neither gives them.
    """
    [(name, role)] = [(n, r) for n, r in facts.roles.items() if r in ("pixel_values", "input_features")]
    dtype, shape = (input_specs or {}).get(name, (np.dtype(np.float32), ()))
    dims = _content_dims(facts, role, shape, batch)
    rng = np.random.default_rng(seed)
    make = _images if role == "pixel_values" else _log_mel
    return [{name: make(rng, dims, facts).astype(dtype)} for _ in range(count)]


def _content_dims(facts: ModelFacts, role: str, shape: tuple, batch: int) -> tuple[int, ...]:
    if shape and static_dim(shape[0]) and shape[0] != batch:
        raise BertoptError(f"the {role} input has batch {shape[0]}; cannot feed batch {batch}")
    if role == "pixel_values":
        channels = shape[1] if len(shape) == 4 and static_dim(shape[1]) else 3
        size = tuple(shape[2:4]) if len(shape) == 4 and all(map(static_dim, shape[2:4])) \
            else facts.image_size
        if size is None:
            raise BertoptError("the image size is not static in the model: give --image-size")
        return (batch, channels, *size)
    if len(shape) == 3 and all(map(static_dim, shape[1:])):
        return (batch, *shape[1:])
    raise BertoptError("the audio input's mel bins and frames are not static in the model: give --frames")


def _images(rng: np.random.Generator, dims: tuple[int, ...], facts: ModelFacts) -> np.ndarray:
    """Smooth scenes (a coarse random grid upsampled, plus pixel noise) of 8-bit values, normalised."""
    batch, channels, height, width = dims
    coarse = rng.uniform(0, 255, size=(batch, channels, max(height // 8, 1), max(width // 8, 1)))
    image = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :height, :width]
    image = np.pad(image, ((0, 0), (0, 0), (0, height - image.shape[2]), (0, width - image.shape[3])), mode="edge")
    pixels = np.clip(np.round(image + rng.normal(0, 12, size=image.shape)), 0, 255) / 255.0
    mean, std = IMAGE_NORMALISATION.get(facts.family, IMAGE_NORMALISATION["vit"])
    mean = np.resize(np.array(mean), channels)[None, :, None, None]
    std = np.resize(np.array(std), channels)[None, :, None, None]
    return (pixels - mean) / std


def _log_mel(rng: np.random.Generator, dims: tuple[int, ...], facts: ModelFacts) -> np.ndarray:
    batch, bins, frames = dims
    # a spectral envelope falling with frequency, modulated over time, over exponential noise
    envelope = np.linspace(0.0, -3.0, bins)[None, :, None]
    power = 10.0 ** (envelope + rng.normal(0, 0.5, size=(batch, 1, frames))) * rng.exponential(1.0, (batch, bins, frames))
    log = np.log10(np.maximum(power, 1e-10))
    for row, length in enumerate(_valid_lengths(rng, batch, frames)):
        log[row, :, length:] = -10.0  # silence: floored below
    log = np.maximum(log, log.max(axis=(1, 2), keepdims=True) - LOG_MEL_RANGE)
    return (log + 4.0) / 4.0


def _as_input(values: np.ndarray, role: str, facts: ModelFacts, dtype: np.dtype) -> np.ndarray:
    if role == "attention_mask" and facts.mask_kind == "additive":
        return np.where(values != 0, 0, np.finfo(dtype).min).astype(dtype)
    return values.astype(dtype)


def kept_tokens(facts: ModelFacts, feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """Which tokens a feed's attention mask keeps ([batch, seq] bool), or None without a mask input."""
    mask = feed.get(facts.input_for("attention_mask"))
    if mask is None:
        return None
    return mask == 0 if facts.mask_kind == "additive" else mask != 0


def _check_specs(facts: ModelFacts, specs: InputSpecs, batch: int, seq: int) -> None:
    unknown = [name for name in specs if name not in facts.roles]
    if unknown:
        raise BertoptError(f"no known role for model input(s) {', '.join(unknown)}; "
                           f"known roles: {facts.roles or 'none'}")
    for name, (dtype, shape) in specs.items():
        role = facts.roles[name]
        if role != "attention_mask" and not np.issubdtype(dtype, np.integer):
            raise BertoptError(f"input {name} ({role}) has dtype {dtype}; expected an integer type")
        if len(shape) != 2 or any(isinstance(d, int) and d != want
                                  for d, want in zip(shape, (batch, seq))):
            raise BertoptError(f"input {name} has shape {shape}; cannot feed [{batch}, {seq}]")


def _token_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int,
                 two_segments: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cls_id, sep_id = (BERT_CLS, BERT_SEP) if vocab > BERT_SEP + 1 else (SMALL_CLS, SMALL_SEP)
    ids = np.full((batch, seq), PAD_ID, dtype=np.int64)
    types = np.zeros((batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row, length in enumerate(_valid_lengths(rng, batch, seq)):
        ids[row, :length] = rng.integers(FIRST_ORDINARY_ID, vocab, size=length)
        ids[row, 0] = cls_id
        mask[row, :length] = 1
        if length >= 2:
            ids[row, length - 1] = sep_id
        # Two segments need [CLS] a [SEP] b [SEP]: at least five tokens.
        if length >= 5:
            boundary = int(rng.integers(2, length - 2))
            ids[row, boundary] = sep_id
            if two_segments:
                types[row, boundary + 1:length] = 1
    return ids, types, mask


def _valid_lengths(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """Random lengths in [1, seq]; one full row and one padded row whenever both can exist."""
    lengths = rng.integers(1, seq + 1, size=batch)
    if batch > 1 and seq > 1:
        full, padded = rng.choice(batch, size=2, replace=False)
        lengths[full] = seq
        lengths[padded] = rng.integers(1, seq)
    return lengths


# --------------------------------------------------------------------------- ONNX Runtime

class OrtRunner:
    """One ONNX Runtime session on the CPU (or the given providers), sequential execution.

    The graph optimisation level stays ORT's default so the comparison sees what users run.
    `threads` sets the intra-op thread count (ORT picks one per core when None).
    """

    def __init__(self, model: Path | str | onnx.ModelProto, *, threads: int | None = None,
                 providers: list | None = None) -> None:
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads is not None:
            if threads < 1:
                raise BertoptError(f"threads must be >= 1 (got {threads})")
            options.intra_op_num_threads = threads
        self._session = _create_session(model, options, providers or ["CPUExecutionProvider"])
        self.input_names = [arg.name for arg in self._session.get_inputs()]
        self.output_names = [arg.name for arg in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. Raises BertoptError for missing or unknown inputs or a failed run."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise BertoptError(f"feeds do not match the model inputs: missing {missing}, "
                               f"unknown {extra}")
        try:
            values = self._session.run(self.output_names, feeds)
        except Exception as exc:  # ORT raises its own exception types, all without a base class
            raise BertoptError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from None
        return dict(zip(self.output_names, values))


def _create_session(model: Path | str | onnx.ModelProto, options: ort.SessionOptions,
                    providers: list) -> ort.InferenceSession:
    try:
        if not isinstance(model, onnx.ModelProto):
            path = Path(model)
            if not path.is_file():
                raise BertoptError(f"{path}: no such file")
            return ort.InferenceSession(str(path), options, providers=providers)
        if fits_protobuf(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        # Over 2 GiB a ModelProto cannot be serialised in one piece; ORT reads the external
        # data while it builds the session, so the folder can go right after.
        with tempfile.TemporaryDirectory(prefix="bertopt-ort-") as folder:
            path = save_model(model, Path(folder) / "model.onnx")
            return ort.InferenceSession(str(path), options, providers=providers)
    except BertoptError:
        raise
    except Exception as exc:  # ORT's Fail/InvalidGraph/... share no public base class
        raise BertoptError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from None


# --------------------------------------------------------------------------- comparison

@dataclass
class AbsHistogram:
    """Counts of the defined absolute differences in HISTOGRAM_EDGES bins: 20 numbers instead of
    the raw diffs, so the HTML report can draw the distribution and report.json stays small.

    Differences below the first edge (but not zero) count in the first bin, above the last in the last.
    """

    edges: list[float]
    counts: list[int]
    zeros: int  # exactly equal elements, which no log-spaced bin holds


@dataclass
class OutputStats:
    """Differences for one output over all samples; `reason` says why it could not be compared."""

    name: str
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    median_rel: float
    p99_rel: float
    atol: float
    rtol: float
    passed: bool
    nan_or_inf: int
    min_atol_to_pass: float
    min_rtol_to_pass: float
    reason: str | None = None
    abs_histogram: AbsHistogram | None = None


@dataclass
class Comparison:
    outputs: list[OutputStats]
    passed: bool
    span_agreement: float | None
    samples: int

    def to_dict(self) -> dict:
        """JSON-ready: NaN and infinite floats become None (undefined, or no tolerance passes)."""
        return _finite_or_none(asdict(self))

    def summary_line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        parts = [f"{verdict}: {len(self.outputs)} output(s) over {self.samples} sample(s)"]
        parts += [_describe(o) for o in self.outputs]
        if self.span_agreement is not None:
            parts.append(f"same answer span in {self.span_agreement:.1%} of rows")
        return " | ".join(parts)


def _describe(stats: OutputStats) -> str:
    if stats.reason:
        return f"{stats.name} FAILED: {stats.reason}"
    diffs = f"max abs {stats.max_abs:.3g} rel {stats.max_rel:.3g}"
    if stats.passed:
        return f"{stats.name} {diffs}"
    if math.isinf(stats.min_atol_to_pass) or math.isinf(stats.min_rtol_to_pass):
        hint = f"no tolerance passes: NaN/inf values, {stats.nan_or_inf} in the candidate"
    else:
        hint = f"passes at atol {stats.min_atol_to_pass:.3g} or at rtol {stats.min_rtol_to_pass:.3g}"
    return (f"{stats.name} FAILED: {diffs} exceed atol {stats.atol:g} and rtol {stats.rtol:g} "
            f"({hint})")


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def compare_outputs(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                    *, atol: float | dict[str, float] = DEFAULT_ATOL,
                    rtol: float | dict[str, float] = DEFAULT_RTOL,
                    masks: list[np.ndarray] | None = None) -> Comparison:
    """Compare outputs sample by sample (Polygraphy's elementwise rule, see the module docstring).

    Outputs are matched by name. An output that is missing on one side (in any sample), or whose
    shape differs, is a failed OutputStats with a `reason`, not an exception: a rewrite that
    loses an output is a parity failure to report. BertoptError is kept for unusable arguments:
    different sample counts, no samples, negative or NaN tolerances, a tolerance dict naming an
    output that exists on neither side (a typo would silently apply the default), or masks that do
    not fit the logits.

    `masks` (one ``[batch, seq]`` attention mask per sample) restricts the answer-span search of
    `span_agreement` to real tokens; the span figure is reported but does not decide `passed`.
    """
    if not reference or len(reference) != len(candidate):
        raise BertoptError(f"need the same, non-zero number of reference and candidate samples "
                           f"(got {len(reference)} and {len(candidate)})")
    names = _output_names(reference, candidate)
    _check_tolerances(atol, names, "atol")
    _check_tolerances(rtol, names, "rtol")
    outputs = [_compare_one(name, reference, candidate, _tolerance(atol, name, DEFAULT_ATOL),
                            _tolerance(rtol, name, DEFAULT_RTOL)) for name in names]
    return Comparison(outputs=outputs, passed=all(o.passed for o in outputs),
                      span_agreement=span_agreement(reference, candidate, masks),
                      samples=len(reference))


def _output_names(reference: list[dict], candidate: list[dict]) -> list[str]:
    """Reference order first, then outputs only the candidate has."""
    names = dict.fromkeys(name for sample in reference for name in sample)
    names.update(dict.fromkeys(name for sample in candidate for name in sample))
    return list(names)


def _check_tolerances(tolerance: float | dict[str, float], names: list[str], label: str) -> None:
    values = tolerance.values() if isinstance(tolerance, dict) else [tolerance]
    if any(not (float(v) >= 0) for v in values):
        raise BertoptError(f"{label} must be >= 0 (got {tolerance})")
    if isinstance(tolerance, dict):
        unknown = [k for k in tolerance if k and k not in names]
        if unknown:
            raise BertoptError(f"{label} names unknown output(s) {unknown}; outputs are {names}")


def _tolerance(tolerance: float | dict[str, float], name: str, default: float) -> float:
    if isinstance(tolerance, dict):
        return float(tolerance.get(name, tolerance.get("", default)))
    return float(tolerance)


def _compare_one(name: str, reference: list[dict], candidate: list[dict], atol: float,
                 rtol: float) -> OutputStats:
    reason = _incomparable(name, reference, candidate)
    if reason:
        return _failed_stats(name, atol, rtol, reason)
    ref = np.concatenate([_as_float(sample[name]) for sample in reference])
    cand = np.concatenate([_as_float(sample[name]) for sample in candidate])
    with np.errstate(invalid="ignore", over="ignore"):
        absdiff = np.abs(cand - ref)
        reldiff = absdiff / np.abs(np.where(ref == 0, REL_EPSILON, ref))
    abs_over = (absdiff > atol) | np.isnan(absdiff)
    rel_over = (reldiff > rtol) | np.isnan(reldiff)
    max_abs, mean_abs, median_abs, p99_abs = _summary(absdiff)
    max_rel, mean_rel, median_rel, p99_rel = _summary(reldiff)
    return OutputStats(
        name=name, max_abs=max_abs, mean_abs=mean_abs, median_abs=median_abs, p99_abs=p99_abs,
        max_rel=max_rel, mean_rel=mean_rel, median_rel=median_rel, p99_rel=p99_rel,
        atol=atol, rtol=rtol, passed=not bool(np.any(abs_over & rel_over)),
        nan_or_inf=int(np.count_nonzero(~np.isfinite(cand))),
        min_atol_to_pass=_smallest_passing(absdiff[rel_over]),
        min_rtol_to_pass=_smallest_passing(reldiff[abs_over]), abs_histogram=_abs_histogram(absdiff))


def _incomparable(name: str, reference: list[dict], candidate: list[dict]) -> str | None:
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        if name not in ref:
            return f"not in the reference outputs (sample {index})"
        if name not in cand:
            return f"missing from the candidate outputs (sample {index})"
        if np.shape(ref[name]) != np.shape(cand[name]):
            return (f"shape {np.shape(cand[name])} differs from the reference's "
                    f"{np.shape(ref[name])} (sample {index})")
    return None


def _failed_stats(name: str, atol: float, rtol: float, reason: str) -> OutputStats:
    nan = math.nan
    return OutputStats(name=name, max_abs=nan, mean_abs=nan, median_abs=nan, p99_abs=nan,
                       max_rel=nan, mean_rel=nan, median_rel=nan, p99_rel=nan, atol=atol,
                       rtol=rtol, passed=False, nan_or_inf=0, min_atol_to_pass=math.inf,
                       min_rtol_to_pass=math.inf, reason=reason)


def _as_float(array: np.ndarray) -> np.ndarray:
    # float64 holds every fp16/fp32 value exactly, and bools become 0/1 so |a - b| is their xor.
    return np.asarray(array).astype(np.float64).ravel()


def _summary(diff: np.ndarray) -> tuple[float, float, float, float]:
    """max, mean, median, 99th percentile of the defined (non-NaN) differences."""
    defined = diff[~np.isnan(diff)]
    if defined.size == 0:
        return (math.nan,) * 4
    with np.errstate(invalid="ignore", over="ignore"):
        return (float(defined.max()), float(defined.mean()), float(np.median(defined)),
                float(np.percentile(defined, 99)))


def _abs_histogram(absdiff: np.ndarray) -> AbsHistogram:
    defined = absdiff[~np.isnan(absdiff)]
    nonzero = np.clip(defined[defined > 0], HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    counts, _ = np.histogram(nonzero, bins=HISTOGRAM_EDGES)
    return AbsHistogram(list(HISTOGRAM_EDGES), [int(c) for c in counts], int(defined.size - (defined > 0).sum()))


def _smallest_passing(needed: np.ndarray) -> float:
    """The tolerance that clears every element in `needed` (strict > test: the max itself passes)."""
    if needed.size == 0:
        return 0.0
    if np.isnan(needed).any():
        return math.inf
    return float(needed.max())


# --------------------------------------------------------------------------- answer spans

def span_agreement(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                   masks: list[np.ndarray] | None = None) -> float | None:
    """Fraction of rows whose best answer span is the same, or None without 2-D QA logits.

    The best span maximises ``start[i] + end[j]`` over ``j >= i`` with both positions inside the
    mask. A row whose logits hold NaN at a real token has no span, so it never agrees.
    """
    if masks is not None and len(masks) != len(reference):
        raise BertoptError(f"got {len(masks)} masks for {len(reference)} samples")
    agreed = rows = 0
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        if not (_has_qa_logits(ref) and _has_qa_logits(cand)
                and ref["start_logits"].shape == cand["start_logits"].shape):
            return None
        mask = None if masks is None else np.asarray(masks[index])
        if mask is not None and mask.shape != ref["start_logits"].shape:
            raise BertoptError(f"mask shape {mask.shape} does not fit logits "
                               f"{ref['start_logits'].shape} (sample {index})")
        ref_spans = best_spans(ref["start_logits"], ref["end_logits"], mask)
        cand_spans = best_spans(cand["start_logits"], cand["end_logits"], mask)
        agreed += int(np.count_nonzero(np.all(ref_spans == cand_spans, axis=1)
                                       & (ref_spans[:, 0] >= 0)))
        rows += len(ref_spans)
    return agreed / rows if rows else None


def _has_qa_logits(outputs: dict[str, np.ndarray]) -> bool:
    start, end = outputs.get("start_logits"), outputs.get("end_logits")
    if start is None or end is None:
        return False
    return np.ndim(start) == 2 and np.shape(start) == np.shape(end)


def best_spans(start: np.ndarray, end: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``[rows, 2]`` (start, end) of each row's best span; (-1, -1) when NaN hides it."""
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    rows, seq = start.shape
    valid = np.ones((rows, seq), dtype=bool) if mask is None else np.asarray(mask) != 0
    scores = start[:, :, None] + end[:, None, :]
    allowed = np.triu(np.ones((seq, seq), dtype=bool)) & valid[:, :, None] & valid[:, None, :]
    scores = np.where(allowed, scores, -np.inf)
    flat = np.argmax(scores.reshape(rows, -1), axis=1)
    spans = np.stack(np.unravel_index(flat, (seq, seq)), axis=1)
    hidden = (np.isnan(start) | np.isnan(end)) & valid
    spans[hidden.any(axis=1)] = -1
    return spans


# --------------------------------------------------------------------------- the whole check

def parity_check(original: Path | str | onnx.ModelProto, rewritten: Path | str | onnx.ModelProto,
                 facts: ModelFacts, *, batch: int, seq: int, samples: int = 2, seed: int = 0,
                 atol: float | dict[str, float] | None = None,
                 rtol: float | dict[str, float] | None = None,
                 threads: int | None = None) -> Comparison:
    """Run both models on the same realistic feeds (built from the ORIGINAL's inputs) and compare.

    The rewritten model gets the inputs it declares, cast to its own dtypes, so a pass may narrow
    int64 ids to int32 or drop an unused input; an input the original does not have is an error.
    Tolerances not given are chosen by the original's output dtype (see `dtype_tolerances`).
    """
    original_graph = graph_only(original)
    original_specs = input_specs_of(original_graph)
    rewritten_specs = input_specs_of(graph_only(rewritten))
    default_atol, default_rtol = dtype_tolerances(original_graph)
    feeds = realistic_feeds(facts, original_specs, batch=batch, seq=seq, seed=seed, count=samples)
    reference = _run_all(OrtRunner(original, threads=threads), feeds)
    candidate = _run_all(OrtRunner(rewritten, threads=threads),
                         [adapt_feed(feed, rewritten_specs) for feed in feeds])
    masks = [kept_tokens(facts, feed) for feed in feeds]
    return compare_outputs(reference, candidate, atol=default_atol if atol is None else atol,
                           rtol=default_rtol if rtol is None else rtol,
                           masks=None if masks[0] is None else masks)


def tolerances(kind: str, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """Explicit tolerances win; otherwise the candidate kind's default (KIND_TOLERANCE)."""
    default = KIND_TOLERANCE[kind]
    return (default if atol is None else atol), (default if rtol is None else rtol)


def dtype_tolerances(model: onnx.ModelProto) -> tuple[float, float]:
    """(atol, rtol) for comparing a model with a rewrite of itself: FP16_ATOL/RTOL when its weights are
    fp16 (`model.half()`; the legacy exporter may still run parts in fp32 and return fp32 outputs, but
    the rest computes in fp16), else DEFAULT_ATOL/RTOL (fp32)."""
    return tolerances_for(weights_dtype(model))


def tolerances_for(dtype: np.dtype | str | None) -> tuple[float, float]:
    """(atol, rtol) for a rewrite of a model whose weights are `dtype`: fp16's, else fp32's."""
    return (FP16_ATOL, FP16_RTOL) if dtype is not None and np.dtype(dtype) == np.float16 else (DEFAULT_ATOL, DEFAULT_RTOL)


def weights_dtype(model: onnx.ModelProto) -> np.dtype | None:
    """The dtype of the largest float initializer (the word embeddings), read from its header only."""
    floats = [t for t in model.graph.initializer
              if np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).kind == "f"]
    if not floats:
        return None
    largest = max(floats, key=lambda t: math.prod(t.dims))
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(largest.data_type))


def graph_only(model: Path | str | onnx.ModelProto) -> onnx.ModelProto:
    """The model without its weights' bytes (never read from a file): only the graph's inputs are needed."""
    if isinstance(model, onnx.ModelProto):
        return model
    return scan_file(model).skeleton


def adapt_feed(feed: dict[str, np.ndarray], specs: InputSpecs) -> dict[str, np.ndarray]:
    """The inputs a model declares, cast to its dtypes; one it declares but `feed` lacks is an error."""
    missing = [name for name in specs if name not in feed]
    if missing:
        raise BertoptError(f"the rewritten model has input(s) {missing} the original lacks")
    return {name: feed[name].astype(dtype, copy=False) for name, (dtype, _) in specs.items()}


def _run_all(runner: OrtRunner, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [runner.run(feed) for feed in feeds]
