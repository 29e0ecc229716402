"""The exporter: presets, HF folders, both exporters, the content cache, and bad options."""

import onnx
import pytest

from bertopt.errors import BertoptError
from bertopt.export import export_onnx, resolve_source
from bertopt.facts import detect_facts
from bertopt.graph import load_graph


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
])
def test_bad_export_options(tmp_path, options, message):
    with pytest.raises(BertoptError, match=message):
        export_onnx(resolve_source("bert-tiny"), tmp_path / "x.onnx", **options)
    assert not (tmp_path / "x.onnx").exists()
