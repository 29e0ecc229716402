"""The `bertopt` command line: parse, call the library, print. Nothing else lives here.

Exit codes: 0 success, 1 a check failed (e.g. parity), 2 bad input or usage. Errors the user can act
on are one line on stderr, never a traceback.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from bertopt.errors import BertoptError, CheckFailed

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Graph-surgery compiler frontend for BERT-family ONNX models.")
# Piped output (logs, CI) is not squeezed into 80 columns: tables stay readable there too.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True, highlight=False)
DTYPE_HELP = "fp32 | fp16 (exports model.half(); ATC compiles fp32 models to fp16 itself)"
MASK_HELP = "how the exported model takes its attention mask: int (1/0, tokenizers') | float | additive | none"
CANN_HELP = "CANN version whose ATC is the target, e.g. 6.0 or 8.0.RC2 (default: the installed toolkit's, else 6.0)"
IMAGE_SIZE_HELP = "image models: square image size (default: the model's static size)"
FRAMES_HELP = "audio models: input frames (default: the model's static count)"
PASSES_FROM_HELP = "a Python file or importable module whose passes to register first (repeatable)"


def _passes_from_option(more_help: str = "") -> Any:
    return typer.Option([], "--passes-from", metavar="FILE_OR_MODULE", help=PASSES_FROM_HELP + more_help)


def _load_passes(sources: list[str]) -> None:
    if sources:
        from bertopt.pipeline import load_passes

        load_passes(*sources)


@contextmanager
def _progress() -> Iterator:
    """A spinner on stderr whose text each long step replaces."""
    with err.status("starting") as status:
        yield lambda message: status.update(message)


@app.command()
def run(
    model: str = typer.Argument("bert-base", help="preset name, HF checkpoint folder, or .onnx file"),
    passes: str = typer.Option("default", "--passes", help="pipeline: default | a,b,c | default,-name"),
    passes_from: list[str] = _passes_from_option(),
    batch: int = typer.Option(1, "--batch", help="static batch size"),
    seq: int = typer.Option(384, "--seq", help="static sequence length"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=IMAGE_SIZE_HELP),
    frames: Optional[int] = typer.Option(None, "--frames", help=FRAMES_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help="folder (default bertopt-out/<model>-bs<B>-seq<S>; "
                                          "image models -<N>px, audio models -<N>frames)"),
    target: str = typer.Option("ascend", "--target", help="ascend | ort"),
    force: bool = typer.Option(False, "--force", help="overwrite results already in the output folder"),
    exporter: str = typer.Option("legacy", "--exporter", help="legacy | dynamo (presets and HF folders)"),
    opset: Optional[int] = typer.Option(None, "--opset", help="export opset (default 14 legacy, 18 dynamo)"),
    attention: str = typer.Option("eager", "--attention", help="eager | sdpa (presets and HF folders)"),
    dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    mask: str = typer.Option("int", "--mask", help=MASK_HELP),
    dump_dir: Optional[Path] = typer.Option(None, "--dump-dir", help="write the graph before/after each pass that changed it"),
    check_each_pass: bool = typer.Option(False, "--check-each-pass", help="parity after every pass; names the first that breaks numerics"),
    soc: Optional[str] = typer.Option(None, "--soc", help="atc --soc_version (default: from `npu-smi info`, else Ascend310P3)"),
    cann: Optional[str] = typer.Option(None, "--cann", help=CANN_HELP),
    gelu_impl: str = typer.Option("high_performance", "--gelu-impl",
                                  help="Gelu kernel atc compiles: high_performance (the seed's) | high_precision"),
    require_fusion: bool = typer.Option(False, "--require-fusion", help="attention ATC will not fuse fails the run (exit 1)"),
    atc_arg: list[str] = typer.Option([], "--atc-arg", help="any atc flag, repeatable; the user's value wins over "
                                      "bertopt's (e.g. --atc-arg=--precision_mode=allow_mix_precision)"),
    device: int = typer.Option(0, "--device", help="NPU device id for the OM (ais_bench)"),
    strict_emulation: bool = typer.Option(False, "--strict-emulation", help="a failing Ascend fp16 emulation also exits 1"),
    evaluate: Optional[str] = typer.Option(None, "--eval", help="squad=PATH (dev-v1.1.json) or squad (the hub): "
                                           "SQuAD EM/F1 of the original, optimized and emulated graphs"),
    report_format: str = typer.Option("json", "--report", help="json | html (also writes a self-contained "
                                      "report.html with a picture of each pass's changes)"),
) -> None:
    """Export (if needed), run the passes, save, compile with atc, validate against the original.

    Candidates: the optimized ONNX (ORT fp32, tol 1e-4), the Ascend fp16 EMULATION (ORT CPU, tol 1e-2)
    and the OM on an NPU where ais_bench and a device exist. Exit 1 when atc fails, the optimized ONNX
    or a real OM fails validation; the emulation's verdict is reported only, unless --strict-emulation.
    With --target ort there is no atc step and no Ascend candidate.
    """
    from bertopt.api import run as run_model

    _load_passes(passes_from)
    with _progress() as progress:
        report = run_model(model, progress=progress, echo=lambda line: err.print(f"atc| {line}", markup=False),
                           passes=passes, batch=batch, seq=seq, image_size=image_size, frames=frames,
                           output=output, target=target, force=force,
                           exporter=exporter, opset=opset, attention=attention, dtype=dtype, mask=mask,
                           dump_dir=dump_dir, check_each_pass=check_each_pass, soc=soc, cann=cann,
                           gelu_impl=gelu_impl, require_fusion=require_fusion, atc_args=tuple(atc_arg),
                           device=device, evaluations=_evaluations(evaluate), report=report_format)
    out.print(f"[bold]{report.model_description}[/bold]")
    out.print(_facts_line(report.facts))
    out.print(_pass_table(report.passes))
    out.print(_atc_lines(report))
    shape = f"bs{batch} seq{seq}" if report.facts.modality == "text" else f"bs{batch}, {report.facts.seq} tokens"
    out.print(_validation_table(report.validation, f"validation vs original (ONNX Runtime fp32, {shape})"))
    _print_candidate_notes(report.validation)
    if "squad" in report.evaluations:
        out.print(_squad_table(report.evaluations["squad"], batch, seq))
    out.print(f"optimized model: {report.optimized_model}")
    out.print(f"report: {report.output_dir / 'report.json'}")
    if report_format == "html":
        out.print(f"html report: {report.output_dir / 'report.html'}")
    for warning in report.warnings:
        out.print(f"warning: {warning}", markup=False, soft_wrap=True)
    problems = report.failures(strict_emulation)
    if problems:
        raise CheckFailed("; ".join(problems))


def _evaluations(evaluate: str | None) -> tuple:
    """--eval squad[=PATH] as the run's evaluation; the SQuAD code loads only when asked."""
    if evaluate is None:
        return ()
    from bertopt.squad.check import evaluation_from_option

    return (evaluation_from_option(evaluate),)


