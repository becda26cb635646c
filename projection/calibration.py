"""Calibration: turn a projection LPIPS into the probability that a face came from a given generator.

``calibrate_generator`` projects K samples of the generator (after the perturbations an image picks up on the
web: a JPEG round trip and a down/up resize) and K real faces, and keeps both empirical LPIPS distributions.
``Calibration.probability`` maps a new LPIPS to p(generated) with an isotonic (monotone non-increasing) fit of the
class label on LPIPS, classes weighted equally (prior 1/2), bounded to [1/(n_generated+2), 1 - 1/(n_real+2)] so
that a finite sample never yields exactly 0 or 1. The sample sizes are stored with it and reported with every probability.
"""

from __future__ import annotations

import io
import logging
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

METHOD = "isotonic-equal-prior-v2"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def perturb(image: Image.Image, *, jpeg_quality: int = 90, scale: float = 0.8) -> Image.Image:
    """A JPEG round trip at ``jpeg_quality`` then a resize by ``scale`` and back (bicubic), same size as given."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
    buf.seek(0)
    out = Image.open(buf).convert("RGB")
    w, h = out.size
    small = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    if not positives or not negatives:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # 1-based average rank of the tie group
        rank_sum += mean_rank * sum(1 for _, label in ranked[i:j] if label)
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _pool_adjacent_violators(values: list[float], weights: list[float]) -> list[tuple[float, float, int]]:
    """Non-increasing least-squares fit: blocks ``(mean, weight, length)`` in input order."""
    blocks: list[list[float]] = []  # [weighted sum, weight, length]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v * w, w, 1])
        # non-increasing: merge while a later block's mean exceeds the one before it
        while len(blocks) > 1 and blocks[-1][0] / blocks[-1][1] > blocks[-2][0] / blocks[-2][1]:
            s, wt, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += wt
            blocks[-1][2] += n
    return [(s / w, w, int(n)) for s, w, n in blocks]


@dataclass
class Calibration:
    """Two empirical LPIPS distributions and the monotone map from LPIPS to p(generated) fitted on them."""

    generated_lpips: list[float]
    real_lpips: list[float]
    knots: list[float] = field(default_factory=list)  # LPIPS values (increasing)
    probabilities: list[float] = field(default_factory=list)  # p(generated) at the knots (non-increasing)
    method: str = METHOD
    settings: dict[str, Any] = field(
        default_factory=dict
    )  # how the samples were made (k, perturbation, steps)

    @property
    def n_generated(self) -> int:
        return len(self.generated_lpips)

    @property
    def n_real(self) -> int:
        return len(self.real_lpips)

    @classmethod
    def fit(
        cls,
        generated_lpips: Sequence[float],
        real_lpips: Sequence[float],
        *,
        settings: dict[str, Any] | None = None,
    ) -> Calibration:
        """Isotonic fit of the label (1 = generated) on LPIPS, each class weighted to total 1/2."""
        gen, real = [float(v) for v in generated_lpips], [float(v) for v in real_lpips]
        if not gen or not real:
            raise ValueError("calibration needs at least one generated and one real LPIPS value")
        if not all(math.isfinite(v) for v in gen + real):
            raise ValueError("calibration LPIPS values must be finite")
        samples = [(v, 1.0, 0.5 / len(gen)) for v in gen] + [(v, 0.0, 0.5 / len(real)) for v in real]
        samples.sort(key=lambda t: (t[0], -t[1]))
        blocks = _pool_adjacent_violators([s[1] for s in samples], [s[2] for s in samples])
        knots, probs, start = [], [], 0
        for mean, _w, n in blocks:
            xs = [samples[i][0] for i in range(start, start + n)]
            knots.append(sum(xs) / n)  # a block is placed at the centre of its LPIPS values
            # Laplace-style bounds: never more certain than the sample sizes allow (clipping keeps monotone)
            probs.append(min(max(mean, 1.0 / (len(gen) + 2)), 1.0 - 1.0 / (len(real) + 2)))
            start += n
        return cls(gen, real, knots, probs, METHOD, dict(settings or {}))

    def probability(self, lpips: float) -> float:
        """p(generated) for ``lpips``: piecewise linear between the fitted block centres, flat beyond them."""
        if not self.knots:
            raise ValueError("calibration has not been fitted")
        x = float(lpips)
        if x <= self.knots[0]:
            return self.probabilities[0]
        if x >= self.knots[-1]:
            return self.probabilities[-1]
        i = bisect_right(self.knots, x)
        x0, x1 = self.knots[i - 1], self.knots[i]
        p0, p1 = self.probabilities[i - 1], self.probabilities[i]
        return p0 if x1 == x0 else p0 + (p1 - p0) * (x - x0) / (x1 - x0)

    def auc(self) -> float:
        """ROC AUC of the calibration samples with score = -LPIPS (generated is the positive class)."""
        return roc_auc([-v for v in self.generated_lpips], [-v for v in self.real_lpips])

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_generated": self.n_generated,
            "n_real": self.n_real,
            "generated_lpips": self.generated_lpips,
            "real_lpips": self.real_lpips,
            "knots": self.knots,
            "probabilities": self.probabilities,
            "auc": self.auc(),
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Calibration:
        try:
            cal = cls(
                generated_lpips=[float(v) for v in doc["generated_lpips"]],
                real_lpips=[float(v) for v in doc["real_lpips"]],
                knots=[float(v) for v in doc["knots"]],
                probabilities=[float(v) for v in doc["probabilities"]],
                method=str(doc.get("method", METHOD)),
                settings=dict(doc.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a stored calibration: {exc}") from exc
        if cal.method != METHOD:  # an older fit: refit from the stored samples
            return cls.fit(cal.generated_lpips, cal.real_lpips, settings=cal.settings)
        return cal


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    from indexer.errors import SourceError

    root = Path(folder)
    if not root.is_dir():
        raise SourceError(f"not a folder: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def generated_faces(
    generator: Any, k: int, *, seed: int, jpeg_quality: int = 90, scale: float = 0.8, chunk: int = 64
) -> list[Image.Image]:
    """``k`` samples of ``generator`` (z from ``seed``), each through ``perturb``: the generated side of a run."""
    import torch

    from projection.evidence import to_image

    z = generator.sample_z(k, seed=seed, device=generator.device)  # [k, *latent_shape("z")]
    images: list[Image.Image] = []
    with torch.no_grad():
        for lo in range(0, k, chunk):
            for t in generator.synthesize(z[lo : lo + chunk], "z"):  # [3, R, R]
                images.append(perturb(to_image(t), jpeg_quality=jpeg_quality, scale=scale))
    return images


def calibrate_generator(
    settings: Any,
    name: str,
    real_dir: str | Path,
    *,
    k: int = 100,
    seed: int = 0,
    device: str | None = None,
    steps: int | None = None,
    detector: Any | None = None,
    jpeg_quality: int = 90,
    scale: float = 0.8,
    store: Any | None = None,
) -> Calibration:
    """Project ``k`` perturbed samples of generator ``name`` and ``k`` real faces from ``real_dir`` (a random
    sample when it holds more, chosen by ``seed``), fit the calibration and store it on the registry entry."""
    import random

    from indexer.decode import decode_file
    from indexer.errors import DecodeError, SourceError
    from projection.evidence import PreparedFace, prepare_face, project_faces, projection_config
    from projection.registry import load_generator, set_calibration

    if k < 2:
        raise SourceError("k must be at least 2")
    device = device or settings.device
    generator, info = load_generator(settings, name, device=device, store=store)
    files = image_files(real_dir)
    if not files:
        raise SourceError(f"no images under {real_dir}")
    if len(files) > k:
        files = sorted(random.Random(seed).sample(files, k))
    if detector is None and settings.face_detector is not None:
        from indexer.faces import load_face_detector

        detector = load_face_detector(settings)
    real: list[PreparedFace] = []
    for path in files:
        try:
            image = decode_file(path, limits=settings.limits).image
        except (DecodeError, OSError) as exc:
            logger.warning("calibration: skipping %s: %s", path, exc)
            continue
        real.append(prepare_face(image, generator.resolution, detector=detector))
    if not real:
        raise SourceError(f"no readable images under {real_dir}")
    fake = [
        PreparedFace(im, "generated")
        for im in generated_faces(generator, k, seed=seed + 1, jpeg_quality=jpeg_quality, scale=scale)
    ]
    config = projection_config(info, steps=steps)
    evidence = project_faces(
        settings, fake + real, name, device=device, config=config, store=store, match_k=0
    )
    cal = Calibration.fit(
        [e.lpips for e in evidence[: len(fake)]],
        [e.lpips for e in evidence[len(fake) :]],
        settings={
            "k": k, "seed": seed, "jpeg_quality": jpeg_quality, "scale": scale, "real_dir": str(real_dir),
            "real_alignment": sorted({f.how for f in real}), "projection": config.to_dict(),
            "encoder_sha256": info.encoder["sha256"] if info.encoder else None,
        },
    )  # fmt: skip
    set_calibration(settings, name, cal.to_json(), store=store)
    logger.info(
        "calibrated %s: %d generated, %d real, AUC %.3f", name, cal.n_generated, cal.n_real, cal.auc()
    )
    return cal
