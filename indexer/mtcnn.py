"""MTCNN face detector with 5 landmarks, written from Zhang et al. 2016 ("Joint Face Detection and Alignment
using Multi-task Cascaded Convolutional Networks").

Three cascaded networks:

* **P-Net** (fully convolutional, 12x12 receptive field, stride 2) runs over an image pyramid and proposes
  candidate windows with a face score and a bounding-box regression;
* **R-Net** rescores and refines the surviving windows from 24x24 crops;
* **O-Net** rescores and refines them once more from 48x48 crops and places 5 landmarks.

Between stages: score thresholds (0.6, 0.7, 0.7), non-maximum suppression (per pyramid scale, across scales,
per stage), bounding-box regression, and squaring of the windows.

The parameter names and shapes follow the widely distributed PyTorch conversion of the original Caffe weights
(``conv1, prelu1, ..., conv4_1, conv4_2`` for P-Net; ``dense4, dense5_1, dense5_2`` for R-Net;
``dense5, dense6_1, dense6_2, dense6_3`` for O-Net). Facts about those weights, established by inspecting them
and checking the detections on real faces:

* pixels are normalised as ``(x - 127.5) / 128``;
* the convolution kernels work on images in their natural (H, W) orientation, but the dense layers were
  trained on feature maps flattened in (W, H, C) order (the original Caffe/Matlab pipeline stored images
  transposed), so the feature map is permuted to ``[N, W, H, C]`` before flattening;
* the face score is channel 1 of a 2-way softmax; the box regression is ``(dx1, dy1, dx2, dy2)`` as fractions of
  the window's width/height; the landmarks are 5 x-fractions followed by 5 y-fractions of the window.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, roi_align

from indexer.errors import ModelUnavailableError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

WEIGHT_FILES: tuple[str, ...] = ("pnet.pt", "rnet.pt", "onet.pt")
PYRAMID_FACTOR = 0.709
THRESHOLDS: tuple[float, float, float] = (0.6, 0.7, 0.7)
PNET_STRIDE = 2
PNET_CELL = 12


@dataclass(frozen=True)
class DetectedFace:
    """One face: its box, its 5 landmarks and the O-Net score."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    landmarks: tuple[
        tuple[float, float], ...
    ]  # 5 points (x, y): left eye, right eye, nose, mouth left, mouth right
    score: float


# --- networks ---------------------------------------------------------------------------------------------


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, W*H*C]`` in (W, H, C) order, the order the dense layers were trained on."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network: ``[N, 3, H, W]`` -> face probability ``[N, H', W']`` and regression ``[N, 4, H', W']``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.ndim == 4 and x.shape[1] == 3, "expected [N, 3, H, W]"
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 10, (H-2)/2, (W-2)/2]
        x = self.prelu2(self.conv2(x))  # [N, 16, ., .]
        x = self.prelu3(self.conv3(x))  # [N, 32, H', W'] with H' = ceil((H-2)/2) - 4
        prob = torch.softmax(self.conv4_1(x), dim=1)[:, 1]  # [N, H', W']
        reg = self.conv4_2(x)  # [N, 4, H', W']
        return prob, reg


class RNet(nn.Module):
    """Refinement network: ``[N, 3, 24, 24]`` -> face probability ``[N]`` and regression ``[N, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.ndim == 4 and tuple(x.shape[1:]) == (3, 24, 24), "expected [N, 3, 24, 24]"
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 28, 11, 11]
        x = self.pool2(self.prelu2(self.conv2(x)))  # [N, 48, 4, 4]
        x = self.prelu3(self.conv3(x))  # [N, 64, 3, 3]
        x = self.prelu4(self.dense4(_flatten_whc(x)))  # [N, 128]
        prob = torch.softmax(self.dense5_1(x), dim=1)[:, 1]  # [N]
        return prob, self.dense5_2(x)  # [N], [N, 4]


class ONet(nn.Module):
    """Output network: ``[N, 3, 48, 48]`` -> probability ``[N]``, regression ``[N, 4]``, landmarks ``[N, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert x.ndim == 4 and tuple(x.shape[1:]) == (3, 48, 48), "expected [N, 3, 48, 48]"
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 32, 23, 23]
        x = self.pool2(self.prelu2(self.conv2(x)))  # [N, 64, 10, 10]
        x = self.pool3(self.prelu3(self.conv3(x)))  # [N, 64, 4, 4]
        x = self.prelu4(self.conv4(x))  # [N, 128, 3, 3]
        x = self.prelu5(self.dense5(_flatten_whc(x)))  # [N, 256]
        prob = torch.softmax(self.dense6_1(x), dim=1)[:, 1]  # [N]
        return prob, self.dense6_2(x), self.dense6_3(x)  # [N], [N, 4], [N, 10]


