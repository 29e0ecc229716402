"""The ATC invocation: options, argv, atc.sh, and running it where `atc` exists.

The defaults reproduce the seed guide's command (facts note, section 4):

    atc --model X.onnx --output om/X --framework 5 --log=error --soc_version Ascend310P3 \\
        --optypelist_for_implmode=Gelu --op_select_implmode=high_performance

What varies by CANN version comes from its `CannTarget` (bertopt.ascend.cann): where the implmode flags
are deprecated, the Gelu kernel is chosen with ``--op_precision_mode=op_precision.ini`` instead, an ini
with ``[ByOpType]`` / ``Gelu=<mode>`` (format from ATC's --op_precision_mode page, CANN 6.0.1
"atctool_0091": hiascend.com/document/detail/zh/canncommercial/601/inferapplicationdev/atctool/
atctool_0091.html; it overrides the implmode flags, CANN 8.0 "atlasatcparam_16_0070").

Flags given with ``--atc-arg`` pass through; where one is a flag bertopt sets, the user's value
replaces bertopt's and `overrides()` says so. ``--precision_mode`` and ``--precision_mode_v2`` are
mutually exclusive and only the flags the CANN version has are accepted.

atc runs in a fresh folder (`WORK_DIR`) so that the ``fusion_result.json`` it writes to its working
directory (``--export_compile_stat``, default 1: "generated in the current path where the atc command
is executed" unless ASCEND_WORK_PATH is set, then ``$ASCEND_WORK_PATH/FE/<pid>/``; CANN 8.0
"atlasatcparam_16_0098") is this compile's own.

Nothing here imitates CANN: `atc` runs only where it exists, and every other case is reported as such.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bertopt.ascend.cann import DEFAULT_VERSION, CannTarget, cann_target
from bertopt.ascend.soc import DEFAULT_SOC
from bertopt.errors import BertoptError

CANN_SET_ENV = Path("/usr/local/Ascend/ascend-toolkit/set_env.sh")
SCRIPT_NAME = "atc.sh"
LOG_NAME = "atc.log"
WORK_DIR = "atc-work"  # atc's working directory, made afresh by atc.sh; paths in argv are relative to it
FUSION_RESULT = "fusion_result.json"
OP_PRECISION_INI = "op_precision.ini"
LOG_TAIL_LINES = 20
GELU_IMPLS = ("high_performance", "high_precision")
PRECISION_FLAGS = ("--precision_mode", "--precision_mode_v2")
# ATC's error and warning codes, e.g. E10001 or E19999, as its console prints them after
# "ATC run failed, Please check the detail log" (Huawei's ATC case notes, e.g. coloradmin.cn/o/982415.html).
ERROR_CODE = re.compile(r"\b[EW][0-9A-Z][0-9]{4}\b")


def gelu_impls_from(chosen: str) -> list[str]:
    """Every Gelu kernel atc offers, `chosen` first."""
    return [chosen] + [impl for impl in GELU_IMPLS if impl != chosen]


def in_work_dir(path: str) -> str:
    """A path relative to the output folder, as atc sees it from WORK_DIR."""
    return f"../{path}"


@dataclass(frozen=True)
class Flag:
    """One atc flag: rendered ``--name=value``, or ``--name value`` where the seed's command spaces it."""

    name: str
    value: str | None = None
    spaced: bool = False

    def render(self) -> list[str]:
        if self.value is None:
            return [self.name]
        return [self.name, self.value] if self.spaced else [f"{self.name}={self.value}"]


