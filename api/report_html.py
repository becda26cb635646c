"""A stored report as one self-contained HTML page (evidence thumbnails inlined as data: URIs)."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from api import services
from api.engine import Engine
from indexer.errors import NotFoundError

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).with_name("templates")
MAX_INLINE_THUMBS = 24

env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


def _thumb_data_uri(engine: Engine, image_id: int) -> str | None:
    try:
        path = services.image_thumbnail(engine, image_id)
    except NotFoundError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _hits(report: dict[str, Any]) -> list[dict[str, Any]]:
    result = report.get("result") or {}
    hits = result.get("hits") if isinstance(result, dict) else None
    return [h for h in hits if isinstance(h, dict)] if isinstance(hits, list) else []


def render_report(engine: Engine, report: dict[str, Any]) -> str:
    """The HTML page of ``report`` (``search.report.render_html`` when that exists)."""
    try:
        from search.report import render_html  # type: ignore[attr-defined]
    except ImportError:
        render_html = None
    if render_html is not None:
        return str(render_html(report))
    hits = []
    for i, hit in enumerate(_hits(report)):
        image_id = hit.get("image_id")
        thumb = (
            _thumb_data_uri(engine, int(image_id))
            if isinstance(image_id, int) and i < MAX_INLINE_THUMBS
            else None
        )
        hits.append({"hit": hit, "thumb": thumb})
    result = report.get("result") if isinstance(report.get("result"), dict) else {}
    return env.get_template("report.html").render(
        report=report, query=report.get("query") or {}, result=result, hits=hits, refine=report.get("refine")
    )
