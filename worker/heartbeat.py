"""The worker's heartbeat: its row in `worker_beats`, refreshed every quarter of
CAPTIONER_WORKER_TIMEOUT_SECONDS by a thread of the main process while the worker consumes, and
deleted when it stops consuming (a clean stop, or a lost broker connection).

Not Celery's own worker heartbeats or `inspect().ping()`: those are broadcasts on the broker,
which the API would have to wait out on every probe when no worker is there to answer. A row in
the database is read with one query, and a stopped fleet shows there too."""
import logging
import os
import threading
from typing import Any

from celery import bootsteps
from sqlalchemy.exc import SQLAlchemyError

from captioner.core import captioner, liveness
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.queue import WEBHOOK_QUEUE
from captioner.core.settings import Settings

log = logging.getLogger(__name__)


def heartbeat_step(settings: Settings) -> type:
    """A consumer bootstep: it starts once the task consumer consumes its queues. worker/tasks.py
    adds it to the app, so `celery -A captioner.worker.tasks:app worker` beats too."""

    class Heartbeat(bootsteps.StartStopStep):
        label = "heartbeat"
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            engine = make_engine(settings.database_url)
            # pool processes forked later must not share its connections (SQLAlchemy's pooling docs)
            os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
            self.sessions = make_sessionmaker(engine)
            self.interval = settings.worker_timeout_seconds / 4
            self.thread: threading.Thread | None = None
            self.stopping = threading.Event()
            self.failing = False

        def start(self, consumer: Any) -> None:
            if self.thread is not None:
                return
            self.who = (consumer.hostname, os.getpid())
            self.queues = sorted(q.name for q in consumer.task_consumer.queues)
            captions = self.queues != [WEBHOOK_QUEUE]  # a webhooks worker loads no model
            self.model = (captioner.version(settings), captioner.runtime_plan(settings)) if captions else (None, None)
            self.stopping.clear()
            self._beat()  # at once: the worker counts from its first consumed message on
            self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self.thread.start()

        def stop(self, consumer: Any) -> None:
            if self.thread is None:
                return
            self.stopping.set()
            self.thread.join()
            self.thread = None
            try:
                with self.sessions.begin() as s:
                    liveness.leave(s, *self.who)
            except SQLAlchemyError as e:  # the row ages out instead
                log.warning("heartbeat row not removed (%s); it ages out in %d s", e.__class__.__name__,
                            settings.worker_timeout_seconds)

        shutdown = stop

        def _run(self) -> None:
            while not self.stopping.wait(self.interval):
                self._beat()

        def _beat(self) -> None:
            try:
                with self.sessions.begin() as s:
                    liveness.beat(s, *self.who, self.queues, *self.model)
            except SQLAlchemyError as e:  # the database is down: say so once, not every few seconds
                if not self.failing:
                    log.warning("heartbeat not written: %s: %s", e.__class__.__name__, e)
                self.failing = True
                return
            if self.failing:
                log.info("heartbeat written again")
            self.failing = False

    return Heartbeat
