"""Tiny seeded models for the projection tests: a random VGG-LPIPS file and tiny generator checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from projection.dcgan import DCGANGenerator
from projection.lpips_loader import _quiet_lpips, save_lpips_weights


def tiny_lpips_file(path: Path, *, net: str = "vgg", seed: int = 0) -> Path:
    """A seeded, randomly initialised LPIPS written in the layout ``load_lpips`` reads.

    The linear layers are made non-negative (as trained LPIPS weights are), so the distance is a metric-like
    sum of squared feature differences: zero for equal images, positive otherwise.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _quiet_lpips(net)
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            if name.startswith("lin") and name.endswith("model.1.weight"):
                param.abs_()  # linK.model.1.weight (lins.K is the same module)
    return save_lpips_weights(model, path)


def tiny_dcgan_checkpoint(path: Path, *, seed: int = 1) -> Path:
    """A tiny DCGAN saved like the PyTorch DCGAN tutorial checkpoints: ``{"netG_state_dict": ...}``."""
    gen = DCGANGenerator.from_preset("tiny", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"netG_state_dict": gen.state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(autouse=True, scope="module", name="one_torch_thread")
def one_torch_thread_fixture() -> Iterator[None]:
    """Small tensors: one intra-op thread is fastest and stays fast on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", name="lpips_file")
def lpips_file_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random VGG-LPIPS weights file (see ``tiny_lpips_file``)."""
    return tiny_lpips_file(tmp_path_factory.mktemp("lpips") / "lpips-vgg-random.safetensors")


class _TinyMapping(torch.nn.Module):
    """z [N, 8] -> w [N, 8]: two small linear layers (pixel-normalised z, as StyleGAN mappings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        return self.fc1(torch.nn.functional.leaky_relu(self.fc0(z), 0.2))


class _TinySynthesis(torch.nn.Module):
    """W+ [N, 3, 8] (or w [N, 8]) -> image [N, 3, 16, 16]: a styled 4x4 constant, two styled convolutions, and a
    final fixed linear 2x upsampling (a 2x2 stride-2 transposed convolution) like a generator's last inverse
    wavelet stage, so its half-resolution read-out exists and is exact."""

    def __init__(self, *, wplus: bool, nonlinear_last: bool = False) -> None:
        super().__init__()
        self.wplus, self.nonlinear_last = wplus, nonlinear_last
        self.const = torch.nn.Parameter(torch.randn(1, 8, 4, 4))
        self.affine = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
        self.conv0 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(12, 3, 2, stride=2)

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        if not self.wplus:
            ws = ws[:, None, :].expand(-1, 3, -1)
        x = self.const.expand(ws.shape[0], -1, -1, -1) * (1 + self.affine[0](ws[:, 0])[:, :, None, None])
        x = torch.nn.functional.leaky_relu(self.conv0(x), 0.2)
        x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")  # 8x8
        x = x * (1 + self.affine[1](ws[:, 1])[:, :, None, None])
        x = self.conv1(x) * (1 + 0.1 * self.affine[2](ws[:, 2]).mean(dim=1))[:, None, None, None]
        out = self.up(x)
        if self.nonlinear_last:  # no linear read-out exists: the last stage mixes pixels non-linearly
            out = torch.tanh(3.0 * out) + 0.5 * torch.nn.functional.avg_pool2d(out, 3, 1, 1).square()
        return out * 0.5 + 0.5  # [N, 3, 16, 16], nominally in [0, 1] (the card says so)


def tiny_onnx_card(folder: Path, *, seed: int = 0, nonlinear_last: bool = False) -> Path:
    """A tiny ONNX generator exported with ``torch.onnx.export`` (mapping, w and W+ synthesis) and its model card
    in the layout of ``mobilestylegan-ffhq.json``; returns the card's path. ``nonlinear_last``: its last stage is
    not a linear upsampling (no exact half-resolution read-out)."""
    import hashlib
    import json
    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapping = _TinyMapping().eval()
        synthesis = _TinySynthesis(wplus=True, nonlinear_last=nonlinear_last).eval()
        single = _TinySynthesis(wplus=False, nonlinear_last=nonlinear_last).eval()
        single.load_state_dict(synthesis.state_dict())
    exports = {
        "mapping": (mapping, torch.randn(1, 8), "var", "style"),
        "synthesis": (single, torch.randn(1, 8), "style", "img"),
        "synthesis_wplus": (synthesis, torch.randn(1, 3, 8), "style", "img"),
    }
    files: dict[str, Any] = {}
    card: dict[str, Any] = {
        "model": "tiny test generator (random weights)", "resolution": 16, "z_dim": 8, "w_dim": 8,
        "num_ws": 1, "num_ws_wplus": 3, "output_range": [0.0, 1.0],
    }  # fmt: skip
    for role, (module, example, in_name, out_name) in exports.items():
        path = folder / f"tiny-{role}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                dynamic_axes={in_name: {0: "N"}, out_name: {0: "N"}}, opset_version=17, dynamo=False,
            )  # fmt: skip
        card[role] = {"input": {"name": in_name}, "output": {"name": out_name}}
        files[role] = {"path": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    card["files"] = files
    card_path = folder / "tiny-card.json"
    card_path.write_text(json.dumps(card, indent=1))
    return card_path
