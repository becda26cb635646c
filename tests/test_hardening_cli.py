"""Issue 10, defect 6 on the command line: a malformed safetensors file, an empty search folder and an empty
``SLEUTH_FACE_DETECTOR`` each get a clear answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from indexer.settings import Settings

runner = CliRunner()


@pytest.mark.parametrize(
    "header",
    [
        b'{"family": "dcgan", this is not json',
        b'{"__metadata__": {"family": "dcgan"}, "w": {"dtype": "F32"}}',
    ],
)
def test_a_malformed_safetensors_file_is_a_clear_error_with_exit_2(tmp_path: Path, header: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 64)
    result = runner.invoke(
        app, ["generators", "add", "bad", str(bad), "--family", "dcgan", "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "error" in result.output and "bad.safetensors" in result.output
    assert "Traceback" not in result.output


def test_searching_an_empty_folder_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["search", str(tmp_path / "empty"), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert "no image files" in result.output


def test_searching_an_empty_folder_with_json_says_so_on_stderr_only(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(
        app, ["search", str(tmp_path / "empty"), "--json", "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2
    assert all(not line.strip() or json.loads(line) for line in result.stdout.splitlines())


def test_an_empty_face_detector_setting_means_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLEUTH_FACE_DETECTOR", "")
    monkeypatch.setenv("SLEUTH_LPIPS_WEIGHTS", "")
    monkeypatch.setenv("SLEUTH_CLIP_MODEL", "")
    settings = Settings(data_dir=tmp_path / "d")
    assert settings.face_detector is None and settings.lpips_weights is None and settings.clip_model is None
