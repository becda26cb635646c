"""The "same person" decision of a 1:N face search: the pair threshold, made gallery-aware by a cohort margin.

A pair threshold (``same_person_max_distance``, 0.30 on unit dlib descriptors) is a 1:1 rule: two given faces are
the same person when their distance is at most it; at 0.30 about 0.02 % of pairs of different people pass
(benchmarks/face_identity.py). A search compares the query with all N faces of the index and keeps the best,
so the chance that some different person passes grows with N (about N x 0.02 %: at N = 808, 15 of 80 unindexed
faces got a false same-person hit). Queries from crowded regions of face space (babies, average-looking
generated faces) are the ones that do: many different people lie near them.

The search therefore also asks that the hit stand out from the query's own neighbourhood of different people
(cohort normalisation): the **cohort distance** is the distance of the query's ``cohort_rank``-th nearest face
among those the pair rule already calls a different person (farther than the pair threshold, so several photos
of the same person never count as the cohort), and a hit is the same person only when its distance is at most
``min(pair threshold, cohort distance - margin)``. The cohort distance is the query's own impostor quantile at
``cohort_rank / N``: the larger the gallery, the nearer it lies and the stricter the rule. A gallery with fewer
than ``cohort_rank`` such faces has no cohort; the pair rule alone applies there (with N below ~50 it already
expects at most 1 % false same-person hits per search). ``margin`` 0 switches the test off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SamePersonDecision:
    """The same-person limit of one query face in one search, and what it was derived from."""

    threshold: float  # the distance at or below which a face of this search is the same person
    pair_threshold: float  # the 1:1 rule (same_person_max_distance)
    margin: float  # how far below the cohort distance a same-person hit must lie
    cohort_rank: int
    cohort_distance: float | None  # None: too few different faces for a cohort (pair rule alone)
    gallery_faces: int  # N: faces in the searched index
    rule: str  # one line that says how the threshold came about

    def passes(self, distance: float) -> bool:
        return distance <= self.threshold

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def same_person_decision(
    distances: Sequence[float], *, pair_threshold: float, margin: float, cohort_rank: int, gallery_faces: int
) -> SamePersonDecision:
    """The decision for a query face whose nearest index faces lie at ``distances`` (unit-descriptor Euclidean,
    any order; the nearest ``cohort_rank`` + however many lie within the pair threshold are needed)."""
    beyond = sorted(d for d in distances if d > pair_threshold)  # faces the pair rule calls different people
    if margin <= 0 or cohort_rank < 1 or len(beyond) < cohort_rank:
        why = "margin test off" if margin <= 0 or cohort_rank < 1 else (
            f"fewer than {cohort_rank} faces farther than it among the {gallery_faces} searched: no cohort"
        )  # fmt: skip
        return SamePersonDecision(
            threshold=pair_threshold, pair_threshold=pair_threshold, margin=margin, cohort_rank=cohort_rank,
            cohort_distance=None, gallery_faces=gallery_faces,
            rule=f"pair threshold {pair_threshold:g} alone ({why})",
        )  # fmt: skip
    cohort = float(beyond[cohort_rank - 1])
    threshold = round(min(pair_threshold, cohort - margin), 4)
    return SamePersonDecision(
        threshold=threshold, pair_threshold=pair_threshold, margin=margin, cohort_rank=cohort_rank,
        cohort_distance=round(cohort, 4), gallery_faces=gallery_faces,
        rule=(f"min(pair threshold {pair_threshold:g}, cohort distance {cohort:.4f} - margin {margin:g}): the "
              f"cohort is the query's {ordinal(cohort_rank)} nearest face farther than the pair threshold "
              f"among {gallery_faces} searched"),
    )  # fmt: skip


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
