"""The investigator's pages in a real headless Chromium (Debian's ``chromium`` driven by Playwright) against a real
server: history of past searches, a collection's thumbnail grid, the report's compare view, the region crop box,
the text box, and the report read on a 390 px phone.

Skipped, with the reason, only where /usr/bin/chromium is absent (``apt-get install -y chromium``)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from api.commands import keys_create
from api.testing import LiveServer, ingest_through, live_server
from indexer.settings import Settings
from tests.synthetic_images import write_textured_corpus

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("workflow")
    roots = base / "crawls"
    paths = write_textured_corpus(roots / "photos", 8, size=(480, 360))
    rows = [{"path": f"photos/{p.name}", "collection": "stock-2021" if i < 5 else "tpdne",
             "label": "stock" if i < 5 else "generated", "first_seen": f"2021-0{i + 1}-10",
             "page_url": f"https://example.org/photo/{i}"} for i, p in enumerate(paths)]  # fmt: skip
    (roots / "crawl.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = Settings(data_dir=base / "data")
    admin = keys_create("web tester", ["admin"], settings=settings)[1]
    env = {"SLEUTH_DATA_DIR": str(settings.data_dir), "SLEUTH_INGEST_ROOTS": json.dumps([str(roots)])}
    with live_server(env, log_path=base / "server.log") as live:
        ingest_through(live, admin, str(roots / "crawl.jsonl"), "x")
        crop = Image.open(paths[2]).convert("RGB").crop((40, 30, 440, 330)).resize((320, 240))
        crop.save(base / "crop.jpg", quality=85)
        canvas = Image.new("RGB", (900, 500), (245, 245, 245))
        canvas.paste(Image.open(paths[6]).convert("RGB"), (400, 70))  # a tpdne image inside a larger picture
        canvas.save(base / "composite.jpg", quality=90)
        yield {"live": live, "token": admin, "base": base, "paths": paths}


def _until(page: Any, script: str, timeout_s: float = 60.0) -> None:
    """Poll ``script`` (a JS expression) until it is true: the page's CSP forbids wait_for_function's eval."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"never true: {script}"
        time.sleep(0.1)


def _browser(pw: Any) -> Any:
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])


def _enter_key(page: Any, live: LiveServer, token: str) -> None:
    page.goto(live.url + "/")
    page.fill("#api-key", token)
    page.click("#key-button")


def _search(page: Any, image: Path) -> Any:
    page.goto(page.url.split("#")[0] + "#/")
    page.set_input_files("#file", str(image))
    page.click("#search-button")
    page.wait_for_selector("#report-section:not([hidden])", timeout=60_000)
    return page.frame_locator("#report-frame")


