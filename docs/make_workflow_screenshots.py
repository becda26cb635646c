"""Take the screenshots of the investigator's pages: the history of past searches, a collection's thumbnail grid
and the report's compare view (``docs/history-screenshot.png``, ``docs/collection-grid-screenshot.png``,
``docs/compare-screenshot.png``).

    .venv/bin/python docs/make_workflow_screenshots.py --eval path/to/eval-v1

A fresh data dir (in a temporary folder) gets three collections of eval-set images through a real server's ingest
job: ``tpdne`` (generated StyleGAN2-FFHQ faces), ``bsds500`` (Corel stock photos) and ``utkface`` (real faces),
16 each, copy tiers only (no model needed). Three searches go through the page in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright): a re-posted stock photo (cropped 10 %, resized to 70 %, JPEG q70), a
re-posted generated face (the same edit) and an unrelated photo; then the history page, the ``tpdne`` grid and
the compare view of the first search's match are captured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.commands import keys_create  # noqa: E402
from api.testing import ingest_through, live_server  # noqa: E402
from indexer.settings import Settings  # noqa: E402

sys.path.insert(0, str(ROOT / "docs"))
from make_report_screenshot import reposted  # noqa: E402

SETS = [("tpdne", "gan_face/tpdne_2022", "generated", "StyleGAN2-FFHQ"), ("bsds500", "generic_photo/bsds500", "stock", None),
        ("utkface", "real_face/utkface", "real", None)]  # fmt: skip
PER_SET = 16


def _save(shot: Path) -> None:
    image = Image.open(shot).convert("RGB")  # 256 colours: a third of the bytes, still readable
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(shot, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--eval", type=Path, default=ROOT.parent / "shared" / "data" / "eval-v1", help="eval-v1 folder"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="sleuth-shots-") as tmp:
        work = Path(tmp)
        rows, picked = [], {}
        for collection, folder, label, generator in SETS:
            files = sorted((args.eval / folder).iterdir())[:PER_SET]
            picked[collection] = files
            (work / "crawl" / collection).mkdir(parents=True)
            for f in files:  # a temporary copy inside the ingest root (the eval set stays where it is)
                shutil.copyfile(f, work / "crawl" / collection / f.name)
            rows += [{"path": f"{collection}/{f.name}", "collection": collection, "label": label,
                      "generator": generator} for f in files]  # fmt: skip
        manifest = work / "crawl" / "crawl.jsonl"
        manifest.write_text("\n".join(json.dumps(r) for r in rows))
        settings = Settings(data_dir=work / "data")
        token = keys_create("screenshots", ["admin"], settings=settings)[1]
        env = {
            "SLEUTH_DATA_DIR": str(settings.data_dir),
            "SLEUTH_INGEST_ROOTS": json.dumps([str(work / "crawl")]),
        }
        queries = []
        for name, source in (
            ("stock-repost.jpg", picked["bsds500"][3]),
            ("face-repost.jpg", picked["tpdne"][5]),
        ):
            (work / name).write_bytes(reposted(source, scale=0.7, quality=70))
            queries.append(work / name)
        unrelated = sorted((args.eval / "generic_photo" / "bsds500").iterdir())[PER_SET + 7]
        queries.append(unrelated)
        with (
            live_server(env, log_path=work / "server.log", startup_timeout_s=120) as live,
            sync_playwright() as pw,
        ):
            ingest_through(live, token, str(manifest), "crawl", timeout_s=600)
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(live.url + "/")
                page.fill("#api-key", token)
                page.click("#key-button")
                for query in reversed(
                    queries
                ):  # the stock re-post last: newest in the history, open for the compare
                    page.goto(live.url + "/#/")
                    page.set_input_files("#file", str(query))
                    page.click("#search-button")
                    page.wait_for_selector("#report-section:not([hidden])", timeout=120_000)
                    page.wait_for_timeout(800)  # the frame resizes to its content
                hit = (
                    page.frame_locator("#report-frame")
                    .locator(".hit", has=page.frame_locator("#report-frame").locator(".compare"))
                    .first
                )
                hit.screenshot(path=str(args.out / "compare-screenshot.png"))
                page.goto(live.url + "/#/history")
                page.wait_for_selector(".history-row")
                page.screenshot(path=str(args.out / "history-screenshot.png"), full_page=True)
                page.goto(live.url + "/#/collections")
                page.click(".collection-link:text('tpdne')")
                page.wait_for_selector("#collection-grid .tile")
                page.wait_for_timeout(500)
                page.screenshot(path=str(args.out / "collection-grid-screenshot.png"), full_page=True)
            finally:
                browser.close()
    for name in ("history-screenshot.png", "collection-grid-screenshot.png", "compare-screenshot.png"):
        _save(args.out / name)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
