"""Tiny seeded models for the projection tests: a random VGG-LPIPS file and tiny generator checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
