"""The pass registry and the PassManager that runs a pipeline of passes with instruments around each.

A pass is a function `run(graph, facts, options) -> PassResult` registered with `@register_pass`. It
edits the gs graph in place and says what it changed; a pass that finds nothing to do returns
`PassResult.no_change(reason)` and must leave the graph as it was.

Passes come from bertopt itself (`bertopt.passes`), from the `bertopt.passes` entry points of installed
distributions, and from `load_passes(FILE_OR_MODULE)` (`--passes-from`); see bertopt.plugins. Each
pass remembers where it came from (`PassInfo.origin`, listed by `bertopt passes`).

A pass may declare CONDITIONS it `requires` before it runs and `ensures` after: names in the table
CONDITIONS (name -> predicate(graph, facts), description). The manager checks what a pass requires
before running it, always (a model that fails it is bad input, exit 2); `Verify` checks what it ensures.

Instruments (MLIR's PassInstrumentation and TVM's PassInstrument are the models) are objects with three
hooks, given to the PassManager when it is made, and never changed afterwards:

- `before(step, graph, facts)`: before the pass runs;
- `after(step, graph, facts, result, record)`: after it returned and the manager cleaned the graph up
  (dead nodes removed, nodes sorted); `facts` are refreshed when the pass changed something; an instrument
  may fill in `record` (timings, parity) or raise `Violation` to fail the pass;
- `failed(step, error)`: the pass raised, or an instrument raised `Violation`; returns a note for the
  error's message (where a reproducer went) or None.

`step` is the PassStep: the pass's PassInfo, its position in the pipeline, the options, and `before`, the
graph as the pass received it (the manager's one copy, which instruments read and never edit; made when
first read, from a snapshot of the graph's structure taken before the pass).
Decisions where the issue was silent:

- Order, as MLIR's PassInstrumentor: `before` hooks run first to last, `after` and `failed` hooks last to
  first, so the first instrument wraps all the others. `Instruments` orders the standard ones so that
  Timing, innermost, times the pass and the cleanup after it but no other instrument, and Verify rejects
  a broken graph before anything else looks at it: Reproducer, Progress, ParityProbe, your own, Dump,
  Verify, Timing.
- A pass that raises BertoptError (bad input, exit 2, or a failed check, exit 1) has refused, not failed:
  no `failed` hooks, no reproducer, only the pass's name added to the message.
- Verify checks `ensures` after every pass, changed or not (onnx-ir's PassBase checks its postconditions
  after every call), and that a pass reporting no change left the graph's structural hash as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
import pkgutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import onnx
import onnx_graphsurgeon as gs

from bertopt.ascend.cann import DEFAULT_VERSION, CannTarget, cann_target
from bertopt.errors import BertoptError, CheckFailed, first_line
from bertopt.graph import GraphSnapshot, is_static, peek_values, save_graph, toposort, verify
from bertopt.graph.golden import SMALL_CONSTANT, structural_hashes, type_text
from bertopt.model.facts import ModelFacts
from bertopt.plugins import entry_point_origin, import_source, installed_plugins, resolve_source, source_origin

BUILT_IN = "built-in"


@dataclass
class PassOptions:
    """Settings a pass may read. Passes ignore what they do not use."""

    batch: int = 1
    seq: int = 384
    image_size: int | None = None  # freeze-shapes: square images of this size; None: the model's static size
    frames: int | None = None  # freeze-shapes: audio frames; None: the model's static count
    target: str = "ascend"
    mask_value: float = -10000.0
    cann: CannTarget = field(default_factory=lambda: cann_target(DEFAULT_VERSION))  # legalize-ascend's target


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, counts of what it changed, and notes (why not)."""

    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def no_change(cls, reason: str) -> "PassResult":
        return cls(changed=False, notes=[reason])


PassFn = Callable[[gs.Graph, ModelFacts, PassOptions], PassResult]


# --------------------------------------------------------------------------- conditions

Predicate = Callable[[gs.Graph, ModelFacts], bool]


class Condition(NamedTuple):
    """A property of a graph that a pass requires before it runs, or ensures after."""

    holds: Predicate
    description: str  # completes "pass X requires that ..."
    why_not: Callable[[gs.Graph, ModelFacts], str] | None = None  # more specific than the description


