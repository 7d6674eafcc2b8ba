"""The HTTP front end (:mod:`branchynet.serving.http`) and ``branchynet serve``.

The app is tested in process through FastAPI's TestClient (no socket): answers against
the paper's rule for every body form, every error path, the API key, the metrics. One
test starts ``branchynet serve`` as a real process on a loopback port, with concurrent
clients, a body refused from its Content-Length alone, and SIGTERM while requests wait.

With BRANCHYNET_REQUIRE_SERVE=1 (CI installs the [serve] extra) a missing fastapi,
uvicorn, prometheus-client or httpx fails these tests instead of skipping them.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from http_helpers import ServeProcess, assert_answers, lenet_case, require

ENV = "BRANCHYNET_REQUIRE_SERVE"
for _m in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    require(_m, ENV)

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from branchynet import testing  # noqa: E402
from branchynet.serving import ExitServer  # noqa: E402
from branchynet.serving.http import create_app  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "lenet.pt"
    model, x, want = lenet_case(path)
    return {"path": path, "model": model, "x": x, "want": want}


@pytest.fixture(scope="module")
def client(case):
    """The app in front of a B-LeNet ExitServer, a body limit of 2 MiB (the 48 samples
    are 0.7 MB of JSON)."""
    server = ExitServer(case["model"], max_batch_size=16, max_wait_ms=1.0)
    with TestClient(create_app(server, (1, 28, 28), max_body_mb=2)) as c:
        c.exit_server = server
        yield c
    server.close()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def metric(text: str, name: str, **labels) -> float:
    """One sample's value in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == str(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- answers ----------------------------------------------------------------------------


def test_json_answers_are_the_rule_in_input_order(client, case):
    r = client.post("/v1/predict", json={"inputs": case["x"].tolist()})
    assert r.status_code == 200, r.text
    assert_answers(r.json()["outputs"], case["want"])
    r = client.post("/v1/predict", json={"inputs": case["x"][:5].tolist(), "return_logits": True})
    assert_answers(r.json()["outputs"], case["want"][:5], logits=True)


