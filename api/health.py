"Liveness and readiness probes for the orchestrator."
from flask import Blueprint, Response, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from captioner.core import captioner, liveness, storage
from captioner.core.errors import CaptioningError
from captioner.core.queue import WEBHOOK_QUEUE

from . import Services, get_session, services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 only when the database, the broker, storage and the model checkpoint are usable, and no
    queue holds jobs that no live worker consumes (distributed mode)."""
    svc = services()
    checks: dict[str, str] = {}
    try:
        get_session().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # any driver error means not ready; the message says which
        checks["database"] = f"error: {e.__class__.__name__}"
    if svc.celery is None:
        checks["broker"] = "not configured (embedded mode: run `captioner caption` to process jobs)"
    else:
        try:
            with svc.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as e:  # kombu raises transport-specific types
            checks["broker"] = f"error: {e.__class__.__name__}"
    try:
        storage.check(svc.settings.storage)
        checks["storage"] = "ok"
    except CaptioningError as e:
        checks["storage"] = f"error: {e.message}"
    try:
        checks["model"] = svc.current_model_version()
    except CaptioningError as e:
        checks["model"] = f"error: {e.message}"
    checks["runtime"] = captioner.runtime_plan(svc.settings)  # what a worker on a host like this one runs
    queues = _queues(svc, checks)
    ready = all(not v.startswith("error") for v in checks.values())
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks, "queues": queues}), \
        200 if ready else 503


def _queues(svc: Services, checks: dict[str, str]) -> dict[str, dict]:
    """Jobs queued, the oldest one's age and the live workers per queue, and the same for the
    webhook events pending in the outbox (three indexed queries); checks["workers"] is an error
    when a queue holds jobs or events that no live worker consumes."""
    try:
        state = liveness.report(get_session(), svc.settings.worker_timeout_seconds)
    except SQLAlchemyError:
        return {}  # checks["database"] already says why
    if svc.celery is None:
        checks["workers"] = "not used (embedded mode: `captioner caption` processes queued jobs)"
    elif stalled := state.stalled():
        checks["workers"] = "error: no live worker consumes " + ", ".join(
            f"{name} ({state.queue(name).queued} {'events pending' if name == WEBHOOK_QUEUE else 'jobs queued'}, "
            f"the oldest for {state.queue(name).oldest_seconds:.0f} s)" for name in stalled)
    else:
        checks["workers"] = f"ok: {sum(w.live for w in state.workers)} live"
    return {name: {"queued": q.queued, "oldest_queued_seconds": round(q.oldest_seconds, 1), "workers": q.workers}
            for name, q in {**state.queues, WEBHOOK_QUEUE: state.webhooks}.items()}

