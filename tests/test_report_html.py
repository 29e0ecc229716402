"""`bertopt run --report html`: one self-contained page, produced by the real CLI, that a real browser renders."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from test_cli import TIMEOUT, assert_one_line_error, bertopt

from bertopt.files import write_text
from bertopt.report.html import histogram_svg
from bertopt.validation.parity import HISTOGRAM_EDGES, compare_outputs

SECTIONS = ("summary", "passes", "pictures", "atc", "validation", "histograms")
WINDOW = (1400, 2400)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class PageParser(HTMLParser):
    """What the assertions need: element ids, URL-bearing attributes, tags and text per section."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.urls: list[str] = []
        self.tags: dict[str, int] = {}
        self.text: dict[str, list[str]] = {}
        self._section: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(values["id"])
            if tag in ("section", "header"):
                self._section = values["id"]
        self.urls += [value or "" for name, value in attrs if name.split(":")[-1] in ("src", "href", "action")]

    def handle_data(self, data: str) -> None:
        if self._section:
            self.text.setdefault(self._section, []).append(data)

    def section_text(self, name: str) -> str:
        return " ".join(self.text.get(name, []))


def run_html(output: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["run", "bert-tiny", "--seq", "16", "--batch", "2", "--report", "html", "--output", str(output)]
    if env is None:
        return bertopt(*args)
    return subprocess.run([sys.executable, "-m", "bertopt", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def html_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("html-run") / "out"
    result = run_html(output)
    assert result.returncode == 0, result.stderr
    assert "report.html" in result.stdout
    return output


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_page_has_every_section(html_run):
    report = json.loads((html_run / "report.json").read_text())
    page = parse(html_run / "report.html")
    assert all(section in page.ids for section in SECTIONS), page.ids
    assert report["model_description"] in page.section_text("summary")
    changed = [p["name"] for p in report["passes"] if p["changed"]]
    assert all(name in page.section_text("passes") for name in changed)
    assert [i for i in page.ids if i.startswith("pass-")] == [
        f"pass-{i:02d}" for i, p in enumerate(report["passes"]) if p["changed"]]
    assert "--soc_version" in page.section_text("atc") and "atc not found" in page.section_text("atc")
    assert "start_logits" in page.section_text("validation") and "pass" in page.section_text("validation")
    compared = sum(len(c["outputs"]) for c in report["validation"] if c.get("outputs"))
    # One dot drawing per changed pass, one histogram per compared output.
    assert page.tags["svg"] == len(changed) + compared


def test_page_is_self_contained(html_run):
    page = parse(html_run / "report.html")
    assert not [url for url in page.urls if "://" in url or url.startswith("//")], page.urls
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert "url(http" not in (html_run / "report.html").read_text()
    assert not list(html_run.glob(".report.html.*")), "a temporary file was left behind"


def test_report_json_keeps_only_small_histograms(html_run):
    report = json.loads((html_run / "report.json").read_text())
    emulation = next(c for c in report["validation"] if c["kind"] == "emulation")
    histogram = emulation["outputs"][0]["abs_histogram"]
    assert len(histogram["counts"]) == len(HISTOGRAM_EDGES) - 1 == 20
    assert histogram["zeros"] + sum(histogram["counts"]) == 2 * 2 * 16  # samples x batch x seq
    assert (html_run / "report.json").stat().st_size < 64_000


def test_without_dot_the_page_says_so(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = run_html(tmp_path / "out", env=dict(os.environ, PATH=str(empty_bin), COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    page = parse(tmp_path / "out" / "report.html")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    changed = sum(1 for p in report["passes"] if p["changed"])
    assert page.section_text("pictures").count("Graphviz `dot` is not installed") == changed
    compared = sum(len(c["outputs"]) for c in report["validation"] if c.get("outputs"))
    assert page.tags["svg"] == compared, "only the histograms are drawn without dot"


def test_bad_report_value_is_one_line_before_any_work(tmp_path):
    assert_one_line_error(bertopt("run", "bert-tiny", "--report", "pdf", "--output", str(tmp_path / "o")),
                          2, "--report 'pdf': expected json or html")
    assert not (tmp_path / "o").exists()


def test_json_runs_draw_nothing():
    from bertopt.flow.run import _pass_pictures

    assert _pass_pictures("json") is None  # no instrument: normal runs keep no diff and no drawing


def test_histogram_counts_every_defined_difference():
    reference = [{"x": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}]
    candidate = [{"x": np.array([1.0, 2.0 + 1e-6, 3.0 + 1e-3, 4.0 + 1e-12, np.nan])}]
    histogram = compare_outputs(reference, candidate).outputs[0].abs_histogram
    assert histogram.zeros == 1 and sum(histogram.counts) == 3  # the NaN is counted by nan_or_inf instead
    assert histogram.counts[0] == 1  # below the first edge counts in the first bin
    svg = histogram_svg(histogram, atol=1e-4)
    assert svg.count("<rect") == len(histogram.counts) + 1 and "atol 0.0001" in svg


def test_write_text_is_whole_or_nothing(tmp_path):
    target = tmp_path / "report.html"
    with pytest.raises(TypeError):
        write_text(target, None)
    assert list(tmp_path.iterdir()) == []


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


def screenshot(chromium: str, page: Path, png: Path, profile: Path) -> None:
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", page.resolve().as_uri()],
                   capture_output=True, timeout=TIMEOUT, check=True)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium); cannot render the page")
def test_chromium_renders_the_page(html_run, tmp_path):
    chromium = shutil.which("chromium")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    screenshot(chromium, blank, tmp_path / "blank.png", tmp_path / "profile")
    screenshot(chromium, html_run / "report.html", tmp_path / "report.png", tmp_path / "profile")
    assert png_size(tmp_path / "report.png") == WINDOW
    # A blank 1400x2400 page compresses to a few kB; the report's text, tables and drawings do not.
    assert (tmp_path / "report.png").stat().st_size > 10 * (tmp_path / "blank.png").stat().st_size
