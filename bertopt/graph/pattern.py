"""A small declarative matcher for onnx-graphsurgeon graphs; every rewrite pass is written with it.

A pattern is an expression rooted at the node that computes the result, e.g. the erf Gelu::

    x = Var("x")
    gelu = Pattern(Op("Mul",
                      Op("Mul", x, Op("Add", Op("Erf", Op("Div", x, Const(1.4142135, rtol=1e-3))),
                                      Const(1.0))),
                      Const(0.5), name="out"))
    for m in gelu.find_all(graph):
        m["x"], m.node("out"), m.nodes, m.output

Matching walks from the root towards the inputs along gs producer links (``tensor.inputs``) and
backtracks over commuted operands (see COMMUTATIVE) and `OneOf` alternatives. A name binds once:
a `Var`, a named `Const` or a named `Op` met again must be the same tensor or node, and so must the
same `Op` object used twice (shared subexpressions, as in a decomposed LayerNorm).
`Pattern.explain(node)` reports why the attempt that got furthest failed (onnxscript's
MatchingTracer is the model), with the path from the root to the failing input.

A plain number stands for a constant of that value (``Op("Mul", x, 0.5)`` is ``Op("Mul", x,
Const(0.5))``). ``OneOf(..., tag="form")`` records which alternative matched: ``m.tag("form")`` is its
index, or its label with ``labels=(...)``. Rewriting what a pattern matches is `bertopt.graph.rules`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.graph import constant_value

# Two-input ops whose operands a pattern may meet in either order (exporters pick one at random).
COMMUTATIVE = frozenset({"Add", "Mul", "And", "Or", "Xor", "Max", "Min", "Sum", "Mean", "Equal",
                         "BitwiseAnd", "BitwiseOr", "BitwiseXor"})

# Bindings of one attempt: ("tensor", name) / ("node", name) / Op object -> gs object. Treated as
# immutable so backtracking is free; its size measures how far an attempt got.
State = dict
# ((node, input index), ...): the steps from the root to the tensor being matched.
Path = tuple
Predicate = Callable[..., bool] | tuple[Callable[..., bool], str]
# A plain number where a pattern is expected means a constant of that value.
Number = (int, float, np.number)


class Pat:
    """Something that can match a tensor: Op, Var, Any, Const, OneOf or an Op's output."""

    def match_tensor(self, tensor: gs.Tensor, state: State, attempt: _Attempt,
                     path: Path) -> Iterator[State]:
        raise NotImplementedError


class Var(Pat):
    """Any tensor, bound under `name`; every use of the name must be the same tensor."""

    def __init__(self, name: str) -> None:
        self.name = name

    def match_tensor(self, tensor, state, attempt, path):
        return _bind(("tensor", self.name), tensor, state, attempt, path)


class Any(Pat):
    """Any tensor, not bound."""

    def match_tensor(self, tensor, state, attempt, path):
        yield state


_ = Any()


class Const(Pat):
    """A gs.Constant; with `value`, every element is close to it (a scalar broadcasts).

    `where(values) -> bool` gets the constant's numpy value; `name` binds the tensor like a Var.
    """

    def __init__(self, value=None, *, rtol: float = 1e-5, atol: float = 1e-8,
                 shape: Sequence[int] | None = None, name: str | None = None,
                 where: Predicate | None = None) -> None:
        self.value = None if value is None else np.asarray(value)
        self.rtol, self.atol = rtol, atol
        self.shape = None if shape is None else tuple(shape)
        self.name = name
        self.where = _described(where)

    def match_tensor(self, tensor, state, attempt, path):
        problem = self._mismatch(tensor)
        if problem:
            attempt.fail(state, path, problem)
            return iter(())
        if self.name is None:
            return iter((state,))
        return _bind(("tensor", self.name), tensor, state, attempt, path)

    def _mismatch(self, tensor: gs.Tensor) -> str | None:
        if not isinstance(tensor, gs.Constant):
            return f"expected {self._expected()}, found {_describe_tensor(tensor)}"
        if self.shape is not None and tuple(tensor.shape) != self.shape:
            return f"expected {self._expected()} of shape {self.shape}, got shape {tuple(tensor.shape)}"
        if self.value is None and self.where is None:
            return None  # reading the values would load a lazily imported weight for nothing
        actual = np.asarray(constant_value(tensor))
        if self.value is not None and not self._close(actual):
            return f"expected {self._expected()}, got {_summary(actual)}"
        if self.where is not None and not self.where[0](actual):
            return f"constant '{tensor.name}' ({_summary(actual)}) fails {self.where[1]}"
        return None

    def _close(self, actual: np.ndarray) -> bool:
        if actual.size == 0 or actual.dtype.kind not in "biuf":
            return False
        if self.value.size != 1 and self.value.shape != actual.shape:
            return False
        as_number = (lambda a: a.astype(np.int8) if a.dtype == bool else a)
        return bool(np.all(np.isclose(as_number(actual), as_number(self.value),
                                      rtol=self.rtol, atol=self.atol)))

    def _expected(self) -> str:
        return "a constant" if self.value is None else f"constant ~{_summary(self.value)}"


