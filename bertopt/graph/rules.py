"""Rewrite rules: a pattern, a rewrite and an optional check; `apply_rules` does the graph surgery.

    erf = Rule(erf_gelu_pattern(), lambda m, b: b.Gelu(m["x"], domain="com.microsoft"), name="erf")
    result = apply_rules(graph, [erf])
    result["erf"], result.declined["erf"], result.why_not

onnxscript's rewriter is the model (``onnxscript/rewriter/_rewrite_rule.py``: a rule is a target pattern,
a replacement function and a condition; ``RewriteRuleSet`` walks the nodes, tries each rule in turn and
lets onnx-ir's ``replace_nodes_and_values`` rewire). Here:

- ``check(match) -> str | None`` returns a reason to leave the match alone (None: go ahead);
- ``rewrite(match, builder) -> value(s) | None`` writes new nodes with the `bertopt.graph.builder.Builder` it is
  given (its `like` is the matched output, so plain numbers are typed like the value being replaced) and
  returns the new value for the root's output, or a sequence with one per root output (None leaves that
  output as it is); returning None declines;
- the framework makes every consumer and graph output of a replaced output read the new value (a graph
  output keeps its name: `bertopt.graph.replace_uses`; a value that already has a name of its own, a graph
  input or constant, reaches the output through an Identity; a value the rewrite made takes the old
  value's name, as onnx-ir's ``replace_nodes_and_values`` does, so what reads it downstream keeps its
  names), removes the matched nodes that became dead, and leaves new nodes' names to the builder.

Decisions where the issue was silent:

- One sweep over the nodes as they were when it started, in graph order; at each node the rules are tried
  in order and the first that rewrites wins (onnxscript's order). New nodes are not roots in the same sweep,
  so a rule never rewrites its own output again; a match may still reach them through their consumers.
- Matches do not overlap: a node rewritten or left alone by a declining rule belongs to that match.
  A match declined by one rule may still be rewritten by a later rule at the same root; both counts say so.
- A rule whose pattern needs an op type the graph lacks (`Pattern.required_op_types`) is not tried.
- Counts are kept by rule name, so rules sharing a name (one form written from several spellings) add up.
- `why_not` is the failed attempt that got furthest, over every candidate root of every rule: a match a
  check or rewrite declined counts as furthest of all, else the most bindings made before failing (the
  first such root in graph order wins a tie); without any candidate it names the op types missing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import onnx_graphsurgeon as gs

from bertopt.graph import replace_uses
from bertopt.graph.builder import Builder
from bertopt.graph.pattern import Match, Miss, OneOf, Op, Pattern, _describe

Check = Callable[[Match], "str | None"]
Rewrite = Callable[[Match, Builder], "gs.Tensor | Sequence[gs.Tensor | None] | None"]


class Rule:
    """`rewrite` what `pattern` matches, unless `check` gives a reason not to; `name` keys the counts."""

    def __init__(self, pattern: Pattern | Op | OneOf, rewrite: Rewrite, check: Check | None = None, *,
                 name: str | None = None) -> None:
        self.pattern = pattern if isinstance(pattern, Pattern) else Pattern(pattern)
        self.rewrite, self.check = rewrite, check
        self.name = name or getattr(rewrite, "__name__", "rule")
        self.required = self.pattern.required_op_types()

    def __repr__(self) -> str:
        return f"<Rule {self.name}>"


@dataclass
class RuleResult:
    """What `apply_rules` did: rewrites and declined matches per rule name, and why nothing else matched."""

    applied: Counter = field(default_factory=Counter)
    declined: Counter = field(default_factory=Counter)
    why_not: str | None = None  # the nearest miss (see the module docstring); None when every attempt matched

    def __getitem__(self, name: str) -> int:
        return self.applied[name]

    @property
    def changed(self) -> bool:
        return sum(self.applied.values()) > 0


def apply_rules(graph: gs.Graph, rules: Sequence[Rule]) -> RuleResult:
    """Rewrite what `rules` match in one sweep over `graph` (see the module docstring)."""
    sweep = _Sweep(graph, rules)
    for node in list(graph.nodes):
        if id(node) not in sweep.taken:
            sweep.at(node)
    graph.nodes = [n for n in graph.nodes if id(n) not in sweep.removed]
    return RuleResult(sweep.applied, sweep.declined, sweep.why_not())


class _Sweep:
    def __init__(self, graph: gs.Graph, rules: Sequence[Rule]) -> None:
        self.graph, self.rules = graph, rules
        self.present = {n.op for n in graph.nodes}
        self.applied: Counter = Counter()
        self.declined: Counter = Counter()
        self.taken: set[int] = set()  # nodes of matches made, rewritten or declined
        self.removed: set[int] = set()
        self.nearest: tuple[tuple[int, int], Miss] | None = None
        self.tried = False

    def at(self, node: gs.Node) -> None:
        declined = None
        for rule in self.rules:
            if node.op not in rule.pattern.root_op_types or not rule.required <= self.present:
                continue
            self.tried = True
            found = rule.pattern.attempt(node, self.graph, claimed=self.taken)
            if isinstance(found, Miss):
                self._note((0, found.progress), found)
                continue
            if self._rewrite(rule, found):
                return
            declined = declined or found
        if declined is not None:
            self.taken.update(id(n) for n in declined.nodes)

    def _rewrite(self, rule: Rule, match: Match) -> bool:
        reason = rule.check(match) if rule.check else None
        builder = Builder(self.graph, like=match.output)
        values = None if reason else rule.rewrite(match, builder)
        if values is None:
            reason = reason or "its rewrite declined"
            self._discard(builder.nodes)  # whatever it wrote before declining
            self.declined[rule.name] += 1
            self._note((1, 0), Miss(match.root, len(match.nodes), (), f"rule {rule.name}: {reason}"))
            return False
        self._rewire(rule, match, values, builder)
        self.applied[rule.name] += 1
        self.taken.update(id(n) for n in match.nodes)
        self.present.update(n.op for n in builder.nodes)
        self._remove_dead(match.nodes)
        return True

    def _rewire(self, rule: Rule, match: Match, values, builder: Builder) -> None:
        olds = match.root.outputs
        news = [values] if isinstance(values, gs.Tensor) else list(values)
        if len(news) != len(olds):
            raise ValueError(f"rule {rule.name}: its rewrite returned {len(news)} value(s) for the "
                             f"{len(olds)} output(s) of {_describe(match.root)}")
        made = {id(out) for node in builder.nodes for out in node.outputs}
        for old, new in zip(list(olds), news):
            if new is None or new is old:
                continue
            is_output = any(t is old for t in self.graph.outputs)
            if id(new) not in made and is_output:
                new = builder.Identity(new)  # the graph output's name must not be taken from another tensor
            if isinstance(new, gs.Variable):
                new.dtype = new.dtype if new.dtype is not None else old.dtype
                new.shape = new.shape if new.shape is not None else old.shape
            if id(new) in made and not is_output:  # graph outputs are renamed by replace_uses
                old.name, new.name = f"{old.name}__replaced", old.name
            _replace_outside(old, new, builder.nodes, self.graph)

    def _discard(self, nodes: list[gs.Node]) -> None:
        for node in nodes:
            node.inputs.clear()
            node.outputs.clear()
            self.removed.add(id(node))

    def _remove_dead(self, nodes: list[gs.Node]) -> None:
        """Detach the matched nodes nothing reads any more; each removal may free its producers."""
        outputs = {id(t) for t in self.graph.outputs}
        dead = True
        while dead:
            dead = [n for n in nodes if id(n) not in self.removed
                    and not any(t.outputs or id(t) in outputs for t in n.outputs)]
            self._discard(dead)

    def _note(self, rank: tuple[int, int], miss: Miss) -> None:
        if self.nearest is None or rank > self.nearest[0]:
            self.nearest = (rank, miss)

    def why_not(self) -> str | None:
        if self.nearest is not None:
            return str(self.nearest[1])
        if self.tried:
            return None
        missing = sorted({op for rule in self.rules for op in rule.required - self.present})
        wanted = missing or sorted({op for rule in self.rules for op in rule.pattern.root_op_types})
        return f"the graph has no {_either(wanted)} node"


def _replace_outside(old: gs.Tensor, new: gs.Tensor, made: Iterable[gs.Node], graph: gs.Graph) -> None:
    """replace_uses, except in the rewrite's own nodes: one that reads `old` (a rule inserting after the
    root) must go on reading it, not itself."""
    readers = [(node, i) for node in made for i, t in enumerate(node.inputs) if t is old]
    replace_uses(old, new, graph)
    for node, i in readers:
        node.inputs[i] = old


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
