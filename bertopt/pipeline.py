"""The pass registry and the PassManager that runs a pipeline of passes with instruments around each.

A pass is a function `run(graph, facts, options) -> PassResult` registered with `@register_pass`. It
edits the gs graph in place and says what it changed; a pass that finds nothing to do returns
`PassResult.no_change(reason)` and must leave the graph as it was.

Instruments (MLIR's verify-each / print-ir-after-change and TVM's PassInstrument are the models):
verification after every pass, timing and change counts, before/after dumps of passes that changed
something, optional numeric parity after every pass, and a reproducer when a pass fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import onnx
import onnx_graphsurgeon as gs

from bertopt.ascend.cann import DEFAULT_VERSION, CannTarget, cann_target
from bertopt.errors import BertoptError, CheckFailed
from bertopt.facts import ModelFacts
from bertopt.graph import is_static, save_graph, verify

REQUIREMENTS = {
    "static-shapes": "every graph input has a static shape (run freeze-shapes first)",
}


@dataclass
class PassOptions:
    """Settings a pass may read. Passes ignore what they do not use."""

    batch: int = 1
    seq: int = 384
    target: str = "ascend"
    mask_value: float = -10000.0
    cann: CannTarget = field(default_factory=lambda: cann_target(DEFAULT_VERSION))  # legalize-ascend's target


@dataclass
class PassResult:
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def no_change(cls, reason: str) -> "PassResult":
        return cls(changed=False, notes=[reason])


PassFn = Callable[[gs.Graph, ModelFacts, PassOptions], PassResult]


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    run: PassFn
    requires: tuple[str, ...] = ()


_REGISTRY: dict[str, PassInfo] = {}

# Named pipelines, one per target; `default` in a spec means the pipeline of the run's target.
PIPELINES: dict[str, list[str]] = {
    "ascend": ["freeze-shapes", "fold-attention-mask", "fuse-gelu", "layernorm-for-atc", "attention-bigkernel",
               "legalize-ascend"],
    "ort": ["freeze-shapes", "fold-attention-mask", "fuse-gelu", "legalize-ort"],
}
DEFAULT = "default"


def register_pass(name: str, summary: str, requires: tuple[str, ...] = ()) -> Callable[[PassFn], PassFn]:
    """Register `run(graph, facts, options) -> PassResult` under `name`."""
    unknown = set(requires) - REQUIREMENTS.keys()
    if unknown:
        raise ValueError(f"pass {name}: unknown requirement(s) {sorted(unknown)}")

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ValueError(f"pass {name!r} is registered twice")
        _REGISTRY[name] = PassInfo(name, summary, fn, tuple(requires))
        return fn

    return decorate


def registered_passes() -> dict[str, PassInfo]:
    _import_pass_modules()
    return dict(_REGISTRY)


def _import_pass_modules() -> None:
    import bertopt.passes as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def parse_spec(spec: str, target: str = "ascend") -> list[str]:
    """`default`, `a,b,c`, `default,-name`, `ort,extra`: a list of registered pass names.

    `default` is the pipeline of `target`; a pipeline's own name (`ascend`, `ort`) also works.
    """
    passes = registered_passes()
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.startswith("-"):
            removed = item[1:]
            if removed not in names:
                raise BertoptError(f"--passes {spec!r}: cannot remove {removed!r}, it is not in the pipeline")
            names.remove(removed)
        elif item == DEFAULT or item in PIPELINES:
            names.extend(PIPELINES[target if item == DEFAULT else item])
        elif item in passes:
            names.append(item)
        else:
            known = ", ".join(sorted(passes) + [DEFAULT] + sorted(PIPELINES))
            raise BertoptError(f"--passes {spec!r}: unknown pass {item!r} (known: {known})")
    if not names:
        raise BertoptError(f"--passes {spec!r} names no pass")
    return names


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    verify_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parity_max_abs: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ParityProbe(Protocol):
    """Compares the graph after a pass with the original; returns (passed, max abs diff, summary)."""

    def __call__(self, graph: gs.Graph, facts: ModelFacts) -> tuple[bool, float, str]: ...


@dataclass
class Instruments:
    verify_each: bool = True
    dump_dir: Path | None = None
    parity_probe: ParityProbe | None = None
    reproducer_dir: Path | None = None
    on_pass_start: Callable[[str], None] | None = None
    # (index, name, graph before, graph after) of a pass that changed something, called while both are
    # alive: what needs them (the HTML report's pictures) keeps what it draws, not a copy of each graph.
    on_pass_changed: Callable[[int, str, gs.Graph, gs.Graph], None] | None = None


class PassFailed(CheckFailed):
    """A pass raised, or left a graph the checker rejects. The message names the pass."""


class PassManager:
    def __init__(self, spec: str, options: PassOptions | None = None, instruments: Instruments | None = None):
        self.spec = spec
        self.options = options or PassOptions()
        self.names = parse_spec(spec, self.options.target)
        self.instruments = instruments or Instruments()
        self._passes = registered_passes()

    def run(self, graph: gs.Graph, facts: ModelFacts) -> tuple[ModelFacts, list[PassRecord]]:
        """Run every pass in order on `graph` (edited in place). Returns the updated facts and records."""
        records = []
        for index, name in enumerate(self.names):
            info = self._passes[name]
            self._check_requirements(info, graph, facts)
            if self.instruments.on_pass_start:
                self.instruments.on_pass_start(name)
            record, facts = self._run_one(index, info, graph, facts)
            records.append(record)
        return facts, records

    def _run_one(self, index: int, info: PassInfo, graph: gs.Graph, facts: ModelFacts):
        before = graph.copy()
        start = time.perf_counter()
        try:
            result = info.run(graph, facts, self.options)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        except BertoptError as exc:  # the same kind (bad input, exit 2, or a failed check, exit 1), named
            raise type(exc)(f"pass {info.name}: {exc}") from None
        except Exception as exc:
            raise self._failure(index, info.name, before, f"raised {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        record = PassRecord(info.name, result.changed, seconds, counts=result.counts, notes=result.notes)
        if result.changed:
            facts = facts.refreshed(graph)
            record.verify_seconds = self._verify(index, info.name, before, graph)
            self._dump(index, info.name, before, graph)
            if self.instruments.on_pass_changed:
                self.instruments.on_pass_changed(index, info.name, before, graph)
            self._probe_parity(index, info.name, before, graph, facts, record)
        return record, facts

    def _check_requirements(self, info: PassInfo, graph: gs.Graph, facts: ModelFacts) -> None:
        dynamic = [t for t in graph.inputs if not is_static(t)]
        if "static-shapes" not in info.requires or not dynamic:
            return
        roleless = [t for t in dynamic if facts.roles and t.name not in facts.roles]
        if roleless:
            dims = roleless[0].shape
            shape = f"[{', '.join(map(str, dims))}]" if dims is not None else "of unknown shape"
            raise BertoptError(f"pass {info.name} requires static shapes, but input {roleless[0].name} {shape} "
                               "has no static shape: freeze-shapes fixes only the inputs it knows the role of "
                               f"({', '.join(sorted(facts.roles))}); give a model whose other inputs are static")
        raise BertoptError(f"pass {info.name} requires that {REQUIREMENTS['static-shapes']}")

    def _verify(self, index: int, name: str, before: gs.Graph, graph: gs.Graph) -> float:
        if not self.instruments.verify_each:
            return 0.0
        start = time.perf_counter()
        try:
            verify(graph)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise self._failure(index, name, before, f"left an invalid graph: {first_line}") from None
        return time.perf_counter() - start

    def _dump(self, index: int, name: str, before: gs.Graph, after: gs.Graph) -> None:
        folder = self.instruments.dump_dir
        if folder is None:
            return
        save_graph(before, Path(folder) / f"{index:02d}-{name}.before.onnx")
        save_graph(after, Path(folder) / f"{index:02d}-{name}.after.onnx")

    def _probe_parity(self, index, name, before, graph, facts, record: PassRecord) -> None:
        probe = self.instruments.parity_probe
        if probe is None:
            return
        passed, max_abs, summary = probe(graph, facts)
        record.parity_max_abs = max_abs
        if not passed:
            raise self._failure(index, name, before, f"broke numerics: {summary}")

    def _failure(self, index: int, name: str, before: gs.Graph, what: str) -> PassFailed:
        where = self._write_reproducer(index, name, before, what)
        suffix = f"; reproducer in {where}" if where else ""
        return PassFailed(f"pass {name} (#{index + 1} of {self.spec!r}) {what}{suffix}")

    def _write_reproducer(self, index: int, name: str, before: gs.Graph, what: str) -> Path | None:
        folder = self.instruments.reproducer_dir
        if folder is None:
            return None
        folder = Path(folder)
        save_graph(before, folder / f"before-{name}.onnx")
        (folder / "pipeline.txt").write_text(
            f"# replay: bertopt run before-{name}.onnx --passes {name} "
            f"--batch {self.options.batch} --seq {self.options.seq}\n"
            f"spec: {self.spec}\nfailed pass: {name} (#{index + 1})\noptions: {self.options}\n"
            f"error: {what}\n\n{traceback.format_exc()}")
        return folder

