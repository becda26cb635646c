"""CLIP image embedders: open_clip hub tags, local open_clip folders and ONNX image towers, behind one Protocol.

Model ids (the value of ``SLEUTH_CLIP_MODEL`` / ``--clip-model``):

- ``open_clip:ARCH/TAG`` (``open_clip:ViT-B-32/laion2b_s34b_b79k``): open_clip's pretrained weights, fetched
  through the Hugging Face hub cache. Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable, a tag that
  is not cached fails at once with :class:`ModelUnavailableError` (no retry loop).
- ``local-dir:/path``: a folder in open_clip's HF layout: ``open_clip_config.json`` (``model_cfg`` and
  ``preprocess_cfg``) plus ``open_clip_model.safetensors``, ``open_clip_pytorch_model.safetensors`` or
  ``open_clip_pytorch_model.bin`` (read with ``torch.load(weights_only=True)``). A bare folder path means this.
- ``onnx:/path/model.onnx``: an image tower run by onnxruntime. A bare path ending in ``.onnx`` means this.
  Preprocessing comes from the first of ``model.json`` (the model path with a ``.json`` suffix),
  ``preprocess.json`` or ``preprocessor_config.json`` in the model's folder, else CLIP's standard one.
  Accepted keys (see :func:`preprocess_from_json`): ``image_size`` (int or ``[h, w]``), ``mean``, ``std``,
  ``interpolation`` (bicubic, bilinear, nearest, lanczos, box, hamming), ``resize_mode`` (shortest: scale
  the short side then centre-crop; squash: resize to the exact size; longest: scale the long side then pad
  with ``fill_color``), ``crop`` (``false`` = squash), ``resize_size`` (short side before the centre crop),
  and Hugging Face ``CLIPImageProcessor`` keys (``size``, ``crop_size``, ``image_mean``, ``image_std``,
  ``resample``, ``do_center_crop``, ``do_resize``).
- ``file:PATH`` or any other bare path: resolved as above by what it is; anything else is an error.

Every embedder returns ``[N, dim]`` float32 rows of unit L2 norm and is deterministic. Preprocessing is
one batched implementation (PIL resize per image, then one vectorised normalisation of the stacked
batch) that reproduces open_clip's eval transform.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from indexer.errors import ModelUnavailableError, UnsupportedQueryError

logger = logging.getLogger(__name__)

SETTING_HINT = "set SLEUTH_CLIP_MODEL (or --clip-model)"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LOCAL_DIR_CONFIG = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
ONNX_PREPROCESS_FILES = ("preprocess.json", "preprocessor_config.json")
KINDS = ("open_clip", "local-dir", "onnx", "file")
HUB_PROBE_TIMEOUT_S = 5.0

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "random": Image.Resampling.BICUBIC,  # open_clip's "random" is bicubic at inference
}
_PIL_CODES = {int(v): k for k, v in _RESAMPLING.items() if k != "random"}


@runtime_checkable
class ImageEmbedder(Protocol):
    """What ingest and search need from an image model."""

    model_id: str  # as given by the user
    model_key: str  # first 16 hex of sha256(model_id + weights_sha256): keys the stored vectors
    dim: int
    weights_sha256: str

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[N, dim]`` float32 embeddings with unit L2 norm, in the order of ``images``."""
        ...


@dataclass(frozen=True)
class ModelCheck:
    """Outcome of :func:`check_model` (what ``sleuth models check`` prints)."""

    model_id: str
    kind: str
    ok: bool
    path: str | None
    weights_sha256: str | None
    dim: int | None
    message: str


