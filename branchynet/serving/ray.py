"""Ray Serve replicas of a checkpoint, each running its own :class:`ExitServer`.

Ray Serve routes requests among the replicas (and autoscales them); each replica loads the
checkpoint, runs an ``ExitServer`` (its per-stage queues and scheduler: Serve's own
``@serve.batch`` would batch whole-model calls and lose the per-stage pooling) and the
same FastAPI app as ``branchynet serve`` (:func:`branchynet.serving.http.create_app`):
the same endpoints, errors and metrics, the metrics labelled with the replica.

    from ray import serve
    from branchynet.serving.ray import deployment

    serve.run(deployment("model.pt", num_replicas=2), route_prefix="/")

Needs the ``[ray]`` extra (``ray[serve]``) and ``[serve]`` (fastapi, prometheus-client).
"""

from __future__ import annotations

import os

__all__ = ["deployment", "DEPLOYMENT_NAME"]

DEPLOYMENT_NAME = "branchynet"


def _need_ray():
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError("Ray Serve replicas need ray[serve]: pip install 'branchynet[ray]'") from err
    return serve


def _replica_class():
    """The replica class; built on first use so that importing this module needs no ray."""
    serve = _need_ray()

    # Absolute imports inside: Ray pickles this class by value (it is not importable by
    # name), and each replica imports branchynet itself.
    @serve.ingress()
    class BranchyNetReplica:
        """One replica: the checkpoint's model in an ExitServer behind the HTTP app."""

        def __init__(self, checkpoint: str, settings: dict):
            import torch

            from branchynet.checkpoint import build_from_checkpoint, read_checkpoint
            from branchynet.patience import exit_rule
            from branchynet.serving.server import ExitServer

            if settings.get("threads"):
                torch.set_num_threads(settings["threads"])
            raw = read_checkpoint(checkpoint, map_location=settings["device"])
            self.model = build_from_checkpoint(raw, checkpoint).eval()
            self.settings = settings
            self.server = ExitServer(self.model, max_batch_size=settings["max_batch_size"],
                                     max_wait_ms=settings["max_wait_ms"], max_queued=settings["max_queued"],
                                     backend=settings["backend"], **exit_rule(settings.get("patience")))

        def __serve_build_asgi_app__(self):
            from branchynet.serving.http import create_app
            from branchynet.serving.metrics import ServingMetrics

            ctx = serve.get_replica_context()
            rid = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or str(os.getpid())
            p = next(self.model.parameters())
            s = self.settings
            return create_app(self.server, self.model.input_shape, dtype=p.dtype, max_body_mb=s["max_body_mb"],
                              api_key=s["api_key"], metrics=ServingMetrics(self.server, {"replica": rid}))

        def __del__(self):
            # Serve stops routing to a replica, waits for its ongoing requests, then calls
            # this: what is still queued is answered before the replica goes.
            server = getattr(self, "server", None)
            if server is not None:
                server.close(drain=True)

    return BranchyNetReplica


def deployment(checkpoint, *, device: str = "cpu", max_batch_size: int = 256, max_wait_ms: float = 2.0,
               max_queued: int = 4096, max_body_mb: float = 16.0, api_key: str | None = None,
               backend: str = "auto", threads: int | None = None, num_replicas: int | str = 1,
               autoscaling_config: dict | None = None, ray_actor_options: dict | None = None,
               name: str = DEPLOYMENT_NAME, patience: int | None = None, **options):
    """A Ray Serve application serving ``checkpoint``, to pass to ``serve.run`` or to
    compose into a larger application.

    Args:
        checkpoint: a file written by :func:`~branchynet.checkpoint.save_checkpoint`,
            readable at that path on every node that runs a replica.
        device: where each replica puts the model (``"cuda"`` with
            ``ray_actor_options={"num_gpus": 1}``: Ray gives each replica its own GPU).
        max_batch_size, max_wait_ms, max_queued, backend: each replica's
            :class:`~branchynet.serving.ExitServer`.
        patience: serve PABEE's patience rule with this P instead of the thresholds.
        max_body_mb, api_key: as for :func:`~branchynet.serving.http.create_app`.
        threads: torch CPU threads per replica (default: the replica's ``num_cpus``).
        num_replicas: fixed replica count (ignored with ``autoscaling_config``).
        autoscaling_config: Ray Serve's autoscaling options, passed through (e.g.
            ``{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}``).
        ray_actor_options: per replica, e.g. ``{"num_cpus": 1, "num_gpus": 1}``
            (default ``{"num_cpus": 1}``).
        name: the deployment's name. options: any other ``serve.deployment`` option
            (``max_ongoing_requests``, ``graceful_shutdown_timeout_s``, ...).
    """
    serve = _need_ray()
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    actor = dict(ray_actor_options or {"num_cpus": 1})
    settings = {"device": device, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                "max_queued": max_queued, "max_body_mb": max_body_mb, "api_key": api_key, "backend": backend,
                "threads": threads or max(1, int(actor.get("num_cpus", 1))), "patience": patience}
    # A replica's requests are its ExitServer's rows: let Serve send it as many at once as
    # its queue holds, or Serve's own limit (default 5) would starve the stage batches.
    options.setdefault("max_ongoing_requests", max_queued)
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    dep = serve.deployment(_replica_class(), name=name, ray_actor_options=actor, **options)
    return dep.bind(checkpoint, settings)
