"""Calibration: turn a projection LPIPS into the probability that a face came from a given generator.

``calibrate_generator`` projects K samples of the generator and K real faces, each after the perturbations an
image picks up on the web (``web_perturbation``: a random rescale between 0.25x and 4x of its size, a small crop
jitter, a JPEG round trip at a random quality between 40 and 95), through exactly the path a query takes (decode,
``projection.face_prep``, projection, the evidence comparison), and keeps both empirical LPIPS distributions.
``Calibration.probability`` maps a new LPIPS to p(generated) with an isotonic (monotone non-increasing) fit of the
class label on LPIPS, classes weighted equally (prior 1/2), bounded to [1/(n_generated+2), 1 - 1/(n_real+2)] so
that a finite sample never yields exactly 0 or 1. The sample sizes are stored with it and reported with every probability.
"""

from __future__ import annotations

import io
import logging
import math
import random
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


@dataclass(frozen=True)
class WebPerturbation:
    """How an image circulates: rescaled, slightly re-cropped, re-encoded as a JPEG (ranges sampled uniformly)."""

    scale: tuple[float, float] = (0.25, 4.0)  # of the image's own side (log-uniform)
    jpeg_quality: tuple[int, int] = (40, 95)
    crop_jitter: float = 0.03  # at most this share of the side cut from each edge
    max_side: int = 2048  # enlargements stop here (a 1024 px face at 4x adds nothing but pixels)
    min_side: int = 16

    def to_json(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "jpeg_quality": list(self.jpeg_quality), "crop_jitter": self.crop_jitter,
                "max_side": self.max_side, "min_side": self.min_side}  # fmt: skip


def web_perturbation(image: Image.Image, rng: random.Random, spec: WebPerturbation | None = None) -> bytes:
    """``image`` as the JPEG bytes of one draw of ``spec``: crop jitter, rescale, JPEG. Decode them like a query."""
    spec = spec or WebPerturbation()
    image = image.convert("RGB")
    w, h = image.size
    cuts = [rng.uniform(0.0, spec.crop_jitter) for _ in range(4)]
    box = (round(cuts[0] * w), round(cuts[1] * h), w - round(cuts[2] * w), h - round(cuts[3] * h))
    cropped = image.crop(box)
    lo, hi = math.log(spec.scale[0]), math.log(spec.scale[1])
    factor = math.exp(rng.uniform(lo, hi))
    side = max(cropped.size)
    factor = min(factor, spec.max_side / side) if factor > 1 else max(factor, spec.min_side / side)
    size = (max(1, round(cropped.width * factor)), max(1, round(cropped.height * factor)))
    resized = cropped.resize(size, Image.Resampling.LANCZOS if factor < 1 else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    resized.save(buf, format="JPEG", quality=rng.randint(*spec.jpeg_quality))
    return buf.getvalue()


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
    generated_sizes: list[int] = field(default_factory=list)  # effective face sizes of the samples
    real_sizes: list[int] = field(default_factory=list)

    SIZE_SLACK = 0.75  # a query face down to this share of the smallest calibrated size is still covered

    @property
    def min_size(self) -> int | None:
        """The smallest effective size both classes were measured at (None for calibrations without sizes)."""
        if not self.generated_sizes or not self.real_sizes:
            return None
        return max(min(self.generated_sizes), min(self.real_sizes))

    def covers(self, effective_size: int) -> bool:
        """Whether a face of ``effective_size`` px lies in the range the calibration measured (never extrapolate:
        a face much smaller than every calibration sample gets no probability)."""
        low = self.min_size
        return low is None or effective_size >= self.SIZE_SLACK * low

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
        generated_sizes: Sequence[int] = (),
        real_sizes: Sequence[int] = (),
    ) -> Calibration:
        """Isotonic fit of the label (1 = generated) on LPIPS, each class weighted to total 1/2. ``*_sizes``: the
        samples' effective face sizes (the range the probability is given for)."""
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
        return cls(gen, real, knots, probs, METHOD, dict(settings or {}), [int(v) for v in generated_sizes],
                   [int(v) for v in real_sizes])  # fmt: skip

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
            "generated_sizes": self.generated_sizes,
            "real_sizes": self.real_sizes,
            "min_size": self.min_size,
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
                generated_sizes=[int(v) for v in doc.get("generated_sizes") or []],
                real_sizes=[int(v) for v in doc.get("real_sizes") or []],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a stored calibration: {exc}") from exc
        if cal.method != METHOD:  # an older fit: refit from the stored samples
            return cls.fit(cal.generated_lpips, cal.real_lpips, settings=cal.settings,
                           generated_sizes=cal.generated_sizes, real_sizes=cal.real_sizes)  # fmt: skip
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
    """``k`` samples of ``generator`` (z from ``seed``), each through ``perturb`` (JPEG and a down/up resize)."""
    return [
        perturb(im, jpeg_quality=jpeg_quality, scale=scale)
        for im in generator_samples(generator, k, seed=seed)
    ]


