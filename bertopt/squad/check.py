"""Score SQuAD answers: from an ais_bench results folder (``eval``), or the original graph against the
optimized graph (and the Ascend emulations, one per Gelu kernel) on the very same features (``check``).

Every scored candidate gets a folder with ``predictions.json`` (the official format,
``{question id: answer text}``) and ``metrics.json`` (``exact_match``, ``f1``, ``total``); a check
also writes ``squad.json`` with all scores, their deltas against the original and how many answers
are word for word the original's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from bertopt.errors import BertoptError
from bertopt.flow.run import EvaluationInput
from bertopt.files import new_folder, refuse_used_folder, write_json
from bertopt.squad.data import Example, gold_answers, load_examples
from bertopt.squad.infer import Runner, read_results, run_features
from bertopt.squad.metric import SquadMetrics, evaluate
from bertopt.squad.post import predict_answers
from bertopt.squad.prep import Features, prepare_features, read_features, write_features
from bertopt.validation.candidates import static_shape
from bertopt.validation.parity import graph_only, input_specs_of

PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
CHECK_FILE = "squad.json"
FEATURES_DIR = "features"
OPTIMIZED_MODEL = "optimized.onnx"
ORIGINAL, OPTIMIZED, EMULATION = "original", "optimized", "emulation"

Progress = Callable[[str], None]


class Emulation(NamedTuple):
    """A candidate beside the two graphs: its folder name, its label and what runs it."""

    folder: str
    label: str
    run: Runner


@dataclass
class SquadScore:
    """One candidate's answers and EM/F1; `nonfinite_features` counts features with NaN/inf logits."""

    name: str
    label: str
    metrics: SquadMetrics
    predictions: dict[str, str]
    nonfinite_features: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, **self.metrics.to_dict(),
                "nonfinite_features": self.nonfinite_features}


@dataclass
class SquadCheck:
    """The original graph's score first, then each candidate's; deltas are candidate - original."""

    output: Path
    seq: int
    doc_stride: int
    batch: int
    features: int
    scores: list[SquadScore]
    info: dict = field(default_factory=dict)

    def delta(self, score: SquadScore) -> dict[str, float]:
        reference = self.scores[0].metrics
        return {"exact_match": score.metrics.exact_match - reference.exact_match,
                "f1": score.metrics.f1 - reference.f1}

    def same_answers(self, score: SquadScore) -> float:
        """The fraction of questions whose answer text is the original graph's, character for character."""
        reference = self.scores[0].predictions
        return sum(score.predictions[q] == text for q, text in reference.items()) / len(reference)

    def to_dict(self) -> dict:
        return {"seq": self.seq, "doc_stride": self.doc_stride, "batch": self.batch, "features": self.features,
                **self.info,
                "scores": [dict(score.to_dict(), folder=score.name, delta=self.delta(score),
                                same_answers=self.same_answers(score)) for score in self.scores]}


def score_logits(name: str, label: str, examples: list[Example], features: Features, start: np.ndarray,
                 end: np.ndarray) -> SquadScore:
    """Post-process logits into answers and score them against the gold answers."""
    _check_coverage(examples, features)
    predictions = predict_answers(examples, features, start, end)
    nonfinite = int(np.count_nonzero(~(np.isfinite(start).all(axis=1) & np.isfinite(end).all(axis=1))))
    return SquadScore(name, label, evaluate(gold_answers(examples), predictions), predictions, nonfinite)


def _check_coverage(examples: list[Example], features: Features) -> None:
    """Features made from another data file would silently score 0 on the questions they lack."""
    asked = {example.id for example in examples}
    featured = set(features.example_ids)
    if asked != featured:
        strays = sorted(featured - asked)[:3] or sorted(asked - featured)[:3]
        raise BertoptError(f"the features and the data file hold different questions (e.g. {', '.join(strays)}); "
                           "prepare the features from this data file")


