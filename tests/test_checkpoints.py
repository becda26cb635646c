"""Checkpoint loaders: NVlabs pickles read without executing anything, rosinality .pt, safetensors, DCGAN.

The tests write every checkpoint themselves in the official layouts (tensor names and nesting of the
stylegan2-ada-pytorch and rosinality releases), from a tiny seeded generator, with an inverse key mapping
written here independently of the loader's.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import builtins  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from indexer.errors import ModelUnavailableError, UnsafeCheckpointError  # noqa: E402
from projection.checkpoints import (  # noqa: E402
    convert_to_safetensors,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
    sha256_file,
)
from projection.generator_base import Generator  # noqa: E402
from projection.stylegan2 import StyleGAN2Generator, fir_kernel  # noqa: E402


# --- a tiny source generator with every parameter non-trivial ------------------------------------------
@pytest.fixture
def source() -> StyleGAN2Generator:
    gen = StyleGAN2Generator.from_preset("tiny", seed=11).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in gen.named_parameters():
            if name.endswith(("bias", "noise_strength")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "affine" in name else 0.0))
    gen.set_w_avg(0.1 * torch.randn(32, generator=g))
    return gen.requires_grad_(False)


def _images(gen: Generator) -> torch.Tensor:
    assert isinstance(gen, StyleGAN2Generator)
    z = gen.sample_z(3, seed=42)
    with torch.no_grad():
        return torch.cat([gen.synthesize(z, "z"), gen.synthesize(gen.mapping(z, psi=0.7), "w")])


# --- official stylegan2-ada-pytorch names (inverse mapping, written independently) ---------------------
def _official_layer_names(num_blocks: int) -> list[tuple[str, int | None]]:
    """(official conv/torgb prefix, Sleuth conv-layer index or None for toRGB b) in generator order."""
    names: list[tuple[str, int | None]] = [("synthesis.b4.conv1", 0)]
    for b in range(1, num_blocks):
        res = 4 * 2**b
        names += [(f"synthesis.b{res}.conv0", 2 * b - 1), (f"synthesis.b{res}.conv1", 2 * b)]
    return names


def nvlabs_state(gen: StyleGAN2Generator) -> dict[str, torch.Tensor]:
    sd = gen.state_dict()
    out = {"mapping.w_avg": sd["mapping_net.w_avg"], "synthesis.b4.const": sd["synthesis_net.const"]}
    for i in range(gen.config.mapping_layers):
        out[f"mapping.fc{i}.weight"] = sd[f"mapping_net.fcs.{i}.weight"]
        out[f"mapping.fc{i}.bias"] = sd[f"mapping_net.fcs.{i}.bias"]
    num_blocks = len(gen.config.block_resolutions)
    for prefix, k in _official_layer_names(num_blocks):
        for n in ("weight", "bias", "noise_strength", "noise_const", "affine.weight", "affine.bias"):
            out[f"{prefix}.{n}"] = sd[f"synthesis_net.layers.{k}.{n}"]
    for b in range(num_blocks):
        for n in ("weight", "bias", "affine.weight", "affine.bias"):
            out[f"synthesis.b{4 * 2**b}.torgb.{n}"] = sd[f"synthesis_net.to_rgbs.{b}.{n}"]
    return out


# --- fake torch_utils.persistence / dnnlib modules, armed like the real ones ---------------------------
@pytest.fixture
def fake_nvlabs_modules(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Any:
        # What the real reconstructor does first: execute the module source stored in the pickle.
        exec(compile(meta["module_src"], "<pickled module_src>", "exec"), {})  # noqa: S102
        raise AssertionError("unreachable: the armed module source exits")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence  # type: ignore[attr-defined]

    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):  # type: ignore[type-arg]
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    util.EasyDict = EasyDict  # type: ignore[attr-defined]
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util = util  # type: ignore[attr-defined]
    for name, mod in {
        "torch_utils": torch_utils,
        "torch_utils.persistence": persistence,
        "dnnlib": dnnlib,
        "dnnlib.util": util,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)


class FakePersistent:
    """Pickles exactly like a ``torch_utils.persistence`` object: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, reconstruct: Any, class_name: str, state: dict[str, Any], module_src: str) -> None:
        self.reconstruct, self.class_name, self.state, self.module_src = (
            reconstruct,
            class_name,
            state,
            module_src,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        meta = dict(
            type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state
        )
        return (self.reconstruct, (meta,))


def _module_state(
    params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], modules: dict[str, Any], **attrs: Any
) -> dict[str, Any]:
    return {
        "training": False,
        "_parameters": OrderedDict(
            (k, nn.Parameter(v.clone(), requires_grad=False)) for k, v in params.items()
        ),
        "_buffers": OrderedDict((k, v.clone()) for k, v in buffers.items()),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": OrderedDict(),
        "_forward_hooks": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_state_dict_hooks": OrderedDict(),
        "_load_state_dict_pre_hooks": OrderedDict(),
        "_modules": OrderedDict(modules),
        **attrs,
    }


