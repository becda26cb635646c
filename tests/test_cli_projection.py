"""``sleuth generators add|list|convert|calibrate`` and ``sleuth project`` with a tiny seeded DCGAN."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from api.cli import app  # noqa: E402
from projection.checkpoints import sha256_file  # noqa: E402
from projection.dcgan import DCGANGenerator  # noqa: E402
from projection.images import to_image  # noqa: E402
from tests.tiny_generators import (  # noqa: E402, F401
    one_torch_thread_fixture,
    tiny_dcgan_checkpoint,
    tiny_lpips_file,
)

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir with the tiny LPIPS configured; returns the tmp folder."""
    monkeypatch.setenv("SLEUTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SLEUTH_LPIPS_WEIGHTS", str(tiny_lpips_file(tmp_path / "lpips.safetensors")))
    monkeypatch.delenv("SLEUTH_FACE_DETECTOR", raising=False)
    return tmp_path


def _lines(args: list[str]) -> list[dict]:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(ln) for ln in result.stdout.splitlines() if ln.strip()]


def _faces(folder: Path) -> list[Path]:
    """Two images the tiny generator made (seeds 3, 4) and one it cannot make, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = DCGANGenerator.from_preset("tiny", seed=1)
    paths = []
    with torch.no_grad():
        for s in (3, 4):
            path = folder / f"made-{s}.png"
            to_image(gen.synthesize(gen.sample_z(1, seed=s))[0]).save(path)
            paths.append(path)
    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    return [paths[0], folder / "noise.png", paths[1]]


def test_generators_add_list_and_convert_speak_json(env: Path) -> None:
    ckpt = tiny_dcgan_checkpoint(env / "netG.pt")
    (added,) = _lines(["generators", "add", "tiny", str(ckpt), "--family", "dcgan", "--json"])
    assert added["name"] == "tiny" and added["source_sha256"] == sha256_file(ckpt)
    assert added["weights_sha256"] == sha256_file(added["weights_path"]) and added["calibrated"] is False
    (listed,) = _lines(["generators", "list", "--json"])
    assert [g["name"] for g in listed["generators"]] == ["tiny"]
    (conv,) = _lines(["generators", "convert", str(ckpt), str(env / "tiny.safetensors"), "--json"])
    assert (
        conv["sha256"] == sha256_file(env / "tiny.safetensors")
        and conv["source_sha256"] == added["source_sha256"]
    )
    text = runner.invoke(app, ["generators", "list"])
    assert text.exit_code == 0 and "tiny" in text.stdout and "dcgan" in text.stdout


def test_project_prints_one_json_line_per_image_in_input_order(env: Path) -> None:
    added = runner.invoke(
        app, ["generators", "add", "tiny", str(tiny_dcgan_checkpoint(env / "netG.pt")), "--family", "dcgan"]
    )
    assert added.exit_code == 0 and "registered tiny (dcgan, 16x16)" in added.stdout
    images = _faces(env / "faces")
    out = env / "out"
    docs = _lines(
        ["project", *map(str, images), "--generator", "tiny", "--json", "--steps", "120", "--out", str(out)]
    )
    assert [d["image"] for d in docs] == [str(p) for p in images]
    for d in docs:
        assert {"generator", "lpips", "probability_generated", "latent_matches", "steps", "seconds"} <= set(d)
        assert d["generator"] == "tiny" and d["probability_generated"] is None and d["steps"] > 0
        assert Path(d["reconstruction"]).is_file() and Path(d["difference"]).is_file()
    assert len({d["seconds"] for d in docs}) == len(docs), "each image's own time, not the batch's repeated"
    assert docs[0]["lpips"] < 0.01 and docs[2]["lpips"] < 0.01
    assert docs[1]["lpips"] > 5 * max(docs[0]["lpips"], docs[2]["lpips"])


def test_calibrate_then_project_reports_a_probability_and_readable_text(env: Path) -> None:
    added = runner.invoke(
        app, ["generators", "add", "tiny", str(tiny_dcgan_checkpoint(env / "netG.pt")), "--family", "dcgan"]
    )
    assert added.exit_code == 0 and "registered tiny (dcgan, 16x16)" in added.stdout
    real = env / "real"
    real.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(real / f"{i}.png")
    (cal,) = _lines(
        ["generators", "calibrate", "tiny", "--real", str(real), "--k", "3", "--steps", "40", "--json"]
    )
    assert (cal["n_generated"], cal["n_real"]) == (3, 3)
    images = _faces(env / "faces")
    result = runner.invoke(
        app, ["project", str(images[0]), "-g", "tiny", "--steps", "60", "--out", str(env / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "p(generated by tiny: DCGAN (tutorial layout" in result.stdout
    assert "calibrated on 3 generated / 3 real" in result.stdout
    assert len(list((env / "o").glob("*-reconstruction.png"))) == 1


def test_projection_errors_are_one_clear_line_and_exit_2(env: Path) -> None:
    result = runner.invoke(app, ["project", str(env / "missing.png"), "--generator", "nope"])
    assert result.exit_code == 2 and "cannot read" in result.output
    face = _faces(env / "faces")[0]
    result = runner.invoke(app, ["project", str(face), "--generator", "nope"])
    assert result.exit_code == 2 and "no generator named 'nope'" in result.output
    bad = env / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = runner.invoke(app, ["generators", "add", "x", str(bad), "--family", "dcgan"])
    assert result.exit_code == 2 and "error" in result.output
    result = runner.invoke(app, ["generators", "calibrate", "x", "--real", str(env / "none")])
    assert result.exit_code == 2 and "no generator named 'x'" in result.output


def test_train_encoder_records_it_and_projection_starts_from_its_prediction(env: Path) -> None:
    ckpt = tiny_dcgan_checkpoint(env / "netG.pt")
    assert runner.invoke(app, ["generators", "add", "tiny", str(ckpt), "--family", "dcgan"]).exit_code == 0
    (trained,) = _lines(
        ["generators", "train-encoder", "tiny", "--samples", "600", "--epochs", "2", "--json"]
    )
    encoder = trained["encoder"]
    assert encoder["sha256"] == sha256_file(encoder["path"]) and encoder["space"] == "z"
    assert encoder["report"]["samples"] == 600 and encoder["training"]["epochs"] == 2
    (listed,) = _lines(["generators", "list", "--json"])
    assert listed["generators"][0]["encoder"]["sha256"] == encoder["sha256"]
    text = runner.invoke(app, ["generators", "list"])
    assert "cosine" in text.stdout
    images = _faces(env / "faces")
    docs = _lines(
        ["project", str(images[0]), str(images[1]), "-g", "tiny", "--json", "--out", str(env / "o")]
    )
    assert [d["start_index"] for d in docs] == [1, 1]  # the encoder's prediction (the mean latent is not run)
    assert docs[0]["lpips"] < 0.05 < docs[1]["lpips"]
    bad = runner.invoke(app, ["generators", "train-encoder", "nope"])
    assert bad.exit_code == 2 and "no generator named 'nope'" in bad.output
