"""The atc invocation: argv rendering, atc.sh, soc detection, and our handling of the atc process.

A fake `atc` on PATH tests only bertopt's subprocess handling (argv, log streaming, exit codes); no
test claims an OM was compiled or validated.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from bertopt.ascend import atc as ascend
from bertopt.ascend.atc import AtcOptions, compile_om
from bertopt.ascend.soc import detect_soc, parse_npu_smi
from bertopt.errors import BertoptError

SEED_ARGV = ["atc", "--model", "onnx/bert_base_seq384_bs1_fix.onnx", "--output", "om/bert_base_seq384_bs1",
             "--framework", "5", "--log=error", "--soc_version", "Ascend310P3",
             "--optypelist_for_implmode=Gelu", "--op_select_implmode=high_performance"]

# `npu-smi info` as printed in the seed guide (two 310P3 cards).
NPU_SMI_310P3 = """\
+-------------------+-----------------+------------------------------------------------------+
| NPU     Name      | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device    | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===================+=================+======================================================+
| 0       310P3     | OK              | 15.8         42                0    / 0              |
| 0       0         | 0000:82:00.0    | 0            1074 / 21534                            |
+===================+=================+======================================================+
| 1       310P3     | OK              | 15.4         43                0    / 0              |
| 0       1         | 0000:89:00.0    | 0            1070 / 21534                            |
+===================+=================+======================================================+
"""


def seed_options(**overrides) -> AtcOptions:
    values = dict(model="onnx/bert_base_seq384_bs1_fix.onnx", output="om/bert_base_seq384_bs1")
    values.update(overrides)
    return AtcOptions(**values)


def test_defaults_render_the_seed_command():
    assert seed_options().argv() == SEED_ARGV


def test_dynamic_shapes_other_soc_precision_and_extra_flags():
    options = seed_options(soc_version="Ascend910B3", precision_mode="allow_mix_precision",
                           input_shape={"input_ids": (8, 128), "attention_mask": (8, 128)},
                           extra=("--debug_dir=dbg", "--keep_dtype=keep.cfg"))
    argv = options.argv()
    assert argv[argv.index("--soc_version") + 1] == "Ascend910B3"
    assert argv[-4:] == ["--precision_mode=allow_mix_precision",
                         "--input_shape=input_ids:8,128;attention_mask:8,128",
                         "--debug_dir=dbg", "--keep_dtype=keep.cfg"]


def test_implmode_flags_can_be_dropped():
    argv = seed_options(optypelist_for_implmode=None, op_select_implmode=None).argv()
    assert not any("implmode" in flag for flag in argv)


@pytest.mark.parametrize("flag, fragment", [("debug_dir=x", "start with '--'"),
                                            ("--soc_version=Ascend910B", "--soc"),
                                            ("--output=elsewhere", "sets --output itself")])
def test_extra_flags_are_checked(flag, fragment):
    with pytest.raises(BertoptError, match=fragment):
        seed_options(extra=(flag,))


def test_script_quotes_values_and_sources_cann_when_present(tmp_path):
    argv = seed_options(model="my model.onnx", input_shape={"input_ids": (1, 384), "attention_mask": (1, 384)}).argv()
    script = ascend.write_script(tmp_path, argv)
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert f"source {ascend.CANN_SET_ENV}" in text and f"if [ -f {ascend.CANN_SET_ENV} ]" in text
    [command] = [line for line in text.splitlines() if line.startswith("atc ")]
    assert shlex.split(command) == argv
    assert "'my model.onnx'" in command and "'--input_shape=input_ids:1,384;attention_mask:1,384'" in command


def test_soc_from_the_seed_npu_smi_table():
    assert parse_npu_smi(NPU_SMI_310P3) == "Ascend310P3"
    assert parse_npu_smi("npu-smi: command failed\n") is None


def test_soc_source_is_reported():
    assert detect_soc("Ascend910B", run_npu_smi=lambda: NPU_SMI_310P3) == ("Ascend910B", "option")
    assert detect_soc(None, run_npu_smi=lambda: NPU_SMI_310P3) == ("Ascend310P3", "npu-smi")
    assert detect_soc(None, run_npu_smi=lambda: None) == ("Ascend310P3", "default")
    assert detect_soc(None, run_npu_smi=lambda: "garbled") == ("Ascend310P3", "default")


# --------------------------------------------------------------------------- running atc

@pytest.fixture
def no_cann(monkeypatch, tmp_path):
    """PATH without any atc and no CANN set_env.sh: the machine this project runs on."""
    monkeypatch.setattr(ascend, "CANN_SET_ENV", tmp_path / "no-cann" / "set_env.sh")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return tmp_path


def fake_atc(folder: Path, exit_code: int, writes_om: bool) -> Path:
    """An executable named atc that records its argv, prints a log, maybe touches <--output>.om, exits."""
    folder.mkdir(exist_ok=True)
    lines = ["#!/bin/bash", 'printf "%s\\n" "$@" > "$FAKE_ATC_ARGV"']
    if exit_code:
        lines += ['for i in $(seq 1 30); do echo "ATC log line $i"; done', 'echo "E19999: fake failure" >&2']
    else:
        lines.append("echo 'ATC run success'")
    if writes_om:
        lines.append('prev=""; for a in "$@"; do [ "$prev" = "--output" ] && touch "$a.om"; prev="$a"; done')
    lines.append(f"exit {exit_code}")
    path = folder / "atc"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def install_fake_atc(root: Path, monkeypatch, exit_code: int, writes_om: bool) -> Path:
    """Put a fake atc first on PATH; returns a fresh output folder for compile_om."""
    fake_atc(root / "bin", exit_code, writes_om)
    monkeypatch.setenv("PATH", f"{root / 'bin'}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_ATC_ARGV", str(root / "argv.txt"))
    out = root / "out"
    out.mkdir()
    return out


def test_atc_not_found_writes_the_script_and_says_so(no_cann):
    out = no_cann / "out"
    out.mkdir()
    result = compile_om(out, seed_options(model="optimized.onnx", output="om/optimized"), "default")
    assert result.status == "not-found" and result.om is None
    assert (out / "atc.sh").is_file() and not (out / "atc.log").exists()
    assert "atc not found" in result.summary_line()
    assert result.to_dict()["argv"][0] == "atc" and "log_tail" not in result.to_dict()


def test_fake_atc_success_is_run_with_our_argv(no_cann, monkeypatch):
    out = install_fake_atc(no_cann, monkeypatch, 0, writes_om=True)
    lines = []
    options = seed_options(model="optimized.onnx", output="om/optimized")
    result = compile_om(out, options, "option", echo=lines.append)
    assert result.status == "ran" and result.om == (out / "om" / "optimized.om").resolve()
    assert (no_cann / "argv.txt").read_text().splitlines() == options.argv()[1:]
    assert lines == ["ATC run success"]
    assert result.to_dict()["soc_source"] == "option"


def test_fake_atc_failure_keeps_the_log_tail(no_cann, monkeypatch):
    out = install_fake_atc(no_cann, monkeypatch, 1, writes_om=False)
    result = compile_om(out, seed_options(model="optimized.onnx", output="om/optimized"), "default")
    assert result.status == "failed" and result.returncode == 1 and result.om is None
    assert len(result.log_tail) == ascend.LOG_TAIL_LINES and result.log_tail[-1] == "E19999: fake failure"
    assert "ATC log line 1\n" in (out / "atc.log").read_text()
    assert "exit code 1" in result.summary_line() and "E19999" in result.summary_line()
    assert result.to_dict()["log_tail"][-1] == "E19999: fake failure"


def test_atc_exiting_zero_without_an_om_is_a_failure(no_cann, monkeypatch):
    out = install_fake_atc(no_cann, monkeypatch, 0, writes_om=False)
    result = compile_om(out, seed_options(model="optimized.onnx", output="om/optimized"), "default")
    assert result.status == "failed" and "wrote no" in result.log_tail[-1]


def test_script_runs_under_bash(no_cann, monkeypatch):
    """atc.sh itself is valid bash: with a fake atc on PATH it reaches and runs the command."""
    bin_dir = no_cann / "bin"
    fake_atc(bin_dir, 0, writes_om=True)
    monkeypatch.setenv("FAKE_ATC_ARGV", str(no_cann / "argv.txt"))
    out = no_cann / "out"
    out.mkdir()
    script = ascend.write_script(out, seed_options(model="optimized.onnx", output="om/optimized").argv())
    done = subprocess.run(["bash", str(script)], env=dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin"),
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert (out / "om" / "optimized.om").exists()