def generator_samples(generator: Any, k: int, *, seed: int) -> list[Image.Image]:
    """``k`` samples of ``generator`` at its resolution (z drawn from ``seed``), as PIL images."""
    import torch

    from projection.images import to_image

    z = generator.sample_z(k, seed=seed, device=generator.device if hasattr(generator, "device") else "cpu")
    chunk = max(1, 2**22 // generator.resolution**2)
    images: list[Image.Image] = []
    with torch.no_grad():
        for lo in range(0, k, chunk):
            images += [to_image(t) for t in generator.synthesize(z[lo : lo + chunk], "z")]  # [3, R, R] each
    return images


def perturbed_queries(
    images: Sequence[Image.Image],
    *,
    seed: int,
    spec: WebPerturbation | None = None,
    limits: Any | None = None,
) -> list[Any]:
    """Each image after one ``web_perturbation`` draw (seeded), decoded as a query is (``DecodedImage``)."""
    from indexer.decode import decode_image

    rng = random.Random(seed)
    return [decode_image(web_perturbation(im, rng, spec), limits=limits) for im in images]


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
    perturbation: WebPerturbation | None = None,
    store: Any | None = None,
) -> Calibration:
    """Project ``k`` web-perturbed samples of generator ``name`` and ``k`` web-perturbed real faces from
    ``real_dir`` (a random sample when it holds more, chosen by ``seed``) through the query path, fit the
    calibration and store it on the registry entry."""
    from indexer.decode import decode_file
    from indexer.errors import DecodeError, SourceError
    from projection.evidence import prepare_faces, project_faces, projection_config
    from projection.registry import get_generator, load_generator, set_calibration

    if k < 2:
        raise SourceError("k must be at least 2")
    spec = perturbation or WebPerturbation()
    if device is not None:
        settings = settings.model_copy(update={"device": device})
    generator, _ = load_generator(settings, name, device=settings.device, store=store)
    files = image_files(real_dir)
    if not files:
        raise SourceError(f"no images under {real_dir}")
    if len(files) > k:
        files = sorted(random.Random(seed).sample(files, k))
    real_images: list[Image.Image] = []
    for path in files:
        try:
            real_images.append(decode_file(path, limits=settings.limits).image)
        except (DecodeError, OSError) as exc:
            logger.warning("calibration: skipping %s: %s", path, exc)
    if not real_images:
        raise SourceError(f"no readable images under {real_dir}")
    fake_queries = perturbed_queries(generator_samples(generator, k, seed=seed + 1), seed=seed + 2, spec=spec)
    real_queries = perturbed_queries(real_images, seed=seed + 3, spec=spec)
    queries = fake_queries + real_queries
    faces = prepare_faces(
        settings, [q.image for q in queries], name, detector=detector,
        jpeg_qualities=[q.jpeg_quality for q in queries], store=store,
    )  # fmt: skip
    info = get_generator(settings, name, store=store)  # after preparation: it may have measured the template
    config = projection_config(info, steps=steps)
    evidence = project_faces(settings, faces, name, config=config, store=store, match_k=0)
    n_fake = len(fake_queries)
    cal = Calibration.fit(
        [e.lpips for e in evidence[:n_fake]],
        [e.lpips for e in evidence[n_fake:]],
        settings={
            "k": k, "seed": seed, "perturbation": spec.to_json(), "real_dir": str(real_dir),
            "preparation": sorted({f.how for f in faces}), "projection": config.to_dict(),
            "encoder_sha256": info.encoder["sha256"] if info.encoder else None,
            "face_template": bool(info.config.get("face_template")),
        },
        generated_sizes=[f.size() for f in faces[:n_fake]],
        real_sizes=[f.size() for f in faces[n_fake:]],
    )  # fmt: skip
    set_calibration(settings, name, cal.to_json(), store=store)
    logger.info(
        "calibrated %s: %d generated, %d real, AUC %.3f", name, cal.n_generated, cal.n_real, cal.auc()
    )
    return cal
