"""Generators exported to ONNX (any ``torch.onnx.export``), described by a model card, behind ``Generator``.

A model card is a small JSON file beside the ONNX files (the layout of ``mobilestylegan-ffhq.json``)::

    {"model": "...", "resolution": 1024, "z_dim": 512, "w_dim": 512, "num_ws_wplus": 23,
     "mapping": {"input": {"name": "var"}, "output": {"name": "style"}},
     "synthesis": {"input": {"name": "style"}, "output": {"name": "img"}},            # w [N, w_dim] -> image
     "synthesis_wplus": {"input": {"name": "style"}, "output": {"name": "img"}},      # optional: [N, rows, w_dim]
     "output_range": [-1, 1], "w_avg": [...],                                          # optional
     "files": {"mapping": {"path": "m.onnx", "sha256": "..."}, "synthesis": {...}, "synthesis_wplus": {...}}}

ONNX is data, not code: each file is parsed by ``onnx`` and turned by ``onnx2torch`` into a differentiable torch
module made only of known operators (nothing in the file is executed as Python); parameters are frozen. Every
file's SHA-256 is checked against the card (when the card records it) and against the registry at every load.

Latent spaces: ``z`` (through the mapping network), ``w`` (one style vector for every layer) and, with a W+
synthesis file, ``w+`` (one row per style input; the same w in every row is the ``w`` image). Images are mapped
from the card's ``output_range`` to Sleuth's [-1, 1]; values beyond it are kept (clipped only when saved).

**Exact half-resolution read-out.** Many generators end with a fixed linear upsampling (an inverse wavelet
transform in MobileStyleGAN, a pixel shuffle, a transposed convolution). Its input, a tensor at half the output
resolution, then determines the 2x2 area-downsampled image linearly, pixel by pixel. ``find_half_resolution_readout``
looks for the last such tensor in the graph, fits the 1x1 linear map by least squares on generator samples and
keeps it only when held-out samples agree to ``READOUT_MAX_ERROR``; ``synthesize_preview`` then stops the graph
there. On MobileStyleGAN-FFHQ this skips the 1024 px inverse wavelet stage (about two thirds of a
forward+backward pass on the CPU) while giving the 512 px image exactly, so the projector optimises at 512 px
(its LPIPS compares at 256 anyway).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from indexer.errors import ModelUnavailableError
from projection.generator_base import Generator

logger = logging.getLogger(__name__)

ROLES = ("mapping", "synthesis", "synthesis_wplus")
READOUT_MAX_ERROR = 0.02  # max |read-out - downsampled image| on held-out samples (images in [-1, 1])
READOUT_MAX_RMSE = 0.002
READOUT_MAX_CHANNELS = 16


@dataclass(frozen=True)
class OnnxFile:
    """One ONNX file of a model card: where it is, its recorded SHA-256 and its input/output names."""

    role: str
    path: Path
    sha256: str | None
    input_name: str
    output_name: str


@dataclass(frozen=True)
class ModelCard:
    """What Sleuth reads from a model card (see the module note)."""

    description: str
    resolution: int
    z_dim: int
    w_dim: int
    num_ws: int  # rows of the W+ input (1 without a W+ file)
    files: dict[str, OnnxFile]
    output_range: tuple[float, float] = (-1.0, 1.0)
    w_avg: list[float] | None = None
    licence: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def synthesis_file(self) -> OnnxFile:
        """The synthesis file Sleuth runs: the W+ one when there is one (it also gives every ``w`` image)."""
        return self.files.get("synthesis_wplus") or self.files["synthesis"]

    @property
    def has_wplus(self) -> bool:
        return "synthesis_wplus" in self.files

    def file_sha256s(self) -> dict[str, str | None]:
        return {role: f.sha256 for role, f in self.files.items()}


def _required(doc: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelUnavailableError(f"model card {where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def read_card(path: str | Path) -> ModelCard:
    """The model card at ``path`` (file paths resolved relative to its folder); ``ModelUnavailableError`` when it
    is not valid JSON, misses a required field or names a file that does not exist."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read model card {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ModelUnavailableError(f"model card {path} is not a JSON object")
    where = str(path)
    resolution = _required(doc, "resolution", int, where)
    if resolution < 8 or resolution & (resolution - 1):
        raise ModelUnavailableError(f"model card {where}: resolution must be a power of two >= 8")
    z_dim, w_dim = _required(doc, "z_dim", int, where), _required(doc, "w_dim", int, where)
    file_docs = _required(doc, "files", dict, where)
    files: dict[str, OnnxFile] = {}
    for role in ROLES:
        if role not in file_docs:
            continue
        fdoc, io_doc = file_docs[role], doc.get(role) or {}
        if not isinstance(fdoc, dict) or not isinstance(io_doc, dict):
            raise ModelUnavailableError(f"model card {where}: {role!r} must be an object")
        rel = _required(fdoc, "path", str, f"{where} files.{role}")
        file_path = (path.parent / rel).resolve()
        if not file_path.is_file():
            raise ModelUnavailableError(f"model card {where}: {role} file {file_path} does not exist")
        sha = fdoc.get("sha256")
        files[role] = OnnxFile(
            role=role,
            path=file_path,
            sha256=str(sha).lower() if sha else None,
            input_name=str((io_doc.get("input") or {}).get("name") or ""),
            output_name=str((io_doc.get("output") or {}).get("name") or ""),
        )
    if "mapping" not in files or not ({"synthesis", "synthesis_wplus"} & set(files)):
        raise ModelUnavailableError(
            f"model card {where}: needs files.mapping and files.synthesis (or files.synthesis_wplus)"
        )
    lo, hi = doc.get("output_range") or (-1.0, 1.0)
    w_avg = doc.get("w_avg")
    if w_avg is not None and (not isinstance(w_avg, list) or len(w_avg) != w_dim):
        raise ModelUnavailableError(f"model card {where}: w_avg must be a list of {w_dim} numbers")
    num_ws = int(doc.get("num_ws_wplus") or 1) if "synthesis_wplus" in files else 1
    return ModelCard(
        description=str(doc.get("model") or doc.get("description") or path.stem),
        resolution=resolution,
        z_dim=z_dim,
        w_dim=w_dim,
        num_ws=num_ws,
        files=files,
        output_range=(float(lo), float(hi)),
        w_avg=[float(v) for v in w_avg] if w_avg is not None else None,
        licence=str(doc.get("licence") or doc.get("license") or ""),
        raw=doc,
    )


