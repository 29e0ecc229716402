"""`bertopt run`: model -> passes -> optimized ONNX -> atc -> validation against the original -> report.json.

Data moves forward only: each step takes the previous step's value and returns a new one. The CLI
layer (cli.py) only parses arguments, shows progress and prints what this module returns.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import onnx_graphsurgeon as gs

from bertopt.ascend.atc import AtcOptions, AtcResult, compile_om, in_work_dir
from bertopt.ascend.cann import CannTarget, resolve_cann
from bertopt.ascend.check import ConformanceReport, check_ascend
from bertopt.ascend.fusion_result import FusionResult, compare_with_prediction, read_fusion_result
from bertopt.ascend.legality import check_model_level
from bertopt.ascend.soc import detect_soc, is_310p
from bertopt.errors import BertoptError
from bertopt.files import check_writable_folder, write_json
from bertopt.flow.source import is_onnx_file, onnx_or_export
from bertopt.graph import is_static, load_graph, save_graph
from bertopt.model.facts import ModelFacts, check_shape, content_shape, detect_facts
from bertopt.pipeline import Instruments, PassManager, PassOptions, PassRecord, parse_spec
from bertopt.validation.backends import Backend, Skipped
from bertopt.validation.candidates import AscendCandidates, CandidateReport, run_candidates, validate_candidates
from bertopt.validation.parity import (Comparison, check_feedable, input_specs_of, parity_check,
                                       tolerances_for)

if TYPE_CHECKING:
    from bertopt.report.html import PassPictures

OPTIMIZED_NAME = "optimized.onnx"
REPORT_NAME = "report.json"
OM_PREFIX = "om/optimized"  # atc's --output, relative to the output folder (atc appends .om)

Progress = Callable[[str], None]


@dataclass
class RunConfig:
    model: str = "bert-base"
    passes: str = "default"
    batch: int = 1
    seq: int = 384
    image_size: int | None = None  # image models: square images of this size (None: the model's static size)
    frames: int | None = None  # audio models: input frames (None: the model's static count)
    output: Path | None = None
    target: str = "ascend"
    force: bool = False
    exporter: str = "legacy"
    opset: int | None = None
    attention: str = "eager"  # export options for presets and HF folders (bertopt.flow.export.export_onnx)
    dtype: str = "fp32"
    mask: str = "int"
    dump_dir: Path | None = None
    check_each_pass: bool = False
    samples: int = 2
    atol: float | None = None  # the optimized ONNX; None: by the model's dtype (fp32 1e-4, fp16 2^-7)
    rtol: float | None = None
    soc: str | None = None
    cann: str | None = None  # CANN version; None: the installed toolkit's, else the seed's
    gelu_impl: str = "high_performance"  # the Gelu kernel atc is asked for (the seed's)
    require_fusion: bool = False  # attention that will not fuse fails the run instead of warning
    atc_args: tuple[str, ...] = ()
    device: int = 0
    evaluations: tuple[Evaluation, ...] = ()  # task-level checks given by the caller (--eval squad=PATH)
    report: str = "json"  # "html" also writes report.html (and draws each pass's changes while it runs)

    def output_dir(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        stem = Path(self.model).stem if self.model.endswith(".onnx") else Path(self.model).name
        return Path("bertopt-out") / f"{stem}-bs{self.batch}-{self._shape_name()}"

    def _shape_name(self) -> str:
        """seq<S> for text; images by their side (<N>px) and audio by its frames (<N>frames) as they are frozen,
        since seq means nothing to them."""
        modality, size = _content_shape(self.model)
        if modality == "image":
            return f"{self.image_size or size}px" if self.image_size or size else "image"
        if modality == "audio":
            return f"{self.frames or size}frames" if self.frames or size else "audio"
        return f"seq{self.seq}"


def _content_shape(model: str) -> tuple[str, int | None]:
    """An ONNX file's content input by its graph (weights stay in the file), a preset's or folder's by its config."""
    path = Path(model)
    if is_onnx_file(model):
        return content_shape(load_graph(path)) if path.is_file() else ("text", None)
    from bertopt.flow.export import source_content_shape  # imports torch

    return source_content_shape(model)


@dataclass(frozen=True)
class EmulationChoice:
    """How the run emulates the OM: the Gelu kernel atc compiles, the precision mode (None: ATC's default)
    and the CANN version."""

    gelu: str
    precision: str | None
    cann: str


