"""The exporter: presets, HF folders, both exporters, the content cache, and bad options."""

import onnx
import pytest
from user_exports import FAMILIES, user_export  # noqa: F401 (a fixture)

from bertopt.errors import BertoptError
from bertopt.flow.export import export_onnx, random_source, resolve_source
from bertopt.graph import load_graph
from bertopt.model.facts import detect_facts


def test_export_is_cached_by_content(tmp_path):
    source = resolve_source("bert-tiny", config_overrides={"num_hidden_layers": 1})
    first = export_onnx(source, tmp_path / "a.onnx", cache_dir=tmp_path / "cache")
    second = export_onnx(source, tmp_path / "b.onnx", cache_dir=tmp_path / "cache")
    assert not first.cached and second.cached and first.key == second.key
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    other = export_onnx(resolve_source("bert-tiny", config_overrides={"num_hidden_layers": 1, "hidden_act": "gelu_new"}),
                        tmp_path / "c.onnx", cache_dir=tmp_path / "cache")
    assert not other.cached and other.key != first.key
    again = export_onnx(source, tmp_path / "a.onnx", cache_dir=tmp_path / "cache")  # over its own link
    assert again.cached and sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "c.onnx", "cache"]


def test_outputs_and_dynamic_axes(tiny_export):
    model = onnx.load(str(tiny_export("legacy14")))
    assert [o.name for o in model.graph.output] == ["start_logits", "end_logits"]
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "seq"]
    assert {o.domain or "": o.version for o in model.opset_import}[""] == 14


def test_classification_head(tiny_export):
    model = onnx.load(str(tiny_export("legacy14", head="cls")))
    assert [o.name for o in model.graph.output] == ["logits"]


def test_hf_checkpoint_folder(tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    config = BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertForQuestionAnswering(config).save_pretrained(tmp_path / "ckpt")
    result = export_onnx(resolve_source(str(tmp_path / "ckpt")), tmp_path / "m.onnx", cache_dir=tmp_path / "cache")
    facts = detect_facts(load_graph(result.path))
    assert (facts.num_layers, facts.hidden, facts.vocab_size, facts.max_positions) == (1, 16, 300, 64)
    assert "HF checkpoint" in result.description


def test_a_bart_checkpoint_folder_exports_its_encoder_with_the_trained_weights(tmp_path):
    """A BartForConditionalGeneration folder (what summarisation checkpoints are) gives its encoder alone,
    with the folder's weights, not fresh ones."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=300, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=64)
    model = BartForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    result = export_onnx(resolve_source(str(tmp_path / "ckpt")), tmp_path / "m.onnx", cache_dir=tmp_path / "cache")
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["last_hidden_state"]
    facts = detect_facts(load_graph(result.path))
    assert (facts.family, facts.num_layers, facts.hidden, facts.max_positions) == ("bart-encoder", 1, 16, 64)
    ids = np.random.default_rng(0).integers(4, 300, size=(1, 8))
    with torch.no_grad():
        expected = model.get_encoder()(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_minilm_preset_has_real_weights(tmp_path):
    result = export_onnx(resolve_source("minilm"), tmp_path / "m.onnx")
    facts = detect_facts(load_graph(result.path))
    assert (facts.num_layers, facts.hidden, facts.heads, facts.head_dim, facts.vocab_size) == (6, 384, 12, 32, 30522)
    assert "real weights" in result.description


@pytest.mark.parametrize("model, message", [("bert-huge", "not a preset"), ("/no/such/dir", "not a preset")])
def test_unknown_models_are_refused(model, message):
    with pytest.raises(BertoptError, match=message):
        resolve_source(model)


def test_overrides_refused_for_real_checkpoints():
    with pytest.raises(BertoptError, match="only to random-weight presets"):
        resolve_source("minilm", config_overrides={"hidden_size": 8})


@pytest.mark.parametrize("options, message", [
    (dict(exporter="onnxscript"), "expected one of legacy, dynamo"),
    (dict(exporter="legacy", opset=18), "legacy exporter takes opset 11 to 17"),
    (dict(exporter="dynamo", opset=14), "dynamo exporter takes opset 18 to 23"),
    (dict(attention="flash"), "eager, sdpa"),
    (dict(head="ner"), "qa, cls"),
    (dict(dtype="bf16"), "--dtype 'bf16': expected one of fp32, fp16"),
    (dict(mask="bool"), "--mask 'bool': expected one of int, float, additive, none"),
])
def test_bad_export_options(tmp_path, options, message):
    with pytest.raises(BertoptError, match=message):
        export_onnx(resolve_source("bert-tiny"), tmp_path / "x.onnx", **options)
    assert not (tmp_path / "x.onnx").exists()


INT64, FLOAT, FLOAT16 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("mask, inputs", [
    ("int", {"input_ids": INT64, "attention_mask": INT64, "token_type_ids": INT64}),
    ("float", {"input_ids": INT64, "attention_mask": FLOAT, "token_type_ids": INT64}),
    ("additive", {"input_ids": INT64, "attention_mask": FLOAT, "token_type_ids": INT64}),
    ("none", {"input_ids": INT64, "token_type_ids": INT64}),
])
def test_mask_options(user_export, mask, inputs):
    model = onnx.load(str(user_export(mask=mask)))
    assert {v.name: v.type.tensor_type.elem_type for v in model.graph.input} == inputs


@pytest.mark.parametrize("variant", ["legacy14", "dynamo18"])
def test_fp16_export_has_fp16_weights(user_export, variant):
    model = onnx.load(str(user_export(variant=variant, dtype="fp16")))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.data_type != INT64]
    assert weights and all(t.data_type == FLOAT16 for t in weights)
    assert {v.type.tensor_type.elem_type for v in model.graph.input} == {INT64}


def test_fp16_mask_is_in_the_models_dtype(user_export):
    model = onnx.load(str(user_export(dtype="fp16", mask="additive")))
    assert {v.name: v.type.tensor_type.elem_type for v in model.graph.input}["attention_mask"] == FLOAT16


def test_new_options_enter_the_cache_key_and_description(tmp_path):
    source = resolve_source("bert-tiny", config_overrides={"num_hidden_layers": 1})
    plain = export_onnx(source, tmp_path / "a.onnx", cache_dir=tmp_path / "cache")
    half = export_onnx(source, tmp_path / "b.onnx", dtype="fp16", cache_dir=tmp_path / "cache")
    bare = export_onnx(source, tmp_path / "c.onnx", mask="none", cache_dir=tmp_path / "cache")
    assert len({plain.key, half.key, bare.key}) == 3
    assert "fp16 weights" in half.description and "none attention mask" in bare.description
    assert "fp16" not in plain.description


def test_random_source_builds_any_model_type(tmp_path):
    source = random_source("gpt2", FAMILIES["gpt2"])
    assert source.description.startswith("gpt2, RANDOM weights")
    assert random_source("gpt2", FAMILIES["gpt2"]).fingerprint == source.fingerprint
    assert random_source("gpt2", dict(FAMILIES["gpt2"], n_layer=1)).fingerprint != source.fingerprint
    model = source.build("eager", "cls")
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.n_embd == 32


def test_canine_exports_with_unicode_code_points(tmp_path):
    """CANINE has no vocabulary: it reads code points, hashed into its tables; the trace takes ids among them."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from bertopt.flow.export import ExportWrapper

    source = random_source("canine", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=128, num_hash_buckets=64))
    path = export_onnx(source, tmp_path / "canine.onnx", head="cls", cache_dir=tmp_path / "cache").path
    ids = torch.tensor([[0xE000, ord("h"), ord("中"), 0x1F600, 0xE001, 0, 0, 0]] * 2)  # beyond the 64 buckets
    mask = (ids != 0).to(torch.int64)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    with torch.no_grad():
        expected = ExportWrapper(source.build("eager", "cls"), "cls")(*map(torch.from_numpy, feeds.values()))[0]
    np.testing.assert_allclose(session.run(None, feeds)[0], expected.numpy(), atol=1e-5)