class Op(Pat):
    """A node of type `op_type` (or one of a tuple of types) whose inputs match `inputs` in order.

    `attrs` must equal the node's attributes (numbers within 1e-6 relative); `where(node) -> bool`
    is a further check, a function (its name describes it) or a `(function, description)` pair.
    `outputs` is the node's output count (None: any). Commutative ops also try their two inputs
    swapped unless `commute=False`. The node may have more inputs than the pattern lists only with
    `partial_inputs=True`. Used as an input, an Op means its first output; `op[k]` means output k.
    """

    def __init__(self, op_type: str | Sequence[str], *inputs: Pat | float, name: str | None = None,
                 attrs: dict | None = None, where: Predicate | None = None,
                 outputs: int | None = 1, commute: bool = True,
                 partial_inputs: bool = False) -> None:
        bad = [i for i in inputs if not isinstance(i, (Pat, *Number))]
        if bad:
            raise TypeError(f"Op({op_type!r}) inputs must be patterns or numbers, got {bad[0]!r}")
        self.op_types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        self.inputs = tuple(i if isinstance(i, Pat) else Const(i) for i in inputs)
        self.name, self.attrs, self.where = name, attrs or {}, _described(where)
        self.outputs, self.commute, self.partial_inputs = outputs, commute, partial_inputs

    def __getitem__(self, index: int) -> Output:
        return Output(self, index)

    def label(self) -> str:
        return " or ".join(self.op_types)

    def match_tensor(self, tensor, state, attempt, path):
        return _match_output(self, 0, tensor, state, attempt, path)

    def match_node(self, node: gs.Node, state: State, attempt: _Attempt,
                   path: Path) -> Iterator[State]:
        bound = state.get(self)
        if bound is not None:
            if bound is not node:
                attempt.fail(state, path, f"expected the {self.label()} matched before "
                                          f"({_describe(bound)}), found {_describe(node)}")
            else:
                yield state
            return
        problem = self._mismatch(node, attempt)
        if problem:
            attempt.fail(state, path, problem)
            return
        state = {**state, self: node}
        named = _bind(("node", self.name), node, state, attempt, path) if self.name else (state,)
        for state in named:
            for order in self._input_orders(node):
                pairs = [(p, node, i) for p, i in zip(self.inputs, order)]
                yield from _match_inputs(pairs, state, attempt, path)

    def _mismatch(self, node: gs.Node, attempt: _Attempt) -> str | None:
        if node.op not in self.op_types:
            return f"expected {self.label()}, found {_describe(node)}"
        if id(node) in attempt.claimed:
            return f"{_describe(node)} already belongs to an earlier match"
        have, want = len(node.inputs), len(self.inputs)
        if have < want or (have > want and not self.partial_inputs):
            return f"{_describe(node)} has {have} inputs, the pattern expects {want}"
        if self.outputs is not None and len(node.outputs) != self.outputs:
            return f"{_describe(node)} has {len(node.outputs)} outputs, the pattern expects {self.outputs}"
        for key, expected in self.attrs.items():
            if key not in node.attrs:
                return f"{_describe(node)} has no attribute {key} (expected {expected!r})"
            if not _attr_equal(node.attrs[key], expected):
                return f"{_describe(node)} attribute {key} is {node.attrs[key]!r}, expected {expected!r}"
        if self.where is not None and not self.where[0](node):
            return f"{_describe(node)} fails {self.where[1]}"
        return None

    def _input_orders(self, node: gs.Node) -> list[tuple[int, ...]]:
        straight = tuple(range(len(self.inputs)))
        if (self.commute and node.op in COMMUTATIVE and len(self.inputs) == 2
                and len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1]):
            return [straight, (1, 0)]
        return [straight]