@pytest.mark.parametrize("form", ["npy32", "npy64", "raw"])
def test_binary_bodies(client, case, form):
    x = case["x"][:20].numpy()
    if form == "raw":
        r = client.post("/v1/predict?return_logits=true", content=x.astype("<f4").tobytes(),
                        headers={"content-type": "application/octet-stream", "x-shape": "20,1,28,28"})
    else:
        body = npy(x.astype(np.float64) if form == "npy64" else x)
        r = client.post("/v1/predict?return_logits=true", content=body,
                        headers={"content-type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert_answers(r.json()["outputs"], case["want"][:20], logits=True)


def test_concurrent_requests_are_batched_and_all_answered(client, case):
    """Eight clients at once, each a slice of the samples: every sample its own answer."""
    x, want = case["x"], case["want"]
    before = client.exit_server.stats()["stage_runs"][0]

    def one(i):
        return client.post("/v1/predict", json={"inputs": x[i::8].tolist()}).json()["outputs"]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    for i, out in enumerate(outs):
        assert_answers(out, want[i::8])
    # 48 samples in fewer stage-1 runs than samples: batched across requests and clients
    assert client.exit_server.stats()["stage_runs"][0] - before < x.shape[0]


# --- refused requests ---------------------------------------------------------------------


BAD = {
    "malformed json": (b'{"inputs": [1, 2', "application/json", 400, "not valid JSON"),
    "not an object": (b"[1, 2]", "application/json", 422, '{"inputs"'),
    "no inputs": (b'{"x": []}', "application/json", 422, '{"inputs"'),
    "empty": (b'{"inputs": []}', "application/json", 422, "N >= 1 samples of shape [1, 28, 28]"),
    "wrong shape": (json.dumps({"inputs": [[[0.0] * 27] * 28]}).encode(), "application/json", 422,
                    "got an array of shape [1, 28, 27]"),
    "no batch dim": (json.dumps({"inputs": [[0.0] * 28] * 28}).encode(), "application/json", 422,
                     "shape [1, 28, 28]"),
    "ragged": (b'{"inputs": [[1, 2], [3]]}', "application/json", 422, "ragged"),
    "strings": (b'{"inputs": [["1.5", "2"]]}', "application/json", 422, "numbers only"),
    "booleans": (b'{"inputs": [[true, false]]}', "application/json", 422, "numbers only"),
    "null": (b'{"inputs": [[null, 1]]}', "application/json", 422, "numbers only"),
    "bad return_logits": (b'{"inputs": [], "return_logits": "yes"}', "application/json", 422, "return_logits"),
    "text body": (b"hello", "text/plain", 415, "Content-Type must be"),
    "not npy": (b"\x93NUMPY garbage", "application/x-npy", 400, "not a .npy file"),
    "raw without shape": (b"\0" * 16, "application/octet-stream", 400, "X-Shape"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_requests_get_a_json_message_and_the_server_goes_on(client, case, name):
    body, ctype, code, message = BAD[name]
    r = client.post("/v1/predict", content=body, headers={"content-type": ctype})
    assert r.status_code == code, r.text
    assert message in r.json()["detail"]
    ok = client.post("/v1/predict", json={"inputs": case["x"][:2].tolist()})
    assert ok.status_code == 200
    assert_answers(ok.json()["outputs"], case["want"][:2])


def test_bad_binary_bodies(client, case):
    x = case["x"][:2].numpy()
    nan = x.copy()
    nan[1, 0, 3, 3] = np.nan
    cases = [
        (npy(nan), {"content-type": "application/x-npy"}, 422, "sample 1 holds NaN"),
        (npy(np.full((1, 1, 28, 28), np.inf, np.float32)), {"content-type": "application/x-npy"}, 422, "finite"),
        (npy(x.astype(np.int32)), {"content-type": "application/x-npy"}, 422, "floating-point"),
        (npy(np.array([{"a": 1}], dtype=object)), {"content-type": "application/x-npy"}, 422, "pickle"),
        (npy(x)[:-100], {"content-type": "application/x-npy"}, 400, "not a .npy file"),
        (npy(x[0]), {"content-type": "application/x-npy"}, 422, "got an array of shape [1, 28, 28]"),
        (x.tobytes(), {"content-type": "application/octet-stream", "x-shape": "2,1,28,29"}, 422, "bytes of float32"),
        (x.tobytes(), {"content-type": "application/octet-stream", "x-shape": "2,a"}, 400, "X-Shape"),
    ]
    for body, headers, code, message in cases:
        r = client.post("/v1/predict", content=body, headers=headers)
        assert r.status_code == code, (message, r.text)
        assert message in r.json()["detail"], r.text
    r = client.post("/v1/predict", content=b'{"inputs": [[[NaN]]]}', headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_body_over_the_limit_is_413(client):
    limit = 2 * 2**20
    r = client.post("/v1/predict", content=b"\0" * (limit + 1),
                    headers={"content-type": "application/octet-stream", "x-shape": "1"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: refused while it streams in
        for _ in range(20):
            yield b"\0" * 2**17

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413


class Gate(nn.Module):
    """Holds a stage run until opened (an event, not a sleep)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.is_open, self.entered = inner, threading.Event(), threading.Event()

    def forward(self, h):
        self.entered.set()
        assert self.is_open.wait(30), "the test never opened the gate"
        return self.inner(h)


def test_overload_is_503_with_retry_after_then_serving_resumes():
    base = testing.random_mlp(0, num_exits=2, width=6, classes=3)
    gate = Gate(base.stages[0])
    model = testing.random_mlp(0, num_exits=2, width=6, classes=3, stages=[gate, None])
    server = ExitServer(model, max_batch_size=1, max_wait_ms=0.0, max_queued=2)
    try:
        c = TestClient(create_app(server, (6,), retry_after_s=3))
        held = server.submit(torch.randn(6))  # runs, and waits at the gate
        assert gate.entered.wait(10)
        queued = [server.submit(torch.randn(6)) for _ in range(2)]  # max_queued rows wait
        r = c.post("/v1/predict", json={"inputs": [[0.0] * 6]})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert "overloaded" in r.json()["detail"]
        assert server.stats()["overloaded"] == 1
        gate.is_open.set()
        for f in [held, *queued]:
            f.result(timeout=10)
        r = c.post("/v1/predict", json={"inputs": [[0.1] * 6, [0.2] * 6]})
        assert r.status_code == 200 and len(r.json()["outputs"]) == 2
        text = c.get("/metrics").text
        assert metric(text, "branchynet_overloaded_total") == 1
        assert metric(text, "branchynet_http_requests_total", path="/v1/predict", code=503) == 1
    finally:
        gate.is_open.set()
        server.close()
    assert c.get("/health").status_code == 503  # closed: no longer healthy
    r = c.post("/v1/predict", json={"inputs": [[0.0] * 6]})
    assert r.status_code == 503 and "closing" in r.json()["detail"]



def test_a_failing_stage_is_500_and_the_server_goes_on():
    base = testing.random_mlp(0, num_exits=2, width=6, classes=3)
    model = testing.random_mlp(0, num_exits=2, width=6, classes=3, stages=[testing.FaultyStage(base.stages[0]), None])
    server = ExitServer(model, max_batch_size=8, max_wait_ms=0.0)
    try:
        c = TestClient(create_app(server, (6,)))
        r = c.post("/v1/predict", json={"inputs": [[2e5] + [0.0] * 5]})
        assert r.status_code == 500 and "a marked sample reached the faulty stage" in r.json()["detail"]
        r = c.post("/v1/predict", json={"inputs": [[0.5] * 6]})
        assert r.status_code == 200 and len(r.json()["outputs"]) == 1
    finally:
        server.close()


def test_api_key(case):
    server = ExitServer(case["model"], max_batch_size=8, max_wait_ms=0.5)
    try:
        c = TestClient(create_app(server, (1, 28, 28), api_key=KEY))
        body = {"inputs": case["x"][:3].tolist()}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            r = c.post("/v1/predict", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["detail"]
        assert c.get("/metrics").status_code == 401
        r = c.post("/v1/predict", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert_answers(r.json()["outputs"], case["want"][:3])
        assert c.get("/health").status_code == 200  # probes need no key
        assert c.get("/metrics", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        server.close()


# --- health, metrics, docs ----------------------------------------------------------------


def test_metrics_count_what_was_served(case):
    server = ExitServer(case["model"], max_batch_size=16, max_wait_ms=0.5)
    try:
        c = TestClient(create_app(server, (1, 28, 28)))
        x, want = case["x"], case["want"]
        for i in range(0, 48, 12):
            assert c.post("/v1/predict", json={"inputs": x[i:i + 12].tolist()}).status_code == 200
        assert c.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        text = c.get("/metrics").text
        per_exit = [sum(w.exit == e for w in want) for e in (0, 1)]
        for e in (0, 1):
            assert metric(text, "branchynet_answers_total", exit=e) == per_exit[e]
            assert metric(text, "branchynet_answer_latency_seconds_count", exit=e) == per_exit[e]
        assert metric(text, "branchynet_samples_total") == 48
        assert metric(text, "branchynet_stage_rows_total", stage=0) == 48
        assert metric(text, "branchynet_stage_rows_total", stage=1) == per_exit[1]
        assert metric(text, "branchynet_stage_runs_total", stage=0) >= 4
        assert metric(text, "branchynet_queue_depth", stage=0) == 0
        assert metric(text, "branchynet_request_latency_seconds_count") == 4
        assert metric(text, "branchynet_http_requests_total", path="/v1/predict", code=200) == 4
        assert metric(text, "branchynet_http_requests_total", path="/v1/predict", code=400) == 1
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
        assert names and all(n.startswith("branchynet_") for n in names)
    finally:
        server.close()


def test_health_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-npy", "application/octet-stream"} <= set(body)
    assert client.get("/docs").status_code == 200


def test_create_app_checks_its_arguments(case):
    server = ExitServer(case["model"])
    try:
        with pytest.raises(ValueError, match="max_body_mb"):
            create_app(server, (1, 28, 28), max_body_mb=0)
        with pytest.raises(ValueError, match="input_shape"):
            create_app(server, None)
    finally:
        server.close()


def test_serve_command_errors(tmp_path, capsys):
    from branchynet.cli import main

    assert main(["serve", str(tmp_path / "nope.pt"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--ray needs a fixed --port"):
        main(["serve", str(tmp_path / "nope.pt"), "--ray", "--port", "0"])
    with pytest.raises(SystemExit):  # argparse: a negative size
        main(["serve", "m.pt", "--max-body-mb", "-1"])
    assert "--max-body-mb" in capsys.readouterr().err


def test_serve_patience_flag_reaches_the_exit_server(case, monkeypatch, capsys):
    from branchynet.cli import main
    from branchynet.serving import server as server_module

    made = {}

    class Stop(Exception):
        pass

    def fake(model, **kwargs):
        made.update(kwargs)
        raise Stop

    monkeypatch.setattr(server_module, "ExitServer", fake)
    with pytest.raises(Stop):
        main(["serve", str(case["path"]), "--port", "0", "--patience", "2"])
    assert made["criterion"] == "patience" and made["patience"] == 2
    with pytest.raises(SystemExit):  # argparse: P >= 1
        main(["serve", str(case["path"]), "--patience", "0"])
    assert "--patience" in capsys.readouterr().err


# --- the real process ---------------------------------------------------------------------


def _refused_from_headers_alone(url: str) -> bytes:
    """A request announcing 1 GB that sends none of it: the answer must come anyway."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"X-Shape: 1\r\nContent-Length: 1000000000\r\n\r\n")
        return s.recv(4096)


def test_branchynet_serve_process_answers_and_drains_on_sigterm(case, tmp_path):
    """A real server: concurrent clients get the rule's answers; a body over the limit is
    refused before it is sent; SIGTERM while samples wait in stage 1's queue (a 3 s
    batching wait) answers every one of them, then the process exits 0."""
    srv = ServeProcess([str(case["path"]), "--port", "0", "--max-batch-size", "1024", "--max-wait-ms", "3000",
                        "--max-body-mb", "1"], tmp_path / "serve.log")
    try:
        srv.wait_healthy(httpx)
        assert _refused_from_headers_alone(srv.url).startswith(b"HTTP/1.1 413")
        x, want = case["x"], case["want"]
        with httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(c.post, "/v1/predict", json={"inputs": x[i::6].tolist()}) for i in range(6)]
            deadline = time.monotonic() + 30
            while metric(c.get("/metrics").text, "branchynet_queue_depth", stage=0) < x.shape[0]:
                assert time.monotonic() < deadline, "the samples never all reached the queue"
                time.sleep(0.05)
            assert not any(f.done() for f in futures)  # all wait for the batching deadline
            code = srv.stop()
            answers = [f.result(timeout=60) for f in futures]
        assert code == 0, srv.output()
        for i, r in enumerate(answers):
            assert r.status_code == 200, r.text
            assert_answers(r.json()["outputs"], want[i::6])
        assert "branchynet serve: stopped" in srv.output()
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        srv.kill()