def _inputs_static(graph: gs.Graph, facts: ModelFacts) -> bool:
    return all(is_static(t) for t in graph.inputs)


def _why_inputs_dynamic(graph: gs.Graph, facts: ModelFacts) -> str:
    roleless = [t for t in graph.inputs if not is_static(t) and facts.roles and t.name not in facts.roles]
    if not roleless:
        return "run freeze-shapes first"
    dims = roleless[0].shape
    shape = f"[{', '.join(map(str, dims))}]" if dims is not None else "of unknown shape"
    return (f"input {roleless[0].name} {shape} has no static shape: freeze-shapes fixes only the inputs it knows "
            f"the role of ({', '.join(sorted(facts.roles))}); give a model whose other inputs are static")


CONDITIONS: dict[str, Condition] = {
    "static-shapes": Condition(_inputs_static, "every graph input has a static shape", _why_inputs_dynamic),
}


def _unmet(condition: Condition, graph: gs.Graph, facts: ModelFacts) -> str | None:
    """None when `condition` holds, else what does not hold."""
    if condition.holds(graph, facts):
        return None
    why = condition.why_not(graph, facts) if condition.why_not else ""
    return condition.description + (f": {why}" if why else "")


# --------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    run: PassFn
    requires: tuple[str, ...] = ()  # names in CONDITIONS
    ensures: tuple[str, ...] = ()
    origin: str = BUILT_IN  # built-in | entry point NAME = VALUE (DIST VERSION) | file PATH | module NAME
    source: str | None = None  # what --passes-from loads it from again (a file or module); None: found without


class RegistrationError(ValueError):
    """A pass registered wrongly: a name taken, an unknown condition, a function that cannot run as a pass."""


_REGISTRY: dict[str, PassInfo] = {}
_LOADED: dict[str, list[str]] = {}  # plugin -> the passes it registered, each plugin imported once
_loading: list[tuple[str, str | None]] = []  # (origin, source) of the plugin being imported
_entry_points_found = False

# Named pipelines, one per target; `default` in a spec means the pipeline of the run's target.
PIPELINES: dict[str, list[str]] = {
    "ascend": ["freeze-shapes", "fold-attention-mask", "fuse-gelu", "layernorm-for-atc", "gemm-to-matmul",
               "attention-bigkernel", "legalize-ascend"],
    "ort": ["freeze-shapes", "fold-attention-mask", "fuse-gelu", "legalize-ort"],
}
DEFAULT = "default"


def register_pass(name: str, summary: str, requires: Sequence[str] = (),
                  ensures: Sequence[str] = ()) -> Callable[[PassFn], PassFn]:
    """Register `run(graph, facts, options) -> PassResult` under `name`, as a decorator.

    `requires` and `ensures` name entries of CONDITIONS. Raises RegistrationError (a ValueError) for an
    unknown condition, a name another pass has, or a function that cannot take (graph, facts, options).
    """
    unknown = (set(requires) | set(ensures)) - CONDITIONS.keys()
    if unknown:
        raise RegistrationError(f"pass {name}: unknown condition(s) {sorted(unknown)} (known: {sorted(CONDITIONS)})")

    def decorate(fn: PassFn) -> PassFn:
        _check_signature(name, fn)
        origin, source = _loading[-1] if _loading else (_origin_of(fn), None)
        taken = _REGISTRY.get(name)
        if taken is not None and taken.run is not fn:
            raise RegistrationError(f"pass {name!r} is already registered ({taken.origin})")
        _REGISTRY[name] = PassInfo(name, summary, fn, tuple(requires), tuple(ensures), origin, source)
        return fn

    return decorate


