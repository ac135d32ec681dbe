"""The tutorial-style worker that `captioner bench pipeline` compares against: a plain Celery task,
one message and one model call per image, Celery's default prefetch. It consumes the same queues
and the same task name as worker.tasks, so only the batching differs. Not for production.

    celery -A captioner.bench.naive_worker worker --pool prefork --concurrency 1 --queues interactive,backfill
"""
from functools import lru_cache
from typing import Any

from celery import signals
from sqlalchemy.orm import sessionmaker

from captioner.core import jobs, queries
from captioner.core.captioner import get as get_model
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queue import CAPTION_TASK, create_celery
from captioner.core.settings import get_settings

settings = get_settings()
app = create_celery(settings)
app.conf.worker_prefetch_multiplier = 4  # Celery's default: nothing sized for batches


@lru_cache(maxsize=1)
def _sessionmaker() -> sessionmaker:
    return make_sessionmaker(make_engine(settings.database_url))


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    get_model(settings)


@app.task(name=CAPTION_TASK, acks_late=True)
def caption(job_id: int, image_id: int | None = None) -> str:  # the image id is for people reading Flower
    sm = _sessionmaker()
    with sm.begin() as s:
        claimed = queries.claim(s, get_model(settings).version, settings.lease_seconds, 1, job_ids=[job_id])
    report = jobs.caption_claimed(sm, settings, claimed)  # a batch of one: one model call per image
    return report.outcomes.get(job_id, "skipped")
