"""The ``Generator`` interface every generator family (StyleGAN2, DCGAN) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Generator(nn.Module, ABC):
    """A pretrained image generator seen as a function from a latent space to images.

    Images are float tensors ``[N, 3, R, R]`` in ``[-1, 1]`` (R = ``resolution``), RGB.
    ``latent_spaces`` names the spaces ``synthesize`` accepts: ``"z"`` always; StyleGAN-family
    generators also accept ``"w"`` (``[N, w_dim]``) and ``"w+"`` (``[N, num_ws, w_dim]``).
    """

    family: str = ""
    resolution: int
    z_dim: int
    latent_spaces: tuple[str, ...] = ("z",)
    # > 0 where ``synthesize_preview`` gives the image at this lower resolution for less work (see there)
    preview_resolution: int = 0

    @abstractmethod
    def latent_shape(self, space: str) -> tuple[int, ...]:
        """Shape of one latent (without the batch axis) in ``space``."""

    @abstractmethod
    def synthesize(self, latent: torch.Tensor, space: str) -> torch.Tensor:
        """Images ``[N, 3, R, R]`` in ``[-1, 1]`` from latents ``[N, *latent_shape(space)]``."""

    @abstractmethod
    def mean_latent(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> torch.Tensor:
        """The start point of projection in ``space``, shape ``latent_shape(space)``.

        For z spaces this is the zero vector (the mode of N(0, I)); for w it is the mean of mapped samples.
        """

    def latent_std(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> float:
        """Scalar spread of latents in ``space`` (used to scale the projector's step and noise)."""
        return 1.0

    def synthesize_preview(self, latent: torch.Tensor, space: str) -> torch.Tensor:
        """The image area-downsampled to ``preview_resolution`` ``[N, 3, P, P]``, computed without the work of the
        last upsampling stage, where the generator has such an exact read-out (measured when it was registered);
        otherwise ``synthesize``'s full image. The projector optimises against it when the comparison resolution
        is at most ``preview_resolution``."""
        return self.synthesize(latent, space)

    def constrain_(self, latent: torch.Tensor, space: str) -> None:
        """Bring a latent being optimised back into the space's support, in place (default: unbounded)."""

    def sample_z(self, n: int, *, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` latents from N(0, I) in z, reproducible from ``seed`` (CPU generator, then moved)."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((n, *self.latent_shape("z")), generator=gen).to(device)