@dataclass(frozen=True)
class AtcOptions:
    """What `atc` is asked to do; `argv()` renders it, values bare (atc.sh quotes them).

    `model` and `output` are relative to atc's working directory (see `in_work_dir`).
    """

    model: str
    output: str
    soc_version: str = DEFAULT_SOC
    cann: CannTarget = field(default_factory=lambda: cann_target(DEFAULT_VERSION))
    gelu_impl: str = "high_performance"
    input_shape: dict[str, tuple[int, ...]] | None = None  # only graphs with dynamic inputs need it
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.gelu_impl not in GELU_IMPLS:
            raise BertoptError(f"--gelu-impl {self.gelu_impl!r}: expected one of {', '.join(GELU_IMPLS)}")
        user = self.user_flags()
        given = [name for name in PRECISION_FLAGS if name in user]
        if len(given) > 1:
            raise BertoptError("--atc-arg: --precision_mode and --precision_mode_v2 are mutually exclusive")
        for name in given:
            if name not in self.cann.precision_flags:
                raise BertoptError(f"--atc-arg {name}: CANN {self.cann.version}'s atc has no such flag "
                                   f"(it has {', '.join(self.cann.precision_flags)})")

    def user_flags(self) -> dict[str, Flag]:
        """The --atc-arg flags by name; each must be ``--name`` or ``--name=value``."""
        flags = {}
        for text in self.extra:
            if not text.startswith("--") or len(text) < 3:
                raise BertoptError(f"--atc-arg {text!r}: ATC flags start with '--' (e.g. --atc-arg=--debug_dir=dbg)")
            name, sep, value = text.partition("=")
            flags[name] = Flag(name, value if sep else None)
        return flags

    def bertopt_flags(self) -> list[Flag]:
        """The flags bertopt sets, in the seed's order."""
        flags = [Flag("--model", self.model, spaced=True), Flag("--output", self.output, spaced=True),
                 Flag("--framework", "5", spaced=True), Flag("--log", "error"),
                 Flag("--soc_version", self.soc_version, spaced=True), *self._gelu_flags()]
        if self.input_shape:
            flags.append(Flag("--input_shape", render_input_shape(self.input_shape)))
        return flags

    def _gelu_flags(self) -> list[Flag]:
        if self.cann.implmode_deprecated:
            return [Flag("--op_precision_mode", in_work_dir(OP_PRECISION_INI))]
        return [Flag("--optypelist_for_implmode", "Gelu"), Flag("--op_select_implmode", self.gelu_impl)]

    def argv(self) -> list[str]:
        """bertopt's flags (the user's value where they gave the same flag), then the user's other flags."""
        user = self.user_flags()
        ours = self.bertopt_flags()
        argv = ["atc"]
        for flag in ours:
            mine = user.get(flag.name)
            argv += (Flag(flag.name, mine.value, flag.spaced) if mine else flag).render()
        names = {flag.name for flag in ours}
        for flag in user.values():
            if flag.name not in names:
                argv += flag.render()
        return argv

    def overrides(self) -> dict[str, dict[str, str | None]]:
        """Flags bertopt sets that the user set too: the user's value won."""
        user = self.user_flags()
        return {flag.name: {"bertopt": flag.value, "user": user[flag.name].value}
                for flag in self.bertopt_flags() if flag.name in user and user[flag.name].value != flag.value}

    def files(self) -> dict[str, str]:
        """Files atc.sh reads beside it (name -> text): the op precision ini where bertopt sets it."""
        if not self.cann.implmode_deprecated or "--op_precision_mode" in self.user_flags():
            return {}
        return {OP_PRECISION_INI: f"[ByOpType]\nGelu={self.gelu_impl}\n"}

    def precision(self) -> tuple[str, str | None]:
        """(flag, value) of the precision mode the user chose; (flag, None) means ATC's default."""
        user = self.user_flags()
        for name in PRECISION_FLAGS:
            if name in user:
                return name, user[name].value
        return PRECISION_FLAGS[0], None

    def gelu_mode(self) -> str | None:
        """The implementation mode atc compiles Gelu with, or None when the user's flags leave it unknown.

        The implmode flags apply to Gelu only while Gelu is in --optypelist_for_implmode; a user's own
        --op_precision_mode file overrides them (ATC's --op_precision_mode page) and is not read here.
        """
        user = self.user_flags()
        if "--op_precision_mode" in user:
            return None
        if self.cann.implmode_deprecated:
            return self.gelu_impl
        optypes = (user.get("--optypelist_for_implmode") or Flag("", "Gelu")).value or ""
        if "Gelu" not in [op.strip() for op in optypes.split(",")]:
            return None
        chosen = user.get("--op_select_implmode")
        return chosen.value if chosen else self.gelu_impl


def render_input_shape(shapes: dict[str, tuple[int, ...]]) -> str:
    """ATC's form: ``name:d0,d1;name:d0,d1``."""
    return ";".join(f"{name}:{','.join(str(d) for d in dims)}" for name, dims in shapes.items())


