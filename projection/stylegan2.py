"""StyleGAN2 generator (config F, skip-architecture toRGB), this project's own implementation.

Written from Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2) and its
appendix, plus the published configuration facts of the stylegan2-ada-pytorch release (layer shapes,
channel formula, activation clamp). No NVIDIA code is used or paraphrased.

Pieces, in the paper's words:

- Mapping network: z -> normalise by its second moment -> ``mapping_layers`` fully connected layers with
  equalised learning rate (runtime weight = stored weight * lr_mul / sqrt(fan_in), runtime bias = stored bias
  * lr_mul, lr_mul = 0.01) and leaky ReLU(0.2) * sqrt(2). A running mean ``w_avg`` is kept for truncation.
- Synthesis network: a learned constant 4x4 input; per resolution 4, 8, ..., R a block of modulated 3x3
  convolutions (the first one upsamples by 2 except at 4x4); each modulated convolution scales the input
  channels of its weight by a style ``s = A(w)`` (affine, bias initialised to 1), demodulates each output
  channel to unit norm, adds per-pixel noise times a learned strength, then bias, lrelu * sqrt(2) and an
  optional clamp. Each block emits RGB through a modulated 1x1 convolution without demodulation; the RGB
  images are upsampled (FIR [1, 3, 3, 1]) and summed ("skip" architecture).
- Upsampling: transposed 3x3 convolution with stride 2, then the [1, 3, 3, 1] low-pass filter (gain 4);
  RGB skip upsampling: zero insertion then the same filter.

Channels per resolution are ``min(channel_base // res, channel_max)``. Config F (the 1024x1024 FFHQ model)
uses ``channel_base = 32768``; the stylegan2-ada-pytorch presets ``paper256`` (fmaps = 0.5) use 16384 and
``paper512`` / ``paper1024`` / ``stylegan2`` (fmaps = 1) use 32768, with ``channel_base = fmaps * 32768``.
The ada-pytorch training configs clamp activations at 256 (``conv_clamp``); the TF-converted config-F
pickle does not clamp.

Everything is float32 and plain torch (no custom CUDA ops); move with ``.to(device)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from projection.generator_base import Generator

logger = logging.getLogger(__name__)

NOISE_MODES = ("random", "const", "none")
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
DEMOD_EPS = 1e-8
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)


@dataclass(frozen=True)
class StyleGAN2Config:
    """Architecture hyper-parameters of one StyleGAN2 generator."""

    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    resolution: int = 1024
    channel_base: int = 32768
    channel_max: int = 512
    mapping_lr_multiplier: float = 0.01
    conv_clamp: float | None = None
    img_channels: int = field(default=3, repr=False)

    def __post_init__(self) -> None:
        res = self.resolution
        if res < 4 or res & (res - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {res}")
        if min(self.z_dim, self.w_dim, self.mapping_layers, self.channel_base, self.channel_max) < 1:
            raise ValueError(f"dimensions must be positive: {self}")
        if self.img_channels != 3:
            raise ValueError("only RGB generators (img_channels=3) are supported")
        if any(self.channels(r) < 1 for r in self.block_resolutions):
            raise ValueError(f"channel_base {self.channel_base} leaves a block without channels")

    @property
    def block_resolutions(self) -> list[int]:
        """4, 8, ..., resolution."""
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        """Number of w vectors the synthesis network consumes: one per conv layer plus the final toRGB."""
        return 2 * len(self.block_resolutions)

    def channels(self, res: int) -> int:
        """Feature channels of the block at resolution ``res``."""
        return min(self.channel_base // res, self.channel_max)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StyleGAN2Config:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown StyleGAN2Config fields: {sorted(unknown)}")
        return cls(**data)


CONFIGS: dict[str, StyleGAN2Config] = {
    # stylegan2-ada-pytorch "paper256" (fmaps=0.5 -> channel_base 16384), activation clamp 256.
    "ffhq-256": StyleGAN2Config(resolution=256, channel_base=16384, conv_clamp=256.0),
    # stylegan2-ada-pytorch "paper512" (fmaps=1 -> channel_base 32768), activation clamp 256.
    "ffhq-512": StyleGAN2Config(resolution=512, channel_base=32768, conv_clamp=256.0),
    # Config F of the StyleGAN2 paper (the TF release converted to PyTorch): channel_base 32768, no clamp.
    "ffhq-1024": StyleGAN2Config(resolution=1024, channel_base=32768, conv_clamp=None),
    # For tests: channels 4x4: 32, 8x8: 32, 16x16: 16.
    "tiny": StyleGAN2Config(
        z_dim=32, w_dim=32, mapping_layers=2, resolution=16, channel_base=256, channel_max=32
    ),
}


def infer_channel_formula(channels_by_res: dict[int, int]) -> tuple[int, int]:
    """``(channel_base, channel_max)`` reproducing ``channels_by_res`` through ``min(base // res, max)``.

    Raises ``ValueError`` when no such pair exists (the checkpoint is not a standard StyleGAN2 layout).
    """
    if not channels_by_res:
        raise ValueError("no blocks to infer channels from")
    channel_max = max(channels_by_res.values())
    below = sorted((r, c) for r, c in channels_by_res.items() if c < channel_max)
    channel_base = below[0][0] * below[0][1] if below else channel_max * max(channels_by_res)
    for res, ch in channels_by_res.items():
        if min(channel_base // res, channel_max) != ch:
            raise ValueError(f"channels {channels_by_res} do not follow min(base // res, max)")
    return channel_base, channel_max


# --- low-level ops -----------------------------------------------------------------------------------
def fir_kernel(device: torch.device | str | None = None) -> torch.Tensor:
    """The separable [1, 3, 3, 1] low-pass filter as a normalised 2-D kernel ``[4, 4]`` (sums to 1)."""
    taps = torch.tensor(FIR_TAPS, dtype=torch.float32, device=device)
    kernel = torch.outer(taps, taps)  # [4, 4]
    return kernel / kernel.sum()


def fir_filter(
    x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int], gain: float = 1.0
) -> torch.Tensor:
    """Pad every spatial side by ``pad = (before, after)`` and convolve each channel with ``kernel``.

    x: [N, C, H, W]; kernel: [k, k]; result [N, C, H + before + after - k + 1, same for W].
    """
    assert x.ndim == 4 and kernel.ndim == 2, (x.shape, kernel.shape)
    c = x.shape[1]
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    # True convolution = correlation with the flipped kernel (the [1,3,3,1] kernel is symmetric anyway).
    weight = (kernel.flip([0, 1]) * gain).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)  # [C, 1, k, k]
    return F.conv2d(x, weight, groups=c)


def upsample2x(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Zero-insertion upsampling by 2 followed by the low-pass ``kernel`` (gain 4). [N,C,H,W] -> [N,C,2H,2W]."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, h, 2, w, 2)  # [N, C, H, 2, W, 2]
    up[:, :, :, 0, :, 0] = x
    up = up.reshape(n, c, 2 * h, 2 * w)  # samples at even positions, zeros between
    k = kernel.shape[0]
    return fir_filter(up, kernel, pad=((k + 1) // 2, (k - 2) // 2), gain=4.0)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    demodulate: bool,
    upsample_kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample modulated convolution as one grouped convolution (the paper's Sec. 2.2).

    x: [N, Cin, H, W]; weight: [Cout, Cin, k, k] (already scaled); styles: [N, Cin].
    Without ``upsample_kernel``: "same" convolution, result [N, Cout, H, W].
    With it: transposed convolution with stride 2, then the low-pass filter, result [N, Cout, 2H, 2W].
    """
    n, cin, h, w = x.shape
    cout, cin_w, k, _ = weight.shape
    assert cin == cin_w and styles.shape == (n, cin), (x.shape, weight.shape, styles.shape)
    wmod = weight[None] * styles[:, None, :, None, None]  # [N, Cout, Cin, k, k]
    if demodulate:
        dcoefs = torch.rsqrt(wmod.square().sum(dim=[2, 3, 4]) + DEMOD_EPS)  # [N, Cout]
        wmod = wmod * dcoefs[:, :, None, None, None]
    xg = x.reshape(1, n * cin, h, w)  # the batch becomes conv groups
    if upsample_kernel is None:
        out = F.conv2d(xg, wmod.reshape(n * cout, cin, k, k), padding=k // 2, groups=n)  # [1, N*Cout, H, W]
        return out.reshape(n, cout, h, w)
    wt = wmod.transpose(1, 2).reshape(n * cin, cout, k, k)  # [N*Cin, Cout, k, k] for conv_transpose2d
    out = F.conv_transpose2d(xg, wt, stride=2, groups=n)  # [1, N*Cout, 2H + k - 2, 2W + k - 2]
    out = out.reshape(n, cout, *out.shape[2:])
    # Filtering [2H + k - 2] with `taps` taps must give 2H: pad `taps - k + 1` in all, split evenly (k=3: 1, 1).
    total_pad = upsample_kernel.shape[0] - k + 1
    return fir_filter(out, upsample_kernel, pad=((total_pad + 1) // 2, total_pad // 2), gain=4.0)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalised learning rate: runtime ``W * lr_mul / sqrt(in)`` and ``b * lr_mul``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
        activation: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(out_features, in_features, generator=generator) / lr_multiplier
        )
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in] -> [N, out]."""
        out = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        if self.activation:
            out = F.leaky_relu(out, LRELU_SLOPE) * LRELU_GAIN
        return out


class MappingNetwork(nn.Module):
    """z [N, z_dim] -> w [N, w_dim]; keeps ``w_avg`` (the running mean of w used for truncation)."""

    w_avg: torch.Tensor
    w_avg_tracked: torch.Tensor

    def __init__(self, cfg: StyleGAN2Config, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.fcs = nn.ModuleList(
            EqualizedLinear(
                dims[i],
                dims[i + 1],
                lr_multiplier=cfg.mapping_lr_multiplier,
                activation=True,
                generator=generator,
            )
            for i in range(cfg.mapping_layers)
        )
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))
        # True once w_avg holds a real tracked mean (loaded from a trained checkpoint).
        self.register_buffer("w_avg_tracked", torch.tensor(False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, z_dim] -> w: [N, w_dim]."""
        assert z.ndim == 2, z.shape
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # 2nd-moment normalisation
        for fc in self.fcs:
            x = fc(x)
        return x


class ModulatedConvLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling) + noise + bias + lrelu*sqrt(2) (+ clamp)."""

    noise_const: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        w_dim: int,
        resolution: int,
        upsample: bool,
        conv_clamp: float | None,
        kernel_size: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0, generator=generator)
        self.weight = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel_size, kernel_size, generator=generator)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(resolution, resolution, generator=generator))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.resolution = resolution
        self.upsample = upsample
        self.conv_clamp = conv_clamp

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str, fir: torch.Tensor
    ) -> torch.Tensor:
        """x: [N, Cin, r, r] (r = resolution/2 when upsampling), w: [N, w_dim] -> [N, Cout, R, R]."""
        styles = self.affine(w)  # [N, Cin]
        x = modulated_conv2d(
            x,
            self.weight * self.weight_gain,
            styles,
            demodulate=True,
            upsample_kernel=fir if self.upsample else None,
        )  # [N, Cout, R, R]
        assert x.shape[-1] == self.resolution, (x.shape, self.resolution)
        if noise_mode == "random":
            noise = torch.randn(
                x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype
            )
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const[None, None] * self.noise_strength  # [1, 1, R, R] broadcast
        x = F.leaky_relu(x + self.bias[None, :, None, None], LRELU_SLOPE) * LRELU_GAIN
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation, + bias (+ clamp)."""

    def __init__(
        self,
        in_channels: int,
        *,
        w_dim: int,
        conv_clamp: float | None,
        img_channels: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0, generator=generator)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1, generator=generator))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)
        self.conv_clamp = conv_clamp

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x: [N, C, R, R], w: [N, w_dim] -> [N, 3, R, R]."""
        styles = self.affine(w)  # [N, C]
        y = modulated_conv2d(x, self.weight * self.weight_gain, styles, demodulate=False)
        y = y + self.bias[None, :, None, None]
        if self.conv_clamp is not None:
            y = y.clamp(-self.conv_clamp, self.conv_clamp)
        return y


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> images [N, 3, R, R].

    Layer ``k`` of ``layers`` consumes ``ws[:, k]``; ``to_rgbs[b]`` (block ``b``) consumes ``ws[:, 2b + 1]``
    (shared with the next block's first conv, as in the paper's skip architecture).
    """

    fir: torch.Tensor

    def __init__(self, cfg: StyleGAN2Config, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        res = cfg.block_resolutions
        self.const = nn.Parameter(torch.randn(cfg.channels(4), 4, 4, generator=generator))
        layers = [
            ModulatedConvLayer(
                cfg.channels(4),
                cfg.channels(4),
                w_dim=cfg.w_dim,
                resolution=4,
                upsample=False,
                conv_clamp=cfg.conv_clamp,
                generator=generator,
            )
        ]
        for r in res[1:]:
            cin, cout = cfg.channels(r // 2), cfg.channels(r)
            for upsample, c_in in ((True, cin), (False, cout)):
                layers.append(
                    ModulatedConvLayer(
                        c_in,
                        cout,
                        w_dim=cfg.w_dim,
                        resolution=r,
                        upsample=upsample,
                        conv_clamp=cfg.conv_clamp,
                        generator=generator,
                    )
                )
        self.layers = nn.ModuleList(layers)
        self.to_rgbs = nn.ModuleList(
            ToRGBLayer(cfg.channels(r), w_dim=cfg.w_dim, conv_clamp=cfg.conv_clamp, generator=generator)
            for r in res
        )
        self.register_buffer("fir", fir_kernel(), persistent=False)  # [4, 4]

    def forward(self, ws: torch.Tensor, *, noise_mode: str = "const") -> torch.Tensor:
        n = ws.shape[0]
        assert ws.shape[1:] == (self.cfg.num_ws, self.cfg.w_dim), ws.shape
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        x = self.const[None].expand(n, -1, -1, -1)  # [N, C4, 4, 4]
        img: torch.Tensor | None = None
        for b in range(len(self.to_rgbs)):
            if b == 0:
                x = self.layers[0](x, ws[:, 0], noise_mode=noise_mode, fir=self.fir)
            else:
                x = self.layers[2 * b - 1](x, ws[:, 2 * b - 1], noise_mode=noise_mode, fir=self.fir)
                x = self.layers[2 * b](x, ws[:, 2 * b], noise_mode=noise_mode, fir=self.fir)
            y = self.to_rgbs[b](x, ws[:, 2 * b + 1])  # [N, 3, R_b, R_b]
            img = y if img is None else upsample2x(img, self.fir) + y
        assert img is not None
        return img


class StyleGAN2Generator(Generator):
    """A StyleGAN2 generator behind Sleuth's ``Generator`` interface.

    ``synthesize`` takes latents in ``z`` ``[N, z_dim]``, ``w`` ``[N, w_dim]`` or ``w+`` ``[N, num_ws, w_dim]``
    and returns images ``[N, 3, R, R]`` nominally in ``[-1, 1]`` (not clamped, so gradients stay intact).
    ``noise_mode`` defaults to ``"const"`` (the stored per-layer noise maps: deterministic output).
    """

    family = "stylegan2"
    latent_spaces = ("z", "w", "w+")

    def __init__(
        self, config: StyleGAN2Config, *, seed: int | None = None, noise_mode: str = "const"
    ) -> None:
        super().__init__()
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.config = config
        self.resolution = config.resolution
        self.z_dim = config.z_dim
        self.w_dim = config.w_dim
        self.num_ws = config.num_ws
        self.noise_mode = noise_mode
        self.mapping_net: MappingNetwork = MappingNetwork(config, generator=gen)
        self.synthesis_net: SynthesisNetwork = SynthesisNetwork(config, generator=gen)
        # (key, mean w) of the last sample mean; the key changes whenever a mapping weight does.
        self._sample_mean_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_preset(cls, name: str, *, seed: int | None = None) -> StyleGAN2Generator:
        """A randomly initialised generator with one of ``CONFIGS``' architectures."""
        if name not in CONFIGS:
            raise KeyError(f"unknown StyleGAN2 preset {name!r}; known: {sorted(CONFIGS)}")
        return cls(CONFIGS[name], seed=seed)

    @property
    def device(self) -> torch.device:
        return self.synthesis_net.const.device

    @property
    def w_avg_tracked(self) -> bool:
        return bool(self.mapping_net.w_avg_tracked.item())

    def set_w_avg(self, w_avg: torch.Tensor) -> None:
        """Install a tracked mean w (from a trained checkpoint); ``mean_latent("w")`` returns it from now on."""
        assert w_avg.shape == (self.w_dim,), w_avg.shape
        with torch.no_grad():
            self.mapping_net.w_avg.copy_(w_avg)
            self.mapping_net.w_avg_tracked.fill_(True)

    def latent_shape(self, space: str) -> tuple[int, ...]:
        if space == "z":
            return (self.z_dim,)
        if space == "w":
            return (self.w_dim,)
        if space == "w+":
            return (self.num_ws, self.w_dim)
        raise ValueError(f"unknown latent space {space!r}; StyleGAN2 has {self.latent_spaces}")

    def truncate(self, w: torch.Tensor, psi: float) -> torch.Tensor:
        """Truncation trick: ``w_avg + psi * (w - w_avg)``. w: [N, w_dim] or [N, num_ws, w_dim]."""
        if psi == 1.0:
            return w
        center = self.mean_latent("w").to(w.device, w.dtype)  # [w_dim]
        return torch.lerp(center, w, psi)

    def mapping(self, z: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
        """z: [N, z_dim] -> w: [N, w_dim], truncated towards the mean w by ``psi`` (1.0 = no truncation)."""
        assert z.ndim == 2 and z.shape[1] == self.z_dim, z.shape
        return self.truncate(self.mapping_net(z), psi)

    def synthesize(self, latent: torch.Tensor, space: str, *, noise_mode: str | None = None) -> torch.Tensor:
        expected = self.latent_shape(space)
        if latent.ndim != len(expected) + 1 or tuple(latent.shape[1:]) != expected:
            raise ValueError(f"latent for space {space!r} must be [N, {expected}], got {tuple(latent.shape)}")
        if space == "z":
            latent = self.mapping(latent)
            space = "w"
        # w is broadcast to every layer: [N, num_ws, w_dim]
        ws = latent[:, None, :].expand(-1, self.num_ws, -1) if space == "w" else latent
        return self.synthesis_net(ws, noise_mode=noise_mode or self.noise_mode)

    def forward(self, latent: torch.Tensor, space: str = "z") -> torch.Tensor:
        return self.synthesize(latent, space)

    @torch.no_grad()
    def _mapped_samples(self, num_samples: int, seed: int) -> torch.Tensor:
        """w of ``num_samples`` seeded z samples: [num_samples, w_dim]."""
        z = self.sample_z(num_samples, seed=seed, device=self.device)
        return torch.cat([self.mapping_net(chunk) for chunk in z.split(2048)])

    def _sample_mean_w(self, num_samples: int, seed: int) -> torch.Tensor:
        """Mean of mapped samples, cached until a mapping parameter changes (in place or replaced)."""
        params = tuple((p.data_ptr(), p._version) for p in self.mapping_net.parameters())
        key = (num_samples, seed, str(self.device), params)
        if self._sample_mean_cache is None or self._sample_mean_cache[0] != key:
            self._sample_mean_cache = (key, self._mapped_samples(num_samples, seed).mean(dim=0))
        return self._sample_mean_cache[1].clone()

    def mean_latent(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> torch.Tensor:
        """z: zeros. w: the tracked ``w_avg`` if a checkpoint provided it, else the mean of mapped samples.

        w+: that w repeated ``num_ws`` times, shape [num_ws, w_dim].
        """
        if space == "z":
            return torch.zeros(self.z_dim, device=self.device)
        if space not in ("w", "w+"):
            raise ValueError(f"unknown latent space {space!r}")
        tracked = self.w_avg_tracked
        w_mean = (
            self.mapping_net.w_avg.detach().clone() if tracked else self._sample_mean_w(num_samples, seed)
        )
        return w_mean if space == "w" else w_mean[None].repeat(self.num_ws, 1)

    def latent_std(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> float:
        """Per-coordinate standard deviation: 1.0 for z; for w and w+ the RMS deviation of mapped samples.

        (NVIDIA's projector's ``w_std`` is the square root of the total variance: this value * sqrt(w_dim).)
        """
        if space == "z":
            return 1.0
        if space not in ("w", "w+"):
            raise ValueError(f"unknown latent space {space!r}")
        ws = self._mapped_samples(num_samples, seed)  # [S, w_dim]
        return float((ws - ws.mean(dim=0)).square().mean().sqrt())

    def noise_buffers(self) -> list[torch.Tensor]:
        """The per-layer constant noise maps ``[R, R]`` used by ``noise_mode="const"``, lowest resolution first.

        These are the module's own buffers: a projector may set ``requires_grad_(True)`` on them, optimise
        and renormalise them in place.
        """
        return [cast(ModulatedConvLayer, layer).noise_const for layer in self.synthesis_net.layers]
