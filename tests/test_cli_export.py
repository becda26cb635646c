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
