"""`bertopt squad prep / eval / check` through the real command line."""

import json

from test_cli import assert_one_line_error, bertopt
from conftest import REPO

DATA = REPO / "tests" / "data" / "squad-mini.json"


def test_prep_then_eval_of_a_results_folder(tmp_path):
    features = tmp_path / "features"
    prep = bertopt("squad", "prep", "minilm", "--data", str(DATA), "--seq", "64", "--output", str(features))
    assert prep.returncode == 0, prep.stderr
    assert "doc stride 16" in prep.stdout
    meta = json.loads((features / "features.json").read_text())
    assert (features / "input_ids" / "0.npy").exists() and meta
    missing = bertopt("squad", "eval", "--features", str(features), "--results", str(tmp_path / "none"),
                      "--data", str(DATA))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_check_reports_every_candidate(tmp_path):
    result = bertopt("squad", "check", "minilm", "--data", str(DATA), "--seq", "128", "--batch", "4",
                     "--output", str(tmp_path / "check"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "check" / "squad.json").read_text())
    for name in ("original", "optimized", "emulation-high_performance", "emulation-high_precision"):
        assert (tmp_path / "check" / name / "metrics.json").exists()
    assert "emulation" in result.stdout and "F1" in result.stdout
    assert report


def test_bert_tiny_has_no_matching_tokenizer(tmp_path):
    assert_one_line_error(bertopt("squad", "prep", "bert-tiny", "--data", str(DATA), "--seq", "64",
                                  "--output", str(tmp_path / "f")), 2, "tokenizer")


def test_run_with_squad_eval(tmp_path):
    out = tmp_path / "run"
    result = bertopt("run", "minilm", "--batch", "4", "--seq", "128", "--output", str(out), "--eval", f"squad={DATA}")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    scores = {s["name"]: s for s in report["squad"]["scores"]}
    assert set(scores) == {"original", "optimized", "emulation-high_performance", "emulation-high_precision"}
    assert scores["optimized"]["delta"] == {"exact_match": 0.0, "f1": 0.0}
    assert "SQuAD v1.1" in result.stdout


def test_run_refuses_an_unknown_evaluation(tmp_path):
    assert_one_line_error(bertopt("run", "bert-tiny", "--output", str(tmp_path / "o"), "--eval", "glue"), 2,
                          "expected squad or squad=PATH")
