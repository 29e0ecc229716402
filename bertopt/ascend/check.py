"""`bertopt check --target ascend`: will ATC take this model, and will it fuse every attention block?

`check_ascend` inspects ANY ONNX file, not only bertopt's output, for one CANN version and one chip,
and reports three things, separately visible:

- per attention block (found by its Softmax), each of the six conditions of the standard form
  (bertopt.ascend.form), with a one-line reason when it fails;
- per attention block, the verdict of each of ATC's five fusions (bertopt.ascend.gates): fuses, not
  at this shape / chip / version (naming the gate and the numbers), or not in the form;
- model-level problems (bertopt.ascend.legality): opset, IR version, operators missing from ATC's
  ONNX operator list, `Shape` ops, dynamic input shapes, float constants outside the fp16 range.

`ConformanceReport.passed(require_fusion=True)` is `bertopt check`'s verdict: legal for the CANN
version and every block predicted to fuse. With `require_fusion=False` only legality counts (what
`bertopt run` requires unless asked for fusion). `failure_summary` names every gate that failed.
Without `soc` the seed's chip is assumed (and the report says so): a prediction, not a compilation.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import onnx
import onnx_graphsurgeon as gs

from bertopt.ascend.cann import CannTarget, resolve_cann
from bertopt.ascend.form import CONDITIONS, BlockReport, Check, check_blocks
from bertopt.ascend.gates import FUSIONS, FusionPrediction, predict_fusion
from bertopt.ascend.legality import check_model_level
from bertopt.ascend.soc import DEFAULT_SOC
from bertopt.errors import BertoptError
from bertopt.graph import ModelSource, infer_shapes, load_graph
from bertopt.model.facts import detect_facts


@dataclass
class ConformanceReport:
    model: str
    target: str
    facts: dict
    blocks: list[BlockReport]
    model_checks: list[Check]
    cann: str
    soc: str
    soc_assumed: bool  # no soc was given: the seed's chip stands in
    fusion: FusionPrediction

    @property
    def blocks_conforming(self) -> bool:
        """Every attention block is in the standard form ATC fuses."""
        return bool(self.blocks) and all(block.conforming for block in self.blocks)

    @property
    def model_conforming(self) -> bool:
        """No model-level problem (a skipped check is not a problem): legal for the CANN version."""
        return all(check.ok is not False for check in self.model_checks)

    @property
    def conforming(self) -> bool:
        """In the standard form and legal (whatever the kernels' shape gates say)."""
        return self.blocks_conforming and self.model_conforming

    @property
    def fusion_predicted(self) -> bool:
        """Every block predicted to fuse in all five of ATC's passes."""
        return self.fusion.all_fuse

    def passed(self, require_fusion: bool = True) -> bool:
        """Legal for the CANN version and, when `require_fusion`, every block predicted to fuse."""
        return self.model_conforming and (self.fusion_predicted or not require_fusion)

    def failing_conditions(self) -> set[str]:
        """Names of the block conditions that fail in at least one block."""
        return {name for block in self.blocks for name in block.failing()}

    def failure_summary(self, require_fusion: bool = True) -> list[str]:
        """One line per failed gate: model-level checks, then the fusions (empty when `passed`)."""
        lines = [f"{check.name}: {check.reason}" for check in self.model_checks if check.ok is False]
        if require_fusion:
            if not self.blocks:
                lines.append("no attention block found")
            lines += self.fusion.failures()
        return lines

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "cann": self.cann, "soc": self.soc,
                "soc_assumed": self.soc_assumed, "passed": self.passed(), "legal": self.model_conforming,
                "fusion_predicted": self.fusion_predicted, "conforming": self.conforming,
                "blocks_conforming": self.blocks_conforming, "model_conforming": self.model_conforming,
                "facts": self.facts,
                "blocks": [{**asdict(block), "conforming": block.conforming} for block in self.blocks],
                "fusion": self.fusion.to_dict(),
                "model_checks": [asdict(check) for check in self.model_checks]}

    def render(self) -> str:
        """Readable tables: the form per block, the fusion verdicts per block, the model-level checks."""
        verdict = "conforming" if self.conforming else "NOT conforming"
        good = sum(block.conforming for block in self.blocks)
        chip = f"{self.soc} (assumed: no --soc)" if self.soc_assumed else self.soc
        lines = [f"{self.model}: {verdict} for {self.target}, CANN {self.cann}, {chip}",
                 f"attention blocks: {good} of {len(self.blocks)} in the standard form ATC fuses"]
        width = max(len(name) for name in CONDITIONS)
        for block in self.blocks:
            for check in block.checks:
                lines.append(f"  layer {block.layer:<3} {check.name:<{width}}  {_status(check):<4}  "
                             f"{check.reason}")
        fused = sum(block.fuses for block in self.fusion.blocks)
        lines.append(f"fusion prediction: {fused} of {len(self.fusion.blocks)} blocks fuse in all of ATC's "
                     f"passes ({self.fusion.gate_note})")
        lines += self._fusion_rows()
        lines.append("model checks:")
        width = max(len(check.name) for check in self.model_checks)
        lines += [f"  {check.name:<{width}}  {_status(check):<4}  {check.reason}"
                  for check in self.model_checks]
        return "\n".join(lines)

    __str__ = render

    def _fusion_rows(self) -> list[str]:
        width = max(len(name) for name in FUSIONS)
        grouped = self.fusion.grouped()
        blocks_width = max((len(blocks) for blocks, _ in grouped), default=0)
        return [f"  {blocks:<{blocks_width}}  {v.fusion:<{width}}  {v.verdict:<5}  {v.line()}" for blocks, v in grouped]


def _status(check: Check) -> str:
    return {True: "ok", False: "fail", None: "skip"}[check.ok]


def check_ascend(source: ModelSource | gs.Graph, *, cann: CannTarget | None = None,
                 soc: str | None = None) -> ConformanceReport:
    """Check a model (path, ModelProto or gs graph) against what `cann`'s ATC wants on `soc`.

    `cann` defaults to the installed toolkit's version, else the seed's (bertopt.ascend.cann.resolve_cann);
    `soc` to the seed's chip. Raises BertoptError when the file is not ONNX or the graph is not a
    BERT-family encoder.
    """
    target = cann if cann is not None else resolve_cann(None)[0]
    if isinstance(source, gs.Graph):
        graph, name = source.copy(), source.name or "graph"
    else:
        graph = load_graph(source)
        name = os.fspath(source) if not isinstance(source, onnx.ModelProto) else (source.graph.name or "model")
    facts = detect_facts(graph)
    try:
        infer_shapes(graph)
    except onnx.shape_inference.InferenceError as exc:
        raise BertoptError(f"{name}: ONNX shape inference fails: {str(exc).strip().splitlines()[0]}") from None
    blocks = check_blocks(graph, facts)
    chip = soc or DEFAULT_SOC
    return ConformanceReport(model=name, target="ascend",
                             facts={k: facts.to_dict()[k] for k in ("num_layers", "hidden", "heads",
                                                                   "head_dim", "batch", "seq", "opset")},
                             blocks=blocks, model_checks=check_model_level(graph, target), cann=target.version,
                             soc=chip, soc_assumed=soc is None,
                             fusion=predict_fusion(graph, facts, blocks, target, chip))
