"""What the command line does, as Python functions: `bertopt.optimize`, `run`, `check` and `validate`.

The `bertopt` commands are thin layers over these (they parse, call, print). Each imports what it needs
when called, so `import bertopt` stays light. Errors are bertopt's: BertoptError for bad input (the CLI's
exit 2) and CheckFailed for a failed check (exit 1); a check that merely finds problems returns them in
its report instead (`RunReport.failures()`, `ConformanceReport.failure_summary()`, `CandidateReport.passed`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bertopt.errors import BertoptError

if TYPE_CHECKING:
    from bertopt.ascend.check import ConformanceReport
    from bertopt.flow.run import Optimized, RunReport
    from bertopt.validation.candidates import CandidateReport

Progress = Callable[[str], None]
PathLike = str | os.PathLike


def optimize(model: PathLike, output: PathLike, passes: str = "default", *, batch: int = 1, seq: int = 384,
             target: str = "ascend", cann: str | None = None, force: bool = False,
             progress: Progress | None = None, image_size: int | None = None,
             frames: int | None = None, parity: bool = True) -> Optimized:
    """Load the ONNX file `model`, run the pipeline `passes` at a static (batch, seq), write `output`.

    Then, with `parity`, the output is checked against `model` on one realistic batch on ONNX Runtime
    (`.parity`); nothing else: no export, atc or emulation (`bertopt optimize`). `passes` is a spec as `--passes`
    takes it (`default`, `a,b,c`, `default,-name`, `default,my-pass`); passes from a file or module are
    registered first with `bertopt.load_passes`. `target` is ascend or ort; `cann` the CANN version whose
    ATC the ascend target is (default: the installed toolkit's, else 6.0). Image and audio models freeze at
    `image_size` / `frames` (default: the static size of the model's input). The input is never modified;
    an existing `output` is refused unless `force`. Returns the facts, one record per pass, why the
    output is not legal for the CANN version's ATC (`illegal`, empty when it is) and its parity;
    `failures()` lists what makes the command exit 1.
    """
    from bertopt.flow.run import optimize as optimize_file

    return optimize_file(Path(model), Path(output), passes, batch=batch, seq=seq, target=target, cann=cann,
                         force=force, progress=progress or _quiet, image_size=image_size, frames=frames,
                         parity=parity)


def run(model: PathLike = "bert-base", *, progress: Progress | None = None, echo: Progress | None = None,
        **options: Any) -> RunReport:
    """`bertopt run`: export (presets and HF folders), optimize, compile with atc where it exists, validate
    every candidate against the original, write report.json (and report.html with `report="html"`).

    `options` are the fields of `bertopt.flow.run.RunConfig`, named like the command's options: `passes`,
    `batch`, `seq`, `image_size`, `frames`, `output`, `target`, `force`, `exporter`, `opset`, `attention`, `dtype`, `mask`,
    `dump_dir`, `check_each_pass`, `samples`, `atol`, `rtol`, `soc`, `cann`, `gelu_impl`,
    `require_fusion`, `atc_args`, `device`, `evaluations` (e.g.
    `bertopt.squad.check.SquadEvaluation("dev-v1.1.json")`), `report`. `progress` receives a line per step,
    `echo` atc's log (default: `progress`). The report's `failures()` lists what makes the command exit 1.
    """
    from bertopt.flow.run import RunConfig
    from bertopt.flow.run import run as run_config

    config = RunConfig(model=str(model), **options)
    return run_config(config, progress or _quiet, echo=echo)


def check(model: PathLike, *, target: str = "ascend", cann: str | None = None,
          soc: str | None = None) -> ConformanceReport:
    """`bertopt check`: will ATC take this model (any ONNX file), and fuse every attention block?

    The form, fusion gates and legality for the CANN version (`cann`, default: the installed toolkit's,
    else 6.0) on the chip `soc` (default Ascend310P3), block by block. `report.failure_summary()` is
    empty when the command would exit 0; `render()` is its text.
    """
    from bertopt.ascend.cann import resolve_cann
    from bertopt.ascend.check import check_ascend

    if target != "ascend":
        raise BertoptError(f"--target {target!r}: only ascend has a conformance check")
    return check_ascend(model, cann=resolve_cann(cann)[0], soc=soc)


def validate(reference: PathLike, candidate: PathLike | None = None, *, inputs: PathLike | None = None,
             results: PathLike | None = None, batch: int | None = None, seq: int | None = None, samples: int = 2,
             atol: float | None = None, rtol: float | None = None, device: int = 0) -> CandidateReport:
    """`bertopt validate`: compare a candidate with the original graph (`reference`, run on ORT fp32).

    The candidate is a model (`.onnx` on ORT CPU, `.om` on an NPU through ais_bench) fed realistic
    batches (`batch` x `seq`, default: the models' static shape; `samples` of them), or an ais_bench
    results folder (`results`) with the inputs it was fed (`inputs`). Tolerances default to 1e-4 for
    ONNX and 1e-2 for an OM or results. `report.passed` is the verdict.
    """
    from bertopt.validation.candidates import validate_models, validate_results

    if (candidate is not None and (inputs or results)) or (candidate is None and not (inputs and results)):
        raise BertoptError("give either CANDIDATE or both --inputs and --results")
    if candidate is not None:
        return validate_models(Path(reference), Path(candidate), batch=batch, seq=seq, samples=samples,
                               atol=atol, rtol=rtol, device_id=device)
    return validate_results(Path(reference), Path(inputs), Path(results), atol=atol, rtol=rtol)


def _quiet(message: str) -> None:
    pass
