"""The web page in a real headless Chromium (Debian's ``chromium`` driven by Playwright) against a real server.

Skipped, with the reason, only where /usr/bin/chromium is absent (``apt-get install -y chromium``); Playwright's
own browser download is never used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.commands import keys_create
from api.testing import LiveServer, ingest_through, live_server
from indexer.settings import Settings
from tests.synthetic_images import write_corpus
from tests.test_api_e2e import modified_copy

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, Path]]:
    base = tmp_path_factory.mktemp("web")
    roots = base / "crawls"
    write_corpus(roots / "stock", 12)
    settings = Settings(data_dir=base / "data")
    admin = keys_create("web tester", ["admin"], settings=settings)[1]
    env = {"SLEUTH_DATA_DIR": str(settings.data_dir), "SLEUTH_INGEST_ROOTS": json.dumps([str(roots)])}
    with live_server(env, log_path=base / "server.log") as live:
        ingest_through(live, admin, str(roots / "stock"), "stock")
        query = base / "suspect.jpg"
        query.write_bytes(modified_copy(7))
        yield live, admin, query


def test_upload_watch_progress_and_read_the_report_with_its_images(
    site: tuple[LiveServer, str, Path],
) -> None:
    from playwright.sync_api import sync_playwright

    live, token, query = site
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(live.url + "/")
            # without a key the page says so and sends nothing
            page.set_input_files("#file", str(query))
            page.click("#search-button")
            assert "Enter an API key" in page.inner_text("#error")
            # a wrong key: the API's 401 message is shown
            page.fill("#api-key", "slk_000000000000_" + "A" * 43)
            page.click("#key-button")
            page.click("#search-button")
            page.wait_for_selector("#error:not([hidden])")
            assert "not valid" in page.inner_text("#error")
            # the real key, with refine: the job's progress is shown, then the report
            page.fill("#api-key", token)
            page.click("#key-button")
            page.check("#refine")
            statuses: list[str] = []
            page.expose_function("noteStatus", lambda text: statuses.append(text))
            page.evaluate(
                "new MutationObserver(() => window.noteStatus(document.getElementById('status').textContent))"
                ".observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true})"
            )
            page.click("#search-button")
            page.wait_for_selector("#report-section:not([hidden])", timeout=60_000)
            assert page.inner_text("#status") == "Report ready."
            assert any(s.startswith("Job ") for s in statuses), statuses
            frame = page.frame_locator("#report-frame")
            summary = frame.locator("#verdict-summary").inner_text()
            assert summary.startswith("Near-duplicate of a known image at img_00007.jpg in stock"), summary
            assert "img_00007.jpg" in frame.locator("#hits-near_duplicate ~ .hit").first.inner_text()
            images = frame.locator("img")
            assert images.count() >= 2  # the query and the matched image, inline
            for i in range(images.count()):
                img = images.nth(i)
                assert img.get_attribute("src", timeout=5000).startswith("data:image/")  # type: ignore[union-attr]
                assert img.evaluate("el => el.complete && el.naturalWidth > 0"), img.get_attribute("alt")
            href = page.get_attribute("#report-json", "href")
            assert href is not None and href.startswith("blob:")
            assert not errors, errors
        finally:
            browser.close()
