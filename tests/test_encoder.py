"""The latent encoder: trained on a tiny generator's own samples, stored with its SHA-256, used as a start."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from indexer.errors import ModelUnavailableError  # noqa: E402
from indexer.settings import Settings  # noqa: E402
from projection import registry  # noqa: E402
from projection.calibration import Calibration, perturb  # noqa: E402
from projection.dcgan import DCGANGenerator  # noqa: E402
from projection.encoder import (  # noqa: E402
    EncoderConfig,
    LatentEncoder,
    TrainingConfig,
    load_encoder,
    predict_starts,
    save_encoder,
    train_encoder,
    train_generator_encoder,
)
from projection.evidence import project_images, to_image, to_tensor  # noqa: E402
from projection.lpips_loader import load_lpips  # noqa: E402
from projection.projector import ProjectionConfig, project  # noqa: E402
from projection.registry import get_generator, register_generator, set_calibration  # noqa: E402
from projection.stylegan2 import StyleGAN2Generator  # noqa: E402
from tests.tiny_generators import (  # noqa: E402, F401
    lpips_file_fixture,
    one_torch_thread_fixture,
    tiny_dcgan_checkpoint,
)

SMALL = TrainingConfig(samples=3000, epochs=6, batch=64, holdout=300, seed=0)


@pytest.fixture(scope="module")
def tiny_dcgan() -> DCGANGenerator:
    return DCGANGenerator.from_preset("tiny", seed=1)


@pytest.fixture(scope="module")
def trained(tiny_dcgan: DCGANGenerator) -> tuple[LatentEncoder, object]:
    return train_encoder(tiny_dcgan, "z", SMALL, width=16)


def _made(gen: DCGANGenerator, seeds: list[int]) -> torch.Tensor:
    """Perturbed images of the generator (JPEG q90, 0.8 resize) as ``[N, 3, R, R]`` in [-1, 1]."""
    with torch.no_grad():
        images = [to_image(gen.synthesize(gen.sample_z(1, seed=10_000 + s), "z")[0]) for s in seeds]
    return to_tensor([perturb(im) for im in images])


def test_encoder_predicts_the_latents_of_unseen_samples(tiny_dcgan: DCGANGenerator, trained: tuple) -> None:
    encoder, report = trained
    assert report.samples == 3000 and report.holdout == 300
    assert report.holdout_cosine > 0.6 and report.holdout_relative_mse < 0.7  # the mean latent scores 0 / 1.0
    z = torch.cat([tiny_dcgan.sample_z(1, seed=10_000 + s) for s in range(20)]).flatten(1)
    pred = predict_starts(encoder, _made(tiny_dcgan, list(range(20))), tiny_dcgan.latent_shape("z"))
    assert pred.shape == (20, 16, 1, 1)
    cos = torch.nn.functional.cosine_similarity(pred.flatten(1), z, dim=1)
    assert float(cos.mean()) > 0.6


def test_training_is_deterministic_on_the_cpu(tiny_dcgan: DCGANGenerator) -> None:
    cfg = TrainingConfig(samples=300, epochs=1, batch=64, holdout=44, seed=3)
    a, ra = train_encoder(tiny_dcgan, "z", cfg, width=8)
    b, rb = train_encoder(tiny_dcgan, "z", cfg, width=8)
    assert ra.holdout_cosine == rb.holdout_cosine
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_drawn_samples_are_cached_so_training_again_does_not_draw_them(
    tiny_dcgan: DCGANGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import projection.encoder as enc

    calls: list[int] = []
    real = enc.generator_samples

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(enc, "generator_samples", counting)
    cfg = TrainingConfig(samples=300, epochs=1, batch=64, holdout=44, seed=3)
    cache = tmp_path / "samples.safetensors"
    a, _ = train_encoder(tiny_dcgan, "z", cfg, width=8, sample_cache=cache, cache_key="weights-1")
    b, _ = train_encoder(tiny_dcgan, "z", cfg, width=8, sample_cache=cache, cache_key="weights-1")
    assert len(calls) == 1 and cache.is_file()
    assert all(
        torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    train_encoder(tiny_dcgan, "z", cfg, width=8, sample_cache=cache, cache_key="weights-2")  # other weights
    assert len(calls) == 2


def test_the_features_encoder_learns_from_few_samples_and_round_trips(
    tiny_dcgan: DCGANGenerator, tmp_path: Path
) -> None:
    from indexer.errors import ModelUnavailableError
    from tests.tiny_generators import tiny_lpips_file

    backbone = tiny_lpips_file(tmp_path / "vgg.safetensors", net="vgg")  # random VGG16 weights, real layout
    cfg = TrainingConfig(samples=600, epochs=1, holdout=100, seed=2, kind="features", backbone=str(backbone))
    encoder, report = train_encoder(tiny_dcgan, "z", cfg)
    assert report.holdout_relative_mse < 0.95  # better than the mean latent (1.0) on unseen samples
    path = tmp_path / "enc.safetensors"
    save_encoder(encoder, path, report)
    again = load_encoder(path)
    images = _made(tiny_dcgan, [1, 2, 3])
    shape = tiny_dcgan.latent_shape("z")
    torch.testing.assert_close(predict_starts(again, images, shape), predict_starts(encoder, images, shape))
    alex = tiny_lpips_file(tmp_path / "alex.safetensors", net="alex")
    with pytest.raises(ModelUnavailableError, match="not a VGG16 backbone"):
        train_encoder(tiny_dcgan, "z", TrainingConfig(samples=300, epochs=1, holdout=50, kind="features",
                                                      backbone=str(alex)))  # fmt: skip
    with pytest.raises(ModelUnavailableError, match="needs the VGG16 LPIPS backbone"):
        train_encoder(tiny_dcgan, "z", TrainingConfig(samples=300, epochs=1, holdout=50, kind="features"))


def test_the_encoder_start_beats_the_mean_latent_on_a_short_budget(
    tiny_dcgan: DCGANGenerator, trained: tuple, lpips_file: Path
) -> None:
    encoder, _ = trained
    lpips_model = load_lpips(lpips_file, net="vgg")
    seeds = list(range(8))
    targets = _made(tiny_dcgan, seeds)
    true_z = torch.cat([tiny_dcgan.sample_z(1, seed=10_000 + s) for s in seeds])
    cfg = ProjectionConfig(space="z", steps=5, early_stop=False, mean_start=False)
    from_mean = project(tiny_dcgan, targets, lpips_model=lpips_model, config=cfg)
    starts = list(predict_starts(encoder, targets, tiny_dcgan.latent_shape("z"))[:, None])
    from_encoder = project(tiny_dcgan, targets, lpips_model=lpips_model, config=cfg, starts=starts)
    assert all(r.start_index == 1 for r in from_encoder) and all(r.start_index == 0 for r in from_mean)

    def mean_of(results: list, what: str) -> float:
        if what == "lpips":
            return sum(r.lpips for r in results) / len(results)
        return sum(float((r.latent - true_z[i]).norm()) for i, r in enumerate(results)) / len(results)

    assert mean_of(from_encoder, "lpips") < 0.9 * mean_of(from_mean, "lpips")
    assert mean_of(from_encoder, "distance") < 0.6 * mean_of(from_mean, "distance")


def test_save_and_load_round_trip_and_foreign_files_are_refused(
    trained: tuple, tiny_dcgan: DCGANGenerator, tmp_path: Path
) -> None:
    encoder, report = trained
    path = tmp_path / "enc.safetensors"
    save_encoder(encoder, path, report)
    again = load_encoder(path)
    assert again.config == encoder.config
    x = _made(tiny_dcgan, [1, 2])
    with torch.no_grad():
        assert torch.equal(again(x), encoder(x))
    from projection.checkpoints import save_safetensors

    other = tmp_path / "generator.safetensors"
    save_safetensors(tiny_dcgan, other)
    with pytest.raises(ModelUnavailableError, match="not a Sleuth latent encoder"):
        load_encoder(other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelUnavailableError, match="cannot read latent encoder"):
        load_encoder(broken)


def test_stylegan2_encoder_predicts_w_and_fills_w_plus() -> None:
    gen = StyleGAN2Generator.from_preset("tiny", seed=0)
    encoder, report = train_encoder(
        gen, "w", TrainingConfig(samples=256, epochs=1, batch=64, holdout=32), width=8
    )
    assert encoder.config == EncoderConfig(resolution=16, space="w", latent_dim=32, width=8)
    assert -1.0 <= report.holdout_cosine <= 1.0
    x = torch.zeros(2, 3, 16, 16)
    w_plus = predict_starts(encoder, x, gen.latent_shape("w+"))
    assert w_plus.shape == (2, gen.num_ws, 32) and torch.equal(w_plus[:, 0], w_plus[:, -1])
    larger = torch.nn.functional.interpolate(
        x + 0.5, scale_factor=2.0
    )  # a larger image: area-downsampled first
    assert torch.allclose(
        predict_starts(encoder, larger, (32,)), predict_starts(encoder, x + 0.5, (32,)), atol=1e-5
    )


def test_registry_records_the_encoder_clears_calibration_and_projection_starts_from_it(
    tmp_path: Path, lpips_file: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", lpips_weights=lpips_file)
    register_generator(settings, "tiny", tiny_dcgan_checkpoint(tmp_path / "g.pt"), family="dcgan")
    set_calibration(settings, "tiny", Calibration.fit([0.01, 0.02], [0.3, 0.4]).to_json())
    calls: list[tuple[str, int, int]] = []
    info, report = train_generator_encoder(
        settings, "tiny", SMALL, width=16, progress=lambda *call: calls.append(call)
    )
    sampling = [done for phase, done, _ in calls if phase == "sampling"]
    assert sampling[0] == 0 and sampling[-1] == SMALL.samples and sampling == sorted(sampling)
    assert len(sampling) > 2, "sampling reports after each chunk, not only at its start and end"
    assert [done for phase, done, _ in calls if phase == "epoch"] == list(range(1, SMALL.epochs + 1))
    assert info.encoder is not None and info.calibration is None
    path = Path(info.encoder["path"])
    from projection.checkpoints import sha256_file

    assert path.is_file() and info.encoder["sha256"] == sha256_file(path)
    assert info.encoder["report"]["holdout_cosine"] == report.holdout_cosine
    assert get_generator(settings, "tiny").to_json()["encoder"]["sha256"] == info.encoder["sha256"]
    gen = DCGANGenerator.from_preset("tiny", seed=1)
    with torch.no_grad():
        made = to_image(gen.synthesize(gen.sample_z(1, seed=77), "z")[0])
    steps: list[tuple[int, int, int]] = []
    (ev,) = project_images(settings, [made], "tiny", match_k=0, progress=lambda *s: steps.append(s))
    assert ev.start_index == 1 and ev.lpips < 0.05  # the fast setting with an encoder: its start alone
    assert steps and steps[-1][1] == steps[-1][2] == ev.steps, (
        "progress (faces done, step, steps) reaches the end"
    )
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # changed after training
    registry._CACHE.clear()  # loaded models are kept per (file, sha256) for the life of the process
    with pytest.raises(ModelUnavailableError, match="changed after training"):
        project_images(settings, [made], "tiny", match_k=0)
