"""The query pipeline (search.query + search.verify) on generated images: exact, near-duplicate, mirror,
look-alike rejection, the CLIP tier with a tiny local model, the faces tier, per-query thresholds, the
feature cache, and a query path that reads SQL only by key."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from sqlalchemy import event

from benchmarks import transforms as T
from indexer.decode import DecodedImage, decode_image
from indexer.ingest import ingest
from indexer.settings import Settings
from search.query import (
    Searcher,
    Thresholds,
    candidate_thresholds,
    classify_scores,
    result_to_json,
)
from search.verify import FeatureCache, Verifier, mirror_sift
from tests.synthetic_images import textured_photo, write_textured_corpus

N_CORPUS = 8


def _decoded(image: Image.Image, fmt: str = "PNG", **save: int) -> DecodedImage:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **save)
    return decode_image(buf.getvalue())


def _lookalike(detail: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """One scene (smooth sky, horizon, a dark column) under faint, different fine detail per ``detail``: the
    low frequencies agree (pHash within 10 bits) while nothing local does."""
    w, h = size
    sky = np.array([[150.0, 180.0, 215.0]], dtype=np.float32)  # [1, 3]
    fade = np.linspace(1.0, 0.75, h, dtype=np.float32)[:, None, None]  # [h, 1, 1]
    base = np.broadcast_to(sky[None] * fade, (h, w, 3)).copy()  # [h, w, 3]
    rng = np.random.default_rng(1)
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    base[horizon:] *= 0.55
    col = int(rng.integers(w // 4, 3 * w // 4))
    base[:horizon, col : col + 60] *= 0.7
    scene = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
    over = scene.copy()
    draw = ImageDraw.Draw(over)
    r2 = np.random.default_rng(50_000 + detail)
    for _ in range(500):
        x0, y0, r = int(r2.integers(0, w)), int(r2.integers(0, h)), int(r2.integers(3, 14))
        colour = tuple(int(v) for v in r2.integers(0, 256, 3))
        shape = draw.ellipse if r2.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + r, y0 + int(r * r2.uniform(0.5, 2))], fill=colour)
    return Image.blend(scene, over, 0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[Path]]:
    """Textured photos plus one look-alike scene, ingested once without models (hash tiers + verification)."""
    root = tmp_path_factory.mktemp("search")
    paths = write_textured_corpus(root / "corpus", N_CORPUS)
    scene = root / "corpus" / "scene.png"
    _lookalike(1).save(scene)
    settings = Settings(data_dir=root / "data")
    ingest(root / "corpus", collection="web", settings=settings)
    return settings, [*paths, scene]


@pytest.fixture(scope="module")
def searcher(corpus: tuple[Settings, list[Path]]) -> Iterator[Searcher]:
    s = Searcher.open(corpus[0])
    yield s
    s.close()


def _top_copy(searcher: Searcher, decoded: DecodedImage, **overrides: object) -> dict | None:
    doc = result_to_json(searcher.search(decoded, thresholds=Thresholds().with_overrides(**overrides)))
    copies = [h for h in doc["hits"] if h["match_class"] in ("exact", "near_duplicate")]
    return copies[0] if copies else None


def _source_key(hit: dict) -> str:
    return str(hit["sightings"][0]["source_key"])


def test_exact_bytes_are_an_exact_match_with_their_sighting(
    corpus: tuple[Settings, list[Path]], searcher: Searcher
) -> None:
    path = corpus[1][2]
    doc = result_to_json(searcher.search(decode_image(path.read_bytes())))
    top = doc["hits"][0]
    assert top["match_class"] == "exact" and top["score"] == 1.0
    assert top["sha256"] == doc["query"]["sha256"]
    assert _source_key(top) == path.name and top["sightings"][0]["collection"] == "web"
    assert doc["tiers"][:3] == ["sha256", "pdq", "phash"] and "clip" in doc["skipped_tiers"]


@pytest.mark.parametrize(
    ("edit", "needs_verification"),
    [
        ("jpeg30", False),  # recompressed: PDQ alone is within its threshold
        ("crop30", True),  # 30 % of the area cut away at a random offset
        ("overlay", False),  # caption and emoji
        ("combo", True),  # crop 20 %, JPEG 50, overlay
        ("screenshot", True),  # inside an application window
    ],
)
def test_edited_copy_is_a_near_duplicate_of_its_source(
    corpus: tuple[Settings, list[Path]], searcher: Searcher, edit: str, needs_verification: bool
) -> None:
    path = corpus[1][4]
    edited = T.apply(edit, Image.open(path).convert("RGB"), seed=7)
    top = _top_copy(searcher, _decoded(edited))
    assert top is not None and top["match_class"] == "near_duplicate"
    assert _source_key(top) == path.name
    assert top["verification"] is not None and top["verification"]["accepted"]
    assert top["scores"]["inliers"] >= Thresholds().min_inliers
    if needs_verification:
        assert top["scores"].get("pdq_distance", 256) > Thresholds().pdq_max_distance


def test_mirrored_and_cropped_copy_is_verified_through_mirrored_features(
    corpus: tuple[Settings, list[Path]], searcher: Searcher
) -> None:
    path = corpus[1][5]
    edited = ImageOps.mirror(T.apply("crop30", Image.open(path).convert("RGB"), seed=3))
    top = _top_copy(searcher, _decoded(edited))
    assert top is not None and _source_key(top) == path.name
    assert top["verification"]["mirrored"] is True and top["verification"]["accepted"]


def test_unrelated_lookalike_is_not_reported_as_a_copy(
    corpus: tuple[Settings, list[Path]], searcher: Searcher
) -> None:
    doc = result_to_json(searcher.search(_decoded(_lookalike(2)), thresholds=candidate_thresholds()))
    scene = next(h for h in doc["hits"] if _source_key(h) == "scene.png")
    assert scene["scores"]["phash_distance"] <= 10, (
        "the look-alike must fool pHash for this test to mean much"
    )
    assert scene["scores"]["inliers"] < Thresholds().min_inliers
    assert _top_copy(searcher, _decoded(_lookalike(2))) is None


def test_thresholds_change_per_query(corpus: tuple[Settings, list[Path]], searcher: Searcher) -> None:
    path = corpus[1][1]
    query = _decoded(T.apply("crop30", Image.open(path).convert("RGB"), seed=1))
    assert _top_copy(searcher, query) is not None
    strict = searcher.search(query, thresholds=Thresholds().with_overrides(min_inliers=100_000))
    assert strict.thresholds["min_inliers"] == 100_000
    assert all(
        h.match_class != "near_duplicate" or h.scores.get("pdq_distance", 256) <= 31 for h in strict.hits
    )
    with pytest.raises(ValueError, match="unknown thresholds"):
        Thresholds().with_overrides(not_a_threshold=1)


def test_classes_never_interleave_in_the_fused_score() -> None:
    t = Thresholds()
    weakest_copy = classify_scores({"inliers": t.min_inliers}, t)
    far_pdq = classify_scores({"pdq_distance": t.pdq_max_distance}, t)
    best_similar = classify_scores({"clip_similarity": 0.9999}, t)
    assert weakest_copy[0] == far_pdq[0] == "near_duplicate" and best_similar[0] == "similar"
    assert min(weakest_copy[1], far_pdq[1]) > 0.5 > best_similar[1]
    assert classify_scores({"clip_similarity": t.clip_min_similarity - 0.01}, t) == (None, 0.0)
    assert classify_scores({}, t, exact=True) == ("exact", 1.0)


def test_candidate_features_are_extracted_once_and_cached_as_npz(
    corpus: tuple[Settings, list[Path]], searcher: Searcher
) -> None:
    settings, paths = corpus
    query = _decoded(T.apply("crop20", Image.open(paths[3]).convert("RGB"), seed=2))
    searcher.search(query)
    files = list((settings.cache_dir / "local-features").rglob("*.npz"))
    assert files, "verification must leave the candidates' features in the cache"
    with np.load(files[0], allow_pickle=False) as z:
        assert z["descriptors"].dtype == np.uint8 and z["points"].shape[1] == 2
    fresh = Searcher.open(settings)  # a new process: memory cache empty, files reused
    try:
        fresh.search(query)
        assert fresh.features.misses == 0 and fresh.features.hits > 0
    finally:
        fresh.close()


def test_feature_cache_gives_the_same_features_from_disk_as_from_extraction(tmp_path: Path) -> None:
    verifier = Verifier()
    image = textured_photo(3)
    cache = FeatureCache(tmp_path, verifier.config)
    first = cache.get("ab" * 32, lambda: (image, image.size), verifier)
    again = FeatureCache(tmp_path, verifier.config).get(
        "ab" * 32, lambda: pytest.fail("re-extracted"), verifier
    )
    assert np.array_equal(first.points, again.points)
    assert np.allclose(first.descriptors, again.descriptors, atol=1e-6)
    assert abs(float(np.linalg.norm(first.descriptors[0])) - 1.0) < 1e-3


def test_ransac_runs_only_for_candidates_that_could_reach_min_inliers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unrelated candidates have fewer ratio-test matches than ``min_inliers``: no RANSAC for them, and the
    copy among them is verified exactly as when it is alone."""
    import search.verify as V

    calls: list[int] = []
    real = V.cv2.estimateAffinePartial2D

    def counting(src: np.ndarray, dst: np.ndarray, **kw: Any) -> Any:
        calls.append(len(src))
        return real(src, dst, **kw)

    verifier = Verifier()
    source = textured_photo(5)
    copy = ImageOps.mirror(source.crop((40, 30, 600, 450)))
    from skimage import data as photos  # scikit-image's bundled photographs: unrelated to the textured one

    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
    others = [verifier.extract(Image.fromarray(getattr(photos, n)())) for n in names]
    alone = verifier.verify_many(copy, [verifier.extract(source)], min_inliers=25)[0]
    monkeypatch.setattr(V.cv2, "estimateAffinePartial2D", counting)
    results = verifier.verify_many(copy, [*others, verifier.extract(source)], min_inliers=25)
    assert results[-1].accepted and results[-1].mirrored
    assert results[-1].inliers == alone.inliers
    assert not any(r.accepted for r in results[:-1])
    assert calls and all(n >= 25 for n in calls)  # RANSAC only where the matches could make 25 inliers
    assert len(calls) <= 2  # the copy (mirrored and maybe plain); the unrelated ones skipped


