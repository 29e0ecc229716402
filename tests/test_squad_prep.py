"""SQuAD data loading and pre-processing: the shipped mini file, run_qa features, ais_bench layout."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bertopt.errors import BertoptError
from bertopt.model.facts import ModelFacts
from bertopt.squad.data import Example, load_examples
from bertopt.squad.model import SquadModel, load_tokenizer, tokenizer_folder, uncased_bert_tokenizer_folder
from bertopt.squad.prep import default_doc_stride, prepare_features, read_features, write_features

MINI = Path(__file__).parent / "data" / "squad-mini.json"
INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(uncased_bert_tokenizer_folder(), 30522)


@pytest.fixture(scope="module")
def examples():
    return load_examples(MINI)


def test_mini_file_answer_offsets_are_correct():
    document = json.loads(MINI.read_text())
    paragraphs = [p for article in document["data"] for p in article["paragraphs"]]
    assert 8 <= len(paragraphs) <= 12
    for paragraph in paragraphs:
        assert 2 <= len(paragraph["qas"]) <= 4
        for qa in paragraph["qas"]:
            for answer in qa["answers"]:
                start = answer["answer_start"]
                assert paragraph["context"][start:start + len(answer["text"])] == answer["text"], qa["id"]


def test_load_examples_reads_the_official_format(examples):
    assert len(examples) == 29
    first = examples[0]
    assert first.id == "sourdough-1" and first.title == "Sourdough"
    assert first.answers == ("a culture of wild yeasts and lactic acid bacteria", "wild yeasts and lactic acid bacteria")
    assert first.context[first.answer_starts[1]:].startswith("wild yeasts")


def _write(tmp_path, document) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(document))
    return path


def _doc(qa):
    return {"data": [{"title": "t", "paragraphs": [{"context": "Some context.", "qas": qa}]}]}


@pytest.mark.parametrize("document, message", [
    ({"version": "1.1"}, "missing 'data'"),
    (_doc([{"id": "a", "question": "q?"}]), r"qas\[0\]: missing 'answers'"),
    (_doc([{"id": "a", "question": "q?", "answers": [{"text": 5, "answer_start": 0}]}]), "unexpected type int"),
    (_doc([{"id": "a", "question": "q?", "answers": []}]), "no gold answer"),
    (_doc([{"id": "a", "question": "q?", "answers": [{"text": "Some", "answer_start": 0}]}] * 2), "appears twice"),
    (_doc([]), "no questions"),
])
def test_load_examples_refuses_malformed_files(tmp_path, document, message):
    with pytest.raises(BertoptError, match=message):
        load_examples(_write(tmp_path, document))


def test_load_examples_refuses_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(BertoptError, match="no such file or folder"):
        load_examples(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BertoptError, match="not a readable JSON file"):
        load_examples(bad)


def test_datasets_sources_say_when_datasets_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(BertoptError, match="needs the `datasets` package"):
        load_examples("squad")
    with pytest.raises(BertoptError, match="needs the `datasets` package"):
        load_examples(tmp_path)


@pytest.mark.parametrize("seq, stride", [(64, 16), (128, 64), (256, 128), (320, 128), (384, 128), (512, 128),
                                         (32, 8), (192, 96)])
def test_default_doc_stride_follows_the_seed(seq, stride):
    assert default_doc_stride(seq) == stride


def _token_span(offsets, first, start_char, end_char):
    """Feature token indices of the answer's first and last character, None when outside the window."""
    starts = [first + i for i, (s, e) in enumerate(offsets) if s <= start_char < e]
    ends = [first + i for i, (s, e) in enumerate(offsets) if s < end_char <= e]
    return (starts[0], ends[0]) if starts and ends else None


@pytest.mark.parametrize("seq", [64, 128])
def test_gold_answers_map_back_through_the_offsets(tokenizer, examples, seq):
    features = prepare_features(examples, tokenizer, seq)
    by_id = {example.id: example for example in examples}
    assert sorted(set(features.example_ids)) == sorted(by_id)
    found = {}
    for index, example_id in enumerate(features.example_ids):
        example, first, offsets = by_id[example_id], features.context_starts[index], features.offsets[index]
        mapping = features.offset_mapping(index)
        assert mapping[:first] == [None] * first and mapping[first:first + len(offsets)] == offsets
        assert features.tokens["token_type_ids"][index, first] == 1
        for text, start in zip(example.answers, example.answer_starts):
            span = _token_span(offsets, first, start, start + len(text))
            if span is not None:
                mapped = example.context[mapping[span[0]][0]:mapping[span[1]][1]]
                assert mapped == text
                found.setdefault(example_id, 0)
                found[example_id] += 1
    assert set(found) == set(by_id)  # every gold answer is inside at least one window