def verify_card_files(card: ModelCard, expected: dict[str, str] | None = None) -> dict[str, str]:
    """SHA-256 of every file of ``card``; each must equal the card's record and ``expected[role]`` when given."""
    from projection.checkpoints import sha256_file

    actual: dict[str, str] = {}
    for role, f in card.files.items():
        sha = sha256_file(f.path)
        for source, want in (("the model card", f.sha256), ("the registry", (expected or {}).get(role))):
            if want and want != sha:
                raise ModelUnavailableError(
                    f"{f.path} has sha256 {sha[:12]}, {source} recorded {want[:12]}: the file changed"
                )
        actual[role] = sha
    return actual


def convert_onnx(path: Path) -> fx.GraphModule:
    """The ONNX file at ``path`` as a frozen torch module (``onnx2torch``); unreadable files raise
    ``ModelUnavailableError``."""
    import onnx
    from onnx2torch import convert

    try:
        model = onnx.load(str(path))
        module = convert(model)
    except Exception as exc:  # noqa: BLE001 - onnx / onnx2torch raise many types for a bad or unsupported file
        raise ModelUnavailableError(f"cannot convert ONNX file {path}: {type(exc).__name__}: {exc}") from exc
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass(frozen=True)
class Readout:
    """A verified linear map from one graph tensor ``[N, C, R/2, R/2]`` to the 2x-downsampled image."""

    node: str
    weight: list[list[float]]  # [3, C]
    bias: list[float]  # [3]
    max_error: float
    rmse: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "weight": self.weight, "bias": self.bias, "max_error": self.max_error,
                "rmse": self.rmse}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Readout:
        return cls(str(doc["node"]), [list(map(float, r)) for r in doc["weight"]],
                   [float(v) for v in doc["bias"]], float(doc["max_error"]), float(doc["rmse"]))  # fmt: skip


def _graph_until(module: fx.GraphModule, node_names: list[str]) -> fx.GraphModule:
    """A copy of ``module`` whose output is the tuple of the named nodes (everything after them dropped)."""
    graph = copy.deepcopy(module.graph)
    by_name = {n.name: n for n in graph.nodes}
    missing = [n for n in node_names if n not in by_name]
    if missing:
        raise ModelUnavailableError(f"the synthesis graph has no node {missing[0]!r} (the file changed?)")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(by_name[n] for n in node_names),)
    sub = fx.GraphModule(module, graph)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


