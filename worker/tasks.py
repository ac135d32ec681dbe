"""The Celery worker: a batching captioning task and the periodic sweep.

Start it with `captioner worker`. Job ids from many requests are buffered by celery-batches and
flushed every CAPTIONER_BATCH_SIZE ids or CAPTIONER_BATCH_WAIT_MS, whichever comes first; the flush
runs in the pool's child process, where the model is loaded once, lazily (CUDA cannot start
before the fork)."""
import logging
import os
import select
import time
import traceback
from functools import lru_cache
from typing import Any

from celery import bootsteps, signals
from celery_batches import SimpleRequest
from sqlalchemy.orm import sessionmaker

from captioner.core import jobs, liveness, logs, metadata, queries, webhooks
from captioner.core.captioner import batch_size, describe, warm_up
from captioner.core.captioner import get as get_model
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.errors import CaptioningError
from captioner.core.queue import (CAPTION_TASK, PROC_ALIVE_TIMEOUT, SWEEP_TASK, WEBHOOK_TASK, create_celery, drained,
                                    publish_webhooks, publisher)
from captioner.core.settings import get_settings

from . import metrics
from .batching import BATCH_ERROR, Batches, request_ids
from .heartbeat import heartbeat_step

log = logging.getLogger(__name__)
settings = get_settings()
app = create_celery(settings)
publish = publisher(settings, app)
app.steps["consumer"].add(heartbeat_step(settings))  # /readyz and /metrics count this worker while it consumes
CAPTIONS = True  # whether this worker consumes caption queues (worker/main.py sets it before the pool forks)
# Each pool child writes a byte here once its model is loaded and warm. Made in the main process
# before the pool forks, so every child inherits it (children replaced later write to nobody).
_MODEL_LOADED = os.pipe()