def build_nvlabs_pickle(
    gen: StyleGAN2Generator,
    fake: types.SimpleNamespace,
    marker: Path,
    *,
    protocol: int = 4,
    extra: Any = None,
) -> bytes:
    """A stylegan2-ada-pytorch network pickle of ``gen`` whose module source, if executed, writes ``marker``."""
    cfg = gen.config
    src = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\nraise SystemExit('module_src ran')\n"
    sd = nvlabs_state(gen)

    def obj(class_name: str, state: dict[str, Any]) -> FakePersistent:
        return FakePersistent(fake.reconstruct, class_name, state, src)

    def fc(prefix: str, lr: float, activation: str) -> FakePersistent:
        w = sd[prefix + ".weight"]
        return obj(
            "FullyConnectedLayer",
            _module_state(
                {"weight": w, "bias": sd[prefix + ".bias"]},
                {},
                {},
                activation=activation,
                in_features=w.shape[1],
                out_features=w.shape[0],
                weight_gain=np.float64(lr / math.sqrt(w.shape[1])),
                bias_gain=lr,
            ),
        )

    filt = fir_kernel()
    mapping = obj(
        "MappingNetwork",
        _module_state(
            {},
            {"w_avg": sd["mapping.w_avg"]},
            {f"fc{i}": fc(f"mapping.fc{i}", 0.01, "lrelu") for i in range(cfg.mapping_layers)},
            z_dim=cfg.z_dim,
            c_dim=0,
            w_dim=cfg.w_dim,
            num_ws=cfg.num_ws,
            num_layers=cfg.mapping_layers,
            w_avg_beta=0.995,
        ),
    )

    def layer(prefix: str, res: int, up: int) -> FakePersistent:
        return obj(
            "SynthesisLayer",
            _module_state(
                {
                    "weight": sd[prefix + ".weight"],
                    "bias": sd[prefix + ".bias"],
                    "noise_strength": sd[prefix + ".noise_strength"],
                },
                {"resample_filter": filt, "noise_const": sd[prefix + ".noise_const"]},
                {"affine": fc(prefix + ".affine", 1.0, "linear")},
                resolution=res,
                up=up,
                use_noise=True,
                activation="lrelu",
                conv_clamp=None,
                act_gain=math.sqrt(2),
            ),
        )

    def torgb(prefix: str) -> FakePersistent:
        return obj(
            "ToRGBLayer",
            _module_state(
                {"weight": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]},
                {},
                {"affine": fc(prefix + ".affine", 1.0, "linear")},
                conv_clamp=None,
                weight_gain=np.float64(1 / math.sqrt(sd[prefix + ".weight"].shape[1])),
            ),
        )

    blocks = {}
    for res in cfg.block_resolutions:
        p = f"synthesis.b{res}"
        children = {"conv1": layer(p + ".conv1", res, 1), "torgb": torgb(p + ".torgb")}
        params = {}
        if res == 4:
            params["const"] = sd[p + ".const"]
        else:
            children = {"conv0": layer(p + ".conv0", res, 2), **children}
        blocks[f"b{res}"] = obj(
            "SynthesisBlock",
            _module_state(
                params, {"resample_filter": filt}, children, resolution=res, architecture="skip", num_conv=2
            ),
        )
    synthesis = obj(
        "SynthesisNetwork",
        _module_state({}, {}, blocks, img_resolution=cfg.resolution, block_resolutions=cfg.block_resolutions),
    )
    kwargs = fake.EasyDict(
        z_dim=cfg.z_dim,
        w_dim=cfg.w_dim,
        c_dim=0,
        img_resolution=cfg.resolution,
        img_channels=3,
        mapping_kwargs=fake.EasyDict(num_layers=cfg.mapping_layers),
        synthesis_kwargs=fake.EasyDict(
            channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=0, conv_clamp=None
        ),
    )
    if extra is not None:
        kwargs["synthesis_kwargs"]["resample_filter"] = extra  # something deep inside G_ema's state
    g_ema = obj(
        "Generator",
        _module_state(
            {},
            {},
            {"mapping": mapping, "synthesis": synthesis},
            z_dim=cfg.z_dim,
            c_dim=0,
            w_dim=cfg.w_dim,
            img_resolution=cfg.resolution,
            img_channels=3,
            num_ws=cfg.num_ws,
            _init_args=(),
            _init_kwargs=kwargs,
        ),
    )
    disc = obj(
        "Discriminator", _module_state({"weight": torch.ones(2, 2)}, {}, {}, _init_kwargs=fake.EasyDict())
    )
    data = {
        "G": g_ema,
        "D": disc,
        "G_ema": g_ema,
        "augment_pipe": None,
        "training_set_kwargs": fake.EasyDict(path="ffhq.zip", xflip=True),
    }
    return pickle.dumps(data, protocol=protocol)


