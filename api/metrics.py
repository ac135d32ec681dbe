"""Prometheus metrics of the API: requests by route, method and status, and their latency; and,
read from the database at each scrape, jobs queued and the oldest one's age per queue, live
workers per queue and failed jobs by error code.

GET /metrics needs `Authorization: Bearer <CAPTIONER_METRICS_TOKEN>`; with no token configured it
is not served at all (404). A token rather than a separate bind: the API already has one port that
the orchestrator exposes, and the scraper config takes a bearer token (`authorization` in
Prometheus' scrape_config). Under gunicorn each worker process counts for itself: `captioner serve`
sets prometheus_client's multiprocess mode so a scrape sees the sum of all of them."""
import hmac
import os
import time
from typing import Iterator

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import NotFound, Unauthorized

from captioner.core import liveness
from captioner.core.queue import WEBHOOK_QUEUE

from . import Services, services

REQUESTS = Counter("captioner_http_requests", "HTTP requests answered", ["route", "method", "status"])
LATENCY = Histogram("captioner_http_request_seconds", "Seconds from request to response", ["route", "method"],
                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))

bp = Blueprint("metrics", __name__)


def _started() -> None:
    g.metrics_started = time.perf_counter()


def _record(response: Response) -> Response:
    # the rule (/v1/images/<id:image_id>), never the path: one label value per route, not per id
    route = request.url_rule.rule if request.url_rule else "unmatched"
    REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    if "metrics_started" in g:
        LATENCY.labels(route, request.method).observe(time.perf_counter() - g.metrics_started)
    return response


def init_app(app: Flask) -> None:
    app.before_request(_started)
    app.after_request(_record)
    app.register_blueprint(bp)


def _registry() -> CollectorRegistry:
    # prometheus_client's own variable (set by `captioner serve`), not one of our settings
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


@bp.get("/metrics")
def metrics() -> Response:
    token = services().settings.metrics_token
    if token is None:
        raise NotFound("metrics are not served: set CAPTIONER_METRICS_TOKEN to enable /metrics")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("send Authorization: Bearer <CAPTIONER_METRICS_TOKEN>", www_authenticate=WWWAuthenticate("Bearer"))
    queues = CollectorRegistry()
    queues.register(QueueCollector(services()))
    # content_type, not mimetype: CONTENT_TYPE_LATEST already carries its charset, which Flask would add again
    return Response(generate_latest(_registry()) + generate_latest(queues), content_type=CONTENT_TYPE_LATEST)


class QueueCollector(Collector):
    """The work waiting and who works it, read from the database at scrape time (the jobs table is
    the truth, and the API answers with no worker left to export anything); aggregates only, no tenant.
    Computed once per scrape, not summed across gunicorn processes like the HTTP counters."""

    def __init__(self, svc: Services):
        self.svc = svc

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.svc.sessionmaker() as s:
            state = liveness.report(s, self.svc.settings.worker_timeout_seconds, with_failures=True)
        queued = GaugeMetricFamily("captioner_jobs_queued", "Jobs waiting for a worker, per queue", labels=["queue"])
        oldest = GaugeMetricFamily("captioner_jobs_oldest_queued_seconds",
                                   "Seconds since the oldest queued job was submitted; 0 when none", labels=["queue"])
        for name, q in state.queues.items():
            queued.add_metric([name], q.queued)
            oldest.add_metric([name], q.oldest_seconds)
        workers = GaugeMetricFamily("captioner_workers_live",
                                    "Workers with a heartbeat younger than CAPTIONER_WORKER_TIMEOUT_SECONDS, per queue "
                                    "they consume", labels=["queue"])
        for name in (*state.queues, WEBHOOK_QUEUE):
            workers.add_metric([name], state.consumers(name))
        pending = GaugeMetricFamily("captioner_webhook_events_pending",
                                    "Webhook events waiting in the outbox for delivery (first or retried)")
        pending.add_metric([], state.webhooks.queued)
        oldest_pending = GaugeMetricFamily("captioner_webhook_events_oldest_pending_seconds",
                                           "Seconds since the oldest pending webhook event's job ended; 0 when none")
        oldest_pending.add_metric([], state.webhooks.oldest_seconds)
        failed = GaugeMetricFamily("captioner_jobs_failed", "Jobs failed now, by error code (a retry removes them)",
                                   labels=["code"])
        for code, count in sorted(state.failures.items()):
            failed.add_metric([code], count.total)
        yield from (queued, oldest, workers, pending, oldest_pending, failed)
