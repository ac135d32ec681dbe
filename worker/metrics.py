"""Prometheus metrics of the workers: batch sizes, images captioned, failures by error code, time
per stage and the broker's queue depths.

The pool is prefork: batches run in child processes, each with its own memory. `captioner worker`
therefore sets PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) before this module
is imported, the children write their samples to files there, and the main process serves the sum
of them on CAPTIONER_WORKER_METRICS_PORT. Images/s is `rate(captioner_images_captioned_total[1m])`."""
from typing import Any, Iterator

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from captioner.core.jobs import BatchReport
from captioner.core.tables import QUEUES

BATCH_SIZE = Histogram("captioner_batch_size", "Images per model forward",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
CAPTIONED = Counter("captioner_images_captioned", "Images captioned and written")
FAILURES = Counter("captioner_image_failures", "Images that failed (requeued: a transient error)", ["code"])
STAGE_SECONDS = Histogram("captioner_stage_seconds",
                          "Seconds per stage: fetch and decode per image (on threads), model and write per batch",
                          ["stage"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))


def observe(report: BatchReport) -> None:
    if report.forward_size:
        BATCH_SIZE.observe(report.forward_size)
    CAPTIONED.inc(report.captioned)
    for outcome in report.outcomes.values():
        if outcome != "done":
            FAILURES.labels(outcome).inc()
    for stage, seconds in report.stages.items():
        histogram = STAGE_SECONDS.labels(stage)
        for s in seconds:
            histogram.observe(s)


class QueueDepth(Collector):
    """Messages waiting in each broker queue, read at scrape time (not those a worker has prefetched)."""

    def __init__(self, app: Celery):
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("captioner_queue_depth", "Messages waiting in the broker queue", labels=["queue"])
        with self.app.connection_for_read() as conn:
            for queue in QUEUES:
                # declaring is idempotent; a passive declare fails on Redis while a queue is empty
                gauge.add_metric([queue], conn.default_channel.queue_declare(queue=queue).message_count)
        yield gauge


def serve(app: Celery, host: str, port: int) -> Any:
    """The main process's /metrics: the pool children's samples (multiprocess files) + queue depths."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(QueueDepth(app))
    return start_http_server(port, addr=host, registry=registry)
