"""`sleuth search` and `sleuth demo` through the real CLI (copy-detection tiers, no model weights)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw
from typer.testing import CliRunner

from api.cli import app
from tests.synthetic_images import write_corpus, write_textured_corpus

runner = CliRunner()


def _json_lines(args: list[str], *, code: int = 0) -> list[dict]:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _modified_copy(src: Path, dst: Path) -> None:
    """Crop 20 %, shrink, caption and recompress: PDQ alone no longer matches, verification must."""
    with Image.open(src) as im:
        image = im.convert("RGB")
    w, h = image.size
    image = image.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w * 2 // 3, h * 2 // 3))
    ImageDraw.Draw(image).rectangle((0, image.height - 20, image.width, image.height), fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=40)
    dst.write_bytes(buf.getvalue())


def test_search_finds_a_cropped_captioned_copy_and_prints_one_json_line_per_query(tmp_path: Path) -> None:
    paths = write_textured_corpus(tmp_path / "corpus", 12)
    data = ["--data-dir", str(tmp_path / "data")]
    runner.invoke(app, ["ingest", str(tmp_path / "corpus"), "--collection", "web", "--json", *data])
    queries = tmp_path / "q"
    queries.mkdir()
    _modified_copy(paths[3], queries / "a-modified.jpg")
    (queries / "b-exact.png").write_bytes(paths[5].read_bytes())
    (queries / "c-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    docs = _json_lines(["search", str(queries), "--json", "--k", "3", *data], code=2)

    assert [Path(d["query"]["path"]).name for d in docs] == ["a-modified.jpg", "b-exact.png", "c-broken.jpg"]
    modified, exact, broken = docs
    top = modified["hits"][0]
    assert top["match_class"] == "near_duplicate"
    assert top["sightings"][0]["source_key"] == paths[3].name
    assert top["sightings"][0]["collection"] == "web"
    assert top["scores"]["inliers"] >= 15 and top["verification"]["accepted"]
    assert top["scores"]["pdq_distance"] > 31, "the copy must be found by verification, not by PDQ alone"
    assert modified["tiers"][:3] == ["sha256", "pdq", "phash"] and "verify" in modified["tiers"]
    assert "clip" in modified["skipped_tiers"]
    assert exact["hits"][0]["match_class"] == "exact"
    assert exact["hits"][0]["sha256"] == exact["query"]["sha256"]
    assert broken["error"]["reason"] in {"corrupt", "truncated", "unsupported_format"}
    assert all(h["match_class"] != "exact" for h in modified["hits"])


def test_search_of_an_unrelated_image_reports_no_copy(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 8)
    other = write_corpus(tmp_path / "other", 9)[-1]
    data = ["--data-dir", str(tmp_path / "data")]
    runner.invoke(app, ["ingest", str(tmp_path / "corpus"), "--collection", "web", *data])
    (doc,) = _json_lines(["search", str(other), "--json", *data])
    assert [h for h in doc["hits"] if h["match_class"] in ("exact", "near_duplicate")] == []


def test_per_query_thresholds_change_the_decision(tmp_path: Path) -> None:
    paths = write_textured_corpus(tmp_path / "corpus", 6)
    data = ["--data-dir", str(tmp_path / "data")]
    runner.invoke(app, ["ingest", str(tmp_path / "corpus"), "--collection", "web", *data])
    query = tmp_path / "q.jpg"
    _modified_copy(paths[1], query)
    (strict,) = _json_lines(["search", str(query), "--json", "--min-inliers", "100000", *data])
    assert strict["thresholds"]["min_inliers"] == 100000
    (unverified,) = _json_lines(["search", str(query), "--json", "--verify-top", "0", *data])
    assert unverified["thresholds"]["verify_top"] == 0
    assert all(h["verification"] is None for h in unverified["hits"])
    assert all(
        h["match_class"] != "near_duplicate" or h["scores"]["pdq_distance"] <= 31 for h in strict["hits"]
    )


def test_search_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", str(tmp_path / "nope.jpg"), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_demo_ingests_the_bundled_corpus_and_finds_the_modified_copy(tmp_path: Path) -> None:
    (doc,) = _json_lines(["demo", "--json", "--data-dir", str(tmp_path / "data")])
    assert doc["ingest"]["new"] >= 20
    top = doc["search"]["hits"][0]
    assert top["match_class"] == "near_duplicate"
    assert top["sightings"][0]["source_key"] == "chelsea.png"
    again = _json_lines(["demo", "--json", "--data-dir", str(tmp_path / "data")])[0]
    assert again["ingest"]["new"] == 0, "a second demo run adds nothing"
