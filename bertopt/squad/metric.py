"""The official SQuAD v1.1 metric, with the semantics of its ``evaluate-v1.1.py`` script.

Answers are normalised (lower case, punctuation from ``string.punctuation`` removed, the articles
a/an/the removed as whole words, whitespace collapsed); exact match compares the normalised strings,
F1 their bags of tokens; each question takes the best score over its gold answers, and the totals are
averaged over all questions x100, a question without a prediction scoring 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

from bertopt.errors import BertoptError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the script's order)."""
    lowered = text.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1; like the script, 0 when nothing is shared (so an empty answer never scores)."""
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def metric_max_over_ground_truths(metric: Callable[[str, str], float], prediction: str,
                                  ground_truths: Sequence[str]) -> float:
    return max(metric(prediction, truth) for truth in ground_truths)


@dataclass(frozen=True)
class SquadMetrics:
    exact_match: float
    f1: float
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> SquadMetrics:
    """EM and F1 (percent) of `predictions` ({question id: text}) against `gold` ({id: answer texts})."""
    exact_match = f1 = 0.0
    for question_id, truths in gold.items():
        if question_id not in predictions:
            continue  # the script prints "will receive score 0" and moves on
        prediction = predictions[question_id]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, truths)
    total = len(gold)
    if total == 0:
        raise BertoptError("no questions to score")
    return SquadMetrics(100.0 * exact_match / total, 100.0 * f1 / total, total)
