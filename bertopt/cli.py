"""The `bertopt` command line: parse, call the library, print. Nothing else lives here.

Exit codes: 0 success, 1 a check failed (e.g. parity), 2 bad input or usage. Errors the user can act
on are one line on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from bertopt.errors import BertoptError, CheckFailed

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Graph-surgery compiler frontend for BERT-family ONNX models.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@contextmanager
def _progress() -> Iterator:
    """A spinner on stderr whose text each long step replaces."""
    with err.status("starting") as status:
        yield lambda message: status.update(message)


@app.command()
def run(
    model: str = typer.Argument("bert-base", help="preset name, HF checkpoint folder, or .onnx file"),
    passes: str = typer.Option("default", "--passes", help="pipeline: default | a,b,c | default,-name"),
    batch: int = typer.Option(1, "--batch", help="static batch size"),
    seq: int = typer.Option(384, "--seq", help="static sequence length"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder (default bertopt-out/<model>-bs<B>-seq<S>)"),
    target: str = typer.Option("ascend", "--target", help="ascend | ort"),
    force: bool = typer.Option(False, "--force", help="overwrite results already in the output folder"),
    exporter: str = typer.Option("legacy", "--exporter", help="legacy | dynamo (presets and HF folders)"),
    opset: Optional[int] = typer.Option(None, "--opset", help="export opset (default 14 legacy, 18 dynamo)"),
    dump_dir: Optional[Path] = typer.Option(None, "--dump-dir", help="write the graph before/after each pass that changed it"),
    check_each_pass: bool = typer.Option(False, "--check-each-pass", help="parity after every pass; names the first that breaks numerics"),
) -> None:
    """Export (if needed), freeze shapes, run the passes, save, and check parity with the original."""
    from bertopt.run import RunConfig, run as run_pipeline

    config = RunConfig(model=model, passes=passes, batch=batch, seq=seq, output=output, target=target,
                       force=force, exporter=exporter, opset=opset, dump_dir=dump_dir,
                       check_each_pass=check_each_pass)
    with _progress() as progress:
        report = run_pipeline(config, progress)
    out.print(f"[bold]{report.model_description}[/bold]")
    out.print(_facts_line(report.facts))
    out.print(_pass_table(report.passes))
    out.print(f"parity vs original (ONNX Runtime fp32, bs{batch} seq{seq}): {report.parity.summary_line()}")
    out.print(f"optimized model: {report.optimized_model}")
    out.print(f"report: {report.output_dir / 'report.json'}")
    if not report.parity.passed:
        raise CheckFailed("parity check failed (see the line above)")


def _facts_line(facts) -> str:
    roles = ", ".join(f"{name}={role}" for name, role in facts.roles.items())
    return (f"{facts.family}: {facts.num_layers} layers, hidden {facts.hidden}, {facts.heads} heads x "
            f"{facts.head_dim}, vocab {facts.vocab_size}, opset {facts.opset}, IR {facts.ir_version}; "
            f"inputs {roles}")


def _pass_table(records) -> Table:
    table = Table(title="passes")
    for column in ("pass", "changed", "seconds", "verify s", "changes"):
        table.add_column(column, justify="right" if "s" == column[-1:] and column != "pass" else "left")
    for record in records:
        changes = ", ".join(f"{k}={v}" for k, v in record.counts.items()) if record.changed else "no change"
        notes = "; ".join(record.notes)
        table.add_row(record.name, "yes" if record.changed else "no", f"{record.seconds:.2f}",
                      f"{record.verify_seconds:.2f}", f"{changes}\n{notes}" if notes else changes)
    return table


@app.command("passes")
def list_passes() -> None:
    """List the registered passes and the named pipelines."""
    from bertopt.pipeline import PIPELINES, registered_passes

    table = Table(title="passes")
    table.add_column("name")
    table.add_column("summary")
    table.add_column("requires")
    for info in registered_passes().values():
        table.add_row(info.name, info.summary, ", ".join(info.requires))
    out.print(table)
    for name, names in PIPELINES.items():
        out.print(f"pipeline {name}: {', '.join(names)}")


@app.command()
def export(
    model: str = typer.Argument(..., help="preset name or HF checkpoint folder"),
    output: Path = typer.Option(..., "--output", help="the .onnx file to write"),
    exporter: str = typer.Option("legacy", "--exporter", help="legacy (TorchScript) | dynamo"),
    opset: Optional[int] = typer.Option(None, "--opset", help="default 14 (legacy) or 18 (dynamo)"),
    attention: str = typer.Option("eager", "--attention", help="eager | sdpa"),
) -> None:
    """Export a preset or HF checkpoint folder to ONNX with dynamic batch/seq axes (cached by content)."""
    from bertopt.export import export_onnx, resolve_source

    source = resolve_source(model)
    with _progress() as progress:
        progress(f"exporting {model} ({exporter})")
        result = export_onnx(source, output, exporter=exporter, opset=opset, attention=attention)
    origin = "from cache" if result.cached else f"in {result.seconds:.1f} s"
    out.print(f"{result.description}\nwrote {result.path} ({origin})")


def main() -> None:
    try:
        app(standalone_mode=False)
    except BertoptError as exc:
        err.print(f"bertopt: error: {exc}", soft_wrap=True, markup=False)
        sys.exit(exc.exit_code)
    except click.exceptions.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("bertopt: interrupted")
        sys.exit(130)
