"""The CANN version as a target: version strings, the installed toolkit's version read from fixture folders
in the installer's real file formats, the per-version data and its sources, the model-level checks."""

import importlib.resources
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from bertopt.ascend import cann
from bertopt.ascend.cann import DEFAULT_VERSION, cann_target, known_versions, resolve_cann
from bertopt.ascend.legality import check_model_level
from bertopt.errors import BertoptError

# Copied from public logs quoting a real toolkit's files (a PyTorch-NPU issue; MindIE / vllm-ascend reports).
INSTALL_INFO_8_1 = """package_name=Ascend-cann-toolkit
version=8.1.RC1
innerversion=V100R001C21SPC001B212
compatible_version=[V100R001C15],[V100R001C18],[V100R001C19],[V100R001C20],[V100R001C21]
arch=x86_64
os=linux
path=/usr/local/Ascend/ascend-toolkit/8.1.RC1/x86_64-linux
"""
VERSION_CFG_8_0 = """# version: 1.0
runtime_running_version=[7.3.0.1.231:8.0.RC2]
compiler_running_version=[7.3.0.1.231:8.0.RC2]
hccl_running_version=[7.3.0.1.231:8.0.RC2]
opp_running_version=[7.3.0.1.231:8.0.RC2]
toolkit_running_version=[7.3.0.1.231:8.0.RC2]
aoe_running_version=[7.3.0.1.231:8.0.RC2]
"""


@pytest.mark.parametrize("typed, version", [
    ("6.0", "6.0"), ("6.0.1", "6.0"), ("6.0.RC1", "6.0"), ("6.3.RC2", "6.0"), ("5.0.4", "5.0"),
    ("7.0.0", "7.0"), ("8.0.RC2", "8.0"), ("8.0.0", "8.0"), ("8.5.0", "8.0"), ("9.0.0-beta.2", "9.0"),
])
def test_typed_versions_map_to_the_nearest_known_one_at_or_below(typed, version):
    assert cann_target(typed).version == version


@pytest.mark.parametrize("typed", ["4.0", "3.3.0", "CANN-1.83", "latest", ""])
def test_unknown_versions_are_refused_in_one_line_naming_the_known_ones(typed):
    with pytest.raises(BertoptError) as info:
        cann_target(typed)
    message = str(info.value)
    assert "\n" not in message and f"unknown CANN version {typed!r}" in message
    assert "5.0, 6.0, 7.0, 8.0, 9.0" in message


# --- where the version comes from ------------------------------------------------------------------------------

def _toolkit(root, *, info: str | None = None, cfg: str | None = None, arch: str = "x86_64"):
    """A toolkit home as the installer lays it out: <home>/<arch>-linux/ascend_toolkit_install.info, version.cfg."""
    root.mkdir(parents=True, exist_ok=True)
    if info is not None:
        (root / f"{arch}-linux").mkdir()
        (root / f"{arch}-linux" / "ascend_toolkit_install.info").write_text(info)
    if cfg is not None:
        (root / "version.cfg").write_text(cfg)
    return root


def test_option_wins_over_the_toolkit(tmp_path):
    home = _toolkit(tmp_path / "latest", info=INSTALL_INFO_8_1)
    assert _resolved("6.0.RC1", [home]) == ("6.0", "option")


def test_toolkit_install_info(tmp_path):
    home = _toolkit(tmp_path / "ascend-toolkit" / "latest", info=INSTALL_INFO_8_1, cfg=VERSION_CFG_8_0)
    assert _resolved(None, [home]) == ("8.0", "toolkit")


def test_cann_8_5_layout_on_aarch64(tmp_path):
    """From CANN 8.5 the toolkit installs under /usr/local/Ascend/cann/<arch>-linux/."""
    info = INSTALL_INFO_8_1.replace("8.1.RC1", "8.5.0").replace("x86_64", "aarch64")
    home = _toolkit(tmp_path / "Ascend" / "cann", info=info, arch="aarch64")
    assert _resolved(None, [tmp_path / "missing", home]) == ("8.0", "toolkit")


def test_version_cfg_when_there_is_no_install_info(tmp_path):
    cfg = VERSION_CFG_8_0.replace("7.3.0.1.231:8.0.RC2", "5.1.RC2.0.B070:6.0.1")  # inner number made up
    home = _toolkit(tmp_path / "latest", cfg=cfg)
    assert _resolved(None, [home]) == ("6.0", "toolkit")
    assert cann.installed_toolkit_version([home]) == ("6.0.1", home / "version.cfg")


def test_ascend_toolkit_home_is_searched_first(tmp_path, monkeypatch):
    exported = _toolkit(tmp_path / "cann-9.0.0", info=INSTALL_INFO_8_1.replace("8.1.RC1", "9.0.0"))
    monkeypatch.setattr(cann, "DEFAULT_TOOLKIT_HOMES", (_toolkit(tmp_path / "default", cfg=VERSION_CFG_8_0),))
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(exported))
    assert _resolved(None, None) == ("9.0", "toolkit")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME")
    assert _resolved(None, None) == ("8.0", "toolkit")


