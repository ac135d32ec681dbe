"""The Celery app object and task names, so the API can publish without importing worker/ or torch."""
import logging

from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError

from .captioner import batch_size
from .settings import Settings
from .tables import QUEUES

CAPTION_TASK = "captioner.caption"
SWEEP_TASK = "captioner.sweep"
PROC_ALIVE_TIMEOUT = 300  # seconds a new pool child may take to load the model
VISIBILITY_TIMEOUT = 3600  # seconds; far above flush interval + the worst batch, or Redis redelivers mid-run

log = logging.getLogger(__name__)


def create_celery(settings: Settings) -> Celery:
    app = Celery("captioner", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
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


def publish(app: Celery, jobs: list[tuple[int, str]]) -> None:
    """Ring the doorbell for (job id, queue) pairs, after their rows are committed. If the broker
    is down the jobs stay queued in the database and the sweep publishes them again later."""
    if not jobs:
        return
    try:
        with app.producer_or_acquire() as producer:
            for job_id, queue in jobs:
                app.send_task(CAPTION_TASK, kwargs={"job_id": job_id}, queue=queue, producer=producer,
                              retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
    except OperationalError as e:  # kombu's wrapper for every transport's connection errors
        log.warning("broker unreachable, %d jobs left for the sweep to publish: %s", len(jobs), e)
