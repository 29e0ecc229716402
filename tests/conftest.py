"""Shared fixtures: tiny BERT exports (2 layers, hidden 32) in every variant the passes claim.

Exports go through bertopt's own exporter and its content cache ($BERTOPT_CACHE, else `.cache/` in
the checkout), so each variant is exported once per machine, not once per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

# name -> (exporter, opset, attention): the export variants of the facts note, section 2.
VARIANTS = {
    "legacy14": ("legacy", 14, "eager"),
    "legacy17": ("legacy", 17, "eager"),
    "sdpa14": ("legacy", 14, "sdpa"),
    "dynamo18": ("dynamo", 18, "eager"),
    "dynamo20": ("dynamo", 20, "eager"),
    "dynamo23sdpa": ("dynamo", 23, "sdpa"),
}
TINY_BATCH, TINY_SEQ = 2, 16

os.environ.setdefault("BERTOPT_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """tiny_export(variant, preset="bert-tiny", head="qa", **config_overrides) -> Path of a dynamic export."""
    from bertopt.flow.export import export_onnx, resolve_source

    folder = tmp_path_factory.mktemp("exports")
    made: dict[tuple, Path] = {}

    def export(variant: str = "legacy14", *, preset: str = "bert-tiny", head: str = "qa", **overrides) -> Path:
        key = (variant, preset, head, tuple(sorted(overrides.items())))
        if key not in made:
            exporter, opset, attention = VARIANTS[variant]
            source = resolve_source(preset, config_overrides=overrides)
            path = folder / f"{variant}-{head}-{len(made)}.onnx"
            made[key] = export_onnx(source, path, exporter=exporter, opset=opset, attention=attention,
                                    head=head).path
        return made[key]

    return export


@pytest.fixture(scope="session")
def onnxsim_export(tiny_export, tmp_path_factory):
    """The seed's step 2: onnxsim with fixed input shapes (MatMul+Add become Reshape -> Gemm -> Reshape)."""
    import onnx
    import onnxsim

    model = onnx.load(str(tiny_export("legacy14")))
    shapes = {tensor.name: [TINY_BATCH, TINY_SEQ] for tensor in model.graph.input}
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
    assert ok
    path = tmp_path_factory.mktemp("onnxsim") / "legacy14-sim.onnx"
    onnx.save(simplified, str(path))
    return path