@dataclass(frozen=True)
class EvaluationInput:
    """What a task-level check of a run gets: the model as named, both graphs, its own output folder,
    the static shape, and the Ascend emulation to score beside them (None for --target ort)."""

    model: str
    original: Path
    optimized: Path
    output: Path
    batch: int
    seq: int
    emulation: EmulationChoice | None


class Evaluation(Protocol):
    """A task-level check run on a run's graphs, given by the caller (bertopt.squad's SQuAD check is one):
    the flow knows when to run it and where its result goes, not what it measures."""

    name: str  # its key in report.json and its folder in the run's output

    def __call__(self, run: EvaluationInput, progress: Progress) -> Any:
        """Its result, which has `to_dict()`."""


@dataclass
class AscendSetup:
    """The Ascend target of one run, decided before any work: CANN version, chip and atc options."""

    cann: CannTarget
    cann_source: str  # option | toolkit | default
    soc_source: str  # option | npu-smi | default
    options: AtcOptions

    def emulated_gelu(self) -> str:
        """The Gelu kernel atc compiles, as far as its flags tell; else the one --gelu-impl names."""
        return self.options.gelu_mode() or self.options.gelu_impl

    def warnings(self) -> list[str]:
        found = []
        soc = self.options.soc_version
        if not is_310p(soc):
            found.append(f"soc {soc} is not a 310P: ATC's attention big kernels fuse only on Atlas inference "
                         "products (310P; canndev's ZAttentionScoreFusionPass, msit's big-kernel README)")
        if self.options.gelu_mode() is None:
            found.append(f"your atc flags leave Gelu's kernel to ATC (an --op_precision_mode ini, or Gelu not in "
                         f"--optypelist_for_implmode): the emulation assumes --gelu-impl {self.options.gelu_impl}")
        return found


@dataclass
class AscendOutcome:
    """What ATC was predicted to do with the output and, where atc ran, what it says it did."""

    check: ConformanceReport  # legality for the CANN version, the form and the fusion prediction
    fusion: FusionResult | None = None  # read from the fusion_result.json of a real atc run
    fusion_problems: list[str] = field(default_factory=list)  # predicted fusions that did not take effect

    def warnings(self, require_fusion: bool) -> list[str]:
        if require_fusion or self.check.fusion_predicted:
            return []
        return [f"ATC is not predicted to fuse attention: {line}" for line in self.check.fusion.failures()]

    def failures(self, require_fusion: bool) -> list[str]:
        problems = [f"not legal for CANN {self.check.cann}: {line}"
                    for line in self.check.failure_summary(require_fusion=False)]
        if require_fusion and not self.check.fusion_predicted:
            problems += [f"--require-fusion: {line}" for line in self.check.fusion.failures()]
        return problems + self.fusion_problems


