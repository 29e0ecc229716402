"""Post-processing: crafted logits -> answers, run_qa's rules, and gold spans -> EM = F1 = 100."""

from pathlib import Path

import numpy as np
import pytest

from bertopt.errors import BertoptError
from bertopt.squad.data import Example, gold_answers, load_examples
from bertopt.squad.metric import evaluate
from bertopt.squad.model import load_tokenizer, uncased_bert_tokenizer_folder
from bertopt.squad.post import predict_answers
from bertopt.squad.prep import Features, prepare_features

MINI = Path(__file__).parent / "data" / "squad-mini.json"
SEQ = 16
CONTEXT = "alpha beta gamma delta epsilon zeta"
# the six words as tokens 5..10 of a window; tokens 0..4 are [CLS], question and [SEP]
WORDS = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30), (31, 35)]
FIRST = 5


def _example(example_id="q") -> Example:
    return Example(example_id, "", CONTEXT, "which?", ("gamma",), (11,))


def _features(windows: int = 1, example_id="q") -> Features:
    return Features(SEQ, 4, "test", [example_id] * windows, [FIRST] * windows, [list(WORDS)] * windows, {})


def _logits(windows: int = 1):
    return np.zeros((windows, SEQ), np.float32), np.zeros((windows, SEQ), np.float32)


def test_best_valid_span_wins():
    start, end = _logits()
    start[0, FIRST + 2], end[0, FIRST + 3] = 5.0, 4.0      # "gamma delta": 9
    start[0, FIRST + 1], end[0, FIRST + 1] = 3.0, 3.0      # "beta": 6
    assert predict_answers([_example()], _features(), start, end) == {"q": "gamma delta"}


def test_question_tokens_and_padding_are_never_answers():
    start, end = _logits()
    start[0, 2], end[0, 3] = 50.0, 50.0                     # inside the question
    end[0, 14] = 60.0                                        # padding after the context
    start[0, FIRST + 4], end[0, FIRST + 4] = 1.0, 1.0
    assert predict_answers([_example()], _features(), start, end) == {"q": "epsilon"}


def test_end_before_start_is_skipped():
    start, end = _logits()
    start[0, FIRST + 4], end[0, FIRST + 1] = 9.0, 9.0      # end < start: invalid
    end[0, FIRST + 5] = 2.0                                 # best valid: epsilon .. zeta
    assert predict_answers([_example()], _features(), start, end) == {"q": "epsilon zeta"}


def test_max_answer_length():
    start, end = _logits()
    start[0, FIRST], end[0, FIRST + 5] = 9.0, 9.0           # six tokens
    end[0, FIRST + 1] = 1.0
    features, example = _features(), [_example()]
    assert predict_answers(example, features, start, end) == {"q": CONTEXT}
    assert predict_answers(example, features, start, end, max_answer_tokens=5) == {"q": "alpha beta"}


def test_only_the_top_n_starts_and_ends_are_tried():
    start, end = _logits()
    start[0, :FIRST] = 10.0                                  # the top 5 starts are all question tokens
    start[0, FIRST + 2], end[0, FIRST + 2] = 1.0, 1.0
    assert predict_answers([_example()], _features(), start, end, n_best=5) == {"q": ""}
    assert predict_answers([_example()], _features(), start, end, n_best=6) == {"q": "gamma"}


def test_features_of_one_example_are_merged():
    start, end = _logits(2)
    start[0, FIRST], end[0, FIRST] = 2.0, 2.0               # window 0: "alpha", 4
    start[1, FIRST + 3], end[1, FIRST + 4] = 3.0, 3.0       # window 1: "delta epsilon", 6
    assert predict_answers([_example()], _features(2), start, end) == {"q": "delta epsilon"}


def test_no_valid_span_and_nan_logits_give_an_empty_answer():
    start, end = _logits()
    start[0, FIRST:FIRST + 6] = np.nan
    assert predict_answers([_example()], _features(), start, end) == {"q": ""}
    start[0, FIRST + 1], end[0, FIRST + 1] = 1.0, 1.0       # one finite start among NaNs
    assert predict_answers([_example()], _features(), start, end) == {"q": "beta"}


def test_logits_must_fit_the_features():
    start, end = _logits(2)
    with pytest.raises(BertoptError, match="do not fit 1 features of 16 tokens"):
        predict_answers([_example()], _features(), start, end)


@pytest.mark.parametrize("seq", [64, 128])
def test_gold_span_logits_score_100(seq):
    """Logits that point at the gold answer in every window holding it: the whole chain gives 100."""
    examples = load_examples(MINI)
    tokenizer = load_tokenizer(uncased_bert_tokenizer_folder(), 30522)
    features = prepare_features(examples, tokenizer, seq)
    start, end = np.zeros((len(features), seq), np.float32), np.zeros((len(features), seq), np.float32)
    by_id = {example.id: example for example in examples}
    for index, example_id in enumerate(features.example_ids):
        example = by_id[example_id]
        first, offsets = features.context_starts[index], features.offsets[index]
        begin, stop = example.answer_starts[0], example.answer_starts[0] + len(example.answers[0])
        starts = [first + i for i, (s, e) in enumerate(offsets) if s <= begin < e]
        ends = [first + i for i, (s, e) in enumerate(offsets) if s < stop <= e]
        if starts and ends:
            start[index, starts[0]], end[index, ends[0]] = 10.0, 10.0
    predictions = predict_answers(examples, features, start, end)
    assert predictions == {example.id: example.answers[0] for example in examples}
    metrics = evaluate(gold_answers(examples), predictions)
    assert (metrics.exact_match, metrics.f1, metrics.total) == (100.0, 100.0, 29)
