"""StyleGAN2 generator: latent spaces, noise modes, gradients, the modulated-conv and FIR maths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from projection.generator_base import Generator  # noqa: E402
from projection.stylegan2 import (  # noqa: E402
    CONFIGS,
    StyleGAN2Config,
    StyleGAN2Generator,
    fir_kernel,
    infer_channel_formula,
    modulated_conv2d,
    upsample2x,
)


def _tiny(seed: int = 0, noise_strength: float = 0.3) -> StyleGAN2Generator:
    gen = StyleGAN2Generator.from_preset("tiny", seed=seed).eval()
    with torch.no_grad():
        for name, param in gen.named_parameters():
            if name.endswith("noise_strength"):
                param.fill_(noise_strength)
    return gen


def test_tiny_generator_is_a_generator_with_three_latent_spaces() -> None:
    gen = _tiny()
    assert isinstance(gen, Generator)
    assert gen.family == "stylegan2"
    assert gen.latent_spaces == ("z", "w", "w+")
    assert gen.latent_shape("z") == (32,)
    assert gen.latent_shape("w") == (32,)
    assert gen.latent_shape("w+") == (6, 32)  # blocks 4, 8, 16 -> 2 * 3 ws
    assert sum(p.numel() for p in gen.parameters()) < 100_000  # small enough for quick tests


@pytest.mark.parametrize("space", ["z", "w", "w+"])
def test_synthesize_returns_rgb_images_at_resolution(space: str) -> None:
    gen = _tiny()
    latent = torch.randn(3, *gen.latent_shape(space), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = gen.synthesize(latent, space)
    assert img.shape == (3, 3, 16, 16)
    assert img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert img.std() > 1e-3  # not a constant image


def test_synthesize_rejects_latents_of_the_wrong_shape() -> None:
    gen = _tiny()
    with pytest.raises(ValueError, match="w\\+"):
        gen.synthesize(torch.zeros(1, 32), "w+")
    with pytest.raises(ValueError):
        gen.latent_shape("s")


def test_wplus_with_identical_rows_equals_w_and_z_equals_its_mapping() -> None:
    gen = _tiny()
    z = gen.sample_z(2, seed=3)
    with torch.no_grad():
        w = gen.mapping(z)  # [2, 32]
        from_z = gen.synthesize(z, "z")
        from_w = gen.synthesize(w, "w")
        from_wplus = gen.synthesize(w[:, None, :].repeat(1, gen.num_ws, 1), "w+")
    torch.testing.assert_close(from_w, from_z)
    torch.testing.assert_close(from_wplus, from_w)


def test_wplus_rows_act_on_different_layers() -> None:
    gen = _tiny()
    ws = gen.mean_latent("w+", num_samples=256)[None].clone()  # [1, 6, 32]
    with torch.no_grad():
        base = gen.synthesize(ws, "w+")
        ws[0, -1] += 3.0  # only the last toRGB's style
        changed = gen.synthesize(ws, "w+")
    assert not torch.allclose(base, changed)


def test_same_seed_builds_the_same_generator_and_const_noise_is_deterministic() -> None:
    a, b = _tiny(seed=7), _tiny(seed=7)
    other = _tiny(seed=8)
    z = a.sample_z(2, seed=0)
    with torch.no_grad():
        img_a1, img_a2, img_b = a.synthesize(z, "z"), a.synthesize(z, "z"), b.synthesize(z, "z")
        img_other = other.synthesize(z, "z")
    assert torch.equal(img_a1, img_a2)
    assert torch.equal(img_a1, img_b)
    assert not torch.allclose(img_a1, img_other)


def test_noise_modes_random_const_and_none_differ_as_they_should() -> None:
    gen = _tiny(noise_strength=0.5)
    w = gen.mapping(gen.sample_z(1, seed=0)).detach()
    with torch.no_grad():
        const = gen.synthesize(w, "w", noise_mode="const")
        none = gen.synthesize(w, "w", noise_mode="none")
        torch.manual_seed(0)
        rand1 = gen.synthesize(w, "w", noise_mode="random")
        torch.manual_seed(1)
        rand2 = gen.synthesize(w, "w", noise_mode="random")
    assert not torch.allclose(const, none)
    assert not torch.allclose(rand1, rand2)
    with pytest.raises(ValueError, match="noise_mode"):
        gen.synthesize(w, "w", noise_mode="loud")
    # Zero noise strength makes every mode identical.
    quiet = _tiny(noise_strength=0.0)
    with torch.no_grad():
        torch.testing.assert_close(quiet.synthesize(w, "w", noise_mode="random"), quiet.synthesize(w, "w"))


def test_gradients_flow_to_w_plus_and_noise_buffers() -> None:
    gen = _tiny().requires_grad_(False)
    ws = gen.mean_latent("w+", num_samples=128)[None].clone().requires_grad_(True)  # [1, 6, 32]
    noises = gen.noise_buffers()
    assert [tuple(n.shape) for n in noises] == [(4, 4), (8, 8), (8, 8), (16, 16), (16, 16)]
    for buf in noises:
        buf.requires_grad_(True)
    img = gen.synthesize(ws, "w+")
    (img.square().mean()).backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0
    assert all(row.abs().sum() > 0 for row in ws.grad[0])  # every layer's style matters
    for buf in noises:
        assert buf.grad is not None and buf.grad.abs().sum() > 0
    # The buffers handed out are the generator's own: editing them changes the image.
    with torch.no_grad():
        noises[-1].mul_(0.0)
        assert not torch.allclose(gen.synthesize(ws, "w+"), img)


def test_mean_latent_uses_tracked_w_avg_once_set_else_the_sample_mean() -> None:
    gen = _tiny()
    assert not gen.w_avg_tracked
    sample_mean = gen.mean_latent("w", num_samples=512, seed=0)
    manual = gen.mapping(gen.sample_z(512, seed=0)).mean(0)
    torch.testing.assert_close(sample_mean, manual.detach())
    tracked = torch.full((32,), 0.25)
    gen.set_w_avg(tracked)
    assert gen.w_avg_tracked
    assert torch.equal(gen.mean_latent("w"), tracked)
    assert torch.equal(gen.mean_latent("w+"), tracked[None].repeat(6, 1))
    assert torch.equal(gen.mean_latent("z"), torch.zeros(32))


def test_sample_mean_follows_changes_to_the_mapping_weights() -> None:
    gen = _tiny()
    before = gen.mean_latent("w", num_samples=256)
    assert torch.equal(gen.mean_latent("w", num_samples=256), before)  # same weights: same (cached) value
    with torch.no_grad():
        dict(gen.named_parameters())["mapping_net.fcs.1.bias"].add_(50.0)  # in-place edit, last mapping layer
    after = gen.mean_latent("w", num_samples=256)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, gen.mapping(gen.sample_z(256, seed=0)).mean(0).detach())


def test_truncation_moves_w_towards_the_mean() -> None:
    gen = _tiny()
    gen.set_w_avg(torch.linspace(-1, 1, 32))
    z = gen.sample_z(4, seed=2)
    with torch.no_grad():
        w = gen.mapping(z)
        torch.testing.assert_close(gen.mapping(z, psi=0.0), gen.mean_latent("w").expand(4, -1))
        torch.testing.assert_close(gen.mapping(z, psi=0.5), 0.5 * (w + gen.mean_latent("w")))


def test_latent_std_is_per_coordinate_spread() -> None:
    gen = _tiny()
    assert gen.latent_std("z") == 1.0
    ws = gen.mapping(gen.sample_z(1000, seed=0)).detach()
    assert gen.latent_std("w", num_samples=1000) == pytest.approx(
        float((ws - ws.mean(0)).std(unbiased=False))
    )


def test_grouped_modulated_conv_equals_a_per_sample_loop_and_demodulates() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 6, generator=g)
    weight = torch.randn(4, 5, 3, 3, generator=g)
    styles = torch.randn(3, 5, generator=g)
    out = modulated_conv2d(x, weight, styles, demodulate=True)
    for n in range(3):
        wn = weight * styles[n][None, :, None, None]  # [4, 5, 3, 3]
        wn = wn / wn.square().sum(dim=[1, 2, 3], keepdim=True).sqrt()  # unit norm per output channel
        ref = F.conv2d(x[n : n + 1], wn, padding=1)
        torch.testing.assert_close(out[n : n + 1], ref, rtol=1e-5, atol=1e-5)


def test_upsampling_conv_is_transposed_conv_then_blur() -> None:
    """Reference written the long way: zero insertion, full correlation with the flipped kernel, then FIR."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g)
    weight = torch.randn(5, 3, 3, 3, generator=g)
    styles = torch.randn(2, 3, generator=g)
    out = modulated_conv2d(x, weight, styles, demodulate=False, upsample_kernel=fir_kernel())
    assert out.shape == (2, 5, 8, 8)
    for n in range(2):
        up = torch.zeros(1, 3, 7, 7)
        up[:, :, ::2, ::2] = x[n : n + 1]  # zero insertion: [1, 3, 2H-1, 2W-1]
        wn = weight * styles[n][None, :, None, None]
        full = F.conv2d(F.pad(up, [2, 2, 2, 2]), wn.flip([2, 3]))  # [1, 5, 9, 9] = transposed conv
        blur = (fir_kernel() * 4.0)[None, None].repeat(5, 1, 1, 1)
        ref = F.conv2d(F.pad(full, [1, 1, 1, 1]), blur, groups=5)  # [1, 5, 8, 8]
        torch.testing.assert_close(out[n : n + 1], ref, rtol=1e-5, atol=1e-5)


