"""The long-running processes (worker, API, Flower) and the database schema."""
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict

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

    Basic auth comes from CAPTIONER_FLOWER_BASIC_AUTH=user:password (not a --basic-auth option: a
    password in argv shows in `ps`), required unless Flower listens on 127.0.0.1: Flower's pages and
    API can revoke tasks and shut workers down. Without it, on 127.0.0.1, the pages show workers and
    tasks and Flower's HTTP API (/api/*, which the pages' buttons call too) answers 401."""
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
    else:
        click.echo("no CAPTIONER_FLOWER_BASIC_AUTH: Flower's pages only, on 127.0.0.1; its HTTP API (/api/*) "
                   "answers 401 until CAPTIONER_FLOWER_BASIC_AUTH=user:password is set", err=True)
    create_celery(settings).start(["flower", f"--address={host}", f"--port={port}"])


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", type=int, default=8, show_default=True, help="Threads per process (uploads wait on I/O).")
def serve(host, port, workers, threads) -> None:
    """Start the HTTP API under gunicorn."""
    context.settings()  # fail here, with the message, rather than inside each gunicorn worker
    if importlib.util.find_spec("gunicorn") is None:
        raise click.ClickException("the API runs under gunicorn, which this installation lacks: "
                                   "pip install 'captioner[api]'")
    # this interpreter's gunicorn (python -m), so that it imports this interpreter's captioner
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"{host}:{port}", "--workers", str(workers), "--threads", str(threads),
            "--access-logfile", "-"]
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # prometheus_client's multiprocess mode: each gunicorn worker counts in files here and
        # /metrics sums them (a fresh folder: counters restart with the server, as Prometheus
        # expects); gunicorn's on_exit hook removes it when the server stops
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="captioner-api-metrics-")
        argv += ["--config", "python:captioner.api.server_hooks"]
    os.execv(sys.executable, [*argv, "captioner.api:create_app()"])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the tables.")
def status(as_json) -> None:
    """Queues (jobs queued, the oldest one's age; for webhooks the events pending delivery), workers
    (live or lost, last heartbeat, model) and failed jobs by error code, from the database: what
    /readyz and /metrics report."""
    from captioner.core import liveness
    from captioner.core.queue import WEBHOOK_QUEUE

    settings = context.settings()
    with context.database(settings)() as s:
        state = liveness.report(s, settings.worker_timeout_seconds, with_failures=True)
    # embedded, nothing runs in the background: queued jobs and pending events wait for the next
    # `captioner caption` by design, which is not a stall
    stalled = [] if settings.embedded else state.stalled()
    if as_json:
        click.echo(json.dumps({"embedded": settings.embedded,
                               "queues": {name: asdict(q) for name, q in state.queues.items()},
                               "webhook_events": asdict(state.webhooks),
                               "stalled": stalled,
                               "workers": [asdict(w) for w in state.workers],
                               "failures": {code: asdict(f) for code, f in state.failures.items()},
                               "worker_timeout_seconds": settings.worker_timeout_seconds}, default=str))
        return
    click.echo(f"{'queue':<12} {'queued':>8} {'oldest':>10} {'workers':>8}")
    names = [*state.queues, *([] if settings.embedded else [WEBHOOK_QUEUE])]  # embedded: events go out inline
    for name in names:
        q = state.queue(name)
        note = ("  stalled: no live worker consumes it" if name in stalled else
                "  waits for the next `captioner caption`" if settings.embedded and q.queued else "")
        click.echo(f"{name:<12} {q.queued:>8} {_age(q.oldest_seconds) if q.queued else '-':>10} {q.workers:>8}{note}")
    click.echo(f"\nworkers (lost after {settings.worker_timeout_seconds} s without a heartbeat)")
    for w in state.workers:
        click.echo(f"  {'live' if w.live else 'LOST':<4}  {w.hostname} pid {w.pid}  {','.join(w.queues)}  "
                   f"model {w.model_version or '-'} ({w.runtime or '-'})  last beat {_age(w.seconds_since_beat)} ago")
    if not state.workers:
        click.echo("  none" + (" (embedded mode: `captioner caption` processes queued jobs)" if settings.embedded else ""))
    click.echo("\nfailed jobs by error code (last hour / total)")
    for code, f in sorted(state.failures.items(), key=lambda item: -item[1].total):
        click.echo(f"  {code:<24} {f.last_hour:>6} / {f.total}")
    if not state.failures:
        click.echo("  none")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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


COMMANDS = [worker, flower, serve, status, db]
