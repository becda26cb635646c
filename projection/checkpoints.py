"""Load generator checkpoints safely, whatever format they come in, and convert them to safetensors.

Formats (detected from the file's first bytes, never from its name):

1. NVlabs stylegan2-ada-pytorch network pickles (``.pkl``: a dict with ``G``, ``D``, ``G_ema``). Their
   modules are pickled through ``torch_utils.persistence``, whose reconstructor would ``exec`` the module
   source stored in the file. They are read with ``RestrictedUnpickler``: every global the pickle names is
   looked up in an explicit allow-list of safe stand-ins (the persistent-object reconstructor becomes a
   plain ``PersistentRecord`` of its state; tensors are rebuilt from storages read with
   ``torch.load(weights_only=True)``); any other global raises ``UnsafeCheckpointError`` before anything
   runs. ``G_ema``'s tensors are then mapped onto ``StyleGAN2Generator``.
2. rosinality stylegan2-pytorch ``.pt`` files (``{"g_ema": state_dict, "latent_avg": ...}``), read with
   ``torch.load(weights_only=True)``.
3. safetensors files written by ``save_safetensors`` (family and config JSON in the metadata).
4. DCGAN ``.pt`` files (``{"netG_state_dict": ...}`` or a bare state dict), handed to
   ``projection.dcgan.DCGANGenerator.from_state_dict``.

Loaded generators are returned in eval mode with parameters frozen (``requires_grad=False``).
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import io
import json
import logging
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from indexer.errors import ModelUnavailableError, UnsafeCheckpointError
from projection.generator_base import Generator
from projection.stylegan2 import StyleGAN2Config, StyleGAN2Generator, fir_kernel, infer_channel_formula

logger = logging.getLogger(__name__)

FORMAT_NVLABS = "nvlabs-pkl"
FORMAT_ROSINALITY = "rosinality-pt"
FORMAT_SAFETENSORS = "safetensors"
FORMAT_DCGAN = "dcgan-pt"
FAMILIES = ("stylegan2", "dcgan")
SAFETENSORS_FORMAT_VERSION = "1"
_TORCH_LEGACY_PREFIX = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- restricted unpickler ----------------------------------------------------------------------------
@dataclass
class PersistentRecord:
    """What a ``torch_utils.persistence`` object becomes here: its class name and pickled ``__dict__``.

    The module source the file carries is never executed; only its SHA-256 is kept for the record.
    """

    class_name: str
    state: dict[str, Any]
    version: Any = None
    module_src_sha256: str = ""

    def module(self, name: str) -> PersistentRecord:
        child = (self.state.get("_modules") or {}).get(name)
        if not isinstance(child, PersistentRecord):
            raise ModelUnavailableError(f"{self.class_name} has no sub-module {name!r}")
        return child


class _EasyDictStandIn(dict):  # type: ignore[type-arg]
    """Stands in for ``dnnlib.util.EasyDict`` (a plain dict subclass) inside pickles."""


def _persistent_obj_standin(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafeCheckpointError("persistent object with unexpected metadata (only type='class' is read)")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"persistent object {meta.get('class_name')!r} has no dict state")
    src = meta.get("module_src") or ""
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        state=state,
        version=meta.get("version"),
        module_src_sha256=hashlib.sha256(str(src).encode()).hexdigest(),
    )


def _storage_from_bytes(data: Any) -> Any:
    if not isinstance(data, bytes | bytearray):
        raise UnsafeCheckpointError("storage payload is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafeCheckpointError(f"storage payload decoded to {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(
    storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False, *_hooks_and_meta: Any
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` without backward hooks or metadata (those could name callables)."""
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafeCheckpointError("tensor rebuilt from something that is not a storage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch._utils._rebuild_tensor_v2(
            storage, int(offset), tuple(size), tuple(stride), False, OrderedDict()
        )


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafeCheckpointError("parameter rebuilt from something that is not a tensor")
    return data


