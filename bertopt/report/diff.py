"""A structural, name-insensitive diff of two ONNX graphs, as text a person can follow.

    d = diff_graphs("model.onnx", "model_fix.onnx")
    print(d.text())

Matching, in three steps (networkx's graph matchers take minutes on 1000+ nodes; this is linear):
1. Nodes whose structural hashes are equal (bertopt.graph.golden: op, attributes and the hashes of the
   inputs, commutative inputs sorted) compute the same thing from the same inputs: matched.
2. Propagation, repeated until nothing changes: forwards in topological order, a node matches the
   unmatched node of the other graph with the same op that reads the matched twins of its inputs at
   the same positions; backwards, one that feeds the twins of its consumers at the same positions.
   An exact twin (same attributes and constants) wins; otherwise the candidate must be the only one
   both ways round. So a Reshape whose shape input became a constant is "changed", and matching goes
   on past it instead of losing everything downstream. Propagation looks through unmatched
   view-only nodes (PASS_THROUGH: an inserted or removed Reshape), and backwards it starts from the
   graph outputs, which both graphs name alike.
3. What is left is removed (old graph only) or added (new graph only). A matched pair whose op
   attributes, constants or matched inputs differ is changed.

Removed, added and changed nodes that touch each other (an edge, a changed pair, or feeding the
same matched consumer) and lie in the same region (bertopt.model.regions) form one edit, printed as
"Div(8.0) -> Mul(0.125)". Removed nodes that computed only from Shape ops and constants (what
freezing shapes folds) are one "folded to constants" line per region instead, so they do not bury the
rewrites. Regions whose edits read the same are collapsed ("layers 0-11 attention").
Constants are compared by value (large ones by a hash of their bytes) and shown by value when small,
by shape and dtype when large.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from bertopt.graph import ModelSource, constant_bytes, load_graph
from bertopt.graph.golden import (SMALL_CONSTANT, attr_text, constant_text, parse_graph_text, structural_hashes,
                                  topological_order, type_text)
from bertopt.graph.opset import in_onnx_domain
from bertopt.graph.pattern import COMMUTATIVE
from bertopt.model.regions import layer_of, node_regions, region_rank

# An edit with more nodes than this on one side is shown by op counts instead of node by node.
LISTED_NODES = 8
# Longest constant value shown inside a node label.
VALUE_WIDTH = 32

NO_DIFFERENCE = "no structural difference"

# Ops that only re-view their first input. While unmatched, the matcher looks through them, so a
# Reshape a pass inserted between two nodes does not cut the propagation (it shows as added).
PASS_THROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


@dataclass(frozen=True)
class NodeInfo:
    """One side of an edit: a node's op, its label (op, small constants, attributes) and region."""

    op: str
    label: str
    region: str


@dataclass
class Edit:
    """Connected removed/added/changed nodes of one region: old nodes -> new nodes."""

    region: str
    old: list[NodeInfo]
    new: list[NodeInfo]
    details: list[str] = field(default_factory=list)  # what differs when the labels look the same
    folded: bool = False  # removed nodes that computed constants (see _folded_to_constants), shown apart

    def text(self) -> str:
        if self.folded:
            return f"folded to constants: {_side_text(self.old)}"
        old, new = _side_text(self.old), _side_text(self.new)
        line = f"removed {old}" if not self.new else f"added {new}" if not self.old else f"{old} -> {new}"
        return line + (f" ({'; '.join(self.details)})" if self.details else "")


