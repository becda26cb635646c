"""``sleuth keys create | list | revoke | audit-export`` and ``sleuth serve``'s refusal of insecure settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.keys import verify_token
from indexer.errors import InvalidApiKeyError
from indexer.settings import Settings
from indexer.store.db import open_store

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_keys_create_list_revoke_and_audit_export(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    created = json.loads(
        _ok(["keys", "create", "analyst", "--scope", "search", "--scope", "ingest", "--json", *data])
    )
    token, prefix = created["token"], created["key"]["prefix"]
    assert token.startswith(f"slk_{prefix}_") and created["key"]["scopes"] == ["search", "ingest"]
    plain = _ok(["keys", "create", "lead", "--scope", "admin", *data])
    assert "shown once" in plain and plain.strip().splitlines()[-1].startswith("slk_")

    listed = json.loads(_ok(["keys", "list", "--json", *data]))["keys"]
    assert [k["name"] for k in listed] == ["analyst", "lead"]
    assert token not in json.dumps(listed)  # tokens are never shown again

    store = open_store(Settings(data_dir=tmp_path / "data"))
    try:
        assert verify_token(store, token).name == "analyst"
        assert f"revoked key {prefix}" in _ok(["keys", "revoke", prefix, *data])
        with pytest.raises(InvalidApiKeyError, match="revoked"):
            verify_token(store, token)
    finally:
        store.dispose()

    rows = [json.loads(x) for x in _ok(["keys", "audit-export", *data]).splitlines()]
    assert [r["action"] for r in rows] == ["key_create", "key_create", "key_revoke"]
    out = tmp_path / "audit.csv"
    _ok(["keys", "audit-export", "--format", "csv", "--out", str(out), *data])
    assert out.read_text().splitlines()[0] == "id,at,key_id,action,query_sha256,report_id,detail"


def test_keys_create_refuses_an_unknown_scope_with_a_clear_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "x", "--scope", "root", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown scope(s) root" in result.output


def test_serve_refuses_to_start_in_production_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLEUTH_ENVIRONMENT", "production")
    result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path / "data"), "--port", "1"])
    assert result.exit_code == 2 and "refusing to start" in result.output