@pytest.mark.parametrize("protocol", [3, 4])
def test_nvlabs_pickle_loads_to_identical_images_without_executing_module_source(
    source: StyleGAN2Generator, fake_nvlabs_modules: types.SimpleNamespace, tmp_path: Path, protocol: int
) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(build_nvlabs_pickle(source, fake_nvlabs_modules, marker, protocol=protocol))

    gen, info = load_checkpoint(path)

    assert not marker.exists()
    assert isinstance(gen, StyleGAN2Generator)
    assert info["format"] == "nvlabs-pkl" and info["family"] == "stylegan2"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert gen.config == source.config
    assert info["w_avg_tracked"] and torch.equal(gen.mean_latent("w"), source.mean_latent("w"))
    assert torch.equal(_images(gen), _images(source))
    assert not any(p.requires_grad for p in gen.parameters())


def test_the_test_pickle_is_armed_a_plain_unpickler_would_run_its_module_source(
    source: StyleGAN2Generator, fake_nvlabs_modules: types.SimpleNamespace, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned.txt"
    data = build_nvlabs_pickle(source, fake_nvlabs_modules, marker)
    with pytest.raises(SystemExit):
        pickle.loads(data)  # noqa: S301 - demonstrates why the restricted unpickler exists
    assert marker.read_text() == "executed"


class _Evil:
    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, (self.arg,))


