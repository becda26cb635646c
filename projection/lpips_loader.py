"""LPIPS (Zhang et al. 2018) through the ``lpips`` package, with weights from local files only.

``lpips.LPIPS`` normally downloads the ImageNet backbone through torchvision. Sleuth builds it with a random
backbone (``pnet_rand=True``, ``pretrained=False``: nothing is fetched, nothing is read from the wheel) and
then loads every tensor from one safetensors file whose keys follow torchvision's layout:

- ``features.N.weight`` / ``features.N.bias``: ``vgg16().features`` or ``alexnet().features``; the ``lpips``
  module holds the same layers split into ``net.slice1..5`` under the same index ``N``.
- ``lin0.weight`` .. ``lin4.weight`` ``[1, C, 1, 1]``: the LPIPS v0.1 linear layers (``linK.model.1.weight``
  in the module; ``lins.K`` is the same parameter).

Every backbone and linear tensor of the module must be present in the file with the same shape, else the
file is refused. Optionally (``weights=None``), torchvision's cached ImageNet weights in the torch hub cache plus
the linear layers shipped in the ``lpips`` wheel are used when both are on disk. Inputs are in ``[-1, 1]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from indexer.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

NETS = ("vgg", "alex")
SETTING = "SLEUTH_LPIPS_WEIGHTS"
# torchvision's file names for the ImageNet weights (what torchvision itself would download into the hub cache).
TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def _quiet_lpips(net: str) -> torch.nn.Module:
    """An ``lpips.LPIPS`` with random backbone and linear layers: builds offline, reads no file."""
    import warnings

    import lpips

    if net not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated" notice
        return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)


def module_to_file_keys(model: torch.nn.Module) -> dict[str, str]:
    """Map each backbone / linear tensor name of an ``lpips.LPIPS`` module to its key in the weights file."""
    mapping: dict[str, str] = {}
    for name in model.state_dict():
        parts = name.split(".")
        if parts[0] == "net" and parts[1].startswith("slice"):
            mapping[name] = "features." + ".".join(parts[2:])  # net.slice2.5.weight -> features.5.weight
        elif parts[0].startswith("lin") and parts[0] != "lins" and parts[1:] == ["model", "1", "weight"]:
            mapping[name] = f"{parts[0]}.weight"  # lin3.model.1.weight -> lin3.weight
    return mapping


def _load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Copy every mapped tensor into ``model``; refuse missing keys and shape mismatches."""
    state = model.state_dict()
    mapping = module_to_file_keys(model)
    missing = sorted({key for key in mapping.values() if key not in tensors})
    if missing:
        raise ModelUnavailableError(
            f"{origin} lacks LPIPS tensors {missing[:6]}{'...' if len(missing) > 6 else ''}; is it the "
            f"right network? (set {SETTING} to an lpips-vgg16 / lpips-alex safetensors file)"
        )
    new_state = dict(state)
    for name, key in mapping.items():
        if tuple(tensors[key].shape) != tuple(state[name].shape):
            raise ModelUnavailableError(
                f"{origin}: {key} has shape {tuple(tensors[key].shape)}, the LPIPS module expects "
                f"{tuple(state[name].shape)} (wrong network for net=...?)"
            )
        new_state[name] = tensors[key].to(state[name].dtype)
    # lins.K.* alias linK.*; load_state_dict copies the same tensor into the shared parameter twice.
    for name in state:
        if name.startswith("lins."):
            k = name.split(".")[1]
            new_state[name] = new_state[f"lin{k}.model.1.weight"]
    model.load_state_dict(new_state, strict=True)


def _hub_cache_tensors(net: str) -> dict[str, torch.Tensor] | None:
    """torchvision's cached ImageNet backbone + the wheel's linear layers, when both are on disk."""
    import lpips

    backbone = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[net]
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not (backbone.is_file() and lin_file.is_file()):
        return None
    tensors = {
        k: v
        for k, v in torch.load(backbone, map_location="cpu", weights_only=True).items()
        if k.startswith("features.")
    }
    for key, value in torch.load(lin_file, map_location="cpu", weights_only=True).items():
        if key.endswith(".model.1.weight"):
            tensors[key.split(".")[0] + ".weight"] = value  # lin0.model.1.weight -> lin0.weight
    return tensors


def load_lpips(
    weights: Path | str | None, *, net: str = "vgg", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A frozen, eval-mode ``lpips.LPIPS`` (v0.1) on ``device`` with weights from ``weights`` (safetensors).

    ``weights=None``: torchvision's cached ImageNet weights (torch hub cache) if present, else
    ``ModelUnavailableError`` naming ``SLEUTH_LPIPS_WEIGHTS``. Call it as ``model(a, b)`` with images in [-1, 1].
    """
    model = _quiet_lpips(net)
    if weights is None:
        tensors = _hub_cache_tensors(net)
        if tensors is None:
            raise ModelUnavailableError(
                f"no LPIPS weights configured: set {SETTING} to an lpips-{'vgg16' if net == 'vgg' else net}"
                ".safetensors file (see shared/models/README.md)"
            )
        origin = f"torch hub cache ({TORCHVISION_FILES[net]})"
    else:
        path = Path(weights)
        if not path.is_file():
            raise ModelUnavailableError(f"LPIPS weights file not found: {path} (set {SETTING})")
        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several error types for bad files
            raise ModelUnavailableError(
                f"{path}: not a readable safetensors file ({exc}); set {SETTING}"
            ) from exc
        origin = str(path)
    _load_tensors(model, tensors, origin)
    model.eval().requires_grad_(False)
    logger.info("LPIPS-%s loaded from %s", net, origin)
    return model.to(device)


def save_lpips_weights(model: torch.nn.Module, path: Path | str) -> Path:
    """Write an ``lpips.LPIPS`` module's backbone and linear layers in the file layout ``load_lpips`` reads."""
    state = model.state_dict()
    tensors = {
        key: state[name].detach().cpu().contiguous().clone()
        for name, key in module_to_file_keys(model).items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