def write_score(folder: Path, score: SquadScore) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / PREDICTIONS_FILE, score.predictions)
    write_json(folder / METRICS_FILE, score.metrics.to_dict())


def evaluate_results(features_dir: Path, results_dir: Path, data: str | Path, output: Path) -> SquadScore:
    """Score an ais_bench results folder produced from `features_dir`; write into `output` (new)."""
    refuse_used_folder(Path(output))
    features, _ = read_features(features_dir)
    examples = load_examples(data)
    start, end = read_results(results_dir, len(features), features.seq)
    score = score_logits("results", f"ais_bench results {results_dir}", examples, features, start, end)
    with new_folder(output) as staging:
        write_score(staging, score)
    return score


def check(original: Path, optimized: Path, examples: list[Example], features: Features,
          inputs: dict[str, str], output: Path, *, batch: int, emulations: Sequence[Emulation] = (),
          threads: int | None = None, progress: Progress = lambda message: None) -> SquadCheck:
    """Run the original and the optimized ONNX (and `emulations`) on the same features and score each.

    `inputs` maps the models' input names to roles; each ONNX model runs at its static batch (else
    `batch`), the emulations at `batch`. Writes `output` (new or empty) whole or not at all.
    """
    with new_folder(output) as staging:
        result = _check_into(staging, original, optimized, examples, features, inputs, batch, emulations,
                             threads, progress, {})
    result.output = Path(output)
    return result


def _check_into(folder: Path, original: Path, optimized: Path, examples: list[Example], features: Features,
                inputs: dict[str, str], batch: int, emulations: Sequence[Emulation],
                threads: int | None, progress: Progress, info: dict) -> SquadCheck:
    from bertopt.validation.backends.ort import OrtBackend

    feeds = {name: features.tokens[role] for name, role in inputs.items()}
    candidates = [(ORIGINAL, original, "original graph (ONNX Runtime fp32)"),
                  (OPTIMIZED, optimized, "optimized graph (ONNX Runtime fp32)")]
    scores = []
    for name, model, label in candidates:
        progress(f"SQuAD: running the {label} on {len(features)} features")
        model_batch = static_shape(input_specs_of(graph_only(model)))[0] or batch
        start, end = run_features(OrtBackend(model, name=label, threads=threads).run, feeds, model_batch)
        scores.append(score_logits(name, label, examples, features, start, end))
    for emulation in emulations:
        progress(f"SQuAD: running the {emulation.label} on {len(features)} features")
        start, end = run_features(emulation.run, feeds, batch)
        scores.append(score_logits(emulation.folder, emulation.label, examples, features, start, end))
    for score in scores:
        write_score(folder / score.name, score)
    result = SquadCheck(folder, features.seq, features.doc_stride, batch, len(features), scores, info)
    write_json(folder / CHECK_FILE, result.to_dict())
    return result


def check_model(model: str, data: str | Path, output: Path, *, seq: int, batch: int, passes: str = "default",
                doc_stride: int | None = None, tokenizer: Path | None = None, emulation: bool = True,
                threads: int | None = None, progress: Progress = lambda message: None) -> SquadCheck:
    """The one-shot accuracy check: export `model` if needed, optimize it with `passes` at batch x seq,
    prepare the features of `data`, and score the original, the optimized graph and the emulation.

    `output` (new or empty) receives original.onnx (when exported), optimized.onnx, features/ (ais_bench
    inputs, to score an OM later with `bertopt squad eval`), one folder per candidate and squad.json.
    """
    from bertopt.model.facts import check_shape
    from bertopt.squad.model import load_tokenizer, obtain_model, tokenizer_folder

    refuse_used_folder(Path(output))
    examples = load_examples(data)  # a bad data file fails before any export
    with new_folder(output) as staging:
        progress(f"obtaining {model} as ONNX")
        squad_model = obtain_model(model, staging)
        check_shape(squad_model.facts, batch, seq)
        source = tokenizer_folder(squad_model, tokenizer)
        progress(f"SQuAD: tokenising {len(examples)} questions (seq {seq})")
        features = prepare_features(examples, load_tokenizer(source, squad_model.facts.vocab_size), seq,
                                    doc_stride, str(source))
        write_features(features, squad_model.inputs, staging / FEATURES_DIR)
        progress(f"running the passes {passes!r} at batch {batch}, seq {seq}")
        optimized = _optimize(squad_model.onnx, passes, batch, seq, staging / OPTIMIZED_MODEL)
        info = {"model": squad_model.description, "passes": passes, "data": str(data), "questions": len(examples),
                "tokenizer": str(source)}
        result = _check_into(staging, squad_model.onnx, optimized, examples, features, squad_model.inputs, batch,
                             emulations_of(optimized, threads=threads) if emulation else [], threads, progress,
                             info)
    result.output = Path(output)
    return result


