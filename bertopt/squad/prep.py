"""SQuAD features as HF ``run_qa`` makes them for validation, written in ais_bench's input layout.

Each question (leading whitespace stripped, as run_qa does) is paired with its context: question
first, ``truncation="only_second"``, ``max_length=seq``, ``stride=doc_stride``, overflowing tokens
kept, padding to ``seq``. A context too long for one window gives several features overlapping by
``doc_stride`` tokens. Only context tokens keep their character offsets; post-processing needs them
to cut the answer out of the context.

On disk (``write_features``): ``<dir>/<input name>/<feature index>.npy``, int64 ``[1, seq]``, one
folder per model input in the model's input order (feed them to ``ais_bench --input``), and
``features.json`` with each feature's question id and its context offsets, so answers can be
scored later from the folder and the data file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertopt.errors import BertoptError
from bertopt.squad.data import Example
from bertopt.files import new_folder, read_json, write_json

FEATURES_FILE = "features.json"
FORMAT = "bertopt-squad-features/1"
CONTEXT = 1  # sequence id of the context: the question goes first
# run_qa's own default; the seed overrides it for short sequences (see default_doc_stride).
MAX_DOC_STRIDE = 128


def default_doc_stride(seq: int) -> int:
    """The seed's strides (64 -> 16, 128 -> 64, 256..512 -> 128) from one rule for every seq:
    a quarter of seq up to 64, then half of seq, at most 128."""
    return seq // 4 if seq <= 64 else min(seq // 2, MAX_DOC_STRIDE)


@dataclass
class Features:
    """Tokenised windows: `tokens[role]` is ``[features, seq]`` int64; per feature, the question it
    answers, the index of its first context token and the character offsets of its context tokens."""

    seq: int
    doc_stride: int
    tokenizer: str
    example_ids: list[str]
    context_starts: list[int]
    offsets: list[list[tuple[int, int]]]
    tokens: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.example_ids)

    def offset_mapping(self, index: int) -> list[tuple[int, int] | None]:
        """run_qa's offset_mapping of one feature: character spans of context tokens, None elsewhere."""
        mapping: list[tuple[int, int] | None] = [None] * self.seq
        start = self.context_starts[index]
        mapping[start:start + len(self.offsets[index])] = self.offsets[index]
        return mapping


def prepare_features(examples: list[Example], tokenizer, seq: int, doc_stride: int | None = None,
                     tokenizer_name: str = "") -> Features:
    """Tokenise `examples` with a fast tokenizer into windows of `seq` tokens (see the module docstring)."""
    doc_stride = default_doc_stride(seq) if doc_stride is None else doc_stride
    if not getattr(tokenizer, "is_fast", False):
        raise BertoptError("SQuAD pre-processing needs a fast tokenizer (tokenizer.json) for offsets")
    if seq < 8 or not 0 <= doc_stride < seq:
        raise BertoptError(f"--seq {seq} / --doc-stride {doc_stride}: need seq >= 8 and 0 <= stride < seq")
    questions = [example.question.lstrip() for example in examples]
    _check_question_lengths(examples, questions, tokenizer, seq, doc_stride)
    encoded = tokenizer(questions, [example.context for example in examples], truncation="only_second",
                        max_length=seq, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True, padding="max_length")
    example_ids, starts, offsets = [], [], []
    for index, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        start, spans = _context_span(encoded.sequence_ids(index), encoded["offset_mapping"][index])
        example_ids.append(examples[example_index].id)
        starts.append(start)
        offsets.append(spans)
    roles = ("input_ids", "attention_mask", "token_type_ids")
    tokens = {role: np.asarray(encoded[role], dtype=np.int64) for role in roles if role in encoded}
    return Features(seq, doc_stride, tokenizer_name, example_ids, starts, offsets, tokens)


def _check_question_lengths(examples: list[Example], questions: list[str], tokenizer, seq: int,
                            doc_stride: int) -> None:
    """The tokenizer aborts the process (a Rust panic) when a question leaves no more room for the
    context than the stride; refuse such a question with a readable message first."""
    room = seq - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for example, length in zip(examples, lengths):
        if length > room:
            raise BertoptError(f"question {example.id!r} has {length} tokens; at seq {seq} with doc stride "
                               f"{doc_stride} a question may have at most {room}: raise --seq or lower "
                               "--doc-stride")


def _context_span(sequence_ids: list[int | None], offsets) -> tuple[int, list[tuple[int, int]]]:
    """(index of the first context token, offsets of the context tokens, which are contiguous)."""
    positions = [i for i, sid in enumerate(sequence_ids) if sid == CONTEXT]
    return positions[0], [tuple(offsets[i]) for i in positions]


def write_features(features: Features, inputs: dict[str, str], output: Path) -> list[Path]:
    """Write `features` for a model whose inputs are `inputs` ({name: role}, in the model's order).

    Returns the input folders in that order (ais_bench's ``--input``). `output` must be new or empty.
    """
    missing = [f"{name} ({role})" for name, role in inputs.items() if role not in features.tokens]
    if missing:
        raise BertoptError(f"the tokenizer gives no values for model input(s) {', '.join(missing)}")
    output = Path(output)
    with new_folder(output) as staging:
        for name, role in inputs.items():
            folder = staging / name
            folder.mkdir()
            for index, row in enumerate(features.tokens[role]):
                np.save(folder / f"{index}.npy", row[None, :])
        write_json(staging / FEATURES_FILE, _manifest(features, inputs))
    return [output / name for name in inputs]


def _manifest(features: Features, inputs: dict[str, str]) -> dict:
    return {
        "format": FORMAT,
        "seq": features.seq,
        "doc_stride": features.doc_stride,
        "tokenizer": features.tokenizer,
        "inputs": inputs,
        "features": [{"example_id": example_id, "context_start": start, "offsets": [list(s) for s in spans]}
                     for example_id, start, spans in zip(features.example_ids, features.context_starts,
                                                         features.offsets)],
    }


def read_features(folder: Path) -> tuple[Features, dict[str, str]]:
    """Features and the model inputs ({name: role}) from a folder `write_features` wrote."""
    folder = Path(folder)
    manifest = read_json(folder / FEATURES_FILE, "not a folder written by `bertopt squad prep`")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BertoptError(f"{folder / FEATURES_FILE}: not a bertopt SQuAD features file ({FORMAT})")
    try:
        seq, inputs, items = int(manifest["seq"]), dict(manifest["inputs"]), manifest["features"]
        features = Features(seq, int(manifest["doc_stride"]), str(manifest["tokenizer"]),
                            [str(item["example_id"]) for item in items],
                            [int(item["context_start"]) for item in items],
                            [[(int(s), int(e)) for s, e in item["offsets"]] for item in items], {})
    except (KeyError, TypeError, ValueError) as exc:
        raise BertoptError(f"{folder / FEATURES_FILE}: malformed ({type(exc).__name__}: {exc})") from None
    features.tokens = {role: _read_rows(folder / name, len(items), seq) for name, role in inputs.items()}
    return features, inputs


def _read_rows(folder: Path, count: int, seq: int) -> np.ndarray:
    rows = np.empty((count, seq), dtype=np.int64)
    for index in range(count):
        path = folder / f"{index}.npy"
        try:
            row = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BertoptError(f"{path}: missing or not a readable .npy file ({type(exc).__name__})") from None
        if row.shape != (1, seq):
            raise BertoptError(f"{path}: shape {list(row.shape)}; expected [1, {seq}]")
        rows[index] = row[0]
    return rows
