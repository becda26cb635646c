"""Issue 10 through the API: bounded work in flight and costed requests (defect 1), keys checked before bodies,
timeouts and rate-limited failures (4), a complete audit and never-reused key ids (5), and the smaller ones (6):
413 for chunked bodies, no orphan upload bytes, clean collection names."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text

from api.keys import create_key
from api.testing import live_server
from indexer.settings import Settings
from indexer.store.db import open_store
from indexer.write_lock import write_lock
from tests.synthetic_images import synthetic_photo
from tests.test_api_app import Api, jpeg, make_api


def _audit(api: Api) -> list[dict[str, Any]]:
    r = api.client.get("/v1/audit", params={"format": "jsonl"}, headers=api.h("admin"))
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def _asgi(
    app: Any, method: str, path: str, headers: dict[str, str], body: list[bytes] | None
) -> tuple[int, int]:
    """Call the ASGI app directly: (status, body bytes the app pulled from ``receive``). ``body=None``: the
    client sends its headers, then nothing (an idle request)."""
    pulled = 0
    chunks = list(body or [])

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if body is None:
            await asyncio.sleep(3600)
        if chunks:
            chunk = chunks.pop(0)
            pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("10.1.2.3", 5000),
        "server": ("testserver", 80), "state": {},
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=20))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), pulled


running_api = contextmanager(make_api)
MULTIPART = "multipart/form-data; boundary=XyZ"


def _multipart_chunks(total: int) -> list[bytes]:
    head = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n\r\n'
    return [head] + [b"\xff" * 65536] * (total // 65536) + [b"\r\n--XyZ--\r\n"]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, auth_failure_rate="1000/minute")


# --- defect 4: keys before bodies, timeouts, failures rate-limited and audited ------------------------------
@pytest.mark.parametrize("who", ["none", "wrong", "ingest-only"])
def test_the_key_and_scope_are_checked_before_the_body_is_read(api: Api, who: str) -> None:
    headers = {"content-type": MULTIPART, "content-length": str(1_000_000)}
    if who == "wrong":
        headers["authorization"] = "Bearer slk_000000000000_" + "x" * 43
    if who == "ingest-only":
        headers["authorization"] = f"Bearer {api.keys['ingest']}"
    status, pulled = _asgi(api.client.app, "POST", "/v1/searches", headers, _multipart_chunks(1_000_000))
    assert status == (403 if who == "ingest-only" else 401)
    assert pulled == 0, f"{pulled} bytes of the body were read before the {status}"


def test_an_idle_request_body_times_out_with_408(tmp_path: Path) -> None:
    with running_api(tmp_path, request_body_timeout_s=0.5) as api:
        _idle_is_408(api)


def _idle_is_408(api: Api) -> None:
    headers = {
        "content-type": MULTIPART,
        "content-length": "5000",
        "authorization": f"Bearer {api.keys['search']}",
    }
    status, _ = _asgi(api.client.app, "POST", "/v1/searches", headers, None)
    assert status == 408


def test_unauthenticated_failures_are_rate_limited_per_client_address(tmp_path: Path) -> None:
    with running_api(tmp_path, auth_failure_rate="3/minute") as api:
        bad = {"Authorization": "Bearer slk_000000000000_" + "y" * 43}
        codes = [api.client.get("/v1/collections", headers=bad).status_code for _ in range(5)]
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429], codes
        r = api.client.get("/v1/collections", headers=bad)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert (
            api.client.get("/v1/collections", headers=api.h("search")).status_code == 200
        )  # keys still work


def test_401_and_403_are_audited(api: Api) -> None:
    api.client.get("/v1/collections", headers={"Authorization": "Bearer nope"})
    api.client.get("/v1/audit", headers=api.h("search"))
    refused = [row for row in _audit(api) if row["action"] == "refused"]
    assert {row["detail"]["status"] for row in refused} >= {401, 403}
    forbidden = next(row for row in refused if row["detail"]["status"] == 403)
    assert forbidden["key_id"] is not None and forbidden["detail"]["path"] == "/v1/audit"


def test_a_connection_that_never_finishes_its_headers_is_closed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    open_store(settings).dispose()
    env = {"SLEUTH_DATA_DIR": str(settings.data_dir), "SLEUTH_REQUEST_HEADER_TIMEOUT_S": "1"}
    with live_server(env, log_path=tmp_path / "server.log") as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
            try:
                while sock.recv(1024):  # an answer (408) is fine; then the server must hang up
                    pass
            except TimeoutError:
                pytest.fail("the server kept a connection with unfinished headers open for 30 s")


# --- defect 1: bounded work in flight, costed requests ------------------------------------------------
def test_a_full_set_of_work_slots_answers_503_with_retry_after(tmp_path: Path) -> None:
    with running_api(tmp_path, work_slots=1, work_queue=0) as api:
        engine = api.client.app.state.sleuth.engine  # type: ignore[attr-defined]
        entered, release = threading.Event(), threading.Event()
        real = engine.search

        def slow_first(*args: object, **kw: object) -> Any:
            if not entered.is_set():
                entered.set()
                release.wait(30)
            return real(*args, **kw)

        engine.search = slow_first
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(api.search(jpeg(1)).status_code))
        first.start()
        assert entered.wait(30)
        second = api.search(jpeg(2))
        release.set()
        first.join(30)
        assert second.status_code == 503, second.text
        assert int(second.headers["retry-after"]) >= 1 and "busy" in second.json()["message"]
        assert results == [200]


def test_large_images_cost_more_of_the_rate_limit(tmp_path: Path) -> None:
    buf = io.BytesIO()
    synthetic_photo(9, (256, 192)).resize((4096, 4096), Image.Resampling.BILINEAR).save(
        buf, "JPEG", quality=50
    )
    big = buf.getvalue()
    assert len(big) < 2_000_000
    with running_api(tmp_path, rate_limit="10/hour", request_cost_pixels=4_000_000) as api:
        codes = [api.search(big).status_code for _ in range(2)] + [api.search(jpeg(1)).status_code]
        assert codes == [200, 200, 429], codes  # 2 x 5 tokens (16.8 Mpx at 4 Mpx a token) empty the bucket


# --- defect 5: the audit is complete; key ids are never reused ---------------------------------------------
def test_failed_searches_and_reads_of_reports_images_thumbnails_and_audit_are_audited(api: Api) -> None:
    ok = api.search(jpeg(3))
    assert ok.status_code == 200
    report_id = ok.json()["report_id"]
    assert api.search(b"\xff\xd8\xff\xe0 not really a jpeg").status_code == 400
    assert api.search(b"just some text, not an image").status_code == 415
    up = api.client.post("/v1/collections", json={"name": "c"}, headers=api.h("ingest")).json()
    image = api.client.post(
        f"/v1/collections/{up['id']}/images", files={"file": ("a.jpg", jpeg(4), "image/jpeg")},
        headers=api.h("ingest"),
    ).json()  # fmt: skip
    assert api.client.get(f"/v1/reports/{report_id}", headers=api.h("search")).status_code == 200
    assert api.client.get(f"/v1/images/{image['image_id']}", headers=api.h("search")).status_code == 200
    assert (
        api.client.get(f"/v1/images/{image['image_id']}/thumbnail", headers=api.h("search")).status_code
        == 200
    )
    _audit(api)
    rows = _audit(api)
    by_action = {row["action"]: row for row in rows}
    search_key = next(r["key_id"] for r in rows if r["action"] == "search")
    refused = [r for r in rows if r["action"] == "refused" and r["detail"].get("route") == "create_search"]
    assert sorted(r["detail"]["status"] for r in refused) == [400, 415]
    assert all(r["key_id"] == search_key for r in refused)
    assert (
        by_action["get_report"]["report_id"] == report_id and by_action["get_report"]["key_id"] == search_key
    )
    assert by_action["get_image"]["detail"]["path"] == f"/v1/images/{image['image_id']}"
    assert "get_thumbnail" in by_action and "export_audit" in by_action


def test_key_ids_are_never_reused_and_key_rows_are_never_deleted(settings: Settings) -> None:
    store = open_store(settings)
    create_key(store, "one", ["search"])
    second, _ = create_key(store, "two", ["search"])
    with pytest.raises(Exception, match="revoked, never deleted"), store.session() as s:
        s.execute(text("DELETE FROM api_keys WHERE id = :id"), {"id": second.id})
    with store.session() as s:  # even a row removed behind Sleuth's back does not free its id
        s.execute(text("DROP TRIGGER IF EXISTS api_keys_never_deleted"))
        s.execute(text("DELETE FROM api_keys WHERE id = :id"), {"id": second.id})
    third, _ = create_key(store, "three", ["search"])
    assert third.id > second.id
    store.dispose()


# --- defect 6: 413 for chunked bodies, no orphan bytes, clean collection names ----------------------------
def test_a_chunked_upload_over_the_limit_is_413(api: Api) -> None:
    def body() -> Iterator[bytes]:
        yield from _multipart_chunks(3_000_000)

    r = api.client.post("/v1/searches", content=body(), headers=api.h("search") | {"Content-Type": MULTIPART})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_large"


def test_the_bytes_of_a_refused_upload_do_not_stay_in_uploads(api: Api) -> None:
    collection = api.client.post("/v1/collections", json={"name": "c"}, headers=api.h("ingest")).json()
    with write_lock(api.settings.data_dir, purpose="a test holding the index"):
        r = api.client.post(
            f"/v1/collections/{collection['id']}/images", files={"file": ("a.jpg", jpeg(5), "image/jpeg")},
            headers=api.h("ingest"),
        )  # fmt: skip
    assert r.status_code == 409, r.text
    uploads = api.settings.data_dir / "uploads"
    assert not uploads.exists() or [p.name for p in uploads.iterdir()] == []


@pytest.mark.parametrize(
    "name", ["bad\x00name", "\x1b[31mred", "\u202eevil", "zero\u200bwidth", "bidi\u2066x", "   "]
)
def test_collection_names_with_control_bidi_or_zero_width_characters_are_refused(api: Api, name: str) -> None:
    r = api.client.post("/v1/collections", json={"name": name}, headers=api.h("ingest"))
    assert r.status_code in (400, 422), r.text
    r = api.client.post(
        "/v1/ingest-jobs",
        json={"source": str(api.roots / "corpus"), "collection": name},
        headers=api.h("ingest"),
    )
    assert r.status_code in (400, 422), r.text


def test_collection_names_are_nfc_normalised_and_stripped(api: Api) -> None:
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert (
        api.client.post("/v1/collections", json={"name": composed}, headers=api.h("ingest")).status_code
        == 201
    )
    again = api.client.post("/v1/collections", json={"name": decomposed}, headers=api.h("ingest"))
    assert again.status_code == 400 and "exists already" in again.json()["message"]
    api.client.post("/v1/collections", json={"name": "base"}, headers=api.h("ingest"))
    r = api.client.post(
        "/v1/ingest-jobs", json={"source": str(api.roots / "corpus"), "collection": "base "},
        headers=api.h("ingest"),
    )  # fmt: skip
    assert r.status_code == 202 and api.wait_job(r.json()["job_url"], "ingest")["status"] == "done"
    names = sorted(c["name"] for c in api.client.get("/v1/collections", headers=api.h("search")).json())
    assert names == ["base", composed], names
