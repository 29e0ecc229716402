"""Pictures of a graph diff: one representative layer's changes, old and new side by side.

`render_diff(diff, "diff.svg")` draws, with Graphviz `dot`, the edits of the layer whose changes are
the most common among the layers (layers that all got the same rewrite need one picture, not
twelve), or every edit when no layer changed, plus `context` hops of unchanged neighbours. The old
graph is the left cluster, the new one the right; removed nodes are red, added green, changed amber.

Graphviz is a system package (Debian `graphviz`), not a Python one. Without `dot` nothing is drawn
and the result says why in one line, for the caller to print below the text diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bertopt.errors import BertoptError
from bertopt.model.regions import layer_of
from bertopt.report.diff import DiffSide, GraphDiff, node_info

FORMATS = ("svg", "png")
FILL = {"removed": "#f4b6b6", "added": "#b9e6b9", "changed": "#ffd98a", "unchanged": "#f2f2f2"}
BORDER = {"removed": "#b03030", "added": "#2e7d32", "changed": "#b07800", "unchanged": "#9e9e9e"}
DOT_TIMEOUT = 120


@dataclass(frozen=True)
class RenderResult:
    """The picture written, or None with the reason there is none."""

    path: Path | None
    note: str

    @property
    def drawn(self) -> bool:
        return self.path is not None


def render_diff(diff: GraphDiff, path: str | os.PathLike, fmt: str = "svg", context: int = 1,
                whole: bool = False) -> RenderResult:
    """Draw the diff's representative changes to `path` (written whole or not at all).

    `whole` draws every node of the pictured regions (e.g. one whole attention layer before and
    after), not only the changes; `context` hops of neighbours are added around either.

    Raises BertoptError for an unknown format or a negative context, and when `dot` itself fails.
    """
    if fmt not in FORMATS:
        raise BertoptError(f"picture format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if context < 0:
        raise BertoptError(f"--context {context}: must be 0 or more")
    if not diff.edits:
        return RenderResult(None, "no picture: the graphs have no structural difference")
    dot = shutil.which("dot")
    if dot is None:
        return RenderResult(None, "no picture: Graphviz `dot` is not installed (Debian: apt-get install graphviz)")
    regions = representative_regions(diff)
    _run_dot(dot, dot_source(diff, regions, context, whole), Path(path), fmt)
    return RenderResult(Path(path), f"picture of {', '.join(sorted(regions))}: {path}")


def representative_regions(diff: GraphDiff) -> set[str]:
    """The changed regions of the layer whose changes are the most common; all regions without layers."""
    by_layer: dict[int, list[str]] = {}
    for edit in diff.edits:
        layer = layer_of(edit.region)
        if layer:
            by_layer.setdefault(layer[0], []).append(f"{layer[1]}: {edit.text()}")
    if not by_layer:
        return {edit.region for edit in diff.edits}
    kinds = Counter(tuple(sorted(lines)) for lines in by_layer.values())
    layer = min(number for number, lines in by_layer.items() if kinds[tuple(sorted(lines))] == max(kinds.values()))
    return {edit.region for edit in diff.edits if (layer_of(edit.region) or (None,))[0] == layer}


def dot_source(diff: GraphDiff, regions: set[str], context: int, whole: bool = False) -> str:
    """The Graphviz text: one cluster per graph with the changed nodes of `regions` and their context."""
    lines = ["digraph diff {", "  rankdir=TB; newrank=true; compound=true;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
             '  edge [color="#777777", arrowsize=0.6];']
    for prefix, side, title in (("old", diff.old, f"before: {diff.old_label}"),
                                ("new", diff.new, f"after: {diff.new_label}")):
        folded = sum(1 for i in side.folded if side.edit_regions[i] in regions)
        title += f" ({folded} nodes folded to constants, not drawn)" if folded else ""
        lines += _cluster(prefix, side, title, _picked(side, regions, context, whole))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _picked(side: DiffSide, regions: set[str], context: int, whole: bool) -> list[int]:
    """Changed nodes of `regions` (a changed node counts by its old region), or all their nodes when
    `whole`, and `context` hops around. Nodes folded to constants are left out: the cluster's title
    counts them instead.
    """
    changed = {i for i, status in side.status.items()
               if status != "unchanged" and side.edit_regions.get(i) in regions and i not in side.folded}
    if whole:
        changed |= {i for i in range(len(side.order)) if side.region(i) in regions and i not in side.folded}
    picked, frontier = set(changed), set(changed)
    for _ in range(context):
        frontier = {n for i in frontier for n in _neighbours(side, i)} - picked - side.folded
        picked |= frontier
    return sorted(picked)


def _neighbours(side: DiffSide, index: int) -> set[int]:
    node = side.node(index)
    producers = {side.index[id(t.inputs[0])] for t in node.inputs if t.inputs}
    return producers | {consumer for _, consumer, _ in side.consumers(index)}


def _cluster(prefix: str, side: DiffSide, title: str, picked: list[int]) -> list[str]:
    lines = [f"  subgraph cluster_{prefix} {{", f'    label="{_escape(title)}"; fontname="Helvetica"; '
             'fontsize=13; style="rounded"; color="#bbbbbb";']
    chosen = set(picked)
    for index in picked:
        status = side.status[index]
        label = node_info(side, index, named=prefix == "new").label
        lines.append(f'    {prefix}{index} [label="{_escape(label)}", fillcolor="{FILL[status]}", '
                     f'color="{BORDER[status]}", class="{status}", tooltip="{_escape(side.node(index).name or "")}"];')
    for index in picked:
        for _, consumer, _ in side.consumers(index):
            if consumer in chosen:
                lines.append(f"    {prefix}{index} -> {prefix}{consumer};")
    lines.append("  }")
    return lines


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _run_dot(dot: str, source: str, path: Path, fmt: str) -> None:
    """dot writes into a staging folder beside `path`; the picture is renamed into place when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        done = subprocess.run([dot, f"-T{fmt}", "-o", str(staged)], input=source, text=True, capture_output=True,
                              timeout=DOT_TIMEOUT)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise BertoptError(f"Graphviz dot failed ({done.returncode}): {first}")
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