def test_history_lists_past_searches_and_reopens_a_report(site: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            _enter_key(page, site["live"], site["token"])
            _search(page, site["base"] / "crop.jpg")
            _search(page, site["paths"][4])
            page.click("#nav-history")
            page.wait_for_selector(".history-row")
            rows = page.locator(".history-row")
            assert rows.count() >= 2
            newest = rows.first.inner_text()
            assert "Exact copy of a known stock image" in newest and "copy of known" in newest
            assert "Near-duplicate of a known stock image" in rows.nth(1).inner_text()
            thumb = rows.first.locator("img")
            assert thumb.get_attribute("src").startswith("data:image/jpeg") and thumb.evaluate(
                "e => e.naturalWidth > 0"
            )
            assert "of " in page.inner_text("#history-page") and page.is_disabled("#history-newer")
            rows.nth(1).locator(".open-report").click()
            opened = page.url.rsplit("/", 1)[-1]
            _until(page, f"document.getElementById('report-id').textContent.endsWith('{opened}')")
            assert page.is_visible("#report-frame")
            summary = page.frame_locator("#report-frame").locator("#verdict-summary").inner_text()
            assert summary.startswith("Near-duplicate of a known stock image first seen 2021-03-10")
            assert not errors, errors
        finally:
            browser.close()


def test_collection_grid_shows_thumbnails_and_filters(site: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            _enter_key(page, site["live"], site["token"])
            page.click("#nav-collections")
            page.wait_for_selector(".collection-link")
            page.click(".collection-link:text('stock-2021')")
            page.wait_for_selector("#collection-grid .tile")
            tiles = page.locator("#collection-grid .tile")
            assert tiles.count() == 5 and "stock-2021: 5 image(s)" in page.inner_text("#collection-title")
            assert all(
                tiles.nth(i).locator("img").evaluate("e => e.complete && e.naturalWidth > 0")
                for i in range(5)
            )
            assert "first seen 2021-01-10" in tiles.first.inner_text()
            page.fill("#g-from", "2021-03-01")
            page.select_option("#g-sort", "first_seen")
            page.click("#grid-apply")
            _until(page, "document.querySelectorAll('#collection-grid .tile').length === 3")
            assert "first seen 2021-03-10" in page.locator("#collection-grid .tile").first.inner_text()
            page.select_option("#g-label", "generated")
            page.click("#grid-apply")
            _until(page, "document.querySelectorAll('#collection-grid .tile').length === 0")
            assert page.inner_text("#grid-page") == "No image matches."
        finally:
            browser.close()


def test_report_compare_view_toggles_overlay_and_flicker(site: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            _enter_key(page, site["live"], site["token"])
            frame = _search(page, site["base"] / "crop.jpg")
            compare = frame.locator(".compare").first
            assert compare.locator(".inliers line").count() >= 10
            assert compare.locator(".side").is_visible() and not compare.locator(".aligned").is_visible()
            assert compare.locator("polygon.region").get_attribute("points").count(",") == 4
            compare.locator("label", has_text="overlay").click()
            assert compare.locator(".aligned").is_visible() and not compare.locator(".side").is_visible()
            assert compare.locator(".warped").evaluate("e => getComputedStyle(e).opacity") == "0.5"
            compare.locator("label", has_text="flicker").click()
            assert compare.locator(".warped").evaluate("e => getComputedStyle(e).animationName") == "flicker"
            compare.locator("label", has_text="side by side").click()
            assert compare.locator(".side").is_visible()
        finally:
            browser.close()


def test_crop_box_searches_a_region_and_the_text_box_says_what_it_needs(site: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            _enter_key(page, site["live"], site["token"])
            page.set_input_files("#file", str(site["base"] / "composite.jpg"))
            _until(page, "document.getElementById('crop-image').naturalWidth > 0")
            box = page.locator("#crop-image").bounding_box()
            scale = (
                box["width"] / 900
            )  # the composite is 900 px wide; the pasted photo sits at (400, 70), 480x360
            page.mouse.move(box["x"] + 405 * scale, box["y"] + 75 * scale)
            page.mouse.down()
            page.mouse.move(box["x"] + 870 * scale, box["y"] + 420 * scale, steps=8)
            page.mouse.up()
            assert "Searching the region" in page.inner_text("#crop-state")
            page.click("#search-button")
            page.wait_for_selector("#report-section:not([hidden])", timeout=60_000)
            summary = page.frame_locator("#report-frame").locator("#verdict-summary").inner_text()
            assert "known generated image first seen 2021-07-10" in summary, summary
            page.fill("#text-query", "a red square")
            page.click("#text-button")
            page.wait_for_selector("#error:not([hidden])")
            assert "text queries need the CLIP tier" in page.inner_text("#error")
        finally:
            browser.close()


def test_the_report_reads_on_a_390_px_phone(site: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    live, token = site["live"], site["token"]
    with (site["base"] / "crop.jpg").open("rb") as fh:
        body = httpx.post(live.url + "/v1/searches", files={"file": ("q.jpg", fh.read())},
                          headers={"Authorization": f"Bearer {token}"}).json()  # fmt: skip
    html = httpx.get(live.url + body["report_html_url"], headers={"Authorization": f"Bearer {token}"}).text
    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.set_content(html)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, "nothing overflows sideways"
            widest = page.evaluate(
                "Math.max(...[...document.querySelectorAll('img, svg, table')].map(e => e.getBoundingClientRect().right))"
            )
            assert widest <= 390
            shell = browser.new_page(viewport={"width": 390, "height": 844})
            shell.goto(live.url + "/#/history")
            assert shell.evaluate("document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()


def test_crop_region_is_recorded_in_the_report(site: dict[str, Any]) -> None:
    live, token = site["live"], site["token"]
    buf = io.BytesIO(Path(site["base"] / "composite.jpg").read_bytes())
    body = httpx.post(live.url + "/v1/searches", files={"file": ("c.jpg", buf.getvalue())}, data={"region": "400,70,480,360"},
                      headers={"Authorization": f"Bearer {token}"}).json()  # fmt: skip
    assert body["query"]["region"] == {"x": 400, "y": 70, "width": 480, "height": 360,
                                       "of_sha256": body["query"]["region"]["of_sha256"]}  # fmt: skip
    assert body["hits"]["near_duplicate"][0]["sightings"][0]["collection"] == "tpdne"
