"""bertopt.ascend.fusion_result: ATC's fusion_result.json in its three layouts, and the comparison with
the prediction.

Fixtures in tests/data/fusion_result/, written by the project in the real layouts (nlohmann dump(4):
4-space indent, keys sorted, counters as decimal strings) for bert-base at batch 8, seq 384:
- cann8_bert_base_fused.json: CANN 8.0-9.x, one object; the key session_and_graph_id_0_0 repeats the
  way FusionStatisticWriter appends (hicann/ge fusion_statistic_writer.cc), then _0_1;
- cann8_bert_base_unfused.json: the same layout, ZAttentionLnQKV matched without effect, ZAttentionScore
  absent (the big kernels not taken);
- cann7_list.json: CANN 7.0.x, a list of records, and a second list a rerun appended (][);
- cann5_concatenated.json: CANN 5.x, records back to back (}{).
"""

import json
from pathlib import Path

import pytest

from bertopt.ascend.fusion_result import (PassTimes, compare_with_prediction, parse_fusion_result,
                                          read_fusion_result)
from bertopt.ascend.gates import FORM, FUSES, SHAPE, BlockPrediction, FusionPrediction, FusionVerdict
from bertopt.errors import BertoptError

DATA = Path(__file__).parent / "data" / "fusion_result"
LN_QKV, SCORE = "ZAttentionLnQKVONNXFusionPass", "ZAttentionScoreFusionPass"
PASSES = {"layer-norm": "LayerNormONNXFusionPass", "ln-qkv": LN_QKV, "mul-add": "MulAddFusionPass",
          "attention-score": SCORE, "gelu": "GeluONNXFusionPass"}


def test_current_layout_keeps_repeated_graph_keys():
    result = read_fusion_result(DATA / "cann8_bert_base_fused.json")
    assert result.layout == "object"
    assert result.graphs == ["0_0", "0_0", "0_1"]
    # json.load keeps only the last of a repeated key, and would lose the first record's passes
    assert SCORE not in json.loads((DATA / "cann8_bert_base_fused.json").read_text())["session_and_graph_id_0_0"][
        "graph_fusion"]
    assert result.times(SCORE) == PassTimes(match_times=12, effect_times=12)
    assert result.times(LN_QKV) == PassTimes(match_times=12, effect_times=12)
    assert result.ub_fusion["TbeEltwiseFusionPass"] == PassTimes(15, 15, repository_hit_times=0)  # 13 + 2
    assert result.effect_times("ASoftmaxFusionPass") == 1
    assert result.times("NeverMatchedPass") is None and result.effect_times("NeverMatchedPass") == 0


def test_cann7_lists_back_to_back():
    result = read_fusion_result(DATA / "cann7_list.json")
    assert result.layout == "list"
    assert result.graphs == ["0_0", "0_0", "0_1"]
    assert result.effect_times(SCORE) == 12 and result.effect_times(LN_QKV) == 12
    assert result.ub_fusion["TbeEltwiseFusionPass"] == PassTimes(15, 15)


def test_cann5_objects_back_to_back():
    result = read_fusion_result(DATA / "cann5_concatenated.json")
    assert result.layout == "concatenated"
    assert result.graphs == ["0_0", "0_1"]
    assert result.effect_times("GeluONNXFusionPass") == 12
    assert result.effect_times("MatMulBiasAddFusionPass") == 74
    assert result.times(SCORE) is None


def test_to_dict_names_the_writer():
    data = json.loads(json.dumps(read_fusion_result(DATA / "cann7_list.json").to_dict()))
    assert data["layout"] == "list" and data["written_by"] == "CANN 7.0.x"
    assert data["graph_fusion"][SCORE] == {"match_times": 12, "effect_times": 12}
    assert "repository_hit_times" not in data["ub_fusion"]["TbeEltwiseFusionPass"]


def test_either_part_may_be_missing():
    result = parse_fusion_result('{\n    "session_and_graph_id_3_7": {\n        "ub_fusion": {\n'
                                 '            "TbeEltwiseFusionPass": {"effect_times": "4", "match_times": "5",'
                                 ' "repository_hit_times": "1"}\n        }\n    }\n}')
    assert result.graphs == ["3_7"] and result.graph_fusion == {}
    assert result.ub_fusion["TbeEltwiseFusionPass"] == PassTimes(5, 4, 1)


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("{\n    \"session_and_graph_id_0_0\": {", "invalid JSON at line 2, column 34"),
    ('{"session_and_graph_id_0_0": {"graph_fusion": {"P": {"match_times": "many", "effect_times": "1"}}}}',
     "'many' is not a decimal count"),
    ('{"session_and_graph_id_0_0": {"graph_fusion": {"P": {"match_times": "-1", "effect_times": "1"}}}}',
     "'-1' is not a decimal count"),
    ('{"graphs": []}', "unexpected key 'graphs'"),
    ('[{"graph_fusion": {}}]', "without a 'session_and_graph_id' string"),
    ('[{"graph_fusion": {}, "session_and_graph_id": "0_0"}]{"session_and_graph_id_0_0": {}}',
     "mixes JSON lists and objects"),
])
def test_malformed_files_are_one_clear_error(text, message):
    with pytest.raises(BertoptError, match=message):
        parse_fusion_result(text, "out/fusion_result.json")


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(BertoptError, match="cannot read ATC's fusion result"):
        read_fusion_result(tmp_path / "fusion_result.json")


# ----------------------------------------------------------------------------- against the prediction

def prediction(blocks: int, verdicts: dict[str, str]) -> FusionPrediction:
    """`blocks` blocks, each with the given verdict per fusion (FUSES where not given)."""
    return FusionPrediction(
        cann="6.0", soc="Ascend310P3", ai_core_count=8, gate_source="test", gate_note="test",
        blocks=[BlockPrediction(layer, [FusionVerdict(fusion, name, verdicts.get(fusion, FUSES))
                                        for fusion, name in PASSES.items()]) for layer in range(blocks)],
        attention_passes=[LN_QKV, SCORE])


def test_fused_as_predicted():
    fused = read_fusion_result(DATA / "cann8_bert_base_fused.json")
    assert compare_with_prediction(prediction(12, {}), fused) == []


def test_big_kernels_not_taken_fail_naming_the_passes():
    unfused = read_fusion_result(DATA / "cann8_bert_base_unfused.json")
    assert compare_with_prediction(prediction(12, {}), unfused) == [
        f"{LN_QKV} was predicted to fuse 12 block(s) but took no effect (match_times 12, effect_times 0)",
        f"{SCORE} was predicted to fuse 12 block(s) but is absent from ATC's fusion_result.json (it never matched)",
    ]


def test_fewer_effects_than_blocks():
    fused = read_fusion_result(DATA / "cann8_bert_base_fused.json")
    assert compare_with_prediction(prediction(24, {}), fused) == [
        f"{LN_QKV} took effect 12 time(s), fewer than the 24 block(s) predicted to fuse",
        f"{SCORE} took effect 12 time(s), fewer than the 24 block(s) predicted to fuse",
    ]


def test_nothing_expected_where_nothing_was_predicted():
    unfused = read_fusion_result(DATA / "cann8_bert_base_unfused.json")
    minilm_like = prediction(6, {"ln-qkv": SHAPE, "attention-score": SHAPE})
    assert compare_with_prediction(minilm_like, unfused) == []
    only_score = prediction(12, {"ln-qkv": FORM})
    assert compare_with_prediction(only_score, unfused) == [
        f"{SCORE} was predicted to fuse 12 block(s) but is absent from ATC's fusion_result.json (it never matched)"]