@dataclass
class GraphDiff:
    """The diff of an old and a new graph; `text()` renders it, `render.render_diff` draws it."""

    old_label: str
    new_label: str
    histogram: dict[str, tuple[int, int]]  # op -> (count before, count after)
    signature: list[str]                   # changed inputs, outputs, opset
    edits: list[Edit]
    counts: dict[str, int]                 # unchanged / changed / removed / added nodes
    old: "DiffSide" = field(repr=False)
    new: "DiffSide" = field(repr=False)

    @property
    def empty(self) -> bool:
        return not self.edits and not self.signature

    def text(self) -> str:
        if self.empty:
            return f"{NO_DIFFERENCE}: {self.old_label} and {self.new_label} ({self.counts['unchanged']} nodes)"
        return "\n".join(self._summary() + self._signature_lines() + self._histogram_lines()
                         + self._region_lines()) + "\n"

    def _summary(self) -> list[str]:
        c = self.counts
        before = sum(old for old, _ in self.histogram.values())
        after = sum(new for _, new in self.histogram.values())
        return [f"{self.old_label} -> {self.new_label}: {before} -> {after} nodes; {c['unchanged']} unchanged, "
                f"{c['changed']} changed, {c['removed']} removed, {c['added']} added",
                "changed regions: " + (_region_list({e.region for e in self.edits}) or "none")]

    def _signature_lines(self) -> list[str]:
        return ["signature:", *(f"  {line}" for line in self.signature)] if self.signature else []

    def _histogram_lines(self) -> list[str]:
        changed = {op: counts for op, counts in self.histogram.items() if counts[0] != counts[1]}
        same = [f"{op} {before}" for op, (before, after) in self.histogram.items() if op not in changed]
        lines = ["op histogram (before -> after):"] if changed else []
        width = max((len(op) for op in changed), default=0)
        lines += [f"  {op:<{width}}  {before:>5} -> {after:<5}  {after - before:+d}"
                  for op, (before, after) in changed.items()]
        return lines + ([f"ops with unchanged counts: {', '.join(same)}"] if same else [])

    def _region_lines(self) -> list[str]:
        lines = []
        for title, edit_lines in _collapsed_regions(self.edits):
            lines.append(f"{title}:")
            lines += [f"  {line}" for line in edit_lines]
        return lines


def diff_graphs(old: gs.Graph | ModelSource, new: gs.Graph | ModelSource, old_label: str | None = None,
                new_label: str | None = None) -> GraphDiff:
    """The structural diff of two graphs (gs graphs, .onnx paths or ModelProtos).

    Raises BertoptError (from load_graph) for a path that is not a readable ONNX model.
    """
    old_label = old_label or _label(old, "old")
    new_label = new_label or _label(new, "new")
    old_graph = old if isinstance(old, gs.Graph) else load_graph(old)
    new_graph = new if isinstance(new, gs.Graph) else load_graph(new)
    return _diff(DiffSide(old_graph, _fast_constant_text()), DiffSide(new_graph, _fast_constant_text()),
                 old_label, new_label)


def diff_graph_texts(old: str, new: str, old_label: str = "old", new_label: str = "new") -> GraphDiff:
    """The structural diff of two snapshot texts (bertopt.graph.golden.graph_text), e.g. a golden and a run."""
    old_parsed, new_parsed = parse_graph_text(old), parse_graph_text(new)
    return _diff(DiffSide(old_parsed.graph, old_parsed.constant_text),
                 DiffSide(new_parsed.graph, new_parsed.constant_text), old_label, new_label)


def _label(source, default: str) -> str:
    return Path(source).name if isinstance(source, (str, Path)) else default


def _fast_constant_text() -> Callable[[gs.Constant], str]:
    """golden's constant text for small constants; large ones by a CRC of their bytes, memoised.

    golden rounds every element in Python to be stable across exporters, minutes on bert-large;
    two graphs of one export share their weights bit for bit, so a byte checksum is the right test
    here. The bytes are read straight from the TensorProto (bertopt.graph.constant_bytes): loading
    bert-large's weights into numpy would double the diff's memory and time.
    """
    memo: dict[int, str] = {}

    def text(tensor: gs.Constant) -> str:
        if id(tensor) not in memo:
            if math.prod(tensor.shape) <= SMALL_CONSTANT:
                memo[id(tensor)] = constant_text(tensor)
            else:
                shape = "x".join(str(d) for d in tensor.shape)
                memo[id(tensor)] = f"const[{shape} {np.dtype(tensor.dtype)} #{zlib.crc32(constant_bytes(tensor)):08x}]"
        return memo[id(tensor)]

    return text


