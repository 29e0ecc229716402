"""What ATC actually fused: its fusion_result.json, in every layout CANN has written.

ATC writes the file in its working directory, or under ``$ASCEND_WORK_PATH/FE/<pid>/``, when
``--export_compile_stat`` is 1 (the default). Per compiled graph it lists every fusion pass that
matched at least once, with ``match_times`` and ``effect_times`` as decimal strings (ub_fusion passes
also ``repository_hit_times``); a pass absent from the file never matched. Three layouts:

- CANN 8.0-9.x: ONE object keyed ``"session_and_graph_id_<S>_<G>"``, each value
  ``{"graph_fusion": {PASS: {...}}, "ub_fusion": {PASS: {...}}}`` (either part may be missing). The
  writer, `FusionStatisticWriter::WriteAllFusionInfoToJsonFile` in repo ``hicann/ge``,
  ``compiler/engines/nn_engine/fusion/common/fusion_statistic/fusion_statistic_writer.cc`` (lines
  54-102, 140-168), appends a later graph by overwriting the closing ``\\n}`` with ``,\\n`` and the
  new keys, so a session/graph key can repeat; the parser keeps every repeat (object_pairs_hook),
  where json.load would keep only the last.
- CANN 7.0.x: a list of ``{"graph_fusion": ..., "session_and_graph_id": "0_0", "ub_fusion": ...}``
  objects; a rerun in the same folder appends a second list (``}][{``, not valid JSON). From the
  project's facts note (ascend-facts.md section 4, seen in real files); no writer source of this
  layout was found to re-check it.
- CANN 5.x: such objects written back to back with nothing between (``}{``): the older
  `FusionStatisticWriter::WriteJsonFile` opens the file with O_APPEND and writes ``js.dump(4)`` per
  graph (a 2019-2020 Huawei `fe` source found with find_string "SESSION_AND_GRAPH_ID"; the index
  does not name its repository).

Counts are summed over every graph record (ATC compiles one model as one or more graphs; a repeated
record is a later compilation stage of the same graph, counted again by the recorder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bertopt.ascend.gates import FusionPrediction
from bertopt.errors import BertoptError

FUSION_RESULT_NAME = "fusion_result.json"
GRAPH_FUSION, UB_FUSION = "graph_fusion", "ub_fusion"
SESSION_KEY = "session_and_graph_id"
COUNTERS = ("match_times", "effect_times", "repository_hit_times")
LAYOUTS = {"object": "CANN 8.0-9.x", "list": "CANN 7.0.x", "concatenated": "CANN 5.x"}


@dataclass
class PassTimes:
    match_times: int = 0
    effect_times: int = 0
    repository_hit_times: int | None = None  # ub_fusion passes only

    def add(self, other: "PassTimes") -> None:
        self.match_times += other.match_times
        self.effect_times += other.effect_times
        if other.repository_hit_times is not None:
            self.repository_hit_times = (self.repository_hit_times or 0) + other.repository_hit_times


@dataclass
class FusionResult:
    layout: str  # a key of LAYOUTS
    graphs: list[str]  # the session/graph ids read, in file order, repeats kept
    graph_fusion: dict[str, PassTimes] = field(default_factory=dict)  # summed over graphs
    ub_fusion: dict[str, PassTimes] = field(default_factory=dict)

    def times(self, pass_name: str) -> PassTimes | None:
        """The pass's summed counters (graph fusion, else UB fusion); None when it never matched."""
        return self.graph_fusion.get(pass_name) or self.ub_fusion.get(pass_name)

    def effect_times(self, pass_name: str) -> int:
        times = self.times(pass_name)
        return times.effect_times if times else 0

    def to_dict(self) -> dict:
        def table(passes: dict[str, PassTimes]) -> dict:
            return {name: {k: v for k, v in vars(t).items() if v is not None} for name, t in sorted(passes.items())}

        return {"layout": self.layout, "written_by": LAYOUTS[self.layout], "graphs": self.graphs,
                GRAPH_FUSION: table(self.graph_fusion), UB_FUSION: table(self.ub_fusion)}


