"""A learned start for projection: an encoder trained on a generator's own samples to predict their latents.

Optimisation-based inversion finds the right latent only from a start inside its basin; from the mean latent a
short run can settle in a wrong one (on the real DCGAN, 4 of 10 generated faces stayed at VGG-LPIPS 0.22-0.41
after 200 steps, where 1000 steps reach 0.03-0.14). The hybrid of Zhu et al. 2016 ("Generative Visual
Manipulation on the Natural Image Manifold", sec. 3.2) fixes this: train a feed-forward encoder on pairs
(G(latent), latent), use its prediction as the start, refine by optimisation. The encoder is trained once per
generator (``sleuth generators train-encoder``) on images the generator makes, perturbed as shared images are
(JPEG and resize round trips, see ``calibration.perturb``), and stored as safetensors with its SHA-256 in the
registry. A real photo has no latent to find: its prediction is just one more start, and it still does not
reproject.

Architecture: the DCGAN discriminator's shape (Radford et al. 2016): stride-2 4x4 convolutions from the
generator's resolution (at most ``MAX_INPUT`` = 128 px; larger images are area-downsampled) down to 4x4
(BatchNorm after all but the first, LeakyReLU 0.2), widths ``width * 2**k`` capped at ``max_width``, then one
linear layer to the latent. It predicts the latent standardised by the training latents' per-coordinate mean and
overall standard deviation (stored with it); the loss is their MSE.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from indexer.errors import ModelUnavailableError
from projection.generator_base import Generator

logger = logging.getLogger(__name__)

FORMAT = "sleuth-latent-encoder-v1"
ENCODER_KINDS = ("cnn", "features")
MAX_INPUT = 128  # larger generators' images are area-downsampled to this for the encoder (memory, speed)


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of an encoder: input resolution, predicted latent space and size, channel widths."""

    resolution: int
    space: str
    latent_dim: int
    width: int = 32
    max_width: int = 256
    kind: str = "cnn"  # "cnn" (trained from scratch) or "features" (frozen VGG16 + ridge, feature_encoder.py)

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {self.resolution}")
        if self.space not in ("z", "w"):
            raise ValueError(f"an encoder predicts z or w, not {self.space!r}")
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"encoder kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        if self.latent_dim < 1 or self.width < 1 or self.max_width < self.width:
            raise ValueError(f"invalid encoder config {self}")

    def widths(self) -> list[int]:
        """Output channels of each stride-2 block, from ``resolution`` down to 4x4."""
        blocks = int(math.log2(self.resolution)) - 2
        return [min(self.width * 2**k, self.max_width) for k in range(blocks)]


@dataclass(frozen=True)
class TrainingConfig:
    """How an encoder is trained: samples drawn from the generator, passes over them, batch, seed."""

    samples: int = 20_000
    epochs: int = 8
    batch: int = 128
    lr: float = 2e-3
    seed: int = 0
    holdout: int = 500  # samples kept out of training to report the encoder's accuracy
    perturb_fraction: float = 0.8  # share of samples sent through a JPEG + resize round trip
    jpeg_quality: tuple[int, int] = (60, 95)
    scale: tuple[float, float] = (0.5, 1.0)
    kind: str = "cnn"  # see EncoderConfig.kind; "features" needs ``backbone``
    backbone: str | None = None  # the VGG16 LPIPS weights file the features encoder is built on

    def __post_init__(self) -> None:
        if self.samples < 2 * self.batch or self.holdout < 1 or self.holdout >= self.samples:
            raise ValueError(
                f"samples ({self.samples}) must be at least two batches ({self.batch}) and more than the holdout"
            )
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")


