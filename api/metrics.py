"""Prometheus metrics of the API: requests by route, method and status, and their latency.

GET /metrics needs `Authorization: Bearer <CAPTIONER_METRICS_TOKEN>`; with no token configured it
is not served at all (404). A token rather than a separate bind: the API already has one port that
the orchestrator exposes, and the scraper config takes a bearer token (`authorization` in
Prometheus' scrape_config). Under gunicorn each worker process counts for itself: `captioner serve`
sets prometheus_client's multiprocess mode so a scrape sees the sum of all of them."""
import hmac
import os
import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import NotFound, Unauthorized

from . import services

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
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)