@dataclass
class RunReport:
    output_dir: Path
    original_model: Path
    optimized_model: Path
    model_description: str
    facts: ModelFacts
    passes: list[PassRecord]
    parity: Comparison | None  # the optimized ONNX on ORT CPU; None when it could not run
    atc: AtcResult | None = None  # None with --target ort
    ascend: AscendOutcome | None = None  # None with --target ort
    validation: list[CandidateReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    require_fusion: bool = False
    evaluations: dict[str, Any] = field(default_factory=dict)  # name -> the result of an Evaluation

    def to_dict(self) -> dict:
        return {
            "original_model": str(self.original_model),
            "optimized_model": str(self.optimized_model),
            "model_description": self.model_description,
            "facts": self.facts.to_dict(),
            "passes": [record.to_dict() for record in self.passes],
            "parity": self.parity.to_dict() if self.parity else None,
            "atc": self._atc_dict(),
            "check": self.ascend.check.to_dict() if self.ascend else None,
            "warnings": self.warnings,
            "validation": [candidate.to_dict() for candidate in self.validation],
            **{name: result.to_dict() for name, result in self.evaluations.items()},
        }

    def _atc_dict(self) -> dict | None:
        if self.atc is None:
            return None
        data = self.atc.to_dict()
        if self.ascend is not None and self.ascend.fusion is not None:
            data["fusion"] = self.ascend.fusion.to_dict()
            data["fusion_problems"] = self.ascend.fusion_problems
        return data

    def failures(self, strict_emulation: bool = False) -> list[str]:
        """What makes the run fail (exit 1): atc failing, an output not legal for the CANN version,
        fusions predicted but not taken by a real atc (or not predicted, with require_fusion), the
        optimized ONNX or a real OM failing validation; the emulation's verdict counts only when
        `strict_emulation`."""
        problems = [self.atc.summary_line()] if self.atc and self.atc.status == "failed" else []
        if self.ascend is not None:
            problems += self.ascend.failures(self.require_fusion)
        for candidate in self.validation:
            counts = not candidate.informational and (candidate.kind != "emulation" or strict_emulation)
            if candidate.passed is False and counts:
                problems.append(f"{candidate.name} failed validation"
                                + (f": {candidate.error}" if candidate.error else ""))
        return problems


def run(config: RunConfig, progress: Progress = lambda message: None,
        echo: Progress | None = None) -> RunReport:
    """Carry one model through the pipeline. Raises BertoptError on bad input before writing anything.

    `echo` receives atc's log line by line while it runs (default: `progress`).
    """
    out_dir = config.output_dir()
    _refuse_existing_results(out_dir, config.force)
    check_writable_folder(out_dir, "--output")
    created = not out_dir.exists()
    try:
        return _run(config, out_dir, progress, echo)
    except BertoptError as exc:
        if created and exc.exit_code == BertoptError.exit_code:  # a refusal leaves nothing; a failure its evidence
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run(config: RunConfig, out_dir: Path, progress: Progress, echo: Progress | None) -> RunReport:
    _check_target(config.target)
    pictures = _pass_pictures(config.report)
    ascend = _ascend_setup(config) if config.target == "ascend" else None
    parse_spec(config.passes, config.target)  # a bad --passes costs no export
    original, description = _obtain_onnx(config, out_dir, progress)
    manager = PassManager(config.passes, _pass_options(config, ascend),
                          _instruments(config, out_dir, original, pictures, progress))
    optimized = out_dir / OPTIMIZED_NAME
    graph, facts, records = optimize_file(original, optimized, manager, progress)
    outcome, output_names = None, [tensor.name for tensor in graph.outputs]
    if ascend is not None:
        ascend = replace(ascend, options=_with_input_shape(ascend.options, graph, config))
        progress(f"predicting what ATC (CANN {ascend.cann.version}) fuses")
        outcome = AscendOutcome(check_ascend(graph, cann=ascend.cann, soc=ascend.options.soc_version))
    del graph  # its weights: atc and validation read optimized.onnx, so keeping it only raises their peak
    gc.collect()  # a gs graph is a reference cycle: it goes only when the collector runs
    atc = None
    if ascend is not None:
        progress("atc: compiling the OM")
        atc = compile_om(out_dir, ascend.options, ascend.soc_source, ascend.cann_source, echo or progress)
        _read_what_atc_fused(atc, outcome)
    progress("validating the candidates against the original graph (ONNX Runtime fp32)")
    candidates = _candidates(config, optimized, output_names, atc, ascend)
    validation = validate_candidates(original, candidates, facts,
                                     batch=config.batch, seq=config.seq, samples=config.samples,
                                     **_onnx_tolerances(config, facts))
    warnings = (ascend.warnings() + outcome.warnings(config.require_fusion)) if ascend else []
    report = RunReport(out_dir, original.resolve(), optimized.resolve(), description, facts, records,
                       validation[0].comparison, atc, outcome, validation, warnings=warnings,
                       require_fusion=config.require_fusion)
    for evaluation in config.evaluations:
        report.evaluations[evaluation.name] = evaluation(
            EvaluationInput(config.model, original, optimized, out_dir / evaluation.name, config.batch, config.seq,
                            _emulated(ascend)), progress)
    write_json(out_dir / REPORT_NAME, report.to_dict())
    if pictures is not None:
        from bertopt.report.html import REPORT_HTML, write_html_report

        write_html_report(report, pictures.pictures, out_dir / REPORT_HTML)
    return report


def _onnx_tolerances(config: RunConfig, facts: ModelFacts) -> dict[str, dict[str, float]]:
    """The optimized ONNX's tolerances: the user's, else the ones its dtype calls for (other kinds keep theirs)."""
    atol, rtol = tolerances_for(facts.dtype)
    return {"atol": {"onnx": atol if config.atol is None else config.atol},
            "rtol": {"onnx": rtol if config.rtol is None else config.rtol}}


def _read_what_atc_fused(atc: AtcResult, outcome: AscendOutcome) -> None:
    """A real atc run's fusion_result.json, compared with the prediction (a prediction is not a result).

    Where fusion was predicted, a missing or unreadable file is a failure too: nothing confirms it.
    """
    if atc.status != "ran":
        return
    predicted = outcome.check.fusion_predicted
    if atc.fusion_result is None:
        if predicted:
            outcome.fusion_problems.append("atc wrote no fusion_result.json (--export_compile_stat=0?): "
                                           "nothing confirms the predicted fusions")
        return
    try:
        outcome.fusion = read_fusion_result(atc.fusion_result)
    except BertoptError as exc:
        if predicted:
            outcome.fusion_problems.append(f"cannot confirm the predicted fusions: {exc}")
        return
    if predicted:
        outcome.fusion_problems += compare_with_prediction(outcome.check.fusion, outcome.fusion)


def optimize_file(source: Path, output: Path, manager: PassManager,
                  progress: Progress = lambda message: None) -> tuple[gs.Graph, ModelFacts, list[PassRecord]]:
    """Load `source`, run the pipeline, save the result to `output`: `bertopt optimize`, and the heart of run.

    The model is read once and written once; passes edit one graph in place.
    """
    progress(f"loading {source}")
    graph = load_graph(source)
    facts = detect_facts(graph)
    batch, seq = manager.options.batch, manager.options.seq
    check_shape(facts, batch, seq)
    check_feedable(facts, input_specs_of(graph), batch=batch, seq=seq)  # what the output is checked on
    facts, records = manager.run(graph, facts)
    progress(f"saving {output}")
    save_graph(graph, output)
    return graph, facts, records


@dataclass
class Optimized:
    """What `bertopt optimize` did: the facts, each pass's record, why the output is not legal for the CANN
    version's ATC (empty when it is, or when the target is not ascend), and the output's parity with the
    input on ONNX Runtime (None when not asked for)."""

    facts: ModelFacts
    passes: list[PassRecord]
    illegal: list[str]
    parity: CandidateReport | None = None

    def failures(self) -> list[str]:
        """What makes `bertopt optimize` exit 1 (the output is still written)."""
        problems = [f"not legal for the CANN version's ATC: {line}" for line in self.illegal]
        if self.parity is not None and not self.parity.passed:
            problems.append(f"parity with the input fails: "
                            f"{self.parity.error or self.parity.comparison.summary_line()}")
        return problems


def optimize(source: Path, output: Path, spec: str, *, batch: int, seq: int, target: str = "ascend",
             cann: str | None = None, force: bool = False,
             progress: Progress = lambda message: None, image_size: int | None = None,
             frames: int | None = None, parity: bool = True) -> Optimized:
    """`bertopt optimize`: an ONNX file in, the optimized ONNX file out, and (with `parity`) the output
    checked against the input on one realistic batch on ONNX Runtime; no export, atc or emulation."""
    source, output = Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise BertoptError(f"--output {output} is the input model; bertopt never overwrites its input")
    if output.exists() and not force:
        raise BertoptError(f"--output {output} exists; pass --force to overwrite it")
    check_writable_folder(output.parent, "--output")
    _check_target(target)
    target_cann = resolve_cann(cann)[0] if target == "ascend" else None
    options = PassOptions(batch=batch, seq=seq, target=target, image_size=image_size, frames=frames,
                          **({"cann": target_cann} if target_cann else {}))
    instruments = Instruments(reproducer_dir=output.parent / f"{output.stem}.reproducer", progress=progress)
    graph, facts, records = optimize_file(source, output, PassManager(spec, options, instruments), progress)
    illegal = [] if target_cann is None else [
        f"{check.name}: {check.reason}" for check in check_model_level(graph, target_cann) if check.ok is False]
    del graph  # its weights: the parity check reads the files
    gc.collect()
    checked = _output_parity(source, output, facts, batch, seq, progress) if parity else None
    return Optimized(facts, records, illegal, checked)


def _output_parity(source: Path, output: Path, facts: ModelFacts, batch: int, seq: int,
                   progress: Progress) -> CandidateReport:
    """The optimized file against its input on one realistic batch (ORT CPU, the tolerance of the model's dtype)."""
    progress(f"checking {output} against {source} (ONNX Runtime)")
    atol, rtol = tolerances_for(facts.dtype)
    [report] = validate_candidates(source, run_candidates(output, cuda=False), facts, batch=batch, seq=seq,
                                   samples=1, atol={"onnx": atol}, rtol={"onnx": rtol})
    return report


def _emulated(ascend: AscendSetup | None) -> EmulationChoice | None:
    if ascend is None:
        return None
    return EmulationChoice(ascend.emulated_gelu(), ascend.options.precision()[1], ascend.cann.version)


def _pass_pictures(report: str) -> PassPictures | None:
    """The instrument that draws each pass's changes, only for the HTML report: JSON runs keep no diffs."""
    if report not in ("json", "html"):
        raise BertoptError(f"--report {report!r}: expected json or html")
    if report == "json":
        return None
    from bertopt.report.html import PassPictures  # imports the diff and Graphviz helpers: only when asked

    return PassPictures()


def _check_target(target: str) -> None:
    if target not in ("ascend", "ort"):
        raise BertoptError(f"--target {target!r}: expected ascend or ort")


def _ascend_setup(config: RunConfig) -> AscendSetup:
    """CANN version, chip and atc options, decided before any work so bad flags cost nothing."""
    cann, cann_source = resolve_cann(config.cann)
    soc, soc_source = detect_soc(config.soc)
    options = AtcOptions(model=in_work_dir(OPTIMIZED_NAME), output=in_work_dir(OM_PREFIX), soc_version=soc,
                         cann=cann, gelu_impl=config.gelu_impl, extra=tuple(config.atc_args))
    return AscendSetup(cann, cann_source, soc_source, options)


def _with_input_shape(options: AtcOptions, graph: gs.Graph, config: RunConfig) -> AtcOptions:
    """A graph that still has dynamic inputs (no freeze-shapes) needs atc's --input_shape."""
    if all(is_static(tensor) for tensor in graph.inputs):
        return options
    # image and audio inputs keep the static size of their other dims (their position embeddings fix it)
    shapes = {tensor.name: (config.batch, config.seq) if len(tensor.shape or ()) == 2
              else (config.batch, *tensor.shape[1:]) for tensor in graph.inputs}
    return replace(options, input_shape=shapes)


def _candidates(config: RunConfig, optimized: Path, output_names: list[str], atc: AtcResult | None,
                ascend: AscendSetup | None) -> list[Backend | Skipped]:
    if ascend is None:
        return run_candidates(optimized)
    return run_candidates(optimized, AscendCandidates(ascend.emulated_gelu(), ascend.options.precision()[1],
                                                      ascend.cann.version, atc.om if atc else None, config.device,
                                                      output_names))


def _pass_options(config: RunConfig, ascend: AscendSetup | None) -> PassOptions:
    sizes = dict(batch=config.batch, seq=config.seq, image_size=config.image_size, frames=config.frames)
    if ascend is None:
        return PassOptions(target=config.target, **sizes)
    return PassOptions(target=config.target, cann=ascend.cann, **sizes)


def _instruments(config: RunConfig, out_dir: Path, original: Path, pictures: PassPictures | None,
                 progress: Progress) -> Instruments:
    """The reproducer, --dump-dir, parity after every pass (--check-each-pass) and the HTML report's pictures."""
    probe = _parity_probe(original, config) if config.check_each_pass else None
    return Instruments(dump_dir=config.dump_dir, reproducer_dir=out_dir / "reproducer", parity_probe=probe,
                       progress=progress, extra=[pictures] if pictures is not None else ())


def _refuse_existing_results(out_dir: Path, force: bool) -> None:
    if force or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BertoptError(f"--output {out_dir}: exists and is not a folder")
    if (out_dir / REPORT_NAME).exists() or any(out_dir.glob("*.onnx")):
        raise BertoptError(f"--output {out_dir} already holds results; pass --force to overwrite them")


def _obtain_onnx(config: RunConfig, out_dir: Path, progress: Progress) -> tuple[Path, str]:
    return onnx_or_export(config.model, out_dir, progress=progress, exporter=config.exporter, opset=config.opset,
                          attention=config.attention, dtype=config.dtype, mask=config.mask)


def _parity_probe(original: Path, config: RunConfig):
    """Parity of the graph after a pass, handed to ONNX Runtime as a file: save_graph copies the
    weights no pass touched from the original instead of building the model in memory."""
    def probe(graph: gs.Graph, facts: ModelFacts) -> tuple[bool, float, str]:
        with tempfile.TemporaryDirectory(prefix="bertopt-probe-") as folder:
            candidate = save_graph(graph, Path(folder) / "candidate.onnx")
            comparison = parity_check(original, candidate, facts, batch=config.batch, seq=config.seq,
                                      samples=1, atol=config.atol, rtol=config.rtol)
        worst = max(o.max_abs for o in comparison.outputs)
        return comparison.passed, worst, comparison.summary_line()

    return probe
