"""`bertopt run --report html`: the run's report as one self-contained HTML page.

report.json is for programs; this page is for the reviewer who wants to see, in one file they can
mail or attach to a ticket, what every pass did (a picture of one representative layer, drawn by
bertopt.report.render, beside the text diff), the atc command, and how far each candidate's outputs are
from the original's (tables and histograms of |candidate - reference|). Everything is inline (CSS,
SVG): the page fetches nothing and needs no JavaScript, so it opens the same offline and in years.

The pictures are drawn while the pipeline runs (`PassPictures` is one of the PassManager's
instruments): only the drawing and the diff text are kept, never a graph copy.
"""

from __future__ import annotations

import math
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from bertopt.files import write_text
from bertopt.pipeline import Instrument
from bertopt.report.diff import diff_graphs
from bertopt.report.render import render_diff, representative_regions
from bertopt.validation.parity import AbsHistogram, OutputStats

if TYPE_CHECKING:
    from bertopt.ascend.atc import AtcResult
    from bertopt.flow.run import RunReport
    from bertopt.pipeline import PassRecord, PassResult, PassStep
    from bertopt.validation.candidates import CandidateReport

REPORT_HTML = "report.html"

# Histogram drawing, in SVG user units.
BAR_AREA_WIDTH, BAR_AREA_HEIGHT, MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP = 400, 120, 54, 34, 14
ZERO_BAR_GAP = 10

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       background: #f6f8fa; margin: 0; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 0 0 8px; }
.subtitle { color: #57606a; margin: 0 0 16px; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 14px 16px; margin: 0 0 14px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border-bottom: 1px solid #e5e8eb; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.name { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 6px 18px; }
.facts div { overflow-wrap: anywhere; background: #fff; border: 1px solid #e5e8eb; border-radius: 6px;
             padding: 5px 9px; }
.facts b { display: block; font-size: 11px; color: #57606a; font-weight: 600; text-transform: uppercase; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; font-weight: 600; }
.yes, .pass { background: #dafbe1; color: #116329; }
.no, .skipped { background: #eaeef2; color: #57606a; }
.fail { background: #ffebe9; color: #a40e26; }
.notes { color: #57606a; font-size: 13px; }
.pass-diff { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px; align-items: start; }
figure.picture { margin: 0; }
.pass-diff.wide { grid-template-columns: minmax(0, 1fr); }
.picture svg { display: block; max-width: 100%; max-height: 1000px; width: auto; height: auto; margin: 0 auto; }
.picture .missing { color: #9a6700; background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 10px; }
pre { background: #f6f8fa; border: 1px solid #e5e8eb; border-radius: 6px; padding: 10px; margin: 0;
      font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
      overflow-wrap: anywhere; }
.histograms { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 14px; }
.histograms svg { display: block; width: 100%; height: auto; }
.legend { color: #57606a; font-size: 12px; margin: 4px 0 0; }
"""


@dataclass(frozen=True)
class PassPicture:
    """What one pass changed: the inline drawing (or why there is none) and the diff as text."""

    index: int
    name: str
    svg: str | None
    caption: str
    summary: str


@dataclass
class PassPictures(Instrument):
    """The PassManager's instrument that diffs and draws each pass that changed something, at once."""

    pictures: list[PassPicture] = field(default_factory=list)

    def after(self, step: PassStep, graph: gs.Graph, facts, result: PassResult, record: PassRecord) -> None:
        if result.changed:
            self.draw(step.index, step.name, step.before, graph)

    def draw(self, index: int, name: str, before: gs.Graph, after: gs.Graph) -> None:
        diff = diff_graphs(before, after, f"input of {name}", f"output of {name}")
        with tempfile.TemporaryDirectory(prefix="bertopt-report-") as folder:
            result = render_diff(diff, Path(folder) / "diff.svg")
            svg = inline_svg(result.path.read_text(encoding="utf-8"), f"p{index}") if result.drawn else None
        caption = (f"one representative part: {', '.join(sorted(representative_regions(diff)))}"
                   if svg else result.note)
        self.pictures.append(PassPicture(index, name, svg, caption, diff.text()))


def inline_svg(svg: str, id_prefix: str) -> str:
    """dot's SVG file made fit for inlining: no XML prolog or DOCTYPE, element ids unique on the page."""
    body = svg[svg.index("<svg"):]
    return re.sub(r'\bid="', f'id="{id_prefix}-', body)


def is_wide(svg: str) -> bool:
    """A drawing much wider than tall gets the card's full width, its text below instead of beside it."""
    size = re.search(r'<svg[^>]*?width="([\d.]+)pt"[^>]*?height="([\d.]+)pt"', svg)
    return bool(size) and float(size.group(1)) > 1.5 * float(size.group(2))


def write_html_report(report: RunReport, pictures: list[PassPicture], path: Path) -> Path:
    """Write the page atomically (whole or not at all) and return its path."""
    write_text(path, render_page(report, pictures))
    return path


def render_page(report: RunReport, pictures: list[PassPicture]) -> str:
    title = f"bertopt run: {report.model_description}"
    sections = [_header(report), _pass_section(report.passes), _pictures_section(pictures),
                _atc_section(report.atc), _validation_section(report.validation),
                _histogram_section(report.validation)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(sections) + "\n</main>\n</body>\n</html>\n")


def _header(report: RunReport) -> str:
    facts = "".join(f"<div><b>{escape(key.replace('_', ' '))}</b>{escape(_fact_text(value))}</div>"
                    for key, value in report.facts.to_dict().items())
    return (f'<header id="summary"><h1>{escape(report.model_description)}</h1>\n'
            f'<p class="subtitle">original <code>{escape(str(report.original_model))}</code> &rarr; '
            f'optimized <code>{escape(str(report.optimized_model))}</code></p>\n'
            f'<div class="facts">{facts}</div></header>')


def _fact_text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def _pass_section(records: list[PassRecord]) -> str:
    rows = "".join(
        f'<tr><td class="name"><code>{escape(r.name)}</code></td><td>{_badge("yes" if r.changed else "no")}</td>'
        f'<td class="num">{r.seconds:.2f}</td><td class="num">{r.verify_seconds:.2f}</td>'
        f"<td>{escape(', '.join(f'{k}={v}' for k, v in r.counts.items() if v) or '-')}</td>"
        f'<td class="notes">{"<br>".join(escape(note) for note in r.notes)}</td></tr>'
        for r in records)
    return ('<section id="passes"><h2>Passes</h2>\n<table><thead><tr><th>pass</th><th>changed</th>'
            '<th>seconds</th><th>verify s</th><th>counts</th><th>notes</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></section>")


def _pictures_section(pictures: list[PassPicture]) -> str:
    if not pictures:
        return '<section id="pictures"><h2>What each pass changed</h2><p>No pass changed the graph.</p></section>'
    cards = "\n".join(_picture_card(picture) for picture in pictures)
    return ('<section id="pictures"><h2>What each pass changed</h2>\n<p class="notes">Removed nodes red, '
            f"added green, changed amber; before on the left, after on the right.</p>\n{cards}</section>")


def _picture_card(picture: PassPicture) -> str:
    drawing = picture.svg or f'<p class="missing">{escape(picture.caption)}</p>'
    layout = "pass-diff wide" if picture.svg and is_wide(picture.svg) else "pass-diff"
    return (f'<div class="card pass-picture" id="pass-{picture.index:02d}">'
            f"<h3>#{picture.index + 1} <code>{escape(picture.name)}</code></h3>"
            f'<div class="{layout}"><figure class="picture">{drawing}'
            f'<figcaption class="legend">{escape(picture.caption) if picture.svg else ""}</figcaption></figure>'
            f"<pre>{escape(picture.summary)}</pre></div></div>")


def _atc_section(atc: AtcResult | None) -> str:
    if atc is None:
        body = "<p>Skipped: <code>--target ort</code> compiles nothing.</p>"
    else:
        body = (f"<p>soc <b>{escape(atc.soc)}</b> (from {escape(atc.soc_source)}), written to "
                f"<code>{escape(str(atc.script))}</code></p>\n<pre>{escape(shlex.join(atc.argv))}</pre>\n"
                f'<p>{_badge(_atc_badge(atc.status), atc.status)} {escape(atc.summary_line())}</p>')
    return f'<section id="atc"><h2>ATC</h2>\n<div class="card">{body}</div></section>'


def _atc_badge(status: str) -> str:
    return {"ran": "pass", "failed": "fail"}.get(status, "skipped")


def _validation_section(candidates: list[CandidateReport]) -> str:
    rows = "".join(_candidate_rows(candidate) for candidate in candidates)
    notes = "".join(f"<li><b>{escape(c.name)}</b>: {escape(note)}</li>" for c in candidates for note in c.notes)
    return ('<section id="validation"><h2>Validation against the original (ONNX Runtime fp32)</h2>\n'
            "<table><thead><tr><th>candidate</th><th>output</th><th>abs max</th><th>abs p99</th>"
            "<th>rel max</th><th>rel p99</th><th>atol / rtol</th><th>verdict</th><th>same span</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>" + (f'<ul class="notes">{notes}</ul>' if notes else "") + "</section>")


def _candidate_rows(candidate: CandidateReport) -> str:
    label = f"{escape(candidate.name)} <span class=\"notes\">[{escape(candidate.kind)}]</span>"
    if candidate.comparison is None:
        why = (_badge("skipped") + " " + escape(candidate.skipped) if candidate.skipped
               else _badge("fail", "failed to run") + " " + escape(candidate.error or ""))
        return f'<tr><td>{label}</td><td colspan="8">{why}</td></tr>'
    span = candidate.comparison.span_agreement
    return "".join(
        f"<tr><td>{label if i == 0 else ''}</td><td>{escape(stats.name)}</td>{_stat_cells(stats)}"
        f"<td class=\"num\">{f'{span:.1%}' if i == 0 and span is not None else ''}</td></tr>"
        for i, stats in enumerate(candidate.comparison.outputs))


def _stat_cells(stats: OutputStats) -> str:
    numbers = "".join(f'<td class="num">{value:.2g}</td>'
                      for value in (stats.max_abs, stats.p99_abs, stats.max_rel, stats.p99_rel))
    verdict = _badge("pass") if stats.passed else _badge("fail") + (f" {escape(stats.reason)}" if stats.reason else "")
    return f'{numbers}<td class="num">{stats.atol:g} / {stats.rtol:g}</td><td>{verdict}</td>'


def _badge(kind: str, text: str | None = None) -> str:
    return f'<span class="badge {kind}">{escape(text or kind)}</span>'


def _histogram_section(candidates: list[CandidateReport]) -> str:
    cards = "".join(
        f'<div class="card"><h3>{escape(c.name)} &middot; <code>{escape(stats.name)}</code></h3>'
        f"{histogram_svg(stats.abs_histogram, stats.atol)}</div>"
        for c in candidates if c.comparison is not None
        for stats in c.comparison.outputs if stats.abs_histogram is not None)
    body = (f'<div class="histograms">{cards}</div><p class="legend">Elements per half-decade bin of '
            "|candidate &minus; reference| (log scale); the grey bar counts exactly equal elements, the red "
            "dashed line is the candidate's atol.</p>") if cards else "<p>No candidate was compared.</p>"
    return f'<section id="histograms"><h2>Output differences</h2>\n{body}</section>'


def histogram_svg(histogram: AbsHistogram, atol: float) -> str:
    """Bars drawn by hand: one for exact zeros, then one per log-spaced bin, decades labelled."""
    counts = [histogram.zeros, *histogram.counts]
    tallest = max(max(counts), 1)
    step = BAR_AREA_WIDTH / (len(histogram.counts) + 1)
    width, height = MARGIN_LEFT + BAR_AREA_WIDTH + ZERO_BAR_GAP + 12, MARGIN_TOP + BAR_AREA_HEIGHT + MARGIN_BOTTOM
    base = MARGIN_TOP + BAR_AREA_HEIGHT
    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" '
             f'font-family="system-ui, Helvetica, Arial, sans-serif" font-size="10">',
             f'<text x="{MARGIN_LEFT - 6}" y="{MARGIN_TOP + 4}" text-anchor="end" fill="#57606a">{tallest}</text>',
             f'<text x="{MARGIN_LEFT - 6}" y="{base}" text-anchor="end" fill="#57606a">0</text>',
             f'<line x1="{MARGIN_LEFT}" y1="{base}" x2="{width - 8}" y2="{base}" stroke="#8c959f"/>']
    for i, count in enumerate(counts):
        x = MARGIN_LEFT + i * step + (ZERO_BAR_GAP if i else 0)
        bar = BAR_AREA_HEIGHT * count / tallest
        fill = "#8c959f" if i == 0 else "#2f81f7"
        parts.append(f'<rect x="{x + 1:.1f}" y="{base - bar:.1f}" width="{step - 2:.1f}" height="{bar:.1f}" '
                     f'fill="{fill}"><title>{_bin_text(histogram, i)}: {count}</title></rect>')
    parts.append(f'<text x="{MARGIN_LEFT + step / 2:.1f}" y="{base + 14}" text-anchor="middle">=0</text>')
    parts += _decade_labels(histogram, step, base)
    parts += _atol_marker(histogram, atol, step, base)
    parts.append(f'<text x="{MARGIN_LEFT + BAR_AREA_WIDTH / 2:.1f}" y="{base + 28}" text-anchor="middle" '
                 'fill="#57606a">|candidate &#8722; reference|</text></svg>')
    return "".join(parts)


def _bin_x(histogram: AbsHistogram, value: float, step: float) -> float:
    """x of `value` on the log axis of the bins (bin i spans edges[i]..edges[i+1])."""
    first, last = math.log10(histogram.edges[0]), math.log10(histogram.edges[-1])
    fraction = (math.log10(value) - first) / (last - first)
    return MARGIN_LEFT + ZERO_BAR_GAP + step + fraction * step * len(histogram.counts)


def _decade_labels(histogram: AbsHistogram, step: float, base: float) -> list[str]:
    decades = [edge for edge in histogram.edges if float(math.log10(edge)).is_integer()]
    return [f'<text x="{_bin_x(histogram, edge, step):.1f}" y="{base + 14}" text-anchor="middle">'
            f"1e{int(math.log10(edge))}</text>" for edge in decades[1::2]]


def _atol_marker(histogram: AbsHistogram, atol: float, step: float, base: float) -> list[str]:
    if not histogram.edges[0] <= atol <= histogram.edges[-1]:
        return []
    x = _bin_x(histogram, atol, step)
    return [f'<line x1="{x:.1f}" y1="{MARGIN_TOP - 4}" x2="{x:.1f}" y2="{base}" stroke="#cf222e" '
            'stroke-dasharray="4 3"/>',
            f'<text x="{x + 4:.1f}" y="{MARGIN_TOP + 4}" fill="#cf222e">atol {atol:g}</text>']


def _bin_text(histogram: AbsHistogram, index: int) -> str:
    if index == 0:
        return "exactly equal"
    return f"{histogram.edges[index - 1]:.2g} to {histogram.edges[index]:.2g}"
