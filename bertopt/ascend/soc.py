"""Which chip to compile for: ``--soc``, else the Name that ``npu-smi info`` prints, else the seed's 310P3."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Callable

DEFAULT_SOC = "Ascend310P3"
NPU_SMI_TIMEOUT = 30


def parse_npu_smi(text: str) -> str | None:
    """The soc version (``Ascend`` + the Name column) of the first NPU in `npu-smi info` output.

    Each NPU takes two table rows: ``| 0  310P3 | OK | ...`` (NPU id, Name | Health) and
    ``| 0  0 | 0000:82:00.0 | ...`` (Chip, Device | Bus-Id). The first is the one that names the chip.
    """
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        head = cells[0].split()
        if (len(head) == 2 and head[0].isdigit() and re.fullmatch(r"\d+[A-Za-z][A-Za-z0-9]*", head[1])
                and not re.match(r"[0-9A-Fa-f]{4}:", cells[1])):
            return f"Ascend{head[1]}"
    return None


def detect_soc(option: str | None, *, run_npu_smi: Callable[[], str | None] | None = None) -> tuple[str, str]:
    """(soc version, where it came from: ``option`` | ``npu-smi`` | ``default``)."""
    if option:
        return option, "option"
    text = (run_npu_smi or _npu_smi_info)()
    soc = parse_npu_smi(text) if text else None
    if soc:
        return soc, "npu-smi"
    return DEFAULT_SOC, "default"


def _npu_smi_info() -> str | None:
    if shutil.which("npu-smi") is None:
        return None
    try:
        done = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=NPU_SMI_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