@lru_cache(maxsize=1)
def _sessionmaker() -> sessionmaker:
    """Created on first use in the child process: a connection pool must not cross a fork."""
    return make_sessionmaker(make_engine(settings.database_url))


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    if settings.log_format == "json":  # else Celery's own text format, which already names the task
        logs.use_format(logger, "json")


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    # in the main process once the pool has forked: the children must not inherit the socket
    if settings.worker_metrics_port:
        metrics.serve(app, settings.worker_metrics_host, settings.worker_metrics_port)
        log.info("metrics on %s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    if not CAPTIONS:
        return  # a webhook worker never captions
    # in each pool child right after the fork (so CUDA starts there, not in the parent): the
    # first batch then waits neither for the weights nor for a first forward's warm-up
    import torch

    processes = app.conf.worker_concurrency or 1
    if processes > 1:
        # torch starts one thread per core in every process: N processes would run N x cores
        # threads and lose time switching between them, so each gets its share of the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // processes))
    model = get_model(settings)
    warm_up(settings)
    log.info("model %s loaded: %s", model.version, describe(model))
    os.write(_MODEL_LOADED[1], b"1")


class ModelsLoaded(bootsteps.StartStopStep):
    """The worker's start waits here, after the pool has forked and before the consumer starts, until
    every pool child has loaded its model: Celery's "ready." line, the worker_ready signal and the
    first message taken then mean a batch can run now. Celery alone said ready while the children
    were still loading (7 s before the first caption could start on the 2-core host)."""
    requires = ("celery.worker.components:Pool",)

    def start(self, worker: Any) -> None:
        if not CAPTIONS:
            return
        started, expected, loaded = time.monotonic(), worker.concurrency, 0
        deadline = started + PROC_ALIVE_TIMEOUT
        while loaded < expected and (left := deadline - time.monotonic()) > 0:
            if select.select([_MODEL_LOADED[0]], [], [], left)[0]:
                loaded += len(os.read(_MODEL_LOADED[0], expected - loaded))
        if loaded < expected:  # a child that failed to load is replaced once the loop runs; say so, go on
            log.error("only %d of %d pool processes loaded the model within %d s", loaded, expected,
                      PROC_ALIVE_TIMEOUT)
        else:
            log.info("model loaded in %d pool process%s after %.1f s", loaded, "es" if loaded > 1 else "",
                     time.monotonic() - started)


app.steps["worker"].add(ModelsLoaded)


@app.task(name=CAPTION_TASK, base=Batches, flush_every=batch_size(settings),
          flush_interval=settings.batch_wait_ms / 1000, acks_late=True, reject_on_worker_lost=True)
def caption(requests: list[SimpleRequest]) -> dict[str, Any]:
    """Claim the batch's jobs, caption them in model forwards, write each forward as it ends
    -> {request id: its outcome (_outcome)}, or {BATCH_ERROR: what broke} when the batch itself
    failed: its requests then fail in Flower with the real exception and traceback (celery-batches
    would log it in the pool child and hand back nothing)."""
    try:
        return _caption(requests)
    except Exception as e:
        log.exception("batch of %d requests failed", len(requests))
        return {BATCH_ERROR: {"exception": repr(e), "traceback": traceback.format_exc()}}


def _caption(requests: list[SimpleRequest]) -> dict[str, Any]:
    job_ids = sorted({j for r in requests for j in request_ids(r)})
    sm = _sessionmaker()
    version = get_model(settings).version
    with sm.begin() as s:
        claimed = queries.claim(s, version, settings.lease_seconds, len(job_ids), job_ids=job_ids)
        claimed, given_back = queries.isolate(s, claimed)  # smaller batches after a worker died with these
    publish(given_back)
    report = jobs.caption_claimed(sm, settings, claimed)
    metrics.observe(report)
    stage = {k: sum(v) for k, v in report.stages.items()}
    log.info("batch %s: %d requests, %d claimed, %d captioned in forwards of up to %d, %d failed, %d requeued "
             "in %.2fs (model %.2fs, write %.2fs)", report.batch, len(requests), len(claimed), report.captioned,
             report.forward_size, report.failed, report.released, report.seconds, stage.get("model", 0.0),
             stage.get("write", 0.0),
             extra={"batch_id": report.batch, "image_ids": [c.image_id for c in claimed]})
    publish_webhooks(app, list(report.events))  # committed with the jobs; a broker error leaves them to the sweep
    if report.finished:
        _write_sidecars(sm, list(report.finished))
    # duplicates and jobs already done or claimed elsewhere are dropped by the claim, on purpose
    images = {c.job_id: c.image_id for c in claimed}
    return {r.id: _outcome(r, report.outcomes, images) for r in requests}


@lru_cache(maxsize=1)
def _exiftool() -> Any:
    """One exiftool process per pool child, started when a batch first asks for XMP sidecars."""
    tool = metadata.exiftool_process()
    tool.run()
    return tool


def _write_sidecars(sm: sessionmaker, job_ids: list[int]) -> None:
    """XMP sidecars for batches that asked for them; a failure here leaves the captions done (they
    are in the database, and `captioner write-metadata` can write the files later)."""
    try:
        report = metadata.write_s3_sidecars(sm, _exiftool, job_ids)
    except CaptioningError as e:
        log.error("XMP sidecars not written for %d jobs: %s: %s", len(job_ids), e.code, e.message)
        return
    for uri, outcome, detail in report.notes:
        log.warning("%s: %s %s", uri, outcome, detail)


def _outcome(request: SimpleRequest, outcomes: dict[int, str], images: dict[int, int]) -> str | dict[str, Any]:
    """One request's outcome. A single image's: "done", "skipped" (done already, or claimed by
    another worker), "requeued" or the error code it failed with (a failure in Flower). A backfill
    message rings for a group of images; its task ran whatever became of each, so it succeeds
    with a count per outcome and the ids of the images that failed."""
    ids = request_ids(request)
    if "job_ids" not in request.kwargs:
        return outcomes.get(ids[0], "skipped")
    ended = [(j, outcomes[j]) for j in ids if j in outcomes]
    failed = [(j, o) for j, o in ended if o not in ("done", "requeued")]
    codes: dict[str, int] = {}
    for _, code in failed:
        codes[code] = codes.get(code, 0) + 1
    return {"done": sum(1 for _, o in ended if o == "done"), "failed": codes,
            "failed_images": [images[j] for j, _ in failed],
            "requeued": sum(1 for _, o in ended if o == "requeued"), "skipped": len(ids) - len(ended)}


@app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, max_retries=None)
def deliver_webhook(self: Any, event: int) -> str:
    """One attempt to POST an outbox row's event; a failed attempt is recorded and tried again
    with exponential backoff (2, 4, 8 ... s) until webhook_max_attempts. The database holds the
    count and the due time, so a lost retry message only waits for the sweep."""
    delay = webhooks.deliver_event(_sessionmaker(), settings, event)
    if delay is not None:
        raise self.retry(countdown=delay, max_retries=None)
    return "finished"


@app.task(name=SWEEP_TASK)
def sweep() -> int:
    """Return expired leases to the queue and re-publish jobs queued too long and webhook events
    left due (lost messages)."""
    idle = drained(app)  # asked before the transaction: no broker round trip while rows are locked
    with _sessionmaker().begin() as s:
        republish = queries.sweep(s, settings.max_attempts, settings.requeue_after_seconds, idle)
        events = webhooks.overdue(s, settings.requeue_after_seconds)
        liveness.forget_lost(s)
    publish(republish)
    publish_webhooks(app, events)
    if events:
        log.info("sweep: re-published %d webhook events", len(events))
    if republish:
        log.info("sweep: re-published %d jobs", len(republish))
    return len(republish)
