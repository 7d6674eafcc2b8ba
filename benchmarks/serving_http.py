"""Load test of ``branchynet serve`` over HTTP against the same ExitServer in process.

Targets (B-LeNet, randomly initialised, thresholds realising the paper's exit profile, as
in ``serving_load.py``; every server with the same ``max_batch_size`` / ``max_wait_ms``
and one torch thread):

- ``embedded``: an :class:`~branchynet.serving.ExitServer` in this process, requests
  awaited through ``server.predict`` from the same asyncio client loop as the others, so
  the difference to ``http`` is the HTTP path alone;
- ``http-json`` / ``http-npy``: ``branchynet serve`` as a child process on loopback, one
  sample a request, the body JSON (15 KB) or ``.npy`` (3 KB);
- ``ray-1`` / ``ray-2`` (``--ray``): ``branchynet serve --ray --replicas N`` (npy bodies).

Loads, each bounded in requests and seconds:

- closed loop at a few concurrency levels: C clients each sending its next request when
  the last is answered; requests/s, p50 / p99 latency;
- open loop (Poisson arrivals): a seeded Poisson process at fixed rates; the latency runs
  from each request's scheduled arrival, so a client falling behind cannot hide queueing;
  requests not answered ``max_seconds`` after the last arrival count as unanswered.

Throughput is also given per third of each run (median, min, max): the spread within the
run. The client is one asyncio process (aiohttp: ``pip install aiohttp``) on the same 2
cores as the server: its CPU seconds per request are recorded beside the numbers.

    OMP_NUM_THREADS=1 python benchmarks/serving_http.py --out benchmarks/results/cpu-xeon-2core/serving_http
    python benchmarks/serving_http.py --quick               # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import serving_load as S  # noqa: E402
from branchynet.checkpoint import save_checkpoint  # noqa: E402
from branchynet.serving import ExitServer  # noqa: E402

CONCURRENCY = (1, 8, 32, 128)
RATES = (100.0, 300.0, 600.0)  # requests/s, open loop: the same for every target


# --- what a request is, per target -----------------------------------------------------------

class Embedded:
    """``await server.predict(sample)`` in this process."""

    def __init__(self, server: ExitServer, pool: torch.Tensor):
        self.server, self.pool = server, pool

    async def send(self, i: int) -> int:
        return (await self.server.predict(self.pool[i % len(self.pool)])).exit


class Http:
    """``POST /v1/predict`` with one sample, the body prepared before the run (aiohttp:
    ~0.3 ms of client CPU a request here, against 1.5-3.4 ms for httpx's AsyncClient,
    which made the client the bottleneck on 2 shared cores)."""

    def __init__(self, url: str, pool: torch.Tensor, form: str):
        self.session, self.url = None, url + "/v1/predict"
        self.bodies = [_body(x, form) for x in pool]
        self.headers = {"content-type": "application/json" if form == "json" else "application/x-npy"}

    async def fresh(self) -> None:
        """A new session (new connections) for the next point: the connections of
        requests a saturated point gave up on are reset by the server."""
        import aiohttp

        await self.close()
        # As many connections as requests in flight (open loop: each waits for its own).
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=120))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, i: int) -> int:
        async with self.session.post(self.url, data=self.bodies[i % len(self.bodies)], headers=self.headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            return (await r.json())["outputs"][0]["exit"]

    async def server_time(self):
        """(seconds, calls) of /v1/predict handling so far, as the server counts them
        (``branchynet_request_latency_seconds``; with Ray, one replica's)."""
        async with self.session.get(self.url.replace("/v1/predict", "/metrics")) as r:
            text = await r.text()
        got = {}
        for line in text.splitlines():
            for k in ("sum", "count"):
                if line.startswith(f"branchynet_request_latency_seconds_{k}"):
                    got[k] = got.get(k, 0.0) + float(line.rsplit(" ", 1)[1])
        return got.get("sum", 0.0), got.get("count", 0.0)


def _body(x: torch.Tensor, form: str) -> bytes:
    if form == "json":
        return json.dumps({"inputs": [x.tolist()]}).encode()
    buf = io.BytesIO()
    np.save(buf, x.numpy()[None])
    return buf.getvalue()


# --- loads -----------------------------------------------------------------------------------

def _point(lat: list, done_at: list, t0: float, t_end: float, errors: list, cpu_s: float, **what) -> dict:
    """One load point's figures; ``errors``: the failed requests' messages (the first
    three kept)."""
    lat_ms = np.asarray(lat) * 1e3
    span = max(t_end - t0, 1e-9)
    thirds = [sum(t0 + k * span / 3 <= t < t0 + (k + 1) * span / 3 for t in done_at) / (span / 3)
              for k in range(3)]
    n = len(lat)
    return {**what, "answered": n, "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "seconds": span, "rps": n / span,
            "rps_thirds": {"median": statistics.median(thirds), "min": min(thirds), "max": max(thirds)},
            "mean_ms": float(lat_ms.mean()) if n else None,
            "p50_ms": float(np.percentile(lat_ms, 50)) if n else None,
            "p99_ms": float(np.percentile(lat_ms, 99)) if n else None,
            "client_cpu_us_per_request": 1e6 * cpu_s / max(n + len(errors), 1)}


async def closed_loop(target, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """C clients, each sending its next request when its last is answered."""
    lat, done_at, errors, counter = [], [], [], iter(range(max_requests))
    t0, cpu0 = time.perf_counter(), time.process_time()
    stop = t0 + max_seconds

    async def client():
        for i in counter:
            if time.perf_counter() > stop:
                return
            s = time.perf_counter()
            try:
                await target.send(i)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            e = time.perf_counter()
            lat.append(e - s)
            done_at.append(e)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return _point(lat, done_at, t0, time.perf_counter(), errors, time.process_time() - cpu0,
                  load="closed", concurrency=concurrency)


async def open_loop(target, rate: float, max_requests: int, max_seconds: float, seed: int) -> dict:
    """Poisson arrivals at ``rate``; latency from each scheduled arrival."""
    arrivals = S.poisson_arrivals(rate, max_requests, max_seconds, seed)
    lat, done_at, errors = [], [], []
    t0, cpu0 = time.perf_counter(), time.process_time()

    async def one(i, due):
        try:
            await target.send(i)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
            return
        e = time.perf_counter()
        lat.append(e - due)
        done_at.append(e)

    tasks = []
    for i, a in enumerate(arrivals):
        due = t0 + float(a)
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(one(i, due)))
    # Bounded: past the rate a target sustains, the backlog would take minutes to drain.
    _, late = await asyncio.wait(tasks, timeout=max_seconds)
    for t in late:
        t.cancel()
    return _point(lat, done_at, t0, time.perf_counter(), errors, time.process_time() - cpu0,
                  load="open", rate=rate, offered=len(arrivals), unanswered=len(late))


async def run_loads(target, args, name: str) -> list:
    """Every closed-loop and open-loop point on one target. Over plain HTTP, each point
    also gets the server's own mean handling time per request (``server_ms``: body read
    to answer, from its metrics), which leaves client and transport to the rest."""
    server_time = getattr(target, "server_time", None) if name.startswith("http") else None
    loads = [lambda c=c: closed_loop(target, c, args.max_requests, args.max_seconds) for c in args.concurrency]
    loads += [lambda r=r: open_loop(target, r, args.max_requests, args.max_seconds, args.seed) for r in args.rates]
    await closed_loop(target, 8, 200, 2.0)  # warm-up: connections, first runs
    points = []
    for load in loads:
        await _settle(target)
        before = await server_time() if server_time else None
        p = {"target": name, **await load()}
        if server_time:
            (s0, n0), (s1, n1) = before, await server_time()
            p["server_ms"] = 1e3 * (s1 - s0) / max(n1 - n0, 1)
        points.append(p)
        _say(p)
    return points


async def _settle(target, limit_s: float = 60.0) -> None:
    """Until one request is answered within 50 ms: the backlog a saturated point left
    (requests its client gave up on, still served) must not weigh on the next point."""
    if hasattr(target, "fresh"):
        await target.fresh()
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        with contextlib.suppress(Exception):
            await target.send(0)
            if time.perf_counter() - t < 0.05:
                return
        await asyncio.sleep(0.2)


def _say(p: dict) -> None:
    what = f"C={p['concurrency']}" if p["load"] == "closed" else f"{p['rate']:.0f}/s"
    print(f"  {p['target']:10s} {what:>8s}: {p['rps']:7.0f} req/s  p50 {p['p50_ms']:7.2f} ms  "
          f"p99 {p['p99_ms']:7.2f} ms  errors {p['errors']}  unanswered {p.get('unanswered', 0)}", flush=True)


# --- servers ---------------------------------------------------------------------------------

class ServeProcess:
    """``branchynet serve`` as a child process; ``url`` once it printed its address."""

    def __init__(self, args: list, log: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "branchynet", "serve", *args], cwd=HERE.parent,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("branchynet serve:") and " on http://" in line:
                    self.url = line.split(" on ")[1].split()[0]
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("branchynet serve did not start:\n" + log.read_text(errors="replace")[-3000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


async def _http_points(url: str, pool, names: dict, args) -> list:
    """The loads over HTTP, for each body form in ``names`` (form -> the target's name)."""
    points = []
    for form, name in names.items():
        target = Http(url, pool, form)
        try:
            await target.fresh()
            deadline = time.monotonic() + 120
            while True:  # Ray: the replicas may still be starting
                with contextlib.suppress(Exception):
                    async with target.session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "the server never became healthy"
                await asyncio.sleep(0.5)
            points += await run_loads(target, args, name)
        finally:
            await target.close()
    return points


def measure(args, tmp: Path) -> dict:
    case = S.paper_case("b_lenet")
    model, pool = case["model"], case["pool"][: args.pool]
    model.exit_config.thresholds = list(case["thresholds"])
    ckpt = tmp / "b_lenet.pt"
    save_checkpoint(ckpt, model)
    common = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
              "--max-queued", str(args.max_queued)]
    points = []
    print("embedded", flush=True)
    server = ExitServer(model, case["thresholds"], max_batch_size=args.max_batch_size,
                        max_wait_ms=args.max_wait_ms, max_queued=args.max_queued)
    try:
        points += asyncio.run(run_loads(Embedded(server, pool), args, "embedded"))
    finally:
        server.close()
    print("http", flush=True)
    srv = ServeProcess([str(ckpt), "--port", "0", "--threads", "1", *common], tmp / "http.log")
    try:
        points += asyncio.run(_http_points(srv.url, pool, {"json": "http-json", "npy": "http-npy"}, args))
    finally:
        code = srv.stop()
    assert code == 0, f"branchynet serve exited with {code}"
    for n in args.ray_replicas:
        print(f"ray, {n} replicas", flush=True)
        port = _free_port()
        srv = ServeProcess([str(ckpt), "--ray", "--replicas", str(n), "--cpus-per-replica", "0.5", "--port",
                            str(port), "--threads", "1", *common], tmp / f"ray{n}.log")
        try:
            points += asyncio.run(_http_points(srv.url, pool, {"npy": f"ray-{n}"}, args))
        finally:
            srv.stop()
    return {"thresholds": case["thresholds"], "exit_profile_target": case["target"],
            "exit_profile_realised": case["realised"], "points": points}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- report ----------------------------------------------------------------------------------

def http_cost(points: list) -> dict:
    """What HTTP adds per request at concurrency 1 (one request in flight: the same
    batching waits on both sides), in mean ms over the embedded server's mean: in all
    (``total``), in the HTTP server (``server``: its handling time minus the embedded
    latency) and in the client and the loopback transport (``client_transport``)."""
    c1 = {p["target"]: p for p in points if p["load"] == "closed" and p["concurrency"] == 1}
    if "embedded" not in c1:
        return {}
    e = c1["embedded"]["mean_ms"]
    out = {}
    for t, p in c1.items():
        if t == "embedded":
            continue
        out[t] = {"total": round(p["mean_ms"] - e, 3)}
        if "server_ms" in p:
            out[t].update(server=round(p["server_ms"] - e, 3), client_transport=round(p["mean_ms"] - p["server_ms"], 3))
    return out


def report(res: dict) -> str:
    env = res["environment"]
    rows = []
    for p in res["points"]:
        what = f"C = {p['concurrency']}" if p["load"] == "closed" else f"Poisson {p['rate']:.0f}/s"
        t = p["rps_thirds"]
        server = f"{p['server_ms']:.2f}" if "server_ms" in p else "-"
        rows.append(f"| {p['target']} | {what} | {p['rps']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
                    f"{p['mean_ms']:.2f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {server} | "
                    f"{p['errors']} / {p.get('unanswered', 0)} | "
                    f"{p['client_cpu_us_per_request']:.0f} |")
    cost = "; ".join(f"{k} +{v['total']:.2f} ms" + (f" (server +{v['server']:.2f}, client and transport "
                                                      f"+{v['client_transport']:.2f})" if "server" in v else "")
                     for k, v in res["http_cost_ms"].items())
    return "\n".join([
        "# `branchynet serve` under load: HTTP against the in-process ExitServer",
        "",
        f"- Command: `{env['command']}`",
        f"- Commit: {env['commit']}{' (dirty tree)' if env['dirty'] else ''}",
        f"- Machine: {env['platform']}, `{env['cpu']}`, {env['cpu_count']} CPUs (shared), torch {env['torch']}, "
        f"1 torch thread per server; load average before {env['loadavg']}, after {env['loadavg_after']} "
        "(other work on the machine: the numbers are noisy)",
        f"- B-LeNet (random init), thresholds realising the paper's exit profile "
        f"{res['exit_profile_realised']}; max_batch_size {res['settings']['max_batch_size']}, "
        f"max_wait_ms {res['settings']['max_wait_ms']}; one sample per request.",
        "- One run. req/s: the whole run (min-max over its thirds); latency client-side (open loop: from the "
        "scheduled arrival); server mean: the HTTP server's own handling time per request (its metrics: body "
        "read to answer, the ExitServer's wait included); client CPU: the load generator's own CPU time per "
        "request (it shares the 2 cores).",
        "",
        "| target | load | req/s (spread) | mean ms | p50 ms | p99 ms | server mean ms | errors / unanswered "
        "| client CPU us/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"HTTP cost per request (mean latency at C = 1 minus the embedded server's): {cost}.",
        "",
    ])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for serving_http.json and report.md")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few requests, no Ray")
    ap.add_argument("--ray", action="store_true", help="also Ray Serve with 1 and 2 replicas")
    ap.add_argument("--concurrency", type=lambda s: [int(t) for t in s.split(",")], default=list(CONCURRENCY))
    ap.add_argument("--rates", type=lambda s: [float(t) for t in s.split(",")], default=list(RATES))
    ap.add_argument("--max-requests", type=int, default=4000, help="per point")
    ap.add_argument("--max-seconds", type=float, default=4.0, help="per point")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--max-queued", type=int, default=100_000)
    ap.add_argument("--pool", type=int, default=1024, help="distinct samples cycled through")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.ray_replicas = [1, 2] if args.ray else []
    if args.quick:
        args.concurrency, args.rates, args.max_requests, args.max_seconds, args.pool = [1, 8], [100.0], 100, 1.0, 64
    torch.set_num_threads(1)
    env = S.environment(argv)  # before the run: the commit measured, the load it started under
    env["command"] = " ".join(["OMP_NUM_THREADS=1 python", "benchmarks/serving_http.py", *argv])
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(args, Path(tmp))
    env["loadavg_after"] = S._loadavg()
    res.update(environment=env, http_cost_ms=http_cost(res["points"]),
               settings={"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                         "max_requests": args.max_requests, "max_seconds": args.max_seconds})
    text = report(res)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving_http.json").write_text(json.dumps(res, indent=1))
        (args.out / "report.md").write_text(text)


if __name__ == "__main__":
    main()
