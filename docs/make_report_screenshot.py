"""Take ``docs/report-screenshot.png``: the web page after searching a real eval-set query.

    .venv/bin/python docs/make_report_screenshot.py --data-dir /tmp/sleuth-bench/eval \
        --query ../shared/data/eval-v1/gan_face/boredhumans_basemax/516.jpg \
        --clip-model onnx:$HOME/.cache/sleuth-eval-models/clip-vit-b16-openai-image.onnx

The data dir is copied first (the server never writes into the one given). The query is re-posted the way
images travel (10 % crop, resized to 80 %, JPEG q75) and uploaded through the page in headless Chromium
(Debian's /usr/bin/chromium driven by Playwright); the screenshot shows the page with the report it renders.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.commands import keys_create  # noqa: E402
from api.testing import live_server  # noqa: E402
from indexer.settings import Settings  # noqa: E402


def reposted(path: Path, *, scale: float = 0.8, quality: int = 75) -> bytes:
    """What a re-poster does: crop 10 % per side, resize to ``scale``, JPEG at ``quality``."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    im = im.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data-dir", type=Path, required=True, help="an ingested data dir (copied, not modified)"
    )
    ap.add_argument(
        "--query", type=Path, required=True, help="an eval-set image (re-posted before the search)"
    )
    ap.add_argument("--clip-model", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--generator", default=None, help="NAME:FAMILY:PATH registered (in the copy) for refine")
    ap.add_argument(
        "--lpips-weights", default=None, help="LPIPS safetensors (SLEUTH_LPIPS_WEIGHTS) for refine"
    )
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="sleuth-shot-") as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data_dir, data, ignore=shutil.ignore_patterns("write.lock", "*.migrate.lock"))
        query = Path(tmp) / "suspect.jpg"
        query.write_bytes(reposted(args.query))
        env = {"SLEUTH_DATA_DIR": str(data)}
        if args.clip_model:
            env["SLEUTH_CLIP_MODEL"] = args.clip_model
        settings = Settings(data_dir=data, lpips_weights=args.lpips_weights)
        token = keys_create("screenshot", ["search"], settings=settings)[1]
        if args.generator:  # refine: project the query's face into this generator
            from projection.registry import register_generator

            name, family, path = args.generator.split(":", 2)
            register_generator(settings, name, path, family=family)
            env["SLEUTH_LPIPS_WEIGHTS"] = str(args.lpips_weights)
        with (
            live_server(env, log_path=Path(tmp) / "server.log", startup_timeout_s=300) as live,
            sync_playwright() as pw,
        ):
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(live.url + "/")
                page.fill("#api-key", token)
                page.click("#key-button")
                page.set_input_files("#file", str(query))
                if args.generator:
                    page.check("#refine")
                page.click("#search-button")
                page.wait_for_selector("#report-section:not([hidden])", timeout=300_000)
                page.wait_for_timeout(800)  # the frame resizes to its content
                summary = page.frame_locator("#report-frame").locator("#verdict-summary").inner_text()
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
            finally:
                browser.close()
    shot = Image.open(args.out).convert("RGB")  # 256 colours: a third of the bytes, still readable
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
