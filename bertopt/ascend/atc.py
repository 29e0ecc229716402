"""The ATC invocation: options, argv, atc.sh, and running it where `atc` exists.

The defaults reproduce the seed guide's command (facts note, section 4):

    atc --model X.onnx --output om/X --framework 5 --log=error --soc_version Ascend310P3 \\
        --optypelist_for_implmode=Gelu --op_select_implmode=high_performance

Nothing here imitates CANN: `atc` runs only where it exists, and every other case is reported as such.
"""

from __future__ import annotations

import collections
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bertopt.ascend.soc import DEFAULT_SOC
from bertopt.errors import BertoptError

CANN_SET_ENV = Path("/usr/local/Ascend/ascend-toolkit/set_env.sh")
SCRIPT_NAME = "atc.sh"
LOG_NAME = "atc.log"
LOG_TAIL_LINES = 20

# Flags the typed options own; giving them again through the pass-through would contradict them.
OWNED_FLAGS = ("--model", "--output", "--framework", "--soc_version", "--log",
               "--optypelist_for_implmode", "--op_select_implmode", "--precision_mode", "--input_shape")


@dataclass(frozen=True)
class AtcOptions:
    """What `atc` is asked to do; `argv()` renders it, values bare (atc.sh quotes them)."""

    model: str
    output: str
    soc_version: str = DEFAULT_SOC
    framework: int = 5  # 5 = ONNX
    log: str = "error"
    optypelist_for_implmode: str | None = "Gelu"
    op_select_implmode: str | None = "high_performance"
    precision_mode: str | None = None  # None keeps ATC's default (fp16 on 310P)
    input_shape: dict[str, tuple[int, ...]] | None = None  # only graphs with dynamic inputs need it
    extra: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for flag in self.extra:
            if not flag.startswith("--"):
                raise BertoptError(f"--atc-arg {flag!r}: ATC flags start with '--' (e.g. --atc-arg=--debug_dir=dbg)")
            if flag.split("=", 1)[0] in OWNED_FLAGS:
                raise BertoptError(f"--atc-arg {flag!r}: bertopt sets {flag.split('=', 1)[0]} itself "
                                   f"(use --soc for the soc version)")

    def argv(self) -> list[str]:
        argv = ["atc", "--model", self.model, "--output", self.output, "--framework", str(self.framework),
                f"--log={self.log}", "--soc_version", self.soc_version]
        if self.optypelist_for_implmode:
            argv.append(f"--optypelist_for_implmode={self.optypelist_for_implmode}")
        if self.op_select_implmode:
            argv.append(f"--op_select_implmode={self.op_select_implmode}")
        if self.precision_mode:
            argv.append(f"--precision_mode={self.precision_mode}")
        if self.input_shape:
            argv.append(f"--input_shape={render_input_shape(self.input_shape)}")
        return argv + list(self.extra)


def render_input_shape(shapes: dict[str, tuple[int, ...]]) -> str:
    """ATC's form: ``name:d0,d1;name:d0,d1``."""
    return ";".join(f"{name}:{','.join(str(d) for d in dims)}" for name, dims in shapes.items())


def script_text(argv: list[str]) -> str:
    """A bash script that runs `argv` from its own folder, with CANN's environment when installed."""
    return "\n".join([
        "#!/usr/bin/env bash",
        "# Written by bertopt: compiles the optimized ONNX model into an Ascend OM.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f"if [ -f {shlex.quote(str(CANN_SET_ENV))} ]; then",
        f"  source {shlex.quote(str(CANN_SET_ENV))}",
        "fi",
        'mkdir -p "$(dirname ' + shlex.quote(_output_of(argv)) + ')"',
        shlex.join(argv),
        "",
    ])


def _output_of(argv: list[str]) -> str:
    return argv[argv.index("--output") + 1]


# --------------------------------------------------------------------------- running atc

@dataclass
class AtcResult:
    argv: list[str]
    script: Path
    status: str  # ran | failed | not-found
    soc: str
    soc_source: str
    om: Path | None = None
    returncode: int | None = None
    log: Path | None = None
    log_tail: list[str] | None = None

    def to_dict(self) -> dict:
        data = {"argv": self.argv, "script": str(self.script), "status": self.status, "soc": self.soc,
                "soc_source": self.soc_source}
        if self.om is not None:
            data["om"] = str(self.om)
        if self.status == "failed":
            data.update(returncode=self.returncode, log=str(self.log), log_tail=self.log_tail)
        return data

    def summary_line(self) -> str:
        if self.status == "not-found":
            return (f"atc not found (no `atc` on PATH, no {CANN_SET_ENV}): wrote {self.script}; "
                    f"run it where CANN is installed")
        if self.status == "ran":
            return f"atc compiled {self.om} (soc {self.soc})"
        last = self.log_tail[-1] if self.log_tail else "no output"
        return f"atc failed with exit code {self.returncode} (log {self.log}): {last}"


def atc_available() -> bool:
    """`atc` on PATH, or CANN's set_env.sh that puts it there (atc.sh sources it)."""
    return shutil.which("atc") is not None or CANN_SET_ENV.is_file()


def write_script(folder: Path, argv: list[str]) -> Path:
    """Write atc.sh atomically and make it executable."""
    path = folder / SCRIPT_NAME
    tmp = folder / f".{SCRIPT_NAME}.tmp"
    tmp.write_text(script_text(argv))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def compile_om(folder: Path, options: AtcOptions, soc_source: str,
               echo: Callable[[str], None] = lambda line: None) -> AtcResult:
    """Write atc.sh in `folder` and run it when atc exists, streaming each log line to `echo`.

    Paths in `options` are relative to `folder` (the script changes into it, as the seed's commands
    run from the model folder). The log goes to atc.log; a failure keeps its last lines.
    """
    argv = options.argv()
    script = write_script(folder, argv)
    result = AtcResult(argv=argv, script=script, status="not-found", soc=options.soc_version,
                       soc_source=soc_source)
    if not atc_available():
        return result
    log = folder / LOG_NAME
    returncode, tail = _stream(["bash", str(script)], log, echo)
    om = folder / f"{options.output}.om"
    if returncode == 0 and om.is_file():
        result.status, result.om = "ran", om.resolve()
    else:
        if returncode == 0:
            tail.append(f"atc exited 0 but wrote no {om}")
        result.status, result.log_tail = "failed", list(tail)
    result.returncode, result.log = returncode, log
    return result


def _stream(command: list[str], log: Path, echo: Callable[[str], None]) -> tuple[int, collections.deque]:
    tail: collections.deque = collections.deque(maxlen=LOG_TAIL_LINES)
    with open(log, "w") as sink, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True, errors="replace") as process:
        for line in process.stdout:
            sink.write(line)
            line = line.rstrip("\n")
            tail.append(line)
            echo(line)
    return process.returncode, tail
