"""Prometheus metrics of a served model, all named ``branchynet_*``.

Read from :meth:`ExitServer.stats` at each scrape (so nothing is added to the worker's
path):

- ``branchynet_answers_total{exit}``: answers per exit (0-based);
- ``branchynet_stage_runs_total{stage}``, ``branchynet_stage_rows_total{stage}``: runs
  and rows per stage; ``rate(rows) / rate(runs)`` is a stage's mean batch;
- ``branchynet_queue_depth{stage}``: rows waiting for each stage now;
- ``branchynet_overloaded_total``: requests refused because ``max_queued`` rows waited;
- ``branchynet_failed_total``: requests failed (a stage raised, timeouts).

Counted by the HTTP app:

- ``branchynet_http_requests_total{path, code}``: requests by path and status;
- ``branchynet_samples_total``: samples answered over HTTP;
- ``branchynet_request_latency_seconds``: histogram, a ``/v1/predict`` call from its
  start to its answer (body read, decode, every sample's answer);
- ``branchynet_answer_latency_seconds{exit}``: histogram, one sample from its submit to
  its answer, per exit (what early exit saves shows here).
"""

from __future__ import annotations

__all__ = ["ServingMetrics"]

#: Latency buckets (seconds): 0.5 ms to 10 s, ~2x apart; the server's p50 on a CPU is a
#: few ms (its batching wait), overload pushes it to seconds.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _StatsCollector:
    """The server's own counters, read at scrape time."""

    def __init__(self, server, labels: dict):
        self.server, self.labels = server, labels

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.server.stats()
        names = list(self.labels)
        values = list(self.labels.values())

        def per(family, name, stat, label, what):
            fam = family(f"branchynet_{name}", what, labels=names + [label])
            for i, v in enumerate(st[stat]):
                fam.add_metric(values + [str(i)], v)
            return fam

        yield per(CounterMetricFamily, "answers", "exits", "exit", "answers per exit (0-based)")
        yield per(CounterMetricFamily, "stage_runs", "stage_runs", "stage", "runs of each stage")
        yield per(CounterMetricFamily, "stage_rows", "stage_rows", "stage",
                  "rows run through each stage (rows / runs: mean batch)")
        yield per(GaugeMetricFamily, "queue_depth", "queued", "stage", "rows waiting for each stage")
        for key, what in (("overloaded", "requests refused: max_queued rows were waiting"),
                          ("failed", "requests failed (a stage raised, a timeout)")):
            fam = CounterMetricFamily(f"branchynet_{key}", what, labels=names)
            fam.add_metric(values, st[key])
            yield fam


class ServingMetrics:
    """The metrics of one served model, on their own registry (several apps in one
    process, as in the tests, do not collide).

    Args:
        server: the :class:`~branchynet.serving.ExitServer` whose ``stats()`` are read.
        labels: constant labels on every metric (Ray Serve: the replica).
    """

    def __init__(self, server, labels: dict | None = None):
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as err:
            raise ImportError("the metrics need prometheus-client: pip install 'branchynet[serve]'") from err
        labels = dict(labels or {})
        names = list(labels)
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(server, labels))
        reg = dict(registry=self.registry)
        self.requests = _Bound(Counter("branchynet_http_requests", "HTTP requests by path and status code",
                                       names + ["path", "code"], **reg), labels)
        self.samples = _Bound(Counter("branchynet_samples", "samples answered over HTTP", names, **reg), labels)
        self.request_latency = _Bound(Histogram(
            "branchynet_request_latency_seconds", "a /v1/predict call, body read to answer",
            names, buckets=BUCKETS, **reg), labels)
        self.answer_latency = _Bound(Histogram(
            "branchynet_answer_latency_seconds", "one sample, submit to answer, per exit",
            names + ["exit"], buckets=BUCKETS, **reg), labels)

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Bound:
    """A metric with the constant labels already applied: ``.labels(...)`` takes the rest,
    ``.inc`` / ``.observe`` work when there is no other label."""

    def __init__(self, metric, labels: dict):
        self.metric, self.const = metric, list(labels.values())

    def labels(self, *values):
        return self.metric.labels(*self.const, *values)

    def inc(self, amount=1):
        (self.metric.labels(*self.const) if self.const else self.metric).inc(amount)

    def observe(self, value):
        (self.metric.labels(*self.const) if self.const else self.metric).observe(value)
