"""`sleuth models pull` against a real HTTP server on 127.0.0.1 serving small files: pinned, resumable, verified,
and the settings default to what was pulled."""

from __future__ import annotations

import bz2
import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from indexer.errors import ModelUnavailableError
from indexer.model_pull import pull, read_pulled
from indexer.settings import Settings

runner = CliRunner()
FILES = {
    "/mtcnn/pnet.pt": b"P" * 5000, "/mtcnn/rnet.pt": b"R" * 70_000, "/dlib/descriptor.dat.bz2": bz2.compress(b"D" * 9000),
    "/dlib/shapes.dat.bz2": bz2.compress(b"S" * 3000), "/clip/config.json": b'{"model_cfg": {}}',
}  # fmt: skip


class _Server:
    """Serves FILES (or ``override`` bodies) with HTTP Range support, and logs every request it answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.override: dict[str, bytes] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.override.get(self.path, FILES.get(self.path))
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _catalog(tmp_path: Path, base: str) -> Path:
    doc = {"version": 1, "models": {
        "mtcnn": {"description": "detector", "setting": "face_detector", "value": "{dir}", "files": [
            {"name": "pnet.pt", "url": f"{base}/mtcnn/pnet.pt", "sha256": _sha(FILES["/mtcnn/pnet.pt"])},
            {"name": "rnet.pt", "url": f"{base}/mtcnn/rnet.pt", "sha256": _sha(FILES["/mtcnn/rnet.pt"])}]},
        "dlib-face": {"description": "identity", "setting": "face_model", "value": "dlib:{dir}", "files": [
            {"name": "descriptor.dat", "url": f"{base}/dlib/descriptor.dat.bz2", "decompress": "bz2",
             "sha256": _sha(b"D" * 9000)},
            {"name": "shapes.dat", "url": f"{base}/dlib/shapes.dat.bz2", "decompress": "bz2", "sha256": _sha(b"S" * 3000)}]},
        "clip": {"description": "unpinned", "setting": "clip_model", "value": "local-dir:{dir}", "optional": True,
                 "files": [{"name": "open_clip_config.json", "url": f"{base}/clip/config.json", "sha256": None}]},
    }}  # fmt: skip
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(doc))
    return path


def test_pull_fetches_verifies_records_and_the_settings_default_to_it(
    tmp_path: Path, server: _Server
) -> None:
    catalog, data = _catalog(tmp_path, server.url), tmp_path / "data"
    result = runner.invoke(
        app, ["models", "pull", "--catalog", str(catalog), "--data-dir", str(data), "--json"]
    )
    assert result.exit_code == 0, result.output
    pulled = {r["name"]: r for r in json.loads(result.stdout)["pulled"]}
    assert set(pulled) == {"mtcnn", "dlib-face"}, "optional entries are pulled only by name"
    folder = data / "models" / "mtcnn"
    assert (folder / "rnet.pt").read_bytes() == FILES["/mtcnn/rnet.pt"]
    assert (data / "models" / "dlib-face" / "descriptor.dat").read_bytes() == b"D" * 9000, "decompressed"
    assert not list((data / "models").rglob("*.part")), "no partial file is left behind"
    settings = Settings(data_dir=data)
    assert settings.face_detector == folder.resolve()
    assert settings.face_model == f"dlib:{(data / 'models' / 'dlib-face').resolve()}"
    assert Settings(data_dir=data, face_model="dlib:resnet-v1").face_model == "dlib:resnet-v1", "set wins"
    before = len(server.requests)
    again = runner.invoke(
        app, ["models", "pull", "mtcnn", "--catalog", str(catalog), "--data-dir", str(data)]
    )
    assert again.exit_code == 0 and "2 file(s) verified (0 downloaded)" in again.stdout
    assert len(server.requests) == before, "verified files are not fetched again"


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path: Path, server: _Server) -> None:
    catalog, data = _catalog(tmp_path, server.url), tmp_path / "data"
    folder = data / "models" / "mtcnn"
    folder.mkdir(parents=True)
    (folder / "rnet.pt.part").write_bytes(FILES["/mtcnn/rnet.pt"][:30_000])  # what an interrupted run left
    pull(["mtcnn"], data_dir=data, catalog=catalog)
    assert ("/mtcnn/rnet.pt", "bytes=30000-") in server.requests
    assert (folder / "rnet.pt").read_bytes() == FILES["/mtcnn/rnet.pt"]


def test_a_file_that_is_not_the_pinned_one_is_discarded(tmp_path: Path, server: _Server) -> None:
    catalog, data = _catalog(tmp_path, server.url), tmp_path / "data"
    server.override["/mtcnn/pnet.pt"] = b"tampered" * 100
    result = runner.invoke(
        app, ["models", "pull", "mtcnn", "--catalog", str(catalog), "--data-dir", str(data)]
    )
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "pnet.pt" in said and "not the pinned" in said and "the file was discarded" in said
    assert not (data / "models" / "mtcnn" / "pnet.pt").exists()
    assert Settings(data_dir=data).face_detector is None


def test_an_unpinned_file_is_pinned_by_its_first_download(tmp_path: Path, server: _Server) -> None:
    catalog, data = _catalog(tmp_path, server.url), tmp_path / "data"
    (result,) = pull(["clip"], data_dir=data, catalog=catalog)
    recorded = read_pulled(data)["models"]["clip"]["files"][0]
    assert recorded["sha256"] == _sha(FILES["/clip/config.json"]) and recorded["pinned"] is False
    assert Settings(data_dir=data).clip_model == f"local-dir:{result.folder.resolve()}"
    (result.folder / "open_clip_config.json").write_bytes(b"changed")
    server.override["/clip/config.json"] = b'{"other": 1}'
    with pytest.raises(ModelUnavailableError, match="not the pinned"):
        pull(["clip"], data_dir=data, catalog=catalog)


def test_offline_the_pull_fails_at_once_naming_the_entry_and_the_url(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    catalog, data = _catalog(tmp_path, f"http://127.0.0.1:{port}"), tmp_path / "data"
    result = runner.invoke(
        app, ["models", "pull", "mtcnn", "--catalog", str(catalog), "--data-dir", str(data)]
    )
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said
    assert f"http://127.0.0.1:{port}/mtcnn/pnet.pt" in said and "catalog entry 'mtcnn'" in said
    unknown = runner.invoke(
        app, ["models", "pull", "nope", "--catalog", str(catalog), "--data-dir", str(data)]
    )
    assert unknown.exit_code == 2 and "no catalog entry nope" in unknown.output


def test_the_shipped_catalog_pins_what_it_can_and_lpips_builds_one_file(
    tmp_path: Path, server: _Server
) -> None:
    import torch
    from safetensors.torch import load_file

    from indexer.model_pull import load_catalog

    shipped = load_catalog()
    assert {"mtcnn", "lpips-vgg", "dlib-face", "clip-vit-b-32", "stylegan2-ffhq"} <= set(shipped)
    for name in ("mtcnn", "lpips-vgg", "lpips-alex", "dlib-face"):
        assert all(f.sha256 and len(f.sha256) == 64 for f in shipped[name].files), name
    assert shipped["stylegan2-ffhq"].optional
    backbone = tmp_path / "backbone.pth"
    torch.save(
        {"features.0.weight": torch.ones(4, 3, 3, 3), "classifier.0.weight": torch.ones(2, 2)}, backbone
    )
    FILES["/lpips/backbone.pth"] = backbone.read_bytes()
    pinned = {
        "name": "vgg16.pth",
        "url": f"{server.url}/lpips/backbone.pth",
        "sha256": _sha(FILES["/lpips/backbone.pth"]),
    }
    doc = {"models": {"lpips-vgg": {"description": "lpips", "setting": "lpips_weights", "build": "lpips:vgg",
                                     "value": "{dir}/lpips-vgg16.safetensors", "files": [pinned]}}}  # fmt: skip
    (tmp_path / "lpips.json").write_text(json.dumps(doc))
    try:
        (result,) = pull([], data_dir=tmp_path / "data", catalog=tmp_path / "lpips.json")
    finally:
        del FILES["/lpips/backbone.pth"]
    tensors = load_file(result.value)
    assert set(tensors) == {
        "features.0.weight",
        "lin0.weight",
        "lin1.weight",
        "lin2.weight",
        "lin3.weight",
        "lin4.weight",
    }
    assert Settings(data_dir=tmp_path / "data").lpips_weights == Path(result.value)