def _check_signature(name: str, fn: PassFn) -> None:
    if not callable(fn):
        raise RegistrationError(f"pass {name}: @register_pass decorates a function, not {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError as exc:
        raise RegistrationError(f"pass {name}: {fn.__qualname__} cannot be called as run(graph, facts, options) "
                                f"({exc})") from None
    except ValueError:  # builtins without a signature: let them be tried
        pass


def _origin_of(fn: PassFn) -> str:
    """A pass registered outside a plugin import: bertopt's own, or a user's script or module."""
    module = getattr(fn, "__module__", None) or "?"
    return BUILT_IN if module.startswith("bertopt.") else f"module {module}"


def registered_passes() -> dict[str, PassInfo]:
    """Every pass: bertopt's own, then the installed entry points' (imported once per process)."""
    _import_pass_modules()
    _load_entry_points()
    return dict(_REGISTRY)


def _import_pass_modules() -> None:
    # By name: the registry sits below the passes it discovers (the layers contract in pyproject.toml).
    package = importlib.import_module("bertopt.passes")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def _load_entry_points() -> None:
    global _entry_points_found
    if _entry_points_found:
        return
    _entry_points_found = True  # a plugin that reads the registry while it is imported must not recurse
    try:
        for ep in installed_plugins():
            _load_plugin(entry_point_origin(ep), None, ep.load)
    except BertoptError:
        _entry_points_found = False
        raise


def load_passes(*sources: str) -> list[str]:
    """Register the passes of each Python file or importable module (what `--passes-from` takes).

    Returns the names they registered. Each source is imported once per process. A source that cannot
    be found or imported, registers a name already taken or registers no pass is a BertoptError naming
    it, and leaves the registry as it was.
    """
    registered_passes()  # bertopt's and the entry points' first: a plugin may not take their names
    names: list[str] = []
    for text in sources:
        source = resolve_source(text)
        names += _load_plugin(source_origin(source), source, lambda: import_source(source))
    return names


def _load_plugin(origin: str, source: str | None, load: Callable[[], object]) -> list[str]:
    if origin in _LOADED:
        return _LOADED[origin]
    before = dict(_REGISTRY)
    try:
        with _registering(origin, source):
            loaded = load()
    except Exception as exc:
        _REGISTRY.clear()
        _REGISTRY.update(before)
        reason = str(exc) if isinstance(exc, RegistrationError) else f"{type(exc).__name__}: {first_line(exc)}"
        raise BertoptError(f"plugin {origin}: {reason}") from None
    module = getattr(loaded, "__name__", None) if inspect.ismodule(loaded) else getattr(loaded, "__module__", None)
    # A module imported before (by another plugin, or by the user) registers nothing new: its passes are the same.
    names = [n for n in _REGISTRY if n not in before] or [
        n for n, info in _REGISTRY.items() if getattr(info.run, "__module__", None) == module]
    if not names:
        raise BertoptError(f"plugin {origin}: registered no pass (a plugin module registers its passes with "
                           "@bertopt.register_pass when it is imported)")
    _LOADED[origin] = names
    return names


@contextmanager
def _registering(origin: str, source: str | None) -> Iterator[None]:
    _loading.append((origin, source))
    try:
        yield
    finally:
        _loading.pop()


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


# --------------------------------------------------------------------------- running a pipeline

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


@dataclass(frozen=True)
class PassStep:
    """One pass of a pipeline run, as instruments see it."""

    index: int  # from 0
    total: int  # passes in the pipeline
    spec: str
    info: PassInfo
    options: PassOptions
    snapshot: GraphSnapshot = field(repr=False)  # the graph as the pass received it, copied when first read

    @property
    def before(self) -> gs.Graph:
        """The graph as the pass received it: read it, never edit it. It is copied only when an instrument
        reads it (a dump, a reproducer, the HTML report's pictures), from the snapshot the manager takes
        before each pass, which costs a tenth of a copy."""
        return self.snapshot.graph()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def label(self) -> str:
        return f"pass {self.name} (#{self.index + 1} of {self.spec!r})"


class Violation(Exception):
    """Raised by an instrument's `before` or `after`: the pass broke a rule. The message says how
    (`left an invalid graph: ...`); the manager names the pass and raises PassFailed."""


class PassFailed(CheckFailed):
    """A pass raised, or left a graph the checker rejects. The message names the pass."""


class Instrument:
    """Hooks around every pass (see the module docstring); each does nothing unless overridden."""

    def before(self, step: PassStep, graph: gs.Graph, facts: ModelFacts) -> None:
        pass

    def after(self, step: PassStep, graph: gs.Graph, facts: ModelFacts, result: PassResult,
              record: PassRecord) -> None:
        pass

    def failed(self, step: PassStep, error: Violation) -> str | None:
        """`error` says what went wrong; its __cause__ is what the pass raised, if it raised."""
        return None


class PassManager:
    """Runs the passes `spec` names, in order, on one graph, with `instruments` around each.

    `instruments` defaults to `Instruments()` (verification and timing); give a sequence to choose.
    """

    def __init__(self, spec: str, options: PassOptions | None = None,
                 instruments: Sequence[Instrument] | None = None) -> None:
        self.spec = spec
        self.options = options or PassOptions()
        self.names = parse_spec(spec, self.options.target)
        self.instruments: tuple[Instrument, ...] = tuple(Instruments() if instruments is None else instruments)
        for instrument in self.instruments:
            if not all(callable(getattr(instrument, hook, None)) for hook in ("before", "after", "failed")):
                raise TypeError(f"{instrument!r} is not an Instrument (it needs before, after and failed)")
        self._passes = registered_passes()

    def run(self, graph: gs.Graph, facts: ModelFacts) -> tuple[ModelFacts, list[PassRecord]]:
        """Run every pass in order on `graph` (edited in place). Returns the updated facts and records."""
        records = []
        for index, name in enumerate(self.names):
            info = self._passes[name]
            self._check_requirements(info, graph, facts)
            step = PassStep(index, len(self.names), self.spec, info, self.options, GraphSnapshot(graph))
            record, facts = self._run_one(step, graph, facts)
            records.append(record)
        return facts, records

    def _check_requirements(self, info: PassInfo, graph: gs.Graph, facts: ModelFacts) -> None:
        for name in info.requires:
            unmet = _unmet(CONDITIONS[name], graph, facts)
            if unmet:
                raise BertoptError(f"pass {info.name} requires that {unmet}")

    def _run_one(self, step: PassStep, graph: gs.Graph, facts: ModelFacts) -> tuple[PassRecord, ModelFacts]:
        try:
            for instrument in self.instruments:
                instrument.before(step, graph, facts)
            result = self._call(step, graph, facts)
            record = PassRecord(step.name, result.changed, 0.0, counts=result.counts, notes=result.notes)
            if result.changed:
                facts = facts.refreshed(graph)
            for instrument in reversed(self.instruments):
                instrument.after(step, graph, facts, result, record)
        except Violation as error:
            raise self._failure(step, error) from error.__cause__
        return record, facts

    def _call(self, step: PassStep, graph: gs.Graph, facts: ModelFacts) -> PassResult:
        try:
            result = step.info.run(graph, facts, self.options)
            toposort(graph.cleanup(remove_unused_graph_inputs=False))
        except BertoptError as exc:  # the same kind (bad input, exit 2, or a failed check, exit 1), named
            raise type(exc)(f"pass {step.name}: {exc}") from None
        except Exception as exc:
            raise Violation(f"raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise Violation(f"returned {type(result).__name__}, not a PassResult")
        return result

    def _failure(self, step: PassStep, error: Violation) -> PassFailed:
        notes = [note for instrument in reversed(self.instruments) if (note := instrument.failed(step, error))]
        return PassFailed(f"{step.label} {error}" + "".join(f"; {note}" for note in notes))


# --------------------------------------------------------------------------- the standard instruments

class Timing(Instrument):
    """`record.seconds`: the pass and the manager's cleanup after it."""

    def before(self, step, graph, facts) -> None:
        self._start = time.perf_counter()

    def after(self, step, graph, facts, result, record) -> None:
        record.seconds = time.perf_counter() - self._start


class Verify(Instrument):
    """The ONNX checker with strict shape inference after every pass that changed something (its time is
    `record.verify_seconds`); the pass's `ensures` after every pass; and a pass reporting no change
    must leave the graph's structural hash (`structural_digest`) as it was."""

    def before(self, step, graph, facts) -> None:
        self._digest = structural_digest(graph)

    def after(self, step, graph, facts, result, record) -> None:
        if result.changed:
            record.verify_seconds = self._check(graph)
        elif structural_digest(graph) != self._digest:
            raise Violation("reported no change but changed the graph (its structural hash differs)")
        for name in step.info.ensures:
            unmet = _unmet(CONDITIONS[name], graph, facts)
            if unmet:
                raise Violation(f"does not ensure that {unmet}")

    def _check(self, graph: gs.Graph) -> float:
        start = time.perf_counter()
        try:
            verify(graph)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise Violation(f"left an invalid graph: {first_line(exc)}") from exc
        return time.perf_counter() - start


def structural_digest(graph: gs.Graph) -> str:
    """A hash of what `graph` computes (bertopt.graph.golden's structural hashes of its outputs, its inputs'
    and outputs' names and types, its opset), blind to names of inner tensors and nodes, node order
    and dead nodes.

    Constants of up to SMALL_CONSTANT elements count by value; larger ones (weights) by shape and by
    which tensor they are, not by their bytes: reading every weight before and after each pass would
    cost about as much as saving the model, and would load the weights gs keeps lazily imported.
    """
    hashes = structural_hashes(graph, _constant_key)
    parts = [f"opset {graph.opset}"] + [f"input {t.name} {type_text(t)}" for t in graph.inputs]
    for tensor in graph.outputs:
        computed = hashes.get(id(tensor)) or (_constant_key(tensor) if isinstance(tensor, gs.Constant) else "free")
        parts.append(f"output {tensor.name} {type_text(tensor)} {computed}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _constant_key(tensor: gs.Constant) -> str:
    shape = tuple(tensor.shape)
    if math.prod(shape) <= SMALL_CONSTANT:
        values = peek_values(tensor)
        return f"{values.dtype} {shape} {values.tobytes().hex()}"
    return f"{shape} #{id(tensor)}"


class Dump(Instrument):
    """`folder/NN-name.before.onnx` and `.after.onnx` of every pass that changed something."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def after(self, step, graph, facts, result, record) -> None:
        if result.changed:
            save_graph(step.before, self.folder / f"{step.index:02d}-{step.name}.before.onnx")
            save_graph(graph, self.folder / f"{step.index:02d}-{step.name}.after.onnx")


ProbeFn = Callable[[gs.Graph, ModelFacts], "tuple[bool, float, str]"]


class ParityProbe(Instrument):
    """After every pass that changed something: `probe(graph, facts) -> (passed, max abs diff, summary)`
    compares the graph with the original; the worst difference goes to `record.parity_max_abs`, and a
    failed comparison fails the pass (`broke numerics`), naming the first that did."""

    def __init__(self, probe: ProbeFn) -> None:
        self.probe = probe

    def after(self, step, graph, facts, result, record) -> None:
        if not result.changed:
            return
        passed, max_abs, summary = self.probe(graph, facts)
        record.parity_max_abs = max_abs
        if not passed:
            raise Violation(f"broke numerics: {summary}")


class Reproducer(Instrument):
    """When a pass fails: `folder/before-NAME.onnx` (its input) and `folder/pipeline.txt` (how to replay
    it, what failed, the traceback)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def failed(self, step, error) -> str:
        save_graph(step.before, self.folder / f"before-{step.name}.onnx")
        plugin = f" --passes-from {step.info.source}" if step.info.source else ""
        cause = error.__cause__ or error
        (self.folder / "pipeline.txt").write_text(
            f"# replay: bertopt run before-{step.name}.onnx --passes {step.name}{plugin} "
            f"--batch {step.options.batch} --seq {step.options.seq}\n"
            f"spec: {step.spec}\nfailed pass: {step.name} (#{step.index + 1})\noptions: {step.options}\n"
            f"error: {error}\n\n{''.join(traceback.format_exception(cause))}")
        return f"reproducer in {self.folder}"


class Progress(Instrument):
    """Says which pass is running: `show("pass 3/6: fuse-gelu")`."""

    def __init__(self, show: Callable[[str], None]) -> None:
        self.show = show

    def before(self, step, graph, facts) -> None:
        self.show(f"pass {step.index + 1}/{step.total}: {step.name}")


class Instruments(list):
    """The standard instruments in their order (see the module docstring), chosen by keyword; `extra`
    instruments (the HTML report's pictures, your own) go between the parity probe and the dump."""

    def __init__(self, *, verify_each: bool = True, dump_dir: str | Path | None = None,
                 parity_probe: ProbeFn | None = None, reproducer_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None, extra: Sequence[Instrument] = ()) -> None:
        chosen = [Reproducer(reproducer_dir) if reproducer_dir is not None else None,
                  Progress(progress) if progress is not None else None,
                  ParityProbe(parity_probe) if parity_probe is not None else None,
                  *extra,
                  Dump(dump_dir) if dump_dir is not None else None,
                  Verify() if verify_each else None,
                  Timing()]
        super().__init__(instrument for instrument in chosen if instrument is not None)