def test_mirrored_descriptors_are_those_of_the_mirrored_image() -> None:
    """Relabelled descriptors agree with a fresh extraction on the flipped image at the same keypoints."""
    verifier = Verifier()
    image = textured_photo(4, (512, 384))  # already the working size: no resampling grid to shift
    own = verifier.extract(image)
    flipped = verifier.extract(ImageOps.mirror(image))
    mirrored = verifier.mirrored(own)
    d = np.linalg.norm(mirrored.points[:, None, :] - flipped.points[None, :, :], axis=2)  # [n, m]
    nearest = d.argmin(axis=1)
    same_place = d[np.arange(len(d)), nearest] < 0.5
    assert same_place.sum() > 50
    err_mirrored = np.linalg.norm(
        mirrored.descriptors[same_place] - flipped.descriptors[nearest[same_place]], axis=1
    )
    err_plain = np.linalg.norm(own.descriptors[same_place] - flipped.descriptors[nearest[same_place]], axis=1)
    assert np.median(err_mirrored) < 0.15 < np.median(err_plain)
    assert np.array_equal(mirror_sift(mirror_sift(own.descriptors)), own.descriptors)


def test_query_reads_sql_only_by_key(corpus: tuple[Settings, list[Path]], searcher: Searcher) -> None:
    """No per-query table scans: every SELECT is restricted by a key (id IN, sha256 =, image_id IN)."""
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(" ".join(statement.split()))

    engine = searcher.store.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        query = _decoded(T.apply("crop20", Image.open(corpus[1][6]).convert("RGB"), seed=5))
        searcher.search(query)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    selects = [s for s in statements if s.upper().startswith("SELECT")]
    assert selects
    for sql in selects:
        where = sql.upper().split(" WHERE ", 1)
        assert len(where) == 2, f"unrestricted SELECT on the query path: {sql}"
        assert any(k in where[1] for k in (".ID IN", ".SHA256 =", ".IMAGE_ID IN", ".ID =")), sql