class DiffSide:
    """One graph, in topological order, with its regions and its half of the matching."""

    def __init__(self, graph: gs.Graph, constant_text: Callable[[gs.Constant], str]) -> None:
        self.graph = graph
        self.constant_text = constant_text
        self.order = topological_order(graph.nodes, key=lambda node: "")
        self.index = {id(node): i for i, node in enumerate(self.order)}
        self.regions = node_regions(graph, self.order)
        self.inputs = {t.name: t for t in graph.inputs}
        self.output_names = {id(t): t.name for t in graph.outputs}
        self.output_tensors = {t.name: t for t in graph.outputs}
        self.partner: dict[int, int] = {}  # node index -> index of its twin in the other graph
        self.status: dict[int, str] = {}   # node index -> unchanged | changed | removed/added
        self.edit_regions: dict[int, str] = {}  # node index -> region of its edit (a changed pair: the old one)
        self.folded: set[int] = set()  # removed nodes that only computed constants (old side)

    def node(self, index: int) -> gs.Node:
        return self.order[index]

    def region(self, index: int) -> str:
        return self.regions[id(self.order[index])]

    def producer(self, tensor: gs.Tensor) -> tuple[int, int] | None:
        """(node index, output position) of the node computing `tensor`."""
        if not tensor.inputs:
            return None
        node = tensor.inputs[0]
        return self.index[id(node)], next(i for i, out in enumerate(node.outputs) if out is tensor)

    def consumers(self, index: int) -> list[tuple[int, int, int]]:
        """(output position, consumer index, input slot) for every use of the node's outputs."""
        uses = []
        for position, out in enumerate(self.order[index].outputs):
            for consumer in out.outputs:
                for slot, tensor in enumerate(consumer.inputs):
                    if tensor is out:
                        uses.append((position, self.index[id(consumer)], slot))
        return uses