@pytest.mark.parametrize(
    ("func", "refused", "payload"),
    [
        (os.system, "system", "touch {marker}"),
        (builtins.exec, "builtins.exec", "open({marker!r}, 'w').write('x')"),
        (builtins.eval, "builtins.eval", "open({marker!r}, 'w').write('x')"),
        (subprocess.getoutput, "subprocess.getoutput", "touch {marker}"),
    ],
)
def test_malicious_reduce_is_refused_before_it_runs(
    tmp_path: Path, func: Any, refused: str, payload: str
) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pkl"
    evil = _Evil(func, payload.format(marker=str(marker)))
    path.write_bytes(pickle.dumps({"G_ema": evil, "D": None}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_checkpoint(path)
    assert not marker.exists()


def test_malicious_global_hidden_inside_a_valid_network_pickle_is_refused(
    source: StyleGAN2Generator, fake_nvlabs_modules: types.SimpleNamespace, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned.txt"
    hidden = _Evil(os.system, f"touch {marker}")
    path = tmp_path / "hidden.pkl"
    path.write_bytes(build_nvlabs_pickle(source, fake_nvlabs_modules, marker, extra=hidden))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


# --- rosinality stylegan2-pytorch layout ----------------------------------------------------------------
def rosinality_state(gen: StyleGAN2Generator) -> dict[str, torch.Tensor]:
    """``g_ema.state_dict()`` of rosinality's Generator holding ``gen``'s weights."""
    sd = gen.state_dict()
    cfg = gen.config
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.mapping_layers):
        out[f"style.{i + 1}.weight"] = sd[f"mapping_net.fcs.{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping_net.fcs.{i}.bias"]
    out["input.input"] = sd["synthesis_net.const"][None]
    num_layers = 2 * len(cfg.block_resolutions) - 1
    for k in range(num_layers):
        src = "conv1" if k == 0 else f"convs.{k - 1}"
        mine = f"synthesis_net.layers.{k}."
        out[f"{src}.conv.weight"] = sd[mine + "weight"][None]  # [1, Cout, Cin, 3, 3]
        out[f"{src}.conv.modulation.weight"] = sd[mine + "affine.weight"]
        out[f"{src}.conv.modulation.bias"] = sd[mine + "affine.bias"]
        out[f"{src}.noise.weight"] = sd[mine + "noise_strength"].reshape(1)
        out[f"{src}.activate.bias"] = sd[mine + "bias"]
        if k % 2 == 1:
            out[f"{src}.conv.blur.kernel"] = fir_kernel() * 4
        out[f"noises.noise_{k}"] = sd[mine + "noise_const"][None, None]
    for b in range(len(cfg.block_resolutions)):
        src = "to_rgb1" if b == 0 else f"to_rgbs.{b - 1}"
        mine = f"synthesis_net.to_rgbs.{b}."
        out[f"{src}.conv.weight"] = sd[mine + "weight"][None]  # [1, 3, Cin, 1, 1]
        out[f"{src}.conv.modulation.weight"] = sd[mine + "affine.weight"]
        out[f"{src}.conv.modulation.bias"] = sd[mine + "affine.bias"]
        out[f"{src}.bias"] = sd[mine + "bias"].reshape(1, 3, 1, 1)
        if b > 0:
            out[f"{src}.upsample.kernel"] = fir_kernel() * 4
    return {k: v.clone() for k, v in out.items()}


def test_rosinality_checkpoint_round_trips_to_identical_images(
    source: StyleGAN2Generator, tmp_path: Path
) -> None:
    path = tmp_path / "550000.pt"
    args = argparse.Namespace(size=16, latent=32, n_mlp=2, channel_multiplier=2)
    torch.save({"g_ema": rosinality_state(source), "latent_avg": source.mean_latent("w"), "args": args}, path)

    gen, info = load_checkpoint(path, family="stylegan2")

    assert info["format"] == "rosinality-pt"
    assert isinstance(gen, StyleGAN2Generator)
    assert gen.config.resolution == 16 and gen.config.mapping_layers == 2
    assert torch.equal(gen.mean_latent("w"), source.mean_latent("w"))
    assert torch.equal(_images(gen), _images(source))


@pytest.mark.parametrize("zipfile", [True, False])
def test_bare_rosinality_state_dict_loads_without_a_tracked_mean(
    source: StyleGAN2Generator, tmp_path: Path, zipfile: bool
) -> None:
    path = tmp_path / "g_ema.pt"
    torch.save(
        rosinality_state(source), path, _use_new_zipfile_serialization=zipfile
    )  # both torch.save formats
    gen, _ = load_checkpoint(path)
    assert not gen.w_avg_tracked
    z = source.sample_z(2, seed=0)
    with torch.no_grad():
        assert torch.equal(gen.synthesize(z, "z"), source.synthesize(z, "z"))


def test_rosinality_checkpoint_with_a_wrong_blur_kernel_is_rejected(
    source: StyleGAN2Generator, tmp_path: Path
) -> None:
    sd = rosinality_state(source)
    sd["convs.0.conv.blur.kernel"] = torch.ones(4, 4) / 4
    path = tmp_path / "odd.pt"
    torch.save({"g_ema": sd}, path)
    with pytest.raises(ModelUnavailableError, match="low-pass"):
        load_checkpoint(path)


def test_torch_checkpoint_with_a_foreign_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": {}, "x": _Evil(os.system, f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


# --- safetensors ----------------------------------------------------------------------------------------
def test_safetensors_round_trip_keeps_the_recorded_sha256_and_identical_images(
    source: StyleGAN2Generator, fake_nvlabs_modules: types.SimpleNamespace, tmp_path: Path
) -> None:
    pkl = tmp_path / "ffhq.pkl"
    pkl.write_bytes(build_nvlabs_pickle(source, fake_nvlabs_modules, tmp_path / "pwned.txt"))
    dst = tmp_path / "converted" / "ffhq.safetensors"

    src_sha, dst_sha = convert_to_safetensors(pkl, dst)

    assert src_sha == sha256_file(pkl) and dst_sha == sha256_file(dst)
    gen, info = load_checkpoint(dst)
    assert info["format"] == "safetensors"
    assert info["sha256"] == dst_sha and info["source_sha256"] == src_sha
    assert info["w_avg_tracked"]
    assert torch.equal(_images(gen), _images(source))
    assert not (tmp_path / "pwned.txt").exists()


def test_save_safetensors_of_a_random_generator_keeps_it_untracked(tmp_path: Path) -> None:
    gen = StyleGAN2Generator.from_preset("tiny", seed=3)
    sha = save_safetensors(gen, tmp_path / "g.safetensors")
    assert sha == sha256_file(tmp_path / "g.safetensors")
    loaded = load_safetensors(tmp_path / "g.safetensors")
    assert isinstance(loaded, StyleGAN2Generator) and not loaded.w_avg_tracked
    assert loaded.config == gen.config
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temporary file left behind


# --- errors and DCGAN -------------------------------------------------------------------------------------
def test_missing_or_unknown_files_raise_model_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_checkpoint(tmp_path / "nope.pkl")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GIF89a not a checkpoint")
    with pytest.raises(ModelUnavailableError):
        load_checkpoint(junk)


def test_family_mismatch_is_an_error(source: StyleGAN2Generator, tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_safetensors(source, path)
    with pytest.raises(ModelUnavailableError, match="dcgan"):
        load_checkpoint(path, family="dcgan")


def test_dcgan_checkpoint_is_delegated_to_the_dcgan_module(tmp_path: Path) -> None:
    dcgan = pytest.importorskip("projection.dcgan")
    torch.manual_seed(0)
    layers = nn.Sequential(
        nn.ConvTranspose2d(100, 512, 4, 1, 0, bias=False),
        nn.BatchNorm2d(512),
        nn.ReLU(True),
        nn.ConvTranspose2d(512, 256, 4, 2, 1, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(True),
        nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False),
        nn.BatchNorm2d(128),
        nn.ReLU(True),
        nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(True),
        nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False),
        nn.Tanh(),
    ).eval()
    sd = {f"main.{k}": v for k, v in layers.state_dict().items()}
    path = tmp_path / "dcgan.pt"
    torch.save({"netG_state_dict": sd}, path)
    gen, info = load_checkpoint(path)
    assert isinstance(gen, dcgan.DCGANGenerator)
    assert info["format"] == "dcgan-pt" and info["family"] == gen.family
    z = torch.randn(2, *gen.latent_shape("z"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layers(z.reshape(2, 100, 1, 1))
        torch.testing.assert_close(gen.synthesize(z, "z"), expected)
    # DCGANs convert to safetensors too, and come back identical.
    src_sha, dst_sha = convert_to_safetensors(path, tmp_path / "dcgan.safetensors")
    again, info2 = load_checkpoint(tmp_path / "dcgan.safetensors", family="dcgan")
    assert info2["source_sha256"] == src_sha == info["sha256"] and info2["sha256"] == dst_sha
    with torch.no_grad():
        assert torch.equal(again.synthesize(z, "z"), gen.synthesize(z, "z"))


def test_conversion_is_reproducible_the_same_weights_give_the_same_sha256(tmp_path: Path) -> None:
    from projection.checkpoints import save_safetensors

    gen = StyleGAN2Generator.from_preset("tiny", seed=2)
    shas = {save_safetensors(gen, tmp_path / f"g{i}.safetensors", source_sha256="ab" * 32) for i in range(6)}
    assert len(shas) == 1  # metadata key order is normalised, so the file is byte-identical
    code = (
        "import sys; from projection.checkpoints import save_safetensors; "
        "from projection.stylegan2 import StyleGAN2Generator; "
        "print(save_safetensors(StyleGAN2Generator.from_preset('tiny', seed=2), sys.argv[1], source_sha256='ab' * 32))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "other.safetensors")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.strip() in shas
