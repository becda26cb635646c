"""Projector, DCGAN and LPIPS loading: generated images project back, other images do not.

Tiny seeded generators (StyleGAN2 ``tiny`` 16x16, DCGAN ``tiny`` 16x16) and a seeded, randomly initialised
VGG-LPIPS written to a local safetensors file (nothing downloaded).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from indexer.errors import ModelUnavailableError  # noqa: E402
from projection.dcgan import DCGANConfig, DCGANGenerator  # noqa: E402
from projection.lpips_loader import load_lpips  # noqa: E402
from projection.projector import (  # noqa: E402
    ProjectionConfig,
    _stylegan2_synthesize,
    latent_noise_scale,
    learning_rate,
    noise_regularization,
    normalize_noises_,
    project,
)
from projection.stylegan2 import StyleGAN2Generator  # noqa: E402
from tests.tiny_generators import lpips_file_fixture, one_torch_thread_fixture  # noqa: E402, F401


@pytest.fixture(scope="module")
def lpips_model(lpips_file: Path) -> torch.nn.Module:
    return load_lpips(lpips_file, net="vgg")


def _dcgan() -> DCGANGenerator:
    return DCGANGenerator.from_preset("tiny", seed=1)


def _stylegan2() -> StyleGAN2Generator:
    return StyleGAN2Generator.from_preset("tiny", seed=1)


def _blobs(n: int, res: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields ``[n, 3, res, res]`` in [-1, 1]: images neither generator was made for."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(res, res), mode="bilinear", align_corners=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten() - b.flatten()).norm() / b.flatten().norm())


# --- LPIPS from a local file -------------------------------------------------------------------------------
def test_lpips_weights_round_trip_through_the_local_file(
    lpips_file: Path, lpips_model: torch.nn.Module
) -> None:
    again = load_lpips(lpips_file, net="vgg")
    a, b = _blobs(2, 32, seed=1), _blobs(2, 32, seed=2)
    assert torch.equal(lpips_model(a, b), again(a, b))
    assert float(lpips_model(a, a).abs().max()) == 0.0
    assert float(lpips_model(a, b).min()) > 0.0


def test_lpips_refuses_a_missing_file_or_the_wrong_network(tmp_path: Path, lpips_file: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_lpips(tmp_path / "nope.safetensors")
    with pytest.raises(ModelUnavailableError, match="lacks LPIPS tensors|shape"):
        load_lpips(lpips_file, net="alex")  # a VGG file for an AlexNet module


# --- DCGAN ---------------------------------------------------------------------------------------------------
def test_dcgan_layout_and_state_dict_round_trip() -> None:
    gen = _dcgan()
    sd = gen.state_dict()
    assert DCGANGenerator.config_from_state_dict(sd) == DCGANConfig(nz=16, ngf=8, nc=3, resolution=16)
    again = DCGANGenerator.from_state_dict(sd)
    z = gen.sample_z(4, seed=3)
    with torch.no_grad():
        images = gen.synthesize(z)
        assert images.shape == (4, 3, 16, 16)
        assert float(images.abs().max()) <= 1.0 and float(images.std()) > 0.1
        assert torch.equal(images, again.synthesize(z))
        # eval-mode BatchNorm: an image depends on its own latent only, not on the rest of the batch
        assert torch.allclose(gen.synthesize(z[:1]), images[:1], atol=1e-6)
    with pytest.raises(ValueError, match="mismatch"):
        DCGANGenerator.from_state_dict({**sd, "main.99.weight": torch.zeros(1)})


# --- projection back into the generator ------------------------------------------------------------------
def test_dcgan_images_from_known_latents_project_back(lpips_model: torch.nn.Module) -> None:
    gen = _dcgan()
    z = gen.sample_z(3, seed=5)
    with torch.no_grad():
        targets = gen.synthesize(z)
    results = project(gen, targets, lpips_model=lpips_model, config=ProjectionConfig(steps=200))
    assert len(results) == 3
    for r, z_true in zip(results, z, strict=True):
        assert r.space == "z" and r.latent.shape == (16, 1, 1)
        assert r.lpips < 1e-3 and r.mse < 1e-4
        assert _rel(r.latent, z_true) < 0.02
        assert r.reconstruction.shape == (3, 16, 16)


def test_stylegan2_images_from_known_w_project_back(lpips_model: torch.nn.Module) -> None:
    gen = _stylegan2()
    with torch.no_grad():
        w = gen.mapping(gen.sample_z(2, seed=5))  # [2, w_dim]
        targets = gen.synthesize(w, "w", noise_mode="const")
    results = project(gen, targets, lpips_model=lpips_model, config=ProjectionConfig(space="w", steps=200))
    for r, w_true in zip(results, w, strict=True):
        assert r.space == "w" and r.latent.shape == (32,)
        assert r.lpips < 5e-3 and r.mse < 2e-3
        assert _rel(r.latent, w_true) < 0.15


def test_images_the_generator_cannot_make_do_not_reproject(lpips_model: torch.nn.Module) -> None:
    for gen, space in ((_dcgan(), "z"), (_stylegan2(), "w")):
        z = gen.sample_z(2, seed=7)
        with torch.no_grad():
            made = gen.synthesize(z, "z")
        others = _blobs(2, 16, seed=11)
        results = project(
            gen,
            torch.cat([made, others]),
            lpips_model=lpips_model,
            config=ProjectionConfig(space=space, steps=100),
        )
        generated = max(r.lpips for r in results[:2])
        foreign = min(r.lpips for r in results[2:])
        assert foreign > 0.01, (gen.family, foreign)
        assert foreign > 10 * generated, (gen.family, generated, foreign)
        assert min(r.mse for r in results[2:]) > 0.02


def test_wplus_projection_reaches_at_least_the_w_fit(lpips_model: torch.nn.Module) -> None:
    gen = _stylegan2()
    target = _blobs(1, 16, seed=3)
    (in_w,) = project(
        gen, target, lpips_model=lpips_model, config=ProjectionConfig(space="w", steps=120, early_stop=False)
    )
    (in_wp,) = project(
        gen, target, lpips_model=lpips_model, config=ProjectionConfig(space="w+", steps=120, early_stop=False)
    )
    assert in_wp.latent.shape == (gen.num_ws, 32)
    assert in_wp.lpips + in_wp.mse <= (in_w.lpips + in_w.mse) * 1.05


# --- determinism, batching, starts, early stopping ---------------------------------------------------------
def test_cpu_projection_is_deterministic_with_a_seed(lpips_model: torch.nn.Module) -> None:
    gen = _stylegan2()
    targets = _blobs(2, 16, seed=4)
    run = [
        project(gen, targets, lpips_model=lpips_model, config=ProjectionConfig(steps=40, seed=s))
        for s in (3, 3, 4)
    ]
    for a, b in zip(run[0], run[1], strict=True):
        assert torch.equal(a.latent, b.latent) and a.loss_trace == b.loss_trace and a.lpips == b.lpips
    assert not torch.equal(run[0][0].latent, run[2][0].latent)  # the seed drives the latent and noise draws


def test_a_batch_gives_the_results_of_one_image_at_a_time(lpips_model: torch.nn.Module) -> None:
    gen = _stylegan2()
    targets = _blobs(3, 16, seed=6)
    cfg = ProjectionConfig(steps=40, seed=2)
    batched = project(gen, targets, lpips_model=lpips_model, config=cfg)
    for i in range(3):
        (alone,) = project(gen, targets[i : i + 1], lpips_model=lpips_model, config=cfg)
        assert alone.steps == batched[i].steps
        # same trajectory up to float rounding of batched convolutions (Adam amplifies it a little)
        assert alone.loss_trace == pytest.approx(batched[i].loss_trace, rel=1e-3)
        assert torch.allclose(alone.latent, batched[i].latent, atol=2e-2)
        assert alone.lpips == pytest.approx(batched[i].lpips, rel=1e-2)
    assert not torch.allclose(batched[0].latent, batched[1].latent, atol=0.1)


def test_several_starts_run_together_and_the_best_start_wins(lpips_model: torch.nn.Module) -> None:
    gen = _dcgan()
    z = gen.sample_z(2, seed=21)
    with torch.no_grad():
        targets = gen.synthesize(z)
    far = gen.sample_z(1, seed=99)
    starts = [
        torch.stack(
            [far[0], z[0] + 0.01 * torch.randn(z[0].shape, generator=torch.Generator().manual_seed(0))]
        ),
        torch.empty(0),  # target 1: the mean latent only
    ]
    cfg = ProjectionConfig(steps=60, early_stop=False)
    results = project(gen, targets, lpips_model=lpips_model, config=cfg, starts=starts)
    assert results[0].start_index == 2  # the start next to the true latent
    assert results[1].start_index == 0
    assert _rel(results[0].latent, z[0]) < 0.02
    (from_mean,) = project(gen, targets[:1], lpips_model=lpips_model, config=cfg)
    assert results[0].lpips + results[0].mse <= from_mean.lpips + from_mean.mse
    with pytest.raises(ValueError, match="one tensor per target"):
        project(gen, targets, lpips_model=lpips_model, config=cfg, starts=starts[:1])


def test_early_stopping_ends_plateaued_rows_and_keeps_their_best_latent(lpips_model: torch.nn.Module) -> None:
    gen = _dcgan()
    targets = _blobs(2, 16, seed=8)
    calls: list[tuple[int, int]] = []
    cfg = ProjectionConfig(steps=300, patience=10, rel_tol=1e-3, noise_ramp=0.0)
    results = project(
        gen, targets, lpips_model=lpips_model, config=cfg, progress=lambda s, a: calls.append((s, a))
    )
    for r in results:
        assert 10 < r.steps < 300
        assert len(r.loss_trace) == r.steps
        # the kept latent is the best one evaluated; re-evaluated without noise it is no worse
        assert r.lpips + r.mse <= min(r.loss_trace) + 1e-5
    assert len(calls) == max(r.steps for r in results)
    assert calls[-1][1] == 0  # every row stopped
    full = project(gen, targets, lpips_model=lpips_model, config=ProjectionConfig(steps=30, early_stop=False))
    assert [r.steps for r in full] == [30, 30]


# --- the published schedule and the StyleGAN2 pieces ---------------------------------------------------
def test_published_settings_and_schedules() -> None:
    pub = ProjectionConfig.published()
    assert (pub.steps, pub.lr, pub.mse_weight, pub.early_stop) == (1000, 0.1, 0.0, False)
    assert learning_rate(pub, 0) == 0.0
    assert learning_rate(pub, 500) == pytest.approx(0.1)
    assert learning_rate(pub, 999) < 0.001
    assert latent_noise_scale(pub, 0, 10.0) == pytest.approx(10.0 * pub.initial_noise_factor)
    assert latent_noise_scale(pub, 750, 10.0) == 0.0
    assert latent_noise_scale(pub, 300, 10.0) < latent_noise_scale(pub, 100, 10.0)


def test_per_row_noise_synthesis_equals_the_generators_const_noise_path() -> None:
    gen = _stylegan2()
    with torch.no_grad():
        for name, param in gen.named_parameters():
            if name.endswith("noise_strength"):
                param.fill_(0.5)
        w = gen.mapping(gen.sample_z(3, seed=1))
        noises = [b[None, None].expand(3, 1, -1, -1) for b in gen.noise_buffers()]
        ours = _stylegan2_synthesize(gen, w, "w", noises)
        theirs = gen.synthesize(w, "w", noise_mode="const")
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_noise_maps_are_renormalised_and_regularised() -> None:
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(2, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    white = torch.randn(2, 1, 16, 16, generator=g)
    maps = [torch.cat([smooth[:1], white[:1]]) * 3 + 1]
    normalize_noises_(maps, torch.arange(2))
    assert torch.allclose(maps[0].mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(maps[0].square().mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)
    reg = noise_regularization(maps)
    assert reg.shape == (2,) and float(reg[0]) > 10 * float(reg[1])  # correlated noise is penalised


def test_forward_search_start_replaces_the_mean_row_when_asked(lpips_model: torch.nn.Module) -> None:
    gen = _dcgan()
    z = gen.sample_z(2, seed=31)
    with torch.no_grad():
        targets = gen.synthesize(z)
    active: list[int] = []
    cfg = ProjectionConfig(steps=20, candidate_starts=64, mean_start=False, early_stop=False)
    results = project(
        gen, targets, lpips_model=lpips_model, config=cfg, progress=lambda s, a: active.append(a)
    )
    assert active[0] == 2  # one row per target: the best of 64 samples, no mean-latent row
    assert [r.start_index for r in results] == [1, 1]
    both = ProjectionConfig(steps=20, candidate_starts=64, early_stop=False)
    active.clear()
    again = project(
        gen, targets, lpips_model=lpips_model, config=both, progress=lambda s, a: active.append(a)
    )
    assert active[0] == 4  # mean + candidate per target
    assert all(
        a.lpips + a.mse <= (r.lpips + r.mse) * 1.001 + 1e-6 for a, r in zip(again, results, strict=True)
    )