def test_no_toolkit_means_the_default(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _resolved(None, [empty, tmp_path / "missing"]) == (DEFAULT_VERSION, "default")


def test_a_toolkit_of_an_unknown_version_is_refused_naming_its_file(tmp_path):
    home = _toolkit(tmp_path / "latest", info=INSTALL_INFO_8_1.replace("8.1.RC1", "3.3.0"))
    with pytest.raises(BertoptError, match=r"the toolkit at .*x86_64-linux/ascend_toolkit_install.info reports "
                                           r"unknown CANN version '3.3.0'.*; pass --cann"):
        resolve_cann(None, [home])


def _resolved(option, homes) -> tuple[str, str]:
    target, source = resolve_cann(option, homes)
    return target.version, source


# --- the data --------------------------------------------------------------------------------------------------

FIELDS = ("opset_range", "ir_version", "operators", "layer_normalization", "precision_flags", "implmode_deprecated")


@pytest.mark.parametrize("version", known_versions())
def test_every_field_has_its_source(version):
    target = cann_target(version)
    assert set(FIELDS) <= set(target.sources)
    if target.operator_opsets:
        assert "operator_opsets" in target.sources


@pytest.mark.parametrize("version", known_versions())
def test_ir_version_and_opset_cap_follow_the_documented_onnx_release(version):
    """IR version and highest opset of the ONNX release the docs name, from onnx's own table."""
    target = cann_target(version)
    release = next(row for row in onnx.helper.VERSION_TABLE if row[0] == target.onnx_version)
    assert target.ir_version == release[1]
    assert target.opset_range[1] <= release[2]


@pytest.mark.parametrize("version", known_versions())
def test_every_list_has_what_bert_needs_and_no_gelu(version):
    bert = {"Add", "Cast", "Div", "Erf", "Expand", "Gather", "MatMul", "Mul", "Pow", "ReduceMean", "Reshape",
            "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where"}
    target = cann_target(version)
    assert bert <= target.operators
    assert not {"Gelu", "Attention", "FastGelu"} & target.operators
    assert ("LayerNormalization" in target.operators) == target.layer_normalization


def test_what_differs_between_versions():
    by_version = {v: cann_target(v) for v in known_versions()}
    assert {v for v, t in by_version.items() if t.layer_normalization} == {"8.0", "9.0"}
    assert {v: t.opset_range[1] for v, t in by_version.items()} == {"5.0": 13, "6.0": 13, "7.0": 17, "8.0": 17,
                                                                     "9.0": 17}
    assert {v for v, t in by_version.items() if "--precision_mode_v2" in t.precision_flags} == {"7.0", "8.0", "9.0"}
    assert {v for v, t in by_version.items() if t.implmode_deprecated} == {"9.0"}
    assert by_version["8.0"].opset_bounds("ReduceMean") == (8, 16)
    assert by_version["8.0"].opset_bounds("LayerNormalization") == (17, 17)


def test_operator_lists_name_onnx_ops_as_onnx_spells_them():
    data = json.loads(importlib.resources.files("bertopt").joinpath("data", "cann.json").read_text())
    huawei_plugins = {"AdaptiveAvgPool2D", "AdaptiveMaxPool2D", "Addcmul", "AscendAntiQuant", "AscendDequant",
                      "AscendDequantS16", "AscendQuant", "AscendRequant", "AscendRequantS16", "BatchMatMul",
                      "BatchMultiClassNMS", "Corr", "DeformableConv2D", "DynSeqOuter", "EmbeddingBag", "LSTMP",
                      "MovingSumWithSigmoid", "RoiExtractor"}
    for name, listed in data["operator_lists"].items():
        assert listed["source"].startswith("https://"), name
        assert all(onnx.defs.has(op) for op in set(listed["operators"]) - huawei_plugins), name


# --- model-level checks against a version -------------------------------------------------------------------------

def _layernorm_graph(opset: int, with_pooling: bool = False) -> gs.Graph:
    x = gs.Variable("x", np.float32, [2, 5, 8])
    y = gs.Variable("y", np.float32, [2, 5, 8])
    scale, bias = gs.Constant("gamma", np.ones(8, np.float32)), gs.Constant("beta", np.zeros(8, np.float32))
    nodes = [gs.Node("LayerNormalization", "ln", {"axis": -1}, [x, scale, bias], [y])]
    outputs = [y]
    if with_pooling:
        pooled = gs.Variable("pooled", np.float32, [2, 1, 8])
        nodes.append(gs.Node("ReduceMean", "pool", {"axes": [1]}, [y], [pooled]))
        outputs = [pooled]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=opset)
    graph.ir_version = 8
    return graph


def _failures(graph: gs.Graph, version: str) -> dict[str, str]:
    return {c.name: c.reason for c in check_model_level(graph, cann_target(version)) if c.ok is False}


def test_layernormalization_at_opset17_is_legal_for_8_0_not_for_6_0():
    graph = _layernorm_graph(17)
    assert _failures(graph, "8.0") == {}
    failures = _failures(graph, "6.0")
    assert failures == {
        "opset": "default-domain opset 17 outside CANN 6.0's 9-13",
        "ir-version": "IR version 8 > 7 (CANN 6.0, ONNX 1.8.0)",
        "layer-normalization": "1 LayerNormalization op(s): CANN 6.0 has none (legalize-ascend writes them "
                               "decomposed)"}


def test_an_op_outside_its_documented_opset_range_fails_naming_it():
    """CANN 8.0 documents ReduceMean for opsets 8-16: at 17 the check names it."""
    assert _failures(_layernorm_graph(17, with_pooling=True), "8.0") == {
        "operator-opsets": "at opset 17, CANN 8.0 does not take ReduceMean (opset 8-16)"}


def test_default_target_is_the_default_version():
    graph = _layernorm_graph(17)
    assert check_model_level(graph) == check_model_level(graph, cann_target(DEFAULT_VERSION))
