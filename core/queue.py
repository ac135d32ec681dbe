"""The Celery app object and task names, so the API can publish without importing worker/ or torch."""
import logging
from typing import Callable

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from .captioner import batch_size
from .queries import Doorbell
from .settings import Settings
from .tables import QUEUES

CAPTION_TASK = "captioner.caption"
SWEEP_TASK = "captioner.sweep"
PROC_ALIVE_TIMEOUT = 300  # seconds a new pool child may take to load the model
WEBHOOK_TASK = "captioner.webhook"
# deliveries have a queue and a worker of their own: a slow receiver must never hold a process
# that captions (`captioner worker --queues webhooks`)
WEBHOOK_QUEUE = "webhooks"
EXCHANGE = Exchange("captioner", type="direct")
VISIBILITY_TIMEOUT = 3600  # seconds; far above flush interval + the worst batch, or Redis redelivers mid-run

log = logging.getLogger(__name__)
Publish = Callable[[list[Doorbell]], None]  # after their rows are committed


def create_celery(settings: Settings) -> Celery:
    app = Celery("captioner", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # each queue bound by its own name: a bare Queue(name) is bound with the default routing key
        # ("interactive"), so every message reached both queues and backfills were not kept apart.
        # A new exchange name: Redis keeps the old bindings of the "interactive" exchange.
        task_queues=[Queue(q, EXCHANGE, routing_key=q) for q in (*QUEUES, WEBHOOK_QUEUE)],
        task_default_exchange=EXCHANGE.name,
        task_default_routing_key="interactive",
        task_default_queue="interactive",
        task_ignore_result=True,  # results live in the database; the broker is only a doorbell
        task_acks_late=True,  # a crash mid-batch redelivers instead of losing the ids
        task_reject_on_worker_lost=True,
        # one process per device; the buffer must hold more than one batch or batches never fill
        worker_prefetch_multiplier=2 * batch_size(settings),
        worker_concurrency=1,
        # a pool child loads the model before it reports up (worker/tasks.py); on a busy host that
        # takes longer than Celery's 4 s, and a child killed for it is replaced by one killed alike
        worker_proc_alive_timeout=PROC_ALIVE_TIMEOUT,
        worker_send_task_events=True,  # Flower and `celery events` see every request
        task_send_sent_event=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        broker_connection_retry_on_startup=True,
        beat_schedule={"sweep": {"task": SWEEP_TASK, "schedule": float(settings.sweep_seconds),
                                 "options": {"queue": "interactive", "expires": float(settings.sweep_seconds)}}},
    )
    return app


def drained(app: Celery) -> list[str]:
    """The job queues with no message waiting in the broker (messages workers have prefetched are
    not counted); none when the broker cannot be reached, as nothing could be published anyway."""
    try:
        with app.connection_for_write() as conn:
            return [q for q in QUEUES if app.amqp.queues[q](conn.default_channel).queue_declare().message_count == 0]
    except OperationalError as e:
        log.warning("broker unreachable, nothing re-published: %s", e)
        return []


def doorbells(jobs: list[Doorbell], group: int) -> list[tuple[dict, str, str]]:
    """(task kwargs, queue, kwargs as Flower and `celery inspect` show them) per message. Backfill
    jobs share a message, up to `group` (a model batch) per message: a library of 100,000 images
    is not 100,000 broker round trips. An interactive job has a message of its own, so it never
    waits for company. People know images by their ids (the API's, the logs'): the messages carry
    them beside the job ids the worker claims (`celery inspect` shows both), and Flower is shown
    the images alone."""
    messages: list[tuple[dict, str, str]] = []
    pending: dict[str, list[Doorbell]] = {}

    def grouped(bells: list[Doorbell]) -> tuple[dict, str, str]:
        images = [b.image_id for b in bells]
        return {"job_ids": [b.job_id for b in bells], "image_ids": images}, bells[0].queue, repr({"image_ids": images})

    for bell in jobs:
        if bell.queue != "backfill" or group <= 1:
            kwargs = {"image_id": bell.image_id, "job_id": bell.job_id}
            messages.append((kwargs, bell.queue, repr(kwargs)))
            continue
        bells = pending.setdefault(bell.queue, [])
        bells.append(bell)
        if len(bells) == group:
            messages.append(grouped(pending.pop(bell.queue)))
    messages += [grouped(bells) for bells in pending.values()]
    return messages


def publish(app: Celery, jobs: list[Doorbell], group: int = 1) -> None:
    """Ring the doorbell for jobs, after their rows are committed. If the broker
    is down the jobs stay queued in the database and the sweep publishes them again later."""
    if not jobs:
        return
    try:
        # producer.batch pipelines the Redis commands: one round trip per 1,000 messages, not per message
        with app.producer_or_acquire() as producer, producer.batch():
            for kwargs, queue, shown in doorbells(jobs, group):
                app.send_task(CAPTION_TASK, kwargs=kwargs, kwargsrepr=shown, queue=queue, producer=producer,
                              retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
    except OperationalError as e:  # kombu's wrapper for every transport's connection errors
        log.warning("broker unreachable, %d jobs left for the sweep to publish: %s", len(jobs), e)


def publish_webhooks(app: Celery, outbox_ids: list[int]) -> None:
    """One delivery task per outbox row, on the webhooks queue; its kwargs are the row's id only,
    so no callback URL (which may carry a token) shows in Flower. A broker error is logged and
    swallowed: the rows are committed, and the sweep sends them again."""
    if not outbox_ids:
        return
    try:
        with app.producer_or_acquire() as producer:
            for outbox_id in outbox_ids:
                app.send_task(WEBHOOK_TASK, kwargs={"event": outbox_id}, queue=WEBHOOK_QUEUE, producer=producer,
                              retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
    except OperationalError as e:
        log.warning("broker unreachable, could not publish %d webhook events (the sweep will): %s", len(outbox_ids), e)


def publisher(settings: Settings, app: Celery | None = None) -> Publish:
    """How every submitter (API, CLI, sweep, benchmarks) tells workers about new jobs: doorbells on
    the broker, backfills grouped by the worker's batch size. Without a broker (embedded mode)
    nothing is rung: `captioner caption` drains the database queue in its own process."""
    if settings.embedded:
        return lambda _jobs: None
    app = app or create_celery(settings)
    group = batch_size(settings)
    return lambda jobs: publish(app, jobs, group)
