"""End to end through a real server process: uvicorn on 127.0.0.1 at a free port, started by the test."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageEnhance

from api.commands import keys_create
from api.testing import LiveServer, live_server
from indexer.index_sync import verify_all
from indexer.settings import Settings
from indexer.store.db import open_store
from tests.synthetic_images import synthetic_photo, write_corpus


def modified_copy(seed: int) -> bytes:
    """Shrunk, brightened and recompressed at low quality: what a re-post usually does to a photo."""
    im = synthetic_photo(seed).resize((180, 135), Image.Resampling.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(1.08)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=55)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str], Path]]:
    base = tmp_path_factory.mktemp("e2e")
    data_dir, roots = base / "data", base / "crawls"
    write_corpus(roots / "stock-2024", 30)
    settings = Settings(data_dir=data_dir)
    created = subprocess.run(  # the real command line, as an operator would
        [str(Path(sys.executable).with_name("sleuth")), "keys", "create", "analyst", "--scope", "search", "--json",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, env=os.environ | {"SLEUTH_ENVIRONMENT": "production"},
    )  # fmt: skip
    keys = {
        "search": json.loads(created.stdout)["token"],
        "ingest": keys_create("crawler", ["ingest"], settings=settings)[1],
        "admin": keys_create("lead", ["admin"], settings=settings)[1],
    }
    env = {
        "SLEUTH_DATA_DIR": str(data_dir), "SLEUTH_INGEST_ROOTS": json.dumps([str(roots)]),
        "SLEUTH_RATE_LIMIT": "1000/second", "SLEUTH_ENVIRONMENT": "production",
    }  # fmt: skip
    with live_server(env, log_path=base / "server.log") as live:
        yield live, keys, roots


def _h(keys: dict[str, str], scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[scope]}"}


def test_real_server_ingest_search_report_and_refusals(
    server: tuple[LiveServer, dict[str, str], Path],
) -> None:
    live, keys, roots = server
    with httpx.Client(base_url=live.url, timeout=60) as http:
        # refusals first: no key, a search-only key trying to ingest, a corrupt upload
        r = http.post("/v1/searches", files={"file": ("q.jpg", modified_copy(3), "image/jpeg")})
        assert r.status_code == 401 and r.json()["message"]
        job_body = {"source": str(roots / "stock-2024"), "collection": "stock-2024"}
        r = http.post("/v1/ingest-jobs", json=job_body, headers=_h(keys, "search"))
        assert r.status_code == 403 and "ingest" in r.json()["message"]
        r = http.post("/v1/searches", files={"file": ("q.jpg", b"\xff\xd8\xff\xe0garbage", "image/jpeg")},
                      headers=_h(keys, "search"))  # fmt: skip
        assert 400 <= r.status_code < 500 and r.json()["message"], r.text

        # ingest a collection as a job and follow it
        r = http.post("/v1/ingest-jobs", json=job_body, headers=_h(keys, "ingest"))
        assert r.status_code == 202, r.text
        job_url = r.json()["job_url"]
        deadline = time.monotonic() + 60
        while (job := http.get(job_url, headers=_h(keys, "ingest")).json())["status"] not in (
            "done",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "done" and job["result"]["new"] == 30, job

        # search a modified copy: found, with its source
        r = http.post("/v1/searches", files={"file": ("q.jpg", modified_copy(17), "image/jpeg")},
                      headers=_h(keys, "search"))  # fmt: skip
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]["near_duplicate"]
        assert hits[0]["match_class"] == "near_duplicate" and hits[0]["rank"] == 1
        assert hits[0]["sightings"][0] == hits[0]["sightings"][0] | {
            "collection": "stock-2024", "source_key": "img_00017.jpg",
        }  # fmt: skip
        report_url = r.json()["report_url"]

        # the report as JSON and as HTML (content negotiation)
        as_json = http.get(report_url, headers=_h(keys, "search") | {"Accept": "application/json"})
        assert as_json.json()["hits"]["near_duplicate"] == hits
        assert as_json.json()["verdict"]["summary"].startswith("Near-duplicate of a known image")
        as_html = http.get(
            report_url, headers=_h(keys, "search") | {"Accept": "text/html,application/xhtml+xml"}
        )
        assert as_html.headers["content-type"].startswith("text/html")
        assert "img_00017.jpg" in as_html.text and "near duplicate" in as_html.text

        # the audit log holds the search
        audit = http.get("/v1/audit", params={"format": "jsonl"}, headers=_h(keys, "admin")).text
        rows = [json.loads(x) for x in audit.splitlines()]
        assert any(r["action"] == "search" and r["report_id"] == as_json.json()["report_id"] for r in rows)
    settings = Settings(data_dir=roots.parent / "data")  # the server's data directory: SQL and FAISS agree
    store = open_store(settings)
    try:
        assert all(report.ok for report in verify_all(store, settings.index_dir))
    finally:
        store.dispose()
