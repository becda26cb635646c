from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from api.cli import app
from tests.synthetic_images import write_corpus

runner = CliRunner()


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, "--json prints one JSON document and nothing else"
    return json.loads(lines[0])


def test_ingest_stats_verify_and_rebuild_speak_json(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", 4)
    (tmp_path / "c" / "junk.jpg").write_bytes(b"\xff\xd8\xffnot an image")
    data = ["--data-dir", str(tmp_path / "data")]
    summary = _json(["ingest", str(tmp_path / "c"), "--collection", "c", "--json", *data])
    assert (summary["new"], summary["failures"]) == (4, 1)
    assert "clip skipped: no model configured" in summary["tiers"]
    stats = _json(["index", "stats", "--json", *data])
    assert stats["counts"]["images"] == 4 and stats["counts"]["ingest_failures"] == 1
    assert stats["indexes"]["pdq"]["count"] == 4
    assert stats["recent_failures"][0]["source_key"] == "junk.jpg"
    assert _json(["index", "verify", "--json", *data])["ok"] is True
    rebuilt = _json(["index", "rebuild", "--json", *data])
    assert {r["name"] for r in rebuilt["rebuilt"]} == {"pdq", "phash"}
    assert _json(["index", "verify", "--json", *data])["ok"] is True


def test_verify_finds_a_damaged_index_and_rebuild_repairs_it(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", 3)
    data = ["--data-dir", str(tmp_path / "data")]
    runner.invoke(app, ["ingest", str(tmp_path / "c"), "--collection", "c", *data])
    (tmp_path / "data" / "indexes" / "pdq.faiss").unlink()
    result = runner.invoke(app, ["index", "verify", "--json", *data])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert any("missing" in " ".join(r["problems"]) for r in report["indexes"] if r["name"] == "pdq")
    assert runner.invoke(app, ["index", "rebuild", *data]).exit_code == 0
    assert _json(["index", "verify", "--json", *data])["ok"] is True


def test_missing_source_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "nope"), "--collection", "c", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_models_check_reports_a_missing_onnx_file_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "clip.onnx"
    result = runner.invoke(app, ["models", "check", "--json", "--clip-model", f"onnx:{missing}"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    clip = next(m for m in doc["models"] if m["role"] == "clip")
    assert clip["ok"] is False and str(missing) in clip["message"]


def test_models_check_loads_a_local_open_clip_model(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_open_clip_dir

    model_id = make_tiny_open_clip_dir(tmp_path / "clip")
    doc = _json(["models", "check", "--json", "--clip-model", model_id])
    clip = next(m for m in doc["models"] if m["role"] == "clip")
    assert clip["ok"] is True and "dim" in clip["message"]
    listed = _json(["models", "list", "--json"])
    assert {m["setting"] for m in listed["models"]} >= {"SLEUTH_CLIP_MODEL", "SLEUTH_FACE_DETECTOR"}


def test_version_and_help_show_flags_as_flags() -> None:
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("sleuth ")
    for args in (["search", "--help"], ["ingest", "--help"], ["index", "stats", "--help"], ["--help"]):
        text = runner.invoke(app, args).stdout
        assert "<bool>" not in text, f"a flag takes no value ({' '.join(args)})"
    search_help = runner.invoke(app, ["search", "--help"]).stdout
    assert "--json " in search_help and "--face-detector <dir>" in search_help
    assert "--format <table|jsonl|csv>" in search_help


def test_face_detector_option_overrides_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-mtcnn"
    missing.mkdir()
    result = runner.invoke(app, ["models", "check", "--json", "--face-detector", str(missing)])
    doc = json.loads(result.stdout)
    faces = next(m for m in doc["models"] if m["role"] == "face_detector")
    assert faces["value"] == str(missing) and faces["ok"] is False and "pnet" in faces["message"]
