"""``branchynet serve --ray``: Ray Serve replicas, each its own ExitServer, behind the same
HTTP API (:mod:`branchynet.serving.ray`).

One test, one local Ray instance (it takes ~20 s to start on 2 cores): the CLI as a real
process with 2 replicas; concurrent clients get the rule's answers, the error paths hold,
each replica's metrics count what it served, and SIGTERM leaves exit status 0 and no Ray
process behind (every process of the instance names its own temporary folder).

Skipped without ray; with BRANCHYNET_REQUIRE_RAY=1 a missing ray fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from http_helpers import ServeProcess, assert_answers, free_port, lenet_case, require

require("ray", "BRANCHYNET_REQUIRE_RAY")
for _m in ("fastapi", "prometheus_client", "httpx"):
    require(_m, "BRANCHYNET_REQUIRE_RAY")
import httpx  # noqa: E402


def _processes_naming(text: str) -> list:
    """(pid, command line) of every live process whose command line contains ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(pid), cmd[:160]))
    return found


def _replica_counts(url: str, tries: int = 40) -> dict:
    """Per replica, its samples answered (``/metrics`` reaches one replica per call)."""
    seen = {}
    for _ in range(tries):
        text = httpx.get(url + "/metrics", timeout=10).text
        per = {}
        for m in re.finditer(r'^branchynet_answers_total\{exit="\d+",replica="([^"]+)"\} (\S+)$', text, re.M):
            per[m.group(1)] = per.get(m.group(1), 0.0) + float(m.group(2))
        seen.update(per)
        if len(seen) == 2:
            break
    return seen


@pytest.mark.skipif(not os.path.exists("/proc"), reason="counts processes through /proc")
def test_ray_serve_two_replicas(tmp_path):
    ckpt = tmp_path / "lenet.pt"
    _, x, want = lenet_case(ckpt)
    # A short folder of its own: Ray's socket paths must stay under 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="bnray", dir="/tmp")
    port = free_port()
    srv = ServeProcess([str(ckpt), "--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--port", str(port),
                        "--max-body-mb", "1", "--max-wait-ms", "5"],
                       tmp_path / "serve.log", env={"RAY_TMPDIR": ray_tmp}, timeout=180)
    try:
        srv.wait_healthy(httpx, timeout=180)
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: c.post("/v1/predict", json={"inputs": x[i::8].tolist()}), range(8)))
            for i, r in enumerate(outs):
                assert r.status_code == 200, r.text
                assert_answers(r.json()["outputs"], want[i::8])
            r = c.post("/v1/predict", content=b"{", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
            r = c.post("/v1/predict", json={"inputs": [[0.0]]})
            assert r.status_code == 422 and "shape [1, 28, 28]" in r.json()["detail"]
            r = c.post("/v1/predict", content=b"\0" * (2**20 + 4),
                       headers={"content-type": "application/octet-stream", "x-shape": "1"})
            assert r.status_code == 413
        counts = _replica_counts(srv.url)
        assert len(counts) == 2, f"metrics of {len(counts)} replicas seen: {counts}"
        assert sum(counts.values()) == x.shape[0]
        assert _processes_naming(ray_tmp), "the Ray processes should name their folder"

        code = srv.stop(timeout=120)
        assert code == 0, srv.output()[-3000:]
        assert "branchynet serve: stopped" in srv.output()
        deadline = time.monotonic() + 30
        while _processes_naming(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _processes_naming(ray_tmp), f"left behind: {_processes_naming(ray_tmp)}"
    finally:
        srv.kill()
        for pid, _ in _processes_naming(ray_tmp):  # only this test's Ray processes
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
