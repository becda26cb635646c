"""Generator registry, calibration, latent match and projection evidence, with a tiny seeded DCGAN / StyleGAN2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64  # noqa: E402
import io  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from indexer.errors import ModelUnavailableError, SleuthError  # noqa: E402
from indexer.settings import Settings  # noqa: E402
from indexer.store.db import Store, open_store  # noqa: E402
from projection.calibration import (  # noqa: E402
    Calibration,
    calibrate_generator,
    evidence_metric,
    perturb,
    roc_auc,
    sample_sizes_words,
)
from projection.checkpoints import save_safetensors, sha256_file  # noqa: E402
from projection.dcgan import DCGANGenerator  # noqa: E402
from projection.evidence import project_images  # noqa: E402
from projection.face_prep import prepare_face  # noqa: E402
from projection.images import to_image  # noqa: E402
from projection.latent_match import LatentMatcher, store_latents, sync_latent_index  # noqa: E402
from projection.registry import (  # noqa: E402
    GeneratorExistsError,
    GeneratorNotFoundError,
    get_generator,
    list_generators,
    load_generator,
    register_generator,
    set_calibration,
)
from projection.stylegan2 import StyleGAN2Generator  # noqa: E402
from tests.tiny_generators import (  # noqa: E402, F401
    lpips_file_fixture,
    one_torch_thread_fixture,
    tiny_dcgan_checkpoint,
)


@pytest.fixture
def proj_settings(tmp_path: Path, lpips_file: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", lpips_weights=lpips_file)


def _generated(gen: DCGANGenerator, seeds: list[int]) -> list[Image.Image]:
    with torch.no_grad():
        return [to_image(gen.synthesize(gen.sample_z(1, seed=s), "z")[0]) for s in seeds]


# --- registry ------------------------------------------------------------------------------------------------
def test_register_converts_once_records_both_sha256s_and_loads_by_name(proj_settings: Settings) -> None:
    ckpt = tiny_dcgan_checkpoint(proj_settings.data_dir.parent / "netG.pt")
    info = register_generator(proj_settings, "tiny-dcgan", ckpt, family="dcgan")
    weights = proj_settings.data_dir / "generators" / "tiny-dcgan.safetensors"
    assert Path(info.weights_path) == weights.resolve()
    assert info.weights_sha256 == sha256_file(weights) and info.source_sha256 == sha256_file(ckpt)
    assert (info.family, info.resolution, info.latent_space) == ("dcgan", 16, "z")
    assert [g.name for g in list_generators(proj_settings)] == ["tiny-dcgan"]
    # the same file again is a no-op; another file under the same name is refused
    assert (
        register_generator(proj_settings, "tiny-dcgan", ckpt, family="dcgan").weights_sha256
        == info.weights_sha256
    )
    other = tiny_dcgan_checkpoint(proj_settings.data_dir.parent / "other.pt", seed=9)
    with pytest.raises(GeneratorExistsError, match="already registered"):
        register_generator(proj_settings, "tiny-dcgan", other, family="dcgan")
    loaded, _ = load_generator(proj_settings, "tiny-dcgan")
    original = DCGANGenerator.from_preset("tiny", seed=1)
    z = original.sample_z(2, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.synthesize(z, "z"), original.synthesize(z))


def test_registry_refuses_unknown_names_bad_names_wrong_families_and_changed_files(
    proj_settings: Settings,
) -> None:
    ckpt = tiny_dcgan_checkpoint(proj_settings.data_dir.parent / "netG.pt")
    with pytest.raises(GeneratorNotFoundError, match="no generator named 'nope'"):
        get_generator(proj_settings, "nope")
    with pytest.raises(SleuthError, match="invalid generator name"):
        register_generator(proj_settings, "../evil", ckpt, family="dcgan")
    with pytest.raises(ModelUnavailableError, match="not 'stylegan2'"):
        register_generator(proj_settings, "g", ckpt, family="stylegan2")
    info = register_generator(proj_settings, "g2", ckpt, family="dcgan")
    Path(info.weights_path).write_bytes(Path(info.weights_path).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelUnavailableError, match="changed after registration"):
        load_generator(proj_settings, "g2", device="cpu")


def test_stylegan2_registers_with_w_as_its_projection_space(proj_settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "sg2.safetensors"
    save_safetensors(StyleGAN2Generator.from_preset("tiny", seed=3), src)
    info = register_generator(proj_settings, "tiny-sg2", src, family="stylegan2")
    assert (info.family, info.resolution, info.latent_space) == ("stylegan2", 16, "w")
    assert info.config["architecture"]["w_dim"] == 32


# --- calibration ---------------------------------------------------------------------------------------------
def test_roc_auc_counts_ties_half() -> None:
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([2, 0], [1]) == 0.5


def test_calibration_maps_lpips_to_a_monotone_smoothed_probability() -> None:
    rng = np.random.default_rng(0)
    gen = list(rng.normal(0.05, 0.01, 60))
    real = list(rng.normal(0.30, 0.05, 40))
    cal = Calibration.fit(gen, real)
    assert (cal.n_generated, cal.n_real) == (60, 40)
    assert cal.probability(0.04) > 0.95 and cal.probability(0.4) < 0.05
    grid = [cal.probability(x) for x in np.linspace(0, 0.6, 61)]
    assert all(a >= b - 1e-12 for a, b in zip(grid, grid[1:], strict=False))
    assert min(grid) > 0.0 and max(grid) < 1.0  # finite samples never give certainty
    again = Calibration.from_json(cal.to_json())
    assert again.probability(0.17) == cal.probability(0.17)
    assert cal.to_json()["auc"] == 1.0
    mixed = Calibration.fit(list(rng.uniform(0, 1, 200)), list(rng.uniform(0, 1, 200)))
    assert 0.3 < mixed.probability(0.5) < 0.7  # indistinguishable classes: about even


def test_other_generators_samples_join_the_negative_class_of_a_calibration() -> None:
    rng = np.random.default_rng(4)
    gen = list(rng.normal(0.05, 0.01, 40))
    real = list(rng.normal(0.30, 0.03, 40))
    other = list(rng.normal(0.09, 0.01, 40))  # another generator's faces: smooth, they reproject well
    alone = Calibration.fit(gen, real)
    against = Calibration.fit(gen, real, other_lpips=other)
    assert alone.probability(0.09) > 0.8 and against.probability(0.09) < 0.2
    assert against.probability(0.04) > 0.9 and against.sizes() == {
        "n_generated": 40,
        "n_real": 40,
        "n_other": 40,
    }
    assert alone.sizes() == {"n_generated": 40, "n_real": 40}
    again = Calibration.from_json(against.to_json())
    assert again.other_lpips == against.other_lpips and again.probability(0.09) == against.probability(0.09)
    assert sample_sizes_words(against.sizes()) == "40 generated / 40 real faces / 40 of other generators"


def test_small_faces_are_judged_by_pixel_mse_and_larger_ones_by_both_lpips_and_mse() -> None:
    rng = np.random.default_rng(5)
    n = 40
    sizes = [32] * n + [128] * n
    # small faces: LPIPS does not separate the classes, MSE does; large faces: LPIPS does
    gen_lp = list(rng.normal(0.05, 0.01, n)) + list(rng.normal(0.03, 0.01, n))
    real_lp = list(rng.normal(0.05, 0.01, n)) + list(rng.normal(0.20, 0.03, n))
    gen_mse = list(rng.normal(0.01, 0.002, n)) + list(rng.normal(0.01, 0.002, n))
    real_mse = list(rng.normal(0.04, 0.005, n)) + list(rng.normal(0.04, 0.005, n))
    cal = Calibration.fit(
        gen_lp, real_lp, generated_sizes=sizes, real_sizes=sizes, mse=(gen_mse, real_mse, [])
    )
    assert cal.pixel is not None and cal.pixel.n_generated == n and cal.pixel.n_real == n
    assert evidence_metric(32) == "mse" and evidence_metric(64) == "lpips"
    p_small, metric = cal.probability_for(0.05, 0.01, 32)
    assert metric == "mse" and p_small > 0.9
    assert cal.probability_for(0.05, 0.04, 32)[0] < 0.1
    # larger faces are judged by both maps: a look-alike close by one measure and far by the other is not it
    assert cal.pixel_large is not None and cal.pixel_large.n_generated == n
    p_large, metric = cal.probability_for(0.03, 0.01, 128)
    assert metric == "lpips+mse" and p_large > 0.9
    assert cal.probability_for(0.03, 0.04, 128)[0] < 0.1 and cal.probability_for(0.2, 0.01, 128)[0] < 0.1
    again = Calibration.from_json(cal.to_json())
    assert again.pixel is not None and again.probability_for(0.05, 0.01, 32) == (p_small, "mse")
    assert again.probability_for(0.03, 0.01, 128) == (p_large, "lpips+mse")
    # a calibration without small samples (or made before the pixel map) judges every face by LPIPS
    old = Calibration.fit(gen_lp[n:], real_lp[n:])
    assert old.pixel is None and old.pixel_large is None and old.probability_for(0.03, 0.04, 32)[1] == "lpips"


def test_a_calibration_gives_no_probability_below_the_face_sizes_it_measured() -> None:
    cal = Calibration.fit([0.01, 0.02], [0.3, 0.4], generated_sizes=[256, 512], real_sizes=[100, 300])
    assert cal.min_size == 256  # both classes must have been seen at a size
    assert cal.covers(200) and not cal.covers(150)  # down to 3/4 of it
    assert Calibration.from_json(cal.to_json()).min_size == 256
    assert Calibration.fit([0.1], [0.2]).covers(8)  # a calibration without sizes states no range


def test_web_perturbation_rescales_recrops_and_reencodes_within_its_ranges() -> None:
    import random

    from indexer.decode import decode_image
    from projection.calibration import WebPerturbation, web_perturbation

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    rng = random.Random(0)
    spec = WebPerturbation(max_side=128, min_side=20)
    decoded = [decode_image(web_perturbation(img, rng, spec)) for _ in range(40)]
    sides = [max(d.width, d.height) for d in decoded]
    assert min(sides) >= 20 and max(sides) <= 128 and min(sides) < 40 and max(sides) > 90
    assert all(d.format == "JPEG" and 40 <= (d.jpeg_quality or 0) <= 95 for d in decoded)
    assert any(abs(d.width - d.height) >= 1 for d in decoded)  # the crop jitter cuts edges unequally
    # relative to a reference side, a 200 px photo and a 64 px sample come out at one distribution of sizes
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    for source in (img, photo):
        rng = random.Random(1)
        sides = [
            max(decode_image(web_perturbation(source, rng, reference_side=64)).image.size) for _ in range(40)
        ]
        assert 15 <= min(sides) < 32 and 128 < max(sides) <= 260


def test_perturbation_keeps_the_size_and_changes_the_pixels_a_little() -> None:
    img = to_image(torch.rand(3, 32, 32) * 2 - 1)
    out = perturb(img)
    assert out.size == (32, 32)
    diff = np.abs(np.asarray(out, dtype=float) - np.asarray(img, dtype=float)).mean()
    assert 1.0 < diff < 100.0


def test_calibrate_generator_stores_both_distributions_on_the_registry(
    proj_settings: Settings, tmp_path: Path
) -> None:
    register_generator(proj_settings, "tiny", tiny_dcgan_checkpoint(tmp_path / "g.pt"), family="dcgan")
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):  # smooth colour fields: faces this generator cannot make
        small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
        small.resize((40, 40), Image.Resampling.BILINEAR).save(real_dir / f"r{i}.png")
    cal = calibrate_generator(proj_settings, "tiny", real_dir, k=3, steps=40)
    assert (cal.n_generated, cal.n_real) == (3, 3)
    stored = get_generator(proj_settings, "tiny").calibration
    assert stored is not None and stored["n_generated"] == 3 and stored["n_real"] == 3
    assert set(stored["settings"]["preparation"]) <= {"centre-crop", "whole-image"}  # no detector: by shape
    assert stored["settings"]["perturbation"]["relative_to_side"] == 16  # both classes scaled around 16 px
    assert stored["settings"]["perturbation"]["jpeg_quality"] == [40, 95]
    assert max(cal.generated_lpips) < min(cal.real_lpips)
    # another generator's samples join the negative class, named in the settings
    register_generator(
        proj_settings, "other", tiny_dcgan_checkpoint(tmp_path / "o.pt", seed=7), family="dcgan"
    )
    cal = calibrate_generator(
        proj_settings, "tiny", real_dir, k=3, steps=10, other_generators=["other", "tiny"]
    )
    assert (cal.n_generated, cal.n_real, cal.n_other) == (3, 3, 1)
    stored = get_generator(proj_settings, "tiny").calibration
    assert stored is not None and stored["settings"]["other_generators"] == {"other": 1}


# --- latent match ------------------------------------------------------------------------------------------
def test_latent_match_finds_the_stored_seed_by_direction(proj_settings: Settings) -> None:
    store = open_store(proj_settings)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    ids = store_latents(store, "g", "z", vectors, seeds=list(range(1000, 1200)))
    assert len(ids) == 200
    assert sync_latent_index(proj_settings, store, "g", "z", 16) == 200
    matcher = LatentMatcher.open(proj_settings, store, "g", "z")
    query = np.stack([vectors[7] * 0.5 + 0.05 * rng.standard_normal(16), vectors[150]]).astype(np.float32)
    found = matcher.match(query, k=3)
    assert [m[0].seed for m in found] == [1007, 1150]
    assert found[0][0].cosine > 0.95 and found[0][0].cosine >= found[0][1].cosine
    assert found[1][0].distance == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="16-dim"):
        matcher.match(np.zeros((1, 8), np.float32))
    assert LatentMatcher.open(proj_settings, store, "other", "z").match(query, k=3) == [[], []]
    store.dispose()


# --- evidence ------------------------------------------------------------------------------------------------
def _tiny_with_stored_seeds(settings: Settings, tmp_path: Path) -> tuple[DCGANGenerator, Store]:
    """A tiny DCGAN registered as "tiny" with the z of seeds 0-39 stored and indexed."""
    register_generator(settings, "tiny", tiny_dcgan_checkpoint(tmp_path / "g.pt"), family="dcgan")
    gen, _ = load_generator(settings, "tiny")
    assert isinstance(gen, DCGANGenerator)
    store = open_store(settings)
    seeds = list(range(40))
    z = np.stack([gen.sample_z(1, seed=s)[0].flatten().numpy() for s in seeds])
    store_latents(store, "tiny", "z", z, seeds=seeds)
    sync_latent_index(settings, store, "tiny", "z", 16)
    return gen, store


def test_project_images_gives_evidence_in_input_order_with_matches_and_probability(
    proj_settings: Settings, tmp_path: Path
) -> None:
    gen, store = _tiny_with_stored_seeds(proj_settings, tmp_path)
    made = _generated(gen, [5])[0]
    foreign = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    evidence = project_images(proj_settings, [made, foreign], "tiny", steps=120, store=store)
    first, second = evidence
    assert first.face["how"] == "whole-image" and second.face["how"] == "centre-crop"
    assert first.face["effective_size"] == 16 and second.face["effective_size"] == 16
    assert first.lpips < 0.01 < second.lpips
    assert first.probability_generated is None and first.calibration_sizes is None
    assert first.latent_matches[0].seed == 5
    # matches are re-ranked by how close each stored latent's own image is to the face
    mses = [m.image_mse for m in first.latent_matches]
    assert len(mses) == 5 and all(v is not None for v in mses) and mses == sorted(mses)  # type: ignore[type-var]
    assert mses[0] < 1e-3 < mses[1]  # type: ignore[operator]
    assert first.reconstruction.size == (16, 16) and first.difference.size == (16, 16)
    assert first.steps > 0 and first.seconds > 0 and len(first.loss_trace) == first.steps
    cal = Calibration.fit([0.001, 0.002, 0.003], [0.2, 0.3, 0.4])
    set_calibration(proj_settings, "tiny", cal.to_json(), store=store)
    again = project_images(proj_settings, [made], "tiny", steps=120, store=store)[0]
    assert again.probability_generated is not None and again.probability_generated > 0.5
    assert again.calibration_sizes == {"n_generated": 3, "n_real": 3}
    doc = again.to_json(images="data-uri")
    png = base64.b64decode(doc["reconstruction"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    files = again.to_json(images="files", image_dir=tmp_path / "out", stem="x")
    assert Path(files["difference"]).is_file() and files["latent_matches"][0]["seed"] == 5
    store.dispose()


def test_a_stored_latent_that_reproduces_the_face_better_than_its_reprojection_is_reported(
    proj_settings: Settings, tmp_path: Path
) -> None:
    gen, store = _tiny_with_stored_seeds(proj_settings, tmp_path)
    made = _generated(gen, [9])[0]
    foreign = Image.fromarray(np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    # two steps: the reprojection is far from the face, the stored latent of seed 9 is the face itself
    first, second = project_images(proj_settings, [made, foreign], "tiny", steps=2, store=store)
    best = first.latent_matches[0]
    assert best.seed == 9 and best.image_lpips is not None and best.image_lpips < 1e-3 < first.lpips
    assert first.reproducing_match is best and first.evidence_lpips == best.image_lpips
    assert first.to_json()["reproduced_by_stored_latent"]["seed"] == 9
    # noise matches no stored latent's image better than its own reprojection
    assert second.reproducing_match is None and second.evidence_lpips == second.lpips
    assert (
        second.latent_matches[0].image_lpips is not None
        and second.latent_matches[0].image_lpips > second.lpips
    )
    assert second.to_json()["reproduced_by_stored_latent"] is None
    store.dispose()


def test_prepare_face_without_a_detector_takes_square_images_whole_and_centre_crops_others() -> None:
    crop = Image.new("RGB", (64, 64), (10, 20, 30))
    kept = prepare_face(crop, 64)
    assert kept.how == "whole-image" and kept.image.tobytes() == crop.tobytes() and kept.size() == 64
    wide = Image.new("RGB", (120, 60), (200, 0, 0))
    face = prepare_face(wide, 64)
    assert face.how == "centre-crop" and face.image.size == (64, 64) and face.size() == 60
    small = prepare_face(Image.new("RGB", (20, 20)), 64)  # effective size: the query's own pixels
    assert small.image.size == (64, 64) and small.size() == 20 and small.comparison_image().size == (20, 20)


# --- the refine tier -----------------------------------------------------------------------------------------
def _decoded(image: Image.Image) -> object:
    from indexer.decode import decode_image

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return decode_image(buf.getvalue())


def test_refine_adds_projection_evidence_per_face_and_generator(
    proj_settings: Settings, tmp_path: Path
) -> None:
    from search.refine import refine_json

    store = open_store(proj_settings)
    made = _generated(DCGANGenerator.from_preset("tiny", seed=1), [8])[0]
    base = {"hits": [], "faces": [], "tiers": ["exact"]}
    none = refine_json(proj_settings, _decoded(made), base, store=store)  # type: ignore[arg-type]
    assert none["refine"]["status"] == "unavailable" and "no generator" in none["refine"]["reason"]
    register_generator(
        proj_settings, "tiny", tiny_dcgan_checkpoint(tmp_path / "g.pt"), family="dcgan", store=store
    )
    out = refine_json(proj_settings, _decoded(made), base, store=store)  # type: ignore[arg-type]
    assert out["refine"]["status"] == "done" and out["refine"]["face_source"] == "whole-image"
    assert out["tiers"] == ["exact"] and base["faces"] == []  # the base document is not modified
    (face,) = out["faces"]
    (proj,) = face["projection"]
    assert proj["generator"] == "tiny" and proj["lpips"] < 0.01 and proj["probability_generated"] is None
    assert proj["reconstruction"].startswith("data:image/png;base64,") and proj["target"].startswith("data:")
    wide = Image.new("RGB", (40, 20), (90, 90, 90))
    skipped = refine_json(proj_settings, _decoded(wide), base, store=store)  # type: ignore[arg-type]
    assert skipped["refine"]["status"] == "no_face" and "not square" in skipped["refine"]["reason"]
    store.dispose()


def test_refine_warm_starts_from_the_stored_latent_of_a_generated_hit(
    proj_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer.store.models import Image as ImageRow
    from search.refine import _warm_starts, refine_json

    store = open_store(proj_settings)
    register_generator(
        proj_settings, "tiny", tiny_dcgan_checkpoint(tmp_path / "g.pt"), family="dcgan", store=store
    )
    gen = DCGANGenerator.from_preset("tiny", seed=1)
    made = _generated(gen, [12])[0]
    with store.session() as s:
        row = ImageRow(
            sha256="f" * 64, width=16, height=16, format="PNG", num_bytes=1, label="generated", generator="tiny",
            pdq=b"\0" * 32, pdq_quality=100, pdq_mirror=b"\0" * 32, phash=b"\0" * 8, phash_mirror=b"\0" * 8,
        )  # fmt: skip
        s.add(row)
        s.flush()
        image_id = int(row.id)
    store_latents(
        store, "tiny", "z", gen.sample_z(1, seed=12).flatten(1).numpy(), seeds=[12], image_ids=[image_id]
    )
    sync_latent_index(proj_settings, store, "tiny", "z", 16)
    base = {"hits": [{"image_id": image_id, "label": "generated"}], "faces": []}
    starts = _warm_starts(store, "tiny", "z", base)
    assert starts is not None and np.array_equal(starts[0], gen.sample_z(1, seed=12).flatten().numpy())
    assert _warm_starts(store, "tiny", "z", {"hits": [{"image_id": image_id, "label": "real"}]}) is None
    assert _warm_starts(store, "other", "z", base) is None
    import search.refine as R

    given: list[list[np.ndarray] | None] = []
    real_project = R.project_faces

    def recording(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs.get("starts"))
        return real_project(*args, **kwargs)

    monkeypatch.setattr(R, "project_faces", recording)
    out = refine_json(proj_settings, _decoded(made), base, store=store)  # type: ignore[arg-type]
    (proj,) = out["faces"][0]["projection"]
    per_face = given[0]  # one face; its starts: the hit's stored latent
    assert per_face is not None and len(per_face) == 1
    assert np.array_equal(np.asarray(per_face[0])[0], gen.sample_z(1, seed=12).flatten().numpy())
    assert proj["lpips"] < 1e-3 and proj["latent_matches"][0]["seed"] == 12
    store.dispose()
