"""Hostile inputs against a real ``sleuth serve`` on 127.0.0.1: memory per large upload, ingest of large files,
refusals, and how long a FIFO takes to fail an ingest job (issue 10).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/hostile.py --out bench-out/hostile.json

Builds everything itself in ``--work`` (nothing is downloaded): 79 Mpx JPEGs (8900x8900, about 1.2 MB each,
under the 80 Mpx limit), a folder of them inside the ingest roots, a PNG with 20,000 text chunks, a
decompression bomb, a truncated JPEG, a folder of tar shards symlinked to a tar outside the roots, a folder with
a FIFO. Starts ``python -m api serve`` (the ``sleuth serve`` command) over a fresh data dir (copy tiers; add
``--clip-model`` for CLIP) and measures the server's resident memory by sampling ``/proc/PID/status`` (VmRSS,
every 20 ms) in each phase:

1. one 79 Mpx search; 2. ``--concurrent`` of them at once; 3. the ingest job over the folder of them;
4. hostile requests (no key / wrong key with a large body, chunked over the limit, PNG text bomb, pixel bomb,
   truncated, shards outside the roots, a FIFO source and a folder holding a FIFO), each a bounded number of
   times. Prints the peaks, the 5xx count over every request and the seconds until the FIFO job ended.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.commands import keys_create  # noqa: E402
from api.testing import live_server  # noqa: E402
from indexer.settings import Settings  # noqa: E402

MB = 1024 * 1024


# --- the files ------------------------------------------------------------------------------------------
def large_jpeg(seed: int, side: int = 8900) -> bytes:
    """A smooth 79 Mpx photo-like JPEG (a small drawing scaled up): about 1.2 MB, 237 MB once decoded."""
    rng = np.random.default_rng(seed)
    small = Image.new("RGB", (side // 20, side // 20), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(small)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, small.width, 2))
        draw.ellipse([x0, y0, x0 + int(rng.integers(5, 120)), y0 + int(rng.integers(5, 120))],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))  # fmt: skip
    big = small.resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def png_text_bomb(chunks: int = 20_000) -> bytes:
    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"k{i}", "x" * 100)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def pixel_bomb(side: int = 20_000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")  # a few KB, 400 Mpx declared
    return buf.getvalue()


def build_files(work: Path, n_large: int) -> dict[str, Any]:
    roots, outside = work / "roots", work / "outside"
    for folder in (roots / "large", roots / "shards", roots / "fifo", outside):
        folder.mkdir(parents=True, exist_ok=True)
    large = [large_jpeg(i) for i in range(n_large)]
    for i, data in enumerate(large):
        (roots / "large" / f"large_{i}.jpg").write_bytes(data)
    with tarfile.open(outside / "secret.tar", "w") as tar:
        info = tarfile.TarInfo("00000.jpg")
        info.size = len(large[0])
        tar.addfile(info, io.BytesIO(large[0]))
    (roots / "shards" / "00000.tar").symlink_to(outside / "secret.tar")
    os.mkfifo(roots / "fifo" / "pipe.jpg")
    os.mkfifo(roots / "fifo" / "noextension")
    os.mkfifo(roots / "source.csv")
    small = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 30)).save(small, "JPEG", quality=90)
    (roots / "fifo" / "real.jpg").write_bytes(small.getvalue())
    return {"roots": roots, "large": large, "small": small.getvalue()}


# --- the server --------------------------------------------------------------------------------------------
class RssSampler:
    """Samples VmRSS of ``pid`` every ``every_s`` in a thread; ``phase()`` gives (baseline, peak) in MB."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s = pid, every_s
        self.current = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _rss(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.current = self._rss()
            self.peak = max(self.peak, self.current)

    @contextmanager
    def phase(self, into: dict[str, Any], name: str) -> Iterator[None]:
        time.sleep(0.5)
        baseline = self.current
        self.peak = baseline
        started = time.perf_counter()
        yield
        time.sleep(0.3)
        into[name] = {
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(self.peak, 1),
            "added_mb": round(self.peak - baseline, 1), "seconds": round(time.perf_counter() - started, 2),
        }  # fmt: skip
        print(f"{name}: baseline {baseline:.0f} MB, peak {self.peak:.0f} MB (+{self.peak - baseline:.0f} MB)",
              flush=True)  # fmt: skip

    def stop(self) -> None:
        self._stop.set()


# --- the run ------------------------------------------------------------------------------------------------
class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.auth = url, {"Authorization": f"Bearer {token}"}
        self.statuses: Counter[int] = Counter()
        self.lock = threading.Lock()

    def record(self, status: int) -> int:
        with self.lock:
            self.statuses[status] += 1
        return status

    def search(self, data: bytes, headers: dict[str, str] | None = None, timeout: float = 600) -> int:
        try:
            r = httpx.post(self.url + "/v1/searches", files={"file": ("q.jpg", data, "image/jpeg")},
                           headers=self.auth if headers is None else headers, timeout=timeout)  # fmt: skip
        except httpx.HTTPError:
            return self.record(-1)  # the server hung up (counted apart from statuses)
        return self.record(r.status_code)

    def job(self, source: str, collection: str, wait_s: float) -> tuple[int, dict[str, Any] | None, float]:
        started = time.perf_counter()
        r = httpx.post(self.url + "/v1/ingest-jobs", json={"source": source, "collection": collection},
                       headers=self.auth, timeout=60)  # fmt: skip
        self.record(r.status_code)
        if r.status_code != 202:
            return r.status_code, r.json(), time.perf_counter() - started
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            g = httpx.get(self.url + r.json()["job_url"], headers=self.auth, timeout=30)
            self.record(g.status_code)
            if g.json()["status"] in ("done", "failed"):
                return 202, g.json(), time.perf_counter() - started
            time.sleep(0.2)
        return 202, None, time.perf_counter() - started


def concurrently(n: int, fn: Callable[[], int]) -> list[int]:
    out: list[int] = []
    threads = [threading.Thread(target=lambda: out.append(fn())) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def chunked_over_limit(client: Client, total: int) -> int:
    def body() -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n\r\n'
        for _ in range(total // 65536):
            yield b"\xff" * 65536
        yield b"\r\n--B--\r\n"

    try:
        r = httpx.post(client.url + "/v1/searches", content=body(), timeout=120,
                       headers=client.auth | {"Content-Type": "multipart/form-data; boundary=B"})  # fmt: skip
    except httpx.HTTPError:
        return client.record(-1)
    return client.record(r.status_code)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    files = build_files(work, args.large)
    roots = files["roots"]
    data_dir = work / "data"
    settings = Settings(data_dir=data_dir)
    _, token = keys_create("hostile", ["admin"], settings=settings)
    env = {"SLEUTH_DATA_DIR": str(data_dir), "SLEUTH_INGEST_ROOTS": json.dumps([str(roots)]),
           "SLEUTH_RATE_LIMIT": "100000/minute", "SLEUTH_AUTH_FAILURE_RATE": "100000/minute"}  # fmt: skip
    if args.clip_model:
        env["SLEUTH_CLIP_MODEL"] = args.clip_model
    out: dict[str, Any] = {"large_jpeg_bytes": len(files["large"][0]), "large_jpeg_side": 8900}
    serve = ("-m", "api", "serve", "--log-level", "warning")  # the `sleuth serve` command
    with live_server(env, log_path=work / "server.log", startup_timeout_s=180, command=serve) as server:
        rss = RssSampler(server.process.pid)
        client = Client(server.url, token)
        client.search(files["small"])  # warm: searcher and models loaded
        phases: dict[str, Any] = {}
        with rss.phase(phases, "one_79mpx_search"):
            out["one_status"] = client.search(files["large"][0])
        with rss.phase(phases, f"{args.concurrent}_concurrent_79mpx_searches"):
            out["concurrent_statuses"] = sorted(
                concurrently(args.concurrent, lambda: client.search(files["large"][1 % len(files["large"])]))
            )
        with rss.phase(phases, f"ingest_of_{args.large}_79mpx_files"):
            status, job, _ = client.job(str(roots / "large"), "large", wait_s=1800)
            out["ingest_job"] = {"status": status, "job": (job or {}).get("status"),
                                 "result": (job or {}).get("result")}  # fmt: skip
        hostile: dict[str, Any] = {}
        with rss.phase(phases, "hostile_requests"):
            big_body = b"\xff" * (19 * MB)
            hostile["no_key_19mb"] = sorted(concurrently(8, lambda: client.search(big_body, headers={})))
            wrong = {"Authorization": "Bearer slk_000000000000_" + "x" * 43}
            hostile["wrong_key_19mb"] = sorted(
                concurrently(8, lambda: client.search(big_body, headers=wrong))
            )
            hostile["chunked_30mb"] = [chunked_over_limit(client, 30 * MB) for _ in range(3)]
            hostile["png_text_bomb"] = [client.search(png_text_bomb()) for _ in range(2)]
            hostile["pixel_bomb"] = [client.search(pixel_bomb()) for _ in range(3)]
            hostile["truncated_jpeg"] = [client.search(files["large"][0][:200_000]) for _ in range(3)]
            hostile["shards_outside_roots"] = client.job(str(roots / "shards"), "x", wait_s=60)[:2]
            status, body, seconds = client.job(str(roots / "source.csv"), "x", wait_s=60)
            hostile["fifo_source"] = {"status": status, "answer": body, "seconds": round(seconds, 2)}
            status, job, seconds = client.job(str(roots / "fifo"), "fifo", wait_s=args.fifo_wait_s)
            hostile["fifo_in_folder_job"] = {
                "status": status, "job": (job or {}).get("status", "still running"), "seconds": round(seconds, 2),
                "failure_reasons": ((job or {}).get("result") or {}).get("failure_reasons"),
                "error": (job or {}).get("error"),
            }  # fmt: skip
        rss.stop()
        out["phases"], out["hostile"] = phases, hostile
        uploads = data_dir / "uploads"
        out["orphan_uploads"] = len(list(uploads.iterdir())) if uploads.exists() else 0
        out["status_counts"] = {str(k): v for k, v in sorted(client.statuses.items())}
        out["5xx"] = sum(v for k, v in client.statuses.items() if 500 <= k < 600)  # 503 busy included
        out["503_busy"] = client.statuses.get(503, 0)
        out["hung_up"] = client.statuses.get(-1, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sleuth-hostile"))
    parser.add_argument("--large", type=int, default=8, help="79 Mpx files in the ingest folder")
    parser.add_argument("--concurrent", type=int, default=8, help="79 Mpx searches at once")
    parser.add_argument("--clip-model", default=None)
    parser.add_argument("--fifo-wait-s", type=float, default=120.0, help="how long to wait for the FIFO job")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "hostile.json")
    args = parser.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "hostile"}, default=str))
    print(json.dumps(result["hostile"], default=str))
    print(f"5xx: {result['5xx']}  (503 busy: {result['503_busy']}, hung up: {result['hung_up']})")


if __name__ == "__main__":
    main()
