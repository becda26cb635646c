"""``refine=true`` end to end in the app: a job projects the query's face into a registered (tiny) generator and
the report gains the projection evidence (LPIPS, reconstruction, difference) in JSON and in its HTML page."""

from __future__ import annotations

import time
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
from projection.evidence import to_image
from projection.projector import ProjectionConfig
from projection.registry import register_generator
from tests.tiny_generators import tiny_dcgan_checkpoint, tiny_lpips_file


@pytest.fixture
def client_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str]]:
    import search.refine as refine_mod

    real = refine_mod.project_faces
    short = ProjectionConfig(steps=12, lpips_resolution=32)  # the real path, with a test-sized budget

    def project_short(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **kwargs | {"config": short})

    monkeypatch.setattr(refine_mod, "project_faces", project_short)
    settings = Settings(
        data_dir=tmp_path / "data", lpips_weights=tiny_lpips_file(tmp_path / "lpips-vgg.safetensors")
    )
    register_generator(settings, "tiny-dcgan", tiny_dcgan_checkpoint(tmp_path / "netG.pt"), family="dcgan")
    store = open_store(settings)
    token = create_key(store, "analyst", ["search"])[1]
    store.dispose()
    with TestClient(create_app(settings, ApiSettings(rate_limit="1000/second"))) as client:
        yield client, token


@pytest.mark.slow
def test_refine_job_adds_projection_evidence_to_the_report(client_and_key: tuple[TestClient, str]) -> None:
    client, token = client_and_key
    auth = {"Authorization": f"Bearer {token}"}
    gen = DCGANGenerator.from_preset("tiny", seed=1)
    with torch.no_grad():
        face = to_image(gen.synthesize(gen.sample_z(1, seed=5))[0])  # a square face the generator made
    buf = BytesIO()
    face.save(buf, "PNG")
    r = client.post(
        "/v1/searches", files={"file": ("f.png", buf.getvalue())}, data={"refine": "true"}, headers=auth
    )
    assert r.status_code == 202, r.text
    body = r.json()
    deadline = time.monotonic() + 120
    while (job := client.get(body["job_url"], headers=auth).json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
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
    assert "projects into tiny-dcgan with LPIPS" in " ".join(report["verdict"]["reasons"])  # not calibrated
