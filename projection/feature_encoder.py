"""A latent encoder made of frozen ImageNet features and a ridge regression: a start that needs few samples.

Drawing samples is most of the cost of an encoder for a large generator (MobileStyleGAN-FFHQ: about a second per
1024 px image on a CPU core), and a convolutional encoder trained from scratch needs tens of thousands of them. A
network pretrained on ImageNet already describes pose, shape and colour: here the VGG16 convolutions of the LPIPS
backbone file (``SLEUTH_LPIPS_WEIGHTS`` or ``--backbone``, the same ImageNet weights LPIPS uses) are kept frozen,
their activations pooled into one vector per image (per-channel mean and standard deviation of relu3_3, relu4_3
and relu5_3, plus relu5_3 averaged over a 2x2 grid for the layout), and a ridge regression maps the standardised
vector to the standardised latent, fitted in closed form with its penalty chosen on an inner split of the
training samples (Hoerl & Kennard 1970). It predicts the same thing as ``LatentEncoder`` (``forward(images)`` ->
latent) and is stored the same way (safetensors, its backbone included, nothing executed on load).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from indexer.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

TAPS = (15, 22, 29)  # indices of relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
CHANNELS = (256, 512, 512)
FEATURE_DIM = 2 * sum(CHANNELS) + 4 * CHANNELS[-1]  # mean + std per channel, relu5_3 on a 2x2 grid
PENALTIES = (1.0, 10.0, 100.0, 1000.0, 10_000.0)  # ridge penalties tried, times the number of features / 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (no weights loaded, nothing downloaded)."""
    from torchvision.models import vgg16

    return vgg16(weights=None).features[: TAPS[-1] + 1]


class FeatureEncoder(nn.Module):
    """Image ``[N, 3, R, R]`` in [-1, 1] -> latent ``[N, latent_dim]`` through frozen VGG16 features + ridge."""

    latent_mean: torch.Tensor  # [latent_dim]
    latent_scale: torch.Tensor  # []
    pixel_mean: torch.Tensor  # [1, 3, 1, 1]: ImageNet normalisation
    pixel_std: torch.Tensor
    feature_mean: torch.Tensor  # [FEATURE_DIM]
    feature_std: torch.Tensor  # [FEATURE_DIM]
    ridge_weight: torch.Tensor  # [FEATURE_DIM, latent_dim]
    ridge_bias: torch.Tensor  # [latent_dim]

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config
        latent_dim = int(getattr(config, "latent_dim"))  # noqa: B009 - an EncoderConfig (no import cycle)
        self.backbone = _vgg16_features().requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None])
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD)[None, :, None, None])
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))
        self.register_buffer("ridge_weight", torch.zeros(FEATURE_DIM, latent_dim))
        self.register_buffer("ridge_bias", torch.zeros(latent_dim))
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_scale", torch.ones(()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled VGG16 activations ``[N, FEATURE_DIM]`` of images in [-1, 1]."""
        size = int(getattr(self.config, "resolution"))  # noqa: B009
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="area")
        x = ((images + 1) / 2 - self.pixel_mean) / self.pixel_std
        pooled = []
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i in TAPS:  # [N, C, h, w]
                pooled += [x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)]
        pooled.append(F.adaptive_avg_pool2d(x, 2).flatten(1))  # relu5_3 on a 2x2 grid
        return torch.cat(pooled, dim=1)

    def forward_standardised(self, images: torch.Tensor) -> torch.Tensor:
        z = (self.features(images) - self.feature_mean) / self.feature_std
        return z @ self.ridge_weight + self.ridge_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent_mean + self.latent_scale * self.forward_standardised(images)


def load_backbone_(encoder: FeatureEncoder, path: Path) -> None:
    """Copy VGG16 conv weights from an LPIPS backbone file (keys ``features.N.weight|bias``) into ``encoder``."""
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read the backbone weights {path}: {exc}") from exc
    wanted = {k: v for k, v in encoder.backbone.state_dict().items()}
    found = {k.removeprefix("features."): v for k, v in tensors.items() if k.startswith("features.")}
    missing = [k for k in wanted if k not in found or found[k].shape != wanted[k].shape]
    if missing:
        raise ModelUnavailableError(
            f"{path} is not a VGG16 backbone (an LPIPS VGG file: lpips-vgg16.safetensors); missing or other "
            f"shapes: {missing[:3]}"
        )
    encoder.backbone.load_state_dict({k: found[k] for k in wanted})


def fit_ridge_(
    encoder: FeatureEncoder, pixels: torch.Tensor, targets: torch.Tensor, *, batch: int = 64
) -> dict[str, float]:
    """Fit ``encoder``'s ridge regression: pixels ``[N, 3, r, r]`` uint8, standardised latents ``[N, D]``.

    The penalty is the one of ``PENALTIES`` with the lowest error on the last tenth of the samples; the final fit
    uses all of them. Returns the inner-split errors (relative to predicting the mean) per penalty."""
    with torch.no_grad():
        feats = torch.cat(
            [
                encoder.features(pixels[lo : lo + batch].float() / 127.5 - 1.0)
                for lo in range(0, len(pixels), batch)
            ]
        ).double()  # [N, FEATURE_DIM]
    mean, std = feats.mean(dim=0), feats.std(dim=0).clamp_min(1e-6)
    x, y = (feats - mean) / std, targets.double()
    n_fit = max(1, int(len(x) * 0.9))

    def solve(xs: torch.Tensor, ys: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
        y_mean = ys.mean(dim=0)
        gram = xs.T @ xs + penalty * torch.eye(xs.shape[1], dtype=xs.dtype)
        return torch.linalg.solve(gram, xs.T @ (ys - y_mean)), y_mean

    scores: dict[str, float] = {}
    scale = FEATURE_DIM / 1000.0
    for p in PENALTIES:
        w, b = solve(x[:n_fit], y[:n_fit], p * scale)
        err = ((x[n_fit:] @ w + b) - y[n_fit:]).square().mean()
        base = (y[n_fit:] - y[:n_fit].mean(dim=0)).square().mean()
        scores[str(p)] = float(err / base.clamp_min(1e-12))
    best = min(PENALTIES, key=lambda p: scores[str(p)])
    w, b = solve(x, y, best * scale)
    encoder.feature_mean.copy_(mean.float())
    encoder.feature_std.copy_(std.float())
    encoder.ridge_weight.copy_(w.float())
    encoder.ridge_bias.copy_(b.float())
    logger.info("feature encoder: ridge penalty %g (inner-split relative errors %s)", best, scores)
    return {"penalty": best, **{f"inner_error_{k}": v for k, v in scores.items()}}
