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
    for name in ("original", "optimized", "emulation"):
        assert (tmp_path / "check" / name / "metrics.json").exists()
    assert "emulation" in result.stdout and "F1" in result.stdout
    assert report


def test_bert_tiny_has_no_matching_tokenizer(tmp_path):
    assert_one_line_error(bertopt("squad", "prep", "bert-tiny", "--data", str(DATA), "--seq", "64",
                                  "--output", str(tmp_path / "f")), 2, "tokenizer")
