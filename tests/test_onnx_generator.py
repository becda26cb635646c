"""ONNX generators (model card + onnx2torch) and the DCGAN deconv-blocks layout, with tiny models built here."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from api.cli import app  # noqa: E402
from indexer.errors import ModelUnavailableError  # noqa: E402
from indexer.settings import Settings  # noqa: E402
from projection.checkpoints import load_checkpoint, sha256_file  # noqa: E402
from projection.dcgan import DCGANGenerator  # noqa: E402
from projection.onnx_generator import OnnxGenerator, find_half_resolution_readout, read_card  # noqa: E402
from projection.projector import ProjectionConfig, project  # noqa: E402
from projection.registry import load_generator, register_generator  # noqa: E402
from tests.tiny_generators import (  # noqa: E402, F401
    lpips_file_fixture,
    one_torch_thread_fixture,
    tiny_onnx_card,
)


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx_card(tmp_path_factory.mktemp("onnx"))


@pytest.fixture
def settings(tmp_path: Path, lpips_file: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", lpips_weights=lpips_file)


def _onnxruntime(path: Path, name: str, value: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value})[0]


def test_registered_onnx_generator_matches_onnxruntime_and_records_every_file(
    settings: Settings, card: Path
) -> None:
    info = register_generator(settings, "tiny-onnx", card, family="onnx")
    doc = json.loads(card.read_text())
    assert info.family == "onnx" and info.resolution == 16 and info.latent_space == "w"
    assert info.description == "tiny test generator (random weights)"
    assert set(info.config["files"]) == {"mapping", "synthesis", "synthesis_wplus"}
    for role, f in doc["files"].items():  # copies under generators/NAME/, each checksum recorded
        assert info.config["files"][role] == f["sha256"] == sha256_file(card.parent / f["path"])
        assert sha256_file(settings.data_dir / "generators" / "tiny-onnx" / f"{role}.onnx") == f["sha256"]
    generator, _ = load_generator(settings, "tiny-onnx")
    assert isinstance(generator, OnnxGenerator) and generator.latent_spaces == ("z", "w", "w+")
    z = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    w_ref = _onnxruntime(card.parent / doc["files"]["mapping"]["path"], "var", z)
    img_ref = _onnxruntime(card.parent / doc["files"]["synthesis"]["path"], "style", w_ref)  # in [0, 1]
    with torch.no_grad():
        w = generator.mapping(torch.from_numpy(z))
        image = generator.synthesize(w, "w")
        wplus = generator.synthesize(w[:, None].expand(-1, 3, -1), "w+")
        from_z = generator.synthesize(torch.from_numpy(z), "z")
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-5)
    np.testing.assert_allclose(image.numpy(), img_ref * 2 - 1, atol=1e-5)  # output range mapped to [-1, 1]
    torch.testing.assert_close(wplus, image)
    torch.testing.assert_close(from_z, image)
    assert not any(p.requires_grad for p in generator.parameters())


def test_the_exact_half_resolution_read_out_is_found_and_gives_the_downsampled_image(
    settings: Settings, card: Path
) -> None:
    info = register_generator(settings, "tiny-onnx", card, family="onnx")
    readout = info.config["readout"]
    assert readout is not None and readout["max_error"] < 1e-4
    generator, _ = load_generator(settings, "tiny-onnx")
    assert generator.preview_resolution == 8
    with torch.no_grad():
        w = generator.mapping(generator.sample_z(3, seed=9))  # type: ignore[operator]
        preview = generator.synthesize_preview(w, "w")
        full = generator.synthesize(w, "w")
    assert preview.shape == (3, 3, 8, 8)
    torch.testing.assert_close(preview, F.avg_pool2d(full, 2), atol=1e-4, rtol=0)


def test_a_generator_whose_last_stage_is_not_linear_gets_no_read_out(tmp_path: Path) -> None:
    generator = _loaded(tiny_onnx_card(tmp_path, nonlinear_last=True))
    assert find_half_resolution_readout(generator) is None
    assert generator.preview_resolution == 0


def _loaded(card: Path) -> OnnxGenerator:
    from projection.onnx_generator import load_onnx_generator

    return load_onnx_generator(card)


def test_projection_into_the_onnx_generator_recovers_its_own_sample(card: Path, lpips_file: Path) -> None:
    from projection.lpips_loader import load_lpips

    generator = _loaded(card)
    with torch.no_grad():
        w_true = generator.mapping(generator.sample_z(1, seed=3))
        target = generator.synthesize(w_true, "w")  # [1, 3, 16, 16]
    config = ProjectionConfig(space="w", steps=150, lpips_resolution=16, lpips_weight=0.0, mse_weight=1.0)
    (result,) = project(generator, target, lpips_model=load_lpips(lpips_file), config=config)
    assert result.mse < 1e-3, result.mse
    start_mse = float((generator.synthesize(generator.mean_latent("w")[None], "w") - target).square().mean())
    assert result.mse < 0.05 * start_mse


def test_changed_or_mismatched_onnx_files_are_refused_with_a_clear_error(
    settings: Settings, card: Path, tmp_path: Path
) -> None:
    register_generator(settings, "tiny-onnx", card, family="onnx")
    copy = settings.data_dir / "generators" / "tiny-onnx" / "mapping.onnx"
    copy.write_bytes(copy.read_bytes() + b"\0")
    from projection import registry

    registry._CACHE.clear()
    with pytest.raises(ModelUnavailableError, match="changed"):
        load_generator(settings, "tiny-onnx")
    doc = json.loads(card.read_text())
    doc["files"]["mapping"]["sha256"] = "0" * 64
    bad = card.parent / "bad-card.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ModelUnavailableError, match="model card recorded"):
        register_generator(settings, "other", bad, family="onnx")
    del doc["files"]["mapping"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ModelUnavailableError, match="needs files.mapping"):
        read_card(bad)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    doc = json.loads(card.read_text())
    doc["files"]["mapping"] = {"path": str(tmp_path / "junk.onnx")}
    bad.write_text(json.dumps(doc))
    with pytest.raises(ModelUnavailableError, match="cannot convert ONNX file"):
        register_generator(settings, "junk", bad, family="onnx")


def test_generators_add_onnx_through_the_cli(settings: Settings, card: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(settings.data_dir)]
    ok = runner.invoke(app, ["generators", "add", "tiny", str(card), "--family", "onnx", "--json", *data])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["family"] == "onnx" and set(doc["files_sha256"]) == {"mapping", "synthesis", "synthesis_wplus"}
    (tmp_path / "broken.json").write_text("{not json")
    bad = runner.invoke(
        app, ["generators", "add", "b", str(tmp_path / "broken.json"), "--family", "onnx", *data]
    )
    assert bad.exit_code == 2 and "cannot read model card" in bad.output and "Traceback" not in bad.output


# --- DCGAN deconv-blocks layout (the CelebA DCGAN-32 of the third-party folder) --------------------------------
def _deconv_blocks_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the ``generator_deconv.K.M`` layout of the CelebA DCGAN-32 (channels 256/128/64/32)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(100, 256, 4), (128, 256, 3), (128, 64, 4), (64, 32, 4), (32, 3, 4)]
    sd: dict[str, torch.Tensor] = {}
    for i, (a, b, k) in enumerate(shapes):
        sd[f"generator_deconv.{i}.0.weight"] = torch.randn(a, b, k, k, generator=g) * 0.05
        cout = b if i != 1 else a
        if i == 4:
            sd[f"generator_deconv.{i}.0.bias"] = torch.zeros(3)
            continue
        sd[f"generator_deconv.{i}.1.weight"] = torch.ones(cout)
        sd[f"generator_deconv.{i}.1.bias"] = torch.zeros(cout)
        sd[f"generator_deconv.{i}.1.running_mean"] = torch.zeros(cout)
        sd[f"generator_deconv.{i}.1.running_var"] = torch.ones(cout)
        sd[f"generator_deconv.{i}.1.num_batches_tracked"] = torch.tensor(10)
    return sd


def test_deconv_blocks_layout_is_read_off_the_checkpoint_with_a_uniform_latent(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "generator.pt"
    torch.save(_deconv_blocks_state_dict(), path)
    gen, info = load_checkpoint(path, z_distribution="uniform")
    assert isinstance(gen, DCGANGenerator) and info["format"] == "dcgan-pt"
    cfg = gen.config
    assert (cfg.layout, cfg.nz, cfg.resolution, cfg.z_distribution) == ("deconv-blocks", 100, 32, "uniform")
    kinds = [(b.transposed, b.kernel, b.stride, b.activation) for b in cfg.blocks]
    assert kinds == [(True, 4, 1, "none"), (False, 3, 1, "leaky_relu"), (True, 4, 2, "leaky_relu"),
                     (True, 4, 2, "leaky_relu"), (True, 4, 2, "tanh")]  # fmt: skip
    z = gen.sample_z(64, seed=1)
    assert (
        z.shape == (64, 100, 1, 1) and float(z.min()) >= -1 and float(z.max()) <= 1 and float(z.min()) < -0.9
    )
    assert gen.latent_std("z") == pytest.approx(1 / np.sqrt(3))
    with torch.no_grad():
        assert gen.synthesize(z[:2], "z").shape == (2, 3, 32, 32)
    registered = register_generator(settings, "celeba32", path, family="dcgan", z_distribution="uniform")
    assert registered.config["layout"] == "deconv-blocks" and registered.config["z_distribution"] == "uniform"
    loaded, _ = load_generator(settings, "celeba32")
    assert isinstance(loaded, DCGANGenerator) and loaded.config.z_distribution == "uniform"  # kept
    with torch.no_grad():
        torch.testing.assert_close(loaded.synthesize(z[:2], "z"), gen.synthesize(z[:2], "z"))
    latent = torch.full((1, 100, 1, 1), 3.0)
    loaded.constrain_(latent, "z")
    assert float(latent.max()) == 1.0


def test_the_real_celeba_dcgan_layout_loads_when_the_file_is_there() -> None:
    path = Path(__file__).resolve().parents[2] / "shared/models/third-party/dcgan-celeba-32/generator.pt"
    if not path.is_file():
        pytest.skip("the third-party CelebA DCGAN is not beside this checkout")
    gen, _ = load_checkpoint(path, z_distribution="uniform")
    with torch.no_grad():
        images = gen.synthesize(gen.sample_z(4, seed=0), "z")
    assert images.shape == (4, 3, 32, 32) and float(images.std()) > 0.1  # real weights make varied faces