# --- box helpers ------------------------------------------------------------------------------------------


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 255] -> the networks' input range."""
    return (pixels - 127.5) / 128.0


def _apply_regression(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Shift box edges by the regression, in fractions of the box size. ``[K, 4]``, ``[K, 4]`` -> ``[K, 4]``."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # [K, 4]: w, h, w, h
    return boxes + reg * wh


def _to_square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square of side max(w, h) around its centre. ``[K, 4]`` -> ``[K, 4]``."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [K, 2]
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2  # [K, 1]
    return torch.cat([centre - half, centre + half], dim=1)


def _nms_min(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Greedy NMS where overlap is intersection over the *smaller* area (the paper's final-stage variant).

    Boxes from different ``groups`` (images) never suppress each other. Returns kept indices, best first.
    """
    order = torch.argsort(scores, descending=True)  # [K]
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # [K]
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])  # [K, K, 2]
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])  # [K, K, 2]
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # [K, K]
    overlap = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)  # [K, K]
    g = groups[order]
    suppresses = (overlap > threshold) & (g[:, None] == g[None, :])  # [K, K]
    suppresses = suppresses.cpu()
    alive = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):  # greedy pass over the (few) final boxes
        if alive[i]:
            later = suppresses[i].clone()
            later[: i + 1] = False
            alive &= ~later
    return order[alive.to(order.device)]


# --- detector ---------------------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Windows carried between stages; K rows each."""

    boxes: torch.Tensor  # [K, 4] x1, y1, x2, y2
    scores: torch.Tensor  # [K]
    image_idx: torch.Tensor  # [K] which image of the batch

    def take(self, keep: torch.Tensor) -> _Candidates:
        return _Candidates(self.boxes[keep], self.scores[keep], self.image_idx[keep])


def pyramid_scales(
    height: int, width: int, min_face_size: int, factor: float = PYRAMID_FACTOR
) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces from ``min_face_size`` up to the whole image."""
    if min_face_size < 1:
        raise ValueError("min_face_size must be positive")
    first = PNET_CELL / min_face_size
    scales: list[float] = []
    scale = first
    while min(height, width) * scale >= PNET_CELL:
        scales.append(scale)
        scale *= factor
    return scales


def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float pixels ``[3, H, W]`` in [0, 255]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class FaceDetector:
    """MTCNN: faces with 5 landmarks. Build with :meth:`from_dir`; call :meth:`detect` or :meth:`detect_batch`."""

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        *,
        device: str = "cpu",
        thresholds: tuple[float, float, float] = THRESHOLDS,
    ) -> None:
        self.device = torch.device(device)
        self.pnet = pnet.to(self.device).eval()
        self.rnet = rnet.to(self.device).eval()
        self.onet = onet.to(self.device).eval()
        self.thresholds = thresholds

    @classmethod
    def from_dir(cls, folder: str | Path, *, device: str = "cpu") -> FaceDetector:
        """Load ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (state dicts) from ``folder``."""
        folder = Path(folder)
        nets: list[nn.Module] = [PNet(), RNet(), ONet()]
        for name, net in zip(WEIGHT_FILES, nets, strict=True):
            try:
                net.load_state_dict(_load_state_dict(folder / name))
            except RuntimeError as exc:  # missing/unexpected keys or wrong shapes
                raise ModelUnavailableError(f"{folder / name} does not match MTCNN's layout: {exc}") from exc
        pnet, rnet, onet = nets
        assert isinstance(pnet, PNet) and isinstance(rnet, RNet) and isinstance(onet, ONet)
        logger.info("loaded MTCNN from %s on %s", folder, device)
        return cls(pnet, rnet, onet, device=device)

    def detect(self, image: Image.Image, *, min_face_size: int = 20) -> list[DetectedFace]:
        """Faces in ``image``, best score first."""
        return self.detect_batch([image], min_face_size=min_face_size)[0]

    @torch.inference_mode()
    def detect_batch(
        self, images: Sequence[Image.Image], *, min_face_size: int = 20
    ) -> list[list[DetectedFace]]:
        """Faces in each image (best score first). Same-size images share P-Net passes; R-Net and O-Net run
        once over the windows of all images."""
        pixels = [_image_to_tensor(im).to(self.device) for im in images]  # each [3, H, W]
        cand = self._propose(pixels, min_face_size)
        if len(cand.scores):
            cand = self._refine(pixels, cand)
        if len(cand.scores):
            cand, landmarks = self._output(pixels, cand)
        else:
            landmarks = torch.zeros((0, 5, 2), device=self.device)
        return self._to_faces(pixels, cand, landmarks, len(images))

    # --- stage 1: P-Net over the pyramid -------------------------------------------------------------------

    def _propose(self, pixels: list[torch.Tensor], min_face_size: int) -> _Candidates:
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(pixels):
            by_size.setdefault((p.shape[1], p.shape[2]), []).append(i)
        parts: list[_Candidates] = []
        for (height, width), indices in by_size.items():
            batch = torch.stack([pixels[i] for i in indices])  # [B, 3, H, W]
            index_map = torch.tensor(indices, device=self.device)  # [B]
            for scale in pyramid_scales(height, width, min_face_size):
                parts.append(self._pnet_at_scale(batch, index_map, scale))
        cand = _cat(parts, self.device)
        if not len(cand.scores):
            return cand
        keep = batched_nms(cand.boxes, cand.scores, cand.image_idx, 0.7)  # across scales
        cand = cand.take(keep)
        return cand

    def _pnet_at_scale(self, batch: torch.Tensor, index_map: torch.Tensor, scale: float) -> _Candidates:
        size = (int(np.ceil(batch.shape[2] * scale)), int(np.ceil(batch.shape[3] * scale)))
        resized = F.interpolate(batch, size=size, mode="area")  # [B, 3, h, w]
        prob, reg = self.pnet(_normalise(resized))  # [B, h', w'], [B, 4, h', w']
        b, yy, xx = torch.nonzero(prob >= self.thresholds[0], as_tuple=True)  # each [K]
        scores = prob[b, yy, xx]  # [K]
        # Cell (y, x) of the map sees the 12x12 window at (2x, 2y) of the resized image.
        corner = torch.stack([xx, yy], dim=1).to(batch.dtype) * PNET_STRIDE  # [K, 2]
        boxes = torch.cat([corner, corner + PNET_CELL], dim=1) / scale  # [K, 4] in image pixels
        boxes = _apply_regression(boxes, reg[b, :, yy, xx])  # [K, 4]
        image_idx = index_map[b]
        keep = batched_nms(boxes, scores, image_idx, 0.5)  # within this scale
        return _Candidates(_to_square(boxes[keep]), scores[keep], image_idx[keep])

    # --- stages 2 and 3 -----------------------------------------------------------------------------------

    def _crops(self, pixels: list[torch.Tensor], cand: _Candidates, size: int) -> torch.Tensor:
        """Windows resampled to ``size`` x ``size``, black outside the image: ``[K, 3, size, size]``."""
        out = torch.zeros((len(cand.scores), 3, size, size), device=self.device)
        for i in torch.unique(cand.image_idx).tolist():
            rows = torch.nonzero(cand.image_idx == i, as_tuple=True)[0]  # [k]
            # sampling_ratio=0 averages ceil(window/size) samples per output pixel: an area-like downscale.
            crops = roi_align(
                pixels[i][None],
                [cand.boxes[rows]],
                output_size=size,
                spatial_scale=1.0,
                sampling_ratio=0,
                aligned=True,
            )  # [k, 3, size, size]
            out[rows] = crops
        return _normalise(out)

    def _refine(self, pixels: list[torch.Tensor], cand: _Candidates) -> _Candidates:
        prob, reg = self.rnet(self._crops(pixels, cand, 24))  # [K], [K, 4]
        ok = prob >= self.thresholds[1]
        cand = _Candidates(cand.boxes[ok], prob[ok], cand.image_idx[ok])
        reg = reg[ok]
        keep = batched_nms(cand.boxes, cand.scores, cand.image_idx, 0.7)
        cand, reg = cand.take(keep), reg[keep]
        return _Candidates(_to_square(_apply_regression(cand.boxes, reg)), cand.scores, cand.image_idx)

    def _output(self, pixels: list[torch.Tensor], cand: _Candidates) -> tuple[_Candidates, torch.Tensor]:
        prob, reg, marks = self.onet(self._crops(pixels, cand, 48))  # [K], [K, 4], [K, 10]
        ok = prob >= self.thresholds[2]
        boxes, reg, marks = cand.boxes[ok], reg[ok], marks[ok]
        wh = boxes[:, 2:] - boxes[:, :2]  # [K, 2]
        xs = boxes[:, 0:1] + wh[:, 0:1] * marks[:, :5]  # [K, 5]
        ys = boxes[:, 1:2] + wh[:, 1:2] * marks[:, 5:]  # [K, 5]
        landmarks = torch.stack([xs, ys], dim=2)  # [K, 5, 2]
        cand = _Candidates(_apply_regression(boxes, reg), prob[ok], cand.image_idx[ok])
        keep = _nms_min(cand.boxes, cand.scores, cand.image_idx, 0.7)
        return cand.take(keep), landmarks[keep]

    def _to_faces(
        self, pixels: list[torch.Tensor], cand: _Candidates, landmarks: torch.Tensor, n_images: int
    ) -> list[list[DetectedFace]]:
        faces: list[list[DetectedFace]] = [[] for _ in range(n_images)]
        order = torch.argsort(cand.scores, descending=True).tolist()
        boxes, scores = cand.boxes.cpu(), cand.scores.cpu()
        idx, marks = cand.image_idx.cpu(), landmarks.cpu()
        for k in order:
            i = int(idx[k])
            height, width = pixels[i].shape[1:]
            x1, y1, x2, y2 = boxes[k].tolist()
            box = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
            points = tuple((float(x), float(y)) for x, y in marks[k].tolist())
            faces[i].append(DetectedFace(box=box, landmarks=points, score=float(scores[k])))
        return faces


def _cat(parts: list[_Candidates], device: torch.device) -> _Candidates:
    if not parts:
        empty = torch.zeros((0,), device=device)
        return _Candidates(torch.zeros((0, 4), device=device), empty, empty.long())
    return _Candidates(
        torch.cat([p.boxes for p in parts]),
        torch.cat([p.scores for p in parts]),
        torch.cat([p.image_idx for p in parts]),
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, read without executing code; typed errors for every failure."""
    if not path.is_file():
        raise ModelUnavailableError(
            f"MTCNN weights file missing: {path} (set SLEUTH_FACE_DETECTOR to a folder with "
            f"{', '.join(WEIGHT_FILES)})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path} is not a plain tensor state dict: {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read MTCNN weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelUnavailableError(f"{path} does not hold a state dict")
    return state


__all__ = ["DetectedFace", "FaceDetector", "ONet", "PNet", "RNet", "pyramid_scales"]
