"""SQuAD v1.1 questions from the official JSON, a saved `datasets` folder, or the hub's ``squad``.

Three sources, tried in this order:

- a file in the official format (``dev-v1.1.json``: data -> paragraphs -> qas -> answers);
- a folder written by ``datasets``' ``save_to_disk`` (its ``validation`` split when it holds several);
- the word ``squad``: the hub's data set through ``datasets.load_dataset`` (validation split), only
  where the hub can be reached.

`datasets` is imported only for the last two, so the official file needs nothing beyond bertopt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bertopt.errors import BertoptError, first_line

HUB_NAME = "squad"
SPLIT = "validation"


@dataclass(frozen=True)
class Example:
    """One question on one context, with its gold answers (texts and character offsets)."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def load_examples(source: str | Path) -> list[Example]:
    """The questions of `source` (see the module docstring); a one-line BertoptError when unusable."""
    path = Path(source)
    if path.is_file():
        examples = _from_official_json(path)
    elif path.is_dir():
        examples = _from_records(_load_from_disk(path), str(path))
    elif str(source) == HUB_NAME:
        examples = _from_records(_load_from_hub(), "the hub's squad")
    else:
        raise BertoptError(f"--data {source}: no such file or folder (give dev-v1.1.json, a saved "
                           f"`datasets` folder, or `{HUB_NAME}` for the hub)")
    _check_examples(examples, str(source))
    return examples


def gold_answers(examples: list[Example]) -> dict[str, tuple[str, ...]]:
    """{question id: gold answer texts}, as the metric wants them."""
    return {example.id: example.answers for example in examples}


# --------------------------------------------------------------------------- the official JSON

def _from_official_json(path: Path) -> list[Example]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BertoptError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None
    articles = _field(document, "data", list, f"{path}")
    examples = []
    for a, article in enumerate(articles):
        where = f"{path}: data[{a}]"
        title = str(article.get("title", "")) if isinstance(article, dict) else ""
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where)):
            context = _field(paragraph, "context", str, f"{where}.paragraphs[{p}]")
            for q, qa in enumerate(_field(paragraph, "qas", list, f"{where}.paragraphs[{p}]")):
                examples.append(_official_example(qa, title, context, f"{where}.paragraphs[{p}].qas[{q}]"))
    return examples


def _official_example(qa: object, title: str, context: str, where: str) -> Example:
    answers = _field(qa, "answers", list, where)
    texts = tuple(_field(answer, "text", str, f"{where}.answers[{i}]") for i, answer in enumerate(answers))
    starts = tuple(int(_field(answer, "answer_start", int, f"{where}.answers[{i}]"))
                   for i, answer in enumerate(answers))
    return Example(str(_field(qa, "id", (str, int), where)), title, context,
                   _field(qa, "question", str, where), texts, starts)


def _field(item: object, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(item, dict) or key not in item:
        raise BertoptError(f"{where}: missing {key!r} (not SQuAD v1.1's format)")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BertoptError(f"{where}.{key}: unexpected type {type(value).__name__} (not SQuAD v1.1's format)")
    return value


# --------------------------------------------------------------------------- `datasets`

def _datasets():
    try:
        import datasets
    except ImportError:
        raise BertoptError("reading a `datasets` folder or the hub needs the `datasets` package "
                           "(pip install datasets); the official dev-v1.1.json needs nothing") from None
    return datasets


def _load_from_disk(folder: Path):
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise BertoptError(f"--data {folder}: not a saved `datasets` folder ({first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if SPLIT not in loaded:
            raise BertoptError(f"--data {folder}: no {SPLIT!r} split (it has {', '.join(loaded)})")
        return loaded[SPLIT]
    return loaded


def _load_from_hub():
    datasets = _datasets()
    try:
        return datasets.load_dataset(HUB_NAME, split=SPLIT)
    except Exception as exc:  # network, hub and cache failures share no base class
        raise BertoptError(f"cannot load {HUB_NAME!r} from the hub ({first_line(exc)}); "
                           "give the official dev-v1.1.json with --data") from None


def _from_records(records, where: str) -> list[Example]:
    """Rows of the hub's schema: id, title, context, question, answers {text: [..], answer_start: [..]}."""
    missing = {"id", "context", "question", "answers"} - set(records.column_names)
    if missing:
        raise BertoptError(f"{where}: missing column(s) {', '.join(sorted(missing))} (not SQuAD's schema)")
    return [Example(str(row["id"]), str(row.get("title", "")), row["context"], row["question"],
                    tuple(row["answers"]["text"]), tuple(int(s) for s in row["answers"]["answer_start"]))
            for row in records]


# --------------------------------------------------------------------------- checks

def _check_examples(examples: list[Example], where: str) -> None:
    if not examples:
        raise BertoptError(f"--data {where}: no questions")
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise BertoptError(f"--data {where}: question id {example.id!r} appears twice")
        seen.add(example.id)
        if not example.answers:
            raise BertoptError(f"--data {where}: question {example.id!r} has no gold answer "
                               "(SQuAD v2's unanswerable questions are not supported)")