class OnnxGenerator(Generator):
    """A generator made of a mapping ONNX (z -> w) and a synthesis ONNX (w or W+ -> image)."""

    family = "onnx"

    def __init__(self, card: ModelCard, mapping: nn.Module, synthesis: nn.Module) -> None:
        super().__init__()
        self.card = card
        self.resolution = card.resolution
        self.z_dim = card.z_dim
        self.w_dim = card.w_dim
        self.num_ws = card.num_ws
        self.latent_spaces = ("z", "w", "w+") if card.has_wplus else ("z", "w")
        self.mapping_net = mapping
        self.synthesis_net = synthesis
        lo, hi = card.output_range
        self._scale, self._shift = 2.0 / (hi - lo), -1.0 - 2.0 * lo / (hi - lo)
        w_avg = torch.tensor(card.w_avg) if card.w_avg is not None else self._measured_w_avg()
        self.w_avg: torch.Tensor
        self.register_buffer("w_avg", w_avg.float())
        self._readout_weight: torch.Tensor  # [3, C, 1, 1] and [3], set by use_readout
        self._readout_bias: torch.Tensor
        self._w_std: float | None = None
        self.readout: Readout | None = None
        self._preview_net: nn.Module | None = None

    # --- latents ---------------------------------------------------------------------------------------
    def latent_shape(self, space: str) -> tuple[int, ...]:
        if space == "z":
            return (self.z_dim,)
        if space == "w":
            return (self.w_dim,)
        if space == "w+" and self.card.has_wplus:
            return (self.num_ws, self.w_dim)
        raise ValueError(f"unknown latent space {space!r}; this generator has {self.latent_spaces}")

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z ``[N, z_dim]`` -> w ``[N, w_dim]``."""
        assert z.ndim == 2 and z.shape[1] == self.z_dim, tuple(z.shape)
        return self.mapping_net(z)

    def _measured_w_avg(self, n: int = 10_000, seed: int = 0) -> torch.Tensor:
        with torch.no_grad():
            return self.mapping(self.sample_z(n, seed=seed)).mean(dim=0)

    def mean_latent(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> torch.Tensor:
        """0 in z; the card's ``w_avg`` (or the mean of ``num_samples`` mapped z) in w, every row of W+."""
        if space == "z":
            return torch.zeros(self.z_dim, device=self.w_avg.device)
        self.latent_shape(space)
        return self.w_avg.clone() if space == "w" else self.w_avg[None].expand(self.num_ws, -1).clone()

    def latent_std(self, space: str, *, num_samples: int = 10_000, seed: int = 0) -> float:
        """1 in z; in w, the per-coordinate standard deviation of mapped samples (measured once)."""
        if space == "z":
            return 1.0
        if self._w_std is None:
            with torch.no_grad():
                w = self.mapping(self.sample_z(num_samples, seed=seed, device=self.w_avg.device))
            self._w_std = float((w - w.mean(dim=0)).square().mean().sqrt())
        return self._w_std

    def _wplus(self, latent: torch.Tensor, space: str) -> torch.Tensor:
        """The synthesis input for ``latent``: ``[N, num_ws, w_dim]`` (W+ file) or ``[N, w_dim]`` (w file)."""
        if space == "z":
            latent, space = self.mapping(latent), "w"
        if space == "w":
            assert latent.ndim == 2 and latent.shape[1] == self.w_dim, tuple(latent.shape)
            return latent[:, None, :].expand(-1, self.num_ws, -1) if self.card.has_wplus else latent
        if space == "w+":
            assert latent.shape[1:] == (self.num_ws, self.w_dim), tuple(latent.shape)
            return latent
        raise ValueError(f"unknown latent space {space!r}")

    # --- images ----------------------------------------------------------------------------------------
    def synthesize(self, latent: torch.Tensor, space: str = "w") -> torch.Tensor:
        """Latents ``[N, *latent_shape(space)]`` -> images ``[N, 3, R, R]`` in [-1, 1] (not clipped)."""
        image = self.synthesis_net(self._wplus(latent, space))
        if image.shape[1:] != (3, self.resolution, self.resolution):
            raise ModelUnavailableError(
                f"the synthesis ONNX gave {tuple(image.shape)}, the card says [N, 3, {self.resolution}, "
                f"{self.resolution}]"
            )
        return image * self._scale + self._shift

    def forward(self, latent: torch.Tensor, space: str = "w") -> torch.Tensor:
        return self.synthesize(latent, space)

    def use_readout(self, readout: Readout | None) -> None:
        """Let ``synthesize_preview`` stop the graph at ``readout``'s tensor (``None``: full images only)."""
        self.readout = readout
        if readout is None:
            self._preview_net, self.preview_resolution = None, 0
            return
        self._preview_net = _graph_until(self.synthesis_net, [readout.node])  # type: ignore[arg-type]
        self.register_buffer(
            "_readout_weight", torch.tensor(readout.weight, dtype=torch.float32)[:, :, None, None]
        )
        self.register_buffer("_readout_bias", torch.tensor(readout.bias, dtype=torch.float32))
        self.preview_resolution = self.resolution // 2

    def synthesize_preview(self, latent: torch.Tensor, space: str) -> torch.Tensor:
        """``[N, 3, R/2, R/2]``: the image area-downsampled 2x, read linearly off the half-resolution tensor
        (exact within the read-out's measured error); the full image where there is no read-out."""
        if self._preview_net is None:
            return self.synthesize(latent, space)
        (hidden,) = self._preview_net(self._wplus(latent, space))  # type: ignore[misc]  # [N, C, R/2, R/2]
        return F.conv2d(hidden, self._readout_weight, self._readout_bias)