class Output(Pat):
    """Output `index` of the node an Op matches (write `op[index]`)."""

    def __init__(self, op: Op, index: int) -> None:
        self.op, self.index = op, index

    def match_tensor(self, tensor, state, attempt, path):
        return _match_output(self.op, self.index, tensor, state, attempt, path)


class OneOf(Pat):
    """The first of `alternatives` that leads to a complete match (tried in order, backtracking).

    With `tag`, the match records which one: `m.tag(tag)` is its index, or its entry in `labels`. A tag
    met twice in one match (in two OneOfs) must name the same alternative both times.
    """

    def __init__(self, *alternatives: Pat, tag: str | None = None, labels: Sequence | None = None) -> None:
        if not alternatives or not all(isinstance(a, Pat) for a in alternatives):
            raise TypeError("OneOf needs one or more patterns")
        if labels is not None and (tag is None or len(labels) != len(alternatives)):
            raise TypeError("OneOf labels need a tag and one label per alternative")
        self.alternatives = alternatives
        self.tag = tag
        self.labels = tuple(labels) if labels is not None else tuple(range(len(alternatives)))

    def match_tensor(self, tensor, state, attempt, path):
        for label, alternative in zip(self.labels, self.alternatives):
            for tagged in self._tagged(label, state, attempt, path):
                yield from alternative.match_tensor(tensor, tagged, attempt, path)

    def match_node(self, node, state, attempt, path):
        for label, alternative in zip(self.labels, self.alternatives):
            for tagged in self._tagged(label, state, attempt, path):
                yield from alternative.match_node(node, tagged, attempt, path)

    def _tagged(self, label, state: State, attempt: _Attempt, path: Path) -> Iterator[State]:
        if self.tag is None:
            yield state
            return
        key = ("tag", self.tag)
        if key not in state:
            yield {**state, key: label}
        elif state[key] == label:
            yield state
        else:
            attempt.fail(state, path, f"tag '{self.tag}' is already {state[key]!r}, this alternative is {label!r}")


class Match:
    """One occurrence of a pattern: bound tensors by name (`m["x"]`), captured nodes, all nodes."""

    def __init__(self, root: gs.Node, state: State, graph_outputs: set[int], graph: gs.Graph | None = None) -> None:
        self.root = root
        self.graph = graph  # the graph matched in, when the caller gave it
        self._state = state
        self._graph_outputs = graph_outputs
        unique = {id(n): n for key, n in state.items() if isinstance(key, Op)}
        self.nodes: list[gs.Node] = list(unique.values())  # root first, then depth-first

    def __getitem__(self, name: str) -> gs.Tensor:
        return self._lookup("tensor", name)

    def get(self, name: str, default=None) -> gs.Tensor | None:
        """The tensor bound to `name`, or `default` when this match bound none (an alternative without it)."""
        return self._state.get(("tensor", name), default)

    def __contains__(self, name: str) -> bool:
        return ("tensor", name) in self._state

    def node(self, name: str) -> gs.Node:
        return self._lookup("node", name)

    def get_node(self, name: str, default=None) -> gs.Node | None:
        """The node captured as `name`, or `default` when this match captured none (an alternative without it)."""
        return self._state.get(("node", name), default)

    def tag(self, name: str):
        """Which alternative of the OneOf tagged `name` matched: its index, or its label."""
        return self._lookup("tag", name)

    @property
    def output(self) -> gs.Tensor:
        return self.root.outputs[0]

    def escaping(self) -> list[gs.Tensor]:
        """Outputs of matched non-root nodes that are graph outputs or read outside the match."""
        return [tensor for tensor, _ in self._escapes()]

    def _escapes(self) -> list[tuple[gs.Tensor, str]]:
        inside = {id(n) for n in self.nodes}
        found = []
        for node in self.nodes:
            for tensor in node.outputs if node is not self.root else ():
                owner = f"intermediate '{tensor.name}' (output of {_describe(node)})"
                outside = [c for c in tensor.outputs if id(c) not in inside]
                if id(tensor) in self._graph_outputs:
                    found.append((tensor, f"{owner} is a graph output"))
                elif outside:
                    found.append((tensor, f"{owner} is also used by {_describe(outside[0])}, "
                                          "outside the match"))
        return found

    def _lookup(self, kind: str, name: str):
        try:
            return self._state[(kind, name)]
        except KeyError:
            known = sorted(k[1] for k in self._state if isinstance(k, tuple) and k[0] == kind)
            raise KeyError(f"no {kind} named {name!r} in this match (known: {known})") from None

    def __repr__(self) -> str:
        return f"<Match {_describe(self.root)}, {len(self.nodes)} nodes>"


