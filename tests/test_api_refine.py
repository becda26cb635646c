"""``refine=true`` end to end in the app: a job projects the query's face into a registered (tiny) generator and
the report gains the projection evidence (LPIPS, reconstruction, difference) in JSON and in its HTML page; the
same file gives the same numbers through ``sleuth project``. Jobs are run by the test itself (``drain``), so
nothing depends on how fast the machine is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from api.keys import create_key
from api.settings import ApiSettings
from indexer.settings import Settings
from indexer.store.db import open_store
from projection.dcgan import DCGANGenerator
from projection.images import to_image
from projection.registry import register_generator
from tests.tiny_generators import tiny_dcgan_checkpoint, tiny_lpips_file

STEPS = 12  # the real path, with a test-sized budget


@pytest.fixture
def client_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, str, Settings]]:
    import search.refine as refine_mod
    from projection.evidence import projection_config
    from projection.registry import get_generator

    real = refine_mod.project_faces

    def project_short(settings: Settings, faces: Any, name: str, **kwargs: Any) -> Any:
        config = projection_config(get_generator(settings, name), steps=STEPS)  # what `project --steps` uses
        return real(settings, faces, name, **kwargs | {"config": config})

    monkeypatch.setattr(refine_mod, "project_faces", project_short)
    settings = Settings(
        data_dir=tmp_path / "data", lpips_weights=tiny_lpips_file(tmp_path / "lpips-vgg.safetensors")
    )
    register_generator(settings, "tiny-dcgan", tiny_dcgan_checkpoint(tmp_path / "netG.pt"), family="dcgan")
    store = open_store(settings)
    token = create_key(store, "analyst", ["search"])[1]
    store.dispose()
    api = ApiSettings(rate_limit="1000/second", embedded_worker=False)  # the test runs the jobs: no waiting
    with TestClient(create_app(settings, api)) as client:
        yield client, token, settings


def _face_file(tmp_path: Path) -> bytes:
    gen = DCGANGenerator.from_preset("tiny", seed=1)
    with torch.no_grad():
        face = to_image(gen.synthesize(gen.sample_z(1, seed=5))[0])  # a square face the generator made
    buf = BytesIO()
    face.save(buf, "JPEG", quality=80)
    (tmp_path / "face.jpg").write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.mark.slow
def test_refine_job_adds_projection_evidence_to_the_report(
    client_and_key: tuple[TestClient, str, Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, token, settings = client_and_key
    auth = {"Authorization": f"Bearer {token}"}
    data = _face_file(tmp_path)
    r = client.post("/v1/searches", files={"file": ("f.jpg", data)}, data={"refine": "true"}, headers=auth)
    assert r.status_code == 202, r.text
    body = r.json()
    assert client.app.state.sleuth.queue.drain() == 1  # type: ignore[attr-defined]
    job = client.get(body["job_url"], headers=auth).json()
    assert job["status"] == "done", job
    report = client.get(body["report_url"], headers=auth).json()
    assert report["status"] == "done" and report["refine"]["status"] == "done", report["refine"]
    projection = report["faces"][0]["projections"][0]
    assert projection["generator"] == "tiny-dcgan" and projection["lpips"] >= 0
    assert projection["reconstruction"].startswith("data:image/png;base64,")
    page = client.get(body["report_url"] + "?format=html", headers=auth).text
    assert "Projected into <strong>tiny-dcgan</strong>" in page
    assert 'alt="reconstruction of face 1"' in page and 'alt="difference of face 1"' in page
    generator = report["reproducibility"]["models"]["generator tiny-dcgan"]
    assert len(generator["weights_sha256"]) == 64 and generator["calibrated"] is False
    reasons = " ".join(report["verdict"]["reasons"])
    assert "projects into tiny-dcgan (" in reasons and ") with LPIPS" in reasons  # not calibrated

    # the same file through `sleuth project`: the same preparation and the same numbers
    from typer.testing import CliRunner

    from api.cli import app

    monkeypatch.setenv("SLEUTH_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("SLEUTH_LPIPS_WEIGHTS", str(settings.lpips_weights))
    monkeypatch.delenv("SLEUTH_FACE_DETECTOR", raising=False)
    result = CliRunner().invoke(
        app, ["project", str(tmp_path / "face.jpg"), "-g", "tiny-dcgan", "--steps", str(STEPS), "--json",
              "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    assert cli["face"]["how"] == projection["face"]["how"] == "whole-image"
    assert cli["face"]["jpeg_quality"] == projection["face"]["jpeg_quality"] == 80
    assert cli["face"]["effective_size"] == projection["face"]["effective_size"] == 16
    assert cli["lpips"] == pytest.approx(projection["lpips"], abs=1e-6)
    assert cli["steps"] == projection["steps"]