def test_a_config_without_a_vocabulary_is_refused_in_one_line():
    from types import SimpleNamespace

    from bertopt.flow.export import token_id_count

    with pytest.raises(BertoptError, match="no vocabulary size"):
        token_id_count(SimpleNamespace(model_type="made-up", vocab_size=None))
    assert token_id_count(SimpleNamespace(model_type="bert", vocab_size=1000)) == 1000


@pytest.mark.parametrize("family, head, config, shape", [
    ("dinov2", "image-cls", dict(image_size=32, patch_size=8), [2, 3, 32, 32]),
    ("audio-spectrogram-transformer", "audio-cls", dict(max_length=64, num_mel_bins=16), [2, 64, 16]),
])
def test_any_image_or_audio_classifier_exports_its_content_input(tmp_path, family, head, config, shape):
    """Families outside bertopt's presets, with the image-cls / audio-cls heads: content in (batch dynamic, its
    size static), logits out, as the torch model computes them."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from bertopt.flow.export import ExportWrapper

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    source = random_source(family, dict(tiny, **config))
    path = export_onnx(source, tmp_path / f"{family}.onnx", head=head, cache_dir=tmp_path / "cache").path
    model = onnx.load(str(path))
    (content,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in content.type.tensor_type.shape.dim]
    assert dims == ["batch", *shape[1:]] and [o.name for o in model.graph.output] == ["logits"]
    feed = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {content.name: feed})[0]
    with torch.no_grad():
        expected = ExportWrapper(source.build("eager", head), head)(torch.from_numpy(feed))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_an_audio_input_of_unknown_layout_is_refused_in_one_line():
    """Wav2Vec2-BERT's input_features are [batch, frames, 160], not Whisper's [batch, mel bins, frames]."""
    import torch
    from transformers import Wav2Vec2BertConfig

    from bertopt.flow.export import content_trace_input

    with pytest.raises(BertoptError, match="does not know the layout of its input_features") as caught:
        content_trace_input(Wav2Vec2BertConfig(), "input_features", torch.float32)
    assert "\n" not in str(caught.value)


def test_an_image_config_without_a_size_is_refused_in_one_line():
    """CvT's config has no image_size (its processor resizes): AttributeError crashed the compat matrix's row."""
    import torch
    from transformers import CvtConfig

    from bertopt.flow.export import content_trace_input

    with pytest.raises(BertoptError, match="its config gives no image size") as caught:
        content_trace_input(CvtConfig(), "pixel_values", torch.float32)
    assert "\n" not in str(caught.value)