def test_fir_upsampling_keeps_a_constant_image_constant_inside() -> None:
    x = torch.full((1, 3, 8, 8), 0.7)
    up = upsample2x(x, fir_kernel())
    assert up.shape == (1, 3, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full((1, 3, 12, 12), 0.7))


def test_presets_follow_the_published_configurations() -> None:
    assert (
        CONFIGS["ffhq-1024"].num_ws == 18
        and CONFIGS["ffhq-512"].num_ws == 16
        and CONFIGS["ffhq-256"].num_ws == 14
    )
    f = CONFIGS["ffhq-1024"]
    assert [f.channels(r) for r in f.block_resolutions] == [512, 512, 512, 512, 512, 256, 128, 64, 32]
    p256 = CONFIGS["ffhq-256"]
    assert [p256.channels(r) for r in p256.block_resolutions] == [512, 512, 512, 512, 256, 128, 64]
    for cfg in CONFIGS.values():
        chans = {r: cfg.channels(r) for r in cfg.block_resolutions}
        base, cmax = infer_channel_formula(chans)
        assert {r: min(base // r, cmax) for r in chans} == chans
    with pytest.raises(ValueError):
        StyleGAN2Config(resolution=48)
    with pytest.raises(ValueError):
        infer_channel_formula({4: 8, 8: 16})


def test_config_round_trips_through_a_dict() -> None:
    cfg = CONFIGS["ffhq-256"]
    assert StyleGAN2Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        StyleGAN2Config.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_runs_on_cuda_and_matches_cpu() -> None:
    gen = _tiny()
    z = gen.sample_z(2, seed=0)
    with torch.no_grad():
        cpu = gen.synthesize(z, "z")
        gpu = gen.to("cuda").synthesize(z.cuda(), "z")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
