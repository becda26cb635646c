"""History and browsing through the API: past reports, a collection's images, filters, sort, region and text."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.synthetic_images import textured_photo
from tests.test_api_app import Api, jpeg, make_api

# img_00000..11 of the fixture's corpus: even ones in "tpdne" (generated, 2019..), odd ones in "stock" (2021..).
ROWS = [
    {"path": f"corpus/img_{i:05d}.jpg", "collection": "tpdne" if i % 2 == 0 else "stock",
     "label": "generated" if i % 2 == 0 else "stock", "generator": "stylegan2" if i % 2 == 0 else None,
     "first_seen": f"{2019 + i // 4}-0{1 + i % 4}-15", "page_url": f"https://example.org/p/{i}"}
    for i in range(12)
]  # fmt: skip


@pytest.fixture
def browsed(tmp_path: Path) -> Iterator[Api]:
    for api in make_api(tmp_path):
        manifest = api.roots / "crawl.jsonl"
        manifest.write_text("\n".join(json.dumps(r) for r in ROWS))
        r = api.client.post(
            "/v1/ingest-jobs",
            json={"source": str(manifest), "collection": "fallback"},
            headers=api.h("ingest"),
        )
        assert r.status_code == 202, r.text
        assert api.wait_job(r.json()["job_url"], "ingest")["status"] == "done"
        yield api


def _collection_id(api: Api, name: str) -> int:
    listed = api.client.get("/v1/collections", headers=api.h("search")).json()
    return next(c["id"] for c in listed if c["name"] == name)


def test_reports_list_is_paged_newest_first_per_key_and_admin_sees_all(browsed: Api) -> None:
    mine = [browsed.search(jpeg(i, size=(200, 150), quality=70)).json()["report_id"] for i in (1, 2, 3)]
    theirs = browsed.search(jpeg(4), scope="other").json()["report_id"]
    first = browsed.client.get("/v1/reports?limit=2", headers=browsed.h("search")).json()
    assert first["total"] == 3 and [r["id"] for r in first["items"]] == [mine[2], mine[1]]
    assert first["next"] == "/v1/reports?limit=2&offset=2"
    second = browsed.client.get(first["next"], headers=browsed.h("search")).json()
    assert [r["id"] for r in second["items"]] == [mine[0]] and second["next"] is None
    item = first["items"][0]
    assert item["verdict"]["kind"] == "copy_of_known" and item["verdict"]["summary"].startswith(
        "Near-duplicate"
    )
    assert item["hits"]["near_duplicate"] >= 1 and item["html_url"].endswith("?format=html")
    thumb = browsed.client.get(item["query_thumbnail_url"], headers=browsed.h("search"))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    other = browsed.client.get(item["query_thumbnail_url"], headers=browsed.h("other"))
    assert other.status_code == 404, "another key's report stays hidden"
    everyone = browsed.client.get("/v1/reports?limit=10&thumbnails=true", headers=browsed.h("admin")).json()
    assert {r["id"] for r in everyone["items"]} == {*mine, theirs}
    assert all(r["thumbnail"].startswith("data:image/jpeg;base64,") for r in everyone["items"])
    assert browsed.client.get("/v1/reports?limit=0", headers=browsed.h("search")).status_code == 422


def test_collection_images_are_paged_and_filtered_by_label_generator_and_first_seen(browsed: Api) -> None:
    tpdne = _collection_id(browsed, "tpdne")
    url = f"/v1/collections/{tpdne}/images"
    page = browsed.client.get(url + "?limit=4", headers=browsed.h("search")).json()
    assert page["collection"]["name"] == "tpdne" and page["total"] == 6
    assert [i["source_key"] for i in page["items"]] == [f"corpus/img_{i:05d}.jpg" for i in (0, 2, 4, 6)]
    assert page["next"] == url + "?limit=4&offset=4"
    rest = browsed.client.get(page["next"], headers=browsed.h("search")).json()
    assert [i["source_key"][-9:] for i in rest["items"]] == ["00008.jpg", "00010.jpg"] and rest[
        "next"
    ] is None
    assert all(i["label"] == "generated" and i["generator"] == "stylegan2" for i in page["items"])
    ranged = browsed.client.get(
        url + "?first_seen_from=2020-01-01&first_seen_to=2020-12-31&thumbnails=true",
        headers=browsed.h("search"),
    ).json()
    assert [i["first_seen"] for i in ranged["items"]] == ["2020-01-15", "2020-03-15"]
    assert all(i["thumbnail"].startswith("data:image/jpeg") for i in ranged["items"])
    stock = _collection_id(browsed, "stock")
    none = browsed.client.get(
        f"/v1/collections/{stock}/images?label=generated", headers=browsed.h("search")
    ).json()
    assert none["total"] == 0 and none["items"] == []
    by_gen = browsed.client.get(
        url + "?generator=stylegan2&sort=first_seen", headers=browsed.h("search")
    ).json()
    assert by_gen["total"] == 6 and by_gen["items"][0]["first_seen"] == "2019-01-15"
    bad = browsed.client.get(url + "?first_seen_from=yesterday", headers=browsed.h("search"))
    assert bad.status_code == 400 and "ISO 8601" in bad.json()["message"]
    assert browsed.client.get("/v1/collections/999/images", headers=browsed.h("search")).status_code == 404


def _copy_in_two_collections(browsed: Api) -> bytes:
    """img_00003 (stock, 2019-04-15) uploaded again into tpdne dated 2018: one image, two sightings."""
    data = (browsed.roots / "corpus" / "img_00003.jpg").read_bytes()
    r = browsed.client.post(
        f"/v1/collections/{_collection_id(browsed, 'tpdne')}/images", files={"file": ("a.jpg", data)},
        data={"first_seen": "2018-06-01"}, headers=browsed.h("ingest"),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    return data


def test_search_filters_by_collection_label_and_date_and_sorts_oldest_first(browsed: Api) -> None:
    query = jpeg(3, size=(200, 150), quality=60)
    plain = browsed.search(query).json()
    assert plain["hits"]["near_duplicate"][0]["sightings"][0]["source_key"] == "corpus/img_00003.jpg"
    assert browsed.search(query, label="generated").json()["verdict"]["kind"] != "copy_of_known"
    in_stock = browsed.search(query, collection="stock", label="stock").json()
    assert in_stock["hits"]["near_duplicate"][0]["sightings"][0]["source_key"] == "corpus/img_00003.jpg"
    dated = browsed.search(query, first_seen_from="2019-04-01", first_seen_to="2019-04-30").json()
    assert [h["first_seen"] for h in dated["hits"]["near_duplicate"]] == ["2019-04-15"]
    assert browsed.search(query, first_seen_to="2018-12-31").json()["hits"]["near_duplicate"] == []
    _copy_in_two_collections(browsed)
    oldest = browsed.search(query, sort="first_seen", collection="tpdne").json()
    assert oldest["hits"]["near_duplicate"][0]["first_seen"] == "2018-06-01"
    assert oldest["reproducibility"]["timings_ms"] and "verdict" in oldest
    bad = browsed.search(query, sort="newest")
    assert bad.status_code == 422


def test_a_region_of_a_composite_finds_the_image_it_was_cut_from(browsed: Api) -> None:
    canvas = Image.new("RGB", (700, 420), (250, 250, 250))
    canvas.paste(Image.open(browsed.roots / "corpus" / "img_00006.jpg").convert("RGB"), (380, 60))
    canvas.paste(
        Image.open(browsed.roots / "corpus" / "img_00001.jpg").convert("RGB").resize((200, 150)), (20, 20)
    )
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=85)
    body = browsed.search(buf.getvalue(), region="380,60,256,192").json()
    top = body["hits"]["near_duplicate"][0]
    assert top["sightings"][0]["source_key"] == "corpus/img_00006.jpg"
    assert body["query"]["region"]["x"] == 380 and body["query"]["region"]["width"] == 256
    assert (body["query"]["width"], body["query"]["height"]) == (256, 192)
    html = browsed.client.get(body["report_html_url"], headers=browsed.h("search")).text
    assert 'id="query-region">256&times;192 at (380, 60) of the upload' in html
    tiny = browsed.search(buf.getvalue(), region="0,0,5,5")
    assert tiny.status_code == 400 and "less than 16 px" in tiny.json()["message"]
    assert browsed.search(buf.getvalue(), region="a,b").status_code == 400


def test_report_page_has_a_compare_view_of_the_verified_match(browsed: Api) -> None:
    image = textured_photo(3)  # 640x480 with fine texture: many local features
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    r = browsed.client.post(
        f"/v1/collections/{_collection_id(browsed, 'stock')}/images", files={"file": ("t.jpg", buf.getvalue())},
        headers=browsed.h("ingest"),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    buf = io.BytesIO()
    image.crop((64, 48, 576, 432)).resize((384, 288)).save(buf, "JPEG", quality=80)  # found by verification
    body = browsed.search(buf.getvalue()).json()
    html = browsed.client.get(body["report_html_url"], headers=browsed.h("search")).text
    top = body["hits"]["near_duplicate"][0]
    assert top["verification"]["transform"] and len(top["verification"]["inlier_pairs"]) >= 10
    assert f'id="compare-h{top["image_id"]}"' in html and html.count("<line ") >= 10
    assert 'class="region"' in html and 'class="warped"' in html and "flicker" in html
    assert "Why: verified copy:" in html and "<script" not in html


def test_text_search_without_a_text_tower_says_so_clearly(browsed: Api) -> None:
    r = browsed.client.post("/v1/text-searches", json={"text": "a red car"}, headers=browsed.h("search"))
    assert r.status_code == 400 and "text queries need the CLIP tier" in r.json()["message"]
    assert (
        browsed.client.post("/v1/text-searches", json={"text": ""}, headers=browsed.h("search")).status_code
        == 422
    )