class _Matcher:
    """Pairs the nodes of two sides (see the module docstring); side 0 is old, side 1 new."""

    def __init__(self, old: DiffSide, new: DiffSide) -> None:
        self.sides = (old, new)

    def run(self) -> None:
        self._match_equal_hashes()
        while self._sweep(forward=True) | self._sweep(forward=False):
            pass

    def _match_equal_hashes(self) -> None:
        old, new = self.sides
        old_hashes = structural_hashes(old.graph, old.constant_text)
        new_hashes = structural_hashes(new.graph, new.constant_text)
        waiting: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(new.order):
            waiting[_node_hash(node, new_hashes)].append(index)
        for index, node in enumerate(old.order):
            twins = waiting.get(_node_hash(node, old_hashes))
            if twins:
                self._pair(index, twins.pop(0))

    def _pair(self, old_index: int, new_index: int) -> None:
        self.sides[0].partner[old_index] = new_index
        self.sides[1].partner[new_index] = old_index

    def _sweep(self, forward: bool) -> bool:
        old = self.sides[0]
        indices = range(len(old.order)) if forward else range(len(old.order) - 1, -1, -1)
        paired = False
        for index in indices:
            if index in old.partner:
                continue
            twin, exact = self._twin(0, index, forward)
            if twin is not None and (exact or self._twin(1, twin, forward)[0] == index):
                self._pair(index, twin)
                paired = True
        return paired

    def _twin(self, side: int, index: int, forward: bool) -> tuple[int | None, bool]:
        """(the node of the other side `index` matches, whether it is an exact twin).

        An exact twin (same op, attributes, constants and matched neighbours) is interchangeable with
        any other exact twin, so the first is taken; otherwise the candidate must be the only one.
        """
        candidates = self._candidates(side, index, forward)
        mine = self._signature(side, index), self._anchors(side, index, forward)
        if None not in mine[1]:
            exact = [c for c in candidates
                     if (self._signature(1 - side, c), self._anchors(1 - side, c, forward)) == mine]
            if exact:
                return exact[0], True
        return (candidates[0] if len(candidates) == 1 else None), False

    def _anchors(self, side: int, index: int, forward: bool) -> tuple:
        """The node's input (forward) or use (backward) anchors in a comparable order."""
        if forward:
            anchors = self._input_anchors(side, index)
            if self.sides[side].node(index).op not in COMMUTATIVE:
                return tuple(anchors)
        else:
            anchors = self._use_anchors(side, index)
        return tuple(sorted(anchors, key=repr))

    def _candidates(self, side: int, index: int, forward: bool) -> list[int]:
        """Unmatched same-op nodes of the other side agreeing with every matched neighbour of `index`."""
        anchors = self._input_anchors(side, index) if forward else self._use_anchors(side, index)
        known = [a for a in anchors if a is not None and a[0] != "const"]  # constants may change
        if not known:
            return []
        other = self.sides[1 - side]
        node = self.sides[side].node(index)
        found = []
        for candidate in self._neighbours_of_twins(side, index, forward):
            twin = other.node(candidate)
            if candidate in other.partner or twin.op != node.op or twin.domain != node.domain:
                continue
            theirs = self._input_anchors(1 - side, candidate) if forward else self._use_anchors(1 - side, candidate)
            if _agrees(known, theirs, node.op in COMMUTATIVE and forward):
                found.append(candidate)
        return found

    def _neighbours_of_twins(self, side: int, index: int, forward: bool) -> list[int]:
        """Nodes of the other side next to the twins of `index`'s matched neighbours, in order."""
        this, other = self.sides[side], self.sides[1 - side]
        found: dict[int, None] = {}
        if forward:
            for tensor in this.node(index).inputs:
                for twin_tensor in self._twin_tensors(side, tensor):
                    found.update(dict.fromkeys(self._readers(1 - side, twin_tensor)))
            return sorted(found)
        for _, consumer, slot in self._uses(side, index):
            if consumer not in this.partner:
                continue
            twin = other.node(this.partner[consumer])
            slots = range(len(twin.inputs)) if twin.op in COMMUTATIVE else range(slot, min(slot + 1, len(twin.inputs)))
            for s in slots:
                found.update(dict.fromkeys(self._writers(1 - side, twin.inputs[s])))
        for tensor in this.node(index).outputs:
            if id(tensor) in this.output_names and this.output_names[id(tensor)] in other.output_tensors:
                found.update(dict.fromkeys(self._writers(1 - side, other.output_tensors[this.output_names[id(tensor)]])))
        return sorted(found)

    def _see_through(self, side: int, index: int) -> bool:
        """Whether an unmatched view-only node is looked through (see PASS_THROUGH)."""
        node = self.sides[side].node(index)
        return index not in self.sides[side].partner and node.op in PASS_THROUGH and bool(node.inputs)

    def _resolved(self, side: int, tensor: gs.Tensor) -> gs.Tensor:
        """The tensor an unmatched chain of view-only nodes re-views (the tensor itself if none)."""
        this = self.sides[side]
        while (source := this.producer(tensor)) is not None and self._see_through(side, source[0]):
            tensor = this.node(source[0]).inputs[0]
        return tensor

    def _writers(self, side: int, tensor: gs.Tensor) -> list[int]:
        """The producer of `tensor` and, through looked-through nodes, the producers behind it."""
        this, found = self.sides[side], []
        while (source := this.producer(tensor)) is not None:
            found.append(source[0])
            if not self._see_through(side, source[0]):
                break
            tensor = this.node(source[0]).inputs[0]
        return found

    def _readers(self, side: int, tensor: gs.Tensor) -> list[int]:
        """The consumers of `tensor` and, through looked-through nodes, the consumers behind them."""
        this, found = self.sides[side], []
        for consumer in tensor.outputs:
            index = this.index[id(consumer)]
            found.append(index)
            if self._see_through(side, index) and consumer.inputs[0] is tensor:
                found += self._readers(side, consumer.outputs[0])
        return found

    def _uses(self, side: int, index: int) -> list[tuple[int, int, int]]:
        """DiffSide.consumers, with looked-through consumers replaced by the uses of their output."""
        this, uses = self.sides[side], []
        for position, consumer, slot in this.consumers(index):
            if slot == 0 and self._see_through(side, consumer):
                uses += [(position, c, s) for _, c, s in self._uses(side, consumer)]
            else:
                uses.append((position, consumer, slot))
        return uses

    def _twin_tensors(self, side: int, tensor: gs.Tensor) -> list[gs.Tensor]:
        this, other = self.sides[side], self.sides[1 - side]
        tensor = self._resolved(side, tensor)
        if tensor.name in this.inputs and not tensor.inputs and tensor.name in other.inputs:
            return [other.inputs[tensor.name]]
        source = this.producer(tensor)
        if source is None or source[0] not in this.partner:
            return []
        twin = other.node(this.partner[source[0]])
        return [twin.outputs[source[1]]] if source[1] < len(twin.outputs) else []

    def _pair_id(self, side: int, index: int) -> int | None:
        """A matched node's id shared by both sides: its old-side index."""
        if side == 0:
            return index if index in self.sides[0].partner else None
        return self.sides[1].partner.get(index)

    def _input_anchors(self, side: int, index: int) -> list:
        """Per input: what it is in terms both sides share, or None (computed by an unmatched node)."""
        this = self.sides[side]
        anchors = []
        for tensor in this.node(index).inputs:
            if isinstance(tensor, gs.Constant):
                anchors.append(("const",))
                continue
            tensor = self._resolved(side, tensor)
            if tensor.name in this.inputs and not tensor.inputs:
                anchors.append(("input", tensor.name))
            elif not tensor.inputs:
                anchors.append(("none", tensor.name))
            else:
                source = this.producer(tensor)
                pair = self._pair_id(side, source[0])
                anchors.append(None if pair is None else ("node", pair, source[1]))
        return anchors

    def _use_anchors(self, side: int, index: int) -> list:
        """Per use of an output: (output position, matched consumer, slot) or None; graph outputs by name."""
        this = self.sides[side]
        anchors = []
        for position, consumer, slot in self._uses(side, index):
            pair = self._pair_id(side, consumer)
            commutative = this.node(consumer).op in COMMUTATIVE
            anchors.append(None if pair is None else ("use", position, pair, -1 if commutative else slot))
        node = this.node(index)
        anchors += [("output", this.output_names[id(out)]) for out in node.outputs if id(out) in this.output_names]
        return anchors

    def _signature(self, side: int, index: int) -> tuple:
        """Op, attributes and constant inputs: what must be equal for an exact twin."""
        this = self.sides[side]
        node = this.node(index)
        constants = [this.constant_text(t) if isinstance(t, gs.Constant) else "" for t in node.inputs]
        if node.op in COMMUTATIVE:
            constants.sort()
        return node.op, node.domain, _attrs(node), tuple(constants)

    def classify(self) -> None:
        """Record unchanged/changed/removed/added for every node of both sides."""
        old, new = self.sides
        for index in range(len(old.order)):
            twin = old.partner.get(index)
            if twin is None:
                old.status[index] = "removed"
                continue
            same = self._signature(0, index) == self._signature(1, twin) and \
                self._anchors(0, index, forward=True) == self._anchors(1, twin, forward=True)
            old.status[index] = new.status[twin] = "unchanged" if same else "changed"
        for index in range(len(new.order)):
            new.status.setdefault(index, "added")


