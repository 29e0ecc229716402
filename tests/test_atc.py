"""The atc invocation: argv rendering, flags by CANN version, atc.sh, and our handling of the atc process.

A fake `atc` on PATH tests only bertopt's subprocess handling (argv, log streaming, exit codes); no
test claims an OM was compiled or validated.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bertopt.ascend import atc as ascend
from bertopt.ascend.atc import AtcOptions, compile_om
from bertopt.ascend.cann import cann_target
from bertopt.errors import BertoptError

SEED_ARGV = ["atc", "--model", "onnx/bert_base_seq384_bs1_fix.onnx", "--output", "om/bert_base_seq384_bs1",
             "--framework", "5", "--log=error", "--soc_version", "Ascend310P3",
             "--optypelist_for_implmode=Gelu", "--op_select_implmode=high_performance"]

# What ATC writes (current layout, CANN 8.0-9.x; see tests/data/fusion_result/ for all three).
FUSION_FIXTURE = Path(__file__).parent / "data" / "fusion_result" / "cann8_bert_base_fused.json"

def seed_options(**overrides) -> AtcOptions:
    values = dict(model="onnx/bert_base_seq384_bs1_fix.onnx", output="om/bert_base_seq384_bs1")
    values.update(overrides)
    return AtcOptions(**values)


def test_defaults_render_the_seed_command():
    assert seed_options().argv() == SEED_ARGV


def test_dynamic_shapes_other_soc_and_extra_flags_after_bertopts():
    options = seed_options(soc_version="Ascend910B3", input_shape={"input_ids": (8, 128), "attention_mask": (8, 128)},
                           extra=("--precision_mode=allow_mix_precision", "--debug_dir=dbg"))
    argv = options.argv()
    assert argv[argv.index("--soc_version") + 1] == "Ascend910B3"
    assert argv[-3:] == ["--input_shape=input_ids:8,128;attention_mask:8,128",
                         "--precision_mode=allow_mix_precision", "--debug_dir=dbg"]
    assert options.overrides() == {} and options.precision() == ("--precision_mode", "allow_mix_precision")


def test_the_gelu_kernel_is_a_choice():
    options = seed_options(gelu_impl="high_precision")
    assert "--op_select_implmode=high_precision" in options.argv() and options.gelu_mode() == "high_precision"
    with pytest.raises(BertoptError, match="--gelu-impl"):
        seed_options(gelu_impl="fast")


def test_where_implmode_flags_are_deprecated_an_op_precision_ini_chooses_the_gelu_kernel(tmp_path):
    options = seed_options(cann=replace(cann_target("6.0"), implmode_deprecated=True), gelu_impl="high_precision")
    argv = options.argv()
    assert not any("implmode" in flag for flag in argv)
    assert f"--op_precision_mode=../{ascend.OP_PRECISION_INI}" in argv
    assert options.files() == {ascend.OP_PRECISION_INI: "[ByOpType]\nGelu=high_precision\n"}
    ascend.write_script(tmp_path, options)
    assert (tmp_path / ascend.OP_PRECISION_INI).read_text() == "[ByOpType]\nGelu=high_precision\n"


def test_a_flag_bertopt_sets_takes_the_users_value_and_says_so():
    options = seed_options(extra=("--op_select_implmode=high_precision", "--log=info", "--debug_dir=dbg"))
    argv = options.argv()
    assert "--op_select_implmode=high_precision" in argv and "--op_select_implmode=high_performance" not in argv
    assert "--log=info" in argv and argv.count("--log=info") == 1 and argv[-1] == "--debug_dir=dbg"
    assert options.overrides() == {"--op_select_implmode": {"bertopt": "high_performance", "user": "high_precision"},
                                   "--log": {"bertopt": "error", "user": "info"}}
    assert options.gelu_mode() == "high_precision"


def test_spaced_flags_keep_their_form_when_overridden():
    argv = seed_options(extra=("--soc_version=Ascend910B3",)).argv()
    assert argv[argv.index("--soc_version") + 1] == "Ascend910B3"


def test_gelu_mode_is_unknown_when_the_user_takes_gelu_out_of_the_implmode_list_or_brings_an_ini():
    assert seed_options(extra=("--optypelist_for_implmode=SoftmaxV2",)).gelu_mode() is None
    assert seed_options(extra=("--op_precision_mode=mine.ini",)).gelu_mode() is None


@pytest.mark.parametrize("flags, fragment", [(("debug_dir=x",), "start with '--'"),
                                             (("--precision_mode=force_fp16", "--precision_mode_v2=fp16"),
                                              "mutually exclusive")])
def test_extra_flags_are_checked(flags, fragment):
    with pytest.raises(BertoptError, match=fragment):
        seed_options(extra=flags)


def test_a_precision_flag_the_cann_version_lacks_is_refused():
    target = cann_target("6.0")
    if "--precision_mode_v2" in target.precision_flags:
        pytest.skip("this CANN version has --precision_mode_v2")
    with pytest.raises(BertoptError, match="no such flag"):
        seed_options(cann=target, extra=("--precision_mode_v2=fp16",))


def test_script_runs_atc_in_a_fresh_work_dir_quotes_values_and_sources_cann(tmp_path):
    options = seed_options(model="../my model.onnx", input_shape={"input_ids": (1, 384), "attention_mask": (1, 384)})
    script = ascend.write_script(tmp_path, options)
    text = script.read_text()
    assert os.access(script, os.X_OK) and oct(script.stat().st_mode & 0o777) == "0o755"
    assert f"source {ascend.CANN_SET_ENV}" in text and f"if [ -f {ascend.CANN_SET_ENV} ]" in text
    assert f"rm -rf {ascend.WORK_DIR} && mkdir {ascend.WORK_DIR} && cd {ascend.WORK_DIR}" in text
    [command] = [line for line in text.splitlines() if line.startswith("atc ")]
    assert shlex.split(command) == options.argv()
    assert "'../my model.onnx'" in command and "'--input_shape=input_ids:1,384;attention_mask:1,384'" in command


# --------------------------------------------------------------------------- running atc

@pytest.fixture
def no_cann(monkeypatch, tmp_path):
    """PATH without any atc and no CANN set_env.sh: the machine this project runs on."""
    monkeypatch.setattr(ascend, "CANN_SET_ENV", tmp_path / "no-cann" / "set_env.sh")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return tmp_path


def fake_atc(folder: Path, exit_code: int, writes_om: bool) -> Path:
    """An executable named atc that records its argv, prints ATC's console lines, maybe touches <--output>.om
    and leaves a fusion_result.json in its working directory as ATC does, then exits."""
    folder.mkdir(exist_ok=True)
    lines = ["#!/bin/bash", 'printf "%s\\n" "$@" > "$FAKE_ATC_ARGV"']
    if exit_code:
        lines += ["echo 'ATC start working now, please wait for a moment.'",
                  'for i in $(seq 1 30); do echo "ATC log line $i"; done',
                  "echo \"ATC run failed, Please check the detail log, Try 'atc --help' for more information\"",
                  'echo "E10001: Value [-1] for parameter [input_ids] is invalid." >&2',
                  'for i in $(seq 1 18); do echo "    TraceBack line $i"; done',
                  'echo "E19999: Inner Error!" >&2']
    else:
        lines += ["echo 'ATC start working now, please wait for a moment.'",
                  f"cp {FUSION_FIXTURE} fusion_result.json",
                  "echo 'ATC run success, welcome to the next use.'"]
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


def run_options(**overrides) -> AtcOptions:
    return seed_options(model="../optimized.onnx", output="../om/optimized", **overrides)


def test_atc_not_found_writes_the_script_and_says_so(no_cann):
    out = no_cann / "out"
    out.mkdir()
    result = compile_om(out, run_options(), "default", "default")
    assert result.status == "not-found" and result.om is None
    assert (out / "atc.sh").is_file() and not (out / "atc.log").exists()
    assert "atc not found" in result.summary_line()
    assert result.to_dict()["argv"][0] == "atc" and "log_tail" not in result.to_dict()
    assert result.to_dict()["cann"] == {"version": "6.0", "source": "default"}


def test_fake_atc_success_is_run_with_our_argv_and_its_fusion_result_found(no_cann, monkeypatch):
    out = install_fake_atc(no_cann, monkeypatch, 0, writes_om=True)
    lines = []
    options = run_options(extra=("--log=info",))
    result = compile_om(out, options, "option", "toolkit", echo=lines.append)
    assert result.status == "ran" and result.om == (out / "om" / "optimized.om").resolve()
    assert (no_cann / "argv.txt").read_text().splitlines() == options.argv()[1:]
    assert lines == ["ATC start working now, please wait for a moment.", "ATC run success, welcome to the next use."]
    assert result.fusion_result == out / ascend.WORK_DIR / ascend.FUSION_RESULT
    data = result.to_dict()
    assert data["soc_source"] == "option" and data["cann"]["source"] == "toolkit"
    assert data["overrides"] == {"--log": {"bertopt": "error", "user": "info"}}


def test_fake_atc_failure_keeps_the_log_tail_and_the_error_codes(no_cann, monkeypatch):
    out = install_fake_atc(no_cann, monkeypatch, 1, writes_om=False)
    result = compile_om(out, run_options(), "default", "default")
    assert result.status == "failed" and result.returncode == 1 and result.om is None
    assert len(result.log_tail) == ascend.LOG_TAIL_LINES and result.log_tail[-1].startswith("E19999")
    assert result.error_codes == ["E10001", "E19999"]
    assert "ATC log line 1\n" in (out / "atc.log").read_text()
    assert "exit code 1 [E10001, E19999]" in result.summary_line()
    assert result.to_dict()["error_codes"] == ["E10001", "E19999"]


def test_atc_exiting_zero_without_an_om_is_a_failure(no_cann, monkeypatch):
    out = install_fake_atc(no_cann, monkeypatch, 0, writes_om=False)
    result = compile_om(out, run_options(), "default", "default")
    assert result.status == "failed" and "wrote no" in result.log_tail[-1]


def test_a_fusion_result_from_an_earlier_run_is_not_taken_for_this_ones(tmp_path, monkeypatch):
    shared = tmp_path / "ascend-work"
    old = shared / "FE" / "111" / ascend.FUSION_RESULT
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    monkeypatch.setenv("ASCEND_WORK_PATH", str(shared))
    since = old.stat().st_mtime + 1
    assert ascend.find_fusion_result(tmp_path / "work", since) is None
    new = shared / "FE" / "222" / ascend.FUSION_RESULT
    new.parent.mkdir()
    new.write_text("{}")
    os.utime(new, (since + 1, since + 1))
    assert ascend.find_fusion_result(tmp_path / "work", since) == new


def test_script_runs_under_bash(no_cann, monkeypatch):
    """atc.sh itself is valid bash: with a fake atc on PATH it reaches and runs the command."""
    bin_dir = no_cann / "bin"
    fake_atc(bin_dir, 0, writes_om=True)
    monkeypatch.setenv("FAKE_ATC_ARGV", str(no_cann / "argv.txt"))
    out = no_cann / "out"
    out.mkdir()
    script = ascend.write_script(out, run_options())
    done = subprocess.run(["bash", str(script)], env=dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin"),
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert (out / "om" / "optimized.om").exists() and (out / ascend.WORK_DIR / ascend.FUSION_RESULT).exists()
