"""Projection evidence for the rest of Sleuth: faces in, latent-space verdict out.

``project_images`` takes images (each holding a face), prepares each face the one way Sleuth does
(``projection.face_prep``: detected, aligned to the generator's own framing or taken as an aligned crop, kept at
its effective size), projects all faces of the call in batched runs into one registered generator and returns one
``Evidence`` per image: latent, reconstruction, difference map, LPIPS, calibrated p(generated) (``None`` before
``sleuth generators calibrate``), nearest stored latents, steps, seconds and the loss trace.

The evidence LPIPS compares the reconstruction with the query the way the query was made: the reconstruction is
reduced to the face's effective size and, for a JPEG query, re-encoded at the query's JPEG quality, then both are
compared at that size (at most the LPIPS resolution), over the pixels the query has (``projection.scoring``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.errors import ModelUnavailableError
from indexer.settings import Settings
from indexer.store.db import Store, open_store
from projection.calibration import Calibration, evidence_metric
from projection.encoder import predict_starts
from projection.face_prep import FaceTemplate, PreparedFace, measure_face_template, prepare_face
from projection.images import png_data_uri, to_image, to_tensor
from projection.latent_match import LatentMatch, LatentMatcher
from projection.lpips_loader import load_lpips
from projection.projector import ProjectionConfig, ProjectionResult, project, resize_to, resolve_space
from projection.registry import GeneratorInfo, load_encoder_of, load_generator, set_face_template
from projection.scoring import compare_target, evidence_scores

logger = logging.getLogger(__name__)

DIFFERENCE_GAIN = 4.0  # the difference map shows |target - reconstruction| * gain (clipped)
LARGE_GENERATOR_BATCH = 4  # faces projected at once into generators of 512 px and more (memory)


@dataclass
class Evidence:
    """What projecting one face into one generator showed."""

    generator: str
    family: str
    description: str  # what the generator is, as registered (a distilled student says whose)
    space: str
    latent: np.ndarray  # latent_shape(space), float32
    target: Image.Image  # the face as projected (generator resolution)
    reconstruction: Image.Image
    difference: Image.Image
    lpips: float  # the evidence: reconstruction degraded like the query, compared at the effective size
    mse: float
    objective_lpips: float  # what the optimisation reached (no re-encoding)
    probability_generated: float | None
    calibration_sizes: dict[str, int] | None
    latent_matches: list[LatentMatch]
    steps: int
    seconds: float
    loss_trace: list[float]
    start_index: int = 0
    face: dict[str, Any] = field(default_factory=dict)  # how the face was prepared (PreparedFace.to_json)
    probability_note: str | None = None  # why there is no probability, when there is none
    # what the face is judged by (Calibration.probability_for): "lpips", "mse" (a face under 64 px) or "lpips+mse"
    metric: str = "lpips"

    @property
    def reproducing_match(self) -> LatentMatch | None:
        """The best stored latent when it is a known generated image's (a manifest's) and its own image reproduces
        the query at least as well as the projection did (``image_lpips <= lpips``): the face is that image, seen
        again. A real face's nearest stored latent is another face, far worse than its own reprojection."""
        if not self.latent_matches:
            return None
        best = self.latent_matches[0]
        if best.origin != "manifest" or best.image_lpips is None or best.image_lpips > self.lpips:
            return None
        return best

    @property
    def evidence_distance(self) -> float:
        """The face's distance in its own metric (``metric``): ``evidence_lpips``, or the pixel MSE of a face
        under 64 px."""
        return self.mse if self.metric == "mse" else self.evidence_lpips

    @property
    def evidence_lpips(self) -> float:
        """The closest this generator came to the query: the reprojection's LPIPS, or the reproducing stored
        latent's where there is one (lower)."""
        match = self.reproducing_match
        return (
            self.lpips if match is None or match.image_lpips is None else min(self.lpips, match.image_lpips)
        )

    def to_json(
        self, *, images: str = "none", image_dir: Path | None = None, stem: str = "face"
    ) -> dict[str, Any]:
        """JSON document. ``images``: ``"none"``, ``"data-uri"`` (base64 PNGs inline) or ``"files"`` (PNGs
        written under ``image_dir`` as ``STEM-reconstruction.png`` / ``STEM-difference.png``, paths returned)."""
        doc: dict[str, Any] = {
            "generator": self.generator,
            "family": self.family,
            "description": self.description,
            "space": self.space,
            "lpips": self.lpips,
            "mse": self.mse,
            "objective_lpips": self.objective_lpips,
            "probability_generated": self.probability_generated,
            "calibration_sizes": self.calibration_sizes,
            "probability_note": self.probability_note,
            "metric": self.metric,
            "latent_matches": [m.to_json() for m in self.latent_matches],
            "reproduced_by_stored_latent": None if (m := self.reproducing_match) is None else m.to_json(),
            "steps": self.steps,
            "seconds": self.seconds,
            "start_index": self.start_index,
            "face": self.face,
            "loss_trace": self.loss_trace,
        }
        if images == "data-uri":
            doc["reconstruction"] = png_data_uri(self.reconstruction)
            doc["difference"] = png_data_uri(self.difference)
        elif images == "files":
            if image_dir is None:
                raise ValueError("images='files' needs image_dir")
            image_dir.mkdir(parents=True, exist_ok=True)
            for kind, img in (("reconstruction", self.reconstruction), ("difference", self.difference)):
                path = image_dir / f"{stem}-{kind}.png"
                img.save(path, format="PNG")
                doc[kind] = str(path)
        elif images != "none":
            raise ValueError(f"images must be none, data-uri or files, got {images!r}")
        return doc


