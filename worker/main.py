"""Starting a worker process: Celery's prefork worker with the batching task, and the sweep's beat."""
import os
import shutil
import tempfile

from captioner.core import captioner
from captioner.core.errors import ConfigError
from captioner.core.queue import WEBHOOK_QUEUE
from captioner.core.settings import Settings

WEBHOOK_THREADS = 16  # deliveries wait on receivers, not on the CPU: threads, many at once


def start(settings: Settings, queues: str, concurrency: int | None, beat: bool, loglevel: str,
          hostname: str | None) -> None:
    if settings.embedded:
        raise ConfigError("CAPTIONER_BROKER_URL is not set; without a broker use `captioner caption PATH`")
    names = [q.strip() for q in queues.split(",") if q.strip()]
    webhooks = WEBHOOK_QUEUE in names
    if webhooks and names != [WEBHOOK_QUEUE]:
        raise ConfigError(f"the {WEBHOOK_QUEUE} queue gets a worker of its own (`captioner worker --queues "
                          f"{WEBHOOK_QUEUE}`): a slow receiver must not hold a process that captions")
    if not webhooks:
        captioner.version(settings)  # a missing checkpoint stops here, not in every pool child
    samples = None
    if settings.worker_metrics_port and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # prometheus_client's multiprocess mode, chosen when it is imported: the prefork children
        # write their samples to files here and the main process serves their sum
        samples = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="captioner-metrics-")
    from . import tasks
    from .tasks import app

    concurrency = concurrency or (WEBHOOK_THREADS if webhooks else 1)
    tasks.CAPTIONS = not webhooks
    app.conf.worker_concurrency = concurrency  # also read by the pool processes (their torch threads)
    # --without-mingle: after a Redis restart the worker reconnected, logged "mingle: searching for
    # neighbors" and never consumed again (celery/celery#8030; seen in the fault suite's Redis
    # restart). Mingle only syncs revoked ids between workers; the database is our truth.
    argv = ["worker", "--queues", ",".join(names), "--concurrency", str(concurrency),
            "--pool", "threads" if webhooks else "prefork",
            "--loglevel", loglevel, "--task-events", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    if beat:
        # the in-memory scheduler: no schedule file for two workers on one host to fight over
        argv += ["--beat", "--scheduler", "celery.beat:Scheduler"]
    try:
        app.worker_main(argv)
    finally:  # the samples of a stopped worker's children mean nothing to the next one
        if samples:
            shutil.rmtree(samples, ignore_errors=True)