# --- preprocessing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing of a CLIP image tower (open_clip's eval transform, generalised)."""

    image_size: tuple[int, int] = (224, 224)  # (height, width) of the model input
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest | squash | longest
    resize_size: int | None = None  # short side before the centre crop (shortest mode); None: crop size
    fill_color: int = 0  # padding value of longest mode

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"resize_mode must be shortest, squash or longest, got {self.resize_mode!r}")
        if self.interpolation not in _RESAMPLING:
            raise ValueError(
                f"interpolation must be one of {sorted(_RESAMPLING)}, got {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean} and {self.std}")
        if min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        """One RGB image resized and cropped/padded to exactly ``image_size``."""
        height, width = self.image_size
        resample = _RESAMPLING[self.interpolation]
        w, h = image.size
        if self.resize_mode == "squash":
            return image.resize((width, height), resample)
        if self.resize_mode == "shortest" and self.resize_size is None and height == width:
            # torchvision Resize(int): short side to size, long side truncated (what open_clip uses)
            new_w, new_h = (height, int(height * h / w)) if w <= h else (int(height * w / h), height)
        elif self.resize_mode == "shortest" and self.resize_size is not None:
            short = self.resize_size
            new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        else:
            # open_clip's ResizeKeepRatio: shortest (non-square) covers the target, longest fits inside it
            ratio = (
                min(h / height, w / width) if self.resize_mode == "shortest" else max(h / height, w / width)
            )
            new_w, new_h = round(w / ratio), round(h / ratio)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        if new_w < width or new_h < height:  # longest mode: pad to the target, centred
            canvas = Image.new("RGB", (max(new_w, width), max(new_h, height)), (self.fill_color,) * 3)
            canvas.paste(image, ((canvas.width - new_w) // 2, (canvas.height - new_h) // 2))
            image, new_w, new_h = canvas, canvas.width, canvas.height
        top = int(round((new_h - height) / 2.0))
        left = int(round((new_w - width) / 2.0))
        if (top, left, new_w, new_h) == (0, 0, width, height):
            return image
        return image.crop((left, top, left + width, top + height))

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[N, 3, H, W]`` float32 model input for a batch of images."""
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        height, width = self.image_size
        batch = np.empty((len(images), height, width, 3), dtype=np.uint8)  # [N, H, W, 3]
        for i, image in enumerate(images):
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            batch[i] = np.asarray(self._resize_and_crop(rgb), dtype=np.uint8)
        mean = np.asarray(self.mean, dtype=np.float32)  # [3]
        std = np.asarray(self.std, dtype=np.float32)  # [3]
        pixels = batch.astype(np.float32) / np.float32(255.0)  # [N, H, W, 3] in [0, 1]
        pixels = (pixels - mean) / std  # [N, H, W, 3]
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # [N, 3, H, W]


def _size_pair(value: Any) -> tuple[int, int]:
    """``(h, w)`` from an int, a ``[h, w]`` list or a ``{"height", "width"}`` dict."""
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
        raise ValueError(f"cannot read an image size from {value}")
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return int(value[0]), int(value[0])
        if len(value) == 2:
            return int(value[0]), int(value[1])
        raise ValueError(f"image size needs 1 or 2 values, got {value}")
    return int(value), int(value)


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values, got {value}")
    return values[0], values[1], values[2]


def preprocess_from_json(
    config: dict[str, Any], *, default_size: tuple[int, int] | None = None
) -> Preprocess:
    """Preprocessing from a JSON object (Sleuth/open_clip keys, or Hugging Face CLIPImageProcessor keys)."""
    if "preprocess_cfg" in config and isinstance(config["preprocess_cfg"], dict):
        config = config["preprocess_cfg"]  # an open_clip_config.json
    size = default_size or (224, 224)
    resize_size: int | None = None
    resize_mode = str(config.get("resize_mode", "shortest"))
    if "image_size" in config:
        size = _size_pair(config["image_size"])
    elif "crop_size" in config and config.get("do_center_crop", True):
        size = _size_pair(config["crop_size"])
        if isinstance(config.get("size"), dict) and "shortest_edge" in config["size"]:
            resize_size = int(config["size"]["shortest_edge"])
        elif isinstance(config.get("size"), int):
            resize_size = int(config["size"])
    elif "size" in config:
        size = _size_pair(config["size"])
        if isinstance(config["size"], dict) and "height" in config["size"]:
            resize_mode = "squash"
    if "resize_size" in config:
        resize_size = int(config["resize_size"])
    if config.get("crop") is False or config.get("do_center_crop") is False:
        resize_mode = "squash"
    if resize_size is not None and resize_size == size[0] == size[1]:
        resize_size = None
    interpolation = config.get("interpolation", "bicubic")
    if "resample" in config and "interpolation" not in config:
        interpolation = _PIL_CODES.get(int(config["resample"]), "")
        if not interpolation:
            raise ValueError(f"unknown PIL resample code {config['resample']}")
    mean = config.get("mean", config.get("image_mean", OPENAI_MEAN))
    std = config.get("std", config.get("image_std", OPENAI_STD))
    if config.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if config.get("do_resize") is False:
        raise ValueError("do_resize=false is not supported: the model needs a fixed input size")
    rescale = float(config.get("rescale_factor", 1 / 255))
    if abs(rescale * 255 - 1) > 1e-6:
        raise ValueError(f"only rescale_factor 1/255 is supported, got {rescale}")
    return Preprocess(
        image_size=size,
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        interpolation=str(interpolation),
        resize_mode=resize_mode,
        resize_size=resize_size,
        fill_color=int(config.get("fill_color", 0)),
    )


# --- model ids, files, hashes ---------------------------------------------------------------------
def parse_model_id(model_id: str) -> tuple[str, str]:
    """``(kind, rest)`` of a model id; kind is one of ``open_clip``, ``local-dir``, ``onnx``, ``file``.

    Bare paths are classified: a path ending in ``.onnx`` is ``onnx``, an existing folder is ``local-dir``,
    anything else is ``file`` (``file:PATH`` too), which :func:`load_embedder` reports as unusable.
    """
    text = model_id.strip()
    if not text:
        raise ModelUnavailableError(f"empty CLIP model id: {SETTING_HINT}")
    for kind in ("open_clip", "local-dir", "onnx"):
        if text.startswith(kind + ":"):
            rest = text[len(kind) + 1 :].strip()
            if not rest:
                raise ModelUnavailableError(f"model id {model_id!r} has nothing after '{kind}:'")
            return kind, rest
    if text.startswith("file:"):
        text = text[len("file:") :].removeprefix("//")
    path = Path(text).expanduser()
    if text.lower().endswith(".onnx"):
        return "onnx", text
    if path.is_dir():
        return "local-dir", text
    return "file", text


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    logger.debug("sha256 of %s (%d bytes, mtime %d) computed", path, size, mtime_ns)
    return digest.hexdigest()


def model_key_for(model_id: str, weights_sha256: str) -> str:
    """Short stable key of (model id, weights): first 16 hex digits of ``sha256(model_id + weights_sha256)``."""
    return hashlib.sha256((model_id + weights_sha256).encode("utf-8")).hexdigest()[:16]


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """``[N, D]`` float32 rows scaled to unit norm (a zero row stays zero)."""
    assert vectors.ndim == 2, vectors.shape
    vectors = vectors.astype(np.float32, copy=False)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [N, 1]
    return vectors / np.maximum(norms, np.float32(1e-12))


def _missing(what: str, path: Path, model_id: str) -> ModelUnavailableError:
    return ModelUnavailableError(f"CLIP model {model_id!r}: {what} not found: {path}; {SETTING_HINT}")


# --- torch (open_clip) embedder -------------------------------------------------------------------
class OpenClipEmbedder:
    """An open_clip model's image tower run with torch."""

    def __init__(
        self,
        *,
        model_id: str,
        visual: Any,
        preprocess: Preprocess,
        dim: int,
        weights_sha256: str,
        weights_path: Path,
        device: str,
        batch_size: int,
        model: Any | None = None,
        tokenizer_name: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.model_key = model_key_for(model_id, weights_sha256)
        self.dim = dim
        self.weights_path = weights_path
        self.preprocess = preprocess
        self.device = device
        self.batch_size = batch_size
        self._visual = visual
        self._model = model  # the whole CLIP, for its text tower (None: image tower only)
        self._tokenizer_name = tokenizer_name
        self._tokenizer: Any | None = None

    @property
    def has_text(self) -> bool:
        return self._model is not None and hasattr(self._model, "encode_text")

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, dim]`` float32 unit embeddings of ``texts`` by the text tower (same space as the images)."""
        import torch

        if not self.has_text:
            raise ModelUnavailableError(f"CLIP model {self.model_id!r} was loaded without its text tower")
        if self._tokenizer is None:
            import open_clip

            try:
                self._tokenizer = open_clip.get_tokenizer(self._tokenizer_name or "")
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelUnavailableError(
                    f"CLIP model {self.model_id!r}: cannot load its tokenizer: {exc}"
                ) from exc
        assert self._model is not None
        tokens = self._tokenizer(list(texts)).to(self.device)  # [N, context_length] int64
        try:
            with torch.inference_mode():
                features = self._model.encode_text(tokens)  # [N, D]
        except IndexError as exc:  # token ids past the text tower's vocabulary: tokenizer and model disagree
            raise ModelUnavailableError(
                f"CLIP model {self.model_id!r}: its tokenizer does not fit its text tower ({exc})"
            ) from exc
        assert features.shape == (len(texts), self.dim), features.shape
        return _l2_normalise(features.float().cpu().numpy())

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        out = np.empty((len(images), self.dim), dtype=np.float32)  # [N, D]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.from_numpy(self.preprocess(chunk)).to(self.device)  # [B, 3, H, W]
            with torch.inference_mode():
                features = self._visual(pixels)  # [B, D]
            assert features.shape == (len(chunk), self.dim), features.shape
            out[start : start + len(chunk)] = features.float().cpu().numpy()
        return _l2_normalise(out)


def _torch_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailableError(f"device {device!r} requested but CUDA is not available (SLEUTH_DEVICE)")
    return device


def _preprocess_of(model: Any) -> Preprocess:
    """Sleuth's :class:`Preprocess` equivalent of ``model.visual.preprocess_cfg`` (set by open_clip)."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return Preprocess(
        image_size=_size_pair(cfg.get("size", 224)),
        mean=_triple(cfg.get("mean", OPENAI_MEAN), "mean"),
        std=_triple(cfg.get("std", OPENAI_STD), "std"),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
        fill_color=int(cfg.get("fill_color", 0)),
    )


def _load_local_dir(model_id: str, folder: str, device: str, batch_size: int) -> OpenClipEmbedder:
    """An open_clip folder (HF layout), loaded through open_clip's own ``local-dir:`` schema."""
    import open_clip

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise _missing("model folder", root, model_id)
    config_path = root / LOCAL_DIR_CONFIG
    if not config_path.is_file():
        raise _missing(LOCAL_DIR_CONFIG, config_path, model_id)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelUnavailableError(f"CLIP model {model_id!r}: cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ModelUnavailableError(f"CLIP model {model_id!r}: {config_path} has no 'model_cfg'")
    weights = next((root / name for name in LOCAL_DIR_WEIGHTS if (root / name).is_file()), None)
    if weights is None:
        raise ModelUnavailableError(
            f"CLIP model {model_id!r}: no weights file in {root} "
            f"(expected one of {', '.join(LOCAL_DIR_WEIGHTS)}); {SETTING_HINT}"
        )
    device = _torch_device(device)
    try:
        # open_clip's own local-dir: schema picks the same file (its preferred names, in this order)
        model, _, _ = open_clip.create_model_and_transforms(
            f"local-dir:{root.resolve()}", device=device, weights_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelUnavailableError(f"CLIP model {model_id!r}: cannot load {weights}: {exc}") from exc
    model.eval()
    return OpenClipEmbedder(
        model_id=model_id,
        visual=model.visual,
        preprocess=_preprocess_of(model),
        dim=int(config["model_cfg"]["embed_dim"]),
        weights_sha256=_file_sha256(weights),
        weights_path=weights,
        device=device,
        batch_size=batch_size,
        model=model,
        tokenizer_name=f"local-dir:{root.resolve()}",
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "ON", "YES", "TRUE")


def _hub_unreachable(url: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (one HEAD request, no retries), or None when it answers at all.

    huggingface_hub retries connection errors for ~45 s before giving up; this probe fails in one go.
    Any HTTP status (even 401 or 404) means the hub is reachable: the download then reports the details.
    """
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def _weights_candidates(filename: str) -> list[str]:
    """Safetensors alternatives first (what open_clip prefers), then the file the tag names."""
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    stem, suffix = os.path.splitext(filename)
    return [stem + ".safetensors", filename] if suffix in (".bin", ".pth", ".pt") else [filename]


def _resolve_tag_weights(model_id: str, arch: str, tag: str, cfg: dict[str, Any]) -> Path:
    """Local path of a tag's weights: the HF cache first; a download only when online."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    hub = str(cfg.get("hf_hub", ""))
    if not hub:
        raise ModelUnavailableError(
            f"CLIP model {model_id!r}: tag {arch}/{tag} has no Hugging Face hub file; download its weights "
            f"and point SLEUTH_CLIP_MODEL at a local-dir: folder or an onnx: file"
        )
    repo, filename = os.path.split(hub)  # "org/name/" means open_clip's default weights file
    filename = filename or "open_clip_pytorch_model.bin"
    candidates = _weights_candidates(filename)
    for name in candidates:
        cached = huggingface_hub.try_to_load_from_cache(repo, name)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)
    unavailable = (
        f"CLIP model {model_id!r}: tag {arch}/{tag} (hub repo {repo}, file {candidates[-1]}) is not in the "
        f"local Hugging Face cache and the hub is unreachable"
    )
    remedy = (
        "point SLEUTH_CLIP_MODEL (or --clip-model) at a local onnx:/path/model.onnx or local-dir:/path model"
    )
    if _hub_offline():
        raise ModelUnavailableError(f"{unavailable} (HF_HUB_OFFLINE is set); {remedy}")
    probe_error = _hub_unreachable(huggingface_hub.hf_hub_url(repo, candidates[-1]))
    if probe_error is not None:
        raise ModelUnavailableError(f"{unavailable} ({probe_error}); {remedy}")
    for name in candidates:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, name, etag_timeout=5))
        except RemoteEntryNotFoundError:
            logger.debug("%s has no %s, trying the next candidate", repo, name)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise ModelUnavailableError(f"{unavailable} ({type(exc).__name__}: {exc}); {remedy}") from exc
    raise ModelUnavailableError(
        f"CLIP model {model_id!r}: hub repo {repo} has none of {candidates}; {remedy}"
    )


def _load_open_clip_tag(model_id: str, spec: str, device: str, batch_size: int) -> OpenClipEmbedder:
    """``ARCH/TAG`` of open_clip's pretrained list, weights through the HF hub cache."""
    import open_clip

    arch, sep, tag = spec.partition("/")
    if not sep or not arch or not tag:
        raise ModelUnavailableError(f"CLIP model {model_id!r}: expected open_clip:ARCH/TAG")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ModelUnavailableError(f"CLIP model {model_id!r}: open_clip has no architecture {arch!r}")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch))
        raise ModelUnavailableError(
            f"CLIP model {model_id!r}: unknown tag {tag!r} for {arch} (known: {tags})"
        )
    weights = _resolve_tag_weights(model_id, arch, tag, cfg)
    device = _torch_device(device)
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            arch,
            pretrained=str(weights),
            device=device,
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"),
            image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
            weights_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelUnavailableError(f"CLIP model {model_id!r}: cannot load {weights}: {exc}") from exc
    model.eval()
    return OpenClipEmbedder(
        model_id=model_id,
        visual=model.visual,
        preprocess=_preprocess_of(model),
        dim=int(model_cfg["embed_dim"]),
        weights_sha256=_file_sha256(weights),
        weights_path=weights,
        device=device,
        batch_size=batch_size,
        model=model,
        tokenizer_name=arch,
    )