class Pattern:
    """A pattern rooted at an Op (or a OneOf of Ops), ready to match nodes of a graph.

    Pass the graph to `match`/`explain` so that graph outputs count as escaping intermediates.
    Unless `allow_escape=True`, a match whose intermediates are used outside it is rejected,
    because replacing it would break those users.
    """

    def __init__(self, root: Op | OneOf) -> None:
        self.root = root
        self.root_op_types = frozenset(_root_op_types(root))

    def match(self, node: gs.Node, graph: gs.Graph | None = None, *,
              allow_escape: bool = False) -> Match | None:
        found = self.attempt(node, graph, allow_escape=allow_escape)
        return found if isinstance(found, Match) else None

    def explain(self, node: gs.Node, graph: gs.Graph | None = None, *,
                allow_escape: bool = False) -> str:
        found = self.attempt(node, graph, allow_escape=allow_escape)
        return f"matches {len(found.nodes)} nodes from {_describe(node)}" if isinstance(found, Match) else found.reason

    def attempt(self, node: gs.Node, graph: gs.Graph | None = None, *, claimed: set[int] | frozenset = frozenset(),
                allow_escape: bool = False) -> Match | Miss:
        """The match rooted at `node`, or how far the furthest attempt got and why it failed. `claimed`
        holds the ids of nodes that already belong to other matches."""
        attempt = _Attempt(graph, claimed)
        found = self._first(node, attempt, allow_escape)
        return found if found is not None else Miss(node, *attempt.best)

    def find_all(self, graph: gs.Graph, *, allow_escape: bool = False) -> list[Match]:
        """Non-overlapping matches in graph node order; earlier roots claim their nodes first."""
        claimed, found = set(), []
        for node in graph.nodes:
            if node.op not in self.root_op_types:
                continue
            match = self.attempt(node, graph, claimed=claimed, allow_escape=allow_escape)
            if isinstance(match, Match):
                found.append(match)
                claimed.update(id(n) for n in match.nodes)
        return found

    def required_op_types(self) -> frozenset[str]:
        """Op types every match holds (an Op of a single type outside any OneOf): a graph without one of
        them cannot match, whatever its roots."""
        return _required(self.root, set())

    def _first(self, node: gs.Node, attempt: _Attempt, allow_escape: bool) -> Match | None:
        for state in self.root.match_node(node, {}, attempt, ()):
            match = Match(node, state, attempt.graph_outputs, attempt.graph)
            escapes = [] if allow_escape else match._escapes()
            if not escapes:
                return match
            attempt.fail(state, (), escapes[0][1])
        return None


class Miss:
    """A root where the pattern failed: `progress` (bindings made before failing) says how close it came,
    `reason` why it failed, after the path from the root (formatted when read: most misses never are)."""

    def __init__(self, root: gs.Node, progress: int, path: Path, problem: str) -> None:
        self.root, self.progress, self.path, self.problem = root, progress, path, problem

    @property
    def reason(self) -> str:
        where = " > ".join(f"{_describe(node)} input {i}" for node, i in self.path)
        return f"{where}: {self.problem}" if where else self.problem

    def __str__(self) -> str:
        return f"nearest candidate {_describe(self.root)}: {self.reason}"

    def __repr__(self) -> str:
        return f"<Miss {self}>"


