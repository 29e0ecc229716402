"""soc detection: every `npu-smi info` Name form, the A3 board query, and refusing to guess.

The npu-smi runner is injected: the tables in tests/npu_smi_tables.py are real outputs' layouts, fed to the
parser; no test runs npu-smi or claims a chip exists.
"""

from __future__ import annotations

import pytest

from bertopt.ascend import soc as soc_module
from bertopt.ascend.soc import (DEFAULT_SOC, NpuRow, NpuSmiFailed, detect_soc, is_310p, parse_npu_smi,
                                run_npu_smi_command, soc_from_board)
from bertopt.errors import BertoptError
from npu_smi_tables import (NPU_SMI_310, NPU_SMI_310B1, NPU_SMI_310P3, NPU_SMI_310P3_DUO, NPU_SMI_910B3,
                            NPU_SMI_910B4_1, NPU_SMI_A2_BOARD, NPU_SMI_A3, NPU_SMI_A3_BOARD)


def answers(info: str | None, board: str | None = None, failing: tuple[str, ...] = ()):
    """An npu-smi runner: `info` for `npu-smi info`, `board` for the board query; the calls it got."""
    calls: list[list[str]] = []

    def run(args):
        calls.append(list(args))
        if args[0] in failing or " ".join(args) in failing:
            raise NpuSmiFailed("exit status 8: dcmi module initialize failed. ret is -8005")
        return info if list(args) == ["info"] else board

    run.calls = calls
    return run


@pytest.mark.parametrize("table, soc", [
    (NPU_SMI_310P3, "Ascend310P3"),
    (NPU_SMI_310P3_DUO, "Ascend310P3"),
    (NPU_SMI_910B3, "Ascend910B3"),
    (NPU_SMI_910B4_1, "Ascend910B4-1"),
    (NPU_SMI_310B1, "Ascend310B1"),
    (NPU_SMI_310, "Ascend310"),
])
def test_the_name_column_gives_the_soc(table, soc):
    run = answers(table)
    assert detect_soc(None, run_npu_smi=run) == (soc, "npu-smi")
    assert run.calls == [["info"]], "the Name is enough: no board query"


def test_rows_come_in_pairs_whatever_the_columns():
    assert parse_npu_smi(NPU_SMI_310P3_DUO) == [NpuRow(32, "310P3", 0), NpuRow(32, "310P3", 1),
                                                 NpuRow(32768, "310P3", 0)]
    assert parse_npu_smi(NPU_SMI_310) == [NpuRow(0, "310", 0)]
    assert [(r.npu, r.chip) for r in parse_npu_smi(NPU_SMI_A3)] == [(0, 0), (0, 1), (1, 0)]


def test_an_a3_asks_the_board_of_its_first_chip():
    run = answers(NPU_SMI_A3, NPU_SMI_A3_BOARD)
    assert detect_soc(None, run_npu_smi=run) == ("Ascend910_9391", "npu-smi")
    assert run.calls == [["info"], ["info", "-t", "board", "-i", "0", "-c", "0"]]


def test_the_board_fields():
    assert soc_from_board(NPU_SMI_A3_BOARD) == "Ascend910_9391"
    assert soc_from_board(NPU_SMI_A3_BOARD.replace("Ascend910", "910")) == "Ascend910_9391"
    assert soc_from_board(NPU_SMI_A2_BOARD) is None, "an A2 board has no NPU Name"
    assert soc_from_board("") is None


@pytest.mark.parametrize("board", [NPU_SMI_A2_BOARD, "", None])
def test_an_a3_whose_board_says_nothing_asks_for_soc(board):
    with pytest.raises(BertoptError, match=r"Ascend910 \(Atlas A3\).*-i 0 -c 0.*pass --soc"):
        detect_soc(None, run_npu_smi=answers(NPU_SMI_A3, board))


def test_an_a3_whose_board_query_fails_asks_for_soc():
    run = answers(NPU_SMI_A3, NPU_SMI_A3_BOARD, failing=("info -t board -i 0 -c 0",))
    with pytest.raises(BertoptError, match=r"`npu-smi info -t board -i 0 -c 0` failed \(exit status 8.*pass --soc"):
        detect_soc(None, run_npu_smi=run)


@pytest.mark.parametrize("text", [
    "npu-smi: command failed\n",
    "",
    NPU_SMI_310P3.replace("| 0       0         | 0000:82:00.0", "| x       0         | 0000:82:00.0"),
    "\n".join(NPU_SMI_910B3.splitlines()[:7]) + "\n",  # a name row without its chip row
])
def test_npu_smi_output_that_cannot_be_read_asks_for_soc(text):
    with pytest.raises(BertoptError, match=r"^npu-smi info printed no chip table bertopt can read; pass --soc"):
        detect_soc(None, run_npu_smi=answers(text))


def test_chips_of_several_kinds_ask_for_soc():
    mixed = NPU_SMI_310P3.replace("| 1       310P3     |", "| 1       310B1     |")
    with pytest.raises(BertoptError, match=r"several kinds \(310B1, 310P3\); pass --soc"):
        detect_soc(None, run_npu_smi=answers(mixed))


def test_npu_smi_that_fails_asks_for_soc():
    with pytest.raises(BertoptError, match=r"^`npu-smi info` failed \(exit status 8: dcmi .*\); pass --soc"):
        detect_soc(None, run_npu_smi=answers(NPU_SMI_310P3, failing=("info",)))


def test_the_option_wins_and_no_npu_smi_means_the_default():
    run = answers(NPU_SMI_910B3)
    assert detect_soc("Ascend910B", run_npu_smi=run) == ("Ascend910B", "option")
    assert run.calls == [], "with --soc npu-smi is not asked"
    assert detect_soc(None, run_npu_smi=answers(None)) == (DEFAULT_SOC, "default") == ("Ascend310P3", "default")


def test_is_310p():
    assert is_310p("Ascend310P3") and is_310p("Ascend310P1")
    assert not any(is_310p(soc) for soc in ("Ascend310", "Ascend310B1", "Ascend910B3", "Ascend910_9391"))


# --------------------------------------------------------------------------- the real runner

def fake_npu_smi(tmp_path, script: str) -> str:
    """A PATH holding an `npu-smi` shell script: tests our process handling only (no chip is claimed)."""
    (tmp_path / "npu-smi").write_text("#!/bin/sh\n" + script)
    (tmp_path / "npu-smi").chmod(0o755)
    return f"{tmp_path}:/usr/bin:/bin"


def test_the_runner_without_npu_smi_says_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_npu_smi_command(["info"]) is None
    assert detect_soc(None) == (DEFAULT_SOC, "default")


def test_the_runner_passes_arguments_and_reports_failures(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", fake_npu_smi(tmp_path, 'echo "args: $*"\n'))
    assert run_npu_smi_command(["info", "-t", "board", "-i", "0", "-c", "0"]) == "args: info -t board -i 0 -c 0\n"
    monkeypatch.setenv("PATH", fake_npu_smi(tmp_path, "echo 'dcmi module initialize failed' >&2\nexit 8\n"))
    with pytest.raises(NpuSmiFailed, match="exit status 8: dcmi module initialize failed"):
        run_npu_smi_command(["info"])
    with pytest.raises(BertoptError, match="`npu-smi info` failed"):
        detect_soc(None)


def test_the_runner_times_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", fake_npu_smi(tmp_path, "sleep 5\n"))
    monkeypatch.setattr(soc_module, "NPU_SMI_TIMEOUT", 0.2)
    with pytest.raises(NpuSmiFailed, match="timed out"):
        run_npu_smi_command(["info"])