def difference_map(target: torch.Tensor, reconstruction: torch.Tensor) -> Image.Image:
    """Grey-level ``|target - reconstruction|`` (mean over channels, x ``DIFFERENCE_GAIN``) as RGB."""
    diff = (target.detach().cpu() - reconstruction.detach().cpu()).abs().mean(dim=0) / 2  # [H, W] in [0, 1]
    arr = (diff * DIFFERENCE_GAIN).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="L").convert("RGB")


# --- faces ---------------------------------------------------------------------------------------------
def face_template_of(
    settings: Settings,
    info: GeneratorInfo,
    generator: Any,
    detector: Any | None,
    *,
    store: Store | None = None,
) -> FaceTemplate | None:
    """The generator's face template (its own framing): stored in the registry, or measured now on its samples
    with ``detector`` and stored. ``None`` without a detector or when MTCNN finds no faces in its samples."""
    stored = info.config.get("face_template")
    if stored:
        return FaceTemplate.from_json(stored)
    if detector is None or stored is not None:  # {} records a measurement that found no faces
        return None
    logger.info("measuring the face template of %s on its own samples", info.name)
    template = measure_face_template(generator, detector)
    set_face_template(settings, info.name, template.to_json() if template else {}, store=store)
    return template


def prepare_faces(
    settings: Settings,
    images: Sequence[Image.Image],
    generator_name: str,
    *,
    detector: Any | None = None,
    jpeg_qualities: Sequence[int | None] | None = None,
    store: Store | None = None,
) -> list[PreparedFace]:
    """Each image's face prepared for ``generator_name`` by ``projection.face_prep.prepare_face`` with the
    generator's face template; ``detector`` ``None`` loads the configured one (``SLEUTH_FACE_DETECTOR``), if any.
    The one preparation `sleuth project`, the API's refine, calibration and the benchmarks share."""
    generator, info = load_generator(settings, generator_name, device=settings.device, store=store)
    if detector is None and settings.face_detector:
        from indexer.faces import load_face_detector

        detector = load_face_detector(settings)
    template = face_template_of(settings, info, generator, detector, store=store)
    qualities = list(jpeg_qualities) if jpeg_qualities is not None else [None] * len(images)
    return [
        prepare_face(im, generator.resolution, template=template, detector=detector, jpeg_quality=q)
        for im, q in zip(images, qualities, strict=True)
    ]


