"""Filters and orders over a query's hits: by collection, label and first-seen date; relevance or oldest first.

Filters apply to the hits the tiers found (the candidates of the indexes, classified), before they are cut to
``k``: they narrow what a query reports, they do not widen the candidate search (a hit that no tier offered is
not found by filtering). Dates are ISO 8601 strings compared on their date part (``YYYY-MM-DD``); a hit passes
a date filter when its earliest first-seen date (over the sightings that pass the collection filter) lies in the
range, and a hit without any first-seen date fails every date filter.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from indexer.errors import SleuthError

SORTS = ("relevance", "first_seen")


class _HasSightings(Protocol):
    label: str
    sightings: list[dict[str, Any]]


def iso_date(value: str | None, what: str) -> str | None:
    """``value`` as ``YYYY-MM-DD`` (a date or the date of a datetime), or None; SleuthError when unreadable."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        return dt.date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        raise SleuthError(f"{what} {text!r} is not an ISO 8601 date (YYYY-MM-DD)") from None


@dataclass(frozen=True)
class HitFilter:
    """What a query's hits must satisfy; empty fields do not filter."""

    collection: str | None = None
    label: str | None = None
    first_seen_from: str | None = None  # YYYY-MM-DD, inclusive
    first_seen_to: str | None = None  # YYYY-MM-DD, inclusive
    sort: str = "relevance"  # or "first_seen": oldest first (undated hits last)

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise SleuthError(f"sort must be one of {', '.join(SORTS)}, not {self.sort!r}")
        for name in ("first_seen_from", "first_seen_to"):
            object.__setattr__(self, name, iso_date(getattr(self, name), name))

    @property
    def active(self) -> bool:
        return any((self.collection, self.label, self.first_seen_from, self.first_seen_to))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def _sightings(self, sightings: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [s for s in sightings if self.collection is None or s.get("collection") == self.collection]

    def earliest(self, sightings: Sequence[Mapping[str, Any]]) -> str | None:
        """The earliest first-seen date (YYYY-MM-DD) of the sightings that pass the collection filter."""
        dates = sorted(str(s["first_seen"])[:10] for s in self._sightings(sightings) if s.get("first_seen"))
        return dates[0] if dates else None

    def accepts(self, hit: _HasSightings) -> bool:
        if self.label is not None and hit.label != self.label:
            return False
        if self.collection is not None and not self._sightings(hit.sightings):
            return False
        if self.first_seen_from is None and self.first_seen_to is None:
            return True
        first = self.earliest(hit.sightings)
        if first is None:
            return False
        return (self.first_seen_from is None or first >= self.first_seen_from) and (
            self.first_seen_to is None or first <= self.first_seen_to
        )


def filter_and_sort(hits: list[Any], hit_filter: HitFilter | None) -> list[Any]:
    """``hits`` (ranked best first) that pass ``hit_filter``, in its order (oldest first keeps rank on ties)."""
    if hit_filter is None:
        return hits
    kept = [h for h in hits if hit_filter.accepts(h)]
    if hit_filter.sort == "first_seen":
        kept.sort(key=lambda h: hit_filter.earliest(h.sightings) or "9999-99-99")  # stable: rank on ties
    return kept
