"""`bertopt run`: model -> passes -> optimized ONNX -> atc -> validation against the original -> report.json.

Data moves forward only: each step takes the previous step's value and returns a new one. The CLI
layer (cli.py) only parses arguments, shows progress and prints what this module returns.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import onnx_graphsurgeon as gs

from bertopt.backends import Backend, Skipped
from bertopt.backends.ascend import AtcOptions, AtcResult, compile_om, detect_soc, om_backend
from bertopt.backends.emulation import EmulationBackend
from bertopt.backends.ort import ort_backends
from bertopt.errors import BertoptError
from bertopt.facts import ModelFacts, check_shape, detect_facts
from bertopt.files import write_json
from bertopt.graph import is_static, load_graph, save_graph
from bertopt.parity import Comparison, parity_check
from bertopt.pipeline import Instruments, PassManager, PassOptions, PassRecord
from bertopt.validate import CandidateReport, validate_candidates

if TYPE_CHECKING:
    from bertopt.report_html import PassPictures
    from bertopt.squad.check import SquadCheck

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
    output: Path | None = None
    target: str = "ascend"
    force: bool = False
    exporter: str = "legacy"
    opset: int | None = None
    dump_dir: Path | None = None
    check_each_pass: bool = False
    samples: int = 2
    atol: float = 1e-4  # the optimized ONNX (fp32); other candidates use their kind's default
    rtol: float = 1e-4
    soc: str | None = None
    atc_args: tuple[str, ...] = ()
    device: int = 0
    evaluate: str | None = None  # "squad" (the hub) or "squad=PATH"
    report: str = "json"  # "html" also writes report.html (and draws each pass's changes while it runs)

    def output_dir(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        stem = Path(self.model).stem if self.model.endswith(".onnx") else Path(self.model).name
        return Path("bertopt-out") / f"{stem}-bs{self.batch}-seq{self.seq}"


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
    validation: list[CandidateReport] = field(default_factory=list)
    squad: SquadCheck | None = None  # with --eval squad

    def to_dict(self) -> dict:
        return {
            "original_model": str(self.original_model),
            "optimized_model": str(self.optimized_model),
            "model_description": self.model_description,
            "facts": self.facts.to_dict(),
            "passes": [record.to_dict() for record in self.passes],
            "parity": self.parity.to_dict() if self.parity else None,
            "atc": self.atc.to_dict() if self.atc else None,
            "validation": [candidate.to_dict() for candidate in self.validation],
            "squad": self.squad.to_dict() if self.squad else None,
        }

    def failures(self, strict_emulation: bool = False) -> list[str]:
        """What makes the run fail (exit 1): atc failing, the optimized ONNX or a real OM failing
        validation; the emulation's verdict counts only when `strict_emulation`."""
        problems = [self.atc.summary_line()] if self.atc and self.atc.status == "failed" else []
        for candidate in self.validation:
            if candidate.passed is False and (candidate.kind != "emulation" or strict_emulation):
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
    _check_target(config.target)
    pictures = _pass_pictures(config.report)
    squad_data = _squad_data(config.evaluate) if config.evaluate else None
    atc_options, soc_source = _atc_options(config) if config.target == "ascend" else (None, None)
    manager = PassManager(config.passes, _pass_options(config), _instruments(config, out_dir))
    if pictures is not None:
        manager.instruments.on_pass_changed = pictures
    original, description = _obtain_onnx(config, out_dir, progress)
    if config.check_each_pass:
        manager.instruments.parity_probe = _parity_probe(original, config)
    optimized = out_dir / OPTIMIZED_NAME
    graph, facts, records = optimize_file(original, optimized, manager, progress)
    atc_options = _with_input_shape(atc_options, graph, config) if atc_options else None
    del graph  # its weights: atc and validation read optimized.onnx, so keeping it only raises their peak
    gc.collect()  # a gs graph is a reference cycle: it goes only when the collector runs
    atc = None
    if atc_options is not None:
        progress("atc: compiling the OM")
        atc = compile_om(out_dir, atc_options, soc_source, echo or progress)
    progress("validating the candidates against the original graph (ONNX Runtime fp32)")
    validation = validate_candidates(original, _candidates(config, optimized, atc), facts,
                                     batch=config.batch, seq=config.seq, samples=config.samples,
                                     atol={"onnx": config.atol}, rtol={"onnx": config.rtol})
    report = RunReport(out_dir, original.resolve(), optimized.resolve(), description, facts, records,
                       validation[0].comparison, atc, validation)
    if squad_data is not None:
        report.squad = _squad_check(config, squad_data, original, optimized, out_dir, progress)
    write_json(out_dir / REPORT_NAME, report.to_dict())
    if pictures is not None:
        from bertopt.report_html import REPORT_HTML, write_html_report

        write_html_report(report, pictures.pictures, out_dir / REPORT_HTML)
    return report


