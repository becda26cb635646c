"""The detector tier (search.detector): training from labelled collections, calibration, storage without pickle,
abstention, the CLI and the report section. Tiny seeded CLIP, images made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from api.cli import app
from indexer.errors import ModelUnavailableError, SleuthError
from indexer.settings import Settings
from search.detector_features import ViewConfig, base_image, face_view, image_view, scaled_landmarks, spectrum
from tests.synthetic_images import synthetic_photo

runner = CliRunner()
GENERATED = ("gan_a", "gan_b")
REAL = ("real_a", "real_b")


def generated_like(seed: int) -> Image.Image:
    """A photo with the periodic trace of an up-sampling generator: every other column and row repeated (a
    nearest-neighbour 2x up-sampling of a half-size image), plus a 4-pixel grid."""
    small = synthetic_photo(seed, (96, 96))
    up = np.asarray(small.resize((192, 192), Image.Resampling.NEAREST), dtype=np.float32)  # [192, 192, 3]
    grid = 18.0 * np.cos(np.arange(192) * np.pi / 2)[None, :, None]  # [1, 192, 1]
    return Image.fromarray(np.clip(up + grid, 0, 255).astype(np.uint8))


def real_like(seed: int) -> Image.Image:
    return synthetic_photo(seed, (192, 192))


def _write(folder: Path, make, seeds: range, fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        make(s).save(folder / f"{s:04d}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt, quality=92)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    """A store with two generated and two real collections (10 images each), ingested with a tiny CLIP."""
    from indexer.embedders import load_embedder
    from indexer.ingest import ingest
    from tests.tiny_models import make_tiny_open_clip_dir

    root = tmp_path_factory.mktemp("detector")
    model_id = make_tiny_open_clip_dir(root / "clip", seed=3)
    settings = Settings(data_dir=root / "data", clip_model=model_id)
    embedder = load_embedder(model_id)
    for n, name in enumerate(GENERATED):  # generated as PNG, real as JPEG: a format the views must undo
        _write(root / name, generated_like, range(100 * n, 100 * n + 10), "PNG")
        ingest(root / name, collection=name, settings=settings, label="generated", embedder=embedder)
    for n, name in enumerate(REAL):
        _write(root / name, real_like, range(500 + 100 * n, 510 + 100 * n), "JPEG")
        ingest(root / name, collection=name, settings=settings, label="real", embedder=embedder)
    return settings, model_id


def _store_and_clip(settings: Settings):  # noqa: ANN202
    from indexer.embedders import load_embedder
    from indexer.store.db import open_store

    assert settings.clip_model is not None
    return open_store(settings), load_embedder(settings.clip_model)


def test_views_bring_both_classes_to_one_size_and_one_encoding() -> None:
    config = ViewConfig()
    big_png = base_image(synthetic_photo(1, (1024, 1024)))
    small_jpeg = base_image(synthetic_photo(2, (200, 200)))
    for base in (big_png, small_jpeg):
        view = image_view(base, config)
        assert view.size == (config.image_px, config.image_px) and view.mode == "RGB"
    landmarks = [[70, 80], [130, 80], [100, 110], [75, 140], [125, 140]]
    face = face_view(small_jpeg, landmarks, config)
    assert face.size == (config.face_px, config.face_px)
    scaled = scaled_landmarks(landmarks, 0.5)
    assert np.allclose(scaled[1] - scaled[0], (np.asarray(landmarks[1]) - landmarks[0]) * 0.5)
    clahe = face_view(small_jpeg, landmarks, ViewConfig(clahe=True))
    assert np.abs(np.asarray(clahe, float) - np.asarray(face, float)).mean() > 1.0
    assert ViewConfig().key("image", "clip", "m") == ViewConfig(clahe=True).key("image", "clip", "m")
    assert ViewConfig().key("face", "clip", "m") != ViewConfig(clahe=True).key("face", "clip", "m")


def test_spectrum_measures_high_frequency_content() -> None:
    from PIL import ImageFilter

    sharp = np.stack([spectrum(generated_like(s)) for s in range(4)])
    soft = np.stack([spectrum(generated_like(s).filter(ImageFilter.GaussianBlur(2))) for s in range(4)])
    assert sharp.shape == soft.shape == (4, 48)
    assert (sharp[:, -16:].mean(axis=1) > soft[:, -16:].mean(axis=1)).all()  # blur removes the fine detail


def test_detector_trained_on_collections_separates_unseen_images_and_records_its_scope(
    corpus: tuple[Settings, str],
) -> None:
    from sklearn.metrics import roc_auc_score

    from search.detector import TrainOptions, stored_features, train_detector, training_set

    settings, _ = corpus
    store, clip = _store_and_clip(settings)
    ts = training_set(store, GENERATED, REAL)
    train = [i for n, i in enumerate(ts.ids) if n % 2 == 0]
    test = [i for i in ts.ids if i not in set(train)]
    detector = train_detector(settings, store, clip, "t", generated=GENERATED, real=REAL, save=False,
                              image_ids=train, options=TrainOptions(method="auto"))  # fmt: skip
    doc = detector.doc
    assert doc["training"]["generated"] == list(GENERATED) and doc["training"]["n_generated"] == 10
    assert doc["training"]["collections"] == {name: 5 for name in (*GENERATED, *REAL)}  # the images it used
    assert doc["embedder"]["model_key"] == clip.model_key and doc["embedder"]["weights_sha256"]
    view = doc["views"]["image"]  # no face detector: the whole-image view only
    assert "face" not in doc["views"]
    assert set(view["unseen_generator_auc"]) == set(GENERATED)
    assert view["n_generated"] == 10 and view["n_degraded_copies"] == 40  # 20 images, 2 degraded copies each
    assert doc["options"]["augmentation"] == {"copies": 2, "jpeg": [40, 95], "side": [96, 256], "seed": 0}
    # calibrated on the images and their copies alike (a query may be either)
    assert (
        view["calibration"][view["method"]]["n_generated"] == 30
        and view["calibration"]["probe"]["n_real"] == 30
    )
    assert set(view["degraded_copies"]["unseen_generator_auc"]) == set(GENERATED)
    assert "gan_a held out" in view["folds"]
    feats = stored_features(settings, store, clip, detector.views, test)["image"]
    results = [detector.score({"image": (feats.clip[n], feats.spec[n])}) for n in range(len(feats.ids))]
    y = [ts.labels[i] for i in feats.ids]
    assert roc_auc_score(y, [r["views"]["image"]["score"] for r in results]) >= 0.9
    assert all(r["scored_on"] == "image" for r in results)
    assert "trained on gan_a, gan_b (generated, 10 images)" in detector.scope()
    store.dispose()


def test_training_refuses_unknown_or_overlapping_collections(corpus: tuple[Settings, str]) -> None:
    from search.detector import train_detector

    settings, _ = corpus
    store, clip = _store_and_clip(settings)
    with pytest.raises(SleuthError, match="no such collection: nope"):
        train_detector(settings, store, clip, "x", generated=["nope"], real=list(REAL), save=False)
    with pytest.raises(SleuthError, match="both generated and real"):
        train_detector(settings, store, clip, "x", generated=["gan_a"], real=["gan_a"], save=False)
    store.dispose()


def test_stored_detector_round_trips_as_json_and_safetensors_without_pickle(
    corpus: tuple[Settings, str],
) -> None:
    from safetensors.numpy import load_file

    from search.detector import detect_image, load_detector, train_detector

    settings, _ = corpus
    store, clip = _store_and_clip(settings)
    trained = train_detector(settings, store, clip, "round", generated=GENERATED, real=REAL, replace=True)
    folder = settings.data_dir / "detectors"
    assert sorted(p.name for p in folder.iterdir()) == ["round.json", "round.safetensors"]
    doc = json.loads((folder / "round.json").read_text())
    assert doc["format"] == "sleuth-detector/1" and doc["weights"]["file"] == "round.safetensors"
    tensors = load_file(str(folder / "round.safetensors"))  # a plain tensor file: no code, no pickle
    assert tensors["image.knn.bank"].shape == (3 * 40, clip.dim)  # 40 images and 2 degraded copies of each
    assert b"pickle" not in (folder / "round.safetensors").read_bytes()[:200]
    loaded = load_detector(store, "round")
    query = generated_like(7)
    fresh = detect_image(trained, query, clip, None)
    again = detect_image(loaded, query, clip, None)
    assert fresh["views"] == again["views"] and fresh["scored_on"] == "image"
    assert fresh["features"] == "computed"
    # an indexed image is scored from its cached views, as it was in training
    store.dispose()


def test_changed_detector_file_is_refused(corpus: tuple[Settings, str]) -> None:
    from search import detector as det

    settings, _ = corpus
    store, clip = _store_and_clip(settings)
    det.train_detector(settings, store, clip, "tamper", generated=GENERATED, real=REAL, replace=True)
    path = settings.data_dir / "detectors" / "tamper.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    det._LOADED.clear()
    with pytest.raises(ModelUnavailableError, match="changed after training"):
        det.load_detector(store, "tamper")
    det.remove_detector(settings, store, "tamper")
    assert not path.exists()
    store.dispose()


def test_query_far_from_the_training_data_gets_no_probability(corpus: tuple[Settings, str]) -> None:
    from search.detector import train_detector, verdict_words

    settings, _ = corpus
    store, clip = _store_and_clip(settings)
    detector = train_detector(settings, store, clip, "ood", generated=GENERATED, real=REAL, save=False)
    from search.detector import detect_image

    inside = detect_image(detector, generated_like(3), clip, None)
    assert inside["abstained"] is False and inside["p_generated"] is not None
    detector.doc["views"]["image"]["ood_similarity"] = 1.01  # nothing is that close: everything is outside
    outside = detect_image(detector, generated_like(3), clip, None)
    assert outside["abstained"] is True and outside["p_generated"] is None
    assert "out of the distribution it was trained on" in outside["reason"]
    assert "gives no p(generated)" in (verdict_words(outside) or "")
    store.dispose()


def test_cli_trains_lists_shows_detects_and_removes(corpus: tuple[Settings, str], tmp_path: Path) -> None:
    settings, model_id = corpus
    data = ["--data-dir", str(settings.data_dir)]
    clip = ["--clip-model", model_id]
    result = runner.invoke(app, ["detectors", "train", "cli", "--generated", "gan_a,gan_b", "--real", "real_a",
                                 "--real", "real_b", "--method", "probe", "--augment-copies", "1", "--replace", *clip,
                                 *data, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["views"]["image"]["method"] == "probe" and doc["training"]["real"] == ["real_a", "real_b"]
    assert doc["options"]["augmentation"]["copies"] == 1 and doc["views"]["image"]["n_degraded_copies"] == 40
    listed = json.loads(runner.invoke(app, ["detectors", "list", "--json", *data]).stdout)
    assert "cli" in [d["name"] for d in listed["detectors"]]
    shown = runner.invoke(app, ["detectors", "show", "cli", *data])
    assert shown.exit_code == 0 and "calibration platt" in shown.stdout and "degraded 1x" in shown.stdout
    query = tmp_path / "q.png"
    generated_like(42).save(query)
    out = runner.invoke(app, ["detect", str(query), "--detector", "cli", *clip, *data, "--json"])
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["path"] == str(query) and line["scored_on"] == "image" and 0.0 <= line["p_generated"] <= 1.0
    assert set(line["views"]["image"]["methods"]) == {"probe", "knn", "spectrum", "ensemble"}
    table = runner.invoke(app, ["detect", str(query), "--detector", "cli", *clip, *data])
    assert "p(generated)" in table.stdout and "whole image" in table.stdout
    assert runner.invoke(app, ["detectors", "remove", "cli", *data]).exit_code == 0


def test_cli_bad_input_is_a_clear_error(corpus: tuple[Settings, str], tmp_path: Path) -> None:
    settings, model_id = corpus
    data = ["--data-dir", str(settings.data_dir)]
    bad = runner.invoke(app, ["detectors", "train", "x", "--generated", "nope", "--real", "real_a",
                              "--clip-model", model_id, *data])  # fmt: skip
    assert bad.exit_code == 2 and "no such collection" in bad.output
    missing = runner.invoke(app, ["detectors", "show", "nope", *data])
    assert missing.exit_code == 2 and "no detector named 'nope'" in missing.output
    empty = runner.invoke(app, ["detect", str(tmp_path), "--data-dir", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "no detector is trained" in empty.output


def test_report_has_a_detector_section_and_a_reason_of_its_own() -> None:
    from search.report import build_report, render_html

    detector = {
        "detector": "faces-v1", "p_generated": 0.97, "scored_on": "face", "abstained": False, "reason": None,
        "scope": "trained on tpdne (generated, 100 images) against utkface (real, 100 images); measured AUC on "
                 "unseen generators 0.93-0.99 (face view, 3 generator(s) held out in turn)",
        "views": {"face": {"score": 0.97, "method": "probe", "methods": {"probe": 0.97, "knn": 0.9},
                           "nearest_similarity": 0.8, "ood_similarity": 0.6, "in_distribution": True}},
    }  # fmt: skip
    result = {"query": {"sha256": "ab" * 32, "format": "JPEG", "width": 10, "height": 10, "num_bytes": 5},
              "hits": [], "detector": detector}  # fmt: skip
    report = build_report(result, report_id="r1")
    assert report.detector is not None and report.detector.p_generated == 0.97
    assert report.verdict.kind == "no_match"  # a statistical call never becomes a copy or projection verdict
    assert report.verdict.summary.startswith("No copy found in the index. A detector (faces-v1")
    reason = report.verdict.reasons[-1]
    assert "p(generated) 0.97 on the aligned face crop" in reason and "unseen generators 0.93-0.99" in reason
    assert "not a match to a known source" in reason
    html = render_html(report, settings=Settings(data_dir=Path("/nonexistent")))
    assert 'id="detector-result"' in html and "scored on the aligned face crop" in html
    copy = dict(result, hits=[{"image_id": 1, "match_class": "exact", "label": "generated", "sightings": []}])
    with_copy = build_report(copy, report_id="r2")
    assert with_copy.verdict.kind == "copy_of_generated" and with_copy.verdict.reasons[-1] == reason


def test_search_adds_the_detector_tier_and_says_when_it_is_off(
    corpus: tuple[Settings, str], tmp_path: Path
) -> None:
    from search import detector as det

    settings, model_id = corpus
    store, clip = _store_and_clip(settings)
    det.train_detector(settings, store, clip, "for-search", generated=GENERATED, real=REAL, replace=True)
    store.dispose()
    query = tmp_path / "q.png"
    generated_like(77).save(query)
    args = ["search", str(query), "--clip-model", model_id, "--data-dir", str(settings.data_dir), "--json"]
    doc = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    assert "detector" in doc["tiers"] and doc["detector"]["detector"] == "for-search"
    assert any(
        "A detector (for-search" in r or "The detector for-search" in r for r in doc["verdict"]["reasons"]
    )
    off = json.loads(runner.invoke(app, [*args, "--detector", "none"]).stdout.strip().splitlines()[-1])
    assert "detector" not in off["tiers"] and "detector" not in off


def test_degraded_copies_are_seeded_per_image_within_their_ranges() -> None:
    from search.detector_features import Augmentation, degrade

    aug = Augmentation(copies=3, jpeg=(40, 95), side=(96, 256), seed=1)
    draws = [aug.params(f"{n:064x}", c) for n in range(50) for c in (1, 2, 3)]
    assert all(96 <= s <= 256 and 40 <= q <= 95 for s, q in draws)
    assert len(set(draws)) > 40  # drawn, not one setting for all
    assert aug.params("ab" * 32, 2) == Augmentation(copies=2, seed=1).params(
        "ab" * 32, 2
    )  # whatever the subset
    assert aug.params("ab" * 32, 2) != Augmentation(seed=2).params("ab" * 32, 2)
    assert aug.variant(1) != aug.variant(2) and aug.variant(1) == Augmentation(copies=1, seed=1).variant(1)
    small = degrade(synthetic_photo(3, (200, 120)), 0.5, 50)
    assert small.size == (100, 60) and small.mode == "RGB"
    # sizes in pixels, whatever the class's own size (never upscaled): no "small means real" to learn
    assert aug.copy_of(synthetic_photo(4, (512, 512)), 150, 60).size == (150, 150)
    assert aug.copy_of(synthetic_photo(5, (200, 160)), 150, 60).size == (150, 120)
    assert aug.copy_of(synthetic_photo(6, (200, 200)), 230, 60).size == (200, 200)
    with pytest.raises(ValueError):
        Augmentation(jpeg=(95, 40))
    assert Augmentation.from_json(aug.to_json()) == aug


def test_training_features_add_degraded_copies_of_each_image_once(corpus: tuple[Settings, str]) -> None:
    from search.detector import TrainOptions, stored_features, train_detector, training_set
    from search.detector_features import Augmentation

    settings, _ = corpus
    store, clip = _store_and_clip(settings)
    ids = training_set(store, GENERATED, REAL).ids[:6]
    aug = Augmentation(copies=2)
    feats = stored_features(settings, store, clip, ViewConfig(), ids, augment=aug)["image"]
    assert feats.ids == [i for i in ids for _ in range(3)] and feats.copy.tolist() == [0, 1, 2] * 6
    assert not np.allclose(feats.spec[0], feats.spec[1]) and not np.allclose(feats.spec[1], feats.spec[2])
    plain = stored_features(settings, store, clip, ViewConfig(), ids)["image"]
    assert plain.copy.tolist() == [0] * 6 and np.allclose(plain.clip, feats.clip[feats.copy == 0])
    calls: list[int] = []
    stored_features(
        settings, store, clip, ViewConfig(), ids, augment=aug, progress=lambda a, b: calls.append(a)
    )
    assert calls == []  # cached: nothing computed again
    off = train_detector(settings, store, clip, "plain", generated=GENERATED, real=REAL, save=False,
                         options=TrainOptions(augment=Augmentation(copies=0)))  # fmt: skip
    assert (
        off.doc["views"]["image"]["n_degraded_copies"] == 0
        and "degraded_copies" not in off.doc["views"]["image"]
    )
    assert "degraded" not in off.scope()
    on = train_detector(settings, store, clip, "aug", generated=GENERATED, real=REAL, save=False)
    assert "each image also degraded 2x (JPEG 40-95, 96-256 px)" in on.scope()
    store.dispose()


def test_an_image_and_its_copies_stay_on_one_side_of_every_fold() -> None:
    from search.detector import _folds

    images = np.repeat(np.arange(12), 3)  # 12 images, 3 rows each
    groups = np.array(["gen_a"] * 9 + ["gen_b"] * 9 + ["real"] * 18)
    y = np.array([1] * 18 + [0] * 18)
    folds = _folds(groups, y, 0, images)
    assert {what for _, _, what in folds} == {"gen_a held out", "gen_b held out", "real held out by fifths"}
    for train, test, _ in folds:
        assert not set(images[train].tolist()) & set(images[test].tolist())


def test_the_out_of_distribution_bound_leaves_out_an_images_own_copies() -> None:
    from search.detector import TrainOptions, ViewModel, _loo_similarity

    rng = np.random.default_rng(0)
    originals = rng.normal(size=(8, 16))
    clip = np.repeat(originals, 2, axis=0) + 0.01 * rng.normal(
        size=(16, 16)
    )  # each image twice, nearly alike
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    y = np.array([1, 1, 0, 0] * 4)
    model = ViewModel.fit(clip.astype(np.float32), rng.normal(size=(16, 4)), y, TrainOptions(k=1))
    sims = _loo_similarity(model, clip.astype(np.float32), np.repeat(np.arange(8), 2))
    assert sims.max() < 0.9  # its own copy (cosine ~1) is not its nearest training image
