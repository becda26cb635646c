"""Why a hit is a hit, in words with units: the evidence that decided its match class, and nothing else.

A hit carries every tier's score (``pdq_distance 114`` as well as ``inliers 471``), but only the scores past
their thresholds are evidence. The CLI table, the CSV export and the report page all show these phrases, so a
reader never has to know that PDQ counts bits of 256 or that a face cosine is not an identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from search.query import Thresholds
from search.same_person import ordinal as _ordinal

# Per-tier score keys and the CSV column that names each with its unit.
SCORE_COLUMNS = {
    "pdq_distance": "pdq_distance_bits_of_256",
    "phash_distance": "phash_distance_bits_of_64",
    "clip_similarity": "clip_cosine",
    "face_similarity": "face_cosine",
    "face_distance": "face_identity_distance",
    "inliers": "ransac_inliers",
    "clip_text_similarity": "clip_text_cosine",
}


def _threshold(thresholds: Mapping[str, Any] | None, name: str) -> Any:
    if thresholds and thresholds.get(name) is not None:
        return thresholds[name]
    return getattr(Thresholds(), name)


def _verified(hit: Mapping[str, Any]) -> str:
    v = hit.get("verification") or {}
    parts = []
    if v.get("mirrored"):
        parts.append("mirrored")
    if isinstance(v.get("scale"), int | float) and abs(v["scale"] - 1.0) >= 0.05:
        parts.append(f"scale {v['scale']:.2f}")
    if isinstance(v.get("rotation_deg"), int | float) and abs(v["rotation_deg"]) >= 1.0:
        parts.append(f"rotated {v['rotation_deg']:.0f}°")
    return f", {', '.join(parts)}" if parts else ""


def why(hit: Mapping[str, Any], thresholds: Mapping[str, Any] | None = None) -> list[str]:
    """The evidence behind ``hit``'s match class (a ``result_to_json`` hit), strongest first, with units."""
    if hit.get("match_class") == "exact":
        return ["identical bytes (same SHA-256)"]
    s: Mapping[str, Any] = hit.get("scores") or {}
    reasons: list[str] = []
    inliers, min_inliers = s.get("inliers"), _threshold(thresholds, "min_inliers")
    if isinstance(inliers, int | float) and inliers >= min_inliers:
        reasons.append(f"verified copy: {int(inliers)} RANSAC inliers (≥ {min_inliers}){_verified(hit)}")
    pdq, pdq_max = s.get("pdq_distance"), _threshold(thresholds, "pdq_max_distance")
    if isinstance(pdq, int | float) and pdq <= pdq_max:
        reasons.append(f"PDQ distance {int(pdq)} of 256 bits (≤ {pdq_max})")
    distance = s.get("face_distance")
    max_distance = _threshold(thresholds, "same_person_max_distance")
    decision: Mapping[str, Any] = hit.get("identity") or {}
    if isinstance(decision.get("threshold"), int | float):
        max_distance = decision["threshold"]
    if isinstance(distance, int | float) and distance <= max_distance:
        reasons.append(
            f"same person: face identity distance {distance:.3f} (≤ {max_distance}{_cohort(decision)})"
        )
    clip, clip_min = s.get("clip_similarity"), _threshold(thresholds, "clip_min_similarity")
    if isinstance(clip, int | float) and clip >= clip_min:
        reasons.append(f"CLIP cosine {clip:.3f} (≥ {clip_min}): looks alike")
    text = s.get("clip_text_similarity")
    if isinstance(text, int | float):
        reasons.append(f"CLIP text-image cosine {text:.3f}: among the nearest to the text (no threshold)")
    face, face_min = s.get("face_similarity"), _threshold(thresholds, "face_min_similarity")
    if isinstance(face, int | float) and face >= face_min:
        reasons.append(f"face-crop CLIP cosine {face:.3f} (≥ {face_min}): a similar face, not an identity")
    return reasons


def _cohort(decision: Mapping[str, Any]) -> str:
    """How a search's same-person threshold came about (search/same_person.py), or nothing for the pair rule."""
    cohort = decision.get("cohort_distance")
    if not isinstance(cohort, int | float):
        return ""
    return (f" in this search: pair threshold {decision.get('pair_threshold')}, and {decision.get('margin')} below "
            f"the query's {_ordinal(int(decision.get('cohort_rank') or 0))}-nearest different face at {cohort:.3f} of "
            f"{decision.get('gallery_faces')} faces")  # fmt: skip


def earliest_first_seen(sightings: Sequence[Mapping[str, Any]]) -> str | None:
    """The earliest claimed first-seen date of a hit's sightings (None when no sighting states one)."""
    dates = sorted(str(s["first_seen"]) for s in sightings if s.get("first_seen"))
    return dates[0] if dates else None


def earliest_sighting(sightings: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The sighting with the earliest first-seen date (undated ones last, then in stored order)."""
    if not sightings:
        return None
    return sorted(sightings, key=lambda s: (not s.get("first_seen"), str(s.get("first_seen") or "")))[0]


def source_of(sighting: Mapping[str, Any] | None) -> str:
    """Where a sighting was seen, in full: its page URL, else its image URL, else its source key."""
    if not sighting:
        return ""
    return str(sighting.get("page_url") or sighting.get("url") or sighting.get("source_key") or "")