def _atc_lines(report) -> str:
    atc = report.atc
    if atc is None:
        return "atc: skipped (--target ort compiles nothing)"
    lines = [f"atc command (soc {atc.soc} from {atc.soc_source}, CANN {atc.cann['version']} from "
             f"{atc.cann['source']}), written to {atc.script}:", f"  {shlex.join(atc.argv)}"]
    lines += [f"  your {flag}={values['user']} replaces bertopt's {values['bertopt']}"
              for flag, values in atc.overrides.items()]
    check = report.ascend.check
    fused = sum(block.fuses for block in check.fusion.blocks)
    lines.append(f"ATC fusion predicted for {fused} of {len(check.fusion.blocks)} attention blocks "
                 f"({'legal' if check.model_conforming else 'NOT legal'} for CANN {check.cann})")
    lines.append(atc.summary_line())
    if report.ascend.fusion is not None:
        taken = ", ".join(f"{name} x{report.ascend.fusion.effect_times(name)}"
                          for name in check.fusion.attention_passes)
        lines.append(f"fusion_result.json: {taken}")
    return "\n".join(lines)


def _validation_table(candidates, title: str) -> Table:
    """One row per compared output; skipped or crashed candidates are listed by _print_candidate_notes."""
    table = Table(title=title)
    for column in ("candidate", "output", "abs max", "abs p99", "rel max", "rel p99", "atol/rtol", "verdict",
                   "same span"):
        table.add_column(column, justify="right" if column[:3] in ("abs", "rel") else "left")
    for candidate in candidates:
        if candidate.comparison is None:
            continue
        span = candidate.comparison.span_agreement
        for index, stats in enumerate(candidate.comparison.outputs):
            first = index == 0
            table.add_row(f"{candidate.name} [{candidate.kind}]" if first else "", stats.name,
                          f"{stats.max_abs:.2g}", f"{stats.p99_abs:.2g}", f"{stats.max_rel:.2g}",
                          f"{stats.p99_rel:.2g}", f"{stats.atol:g}/{stats.rtol:g}",
                          "pass" if stats.passed else f"FAIL{': ' + stats.reason if stats.reason else ''}",
                          f"{span:.1%}" if first and span is not None else "")
    return table