def read_fusion_result(path: str | Path) -> FusionResult:
    """Parse ATC's fusion_result.json; BertoptError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BertoptError(f"{path}: cannot read ATC's fusion result ({type(exc).__name__})") from None
    return parse_fusion_result(text, str(path))


def parse_fusion_result(text: str, where: str = FUSION_RESULT_NAME) -> FusionResult:
    """Parse the text of a fusion_result.json in any of the three layouts (see the module docstring)."""
    values = _json_values(text, where)
    records, layout = _records(values, where)
    result = FusionResult(layout=layout, graphs=[graph for graph, _ in records])
    for graph, body in records:
        for key, passes in body:
            if key in (GRAPH_FUSION, UB_FUSION):
                target = result.graph_fusion if key == GRAPH_FUSION else result.ub_fusion
                for name, counters in _pairs(passes, f"{where}: {graph} {key}"):
                    target.setdefault(name, PassTimes()).add(_times(counters, f"{where}: {graph} {key} {name}"))
    return result


class _Pairs(list):
    """A JSON object as its (key, value) pairs, every repeated key kept."""


def _json_values(text: str, where: str) -> list:
    """Every JSON value in `text`, written back to back (`}{`, `][`) or alone."""
    decoder = json.JSONDecoder(object_pairs_hook=_Pairs)
    values, position = [], 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            break
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise BertoptError(f"{where}: not ATC's fusion result (invalid JSON at line {exc.lineno}, "
                               f"column {exc.colno}: {exc.msg})") from None
        values.append(value)
    if not values:
        raise BertoptError(f"{where}: empty (ATC writes the file only when some fusion pass matched)")
    return values


def _records(values: list, where: str) -> tuple[list[tuple[str, _Pairs]], str]:
    """(graph id, record body) for every graph record, and the layout they were written in."""
    if all(isinstance(v, list) and not isinstance(v, _Pairs) for v in values):
        return [_old_record(item, where) for value in values for item in value], "list"
    if not all(isinstance(v, _Pairs) for v in values):
        raise BertoptError(f"{where}: not ATC's fusion result (mixes JSON lists and objects)")
    if all(any(key == SESSION_KEY for key, _ in v) for v in values):
        return [_old_record(v, where) for v in values], "concatenated"
    if len(values) > 1:
        raise BertoptError(f"{where}: not ATC's fusion result ({len(values)} JSON objects keyed by graph)")
    records = []
    for key, body in values[0]:
        if not key.startswith(SESSION_KEY + "_"):
            raise BertoptError(f"{where}: not ATC's fusion result (unexpected key {key!r})")
        records.append((key[len(SESSION_KEY) + 1:], _pairs(body, f"{where}: {key}")))
    return records, "object"


def _old_record(item, where: str) -> tuple[str, _Pairs]:
    pairs = _pairs(item, f"{where}: a graph record")
    graph = next((value for key, value in pairs if key == SESSION_KEY), None)
    if not isinstance(graph, str):
        raise BertoptError(f"{where}: a graph record without a {SESSION_KEY!r} string")
    return graph, pairs


def _pairs(value, where: str) -> _Pairs:
    if not isinstance(value, _Pairs):
        raise BertoptError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _times(counters, where: str) -> PassTimes:
    found = {key: _count(value, f"{where} {key}") for key, value in _pairs(counters, where) if key in COUNTERS}
    return PassTimes(found.get("match_times", 0), found.get("effect_times", 0), found.get("repository_hit_times"))


def _count(value, where: str) -> int:
    """A counter: ATC writes decimal strings ("12"); a bare integer is taken too."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip().isdigit():
        raise BertoptError(f"{where}: {value!r} is not a decimal count")
    return int(value)


def compare_with_prediction(prediction: FusionPrediction, fusion: FusionResult) -> list[str]:
    """Where ATC fused less than predicted: one problem per attention pass (empty: as predicted).

    An attention pass predicted to fuse N blocks is a problem when fusion_result.json shows it took
    no effect (effect_times 0, or the pass absent: it never matched) or took effect fewer than N
    times. More effects than predicted are not a problem (ATC may fuse what bertopt called unfused).
    """
    problems = []
    expected = prediction.expected_effects()
    for name in prediction.attention_passes:
        want = expected.get(name, 0)
        if want == 0:
            continue
        times = fusion.times(name)
        if times is None:
            problems.append(f"{name} was predicted to fuse {want} block(s) but is absent from ATC's "
                            f"{FUSION_RESULT_NAME} (it never matched)")
        elif times.effect_times == 0:
            problems.append(f"{name} was predicted to fuse {want} block(s) but took no effect "
                            f"(match_times {times.match_times}, effect_times 0)")
        elif times.effect_times < want:
            problems.append(f"{name} took effect {times.effect_times} time(s), fewer than the {want} block(s) "
                            "predicted to fuse")
    return problems
