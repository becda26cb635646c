"""DCGAN generators (Radford et al. 2016) behind Sleuth's ``Generator`` interface, in two checkpoint layouts.

``tutorial`` (the widely used PyTorch DCGAN tutorial checkpoints, state-dict keys ``main.N``): z ``[N, nz, 1, 1]``
-> ConvTranspose2d(nz, 8 ngf, 4, 1, 0) -> BN -> ReLU -> ConvTranspose2d(8 ngf, 4 ngf, 4, 2, 1) -> BN -> ReLU -> ...
-> ConvTranspose2d(ngf, nc, 4, 2, 1) -> Tanh, every convolution without bias. The spatial size doubles at every
stride-2 layer: 4 -> 8 -> ... -> ``resolution``.

``deconv-blocks`` (keys ``generator_deconv.K.M``, e.g. the CelebA DCGAN-32 of fletchersarip93/face-generator):
blocks of (convolution, optional BatchNorm), read off the checkpoint's shapes: a 4x4 transposed convolution from
1x1 (stride 1, padding 0) or doubling the size (stride 2, padding 1), or a 3x3 convolution keeping it (padding 1);
no activation after the first block, LeakyReLU(0.2) after the others, Tanh after the last (the layout's rule; a
checkpoint's tensors cannot say which activation ran, so it is a property of the layout).

z is N(0, I) or, for generators trained that way, U(-1, 1) (``z_distribution``; a checkpoint does not record it:
``sleuth generators add ... --latent-distribution uniform``). The generator always runs in eval mode (BatchNorm
uses its running statistics), so an image depends on its own latent only.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from projection.generator_base import Generator

logger = logging.getLogger(__name__)


LAYOUTS = ("tutorial", "deconv-blocks")
Z_DISTRIBUTIONS = ("normal", "uniform")
_DECONV_KEY = re.compile(
    r"^generator_deconv\.(\d+)\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)


@dataclass(frozen=True)
class BlockSpec:
    """One block of a ``deconv-blocks`` DCGAN: a convolution, optional BatchNorm, then an activation."""

    transposed: bool
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    bias: bool
    batchnorm: bool
    activation: str  # "none", "leaky_relu" (slope 0.2) or "tanh"


@dataclass(frozen=True)
class DCGANConfig:
    """Hyper-parameters of one DCGAN generator: latent size, base width, image channels and resolution, the
    checkpoint layout, the latent distribution and (``deconv-blocks``) the blocks read off the checkpoint."""

    nz: int = 100
    ngf: int = 64
    nc: int = 3
    resolution: int = 64
    layout: str = "tutorial"
    z_distribution: str = "normal"
    blocks: tuple[BlockSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {self.resolution}")
        if self.nc != 3:
            raise ValueError("only RGB generators (nc=3) are supported")
        if self.ngf < 1 or self.nz < 1:
            raise ValueError(f"nz and ngf must be positive: {self}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.z_distribution not in Z_DISTRIBUTIONS:
            raise ValueError(f"z_distribution must be one of {Z_DISTRIBUTIONS}, got {self.z_distribution!r}")
        if (self.layout == "deconv-blocks") != bool(self.blocks):
            raise ValueError("blocks are given for (and only for) the deconv-blocks layout")

    @property
    def num_upsamplings(self) -> int:
        """Stride-2 transposed convolutions after the first 1x1 -> 4x4 layer."""
        return int(math.log2(self.resolution)) - 2

    def widths(self) -> list[int]:
        """Feature channels after each hidden layer: ngf * 2**(k-1), ..., ngf (8, 4, 2, 1 x ngf at 64x64)."""
        n = self.num_upsamplings
        return [self.ngf * 2 ** (n - 1 - i) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DCGANConfig:
        blocks = tuple(BlockSpec(**b) for b in doc.get("blocks") or ())
        return cls(**{**doc, "blocks": blocks})


CONFIGS: dict[str, DCGANConfig] = {
    "digiface-64": DCGANConfig(),
    # For tests: 4 -> 8 -> 16, channels 16, 8.
    "tiny": DCGANConfig(nz=16, ngf=8, nc=3, resolution=16),
}


def _build_layers(cfg: DCGANConfig) -> nn.Sequential:
    widths = cfg.widths()
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(cfg.nz, widths[0], 4, 1, 0, bias=False),  # [N, nz, 1, 1] -> [N, w0, 4, 4]
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(True),
    ]
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
    layers += [nn.ConvTranspose2d(widths[-1], cfg.nc, 4, 2, 1, bias=False), nn.Tanh()]  # -> [N, nc, R, R]
    return nn.Sequential(*layers)


def _build_blocks(blocks: tuple[BlockSpec, ...]) -> nn.Sequential:
    """``generator_deconv``: one ``Sequential(conv, [BatchNorm], [activation])`` per block (checkpoint key order)."""
    out: list[nn.Module] = []
    for b in blocks:
        conv_type = nn.ConvTranspose2d if b.transposed else nn.Conv2d
        layers: list[nn.Module] = [conv_type(b.cin, b.cout, b.kernel, b.stride, b.padding, bias=b.bias)]
        if b.batchnorm:
            layers.append(nn.BatchNorm2d(b.cout))
        if b.activation == "leaky_relu":
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        elif b.activation == "tanh":
            layers.append(nn.Tanh())
        out.append(nn.Sequential(*layers))
    return nn.Sequential(*out)


def deconv_blocks_from_state_dict(sd: dict[str, torch.Tensor]) -> tuple[BlockSpec, ...]:
    """The blocks of a ``generator_deconv.K.M`` checkpoint, read off its weight shapes (see the module note).

    A 4-D weight is a transposed convolution when its first axis continues the channel chain (``[Cin, Cout, k,
    k]``) and a convolution when its second does (``[Cout, Cin, k, k]``)."""
    indices = sorted({int(m.group(1)) for k in sd if (m := _DECONV_KEY.match(k))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"not a deconv-blocks DCGAN: block indices {indices}")
    blocks: list[BlockSpec] = []
    channels: int | None = None
    size = 1
    for i in indices:
        weight = sd.get(f"generator_deconv.{i}.0.weight")
        if weight is None or weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"block {i} has no square 4-D convolution weight")
        a, b, k = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[2])
        transposed = channels is None or a == channels
        cin, cout = (a, b) if transposed else (b, a)
        if channels is not None and cin != channels:
            raise ValueError(f"block {i}: {cin} input channels after a block with {channels}")
        if transposed and k == 4:
            stride, padding = (1, 0) if size == 1 else (2, 1)
        elif not transposed and k == 3:
            stride, padding = 1, 1
        else:
            raise ValueError(
                f"block {i}: unsupported {'transposed ' if transposed else ''}convolution {k}x{k}"
            )
        size = (size - 1) * stride - 2 * padding + k if transposed else size
        last = i == indices[-1]
        blocks.append(
            BlockSpec(
                transposed=transposed, cin=cin, cout=cout, kernel=k, stride=stride, padding=padding,
                bias=f"generator_deconv.{i}.0.bias" in sd, batchnorm=f"generator_deconv.{i}.1.weight" in sd,
                activation="tanh" if last else ("none" if i == 0 else "leaky_relu"),
            )
        )  # fmt: skip
        channels = cout
    return tuple(blocks)


class DCGANGenerator(Generator):
    """A DCGAN generator; its only latent space is ``z`` of shape ``[nz, 1, 1]``."""

    family = "dcgan"
    latent_spaces = ("z",)

    def __init__(self, config: DCGANConfig | None = None, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config or DCGANConfig()
        self.resolution = self.config.resolution
        self.z_dim = self.config.nz
        if self.config.layout == "deconv-blocks":
            if seed is not None:
                raise ValueError("seeded random initialisation is for the tutorial layout only")
            self.generator_deconv = _build_blocks(self.config.blocks)
        elif seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.main = _build_layers(self.config)
                self._randomise_batchnorm()
        else:
            self.main = _build_layers(self.config)
        self.eval()

    def _randomise_batchnorm(self) -> None:
        """DCGAN initialisation (conv ~ N(0, 0.02), BN scale ~ N(1, 0.02)), BN running statistics measured on
        512 latents and an output layer scaled to use the [-1, 1] range: well-scaled, latent-dependent images.
        """
        for module in self.main:
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)
                module.momentum = None  # cumulative average over the calibration batch
                module.training = True
        with torch.no_grad():
            self.main(torch.randn(512, self.z_dim, 1, 1))
            for module in self.main:
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = 0.1
                    module.training = False
            # Rescale the output layer so the pre-tanh values have std 0.8 (images use the [-1, 1] range).
            body = cast(nn.Sequential, self.main[:-1])
            pre_tanh = body(torch.randn(256, self.z_dim, 1, 1))  # [256, 3, R, R]
            cast(nn.ConvTranspose2d, self.main[-2]).weight.mul_(0.8 / pre_tanh.std())

    def train(self, mode: bool = True) -> DCGANGenerator:
        """Always eval: BatchNorm must use running statistics so images do not depend on the batch."""
        return super().train(False)

    @classmethod
    def from_preset(cls, name: str, *, seed: int | None = None) -> DCGANGenerator:
        if name not in CONFIGS:
            raise KeyError(f"unknown DCGAN preset {name!r}; known: {sorted(CONFIGS)}")
        return cls(CONFIGS[name], seed=seed)

    @staticmethod
    def config_from_state_dict(sd: dict[str, torch.Tensor], *, z_distribution: str = "normal") -> DCGANConfig:
        """The config read off the weight shapes: ``deconv-blocks`` for ``generator_deconv.*`` keys, else the
        tutorial layout (nz, ngf, nc and resolution from the ConvTranspose2d weights ``[Cin, Cout, 4, 4]``)."""
        if any(_DECONV_KEY.match(k) for k in sd):
            blocks = deconv_blocks_from_state_dict(sd)
            size = 1
            for b in blocks:
                size = (size - 1) * b.stride - 2 * b.padding + b.kernel if b.transposed else size
            return DCGANConfig(
                nz=blocks[0].cin, ngf=blocks[-1].cin, nc=blocks[-1].cout, resolution=size,
                layout="deconv-blocks", z_distribution=z_distribution, blocks=blocks,
            )  # fmt: skip
        conv_keys = sorted(
            (k for k in sd if k.startswith("main.") and k.endswith(".weight") and sd[k].ndim == 4),
            key=lambda k: int(k.split(".")[1]),
        )
        if len(conv_keys) < 3:
            raise ValueError(f"not a DCGAN generator state dict (conv weights: {conv_keys})")
        first, last = sd[conv_keys[0]], sd[conv_keys[-1]]
        nz, nc, ngf = int(first.shape[0]), int(last.shape[1]), int(last.shape[0])
        resolution = 4 * 2 ** (len(conv_keys) - 1)
        cfg = DCGANConfig(nz=nz, ngf=ngf, nc=nc, resolution=resolution, z_distribution=z_distribution)
        expected = [f"main.{3 * i}.weight" for i in range(len(conv_keys))]
        if conv_keys != expected:
            raise ValueError(f"DCGAN conv layers must be {expected}, got {conv_keys}")
        return cfg

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], *, z_distribution: str = "normal"
    ) -> DCGANGenerator:
        """A generator with the weights of ``sd`` (either layout; architecture inferred from shapes)."""
        cfg = cls.config_from_state_dict(sd, z_distribution=z_distribution)
        gen = cls(cfg)
        missing, unexpected = gen.load_state_dict(sd, strict=False)
        # num_batches_tracked is bookkeeping of training only; everything else must match exactly.
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"DCGAN state dict mismatch: missing {missing}, unexpected {unexpected}")
        logger.debug("DCGAN loaded: %s", cfg)
        return gen

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latent_shape(self, space: str) -> tuple[int, ...]:
        if space != "z":
            raise ValueError(f"unknown latent space {space!r}; DCGAN has only 'z'")
        return (self.z_dim, 1, 1)

    def synthesize(self, latent: torch.Tensor, space: str = "z") -> torch.Tensor:
        """z ``[N, nz, 1, 1]`` (or ``[N, nz]``) -> images ``[N, 3, R, R]`` in ``[-1, 1]``."""
        if space != "z":
            raise ValueError(f"unknown latent space {space!r}; DCGAN has only 'z'")
        if latent.ndim == 2:
            latent = latent[:, :, None, None]  # [N, nz] -> [N, nz, 1, 1]
        if tuple(latent.shape[1:]) != self.latent_shape("z"):
            raise ValueError(f"latent must be [N, {self.z_dim}, 1, 1], got {tuple(latent.shape)}")
        if self.config.layout == "deconv-blocks":
            return self.generator_deconv(latent)
        return self.main(latent)

    def forward(self, latent: torch.Tensor, space: str = "z") -> torch.Tensor:
        return self.synthesize(latent, space)

    def mean_latent(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> torch.Tensor:
        """The zero vector ``[nz, 1, 1]`` (the mode of N(0, I), the centre of U(-1, 1))."""
        return torch.zeros(self.latent_shape(space), device=self.device)

    def latent_std(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> float:
        """Per-coordinate standard deviation of z: 1 for N(0, I), 1/sqrt(3) for U(-1, 1)."""
        self.latent_shape(space)
        return 1.0 if self.config.z_distribution == "normal" else 1.0 / math.sqrt(3.0)

    def sample_z(self, n: int, *, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` latents from the generator's z distribution, reproducible from ``seed``."""
        if self.config.z_distribution == "normal":
            return super().sample_z(n, seed=seed, device=device)
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand((n, *self.latent_shape("z")), generator=gen) * 2 - 1).to(device)

    def constrain_(self, latent: torch.Tensor, space: str) -> None:
        """Keep a projected z inside the support of its distribution (U(-1, 1): clamp), in place."""
        if self.config.z_distribution == "uniform":
            latent.clamp_(-1.0, 1.0)
