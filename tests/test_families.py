"""Other transformers through the same passes (issue 14): ViT, DeiT, Swin, CLIP's two towers, Whisper's
encoder, T5's encoder, BART's encoder and GPT-2, as tiny random-weight presets (2 layers, hidden 32,
biases and norms perturbed), exported by bertopt's exporter (legacy, opset 14) and its content cache.

Each family: facts read from the structure, `default` for Ascend legal for CANN 6.0 with parity on ONNX
Runtime (fp32, 1e-4, the family's realistic inputs), every Gelu in the form ATC takes, a golden snapshot,
and a fusion prediction per block that names its reasons. One base-size run per family is an
integration test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN_DIR

from bertopt.ascend.cann import cann_target
from bertopt.ascend.check import check_ascend
from bertopt.ascend.legality import check_model_level
from bertopt.errors import BertoptError
from bertopt.graph import load_graph
from bertopt.model.facts import detect_facts
from bertopt.model.forms import canonical_erf_pattern, canonical_tanh_pattern, gelu_kind, quick_gelu_pattern
from bertopt.testing import assert_graph_matches, assert_parity, run_spec
from bertopt.validation.parity import IMAGE_NORMALISATION, graph_only, input_specs_of, realistic_feeds

BATCH, SEQ = 2, 16

# preset -> (family, roles by role, norm, placement, attention kind, image size or frames, tokens seen)
FAMILIES = {
    "vit-tiny": ("vit", {"pixel_values"}, "layernorm", "pre", "standard", (32, 32), 17),
    "deit-tiny": ("deit", {"pixel_values"}, "layernorm", "pre", "standard", (32, 32), 18),
    "swin-tiny": ("swin", {"pixel_values"}, "layernorm", "pre", "windowed", (32, 32), 16),
    "clip-vit-tiny": ("clip-vision", {"pixel_values"}, "layernorm", "pre", "standard", (32, 32), 17),
    "clip-vit-tiny-text": ("clip-text", {"input_ids", "attention_mask"}, "layernorm", "pre", "causal", None, SEQ),
    "whisper-tiny-encoder": ("whisper-encoder", {"input_features"}, "layernorm", "pre", "standard", 64, 32),
    "t5-tiny-encoder": ("t5-encoder", {"input_ids", "attention_mask"}, "rmsnorm", "pre", "relative-bias", None, SEQ),
    "bart-tiny-encoder": ("bart-encoder", {"input_ids", "attention_mask"}, "layernorm", "post", "standard", None,
                          SEQ),
    "gpt2-tiny": ("gpt2", {"input_ids", "attention_mask"}, "layernorm", "pre", "causal", None, SEQ),
}


@pytest.fixture(scope="module")
def family_export(tmp_path_factory):
    from bertopt.flow.export import export_onnx, resolve_source

    folder = tmp_path_factory.mktemp("families")
    made = {}

    def export(preset: str):
        if preset not in made:
            made[preset] = export_onnx(resolve_source(preset), folder / f"{preset}.onnx").path
        return made[preset]

    return export


@pytest.fixture(scope="module")
def optimized(family_export):
    done = {}

    def optimize(preset: str):
        if preset not in done:
            done[preset] = run_spec(family_export(preset), "default", batch=BATCH, seq=SEQ)
        return done[preset]

    return optimize


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_facts_are_read_from_the_structure(family_export, preset):
    family, roles, norm, placement, kind, size, _ = FAMILIES[preset]
    facts = detect_facts(load_graph(family_export(preset)))
    assert (facts.family, set(facts.roles.values()), facts.norm, facts.norm_position, facts.attention_kind) == \
        (family, roles, norm, placement, kind)
    assert (facts.num_layers, facts.hidden, facts.heads, facts.head_dim) == (2, 32, 2, 16)
    assert (facts.image_size if facts.modality == "image" else facts.frames if facts.modality == "audio"
            else None) == size
    assert (facts.vocab_size is None) == (facts.modality != "text")


def test_bert_stays_a_post_norm_bert(tiny_export):
    facts = detect_facts(load_graph(tiny_export("legacy14")))
    assert (facts.family, facts.norm, facts.norm_position, facts.attention_kind, facts.modality) == \
        ("bert", "layernorm", "post", "standard", "text")


@pytest.mark.parametrize(("preset", "positions"), [("bart-tiny-encoder", 128), ("roberta-tiny", 128),
                                                   ("bert-tiny", 128)])
def test_positions_are_counted_past_the_rows_they_start_after(family_export, preset, positions):
    """BART counts positions from 2 and RoBERTa from padding_idx + 1: their tables have that many extra rows,
    which are not positions a sequence may use."""
    facts = detect_facts(load_graph(family_export(preset)))
    assert facts.max_positions == positions
    assert (facts.family == "bart-encoder") == (preset == "bart-tiny-encoder")


def test_heads_that_do_not_divide_the_hidden_size_are_refused_by_name(tmp_path):
    from bertopt.flow.export import export_onnx, random_source

    odd = random_source("t5", dict(d_model=32, d_kv=24, num_heads=2, num_layers=2, d_ff=64, vocab_size=1000))
    path = export_onnx(odd, tmp_path / "t5-odd.onnx").path
    with pytest.raises(BertoptError, match="unsupported attention: heads of 24 do not divide the hidden size 32"):
        detect_facts(load_graph(path))


@pytest.mark.golden
@pytest.mark.parametrize("preset", list(FAMILIES))
def test_default_is_legal_exact_and_keeps_every_gelu_in_atc_form(family_export, optimized, preset):
    result = optimized(preset)
    *_, tokens = FAMILIES[preset]
    assert (result.facts.batch, result.facts.seq) == (BATCH, tokens)
    assert [c.name for c in check_model_level(result.graph, cann_target("6.0")) if c.ok is False] == []
    assert_parity(family_export(preset), result)
    assert _gelus_not_in_atc_form(result.graph) == []
    assert_graph_matches(result.graph, GOLDEN_DIR / "families" / f"{preset}.after.txt")


def _gelus_not_in_atc_form(graph) -> list[str]:
    """Gelu ops, and Erf/Tanh nodes that are not inside the subgraph ATC takes (legalize-ascend's form)."""
    inside = {id(node) for pattern in (canonical_erf_pattern(), canonical_tanh_pattern())
              for match in pattern.find_all(graph, allow_escape=True) for node in match.nodes}
    return [node.name for node in graph.nodes
            if gelu_kind(node) or (node.op in ("Erf", "Tanh") and id(node) not in inside)]


def test_quick_gelu_is_counted_and_kept(optimized):
    result = optimized("clip-vit-tiny")
    record = result.record("fuse-gelu")
    assert record.counts["quick_gelu_kept"] == 2 and not record.changed
    assert "quick_gelu" in record.notes[0]
    assert len(quick_gelu_pattern().find_all(result.graph)) == 2


@pytest.mark.parametrize("preset", ["clip-vit-tiny-text", "gpt2-tiny"])
def test_causal_masks_are_folded_fp16_safe(optimized, preset):
    record = optimized(preset).record("fold-attention-mask")
    assert record.changed and "causal mask (-10000 above the diagonal)" in record.notes[0]


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_every_block_has_a_verdict_per_fusion_with_reasons(optimized, preset):
    result = optimized(preset)
    prediction = check_ascend(result.graph, cann=cann_target("6.0"), soc="Ascend310P3").fusion
    assert len(prediction.blocks) == 2
    for block in prediction.blocks:
        assert [v.fusion for v in block.verdicts] == ["layer-norm", "ln-qkv", "mul-add", "attention-score", "gelu"]
        assert all(v.reasons for v in block.verdicts if not v.fuses)
    score = prediction.blocks[0].verdict("attention-score")
    # 2 heads of 16 never fuse, whatever the form: the verdict says so even when the form is what fails
    assert any("heads = 2 is not 12 or 16" in reason for reason in score.reasons)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "vit-tiny", "whisper-tiny-encoder"])