# --- models loaded once per process ----------------------------------------------------------------------
_LPIPS: dict[tuple[str, str, str], torch.nn.Module] = {}
_LPIPS_LOCK = threading.Lock()


def lpips_for(settings: Settings, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The LPIPS model of ``settings.lpips_weights`` (VGG unless the file name says alex), loaded once."""
    weights = settings.lpips_weights
    net = "alex" if weights is not None and "alex" in Path(weights).name.lower() else "vgg"
    key = (str(weights), net, str(torch.device(device)))
    with _LPIPS_LOCK:
        if key not in _LPIPS:
            _LPIPS[key] = load_lpips(weights, net=net, device=device)
        return _LPIPS[key]


def calibration_of(info: GeneratorInfo) -> Calibration | None:
    if not info.calibration:
        return None
    try:
        return Calibration.from_json(info.calibration)
    except ValueError as exc:
        raise ModelUnavailableError(
            f"generator {info.name!r}: stored calibration is unreadable: {exc}"
        ) from exc


# --- projection --------------------------------------------------------------------------------------------
def projection_config(info: GeneratorInfo, *, steps: int | None = None) -> ProjectionConfig:
    """The fast setting for a registered generator: started from its latent encoder when it has one."""
    config = ProjectionConfig.fast(info.latent_space, encoder=info.encoder is not None)
    if steps is not None:
        config.steps = steps
    return config


def project_faces(
    settings: Settings,
    faces: Sequence[PreparedFace],
    generator_name: str,
    *,
    device: str | torch.device | None = None,
    config: ProjectionConfig | None = None,
    starts: Sequence[np.ndarray | None] | None = None,
    store: Store | None = None,
    match_k: int = 5,
    batch_size: int = 32,
    rerank_pool: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[Evidence]:
    """Project prepared faces (``prepare_faces``) into ``generator_name``; one ``Evidence`` each.

    ``progress(faces_done, step, steps)`` is called after every projection step of every batch.

    ``starts[i]``: extra start latents ``[S, *latent_shape]`` for face ``i``. Where the generator has a trained
    latent encoder (``sleuth generators train-encoder``), its prediction for the face is start 1 and the given
    starts follow; the default config then uses it in place of the mean latent and the random search.
    Latent matches: the ``rerank_pool`` stored latents nearest in direction (default 50, 10 for generators above
    256 px), re-ranked by how close their own image is to the face (``rerank_by_image``); the best ``match_k``
    are kept.
    """
    device = device or settings.device
    own_store = store is None
    st = store or open_store(settings)
    try:
        generator, info = load_generator(settings, generator_name, device=device, store=st)
        encoder = load_encoder_of(info, device=device)
        config = config or projection_config(info)
        space = resolve_space(generator, config.space)
        if encoder is not None and encoder.config.space != space.rstrip("+"):
            encoder = None  # e.g. a w encoder while projecting in z: no usable prediction
        lpips_model = lpips_for(settings, device=device)
        calibration = calibration_of(info)
        res = generator.resolution
        for f in faces:
            if f.image.size != (res, res):
                raise ValueError(f"faces must be {res}x{res} (use prepare_faces), got {f.image.size}")
        results: list[ProjectionResult] = []
        if res >= 512:  # a row of a 1024 px generator holds GBs of activations; rows cost the same on a CPU
            batch_size = min(batch_size, LARGE_GENERATOR_BATCH)
        for lo in range(0, len(faces), batch_size):
            chunk = faces[lo : lo + batch_size]
            targets = to_tensor([f.image for f in chunk])
            chunk_starts: list[torch.Tensor] | None = None
            if starts is not None:
                chunk_starts = [
                    torch.empty(0) if s is None else torch.as_tensor(np.asarray(s, dtype=np.float32))
                    for s in starts[lo : lo + batch_size]
                ]
            if encoder is not None:  # the encoder's prediction is start 1, given starts follow
                shape = generator.latent_shape(space)
                predicted = predict_starts(encoder, targets, shape)  # [b, *shape]
                given = chunk_starts or [torch.empty(0)] * len(chunk)
                chunk_starts = [
                    torch.cat([predicted[i : i + 1], g.reshape(-1, *shape)]) for i, g in enumerate(given)
                ]
            done, steps = len(results), config.steps
            results += project(
                generator, targets, lpips_model=lpips_model, config=config, starts=chunk_starts,
                compare=[compare_target(f) for f in chunk], device=device,
                progress=None if progress is None else _step_reporter(progress, done, steps),
            )  # fmt: skip
        scores = evidence_scores(
            lpips_model, [r.reconstruction for r in results], faces, lpips_resolution=config.lpips_resolution
        )
        matcher = LatentMatcher.open(settings, st, generator_name, results[0].space if results else "z")
        pool_size = rerank_pool if rerank_pool is not None else (50 if res <= 256 else 10)
        pool = max(match_k, pool_size) if match_k > 0 else 0
        matches = matcher.match(np.stack([r.latent.numpy() for r in results]), k=pool) if results else []
        if pool > match_k:
            matches = [
                rerank_by_image(generator, r.space, face, found, matcher)[:match_k]
                for face, r, found in zip(faces, results, matches, strict=True)
            ]
        if results:
            score_best_matches(generator, results[0].space, faces, matches, matcher, lpips_model, config)
    finally:
        if own_store:
            st.dispose()
    sizes = calibration.sizes() if calibration else None
    out = []
    for face, r, m, (lp, mse) in zip(faces, results, matches, scores, strict=True):
        target = to_tensor([face.image])[0]
        probability, note, metric = _probability(calibration, lp, mse, face.size(), generator_name)
        out.append(
            Evidence(
                generator=generator_name,
                family=info.family,
                description=info.description,
                space=r.space,
                latent=r.latent.numpy().astype(np.float32),
                target=face.image,
                reconstruction=to_image(r.reconstruction),
                difference=difference_map(target, r.reconstruction),
                lpips=lp,
                mse=mse,
                objective_lpips=r.lpips,
                probability_generated=probability,
                calibration_sizes=sizes,
                probability_note=note,
                metric=metric,
                latent_matches=m,
                steps=r.steps,
                seconds=r.seconds,
                loss_trace=r.loss_trace,
                start_index=r.start_index,
                face=face.to_json(),
            )
        )
    return out


def _step_reporter(
    progress: Callable[[int, int, int], None], done: int, steps: int
) -> Callable[[int, int], None]:
    """The projector's ``progress(step, active_rows)`` as ``progress(faces_done, step, steps)``."""
    return lambda step, _active: progress(done, step + 1, steps)


def _probability(
    calibration: Calibration | None, lpips: float, mse: float, size: int, name: str
) -> tuple[float | None, str | None, str]:
    """(p(generated), why there is none, the metric it was judged by) for a face of ``size`` px: the calibration's
    map of the face's metric (``Calibration.probability_for``) where the calibration covers that size."""
    metric = evidence_metric(size)
    if calibration is None:
        return None, f"not calibrated (run `sleuth generators calibrate {name}`)", metric
    if not calibration.covers(size):
        return None, (
            f"the face's effective size ({size} px) is below the smallest the calibration measured "
            f"({calibration.min_size} px): no probability"
        ), metric  # fmt: skip
    probability, metric = calibration.probability_for(lpips, mse, size)
    return probability, None, metric


RERANK_SIZE = 64  # stored latents' images and the face are compared at this size (or the face's, if smaller)


def render_stored(
    generator: Any, space: str, matches: Sequence[LatentMatch], matcher: LatentMatcher, *, preview: bool
) -> torch.Tensor:
    """The images of the stored latents of ``matches`` ``[n, 3, R, R]`` on the CPU, rendered a memory-bounded
    chunk at a time: full resolution, or ``preview`` (``Generator.synthesize_preview``)."""
    vecs = matcher.vectors([m.latent_id for m in matches])
    shape = generator.latent_shape(space)
    device = next(generator.parameters()).device
    render = generator.synthesize_preview if preview else generator.synthesize
    chunk = max(1, 2**22 // generator.resolution**2)
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        latents = torch.from_numpy(np.stack([vecs[m.latent_id] for m in matches])).reshape(-1, *shape)
        for lo in range(0, len(latents), chunk):
            parts.append(render(latents[lo : lo + chunk].to(device), space).cpu())
    return torch.cat(parts)


def rerank_by_image(
    generator: Any, space: str, face: PreparedFace, found: list[LatentMatch], matcher: LatentMatcher
) -> list[LatentMatch]:
    """``found`` ordered by the pixel MSE between each stored latent's image and the face (both at most
    ``RERANK_SIZE`` px).

    The projected latent of a perturbed generated face points roughly towards its true latent (cosine ~0.5 for
    DCGAN z); rendering the nearest candidates and comparing images separates the true one from look-alikes.
    """
    if not found:
        return found
    target = compare_target(face)
    size = min(RERANK_SIZE, target.size)
    want = resize_to(target.image[None], size)  # [1, 3, s, s]
    images = render_stored(generator, space, found, matcher, preview=True)  # [n, 3, P, P]
    errors = (resize_to(images, size) - want).square().mean(dim=(1, 2, 3)).tolist()
    for m, e in zip(found, errors, strict=True):
        m.image_mse = float(e)
    return sorted(found, key=lambda m: m.image_mse if m.image_mse is not None else float("inf"))


def score_best_matches(
    generator: Any,
    space: str,
    faces: Sequence[PreparedFace],
    matches: Sequence[list[LatentMatch]],
    matcher: LatentMatcher,
    lpips_model: torch.nn.Module,
    config: ProjectionConfig,
) -> None:
    """Set ``image_lpips`` of each face's best match: its stored latent rendered at full resolution and scored
    against the face by the evidence comparison (``evidence_scores``), exactly as the reconstruction is."""
    pairs = [(face, found[0]) for face, found in zip(faces, matches, strict=True) if found]
    if not pairs:
        return
    images = render_stored(generator, space, [m for _, m in pairs], matcher, preview=False)
    scores = evidence_scores(
        lpips_model, list(images), [face for face, _ in pairs], lpips_resolution=config.lpips_resolution
    )
    for (_, match), (lp, _mse) in zip(pairs, scores, strict=True):
        match.image_lpips = float(lp)


def project_images(
    settings: Settings,
    images: Sequence[Image.Image],
    generator_name: str,
    *,
    device: str | torch.device | None = None,
    steps: int | None = None,
    config: ProjectionConfig | None = None,
    detector: Any | None = None,
    jpeg_qualities: Sequence[int | None] | None = None,
    store: Store | None = None,
    match_k: int = 5,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[Evidence]:
    """One ``Evidence`` per image, in input order: its face (``prepare_faces``) projected into the generator.

    ``detector``: an MTCNN ``FaceDetector``; ``None`` loads the configured one (``SLEUTH_FACE_DETECTOR``) if any.
    ``jpeg_qualities``: each image's JPEG quality (``DecodedImage.jpeg_quality``), for the evidence comparison.
    ``steps`` overrides the configured number of projection steps.
    """
    own_store = store is None
    st = store or open_store(settings)
    try:
        if device is not None:
            settings = settings.model_copy(update={"device": str(device)})
        _, info = load_generator(settings, generator_name, device=settings.device, store=st)
        faces = prepare_faces(
            settings, images, generator_name, detector=detector, jpeg_qualities=jpeg_qualities, store=st
        )
        if steps is not None:
            config = replace(config, steps=steps) if config else projection_config(info, steps=steps)
        return project_faces(
            settings, faces, generator_name, config=config, store=st, match_k=match_k, progress=progress
        )
    finally:
        if own_store:
            st.dispose()