def load_onnx_generator(
    card_path: str | Path,
    *,
    expected_sha256: dict[str, str] | None = None,
    readout: dict[str, Any] | None = None,
) -> OnnxGenerator:
    """The generator of the model card at ``card_path``: every file's SHA-256 checked (against the card and
    ``expected_sha256``), converted with onnx2torch, frozen; ``readout`` (a stored ``Readout``) enables the
    exact half-resolution preview."""
    card = read_card(card_path)
    verify_card_files(card, expected_sha256)
    mapping = convert_onnx(card.files["mapping"].path)
    synthesis = convert_onnx(card.synthesis_file.path)
    generator = OnnxGenerator(card, mapping, synthesis)
    if readout:
        generator.use_readout(Readout.from_json(readout))
    generator.eval()
    generator.requires_grad_(False)
    return generator


def _half_resolution_candidates(generator: OnnxGenerator, ws: torch.Tensor) -> list[str]:
    """Names of graph nodes whose output is ``[N, C <= READOUT_MAX_CHANNELS, R/2, R/2]``, last first."""
    from torch.fx.passes.shape_prop import ShapeProp

    module: Any = generator.synthesis_net
    ShapeProp(module).propagate(ws)
    half = generator.resolution // 2
    names = []
    for node in module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if (
            shape is not None
            and len(shape) == 4
            and tuple(shape[2:]) == (half, half)
            and shape[1] <= READOUT_MAX_CHANNELS
        ):
            names.append(node.name)
    return names[::-1]


def find_half_resolution_readout(
    generator: OnnxGenerator, *, samples: int = 4, seed: int = 0, max_candidates: int = 12, chunk: int = 4
) -> Readout | None:
    """The exact linear read-out of the 2x-downsampled image from a half-resolution tensor (module note), or
    ``None`` when none of the last ``max_candidates`` such tensors reproduces held-out samples within
    ``READOUT_MAX_ERROR``. Fits on ``samples - 2`` generator samples and checks on 2 held-out ones; candidate
    tensors are computed ``chunk`` at a time (memory)."""
    if samples < 3:
        raise ValueError("samples must be at least 3 (fit and held-out)")
    space = "w+" if generator.card.has_wplus else "w"
    with torch.no_grad():
        z = generator.sample_z(samples, seed=seed, device=generator.w_avg.device)
        ws = generator._wplus(generator.mapping(z), "w")
        candidates = _half_resolution_candidates(generator, ws[:1])[:max_candidates]
        y = F.avg_pool2d(generator.synthesize(ws, space), 2).permute(0, 2, 3, 1)  # [N, R/2, R/2, 3]
    n_fit = samples - 2
    for lo in range(0, len(candidates), chunk):
        names = candidates[lo : lo + chunk]
        with torch.no_grad():
            hidden = _graph_until(generator.synthesis_net, names)(ws)  # type: ignore[arg-type]
        for name, h in zip(names, hidden, strict=True):
            x = h.permute(0, 2, 3, 1)  # [N, R/2, R/2, C]
            xb = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).double()  # [N, R/2, R/2, C + 1]
            fit = xb[:n_fit].reshape(-1, xb.shape[-1])
            solution = torch.linalg.lstsq(fit, y[:n_fit].reshape(-1, 3).double()).solution  # [C + 1, 3]
            err = ((xb[n_fit:] @ solution).float() - y[n_fit:]).abs()
            max_error, rmse = float(err.max()), float(err.square().mean().sqrt())
            logger.debug("read-out candidate %s: max error %.4g, rmse %.4g", name, max_error, rmse)
            if math.isfinite(max_error) and max_error <= READOUT_MAX_ERROR and rmse <= READOUT_MAX_RMSE:
                weight = solution[:-1].T.float()  # [3, C]
                return Readout(name, weight.tolist(), solution[-1].float().tolist(), max_error, rmse)
    return None