def test_long_context_gives_overlapping_windows(tokenizer, examples):
    features = prepare_features(examples, tokenizer, 128)
    assert features.doc_stride == 64
    windows = [i for i, example_id in enumerate(features.example_ids) if example_id == "bicycle-1"]
    assert len(windows) >= 3
    for left, right in zip(windows, windows[1:]):
        # the next window starts `doc_stride` context tokens before this one ends
        assert features.offsets[left][-64:] == features.offsets[right][:64]
    assert features.offsets[windows[0]][0][0] == 0
    assert features.offsets[windows[-1]][-1][1] == len(examples[3].context)  # the last window reaches the end


def test_features_are_padded_to_seq(tokenizer, examples):
    features = prepare_features(examples[:3], tokenizer, 128)
    ids, mask = features.tokens["input_ids"], features.tokens["attention_mask"]
    assert ids.shape == mask.shape == (len(features), 128) and ids.dtype == np.int64
    length = int(mask[0].sum())
    assert length < 128 and (ids[0, length:] == 0).all() and ids[0, 0] == 101 and ids[0, length - 1] == 102


def test_a_question_too_long_for_the_stride_is_refused(tokenizer):
    long_question = Example("long", "", "A short context.", "why " * 50 + "?", ("short",), (2,))
    with pytest.raises(BertoptError, match="question 'long' has 51 tokens"):
        prepare_features([long_question], tokenizer, 64)


def test_write_and_read_features_in_ais_bench_layout(tmp_path, tokenizer, examples):
    features = prepare_features(examples, tokenizer, 64)
    inputs = {"input_ids": "input_ids", "token_type_ids": "token_type_ids", "attention_mask": "attention_mask"}
    folders = write_features(features, inputs, tmp_path / "prep")
    assert folders == [tmp_path / "prep" / name for name in inputs]
    row = np.load(tmp_path / "prep" / "token_type_ids" / f"{len(features) - 1}.npy")
    assert row.shape == (1, 64) and row.dtype == np.int64
    assert (row[0] == features.tokens["token_type_ids"][-1]).all()
    back, back_inputs = read_features(tmp_path / "prep")
    assert back_inputs == inputs and list(back_inputs) == list(inputs)
    assert back.example_ids == features.example_ids and back.offsets == features.offsets
    assert back.context_starts == features.context_starts and (back.seq, back.doc_stride) == (64, 16)
    for role, values in features.tokens.items():
        assert (back.tokens[role] == values).all()


def test_write_features_refuses_existing_output_and_missing_inputs(tmp_path, tokenizer, examples):
    features = prepare_features(examples[:2], tokenizer, 64)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(BertoptError, match="already exists"):
        write_features(features, INPUTS, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(BertoptError, match="no values for model input"):
        write_features(features, {"pixel_values": "pixels"}, tmp_path / "new")
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_read_features_refuses_other_folders(tmp_path):
    with pytest.raises(BertoptError, match="not a folder written by `bertopt squad prep`"):
        read_features(tmp_path)


def _facts(vocab: int) -> ModelFacts:
    return ModelFacts("bert", 2, 32, 2, 16, vocab, 128, 2, dict(INPUTS))


def test_tokenizer_choice():
    uncased = uncased_bert_tokenizer_folder()
    model = SquadModel(Path("m.onnx"), "ONNX file m.onnx", _facts(30522), INPUTS, None)
    assert tokenizer_folder(model) == uncased
    assert tokenizer_folder(model, Path("/mine")) == Path("/mine")
    tiny = SquadModel(Path("t.onnx"), "ONNX file t.onnx", _facts(1000), INPUTS, None)
    with pytest.raises(BertoptError, match="1000-id vocabulary"):
        tokenizer_folder(tiny)
    with pytest.raises(BertoptError, match="has 30522 ids but the model's vocabulary only 1000"):
        load_tokenizer(uncased, 1000)