class _Attempt:
    """One root candidate: the nodes earlier matches own, and the furthest failure seen."""

    def __init__(self, graph: gs.Graph | None, claimed: set[int] | frozenset = frozenset()) -> None:
        self.graph, self.graph_outputs, self.claimed = graph, _output_ids(graph), claimed
        self.best: tuple[int, Path, str] = (-1, (), "no match")

    def fail(self, state: State, path: Path, reason: str) -> None:
        if len(state) > self.best[0]:
            self.best = (len(state), path, reason)


def _bind(key: tuple, value, state: State, attempt: _Attempt, path: Path) -> Iterator[State]:
    bound = state.get(key)
    if bound is None:
        yield {**state, key: value}
    elif bound is value:
        yield state
    else:
        describe = _describe if key[0] == "node" else _describe_tensor
        attempt.fail(state, path, f"'{key[1]}' is already bound to {describe(bound)}, "
                                  f"found {describe(value)}")


def _match_output(op: Op, index: int, tensor: gs.Tensor, state: State, attempt: _Attempt,
                  path: Path) -> Iterator[State]:
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None:
        attempt.fail(state, path, f"expected {op.label()}, found {_describe_tensor(tensor)}")
        return
    actual = next(i for i, out in enumerate(node.outputs) if out is tensor)
    if node.op in op.op_types and actual != index:
        attempt.fail(state, path, f"expected output {index} of {op.label()}, "
                                  f"found output {actual} of {_describe(node)}")
        return
    yield from op.match_node(node, state, attempt, path)


def _match_inputs(pairs: list[tuple[Pat, gs.Node, int]], state: State, attempt: _Attempt,
                  path: Path) -> Iterator[State]:
    if not pairs:
        yield state
        return
    pattern, node, i = pairs[0]
    for state in pattern.match_tensor(node.inputs[i], state, attempt, path + ((node, i),)):
        yield from _match_inputs(pairs[1:], state, attempt, path)


def _root_op_types(root: Pat) -> Iterable[str]:
    if isinstance(root, Op):
        return root.op_types
    if isinstance(root, OneOf):
        return [t for alternative in root.alternatives for t in _root_op_types(alternative)]
    raise TypeError(f"a pattern's root must be an Op or a OneOf of Ops, not {type(root).__name__}")


def _required(pattern: Pat, seen: set[int]) -> frozenset[str]:
    if id(pattern) in seen:
        return frozenset()
    seen.add(id(pattern))
    if isinstance(pattern, Output):
        pattern = pattern.op
    if isinstance(pattern, OneOf):
        return frozenset.intersection(*(_required(a, set(seen)) for a in pattern.alternatives))
    if not isinstance(pattern, Op):
        return frozenset()
    own = frozenset(pattern.op_types) if len(pattern.op_types) == 1 else frozenset()
    return own.union(*(_required(i, seen) for i in pattern.inputs))


def _described(where: Predicate | None) -> tuple[Callable[..., bool], str] | None:
    if where is None or isinstance(where, tuple):
        return where
    return where, getattr(where, "__name__", "a predicate")


def _attr_equal(actual, expected) -> bool:
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        return False
    if a.dtype.kind in "biuf" and e.dtype.kind in "biuf":
        # float attributes come back through float32 (epsilon 1e-12 reads 9.9999998e-13)
        return bool(np.allclose(a, e, rtol=1e-6, atol=0.0))
    return bool(np.array_equal(a, e))


def _output_ids(graph: gs.Graph | None) -> set[int]:
    return set() if graph is None else {id(t) for t in graph.outputs}


def _describe(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


def _describe_tensor(tensor: gs.Tensor) -> str:
    if isinstance(tensor, gs.Constant):
        return f"constant '{tensor.name}' ({_summary(np.asarray(tensor.values))})"
    if tensor.inputs:
        return f"'{tensor.name}' from {_describe(tensor.inputs[0])}"
    return f"graph input '{tensor.name}'" if tensor.name else "an omitted optional input"


def _summary(values: np.ndarray) -> str:
    if values.size == 1 and values.dtype.kind in "biuf":
        return f"{values.item():.6g}"
    if values.size <= 8:
        return np.array2string(values, precision=6, separator=", ")
    return f"{values.dtype} array of shape {list(values.shape)}"
