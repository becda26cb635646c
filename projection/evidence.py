"""Projection evidence for the rest of Sleuth: faces in, latent-space verdict out.

``project_images`` takes images (each holding a face), aligns the face FFHQ-style to the generator's resolution
(MTCNN when a detector is given or configured; an image that is already a square crop of that size is used as
it is), projects all faces of the call in batched runs into one registered generator and returns one
``Evidence`` per image: latent, reconstruction, difference map, LPIPS, calibrated p(generated) (``None`` before
``sleuth generators calibrate``), nearest stored latents, steps, seconds and the loss trace.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.errors import ModelUnavailableError
from indexer.settings import Settings
from indexer.store.db import Store, open_store
from projection.calibration import Calibration
from projection.encoder import predict_starts
from projection.latent_match import LatentMatch, LatentMatcher
from projection.lpips_loader import load_lpips
from projection.projector import ProjectionConfig, ProjectionResult, project, resolve_space
from projection.registry import GeneratorInfo, load_encoder_of, load_generator

logger = logging.getLogger(__name__)

DIFFERENCE_GAIN = 4.0  # the difference map shows |target - reconstruction| * gain (clipped)


@dataclass
class PreparedFace:
    """A face at the generator's resolution and how it was obtained."""

    image: Image.Image
    how: str  # "mtcnn-ffhq", "as-is" or "centre-crop"
    box: tuple[float, float, float, float] | None = None
    score: float | None = None