# --- ONNX embedder --------------------------------------------------------------------------------
class OnnxEmbedder:
    """A CLIP image tower exported to ONNX, run by onnxruntime."""

    def __init__(
        self,
        *,
        model_id: str,
        session: Any,
        preprocess: Preprocess,
        weights_sha256: str,
        weights_path: Path,
        batch_size: int,
    ) -> None:
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.model_key = model_key_for(model_id, weights_sha256)
        self.weights_path = weights_path
        self.preprocess = preprocess
        self.batch_size = batch_size
        self._session = session
        model_input = session.get_inputs()[0]
        self._input_name: str = model_input.name
        self._input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        outputs = session.get_outputs()
        named = [o for o in outputs if o.name == "image_embeds"]
        self._output_name: str = (named or outputs)[0].name
        self.dim = self._output_dim()

    def _output_dim(self) -> int:
        output = next(o for o in self._session.get_outputs() if o.name == self._output_name)
        if output.shape and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
        probe = Image.new("RGB", self.preprocess.image_size[::-1], (127, 127, 127))
        return int(self._run([probe]).shape[1])

    def _run(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.preprocess(images).astype(self._input_dtype, copy=False)  # [B, 3, H, W]
        (features,) = self._session.run([self._output_name], {self._input_name: pixels})
        if features.ndim != 2 or features.shape[0] != len(images):
            raise ModelUnavailableError(
                f"CLIP model {self.model_id!r}: output {self._output_name!r} has shape {features.shape}, "
                f"expected [{len(images)}, dim]"
            )
        return np.asarray(features, dtype=np.float32)  # [B, D]

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)  # [N, D]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._run(chunk)
        return _l2_normalise(out)


