"""The API in-process (FastAPI TestClient, real lifespan): auth on every route, scopes, limits, uploads, jobs."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.keys import create_key
from api.settings import ApiSettings
from indexer.settings import Limits, Settings
from indexer.store.db import open_store
from tests.image_zoo import EXPECTED, build_zoo
from tests.synthetic_images import synthetic_photo, write_corpus

PUBLIC = {"/healthz", "/readyz", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def jpeg(seed: int, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    im = synthetic_photo(seed)
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class Api:
    """A running app plus keys of each scope."""

    def __init__(self, client: TestClient, keys: dict[str, str], roots: Path, settings: Settings) -> None:
        self.client, self.keys, self.roots, self.settings = client, keys, roots, settings

    def h(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}

    def wait_job(self, url: str, scope: str = "admin", timeout_s: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.client.get(url, headers=self.h(scope)).json()
            if job["status"] in ("done", "failed"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {url} did not finish")

    def search(
        self, data: bytes, scope: str = "search", **form: str
    ) -> Any:  # the Response of httpx2 or httpx (TestClient picks)
        return self.client.post(
            "/v1/searches", files={"file": ("q.jpg", data, "image/jpeg")}, data=form, headers=self.h(scope)
        )


def make_api(tmp_path: Path, **api_overrides: object) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path / "data", limits=Limits(upload_max_bytes=2_000_000))
    roots = tmp_path / "roots"
    write_corpus(roots / "corpus", 12)
    store = open_store(settings)
    keys = {scope: create_key(store, scope, [scope])[1] for scope in ("search", "ingest", "admin")}
    keys["other"] = create_key(store, "other investigator", ["search"])[1]
    store.dispose()
    defaults = {"ingest_roots": [roots], "rate_limit": "1000/second", "auth_failure_rate": "100000/minute"}
    api_settings = ApiSettings(**(defaults | api_overrides))  # type: ignore[arg-type]
    with TestClient(create_app(settings, api_settings)) as client:
        yield Api(client, keys, roots, settings)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


@pytest.fixture
def indexed(api: Api) -> Api:
    r = api.client.post(
        "/v1/ingest-jobs",
        json={"source": str(api.roots / "corpus"), "collection": "crawl"},
        headers=api.h("ingest"),
    )
    assert r.status_code == 202, r.text
    job = api.wait_job(r.json()["job_url"], "ingest")
    assert job["status"] == "done", job
    assert job["result"]["new"] == 12  # type: ignore[index]
    return api


def route_paths(routes: list[object]) -> list[str]:
    """Every path the app answers, looking inside included routers (FastAPI keeps them nested)."""
    found: list[str] = []
    for route in routes:
        if (inner := getattr(route, "original_router", None)) is not None:
            found.extend(route_paths(list(inner.routes)))
        else:
            found.append(str(getattr(route, "path", "")))
    return found


def _concrete(path: str) -> str:
    return (
        path.replace("{job_id}", "00000000-0000-0000-0000-000000000000")
        .replace("{report_id}", "00000000-0000-0000-0000-000000000000")
        .replace("{collection_id}", "1")
        .replace("{image_id}", "1")
    )


def test_public_routes_are_only_health_docs_and_the_page_shell(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json()["status"] == "ready"
    assert "/v1/searches" in api.client.get("/openapi.json").json()["paths"]
    documented = set(api.client.get("/openapi.json").json()["paths"])
    undocumented = set(route_paths(api.client.app.routes)) - documented  # type: ignore[attr-defined]
    assert undocumented <= PUBLIC | {"/static"}, "an undocumented route escapes the key check"
    page = api.client.get("/")
    assert page.status_code == 200 and "api-key" in page.text and "Content-Security-Policy" in page.headers


def test_scopes_search_key_cannot_ingest_or_export_and_admin_can_do_all(api: Api) -> None:
    r = api.client.post("/v1/collections", json={"name": "x"}, headers=api.h("search"))
    assert r.status_code == 403 and "ingest" in r.json()["message"]
    r = api.client.post(
        "/v1/ingest-jobs", json={"source": str(api.roots), "collection": "x"}, headers=api.h("search")
    )
    assert r.status_code == 403
    assert api.client.get("/v1/audit", headers=api.h("ingest")).status_code == 403
    assert api.client.get("/metrics", headers=api.h("search")).status_code == 403
    assert api.search(jpeg(1), scope="ingest").status_code == 403
    assert api.client.post("/v1/collections", json={"name": "x"}, headers=api.h("admin")).status_code == 201
    assert api.search(jpeg(1), scope="admin").status_code == 200
    assert "sleuth_http_requests_total" in api.client.get("/metrics", headers=api.h("admin")).text


def test_x_api_key_header_is_accepted_too(api: Api) -> None:
    r = api.client.get("/v1/collections", headers={"X-API-Key": api.keys["search"]})
    assert r.status_code == 200


def test_search_finds_a_modified_copy_and_reports_its_source(indexed: Api) -> None:
    r = indexed.search(jpeg(5, size=(200, 150), quality=60))
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["hits"]["near_duplicate"]
    assert hits and hits[0]["rank"] == 1 and not body["hits"]["exact"]
    assert body["verdict"]["kind"] == "copy_of_known" and "Near-duplicate" in body["verdict"]["summary"]
    assert hits[0]["sightings"][0]["source_key"] == "img_00005.jpg"
    assert r.headers["Location"] == f"/v1/reports/{body['report_id']}"
    same = indexed.client.get(body["report_url"], headers=indexed.h("search")).json()
    assert same["hits"]["near_duplicate"] == hits
    html = indexed.client.get(body["report_url"], headers=indexed.h("search") | {"Accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html")
    assert "img_00005.jpg" in html.text and "data:image/jpeg;base64," in html.text
    assert 'id="query-image"' in html.text and "<script" not in html.text and "/static/" not in html.text


def test_exact_copy_is_exact(indexed: Api) -> None:
    data = (indexed.roots / "corpus" / "img_00003.jpg").read_bytes()
    body = indexed.search(data).json()
    assert body["hits"]["exact"][0]["rank"] == 1 and body["hits"]["exact"][0]["match_class"] == "exact"
    assert "Exact copy of a known image" in body["verdict"]["summary"]


@pytest.mark.parametrize("name", sorted(n for n, outcome in EXPECTED.items() if outcome != "ok"))
def test_bad_uploads_get_4xx_with_a_message_never_5xx(api: Api, tmp_path: Path, name: str) -> None:
    zoo = build_zoo(tmp_path / "zoo")
    r = api.search(zoo[name].read_bytes())
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert r.json()["message"]


@pytest.mark.parametrize("name", sorted(n for n, outcome in EXPECTED.items() if outcome == "ok"))
def test_odd_but_valid_uploads_are_searched(api: Api, tmp_path: Path, name: str) -> None:
    zoo = build_zoo(tmp_path / "zoo")
    assert api.search(zoo[name].read_bytes()).status_code == 200


def test_upload_over_the_size_limit_is_413_before_decoding(api: Api) -> None:
    big = b"\xff\xd8\xff" + b"\0" * 2_200_000
    r = api.search(big)
    assert r.status_code == 413 and "limit" in r.json()["message"]


def test_missing_file_field_is_422_with_a_message(api: Api) -> None:
    r = api.client.post("/v1/searches", data={"refine": "false"}, headers=api.h("search"))
    assert r.status_code == 422 and "file" in r.json()["message"]


def test_reports_and_jobs_of_one_key_are_hidden_from_another(indexed: Api) -> None:
    report_url = indexed.search(jpeg(2)).json()["report_url"]
    other = {"Authorization": f"Bearer {indexed.keys['other']}"}
    assert indexed.client.get(report_url, headers=other).status_code == 404
    assert indexed.client.get(report_url, headers=indexed.h("admin")).status_code == 200


def test_refine_answers_202_with_a_job_that_finishes_the_report(indexed: Api) -> None:
    r = indexed.search(jpeg(4), refine="true")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job_url"].startswith("/v1/jobs/") and body["report"]["status"] == "refining"
    job = indexed.wait_job(body["job_url"], "search")
    assert job["status"] == "done", job
    report = indexed.client.get(body["report_url"], headers=indexed.h("search")).json()
    assert (
        report["status"] == "done" and report["refine"]["status"] == "unavailable"
    )  # no generator registered
    assert report["hits"]["near_duplicate"][0]["sightings"][0]["source_key"] == "img_00004.jpg"
    assert report["refine_job"] == body["job_id"]


def test_upload_into_a_collection_is_found_by_the_next_search(api: Api) -> None:
    cid = api.client.post("/v1/collections", json={"name": "tips"}, headers=api.h("ingest")).json()["id"]
    data = jpeg(77)
    first = api.search(data).json()
    assert all(not group for group in first["hits"].values()) and first["verdict"]["kind"] == "no_match"
    r = api.client.post(
        f"/v1/collections/{cid}/images", files={"file": ("a.jpg", data, "image/jpeg")},
        data={"label": "real", "first_seen": "2024-05-01"}, headers=api.h("ingest"),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    hit = api.search(data).json()["hits"]["exact"][0]
    assert hit["image_id"] == r.json()["image_id"] and hit["match_class"] == "exact"
    assert hit["sightings"][0]["first_seen"].startswith("2024-05-01")
    again = api.client.post(
        f"/v1/collections/{cid}/images", files={"file": ("a.jpg", data)}, headers=api.h("ingest")
    )
    assert again.json()["already_in_collection"] is True
    image = api.client.get(f"/v1/images/{hit['image_id']}", headers=api.h("search")).json()
    assert image["sha256"] == hit["sha256"]
    thumb = api.client.get(image["thumbnail_url"], headers=api.h("search"))
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:3] == b"\xff\xd8\xff"
    names = [c["name"] for c in api.client.get("/v1/collections", headers=api.h("search")).json()]
    assert "tips" in names
    assert (
        api.client.post(
            "/v1/collections/9999/images", files={"file": ("a.jpg", data)}, headers=api.h("ingest")
        ).status_code
        == 404
    )


@pytest.mark.parametrize(
    "source", ["/etc", "{roots}/../..", "http://example.com/a.jpg", "file:///etc/passwd", "{roots}/link-out"]
)
def test_ingest_sources_outside_the_roots_or_urls_are_refused(api: Api, tmp_path: Path, source: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (api.roots / "link-out").symlink_to(outside)
    r = api.client.post(
        "/v1/ingest-jobs",
        json={"source": source.format(roots=api.roots), "collection": "x"},
        headers=api.h("ingest"),
    )
    assert r.status_code == 403, r.text
    assert r.json()["message"]


def test_missing_ingest_source_is_404(api: Api) -> None:
    r = api.client.post(
        "/v1/ingest-jobs",
        json={"source": str(api.roots / "nope"), "collection": "x"},
        headers=api.h("ingest"),
    )
    assert r.status_code == 404


def test_every_search_is_in_the_audit_log_and_exports_as_csv_and_jsonl(indexed: Api) -> None:
    ids = [indexed.search(jpeg(s)).json()["report_id"] for s in (1, 2)]
    rows = [
        json.loads(line)
        for line in indexed.client.get("/v1/audit?format=jsonl", headers=indexed.h("admin")).text.splitlines()
    ]
    searches = [r for r in rows if r["action"] == "search"]
    assert [r["report_id"] for r in searches] == ids
    assert all(len(r["query_sha256"]) == 64 and r["key_id"] and r["at"] for r in searches)
    text = indexed.client.get("/v1/audit?format=csv", headers=indexed.h("admin")).text
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["report_id"] for r in parsed if r["action"] == "search"] == ids
    assert indexed.client.get("/v1/audit?format=xml", headers=indexed.h("admin")).status_code == 422


def test_rate_limit_per_key_answers_429_with_retry_after(tmp_path: Path) -> None:
    for api in make_api(tmp_path, rate_limit="3/minute"):
        codes = [api.client.get("/v1/collections", headers=api.h("search")).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        r = api.client.get("/v1/collections", headers=api.h("search"))
        assert int(r.headers["Retry-After"]) >= 1 and "rate limit" in r.json()["message"]
        other = {"Authorization": f"Bearer {api.keys['other']}"}
        assert api.client.get("/v1/collections", headers=other).status_code == 200  # buckets are per key


def test_revoked_key_stops_working(api: Api) -> None:
    from api.keys import revoke_key

    assert api.client.get("/v1/collections", headers=api.h("search")).status_code == 200
    store = open_store(api.settings)
    revoke_key(store, api.keys["search"].split("_")[1])
    store.dispose()
    r = api.client.get("/v1/collections", headers=api.h("search"))
    assert r.status_code == 401 and "revoked" in r.json()["message"]


# What each operation of the OpenAPI schema needs; a new endpoint must be added here (the test checks that).
REQUIRED_SCOPE = {
    ("POST", "/v1/searches"): "search", ("GET", "/v1/jobs/{job_id}"): "any",
    ("GET", "/v1/reports/{report_id}"): "search", ("GET", "/v1/collections"): "search",
    ("POST", "/v1/collections"): "ingest", ("POST", "/v1/collections/{collection_id}/images"): "ingest",
    ("POST", "/v1/ingest-jobs"): "ingest", ("GET", "/v1/images/{image_id}"): "search",
    ("GET", "/v1/images/{image_id}/thumbnail"): "search", ("GET", "/v1/audit"): "admin",
    ("GET", "/metrics"): "admin", ("GET", "/healthz"): "public", ("GET", "/readyz"): "public",
    ("GET", "/v1/reports"): "search", ("GET", "/v1/reports/{report_id}/query-thumbnail"): "search",
    ("GET", "/v1/collections/{collection_id}/images"): "search", ("POST", "/v1/text-searches"): "search",
}  # fmt: skip


def test_every_openapi_operation_refuses_missing_wrong_and_out_of_scope_keys(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    operations = {(m.upper(), path) for path, item in schema["paths"].items() for m in item}
    assert operations == set(REQUIRED_SCOPE), "an endpoint was added or removed: say which scope it needs"
    wrong = [None, "slk_000000000000_" + "A" * 43, api.keys["admin"][:-4] + "AAAA", "not-a-key"]
    for (method, path), needs in sorted(REQUIRED_SCOPE.items()):
        url = _concrete(path)
        if needs == "public":
            assert api.client.request(method, url).status_code == 200
            continue
        for key in wrong:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = api.client.request(method, url, headers=headers)
            assert r.status_code == 401 and r.json()["message"], (method, path, key, r.text)
            assert r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
        for scope in ("search", "ingest"):
            if needs in (scope, "any"):
                continue
            r = api.client.request(method, url, headers=api.h(scope))
            assert r.status_code == 403, (method, path, scope, r.status_code, r.text)
            assert f"needs the scope '{needs}'" in r.json()["message"]


def test_pixel_limit_refuses_a_large_image_with_413_before_searching(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", limits=Limits(max_pixels=100_000, upload_max_bytes=2_000_000)
    )
    store = open_store(settings)
    token = create_key(store, "s", ["search"])[1]
    store.dispose()
    with TestClient(create_app(settings, ApiSettings())) as client:
        big = jpeg(1, size=(400, 300))  # 120 000 pixels
        r = client.post(
            "/v1/searches", files={"file": ("a.jpg", big)}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 413 and "pixels" in r.json()["message"], r.text
        ok = client.post("/v1/searches", files={"file": ("a.jpg", jpeg(1, size=(300, 300)))},
                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert ok.status_code == 200


def test_content_is_sniffed_never_the_file_name_or_declared_type(api: Api) -> None:
    png = io.BytesIO()
    synthetic_photo(3).save(png, "PNG")
    r = api.client.post(
        "/v1/searches", files={"file": ("photo.txt", png.getvalue(), "text/plain")}, headers=api.h("search")
    )
    assert r.status_code == 200 and r.json()["query"]["format"] == "PNG"
    fake = b"<html><script>alert(1)</script></html>" * 20
    r = api.client.post(
        "/v1/searches", files={"file": ("photo.jpg", fake, "image/jpeg")}, headers=api.h("search")
    )
    assert r.status_code == 415 and r.json()["message"]


def test_urls_given_with_an_upload_are_recorded_and_never_fetched(api: Api) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/bait.jpg"
    try:
        cid = api.client.post("/v1/collections", json={"name": "c"}, headers=api.h("ingest")).json()["id"]
        r = api.client.post(
            f"/v1/collections/{cid}/images", files={"file": ("a.jpg", jpeg(9))}, data={"page_url": url},
            headers=api.h("ingest"),
        )  # fmt: skip
        assert r.status_code == 201, r.text
        image = api.client.get(f"/v1/images/{r.json()['image_id']}", headers=api.h("search")).json()
        assert image["sightings"][0]["page_url"] == url
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected: the URL was stored, not fetched
        r = api.client.post(
            "/v1/ingest-jobs", json={"source": url, "collection": "c"}, headers=api.h("ingest")
        )
        assert r.status_code == 403 and "never fetched" in r.json()["message"]
    finally:
        listener.close()


def test_manifest_rows_and_symlinks_that_reach_outside_the_roots_are_refused(
    api: Api, tmp_path: Path
) -> None:
    outside = tmp_path / "private"
    write_corpus(outside, 1)
    secret = next(outside.iterdir())
    (api.roots / "evil.csv").write_text(f"path,label\n{secret},real\n")
    (api.roots / "linked").mkdir()
    (api.roots / "linked" / "a.jpg").symlink_to(secret)
    for source in ("evil.csv", "linked"):
        r = api.client.post(
            "/v1/ingest-jobs",
            json={"source": str(api.roots / source), "collection": "x"},
            headers=api.h("ingest"),
        )
        assert r.status_code == 403 and "outside the ingest roots" in r.json()["message"], r.text
    (api.roots / "fine.csv").write_text("path,label\ncorpus/img_00001.jpg,real\n")
    r = api.client.post(
        "/v1/ingest-jobs",
        json={"source": str(api.roots / "fine.csv"), "collection": "x"},
        headers=api.h("ingest"),
    )
    assert r.status_code == 202 and api.wait_job(r.json()["job_url"], "ingest")["status"] == "done"


def test_a_failed_refine_marks_the_report_failed_and_the_job_says_why(
    indexed: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.engine import Engine
    from indexer.errors import ModelUnavailableError

    def broken(self: Engine, decoded: object, base: dict[str, object]) -> dict[str, object]:
        raise ModelUnavailableError("no generator is registered (SLEUTH_GENERATORS)")

    monkeypatch.setattr(Engine, "refine", broken)
    body = indexed.search(jpeg(6), refine="true").json()
    job = indexed.wait_job(body["job_url"], "search")
    assert job["status"] == "failed" and "no generator is registered" in str(job["error"])
    report = indexed.client.get(body["report_url"], headers=indexed.h("search")).json()
    assert report["status"] == "failed" and report["hits"]["near_duplicate"]  # the copy tiers still stand