def _node_hash(node: gs.Node, hashes: dict[int, str]) -> str:
    return hashes[id(node.outputs[0])] if node.outputs else f"sink:{id(node)}"


def _attrs(node: gs.Node) -> tuple:
    return tuple(sorted((k, attr_text(v)) for k, v in node.attrs.items()))


def _agrees(known: list, theirs: list, commutative: bool) -> bool:
    """Every anchored neighbour of one node is a neighbour of the other (in place unless commutative)."""
    if commutative:
        pool = Counter(a for a in theirs if a is not None)
        return all(pool[a] >= count for a, count in Counter(known).items())
    return set(known) <= set(a for a in theirs if a is not None)


def _diff(old: DiffSide, new: DiffSide, old_label: str, new_label: str) -> GraphDiff:
    matcher = _Matcher(old, new)
    matcher.run()
    matcher.classify()
    counts = Counter(old.status.values()) + Counter(s for s in new.status.values() if s == "added")
    return GraphDiff(old_label, new_label, _histogram(old, new), _signature_changes(old, new),
                     _edits(matcher), {k: counts.get(k, 0) for k in ("unchanged", "changed", "removed", "added")},
                     old, new)


def _histogram(old: DiffSide, new: DiffSide) -> dict[str, tuple[int, int]]:
    before = Counter(_qualified_op(n) for n in old.order)
    after = Counter(_qualified_op(n) for n in new.order)
    return {op: (before[op], after[op]) for op in sorted(before | after)}


