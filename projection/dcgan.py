"""The standard DCGAN generator (Radford et al. 2016) behind Sleuth's ``Generator`` interface.

Architecture (the layout of the widely used PyTorch DCGAN tutorial checkpoints, state-dict keys ``main.N``):
z ``[N, nz, 1, 1]`` -> ConvTranspose2d(nz, 8 ngf, 4, 1, 0) -> BN -> ReLU -> ConvTranspose2d(8 ngf, 4 ngf, 4, 2, 1)
-> BN -> ReLU -> ... -> ConvTranspose2d(ngf, nc, 4, 2, 1) -> Tanh, every convolution without bias. The spatial
size doubles at every stride-2 layer: 4 -> 8 -> ... -> ``resolution``. The generator always runs in eval mode
(BatchNorm uses its running statistics), so an image depends on its own latent only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from projection.generator_base import Generator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DCGANConfig:
    """Hyper-parameters of one DCGAN generator: latent size, base width, image channels and resolution."""

    nz: int = 100
    ngf: int = 64
    nc: int = 3
    resolution: int = 64

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {self.resolution}")
        if self.nc != 3:
            raise ValueError("only RGB generators (nc=3) are supported")
        if self.ngf < 1 or self.nz < 1:
            raise ValueError(f"nz and ngf must be positive: {self}")

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


class DCGANGenerator(Generator):
    """A DCGAN generator; its only latent space is ``z`` of shape ``[nz, 1, 1]``."""

    family = "dcgan"
    latent_spaces = ("z",)

    def __init__(self, config: DCGANConfig | None = None, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config or DCGANConfig()
        self.resolution = self.config.resolution
        self.z_dim = self.config.nz
        if seed is not None:
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
    def config_from_state_dict(sd: dict[str, torch.Tensor]) -> DCGANConfig:
        """nz, ngf, nc and resolution read off the ConvTranspose2d weight shapes ``[Cin, Cout, 4, 4]``."""
        conv_keys = sorted(
            (k for k in sd if k.startswith("main.") and k.endswith(".weight") and sd[k].ndim == 4),
            key=lambda k: int(k.split(".")[1]),
        )
        if len(conv_keys) < 3:
            raise ValueError(f"not a DCGAN generator state dict (conv weights: {conv_keys})")
        first, last = sd[conv_keys[0]], sd[conv_keys[-1]]
        nz, nc, ngf = int(first.shape[0]), int(last.shape[1]), int(last.shape[0])
        resolution = 4 * 2 ** (len(conv_keys) - 1)
        cfg = DCGANConfig(nz=nz, ngf=ngf, nc=nc, resolution=resolution)
        expected = [f"main.{3 * i}.weight" for i in range(len(conv_keys))]
        if conv_keys != expected:
            raise ValueError(f"DCGAN conv layers must be {expected}, got {conv_keys}")
        return cfg

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> DCGANGenerator:
        """A generator with the weights of ``sd`` (keys ``main.N.*``; architecture inferred from shapes)."""
        cfg = cls.config_from_state_dict(sd)
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
        return self.main(latent)

    def forward(self, latent: torch.Tensor, space: str = "z") -> torch.Tensor:
        return self.synthesize(latent, space)

    def mean_latent(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> torch.Tensor:
        """The zero vector ``[nz, 1, 1]`` (the mode of z ~ N(0, I))."""
        return torch.zeros(self.latent_shape(space), device=self.device)

    def latent_std(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> float:
        """Per-coordinate standard deviation of z ~ N(0, I): 1."""
        self.latent_shape(space)
        return 1.0