def check_run(model: str, original: Path, optimized: Path, data: str | Path, output: Path, *, seq: int,
              batch: int, emulations: Sequence[Emulation], progress: Progress = lambda message: None) -> SquadCheck:
    """`bertopt run --eval squad`: score the run's original and optimized graphs (and its emulations)."""
    from bertopt.squad.model import described_model, load_tokenizer, tokenizer_folder

    examples = load_examples(data)
    squad_model = described_model(model, original, model)
    source = tokenizer_folder(squad_model)
    progress(f"SQuAD: tokenising {len(examples)} questions (seq {seq})")
    features = prepare_features(examples, load_tokenizer(source, squad_model.facts.vocab_size), seq, None,
                                str(source))
    return check(original, optimized, examples, features, squad_model.inputs, output, batch=batch,
                 emulations=emulations, progress=progress)


@dataclass(frozen=True)
class SquadEvaluation:
    """`bertopt run --eval squad=PATH`: the run's graphs (and its Ascend emulation, each Gelu kernel) scored on
    SQuAD v1.1 (a bertopt.flow.run Evaluation)."""

    data: str  # dev-v1.1.json, a saved `datasets` folder, or "squad" (the hub)
    name: str = "squad"

    def __call__(self, run: EvaluationInput, progress: Progress) -> SquadCheck:
        emulation = run.emulation
        emulations = [] if emulation is None else emulations_of(
            run.optimized, gelu=emulation.gelu, precision=emulation.precision, cann=emulation.cann)
        return check_run(run.model, run.original, run.optimized, self.data, run.output, seq=run.seq,
                         batch=run.batch, emulations=emulations, progress=progress)


def evaluation_from_option(text: str) -> SquadEvaluation:
    """`--eval squad` (the hub's data set) or `--eval squad=PATH` (a local file or `datasets` folder)."""
    name, _, data = text.partition("=")
    if name != "squad":
        raise BertoptError(f"--eval {text!r}: expected squad or squad=PATH")
    return SquadEvaluation(data or "squad")


def _optimize(original: Path, passes: str, batch: int, seq: int, path: Path) -> Path:
    from bertopt.flow.run import optimize_file
    from bertopt.pipeline import PassManager, PassOptions

    optimize_file(original, path, PassManager(passes, PassOptions(batch=batch, seq=seq)))
    return path


def emulations_of(optimized: Path, *, gelu: str = "high_performance", precision: str | None = None,
                  cann: str | None = None, threads: int | None = None) -> list[Emulation]:
    """The Ascend emulation of each Gelu kernel atc offers, `gelu` (the one atc is asked for) first: the
    evidence for choosing one. Folders are named ``emulation-<kernel>``."""
    from bertopt.validation.candidates import emulation_candidates

    backends = emulation_candidates(optimized, gelu, precision=precision, cann=cann, threads=threads,
                                    others_informational=False)
    return [Emulation(f"{EMULATION}-{backend.gelu_kernel.impl_mode}", backend.name, backend.run)
            for backend in backends]
