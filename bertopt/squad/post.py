"""Start/end logits -> answer text, as HF run_qa's ``postprocess_qa_predictions`` (the seed's) does.

Per feature, the 20 highest start logits are paired with the 20 highest end logits; a pair counts
only when both tokens are context tokens, end >= start and the span is at most 30 tokens long. Its
score is start + end logit. An example's answer is its best-scoring pair over all of its features
(ties go to the first found, in run_qa's order), cut from the context by the tokens' character
offsets; an example with no valid pair gets the empty string.

NaN logits (an fp16 overflow, say) are treated as -inf so they can never win; run_qa's behaviour
on NaN is undefined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertopt.errors import BertoptError
from bertopt.squad.data import Example
from bertopt.squad.prep import Features

N_BEST = 20
MAX_ANSWER_TOKENS = 30


@dataclass(frozen=True)
class Span:
    score: float
    start_char: int
    end_char: int


def predict_answers(examples: list[Example], features: Features, start_logits: np.ndarray,
                    end_logits: np.ndarray, *, n_best: int = N_BEST,
                    max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict[str, str]:
    """{question id: answer text} for every example (the official predictions.json)."""
    expected = (len(features), features.seq)
    if start_logits.shape != expected or end_logits.shape != expected:
        raise BertoptError(f"logits {list(start_logits.shape)} / {list(end_logits.shape)} do not fit "
                           f"{expected[0]} features of {expected[1]} tokens")
    best: dict[str, Span] = {}
    for index, example_id in enumerate(features.example_ids):
        span = best_span(features, index, start_logits[index], end_logits[index], n_best, max_answer_tokens)
        if span is not None and (example_id not in best or span.score > best[example_id].score):
            best[example_id] = span
    return {example.id: _text(example, best.get(example.id)) for example in examples}


def best_span(features: Features, index: int, start: np.ndarray, end: np.ndarray, n_best: int = N_BEST,
              max_answer_tokens: int = MAX_ANSWER_TOKENS) -> Span | None:
    """The best valid (start, end) pair of one feature, or None when no pair is valid."""
    start = np.where(np.isnan(start), -np.inf, start)
    end = np.where(np.isnan(end), -np.inf, end)
    starts = np.argsort(start)[-1:-n_best - 1:-1]
    ends = np.argsort(end)[-1:-n_best - 1:-1]
    first = features.context_starts[index]
    last = first + len(features.offsets[index]) - 1
    in_context_s = (starts >= first) & (starts <= last)
    in_context_e = (ends >= first) & (ends <= last)
    length = ends[None, :] - starts[:, None] + 1
    valid = in_context_s[:, None] & in_context_e[None, :] & (length >= 1) & (length <= max_answer_tokens)
    sums = start[starts][:, None] + end[ends][None, :]
    scores = np.where(valid & ~np.isnan(sums), sums, -np.inf)  # inf + -inf is NaN: never a winner
    if scores.max() == -np.inf:
        return None
    row, column = np.unravel_index(int(np.argmax(scores)), scores.shape)  # first maximum: run_qa's order
    offsets = features.offsets[index]
    return Span(float(scores[row, column]), offsets[starts[row] - first][0], offsets[ends[column] - first][1])


def _text(example: Example, span: Span | None) -> str:
    return "" if span is None else example.context[span.start_char:span.end_char]