def test_clip_tier_reports_visually_similar_images_with_a_tiny_local_model(tmp_path: Path) -> None:
    from indexer.embedders import load_embedder
    from tests.tiny_models import make_tiny_open_clip_dir

    embedder = load_embedder(make_tiny_open_clip_dir(tmp_path / "clip"))
    paths = write_textured_corpus(tmp_path / "corpus", 5, size=(320, 240))
    settings = Settings(data_dir=tmp_path / "data")
    ingest(tmp_path / "corpus", collection="c", settings=settings, embedder=embedder)
    searcher = Searcher.open(settings, clip_model=embedder)
    try:
        # Heavily blurred and shrunk: no local features survive, the pixels' overall look does.
        query = Image.open(paths[2]).convert("RGB").filter(ImageFilter.GaussianBlur(8)).resize((80, 60))
        doc = result_to_json(searcher.search(_decoded(query), thresholds=candidate_thresholds()))
        assert "clip" in doc["tiers"] and "clip" not in doc["skipped_tiers"]
        assert doc["models"]["clip"]["model_id"] == embedder.model_id
        sims = {_source_key(h): h["scores"]["clip_similarity"] for h in doc["hits"]}
        assert set(sims) == {p.name for p in paths}
        best = max(sims, key=lambda k: sims[k])
        assert best == paths[2].name
        # PDQ still recognises a blurred copy; with the copy tiers turned off per query, CLIP alone decides.
        only_clip = Thresholds().with_overrides(
            clip_min_similarity=sims[best] - 1e-4, pdq_max_distance=-1, min_inliers=1_000_000
        )
        strict = result_to_json(searcher.search(_decoded(query), thresholds=only_clip))
        assert [(_source_key(h), h["match_class"]) for h in strict["hits"]] == [(paths[2].name, "similar")]
        assert 0.0 < strict["hits"][0]["score"] < 0.5
    finally:
        searcher.close()