def test_pre_norm_blocks_say_why_ln_qkv_never_fuses(optimized, preset):
    """ZAttentionLnQKVONNXFusionPass takes only the post-norm block (fusion_gates.json, ln-qkv "pre_norm"): a
    pre-norm block's verdict says so first. Its LayerNorm itself is judged where it is, GPT-2's above the
    Reshape its Conv1D flattens the tokens with (not "expected Add, found Reshape")."""
    from bertopt.ascend.gates import PRE_NORM_REASON, fusion_gates

    prediction = check_ascend(optimized(preset).graph, cann=cann_target("6.0"), soc="Ascend310P3").fusion
    for block in prediction.blocks:
        assert block.verdict("layer-norm").fuses, block.verdict("layer-norm").reasons
        ln_qkv = block.verdict("ln-qkv")
        assert ln_qkv.verdict == "form" and ln_qkv.reasons[0] == PRE_NORM_REASON
    assert "ProcessLayerNorm" in fusion_gates(cann_target("6.0")).passes["ln-qkv"]["sources"]["pre_norm"]


def test_post_norm_blocks_carry_no_pre_norm_reason(tiny_export):
    from bertopt.ascend.gates import PRE_NORM_REASON

    result = run_spec(tiny_export("legacy14"), "default", batch=BATCH, seq=SEQ)
    prediction = check_ascend(result.graph, cann=cann_target("6.0"), soc="Ascend310P3").fusion
    assert all(PRE_NORM_REASON not in block.verdict("ln-qkv").reasons for block in prediction.blocks)


def test_images_are_in_the_processors_range(family_export):
    for preset, family in (("vit-tiny", "vit"), ("clip-vit-tiny", "clip-vision")):
        facts = detect_facts(load_graph(family_export(preset)))
        [feed] = realistic_feeds(facts, batch=BATCH, seq=SEQ)
        pixels = feed["pixel_values"]
        mean, std = (np.array(v)[None, :, None, None] for v in IMAGE_NORMALISATION[family])
        assert pixels.shape == (BATCH, 3, 32, 32) and pixels.dtype == np.float32
        assert np.all(pixels >= -mean / std - 1e-5) and np.all(pixels <= (1 - mean) / std + 1e-5)
        assert pixels.std() > 0.3  # scenes, not a constant