def onnx_preprocess_path(model_path: Path) -> Path | None:
    """The preprocessing JSON that goes with an ONNX model, if any (first match wins)."""
    candidates = [model_path.with_suffix(".json")] + [model_path.parent / n for n in ONNX_PREPROCESS_FILES]
    return next((p for p in candidates if p.is_file()), None)


def _session_input_size(session: Any) -> tuple[int, int] | None:
    shape = session.get_inputs()[0].shape  # [N, 3, H, W], N usually symbolic
    if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return int(shape[2]), int(shape[3])
    return None


def _load_onnx(
    model_id: str, path_text: str, device: str, batch_size: int, threads: int | None
) -> OnnxEmbedder:
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    # onnxruntime's load errors are pybind classes with no common base narrower than Exception
    ort_load_errors: tuple[type[Exception], ...] = (
        ort_state.Fail,
        ort_state.InvalidProtobuf,
        ort_state.NoSuchFile,
        ort_state.InvalidGraph,
        ort_state.InvalidArgument,
        ort_state.NotImplemented,
        ort_state.RuntimeException,
        RuntimeError,
        OSError,
    )

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise _missing("ONNX model file", path, model_id)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            logger.warning("device %s requested but onnxruntime has no CUDA provider: using the CPU", device)
    options = ort.SessionOptions()
    # After a run, onnxruntime's worker threads spin-wait for more work by default; in a query they would burn
    # the cores that verification needs next (measured: verification 143 ms p50 in-query vs 97 ms alone).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except ort_load_errors as exc:
        raise ModelUnavailableError(
            f"CLIP model {model_id!r}: onnxruntime cannot load {path}: {exc}"
        ) from exc
    input_size = _session_input_size(session)
    json_path = onnx_preprocess_path(path)
    if json_path is None:
        preprocess = Preprocess(image_size=input_size or (224, 224))
        logger.info("%s: no preprocessing JSON beside the model, using CLIP's standard one", model_id)
    else:
        try:
            preprocess = preprocess_from_json(
                json.loads(json_path.read_text(encoding="utf-8")), default_size=input_size
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ModelUnavailableError(
                f"CLIP model {model_id!r}: bad preprocessing file {json_path}: {exc}"
            ) from exc
    if input_size is not None and input_size != preprocess.image_size:
        raise ModelUnavailableError(
            f"CLIP model {model_id!r}: the model takes {input_size} images but preprocessing gives "
            f"{preprocess.image_size} ({json_path or 'default'})"
        )
    return OnnxEmbedder(
        model_id=model_id,
        session=session,
        preprocess=preprocess,
        weights_sha256=_file_sha256(path),
        weights_path=path,
        batch_size=batch_size,
    )


# --- public entry points --------------------------------------------------------------------------
def load_embedder(
    model_id: str, *, device: str = "cpu", batch_size: int = 32, threads: int | None = None
) -> ImageEmbedder:
    """Load the image embedder a model id names (see the module doc). Raises ModelUnavailableError.

    ``threads`` sets onnxruntime's intra-op threads (torch models follow ``torch.set_num_threads``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kind, rest = parse_model_id(model_id)
    if kind == "open_clip":
        return _load_open_clip_tag(model_id, rest, device, batch_size)
    if kind == "local-dir":
        return _load_local_dir(model_id, rest, device, batch_size)
    if kind == "onnx":
        return _load_onnx(model_id, rest, device, batch_size, threads)
    path = Path(rest).expanduser()
    if not path.exists():
        raise ModelUnavailableError(
            f"CLIP model {model_id!r}: {path} not found (for an open_clip tag write open_clip:ARCH/TAG); "
            f"{SETTING_HINT}"
        )
    raise ModelUnavailableError(
        f"CLIP model {model_id!r}: {path} is neither an .onnx file nor an open_clip folder; {SETTING_HINT}"
    )


def embed_text(embedder: ImageEmbedder, texts: Sequence[str]) -> np.ndarray:
    """``[N, dim]`` unit text embeddings in the image space of ``embedder`` (CLIP's text tower).

    Raises ``UnsupportedQueryError`` for a model without one (an image-tower ONNX export)."""
    if not getattr(embedder, "has_text", False):
        raise UnsupportedQueryError(
            f"CLIP model {embedder.model_id!r} is an image tower only, so it cannot embed text: text queries "
            f"need a model with its text tower (open_clip:ARCH/TAG or local-dir:/path; {SETTING_HINT})"
        )
    return embedder.embed_text(texts)  # type: ignore[attr-defined, no-any-return]


def check_model(model_id: str, *, device: str = "cpu") -> ModelCheck:
    """Load a model id once and report whether it works (for ``sleuth models check``); never raises for
    an unusable model, it says why in ``message``."""
    try:
        kind, _ = parse_model_id(model_id)
    except ModelUnavailableError as exc:
        return ModelCheck(model_id, "unknown", False, None, None, None, str(exc))
    try:
        embedder = load_embedder(model_id, device=device, batch_size=1)
        probe = Image.new("RGB", (64, 48), (120, 80, 40))
        vector = embedder.embed([probe])  # [1, D]
    except ModelUnavailableError as exc:
        return ModelCheck(model_id, kind, False, None, None, None, str(exc))
    path = getattr(embedder, "weights_path", None)
    if vector.shape != (1, embedder.dim) or not np.isfinite(vector).all():
        message = f"model loads but its embedding of a probe image is invalid (shape {vector.shape})"
        return ModelCheck(model_id, kind, False, str(path), embedder.weights_sha256, embedder.dim, message)
    message = f"ok: {kind} model, dim {embedder.dim}, key {embedder.model_key}"
    return ModelCheck(model_id, kind, True, str(path), embedder.weights_sha256, embedder.dim, message)