def _numpy_dtype(obj: Any, align: bool = False, copy: bool = True) -> np.dtype[Any]:
    dtype = np.dtype(str(obj))
    if dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy dtype {obj!r} holds Python objects")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafeCheckpointError("numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafeCheckpointError("_codecs.encode is only allowed for latin1 byte strings")
    return codecs.encode(text, encoding)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj_standin,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDictStandIn,
    ("dnnlib", "EasyDict"): _EasyDictStandIn,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only through ``_ALLOWED_GLOBALS``; nothing is ever imported."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            hint = (
                " (a TensorFlow-era pickle: convert it with stylegan2-ada-pytorch first)"
                if module.startswith("dnnlib.tflib")
                else ""
            )
            raise UnsafeCheckpointError(f"refused global {module}.{name} in pickle{hint}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refused persistent id {pid!r} in pickle")


def restricted_load(fh: BinaryIO) -> Any:
    """Unpickle ``fh`` with ``RestrictedUnpickler``; malformed data becomes ``ModelUnavailableError``."""
    try:
        return RestrictedUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ModelUnavailableError(f"unreadable pickle: {exc}") from exc


# --- NVlabs (stylegan2-ada-pytorch) layout -------------------------------------------------------------
def record_tensors(record: PersistentRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a module record's parameters and buffers into ``{dotted.name: tensor}`` (like ``state_dict``)."""
    out: dict[str, torch.Tensor] = {}
    for slot in ("_parameters", "_buffers"):
        for name, value in (record.state.get(slot) or {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
    for name, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, PersistentRecord):
            out.update(record_tensors(child, f"{prefix}{name}."))
    return out


def _kwargs(record: PersistentRecord) -> dict[str, Any]:
    kwargs = record.state.get("_init_kwargs", record.state.get("init_kwargs")) or {}
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def _layer_pairs(cfg: StyleGAN2Config) -> list[tuple[str, str]]:
    """(official conv / toRGB prefix, Sleuth prefix) for every synthesis layer."""
    pairs = [
        ("synthesis.b4.conv1.", "synthesis_net.layers.0."),
        ("synthesis.b4.torgb.", "synthesis_net.to_rgbs.0."),
    ]
    for b, res in enumerate(cfg.block_resolutions[1:], start=1):
        pairs += [
            (f"synthesis.b{res}.conv0.", f"synthesis_net.layers.{2 * b - 1}."),
            (f"synthesis.b{res}.conv1.", f"synthesis_net.layers.{2 * b}."),
            (f"synthesis.b{res}.torgb.", f"synthesis_net.to_rgbs.{b}."),
        ]
    return pairs


def nvlabs_key_map(cfg: StyleGAN2Config) -> dict[str, str]:
    """Official stylegan2-ada-pytorch ``G_ema`` tensor names -> ``StyleGAN2Generator`` state-dict names."""
    keys = {
        "mapping.w_avg": "mapping_net.w_avg",
        "synthesis.b4.const": "synthesis_net.const",
    }
    for i in range(cfg.mapping_layers):
        for p in ("weight", "bias"):
            keys[f"mapping.fc{i}.{p}"] = f"mapping_net.fcs.{i}.{p}"
    for src, dst in _layer_pairs(cfg):
        names = ["weight", "bias", "affine.weight", "affine.bias"]
        if ".torgb." not in src:
            names += ["noise_strength", "noise_const"]
        keys.update({src + n: dst + n for n in names})
    return keys


def _nvlabs_config(g_ema: PersistentRecord, sd: dict[str, torch.Tensor]) -> StyleGAN2Config:
    kwargs = _kwargs(g_ema)
    mapping_kwargs = dict(kwargs.get("mapping_kwargs") or {})
    synthesis_kwargs = dict(kwargs.get("synthesis_kwargs") or {})
    c_dim = int(g_ema.state.get("c_dim", kwargs.get("c_dim", 0)) or 0)
    if c_dim > 0 or "mapping.embed.weight" in sd:
        raise ModelUnavailableError("conditional StyleGAN2 generators (c_dim > 0) are not supported")
    if "synthesis.b4.const" not in sd:
        raise ModelUnavailableError("G_ema is not a StyleGAN2 generator (no synthesis.b4.const; StyleGAN3?)")
    if synthesis_kwargs.get("architecture", "skip") != "skip":
        raise ModelUnavailableError(
            f"synthesis architecture {synthesis_kwargs['architecture']!r} is not supported"
        )
    resolutions = sorted(
        int(m.group(1)) for k in sd if (m := re.fullmatch(r"synthesis\.b(\d+)\.conv1\.weight", k))
    )
    channels = {r: int(sd[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in resolutions}
    try:
        base, cmax = infer_channel_formula(channels)
    except ValueError as exc:
        raise ModelUnavailableError(str(exc)) from exc
    base = int(synthesis_kwargs.get("channel_base", base))
    cmax = int(synthesis_kwargs.get("channel_max", cmax))
    mapping = g_ema.module("mapping")
    fc0_gain = mapping.module("fc0").state.get("bias_gain")
    lr_mul = float(fc0_gain if fc0_gain is not None else mapping_kwargs.get("lr_multiplier", 0.01))
    first_conv = g_ema.module("synthesis").module("b4").module("conv1")
    conv_clamp = synthesis_kwargs.get("conv_clamp", first_conv.state.get("conv_clamp"))
    return StyleGAN2Config(
        z_dim=int(sd["mapping.fc0.weight"].shape[1]),
        w_dim=int(sd["synthesis.b4.conv1.affine.weight"].shape[1]),
        mapping_layers=sum(1 for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k)),
        resolution=max(resolutions),
        channel_base=base,
        channel_max=cmax,
        mapping_lr_multiplier=lr_mul,
        conv_clamp=None if conv_clamp is None else float(conv_clamp),
        img_channels=int(sd["synthesis.b4.torgb.weight"].shape[0]),
    )


def _check_filters(sd: dict[str, torch.Tensor], suffix: str, gain: float) -> None:
    expected = fir_kernel() * gain
    for key, value in sd.items():
        if key.endswith(suffix) and not torch.allclose(value.float(), expected, atol=1e-6):
            raise ModelUnavailableError(
                f"{key} is not the [1,3,3,1] low-pass filter this generator implements"
            )


def _fill_generator(
    cfg: StyleGAN2Config, state: dict[str, torch.Tensor], w_avg_tracked: bool
) -> StyleGAN2Generator:
    gen = StyleGAN2Generator(cfg, seed=0)  # seeded so that loading leaves the global RNG alone
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    state["mapping_net.w_avg_tracked"] = torch.tensor(w_avg_tracked)
    try:
        gen.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailableError(
            f"checkpoint tensors do not fit the inferred config {cfg}: {exc}"
        ) from exc
    return gen


def stylegan2_from_nvlabs(data: Any) -> StyleGAN2Generator:
    """``StyleGAN2Generator`` from the object a restricted load of an NVlabs network pickle returned."""
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), PersistentRecord):
        raise ModelUnavailableError("not an NVlabs network pickle: no G_ema persistent object")
    g_ema: PersistentRecord = data["G_ema"]
    sd = record_tensors(g_ema)
    cfg = _nvlabs_config(g_ema, sd)
    key_map = nvlabs_key_map(cfg)
    missing = sorted(set(key_map) - set(sd))
    extra = sorted(k for k in set(sd) - set(key_map) if not k.endswith("resample_filter"))
    if missing or extra:
        raise ModelUnavailableError(f"unexpected G_ema layout: missing {missing[:5]}, unexpected {extra[:5]}")
    _check_filters(sd, "resample_filter", gain=1.0)
    state = {
        dst: sd[src].reshape(()) if dst.endswith("noise_strength") else sd[src]
        for src, dst in key_map.items()
    }
    return _fill_generator(cfg, state, w_avg_tracked=True)


# --- rosinality stylegan2-pytorch layout ----------------------------------------------------------------
def _squeeze_to(shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.reshape(shape)


def rosinality_key_map(cfg: StyleGAN2Config) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """rosinality ``g_ema`` names -> (``StyleGAN2Generator`` name, reshape).

    rosinality stores conv weights with a leading batch axis (``[1, Cout, Cin, k, k]``), the constant input
    as ``[1, C, 4, 4]``, noise strengths as ``[1]``, noise maps as ``[1, 1, R, R]`` and RGB biases as
    ``[1, 3, 1, 1]``; its equalised-lr scale multiplies the weight before modulation where this module
    multiplies it into the weight too, so the stored values carry over unchanged.
    """

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t

    keys: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for i in range(cfg.mapping_layers):
        keys[f"style.{i + 1}.weight"] = (f"mapping_net.fcs.{i}.weight", keep)
        keys[f"style.{i + 1}.bias"] = (f"mapping_net.fcs.{i}.bias", keep)
    c4 = cfg.channels(4)
    keys["input.input"] = ("synthesis_net.const", _squeeze_to((c4, 4, 4)))
    conv_sources = ["conv1"] + [f"convs.{j}" for j in range(2 * (len(cfg.block_resolutions) - 1))]
    for k, src in enumerate(conv_sources):
        dst = f"synthesis_net.layers.{k}."
        res = cfg.block_resolutions[(k + 1) // 2]
        cout = cfg.channels(res)
        cin = cfg.channels(res // 2) if k % 2 == 1 else cout
        keys[f"{src}.conv.weight"] = (dst + "weight", _squeeze_to((cout, cin, 3, 3)))
        keys[f"{src}.conv.modulation.weight"] = (dst + "affine.weight", keep)
        keys[f"{src}.conv.modulation.bias"] = (dst + "affine.bias", keep)
        keys[f"{src}.noise.weight"] = (dst + "noise_strength", _squeeze_to(()))
        keys[f"{src}.activate.bias"] = (dst + "bias", keep)
        keys[f"noises.noise_{k}"] = (dst + "noise_const", _squeeze_to((res, res)))
    rgb_sources = ["to_rgb1"] + [f"to_rgbs.{b}" for b in range(len(cfg.block_resolutions) - 1)]
    for b, src in enumerate(rgb_sources):
        dst = f"synthesis_net.to_rgbs.{b}."
        cin = cfg.channels(cfg.block_resolutions[b])
        keys[f"{src}.conv.weight"] = (dst + "weight", _squeeze_to((3, cin, 1, 1)))
        keys[f"{src}.conv.modulation.weight"] = (dst + "affine.weight", keep)
        keys[f"{src}.conv.modulation.bias"] = (dst + "affine.bias", keep)
        keys[f"{src}.bias"] = (dst + "bias", _squeeze_to((3,)))
    return keys


def _rosinality_config(sd: dict[str, torch.Tensor]) -> StyleGAN2Config:
    n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
    n_rgbs = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
    if n_mlp == 0 or "input.input" not in sd or "conv1.conv.weight" not in sd:
        raise ModelUnavailableError(
            "not a rosinality StyleGAN2 state dict (no style.N / input.input / conv1)"
        )
    resolution = 4 * 2**n_rgbs
    channels = {4: int(sd["input.input"].shape[1])}
    for b in range(1, n_rgbs + 1):
        channels[4 * 2**b] = int(sd[f"convs.{2 * b - 1}.conv.weight"].shape[1])
    try:
        base, cmax = infer_channel_formula(channels)
    except ValueError as exc:
        raise ModelUnavailableError(str(exc)) from exc
    return StyleGAN2Config(
        z_dim=int(sd["style.1.weight"].shape[1]),
        w_dim=int(sd[f"style.{n_mlp}.weight"].shape[0]),
        mapping_layers=n_mlp,
        resolution=resolution,
        channel_base=base,
        channel_max=cmax,
        mapping_lr_multiplier=0.01,  # rosinality's lr_mlp default; not recorded in its checkpoints
        conv_clamp=None,
    )


def stylegan2_from_rosinality(
    sd: dict[str, torch.Tensor], latent_avg: torch.Tensor | None
) -> StyleGAN2Generator:
    """``StyleGAN2Generator`` from a rosinality ``g_ema`` state dict (and its ``latent_avg`` if saved)."""
    cfg = _rosinality_config(sd)
    key_map = rosinality_key_map(cfg)
    missing_noise = [k for k in key_map if k.startswith("noises.") and k not in sd]
    missing = sorted(k for k in set(key_map) - set(sd) if not k.startswith("noises."))
    extra = sorted(k for k in set(sd) - set(key_map) if not k.endswith((".blur.kernel", ".upsample.kernel")))
    if missing or extra:
        raise ModelUnavailableError(
            f"unexpected rosinality layout: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    _check_filters(sd, ".blur.kernel", gain=4.0)
    _check_filters(sd, ".upsample.kernel", gain=4.0)
    state = {dst: fn(sd[src]) for src, (dst, fn) in key_map.items() if src in sd}
    if missing_noise:
        logger.warning(
            "checkpoint has no stored noise maps (%d); using seeded N(0,1) maps", len(missing_noise)
        )
        fresh = StyleGAN2Generator(cfg, seed=0).state_dict()
        for k in missing_noise:
            state[key_map[k][0]] = fresh[key_map[k][0]]
    state["mapping_net.w_avg"] = torch.zeros(cfg.w_dim) if latent_avg is None else latent_avg.reshape(-1)
    return _fill_generator(cfg, state, w_avg_tracked=latent_avg is not None)


# --- DCGAN -------------------------------------------------------------------------------------------
def _dcgan_from_state_dict(sd: dict[str, torch.Tensor], *, z_distribution: str = "normal") -> Generator:
    from projection.dcgan import DCGANGenerator

    try:
        return DCGANGenerator.from_state_dict(sd, z_distribution=z_distribution)
    except ValueError as exc:
        raise ModelUnavailableError(f"not a DCGAN generator Sleuth can read: {exc}") from exc


# --- safetensors -------------------------------------------------------------------------------------
def save_safetensors(generator: Generator, path: str | Path, *, source_sha256: str | None = None) -> str:
    """Write ``generator``'s state dict as safetensors (atomically); return the file's SHA-256.

    Metadata: ``sleuth_format_version``, ``family`` and, for StyleGAN2, ``config`` (JSON), plus
    ``source_sha256`` when the weights were converted from another file.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in generator.state_dict().items()}
    metadata = {"sleuth_format_version": SAFETENSORS_FORMAT_VERSION, "family": generator.family}
    config = getattr(generator, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # StyleGAN2 and DCGAN configs
        metadata["config"] = json.dumps(config.to_dict(), sort_keys=True)
    if source_sha256:
        metadata["source_sha256"] = source_sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _sort_header_(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_file(path)


def _sort_header_(path: str | Path) -> None:
    """Rewrite a safetensors header with sorted keys (same length, offsets unchanged), in place.

    The writer keeps the metadata in a hash map, so its key order (and the file's SHA-256) would change from one
    run to the next; sorted, the same weights always give the same file.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = fh.read(size)
        text = json.dumps(json.loads(header), separators=(",", ":"), sort_keys=True).encode("utf-8")
        if len(text) > size:  # cannot happen for the writer's compact JSON; keep the file as written
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))  # the format pads headers with spaces


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file; ``ModelUnavailableError`` when the file is malformed."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except SafetensorError as exc:
        raise ModelUnavailableError(f"{path}: not a valid safetensors file: {exc}") from exc


def load_safetensors(path: str | Path) -> Generator:
    """The generator ``save_safetensors`` wrote (eval mode, frozen); ``ModelUnavailableError`` when malformed."""
    meta = read_safetensors_metadata(path)
    family = meta.get("family")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ModelUnavailableError(f"{path}: not a valid safetensors file: {exc}") from exc
    if family == "stylegan2":
        try:
            cfg = StyleGAN2Config.from_dict(json.loads(meta["config"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelUnavailableError(
                f"{path}: bad StyleGAN2 config in safetensors metadata: {exc}"
            ) from exc
        tracked = bool(tensors.pop("mapping_net.w_avg_tracked", torch.tensor(False)).item())
        gen: Generator = _fill_generator(cfg, tensors, w_avg_tracked=tracked)
    elif family == "dcgan":
        try:
            z_distribution = str(json.loads(meta.get("config") or "{}").get("z_distribution", "normal"))
        except (ValueError, AttributeError) as exc:
            raise ModelUnavailableError(f"{path}: bad DCGAN config in safetensors metadata: {exc}") from exc
        gen = _dcgan_from_state_dict(tensors, z_distribution=z_distribution)
    else:
        raise ModelUnavailableError(f"{path}: safetensors file without a known generator family ({family!r})")
    return _frozen(gen)


# --- dispatch ----------------------------------------------------------------------------------------
def _frozen(gen: Generator) -> Generator:
    gen.eval()
    gen.requires_grad_(False)
    return gen


def detect_format(path: str | Path) -> str:
    """``nvlabs-pkl``, ``torch`` (a torch.save file: rosinality or DCGAN) or ``safetensors``, from the header."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        size = os.fstat(fh.fileno()).st_size
    if head.startswith(_ZIP_MAGIC) or head.startswith(_TORCH_LEGACY_PREFIX):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return FORMAT_SAFETENSORS
    if head[:1] == b"\x80":
        return FORMAT_NVLABS
    raise ModelUnavailableError(
        f"{path}: not a checkpoint format Sleuth reads (pickle, torch.save, safetensors)"
    )


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # rosinality saves its argparse args
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refused by the weights-only loader: {exc}") from exc
    except (RuntimeError, EOFError) as exc:
        raise ModelUnavailableError(f"{path}: unreadable torch checkpoint: {exc}") from exc


def _from_torch_file(path: Path, *, z_distribution: str = "normal") -> tuple[Generator, str]:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise ModelUnavailableError(f"{path}: torch checkpoint is a {type(ckpt).__name__}, not a dict")
    if isinstance(ckpt.get("g_ema"), dict):
        return stylegan2_from_rosinality(ckpt["g_ema"], ckpt.get("latent_avg")), FORMAT_ROSINALITY
    if "style.1.weight" in ckpt:
        return stylegan2_from_rosinality(ckpt, None), FORMAT_ROSINALITY
    if isinstance(ckpt.get("netG_state_dict"), dict):
        return _dcgan_from_state_dict(ckpt["netG_state_dict"], z_distribution=z_distribution), FORMAT_DCGAN
    if any(str(k).startswith(("main.", "generator_deconv.")) for k in ckpt):
        return _dcgan_from_state_dict(ckpt, z_distribution=z_distribution), FORMAT_DCGAN
    raise ModelUnavailableError(f"{path}: unrecognised torch checkpoint (top-level keys {sorted(ckpt)[:8]})")


def load_checkpoint(
    path: str | Path, *, family: str | None = None, z_distribution: str | None = None
) -> tuple[Generator, dict[str, Any]]:
    """Load a generator from any supported checkpoint without executing code from the file.

    ``z_distribution`` ("normal" or "uniform", DCGAN only): how the generator's z was drawn in training, which a
    checkpoint does not record (default normal).

    Returns the generator (CPU, eval mode, frozen) and an info dict: ``format``, ``family``, ``sha256`` (of
    the file), ``path``, ``config`` (StyleGAN2), ``w_avg_tracked`` (StyleGAN2) and ``source_sha256``
    (safetensors converted from another file). ``family`` ("stylegan2" | "dcgan"), when given, must match.
    Raises ``ModelUnavailableError`` (missing / unreadable / unsupported) or ``UnsafeCheckpointError``.
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    if not path.is_file():
        raise ModelUnavailableError(f"checkpoint file not found: {path}")
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path)}
    kind = detect_format(path)
    if kind == FORMAT_NVLABS:
        with open(path, "rb") as fh:
            gen: Generator = stylegan2_from_nvlabs(restricted_load(fh))
    elif kind == FORMAT_SAFETENSORS:
        gen = load_safetensors(path)
        source = read_safetensors_metadata(path).get("source_sha256")
        if source:
            info["source_sha256"] = source
    else:
        gen, kind = _from_torch_file(path, z_distribution=z_distribution or "normal")
    if z_distribution is not None and gen.family != "dcgan":
        raise ModelUnavailableError("a latent distribution can be given for DCGAN checkpoints only")
    if z_distribution is not None and gen.config.z_distribution != z_distribution:  # type: ignore[union-attr]
        gen = _dcgan_from_state_dict(gen.state_dict(), z_distribution=z_distribution)
    if family is not None and gen.family != family:
        raise ModelUnavailableError(f"{path} holds a {gen.family!r} generator, not {family!r}")
    info.update(format=kind, family=gen.family, resolution=gen.resolution)
    if isinstance(gen, StyleGAN2Generator):
        info.update(config=gen.config.to_dict(), w_avg_tracked=gen.w_avg_tracked)
    logger.info("loaded %s generator from %s (%s, sha256 %s)", gen.family, path, kind, info["sha256"][:12])
    return _frozen(gen), info


def convert_to_safetensors(src: str | Path, dst: str | Path) -> tuple[str, str]:
    """Load ``src`` safely and write it as safetensors at ``dst``; return ``(sha256 of src, sha256 of dst)``."""
    gen, info = load_checkpoint(src)
    dst_sha = save_safetensors(gen, dst, source_sha256=info["sha256"])
    logger.info("converted %s -> %s (sha256 %s)", src, dst, dst_sha)
    return info["sha256"], dst_sha
