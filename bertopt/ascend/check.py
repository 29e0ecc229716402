"""`bertopt check --target ascend`: is an ONNX model in the form ATC compiles well?

`check_ascend` inspects ANY ONNX file, not only bertopt's output, and reports two things, separately
visible:

- per attention block (found by its Softmax), each of the six conditions of the standard form
  (bertopt.ascend.form), with a one-line reason when it fails;
- model-level problems (bertopt.ascend.legality): opset, IR version, operators missing from ATC's
  ONNX operator list, `Shape` ops, dynamic input shapes, float constants outside the fp16 range.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import onnx
import onnx_graphsurgeon as gs

from bertopt.ascend.form import CONDITIONS, BlockReport, Check, check_blocks
from bertopt.ascend.legality import check_model_level
from bertopt.errors import BertoptError
from bertopt.facts import detect_facts
from bertopt.graph import ModelSource, infer_shapes, load_graph, load_model


@dataclass
class ConformanceReport:
    model: str
    target: str
    facts: dict
    blocks: list[BlockReport]
    model_checks: list[Check]

    @property
    def blocks_conforming(self) -> bool:
        """Every attention block is in the standard form ATC fuses."""
        return bool(self.blocks) and all(block.conforming for block in self.blocks)

    @property
    def model_conforming(self) -> bool:
        """No model-level problem (a skipped check is not a problem)."""
        return all(check.ok is not False for check in self.model_checks)

    @property
    def conforming(self) -> bool:
        return self.blocks_conforming and self.model_conforming

    def failing_conditions(self) -> set[str]:
        """Names of the block conditions that fail in at least one block."""
        return {name for block in self.blocks for name in block.failing()}

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "conforming": self.conforming,
                "blocks_conforming": self.blocks_conforming, "model_conforming": self.model_conforming,
                "facts": self.facts,
                "blocks": [{**asdict(block), "conforming": block.conforming} for block in self.blocks],
                "model_checks": [asdict(check) for check in self.model_checks]}

    def render(self) -> str:
        """A readable table: layer, condition, ok/fail, reason; then the model-level checks."""
        verdict = "conforming" if self.conforming else "NOT conforming"
        good = sum(block.conforming for block in self.blocks)
        lines = [f"{self.model}: {verdict} for {self.target}",
                 f"attention blocks: {good} of {len(self.blocks)} in the standard form ATC fuses"]
        width = max(len(name) for name in CONDITIONS)
        for block in self.blocks:
            for check in block.checks:
                lines.append(f"  layer {block.layer:<3} {check.name:<{width}}  {_status(check):<4}  "
                             f"{check.reason}")
        lines.append("model checks:")
        width = max(len(check.name) for check in self.model_checks)
        lines += [f"  {check.name:<{width}}  {_status(check):<4}  {check.reason}"
                  for check in self.model_checks]
        return "\n".join(lines)

    __str__ = render


def _status(check: Check) -> str:
    return {True: "ok", False: "fail", None: "skip"}[check.ok]


def check_ascend(source: ModelSource | gs.Graph) -> ConformanceReport:
    """Check a model (path, ModelProto or gs graph) against what ATC wants.

    Raises BertoptError when the file is not ONNX or the graph is not a BERT-family encoder.
    """
    if isinstance(source, gs.Graph):
        graph, name = source.copy(), source.name or "graph"
    else:
        model = load_model(source)
        graph = load_graph(model)
        name = os.fspath(source) if not isinstance(source, onnx.ModelProto) else (model.graph.name or "model")
    facts = detect_facts(graph)
    try:
        infer_shapes(graph)
    except onnx.shape_inference.InferenceError as exc:
        raise BertoptError(f"{name}: ONNX shape inference fails: {str(exc).strip().splitlines()[0]}") from None
    return ConformanceReport(model=name, target="ascend",
                             facts={k: facts.to_dict()[k] for k in ("num_layers", "hidden", "heads",
                                                                   "head_dim", "batch", "seq", "opset")},
                             blocks=check_blocks(graph, facts), model_checks=check_model_level(graph))
