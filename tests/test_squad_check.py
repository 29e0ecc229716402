"""SQuAD end to end on the shipped mini file: minilm (real encoder, random QA head) at seq 128."""

import json
from pathlib import Path

import numpy as np
import pytest

from bertopt.errors import BertoptError
from bertopt.squad.check import check_model, evaluate_results, score_logits
from bertopt.squad.data import load_examples
from bertopt.squad.infer import read_results, run_features
from bertopt.squad.prep import read_features
from bertopt.validation.parity import OrtRunner

MINI = Path(__file__).parent / "data" / "squad-mini.json"
SEQ, BATCH = 128, 8


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    output = tmp_path_factory.mktemp("squad") / "check"
    return check_model("minilm", MINI, output, seq=SEQ, batch=BATCH)


def _json(path: Path):
    return json.loads(path.read_text())


def test_check_writes_every_candidate(checked):
    out = checked.output
    ids = {example.id for example in load_examples(MINI)}
    for name in ("original", "optimized", "emulation-high_performance", "emulation-high_precision"):
        assert set(_json(out / name / "predictions.json")) == ids
        assert set(_json(out / name / "metrics.json")) == {"exact_match", "f1", "total"}
        assert _json(out / name / "metrics.json")["total"] == 29
    summary = _json(out / "squad.json")
    assert [s["name"] for s in summary["scores"]] == ["original", "optimized", "emulation-high_performance",
                                                     "emulation-high_precision"]
    assert (summary["seq"], summary["doc_stride"], summary["batch"]) == (SEQ, 64, BATCH)
    assert (out / "original.onnx").is_file() and (out / "optimized.onnx").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_original_and_optimized_give_the_same_answers(checked):
    original, optimized, emulation, high_precision = checked.scores
    assert optimized.predictions == original.predictions
    assert checked.delta(optimized) == {"exact_match": 0.0, "f1": 0.0}
    assert checked.same_answers(optimized) == 1.0
    assert emulation.nonfinite_features == 0 and checked.same_answers(emulation) > 0.5
    assert "Gelu high_performance" in emulation.label and "Gelu high_precision" in high_precision.label
    # the random QA head answers badly but not always emptily: the flow produced real spans
    assert sum(bool(text) for text in original.predictions.values()) > 20


def test_features_folder_feeds_ais_bench_and_eval_scores_its_results(checked, tmp_path):
    features, inputs = read_features(checked.output / "features")
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert len(features) == checked.features > 29  # the bicycle context needs several windows
    # stand in for ais_bench: the optimized model's logits, one [1, seq] file per feature and output
    runner = OrtRunner(checked.output / "optimized.onnx")
    start, end = run_features(runner.run, {name: features.tokens[role] for name, role in inputs.items()}, BATCH)
    results = tmp_path / "result" / f"result_bs{BATCH}"
    results.mkdir(parents=True)
    for index in range(len(features)):
        np.save(results / f"{index}_0.npy", start[index][None])
        np.save(results / f"{index}_1.npy", end[index][None])
    score = evaluate_results(checked.output / "features", tmp_path / "result", MINI, tmp_path / "eval")
    assert score.predictions == checked.scores[1].predictions
    assert _json(tmp_path / "eval" / "metrics.json") == checked.scores[1].metrics.to_dict()
    assert _json(tmp_path / "eval" / "predictions.json") == score.predictions


def test_eval_refuses_incomplete_results_and_existing_output(checked, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    np.save(results / "0_0.npy", np.zeros((1, SEQ), np.float32))
    np.save(results / "0_1.npy", np.zeros((1, SEQ), np.float32))
    with pytest.raises(BertoptError, match=r"missing \d+ file\(s\) for the given inputs: 1_0.npy, 1_1.npy"):
        evaluate_results(checked.output / "features", results, MINI, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    with pytest.raises(BertoptError, match="already exists"):
        evaluate_results(checked.output / "features", results, MINI, results)


def test_results_with_the_wrong_shape_are_refused(tmp_path):
    np.save(tmp_path / "0_0.npy", np.zeros((1, 64), np.float32))
    np.save(tmp_path / "0_1.npy", np.zeros((1, 64), np.float32))
    with pytest.raises(BertoptError, match=r"shape \[1, 64\]; the reference gives \[1, 128\]"):
        read_results(tmp_path, 1, 128)


def test_features_from_another_data_file_are_refused(checked):
    features, _ = read_features(checked.output / "features")
    logits = np.zeros((len(features), SEQ), np.float32)
    with pytest.raises(BertoptError, match="different questions"):
        score_logits("x", "x", load_examples(MINI)[:-1], features, logits, logits)


def test_run_features_pads_the_last_batch():
    seen = []

    def runner(feeds):
        ids = feeds["input_ids"]
        seen.append(ids.shape)
        return {"start_logits": ids * 2.0, "end_logits": ids * 3.0}

    ids = np.arange(1, 11, dtype=np.int64)[:, None].repeat(4, axis=1)  # 10 rows
    start, end = run_features(runner, {"input_ids": ids}, 4)
    assert seen == [(4, 4), (4, 4), (4, 4)]
    assert (start == ids * 2.0).all() and (end == ids * 3.0).all() and start.shape == (10, 4)


def test_check_refuses_a_used_output_folder_before_any_work(tmp_path):
    (tmp_path / "report.txt").write_text("keep")
    with pytest.raises(BertoptError, match="already exists"):
        check_model("minilm", MINI, tmp_path, seq=SEQ, batch=BATCH)
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_check_library_call_with_an_emulation_runner(checked, tmp_path):
    """check() on given models and features; any callable stands in for the emulation."""
    from bertopt.squad.check import Emulation, check

    def zero_head(feeds):
        zeros = np.zeros(feeds["input_ids"].shape, np.float32)
        return {"start_logits": zeros, "end_logits": zeros}

    features, inputs = read_features(checked.output / "features")
    result = check(checked.output / "original.onnx", checked.output / "optimized.onnx", load_examples(MINI),
                   features, inputs, tmp_path / "out", batch=BATCH,
                   emulations=[Emulation("zeros", "zeros", zero_head)])
    assert [s.name for s in result.scores] == ["original", "optimized", "zeros"]
    assert result.scores[1].predictions == checked.scores[0].predictions
    assert result.scores[2].label == "zeros" and result.same_answers(result.scores[2]) < 1.0
    assert _json(tmp_path / "out" / "squad.json")["scores"][2]["delta"] == result.delta(result.scores[2])