def optimize_file(source: Path, output: Path, manager: PassManager,
                  progress: Progress = lambda message: None) -> tuple[gs.Graph, ModelFacts, list[PassRecord]]:
    """Load `source`, run the pipeline, save the result to `output`: `bertopt optimize`, and the heart of run.

    The model is read once and written once; passes edit one graph in place.
    """
    progress(f"loading {source}")
    graph = load_graph(source)
    facts = detect_facts(graph)
    check_shape(facts, manager.options.batch, manager.options.seq)
    facts, records = manager.run(graph, facts)
    progress(f"saving {output}")
    save_graph(graph, output)
    return graph, facts, records


def optimize(source: Path, output: Path, spec: str, *, batch: int, seq: int, target: str = "ascend",
             force: bool = False, progress: Progress = lambda message: None) -> tuple[ModelFacts, list[PassRecord]]:
    """`bertopt optimize`: an ONNX file in, the optimized ONNX file out; no export, atc or validation."""
    source, output = Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise BertoptError(f"--output {output} is the input model; bertopt never overwrites its input")
    if output.exists() and not force:
        raise BertoptError(f"--output {output} exists; pass --force to overwrite it")
    _check_target(target)
    options = PassOptions(batch=batch, seq=seq, target=target)
    instruments = Instruments(reproducer_dir=output.parent / f"{output.stem}.reproducer")
    _, facts, records = optimize_file(source, output, PassManager(spec, options, instruments), progress)
    return facts, records


def _squad_data(evaluate: str) -> str:
    """`squad` -> the hub's data set; `squad=PATH` -> a local file or `datasets` folder."""
    name, _, data = evaluate.partition("=")
    if name != "squad":
        raise BertoptError(f"--eval {evaluate!r}: expected squad or squad=PATH")
    return data or "squad"


def _squad_check(config: RunConfig, data: str, original: Path, optimized: Path, out_dir: Path,
                 progress: Progress):
    from bertopt.squad.check import check_run  # imports the tokenizers: only when asked

    return check_run(config.model, original, optimized, data, out_dir / "squad", seq=config.seq,
                     batch=config.batch, emulation=config.target == "ascend", progress=progress)


def _pass_pictures(report: str) -> PassPictures | None:
    """The instrument that draws each pass's changes, only for the HTML report: JSON runs keep no diffs."""
    if report not in ("json", "html"):
        raise BertoptError(f"--report {report!r}: expected json or html")
    if report == "json":
        return None
    from bertopt.report_html import PassPictures  # imports the diff and Graphviz helpers: only when asked

    return PassPictures()


def _check_target(target: str) -> None:
    if target not in ("ascend", "ort"):
        raise BertoptError(f"--target {target!r}: expected ascend or ort")


def _atc_options(config: RunConfig) -> tuple[AtcOptions, str]:
    """(options, where the soc came from); built before any work so a bad --atc-arg costs nothing."""
    soc, source = detect_soc(config.soc)
    return AtcOptions(model=OPTIMIZED_NAME, output=OM_PREFIX, soc_version=soc, extra=tuple(config.atc_args)), source


def _with_input_shape(options: AtcOptions, graph: gs.Graph, config: RunConfig) -> AtcOptions:
    """A graph that still has dynamic inputs (no freeze-shapes) needs atc's --input_shape."""
    if all(is_static(tensor) for tensor in graph.inputs):
        return options
    shapes = {tensor.name: (config.batch, config.seq) for tensor in graph.inputs}
    return replace(options, input_shape=shapes)


def _candidates(config: RunConfig, optimized: Path, atc: AtcResult | None) -> list[Backend | Skipped]:
    """The optimized ONNX in fp32 first (its verdict is the run's parity), then the Ascend candidates."""
    found: list[Backend | Skipped] = list(ort_backends(optimized, "optimized ONNX fp32"))
    if config.target == "ascend":
        found.append(EmulationBackend(optimized))
        found.append(om_backend(atc.om if atc else None, config.device))
    return found


def _pass_options(config: RunConfig) -> PassOptions:
    return PassOptions(batch=config.batch, seq=config.seq, target=config.target)


def _instruments(config: RunConfig, out_dir: Path) -> Instruments:
    return Instruments(dump_dir=config.dump_dir, reproducer_dir=out_dir / "reproducer")


def _refuse_existing_results(out_dir: Path, force: bool) -> None:
    if force or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BertoptError(f"--output {out_dir}: exists and is not a folder")
    if (out_dir / REPORT_NAME).exists() or any(out_dir.glob("*.onnx")):
        raise BertoptError(f"--output {out_dir} already holds results; pass --force to overwrite them")


def _obtain_onnx(config: RunConfig, out_dir: Path, progress: Progress) -> tuple[Path, str]:
    """An .onnx model is used where it is (never modified); presets and HF folders are exported."""
    from bertopt.export import export_onnx, resolve_source  # imports torch: only when exporting

    if config.model.endswith(".onnx") or Path(config.model).is_file():
        return Path(config.model), f"ONNX file {config.model}"
    source = resolve_source(config.model)
    progress(f"exporting {config.model} ({config.exporter})")
    result = export_onnx(source, out_dir / "original.onnx", exporter=config.exporter, opset=config.opset)
    return result.path, result.description


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
