"""The long-running processes (worker, API, Flower) and the database schema."""
import os
import sys
import tempfile
from pathlib import Path

import click

from . import context


@click.command()
@click.option("--queues", default="interactive,backfill", show_default=True,
              help="Queues to consume; run separate workers per queue to isolate them fully. "
                   "`webhooks` (callback deliveries) needs a worker of its own, which captions nothing.")
@click.option("--concurrency", type=int, default=None,
              help="Pool processes, default 1: one per GPU; on a CPU one process already uses every core "
                   "through torch. A webhooks worker: threads, default 16.")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Run the periodic sweep here too (idempotent, so several are harmless).")
@click.option("--loglevel", default="info", show_default=True)
@click.option("--hostname", default=None, help="Celery node name, e.g. gpu1@%h: unique per worker on one host.")
def worker(queues, concurrency, beat, loglevel, hostname) -> None:
    """Start a Celery worker that captions batches, or delivers callbacks (needs CAPTIONER_BROKER_URL)."""
    from captioner.worker.main import start

    with context.reported():
        start(context.settings(), queues, concurrency, beat, loglevel, hostname)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5555, show_default=True)
def flower(host, port) -> None:
    """Start Flower, the Celery monitor, on the broker (needs CAPTIONER_BROKER_URL).

    Basic auth comes from CAPTIONER_FLOWER_BASIC_AUTH=user:password, required unless Flower listens
    on 127.0.0.1 only: Flower's pages and API can revoke tasks and shut workers down."""
    from captioner.core.queue import create_celery

    settings = context.settings()
    if settings.embedded:
        raise click.ClickException("CAPTIONER_BROKER_URL is not set: Flower watches a broker's workers")
    if settings.flower_basic_auth is None and host != "127.0.0.1":
        raise click.ClickException(f"set CAPTIONER_FLOWER_BASIC_AUTH=user:password to listen on {host}; "
                                   "without it Flower listens on 127.0.0.1 only")
    if settings.flower_basic_auth:
        # Flower's own variable rather than --basic-auth: a password in argv shows in `ps`
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    create_celery(settings).start(["flower", f"--address={host}", f"--port={port}"])


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", type=int, default=8, show_default=True, help="Threads per process (uploads wait on I/O).")
def serve(host, port, workers, threads) -> None:
    """Start the HTTP API under gunicorn."""
    context.settings()  # fail here, with the message, rather than inside each gunicorn worker
    # prometheus_client's multiprocess mode: each gunicorn worker counts in files here and
    # /metrics sums them (a fresh folder: counters restart with the server, as Prometheus expects)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="captioner-api-metrics-"))
    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        raise click.ClickException("the API runs under gunicorn, which this installation lacks: "
                                   "pip install 'captioner[api]'")
    os.execv(str(gunicorn), [str(gunicorn), "--bind", f"{host}:{port}", "--workers", str(workers),
                             "--threads", str(threads), "--access-logfile", "-", "captioner.api:create_app()"])


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision) -> None:
    """Apply migrations to CAPTIONER_DATABASE_URL (PostgreSQL or SQLite)."""
    from captioner.core.db import shown
    from captioner.migrations import upgrade

    settings = context.settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}: {shown(settings.database_url)}")


@db.command("downgrade")
@click.argument("revision")
@click.option("--force", is_flag=True, help="Drop API keys and alt-text decisions too (refused without it).")
def db_downgrade(revision, force) -> None:
    """Undo migrations down to REVISION. A downgrade that would drop API keys or people's alt-text
    decisions is refused unless --force: back the database up first."""
    from captioner.core.db import shown
    from captioner.migrations import downgrade

    settings = context.settings()
    with context.reported():
        downgrade(settings.database_url, revision, force)
    click.echo(f"database at {revision}: {shown(settings.database_url)}")


COMMANDS = [worker, flower, serve, db]
