"""The report's compare view of a verified hit: query and match side by side with the matched region and the
RANSAC inlier lines, and the match warped onto the query (overlay, flicker), all as inline SVG geometry.

Geometry comes from the hit's verification (``search.verify``): ``transform`` maps query pixels to candidate
pixels (2x3, originals), ``inlier_pairs`` holds a sample of the inliers in the same pixels. Images are the
thumbnails the report already inlines (their size does not matter: SVG places them at their originals' size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

HEIGHT = 240.0  # display units of the side-by-side view (the SVG scales to the page width)
GAP = 16.0
MAX_VIEWS = 5  # the best verified hits get a compare view


@dataclass(frozen=True)
class CompareView:
    """What ``templates/compare.html`` draws for one hit (all coordinates in SVG display units)."""

    key: str  # unique per hit on the page (input ids)
    query_uri: str
    match_uri: str
    query_size: tuple[float, float]  # displayed width, height of the query
    match_size: tuple[float, float]
    match_x: float  # where the match starts, right of the query
    width: float  # of the side-by-side view
    lines: list[tuple[float, float, float, float]]
    region: str  # SVG polygon points: the query's frame mapped into the match
    overlay_matrix: str  # SVG matrix(...) placing the match (its original pixels) onto the displayed query
    match_original: tuple[int, int]
    inliers: int


def _fmt(values: Any) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def compare_view(
    key: str,
    hit: Any,
    *,
    query_size: tuple[int, int],
    query_uri: str | None,
    match_uri: str | None,
) -> CompareView | None:
    """The compare view of ``hit`` (a report ``HitOut``) against a query of ``query_size`` (original w, h),
    or None when the hit was not verified with a transform or an image is missing."""
    v = hit.verification or {}
    transform, pairs = v.get("transform"), v.get("inlier_pairs") or []
    if not (query_uri and match_uri and transform and pairs and hit.width and hit.height):
        return None
    qw, qh = float(query_size[0]), float(query_size[1])
    cw, ch = float(hit.width), float(hit.height)
    if min(qw, qh, cw, ch) <= 0:
        return None
    t = np.vstack([np.asarray(transform, dtype=np.float64), [0.0, 0.0, 1.0]])  # [3, 3] query px -> match px
    if abs(np.linalg.det(t)) < 1e-12:
        return None
    sq, sc = HEIGHT / qh, HEIGHT / ch  # display units per original pixel of query and match
    match_x = qw * sq + GAP
    lines = [(qx * sq, qy * sq, match_x + cx * sc, cy * sc) for qx, qy, cx, cy in pairs]
    corners = np.array([[0, 0, 1], [qw, 0, 1], [qw, qh, 1], [0, qh, 1]], dtype=np.float64).T  # [3, 4]
    mapped = (t @ corners)[:2].T  # [4, 2] match px
    region = " ".join(f"{match_x + x * sc:.2f},{y * sc:.2f}" for x, y in mapped)
    inv = np.diag([sq, sq, 1.0]) @ np.linalg.inv(t)  # match px -> displayed query
    a, c, e = inv[0]
    b, d, f = inv[1]
    return CompareView(
        key=key, query_uri=query_uri, match_uri=match_uri, query_size=(qw * sq, HEIGHT),
        match_size=(cw * sc, HEIGHT), match_x=match_x, width=match_x + cw * sc, lines=lines, region=region,
        overlay_matrix=f"matrix({_fmt((a, b, c, d, e, f))})", match_original=(int(cw), int(ch)),
        inliers=int(v.get("inliers") or 0),
    )  # fmt: skip


def compare_views(
    hits: list[Any], *, query_size: tuple[int, int], query_uri: str | None, thumbs: dict[int, str | None]
) -> dict[int, CompareView]:
    """Compare views of the best ``MAX_VIEWS`` verified hits, by image id."""
    views: dict[int, CompareView] = {}
    for hit in hits:
        if len(views) >= MAX_VIEWS:
            break
        view = compare_view(
            f"h{hit.image_id}",
            hit,
            query_size=query_size,
            query_uri=query_uri,
            match_uri=thumbs.get(hit.image_id),
        )
        if view is not None:
            views[hit.image_id] = view
    return views