def _print_candidate_notes(candidates) -> None:
    for candidate in candidates:
        if candidate.skipped:
            out.print(f"{candidate.name}: skipped: {candidate.skipped}", markup=False)
        if candidate.error:
            out.print(f"{candidate.name}: FAILED to run: {candidate.error}", markup=False)
        for note in candidate.notes:
            out.print(f"note ({candidate.name}): {note}", markup=False)


def _facts_line(facts) -> str:
    roles = ", ".join(f"{name}={role}" for name, role in facts.roles.items())
    reads = f"vocab {facts.vocab_size}" if facts.modality == "text" else (
        f"{facts.modality} {'x'.join(map(str, facts.image_size)) if facts.image_size else facts.frames}, "
        f"{facts.seq} tokens")
    return (f"{facts.family}: {facts.num_layers} layers, hidden {facts.hidden}, {facts.heads} heads x "
            f"{facts.head_dim}, {reads}, {facts.norm_position}-{facts.norm}, {facts.attention_kind} attention, "
            f"opset {facts.opset}, IR {facts.ir_version}; inputs {roles}")


def _pass_table(records) -> Table:
    table = Table(title="passes")
    for column in ("pass", "changed", "seconds", "verify s", "changes"):
        table.add_column(column, justify="right" if column in ("seconds", "verify s") else "left")
    for record in records:
        table.add_row(record.name, "yes" if record.changed else "no", f"{record.seconds:.2f}",
                      f"{record.verify_seconds:.2f}", _changes(record))
    return table


def _changes(record, shown: int = 4) -> str:
    """The first few counts (report.json has them all), then the pass's notes."""
    counts = [f"{k}={v}" for k, v in record.counts.items() if v]
    text = ", ".join(counts[:shown]) + (f", +{len(counts) - shown} more" if len(counts) > shown else "")
    return "\n".join([text or "no change", *record.notes])


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="the ONNX model to optimize (never modified)"),
    output: Path = typer.Option(..., "--output", help="the optimized .onnx to write"),
    passes: str = typer.Option("default", "--passes", help="pipeline: default | a,b,c | default,-name"),
    passes_from: list[str] = _passes_from_option(),
    batch: int = typer.Option(1, "--batch", help="static batch size"),
    seq: int = typer.Option(384, "--seq", help="static sequence length"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=IMAGE_SIZE_HELP),
    frames: Optional[int] = typer.Option(None, "--frames", help=FRAMES_HELP),
    target: str = typer.Option("ascend", "--target", help="ascend | ort"),
    cann: Optional[str] = typer.Option(None, "--cann", help=CANN_HELP),
    force: bool = typer.Option(False, "--force", help="overwrite --output if it exists"),
    parity: bool = typer.Option(True, "--parity/--no-parity", help="check the output against the input on one "
                                "realistic batch (ONNX Runtime)"),
) -> None:
    """Load, run the passes, save, check parity on one batch: no export, atc or emulation. Replaces fix_onnx.py.

    Exit 1 (the output is still written) when it is not legal for the CANN version's ATC or fails parity.
    """
    from bertopt.api import optimize as optimize_model

    _load_passes(passes_from)
    with _progress() as progress:
        result = optimize_model(model, output, passes, batch=batch, seq=seq, target=target, cann=cann,
                                force=force, progress=progress, image_size=image_size, frames=frames,
                                parity=parity)
    out.print(_facts_line(result.facts))
    out.print(_pass_table(result.passes))
    if result.parity is not None:
        out.print(_validation_table([result.parity], f"parity with {model} (ONNX Runtime fp32, bs{batch} seq{seq})"))
    out.print(f"optimized model: {output}")
    problems = result.failures()
    if problems:
        raise CheckFailed(f"{output}: {'; '.join(problems)}")