def script_text(argv: list[str]) -> str:
    """A bash script that runs `argv` in a fresh WORK_DIR beside it, with CANN's environment when installed."""
    return "\n".join([
        "#!/usr/bin/env bash",
        "# Written by bertopt: compiles the optimized ONNX model into an Ascend OM.",
        f"# atc runs in a fresh {WORK_DIR}/, so the {FUSION_RESULT} it writes there is this compile's own.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f"if [ -f {shlex.quote(str(CANN_SET_ENV))} ]; then",
        f"  source {shlex.quote(str(CANN_SET_ENV))}",
        "fi",
        f"rm -rf {WORK_DIR} && mkdir {WORK_DIR} && cd {WORK_DIR}",
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
    cann: dict[str, str]  # {"version", "source"}: the CANN version the options were made for
    overrides: dict[str, dict] = field(default_factory=dict)  # bertopt's flags the user's value replaced
    om: Path | None = None
    returncode: int | None = None
    log: Path | None = None
    log_tail: list[str] | None = None
    error_codes: list[str] = field(default_factory=list)  # ATC's E/W codes in its output, first seen first
    fusion_result: Path | None = None  # what ATC says it fused, where it wrote it

    def to_dict(self) -> dict:
        data = {"argv": self.argv, "script": str(self.script), "status": self.status, "soc": self.soc,
                "soc_source": self.soc_source, "cann": self.cann, "overrides": self.overrides}
        if self.om is not None:
            data["om"] = str(self.om)
        if self.fusion_result is not None:
            data["fusion_result"] = str(self.fusion_result)
        if self.status == "failed":
            data.update(returncode=self.returncode, log=str(self.log), log_tail=self.log_tail,
                        error_codes=self.error_codes)
        return data

    def summary_line(self) -> str:
        if self.status == "not-found":
            return (f"atc not found (no `atc` on PATH, no {CANN_SET_ENV}): wrote {self.script}; "
                    f"run it where CANN is installed")
        if self.status == "ran":
            return f"atc compiled {self.om} (soc {self.soc}, CANN {self.cann['version']})"
        codes = f" [{', '.join(self.error_codes)}]" if self.error_codes else ""
        last = self.log_tail[-1] if self.log_tail else "no output"
        return f"atc failed with exit code {self.returncode}{codes} (log {self.log}): {last}"


def atc_available() -> bool:
    """`atc` on PATH, or CANN's set_env.sh that puts it there (atc.sh sources it)."""
    return shutil.which("atc") is not None or CANN_SET_ENV.is_file()


def write_script(folder: Path, options: AtcOptions) -> Path:
    """Write atc.sh (executable) and the files it reads, each atomically."""
    for name, text in options.files().items():
        _write_atomically(folder / name, text, 0o644)
    return _write_atomically(folder / SCRIPT_NAME, script_text(options.argv()), 0o755)


def _write_atomically(path: Path, text: str, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def compile_om(folder: Path, options: AtcOptions, soc_source: str, cann_source: str,
               echo: Callable[[str], None] = lambda line: None) -> AtcResult:
    """Write atc.sh in `folder` and run it when atc exists, streaming each log line to `echo`.

    The log goes to atc.log; a failure keeps its last lines and ATC's error codes. After a run, the
    fusion_result.json atc wrote (in WORK_DIR, or under $ASCEND_WORK_PATH/FE/ when that is set) is
    located for the report.
    """
    result = AtcResult(argv=options.argv(), script=write_script(folder, options), status="not-found",
                       soc=options.soc_version, soc_source=soc_source,
                       cann={"version": options.cann.version, "source": cann_source},
                       overrides=options.overrides())
    if not atc_available():
        return result
    log, started = folder / LOG_NAME, time.time()
    returncode, tail, codes = _stream(["bash", str(result.script)], log, echo)
    om = (folder / WORK_DIR / f"{options.output}.om").resolve()
    if returncode == 0 and om.is_file():
        result.status, result.om = "ran", om
    else:
        if returncode == 0:
            tail.append(f"atc exited 0 but wrote no {om}")
        result.status, result.log_tail = "failed", list(tail)
    result.returncode, result.log, result.error_codes = returncode, log, codes
    result.fusion_result = find_fusion_result(folder / WORK_DIR, started)
    return result


def find_fusion_result(work_dir: Path, since: float) -> Path | None:
    """The fusion_result.json of the atc run in `work_dir` that started at `since`: in `work_dir`, else
    the newest written since then under $ASCEND_WORK_PATH/FE/<pid>/."""
    own = work_dir / FUSION_RESULT
    if own.is_file():
        return own
    shared = os.environ.get("ASCEND_WORK_PATH")
    found = [p for p in Path(shared).glob(f"FE/*/{FUSION_RESULT}") if p.stat().st_mtime >= since] if shared else []
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _stream(command: list[str], log: Path,
            echo: Callable[[str], None]) -> tuple[int, collections.deque, list[str]]:
    tail: collections.deque = collections.deque(maxlen=LOG_TAIL_LINES)
    codes: dict[str, None] = {}
    with open(log, "w") as sink, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True, errors="replace") as process:
        for line in process.stdout:
            sink.write(line)
            line = line.rstrip("\n")
            tail.append(line)
            codes.update(dict.fromkeys(ERROR_CODE.findall(line)))
            echo(line)
    return process.returncode, tail, list(codes)
