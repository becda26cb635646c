"""`sleuth search` prints each query's verdict and evidence, and exports batches as JSON lines or CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from typer.testing import CliRunner

from api.cli import app
from api.search_output import CSV_COLUMNS
from tests.synthetic_images import write_corpus, write_textured_corpus
from tests.test_cli_search import _modified_copy

runner = CliRunner()
LONG_PAGE = "https://archive.example.org/2021/05/14/a-very-long-path/that-would-not-fit-in-a-column/page.html?id=123456"


def _indexed(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """A manifest-ingested corpus in two collections (the manifest's column), with first-seen dates and URLs."""
    paths = write_textured_corpus(tmp_path / "corpus", 6)
    rows = [
        {"path": p.name, "collection": "tpdne" if i % 2 else "stock-2021", "first_seen": f"2021-0{i + 1}-14",
         "url": f"https://img.example.org/{p.name}", "page_url": LONG_PAGE if i == 3 else None}
        for i, p in enumerate(paths)
    ]  # fmt: skip
    manifest = tmp_path / "corpus" / "crawl.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    data = ["--data-dir", str(tmp_path / "data")]
    result = runner.invoke(app, ["ingest", str(manifest), "--collection", "fallback", *data])
    assert result.exit_code == 0, result.output
    return paths, data


def test_text_output_gives_the_verdict_its_reasons_and_only_real_evidence_with_units(tmp_path: Path) -> None:
    paths, data = _indexed(tmp_path)
    query = tmp_path / "q.jpg"
    _modified_copy(paths[3], query)
    result = runner.invoke(app, ["search", str(query), *data], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert (
        "verdict (copy_of_known): Near-duplicate of a known image first seen 2021-04-14 at " + LONG_PAGE
        in text
    )
    assert "RANSAC inliers (≥ 25)" in text
    assert LONG_PAGE in text, "the source URL is printed in full"
    assert "tpdne" in text, "the collection column comes from the manifest's collection column"
    assert "pdq 1" not in text and "PDQ distance" not in text, "a far PDQ distance is no evidence"
    for column in ("match", "score", "why", "collection", "first seen", "source", "image id"):
        assert column in text
    narrow = runner.invoke(app, ["search", str(query), *data], env={"COLUMNS": "80"}).stdout
    assert "1. near duplicate  score" in narrow and "   why: verified copy:" in narrow
    assert f"   source: {LONG_PAGE}" in narrow, "a narrow terminal gets one block per hit, the URL whole"


def test_json_carries_the_verdict_and_each_hits_why(tmp_path: Path) -> None:
    paths, data = _indexed(tmp_path)
    result = runner.invoke(app, ["search", str(paths[1]), "--json", *data])
    assert result.exit_code == 0, result.output
    (doc,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert doc["verdict"]["kind"] == "copy_of_known"
    assert doc["verdict"]["summary"].startswith("Exact copy of a known image first seen 2021-02-14")
    assert doc["verdict"]["reasons"][0] == doc["verdict"]["summary"]
    top = doc["hits"][0]
    assert top["why"] == ["identical bytes (same SHA-256)"] and top["first_seen"] == "2021-02-14"


def test_csv_export_of_a_batch_has_one_row_per_hit_with_unit_named_columns(tmp_path: Path) -> None:
    paths, data = _indexed(tmp_path)
    queries = tmp_path / "queries"
    queries.mkdir()
    _modified_copy(paths[3], queries / "a-copy.jpg")
    write_corpus(queries / "b-unrelated", 1, start_seed=900)
    (queries / "c-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "exports" / "results.csv"
    result = runner.invoke(app, ["search", str(queries), "--format", "csv", "--out", str(out), *data])
    assert result.exit_code == 2, result.output  # the broken query is reported and makes the exit code 2
    assert result.stdout == "", "with --out nothing but the file is written"
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == CSV_COLUMNS
    assert {"pdq_distance_bits_of_256", "clip_cosine", "ransac_inliers", "face_identity_distance"} <= set(
        rows[0]
    )
    copy = [r for r in rows if r["query"].endswith("a-copy.jpg")]
    assert copy[0]["rank"] == "1" and copy[0]["match"] == "near_duplicate"
    assert (
        copy[0]["source_url"] == LONG_PAGE
        and copy[0]["image_url"] == f"https://img.example.org/{paths[3].name}"
    )
    assert copy[0]["collection"] == "tpdne" and copy[0]["first_seen"] == "2021-04-14"
    assert int(copy[0]["ransac_inliers"]) >= 25 and "RANSAC inliers" in copy[0]["why"]
    assert copy[0]["verdict"] == "copy_of_known" and copy[0]["image_id"]
    unrelated = [r for r in rows if "b-unrelated" in r["query"]]
    assert all(r["match"] != "near_duplicate" for r in unrelated) and unrelated[0]["verdict"]
    (broken,) = [r for r in rows if r["query"].endswith("c-broken.jpg")]
    assert broken["error"] and not broken["match"]


def test_jsonl_to_a_file_and_a_bad_format_is_a_clear_error(tmp_path: Path) -> None:
    paths, data = _indexed(tmp_path)
    out = tmp_path / "results.jsonl"
    result = runner.invoke(
        app, ["search", str(paths[0]), str(paths[2]), "--format", "jsonl", "--out", str(out), *data]
    )
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["hits"][0]["match_class"] for d in docs] == ["exact", "exact"]
    bad = runner.invoke(app, ["search", str(paths[0]), "--format", "xml", *data])
    assert bad.exit_code == 2 and "'xml' is not one of 'table', 'jsonl', 'csv'" in bad.output


def test_cli_filters_by_collection_label_and_date_and_sorts_oldest_first(tmp_path: Path) -> None:
    paths, data = _indexed(tmp_path)
    query = tmp_path / "q.jpg"
    _modified_copy(paths[3], query)  # photo 3: collection tpdne, first seen 2021-04-14

    def top(*args: str) -> list[dict]:
        result = runner.invoke(app, ["search", str(query), "--json", *args, *data])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["hits"]

    assert top()[0]["sightings"][0]["collection"] == "tpdne"
    assert top("--collection", "stock-2021") == [], "the copy's only sighting is in tpdne"
    assert (
        top("--collection", "tpdne", "--since", "2021-04-01", "--until", "2021-04-30")[0]["first_seen"]
        == "2021-04-14"
    )
    assert top("--until", "2021-03-31") == []
    assert top("--label", "generated") == []
    sorted_hits = top("--sort", "first_seen", "--verify-top", "0", "--clip-min-similarity", "-1")
    dates = [h["first_seen"] for h in sorted_hits if h["first_seen"]]
    assert dates == sorted(dates)
    bad = runner.invoke(app, ["search", str(query), "--since", "last week", *data])
    assert bad.exit_code == 2 and "ISO 8601" in bad.output


def test_cli_region_searches_a_rectangle_of_a_composite(tmp_path: Path) -> None:
    from PIL import Image

    paths, data = _indexed(tmp_path)
    canvas = Image.new("RGB", (1100, 600), (255, 255, 255))
    canvas.paste(Image.open(paths[2]).convert("RGB"), (420, 60))  # 640x480 textured photo
    composite = tmp_path / "composite.jpg"
    canvas.save(composite, quality=90)
    whole = runner.invoke(app, ["search", str(composite), "--json", *data])
    part = runner.invoke(app, ["search", str(composite), "--region", "420,60,640,480", "--json", *data])
    assert part.exit_code == 0, part.output
    doc = json.loads(part.stdout)
    assert doc["query"]["region"]["width"] == 640 and doc["query"]["width"] == 640
    assert doc["hits"][0]["match_class"] == "near_duplicate"
    assert doc["hits"][0]["sightings"][0]["source_key"] == paths[2].name
    assert json.loads(whole.stdout)["query"]["width"] == 1100


def test_text_query_uses_the_clip_text_tower_and_an_image_only_model_says_so(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_open_clip_dir

    write_corpus(tmp_path / "corpus", 5)
    with_text = make_tiny_open_clip_dir(tmp_path / "clip", text_vocab_size=49408)
    data = ["--data-dir", str(tmp_path / "data"), "--clip-model", with_text]
    assert runner.invoke(app, ["ingest", str(tmp_path / "corpus"), "-c", "web", *data]).exit_code == 0
    result = runner.invoke(app, ["search", "--text", "a photo of a red square", "--k", "3", "--json", *data])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["query"] == {"text": "a photo of a red square"} and doc["tiers"] == ["clip_text"]
    assert len(doc["hits"]) == 3 and all(h["match_class"] == "similar" for h in doc["hits"])
    cosines = [h["scores"]["clip_text_similarity"] for h in doc["hits"]]
    assert cosines == sorted(cosines, reverse=True)
    assert doc["verdict"]["kind"] == "similar_only" and "not copies" in doc["verdict"]["summary"]
    assert "text-image cosine" in doc["hits"][0]["why"][0]
    image_only = make_tiny_open_clip_dir(
        tmp_path / "clip-image-only"
    )  # its text tower does not fit a tokenizer
    other = ["--data-dir", str(tmp_path / "data2"), "--clip-model", image_only]
    runner.invoke(app, ["ingest", str(tmp_path / "corpus"), "-c", "web", *other])
    failed = runner.invoke(app, ["search", "--text", "a red square", *other])
    assert failed.exit_code == 2 and "tokenizer does not fit its text tower" in failed.output
    nothing = runner.invoke(app, ["search", *data])
    assert nothing.exit_code == 2 and "--text" in nothing.output


def test_an_onnx_image_tower_refuses_text_queries_by_name(tmp_path: Path) -> None:
    from indexer.embedders import embed_text, load_embedder
    from indexer.errors import UnsupportedQueryError
    from tests.test_embedders import export_visual_to_onnx
    from tests.tiny_models import make_tiny_open_clip_dir

    torch_model = load_embedder(make_tiny_open_clip_dir(tmp_path / "clip"))
    export_visual_to_onnx(torch_model, tmp_path / "tower.onnx")  # type: ignore[arg-type]
    model = load_embedder(f"onnx:{tmp_path / 'tower.onnx'}")
    try:
        embed_text(model, ["a red car"])
    except UnsupportedQueryError as exc:
        assert "is an image tower only" in str(exc) and "open_clip:ARCH/TAG" in str(exc)
    else:
        raise AssertionError("an image-only ONNX model embedded text")
