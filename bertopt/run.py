"""`bertopt run`: model -> passes -> optimized ONNX -> parity against the original -> report.json.

Data moves forward only: each step takes the previous step's value and returns a new one. The CLI
layer (cli.py) only parses arguments, shows progress and prints what this module returns.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx_graphsurgeon as gs

from bertopt.errors import BertoptError
from bertopt.facts import ModelFacts, check_shape, detect_facts
from bertopt.graph import load_graph, save_graph, to_model
from bertopt.parity import Comparison, parity_check
from bertopt.pipeline import Instruments, PassManager, PassOptions, PassRecord

OPTIMIZED_NAME = "optimized.onnx"
REPORT_NAME = "report.json"

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
    atol: float = 1e-4
    rtol: float = 1e-4

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
    parity: Comparison
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "original_model": str(self.original_model),
            "optimized_model": str(self.optimized_model),
            "model_description": self.model_description,
            "facts": self.facts.to_dict(),
            "passes": [record.to_dict() for record in self.passes],
            "parity": self.parity.to_dict(),
            **self.extra,
        }


def run(config: RunConfig, progress: Progress = lambda message: None) -> RunReport:
    """Carry one model through the pipeline. Raises BertoptError on bad input before writing anything."""
    out_dir = config.output_dir()
    _refuse_existing_results(out_dir, config.force)
    if config.target not in ("ascend", "ort"):
        raise BertoptError(f"--target {config.target!r}: expected ascend or ort")
    manager = PassManager(config.passes, _pass_options(config), _instruments(config, out_dir))
    original, description = _obtain_onnx(config, out_dir, progress)
    progress(f"loading {original}")
    graph = load_graph(original)
    facts = detect_facts(graph)
    check_shape(facts, config.batch, config.seq)
    if config.check_each_pass:
        manager.instruments.parity_probe = _parity_probe(original, facts, config)
    facts, records = manager.run(graph, facts)
    optimized = out_dir / OPTIMIZED_NAME
    progress(f"saving {optimized}")
    save_graph(graph, optimized)
    progress("checking parity with the original graph on ONNX Runtime")
    comparison = parity_check(original, optimized, facts, batch=config.batch, seq=config.seq,
                              samples=config.samples, atol=config.atol, rtol=config.rtol)
    report = RunReport(out_dir, original.resolve(), optimized.resolve(), description, facts, records, comparison)
    write_json(out_dir / REPORT_NAME, report.to_dict())
    return report


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


def _parity_probe(original: Path, facts: ModelFacts, config: RunConfig):
    def probe(graph: gs.Graph, _facts: ModelFacts) -> tuple[bool, float, str]:
        comparison = parity_check(original, to_model(graph), facts, batch=config.batch, seq=config.seq,
                                  samples=1, atol=config.atol, rtol=config.rtol)
        worst = max(o.max_abs for o in comparison.outputs)
        return comparison.passed, worst, comparison.summary_line()

    return probe


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)