@app.command()
def check(
    model: Path = typer.Argument(..., help="any ONNX file (bertopt's output or not)"),
    target: str = typer.Option("ascend", "--target", help="ascend (the only target with a required form)"),
    cann: Optional[str] = typer.Option(None, "--cann", help=CANN_HELP),
    soc: Optional[str] = typer.Option(None, "--soc", help="the chip whose kernels are judged (default Ascend310P3)"),
    legal_only: bool = typer.Option(False, "--legal-only", help="exit 0 when legal for the CANN version, "
                                    "whatever ATC will fuse"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Will ATC take this model, and fuse every attention block? Form, fusion gates and legality, block by block.

    Exit 0 only when the model is legal for the CANN version (opset, IR, operator list and opsets,
    Shape ops, fp16 range) and every attention block is predicted to fuse in each of ATC's passes;
    1 otherwise, naming each failed gate; 2 on bad input.
    """
    import json

    from bertopt.api import check as check_model

    report = check_model(model, target=target, cann=cann, soc=soc)
    out.print(json.dumps(report.to_dict(), indent=2) if as_json else report.render(), markup=False, soft_wrap=True)
    problems = report.failure_summary(require_fusion=not legal_only)
    if problems:
        raise CheckFailed(f"{model}: {'; '.join(problems)}")


@app.command()
def diff(
    old: Path = typer.Argument(..., help="the graph before (.onnx)"),
    new: Path = typer.Argument(..., help="the graph after (.onnx)"),
    svg: Optional[Path] = typer.Option(None, "--svg", help="draw one representative layer's changes (SVG)"),
    png: Optional[Path] = typer.Option(None, "--png", help="the same picture as PNG"),
    context: int = typer.Option(1, "--context", help="hops of unchanged neighbours drawn around the changes"),
    whole: bool = typer.Option(False, "--whole", help="draw the pictured layer whole, not only its changes"),
) -> None:
    """Structural, name-insensitive diff of two ONNX graphs: signature, op histogram, changes by region."""
    from bertopt.report.diff import diff_graphs
    from bertopt.report.render import render_diff

    with _progress() as progress:
        progress(f"diffing {old.name} and {new.name}")
        result = diff_graphs(old, new)
    out.print(result.text(), end="", markup=False, soft_wrap=True)
    for fmt, path in (("svg", svg), ("png", png)):
        if path is not None:
            out.print(render_diff(result, path, fmt, context, whole).note, markup=False, soft_wrap=True)


@app.command()
def sweep(
    sizes: str = typer.Option("base,large", "--sizes", help="comma list: base | large | any preset | HF folder"),
    seq: str = typer.Option("64,128,256,320,384,512", "--seq", help="comma list of sequence lengths"),
    batch: str = typer.Option("1,4,8,16,32,64", "--batch", help="comma list of batch sizes"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=IMAGE_SIZE_HELP),
    frames: Optional[int] = typer.Option(None, "--frames", help=FRAMES_HELP),
    output: Path = typer.Option(Path("bertopt-sweep"), "--output", help="the sweep folder (resumed if it holds one)"),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="most shapes at once (default: CPU count)"),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget",
                                                  help="GiB the running shapes may take (default: half of MemAvailable)"),
    passes: str = typer.Option("default", "--passes", help="pipeline: default | a,b,c | default,-name"),
    passes_from: list[str] = _passes_from_option("; every worker and Ray node loads it too"),
    samples: int = typer.Option(2, "--samples", help="realistic samples per parity check"),
    soc: Optional[str] = typer.Option(None, "--soc", help="atc --soc_version (default: from `npu-smi info`, else Ascend310P3)"),
    cann: Optional[str] = typer.Option(None, "--cann", help=CANN_HELP),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                      help="run on Ray: alone, a new local Ray; auto; ray://HOST:PORT; HOST:PORT"),
    cpus_per_shape: Optional[int] = typer.Option(None, "--cpus-per-shape",
                                                 help="ONNX Runtime threads of each shape's validation, and the CPUs "
                                                      "a Ray task asks for (default: every core; 1 with --ray)"),
) -> None:
    """Export once per size, then optimize, write atc.sh, validate and check every shape in parallel.

    Shapes already done (their result.json exists) are skipped, so re-running an interrupted sweep
    finishes only what was missing. Exit 1 when any shape fails parity or conformance.
    """
    from bertopt.flow.sweep import SweepConfig, render_table
    from bertopt.flow.sweep import sweep as run_sweep

    config = SweepConfig(sizes=tuple(_names("--sizes", sizes)), seqs=tuple(_ints("--seq", seq)),
                         batches=tuple(_ints("--batch", batch)), output=output, jobs=jobs,
                         memory_budget_gib=memory_budget, passes=passes, passes_from=tuple(passes_from),
                         samples=samples, soc=soc, cann=cann, threads=cpus_per_shape, image_size=image_size,
                         frames=frames)
    result = run_sweep(config, _progress_line) if ray is None else _sweep_on_ray(config, ray)
    out.print(render_table(result.rows), markup=False)
    out.print(f"summary: {output / 'summary.md'}, {output / 'summary.json'}")
    failed = [f"{r['size']} seq{r['seq']} bs{r['batch']}" for r in result.rows if r["status"] != "passed"]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(result.rows)} shape(s) failed: {', '.join(failed)}")


def _progress_line(message: str) -> None:
    # Not rich: a Ctrl-C inside its print leaves the line in its buffer, printed again with "interrupted".
    sys.stderr.write(f"{message}\n")


def _sweep_on_ray(config, address: str):
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise BertoptError("--ray needs Ray: pip install 'bertopt[ray]' (on every node of the cluster)")
    from bertopt.flow.sweep_ray import parse_address, sweep_on_ray

    return sweep_on_ray(config, parse_address(address), _progress_line)


def with_bare_ray_flag(args: list[str]) -> list[str]:
    """`--ray` with no address (last, or before another option) as `--ray=local`.

    typer has no option whose value may be left out (its flag_value is deprecated), so main() fills
    it in before parsing.
    """
    return [("--ray=local" if arg == "--ray" and (index + 1 == len(args) or args[index + 1].startswith("-"))
             else arg) for index, arg in enumerate(args)]


def _names(option: str, text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise BertoptError(f"{option} {text!r}: expected a comma-separated list")
    return names


def _ints(option: str, text: str) -> list[int]:
    try:
        return [int(part) for part in _names(option, text)]
    except ValueError:
        raise BertoptError(f"{option} {text!r}: expected comma-separated integers (e.g. 64,128)") from None


@app.command("passes")
def list_passes(passes_from: list[str] = _passes_from_option()) -> None:
    """List the registered passes, where each came from, and the named pipelines.

    Passes come from bertopt (built-in), from installed packages' `bertopt.passes` entry points, and
    from --passes-from files and modules.
    """
    from bertopt.pipeline import PIPELINES, registered_passes

    _load_passes(passes_from)
    table = Table(title="passes")
    for column in ("name", "summary", "requires", "ensures"):
        table.add_column(column)
    table.add_column("from", overflow="fold")  # a plugin file's whole path, never cut short
    for info in registered_passes().values():
        table.add_row(info.name, info.summary, ", ".join(info.requires), ", ".join(info.ensures), info.origin)
    out.print(table)
    for name, names in PIPELINES.items():
        out.print(f"pipeline {name} (`default` with --target {name}): {', '.join(names)}")


@app.command()
def export(
    model: str = typer.Argument(..., help="preset name or HF checkpoint folder"),
    output: Path = typer.Option(..., "--output", help="the .onnx file to write"),
    exporter: str = typer.Option("legacy", "--exporter", help="legacy (TorchScript) | dynamo"),
    opset: Optional[int] = typer.Option(None, "--opset", help="default 14 (legacy) or 18 (dynamo)"),
    attention: str = typer.Option("eager", "--attention", help="eager | sdpa"),
    dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    mask: str = typer.Option("int", "--mask", help=MASK_HELP),
) -> None:
    """Export a preset or HF checkpoint folder to ONNX with dynamic batch/seq axes (cached by content)."""
    from bertopt.flow.export import export_onnx, resolve_source

    source = resolve_source(model)
    with _progress() as progress:
        progress(f"exporting {model} ({exporter})")
        result = export_onnx(source, output, exporter=exporter, opset=opset, attention=attention, dtype=dtype,
                             mask=mask)
    origin = "from cache" if result.cached else f"in {result.seconds:.1f} s"
    out.print(f"{result.description}\nwrote {result.path} ({origin})")


@app.command()
def validate(
    reference: Path = typer.Argument(..., help="the original ONNX model (the reference, run on ORT fp32)"),
    candidate: Optional[Path] = typer.Argument(None, help=".onnx (ORT CPU) or .om (NPU through ais_bench)"),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="ais_bench input folders: DIR/<input name>/<idx>.npy"),
    results: Optional[Path] = typer.Option(None, "--results", help="ais_bench --outfmt NPY folder: <idx>_<output>.npy"),
    batch: Optional[int] = typer.Option(None, "--batch", help="batch of the realistic feeds (default: the models' static one)"),
    seq: Optional[int] = typer.Option(None, "--seq", help="sequence length (default: the models' static one)"),
    samples: int = typer.Option(2, "--samples", help="number of realistic batches"),
    atol: Optional[float] = typer.Option(None, "--atol", help="default 1e-4 for ONNX, 1e-2 for an OM or results"),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="default 1e-4 for ONNX, 1e-2 for an OM or results"),
    device: int = typer.Option(0, "--device", help="NPU device id for an .om candidate"),
) -> None:
    """Compare a candidate model, or an ais_bench results folder, with the original graph.

    Exit 0 when every output passes, 1 when any fails, 2 on bad input.
    """
    from bertopt.api import validate as validate_candidate

    with _progress() as progress:
        progress("running the reference and the candidate")
        report = validate_candidate(reference, candidate, inputs=inputs, results=results, batch=batch, seq=seq,
                                    samples=samples, atol=atol, rtol=rtol, device=device)
    out.print(_validation_table([report], f"validation vs {reference} (ONNX Runtime fp32)"))
    _print_candidate_notes([report])
    if report.comparison is not None:
        out.print(report.comparison.summary_line(), markup=False)
    if not report.passed:
        raise CheckFailed(f"{report.name} differs from the reference beyond tolerance"
                          + (f": {report.error}" if report.error else ""))


@app.command()
def inputs(
    model: Path = typer.Argument(..., help="the ONNX model whose inputs to write"),
    output: Path = typer.Option(..., "--output", help="new folder: <input name>/<idx>.npy, [1, seq] each"),
    batch: int = typer.Option(1, "--batch", help="rows are drawn in batches of this size"),
    seq: int = typer.Option(384, "--seq", help="sequence length"),
    count: int = typer.Option(8, "--count", help="number of samples"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
) -> None:
    """Write realistic inputs in ais_bench's layout (feed them with --input DIR/a,DIR/b,DIR/c)."""
    from bertopt.validation.candidates import reference_facts, write_inputs
    from bertopt.validation.parity import graph_only, input_specs_of

    folders = write_inputs(reference_facts(model), input_specs_of(graph_only(model)), output, batch=batch,
                           seq=seq, count=count, seed=seed)
    out.print(f"wrote {count} samples to {output}")
    out.print(f"ais_bench --input {','.join(str(f) for f in folders)}", markup=False)


squad_app = typer.Typer(no_args_is_help=True, help="SQuAD v1.1 accuracy: pre-process, score results, check graphs.")
app.add_typer(squad_app, name="squad")


@squad_app.command("prep")
def squad_prep(
    model: str = typer.Argument(..., help="the .onnx model to feed, a preset, or an HF checkpoint folder"),
    data: str = typer.Option(..., "--data", help="dev-v1.1.json, a saved `datasets` folder, or `squad` (the hub)"),
    seq: int = typer.Option(..., "--seq", help="sequence length of the features"),
    doc_stride: Optional[int] = typer.Option(None, "--doc-stride", help="window overlap (default: the seed's, e.g. 128 at seq 384)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the model's)"),
    output: Path = typer.Option(..., "--output", help="new folder: <input name>/<idx>.npy and features.json"),
) -> None:
    """Tokenise SQuAD into features in ais_bench's input layout (HF run_qa validation features)."""
    import tempfile

    from bertopt.files import refuse_used_folder
    from bertopt.squad.data import load_examples
    from bertopt.squad.model import load_tokenizer, obtain_model, tokenizer_folder
    from bertopt.squad.prep import prepare_features, write_features

    refuse_used_folder(output)
    examples = load_examples(data)
    with _progress() as progress, tempfile.TemporaryDirectory(prefix="bertopt-squad-") as scratch:
        progress(f"reading {model}")
        squad_model = obtain_model(model, Path(scratch))
        source = tokenizer_folder(squad_model, tokenizer)
        progress(f"tokenising {len(examples)} questions")
        features = prepare_features(examples, load_tokenizer(source, squad_model.facts.vocab_size), seq,
                                    doc_stride, str(source))
        folders = write_features(features, squad_model.inputs, output)
    out.print(f"{len(examples)} questions -> {len(features)} features (seq {seq}, doc stride {features.doc_stride}, "
              f"tokenizer {source}) in {output}", markup=False)
    out.print(f"ais_bench --input {','.join(str(f) for f in folders)}", markup=False, soft_wrap=True)


@squad_app.command("eval")
def squad_eval(
    features: Path = typer.Option(..., "--features", help="the folder `bertopt squad prep` wrote"),
    results: Path = typer.Option(..., "--results", help="ais_bench --outfmt NPY folder: <idx>_0.npy start, <idx>_1.npy end"),
    data: str = typer.Option(..., "--data", help="the data the features were made from"),
    output: Optional[Path] = typer.Option(None, "--output", help="new folder for predictions.json, metrics.json (default RESULTS/squad)"),
) -> None:
    """Score ais_bench results with the official SQuAD v1.1 EM/F1."""
    from bertopt.squad.check import evaluate_results

    target = output or results / "squad"
    with _progress() as progress:
        progress("post-processing and scoring")
        score = evaluate_results(features, results, data, target)
    metrics = score.metrics
    nonfinite = f"; {score.nonfinite_features} feature(s) with NaN/inf logits" if score.nonfinite_features else ""
    out.print(f"EM {metrics.exact_match:.2f}  F1 {metrics.f1:.2f}  ({metrics.total} questions{nonfinite})\n"
              f"wrote {target}", markup=False)


@squad_app.command("check")
def squad_check(
    model: str = typer.Argument(..., help="preset name, HF checkpoint folder, or .onnx file"),
    data: str = typer.Option(..., "--data", help="dev-v1.1.json, a saved `datasets` folder, or `squad` (the hub)"),
    seq: int = typer.Option(384, "--seq", help="static sequence length"),
    batch: int = typer.Option(1, "--batch", help="static batch size"),
    output: Path = typer.Option(..., "--output", help="new folder: original/, optimized/, emulation/, features/, squad.json"),
    passes: str = typer.Option("default", "--passes", help="pipeline: default | a,b,c | default,-name"),
    doc_stride: Optional[int] = typer.Option(None, "--doc-stride", help="window overlap (default: the seed's)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the model's)"),
    emulation: bool = typer.Option(True, "--emulation/--no-emulation", help="also score the Ascend fp16 emulation"),
) -> None:
    """SQuAD EM/F1 of the original graph, the optimized graph and the Ascend emulation, on the same features."""
    from bertopt.squad.check import check_model

    with _progress() as progress:
        result = check_model(model, data, output, seq=seq, batch=batch, passes=passes, doc_stride=doc_stride,
                             tokenizer=tokenizer, emulation=emulation, progress=progress)
    out.print(_squad_table(result, batch, seq))
    out.print(f"report: {result.output / 'squad.json'}", markup=False)


def _squad_table(result, batch: int, seq: int) -> Table:
    table = Table(title=f"SQuAD v1.1, {len(result.scores[0].predictions)} questions, {result.features} features "
                        f"(bs{batch} seq{seq} stride {result.doc_stride})")
    for column in ("candidate", "EM", "F1", "dEM", "dF1", "same answers", "NaN/inf features"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for score in result.scores:
        delta = result.delta(score)
        table.add_row(score.label, f"{score.metrics.exact_match:.2f}", f"{score.metrics.f1:.2f}",
                      f"{delta['exact_match']:+.2f}", f"{delta['f1']:+.2f}", f"{result.same_answers(score):.1%}",
                      str(score.nonfinite_features))
    return table


def main() -> None:
    try:
        if app(args=with_bare_ray_flag(sys.argv[1:]), standalone_mode=False) == 130:  # typer 0.29 turns Ctrl-C into Exit(130), returned when not standalone
            raise KeyboardInterrupt
    except BertoptError as exc:
        err.print(f"bertopt: error: {exc}", soft_wrap=True, markup=False)
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors (typer's own parser): one line too, exit 2
        err.print(f"bertopt: error: {exc.format_message()} (see --help)", soft_wrap=True, markup=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err.print("bertopt: interrupted")
        sys.exit(130)
