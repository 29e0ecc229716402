"""`bertopt run` for the Ascend target end to end: the CANN version decides the output, and where atc and
ais_bench exist the run compares the OM and reads what ATC fused.

There is no CANN here. The doubles live in tests/ and are labelled: a fake `atc` that "compiles" by copying
the ONNX file where the OM goes and leaves a fusion_result.json fixture in its working directory, and
ais_bench's InferSession double (tests/ais_bench_double.py), which runs that copy on ONNX Runtime behind
ais_bench's interface, OM output names `<op>:<index>:<name>` included. They test bertopt's side only.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from ais_bench_double import InferSession2022, session_factory
from test_cli import bertopt

from bertopt.ascend.layernorm import decomposed_layernorm_pattern
from bertopt.flow.run import RunConfig, run
from bertopt.graph import load_graph
from bertopt.validation.backends import npu

FUSION_RESULTS = Path(__file__).parent / "data" / "fusion_result"
# The smallest BERT whose attention passes ATC's big-kernel gates (hidden 768, 12 heads of 64; at batch 12,
# seq 128: batch*seq 1536, seq % 32 == 0, batch*heads % 8 == 0): one layer keeps it quick.
GATE_SIZED = dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=1, intermediate_size=256)
GATE_BATCH, GATE_SEQ = 12, 128


def opset_and_ops(path: Path) -> tuple[int, set[str]]:
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return opset, {node.op_type for node in model.graph.node}


def test_a_dynamo_opset_18_export_through_cann_6_is_opset_13_without_layernormalization(tmp_path):
    out = tmp_path / "o"
    result = bertopt("run", "bert-tiny", "--exporter", "dynamo", "--opset", "18", "--cann", "6.0",
                     "--batch", "2", "--seq", "16", "--output", str(out))
    assert result.returncode == 0, result.stderr
    opset, ops = opset_and_ops(out / "optimized.onnx")
    assert opset <= 13 and "LayerNormalization" not in ops
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] and report["check"]["legal"] and report["check"]["blocks_conforming"]
    assert report["atc"]["cann"] == {"version": "6.0", "source": "option"}
    graph = load_graph(out / "optimized.onnx")
    assert len(decomposed_layernorm_pattern().find_all(graph)) == 5, "every LayerNorm in the form ATC fuses"


def test_cann_8_keeps_layernormalization_and_opset_17(tmp_path):
    out = tmp_path / "o"
    result = bertopt("run", "bert-tiny", "--exporter", "dynamo", "--opset", "18", "--cann", "8.0",
                     "--batch", "2", "--seq", "16", "--output", str(out), "--target", "ascend")
    assert result.returncode == 0, result.stderr
    opset, ops = opset_and_ops(out / "optimized.onnx")
    report = json.loads((out / "report.json").read_text())
    assert report["check"]["legal"] and report["check"]["cann"] == "8.0"
    assert 13 < opset <= 17 and "LayerNormalization" in ops


# --------------------------------------------------------------------------- with atc and ais_bench (doubles)

def fake_atc(folder: Path, fusion_result: Path) -> None:
    """`atc` that copies --model to <--output>.om and leaves `fusion_result` in its working directory."""
    folder.mkdir()
    script = folder / "atc"
    script.write_text("\n".join([
        "#!/bin/bash",
        "echo 'ATC start working now, please wait for a moment.'",
        'model=""; output=""; prev=""',
        'for a in "$@"; do [ "$prev" = "--model" ] && model="$a"; [ "$prev" = "--output" ] && output="$a"; '
        'prev="$a"; done',
        'cp "$model" "$output.om"',
        f"cp {fusion_result} fusion_result.json",
        "echo 'ATC run success, welcome to the next use.'",
        ""]))
    script.chmod(0o755)


@pytest.fixture
def device(monkeypatch, tmp_path):
    """atc and ais_bench 'present' (both doubles) and a device node 'present'; returns a fusion_result chooser."""
    def install(fusion_result: str) -> None:
        fake_atc(tmp_path / "bin", FUSION_RESULTS / fusion_result)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
        shapes = {name: (GATE_BATCH, GATE_SEQ) for name in ("input_ids", "attention_mask", "token_type_ids")}
        monkeypatch.setattr(npu, "ais_bench_session_class", lambda: session_factory(InferSession2022, shapes=shapes))
        monkeypatch.setattr(npu, "npu_device_present", lambda device_id: True)

    return install


def gate_sized_run(tiny_export, out: Path) -> "RunReport":  # noqa: F821
    model = tiny_export("legacy14", **GATE_SIZED)
    return run(RunConfig(model=str(model), batch=GATE_BATCH, seq=GATE_SEQ, output=out, cann="6.0",
                         soc="Ascend310P3"))


def test_the_om_is_compared_by_position_and_the_predicted_fusions_confirmed(tiny_export, device, tmp_path):
    device("cann8_bert_base_fused.json")
    report = gate_sized_run(tiny_export, tmp_path / "o")
    assert report.ascend.check.fusion_predicted, report.ascend.check.failure_summary()
    assert report.atc.status == "ran" and report.ascend.fusion is not None
    [om] = [c for c in report.validation if c.kind == "npu"]
    assert om.passed is True, om.error or om.comparison.summary_line()
    assert [o.name for o in om.comparison.outputs] == ["start_logits", "end_logits"]
    assert report.failures() == []
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["atc"]["fusion"]["graph_fusion"]["ZAttentionScoreFusionPass"]["effect_times"] >= 1


def test_a_fusion_result_without_the_attention_passes_fails_a_run_predicted_to_fuse(tiny_export, device, tmp_path):
    device("cann8_bert_base_unfused.json")
    report = gate_sized_run(tiny_export, tmp_path / "o")
    failures = report.failures()
    assert any("ZAttentionLnQKVONNXFusionPass" in line and "took no effect" in line for line in failures), failures