def test_log_mel_features_look_like_whispers(family_export):
    path = family_export("whisper-tiny-encoder")
    facts = detect_facts(load_graph(path))
    [feed] = realistic_feeds(facts, input_specs_of(graph_only(path)), batch=BATCH, seq=SEQ, seed=3)
    features = feed["input_features"]
    assert features.shape == (BATCH, 16, 64)
    # (log10 + 4) / 4, floored 8 below each clip's maximum: a span of at most 2
    spans = features.max(axis=(1, 2)) - features.min(axis=(1, 2))
    assert np.all(spans <= 2 + 1e-6) and np.all(spans > 0.5)


def test_a_fixed_image_size_cannot_be_changed(family_export):
    with pytest.raises(BertoptError, match="--image-size 48: input pixel_values is static"):
        run_spec(family_export("vit-tiny"), "freeze-shapes", batch=1, seq=SEQ, image_size=48)


def test_output_folders_are_named_by_the_modality_s_shape(family_export, tmp_path):
    """`run`'s default folder: seq<S> for text, <side>px for images, <N>frames for audio (seq means nothing to
    them): from a preset's config, an HF folder's config.json, an ONNX file's inputs, or the size asked for."""
    from transformers import CLIPConfig

    from bertopt.flow.run import RunConfig

    def folder(model: str, **sizes) -> str:
        return RunConfig(model=model, batch=2, seq=SEQ, **sizes).output_dir().name

    assert folder("vit-tiny") == "vit-tiny-bs2-32px" and folder("vit-tiny", image_size=64) == "vit-tiny-bs2-64px"
    assert folder("whisper-tiny-encoder") == "whisper-tiny-encoder-bs2-64frames"
    assert folder("whisper-tiny-encoder", frames=128) == "whisper-tiny-encoder-bs2-128frames"
    assert folder("clip-vit-tiny-text") == f"clip-vit-tiny-text-bs2-seq{SEQ}"
    assert folder("bert-tiny") == f"bert-tiny-bs2-seq{SEQ}"
    assert folder(str(family_export("deit-tiny"))) == "deit-tiny-bs2-32px"
    assert folder(str(family_export("whisper-tiny-encoder"))) == "whisper-tiny-encoder-bs2-64frames"
    CLIPConfig(vision_config=dict(image_size=48, patch_size=8)).save_pretrained(tmp_path / "clip")
    assert folder(str(tmp_path / "clip")) == "clip-bs2-48px"


def test_a_cache_input_is_refused_in_one_line():
    import onnx_graphsurgeon as gs

    ids = gs.Variable("input_ids", dtype=np.int64, shape=["b", "s"])
    past = gs.Variable("past_key", dtype=np.float32, shape=["b", 2, "p", 16])
    out = gs.Variable("out", dtype=np.float32)
    table = gs.Constant("table", np.ones((50, 8), np.float32))
    graph = gs.Graph(nodes=[gs.Node("Gather", inputs=[table, ids], outputs=[out]),
                            gs.Node("Softmax", inputs=[past], outputs=[gs.Variable("p", dtype=np.float32)])],
                     inputs=[ids, past], outputs=[out], opset=14)
    with pytest.raises(BertoptError, match="no attention|key/value cache"):
        detect_facts(graph)


# ----------------------------------------------------------------------------- base sizes

BASE = {"vit-base": 197, "deit-small": 198, "swin-t": 49, "clip-vit-b32": 50, "clip-vit-b32-text": 77,
        "whisper-base-encoder": 1500, "t5-small-encoder": 128, "bart-base-encoder": 128, "gpt2": 128}


@pytest.mark.integration
@pytest.mark.parametrize("preset", list(BASE))
def test_base_sizes_run_legal_and_exact(family_export, preset):
    path = family_export(preset)
    seq = BASE[preset]
    result = run_spec(path, "default", batch=1, seq=seq)
    assert result.facts.seq == seq
    assert [c.name for c in check_model_level(result.graph, cann_target("6.0")) if c.ok is False] == []
    assert_parity(path, result, samples=1)
    assert _gelus_not_in_atc_form(result.graph) == []
    prediction = check_ascend(result.graph, cann=cann_target("6.0"), soc="Ascend310P3").fusion
    if preset == "vit-base":  # hidden 768, 12 heads of 64: the tokens are what the kernel refuses
        score = prediction.blocks[0].verdict("attention-score")
        assert any("seq = 197 is not a multiple of 32" in reason for reason in score.reasons)
    # README's table says what every block gets, fusion by fusion
    family, tokens, *cells = README_ROWS[preset]
    assert (result.facts.family, int(tokens)) == (family, seq)
    # Swin's stages differ (windows, widths): its row is the first stage's two blocks
    for block in prediction.blocks[:2] if preset == "swin-t" else prediction.blocks:
        assert [v.verdict for v in block.verdicts] == [cell.split(":")[0] for cell in cells], block.layer


def _readme_rows() -> dict[str, list[str]]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text[text.index("<!-- family_table:begin -->"):text.index("<!-- family_table:end -->")]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


README_ROWS = _readme_rows()