class LatentEncoder(nn.Module):
    """Image ``[N, 3, R, R]`` in [-1, 1] -> latent ``[N, latent_dim]`` of the generator's ``config.space``."""

    latent_mean: (
        torch.Tensor
    )  # [latent_dim] buffers: prediction = latent_mean + latent_scale * network output
    latent_scale: torch.Tensor  # []

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = 3
        for k, cout in enumerate(config.widths()):
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=k == 0))
            if k > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)  # -> [N, cin, 4, 4]
        self.head = nn.Linear(cin * 16, config.latent_dim)
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_scale", torch.ones(()))

    def forward_standardised(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.config.resolution:  # a larger generator's images: area-downsampled
            images = F.interpolate(images, size=(self.config.resolution,) * 2, mode="area")
        return self.head(self.features(images).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent_mean + self.latent_scale * self.forward_standardised(images)


@dataclass
class EncoderReport:
    """What training showed, measured on held-out samples (perturbed like the training ones)."""

    samples: int
    epochs: int
    holdout: int
    holdout_cosine: float  # mean cosine between predicted and true latents
    holdout_relative_mse: float  # MSE of the prediction / variance of the latents (1.0 = the mean latent)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generator_samples(
    generator: Generator,
    space: str,
    training: TrainingConfig,
    *,
    chunk: int = 256,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``training.samples`` images (uint8 ``[N, 3, r, r]``, r = min(R, MAX_INPUT), most perturbed) and their latents
    ``[N, D]``. Generators larger than ``MAX_INPUT`` are rendered through their exact preview read-out when they
    have one (the image is reduced to ``MAX_INPUT`` anyway). ``progress("sampling", done, total)`` after each
    chunk."""
    from projection.calibration import perturb
    from projection.images import to_image
    from projection.projector import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    device = next(generator.parameters()).device
    rng = random.Random(training.seed)
    z = generator.sample_z(training.samples, seed=training.seed, device=device)
    render = generator.synthesize_preview if generator.resolution > MAX_INPUT else generator.synthesize
    chunk = max(1, min(chunk, 2**22 // max(generator.preview_resolution or generator.resolution, 1) ** 2))
    images, latents = [], []
    with torch.no_grad():
        for lo in range(0, training.samples, chunk):
            zc = z[lo : lo + chunk]
            lat = zc if space == "z" else generator.mapping(zc)  # type: ignore[operator]
            for t in render(lat, space):  # [3, P, P]
                im = to_image(t)
                if im.width > MAX_INPUT:  # reduce first: the perturbation then acts at the encoder's size
                    im = im.resize((MAX_INPUT, MAX_INPUT), Image.Resampling.BOX)
                if rng.random() < training.perturb_fraction:
                    im = perturb(
                        im,
                        jpeg_quality=rng.randint(*training.jpeg_quality),
                        scale=rng.uniform(*training.scale),
                    )
                images.append(np.asarray(im))
            latents.append(lat.flatten(1).cpu())
            if progress:
                progress("sampling", min(lo + chunk, training.samples), training.samples)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [N, 3, r, r] uint8
    return pixels, torch.cat(latents).float()


def _as_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    return pixels.to(device).float() / 127.5 - 1.0


def train_encoder(
    generator: Generator,
    space: str,
    training: TrainingConfig | None = None,
    *,
    width: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    sample_cache: Path | None = None,
    cache_key: str = "",
) -> tuple[LatentEncoder, EncoderReport]:
    """Train an encoder for ``generator``'s ``space`` (``z`` or ``w``) on its own samples; deterministic on the
    CPU for a given seed. ``progress(phase, done, total)`` reports sampling and each epoch. ``sample_cache``: a
    file that keeps the drawn samples (for ``cache_key``, e.g. the generator's weight hash), so training again
    with other epochs does not draw them again (drawing is most of the time for a large generator)."""
    training = training or TrainingConfig()
    device = torch.device(device)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(training.seed)
        samples = _cached_samples(generator, space, training, progress, sample_cache, cache_key)
        return _train(generator, space, training, width, device, progress, started, samples)


def _cached_samples(
    generator: Generator,
    space: str,
    training: TrainingConfig,
    progress: Callable[[str, int, int], None] | None,
    cache: Path | None,
    cache_key: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``generator_samples``, read from / written to ``cache`` (safetensors) when one is given."""
    what = json.dumps({"key": cache_key, "space": space, "samples": training.samples, "seed": training.seed,
                       "perturb_fraction": training.perturb_fraction, "jpeg_quality": training.jpeg_quality,
                       "scale": training.scale, "max_input": MAX_INPUT}, sort_keys=True)  # fmt: skip
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as fh:
            if (fh.metadata() or {}).get("samples") == what:
                logger.info("encoder samples read from %s", cache)
                return fh.get_tensor("pixels"), fh.get_tensor("latents")
    if progress:
        progress("sampling", 0, training.samples)
    pixels, latents = generator_samples(generator, space, training, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(cache.suffix + ".tmp")
        save_file({"pixels": pixels, "latents": latents}, str(tmp), metadata={"samples": what})
        tmp.replace(cache)
    return pixels, latents


def _train(
    generator: Generator,
    space: str,
    training: TrainingConfig,
    width: int,
    device: torch.device,
    progress: Callable[[str, int, int], None] | None,
    started: float,
    samples: tuple[torch.Tensor, torch.Tensor],
) -> tuple[LatentEncoder, EncoderReport]:
    pixels, latents = samples
    kind = training.kind
    config = EncoderConfig(
        min(generator.resolution, MAX_INPUT), space, latents.shape[1], width=width, kind=kind
    )
    train_latents = latents[training.holdout :]
    mean = train_latents.mean(dim=0)
    scale = (train_latents - mean).square().mean().sqrt().clamp_min(1e-8)
    targets = ((latents - mean) / scale).to(device)
    if kind == "features":
        return _fit_features(config, training, pixels, latents, targets, mean, scale, started, progress)
    encoder = LatentEncoder(config).to(device)
    encoder.latent_mean.copy_(mean)
    encoder.latent_scale.copy_(scale)
    n_train = training.samples - training.holdout
    steps_per_epoch = n_train // training.batch
    opt = torch.optim.Adam(encoder.parameters(), lr=training.lr / 2, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=training.lr, total_steps=training.epochs * steps_per_epoch
    )
    order = torch.Generator().manual_seed(training.seed)
    for epoch in range(training.epochs):
        encoder.train()
        perm = torch.randperm(n_train, generator=order) + training.holdout
        for s in range(steps_per_epoch):
            idx = perm[s * training.batch : (s + 1) * training.batch]
            loss = F.mse_loss(encoder.forward_standardised(_as_input(pixels[idx], device)), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress("epoch", epoch + 1, training.epochs)
        logger.info(
            "encoder epoch %d/%d: training loss %.4f", epoch + 1, training.epochs, float(loss.detach())
        )
    encoder.eval()
    cosine, rel_mse = evaluate_encoder(encoder, pixels[: training.holdout], latents[: training.holdout])
    report = EncoderReport(
        samples=training.samples,
        epochs=training.epochs,
        holdout=training.holdout,
        holdout_cosine=cosine,
        holdout_relative_mse=rel_mse,
        seconds=time.perf_counter() - started,
    )
    return encoder.requires_grad_(False), report


def _fit_features(
    config: EncoderConfig,
    training: TrainingConfig,
    pixels: torch.Tensor,
    latents: torch.Tensor,
    targets: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    started: float,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[Any, EncoderReport]:
    """The features encoder (``projection.feature_encoder``): frozen VGG16 + a ridge fit on the training samples."""
    from projection.feature_encoder import FeatureEncoder, fit_ridge_, load_backbone_

    if not training.backbone:
        raise ModelUnavailableError(
            "the features encoder needs the VGG16 LPIPS backbone file (lpips-vgg16.safetensors): "
            "set SLEUTH_LPIPS_WEIGHTS to it or pass --backbone"
        )
    encoder = FeatureEncoder(config)
    load_backbone_(encoder, Path(training.backbone))
    encoder.latent_mean.copy_(mean)
    encoder.latent_scale.copy_(scale)
    if progress:
        progress("epoch", 0, 1)
    fit_ridge_(encoder, pixels[training.holdout :], targets[training.holdout :].cpu())
    if progress:
        progress("epoch", 1, 1)
    encoder.eval()
    cosine, rel_mse = evaluate_encoder(encoder, pixels[: training.holdout], latents[: training.holdout])
    report = EncoderReport(
        samples=training.samples, epochs=1, holdout=training.holdout, holdout_cosine=cosine,
        holdout_relative_mse=rel_mse, seconds=time.perf_counter() - started,
    )  # fmt: skip
    return encoder.requires_grad_(False), report


def evaluate_encoder(encoder: Any, pixels: torch.Tensor, latents: torch.Tensor) -> tuple[float, float]:
    """Mean cosine and MSE relative to the latents' variance of the predictions for ``pixels`` (uint8)."""
    device = encoder.latent_mean.device
    with torch.no_grad():
        pred = torch.cat(
            [encoder(_as_input(pixels[lo : lo + 256], device)).cpu() for lo in range(0, len(pixels), 256)]
        )
    cosine = float(F.cosine_similarity(pred, latents, dim=1).mean())
    variance = float((latents - latents.mean(dim=0)).square().mean())
    return cosine, float((pred - latents).square().mean()) / max(variance, 1e-12)


def predict_starts(encoder: Any, targets: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Start latents ``[B, *latent_shape]`` for targets ``[B, 3, R, R]`` in [-1, 1] (a ``w`` prediction is
    repeated over the layers when the projection space is ``w+``)."""
    device = encoder.latent_mean.device
    with torch.no_grad():
        pred = encoder(targets.to(device, torch.float32)).cpu()  # [B, D]
    if len(latent_shape) == 2:  # w+: [num_ws, w_dim]
        return pred[:, None, :].expand(-1, *latent_shape).clone()
    return pred.reshape(-1, *latent_shape)


# --- files ---------------------------------------------------------------------------------------------------
def save_encoder(encoder: Any, path: Path, report: EncoderReport | None = None) -> None:
    """safetensors with the config (and training report) as JSON metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(asdict(encoder.config))}
    if report is not None:
        meta["report"] = json.dumps(report.to_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_encoder(path: Path, *, device: str | torch.device = "cpu") -> Any:
    """An encoder written by ``save_encoder`` (tensors and JSON only: nothing in the file is executed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ModelUnavailableError(
                f"{path} is not a Sleuth latent encoder (format {meta.get('format')!r})"
            )
        config = EncoderConfig(**json.loads(meta["config"]))
        tensors = load_file(str(path))
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:
        if isinstance(exc, ModelUnavailableError):
            raise
        raise ModelUnavailableError(f"cannot read latent encoder {path}: {exc}") from exc
    if config.kind == "features":
        from projection.feature_encoder import FeatureEncoder

        encoder: nn.Module = FeatureEncoder(config)
    else:
        encoder = LatentEncoder(config)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelUnavailableError(f"latent encoder {path} does not match its config: {exc}") from exc
    return encoder.to(device).eval().requires_grad_(False)


def train_generator_encoder(
    settings: Any,
    name: str,
    training: TrainingConfig | None = None,
    *,
    width: int = 32,
    device: str | torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    store: Any | None = None,
) -> tuple[Any, EncoderReport]:
    """Train the latent encoder of registered generator ``name`` in its projection space, write it next to the
    converted weights (``NAME.encoder.safetensors``) and record its SHA-256 and report in the registry (which
    clears a calibration made without it). Returns the updated registry entry and the report."""
    from projection.checkpoints import sha256_file
    from projection.registry import encoder_path, load_generator, set_encoder

    training = training or TrainingConfig()
    if training.kind == "features" and not training.backbone and settings.lpips_weights:
        training = replace(training, backbone=str(settings.lpips_weights))  # the configured LPIPS file
    device = device or settings.device
    generator, info = load_generator(settings, name, device=device, store=store)
    space = "w" if info.latent_space in ("w", "w+") else "z"
    path = encoder_path(settings, name)
    encoder, report = train_encoder(
        generator, space, training, width=width, device=device, progress=progress,
        sample_cache=path.with_name(f"{name}.encoder-samples.safetensors"), cache_key=info.weights_sha256,
    )  # fmt: skip
    save_encoder(encoder, path, report)
    record = {
        "path": str(path),
        "sha256": sha256_file(path),
        "space": space,
        "config": asdict(encoder.config),
        "training": asdict(training),
        "report": report.to_dict(),
    }
    updated = set_encoder(settings, name, record, store=store)
    logger.info(
        "encoder for %s: held-out cosine %.3f, relative MSE %.3f (%d samples, %d epochs, %.0fs)",
        name, report.holdout_cosine, report.holdout_relative_mse, report.samples, report.epochs, report.seconds,
    )  # fmt: skip
    return updated, report
