"""Shared by the HTTP and Ray Serve tests: a B-LeNet checkpoint whose thresholds send the
test samples out of both exits, the answers the paper's rule gives them, and
``branchynet serve`` started as a real process and stopped with SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from branchynet.checkpoint import save_checkpoint
from branchynet.models import b_lenet
from branchynet.testing import per_sample_rule, split_thresholds

REPO = Path(__file__).resolve().parents[1]
WAIT = 60.0  # seconds a server may take to start or stop before the test calls it stuck


def require(module: str, env: str):
    """``module``, or skip; with ``env`` set (CI, which installs it) a missing module fails."""
    if os.environ.get(env, "") not in ("", "0"):
        return __import__(module)  # an ImportError fails the test: CI promised it
    return pytest.importorskip(module)


def lenet_case(path: Path, n: int = 48, seed: int = 0):
    """(model, samples [n, 1, 28, 28] float32, the rule's answers) with the checkpoint
    written to ``path``. The thresholds sit in a gap of these samples' entropies, so no
    answer can flip between a batched and a one-sample run."""
    torch.manual_seed(seed)
    model = b_lenet(num_classes=10).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 28, 28, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 3 + 0.05)
    with torch.no_grad():
        ts = split_thresholds(model, x)
        want = per_sample_rule(model, x, ts)
    model.exit_config.thresholds = ts
    save_checkpoint(path, model)
    assert {w.exit for w in want} == {0, 1}, "the samples should leave at both exits"
    return model, x, want


def assert_answers(outputs: list, want: list, logits: bool = False) -> None:
    """The HTTP answers are the rule's, sample by sample, in input order."""
    assert len(outputs) == len(want)
    for i, (o, w) in enumerate(zip(outputs, want)):
        assert (o["exit"], o["pred"]) == (w.exit, w.pred), f"sample {i}: {o} against exit {w.exit} pred {w.pred}"
        assert math.isclose(o["score"], w.entropy, rel_tol=1e-4, abs_tol=1e-5), f"sample {i}"
        assert ("logits" in o) == logits
        if logits:
            torch.testing.assert_close(torch.tensor(o["logits"]), w.logits.float(), rtol=1e-4, atol=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``branchynet serve ARGS`` as a child process (its own session, so nothing it
    starts outlives the test unnoticed); ``url`` once it answers /health."""

    def __init__(self, args: list, log: Path, env: dict | None = None, timeout: float = WAIT):
        path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **(env or {}))
        # Output to a file, not a pipe: a chatty child (Ray) must never block on a full pipe.
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "branchynet", "serve", *args],
                                         cwd=REPO, env=e, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = self._url_from_output(timeout)

    def _url_from_output(self, timeout: float) -> str:
        """The address in the line printed once the server is up (and its signal
        handlers are in place)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.output().splitlines():
                if line.startswith("branchynet serve:") and " on http://" in line:
                    return line.split(" on ")[1].split()[0]
            time.sleep(0.1)
        self.kill()
        pytest.fail("branchynet serve printed no address:\n" + self.output())

    def wait_healthy(self, httpx, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"branchynet serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"branchynet serve not healthy within {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM, then the exit status (the test fails if it does not exit in time)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"branchynet serve did not exit within {timeout} s of SIGTERM:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
