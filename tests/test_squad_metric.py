"""The official SQuAD v1.1 metric, against cases computed by hand from the evaluate-v1.1.py rules."""

import pytest

from bertopt.errors import BertoptError
from bertopt.squad.metric import evaluate, exact_match_score, f1_score, normalize_answer


@pytest.mark.parametrize("text, normalized", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("an apple", "apple"),
    ("the theatre", "theatre"),           # articles go only as whole words
    ("U.S. Army", "us army"),             # punctuation is deleted, not turned into spaces
    ("rock-and-roll", "rockandroll"),
    ("A\tcat\n", "cat"),
    ("Anthem", "anthem"),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match_score("The Eiffel Tower.", "eiffel tower")
    assert not exact_match_score("Eiffel Tower in Paris", "Eiffel Tower")


def test_partial_f1():
    # tokens [quick, brown, fox] vs [quick, red, fox]: 2 shared, precision = recall = 2/3
    assert f1_score("the quick brown fox", "quick red fox") == pytest.approx(2 / 3)
    # repeated tokens count once per gold occurrence: 1 shared of 3 predicted, 1 gold -> 2*(1/3)/(4/3)
    assert f1_score("fox fox fox", "fox") == pytest.approx(0.5)
    assert f1_score("nothing shared", "quick fox") == 0.0


def test_empty_prediction():
    assert f1_score("", "quick fox") == 0.0
    assert not exact_match_score("", "quick fox")
    # the script's own quirk: a gold answer that normalises to nothing matches an empty answer
    # exactly, yet its F1 is 0 because no token is shared
    assert exact_match_score("", "the")
    assert f1_score("", "the") == 0.0


def test_evaluate_takes_the_best_gold_answer_and_counts_missing_as_zero():
    gold = {"q1": ("Karl Drais", "Drais"), "q2": ("quick red fox",), "q3": ("1817",)}
    predictions = {"q1": "drais", "q2": "the quick brown fox"}  # q3 unanswered
    metrics = evaluate(gold, predictions)
    assert metrics.total == 3
    assert metrics.exact_match == pytest.approx(100 / 3)
    assert metrics.f1 == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_evaluate_max_over_gold_answers_for_f1():
    gold = {"q": ("in the year 1885", "1885")}
    # "1885": F1 0.5 against [in, year, 1885], 1.0 against [1885]
    assert evaluate(gold, {"q": "1885"}).f1 == pytest.approx(100.0)
    # "year 1885": P 1, R 2/3 -> 0.8 against gold 1; P 1/2, R 1 -> 2/3 against gold 2
    assert evaluate(gold, {"q": "year 1885"}).f1 == pytest.approx(80.0)


def test_evaluate_refuses_no_questions():
    with pytest.raises(BertoptError, match="no questions"):
        evaluate({}, {})