def test_faces_tier_matches_the_query_faces_against_the_face_index(tmp_path: Path) -> None:
    """A tiny seeded MTCNN that calls fixed windows faces (tests/test_faces.py) and the tiny CLIP: the query's
    faces are detected, aligned, embedded and searched, and the source image carries a face similarity."""
    from indexer.embedders import load_embedder
    from indexer.mtcnn import FaceDetector
    from tests.test_faces import _save_nets
    from tests.tiny_models import make_tiny_open_clip_dir

    _save_nets(tmp_path / "mtcnn", confident=True)
    detector = FaceDetector.from_dir(tmp_path / "mtcnn")
    detector.thresholds = (0.0, 0.7, 0.7)
    embedder = load_embedder(make_tiny_open_clip_dir(tmp_path / "clip"))
    paths = write_textured_corpus(tmp_path / "corpus", 3, size=(160, 120))
    settings = Settings(data_dir=tmp_path / "data")
    ingest(tmp_path / "corpus", collection="c", settings=settings, embedder=embedder, face_detector=detector)
    searcher = Searcher.open(settings, clip_model=embedder, face_detector=detector)
    try:
        query = _decoded(Image.open(paths[1]).convert("RGB"), "JPEG", quality=95)
        doc = result_to_json(searcher.search(query, thresholds=candidate_thresholds()))
        assert "faces" in doc["tiers"] and "faces" not in doc["skipped_tiers"]
        assert doc["faces"] and all(len(f["box"]) == 4 for f in doc["faces"])
        best = max((m for f in doc["faces"] for m in f["matches"]), key=lambda m: m["similarity"])
        source = next(h for h in doc["hits"] if _source_key(h) == paths[1].name)
        assert best["image_id"] == source["image_id"]
        assert source["scores"]["face_similarity"] == pytest.approx(best["similarity"], abs=1e-3)
    finally:
        searcher.close()
