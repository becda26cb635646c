"""The gallery-aware same-person decision of a 1:N face search (search/same_person.py): the pair threshold plus a
cohort margin, recorded in the hit's JSON and explained in its "why".

The search test uses a stand-in identity model whose descriptors are placed by hand (seeded), so the geometry
of a crowded and a stand-out query is exact; benchmarks/face_identity.py measures the rule on real faces."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.decode import decode_image
from indexer.ingest import ingest
from indexer.mtcnn import DetectedFace, FaceDetector
from indexer.settings import Settings
from search.explain import why
from search.query import Searcher, Thresholds, classify_scores, result_to_json
from search.same_person import same_person_decision
from tests.synthetic_images import textured_photo
from tests.test_faces import _save_nets

PAIR = 0.30


def test_a_stand_out_hit_keeps_the_pair_threshold() -> None:
    d = same_person_decision([0.2, 0.5, 0.52, 0.55, 0.6], pair_threshold=PAIR, margin=0.12, cohort_rank=3,
                             gallery_faces=5)  # fmt: skip
    assert d.cohort_distance == 0.55 and d.threshold == PAIR and d.passes(0.2)
    assert d.to_json()["gallery_faces"] == 5 and "cohort distance 0.5500" in d.rule


def test_a_crowded_query_gets_a_stricter_threshold() -> None:
    d = same_person_decision([0.26, 0.31, 0.32, 0.33, 0.34], pair_threshold=PAIR, margin=0.12, cohort_rank=3,
                             gallery_faces=5)  # fmt: skip
    assert d.cohort_distance == 0.33 and d.threshold == pytest.approx(0.21)
    assert not d.passes(0.26), "different people crowd this query: its best hit does not stand out"


def test_several_photos_of_one_person_never_count_as_the_cohort() -> None:
    photos = [0.15, 0.18, 0.2, 0.22, 0.25]  # five photos of the same person, all within the pair threshold
    d = same_person_decision(photos + [0.45, 0.47, 0.5], pair_threshold=PAIR, margin=0.12, cohort_rank=3,
                             gallery_faces=8)  # fmt: skip
    assert d.cohort_distance == 0.5 and all(d.passes(x) for x in photos)


def test_without_a_cohort_or_margin_the_pair_threshold_alone_applies() -> None:
    small = same_person_decision(
        [0.25, 0.4], pair_threshold=PAIR, margin=0.12, cohort_rank=3, gallery_faces=2
    )
    assert small.cohort_distance is None and small.threshold == PAIR and "no cohort" in small.rule
    off = same_person_decision([0.26, 0.31, 0.32, 0.33], pair_threshold=PAIR, margin=0.0, cohort_rank=3,
                               gallery_faces=4)  # fmt: skip
    assert off.threshold == PAIR and "margin test off" in off.rule


def test_classify_uses_the_searchs_limit_and_why_names_it() -> None:
    t = Thresholds()
    assert classify_scores({"face_distance": 0.26}, t)[0] == "same_person", "1:1: the pair threshold"
    assert classify_scores({"face_distance": 0.26}, t, same_person_limit=0.21) == (None, 0.0)
    decision = same_person_decision([0.2, 0.5, 0.52, 0.55], pair_threshold=PAIR, margin=0.12, cohort_rank=3,
                                    gallery_faces=808).to_json()  # fmt: skip
    hit = {"match_class": "same_person", "scores": {"face_distance": 0.2}, "identity": decision}
    (reason,) = why(hit, {"same_person_max_distance": PAIR})
    assert reason.startswith("same person: face identity distance 0.200 (≤ 0.3 in this search")
    assert "3rd-nearest different face at 0.550 of 808 faces" in reason


# --- through ingest and search, with a stand-in identity model --------------------------------------------


def _toward(q: np.ndarray, distance: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at Euclidean ``distance`` from the unit vector ``q``."""
    u = rng.standard_normal(q.shape)
    u -= (u @ q) * q
    u /= np.linalg.norm(u)
    theta = 2 * np.arcsin(distance / 2)
    return np.cos(theta) * q + np.sin(theta) * u


class PlacedFaces:
    """An identity "model" that gives every face of an image the descriptor placed for that image (looked up by
    the image's 8x8 thumbnail, so a JPEG of it gets the same one)."""

    model_id, model_key, dim, weights_sha256, identity = "test:placed", "test-placed", 16, "0" * 64, True

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.vectors: list[np.ndarray] = []

    @staticmethod
    def _key(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("L").resize((8, 8)), dtype=np.float32).ravel()

    def place(self, image: Image.Image, vector: np.ndarray) -> None:
        self.keys.append(self._key(image))
        self.vectors.append(vector / np.linalg.norm(vector))

    def embed_faces(self, image: Image.Image, faces: list[tuple[DetectedFace, Image.Image]]) -> np.ndarray:
        i = int(np.argmin([np.linalg.norm(k - self._key(image)) for k in self.keys]))
        return np.tile(self.vectors[i].astype(np.float32), (len(faces), 1))


def _decoded(image: Image.Image) -> object:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return decode_image(buf.getvalue())


def test_search_records_the_decision_and_drops_a_crowded_querys_false_hit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _save_nets(tmp_path / "mtcnn", confident=True)
    detector = FaceDetector.from_dir(tmp_path / "mtcnn")
    detector.thresholds = (0.0, 0.7, 0.7)
    model = PlacedFaces()
    stand_out, crowded = np.eye(16)[0], np.eye(16)[1]
    gallery = [(stand_out, 0.20), (crowded, 0.26)] + [(crowded, d) for d in (0.31, 0.32, 0.33, 0.34, 0.35)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, (centre, distance) in enumerate(gallery):
        image = textured_photo(i, (160, 120))
        image.save(corpus / f"face_{i}.jpg", quality=92)
        model.place(image, _toward(centre, distance, rng))
    queries = {"stand_out": textured_photo(50, (160, 120)), "crowded": textured_photo(51, (160, 120))}
    model.place(queries["stand_out"], stand_out)
    model.place(queries["crowded"], crowded)
    settings = Settings(data_dir=tmp_path / "data")
    ingest(corpus, collection="c", settings=settings, face_detector=detector, face_model=model)  # type: ignore[arg-type]
    searcher = Searcher.open(settings, face_detector=detector, face_model=model)  # type: ignore[arg-type]
    t = Thresholds().with_overrides(pdq_max_distance=-1, min_inliers=1_000_000, same_person_cohort_rank=3)
    try:

        def same_person(name: str, thresholds: Thresholds) -> list[dict]:  # type: ignore[type-arg]
            doc = result_to_json(searcher.search(_decoded(queries[name]), thresholds=thresholds))  # type: ignore[arg-type]
            return [h for h in doc["hits"] if h["match_class"] == "same_person"]

        (found,) = same_person("stand_out", t)
        decision = found["identity"]
        assert found["scores"]["face_distance"] == pytest.approx(0.20, abs=1e-3)
        assert decision["threshold"] == PAIR and decision["gallery_faces"] >= len(gallery)
        assert (
            decision["cohort_rank"] == 3 and decision["margin"] == 0.12 and decision["cohort_distance"] > 1.0
        )
        assert same_person("crowded", t) == [], (
            "0.26 lies only 0.07 below its cohort (0.33): not the same person"
        )
        (old,) = same_person("crowded", t.with_overrides(same_person_margin=0.0))
        assert old["identity"]["threshold"] == PAIR and old["identity"]["cohort_distance"] is None
        assert old["scores"]["face_distance"] == pytest.approx(0.26, abs=1e-3)
    finally:
        searcher.close()
