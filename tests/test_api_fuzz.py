"""Schemathesis fuzzes every operation of the OpenAPI schema against a live server: no 5xx, ever."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.commands import keys_create
from api.testing import live_server
from indexer.settings import Settings
from tests.synthetic_images import write_corpus

ST = Path(sys.executable).with_name("st")


@pytest.mark.slow
@pytest.mark.skipif(not ST.exists() and shutil.which("st") is None, reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    roots = tmp_path / "crawls"
    write_corpus(roots / "seed", 6)
    settings = Settings(data_dir=tmp_path / "data")
    token = keys_create("fuzzer", ["admin"], settings=settings)[1]
    env = {
        "SLEUTH_DATA_DIR": str(settings.data_dir), "SLEUTH_INGEST_ROOTS": json.dumps([str(roots)]),
        "SLEUTH_RATE_LIMIT": "100000/second",
    }  # fmt: skip
    with live_server(env, log_path=tmp_path / "server.log") as live:
        auth = {"Authorization": f"Bearer {token}"}
        job = httpx.post(
            live.url + "/v1/ingest-jobs", json={"source": str(roots), "collection": "seed"}, headers=auth
        )
        assert job.status_code == 202  # ids 1.. exist, so fuzzed lookups reach real rows too
        run = subprocess.run(
            [str(ST if ST.exists() else "st"), "run", live.url + "/openapi.json", "-H", f"Authorization: Bearer {token}",
             "--checks", "not_a_server_error", "--max-examples", "30", "--seed", "20261123", "--workers", "2",
             "--phases", "examples,coverage,fuzzing", "--no-color", "--request-timeout", "60"],
            capture_output=True, text=True, timeout=540,
        )  # fmt: skip
        server_log = live.log()
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:] + server_log[-3000:]
    assert "Tested: 17" in run.stdout, run.stdout[-3000:]  # every operation of the schema was exercised
    cases = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert cases is not None and int(cases[1]) >= 200 and cases[1] == cases[2], run.stdout[-3000:]
    assert "Traceback" not in server_log, server_log[-3000:]