def _qualified_op(node: gs.Node) -> str:
    return node.op if in_onnx_domain(node) else f"{node.domain}.{node.op}"


def _signature_changes(old: DiffSide, new: DiffSide) -> list[str]:
    lines = []
    for kind, before, after in (("input", old.graph.inputs, new.graph.inputs),
                                ("output", old.graph.outputs, new.graph.outputs)):
        before_types = {t.name: type_text(t) for t in before}
        after_types = {t.name: type_text(t) for t in after}
        for name in before_types.keys() | after_types.keys():
            was, now = before_types.get(name), after_types.get(name)
            if was != now:
                lines.append(f"{kind} {name}: {was or 'absent'} -> {now or 'absent'}")
        if list(before_types) != list(after_types) and set(before_types) == set(after_types):
            lines.append(f"{kind} order: {', '.join(before_types)} -> {', '.join(after_types)}")
    for what, was, now in (("opset", old.graph.opset, new.graph.opset),
                           ("IR version", old.graph.ir_version, new.graph.ir_version)):
        if was != now:
            lines.append(f"{what}: {was} -> {now}")
    return sorted(lines, key=lambda line: (not line.startswith("input"), line))


class _Groups:
    """Union-find over ("old"|"new", node index)."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, item):
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def join(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


def _edits(matcher: _Matcher) -> list[Edit]:
    old, new = matcher.sides
    old.folded = _folded_to_constants(old)
    region = {("old", i): old.region(i) for i, s in old.status.items() if s != "unchanged" and i not in old.folded}
    region.update({("new", i): old.region(new.partner[i]) if s == "changed" else new.region(i)
                   for i, s in new.status.items() if s != "unchanged"})
    for (name, index), where in region.items():
        (old if name == "old" else new).edit_regions[index] = where
    groups = _Groups()
    for item in region:
        groups.find(item)

    def join(a, b) -> None:
        if a in region and b in region and region[a] == region[b]:
            groups.join(a, b)

    for index, status in old.status.items():
        if status == "changed":
            groups.join(("old", index), ("new", old.partner[index]))
    for name, side in (("old", old), ("new", new)):
        for index in side.status:
            for _, consumer, _ in side.consumers(index):
                join((name, index), (name, consumer))
    _join_shared_uses(matcher, join)
    members: dict = defaultdict(list)
    for item in region:
        members[groups.find(item)].append(item)
    edits = [_edit(matcher, sorted(items), region[items[0]]) for items in members.values()]
    edits += _folded_edits(old)
    return sorted(edits, key=lambda e: (region_rank(e.region), e.folded, e.text()))


def _folded_to_constants(side: DiffSide) -> set[int]:
    """Removed nodes computing only from Shape ops and constants: what freezing shapes folds away.

    They are listed apart, one line per region, so the rewrites that matter are not buried under
    the Shape -> Gather -> Unsqueeze -> Concat chains every dynamic Reshape used to have.
    """
    found: set[int] = set()
    for index, node in enumerate(side.order):  # topological: producers are decided first
        if side.status[index] != "removed":
            continue
        sources = [side.producer(t) for t in node.inputs if not isinstance(t, gs.Constant)]
        if node.op == "Shape" or all(source is not None and source[0] in found for source in sources):
            found.add(index)
    return found


def _folded_edits(side: DiffSide) -> list[Edit]:
    by_region: dict[str, list[int]] = defaultdict(list)
    for index in sorted(side.folded):
        by_region[side.region(index)].append(index)
        side.edit_regions[index] = side.region(index)
    return [Edit(region, [node_info(side, i, named=False) for i in indices], [], folded=True)
            for region, indices in by_region.items()]


def _join_shared_uses(matcher: _Matcher, join) -> None:
    """A removed node and an added node that feed the same matched consumer slot replaced each other."""
    old, new = matcher.sides
    for index, status in old.status.items():
        if status != "removed":
            continue
        for _, consumer, slot in old.consumers(index):
            if consumer not in old.partner:
                continue
            twin = new.node(old.partner[consumer])
            tensors = twin.inputs if old.node(consumer).op in COMMUTATIVE else twin.inputs[slot:slot + 1]
            for tensor in tensors:
                source = new.producer(tensor)
                if source is not None and new.status[source[0]] == "added":
                    join(("old", index), ("new", source[0]))


def _edit(matcher: _Matcher, items: list, region: str) -> Edit:
    old, new = matcher.sides
    old_nodes = [i for side, i in items if side == "old"]
    new_nodes = [i for side, i in items if side == "new"]
    edit = Edit(region, [node_info(old, i, named=False) for i in old_nodes],
                [node_info(new, i, named=_renamed(matcher, i)) for i in new_nodes])
    if [n.label for n in edit.old] == [n.label for n in edit.new]:
        edit.details = [d for i in old_nodes if i in old.partner for d in _pair_details(matcher, i)]
    return edit


def _renamed(matcher: _Matcher, new_index: int) -> bool:
    """Whether a new node's name is news: it is added, or its name differs from its twin's beyond numbers."""
    old, new = matcher.sides
    twin = new.partner.get(new_index)
    return twin is None or _name_pattern(old.node(twin).name) != _name_pattern(new.node(new_index).name)


def _name_pattern(name: str | None) -> str:
    return re.sub(r"[0-9]+", "*", name or "")


def node_info(side: DiffSide, index: int, named: bool) -> NodeInfo:
    """The node as the diff shows it; `named` adds its name unless it is an exporter path."""
    node = side.node(index)
    parts = [_constant_label(side.constant_text(t)) for t in node.inputs if isinstance(t, gs.Constant)]
    parts += [f"{k}={_short(v)}" for k, v in _attrs(node)]
    label = f"{_qualified_op(node)}({', '.join(parts)})" if parts else _qualified_op(node)
    if named and node.name and not node.name.startswith("/"):
        label += f" named {_name_pattern(node.name)}"
    return NodeInfo(_qualified_op(node), label, side.region(index))


def _constant_label(text: str) -> str:
    """`const[4 int64] = [2, 16, 2, 16]` -> `[2, 16, 2, 16]`; `const[32x32 float32 #3cfa]` -> `32x32 float32`."""
    if " = " in text:
        return _short(text.split(" = ", 1)[1])
    return text[len("const["):].split(" #")[0].rstrip("]")


def _short(value: str) -> str:
    return value if len(value) <= VALUE_WIDTH else value[:VALUE_WIDTH - 4] + "...]"


def _pair_details(matcher: _Matcher, index: int) -> list[str]:
    """What differs in a changed pair whose labels read the same: constant values, wiring."""
    old, new = matcher.sides
    mine, twin = old.node(index), new.node(old.partner[index])
    details = []
    for slot, (a, b) in enumerate(zip(mine.inputs, twin.inputs)):
        if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
            if old.constant_text(a) != new.constant_text(b):
                details.append(f"input {slot} values changed ({_constant_label(new.constant_text(b))})")
        elif matcher._input_anchors(0, index)[slot] != matcher._input_anchors(1, old.partner[index])[slot]:
            details.append(f"input {slot} now from {_source(new, b)} (was {_source(old, a)})")
    if len(mine.inputs) != len(twin.inputs):
        details.append(f"{len(mine.inputs)} -> {len(twin.inputs)} inputs")
    return details


def _source(side: DiffSide, tensor: gs.Tensor) -> str:
    if isinstance(tensor, gs.Constant):
        return _constant_label(side.constant_text(tensor))
    if not tensor.inputs:
        return f"input {tensor.name}" if tensor.name else "nothing"
    return _qualified_op(tensor.inputs[0])


def _side_text(nodes: list[NodeInfo]) -> str:
    if len(nodes) <= LISTED_NODES:
        return ", ".join(_counted([n.label for n in nodes]))
    ops = Counter(n.op for n in nodes)
    by_count = sorted(ops.items(), key=lambda item: (-item[1], item[0]))
    return f"{len(nodes)} nodes: " + ", ".join(f"{op} x{count}" for op, count in by_count)


def _collapsed_regions(edits: list[Edit]) -> list[tuple[str, list[str]]]:
    """(title, lines) per region in order; layers whose edits of one part read the same are merged."""
    lines: dict[str, list[str]] = defaultdict(list)
    for edit in edits:
        lines[edit.region].append(edit.text())
    counted = {region: _counted(texts) for region, texts in lines.items()}
    same_part: dict[tuple, list[int]] = defaultdict(list)
    for region, texts in counted.items():
        layer = layer_of(region)
        if layer:
            same_part[(layer[1], tuple(texts))].append(layer[0])
    out, shown = [], set()
    for region in sorted(counted, key=region_rank):
        layer = layer_of(region)
        if not layer:
            out.append((region, counted[region]))
            continue
        key = (layer[1], tuple(counted[region]))
        if key in shown:
            continue
        shown.add(key)
        layers = same_part[key]
        title = region if len(layers) == 1 else f"layers {_ranges(layers)} {layer[1]} (the same change in each)"
        out.append((title, counted[region]))
    return out


def _region_list(regions: set[str]) -> str:
    """"embeddings, layers 0-23 attention, layer 5 ffn, head": the layers of one part as ranges."""
    numbers: dict[str, list[int]] = defaultdict(list)
    for region in regions:
        layer = layer_of(region)
        if layer:
            numbers[layer[1]].append(layer[0])
    names: dict[str, None] = {}
    for region in sorted(regions, key=region_rank):
        layer = layer_of(region)
        if not layer:
            names[region] = None
        else:
            count = len(numbers[layer[1]])
            names[f"layer{'s' if count > 1 else ''} {_ranges(numbers[layer[1]])} {layer[1]}"] = None
    return ", ".join(names)


def _counted(texts: list[str]) -> list[str]:
    counts = Counter(texts)
    return [f"{k}x {text}" if k > 1 else text for text, k in sorted(counts.items(), key=lambda i: texts.index(i[0]))]


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)
