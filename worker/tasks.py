"""The Celery worker: a batching captioning task and the periodic sweep.

Start it with `captioner worker`. Job ids from many requests are buffered by celery-batches and
flushed every CAPTIONER_BATCH_SIZE ids or CAPTIONER_BATCH_WAIT_MS, whichever comes first; the flush
runs in the pool's child process, where the model is loaded once, lazily (CUDA cannot start
before the fork)."""
import logging
from functools import lru_cache
from typing import Any

from celery import signals
from celery_batches import SimpleRequest
from sqlalchemy.orm import sessionmaker

from core import jobs, queries, webhooks
from core.captioner import batch_size
from core.captioner import get as get_model
from core.db import make_engine, make_sessionmaker
from core.queue import CAPTION_TASK, SWEEP_TASK, WEBHOOK_TASK, create_celery, drained, publish, publish_webhooks
from core.settings import get_settings

from .batching import Batches, request_ids

log = logging.getLogger(__name__)
settings = get_settings()
app = create_celery(settings)


@lru_cache(maxsize=1)
def _sessionmaker() -> sessionmaker:
    """Created on first use in the child process: a connection pool must not cross a fork."""
    return make_sessionmaker(make_engine(settings.database_url))


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    # in each pool child right after the fork (so CUDA starts there, not in the parent): the
    # first batch then does not wait for the weights
    get_model(settings)


@app.task(name=CAPTION_TASK, base=Batches, flush_every=batch_size(settings),
          flush_interval=settings.batch_wait_ms / 1000, acks_late=True, reject_on_worker_lost=True)
def caption(requests: list[SimpleRequest]) -> dict[str, str]:
    """Claim the batch's jobs, caption them with one forward pass, write them in one transaction."""
    job_ids = sorted({j for r in requests for j in request_ids(r)})
    sm = _sessionmaker()
    version = get_model(settings).version
    with sm.begin() as s:
        claimed = queries.claim(s, version, settings.lease_seconds, len(job_ids), job_ids=job_ids)
    report = jobs.caption_claimed(sm, settings, claimed)
    log.info("batch: %d requests, %d claimed, forward of %d, %d failed, %d requeued in %.2fs",
             len(requests), len(claimed), report.forward_size, report.failed, report.released, report.seconds)
    if report.finished:
        with sm() as s:
            publish_webhooks(app, webhooks.targets(s, list(report.finished)))
    claimed_ids = {c.job_id for c in claimed}
    # duplicates and jobs already done or claimed elsewhere are dropped by the claim, on purpose
    return {r.id: ("processed" if claimed_ids.intersection(request_ids(r)) else "skipped") for r in requests}


@app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, autoretry_for=(webhooks.DeliveryFailed,),
          retry_backoff=2, retry_backoff_max=600, retry_jitter=True, max_retries=settings.webhook_max_attempts - 1)
def deliver_webhook(self: Any, job_id: int, url: str) -> bool:
    """POST one job's event to one callback URL; a failed attempt is recorded and retried with
    exponential backoff (2, 4, 8 ... s, jittered) until webhook_max_attempts."""
    sm = _sessionmaker()
    with sm() as s:
        event = webhooks.event(s, job_id, url)
    return webhooks.deliver_once(sm, settings, event, attempt=self.request.retries + 1)


@app.task(name=SWEEP_TASK)
def sweep() -> int:
    """Return expired leases to the queue and re-publish jobs queued too long (lost messages)."""
    idle = drained(app)  # asked before the transaction: no broker round trip while rows are locked
    with _sessionmaker().begin() as s:
        republish = queries.sweep(s, settings.max_attempts, settings.requeue_after_seconds, idle)
    publish(app, republish, group=batch_size(settings))
    if republish:
        log.info("sweep: re-published %d jobs", len(republish))
    return len(republish)
