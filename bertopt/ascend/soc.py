"""Which chip to compile for: ``--soc``, else what ``npu-smi`` says, else (no npu-smi here) the seed's 310P3.

ATC's ``--soc_version`` must name the chip exactly: an OM compiled for another chip does not load on it.
So where ``npu-smi`` exists but its answer cannot be read, bertopt stops and asks for ``--soc`` instead of
compiling for a guessed chip; only a machine without ``npu-smi`` (nothing to ask) falls back to the seed's
``Ascend310P3``, and the report says the soc came from that default.

The rule, from CANN's documentation (``GetSocVersion``, CANN 8.5 Ascend C API,
https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/850/API/ascendcopapi/atlasascendc_api_07_1029.html):

- Atlas A2, Atlas 200I/500 A2, Atlas inference and training products: soc = ``Ascend`` + the ``Name``
  column of ``npu-smi info``;
- Atlas A3: soc = ``Chip Name`` + ``_`` + ``NPU Name`` from ``npu-smi info -t board -i ID -c CHIP``, where
  Chip Name already reads ``Ascend910`` (e.g. ``Ascend910_9392``).

``Name`` cells seen in real ``npu-smi info`` tables (the fixtures in tests/test_soc.py copy them):
``310P3`` (the seed guide; nvtop issue 421; vllm-ascend issue 6842, NPU ids 32 and 32768), ``910B3``
(vllm-ascend issue 1130, no Device column), ``910B4-1`` (Project-HAMi/HAMi-WebUI issue 47), ``310B1``
(repo QWEADDGFG/Ascend_YOLO README, Bus-Id ``NA``), ``310`` (repo Ascend/mindxsdk-referenceapps
``contrib/StyleTransfer/README.md``, npu-smi 21.0.3.1) and, on A3 machines, ``Ascend910`` (vllm-ascend issue
2534: a ``Chip Phy-ID`` column, two chips per NPU). A Name that already starts with ``Ascend`` is the A3
form: the Name is not the soc, the board query is. The board output's A3 form (``NPU Name : 9392``,
``Chip Name : Ascend910``, no ``Chip Type``) is the one a public how-to, "Method for Obtaining the SoC Model
of Ascend Chips", prints; the facts note's ``Ascend<Chip Name>_<NPU Name>`` would double the prefix when
Chip Name already reads ``Ascend910``, so the prefix is added only where it is missing.

Each NPU takes two rows of the ``npu-smi info`` table, the first ``| <NPU id> <Name> | <Health> | ...``
and the second ``| <Chip> [<Device or Phy-ID>] | <Bus-Id or NA> | ...``; A3 and Atlas 300I Duo cards repeat
the pair once per chip. Rows are read in those pairs, so a Name of digits only (``310``) is still a Name.
Any other layout is "cannot be read", which asks for ``--soc``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

from bertopt.errors import BertoptError, first_line

DEFAULT_SOC = "Ascend310P3"  # the seed guide's chip (Atlas 300I Pro / Duo)
SOC_PREFIX = "Ascend"
NPU_SMI_TIMEOUT = 30
ASK_FOR_SOC = "pass --soc (e.g. --soc Ascend310P3) to name the chip to compile for"

# What `npu-smi` prints (its arguments -> stdout), or None when npu-smi is not installed here.
NpuSmiRunner = Callable[[Sequence[str]], "str | None"]


class NpuSmiFailed(Exception):
    """npu-smi is installed but the command failed (exit status, timeout): no answer to read."""


@dataclass(frozen=True)
class NpuRow:
    """One chip of the `npu-smi info` table: its NPU id, Name cell and Chip id."""

    npu: int
    name: str
    chip: int


def detect_soc(option: str | None, *, run_npu_smi: NpuSmiRunner | None = None) -> tuple[str, str]:
    """(soc version, where it came from: ``option`` | ``npu-smi`` | ``default``).

    BertoptError (one line asking for ``--soc``) when npu-smi exists but fails, prints a table this
    cannot read, lists chips of different kinds, or (A3) its board query does not name the chip.
    """
    if option:
        return option, "option"
    run = run_npu_smi or run_npu_smi_command
    text = _ask(run, ["info"])
    if text is None:
        return DEFAULT_SOC, "default"
    return soc_from_npu_smi(text, run), "npu-smi"


def is_310p(soc: str) -> bool:
    """Whether `soc` is a 310P (Atlas 300I Pro / Duo): the only chips whose ATC fuses BERT's attention big
    kernels for inference (facts note, section 5: ZAttentionScoreFusionPass; msit's big-kernel README)."""
    return soc.startswith("Ascend310P")


def soc_from_npu_smi(text: str, run: NpuSmiRunner) -> str:
    """The soc named by an `npu-smi info` table (and, on A3, by the board query `run` answers)."""
    rows = parse_npu_smi(text)
    if not rows:
        raise BertoptError(f"npu-smi info printed no chip table bertopt can read; {ASK_FOR_SOC}")
    names = sorted({row.name for row in rows})
    if len(names) > 1:
        raise BertoptError(f"npu-smi info lists chips of several kinds ({', '.join(names)}); {ASK_FOR_SOC}")
    first = rows[0]
    if not first.name.startswith(SOC_PREFIX):
        return SOC_PREFIX + first.name
    board = _ask(run, ["info", "-t", "board", "-i", str(first.npu), "-c", str(first.chip)])
    soc = soc_from_board(board or "")
    if soc is None:
        raise BertoptError(f"npu-smi names the chip {first.name} (Atlas A3), and `npu-smi info -t board -i "
                           f"{first.npu} -c {first.chip}` printed no Chip Name and NPU Name; {ASK_FOR_SOC}")
    return soc


def parse_npu_smi(text: str) -> list[NpuRow]:
    """Every chip of an `npu-smi info` table, in order; [] when the text holds no such table.

    The table's data starts after its first ``+====`` rule and ends at the first line that is neither a
    table row nor a rule (the process table that follows starts with its own header).
    """
    rows = _data_rows(text)
    if len(rows) < 2 or len(rows) % 2:
        return []
    found = []
    for name_row, chip_row in zip(rows[0::2], rows[1::2]):
        row = _npu_row(name_row, chip_row)
        if row is None:
            return []
        found.append(row)
    return found


def soc_from_board(text: str) -> str | None:
    """``<Chip Name>_<NPU Name>`` from `npu-smi info -t board -i ID -c CHIP`, ``Ascend`` prefixed where the
    Chip Name lacks it; None when either field is missing (an A2 board, for one, has no NPU Name)."""
    fields = dict(_board_field(line) for line in text.splitlines() if ":" in line)
    chip, npu = fields.get("Chip Name", ""), fields.get("NPU Name", "")
    if not chip or not npu or npu in ("NA", "-"):
        return None
    return (chip if chip.startswith(SOC_PREFIX) else SOC_PREFIX + chip) + "_" + npu


def run_npu_smi_command(args: Sequence[str]) -> str | None:
    """`npu-smi <args>`'s stdout; None when npu-smi is not on PATH; NpuSmiFailed when it fails."""
    if shutil.which("npu-smi") is None:
        return None
    try:
        done = subprocess.run(["npu-smi", *args], capture_output=True, text=True, timeout=NPU_SMI_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NpuSmiFailed(first_line(exc)) from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()
        raise NpuSmiFailed(f"exit status {done.returncode}" + (f": {said.splitlines()[0]}" if said else ""))
    return done.stdout


def _ask(run: NpuSmiRunner, args: list[str]) -> str | None:
    try:
        return run(args)
    except NpuSmiFailed as exc:
        raise BertoptError(f"`npu-smi {' '.join(args)}` failed ({exc}); {ASK_FOR_SOC}") from None


def _data_rows(text: str) -> list[list[str]]:
    rows: list[list[str]] = []
    started = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("+="):
            started = True
            continue
        if not started or line.startswith("+-"):
            continue
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if "Process" in line or len(cells) < 2:
            break
        rows.append(cells)
    return rows


def _npu_row(name_row: list[str], chip_row: list[str]) -> NpuRow | None:
    head, chip = name_row[0].split(), chip_row[0].split()
    if len(head) != 2 or not head[0].isdigit() or not chip or not chip[0].isdigit():
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", head[1]):
        return None
    return NpuRow(npu=int(head[0]), name=head[1], chip=int(chip[0]))


def _board_field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()
