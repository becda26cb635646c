"""What ``sleuth search`` writes: the verdict of each query and its hits as a table, JSON lines or CSV rows.

One query's search document (``search.query.result_to_json``) gets its report verdict and, per hit, the
evidence in words (``search.explain.why``); the CSV has one row per hit (one row with the verdict alone for a
query without hits), every distance and similarity in a column named with its unit.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from typing import IO, Any

from search.explain import SCORE_COLUMNS, earliest_first_seen, earliest_sighting, source_of, why
from search.report import QueryFacts, build_report

CSV_COLUMNS = [
    "query", "query_sha256", "verdict", "verdict_summary", "rank", "match", "score", "why", "collection",
    "source_url", "page_url", "image_url", "first_seen", "image_id", "image_sha256", "label", "generator",
    "sightings", *SCORE_COLUMNS.values(), "error",
]  # fmt: skip


def with_verdict(doc: dict[str, Any], query: QueryFacts | None = None) -> dict[str, Any]:
    """``doc`` with the report's verdict (kind, summary, reasons) and each hit's ``why`` added."""
    if "text" in doc["query"]:
        doc["verdict"] = text_verdict(doc)
    else:
        report = build_report(doc, report_id=f"cli-{doc['query']['sha256'][:16]}", query=query)
        doc["verdict"] = report.verdict.model_dump(mode="json")
    for hit in doc["hits"]:
        hit["why"] = why(hit, doc.get("thresholds"))
        hit["first_seen"] = earliest_first_seen(hit.get("sightings") or [])
    return doc


def text_verdict(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What a text query says: the nearest images by CLIP, which are look-alikes and never evidence of a copy."""
    hits = doc["hits"]
    text = doc["query"]["text"]
    if not hits:
        return {"kind": "no_match", "summary": f"No indexed image is near the text {text!r}.", "reasons": []}
    cosines = [h["scores"]["clip_text_similarity"] for h in hits]
    summary = (f"{len(hits)} indexed image(s) nearest to the text {text!r} by CLIP (text-image cosine "
               f"{min(cosines):.3f} to {max(cosines):.3f}): look-alikes to inspect, not copies.")  # fmt: skip
    return {"kind": "similar_only", "summary": summary, "reasons": [summary]}


def hit_row(doc: Mapping[str, Any], hit: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """One CSV row: a hit of a query, its earliest sighting's place, and every score under its unit."""
    first = earliest_sighting(hit.get("sightings") or []) or {}
    scores: Mapping[str, Any] = hit.get("scores") or {}
    row = _query_part(doc) | {
        "rank": rank, "match": hit["match_class"], "score": hit.get("score"),
        "why": "; ".join(hit.get("why") or why(hit, doc.get("thresholds"))),
        "collection": first.get("collection"), "source_url": source_of(first), "page_url": first.get("page_url"),
        "image_url": first.get("url"), "first_seen": earliest_first_seen(hit.get("sightings") or []),
        "image_id": hit.get("image_id"), "image_sha256": hit.get("sha256"), "label": hit.get("label"),
        "generator": hit.get("generator"), "sightings": len(hit.get("sightings") or []),
    }  # fmt: skip
    row.update({column: scores.get(key) for key, column in SCORE_COLUMNS.items()})
    return row


def _query_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    verdict = doc.get("verdict") or {}
    query = doc.get("query") or {}
    return {
        "query": query.get("path") or query.get("text"), "query_sha256": query.get("sha256"),
        "verdict": verdict.get("kind"), "verdict_summary": verdict.get("summary"),
    }  # fmt: skip


def query_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every CSV row of one query document (an error document gives one row with its error)."""
    if "error" in doc:
        return [_query_part(doc) | {"error": doc["error"].get("message")}]
    rows = [hit_row(doc, hit, rank) for rank, hit in enumerate(doc["hits"], 1)]
    return rows or [_query_part(doc)]


class Sink:
    """Writes query documents to ``stream`` as JSON lines or CSV (the header once, before the first row)."""

    def __init__(self, stream: IO[str], fmt: str) -> None:
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"format must be jsonl or csv, not {fmt!r}")
        self.stream, self.fmt = stream, fmt
        self._csv: csv.DictWriter[str] | None = None

    def write(self, doc: Mapping[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(doc, default=str) + "\n")
        else:
            if self._csv is None:
                self._csv = csv.DictWriter(self.stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                self._csv.writeheader()
            self._csv.writerows(query_rows(doc))
        self.stream.flush()