@dataclass
class Evidence:
    """What projecting one face into one generator showed."""

    generator: str
    family: str
    space: str
    latent: np.ndarray  # latent_shape(space), float32
    target: Image.Image  # the face as projected (generator resolution)
    reconstruction: Image.Image
    difference: Image.Image
    lpips: float
    mse: float
    probability_generated: float | None
    calibration_sizes: dict[str, int] | None
    latent_matches: list[LatentMatch]
    steps: int
    seconds: float
    loss_trace: list[float]
    start_index: int = 0
    face: dict[str, Any] = field(default_factory=dict)  # how the face was prepared (and its box)

    def to_json(
        self, *, images: str = "none", image_dir: Path | None = None, stem: str = "face"
    ) -> dict[str, Any]:
        """JSON document. ``images``: ``"none"``, ``"data-uri"`` (base64 PNGs inline) or ``"files"`` (PNGs
        written under ``image_dir`` as ``STEM-reconstruction.png`` / ``STEM-difference.png``, paths returned)."""
        doc: dict[str, Any] = {
            "generator": self.generator,
            "family": self.family,
            "space": self.space,
            "lpips": self.lpips,
            "mse": self.mse,
            "probability_generated": self.probability_generated,
            "calibration_sizes": self.calibration_sizes,
            "latent_matches": [m.to_json() for m in self.latent_matches],
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


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- images <-> tensors ----------------------------------------------------------------------------------
def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> ``[N, 3, H, W]`` float32 in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]  # each [H, W, 3]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_image(tensor: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> PIL RGB (rounded, clipped)."""
    arr = ((tensor.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def difference_map(target: torch.Tensor, reconstruction: torch.Tensor) -> Image.Image:
    """Grey-level ``|target - reconstruction|`` (mean over channels, x ``DIFFERENCE_GAIN``) as RGB."""
    diff = (target.detach().cpu() - reconstruction.detach().cpu()).abs().mean(dim=0) / 2  # [H, W] in [0, 1]
    arr = (diff * DIFFERENCE_GAIN).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="L").convert("RGB")


# --- faces ---------------------------------------------------------------------------------------------
def prepare_face(image: Image.Image, resolution: int, *, detector: Any | None = None) -> PreparedFace:
    """The face of ``image`` at ``resolution``: as-is when already that size, else the best MTCNN face aligned
    FFHQ-style (with a detector), else the centre square resized (no detector, or no face found)."""
    image = image.convert("RGB")
    if image.size == (resolution, resolution):
        return PreparedFace(image, "as-is")
    if detector is not None:
        from indexer.faces import describe_faces

        found = describe_faces(image, detector, size=resolution, max_faces=1)
        if found:
            face, crop = found[0]
            return PreparedFace(crop, "mtcnn-ffhq", tuple(face.box), float(face.score))  # type: ignore[arg-type]
        logger.info("no face found; projecting the centre square of the image")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return PreparedFace(square.resize((resolution, resolution), Image.Resampling.LANCZOS), "centre-crop")


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
    rerank_pool: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> list[Evidence]:
    """Project prepared faces (at the generator's resolution) into ``generator_name``; one ``Evidence`` each.

    ``starts[i]``: extra start latents ``[S, *latent_shape]`` for face ``i``. Where the generator has a trained
    latent encoder (``sleuth generators train-encoder``), its prediction for the face is start 1 and the given
    starts follow; the default config then uses it in place of the mean latent and the random search.
    Latent matches: the ``rerank_pool`` stored latents nearest in direction, re-ranked by how close their own
    image is to the face (``rerank_by_image``); the best ``match_k`` are kept.
    ``progress(done, steps)`` is called after each optimisation step of each batch (done from 1).
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
                raise ValueError(f"faces must be {res}x{res} (use prepare_face), got {f.image.size}")
        results: list[ProjectionResult] = []
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
            on_step = None if progress is None else partial(_report_step, progress, config.steps)
            results += project(
                generator, targets, lpips_model=lpips_model, config=config, starts=chunk_starts, device=device,
                progress=on_step,
            )  # fmt: skip
        matcher = LatentMatcher.open(settings, st, generator_name, results[0].space if results else "z")
        pool = max(match_k, rerank_pool) if match_k > 0 else 0
        matches = matcher.match(np.stack([r.latent.numpy() for r in results]), k=pool) if results else []
        if pool > match_k:
            targets = to_tensor([f.image for f in faces])
            matches = [
                rerank_by_image(generator, r.space, targets[i], found, matcher)[:match_k]
                for i, (r, found) in enumerate(zip(results, matches, strict=True))
            ]
    finally:
        if own_store:
            st.dispose()
    sizes = {"n_generated": calibration.n_generated, "n_real": calibration.n_real} if calibration else None
    out = []
    for face, r, m in zip(faces, results, matches, strict=True):
        target = to_tensor([face.image])[0]
        out.append(
            Evidence(
                generator=generator_name,
                family=info.family,
                space=r.space,
                latent=r.latent.numpy().astype(np.float32),
                target=face.image,
                reconstruction=to_image(r.reconstruction),
                difference=difference_map(target, r.reconstruction),
                lpips=r.lpips,
                mse=r.mse,
                probability_generated=calibration.probability(r.lpips) if calibration else None,
                calibration_sizes=sizes,
                latent_matches=m,
                steps=r.steps,
                seconds=r.seconds,
                loss_trace=r.loss_trace,
                start_index=r.start_index,
                face={"how": face.how, "box": face.box, "score": face.score},
            )
        )
    return out


def _report_step(progress: Callable[[int, int], None], steps: int, step: int, _active_rows: int) -> None:
    progress(step + 1, steps)  # the projector counts steps from 0


def rerank_by_image(
    generator: Any, space: str, target: torch.Tensor, found: list[LatentMatch], matcher: LatentMatcher
) -> list[LatentMatch]:
    """``found`` ordered by the pixel MSE between each stored latent's image and ``target`` ``[3, R, R]``.

    The projected latent of a perturbed generated face points roughly towards its true latent (cosine ~0.5 for
    DCGAN z); rendering the nearest candidates and comparing images separates the true one from look-alikes.
    """
    if not found:
        return found
    vecs = matcher.vectors([m.latent_id for m in found])
    shape = generator.latent_shape(space)
    device = next(generator.parameters()).device
    with torch.no_grad():
        latents = (
            torch.from_numpy(np.stack([vecs[m.latent_id] for m in found])).reshape(-1, *shape).to(device)
        )
        images = generator.synthesize(latents, space)  # [n, 3, R, R]
        mse = (images.cpu() - target[None]).square().mean(dim=(1, 2, 3))  # [n]
    for m, e in zip(found, mse.tolist(), strict=True):
        m.image_mse = float(e)
    return sorted(found, key=lambda m: m.image_mse if m.image_mse is not None else float("inf"))


def project_images(
    settings: Settings,
    images: Sequence[Image.Image],
    generator_name: str,
    *,
    device: str | torch.device | None = None,
    steps: int | None = None,
    config: ProjectionConfig | None = None,
    detector: Any | None = None,
    store: Store | None = None,
    match_k: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> list[Evidence]:
    """One ``Evidence`` per image, in input order: its face (see ``prepare_face``) projected into the generator.

    ``detector``: an MTCNN ``FaceDetector``; ``None`` loads the configured one (``SLEUTH_FACE_DETECTOR``) if any.
    ``steps`` overrides the configured number of projection steps.
    """
    own_store = store is None
    st = store or open_store(settings)
    try:
        generator, info = load_generator(settings, generator_name, device=device or settings.device, store=st)
        if detector is None and settings.face_detector is not None:
            from indexer.faces import load_face_detector

            detector = load_face_detector(settings)
        faces = [prepare_face(im, generator.resolution, detector=detector) for im in images]
        if steps is not None:
            config = replace(config, steps=steps) if config else projection_config(info, steps=steps)
        return project_faces(
            settings, faces, generator_name, device=device, config=config, store=st, match_k=match_k,
            progress=progress,
        )  # fmt: skip
    finally:
        if own_store:
            st.dispose()
