"""``branchynet serve CHECKPOINT``: the HTTP server (uvicorn, one process), or Ray Serve
replicas (``--ray``). Registered in :mod:`branchynet.cli` by :func:`add_parser`.

SIGTERM or Ctrl-C: the listening socket closes, requests already received are answered
(their samples drain through the ExitServer), and the process exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading

import torch

#: Where ``--api-key`` is read from when not given (a key on the command line shows in ps).
API_KEY_ENV = "BRANCHYNET_API_KEY"


def _number(low: float, strict: bool):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not (v > low if strict else v >= low) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {low:g}, "
                                             f"got {text!r}")
        return v
    return parse


def add_parser(sub) -> None:
    """``branchynet serve`` on the CLI's subparsers."""
    from ..cli import _nonneg_int, _positive_int

    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (FastAPI; --ray: Ray Serve replicas)",
                       description="Serve a checkpoint over HTTP: POST /v1/predict, GET /health, GET /metrics, "
                                   "/docs. SIGTERM or Ctrl-C: stop accepting, answer what was received, exit 0.")
    s.add_argument("checkpoint")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=_nonneg_int, default=8000, help="0: a free port (printed)")
    s.add_argument("--max-batch-size", type=_positive_int, default=256, help="most rows a stage runs at once")
    s.add_argument("--max-wait-ms", type=_number(0, False), default=2.0,
                   help="how long a sample may wait for stage 1 to fill")
    s.add_argument("--max-queued", type=_positive_int, default=4096,
                   help="most samples waiting; beyond: 503 with Retry-After")
    s.add_argument("--max-body-mb", type=_number(0, True), default=16.0, help="largest request body (MiB): 413")
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV})")
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", default="auto", help="exit-op backend: auto, cuda, triton, cpp, torch")
    s.add_argument("--patience", type=_positive_int, default=None,
                   help="PABEE's patience rule with this P (agreeing exits in a row) instead of the "
                        "checkpoint's thresholds")
    s.add_argument("--threads", type=_nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    s.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    r = s.add_argument_group("Ray Serve (pip install 'branchynet[ray]')")
    r.add_argument("--ray", action="store_true", help="serve with Ray Serve replicas, each its own ExitServer")
    r.add_argument("--replicas", type=_positive_int, default=1)
    r.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    r.add_argument("--cpus-per-replica", type=_number(0, True), default=1.0)
    r.add_argument("--gpus-per-replica", type=_number(0, False), default=0.0)
    s.set_defaults(func=run_serve)


def run_serve(args) -> None:
    """``branchynet serve``: blocks until SIGTERM / Ctrl-C, then drains and returns."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ray:
        _serve_ray(args)
    else:
        _serve_http(args)


def _serve_http(args) -> None:
    """uvicorn in this process, in front of one ExitServer."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("error: branchynet serve needs uvicorn and fastapi: pip install 'branchynet[serve]'") \
            from None
    from ..checkpoint import build_from_checkpoint, read_checkpoint
    from ..patience import exit_rule
    from .http import create_app
    from .server import ExitServer

    model = build_from_checkpoint(read_checkpoint(args.checkpoint, map_location=args.device), args.checkpoint)
    server = ExitServer(model, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                        max_queued=args.max_queued, backend=args.backend, **exit_rule(args.patience))
    try:
        try:
            app = create_app(server, model.input_shape, dtype=next(model.parameters()).dtype,
                             max_body_mb=args.max_body_mb, api_key=args.api_key)
        except ImportError as err:
            raise SystemExit(f"error: {err}") from None
        sock = _listen(args.host, args.port)
        port = sock.getsockname()[1]
        print(f"branchynet serve: {args.checkpoint} on http://{args.host}:{port} "
              f"(docs: /docs, metrics: /metrics){'; API key required' if args.api_key else ''}", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=None)
        _uvicorn_server()(config).run(sockets=[sock])
    finally:
        server.close(drain=True)  # after uvicorn answered what it had received
    print("branchynet serve: stopped", flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one): clients may connect from this moment, their
    connections wait in the backlog until uvicorn accepts them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port} (--host/--port): {err}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, whose graceful shutdown is the whole answer to SIGTERM / SIGINT.

        uvicorn re-raises the signal once it has shut down, which ends the process with
        the signal's status (or a KeyboardInterrupt) before the ExitServer closes; here
        the caller drains it and the process exits 0.
        """

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def _serve_ray(args) -> None:
    """Ray Serve: a local Ray instance (or ``--address``), ``--replicas`` replicas."""
    if args.port == 0:
        raise SystemExit("error: --ray needs a fixed --port (Ray Serve's proxy binds it itself)")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("error: --ray needs Ray Serve: pip install 'branchynet[ray]'") from None
    from ..checkpoint import read_checkpoint
    from .ray import DEPLOYMENT_NAME, deployment

    read_checkpoint(args.checkpoint)  # a bad file fails here, not in every replica
    stop = threading.Event()
    handlers = {}
    own_cluster = args.address is None
    try:
        ray.init(address=args.address, include_dashboard=False, logging_level=args.log_level.upper(),
                 **({"num_cpus": max(os.cpu_count() or 1, int(args.replicas * args.cpus_per_replica + 0.999))}
                    if own_cluster else {}))
        # After ray.init, whose core worker installs its own SIGTERM handler (it aborts the
        # driver): a signal from here on stops the loop below, then Serve and Ray go.
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": args.host, "port": args.port})
        actor = {"num_cpus": args.cpus_per_replica}
        if args.gpus_per_replica:
            actor["num_gpus"] = args.gpus_per_replica
        app = deployment(args.checkpoint, device=args.device, max_batch_size=args.max_batch_size,
                         max_wait_ms=args.max_wait_ms, max_queued=args.max_queued, max_body_mb=args.max_body_mb,
                         api_key=args.api_key, backend=args.backend, threads=args.threads or None,
                         num_replicas=args.replicas, ray_actor_options=actor, patience=args.patience)
        serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/")
        print(f"branchynet serve: {args.checkpoint} on http://{args.host}:{args.port} (Ray Serve, "
              f"{args.replicas} replica{'s' if args.replicas > 1 else ''})", flush=True)
        stop.wait()
    finally:
        # Serve stops routing, lets the replicas finish their requests, closes their
        # ExitServers (drained); then the local Ray processes go. On a cluster we only
        # started our application: delete it, leave Serve and Ray to their owner.
        with contextlib.suppress(Exception):
            if own_cluster:
                serve.shutdown()
            else:
                serve.delete(DEPLOYMENT_NAME)
        with contextlib.suppress(Exception):
            ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print("branchynet serve: stopped", flush=True)
