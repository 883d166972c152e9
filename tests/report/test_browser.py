"""The report opened in headless chromium: every page paints, every query shows its token
colours and layer view, the charts' labels are whole and uncovered, nothing is fetched,
nothing logs an error."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from attribution.report import ReportSettings, render_report
from tests.report.helpers import QUERIES, browser, make_score_run, require_chromium

# The labels plotly draws on a log axis at the positions rank_ticks gives (1, 2, 5 x 10^k).
ROUND_POSITIONS = {"1", "2", "5", "10", "20", "50", "100", "200", "500", "1000", "10k", "100k", "1M", "10M"}


@pytest.fixture(scope="module")
def chromium():
    require_chromium()
    with browser() as instance:
        yield instance


@pytest.fixture(scope="module")
def page(chromium, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    record_path, _ = make_score_run(root)
    report = render_report(record_path, ReportSettings(documents=4, page_size=2))
    tab = chromium.new_page(viewport={"width": 1200, "height": 900})
    seen = {"errors": [], "requests": []}
    tab.on("console", lambda message: seen["errors"].append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: seen["errors"].append(str(error)))
    tab.on("request", lambda request: seen["requests"].append(request.url))
    tab.goto(report.path.as_uri())
    tab.wait_for_selector("body[data-view=index]")
    yield tab, report, seen
    tab.close()


def open_view(tab, report, view: str) -> None:
    tab.goto(report.path.as_uri() + ("#/" if view == "index" else f"#/q/{view[1:]}"))
    tab.wait_for_selector(f"body[data-view={view}]")
    if view == "index":
        tab.wait_for_selector("#run-layers .main-svg")


def at_width(tab, width: int) -> None:
    """Reload at ``width`` px, so every chart is laid out at that width from the start."""
    tab.set_viewport_size({"width": width, "height": 900})
    tab.reload()
    tab.wait_for_selector(".chart .main-svg")


def chart_boxes(tab) -> list[dict]:
    """Per drawn chart, the bounding boxes of its svg, mode bar, title and every label."""
    return tab.evaluate("""() => [...document.querySelectorAll('.chart')].filter(c => c.querySelector('.main-svg')).map(c => {
        const box = (node) => { const r = node.getBoundingClientRect(); return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
        const labels = '.xtick text, .ytick text, .g-xtitle, .g-ytitle, .gtitle, .legend, .colorbar';
        return {chart: c.id, svg: box(c.querySelector('.main-svg')), title: box(c.querySelector('.gtitle')),
                modebar: c.querySelector('.modebar') && box(c.querySelector('.modebar')),
                labels: [...c.querySelectorAll(labels)].map(n => ({text: n.textContent, ...box(n)}))};
    })""")


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def inside(inner: dict, outer: dict) -> bool:
    return all(outer[side] - 0.5 <= inner[side] for side in ("left", "top")) and \
        all(inner[side] <= outer[side] + 0.5 for side in ("right", "bottom"))


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
                unpredicted: tokens.filter(t => t.title.endsWith(': first token, not predicted')).length,
                legend: document.querySelector('div.legend').innerText,
                heatmap: document.querySelectorAll('#layers .heatmaplayer').length,
                shares: document.querySelectorAll('#share .bars .point').length,
                kept: document.querySelectorAll('#distribution .scatterlayer .point').length,
            };
        }""")
        assert found["documents"] == 4 + 3
        assert found["tokens"] > 0 and found["coloured"] > 0.5 * found["tokens"]
        # Each top document's first token is predicted by nothing; every other token has its score.
        assert found["unpredicted"] == 4 and found["titled"] == found["tokens"] - 4
        assert "Each token is coloured by the score of its own prediction" in found["legend"]
        assert found["heatmap"] == 1 and found["shares"] == 2 and found["kept"] == 6 + 3


def test_a_query_without_known_sources_says_so(page):
    tab, report, _ = page
    number = next(n for n, query in enumerate(QUERIES) if "source_ids" not in query)
    open_view(tab, report, f"q{number}")
    text = tab.inner_text("#query-view")
    assert "null" not in text.split()
    assert "No known true sources for this query" in text


def test_the_rank_axis_labels_only_round_positions(page):
    tab, report, _ = page
    for n in range(len(QUERIES)):
        open_view(tab, report, f"q{n}")
        labels = tab.eval_on_selector_all("#distribution .xtick text", "nodes => nodes.map(n => n.textContent)")
        assert labels and set(labels) <= ROUND_POSITIONS, labels


@pytest.mark.parametrize("width", [1200, 900])
def test_the_mode_bar_covers_no_chart_title(page, width):
    tab, report, _ = page
    try:
        for view in ["index", *(f"q{n}" for n in range(len(QUERIES)))]:
            open_view(tab, report, view)
            at_width(tab, width)
            for chart in chart_boxes(tab):
                # The mode bar is laid out (transparent) before a hover shows it: its place is known.
                assert chart["modebar"] is None or not overlap(chart["modebar"], chart["title"]), (view, chart["chart"])
    finally:
        at_width(tab, 1200)


def test_every_chart_label_is_inside_its_chart_at_900px(chromium, demo_report):
    """The demo's module names and document ids are long: fixed margins cut them off at this width."""
    tab = chromium.new_page(viewport={"width": 900, "height": 900})
    tab.goto(demo_report.path.as_uri() + "#/q/0")
    tab.wait_for_selector("#layers .main-svg")
    charts = chart_boxes(tab)
    tab.close()
    assert {chart["chart"] for chart in charts} == {"distribution", "share", "layers"}
    for chart in charts:
        assert [label["text"] for label in chart["labels"] if not inside(label, chart["svg"])] == [], chart["chart"]


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
