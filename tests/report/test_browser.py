"""The report opened in headless chromium: every page paints, every query shows its token
colours and layer view, nothing is fetched, nothing logs an error."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from attribution.report import ReportSettings, render_report
from tests.report.helpers import QUERIES, browser, make_score_run, require_chromium


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    require_chromium()
    root = tmp_path_factory.mktemp("browser")
    record_path, _ = make_score_run(root)
    report = render_report(record_path, ReportSettings(documents=4, page_size=2))
    with browser() as instance:
        tab = instance.new_page(viewport={"width": 1200, "height": 900})
        seen = {"errors": [], "requests": []}
        tab.on("console", lambda message: seen["errors"].append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: seen["errors"].append(str(error)))
        tab.on("request", lambda request: seen["requests"].append(request.url))
        tab.goto(report.path.as_uri())
        tab.wait_for_selector("body[data-view=index]")
        yield tab, report, seen


def open_view(tab, report, view: str) -> None:
    tab.goto(report.path.as_uri() + ("#/" if view == "index" else f"#/q/{view[1:]}"))
    tab.wait_for_selector(f"body[data-view={view}]")
    if view == "index":
        tab.wait_for_selector("#run-layers .main-svg")


def assert_not_blank(png: bytes) -> None:
    """Many colours, and the most common one (the background) under 98% of the pixels."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 22)
    assert colours is not None and len(colours) > 50
    assert max(count for count, _ in colours) < 0.98 * image.width * image.height


def test_every_page_paints_something(page, tmp_path):
    tab, report, _ = page
    for view in ["index", *(f"q{n}" for n in range(len(QUERIES)))]:
        open_view(tab, report, view)
        tab.wait_for_timeout(100)
        assert_not_blank(tab.screenshot(full_page=True))


def test_every_query_shows_token_colours_with_scores_on_hover_and_its_layer_view(page):
    tab, report, _ = page
    for n in range(len(QUERIES)):
        open_view(tab, report, f"q{n}")
        found = tab.evaluate("""() => {
            const tokens = [...document.querySelectorAll('.doc .tok')];
            return {
                documents: document.querySelectorAll('.doc').length,
                tokens: tokens.length,
                coloured: tokens.filter(t => getComputedStyle(t).backgroundColor !== 'rgba(0, 0, 0, 0)').length,
                titled: tokens.filter(t => /: [+-]\\d\\.\\d{3}e[+-]\\d+$/.test(t.title)).length,
                heatmap: document.querySelectorAll('#layers .heatmaplayer').length,
                shares: document.querySelectorAll('#share .bars .point').length,
                kept: document.querySelectorAll('#distribution .scatterlayer .point').length,
            };
        }""")
        assert found["documents"] == 4 + 3
        assert found["tokens"] > 0 and found["coloured"] > 0.5 * found["tokens"] and found["titled"] == found["tokens"]
        assert found["heatmap"] == 1 and found["shares"] == 2 and found["kept"] == 6 + 3


def test_search_and_pages_of_the_index(page):
    tab, report, _ = page
    open_view(tab, report, "index")
    rows = lambda: tab.locator("#index-rows tr").count()  # noqa: E731
    assert rows() == 2 and "1–2 of 3 queries" in tab.inner_text("#page-info")
    tab.click("#next")
    assert rows() == 1
    tab.fill("#search", "birds sang")
    assert rows() == 1 and "q-bird" in tab.inner_text("#index-rows")
    tab.fill("#search", "no such query")
    assert rows() == 0


def test_no_network_and_no_console_errors(page):
    tab, report, seen = page
    assert seen["errors"] == []
    assert {url.split("#")[0] for url in seen["requests"]} == {report.path.as_uri()}
