"""A worker busy with a backfill must leave the rest of it in the broker for other workers.

Celery's prefetch limit counts messages (2 x batch size here, so that single uploads can fill a
batch), but a backfill message carries a batch of job ids: without worker/batching.py counting
those ids, one worker takes every waiting message of a library at once."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from captioner.core import captioner, jobs
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queue import create_celery, publish
from captioner.core.settings import Settings

pytestmark = pytest.mark.integration  # starts a worker

BATCH, MESSAGES = 10, 20  # the shared photos fixture holds 200


def test_a_busy_worker_holds_two_backfill_messages_not_twenty(own_pg_url, redis_url, tiny_checkpoint, photos,
                                                             tmp_path: Path):
    settings = Settings(database_url=own_pg_url, broker_url=redis_url, model_path=str(tiny_checkpoint),
                        batch_size=BATCH, device="cpu")
    app = create_celery(settings)
    app.control.purge()
    engine = make_engine(own_pg_url)
    sm = make_sessionmaker(engine)
    images = [jobs.file_image(p) for p in photos[:BATCH * MESSAGES]]
    _, submitted = jobs.submit_images(sm, images, captioner.version(settings), "backfill", lambda _: None)
    publish(app, jobs.to_publish(submitted), group=BATCH)
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen("backfill") == MESSAGES

    env = {**os.environ, "CAPTIONER_DATABASE_URL": own_pg_url, "CAPTIONER_BROKER_URL": redis_url,
           "CAPTIONER_BATCH_SIZE": str(BATCH), "CAPTIONER_MODEL_PATH": str(tiny_checkpoint), "CAPTIONER_DEVICE": "cpu"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "captioner.cli", "worker", "--no-beat"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        held_most, deadline = 0, time.monotonic() + 300
        while broker.llen("backfill") == MESSAGES:  # until the worker has started consuming
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        while broker.llen("backfill") or broker.hlen("unacked"):
            held_most = max(held_most, broker.hlen("unacked"))
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    # 2 x 10 ids: the batch that runs and the next one; prefetch by messages alone held all 20
    assert 1 <= held_most <= 3, held_most
    with engine.connect() as conn:
        from sqlalchemy import func, select

        from captioner.core.tables import Job
        assert conn.scalar(select(func.count()).where(Job.status == "done")) == BATCH * MESSAGES
    engine.dispose()
